//! The layout of the region between `tests/child.rs` and `ipc-echo-child`
//! (shared by both through `#[path]`).

use ipc::region::SharedRegion;
use ipc::ring::{CachePadded, Entry, Ring, RingIndices};
use std::sync::atomic::{AtomicU32, AtomicU64};

/// Region size the child expects.
pub const REGION_BYTES: usize = 4096;
/// Ring capacity.
pub const DEPTH: u32 = 8;
/// A request the child never answers (it sleeps instead).
pub const HANG: u64 = u64::MAX;
/// Offsets of the entry arrays.
const REQUESTS: usize = 1024;
const REPLIES: usize = 2048;

/// Offset 0 of the region.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Header {
    /// 1 once the child serves.
    pub ready: CachePadded<AtomicU32>,
    /// 1 while the child sleeps on the request tail.
    pub parked: CachePadded<AtomicU32>,
    /// Set by the parent's death watch when the child died.
    pub dead: CachePadded<AtomicU32>,
    /// The child's robust-futex death notice (`ipc::robust`).
    pub alive: CachePadded<AtomicU32>,
    /// Parent -> child.
    pub requests: RingIndices,
    /// Child -> parent.
    pub replies: RingIndices,
    /// Requests answered.
    pub answered: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Header>() <= REQUESTS);
const _: () = assert!(REPLIES + DEPTH as usize * std::mem::size_of::<Entry<u64>>() <= REGION_BYTES);

/// The header of `region`.
pub fn header(region: &SharedRegion) -> &Header {
    assert!(region.len() >= REGION_BYTES);
    // SAFETY: offset 0 of a live, page-aligned mapping at least
    // REGION_BYTES long, all atomics (zero is valid).
    unsafe { &*region.as_ptr().cast::<Header>() }
}

/// The two rings of `region`: `(requests, replies)`.
pub fn rings(region: &SharedRegion) -> (Ring<u64>, Ring<u64>) {
    let h = header(region);
    // SAFETY: the entry arrays lie inside the mapping (asserted above),
    // 64-aligned, live as long as the region, which the callers keep
    // beyond the rings; one producer and one consumer per ring (the test
    // and the child).
    unsafe {
        (
            Ring::from_raw(&h.requests, region.as_ptr().add(REQUESTS).cast(), DEPTH),
            Ring::from_raw(&h.replies, region.as_ptr().add(REPLIES).cast(), DEPTH),
        )
    }
}

//! The shared region between the dispatcher and one worker: a `memfd`
//! mapped `MAP_SHARED` by both, holding the control header, the request and
//! reply rings, and per-slot data areas (sparse: untouched pages cost nothing).
//!
//! ```text
//!  0            Header: ring counters, worker state, in-flight record (each its own cache line)
//!  requests     [Entry<Request>; depth]   (one cache line each)
//!  replies      [Entry<Reply>; depth]
//!  slot 0       input area (input_limit, page rounded) | output area (output_limit, page rounded)
//!  ...          ...
//!  slot depth-1
//! ```

use super::protocol::{Reply, Request};
use super::ring::{CachePadded, Entry, Ring, RingIndices};
use ipc::region::SharedRegion;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64};

/// Value of [`Header::magic`].
pub const MAGIC: u64 = 0x6d66_6c61_6e67_0001;
const PAGE: usize = 4096;

/// What the worker publishes about itself.
#[repr(C)]
#[derive(Debug, Default)]
pub struct WorkerState {
    /// 1 while the worker sleeps on the request ring's tail (futex).
    pub parked: AtomicU32,
    /// Set to 1 by the worker once it is serving (functions loaded, filter on).
    pub ready: AtomicU32,
    /// The worker's pid.
    pub pid: AtomicU32,
    /// Invocations stopped at their deadline (all time, this region).
    pub preemptions: AtomicU64,
    /// Requests completed (all time, this region).
    pub completed: AtomicU64,
    /// Memory protection keys: 0 disabled by config, 1 enabled, 2
    /// unavailable on this host (`PkeysState::code`); set before `ready`.
    pub pkeys_state: AtomicU32,
    /// Keys the worker allocated (0 unless enabled).
    pub pkeys_keys: AtomicU32,
}

/// The request the worker is running, for the watchdog and for recovery
/// after the worker dies.
#[repr(C)]
#[derive(Debug, Default)]
pub struct InFlight {
    /// `seq` of the request taken off the ring and not yet answered; 0 = none.
    pub seq: AtomicU64,
    /// `CLOCK_MONOTONIC` deadline of the function now running; 0 = none.
    pub deadline_ns: AtomicU64,
    /// Its slot.
    pub slot: AtomicU32,
    /// Its function index.
    pub func: AtomicU32,
}

/// The control header at offset 0.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: u64,
    /// Ring capacity and slot count.
    pub depth: u32,
    /// Zero.
    pub reserved: u32,
    /// Dispatcher -> worker.
    pub requests: RingIndices,
    /// Worker -> dispatcher.
    pub replies: RingIndices,
    /// Callers sleeping on the reply ring's tail (futex).
    pub reply_waiters: CachePadded<AtomicU32>,
    /// The worker's state.
    pub worker: CachePadded<WorkerState>,
    /// The request in flight.
    pub inflight: CachePadded<InFlight>,
}

/// Byte offsets of everything in a region. Pure arithmetic, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Slots.
    pub depth: u32,
    /// Offset of the request entries.
    pub requests: usize,
    /// Offset of the reply entries.
    pub replies: usize,
    /// Offset of slot 0.
    pub slots: usize,
    /// Input area bytes per slot (page rounded).
    pub input_area: usize,
    /// Output area bytes per slot (page rounded).
    pub output_area: usize,
    /// Total bytes.
    pub total: usize,
}

/// A layout that does not fit the address space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("shared region of {depth} slots x ({input_limit} + {output_limit}) bytes is too large")]
pub struct LayoutError {
    depth: u32,
    input_limit: usize,
    output_limit: usize,
}

fn round_up(v: usize, to: usize) -> Option<usize> {
    v.checked_add(to - 1).map(|x| x / to * to)
}

impl Layout {
    /// The layout for `depth` slots with these data limits.
    pub fn new(depth: u32, input_limit: usize, output_limit: usize) -> Result<Self, LayoutError> {
        let err = LayoutError {
            depth,
            input_limit,
            output_limit,
        };
        let calc = || -> Option<Self> {
            let n = usize::try_from(depth).ok()?;
            let requests = round_up(std::mem::size_of::<Header>(), 64)?;
            let replies = requests.checked_add(n.checked_mul(std::mem::size_of::<Entry<Request>>())?)?;
            let replies = round_up(replies, 64)?;
            let end = replies.checked_add(n.checked_mul(std::mem::size_of::<Entry<Reply>>())?)?;
            let slots = round_up(end, PAGE)?;
            let input_area = round_up(input_limit.max(1), PAGE)?;
            let output_area = round_up(output_limit.max(1), PAGE)?;
            let per_slot = input_area.checked_add(output_area)?;
            let total = slots.checked_add(per_slot.checked_mul(n)?)?;
            isize::try_from(total).ok()?;
            Some(Self {
                depth,
                requests,
                replies,
                slots,
                input_area,
                output_area,
                total,
            })
        };
        calc().ok_or(err)
    }

    /// Offset of slot `i`'s input area; `None` if `i` is out of range.
    pub fn input_offset(&self, slot: u32) -> Option<usize> {
        if slot >= self.depth {
            return None;
        }
        let per = self.input_area.checked_add(self.output_area)?;
        self.slots.checked_add(per.checked_mul(usize::try_from(slot).ok()?)?)
    }

    /// Offset of slot `i`'s output area; `None` if `i` is out of range.
    pub fn output_offset(&self, slot: u32) -> Option<usize> {
        self.input_offset(slot)?.checked_add(self.input_area)
    }
}

/// One mapped shared region with its rings (the mapping is a
/// [`SharedRegion`] of `microfaas-ipc`).
#[derive(Debug)]
pub struct Region {
    map: SharedRegion,
    layout: Layout,
    requests: Ring<Request>,
    replies: Ring<Reply>,
}

impl Region {
    /// Creates a zeroed region (dispatcher side) backed by a new memfd.
    pub fn create(name: &str, layout: Layout) -> io::Result<Self> {
        let map = SharedRegion::create(name, layout.total)?;
        let region = Self::with_rings(map, layout);
        // SAFETY: the header lies at offset 0 of a mapping at least its size;
        // the fresh memfd reads as zero, which is a valid `Header`, and no
        // worker has the fd yet.
        unsafe {
            let h = region.map.as_ptr().cast::<Header>();
            (*h).magic = MAGIC;
            (*h).depth = layout.depth;
        }
        Ok(region)
    }

    /// Maps an inherited region (worker side), checking it against
    /// `layout`, and closes `fd`.
    pub fn open_fd(fd: OwnedFd, layout: Layout) -> io::Result<Self> {
        let map = SharedRegion::from_fd(fd, layout.total)?;
        let region = Self::with_rings(map, layout);
        let h = region.header();
        if h.magic != MAGIC || h.depth != layout.depth {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "shared region header mismatch",
            ));
        }
        Ok(region)
    }

    fn with_rings(map: SharedRegion, layout: Layout) -> Self {
        let base = map.as_ptr();
        // SAFETY: the header is at offset 0, the entry arrays at the layout's
        // offsets inside the mapping (`layout.total` bytes, checked
        // arithmetic in `Layout::new`), all suitably aligned (page-aligned
        // base, 64-aligned offsets), and they live as long as `self`, which
        // owns the mapping. Who produces and consumes each ring is fixed by
        // the protocol (see `dispatcher`).
        let (requests, replies) = unsafe {
            let h = &*base.cast::<Header>();
            (
                Ring::from_raw(&h.requests, base.add(layout.requests).cast(), layout.depth),
                Ring::from_raw(&h.replies, base.add(layout.replies).cast(), layout.depth),
            )
        };
        Self {
            map,
            layout,
            requests,
            replies,
        }
    }

    /// The control header.
    pub fn header(&self) -> &Header {
        // SAFETY: offset 0 of the live mapping; every field another process
        // writes is atomic (`magic` and `depth` are written once before the
        // worker exists).
        unsafe { &*self.map.as_ptr().cast::<Header>() }
    }

    /// Dispatcher -> worker ring.
    pub fn requests(&self) -> &Ring<Request> {
        &self.requests
    }

    /// Worker -> dispatcher ring.
    pub fn replies(&self) -> &Ring<Reply> {
        &self.replies
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The memfd (dispatcher side, to hand to a worker; `None` in a worker).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.map.fd()
    }

    /// Start of slot `slot`'s input area (`input_area` bytes).
    pub fn input_area(&self, slot: u32) -> Option<*mut u8> {
        self.map.range(self.layout.input_offset(slot)?, self.layout.input_area)
    }

    /// Start of slot `slot`'s output area (`output_area` bytes).
    pub fn output_area(&self, slot: u32) -> Option<*mut u8> {
        self.map
            .range(self.layout.output_offset(slot)?, self.layout.output_area)
    }

    /// Gives slot `slot`'s data pages back (after a large transfer).
    pub fn discard_slot(&self, slot: u32) {
        let len = self.layout.input_area.checked_add(self.layout.output_area);
        if let (Some(off), Some(len)) = (self.layout.input_offset(slot), len) {
            self.map.discard(off, len);
        }
    }
}

/// Sleeps while `word == expected`, at most `timeout_ns` (shared futex).
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout_ns: u64) {
    ipc::futex::wait(word, expected, Some(std::time::Duration::from_nanos(timeout_ns)));
}

/// Wakes every sleeper on `word` (shared futex).
pub fn futex_wake_all(word: &AtomicU32) {
    ipc::futex::wake_all(word);
}

/// `CLOCK_MONOTONIC` in nanoseconds (the clock functions see too).
/// Async-signal-safe.
pub use ipc::futex::now_ns;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_offsets() {
        let l = Layout::new(8, 100, 5000).unwrap();
        assert_eq!(l.requests % 64, 0);
        assert!(l.replies >= l.requests + 8 * std::mem::size_of::<Entry<Request>>());
        assert_eq!(l.slots % PAGE, 0);
        assert_eq!(l.input_area, PAGE);
        assert_eq!(l.output_area, 2 * PAGE);
        assert_eq!(l.input_offset(1), Some(l.slots + 3 * PAGE));
        assert_eq!(l.output_offset(7), Some(l.slots + 7 * 3 * PAGE + PAGE));
        assert_eq!(l.total, l.slots + 8 * 3 * PAGE);
        assert_eq!(l.input_offset(8), None);
        assert!(Layout::new(1 << 20, usize::MAX / 2, 1).is_err());
    }

    #[test]
    fn create_and_reopen() {
        let l = Layout::new(4, 4096, 4096).unwrap();
        let a = Region::create("test", l).unwrap();
        let dup = || a.fd().unwrap().try_clone_to_owned().unwrap();
        let b = Region::open_fd(dup(), l).unwrap();
        a.requests()
            .try_push(Request {
                seq: 7,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(b.requests().pop().map(|r| r.seq), Some(7));
        // SAFETY: slot 3's input area is a page inside both mappings.
        unsafe { a.input_area(3).unwrap().write(42) };
        // SAFETY: as above.
        assert_eq!(unsafe { b.input_area(3).unwrap().read() }, 42);
        assert!(Region::open_fd(dup(), Layout::new(8, 4096, 4096).unwrap()).is_err());
    }
}

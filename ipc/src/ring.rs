//! Lock-free single-producer single-consumer rings of `Copy` descriptors,
//! laid out in shared memory (a [`crate::region::SharedRegion`]): e.g. the
//! request and reply queues between a parent and one child. The index
//! arithmetic is pure and tested on its own; [`Ring`] adds the atomics and
//! the entry array.
//!
//! Trust: the other side can write the counters and the entries at any
//! time. The ring never indexes with an unmasked counter, so a hostile peer
//! can make entries appear stale, repeated or garbled, never make the ring
//! read or write outside its array; what an entry *means* (a slot number, a
//! length) must be checked by the user.
//!
//! ```text
//!  RingIndices { head (consumer's line) | tail (producer's line) }
//!  entries: [Entry<T>; capacity]   position p lives at entries[p & (capacity - 1)]
//!  0 <= tail - head <= capacity     (u32 positions, wrapping)
//!  Entry { published: (1 << 32) | p once position p is written | value }
//! ```
//!
//! The consumer polls the entry itself (its `published` stamp), not `tail`,
//! and the producer re-reads `head` only when its cached copy says full: a
//! request costs the consumer one cache-line transfer, not three.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Pads and aligns `T` to a cache line so that the producer's and the
/// consumer's counters never share one.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct CachePadded<T>(pub T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Number of entries between `head` and `tail` (free-running positions).
pub const fn ring_len(head: u32, tail: u32) -> u32 {
    tail.wrapping_sub(head)
}

/// Whether a ring of `capacity` entries with these positions is full.
pub const fn ring_full(head: u32, tail: u32, capacity: u32) -> bool {
    ring_len(head, tail) >= capacity
}

/// Index into the entry array of free-running position `pos`; `capacity`
/// must be a power of two.
pub fn ring_index(pos: u32, capacity: u32) -> usize {
    // Lossless: u32 always fits a usize on the 64-bit targets we build for.
    (pos & (capacity.wrapping_sub(1))) as usize
}

/// Whether `capacity` is usable: a power of two, at least 1.
pub const fn valid_capacity(capacity: u32) -> bool {
    capacity.is_power_of_two()
}

/// The stamp that marks position `pos` as written: never 0 (the value of a
/// fresh entry) and different for every position within 2^32 of it.
pub const fn stamp(pos: u32) -> u64 {
    (1u64 << 32) | pos as u64
}

/// One ring entry: its value and the stamp of the position last written to
/// it, on one cache line for descriptors of up to 56 bytes.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct Entry<T> {
    published: AtomicU64,
    value: UnsafeCell<T>,
}

/// The two counters of a ring, each on its own cache line.
#[repr(C)]
#[derive(Debug, Default)]
pub struct RingIndices {
    /// Next position the consumer reads. Written by the consumer only.
    pub head: CachePadded<AtomicU32>,
    /// Next position the producer writes. Written by the producer only.
    pub tail: CachePadded<AtomicU32>,
}

/// A view of one ring in (possibly shared) memory.
#[derive(Debug)]
pub struct Ring<T: Copy> {
    indices: *const RingIndices,
    entries: *const Entry<T>,
    capacity: u32,
    /// The producer's last view of `head` (process-local).
    cached_head: AtomicU32,
}

// SAFETY: the ring only moves `Copy` data through memory that its creator
// guarantees outlives it; cross-thread access is ordered by the acquire /
// release counters, and the single-producer / single-consumer discipline is
// part of the `from_raw` contract.
unsafe impl<T: Copy + Send> Send for Ring<T> {}
// SAFETY: as for `Send`.
unsafe impl<T: Copy + Send> Sync for Ring<T> {}

impl<T: Copy> Ring<T> {
    /// A ring over `capacity` entries at `entries` with counters at `indices`.
    ///
    /// # Safety
    /// Both pointers must be valid, suitably aligned and stay mapped for the
    /// life of the returned value (and of every copy made of the memory's
    /// other views); `capacity` must be a power of two and `entries` must
    /// hold `capacity` entries (zeroed, or last used by a ring with these
    /// indices). At any time at most one thread (in any process) may call
    /// the producer methods and at most one the consumer methods.
    pub unsafe fn from_raw(indices: *const RingIndices, entries: *const Entry<T>, capacity: u32) -> Self {
        debug_assert!(valid_capacity(capacity));
        // SAFETY: `indices` is valid (caller contract).
        let head = unsafe { &*indices }.head.load(Ordering::Acquire);
        Self {
            indices,
            entries,
            capacity,
            cached_head: AtomicU32::new(head),
        }
    }

    fn entry(&self, pos: u32) -> &Entry<T> {
        // SAFETY: the index is < capacity and the array is valid for the
        // ring's life (`from_raw` contract).
        unsafe { &*self.entries.add(ring_index(pos, self.capacity)) }
    }

    fn indices(&self) -> &RingIndices {
        // SAFETY: valid for the ring's life (`from_raw` contract).
        unsafe { &*self.indices }
    }

    /// Capacity in entries.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Entries queued now (a snapshot).
    pub fn len(&self) -> u32 {
        let ix = self.indices();
        ring_len(ix.head.load(Ordering::Acquire), ix.tail.load(Ordering::Acquire))
    }

    /// Whether nothing is queued now (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tail counter, for futex waits on "something was pushed".
    pub fn tail_word(&self) -> &AtomicU32 {
        &self.indices().tail
    }

    /// Producer: appends `value`, or hands it back when the ring is full.
    pub fn try_push(&self, value: T) -> Result<(), T> {
        let ix = self.indices();
        let tail = ix.tail.load(Ordering::Relaxed);
        if ring_full(self.cached_head.load(Ordering::Relaxed), tail, self.capacity) {
            let head = ix.head.load(Ordering::Acquire);
            self.cached_head.store(head, Ordering::Relaxed);
            if ring_full(head, tail, self.capacity) {
                return Err(value);
            }
        }
        let entry = self.entry(tail);
        // SAFETY: the consumer has moved past this entry (checked above
        // against `head`, which it advances only after reading), it does not
        // read it again before the release store of the new stamp below, and
        // only this producer writes entries.
        unsafe { entry.value.get().write_volatile(value) };
        entry.published.store(stamp(tail), Ordering::Release);
        ix.tail.store(tail.wrapping_add(1), Ordering::Release);
        Ok(())
    }

    /// Consumer: the oldest entry and its position, without removing it.
    pub fn peek(&self) -> Option<(u32, T)> {
        let head = self.indices().head.load(Ordering::Relaxed);
        let entry = self.entry(head);
        if entry.published.load(Ordering::Acquire) != stamp(head) {
            return None;
        }
        // SAFETY: the acquire load of the stamp makes the producer's write of
        // the value visible, and the producer does not rewrite the entry
        // before `head` moves past it.
        let value = unsafe { entry.value.get().read_volatile() };
        Some((head, value))
    }

    /// Consumer: removes the entry at position `pos` returned by `peek`.
    pub fn advance(&self, pos: u32) {
        self.indices().head.store(pos.wrapping_add(1), Ordering::Release);
    }

    /// Consumer: removes and returns the oldest entry.
    pub fn pop(&self) -> Option<T> {
        let (pos, value) = self.peek()?;
        self.advance(pos);
        Some(value)
    }

    /// The consumer's position (the next entry it will read).
    pub fn head_position(&self) -> u32 {
        self.indices().head.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    struct Owned<const N: usize> {
        indices: Box<RingIndices>,
        entries: Vec<Entry<u64>>,
    }

    impl<const N: usize> Owned<N> {
        fn new() -> Self {
            Self {
                indices: Box::default(),
                entries: (0..N).map(|_| Entry::default()).collect(),
            }
        }

        fn ring(&mut self) -> Ring<u64> {
            let cap = u32::try_from(N).unwrap();
            // SAFETY: both allocations outlive the ring in every test; at
            // most one thread drives each end.
            unsafe { Ring::from_raw(&*self.indices, self.entries.as_ptr(), cap) }
        }
    }

    #[test]
    fn stamps_are_never_zero_and_distinct_per_lap() {
        assert_ne!(stamp(0), 0);
        assert_ne!(stamp(u32::MAX), 0);
        assert_ne!(stamp(5), stamp(5u32.wrapping_add(8)));
        assert_eq!(std::mem::size_of::<Entry<[u8; 56]>>(), 64);
    }

    #[test]
    fn index_math() {
        assert_eq!(ring_len(u32::MAX, 1), 2);
        assert!(ring_full(u32::MAX - 1, 2, 4));
        assert!(!ring_full(u32::MAX - 1, 1, 4));
        assert_eq!(ring_index(u32::MAX, 8), 7);
        assert_eq!(ring_index(8, 8), 0);
        assert!(valid_capacity(1) && valid_capacity(64) && !valid_capacity(0) && !valid_capacity(12));
    }

    #[test]
    fn counters_on_separate_lines() {
        let ix = RingIndices::default();
        let head = std::ptr::addr_of!(ix.head) as usize;
        let tail = std::ptr::addr_of!(ix.tail) as usize;
        assert_eq!(tail - head, 64);
        assert_eq!(std::mem::align_of::<RingIndices>(), 64);
    }

    #[test]
    fn wraps_around_u32() {
        let mut owned = Owned::<4>::new();
        owned.indices.head.0.store(u32::MAX - 2, Ordering::Relaxed);
        owned.indices.tail.0.store(u32::MAX - 2, Ordering::Relaxed);
        let ring = owned.ring();
        for i in 0..4 {
            ring.try_push(i).unwrap();
        }
        assert_eq!(ring.try_push(9), Err(9));
        for i in 0..4 {
            assert_eq!(ring.pop(), Some(i));
        }
        assert_eq!(ring.pop(), None);
    }

    #[test]
    fn two_threads() {
        let mut owned = Owned::<8>::new();
        let ring = owned.ring();
        const N: u64 = 200_000;
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..N {
                    let mut v = i;
                    while let Err(back) = ring.try_push(v) {
                        v = back;
                        std::hint::spin_loop();
                    }
                }
            });
            let mut next = 0;
            while next < N {
                if let Some(v) = ring.pop() {
                    assert_eq!(v, next);
                    next += 1;
                }
            }
        });
    }

    proptest! {
        /// Any interleaving of pushes and pops behaves like a bounded VecDeque,
        /// from any starting position (including across the u32 wrap).
        #[test]
        fn matches_bounded_deque(start in any::<u32>(), ops in proptest::collection::vec(any::<Option<u64>>(), 0..200)) {
            let mut owned = Owned::<8>::new();
            owned.indices.head.0.store(start, Ordering::Relaxed);
            owned.indices.tail.0.store(start, Ordering::Relaxed);
            let ring = owned.ring();
            let mut model = VecDeque::new();
            for op in ops {
                match op {
                    Some(v) => {
                        let pushed = ring.try_push(v).is_ok();
                        prop_assert_eq!(pushed, model.len() < 8);
                        if pushed { model.push_back(v); }
                    }
                    None => prop_assert_eq!(ring.pop(), model.pop_front()),
                }
                prop_assert_eq!(ring.len() as usize, model.len());
            }
        }
    }
}

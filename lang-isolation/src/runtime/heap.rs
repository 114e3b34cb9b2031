//! The per-instance function heap: two arenas over `mmap`'d regions under one
//! byte limit. `init()` allocates in the persistent arena, every invocation in
//! the invocation arena, which is reset wholesale when the invocation ends.
//!
//! ```text
//!  persistent region (limit bytes reserved)    invocation region (limit bytes reserved)
//!  +-------------------------------+          +---------------------------+-------+
//!  | init()'s tables, long-lived   |          | one invocation's blocks   | never |
//!  | state; freed blocks reused    |          | -> reset (free list + the | used  |
//!  +-------------------------------+          |  touched pages) after it  |       |
//!                                             +---------------------------+-------+
//!  used(persistent) + used(invocation) <= limit_bytes
//! ```
//!
//! `dealloc` and `realloc` are routed by address, so an invocation may free a
//! block `init()` allocated. State that must outlive one invocation has to be
//! built by `init()`: a block allocated during an invocation is gone after it.

use super::mmap::Mapping;
use linked_list_allocator::Heap;
use std::alloc::Layout;
use std::io;
use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

/// Invocation memory kept resident across resets (first touched pages are
/// the expensive ones); touched pages beyond it are returned to the kernel.
const KEEP_RESIDENT_BYTES: usize = 256 << 10;

/// Which arena new allocations come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arena {
    /// Lives as long as the instance (`init()` allocates here).
    Persistent,
    /// Reset after every invocation.
    Invocation,
}

/// Which arena, if any, holds `[addr, addr + len)`. Pure routing logic.
pub fn route(addr: usize, len: usize, persistent: &Range<usize>, invocation: &Range<usize>) -> Option<Arena> {
    let end = addr.checked_add(len)?;
    let inside = |r: &Range<usize>| addr >= r.start && end <= r.end && (len > 0 || addr < r.end);
    if inside(persistent) {
        Some(Arena::Persistent)
    } else if inside(invocation) {
        Some(Arena::Invocation)
    } else {
        None
    }
}

/// The memory of a heap: both arenas' mappings, owned by the runtime. The
/// allocator state ([`InstanceHeap`]) only records their bounds, so that it
/// can live in memory the function may write (keyed, see `super::pkeys`)
/// without the runtime ever unmapping or resetting where a corrupted copy
/// points: every reset takes the bounds from here.
#[derive(Debug)]
pub struct HeapMemory {
    persistent: Mapping,
    invocation: Mapping,
}

impl HeapMemory {
    /// Reserves both arenas for a heap of `limit_bytes`.
    pub fn new(limit_bytes: usize) -> io::Result<Self> {
        let reserve = limit_bytes.max(4096);
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        Ok(Self {
            persistent: Mapping::anonymous(reserve, rw)?,
            invocation: Mapping::anonymous(reserve, rw)?,
        })
    }

    /// Which arena holds `[addr, addr + len)`, if any (the trusted bounds).
    pub fn arena_of(&self, addr: usize, len: usize) -> Option<Arena> {
        route(addr, len, &range_of(&self.persistent), &range_of(&self.invocation))
    }

    /// Address and length of the persistent arena.
    pub fn persistent_range(&self) -> Range<usize> {
        range_of(&self.persistent)
    }

    /// Maps `len` bytes of `fd` from `file_offset` copy-on-write over the
    /// start of the persistent arena (a post-init snapshot's heap),
    /// read-write, or read-only for a write watch
    /// (`super::watch::WriteWatch::adopt`) if `read_only`. A watch of the
    /// pages replaced ends.
    pub fn map_persistent_prefix(
        &self,
        len: usize,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        read_only: bool,
    ) -> io::Result<()> {
        let start = self.persistent_range().start;
        super::watch::forget_within(&(start..start.saturating_add(len)));
        let prot = if read_only {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        self.persistent.map_file_fixed(0, len, prot, fd, file_offset)
    }

    /// Puts fresh anonymous zero pages over `[offset, offset + len)` of the
    /// persistent arena (undoing [`HeapMemory::map_persistent_prefix`]).
    pub fn clear_persistent(&self, offset: usize, len: usize) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let start = self.persistent_range().start.saturating_add(offset);
        super::watch::forget_within(&(start..start.saturating_add(len)));
        self.persistent
            .map_anonymous_fixed(offset, len, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// Drops the private pages of `[0, len)` of the persistent arena
    /// (a snapshot's copy-on-write pages read as the snapshot again).
    pub fn discard_persistent(&self, len: usize) -> io::Result<()> {
        self.persistent.discard(0, len)
    }

    /// Drops the private pages of `[offset, offset + len)` of the
    /// persistent arena (page aligned), like
    /// [`HeapMemory::discard_persistent`] for part of it.
    pub fn discard_persistent_range(&self, offset: usize, len: usize) -> io::Result<()> {
        self.persistent.discard(offset, len)
    }

    /// Gives both arenas `key` (read-write; a watched prefix of the
    /// persistent arena stays read-only: `super::watch`).
    pub fn set_key(&self, key: u32) -> io::Result<()> {
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let persistent = self.persistent_range();
        let watched = super::watch::armed_within(&persistent).filter(|r| r.start == persistent.start);
        let writable_from = watched.as_ref().map_or(persistent.start, |r| r.end);
        let (ro_start, ro_end) = watched.map_or((0, 0), |r| (r.start, r.end));
        let invocation = range_of(&self.invocation);
        let parts = [
            (ro_start, ro_end, libc::PROT_READ),
            (writable_from, persistent.end, rw),
            (invocation.start, invocation.end, rw),
        ];
        for (start, end, prot) in parts {
            if start < end {
                // SAFETY: a range of a mapping this value owns; keying
                // changes no Rust object's validity (accesses with the key
                // closed fault and are handled by the runtime's trap
                // handler), and the watched part keeps its protection.
                unsafe { super::pkeys::pkey_mprotect(start, end - start, prot, key)? };
            }
        }
        Ok(())
    }
}

impl Drop for HeapMemory {
    fn drop(&mut self) {
        // Before the arenas are unmapped (the fields drop after this).
        super::watch::forget_within(&self.persistent_range());
    }
}

fn range_of(m: &Mapping) -> Range<usize> {
    m.addr()..m.addr() + m.len()
}

/// Bounds of one arena (a copy of its mapping's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    start: usize,
    len: usize,
}

impl Region {
    fn of(m: &Mapping) -> Self {
        Self {
            start: m.addr(),
            len: m.len(),
        }
    }

    fn range(&self) -> Range<usize> {
        self.start..self.start.saturating_add(self.len)
    }
}

/// A function instance's heap allocator over a [`HeapMemory`]. See the
/// module doc.
#[derive(Debug)]
pub struct InstanceHeap {
    limit_bytes: usize,
    persistent_region: Region,
    persistent: ArenaHeap,
    invocation_region: Region,
    invocation: ArenaHeap,
    active: Arena,
    /// Highest byte offset of the invocation region handed out since the last
    /// reset: the touched pages.
    invocation_high_water: usize,
    /// Highest byte offset of the persistent region handed out since the
    /// last full reset (what a post-init snapshot captures).
    persistent_high_water: usize,
    /// Frees of pointers outside both arenas (ignored).
    stray_frees: u64,
}

/// `linked_list_allocator::Heap` made `Send` and `Debug`.
struct ArenaHeap(Heap);

// SAFETY: the heap only holds pointers into a region of the `HeapMemory` it
// was made over, which is plain memory usable from any thread.
unsafe impl Send for ArenaHeap {}

impl std::fmt::Debug for ArenaHeap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArenaHeap")
            .field("size", &self.0.size())
            .field("used", &self.0.used())
            .finish()
    }
}

impl ArenaHeap {
    fn over(region: &Mapping) -> Self {
        // SAFETY: `region` is a read-write mapping of `len()` bytes that only
        // this heap hands out; its `HeapMemory` outlives the heap (the
        // instance keeps both).
        Self(unsafe { Heap::new(region.start(), region.len()) })
    }
}

impl InstanceHeap {
    /// An allocator over `memory` whose two arenas together hold at most
    /// `limit_bytes`.
    pub fn over(memory: &HeapMemory, limit_bytes: usize) -> Self {
        Self {
            limit_bytes,
            persistent_region: Region::of(&memory.persistent),
            persistent: ArenaHeap::over(&memory.persistent),
            invocation_region: Region::of(&memory.invocation),
            invocation: ArenaHeap::over(&memory.invocation),
            active: Arena::Persistent,
            invocation_high_water: 0,
            persistent_high_water: 0,
            stray_frees: 0,
        }
    }

    /// The byte limit of both arenas together.
    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    /// Bytes currently allocated in both arenas.
    pub fn used_bytes(&self) -> usize {
        self.persistent.0.used().saturating_add(self.invocation.0.used())
    }

    /// Frees of pointers that lie in neither arena (a misbehaving artifact).
    pub fn stray_frees(&self) -> u64 {
        self.stray_frees
    }

    /// Sends new allocations to `arena`.
    pub fn set_active(&mut self, arena: Arena) {
        self.active = arena;
    }

    /// The arena new allocations go to.
    pub fn active(&self) -> Arena {
        self.active
    }

    /// Which arena holds `[addr, addr + len)`, if any.
    pub fn arena_of(&self, addr: usize, len: usize) -> Option<Arena> {
        route(addr, len, &self.persistent_range(), &self.invocation_range())
    }

    fn persistent_range(&self) -> Range<usize> {
        self.persistent_region.range()
    }

    fn invocation_range(&self) -> Range<usize> {
        self.invocation_region.range()
    }

    /// Allocates `size` bytes aligned to `align` in the active arena; null
    /// when refused (limit reached or a bad layout).
    pub fn alloc(&mut self, size: usize, align: usize) -> *mut u8 {
        let Ok(layout) = Layout::from_size_align(size.max(1), align) else {
            return std::ptr::null_mut();
        };
        if self.used_bytes().saturating_add(layout.size()) > self.limit_bytes {
            return std::ptr::null_mut();
        }
        let arena = self.active;
        let heap = match arena {
            Arena::Persistent => &mut self.persistent,
            Arena::Invocation => &mut self.invocation,
        };
        let Ok(ptr) = heap.0.allocate_first_fit(layout) else {
            return std::ptr::null_mut();
        };
        let end = ptr.as_ptr().addr().saturating_add(layout.size());
        match arena {
            Arena::Invocation => {
                let end = end.saturating_sub(self.invocation_region.start);
                self.invocation_high_water = self.invocation_high_water.max(end);
            }
            Arena::Persistent => {
                let end = end.saturating_sub(self.persistent_region.start);
                self.persistent_high_water = self.persistent_high_water.max(end);
            }
        }
        ptr.as_ptr()
    }

    /// Frees a block; a pointer outside both arenas is counted and ignored.
    ///
    /// # Safety
    /// A `ptr` inside an arena must be a live block this heap returned with
    /// the same `size` and `align`.
    pub unsafe fn dealloc(&mut self, ptr: *mut u8, size: usize, align: usize) {
        let (Some(nn), Ok(layout)) = (NonNull::new(ptr), Layout::from_size_align(size.max(1), align)) else {
            self.stray_frees += 1;
            return;
        };
        let heap = match self.arena_of(ptr.addr(), layout.size()) {
            Some(Arena::Persistent) => &mut self.persistent,
            Some(Arena::Invocation) => &mut self.invocation,
            None => {
                self.stray_frees += 1;
                return;
            }
        };
        // SAFETY: caller contract: a live block of this arena with `layout`.
        unsafe { heap.0.deallocate(nn, layout) }
    }

    /// Moves a block to a new one of `new_size` bytes in the active arena;
    /// null (and the old block untouched) when refused.
    ///
    /// # Safety
    /// As [`InstanceHeap::dealloc`] for `ptr`, `old_size`, `align`.
    pub unsafe fn realloc(&mut self, ptr: *mut u8, old_size: usize, align: usize, new_size: usize) -> *mut u8 {
        if self.arena_of(ptr.addr(), old_size.max(1)).is_none() {
            return std::ptr::null_mut();
        }
        let new = self.alloc(new_size, align);
        if new.is_null() {
            return new;
        }
        // SAFETY: `ptr` is a live block of `old_size` bytes (caller), `new`
        // a fresh block of `new_size` bytes; distinct blocks never overlap.
        unsafe { std::ptr::copy_nonoverlapping(ptr, new, old_size.min(new_size)) };
        // SAFETY: caller contract.
        unsafe { self.dealloc(ptr, old_size, align) };
        new
    }

    /// Discards every block of the invocation arena at once and returns its
    /// touched pages beyond the first 256 KiB to the kernel. The bounds and
    /// the limit come from `memory` (this state may have been written by the
    /// function).
    ///
    /// Every pointer into the invocation arena is dangling afterwards.
    pub fn reset_invocation(&mut self, memory: &HeapMemory, limit_bytes: usize) {
        let region = &memory.invocation;
        self.limit_bytes = limit_bytes;
        self.persistent_region = Region::of(&memory.persistent);
        let untouched = self.invocation_region == Region::of(region)
            && self.invocation_high_water == 0
            && self.invocation.0.used() == 0
            && self.invocation.0.bottom().addr() == region.addr()
            && self.invocation.0.size() == region.len();
        self.invocation_region = Region::of(region);
        if untouched {
            // Nothing was handed out since the last reset (a call's small
            // blocks come from its context's scratch): a fresh allocator
            // would only write its first hole's header again, into the
            // arena's first page, one more page (and TLB miss) per warm
            // call. This state lives where the function can write it, so
            // this trusts it no more than the call's own next allocation
            // would: a function that corrupts its holes can do so within
            // one call (see `Context`); the bounds compared are the
            // runtime's own.
            return;
        }
        self.invocation = ArenaHeap::over(region);
        let touched = super::mmap::round_up_to_page(self.invocation_high_water)
            .unwrap_or(region.len())
            .min(region.len());
        if touched > KEEP_RESIDENT_BYTES {
            // A failure leaves the pages resident: harmless.
            let _ = region.discard(KEEP_RESIDENT_BYTES, touched - KEEP_RESIDENT_BYTES);
        }
        self.invocation_high_water = 0;
    }

    /// Discards both arenas (for reuse by another instance, see
    /// `Instance::from_shell`), returning the persistent arena's pages beyond
    /// the first 256 KiB to the kernel too.
    ///
    /// Every pointer into the heap is dangling afterwards.
    pub fn reset_all(&mut self, memory: &HeapMemory, limit_bytes: usize) {
        self.reset_all_sparing(memory, limit_bytes, 0);
    }

    /// [`InstanceHeap::reset_all`], leaving the persistent arena's first
    /// `spared` bytes alone (a post-init snapshot's heap, whose written
    /// pages its image space drops itself: one drop, of those pages only).
    pub fn reset_all_sparing(&mut self, memory: &HeapMemory, limit_bytes: usize, spared: usize) {
        let touched = super::mmap::round_up_to_page(self.persistent_high_water)
            .unwrap_or(memory.persistent.len())
            .min(memory.persistent.len());
        self.reset_invocation(memory, limit_bytes);
        if spared > 0 {
            // A fresh allocator would write its first hole's header into
            // the spared pages (a copy-on-write fault, and a page the
            // teardown must drop); the next instance installs its own state
            // anyway (`Instance::from_shell*`).
            self.reset_invocation_state(memory, limit_bytes);
        } else {
            self.reset_state(memory, limit_bytes);
        }
        let from = super::mmap::round_up_to_page(spared)
            .unwrap_or(usize::MAX)
            .max(KEEP_RESIDENT_BYTES);
        if touched > from {
            // A failure leaves the pages resident: harmless.
            let _ = memory.persistent.discard(from, touched - from);
        }
    }

    /// Empties both arenas' allocator state without touching their memory
    /// (no system call: the pages were given back by the last
    /// [`InstanceHeap::reset_all`]).
    ///
    /// Every pointer into the heap is dangling afterwards.
    pub fn reset_state(&mut self, memory: &HeapMemory, limit_bytes: usize) {
        // (A fresh allocator writes its first hole's header into the arena.)
        self.persistent = ArenaHeap::over(&memory.persistent);
        self.reset_invocation_state(memory, limit_bytes);
    }

    /// [`InstanceHeap::reset_state`] for the invocation arena only: the
    /// persistent arena's bytes are not touched (a post-init snapshot's
    /// state is installed next, [`InstanceHeap::restore_persistent`]).
    pub fn reset_invocation_state(&mut self, memory: &HeapMemory, limit_bytes: usize) {
        self.limit_bytes = limit_bytes;
        self.persistent_region = Region::of(&memory.persistent);
        self.invocation_region = Region::of(&memory.invocation);
        self.invocation = ArenaHeap::over(&memory.invocation);
        self.invocation_high_water = 0;
        self.persistent_high_water = 0;
        self.active = Arena::Persistent;
        self.stray_frees = 0;
    }

    /// The persistent arena's allocator state, to be put back with
    /// [`InstanceHeap::restore_persistent`] into a heap over the same
    /// `memory` whose persistent arena holds the same bytes again (a
    /// post-init snapshot). `None` if this state is not over `memory` (it
    /// lives where the function can write it).
    pub fn persistent_state(&self, memory: &HeapMemory) -> Option<PersistentState> {
        if self.persistent_region != Region::of(&memory.persistent) || self.invocation.0.used() != 0 {
            return None;
        }
        // SAFETY: `Heap` is plain data (sizes and raw pointers into the
        // arena, no `Drop`: asserted below); the copy is inert until
        // `restore_persistent` installs it over the same arena, whose
        // bytes (the holes it points into) are then the ones it describes.
        let heap = unsafe { std::ptr::read(&raw const self.persistent.0) };
        Some(PersistentState {
            heap: ArenaHeap(heap),
            region: self.persistent_region,
            high_water: self.persistent_high_water.min(memory.persistent.len()),
            used: self.persistent.0.used(),
        })
    }

    /// Installs a captured persistent state (see
    /// [`InstanceHeap::persistent_state`]); refused (`false`, nothing
    /// changed) if it was captured over another arena.
    ///
    /// # Safety
    /// The persistent arena of `memory` must hold, from its start to
    /// `state.high_water()`, the bytes it held when `state` was captured,
    /// and nothing may point into the arena.
    pub unsafe fn restore_persistent(&mut self, memory: &HeapMemory, state: &PersistentState) -> bool {
        if state.region != Region::of(&memory.persistent) {
            return false;
        }
        // SAFETY: as in `persistent_state`: a bitwise copy of inert plain
        // data, now describing the arena the caller restored.
        self.persistent = ArenaHeap(unsafe { std::ptr::read(&raw const state.heap.0) });
        self.persistent_high_water = state.high_water;
        self.active = Arena::Persistent;
        true
    }
}

const _: () = assert!(!std::mem::needs_drop::<Heap>());

/// The persistent arena's allocator state after `init()` (see
/// [`InstanceHeap::persistent_state`]).
#[derive(Debug)]
pub struct PersistentState {
    heap: ArenaHeap,
    region: Region,
    high_water: usize,
    used: usize,
}

impl PersistentState {
    /// Bytes of the arena from its start that the state's blocks lie in.
    pub fn high_water(&self) -> usize {
        self.high_water
    }

    /// Bytes allocated.
    pub fn used_bytes(&self) -> usize {
        self.used
    }

    /// Address of the arena it was captured over.
    pub fn arena_addr(&self) -> usize {
        self.region.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_by_address() {
        let p = 0x1000..0x3000;
        let i = 0x8000..0x9000;
        assert_eq!(route(0x1000, 16, &p, &i), Some(Arena::Persistent));
        assert_eq!(route(0x2ff0, 16, &p, &i), Some(Arena::Persistent));
        assert_eq!(route(0x2ff8, 16, &p, &i), None, "straddles the end");
        assert_eq!(route(0x8000, 0x1000, &p, &i), Some(Arena::Invocation));
        assert_eq!(route(0x8000, 0x1001, &p, &i), None);
        assert_eq!(route(0x9000, 0, &p, &i), None, "one past the end");
        assert_eq!(route(usize::MAX, 2, &p, &i), None, "overflow");
        assert_eq!(route(0, 1, &p, &i), None);
    }

    #[test]
    fn arenas_and_reset() {
        let mem = HeapMemory::new(1 << 20).unwrap();
        let mut heap = InstanceHeap::over(&mem, 1 << 20);
        let p = heap.alloc(1000, 8);
        assert_eq!(heap.arena_of(p as usize, 1000), Some(Arena::Persistent));
        heap.set_active(Arena::Invocation);
        let q = heap.alloc(1000, 64);
        assert_eq!(q as usize % 64, 0);
        assert_eq!(heap.arena_of(q as usize, 1000), Some(Arena::Invocation));
        // A persistent block freed during an invocation goes back to its arena.
        // SAFETY: `p` is a live block of this heap with this layout.
        unsafe { heap.dealloc(p, 1000, 8) };
        assert!(heap.used_bytes() >= 1000 && heap.used_bytes() < 2000);
        heap.reset_invocation(&mem, 1 << 20);
        assert_eq!(heap.used_bytes(), 0);
        assert_eq!(heap.stray_frees(), 0);
        // SAFETY: a pointer outside both arenas is ignored by contract.
        unsafe { heap.dealloc(8 as *mut u8, 8, 8) };
        assert_eq!(heap.stray_frees(), 1);
    }

    #[test]
    fn limit_is_shared_by_both_arenas() {
        let mem = HeapMemory::new(64 << 10).unwrap();
        let mut heap = InstanceHeap::over(&mem, 64 << 10);
        assert!(!heap.alloc(40 << 10, 8).is_null());
        heap.set_active(Arena::Invocation);
        assert!(heap.alloc(40 << 10, 8).is_null(), "over the shared limit");
        assert!(!heap.alloc(20 << 10, 8).is_null());
        heap.reset_invocation(&mem, 64 << 10);
        assert!(!heap.alloc(20 << 10, 8).is_null());
    }

    #[test]
    fn realloc_moves_and_keeps_contents() {
        let mem = HeapMemory::new(1 << 20).unwrap();
        let mut heap = InstanceHeap::over(&mem, 1 << 20);
        heap.set_active(Arena::Invocation);
        let p = heap.alloc(4, 1);
        // SAFETY: `p` is a fresh 4-byte block.
        unsafe { p.copy_from_nonoverlapping(b"abcd".as_ptr(), 4) };
        // SAFETY: `p` is live with this layout.
        let q = unsafe { heap.realloc(p, 4, 1, 4096) };
        assert!(!q.is_null());
        // SAFETY: `q` holds at least 4 initialised bytes.
        assert_eq!(unsafe { std::slice::from_raw_parts(q, 4) }, b"abcd");
        // SAFETY: a refused realloc leaves the block alone.
        let r = unsafe { heap.realloc(q, 4096, 1, 2 << 20) };
        assert!(r.is_null());
        // SAFETY: `q` still live.
        assert_eq!(unsafe { std::slice::from_raw_parts(q, 4) }, b"abcd");
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Alloc {
                size: usize,
                align_log2: u32,
                invocation: bool,
            },
            Free {
                pick: usize,
            },
            Reset,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (1usize..4_000, 0u32..8, any::<bool>())
                    .prop_map(|(size, align_log2, invocation)| Op::Alloc { size, align_log2, invocation }),
                2 => any::<usize>().prop_map(|pick| Op::Free { pick }),
                1 => Just(Op::Reset),
            ]
        }

        struct Block {
            ptr: *mut u8,
            size: usize,
            align: usize,
            arena: Arena,
            tag: u8,
        }

        fn check_contents(b: &Block) {
            // SAFETY: `b` is a live block of `size` bytes the test filled.
            let bytes = unsafe { std::slice::from_raw_parts(b.ptr, b.size) };
            assert!(bytes.iter().all(|&x| x == b.tag), "block overwritten");
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            /// Against a naive model (the list of live blocks): blocks are
            /// aligned, lie in their arena, never overlap (contents survive),
            /// the limit holds, and a reset drops exactly the invocation blocks.
            #[test]
            fn heap_matches_model(ops in proptest::collection::vec(op(), 1..200)) {
                let limit = 64 << 10;
                let mem = HeapMemory::new(limit).unwrap();
                let mut heap = InstanceHeap::over(&mem, limit);
                let mut live: Vec<Block> = Vec::new();
                for (i, op) in ops.into_iter().enumerate() {
                    match op {
                        Op::Alloc { size, align_log2, invocation } => {
                            let align = 1usize << align_log2;
                            let arena = if invocation { Arena::Invocation } else { Arena::Persistent };
                            heap.set_active(arena);
                            let ptr = heap.alloc(size, align);
                            let naive_used: usize = live.iter().map(|b| b.size).sum();
                            if ptr.is_null() {
                                continue;
                            }
                            prop_assert!(naive_used + size <= limit);
                            prop_assert_eq!(ptr as usize % align, 0);
                            prop_assert_eq!(heap.arena_of(ptr as usize, size), Some(arena));
                            let tag = u8::try_from(i % 251).unwrap();
                            // SAFETY: a fresh block of `size` bytes.
                            unsafe { ptr.write_bytes(tag, size) };
                            live.push(Block { ptr, size, align, arena, tag });
                        }
                        Op::Free { pick } => {
                            if live.is_empty() {
                                continue;
                            }
                            let b = live.swap_remove(pick % live.len());
                            check_contents(&b);
                            // SAFETY: a live block with its layout.
                            unsafe { heap.dealloc(b.ptr, b.size, b.align) };
                        }
                        Op::Reset => {
                            heap.reset_invocation(&mem, limit);
                            live.retain(|b| b.arena == Arena::Persistent);
                        }
                    }
                    prop_assert!(heap.used_bytes() <= limit);
                    for b in &live {
                        check_contents(b);
                    }
                }
                prop_assert_eq!(heap.stray_frees(), 0);
            }
        }
    }
}

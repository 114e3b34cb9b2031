//! The runtime's implementation of the [`HostServices`] table: the heap,
//! the clock, `checkpoint()` and `fail()`, all reaching the instance through
//! the table's `ctx` pointer.

use super::heap::{Arena, InstanceHeap};
use super::mmap::Mapping;
use super::pkeys;
use super::trap::Exit;
use corosensei::Yielder;
use microfaas_sdk::{ABI_VERSION, HandleResult, HostServices};
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};

/// Longest failure message kept, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// A failure the function reported through `fail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reported {
    pub kind: u32,
    pub message: String,
}

/// How a gated call left through the gate's bail path (set by a host
/// service, in the context: the function could forge it, which only
/// misreports its own failure).
pub(crate) mod bail {
    /// `fail()`.
    pub const FAILED: u32 = 1;
    /// A preemption deferred to the end of a host service.
    pub const PREEMPTED: u32 = 2;
}

/// Per-instance state the host services work on. It lives in its own
/// mapping ([`ContextBox`]), which carries the instance's key: the function
/// can read and write all of it, so the runtime trusts nothing in it after
/// a call without checking (plain values only, no owned resources, no
/// pointers the runtime follows but the services table's `ctx`).
#[repr(C)]
pub(crate) struct Context {
    // `repr(C)`, the fields an entry call touches first and the message
    // last: a call touches the context's first page only (with thousands
    // of resident instances every page a warm call touches is one more TLB
    // miss; see the README's "Warm path layout").
    pub services: HostServices,
    pub heap: InstanceHeap,
    /// The yielder of the entry call in progress (null between calls;
    /// coroutine calls only).
    pub yielder: *const Yielder<(), Exit>,
    /// `handle`'s result of a gated call (in keyed memory).
    pub result: HandleResult,
    pub checkpoints: u64,
    /// `clock_ns()` calls seen (an `init()` that read the clock may depend
    /// on the time: no post-init snapshot of it).
    pub clock_reads: u64,
    /// Set by `fail`: the kind, and `reported_len` bytes of `message`.
    pub reported_len: usize,
    /// Bytes of `scratch` handed out in the call in progress (zeroed by
    /// `Instance::handle` before each call).
    pub scratch_used: usize,
    pub reported_kind: u32,
    /// Why a gated call bailed ([`bail`]), 0 if it did not.
    pub bail: u32,
    pub reported: bool,
    /// Calls go through the protection-key gate (`super::pkeys`): 0 no,
    /// [`GATED_WITH_KEYS`], or [`GATED_WITHOUT_KEYS`] (the gate's control
    /// flow without PKRU writes, for hosts without PKU).
    pub gated: u8,
    pub in_host: AtomicBool,
    pub preempt_pending: AtomicBool,
    pub torn: AtomicBool,
    /// The front of the invocation arena: a call's first
    /// [`SCRATCH_BYTES`] of allocations (an output, a few small buffers)
    /// come from here, next to the fields a call touches anyway, instead
    /// of from the arena's own first page (see [`scratch_alloc`]).
    pub scratch: Scratch,
    pub message: [u8; MAX_MESSAGE_BYTES],
}

/// Bytes a call can allocate from its context before the invocation arena.
pub(crate) const SCRATCH_BYTES: usize = 2048;

/// [`Context::scratch`]'s bytes, aligned for any block the SDK asks for
/// (a larger alignment goes to the arena).
#[repr(C, align(64))]
pub(crate) struct Scratch(pub [u8; SCRATCH_BYTES]);

impl Context {
    /// Clears the per-call flags before an entry call.
    pub fn begin_call(&mut self) {
        self.reported = false;
        self.reported_len = 0;
        self.bail = 0;
        self.result = HandleResult::empty();
        self.yielder = std::ptr::null();
        self.in_host.store(false, Ordering::Relaxed);
        self.preempt_pending.store(false, Ordering::Relaxed);
        self.torn.store(false, Ordering::Relaxed);
    }

    /// What `fail` reported during the last call, if anything (lengths
    /// clamped: the function may have written these fields).
    pub fn take_reported(&mut self) -> Option<Reported> {
        if !std::mem::take(&mut self.reported) {
            return None;
        }
        let len = self.reported_len.min(MAX_MESSAGE_BYTES);
        Some(Reported {
            kind: self.reported_kind,
            message: String::from_utf8_lossy(&self.message[..len]).into_owned(),
        })
    }
}

/// `Context::gated`: through the gate, with PKRU writes.
pub(crate) const GATED_WITH_KEYS: u8 = 1;
/// `Context::gated`: through the gate's copy without PKRU writes.
pub(crate) const GATED_WITHOUT_KEYS: u8 = 2;

/// A [`Context`], with the table's `ctx` pointing at it: in a slot of this
/// thread's context slab ([`slab`]) until a protection key is applied,
/// then in a page-aligned mapping of its own, which carries the key.
pub(crate) struct ContextBox {
    ptr: std::ptr::NonNull<Context>,
    storage: Storage,
}

enum Storage {
    Slot,
    Own(Mapping),
}

/// Every unkeyed context of a thread, in 2 MiB chunks the kernel may back
/// with huge pages. A warm call touches its instance's context; with
/// thousands of resident instances a mapping each (a 4 KiB page each) was
/// one more TLB miss per call, and on this nested host a miss costs
/// 40-220 ns depending on how many pages are hot (see the README's "Warm
/// path layout"). Written here because the general-purpose allocators
/// cannot be asked for huge pages for just these blocks. A chunk is made a
/// huge page only once [`slab::COLLAPSE_AT`] of its slots have been handed
/// out (`MADV_COLLAPSE`, synchronous, on the deploy path): a worker with a
/// few dozen functions has no TLB pressure to relieve and would pay 2 MiB
/// for them. Slots are reused; chunks stay for the thread's life (a worker
/// holds at most its resident instances plus a cold shell).
mod slab {
    use super::Context;
    use std::cell::RefCell;

    const CHUNK: usize = 2 << 20;
    const SLOT: usize = std::mem::size_of::<Context>().next_multiple_of(64);

    /// Slots handed out of a chunk before it is made a huge page.
    pub const COLLAPSE_AT: usize = 128;

    thread_local! {
        static FREE: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    }

    /// A free slot: uninitialised, `size_of::<Context>()` bytes, 64-byte
    /// aligned.
    pub fn take() -> std::io::Result<*mut Context> {
        FREE.with(|free| {
            let mut free = free.borrow_mut();
            if free.is_empty() {
                let chunk = map_chunk()?;
                // Highest first: `pop` hands them out in address order.
                free.extend((0..CHUNK / SLOT).rev().map(|i| chunk + i * SLOT));
            }
            let slot = free.pop().ok_or_else(|| std::io::Error::other("no context slot"))?;
            let chunk = slot & !(CHUNK - 1);
            // A chunk's slots first go out in address order: this one marks
            // the chunk as busy enough (again on a reuse: harmless).
            if (slot - chunk) / SLOT == COLLAPSE_AT {
                collapse(chunk);
            }
            Ok(std::ptr::with_exposed_provenance_mut(slot))
        })
    }

    /// Asks for `chunk` in one huge page. Best effort: without one the
    /// contexts are still packed in 4 KiB pages.
    fn collapse(chunk: usize) {
        let at: *mut libc::c_void = std::ptr::with_exposed_provenance_mut(chunk);
        // SAFETY: `chunk` is one of this slab's chunks, mapped for good (see
        // `map_chunk`); both advices change only how its pages are backed,
        // never their contents.
        unsafe {
            libc::madvise(at, CHUNK, libc::MADV_HUGEPAGE);
            libc::madvise(at, CHUNK, libc::MADV_COLLAPSE);
        }
    }

    /// Gives a slot back (the context in it is dead).
    pub fn give(slot: *mut Context) {
        FREE.with(|free| free.borrow_mut().push(slot.addr()));
    }

    /// A fresh chunk, 2 MiB aligned. Returns its address, exposed (slots
    /// are made from it).
    fn map_chunk() -> std::io::Result<usize> {
        let mapping = super::Mapping::anonymous(2 * CHUNK, libc::PROT_READ | libc::PROT_WRITE)?;
        // The 2 MiB-aligned chunk inside. The unaligned ends stay mapped and
        // untouched (no memory): unmapped, they would leave holes that later
        // small mappings (function images) fill, scattering a worker's images
        // over its address space.
        let head = mapping.addr().next_multiple_of(CHUNK) - mapping.addr();
        let chunk = mapping.start().wrapping_add(head).expose_provenance();
        // Never unmapped (slots are reused), so no slot ever dangles.
        std::mem::forget(mapping);
        Ok(chunk)
    }
}

impl Drop for ContextBox {
    fn drop(&mut self) {
        if matches!(self.storage, Storage::Slot) {
            slab::give(self.ptr.as_ptr());
        }
    }
}

impl std::fmt::Debug for ContextBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("heap", &self.get().heap)
            .finish_non_exhaustive()
    }
}

impl ContextBox {
    /// A context around `heap`, in a slab slot.
    pub fn new(heap: InstanceHeap) -> std::io::Result<Self> {
        let ptr = std::ptr::NonNull::new(slab::take()?).ok_or_else(|| std::io::Error::other("no context slot"))?;
        let value = Context {
            services: HostServices {
                abi_version: ABI_VERSION,
                reserved: 0,
                ctx: ptr.as_ptr().cast(),
                alloc: host_alloc,
                dealloc: host_dealloc,
                realloc: host_realloc,
                clock_ns: host_clock_ns,
                checkpoint: host_checkpoint,
                fail: host_fail,
            },
            heap,
            reported: false,
            reported_kind: 0,
            reported_len: 0,
            scratch_used: 0,
            scratch: Scratch([0; SCRATCH_BYTES]),
            message: [0; MAX_MESSAGE_BYTES],
            yielder: std::ptr::null(),
            gated: 0,
            bail: 0,
            result: HandleResult::empty(),
            in_host: AtomicBool::new(false),
            preempt_pending: AtomicBool::new(false),
            torn: AtomicBool::new(false),
            checkpoints: 0,
            clock_reads: 0,
        };
        // SAFETY: the slot is free (ours until `give`), read-write, 64-byte
        // aligned (enough for `Context`) and `size_of::<Context>()` bytes.
        unsafe { ptr.as_ptr().write(value) };
        Ok(Self {
            ptr,
            storage: Storage::Slot,
        })
    }

    /// The context.
    pub fn get(&self) -> &Context {
        // SAFETY: `ptr` holds a `Context` written in `new`, alive until drop.
        unsafe { self.ptr.as_ref() }
    }

    /// The context, mutably.
    pub fn get_mut(&mut self) -> &mut Context {
        // SAFETY: as in `get`; `&mut self` is the only handle.
        unsafe { self.ptr.as_mut() }
    }

    /// Raw pointer for the entry calls.
    pub fn as_ptr(&mut self) -> *mut Context {
        self.ptr.as_ptr()
    }

    /// Moves the context into a page-aligned mapping of its own and gives
    /// that `key`. Before any call only: the table's `ctx` moves with it,
    /// but a function that kept the old address would not follow.
    pub fn set_key(&mut self, key: u32) -> std::io::Result<()> {
        if matches!(self.storage, Storage::Slot) {
            let mapping = Mapping::anonymous(std::mem::size_of::<Context>(), libc::PROT_READ | libc::PROT_WRITE)?;
            let to = mapping.start().cast::<Context>();
            // SAFETY: `to` is a fresh, page-aligned, read-write mapping of at
            // least `size_of::<Context>()` bytes; the slot holds a live
            // `Context` (plain data: a byte copy is a valid move), not used
            // again once its slot is given back below.
            unsafe {
                std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), to, 1);
                (*to).services.ctx = to.cast();
            }
            slab::give(self.ptr.as_ptr());
            self.ptr = std::ptr::NonNull::new(to).ok_or_else(|| std::io::Error::other("null mapping"))?;
            self.storage = Storage::Own(mapping);
        }
        let Storage::Own(mapping) = &self.storage else {
            unreachable!("moved into a mapping above")
        };
        // SAFETY: a mapping this value owns; see `HeapMemory::set_key`.
        unsafe { super::pkeys::pkey_mprotect(mapping.addr(), mapping.len(), libc::PROT_READ | libc::PROT_WRITE, key) }
    }
}

// `Context` owns nothing that needs dropping (plain values and an allocator
// state over memory the instance owns), so the mapping is simply unmapped:
// whatever the function wrote into it is never interpreted on drop.
const _: () = assert!(!std::mem::needs_drop::<Context>());

/// `CLOCK_MONOTONIC` in nanoseconds (the clock every microfaas timestamp
/// uses, comparable across processes).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    timespec_to_ns(ts.tv_sec, ts.tv_nsec)
}

/// Seconds + nanoseconds to nanoseconds, saturating (negative = 0).
pub fn timespec_to_ns(sec: i64, nsec: i64) -> u64 {
    let sec = u64::try_from(sec).unwrap_or(0);
    let nsec = u64::try_from(nsec).unwrap_or(0);
    sec.saturating_mul(1_000_000_000).saturating_add(nsec)
}

/// Marks a host service as running for the preemption logic; on leaving,
/// performs a preemption deferred meanwhile.
struct HostCall(*mut Context);

impl HostCall {
    /// # Safety
    /// `ctx` must be the live context of the entry call in progress.
    unsafe fn enter(ctx: *mut c_void) -> Self {
        let ctx = ctx.cast::<Context>();
        // SAFETY: caller contract.
        unsafe { &(*ctx).in_host }.store(true, Ordering::Relaxed);
        Self(ctx)
    }
}

impl Drop for HostCall {
    fn drop(&mut self) {
        // SAFETY: `enter`'s contract: the context outlives the host call.
        let ctx = unsafe { &*self.0 };
        ctx.in_host.store(false, Ordering::Relaxed);
        if ctx.preempt_pending.load(Ordering::Relaxed) && ctx.gated != 0 {
            let with_keys = ctx.gated == GATED_WITH_KEYS;
            // SAFETY: `enter`'s contract; a gated context is only used in
            // gated calls, and this one is in progress.
            unsafe {
                (*self.0).bail = bail::PREEMPTED;
                pkeys::gate_bail(with_keys);
            }
        }
        if ctx.preempt_pending.load(Ordering::Relaxed) && !ctx.yielder.is_null() {
            // SAFETY: the yielder belongs to the entry call in progress on
            // this stack; the runtime never resumes a call that yielded.
            unsafe { (*ctx.yielder).suspend(Exit::Preempted) };
            std::process::abort();
        }
    }
}

unsafe extern "C" fn host_alloc(ctx: *mut c_void, size: usize, align: usize) -> *mut u8 {
    // SAFETY: the table's ctx is the live context during entry calls.
    let call = unsafe { HostCall::enter(ctx) };
    // SAFETY: as above; the runtime does not touch the context while the
    // function runs, so this is the only reference.
    let ptr = match unsafe { scratch_alloc(call.0, size, align) } {
        Some(ptr) => ptr,
        // SAFETY: as above.
        None => unsafe { &mut (*call.0).heap }.alloc(size, align),
    };
    drop(call);
    ptr
}

/// The scratch bytes of `ctx`, as an address range (derived from the
/// context's own address, never from a field the function can write).
fn scratch_range(ctx: *const Context) -> std::ops::Range<usize> {
    let start = ctx.addr() + std::mem::offset_of!(Context, scratch);
    start..start + SCRATCH_BYTES
}

/// A block of the call's scratch, if the active arena is the invocation
/// arena and the block fits. `scratch_used` lives where the function can
/// write it: it is only trusted within the scratch's own bounds.
///
/// # Safety
/// `ctx` must be a live context that nothing else uses meanwhile (the
/// entry call in progress, or an instance between calls).
pub(crate) unsafe fn scratch_alloc(ctx: *mut Context, size: usize, align: usize) -> Option<*mut u8> {
    // SAFETY: caller contract.
    let c = unsafe { &mut *ctx };
    if c.heap.active() != Arena::Invocation || !align.is_power_of_two() || align > 64 {
        return None;
    }
    let at = c.scratch_used.checked_next_multiple_of(align)?;
    let end = at.checked_add(size.max(1))?;
    if end > SCRATCH_BYTES {
        return None;
    }
    c.scratch_used = end;
    Some(c.scratch.0.as_mut_ptr().wrapping_add(at))
}

/// Whether `[ptr, ptr + len)` lies in `ctx`'s scratch.
pub(crate) fn in_scratch(ctx: *const Context, ptr: *const u8, len: usize) -> bool {
    let range = scratch_range(ctx);
    let start = ptr.addr();
    range.contains(&start) && start.checked_add(len).is_some_and(|end| end <= range.end)
}

unsafe extern "C" fn host_dealloc(ctx: *mut c_void, ptr: *mut u8, size: usize, align: usize) {
    // SAFETY: as in `host_alloc`.
    let call = unsafe { HostCall::enter(ctx) };
    // A scratch block goes with the call.
    if !in_scratch(call.0, ptr, size) {
        // SAFETY: as in `host_alloc`; the block contract is the caller's
        // (the SDK allocator frees only what it allocated, with the same
        // layout).
        unsafe { (*call.0).heap.dealloc(ptr, size, align) };
    }
    drop(call);
}

unsafe extern "C" fn host_realloc(
    ctx: *mut c_void,
    ptr: *mut u8,
    old_size: usize,
    align: usize,
    new_size: usize,
) -> *mut u8 {
    // SAFETY: as in `host_alloc`.
    let call = unsafe { HostCall::enter(ctx) };
    let new = if in_scratch(call.0, ptr, old_size) {
        // SAFETY: as in `host_alloc`.
        let new = match unsafe { scratch_alloc(call.0, new_size, align) } {
            Some(new) => new,
            // SAFETY: as in `host_alloc`.
            None => unsafe { &mut (*call.0).heap }.alloc(new_size, align),
        };
        if !new.is_null() {
            // SAFETY: `ptr` is a scratch block of `old_size` bytes (checked),
            // `new` a fresh block of `new_size`; a `scratch_used` the
            // function rewound could make them overlap, hence `copy`.
            unsafe { std::ptr::copy(ptr, new, old_size.min(new_size)) };
        }
        new
    } else {
        // SAFETY: as in `host_dealloc`.
        unsafe { (*call.0).heap.realloc(ptr, old_size, align, new_size) }
    };
    drop(call);
    new
}

unsafe extern "C" fn host_clock_ns(ctx: *mut c_void) -> u64 {
    // SAFETY: the table's ctx is the live context during entry calls; a
    // plain counter (the function may write it too: it only decides
    // whether its own init is snapshotted).
    unsafe {
        let reads = &raw mut (*ctx.cast::<Context>()).clock_reads;
        *reads = (*reads).wrapping_add(1);
    }
    // SAFETY: the table's ctx is the live context during entry calls.
    if unsafe { (*ctx.cast::<Context>()).gated } == GATED_WITH_KEYS {
        // The vDSO reads the kernel's clock page, which carries key 0: open
        // the keys for the read only (back to the call's PKRU from the
        // runtime's own record).
        // SAFETY: inside a gated call; the clock read touches no keyed memory.
        unsafe { pkeys::with_runtime_keys(monotonic_ns) }
    } else {
        monotonic_ns()
    }
}

unsafe extern "C" fn host_checkpoint(ctx: *mut c_void) {
    // A marker only outside the vm backend: count it.
    // SAFETY: as in `host_alloc`.
    let call = unsafe { HostCall::enter(ctx) };
    // SAFETY: as in `host_alloc`.
    unsafe { (*call.0).checkpoints += 1 };
    drop(call);
}

unsafe extern "C" fn host_fail(ctx: *mut c_void, kind: u32, msg: *const u8, msg_len: usize) -> ! {
    let ctx = ctx.cast::<Context>();
    // SAFETY: as in `host_alloc`. `in_host` stays set: a preemption now must
    // not interrupt the switch below (the next call clears it).
    unsafe { &(*ctx).in_host }.store(true, Ordering::Relaxed);
    // SAFETY: as in `host_alloc`.
    let context = unsafe { &mut *ctx };
    let len = if msg.is_null() {
        0
    } else {
        msg_len.min(MAX_MESSAGE_BYTES)
    };
    if len > 0 {
        // SAFETY: the SDK passes `msg_len` readable bytes at `msg`; the copy
        // goes to the context's own buffer, which holds MAX_MESSAGE_BYTES.
        // The runtime's own memmove: this runs with the function's PKRU,
        // and glibc's reads libc's data (key 0).
        unsafe { super::memfns::memmove(context.message.as_mut_ptr(), msg, len) };
    }
    context.reported_kind = kind;
    context.reported_len = len;
    context.reported = true;
    if context.gated != 0 {
        context.bail = bail::FAILED;
        // SAFETY: a gated context is in a gated call now.
        unsafe { pkeys::gate_bail(context.gated == GATED_WITH_KEYS) };
    }
    if !context.yielder.is_null() {
        // SAFETY: as in `HostCall::drop`.
        unsafe { (*context.yielder).suspend(Exit::Failed) };
    }
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_share_a_slab_until_keyed_and_move_intact() {
        let memory = crate::runtime::HeapMemory::new(1 << 20).unwrap();
        let new = || ContextBox::new(InstanceHeap::over(&memory, 1 << 20)).unwrap();
        let (mut a, mut b) = (new(), new());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        assert_ne!(pa, pb);
        assert_eq!(pa.addr() % 64, 0);
        assert_eq!(a.get().services.ctx, pa.cast::<c_void>());
        // Slots come out of one 2 MiB chunk, in address order.
        assert_eq!(pa.addr() / (2 << 20), pb.addr() / (2 << 20));
        drop(a);
        let mut c = new();
        assert_eq!(c.as_ptr(), pa, "a freed slot is reused");
        // Keyed (without PKU the key itself is refused, after the move):
        // its own page, same contents, the table pointing at the new place.
        b.get_mut().clock_reads = 42;
        b.get_mut().message[..5].copy_from_slice(b"hello");
        let _ = b.set_key(0);
        let moved = b.as_ptr();
        assert_ne!(moved, pb);
        assert_eq!(moved.addr() % 4096, 0);
        assert_eq!(b.get().services.ctx, moved.cast::<c_void>());
        assert_eq!(b.get().clock_reads, 42);
        assert_eq!(&b.get().message[..5], b"hello");
        assert_eq!(c.get().clock_reads, 0, "a reused slot starts fresh");
        drop((b, c));
    }

    #[test]
    fn what_a_call_touches_lies_in_the_contexts_first_page() {
        // The context's mapping is page aligned; everything but the message
        // (written only by `fail`) is in its first page.
        let end_of_message = std::mem::offset_of!(Context, message) + MAX_MESSAGE_BYTES;
        assert!(std::mem::size_of::<Context>() - end_of_message < std::mem::align_of::<Context>());
        assert!(std::mem::offset_of!(Context, message) <= 4096);
    }

    #[test]
    fn timespec_conversion() {
        assert_eq!(timespec_to_ns(1, 5), 1_000_000_005);
        assert_eq!(timespec_to_ns(-1, 5), 5);
        assert_eq!(timespec_to_ns(i64::MAX, 0), u64::MAX);
        let a = monotonic_ns();
        assert!(monotonic_ns() >= a);
    }
}

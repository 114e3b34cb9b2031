//! The runtime's implementation of the [`HostServices`] table: the heap,
//! the clock, `checkpoint()` and `fail()`, all reaching the instance through
//! the table's `ctx` pointer.

use super::heap::InstanceHeap;
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
pub(crate) struct Context {
    pub services: HostServices,
    pub heap: InstanceHeap,
    /// Set by `fail`: the kind, and `reported_len` bytes of `message`.
    pub reported: bool,
    pub reported_kind: u32,
    pub reported_len: usize,
    pub message: [u8; MAX_MESSAGE_BYTES],
    /// The yielder of the entry call in progress (null between calls;
    /// coroutine calls only).
    pub yielder: *const Yielder<(), Exit>,
    /// Calls go through the protection-key gate (`super::pkeys`): 0 no,
    /// [`GATED_WITH_KEYS`], or [`GATED_WITHOUT_KEYS`] (the gate's control
    /// flow without PKRU writes, for hosts without PKU).
    pub gated: u8,
    /// Why a gated call bailed ([`bail`]), 0 if it did not.
    pub bail: u32,
    /// `handle`'s result of a gated call (in keyed memory).
    pub result: HandleResult,
    pub in_host: AtomicBool,
    pub preempt_pending: AtomicBool,
    pub torn: AtomicBool,
    pub checkpoints: u64,
    /// `clock_ns()` calls seen (an `init()` that read the clock may depend
    /// on the time: no post-init snapshot of it).
    pub clock_reads: u64,
}

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

/// A [`Context`] in a mapping of its own (so that it can carry the
/// instance's protection key), with the table's `ctx` pointing at it.
pub(crate) struct ContextBox {
    ptr: std::ptr::NonNull<Context>,
    mapping: Mapping,
}

impl std::fmt::Debug for ContextBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("heap", &self.get().heap)
            .finish_non_exhaustive()
    }
}

impl ContextBox {
    /// A context around `heap`.
    pub fn new(heap: InstanceHeap) -> std::io::Result<Self> {
        let mapping = Mapping::anonymous(std::mem::size_of::<Context>(), libc::PROT_READ | libc::PROT_WRITE)?;
        let ptr = std::ptr::NonNull::new(mapping.start().cast::<Context>())
            .ok_or_else(|| std::io::Error::other("null mapping"))?;
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
        // SAFETY: the mapping is fresh, read-write, page aligned (enough for
        // `Context`) and at least `size_of::<Context>()` bytes.
        unsafe { ptr.as_ptr().write(value) };
        Ok(Self { ptr, mapping })
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

    /// Gives the context's page `key`.
    pub fn set_key(&self, key: u32) -> std::io::Result<()> {
        // SAFETY: a mapping this value owns; see `HeapMemory::set_key`.
        unsafe {
            super::pkeys::pkey_mprotect(
                self.mapping.addr(),
                self.mapping.len(),
                libc::PROT_READ | libc::PROT_WRITE,
                key,
            )
        }
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
    let ptr = unsafe { &mut (*call.0).heap }.alloc(size, align);
    drop(call);
    ptr
}

unsafe extern "C" fn host_dealloc(ctx: *mut c_void, ptr: *mut u8, size: usize, align: usize) {
    // SAFETY: as in `host_alloc`.
    let call = unsafe { HostCall::enter(ctx) };
    // SAFETY: as in `host_alloc`; the block contract is the caller's (the
    // SDK allocator frees only what it allocated, with the same layout).
    unsafe { (*call.0).heap.dealloc(ptr, size, align) };
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
    // SAFETY: as in `host_dealloc`.
    let new = unsafe { (*call.0).heap.realloc(ptr, old_size, align, new_size) };
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
    fn timespec_conversion() {
        assert_eq!(timespec_to_ns(1, 5), 1_000_000_005);
        assert_eq!(timespec_to_ns(-1, 5), 5);
        assert_eq!(timespec_to_ns(i64::MAX, 0), u64::MAX);
        let a = monotonic_ns();
        assert!(monotonic_ns() >= a);
    }
}

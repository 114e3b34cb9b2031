//! The runtime's implementation of the [`HostServices`] table: the heap,
//! the clock, `checkpoint()` and `fail()`, all reaching the instance through
//! the table's `ctx` pointer.

use super::heap::InstanceHeap;
use super::trap::Exit;
use corosensei::Yielder;
use microfaas_sdk::{ABI_VERSION, HostServices};
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

/// Per-instance state the host services work on. Boxed, so the table's
/// `ctx` (which points here) stays valid while the instance lives.
pub(crate) struct Context {
    pub services: HostServices,
    pub heap: InstanceHeap,
    pub reported: Option<Reported>,
    /// The yielder of the entry call in progress (null between calls).
    pub yielder: *const Yielder<(), Exit>,
    pub in_host: AtomicBool,
    pub preempt_pending: AtomicBool,
    pub torn: AtomicBool,
    pub checkpoints: u64,
}

impl Context {
    /// A context around `heap`, its table's `ctx` not yet pointing at it.
    pub fn boxed(heap: InstanceHeap) -> Box<Self> {
        let mut ctx = Box::new(Self {
            services: HostServices {
                abi_version: ABI_VERSION,
                reserved: 0,
                ctx: std::ptr::null_mut(),
                alloc: host_alloc,
                dealloc: host_dealloc,
                realloc: host_realloc,
                clock_ns: host_clock_ns,
                checkpoint: host_checkpoint,
                fail: host_fail,
            },
            heap,
            reported: None,
            yielder: std::ptr::null(),
            in_host: AtomicBool::new(false),
            preempt_pending: AtomicBool::new(false),
            torn: AtomicBool::new(false),
            checkpoints: 0,
        });
        let self_ptr: *mut Context = &mut *ctx;
        ctx.services.ctx = self_ptr.cast();
        ctx
    }

    /// Clears the per-call flags before an entry call.
    pub fn begin_call(&mut self) {
        self.reported = None;
        self.yielder = std::ptr::null();
        self.in_host.store(false, Ordering::Relaxed);
        self.preempt_pending.store(false, Ordering::Relaxed);
        self.torn.store(false, Ordering::Relaxed);
    }
}

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

unsafe extern "C" fn host_clock_ns(_ctx: *mut c_void) -> u64 {
    monotonic_ns()
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
    let message = if msg.is_null() || msg_len == 0 {
        String::new()
    } else {
        // SAFETY: the SDK passes `msg_len` readable bytes at `msg`.
        let bytes = unsafe { std::slice::from_raw_parts(msg, msg_len.min(MAX_MESSAGE_BYTES)) };
        String::from_utf8_lossy(bytes).into_owned()
    };
    // SAFETY: as in `host_alloc`.
    let context = unsafe { &mut *ctx };
    context.reported = Some(Reported { kind, message });
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

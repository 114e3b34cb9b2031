//! Kicking a runner thread out of `KVM_RUN` (the host watchdog): a real-time
//! signal whose handler sets `kvm_run.immediate_exit` of the vCPU the runner
//! runs now (a thread-local pointer, set while it runs one), so a signal
//! that lands just before `KVM_RUN` still stops it. A kick that lands after
//! the runner moved on to another instance stops that one's `KVM_RUN` once;
//! the runner sees it was not killed and runs on.

use kvm_bindings::kvm_run;
use std::cell::Cell;
use std::sync::Once;

thread_local! {
    /// This thread's vCPU `kvm_run` page (null on other threads).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads: SIGRTMIN + 5 (RTMIN+0 is taken
/// by other VMMs' conventions; nothing else in this process uses +5).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 5
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: a const-initialised thread-local read and one
    // volatile byte store.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: `run` is this thread's mapped `kvm_run`, registered by
        // `register_vcpu_thread` and cleared before the vCPU fd is dropped.
        unsafe { (&raw mut (*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub fn install() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick);
    });
    result
}

/// Registers `run` as the calling thread's `kvm_run` for the handler.
///
/// # Safety
/// `run` must stay mapped until [`unregister_vcpu_thread`] is called on
/// this thread.
pub unsafe fn register_vcpu_thread(run: *mut kvm_run) {
    KVM_RUN.with(|p| p.set(run));
}

/// Clears the calling thread's registration.
pub fn unregister_vcpu_thread() {
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
}

/// Sends the kick signal to `thread`.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` is a live thread of this process (a runner of a
    // pool the caller holds, so it has not exited); the handler is
    // installed before any vCPU runs.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}

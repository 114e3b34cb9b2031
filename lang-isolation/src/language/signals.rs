//! The worker's preemption and policy signals.
//!
//! * SIGUSR1 (watchdog mode) and SIGALRM (periodic mode) end the running
//!   function if, and only if, its deadline has passed: a late or stray
//!   signal for an earlier invocation is ignored.
//! * SIGSYS (seccomp `SECCOMP_RET_TRAP`) ends the running function and
//!   records the forbidden system call; outside a function it is fatal.
//!
//! Handlers touch only atomics, `clock_gettime`, `sigaction`/`raise` and the
//! runtime's [`preempt_from_signal`], which redirects the interrupted context.

use super::protocol::Preemption;
use super::shm::now_ns;
use crate::runtime::{self, preempt_from_signal};
use std::ffi::c_void;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The watchdog's preemption signal.
pub const PREEMPT_SIGNAL: libc::c_int = libc::SIGUSR1;

/// Deadline of the function now running (`CLOCK_MONOTONIC` ns); 0 = none.
static DEADLINE_NS: AtomicU64 = AtomicU64::new(0);
/// 1 + the system call number of the latest seccomp trap; 0 = none.
static POLICY_SYSCALL: AtomicU64 = AtomicU64::new(0);

/// Publishes the deadline of the call about to run.
pub fn arm(deadline_ns: u64) {
    POLICY_SYSCALL.store(0, Ordering::Relaxed);
    DEADLINE_NS.store(deadline_ns, Ordering::Release);
}

/// Clears the deadline after the call.
pub fn disarm() {
    DEADLINE_NS.store(0, Ordering::Release);
}

/// The forbidden system call that ended the last call, if one did.
pub fn take_policy_violation() -> Option<u64> {
    match POLICY_SYSCALL.swap(0, Ordering::Relaxed) {
        0 => None,
        n => Some(n - 1),
    }
}

/// Whether a preemption signal arriving at `now_ns` should stop the call
/// with deadline `deadline_ns` (0 = no call running). Pure.
pub fn overdue(deadline_ns: u64, now_ns: u64) -> bool {
    deadline_ns != 0 && now_ns >= deadline_ns
}

extern "C" fn on_preempt(_signal: libc::c_int, _info: *mut libc::siginfo_t, context: *mut c_void) {
    // First: the kernel ran this with key 0 alone (see `open_all_keys`).
    crate::runtime::pkeys::open_all_keys();
    if !overdue(DEADLINE_NS.load(Ordering::Acquire), now_ns()) {
        return;
    }
    // SAFETY: called from a SA_SIGINFO handler on the worker's only thread
    // (the one running functions), with this signal's ucontext.
    unsafe { preempt_from_signal(context) };
}

/// Offset of `_sigsys._syscall` in the kernel's `siginfo_t` on x86-64:
/// signo, errno, code, padding (16 bytes), then `_call_addr` (8 bytes).
const SIGSYS_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // First: the kernel ran this with key 0 alone (see `open_all_keys`).
    crate::runtime::pkeys::open_all_keys();
    // SAFETY: for SIGSYS raised by seccomp the kernel fills `_sigsys`; the
    // siginfo is 128 bytes, so the i32 at offset 24 is inside it.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SIGSYS_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    POLICY_SYSCALL.store(u64::try_from(nr).unwrap_or(0).saturating_add(1), Ordering::Relaxed);
    // SAFETY: as in `on_preempt`.
    if unsafe { preempt_from_signal(context) } == runtime::Preemption::NotRunning {
        // The worker's own code broke its policy: say which call (a bug in
        // the allowlist), die; the dispatcher notices and respawns.
        report_own_violation(nr);
        // SAFETY: sigaction with SIG_DFL and raise are async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(signal, &action, std::ptr::null_mut());
            libc::raise(signal);
        }
    }
}

/// Writes `microfaas-worker: forbidden system call NR outside a function`
/// to stderr with one `write` (async-signal-safe: no allocation, no lock).
fn report_own_violation(nr: i32) {
    let mut buf = [0u8; 80];
    let prefix = b"microfaas-worker: forbidden system call ";
    let suffix = b" outside a function\n";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut len = prefix.len();
    let mut digits = [0u8; 12];
    let mut n = nr.unsigned_abs();
    let mut d = 0;
    loop {
        digits[d] = b'0' + u8::try_from(n % 10).unwrap_or(0);
        d += 1;
        n /= 10;
        if n == 0 || d == digits.len() {
            break;
        }
    }
    for &c in digits[..d].iter().rev() {
        buf[len] = c;
        len += 1;
    }
    buf[len..len + suffix.len()].copy_from_slice(suffix);
    len += suffix.len();
    // SAFETY: writing `len` initialised bytes of a local buffer to stderr.
    unsafe { libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len) };
}

fn install_handler(
    signal: libc::c_int,
    handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void),
) -> io::Result<()> {
    // SAFETY: an all-zero sigaction is valid to fill in; the mask is
    // initialised before use; `handler` has the SA_SIGINFO signature.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        // One trap at a time: block the others while a handler runs.
        for s in [libc::SIGUSR1, libc::SIGALRM, libc::SIGSYS] {
            libc::sigaddset(&mut action.sa_mask, s);
        }
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Installs the handlers for `mode` and SIGSYS.
pub fn install(mode: Preemption) -> io::Result<()> {
    match mode {
        Preemption::Watchdog => install_handler(PREEMPT_SIGNAL, on_preempt)?,
        Preemption::Periodic { .. } => install_handler(libc::SIGALRM, on_preempt)?,
        Preemption::Disabled => {}
    }
    install_handler(libc::SIGSYS, on_sigsys)
}

/// Starts the paper's periodic per-worker timer: SIGALRM every `quantum`.
pub fn start_timer(quantum: Duration) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(quantum.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(quantum.subsec_nanos()),
    };
    // SAFETY: a zeroed sigevent is valid; timer_create writes the new timer
    // id into `timer`; timer_settime reads the local itimerspec.
    unsafe {
        let mut sev: libc::sigevent = std::mem::zeroed();
        sev.sigev_notify = libc::SIGEV_SIGNAL;
        sev.sigev_signo = libc::SIGALRM;
        let mut timer: libc::timer_t = std::ptr::null_mut();
        if libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer) != 0 {
            return Err(io::Error::last_os_error());
        }
        let spec = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        if libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overdue_rule() {
        assert!(!overdue(0, 5));
        assert!(!overdue(10, 9));
        assert!(overdue(10, 10));
        assert!(overdue(10, 11));
    }

    #[test]
    fn sigsys_offset_matches_kernel_layout() {
        // si_signo, si_errno, si_code (+ pad to 8) then the union at 16;
        // `_sigsys` = { void *_call_addr; int _syscall; unsigned _arch; }.
        assert_eq!(std::mem::size_of::<libc::siginfo_t>(), 128);
        assert_eq!(SIGSYS_SYSCALL_OFFSET, 16 + std::mem::size_of::<*const u8>());
    }
}

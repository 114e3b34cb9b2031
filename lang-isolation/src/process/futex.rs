//! Shared (inter-process) futex calls on words in a [`super::shm`] region.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// Woken, or the value already differed, or a signal: recheck.
    Recheck,
    /// The timeout passed.
    TimedOut,
}

/// Blocks while `word == expected`, at most `timeout`.
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> Woken {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(t.subsec_nanos()),
    });
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, aligned u32 in shared memory; `ts_ptr` is
    // null or a valid timespec. FUTEX_WAIT without the private flag works
    // across processes.
    let rc = unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, expected, ts_ptr, 0, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ETIMEDOUT) {
        Woken::TimedOut
    } else {
        Woken::Recheck
    }
}

/// Wakes one waiter on `word`.
pub fn wake(word: &AtomicU32) {
    // SAFETY: `word` is a live, aligned u32; FUTEX_WAKE reads no memory.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1, 0, 0, 0);
    }
}

/// `struct futex_waitv` of the kernel ABI.
#[repr(C)]
struct FutexWaitv {
    val: u64,
    uaddr: u64,
    flags: u32,
    reserved: u32,
}

const FUTEX2_SIZE_U32: u32 = 0x02;

/// Blocks while `a == a_expected` and `b == b_expected`, until the absolute
/// `CLOCK_MONOTONIC` deadline `deadline_ns`.
pub fn wait_either(a: &AtomicU32, a_expected: u32, b: &AtomicU32, b_expected: u32, deadline_ns: u64) -> Woken {
    let addr = |w: &AtomicU32| u64::try_from(w.as_ptr().addr()).unwrap_or(0);
    let waiters = [
        FutexWaitv {
            val: u64::from(a_expected),
            uaddr: addr(a),
            flags: FUTEX2_SIZE_U32,
            reserved: 0,
        },
        FutexWaitv {
            val: u64::from(b_expected),
            uaddr: addr(b),
            flags: FUTEX2_SIZE_U32,
            reserved: 0,
        },
    ];
    let deadline = libc::timespec {
        tv_sec: libc::time_t::try_from(deadline_ns / 1_000_000_000).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::try_from(deadline_ns % 1_000_000_000).unwrap_or(0),
    };
    // SAFETY: `waiters` is a valid array of two futex_waitv for live, aligned
    // u32 words (shared: no FUTEX2_PRIVATE); `deadline` a valid timespec.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            waiters.as_ptr(),
            2u32,
            0u32,
            &deadline as *const libc::timespec,
            libc::CLOCK_MONOTONIC,
        )
    };
    match (rc < 0)
        .then(|| std::io::Error::last_os_error().raw_os_error())
        .flatten()
    {
        Some(libc::ETIMEDOUT) => Woken::TimedOut,
        // A kernel before 5.16: poll `b` at 1 ms while blocking on `a`.
        Some(libc::ENOSYS) => wait(a, a_expected, Some(Duration::from_millis(1))),
        _ => Woken::Recheck,
    }
}

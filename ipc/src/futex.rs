//! Shared (inter-process, not `FUTEX_PRIVATE_FLAG`) futex calls on `u32`
//! words in a [`crate::region::SharedRegion`], and the monotonic clock the
//! deadlines use.
//!
//! A wait returns [`Woken::Recheck`] for every reason but a timeout (woken,
//! the value already differed, a signal, `EINTR`): callers loop on their own
//! condition. The other side can wake or not wake at will, so no wait may
//! be unbounded where a hostile peer could make it so: pass a timeout, or
//! have a watcher (see [`crate::watch`]) wake the word when the peer dies.

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

/// `CLOCK_MONOTONIC` in nanoseconds. Async-signal-safe.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let s = u64::try_from(ts.tv_sec).unwrap_or(0);
    let ns = u64::try_from(ts.tv_nsec).unwrap_or(0);
    s.saturating_mul(1_000_000_000).saturating_add(ns)
}

/// A relative or absolute time as a `timespec` (saturating).
fn timespec(ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: libc::time_t::try_from(ns / 1_000_000_000).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::try_from(ns % 1_000_000_000).unwrap_or(0),
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Sleeps while `word == expected`, at most `timeout` (`None`: until
/// woken).
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> Woken {
    let ts = timeout.map(|t| timespec(duration_ns(t)));
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, aligned u32 for the call; `ts_ptr` is null
    // or a timespec on this stack. FUTEX_WAIT without the private flag keys
    // on the shared page, so it works across processes.
    let rc = unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, expected, ts_ptr, 0, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ETIMEDOUT) {
        Woken::TimedOut
    } else {
        Woken::Recheck
    }
}

/// Wakes at most `n` waiters on `word`; returns how many were woken.
pub fn wake(word: &AtomicU32, n: u32) -> usize {
    let n = i32::try_from(n).unwrap_or(i32::MAX);
    // SAFETY: FUTEX_WAKE only uses the address as a key; `word` is live.
    let rc = unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, n, 0, 0, 0) };
    usize::try_from(rc).unwrap_or(0)
}

/// Wakes every waiter on `word`.
pub fn wake_all(word: &AtomicU32) -> usize {
    wake(word, u32::MAX)
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

/// The most words [`wait_any`] takes (the kernel's `FUTEX_WAITV_MAX`).
pub const WAIT_ANY_MAX: usize = 128;

/// Sleeps while every `(word, expected)` pair holds, until the absolute
/// `CLOCK_MONOTONIC` deadline `deadline_ns` (`None`: until woken)
/// (`futex_waitv`, Linux 5.16). On an older kernel it sleeps on the first
/// word only, in slices of 1 ms, so that changes of the others are seen
/// within that. More than [`WAIT_ANY_MAX`] words: returns `Recheck` at once.
pub fn wait_any(words: &[(&AtomicU32, u32)], deadline_ns: Option<u64>) -> Woken {
    if words.is_empty() || words.len() > WAIT_ANY_MAX {
        return Woken::Recheck;
    }
    let addr = |w: &AtomicU32| u64::try_from(w.as_ptr().addr()).unwrap_or(0);
    let waiters: Vec<FutexWaitv> = words
        .iter()
        .map(|&(w, v)| FutexWaitv {
            val: u64::from(v),
            uaddr: addr(w),
            flags: FUTEX2_SIZE_U32,
            reserved: 0,
        })
        .collect();
    let deadline = deadline_ns.map(timespec);
    let deadline_ptr = deadline
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    let count = u32::try_from(waiters.len()).unwrap_or(0);
    // SAFETY: `waiters` is a valid array of `count` futex_waitv for live,
    // aligned u32 words (shared: no FUTEX2_PRIVATE); `deadline_ptr` null or
    // a timespec on this stack.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            waiters.as_ptr(),
            count,
            0u32,
            deadline_ptr,
            libc::CLOCK_MONOTONIC,
        )
    };
    match (rc < 0)
        .then(|| std::io::Error::last_os_error().raw_os_error())
        .flatten()
    {
        Some(libc::ETIMEDOUT) => Woken::TimedOut,
        Some(libc::ENOSYS) => {
            let (first, expected) = words[0];
            let slice = Duration::from_millis(1);
            let left = deadline_ns.map(|d| Duration::from_nanos(d.saturating_sub(now_ns())));
            match wait(first, expected, Some(left.map_or(slice, |l| l.min(slice)))) {
                Woken::TimedOut if deadline_ns.is_some_and(|d| now_ns() >= d) => Woken::TimedOut,
                _ => Woken::Recheck,
            }
        }
        _ => Woken::Recheck,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    #[test]
    fn a_differing_value_returns_at_once() {
        let w = AtomicU32::new(1);
        assert_eq!(wait(&w, 0, None), Woken::Recheck);
        assert_eq!(wait_any(&[(&w, 0)], None), Woken::Recheck);
    }

    #[test]
    fn timeouts() {
        let w = AtomicU32::new(0);
        let t = Instant::now();
        assert_eq!(wait(&w, 0, Some(Duration::from_millis(5))), Woken::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(5));
        let b = AtomicU32::new(7);
        let deadline = now_ns() + 5_000_000;
        assert_eq!(wait_any(&[(&w, 0), (&b, 7)], Some(deadline)), Woken::TimedOut);
        assert!(now_ns() >= deadline);
        assert_eq!(wake(&w, 1), 0);
    }

    #[test]
    fn wake_reaches_a_waiter_on_either_word() {
        let (a, b) = (AtomicU32::new(0), AtomicU32::new(0));
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                while b.load(Ordering::SeqCst) == 0 {
                    wait_any(&[(&a, 0), (&b, 0)], None);
                }
            });
            std::thread::sleep(Duration::from_millis(20));
            b.store(1, Ordering::SeqCst);
            wake_all(&b);
            waiter.join().unwrap();
        });
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                while a.load(Ordering::SeqCst) == 0 {
                    wait(&a, 0, None);
                }
            });
            std::thread::sleep(Duration::from_millis(20));
            a.store(1, Ordering::SeqCst);
            wake(&a, 1);
            waiter.join().unwrap();
        });
    }

    #[test]
    fn too_many_words_is_a_recheck() {
        let w = AtomicU32::new(0);
        let words = vec![(&w, 0); WAIT_ANY_MAX + 1];
        assert_eq!(wait_any(&words, None), Woken::Recheck);
        assert_eq!(wait_any(&[], None), Woken::Recheck);
    }
}

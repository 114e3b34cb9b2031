//! A death watcher: one thread polling many pidfds, calling each one's
//! callback once when its process exits. It lets a parent that parks
//! callers on futexes in a region shared with a child wake them when the
//! child dies (the callback writes a "dead" word in the region and wakes
//! it; callers wait on it and their own word with
//! [`crate::futex::wait_any`]), without a thread per child and without
//! polling.
//!
//! ```text
//!  watch(pidfd, f) ─┐                    ┌─ poll([bell, pidfd...], ∞)
//!                   ├─> entries + bell ──┤   readable pidfd: remove, f()
//!  unwatch(id) ─────┘                    └─ bell: re-read the entries
//! ```

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

/// Names one watch, to cancel it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WatchId(u64);

type Callback = Box<dyn FnOnce() + Send>;

struct Entry {
    pidfd: Arc<OwnedFd>,
    on_death: Callback,
}

#[derive(Default)]
struct Entries {
    next: u64,
    map: BTreeMap<u64, Entry>,
}

struct Shared {
    entries: Mutex<Entries>,
    /// eventfd: rung when the entries change or the watcher stops.
    bell: OwnedFd,
    stop: AtomicBool,
}

impl Shared {
    fn entries(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ring(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a local buffer to our eventfd.
        unsafe { libc::write(self.bell.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    fn drain_bell(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes into a local buffer from our non-blocking
        // eventfd.
        unsafe { libc::read(self.bell.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
}

/// The watcher thread and its entries. Dropping it stops the thread;
/// callbacks not yet called are dropped uncalled.
pub struct DeathWatch {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DeathWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeathWatch").field("watched", &self.len()).finish()
    }
}

impl DeathWatch {
    /// Starts the watcher thread (named `name`).
    pub fn new(name: &str) -> io::Result<Self> {
        // SAFETY: eventfd with valid flags; the fd returned is owned below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nothing else owns.
        let bell = unsafe { OwnedFd::from_raw_fd(raw) };
        let shared = Arc::new(Shared {
            entries: Mutex::new(Entries::default()),
            bell,
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(&s))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Calls `on_death` once, on the watcher thread, when the process
    /// behind `pidfd` exits (at once if it has). The pidfd is duplicated.
    /// `on_death` must not block for long: it delays every other death.
    pub fn watch(&self, pidfd: BorrowedFd<'_>, on_death: impl FnOnce() + Send + 'static) -> io::Result<WatchId> {
        let pidfd = Arc::new(pidfd.try_clone_to_owned()?);
        let id = {
            let mut e = self.shared.entries();
            let id = e.next;
            e.next += 1;
            e.map.insert(
                id,
                Entry {
                    pidfd,
                    on_death: Box::new(on_death),
                },
            );
            id
        };
        self.shared.ring();
        Ok(WatchId(id))
    }

    /// Cancels a watch; true if its callback had not been called (and now
    /// never will be).
    pub fn unwatch(&self, id: WatchId) -> bool {
        let removed = self.shared.entries().map.remove(&id.0).is_some();
        if removed {
            self.shared.ring();
        }
        removed
    }

    /// Watches not yet fired or cancelled.
    pub fn len(&self) -> usize {
        self.shared.entries().map.len()
    }

    /// Whether nothing is watched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for DeathWatch {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.ring();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared) {
    let mut polled: Vec<(u64, Arc<OwnedFd>)> = Vec::new();
    let mut pollfds: Vec<libc::pollfd> = Vec::new();
    let pollfd = |fd: BorrowedFd<'_>| libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !shared.stop.load(Ordering::SeqCst) {
        // The poll set holds its own references to the pidfds, so an
        // unwatch during the poll cannot close (and recycle) one polled.
        polled.clear();
        polled.extend(shared.entries().map.iter().map(|(&id, e)| (id, Arc::clone(&e.pidfd))));
        pollfds.clear();
        pollfds.push(pollfd(shared.bell.as_fd()));
        pollfds.extend(polled.iter().map(|(_, fd)| pollfd(fd.as_fd())));
        let n = libc::nfds_t::try_from(pollfds.len()).unwrap_or(libc::nfds_t::MAX);
        // SAFETY: `pollfds` is a valid array of `n` pollfds whose fds stay
        // open during the call (the bell is ours, the pidfds held above).
        let rc = unsafe { libc::poll(pollfds.as_mut_ptr(), n, -1) };
        if rc < 0 {
            // EINTR, or ENOMEM: try again (a transient failure).
            continue;
        }
        if pollfds.first().is_some_and(|p| p.revents != 0) {
            shared.drain_bell();
        }
        let dead: Vec<u64> = pollfds
            .iter()
            .skip(1)
            .zip(&polled)
            .filter(|(p, _)| p.revents != 0)
            .map(|(_, (id, _))| *id)
            .collect();
        for id in dead {
            // Removed under the lock, called outside it: at most once, and
            // the callback may watch or unwatch.
            let entry = shared.entries().map.remove(&id);
            if let Some(e) = entry {
                let f = e.on_death;
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                    eprintln!("microfaas ipc: a death callback panicked");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spawn::Child;
    use std::ffi::OsStr;
    use std::path::Path;
    use std::sync::mpsc;
    use std::time::Duration;

    fn sleeper() -> Child {
        Child::spawn(Path::new("/bin/sleep"), &[OsStr::new("30")], &[], &[]).unwrap()
    }

    #[test]
    fn a_death_calls_back_once_and_a_cancelled_watch_never() {
        let w = DeathWatch::new("ipc-watch-test").unwrap();
        let (tx, rx) = mpsc::channel();
        let mut a = sleeper();
        let mut b = sleeper();
        let ta = tx.clone();
        w.watch(a.pidfd(), move || ta.send("a").unwrap()).unwrap();
        let tb = tx.clone();
        let id_b = w.watch(b.pidfd(), move || tb.send("b").unwrap()).unwrap();
        assert_eq!(w.len(), 2);
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
        assert!(w.unwatch(id_b));
        assert!(!w.unwatch(id_b));
        b.kill_and_reap().unwrap();
        a.signal(libc::SIGKILL).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok("a"));
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        assert!(w.is_empty());
        a.reap().unwrap();
    }

    #[test]
    fn an_already_dead_process_calls_back_at_once() {
        let w = DeathWatch::new("ipc-watch-test").unwrap();
        let mut c = Child::spawn(Path::new("/bin/true"), &[], &[], &[]).unwrap();
        while c.is_alive() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let (tx, rx) = mpsc::channel();
        w.watch(c.pidfd(), move || tx.send(()).unwrap()).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(()));
        assert_eq!(c.reap().unwrap().code(), Some(0));
    }

    #[test]
    fn a_panicking_callback_does_not_stop_the_watcher() {
        let w = DeathWatch::new("ipc-watch-test").unwrap();
        let mut a = sleeper();
        w.watch(a.pidfd(), || panic!("callback")).unwrap();
        a.kill_and_reap().unwrap();
        let mut b = sleeper();
        let (tx, rx) = mpsc::channel();
        w.watch(b.pidfd(), move || tx.send(()).unwrap()).unwrap();
        b.kill_and_reap().unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(()));
    }
}

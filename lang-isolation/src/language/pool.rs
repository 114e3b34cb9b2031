//! The dispatcher's side of each worker: spawning it (by exec, with its
//! shared region at fd 3 and a fresh catalog socket at fd 4), delivering
//! artifacts, submitting requests, collecting replies, and recovering when
//! it dies (fail the in-flight request exactly once, keep the queued ones,
//! respawn with the resident functions).

use super::catalog::{self, CatalogEntry};
use super::protocol::{Reply, Request, WorkerArgs};
use super::shm::{Layout, Region, futex_wait, futex_wake_all, now_ns};
use crate::runtime::FunctionCode;
use crate::runtime::fds::{SHM_FD, WORKER_SOCKET_FD};
use ipc::spawn::Child;
use nix::sys::socket::{AddressFamily, Shutdown, SockFlag, SockType, setsockopt, shutdown, socketpair, sockopt};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// How long a caller sleeps on the reply futex before re-checking (bounds
/// the delay when another thread drained its reply, or the worker died).
const WAIT_SLICE_NS: u64 = 200_000;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How a slot's request ended, as the dispatcher sees it.
#[derive(Debug, Clone)]
pub(crate) enum SlotResult {
    /// The worker answered.
    Reply(Reply),
    /// The worker died with the request in flight.
    Lost(String),
}

/// `SlotCell::state`: no result yet.
const PENDING: u8 = 0;
/// `SlotCell::state`: a reply is in `reply`.
const REPLIED: u8 = 1;
/// `SlotCell::state`: the request was lost; the detail is in `lost`.
const LOST: u8 = 2;

/// Host-side completion cell of one slot, without a lock: a completer
/// claims the cell by swapping `expected` from the request's `seq` to 0
/// (so a slot is answered at most once per request), writes the reply's
/// words and then publishes `state` (release); the slot's owner reads them
/// after seeing `state` (acquire). The owner submits on a slot again only
/// after `wait` returned (the dispatcher releases a slot after waiting).
#[derive(Debug, Default)]
struct SlotCell {
    /// `seq` of the request this slot waits for; 0 once answered.
    expected: AtomicU64,
    state: AtomicU8,
    /// The reply's words ([`reply_words`]).
    reply: [AtomicU64; REPLY_WORDS],
    /// Why the request was lost (the failure path only).
    lost: Mutex<Option<String>>,
}

const REPLY_WORDS: usize = 7;

fn reply_words(r: &Reply) -> [u64; REPLY_WORDS] {
    [
        r.seq,
        r.out_len,
        r.start_ns,
        r.entered_ns,
        r.returned_ns,
        r.detail,
        u64::from(r.slot) | (u64::from(r.outcome) << 32),
    ]
}

fn reply_of(w: [u64; REPLY_WORDS]) -> Reply {
    Reply {
        seq: w[0],
        out_len: w[1],
        start_ns: w[2],
        entered_ns: w[3],
        returned_ns: w[4],
        detail: w[5],
        // The low and high halves of the packed word (lossless).
        slot: (w[6] & 0xffff_ffff) as u32,
        outcome: (w[6] >> 32) as u32,
    }
}

/// One worker process and its shared region.
#[derive(Debug)]
pub(crate) struct WorkerHandle {
    pub index: usize,
    pub region: Region,
    producer: Mutex<()>,
    reply_consumer: Mutex<()>,
    /// Free slots, one bit each (set = free): taken and given back with
    /// one atomic operation, no lock on the request path.
    free_slots: Vec<AtomicU64>,
    slots: Vec<SlotCell>,
    /// Requests submitted and not yet collected.
    pub outstanding: AtomicUsize,
    /// The child; taken while it is being replaced.
    pub child: Mutex<Option<Child>>,
    /// Our end of the current worker's catalog socket (write only).
    socket: Mutex<Option<OwnedFd>>,
    /// Its pid (0 while none).
    pub pid: AtomicU32,
    /// Serving (false while respawning, or for good after a failed respawn).
    pub alive: AtomicBool,
    /// Whether this worker could not be respawned.
    pub gone: AtomicBool,
}

impl WorkerHandle {
    /// Worker `index` of its tenant, with a fresh shared region named
    /// `name` (the memfd's name, for debugging).
    pub fn new(index: usize, name: &str, layout: Layout) -> std::io::Result<Self> {
        let region = Region::create(name, layout)?;
        let depth = layout.depth;
        Ok(Self {
            index,
            region,
            producer: Mutex::new(()),
            reply_consumer: Mutex::new(()),
            free_slots: free_bits(depth),
            slots: (0..depth).map(|_| SlotCell::default()).collect(),
            outstanding: AtomicUsize::new(0),
            child: Mutex::new(None),
            socket: Mutex::new(None),
            pid: AtomicU32::new(0),
            alive: AtomicBool::new(false),
            gone: AtomicBool::new(false),
        })
    }

    /// Takes a free slot (the lowest), if any.
    pub fn try_acquire(&self) -> Option<u32> {
        for (w, word) in self.free_slots.iter().enumerate() {
            let mut bits = word.load(Ordering::Relaxed);
            while bits != 0 {
                let bit = bits.trailing_zeros();
                match word.compare_exchange_weak(bits, bits & !(1u64 << bit), Ordering::Acquire, Ordering::Relaxed) {
                    Ok(_) => return u32::try_from(w).ok()?.checked_mul(64)?.checked_add(bit),
                    Err(now) => bits = now,
                }
            }
        }
        None
    }

    /// Returns a slot whose result was collected.
    pub fn release(&self, slot: u32) {
        let (word, bit) = (slot_index(slot) / 64, slot % 64);
        if let Some(word) = self.free_slots.get(word) {
            word.fetch_or(1u64 << bit, Ordering::Release);
        }
    }

    /// Submits `request` (its slot acquired, its input written).
    pub fn submit(&self, request: Request) {
        if let Some(cell) = self.slots.get(slot_index(request.slot)) {
            // The previous request's result was taken by `wait`; the
            // ring's release publishes `expected` to the completers.
            cell.state.store(PENDING, Ordering::Relaxed);
            cell.expected.store(request.seq, Ordering::Release);
        }
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        {
            let _p = lock(&self.producer);
            let ring = self.region.requests();
            let mut r = request;
            // Never full for long: there are exactly `depth` slots.
            while let Err(back) = ring.try_push(r) {
                r = back;
                std::thread::yield_now();
            }
        }
        fence(Ordering::SeqCst);
        if self.region.header().worker.parked.load(Ordering::SeqCst) != 0 {
            futex_wake_all(self.region.requests().tail_word());
        }
    }

    /// Moves every published reply to its slot's cell. Non-blocking unless
    /// `block` (used by recovery, which must see every reply).
    pub fn drain(&self, block: bool) {
        let guard = if block {
            Some(lock(&self.reply_consumer))
        } else {
            self.reply_consumer.try_lock().ok()
        };
        if guard.is_none() {
            return;
        }
        while let Some(reply) = self.region.replies().pop() {
            self.complete(reply.slot, reply.seq, SlotResult::Reply(reply));
        }
    }

    /// Records `result` for `slot` if it is still waiting for `seq`; a
    /// duplicate or stale completion is dropped (never answered twice).
    pub fn complete(&self, slot: u32, seq: u64, result: SlotResult) -> bool {
        let Some(cell) = self.slots.get(slot_index(slot)) else {
            return false;
        };
        if seq == 0
            || cell
                .expected
                .compare_exchange(seq, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        // Claimed: this thread alone writes the cell until `state` is set.
        let state = match result {
            SlotResult::Reply(reply) => {
                for (word, v) in cell.reply.iter().zip(reply_words(&reply)) {
                    word.store(v, Ordering::Relaxed);
                }
                REPLIED
            }
            SlotResult::Lost(detail) => {
                *lock(&cell.lost) = Some(detail);
                LOST
            }
        };
        cell.state.store(state, Ordering::Release);
        true
    }

    /// Waits for `slot`'s result: spins for `spin`, then sleeps on the reply
    /// ring's futex in short slices.
    pub fn wait(&self, slot: u32, spin: Duration) -> SlotResult {
        let idx = slot_index(slot);
        let Some(cell) = self.slots.get(idx) else {
            return SlotResult::Lost("bad slot".into());
        };
        let spin_ns = u64::try_from(spin.as_nanos()).unwrap_or(u64::MAX);
        // Read at the first clock check (after 32 polls), not before the
        // first poll: a short request is answered without a clock read.
        let mut start: Option<u64> = None;
        let header = self.region.header();
        let tail = self.region.replies().tail_word();
        let mut polls: u32 = 0;
        loop {
            let state = cell.state.load(Ordering::Acquire);
            if state != PENDING {
                self.outstanding.fetch_sub(1, Ordering::SeqCst);
                return if state == REPLIED {
                    SlotResult::Reply(reply_of(std::array::from_fn(|i| cell.reply[i].load(Ordering::Relaxed))))
                } else {
                    SlotResult::Lost(lock(&cell.lost).take().unwrap_or_else(|| "result vanished".into()))
                };
            }
            self.drain(false);
            if cell.state.load(Ordering::Acquire) != PENDING {
                continue;
            }
            polls = polls.wrapping_add(1);
            if !polls.is_multiple_of(32) || now_ns().saturating_sub(*start.get_or_insert_with(now_ns)) < spin_ns {
                std::hint::spin_loop();
                continue;
            }
            header.reply_waiters.fetch_add(1, Ordering::SeqCst);
            let seen = tail.load(Ordering::SeqCst);
            self.drain(false);
            if cell.state.load(Ordering::Acquire) == PENDING {
                futex_wait(tail, seen, WAIT_SLICE_NS);
            }
            header.reply_waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Sends `entry` and its artifact memfd (and module memfd, if any) to
    /// the worker (before a `LOAD` request for it). Blocks at most the
    /// socket's send timeout.
    pub fn deliver(&self, entry: &CatalogEntry, code: &FunctionCode) -> std::io::Result<()> {
        let socket = lock(&self.socket);
        let socket = socket
            .as_ref()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotConnected, "worker not running"))?;
        send_code(socket.as_fd(), entry, code)
    }

    /// Starts a worker process for this region, sends it `catalog` (each
    /// entry with its code's memfds) and waits (up to `ready_timeout`)
    /// until it serves.
    pub fn spawn(
        &self,
        bin: &std::path::Path,
        args: &WorkerArgs,
        catalog: &[(CatalogEntry, FunctionCode)],
        ready_timeout: Duration,
    ) -> std::io::Result<()> {
        let header = self.region.header();
        header.worker.ready.store(0, Ordering::SeqCst);
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        // The worker never speaks on it; a send stalls at most this long.
        shutdown(ours.as_raw_fd(), Shutdown::Read)?;
        let timeout = nix::sys::time::TimeVal::new(
            libc::time_t::try_from(ready_timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            libc::suseconds_t::from(ready_timeout.subsec_micros()),
        );
        setsockopt(&ours, sockopt::SendTimeout, &timeout)?;
        let shm = self
            .region
            .fd()
            .ok_or_else(|| std::io::Error::other("the shared region has no fd"))?;
        // No rseq area for the worker: before Linux 6.15 the kernel's rseq
        // update, after the worker was scheduled, runs with the function's
        // PKRU and kills it (see `runtime::pkeys`); its sandbox refuses the
        // unregistering system call, so glibc must not register at all.
        let tunables = match std::env::var("GLIBC_TUNABLES") {
            Ok(t) if !t.is_empty() => format!("{t}:glibc.pthread.rseq=0"),
            _ => "glibc.pthread.rseq=0".to_owned(),
        };
        let argv: Vec<OsString> = args.to_args().into_iter().map(OsString::from).collect();
        let argv: Vec<&OsStr> = argv.iter().map(OsString::as_os_str).collect();
        let child = Child::spawn(
            bin,
            &argv,
            &[(OsStr::new("GLIBC_TUNABLES"), OsStr::new(&tunables))],
            &[(shm, SHM_FD), (theirs.as_fd(), WORKER_SOCKET_FD)],
        )?;
        // A worker holds one fd per artifact: allow as many as the hard
        // limit does (set from here, before any artifact is sent, so the
        // worker makes no system call for it).
        if let Err(e) = child.raise_nofile(None) {
            eprintln!(
                "microfaas language: raising worker {}'s open-file limit: {e}",
                self.index
            );
        }
        drop(theirs);
        let pid = u32::try_from(child.pid()).unwrap_or(0);
        // Published before the worker can serve anything, so that anyone who
        // saw it answer also sees its pid.
        self.pid.store(pid, Ordering::SeqCst);
        *lock(&self.child) = Some(child);
        {
            let mut socket = lock(&self.socket);
            // A worker that dies while reading is noticed below.
            let sent = catalog
                .iter()
                .try_for_each(|(entry, code)| send_code(ours.as_fd(), entry, code))
                .and_then(|()| catalog::send_end(ours.as_fd()));
            if let Err(e) = sent {
                eprintln!("microfaas language: sending worker {} its catalog: {e}", self.index);
            }
            *socket = Some(ours);
        }
        let deadline = std::time::Instant::now() + ready_timeout;
        let failed = loop {
            if header.worker.ready.load(Ordering::Acquire) == 1 {
                break None;
            }
            if let Some(status) = self.reap() {
                break Some(std::io::Error::other(format!(
                    "worker exited during start-up: {status}"
                )));
            }
            if std::time::Instant::now() > deadline {
                self.stop();
                break Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "worker did not become ready",
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        if let Some(e) = failed {
            return Err(e);
        }
        self.alive.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Sends `signal` to the worker (if it has a process).
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.pid.load(Ordering::SeqCst);
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return;
        };
        if pid > 0 {
            // SAFETY: kill has no memory preconditions; the pid is our own
            // child, not yet reaped (only `reap` does that), so it cannot
            // have been reused.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// If the worker has exited, reaps it and returns how.
    pub fn reap(&self) -> Option<String> {
        let mut guard = lock(&self.child);
        let child = guard.as_mut()?;
        match child.try_reap() {
            Ok(Some(status)) => {
                *guard = None;
                self.pid.store(0, Ordering::SeqCst);
                Some(status.to_string())
            }
            Ok(None) => None,
            Err(e) => Some(format!("cannot wait for worker: {e}")),
        }
    }

    /// After the worker died: collects its published replies, fails its
    /// in-flight request with `detail` and takes it off the ring. Returns the
    /// function index of that request, if there was one.
    pub fn recover(&self, detail: &str) -> Option<u32> {
        self.alive.store(false, Ordering::SeqCst);
        self.drain(true);
        let header = self.region.header();
        let seq = header.inflight.seq.load(Ordering::Acquire);
        let mut culprit = None;
        if seq != 0 {
            let slot = header.inflight.slot.load(Ordering::Acquire);
            let func = header.inflight.func.load(Ordering::Acquire);
            // The worker may have died between recording and removing it.
            if let Some((pos, req)) = self.region.requests().peek()
                && req.seq == seq
            {
                self.region.requests().advance(pos);
            }
            if self.complete(slot, seq, SlotResult::Lost(detail.to_owned())) {
                culprit = Some(func);
            }
        }
        header.inflight.seq.store(0, Ordering::SeqCst);
        header.inflight.deadline_ns.store(0, Ordering::SeqCst);
        header.worker.parked.store(0, Ordering::SeqCst);
        culprit
    }

    /// After a failed respawn: fails every request still queued.
    pub fn fail_all(&self, detail: &str) {
        self.gone.store(true, Ordering::SeqCst);
        while let Some(req) = self.region.requests().pop() {
            self.complete(req.slot, req.seq, SlotResult::Lost(detail.to_owned()));
        }
    }

    /// Kills and reaps the worker (shutdown).
    pub fn stop(&self) {
        self.alive.store(false, Ordering::SeqCst);
        lock(&self.socket).take();
        if let Some(mut child) = lock(&self.child).take() {
            let _ = child.kill_and_reap();
        }
        self.pid.store(0, Ordering::SeqCst);
    }
}

/// `depth` free slots as bits (set = free), 64 to a word.
fn free_bits(depth: u32) -> Vec<AtomicU64> {
    (0..depth.div_ceil(64))
        .map(|w| {
            let left = depth.saturating_sub(w * 64);
            AtomicU64::new(if left >= 64 { u64::MAX } else { (1u64 << left) - 1 })
        })
        .collect()
}

fn slot_index(slot: u32) -> usize {
    usize::try_from(slot).unwrap_or(usize::MAX)
}

/// Resident set of process `pid` in bytes, from `/proc/<pid>/statm`.
pub fn rss_of(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    pages.checked_mul(4096)
}

/// Sends `entry` with `code`'s memfds on `socket`.
fn send_code(socket: BorrowedFd<'_>, entry: &CatalogEntry, code: &FunctionCode) -> std::io::Result<()> {
    catalog::send_entry(socket, entry, code.artifact().as_fd(), code.module().map(|m| m.as_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn handle() -> WorkerHandle {
        WorkerHandle::new(0, "test", Layout::new(4, 4096, 4096).unwrap()).unwrap()
    }

    fn request(seq: u64, slot: u32) -> Request {
        Request {
            seq,
            slot,
            func: 9,
            ..Request::default()
        }
    }

    #[test]
    fn a_result_is_delivered_once_and_only_for_its_request() {
        let w = handle();
        let slot = w.try_acquire().unwrap();
        w.submit(request(5, slot));
        assert!(!w.complete(slot, 4, SlotResult::Lost("stale".into())), "wrong seq");
        assert!(!w.complete(99, 5, SlotResult::Lost("bad slot".into())));
        assert!(w.complete(slot, 5, SlotResult::Lost("first".into())));
        assert!(
            !w.complete(slot, 5, SlotResult::Lost("second".into())),
            "answered twice"
        );
        match w.wait(slot, Duration::ZERO) {
            SlotResult::Lost(d) => assert_eq!(d, "first"),
            SlotResult::Reply(_) => panic!("expected the first result"),
        }
        assert_eq!(w.outstanding.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_reply_reaches_its_waiter_whole_and_a_slot_is_reused_cleanly() {
        let w = handle();
        let slot = w.try_acquire().unwrap();
        for seq in [1u64, 2, u64::MAX - 1] {
            w.submit(request(seq, slot));
            let reply = Reply {
                seq,
                out_len: 3,
                start_ns: 11,
                entered_ns: u64::MAX,
                returned_ns: 1 << 40,
                detail: 7,
                slot,
                outcome: u32::MAX,
            };
            assert!(!w.complete(slot, 0, SlotResult::Reply(reply)), "seq 0 never matches");
            assert!(w.complete(slot, seq, SlotResult::Reply(reply)));
            match w.wait(slot, Duration::ZERO) {
                SlotResult::Reply(got) => assert_eq!(got, reply),
                SlotResult::Lost(d) => panic!("lost: {d}"),
            }
            // A late duplicate after the wait is dropped too.
            assert!(!w.complete(slot, seq, SlotResult::Lost("late".into())));
        }
        w.release(slot);
    }

    #[test]
    fn recovery_fails_the_in_flight_request_and_keeps_the_queue() {
        let w = handle();
        let (a, b) = (w.try_acquire().unwrap(), w.try_acquire().unwrap());
        w.submit(request(1, a));
        w.submit(request(2, b));
        // A worker recorded request 1 as in flight, then died before taking
        // it off the ring.
        let inflight = &w.region.header().inflight;
        inflight.slot.store(a, Ordering::SeqCst);
        inflight.func.store(9, Ordering::SeqCst);
        inflight.seq.store(1, Ordering::SeqCst);
        assert_eq!(w.recover("died"), Some(9));
        assert!(matches!(w.wait(a, Duration::ZERO), SlotResult::Lost(_)));
        // Request 2 waits in the ring for the replacement; 1 is gone from it.
        assert_eq!(w.region.requests().peek().map(|(_, r)| r.seq), Some(2));
        assert_eq!(inflight.seq.load(Ordering::SeqCst), 0);
        // A second recovery finds nothing in flight.
        assert_eq!(w.recover("again"), None);
        // A reply the worker published before dying is delivered, not lost.
        w.region
            .replies()
            .try_push(Reply {
                seq: 2,
                slot: b,
                outcome: 1,
                ..Reply::default()
            })
            .unwrap();
        assert_eq!(w.recover("died"), None);
        assert!(matches!(w.wait(b, Duration::ZERO), SlotResult::Reply(r) if r.seq == 2));
    }

    #[test]
    fn every_slot_is_handed_out_once_until_released() {
        for depth in [1u32, 4, 64, 128, 256] {
            let w = WorkerHandle::new(0, "test", Layout::new(depth, 4096, 4096).unwrap()).unwrap();
            let mut got: Vec<u32> = std::iter::from_fn(|| w.try_acquire()).collect();
            assert_eq!(got.len(), usize::try_from(depth).unwrap(), "depth {depth}");
            got.sort_unstable();
            assert_eq!(got, (0..depth).collect::<Vec<_>>());
            assert_eq!(w.try_acquire(), None);
            w.release(depth - 1);
            assert_eq!(w.try_acquire(), Some(depth - 1));
            w.release(0);
            w.release(0);
            assert_eq!(w.try_acquire(), Some(0));
            assert_eq!(w.try_acquire(), None, "a double release gives the slot out once");
            // A slot number past the depth is ignored.
            w.release(depth + 64);
            assert_eq!(w.try_acquire(), None);
        }
    }

    #[test]
    fn a_failed_respawn_fails_every_queued_request() {
        let w = handle();
        let slots: Vec<u32> = (0..3).map(|_| w.try_acquire().unwrap()).collect();
        for (i, &s) in slots.iter().enumerate() {
            w.submit(request(10 + i as u64, s));
        }
        w.fail_all("gone");
        for &s in &slots {
            assert!(matches!(w.wait(s, Duration::ZERO), SlotResult::Lost(_)));
        }
        assert!(w.gone.load(Ordering::SeqCst));
    }
}

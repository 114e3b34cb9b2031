//! The host's handle on one runner process: spawning it, posting a request,
//! waiting for its reply or its death, killing and reaping it.

use super::ProcessError;
use super::protocol::{Layout, RawReply, Reply, decode_reply, robust, state};
use super::shm::SharedRegion;
use super::spawn::{RunnerMode, spawn_runner};
use crate::runtime::{FunctionCode, monotonic_ns};
use ipc::futex::{self, Woken};
use ipc::spawn::Child;
use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

/// Live runner pids, and a thread that reaps runners nobody waits for.
#[derive(Debug)]
pub(crate) struct Tracker {
    live: Mutex<BTreeSet<libc::pid_t>>,
    reaper: Mutex<Option<mpsc::Sender<Child>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Tracker {
    pub fn new() -> std::io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel::<Child>();
        let tracker = Arc::new(Self {
            live: Mutex::new(BTreeSet::new()),
            reaper: Mutex::new(Some(tx)),
            thread: Mutex::new(None),
        });
        let weak = Arc::downgrade(&tracker);
        let thread = std::thread::Builder::new()
            .name("microfaas-reaper".to_owned())
            .spawn(move || {
                for mut child in rx {
                    let pid = child.pid();
                    let _ = child.reap();
                    if let Some(t) = weak.upgrade() {
                        t.forget(pid);
                    }
                }
            })?;
        *lock(&tracker.thread) = Some(thread);
        Ok(tracker)
    }

    fn add(&self, pid: libc::pid_t) {
        lock(&self.live).insert(pid);
    }

    fn forget(&self, pid: libc::pid_t) {
        lock(&self.live).remove(&pid);
    }

    /// Reaps `child` in the background (or now, if the reaper is gone).
    fn reap_later(&self, child: Child) {
        let pid = child.pid();
        let unsent = match lock(&self.reaper).as_ref() {
            Some(tx) => tx.send(child).err().map(|e| e.0),
            None => Some(child),
        };
        if let Some(mut child) = unsent {
            let _ = child.reap();
            self.forget(pid);
        }
    }

    /// Live runner pids.
    pub fn live(&self) -> Vec<libc::pid_t> {
        lock(&self.live).iter().copied().collect()
    }

    /// Stops the reaper after it has reaped everything queued.
    pub fn shutdown(&self) {
        lock(&self.reaper).take();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

/// Locks a mutex, ignoring poisoning (the protected data stay consistent:
/// every critical section is panic-free).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A runner's exit status in words.
fn describe_status(status: Option<ExitStatus>) -> String {
    ipc::spawn::describe_status("runner", status)
}

/// How waiting on a runner ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitEnd {
    /// The state reached one the caller waited for.
    Reached(u32),
    /// The runner died first.
    Died,
    /// The deadline passed.
    TimedOut,
}

/// Limits a runner is created with.
#[derive(Debug, Clone)]
pub(crate) struct RunnerLimits {
    pub layout: Layout,
    pub heap_limit_bytes: usize,
    pub stack_bytes: usize,
    /// The runner's `--sandbox` value.
    pub sandbox: String,
}

/// One runner process and its region. Dropping it kills and reaps it.
#[derive(Debug)]
pub(crate) struct Runner {
    /// The process; taken only by `drop` (to the reaper).
    child: Option<Child>,
    region: SharedRegion,
    tracker: Arc<Tracker>,
    /// How it ended, once reaped (`None` inside: it vanished).
    reaped: Option<Option<ExitStatus>>,
    sequence: u64,
    /// The slot generation it was spawned in (see `host`).
    pub generation: u64,
}

impl Runner {
    /// Spawns a runner. With `request`, the request is posted before the
    /// spawn and the runner serves only it (cold); otherwise the runner
    /// boots and waits (warm: wait for it with [`Runner::wait_ready`]).
    pub fn spawn(
        runner_bin: &Path,
        code: &FunctionCode,
        limits: &RunnerLimits,
        tracker: &Arc<Tracker>,
        request: Option<&[u8]>,
        generation: u64,
    ) -> Result<Self, ProcessError> {
        let region = SharedRegion::create(limits.layout, limits.heap_limit_bytes, limits.stack_bytes)
            .map_err(|e| ProcessError::io("creating the runner's shared region", e))?;
        let mut sequence = 0;
        let mode = match request {
            Some(input) => {
                sequence = 1;
                post_request(&region, sequence, input)?;
                RunnerMode::Once
            }
            None => RunnerMode::Warm,
        };
        let shm = region
            .fd()
            .ok_or_else(|| ProcessError::io("the runner's shared region", std::io::Error::other("no fd")))?;
        let child = spawn_runner(
            runner_bin,
            shm,
            code.artifact().as_fd(),
            code.module().map(|m| m.as_fd()),
            mode,
            &limits.sandbox,
        )
        .map_err(|e| ProcessError::io(format!("spawning {}", runner_bin.display()), e))?;
        tracker.add(child.pid());
        Ok(Self {
            child: Some(child),
            region,
            tracker: Arc::clone(tracker),
            reaped: None,
            sequence,
            generation,
        })
    }

    /// The region's header.
    pub fn header(&self) -> &super::protocol::Header {
        self.region.header()
    }

    /// Whether the runner is known to be dead.
    pub fn is_dead(&self) -> bool {
        self.reaped.is_some() || self.header().alive.load(Ordering::Acquire) & robust::FUTEX_OWNER_DIED != 0
    }

    /// Waits until the state satisfies `done`, the runner dies, or
    /// `deadline_ns` passes.
    pub fn wait_until(&mut self, done: impl Fn(u32) -> bool, deadline_ns: u64) -> WaitEnd {
        loop {
            let (s, alive) = {
                let h = self.region.header();
                (h.state.load(Ordering::Acquire), h.alive.load(Ordering::Acquire))
            };
            if done(s) {
                return WaitEnd::Reached(s);
            }
            let state_now = |r: &Self| r.region.header().state.load(Ordering::Acquire);
            if alive & robust::FUTEX_OWNER_DIED != 0 {
                let s = state_now(self);
                return if done(s) { WaitEnd::Reached(s) } else { WaitEnd::Died };
            }
            let now = monotonic_ns();
            if now >= deadline_ns {
                return WaitEnd::TimedOut;
            }
            // Until the runner has registered its death notice, poll for an
            // early exit every few milliseconds.
            let slice_end = if alive == 0 {
                if self.try_reap() {
                    let s = state_now(self);
                    return if done(s) { WaitEnd::Reached(s) } else { WaitEnd::Died };
                }
                deadline_ns.min(now.saturating_add(2_000_000))
            } else {
                deadline_ns
            };
            let h = self.region.header();
            if futex::wait_any(&[(&h.state, s), (&h.alive, alive)], Some(slice_end)) == Woken::TimedOut
                && slice_end == deadline_ns
            {
                return WaitEnd::TimedOut;
            }
        }
    }

    /// Posts the next request to a ready runner.
    pub fn post(&mut self, input: &[u8]) -> Result<(), ProcessError> {
        self.sequence += 1;
        post_request(&self.region, self.sequence, input)
    }

    /// Decodes the reply in the region (state is REPLY).
    pub fn reply(&self) -> Result<Reply, super::protocol::ProtocolError> {
        let h = self.region.header();
        let raw = RawReply {
            sequence: h.reply_sequence.load(Ordering::Relaxed),
            kind: h.reply_kind.load(Ordering::Relaxed),
            phase: h.phase.load(Ordering::Relaxed),
            len: h.reply_len.load(Ordering::Relaxed),
            value: h.reply_value.load(Ordering::Relaxed),
        };
        decode_reply(raw, self.sequence, self.region.layout().output_capacity)
    }

    /// Copies `len` bytes of the output buffer (a length `reply` checked).
    pub fn output(&self, len: usize) -> Vec<u8> {
        self.region.read_output(len).unwrap_or_default()
    }

    /// Whether the reply says the runner exits after it.
    pub fn reply_is_fatal(&self) -> bool {
        self.region.header().fatal.load(Ordering::Relaxed) != 0
    }

    fn try_reap(&mut self) -> bool {
        if self.reaped.is_some() {
            return true;
        }
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        match child.try_reap() {
            Ok(Some(status)) => {
                self.reaped = Some(Some(status));
                self.tracker.forget(child.pid());
                true
            }
            _ => false,
        }
    }

    /// Kills the runner (if alive) and reaps it; returns how it ended.
    pub fn kill_and_reap(&mut self) -> String {
        if self.reaped.is_none()
            && let Some(child) = self.child.as_mut()
        {
            self.reaped = Some(child.kill_and_reap().ok());
            self.tracker.forget(child.pid());
        }
        describe_status(self.reaped.flatten())
    }

    /// Whether the reaped runner was killed by `signal`.
    pub fn killed_by(&self, signal: libc::c_int) -> bool {
        matches!(self.reaped, Some(Some(s)) if s.signal() == Some(signal))
    }

    /// Reaps a runner that died by itself; returns how it ended.
    pub fn reap_dead(&mut self) -> String {
        if self.reaped.is_none()
            && let Some(child) = self.child.as_mut()
        {
            self.reaped = Some(child.reap().ok());
            self.tracker.forget(child.pid());
        }
        describe_status(self.reaped.flatten())
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            if self.reaped.is_none() {
                // Killed through its pidfd: it cannot hit a recycled pid.
                let _ = child.signal(libc::SIGKILL);
            }
            self.tracker.reap_later(child);
        }
    }
}

fn post_request(region: &SharedRegion, sequence: u64, input: &[u8]) -> Result<(), ProcessError> {
    region.write_input(input).map_err(|limit| ProcessError::InputTooLarge {
        len: input.len(),
        limit,
    })?;
    let h = region.header();
    h.input_len
        .store(u64::try_from(input.len()).unwrap_or(u64::MAX), Ordering::Relaxed);
    h.sequence.store(sequence, Ordering::Relaxed);
    h.state.store(state::REQUEST, Ordering::Release);
    futex::wake(&h.state, 1);
    Ok(())
}

//! The runner pool: a few threads per process run every instance's vCPU, so
//! an idle instance holds no thread (only its VM fd, its vCPU fd with its
//! `kvm_run` mapping, and its memory).
//!
//! A caller publishes a request in the mailbox and (unless the guest is
//! spinning) hands the instance a command (`Cmd`); the instance is queued
//! on its *home* runner, which runs it until a stopping exit, reports the
//! event (`vcpu::Event`) and wakes the caller. Moving a vCPU to
//! another thread makes KVM update the vCPU's task on the next `KVM_RUN`;
//! `examples/run_migration.rs` measures it: nothing measurable on this
//! host, where keeping an instance on its runner ([`Placement::Sticky`]:
//! taken over by another runner only while its own is busy with another
//! instance) was slower than [`Placement::RoundRobin`], the default.
//!
//! Where to queue and whom to wake is `choose`, a pure function.
//!
//! A process whose work arrives from elsewhere (a VMM host process's run
//! ring) can install an [`IdlePoll`] ([`set_idle_poll`]): a runner that
//! just finished a command polls it for up to its spin time before it
//! sleeps, so a hot back-to-back request is picked up with no sleep, no
//! wake and no hand-off to another thread. Only after activity: a runner
//! idle since its last spin sleeps at once, so idle processes burn nothing.

use crate::instance::Shared;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Work an idle runner polls for before it sleeps (see the module doc).
pub trait IdlePoll: Send + Sync {
    /// A runner starts polling (e.g. it tells producers a poller is awake,
    /// so they need not wake anyone).
    fn enter(&self);
    /// Takes whatever work is waiting and submits it; true if it found any.
    fn poll(&self) -> bool;
    /// The runner stops polling (and re-checks, so nothing queued while it
    /// was leaving is missed).
    fn leave(&self);
}

static IDLE: OnceLock<(Box<dyn IdlePoll>, Duration)> = OnceLock::new();

/// Installs the process's idle poll, polled for up to `spin` after each
/// command a runner finishes; false if one was installed already.
pub fn set_idle_poll(poll: Box<dyn IdlePoll>, spin: Duration) -> bool {
    !spin.is_zero() && IDLE.set((poll, spin)).is_ok()
}

/// Polls the idle poll until it finds work, work is queued on the pool
/// (another thread took it off the ring), or `until`.
fn spin_idle(poll: &dyn IdlePoll, pool: &PoolInner, until: Instant) {
    poll.enter();
    loop {
        if poll.poll() || pool.queued.load(Ordering::Acquire) > 0 || Instant::now() >= until {
            break;
        }
        // Yield between looks: a caller or runner sharing this core runs.
        std::thread::yield_now();
    }
    poll.leave();
}

/// Stack of a runner thread (it only runs the exit loop).
const RUNNER_STACK_BYTES: usize = 256 << 10;

/// How instances are placed on runners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// An instance stays on its last runner (taken over by an idle runner
    /// only while that one is busy).
    Sticky,
    /// Every command goes to the next runner in turn (for measuring the
    /// cost of moving a vCPU between threads).
    RoundRobin,
}

/// Size and policy of a process's runner pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerConfig {
    /// Runner threads.
    pub runners: usize,
    /// Placement policy.
    pub placement: Placement,
    /// Runner threads the pool may grow to: when an instance is queued and
    /// every runner is busy (a long request, a slow exit), another runner
    /// starts, so one long request does not hold up every other instance;
    /// a grown runner idle for [`GROWN_IDLE`] ends. At most `runners`
    /// stay.
    pub grow_to: usize,
}

/// How long every runner must have been running its current instance
/// before the pool grows for another: a hot request runs for tens of
/// microseconds, and a second runner taking turns with the first costs the
/// hot path (measured here: ~150 us instead of ~80 us with two runners
/// round robin). A request queued in a long one's first millisecond waits
/// for it (or for the next growth).
pub const GROW_AFTER: Duration = Duration::from_millis(1);

/// How long a runner started beyond `runners` may sit idle before it ends.
pub const GROWN_IDLE: Duration = Duration::from_secs(2);

impl Default for RunnerConfig {
    /// One runner per online CPU, plus one (a runner blocked in a slow
    /// exit or a save does not idle a CPU); round-robin placement, which
    /// measured faster than keeping an instance on its runner on this host
    /// (`examples/run_migration.rs`: hot noop p50 76 us round robin over
    /// 2 or 3 runners, 155 us always on the same runner, 78 us with a
    /// single runner): running a vCPU from another thread than the last
    /// costs nothing measurable here, while a caller and a runner that
    /// always hand off to each other end up sharing a CPU.
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Self {
            runners: cpus + 1,
            placement: Placement::RoundRobin,
            grow_to: cpus + 1,
        }
    }
}

/// Where a newly queued instance goes and which runner to wake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Choice {
    /// The queue it goes on.
    pub(crate) queue: usize,
    /// The runner to wake (None: the queue's runner is busy and no runner
    /// is idle; the queue's runner takes it when done).
    pub(crate) wake: Option<usize>,
}

/// Decides where an instance whose home is `home` is queued (`rr` is the
/// round-robin counter's value), given which runners are busy and whether
/// its home runner is busy with this very instance (finishing its last
/// command: it takes the new one next, so no other runner is woken to
/// take it over, which would only wait for the vCPU and move it).
pub(crate) fn choose(placement: Placement, home: usize, rr: usize, busy: &[bool], home_has_it: bool) -> Choice {
    let n = busy.len().max(1);
    let queue = match placement {
        Placement::Sticky => home % n,
        Placement::RoundRobin => rr % n,
    };
    let wake = if !busy.get(queue).copied().unwrap_or(true) {
        Some(queue)
    } else if home_has_it && placement == Placement::Sticky {
        None
    } else {
        // Its runner is busy: wake an idle one to take it over.
        (0..busy.len()).find(|&k| !busy[k])
    };
    Choice { queue, wake }
}

/// Which queue an idle runner `me` takes work from: its own, else the
/// first non-empty queue of a busy runner.
pub(crate) fn pick(me: usize, lens: &[usize], busy: &[bool]) -> Option<usize> {
    if lens.get(me).copied().unwrap_or(0) > 0 {
        return Some(me);
    }
    (0..lens.len()).find(|&k| k != me && lens[k] > 0 && busy.get(k).copied().unwrap_or(false))
}

#[derive(Debug, Default)]
struct State {
    queues: Vec<VecDeque<Arc<Shared>>>,
    /// Busy, or not running (a grown runner that ended): never chosen.
    busy: Vec<bool>,
    /// A thread runs this runner.
    alive: Vec<bool>,
    /// When each runner took its current instance.
    since: Vec<Option<Instant>>,
    /// The instance each runner runs (its address; 0: none).
    current: Vec<usize>,
    stop: bool,
}

/// The pool's shared part (held by its runner threads).
#[derive(Debug)]
pub(crate) struct PoolInner {
    state: Mutex<State>,
    wakers: Vec<Condvar>,
    placement: Placement,
    rr: AtomicUsize,
    next_home: AtomicUsize,
    /// Runner threads started (for statistics).
    threads: AtomicUsize,
    /// Instances on the queues (read without the lock by polling runners).
    queued: AtomicUsize,
    /// Runners that never end (the first `runners`).
    base: usize,
}

/// A process's runner pool. Instances hold it, so its threads live as long
/// as any instance (a kick is always sent to a live thread); they end when
/// the last holder drops it.
#[derive(Debug)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

/// The pool's threads could not be started.
#[derive(Debug, thiserror::Error)]
#[error("starting runner thread {index} of the vCPU pool")]
pub struct PoolError {
    /// Which runner.
    pub index: usize,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pool {
    /// Starts `config.runners` (at least one) runner threads.
    pub fn new(config: RunnerConfig) -> Result<Arc<Self>, PoolError> {
        let n = config.runners.max(1);
        let most = config.grow_to.max(n);
        let inner = Arc::new(PoolInner {
            state: Mutex::new(State {
                queues: (0..n).map(|_| VecDeque::new()).collect(),
                busy: vec![false; n],
                alive: vec![true; n],
                since: vec![None; n],
                current: vec![0; n],
                stop: false,
            }),
            wakers: (0..most).map(|_| Condvar::new()).collect(),
            placement: config.placement,
            rr: AtomicUsize::new(0),
            next_home: AtomicUsize::new(0),
            threads: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            base: n,
        });
        for index in 0..n {
            start_runner(&inner, index).map_err(|source| {
                lock(&inner.state).stop = true;
                inner.wakers.iter().for_each(Condvar::notify_all);
                PoolError { index, source }
            })?;
        }
        Ok(Arc::new(Self { inner }))
    }

    /// Runner threads in the pool.
    pub fn threads(&self) -> usize {
        self.inner.threads.load(Ordering::Relaxed)
    }

    /// A home runner for a new instance (in turn).
    pub(crate) fn assign_home(&self) -> usize {
        self.inner.next_home.fetch_add(1, Ordering::Relaxed) % self.inner.wakers.len()
    }

    /// Queues `instance` (which has a command pending and is not queued).
    pub(crate) fn submit(&self, instance: Arc<Shared>) {
        let home = instance.home.load(Ordering::Relaxed);
        let rr = self.inner.rr.fetch_add(1, Ordering::Relaxed);
        let mut st = lock(&self.inner.state);
        let n = st.busy.len().max(1);
        let home_has_it = st.current.get(home % n) == Some(&(Arc::as_ptr(&instance) as usize));
        // Placed among the first `runners` (a grown runner takes turns only
        // while they are all busy).
        let base = self.inner.base.min(st.busy.len());
        let mut choice = choose(self.inner.placement, home, rr, &st.busy[..base], home_has_it);
        let mut grown = None;
        // Every first runner busy, each for a while (a long request, not
        // one finishing): an idle grown runner takes it, else one more
        // starts, if the pool may grow.
        let now = Instant::now();
        let long = || (0..base).all(|k| st.since[k].is_some_and(|t| now.duration_since(t) >= GROW_AFTER));
        if choice.wake.is_none() && !home_has_it && long() {
            if let Some(k) = (base..st.busy.len()).find(|&k| st.alive[k] && !st.busy[k]) {
                choice = Choice {
                    queue: k,
                    wake: Some(k),
                };
            } else if let Some(k) = grow_slot(&st.alive, &st.busy, self.inner.wakers.len()) {
                if k == st.queues.len() {
                    st.queues.push(VecDeque::new());
                    st.busy.push(false);
                    st.alive.push(true);
                    st.since.push(None);
                    st.current.push(0);
                } else {
                    st.busy[k] = false;
                    st.alive[k] = true;
                }
                choice = Choice { queue: k, wake: None };
                grown = Some(k);
            }
        }
        st.queues[choice.queue].push_back(instance);
        self.inner.queued.fetch_add(1, Ordering::Release);
        if let Some(k) = grown
            && start_runner(&self.inner, k).is_err()
        {
            // No thread: its queue goes back to the busy runners (who
            // take it over when free).
            st.alive[k] = false;
            st.busy[k] = true;
        }
        drop(st);
        if let Some(k) = choice.wake {
            self.inner.wakers[k].notify_one();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        lock(&self.inner.state).stop = true;
        self.inner.wakers.iter().for_each(Condvar::notify_all);
    }
}

/// Where a grown runner goes: a slot of an ended one, or a new one if the
/// pool may grow (`most` runners at most); `None` if some runner is idle.
pub(crate) fn grow_slot(alive: &[bool], busy: &[bool], most: usize) -> Option<usize> {
    if alive.iter().zip(busy).any(|(a, b)| *a && !*b) {
        return None;
    }
    alive
        .iter()
        .position(|a| !a)
        .or((alive.len() < most).then_some(alive.len()))
}

fn start_runner(pool: &Arc<PoolInner>, index: usize) -> std::io::Result<()> {
    let p = Arc::clone(pool);
    std::thread::Builder::new()
        .name(format!("vcpu-runner-{index}"))
        .stack_size(RUNNER_STACK_BYTES)
        .spawn(move || runner(&p, index))?;
    pool.threads.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// One runner thread: takes queued instances and runs their commands.
fn runner(pool: &PoolInner, me: usize) {
    // The thread inherits its spawner's signal mask: make sure kicks arrive.
    let _ = vmm_sys_util::signal::unblock_signal(crate::kick::kick_signal());
    // SAFETY: `pthread_self` has no preconditions.
    let thread = unsafe { libc::pthread_self() };
    let mut st = lock(&pool.state);
    // When this runner last finished a command (it polls for work once
    // after each).
    let mut done: Option<Instant> = None;
    loop {
        let lens: Vec<usize> = st.queues.iter().map(VecDeque::len).collect();
        let Some(q) = pick(me, &lens, &st.busy) else {
            if st.stop {
                return;
            }
            if let (Some((poll, spin)), Some(at)) = (IDLE.get(), done.take()) {
                drop(st);
                spin_idle(poll.as_ref(), pool, at + *spin);
                st = lock(&pool.state);
                continue;
            }
            if me < pool.base {
                st = pool.wakers[me]
                    .wait(st)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            // A grown runner: ends when idle long enough.
            let (back, waited) = pool.wakers[me]
                .wait_timeout(st, GROWN_IDLE)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            st = back;
            let lens: Vec<usize> = st.queues.iter().map(VecDeque::len).collect();
            if waited.timed_out() && pick(me, &lens, &st.busy).is_none() {
                st.alive[me] = false;
                st.busy[me] = true;
                pool.threads.fetch_sub(1, Ordering::Relaxed);
                return;
            }
            continue;
        };
        let Some(instance) = st.queues[q].pop_front() else {
            continue;
        };
        pool.queued.fetch_sub(1, Ordering::Relaxed);
        st.busy[me] = true;
        st.since[me] = Some(Instant::now());
        st.current[me] = Arc::as_ptr(&instance) as usize;
        drop(st);
        instance.home.store(me, Ordering::Relaxed);
        crate::vcpu::run_commands(&instance, thread);
        drop(instance); // a killed instance may tear down here, off the caller
        done = Some(Instant::now());
        st = lock(&pool.state);
        st.busy[me] = false;
        st.since[me] = None;
        st.current[me] = 0;
    }
}

/// Whether a command is queued for the instance or it is running (the
/// instance is then on a queue or a runner, never on two).
#[derive(Debug, Default)]
pub(crate) struct Queued(AtomicBool);

impl Queued {
    /// Marks it queued; true if it was not (the caller submits it).
    pub(crate) fn set(&self) -> bool {
        !self.0.swap(true, Ordering::AcqRel)
    }
    /// Marks it not queued.
    pub(crate) fn clear(&self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticky_goes_home_and_wakes_home_when_free() {
        let c = choose(Placement::Sticky, 1, 7, &[false, false, false], false);
        assert_eq!(
            c,
            Choice {
                queue: 1,
                wake: Some(1)
            }
        );
        // home 4 of 3 runners wraps
        assert_eq!(choose(Placement::Sticky, 4, 0, &[false; 3], false).queue, 1);
    }

    #[test]
    fn a_busy_home_wakes_an_idle_runner_to_take_over() {
        let c = choose(Placement::Sticky, 0, 0, &[true, true, false], false);
        assert_eq!(
            c,
            Choice {
                queue: 0,
                wake: Some(2)
            }
        );
        let c = choose(Placement::Sticky, 0, 0, &[true, true, true], false);
        assert_eq!(c, Choice { queue: 0, wake: None });
    }

    #[test]
    fn a_home_runner_finishing_this_instance_keeps_it() {
        let c = choose(Placement::Sticky, 0, 0, &[true, false], true);
        assert_eq!(c, Choice { queue: 0, wake: None });
        // Round robin moves it whatever.
        let c = choose(Placement::RoundRobin, 0, 0, &[true, false], true);
        assert_eq!(c.wake, Some(1));
    }

    #[test]
    fn round_robin_ignores_home() {
        assert_eq!(choose(Placement::RoundRobin, 0, 5, &[false; 2], false).queue, 1);
        assert_eq!(choose(Placement::RoundRobin, 0, 6, &[false; 2], false).queue, 0);
    }

    #[test]
    fn the_pool_grows_only_when_every_runner_is_busy() {
        // An idle runner: no growth.
        assert_eq!(grow_slot(&[true, true], &[true, false], 4), None);
        // All busy: a new runner, up to the bound.
        assert_eq!(grow_slot(&[true, true], &[true, true], 4), Some(2));
        assert_eq!(grow_slot(&[true, true], &[true, true], 2), None);
        // An ended runner's slot is reused first.
        assert_eq!(grow_slot(&[true, false, true], &[true, true, true], 4), Some(1));
    }

    #[test]
    fn runners_take_their_own_then_busy_runners_work() {
        assert_eq!(pick(0, &[1, 2], &[false, true]), Some(0));
        assert_eq!(pick(0, &[0, 2], &[false, true]), Some(1));
        // an idle runner's queue is its own to take (it was woken for it)
        assert_eq!(pick(0, &[0, 2], &[false, false]), None);
        assert_eq!(pick(1, &[0, 0], &[true, false]), None);
    }
}

//! The dispatcher's watchdog thread: deadlines (preemption signals), hangs
//! (kills), deaths (reaping, failing the in-flight request once, striking
//! its function) and respawns, over every tenant's workers.

use super::{Inner, nanos, pin_current_thread, raise_priority};
use crate::language::pool::lock;
use crate::language::protocol::Preemption;
use crate::language::shm::now_ns;
use crate::language::signals::PREEMPT_SIGNAL;
use crate::language::tenants::{RUNNING, STOPPED, TenantWorkers};
use crate::language::watchdog::{Overdue, WatchAction, decide, next_wake};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// While work is outstanding, dead workers are looked for this often (a
/// caller whose worker died waits at most about this long for its answer).
const REAP_EVERY_NS: u64 = 1_000_000;

impl Inner {
    /// The watchdog thread: deadlines, hangs, deaths, over every tenant's
    /// workers.
    pub(super) fn watch(self: &Arc<Self>) {
        if self.config.watchdog_realtime {
            raise_priority();
        }
        if self.config.pin {
            // Core 0 is the dispatcher's; workers are pinned to the others.
            pin_current_thread(0);
        }
        let signals = self.config.preemption == Preemption::Watchdog;
        let enforce = self.config.preemption != Preemption::Disabled;
        let grace = nanos(self.config.hang_grace);
        let interval_ns = nanos(self.config.watchdog_interval);
        // A copy of the tenant list (tenants are only ever appended),
        // refreshed when it grows, and each worker's overdue track.
        let mut groups: Vec<Arc<TenantWorkers>> = Vec::new();
        let mut tracks: Vec<Vec<Option<Overdue>>> = Vec::new();
        let mut version = u64::MAX;
        let mut last_busy = now_ns();
        let mut last_reap = 0;
        let mut deadlines: Vec<u64> = Vec::new();
        while !self.shutdown.load(Ordering::SeqCst) {
            let current = self.tenants_version.load(Ordering::SeqCst);
            if current != version {
                version = current;
                groups = self.tenants_now();
                tracks.resize_with(groups.len(), Vec::new);
                for (g, t) in groups.iter().zip(tracks.iter_mut()) {
                    t.resize(g.workers.len(), None);
                }
            }
            let now = now_ns();
            let mut busy = false;
            deadlines.clear();
            for (g, gt) in groups.iter().zip(tracks.iter_mut()) {
                for (w, track) in g.workers.iter().zip(gt.iter_mut()) {
                    if w.gone.load(Ordering::Relaxed) {
                        continue;
                    }
                    busy |= w.outstanding.load(Ordering::Relaxed) > 0;
                    if !w.alive.load(Ordering::SeqCst) {
                        continue;
                    }
                    let inflight = &w.region.header().inflight;
                    let seq = inflight.seq.load(Ordering::Acquire);
                    let deadline = inflight.deadline_ns.load(Ordering::Acquire);
                    if !enforce {
                        continue;
                    }
                    if seq != 0 {
                        deadlines.push(deadline);
                    }
                    match decide(signals, seq, deadline, now, grace, track) {
                        WatchAction::Nothing => {}
                        WatchAction::Signal => w.signal(PREEMPT_SIGNAL),
                        WatchAction::Kill => w.signal(libc::SIGKILL),
                    }
                }
            }
            // Deaths: checked every millisecond while busy, and on every
            // idle wake-up.
            if now.saturating_sub(last_reap) > REAP_EVERY_NS || !busy {
                last_reap = now;
                for (g, gt) in groups.iter().zip(tracks.iter_mut()) {
                    for (i, (w, track)) in g.workers.iter().zip(gt.iter_mut()).enumerate() {
                        if let Some(status) = w.reap() {
                            *track = None;
                            self.replace(g, i, &status);
                        }
                    }
                }
            }
            if busy || now.saturating_sub(last_busy) < 2_000_000 {
                if busy {
                    last_busy = now;
                }
                // Asleep until the next deadline could fall (see
                // `next_wake`), not every interval: each wake takes the
                // dispatcher's core from its callers. A deploy that lowers
                // the smallest budget rings the bell (under its lock, so
                // that the ring is not lost between reading and sleeping).
                let guard = lock(&self.watchdog_bell.0);
                let min_budget = if enforce {
                    self.min_budget_ns.load(Ordering::SeqCst)
                } else {
                    u64::MAX
                };
                let wake = next_wake(now, deadlines.iter().copied(), min_budget, interval_ns, REAP_EVERY_NS);
                let nap = wake.saturating_sub(now_ns());
                if nap > 0 {
                    let _ = self.watchdog_bell.1.wait_timeout(guard, Duration::from_nanos(nap));
                }
            } else {
                let guard = lock(&self.watchdog_bell.0);
                self.watchdog_parked.store(true, Ordering::SeqCst);
                let idle = groups
                    .iter()
                    .flat_map(|g| g.workers.iter())
                    .all(|w| w.outstanding.load(Ordering::SeqCst) == 0);
                if idle
                    && !self.shutdown.load(Ordering::SeqCst)
                    && self.tenants_version.load(Ordering::SeqCst) == version
                {
                    let _ = self.watchdog_bell.1.wait_timeout(guard, Duration::from_millis(100));
                }
                self.watchdog_parked.store(false, Ordering::SeqCst);
                last_busy = now_ns();
            }
        }
    }

    /// Worker `i` of tenant `g` died: fail its in-flight request, strike its
    /// function, and start a replacement on another thread (it waits for
    /// the start lock, which a long start of another tenant may hold; the
    /// watchdog must not).
    pub(super) fn replace(self: &Arc<Self>, g: &Arc<TenantWorkers>, i: usize, status: &str) {
        let Some(w) = g.workers.get(i) else { return };
        let detail = format!("worker {} of tenant {} died ({status})", w.index, g.tenant);
        if let Some(func) = w.recover(&detail)
            && let Ok(f) = self.function(func)
        {
            f.strikes.fetch_add(1, Ordering::SeqCst);
        }
        if self.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let (inner, group) = (Arc::clone(self), Arc::clone(g));
        let respawn = move || inner.respawn(&group, i, &detail);
        if let Err(e) = std::thread::Builder::new()
            .name("microfaas-lang-respawn".into())
            .spawn(respawn)
        {
            eprintln!("microfaas language: cannot start a respawn thread: {e}");
        }
    }

    /// Restarts worker `i` of `g` if `g` still runs (it may have been
    /// stopped meanwhile: then it stays down until its next start).
    pub(super) fn respawn(&self, g: &TenantWorkers, i: usize, detail: &str) {
        let _starting = lock(&self.starts);
        let Some(w) = g.workers.get(i) else { return };
        if self.shutdown.load(Ordering::SeqCst) || g.state.load(Ordering::SeqCst) != RUNNING {
            return;
        }
        self.respawns.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.spawn(g, w) {
            eprintln!(
                "microfaas language: cannot respawn worker {} of tenant {}: {e}",
                w.index, g.tenant
            );
            w.fail_all(&format!("{detail}; respawn failed: {e}"));
            if g.workers.iter().all(|w| w.gone.load(Ordering::SeqCst)) {
                // Nothing left: the tenant's next request starts afresh.
                g.state.store(STOPPED, Ordering::SeqCst);
            }
        }
    }
}

//! Tenants' workers: each tenant has its own worker per core, started on
//! its first request, stopped when idle longest and room is needed (a cap
//! on live workers over all tenants). A function is bound to its tenant's
//! [`TenantWorkers`] at deploy, so the warm path finds its workers without
//! a lookup or a lock: it pins the tenant (one atomic add, one load) and
//! picks a worker as before.
//!
//! ```text
//!  Function ─Arc─> TenantWorkers "a" { state, active, last_used } ── WorkerHandle 0 (cpu 1) ── worker, uid base+k
//!  Function ─Arc─┘                                               └─ WorkerHandle 1 (cpu 2) ── worker, uid base+k
//!  Function ─Arc─> TenantWorkers "b" ... (STOPPED: regions kept, no process)
//! ```
//!
//! States change only under the dispatcher's start lock. A caller pins a
//! tenant by incrementing `active` and then reading `state`; the evictor
//! sets `state` to STOPPING and then reads `active` (both `SeqCst`), so at
//! least one of them sees the other: a pinned tenant is never stopped, and
//! a caller that saw STOPPING unpins and takes the slow path.

use super::LanguageError;
use super::pool::WorkerHandle;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};

/// No worker process (never started, or evicted).
pub(crate) const STOPPED: u8 = 0;
/// Serving.
pub(crate) const RUNNING: u8 = 1;
/// Being stopped (under the start lock; reverts to RUNNING if pinned).
pub(crate) const STOPPING: u8 = 2;

/// One tenant's workers, one per core, and what the LRU cap needs.
#[derive(Debug)]
pub(crate) struct TenantWorkers {
    /// The tenant's label.
    pub tenant: String,
    /// Its uid (its workers' sandbox).
    pub uid: u32,
    /// Its workers' `--sandbox` value (its own uid and gid).
    pub sandbox_arg: String,
    /// Its worker handles (regions persist while it is stopped).
    pub workers: Vec<WorkerHandle>,
    /// STOPPED, RUNNING or STOPPING.
    pub state: AtomicU8,
    /// Callers and control requests using its workers right now.
    pub active: AtomicUsize,
    /// When a caller last pinned it, `CLOCK_MONOTONIC` ns.
    pub last_used_ns: AtomicU64,
    /// Round-robin start of the worker scan.
    next_worker: AtomicUsize,
}

/// A tenant held running: while it exists the tenant is not stopped.
#[derive(Debug)]
pub(crate) struct Pin<'a>(&'a TenantWorkers);

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TenantWorkers {
    pub fn new(tenant: String, uid: u32, sandbox_arg: String, workers: Vec<WorkerHandle>) -> Self {
        Self {
            tenant,
            uid,
            sandbox_arg,
            workers,
            state: AtomicU8::new(STOPPED),
            active: AtomicUsize::new(0),
            last_used_ns: AtomicU64::new(0),
            next_worker: AtomicUsize::new(0),
        }
    }

    /// Pins the tenant if it is running (the warm path: no lock).
    pub fn try_pin(&self) -> Option<Pin<'_>> {
        self.active.fetch_add(1, Ordering::SeqCst);
        let pin = Pin(self);
        (self.state.load(Ordering::SeqCst) == RUNNING).then_some(pin)
    }

    /// Whether nothing uses its workers (no pin, nothing outstanding).
    pub fn idle(&self) -> bool {
        self.active.load(Ordering::SeqCst) == 0
            && self.workers.iter().all(|w| w.outstanding.load(Ordering::SeqCst) == 0)
    }

    /// Stops its workers if it is running and idle (call under the start
    /// lock). Returns whether it stopped them.
    pub fn try_stop(&self) -> bool {
        if self
            .state
            .compare_exchange(RUNNING, STOPPING, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return false;
        }
        if !self.idle() {
            self.state.store(RUNNING, Ordering::SeqCst);
            return false;
        }
        for w in &self.workers {
            w.stop();
            // Its last transfers stay in its own region only; give the
            // pages back.
            for slot in 0..w.region.layout().depth {
                w.region.discard_slot(slot);
            }
        }
        self.state.store(STOPPED, Ordering::SeqCst);
        true
    }

    /// Its workers that have not failed for good.
    pub fn live_workers(&self) -> impl Iterator<Item = &WorkerHandle> {
        self.workers.iter().filter(|w| !w.gone.load(Ordering::Relaxed))
    }

    /// Picks its least loaded worker with a free slot (round robin among
    /// equals), waiting if every slot is busy.
    pub fn acquire(&self) -> Result<(&WorkerHandle, u32), LanguageError> {
        let workers = &self.workers;
        let n = workers.len();
        loop {
            if workers.iter().all(|w| w.gone.load(Ordering::Relaxed)) {
                return Err(LanguageError::WorkerLost {
                    detail: "no worker left: every respawn failed".into(),
                });
            }
            let first = self.next_worker.fetch_add(1, Ordering::Relaxed);
            // Least outstanding first, starting the scan at a rotating
            // worker so that ties spread out.
            let mut tried = 0usize;
            let mut skip = 0u64;
            while tried < n {
                let mut best: Option<usize> = None;
                for k in 0..n {
                    let i = (first + k) % n;
                    if skip & (1 << (i % 64)) != 0 || workers[i].gone.load(Ordering::Relaxed) {
                        continue;
                    }
                    let load = workers[i].outstanding.load(Ordering::Relaxed);
                    if best.is_none_or(|b| load < workers[b].outstanding.load(Ordering::Relaxed)) {
                        best = Some(i);
                    }
                }
                let Some(i) = best else { break };
                if let Some(slot) = workers[i].try_acquire() {
                    return Ok((&workers[i], slot));
                }
                skip |= 1 << (i % 64);
                tried += 1;
            }
            std::thread::yield_now();
        }
    }
}

/// A running tenant as the eviction decision sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// When it was last used, ns.
    pub last_used_ns: u64,
    /// Its live worker processes.
    pub workers: usize,
    /// Nothing uses it now (only idle tenants may be stopped).
    pub idle: bool,
}

/// Which running tenants to stop so that `needed` more workers fit under
/// `cap` when `live` are running now: the idle ones used least recently
/// first (ties: lower index), as few as suffice. `None` if even stopping
/// every idle tenant would not make room.
pub(crate) fn choose_evictions(candidates: &[Candidate], live: usize, needed: usize, cap: usize) -> Option<Vec<usize>> {
    let mut over = live.saturating_add(needed).saturating_sub(cap);
    if over == 0 {
        return Some(Vec::new());
    }
    let mut idle: Vec<usize> = (0..candidates.len()).filter(|&i| candidates[i].idle).collect();
    idle.sort_by_key(|&i| (candidates[i].last_used_ns, i));
    let mut chosen = Vec::new();
    for i in idle {
        if over == 0 {
            break;
        }
        chosen.push(i);
        over = over.saturating_sub(candidates[i].workers);
    }
    (over == 0).then_some(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(last_used_ns: u64, workers: usize, idle: bool) -> Candidate {
        Candidate {
            last_used_ns,
            workers,
            idle,
        }
    }

    #[test]
    fn nothing_is_stopped_while_there_is_room() {
        assert_eq!(choose_evictions(&[c(1, 1, true)], 1, 1, 2), Some(vec![]));
        assert_eq!(choose_evictions(&[], 0, 4, 4), Some(vec![]));
    }

    #[test]
    fn the_least_recently_used_idle_tenant_goes_first() {
        let cands = [c(30, 1, true), c(10, 1, true), c(20, 1, true)];
        assert_eq!(choose_evictions(&cands, 3, 1, 3), Some(vec![1]));
        assert_eq!(choose_evictions(&cands, 3, 2, 3), Some(vec![1, 2]));
        // Ties go to the lower index (stable).
        let tied = [c(5, 1, true), c(5, 1, true)];
        assert_eq!(choose_evictions(&tied, 2, 1, 2), Some(vec![0]));
    }

    #[test]
    fn busy_tenants_are_never_stopped() {
        let cands = [c(1, 1, false), c(50, 1, true), c(2, 1, false)];
        assert_eq!(choose_evictions(&cands, 3, 1, 3), Some(vec![1]));
        assert_eq!(choose_evictions(&cands, 3, 2, 3), None, "only one is idle");
        assert_eq!(choose_evictions(&[c(1, 2, false)], 2, 2, 2), None);
    }

    #[test]
    fn tenants_with_several_workers_free_as_many() {
        // Two workers per tenant, cap 4: a new tenant needs one stopped.
        let cands = [c(9, 2, true), c(3, 2, true)];
        assert_eq!(choose_evictions(&cands, 4, 2, 4), Some(vec![1]));
        // Needing 3 over the cap takes both.
        assert_eq!(choose_evictions(&cands, 4, 3, 4), Some(vec![1, 0]));
        assert_eq!(choose_evictions(&cands, 4, 5, 4), None);
    }
}

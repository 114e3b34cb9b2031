//! The dispatcher: the host-side API of the language backend. Owns the
//! tenants' workers (started on demand, capped, least recently used
//! stopped; see `tenants`), the function catalog, the watchdog thread
//! (preemption in watchdog mode, hang escalation, death detection and
//! respawn) and the blacklist.

use super::LanguageError;
use super::catalog::CatalogEntry;
use super::idmap::IdMap;
use super::pool::{SlotResult, WorkerHandle, lock, rss_of};
use super::protocol::{ColdStart, LOAD_REGISTER_ONLY, Outcome, Preemption, Reply, Request, WorkerArgs, op};
use super::shm::{Layout, now_ns};
use super::tenants::TenantWorkers;
use crate::runtime::{FunctionCode, SealedArtifact};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

mod supervise;
mod tenancy;

/// Inputs or outputs above this size have their slot's pages released
/// after the call (a system call, so only for large transfers).
const LARGE_TRANSFER_BYTES: usize = 1 << 20;

/// Knobs of a [`Dispatcher`].
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// The `microfaas-worker` binary.
    pub worker_bin: PathBuf,
    /// Worker processes per tenant; `None` = cores - 1, at least 1.
    pub workers: Option<usize>,
    /// Worker processes alive at once over all tenants; `None` =
    /// [`DEFAULT_MAX_WORKERS`]. At least `workers`.
    pub max_workers: Option<usize>,
    /// Pin worker `i` to core `(i + 1) % cores` (core 0 for the dispatcher).
    pub pin: bool,
    /// How over-budget invocations are stopped.
    pub preemption: Preemption,
    /// How often the watchdog checks deadlines while work is outstanding
    /// (the preemption latency past the budget).
    pub watchdog_interval: Duration,
    /// Past its deadline by this much, a worker that still has not stopped is
    /// killed (its request fails as worker-lost; the function gets a strike).
    pub hang_grace: Duration,
    /// Idle workers (and waiting callers) poll this long before parking.
    pub idle_spin: Duration,
    /// Requests in flight per worker (a power of two).
    pub queue_depth: u32,
    /// Largest input, bytes.
    pub input_limit_bytes: usize,
    /// Largest output, bytes.
    pub output_limit_bytes: usize,
    /// Heap limit of a function instance, bytes.
    pub heap_limit_bytes: usize,
    /// Usable stack of a function, bytes.
    pub stack_bytes: usize,
    /// Budget of `init()`.
    pub init_budget: Duration,
    /// Strikes (workers killed or hung) after which a function is refused.
    pub blacklist_after: u32,
    /// The sandbox every worker enters before it loads any function.
    pub sandbox: crate::sandbox::SandboxSettings,
    /// How long a new worker may take to become ready.
    pub start_timeout: Duration,
    /// Run the watchdog thread under `SCHED_FIFO` when permitted (it sleeps
    /// between short checks), so that a loaded host does not delay
    /// preemption by whole scheduler slices. Falls back silently.
    pub watchdog_realtime: bool,
    /// How a worker's cold start gets its instance (default: the
    /// pre-linked image's post-init snapshot).
    pub cold_start: ColdStart,
    /// Make a function resident (its warm instance, `init()` run) on its
    /// first warm or automatic request instead of at deploy: a deploy then
    /// only delivers and pre-links it, and a function only ever started
    /// cold keeps no instance in its workers (memory per function). Its
    /// `init()` first runs at its first start, so a failing `init()` shows
    /// there, not at deploy. Default `false`.
    pub lazy_resident: bool,
}

impl DispatcherConfig {
    /// Defaults around `worker_bin`.
    pub fn new(worker_bin: impl Into<PathBuf>) -> Self {
        Self {
            worker_bin: worker_bin.into(),
            workers: None,
            max_workers: None,
            pin: true,
            preemption: Preemption::Watchdog,
            watchdog_interval: Duration::from_micros(50),
            hang_grace: Duration::from_millis(250),
            idle_spin: Duration::from_micros(200),
            queue_depth: 8,
            input_limit_bytes: 4 << 20,
            output_limit_bytes: 4 << 20,
            heap_limit_bytes: 64 << 20,
            stack_bytes: 1 << 20,
            init_budget: Duration::from_secs(10),
            blacklist_after: 3,
            sandbox: crate::sandbox::SandboxSettings::default(),
            start_timeout: Duration::from_secs(20),
            watchdog_realtime: true,
            cold_start: ColdStart::default(),
            lazy_resident: false,
        }
    }
}

/// Live workers over all tenants unless configured: a 2-core host keeps 16
/// tenants warm (one worker each) in a few tens of MiB of worker memory
/// plus the tenants' own functions.
pub const DEFAULT_MAX_WORKERS: usize = 16;

/// A deployed function's handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FunctionIndex(u32);

/// How to start an invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Warm if resident, else cold (and make it resident again afterwards).
    Auto,
    /// The preloaded copy (loading it first if it was evicted).
    Warm,
    /// Map a fresh private copy, init, call, unmap.
    Cold,
}

/// A finished invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The output.
    pub output: Vec<u8>,
    /// Whether it was a cold start.
    pub cold: bool,
    /// Load + init time (cold), ns.
    pub start_ns: u64,
    /// From `invoke` to the function's entry timestamp, ns.
    pub dispatch_ns: u64,
    /// The function's own run, ns.
    pub exec_ns: u64,
    /// From `invoke` to its return, ns.
    pub total_ns: u64,
}

/// Counters of a dispatcher.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DispatcherStats {
    /// Functions deployed.
    pub functions: usize,
    /// Of them, resident (preloaded).
    pub resident: usize,
    /// Distinct artifacts loaded per worker (resident functions deployed
    /// from the same [`SealedArtifact`] share one loaded image in a worker).
    pub images: usize,
    /// Worker pids of every tenant, in tenant order (0 = none right now).
    pub worker_pids: Vec<u32>,
    /// Each tenant's workers, in the order the tenants were first seen.
    pub tenants: Vec<TenantStats>,
    /// Worker processes alive now.
    pub live_workers: usize,
    /// Tenants whose workers were stopped to make room (LRU evictions).
    pub tenant_evictions: u64,
    /// Loaded function instances: per tenant, its resident images times
    /// its live workers.
    pub instances: usize,
    /// Sum of the workers' resident sets, bytes.
    pub worker_rss_bytes: u64,
    /// Invocations stopped at their deadline.
    pub preemptions: u64,
    /// Workers replaced after dying.
    pub respawns: u64,
    /// Functions refused for killing or hanging workers.
    pub blacklisted: usize,
    /// Per worker: memory protection keys state (`PkeysState::code`: 0
    /// disabled by config, 1 enabled, 2 unavailable) and keys allocated.
    pub worker_pkeys: Vec<(u32, u32)>,
}

/// One tenant's share of the dispatcher's stats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantStats {
    /// The tenant.
    pub tenant: String,
    /// The uid its workers run as.
    pub uid: u32,
    /// Its worker pids (0 = not running).
    pub worker_pids: Vec<u32>,
    /// Sum of its workers' resident sets, bytes.
    pub rss_bytes: u64,
    /// Its functions deployed.
    pub functions: usize,
    /// Distinct artifacts resident in each of its workers.
    pub images: usize,
}

#[derive(Debug)]
struct Function {
    /// Its tenant's workers: the only ones it ever runs in.
    tenant: Arc<TenantWorkers>,
    /// Its sealed memfds (artifact, module), kept while deployed (sent to
    /// every new worker).
    code: FunctionCode,
    budget: Duration,
    resident: AtomicBool,
    strikes: AtomicU32,
}

#[derive(Debug)]
struct Inner {
    config: DispatcherConfig,
    args: WorkerArgs,
    layout: Layout,
    /// Workers per tenant.
    per_tenant: usize,
    /// Live workers allowed over all tenants.
    max_workers: usize,
    /// Every tenant seen, in order (never removed; a stopped tenant keeps
    /// only its regions).
    tenants: RwLock<Vec<Arc<TenantWorkers>>>,
    /// Bumped when a tenant is added (the watchdog refreshes its copy).
    tenants_version: AtomicU64,
    /// Held while a tenant's workers start, stop or respawn.
    starts: Mutex<()>,
    tenant_evictions: AtomicU64,
    functions: RwLock<IdMap<u32, Arc<Function>>>,
    next_func: AtomicU32,
    next_seq: AtomicU64,
    shutdown: AtomicBool,
    respawns: AtomicU64,
    watchdog_parked: AtomicBool,
    watchdog_bell: (Mutex<()>, Condvar),
    /// The smallest budget of any request (function budgets deployed,
    /// and `init_budget`): the watchdog sleeps at most this long while
    /// nothing is armed. Only ever lowered, under `watchdog_bell`'s lock.
    min_budget_ns: AtomicU64,
}

/// The language backend's dispatcher: deploy, invoke, evict. `Send + Sync`;
/// many threads may invoke at once.
#[derive(Debug)]
pub struct Dispatcher {
    inner: Arc<Inner>,
    watchdog: Option<JoinHandle<()>>,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Dispatcher {
    /// Starts the workers and the watchdog.
    pub fn start(config: DispatcherConfig) -> Result<Self, LanguageError> {
        let cores = online_cpus();
        let per_tenant = config.workers.unwrap_or(cores.saturating_sub(1)).max(1);
        let max_workers = config.max_workers.unwrap_or(DEFAULT_MAX_WORKERS);
        if max_workers < per_tenant {
            return Err(LanguageError::Config(format!(
                "max_workers ({max_workers}) is below the workers of one tenant ({per_tenant})"
            )));
        }
        if !super::ring::valid_capacity(config.queue_depth) {
            return Err(LanguageError::Config("queue_depth must be a power of two".into()));
        }
        let layout = Layout::new(config.queue_depth, config.input_limit_bytes, config.output_limit_bytes)
            .map_err(|e| LanguageError::Config(e.to_string()))?;
        let args = WorkerArgs {
            index: 0,
            cpu: None,
            depth: config.queue_depth,
            input_limit: config.input_limit_bytes,
            output_limit: config.output_limit_bytes,
            heap_limit: config.heap_limit_bytes,
            stack_bytes: config.stack_bytes,
            idle_spin: config.idle_spin,
            init_budget: config.init_budget,
            preemption: config.preemption,
            sandbox: config.sandbox.to_arg(),
            cold_start: config.cold_start,
        };
        let init_budget = config.init_budget;
        let inner = Arc::new(Inner {
            config,
            args,
            layout,
            per_tenant,
            max_workers,
            tenants: RwLock::new(Vec::new()),
            tenants_version: AtomicU64::new(0),
            starts: Mutex::new(()),
            tenant_evictions: AtomicU64::new(0),
            functions: RwLock::new(IdMap::default()),
            next_func: AtomicU32::new(1),
            next_seq: AtomicU64::new(1),
            shutdown: AtomicBool::new(false),
            respawns: AtomicU64::new(0),
            watchdog_parked: AtomicBool::new(false),
            watchdog_bell: (Mutex::new(()), Condvar::new()),
            min_budget_ns: AtomicU64::new(nanos(init_budget)),
        });
        // The default tenant's workers start now, so that a host that cannot
        // run workers at all fails here rather than on a first request.
        let default = inner.tenant(crate::sandbox::DEFAULT_TENANT)?;
        inner.start_tenant(&default)?;
        let for_thread = Arc::clone(&inner);
        let watchdog = std::thread::Builder::new()
            .name("microfaas-lang-watchdog".into())
            .spawn(move || for_thread.watch())
            .map_err(|e| LanguageError::io("starting the watchdog", e))?;
        Ok(Self {
            inner,
            watchdog: Some(watchdog),
        })
    }

    /// Makes `artifact` (a sealed memfd, kept while the function is
    /// deployed) available with `budget` for the default tenant: see
    /// [`Dispatcher::deploy_for`].
    pub fn deploy(&self, artifact: Arc<SealedArtifact>, budget: Duration) -> Result<FunctionIndex, LanguageError> {
        self.deploy_for(crate::sandbox::DEFAULT_TENANT, artifact, budget)
    }

    /// Makes `artifact` (a sealed memfd, kept while the function is
    /// deployed) available with `budget` as `tenant`'s, preloaded in every
    /// worker of that tenant (started now if it is not running; its
    /// `init()` runs there now) and in no other. Functions of one tenant
    /// deployed from the same `SealedArtifact` share one loaded image per
    /// worker. A tenant's workers run as its own uid; a new tenant past the
    /// uid range is refused.
    pub fn deploy_for(
        &self,
        tenant: &str,
        artifact: Arc<SealedArtifact>,
        budget: Duration,
    ) -> Result<FunctionIndex, LanguageError> {
        self.deploy_code(tenant, FunctionCode::new(artifact), budget)
    }

    /// Like [`Dispatcher::deploy_for`], for any [`FunctionCode`]: an
    /// artifact with a module runs `load(module)` right after `init()` in
    /// each worker, and is one image (never shared with the artifact alone).
    pub fn deploy_code(
        &self,
        tenant: &str,
        code: FunctionCode,
        budget: Duration,
    ) -> Result<FunctionIndex, LanguageError> {
        let inner = &self.inner;
        let workers = inner.tenant(tenant)?;
        inner.lower_min_budget(nanos(budget));
        let index = inner.next_func.fetch_add(1, Ordering::Relaxed);
        let function = Arc::new(Function {
            tenant: workers,
            code,
            budget,
            resident: AtomicBool::new(!inner.config.lazy_resident),
            strikes: AtomicU32::new(0),
        });
        inner.write_functions().insert(index, Arc::clone(&function));
        let id = FunctionIndex(index);
        let loaded = inner.pin(&function.tenant).and_then(|_pin| {
            if inner.config.lazy_resident {
                self.register(id, &function)
            } else {
                self.preload(id, &function)
            }
        });
        if let Err(e) = loaded {
            self.remove(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Delivers the function to its tenant's workers (which the caller has
    /// pinned) without making it resident ([`DispatcherConfig::lazy_resident`]).
    fn register(&self, id: FunctionIndex, function: &Function) -> Result<(), LanguageError> {
        let entry = self.inner.catalog_entry(id.0, function, false);
        for w in function.tenant.live_workers() {
            if let Err(e) = w.deliver(&entry, &function.code)
                && w.alive.load(Ordering::SeqCst)
            {
                return Err(LanguageError::io("sending an artifact to a worker", e));
            }
            match self.inner.control_with(w, op::LOAD, id.0, &[], LOAD_REGISTER_ONLY)? {
                (Outcome::InitFailed, msg) => return Err(LanguageError::InitFailed { message: msg }),
                (Outcome::PolicyViolation, detail) => return Err(LanguageError::PolicyViolation { detail }),
                _ => {}
            }
        }
        Ok(())
    }

    /// Loads the function into its tenant's workers (which the caller has
    /// pinned).
    fn preload(&self, id: FunctionIndex, function: &Function) -> Result<(), LanguageError> {
        let entry = self.inner.catalog_entry(id.0, function, true);
        for w in function.tenant.live_workers() {
            // A worker being replaced meanwhile gets the function in its
            // initial catalog instead (the LOAD then finds it registered).
            if let Err(e) = w.deliver(&entry, &function.code)
                && w.alive.load(Ordering::SeqCst)
            {
                return Err(LanguageError::io("sending an artifact to a worker", e));
            }
            let reply = self.inner.control(w, op::LOAD, id.0, &[])?;
            match reply {
                (Outcome::InitFailed, msg) => return Err(LanguageError::InitFailed { message: msg }),
                (Outcome::PolicyViolation, detail) => return Err(LanguageError::PolicyViolation { detail }),
                _ => {}
            }
        }
        function.resident.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Drops the function from its tenant's workers and the catalog.
    pub fn remove(&self, id: FunctionIndex) {
        let Some(function) = self.inner.write_functions().remove(&id.0) else {
            return;
        };
        if let Some(_pin) = self.inner.pin_if_running(&function.tenant) {
            for w in function.tenant.live_workers() {
                let _ = self.inner.control(w, op::UNLOAD, id.0, &[]);
            }
        }
        drop(function);
    }

    /// Unloads the function from its tenant's workers; its next start is
    /// cold.
    pub fn evict(&self, id: FunctionIndex) -> Result<(), LanguageError> {
        let function = self.inner.function(id.0)?;
        function.resident.store(false, Ordering::SeqCst);
        if let Some(_pin) = self.inner.pin_if_running(&function.tenant) {
            for w in function.tenant.live_workers() {
                self.inner.control_evict(w, id.0)?;
            }
        }
        Ok(())
    }

    /// Runs the function once on `input`.
    pub fn invoke(&self, id: FunctionIndex, input: &[u8], start: Start) -> Result<Completed, LanguageError> {
        self.invoke_since(now_ns(), id, input, start)
    }

    /// As [`Dispatcher::invoke`], with the caller's own start timestamp
    /// (`CLOCK_MONOTONIC` ns, see [`super::shm::now_ns`]) as the origin of
    /// the dispatch and total times.
    pub fn invoke_since(
        &self,
        t0: u64,
        id: FunctionIndex,
        input: &[u8],
        start: Start,
    ) -> Result<Completed, LanguageError> {
        let inner = &self.inner;
        if input.len() > inner.config.input_limit_bytes {
            return Err(LanguageError::InputTooLarge {
                len: input.len(),
                limit: inner.config.input_limit_bytes,
            });
        }
        let function = inner.function(id.0)?;
        let strikes = function.strikes.load(Ordering::Relaxed);
        if strikes >= inner.config.blacklist_after {
            return Err(LanguageError::Blacklisted {
                reason: format!("it killed or hung {strikes} workers"),
            });
        }
        // The function's own tenant's workers, started if need be: no
        // lookup and no lock when they run (see `tenants`).
        let _pin = inner.pin(&function.tenant)?;
        function.tenant.last_used_ns.store(t0, Ordering::Relaxed);
        let resident = function.resident.load(Ordering::Acquire);
        let cold = match start {
            Start::Cold => true,
            Start::Auto => !resident,
            Start::Warm => {
                if !resident {
                    self.preload(id, &function)?;
                }
                false
            }
        };
        let opcode = if cold { op::INVOKE_COLD } else { op::INVOKE_WARM };
        let (w, slot) = function.tenant.acquire()?;
        let seq = inner.next_seq.fetch_add(1, Ordering::Relaxed);
        if let Some(area) = w.region.input_area(slot)
            && !input.is_empty()
        {
            // SAFETY: the slot's input area holds `input_limit` bytes (checked
            // above) and belongs to us until its request is answered.
            unsafe { std::ptr::copy_nonoverlapping(input.as_ptr(), area, input.len()) };
        }
        inner.bell();
        w.submit(Request {
            seq,
            budget_ns: nanos(function.budget),
            input_len: u64::try_from(input.len()).unwrap_or(u64::MAX),
            op: opcode,
            func: id.0,
            slot,
            reserved: 0,
        });
        let result = w.wait(slot, inner.config.idle_spin);
        let done = inner.finish(w, slot, result, &function, t0, cold);
        let output_len = done.as_ref().map_or(0, |c| c.output.len());
        if input.len().max(output_len) > LARGE_TRANSFER_BYTES {
            // Give a big transfer's shared pages back rather than keep them
            // resident in both processes.
            w.region.discard_slot(slot);
        }
        w.release(slot);
        if cold && start == Start::Auto && !function.resident.load(Ordering::Acquire) {
            // Auto after an eviction: serve cold, then be warm again.
            let _ = self.preload(id, &function);
        }
        done
    }

    /// Counters and resident sets.
    pub fn stats(&self) -> DispatcherStats {
        let inner = &self.inner;
        let functions = inner
            .functions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let groups = inner.tenants_now();
        let mut tenants = Vec::with_capacity(groups.len());
        let mut instances = 0usize;
        for g in &groups {
            let own: Vec<&Arc<Function>> = functions.values().filter(|f| Arc::ptr_eq(&f.tenant, g)).collect();
            let images = own
                .iter()
                .filter(|f| f.resident.load(Ordering::Relaxed))
                .map(|f| f.code.image_id())
                .collect::<std::collections::HashSet<_>>()
                .len();
            let pids: Vec<u32> = g.workers.iter().map(|w| w.pid.load(Ordering::Relaxed)).collect();
            let live = pids.iter().filter(|&&p| p != 0).count();
            instances = instances.saturating_add(images.saturating_mul(live));
            tenants.push(TenantStats {
                tenant: g.tenant.clone(),
                uid: g.uid,
                rss_bytes: pids.iter().filter(|&&p| p != 0).filter_map(|&p| rss_of(p)).sum(),
                worker_pids: pids,
                functions: own.len(),
                images,
            });
        }
        let worker_pids: Vec<u32> = tenants.iter().flat_map(|t| t.worker_pids.iter().copied()).collect();
        DispatcherStats {
            functions: functions.len(),
            resident: functions
                .values()
                .filter(|f| f.resident.load(Ordering::Relaxed))
                .count(),
            images: tenants.iter().map(|t| t.images).max().unwrap_or(0),
            worker_rss_bytes: tenants.iter().map(|t| t.rss_bytes).sum(),
            live_workers: worker_pids.iter().filter(|&&p| p != 0).count(),
            worker_pids,
            tenants,
            tenant_evictions: inner.tenant_evictions.load(Ordering::Relaxed),
            instances,
            preemptions: groups
                .iter()
                .flat_map(|g| g.workers.iter())
                .map(|w| w.region.header().worker.preemptions.load(Ordering::Relaxed))
                .sum(),
            respawns: inner.respawns.load(Ordering::Relaxed),
            worker_pkeys: groups
                .iter()
                .flat_map(|g| g.workers.iter())
                .map(|w| {
                    let state = &w.region.header().worker;
                    (
                        state.pkeys_state.load(Ordering::Relaxed),
                        state.pkeys_keys.load(Ordering::Relaxed),
                    )
                })
                .collect(),
            blacklisted: functions
                .values()
                .filter(|f| f.strikes.load(Ordering::Relaxed) >= inner.config.blacklist_after)
                .count(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &DispatcherConfig {
        &self.inner.config
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        self.inner.ring_bell();
        if let Some(t) = self.watchdog.take() {
            let _ = t.join();
        }
        let _starting = lock(&self.inner.starts);
        for g in self.inner.tenants_now() {
            for w in &g.workers {
                w.stop();
            }
        }
    }
}

impl Inner {
    fn write_functions(&self) -> std::sync::RwLockWriteGuard<'_, IdMap<u32, Arc<Function>>> {
        self.functions
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn function(&self, index: u32) -> Result<Arc<Function>, LanguageError> {
        self.functions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&index)
            .cloned()
            .ok_or(LanguageError::UnknownFunction)
    }

    fn catalog_entry(&self, index: u32, f: &Function, preload: bool) -> CatalogEntry {
        CatalogEntry {
            func: index,
            image: f.code.image_id(),
            preload,
            module: f.code.module().is_some(),
        }
    }

    fn acquire_on(&self, w: &WorkerHandle) -> u32 {
        loop {
            if let Some(slot) = w.try_acquire() {
                return slot;
            }
            std::thread::yield_now();
        }
    }

    /// Sends a control request to one worker and waits for it. Returns the
    /// outcome and message.
    fn control(
        &self,
        w: &WorkerHandle,
        opcode: u32,
        func: u32,
        payload: &[u8],
    ) -> Result<(Outcome, String), LanguageError> {
        self.control_with(w, opcode, func, payload, u32::from(opcode == op::UNLOAD))
    }

    fn control_evict(&self, w: &WorkerHandle, func: u32) -> Result<(), LanguageError> {
        self.control_with(w, op::UNLOAD, func, &[], 0).map(|_| ())
    }

    fn control_with(
        &self,
        w: &WorkerHandle,
        opcode: u32,
        func: u32,
        payload: &[u8],
        reserved: u32,
    ) -> Result<(Outcome, String), LanguageError> {
        if payload.len() > self.config.input_limit_bytes {
            return Err(LanguageError::Config(
                "control payload longer than the input limit".into(),
            ));
        }
        let slot = self.acquire_on(w);
        if let Some(area) = w.region.input_area(slot)
            && !payload.is_empty()
        {
            // SAFETY: as in `Dispatcher::invoke`: the area is ours and large
            // enough (checked above).
            unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), area, payload.len()) };
        }
        self.bell();
        w.submit(Request {
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            budget_ns: nanos(self.config.init_budget),
            input_len: u64::try_from(payload.len()).unwrap_or(u64::MAX),
            op: opcode,
            func,
            slot,
            reserved,
        });
        let result = w.wait(slot, self.config.idle_spin);
        let out = match result {
            SlotResult::Lost(detail) => Err(LanguageError::WorkerLost { detail }),
            SlotResult::Reply(reply) => match Outcome::from_u32(reply.outcome) {
                Some(o) => Ok((o, read_output(w, slot, &reply, self.config.output_limit_bytes))),
                None => Err(LanguageError::Malformed {
                    detail: format!("outcome {}", reply.outcome),
                }),
            },
        };
        w.release(slot);
        out
    }

    /// Turns a slot's result into the caller's answer.
    fn finish(
        &self,
        w: &WorkerHandle,
        slot: u32,
        result: SlotResult,
        function: &Function,
        t0: u64,
        cold: bool,
    ) -> Result<Completed, LanguageError> {
        let reply = match result {
            SlotResult::Lost(detail) => return Err(LanguageError::WorkerLost { detail }),
            SlotResult::Reply(reply) => reply,
        };
        let Some(outcome) = Outcome::from_u32(reply.outcome) else {
            return Err(LanguageError::Malformed {
                detail: format!("unknown outcome {}", reply.outcome),
            });
        };
        let limit = self.config.output_limit_bytes;
        let message = || read_output(w, slot, &reply, limit);
        match outcome {
            Outcome::Ok => {
                let len = usize::try_from(reply.out_len).unwrap_or(usize::MAX);
                if len > limit || len > w.region.layout().output_area {
                    return Err(LanguageError::Malformed {
                        detail: format!("output length {len}"),
                    });
                }
                let mut output = vec![0u8; len];
                if let (Some(area), true) = (w.region.output_area(slot), len > 0) {
                    // SAFETY: `len` is within the slot's output area (checked
                    // above), which the worker finished writing before it
                    // published the reply we acquired.
                    unsafe { std::ptr::copy_nonoverlapping(area, output.as_mut_ptr(), len) };
                }
                let end = now_ns();
                Ok(Completed {
                    output,
                    cold,
                    start_ns: reply.start_ns,
                    dispatch_ns: reply.entered_ns.saturating_sub(t0),
                    exec_ns: reply.returned_ns.saturating_sub(reply.entered_ns),
                    total_ns: end.saturating_sub(t0),
                })
            }
            Outcome::FunctionError => Err(LanguageError::FunctionFailed { message: message() }),
            Outcome::Panicked => Err(LanguageError::Panicked { message: message() }),
            Outcome::OutOfMemory => Err(LanguageError::OutOfMemory {
                limit_bytes: self.config.heap_limit_bytes,
            }),
            Outcome::StackOverflow => Err(LanguageError::StackOverflow {
                stack_bytes: usize::try_from(reply.detail).unwrap_or(self.config.stack_bytes),
            }),
            Outcome::Preempted => Err(LanguageError::BudgetExceeded {
                budget: function.budget,
            }),
            Outcome::PolicyViolation => Err(LanguageError::PolicyViolation { detail: message() }),
            Outcome::OutputTooLarge => Err(LanguageError::OutputTooLarge {
                len: usize::try_from(reply.detail).unwrap_or(usize::MAX),
                limit,
            }),
            Outcome::InitFailed => Err(LanguageError::InitFailed { message: message() }),
            Outcome::NotLoaded => Err(LanguageError::InitFailed {
                message: format!("not loaded in worker {}: {}", w.index, message()),
            }),
            Outcome::Crashed => Err(LanguageError::Crashed { detail: message() }),
            Outcome::BadRequest => Err(LanguageError::Malformed { detail: message() }),
        }
    }

    /// Starts worker `w` of tenant `g` with `g`'s functions (and no other
    /// tenant's) in its catalog, under `g`'s uid.
    fn spawn(&self, g: &TenantWorkers, w: &WorkerHandle) -> std::io::Result<()> {
        let cores = online_cpus();
        let args = WorkerArgs {
            index: w.index,
            cpu: self.config.pin.then(|| (w.index + 1) % cores),
            sandbox: g.sandbox_arg.clone(),
            ..self.args.clone()
        };
        let catalog: Vec<(CatalogEntry, FunctionCode)> = self
            .functions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(_, f)| std::ptr::eq(&*f.tenant, g))
            .map(|(&i, f)| {
                let entry = self.catalog_entry(i, f, f.resident.load(Ordering::Relaxed));
                (entry, f.code.clone())
            })
            .collect();
        w.spawn(&self.config.worker_bin, &args, &catalog, self.config.start_timeout)
    }

    /// Tells the watchdog work is outstanding (wakes it if it parked).
    fn bell(&self) {
        if self.watchdog_parked.load(Ordering::SeqCst) {
            self.ring_bell();
        }
    }

    /// Makes `budget_ns` the smallest budget if it is, and then wakes the
    /// watchdog (which may be asleep for longer than that).
    fn lower_min_budget(&self, budget_ns: u64) {
        let _g = lock(&self.watchdog_bell.0);
        if self.min_budget_ns.fetch_min(budget_ns, Ordering::SeqCst) > budget_ns {
            self.watchdog_bell.1.notify_all();
        }
    }

    fn ring_bell(&self) {
        let _g = lock(&self.watchdog_bell.0);
        self.watchdog_bell.1.notify_all();
    }
}

/// Best effort: makes the calling thread `SCHED_FIFO` at the lowest
/// real-time priority (without the privilege it stays as it is) and its
/// sleeps precise (1 ns timer slack).
fn raise_priority() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: pthread_self is always valid; the parameter lives on this
    // stack for the call. PR_SET_TIMERSLACK takes an integer only.
    unsafe {
        libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param);
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

/// CPUs online on the host (not the caller's affinity mask: a dispatcher
/// thread pinned to core 0 must still place workers on the other cores).
fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// Pins the calling thread to `cpu` (best effort).
fn pin_current_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and
    // sched_setaffinity (pid 0 = the calling thread) only access that set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The slot's output area as text (a message), at most `limit` bytes.
fn read_output(w: &WorkerHandle, slot: u32, reply: &Reply, limit: usize) -> String {
    let len = usize::try_from(reply.out_len)
        .unwrap_or(0)
        .min(limit)
        .min(w.region.layout().output_area);
    match (w.region.output_area(slot), len) {
        (Some(area), 1..) => {
            // SAFETY: `len` is within the slot's output area, written by the
            // worker before it published `reply`.
            let bytes = unsafe { std::slice::from_raw_parts(area, len) };
            String::from_utf8_lossy(bytes).into_owned()
        }
        _ => String::new(),
    }
}

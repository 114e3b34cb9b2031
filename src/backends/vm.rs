//! The `vm` backend adapter: maps the `vmm` crate's micro-VM instances onto
//! the [`Backend`] trait. Each deployed function keeps a pool of idle,
//! initialised instances (one function per instance). `deploy` makes (or
//! finds) the function's snapshot node; an invocation resumes an argument
//! snapshot (`argument`), takes an idle instance (`hot`), or restores the
//! function snapshot (`function`); `base` (restore the booted guest, load,
//! init) and `cold` (boot, load, init) are there to be forced. Instances go
//! back to the pool unless they died; torn-down instances are dropped on a
//! reaper thread, off the request path (teardown is slow on this host).
//!
//! Instances that serve requests (function and argument restores,
//! prestarts, the hot pool) run in VMM host processes (`hosts`: per tenant,
//! at most `vm.vms_per_host` VMs each, a function's instances packed where
//! its node is registered); instances that make snapshots (the base and
//! function nodes, argument snapshots) and forced `cold`/`base` starts run
//! in this process: saving a VM and reading its memory need it here, and
//! they are few. A remote instance that stops at a new input's checkpoint
//! is resumed at once and the argument snapshot made here afterwards.
//!
//! `reset`: a function deployed `fresh_per_request` never serves two
//! requests from one instance state. When a request gives its instance
//! back, a reset to the function node is queued on the instance's runner
//! (`vmm::Instance::begin_reset`: the pages it wrote get the node's bytes
//! again, its I/O window is zeroed, its mailbox and registers are the
//! node's); the next request waits for that reset (`StartPath::Reset`,
//! usually done by then) instead of taking the instance `hot`. An instance
//! that cannot be reset is dropped and a fresh one restored.
//! `Force(Reset)` resets an idle instance of any function on the request
//! path.

use super::vm_snapshots::{ArgumentCache, Restorable, Snapshots, input_hash, mapping_of, private_bytes};
use crate::{
    Artifact, Backend, BackendKind, Config, Error, FunctionId, FunctionSpec, Invocation, StartPath, StartRequest,
    Stats, Timings,
};
use snapshots::{Label, Level, NodeId};

mod arguments;
mod errors;
mod hosts;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use vmm::{Instance, InstanceConfig, LayoutConfig, RunError, Shell, Status, Vmm, VmmError};

/// Default size of the function image region.
const DEFAULT_IMAGE_MIB: usize = 8;
/// Default idle instances kept per function.
const DEFAULT_IDLE_PER_FUNCTION: usize = 16;
/// Default number of pre-created VM shells.
const DEFAULT_SHELL_POOL: usize = 4;

/// How long no `invoke` may have run before the reaper makes a shell
/// for this process's pool: making one (`KVM_CREATE_VM`, which walks the
/// process's mappings to register KVM's MMU notifier, its vCPU and memory
/// slots) while a start runs stalls that start. Measured with
/// `vm_reset_bench` (`vms_per_host` 0, back-to-back starts): refilling after
/// every start gave function starts of 1.44 ms median and 18.3 ms p99,
/// making each start's VM inline 0.83 ms and 1.6 ms. Back-to-back starts
/// thus make their own VMs; a start after a pause finds one made.
const SHELL_REFILL_QUIET: Duration = Duration::from_millis(5);
/// Default argument snapshots kept per function.
const DEFAULT_ARGUMENTS_PER_FUNCTION: usize = 8;
/// Default VMs per VMM host process. Every VM of a process registers an MMU
/// notifier on its address space: `KVM_CREATE_VM` walks all its mappings
/// and every copy-on-write fault (a restored guest's first writes) calls
/// every VM's notifier, so a start costs more as its process fills. Here
/// (`examples/vm_shard_bench.rs`, 10,000 idle instances) a `function`
/// start took 2.7 ms median with 2,048 per process, 0.96 ms with 512 (as
/// with 10 idle); 512 also keeps 50,000 instances to ~100 processes.
const DEFAULT_VMS_PER_HOST: usize = 512;
/// Default runner threads per VMM host process. Measured here
/// (`examples/vm_shard_bench.rs`, hot noop total p50): 84 us with one
/// runner, 152 us with two and 133 us with three (round robin), 155 us
/// with two and sticky placement; in this process 73-81 us. So one: the
/// hot path keeps its figure. A long request does not hold up the other
/// instances of its host process: once every runner has been busy for
/// 1 ms, the pool grows (to about one runner per core plus one; grown
/// runners end after 2 s idle; `vmm::runner::GROW_AFTER`).
const DEFAULT_HOST_RUNNERS: usize = 1;

/// Opens the `vm` backend.
pub fn open(config: Config) -> Result<Box<dyn Backend>, Error> {
    let vmm = Vmm::new().map_err(|e| match e {
        VmmError::KvmUnavailable(source) => Error::KvmUnavailable {
            detail: format!("opening /dev/kvm: {source}"),
        },
        other => Error::KvmUnavailable {
            detail: error_chain(&other),
        },
    })?;
    let instance = instance_config(&config)?;
    let mut vmm = vmm;
    // Instances in this process find a reset's written pages in one ioctl
    // (a VMM host process's seccomp filter allows only KVM's ioctls: its
    // resets read the pagemap).
    vmm.use_pagemap_scan();
    let vmm = Arc::new(vmm);
    let shells = Arc::new(Mutex::new(Vec::new()));
    let shell_target = config.vm.shell_pool.unwrap_or(DEFAULT_SHELL_POOL);
    let (reaper, chores) = mpsc::channel::<Chore>();
    let last_invoke = Arc::new(AtomicU64::new(0));
    let invokes_running = Arc::new(AtomicUsize::new(0));
    let (pool_vmm, pool, shell_config) = (Arc::clone(&vmm), Arc::clone(&shells), instance);
    let (last, running) = (Arc::clone(&last_invoke), Arc::clone(&invokes_running));
    std::thread::Builder::new()
        .name("vm-reaper".into())
        .spawn(move || {
            // Teardown and shell creation, both off the start path; a shell
            // only once no invocation has started for SHELL_REFILL_QUIET.
            let quiet_ns = u64::try_from(SHELL_REFILL_QUIET.as_nanos()).unwrap_or(u64::MAX);
            let short = || {
                pool.lock()
                    .map(|p: std::sync::MutexGuard<'_, Vec<Shell>>| p.len() < shell_target)
                    .unwrap_or(false)
            };
            let mut refill_pending = true;
            loop {
                let chore = if refill_pending {
                    let since = if running.load(Ordering::Relaxed) > 0 {
                        0
                    } else {
                        vmm::now_ns().saturating_sub(last.load(Ordering::Relaxed))
                    };
                    if since >= quiet_ns {
                        if short()
                            && let Ok(shell) = Shell::with_memory(&pool_vmm, &shell_config)
                        {
                            if let Ok(mut p) = pool.lock() {
                                p.push(shell);
                            }
                        } else {
                            refill_pending = false;
                        }
                        continue;
                    }
                    match chores.recv_timeout(Duration::from_nanos(quiet_ns - since)) {
                        Ok(chore) => chore,
                        Err(mpsc::RecvTimeoutError::Timeout) => continue,
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                } else {
                    match chores.recv() {
                        Ok(chore) => chore,
                        Err(_) => break,
                    }
                };
                match chore {
                    Chore::Reap(instances) => drop(instances),
                    Chore::Refill => refill_pending = true,
                }
            }
        })
        .map_err(|e| Error::io("spawning the vm reaper thread", e))?;
    let vms_per_host = config.vm.vms_per_host.unwrap_or(DEFAULT_VMS_PER_HOST);
    let caller_spin = Duration::from_micros(u64::from(
        config.vm.caller_spin_us.unwrap_or(hosts::DEFAULT_CALLER_SPIN_US),
    ));
    let hosts = if vms_per_host == 0 {
        None
    } else {
        let runners = config.vm.host_runners.unwrap_or(DEFAULT_HOST_RUNNERS);
        let settings = hosts::HostSettings {
            binary: config
                .vm
                .host_binary
                .clone()
                .unwrap_or_else(|| std::path::PathBuf::from(env!("MICROFAAS_VMHOST_BIN"))),
            vms_per_host,
            runners,
            sandbox: config.sandbox.settings(),
            reply_timeout: config
                .vm
                .host_reply_timeout_ms
                .map_or(hosts::DEFAULT_REPLY_TIMEOUT, std::time::Duration::from_millis),
            poll_us: config.vm.host_poll_us.unwrap_or(hosts::DEFAULT_HOST_POLL_US),
            // As many as this process keeps, at most 2 per host process
            // (each is a VM: an MMU notifier in its address space).
            shells: shell_target.min(2),
            idle_exit: config
                .vm
                .host_idle_exit_ms
                .map_or(hosts::DEFAULT_IDLE_EXIT, std::time::Duration::from_millis),
        };
        Some(hosts::Hosts::new(settings, instance)?)
    };
    let snapshots = Snapshots::open(
        config.vm.store_dir.clone(),
        &instance,
        config
            .vm
            .arguments_per_function
            .unwrap_or(DEFAULT_ARGUMENTS_PER_FUNCTION),
    )?;
    Ok(Box::new(VmBackend {
        vmm,
        hosts,
        shells,
        snapshots,
        instance,
        idle_cap: config.vm.idle_per_function.unwrap_or(DEFAULT_IDLE_PER_FUNCTION),
        config,
        functions: RwLock::new(HashMap::new()),
        reaper: Mutex::new(reaper),
        last_invoke,
        invokes_running,
        caller_spin,
        cpus: std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        counters: Counters::default(),
    }))
}

/// The instance sizes for `config`.
fn instance_config(config: &Config) -> Result<InstanceConfig, Error> {
    let bad = |reason: String| Error::BackendUnavailable {
        backend: BackendKind::Vm,
        reason,
    };
    let to_u64 = |v: usize| u64::try_from(v).map_err(|_| bad("size out of range".to_owned()));
    let image_bytes = config
        .vm
        .image_mib
        .unwrap_or(DEFAULT_IMAGE_MIB)
        .checked_mul(1 << 20)
        .ok_or_else(|| bad("image size out of range".to_owned()))?;
    let mut heap_bytes = config.heap_limit_bytes;
    if let Some(mib) = config.vm.guest_mem_mib {
        let round = |v: usize| v.next_multiple_of(2 << 20);
        // Besides heap, stack, I/O window and image: the system area and
        // the kernel, below the stack chunk.
        let system = usize::try_from(vmm::layout::SYSTEM_AND_KERNEL_BYTES).unwrap_or(usize::MAX);
        let fixed = system
            + round(config.stack_bytes + (64 << 10))
            + round(config.input_limit_bytes.max(config.output_limit_bytes))
            + round(image_bytes);
        let total = mib
            .checked_mul(1 << 20)
            .ok_or_else(|| bad("guest memory out of range".to_owned()))?;
        let room = total.saturating_sub(fixed);
        if room < (2 << 20) {
            return Err(bad(format!(
                "guest_mem_mib = {mib} leaves no room for a heap (needs > {} MiB)",
                fixed >> 20
            )));
        }
        heap_bytes = heap_bytes.min(room);
    }
    Ok(InstanceConfig {
        layout: LayoutConfig {
            stack_bytes: to_u64(config.stack_bytes)?,
            // Inputs arrive and outputs leave through the I/O window (the
            // host reads a reply only from there): room for the larger.
            io_bytes: to_u64(config.input_limit_bytes.max(config.output_limit_bytes).max(1))?,
            image_bytes: to_u64(image_bytes)?,
            heap_bytes: to_u64(heap_bytes)?,
        },
        output_limit_bytes: to_u64(config.output_limit_bytes)?,
        idle_spin_us: config.vm.hot_spin_us.unwrap_or(0),
        // Nothing here reads vCPU statistics: save the fd per instance.
        vcpu_stats: false,
        ..InstanceConfig::default()
    })
}

#[derive(Debug, Default)]
struct Counters {
    cold: AtomicU64,
    base: AtomicU64,
    function: AtomicU64,
    argument: AtomicU64,
    hot: AtomicU64,
    reset: AtomicU64,
    prestarted: AtomicU64,
    argument_nodes: AtomicU64,
    snapshot_failures: AtomicU64,
    discarded: AtomicU64,
    busy: AtomicU64,
    /// Restores in this process that found a VM shell made in advance.
    shells_taken: AtomicU64,
}

/// An idle instance and the node its memory maps (`None`: booted).
#[derive(Debug)]
struct Pooled {
    instance: Instance,
    origin: Option<NodeId>,
    /// It served a request since it was restored or reset.
    used: bool,
}

#[derive(Debug)]
struct Function {
    name: String,
    tenant: String,
    artifact: Arc<Artifact>,
    /// Its module, handed to the artifact's `load` (`FunctionSpec::module`).
    module: Option<Arc<[u8]>>,
    /// `FunctionSpec::code_digest`: keys its function and argument nodes.
    digest: String,
    budget: Duration,
    /// Every request gets an instance with nothing of an earlier one
    /// (`FunctionSpec::fresh_per_request`): used instances are reset.
    fresh: bool,
    /// The function snapshot.
    node: Arc<Restorable>,
    /// Its argument snapshots in use, by input hash.
    arguments: ArgumentCache,
    /// Whether it has (or had) argument snapshots: until it does, inputs
    /// are not hashed to look them up.
    has_arguments: AtomicBool,
    idle: Mutex<Vec<Pooled>>,
    /// Idle instances kept for this function beyond the backend's idle cap:
    /// the pool size the last `prestart` reached (0 after `evict`).
    reserved: AtomicUsize,
}

/// Work for the reaper thread.
#[derive(Debug)]
/// An `invoke` in progress, for the reaper's quiet period: counted while it
/// lives (no shell is made meanwhile), and its end time recorded when it
/// drops.
struct Running<'a> {
    running: &'a AtomicUsize,
    last: &'a AtomicU64,
}

impl<'a> Running<'a> {
    fn enter(running: &'a AtomicUsize, last: &'a AtomicU64) -> Self {
        running.fetch_add(1, Ordering::Relaxed);
        Self { running, last }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.last.store(vmm::now_ns(), Ordering::Relaxed);
        self.running.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Chore {
    /// Tear these instances down.
    Reap(Vec<Instance>),
    /// Top the shell pool up.
    Refill,
}

#[derive(Debug)]
struct VmBackend {
    vmm: Arc<Vmm>,
    /// The VMM host processes (`None`: every instance in this process).
    hosts: Option<hosts::Hosts>,
    /// Pre-created VM shells for restores (refilled by the reaper thread).
    shells: Arc<Mutex<Vec<Shell>>>,
    snapshots: Snapshots,
    config: Config,
    instance: InstanceConfig,
    idle_cap: usize,
    functions: RwLock<HashMap<String, Arc<Function>>>,
    reaper: Mutex<Sender<Chore>>,
    /// `vmm::now_ns()` when the last `invoke` ended, and the
    /// invocations running (the reaper makes shells only when none runs and
    /// none has for [`SHELL_REFILL_QUIET`]).
    last_invoke: Arc<AtomicU64>,
    invokes_running: Arc<AtomicUsize>,
    /// How long a caller of an instance in a host process polls for its
    /// reply before it sleeps, when it has a core to spare
    /// (`vm.caller_spin_us`; see [`VmBackend::reply_spin`]).
    caller_spin: Duration,
    /// Online CPUs.
    cpus: usize,
    counters: Counters,
}

pub(crate) use crate::error_chain;

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl VmBackend {
    /// How long this request's caller polls for its reply before it sleeps:
    /// `vm.caller_spin_us` when it is the only invocation running and
    /// another CPU is there for the runner; else 0. Polling saves the wake
    /// on the reply (a cross-core wake of a sleeping thread costs tens of
    /// microseconds on this host), but callers that poll while others'
    /// requests run would take the CPUs their runners need.
    fn reply_spin(&self) -> Duration {
        if self.cpus > 1 && self.invokes_running.load(Ordering::Relaxed) <= 1 {
            self.caller_spin
        } else {
            Duration::ZERO
        }
    }

    fn function(&self, id: &FunctionId) -> Result<Arc<Function>, Error> {
        self.functions
            .read()
            .map_err(|_| poisoned())?
            .get(id.name())
            .cloned()
            .ok_or_else(|| Error::UnknownFunction {
                name: id.name().to_owned(),
            })
    }

    fn reap(&self, instances: Vec<Instance>) {
        if instances.is_empty() {
            return;
        }
        let sent = self.reaper.lock().map(|r| r.send(Chore::Reap(instances)));
        // If the reaper is gone, the instances were dropped right here.
        drop(sent);
    }

    /// A pre-created VM shell, if one is ready. The pool is refilled after
    /// the invocation ([`VmBackend::refill_shells`]) once invocations pause
    /// ([`SHELL_REFILL_QUIET`]), so that making shells does not compete
    /// with a start.
    fn take_shell(&self) -> Option<Shell> {
        let shell = self.shells.lock().ok()?.pop();
        if shell.is_some() {
            self.counters.shells_taken.fetch_add(1, Ordering::Relaxed);
        }
        shell
    }

    /// Asks the reaper thread to top the shell pool up.
    fn refill_shells(&self) {
        if let Ok(r) = self.reaper.lock() {
            let _ = r.send(Chore::Refill);
        }
    }

    /// Boots a fresh instance (no function loaded).
    fn boot_instance(&self) -> Result<Instance, Error> {
        let (instance, _timings) = Instance::boot(&self.vmm, &self.instance).map_err(|e| match e {
            VmmError::KvmUnavailable(_) => Error::KvmUnavailable {
                detail: error_chain(&e),
            },
            other => Error::Crashed {
                name: String::new(),
                detail: format!("booting the micro-VM: {}", error_chain(&other)),
            },
        })?;
        Ok(instance)
    }

    /// Boots an instance and loads `f` into it (a cold start's work).
    fn start_cold(&self, f: &Function) -> Result<Instance, Error> {
        let instance = self.boot_instance()?;
        let instance = self.load_into(&f.name, &f.artifact, instance)?;
        match &f.module {
            None => Ok(instance),
            Some(module) => self.module_into(&f.name, &f.artifact, module, instance),
        }
    }

    /// The `base` start: restores the base snapshot and loads `artifact`
    /// into it; with a module, restores the runtime base of `artifact` (the
    /// artifact loaded and initialised, no module yet) and hands it the
    /// module.
    fn start_base(&self, name: &str, artifact: &Artifact, module: Option<&[u8]>) -> Result<Instance, Error> {
        let Some(module) = module else {
            let base = self.snapshots.base(|| self.boot_instance())?;
            let instance = self
                .snapshots
                .restore(&self.vmm, self.take_shell(), &self.instance, &base)?;
            return self.load_into(name, artifact, instance);
        };
        let base = self.runtime_base(name, artifact)?;
        let instance = self
            .snapshots
            .restore(&self.vmm, self.take_shell(), &self.instance, &base)?;
        self.module_into(name, artifact, module, instance)
    }

    /// The runtime base of `artifact`: a base node of a booted guest with
    /// `artifact` loaded and its `init()` run, taken once per artifact (the
    /// first function deployed on it pays for it).
    fn runtime_base(&self, name: &str, artifact: &Artifact) -> Result<Arc<Restorable>, Error> {
        self.snapshots.runtime_base(artifact, || {
            let instance = self.boot_instance()?;
            self.load_into(name, artifact, instance)
        })
    }

    /// Hands `module` to the `load` of `artifact`, loaded into `instance`
    /// just before (here or in the node it was restored from).
    fn module_into(
        &self,
        name: &str,
        artifact: &Artifact,
        module: &[u8],
        mut instance: Instance,
    ) -> Result<Instance, Error> {
        let deadline = Instant::now() + self.config.init_budget;
        let result = match instance.load_module(artifact.bytes(), module, deadline) {
            Ok(reply) if reply.status == Status::Ok => Ok(()),
            Ok(reply) if reply.status == Status::InitFailed => Err(Error::InitFailed {
                name: name.to_owned(),
                message: format!("load(module): {}", String::from_utf8_lossy(&reply.data)),
            }),
            Ok(reply) => Err(self.reply_error(name, &instance, reply.status, &reply.data, true)),
            Err(RunError::Load(e)) => Err(Error::InitFailed {
                name: name.to_owned(),
                message: format!("its module cannot be mapped: {}", error_chain(&e)),
            }),
            Err(RunError::BudgetExceeded) => Err(Error::InitFailed {
                name: name.to_owned(),
                message: format!(
                    "load(module) exceeded its budget of {} ms",
                    self.config.init_budget.as_millis()
                ),
            }),
            Err(e) => Err(match self.run_error(name, &instance, e, self.config.init_budget) {
                Error::Crashed { name, detail } => Error::InitFailed {
                    name,
                    message: format!("load(module) crashed: {detail}"),
                },
                other => other,
            }),
        };
        match result {
            Ok(()) => Ok(instance),
            Err(e) => {
                self.counters.discarded.fetch_add(1, Ordering::Relaxed);
                self.reap(vec![instance]);
                Err(e)
            }
        }
    }

    /// Loads `artifact` into an idle instance and runs its `init()`.
    fn load_into(&self, name: &str, artifact: &Artifact, mut instance: Instance) -> Result<Instance, Error> {
        let deadline = Instant::now() + self.config.init_budget;
        let loaded = instance.load(artifact.bytes(), deadline);
        let result = match loaded {
            Ok(reply) => match reply.status {
                Status::Ok => Ok(()),
                Status::LoadFailed => Err(Error::InvalidArtifact {
                    path: artifact.path().to_owned(),
                    reason: format!("the guest loader refused it: {}", String::from_utf8_lossy(&reply.data)),
                }),
                _ => Err(self.reply_error(name, &instance, reply.status, &reply.data, true)),
            },
            Err(RunError::Load(e)) => Err(Error::InvalidArtifact {
                path: artifact.path().to_owned(),
                reason: format!("the vm loader refused it: {}", error_chain(&e)),
            }),
            Err(RunError::BudgetExceeded) => Err(Error::InitFailed {
                name: name.to_owned(),
                message: format!(
                    "init() exceeded its budget of {} ms",
                    self.config.init_budget.as_millis()
                ),
            }),
            Err(e) => Err(match self.run_error(name, &instance, e, self.config.init_budget) {
                Error::Crashed { name, detail } => Error::InitFailed {
                    name,
                    message: format!("crashed: {detail}"),
                },
                other => other,
            }),
        };
        match result {
            Ok(()) => Ok(instance),
            Err(e) => {
                self.counters.discarded.fetch_add(1, Ordering::Relaxed);
                self.reap(vec![instance]);
                Err(e)
            }
        }
    }

    /// Restores `node` as an instance serving `tenant`'s requests: in a
    /// VMM host process of the tenant (or here, without host processes).
    fn restore(&self, tenant: &str, node: &Restorable) -> Result<Pooled, Error> {
        let Some(hosts) = &self.hosts else {
            return self.restore_local(node);
        };
        Ok(Pooled {
            instance: hosts.restore(tenant, node)?,
            origin: Some(node.id),
            used: false,
        })
    }

    /// Restores `node` in this process (an instance that makes snapshots:
    /// saving and reading its memory need its VM here).
    fn restore_local(&self, node: &Restorable) -> Result<Pooled, Error> {
        let instance = self
            .snapshots
            .restore(&self.vmm, self.take_shell(), &self.instance, node)?;
        Ok(Pooled {
            instance,
            origin: Some(node.id),
            used: false,
        })
    }

    /// Resets an idle instance of `f`'s function node to that node (the
    /// `reset` start); an instance that cannot be reset, or whose reset
    /// fails, is discarded and `None` returned.
    fn reset_instance(&self, f: &Function, mut p: Pooled) -> Option<Pooled> {
        if p.origin == Some(f.node.id) && (p.instance.reset_pending() || p.instance.can_reset()) {
            let deadline = Instant::now() + f.budget.max(Duration::from_secs(1));
            if p.instance.reset(deadline).is_ok() {
                p.used = false;
                return Some(p);
            }
        }
        self.counters.discarded.fetch_add(1, Ordering::Relaxed);
        self.reap(vec![p.instance]);
        None
    }
}

pub(crate) fn poisoned() -> Error {
    Error::io(
        "vm backend state",
        std::io::Error::other("a lock was poisoned by a panicking thread"),
    )
}

impl Backend for VmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Vm
    }

    fn deploy(&self, spec: &FunctionSpec) -> Result<FunctionId, Error> {
        let id = FunctionId::new(&spec.name);
        let budget = spec.budget.unwrap_or(self.config.default_budget);
        // Redeploying the same artifact with the same budget keeps its
        // instances.
        if let Ok(existing) = self.function(&id)
            && existing.digest == spec.code_digest()
            && existing.budget == budget
            && existing.fresh == spec.fresh_per_request
        {
            return Ok(id);
        }
        // The function snapshot: found by name + artifact digest, or made
        // now from the base (a bad artifact or a failing init() surfaces
        // here). A changed artifact gets a new node; the old one is left
        // to `snapshots gc`.
        // A function with a module hangs off its artifact's runtime base.
        let base = match &spec.module {
            None => self.snapshots.base(|| self.boot_instance())?,
            Some(_) => self.runtime_base(&spec.name, &spec.artifact)?,
        };
        let digest = spec.code_digest();
        let digest = digest.as_str();
        // A refused function node (its state, or KVM refusing it) is made
        // anew from the base, as if it were missing.
        let (node, first) = loop {
            let found = self.snapshots.find_function(base.id, &spec.name, digest);
            let node_id = match found {
                Some(node) => node,
                None => {
                    let mut instance = self.start_base(&spec.name, &spec.artifact, spec.module.as_deref())?;
                    let made = self.snapshots.create_child(
                        &mut instance,
                        base.id,
                        Level::Function,
                        Label::function(&spec.name, digest),
                    );
                    self.reap(vec![instance]);
                    made?
                }
            };
            // One idle instance now, so that the first invocation is hot.
            let ready = self
                .snapshots
                .restorable(node_id, Level::Function)
                .and_then(|node| self.restore(spec.tenant.as_str(), &node).map(|first| (node, first)));
            match ready {
                Ok(ready) => break ready,
                Err(e @ Error::SnapshotCorrupt { .. }) if found.is_some() => self.snapshots.refuse(node_id, &e),
                Err(e) => return Err(e),
            }
        };
        let has_arguments = AtomicBool::new(self.snapshots.has_arguments(node.id));
        let f = Arc::new(Function {
            name: spec.name.clone(),
            tenant: spec.tenant.as_str().to_owned(),
            artifact: Arc::clone(&spec.artifact),
            module: spec.module.clone(),
            digest: digest.to_owned(),
            budget,
            fresh: spec.fresh_per_request,
            node,
            arguments: Mutex::new(HashMap::new()),
            has_arguments,
            idle: Mutex::new(vec![first]),
            reserved: AtomicUsize::new(0),
        });
        let old = self
            .functions
            .write()
            .map_err(|_| poisoned())?
            .insert(spec.name.clone(), f);
        if let Some(old) = old {
            let idle = std::mem::take(&mut *old.idle.lock().map_err(|_| poisoned())?);
            self.reap(idle.into_iter().map(|p| p.instance).collect());
        }
        self.refill_shells();
        Ok(id)
    }

    fn invoke(&self, id: &FunctionId, input: &[u8], start: StartRequest) -> Result<Invocation, Error> {
        let invoked = Instant::now();
        let invoked_ns = vmm::now_ns();
        let _running = Running::enter(&self.invokes_running, &self.last_invoke);
        let f = self.function(id)?;
        if input.len() > self.config.input_limit_bytes {
            return Err(Error::InputTooLarge {
                len: input.len(),
                limit: self.config.input_limit_bytes,
            });
        }
        // Inputs are hashed only for functions with argument snapshots.
        let hash = |f: &Function| input_hash(&f.digest, input);
        let known = if f.has_arguments.load(Ordering::Relaxed) {
            self.argument_node(&f, &hash(&f))?
        } else {
            None
        };
        // Prefer an idle instance on the function snapshot: only those can
        // write an argument snapshot of a new input at its checkpoint.
        let take_idle = || {
            let mut lost = Vec::new();
            let taken = f
                .idle
                .lock()
                .map(|mut idle| {
                    loop {
                        let at = idle.iter().rposition(|p| p.origin == Some(f.node.id));
                        let p = match at {
                            Some(i) => Some(idle.swap_remove(i)),
                            None => idle.pop(),
                        };
                        match p {
                            // An instance of a host process that died is gone.
                            Some(p) if !p.instance.is_alive() => lost.push(p.instance),
                            other => break other,
                        }
                    }
                })
                .map_err(|_| poisoned());
            if !lost.is_empty() {
                self.counters
                    .discarded
                    .fetch_add(u64::try_from(lost.len()).unwrap_or(0), Ordering::Relaxed);
                self.reap(lost);
            }
            taken
        };
        let booted = |instance| Pooled {
            instance,
            origin: None,
            used: false,
        };
        let measured = |p: Pooled, path| (p, path, ns(invoked.elapsed()), invoked, invoked_ns);
        let unmeasured = |p: Pooled, path| (p, path, 0, Instant::now(), vmm::now_ns());
        let (mut pooled, path, start_ns, invoked, invoked_ns) = match start {
            StartRequest::Auto => {
                // An argument node that cannot be restored (KVM refusing
                // its state) is refused and the function node used instead.
                let from_argument = match &known {
                    Some(arg) => {
                        self.snapshots.touch(arg.id);
                        match self.restore(&f.tenant, arg) {
                            Ok(p) => Some(p),
                            Err(e @ Error::SnapshotCorrupt { .. }) => {
                                self.snapshots.refuse(arg.id, &e);
                                f.arguments
                                    .lock()
                                    .map_err(|_| poisoned())?
                                    .retain(|_, r| r.id != arg.id);
                                None
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    None => None,
                };
                let idle = match take_idle()? {
                    // Isolation between requests: a used instance is reset
                    // first (or, if it cannot be, a fresh one restored).
                    Some(p) if f.fresh && (p.used || p.instance.reset_pending()) => {
                        self.reset_instance(&f, p).map(|p| (p, true))
                    }
                    other => other.map(|p| (p, false)),
                };
                if let Some(p) = from_argument {
                    measured(p, StartPath::Argument)
                } else if let Some((p, reset)) = idle {
                    if reset {
                        measured(p, StartPath::Reset)
                    } else {
                        (p, StartPath::Hot, 0, invoked, invoked_ns)
                    }
                } else {
                    measured(self.restore(&f.tenant, &f.node)?, StartPath::Function)
                }
            }
            StartRequest::Force(StartPath::Cold) => measured(booted(self.start_cold(&f)?), StartPath::Cold),
            StartRequest::Force(StartPath::Base) => measured(
                booted(self.start_base(&f.name, &f.artifact, f.module.as_deref())?),
                StartPath::Base,
            ),
            StartRequest::Force(StartPath::Function) => {
                measured(self.restore(&f.tenant, &f.node)?, StartPath::Function)
            }
            StartRequest::Force(StartPath::Argument) => {
                let arg = match &known {
                    Some(arg) => Some(Arc::clone(arg)),
                    // Make it first, outside the measured time: a run from
                    // the function snapshot that stops at checkpoint().
                    None => self.make_argument(&f, input)?,
                };
                let Some(arg) = arg else {
                    return Err(Error::UnsupportedStart {
                        backend: BackendKind::Vm,
                        start: StartPath::Argument,
                    });
                };
                self.snapshots.touch(arg.id);
                let (t, t_ns) = (Instant::now(), vmm::now_ns());
                let p = self.restore(&f.tenant, &arg)?;
                (p, StartPath::Argument, ns(t.elapsed()), t, t_ns)
            }
            StartRequest::Force(StartPath::Reset) => {
                // An instance of the function node, used or not (made
                // first, outside the measured time, if none is idle).
                let p = match take_idle()? {
                    Some(p)
                        if p.origin == Some(f.node.id) && (p.instance.reset_pending() || p.instance.can_reset()) =>
                    {
                        p
                    }
                    Some(other) => {
                        self.give_back(&f, other)?;
                        self.restore(&f.tenant, &f.node)?
                    }
                    None => self.restore(&f.tenant, &f.node)?,
                };
                let (t, t_ns) = (Instant::now(), vmm::now_ns());
                let Some(p) = self.reset_instance(&f, p) else {
                    return Err(Error::Crashed {
                        name: f.name.clone(),
                        detail: "resetting the instance to its function snapshot failed".to_owned(),
                    });
                };
                (p, StartPath::Reset, ns(t.elapsed()), t, t_ns)
            }
            StartRequest::Force(StartPath::Hot) => match take_idle()? {
                Some(p) => (p, StartPath::Hot, 0, invoked, invoked_ns),
                // Make an instance to be hot, outside the measured time.
                None => unmeasured(self.restore(&f.tenant, &f.node)?, StartPath::Hot),
            },
            StartRequest::Force(other) => {
                return Err(Error::UnsupportedStart {
                    backend: BackendKind::Vm,
                    start: other,
                });
            }
        };
        let counter = match path {
            StartPath::Cold => &self.counters.cold,
            StartPath::Base => &self.counters.base,
            StartPath::Function => &self.counters.function,
            StartPath::Argument => &self.counters.argument,
            StartPath::Reset => &self.counters.reset,
            _ => &self.counters.hot,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        // Only an instance whose memory maps the function snapshot can
        // write a child of it; argument starts already have theirs.
        let capture = pooled.origin == Some(f.node.id)
            && known.is_none()
            && path != StartPath::Argument
            && self.snapshots.arguments_per_function > 0;
        self.counters.busy.fetch_add(1, Ordering::Relaxed);
        let mut checkpointed = false;
        let result = self.run(&f, &mut pooled, input, capture, &mut checkpointed);
        pooled.used = true;
        self.counters.busy.fetch_sub(1, Ordering::Relaxed);
        let instance = &pooled.instance;
        let outcome = match result {
            Ok(reply) if reply.status == Status::Ok => {
                // A resumed argument snapshot entered the function before it
                // was saved: count its run from this invocation.
                let entered_ns = if path == StartPath::Argument {
                    reply.entered_ns.max(invoked_ns)
                } else {
                    reply.entered_ns
                };
                let timings = Timings {
                    start_ns,
                    dispatch_ns: entered_ns.saturating_sub(invoked_ns),
                    exec_ns: reply.returned_ns.saturating_sub(entered_ns),
                    total_ns: ns(invoked.elapsed()),
                };
                Ok(Invocation {
                    output: reply.data,
                    start: path,
                    timings,
                })
            }
            Ok(reply) => Err(self.reply_error(&f.name, instance, reply.status, &reply.data, false)),
            Err(e) => Err(self.run_error(&f.name, instance, e, f.budget)),
        };
        self.give_back(&f, pooled)?;
        // A remote instance stopped at the checkpoint of a new input: its
        // argument snapshot is made here (after the reply, not timed).
        if checkpointed && outcome.is_ok() {
            let _ = self.make_argument(&f, input);
        }
        if path != StartPath::Hot {
            self.refill_shells();
        }
        outcome
    }

    fn evict(&self, id: &FunctionId) -> Result<(), Error> {
        let f = self.function(id)?;
        let mut pool = f.idle.lock().map_err(|_| poisoned())?;
        f.reserved.store(0, Ordering::Relaxed);
        let idle = std::mem::take(&mut *pool);
        drop(pool);
        self.reap(idle.into_iter().map(|p| p.instance).collect());
        Ok(())
    }

    fn prestart(&self, id: &FunctionId, count: usize) -> Result<Vec<Duration>, Error> {
        let f = self.function(id)?;
        let mut took = Vec::with_capacity(count);
        for _ in 0..count {
            let started = Instant::now();
            let pooled = self.restore(&f.tenant, &f.node)?;
            took.push(started.elapsed());
            let mut idle = f.idle.lock().map_err(|_| poisoned())?;
            idle.push(pooled);
            f.reserved.fetch_max(idle.len(), Ordering::Relaxed);
            drop(idle);
            self.counters.prestarted.fetch_add(1, Ordering::Relaxed);
            self.refill_shells();
        }
        Ok(took)
    }

    fn stats(&self) -> Stats {
        let functions = self
            .functions
            .read()
            .map(|m| m.values().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        let mut instances = 0usize;
        let mut memory_bytes = 0u64;
        let mut restored = 0u64;
        let mut restored_private = 0u64;
        for f in &functions {
            if let Ok(idle) = f.idle.lock() {
                instances += idle.len();
                let mappings: Vec<_> = idle.iter().filter_map(|p| mapping_of(&p.instance)).collect();
                let private: u64 = private_bytes(&mappings).iter().sum();
                let remote = idle.iter().filter(|p| p.instance.is_remote()).count();
                restored += u64::try_from(mappings.len() + remote).unwrap_or(u64::MAX);
                restored_private += private;
                memory_bytes += private;
                memory_bytes += idle
                    .iter()
                    .filter(|p| mapping_of(&p.instance).is_none())
                    .map(|p| p.instance.resident_bytes())
                    .sum::<u64>();
            }
        }
        let busy = self.counters.busy.load(Ordering::Relaxed);
        let (host_list, (host_threads, host_private)) = match &self.hosts {
            Some(h) => (h.list(), h.usage()),
            None => (Vec::new(), (0, 0)),
        };
        memory_bytes += host_private;
        restored_private += host_private;
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            functions: functions.len(),
            instances: instances + usize::try_from(busy).unwrap_or(0),
            memory_bytes,
            extra: vec![
                ("cold_starts".to_owned(), load(&c.cold)),
                ("base_starts".to_owned(), load(&c.base)),
                ("function_starts".to_owned(), load(&c.function)),
                ("argument_starts".to_owned(), load(&c.argument)),
                ("hot_starts".to_owned(), load(&c.hot)),
                ("reset_starts".to_owned(), load(&c.reset)),
                ("instances_prestarted".to_owned(), load(&c.prestarted)),
                ("argument_snapshots_made".to_owned(), load(&c.argument_nodes)),
                ("snapshot_failures".to_owned(), load(&c.snapshot_failures)),
                (
                    "snapshot_files_refused".to_owned(),
                    self.snapshots.files_refused.load(Ordering::Relaxed),
                ),
                ("instances_discarded".to_owned(), load(&c.discarded)),
                ("instances_busy".to_owned(), busy),
                ("restored_idle_instances".to_owned(), restored),
                ("restored_idle_private_bytes".to_owned(), restored_private),
                (
                    "vm_host_processes".to_owned(),
                    u64::try_from(host_list.len()).unwrap_or(u64::MAX),
                ),
                (
                    "vm_host_threads".to_owned(),
                    host_threads + u64::try_from(self.vmm.runner_threads()).unwrap_or(0),
                ),
                (
                    "vm_idle_instances".to_owned(),
                    u64::try_from(instances).unwrap_or(u64::MAX),
                ),
                (
                    "vm_host_processes_spawned".to_owned(),
                    self.hosts
                        .as_ref()
                        .map_or(0, |h| u64::try_from(h.spawned()).unwrap_or(0)),
                ),
                (
                    "vm_host_processes_exited".to_owned(),
                    self.hosts
                        .as_ref()
                        .map_or(0, |h| u64::try_from(h.exited()).unwrap_or(0)),
                ),
                ("vm_host_private_bytes".to_owned(), host_private),
                ("vm_shells_taken".to_owned(), load(&c.shells_taken)),
                (
                    "vm_shells_ready".to_owned(),
                    self.shells
                        .lock()
                        .map_or(0, |p| u64::try_from(p.len()).unwrap_or(u64::MAX)),
                ),
            ]
            .into_iter()
            .chain(host_list.iter().enumerate().flat_map(|(i, h)| {
                [
                    (format!("vm_host{i}_pid"), u64::from(h.pid())),
                    (format!("vm_host{i}_vms"), u64::try_from(h.vms()).unwrap_or(0)),
                ]
            }))
            .collect(),
        }
    }
}

impl VmBackend {
    /// Returns an instance to the idle pool (or to the reaper).
    fn give_back(&self, f: &Function, mut pooled: Pooled) -> Result<(), Error> {
        // A used instance of a fresh-per-request function is kept only if
        // a reset can make it fresh again; the reset starts now, on its
        // runner, so that the next request finds it (nearly) done.
        let keep = !(f.fresh && pooled.used)
            || (pooled.instance.is_alive()
                && !pooled.instance.at_checkpoint()
                && pooled.instance.begin_reset().is_ok());
        if keep && pooled.instance.is_alive() && !pooled.instance.at_checkpoint() {
            let mut idle = f.idle.lock().map_err(|_| poisoned())?;
            if idle.len() < self.idle_cap.max(f.reserved.load(Ordering::Relaxed)) {
                idle.push(pooled);
            } else {
                drop(idle);
                self.reap(vec![pooled.instance]);
            }
        } else {
            self.counters.discarded.fetch_add(1, Ordering::Relaxed);
            self.reap(vec![pooled.instance]);
        }
        Ok(())
    }
}

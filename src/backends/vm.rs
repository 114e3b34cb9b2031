//! The `vm` backend adapter: maps the `vmm` crate's micro-VM instances onto
//! the [`Backend`] trait. Each deployed function keeps a pool of idle,
//! initialised instances (one function per instance); an invocation takes
//! one (`hot`) or boots, loads and initialises a new one (`cold`), and gives
//! it back afterwards unless it died. Torn-down instances are dropped on a
//! reaper thread, off the request path (teardown is slow on this host).

use crate::{
    Artifact, Backend, BackendKind, Config, Error, FunctionId, FunctionSpec, Invocation, StartPath, StartRequest,
    Stats, Timings,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use vmm::{Instance, InstanceConfig, LayoutConfig, RunError, Status, Vmm, VmmError};

/// Default size of the function image region.
const DEFAULT_IMAGE_MIB: usize = 8;
/// Default idle instances kept per function.
const DEFAULT_IDLE_PER_FUNCTION: usize = 16;
/// Guest memory the layout needs besides heap, stack, I/O window and image
/// (system pages and kernel: the first 4 MiB, plus the stack guard chunk).
const FIXED_GUEST_BYTES: usize = 4 << 20;

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
    let (reaper, reap) = mpsc::channel::<Vec<Instance>>();
    std::thread::Builder::new()
        .name("vm-reaper".into())
        .spawn(move || {
            for instances in reap {
                drop(instances);
            }
        })
        .map_err(|e| Error::io("spawning the vm reaper thread", e))?;
    Ok(Box::new(VmBackend {
        vmm,
        instance,
        idle_cap: config.vm.idle_per_function.unwrap_or(DEFAULT_IDLE_PER_FUNCTION),
        config,
        functions: RwLock::new(HashMap::new()),
        reaper: Mutex::new(reaper),
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
        let fixed = FIXED_GUEST_BYTES
            + round(config.stack_bytes + (64 << 10))
            + round(config.input_limit_bytes)
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
            io_bytes: to_u64(config.input_limit_bytes.max(1))?,
            image_bytes: to_u64(image_bytes)?,
            heap_bytes: to_u64(heap_bytes)?,
        },
        output_limit_bytes: to_u64(config.output_limit_bytes)?,
        idle_spin_us: config.vm.hot_spin_us.unwrap_or(0),
        ..InstanceConfig::default()
    })
}

#[derive(Debug, Default)]
struct Counters {
    cold: AtomicU64,
    hot: AtomicU64,
    discarded: AtomicU64,
    busy: AtomicU64,
}

#[derive(Debug)]
struct Function {
    name: String,
    artifact: Arc<Artifact>,
    budget: Duration,
    idle: Mutex<Vec<Instance>>,
}

#[derive(Debug)]
struct VmBackend {
    vmm: Vmm,
    config: Config,
    instance: InstanceConfig,
    idle_cap: usize,
    functions: RwLock<HashMap<String, Arc<Function>>>,
    reaper: Mutex<Sender<Vec<Instance>>>,
    counters: Counters,
}

/// An error and its causes, each once.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl VmBackend {
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
        let sent = self.reaper.lock().map(|r| r.send(instances));
        // If the reaper is gone, the instances were dropped right here.
        drop(sent);
    }

    /// Boots an instance and loads `f` into it (a cold start's work).
    fn start_cold(&self, f: &Function) -> Result<Instance, Error> {
        let (mut instance, _timings) = Instance::boot(&self.vmm, &self.instance).map_err(|e| match e {
            VmmError::KvmUnavailable(_) => Error::KvmUnavailable {
                detail: error_chain(&e),
            },
            other => Error::Crashed {
                name: f.name.clone(),
                detail: format!("booting the micro-VM: {}", error_chain(&other)),
            },
        })?;
        let deadline = Instant::now() + self.config.init_budget;
        let loaded = instance.load(f.artifact.bytes(), deadline);
        let result = match loaded {
            Ok(reply) => match reply.status {
                Status::Ok => Ok(()),
                Status::LoadFailed => Err(Error::InvalidArtifact {
                    path: f.artifact.path().to_owned(),
                    reason: format!("the guest loader refused it: {}", String::from_utf8_lossy(&reply.data)),
                }),
                _ => Err(self.reply_error(f, &instance, reply.status, &reply.data, true)),
            },
            Err(RunError::PayloadTooLarge { len, limit }) => Err(Error::InvalidArtifact {
                path: f.artifact.path().to_owned(),
                reason: format!("{len} bytes do not fit the guest's I/O window of {limit} bytes"),
            }),
            Err(RunError::BudgetExceeded) => Err(Error::InitFailed {
                name: f.name.clone(),
                message: format!(
                    "init() exceeded its budget of {} ms",
                    self.config.init_budget.as_millis()
                ),
            }),
            Err(e) => Err(match self.run_error(f, &instance, e, self.config.init_budget) {
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

    /// The trait error for a non-`Ok` reply.
    fn reply_error(&self, f: &Function, instance: &Instance, status: Status, data: &[u8], init: bool) -> Error {
        let message = String::from_utf8_lossy(data).into_owned();
        let name = f.name.clone();
        match status {
            Status::FunctionError if init => Error::InitFailed { name, message },
            Status::InitFailed => Error::InitFailed { name, message },
            Status::FunctionError => Error::FunctionFailed { name, message },
            Status::Panicked => Error::Panicked { name, message },
            Status::OutOfMemory => Error::OutOfMemory {
                name,
                limit_bytes: usize::try_from(instance.layout().heap_bytes).unwrap_or(usize::MAX),
            },
            Status::LoadFailed | Status::BadRequest | Status::Ok => Error::Crashed {
                name,
                detail: format!("the guest runtime refused the request: {message}"),
            },
        }
    }

    /// The trait error for a failed request.
    fn run_error(&self, f: &Function, instance: &Instance, e: RunError, budget: Duration) -> Error {
        let name = f.name.clone();
        let with_log = |detail: String| {
            let log = instance.serial_log();
            if log.is_empty() {
                detail
            } else {
                format!("{detail}; guest log: {}", log.trim_end())
            }
        };
        match e {
            RunError::Fault(fault) if fault.stack_overflow => Error::StackOverflow {
                name,
                stack_bytes: self.config.stack_bytes,
            },
            RunError::Fault(fault) => Error::Crashed {
                name,
                detail: with_log(fault.to_string()),
            },
            RunError::BudgetExceeded => Error::BudgetExceeded { name, budget },
            RunError::Malformed(vmm::channel::ReplyError::TooLarge { len, limit }) => Error::OutputTooLarge {
                len: usize::try_from(len).unwrap_or(usize::MAX),
                limit: usize::try_from(limit).unwrap_or(usize::MAX),
            },
            RunError::Malformed(reason) => Error::MalformedReply {
                name,
                detail: reason.to_string(),
            },
            RunError::PayloadTooLarge { len, limit } => Error::InputTooLarge {
                len,
                limit: usize::try_from(limit).unwrap_or(usize::MAX),
            },
            other => Error::Crashed {
                name,
                detail: with_log(error_chain(&other)),
            },
        }
    }
}

fn poisoned() -> Error {
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
            && existing.artifact.digest() == spec.artifact.digest()
            && existing.budget == budget
        {
            return Ok(id);
        }
        let f = Arc::new(Function {
            name: spec.name.clone(),
            artifact: Arc::clone(&spec.artifact),
            budget,
            idle: Mutex::new(Vec::new()),
        });
        // Boot, load and init one instance now: a bad artifact or a failing
        // init() surfaces at deploy, and the first invocation is hot.
        let first = self.start_cold(&f)?;
        f.idle.lock().map_err(|_| poisoned())?.push(first);
        let old = self
            .functions
            .write()
            .map_err(|_| poisoned())?
            .insert(spec.name.clone(), f);
        if let Some(old) = old {
            let idle = std::mem::take(&mut *old.idle.lock().map_err(|_| poisoned())?);
            self.reap(idle);
        }
        Ok(id)
    }

    fn invoke(&self, id: &FunctionId, input: &[u8], start: StartRequest) -> Result<Invocation, Error> {
        let invoked = Instant::now();
        let invoked_ns = vmm::now_ns();
        let f = self.function(id)?;
        if input.len() > self.config.input_limit_bytes {
            return Err(Error::InputTooLarge {
                len: input.len(),
                limit: self.config.input_limit_bytes,
            });
        }
        let take_idle = || f.idle.lock().map(|mut idle| idle.pop()).map_err(|_| poisoned());
        let (mut instance, path, start_ns, invoked, invoked_ns) = match start {
            StartRequest::Auto => match take_idle()? {
                Some(i) => (i, StartPath::Hot, 0, invoked, invoked_ns),
                None => {
                    let i = self.start_cold(&f)?;
                    (i, StartPath::Cold, ns(invoked.elapsed()), invoked, invoked_ns)
                }
            },
            StartRequest::Force(StartPath::Cold) => {
                let i = self.start_cold(&f)?;
                (i, StartPath::Cold, ns(invoked.elapsed()), invoked, invoked_ns)
            }
            StartRequest::Force(StartPath::Hot) => match take_idle()? {
                Some(i) => (i, StartPath::Hot, 0, invoked, invoked_ns),
                // Make an instance to be hot, outside the measured time.
                None => (self.start_cold(&f)?, StartPath::Hot, 0, Instant::now(), vmm::now_ns()),
            },
            StartRequest::Force(other) => {
                return Err(Error::UnsupportedStart {
                    backend: BackendKind::Vm,
                    start: other,
                });
            }
        };
        match path {
            StartPath::Cold => self.counters.cold.fetch_add(1, Ordering::Relaxed),
            _ => self.counters.hot.fetch_add(1, Ordering::Relaxed),
        };
        self.counters.busy.fetch_add(1, Ordering::Relaxed);
        let result = instance.invoke(input, Instant::now() + f.budget);
        self.counters.busy.fetch_sub(1, Ordering::Relaxed);
        let outcome = match result {
            Ok(reply) if reply.status == Status::Ok => {
                let timings = Timings {
                    start_ns,
                    dispatch_ns: reply.entered_ns.saturating_sub(invoked_ns),
                    exec_ns: reply.returned_ns.saturating_sub(reply.entered_ns),
                    total_ns: ns(invoked.elapsed()),
                };
                Ok(Invocation {
                    output: reply.data,
                    start: path,
                    timings,
                })
            }
            Ok(reply) => Err(self.reply_error(&f, &instance, reply.status, &reply.data, false)),
            Err(e) => Err(self.run_error(&f, &instance, e, f.budget)),
        };
        if instance.is_alive() {
            let mut idle = f.idle.lock().map_err(|_| poisoned())?;
            if idle.len() < self.idle_cap {
                idle.push(instance);
            } else {
                drop(idle);
                self.reap(vec![instance]);
            }
        } else {
            self.counters.discarded.fetch_add(1, Ordering::Relaxed);
            self.reap(vec![instance]);
        }
        outcome
    }

    fn evict(&self, id: &FunctionId) -> Result<(), Error> {
        let f = self.function(id)?;
        let idle = std::mem::take(&mut *f.idle.lock().map_err(|_| poisoned())?);
        self.reap(idle);
        Ok(())
    }

    fn stats(&self) -> Stats {
        let functions = self
            .functions
            .read()
            .map(|m| m.values().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        let mut instances = 0usize;
        let mut memory_bytes = 0u64;
        for f in &functions {
            if let Ok(idle) = f.idle.lock() {
                instances += idle.len();
                memory_bytes += idle.iter().map(Instance::resident_bytes).sum::<u64>();
            }
        }
        let busy = self.counters.busy.load(Ordering::Relaxed);
        Stats {
            functions: functions.len(),
            instances: instances + usize::try_from(busy).unwrap_or(0),
            memory_bytes,
            extra: vec![
                ("cold_starts".to_owned(), self.counters.cold.load(Ordering::Relaxed)),
                ("hot_starts".to_owned(), self.counters.hot.load(Ordering::Relaxed)),
                (
                    "instances_discarded".to_owned(),
                    self.counters.discarded.load(Ordering::Relaxed),
                ),
                ("instances_busy".to_owned(), busy),
            ],
        }
    }
}

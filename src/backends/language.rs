//! The `language` backend adapter: maps `lang_isolation::language`'s
//! dispatcher (per-core worker processes running preloaded shared objects)
//! onto the [`Backend`] trait. Warm = the preloaded copy; cold = the
//! function's pre-linked image mapped copy-on-write, from its post-init
//! snapshot after the first (`LanguageConfig::cold_start`), called, and its
//! written pages dropped per request. Each tenant has its own workers (under its own
//! uid), so functions of different tenants never share a process.

use crate::{
    Backend, BackendKind, Config, Error, FunctionId, FunctionSpec, Invocation, LanguageColdStart, LanguagePreemption,
    StartPath, StartRequest, Stats, Timings,
};
use lang_isolation::language::shm::now_ns;
use lang_isolation::language::{
    ColdStart, Dispatcher, DispatcherConfig, FunctionIndex, LanguageError, Preemption, Start,
};
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

/// Opens the `language` backend.
pub fn open(config: Config) -> Result<Box<dyn Backend>, Error> {
    let lang = &config.language;
    let mut dc = DispatcherConfig::new(env!("MICROFAAS_WORKER_BIN"));
    dc.workers = lang.workers;
    dc.max_workers = lang.max_workers;
    dc.pin = lang.pin_workers;
    dc.preemption = match lang.preemption {
        LanguagePreemption::Watchdog => Preemption::Watchdog,
        LanguagePreemption::Periodic { quantum } => Preemption::Periodic { quantum },
        LanguagePreemption::Disabled => Preemption::Disabled,
    };
    dc.watchdog_interval = lang.watchdog_interval;
    dc.hang_grace = lang.hang_grace;
    dc.idle_spin = lang.idle_spin;
    dc.queue_depth = lang.queue_depth;
    dc.blacklist_after = lang.blacklist_after;
    dc.sandbox = config.sandbox.settings();
    dc.start_timeout = lang.start_timeout;
    dc.cold_start = match lang.cold_start {
        LanguageColdStart::Load => ColdStart::Load,
        LanguageColdStart::Prelinked => ColdStart::Prelinked,
        LanguageColdStart::Snapshot => ColdStart::Snapshot,
    };
    dc.lazy_resident = lang.lazy_resident;
    dc.input_limit_bytes = config.input_limit_bytes;
    dc.output_limit_bytes = config.output_limit_bytes;
    dc.heap_limit_bytes = config.heap_limit_bytes;
    dc.stack_bytes = config.stack_bytes;
    dc.init_budget = config.init_budget;
    let dispatcher = Dispatcher::start(dc).map_err(|e| map_error(e, "", Duration::ZERO, &config))?;
    Ok(Box::new(LanguageBackend {
        dispatcher,
        config,
        functions: RwLock::new(HashMap::new()),
    }))
}

#[derive(Debug, Clone, Copy)]
struct Deployed {
    index: FunctionIndex,
    budget: Duration,
}

/// The `language` backend.
#[derive(Debug)]
struct LanguageBackend {
    dispatcher: Dispatcher,
    config: Config,
    functions: RwLock<HashMap<String, Deployed>>,
}

impl LanguageBackend {
    fn lookup(&self, id: &FunctionId) -> Result<Deployed, Error> {
        self.functions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id.name())
            .copied()
            .ok_or_else(|| Error::UnknownFunction {
                name: id.name().to_owned(),
            })
    }
}

impl Backend for LanguageBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Language
    }

    fn deploy(&self, spec: &FunctionSpec) -> Result<FunctionId, Error> {
        let budget = spec.budget.unwrap_or(self.config.default_budget);
        let code = super::function_code(spec)?;
        let index = self
            .dispatcher
            .deploy_code(spec.tenant.as_str(), code, budget)
            .map_err(|e| map_error(e, &spec.name, budget, &self.config))?;
        let previous = self
            .functions
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(spec.name.clone(), Deployed { index, budget });
        if let Some(old) = previous {
            self.dispatcher.remove(old.index);
        }
        Ok(FunctionId::new(&spec.name))
    }

    fn invoke(&self, id: &FunctionId, input: &[u8], start: StartRequest) -> Result<Invocation, Error> {
        let t0 = now_ns();
        let deployed = self.lookup(id)?;
        let start = match start {
            StartRequest::Auto => Start::Auto,
            StartRequest::Force(StartPath::Warm) => Start::Warm,
            StartRequest::Force(StartPath::Cold) => Start::Cold,
            StartRequest::Force(other) => {
                return Err(Error::UnsupportedStart {
                    backend: BackendKind::Language,
                    start: other,
                });
            }
        };
        let done = self
            .dispatcher
            .invoke_since(t0, deployed.index, input, start)
            .map_err(|e| map_error(e, id.name(), deployed.budget, &self.config))?;
        Ok(Invocation {
            output: done.output,
            start: if done.cold { StartPath::Cold } else { StartPath::Warm },
            timings: Timings {
                start_ns: done.start_ns,
                dispatch_ns: done.dispatch_ns,
                exec_ns: done.exec_ns,
                total_ns: done.total_ns,
            },
        })
    }

    fn evict(&self, id: &FunctionId) -> Result<(), Error> {
        let deployed = self.lookup(id)?;
        self.dispatcher
            .evict(deployed.index)
            .map_err(|e| map_error(e, id.name(), deployed.budget, &self.config))
    }

    fn stats(&self) -> Stats {
        let s = self.dispatcher.stats();
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let mut extra = vec![
            ("workers".to_owned(), count(s.live_workers)),
            ("tenants".to_owned(), count(s.tenants.len())),
            ("tenant_evictions".to_owned(), s.tenant_evictions),
            ("preemptions".to_owned(), s.preemptions),
            ("respawns".to_owned(), s.respawns),
            ("blacklisted".to_owned(), count(s.blacklisted)),
            ("resident_functions".to_owned(), count(s.resident)),
        ];
        for (i, pid) in s.worker_pids.iter().enumerate() {
            extra.push((format!("worker{i}_pid"), u64::from(*pid)));
        }
        // Per tenant: `tenant.<label>.<counter>` (labels are [a-z0-9_-]).
        for t in &s.tenants {
            let key = |what: &str| format!("tenant.{}.{what}", t.tenant);
            extra.push((key("uid"), u64::from(t.uid)));
            extra.push((key("functions"), count(t.functions)));
            extra.push((key("rss_bytes"), t.rss_bytes));
            for (i, pid) in t.worker_pids.iter().enumerate() {
                extra.push((key(&format!("worker{i}_pid")), u64::from(*pid)));
            }
        }
        // Memory protection keys inside each worker: `pkeys_state` 0 =
        // disabled by config, 1 = enabled, 2 = unavailable on this host
        // (`lang_isolation::runtime::pkeys::probe` says why); `pkeys_keys` =
        // keys per worker. Worker 0 speaks for all (same host, same config).
        if let Some(&(state, keys)) = s.worker_pkeys.first() {
            extra.push(("pkeys_state".to_owned(), u64::from(state)));
            extra.push(("pkeys_keys".to_owned(), u64::from(keys)));
        }
        Stats {
            functions: s.functions,
            instances: s.instances,
            memory_bytes: s.worker_rss_bytes,
            extra,
        }
    }
}

fn map_error(e: LanguageError, name: &str, budget: Duration, config: &Config) -> Error {
    let name = name.to_owned();
    match e {
        LanguageError::UnknownFunction => Error::UnknownFunction { name },
        LanguageError::InputTooLarge { len, limit } => Error::InputTooLarge { len, limit },
        LanguageError::OutputTooLarge { len, limit } => Error::OutputTooLarge { len, limit },
        LanguageError::BudgetExceeded { .. } => Error::BudgetExceeded { name, budget },
        LanguageError::Panicked { message } => Error::Panicked { name, message },
        LanguageError::OutOfMemory { .. } => Error::OutOfMemory {
            name,
            limit_bytes: config.heap_limit_bytes,
        },
        LanguageError::StackOverflow { stack_bytes } => Error::StackOverflow { name, stack_bytes },
        LanguageError::FunctionFailed { message } => Error::FunctionFailed { name, message },
        LanguageError::InitFailed { message } => Error::InitFailed { name, message },
        LanguageError::Crashed { detail } => Error::Crashed { name, detail },
        LanguageError::WorkerLost { detail } => Error::WorkerLost { name, detail },
        LanguageError::PolicyViolation { detail } => Error::PolicyViolation { name, detail },
        LanguageError::Blacklisted { reason } => Error::Blacklisted { name, reason },
        LanguageError::Malformed { detail } => Error::MalformedReply { name, detail },
        LanguageError::Tenant(refused) => Error::BackendUnavailable {
            backend: BackendKind::Language,
            reason: refused.to_string(),
        },
        LanguageError::AtCapacity { detail } => Error::BackendUnavailable {
            backend: BackendKind::Language,
            reason: format!("no room for another tenant's workers: {detail}"),
        },
        LanguageError::Config(reason) => Error::BackendUnavailable {
            backend: BackendKind::Language,
            reason,
        },
        LanguageError::Io { context, source } => Error::Io { context, source },
    }
}

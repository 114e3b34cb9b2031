//! The process backend proper: deployed functions, their warm runner pools,
//! cold runs, budgets, failure handling and stats.

use super::protocol::{Layout, Reply, kind, phase, state};
use super::runner_handle::{Runner, RunnerLimits, Tracker, WaitEnd, lock};
use super::{Completed, ProcessConfig, ProcessError, ProcessStats, Served, StartMode};
use crate::runtime::{FunctionCode, SealedArtifact, monotonic_ns};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

/// A deployed function and its pool of warm runners.
#[derive(Debug)]
struct Slot {
    name: String,
    /// Its runners' limits and sandbox (its tenant's uid).
    limits: RunnerLimits,
    /// The artifact's sealed memfd, inherited by every runner at fd 4 (and
    /// its module's at fd 5).
    code: FunctionCode,
    budget: Duration,
    pool: Mutex<Pool>,
    returned: Condvar,
}

#[derive(Debug, Default)]
struct Pool {
    idle: Vec<Runner>,
    /// Warm runners alive: idle, busy, or being spawned.
    live: usize,
    /// Bumped by `evict`: busy runners of an older generation are dropped
    /// when they come back.
    generation: u64,
}

/// The process backend. See the module doc.
#[derive(Debug)]
pub struct ProcessHost {
    layout: Layout,
    config: ProcessConfig,
    functions: RwLock<HashMap<String, Arc<Slot>>>,
    tracker: Arc<Tracker>,
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl ProcessHost {
    /// A backend that execs `config.runner_bin` for its runners.
    pub fn new(config: ProcessConfig) -> Result<Self, ProcessError> {
        if !config.runner_bin.is_file() {
            return Err(ProcessError::RunnerMissing {
                path: config.runner_bin.clone(),
            });
        }
        let layout =
            Layout::new(config.input_limit_bytes, config.output_limit_bytes).ok_or(ProcessError::BadConfig {
                detail: "input and output limits overflow the address space".to_owned(),
            })?;
        if config.sandbox.tenant_uids == 0 {
            return Err(ProcessError::BadConfig {
                detail: "the tenant uid range is empty (tenant_uids = 0)".to_owned(),
            });
        }
        let tracker = Tracker::new().map_err(|e| ProcessError::io("starting the reaper thread", e))?;
        Ok(Self {
            layout,
            config,
            functions: RwLock::new(HashMap::new()),
            tracker,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ProcessConfig {
        &self.config
    }

    /// Deploys (or replaces) `name` from `artifact` (kept while deployed)
    /// for the default tenant: see [`ProcessHost::deploy_for`].
    pub fn deploy(&self, name: &str, artifact: Arc<SealedArtifact>, budget: Duration) -> Result<(), ProcessError> {
        self.deploy_for(crate::sandbox::DEFAULT_TENANT, name, artifact, budget)
    }

    /// Deploys (or replaces) `name` from `artifact` (kept while deployed)
    /// as `tenant`'s: spawns its warm runners and waits for their `init()`.
    /// Every runner of the function, warm or cold, runs as the tenant's own
    /// uid and gid ([`crate::sandbox::SandboxSettings::for_tenant`]), so a
    /// runner of another tenant can neither signal, trace nor read it even
    /// past the rest of its sandbox. Refused when the uid range is used up.
    pub fn deploy_for(
        &self,
        tenant: &str,
        name: &str,
        artifact: Arc<SealedArtifact>,
        budget: Duration,
    ) -> Result<(), ProcessError> {
        self.deploy_code(tenant, name, FunctionCode::new(artifact), budget)
    }

    /// Like [`ProcessHost::deploy_for`], for any [`FunctionCode`]: with a
    /// module, every runner runs `load(module)` right after `init()`.
    pub fn deploy_code(
        &self,
        tenant: &str,
        name: &str,
        code: FunctionCode,
        budget: Duration,
    ) -> Result<(), ProcessError> {
        let sandbox = self.config.sandbox.for_tenant(tenant)?;
        let limits = RunnerLimits {
            layout: self.layout,
            heap_limit_bytes: self.config.heap_limit_bytes,
            stack_bytes: self.config.stack_bytes,
            sandbox: sandbox.to_arg(),
        };
        let slot = Arc::new(Slot {
            name: name.to_owned(),
            limits,
            code,
            budget,
            pool: Mutex::new(Pool::default()),
            returned: Condvar::new(),
        });
        for _ in 0..self.config.warm_per_function.max(1) {
            let generation = lock(&slot.pool).generation;
            let runner = self.spawn_warm(&slot, generation)?;
            let mut pool = lock(&slot.pool);
            pool.live += 1;
            pool.idle.push(runner);
        }
        let old = self
            .functions
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_owned(), slot);
        if let Some(old) = old {
            let mut pool = lock(&old.pool);
            pool.generation += 1;
            pool.live -= pool.idle.len();
            pool.idle.clear();
        }
        Ok(())
    }

    fn slot(&self, name: &str) -> Result<Arc<Slot>, ProcessError> {
        self.functions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| ProcessError::UnknownFunction { name: name.to_owned() })
    }

    /// Kills `name`'s warm runners, so its next invocation starts a new one.
    pub fn evict(&self, name: &str) -> Result<(), ProcessError> {
        let slot = self.slot(name)?;
        let mut pool = lock(&slot.pool);
        pool.generation += 1;
        pool.live -= pool.idle.len();
        pool.idle.clear();
        Ok(())
    }

    /// Resident state: functions, live runner processes, their RSS.
    pub fn stats(&self) -> ProcessStats {
        let functions = self
            .functions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        let pids = self.tracker.live();
        let memory_bytes = pids.iter().filter_map(|&pid| rss_bytes(pid)).sum();
        ProcessStats {
            functions,
            instances: pids.len(),
            memory_bytes,
        }
    }

    /// Runs `name` once on `input`, warm (a pooled runner) or cold (a new
    /// runner just for this request).
    pub fn invoke(&self, name: &str, input: &[u8], mode: StartMode) -> Result<Completed, ProcessError> {
        let t0 = monotonic_ns();
        if input.len() > self.config.input_limit_bytes {
            return Err(ProcessError::InputTooLarge {
                len: input.len(),
                limit: self.config.input_limit_bytes,
            });
        }
        let slot = self.slot(name)?;
        match mode {
            StartMode::Cold => self.invoke_cold(&slot, input, t0),
            StartMode::Warm => self.invoke_warm(&slot, input, t0),
        }
    }

    fn invoke_cold(&self, slot: &Slot, input: &[u8], t0: u64) -> Result<Completed, ProcessError> {
        let mut runner = Runner::spawn(
            &self.config.runner_bin,
            &slot.code,
            &slot.limits,
            &self.tracker,
            Some(input),
            0,
        )?;
        let init_deadline = t0.saturating_add(duration_ns(self.config.init_budget));
        match runner.wait_until(|s| s != state::REQUEST, init_deadline) {
            WaitEnd::Reached(_) => {}
            WaitEnd::Died => return Err(died(slot, &mut runner)),
            WaitEnd::TimedOut => {
                runner.kill_and_reap();
                return Err(ProcessError::InitFailed {
                    name: slot.name.clone(),
                    message: format!(
                        "load and init took longer than the init budget of {} ms",
                        self.config.init_budget.as_millis()
                    ),
                });
            }
        }
        let deadline = monotonic_ns().saturating_add(duration_ns(slot.budget));
        let done = self.finish(slot, &mut runner, deadline, t0);
        drop(runner);
        done.map(|mut c| {
            c.served = Served::Cold;
            c.start_ns = c.ready_ns.saturating_sub(t0);
            c
        })
    }

    fn invoke_warm(&self, slot: &Slot, input: &[u8], t0: u64) -> Result<Completed, ProcessError> {
        let (mut runner, fresh) = self.acquire(slot)?;
        runner.post(input)?;
        let deadline = monotonic_ns().saturating_add(duration_ns(slot.budget));
        let result = self.finish(slot, &mut runner, deadline, t0);
        let healthy = match &result {
            Ok(_) => true,
            Err(e) => !e.ends_runner() && !runner.reply_is_fatal(),
        };
        self.release(slot, runner, healthy);
        if !healthy {
            // Keep the function warm: replace the runner now rather than on
            // the next request's path. A failure here shows up there.
            let _ = self.replenish(slot);
        }
        result.map(|mut c| {
            if let Some(spawned_ns) = fresh {
                c.served = Served::Cold;
                c.start_ns = c.ready_ns.saturating_sub(spawned_ns);
            }
            c
        })
    }

    /// Waits for the reply to the request in flight and decodes it.
    fn finish(&self, slot: &Slot, runner: &mut Runner, deadline: u64, t0: u64) -> Result<Completed, ProcessError> {
        match runner.wait_until(|s| s == state::REPLY, deadline) {
            WaitEnd::Reached(_) => {}
            WaitEnd::Died => return Err(died(slot, runner)),
            WaitEnd::TimedOut => {
                runner.kill_and_reap();
                return Err(ProcessError::BudgetExceeded {
                    name: slot.name.clone(),
                    budget: slot.budget,
                });
            }
        }
        let reply = match runner.reply() {
            Ok(r) => r,
            Err(e) => {
                runner.kill_and_reap();
                return Err(ProcessError::MalformedReply {
                    name: slot.name.clone(),
                    detail: e.to_string(),
                });
            }
        };
        let h = runner.header();
        let ready_ns = h.ready_ns.load(std::sync::atomic::Ordering::Relaxed);
        let entered_ns = h.entered_ns.load(std::sync::atomic::Ordering::Relaxed);
        let returned_ns = h.returned_ns.load(std::sync::atomic::Ordering::Relaxed);
        match reply {
            Reply::Output { len } => {
                let output = runner.output(len);
                let end = monotonic_ns();
                Ok(Completed {
                    output,
                    served: Served::Warm,
                    ready_ns,
                    start_ns: 0,
                    dispatch_ns: entered_ns.saturating_sub(t0),
                    exec_ns: returned_ns.saturating_sub(entered_ns),
                    total_ns: end.saturating_sub(t0),
                })
            }
            Reply::Failed {
                kind: k,
                phase: p,
                message_len,
                value,
            } => {
                let message = String::from_utf8_lossy(&runner.output(message_len)).into_owned();
                Err(self.failure(slot, k, p, message, value))
            }
        }
    }

    fn failure(&self, slot: &Slot, k: u32, p: u32, message: String, value: u64) -> ProcessError {
        let name = slot.name.clone();
        if p == phase::LOAD {
            return ProcessError::LoadFailed {
                name,
                artifact: slot.code.artifact().label().to_owned(),
                message,
            };
        }
        if p == phase::INIT {
            let what = match k {
                kind::FUNCTION_ERROR => format!("init() returned an error: {message}"),
                kind::PANICKED => format!("init() panicked: {message}"),
                kind::OUT_OF_MEMORY => format!("init() ran out of memory: {message}"),
                kind::STACK_OVERFLOW => "init() overflowed its stack".to_owned(),
                _ => message,
            };
            return ProcessError::InitFailed { name, message: what };
        }
        match k {
            kind::FUNCTION_ERROR => ProcessError::FunctionFailed { name, message },
            kind::PANICKED => ProcessError::Panicked { name, message },
            kind::OUT_OF_MEMORY => ProcessError::OutOfMemory {
                name,
                limit_bytes: self.config.heap_limit_bytes,
                message,
            },
            kind::STACK_OVERFLOW => ProcessError::StackOverflow {
                name,
                stack_bytes: self.config.stack_bytes,
            },
            kind::FAULT => ProcessError::Crashed { name, detail: message },
            kind::OUTPUT_TOO_LARGE => ProcessError::OutputTooLarge {
                len: usize::try_from(value).unwrap_or(usize::MAX),
                limit: self.config.output_limit_bytes,
            },
            _ => ProcessError::MalformedReply { name, detail: message },
        }
    }

    fn spawn_warm(&self, slot: &Slot, generation: u64) -> Result<Runner, ProcessError> {
        let mut runner = Runner::spawn(
            &self.config.runner_bin,
            &slot.code,
            &slot.limits,
            &self.tracker,
            None,
            generation,
        )?;
        let deadline = monotonic_ns().saturating_add(duration_ns(self.config.init_budget));
        match runner.wait_until(|s| s == state::READY || s == state::REPLY, deadline) {
            WaitEnd::Reached(state::READY) => Ok(runner),
            WaitEnd::Reached(_) => {
                let err = match runner.reply() {
                    Ok(Reply::Failed {
                        kind: k,
                        phase: p,
                        message_len,
                        value,
                    }) => {
                        let message = String::from_utf8_lossy(&runner.output(message_len)).into_owned();
                        self.failure(slot, k, p, message, value)
                    }
                    Ok(Reply::Output { .. }) => ProcessError::MalformedReply {
                        name: slot.name.clone(),
                        detail: "output before any request".to_owned(),
                    },
                    Err(e) => ProcessError::MalformedReply {
                        name: slot.name.clone(),
                        detail: e.to_string(),
                    },
                };
                runner.kill_and_reap();
                Err(err)
            }
            WaitEnd::Died => Err(match died(slot, &mut runner) {
                ProcessError::Crashed { name, detail } => ProcessError::InitFailed { name, message: detail },
                violation => violation,
            }),
            WaitEnd::TimedOut => {
                runner.kill_and_reap();
                Err(ProcessError::InitFailed {
                    name: slot.name.clone(),
                    message: format!(
                        "load and init took longer than the init budget of {} ms",
                        self.config.init_budget.as_millis()
                    ),
                })
            }
        }
    }

    /// Takes an idle warm runner, spawning one if the pool has room, else
    /// waits for one. Returns the runner and, if it was spawned for this
    /// request, when.
    fn acquire(&self, slot: &Slot) -> Result<(Runner, Option<u64>), ProcessError> {
        let mut pool = lock(&slot.pool);
        loop {
            if let Some(runner) = pool.idle.pop() {
                if runner.is_dead() {
                    pool.live -= 1;
                    drop(runner);
                    continue;
                }
                return Ok((runner, None));
            }
            if pool.live < self.config.warm_per_function.max(1) {
                pool.live += 1;
                let generation = pool.generation;
                drop(pool);
                let spawned = monotonic_ns();
                return match self.spawn_warm(slot, generation) {
                    Ok(r) => Ok((r, Some(spawned))),
                    Err(e) => {
                        lock(&slot.pool).live -= 1;
                        slot.returned.notify_one();
                        Err(e)
                    }
                };
            }
            pool = slot
                .returned
                .wait(pool)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn release(&self, slot: &Slot, runner: Runner, healthy: bool) {
        let mut pool = lock(&slot.pool);
        if healthy && runner.generation == pool.generation && !runner.is_dead() {
            pool.idle.push(runner);
        } else {
            pool.live -= 1;
            drop(pool);
            drop(runner);
        }
        slot.returned.notify_one();
    }

    /// Spawns a warm runner if the pool is below its size.
    fn replenish(&self, slot: &Slot) -> Result<(), ProcessError> {
        let generation = {
            let mut pool = lock(&slot.pool);
            if pool.live >= self.config.warm_per_function.max(1) {
                return Ok(());
            }
            pool.live += 1;
            pool.generation
        };
        match self.spawn_warm(slot, generation) {
            Ok(runner) => {
                self.release(slot, runner, true);
                Ok(())
            }
            Err(e) => {
                lock(&slot.pool).live -= 1;
                slot.returned.notify_one();
                Err(e)
            }
        }
    }
}

/// The error for a runner that died by itself: killed by its seccomp
/// filter (`SECCOMP_RET_KILL_PROCESS`, a death by SIGSYS) is a policy
/// violation, anything else a crash.
fn died(slot: &Slot, runner: &mut Runner) -> ProcessError {
    let detail = runner.reap_dead();
    if runner.killed_by(libc::SIGSYS) {
        ProcessError::PolicyViolation {
            name: slot.name.clone(),
            detail: format!("forbidden system call ({detail}: the sandbox's seccomp filter)"),
        }
    } else {
        ProcessError::Crashed {
            name: slot.name.clone(),
            detail,
        }
    }
}

/// Resident set size of `pid` from `/proc/PID/statm`, in bytes.
fn rss_bytes(pid: libc::pid_t) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    Some(pages.saturating_mul(page))
}

impl Drop for ProcessHost {
    fn drop(&mut self) {
        let slots: Vec<Arc<Slot>> = self
            .functions
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain()
            .map(|(_, s)| s)
            .collect();
        for slot in slots {
            lock(&slot.pool).idle.clear();
        }
        self.tracker.shutdown();
    }
}

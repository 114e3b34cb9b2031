//! The process baseline (Boucher et al.'s): every function instance is its
//! own OS process, a `microfaas-runner` that loads the artifact with
//! [`crate::runtime`].
//!
//! * **Warm**: [`ProcessHost::deploy`] spawns `warm_per_function` runners
//!   (default 1, the paper's one process per function), each loaded and
//!   `init()`ed, blocked on a futex. A request takes an idle runner, or waits
//!   for one: requests to the same function queue for its runners (set
//!   `warm_per_function` higher for parallelism per function).
//! * **Cold**: a new runner per request, spawned with the request already in
//!   its shared region; it loads, inits, handles, replies and exits.
//!
//! Tenants: every runner of a function runs as its tenant's own uid and
//! gid ([`crate::sandbox::SandboxSettings::for_tenant`]), so runners of
//! different tenants cannot signal, trace or read one another even if the
//! rest of their sandbox fell.
//!
//! The artifact reaches a runner as the deployed function's sealed memfd,
//! inherited at fd 4 ([`crate::runtime::fds`]); the runner maps it with the
//! runtime's own loader, so it needs no filesystem after exec.
//!
//! # IPC: shared memory + futex
//!
//! Each runner has a memfd region (header + input buffer + output buffer
//! sized to the configured limits, see [`protocol`]). The host writes the
//! input and flips the state word to REQUEST with a `FUTEX_WAKE`; the runner
//! writes the output and flips it to REPLY with a wake. Input and output are
//! never copied through the kernel. Measured round trips (wake the other
//! process, it answers; 20,000 each, `lang-isolation/examples/ipc_roundtrip.rs` and a C
//! twin, on this 2-vCPU VM host shared with other builds):
//!
//! | mechanism                   | on two cores, median / p99 | on one core (taskset), median / p99 |
//! |-----------------------------|----------------------------|-------------------------------------|
//! | futex word in shared memory | 9.9-12.4 / 17-24 us        | 2.6-2.7 / 3.3-16 us                 |
//! | eventfd pair (host `poll`s) | 11.2-12.2 / 19-24 us       | 2.9-3.0 / 4.1-15 us                 |
//! | pipe pair (host `poll`s)    | 10.6-14.0 / 18-27 us       | 3.0-3.1 / 4.6-15 us                 |
//!
//! (Under load the scheduler often puts both ends on one core, hence the
//! one-core column.) The futex is the fastest and needs the fewest syscalls.
//! The host learns of a runner's death without polling, through a robust
//! futex: the runner registers its `alive` word with `set_robust_list`, so
//! the kernel marks it FUTEX_OWNER_DIED and wakes the host however the runner
//! dies; the host waits on both words at once with `futex_waitv`, with the
//! budget as the deadline. An over-budget runner is SIGKILLed.
//!
//! Runners are started with `posix_spawn` (vfork + exec: safe in a
//! multithreaded host), reaped by the host (a reaper thread for the ones
//! nobody waits on), and killed when the host drops; an orphaned runner
//! notices within a second that its parent is gone and exits. A runner exits
//! after a panic, OOM, stack overflow or fault (its reply carries the
//! message), and the host replaces a lost warm runner right away, in the
//! failed request's thread, so the next request is warm again. A warm runner
//! found dead while idle is replaced on the request's path (that request
//! reports a cold start). Every request carries a sequence number that the
//! reply must echo, so a request is answered once or fails, never twice.
//!
//! ```text
//!  host thread                         runner (one per warm slot)
//!  input -> region, state=REQUEST  --futex wake-->  state=RUNNING, handle()
//!  futex_waitv(state, alive,                        output -> region
//!              deadline = budget)  <--futex wake--  state=REPLY
//!  timeout: SIGKILL, BudgetExceeded; alive=OWNER_DIED: reap, Crashed
//! ```

mod host;
pub mod protocol;
pub mod runner;
mod runner_handle;
mod shm;
mod spawn;

pub use host::ProcessHost;

use std::path::PathBuf;
use std::time::Duration;

/// Configuration of a [`ProcessHost`].
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// The `microfaas-runner` binary.
    pub runner_bin: PathBuf,
    /// Largest input in bytes (the input buffer's size).
    pub input_limit_bytes: usize,
    /// Largest output in bytes (the output buffer's size).
    pub output_limit_bytes: usize,
    /// Heap limit of each instance in bytes.
    pub heap_limit_bytes: usize,
    /// Stack of each instance in bytes.
    pub stack_bytes: usize,
    /// Time allowed to spawn, load and `init()` a runner.
    pub init_budget: Duration,
    /// Warm runners per function.
    pub warm_per_function: usize,
    /// The sandbox every runner enters before its function's `init()`.
    pub sandbox: crate::sandbox::SandboxSettings,
}

impl ProcessConfig {
    /// Defaults (4 MiB input and output, 64 MiB heap, 1 MiB stack, 10 s init
    /// budget, one warm runner per function) with `runner_bin`.
    pub fn new(runner_bin: impl Into<PathBuf>) -> Self {
        Self {
            runner_bin: runner_bin.into(),
            input_limit_bytes: 4 << 20,
            output_limit_bytes: 4 << 20,
            heap_limit_bytes: crate::runtime::DEFAULT_HEAP_LIMIT_BYTES,
            stack_bytes: crate::runtime::DEFAULT_STACK_BYTES,
            init_budget: Duration::from_secs(10),
            warm_per_function: 1,
            sandbox: crate::sandbox::SandboxSettings::default(),
        }
    }
}

/// How to start an invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// On a pooled runner (spawned on demand if the pool is short).
    Warm,
    /// On a new runner for this request only.
    Cold,
}

/// Which path served an invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// A resident runner.
    Warm,
    /// A runner spawned for this request.
    Cold,
}

/// A completed invocation. Times are nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The function's output.
    pub output: Vec<u8>,
    /// Which path served it.
    pub served: Served,
    /// `CLOCK_MONOTONIC` ns when the serving runner finished init.
    pub ready_ns: u64,
    /// Spawn + load + init on the request's path (0 when warm).
    pub start_ns: u64,
    /// From `invoke` to the function's entry timestamp.
    pub dispatch_ns: u64,
    /// The function's own run.
    pub exec_ns: u64,
    /// From `invoke` to the reply being copied out.
    pub total_ns: u64,
}

/// Resident state of a [`ProcessHost`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessStats {
    /// Deployed functions.
    pub functions: usize,
    /// Live runner processes.
    pub instances: usize,
    /// Sum of the runners' resident set sizes, in bytes.
    pub memory_bytes: u64,
}

/// Everything the process backend can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The runner binary does not exist.
    #[error("runner binary `{}` not found", path.display())]
    RunnerMissing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The configuration cannot be used.
    #[error("bad process backend configuration: {detail}")]
    BadConfig {
        /// Why.
        detail: String,
    },
    /// A new tenant found no uid left in the configured range.
    #[error("cannot deploy for this tenant")]
    Tenant(#[from] crate::sandbox::UidRangeExhausted),
    /// No function of that name is deployed.
    #[error("unknown function `{name}`")]
    UnknownFunction {
        /// The name.
        name: String,
    },
    /// The input is over the limit.
    #[error("input of {len} bytes exceeds the limit of {limit} bytes")]
    InputTooLarge {
        /// Input length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The output is over the limit.
    #[error("output of {len} bytes exceeds the limit of {limit} bytes")]
    OutputTooLarge {
        /// Output length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The runner overran its budget and was killed.
    #[error("function `{name}` exceeded its budget of {} us and its process was killed", budget.as_micros())]
    BudgetExceeded {
        /// Function.
        name: String,
        /// The budget.
        budget: Duration,
    },
    /// The function panicked.
    #[error("function `{name}` panicked: {message}")]
    Panicked {
        /// Function.
        name: String,
        /// Panic message.
        message: String,
    },
    /// The function's heap limit was reached.
    #[error("function `{name}` ran out of memory (heap limit {limit_bytes} bytes): {message}")]
    OutOfMemory {
        /// Function.
        name: String,
        /// The limit.
        limit_bytes: usize,
        /// The panic message.
        message: String,
    },
    /// The function overflowed its stack.
    #[error("function `{name}` overflowed its stack ({stack_bytes} bytes)")]
    StackOverflow {
        /// Function.
        name: String,
        /// Stack size.
        stack_bytes: usize,
    },
    /// `handle` returned an error.
    #[error("function `{name}` returned an error: {message}")]
    FunctionFailed {
        /// Function.
        name: String,
        /// Its message.
        message: String,
    },
    /// `init` failed (or the runner died or hung before serving).
    #[error("function `{name}` failed to initialise: {message}")]
    InitFailed {
        /// Function.
        name: String,
        /// What happened.
        message: String,
    },
    /// The artifact could not be loaded.
    #[error("runner could not load `{artifact}` for `{name}`: {message}")]
    LoadFailed {
        /// Function.
        name: String,
        /// The artifact (its label, see [`crate::runtime::SealedArtifact::label`]).
        artifact: String,
        /// The loader's message.
        message: String,
    },
    /// The runner died or faulted.
    #[error("function `{name}` crashed: {detail}")]
    Crashed {
        /// Function.
        name: String,
        /// Signal, exit status or fault.
        detail: String,
    },
    /// The function made a system call its sandbox forbids (the kernel
    /// killed its runner).
    #[error("function `{name}` broke its sandbox policy: {detail}")]
    PolicyViolation {
        /// Function.
        name: String,
        /// What happened.
        detail: String,
    },
    /// The runner broke the protocol.
    #[error("malformed reply from the runner of `{name}`: {detail}")]
    MalformedReply {
        /// Function.
        name: String,
        /// What was wrong.
        detail: String,
    },
    /// An OS operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl ProcessError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether the runner that produced this error is gone or must go.
    fn ends_runner(&self) -> bool {
        matches!(
            self,
            Self::BudgetExceeded { .. }
                | Self::Panicked { .. }
                | Self::OutOfMemory { .. }
                | Self::StackOverflow { .. }
                | Self::Crashed { .. }
                | Self::PolicyViolation { .. }
                | Self::MalformedReply { .. }
                | Self::LoadFailed { .. }
                | Self::InitFailed { .. }
                | Self::Io { .. }
        )
    }
}

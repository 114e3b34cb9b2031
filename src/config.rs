//! The one configuration type for every backend: limits, budgets, and each
//! backend's own knobs.

use std::path::PathBuf;
use std::time::Duration;

/// Default input and output limit: 4 MiB.
pub const DEFAULT_IO_LIMIT_BYTES: usize = 4 << 20;

/// Limits and budgets shared by every backend, plus per-backend sections.
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest accepted input in bytes (any byte string up to it is valid).
    pub input_limit_bytes: usize,
    /// Largest accepted output in bytes.
    pub output_limit_bytes: usize,
    /// Wall-clock budget of one invocation unless the function's spec sets
    /// its own. An over-budget invocation is stopped with `BudgetExceeded`.
    pub default_budget: Duration,
    /// Budget of a function's `init()` at deploy time or cold start.
    pub init_budget: Duration,
    /// Heap limit of one function instance in bytes.
    pub heap_limit_bytes: usize,
    /// Stack size a function runs on, in bytes.
    pub stack_bytes: usize,
    /// The process sandbox of every process that runs function code
    /// (`language` workers, `process` runners).
    pub sandbox: SandboxConfig,
    /// Knobs of the `language` backend.
    pub language: LanguageConfig,
    /// Knobs of the `vm` backend.
    pub vm: VmConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            input_limit_bytes: DEFAULT_IO_LIMIT_BYTES,
            output_limit_bytes: DEFAULT_IO_LIMIT_BYTES,
            default_budget: Duration::from_secs(2),
            init_budget: Duration::from_secs(10),
            heap_limit_bytes: 64 << 20,
            stack_bytes: 1 << 20,
            sandbox: SandboxConfig::default(),
            language: LanguageConfig::default(),
            vm: VmConfig::default(),
        }
    }
}

/// Knobs of the `language` backend.
#[derive(Debug, Clone)]
pub struct LanguageConfig {
    /// Worker processes per tenant; `None` = cores - 1, at least 1. A
    /// tenant's workers start on its first deploy or request (the default
    /// tenant's when the backend opens) and never hold another tenant's
    /// functions.
    pub workers: Option<usize>,
    /// Pin worker `i` to core `(i + 1) % cores`.
    pub pin_workers: bool,
    /// How over-budget invocations are stopped.
    pub preemption: LanguagePreemption,
    /// The dispatcher watchdog's promised preemption latency: it sleeps
    /// until the earliest deadline that could fall (not on a fixed tick),
    /// and looks again at most this often at a deadline that has passed,
    /// so an over-budget invocation stops within its budget plus this
    /// (plus signal delivery).
    pub watchdog_interval: Duration,
    /// A worker whose invocation is this far past its deadline and still
    /// running is killed (worker-lost; a strike for the function).
    pub hang_grace: Duration,
    /// Idle workers and waiting callers poll this long before parking.
    pub idle_spin: Duration,
    /// Requests in flight per worker (a power of two).
    pub queue_depth: u32,
    /// Workers a function may kill or hang before it is blacklisted.
    pub blacklist_after: u32,
    /// How long a new (or respawned) worker may take to become ready.
    pub start_timeout: Duration,
    /// Worker processes alive at once, over all tenants; `None` = 16. Each
    /// tenant has its own `workers` workers, started on its first request
    /// (or deploy); when starting them would pass this cap, the tenants
    /// idle longest have theirs stopped (least recently used; their next
    /// request starts them again, cold). Each live worker costs its
    /// resident set (a few MiB plus its tenant's loaded functions and
    /// heaps) and, while busy, a core: 16 keeps a 2-core host's memory
    /// small while holding 16 tenants warm with one worker each.
    pub max_workers: Option<usize>,
    /// How a cold start gets its instance: by default from the function's
    /// pre-linked image and its post-init snapshot (no relocation, `init()`
    /// once per worker).
    pub cold_start: LanguageColdStart,
    /// Make a function resident (its warm instance) on its first warm or
    /// automatic request instead of at deploy, so that a function only ever
    /// started cold keeps no instance (memory per deployed function); its
    /// `init()` then first runs at its first start, not at deploy. Default
    /// `false`.
    pub lazy_resident: bool,
}

/// How a `language` cold start gets its instance (see
/// `lang_isolation::runtime::prelinked`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LanguageColdStart {
    /// Map and relocate a fresh private copy of the artifact, run `init()`.
    Load,
    /// Map the function's pre-linked image copy-on-write (no relocation;
    /// nothing at all if it is still mapped), run `init()`.
    Prelinked,
    /// Like `Prelinked`, from the image's snapshot after its first
    /// `init()`: later cold starts skip `init()`.
    #[default]
    Snapshot,
}

impl Default for LanguageConfig {
    fn default() -> Self {
        Self {
            workers: None,
            pin_workers: true,
            preemption: LanguagePreemption::Watchdog,
            watchdog_interval: Duration::from_micros(50),
            hang_grace: Duration::from_millis(250),
            idle_spin: Duration::from_micros(200),
            queue_depth: 8,
            blacklist_after: 3,
            start_timeout: Duration::from_secs(20),
            max_workers: None,
            cold_start: LanguageColdStart::default(),
            lazy_resident: false,
        }
    }
}

/// The process sandbox of `language` workers and `process` runners: a
/// dedicated unprivileged uid/gid (from a root host; a non-root host uses a
/// user namespace instead), no capabilities, `no_new_privs`, not dumpable,
/// Landlock without filesystem access, the host's empty net and ipc
/// namespaces, and a seccomp allowlist with argument filters. Entered before
/// any function code runs. Every layer is on by default; the switches exist
/// for measurements and the hostile tests' control runs only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Uid sandboxed processes run as (default 64901, a uid no account
    /// uses): the default tenant's, and the base of the tenants' range.
    pub uid: u32,
    /// Gid sandboxed processes run as (default 64901), likewise the base.
    pub gid: u32,
    /// Size of the tenants' uid (and gid) range from `uid`/`gid` (default
    /// 512: 64901..=65412). Each tenant of this host process runs as its own
    /// uid `uid + k` (the default tenant `k = 0`, others 1, 2, ... in the
    /// order this process first deploys them, on any backend); a tenant
    /// past the range is refused at deploy. Every uid in the range must be
    /// one no account or other service uses.
    pub tenant_uids: u32,
    /// Drop to `uid`/`gid` and clear every capability.
    pub identity: bool,
    /// Join the host's empty network and IPC namespaces (and, for workers,
    /// a private mount namespace).
    pub namespaces: bool,
    /// Landlock: no filesystem access, no TCP, signals only inside.
    pub landlock: bool,
    /// The seccomp allowlist.
    pub seccomp: bool,
    /// `language` workers: memory protection keys between the runtime and
    /// each function instance inside one worker (where the CPU has PKU; the
    /// backend's stats say `pkeys_state`), and, with `seccomp`, memory-layout
    /// and signal system calls refused from anywhere but the worker's own
    /// code. Off: no keys (for the with/without benchmark and control runs).
    pub pkeys: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            uid: lang_isolation::sandbox::DEFAULT_SANDBOX_UID,
            gid: lang_isolation::sandbox::DEFAULT_SANDBOX_GID,
            tenant_uids: lang_isolation::sandbox::DEFAULT_TENANT_UIDS,
            identity: true,
            namespaces: true,
            landlock: true,
            seccomp: true,
            pkeys: true,
        }
    }
}

impl SandboxConfig {
    /// Every layer off: for measuring what the sandbox costs and for
    /// control runs that show an attack would otherwise succeed. Never for
    /// serving untrusted functions.
    pub fn off() -> Self {
        Self {
            identity: false,
            namespaces: false,
            landlock: false,
            seccomp: false,
            pkeys: false,
            ..Self::default()
        }
    }

    /// What memory protection keys will do in `language` workers under this
    /// configuration: `disabled by config`, `enabled (N keys)`, or
    /// `unavailable (reason)` on a host without PKU (probed here; the
    /// workers report the same through `Stats`: `pkeys_state`, `pkeys_keys`).
    pub fn pkeys_state(&self) -> lang_isolation::runtime::pkeys::PkeysState {
        if self.pkeys {
            lang_isolation::runtime::pkeys::probe()
        } else {
            lang_isolation::runtime::pkeys::PkeysState::Disabled
        }
    }

    /// As lang-isolation's settings.
    pub fn settings(&self) -> lang_isolation::sandbox::SandboxSettings {
        lang_isolation::sandbox::SandboxSettings {
            uid: self.uid,
            gid: self.gid,
            tenant_uids: self.tenant_uids,
            layers: lang_isolation::sandbox::Layers {
                identity: self.identity,
                namespaces: self.namespaces,
                landlock: self.landlock,
                seccomp: self.seccomp,
                pkeys: self.pkeys,
            },
        }
    }
}

/// How the `language` backend stops over-budget invocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LanguagePreemption {
    /// No timer: the dispatcher signals a worker only when its invocation is
    /// past its deadline. Costs an invocation within budget nothing.
    #[default]
    Watchdog,
    /// The paper's per-worker timer: SIGALRM every `quantum`.
    Periodic {
        /// Timer period (the paper's Figure 2 varies it from 5 us to 1 ms).
        quantum: Duration,
    },
    /// Budgets are not enforced: the no-preemption baseline of the
    /// preemption experiments. Not for serving untrusted functions.
    Disabled,
}

/// Knobs of the `vm` backend.
#[derive(Debug, Clone, Default)]
pub struct VmConfig {
    /// Guest memory in MiB; `None` = what the limits need (stack, input,
    /// image and a heap of `heap_limit_bytes`, ~8 MiB plus the heap). A
    /// smaller value shrinks the guest heap to fit (and is refused when no
    /// heap is left).
    pub guest_mem_mib: Option<usize>,
    /// Size of the guest region a function's segments are loaded into, in
    /// MiB; `None` = 8.
    pub image_mib: Option<usize>,
    /// Idle (hot) instances kept per function; `None` = 16. Extra instances
    /// are torn down after their request.
    pub idle_per_function: Option<usize>,
    /// Hot spinning, in microseconds: an idle guest polls its mailbox this
    /// long after each reply before blocking (and the caller polls for the
    /// reply as long), so back-to-back requests cost no VM exit (~1 us
    /// instead of ~30 us here) at the price of a busy core per spinning
    /// instance. `None` or 0 = off: every request is one exit.
    pub hot_spin_us: Option<u32>,
    /// Snapshot store directory; `None` = `$MICROFAAS_STORE` or the user's
    /// cache directory.
    pub store_dir: Option<PathBuf>,
    /// Argument snapshots kept per function (least recently used are
    /// removed); `None` = 8. 0 = no argument snapshots.
    pub arguments_per_function: Option<usize>,
    /// VM shells (VM + vCPU) created in advance for snapshot restores, off
    /// the start path; `None` = 4. 0 = create one per restore. The pool of
    /// this process is refilled only once no invocation has run for 5 ms
    /// (making one beside a start stalls it); each VMM host process keeps
    /// up to 2 of its own.
    pub shell_pool: Option<usize>,
    /// VMs per VMM host process: instances that serve requests (restores
    /// from function and argument snapshots, prestarts, the hot pool) run
    /// in host processes (`microfaas-vmhost`, per tenant) of at most this
    /// many VMs each; `None` = 512. 0 = every instance in the backend's
    /// own process (as before host processes).
    pub vms_per_host: Option<usize>,
    /// Runner threads per VMM host process; `None` = 1 (the fastest hot
    /// path measured here). A process whose runners have all been busy
    /// for 1 ms (a long request) starts more, up to about one per core
    /// plus one, so a long request does not hold up its other instances.
    pub host_runners: Option<usize>,
    /// The VMM host binary to exec; `None` = the `microfaas-vmhost` built
    /// with this crate. For tests and deployments that install it
    /// elsewhere (the hostile-host tests point it at a fixture); set by
    /// the operator only, never by a function.
    pub host_binary: Option<PathBuf>,
    /// How long a VMM host process may take to answer a control request
    /// (register, restore, drop) before it is condemned (killed, its
    /// requests failed once); `None` = 20,000 ms.
    pub host_reply_timeout_ms: Option<u64>,
    /// How long a VMM host process's runner polls its run ring after
    /// finishing a request before it sleeps, in microseconds, so a hot
    /// back-to-back request is taken with no sleep, wake or hand-off;
    /// `None` = the backend's default (100; see `DEFAULT_HOST_POLL_US`),
    /// 0 = off. Costs up to that much CPU after each request (the poll
    /// yields the CPU between looks, so a thread that shares its core still
    /// runs), only after activity (an idle process burns nothing).
    pub host_poll_us: Option<u32>,
    /// How long a VMM host process may hold no instance before it exits
    /// (its VMs, being torn down, go with it at once); `None` = 1,000 ms.
    pub host_idle_exit_ms: Option<u64>,
    /// How long a caller polls for the reply of an instance in a VMM host
    /// process before it sleeps on it, in microseconds (the guest need not
    /// spin: `hot_spin_us` makes both spin), when it is the only invocation
    /// running and the host has another CPU (concurrent callers sleep at
    /// once: polling would take their runners' CPUs); `None` = the
    /// backend's default (100; `DEFAULT_CALLER_SPIN_US`), 0 = sleep at
    /// once. Costs the caller's thread up to that much CPU per request
    /// (yielding between looks).
    pub caller_spin_us: Option<u32>,
}

//! The `Backend` trait every isolation mechanism implements, and the types
//! that cross it.

use crate::{Artifact, Error};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// The three isolation backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A process per function (Boucher et al.'s baseline).
    Process,
    /// Native calls inside per-core worker processes (Boucher et al.).
    Language,
    /// KVM micro-VMs started from snapshots (SEUSS).
    Vm,
}

impl BackendKind {
    /// Every backend, in the order tables list them.
    pub const ALL: [BackendKind; 3] = [BackendKind::Process, BackendKind::Language, BackendKind::Vm];

    /// The lowercase name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Process => "process",
            BackendKind::Language => "language",
            BackendKind::Vm => "vm",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown backend `{s}` (expected process, language or vm)"))
    }
}

/// Which path started the instance that served an invocation, slowest last
/// within each backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartPath {
    /// A resident, initialised instance (process, language).
    Warm,
    /// Nothing reused: a new process, a fresh dlopen, or a VM boot.
    Cold,
    /// An idle running VM instance was reused (vm).
    Hot,
    /// Resumed from an argument snapshot after `checkpoint()` (vm).
    Argument,
    /// Restored from the function snapshot (vm).
    Function,
    /// Restored from the base snapshot, then load + init (vm).
    Base,
    /// An idle VM instance that served earlier requests, reset to its
    /// function snapshot first (the pages it wrote, its I/O window, mailbox
    /// and registers): fresh, nothing of an earlier request left (vm).
    Reset,
}

impl StartPath {
    /// The lowercase name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            StartPath::Warm => "warm",
            StartPath::Cold => "cold",
            StartPath::Hot => "hot",
            StartPath::Argument => "argument",
            StartPath::Function => "function",
            StartPath::Base => "base",
            StartPath::Reset => "reset",
        }
    }
}

impl fmt::Display for StartPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// How the caller wants an invocation started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartRequest {
    /// The fastest path the backend has for this function and input.
    #[default]
    Auto,
    /// Exactly this path; a backend without it returns
    /// [`Error::UnsupportedStart`].
    Force(StartPath),
}

/// Who a deployed function belongs to: a trust domain. Functions of
/// different tenants never share a process that runs function code
/// (`language`: a worker per tenant; `process`: a runner per function
/// anyway, and each tenant under its own uid; `vm`: a VM per instance
/// anyway). A label of 1 to 32 characters from `[a-z0-9_-]`; the default is
/// [`Tenant::DEFAULT`], `default`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(Arc<str>);

/// A tenant label that is empty, too long or has a character outside
/// `[a-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tenant `{label}`: {reason} (a tenant is 1 to 32 characters from [a-z0-9_-])")]
pub struct InvalidTenant {
    /// The label refused (escaped for printing).
    pub label: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Tenant {
    /// The default tenant's label.
    pub const DEFAULT: &'static str = lang_isolation::sandbox::DEFAULT_TENANT;
    /// The longest label, in bytes.
    pub const MAX_LEN: usize = 32;

    /// The tenant labelled `label`, if the label is valid.
    pub fn new(label: &str) -> Result<Self, InvalidTenant> {
        let refuse = |reason| InvalidTenant {
            label: label.escape_debug().to_string(),
            reason,
        };
        if label.is_empty() {
            return Err(refuse("it is empty"));
        }
        if label.len() > Self::MAX_LEN {
            return Err(refuse("it is longer than 32 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(refuse("it has a character outside [a-z0-9_-]"));
        }
        Ok(Self(Arc::from(label)))
    }

    /// The label.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Tenant {
    fn default() -> Self {
        Self(Arc::from(Self::DEFAULT))
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl FromStr for Tenant {
    type Err = InvalidTenant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A deployable function: a name, a verified artifact and its tenant.
///
/// Function names are global to a backend: deploying a name replaces the
/// function of that name whatever its tenant was, and the tenant is a
/// property of the deployed function (the caller that deploys is trusted;
/// the function's code is not).
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    /// The name it is invoked by.
    pub name: String,
    /// The built shared object.
    pub artifact: Arc<Artifact>,
    /// Its invocation budget; `None` = [`crate::Config::default_budget`].
    pub budget: Option<Duration>,
    /// Whose function it is ([`Tenant::DEFAULT`] unless set).
    pub tenant: Tenant,
    /// Every invocation gets an instance with nothing left of an earlier
    /// request (isolation between requests): where a backend would reuse a
    /// used instance, it resets it first (`vm`: [`StartPath::Reset`]
    /// instead of `hot`). Off by default.
    pub fresh_per_request: bool,
    /// Deploy-time data handed to the artifact's `load` after its `init`
    /// (e.g. a WebAssembly module for [`crate::WASM_RUNTIME`]): one runtime
    /// artifact serves many functions, each its own module. `None`: the
    /// artifact is the whole function.
    pub module: Option<Arc<[u8]>>,
}

impl FunctionSpec {
    /// A spec with the default budget, of the default tenant.
    pub fn new(name: impl Into<String>, artifact: Arc<Artifact>) -> Self {
        Self {
            name: name.into(),
            artifact,
            budget: None,
            tenant: Tenant::default(),
            fresh_per_request: false,
            module: None,
        }
    }

    /// The spec of `name` running `module` on `runtime` (an artifact with
    /// a `load`, such as [`crate::WASM_RUNTIME`]).
    pub fn with_module(mut self, module: Arc<[u8]>) -> Self {
        self.module = Some(module);
        self
    }

    /// What identifies the function's code: the artifact's digest, or,
    /// with a module, the digest of both (a snapshot of one is never
    /// taken for the other).
    pub fn code_digest(&self) -> String {
        code_digest(&self.artifact, self.module.as_deref())
    }

    /// The same spec asking for a fresh instance per request
    /// ([`FunctionSpec::fresh_per_request`]).
    pub fn with_fresh_per_request(mut self, fresh: bool) -> Self {
        self.fresh_per_request = fresh;
        self
    }

    /// The same spec for `tenant`.
    pub fn with_tenant(mut self, tenant: Tenant) -> Self {
        self.tenant = tenant;
        self
    }

    /// The same spec with its own budget.
    pub fn with_budget(mut self, budget: Duration) -> Self {
        self.budget = Some(budget);
        self
    }
}

/// [`FunctionSpec::code_digest`] of `artifact` with `module`.
pub(crate) fn code_digest(artifact: &Artifact, module: Option<&[u8]>) -> String {
    match module {
        None => artifact.digest().to_owned(),
        Some(module) => {
            use sha2::Digest as _;
            let mut h = sha2::Sha256::new();
            h.update(b"microfaas artifact+module v1\0");
            h.update(artifact.digest().as_bytes());
            h.update((module.len() as u64).to_le_bytes());
            h.update(module);
            h.finalize().iter().map(|b| format!("{b:02x}")).collect()
        }
    }
}

/// Handle of a deployed function (its name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FunctionId(Arc<str>);

impl FunctionId {
    /// The id of the function deployed under `name`.
    pub fn new(name: &str) -> Self {
        Self(Arc::from(name))
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FunctionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where one invocation's time went, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// Making an instance ready: spawn, dlopen, restore or boot, plus load
    /// and init where the path needs them (0 for warm and hot).
    pub start_ns: u64,
    /// From `invoke` being called to the function's first instruction (the
    /// entry timestamp the artifact's shim takes); includes `start_ns`.
    pub dispatch_ns: u64,
    /// The function's own run, entry to return.
    pub exec_ns: u64,
    /// From `invoke` being called to it returning.
    pub total_ns: u64,
}

/// A completed invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// What the function returned.
    pub output: Vec<u8>,
    /// Which start path served it.
    pub start: StartPath,
    /// Where the time went.
    pub timings: Timings,
}

/// A backend's resident state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Functions deployed.
    pub functions: usize,
    /// Running instances (processes, loaded copies, VMs).
    pub instances: usize,
    /// Host memory the backend's instances hold, in bytes (resident set of
    /// its processes, or private memory of its VMs).
    pub memory_bytes: u64,
    /// Backend-specific counters, `(name, value)`.
    pub extra: Vec<(String, u64)>,
}

impl Stats {
    /// The backend-specific counter `name`, if the backend has it.
    pub fn counter(&self, name: &str) -> Option<u64> {
        self.extra.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }
}

/// One isolation mechanism. Every method takes `&self` and may be called
/// from many threads at once.
///
/// ```no_run
/// use microfaas::{Backend, BackendKind, Config, FunctionSpec, StartRequest};
///
/// let backend = microfaas::open(BackendKind::Process, Config::default())?;
/// let echo = backend.deploy(&FunctionSpec::new("echo", microfaas::builtin("echo")?))?;
/// let done = backend.invoke(&echo, b"hello", StartRequest::Auto)?;
/// assert_eq!(done.output, b"hello");
/// println!("{} start, {} ns end to end", done.start, done.timings.total_ns);
/// # Ok::<(), microfaas::Error>(())
/// ```
pub trait Backend: Send + Sync + fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// Makes a function available (replacing one of the same name). May do
    /// the function's expensive set-up (spawn, preload, snapshot) now.
    fn deploy(&self, spec: &FunctionSpec) -> Result<FunctionId, Error>;

    /// Runs the function once on `input` (any bytes, up to the input limit).
    fn invoke(&self, id: &FunctionId, input: &[u8], start: StartRequest) -> Result<Invocation, Error>;

    /// Drops the function's resident instances (warm processes, preloaded
    /// copies, idle VMs), so its next start is not warm or hot: it is cold,
    /// or on `vm` a restore from the function's snapshot, which persists.
    /// The function stays deployed.
    fn evict(&self, id: &FunctionId) -> Result<(), Error>;

    /// Starts `count` more idle instances of the function, each ready to
    /// serve a hot invocation, and returns how long each start took, in
    /// order. The function's idle pool then keeps that many instances,
    /// beyond the backend's usual idle cap (the caller asked for them), until
    /// [`Backend::evict`]: this is how density is measured. Instances
    /// started before an error stay idle.
    ///
    /// Only `vm` has per-function idle instances to start (restores of the
    /// function snapshot); the default returns [`Error::Unsupported`].
    fn prestart(&self, id: &FunctionId, count: usize) -> Result<Vec<Duration>, Error> {
        let _ = (id, count);
        Err(Error::Unsupported {
            backend: self.kind(),
            operation: "starting idle instances (prestart)",
        })
    }

    /// The backend's resident state.
    fn stats(&self) -> Stats;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_labels_are_short_and_plain() {
        for good in ["default", "a", "t-1", "team_b", &"x".repeat(32)] {
            assert_eq!(Tenant::new(good).unwrap().as_str(), good);
        }
        for (bad, why) in [
            ("", "empty"),
            (&*"x".repeat(33), "longer"),
            ("Alice", "outside"),
            ("a b", "outside"),
            ("a/b", "outside"),
            ("a\n", "outside"),
            ("caf\u{e9}", "outside"),
            ("..", "outside"),
        ] {
            let e = Tenant::new(bad).unwrap_err();
            assert!(e.reason.contains(why), "{bad:?}: {e}");
            assert!(!e.to_string().contains('\n'), "printed escaped: {e}");
        }
        assert_eq!(Tenant::default().as_str(), "default");
        assert_eq!(Tenant::default(), Tenant::new(Tenant::DEFAULT).unwrap());
        assert_eq!("t-2".parse::<Tenant>().unwrap().to_string(), "t-2");
    }
}

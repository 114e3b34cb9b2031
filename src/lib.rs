//! microfaas: one host, three isolation backends behind one [`Backend`]
//! trait, so warm and cold function starts can be compared head to head.
//!
//! * `vm`: KVM micro-VMs of our own unikernel, started from a copy-on-write
//!   snapshot tree (after SEUSS, EuroSys 2020).
//! * `language`: native calls into preloaded shared objects inside per-core
//!   worker processes (after Boucher et al., USENIX ATC 2018).
//! * `process`: a process per function, that paper's baseline.
//!
//! Open a backend with [`open`], deploy a [`FunctionSpec`] (an [`Artifact`]
//! built by `microfaas build`, or an example from [`builtin`]), and
//! [`Backend::invoke`] it.

mod artifact;
mod backend;
pub mod backends;
mod config;
mod error;
pub mod serve;

pub use artifact::{
    Artifact, WASM_RUNTIME, builtin, builtin_dir, builtin_module, builtin_module_names, builtin_modules_dir,
    builtin_names,
};
pub use backend::{
    Backend, BackendKind, FunctionId, FunctionSpec, InvalidTenant, Invocation, StartPath, StartRequest, Stats, Tenant,
    Timings,
};
pub use backends::open;
pub use config::{
    Config, DEFAULT_IO_LIMIT_BYTES, LanguageColdStart, LanguageConfig, LanguagePreemption, SandboxConfig, VmConfig,
};
pub use error::{Error, ErrorKind, error_chain};

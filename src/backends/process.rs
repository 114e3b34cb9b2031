//! The `process` backend adapter: [`lang_isolation::process::ProcessHost`]
//! (one runner process per function, or per request when cold) behind the
//! [`Backend`] trait, its errors mapped onto [`Error`].

use crate::{
    Backend, BackendKind, Config, Error, FunctionId, FunctionSpec, Invocation, StartPath, StartRequest, Stats, Timings,
};
use lang_isolation::process::{ProcessConfig, ProcessError, ProcessHost, Served, StartMode};
use std::path::Path;
use std::time::Duration;

/// The `microfaas-runner` binary the workspace build produced.
const RUNNER_BIN: &str = env!("MICROFAAS_RUNNER_BIN");

/// Opens the `process` backend.
pub fn open(config: Config) -> Result<Box<dyn Backend>, Error> {
    let mut process = ProcessConfig::new(Path::new(RUNNER_BIN));
    process.input_limit_bytes = config.input_limit_bytes;
    process.output_limit_bytes = config.output_limit_bytes;
    process.heap_limit_bytes = config.heap_limit_bytes;
    process.stack_bytes = config.stack_bytes;
    process.init_budget = config.init_budget;
    process.sandbox = config.sandbox.settings();
    let host = ProcessHost::new(process).map_err(map_error)?;
    Ok(Box::new(ProcessBackend {
        host,
        default_budget: config.default_budget,
    }))
}

/// The `process` backend.
#[derive(Debug)]
struct ProcessBackend {
    host: ProcessHost,
    default_budget: Duration,
}

impl Backend for ProcessBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Process
    }

    fn deploy(&self, spec: &FunctionSpec) -> Result<FunctionId, Error> {
        let budget = spec.budget.unwrap_or(self.default_budget);
        let code = super::function_code(spec)?;
        self.host
            .deploy_code(spec.tenant.as_str(), &spec.name, code, budget)
            .map_err(map_error)?;
        Ok(FunctionId::new(&spec.name))
    }

    fn invoke(&self, id: &FunctionId, input: &[u8], start: StartRequest) -> Result<Invocation, Error> {
        let mode = match start {
            StartRequest::Auto | StartRequest::Force(StartPath::Warm) => StartMode::Warm,
            StartRequest::Force(StartPath::Cold) => StartMode::Cold,
            StartRequest::Force(other) => {
                return Err(Error::UnsupportedStart {
                    backend: BackendKind::Process,
                    start: other,
                });
            }
        };
        let done = self.host.invoke(id.name(), input, mode).map_err(map_error)?;
        Ok(Invocation {
            output: done.output,
            start: match done.served {
                Served::Warm => StartPath::Warm,
                Served::Cold => StartPath::Cold,
            },
            timings: Timings {
                start_ns: done.start_ns,
                dispatch_ns: done.dispatch_ns,
                exec_ns: done.exec_ns,
                total_ns: done.total_ns,
            },
        })
    }

    fn evict(&self, id: &FunctionId) -> Result<(), Error> {
        self.host.evict(id.name()).map_err(map_error)
    }

    fn stats(&self) -> Stats {
        let s = self.host.stats();
        Stats {
            functions: s.functions,
            instances: s.instances,
            memory_bytes: s.memory_bytes,
            extra: Vec::new(),
        }
    }
}

/// The process backend's errors as the shared [`Error`].
fn map_error(e: ProcessError) -> Error {
    match e {
        ProcessError::RunnerMissing { .. } | ProcessError::BadConfig { .. } => Error::BackendUnavailable {
            backend: BackendKind::Process,
            reason: e.to_string(),
        },
        ProcessError::Tenant(refused) => Error::BackendUnavailable {
            backend: BackendKind::Process,
            reason: refused.to_string(),
        },
        ProcessError::UnknownFunction { name } => Error::UnknownFunction { name },
        ProcessError::InputTooLarge { len, limit } => Error::InputTooLarge { len, limit },
        ProcessError::OutputTooLarge { len, limit } => Error::OutputTooLarge { len, limit },
        ProcessError::BudgetExceeded { name, budget } => Error::BudgetExceeded { name, budget },
        ProcessError::Panicked { name, message } => Error::Panicked { name, message },
        ProcessError::OutOfMemory { name, limit_bytes, .. } => Error::OutOfMemory { name, limit_bytes },
        ProcessError::StackOverflow { name, stack_bytes } => Error::StackOverflow { name, stack_bytes },
        ProcessError::FunctionFailed { name, message } => Error::FunctionFailed { name, message },
        ProcessError::InitFailed { name, message } => Error::InitFailed { name, message },
        ProcessError::LoadFailed { artifact, message, .. } => Error::InvalidArtifact {
            path: artifact.into(),
            reason: message,
        },
        ProcessError::Crashed { name, detail } => Error::Crashed { name, detail },
        ProcessError::PolicyViolation { name, detail } => Error::PolicyViolation { name, detail },
        ProcessError::MalformedReply { name, detail } => Error::MalformedReply { name, detail },
        ProcessError::Io { context, source } => Error::Io { context, source },
    }
}

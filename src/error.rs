//! The one error type every backend returns: same case, same error.

use crate::backend::{BackendKind, StartPath};
use std::path::PathBuf;
use std::time::Duration;

/// Everything an invocation, a deploy or a backend can fail with. Backends
/// map their own failures onto these variants so that the same bad case gives
/// the same variant whatever the isolation mechanism.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No function of that name is deployed on this backend.
    #[error("unknown function `{name}`")]
    UnknownFunction {
        /// The name asked for.
        name: String,
    },
    /// The input is larger than the configured limit.
    #[error("input of {len} bytes exceeds the limit of {limit} bytes")]
    InputTooLarge {
        /// Input length in bytes.
        len: usize,
        /// Configured limit in bytes.
        limit: usize,
    },
    /// The function's output is larger than the configured limit.
    #[error("output of {len} bytes exceeds the limit of {limit} bytes")]
    OutputTooLarge {
        /// Output length in bytes.
        len: usize,
        /// Configured limit in bytes.
        limit: usize,
    },
    /// The invocation ran past its budget and was stopped.
    #[error("function `{name}` exceeded its budget of {} us and was stopped", budget.as_micros())]
    BudgetExceeded {
        /// Function name.
        name: String,
        /// The budget it had.
        budget: Duration,
    },
    /// The function panicked.
    #[error("function `{name}` panicked: {message}")]
    Panicked {
        /// Function name.
        name: String,
        /// The panic message.
        message: String,
    },
    /// The function's heap reached its limit and the function could not go on.
    #[error("function `{name}` ran out of memory (heap limit {limit_bytes} bytes)")]
    OutOfMemory {
        /// Function name.
        name: String,
        /// The heap limit in bytes.
        limit_bytes: usize,
    },
    /// The function overflowed its stack.
    #[error("function `{name}` overflowed its stack ({stack_bytes} bytes)")]
    StackOverflow {
        /// Function name.
        name: String,
        /// The stack size in bytes.
        stack_bytes: usize,
    },
    /// `handle` returned an error.
    #[error("function `{name}` returned an error: {message}")]
    FunctionFailed {
        /// Function name.
        name: String,
        /// The message the function returned.
        message: String,
    },
    /// `init` returned an error or failed while deploying.
    #[error("function `{name}` failed to initialise: {message}")]
    InitFailed {
        /// Function name.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// The function's process or instance died in a way none of the more
    /// specific variants describe (e.g. a fatal signal, a guest exception).
    #[error("function `{name}` crashed: {detail}")]
    Crashed {
        /// Function name.
        name: String,
        /// What was observed (signal, exit status, guest fault).
        detail: String,
    },
    /// The worker serving the request died while it was in flight; the
    /// request was not completed and was not retried.
    #[error("worker lost while running `{name}`: {detail}")]
    WorkerLost {
        /// Function name.
        name: String,
        /// What was observed.
        detail: String,
    },
    /// The function made a system call its sandbox forbids.
    #[error("function `{name}` violated the sandbox policy: {detail}")]
    PolicyViolation {
        /// Function name.
        name: String,
        /// The forbidden call.
        detail: String,
    },
    /// The function was refused because it repeatedly killed or hung workers.
    #[error("function `{name}` is blacklisted: {reason}")]
    Blacklisted {
        /// Function name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The guest or runtime answered with something that violates the protocol.
    #[error("malformed reply from the runtime of `{name}`: {detail}")]
    MalformedReply {
        /// Function name.
        name: String,
        /// What was wrong with it.
        detail: String,
    },
    /// A snapshot file failed a check and was not used.
    #[error("snapshot `{}` is corrupt: {detail}", path.display())]
    SnapshotCorrupt {
        /// The offending file.
        path: PathBuf,
        /// What check failed.
        detail: String,
    },
    /// `/dev/kvm` cannot be used.
    #[error("KVM is unavailable: {detail}")]
    KvmUnavailable {
        /// Why.
        detail: String,
    },
    /// The backend is not available in this build or on this host.
    #[error("backend `{backend}` is unavailable: {reason}")]
    BackendUnavailable {
        /// Which backend.
        backend: BackendKind,
        /// Why.
        reason: String,
    },
    /// The caller forced a start path this backend does not have.
    #[error("backend `{backend}` has no `{start}` start path")]
    UnsupportedStart {
        /// Which backend.
        backend: BackendKind,
        /// The path asked for.
        start: StartPath,
    },
    /// The backend does not offer this operation.
    #[error("backend `{backend}` does not support {operation}")]
    Unsupported {
        /// Which backend.
        backend: BackendKind,
        /// What was asked for.
        operation: &'static str,
    },
    /// The artifact is not a valid microfaas function artifact.
    #[error("invalid artifact `{}`: {reason}", path.display())]
    InvalidArtifact {
        /// The artifact file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An operating-system operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The variant of an [`Error`] without its data, for comparing errors across
/// backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[allow(missing_docs)]
pub enum ErrorKind {
    UnknownFunction,
    InputTooLarge,
    OutputTooLarge,
    BudgetExceeded,
    Panicked,
    OutOfMemory,
    StackOverflow,
    FunctionFailed,
    InitFailed,
    Crashed,
    WorkerLost,
    PolicyViolation,
    Blacklisted,
    MalformedReply,
    SnapshotCorrupt,
    KvmUnavailable,
    BackendUnavailable,
    UnsupportedStart,
    Unsupported,
    InvalidArtifact,
    Io,
}

impl Error {
    /// This error's variant, without data.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::UnknownFunction { .. } => ErrorKind::UnknownFunction,
            Error::InputTooLarge { .. } => ErrorKind::InputTooLarge,
            Error::OutputTooLarge { .. } => ErrorKind::OutputTooLarge,
            Error::BudgetExceeded { .. } => ErrorKind::BudgetExceeded,
            Error::Panicked { .. } => ErrorKind::Panicked,
            Error::OutOfMemory { .. } => ErrorKind::OutOfMemory,
            Error::StackOverflow { .. } => ErrorKind::StackOverflow,
            Error::FunctionFailed { .. } => ErrorKind::FunctionFailed,
            Error::InitFailed { .. } => ErrorKind::InitFailed,
            Error::Crashed { .. } => ErrorKind::Crashed,
            Error::WorkerLost { .. } => ErrorKind::WorkerLost,
            Error::PolicyViolation { .. } => ErrorKind::PolicyViolation,
            Error::Blacklisted { .. } => ErrorKind::Blacklisted,
            Error::MalformedReply { .. } => ErrorKind::MalformedReply,
            Error::SnapshotCorrupt { .. } => ErrorKind::SnapshotCorrupt,
            Error::KvmUnavailable { .. } => ErrorKind::KvmUnavailable,
            Error::BackendUnavailable { .. } => ErrorKind::BackendUnavailable,
            Error::UnsupportedStart { .. } => ErrorKind::UnsupportedStart,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::InvalidArtifact { .. } => ErrorKind::InvalidArtifact,
            Error::Io { .. } => ErrorKind::Io,
        }
    }

    /// An [`Error::Io`] with `context`.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// `err` and its causes on one line, joined by `: ` (an [`Error::Io`]'s
/// `Display` shows only its context; its cause is its `source`).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

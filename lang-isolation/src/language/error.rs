//! Errors of the language backend's dispatcher.

use std::time::Duration;

/// Everything a dispatcher call can fail with. The root crate maps each
/// variant onto its one `Error` type.
#[derive(Debug, thiserror::Error)]
pub enum LanguageError {
    /// No function with that index is deployed.
    #[error("unknown function")]
    UnknownFunction,
    /// Input over the limit.
    #[error("input of {len} bytes exceeds the limit of {limit} bytes")]
    InputTooLarge {
        /// Input bytes.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Output over the limit.
    #[error("output of {len} bytes exceeds the limit of {limit} bytes")]
    OutputTooLarge {
        /// Output bytes.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Preempted at its deadline.
    #[error("exceeded its budget of {} us", budget.as_micros())]
    BudgetExceeded {
        /// The budget.
        budget: Duration,
    },
    /// The function panicked.
    #[error("panicked: {message}")]
    Panicked {
        /// The panic message.
        message: String,
    },
    /// The heap limit was reached.
    #[error("ran out of memory (heap limit {limit_bytes} bytes)")]
    OutOfMemory {
        /// The limit.
        limit_bytes: usize,
    },
    /// The guard page was hit.
    #[error("overflowed its stack ({stack_bytes} bytes)")]
    StackOverflow {
        /// Usable stack bytes.
        stack_bytes: usize,
    },
    /// `handle` returned an error.
    #[error("returned an error: {message}")]
    FunctionFailed {
        /// Its message.
        message: String,
    },
    /// Loading or `init` failed.
    #[error("failed to initialise: {message}")]
    InitFailed {
        /// What went wrong.
        message: String,
    },
    /// The function faulted in a way the runtime caught but cannot name.
    #[error("crashed: {detail}")]
    Crashed {
        /// What was observed.
        detail: String,
    },
    /// A new tenant found no uid left in the configured range.
    #[error("cannot serve this tenant")]
    Tenant(#[from] crate::sandbox::UidRangeExhausted),
    /// Every live worker the cap allows is busy serving other tenants, and
    /// none became idle within the start timeout.
    #[error("no room for another tenant's workers: {detail}")]
    AtCapacity {
        /// The cap and what held it.
        detail: String,
    },
    /// The worker died with the request in flight.
    #[error("worker lost: {detail}")]
    WorkerLost {
        /// What was observed.
        detail: String,
    },
    /// A forbidden system call.
    #[error("violated the sandbox policy: {detail}")]
    PolicyViolation {
        /// The call.
        detail: String,
    },
    /// Refused: it killed or hung workers too often.
    #[error("blacklisted: {reason}")]
    Blacklisted {
        /// Why.
        reason: String,
    },
    /// The worker wrote something that violates the protocol.
    #[error("malformed reply: {detail}")]
    Malformed {
        /// What.
        detail: String,
    },
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
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

impl LanguageError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

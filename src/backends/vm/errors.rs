//! Mapping a guest's non-`Ok` replies and failed requests onto the
//! trait's errors (one error per case, whatever the backend).

use super::{VmBackend, error_chain};
use crate::Error;
use std::time::Duration;
use vmm::{Instance, RunError, Status};

impl VmBackend {
    /// The trait error for a non-`Ok` reply.
    pub(super) fn reply_error(
        &self,
        name: &str,
        instance: &Instance,
        status: Status,
        data: &[u8],
        init: bool,
    ) -> Error {
        let message = String::from_utf8_lossy(data).into_owned();
        let name = name.to_owned();
        // Whatever stopped `init()` fails the deploy or start as InitFailed,
        // as on the other backends.
        let init_failed = |what: &str| Error::InitFailed {
            name: name.clone(),
            message: format!("init() {what}: {message}"),
        };
        match status {
            Status::InitFailed => init_failed("returned an error"),
            Status::FunctionError if init => init_failed("returned an error"),
            Status::Panicked if init => init_failed("panicked"),
            Status::OutOfMemory if init => init_failed("ran out of memory"),
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
    pub(super) fn run_error(&self, name: &str, instance: &Instance, e: RunError, budget: Duration) -> Error {
        let name = name.to_owned();
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
            RunError::Lost => Error::WorkerLost {
                name,
                detail: "the VMM host process running the instance died".to_owned(),
            },
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

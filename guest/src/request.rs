//! Decoding what the host put in the boot info and the mailbox. The host is
//! trusted more than the function, but a request is still checked against
//! the layout before the runtime acts on it.

use guest_abi::{BOOT_MAGIC, BootInfo, CHANNEL_ABI_VERSION, Mailbox, op};

/// A decoded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Load the artifact of `len` bytes at the start of the I/O window.
    Load {
        /// Artifact length.
        len: usize,
    },
    /// Invoke on the input of `len` bytes at the start of the I/O window.
    Invoke {
        /// Input length.
        len: usize,
    },
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// Unknown operation code.
    UnknownOp(u32),
    /// The payload does not fit the I/O window.
    TooLong,
}

impl RequestError {
    /// A static message for the reply.
    pub fn message(&self) -> &'static str {
        match self {
            RequestError::UnknownOp(_) => "unknown request op",
            RequestError::TooLong => "request payload larger than the I/O window",
        }
    }
}

/// Decodes the request half of `mailbox` against an I/O window of `io_bytes`.
pub fn decode(mailbox: &Mailbox, io_bytes: u64) -> Result<Request, RequestError> {
    if mailbox.arg_len > io_bytes {
        return Err(RequestError::TooLong);
    }
    let len = usize::try_from(mailbox.arg_len).map_err(|_| RequestError::TooLong)?;
    match mailbox.op {
        op::LOAD => Ok(Request::Load { len }),
        op::INVOKE => Ok(Request::Invoke { len }),
        other => Err(RequestError::UnknownOp(other)),
    }
}

/// Whether the boot info is one this runtime understands.
pub fn boot_info_valid(info: &BootInfo) -> bool {
    info.magic == BOOT_MAGIC
        && info.abi_version == CHANNEL_ABI_VERSION
        && info.stack_bottom < info.stack_top
        && info.heap_bytes > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(op: u32, arg_len: u64) -> Mailbox {
        Mailbox {
            req_seq: 1,
            op,
            arg_len,
            ..Mailbox::default()
        }
    }

    #[test]
    fn decodes_known_ops() {
        assert_eq!(decode(&mb(op::LOAD, 10), 100), Ok(Request::Load { len: 10 }));
        assert_eq!(decode(&mb(op::INVOKE, 100), 100), Ok(Request::Invoke { len: 100 }));
    }

    #[test]
    fn refuses_bad_requests() {
        assert_eq!(decode(&mb(99, 0), 100), Err(RequestError::UnknownOp(99)));
        assert_eq!(decode(&mb(op::INVOKE, 101), 100), Err(RequestError::TooLong));
        assert_eq!(decode(&mb(op::INVOKE, u64::MAX), 100), Err(RequestError::TooLong));
    }

    #[test]
    fn checks_boot_info() {
        let mut info = BootInfo {
            magic: BOOT_MAGIC,
            abi_version: CHANNEL_ABI_VERSION,
            stack_bottom: 1,
            stack_top: 2,
            heap_bytes: 1,
            ..BootInfo::default()
        };
        assert!(boot_info_valid(&info));
        info.abi_version += 1;
        assert!(!boot_info_valid(&info));
    }
}

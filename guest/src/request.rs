//! Decoding what the host put in the boot info and the mailbox. The host is
//! trusted more than the function, but a request is still checked against
//! the layout before the runtime acts on it.

use guest_abi::{BOOT_MAGIC, BootInfo, CHANNEL_ABI_VERSION, LoadRequest, Mailbox, op};

/// A decoded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Run `init()` of the function the host loaded; a [`LoadRequest`] of
    /// `len` bytes is at the start of the I/O window.
    Load {
        /// Payload length.
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
    /// A `LOAD` payload that is not a [`LoadRequest`], or whose entry
    /// points are outside the image region.
    BadLoad,
}

impl RequestError {
    /// A static message for the reply.
    pub fn message(&self) -> &'static str {
        match self {
            RequestError::UnknownOp(_) => "unknown request op",
            RequestError::TooLong => "request payload larger than the I/O window",
            RequestError::BadLoad => "load request malformed or its entry points outside the image region",
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

/// Decodes a `LOAD` payload (`bytes`, from the I/O window) and checks its
/// entry points lie in the image region `[image_addr, image_addr + image_bytes)`.
pub fn decode_load(bytes: &[u8], image_addr: u64, image_bytes: u64) -> Result<LoadRequest, RequestError> {
    if bytes.len() != core::mem::size_of::<LoadRequest>() {
        return Err(RequestError::BadLoad);
    }
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let req = LoadRequest {
        init_addr: word(0),
        handle_addr: word(8),
    };
    let inside = |a: u64| a >= image_addr && a - image_addr < image_bytes;
    if inside(req.init_addr) && inside(req.handle_addr) {
        Ok(req)
    } else {
        Err(RequestError::BadLoad)
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
    fn load_requests_point_into_the_image() {
        let bytes = |init: u64, handle: u64| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&init.to_le_bytes());
            b[8..].copy_from_slice(&handle.to_le_bytes());
            b
        };
        assert_eq!(
            decode_load(&bytes(0x1000, 0x1fff), 0x1000, 0x1000),
            Ok(LoadRequest {
                init_addr: 0x1000,
                handle_addr: 0x1fff
            })
        );
        for (i, h) in [(0xfff, 0x1000), (0x1000, 0x2000), (u64::MAX, 0x1000), (0, 0)] {
            assert_eq!(decode_load(&bytes(i, h), 0x1000, 0x1000), Err(RequestError::BadLoad));
        }
        assert_eq!(decode_load(&[0; 15], 0, 1 << 20), Err(RequestError::BadLoad));
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

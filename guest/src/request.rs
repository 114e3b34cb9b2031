//! Decoding what the host put in the boot info and the mailbox. The host is
//! trusted more than the function, but a request is still checked against
//! the layout before the runtime acts on it.

use guest_abi::{BOOT_MAGIC, BootInfo, CHANNEL_ABI_VERSION, LoadRequest, Mailbox, ModuleRequest, op};

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
    /// Hand the module in the image region to the function's `load()`; a
    /// [`ModuleRequest`] of `len` bytes is at the start of the I/O window.
    Module {
        /// Payload length.
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
    /// A `MODULE` payload that is not a [`ModuleRequest`], or whose bytes
    /// are not inside the image region.
    BadModule,
}

impl RequestError {
    /// A static message for the reply.
    pub fn message(&self) -> &'static str {
        match self {
            RequestError::UnknownOp(_) => "unknown request op",
            RequestError::TooLong => "request payload larger than the I/O window",
            RequestError::BadLoad => "load request malformed or its entry points outside the image region",
            RequestError::BadModule => "module request malformed or its bytes outside the image region",
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
        op::MODULE => Ok(Request::Module { len }),
        other => Err(RequestError::UnknownOp(other)),
    }
}

/// The little-endian `u64` at `at` of `bytes` (which holds it).
fn word(bytes: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Decodes a `LOAD` payload (`bytes`, from the I/O window) and checks its
/// entry points lie in the image region `[image_addr, image_addr + image_bytes)`
/// (the optional `load` entry point may be 0: none).
pub fn decode_load(bytes: &[u8], image_addr: u64, image_bytes: u64) -> Result<LoadRequest, RequestError> {
    if bytes.len() != core::mem::size_of::<LoadRequest>() {
        return Err(RequestError::BadLoad);
    }
    let req = LoadRequest {
        init_addr: word(bytes, 0),
        handle_addr: word(bytes, 8),
        load_addr: word(bytes, 16),
    };
    let inside = |a: u64| a >= image_addr && a - image_addr < image_bytes;
    if inside(req.init_addr) && inside(req.handle_addr) && (req.load_addr == 0 || inside(req.load_addr)) {
        Ok(req)
    } else {
        Err(RequestError::BadLoad)
    }
}

/// Decodes a `MODULE` payload and checks the module's bytes lie in the
/// image region `[image_addr, image_addr + image_bytes)`.
pub fn decode_module(bytes: &[u8], image_addr: u64, image_bytes: u64) -> Result<ModuleRequest, RequestError> {
    if bytes.len() != core::mem::size_of::<ModuleRequest>() {
        return Err(RequestError::BadModule);
    }
    let req = ModuleRequest {
        addr: word(bytes, 0),
        len: word(bytes, 8),
    };
    let end = image_addr.checked_add(image_bytes).ok_or(RequestError::BadModule)?;
    match req.addr.checked_add(req.len) {
        Some(last) if req.addr >= image_addr && last <= end => Ok(req),
        _ => Err(RequestError::BadModule),
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
        assert_eq!(decode(&mb(op::MODULE, 16), 100), Ok(Request::Module { len: 16 }));
    }

    #[test]
    fn refuses_bad_requests() {
        assert_eq!(decode(&mb(99, 0), 100), Err(RequestError::UnknownOp(99)));
        assert_eq!(decode(&mb(op::INVOKE, 101), 100), Err(RequestError::TooLong));
        assert_eq!(decode(&mb(op::INVOKE, u64::MAX), 100), Err(RequestError::TooLong));
    }

    fn words<const N: usize>(w: [u64; N]) -> [u8; 24] {
        let mut b = [0u8; 24];
        for (i, v) in w.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    #[test]
    fn load_requests_point_into_the_image() {
        assert_eq!(
            decode_load(&words([0x1000, 0x1fff, 0]), 0x1000, 0x1000),
            Ok(LoadRequest {
                init_addr: 0x1000,
                handle_addr: 0x1fff,
                load_addr: 0,
            })
        );
        assert!(decode_load(&words([0x1000, 0x1fff, 0x1800]), 0x1000, 0x1000).is_ok());
        for (i, h, l) in [
            (0xfff, 0x1000, 0),
            (0x1000, 0x2000, 0),
            (u64::MAX, 0x1000, 0),
            (0, 0, 0),
            (0x1000, 0x1000, 0x2000),
            (0x1000, 0x1000, 0xfff),
        ] {
            assert_eq!(
                decode_load(&words([i, h, l]), 0x1000, 0x1000),
                Err(RequestError::BadLoad)
            );
        }
        assert_eq!(decode_load(&[0; 16], 0, 1 << 20), Err(RequestError::BadLoad));
    }

    #[test]
    fn module_requests_lie_in_the_image() {
        let req = |addr: u64, len: u64| {
            let b = words([addr, len]);
            decode_module(&b[..16], 0x1000, 0x1000)
        };
        assert_eq!(
            req(0x1800, 0x800),
            Ok(ModuleRequest {
                addr: 0x1800,
                len: 0x800
            })
        );
        assert_eq!(req(0x1000, 0), Ok(ModuleRequest { addr: 0x1000, len: 0 }));
        for (addr, len) in [(0x1800, 0x801), (0xfff, 1), (u64::MAX, 2), (0x1000, u64::MAX)] {
            assert_eq!(req(addr, len), Err(RequestError::BadModule), "{addr:#x}+{len:#x}");
        }
        assert_eq!(decode_module(&[0; 24], 0x1000, 0x1000), Err(RequestError::BadModule));
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

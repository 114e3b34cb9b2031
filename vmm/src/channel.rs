//! The host side of the mailbox: encoding a request and decoding the
//! guest's reply. The reply is untrusted: its sequence number, status,
//! output range and lengths are all checked here, as pure functions over
//! the mailbox bytes, before anything is read from guest memory. An output
//! or message is accepted only from inside the I/O window, so a reply
//! forged by the function cannot make the host copy out anything else
//! (page tables, descriptor tables, the fault stack, the kernel).

use crate::layout::Layout;
use guest_abi::{Mailbox, reply};
use std::mem::{offset_of, size_of};

/// Size of the mailbox structure in bytes.
pub const MAILBOX_BYTES: usize = size_of::<Mailbox>();
/// Byte ranges of the mailbox the host writes (request half, clock pair).
pub const HOST_FIELDS: [(usize, usize); 2] = [
    (offset_of!(Mailbox, req_seq), offset_of!(Mailbox, resp_seq)),
    (offset_of!(Mailbox, host_ns), offset_of!(Mailbox, guest_spinning)),
];
/// Longest error/panic message copied out of the guest.
pub const MESSAGE_LIMIT: u64 = 64 << 10;

/// What the guest said its request ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Success.
    Ok,
    /// The function returned an error (message).
    FunctionError,
    /// The function panicked (message); instance unusable.
    Panicked,
    /// The heap refused an allocation and the function gave up (message).
    OutOfMemory,
    /// The artifact could not be loaded (message).
    LoadFailed,
    /// The runtime refused the request (message).
    BadRequest,
    /// `init()` failed (message).
    InitFailed,
}

/// A reply that passed every check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckedReply {
    /// Outcome.
    pub status: Status,
    /// Guest address of the output or message.
    pub addr: u64,
    /// Its length (for messages, already capped at [`MESSAGE_LIMIT`]).
    pub len: u64,
    /// Function entry (host monotonic ns), 0 if it did not run.
    pub entered_ns: u64,
    /// Function return (host monotonic ns), 0 if it did not run.
    pub returned_ns: u64,
    /// Heap bytes in use.
    pub heap_used: u64,
}

/// Why a reply was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The reply answers another request.
    #[error("reply for request {got}, expected {expected}")]
    WrongSequence {
        /// The request sent.
        expected: u32,
        /// What the reply claims to answer.
        got: u32,
    },
    /// A reply to this request was in the mailbox before it was sent.
    #[error("a reply to request {seq} was in the mailbox before the request was sent")]
    Unrequested {
        /// The request.
        seq: u32,
    },
    /// Unknown status code.
    #[error("unknown status {0}")]
    UnknownStatus(u32),
    /// The output range is not inside the I/O window.
    #[error("output range {addr:#x}+{len} is outside the I/O window")]
    OutOfBounds {
        /// Claimed address.
        addr: u64,
        /// Claimed length.
        len: u64,
    },
    /// The output is longer than the caller accepts.
    #[error("output of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Claimed length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// Timestamps go backwards.
    #[error("function returned ({returned}) before it was entered ({entered})")]
    Timestamps {
        /// Entry.
        entered: u64,
        /// Return.
        returned: u64,
    },
}

fn u32_at(b: &[u8; MAILBOX_BYTES], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8; MAILBOX_BYTES], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Parses the mailbox from its bytes (any bytes are a valid `Mailbox`).
pub fn parse(b: &[u8; MAILBOX_BYTES]) -> Mailbox {
    use std::mem::offset_of;
    Mailbox {
        req_seq: u32_at(b, offset_of!(Mailbox, req_seq)),
        op: u32_at(b, offset_of!(Mailbox, op)),
        arg_len: u64_at(b, offset_of!(Mailbox, arg_len)),
        resp_seq: u32_at(b, offset_of!(Mailbox, resp_seq)),
        status: u32_at(b, offset_of!(Mailbox, status)),
        out_addr: u64_at(b, offset_of!(Mailbox, out_addr)),
        out_len: u64_at(b, offset_of!(Mailbox, out_len)),
        entered_ns: u64_at(b, offset_of!(Mailbox, entered_ns)),
        returned_ns: u64_at(b, offset_of!(Mailbox, returned_ns)),
        heap_used: u64_at(b, offset_of!(Mailbox, heap_used)),
        host_ns: u64_at(b, offset_of!(Mailbox, host_ns)),
        host_tsc: u64_at(b, offset_of!(Mailbox, host_tsc)),
        guest_spinning: u32_at(b, offset_of!(Mailbox, guest_spinning)),
        checkpoint_seq: u32_at(b, offset_of!(Mailbox, checkpoint_seq)),
    }
}

/// The request half of the mailbox for request `seq`, sent at host time
/// `host_ns` when the guest's TSC read `host_tsc`, as bytes to write at the
/// mailbox address (the reply half is cleared).
pub fn encode_request(seq: u32, op: u32, arg_len: u64, host_ns: u64, host_tsc: u64) -> [u8; MAILBOX_BYTES] {
    use std::mem::offset_of;
    let mut b = [0u8; MAILBOX_BYTES];
    b[offset_of!(Mailbox, req_seq)..][..4].copy_from_slice(&seq.to_le_bytes());
    b[offset_of!(Mailbox, op)..][..4].copy_from_slice(&op.to_le_bytes());
    b[offset_of!(Mailbox, arg_len)..][..8].copy_from_slice(&arg_len.to_le_bytes());
    b[offset_of!(Mailbox, host_ns)..][..8].copy_from_slice(&host_ns.to_le_bytes());
    b[offset_of!(Mailbox, host_tsc)..][..8].copy_from_slice(&host_tsc.to_le_bytes());
    b
}

/// Checks, before request `next_seq` is published, that the mailbox's
/// reply sequence number (`resp_seq`, read now) does not already claim to
/// answer it: the host never accepts a reply to a request it has not sent.
pub fn check_unsent(resp_seq: u32, next_seq: u32) -> Result<(), ReplyError> {
    if resp_seq == next_seq {
        return Err(ReplyError::Unrequested { seq: next_seq });
    }
    Ok(())
}

/// Checks the reply in `mb` to request `expected_seq`. An `Ok` output may be
/// at most `output_limit` bytes; messages are capped at [`MESSAGE_LIMIT`].
pub fn check_reply(
    mb: &Mailbox,
    expected_seq: u32,
    layout: &Layout,
    output_limit: u64,
) -> Result<CheckedReply, ReplyError> {
    if mb.resp_seq != expected_seq {
        return Err(ReplyError::WrongSequence {
            expected: expected_seq,
            got: mb.resp_seq,
        });
    }
    let status = match mb.status {
        reply::OK => Status::Ok,
        reply::FUNCTION_ERROR => Status::FunctionError,
        reply::PANICKED => Status::Panicked,
        reply::OUT_OF_MEMORY => Status::OutOfMemory,
        reply::LOAD_FAILED => Status::LoadFailed,
        reply::BAD_REQUEST => Status::BadRequest,
        reply::INIT_FAILED => Status::InitFailed,
        other => return Err(ReplyError::UnknownStatus(other)),
    };
    let len = if status == Status::Ok {
        if mb.out_len > output_limit {
            return Err(ReplyError::TooLarge {
                len: mb.out_len,
                limit: output_limit,
            });
        }
        mb.out_len
    } else {
        mb.out_len.min(MESSAGE_LIMIT)
    };
    if len > 0 && !layout.in_io_window(mb.out_addr, len) {
        return Err(ReplyError::OutOfBounds { addr: mb.out_addr, len });
    }
    if mb.returned_ns < mb.entered_ns {
        return Err(ReplyError::Timestamps {
            entered: mb.entered_ns,
            returned: mb.returned_ns,
        });
    }
    Ok(CheckedReply {
        status,
        addr: mb.out_addr,
        len,
        entered_ns: mb.entered_ns,
        returned_ns: mb.returned_ns,
        heap_used: mb.heap_used,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_before_its_request_is_refused() {
        assert_eq!(check_unsent(4, 5), Ok(()));
        assert_eq!(check_unsent(0, 1), Ok(()));
        assert_eq!(check_unsent(5, 5), Err(ReplyError::Unrequested { seq: 5 }));
    }

    fn layout() -> Layout {
        crate::layout::small_test_layout()
    }

    fn ok(addr: u64, len: u64) -> Mailbox {
        Mailbox {
            req_seq: 3,
            resp_seq: 3,
            status: reply::OK,
            out_addr: addr,
            out_len: len,
            entered_ns: 10,
            returned_ns: 20,
            ..Mailbox::default()
        }
    }

    #[test]
    fn accepts_a_good_reply() {
        let l = layout();
        let r = check_reply(&ok(l.io_addr, 5), 3, &l, 100).unwrap();
        assert_eq!((r.status, r.addr, r.len), (Status::Ok, l.io_addr, 5));
        let end = l.io_addr + l.io_bytes;
        assert!(check_reply(&ok(end - 5, 5), 3, &l, 100).is_ok());
        // An empty output may have any address.
        assert!(check_reply(&ok(u64::MAX, 0), 3, &l, 100).is_ok());
    }

    #[test]
    fn refuses_out_of_bounds_and_overflowing_ranges() {
        let l = layout();
        for (addr, len) in [
            (l.io_addr - 1, 1),
            (l.io_addr + l.io_bytes - 4, 5),
            (l.heap_addr, 1),
            (l.image_addr, 16),
            (l.stack_top - 64, 8),
            (crate::layout::PAGE_TABLES_ADDR, 4096),
            (crate::layout::IDT_ADDR, 512),
            (crate::layout::GDT_ADDR, 56),
            (crate::layout::FAULT_STACK_TOP - 56, 56),
            (guest_abi::FAULT_STUBS_ADDR, 512),
            (guest_abi::KERNEL_TEXT_ADDR, 64),
            (guest_abi::MAILBOX_ADDR, 64),
            (0, 1),
            (l.mem_bytes, 1),
            (l.mem_bytes - 1, 2),
            (u64::MAX, 1),
            (u64::MAX - 1, 8),
            (1, u64::MAX),
        ] {
            let e = check_reply(&ok(addr, len), 3, &l, u64::MAX).unwrap_err();
            assert!(matches!(e, ReplyError::OutOfBounds { .. }), "{addr:#x}+{len}: {e}");
        }
    }

    #[test]
    fn refuses_stale_unknown_oversized_and_backwards() {
        let l = layout();
        assert_eq!(
            check_reply(&ok(l.io_addr, 1), 4, &l, 10),
            Err(ReplyError::WrongSequence { expected: 4, got: 3 })
        );
        let mut mb = ok(l.io_addr, 1);
        mb.status = 99;
        assert_eq!(check_reply(&mb, 3, &l, 10), Err(ReplyError::UnknownStatus(99)));
        assert!(matches!(
            check_reply(&ok(l.io_addr, 11), 3, &l, 10),
            Err(ReplyError::TooLarge { .. })
        ));
        let mut mb = ok(l.io_addr, 1);
        mb.returned_ns = 1;
        assert!(matches!(
            check_reply(&mb, 3, &l, 10),
            Err(ReplyError::Timestamps { .. })
        ));
    }

    #[test]
    fn messages_are_capped() {
        let l = layout();
        let mut mb = ok(l.io_addr, u64::MAX);
        mb.status = reply::PANICKED;
        let r = check_reply(&mb, 3, &l, 0).unwrap();
        assert_eq!((r.status, r.len), (Status::Panicked, MESSAGE_LIMIT));
    }

    #[test]
    fn random_mailboxes_never_pass_unchecked() {
        let l = layout();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..100_000 {
            let mut bytes = [0u8; MAILBOX_BYTES];
            for chunk in bytes.chunks_mut(8) {
                let v = next().to_le_bytes();
                chunk.copy_from_slice(&v[..chunk.len()]);
            }
            // Bias towards plausible values so the later checks are reached.
            let mut mb = parse(&bytes);
            mb.resp_seq = 7;
            mb.status = u32::try_from(next() % 9).unwrap();
            if next() % 3 == 0 {
                mb.out_addr = l.io_addr + next() % (l.io_bytes + 4096);
                mb.out_len %= 1 << 21;
            } else if next() % 2 == 0 {
                mb.out_addr %= l.mem_bytes + 4096;
                mb.out_len %= 1 << 21;
            }
            if let Ok(r) = check_reply(&mb, 7, &l, 1 << 20) {
                assert!(r.len == 0 || l.in_io_window(r.addr, r.len));
                assert!(r.status != Status::Ok || r.len <= 1 << 20);
                assert!(r.len <= 1 << 20 || r.status != Status::Ok);
            }
        }
    }

    #[test]
    fn request_round_trips() {
        let b = encode_request(9, guest_abi::op::INVOKE, 1234, 42, 43);
        let mb = parse(&b);
        assert_eq!(
            (mb.req_seq, mb.op, mb.arg_len, mb.resp_seq),
            (9, guest_abi::op::INVOKE, 1234, 0)
        );
        assert_eq!((mb.host_ns, mb.host_tsc), (42, 43));
    }
}

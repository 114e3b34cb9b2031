//! The layout of a runner's shared-memory region and the rules both sides
//! follow. Decoding what a runner wrote is pure and checks every length: the
//! host never trusts the child.
//!
//! ```text
//!  offset 0            HEADER_BYTES              +input_capacity (page rounded)
//!  | Header (atomics)  | input buffer            | output buffer (output or
//!  |                   | (host writes)           |  failure message; runner writes)
//! ```
//!
//! `state` is the futex word both sides block on: BOOTING -> READY (runner,
//! after init) -> REQUEST (host) -> RUNNING -> REPLY (runner) -> REQUEST ...
//! A cold runner finds REQUEST already set. `alive` is a robust futex: the runner
//! stores its TID there (with FUTEX_WAITERS) and registers it with
//! `set_robust_list`, so the kernel sets FUTEX_OWNER_DIED and wakes the host
//! whenever the runner dies, however it dies.

use std::sync::atomic::{AtomicU32, AtomicU64};

/// `Header::magic`.
pub const MAGIC: u32 = 0x4d46_5250; // "MFRP"
/// `Header::version`: bumped on any layout change.
pub const PROTOCOL_VERSION: u32 = 1;
/// Bytes reserved for the header (one page).
pub const HEADER_BYTES: usize = 4096;
/// Longest failure message a runner writes, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// Values of [`Header::state`].
pub mod state {
    /// The runner is starting (host's initial value for a warm runner).
    pub const BOOTING: u32 = 0;
    /// The runner is initialised and waits for a request.
    pub const READY: u32 = 1;
    /// The host posted a request.
    pub const REQUEST: u32 = 2;
    /// The runner posted a reply.
    pub const REPLY: u32 = 3;
    /// The runner took the request and runs it (a cold runner wakes the
    /// host on this transition, so the host can start the budget clock).
    pub const RUNNING: u32 = 4;
}

/// Kernel bits of a robust futex word (the death notice of `microfaas-ipc`).
pub use ipc::robust;

/// Values of [`Header::reply_kind`].
pub mod kind {
    /// Output of `reply_len` bytes in the output buffer.
    pub const OK: u32 = 1;
    /// `handle`/`init` returned an error; message in the output buffer.
    pub const FUNCTION_ERROR: u32 = 2;
    /// Panic; message in the output buffer.
    pub const PANICKED: u32 = 3;
    /// Heap limit reached; message in the output buffer, limit in `reply_value`.
    pub const OUT_OF_MEMORY: u32 = 4;
    /// Stack overflow; stack bytes in `reply_value`.
    pub const STACK_OVERFLOW: u32 = 5;
    /// Memory fault; message in the output buffer.
    pub const FAULT: u32 = 6;
    /// The output did not fit; its length in `reply_value`.
    pub const OUTPUT_TOO_LARGE: u32 = 7;
    /// The artifact could not be loaded; message in the output buffer.
    pub const LOAD_FAILED: u32 = 8;
    /// The artifact broke the ABI; message in the output buffer.
    pub const MALFORMED: u32 = 9;
}

/// Values of [`Header::phase`]: what the runner was doing when it replied.
pub mod phase {
    /// Loading the artifact.
    pub const LOAD: u32 = 0;
    /// Running `init()`.
    pub const INIT: u32 = 1;
    /// Running `handle()`.
    pub const HANDLE: u32 = 2;
}

/// The header at offset 0 of the region. All fields are atomics: the other
/// process may write any of them at any time.
#[repr(C)]
#[derive(Debug)]
pub struct Header {
    /// [`MAGIC`] (host).
    pub magic: AtomicU32,
    /// [`PROTOCOL_VERSION`] (host).
    pub version: AtomicU32,
    /// The futex word; see [`state`].
    pub state: AtomicU32,
    /// The runner's robust futex word; see [`robust`].
    pub alive: AtomicU32,
    /// Input buffer capacity in bytes (host, at creation).
    pub input_capacity: AtomicU64,
    /// Output buffer capacity in bytes (host, at creation).
    pub output_capacity: AtomicU64,
    /// Heap limit for the instance (host, at creation).
    pub heap_limit_bytes: AtomicU64,
    /// Stack bytes for the instance (host, at creation).
    pub stack_bytes: AtomicU64,
    /// Request number (host, before REQUEST).
    pub sequence: AtomicU64,
    /// Input length (host, before REQUEST).
    pub input_len: AtomicU64,
    /// The request number this reply answers (runner).
    pub reply_sequence: AtomicU64,
    /// One of [`kind`] (runner).
    pub reply_kind: AtomicU32,
    /// One of [`phase`] (runner).
    pub phase: AtomicU32,
    /// Bytes of output or message in the output buffer (runner).
    pub reply_len: AtomicU64,
    /// Kind-specific number (runner).
    pub reply_value: AtomicU64,
    /// Non-zero when the runner exits after this reply (runner).
    pub fatal: AtomicU32,
    /// Reserved.
    pub reserved: AtomicU32,
    /// `CLOCK_MONOTONIC` ns when init finished (runner).
    pub ready_ns: AtomicU64,
    /// The function's entry timestamp (runner).
    pub entered_ns: AtomicU64,
    /// The function's return timestamp (runner).
    pub returned_ns: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_BYTES);

/// Region sizes for given buffer capacities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Offset of the input buffer.
    pub input_offset: usize,
    /// Input capacity in bytes.
    pub input_capacity: usize,
    /// Offset of the output buffer.
    pub output_offset: usize,
    /// Output capacity in bytes.
    pub output_capacity: usize,
    /// Total region size in bytes.
    pub total: usize,
}

impl Layout {
    /// The layout for these capacities; `None` if the sizes overflow.
    pub fn new(input_capacity: usize, output_capacity: usize) -> Option<Self> {
        let page = 4096usize;
        let round = |n: usize| n.checked_add(page - 1).map(|n| n & !(page - 1));
        let input_offset = HEADER_BYTES;
        let output_offset = input_offset.checked_add(round(input_capacity)?)?;
        let total = output_offset.checked_add(round(output_capacity.max(1))?)?;
        Some(Self {
            input_offset,
            input_capacity,
            output_offset,
            output_capacity,
            total,
        })
    }
}

/// A decoded reply (lengths checked against the output capacity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Output of `len` bytes.
    Output {
        /// Bytes in the output buffer.
        len: usize,
    },
    /// A failure, with a message of `message_len` bytes in the output buffer.
    Failed {
        /// One of [`kind`], not `OK`.
        kind: u32,
        /// The phase it happened in.
        phase: u32,
        /// Message bytes in the output buffer.
        message_len: usize,
        /// Kind-specific number.
        value: u64,
    },
}

/// What was wrong with a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The reply answers another request.
    #[error("reply to request {found}, expected {expected}")]
    WrongSequence {
        /// Expected.
        expected: u64,
        /// Found.
        found: u64,
    },
    /// Unknown reply kind.
    #[error("unknown reply kind {0}")]
    UnknownKind(u32),
    /// Unknown phase.
    #[error("unknown phase {0}")]
    UnknownPhase(u32),
    /// A length beyond the buffer.
    #[error("reply claims {len} bytes, the buffer holds {capacity}")]
    TooLong {
        /// Claimed.
        len: u64,
        /// Capacity.
        capacity: usize,
    },
}

/// The raw reply fields as read from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawReply {
    /// `reply_sequence`.
    pub sequence: u64,
    /// `reply_kind`.
    pub kind: u32,
    /// `phase`.
    pub phase: u32,
    /// `reply_len`.
    pub len: u64,
    /// `reply_value`.
    pub value: u64,
}

/// Checks a reply against the request it should answer and the output
/// buffer's capacity.
pub fn decode_reply(raw: RawReply, expected_sequence: u64, output_capacity: usize) -> Result<Reply, ProtocolError> {
    if raw.sequence != expected_sequence {
        return Err(ProtocolError::WrongSequence {
            expected: expected_sequence,
            found: raw.sequence,
        });
    }
    if !matches!(raw.phase, phase::LOAD | phase::INIT | phase::HANDLE) {
        return Err(ProtocolError::UnknownPhase(raw.phase));
    }
    let len = usize::try_from(raw.len)
        .ok()
        .filter(|&l| l <= output_capacity)
        .ok_or(ProtocolError::TooLong {
            len: raw.len,
            capacity: output_capacity,
        })?;
    match raw.kind {
        kind::OK => Ok(Reply::Output { len }),
        kind::FUNCTION_ERROR
        | kind::PANICKED
        | kind::OUT_OF_MEMORY
        | kind::STACK_OVERFLOW
        | kind::FAULT
        | kind::OUTPUT_TOO_LARGE
        | kind::LOAD_FAILED
        | kind::MALFORMED => Ok(Reply::Failed {
            kind: raw.kind,
            phase: raw.phase,
            message_len: len.min(MAX_MESSAGE_BYTES),
            value: raw.value,
        }),
        other => Err(ProtocolError::UnknownKind(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(kind: u32, len: u64) -> RawReply {
        RawReply {
            sequence: 7,
            kind,
            phase: phase::HANDLE,
            len,
            value: 0,
        }
    }

    #[test]
    fn ok_reply_within_capacity() {
        assert_eq!(decode_reply(raw(kind::OK, 0), 7, 10), Ok(Reply::Output { len: 0 }));
        assert_eq!(decode_reply(raw(kind::OK, 10), 7, 10), Ok(Reply::Output { len: 10 }));
    }

    #[test]
    fn lengths_from_the_child_are_not_trusted() {
        assert_eq!(
            decode_reply(raw(kind::OK, 11), 7, 10),
            Err(ProtocolError::TooLong { len: 11, capacity: 10 })
        );
        assert!(decode_reply(raw(kind::OK, u64::MAX), 7, 1 << 30).is_err());
        assert!(decode_reply(raw(kind::PANICKED, 1 << 40), 7, 4096).is_err());
    }

    #[test]
    fn failure_messages_are_capped() {
        let r = decode_reply(raw(kind::PANICKED, 100_000), 7, 1 << 20).unwrap();
        assert_eq!(
            r,
            Reply::Failed {
                kind: kind::PANICKED,
                phase: phase::HANDLE,
                message_len: MAX_MESSAGE_BYTES,
                value: 0
            }
        );
    }

    #[test]
    fn stale_or_unknown_replies_are_refused() {
        assert!(matches!(
            decode_reply(raw(kind::OK, 0), 8, 10),
            Err(ProtocolError::WrongSequence { .. })
        ));
        assert_eq!(decode_reply(raw(0, 0), 7, 10), Err(ProtocolError::UnknownKind(0)));
        assert_eq!(decode_reply(raw(99, 0), 7, 10), Err(ProtocolError::UnknownKind(99)));
        let mut r = raw(kind::OK, 0);
        r.phase = 5;
        assert_eq!(decode_reply(r, 7, 10), Err(ProtocolError::UnknownPhase(5)));
    }

    #[test]
    fn layout_is_page_aligned_and_checked() {
        let l = Layout::new(4 << 20, 4 << 20).unwrap();
        assert_eq!(l.input_offset, HEADER_BYTES);
        assert_eq!(l.output_offset, HEADER_BYTES + (4 << 20));
        assert_eq!(l.total, HEADER_BYTES + (8 << 20));
        let l = Layout::new(0, 0).unwrap();
        assert_eq!(l.output_offset % 4096, 0);
        assert!(l.total > l.output_offset);
        assert!(Layout::new(usize::MAX, 1).is_none());
    }
}

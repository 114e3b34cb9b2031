//! The control messages between the backend and a VMM host process: one
//! SOCK_SEQPACKET datagram each, `[VERSION, tag, fields (LE)...]`, with a
//! node image's fd passed alongside (`SCM_RIGHTS`). Decoding is pure and
//! total: any bytes give a message or a [`ProtocolError`]. The backend
//! trusts nothing a host process says (a VM escape may speak for it):
//! every reply is decoded here, bounded, and only compared or shown.
//!
//! Every message travels in a frame, `[id (u32 LE), message]`: the
//! backend numbers its requests and the host process echoes the number in
//! its reply, so a reply that answers another request (late, doubled,
//! forged) is told apart from the answer to this one ([`frame`],
//! [`unframe`]).
//!
//! The request path does not use the socket: callers write the slot and
//! queue it on the process's run ring ([`crate::RingLayout`]).

/// Version of this encoding.
pub const VERSION: u8 = 1;
/// Longest message (a saved state is ~5 KiB).
pub const MAX_MESSAGE: usize = 64 << 10;
/// Longest error text a host process may send (longer is cut).
pub const MAX_ERROR: usize = 1024;

/// A request from the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Register snapshot node `node`: its saved state (the image fd rides
    /// along). Once per node per host process.
    Register {
        /// The node's id.
        node: u64,
        /// Its saved state (`vmm::SavedState::encode`).
        state: Vec<u8>,
    },
    /// Restore an instance of `node` into slab slot `slot`.
    Restore {
        /// A registered node.
        node: u64,
        /// A free slot of the shared slab.
        slot: u32,
    },
    /// Tear the instance in `slot` down (reply once its VM is gone).
    Drop {
        /// Its slot.
        slot: u32,
    },
}

/// A reply from the host process (untrusted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Done.
    Ok,
    /// Restored: how the instance starts.
    Restored {
        /// Saved request sequence number.
        seq: u32,
        /// Stopped at a checkpoint.
        at_checkpoint: bool,
        /// Guest TSC minus host TSC.
        tsc_offset: u64,
    },
    /// Refused or failed (the text is the host's, cut to [`MAX_ERROR`]).
    Error(String),
    /// KVM refused the node's saved state, or it does not match the
    /// node's memory (the node is at fault, as the host process says).
    StateRefused(String),
}

/// Bytes that are not a message of this version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Empty or cut short.
    #[error("message truncated")]
    Truncated,
    /// Another encoding version.
    #[error("message version {0}, expected {VERSION}")]
    Version(u8),
    /// Unknown tag.
    #[error("unknown message tag {0}")]
    Tag(u8),
    /// Bytes after the message.
    #[error("{0} bytes after the message")]
    Trailing(usize),
    /// Larger than [`MAX_MESSAGE`].
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

const REGISTER: u8 = 1;
const RESTORE: u8 = 2;
const DROP: u8 = 3;
const OK: u8 = 10;
const RESTORED: u8 = 11;
const ERROR: u8 = 12;
const STATE_REFUSED: u8 = 13;

/// Bytes of a frame's header (the request id).
pub const FRAME_HEADER: usize = 4;

/// A framed message: `id` then `message`.
pub fn frame(id: u32, message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER + message.len());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(message);
    out
}

/// Splits a frame into its id and message (pure, total).
pub fn unframe(b: &[u8]) -> Result<(u32, &[u8]), ProtocolError> {
    if b.len() > MAX_MESSAGE + FRAME_HEADER {
        return Err(ProtocolError::TooLarge(b.len()));
    }
    let mut r = Reader(b);
    let id = r.u32()?;
    Ok((id, r.0))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.0.len() < n {
            return Err(ProtocolError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let n = usize::try_from(self.u32()?).map_err(|_| ProtocolError::Truncated)?;
        self.take(n)
    }
    fn end(self) -> Result<(), ProtocolError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Trailing(self.0.len()))
        }
    }
}

fn header(b: &[u8]) -> Result<(u8, Reader<'_>), ProtocolError> {
    if b.len() > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge(b.len()));
    }
    let mut r = Reader(b);
    let v = r.u8()?;
    if v != VERSION {
        return Err(ProtocolError::Version(v));
    }
    let tag = r.u8()?;
    Ok((tag, r))
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(b);
}

impl Request {
    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        match self {
            Request::Register { node, state } => {
                out.push(REGISTER);
                out.extend_from_slice(&node.to_le_bytes());
                put_bytes(&mut out, state);
            }
            Request::Restore { node, slot } => {
                out.push(RESTORE);
                out.extend_from_slice(&node.to_le_bytes());
                out.extend_from_slice(&slot.to_le_bytes());
            }
            Request::Drop { slot } => {
                out.push(DROP);
                out.extend_from_slice(&slot.to_le_bytes());
            }
        }
        out
    }

    /// Parses a message.
    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        let (tag, mut r) = header(b)?;
        let m = match tag {
            REGISTER => Request::Register {
                node: r.u64()?,
                state: r.bytes()?.to_vec(),
            },
            RESTORE => Request::Restore {
                node: r.u64()?,
                slot: r.u32()?,
            },
            DROP => Request::Drop { slot: r.u32()? },
            t => return Err(ProtocolError::Tag(t)),
        };
        r.end()?;
        Ok(m)
    }
}

impl Reply {
    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        match self {
            Reply::Ok => out.push(OK),
            Reply::Restored {
                seq,
                at_checkpoint,
                tsc_offset,
            } => {
                out.push(RESTORED);
                out.extend_from_slice(&seq.to_le_bytes());
                out.push(u8::from(*at_checkpoint));
                out.extend_from_slice(&tsc_offset.to_le_bytes());
            }
            Reply::Error(text) | Reply::StateRefused(text) => {
                out.push(if matches!(self, Reply::Error(_)) {
                    ERROR
                } else {
                    STATE_REFUSED
                });
                let cut = &text.as_bytes()[..text.len().min(MAX_ERROR)];
                put_bytes(&mut out, cut);
            }
        }
        out
    }

    /// Parses a message (from an untrusted host process).
    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        let (tag, mut r) = header(b)?;
        let m = match tag {
            OK => Reply::Ok,
            RESTORED => Reply::Restored {
                seq: r.u32()?,
                at_checkpoint: r.u8()? != 0,
                tsc_offset: r.u64()?,
            },
            ERROR | STATE_REFUSED => {
                let text = r.bytes()?;
                let text = String::from_utf8_lossy(&text[..text.len().min(MAX_ERROR)]).into_owned();
                if tag == ERROR {
                    Reply::Error(text)
                } else {
                    Reply::StateRefused(text)
                }
            }
            t => return Err(ProtocolError::Tag(t)),
        };
        r.end()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        for m in [
            Request::Register {
                node: 7,
                state: vec![1, 2, 3],
            },
            Request::Restore { node: 9, slot: 4096 },
            Request::Drop { slot: 0 },
        ] {
            assert_eq!(Request::decode(&m.encode()), Ok(m));
        }
        for m in [
            Reply::Ok,
            Reply::Restored {
                seq: 3,
                at_checkpoint: true,
                tsc_offset: u64::MAX,
            },
            Reply::Error("no such node".into()),
            Reply::StateRefused("KVM_SET_SREGS".into()),
        ] {
            assert_eq!(Reply::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn frames_carry_their_id() {
        let m = Reply::Ok.encode();
        let f = frame(77, &m);
        assert_eq!(unframe(&f), Ok((77, &m[..])));
        assert_eq!(unframe(&[1, 2, 3]), Err(ProtocolError::Truncated));
        assert_eq!(unframe(&[]), Err(ProtocolError::Truncated));
        let big = vec![0u8; MAX_MESSAGE + FRAME_HEADER + 1];
        assert_eq!(unframe(&big), Err(ProtocolError::TooLarge(big.len())));
    }

    #[test]
    fn bad_bytes_are_refused_not_trusted() {
        assert_eq!(Reply::decode(&[]), Err(ProtocolError::Truncated));
        assert_eq!(Reply::decode(&[2, OK]), Err(ProtocolError::Version(2)));
        assert_eq!(Reply::decode(&[VERSION, 99]), Err(ProtocolError::Tag(99)));
        assert_eq!(Reply::decode(&[VERSION, OK, 0]), Err(ProtocolError::Trailing(1)));
        assert_eq!(Reply::decode(&[VERSION, RESTORED, 1, 2]), Err(ProtocolError::Truncated));
        // A length past the end.
        assert_eq!(
            Reply::decode(&[VERSION, ERROR, 0xff, 0xff, 0xff, 0xff, b'x']),
            Err(ProtocolError::Truncated)
        );
        assert_eq!(
            Reply::decode(&vec![VERSION; MAX_MESSAGE + 1]),
            Err(ProtocolError::TooLarge(MAX_MESSAGE + 1))
        );
        // A long error is cut.
        let long = Reply::Error("e".repeat(10 * MAX_ERROR)).encode();
        let Ok(Reply::Error(t)) = Reply::decode(&long) else {
            panic!()
        };
        assert_eq!(t.len(), MAX_ERROR);
        // Random bytes never panic.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..2000usize {
            let bytes: Vec<u8> = (0..len % 40)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    u8::try_from(seed % 256).unwrap_or(0)
                })
                .collect();
            let _ = Reply::decode(&bytes);
            let _ = Request::decode(&bytes);
        }
    }
}

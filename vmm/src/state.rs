//! The savable state of a stopped instance besides its memory: the vCPU's
//! registers (general, segment/control, FPU/SSE, XCR0, XSAVE area) and the
//! channel's host side (the request sequence number, and whether the guest
//! is stopped at a `checkpoint()` rather than idle). Encoded as a small
//! versioned blob (the snapshot store checksums and caps it); decoding
//! checks the magic, version and every section length.
//!
//! ```text
//! "MFVCPU01"  u32 version  u32 seq  u8 at_checkpoint  u8 flags (1 xcrs, 2 xsave)
//! then sections, each u32 length + bytes: regs, sregs, fpu[, xcrs][, xsave]
//! ```

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, kvm_xcrs};
use std::collections::BTreeMap;

const MAGIC: &[u8; 8] = b"MFVCPU01";
/// Version of the state blob.
pub const STATE_VERSION: u32 = 1;
const HAS_XCRS: u8 = 1;
const HAS_XSAVE: u8 = 2;

/// Plain-old-data KVM structures that may be copied to and from bytes.
///
/// # Safety
/// Implementors must be `#[repr(C)]` aggregates of integers (and arrays of
/// them) with no implicit padding, so that every byte is initialised and
/// every bit pattern is a valid value.
unsafe trait Pod: Copy + Default {}
// SAFETY: kvm-bindings' generated `#[repr(C)]` integer structs; their
// padding is explicit (`padding`/`pad*` fields).
unsafe impl Pod for kvm_regs {}
// SAFETY: as above.
unsafe impl Pod for kvm_sregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_fpu {}
// SAFETY: as above.
unsafe impl Pod for kvm_xcrs {}

/// Words in the legacy XSAVE area (`kvm_xsave::region`).
pub const XSAVE_WORDS: usize = 1024;

fn pod_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` has no uninitialised bytes; the slice borrows `v`.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

/// Whether two segment/control register sets are the same, byte for byte.
pub(crate) fn sregs_eq(a: &kvm_sregs, b: &kvm_sregs) -> bool {
    pod_bytes(a) == pod_bytes(b)
}

fn pod_from<T: Pod>(b: &[u8]) -> Option<T> {
    if b.len() != size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    // SAFETY: `b` holds exactly `size_of::<T>()` bytes, and any bytes are a
    // valid `T` (`Pod`); `v` is a distinct local.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&raw mut v).cast::<u8>(), b.len()) };
    Some(v)
}

/// The vCPU registers of a stopped guest.
#[derive(Debug, Clone, Default)]
pub struct VcpuState {
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, descriptor-table and control registers, EFER.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: kvm_fpu,
    /// XCR0 (when the host has XSAVE).
    pub xcrs: Option<kvm_xcrs>,
    /// The XSAVE area, [`XSAVE_WORDS`] words (AVX upper halves and the
    /// rest; when the host has it).
    pub xsave: Option<Vec<u32>>,
}

impl VcpuState {
    /// Whether `other` is the same state, byte for byte (a vCPU holding
    /// one needs no change to hold the other).
    pub fn same_as(&self, other: &Self) -> bool {
        pod_bytes(&self.regs) == pod_bytes(&other.regs)
            && sregs_eq(&self.sregs, &other.sregs)
            && pod_bytes(&self.fpu) == pod_bytes(&other.fpu)
            && match (&self.xcrs, &other.xcrs) {
                (Some(a), Some(b)) => pod_bytes(a) == pod_bytes(b),
                (None, None) => true,
                _ => false,
            }
            && self.xsave == other.xsave
    }
}

/// A stopped instance's state besides its memory.
#[derive(Debug, Clone, Default)]
pub struct SavedState {
    /// Sequence number of the last request the host published.
    pub seq: u32,
    /// Whether the guest is stopped inside `checkpoint()` of request `seq`
    /// (resume it to get the reply) rather than idle after answering it.
    pub at_checkpoint: bool,
    /// The vCPU.
    pub vcpu: VcpuState,
}

/// Why a state blob was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Not a state blob.
    #[error("not a vCPU state blob (bad magic)")]
    Magic,
    /// Written by another format version.
    #[error("vCPU state version {0}, expected {STATE_VERSION}")]
    Version(u32),
    /// A section is missing, short, or of the wrong size.
    #[error("vCPU state section `{0}` is truncated or of the wrong size")]
    Section(&'static str),
    /// Bytes after the last section.
    #[error("{0} trailing bytes after the vCPU state")]
    Trailing(usize),
}

/// Why a saved state does not match the guest memory saved with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateMismatch {
    /// The mailbox's published request is not the one the state names.
    #[error("the state says request {seq} was the last sent, but the guest memory's mailbox holds request {req_seq}")]
    Request {
        /// The state's sequence number.
        seq: u32,
        /// The mailbox's.
        req_seq: u32,
    },
    /// Idle, but the mailbox's reply answers another request.
    #[error(
        "the state says the guest is idle after answering request {seq}, but the mailbox's reply answers request {resp_seq}"
    )]
    IdleReply {
        /// The state's sequence number.
        seq: u32,
        /// The reply's.
        resp_seq: u32,
    },
    /// Stopped at a checkpoint, but the request's reply is already there.
    #[error(
        "the state says the guest is stopped at a checkpoint of request {seq}, but its reply is already in the mailbox"
    )]
    CheckpointReplied {
        /// The state's sequence number.
        seq: u32,
    },
    /// A checkpoint request is still armed in the mailbox.
    #[error("the mailbox still asks for a checkpoint of request {0}")]
    CheckpointArmed(u32),
}

impl SavedState {
    /// Checks the state against the mailbox of the guest memory saved with
    /// it (pure). Idle: the last request published is `seq` and its reply
    /// is in the mailbox. At a checkpoint: the last request is `seq` and
    /// its reply is not there yet. Either way no checkpoint is armed. A
    /// state that fails (e.g. a `seq` or at-checkpoint flag altered) would
    /// otherwise let the next request be "answered" by a stale reply.
    pub fn check_mailbox(&self, mb: &guest_abi::Mailbox) -> Result<(), StateMismatch> {
        if mb.req_seq != self.seq {
            return Err(StateMismatch::Request {
                seq: self.seq,
                req_seq: mb.req_seq,
            });
        }
        if !self.at_checkpoint && mb.resp_seq != self.seq {
            return Err(StateMismatch::IdleReply {
                seq: self.seq,
                resp_seq: mb.resp_seq,
            });
        }
        if self.at_checkpoint && mb.resp_seq == self.seq {
            return Err(StateMismatch::CheckpointReplied { seq: self.seq });
        }
        if mb.checkpoint_seq != 0 {
            return Err(StateMismatch::CheckpointArmed(mb.checkpoint_seq));
        }
        Ok(())
    }

    /// Encodes the state as a blob for the snapshot store.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8192);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&STATE_VERSION.to_le_bytes());
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.push(u8::from(self.at_checkpoint));
        let flags =
            if self.vcpu.xcrs.is_some() { HAS_XCRS } else { 0 } | if self.vcpu.xsave.is_some() { HAS_XSAVE } else { 0 };
        b.push(flags);
        let mut section = |bytes: &[u8]| {
            b.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
            b.extend_from_slice(bytes);
        };
        section(pod_bytes(&self.vcpu.regs));
        section(pod_bytes(&self.vcpu.sregs));
        section(pod_bytes(&self.vcpu.fpu));
        if let Some(x) = &self.vcpu.xcrs {
            section(pod_bytes(x));
        }
        if let Some(x) = &self.vcpu.xsave {
            let bytes: Vec<u8> = x.iter().flat_map(|w| w.to_le_bytes()).collect();
            section(&bytes);
        }
        b
    }

    /// Decodes a blob made by [`SavedState::encode`], checking every length.
    pub fn decode(b: &[u8]) -> Result<SavedState, StateError> {
        let mut r = Reader { b, at: 0 };
        if r.take(8, "magic")? != MAGIC {
            return Err(StateError::Magic);
        }
        let version = r.u32("version")?;
        if version != STATE_VERSION {
            return Err(StateError::Version(version));
        }
        let seq = r.u32("seq")?;
        let at_checkpoint = match r.take(1, "flags")?[0] {
            0 => false,
            1 => true,
            _ => return Err(StateError::Section("flags")),
        };
        let flags = r.take(1, "flags")?[0];
        if flags & !(HAS_XCRS | HAS_XSAVE) != 0 {
            return Err(StateError::Section("flags"));
        }
        let regs = r.pod("regs")?;
        let sregs = r.pod("sregs")?;
        let fpu = r.pod("fpu")?;
        let xcrs = if flags & HAS_XCRS != 0 {
            Some(r.pod("xcrs")?)
        } else {
            None
        };
        let xsave = if flags & HAS_XSAVE != 0 {
            let len = usize::try_from(r.u32("xsave")?).map_err(|_| StateError::Section("xsave"))?;
            if len != XSAVE_WORDS * 4 {
                return Err(StateError::Section("xsave"));
            }
            let bytes = r.take(len, "xsave")?;
            Some(
                bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        } else {
            None
        };
        if r.at != b.len() {
            return Err(StateError::Trailing(b.len() - r.at));
        }
        Ok(SavedState {
            seq,
            at_checkpoint,
            vcpu: VcpuState {
                regs,
                sregs,
                fpu,
                xcrs,
                xsave,
            },
        })
    }

    /// A human-readable summary (for `snapshots show`).
    pub fn summary(&self) -> BTreeMap<String, String> {
        let r = &self.vcpu.regs;
        let s = &self.vcpu.sregs;
        [
            ("rip", format!("{:#x}", r.rip)),
            ("rsp", format!("{:#x}", r.rsp)),
            ("rflags", format!("{:#x}", r.rflags)),
            ("cr3", format!("{:#x}", s.cr3)),
            ("cr4", format!("{:#x}", s.cr4)),
            ("cs", format!("{:#x} (CPL{})", s.cs.selector, s.cs.selector & 3)),
            ("seq", self.seq.to_string()),
            (
                "stopped_at",
                if self.at_checkpoint { "checkpoint" } else { "idle" }.to_owned(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], StateError> {
        let end = self.at.checked_add(n).ok_or(StateError::Section(what))?;
        let s = self.b.get(self.at..end).ok_or(StateError::Section(what))?;
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, StateError> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn pod<T: Pod>(&mut self, what: &'static str) -> Result<T, StateError> {
        let len = usize::try_from(self.u32(what)?).map_err(|_| StateError::Section(what))?;
        pod_from(self.take(len, what)?).ok_or(StateError::Section(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_checked_against_the_mailbox() {
        let mb = |req_seq, resp_seq, checkpoint_seq| guest_abi::Mailbox {
            req_seq,
            resp_seq,
            checkpoint_seq,
            ..crate::channel::parse(&[0; crate::channel::MAILBOX_BYTES])
        };
        let st = |seq, at_checkpoint| SavedState {
            seq,
            at_checkpoint,
            vcpu: VcpuState::default(),
        };
        // Consistent: a booted guest, a loaded function, a checkpoint.
        assert_eq!(st(0, false).check_mailbox(&mb(0, 0, 0)), Ok(()));
        assert_eq!(st(1, false).check_mailbox(&mb(1, 1, 0)), Ok(()));
        assert_eq!(st(2, true).check_mailbox(&mb(2, 1, 0)), Ok(()));
        // seq lowered by one: the next request would meet the old reply.
        assert_eq!(
            st(0, false).check_mailbox(&mb(1, 1, 0)),
            Err(StateMismatch::Request { seq: 0, req_seq: 1 })
        );
        assert!(st(2, false).check_mailbox(&mb(1, 1, 0)).is_err());
        // The at-checkpoint flag flipped either way.
        assert_eq!(
            st(1, true).check_mailbox(&mb(1, 1, 0)),
            Err(StateMismatch::CheckpointReplied { seq: 1 })
        );
        assert_eq!(
            st(2, false).check_mailbox(&mb(2, 1, 0)),
            Err(StateMismatch::IdleReply { seq: 2, resp_seq: 1 })
        );
        assert_eq!(
            st(2, true).check_mailbox(&mb(2, 1, 2)),
            Err(StateMismatch::CheckpointArmed(2))
        );
    }

    fn sample() -> SavedState {
        let mut s = SavedState {
            seq: 7,
            at_checkpoint: true,
            ..SavedState::default()
        };
        s.vcpu.regs.rip = 0x40_1234;
        s.vcpu.regs.rsp = 0x7f_0000;
        s.vcpu.sregs.cr3 = 0x10_0000;
        s.vcpu.fpu.mxcsr = 0x1f80;
        let mut x = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        x.xcrs[0].value = 7;
        s.vcpu.xcrs = Some(x);
        let mut xs = vec![0u32; XSAVE_WORDS];
        xs[3] = 0xdead_beef;
        s.vcpu.xsave = Some(xs);
        s
    }

    #[test]
    fn round_trips() {
        let s = sample();
        let d = SavedState::decode(&s.encode()).unwrap();
        assert_eq!((d.seq, d.at_checkpoint), (7, true));
        assert_eq!(d.vcpu.regs, s.vcpu.regs);
        assert_eq!(d.vcpu.sregs, s.vcpu.sregs);
        assert_eq!(d.vcpu.fpu.mxcsr, 0x1f80);
        assert_eq!(d.vcpu.xcrs.unwrap().xcrs[0].value, 7);
        assert_eq!(d.vcpu.xsave.unwrap()[3], 0xdead_beef);
        let mut plain = s;
        plain.vcpu.xcrs = None;
        plain.vcpu.xsave = None;
        let d = SavedState::decode(&plain.encode()).unwrap();
        assert!(d.vcpu.xcrs.is_none() && d.vcpu.xsave.is_none());
    }

    #[test]
    fn refuses_damaged_blobs() {
        let b = sample().encode();
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert_eq!(SavedState::decode(&bad).unwrap_err(), StateError::Magic);
        let mut bad = b.clone();
        bad[8] = 9;
        assert_eq!(SavedState::decode(&bad).unwrap_err(), StateError::Version(9));
        for cut in [0, 10, 17, 30, b.len() - 1] {
            assert!(SavedState::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert_eq!(SavedState::decode(&long).unwrap_err(), StateError::Trailing(1));
        // A section length that lies.
        let mut bad = b;
        bad[18] = bad[18].wrapping_add(1);
        assert!(SavedState::decode(&bad).is_err());
    }
}

//! How the dispatcher tells a worker about its functions: catalog messages
//! on the worker's `AF_UNIX` `SOCK_SEQPACKET` socket (inherited at
//! [`crate::runtime::fds::WORKER_SOCKET_FD`]), each a fixed 24-byte record carrying the
//! function's artifact as a sealed memfd (`SCM_RIGHTS`), and its module as a
//! second one when the function was deployed with a module.
//! A new worker reads the initial catalog up to an end marker before it
//! serves; later deploys send one message and then a `LOAD` request through
//! the ring. The dispatcher never reads from the socket (its read side is
//! shut down) and the worker checks every fd's seals before using it.
//!
//! ```text
//!  kind u32 (1 = function, 2 = end) | func u32 | image u64 | preload u32 | module u32 (0/1)
//!  [+ artifact fd [+ module fd]]
//! ```

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Bytes of one message.
pub const MESSAGE_BYTES: usize = 24;
const KIND_FUNCTION: u32 = 1;
const KIND_END: u32 = 2;

/// One function as a worker knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogEntry {
    /// Function index.
    pub func: u32,
    /// The artifact's id in the dispatcher: functions with the same image
    /// share one loaded copy (and one init state) in a worker.
    pub image: u64,
    /// Load and init it now (warm) rather than only registering it.
    pub preload: bool,
    /// The function takes a module: the message carries its memfd as the
    /// second fd (see [`crate::runtime::FunctionCode`]).
    pub module: bool,
}

/// A message as read from the socket.
#[derive(Debug)]
pub enum Message {
    /// A function and its artifact memfd (`None` if the message carried no
    /// fd, which the worker then refuses unless it holds the image already),
    /// and the module memfd when the entry says it takes one.
    Function(CatalogEntry, Option<OwnedFd>, Option<OwnedFd>),
    /// The initial catalog is complete.
    End,
}

/// A message that does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed catalog message ({0})")]
pub struct MessageError(&'static str);

impl CatalogEntry {
    /// The message bytes.
    pub fn to_bytes(self) -> [u8; MESSAGE_BYTES] {
        encode(KIND_FUNCTION, &self)
    }
}

fn encode(kind: u32, e: &CatalogEntry) -> [u8; MESSAGE_BYTES] {
    let mut b = [0u8; MESSAGE_BYTES];
    b[0..4].copy_from_slice(&kind.to_le_bytes());
    b[4..8].copy_from_slice(&e.func.to_le_bytes());
    b[8..16].copy_from_slice(&e.image.to_le_bytes());
    b[16..20].copy_from_slice(&u32::from(e.preload).to_le_bytes());
    b[20..24].copy_from_slice(&u32::from(e.module).to_le_bytes());
    b
}

/// Decodes a message's bytes: `Ok(None)` is the end marker.
pub fn decode(bytes: &[u8]) -> Result<Option<CatalogEntry>, MessageError> {
    let b: &[u8; MESSAGE_BYTES] = bytes.try_into().map_err(|_| MessageError("length"))?;
    let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    match word(0) {
        KIND_END => Ok(None),
        KIND_FUNCTION => {
            let mut image = [0u8; 8];
            image.copy_from_slice(&b[8..16]);
            let preload = match word(16) {
                0 => false,
                1 => true,
                _ => return Err(MessageError("preload flag")),
            };
            let module = match word(20) {
                0 => false,
                1 => true,
                _ => return Err(MessageError("module flag")),
            };
            Ok(Some(CatalogEntry {
                func: word(4),
                image: u64::from_le_bytes(image),
                preload,
                module,
            }))
        }
        _ => Err(MessageError("kind")),
    }
}

fn send(socket: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let raw: Vec<std::os::fd::RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    loop {
        match sendmsg::<()>(socket.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(_) => return Err(io::Error::new(io::ErrorKind::WriteZero, "short catalog message")),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends `entry` with its artifact memfd `artifact` and, if the entry
/// takes one, its module memfd (dispatcher side).
pub fn send_entry(
    socket: BorrowedFd<'_>,
    entry: &CatalogEntry,
    artifact: BorrowedFd<'_>,
    module: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    if entry.module != module.is_some() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a catalog entry's module flag and its module fd disagree",
        ));
    }
    let fds: Vec<BorrowedFd<'_>> = std::iter::once(artifact).chain(module).collect();
    send(socket, &entry.to_bytes(), &fds)
}

/// Sends the end-of-catalog marker (dispatcher side).
pub fn send_end(socket: BorrowedFd<'_>) -> io::Result<()> {
    let none = CatalogEntry {
        func: 0,
        image: 0,
        preload: false,
        module: false,
    };
    send(socket, &encode(KIND_END, &none), &[])
}

/// Receives one message (worker side); `Ok(None)` if `nonblocking` and none
/// is queued. Received fds are close-on-exec; fds beyond the two an entry
/// may carry (the second only if it takes a module), or other control
/// messages, are closed.
pub fn recv(socket: BorrowedFd<'_>, nonblocking: bool) -> io::Result<Option<Message>> {
    let mut buf = [0u8; MESSAGE_BYTES + 1];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 2]);
    let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
    if nonblocking {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    let (bytes, mut fds, truncated) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
            Ok(msg) => {
                let mut fds = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            // SAFETY: the kernel just installed these fds in
                            // this process for us; nothing else owns them.
                            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                        }
                    }
                }
                let truncated = msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                break (msg.bytes, fds, truncated);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) if nonblocking => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    };
    if bytes == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the dispatcher closed the catalog socket",
        ));
    }
    if truncated {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated catalog message"));
    }
    let entry = decode(&buf[..bytes]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some(match entry {
        None => Message::End,
        Some(entry) => {
            fds.truncate(if entry.module { 2 } else { 1 });
            let mut fds = fds.into_iter();
            let artifact = fds.next();
            Message::Function(entry, artifact, fds.next())
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use std::os::fd::AsFd;

    #[test]
    fn round_trip_and_rejects() {
        let e = CatalogEntry {
            func: 42,
            image: 0x1234_5678_9abc,
            preload: true,
            module: false,
        };
        assert_eq!(decode(&e.to_bytes()), Ok(Some(e)));
        assert_eq!(decode(&encode(KIND_END, &e)), Ok(None));
        assert!(decode(&e.to_bytes()[..23]).is_err());
        let mut bad = e.to_bytes();
        bad[0] = 9;
        assert_eq!(decode(&bad), Err(MessageError("kind")));
        let mut bad = e.to_bytes();
        bad[16] = 2;
        assert_eq!(decode(&bad), Err(MessageError("preload flag")));
        let with_module = CatalogEntry { module: true, ..e };
        assert_eq!(decode(&with_module.to_bytes()), Ok(Some(with_module)));
        let mut bad = e.to_bytes();
        bad[20] = 2;
        assert_eq!(decode(&bad), Err(MessageError("module flag")));
    }

    #[test]
    fn an_fd_travels_with_its_entry() {
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        assert!(recv(b.as_fd(), true).unwrap().is_none(), "nothing queued");
        let artifact = crate::runtime::SealedArtifact::create("test", b"bytes").unwrap();
        let e = CatalogEntry {
            func: 7,
            image: artifact.id(),
            preload: false,
            module: false,
        };
        send_entry(a.as_fd(), &e, artifact.as_fd(), None).unwrap();
        let module = crate::runtime::SealedArtifact::create("module", b"module bytes").unwrap();
        let m = CatalogEntry {
            func: 8,
            module: true,
            ..e
        };
        assert!(
            send_entry(a.as_fd(), &e, artifact.as_fd(), Some(module.as_fd())).is_err(),
            "a module fd for an entry without one"
        );
        assert!(
            send_entry(a.as_fd(), &m, artifact.as_fd(), None).is_err(),
            "an entry with a module and no module fd"
        );
        send_entry(a.as_fd(), &m, artifact.as_fd(), Some(module.as_fd())).unwrap();
        send_end(a.as_fd()).unwrap();
        match recv(b.as_fd(), false).unwrap() {
            Some(Message::Function(got, Some(fd), None)) => {
                assert_eq!(got, e);
                let received = crate::runtime::SealedArtifact::from_fd(fd).unwrap();
                assert_eq!(received.read_all().unwrap(), b"bytes");
            }
            other => panic!("{other:?}"),
        }
        match recv(b.as_fd(), false).unwrap() {
            Some(Message::Function(got, Some(fd), Some(module_fd))) => {
                assert_eq!(got, m);
                let received = crate::runtime::SealedArtifact::from_fd(fd).unwrap();
                assert_eq!(received.read_all().unwrap(), b"bytes");
                let received = crate::runtime::SealedArtifact::from_fd(module_fd).unwrap();
                assert_eq!(received.read_all().unwrap(), b"module bytes");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(recv(b.as_fd(), false).unwrap(), Some(Message::End)));
        drop(a);
        assert_eq!(recv(b.as_fd(), false).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}

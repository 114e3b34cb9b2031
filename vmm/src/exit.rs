//! VM-exit handling as a pure function: what a vCPU exit means for the run
//! loop, decided without KVM so it can be tested with made-up exits.

use guest_abi::{LOG_BYTES, REG_CHECKPOINT, REG_DOORBELL, REG_FAULT, REG_LOG};

/// The parts of a vCPU exit the run loop looks at (a copy of
/// `kvm_ioctls::VcpuExit` without the borrow of `kvm_run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit<'a> {
    /// MMIO write of `data` at `addr`.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// Bytes written.
        data: &'a [u8],
    },
    /// MMIO read at `addr`.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
    },
    /// Port I/O (the guest has none).
    Io {
        /// Port.
        port: u16,
    },
    /// `hlt` (only reachable at CPL0: after a fault stub reported).
    Hlt,
    /// Triple fault.
    Shutdown,
    /// Entry failed with this hardware reason.
    FailEntry(u64),
    /// KVM internal error (e.g. emulation failure).
    InternalError,
    /// Anything else, by name.
    Other(&'static str),
}

/// What the run loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Copy this many bytes of guest log from the log area, and resume.
    Log(u32),
    /// The guest is idle after answering request `seq`: stop and report.
    Doorbell(u32),
    /// The function reached `checkpoint()` during request `seq` (which asked
    /// for it): stop so the host can snapshot, then resume.
    Checkpoint(u32),
    /// A CPL0 stub reported exception `vector`: stop; the instance is dead.
    Fault(u32),
    /// The guest did something the protocol does not allow: stop; dead.
    Crash(Crash),
}

/// Why a guest was stopped for good by an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// Triple fault.
    TripleFault,
    /// Port I/O.
    PortIo(u16),
    /// MMIO outside the doorbell registers, or a read.
    Mmio(u64),
    /// A register write that is not 4 bytes, or a log length too large.
    BadRegisterWrite,
    /// `hlt` without a fault report.
    Halt,
    /// KVM could not enter or emulate.
    Kvm(&'static str),
}

impl std::fmt::Display for Crash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Crash::TripleFault => f.write_str("triple fault (shutdown)"),
            Crash::PortIo(p) => write!(f, "port I/O to port {p:#x}"),
            Crash::Mmio(a) => write!(f, "MMIO access at {a:#x}"),
            Crash::BadRegisterWrite => f.write_str("malformed doorbell register write"),
            Crash::Halt => f.write_str("halted without reporting a fault"),
            Crash::Kvm(what) => write!(f, "KVM: {what}"),
        }
    }
}

fn u32_of(data: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(data.try_into().ok()?))
}

/// Decides what `exit` means.
pub fn handle(exit: Exit<'_>) -> Action {
    let bad = Action::Crash(Crash::BadRegisterWrite);
    match exit {
        Exit::MmioWrite {
            addr: REG_DOORBELL,
            data,
        } => u32_of(data).map_or(bad, Action::Doorbell),
        Exit::MmioWrite { addr: REG_FAULT, data } => u32_of(data).map_or(bad, Action::Fault),
        Exit::MmioWrite {
            addr: REG_CHECKPOINT,
            data,
        } => u32_of(data).map_or(bad, Action::Checkpoint),
        Exit::MmioWrite { addr: REG_LOG, data } => match u32_of(data) {
            Some(len) if u64::from(len) <= LOG_BYTES => Action::Log(len),
            _ => bad,
        },
        Exit::MmioWrite { addr, .. } | Exit::MmioRead { addr } => Action::Crash(Crash::Mmio(addr)),
        Exit::Io { port } => Action::Crash(Crash::PortIo(port)),
        Exit::Hlt => Action::Crash(Crash::Halt),
        Exit::Shutdown => Action::Crash(Crash::TripleFault),
        Exit::FailEntry(_) => Action::Crash(Crash::Kvm("entry failed")),
        Exit::InternalError => Action::Crash(Crash::Kvm("internal error")),
        Exit::Other(what) => Action::Crash(Crash::Kvm(what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbell_and_fault_carry_a_u32() {
        assert_eq!(
            handle(Exit::MmioWrite {
                addr: REG_DOORBELL,
                data: &7u32.to_le_bytes()
            }),
            Action::Doorbell(7)
        );
        assert_eq!(
            handle(Exit::MmioWrite {
                addr: REG_FAULT,
                data: &14u32.to_le_bytes()
            }),
            Action::Fault(14)
        );
        let bad = Action::Crash(Crash::BadRegisterWrite);
        assert_eq!(
            handle(Exit::MmioWrite {
                addr: REG_DOORBELL,
                data: &[1]
            }),
            bad
        );
        assert_eq!(
            handle(Exit::MmioWrite {
                addr: REG_FAULT,
                data: &[0; 8]
            }),
            bad
        );
    }

    #[test]
    fn checkpoint_carries_the_request_seq() {
        assert_eq!(
            handle(Exit::MmioWrite {
                addr: REG_CHECKPOINT,
                data: &9u32.to_le_bytes()
            }),
            Action::Checkpoint(9)
        );
        assert_eq!(
            handle(Exit::MmioWrite {
                addr: REG_CHECKPOINT,
                data: &[0; 2]
            }),
            Action::Crash(Crash::BadRegisterWrite)
        );
    }

    #[test]
    fn log_lengths_are_bounded() {
        assert_eq!(
            handle(Exit::MmioWrite {
                addr: REG_LOG,
                data: &5u32.to_le_bytes()
            }),
            Action::Log(5)
        );
        let too_long = u32::try_from(LOG_BYTES + 1).unwrap().to_le_bytes();
        assert_eq!(
            handle(Exit::MmioWrite {
                addr: REG_LOG,
                data: &too_long
            }),
            Action::Crash(Crash::BadRegisterWrite)
        );
    }

    #[test]
    fn everything_else_kills_the_guest() {
        assert_eq!(handle(Exit::Io { port: 0x80 }), Action::Crash(Crash::PortIo(0x80)));
        assert_eq!(
            handle(Exit::MmioRead { addr: REG_DOORBELL }),
            Action::Crash(Crash::Mmio(REG_DOORBELL))
        );
        assert_eq!(
            handle(Exit::MmioWrite {
                addr: 0xfee0_0000,
                data: &[0; 4]
            }),
            Action::Crash(Crash::Mmio(0xfee0_0000))
        );
        assert_eq!(handle(Exit::Hlt), Action::Crash(Crash::Halt));
        assert_eq!(handle(Exit::Shutdown), Action::Crash(Crash::TripleFault));
        assert!(matches!(handle(Exit::FailEntry(3)), Action::Crash(Crash::Kvm(_))));
    }
}

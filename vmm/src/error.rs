//! The VMM's errors: [`VmmError`] for creating and booting instances,
//! [`RunError`] for what one request to a guest can end in.

use crate::channel::ReplyError;
use crate::exit::Crash;
use crate::fault::GuestFault;

/// Opening KVM or creating/booting an instance failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// `/dev/kvm` cannot be opened or is unusable.
    #[error("/dev/kvm is unusable")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// A KVM ioctl that makes an fd failed with `EMFILE`: the process is at
    /// its open-file limit (raised to the hard limit at start).
    #[error(
        "KVM {op} failed: the process is at its open-file limit of {limit} (raised to the hard limit of {hard}, which binds)"
    )]
    FdLimit {
        /// The operation.
        op: &'static str,
        /// The soft `RLIMIT_NOFILE`.
        limit: u64,
        /// The hard `RLIMIT_NOFILE`.
        hard: u64,
    },
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The configured sizes give no valid layout.
    #[error(transparent)]
    Layout(#[from] crate::layout::LayoutError),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The page tables do not fit their area.
    #[error(transparent)]
    PageTables(#[from] crate::paging::TooManyTables),
    /// The embedded guest kernel could not be loaded.
    #[error("loading the guest kernel")]
    Kernel(#[source] linux_loader::loader::Error),
    /// The guest kernel is larger than its region.
    #[error("guest kernel ends at {end:#x}, past its region")]
    KernelTooLarge {
        /// Where it ends.
        end: u64,
    },
    /// Writing guest memory failed.
    #[error("writing guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// The channel slab could not give a slot.
    #[error(transparent)]
    Slab(#[from] crate::slab::SlabError),
    /// The runner pool could not be started.
    #[error(transparent)]
    Runners(#[from] crate::runner::PoolError),
    /// The snapshot memory does not match the configured layout.
    #[error("snapshot memory is {got} bytes, the layout needs {expected}")]
    SnapshotSize {
        /// Layout size.
        expected: u64,
        /// Memory given.
        got: u64,
    },
    /// The caller could not map guest memory over a shell's reservation.
    #[error("mapping the guest memory")]
    MapMemory(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A shell cannot be used this way.
    #[error("VM shell: {0}")]
    Shell(&'static str),
    /// Saving the instance's state failed.
    #[error("saving the instance state: {0}")]
    Save(&'static str),
    /// A saved state does not match the memory it is restored with.
    #[error("the saved state does not match its guest memory")]
    StateMismatch(#[source] crate::state::StateMismatch),
    /// The guest did not reach its request loop.
    #[error("the guest did not boot")]
    Boot(#[source] RunError),
}

impl VmmError {
    /// Whether this restore failure is the saved state's fault (KVM refused
    /// the registers it holds, or it does not match its memory): then the
    /// node is corrupt. A KVM call that failed for want of a resource
    /// (`ENOMEM`, `ENOSPC`, `EAGAIN`, `EMFILE`, `ENFILE`, `EINTR`: making a
    /// VM or vCPU when the host is out of memory or VMs), or one that does
    /// not load state (`KVM_CREATE_VCPU`, a memory slot), blames the host,
    /// never the node: calling it corrupt would make every later start of
    /// the function fail.
    pub fn blames_saved_state(&self) -> bool {
        /// The calls that load a saved state into a vCPU.
        const LOADS_STATE: [&str; 6] = [
            "KVM_SET_SREGS",
            "KVM_SET_REGS",
            "KVM_SET_XCRS",
            "KVM_SET_FPU",
            "KVM_SET_XSAVE",
            "KVM_SET_MSRS",
        ];
        const RESOURCE: [i32; 6] = [
            libc::ENOMEM,
            libc::ENOSPC,
            libc::EAGAIN,
            libc::EMFILE,
            libc::ENFILE,
            libc::EINTR,
        ];
        match self {
            Self::StateMismatch(_) | Self::Save(_) => true,
            Self::Kvm { op, source } => LOADS_STATE.contains(op) && !RESOURCE.contains(&source.errno()),
            _ => false,
        }
    }
}

/// How one request to a guest ended, other than with a reply.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The guest raised an exception (the instance is dead).
    #[error("{0}")]
    Fault(GuestFault),
    /// The guest stopped in a way the protocol does not allow (dead).
    #[error("guest crashed: {0}")]
    Crashed(Crash),
    /// The request ran past its budget; the vCPU was kicked (dead).
    #[error("request exceeded its budget")]
    BudgetExceeded,
    /// The guest's reply broke the protocol (dead).
    #[error("malformed reply")]
    Malformed(#[source] ReplyError),
    /// `KVM_RUN` itself failed (dead).
    #[error("KVM_RUN failed")]
    Kvm(#[source] kvm_ioctls::Error),
    /// The payload does not fit the I/O window.
    #[error("payload of {len} bytes exceeds the I/O window of {limit} bytes")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
        /// Window size.
        limit: u64,
    },
    /// Writing the request or reading the reply from guest memory failed.
    #[error("accessing guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// `resume` of a guest that is not stopped at a checkpoint.
    #[error("the instance is not stopped at a checkpoint")]
    NotAtCheckpoint,
    /// A request to a guest stopped at a checkpoint (resume it first).
    #[error("the instance is stopped at a checkpoint")]
    AtCheckpoint,
    /// The process running the instance's VM died (or broke the report
    /// protocol) with this request in flight.
    #[error("the VMM host process running the instance was lost")]
    Lost,
    /// The instance died earlier and cannot serve requests.
    #[error("instance is dead")]
    Dead,
    /// The artifact cannot be loaded (refused before anything was written).
    #[error("loading the artifact")]
    Load(#[source] crate::image::ImageError),
    /// A load into an instance that already served a request.
    #[error("a function is loaded only into a freshly booted instance")]
    AlreadyLoaded,
    /// A module for an instance that has not just loaded its artifact (it
    /// served a request since, or is not local to this process).
    #[error("a module is loaded only into an instance that has just loaded its artifact")]
    NotFreshlyLoaded,
    /// A reset of an instance that has no idle node to go back to (booted,
    /// or restored at a checkpoint) or no reset source.
    #[error("the instance cannot be reset")]
    NotResettable,
}

impl RunError {
    /// Whether the instance must be discarded after this error.
    pub fn kills_instance(&self) -> bool {
        !matches!(
            self,
            RunError::PayloadTooLarge { .. }
                | RunError::NotAtCheckpoint
                | RunError::AtCheckpoint
                | RunError::Load(_)
                | RunError::AlreadyLoaded
                | RunError::NotFreshlyLoaded
                | RunError::NotResettable
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm(op: &'static str, errno: i32) -> VmmError {
        VmmError::Kvm {
            op,
            source: kvm_ioctls::Error::new(errno),
        }
    }

    #[test]
    fn only_a_refused_state_blames_the_node() {
        // KVM refusing saved registers: the node's fault.
        assert!(kvm("KVM_SET_SREGS", libc::EINVAL).blames_saved_state());
        assert!(kvm("KVM_SET_XSAVE", libc::EFAULT).blames_saved_state());
        assert!(VmmError::Save("XSAVE area of the wrong size").blames_saved_state());
        // The host out of memory, VMs or fds, or a call that loads no state:
        // the host's.
        assert!(!kvm("KVM_CREATE_VCPU", libc::ENOMEM).blames_saved_state());
        assert!(!kvm("KVM_CREATE_VCPU", libc::EINVAL).blames_saved_state());
        assert!(!kvm("KVM_SET_USER_MEMORY_REGION", libc::EINVAL).blames_saved_state());
        assert!(!kvm("KVM_SET_SREGS", libc::ENOMEM).blames_saved_state());
        assert!(!kvm("KVM_SET_REGS", libc::EINTR).blames_saved_state());
        assert!(
            !VmmError::FdLimit {
                op: "KVM_CREATE_VM",
                limit: 1024,
                hard: 20000
            }
            .blames_saved_state()
        );
    }
}

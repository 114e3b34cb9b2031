//! KVM micro-VMM for the `vm` backend: creates a VM with one vCPU, maps its
//! memory, loads our guest kernel, prepares every privileged structure from
//! the host and enters the guest at CPL3; then talks to it through a mailbox
//! page and an MMIO doorbell (`guest-abi`), one exit per request (none for
//! back-to-back requests to a spinning hot instance).
//!
//! [`Vmm`] is the opened `/dev/kvm` (shared); [`Instance`] is one running
//! guest. Exit handling ([`exit`]), reply checking ([`channel`]), fault
//! decoding ([`fault`]), the layout and page tables are pure and unit tested.
//!
//! ```text
//!  caller thread                     vCPU thread (one per instance)
//!  Instance::invoke                  KVM_RUN ... MMIO exit
//!   write input -> I/O window          exit::handle (pure) -> Doorbell(seq)
//!   write request, publish req_seq     report, park until a newer req_seq
//!   wake (unless guest spinning) ---->  KVM_RUN: guest reads mailbox, runs fn,
//!   poll resp_seq / wait for report <-  writes reply, rings doorbell (exit)
//!   channel::check_reply (pure)
//!   copy output (bounds-checked)      watchdog: kick = SIGRTMIN+5 + immediate_exit
//! ```
//!
//! For the snapshot work: guest memory is one private anonymous mapping
//! ([`memory::GuestRam`]; a private file mapping slots in there), the
//! dirty-page log is a knob ([`InstanceConfig::dirty_log`],
//! [`Instance::take_dirty_pages`]), and the vCPU's boot state is built by
//! pure functions in [`cpu`] (a restored state is applied the same way).

pub mod channel;
pub mod cpu;
pub mod error;
pub mod exit;
pub mod fault;
pub mod instance;
pub mod kick;
pub mod layout;
pub mod memory;
pub mod paging;
mod setup;
pub mod stats;
mod vcpu;

pub use channel::Status;
pub use error::{RunError, VmmError};
pub use fault::GuestFault;
pub use instance::{BootTimings, Instance, InstanceConfig, Reply, now_ns};
pub use layout::LayoutConfig;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// The guest kernel image, built by `build.rs` from `guest/`.
pub static GUEST_KERNEL: &[u8] = include_bytes!(env!("GUEST_KERNEL_PATH"));

/// An opened `/dev/kvm` and what every instance needs from it.
#[derive(Debug)]
pub struct Vmm {
    kvm: Kvm,
    cpuid: CpuId,
    xsave: bool,
    xcr0: u64,
}

impl Vmm {
    /// Opens `/dev/kvm`, checks it is usable, and installs the vCPU kick
    /// signal handler.
    pub fn new() -> Result<Self, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::KvmUnavailable)?;
        if kvm.get_api_version() != 12 {
            return Err(VmmError::KvmUnavailable(kvm_ioctls::Error::new(libc::ENOSYS)));
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmmError::Kvm {
                op: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        let leaf = |f: u32, i: u32| {
            cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == f && e.index == i)
                .copied()
        };
        let xsave = leaf(1, 0).is_some_and(|e| e.ecx & (1 << 26) != 0);
        let xcr0 = leaf(0xd, 0).map_or(0b11, |e| cpu::xcr0(e.eax));
        kick::install().map_err(|source| VmmError::Kvm {
            op: "installing the vCPU kick handler",
            source,
        })?;
        Ok(Self {
            kvm,
            cpuid,
            xsave,
            xcr0,
        })
    }
}

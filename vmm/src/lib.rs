//! KVM micro-VMM for the `vm` backend: creates a VM with one vCPU, maps its
//! memory, loads our guest kernel, prepares every privileged structure from
//! the host and enters the guest at CPL3; then talks to it through a mailbox
//! page and an MMIO doorbell (`guest-abi`), one exit per request (none for
//! back-to-back requests to a spinning hot instance).
//!
//! Privilege separation: page tables (not mapped), GDT/IDT/TSS, the fault
//! stubs, the fault stack and the fault register are supervisor-only; the
//! kernel's code is read-only and its data non-executable to CPL3; the host
//! loads a function's artifact itself ([`image`], with the guest's own ELF
//! loader) and maps it W^X per segment before the guest first touches it;
//! a reply is read only from the I/O window ([`channel`]).
//!
//! [`Vmm`] is the opened `/dev/kvm` (shared); [`Instance`] is one running
//! guest. Exit handling ([`exit`]), reply checking ([`channel`]), fault
//! decoding ([`fault`]), the layout and page tables are pure and unit tested.
//!
//! ```text
//!  caller thread                     runner thread (a pool per process)
//!  Instance::invoke                  KVM_RUN ... MMIO exit
//!   write input -> I/O window          exit::handle (pure) -> Doorbell(seq)
//!   write request, publish req_seq     report, take the next queued instance
//!   queue it (unless guest spinning) ->  KVM_RUN: guest reads mailbox, runs fn,
//!   poll resp_seq / wait for report <-  writes reply, rings doorbell (exit)
//!   channel::check_reply (pure)
//!   copy output (bounds-checked)      watchdog: kick = SIGRTMIN+5 + immediate_exit
//! ```
//!
//! An idle instance holds no thread: its VM fd, its vCPU fd (with the
//! `kvm_run` mapping) and its memory ([`runner`]). Its mailbox page and I/O
//! window are a slot of a shared memory file ([`slab`]), their own memory
//! slots, next to a control page the guest never maps (the runner's report
//! and its futex word, the kill flag, [`report`]): the caller side touches
//! only the slot, so the VM can run in another process (a VMM host process,
//! [`Remote`]) with the caller and the vCPU still meeting in shared memory.
//!
//! Snapshots: [`Instance::save`] reads a stopped guest's vCPU and channel
//! state ([`state::SavedState`], a versioned blob), [`Instance::guest_memory`]
//! its memory; [`Instance::restore`] starts a guest from a saved state on
//! memory the caller mapped ([`ExternalMemory`], e.g. a snapshot image mapped
//! copy-on-write). A request may ask the guest to stop at the function's
//! `checkpoint()` ([`Instance::invoke_with`] -> [`Progress::Checkpoint`]) so
//! that it can be saved there, then [`Instance::resume`]d. The dirty-page log
//! is a knob ([`InstanceConfig::dirty_log`], [`Instance::take_dirty_pages`]).

pub mod channel;
pub mod cpu;
pub mod error;
pub mod exit;
pub mod fault;
pub mod image;
pub mod instance;
pub mod kick;
pub mod layout;
pub mod limits;
pub mod memory;
pub mod paging;
pub mod report;
pub mod runner;
mod setup;
pub mod slab;
pub mod state;
pub mod stats;
mod vcpu;

pub use channel::Status;
pub use error::{RunError, VmmError};
pub use fault::GuestFault;
/// The host<->guest ABI (layout constants, mailbox, reply codes).
pub use guest_abi as abi;
pub use instance::{
    BootTimings, Instance, InstanceConfig, MapMemoryError, MemoryPlan, Pristine, Progress, Remote, RemoteStart, Reply,
    ResetError, ResetSource, ResetStats, RestoreTimings, Shell, WORKING_SET_LIMIT_PAGES, now_ns,
};
pub use layout::LayoutConfig;
pub use memory::ExternalMemory;
pub use runner::{Placement, RunnerConfig};
pub use state::{SavedState, StateError, VcpuState};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// The guest kernel image, built by `build.rs` from `guest/`.
pub static GUEST_KERNEL: &[u8] = include_bytes!(env!("GUEST_KERNEL_PATH"));

/// An opened `/dev/kvm` and what every instance needs from it.
#[derive(Debug)]
pub struct Vmm {
    kvm: Kvm,
    cpuid: CpuId,
    features: cpu::Features,
    xcr0: u64,
    /// The runner pool, started with the first instance (a VMM host
    /// process enters its sandbox before any thread exists).
    pool: std::sync::OnceLock<std::sync::Arc<runner::Pool>>,
    runners: RunnerConfig,
    /// The channel slabs, by I/O window size.
    slabs: std::sync::Mutex<Vec<std::sync::Arc<slab::Slab>>>,
    /// `/proc/self/pagemap`, opened now (before any sandbox) for resets
    /// ([`Instance::reset`]); `None` if it cannot be opened.
    pagemap: Option<std::sync::Arc<std::fs::File>>,
    /// Resets find written pages with the `PAGEMAP_SCAN` ioctl instead of
    /// reading the pagemap ([`Vmm::use_pagemap_scan`]).
    pagemap_scan: bool,
    /// KVM copies the general and segment registers through `kvm_run`
    /// (`KVM_CAP_SYNC_REGS`): a reset reads and sets them there instead of
    /// by two ioctls (~7 us each here).
    sync_regs: bool,
}

impl Vmm {
    /// Opens `/dev/kvm`, checks it is usable, installs the vCPU kick
    /// signal handler; the default runner pool starts with the first
    /// instance.
    pub fn new() -> Result<Self, VmmError> {
        Self::with_runners(RunnerConfig::default())
    }

    /// Like [`Vmm::new`] with a runner pool of `runners`.
    pub fn with_runners(runners: RunnerConfig) -> Result<Self, VmmError> {
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
        let leaf7 = leaf(7, 0).map_or(0, |e| e.ebx);
        let features = cpu::Features {
            xsave,
            smep: leaf7 & (1 << 7) != 0,
            smap: leaf7 & (1 << 20) != 0,
        };
        let xcr0 = leaf(0xd, 0).map_or(0b11, |e| cpu::xcr0(e.eax));
        let want = u64::from(kvm_bindings::KVM_SYNC_X86_REGS | kvm_bindings::KVM_SYNC_X86_SREGS);
        let sync_regs = u64::try_from(kvm.check_extension_int(kvm_ioctls::Cap::SyncRegs)).unwrap_or(0) & want == want;
        // Two fds per VM (VM, vCPU): as many as the hard limit allows.
        let _ = limits::raise_fd_limit();
        kick::install().map_err(|source| VmmError::Kvm {
            op: "installing the vCPU kick handler",
            source,
        })?;
        Ok(Self {
            kvm,
            cpuid,
            features,
            xcr0,
            pool: std::sync::OnceLock::new(),
            runners,
            slabs: std::sync::Mutex::new(Vec::new()),
            pagemap: std::fs::File::open("/proc/self/pagemap").ok().map(std::sync::Arc::new),
            pagemap_scan: false,
            sync_regs,
        })
    }

    /// Lets resets of this VMM's instances find the pages a guest wrote
    /// with the `PAGEMAP_SCAN` ioctl (Linux 6.7+; one call returns the
    /// written ranges) rather than by reading 8 bytes of pagemap per guest
    /// page, if the kernel has it: true if it does. Not for a process whose
    /// seccomp filter refuses that ioctl (a VMM host process's allows only
    /// KVM's).
    pub fn use_pagemap_scan(&mut self) -> bool {
        self.pagemap_scan = self.pagemap.as_deref().is_some_and(instance::pagemap_scan_works);
        self.pagemap_scan
    }

    /// For a sandboxed process whose filter refuses reading the pagemap
    /// (a VMM host process: the fd was opened with the privileges the
    /// process had before its sandbox, so reading it would show physical
    /// frame numbers): resets use `PAGEMAP_SCAN` if the kernel has it,
    /// else the pagemap is closed and instances of this VMM cannot be reset
    /// (`RunError::NotResettable`: the backend restores instead). Returns
    /// the pagemap's fd number, for the filter, if it stays open.
    pub fn pagemap_scan_only(&mut self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        if !self.use_pagemap_scan() {
            self.pagemap = None;
        }
        self.pagemap.as_deref().map(std::fs::File::as_raw_fd)
    }

    /// A free channel slot (mailbox page + I/O window) for `layout`.
    pub(crate) fn channel_slot(&self, layout: &layout::Layout) -> Result<slab::SlabSlot, VmmError> {
        let slab = {
            let mut slabs = self
                .slabs
                .lock()
                .map_err(|_| VmmError::Shell("the slab list was poisoned"))?;
            let stride = slab::slot_stride(layout.io_bytes);
            match slabs.iter().find(|s| Some(s.stride()) == stride) {
                Some(s) => std::sync::Arc::clone(s),
                None => {
                    let s = slab::Slab::new(layout.io_bytes)?;
                    slabs.push(std::sync::Arc::clone(&s));
                    s
                }
            }
        };
        let mut slot = slab.take()?;
        slot.bind(layout.io_addr)?;
        Ok(slot)
    }

    /// Channel slots in use (instances and shells holding one).
    pub fn channel_slots_in_use(&self) -> usize {
        self.slabs
            .lock()
            .map(|s| s.iter().map(|s| s.in_use()).sum())
            .unwrap_or(0)
    }

    /// The runner pool (started now if it was not).
    pub(crate) fn pool(&self) -> Result<std::sync::Arc<runner::Pool>, VmmError> {
        if let Some(p) = self.pool.get() {
            return Ok(std::sync::Arc::clone(p));
        }
        let pool = runner::Pool::new(self.runners)?;
        Ok(std::sync::Arc::clone(self.pool.get_or_init(|| pool)))
    }

    /// Runner threads of this VMM's pool (0 before the first instance).
    pub fn runner_threads(&self) -> usize {
        self.pool.get().map_or(0, |p| p.threads())
    }
}

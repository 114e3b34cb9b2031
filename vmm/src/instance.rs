//! One micro-VM instance: a KVM VM with one vCPU running our guest and its
//! memory; no thread of its own (a runner of the process's pool runs its
//! vCPU, see [`crate::runner`]). The caller's thread writes requests into
//! the mailbox, hands the instance to a runner (unless the guest is
//! spinning on the mailbox), and waits for the reply with the request's
//! deadline (the watchdog: on expiry the vCPU is kicked and the instance
//! discarded). Dropping an instance tears it down on the dropping thread
//! (the backend's reaper), or on the runner if it is running.

use crate::Vmm;
use crate::channel::{self, CheckedReply, MAILBOX_BYTES, Status};
use crate::cpu;
use crate::error::{RunError, VmmError};
use crate::image;
use crate::kick;
use crate::layout::{Layout, LayoutConfig};
use crate::memory::GuestRam;
use crate::runner::{Pool, Queued};
use crate::setup::{channel_slots, host_rdtsc, memory_slots, write_boot_info, write_system_state};
use crate::slab::SlabSlot;
use crate::stats::StatsFd;
use crate::vcpu::{Cmd, Event, StartAt, Vcpu};

mod reset;
mod snapshot;
use guest_abi::{LoadRequest, MAILBOX_ADDR, Mailbox, ModuleRequest, PAGE_BYTES, op};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{VcpuFd, VmFd};
pub(crate) use reset::pagemap_scan_works;
pub use reset::{MemoryPlan, Pristine, ResetError, ResetSource, ResetStats, WORKING_SET_LIMIT_PAGES};
pub use snapshot::{MapMemoryError, Shell};
use std::collections::VecDeque;
use std::mem::offset_of;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// Guest addresses of the mailbox fields accessed atomically.
pub(crate) const REQ_SEQ_ADDR: u64 = MAILBOX_ADDR + offset_of!(Mailbox, req_seq) as u64;
const RESP_SEQ_ADDR: u64 = MAILBOX_ADDR + offset_of!(Mailbox, resp_seq) as u64;
const SPINNING_ADDR: u64 = MAILBOX_ADDR + offset_of!(Mailbox, guest_spinning) as u64;
const CHECKPOINT_SEQ_ADDR: u64 = MAILBOX_ADDR + offset_of!(Mailbox, checkpoint_seq) as u64;
/// How often a host waiting on a spinning guest re-reads the mailbox once
/// its own spin is over.
const SPIN_POLL: Duration = Duration::from_micros(50);

/// Sizes and limits of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceConfig {
    /// Memory layout sizes.
    pub layout: LayoutConfig,
    /// Largest output accepted from the guest, in bytes.
    pub output_limit_bytes: u64,
    /// Guest log bytes kept (the most recent).
    pub serial_cap_bytes: usize,
    /// Back the large guest regions (the I/O window and heap past their
    /// first 2 MiB) with transparent huge pages (`MADV_HUGEPAGE`).
    pub huge_pages: bool,
    /// Hot spinning: after a reply the idle guest polls the mailbox this
    /// many microseconds before blocking in the doorbell, and the host polls
    /// for replies as long, so back-to-back requests cost no exit. 0 = every
    /// request is one exit (no CPU burnt while idle).
    pub idle_spin_us: u32,
    /// Log the pages the guest dirties (`KVM_MEM_LOG_DIRTY_PAGES`), read
    /// with [`Instance::take_dirty_pages`] (for snapshot deltas).
    pub dirty_log: bool,
    /// Open the vCPU's binary statistics (`KVM_GET_STATS_FD`) for
    /// [`Instance::vcpu_stat`]: one more fd per instance, so off where
    /// thousands of instances run and nobody reads them.
    pub vcpu_stats: bool,
}

impl Default for InstanceConfig {
    fn default() -> Self {
        Self {
            layout: LayoutConfig {
                stack_bytes: 1 << 20,
                io_bytes: 4 << 20,
                image_bytes: 8 << 20,
                heap_bytes: 64 << 20,
            },
            output_limit_bytes: 4 << 20,
            serial_cap_bytes: 16 << 10,
            huge_pages: true,
            idle_spin_us: 0,
            dirty_log: false,
            vcpu_stats: true,
        }
    }
}

/// Where a cold boot's time went, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootTimings {
    /// `KVM_CREATE_VM`.
    pub create_vm_ns: u64,
    /// Guest memory mapping + memory slot.
    pub memory_ns: u64,
    /// Kernel ELF, page tables, GDT/IDT/TSS, boot info.
    pub setup_ns: u64,
    /// vCPU creation and register state.
    pub vcpu_ns: u64,
    /// First `KVM_RUN` to the guest's first doorbell (guest start).
    pub guest_boot_ns: u64,
    /// All of the above, end to end.
    pub total_ns: u64,
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// What the runtime reported.
    pub status: Status,
    /// The output (on `Ok`) or the message (otherwise).
    pub data: Vec<u8>,
    /// Function entry, host `CLOCK_MONOTONIC` ns (0 if it did not run).
    pub entered_ns: u64,
    /// Function return, host `CLOCK_MONOTONIC` ns (0 if it did not run).
    pub returned_ns: u64,
    /// Heap bytes in use after the request.
    pub heap_used: u64,
}

/// How far a request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The guest answered.
    Replied(Reply),
    /// The function stopped in `checkpoint()` (the request asked for it):
    /// the guest is stopped; snapshot it ([`Instance::save`], its memory),
    /// then [`Instance::resume`] it.
    Checkpoint,
}

/// State shared by the instance handle and the runner running it.
#[derive(Debug)]
pub(crate) struct Shared {
    // Field order is drop order: the vCPU and the VM (and its memory
    // slots) go before the memory they map.
    pub(crate) vcpu: Mutex<Vcpu>,
    pub(crate) vm: VmFd,
    pub(crate) ram: GuestRam,
    /// The mailbox page, I/O window and control block (in a channel slab).
    pub(crate) chan: Arc<SlabSlot>,
    pub(crate) layout: Layout,
    pub(crate) serial: Mutex<Vec<u8>>,
    pub(crate) serial_cap: usize,
    /// Commands for the runner, in order.
    pub(crate) cmds: Mutex<VecDeque<Cmd>>,
    /// On a run queue or a runner.
    pub(crate) queued: Queued,
    /// The runner it last ran on (where it is queued next).
    pub(crate) home: AtomicUsize,
    /// The runner thread running it now (0: none): where a kick goes.
    pub(crate) running_on: AtomicU64,
    /// CPU time runners spent on it.
    pub(crate) cpu_ns: AtomicU64,
    /// What a reset puts back (set for instances restored from an idle node).
    pub(crate) reset: Mutex<Option<Arc<ResetSource>>>,
    /// `/proc/self/pagemap`, opened with the VMM (for resets).
    pub(crate) pagemap: Option<Arc<std::fs::File>>,
    /// Resets may use the `PAGEMAP_SCAN` ioctl on it.
    pub(crate) pagemap_scan: bool,
    /// Resets read and set registers through `kvm_run` (`KVM_CAP_SYNC_REGS`).
    pub(crate) sync_regs: bool,
    /// What the last reset did.
    pub(crate) reset_stats: Mutex<ResetStats>,
    /// Working-set pages pre-copied at restore.
    pub(crate) prefaulted: AtomicU64,
}

impl Shared {
    /// Records a runner's report in the control block and wakes the caller.
    pub(crate) fn report(&self, event: Event) {
        crate::report::write(self.chan.control(), &event);
    }

    /// Whether the caller gave the instance up.
    pub(crate) fn is_killed(&self) -> bool {
        self.chan.control().kill.load(Ordering::SeqCst) != 0
    }
}

/// Where an instance's VM runs.
#[derive(Debug)]
enum Side {
    /// In this process, on its runner pool.
    Local {
        shared: Arc<Shared>,
        /// Held so that its runners (which a kick may reach) outlive the
        /// instance.
        pool: Arc<Pool>,
    },
    /// In another process (a VMM host process); this side only has the
    /// slot, written and read as the caller.
    Remote(Box<dyn Remote>),
}

/// The caller's handle on a VM that runs in another process (a VMM host
/// process): its channel slot in a slab that process maps too, and how to
/// queue a run there. Dropping it gives the VM up (the implementation
/// frees the slot once that process has dropped the VM).
pub trait Remote: Send + Sync + std::fmt::Debug {
    /// The instance's channel slot.
    fn chan(&self) -> &Arc<SlabSlot>;
    /// Queues a run of the instance (`resume`: from its checkpoint) where
    /// its VM runs; false if that process is gone.
    fn submit(&self, resume: bool) -> bool;
    /// Asks that process to kick the instance (its kill flag is set).
    fn kick(&self);
    /// Queues a reset of the instance to its node's state where its VM
    /// runs; false if that process is gone or cannot reset.
    fn submit_reset(&self) -> bool {
        false
    }
    /// Whether that process is alive.
    fn alive(&self) -> bool;
}

/// How a remote instance starts: what the process running its VM reported
/// when it restored it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteStart {
    /// The saved state's request sequence number.
    pub seq: u32,
    /// Stopped at a checkpoint (resume it first).
    pub at_checkpoint: bool,
    /// Guest TSC minus host TSC.
    pub tsc_offset: u64,
}

/// A running micro-VM serving one function.
#[derive(Debug)]
pub struct Instance {
    side: Side,
    layout: Layout,
    stats: Option<StatsFd>,
    /// The last `report_seq` consumed.
    reports_seen: u32,
    seq: u32,
    dead: bool,
    output_limit: u64,
    /// Guest TSC minus host TSC (KVM's TSC offset; no TSC scaling is set).
    tsc_offset: u64,
    /// How long to poll for a reply before sleeping (the guest's idle spin:
    /// a spinning guest rings no doorbell, so the caller must poll).
    host_spin: Duration,
    /// How much longer a caller with a core to spare polls for its reply
    /// before it sleeps ([`Instance::set_reply_spin`]).
    reply_spin: Duration,
    /// Stopped inside `checkpoint()` of request `seq`: resume before use.
    at_checkpoint: bool,
    /// The request sequence number of the idle node it was restored from
    /// (what a reset returns it to); `None`: booted, or at a checkpoint.
    origin_seq: Option<u32>,
    /// A reset was queued and its report not yet consumed.
    reset_pending: bool,
    /// How long each step of its restore took (restored here only).
    restore_timings: Option<RestoreTimings>,
}

/// How long each step of a restore took, in ns: where a slow start went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreTimings {
    /// Mapping the guest memory (and a channel slot's view) over a
    /// pre-made shell's reservations ([`Instance::restore_into`],
    /// [`Instance::restore_into_slot`]; 0 otherwise: the caller mapped it).
    pub map_ns: u64,
    /// Making the VM and its vCPU (0 with a pre-made shell).
    pub shell_ns: u64,
    /// Checking the mailbox against the state and registering the memory
    /// slots (`KVM_SET_USER_MEMORY_REGION`; 0 when the shell had them).
    pub slots_ns: u64,
    /// The channel copy and the vCPU state (`channel_ns + vcpu_ns`).
    pub state_ns: u64,
    /// Copying the node's mailbox page (and a checkpoint's input) into
    /// the channel slot.
    pub channel_ns: u64,
    /// Setting the vCPU's registers (0-ish when the shell was primed with
    /// them, [`Shell::prime`]).
    pub vcpu_ns: u64,
    /// Whether the registers were set (false: the shell was primed with
    /// the node's vCPU state).
    pub vcpu_set: bool,
    /// Handing the instance to a runner.
    pub spawn_ns: u64,
}

fn ns_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// The host's `CLOCK_MONOTONIC` in ns (the clock guest timestamps use).
pub fn now_ns() -> u64 {
    monotonic_ns()
}

pub(crate) fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| {
        if source.errno() == libc::EMFILE {
            let (limit, hard) = crate::limits::fd_limit().unwrap_or((0, 0));
            return VmmError::FdLimit { op, limit, hard };
        }
        VmmError::Kvm { op, source }
    }
}

impl Instance {
    /// Boots a new instance: VM, memory, guest kernel, CPL3 entry, and runs
    /// the guest until its request loop rings the doorbell.
    pub fn boot(vmm: &Vmm, config: &InstanceConfig) -> Result<(Self, BootTimings), VmmError> {
        let t0 = Instant::now();
        let mut timings = BootTimings::default();
        let layout = Layout::new(config.layout)?;

        let t = Instant::now();
        let vm = vmm.kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        timings.create_vm_ns = ns_since(t);

        let t = Instant::now();
        let mem_bytes =
            usize::try_from(layout.mem_bytes).map_err(|_| crate::layout::LayoutError::DoesNotFit("memory size"))?;
        let huge: Vec<(usize, usize)> = if config.huge_pages {
            layout
                .huge_page_ranges()
                .iter()
                .filter_map(|&(a, l)| Some((usize::try_from(a).ok()?, usize::try_from(l).ok()?)))
                .collect()
        } else {
            Vec::new()
        };
        let ram = GuestRam::new(mem_bytes, &huge)?;
        let chan = vmm.channel_slot(&layout)?;
        // SAFETY: `ram` and `chan` are moved into `Shared`, which drops them
        // after the VM.
        unsafe { add_memory_slots(&vm, ram.host_addr(), &chan, &layout, config.dirty_log) }?;
        timings.memory_ns = ns_since(t);

        let t = Instant::now();
        let entry = write_system_state(&ram, &layout)?;
        timings.setup_ns = ns_since(t);

        let t = Instant::now();
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&vmm.cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&cpu::cpl3_sregs(sregs, vmm.features))
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        let msrs = kvm_bindings::Msrs::from_entries(&cpu::syscall_msrs()).map_err(|_| VmmError::Kvm {
            op: "building the MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        vcpu.set_regs(&cpu::entry_regs(entry, layout.stack_top))
            .map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.set_fpu(&cpu::initial_fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
        if vmm.features.xsave {
            vcpu.set_xcrs(&cpu::xcrs(vmm.xcr0)).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        let tsc_offset = write_boot_info(&ram, &layout, &vcpu, config.idle_spin_us)?;
        let stats = if config.vcpu_stats {
            StatsFd::open(&vcpu).ok()
        } else {
            None
        };
        timings.vcpu_ns = ns_since(t);

        let t = Instant::now();
        let mut instance = Self::spawn(
            vmm,
            vm,
            (ram, chan),
            layout,
            vcpu,
            config,
            stats,
            tsc_offset,
            StartAt::Run,
            0,
        )?;
        // The guest starts running now; it rings with seq 0 when ready.
        instance.command(Cmd::Run);
        instance
            .wait(Instant::now() + Duration::from_secs(5))
            .map_err(VmmError::Boot)?;
        timings.guest_boot_ns = ns_since(t);
        timings.total_ns = ns_since(t0);
        Ok((instance, timings))
    }

    #[allow(clippy::too_many_arguments, reason = "one private constructor's parts")]
    fn spawn(
        vmm: &Vmm,
        vm: VmFd,
        (ram, chan): (GuestRam, SlabSlot),
        layout: Layout,
        vcpu: VcpuFd,
        config: &InstanceConfig,
        stats: Option<StatsFd>,
        tsc_offset: u64,
        start: StartAt,
        seq: u32,
    ) -> Result<Self, VmmError> {
        let pool = vmm.pool()?;
        let shared = Arc::new(Shared {
            vcpu: Mutex::new(Vcpu { fd: vcpu, at: start }),
            vm,
            ram,
            chan: Arc::new(chan),
            layout,
            serial: Mutex::new(Vec::new()),
            serial_cap: config.serial_cap_bytes,
            cmds: Mutex::new(VecDeque::new()),
            queued: Queued::default(),
            home: AtomicUsize::new(pool.assign_home()),
            running_on: AtomicU64::new(0),
            cpu_ns: AtomicU64::new(0),
            reset: Mutex::new(None),
            pagemap: vmm.pagemap.clone(),
            pagemap_scan: vmm.pagemap_scan,
            sync_regs: vmm.sync_regs,
            reset_stats: Mutex::new(ResetStats::default()),
            prefaulted: AtomicU64::new(0),
        });
        Ok(Self {
            side: Side::Local { shared, pool },
            layout,
            stats,
            reports_seen: 0,
            seq,
            dead: false,
            output_limit: config.output_limit_bytes,
            tsc_offset,
            host_spin: Duration::from_micros(u64::from(config.idle_spin_us)),
            reply_spin: Duration::ZERO,
            at_checkpoint: false,
            origin_seq: None,
            restore_timings: None,
            reset_pending: false,
        })
    }

    /// Request sequence number of the last request (or the saved state's).
    pub fn seq(&self) -> u32 {
        self.seq
    }

    /// Guest TSC minus host TSC, as measured at boot or restore.
    pub fn tsc_offset(&self) -> u64 {
        self.tsc_offset
    }

    /// The VM side's host API: stops the instance and tears it down on this
    /// thread, waiting (up to `limit`) for a runner still holding it to let
    /// go: when this returns true the VM is gone and its channel slot may
    /// be reused.
    pub fn teardown(self, limit: Duration) -> bool {
        let shared = self.local().map(Arc::clone);
        drop(self); // kills it; a runner running it stops
        let Some(mut shared) = shared else {
            return true;
        };
        let until = Instant::now() + limit;
        loop {
            match Arc::try_unwrap(shared) {
                Ok(inner) => {
                    drop(inner);
                    return true;
                }
                Err(back) if Instant::now() < until => {
                    shared = back;
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(_) => return false,
            }
        }
    }

    /// An instance whose VM runs in another process (`remote`), restored
    /// there into `remote`'s slot as `start` says.
    pub fn remote(remote: Box<dyn Remote>, config: &InstanceConfig, start: RemoteStart) -> Result<Self, VmmError> {
        let layout = Layout::new(config.layout)?;
        let reports_seen = remote.chan().control().report_seq.load(Ordering::Acquire);
        Ok(Self {
            side: Side::Remote(remote),
            layout,
            stats: None,
            reports_seen,
            seq: start.seq,
            dead: false,
            output_limit: config.output_limit_bytes,
            tsc_offset: start.tsc_offset,
            host_spin: Duration::from_micros(u64::from(config.idle_spin_us)),
            reply_spin: Duration::ZERO,
            at_checkpoint: start.at_checkpoint,
            origin_seq: (!start.at_checkpoint).then_some(start.seq),
            reset_pending: false,
            restore_timings: None,
        })
    }

    fn local(&self) -> Option<&Arc<Shared>> {
        match &self.side {
            Side::Local { shared, .. } => Some(shared),
            Side::Remote(_) => None,
        }
    }

    /// The instance's channel slot (mailbox, I/O window, control block).
    fn chan(&self) -> &Arc<SlabSlot> {
        match &self.side {
            Side::Local { shared, .. } => &shared.chan,
            Side::Remote(r) => r.chan(),
        }
    }

    /// Whether the VM runs in another process.
    pub fn is_remote(&self) -> bool {
        matches!(self.side, Side::Remote(_))
    }

    /// Hands the instance a command (queued on a runner unless it already
    /// is); false if the process running its VM is gone.
    pub(crate) fn command(&self, cmd: Cmd) -> bool {
        match &self.side {
            Side::Local { shared, pool } => {
                if let Ok(mut q) = shared.cmds.lock() {
                    q.push_back(cmd);
                }
                if shared.queued.set() {
                    pool.submit(Arc::clone(shared));
                }
                true
            }
            Side::Remote(r) => match cmd {
                Cmd::Run => r.submit(false),
                Cmd::Resume => r.submit(true),
                Cmd::Reset => r.submit_reset(),
                Cmd::Save(_) => false,
            },
        }
    }

    /// The VM side's host API: the caller side (in another process)
    /// published a request in the slot, or asked to resume from the
    /// checkpoint: queue the instance on a runner.
    pub fn run_published(&self, resume: bool) {
        self.command(if resume { Cmd::Resume } else { Cmd::Run });
    }

    /// The VM side's host API: the caller side asked for a reset of the
    /// (idle) instance to its node: queue it on a runner, which reports
    /// the node's sequence number when done.
    pub fn reset_published(&self) {
        self.command(Cmd::Reset);
    }

    /// Gives the instance what [`Instance::reset`] puts back: the idle
    /// node it was restored from.
    ///
    /// Where the VM runs here and the node has a recorded first-run working
    /// set (see [`ResetSource::working_set`]), its pages are pre-copied into
    /// the instance now, before its first request.
    pub fn set_reset_source(&self, source: Arc<ResetSource>) {
        if let Some(shared) = self.local() {
            if let Some(runs) = source.working_set() {
                let pages = shared.prefault(runs);
                shared
                    .prefaulted
                    .store(u64::try_from(pages).unwrap_or(u64::MAX), Ordering::Relaxed);
            }
            if let Ok(mut r) = shared.reset.lock() {
                *r = Some(source);
            }
        }
    }

    /// How long the steps of this instance's restore took (`None`: booted,
    /// or restored in another process).
    pub fn restore_timings(&self) -> Option<RestoreTimings> {
        self.restore_timings
    }

    /// Pages of its node's working set pre-copied into this instance when
    /// it was given its reset source (0 for a remote instance).
    pub fn prefaulted_pages(&self) -> u64 {
        self.local().map_or(0, |s| s.prefaulted.load(Ordering::Relaxed))
    }

    /// Whether [`Instance::reset`] can be asked of this instance (restored
    /// from an idle node, with its reset source where its VM runs here).
    pub fn can_reset(&self) -> bool {
        self.origin_seq.is_some()
            && match self.local() {
                Some(s) => s.pagemap.is_some() && s.reset.lock().is_ok_and(|r| r.is_some()),
                None => true,
            }
    }

    /// Resets the idle instance to the state of the node it was restored
    /// from (see [`reset`](self::reset)): its written pages, I/O window,
    /// mailbox and vCPU registers, wherever its VM runs. Waits for it up to
    /// `deadline`; a failure discards the instance.
    pub fn reset(&mut self, deadline: Instant) -> Result<(), RunError> {
        self.begin_reset()?;
        self.finish_reset(deadline)
    }

    /// Queues a reset (see [`Instance::reset`]) without waiting for it: the
    /// runner does it while the caller moves on (e.g. right after a reply,
    /// so that the next request finds the instance fresh). The next request
    /// or [`Instance::finish_reset`] waits for it.
    pub fn begin_reset(&mut self) -> Result<(), RunError> {
        if self.dead {
            return Err(RunError::Dead);
        }
        if self.at_checkpoint {
            return Err(RunError::AtCheckpoint);
        }
        if self.reset_pending {
            return Ok(());
        }
        if self.origin_seq.is_none() || !self.can_reset() {
            return Err(RunError::NotResettable);
        }
        if !self.command(Cmd::Reset) {
            self.kill();
            return Err(RunError::Lost);
        }
        self.reset_pending = true;
        Ok(())
    }

    /// Whether a reset was queued and not yet waited for.
    pub fn reset_pending(&self) -> bool {
        self.reset_pending
    }

    /// Waits (up to `deadline`) for the reset [`Instance::begin_reset`]
    /// queued; nothing if none is pending. A failure discards the instance.
    pub fn finish_reset(&mut self, deadline: Instant) -> Result<(), RunError> {
        if !self.reset_pending {
            return Ok(());
        }
        self.reset_pending = false;
        let Some(expect) = self.origin_seq else {
            self.kill();
            return Err(RunError::NotResettable);
        };
        loop {
            match self.wait(deadline) {
                Ok(seq) if seq == expect => break,
                // The doorbell of the request before (reported after its
                // reply was read): the reset's report follows.
                Ok(_) => {}
                Err(e) => {
                    self.kill();
                    return Err(e);
                }
            }
        }
        self.seq = expect;
        Ok(())
    }

    /// What the last reset of this (local) instance did.
    pub fn last_reset_stats(&self) -> Option<ResetStats> {
        self.local()?.reset_stats.lock().ok().map(|s| *s)
    }

    /// The VM side's host API: if the caller side set the slot's kill flag,
    /// stops the vCPU (kicking the runner running it); true if it did.
    pub fn stop_if_killed(&self) -> bool {
        match &self.side {
            Side::Local { shared, .. } if shared.is_killed() => {
                shared.stop();
                true
            }
            _ => false,
        }
    }

    /// Marks the instance killed and stops its vCPU wherever it runs.
    fn stop_vm(&self) {
        match &self.side {
            Side::Local { shared, .. } => shared.stop(),
            Side::Remote(r) => {
                r.chan().control().kill.store(1, Ordering::SeqCst);
                r.kick();
            }
        }
    }

    /// The layout of this instance's memory.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Whether the instance can still serve requests.
    pub fn is_alive(&self) -> bool {
        !self.dead
            && match &self.side {
                Side::Local { .. } => true,
                Side::Remote(r) => r.alive(),
            }
    }

    /// The guest's log (the most recent bytes; empty for a remote instance).
    pub fn serial_log(&self) -> String {
        let Some(shared) = self.local() else {
            return String::new();
        };
        let log = shared.serial.lock().map(|l| l.clone()).unwrap_or_default();
        String::from_utf8_lossy(&log).into_owned()
    }

    /// Reads a KVM binary statistic of the vCPU (e.g. `insn_emulation`).
    pub fn vcpu_stat(&self, name: &str) -> Option<u64> {
        self.stats.as_ref()?.read(name).ok().flatten()
    }

    /// Guest-physical addresses of the pages the guest wrote since the last
    /// call (or boot), when booted with `dirty_log`. Writes the VMM makes
    /// itself (requests, payloads) are not included: KVM logs guest writes.
    pub fn take_dirty_pages(&self) -> Result<Vec<u64>, VmmError> {
        let mut pages = Vec::new();
        let Some(shared) = self.local() else {
            return Err(VmmError::Shell("a remote instance's dirty log is its host process's"));
        };
        let layout = &self.layout;
        for (slot, start, end) in memory_slots(layout).into_iter().chain(channel_slots(layout)) {
            let size = usize::try_from(end - start).unwrap_or(0);
            let bitmap = shared
                .vm
                .get_dirty_log(slot, size)
                .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
            for (word_index, word) in (0u64..).zip(bitmap) {
                for bit in 0..64u64 {
                    if word & (1 << bit) != 0 {
                        pages.push(start + (word_index * 64 + bit) * PAGE_BYTES);
                    }
                }
            }
        }
        Ok(pages)
    }

    /// CPU time runners have spent running this instance's vCPU (guest and
    /// VMM time), in ns, up to its last report.
    pub fn vcpu_cpu_time_ns(&self) -> Option<u64> {
        Some(self.local()?.cpu_ns.load(Ordering::Relaxed))
    }

    /// Host memory resident for this instance's guest RAM (0 for a remote
    /// instance: its host process's).
    pub fn resident_bytes(&self) -> u64 {
        self.local().map_or(0, |s| s.ram.resident_bytes())
    }

    /// Loads a function artifact and runs its `init()`: the host loads and
    /// relocates it into the image region (unmapped until now, so the guest
    /// has no translation of it), maps each page with its segment's rights
    /// (W^X), and asks the guest to run `init()`. Only the first request of
    /// a booted guest (or of one restored from the base snapshot) may be a
    /// load.
    pub fn load(&mut self, artifact: &[u8], deadline: Instant) -> Result<Reply, RunError> {
        if self.dead {
            return Err(RunError::Dead);
        }
        if self.seq != 0 || self.at_checkpoint {
            return Err(RunError::AlreadyLoaded);
        }
        let layout = self.layout;
        let loaded = image::prepare(artifact, &layout).map_err(RunError::Load)?;
        let (tables, pdes) = image::mapping(&loaded, &layout).map_err(RunError::Load)?;
        let Some(shared) = self.local().map(Arc::clone) else {
            return Err(RunError::AlreadyLoaded);
        };
        // The guest is stopped (idle after boot); it sees all of this when
        // it first touches the image, after the page-directory entries
        // (written last) make it present.
        let mem = shared.ram.mem();
        let write = |bytes: &[u8], addr: u64| {
            mem.write_slice(bytes, GuestAddress(addr))
                .map_err(RunError::GuestMemory)
        };
        write(&loaded.bytes, layout.image_addr)?;
        write(&tables.to_bytes(), tables.base)?;
        for (at, entry) in pdes {
            write(&entry.to_le_bytes(), at)?;
        }
        let mut request = [0u8; size_of::<LoadRequest>()];
        request[..8].copy_from_slice(&loaded.entry.init_addr.to_le_bytes());
        request[8..16].copy_from_slice(&loaded.entry.handle_addr.to_le_bytes());
        request[16..].copy_from_slice(&loaded.entry.load_addr.to_le_bytes());
        match self.request(op::LOAD, &request, deadline, false)? {
            Progress::Replied(r) => Ok(r),
            // `init()` cannot ask for a checkpoint (the request did not).
            Progress::Checkpoint => {
                self.kill();
                Err(RunError::Dead)
            }
        }
    }

    /// Hands `module` (a function's deploy-time data, e.g. a WebAssembly
    /// module for a runtime artifact) to the `load()` of `artifact`, which
    /// this instance loaded with [`Instance::load`] (here or in the
    /// instance its snapshot was taken from) and has served nothing since.
    /// The host maps the module read-only into the image region past the
    /// artifact, keeping every translation the guest already uses, and asks
    /// the guest to run `load()` on it. A reply other than `Ok` (the module
    /// refused) ends the instance.
    pub fn load_module(&mut self, artifact: &[u8], module: &[u8], deadline: Instant) -> Result<Reply, RunError> {
        if self.dead {
            return Err(RunError::Dead);
        }
        if self.seq != 1 || self.at_checkpoint {
            return Err(RunError::NotFreshlyLoaded);
        }
        let layout = self.layout;
        let loaded = image::prepare(artifact, &layout).map_err(RunError::Load)?;
        let placed = image::place_module(&loaded, module.len(), &layout).map_err(RunError::Load)?;
        let (old, _) = image::mapping(&loaded, &layout).map_err(RunError::Load)?;
        let (tables, pdes) = image::mapping_of(&placed.regions, &layout).map_err(RunError::Load)?;
        image::keeps_translations(&old, &tables).map_err(RunError::Load)?;
        let Some(shared) = self.local().map(Arc::clone) else {
            return Err(RunError::NotFreshlyLoaded);
        };
        // The guest is stopped between requests. The module's pages were
        // unmapped until now (so the guest holds no translation of them);
        // every entry it may have used is unchanged (checked above).
        let mem = shared.ram.mem();
        let write = |bytes: &[u8], addr: u64| {
            mem.write_slice(bytes, GuestAddress(addr))
                .map_err(RunError::GuestMemory)
        };
        write(module, placed.request.addr)?;
        write(&tables.to_bytes(), tables.base)?;
        for (at, entry) in pdes {
            write(&entry.to_le_bytes(), at)?;
        }
        let mut request = [0u8; size_of::<ModuleRequest>()];
        request[..8].copy_from_slice(&placed.request.addr.to_le_bytes());
        request[8..].copy_from_slice(&placed.request.len.to_le_bytes());
        match self.request(op::MODULE, &request, deadline, false)? {
            Progress::Replied(r) if r.status == Status::Ok => Ok(r),
            // A `load()` that failed may have stopped inside the SDK's
            // `fail` (it never returns): the instance is done either way.
            Progress::Replied(r) => {
                self.kill();
                Ok(r)
            }
            Progress::Checkpoint => {
                self.kill();
                Err(RunError::Dead)
            }
        }
    }

    /// Runs the loaded function's `handle()` on `input` (through any
    /// `checkpoint()` it calls).
    pub fn invoke(&mut self, input: &[u8], deadline: Instant) -> Result<Reply, RunError> {
        let mut progress = self.invoke_with(input, deadline, false)?;
        loop {
            match progress {
                Progress::Replied(r) => return Ok(r),
                Progress::Checkpoint => progress = self.resume(deadline)?,
            }
        }
    }

    /// Runs `handle()` on `input`; with `checkpoint`, the guest stops at the
    /// function's `checkpoint()` (if it calls it) and this returns
    /// [`Progress::Checkpoint`].
    pub fn invoke_with(&mut self, input: &[u8], deadline: Instant, checkpoint: bool) -> Result<Progress, RunError> {
        self.request(op::INVOKE, input, deadline, checkpoint)
    }

    /// Resumes a guest stopped at a checkpoint (after an
    /// [`Progress::Checkpoint`], or restored from an argument snapshot) and
    /// waits for its reply.
    pub fn resume(&mut self, deadline: Instant) -> Result<Progress, RunError> {
        if self.dead {
            return Err(RunError::Dead);
        }
        if !self.at_checkpoint {
            return Err(RunError::NotAtCheckpoint);
        }
        self.at_checkpoint = false;
        let result = if self.command(Cmd::Resume) {
            self.finish(deadline)
        } else {
            Err(RunError::Lost)
        };
        self.after(&result);
        result
    }

    fn after(&mut self, result: &Result<Progress, RunError>) {
        match result {
            Err(e) if e.kills_instance() => self.kill(),
            Ok(Progress::Replied(r)) if matches!(r.status, Status::Panicked | Status::OutOfMemory) => self.kill(),
            _ => {}
        }
    }

    /// Waits for the reply to `self.seq` (or a checkpoint) and reads it.
    fn finish(&mut self, deadline: Instant) -> Result<Progress, RunError> {
        if self.wait_reply(deadline)? {
            self.at_checkpoint = true;
            return Ok(Progress::Checkpoint);
        }
        let layout = self.layout;
        let mut bytes = [0u8; MAILBOX_BYTES];
        self.chan()
            .mem()
            .read_slice(&mut bytes, GuestAddress(MAILBOX_ADDR))
            .map_err(RunError::GuestMemory)?;
        let checked = channel::check_reply(&channel::parse(&bytes), self.seq, &layout, self.output_limit)
            .map_err(RunError::Malformed)?;
        self.read_reply(&checked).map(Progress::Replied)
    }

    fn request(&mut self, op: u32, payload: &[u8], deadline: Instant, checkpoint: bool) -> Result<Progress, RunError> {
        if self.dead {
            return Err(RunError::Dead);
        }
        // A queued reset rewrites the channel: it must be done first.
        self.finish_reset(deadline)?;
        if self.at_checkpoint {
            return Err(RunError::AtCheckpoint);
        }
        let layout = self.layout;
        let len = u64::try_from(payload.len()).unwrap_or(u64::MAX);
        if len > layout.io_bytes {
            return Err(RunError::PayloadTooLarge {
                len: payload.len(),
                limit: layout.io_bytes,
            });
        }
        let chan = Arc::clone(self.chan());
        let mem = chan.mem();
        let result = (|| {
            self.seq = self.seq.wrapping_add(1).max(1);
            // The host never accepts a reply to a request it has not sent:
            // if the mailbox already "answers" the request about to be
            // published, it is stale or forged, and nothing read after the
            // publish could be told apart from it.
            let early: u32 = mem
                .load(GuestAddress(RESP_SEQ_ADDR), Ordering::Acquire)
                .map_err(RunError::GuestMemory)?;
            channel::check_unsent(early, self.seq).map_err(RunError::Malformed)?;
            mem.write_slice(payload, GuestAddress(layout.io_addr))
                .map_err(RunError::GuestMemory)?;
            let (host_tsc, host_ns) = (host_rdtsc().wrapping_add(self.tsc_offset), monotonic_ns());
            // The request half first, with the old sequence number; then
            // publish the new one (a spinning guest acts on that store).
            let previous = self.seq.wrapping_sub(1);
            let mailbox = channel::encode_request(previous, op, len, host_ns, host_tsc);
            // Only the host's fields: the reply half and the spin flag are
            // the guest's.
            for (from, to) in channel::HOST_FIELDS {
                mem.write_slice(&mailbox[from..to], GuestAddress(MAILBOX_ADDR + from as u64))
                    .map_err(RunError::GuestMemory)?;
            }
            let checkpoint_seq = if checkpoint { self.seq } else { 0 };
            mem.store(checkpoint_seq, GuestAddress(CHECKPOINT_SEQ_ADDR), Ordering::SeqCst)
                .map_err(RunError::GuestMemory)?;
            mem.store(self.seq, GuestAddress(REQ_SEQ_ADDR), Ordering::SeqCst)
                .map_err(RunError::GuestMemory)?;
            fence(Ordering::SeqCst);
            let spinning: u32 = mem
                .load(GuestAddress(SPINNING_ADDR), Ordering::SeqCst)
                .map_err(RunError::GuestMemory)?;
            if spinning == 0 && !self.command(Cmd::Run) {
                return Err(RunError::Lost);
            }
            self.finish(deadline)
        })();
        self.after(&result);
        result
    }

    fn read_reply(&self, r: &CheckedReply) -> Result<Reply, RunError> {
        let len = usize::try_from(r.len).map_err(|_| {
            RunError::Malformed(channel::ReplyError::OutOfBounds {
                addr: r.addr,
                len: r.len,
            })
        })?;
        let mut data = vec![0u8; len];
        if len > 0 {
            self.chan()
                .mem()
                .read_slice(&mut data, GuestAddress(r.addr))
                .map_err(RunError::GuestMemory)?;
        }
        Ok(Reply {
            status: r.status,
            data,
            entered_ns: r.entered_ns,
            returned_ns: r.returned_ns,
            heap_used: r.heap_used,
        })
    }

    /// Polls for the reply of the next requests up to `spin` before
    /// sleeping, whether or not the guest spins (it saves the wake on the
    /// reply, tens of microseconds across cores on this host, at the price
    /// of the caller's CPU meanwhile); zero: only as the guest needs.
    pub fn set_reply_spin(&mut self, spin: Duration) {
        self.reply_spin = spin;
    }

    /// Waits until the guest's reply to `self.seq` is in the mailbox (or the
    /// vCPU reports a failure), kicking it at `deadline`. Polls the mailbox
    /// for `host_spin` (or `reply_spin`, if longer), then sleeps on the
    /// vCPU thread's reports (a guest that does not spin rings the doorbell
    /// after every reply; one that spins is polled every `SPIN_POLL`).
    /// Returns true when the guest stopped at a checkpoint instead (its
    /// request's `checkpoint_seq` is cleared then, before any snapshot).
    fn wait_reply(&mut self, deadline: Instant) -> Result<bool, RunError> {
        let chan = Arc::clone(self.chan());
        let mem = chan.mem();
        let spin_until = Instant::now() + self.host_spin.max(self.reply_spin);
        loop {
            let resp: u32 = mem
                .load(GuestAddress(RESP_SEQ_ADDR), Ordering::Acquire)
                .map_err(RunError::GuestMemory)?;
            if resp == self.seq {
                return Ok(false);
            }
            let now = Instant::now();
            if now >= deadline {
                self.kill();
                return Err(RunError::BudgetExceeded);
            }
            let event = if now < spin_until {
                let ev = self.try_report();
                if ev.is_none() {
                    // Yield between looks, not a pause: a runner that
                    // shares this core runs at once (a busy wait beside it
                    // tripled the hot path's median on this 2-core host).
                    std::thread::yield_now();
                }
                ev
            } else {
                let wait = deadline - now;
                let wait = if self.host_spin.is_zero() {
                    wait
                } else {
                    wait.min(SPIN_POLL)
                };
                self.next_report(wait)
            };
            match event {
                // A doorbell (this reply's, or a stale one): the mailbox says.
                None | Some(Event::Doorbell(_)) => {}
                Some(Event::Checkpoint(seq)) if seq == self.seq => {
                    mem.store(0u32, GuestAddress(CHECKPOINT_SEQ_ADDR), Ordering::SeqCst)
                        .map_err(RunError::GuestMemory)?;
                    return Ok(true);
                }
                Some(Event::Checkpoint(_)) => return Err(RunError::Crashed(crate::exit::Crash::BadRegisterWrite)),
                Some(Event::Fault(f)) => return Err(RunError::Fault(f)),
                Some(Event::Crash(c)) => return Err(RunError::Crashed(c)),
                Some(Event::RunFailed(e)) => return Err(RunError::Kvm(e)),
                Some(Event::Killed) => return Err(RunError::BudgetExceeded),
                Some(Event::Lost) => return Err(RunError::Lost),
            }
        }
    }

    /// Waits for the runner's next report, kicking the vCPU at `deadline`.
    fn wait(&mut self, deadline: Instant) -> Result<u32, RunError> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        let Some(event) = self.next_report(timeout) else {
            self.kill();
            return Err(RunError::BudgetExceeded);
        };
        match event {
            Event::Doorbell(seq) => Ok(seq),
            Event::Checkpoint(_) => Err(RunError::Crashed(crate::exit::Crash::BadRegisterWrite)),
            Event::Fault(f) => Err(RunError::Fault(f)),
            Event::Crash(c) => Err(RunError::Crashed(c)),
            Event::RunFailed(e) => Err(RunError::Kvm(e)),
            Event::Killed => Err(RunError::BudgetExceeded),
            Event::Lost => Err(RunError::Lost),
        }
    }

    /// The runner's next report if there is one.
    fn try_report(&mut self) -> Option<Event> {
        let chan = Arc::clone(self.chan());
        let control = chan.control();
        if control.report_seq.load(Ordering::Acquire) == self.reports_seen {
            return None;
        }
        // A report being written is read on the next try (the waits
        // below wake on its bump or time out).
        let (seq, event) = crate::report::read(control)?;
        self.reports_seen = seq;
        Some(event)
    }

    /// The runner's next report, waiting up to `timeout` (None: timed out).
    fn next_report(&mut self, timeout: Duration) -> Option<Event> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(ev) = self.try_report() {
                return Some(ev);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let control = self.chan().control();
            let word = &control.report_seq;
            if word.load(Ordering::Acquire) != self.reports_seen {
                // A report came meanwhile (take it), or one is being
                // written (or a process keeps a write open): look again
                // shortly rather than spin.
                if !control.writing.load(Ordering::Acquire).is_multiple_of(2) {
                    std::thread::sleep(left.min(SPIN_POLL));
                }
                continue;
            }
            ipc::futex::wait(word, self.reports_seen, Some(left));
        }
    }

    /// Stops the vCPU for good.
    fn kill(&mut self) {
        if !self.dead {
            self.dead = true;
            self.stop_vm();
        }
    }
}

/// Adds the memory slots: guest RAM around the MMIO pages, the mailbox
/// page and the I/O window (from the channel slab slot `chan`).
///
/// # Safety
/// `host_addr..host_addr + layout.mem_bytes` must be a mapping that stays
/// mapped (or is replaced, in place, by the guest memory) for as long as
/// the VM exists, and `chan` must outlive the VM.
unsafe fn add_memory_slots(
    vm: &VmFd,
    host_addr: u64,
    chan: &SlabSlot,
    layout: &Layout,
    dirty_log: bool,
) -> Result<(), VmmError> {
    // SAFETY: forwarded: the caller keeps the guest memory, and `chan`
    // (whose mailbox page and window these are), for the VM's life.
    unsafe {
        add_memory_slots_at(
            vm,
            host_addr,
            (chan.mailbox_host_addr(), chan.window_host_addr()),
            layout,
            dirty_log,
        )
    }
}

/// Adds the memory slots: guest RAM at `host_addr` around the MMIO pages,
/// and the mailbox page and the I/O window at the host addresses `channel`
/// gives (mailbox, window).
///
/// # Safety
/// `host_addr..host_addr + layout.mem_bytes`, the mailbox page and the
/// window (`layout.io_bytes`) at `channel`'s addresses must be mappings (or
/// reservations later replaced in place by them) that stay for as long as
/// the VM exists.
unsafe fn add_memory_slots_at(
    vm: &VmFd,
    host_addr: u64,
    (mailbox_addr, window_addr): (u64, u64),
    layout: &Layout,
    dirty_log: bool,
) -> Result<(), VmmError> {
    let ram = memory_slots(layout).map(|(slot, start, end)| (slot, start, end, host_addr + start));
    let [(mb_slot, mb_start, mb_end), (io_slot, io_start, io_end)] = channel_slots(layout);
    let channel = [
        (mb_slot, mb_start, mb_end, mailbox_addr),
        (io_slot, io_start, io_end, window_addr),
    ];
    for (slot, start, end, userspace_addr) in ram.into_iter().chain(channel) {
        let region = kvm_userspace_memory_region {
            slot,
            flags: if dirty_log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: start,
            memory_size: end - start,
            userspace_addr,
        };
        // SAFETY: the region lies inside the guest memory mapping or the
        // channel's, which the caller keeps for the VM's life (this
        // function's contract).
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

impl Shared {
    /// Marks the instance killed and kicks the runner running it, if any:
    /// the runner sees the flag before its next `KVM_RUN`, or the kick's
    /// `immediate_exit` stops the one it is in. A kick that reaches the
    /// runner after it moved on to another instance only makes that one's
    /// `KVM_RUN` return early once (it is not killed, so it runs on).
    fn stop(&self) {
        self.chan.control().kill.store(1, Ordering::SeqCst);
        let runner = self.running_on.load(Ordering::SeqCst);
        if runner != 0 {
            kick::kick(runner);
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // A running vCPU is kicked; the runner drops its reference when it
        // is done, and the last reference tears the VM down.
        self.dead = true;
        if let Some(shared) = self.local() {
            shared.record_working_set();
        }
        self.stop_vm();
    }
}

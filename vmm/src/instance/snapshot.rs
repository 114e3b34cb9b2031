//! Snapshots of an instance: pre-created VM shells, restoring an instance
//! from a saved state onto memory the caller mapped, and saving a stopped
//! instance's state.

use super::{Instance, InstanceConfig, RestoreTimings, add_memory_slots, add_memory_slots_at, kvm_err, ns_since};
use crate::Vmm;
use crate::channel;
use crate::error::VmmError;
use crate::layout::Layout;
use crate::memory::{ExternalMemory, GuestRam, Reserved};
use crate::setup::measure_tsc_offset;
use crate::slab::SlabSlot;
use crate::state::{SavedState, VcpuState};
use crate::stats::StatsFd;
use crate::vcpu::{Cmd, StartAt};

const ALIGN: usize = 2 << 20;
const PAGE: usize = 4096;
use guest_abi::MAILBOX_ADDR;
use kvm_ioctls::{VcpuFd, VmFd};
use std::ptr::NonNull;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// An empty VM with its vCPU (CPUID set), ready to be given memory and a
/// saved state: creating one is most of a restore's fixed cost on this
/// host (~0.3 ms, ~0.1 ms more for the memory slots, with a tail of many
/// ms under load), so callers keep a few made in advance.
///
/// [`Shell::with_memory`] and [`Shell::with_memory_for_slots`] also
/// register the memory slots, over reserved (inaccessible) address ranges
/// that a restore maps the guest memory (and, for the latter, the channel
/// slot it is given) over in place, so that no memory slot changes on the
/// restore path:
///
/// ```text
///  with_memory             RAM reservation  <- slots 0-3   channel slot of the VMM's slab <- slots 4, 5
///  with_memory_for_slots   RAM reservation  <- slots 0-3   view reservation               <- slots 4, 5
///  restore_into(_slot)     node image mapped MAP_FIXED over the RAM reservation;
///                          (_slot: the given slot's mailbox + window mapped MAP_FIXED over the view)
/// ```
#[derive(Debug)]
pub struct Shell {
    // Field order is drop order: the VM goes before the reservations its
    // memory slots point at.
    vm: VmFd,
    vcpu: VcpuFd,
    stats: Option<StatsFd>,
    reserved: Option<Reserved>,
    /// The channel slot the memory slots of a shell with memory point at.
    chan: Option<SlabSlot>,
    /// Or the reservation they point at, for any slot mapped there.
    chan_view: Option<Reserved>,
    /// Its memory slots are registered (over `reserved`, then over the
    /// guest memory mapped there).
    registered: bool,
    /// Guest TSC minus host TSC, measured when the vCPU was made (KVM sets
    /// it then; nothing a restore does changes it).
    tsc_offset: u64,
    /// The vCPU state it was given in advance ([`Shell::prime`]).
    primed: Option<VcpuState>,
}

impl Shell {
    /// Creates a VM and its vCPU (with its statistics fd if `vcpu_stats`).
    pub fn new(vmm: &Vmm, vcpu_stats: bool) -> Result<Self, VmmError> {
        let vm = vmm.kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&vmm.cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let stats = if vcpu_stats { StatsFd::open(&vcpu).ok() } else { None };
        let tsc_offset = measure_tsc_offset(&vcpu)?;
        Ok(Self {
            vm,
            vcpu,
            stats,
            reserved: None,
            chan: None,
            chan_view: None,
            registered: false,
            tsc_offset,
            primed: None,
        })
    }

    /// Gives the vCPU `state` now, off the restore path: a restore of a
    /// node with that very vCPU state (e.g. the function node the last
    /// restore was of) then sets no register; one of another state sets
    /// them all, as on a shell never primed.
    pub fn prime(&mut self, state: &VcpuState) -> Result<(), VmmError> {
        self.primed = None;
        apply_vcpu_state(&self.vcpu, state)?;
        self.primed = Some(state.clone());
        Ok(())
    }

    /// Creates a VM and its vCPU plus the memory slots of `config`'s layout
    /// over a reserved (inaccessible, 2 MiB aligned) address range and a
    /// channel slot of the VMM's own slab.
    pub fn with_memory(vmm: &Vmm, config: &InstanceConfig) -> Result<Self, VmmError> {
        let layout = Layout::new(config.layout)?;
        let mut shell = Self::new(vmm, config.vcpu_stats)?;
        let reservation = Reserved::new(ram_bytes(&layout)?, ALIGN)?;
        let chan = vmm.channel_slot(&layout)?;
        // SAFETY: the slots point into the reservation, which the shell
        // keeps until the VM is gone or hands over to the guest memory
        // mapped in its place (`Instance::restore_into`), and into `chan`,
        // which the shell (then the instance) keeps until the VM is gone.
        unsafe {
            add_memory_slots_at(
                &shell.vm,
                reservation.addr().as_ptr() as u64,
                (chan.mailbox_host_addr(), chan.window_host_addr()),
                &layout,
                config.dirty_log,
            )
        }?;
        shell.reserved = Some(reservation);
        shell.chan = Some(chan);
        shell.registered = true;
        Ok(shell)
    }

    /// Like [`Shell::with_memory`], but the channel's memory slots point at
    /// a second reservation, where [`Instance::restore_into_slot`] maps the
    /// channel slot it is given: for a process whose slots are chosen by
    /// someone else at restore time (a VMM host process: the backend's
    /// slab). The shell holds address space only (no memory): two
    /// reservations and the VM's and vCPU's fds.
    pub fn with_memory_for_slots(vmm: &Vmm, config: &InstanceConfig) -> Result<Self, VmmError> {
        let layout = Layout::new(config.layout)?;
        let view_bytes =
            SlabSlot::guest_view_bytes(layout.io_bytes).ok_or(crate::layout::LayoutError::DoesNotFit("I/O window"))?;
        let mut shell = Self::new(vmm, config.vcpu_stats)?;
        let reservation = Reserved::new(ram_bytes(&layout)?, ALIGN)?;
        let view = Reserved::new(view_bytes, PAGE)?;
        let mailbox = view.addr().as_ptr() as u64;
        // SAFETY: the slots point into the two reservations, which the
        // shell keeps until the VM is gone or hands over to what is mapped
        // in their place (`Instance::restore_into_slot`: the guest memory,
        // kept by the instance until its VM is gone; the channel slot's
        // view, kept by the slot, which the instance drops after the VM).
        unsafe {
            add_memory_slots_at(
                &shell.vm,
                reservation.addr().as_ptr() as u64,
                (mailbox, mailbox + guest_abi::PAGE_BYTES),
                &layout,
                config.dirty_log,
            )
        }?;
        shell.reserved = Some(reservation);
        shell.chan_view = Some(view);
        shell.registered = true;
        Ok(shell)
    }

    /// Whether its memory slots are registered (made by
    /// [`Shell::with_memory`] or [`Shell::with_memory_for_slots`]).
    pub fn has_memory(&self) -> bool {
        self.registered
    }
}

fn ram_bytes(layout: &Layout) -> Result<usize, VmmError> {
    Ok(usize::try_from(layout.mem_bytes).map_err(|_| crate::layout::LayoutError::DoesNotFit("memory size"))?)
}

/// A caller's failure to map guest memory over a shell's reservation.
pub type MapMemoryError = Box<dyn std::error::Error + Send + Sync>;

impl Instance {
    /// Starts an instance from a snapshot: `memory` (the snapshot's guest
    /// memory, mapped privately by the caller) and the saved state. The
    /// guest resumes where it was saved: idle (the next request is served
    /// at once) or at a checkpoint ([`Instance::resume`] it).
    ///
    /// `shell` is a pre-created VM + vCPU ([`Shell::new`], off the start
    /// path); `None` creates one now.
    pub fn restore(
        vmm: &Vmm,
        shell: Option<Shell>,
        config: &InstanceConfig,
        memory: Box<dyn ExternalMemory>,
        saved: &SavedState,
    ) -> Result<Self, VmmError> {
        // A shell with its own memory slots cannot take other memory.
        let shell = shell.filter(|s| s.reserved.is_none());
        Self::restore_on(vmm, shell, config, memory, saved, None)
    }

    /// Like [`Instance::restore`] with the channel slot given (a VMM host
    /// process restores into the slot the backend chose, in the slab the
    /// backend shares with it).
    pub fn restore_in_slot(
        vmm: &Vmm,
        shell: Option<Shell>,
        config: &InstanceConfig,
        memory: Box<dyn ExternalMemory>,
        saved: &SavedState,
        chan: SlabSlot,
    ) -> Result<Self, VmmError> {
        let shell = shell.filter(|s| s.reserved.is_none());
        Self::restore_on(vmm, shell, config, memory, saved, Some(chan))
    }

    /// Like [`Instance::restore`] on a shell made by [`Shell::with_memory`]:
    /// `map` maps the guest memory over the shell's reserved range (whose
    /// base and length it is given, and which it must fill exactly; it owns
    /// the range from then on) so that the
    /// shell's memory slots need no change. If `map` fails the range stays
    /// the shell's.
    pub fn restore_into(
        vmm: &Vmm,
        mut shell: Shell,
        config: &InstanceConfig,
        map: impl FnOnce(NonNull<u8>, usize) -> Result<Box<dyn ExternalMemory>, MapMemoryError>,
        saved: &SavedState,
    ) -> Result<Self, VmmError> {
        let t = Instant::now();
        let Some(chan) = shell.chan.take() else {
            return Err(VmmError::Shell("the shell has no channel slot of its own"));
        };
        let memory = map_over_reservation(&mut shell, config, map)?;
        let map_ns = ns_since(t);
        let mut instance = Self::restore_on(vmm, Some(shell), config, memory, saved, Some(chan))?;
        if let Some(timings) = instance.restore_timings.as_mut() {
            timings.map_ns = map_ns;
        }
        Ok(instance)
    }

    /// Like [`Instance::restore_into`] on a shell made by
    /// [`Shell::with_memory_for_slots`], into the channel slot `chan` (bound
    /// to the layout's I/O window address): the slot's mailbox page and
    /// window are mapped over the shell's channel reservation, where its
    /// memory slots point, so that (as with [`Instance::restore_into`]) no
    /// memory slot changes on the restore path. A VMM host process restores
    /// so into the slot the backend chose.
    pub fn restore_into_slot(
        vmm: &Vmm,
        mut shell: Shell,
        config: &InstanceConfig,
        map: impl FnOnce(NonNull<u8>, usize) -> Result<Box<dyn ExternalMemory>, MapMemoryError>,
        saved: &SavedState,
        mut chan: SlabSlot,
    ) -> Result<Self, VmmError> {
        let t = Instant::now();
        let Some(view) = shell.chan_view.take() else {
            return Err(VmmError::Shell("the shell has no channel reservation"));
        };
        // From here the slot's view is where the shell's channel memory
        // slots point; the slot (moved into the instance) keeps it until
        // after the VM is gone.
        chan.map_guest_view(view)?;
        let memory = map_over_reservation(&mut shell, config, map)?;
        let map_ns = ns_since(t);
        let mut instance = Self::restore_on(vmm, Some(shell), config, memory, saved, Some(chan))?;
        if let Some(timings) = instance.restore_timings.as_mut() {
            timings.map_ns = map_ns;
        }
        Ok(instance)
    }

    fn restore_on(
        vmm: &Vmm,
        shell: Option<Shell>,
        config: &InstanceConfig,
        memory: Box<dyn ExternalMemory>,
        saved: &SavedState,
        // With the memory slots already registered on it (a shell's), or
        // to register them with.
        chan: Option<SlabSlot>,
    ) -> Result<Self, VmmError> {
        let mut timings = RestoreTimings::default();
        let mut t = Instant::now();
        let mut step = |into: &mut u64| {
            *into = ns_since(t);
            t = Instant::now();
        };
        let slots_ready = chan.is_some() && shell.as_ref().is_some_and(|s| s.reserved.is_none() && s.registered);
        let layout = Layout::new(config.layout)?;
        let got = u64::try_from(memory.len()).unwrap_or(u64::MAX);
        if got != layout.mem_bytes {
            return Err(VmmError::SnapshotSize {
                expected: layout.mem_bytes,
                got,
            });
        }
        let Shell {
            vm,
            vcpu,
            stats,
            tsc_offset,
            primed,
            ..
        } = match shell {
            Some(shell) => shell,
            None => Shell::new(vmm, config.vcpu_stats)?,
        };
        step(&mut timings.shell_ns);
        let ram = GuestRam::from_external(memory)?;
        // The state must match its memory before the guest runs or the host
        // sends anything: otherwise a stale reply in the mailbox could be
        // taken for the answer to the next request.
        let mut mailbox = [0u8; channel::MAILBOX_BYTES];
        ram.mem()
            .read_slice(&mut mailbox, GuestAddress(MAILBOX_ADDR))
            .map_err(VmmError::GuestMemory)?;
        saved
            .check_mailbox(&channel::parse(&mailbox))
            .map_err(VmmError::StateMismatch)?;
        let chan = match chan {
            Some(chan) if slots_ready => chan,
            given => {
                let chan = match given {
                    Some(chan) => chan,
                    None => vmm.channel_slot(&layout)?,
                };
                // SAFETY: `ram` and `chan` are moved into the instance's
                // `Shared`, which drops them after the VM.
                unsafe { add_memory_slots(&vm, ram.host_addr(), &chan, &layout, config.dirty_log) }?;
                chan
            }
        };
        step(&mut timings.slots_ns);
        // The snapshot's channel into the slot: its mailbox page, and at a
        // checkpoint the input the stopped `handle()` still points at.
        copy_channel(ram.mem(), chan.mem(), &layout, saved.at_checkpoint).map_err(VmmError::GuestMemory)?;
        step(&mut timings.channel_ns);
        // A vCPU primed with this very state (and never run since) holds it.
        if !primed.is_some_and(|p| p.same_as(&saved.vcpu)) {
            apply_vcpu_state(&vcpu, &saved.vcpu)?;
            timings.vcpu_set = true;
        }
        step(&mut timings.vcpu_ns);
        timings.state_ns = timings.channel_ns + timings.vcpu_ns;
        let start = if saved.at_checkpoint {
            StartAt::Checkpoint
        } else {
            StartAt::Idle(saved.seq)
        };
        let mut instance = Self::spawn(
            vmm,
            vm,
            (ram, chan),
            layout,
            vcpu,
            config,
            stats,
            tsc_offset,
            start,
            saved.seq,
        )?;
        step(&mut timings.spawn_ns);
        instance.restore_timings = Some(timings);
        instance.at_checkpoint = saved.at_checkpoint;
        instance.origin_seq = (!saved.at_checkpoint).then_some(saved.seq);
        Ok(instance)
    }

    /// Saves the stopped guest's state (idle, or at a checkpoint). Its
    /// memory is read separately ([`Instance::guest_memory`],
    /// [`Instance::external_memory`]) while it stays stopped.
    pub fn save(&mut self) -> Result<SavedState, VmmError> {
        if self.dead {
            return Err(VmmError::Save("the instance is dead"));
        }
        let (tx, rx) = mpsc::channel();
        self.command(Cmd::Save(tx));
        let vcpu = rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| VmmError::Save("no runner answered"))?
            .map_err(kvm_err("saving the vCPU state"))?;
        // A snapshot is the guest's RAM: put the channel back into it (the
        // mailbox page; at a checkpoint the input too), so that a node
        // written from RAM has them and a restore copies them out again.
        let shared = self
            .local()
            .ok_or(VmmError::Save("a remote instance is saved by its host process"))?;
        copy_channel(shared.chan.mem(), shared.ram.mem(), &shared.layout, self.at_checkpoint)
            .map_err(|_| VmmError::Save("copying the channel into guest memory"))?;
        Ok(SavedState {
            seq: self.seq,
            at_checkpoint: self.at_checkpoint,
            vcpu,
        })
    }

    /// The whole guest memory.
    ///
    /// # Safety
    /// The guest must be stopped (idle without a request in flight, or at a
    /// checkpoint) while the slice lives.
    pub unsafe fn guest_memory(&self) -> &[u8] {
        match self.local() {
            // SAFETY: forwarded: the caller keeps the guest stopped.
            Some(s) => unsafe { s.ram.as_bytes() },
            None => &[],
        }
    }

    /// The memory this instance was restored onto, if any.
    pub fn external_memory(&self) -> Option<&dyn ExternalMemory> {
        self.local()?.ram.external()
    }

    /// Whether the guest is stopped at a checkpoint (resume it first).
    pub fn at_checkpoint(&self) -> bool {
        self.at_checkpoint
    }
}

/// Has `map` map the guest memory over `shell`'s RAM reservation (see
/// [`Instance::restore_into`]) and checks that it did: the memory owns the
/// range from then on. On failure the reservation is unmapped.
fn map_over_reservation(
    shell: &mut Shell,
    config: &InstanceConfig,
    map: impl FnOnce(NonNull<u8>, usize) -> Result<Box<dyn ExternalMemory>, MapMemoryError>,
) -> Result<Box<dyn ExternalMemory>, VmmError> {
    let Some(reservation) = shell.reserved.take() else {
        return Err(VmmError::Shell("the shell has no memory reservation"));
    };
    let layout = Layout::new(config.layout)?;
    if u64::try_from(reservation.len()).ok() != Some(layout.mem_bytes) {
        return Err(VmmError::SnapshotSize {
            expected: layout.mem_bytes,
            got: u64::try_from(reservation.len()).unwrap_or(u64::MAX),
        });
    }
    let memory = match map(reservation.addr(), reservation.len()) {
        Ok(m) => m,
        // The reservation is still intact: it drops (unmaps) here.
        Err(source) => return Err(VmmError::MapMemory(source)),
    };
    if memory.host_addr() != reservation.addr().as_ptr() || memory.len() != reservation.len() {
        return Err(VmmError::Shell(
            "the memory was not mapped over the shell's reservation",
        ));
    }
    // Handed over: the memory now owns the range.
    std::mem::forget(reservation);
    Ok(memory)
}

/// Copies the mailbox page from `from` to `to` and, with `input`, the
/// request's input (`arg_len` bytes, capped at the window) of the I/O
/// window.
pub(super) fn copy_channel(
    from: &vm_memory::GuestMemoryMmap,
    to: &vm_memory::GuestMemoryMmap,
    layout: &Layout,
    input: bool,
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut page = vec![0u8; usize::try_from(guest_abi::PAGE_BYTES).unwrap_or(4096)];
    from.read_slice(&mut page, GuestAddress(MAILBOX_ADDR))?;
    to.write_slice(&page, GuestAddress(MAILBOX_ADDR))?;
    if input {
        let mut mailbox = [0u8; channel::MAILBOX_BYTES];
        mailbox.copy_from_slice(&page[..channel::MAILBOX_BYTES]);
        let len = channel::parse(&mailbox).arg_len.min(layout.io_bytes);
        let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(0)];
        from.read_slice(&mut bytes, GuestAddress(layout.io_addr))?;
        to.write_slice(&bytes, GuestAddress(layout.io_addr))?;
    }
    Ok(())
}

/// Loads a saved vCPU state into a fresh vCPU.
pub(super) fn apply_vcpu_state(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), VmmError> {
    vcpu.set_sregs(&state.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&state.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    if let Some(xcrs) = &state.xcrs {
        vcpu.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    }
    vcpu.set_fpu(&state.fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    if let Some(words) = &state.xsave {
        let mut xsave = kvm_bindings::kvm_xsave::default();
        if words.len() != xsave.region.len() {
            return Err(VmmError::Save("XSAVE area of the wrong size"));
        }
        xsave.region.copy_from_slice(words);
        // SAFETY: a 4 KiB legacy `kvm_xsave` read by KVM_GET_XSAVE on this
        // host (its size is what that ioctl uses; no XSAVE2 extension area).
        unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
    }
    Ok(())
}

//! The vCPU thread of an instance: runs the guest until a stopping exit
//! (decided by the pure [`crate::exit::handle`]), reports it, and parks
//! until the next request is published.

use crate::exit::{self, Action, Crash, Exit};
use crate::fault::{self, GuestFault};
use crate::instance::{REQ_SEQ_ADDR, Shared};
use crate::kick;
use crate::layout::FAULT_STACK_TOP;
use crate::state::VcpuState;
use guest_abi::{FaultFrame, LOG_OFFSET, MAILBOX_ADDR};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;
use vm_memory::{Bytes, GuestAddress};

/// What the vCPU thread reports after running.
#[derive(Debug)]
pub(crate) enum Event {
    Doorbell(u32),
    /// Stopped in `checkpoint()` of request `seq`; parked until resumed.
    Checkpoint(u32),
    Fault(GuestFault),
    Crash(Crash),
    Killed,
    RunFailed(kvm_ioctls::Error),
}

/// What the parked vCPU thread is asked to do.
#[derive(Debug)]
pub(crate) enum Wake {
    /// A request may have been published: run if it is newer.
    Run,
    /// Resume a guest stopped at a checkpoint.
    Resume,
    /// Save the (stopped) vCPU's registers and send them back.
    Save(Sender<Result<VcpuState, kvm_ioctls::Error>>),
}

/// Where a new vCPU thread starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartAt {
    /// Run at once (a boot).
    Run,
    /// Parked idle after answering request `seq` (a restored idle guest).
    Idle(u32),
    /// Parked at a checkpoint (a restored argument snapshot).
    Checkpoint,
}

/// What a vCPU thread needs to run an instance.
pub(crate) struct ThreadStart {
    pub(crate) vcpu: VcpuFd,
    pub(crate) shared: Arc<Shared>,
    pub(crate) wake: Receiver<Wake>,
    pub(crate) events: Sender<Event>,
    pub(crate) start: StartAt,
}

/// Spawns the vCPU thread of an instance.
pub(crate) fn spawn_thread(s: ThreadStart) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("vcpu".into())
        .stack_size(VCPU_STACK_BYTES)
        .spawn(move || vcpu_thread(s.vcpu, s.shared, s.wake, s.events, s.start))
}

/// Stack of a vCPU thread (it only runs the exit loop).
const VCPU_STACK_BYTES: usize = 256 << 10;

/// A vCPU thread spawned in advance (with a VM shell), parked until it is
/// given its instance: spawning costs ~50 us on this host.
#[derive(Debug)]
pub(crate) struct IdleThread {
    handle: JoinHandle<()>,
    tx: Sender<ThreadStart>,
}

impl IdleThread {
    /// Spawns a thread that waits for its instance (and ends if dropped).
    pub(crate) fn spawn() -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<ThreadStart>();
        let handle = std::thread::Builder::new()
            .name("vcpu".into())
            .stack_size(VCPU_STACK_BYTES)
            .spawn(move || {
                if let Ok(s) = rx.recv() {
                    vcpu_thread(s.vcpu, s.shared, s.wake, s.events, s.start);
                }
            })?;
        Ok(Self { handle, tx })
    }

    /// Hands the thread its instance; gives the start back if the thread
    /// is gone.
    pub(crate) fn start(self, s: ThreadStart) -> Result<JoinHandle<()>, ThreadStart> {
        match self.tx.send(s) {
            Ok(()) => Ok(self.handle),
            Err(e) => Err(e.0),
        }
    }
}

/// Completes any exit the vCPU is in the middle of (an MMIO write) without
/// running the guest, so that its registers are consistent, then reads them.
fn save_vcpu(vcpu: &mut VcpuFd) -> Result<VcpuState, kvm_ioctls::Error> {
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() != libc::EINTR && e.errno() != libc::EAGAIN => return Err(e),
        _ => {}
    }
    let xsave = if vcpu.get_xcrs().is_ok() {
        Some(vcpu.get_xsave()?.region.to_vec())
    } else {
        None
    };
    Ok(VcpuState {
        regs: vcpu.get_regs()?,
        sregs: vcpu.get_sregs()?,
        fpu: vcpu.get_fpu()?,
        xcrs: vcpu.get_xcrs().ok(),
        xsave,
    })
}

/// Parks until woken with `Run` (true: go on) or `Resume` as `want`,
/// answering `Save` requests meanwhile; false when the instance is going
/// away.
fn park(vcpu: &mut VcpuFd, shared: &Shared, wake: &Receiver<Wake>, mut done: impl FnMut(&Wake) -> bool) -> bool {
    loop {
        let Ok(w) = wake.recv() else { return false };
        if shared.killed.load(Ordering::SeqCst) {
            return false;
        }
        match w {
            Wake::Save(reply) => {
                let _ = reply.send(save_vcpu(vcpu));
            }
            other => {
                if done(&other) {
                    return true;
                }
            }
        }
    }
}

/// The vCPU thread: runs the guest until a stopping exit, reports it, and
/// waits to be woken for the next request. Ends (tearing the VM down with
/// the last reference) when killed, when the guest dies, or when the
/// instance handle is dropped.
pub(crate) fn vcpu_thread(
    mut vcpu: VcpuFd,
    shared: Arc<Shared>,
    wake: Receiver<Wake>,
    events: Sender<Event>,
    start: StartAt,
) {
    // SAFETY: the kvm_run mapping lives as long as `vcpu`, which outlives
    // the registration (cleared below before `vcpu` drops).
    unsafe { kick::register_vcpu_thread(vcpu.get_kvm_run()) };
    // The thread inherits its spawner's signal mask: make sure kicks arrive.
    let _ = vmm_sys_util::signal::unblock_signal(kick::kick_signal());
    let published = |shared: &Shared| {
        shared
            .ram
            .mem()
            .load::<u32>(GuestAddress(REQ_SEQ_ADDR), Ordering::SeqCst)
            .unwrap_or(0)
    };
    let parked = match start {
        StartAt::Run => true,
        StartAt::Idle(seq) => park(&mut vcpu, &shared, &wake, |w| {
            matches!(w, Wake::Run) && published(&shared) != seq
        }),
        StartAt::Checkpoint => park(&mut vcpu, &shared, &wake, |w| matches!(w, Wake::Resume)),
    };
    if parked {
        loop {
            let event = run_until_stop(&mut vcpu, &shared);
            if let Event::Doorbell(seq) = event
                && published(&shared) != seq
            {
                continue; // a request was published meanwhile: let the guest see it
            }
            let next = match event {
                Event::Doorbell(seq) => Some(StartAt::Idle(seq)),
                Event::Checkpoint(_) => Some(StartAt::Checkpoint),
                _ => None,
            };
            if events.send(event).is_err() {
                break;
            }
            // Park until a request newer than `seq` is published (wake-ups
            // for requests the spinning guest already took are stale), or
            // until told to resume from the checkpoint.
            let go_on = match next {
                Some(StartAt::Idle(seq)) => park(&mut vcpu, &shared, &wake, |w| {
                    matches!(w, Wake::Run) && published(&shared) != seq
                }),
                Some(StartAt::Checkpoint) => park(&mut vcpu, &shared, &wake, |w| matches!(w, Wake::Resume)),
                _ => false,
            };
            if !go_on {
                break;
            }
        }
    }
    kick::unregister_vcpu_thread();
}

fn run_until_stop(vcpu: &mut VcpuFd, shared: &Shared) -> Event {
    loop {
        if shared.killed.load(Ordering::SeqCst) {
            return Event::Killed;
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                continue;
            }
            Err(e) => return Event::RunFailed(e),
        };
        let exit = match exit {
            VcpuExit::IoOut(port, _) | VcpuExit::IoIn(port, _) => Exit::Io { port },
            VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite { addr, data },
            VcpuExit::MmioRead(addr, data) => {
                data.fill(0xff);
                Exit::MmioRead { addr }
            }
            VcpuExit::Hlt => Exit::Hlt,
            VcpuExit::Shutdown => Exit::Shutdown,
            VcpuExit::FailEntry(reason, _) => Exit::FailEntry(reason),
            VcpuExit::InternalError => Exit::InternalError,
            VcpuExit::Intr => continue,
            _ => Exit::Other("unexpected exit"),
        };
        match exit::handle(exit) {
            Action::Log(len) => append_log(shared, len),
            Action::Doorbell(seq) => return Event::Doorbell(seq),
            Action::Checkpoint(seq) => return Event::Checkpoint(seq),
            Action::Fault(vector) => return Event::Fault(read_fault(vcpu, shared, vector)),
            Action::Crash(c) => return Event::Crash(c),
        }
    }
}

fn append_log(shared: &Shared, len: u32) {
    // `len` was checked against LOG_BYTES by `exit::handle`.
    let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(0)];
    if shared
        .ram
        .mem()
        .read_slice(&mut bytes, GuestAddress(MAILBOX_ADDR + LOG_OFFSET))
        .is_err()
    {
        return;
    }
    if let Ok(mut log) = shared.serial.lock() {
        log.extend_from_slice(&bytes);
        let len = log.len();
        if len > shared.serial_cap {
            log.drain(..len - shared.serial_cap);
        }
    }
}

fn read_fault(vcpu: &VcpuFd, shared: &Shared, vector: u32) -> GuestFault {
    let cr2 = vcpu.get_sregs().map(|s| s.cr2).unwrap_or(0);
    // The stub's frame is at the top of the fault stack (IST1).
    let frame_addr = FAULT_STACK_TOP - std::mem::size_of::<FaultFrame>() as u64;
    let mut b = [0u8; 56];
    let frame = match shared.ram.mem().read_slice(&mut b, GuestAddress(frame_addr)) {
        Ok(()) => {
            let q = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
            FaultFrame {
                vector: q(0),
                error_code: q(1),
                rip: q(2),
                cs: q(3),
                rflags: q(4),
                rsp: q(5),
                ss: q(6),
            }
        }
        Err(_) => FaultFrame::default(),
    };
    fault::decode(vector, &frame, cr2, &shared.layout)
}

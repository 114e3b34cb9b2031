//! Running an instance's vCPU on a runner thread ([`crate::runner`]): runs
//! the guest until a stopping exit (decided by the pure
//! [`crate::exit::handle`]) and reports it; the vCPU then stays where it
//! stopped, with no thread, until the next command.

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
use std::sync::mpsc::Sender;
use vm_memory::{Bytes, GuestAddress};

/// What a runner reports after running an instance.
#[derive(Debug)]
pub(crate) enum Event {
    Doorbell(u32),
    /// Stopped in `checkpoint()` of request `seq`; parked until resumed.
    Checkpoint(u32),
    Fault(GuestFault),
    Crash(Crash),
    Killed,
    RunFailed(kvm_ioctls::Error),
    /// The process running the VM is gone (or its report was garbage).
    Lost,
}

/// What a runner is asked to do with an instance.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// A request may have been published: run if it is newer.
    Run,
    /// Resume a guest stopped at a checkpoint.
    Resume,
    /// Save the (stopped) vCPU's registers and send them back.
    Save(Sender<Result<VcpuState, kvm_ioctls::Error>>),
    /// Reset the (idle) instance to its node (`instance::reset`) and
    /// report the node's sequence number.
    Reset,
}

/// Where an instance's vCPU is between runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartAt {
    /// Never run (a boot): the first `Run` starts it.
    Run,
    /// Stopped after answering request `seq` (idle).
    Idle(u32),
    /// Stopped at a checkpoint.
    Checkpoint,
    /// Crashed, faulted or killed: never runs again.
    Dead,
}

/// An instance's vCPU and where it stopped (locked by the runner running it).
#[derive(Debug)]
pub(crate) struct Vcpu {
    pub(crate) fd: VcpuFd,
    pub(crate) at: StartAt,
}

/// Completes any exit the vCPU is in the middle of (an MMIO write) without
/// running the guest, so that its registers are consistent, then reads them.
fn save_vcpu(vcpu: &mut VcpuFd) -> Result<VcpuState, kvm_ioctls::Error> {
    complete_exit(vcpu)?;
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

/// Completes any exit the vCPU is in the middle of, without running the
/// guest (`immediate_exit`).
pub(crate) fn complete_exit(vcpu: &mut VcpuFd) -> Result<(), kvm_ioctls::Error> {
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() != libc::EINTR && e.errno() != libc::EAGAIN => Err(e),
        _ => Ok(()),
    }
}

fn published(shared: &Shared) -> u32 {
    shared
        .chan
        .mem()
        .load::<u32>(GuestAddress(REQ_SEQ_ADDR), Ordering::SeqCst)
        .unwrap_or(0)
}

/// CPU time of the calling thread, in ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Runs `shared`'s pending commands on the calling runner thread (`thread`)
/// until none is left, then marks the instance not queued.
pub(crate) fn run_commands(shared: &Arc<Shared>, thread: libc::pthread_t) {
    let mut vcpu = shared.vcpu.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY: the kvm_run mapping lives as long as the vCPU fd, which this
    // thread holds (locked) until the registration is cleared below.
    unsafe { kick::register_vcpu_thread(vcpu.fd.get_kvm_run()) };
    // Recorded after the registration, before the guest runs: a kick sent
    // from now on reaches this thread and stops this vCPU.
    shared.running_on.store(thread, Ordering::SeqCst);
    let t0 = thread_cpu_ns();
    loop {
        let cmd = shared.cmds.lock().ok().and_then(|mut q| q.pop_front());
        let Some(cmd) = cmd else {
            shared.queued.clear();
            // A command pushed after the pop but before the clear saw the
            // instance queued and did not submit it: take it here.
            let more = shared.cmds.lock().map(|q| !q.is_empty()).unwrap_or(false);
            if more && shared.queued.set() {
                continue;
            }
            break;
        };
        match cmd {
            Cmd::Save(reply) => {
                let _ = reply.send(save_vcpu(&mut vcpu.fd));
            }
            Cmd::Reset => match shared.reset_to(&mut vcpu) {
                Ok((seq, stats)) => {
                    if let Ok(mut s) = shared.reset_stats.lock() {
                        *s = stats;
                    }
                    shared.report(Event::Doorbell(seq));
                }
                Err(e) => {
                    vcpu.at = StartAt::Dead;
                    shared.report(Event::RunFailed(kvm_ioctls::Error::new(e.errno())));
                }
            },
            Cmd::Run => match vcpu.at {
                StartAt::Run => run(&mut vcpu, shared),
                StartAt::Idle(seq) if published(shared) != seq => run(&mut vcpu, shared),
                // Stale: a spinning guest already took the request.
                StartAt::Idle(_) | StartAt::Checkpoint => {}
                StartAt::Dead => shared.report(Event::Killed),
            },
            Cmd::Resume => match vcpu.at {
                StartAt::Checkpoint => run(&mut vcpu, shared),
                StartAt::Dead => shared.report(Event::Killed),
                _ => {}
            },
        }
    }
    shared.running_on.store(0, Ordering::SeqCst);
    kick::unregister_vcpu_thread();
    let used = thread_cpu_ns().saturating_sub(t0);
    shared.cpu_ns.fetch_add(used, Ordering::Relaxed);
}

/// Runs the guest until a stopping exit and reports it.
fn run(vcpu: &mut Vcpu, shared: &Shared) {
    loop {
        let event = run_until_stop(&mut vcpu.fd, shared);
        if let Event::Doorbell(seq) = event
            && published(shared) != seq
        {
            continue; // a request was published meanwhile: let the guest see it
        }
        vcpu.at = match event {
            Event::Doorbell(seq) => StartAt::Idle(seq),
            Event::Checkpoint(_) => StartAt::Checkpoint,
            _ => StartAt::Dead,
        };
        shared.report(event);
        return;
    }
}

fn run_until_stop(vcpu: &mut VcpuFd, shared: &Shared) -> Event {
    loop {
        if shared.is_killed() {
            return Event::Killed;
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            // A kick for another instance (it landed late, or this runner
            // moved on): this one is not killed, so it runs on.
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
        .chan
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

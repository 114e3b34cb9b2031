//! The vCPU thread of an instance: runs the guest until a stopping exit
//! (decided by the pure [`crate::exit::handle`]), reports it, and parks
//! until the next request is published.

use crate::exit::{self, Action, Crash, Exit};
use crate::fault::{self, GuestFault};
use crate::instance::{REQ_SEQ_ADDR, Shared};
use crate::kick;
use crate::layout::FAULT_STACK_TOP;
use guest_abi::{FaultFrame, LOG_OFFSET, MAILBOX_ADDR};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use vm_memory::{Bytes, GuestAddress};

/// What the vCPU thread reports after running.
#[derive(Debug)]
pub(crate) enum Event {
    Doorbell(u32),
    Fault(GuestFault),
    Crash(Crash),
    Killed,
    RunFailed(kvm_ioctls::Error),
}

/// The vCPU thread: runs the guest until a stopping exit, reports it, and
/// waits to be woken for the next request. Ends (tearing the VM down with
/// the last reference) when killed, when the guest dies, or when the
/// instance handle is dropped.
pub(crate) fn vcpu_thread(mut vcpu: VcpuFd, shared: Arc<Shared>, wake: Receiver<()>, events: Sender<Event>) {
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
    'run: loop {
        let event = run_until_stop(&mut vcpu, &shared);
        if let Event::Doorbell(seq) = event
            && published(&shared) != seq
        {
            continue; // a request was published meanwhile: let the guest see it
        }
        let idle_after = match event {
            Event::Doorbell(seq) => Some(seq),
            _ => None,
        };
        if events.send(event).is_err() {
            break;
        }
        let Some(seq) = idle_after else { break };
        // Park until a request newer than `seq` is published (wake-ups for
        // requests the spinning guest already took are stale).
        loop {
            if wake.recv().is_err() || shared.killed.load(Ordering::SeqCst) {
                break 'run;
            }
            if published(&shared) != seq {
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

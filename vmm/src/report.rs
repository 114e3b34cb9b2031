//! A runner's report in the slot's control block, as words: the runner
//! (`write`) stores the event, then bumps `report_seq` (the caller's
//! futex word) and wakes it; the caller (`read`) decodes whatever is
//! there. The control block is written by the side that runs the VM (a
//! VMM host process, which a VM escape may control), so `decode` is
//! pure and total: any words give some event, never a panic; what an event
//! carries (a sequence number, a fault's fields) is only compared or shown.

use crate::exit::Crash;
use crate::fault::GuestFault;
use crate::slab::Control;
use crate::vcpu::Event;
use std::sync::atomic::Ordering;

const DOORBELL: u32 = 1;
const CHECKPOINT: u32 = 2;
const FAULT: u32 = 3;
const CRASH: u32 = 4;
const KILLED: u32 = 5;
const RUN_FAILED: u32 = 6;
/// Written by the caller's side when the process running the VM died.
const LOST: u32 = 7;

const CRASH_TRIPLE: u64 = 1;
const CRASH_PORT: u64 = 2;
const CRASH_MMIO: u64 = 3;
const CRASH_REGISTER: u64 = 4;
const CRASH_HALT: u64 = 5;
const CRASH_KVM: u64 = 6;

/// The KVM failures a crash can name (by index across processes).
const KVM_WHATS: [&str; 4] = ["entry failed", "internal error", "unexpected exit", "unknown"];

/// An event as (kind, arg, words).
pub(crate) fn encode(event: &Event) -> (u32, u64, [u64; 7]) {
    let mut w = [0u64; 7];
    let (kind, arg) = match event {
        Event::Doorbell(seq) => (DOORBELL, u64::from(*seq)),
        Event::Checkpoint(seq) => (CHECKPOINT, u64::from(*seq)),
        Event::Fault(f) => {
            w = [
                f.vector,
                f.error_code,
                f.rip,
                f.cr2,
                f.rsp,
                f.cpl,
                u64::from(f.stack_overflow),
            ];
            (FAULT, 0)
        }
        Event::Crash(c) => {
            let (code, value) = match c {
                Crash::TripleFault => (CRASH_TRIPLE, 0),
                Crash::PortIo(p) => (CRASH_PORT, u64::from(*p)),
                Crash::Mmio(a) => (CRASH_MMIO, *a),
                Crash::BadRegisterWrite => (CRASH_REGISTER, 0),
                Crash::Halt => (CRASH_HALT, 0),
                Crash::Kvm(what) => (
                    CRASH_KVM,
                    KVM_WHATS.iter().position(|k| k == what).unwrap_or(KVM_WHATS.len() - 1) as u64,
                ),
            };
            w[0] = value;
            (CRASH, code)
        }
        Event::Killed => (KILLED, 0),
        Event::RunFailed(e) => (RUN_FAILED, u64::try_from(e.errno()).unwrap_or(0)),
        Event::Lost => (LOST, 0),
    };
    (kind, arg, w)
}

/// The event words say (any words decode to some event).
pub(crate) fn decode(kind: u32, arg: u64, w: [u64; 7]) -> Event {
    let seq = u32::try_from(arg).unwrap_or(u32::MAX);
    match kind {
        DOORBELL => Event::Doorbell(seq),
        CHECKPOINT => Event::Checkpoint(seq),
        FAULT => Event::Fault(GuestFault {
            vector: w[0],
            error_code: w[1],
            rip: w[2],
            cr2: w[3],
            rsp: w[4],
            cpl: w[5],
            stack_overflow: w[6] != 0,
        }),
        CRASH => Event::Crash(match arg {
            CRASH_TRIPLE => Crash::TripleFault,
            CRASH_PORT => Crash::PortIo(u16::try_from(w[0]).unwrap_or(u16::MAX)),
            CRASH_MMIO => Crash::Mmio(w[0]),
            CRASH_REGISTER => Crash::BadRegisterWrite,
            CRASH_HALT => Crash::Halt,
            CRASH_KVM => Crash::Kvm(
                KVM_WHATS
                    .get(usize::try_from(w[0]).unwrap_or(usize::MAX))
                    .copied()
                    .unwrap_or("unknown"),
            ),
            _ => Crash::Kvm("unknown"),
        }),
        KILLED => Event::Killed,
        RUN_FAILED => Event::RunFailed(kvm_ioctls::Error::new(
            i32::try_from(arg).ok().filter(|e| *e > 0).unwrap_or(libc::EIO),
        )),
        LOST => Event::Lost,
        // Garbage: the VM side is broken or hostile; the instance is lost.
        _ => Event::Lost,
    }
}

/// Runner: stores `event` and wakes the caller. The fields and the
/// `report_seq` bump lie inside an odd `writing` generation (a seqlock's
/// write side; one writer per slot: its runner, or the caller's side once
/// the process running it is dead).
pub(crate) fn write(control: &Control, event: &Event) {
    let (kind, arg, w) = encode(event);
    control.writing.fetch_add(1, Ordering::Relaxed);
    std::sync::atomic::fence(Ordering::Release);
    control.kind.store(kind, Ordering::Relaxed);
    control.arg.store(arg, Ordering::Relaxed);
    for (slot, v) in control.words.iter().zip(w) {
        slot.store(v, Ordering::Relaxed);
    }
    control.report_seq.fetch_add(1, Ordering::Relaxed);
    control.writing.fetch_add(1, Ordering::Release);
    ipc::futex::wake(&control.report_seq, u32::MAX);
}

/// The caller's side, when the process running the VM died: reports the
/// instance lost, waking a caller waiting on it (which fails its request
/// once with [`crate::RunError::Lost`]).
pub fn report_lost(control: &Control) {
    write(control, &Event::Lost);
}

/// How often a caller re-reads a report being written before it gives up
/// for now (a runner's write is a few stores, unless it is preempted in
/// the middle; a process that keeps a write open reports nothing).
const READ_TRIES: usize = 256;

/// Caller: one report as (report_seq, kind, arg, words), read as a
/// seqlock on `writing` (even before, the same after), again while a
/// write was under way, so a report being written as it is read (a reply
/// the caller polled from the mailbox is taken before the runner writes
/// its doorbell) is never taken half old, half new. `None`: a write
/// stayed open while it tried (read again later).
fn snapshot(control: &Control) -> Option<(u32, u32, u64, [u64; 7])> {
    let mut tries = 0;
    loop {
        let before = control.writing.load(Ordering::Acquire);
        let seq = control.report_seq.load(Ordering::Relaxed);
        let kind = control.kind.load(Ordering::Relaxed);
        let arg = control.arg.load(Ordering::Relaxed);
        let w = std::array::from_fn(|i| control.words[i].load(Ordering::Relaxed));
        std::sync::atomic::fence(Ordering::Acquire);
        if before.is_multiple_of(2) && control.writing.load(Ordering::Relaxed) == before {
            return Some((seq, kind, arg, w));
        }
        tries += 1;
        if tries >= READ_TRIES {
            return None;
        }
        std::hint::spin_loop();
    }
}

/// Caller: whether the control block holds a report no runner writes (a
/// kind or crash code outside the encoding): the process running the VM
/// forged it (a guest cannot reach the control page). A report still
/// being written is not judged.
pub fn forged(control: &Control) -> bool {
    let Some((seq, kind, arg, _)) = snapshot(control) else {
        return false;
    };
    match kind {
        // Never reported: a fresh slot.
        0 if seq == 0 => false,
        DOORBELL | CHECKPOINT => u32::try_from(arg).is_err(),
        FAULT | KILLED | LOST | RUN_FAILED => false,
        CRASH => !(CRASH_TRIPLE..=CRASH_KVM).contains(&arg),
        _ => true,
    }
}

/// The control block's report words, for a message (`kind 4, arg 17,
/// report 3`).
pub fn describe(control: &Control) -> String {
    format!(
        "kind {}, arg {}, report {}",
        control.kind.load(Ordering::Relaxed),
        control.arg.load(Ordering::Relaxed),
        control.report_seq.load(Ordering::Relaxed)
    )
}

/// Caller: the report in the control block now and its `report_seq`
/// (read whole: see `snapshot`); `None` while one is being written.
pub(crate) fn read(control: &Control) -> Option<(u32, Event)> {
    let (seq, kind, arg, w) = snapshot(control)?;
    Some((seq, decode(kind, arg, w)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(a: &Event, b: &Event) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    #[test]
    fn events_round_trip() {
        let fault = GuestFault {
            vector: 14,
            error_code: 6,
            rip: 0x1234,
            cr2: 0xdead,
            rsp: 0x8000,
            cpl: 3,
            stack_overflow: true,
        };
        for e in [
            Event::Doorbell(7),
            Event::Checkpoint(u32::MAX),
            Event::Fault(fault),
            Event::Crash(Crash::TripleFault),
            Event::Crash(Crash::PortIo(0x3f8)),
            Event::Crash(Crash::Mmio(u64::MAX)),
            Event::Crash(Crash::BadRegisterWrite),
            Event::Crash(Crash::Halt),
            Event::Crash(Crash::Kvm("internal error")),
            Event::Killed,
            Event::RunFailed(kvm_ioctls::Error::new(libc::EFAULT)),
            Event::Lost,
        ] {
            let (k, a, w) = encode(&e);
            assert!(same(&decode(k, a, w), &e), "{e:?}");
        }
    }

    #[test]
    fn any_words_decode_without_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..100_000 {
            let kind = u32::try_from(next() % 10).unwrap();
            let arg = if next() % 2 == 0 { next() % 8 } else { next() };
            let w = std::array::from_fn(|_| next());
            let _ = decode(kind, arg, w);
        }
        assert!(matches!(decode(0, 0, [0; 7]), Event::Lost));
    }

    #[test]
    fn forged_reports_are_told_from_written_ones() {
        let control = Control::default();
        assert!(!forged(&control), "a fresh slot");
        for e in [
            Event::Doorbell(7),
            Event::Crash(Crash::Halt),
            Event::Killed,
            Event::RunFailed(kvm_ioctls::Error::new(libc::EFAULT)),
        ] {
            write(&control, &e);
            assert!(!forged(&control), "{e:?}");
        }
        control.kind.store(99, Ordering::Relaxed);
        assert!(forged(&control));
        control.kind.store(CRASH, Ordering::Relaxed);
        control.arg.store(42, Ordering::Relaxed);
        assert!(forged(&control));
        control.kind.store(DOORBELL, Ordering::Relaxed);
        control.arg.store(u64::MAX, Ordering::Relaxed);
        assert!(forged(&control));
        control.kind.store(0, Ordering::Relaxed);
        control.arg.store(0, Ordering::Relaxed);
        assert!(forged(&control), "kind 0 after a report");
        assert!(matches!(decode(99, 0, [0; 7]), Event::Lost));
    }

    /// A report written while the caller judges the slot (a reply polled
    /// from the mailbox comes before the runner's doorbell) is never
    /// half of the last report and half of the next.
    #[test]
    fn a_report_being_written_is_never_judged_forged() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let control = Arc::new(Control::default());
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (control, stop) = (Arc::clone(&control), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut seq = 1_000u32;
                while !stop.load(Ordering::Relaxed) {
                    // Legitimate reports in turn: a crash's code is small,
                    // a doorbell's sequence number is not.
                    write(&control, &Event::Crash(Crash::Halt));
                    write(&control, &Event::Doorbell(seq));
                    write(&control, &Event::RunFailed(kvm_ioctls::Error::new(libc::EFAULT)));
                    seq = seq.wrapping_add(1);
                }
            })
        };
        let mut judged = 0u64;
        let until = std::time::Instant::now() + std::time::Duration::from_millis(300);
        while std::time::Instant::now() < until {
            assert!(!forged(&control), "judged forged: {}", describe(&control));
            let Some((_, event)) = read(&control) else {
                continue;
            };
            assert!(
                matches!(
                    event,
                    Event::Crash(Crash::Halt) | Event::Doorbell(_) | Event::RunFailed(_) | Event::Lost
                ),
                "{event:?}"
            );
            if let Event::Doorbell(s) = event {
                assert!(s >= 1_000, "a doorbell with another report's argument: {s}");
            }
            judged += 1;
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(judged > 1_000, "the slot was judged only {judged} times");
    }
}

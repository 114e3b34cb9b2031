//! `microfaas-vmhost-hostile`: a TEST FIXTURE, never used in production.
//! It stands for a VMM host process that a guest escaped into, for the
//! black-box tests of the backend (`tests/vm_host_hostile.rs`), which
//! point `vm.host_binary` (an operator's knob, unreachable from a
//! function) at a symlink to it named after the attack.
//!
//! It forks: the child is the real host process (`vmhost::host::run`,
//! sandboxed as usual) on a socket and a run ring of the fixture's; the
//! parent (the process the backend spawned, watches and kills) relays the
//! control socket and the run ring between the backend and the child, and
//! maps the channel slab itself, so it can do what an escaped host can:
//! answer garbage, twice, late or never, exit, and write any slot's
//! control block, mailbox and window at any time.
//!
//! The attack is the symlink's file name (`argv[0]`). Only the first
//! process spawned from a symlink's directory attacks, once (it creates
//! `attacked` there before anything else); later ones, the replacements,
//! relay honestly, so a test can check the backend serves again.
//!
//! Control attacks hit the reply to the process's second `Restore`:
//! `garbage-restore`, `wrong-kind-restore`, `twice-restore`,
//! `silent-restore`, `exit-on-restore`, `refuse-restore`,
//! `state-refused-restore` (claims KVM refused the node's state). Run attacks hit
//! the process's second queued run: `garbage-report`, `forged-reply`,
//! `toctou`, `stray-reports`, `double-report`, `never-run`,
//! `open-report` (a fault report written inside a write generation it
//! never closes, the run swallowed), `exit-mid-run`. Any other name relays honestly.

use ipc::futex;
use ipc::region::SharedRegion;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vmhost::protocol::{Reply, Request, frame, unframe};
use vmhost::{HostArgs, RunEntry, RunRing};

const PAGE: usize = 4096;

fn die(what: &str) -> ! {
    eprintln!("microfaas-vmhost-hostile: {what}");
    std::process::exit(3)
}

fn dup(fd: i32) -> OwnedFd {
    // SAFETY: F_DUPFD_CLOEXEC on an fd the backend gave us; the new fd is
    // owned right after.
    let raw = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
    if raw < 0 {
        die("dup");
    }
    // SAFETY: a fresh fd nothing else owns.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// The slab as the escaped host sees it: every slot, writable.
struct SlabView {
    region: SharedRegion,
    stride: usize,
    slots: usize,
    io_addr: u64,
    io_bytes: usize,
}

impl SlabView {
    fn base(&self, slot: usize) -> Option<*mut u8> {
        if slot >= self.slots {
            return None;
        }
        self.region.range(slot * self.stride, self.stride)
    }

    fn control(&self, slot: usize) -> Option<&vmm::slab::Control> {
        // SAFETY: the slot's control page inside the live shared mapping;
        // `Control` is all atomics (valid for any bytes).
        self.base(slot).map(|p| unsafe { &*p.cast::<vmm::slab::Control>() })
    }

    fn mb32(&self, slot: usize, off: usize) -> Option<&AtomicU32> {
        // SAFETY: a 4-aligned offset inside the slot's mailbox page (the
        // Mailbox is repr(C) and smaller than a page); atomics over shared
        // memory are valid for any bytes.
        self.base(slot)
            .map(|p| unsafe { &*p.add(PAGE + off).cast::<AtomicU32>() })
    }

    fn mb64(&self, slot: usize, off: usize) -> Option<&AtomicU64> {
        // SAFETY: as for `mb32`, 8-aligned.
        self.base(slot)
            .map(|p| unsafe { &*p.add(PAGE + off).cast::<AtomicU64>() })
    }

    fn scribble_window(&self, slot: usize, byte: u8) {
        if let Some(p) = self.base(slot) {
            // SAFETY: the slot's window inside the live shared mapping.
            unsafe { std::ptr::write_bytes(p.add(2 * PAGE), byte, self.io_bytes.min(PAGE)) };
        }
    }

    /// Writes a report (kind, arg, words) as a runner would, and wakes.
    fn report(&self, slot: usize, kind: u32, arg: u64, words: [u64; 7]) {
        if let Some(c) = self.control(slot) {
            c.kind.store(kind, Ordering::Relaxed);
            c.arg.store(arg, Ordering::Relaxed);
            for (w, v) in c.words.iter().zip(words) {
                w.store(v, Ordering::Relaxed);
            }
            c.report_seq.fetch_add(1, Ordering::Release);
            futex::wake(&c.report_seq, u32::MAX);
        }
    }

    /// Writes a report as `report` does, but opens a write generation
    /// first (odd `writing`) and never closes it.
    fn open_report(&self, slot: usize, kind: u32, arg: u64, words: [u64; 7]) {
        if let Some(c) = self.control(slot) {
            c.writing.fetch_or(1, Ordering::Release);
        }
        self.report(slot, kind, arg, words);
    }

    /// Writes a reply in slot's mailbox answering `seq`.
    fn reply(&self, slot: usize, seq: u32, status: u32, addr: u64, len: u64) {
        use guest_abi::Mailbox;
        use std::mem::offset_of;
        let (Some(st), Some(a), Some(l), Some(rs)) = (
            self.mb32(slot, offset_of!(Mailbox, status)),
            self.mb64(slot, offset_of!(Mailbox, out_addr)),
            self.mb64(slot, offset_of!(Mailbox, out_len)),
            self.mb32(slot, offset_of!(Mailbox, resp_seq)),
        ) else {
            return;
        };
        st.store(status, Ordering::Relaxed);
        a.store(addr, Ordering::Relaxed);
        l.store(len, Ordering::Relaxed);
        rs.store(seq, Ordering::Release);
    }

    fn req_seq(&self, slot: usize) -> u32 {
        self.mb32(slot, std::mem::offset_of!(guest_abi::Mailbox, req_seq))
            .map_or(0, |w| w.load(Ordering::Acquire))
    }

    fn resp_seq(&self, slot: usize) -> u32 {
        self.mb32(slot, std::mem::offset_of!(guest_abi::Mailbox, resp_seq))
            .map_or(0, |w| w.load(Ordering::Acquire))
    }
}

/// The symlink's directory (the fixture writes `fired` there when it
/// attacks, for the test to check the attack happened).
static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

fn fired() {
    if let Some(d) = DIR.get() {
        let _ = std::fs::write(d.join("fired"), b"");
    }
}

const DOORBELL: u32 = 1;
const FAULT: u32 = 3;

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let args = HostArgs::parse(&argv[1..]).unwrap_or_else(|e| die(&e));
    let path = std::path::PathBuf::from(&argv[0]);
    let mode = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_owned();
    let hostile = path.parent().is_some_and(|d| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(d.join("attacked"))
            .is_ok()
    });
    if let Some(d) = path.parent() {
        let _ = DIR.set(d.to_owned());
    }
    let layout = vmm::layout::Layout::new(args.instance_config().layout).unwrap_or_else(|e| die(&e.to_string()));
    let io_bytes = usize::try_from(layout.io_bytes).unwrap_or_else(|_| die("io bytes"));
    let stride = vmm::slab::slot_stride(layout.io_bytes).unwrap_or_else(|| die("stride"));

    // Before the fork (single-threaded): the backend's ends, the child's.
    let backend = dup(vmhost::CONTROL_FD);
    let backend_ring = dup(vmhost::RING_FD);
    let slab = SharedRegion::from_fd_keeping(dup(vmhost::SLAB_FD), stride * args.slots)
        .unwrap_or_else(|e| die(&format!("slab: {e}")));
    let child_ring = SharedRegion::create("hostile-ring", vmhost::RingLayout::bytes())
        .unwrap_or_else(|e| die(&format!("ring: {e}")));
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two fds into the local array.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) } != 0 {
        die("socketpair");
    }
    // SAFETY: two fresh fds nothing else owns.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let parent = std::process::id();
    // SAFETY: the process is single-threaded here; the child only calls
    // async-signal-safe functions until it runs the host (a fresh
    // single-threaded process image as far as Rust is concerned).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        die("fork");
    }
    if pid == 0 {
        // SAFETY: plain syscalls on our own fds and process.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != i32::try_from(parent).unwrap_or(0) {
                libc::_exit(1);
            }
            libc::dup2(theirs.as_raw_fd(), vmhost::CONTROL_FD);
            libc::dup2(child_ring.fd().map_or(-1, |f| f.as_raw_fd()), vmhost::RING_FD);
        }
        drop((backend, backend_ring, ours, theirs));
        if let Err(e) = vmhost::host::run(&args) {
            die(&format!("host: {e}"));
        }
        std::process::exit(0);
    }
    drop(theirs);
    std::thread::spawn(move || {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        std::process::exit(4);
    });
    let attack = Arc::new(AtomicBool::new(hostile));
    let view = Arc::new(SlabView {
        region: slab,
        stride,
        slots: args.slots,
        io_addr: layout.io_addr,
        io_bytes,
    });
    // SAFETY: the parent is the backend ring's only consumer and the child
    // ring's only producer.
    let from = unsafe {
        RunRing::new(
            SharedRegion::from_fd(backend_ring, vmhost::RingLayout::bytes()).unwrap_or_else(|e| die(&e.to_string())),
        )
    }
    .unwrap_or_else(|e| die(&e.to_string()));
    // SAFETY: as above.
    let to = unsafe { RunRing::new(child_ring) }.unwrap_or_else(|e| die(&e.to_string()));
    {
        let (mode, attack, view) = (mode.clone(), Arc::clone(&attack), Arc::clone(&view));
        std::thread::spawn(move || relay_runs(&mode, &attack, &view, &from, &to));
    }
    relay_control(&mode, &attack, backend.as_fd(), ours.as_fd());
}

fn relay_control(mode: &str, attack: &AtomicBool, backend: BorrowedFd<'_>, child: BorrowedFd<'_>) {
    let mut buf = vec![0u8; vmhost::protocol::MAX_MESSAGE + 64];
    let mut restores = 0u32;
    loop {
        let (len, fd) = match vmhost::host::receive(backend, &mut buf) {
            Ok(Some(m)) => m,
            _ => std::process::exit(0),
        };
        let (id, is_restore) = match unframe(&buf[..len]) {
            Ok((id, m)) => (id, matches!(Request::decode(m), Ok(Request::Restore { .. }))),
            Err(_) => (0, false),
        };
        if vmhost::host::send_with(child, &buf[..len], fd.as_ref().map(AsFd::as_fd)).is_err() {
            std::process::exit(5);
        }
        let len = match vmhost::host::receive(child, &mut buf) {
            Ok(Some((len, _))) => len,
            _ => std::process::exit(5),
        };
        let mut reply = buf[..len].to_vec();
        let mut times = 1;
        if is_restore {
            restores += 1;
        }
        if is_restore && restores == 2 && attack.swap(false, Ordering::SeqCst) {
            fired();
            match mode {
                "garbage-restore" => reply = vec![0xff; 37],
                "wrong-kind-restore" => reply = frame(id, &Reply::Ok.encode()),
                "refuse-restore" => reply = frame(id, &Reply::Error("refused".into()).encode()),
                "state-refused-restore" => {
                    reply = frame(id, &Reply::StateRefused("KVM_SET_SREGS (forged)".into()).encode());
                }
                "twice-restore" => times = 2,
                "silent-restore" => times = 0,
                "exit-on-restore" => std::process::exit(6),
                _ => attack.store(true, Ordering::SeqCst),
            }
        }
        for _ in 0..times {
            if vmhost::host::send_with(backend, &reply, None).is_err() {
                std::process::exit(0);
            }
        }
    }
}

fn relay_runs(mode: &str, attack: &AtomicBool, view: &Arc<SlabView>, from: &RunRing, to: &RunRing) {
    let (from, to) = (from.ring(), to.ring());
    let mut runs = 0u32;
    let mut swallowed: Option<u32> = None;
    let forward = |e: RunEntry| {
        while to.try_push(e).is_err() {
            std::thread::yield_now();
        }
        futex::wake(to.tail_word(), 1);
    };
    loop {
        let tail = from.tail_word().load(Ordering::Acquire);
        let Some(e) = from.pop() else {
            futex::wait(from.tail_word(), tail, Some(Duration::from_millis(100)));
            continue;
        };
        let slot = usize::try_from(e.slot).unwrap_or(usize::MAX);
        if swallowed == Some(e.slot) {
            continue;
        }
        if e.op == RunEntry::STOP {
            forward(e);
            continue;
        }
        runs += 1;
        if runs != 2 || !attack.swap(false, Ordering::SeqCst) {
            forward(e);
            continue;
        }
        let seq = view.req_seq(slot);
        fired();
        match mode {
            "garbage-report" => {
                view.report(slot, 0xdead_beef, u64::MAX, [0x4141_4141_4141_4141; 7]);
            }
            "forged-reply" => {
                // The guest's page tables, outside the I/O window.
                view.reply(slot, seq, guest_abi::reply::OK, 0x1000, 4096);
                view.report(slot, DOORBELL, u64::from(seq), [0; 7]);
            }
            "toctou" => {
                forward(e);
                let view = Arc::clone(view);
                std::thread::spawn(move || {
                    let until = Instant::now() + Duration::from_millis(300);
                    let mut i = 0u64;
                    while Instant::now() < until && view.req_seq(slot) == seq {
                        i += 1;
                        match i % 4 {
                            0 => view.reply(slot, seq, guest_abi::reply::OK, view.io_addr, 16),
                            1 => view.reply(slot, seq, guest_abi::reply::OK, 0, u64::MAX),
                            2 => view.reply(slot, seq, 99, view.io_addr, 8),
                            _ => view.scribble_window(slot, u8::try_from(i % 251).unwrap_or(0)),
                        }
                    }
                });
            }
            "stray-reports" => {
                forward(e);
                for other in (0..view.slots.min(64)).filter(|o| *o != slot) {
                    let next = view.req_seq(other).wrapping_add(1);
                    view.reply(other, next, guest_abi::reply::OK, view.io_addr, 4);
                    view.report(other, FAULT, 0, [14, 6, 0x1234, 0xdead, 0x8000, 3, 0]);
                }
            }
            "double-report" => {
                forward(e);
                let view = Arc::clone(view);
                std::thread::spawn(move || {
                    let until = Instant::now() + Duration::from_secs(2);
                    while view.resp_seq(slot) != seq && Instant::now() < until {
                        std::thread::yield_now();
                    }
                    // Once the caller took the answer: answer again, and
                    // answer the next request before it is sent.
                    std::thread::sleep(Duration::from_millis(20));
                    view.report(slot, DOORBELL, u64::from(seq), [0; 7]);
                    view.reply(slot, seq.wrapping_add(1), guest_abi::reply::OK, view.io_addr, 0);
                    view.report(slot, DOORBELL, u64::from(seq.wrapping_add(1)), [0; 7]);
                });
            }
            "never-run" => swallowed = Some(e.slot),
            "open-report" => {
                swallowed = Some(e.slot);
                // A page fault at ring 3: taken, it would fail the request
                // as a guest fault.
                view.open_report(slot, FAULT, 0, [14, 4, 0x1000, 0xdead_0000, 0x8000, 3, 0]);
            }
            "exit-mid-run" => std::process::exit(7),
            _ => {
                attack.store(true, Ordering::SeqCst);
                forward(e);
            }
        }
    }
}

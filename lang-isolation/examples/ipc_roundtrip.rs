//! The IPC measurement behind the process backend's choice (see
//! `lang_isolation::process`): round trips between this process and a child
//! it spawns, over a futex word in shared memory, an eventfd pair and a pipe
//! pair. `cargo run --release -p lang-isolation --example ipc_roundtrip`;
//! pin both to one core with `taskset -c 0` for the same-core numbers.

use std::os::fd::RawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

const ROUNDS: usize = 20_000;

fn futex(word: &AtomicU32, op: libc::c_int, val: u32) {
    // SAFETY: `word` is a live, aligned u32 in a shared mapping; no timeout.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), op, val, 0, 0, 0);
    }
}

fn shared_word(fd: RawFd) -> &'static AtomicU32 {
    // SAFETY: maps one page of the memfd; leaked for the process's life.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: a page-aligned, zero-filled, never-unmapped word.
    unsafe { &*p.cast::<AtomicU32>() }
}

fn write_u64(fd: RawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writing 8 bytes from a live buffer.
    assert_eq!(unsafe { libc::write(fd, one.as_ptr().cast(), 8) }, 8);
}

fn read_u64(fd: RawFd) {
    let mut buf = [0u8; 8];
    // SAFETY: reading up to 8 bytes into a live buffer.
    assert!(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), 8) } > 0);
}

fn wait_readable(fd: RawFd) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, -1) };
}

fn child(kind: &str, a: RawFd, b: RawFd) {
    match kind {
        "futex" => {
            let w = shared_word(a);
            for _ in 0..ROUNDS {
                loop {
                    let v = w.load(Ordering::Acquire);
                    if v == 1 {
                        break;
                    }
                    futex(w, libc::FUTEX_WAIT, v);
                }
                w.store(2, Ordering::Release);
                futex(w, libc::FUTEX_WAKE, 1);
            }
        }
        _ => {
            for _ in 0..ROUNDS {
                read_u64(a);
                write_u64(b);
            }
        }
    }
}

fn report(name: &str, mut ns: Vec<u64>) {
    ns.sort_unstable();
    let pct = |p: usize| ns[(ns.len() - 1) * p / 100];
    println!("{name:<8} median {:>6} ns   p99 {:>6} ns", pct(50), pct(99));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 5 && args[1] == "child" {
        child(&args[2], args[3].parse().unwrap(), args[4].parse().unwrap());
        return;
    }
    let me = std::env::current_exe().unwrap();
    let spawn = |kind: &str, a: RawFd, b: RawFd| {
        Command::new(&me)
            .args(["child", kind, &a.to_string(), &b.to_string()])
            .spawn()
            .unwrap()
    };

    // SAFETY: plain fd creation; the fds are inherited by the child (no
    // CLOEXEC) and never closed.
    let memfd = unsafe { libc::memfd_create(c"ipc".as_ptr(), 0) };
    // SAFETY: resizing our memfd.
    assert_eq!(unsafe { libc::ftruncate(memfd, 4096) }, 0);
    let w = shared_word(memfd);
    let mut c = spawn("futex", memfd, memfd);
    let mut ns = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        w.store(1, Ordering::Release);
        futex(w, libc::FUTEX_WAKE, 1);
        loop {
            let v = w.load(Ordering::Acquire);
            if v == 2 {
                break;
            }
            futex(w, libc::FUTEX_WAIT, v);
        }
        w.store(0, Ordering::Relaxed);
        ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap());
    }
    c.wait().unwrap();
    report("futex", ns);

    // SAFETY: plain fd creation, inherited by the children.
    let (req, rep) = unsafe { (libc::eventfd(0, 0), libc::eventfd(0, 0)) };
    fd_round_trips(&spawn, "eventfd", (req, req), (rep, rep));
    let (mut p1, mut p2) = ([0; 2], [0; 2]);
    // SAFETY: two valid 2-int arrays.
    unsafe { assert_eq!(libc::pipe(p1.as_mut_ptr()) | libc::pipe(p2.as_mut_ptr()), 0) };
    fd_round_trips(&spawn, "pipe", (p1[0], p1[1]), (p2[0], p2[1]));
}

/// Round trips over a request channel and a reply channel, each given as
/// `(read end, write end)`.
fn fd_round_trips(
    spawn: &dyn Fn(&str, RawFd, RawFd) -> std::process::Child,
    kind: &str,
    req: (RawFd, RawFd),
    rep: (RawFd, RawFd),
) {
    let mut c = spawn(kind, req.0, rep.1);
    let mut ns = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        write_u64(req.1);
        wait_readable(rep.0);
        read_u64(rep.0);
        ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap());
    }
    c.wait().unwrap();
    report(kind, ns);
}

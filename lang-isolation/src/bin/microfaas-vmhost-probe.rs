//! `microfaas-vmhost-probe`: a test probe of the VMM host process sandbox
//! (`lang_isolation::sandbox::vmhost`), exec'd fresh by
//! `tests/vmhost_sandbox.rs`; not part of any backend.
//!
//! `microfaas-vmhost-probe CASE SPEC IMAGE` does what a VMM host process
//! does before its sandbox (opens `/dev/kvm` and the guest image file it
//! writes at the path `IMAGE`,
//! installs the kick signal's handler, puts its control socket at fd 3 with
//! a slab memfd waiting on it), enters `vmhost::policy` through `vmhost::enter` for `SPEC` (a
//! `--sandbox` value), and then runs `CASE`:
//!
//! - `kvm`: the work of a host process: receive the slab memfd on the
//!   control socket and map it MAP_SHARED, map the image MAP_PRIVATE, create
//!   a VM with both as memory slots, create a vCPU, map its `kvm_run`, set
//!   registers, run the guest to its port write on this thread and on to
//!   its HLT from a new thread, read the vCPU's statistics, kick itself,
//!   raise its fd soft limit, pin itself to CPU 0, with a realtime signal, reply
//!   on the control socket.
//! - any other case: one forbidden system call, made raw.
//!
//! Each step's outcome goes to stderr as a `PROBE <key> <value>` line (the
//! only fd it may write), e.g. `PROBE result errno=13` or `PROBE result
//! ok=0`; a seccomp kill shows as the exit status instead.

use lang_isolation::sandbox::{SandboxSpec, vmhost};
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

const KVM_GET_API_VERSION: u64 = 0xae00;
const KVM_CREATE_VM: u64 = 0xae01;
const KVM_GET_VCPU_MMAP_SIZE: u64 = 0xae04;
const KVM_CREATE_VCPU: u64 = 0xae41;
/// `_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)` (32 bytes).
const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_ae46;
const KVM_RUN: u64 = 0xae80;
/// `_IOR(KVMIO, 0x81, struct kvm_regs)` (144 bytes), and `_IOW` of it.
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_SET_REGS: u64 = 0x4090_ae82;
/// `_IOR(KVMIO, 0x83, struct kvm_sregs)` (312 bytes), and `_IOW` of it.
const KVM_GET_SREGS: u64 = 0x8138_ae83;
const KVM_SET_SREGS: u64 = 0x4138_ae84;
/// `_IO(KVMIO, 0xce)`: a vCPU's binary statistics fd.
const KVM_GET_STATS_FD: u64 = 0xaece;
const KVM_EXIT_IO: u32 = 2;
const KVM_EXIT_HLT: u32 = 5;

/// Guest RAM on the slab (slot 0, guest address 0) and the image (slot 1).
const PAGE: usize = 4096;
const IMAGE_GPA: u64 = 0x1000;
/// Where the guest's store lands in the slab, and what it stores.
const STORE_AT: usize = 0x10;
const STORED: u8 = 0x42;
/// The byte of the guest's `out` (to port 0x3f8).
const OUT_BYTE: u8 = b'K';

/// The guest, real mode at `IMAGE_GPA`: `mov dx, 0x3f8; mov al, 'K'; out
/// dx, al; mov byte [0x10], 0x42; hlt`.
const GUEST: [u8; 13] = [
    0xba, 0xf8, 0x03, 0xb0, OUT_BYTE, 0xee, 0xc6, 0x06, 0x10, 0x00, STORED, 0xf4, 0xf4,
];

static KICKS: AtomicU32 = AtomicU32::new(0);

/// `/proc/self/pagemap`, opened before the sandbox as a host process
/// opens it (for instance resets), and the image fd: for the pagemap cases.
static PAGEMAP_FD: AtomicI32 = AtomicI32::new(-1);
static IMAGE_FD: AtomicI32 = AtomicI32::new(-1);

/// `PAGEMAP_SCAN` (`linux/fs.h`).
const PAGEMAP_SCAN: u64 = 0xc060_6610;
/// `PAGE_IS_PRESENT` (`linux/fs.h`).
const PAGE_IS_PRESENT: u64 = 1 << 3;

/// `struct pm_scan_arg` (`linux/fs.h`): ask for present pages of `[start,
/// end)` into `regions` (of `len` 16-byte `page_region`s).
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// One `PAGEMAP_SCAN` of this probe's own first stack page on `fd`.
fn pagemap_scan(fd: libc::c_int) -> libc::c_long {
    let local = 0u64;
    let page = (&raw const local as u64) & !(PAGE as u64 - 1);
    let mut regions = [0u64; 2 * 4];
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags: 0,
        start: page,
        end: page + PAGE as u64,
        walk_end: 0,
        vec: regions.as_mut_ptr() as u64,
        vec_len: 4,
        max_pages: 0,
        category_inverted: 0,
        category_mask: PAGE_IS_PRESENT,
        category_anyof_mask: 0,
        return_mask: PAGE_IS_PRESENT,
    };
    // SAFETY: PAGEMAP_SCAN with a pm_scan_arg of the kernel's layout whose
    // output vector is the live local `regions` (4 entries of 16 bytes).
    unsafe { libc::syscall(libc::SYS_ioctl, fd, PAGEMAP_SCAN, &raw mut arg) }
}

extern "C" fn on_kick(_: libc::c_int) {
    KICKS.fetch_add(1, Ordering::SeqCst);
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 5
}

/// A line on stderr (unbuffered: one write each).
fn report(key: &str, value: &str) {
    let _ = std::io::stderr().write_all(format!("PROBE {key} {value}\n").as_bytes());
}

fn fail(what: &str) -> ! {
    report("error", &format!("{what}: {}", std::io::Error::last_os_error()));
    std::process::exit(3);
}

/// The outcome of a raw system call's return value.
fn outcome(rc: libc::c_long) -> String {
    if rc < 0 {
        format!("errno={}", std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        format!("ok={rc}")
    }
}

fn ioctl(fd: libc::c_int, request: u64, arg: u64) -> libc::c_long {
    // SAFETY: every request this probe makes is a KVM ioctl whose argument
    // is an integer or points at a live buffer of the size the request
    // encodes (the callers'); a forbidden request is the test's point.
    unsafe { libc::syscall(libc::SYS_ioctl, fd, request, arg) }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, case, spec, image] = args.as_slice() else {
        eprintln!("usage: microfaas-vmhost-probe CASE SPEC IMAGE");
        std::process::exit(2);
    };
    let spec = SandboxSpec::parse(spec).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });

    // Before the sandbox: the control socket at fd 3 (first, so nothing
    // else holds that number) with the slab already sent on it, the only
    // files, the kick handler.
    let peer = control_socket_at_fd3();
    send_slab(&peer);
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .unwrap_or_else(|_| fail("open /dev/kvm"));
    // The image: written here (the test names a fresh path), then opened
    // read-only as a snapshot image is.
    std::fs::write(image, GUEST).unwrap_or_else(|_| fail("write the image"));
    let image = std::fs::File::open(image).unwrap_or_else(|_| fail("open the image"));
    // SAFETY: an empty sigaction with our handler, which only increments
    // an atomic (async-signal-safe).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            fail("sigaction");
        }
    }

    let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap_or_else(|_| fail("open /proc/self/pagemap"));
    PAGEMAP_FD.store(pagemap.as_raw_fd(), Ordering::Relaxed);
    IMAGE_FD.store(image.as_raw_fd(), Ordering::Relaxed);
    let policy = vmhost::policy_on(&spec, std::process::id(), vmhost::CONTROL_FD, Some(pagemap.as_raw_fd()))
        .unwrap_or_else(|e| {
            eprintln!("policy: {e}");
            std::process::exit(2)
        });
    let instructions = policy
        .seccomp
        .as_ref()
        .map_or(0, |s| s.compile().map_or(0, |p| p.len()));
    // A host process that started a thread too early: refused.
    let _early =
        (case == "thread-first").then(|| std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(2))));
    let t0 = std::time::Instant::now();
    if let Err(e) = vmhost::enter(&spec, vmhost::CONTROL_FD, Some(pagemap.as_raw_fd())) {
        report("error", &format!("enter: {e}"));
        std::process::exit(4);
    }
    let took = t0.elapsed();
    report(
        "applied",
        &format!("{} us, {instructions} instructions", took.as_secs_f64() * 1e6),
    );

    match case.as_str() {
        "kvm" => {
            // std's metadata: statx and glibc's fstat (newfstatat) refused
            // with ENOSYS, an error and no kill; the size by lseek.
            let meta = image.metadata().map_or_else(
                |e| format!("errno={}", e.raw_os_error().unwrap_or(0)),
                |m| format!("len={}", m.len()),
            );
            report("metadata", &meta);
            // SAFETY: lseek on an fd this process holds.
            let end = unsafe { libc::syscall(libc::SYS_lseek, image.as_raw_fd(), 0, libc::SEEK_END) };
            report("size", &outcome(end));
            // What a reset does: PAGEMAP_SCAN on the pagemap.
            report("scan", &outcome(pagemap_scan(pagemap.as_raw_fd())));
            run_guest(kvm.as_raw_fd(), image.as_raw_fd());
        }
        "none" => {}
        // A forbidden call on a pool thread: the whole process dies (the
        // main thread would otherwise report after the join).
        "thread-socket" => {
            let t = std::thread::spawn(|| forbidden("socket"));
            let r = t.join().unwrap_or_else(|_| "panicked".to_owned());
            report("result", &r);
        }
        other => report("result", &forbidden(other)),
    }
    drop((kvm, image, peer));
    report("done", "");
}

/// A SOCK_SEQPACKET pair, one end moved to fd 3; returns the other end.
fn control_socket_at_fd3() -> OwnedFd {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the local array.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        fail("socketpair");
    }
    // SAFETY: the pair was just created and is owned by nobody else.
    let (ours, peer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    if ours.as_raw_fd() != vmhost::CONTROL_FD {
        // SAFETY: dup3 onto fd 3 (stdin/out/err are 0-2; 3 is ours or free).
        if unsafe { libc::dup3(ours.as_raw_fd(), vmhost::CONTROL_FD, libc::O_CLOEXEC) } != vmhost::CONTROL_FD {
            fail("dup3");
        }
        // The fd 3 copy lives on (never closed: the probe exits).
        drop(ours);
    } else {
        std::mem::forget(ours);
    }
    peer
}

/// Sends a fresh two-page memfd (the "slab") over `peer` to fd 3.
fn send_slab(peer: &OwnedFd) {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    // SAFETY: a name literal; memfd_create returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"probe-slab".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        fail("memfd_create");
    }
    // SAFETY: the new fd is ours alone.
    let slab = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sizing our own memfd.
    if unsafe { libc::ftruncate(slab.as_raw_fd(), 2 * 4096) } != 0 {
        fail("ftruncate");
    }
    let fds = [slab.as_raw_fd()];
    let iov = [std::io::IoSlice::new(b"slab")];
    if sendmsg::<()>(
        peer.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .is_err()
    {
        fail("sendmsg slab");
    }
}

/// Receives the slab on fd 3 (after the sandbox: `recvmsg` on fd 3).
fn receive_slab() -> OwnedFd {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut buf = [0u8; 16];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([libc::c_int; 1]);
    let msg = recvmsg::<()>(
        vmhost::CONTROL_FD,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .unwrap_or_else(|_| fail("recvmsg"));
    for c in msg.cmsgs().unwrap_or_else(|_| fail("cmsgs")) {
        if let ControlMessageOwned::ScmRights(fds) = c
            && let Some(&fd) = fds.first()
        {
            // SAFETY: the kernel just installed this fd for us.
            return unsafe { OwnedFd::from_raw_fd(fd) };
        }
    }
    report("error", "no fd on the control socket");
    std::process::exit(3);
}

fn map(len: usize, flags: libc::c_int, fd: libc::c_int, what: &str) -> *mut u8 {
    // SAFETY: a new mapping at an address the kernel picks; fd is open.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        fail(what);
    }
    p.cast()
}

/// `struct kvm_userspace_memory_region`.
#[repr(C)]
struct Region {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
}

/// A raw pointer that may move to the vCPU thread (the probe keeps the
/// mapping alive until the thread is joined).
struct Shared(*mut u8);
// SAFETY: the kvm_run mapping outlives the thread (joined before exit), and
// only one thread touches it at a time (the main thread waits).
unsafe impl Send for Shared {}

fn run_guest(kvm: libc::c_int, image_fd: libc::c_int) {
    let slab_fd = receive_slab();
    let slab = map(2 * PAGE, libc::MAP_SHARED, slab_fd.as_raw_fd(), "mmap the slab");
    report("slab", "received and mapped MAP_SHARED");
    let image = map(PAGE, libc::MAP_PRIVATE, image_fd, "mmap the image");
    report("image", "mapped MAP_PRIVATE");

    let api = ioctl(kvm, KVM_GET_API_VERSION, 0);
    report("api", &outcome(api));
    let vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if vm < 0 {
        fail("KVM_CREATE_VM");
    }
    let vm = i32::try_from(vm).unwrap_or_else(|_| fail("vm fd"));
    // Guest RAM: the slab's first page at 0, the image's page after it.
    for (slot, gpa, host) in [(0u32, 0u64, slab), (1, IMAGE_GPA, image)] {
        let region = Region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: u64::try_from(PAGE).unwrap_or(0),
            userspace_addr: host as u64,
        };
        if ioctl(vm, KVM_SET_USER_MEMORY_REGION, std::ptr::from_ref(&region) as u64) != 0 {
            fail("KVM_SET_USER_MEMORY_REGION");
        }
    }
    report("vm", "created, two memory slots");
    let vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if vcpu < 0 {
        fail("KVM_CREATE_VCPU");
    }
    let vcpu = i32::try_from(vcpu).unwrap_or_else(|_| fail("vcpu fd"));
    let run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    let run_size = usize::try_from(run_size).unwrap_or_else(|_| fail("KVM_GET_VCPU_MMAP_SIZE"));
    let run = map(run_size, libc::MAP_SHARED, vcpu, "mmap kvm_run");

    let mut sregs = [0u8; 312];
    if ioctl(vcpu, KVM_GET_SREGS, sregs.as_mut_ptr() as u64) != 0 {
        fail("KVM_GET_SREGS");
    }
    // cs (the first kvm_segment): base 0 (bytes 0..8), selector 0 (12..14).
    sregs[0..8].fill(0);
    sregs[12..14].fill(0);
    if ioctl(vcpu, KVM_SET_SREGS, sregs.as_ptr() as u64) != 0 {
        fail("KVM_SET_SREGS");
    }
    let mut regs = [0u64; 18];
    if ioctl(vcpu, KVM_GET_REGS, regs.as_mut_ptr() as u64) != 0 {
        fail("KVM_GET_REGS");
    }
    regs.fill(0);
    regs[16] = IMAGE_GPA; // rip
    regs[17] = 2; // rflags: the reserved bit
    if ioctl(vcpu, KVM_SET_REGS, regs.as_ptr() as u64) != 0 {
        fail("KVM_SET_REGS");
    }

    // The port write, on this (the creating) thread.
    let exit = run_once(vcpu, run, run_size);
    report("exit1", &exit);

    // The HLT, from a new thread (KVM_RUN from another task than the
    // vCPU's creator and last runner).
    let shared = Shared(run);
    let thread = std::thread::Builder::new()
        .name("probe-vcpu".to_owned())
        .spawn(move || {
            let shared = shared;
            run_once(vcpu, shared.0, run_size)
        })
        .unwrap_or_else(|_| fail("spawn the vCPU thread"));
    let exit = thread.join().unwrap_or_else(|_| "panicked".to_owned());
    report("exit2", &exit);
    // SAFETY: the slab mapping is 2 pages long and live; the guest wrote
    // its byte through KVM into the same shared pages.
    let stored = unsafe { slab.add(STORE_AT).read_volatile() };
    report("stored", &format!("{stored:#x}"));

    // The vCPU's statistics, as the VMM reads them: the header, by pread64.
    let stats = ioctl(vcpu, KVM_GET_STATS_FD, 0);
    let header = if stats < 0 {
        format!("KVM_GET_STATS_FD {}", outcome(stats))
    } else {
        let mut header = [0u8; 24];
        // SAFETY: pread64 into a local buffer of the length passed.
        outcome(unsafe { libc::syscall(libc::SYS_pread64, stats, header.as_mut_ptr(), header.len(), 0) })
    };
    report("stats", &header);

    // The kick: a realtime signal to itself, through tgkill.
    // SAFETY: getpid/gettid have no preconditions; tgkill to this thread
    // with a signal whose handler only counts.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), kick_signal()) };
    report(
        "kick",
        &format!("{} handled={}", outcome(rc), KICKS.load(Ordering::SeqCst)),
    );

    // Raising its own fd soft limit to the hard one, pinning itself.
    let mut limit = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit64 on itself, reading into a local.
    let mut rc = unsafe {
        libc::syscall(
            libc::SYS_prlimit64,
            0,
            libc::RLIMIT_NOFILE,
            std::ptr::null::<libc::rlimit64>(),
            &mut limit,
        )
    };
    if rc == 0 {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: prlimit64 on itself from a local.
        rc = unsafe {
            libc::syscall(
                libc::SYS_prlimit64,
                0,
                libc::RLIMIT_NOFILE,
                &limit,
                std::ptr::null_mut::<libc::rlimit64>(),
            )
        };
    }
    report("rlimit", &outcome(rc));
    // SAFETY: an all-zero cpu_set_t with CPU 0 set, passed by reference.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::syscall(
            libc::SYS_sched_setaffinity,
            0,
            std::mem::size_of::<libc::cpu_set_t>(),
            &set,
        )
    };
    report("pin", &outcome(rc));

    // A reply on the control socket.
    let iov = [std::io::IoSlice::new(b"done")];
    let rc = nix::sys::socket::sendmsg::<()>(vmhost::CONTROL_FD, &iov, &[], nix::sys::socket::MsgFlags::empty(), None);
    report("reply", if rc.is_ok() { "sent" } else { "failed" });
}

/// One KVM_RUN to the next exit, described.
fn run_once(vcpu: libc::c_int, run: *mut u8, run_size: usize) -> String {
    let rc = ioctl(vcpu, KVM_RUN, 0);
    if rc != 0 {
        return format!("KVM_RUN {}", outcome(rc));
    }
    // SAFETY: kvm_run is `run_size` (>= one page) bytes, mapped; the
    // fields read are within its first 64 bytes, and the I/O data offset is
    // checked against the mapping's size.
    unsafe {
        let reason = run.add(8).cast::<u32>().read_volatile();
        match reason {
            KVM_EXIT_IO => {
                let port = run.add(34).cast::<u16>().read_volatile();
                let offset = run.add(40).cast::<u64>().read_volatile();
                let byte = usize::try_from(offset)
                    .ok()
                    .filter(|o| *o < run_size)
                    .map_or(0, |o| run.add(o).read_volatile());
                format!("io port={port:#x} byte={byte:#x}")
            }
            KVM_EXIT_HLT => "hlt".to_owned(),
            other => format!("reason={other}"),
        }
    }
}

/// One forbidden action, made raw; its outcome.
fn forbidden(case: &str) -> String {
    // SAFETY: (all cases) raw system calls with integer arguments or
    // pointers to live locals; none touches this process's memory beyond
    // them, and a case that would harm the test's process is not made
    // (signal 0 only).
    unsafe {
        let ppid = libc::getppid();
        let rc = match case {
            "openat" => {
                let path = CString::new("/etc/passwd").unwrap_or_default();
                libc::syscall(libc::SYS_openat, libc::AT_FDCWD, path.as_ptr(), libc::O_RDONLY)
            }
            "socket" => libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0),
            "execve" => {
                let path = CString::new("/bin/true").unwrap_or_default();
                let argv = [path.as_ptr(), std::ptr::null()];
                let envp: [*const libc::c_char; 1] = [std::ptr::null()];
                libc::syscall(libc::SYS_execve, path.as_ptr(), argv.as_ptr(), envp.as_ptr())
            }
            "kill-init" => libc::syscall(libc::SYS_kill, 1, 0),
            "kill-parent" => libc::syscall(libc::SYS_kill, ppid, 0),
            "tgkill-parent" => libc::syscall(libc::SYS_tgkill, ppid, ppid, 0),
            "ptrace" => libc::syscall(libc::SYS_ptrace, libc::PTRACE_ATTACH, ppid, 0, 0),
            "mmap-exec" => {
                let p = libc::syscall(
                    libc::SYS_mmap,
                    0,
                    PAGE,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p < 0 { p } else { 0 }
            }
            "mprotect-exec" => {
                let p = map(PAGE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, "mmap");
                libc::syscall(libc::SYS_mprotect, p, PAGE, libc::PROT_READ | libc::PROT_EXEC)
            }
            // Frame numbers: reading the pagemap a privileged opener holds.
            "pagemap-pread" => {
                let mut entry = 0u64;
                libc::syscall(
                    libc::SYS_pread64,
                    PAGEMAP_FD.load(Ordering::Relaxed),
                    &raw mut entry,
                    8,
                    0,
                )
            }
            // The scan's ioctl number on another fd than the pagemap.
            "pagemap-scan-other-fd" => pagemap_scan(IMAGE_FD.load(Ordering::Relaxed)),
            "ioctl-tcgets" => {
                let mut termios: libc::termios = std::mem::zeroed();
                libc::syscall(libc::SYS_ioctl, libc::STDERR_FILENO, libc::TCGETS, &mut termios)
            }
            "fork" => {
                let pid = libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0);
                if pid == 0 {
                    libc::syscall(libc::SYS_exit_group, 0);
                }
                if pid > 0 { 0 } else { pid }
            }
            "clone3" => libc::syscall(libc::SYS_clone3, 0, 0),
            "stat-path" => {
                let path = CString::new("/etc/passwd").unwrap_or_default();
                let mut st: libc::stat = std::mem::zeroed();
                libc::syscall(libc::SYS_newfstatat, libc::AT_FDCWD, path.as_ptr(), &mut st, 0)
            }
            "prlimit-init" => {
                let mut old = libc::rlimit64 {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::syscall(
                    libc::SYS_prlimit64,
                    1,
                    libc::RLIMIT_NOFILE,
                    std::ptr::null::<libc::rlimit64>(),
                    &mut old,
                )
            }
            "setaffinity-parent" => {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(0, &mut set);
                libc::syscall(
                    libc::SYS_sched_setaffinity,
                    ppid,
                    std::mem::size_of::<libc::cpu_set_t>(),
                    &set,
                )
            }
            "recvmsg-other-fd" => libc::syscall(libc::SYS_recvmsg, libc::STDIN_FILENO, 0, 0),
            "write-stdout" => libc::syscall(libc::SYS_write, libc::STDOUT_FILENO, c"x".as_ptr(), 1),
            "memfd" => libc::syscall(libc::SYS_memfd_create, c"x".as_ptr(), 0),
            other => return format!("unknown case {other}"),
        };
        outcome(rc)
    }
}

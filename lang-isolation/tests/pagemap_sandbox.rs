//! The worker's pagemap fd under its seccomp policy, attacked the way a
//! function with native code would: in a forked child with the worker's
//! filter attached (all layers' seccomp program, default SIGSYS action so a
//! violation kills the child), `ioctl(PAGEMAP_SCAN)` on the pagemap works
//! and finds the written page; reading the pagemap (`pread64`, frame
//! numbers for a privileged opener), another ioctl on it, `PAGEMAP_SCAN`
//! on another fd, and the scan through the x32 ABI all die of SIGSYS.

use lang_isolation::runtime::pagescan::{PAGEMAP_SCAN, PageScan};
use lang_isolation::sandbox::{SandboxSettings, SandboxSpec, worker};
use seccompiler::BpfProgram;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const CATALOG_FD: i32 = 1000;

fn program(pagemap_fd: i32) -> BpfProgram {
    let spec = SandboxSpec {
        settings: SandboxSettings::default(),
        netns: None,
        ipcns: None,
    };
    let pid = std::process::id();
    let policy = worker::policy_with_pagemap(&spec, pid, CATALOG_FD, Some(pagemap_fd)).unwrap();
    let text = policy.to_string();
    assert!(
        text.contains(&format!("fd == {pagemap_fd}, request == {PAGEMAP_SCAN:#x}")),
        "{text}"
    );
    assert!(text.contains(&format!("fd != {pagemap_fd}")), "{text}");
    policy.seccomp.unwrap().compile().unwrap()
}

/// Runs `then` in a forked child after attaching `program`: its wait status.
/// `then` returns the child's exit code.
fn in_child(program: &BpfProgram, then: impl FnOnce() -> i32) -> libc::c_int {
    // SAFETY: the child only attaches the filter and makes raw system calls
    // (no allocation, no lock) before `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: integer arguments; no core file from the SIGSYS deaths.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
        // SAFETY: as above.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        if seccompiler::apply_filter(program).is_err() {
            // SAFETY: ends the child.
            unsafe { libc::_exit(100) };
        }
        let code = then();
        // SAFETY: ends the child.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: reaping our own child into a local.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}

/// One attack, run in a child under the filter: its exit code if it lives.
type Attack = Box<dyn Fn() -> i32>;

fn killed_by_sigsys(status: libc::c_int) -> bool {
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
}

fn exited(status: libc::c_int, code: i32) -> bool {
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == code
}

/// A private mapping of a memfd with one page written (page 1 of 4).
struct Written {
    _fd: OwnedFd,
    addr: usize,
    len: usize,
}

impl Written {
    fn new() -> Self {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap();
        let len = 4 * page;
        // SAFETY: a NUL-terminated name; the fd is owned below.
        let raw = unsafe { libc::memfd_create(c"pagemap-sandbox".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh fd.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(len).unwrap();
        // SAFETY: our own memfd.
        let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), size) };
        assert_eq!(rc, 0);
        // SAFETY: a fresh private mapping at an address the kernel picks;
        // it is never unmapped (the test process ends).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p.cast::<u8>();
        // SAFETY: inside the mapping: page 0 read, page 1 written.
        unsafe {
            std::hint::black_box(base.read_volatile());
            base.add(page).write_volatile(1);
        }
        Self {
            _fd: fd,
            addr: base.addr(),
            len,
        }
    }
}

#[test]
fn the_scan_works_under_the_filter_and_nothing_else_reaches_the_pagemap() {
    let mut scan = PageScan::open().expect("PAGEMAP_SCAN (Linux 6.7+)");
    let fd = scan.fd();
    let program = program(fd);
    let written = Written::new();
    let page = written.len / 4;
    let mut out = Vec::with_capacity(16);

    // Allowed: the scan itself (no allocation: `out` has room).
    let status = in_child(&program, || {
        match scan.written(written.addr..written.addr + written.len, &mut out) {
            Ok(()) if out.len() == 1 && out[0] == (written.addr + page..written.addr + 2 * page) => 7,
            Ok(()) => 8,
            Err(_) => 9,
        }
    });
    assert!(exited(status, 7), "scan under the filter: status {status:#x}");

    let memfd = written._fd.as_raw_fd();
    let attacks: [(&str, Attack); 5] = [
        (
            "pread64 of the pagemap",
            Box::new(move || {
                let mut entry = [0u8; 8];
                let offset = i64::try_from(written_offset(written.addr)).unwrap();
                // SAFETY: reads 8 bytes into a local.
                unsafe { libc::syscall(libc::SYS_pread64, fd, entry.as_mut_ptr(), 8, offset) };
                0
            }),
        ),
        (
            "another ioctl on the pagemap",
            Box::new(move || {
                let mut n: libc::c_int = 0;
                // SAFETY: FIONREAD writes one int into a local.
                unsafe { libc::syscall(libc::SYS_ioctl, fd, libc::FIONREAD, &mut n) };
                0
            }),
        ),
        (
            "PAGEMAP_SCAN on another fd",
            Box::new(move || {
                // SAFETY: the filter stops it before the kernel reads the
                // (null) argument; a memfd would refuse it anyway.
                unsafe { libc::syscall(libc::SYS_ioctl, memfd, PAGEMAP_SCAN, 0usize) };
                0
            }),
        ),
        (
            "read of the pagemap",
            Box::new(move || {
                let mut entry = [0u8; 8];
                // SAFETY: reads 8 bytes into a local.
                unsafe { libc::syscall(libc::SYS_read, fd, entry.as_mut_ptr(), 8) };
                0
            }),
        ),
        (
            "PAGEMAP_SCAN through the x32 ABI",
            Box::new(move || {
                // SAFETY: the filter stops it before the kernel reads the
                // (null) argument.
                unsafe { libc::syscall(0x4000_0000 | libc::SYS_ioctl, fd, PAGEMAP_SCAN, 0usize) };
                0
            }),
        ),
    ];
    for (what, attack) in attacks {
        let status = in_child(&program, attack);
        assert!(killed_by_sigsys(status), "{what}: status {status:#x}");
    }
}

/// The pagemap offset of `addr`'s entry (8 bytes per page).
fn written_offset(addr: usize) -> usize {
    addr / 4096 * 8
}

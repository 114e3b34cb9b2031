//! The VMM host process sandbox (`sandbox::vmhost`) on the real kernel:
//! each test execs the probe (`microfaas-vmhost-probe`, a fresh process,
//! not a fork of this harness), which prepares like a host process, enters
//! `vmhost::policy` with the layers the test picks and then either runs a
//! KVM guest (what a host process must still be able to do) or makes one
//! forbidden system call (what it must not).
//!
//! Needs `/dev/kvm` (the probe opens it first): when it is unusable the
//! tests print why and pass, unless `MICROFAAS_REQUIRE_KVM=1` (CI), where
//! they fail. Run as root (CI is) the identity layer is a real uid drop and
//! every control run is made; as another user the identity layer is a user
//! namespace and the control runs that need root's rights (signalling init
//! unsandboxed) are skipped with a printed reason, the sandboxed runs still
//! asserted.

use lang_isolation::sandbox::{Layers, SandboxSettings};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

const KVM_GET_API_VERSION: libc::c_ulong = 0xae00;

/// Whether `/dev/kvm` works here; `Err` with the reason when it does not.
fn kvm_usable() -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument.
    let v = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if v == 12 {
        Ok(())
    } else {
        Err(format!("KVM_GET_API_VERSION returned {v}"))
    }
}

/// True when the test may run; false (after printing why) when it must
/// skip; panics when KVM is unusable but required.
fn kvm_or_skip() -> bool {
    match kvm_usable() {
        Ok(()) => true,
        Err(e) if std::env::var("MICROFAAS_REQUIRE_KVM").as_deref() == Ok("1") => {
            panic!("KVM required (MICROFAAS_REQUIRE_KVM=1) but unusable: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: {e} (set MICROFAAS_REQUIRE_KVM=1 to make this a failure)");
            false
        }
    }
}

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// How a probe run ended.
#[derive(Debug)]
struct Run {
    /// The signal that killed it, if one did.
    signal: Option<i32>,
    /// Its exit code, if it exited.
    code: Option<i32>,
    /// Its `PROBE key value` lines.
    lines: Vec<(String, String)>,
    stderr: String,
}

impl Run {
    fn get(&self, key: &str) -> Option<&str> {
        self.lines.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn killed_by_sigsys(&self) -> bool {
        self.signal == Some(libc::SIGSYS)
    }
}

const ALL: Layers = Layers {
    pkeys: false,
    ..Layers::ALL
};
const NO_SECCOMP: Layers = Layers {
    seccomp: false,
    pkeys: false,
    ..Layers::ALL
};
const NONE: Layers = Layers::NONE;

fn probe(case: &str, layers: Layers) -> Run {
    static N: AtomicU32 = AtomicU32::new(0);
    let image = std::env::temp_dir().join(format!(
        "vmhost-probe-{}-{}.img",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let settings = SandboxSettings {
        layers,
        ..SandboxSettings::default()
    };
    let out = Command::new(env!("CARGO_BIN_EXE_microfaas-vmhost-probe"))
        .arg(case)
        .arg(settings.to_arg())
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("exec the probe");
    let _ = std::fs::remove_file(&image);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("PROBE "))
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap_or((l, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    Run {
        signal: out.status.signal(),
        code: out.status.code(),
        lines,
        stderr,
    }
}

/// Under every layer the probe still does a host process's KVM work (std's
/// `File::metadata` fails with ENOSYS, not a kill; lseek gives the size):
/// the
/// slab memfd received on the control socket and mapped MAP_SHARED, the
/// image mapped MAP_PRIVATE, both as memory slots of a new VM, a vCPU and
/// its kvm_run, registers, a run to the guest's port write on the creating
/// thread and on to its HLT from a new thread (clone with thread flags
/// after glibc's clone3 got ENOSYS), the guest's store seen in the shared
/// slab, the vCPU's statistics header read (KVM_GET_STATS_FD, pread64),
/// a realtime kick sent with tgkill and handled, its own fd soft limit
/// raised and the thread pinned, a reply sent.
#[test]
fn sandboxed_host_process_still_runs_a_kvm_guest() {
    if !kvm_or_skip() {
        return;
    }
    let run = probe("kvm", ALL);
    println!("{}", run.stderr);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.get("applied").is_some_and(|v| v.contains("instructions")),
        "{run:?}"
    );
    assert_eq!(run.get("metadata"), Some("errno=38"), "{run:?}");
    assert_eq!(run.get("size"), Some("ok=13"), "{run:?}");
    assert_eq!(run.get("scan"), Some("ok=1"), "{run:?}");
    assert_eq!(run.get("api"), Some("ok=12"), "{run:?}");
    assert_eq!(run.get("exit1"), Some("io port=0x3f8 byte=0x4b"), "{run:?}");
    assert_eq!(run.get("exit2"), Some("hlt"), "{run:?}");
    assert_eq!(run.get("stored"), Some("0x42"), "{run:?}");
    assert_eq!(run.get("stats"), Some("ok=24"), "{run:?}");
    assert_eq!(run.get("kick"), Some("ok=0 handled=1"), "{run:?}");
    assert_eq!(run.get("rlimit"), Some("ok=0"), "{run:?}");
    assert_eq!(run.get("pin"), Some("ok=0"), "{run:?}");
    assert_eq!(run.get("reply"), Some("sent"), "{run:?}");
    assert!(run.get("done").is_some(), "{run:?}");
}

/// What a control run (a layer off) must show instead of the sandboxed
/// run's SIGSYS.
#[derive(Debug, Clone, Copy)]
enum Control {
    /// The call's outcome line, exactly.
    Result(&'static str),
    /// A success (`ok=<any value>`).
    Succeeds,
    /// The probe became another program: exit 0, no line after the call.
    Execs,
}

fn check_control(case: &str, layers: Layers, want: Control) {
    let run = probe(case, layers);
    assert!(run.signal.is_none(), "{case} with {layers:?}: {run:?}");
    match want {
        Control::Result(r) => assert_eq!(run.get("result"), Some(r), "{case} with {layers:?}: {run:?}"),
        Control::Succeeds => assert!(
            run.get("result").is_some_and(|r| r.starts_with("ok=")),
            "{case} with {layers:?}: {run:?}"
        ),
        Control::Execs => {
            assert_eq!(run.code, Some(0), "{case}: {run:?}");
            assert!(
                run.get("result").is_none() && run.get("done").is_none(),
                "{case}: {run:?}"
            );
        }
    }
}

/// Each forbidden call kills the sandboxed probe by SIGSYS (the seccomp
/// verdict, before the call runs); each has a control run showing that
/// the call does something without the seccomp layer (it succeeds, or
/// the layer beneath refuses it with its own errno), and where it is
/// harmless, that it succeeds with no layer at all, so the test can fail.
#[test]
fn forbidden_calls_die_by_sigsys_and_work_without_the_filter() {
    if !kvm_or_skip() {
        return;
    }
    let as_root = root();
    // (case, control without seccomp, control without any layer: only
    // where harmless and, for signals to init, only as root)
    let cases: &[(&str, Control, Option<Control>)] = &[
        // Landlock refuses the open beneath seccomp (EACCES).
        ("openat", Control::Result("errno=13"), Some(Control::Succeeds)),
        ("socket", Control::Succeeds, Some(Control::Succeeds)),
        // Landlock refuses the exec (EACCES); unconfined it execs.
        ("execve", Control::Result("errno=13"), Some(Control::Execs)),
        // Another uid (and Landlock's signal scope): EPERM beneath.
        (
            "kill-init",
            Control::Result("errno=1"),
            as_root.then_some(Control::Result("ok=0")),
        ),
        ("kill-parent", Control::Result("errno=1"), Some(Control::Result("ok=0"))),
        (
            "tgkill-parent",
            Control::Result("errno=1"),
            Some(Control::Result("ok=0")),
        ),
        // Not dumpable, another uid: EPERM beneath. Never unconfined (it
        // would stop this test process).
        ("ptrace", Control::Result("errno=1"), None),
        ("mmap-exec", Control::Succeeds, Some(Control::Succeeds)),
        ("mprotect-exec", Control::Succeeds, Some(Control::Succeeds)),
        // The terminal driver answers (ENOTTY: stderr is a pipe).
        (
            "ioctl-tcgets",
            Control::Result("errno=25"),
            Some(Control::Result("errno=25")),
        ),
        ("fork", Control::Succeeds, Some(Control::Succeeds)),
        // The pagemap (opened before the sandbox, for resets) read: one
        // 8-byte entry, frame number included for a privileged opener.
        ("pagemap-pread", Control::Result("ok=8"), Some(Control::Result("ok=8"))),
        // PAGEMAP_SCAN on a regular file: ENOTTY beneath.
        (
            "pagemap-scan-other-fd",
            Control::Result("errno=25"),
            Some(Control::Result("errno=25")),
        ),
        // The socket layer answers (ENOTSOCK: stdin is /dev/null).
        (
            "recvmsg-other-fd",
            Control::Result("errno=88"),
            Some(Control::Result("errno=88")),
        ),
        ("write-stdout", Control::Succeeds, Some(Control::Succeeds)),
        ("memfd", Control::Succeeds, Some(Control::Succeeds)),
        // Another uid: EPERM beneath; unconfined root reads init's limit.
        (
            "prlimit-init",
            Control::Result("errno=1"),
            as_root.then_some(Control::Result("ok=0")),
        ),
        // Another uid: EPERM beneath. Never unconfined (it would pin this
        // test process).
        ("setaffinity-parent", Control::Result("errno=1"), None),
    ];
    for &(case, no_seccomp, unconfined) in cases {
        let run = probe(case, ALL);
        assert!(run.killed_by_sigsys(), "{case}: not killed by SIGSYS: {run:?}");
        assert!(
            run.get("applied").is_some() && run.get("result").is_none(),
            "{case}: {run:?}"
        );
        check_control(case, NO_SECCOMP, no_seccomp);
        match unconfined {
            Some(want) => check_control(case, NONE, want),
            None if matches!(case, "kill-init" | "prlimit-init") => {
                eprintln!("{case}: unconfined control run skipped: not root")
            }
            None => {}
        }
    }
}

/// The refused calls fail with ENOSYS and the process lives: `clone3`
/// (glibc falls back to `clone` on exactly that; without the filter the
/// kernel itself answers, EINVAL for a missing argument struct) and a stat
/// of a path (which Landlock would let through: the control run succeeds).
#[test]
fn refused_calls_fail_with_enosys_and_the_process_lives() {
    if !kvm_or_skip() {
        return;
    }
    for (case, control) in [("clone3", "errno=22"), ("stat-path", "ok=0")] {
        let run = probe(case, ALL);
        assert_eq!(run.code, Some(0), "{case}: {run:?}");
        assert_eq!(run.get("result"), Some("errno=38"), "{case}: {run:?}");
        assert!(run.get("done").is_some(), "{case}: {run:?}");
        check_control(case, NO_SECCOMP, Control::Result(control));
    }
}

/// Entering the policy with every layer and doing nothing else exits
/// cleanly (the exit path itself is allowed), and reports the program's
/// length and the time `apply` took.
#[test]
fn entering_the_policy_and_exiting_is_clean() {
    if !kvm_or_skip() {
        return;
    }
    let run = probe("none", ALL);
    assert_eq!(run.code, Some(0), "{run:?}");
    let applied = run.get("applied").expect("applied line");
    println!("apply with every layer: {applied}");
    assert!(run.get("done").is_some(), "{run:?}");
}

/// A host process that started a thread before entering is refused (the
/// thread would stay unconfined) and exits with the reason.
#[test]
fn a_thread_started_before_entering_is_refused() {
    if !kvm_or_skip() {
        return;
    }
    let run = probe("thread-first", ALL);
    assert_eq!(run.code, Some(4), "{run:?}");
    assert!(
        run.get("error").is_some_and(|e| e.contains("2 threads in the process")),
        "{run:?}"
    );
    assert!(run.get("applied").is_none(), "{run:?}");
}

/// A violation on one of the pool's threads kills the whole process
/// (`SECCOMP_RET_KILL_PROCESS`, not just the thread): nothing of a
/// compromised host process serves on.
#[test]
fn a_violation_on_a_pool_thread_kills_the_process() {
    if !kvm_or_skip() {
        return;
    }
    let run = probe("thread-socket", ALL);
    assert!(run.killed_by_sigsys(), "{run:?}");
    assert!(run.get("result").is_none() && run.get("done").is_none(), "{run:?}");
    check_control("thread-socket", NO_SECCOMP, Control::Succeeds);
}

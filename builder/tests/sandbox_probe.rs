//! The build sandbox attacked from inside: this binary runs itself (as
//! `--probe`) under a [`SandboxPolicy`] like the compile's and tries each
//! thing the policy forbids: host files, writes outside the out dir, the
//! network, capabilities, privileges, the environment. As root it also runs
//! the whole case again as an unprivileged user (uid 65534, `setpriv`), where
//! the sandbox is built in a user namespace.
//!
//! `harness = false`: `main` is the test; a failed check exits non-zero.

use microfaas_builder::sandbox::{self, Bind, HostLayout, MountAccess, SandboxPolicy};
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const PROBE: &str = "--probe";
const UNPRIVILEGED: &str = "--unprivileged-case";
const CANARY: &str = "microfaas-probe-canary-7f3a";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == PROBE) {
        std::process::exit(probe());
    }
    let unprivileged = args.iter().any(|a| a == UNPRIVILEGED);
    if !unprivileged {
        control_case();
    }
    run_case(if unprivileged { "unprivileged" } else { "as invoked" });
    // SAFETY: geteuid cannot fail.
    if !unprivileged && unsafe { libc::geteuid() } == 0 {
        unprivileged_case();
    }
    println!("sandbox_probe: ok");
}

/// Builds a sandbox like the compile's around a scratch dir, runs the
/// probe in it and checks every line it reports.
fn run_case(label: &str) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let base = tmp.path().canonicalize().unwrap();
    let (out, ro, root) = (base.join("out"), base.join("ro"), base.join("root"));
    fs::create_dir_all(&out).unwrap();
    fs::create_dir_all(&ro).unwrap();
    fs::write(ro.join("data"), "readable").unwrap();
    // Outside every bind: the sandbox must not see it.
    let canary = base.join("canary.txt");
    fs::write(&canary, CANARY).unwrap();
    // SAFETY: geteuid cannot fail.
    let is_root = unsafe { libc::geteuid() } == 0;
    if is_root {
        std::os::unix::fs::chown(&out, Some(sandbox::UNPRIVILEGED_ID), Some(sandbox::UNPRIVILEGED_ID)).unwrap();
    }
    let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
    let layout = HostLayout::detect();
    let bind = |p: &Path, access| Bind {
        path: p.to_owned(),
        source: p.to_owned(),
        access,
    };
    let mut binds = vec![
        bind(Path::new("/usr"), MountAccess::ReadExec),
        bind(Path::new("/dev/null"), MountAccess::Device),
        bind(&exe, MountAccess::ReadExec),
        bind(&ro, MountAccess::Read),
        bind(&out, MountAccess::ReadWrite),
    ];
    binds.extend(layout.dirs.iter().map(|d| bind(d, MountAccess::ReadExec)));
    binds.extend(layout.etc.iter().map(|p| bind(p, MountAccess::Read)));
    let env: Vec<(String, OsString)> = vec![
        ("PATH".into(), "/usr/bin:/bin".into()),
        ("PROBE_OUT".into(), out.clone().into()),
        ("PROBE_RO".into(), ro.clone().into()),
        ("PROBE_CANARY".into(), canary.clone().into()),
    ];
    let policy = SandboxPolicy {
        root,
        binds,
        symlinks: layout.links.clone(),
        placeholders: vec![],
        user_namespace: !is_root,
        run_as: is_root.then_some(sandbox::UNPRIVILEGED_ID),
        cwd: out.clone(),
        env,
    };
    println!("{label}: {policy}");
    // Fail closed: a step that fails in the child (here: a working
    // directory that is not in the sandbox) is named, and nothing runs.
    let mut broken = policy.clone();
    broken.cwd = PathBuf::from("/not-in-the-sandbox");
    match sandbox::run(&broken, &exe, &[PROBE.into()], std::time::Duration::from_secs(60)) {
        Err(sandbox::SandboxError::Apply { step, .. }) => assert_eq!(step, "entering the working directory"),
        other => panic!("{label}: expected the failed step named, got {other:?}"),
    }
    assert!(!out.join("written-inside").exists(), "{label}: the probe ran anyway");
    let output = sandbox::run(&policy, &exe, &[PROBE.into()], std::time::Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{label}: sandbox: {e:?}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{label}: a probe check failed");
    for check in CHECKS {
        assert!(
            stdout.lines().any(|l| l == format!("{check}: ok")),
            "{label}: check `{check}` did not report ok"
        );
    }
    assert!(!stdout.contains(CANARY), "{label}: the canary leaked");
    assert!(
        out.join("written-inside").is_file(),
        "{label}: the out dir was not writable"
    );
}

/// The probe without the sandbox: its checks must fail (so they can).
fn control_case() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let canary = tmp.path().join("canary.txt");
    fs::write(&canary, CANARY).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .arg(PROBE)
        .env("PROBE_OUT", tmp.path())
        .env("PROBE_RO", tmp.path())
        .env("PROBE_CANARY", &canary)
        .output()
        .expect("running the probe unsandboxed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "unsandboxed, the probe must report failures:\n{stdout}"
    );
    for check in [
        "canary outside the binds hidden",
        "fixed environment",
        "only loopback",
        "no_new_privs",
    ] {
        assert!(
            stdout.contains(&format!("{check}: FAILED")),
            "control: `{check}` should fail unsandboxed:\n{stdout}"
        );
    }
    println!("control (no sandbox): the probe's checks fail as they must");
}

/// Runs this binary as uid/gid 65534 with no groups (the sandbox then needs
/// a user namespace), when the binary is reachable for that user.
fn unprivileged_case() {
    let exe = std::env::current_exe().unwrap();
    let reachable = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "test", "-x"])
        .arg(&exe)
        .status()
        .is_ok_and(|s| s.success());
    if !reachable {
        println!(
            "unprivileged case NOT RUN: setpriv missing or {} not executable by uid 65534",
            exe.display()
        );
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&exe)
        .arg(UNPRIVILEGED)
        .env("TMPDIR", "/tmp")
        .output()
        .expect("running setpriv");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the unprivileged (user namespace) case failed");
}

const CHECKS: &[&str] = &[
    "unprivileged uid",
    "no capabilities",
    "empty bounding set",
    "no_new_privs",
    "fixed environment",
    "host /etc/passwd hidden",
    "canary outside the binds hidden",
    "/root hidden",
    "read-only bind readable",
    "read-only bind not writable",
    "/usr not writable",
    "root not writable",
    "out dir writable",
    "only loopback",
    "no TCP connect",
    "no TCP bind",
    "/proc files unreadable (Landlock)",
    "/proc/self/exe resolvable",
];

/// Inside the sandbox: one line per check, `NAME: ok` or `NAME: FAILED ...`.
fn probe() -> i32 {
    let mut failed = 0;
    let mut report = |name: &str, result: Result<(), String>| match result {
        Ok(()) => println!("{name}: ok"),
        Err(why) => {
            println!("{name}: FAILED {why}");
            failed += 1;
        }
    };
    let must_fail = |what: &str, r: std::io::Result<()>| match r {
        Ok(()) => Err(format!("{what} succeeded")),
        Err(_) => Ok(()),
    };
    let env_path = |k: &str| PathBuf::from(std::env::var_os(k).unwrap_or_default());
    // SAFETY: plain credential queries.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    report(
        "unprivileged uid",
        if uid != 0 && gid != 0 {
            Ok(())
        } else {
            Err(format!("uid {uid} gid {gid}"))
        },
    );
    report("no capabilities", caps_clear());
    report(
        "empty bounding set",
        (0..=40)
            // SAFETY: prctl with integer arguments.
            .find(|&cap| unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } == 1)
            .map_or(Ok(()), |cap| Err(format!("capability {cap} in the bounding set"))),
    );
    report(
        "no_new_privs",
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } == 1 {
            Ok(())
        } else {
            Err("not set".into())
        },
    );
    let mut keys: Vec<String> = std::env::vars_os()
        .map(|(k, _)| k.to_string_lossy().into_owned())
        .collect();
    keys.sort();
    report(
        "fixed environment",
        if keys == ["PATH", "PROBE_CANARY", "PROBE_OUT", "PROBE_RO"] {
            Ok(())
        } else {
            Err(format!("{keys:?}"))
        },
    );
    report(
        "host /etc/passwd hidden",
        must_fail("reading /etc/passwd", fs::read("/etc/passwd").map(drop)),
    );
    report(
        "canary outside the binds hidden",
        match fs::read_to_string(env_path("PROBE_CANARY")) {
            Ok(text) => Err(format!("read {} bytes", text.len())),
            Err(_) => Ok(()),
        },
    );
    report(
        "/root hidden",
        must_fail("listing /root", fs::read_dir("/root").map(drop)),
    );
    let ro = env_path("PROBE_RO");
    report(
        "read-only bind readable",
        fs::read_to_string(ro.join("data"))
            .map_err(|e| e.to_string())
            .and_then(|t| if t == "readable" { Ok(()) } else { Err(t) }),
    );
    report(
        "read-only bind not writable",
        must_fail("writing the read-only bind", fs::write(ro.join("new"), "x")),
    );
    report(
        "/usr not writable",
        must_fail("writing /usr", fs::write("/usr/probe", "x")),
    );
    report("root not writable", must_fail("writing /", fs::write("/probe", "x")));
    report(
        "out dir writable",
        fs::write(env_path("PROBE_OUT").join("written-inside"), "x").map_err(|e| e.to_string()),
    );
    report(
        "only loopback",
        interfaces().and_then(|names| {
            if names == ["lo"] {
                Ok(())
            } else {
                Err(format!("{names:?}"))
            }
        }),
    );
    report(
        "no TCP connect",
        must_fail(
            "connecting to 1.1.1.1:443",
            std::net::TcpStream::connect_timeout(&([1, 1, 1, 1], 443).into(), std::time::Duration::from_secs(2))
                .map(drop),
        ),
    );
    report(
        "no TCP bind",
        must_fail(
            "binding 127.0.0.1:0",
            std::net::TcpListener::bind("127.0.0.1:0").map(drop),
        ),
    );
    report(
        "/proc files unreadable (Landlock)",
        match fs::read("/proc/self/status") {
            Ok(_) => Err("read /proc/self/status".into()),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok(()),
            Err(e) => Err(format!("unexpected error {e}")),
        },
    );
    report(
        "/proc/self/exe resolvable",
        fs::read_link("/proc/self/exe").map(drop).map_err(|e| e.to_string()),
    );
    i32::from(failed > 0)
}

fn caps_clear() -> Result<(), String> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default, Debug)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget writes the header and two data structs, both valid.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if ret != 0 {
        return Err(format!("capget: {}", std::io::Error::last_os_error()));
    }
    if data
        .iter()
        .all(|d| d.effective == 0 && d.permitted == 0 && d.inheritable == 0)
    {
        Ok(())
    } else {
        Err(format!("{data:?}"))
    }
}

fn interfaces() -> Result<Vec<String>, String> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry,
    // freed below with if_freenameindex.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(format!("if_nameindex: {}", std::io::Error::last_os_error()));
    }
    let mut names = Vec::new();
    let mut at = list;
    // SAFETY: walks the array up to its terminating entry; names are
    // NUL-terminated strings owned by the array.
    unsafe {
        while (*at).if_index != 0 {
            names.push(std::ffi::CStr::from_ptr((*at).if_name).to_string_lossy().into_owned());
            at = at.add(1);
        }
        libc::if_freenameindex(list);
    }
    Ok(names)
}

//! The process-sandbox attacks both the `language` and the `process`
//! backends must stop: one fixture (`sandbox-attacks`) with native code
//! execution issues raw system calls against the host (its real pid and a
//! root-only canary file come in the input). Shared by `language.rs` and
//! `process.rs`.

use crate::common::attacker;
use microfaas::{
    Backend, BackendKind, Config, ErrorKind, FunctionId, FunctionSpec, LanguageConfig, SandboxConfig, StartPath,
    StartRequest,
};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A secret in the host's (this test process's) memory.
pub static HOST_SECRET: [u8; 16] = *b"host-secret-4217";

/// The host's pid.
pub fn host_pid() -> u32 {
    std::process::id()
}

/// Address and length of [`HOST_SECRET`], as attack arguments.
pub fn secret_at() -> String {
    format!("{:#x} {}", HOST_SECRET.as_ptr().addr(), HOST_SECRET.len())
}

/// A backend under attack, with the attacker and a well-behaved function
/// deployed.
pub struct Target {
    pub backend: Box<dyn Backend>,
    pub attacker: FunctionId,
    pub echo: FunctionId,
    /// The echo artifact: a copy unique to this target, so that its runner
    /// processes can be told from other tests'.
    pub echo_path: PathBuf,
}

/// Opens `kind` with `sandbox` (one language worker).
pub fn target(kind: BackendKind, sandbox: SandboxConfig) -> Target {
    let config = Config {
        sandbox,
        language: LanguageConfig {
            workers: Some(1),
            hang_grace: Duration::from_millis(200),
            ..LanguageConfig::default()
        },
        ..Config::default()
    };
    let backend = microfaas::open(kind, config).expect("backend");
    let budget = Duration::from_secs(5);
    let attacker = backend
        .deploy(&FunctionSpec::new("attacker", attacker("sandbox-attacks")).with_budget(budget))
        .expect("deploying the attacker");
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hostile-victims");
    std::fs::create_dir_all(&dir).unwrap();
    let echo_path = dir.join(format!(
        "echo-{}-{}.so",
        host_pid(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::copy(microfaas::builtin("echo").unwrap().path(), &echo_path).unwrap();
    let echo_artifact = std::sync::Arc::new(microfaas::Artifact::load(&echo_path).unwrap());
    let echo = backend
        .deploy(&FunctionSpec::new("echo", echo_artifact).with_budget(budget))
        .expect("deploying echo");
    Target {
        backend,
        attacker,
        echo,
        echo_path,
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.echo_path);
    }
}

impl Target {
    /// Runs attack `input`.
    pub fn attack(&self, input: &str, start: StartRequest) -> Result<String, microfaas::Error> {
        self.backend
            .invoke(&self.attacker, input.as_bytes(), start)
            .map(|done| String::from_utf8_lossy(&done.output).into_owned())
    }

    /// The backend still serves both functions correctly.
    pub fn serves(&self) {
        let done = self
            .backend
            .invoke(&self.echo, b"still here", StartRequest::Auto)
            .expect("echo after an attack");
        assert_eq!(done.output, b"still here");
        assert_eq!(
            self.attack("ok", StartRequest::Auto)
                .expect("the attacker's harmless input"),
            "harmless"
        );
    }

    /// Attack `input` must end in a policy violation, warm and cold, and the
    /// backend then serves the next requests.
    pub fn must_violate(&self, input: &str) {
        for start in [StartRequest::Auto, StartRequest::Force(StartPath::Cold)] {
            match self.attack(input, start) {
                Err(e) => assert_eq!(e.kind(), ErrorKind::PolicyViolation, "`{input}` ({start:?}): {e}"),
                Ok(out) => panic!("`{input}` ({start:?}) was not stopped: {out}"),
            }
            self.serves();
        }
    }
}

/// A file only root can read, holding a secret.
pub struct Canary {
    pub dir: PathBuf,
    pub path: PathBuf,
    pub secret: String,
}

impl Canary {
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("canary-{}-{n}", host_pid()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("secret");
        let secret = format!("canary-{}-{n}", host_pid());
        std::fs::write(&path, &secret).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Self { dir, path, secret }
    }

    /// A path in the canary's directory that does not exist yet.
    pub fn new_file(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        let _ = std::fs::remove_file(&p);
        p
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether the host runs as root (the identity layer then drops to the
/// sandbox uid; the root-only canary tests need it).
pub fn host_is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective uid.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A TCP listener of the host on 127.0.0.1, and its port.
pub fn host_listener() -> (std::net::TcpListener, u16) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// Every attack the full sandbox must stop with a policy violation.
pub fn all_attacks(canary: &Canary) -> Vec<String> {
    let pid = host_pid();
    let written = canary.new_file("written");
    vec![
        "connect 9".to_owned(),
        format!("read {}", canary.path.display()),
        format!("write {}", written.display()),
        format!("kill {pid}"),
        "kill-group".to_owned(),
        format!("tgkill {pid}"),
        format!("tkill {pid}"),
        "kill-parent".to_owned(),
        format!("proc-mem {pid} {}", secret_at()),
        format!("ptrace {pid}"),
        format!("vm-read {pid} {}", secret_at()),
        "socket".to_owned(),
        "execve".to_owned(),
        "fork".to_owned(),
        "clone".to_owned(),
        "memfd".to_owned(),
        "mprotect-exec".to_owned(),
        "pkey-mprotect-exec".to_owned(),
        "mmap-rwx".to_owned(),
        "mmap-anon-exec".to_owned(),
        "futex-pi".to_owned(),
    ]
}

/// The full sandbox: every attack is a policy violation, on warm and cold
/// starts, and the backend serves on; nothing was written.
pub fn every_attack_is_a_policy_violation(kind: BackendKind) {
    let canary = Canary::new();
    let t = target(kind, SandboxConfig::default());
    t.serves();
    for input in all_attacks(&canary) {
        t.must_violate(&input);
    }
    assert!(!canary.dir.join("written").exists(), "a host file was written");
    // No descriptor in the sandboxed process can be mapped both executable
    // and writable (only the sealed artifact memfds map executable).
    for start in [StartRequest::Auto, StartRequest::Force(StartPath::Cold)] {
        match t.attack("exec-map-fds", start) {
            Ok(out) => assert!(out.ends_with(" also-writable=0"), "{start:?}: {out}"),
            // A language worker with protection keys refuses raw mmap from
            // function code outright (tests/hostile/pkeys.rs probes the fds
            // with keys off).
            Err(e) if kind == BackendKind::Language => assert_eq!(e.kind(), ErrorKind::PolicyViolation, "{e}"),
            Err(e) => panic!("{start:?}: {e}"),
        }
    }
}

/// Control run, sandbox off: the same attacks succeed (so the tests above
/// can fail). Only attacks that are harmless to the test process.
pub fn control_attacks_succeed_without_the_sandbox(kind: BackendKind) {
    let canary = Canary::new();
    let t = target(kind, SandboxConfig::off());
    let pid = host_pid();
    let read = t
        .attack(&format!("read {}", canary.path.display()), StartRequest::Auto)
        .unwrap();
    assert!(
        read.ends_with(&canary.secret),
        "the canary read works unsandboxed: {read}"
    );
    let written = canary.new_file("written");
    t.attack(&format!("write {}", written.display()), StartRequest::Auto)
        .unwrap();
    assert_eq!(std::fs::read_to_string(&written).unwrap(), "pwned");
    let secret = String::from_utf8_lossy(&HOST_SECRET).into_owned();
    for attack in ["vm-read", "proc-mem"] {
        let out = t
            .attack(&format!("{attack} {pid} {}", secret_at()), StartRequest::Auto)
            .unwrap();
        assert!(out.ends_with(&secret), "{attack} reads the host unsandboxed: {out}");
    }
    assert_eq!(t.attack(&format!("kill {pid}"), StartRequest::Auto).unwrap(), "ret=0");
    assert_eq!(t.attack(&format!("tgkill {pid}"), StartRequest::Auto).unwrap(), "ret=0");
    let (_listener, port) = host_listener();
    assert_eq!(
        t.attack(&format!("connect {port}"), StartRequest::Auto).unwrap(),
        "ret=0"
    );
    for attack in ["socket", "memfd"] {
        let out = t.attack(attack, StartRequest::Auto).unwrap();
        let fd: i64 = out.trim_start_matches("ret=").parse().unwrap();
        assert!(fd >= 0, "{attack} works unsandboxed: {out}");
    }
    for attack in ["mprotect-exec", "mmap-rwx", "mmap-anon-exec", "futex-pi"] {
        assert_eq!(t.attack(attack, StartRequest::Auto).unwrap(), "ret=0", "{attack}");
    }
    t.serves();
}

/// Defence in depth: seccomp off, every other layer on. Identity, Landlock
/// and not-dumpable still stop the reads, the write and the signals (the
/// kernel answers with an error instead of the filter).
pub fn without_seccomp_the_other_layers_still_hold(kind: BackendKind) {
    let canary = Canary::new();
    let t = target(
        kind,
        SandboxConfig {
            seccomp: false,
            ..SandboxConfig::default()
        },
    );
    let pid = host_pid();
    let refused = |input: &str| {
        let out = t.attack(input, StartRequest::Auto).expect(input);
        let code: i64 = out
            .split(' ')
            .next()
            .and_then(|r| r.strip_prefix("ret="))
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("`{input}`: unexpected output {out}"));
        assert!(code < 0, "`{input}` got through: {out}");
    };
    if host_is_root() {
        refused(&format!("read {}", canary.path.display()));
    }
    let written = canary.new_file("written");
    refused(&format!("write {}", written.display()));
    assert!(!written.exists());
    refused(&format!("proc-mem {pid} {}", secret_at()));
    refused(&format!("vm-read {pid} {}", secret_at()));
    refused(&format!("kill {pid}"));
    refused(&format!("tgkill {pid}"));
    refused(&format!("ptrace {pid}"));
    // The host's network: an empty namespace (and Landlock's TCP rule).
    let (_listener, port) = host_listener();
    refused(&format!("connect {port}"));
    t.serves();
}

/// `/proc/PID/status` fields of a sandboxed process.
pub fn status_of(pid: u64) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
}

/// Asserts what `/proc/PID/status` says about a sandboxed process.
pub fn assert_sandboxed(pid: u64) {
    let status = status_of(pid);
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("no {name} in the status of {pid}:\n{status}"))
    };
    let uid = microfaas::SandboxConfig::default().uid;
    if host_is_root() {
        assert_eq!(field("Uid:"), format!("{uid} {uid} {uid} {uid}"), "{status}");
        assert_eq!(field("Groups:"), "", "{status}");
    }
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(caps), "0000000000000000", "{caps} {status}");
    }
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    assert_eq!(field("Seccomp:"), "2", "{status}");
    if host_is_root() {
        // Not the host's network or IPC namespace (the host's shared empty
        // ones).
        for ns in ["net", "ipc"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
            assert_ne!(theirs, ours, "{ns} namespace of {pid}");
        }
    }
}

/// `init()` runs inside the sandbox: an attack from init fails the deploy
/// with a policy violation, and the backend serves on. With the sandbox off
/// (control), init's `socket()` works (the deploy fails with init's own
/// error, saying so).
pub fn an_attack_from_init_is_a_policy_violation(kind: BackendKind) {
    let t = target(kind, SandboxConfig::default());
    let spec = FunctionSpec::new("init-attack", attacker("sandbox-init-attack"));
    let e = t.backend.deploy(&spec).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PolicyViolation, "{e}");
    t.serves();
    let control = target(kind, SandboxConfig::off());
    let e = control.backend.deploy(&spec).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InitFailed, "{e}");
    assert!(e.to_string().contains("socket() worked in init"), "{e}");
}

/// Each network line on its own (seccomp off, which would stop `socket`
/// first): the empty network namespace alone, and Landlock's TCP rule
/// alone, each refuse a connection to the host's listener.
pub fn each_network_layer_alone_refuses_the_host(kind: BackendKind) {
    let (_listener, port) = host_listener();
    let only = |namespaces: bool, landlock: bool| SandboxConfig {
        namespaces,
        landlock,
        ..SandboxConfig::off()
    };
    let connect = format!("connect {port}");
    let t = target(kind, only(true, false));
    let out = t.attack(&connect, StartRequest::Auto).unwrap();
    assert_eq!(out, format!("ret=-{}", 101), "network namespace alone (ENETUNREACH)");
    let t = target(kind, only(false, true));
    let out = t.attack(&connect, StartRequest::Auto).unwrap();
    assert_eq!(out, format!("ret=-{}", 13), "Landlock alone (EACCES)");
}

//! Hostile tests: tenants never reach each other. A function with native
//! code execution (`tenant-attacker`, `sandbox-attacks`) goes after a
//! victim of another tenant (`tenant-victim`: an init() secret on its
//! heap, its inputs and outputs, a reply prefix in its rodata):
//!
//! * `language`: the attacker walks its own worker's memory (shared region,
//!   heaps, images) for the victim's input, output and secret, and tries to
//!   patch the victim's reply; with the victim in another tenant it finds
//!   nothing, because the victim runs in another worker process (under
//!   another uid). A same-tenant control run finds and patches all of it.
//! * `process`: the attacker reads `/proc/<victim>/mem`, calls
//!   `process_vm_readv`, `kill`, `tgkill` and `ptrace` on the victim's
//!   runner: a policy violation under the full sandbox; with seccomp and
//!   Landlock switched off, refused by the distinct uids alone (a
//!   same-tenant control shows the signals would otherwise be delivered).
//!
//! Every time, the victim's next results are correct.

use crate::common::attacker;
use crate::sandbox::{host_is_root, status_of};
use microfaas::{
    Backend, BackendKind, Config, ErrorKind, FunctionId, FunctionSpec, LanguageConfig, SandboxConfig, StartRequest,
    Tenant,
};
use std::time::Duration;

/// The victim's reply prefix (`tenant-victim`'s rodata).
const PREFIX: &[u8] = b"tenant-victim-reply-prefix-0123456789ab:";
/// What the victim's `init()` leaves on its heap.
const SECRET: &[u8] = b"tenant-victim-init-secret-7f3a9c";
/// The victim's input in every test.
const INPUT: &[u8] = b"victim-input-marker-5e21d0c4";

/// A needle as `tenant-attacker` takes it (each byte XOR 0x5a, in hex), so
/// that the attacker's own input never contains it.
fn masked(needle: &[u8]) -> String {
    needle.iter().map(|b| format!("{:02x}", b ^ 0x5a)).collect()
}

fn tenant(label: &str) -> Tenant {
    Tenant::new(label).expect("a valid tenant")
}

/// A backend with the victim deployed for one tenant and an attacker
/// (`tenant-attacker` or `sandbox-attacks`) for another (or the same).
struct Pair {
    backend: Box<dyn Backend>,
    victim: FunctionId,
    attacker: FunctionId,
}

/// The full sandbox but for protection keys (and the syscall-origin
/// filter that comes with them): the layer under test here is the process
/// between tenants, so the attacker's scans and patches must not be
/// stopped first by keys inside the worker (`pkeys.rs` tests those).
fn without_keys() -> SandboxConfig {
    SandboxConfig {
        pkeys: false,
        ..SandboxConfig::default()
    }
}

fn config(sandbox: SandboxConfig, workers: usize) -> Config {
    Config {
        sandbox,
        language: LanguageConfig {
            workers: Some(workers),
            hang_grace: Duration::from_millis(200),
            ..LanguageConfig::default()
        },
        ..Config::default()
    }
}

fn pair(kind: BackendKind, sandbox: SandboxConfig, fixture: &str, victim_tenant: &str, attacker_tenant: &str) -> Pair {
    let backend = microfaas::open(kind, config(sandbox, 1)).expect("backend");
    let budget = Duration::from_secs(30);
    let victim = backend
        .deploy(
            &FunctionSpec::new("victim", attacker("tenant-victim"))
                .with_budget(budget)
                .with_tenant(tenant(victim_tenant)),
        )
        .expect("deploying the victim");
    let attacker = backend
        .deploy(
            &FunctionSpec::new("attacker", attacker(fixture))
                .with_budget(budget)
                .with_tenant(tenant(attacker_tenant)),
        )
        .expect("deploying the attacker");
    Pair {
        backend,
        victim,
        attacker,
    }
}

impl Pair {
    fn attack(&self, input: &str) -> Result<String, microfaas::Error> {
        self.backend
            .invoke(&self.attacker, input.as_bytes(), StartRequest::Auto)
            .map(|done| String::from_utf8_lossy(&done.output).into_owned())
    }

    fn victim(&self, input: &[u8]) -> Vec<u8> {
        self.backend
            .invoke(&self.victim, input, StartRequest::Auto)
            .expect("the victim serves")
            .output
    }

    /// The victim's reply to [`INPUT`] and its secret are as they should be.
    fn victim_is_intact(&self) {
        assert_eq!(self.victim(INPUT), [PREFIX, INPUT].concat(), "the victim's reply");
        assert_eq!(self.victim(b"secret"), SECRET, "the victim's init() secret");
    }

    /// The victim's process (`pid=`), and where its secret lives, as
    /// `(pid, "ADDR LEN")`.
    fn victim_pid(&self) -> (u32, String) {
        let out = String::from_utf8(self.victim(b"pid")).unwrap();
        let field = |k: &str| {
            out.split(' ')
                .find_map(|f| f.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {out}"))
                .to_owned()
        };
        (
            field("pid=").parse().unwrap(),
            format!("{} {}", field("secret="), field("len=")),
        )
    }

    /// Where the victim's reply prefix is (in its own process).
    fn victim_prefix_at(&self) -> String {
        let out = String::from_utf8(self.victim(b"pid")).unwrap();
        out.split(' ')
            .find_map(|f| f.strip_prefix("prefix="))
            .unwrap_or_else(|| panic!("no prefix= in {out}"))
            .to_owned()
    }

    fn counter(&self, name: &str) -> u64 {
        self.backend
            .stats()
            .counter(name)
            .unwrap_or_else(|| panic!("no counter {name}"))
    }
}

/// `found=N pages=M` or `patched=N pages=M`: N, after checking the walk
/// searched something.
fn hits(out: &str) -> u64 {
    let mut it = out.split(' ');
    let n = it
        .next()
        .and_then(|f| f.split_once('='))
        .map(|(_, v)| v.parse().unwrap());
    let pages: u64 = it
        .next()
        .and_then(|f| f.strip_prefix("pages="))
        .map(|v| v.parse().unwrap())
        .unwrap_or(0);
    assert!(pages > 16, "the walk searched only {pages} pages: {out}");
    n.unwrap_or_else(|| panic!("unexpected reply {out}"))
}

fn uid_of(pid: u64) -> u32 {
    let status = status_of(pid);
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Uid of {pid}: {status}"))
}

#[test]
fn language_tenants_get_their_own_workers_under_their_own_uids() {
    let p = pair(
        BackendKind::Language,
        SandboxConfig::default(),
        "tenant-victim",
        "lang-own-a",
        "lang-own-b",
    );
    let pid_a = p.counter("tenant.lang-own-a.worker0_pid");
    let pid_b = p.counter("tenant.lang-own-b.worker0_pid");
    assert!(pid_a != 0 && pid_b != 0 && pid_a != pid_b, "{pid_a} {pid_b}");
    let (uid_a, uid_b) = (p.counter("tenant.lang-own-a.uid"), p.counter("tenant.lang-own-b.uid"));
    assert_ne!(uid_a, uid_b);
    let base = u64::from(SandboxConfig::default().uid);
    let range = base..base + u64::from(SandboxConfig::default().tenant_uids);
    assert!(range.contains(&uid_a) && range.contains(&uid_b), "{uid_a} {uid_b}");
    // The victim reports the worker it runs in: its own tenant's.
    assert_eq!(u64::from(p.victim_pid().0), pid_a);
    if host_is_root() {
        assert_eq!(u64::from(uid_of(pid_a)), uid_a);
        assert_eq!(u64::from(uid_of(pid_b)), uid_b);
    }
    p.victim_is_intact();
}

#[test]
fn language_another_tenant_finds_nothing_of_the_victim_and_cannot_patch_it() {
    let p = pair(
        BackendKind::Language,
        without_keys(),
        "tenant-attacker",
        "lang-victim",
        "lang-attacker",
    );
    // The attacker is even told where the victim's prefix lies (in the
    // victim's process): in its own that address holds nothing of it.
    let at = p.victim_prefix_at();
    // Last, so that the victim's input and reply are what it last handled.
    p.victim_is_intact();
    for (what, needle) in [("input", INPUT), ("secret", SECRET), ("reply prefix", PREFIX)] {
        let out = p
            .attack(&format!("scan {} {at}", masked(needle)))
            .expect("the scan itself is harmless");
        eprintln!("across tenants, scan for the victim's {what}: {out}");
        assert_eq!(hits(&out), 0, "the attacker found the victim's {what}: {out}");
    }
    let out = p
        .attack(&format!("patch {} {} {at}", masked(PREFIX), masked(&[b'X'; 40])))
        .expect("the patch attempt");
    assert_eq!(hits(&out), 0, "{out}");
    p.victim_is_intact();
}

#[test]
fn language_control_in_one_tenant_the_attacker_reads_and_patches_the_victim() {
    // The same attacks with both functions in one tenant (one worker): the
    // victim's data is in the attacker's process, so they succeed. This is
    // what separate tenants prevent, and proves the test above can fail.
    let p = pair(
        BackendKind::Language,
        without_keys(),
        "tenant-attacker",
        "lang-shared",
        "lang-shared",
    );
    // Told where the prefix is, as in the test above: where a worker maps a
    // function's image need not be next to anything the attacker can point
    // at (an attacker with native code would read it from the worker's own
    // tables), and the walk from its anchors stops at long unreadable gaps.
    let at = p.victim_prefix_at();
    p.victim_is_intact();
    for (what, needle) in [("input", INPUT), ("secret", SECRET), ("reply prefix", PREFIX)] {
        let out = p.attack(&format!("scan {} {at}", masked(needle))).expect("the scan");
        eprintln!("one tenant, scan for the victim's {what}: {out}");
        assert!(hits(&out) > 0, "one tenant: the {what} should be found: {out}");
    }
    let out = p
        .attack(&format!("patch {} {} {at}", masked(PREFIX), masked(&[b'X'; 40])))
        .expect("the patch");
    assert!(hits(&out) > 0, "{out}");
    assert_eq!(
        p.victim(INPUT),
        [&[b'X'; 40][..], INPUT].concat(),
        "in one worker the attacker rewrites the victim's reply"
    );
}

#[test]
fn language_another_tenant_cannot_signal_or_read_the_victims_worker() {
    let p = pair(
        BackendKind::Language,
        SandboxConfig::default(),
        "sandbox-attacks",
        "lang-sig-victim",
        "lang-sig-attacker",
    );
    let (pid, secret) = p.victim_pid();
    for attack in [
        format!("kill {pid}"),
        format!("tgkill {pid}"),
        format!("vm-read {pid} {secret}"),
        format!("proc-mem {pid} {secret}"),
        format!("ptrace {pid}"),
    ] {
        match p.attack(&attack) {
            Err(e) => assert_eq!(e.kind(), ErrorKind::PolicyViolation, "`{attack}`: {e}"),
            Ok(out) => panic!("`{attack}` was not stopped: {out}"),
        }
        assert_eq!(p.victim_pid().0, pid, "the victim's worker lives on");
        p.victim_is_intact();
    }
}

#[test]
fn language_without_seccomp_and_landlock_distinct_uids_still_refuse_signals() {
    let layers_off = SandboxConfig {
        seccomp: false,
        landlock: false,
        ..SandboxConfig::default()
    };
    let p = pair(
        BackendKind::Language,
        layers_off,
        "sandbox-attacks",
        "lang-uid-victim",
        "lang-uid-attacker",
    );
    let (pid, secret) = p.victim_pid();
    if host_is_root() {
        // Signal 0: the kernel checks permission only. EPERM = -1.
        assert_eq!(
            p.attack(&format!("kill {pid}")).unwrap(),
            "ret=-1",
            "kill across tenants"
        );
        assert_eq!(
            p.attack(&format!("tgkill {pid}")).unwrap(),
            "ret=-1",
            "tgkill across tenants"
        );
        assert_eq!(
            p.attack(&format!("ptrace {pid}")).unwrap(),
            "ret=-1",
            "ptrace across tenants"
        );
    } else {
        eprintln!("not root: workers share the host's uid, no uid-only claim to test");
    }
    for attack in [format!("vm-read {pid} {secret}"), format!("proc-mem {pid} {secret}")] {
        let out = p.attack(&attack).unwrap();
        assert!(out.starts_with("ret=-"), "`{attack}` read the victim: {out}");
    }
    assert_eq!(p.victim_pid().0, pid);
    p.victim_is_intact();
}

#[test]
fn process_another_tenant_cannot_read_or_signal_the_victims_runner() {
    let p = pair(
        BackendKind::Process,
        SandboxConfig::default(),
        "sandbox-attacks",
        "proc-victim",
        "proc-attacker",
    );
    let (pid, secret) = p.victim_pid();
    for attack in [
        format!("proc-mem {pid} {secret}"),
        format!("vm-read {pid} {secret}"),
        format!("kill {pid}"),
        format!("tgkill {pid}"),
        format!("ptrace {pid}"),
    ] {
        match p.attack(&attack) {
            Err(e) => assert_eq!(e.kind(), ErrorKind::PolicyViolation, "`{attack}`: {e}"),
            Ok(out) => panic!("`{attack}` was not stopped: {out}"),
        }
        assert_eq!(p.victim_pid().0, pid, "the victim's warm runner lives on");
        p.victim_is_intact();
    }
}

#[test]
fn process_runners_of_tenants_run_under_distinct_uids() {
    let backend = microfaas::open(BackendKind::Process, config(SandboxConfig::default(), 1)).unwrap();
    let deploy = |name: &str, t: &str| {
        backend
            .deploy(&FunctionSpec::new(name, attacker("tenant-victim")).with_tenant(tenant(t)))
            .unwrap()
    };
    let (a, b, a2) = (
        deploy("va", "proc-uid-a"),
        deploy("vb", "proc-uid-b"),
        deploy("va2", "proc-uid-a"),
    );
    let pid = |id: &FunctionId| -> u64 {
        let out = backend.invoke(id, b"pid", StartRequest::Auto).unwrap().output;
        let out = String::from_utf8(out).unwrap();
        out.split(' ')
            .next()
            .unwrap()
            .strip_prefix("pid=")
            .unwrap()
            .parse()
            .unwrap()
    };
    let (pa, pb, pa2) = (pid(&a), pid(&b), pid(&a2));
    assert!(pa != pb && pa != pa2, "a runner per function");
    if host_is_root() {
        assert_ne!(uid_of(pa), uid_of(pb), "tenants under distinct uids");
        assert_eq!(uid_of(pa), uid_of(pa2), "one tenant, one uid");
    }
}

#[test]
fn process_without_seccomp_and_landlock_distinct_uids_still_hold() {
    let layers_off = SandboxConfig {
        seccomp: false,
        landlock: false,
        ..SandboxConfig::default()
    };
    let across = pair(
        BackendKind::Process,
        layers_off,
        "sandbox-attacks",
        "proc-uid-victim",
        "proc-uid-attacker",
    );
    let same = pair(
        BackendKind::Process,
        layers_off,
        "sandbox-attacks",
        "proc-uid-shared",
        "proc-uid-shared",
    );
    let (pid, secret) = across.victim_pid();
    if host_is_root() {
        for attack in [format!("kill {pid}"), format!("tgkill {pid}"), format!("ptrace {pid}")] {
            assert_eq!(across.attack(&attack).unwrap(), "ret=-1", "`{attack}` across tenants");
        }
        // Control: the same signal between two runners of one tenant is
        // permitted (signal 0 delivers nothing), so it is the uid that
        // refused it above.
        let (same_pid, _) = same.victim_pid();
        for attack in [format!("kill {same_pid}"), format!("tgkill {same_pid}")] {
            assert_eq!(same.attack(&attack).unwrap(), "ret=0", "`{attack}` in one tenant");
        }
        assert_eq!(same.victim_pid().0, same_pid);
    } else {
        eprintln!("not root: runners share the host's uid (each in its own user namespace)");
    }
    // Memory: refused across tenants by the uid and, even within one
    // tenant, by every runner being not dumpable.
    for attack in [format!("proc-mem {pid} {secret}"), format!("vm-read {pid} {secret}")] {
        let out = across.attack(&attack).unwrap();
        assert!(out.starts_with("ret=-"), "`{attack}` read the victim: {out}");
    }
    assert_eq!(across.victim_pid().0, pid);
    across.victim_is_intact();
    same.victim_is_intact();
}

#[test]
fn language_idle_tenants_are_stopped_least_recently_used_and_restart_correct() {
    let mut cfg = config(SandboxConfig::default(), 1);
    cfg.language.max_workers = Some(2);
    let backend = microfaas::open(BackendKind::Language, cfg).unwrap();
    let counter = |name: &str| backend.stats().counter(name).unwrap_or(0);
    let deploy = |name: &str, t: &str| {
        backend
            .deploy(&FunctionSpec::new(name, attacker("tenant-victim")).with_tenant(tenant(t)))
            .unwrap()
    };
    let reply_ok = |id: &FunctionId| {
        let out = backend.invoke(id, INPUT, StartRequest::Auto).unwrap().output;
        assert_eq!(out, [PREFIX, INPUT].concat());
        let out = backend.invoke(id, b"secret", StartRequest::Auto).unwrap().output;
        assert_eq!(out, SECRET, "init() ran in the (re)started worker");
    };
    // The default tenant's worker started with the backend; a and b fill
    // the cap of 2, stopping the idle default tenant.
    let a = deploy("lru-va", "lru-a");
    let b = deploy("lru-vb", "lru-b");
    assert_eq!(counter("workers"), 2);
    assert_eq!(counter("tenant.default.worker0_pid"), 0, "default stopped");
    assert_eq!(counter("tenant_evictions"), 1);
    reply_ok(&a);
    let pid_a = counter("tenant.lru-a.worker0_pid");
    // c needs room: b was used least recently.
    let c = deploy("lru-vc", "lru-c");
    assert_eq!(counter("tenant.lru-b.worker0_pid"), 0, "b stopped");
    assert_eq!(counter("tenant.lru-a.worker0_pid"), pid_a, "a kept");
    assert_eq!(counter("workers"), 2);
    reply_ok(&c);
    // b's next request restarts its worker (stopping a, now the oldest):
    // correct, just cold.
    reply_ok(&b);
    assert_ne!(counter("tenant.lru-b.worker0_pid"), 0);
    assert_eq!(counter("tenant.lru-a.worker0_pid"), 0, "a stopped");
    assert_eq!(counter("tenant_evictions"), 3);
    reply_ok(&a);
    assert!(counter("workers") <= 2);
    assert_eq!(counter("respawns"), 0, "stops are not deaths");
}

#[test]
fn a_tenant_past_the_uid_range_is_refused() {
    for kind in [BackendKind::Process, BackendKind::Language] {
        let one = SandboxConfig {
            tenant_uids: 1,
            ..SandboxConfig::default()
        };
        let backend = microfaas::open(kind, config(one, 1)).unwrap();
        let refused = backend
            .deploy(&FunctionSpec::new("v", attacker("tenant-victim")).with_tenant(tenant("past-the-range")))
            .expect_err("only the default tenant fits a range of one uid");
        assert_eq!(refused.kind(), ErrorKind::BackendUnavailable, "{kind}: {refused}");
        assert!(refused.to_string().contains("no uid left"), "{kind}: {refused}");
        // The default tenant still deploys and serves.
        let ok = backend
            .deploy(&FunctionSpec::new("v", attacker("tenant-victim")))
            .unwrap();
        assert_eq!(
            backend.invoke(&ok, INPUT, StartRequest::Auto).unwrap().output,
            [PREFIX, INPUT].concat()
        );
    }
}

#[test]
fn cli_invoke_takes_a_tenant_and_refuses_a_bad_label() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_microfaas"))
            .args(args)
            .output()
            .expect("running microfaas")
    };
    for backend in ["process", "language"] {
        let out = run(&[
            "invoke",
            "--backend",
            backend,
            "echo",
            "--input",
            "hi",
            "--tenant",
            "cli-t",
            "--json",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (v["tenant"].as_str(), v["output"].as_str()),
            (Some("cli-t"), Some("hi"))
        );
    }
    for bad in ["Upper", "a/b", "", &"x".repeat(33)] {
        let out = run(&["invoke", "--backend", "process", "echo", "--tenant", bad]);
        assert_eq!(out.status.code(), Some(2), "--tenant {bad:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("invalid tenant"),
            "{bad:?}"
        );
    }
}

#[test]
fn language_a_new_tenant_waits_for_room_and_is_refused_while_every_worker_is_busy() {
    let mut cfg = config(SandboxConfig::default(), 1);
    cfg.language.max_workers = Some(1);
    cfg.language.start_timeout = Duration::from_secs(2);
    let backend = std::sync::Arc::new(microfaas::open(BackendKind::Language, cfg).unwrap());
    let spin = backend
        .deploy(
            &FunctionSpec::new("cap-spin", microfaas::builtin("spin").unwrap())
                .with_budget(Duration::from_secs(6))
                .with_tenant(tenant("cap-busy")),
        )
        .unwrap();
    let busy = {
        let backend = std::sync::Arc::clone(&backend);
        std::thread::spawn(move || backend.invoke(&spin, b"", StartRequest::Auto))
    };
    // Wait until the spin runs: its worker has burnt 0.2 s of CPU.
    let pid = backend.stats().counter("tenant.cap-busy.worker0_pid").unwrap();
    let utime = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        after_comm
            .split_whitespace()
            .nth(11)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (before, since) = (utime(), std::time::Instant::now());
    while utime() < before + 20 {
        assert!(since.elapsed() < Duration::from_secs(5), "the spin never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    let echo = || FunctionSpec::new("cap-echo", microfaas::builtin("echo").unwrap()).with_tenant(tenant("cap-other"));
    let refused = backend
        .deploy(&echo())
        .expect_err("the only worker the cap allows is busy");
    assert_eq!(refused.kind(), ErrorKind::BackendUnavailable, "{refused}");
    assert!(refused.to_string().contains("no room"), "{refused}");
    let spun = busy.join().unwrap().expect_err("spin never returns");
    assert_eq!(spun.kind(), ErrorKind::BudgetExceeded, "{spun}");
    // Now idle, the busy tenant is stopped for the new one.
    let id = backend.deploy(&echo()).unwrap();
    assert_eq!(
        backend.invoke(&id, b"room", StartRequest::Auto).unwrap().output,
        b"room"
    );
    assert_eq!(backend.stats().counter("tenant.cap-busy.worker0_pid"), Some(0));
}

#[test]
fn language_a_tenant_that_hangs_its_worker_loses_only_its_own() {
    let p = pair(
        BackendKind::Language,
        SandboxConfig::default(),
        "tenant-attacker",
        "resp-victim",
        "resp-attacker",
    );
    let victim_pid = p.victim_pid().0;
    let attacker_pid = p.counter("tenant.resp-attacker.worker0_pid");
    // The attacker's own budget is short; blocking the preemption signal
    // leaves the watchdog only the kill.
    let hang = p
        .backend
        .deploy(
            &FunctionSpec::new("hang", attacker("tenant-attacker"))
                .with_budget(Duration::from_millis(200))
                .with_tenant(tenant("resp-attacker")),
        )
        .unwrap();
    let lost = p
        .backend
        .invoke(&hang, b"hang", StartRequest::Auto)
        .expect_err("a hang is stopped");
    assert_eq!(lost.kind(), ErrorKind::WorkerLost, "{lost}");
    // The attacker's worker is replaced; the victim's is untouched.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = p.counter("tenant.resp-attacker.worker0_pid");
        if now != 0 && now != attacker_pid {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no respawn of the attacker's worker"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(p.counter("respawns"), 1);
    assert_eq!(p.victim_pid().0, victim_pid, "the victim's worker lives on");
    p.victim_is_intact();
    assert_eq!(
        p.attack("ok").unwrap(),
        "harmless",
        "the attacker's tenant serves again"
    );
}

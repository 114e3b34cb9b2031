//! Hostile tests: memory protection keys inside one language worker. Two
//! functions of the same host share one worker (one worker configured); the
//! attacker (`pkeys-attacks`, native code) reads and writes the victim's
//! heap secret, image data and code, the worker's shared region (rings,
//! slot table, in-flight record, I/O slots) and its glibc heap, and tries
//! the system calls that would undo the keys. Each attempt is a typed
//! policy violation, the worker survives, and the victim's next results are
//! right. Control runs with keys off show the same reads succeed.

use crate::common::attacker;
use crate::sandbox::assert_sandboxed;
use microfaas::{
    Backend, BackendKind, Config, ErrorKind, FunctionId, FunctionSpec, LanguageConfig, SandboxConfig, StartPath,
    StartRequest,
};
use std::time::Duration;

struct Worker {
    backend: Box<dyn Backend>,
    attacker: FunctionId,
    victim: FunctionId,
}

fn worker(pkeys: bool) -> Worker {
    let config = Config {
        sandbox: SandboxConfig {
            pkeys,
            ..SandboxConfig::default()
        },
        language: LanguageConfig {
            workers: Some(1),
            ..LanguageConfig::default()
        },
        ..Config::default()
    };
    let backend = microfaas::open(BackendKind::Language, config).expect("language backend");
    let budget = Duration::from_secs(5);
    let victim = backend
        .deploy(&FunctionSpec::new("victim", attacker("pkeys-victim")).with_budget(budget))
        .expect("deploying the victim");
    let attacker = backend
        .deploy(&FunctionSpec::new("attacker", attacker("pkeys-attacks")).with_budget(budget))
        .expect("deploying the attacker");
    Worker {
        backend,
        attacker,
        victim,
    }
}

impl Worker {
    fn attack(&self, input: &str) -> Result<Vec<u8>, microfaas::Error> {
        self.attack_with(input, StartRequest::Auto)
    }

    fn attack_with(&self, input: &str, start: StartRequest) -> Result<Vec<u8>, microfaas::Error> {
        self.backend
            .invoke(&self.attacker, input.as_bytes(), start)
            .map(|d| d.output)
    }

    fn victim(&self, input: &[u8]) -> Vec<u8> {
        self.backend
            .invoke(&self.victim, input, StartRequest::Auto)
            .expect("the victim")
            .output
    }

    /// `(heap, data, code)` addresses of the victim's secret, a static of
    /// its image and its entry code.
    fn victim_addresses(&self) -> (String, String, String) {
        let out = String::from_utf8(self.victim(b"where")).unwrap();
        let field = |name: &str| {
            out.split(' ')
                .find_map(|f| f.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {out}"))
                .to_owned()
        };
        (field("heap="), field("data="), field("code="))
    }

    fn pid(&self) -> u64 {
        self.backend.stats().counter("worker0_pid").expect("worker pid")
    }

    /// Start addresses of the worker's shared region and glibc heap, from
    /// the host's view of its mappings.
    fn runtime_addresses(&self) -> Vec<(String, String)> {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid())).unwrap();
        let mut out = Vec::new();
        for line in maps.lines() {
            let start = line.split('-').next().unwrap().to_owned();
            if line.contains("memfd:microfaas-lang-") {
                out.push(("shared region".to_owned(), start));
            } else if line.ends_with("[heap]") {
                out.push(("glibc heap".to_owned(), start));
            }
        }
        assert!(out.iter().any(|(w, _)| w == "shared region"), "{maps}");
        out
    }

    /// `input` must fail as a policy violation, then the attacker serves its
    /// harmless input and the victim its secret.
    fn must_violate(&self, input: &str, says: &str) {
        for start in [StartRequest::Auto, StartRequest::Force(StartPath::Cold)] {
            match self.attack_with(input, start) {
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::PolicyViolation, "`{input}` ({start:?}): {e}");
                    assert!(e.to_string().contains(says), "`{input}`: {e}");
                }
                Ok(out) => panic!(
                    "`{input}` ({start:?}) was not stopped: {:?}",
                    String::from_utf8_lossy(&out)
                ),
            }
            assert_eq!(self.attack("ok").unwrap(), b"harmless");
            assert_eq!(self.victim(b"secret"), b"victim-secret-7781");
            assert_eq!(self.victim(b"echo me"), b"echo me");
        }
    }
}

fn host_has_pkeys() -> bool {
    lang_isolation::runtime::pkeys::cpu_has_ospke()
}

#[test]
fn pkeys_state_is_in_the_stats() {
    let w = worker(true);
    let stats = w.backend.stats();
    eprintln!(
        "pkeys_state={:?} pkeys_keys={:?} (0 disabled, 1 enabled, 2 unavailable)",
        stats.counter("pkeys_state"),
        stats.counter("pkeys_keys")
    );
    if host_has_pkeys() {
        assert_eq!(stats.counter("pkeys_state"), Some(1), "{stats:?}");
        // One of the kernel's 15 keys carries the runtime's read-only data.
        assert_eq!(stats.counter("pkeys_keys"), Some(14), "{stats:?}");
    } else {
        assert_eq!(stats.counter("pkeys_state"), Some(2), "{stats:?}");
    }
    let off = worker(false);
    assert_eq!(off.backend.stats().counter("pkeys_state"), Some(0));
}

/// Without PKU (this project's machine) the backend must say so; the
/// attacks are then not stopped by keys (the control below shows what
/// they do).
fn unavailable_is_reported(w: &Worker) -> bool {
    if host_has_pkeys() {
        return false;
    }
    assert_eq!(w.backend.stats().counter("pkeys_state"), Some(2));
    eprintln!("this host has no PKU: the key attacks are not run");
    true
}

#[test]
fn pkeys_another_functions_memory_is_out_of_reach() {
    if unavailable_is_reported(&worker(true)) {
        return;
    }
    let w = worker(true);
    let pid = w.pid();
    let (heap, data, code) = w.victim_addresses();
    for addr in [&heap, &data, &code] {
        w.must_violate(&format!("read {addr}"), "memory protection key violation");
        w.must_violate(&format!("write {addr}"), "memory protection key violation");
    }
    assert_eq!(w.pid(), pid, "the worker survived");
    assert_eq!(w.backend.stats().counter("respawns"), Some(0));
    assert_sandboxed(pid);
}

#[test]
fn pkeys_the_runtimes_state_is_out_of_reach() {
    if unavailable_is_reported(&worker(true)) {
        return;
    }
    let w = worker(true);
    let pid = w.pid();
    for (what, addr) in w.runtime_addresses() {
        w.must_violate(&format!("read {addr}"), "(key 0)");
        w.must_violate(&format!("write {addr}"), "(key 0)");
        eprintln!("{what} at {addr}: refused");
    }
    assert_eq!(w.pid(), pid, "the worker survived");
}

/// The syscall-origin filter does not need PKU: it is on wherever keys and
/// seccomp are configured.
#[test]
fn pkeys_system_calls_that_would_undo_the_keys_are_refused() {
    let w = worker(true);
    let (heap, _, _) = w.victim_addresses();
    // A raw syscall from function code: refused by the origin filter.
    w.must_violate(&format!("pkey-mprotect {heap}"), "system call 329");
    w.must_violate("sigaction", "system call 13");
    w.must_violate(&format!("munmap {heap}"), "system call 11");
}

#[test]
fn pkeys_control_without_keys_the_same_attacks_succeed() {
    let w = worker(false);
    let (heap, data, _) = w.victim_addresses();
    assert_eq!(w.attack(&format!("read {heap}")).unwrap(), b"victim-secret-77");
    assert_eq!(w.attack(&format!("read {data}")).unwrap(), b"victim-data-1234");
    let shm = w
        .runtime_addresses()
        .into_iter()
        .find(|(w, _)| w == "shared region")
        .unwrap()
        .1;
    // The region's header starts with its magic: readable without keys.
    let header = w.attack(&format!("read {shm}")).unwrap();
    assert_eq!(header.len(), 16);
    assert_ne!(header[..8], [0; 8], "the shared region's magic");
    // And the victim can be corrupted.
    w.attack(&format!("write {heap}")).unwrap();
    assert_ne!(w.victim(b"secret"), b"victim-secret-7781");
    // The raw syscall door without the origin filter: unmapping works.
    let out = String::from_utf8(w.attack(&format!("munmap {heap}")).unwrap()).unwrap();
    assert_eq!(out, "ret=0");
    let out = String::from_utf8(w.attack("sigaction").unwrap()).unwrap();
    assert_eq!(out, "ret=0", "its own SIGSEGV handler");
}

#[test]
fn pkeys_without_keys_no_fd_maps_writable_and_executable() {
    // The sandbox suite's exec-map-fds probe, which the origin filter now
    // stops outright on a worker with keys: with keys off it still holds.
    let t = crate::sandbox::target(
        BackendKind::Language,
        SandboxConfig {
            pkeys: false,
            ..SandboxConfig::default()
        },
    );
    for start in [StartRequest::Auto, StartRequest::Force(StartPath::Cold)] {
        let out = t.attack("exec-map-fds", start).unwrap();
        assert!(out.ends_with(" also-writable=0"), "{start:?}: {out}");
    }
}

#[test]
fn pkeys_function_code_with_wrpkru_is_refused_by_the_build() {
    let mut opts = microfaas_builder::BuildOptions::new(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile-fixtures"),
    );
    opts.allow_unsafe = true;
    let e = microfaas_builder::build(&crate::common::fixture_dir("pkeys-wrpkru"), &opts).unwrap_err();
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    assert!(
        text.contains("encode WRPKRU") && text.contains("file offset 0x"),
        "{text}"
    );
}

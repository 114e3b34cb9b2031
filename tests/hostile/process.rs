//! Hostile tests: process. A function with native code execution inside a
//! process runner attacks the host and other runners; the runner's sandbox
//! (entered before `init()`) kills it on any forbidden system call, which
//! the host reports as a policy violation, and the next request is served
//! by a fresh runner.

use crate::sandbox::{self, Target, assert_sandboxed, target};
use microfaas::{BackendKind, ErrorKind, SandboxConfig, StartRequest};

/// Pids of this host's runner processes that mapped the artifact memfd named
/// after the path `what`.
fn runners(what: &str) -> Vec<u64> {
    let me = sandbox::host_pid().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        let mapped = maps
            .lines()
            .any(|l| l.contains("memfd:microfaas-artifact:") && l.contains(what));
        if ppid == Some(me.as_str()) && cmdline.contains("microfaas-runner") && mapped {
            pids.push(pid);
        }
    }
    pids
}

/// The start of the first mapping of `pid`, and 16 bytes there.
fn some_memory_of(pid: u64) -> (u64, Vec<u8>) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let start = maps.split('-').next().unwrap();
    let addr = u64::from_str_radix(start, 16).unwrap();
    let mut buf = vec![0u8; 16];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(format!("/proc/{pid}/mem"))
        .unwrap()
        .read_exact_at(&mut buf, addr)
        .unwrap();
    (addr, buf)
}

fn victim(t: &Target) -> u64 {
    t.serves();
    let pids = runners(&t.echo_path.display().to_string());
    assert_eq!(pids.len(), 1, "one warm echo runner: {pids:?}");
    pids[0]
}

#[test]
fn process_every_attack_is_a_policy_violation() {
    sandbox::every_attack_is_a_policy_violation(BackendKind::Process);
}

#[test]
fn process_control_attacks_succeed_without_the_sandbox() {
    sandbox::control_attacks_succeed_without_the_sandbox(BackendKind::Process);
}

#[test]
fn process_without_seccomp_the_other_layers_still_hold() {
    sandbox::without_seccomp_the_other_layers_still_hold(BackendKind::Process);
}

#[test]
fn process_runners_run_sandboxed() {
    let t = target(BackendKind::Process, SandboxConfig::default());
    let pid = victim(&t);
    assert_sandboxed(pid);
}

#[test]
fn process_runner_cannot_read_another_runner() {
    let t = target(BackendKind::Process, SandboxConfig::default());
    let pid = victim(&t);
    let (addr, _) = some_memory_of(pid);
    for attack in ["proc-mem", "vm-read"] {
        t.must_violate(&format!("{attack} {pid} {addr:#x} 16"));
    }
    assert_eq!(victim(&t), pid, "the victim was not disturbed");
}

#[test]
fn process_runner_cannot_read_another_runner_without_seccomp() {
    let t = target(
        BackendKind::Process,
        SandboxConfig {
            seccomp: false,
            ..SandboxConfig::default()
        },
    );
    let pid = victim(&t);
    let (addr, _) = some_memory_of(pid);
    for attack in ["proc-mem", "vm-read"] {
        let out = t
            .attack(&format!("{attack} {pid} {addr:#x} 16"), StartRequest::Auto)
            .unwrap();
        assert!(out.starts_with("ret=-"), "{attack} of another runner: {out}");
    }
}

#[test]
fn process_control_runner_reads_another_runner_without_the_sandbox() {
    let t = target(BackendKind::Process, SandboxConfig::off());
    let pid = victim(&t);
    let (addr, bytes) = some_memory_of(pid);
    for attack in ["proc-mem", "vm-read"] {
        let out = t
            .attack(&format!("{attack} {pid} {addr:#x} 16"), StartRequest::Auto)
            .unwrap();
        assert!(out.starts_with("ret=16 "), "{attack}: {out}");
        assert!(
            out.as_bytes().ends_with(&bytes),
            "{attack} read the victim's bytes: {out}"
        );
    }
}

#[test]
fn process_a_violation_kills_only_the_attacker() {
    let t = target(BackendKind::Process, SandboxConfig::default());
    let victim_pid = victim(&t);
    let e = t.attack("socket", StartRequest::Auto).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PolicyViolation, "{e}");
    assert!(
        e.to_string().contains("SIGSYS") || e.to_string().contains("signal 31"),
        "{e}"
    );
    t.serves();
    assert_eq!(victim(&t), victim_pid);
}

#[test]
fn process_an_attack_from_init_is_a_policy_violation() {
    sandbox::an_attack_from_init_is_a_policy_violation(BackendKind::Process);
}

#[test]
fn process_each_network_layer_alone_refuses_the_host() {
    sandbox::each_network_layer_alone_refuses_the_host(BackendKind::Process);
}

//! Hostile tests: language. A function with native code execution inside a
//! language worker attacks the host; the worker's sandbox (entered before
//! any function is loaded) stops every attack with a policy violation and
//! the worker serves on.

use crate::sandbox::{self, assert_sandboxed, target};
use microfaas::{BackendKind, SandboxConfig};

fn worker_pid(t: &sandbox::Target) -> u64 {
    t.backend.stats().counter("worker0_pid").expect("worker pid")
}

#[test]
fn language_every_attack_is_a_policy_violation() {
    sandbox::every_attack_is_a_policy_violation(BackendKind::Language);
}

#[test]
fn language_control_attacks_succeed_without_the_sandbox() {
    sandbox::control_attacks_succeed_without_the_sandbox(BackendKind::Language);
}

#[test]
fn language_without_seccomp_the_other_layers_still_hold() {
    sandbox::without_seccomp_the_other_layers_still_hold(BackendKind::Language);
}

#[test]
fn language_worker_runs_sandboxed_and_survives_violations() {
    let t = target(BackendKind::Language, SandboxConfig::default());
    let pid = worker_pid(&t);
    assert_sandboxed(pid);
    t.must_violate("socket");
    t.must_violate(&format!("tgkill {}", sandbox::host_pid()));
    // The attacker had native code execution in the worker, but a worker
    // holds one host's functions and its sandbox, not its integrity, is
    // the boundary: it serves on (the instance is reloaded).
    assert_eq!(worker_pid(&t), pid, "the worker survived");
    assert_eq!(t.backend.stats().counter("respawns"), Some(0));
}

#[test]
fn language_an_attack_from_init_is_a_policy_violation() {
    sandbox::an_attack_from_init_is_a_policy_violation(BackendKind::Language);
}

#[test]
fn language_each_network_layer_alone_refuses_the_host() {
    sandbox::each_network_layer_alone_refuses_the_host(BackendKind::Language);
}

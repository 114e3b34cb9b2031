//! The `vm` backend against a hostile VMM host process, from the outside.
//!
//! A guest that escapes its VM speaks for its host process. Each test here
//! points `vm.host_binary` at a symlink to the fixture
//! `microfaas-vmhost-hostile` (see its doc) named after one attack: the
//! first host process of the backend runs the real host behind a relay
//! that, once, answers the control socket with garbage, the wrong kind of
//! reply, twice, never, or exits; or writes garbage or forged reports into
//! slot control blocks, forged or flickering replies into mailboxes and
//! windows, reports into slots that are not in flight, or swallows a run.
//! Each attack must end in a typed error for the request it hit (or for
//! the instance it targeted), never a panic or a hang, never a second
//! answer; afterwards the backend serves correctly (a fresh host process
//! replaces a condemned one). A process that exits before it answers a
//! restore has that restore asked of a fresh process instead.

mod vm_common;

use microfaas::{Backend, ErrorKind, FunctionId, FunctionSpec, StartRequest};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn fixture() -> PathBuf {
    PathBuf::from(env!("MICROFAAS_VMHOST_BIN")).with_file_name("microfaas-vmhost-hostile")
}

/// A backend whose host processes are the fixture in `mode` (the dir
/// holds the symlink and the fixture's `attacked` marker).
fn attacked(mode: &str) -> Option<(Box<dyn Backend>, tempfile::TempDir)> {
    let dir = tempfile::Builder::new().prefix("microfaas-hostile").tempdir().unwrap();
    let link = dir.path().join(mode);
    std::os::unix::fs::symlink(fixture(), &link).unwrap();
    let mut config = vm_common::config();
    config.vm.host_binary = Some(link);
    config.vm.host_reply_timeout_ms = Some(3000);
    config.vm.idle_per_function = Some(4);
    let backend = vm_common::open_vm(config)?;
    Some((backend, dir))
}

fn deploy(b: &dyn Backend, name: &str, budget: Duration) -> FunctionId {
    b.deploy(&FunctionSpec::new(name, microfaas::builtin(name).unwrap()).with_budget(budget))
        .unwrap_or_else(|e| panic!("deploying {name}: {e}"))
}

/// The first host process was the fixture in attack mode.
fn hostile_spawned(dir: &tempfile::TempDir) -> bool {
    dir.path().join("attacked").exists()
}

/// The fixture carried its attack out.
fn fired(dir: &tempfile::TempDir) -> bool {
    dir.path().join("fired").exists()
}

/// `n` requests served correctly, each answered once with its own input.
fn serves(b: &dyn Backend, id: &FunctionId, n: usize, tag: &str) {
    for i in 0..n {
        let input = format!("{tag} {i}");
        let r = b
            .invoke(id, input.as_bytes(), StartRequest::Auto)
            .unwrap_or_else(|e| panic!("{tag}: request {i} after the attack: {e}"));
        assert_eq!(r.output, input.as_bytes(), "{tag}: request {i}");
    }
}

fn spawned(b: &dyn Backend) -> u64 {
    b.stats().counter("vm_host_processes_spawned").unwrap_or(0)
}

/// Waits (bounded) until the backend has spawned more than `n` host
/// processes: the condemned one was replaced.
fn replaced(b: &dyn Backend, id: &FunctionId, n: u64) -> bool {
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        if spawned(b) > n {
            return true;
        }
        // A request may be what needs a new host process.
        let _ = b.invoke(id, b"probe", StartRequest::Auto);
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A backend whose first host process is the fixture in `mode`, `echo`
/// deployed and served twice there (its first restore), nothing attacked
/// yet.
fn before_a_control_attack(mode: &str) -> Option<(Box<dyn Backend>, tempfile::TempDir, FunctionId)> {
    let (backend, dir) = attacked(mode)?;
    let echo = deploy(backend.as_ref(), "echo", Duration::from_secs(5));
    serves(backend.as_ref(), &echo, 2, mode);
    assert!(hostile_spawned(&dir), "{mode}: the first host process is the fixture");
    assert_eq!(spawned(backend.as_ref()), 1, "{mode}");
    Some((backend, dir, echo))
}

/// A control attack on the second restore of the first host process (a
/// prestart): the prestart fails with a typed error, the process is
/// condemned (or retired) and replaced, and the function serves.
fn control_attack(mode: &str, kinds: &[ErrorKind], condemned: bool) {
    let Some((backend, dir, echo)) = before_a_control_attack(mode) else {
        return;
    };
    let before = 1;
    // Restores #2 and #3 (twice-restore's duplicate is read by #3).
    let err = backend.prestart(&echo, 3).expect_err(mode);
    assert!(kinds.contains(&err.kind()), "{mode}: {:?}: {err}", err.kind());
    assert!(fired(&dir), "{mode}: the attack did not happen");
    if condemned {
        assert!(
            replaced(backend.as_ref(), &echo, before),
            "{mode}: no fresh host process"
        );
    }
    serves(backend.as_ref(), &echo, 5, mode);
    // A prestart goes through, in a fresh (honest) process.
    backend
        .prestart(&echo, 2)
        .unwrap_or_else(|e| panic!("{mode}: prestart after: {e}"));
    assert!(spawned(backend.as_ref()) > before, "{mode}: no new host process");
    serves(backend.as_ref(), &echo, 5, mode);
}

#[test]
fn a_garbage_control_reply_condemns_the_host_process() {
    control_attack("garbage-restore", &[ErrorKind::Io], true);
}

#[test]
fn a_control_reply_of_the_wrong_kind_condemns_the_host_process() {
    control_attack("wrong-kind-restore", &[ErrorKind::Io], true);
}

#[test]
fn a_control_reply_sent_twice_is_caught_and_condemns_the_host_process() {
    control_attack("twice-restore", &[ErrorKind::Io], true);
}

#[test]
fn a_host_process_that_never_answers_is_condemned_after_the_reply_timeout() {
    control_attack("silent-restore", &[ErrorKind::Io], true);
}

#[test]
fn a_host_process_exiting_mid_control_request_is_replaced_and_the_restore_retried() {
    // The process exits on its second restore: that restore is asked of a
    // fresh process instead (the one that left cannot have been harmed by
    // it, nor answer it), so the prestart succeeds.
    let mode = "exit-on-restore";
    let Some((backend, dir, echo)) = before_a_control_attack(mode) else {
        return;
    };
    backend
        .prestart(&echo, 3)
        .unwrap_or_else(|e| panic!("{mode}: the restores were not retried: {e}"));
    assert!(fired(&dir), "{mode}: the attack did not happen");
    assert!(spawned(backend.as_ref()) > 1, "{mode}: no fresh host process");
    assert_eq!(backend.stats().counter("vm_idle_instances"), Some(4), "{mode}");
    serves(backend.as_ref(), &echo, 5, mode);
}

#[test]
fn a_host_process_refusing_restores_is_retired_and_a_new_one_takes_new_instances() {
    control_attack("refuse-restore", &[ErrorKind::Io], false);
}

/// A host process that has run guests claims KVM refused a node's state
/// (its second restore): not believed, since the node is shared by every
/// tenant that deploys the same function. The process is retired, the
/// restore goes to a fresh one, and the node is not refused.
#[test]
fn a_forged_state_refusal_does_not_condemn_the_node() {
    let mode = "state-refused-restore";
    let Some((backend, dir, echo)) = before_a_control_attack(mode) else {
        return;
    };
    let before = 1;
    backend
        .prestart(&echo, 3)
        .unwrap_or_else(|e| panic!("{mode}: the prestart was not retried elsewhere: {e}"));
    assert!(fired(&dir), "{mode}: the attack did not happen");
    assert!(spawned(backend.as_ref()) > before, "{mode}: no fresh host process");
    let stats = backend.stats();
    assert_eq!(
        stats.counter("snapshot_files_refused"),
        Some(0),
        "{mode}: the node was refused"
    );
    serves(backend.as_ref(), &echo, 5, mode);
    // Another tenant deploying the same function uses the same node.
    let spec = FunctionSpec::new("echo", microfaas::builtin("echo").unwrap())
        .with_budget(Duration::from_secs(5))
        .with_tenant(microfaas::Tenant::new("other").unwrap());
    let other = backend
        .deploy(&spec)
        .unwrap_or_else(|e| panic!("{mode}: other tenant: {e}"));
    serves(backend.as_ref(), &other, 3, mode);
    assert_eq!(backend.stats().counter("snapshot_files_refused"), Some(0), "{mode}");
}

/// A run attack on the first host process's second run: that request
/// fails with one of `kinds` (or, where the attack may lose its race,
/// succeeds, if `may_succeed`), answered once; then the function serves.
fn run_attack(mode: &str, kinds: &[ErrorKind], may_succeed: bool, replaces: bool) {
    let Some((backend, dir)) = attacked(mode) else {
        return;
    };
    let echo = deploy(backend.as_ref(), "echo", Duration::from_secs(2));
    serves(backend.as_ref(), &echo, 1, mode);
    assert!(hostile_spawned(&dir), "{mode}");
    assert!(!fired(&dir), "{mode}: attacked too early");
    let before = spawned(backend.as_ref());
    let input = b"the attacked request";
    match backend.invoke(&echo, input, StartRequest::Auto) {
        Ok(r) => {
            assert!(may_succeed, "{mode}: the attacked request succeeded");
            // The VM side decides a reply's bytes (as a guest could); the
            // backend only guarantees they came from the window, within
            // the output limit.
            if mode == "toctou" {
                assert!(r.output.len() <= 64 << 10, "{mode}: {} bytes", r.output.len());
            } else {
                assert_eq!(r.output, input, "{mode}: served, but not its own output");
            }
        }
        Err(e) => assert!(kinds.contains(&e.kind()), "{mode}: {:?}: {e}", e.kind()),
    }
    assert!(fired(&dir), "{mode}: the attack did not happen");
    if replaces {
        assert!(
            replaced(backend.as_ref(), &echo, before),
            "{mode}: no fresh host process"
        );
    }
    // Other instances the attack reached fail at most once each, typed.
    for i in 0..8 {
        if let Err(e) = backend.invoke(&echo, b"next", StartRequest::Auto) {
            assert!(
                [ErrorKind::MalformedReply, ErrorKind::Crashed, ErrorKind::WorkerLost].contains(&e.kind()),
                "{mode}: request {i} after the attack: {:?}: {e}",
                e.kind()
            );
        }
    }
    serves(backend.as_ref(), &echo, 10, mode);
}

#[test]
fn a_garbage_report_fails_the_request_and_condemns_the_host_process() {
    run_attack("garbage-report", &[ErrorKind::WorkerLost], false, true);
}

#[test]
fn a_forged_out_of_bounds_reply_is_refused() {
    run_attack("forged-reply", &[ErrorKind::MalformedReply], false, false);
}

#[test]
fn a_reply_changing_under_the_backends_feet_is_read_once_and_checked() {
    run_attack(
        "toctou",
        &[ErrorKind::MalformedReply, ErrorKind::OutputTooLarge, ErrorKind::Crashed],
        true,
        false,
    );
}

#[test]
fn reports_and_replies_for_slots_not_in_flight_are_never_taken_as_answers() {
    run_attack("stray-reports", &[], true, false);
}

#[test]
fn a_reply_answered_twice_is_taken_once() {
    // BudgetExceeded if the second answer overwrote the first before the
    // caller read it (the host hid the answer: as if it never ran it).
    run_attack("double-report", &[ErrorKind::BudgetExceeded], true, false);
}

#[test]
fn a_run_the_host_process_swallows_ends_at_the_budget() {
    run_attack("never-run", &[ErrorKind::BudgetExceeded], false, false);
}

/// A report inside a write the process never finishes is never taken
/// (half written, as far as the caller can tell): the request ends at its
/// budget, neither hung nor failed as the report says.
#[test]
fn a_report_left_half_written_is_never_taken_and_the_request_ends_at_its_budget() {
    run_attack("open-report", &[ErrorKind::BudgetExceeded], false, false);
}

#[test]
fn a_host_process_exiting_mid_request_fails_it_once_with_worker_lost() {
    run_attack("exit-mid-run", &[ErrorKind::WorkerLost], false, true);
}

//! The crate end to end with a real exec'd child (`ipc-echo-child`): a
//! region at fd 3, requests and replies through the rings, the child parked
//! on a futex, its fds, its death mid-wait noticed by the watcher.

mod echo_protocol;

use echo_protocol::{DEPTH, HANG, REGION_BYTES, header, rings};
use ipc::futex::{self, Woken};
use ipc::region::SharedRegion;
use ipc::spawn::{Child, describe_status};
use ipc::watch::DeathWatch;
use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

const CHILD: &str = env!("CARGO_BIN_EXE_ipc-echo-child");

fn spawn(region: &SharedRegion) -> Child {
    Child::spawn(Path::new(CHILD), &[], &[], &[(region.fd().unwrap(), 3)]).unwrap()
}

fn wait_ready(region: &SharedRegion, child: &Child) {
    let ready = &header(region).ready;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready.load(Ordering::Acquire) == 0 {
        assert!(child.is_alive(), "the child died during start-up");
        assert!(Instant::now() < deadline, "the child did not start");
        futex::wait(ready, 0, Some(Duration::from_millis(10)));
    }
}

/// A pipe whose both ends are inheritable (no close-on-exec): what a careless
/// host leaks to every child it forks.
fn leaky_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds into the array; both are owned below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fresh fds nothing else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn call(region: &SharedRegion, n: u64) -> u64 {
    let (requests, replies) = rings(region);
    requests.try_push(n).unwrap();
    futex::wake_all(requests.tail_word());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = replies.tail_word().load(Ordering::SeqCst);
        if let Some(v) = replies.pop() {
            return v;
        }
        assert!(Instant::now() < deadline, "no reply to {n}");
        futex::wait(replies.tail_word(), seen, Some(Duration::from_millis(10)));
    }
}

#[test]
fn a_child_answers_through_the_rings_and_parks_between_requests() {
    let region = SharedRegion::create("ipc-echo", REGION_BYTES).unwrap();
    let mut child = spawn(&region);
    wait_ready(&region, &child);
    for n in 0..u64::from(DEPTH) * 3 {
        assert_eq!(call(&region, n), n + 1);
    }
    // Idle: it parks on the request tail, and a request wakes it.
    let parked = &header(&region).parked;
    let deadline = Instant::now() + Duration::from_secs(30);
    while parked.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the child never parked");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(call(&region, 41), 42);
    assert_eq!(
        header(&region).answered.load(Ordering::Acquire),
        u64::from(DEPTH) * 3 + 1
    );
    assert!(child.is_alive());
    let status = child.kill_and_reap().unwrap();
    assert_eq!(
        describe_status("child", Some(status)),
        "child killed by signal 9 (Killed)"
    );
}

#[test]
fn a_child_inherits_only_the_fds_it_was_given_at_their_numbers() {
    let region = SharedRegion::create("ipc-echo", REGION_BYTES).unwrap();
    let (_leak_r, _leak_w) = leaky_pipe();
    let (report_r, report_w) = leaky_pipe();
    // Give the region's source a number that is also a target, so that the
    // spawner must move it before the dup2s.
    // SAFETY: F_DUPFD_CLOEXEC duplicates the region's fd to a number >= 64;
    // the fd returned is owned below.
    let moved = unsafe { libc::fcntl(region.fd().unwrap().as_raw_fd(), libc::F_DUPFD_CLOEXEC, 64) };
    assert!(moved >= 64);
    // SAFETY: a fresh fd nothing else owns.
    let moved = unsafe { OwnedFd::from_raw_fd(moved) };
    let report_at = moved.as_raw_fd();
    let env_value = report_at.to_string();
    let mut child = Child::spawn(
        Path::new(CHILD),
        &[],
        &[(OsStr::new("ECHO_REPORT_FD"), OsStr::new(&env_value))],
        &[(moved.as_fd(), 3), (report_w.as_fd(), report_at)],
    )
    .unwrap();
    drop(report_w);
    let mut report = String::new();
    std::fs::File::from(report_r).read_to_string(&mut report).unwrap();
    let mut seen: Vec<i32> = report.split_whitespace().map(|s| s.parse().unwrap()).collect();
    seen.sort_unstable();
    let expected = [0, 1, 2, 3, report_at];
    // One more: the directory the child listed /proc/self/fd through.
    assert_eq!(seen.len(), expected.len() + 1, "child started with fds {seen:?}");
    for fd in expected {
        assert!(seen.contains(&fd), "fd {fd} missing from {seen:?}");
    }
    // fd 3 was the region (not the report pipe): the child serves through it.
    wait_ready(&region, &child);
    assert_eq!(call(&region, 1), 2);
    // Once started it holds 0-2 only: the region's fd is closed once mapped
    // and the report written; the leaked pipe never arrived.
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", child.pid()))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut fds: Vec<i32> = fds.iter().map(|s| s.parse().unwrap()).collect();
    fds.sort_unstable();
    assert_eq!(fds, [0, 1, 2]);
    let stdin = std::fs::read_link(format!("/proc/{}/fd/0", child.pid())).unwrap();
    assert_eq!(stdin, Path::new("/dev/null"));
    child.kill_and_reap().unwrap();
}

#[test]
fn a_child_killed_mid_wait_wakes_its_waiter_exactly_once() {
    let region = Arc::new(SharedRegion::create("ipc-echo", REGION_BYTES).unwrap());
    let mut child = spawn(&region);
    wait_ready(&region, &child);
    let watch = DeathWatch::new("ipc-test-watch").unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    {
        let (region, calls) = (Arc::clone(&region), Arc::clone(&calls));
        watch
            .watch(child.pidfd(), move || {
                calls.fetch_add(1, Ordering::SeqCst);
                let dead = &header(&region).dead;
                dead.store(1, Ordering::SeqCst);
                futex::wake_all(dead);
            })
            .unwrap();
    }
    let (waiting_tx, waiting_rx) = mpsc::channel();
    let waiter = {
        let region = Arc::clone(&region);
        std::thread::spawn(move || {
            let (requests, replies) = rings(&region);
            let h = header(&region);
            requests.try_push(HANG).unwrap();
            futex::wake_all(requests.tail_word());
            waiting_tx.send(()).unwrap();
            let mut wakeups = 0u32;
            // No timeout of its own: only the reply or the watcher ends it
            // (the deadline guards the test run, not the mechanism).
            let deadline = futex::now_ns() + 60_000_000_000;
            loop {
                let seen = replies.tail_word().load(Ordering::SeqCst);
                assert!(replies.pop().is_none(), "a hung request was answered");
                if h.dead.load(Ordering::SeqCst) != 0 {
                    return wakeups;
                }
                let end = futex::wait_any(&[(replies.tail_word(), seen), (&h.dead, 0)], Some(deadline));
                assert_ne!(end, Woken::TimedOut, "the waiter was never woken");
                wakeups += 1;
            }
        })
    };
    waiting_rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(child.is_alive());
    // SAFETY: SIGKILL to our own unreaped child.
    assert_eq!(unsafe { libc::kill(child.pid(), libc::SIGKILL) }, 0);
    let wakeups = waiter.join().unwrap();
    assert!(wakeups >= 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(watch.is_empty());
    let status = child.reap().unwrap();
    assert_eq!(
        describe_status("child", Some(status)),
        "child killed by signal 9 (Killed)"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "called back again");
}

#[test]
fn a_child_refuses_a_region_of_the_wrong_size() {
    let region = SharedRegion::create("ipc-echo", REGION_BYTES * 2).unwrap();
    let mut child = spawn(&region);
    let status = child.reap().unwrap();
    assert_eq!(status.code(), Some(2));
    assert_eq!(describe_status("child", Some(status)), "child exited with status 2");
    assert_eq!(header(&region).ready.load(Ordering::Acquire), 0);
}

#[test]
fn a_killed_child_marks_its_death_notice_and_wakes_the_waiter_without_a_watcher() {
    let region = SharedRegion::create("ipc-echo", REGION_BYTES).unwrap();
    let mut child = spawn(&region);
    wait_ready(&region, &child);
    let alive = &header(&region).alive;
    let registered = alive.load(Ordering::Acquire);
    assert!(!ipc::robust::owner_died(registered));
    assert_eq!(
        registered & ipc::robust::FUTEX_TID_MASK,
        u32::try_from(child.pid()).unwrap(),
        "the main thread's TID is the child's pid"
    );
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let deadline = futex::now_ns() + 60_000_000_000;
            loop {
                let v = alive.load(Ordering::Acquire);
                if ipc::robust::owner_died(v) {
                    return;
                }
                assert_ne!(
                    futex::wait_any(&[(alive, v)], Some(deadline)),
                    Woken::TimedOut,
                    "never woken"
                );
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        child.signal(libc::SIGKILL).unwrap();
        waiter.join().unwrap();
    });
    assert_eq!(child.reap().unwrap().signal(), Some(libc::SIGKILL));
}

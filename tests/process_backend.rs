//! Process-backend specifics the conformance suite does not cover: the cold
//! path, budget kills, runners dying mid-request or while idle, eviction,
//! concurrency, stats, and that dropping the backend leaves no process.

use microfaas::{Backend, BackendKind, Config, ErrorKind, FunctionId, FunctionSpec, StartPath, StartRequest};
use std::time::{Duration, Instant};

fn open(config: Config) -> Box<dyn Backend> {
    microfaas::open(BackendKind::Process, config).expect("process backend")
}

fn deploy(b: &dyn Backend, name: &str, budget: Duration) -> FunctionId {
    let spec = FunctionSpec::new(name, microfaas::builtin(name).expect("example function")).with_budget(budget);
    b.deploy(&spec).unwrap_or_else(|e| panic!("deploying {name}: {e}"))
}

/// Running runner processes of ours that mapped the artifact memfd named
/// after `artifact_name`'s path (zombies and dying ones excluded).
fn runners_of(artifact_name: &str) -> Vec<i32> {
    let needle = format!("{artifact_name}.so");
    let mut pids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc").flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next());
            let dying = matches!(state, None | Some("Z" | "X" | "x"));
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
            let mapped = maps
                .lines()
                .any(|l| l.contains("memfd:microfaas-artifact:") && l.contains(&needle));
            if !dying && cmdline.contains("microfaas-runner") && mapped {
                pids.push(pid);
            }
        }
    }
    pids
}

/// [`runners_of`] once it has `n` entries (killed runners take a moment to
/// go); panics after 2 s.
fn settled_runners_of(artifact_name: &str, n: usize) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let pids = runners_of(artifact_name);
        if pids.len() == n {
            return pids;
        }
        assert!(
            Instant::now() < deadline,
            "runners of {artifact_name}: {pids:?}, expected {n}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn exists(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn kill(pid: i32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{signal} {pid}");
}

#[test]
fn cold_path_spawns_a_runner_per_request() {
    let b = open(Config::default());
    let echo = deploy(&*b, "echo", Duration::from_secs(5));
    for input in [&b""[..], b"hello", &[0xff, 0x00, 0xfe][..]] {
        let done = b
            .invoke(&echo, input, StartRequest::Force(StartPath::Cold))
            .expect("cold echo");
        assert_eq!(done.output, input);
        assert_eq!(done.start, StartPath::Cold);
        let t = done.timings;
        assert!(t.start_ns > 0, "{t:?}");
        assert!(t.dispatch_ns >= t.start_ns && t.total_ns >= t.dispatch_ns, "{t:?}");
    }
    let warm = b.invoke(&echo, b"x", StartRequest::Auto).expect("warm echo");
    assert_eq!(warm.start, StartPath::Warm);
    assert_eq!(warm.timings.start_ns, 0);
    assert!(warm.timings.dispatch_ns > 0 && warm.timings.dispatch_ns <= warm.timings.total_ns);
    let hot = b.invoke(&echo, b"x", StartRequest::Force(StartPath::Hot)).unwrap_err();
    assert_eq!(hot.kind(), ErrorKind::UnsupportedStart);
    // Only vm has idle instances to start on request.
    let prestart = b.prestart(&echo, 3).unwrap_err();
    assert_eq!(prestart.kind(), ErrorKind::Unsupported, "{prestart}");
    assert!(prestart.to_string().contains("process"), "{prestart}");
}

#[test]
fn failures_are_typed_and_the_function_stays_warm() {
    let b = open(Config {
        heap_limit_bytes: 16 << 20,
        ..Config::default()
    });
    let budget = Duration::from_millis(200);
    let spin = deploy(&*b, "spin", budget);
    let started = Instant::now();
    let e = b.invoke(&spin, b"", StartRequest::Auto).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BudgetExceeded, "{e}");
    assert!(e.to_string().contains("budget"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Respawned: the next request is served warm, and is killed again.
    assert_eq!(
        b.invoke(&spin, b"", StartRequest::Auto).unwrap_err().kind(),
        ErrorKind::BudgetExceeded
    );
    let e = b.invoke(&spin, b"", StartRequest::Force(StartPath::Cold)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BudgetExceeded);

    for (name, kind) in [
        ("panics", ErrorKind::Panicked),
        ("alloc-hog", ErrorKind::OutOfMemory),
        ("stack-overflow", ErrorKind::StackOverflow),
    ] {
        let id = deploy(&*b, name, Duration::from_secs(5));
        for start in [
            StartRequest::Auto,
            StartRequest::Auto,
            StartRequest::Force(StartPath::Cold),
        ] {
            let e = b.invoke(&id, b"x", start).unwrap_err();
            assert_eq!(e.kind(), kind, "{name}: {e}");
        }
    }
    // Killed mid-request by another signal: Crashed, promptly (the budget
    // is far away), then served again.
    let spin = deploy(&*b, "spin", Duration::from_secs(20));
    // The runner of the replaced deployment was killed; wait until it is gone.
    let victim = settled_runners_of("spin", 1);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        kill(victim[0], "SEGV");
    });
    let started = Instant::now();
    let e = b.invoke(&spin, b"", StartRequest::Auto).unwrap_err();
    killer.join().unwrap();
    assert_eq!(e.kind(), ErrorKind::Crashed, "{e}");
    assert!(e.to_string().contains("signal 11"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));
    settled_runners_of("spin", 1);

    let panic = b
        .invoke(&FunctionId::new("panics"), b"", StartRequest::Auto)
        .unwrap_err();
    assert!(panic.to_string().contains("deliberate panic"), "{panic}");
    // Every failed runner was replaced by exactly one warm runner (killed
    // ones are reaped in the background: give the reaper a moment).
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut stats = b.stats();
    while stats.instances > 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        stats = b.stats();
    }
    assert_eq!(stats.functions, 4);
    assert_eq!(stats.instances, 4, "{stats:?}");
}

#[test]
fn killed_idle_runners_are_replaced() {
    let b = open(Config::default());
    let noop = deploy(&*b, "noop", Duration::from_secs(5));
    b.invoke(&noop, b"", StartRequest::Auto).expect("noop");
    // Killed while idle: the next request respawns it, on the cold path.
    let pids = settled_runners_of("noop", 1);
    kill(pids[0], "KILL");
    // Dead (a zombie until the backend reaps it) before the next request.
    settled_runners_of("noop", 0);
    let done = b.invoke(&noop, b"", StartRequest::Auto).expect("noop after kill");
    assert_eq!(done.start, StartPath::Cold);
    assert_eq!(
        b.invoke(&noop, b"", StartRequest::Auto).expect("noop").start,
        StartPath::Warm
    );
}

#[test]
fn concurrent_callers_queue_and_all_get_their_answer() {
    let b = open(Config::default());
    let echo = deploy(&*b, "echo", Duration::from_secs(5));
    std::thread::scope(|s| {
        for t in 0..8u8 {
            let (b, echo) = (&b, &echo);
            s.spawn(move || {
                for i in 0..100u32 {
                    let mut input = vec![t; usize::from(t) * 1000];
                    input.extend_from_slice(&i.to_le_bytes());
                    let done = b.invoke(echo, &input, StartRequest::Auto).expect("echo");
                    assert_eq!(done.output, input);
                }
            });
        }
    });
    let stats = b.stats();
    assert_eq!(stats.functions, 1);
    assert!(stats.instances >= 1, "{stats:?}");
    assert!(stats.memory_bytes > 0);
}

#[test]
fn failures_under_concurrency_answer_every_request_once() {
    let b = open(Config::default());
    let echo = deploy(&*b, "echo", Duration::from_secs(5));
    let panics = deploy(&*b, "panics", Duration::from_secs(5));
    let spin = deploy(&*b, "spin", Duration::from_millis(30));
    std::thread::scope(|s| {
        for t in 0..8u8 {
            let (b, echo, panics, spin) = (&b, &echo, &panics, &spin);
            s.spawn(move || {
                for i in 0..12u8 {
                    let input = [t, i, 0xff];
                    match (usize::from(t) + usize::from(i)) % 4 {
                        0 => assert_eq!(b.invoke(echo, &input, StartRequest::Auto).expect("echo").output, input),
                        1 => {
                            let e = b.invoke(panics, &input, StartRequest::Auto).unwrap_err();
                            assert_eq!(e.kind(), ErrorKind::Panicked, "{e}");
                        }
                        2 => {
                            let e = b.invoke(spin, &input, StartRequest::Auto).unwrap_err();
                            assert_eq!(e.kind(), ErrorKind::BudgetExceeded, "{e}");
                        }
                        _ => {
                            let done = b
                                .invoke(echo, &input, StartRequest::Force(StartPath::Cold))
                                .expect("cold");
                            assert_eq!((done.output.as_slice(), done.start), (&input[..], StartPath::Cold));
                        }
                    }
                }
            });
        }
    });
    assert_eq!(
        b.invoke(&echo, b"end", StartRequest::Auto).expect("echo").output,
        b"end"
    );
}

#[test]
fn limits_evict_and_drop() {
    let b = open(Config {
        input_limit_bytes: 64,
        output_limit_bytes: 16,
        ..Config::default()
    });
    let echo = deploy(&*b, "echo", Duration::from_secs(5));
    let e = b.invoke(&echo, &[1; 65], StartRequest::Auto).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InputTooLarge);
    let e = b.invoke(&echo, &[1; 17], StartRequest::Auto).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutputTooLarge, "{e}");
    assert_eq!(
        b.invoke(&echo, &[1; 16], StartRequest::Auto).expect("fits").output,
        [1; 16]
    );
    let unknown = b.invoke(&FunctionId::new("nope"), b"", StartRequest::Auto).unwrap_err();
    assert_eq!(unknown.kind(), ErrorKind::UnknownFunction);

    b.evict(&echo).expect("evict");
    assert_eq!(
        b.invoke(&echo, b"a", StartRequest::Auto).expect("after evict").start,
        StartPath::Cold
    );
    assert_eq!(
        b.invoke(&echo, b"a", StartRequest::Auto).expect("warm again").start,
        StartPath::Warm
    );

    drop(b);
    let b = open(Config::default());
    deploy(&*b, "checkpointed", Duration::from_secs(5));
    let pids = settled_runners_of("checkpointed", 1);
    drop(b);
    for pid in pids {
        assert!(!exists(pid), "runner {pid} outlived the backend");
    }
}

/// The runtime the runner is built on, driven in-process: a call that
/// panics, runs out of memory or overflows its stack returns an error and
/// the same instance keeps serving (what the language worker relies on).
mod runtime_in_process {
    use lang_isolation::runtime::{ArtifactImage, Failure, Instance, InstanceConfig, LoadedFunction, SealedArtifact};

    fn instance(name: &str) -> Instance {
        let artifact = microfaas::builtin(name).expect("example function");
        let sealed = SealedArtifact::create(name, artifact.bytes()).expect("memfd");
        let function = LoadedFunction::load(&ArtifactImage::parse(sealed).expect("parse")).expect("load");
        let config = InstanceConfig {
            heap_limit_bytes: 16 << 20,
            stack_bytes: 256 << 10,
        };
        let mut instance = Instance::new(function, &config).expect("instance");
        instance.init().expect("init");
        instance
    }

    #[test]
    fn failures_are_contained_and_the_instance_serves_on() {
        let mut echo = instance("echo");
        let mut panics = instance("panics");
        let mut overflow = instance("stack-overflow");
        let mut hog = instance("alloc-hog");
        for round in 0..3u8 {
            match panics.handle(b"x") {
                Err(Failure::Panicked { message }) => {
                    assert!(message.contains("deliberate panic"), "{message}")
                }
                other => panic!("panics: {other:?}"),
            }
            match overflow.handle(b"x") {
                Err(Failure::StackOverflow { stack_bytes }) => assert!(stack_bytes >= 256 << 10),
                other => panic!("stack-overflow: {other:?}"),
            }
            match hog.handle(b"x") {
                Err(Failure::OutOfMemory { limit_bytes, .. }) => assert_eq!(limit_bytes, 16 << 20),
                other => panic!("alloc-hog: {other:?}"),
            }
            assert_eq!(hog.heap_used_bytes(), 0, "the invocation arena was reset");
            let input = [round, 0xff, 0x00];
            assert_eq!(echo.handle(&input).expect("echo").bytes(), input);
            assert!(!panics.poisoned() && !overflow.poisoned() && !hog.poisoned());
        }
    }

    #[test]
    fn init_state_persists_and_invocation_memory_does_not() {
        let mut heavy = instance("init-heavy");
        let after_init = heavy.heap_used_bytes();
        assert!(after_init >= 8 << 20, "init built its table: {after_init}");
        let first = heavy.handle(b"abc").expect("handle").bytes().to_vec();
        for _ in 0..100 {
            assert_eq!(heavy.handle(b"abc").expect("handle").bytes(), first);
        }
        assert_eq!(heavy.heap_used_bytes(), after_init);
        let mut echo = instance("echo");
        let big = vec![7u8; 1 << 20];
        for _ in 0..20 {
            assert_eq!(echo.handle(&big).expect("echo").bytes().len(), big.len());
            assert_eq!(echo.heap_used_bytes(), 0);
        }
    }
}

//! `language`: the language backend's cold and warm starts in detail, one
//! worker: cold start of `noop` by cold-start path (the loader's fresh
//! copy, the pre-linked image, its post-init snapshot) with N functions
//! deployed, `init-heavy` and the interpreted `wasm-large-module` and
//! `wasm-noop-module` (the wasmi runtime with the example's WebAssembly
//! module as deploy-time data: init = engine + linker, load = compile) cold
//! with and without their post-init snapshots,
//! warm latency and throughput measured the paper's way (one caller pinned
//! to core 0, the worker on core 1, requests one at a time: throughput =
//! serial requests per second) and saturated without oversubscribing
//! (callers + workers <= cores), and the worker's mappings and memory per
//! deployed function.

use crate::progress::bar;
use crate::stats::{Latencies, Summary, ratio};
use microfaas::{Backend, BackendKind, Config, FunctionId, FunctionSpec, LanguageColdStart, StartPath, StartRequest};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Knobs of the experiment.
#[derive(Debug, Clone)]
pub struct Options {
    /// Function counts deployed (the paper's 100 and 5,000).
    pub functions: Vec<usize>,
    /// Measured cold starts of `noop` per row.
    pub cold_iterations: u64,
    /// Measured cold starts of `init-heavy` per row.
    pub heavy_iterations: u64,
    /// Measured warm invocations per row.
    pub warm_iterations: u64,
    /// How long the saturated throughput runs.
    pub throughput_time: Duration,
}

impl Options {
    /// Defaults, or the `--quick` defaults; `functions` overrides the counts.
    pub fn new(quick: bool, iterations: Option<u64>, functions: Option<usize>) -> Self {
        let (cold, heavy, warm, fns, tput) = if quick {
            (200, 20, 2_000, vec![8, 200], 200)
        } else {
            (5_000, 200, 50_000, vec![100, 5_000], 2_000)
        };
        Self {
            functions: functions.map_or(fns, |n| vec![n]),
            cold_iterations: iterations.unwrap_or(cold),
            heavy_iterations: iterations.map_or(heavy, |i| i.min(heavy)),
            warm_iterations: iterations.unwrap_or(warm),
            throughput_time: Duration::from_millis(tput),
        }
    }
}

/// One measured row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Function invoked.
    pub function: String,
    /// `cold` or `warm`.
    pub start: StartPath,
    /// Cold-start path (`load`, `prelinked`, `snapshot`), or for warm rows
    /// how requests were issued (`serial`: one pinned caller, one at a
    /// time; `saturated`: callers + workers = cores).
    pub mode: String,
    /// Functions deployed while measuring.
    pub functions_deployed: usize,
    /// Latency from dispatch to the function's first timestamp, µs.
    pub dispatch: Option<Summary>,
    /// Requests per second (warm rows).
    pub throughput_per_s: Option<f64>,
    /// Failed invocations.
    pub errors: u64,
    /// Why the row is empty, if it is.
    pub skipped: Option<String>,
}

/// The worker's mappings and memory with N functions deployed.
#[derive(Debug, Clone, Serialize)]
pub struct Footprint {
    /// Functions deployed.
    pub functions_deployed: usize,
    /// Functions started cold at least once (their images mapped).
    pub functions_started_cold: usize,
    /// Functions resident (a warm instance each): 0 with lazy residency
    /// before any warm request, all of them after.
    pub functions_resident: usize,
    /// Lines of the worker's `/proc/PID/maps`.
    pub worker_mappings: Option<usize>,
    /// The worker's proportional set size, KiB.
    pub worker_pss_kib: Option<u64>,
    /// PSS over the worker right after start, per deployed function, KiB.
    pub pss_per_function_kib: Option<f64>,
}

/// The experiment's results.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// Latency and throughput rows.
    pub rows: Vec<Row>,
    /// Mappings and memory per function count.
    pub footprints: Vec<Footprint>,
}

fn mode_name(m: LanguageColdStart) -> &'static str {
    match m {
        LanguageColdStart::Load => "load",
        LanguageColdStart::Prelinked => "prelinked",
        LanguageColdStart::Snapshot => "snapshot",
    }
}

fn open(cold_start: LanguageColdStart, config: &Config) -> Result<Box<dyn Backend>, String> {
    let mut config = config.clone();
    config.language.workers = Some(1);
    config.language.cold_start = cold_start;
    // A function becomes resident (its warm instance) at its first warm
    // request: one only started cold keeps no instance.
    config.language.lazy_resident = true;
    microfaas::open(BackendKind::Language, config).map_err(|e| e.to_string())
}

/// Deploys `n` copies of `function`, each its own artifact (as the paper's
/// functions are each their own shared object): its own memfd, image and
/// snapshot in the worker. (Functions deployed from one `Artifact` share
/// one image.) `wasm-NAME-module` is the wasm runtime given example NAME's
/// module.
fn deploy(backend: &dyn Backend, function: &str, n: usize) -> Result<Vec<FunctionId>, String> {
    let (artifact_name, module) = match function.strip_prefix("wasm-").and_then(|f| f.strip_suffix("-module")) {
        Some(name) => (
            microfaas::WASM_RUNTIME,
            Some(microfaas::builtin_module(name).map_err(|e| e.to_string())?),
        ),
        None => (function, None),
    };
    let path = microfaas::builtin(artifact_name)
        .map_err(|e| e.to_string())?
        .path()
        .to_owned();
    let pb = bar(
        u64::try_from(n).unwrap_or(0),
        &format!("language: deploying {n} {function}"),
    );
    let ids = (0..n)
        .map(|i| {
            pb.inc(1);
            let artifact = microfaas::Artifact::load(&path).map_err(|e| e.to_string())?;
            let mut spec = FunctionSpec::new(format!("{function}-{i}"), std::sync::Arc::new(artifact));
            if let Some(module) = &module {
                spec = spec.with_module(std::sync::Arc::clone(module));
            }
            backend
                .deploy(&spec)
                .map_err(|e| format!("deploying {function} #{i}: {e}"))
        })
        .collect();
    pb.finish_and_clear();
    ids
}

/// A small deterministic generator for picking functions.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        usize::try_from(self.0 % u64::try_from(bound.max(1)).unwrap_or(1)).unwrap_or(0)
    }
}

/// Pins the calling thread to `cpu` (best effort); returns whether it did.
fn pin(cpu: usize) -> bool {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).is_ok() && nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).is_ok()
}

/// Unpins the calling thread (every core again).
fn unpin() {
    let mut set = nix::sched::CpuSet::new();
    for cpu in 0..cores() {
        let _ = set.set(cpu);
    }
    let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// `iterations` serial invocations (after a tenth as warm-up), each of a
/// random one of `ids`: the dispatch latencies, requests per second and
/// errors.
fn serial(
    backend: &dyn Backend,
    ids: &[FunctionId],
    input: &[u8],
    request: StartRequest,
    iterations: u64,
    label: &str,
) -> (Latencies, f64, u64) {
    let warmup = (iterations / 10).clamp(1, 1000);
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut lat = Latencies::new();
    let mut errors = 0;
    let pb = bar(warmup + iterations, label);
    let mut started = Instant::now();
    for i in 0..warmup + iterations {
        if i == warmup {
            started = Instant::now();
        }
        match backend.invoke(&ids[rng.next(ids.len())], input, request) {
            Ok(inv) if i >= warmup => lat.record_ns(inv.timings.dispatch_ns),
            Ok(_) => {}
            Err(_) => errors += 1,
        }
        if i % 64 == 0 {
            pb.inc(64);
        }
    }
    pb.finish_and_clear();
    let rate = ratio(iterations, 1) / started.elapsed().as_secs_f64();
    (lat, rate, errors)
}

/// Warm throughput with `cores - workers` callers (at least one), each
/// pinned to its own core other than the worker's: requests per second.
fn saturated(backend: &dyn Backend, ids: &[FunctionId], time: Duration) -> (f64, u64) {
    let callers = cores().saturating_sub(1).max(1);
    let done = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..callers {
            let (done, failed, stop) = (&done, &failed, &stop);
            s.spawn(move || {
                // The worker is on core 1: callers on 0, 2, 3, ...
                pin(if t == 0 { 0 } else { t + 1 });
                let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ u64::try_from(t).unwrap_or(0).wrapping_add(1));
                while !stop.load(Ordering::Relaxed) {
                    match backend.invoke(&ids[rng.next(ids.len())], b"", StartRequest::Force(StartPath::Warm)) {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        std::thread::sleep(time);
        stop.store(true, Ordering::Relaxed);
    });
    let rate = ratio(done.load(Ordering::Relaxed), 1) / started.elapsed().as_secs_f64();
    (rate, failed.load(Ordering::Relaxed))
}

fn row(function: &str, start: StartPath, mode: &str, n: usize) -> Row {
    Row {
        function: function.to_owned(),
        start,
        mode: mode.to_owned(),
        functions_deployed: n,
        dispatch: None,
        throughput_per_s: None,
        errors: 0,
        skipped: None,
    }
}

fn skipped(function: &str, start: StartPath, mode: &str, n: usize, why: String) -> Row {
    Row {
        skipped: Some(why),
        ..row(function, start, mode, n)
    }
}

/// The pid of our newest `microfaas-worker` child (deployed functions may
/// go to another tenant's worker than the one the backend opened with).
fn worker_pid(_backend: &dyn Backend) -> Option<u32> {
    let mut found = None;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("microfaas-worker") {
                found = found.max(Some(pid));
            }
        }
    }
    found
}

fn mappings(pid: u32) -> Option<usize> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .ok()
        .map(|m| m.lines().count())
}

fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Runs the experiment.
pub fn run(opts: &Options, config: &Config) -> Report {
    let mut report = Report::default();
    let pinned = pin(0);
    for &n in &opts.functions {
        noop_rows(opts, config, n, &mut report);
    }
    heavy_rows(opts, config, &mut report);
    if pinned {
        unpin();
    }
    report
}

/// `noop` with `n` deployed: cold by every path (the loader's only at the
/// smallest count: it does not depend on it), warm serial and saturated,
/// and the footprint.
fn noop_rows(opts: &Options, config: &Config, n: usize, report: &mut Report) {
    let smallest = opts.functions.iter().min() == Some(&n);
    let modes: &[LanguageColdStart] = if smallest {
        &[
            LanguageColdStart::Snapshot,
            LanguageColdStart::Prelinked,
            LanguageColdStart::Load,
        ]
    } else {
        &[LanguageColdStart::Snapshot]
    };
    for &mode in modes {
        let name = mode_name(mode);
        let backend = match open(mode, config) {
            Ok(b) => b,
            Err(e) => {
                report.rows.push(skipped("noop", StartPath::Cold, name, n, e));
                continue;
            }
        };
        // The backend's first worker, idle: the base a worker costs.
        let base_pss = worker_pid(backend.as_ref()).and_then(pss_kib);
        let ids = match deploy(backend.as_ref(), "noop", n) {
            Ok(ids) => ids,
            Err(e) => {
                report.rows.push(skipped("noop", StartPath::Cold, name, n, e));
                continue;
            }
        };
        // Every function's first cold start (which runs init and, with
        // snapshots, takes the snapshot) comes first: the rows measure the
        // steady state after it.
        let mut first = Latencies::new();
        for id in &ids {
            if let Ok(inv) = backend.invoke(id, b"", StartRequest::Force(StartPath::Cold)) {
                first.record_ns(inv.timings.dispatch_ns);
            }
        }
        // The newest worker: the one the functions were deployed to.
        let pid = worker_pid(backend.as_ref());
        let pss = pid.and_then(pss_kib);
        let maps = pid.and_then(mappings);
        let (lat, _, errors) = serial(
            backend.as_ref(),
            &ids,
            b"",
            StartRequest::Force(StartPath::Cold),
            opts.cold_iterations,
            &format!("language cold ({name}), {n} functions"),
        );
        report.rows.push(Row {
            dispatch: Some(first.summary()),
            ..row("noop", StartPath::Cold, &format!("{name}-1st"), n)
        });
        report.rows.push(Row {
            dispatch: Some(lat.summary()),
            errors,
            ..row("noop", StartPath::Cold, name, n)
        });
        if mode != LanguageColdStart::Snapshot {
            continue;
        }
        let footprint = |resident: usize, pss: Option<u64>, maps: Option<usize>| Footprint {
            functions_deployed: n,
            functions_started_cold: n,
            functions_resident: resident,
            worker_mappings: maps,
            worker_pss_kib: pss,
            pss_per_function_kib: pss
                .zip(base_pss)
                .map(|(p, b)| ratio(p.saturating_sub(b), 1) / ratio(u64::try_from(n).unwrap_or(1).max(1), 1)),
        };
        report.footprints.push(footprint(0, pss, maps));
        // Every function's first warm request makes it resident (init runs
        // in its warm instance): not measured.
        for id in &ids {
            let _ = backend.invoke(id, b"", StartRequest::Force(StartPath::Warm));
        }
        report
            .footprints
            .push(footprint(n, pid.and_then(pss_kib), pid.and_then(mappings)));
        let (lat, rate, errors) = serial(
            backend.as_ref(),
            &ids,
            b"",
            StartRequest::Force(StartPath::Warm),
            opts.warm_iterations,
            &format!("language warm serial, {n} functions"),
        );
        report.rows.push(Row {
            dispatch: Some(lat.summary()),
            throughput_per_s: Some(rate),
            errors,
            ..row("noop", StartPath::Warm, "serial", n)
        });
        let (rate, errors) = saturated(backend.as_ref(), &ids, opts.throughput_time);
        report.rows.push(Row {
            throughput_per_s: Some(rate),
            errors,
            ..row("noop", StartPath::Warm, "saturated", n)
        });
    }
}

/// `init-heavy` and the interpreted module functions (and `noop` beside
/// them, for the ratio) cold by every path.
fn heavy_rows(opts: &Options, config: &Config, report: &mut Report) {
    for mode in [
        LanguageColdStart::Snapshot,
        LanguageColdStart::Prelinked,
        LanguageColdStart::Load,
    ] {
        let name = mode_name(mode);
        let backend = match open(mode, config) {
            Ok(b) => b,
            Err(e) => {
                report.rows.push(skipped("init-heavy", StartPath::Cold, name, 1, e));
                continue;
            }
        };
        for function in ["init-heavy", "wasm-large-module", "wasm-noop-module", "noop"] {
            if function == "noop" && mode != LanguageColdStart::Snapshot {
                continue;
            }
            let ids = match deploy(backend.as_ref(), function, 1) {
                Ok(ids) => ids,
                Err(e) => {
                    report.rows.push(skipped(function, StartPath::Cold, name, 1, e));
                    continue;
                }
            };
            let (lat, _, errors) = serial(
                backend.as_ref(),
                &ids,
                b"0123456789abcdef",
                StartRequest::Force(StartPath::Cold),
                opts.heavy_iterations,
                &format!("language cold ({name}) {function}"),
            );
            report.rows.push(Row {
                dispatch: Some(lat.summary()),
                errors,
                ..row(function, StartPath::Cold, name, 1)
            });
        }
    }
}

/// The results as text.
pub fn text(r: &Report) -> String {
    let mut s = format!(
        "{:<17} {:<5} {:<14} {:>6}  {:>9} {:>9} {:>9}  {:>12}  {}\n",
        "function", "start", "mode", "fns", "p50 us", "p99 us", "p99.9 us", "req/s", "errors"
    );
    for row in &r.rows {
        if let Some(why) = &row.skipped {
            s.push_str(&format!(
                "{:<17} {:<5} {:<14} {:>6}  skipped: {why}\n",
                row.function, row.start, row.mode, row.functions_deployed
            ));
            continue;
        }
        let (p50, p99, p999) = row.dispatch.map_or((String::new(), String::new(), String::new()), |d| {
            (
                format!("{:.2}", d.median_us),
                format!("{:.2}", d.p99_us),
                format!("{:.2}", d.p999_us),
            )
        });
        let tput = row.throughput_per_s.map_or(String::new(), |t| format!("{t:.0}"));
        s.push_str(&format!(
            "{:<17} {:<5} {:<14} {:>6}  {p50:>9} {p99:>9} {p999:>9}  {tput:>12}  {}\n",
            row.function, row.start, row.mode, row.functions_deployed, row.errors
        ));
    }
    for f in &r.footprints {
        s.push_str(&format!(
            "footprint: {} functions deployed, all started cold once, {} resident: worker mappings {}, PSS {} KiB ({} KiB per function over the fresh worker)\n",
            f.functions_deployed,
            f.functions_resident,
            f.worker_mappings.map_or("?".to_owned(), |m| m.to_string()),
            f.worker_pss_kib.map_or("?".to_owned(), |m| m.to_string()),
            f.pss_per_function_kib.map_or("?".to_owned(), |m| format!("{m:.1}")),
        ));
    }
    s.push_str("mode: the cold-start path; `-1st`: each function's first cold start (init runs; the snapshot is taken), the plain rows the steady state after it\n");
    s.push_str(
        "serial: one caller pinned to core 0, the worker on core 1, one request at a time (req/s = serial requests per second, the paper's way); saturated: callers + workers = cores (on 2 cores: 1 caller, so like serial without latency recording)\n",
    );
    s
}

//! `table1`: the paper's Table 1 on this host, with the `vm` rows added.
//! For each backend and start path: latency from dispatch to the function's
//! first timestamp and end to end (median, p99, p99.9), and throughput with
//! every worker busy for the warm paths, with N functions deployed. The
//! language backend runs one worker (core 1); its warm throughput is
//! measured saturated without oversubscribing (callers + worker <= cores,
//! callers pinned apart from the worker) and serial (one pinned caller, one
//! request at a time: the paper's way), each reported as such.
//!
//! The vm latency rows run their one caller thread pinned to core 0 (the
//! previous mask is restored before the throughput threads): a hot vm
//! request hands off between the caller and a runner thread, and on this
//! 2-core host the row had two modes by where the scheduler put them,
//! caller and runner on the same core (~50 us dispatch / ~85 us end to
//! end) or split (~80-100 / ~135-175 us, a cross-core futex wake costing
//! tens of microseconds under nested virtualisation); with the caller
//! pinned every run measured the fast mode (~52 / ~86 us). Unpinned, the
//! row measured the scheduler's choice rather than the backend.

use crate::progress::bar;
use crate::stats::{Latencies, Summary, ratio};
use microfaas::{Backend, BackendKind, Config, ErrorKind, FunctionId, FunctionSpec, StartPath, StartRequest};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Knobs of the experiment.
#[derive(Debug, Clone)]
pub struct Options {
    /// Measured invocations per warm/hot row.
    pub warm_iterations: u64,
    /// Measured invocations per cold/snapshot row.
    pub cold_iterations: u64,
    /// Copies of `noop` deployed; each request picks one at random.
    pub functions: usize,
    /// How long each throughput measurement runs.
    pub throughput_time: Duration,
}

impl Options {
    /// Defaults, or the `--quick` defaults.
    pub fn new(quick: bool, iterations: Option<u64>, functions: Option<usize>) -> Self {
        let (warm, cold, fns, tput) = if quick {
            (300, 40, 8, 300)
        } else {
            (10_000, 1_000, 100, 2_000)
        };
        Self {
            warm_iterations: iterations.unwrap_or(warm),
            cold_iterations: iterations.unwrap_or(cold),
            functions: functions.unwrap_or(fns),
            throughput_time: Duration::from_millis(tput),
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `process`, `language` or `vm`.
    pub backend: BackendKind,
    /// The start path measured.
    pub start: StartPath,
    /// Function measured.
    pub function: String,
    /// Functions deployed while measuring.
    pub functions_deployed: usize,
    /// Median latency from dispatch to the function's first timestamp, µs.
    pub median_us: Option<f64>,
    /// 99th percentile of the same, µs.
    pub p99_us: Option<f64>,
    /// 99.9th percentile of the same, µs.
    pub p999_us: Option<f64>,
    /// End-to-end latency (invoke call to return), percentiles in µs.
    pub end_to_end: Option<Summary>,
    /// Invocations per second with every worker busy (warm paths only).
    /// On `language`: saturated without oversubscribing (callers + workers
    /// <= cores, each caller pinned apart from the worker); elsewhere one
    /// caller thread per core.
    pub throughput_per_s: Option<f64>,
    /// `language` warm only: serial requests per second, the paper's way
    /// (one caller pinned to core 0, the one worker on core 1, one request
    /// at a time).
    pub throughput_serial_per_s: Option<f64>,
    /// Measured invocations.
    pub samples: u64,
    /// Invocations that failed (should be 0).
    pub errors: u64,
    /// The first failure's error, if any failed.
    pub first_error: Option<String>,
    /// Why the row has no numbers, if it has none.
    pub skipped: Option<String>,
    /// What `median_us`/`p99_us`/`p999_us` measure: `dispatch` (invoke to
    /// the function's first timestamp) or `end_to_end` (for `argument`
    /// starts, which resume a function entered before its snapshot).
    pub latency_basis: &'static str,
    /// The dispatch-latency distribution (not serialised; for plots).
    #[serde(skip)]
    pub dispatch: Option<Latencies>,
}

impl Row {
    fn skipped(backend: BackendKind, start: StartPath, functions: usize, reason: String) -> Self {
        Row {
            backend,
            start,
            function: "noop".to_owned(),
            functions_deployed: functions,
            median_us: None,
            p99_us: None,
            p999_us: None,
            end_to_end: None,
            throughput_per_s: None,
            throughput_serial_per_s: None,
            samples: 0,
            errors: 0,
            first_error: None,
            skipped: Some(reason),
            latency_basis: "dispatch",
            dispatch: None,
        }
    }
}

/// The start paths a backend offers, in table order.
pub fn start_paths(kind: BackendKind) -> &'static [StartPath] {
    match kind {
        BackendKind::Process | BackendKind::Language => &[StartPath::Warm, StartPath::Cold],
        BackendKind::Vm => &[
            StartPath::Hot,
            StartPath::Reset,
            StartPath::Argument,
            StartPath::Function,
            StartPath::Base,
            StartPath::Cold,
        ],
    }
}

/// Paths measured like warm ones (many iterations, throughput): a `reset`
/// start reuses a resident instance too, reset to its function snapshot.
fn is_warm(start: StartPath) -> bool {
    matches!(start, StartPath::Warm | StartPath::Hot | StartPath::Reset)
}

/// Runs the experiment on each of `backends`, in turn.
pub fn run(opts: &Options, config: &Config, backends: &[BackendKind]) -> Vec<Row> {
    let mut rows = Vec::new();
    for &kind in backends {
        rows.extend(run_backend(kind, opts, config));
    }
    rows
}

fn run_backend(kind: BackendKind, opts: &Options, config: &Config) -> Vec<Row> {
    let mut config = config.clone();
    // One idle vm instance per function is all a hot start needs. With the
    // default pool of 16, the forced restores of the snapshot rows would
    // leave up to 16 VMs per function alive, and making a VM on this host
    // gets slower with every VM alive (`vmm` example `create_vm_scaling`):
    // the later rows would measure that growth rather than their start.
    config.vm.idle_per_function.get_or_insert(1);
    // Language: one worker (on core 1), as Boucher et al. measure theirs;
    // the callers are pinned apart from it (see `throughput`).
    config.language.workers.get_or_insert(1);
    let backend: Arc<dyn Backend> = match microfaas::open(kind, config) {
        Ok(b) => Arc::from(b),
        Err(e) => {
            return start_paths(kind)
                .iter()
                .map(|&s| Row::skipped(kind, s, 0, e.to_string()))
                .collect();
        }
    };
    let artifact = match microfaas::builtin("noop") {
        Ok(a) => a,
        Err(e) => {
            return start_paths(kind)
                .iter()
                .map(|&s| Row::skipped(kind, s, 0, e.to_string()))
                .collect();
        }
    };
    let deploy = bar(
        u64::try_from(opts.functions).unwrap_or(0),
        &format!("{kind}: deploying noop"),
    );
    let mut ids = Vec::with_capacity(opts.functions);
    for i in 0..opts.functions {
        // On `language` and `process` each function is its own artifact (as
        // the paper's are each their own shared object): in a language worker
        // its own image. The vm rows share one artifact (one snapshot chain).
        let artifact = if kind == BackendKind::Vm {
            artifact.clone()
        } else {
            match microfaas::Artifact::load(artifact.path()) {
                Ok(a) => Arc::new(a),
                Err(_) => artifact.clone(),
            }
        };
        match backend.deploy(&FunctionSpec::new(format!("noop-{i}"), artifact)) {
            Ok(id) => ids.push(id),
            Err(e) => {
                deploy.finish_and_clear();
                return start_paths(kind)
                    .iter()
                    .map(|&s| Row::skipped(kind, s, i, format!("deploying noop #{i}: {e}")))
                    .collect();
            }
        }
        deploy.inc(1);
    }
    deploy.finish_and_clear();
    start_paths(kind)
        .iter()
        .map(|&start| {
            if start == StartPath::Argument {
                // Only a function that reaches `checkpoint()` has argument
                // snapshots: this row measures `checkpointed` resuming after
                // its checkpoint, for one input seen before.
                let workload = Workload {
                    function: "checkpointed",
                    input: b"table1",
                };
                match microfaas::builtin(workload.function)
                    .and_then(|a| backend.deploy(&FunctionSpec::new(workload.function, a)))
                {
                    Ok(id) => measure(backend.as_ref(), kind, start, &[id], &workload, opts),
                    Err(e) => Row::skipped(kind, start, ids.len(), e.to_string()),
                }
            } else if start == StartPath::Reset {
                reset_row(backend.as_ref(), kind, &artifact, ids.len(), opts)
            } else {
                measure(backend.as_ref(), kind, start, &ids, &NOOP, opts)
            }
        })
        .chain(interpreted_rows(backend.as_ref(), kind, opts))
        .collect()
}

/// The interpreted `noop` (`wasm-noop`: the same function as WebAssembly,
/// run by the wasmi runtime artifact), one deployment, on the paths that
/// show what an interpreter costs per request: warm/hot (instantiate and
/// run the compiled module) and the start that skips its compile
/// (`function` on vm; on process and language a cold start compiles it).
pub fn interpreted_paths(kind: BackendKind) -> &'static [StartPath] {
    match kind {
        BackendKind::Process | BackendKind::Language => &[StartPath::Warm, StartPath::Cold],
        BackendKind::Vm => &[StartPath::Hot, StartPath::Function],
    }
}

fn interpreted_rows(backend: &dyn Backend, kind: BackendKind, opts: &Options) -> Vec<Row> {
    let id = match microfaas::builtin(WASM_NOOP.function)
        .and_then(|a| backend.deploy(&FunctionSpec::new(WASM_NOOP.function, a)))
    {
        Ok(id) => id,
        Err(e) => {
            return interpreted_paths(kind)
                .iter()
                .map(|&s| Row {
                    function: WASM_NOOP.function.to_owned(),
                    ..Row::skipped(kind, s, 1, e.to_string())
                })
                .collect();
        }
    };
    interpreted_paths(kind)
        .iter()
        .map(|&start| {
            let row = measure(backend, kind, start, std::slice::from_ref(&id), &WASM_NOOP, opts);
            Row {
                function: WASM_NOOP.function.to_owned(),
                ..row
            }
        })
        .collect()
}

/// The `reset` row: as many copies of `noop` deployed
/// `fresh_per_request`, invoked `Auto`: each request after a function's
/// first gets its instance reset to the function snapshot (the reset queued
/// when the previous request gave the instance back). The copies are
/// evicted after the row, so that their VMs do not slow the later rows.
fn reset_row(
    backend: &dyn Backend,
    kind: BackendKind,
    artifact: &Arc<microfaas::Artifact>,
    n: usize,
    opts: &Options,
) -> Row {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let spec = FunctionSpec::new(format!("noop-fresh-{i}"), Arc::clone(artifact)).with_fresh_per_request(true);
        match backend.deploy(&spec) {
            Ok(id) => ids.push(id),
            Err(e) => return Row::skipped(kind, StartPath::Reset, i, format!("deploying noop-fresh #{i}: {e}")),
        }
    }
    let row = measure(backend, kind, StartPath::Reset, &ids, &NOOP, opts);
    for id in &ids {
        let _ = backend.evict(id);
    }
    row
}

/// What a row invokes.
struct Workload {
    function: &'static str,
    input: &'static [u8],
}

/// The paper's microbenchmark.
const NOOP: Workload = Workload {
    function: "noop",
    input: b"",
};

/// The interpreted microbenchmark: `noop` as a WebAssembly module.
const WASM_NOOP: Workload = Workload {
    function: "wasm-noop",
    input: b"",
};

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

fn measure(
    backend: &dyn Backend,
    kind: BackendKind,
    start: StartPath,
    ids: &[FunctionId],
    workload: &Workload,
    opts: &Options,
) -> Row {
    let iterations = if is_warm(start) {
        opts.warm_iterations
    } else {
        opts.cold_iterations
    };
    let warmup = (iterations / 10).clamp(1, 500);
    // `reset` is what a fresh-per-request function's requests take by
    // themselves (after each function's first, which is `hot`).
    let request = if start == StartPath::Reset {
        StartRequest::Auto
    } else {
        StartRequest::Force(start)
    };
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    // The vm latency caller runs on core 0 (see the module doc); the mask
    // it had is put back before the throughput threads, which inherit it.
    let restore = (kind == BackendKind::Vm).then(pin_saving).flatten();
    // Probe once: a path the backend lacks is a skipped row, not an error count.
    if let Err(e) = backend.invoke(&ids[rng.next(ids.len())], workload.input, request) {
        restore_affinity(restore);
        return Row::skipped(kind, start, ids.len(), e.to_string());
    }
    let pb = bar(warmup + iterations, &format!("{kind} {start}"));
    let mut dispatch = Latencies::new();
    let mut e2e = Latencies::new();
    let mut errors = 0;
    let mut first_error = None;
    for i in 0..warmup + iterations {
        let id = &ids[rng.next(ids.len())];
        match backend.invoke(id, workload.input, request) {
            Ok(inv) if i >= warmup && (start != StartPath::Reset || inv.start == start) => {
                dispatch.record_ns(inv.timings.dispatch_ns);
                e2e.record_ns(inv.timings.total_ns);
            }
            Ok(_) => {}
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| microfaas::error_chain(&e));
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    restore_affinity(restore);
    let language = kind == BackendKind::Language;
    let throughput_per_s = is_warm(start).then(|| {
        if language {
            // Callers + the one worker <= cores, none on the worker's core 1.
            let callers = cores().saturating_sub(1).max(1);
            throughput(backend, ids, request, opts.throughput_time, callers, true)
        } else {
            throughput(backend, ids, request, opts.throughput_time, cores(), false)
        }
    });
    let throughput_serial_per_s = (language && is_warm(start))
        .then(|| throughput(backend, ids, request, opts.throughput_time, 1, true))
        .flatten();
    // A start that resumes a function after its checkpoint has no entry
    // timestamp of its own (the function was entered before the snapshot):
    // its start latency is the end-to-end time.
    let (latency_basis, basis) = if start == StartPath::Argument {
        ("end_to_end", e2e.clone())
    } else {
        ("dispatch", dispatch.clone())
    };
    let d = basis.summary();
    Row {
        latency_basis,
        backend: kind,
        start,
        function: workload.function.to_owned(),
        functions_deployed: ids.len(),
        median_us: Some(d.median_us),
        p99_us: Some(d.p99_us),
        p999_us: Some(d.p999_us),
        end_to_end: Some(e2e.summary()),
        throughput_per_s: throughput_per_s.flatten(),
        throughput_serial_per_s,
        samples: dispatch.len(),
        errors,
        first_error,
        skipped: None,
        dispatch: Some(basis),
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Pins the calling thread to `cpu` (best effort).
fn pin(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Pins the calling thread to core 0 and returns the mask it had (None:
/// unknown, nothing changed).
fn pin_saving() -> Option<nix::sched::CpuSet> {
    let previous = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
    pin(0);
    Some(previous)
}

/// Puts back a mask `pin_saving` returned (best effort).
fn restore_affinity(previous: Option<nix::sched::CpuSet>) {
    if let Some(set) = previous {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Invocations per second with `threads` caller threads, all busy; with
/// `pinned` each on its own core, skipping core 1 (a language worker's),
/// each issuing one request at a time.
fn throughput(
    backend: &dyn Backend,
    ids: &[FunctionId],
    request: StartRequest,
    time: Duration,
    threads: usize,
    pinned: bool,
) -> Option<f64> {
    let done = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (done, failed, stop) = (&done, &failed, &stop);
            s.spawn(move || {
                if pinned {
                    pin(if t == 0 { 0 } else { t + 1 });
                }
                let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ u64::try_from(t).unwrap_or(0).wrapping_add(1));
                while !stop.load(Ordering::Relaxed) {
                    match backend.invoke(&ids[rng.next(ids.len())], b"", request) {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(e) if e.kind() == ErrorKind::UnsupportedStart => return,
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        std::thread::sleep(time);
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = started.elapsed();
    let n = done.load(Ordering::Relaxed);
    (n > 0).then(|| ratio(n, 1) / elapsed.as_secs_f64())
}

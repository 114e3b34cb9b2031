//! `http`: what the HTTP front end costs. The same `noop` and `sha512`
//! through `microfaas serve` (in this process, SigV4 on, access log written
//! to /dev/null) and through the `Backend` trait, per backend and start
//! path: end-to-end latency percentiles (sequential, one keep-alive
//! connection), the front end's share of each request (client end to end
//! minus the backend's own `total_ns`, from `X-Microfaas-Timings`), and
//! throughput with C keep-alive clients on the warm/hot path.

use crate::stats::{Latencies, Summary};
use microfaas::serve::client::{Client, Signer};
use microfaas::{Backend, BackendKind, Config, FunctionSpec, StartPath, StartRequest};
use serde::Serialize;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Knobs of the experiment.
#[derive(Debug, Clone)]
pub struct Options {
    /// Sequential invocations per warm/hot row.
    pub warm_iterations: u64,
    /// Sequential invocations per forced-start row.
    pub cold_iterations: u64,
    /// Client counts of the throughput rows.
    pub concurrency: Vec<usize>,
    /// How long each throughput row runs.
    pub throughput_time: Duration,
}

impl Options {
    /// Defaults, or the `--quick` defaults.
    pub fn new(quick: bool, iterations: Option<u64>) -> Self {
        let (warm, cold, ms) = if quick { (200, 10, 300) } else { (5_000, 200, 2_000) };
        Self {
            warm_iterations: iterations.unwrap_or(warm),
            cold_iterations: iterations.unwrap_or(cold),
            concurrency: if quick { vec![1, 8] } else { vec![1, 4, 16, 64] },
            throughput_time: Duration::from_millis(ms),
        }
    }
}

/// The two workloads: name, input.
const WORKLOADS: [(&str, &[u8]); 2] = [("noop", b""), ("sha512", b"100")];

/// One latency row.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyRow {
    /// The backend.
    pub backend: BackendKind,
    /// `noop` or `sha512`.
    pub function: String,
    /// The start path forced (`warm`/`hot` = the fastest, after a warm-up).
    pub start: StartPath,
    /// Client-side end to end through HTTP (sign, send, serve, receive).
    pub http: Option<Summary>,
    /// The backend's own `total_ns` of the same requests.
    pub backend_total: Option<Summary>,
    /// Per request: `http` minus `backend_total`, the front end's cost.
    pub front_end: Option<Summary>,
    /// End to end through the `Backend` trait (`invoke` call to return).
    pub trait_e2e: Option<Summary>,
    /// Failed requests (should be 0).
    pub errors: u64,
    /// Why the row has no numbers.
    pub skipped: Option<String>,
}

/// One throughput row.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputRow {
    /// The backend.
    pub backend: BackendKind,
    /// `noop` or `sha512`.
    pub function: String,
    /// Keep-alive clients, each on its own connection and thread.
    pub clients: usize,
    /// Completed requests per second.
    pub requests_per_s: f64,
    /// Latency under that load.
    pub latency: Summary,
    /// Failed requests.
    pub errors: u64,
}

/// The experiment's results.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Latency rows.
    pub latency: Vec<LatencyRow>,
    /// Throughput rows.
    pub throughput: Vec<ThroughputRow>,
}

/// The start paths measured per backend.
fn start_paths(kind: BackendKind) -> &'static [StartPath] {
    match kind {
        BackendKind::Process | BackendKind::Language => &[StartPath::Warm, StartPath::Cold],
        BackendKind::Vm => &[StartPath::Hot, StartPath::Function, StartPath::Base],
    }
}

fn force(start: StartPath) -> Option<StartRequest> {
    match start {
        StartPath::Warm | StartPath::Hot => None,
        s => Some(StartRequest::Force(s)),
    }
}

const KEY: &str = "AKIDCOMPAREHTTP";
const SECRET: &str = "compare-http-secret";

/// A server run in this process for the experiment.
struct InProcess {
    addr: SocketAddr,
    stopper: microfaas::serve::Stopper,
    thread: Option<std::thread::JoinHandle<()>>,
    dir: std::path::PathBuf,
}

impl InProcess {
    fn start() -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("microfaas-compare-http-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let creds = dir.join("credentials");
        std::fs::write(
            &creds,
            format!("[default]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\n"),
        )
        .map_err(|e| e.to_string())?;
        let opts = microfaas::serve::ServeOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            credentials: Some(creds),
            registry: dir.join("registry"),
            store: Some(dir.join("server-vm-store")),
            event_queue: 16,
            node_name: Some("compare".into()),
            region: "us-east-1".into(),
            max_connections: 1024,
            drain_timeout: Duration::from_secs(30),
            access_log: Some("/dev/null".into()),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let result = microfaas::serve::run(opts, |addr, stopper| {
                let _ = tx.send(Ok((addr, stopper)));
            });
            if let Err(e) = result {
                let _ = tx.send(Err(e.to_string()));
            }
        });
        let (addr, stopper) = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|e| format!("the server did not start: {e}"))??;
        Ok(Self {
            addr,
            stopper,
            thread: Some(thread),
            dir,
        })
    }

    fn client(&self) -> Result<Client, String> {
        Client::connect(
            self.addr,
            Some(Signer {
                access_key_id: KEY.into(),
                secret: SECRET.into(),
                region: "us-east-1".into(),
                clock_offset_secs: 0,
            }),
        )
        .map_err(|e| format!("connecting to the server: {e}"))
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The backend's `total_ns` of a response.
fn backend_total_ns(r: &microfaas::serve::client::Response) -> Option<u64> {
    r.header("x-microfaas-timings")?
        .split(';')
        .find_map(|kv| kv.strip_prefix("total_ns="))
        .and_then(|v| v.parse().ok())
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Runs the experiment.
pub fn run(opts: &Options) -> Report {
    let mut report = Report {
        latency: Vec::new(),
        throughput: Vec::new(),
    };
    let server = match InProcess::start() {
        Ok(s) => s,
        Err(e) => {
            for kind in BackendKind::ALL {
                for (function, _) in WORKLOADS {
                    for &start in start_paths(kind) {
                        report.latency.push(skipped(kind, function, start, e.clone()));
                    }
                }
            }
            return report;
        }
    };
    for kind in BackendKind::ALL {
        run_backend(&server, kind, opts, &mut report);
    }
    report
}

fn skipped(backend: BackendKind, function: &str, start: StartPath, reason: String) -> LatencyRow {
    LatencyRow {
        backend,
        function: function.to_owned(),
        start,
        http: None,
        backend_total: None,
        front_end: None,
        trait_e2e: None,
        errors: 0,
        skipped: Some(reason),
    }
}

/// The trait baseline: a backend configured as the server configures its
/// own (6 MB payloads, 128 MiB heap: Lambda's default MemorySize).
fn trait_backend(kind: BackendKind) -> Result<Arc<dyn Backend>, String> {
    let mut config = Config {
        input_limit_bytes: microfaas::serve::api::MAX_SYNC_PAYLOAD_BYTES,
        output_limit_bytes: microfaas::serve::api::MAX_SYNC_PAYLOAD_BYTES,
        heap_limit_bytes: 128 << 20,
        ..Config::default()
    };
    let store = std::env::temp_dir().join(format!("microfaas-compare-http-trait-{}", std::process::id()));
    config.vm.store_dir = Some(store);
    microfaas::open(kind, config).map(Arc::from).map_err(|e| e.to_string())
}

fn run_backend(server: &InProcess, kind: BackendKind, opts: &Options, report: &mut Report) {
    let runtime = format!("microfaas-{kind}");
    let trait_side = trait_backend(kind);
    for (function, input) in WORKLOADS {
        let name = format!("{function}-{kind}");
        let prepared = (|| -> Result<(Client, Arc<dyn Backend>, microfaas::FunctionId), String> {
            let mut c = server.client()?;
            let code = std::fs::read(microfaas::builtin_dir().join(format!("{function}.so")))
                .map_err(|e| format!("reading {function}.so: {e}"))?;
            let r = c.create_function(&name, &runtime, &code).map_err(|e| e.to_string())?;
            if r.status != 201 {
                return Err(format!(
                    "CreateFunction: {} {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ));
            }
            let r = c.invoke(&name, input, None).map_err(|e| e.to_string())?;
            if r.status != 200 || r.header("x-amz-function-error").is_some() {
                return Err(format!(
                    "first invoke: {} {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ));
            }
            let backend = trait_side.clone()?;
            let artifact = microfaas::builtin(function).map_err(|e| e.to_string())?;
            let id = backend
                .deploy(&FunctionSpec::new(name.clone(), artifact))
                .map_err(|e| e.to_string())?;
            Ok((c, backend, id))
        })();
        let (mut c, backend, id) = match prepared {
            Ok(p) => p,
            Err(e) => {
                for &start in start_paths(kind) {
                    report.latency.push(skipped(kind, function, start, e.clone()));
                }
                continue;
            }
        };
        for &start in start_paths(kind) {
            let iterations = if force(start).is_none() {
                opts.warm_iterations
            } else {
                opts.cold_iterations
            };
            let start_header = force(start).map(|_| start.as_str());
            let (mut http, mut total, mut front, mut traitl) =
                (Latencies::new(), Latencies::new(), Latencies::new(), Latencies::new());
            let mut errors = 0;
            for _ in 0..iterations {
                let t0 = Instant::now();
                let r = c.invoke(&name, input, start_header);
                let e2e = ns(t0.elapsed());
                match r {
                    Ok(r) if r.status == 200 && r.header("x-amz-function-error").is_none() => {
                        http.record_ns(e2e);
                        if let Some(t) = backend_total_ns(&r) {
                            total.record_ns(t);
                            front.record_ns(e2e.saturating_sub(t));
                        }
                    }
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        match server.client() {
                            Ok(fresh) => c = fresh,
                            Err(_) => break,
                        }
                    }
                }
            }
            let req = force(start).unwrap_or_default();
            for _ in 0..iterations {
                let t0 = Instant::now();
                let r = backend.invoke(&id, input, req);
                let e2e = ns(t0.elapsed());
                if r.is_ok() {
                    traitl.record_ns(e2e);
                } else {
                    errors += 1;
                }
            }
            let some = |l: &Latencies| (l.len() > 0).then(|| l.summary());
            report.latency.push(LatencyRow {
                backend: kind,
                function: function.to_owned(),
                start,
                http: some(&http),
                backend_total: some(&total),
                front_end: some(&front),
                trait_e2e: some(&traitl),
                errors,
                skipped: None,
            });
        }
        for &clients in &opts.concurrency {
            if let Some(row) = throughput(server, kind, &name, function, input, clients, opts.throughput_time) {
                report.throughput.push(row);
            }
        }
    }
}

fn throughput(
    server: &InProcess,
    kind: BackendKind,
    name: &str,
    function: &str,
    input: &'static [u8],
    clients: usize,
    time: Duration,
) -> Option<ThroughputRow> {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(server.client().ok()?);
    }
    let started = Instant::now();
    let threads: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            let stop = Arc::clone(&stop);
            let errors = Arc::clone(&errors);
            let name = name.to_owned();
            std::thread::spawn(move || {
                let mut samples: Vec<u64> = Vec::with_capacity(1 << 16);
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    match c.invoke(&name, input, None) {
                        Ok(r) if r.status == 200 && r.header("x-amz-function-error").is_none() => {
                            samples.push(ns(t0.elapsed()));
                        }
                        Ok(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                samples
            })
        })
        .collect();
    std::thread::sleep(time);
    stop.store(true, Ordering::Relaxed);
    let mut all = Latencies::new();
    for t in threads {
        if let Ok(samples) = t.join() {
            for s in samples {
                all.record_ns(s);
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let per_s = all.len() as f64 / elapsed;
    Some(ThroughputRow {
        backend: kind,
        function: function.to_owned(),
        clients,
        requests_per_s: per_s,
        latency: all.summary(),
        errors: errors.load(Ordering::Relaxed),
    })
}

fn cell(s: Option<&Summary>, f: impl Fn(&Summary) -> f64) -> String {
    s.map_or_else(|| "-".to_owned(), |s| format!("{:.1}", f(s)))
}

/// The report as text tables.
pub fn text(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<9} {:<7} {:<9} {:>10} {:>10} {:>10} {:>10} {:>11} {:>10} {:>7}",
        "backend", "fn", "start", "http p50", "http p99", "trait p50", "trait p99", "front p50", "front p99", "errors"
    );
    for row in &r.latency {
        if let Some(why) = &row.skipped {
            let _ = writeln!(
                out,
                "{:<9} {:<7} {:<9} skipped: {why}",
                row.backend, row.function, row.start
            );
            continue;
        }
        let _ = writeln!(
            out,
            "{:<9} {:<7} {:<9} {:>10} {:>10} {:>10} {:>10} {:>11} {:>10} {:>7}",
            row.backend,
            row.function,
            row.start,
            cell(row.http.as_ref(), |s| s.median_us),
            cell(row.http.as_ref(), |s| s.p99_us),
            cell(row.trait_e2e.as_ref(), |s| s.median_us),
            cell(row.trait_e2e.as_ref(), |s| s.p99_us),
            cell(row.front_end.as_ref(), |s| s.median_us),
            cell(row.front_end.as_ref(), |s| s.p99_us),
            row.errors
        );
    }
    let _ = writeln!(
        out,
        "(latencies in us; front = http end to end minus the backend's own total)\n"
    );
    let _ = writeln!(
        out,
        "{:<9} {:<7} {:>7} {:>12} {:>10} {:>10} {:>7}",
        "backend", "fn", "clients", "req/s", "p50 us", "p99 us", "errors"
    );
    for t in &r.throughput {
        let _ = writeln!(
            out,
            "{:<9} {:<7} {:>7} {:>12.0} {:>10.1} {:>10.1} {:>7}",
            t.backend, t.function, t.clients, t.requests_per_s, t.latency.median_us, t.latency.p99_us, t.errors
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_run_on_process_fills_every_row_without_errors() {
        let opts = Options {
            warm_iterations: 20,
            cold_iterations: 3,
            concurrency: vec![1, 4],
            throughput_time: Duration::from_millis(200),
        };
        let server = InProcess::start().unwrap();
        let mut report = Report {
            latency: Vec::new(),
            throughput: Vec::new(),
        };
        run_backend(&server, BackendKind::Process, &opts, &mut report);
        assert_eq!(report.latency.len(), 4, "noop and sha512, warm and cold");
        for row in &report.latency {
            assert_eq!(row.skipped, None);
            assert_eq!(row.errors, 0, "{row:?}");
            let http = row.http.unwrap();
            assert_eq!(http.count, if row.start == StartPath::Warm { 20 } else { 3 });
            assert!(row.front_end.unwrap().median_us > 0.0);
            assert!(row.trait_e2e.is_some());
        }
        assert_eq!(report.throughput.len(), 4);
        assert!(report.throughput.iter().all(|t| t.errors == 0 && t.latency.count > 0));
        let t = text(&report);
        assert!(t.contains("sha512") && t.contains("req/s"), "{t}");
    }
}

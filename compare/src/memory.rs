//! `memory`: resident host memory for N deployed (and once invoked)
//! functions on each backend (the paper: 2 GiB for processes vs 1.3 GiB for
//! the language backend at 5,000 functions).
//!
//! Each function is its own copy of the `noop` artifact (a distinct file),
//! so no backend can share one loaded image between them.
//!
//! Tenants: the functions are spread round-robin over T tenants
//! (`--memory-tenants`, default 1 and 10). On `language` every tenant has
//! its own workers (a worker per core each), so the memory grows with T:
//! the row reports the live workers and the memory per tenant. The
//! experiment raises `max_workers` so that every tenant stays warm (the
//! cost of holding them all); with the default cap of 16, tenants beyond it
//! would be stopped, idle longest first, and start cold. `process` runs a
//! runner per function whatever the tenant (only its uid changes) and `vm`
//! a VM per instance, so they are measured with one tenant only.

use crate::progress::bar;
use microfaas::{Artifact, BackendKind, Config, FunctionSpec, StartRequest, Tenant};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Backend measured.
    pub backend: BackendKind,
    /// Functions deployed and invoked once.
    pub functions: usize,
    /// Tenants the functions are spread over (round robin).
    pub tenants: usize,
    /// Worker processes alive at the end (`language`), else `None`.
    pub workers: Option<u64>,
    /// The memory per tenant, MiB.
    pub per_tenant_mib: Option<f64>,
    /// Proportional set size of the workers (`language`: shared pages such
    /// as the worker binary's split between them), MiB.
    pub workers_pss_mib: Option<f64>,
    /// Memory the backend reports for its instances, MiB.
    pub memory_mib: Option<f64>,
    /// The same per function, KiB.
    pub per_function_kib: Option<f64>,
    /// Instances the backend reports.
    pub instances: Option<usize>,
    /// Why there are no numbers, if there are none.
    pub skipped: Option<String>,
}

/// Function counts measured by default (or with `--quick`).
pub fn default_steps(quick: bool) -> Vec<usize> {
    if quick { vec![10, 50] } else { vec![100, 1000] }
}

/// Tenant counts measured by default (or with `--quick`).
pub fn default_tenants(quick: bool) -> Vec<usize> {
    if quick { vec![1, 5] } else { vec![1, 10] }
}

/// Runs the experiment: each of `backends` with one tenant, and `language`
/// with each of `tenants` (other than 1) too.
pub fn run(steps: &[usize], tenants: &[usize], config: &Config, backends: &[BackendKind]) -> Vec<Row> {
    let mut rows = Vec::new();
    for &kind in backends {
        for &n in steps {
            rows.push(measure(kind, n, 1, config));
            if kind == BackendKind::Language {
                for &t in tenants.iter().filter(|&&t| t > 1) {
                    rows.push(measure(kind, n, t, config));
                }
            }
        }
    }
    rows
}

/// The label of tenant `i` of the experiment.
fn tenant(i: usize, tenants: usize) -> Tenant {
    if tenants <= 1 {
        return Tenant::default();
    }
    Tenant::new(&format!("mem-{i}")).unwrap_or_default()
}

#[allow(clippy::cast_precision_loss)]
fn measure(kind: BackendKind, n: usize, tenants: usize, config: &Config) -> Row {
    let tenants = tenants.clamp(1, n.max(1));
    let skipped = |reason: String| Row {
        backend: kind,
        functions: n,
        tenants,
        workers: None,
        per_tenant_mib: None,
        workers_pss_mib: None,
        memory_mib: None,
        per_function_kib: None,
        instances: None,
        skipped: Some(reason),
    };
    let mut config = config.clone();
    if kind == BackendKind::Language {
        // Hold every tenant's workers live: the cost being measured.
        let per_tenant = config
            .language
            .workers
            .unwrap_or_else(|| cores().saturating_sub(1))
            .max(1);
        let all = tenants.saturating_mul(per_tenant);
        config.language.max_workers = Some(
            all.saturating_add(per_tenant)
                .max(config.language.max_workers.unwrap_or(0)),
        );
    }
    let backend = match microfaas::open(kind, config) {
        Ok(b) => b,
        Err(e) => return skipped(e.to_string()),
    };
    let copies = match distinct_copies(n) {
        Ok(c) => c,
        Err(e) => return skipped(e),
    };
    let pb = bar(u64::try_from(n).unwrap_or(0), &format!("{kind}: {n} functions"));
    for i in 0..n {
        let deployed = backend
            .deploy(
                &FunctionSpec::new(format!("noop-{i}"), copies.artifacts[i].clone())
                    .with_tenant(tenant(i % tenants, tenants)),
            )
            .and_then(|id| backend.invoke(&id, b"", StartRequest::Auto));
        if let Err(e) = deployed {
            pb.finish_and_clear();
            return skipped(format!("function #{i}: {e}"));
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let stats = backend.stats();
    let mib = stats.memory_bytes as f64 / (1024.0 * 1024.0);
    let workers = (kind == BackendKind::Language).then(|| stats.counter("workers").unwrap_or(0));
    Row {
        backend: kind,
        functions: n,
        tenants,
        workers,
        per_tenant_mib: Some(mib / tenants as f64),
        workers_pss_mib: workers.map(|_| {
            let pss_kib: u64 = stats
                .extra
                .iter()
                .filter(|(k, v)| k.starts_with("worker") && k.ends_with("_pid") && *v != 0)
                .filter_map(|(_, pid)| pss_kib(*pid))
                .sum();
            pss_kib as f64 / 1024.0
        }),
        memory_mib: Some(mib),
        per_function_kib: Some(stats.memory_bytes as f64 / 1024.0 / n.max(1) as f64),
        instances: Some(stats.instances),
        skipped: None,
    }
}

/// `n` copies of the `noop` artifact in a temporary directory (removed on
/// drop), loaded and verified.
struct Copies {
    dir: PathBuf,
    artifacts: Vec<Arc<Artifact>>,
}

impl Drop for Copies {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn distinct_copies(n: usize) -> Result<Copies, String> {
    let noop = microfaas::builtin("noop").map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("microfaas-compare-memory-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut copies = Copies {
        dir,
        artifacts: Vec::with_capacity(n),
    };
    for i in 0..n {
        let path = copies.dir.join(format!("noop-{i}.so"));
        std::fs::write(&path, noop.bytes().as_ref()).map_err(|e| format!("writing {}: {e}", path.display()))?;
        copies
            .artifacts
            .push(Arc::new(Artifact::load(&path).map_err(|e| e.to_string())?));
    }
    Ok(copies)
}

/// CPUs online.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// `Pss:` of process `pid` from `/proc/PID/smaps_rollup`, KiB.
fn pss_kib(pid: u64) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

//! `memory`: resident host memory for N deployed (and once invoked)
//! functions on each backend (the paper: 2 GiB for processes vs 1.3 GiB for
//! the language backend at 5,000 functions).

use crate::progress::bar;
use microfaas::{BackendKind, Config, FunctionSpec, StartRequest};
use serde::Serialize;

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Backend measured.
    pub backend: BackendKind,
    /// Functions deployed and invoked once.
    pub functions: usize,
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

/// Runs the experiment.
pub fn run(steps: &[usize], config: &Config) -> Vec<Row> {
    let mut rows = Vec::new();
    for kind in BackendKind::ALL {
        for &n in steps {
            rows.push(measure(kind, n, config));
        }
    }
    rows
}

#[allow(clippy::cast_precision_loss)]
fn measure(kind: BackendKind, n: usize, config: &Config) -> Row {
    let skipped = |reason: String| Row {
        backend: kind,
        functions: n,
        memory_mib: None,
        per_function_kib: None,
        instances: None,
        skipped: Some(reason),
    };
    let backend = match microfaas::open(kind, config.clone()) {
        Ok(b) => b,
        Err(e) => return skipped(e.to_string()),
    };
    let artifact = match microfaas::builtin("noop") {
        Ok(a) => a,
        Err(e) => return skipped(e.to_string()),
    };
    let pb = bar(u64::try_from(n).unwrap_or(0), &format!("{kind}: {n} functions"));
    for i in 0..n {
        let deployed = backend
            .deploy(&FunctionSpec::new(format!("noop-{i}"), artifact.clone()))
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
    Row {
        backend: kind,
        functions: n,
        memory_mib: Some(mib),
        per_function_kib: Some(stats.memory_bytes as f64 / 1024.0 / n.max(1) as f64),
        instances: Some(stats.instances),
        skipped: None,
    }
}

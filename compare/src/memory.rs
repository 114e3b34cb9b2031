//! `memory`: resident host memory for N deployed (and once invoked)
//! functions on each backend (the paper: 2 GiB for processes vs 1.3 GiB for
//! the language backend at 5,000 functions).
//!
//! Each function is its own copy of the `noop` artifact (a distinct file),
//! so no backend can share one loaded image between them.

use crate::progress::bar;
use microfaas::{Artifact, BackendKind, Config, FunctionSpec, StartRequest};
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
    let copies = match distinct_copies(n) {
        Ok(c) => c,
        Err(e) => return skipped(e),
    };
    let pb = bar(u64::try_from(n).unwrap_or(0), &format!("{kind}: {n} functions"));
    for i in 0..n {
        let deployed = backend
            .deploy(&FunctionSpec::new(format!("noop-{i}"), copies.artifacts[i].clone()))
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

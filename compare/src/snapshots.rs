//! `snapshots`: SEUSS's view of the `vm` backend. Start latency to the
//! first reply by snapshot level (cold, base, function, argument, hot),
//! deploy time (which creates the function node), node sizes in pages and
//! bytes, private host memory per idle restored instance, and the density
//! curve (see [`crate::density`]). Runs on a fresh temporary store, removed
//! afterwards.

use crate::density::{self, Density};
use crate::stats::{Latencies, Summary};
use microfaas::{Backend, BackendKind, Config, FunctionSpec, StartPath, StartRequest};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// Functions deployed (each gets a function node). The `wasm-*` ones are
/// interpreted: the wasmi runtime artifact with a WebAssembly module, whose
/// function node holds the module parsed, validated and compiled
/// (`wasm-large`: 4 MiB of WebAssembly).
const FUNCTIONS: [&str; 8] = [
    "noop",
    "echo",
    "sha512",
    "init-heavy",
    "checkpointed",
    "wasm-noop",
    "wasm-large",
    "wasm-checkpointed",
];

/// Interpreted functions deployed the other way: `wasm-runtime` (the
/// runtime alone) with the module as deploy-time data, named
/// `wasm-NAME-module`. Their base is the runtime base (the guest with the
/// runtime loaded and initialised, taken once), so the levels are SEUSS's:
/// cold = boot + runtime init + compile; base = runtime base + compile;
/// function = the module compiled; argument; hot.
const MODULE_FUNCTIONS: [&str; 3] = ["noop", "large", "checkpointed"];

/// The spec of `name`: a built-in artifact, or (`wasm-NAME-module`)
/// `wasm-runtime` with the built-in module NAME.
fn spec(name: &str) -> Result<FunctionSpec, microfaas::Error> {
    match name.strip_prefix("wasm-").and_then(|n| n.strip_suffix("-module")) {
        Some(module) => Ok(FunctionSpec::new(name, microfaas::builtin(microfaas::WASM_RUNTIME)?)
            .with_module(microfaas::builtin_module(module)?)),
        None => Ok(FunctionSpec::new(name, microfaas::builtin(name)?)),
    }
}

/// Start latency of one function from one level.
#[derive(Debug, Clone, Serialize)]
pub struct LevelRow {
    /// Function started.
    pub function: String,
    /// Level it started from.
    pub start: StartPath,
    /// End-to-end latency (invoke to reply), µs.
    pub end_to_end: Option<Summary>,
    /// Why there are no numbers, if there are none.
    pub skipped: Option<String>,
}

/// One node of the store after the run.
#[derive(Debug, Clone, Serialize)]
pub struct NodeRow {
    /// `base`, `function` or `argument`.
    pub level: String,
    /// Function name, digest and input hash, as the store labels it.
    pub label: String,
    /// Pages the node stores itself (its delta).
    pub own_pages: u64,
    /// Size of its node file, bytes.
    pub bytes_on_disk: u64,
}

/// Everything the experiment measured.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// Start latency by level.
    pub levels: Vec<LevelRow>,
    /// `(function, deploy time in ms)`: deploying creates the function node.
    pub deploy_ms: Vec<(String, f64)>,
    /// The store's nodes.
    pub nodes: Vec<NodeRow>,
    /// Private host memory per idle restored `noop` instance, KiB: the
    /// guest pages written plus the vm host processes' own private memory,
    /// over the idle instances (KVM's kernel memory is not included).
    pub idle_private_kib: Option<f64>,
    /// Idle `noop` instances started from its function node, in steps.
    pub density: Option<Density>,
    /// Why the experiment did not run, if it did not.
    pub skipped: Option<String>,
}

/// Temporary store directory, removed on drop.
struct TempStore(PathBuf);

impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the experiment (`quick`: fewer starts per level); the density
/// curve steps up to `max_instances`.
pub fn run(quick: bool, max_instances: usize, base: &Config) -> Report {
    let store = TempStore(std::env::temp_dir().join(format!("microfaas-compare-store-{}", std::process::id())));
    let mut config = base.clone();
    config.vm.store_dir = Some(store.0.clone());
    let backend = match microfaas::open(BackendKind::Vm, config) {
        Ok(b) => b,
        Err(e) => {
            return Report {
                skipped: Some(e.to_string()),
                ..Report::default()
            };
        }
    };
    let mut report = Report::default();
    let mut ids = Vec::new();
    let names = FUNCTIONS
        .iter()
        .map(|&n| n.to_owned())
        .chain(MODULE_FUNCTIONS.iter().map(|n| format!("wasm-{n}-module")));
    for name in names {
        let started = Instant::now();
        match spec(&name).and_then(|spec| backend.deploy(&spec)) {
            Ok(id) => {
                report
                    .deploy_ms
                    .push((name.clone(), started.elapsed().as_secs_f64() * 1e3));
                ids.push((name, id));
            }
            Err(e) => {
                report.skipped = Some(format!("deploying {name}: {e}"));
                return report;
            }
        }
    }
    let n = |start: StartPath| -> u32 {
        match (start, quick) {
            (StartPath::Hot | StartPath::Reset, false) => 1000,
            (StartPath::Hot | StartPath::Reset, true) => 50,
            (_, false) => 40,
            (_, true) => 4,
        }
    };
    for (name, id) in &ids {
        let (starts, input): (&[StartPath], &[u8]) = match name.as_str() {
            "noop" | "init-heavy" | "wasm-noop" | "wasm-large" | "wasm-noop-module" | "wasm-large-module" => (
                &[
                    StartPath::Cold,
                    StartPath::Base,
                    StartPath::Function,
                    StartPath::Hot,
                    StartPath::Reset,
                ],
                b"",
            ),
            "checkpointed" | "wasm-checkpointed" | "wasm-checkpointed-module" => {
                (&[StartPath::Function, StartPath::Argument], b"snapshots")
            }
            _ => continue,
        };
        for &start in starts {
            report
                .levels
                .push(measure(backend.as_ref(), name, id, start, input, n(start)));
        }
    }
    // Idle memory of `noop` instances alone: drop every other function's.
    for (name, id) in &ids {
        if name != "noop" {
            let _ = backend.evict(id);
        }
    }
    let stats = backend.stats();
    if let (Some(idle), Some(private)) = (
        stats.counter("restored_idle_instances").filter(|&i| i > 0),
        stats.counter("restored_idle_private_bytes"),
    ) {
        #[allow(clippy::cast_precision_loss)]
        let kib = private as f64 / 1024.0 / idle as f64;
        report.idle_private_kib = Some(kib);
    }
    drop(backend);
    report.density = Some(run_density(&store.0, max_instances, base));
    match snapshots::Store::open(&store.0).map(|s| snapshots::tree(&s)) {
        Ok(Ok(tree)) => {
            let mut stack: Vec<&snapshots::TreeNode> = tree.roots.iter().collect();
            while let Some(node) = stack.pop() {
                report.nodes.push(NodeRow {
                    level: node.level.to_string(),
                    label: node.label.to_string(),
                    own_pages: node.own_pages,
                    bytes_on_disk: node.bytes_on_disk,
                });
                stack.extend(node.children.iter());
            }
        }
        Ok(Err(e)) => report.skipped = Some(format!("reading the store: {e}")),
        Err(e) => report.skipped = Some(format!("opening the store: {e}")),
    }
    report
}

/// Guest memory of the density curve's instances, MiB: a small guest, as
/// SEUSS's unikernel instances are (`noop` needs a few pages of heap). KVM's
/// per-VM bookkeeping grows with the guest's size (reverse maps per 4 KiB
/// page of every memory slot), so the default 80 MiB guest would cost ~200
/// KiB of kernel memory per idle instance where this one costs less.
pub const DENSITY_GUEST_MIB: usize = 16;
/// Function image region of the density curve's guest, MiB (`noop` is a
/// few KiB; 16 MiB of guest memory leaves no heap with the default 8).
pub const DENSITY_IMAGE_MIB: usize = 2;
/// Input and output limits of the density curve's instances, bytes.
const DENSITY_IO_LIMIT_BYTES: usize = 64 << 10;

/// The density curve on a backend of its own, in a store of its own under
/// the experiment's (its own base and `noop` function node, for the smaller
/// guest), without
/// pre-created VM shells: a pool of a few shells cannot serve thousands of
/// starts anyway, and shells made before the baseline would hide their
/// memory from the first instances.
fn run_density(store: &std::path::Path, max_instances: usize, base: &Config) -> Density {
    let mut config = base.clone();
    // A store of its own: the other experiments' nodes are of the default
    // guest size, which this backend's store checks refuse as too large.
    config.vm.store_dir = Some(store.join("density"));
    config.vm.shell_pool = Some(0);
    config.vm.guest_mem_mib = Some(DENSITY_GUEST_MIB);
    config.vm.image_mib = Some(DENSITY_IMAGE_MIB);
    // The I/O window holds the larger of the two limits (rounded to 2 MiB):
    // `noop` takes and returns nothing, and the default 4 MiB would not fit.
    config.input_limit_bytes = DENSITY_IO_LIMIT_BYTES;
    config.output_limit_bytes = DENSITY_IO_LIMIT_BYTES;
    let skipped = |reason: String| Density {
        skipped: Some(reason),
        ..Density::default()
    };
    let backend = match microfaas::open(BackendKind::Vm, config) {
        Ok(b) => b,
        Err(e) => return skipped(e.to_string()),
    };
    match microfaas::builtin("noop").and_then(|a| backend.deploy(&FunctionSpec::new("noop", a))) {
        Ok(id) => density::run(backend.as_ref(), "noop", &id, max_instances),
        Err(e) => skipped(format!("deploying noop: {e}")),
    }
}

fn measure(
    backend: &dyn Backend,
    name: &str,
    id: &microfaas::FunctionId,
    start: StartPath,
    input: &[u8],
    n: u32,
) -> LevelRow {
    let request = StartRequest::Force(start);
    let mut row = LevelRow {
        function: name.to_owned(),
        start,
        end_to_end: None,
        skipped: None,
    };
    // One unmeasured start: creates what the path needs (e.g. the argument node).
    if let Err(e) = backend.invoke(id, input, request) {
        row.skipped = Some(e.to_string());
        return row;
    }
    let mut lat = Latencies::new();
    for _ in 0..n {
        match backend.invoke(id, input, request) {
            Ok(inv) => lat.record_ns(inv.timings.total_ns),
            Err(e) => {
                row.skipped = Some(e.to_string());
                return row;
            }
        }
    }
    row.end_to_end = Some(lat.summary());
    row
}

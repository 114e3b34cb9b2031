//! `preemption`: the paper's Figure 2. SHA-512 (64-byte blocks) throughput
//! on the `language` backend relative to running without preemption, with
//! the paper's periodic timer at several quanta and with our default
//! deadline watchdog enforcing a 100 µs budget.
//!
//! The baseline runs with preemption disabled altogether. Every row runs
//! the same workload (`sha512` with [`ROUNDS`] rounds per
//! invocation, well under 100 µs) from one caller against one worker for a
//! fixed time; throughput is SHA-512 blocks per second.

use crate::stats::ratio;
use microfaas::{BackendKind, Config, FunctionSpec, LanguagePreemption, StartRequest};
use serde::Serialize;
use std::time::{Duration, Instant};

/// SHA-512 rounds per invocation (tens of µs of work).
pub const ROUNDS: u64 = 64;
/// The quanta of the periodic mode, in µs (the paper's Figure 2 plus 1 ms).
pub const QUANTA_US: [u64; 7] = [1000, 100, 50, 20, 10, 5, 3];

/// One point of the curve.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Backend measured.
    pub backend: BackendKind,
    /// `none` (baseline), `watchdog` or `periodic`.
    pub mode: String,
    /// Timer period in µs (periodic mode only).
    pub quantum_us: Option<u64>,
    /// Invocation budget in µs.
    pub budget_us: u64,
    /// SHA-512 blocks hashed per second (the best burst).
    pub blocks_per_s: Option<f64>,
    /// Relative to the baseline row, percent.
    pub relative_pct: Option<f64>,
    /// Invocations completed (all bursts).
    pub invocations: u64,
    /// Invocations that failed (e.g. preempted).
    pub errors: u64,
    /// Why there are no numbers, if there are none.
    pub skipped: Option<String>,
}

/// Bursts per mode: modes are measured round-robin, `REPETITIONS` times
/// each, and a mode's throughput is its best burst, so a transient load on
/// this shared machine does not masquerade as preemption cost.
pub const REPETITIONS: u32 = 5;

/// One mode of the experiment.
struct Mode {
    name: &'static str,
    quantum_us: Option<u64>,
    budget: Duration,
    preemption: LanguagePreemption,
}

/// Runs the experiment; each mode measures for `time` in all.
pub fn run(time: Duration, base: &Config) -> Vec<Row> {
    let generous = Duration::from_secs(1);
    let mut modes = vec![
        Mode {
            name: "none",
            quantum_us: None,
            budget: generous,
            preemption: LanguagePreemption::Disabled,
        },
        Mode {
            name: "watchdog",
            quantum_us: None,
            budget: Duration::from_micros(100),
            preemption: LanguagePreemption::Watchdog,
        },
    ];
    modes.extend(QUANTA_US.into_iter().map(|q| Mode {
        name: "periodic",
        quantum_us: Some(q),
        budget: generous,
        preemption: LanguagePreemption::Periodic {
            quantum: Duration::from_micros(q),
        },
    }));
    let burst = time / REPETITIONS;
    let mut rows: Vec<Row> = modes.iter().map(|m| measure(m, burst, base)).collect();
    for _ in 1..REPETITIONS {
        for (mode, row) in modes.iter().zip(rows.iter_mut()) {
            if row.skipped.is_some() {
                continue;
            }
            let again = measure(mode, burst, base);
            row.invocations += again.invocations;
            row.errors += again.errors;
            row.blocks_per_s = match (row.blocks_per_s, again.blocks_per_s) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
        }
    }
    let baseline = rows.first().and_then(|r| r.blocks_per_s);
    for r in &mut rows {
        r.relative_pct = match (r.blocks_per_s, baseline) {
            (Some(v), Some(b)) if b > 0.0 => Some(100.0 * v / b),
            _ => None,
        };
    }
    rows
}

/// One burst of `mode` on a fresh backend (one worker) for `time`.
fn measure(mode: &Mode, time: Duration, base: &Config) -> Row {
    let budget = mode.budget;
    let mut row = Row {
        backend: BackendKind::Language,
        mode: mode.name.to_owned(),
        quantum_us: mode.quantum_us,
        budget_us: u64::try_from(budget.as_micros()).unwrap_or(u64::MAX),
        blocks_per_s: None,
        relative_pct: None,
        invocations: 0,
        errors: 0,
        skipped: None,
    };
    let mut config = base.clone();
    config.language.workers = Some(1);
    config.language.preemption = mode.preemption;
    let backend = match microfaas::open(BackendKind::Language, config) {
        Ok(b) => b,
        Err(e) => {
            row.skipped = Some(e.to_string());
            return row;
        }
    };
    let deployed =
        microfaas::builtin("sha512").and_then(|a| backend.deploy(&FunctionSpec::new("sha512", a).with_budget(budget)));
    let id = match deployed {
        Ok(id) => id,
        Err(e) => {
            row.skipped = Some(e.to_string());
            return row;
        }
    };
    let input = ROUNDS.to_string();
    // Warm-up.
    for _ in 0..200 {
        let _ = backend.invoke(&id, input.as_bytes(), StartRequest::Auto);
    }
    let started = Instant::now();
    while started.elapsed() < time {
        match backend.invoke(&id, input.as_bytes(), StartRequest::Auto) {
            Ok(_) => row.invocations += 1,
            Err(_) => row.errors += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    row.blocks_per_s = Some(ratio(row.invocations * ROUNDS, 1) / secs);
    row
}

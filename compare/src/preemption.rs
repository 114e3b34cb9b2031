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
    /// SHA-512 blocks hashed per second.
    pub blocks_per_s: Option<f64>,
    /// Relative to the baseline row, percent.
    pub relative_pct: Option<f64>,
    /// Invocations completed.
    pub invocations: u64,
    /// Invocations that failed (e.g. preempted).
    pub errors: u64,
    /// Why there are no numbers, if there are none.
    pub skipped: Option<String>,
}

/// Runs the experiment; each row measures for `time`.
pub fn run(time: Duration, base: &Config) -> Vec<Row> {
    let mut rows = Vec::new();
    let generous = Duration::from_secs(1);
    rows.push(measure(
        "none",
        None,
        generous,
        LanguagePreemption::Disabled,
        time,
        base,
    ));
    rows.push(measure(
        "watchdog",
        None,
        Duration::from_micros(100),
        LanguagePreemption::Watchdog,
        time,
        base,
    ));
    for q in QUANTA_US {
        let quantum = Duration::from_micros(q);
        rows.push(measure(
            "periodic",
            Some(q),
            generous,
            LanguagePreemption::Periodic { quantum },
            time,
            base,
        ));
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

fn measure(
    mode: &str,
    quantum_us: Option<u64>,
    budget: Duration,
    preemption: LanguagePreemption,
    time: Duration,
    base: &Config,
) -> Row {
    let mut row = Row {
        backend: BackendKind::Language,
        mode: mode.to_owned(),
        quantum_us,
        budget_us: u64::try_from(budget.as_micros()).unwrap_or(u64::MAX),
        blocks_per_s: None,
        relative_pct: None,
        invocations: 0,
        errors: 0,
        skipped: None,
    };
    let mut config = base.clone();
    config.language.workers = Some(1);
    config.language.preemption = preemption;
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

//! Output: terminal tables, the versioned JSON document, report.md.
//!
//! # JSON schema (`schema` = "microfaas-compare", `schema_version` = 1)
//!
//! ```text
//! {
//!   "schema": "microfaas-compare", "schema_version": 1,
//!   "environment": { cpu_model, cores, kernel, virtualised, kvm_usable, memory_mib, git_revision, date },
//!   "rows":   [ table1 row ... ],            // present when table1 ran
//!   "memory": [ memory row ... ],           // present when memory ran
//!   "preemption": [ preemption row ... ],   // present when preemption ran
//!   "snapshots": { levels: [ { function, start, end_to_end: {..} | null, skipped } ],
//!                  deploy_ms: [ [function, ms] ], nodes: [ { level, label, own_pages, bytes_on_disk } ],
//!                  idle_private_kib, density: density | null, skipped }  // present when snapshots ran
//!   "language": { rows: [ { function, start, mode, functions_deployed, dispatch: {..} | null,
//!                           throughput_per_s, errors, skipped } ],
//!                 footprints: [ { functions_deployed, functions_started_cold, functions_resident, worker_mappings,
//!                                 worker_pss_kib, pss_per_function_kib } ] }  // present when language ran
//! }
//! table1 row: { backend: "process"|"language"|"vm",
//!               start: "warm"|"cold"|"hot"|"reset"|"argument"|"function"|"base",
//!               function, functions_deployed,
//!               median_us, p99_us, p999_us,      // see latency_basis; null if skipped
//!               latency_basis: "dispatch" (invoke -> function's first timestamp) | "end_to_end" (argument starts),
//!               end_to_end: { count, median_us, p99_us, p999_us, max_us } | null,
//!               throughput_per_s,                // warm/hot rows only, else null (language: saturated,
//!                                                // callers + workers <= cores; else a caller per core)
//!               throughput_serial_per_s,         // language warm only: one pinned caller, one at a time
//!               samples, errors, first_error: null | "message", skipped: null | "reason" }
//! memory row: { backend, functions, tenants, workers, memory_mib, per_function_kib, per_tenant_mib, workers_pss_mib, instances, skipped }
//! density: { function, steps: [ { instances, start_us: {..}, per_instance, mem_available_mib, host_processes } ],
//!            instances_reported, hot_invocations, hot_us: {..} | null, teardown_ms,
//!            stopped: null | "reason", skipped: null | "reason" }
//! per_instance: { guest_private_kib, process_private_kib, kernel_kib, host_kib, fds, threads }
//! preemption row: { backend, mode: "none"|"watchdog"|"periodic", quantum_us, budget_us,
//!                   blocks_per_s, relative_pct, invocations, errors, skipped }
//! ```

use crate::env::Environment;
use crate::{density, http, language, memory, preemption, snapshots, table1};
use serde::Serialize;
use std::fmt::Write;

/// Version of the JSON document; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything one run produced.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Always "microfaas-compare".
    pub schema: &'static str,
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Where it ran.
    pub environment: Environment,
    /// `table1` rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<Vec<table1::Row>>,
    /// `memory` rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Vec<memory::Row>>,
    /// `preemption` rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preemption: Option<Vec<preemption::Row>>,
    /// `snapshots` results.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<snapshots::Report>,
    /// `http` results.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<http::Report>,
    /// `language` results.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<language::Report>,
}

impl Report {
    /// An empty report for `environment`.
    pub fn new(environment: Environment) -> Self {
        Self {
            schema: "microfaas-compare",
            schema_version: SCHEMA_VERSION,
            environment,
            rows: None,
            memory: None,
            preemption: None,
            snapshots: None,
            http: None,
            language: None,
        }
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

/// The table1 rows as a text table.
pub fn table1_text(rows: &[table1::Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<9} {:<9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>6}",
        "backend", "start", "median us", "p99 us", "p99.9 us", "e2e med", "e2e p99", "throughput/s", "fns"
    );
    for r in rows {
        if let Some(reason) = &r.skipped {
            let _ = writeln!(
                s,
                "{:<9} {:<9} skipped ({}): {}",
                r.backend, r.start, r.function, reason
            );
            continue;
        }
        let e2e = r.end_to_end.as_ref();
        let _ = writeln!(
            s,
            "{:<9} {:<9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>6}{}{}{}",
            r.backend,
            r.start,
            opt(r.median_us, 1),
            opt(r.p99_us, 1),
            opt(r.p999_us, 1),
            opt(e2e.map(|e| e.median_us), 1),
            opt(e2e.map(|e| e.p99_us), 1),
            opt(r.throughput_per_s, 0),
            r.functions_deployed,
            match (r.latency_basis == "dispatch", r.throughput_serial_per_s) {
                (true, None) => String::new(),
                (false, _) => "  (latency: end to end)".to_owned(),
                (true, Some(serial)) => format!("  (throughput saturated; serial {serial:.0}/s)"),
            },
            if r.errors > 0 {
                format!(
                    "  ({} errors, first: {})",
                    r.errors,
                    r.first_error.as_deref().unwrap_or("?")
                )
            } else {
                String::new()
            },
            if r.function.starts_with("wasm-") {
                format!("  (interpreted: {})", r.function)
            } else {
                String::new()
            }
        );
    }
    s
}

/// The memory rows as a text table.
pub fn memory_text(rows: &[memory::Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<9} {:>9} {:>8} {:>8} {:>12} {:>14} {:>15} {:>16} {:>10}",
        "backend",
        "functions",
        "tenants",
        "workers",
        "memory MiB",
        "per fn KiB",
        "per tenant MiB",
        "workers PSS MiB",
        "instances"
    );
    for r in rows {
        if let Some(reason) = &r.skipped {
            let _ = writeln!(
                s,
                "{:<9} {:>9} {:>8} skipped: {}",
                r.backend, r.functions, r.tenants, reason
            );
            continue;
        }
        let _ = writeln!(
            s,
            "{:<9} {:>9} {:>8} {:>8} {:>12} {:>14} {:>15} {:>16} {:>10}",
            r.backend,
            r.functions,
            r.tenants,
            r.workers.map_or_else(|| "-".to_owned(), |w| w.to_string()),
            opt(r.memory_mib, 1),
            opt(r.per_function_kib, 0),
            opt(r.per_tenant_mib, 1),
            opt(r.workers_pss_mib, 1),
            r.instances.map_or_else(|| "-".to_owned(), |i| i.to_string())
        );
    }
    s
}

/// The preemption rows as a text table.
pub fn preemption_text(rows: &[preemption::Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<9} {:<9} {:>10} {:>10} {:>14} {:>9} {:>8}",
        "backend", "mode", "quantum us", "budget us", "blocks/s", "relative", "errors"
    );
    for r in rows {
        let quantum = r.quantum_us.map_or_else(|| "-".to_owned(), |q| q.to_string());
        if let Some(reason) = &r.skipped {
            let _ = writeln!(s, "{:<9} {:<9} {:>10} skipped: {}", r.backend, r.mode, quantum, reason);
            continue;
        }
        let _ = writeln!(
            s,
            "{:<9} {:<9} {:>10} {:>10} {:>14} {:>8}% {:>8}",
            r.backend,
            r.mode,
            quantum,
            r.budget_us,
            opt(r.blocks_per_s, 0),
            opt(r.relative_pct, 1),
            r.errors
        );
    }
    s
}

/// The snapshots results as text.
pub fn snapshots_text(r: &snapshots::Report) -> String {
    let mut s = String::new();
    if let Some(reason) = &r.skipped {
        let _ = writeln!(s, "skipped: {reason}");
    }
    let _ = writeln!(
        s,
        "{:<17} {:<9} {:>12} {:>10} {:>10}",
        "function", "start", "median us", "p99 us", "samples"
    );
    for l in &r.levels {
        match (&l.end_to_end, &l.skipped) {
            (Some(e), _) => {
                let _ = writeln!(
                    s,
                    "{:<17} {:<9} {:>12.1} {:>10.1} {:>10}",
                    l.function, l.start, e.median_us, e.p99_us, e.count
                );
            }
            (None, reason) => {
                let _ = writeln!(
                    s,
                    "{:<17} {:<9} skipped: {}",
                    l.function,
                    l.start,
                    reason.as_deref().unwrap_or("-")
                );
            }
        }
    }
    let _ = writeln!(s, "\ndeploy (creates the function node):");
    for (f, ms) in &r.deploy_ms {
        let _ = writeln!(s, "  {f:<17} {ms:>9.1} ms");
    }
    let _ = writeln!(s, "\nnodes:\n{:<9} {:>10} {:>12}  label", "level", "own pages", "bytes");
    for n in &r.nodes {
        let _ = writeln!(
            s,
            "{:<9} {:>10} {:>12}  {}",
            n.level, n.own_pages, n.bytes_on_disk, n.label
        );
    }
    let _ = writeln!(
        s,
        "\nprivate memory per idle restored noop instance: {} KiB (the guest pages written plus the vm host processes' own private memory, over the idle instances: with few instances the processes' own share dominates; `density` gives the figure at scale; KVM's kernel memory not included)",
        opt(r.idle_private_kib, 0)
    );
    if let Some(d) = &r.density {
        let _ = writeln!(s, "\n{}", density_text(d));
    }
    s
}

/// The density curve as text.
pub fn density_text(d: &density::Density) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "density: idle {} instances ({} MiB guests) started from its function node (per instance: KiB of host memory; start latency us)",
        d.function,
        crate::snapshots::DENSITY_GUEST_MIB
    );
    if let Some(reason) = &d.skipped {
        let _ = writeln!(s, "skipped: {reason}");
        return s;
    }
    let _ = writeln!(
        s,
        "{:>9} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>5} {:>7} {:>10} {:>9}",
        "instances",
        "start p50",
        "p99",
        "guest",
        "process",
        "kernel",
        "host",
        "fds",
        "threads",
        "avail MiB",
        "vm hosts"
    );
    for r in &d.steps {
        let m = &r.per_instance;
        let _ = writeln!(
            s,
            "{:>9} {:>11.0} {:>9.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>5.2} {:>7.3} {:>10} {:>9}",
            r.instances,
            r.start_us.median_us,
            r.start_us.p99_us,
            m.guest_private_kib,
            m.process_private_kib,
            m.kernel_kib,
            m.host_kib,
            m.fds,
            m.threads,
            r.mem_available_mib,
            r.host_processes
        );
    }
    let _ = writeln!(
        s,
        "guest = pages the instance wrote; process = private memory of this process and its VMM host processes; kernel = Slab+KernelStack+PageTables (system-wide); host = process + kernel; fds and threads: of this process and its VMM host processes, per instance; vm hosts = VMM host processes alive"
    );
    let _ = writeln!(
        s,
        "below a few hundred instances the deltas hide in allocator slack (free slab objects, heap already held): read the larger steps"
    );
    let _ = writeln!(
        s,
        "the instances never ran an invocation (one that has also holds the guest pages it wrote, above); the backend reported {} instances",
        d.instances_reported
    );
    if let Some(hot) = &d.hot_us {
        let _ = writeln!(
            s,
            "with all of them idle: {} hot invocations, median {:.0} us, p99 {:.0} us end to end; teardown of all: {} ms",
            d.hot_invocations,
            hot.median_us,
            hot.p99_us,
            opt(d.teardown_ms, 0)
        );
    }
    if let Some(reason) = &d.stopped {
        let _ = writeln!(s, "{reason}");
    }
    s
}

/// report.md: the header, the tables, the plots.
pub fn markdown(report: &Report, plots: &[(String, String)]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# microfaas comparison\n\n{}\n", report.environment.header());
    if let Some(rows) = &report.rows {
        let _ = writeln!(
            s,
            "## table1: start latency (dispatch to the function's first timestamp) and throughput\n\n```text\n{}```\n",
            table1_text(rows)
        );
    }
    if let Some(rows) = &report.memory {
        let _ = writeln!(
            s,
            "## memory: resident memory for N deployed functions\n\n```text\n{}```\n",
            memory_text(rows)
        );
    }
    if let Some(rows) = &report.preemption {
        let _ = writeln!(
            s,
            "## preemption: SHA-512 throughput relative to no preemption (the paper's Figure 2)\n\n```text\n{}```\n",
            preemption_text(rows)
        );
    }
    if let Some(r) = &report.snapshots {
        let _ = writeln!(
            s,
            "## snapshots: vm start latency by snapshot level, deploy time, node sizes, density\n\n```text\n{}```\n",
            snapshots_text(r)
        );
    }
    if let Some(r) = &report.language {
        let _ = writeln!(
            s,
            "## language: cold start by path, init-heavy with and without its post-init snapshot, warm serial and saturated\n\n```text\n{}```\n",
            language::text(r)
        );
    }
    for (title, file) in plots {
        let _ = writeln!(s, "## {title}\n\n![{title}]({file})\n");
    }
    s
}

//! Density (part of `snapshots`): how many idle `vm` instances of one
//! function fit on this host, and what each costs. Instances are started
//! from the function's snapshot node through [`Backend::prestart`], in
//! steps, and kept; after each step the host memory they hold is measured
//! three ways:
//!
//! - guest pages the instances wrote (private CoW copies of the node
//!   image), as the backend reports them (`restored_idle_private_bytes`);
//! - this process's private memory (`Private_Clean + Private_Dirty` of
//!   `/proc/self/smaps_rollup`): guest pages plus vCPU thread stacks and
//!   VMM bookkeeping; the node image itself is shared and counted once;
//! - host kernel memory (`Slab + KernelStack + PageTables + SecPageTables`
//!   of `/proc/meminfo`): KVM's per-VM and per-vCPU structures and the
//!   instances' page tables. This is system-wide, so other activity on the
//!   machine shows up in it.
//!
//! The instances have never run an invocation: a served instance also
//! holds the guest pages it wrote (`idle_private_kib` of `snapshots`).
//!
//! Stepping stops before a step that would take more than half of the
//! memory available at the start, or 90% of the open-file limit (its soft
//! value is raised to the hard one first).

use crate::progress::bar;
use crate::stats::{Latencies, Summary, ratio};
use microfaas::{Backend, FunctionId, StartPath, StartRequest};
use serde::Serialize;
use std::time::{Duration, Instant};

/// Host memory per instance, KiB, and what else each instance holds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PerInstance {
    /// Guest pages the instances wrote.
    pub guest_private_kib: f64,
    /// This process's private memory growth since before the first step.
    pub process_private_kib: f64,
    /// Host kernel memory growth.
    pub kernel_kib: f64,
    /// Host memory: process private + kernel.
    pub host_kib: f64,
    /// Open file descriptors.
    pub fds: f64,
    /// Threads (each instance's vCPU thread).
    pub threads: f64,
}

/// Hot invocations run once every instance is up.
const HOT_INVOCATIONS: usize = 1000;

/// One step of the curve: the state with `instances` idle instances.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Idle instances alive after this step.
    pub instances: usize,
    /// Start latency (restore from the function node to a ready, idle
    /// instance) of the instances started in this step, µs.
    pub start_us: Summary,
    /// What each instance holds, never having run an invocation.
    pub per_instance: PerInstance,
    /// `MemAvailable` after the step, MiB.
    pub mem_available_mib: u64,
}

/// The density curve.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Density {
    /// Function whose instances were started.
    pub function: String,
    /// Steps measured, in order.
    pub steps: Vec<Row>,
    /// Instances the backend reported (`stats().instances`) after the last step.
    pub instances_reported: usize,
    /// Hot invocations run after the last step, with every instance idle
    /// (the pool is LIFO: they reuse the most recently used instance).
    pub hot_invocations: usize,
    /// Their end-to-end latency, µs.
    pub hot_us: Option<Summary>,
    /// Time to tear every instance down, ms (`evict` until this process's
    /// thread and fd counts are back where they were).
    pub teardown_ms: Option<f64>,
    /// Why stepping stopped before the largest step asked for, if it did.
    pub stopped: Option<String>,
    /// Why there are no numbers, if there are none.
    pub skipped: Option<String>,
}

/// Instance counts stepped through, up to `max`.
pub fn steps(max: usize) -> Vec<usize> {
    let mut steps: Vec<usize> = [1, 10, 100, 250, 500]
        .into_iter()
        .chain(std::iter::successors(Some(1000usize), |n| n.checked_mul(2)))
        .take_while(|&n| n < max)
        .collect();
    steps.push(max);
    steps
}

/// Host memory counters at one moment, KiB.
#[derive(Debug, Clone, Copy)]
struct Sample {
    process_private_kib: u64,
    kernel_kib: u64,
    mem_available_kib: u64,
    fds: u64,
    threads: u64,
}

/// A `Key:   value kB` field of a /proc file.
fn field_kib(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn sample() -> Sample {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let rollup = read("/proc/self/smaps_rollup");
    let meminfo = read("/proc/meminfo");
    let status = read("/proc/self/status");
    Sample {
        process_private_kib: field_kib(&rollup, "Private_Clean") + field_kib(&rollup, "Private_Dirty"),
        kernel_kib: ["Slab", "KernelStack", "PageTables", "SecPageTables"]
            .iter()
            .map(|k| field_kib(&meminfo, k))
            .sum(),
        mem_available_kib: field_kib(&meminfo, "MemAvailable"),
        fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64),
        threads: status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0),
    }
}

/// Raises the soft open-file limit to the hard one (each vm instance holds
/// a few fds; a soft limit of 1,024 would stop the curve at a few hundred
/// instances). `main` calls it once, before any experiment.
pub fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        // Best effort: the curve then stops at the lower limit, and says so.
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// The soft open-file limit.
fn open_files_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// What each of `alive` instances holds, relative to `before`, and the
/// sample taken.
fn measure(backend: &dyn Backend, before: &Sample, alive: usize) -> (PerInstance, Sample) {
    let now = sample();
    let n = u64::try_from(alive).unwrap_or(1).max(1);
    let per = |now: u64, before: u64| ratio(now.saturating_sub(before), n);
    let process_private = per(now.process_private_kib, before.process_private_kib);
    let kernel = per(now.kernel_kib, before.kernel_kib);
    let per_instance = PerInstance {
        guest_private_kib: ratio(
            backend.stats().counter("restored_idle_private_bytes").unwrap_or(0),
            n * 1024,
        ),
        process_private_kib: process_private,
        kernel_kib: kernel,
        host_kib: process_private + kernel,
        fds: per(now.fds, before.fds),
        threads: per(now.threads, before.threads),
    };
    (per_instance, now)
}

/// Waits (up to `limit`) until the process has at most `threads` threads
/// and `fds` open files (the instances' vCPU threads and VM fds are gone);
/// false if it never does.
fn wait_for_teardown(threads: u64, fds: u64, limit: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        let now = sample();
        if now.threads <= threads && now.fds <= fds {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Waits (up to `limit`) until the thread count has not changed for 300 ms
/// (the backend's reaper is done), and returns it.
fn settle(limit: Duration) -> u64 {
    let started = Instant::now();
    let (mut last, mut since) = (sample().threads, Instant::now());
    while started.elapsed() < limit && since.elapsed() < Duration::from_millis(300) {
        std::thread::sleep(Duration::from_millis(50));
        let now = sample().threads;
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    last
}

/// Runs the curve on `id` (deployed, with no idle instances), up to `max`
/// instances.
pub fn run(backend: &dyn Backend, name: &str, id: &FunctionId, max: usize) -> Density {
    let mut density = Density {
        function: name.to_owned(),
        ..Density::default()
    };
    if let Err(e) = backend.evict(id) {
        density.skipped = Some(format!("evicting {name}: {e}"));
        return density;
    }
    // Let the reaper finish earlier teardowns before the baseline.
    let quiet = settle(Duration::from_secs(10));
    let before = sample();
    let fd_limit = open_files_limit();
    let mem_budget_kib = before.mem_available_kib / 2;
    let fd_budget = (fd_limit - fd_limit / 10).saturating_sub(before.fds);
    let plan = steps(max);
    let pb = bar(u64::try_from(max).unwrap_or(0), &format!("vm: {name} idle instances"));
    let mut alive = 0usize;
    for &planned in &plan {
        // Project this step's needs from the last step's per-instance cost
        // (1 MiB and 8 fds per instance before any is measured), and take
        // only as many instances as the limits allow.
        let (per_kib, per_fd) = density.steps.last().map_or((1024.0, 8.0), |r| {
            (r.per_instance.host_kib.max(1.0), r.per_instance.fds.max(1.0))
        });
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let (by_memory, by_fds) = (
            (mem_budget_kib as f64 / per_kib) as usize,
            (fd_budget as f64 / per_fd) as usize,
        );
        let target = planned.min(by_memory).min(by_fds);
        if target < planned {
            let limit = if by_fds < by_memory {
                format!("~{per_fd:.0} fds each, more would pass 90% of the open-file limit ({fd_limit})")
            } else {
                format!(
                    "~{per_kib:.0} KiB each, more would take over half of the {} MiB available",
                    before.mem_available_kib / 1024
                )
            };
            density.stopped = Some(format!("limited to {target} instances (not {planned}): at {limit}"));
        }
        if target <= alive {
            break;
        }
        let took = match backend.prestart(id, target - alive) {
            Ok(t) => t,
            Err(e) => {
                density.stopped = Some(format!("starting instance {} of {target}: {e}", alive + 1));
                break;
            }
        };
        alive = target;
        pb.set_position(u64::try_from(alive).unwrap_or(0));
        let mut lat = Latencies::new();
        for d in took {
            lat.record_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        }
        let (per_instance, now) = measure(backend, &before, alive);
        density.steps.push(Row {
            instances: alive,
            start_us: lat.summary(),
            per_instance,
            mem_available_mib: now.mem_available_kib / 1024,
        });
        if target < planned {
            break;
        }
    }
    pb.finish_and_clear();
    // The instances are all there, and hot invocations still work with all
    // of them resident.
    density.instances_reported = backend.stats().instances;
    let mut hot = Latencies::new();
    for i in 0..alive.min(HOT_INVOCATIONS) {
        match backend.invoke(id, b"", StartRequest::Auto) {
            Ok(inv) if inv.start == StartPath::Hot => {
                density.hot_invocations += 1;
                hot.record_ns(inv.timings.total_ns);
            }
            Ok(inv) => {
                density.stopped = Some(format!(
                    "invocation {i} after the last step started {}, not hot",
                    inv.start
                ));
                break;
            }
            Err(e) => {
                density.stopped = Some(format!("invocation {i} after the last step failed: {e}"));
                break;
            }
        }
    }
    if hot.len() > 0 {
        density.hot_us = Some(hot.summary());
    }
    let evicted = Instant::now();
    if backend.evict(id).is_ok() {
        density.teardown_ms = wait_for_teardown(quiet, before.fds, Duration::from_secs(120))
            .then(|| evicted.elapsed().as_secs_f64() * 1e3);
    }
    density
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_end_at_the_maximum() {
        assert_eq!(steps(1), vec![1]);
        assert_eq!(steps(50), vec![1, 10, 50]);
        assert_eq!(steps(1000), vec![1, 10, 100, 250, 500, 1000]);
        assert_eq!(steps(3000), vec![1, 10, 100, 250, 500, 1000, 2000, 3000]);
    }

    #[test]
    fn proc_fields_are_read_in_kib() {
        let text = "MemTotal:       24731648 kB\nSlab:             100 kB\nSlabX: 5 kB\n";
        assert_eq!(field_kib(text, "Slab"), 100);
        assert_eq!(field_kib(text, "MemTotal"), 24_731_648);
        assert_eq!(field_kib(text, "Missing"), 0);
    }
}

//! Density (part of `snapshots`): how many idle `vm` instances of one
//! function fit on this host, and what each costs. Instances are started
//! from the function's snapshot node through [`Backend::prestart`], in
//! steps, and kept; after each step the host memory they hold is measured
//! three ways:
//!
//! - guest pages the instances wrote (private CoW copies of the node
//!   image), as the backend reports them (`restored_idle_private_bytes`);
//! - the private memory (`Private_Clean + Private_Dirty` of
//!   `/proc/PID/smaps_rollup`) of this process and of its VMM host
//!   processes (`microfaas-vmhost` children, found by their parent pid in
//!   `/proc/*/stat`): guest pages plus runner thread stacks and VMM
//!   bookkeeping; the node image itself is shared and counted once per
//!   process that maps it;
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
    /// Open file descriptors (this process and its VMM host processes).
    pub fds: f64,
    /// Threads (this process and its VMM host processes).
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
    /// VMM host processes alive after the step (children of this process
    /// running `microfaas-vmhost`).
    pub host_processes: usize,
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
    /// KVM VMs (`anon_inode:kvm-vm` fds).
    vms: u64,
    /// Open fds of this process alone (its open-file limit is the one
    /// that binds here; host processes raise and watch their own).
    own_fds: u64,
    host_processes: usize,
}

/// The command name (`/proc/PID/comm`, at most 15 bytes) of a VMM host
/// process.
const HOST_COMM_PREFIX: &str = "microfaas-vmhos";

/// The parent pid and command of a `/proc/PID/stat` line: `pid (comm) state
/// ppid ...`, where `comm` may itself hold spaces and parentheses.
fn parent_and_comm(stat: &str) -> Option<(u32, &str)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let _state = rest.next()?;
    Some((rest.next()?.parse().ok()?, comm))
}

/// The pids of this process's VMM host processes.
fn host_processes() -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parent_and_comm(&s).map(|(ppid, comm)| ppid == me && comm.starts_with(HOST_COMM_PREFIX)))
                .unwrap_or(false)
        })
        .collect()
}

/// Private memory (KiB), open fds, threads and KVM VM fds of process `pid`
/// ("self" for this one).
fn process_counters(pid: &str) -> (u64, u64, u64, u64) {
    let read = |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default();
    let rollup = read("smaps_rollup");
    let threads = read("status")
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let (mut fds, mut vms) = (0, 0);
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in dir.flatten() {
            fds += 1;
            if std::fs::read_link(entry.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:kvm-vm") {
                vms += 1;
            }
        }
    }
    (
        field_kib(&rollup, "Private_Clean") + field_kib(&rollup, "Private_Dirty"),
        fds,
        threads,
        vms,
    )
}

/// A `Key:   value kB` field of a /proc file.
fn field_kib(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn sample() -> Sample {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let hosts = host_processes();
    let (mut private, mut fds, mut threads, mut vms) = process_counters("self");
    let own_fds = fds;
    for pid in &hosts {
        let (p, f, t, v) = process_counters(&pid.to_string());
        private += p;
        fds += f;
        threads += t;
        vms += v;
    }
    Sample {
        process_private_kib: private,
        kernel_kib: ["Slab", "KernelStack", "PageTables", "SecPageTables"]
            .iter()
            .map(|k| field_kib(&meminfo, k))
            .sum(),
        mem_available_kib: field_kib(&meminfo, "MemAvailable"),
        fds,
        threads,
        vms,
        own_fds,
        host_processes: hosts.len(),
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

/// Waits (up to `limit`) until at most `vms` KVM VMs are left in this
/// process and its VMM host processes (the instances are torn down; host
/// processes may stay, empty); false if that never happens.
fn wait_for_teardown(vms: u64, limit: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if sample().vms <= vms {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
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
    settle(Duration::from_secs(10));
    let before = sample();
    let fd_limit = open_files_limit();
    let mem_budget_kib = before.mem_available_kib / 2;
    let fd_budget = (fd_limit - fd_limit / 10).saturating_sub(before.own_fds);
    // This process's fds per instance, as last measured.
    let mut own_fds_each: Option<f64> = None;
    let plan = steps(max);
    let pb = bar(u64::try_from(max).unwrap_or(0), &format!("vm: {name} idle instances"));
    let mut alive = 0usize;
    for &planned in &plan {
        // Project this step's needs from the last step's per-instance cost
        // (1 MiB and 8 fds per instance before any is measured), and take
        // only as many instances as the limits allow.
        let per_kib = density
            .steps
            .last()
            .map_or(1024.0, |r| r.per_instance.host_kib.max(1.0));
        let per_fd = own_fds_each.unwrap_or(8.0).max(0.01);
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
        own_fds_each = Some(ratio(
            now.own_fds.saturating_sub(before.own_fds),
            u64::try_from(alive).unwrap_or(1).max(1),
        ));
        density.steps.push(Row {
            instances: alive,
            start_us: lat.summary(),
            per_instance,
            mem_available_mib: now.mem_available_kib / 1024,
            host_processes: now.host_processes,
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
        density.teardown_ms =
            wait_for_teardown(before.vms, Duration::from_secs(120)).then(|| evicted.elapsed().as_secs_f64() * 1e3);
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
    fn stat_lines_give_parent_and_command() {
        assert_eq!(
            parent_and_comm("4242 (microfaas-vmhos) S 17 4242 17 0 -1"),
            Some((17, "microfaas-vmhos"))
        );
        // A command may hold spaces and parentheses: the last `)` ends it.
        assert_eq!(parent_and_comm("9 (a (b) c) R 1 9 9"), Some((1, "a (b) c")));
        assert_eq!(parent_and_comm("9 (x"), None);
        assert_eq!(parent_and_comm("9 (x) S notapid"), None);
    }

    #[test]
    fn proc_fields_are_read_in_kib() {
        let text = "MemTotal:       24731648 kB\nSlab:             100 kB\nSlabX: 5 kB\n";
        assert_eq!(field_kib(text, "Slab"), 100);
        assert_eq!(field_kib(text, "MemTotal"), 24_731_648);
        assert_eq!(field_kib(text, "Missing"), 0);
    }
}

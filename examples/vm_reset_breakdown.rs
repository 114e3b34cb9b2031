//! Where one `vm` reset goes (a benchmark, not a timed test):
//! `cargo run --release --example vm_reset_breakdown [N] [FUNCTION]`.
//!
//! One instance restored in this process from a function node of FUNCTION
//! (default `noop`), then N rounds (default 2,000) of: a request, a
//! synchronous reset (`Instance::reset`). Prints the medians and p99s of
//! the reset's parts (`vmm::ResetStats`: finishing the last exit, finding
//! and restoring the written guest pages, the I/O window and mailbox, the
//! registers), of the whole reset and of the request after it, the pages
//! copied per reset, and how many guest pages are mapped in this process
//! (what the reset's `PAGEMAP_SCAN` walks) against the KVM page faults of
//! a request (the kernel's fault-around maps up to 16 neighbours of every
//! page a guest fault reads), and what the scan alone costs over the
//! guest's memory.

#[path = "../tests/vm_common/mod.rs"]
mod vm_common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm::{Instance, InstanceConfig, ResetSource, Status};

const PAGE: usize = 4096;

/// Nanoseconds since `t`.
fn ns(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

fn line(what: &str, mut v: Vec<u64>, unit: f64, suffix: &str) {
    v.sort_unstable();
    let at = |q: usize| v[(v.len() - 1) * q / 100] as f64 / unit;
    println!("{what:<34} median {:>9.1}{suffix}  p99 {:>9.1}{suffix}", at(50), at(99));
}

/// Pages of `[addr, addr + len)` present in this process now (bit 63 of
/// their `/proc/self/pagemap` entries).
fn present(addr: usize, len: usize) -> std::io::Result<usize> {
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let mut entries = vec![0u8; len / PAGE * 8];
    pagemap.read_exact_at(&mut entries, (addr / PAGE * 8) as u64)?;
    Ok(entries
        .chunks_exact(8)
        .filter(|e| u64::from_le_bytes((*e).try_into().unwrap_or_default()) >> 63 == 1)
        .count())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let function = args.next().unwrap_or_else(|| "noop".into());
    let Some(mut vmm) = vm_common::open_vmm() else {
        return Ok(());
    };
    // As the backend and its host processes do.
    vmm.use_pagemap_scan();
    let config = InstanceConfig {
        huge_pages: false,
        ..InstanceConfig::default()
    };
    let artifact = microfaas::builtin(&function)?;
    let (mut fresh, _) = Instance::boot(&vmm, &config)?;
    if fresh.load(artifact.bytes(), deadline())?.status != Status::Ok {
        return Err(format!("{function} did not load").into());
    }
    let saved = fresh.save()?;
    // SAFETY: `fresh` is idle (no request in flight) while we copy.
    let file = vm_common::image(unsafe { fresh.guest_memory() });
    let len = usize::try_from(file.metadata()?.len())?;
    let source = Arc::new(ResetSource::new(saved.clone(), Box::new(file.try_clone()?))?);
    let memory = vm_common::cow_copy(&file, len);
    let (addr, mem_len) = (vmm::ExternalMemory::host_addr(&memory).addr(), len);
    let mut instance = Instance::restore(&vmm, None, &config, Box::new(memory), &saved)?;
    instance.set_reset_source(Arc::clone(&source));
    let input = b"hello";
    let (mut exit, mut mem, mut chan, mut vcpu, mut total, mut next) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut copied, mut mapped, mut faults, mut zeroed) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut sregs = 0u64;
    let mut scan = ipc::pagemap::PageScan::open()?;
    let (mut scans, mut found, mut in_reset) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..n + n / 10 {
        let before = instance.vcpu_stat("pf_taken").unwrap_or(0);
        let t = Instant::now();
        let reply = instance.invoke(input, deadline())?;
        let request_ns = ns(t);
        if reply.status != Status::Ok {
            return Err(format!("request {round}: {:?}", reply.status).into());
        }
        let request_faults = instance.vcpu_stat("pf_taken").unwrap_or(0) - before;
        let pages = present(addr, mem_len)?;
        found.clear();
        let t = Instant::now();
        scan.written(addr..addr + mem_len, &mut found)?;
        let scan_ns = ns(t);
        let t = Instant::now();
        instance.reset(deadline())?;
        let reset_ns = ns(t);
        let s = instance
            .last_reset_stats()
            .ok_or("no reset stats (a remote instance?)")?;
        if round < n / 10 {
            continue; // warm-up
        }
        exit.push(s.exit_ns);
        mem.push(s.memory_ns);
        chan.push(s.channel_ns);
        vcpu.push(s.vcpu_ns);
        total.push(reset_ns);
        next.push(request_ns);
        copied.push(s.pages_copied + s.pages_dropped);
        mapped.push(u64::try_from(pages)?);
        faults.push(request_faults);
        zeroed.push(s.window_pages_zeroed);
        scans.push(scan_ns);
        in_reset.push(s.scan_ns);
        sregs += u64::from(s.sregs_set);
    }
    println!(
        "{function}: {n} rounds of request + synchronous reset, in this process, {} MiB guest",
        mem_len >> 20
    );
    line("reset: finish the last exit", exit, 1e3, " us");
    line("reset: find + restore pages", mem, 1e3, " us");
    line("  of which finding them (the scan)", in_reset, 1e3, " us");
    line("  the same scan, timed here", scans, 1e3, " us");
    line("reset: I/O window + mailbox", chan, 1e3, " us");
    line("reset: registers", vcpu, 1e3, " us");
    line("reset: total", total, 1e3, " us");
    line("request after a reset", next, 1e3, " us");
    line("pages restored per reset", copied, 1.0, "   ");
    line("I/O window pages zeroed per reset", zeroed, 1.0, "   ");
    line("guest pages mapped before a reset", mapped, 1.0, "   ");
    line("KVM page faults per request", faults, 1.0, "   ");
    println!("segment/control registers set in {sregs} of {n} resets");
    Ok(())
}

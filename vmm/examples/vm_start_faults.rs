//! Counts what each start costs the guest in KVM events (shadow-paging
//! faults, exits, emulated instructions; from the vCPU's binary stats),
//! which unlike wall-clock times do not move with the host's load:
//! a boot, the load of an artifact, its first invocation, and the first
//! invocation of an instance restored from a copy-on-write copy of that
//! loaded guest (a function snapshot's start).
//!
//! Then, for each way a VMM host process can find its VM shell, STARTS
//! (default 200) function starts from that node (a restore into a
//! channel-slab slot and its first request), the first without and the
//! rest with the node's recorded first-run working set (pre-copied at
//! restore; `NO_WORKING_SET=1`: never), with the faults, the restore's
//! steps and the first request's time of each: medians, p99, max and the
//! slowest. The shells (made off the clock) are:
//! - `none`: no shell; the restore makes the VM, its vCPU and its memory
//!   slots;
//! - `plain`: a `Shell::new` (VM + vCPU); the restore registers the memory
//!   slots (what host processes did before their shells had memory);
//! - `slots`: a `Shell::with_memory_for_slots`; the restore maps the node
//!   and the slot over its reservations;
//! - `primed`: such a shell primed with the node's vCPU state
//!   (`Shell::prime`): the restore sets no register (what host processes
//!   do for the node they last restored).
//!
//! `SHELLS=plain,slots` picks some (default all four).
//!
//! ```text
//! cargo run --release -p vmm --example vm_start_faults -- ART.so [INPUT [STARTS]]
//! ```

use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm::slab::Slab;
use vmm::{ExternalMemory, Instance, InstanceConfig, ResetSource, RestoreTimings, Shell, Vmm};

const STATS: [&str; 6] = [
    "pf_taken",
    "pf_fixed",
    "pf_guest",
    "exits",
    "mmio_exits",
    "insn_emulation",
];

fn stats(i: &Instance) -> Vec<u64> {
    STATS.iter().map(|s| i.vcpu_stat(s).unwrap_or(0)).collect()
}

fn print(what: &str, before: &[u64], after: &[u64]) {
    let deltas: Vec<String> = STATS
        .iter()
        .zip(before.iter().zip(after))
        .map(|(name, (b, a))| format!("{name} {}", a.saturating_sub(*b)))
        .collect();
    println!("{what:>28}: {}", deltas.join(", "));
}

/// A private copy-on-write mapping of a memfd holding a guest's memory.
#[derive(Debug)]
struct CowCopy {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: one private read/write mapping of `len` bytes, owned by the
// value and unmapped only on drop.
unsafe impl ExternalMemory for CowCopy {
    fn host_addr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

// SAFETY: the mapping is owned exclusively by the value.
unsafe impl Send for CowCopy {}
// SAFETY: as above; shared access only reads the pointer.
unsafe impl Sync for CowCopy {}

impl Drop for CowCopy {
    fn drop(&mut self) {
        // SAFETY: the mapping this value owns.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

fn image(bytes: &[u8]) -> std::io::Result<std::fs::File> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: a fresh memfd; the name is a NUL-terminated literal.
    let fd = unsafe { libc::memfd_create(c"guest-copy".as_ptr(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor owned by nothing else.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    Ok(file)
}

fn cow_copy(file: &std::fs::File, len: usize) -> std::io::Result<CowCopy> {
    cow_copy_at(file, std::ptr::null_mut(), len)
}

/// A private mapping of `file` at `at` (a shell's reservation, replaced
/// in place) or anywhere (null).
fn cow_copy_at(file: &std::fs::File, at: *mut u8, len: usize) -> std::io::Result<CowCopy> {
    use std::os::fd::AsRawFd;
    let fixed = if at.is_null() { 0 } else { libc::MAP_FIXED };
    // SAFETY: maps the whole file privately, anywhere or over a
    // reservation the caller hands over (`Instance::restore_into_slot`);
    // no other mapping is touched.
    let addr = unsafe {
        libc::mmap(
            at.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | fixed,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let addr = NonNull::new(addr.cast()).ok_or_else(|| std::io::Error::other("null mapping"))?;
    Ok(CowCopy { addr, len })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: vm_start_faults ARTIFACT.so [INPUT]")?;
    let input = args.next().unwrap_or_else(|| "x".into());
    let artifact = std::fs::read(&path)?;
    let vmm = Vmm::new()?;
    let config = InstanceConfig {
        huge_pages: false,
        ..InstanceConfig::default()
    };
    let deadline = || Instant::now() + Duration::from_secs(10);
    let starts: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    for round in 0..3 {
        println!("round {round}");
        let (mut booted, _) = Instance::boot(&vmm, &config)?;
        let after_boot = stats(&booted);
        print("boot", &vec![0; STATS.len()], &after_boot);
        let t = Instant::now();
        booted.load(&artifact, deadline())?;
        let load_took = t.elapsed();
        let after_load = stats(&booted);
        print("load + init", &after_boot, &after_load);
        booted.invoke(input.as_bytes(), deadline())?;
        let after_first = stats(&booted);
        print("first invoke (booted)", &after_load, &after_first);
        booted.invoke(input.as_bytes(), deadline())?;
        print("second invoke (booted)", &after_first, &stats(&booted));

        // A function snapshot: the loaded guest, before any invocation.
        let (mut fresh, _) = Instance::boot(&vmm, &config)?;
        fresh.load(&artifact, deadline())?;
        let saved = fresh.save()?;
        // SAFETY: `fresh` is idle (no request in flight) while we copy.
        let file = image(unsafe { fresh.guest_memory() })?;
        let len = usize::try_from(file.metadata()?.len())?;
        let memory = cow_copy(&file, len)?;
        let t = Instant::now();
        let mut restored = Instance::restore(&vmm, None, &config, Box::new(memory), &saved)?;
        let restore_took = t.elapsed();
        let before = stats(&restored);
        let t = Instant::now();
        restored.invoke(input.as_bytes(), deadline())?;
        let took = t.elapsed();
        print("first invoke (restored)", &before, &stats(&restored));
        println!(
            "{:>28}: load + init {load_took:?}; restore {restore_took:?}, its first invoke {took:?}",
            "times"
        );
    }
    let modes = std::env::var("SHELLS").unwrap_or_else(|_| "none,plain,slots,primed".into());
    for mode in modes.split(',') {
        let shell = match mode {
            "none" => ShellKind::None,
            "plain" => ShellKind::Plain,
            "slots" => ShellKind::Slots,
            "primed" => ShellKind::Primed,
            other => return Err(format!("SHELLS: no shell kind {other} (none, plain, slots, primed)").into()),
        };
        println!("\n== shells: {mode} ==");
        function_starts(&vmm, &config, &artifact, input.as_bytes(), starts, shell)?;
    }
    Ok(())
}

/// Which shell a start finds (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShellKind {
    None,
    Plain,
    Slots,
    Primed,
}

/// One function start's numbers.
struct Start {
    faults: Vec<u64>,
    restore: RestoreTimings,
    restore_ns: u64,
    first_ns: u64,
    prefaulted: u64,
}

/// A row of the table: its name and the value it shows of a start.
type Column = (&'static str, fn(&Start) -> u64);

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn pct(v: &mut [u64], p: usize) -> u64 {
    permille(v, p * 10)
}

fn permille(v: &mut [u64], p: usize) -> u64 {
    v.sort_unstable();
    v.get((v.len().saturating_sub(1)) * p / 1000).copied().unwrap_or(0)
}

fn function_starts(
    vmm: &Vmm,
    config: &InstanceConfig,
    artifact: &[u8],
    input: &[u8],
    starts: usize,
    kind: ShellKind,
) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = || Instant::now() + Duration::from_secs(10);
    let (mut fresh, _) = Instance::boot(vmm, config)?;
    fresh.load(artifact, deadline())?;
    let saved = fresh.save()?;
    // SAFETY: `fresh` is idle (no request in flight) while we copy.
    let file = image(unsafe { fresh.guest_memory() })?;
    drop(fresh);
    let len = usize::try_from(file.metadata()?.len())?;
    let source = Arc::new(ResetSource::new(saved.clone(), Box::new(file.try_clone()?))?);
    let use_ws = std::env::var_os("NO_WORKING_SET").is_none();
    let layout = vmm::layout::Layout::new(config.layout)?;
    // A slab like a host process's (the backend's, there).
    let slab = Slab::with_slots(layout.io_bytes, 4)?;
    let mut all = Vec::with_capacity(starts);
    for _ in 0..starts {
        // Off the clock, as a host process makes them between requests.
        let shell = match kind {
            ShellKind::None => None,
            ShellKind::Plain => Some(Shell::new(vmm, config.vcpu_stats)?),
            ShellKind::Slots => Some(Shell::with_memory_for_slots(vmm, config)?),
            ShellKind::Primed => {
                let mut shell = Shell::with_memory_for_slots(vmm, config)?;
                shell.prime(&saved.vcpu)?;
                Some(shell)
            }
        };
        let mut chan = slab.take()?;
        chan.bind(layout.io_addr)?;
        let t = Instant::now();
        let mut restored = match shell {
            Some(shell) if shell.has_memory() => Instance::restore_into_slot(
                vmm,
                shell,
                config,
                |at, len| Ok(Box::new(cow_copy_at(&file, at.as_ptr(), len)?) as Box<dyn ExternalMemory>),
                &saved,
                chan,
            )?,
            shell => {
                let memory = cow_copy(&file, len)?;
                Instance::restore_in_slot(vmm, shell, config, Box::new(memory), &saved, chan)?
            }
        };
        if use_ws {
            restored.set_reset_source(Arc::clone(&source));
        }
        let restore_ns = ns(t.elapsed());
        let before = stats(&restored);
        let t = Instant::now();
        restored.invoke(input, deadline())?;
        let first_ns = ns(t.elapsed());
        let after = stats(&restored);
        all.push(Start {
            faults: after.iter().zip(&before).map(|(a, b)| a.saturating_sub(*b)).collect(),
            restore: restored.restore_timings().unwrap_or_default(),
            restore_ns,
            first_ns,
            prefaulted: restored.prefaulted_pages(),
        });
        // Teardown (and the working set's record) off the clock.
        drop(restored);
        std::thread::sleep(Duration::from_millis(2));
    }
    let us = |v: u64| v as f64 / 1e3;
    let Some(first) = all.first() else {
        return Ok(());
    };
    print("start 1 (nothing recorded)", &vec![0; STATS.len()], &first.faults);
    if let Some(rest) = all.get(1..).filter(|r| !r.is_empty()) {
        let med: Vec<u64> = (0..STATS.len())
            .map(|i| pct(&mut rest.iter().map(|s| s.faults[i]).collect::<Vec<_>>(), 50))
            .collect();
        print(
            &format!("starts 2.. (median, {} pre-copied)", rest[0].prefaulted),
            &vec![0; STATS.len()],
            &med,
        );
    }
    println!("\n{starts} function starts (restore on a fresh VM + first request), us:");
    let cols: [Column; 9] = [
        ("restore", |s| s.restore_ns),
        ("  map", |s| s.restore.map_ns),
        ("  vm+vcpu", |s| s.restore.shell_ns),
        ("  slots", |s| s.restore.slots_ns),
        ("  channel", |s| s.restore.channel_ns),
        ("  vcpu", |s| s.restore.vcpu_ns),
        ("  spawn", |s| s.restore.spawn_ns),
        ("first req", |s| s.first_ns),
        ("total", |s| s.restore_ns + s.first_ns),
    ];
    for (name, f) in cols {
        let mut v: Vec<u64> = all.iter().map(f).collect();
        println!(
            "{name:>10}: median {:8.1}  p99 {:8.1}  p99.9 {:8.1}  max {:8.1}",
            us(pct(&mut v, 50)),
            us(pct(&mut v, 99)),
            us(permille(&mut v, 999)),
            us(pct(&mut v, 100))
        );
    }
    let mut slow: Vec<&Start> = all.iter().collect();
    slow.sort_by_key(|s| std::cmp::Reverse(s.restore_ns + s.first_ns));
    println!("slowest 5 (us: map, vm+vcpu, slots, channel + vcpu, spawn | first request; pf_taken):");
    for s in slow.iter().take(5) {
        println!(
            "  {:8.1} {:8.1} {:8.1} {:8.1} {:8.1} | {:8.1}; {}",
            us(s.restore.map_ns),
            us(s.restore.shell_ns),
            us(s.restore.slots_ns),
            us(s.restore.state_ns),
            us(s.restore.spawn_ns),
            us(s.first_ns),
            s.faults[0]
        );
    }
    Ok(())
}

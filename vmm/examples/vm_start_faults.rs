//! Counts what each start costs the guest in KVM events (shadow-paging
//! faults, exits, emulated instructions; from the vCPU's binary stats),
//! which unlike wall-clock times do not move with the host's load:
//! a boot, the load of an artifact, its first invocation, and the first
//! invocation of an instance restored from a copy-on-write copy of that
//! loaded guest (a function snapshot's start).
//!
//! ```text
//! cargo run --release -p vmm --example vm_start_faults -- ART.so [INPUT]
//! ```

use std::ptr::NonNull;
use std::time::{Duration, Instant};
use vmm::{ExternalMemory, Instance, InstanceConfig, Vmm};

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

fn cow_copy(bytes: &[u8]) -> std::io::Result<CowCopy> {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: a fresh memfd; the name is a NUL-terminated literal.
    let fd = unsafe { libc::memfd_create(c"guest-copy".as_ptr(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor owned by nothing else.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    // SAFETY: maps the whole file privately; no existing mapping is touched.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes.len(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let addr = NonNull::new(addr.cast()).ok_or_else(|| std::io::Error::other("null mapping"))?;
    Ok(CowCopy { addr, len: bytes.len() })
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
        let memory = cow_copy(unsafe { fresh.guest_memory() })?;
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
    Ok(())
}

//! Boots one instance, loads an artifact, invokes it a few times and prints
//! where the time went: `cargo run --release -p vmm --example vm_probe -- ART.so [INPUT]`.

use std::time::{Duration, Instant};
use vmm::{Instance, InstanceConfig, Vmm};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: vm_probe ARTIFACT.so [INPUT] [N]")?;
    let input = args.next().unwrap_or_else(|| "hello".into());
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let artifact = std::fs::read(&path)?;
    let vmm = Vmm::new()?;
    let config = InstanceConfig {
        huge_pages: std::env::var("VM_PROBE_NO_THP").is_err(),
        idle_spin_us: std::env::var("VM_PROBE_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        ..InstanceConfig::default()
    };
    let mut boots = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let (mut inst, timings) = Instance::boot(&vmm, &config)?;
        let booted = t.elapsed();
        let loaded = inst.load(&artifact, Instant::now() + Duration::from_secs(10))?;
        let load_done = t.elapsed();
        let first = inst.invoke(input.as_bytes(), Instant::now() + Duration::from_secs(10))?;
        boots.push((booted, load_done, t.elapsed(), timings, loaded.status, first.status));
    }
    let med = |f: &dyn Fn(&vmm::BootTimings) -> u64| {
        let mut v: Vec<u64> = boots.iter().map(|b| f(&b.3)).collect();
        v.sort();
        v[v.len() / 2]
    };
    println!(
        "median ns: create_vm {} memory {} setup {} vcpu {} guest_boot {} boot_total {}",
        med(&|t| t.create_vm_ns),
        med(&|t| t.memory_ns),
        med(&|t| t.setup_ns),
        med(&|t| t.vcpu_ns),
        med(&|t| t.guest_boot_ns),
        med(&|t| t.total_ns)
    );
    for b in &boots[..3] {
        println!(
            "cold: boot {:?} load+init {:?} first reply {:?} ({:?})",
            b.0, b.1, b.2, b.3
        );
    }
    let mut cold: Vec<Duration> = boots.iter().map(|b| b.2).collect();
    cold.sort();
    println!("cold boot->first reply median {:?}", cold[cold.len() / 2]);
    let (mut inst, _) = Instance::boot(&vmm, &config)?;
    let r = inst.load(&artifact, Instant::now() + Duration::from_secs(10))?;
    println!("load: {:?} {:?}", r.status, String::from_utf8_lossy(&r.data));
    let emul0 = inst.vcpu_stat("insn_emulation");
    let mut lat = Vec::new();
    let mut last = None;
    let mut exec_over_wall = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let r = inst.invoke(input.as_bytes(), Instant::now() + Duration::from_secs(10))?;
        lat.push(t.elapsed());
        exec_over_wall.push((r.returned_ns - r.entered_ns) as f64 / t.elapsed().as_nanos() as f64);
        last = Some(r);
    }
    exec_over_wall.sort_by(f64::total_cmp);
    if let Ok(rounds) = input.parse::<u32>() {
        // `sha512` input: compare CPU time with the same rounds natively.
        use sha2::Digest;
        let thread_cpu_ns = || {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: `ts` is a valid out-pointer.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
        };
        let (mut guest, mut native, mut same_artifact) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            let before = inst.vcpu_cpu_time_ns().ok_or("cpu time")?;
            inst.invoke(input.as_bytes(), Instant::now() + Duration::from_secs(10))?;
            guest.push(inst.vcpu_cpu_time_ns().ok_or("cpu time")? - before);
            let before = thread_cpu_ns();
            let mut block = [0u8; 64];
            for _ in 0..rounds {
                let d = sha2::Sha512::digest(block);
                block.copy_from_slice(&d);
            }
            std::hint::black_box(block);
            native.push(thread_cpu_ns() - before);
            let before = thread_cpu_ns();
            // SAFETY: the artifact is the sha512 example, trusted here.
            let out = unsafe { native_artifact::invoke(&path, input.as_bytes()) }?;
            std::hint::black_box(out);
            same_artifact.push(thread_cpu_ns() - before);
        }
        same_artifact.sort();
        println!(
            "CPU time: the same artifact dlopened natively: median {} us (min {}); guest / it = {:.3}",
            same_artifact[n / 2] / 1000,
            same_artifact[0] / 1000,
            {
                let mut g = guest.clone();
                g.sort();
                g[n / 2] as f64 / same_artifact[n / 2] as f64
            }
        );
        let stat = |inst: &Instance, name: &str| inst.vcpu_stat(name).unwrap_or(0);
        let (e0, i0) = (stat(&inst, "exits"), stat(&inst, "irq_exits"));
        inst.invoke(input.as_bytes(), Instant::now() + Duration::from_secs(10))?;
        println!(
            "one invocation: {} exits, {} irq exits",
            stat(&inst, "exits") - e0,
            stat(&inst, "irq_exits") - i0
        );
        guest.sort();
        native.sort();
        println!(
            "CPU time: guest median {} us (min {}), native median {} us (min {}), ratio {:.3}",
            guest[n / 2] / 1000,
            guest[0] / 1000,
            native[n / 2] / 1000,
            native[0] / 1000,
            guest[n / 2] as f64 / native[n / 2] as f64
        );
    }
    println!(
        "guest exec / host wall time per request: median {:.4}",
        exec_over_wall[n / 2]
    );
    let emul1 = inst.vcpu_stat("insn_emulation");
    lat.sort();
    let r = last.ok_or("no run")?;
    println!(
        "hot x{n}: median {:?} p99 {:?}; output {} bytes {:?}; exec {} ns; insn_emulation {:?} -> {:?}",
        lat[n / 2],
        lat[n * 99 / 100],
        r.data.len(),
        String::from_utf8_lossy(&r.data[..r.data.len().min(64)]),
        r.returned_ns - r.entered_ns,
        emul0,
        emul1
    );
    println!("guest log: {}", inst.serial_log());
    Ok(())
}

/// Runs an artifact natively in this process (like the `language` backend,
/// minus the worker): for comparing guest and native speed of the same bytes.
mod native_artifact {
    use microfaas_sdk::{HandleFn, HandleResult, HostServices, InitFn};
    use std::alloc::Layout;
    use std::ffi::c_void;

    unsafe extern "C" fn alloc(_: *mut c_void, size: usize, align: usize) -> *mut u8 {
        // SAFETY: non-zero size (the SDK never asks for 0), valid layout.
        Layout::from_size_align(size, align).map_or(std::ptr::null_mut(), |l| unsafe { std::alloc::alloc(l) })
    }
    unsafe extern "C" fn dealloc(_: *mut c_void, ptr: *mut u8, size: usize, align: usize) {
        if let Ok(l) = Layout::from_size_align(size, align) {
            // SAFETY: allocated by `alloc` with this layout.
            unsafe { std::alloc::dealloc(ptr, l) }
        }
    }
    unsafe extern "C" fn realloc(_: *mut c_void, ptr: *mut u8, old: usize, align: usize, new: usize) -> *mut u8 {
        // SAFETY: allocated by `alloc` with this layout.
        Layout::from_size_align(old, align)
            .map_or(std::ptr::null_mut(), |l| unsafe { std::alloc::realloc(ptr, l, new) })
    }
    unsafe extern "C" fn clock(_: *mut c_void) -> u64 {
        vmm::now_ns()
    }
    unsafe extern "C" fn checkpoint(_: *mut c_void) {}
    unsafe extern "C" fn fail(_: *mut c_void, _: u32, _: *const u8, _: usize) -> ! {
        std::process::abort()
    }

    /// Loads the artifact at `path`, runs init and one handle call.
    ///
    /// # Safety
    /// Runs the artifact's code in this process.
    pub unsafe fn invoke(path: &str, input: &[u8]) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        thread_local! {
            static LIB: std::cell::OnceCell<libloading::Library> = const { std::cell::OnceCell::new() };
        }
        let host = HostServices {
            abi_version: microfaas_sdk::ABI_VERSION,
            reserved: 0,
            ctx: std::ptr::null_mut(),
            alloc,
            dealloc,
            realloc,
            clock_ns: clock,
            checkpoint,
            fail,
        };
        LIB.with(|lib| {
            let lib = match lib.get() {
                Some(l) => l,
                None => {
                    // SAFETY: caller contract.
                    let l = unsafe { libloading::Library::new(path) }?;
                    // SAFETY: the SDK's init signature.
                    let init: libloading::Symbol<InitFn> = unsafe { l.get(b"microfaas_v1_init") }?;
                    // SAFETY: `host` outlives the call.
                    unsafe { init(&host) };
                    let _ = lib.set(l);
                    lib.get().ok_or("library")?
                }
            };
            // SAFETY: the SDK's handle signature.
            let handle: libloading::Symbol<HandleFn> = unsafe { lib.get(b"microfaas_v1_handle") }?;
            let mut result = HandleResult::empty();
            // SAFETY: all pointers valid for the call.
            unsafe { handle(&host, input.as_ptr(), input.len(), &mut result) };
            // SAFETY: the output block the function allocated with `alloc`.
            let out = unsafe { std::slice::from_raw_parts(result.ptr, result.len) }.to_vec();
            Ok(out)
        })
    }
}

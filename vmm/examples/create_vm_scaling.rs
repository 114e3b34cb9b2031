//! How the cost of making a VM grows with the number of VMs this process
//! already holds: times `KVM_CREATE_VM`, `KVM_CREATE_VCPU` and a thread spawn
//! (a vCPU thread's) per new VM while stepping up to MAX VMs (default
//! 2,000); each row is the mean over the VMs made in that step. Explains the density curve of `compare snapshots`: on this host
//! `KVM_CREATE_VM` grows by ~2 µs per VM alive.
//!
//! `cargo run --release -p vmm --example create_vm_scaling [-- MAX]`

use kvm_ioctls::Kvm;
use std::time::{Duration, Instant};

fn main() {
    let max: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("/dev/kvm is unusable here: {e}");
            std::process::exit(1);
        }
    };
    let mut alive = Vec::with_capacity(max);
    println!(
        "{:>6} {:>16} {:>18} {:>12}",
        "VMs", "create_vm us", "create_vcpu us", "thread us"
    );
    let mut steps = vec![10usize, 100, 250, 500, 1000, 2000, 4000, 8000];
    steps.retain(|&s| s < max);
    steps.push(max);
    for target in steps {
        let made = target.saturating_sub(alive.len());
        let (mut vm_t, mut vcpu_t, mut thread_t) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for _ in 0..made {
            let t = Instant::now();
            let vm = kvm.create_vm().expect("KVM_CREATE_VM");
            vm_t += t.elapsed();
            let t = Instant::now();
            let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
            vcpu_t += t.elapsed();
            let t = Instant::now();
            let (stop, parked) = std::sync::mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                let _ = parked.recv();
            });
            thread_t += t.elapsed();
            alive.push((vm, vcpu, stop, thread));
        }
        let per = |d: Duration| d.as_secs_f64() * 1e6 / made.max(1) as f64;
        println!(
            "{:>6} {:>16.0} {:>18.0} {:>12.0}",
            alive.len(),
            per(vm_t),
            per(vcpu_t),
            per(thread_t)
        );
    }
    for (vm, vcpu, stop, thread) in alive {
        drop(stop);
        let _ = thread.join();
        drop((vcpu, vm));
    }
}

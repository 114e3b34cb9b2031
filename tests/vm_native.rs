//! Proof that the guest runs natively on this host's nested KVM, where
//! CPL0 guest code is emulated instruction by instruction: a hot `sha512`
//! invocation makes KVM emulate (almost) no instructions (`insn_emulation`
//! from the vCPU's binary stats, `KVM_GET_STATS_FD`).

mod vm_common;

use std::time::{Duration, Instant};
use vmm::{Instance, InstanceConfig, Status};

#[test]
fn hot_sha512_emulates_almost_nothing() {
    let Some(vmm) = vm_common::open_vmm() else {
        return;
    };
    let sha = microfaas::builtin("sha512").expect("sha512 example");
    let (mut instance, _) = Instance::boot(&vmm, &InstanceConfig::default()).expect("boot");
    let deadline = || Instant::now() + Duration::from_secs(30);
    let loaded = instance.load(sha.bytes(), deadline()).expect("load");
    assert_eq!(loaded.status, Status::Ok);
    // Warm it up (first touches of heap and stack pages).
    instance.invoke(b"100", deadline()).expect("warm-up");

    let before = instance.vcpu_stat("insn_emulation").expect("insn_emulation stat");
    let runs = 20u64;
    let started = Instant::now();
    for _ in 0..runs {
        let r = instance.invoke(b"20000", deadline()).expect("invoke");
        assert_eq!(r.status, Status::Ok);
        assert_eq!(r.data.len(), 64);
    }
    let elapsed = started.elapsed();
    let after = instance.vcpu_stat("insn_emulation").expect("insn_emulation stat");
    let per_invocation = (after - before) as f64 / runs as f64;
    eprintln!(
        "insn_emulation: {before} -> {after} over {runs} hot sha512(20000) invocations \
         ({per_invocation:.1} per invocation; {:?} each)",
        elapsed / u32::try_from(runs).unwrap()
    );
    // One doorbell write per request is emulated (the MMIO exit); 20,000
    // SHA-512 blocks would be millions of instructions if any ran at CPL0.
    assert!(
        per_invocation <= 4.0,
        "{per_invocation} emulated instructions per hot invocation"
    );
}

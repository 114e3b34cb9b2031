//! A node's first-run working set: the pages the first instance restored
//! from it wrote are recorded when that instance goes, and pre-copied into
//! every later instance restored from the node, which then takes fewer
//! KVM page faults on its first request and answers the same.

mod vm_common;

use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_common::{cow_copy, image};
use vmm::{Instance, InstanceConfig, ResetSource, Status, WORKING_SET_LIMIT_PAGES};

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// Restores from the node, gives it `source`, runs one request: (output,
/// KVM page faults of that request, working-set pages pre-copied).
fn first_request(
    vmm: &vmm::Vmm,
    config: &InstanceConfig,
    file: &std::fs::File,
    len: usize,
    saved: &vmm::SavedState,
    source: &Arc<ResetSource>,
    input: &[u8],
) -> (Vec<u8>, u64, u64) {
    let mut restored = Instance::restore(vmm, None, config, Box::new(cow_copy(file, len)), saved).unwrap();
    restored.set_reset_source(Arc::clone(source));
    let prefaulted = restored.prefaulted_pages();
    let before = restored.vcpu_stat("pf_taken").expect("pf_taken stat");
    let reply = restored.invoke(input, deadline()).unwrap();
    assert_eq!(reply.status, Status::Ok);
    let faults = restored.vcpu_stat("pf_taken").unwrap() - before;
    (reply.data, faults, prefaulted)
}

#[test]
fn the_first_run_working_set_is_recorded_and_prefaulted() {
    let Some(vmm) = vm_common::open_vmm() else {
        return;
    };
    let config = InstanceConfig {
        huge_pages: false,
        ..InstanceConfig::default()
    };
    for name in ["echo", "sha512"] {
        let artifact = microfaas::builtin(name).unwrap();
        let (mut fresh, _) = Instance::boot(&vmm, &config).unwrap();
        assert_eq!(fresh.load(artifact.bytes(), deadline()).unwrap().status, Status::Ok);
        let saved = fresh.save().unwrap();
        // SAFETY: `fresh` is idle (no request in flight) while we copy.
        let file = image(unsafe { fresh.guest_memory() });
        let len = usize::try_from(file.metadata().unwrap().len()).unwrap();
        let source = Arc::new(ResetSource::new(saved.clone(), Box::new(file.try_clone().unwrap())).unwrap());
        // The first instance finds nothing recorded; dropping it records.
        let (out_first, faults_first, pre_first) = first_request(&vmm, &config, &file, len, &saved, &source, b"100");
        assert_eq!(pre_first, 0, "{name}: nothing recorded before the first instance went");
        let ws = source
            .working_set()
            .unwrap_or_else(|| panic!("{name}: no working set recorded"));
        let pages: usize = ws.iter().map(|&(_, n)| n).sum();
        assert!(pages > 0 && pages <= WORKING_SET_LIMIT_PAGES, "{name}: {pages} pages");
        // Later instances get it pre-copied: same output, fewer faults.
        for _ in 0..2 {
            let (out, faults, pre) = first_request(&vmm, &config, &file, len, &saved, &source, b"100");
            assert_eq!(out, out_first, "{name}: a prefaulted instance answers the same");
            assert_eq!(pre, u64::try_from(pages).unwrap(), "{name}: the whole set pre-copied");
            assert!(
                faults < faults_first,
                "{name}: {faults} faults with the working set, {faults_first} without"
            );
        }
    }
}

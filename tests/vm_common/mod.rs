// Shared by the `vm_*` test files (`mod vm_common;`): opening the `vm`
// backend or a raw VMM, skipping only when /dev/kvm is unusable and KVM is
// not required (`MICROFAAS_REQUIRE_KVM=1`, as CI sets it).
#![allow(dead_code)]

#[path = "../test_store/mod.rs"]
mod test_store;

use microfaas::{Backend, BackendKind, Config, ErrorKind, VmConfig};
use std::path::PathBuf;
use std::time::Duration;

/// A snapshot store private to this test process (never the user's cache),
/// under cargo's target tmp dir; stores of finished test processes are
/// removed when the next one starts.
pub fn test_store() -> PathBuf {
    test_store::process_store("microfaas-test-store")
}

/// A fresh, empty snapshot store (for tests that inspect or damage it).
pub fn fresh_store() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("microfaas-test-store")
        .tempdir()
        .unwrap()
}

/// Whether KVM tests must run (CI).
pub fn kvm_required() -> bool {
    std::env::var("MICROFAAS_REQUIRE_KVM").as_deref() == Ok("1")
}

/// The test configuration: a smaller heap keeps `alloc-hog` quick.
pub fn config() -> Config {
    Config {
        default_budget: Duration::from_secs(5),
        heap_limit_bytes: 32 << 20,
        vm: VmConfig {
            store_dir: Some(test_store()),
            ..VmConfig::default()
        },
        ..Config::default()
    }
}

/// Opens the `vm` backend, or `None` (printing why) if KVM is unusable
/// here and not required.
pub fn open_vm(config: Config) -> Option<Box<dyn Backend>> {
    match microfaas::open(BackendKind::Vm, config) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == ErrorKind::KvmUnavailable && !kvm_required() => {
            eprintln!("SKIPPED: vm backend: {e} (set MICROFAAS_REQUIRE_KVM=1 to make this a failure)");
            None
        }
        Err(e) => panic!("opening the vm backend failed: {e}"),
    }
}

/// Opens `/dev/kvm` for the raw VMM tests, with the same skip rule.
pub fn open_vmm() -> Option<vmm::Vmm> {
    match vmm::Vmm::new() {
        Ok(v) => Some(v),
        Err(e @ vmm::VmmError::KvmUnavailable(_)) if !kvm_required() => {
            eprintln!("SKIPPED: {e} (set MICROFAAS_REQUIRE_KVM=1 to make this a failure)");
            None
        }
        Err(e) => panic!("opening KVM failed: {e}"),
    }
}

// Shared by the `vm_*` test files (`mod vm_common;`) and the vm examples:
// opening the `vm` backend or a raw VMM, a node image's memfd and its
// copy-on-write mapping, skipping only when /dev/kvm is unusable and KVM is
// not required (`MICROFAAS_REQUIRE_KVM=1`, as CI sets it).
#![allow(dead_code)]

#[path = "../test_store/mod.rs"]
mod test_store;

use microfaas::{Backend, BackendKind, Config, ErrorKind, VmConfig};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::ptr::NonNull;
use std::time::Duration;
use vmm::ExternalMemory;

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

/// A private copy-on-write mapping of a file holding a guest's memory
/// (a node's image, as the backend maps one).
#[derive(Debug)]
pub struct CowCopy {
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

/// A memfd holding `bytes` (a guest's memory: a node's image).
pub fn image(bytes: &[u8]) -> std::fs::File {
    // SAFETY: a fresh memfd; the name is a NUL-terminated literal.
    let fd = unsafe { libc::memfd_create(c"node-image".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor owned by nothing else.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(bytes).unwrap();
    file
}

/// [`CowCopy`] of the first `len` bytes of `file`, anywhere.
pub fn cow_copy(file: &std::fs::File, len: usize) -> CowCopy {
    cow_copy_at(file, std::ptr::null_mut(), len).unwrap_or_else(|e| panic!("mmap: {e}"))
}

/// [`CowCopy`] of the first `len` bytes of `file` at `at` (a shell's
/// reservation, handed over by a restore) or anywhere (null).
pub fn cow_copy_at(file: &std::fs::File, at: *mut u8, len: usize) -> std::io::Result<CowCopy> {
    let fixed = if at.is_null() { 0 } else { libc::MAP_FIXED };
    // SAFETY: maps the file privately, anywhere or over the reservation
    // the restore hands to this mapping; no other mapping is touched.
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
    Ok(CowCopy {
        addr: NonNull::new(addr.cast()).ok_or_else(|| std::io::Error::other("null mapping"))?,
        len,
    })
}

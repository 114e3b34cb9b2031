//! Guest memory: one private mapping at guest-physical 0, never executable
//! in the host: either anonymous (a boot; 2 MiB aligned and advised for
//! transparent huge pages) or supplied by the caller ([`ExternalMemory`]: a
//! snapshot image mapped copy-on-write), which the instance owns and drops
//! after its VM.

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion, mmap::MmapRegionBuilder};

const ALIGN: usize = 2 << 20;

/// Creating guest memory failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// `mmap` failed.
    #[error("mapping {bytes} bytes of guest memory")]
    Map {
        /// Size asked for.
        bytes: usize,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// vm-memory refused the region.
    #[error("building the guest memory region: {0}")]
    Region(String),
}

/// Guest memory mapped by someone else (e.g. a snapshot image mapped
/// `MAP_PRIVATE`), handed to an instance, which keeps it until its VM is
/// gone and then drops it.
///
/// # Safety
/// `host_addr()..host_addr() + len()` must be one readable and writable
/// mapping, not shared with any other instance for writing (a private
/// mapping), that stays mapped at that address until the value is dropped;
/// both methods must always return the same values.
pub unsafe trait ExternalMemory: std::any::Any + Send + Sync + std::fmt::Debug {
    /// Host address of guest-physical 0.
    fn host_addr(&self) -> *mut u8;
    /// Size in bytes.
    fn len(&self) -> usize;
    /// Whether it is empty (never, for a usable guest).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// For downcasting to the caller's type.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// One instance's guest memory.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    host_addr: *mut u8,
    bytes: usize,
    /// Set when the memory is the caller's (not unmapped here).
    external: Option<Box<dyn ExternalMemory>>,
}

// SAFETY: the raw pointer is only the base of a mapping this value owns and
// unmaps on drop; all access goes through `GuestMemoryMmap`, which is Send +
// Sync (accesses are volatile and bounds-checked).
unsafe impl Send for GuestRam {}
// SAFETY: as above.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Maps `bytes` of zeroed anonymous memory at guest address 0, advised
    /// for transparent huge pages over `huge` (offset, length) ranges: where
    /// a guest touches much memory, huge pages make its first touches cheap;
    /// elsewhere a huge page only costs a 2 MiB clear on every boot.
    pub fn new(bytes: usize, huge: &[(usize, usize)]) -> Result<Self, MemoryError> {
        let map_err = |source| MemoryError::Map { bytes, source };
        let padded = bytes
            .checked_add(ALIGN)
            .ok_or_else(|| map_err(std::io::Error::from_raw_os_error(libc::ENOMEM)))?;
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                padded,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(map_err(std::io::Error::last_os_error()));
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(ALIGN);
        let head = aligned - start;
        let tail = padded - head - bytes;
        // SAFETY: trimming the unaligned head and the tail of the mapping
        // just made; nothing references them.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + bytes) as *mut libc::c_void, tail);
            }
            // Advisory only: failure leaves small pages.
            for &(from, len) in huge {
                if from.checked_add(len).is_some_and(|end| end <= bytes) {
                    libc::madvise((aligned + from) as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
                }
            }
        }
        let host_addr = aligned as *mut u8;
        // SAFETY: `host_addr..+bytes` is a live mapping owned by the value
        // built here, which unmaps it only after dropping `mem`.
        let region = unsafe { MmapRegionBuilder::<()>::new(bytes).with_raw_mmap_pointer(host_addr) }
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
            .build()
            .map_err(|e| MemoryError::Region(e.to_string()));
        let region: MmapRegion = match region {
            Ok(r) => r,
            Err(e) => {
                // SAFETY: the mapping made above, unused.
                unsafe { libc::munmap(host_addr.cast(), bytes) };
                return Err(e);
            }
        };
        let ram = Self {
            mem: GuestMemoryMmap::from_regions(vec![
                GuestRegionMmap::new(region, GuestAddress(0)).ok_or_else(|| MemoryError::Region("overflow".into()))?,
            ])
            .map_err(|e| MemoryError::Region(e.to_string()))?,
            host_addr,
            bytes,
            external: None,
        };
        Ok(ram)
    }

    /// Wraps memory mapped by the caller (a snapshot image).
    pub fn from_external(external: Box<dyn ExternalMemory>) -> Result<Self, MemoryError> {
        let bytes = external.len();
        let host_addr = external.host_addr();
        // SAFETY: `ExternalMemory`'s contract: the range is a live private
        // read/write mapping until `external` drops, which happens after
        // `mem` (field order in `Drop`: `mem` is never used to unmap).
        let region = unsafe { MmapRegionBuilder::<()>::new(bytes).with_raw_mmap_pointer(host_addr) }
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE)
            .build()
            .map_err(|e| MemoryError::Region(e.to_string()))?;
        Ok(Self {
            mem: GuestMemoryMmap::from_regions(vec![
                GuestRegionMmap::new(region, GuestAddress(0)).ok_or_else(|| MemoryError::Region("overflow".into()))?,
            ])
            .map_err(|e| MemoryError::Region(e.to_string()))?,
            host_addr,
            bytes,
            external: Some(external),
        })
    }

    /// The caller's memory, when the instance was given it.
    pub fn external(&self) -> Option<&dyn ExternalMemory> {
        self.external.as_deref()
    }

    /// The whole guest memory as bytes.
    ///
    /// # Safety
    /// The guest must not run (its vCPU stopped) while the slice lives.
    pub unsafe fn as_bytes(&self) -> &[u8] {
        // SAFETY: our live mapping of `bytes`; the caller keeps the guest
        // (the only other writer) stopped.
        unsafe { std::slice::from_raw_parts(self.host_addr, self.bytes) }
    }

    /// The guest memory (bounds-checked accessors).
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Host address of guest address 0 (for `KVM_SET_USER_MEMORY_REGION`).
    pub fn host_addr(&self) -> u64 {
        self.host_addr as u64
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Host-resident bytes of this memory (pages touched so far).
    pub fn resident_bytes(&self) -> u64 {
        let pages = self.bytes.div_ceil(4096);
        let mut vec = vec![0u8; pages];
        // SAFETY: `host_addr..+bytes` is our mapping; `vec` has one byte per page.
        let rc = unsafe { libc::mincore(self.host_addr.cast(), self.bytes, vec.as_mut_ptr()) };
        if rc != 0 {
            return 0;
        }
        vec.iter().filter(|b| *b & 1 != 0).count() as u64 * 4096
    }
}

/// An inaccessible anonymous address range (`PROT_NONE`, no memory behind
/// it), `align`-aligned, owned until dropped (unmapped then): the place a
/// VM shell's memory slots point at before the memory they will map is
/// known, which is later mapped over it in place (`MAP_FIXED`).
#[derive(Debug)]
pub(crate) struct Reserved {
    addr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the pointer is the base of a range this value owns exclusively
// and unmaps only on drop; it is never dereferenced through this value.
unsafe impl Send for Reserved {}

impl Reserved {
    /// Reserves `len` bytes aligned to `align` (a power of two, at least a
    /// page).
    pub(crate) fn new(len: usize, align: usize) -> Result<Self, MemoryError> {
        let map_err = |source| MemoryError::Map { bytes: len, source };
        let enomem = || map_err(std::io::Error::from_raw_os_error(libc::ENOMEM));
        if len == 0 || !align.is_power_of_two() {
            return Err(enomem());
        }
        let padded = len.checked_add(align).ok_or_else(enomem)?;
        // SAFETY: a fresh inaccessible anonymous mapping; nothing else is
        // affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                padded,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(map_err(std::io::Error::last_os_error()));
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(align);
        let (head, tail) = (aligned - start, padded - (aligned - start) - len);
        // SAFETY: trimming the unaligned head and the tail of the range
        // just reserved; nothing references them.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        let addr = std::ptr::NonNull::new(aligned as *mut u8).ok_or_else(|| map_err(std::io::Error::other("null")))?;
        Ok(Self { addr, len })
    }

    /// Its base.
    pub(crate) fn addr(&self) -> std::ptr::NonNull<u8> {
        self.addr
    }

    /// Its length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        // SAFETY: the range this value owns (whatever was mapped over it
        // in place is part of it).
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        if self.external.is_some() {
            return; // the caller's mapping, unmapped when `external` drops
        }
        // SAFETY: our mapping; `mem` (dropped after this) never unmaps or touches a
        // raw-pointer region, and
        // no KVM memory slot outlives the instance that owns this value (the
        // VM fd is dropped first, see `Vm`).
        unsafe { libc::munmap(self.host_addr.cast(), self.bytes) };
    }
}

//! Copy-on-write guest memory over a merged image: [`GuestMapping`] maps the
//! image `MAP_PRIVATE` (the image file is open read-only, so no write ever
//! reaches it), 2 MiB aligned, and unmaps on drop.
//!
//! ```text
//!   images/ID.img (read-only, page cache, shared by all instances)
//!   +------+------+------+------+------+------+
//!   |  p0  |  p1  |  p2  |  p3  |  p4  |  p5  |
//!   +------+------+------+------+------+------+
//!      ^      ^             ^      ^      ^          instance A wrote p2:
//!   +--|---+--|---+------+--|---+--|---+--|---+      only p2 is private
//!   |      |      |  p2' |      |      |      |  A   (copy-on-write)
//!   +------+------+------+------+------+------+
//!   |      |      |      |      |  p4' |      |  B   B wrote p4
//!   +------+------+------+------+------+------+
//! ```

use crate::error::MapError;
use crate::image::MergedImage;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every mapping: one x86-64 huge page, so that a guest's
/// 2 MiB pages can sit on host huge pages where the backing allows it
/// (e.g. a store on a tmpfs mounted `huge=always`).
pub const MAPPING_ALIGN: usize = 2 << 20;

/// How to map an image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapOptions {
    /// `madvise(MADV_HUGEPAGE)` on the mapping. Helps only where the image's
    /// page cache can be huge (tmpfs `huge=`); measured no effect on ext4.
    pub huge_page_advice: bool,
}

/// One instance's guest memory: a private copy-on-write mapping of a merged
/// image. Pages the instance never writes stay shared with every other
/// mapping of the image. Dropping it unmaps it.
///
/// The VMM passes [`GuestMapping::host_addr`] and [`GuestMapping::len`] to
/// `KVM_SET_USER_MEMORY_REGION` (guest-physical 0) and must remove that
/// memory slot (or drop the VM) before dropping the mapping.
#[derive(Debug)]
pub struct GuestMapping {
    addr: NonNull<u8>,
    len: usize,
    image: Arc<MergedImage>,
}

// SAFETY: the pointer is the base of a mapping this value owns exclusively
// and unmaps only in `drop`; nothing about it is tied to a thread.
unsafe impl Send for GuestMapping {}
// SAFETY: `&self` methods only read (bounds-checked copies out, smaps);
// host writes and resets need `&mut self`. Writes by a running guest are
// outside Rust's view, as with any KVM guest memory.
unsafe impl Sync for GuestMapping {}

impl MergedImage {
    /// Maps the image copy-on-write for one instance (microseconds: no page
    /// is read or copied until touched).
    pub fn map(self: &Arc<Self>, opts: MapOptions) -> Result<GuestMapping, MapError> {
        let bytes = self.guest_mem_bytes();
        let len = usize::try_from(bytes).map_err(|_| MapError::TooLarge(bytes))?;
        let padded = len.checked_add(MAPPING_ALIGN).ok_or(MapError::TooLarge(bytes))?;
        let err = |source| MapError::Mmap {
            path: self.path.clone(),
            bytes,
            source,
        };
        // Reserve an address range with room to align inside it.
        // SAFETY: a fresh inaccessible anonymous mapping; no existing memory
        // is affected.
        let reserve = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                padded,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reserve == libc::MAP_FAILED {
            return Err(err(std::io::Error::last_os_error()));
        }
        let start = reserve as usize;
        let aligned = start.next_multiple_of(MAPPING_ALIGN);
        let head = aligned - start;
        let tail = padded - head - len;
        // SAFETY: `aligned..aligned + len` lies inside the reservation just
        // made and owned by nobody else; MAP_FIXED replaces exactly that
        // part of it. The file is open read-only and the mapping is private,
        // so writes through it never reach the image.
        let mapped = unsafe {
            libc::mmap(
                aligned as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                self.file.as_raw_fd(),
                0,
            )
        };
        let map_failed = mapped == libc::MAP_FAILED;
        let cause = map_failed.then(std::io::Error::last_os_error);
        // SAFETY: trimming parts of the reservation made above that nothing
        // references (the whole of it if the file mapping failed).
        unsafe {
            if map_failed {
                libc::munmap(reserve, padded);
            } else {
                if head > 0 {
                    libc::munmap(reserve, head);
                }
                if tail > 0 {
                    libc::munmap((aligned + len) as *mut libc::c_void, tail);
                }
            }
        }
        if let Some(cause) = cause {
            return Err(err(cause));
        }
        let addr = NonNull::new(mapped.cast::<u8>()).ok_or_else(|| err(std::io::Error::other("null mapping")))?;
        let mapping = GuestMapping {
            addr,
            len,
            image: Arc::clone(self),
        };
        if opts.huge_page_advice {
            // Advisory only; failure changes nothing but speed.
            let _ = mapping.advise(libc::MADV_HUGEPAGE);
        }
        Ok(mapping)
    }
}

impl MergedImage {
    /// Maps the image copy-on-write over an address range the caller has
    /// reserved (e.g. a `PROT_NONE` anonymous mapping that a VM's memory
    /// slot already points at), so that a pre-made VM needs no new memory
    /// slot. The returned mapping owns the range from then on (it unmaps
    /// it on drop); on error the reservation is left as it was.
    ///
    /// # Safety
    /// `addr..addr + guest_mem_bytes()` must be one mapping owned by the
    /// caller, referenced by nothing in Rust, and handed over here: the
    /// caller must never use or unmap it again.
    pub unsafe fn map_at(self: &Arc<Self>, addr: NonNull<u8>, opts: MapOptions) -> Result<GuestMapping, MapError> {
        let bytes = self.guest_mem_bytes();
        let len = usize::try_from(bytes).map_err(|_| MapError::TooLarge(bytes))?;
        // SAFETY: the caller hands over exactly this range (see above);
        // MAP_FIXED replaces it. The file is open read-only and the mapping
        // is private, so writes through it never reach the image.
        let mapped = unsafe {
            libc::mmap(
                addr.as_ptr().cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                self.file.as_raw_fd(),
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(MapError::Mmap {
                path: self.path.clone(),
                bytes,
                source: std::io::Error::last_os_error(),
            });
        }
        let mapping = GuestMapping {
            addr,
            len,
            image: Arc::clone(self),
        };
        if opts.huge_page_advice {
            let _ = mapping.advise(libc::MADV_HUGEPAGE);
        }
        Ok(mapping)
    }
}

impl GuestMapping {
    /// Host address of guest-physical 0, for `set_user_memory_region`.
    pub fn host_addr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// Length in bytes (the guest's memory size).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: images are at least a page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The image it maps.
    pub fn image(&self) -> &Arc<MergedImage> {
        &self.image
    }

    fn range(&self, offset: u64, len: usize) -> Option<usize> {
        let start = usize::try_from(offset).ok()?;
        (start.checked_add(len)? <= self.len).then_some(start)
    }

    /// Copies guest memory at guest-physical `gpa` into `buf`; `false` if
    /// the range is outside guest memory.
    pub fn read_at(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let Some(start) = self.range(gpa, buf.len()) else {
            return false;
        };
        // SAFETY: `start..start + buf.len()` is inside the live mapping
        // (checked above) and `buf` is a distinct Rust allocation.
        unsafe { std::ptr::copy_nonoverlapping(self.addr.as_ptr().add(start), buf.as_mut_ptr(), buf.len()) };
        true
    }

    /// Copies `data` into guest memory at guest-physical `gpa` (a private
    /// copy of each page touched; the image is unchanged); `false` if the
    /// range is outside guest memory. `&mut`: host writes are exclusive.
    pub fn write_at(&mut self, gpa: u64, data: &[u8]) -> bool {
        let Some(start) = self.range(gpa, data.len()) else {
            return false;
        };
        // SAFETY: as in `read_at`; the mapping is writable and private.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.addr.as_ptr().add(start), data.len()) };
        true
    }

    fn advise(&self, advice: libc::c_int) -> std::io::Result<()> {
        // SAFETY: the whole range is this value's live mapping; advice does
        // not invalidate it (MADV_DONTNEED on a private file mapping drops
        // private copies, so later reads see the image again).
        let rc = unsafe { libc::madvise(self.addr.as_ptr().cast(), self.len, advice) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Resets the instance's memory to the image by dropping every private
    /// page (`madvise(MADV_DONTNEED)`), as wasmtime resets pooled slots:
    /// cheaper than unmapping and mapping again. No vCPU may run meanwhile.
    pub fn reset(&mut self) -> std::io::Result<()> {
        self.advise(libc::MADV_DONTNEED)
    }

    /// The pages written since the mapping was made (or last reset), by the
    /// guest or the host: those that copy-on-write made private, read from
    /// `/proc/self/pagemap` (8 bytes per page; no guest memory is read).
    /// An alternative to KVM's dirty log that also sees the VMM's own
    /// writes; pause the vCPU first.
    pub fn written_pages(&self) -> std::io::Result<Vec<crate::pages::PageRange>> {
        let pages = self.len / crate::pages::PAGE_SIZE;
        let mut entries = vec![0u8; pages * 8];
        let file = std::fs::File::open("/proc/self/pagemap")?;
        let first = (self.addr.as_ptr() as usize / crate::pages::PAGE_SIZE) as u64;
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut entries, first.saturating_mul(8))?;
        Ok(crate::pages::ranges_from_sorted(
            entries
                .chunks_exact(8)
                .enumerate()
                .filter(|(_, e)| {
                    pagemap_entry_is_private(u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]))
                })
                .map(|(i, _)| i as u64),
        ))
    }

    /// Bytes of this mapping that are private to the instance (pages it
    /// wrote: `Anonymous` in `/proc/self/smaps`).
    pub fn private_bytes(&self) -> std::io::Result<u64> {
        Ok(GuestMapping::private_bytes_of(&[self])?[0])
    }

    /// [`GuestMapping::private_bytes`] of many mappings, reading
    /// `/proc/self/smaps` once (it grows with every mapping).
    pub fn private_bytes_of(mappings: &[&GuestMapping]) -> std::io::Result<Vec<u64>> {
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        let all = smaps_anonymous_by_start(&smaps);
        mappings
            .iter()
            .map(|m| {
                all.get(&(m.addr.as_ptr() as usize))
                    .copied()
                    .ok_or_else(|| std::io::Error::other("mapping not found in /proc/self/smaps"))
            })
            .collect()
    }
}

impl Drop for GuestMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this value owns; no
        // reference into it outlives `self` (none is ever handed out).
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

/// Whether a `/proc/PID/pagemap` entry of a private file mapping is a
/// private (copy-on-written) page: present or swapped, and not a file page.
pub fn pagemap_entry_is_private(entry: u64) -> bool {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_OR_SHARED_ANON: u64 = 1 << 61;
    entry & (PRESENT | SWAPPED) != 0 && entry & FILE_OR_SHARED_ANON == 0
}

/// The `Anonymous:` bytes of the smaps entry that starts at `start`.
pub fn smaps_anonymous_bytes(smaps: &str, start: usize) -> Option<u64> {
    smaps_anonymous_by_start(smaps).get(&start).copied()
}

/// `Anonymous:` bytes of every smaps entry, by start address.
pub fn smaps_anonymous_by_start(smaps: &str) -> std::collections::HashMap<usize, u64> {
    let mut out = std::collections::HashMap::new();
    let mut current: Option<usize> = None;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-')
            && !first.ends_with(':')
            && u64::from_str_radix(hi, 16).is_ok()
        {
            current = usize::from_str_radix(lo, 16).ok();
            continue;
        }
        if let Some(start) = current
            && let Some(rest) = line.strip_prefix("Anonymous:")
            && let Ok(kb) = rest.trim().trim_end_matches("kB").trim().parse::<u64>()
        {
            out.insert(start, kb.saturating_mul(1024));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_parsing_finds_the_right_vma() {
        let smaps = "\
7f0000000000-7f0000200000 rw-p 00000000 00:00 0
Size:               2048 kB
Anonymous:            12 kB
7f0000400000-7f0004400000 rw-p 00000000 fd:00 1234   /store/images/x.img
Size:              65536 kB
Private_Dirty:         8 kB
Anonymous:             8 kB
VmFlags: rd wr mr mw me ac
";
        assert_eq!(smaps_anonymous_bytes(smaps, 0x7f00_0040_0000), Some(8192));
        assert_eq!(smaps_anonymous_bytes(smaps, 0x7f00_0000_0000), Some(12288));
        assert_eq!(smaps_anonymous_bytes(smaps, 0x1000), None);
    }

    #[test]
    fn pagemap_bits() {
        assert!(!pagemap_entry_is_private(0)); // never touched
        assert!(!pagemap_entry_is_private(1 << 63 | 1 << 61 | 42)); // file page, read
        assert!(pagemap_entry_is_private(1 << 63 | 42)); // private copy
        assert!(pagemap_entry_is_private(1 << 62)); // private copy, swapped out
    }
}

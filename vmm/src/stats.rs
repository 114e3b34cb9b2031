//! KVM binary statistics (`KVM_GET_STATS_FD`) of a vCPU, e.g.
//! `insn_emulation`, the count of instructions KVM emulated.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae_ce;
const HEADER_BYTES: usize = 24;
const DESC_FIXED_BYTES: usize = 16;

/// A vCPU's binary stats file.
#[derive(Debug)]
pub struct StatsFd {
    file: File,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

impl StatsFd {
    /// Opens the stats fd of the vCPU (or VM) fd `fd`.
    pub fn open(fd: &impl AsRawFd) -> std::io::Result<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd.
        let raw = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(raw) };
        Ok(Self { file })
    }

    /// Reads the statistic `name` (its first value), or `None` if absent.
    pub fn read(&self, name: &str) -> std::io::Result<Option<u64>> {
        let mut header = [0u8; HEADER_BYTES];
        self.file.read_exact_at(&mut header, 0)?;
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed KVM stats header");
        let name_size = usize::try_from(u32_at(&header, 4).ok_or_else(bad)?).map_err(|_| bad())?;
        let num = usize::try_from(u32_at(&header, 8).ok_or_else(bad)?).map_err(|_| bad())?;
        let desc_off = u64::from(u32_at(&header, 16).ok_or_else(bad)?);
        let data_off = u64::from(u32_at(&header, 20).ok_or_else(bad)?);
        let desc_size = DESC_FIXED_BYTES.checked_add(name_size).ok_or_else(bad)?;
        let mut descs = vec![0u8; desc_size.checked_mul(num).ok_or_else(bad)?];
        self.file.read_exact_at(&mut descs, desc_off)?;
        for d in descs.chunks_exact(desc_size) {
            let field = &d[DESC_FIXED_BYTES..];
            let end = field.iter().position(|&c| c == 0).unwrap_or(field.len());
            if &field[..end] != name.as_bytes() {
                continue;
            }
            let offset = u64::from(u32_at(d, 8).ok_or_else(bad)?);
            let mut v = [0u8; 8];
            self.file
                .read_exact_at(&mut v, data_off.checked_add(offset).ok_or_else(bad)?)?;
            return Ok(Some(u64::from_le_bytes(v)));
        }
        Ok(None)
    }
}

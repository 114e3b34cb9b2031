//! Write watches: a range made read-only so that the first write to it is
//! seen (a `SIGSEGV` with `SEGV_ACCERR`, which the runtime's fault handler
//! answers by making the range writable again and recording the hit, then
//! lets the write run), and a call that wrote nothing is known to have
//! written nothing without asking the kernel.
//!
//! Why: a cold start from a post-init snapshot maps the snapshot's heap
//! copy-on-write; after the call, the pages it wrote must be dropped for
//! the next cold start to see the snapshot again. Finding them takes a
//! `PAGEMAP_SCAN` over the whole heap (several us here, the page-table
//! walk of every populated table), on every call, also for the many
//! functions whose calls only read what `init` built (`init-heavy`'s table
//! lookups). Watched, such a call costs no system call at all; a call that
//! writes pays one fault and one `mprotect` (~25 us here) and its heap is
//! scanned as before. The image space backs off from watching a snapshot
//! whose calls write ([`crate::runtime::prelinked::ImageSpace`]).
//!
//! `mprotect` (protection key -1) keeps each page's protection key, so a
//! keyed instance's heap stays keyed through both changes.
//!
//! What it does not claim: a hostile function with native code can make its
//! heap writable itself (`mprotect`, from its own code or a gadget of the
//! worker's) and write unseen; those pages then survive into *its own* next
//! cold start in this worker, as a warm instance's state survives anyway.
//! Nothing of it reaches another function: another snapshot's heap, or
//! none, is mapped over it before another function's cold start
//! (`HeapMemory::map_persistent_prefix`, `clear_persistent`, which also end
//! the watch), and the snapshot itself is a sealed memfd mapped privately.
//!
//! The slots are process-wide (a fault may be taken by any thread), fixed
//! in number, and read by the handler with atomics only.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Watches at once in one process (a worker needs one; tests run several
/// image spaces in parallel threads).
const SLOTS: usize = 64;

struct Slot {
    /// Claimed by a [`WriteWatch`].
    owned: AtomicBool,
    start: AtomicUsize,
    /// 0: not armed. Stored last when arming (Release), cleared first.
    len: AtomicUsize,
    /// The handler made the range writable after a write fault.
    hit: AtomicBool,
}

impl Slot {
    const fn new() -> Self {
        Self {
            owned: AtomicBool::new(false),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            hit: AtomicBool::new(false),
        }
    }

    fn armed(&self) -> Option<Range<usize>> {
        let len = self.len.load(Ordering::Acquire);
        (len != 0).then(|| {
            let start = self.start.load(Ordering::Relaxed);
            start..start + len
        })
    }
}

static WATCHES: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];

/// One watch slot, owned.
#[derive(Debug)]
pub struct WriteWatch {
    slot: usize,
}

impl WriteWatch {
    /// Claims a free slot (`None` if all are taken: then nothing is
    /// watched and callers scan as without).
    pub fn new() -> Option<Self> {
        let slot = WATCHES.iter().position(|s| {
            s.owned
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        WATCHES[slot].len.store(0, Ordering::Release);
        WATCHES[slot].hit.store(false, Ordering::Relaxed);
        Some(Self { slot })
    }

    fn slot(&self) -> &'static Slot {
        &WATCHES[self.slot]
    }

    /// The range watched now (read-only, not written since it was armed).
    pub fn armed(&self) -> Option<Range<usize>> {
        self.slot().armed()
    }

    /// Makes `range` (page aligned) read-only and watches it; nothing if it
    /// is armed already. Clears the hit flag.
    ///
    /// # Safety
    /// `range` must be memory of this process that stays mapped while it
    /// is watched ([`WriteWatch::forget`] before it is unmapped or mapped
    /// over), that user-mode code may find read-only until its first write
    /// (the handler then makes it read-write again), and that the kernel
    /// is never asked to write into (a system call writing there fails
    /// with `EFAULT` instead of faulting).
    pub unsafe fn arm(&self, range: Range<usize>) -> io::Result<()> {
        if self.armed() == Some(range.clone()) {
            return Ok(());
        }
        self.forget();
        // SAFETY: caller contract: our memory; read-only until the handler
        // opens it again.
        if unsafe { libc::mprotect(range.start as *mut libc::c_void, range.len(), libc::PROT_READ) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above (already read-only).
        unsafe { self.adopt(range) };
        Ok(())
    }

    /// Watches `range`, which the caller has just mapped read-only itself.
    ///
    /// # Safety
    /// As for [`WriteWatch::arm`], and `range` must be read-only now.
    pub unsafe fn adopt(&self, range: Range<usize>) {
        let s = self.slot();
        s.len.store(0, Ordering::Release);
        s.hit.store(false, Ordering::Relaxed);
        s.start.store(range.start, Ordering::Relaxed);
        s.len.store(range.len(), Ordering::Release);
    }

    /// Whether the handler saw a write since the last arm (and made the
    /// range writable); clears the flag.
    pub fn take_hit(&self) -> bool {
        self.slot().hit.swap(false, Ordering::AcqRel)
    }

    /// Stops watching without touching the memory (it is being unmapped or
    /// mapped over).
    pub fn forget(&self) {
        self.slot().len.store(0, Ordering::Release);
    }

    /// Stops watching and makes the range read-write again.
    pub fn disarm(&self) -> io::Result<()> {
        let Some(range) = self.armed() else {
            return Ok(());
        };
        self.forget();
        if !make_writable(&range) {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for WriteWatch {
    fn drop(&mut self) {
        let _ = self.disarm();
        self.slot().owned.store(false, Ordering::Release);
    }
}

/// The part of `range` some watch holds read-only now, if any (one watch
/// per memory: the first found). For code that re-protects memory and must
/// keep the watched part read-only (keying a heap).
pub fn armed_within(range: &Range<usize>) -> Option<Range<usize>> {
    WATCHES.iter().filter_map(Slot::armed).find_map(|r| {
        let start = r.start.max(range.start);
        let end = r.end.min(range.end);
        (start < end).then_some(start..end)
    })
}

/// Stops every watch of memory inside `range` (about to be unmapped).
pub fn forget_within(range: &Range<usize>) {
    for s in &WATCHES {
        if let Some(r) = s.armed()
            && r.start < range.end
            && range.start < r.end
        {
            s.len.store(0, Ordering::Release);
        }
    }
}

/// Makes an armed (or just disarmed) range read-write again, as it was
/// before it was armed; `false` if `mprotect` failed (errno says why).
/// Async-signal-safe.
fn make_writable(range: &Range<usize>) -> bool {
    // SAFETY: an armed range is mapped memory of this process (the `arm`
    // contract) that was read-write before it was armed.
    unsafe {
        libc::mprotect(
            range.start as *mut libc::c_void,
            range.len(),
            libc::PROT_READ | libc::PROT_WRITE,
        ) == 0
    }
}

/// From the fault handler: a write fault (`SEGV_ACCERR`) at `addr`. If a
/// watch holds `addr`, makes its range read-write, records the hit and
/// says so (the write then runs again and succeeds); else `false`.
/// Async-signal-safe: atomics and one `mprotect`.
pub(crate) fn on_write_fault(addr: usize) -> bool {
    for s in &WATCHES {
        let Some(r) = s.armed() else {
            continue;
        };
        if !r.contains(&addr) {
            continue;
        }
        if !make_writable(&r) {
            return false;
        }
        s.len.store(0, Ordering::Release);
        s.hit.store(true, Ordering::Release);
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::mmap::Mapping;

    #[test]
    fn a_write_to_a_watched_range_is_seen_once_and_succeeds() {
        super::super::trap::prepare_thread().unwrap();
        let m = Mapping::anonymous(4 * 4096, libc::PROT_READ | libc::PROT_WRITE).unwrap();
        let range = m.addr()..m.addr() + m.len();
        let w = WriteWatch::new().unwrap();
        // SAFETY: our mapping, alive past the watch (forgotten below).
        unsafe { w.arm(range.clone()).unwrap() };
        assert_eq!(w.armed(), Some(range.clone()));
        assert_eq!(armed_within(&range), Some(range.clone()));
        // A read: no fault, still armed.
        // SAFETY: inside the mapping.
        assert_eq!(unsafe { m.start().add(4096).read_volatile() }, 0);
        assert!(!w.take_hit());
        assert!(w.armed().is_some());
        // A write: seen, and it lands.
        // SAFETY: inside the mapping.
        unsafe { m.start().add(2 * 4096 + 7).write_volatile(42) };
        // SAFETY: as above.
        assert_eq!(unsafe { m.start().add(2 * 4096 + 7).read_volatile() }, 42);
        assert!(w.take_hit());
        assert!(!w.take_hit(), "the flag is taken once");
        assert_eq!(w.armed(), None, "writable again: no longer watched");
        // SAFETY: writable again.
        unsafe { m.start().write_volatile(1) };
        assert!(!w.take_hit());
        // Armed again and disarmed: writable, no hit.
        // SAFETY: as above.
        unsafe { w.arm(range.clone()).unwrap() };
        w.disarm().unwrap();
        // SAFETY: inside the mapping, writable.
        unsafe { m.start().write_volatile(2) };
        assert!(!w.take_hit());
        // SAFETY: as above.
        unsafe { w.arm(range.clone()).unwrap() };
        forget_within(&range);
        assert_eq!(w.armed(), None);
        w.disarm().unwrap();
        m.protect(0, m.len(), libc::PROT_READ | libc::PROT_WRITE).unwrap();
    }
}

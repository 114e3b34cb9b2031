//! The stack a function runs on: an `mmap`'d region whose lowest pages are a
//! `PROT_NONE` guard, so running off the end faults in a known range.
//!
//! ```text
//!  limit            guard_end                                   base
//!  | PROT_NONE guard |  usable stack (grows down) <-------------- |
//! ```

use super::mmap::{Mapping, page_size, round_up_to_page};
use corosensei::stack::{Stack, StackPointer};
use std::io;
use std::ops::Range;

/// Guard bytes below the usable stack. Rust code probes every page of a large
/// frame, so one page would do; a few more also catch hand-written code.
pub const GUARD_BYTES: usize = 64 << 10;

/// An owned function stack with a guard region. Implements corosensei's
/// [`Stack`].
#[derive(Debug)]
pub struct GuardedStack {
    mapping: Mapping,
    guard_len: usize,
}

impl GuardedStack {
    /// A stack with at least `usable_bytes` of usable space.
    pub fn new(usable_bytes: usize) -> io::Result<Self> {
        let usable = round_up_to_page(usable_bytes.max(page_size()))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "stack size overflows"))?;
        let total = usable
            .checked_add(GUARD_BYTES)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "stack size overflows"))?;
        let mapping = Mapping::anonymous(total, libc::PROT_NONE)?;
        mapping.protect(GUARD_BYTES, usable, libc::PROT_READ | libc::PROT_WRITE)?;
        Ok(Self {
            mapping,
            guard_len: GUARD_BYTES,
        })
    }

    /// Gives the usable stack protection key `key` (the guard stays
    /// inaccessible whatever the key).
    pub fn set_key(&self, key: u32) -> io::Result<()> {
        // SAFETY: the usable part of the mapping this value owns, keeping its
        // protection; only its key changes.
        unsafe {
            super::pkeys::pkey_mprotect(
                self.mapping.addr() + self.guard_len,
                self.mapping.len() - self.guard_len,
                libc::PROT_READ | libc::PROT_WRITE,
                key,
            )
        }
    }

    /// Usable bytes (above the guard).
    pub fn usable_bytes(&self) -> usize {
        self.mapping.len() - self.guard_len
    }

    /// Addresses of the guard region: a fault there is a stack overflow.
    pub fn guard_range(&self) -> Range<usize> {
        self.mapping.addr()..self.mapping.addr() + self.guard_len
    }

    /// Every address of the stack, guard included.
    pub fn full_range(&self) -> Range<usize> {
        self.mapping.addr()..self.mapping.addr() + self.mapping.len()
    }
}

// SAFETY: `limit()..base()` is one mapping this value owns for its whole life;
// its lowest `GUARD_BYTES` are PROT_NONE (the guard) and the rest (at least a
// page, >= MIN_STACK_SIZE) is read-write. Both ends are page aligned, hence
// aligned to STACK_ALIGNMENT.
unsafe impl Stack for GuardedStack {
    fn base(&self) -> StackPointer {
        StackPointer::new(self.full_range().end).unwrap_or(StackPointer::MIN)
    }

    fn limit(&self) -> StackPointer {
        StackPointer::new(self.full_range().start).unwrap_or(StackPointer::MIN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let s = GuardedStack::new(100_000).unwrap();
        assert!(s.usable_bytes() >= 100_000);
        assert_eq!(s.guard_range().start, s.full_range().start);
        assert_eq!(s.guard_range().len(), GUARD_BYTES);
        assert_eq!(s.base().get(), s.full_range().end);
        assert_eq!(s.limit().get() % 16, 0);
    }
}

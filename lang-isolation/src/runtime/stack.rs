//! The stack a function runs on: an `mmap`'d region whose lowest pages are a
//! `PROT_NONE` guard, so running off the end faults in a known range.
//!
//! ```text
//!  limit            guard_end                                   base
//!  | PROT_NONE guard |  usable stack (grows down) <-------------- |
//! ```
//!
//! The instances a thread makes without a protection key share one stack
//! of each size ([`GuardedStack::for_this_thread`]): an instance is driven
//! from the thread that made it and entry calls never overlap (a call ends,
//! returned or abandoned, before the next begins, and no call is ever
//! resumed later), so at most one call uses the stack at a time. Nothing
//! is lost by sharing: without a key every instance of the thread can read
//! and write every other one's memory anyway, and the next entry starts
//! on an empty stack, where safe code cannot read what an earlier call
//! left. What is gained is the warm path's memory traffic: with thousands
//! of resident instances, a stack each means one more page per call that
//! misses the TLB (see the README's "Warm path layout"). A
//! keyed instance gets a stack of its own ([`GuardedStack::set_key`]).

use super::mmap::{Mapping, page_size, round_up_to_page};
use corosensei::stack::{Stack, StackPointer};
use std::cell::RefCell;
use std::io;
use std::ops::Range;
use std::rc::{Rc, Weak};

/// Guard bytes below the usable stack. Rust code probes every page of a large
/// frame, so one page would do; a few more also catch hand-written code.
pub const GUARD_BYTES: usize = 64 << 10;

/// An owned function stack with a guard region. Implements corosensei's
/// [`Stack`].
/// Not `Send`: a shared stack is shared by one thread's instances only.
#[derive(Debug)]
pub struct GuardedStack {
    mapping: Rc<Mapping>,
    guard_len: usize,
}

thread_local! {
    /// This thread's shared stacks, by usable size (weak: the last instance
    /// using one unmaps it).
    static SHARED: RefCell<Vec<(usize, Weak<Mapping>)>> = const { RefCell::new(Vec::new()) };
}

impl GuardedStack {
    /// A stack with at least `usable_bytes` of usable space, of its own.
    pub fn new(usable_bytes: usize) -> io::Result<Self> {
        Ok(Self {
            mapping: Rc::new(Self::map(usable_bytes)?),
            guard_len: GUARD_BYTES,
        })
    }

    /// This thread's shared stack of at least `usable_bytes` (see the
    /// module's documentation), made if the thread has none of that size
    /// alive.
    pub fn for_this_thread(usable_bytes: usize) -> io::Result<Self> {
        SHARED.with(|shared| {
            let mut shared = shared.borrow_mut();
            shared.retain(|(_, weak)| weak.strong_count() > 0);
            if let Some(mapping) = shared
                .iter()
                .find(|(size, _)| *size == usable_bytes)
                .and_then(|(_, weak)| weak.upgrade())
            {
                return Ok(Self {
                    mapping,
                    guard_len: GUARD_BYTES,
                });
            }
            let stack = Self::new(usable_bytes)?;
            shared.push((usable_bytes, Rc::downgrade(&stack.mapping)));
            Ok(stack)
        })
    }

    /// Whether another instance uses this stack too.
    pub fn is_shared(&self) -> bool {
        Rc::strong_count(&self.mapping) > 1 || Rc::weak_count(&self.mapping) > 0
    }

    fn map(usable_bytes: usize) -> io::Result<Mapping> {
        let usable = round_up_to_page(usable_bytes.max(page_size()))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "stack size overflows"))?;
        let total = usable
            .checked_add(GUARD_BYTES)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "stack size overflows"))?;
        let mapping = Mapping::anonymous(total, libc::PROT_NONE)?;
        mapping.protect(GUARD_BYTES, usable, libc::PROT_READ | libc::PROT_WRITE)?;
        Ok(mapping)
    }

    /// Gives the usable stack protection key `key` (the guard stays
    /// inaccessible whatever the key). A shared stack is first replaced by
    /// one of its own, of the same size: a key is one instance's.
    pub fn set_key(&mut self, key: u32) -> io::Result<()> {
        if self.is_shared() {
            *self = Self::new(self.usable_bytes())?;
        }
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

    #[test]
    fn a_thread_shares_one_stack_per_size_and_a_key_takes_its_own() {
        let a = GuardedStack::for_this_thread(100_000).unwrap();
        let b = GuardedStack::for_this_thread(100_000).unwrap();
        assert_eq!(a.full_range(), b.full_range());
        assert!(a.is_shared() && b.is_shared());
        let other_size = GuardedStack::for_this_thread(200_000).unwrap();
        assert_ne!(other_size.full_range(), a.full_range());
        let own = GuardedStack::new(100_000).unwrap();
        assert!(!own.is_shared());
        assert_ne!(own.full_range(), a.full_range());
        // Another thread has its own.
        let there = std::thread::spawn(|| GuardedStack::for_this_thread(100_000).unwrap().full_range())
            .join()
            .unwrap();
        assert_ne!(there, a.full_range());
        // Without a PKU key the call fails, but the stack is already its own.
        let mut keyed = GuardedStack::for_this_thread(100_000).unwrap();
        let _ = keyed.set_key(0);
        assert!(!keyed.is_shared());
        assert_ne!(keyed.full_range(), a.full_range());
        assert_eq!(keyed.usable_bytes(), a.usable_bytes());
        // The last user unmaps it; the next is a fresh one that works.
        drop((a, b));
        let again = GuardedStack::for_this_thread(100_000).unwrap();
        assert!(again.usable_bytes() >= 100_000);
    }
}

//! A death notice without a watcher thread: a child registers a word of
//! its region as the one entry of its (main) thread's robust futex list,
//! so that when it dies, however it dies (`SIGKILL` included), the kernel
//! sets [`FUTEX_OWNER_DIED`] in the word and wakes its waiters. The parent
//! waits on the word together with its own ([`crate::futex::wait_any`]).
//!
//! The notice fires when the *registering thread* exits: register from the
//! thread that lives as long as the process (its main thread). It replaces
//! the C library's robust list for that thread (robust pthread mutexes on
//! that thread are then not recovered; the children of this crate use
//! none). The word is written by the child, so the parent reads it as
//! untrusted: a live child can also set the bit (it can die at will too).

use std::sync::atomic::{AtomicU32, Ordering};

/// A waiter wants to be woken when the owner dies (kernel ABI).
pub const FUTEX_WAITERS: u32 = 0x8000_0000;
/// The owner died (kernel ABI).
pub const FUTEX_OWNER_DIED: u32 = 0x4000_0000;
/// The owner's TID (kernel ABI).
pub const FUTEX_TID_MASK: u32 = 0x3fff_ffff;

/// Whether a death-notice word says its owner died (pure).
pub const fn owner_died(word: u32) -> bool {
    word & FUTEX_OWNER_DIED != 0
}

/// `struct robust_list` of the kernel ABI.
#[repr(C)]
struct RobustList {
    next: *mut RobustList,
}

/// `struct robust_list_head` of the kernel ABI.
#[repr(C)]
struct RobustListHead {
    list: RobustList,
    futex_offset: libc::c_long,
    list_op_pending: *mut RobustList,
}

/// Child side: makes the kernel mark `alive` [`FUTEX_OWNER_DIED`] and wake
/// its waiters when this thread (and so, from the main thread, this
/// process) dies. `alive` must stay mapped until then (a word of the
/// shared region, which a child never unmaps). Stores this thread's TID
/// and [`FUTEX_WAITERS`] in it.
pub fn register_death_notice(alive: &AtomicU32) -> std::io::Result<()> {
    let head: &'static mut RobustListHead = Box::leak(Box::new(RobustListHead {
        list: RobustList {
            next: std::ptr::null_mut(),
        },
        futex_offset: 0,
        list_op_pending: std::ptr::null_mut(),
    }));
    let node: &'static mut RobustList = Box::leak(Box::new(RobustList {
        next: std::ptr::null_mut(),
    }));
    let node_addr = std::ptr::from_mut(node).addr();
    let offset = alive.as_ptr().addr().wrapping_sub(node_addr);
    head.futex_offset = libc::c_long::from_ne_bytes(offset.to_ne_bytes());
    node.next = &mut head.list;
    head.list.next = node;
    // SAFETY: gettid has no preconditions.
    let tid = u32::try_from(unsafe { libc::gettid() }).unwrap_or(0) & FUTEX_TID_MASK;
    alive.store(tid | FUTEX_WAITERS, Ordering::Release);
    // SAFETY: `head` and `node` are leaked (live forever) and form a valid
    // circular list whose one entry locates `alive`, which the caller keeps
    // mapped until the thread exits.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_set_robust_list,
            head as *mut RobustListHead,
            std::mem::size_of::<RobustListHead>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_exits_marks_its_word() {
        let word: &'static AtomicU32 = Box::leak(Box::new(AtomicU32::new(0)));
        std::thread::spawn(move || register_death_notice(word).unwrap())
            .join()
            .unwrap();
        // The kernel walks the list after the thread's exit, which join
        // waits for only up to the thread's last user-space instruction.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !owner_died(word.load(Ordering::Acquire)) {
            assert!(std::time::Instant::now() < deadline, "no death notice");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(!owner_died(FUTEX_WAITERS | 5));
    }
}

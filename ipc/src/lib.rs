//! One mechanism for the host's exec'd children that share memory with it:
//! language workers, process runners and VMM host processes.
//!
//! - [`region`]: a memfd mapped `MAP_SHARED` by both sides ([`region::SharedRegion`]).
//! - [`futex`]: shared futex wait / wake / wait-on-any on words in it, and the clock.
//! - [`ring`]: the lock-free SPSC ring of `Copy` entries laid out in it.
//! - [`spawn`]: `posix_spawn` of a child with fds at fixed numbers and nothing
//!   else inherited, its pidfd, reaping, its exit status in words, the child's
//!   check that its parent lives.
//! - [`watch`]: one thread that calls back when any of many children dies, so
//!   that callers parked on futexes can be woken and failed once.
//! - [`pagemap`]: which pages of a private file mapping were written, by
//!   `ioctl(PAGEMAP_SCAN)` (a snapshot's heap in a worker, a VM's memory at
//!   reset).
//! - [`holes`]: which page runs of a file hold data (`SEEK_DATA`/`SEEK_HOLE`:
//!   an I/O window's written pages at a VM reset, a sparse snapshot image's).
//! - [`robust`]: the child's side of a death notice without any thread: a
//!   robust-futex word the kernel marks and wakes when the child dies.
//!
//! The trust rule: a child runs code the parent does not trust (a function,
//! a guest), so **everything the parent reads from a region is untrusted**:
//! read through atomics or raw copies, check every offset, length and index
//! against the parent's own copy of the layout, and never wait on a word
//! without a timeout or a death watch. A child trusts its parent.
//!
//! ```no_run
//! use ipc::{futex, region::SharedRegion, spawn::Child};
//! use std::os::fd::AsFd;
//! use std::sync::atomic::{AtomicU32, Ordering};
//!
//! let region = SharedRegion::create("example", 4096)?;
//! let fd = region.fd().expect("the creator holds the fd");
//! let mut child = Child::spawn("/usr/bin/some-child".as_ref(), &[], &[], &[(fd, 3)])?;
//! // SAFETY: offset 0 of a live, page-aligned mapping of 4096 bytes.
//! let word = unsafe { &*region.as_ptr().cast::<AtomicU32>() };
//! while word.load(Ordering::Acquire) == 0 && child.is_alive() {
//!     futex::wait(word, 0, Some(std::time::Duration::from_millis(10)));
//! }
//! child.kill_and_reap()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod futex;
pub mod holes;
pub mod pagemap;
pub mod region;
pub mod ring;
pub mod robust;
pub mod spawn;
pub mod watch;

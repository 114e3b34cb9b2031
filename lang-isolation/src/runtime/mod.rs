//! The host-side function runtime, shared by the process runner and the
//! language worker: load an artifact, give it a heap and a stack, call its
//! entry points, and turn every way a call can end into a value.
//!
//! ```text
//!  SealedArtifact::from_fd(fd)         a sealed memfd from the host (seals checked)
//!  ArtifactImage::parse(sealed)        read + check once: the LoadPlan (elf.rs)
//!  LoadedFunction::load(&image)        map a fresh private copy, relocate (loader.rs)
//!  (or ImageSpace::enter(&prelinked)   the pre-linked image / post-init snapshot,
//!                                      copy-on-write, no relocation: prelinked.rs)
//!        |
//!  Instance::new(function, &config)    heap (persistent + invocation arenas,
//!        |                             one byte limit) + guarded stack +
//!        |                             this thread's SIGSEGV/SIGBUS handling
//!  instance.init()?                    once; allocations persist
//!  instance.handle(input)? -> Output   per request; output borrows the heap;
//!        |                             dropping it resets the invocation arena
//!  Err(Failure::..)                    panic, OOM, stack overflow, fault,
//!                                      preemption: the call is abandoned
//!                                      (stack reset, invocation arena reset)
//! ```
//!
//! Every entry call runs on the instance's [`GuardedStack`] (the thread's
//! shared one unless the instance is keyed: see [`GuardedStack::for_this_thread`])
//! as a corosensei coroutine. `fail()` (the SDK's panic path) switches back to the
//! runtime at once; a fault is caught by the runtime's SIGSEGV/SIGBUS handler (on a
//! `sigaltstack`), which redirects the faulting context back to the runtime;
//! a timer or watchdog handler does the same with [`preempt_from_signal`].
//! An abandoned call's stack is simply reused and its heap blocks are
//! discarded with the invocation arena, so nothing needs unwinding.
//!
//! Contract for callers: drive an instance from one thread (it is not
//! `Send`); after a [`Failure`] check [`Instance::poisoned`] (the instance
//! is then unusable) or, to be strict, discard the instance on any failure
//! but [`Failure::FunctionError`] (the function's own statics may be torn).
//! Contract for functions: state that must outlive one invocation is built
//! by `init()`; whatever `handle` allocates is gone when the call ends.
//!
//! Protection keys: [`Instance::new_keyed`] puts all of an instance's
//! memory (heap, stack, context page, the image's non-executable pages)
//! under one PKU key and makes every entry call through an assembly gate
//! that opens only that key while the function runs (see [`pkeys`]); the
//! allocator state and the host table live in the keyed context, so the
//! runtime re-checks what it reads there against its own copies. The
//! language worker uses it; the process runner does not.
//!
//! Signals: [`Instance::new`] installs process-wide SIGSEGV/SIGBUS handlers
//! (once; earlier handlers are kept and called for faults that are not on a
//! function stack) and a 64 KiB `sigaltstack` on the calling thread if it has
//! none. A SIGSEGV/SIGBUS sent with `kill` is not a fault: it takes the
//! default action. A preempting signal handler must be installed with
//! `SA_SIGINFO` (and `SA_ONSTACK`) and call [`preempt_from_signal`] with its
//! `ucontext`; a preemption that lands inside a host service (the heap) is
//! deferred to the service's return, so the heap is never left torn.

mod elf;
pub mod fds;
mod heap;
mod instance;
mod loader;
mod memfns;
mod mmap;
pub mod pagescan;
pub mod pkeys;
pub mod prelinked;
mod services;
mod stack;
mod trap;
mod watch;

pub use elf::{ElfError, Import, LoadPlan, MAX_SPAN_BYTES, Protection, RelocValue, Relocation, SegmentPlan, plan};
pub use heap::{Arena, HeapMemory, InstanceHeap, PersistentState};
pub use instance::{Instance, InstanceShell, Output};
pub use loader::{
    ArtifactImage, FunctionCode, LoadError, LoadedFunction, MAX_ARTIFACT_BYTES, REQUIRED_SEALS, SealedArtifact,
};
pub use services::monotonic_ns;
pub use stack::{GUARD_BYTES, GuardedStack};
pub use trap::{Preemption, preempt_from_signal};

/// Default heap limit of an instance: 64 MiB.
pub const DEFAULT_HEAP_LIMIT_BYTES: usize = 64 << 20;
/// Default usable stack of an instance: 1 MiB.
pub const DEFAULT_STACK_BYTES: usize = 1 << 20;

/// An instance's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceConfig {
    /// Heap limit (both arenas together), in bytes.
    pub heap_limit_bytes: usize,
    /// Usable stack, in bytes (a guard of [`GUARD_BYTES`] lies below it).
    pub stack_bytes: usize,
}

impl Default for InstanceConfig {
    fn default() -> Self {
        Self {
            heap_limit_bytes: DEFAULT_HEAP_LIMIT_BYTES,
            stack_bytes: DEFAULT_STACK_BYTES,
        }
    }
}

/// Setting up an instance failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Installing the fault handlers or the signal stack failed.
    #[error("cannot set up fault handling")]
    Signals(#[source] std::io::Error),
    /// Mapping the heap failed.
    #[error("cannot map the function heap")]
    Heap(#[source] std::io::Error),
    /// Mapping the stack failed.
    #[error("cannot map the function stack")]
    Stack(#[source] std::io::Error),
    /// Giving the instance's memory its protection key failed.
    #[error("cannot give the instance its memory protection key")]
    Keys(#[source] std::io::Error),
}

/// How an entry call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// `handle` (or `init`) returned an error; the instance is fine.
    #[error("the function returned an error: {message}")]
    FunctionError {
        /// The function's message.
        message: String,
    },
    /// The function panicked.
    #[error("the function panicked: {message}")]
    Panicked {
        /// The panic message.
        message: String,
    },
    /// The heap limit was reached and the function could not go on.
    #[error("the function ran out of memory (limit {limit_bytes} bytes): {message}")]
    OutOfMemory {
        /// The panic message.
        message: String,
        /// The heap limit.
        limit_bytes: usize,
    },
    /// The function ran into its stack's guard.
    #[error("the function overflowed its stack of {stack_bytes} bytes")]
    StackOverflow {
        /// Usable stack bytes.
        stack_bytes: usize,
    },
    /// Another memory fault on the function stack.
    #[error("the function faulted (signal {signal}) at address {addr:#x}")]
    Fault {
        /// SIGSEGV or SIGBUS.
        signal: i32,
        /// The faulting address.
        addr: usize,
    },
    /// Stopped by [`preempt_from_signal`].
    #[error("the function was preempted")]
    Preempted,
    /// The function touched memory under another protection key (another
    /// instance's, or the runtime's) while only its own was open.
    #[error(
        "memory protection key violation: access to {addr:#x} (key {key}), outside the function's own memory (key {own})"
    )]
    KeyViolation {
        /// The faulting address.
        addr: usize,
        /// The key of the page touched.
        key: u32,
        /// The function's own key.
        own: u32,
    },
    /// The artifact refused the host table's ABI version.
    #[error("the artifact refused the host ABI version")]
    BadAbi,
    /// The artifact broke the ABI (bad status, output outside its heap...).
    #[error("the artifact broke the ABI: {detail}")]
    Malformed {
        /// What was wrong.
        detail: String,
    },
    /// The instance is poisoned by an earlier failure and cannot run.
    #[error("the instance is unusable after an earlier failure")]
    Poisoned,
}

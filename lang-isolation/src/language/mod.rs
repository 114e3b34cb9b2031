//! The `language` backend after Boucher et al., "Putting the 'Micro' Back in
//! Microservice" (USENIX ATC 2018): a dispatcher and one single-threaded,
//! pinned worker process per core that runs functions as native calls into
//! preloaded shared objects.
//!
//! # Tenants
//! Each tenant has its own workers (one per core) and its own sandbox uid;
//! a worker only ever holds its tenant's functions, so a function with
//! native code reaches no other tenant's inputs, outputs, heaps or code
//! without escaping its process (which the sandbox blocks). A tenant's
//! workers start on its first deploy or request; at most `max_workers` live
//! at once, the idle tenant used least recently being stopped to make room
//! (its next request starts them again). See `tenants`.
//!
//! ```text
//!  callers ──invoke──> Dispatcher ──┬─ WorkerHandle 0 ── memfd region ── microfaas-worker (cpu 1)
//!                        watchdog ──┘   requests ring  ─────────────────>  poll / park (futex)
//!                       (deadlines,     replies ring  <─────────────────   run on own stack + heap
//!                        deaths)        slot data areas, in-flight record, deadline
//! ```
//!
//! # Queues
//! Per worker one shared `memfd` region holds a single-producer /
//! single-consumer request ring and reply ring of descriptors, one cache
//! line each, stamped with their position so that the consumer polls the
//! entry itself (one line transfer per message; counters on their own lines,
//! the producer's view of `head` cached), plus per-slot input and output
//! areas. Callers take a slot, write the input, push a descriptor and spin on
//! the reply ring; the worker spins on the request ring. Neither makes a
//! system call while busy: an idle worker parks on a futex after
//! `idle_spin` (the producer wakes it only if it announced so), as does a
//! caller.
//!
//! # Preemption, and why abandoning a call is sound
//! Every invocation has a budget; the worker publishes the deadline in
//! shared memory. In the default **watchdog** mode nothing ticks in the
//! worker: the dispatcher's watchdog thread (on core 0, `SCHED_FIFO` when
//! permitted, asleep until the earliest deadline that could fall, looking
//! again `watchdog_interval` after one passed, and every millisecond for
//! dead workers while work is outstanding) sends SIGUSR1 only to a worker whose current invocation is
//! past its deadline, so a function within budget pays nothing. The **periodic**
//! mode is the paper's per-worker POSIX timer (SIGALRM every quantum, with
//! `SA_RESTART`), kept for the Figure 2 experiment. In both, the handler
//! checks the deadline itself (stray signals are ignored) and redirects the
//! interrupted context off the function's stack via the runtime
//! ([`crate::runtime::preempt_from_signal`]).
//!
//! Instead of the paper's injected panic, every call runs on its own guarded
//! stack and allocates only from its instance's invocation arena, so the
//! call is abandoned wholesale: no unwinding through user code (which could
//! catch it), no destructors run, nothing is freed piecemeal (the arena is
//! reset at once). This is sound because (1) the function is safe Rust and
//! reaches host state only through the host-services table, and a
//! preemption landing inside a host service is deferred to the end of that
//! service (the allocator is never torn); (2) nothing on the abandoned stack
//! owns host resources — the runtime's frames there hold only raw pointers,
//! and the function's allocations all live in the arena that is reset; (3)
//! the function's own statics may be torn by any non-returning exit, so the
//! worker replaces such an instance with a freshly loaded copy (unmap, map
//! a fresh private image of the artifact's memfd, init; the heap and stack
//! mappings are reused) before its next use. The function cannot mask, catch or delay the signal: it has no
//! `unsafe`, and the handlers run in the worker, not in the function.
//!
//! # Artifacts: sealed memfds, our own loader
//! A worker needs no filesystem once started: every artifact reaches it as
//! a sealed memfd over its catalog socket (the initial catalog at start,
//! later deploys before their `LOAD`, see `catalog`), and the runtime's own
//! ELF loader maps it ([`crate::runtime`]): code only from the memfd,
//! never writable and executable.
//!
//! # Cold starts: pre-linked images and post-init snapshots
//! At deploy the worker relocates each artifact's writable pages once for a
//! range of its own in the worker's image space and stores them in its
//! image arena ([`crate::runtime::prelinked`]). A cold start maps that
//! image copy-on-write (code and rodata from the sealed artifact memfd), or
//! nothing at all if it is still mapped; the first one runs `init()` and
//! captures the writable pages, the persistent heap and the allocator state
//! as the image's post-init snapshot, and every later one starts from it
//! without running `init()`. After the reply the instance's written pages
//! are restored (by copy for small writable parts; of the copy-on-write
//! snapshot heap only the pages the call wrote are dropped, found with one
//! `ioctl(PAGEMAP_SCAN)` on the worker's `/proc/self/pagemap`, opened
//! before the sandbox: [`crate::runtime::pagescan`]; pages only read stay
//! mapped). `DispatcherConfig::cold_start` selects the path (`Load`: the
//! loader's fresh private copy, relocated, `init()` every time;
//! `Prelinked`; `Snapshot`, the default). With
//! `DispatcherConfig::lazy_resident` a deploy makes no warm instance: a
//! function only ever started cold costs its image and snapshot only.
//!
//! # Faults and recovery
//! Panics and heap exhaustion leave through `fail()`, stack overflow through
//! the guard page (SIGSEGV on a `sigaltstack`), forbidden system calls
//! through seccomp's SIGSYS; each becomes a typed error and the worker goes
//! on. A worker that dies anyway (or does not stop within `hang_grace` of
//! its deadline, and is killed) is reaped by the watchdog: its in-flight
//! request — recorded in shared memory before it leaves the ring — fails
//! with worker-lost exactly once, queued requests stay in the ring for the
//! replacement, which is exec'd with the resident functions. A function
//! that kills or hangs `blacklist_after` workers is refused.

mod catalog;
mod dispatcher;
mod error;
mod idmap;
mod pool;
pub mod protocol;
/// The SPSC rings of the shared region (the one copy, in `microfaas-ipc`).
pub use ipc::ring;
pub mod shm;
mod signals;
mod tenants;
pub mod watchdog;
pub mod worker;

pub use dispatcher::{
    Completed, DEFAULT_MAX_WORKERS, Dispatcher, DispatcherConfig, DispatcherStats, FunctionIndex, Start, TenantStats,
};
pub use error::LanguageError;
pub use protocol::{ColdStart, Preemption};

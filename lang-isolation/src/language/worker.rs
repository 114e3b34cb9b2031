//! The worker process: one single-threaded loop per core that polls its
//! request ring, runs functions through [`crate::runtime`], and answers on
//! its reply ring. Preemption and seccomp signals are handled here (see
//! [`super::signals`]); everything the loop does on the warm path is plain
//! memory access — no system call unless it parks or a function fails.
//!
//! It needs no filesystem: its shared region is inherited at fd 3 (mapped,
//! then closed) and its artifacts arrive as sealed memfds on the catalog
//! socket at fd 4 ([`crate::runtime::fds`]), mapped by the runtime's own
//! loader. A cold start maps the function's pre-linked image (or its
//! post-init snapshot) copy-on-write in its own range, see
//! [`crate::runtime::prelinked`]; the image arena that holds them is made
//! before the sandbox.
//!
//! With protection keys (`Layers::pkeys`, where the CPU has PKU) the worker
//! allocates the kernel's 15 keys before entering its sandbox and gives
//! each instance the least shared one ([`crate::runtime::pkeys::KeyPool`]):
//! while a function runs, the worker's rings, slots, in-flight record, its
//! heap and every other instance are closed to it; a touch is a
//! `PolicyViolation` and the instance is reloaded. Its state is published
//! in the shared header (`pkeys_state`, `pkeys_keys`).

use super::catalog::{self, CatalogEntry, Message};
use super::protocol::{ColdStart, LOAD_REGISTER_ONLY, Outcome, Preemption, Reply, Request, WorkerArgs, op};
use super::shm::{Header, Layout, Region, futex_wait, futex_wake_all, now_ns};
use super::signals;
use crate::runtime::fds::{SHM_FD, WORKER_SOCKET_FD};
use crate::runtime::pagescan::PageScan;
use crate::runtime::pkeys::{self, KeyPool, PkeysState};
use crate::runtime::prelinked::{self, ImageArena, ImageSpace, PrelinkedImage, StartFrom, Teardown};
use crate::runtime::{ArtifactImage, Failure, Instance, InstanceConfig, InstanceShell, LoadedFunction, SealedArtifact};
use crate::sandbox::{self, SandboxError, SandboxSpec};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{Ordering, fence};
use std::time::Duration;

/// Setting up a worker failed (before it serves anything).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The command line was malformed.
    #[error("bad worker arguments")]
    Args(#[from] super::protocol::ArgsError),
    /// The shared-region layout is impossible.
    #[error("bad shared-region layout")]
    Layout(#[from] super::shm::LayoutError),
    /// An fd the dispatcher must pass is not open.
    #[error("no inherited fd {0} (shared region at {SHM_FD}, catalog socket at {WORKER_SOCKET_FD})")]
    MissingFd(RawFd),
    /// Mapping the shared region failed.
    #[error("cannot map the shared region")]
    Map(#[source] std::io::Error),
    /// Reading the initial catalog from the socket failed.
    #[error("cannot read the function catalog")]
    Catalog(#[source] std::io::Error),
    /// Installing signal handlers or the timer failed.
    #[error("cannot set up preemption signals")]
    Signals(#[source] std::io::Error),
    /// The sandbox specification was malformed.
    #[error("bad sandbox specification")]
    SandboxSpec(#[from] sandbox::SpecError),
    /// Entering the sandbox failed.
    #[error("cannot enter the sandbox")]
    Sandbox(#[from] SandboxError),
}

/// Park timeout: also how often a parked worker checks its parent is alive.
const PARK_TIMEOUT_NS: u64 = 100_000_000;

struct Registered {
    /// The image (the dispatcher's artifact id) it runs from.
    image: u64,
    /// Whether it wants its image resident (preloaded, not evicted).
    loaded: bool,
}

use super::idmap::IdMap;

struct Worker {
    region: Region,
    /// The catalog socket (artifact memfds arrive on it).
    socket: OwnedFd,
    /// Largest output in bytes (the output area may be larger: page rounded).
    output_limit: usize,
    config: InstanceConfig,
    init_budget_ns: u64,
    functions: IdMap<u32, Registered>,
    /// Parsed artifacts by image id, while any registered function uses one.
    images: IdMap<u64, ArtifactImage>,
    /// Resident instances by image id: one per image (functions deployed
    /// from the same artifact share its loaded copy and init state),
    /// resident while any registered function with `loaded` uses it.
    resident: IdMap<u64, Instance>,
    /// Catalog messages received ahead of their `LOAD` request.
    pending: IdMap<u32, (CatalogEntry, Option<OwnedFd>, Option<OwnedFd>)>,
    /// Images whose instance must be reloaded before its next use (a failure
    /// other than a returned error may have torn the function's statics).
    stale: Vec<u64>,
    /// Cold instances to unmap once the reply is out.
    retired: Vec<Instance>,
    /// The pre-linked cold path (`None`: cold starts load a private copy).
    prelinked: Option<ColdImages>,
    /// Memory of the last closed cold instance, reused by the next one.
    cold_shell: Option<InstanceShell>,
    /// Protection keys for new instances (`None`: no keys; see
    /// [`crate::runtime::pkeys`]). A resident instance holds its key while
    /// resident, the cold shell holds one for every cold start.
    keys: Option<KeyPool>,
    /// Keys wanted but the host has no PKU: instances still run through the
    /// gate, in its copy without PKRU writes (no isolation from keys, the
    /// same code path as with them; `pkeys_state` says unavailable).
    gate_without_keys: bool,
}

/// The pre-linked cold path: the arena the images live in, the address
/// space they are mapped in, and each deployed artifact's image (see
/// [`crate::runtime::prelinked`]).
struct ColdImages {
    arena: ImageArena,
    space: ImageSpace,
    images: IdMap<u64, PrelinkedImage>,
    /// Start from post-init snapshots.
    snapshots: bool,
    /// The image of the last cold start (its pages are restored after it).
    last: Option<u64>,
}

impl ColdImages {
    /// Made before the sandbox (`memfd_create`, `ftruncate`).
    fn new(mode: ColdStart) -> Option<Self> {
        if mode == ColdStart::Load {
            return None;
        }
        let made = ImageArena::create(prelinked::DEFAULT_ARENA_BYTES).and_then(|arena| {
            let space = ImageSpace::new(
                prelinked::DEFAULT_SPACE_BYTES,
                prelinked::DEFAULT_MAX_MAPPED,
                Teardown::Restore,
            )
            .map_err(prelinked::PrelinkError::Map)?;
            Ok((arena, space))
        });
        match made {
            Ok((arena, mut space)) => {
                // Before the sandbox too (it has no `open`): without it a
                // snapshot's whole heap is dropped after every call.
                match PageScan::open() {
                    Ok(scan) => space.use_page_scan(scan),
                    Err(e) => eprintln!("microfaas-worker: no page scan: {}", error_chain(&e)),
                }
                Some(Self {
                    arena,
                    space,
                    images: IdMap::default(),
                    snapshots: mode == ColdStart::Snapshot,
                    last: None,
                })
            }
            Err(e) => {
                eprintln!("microfaas-worker: no pre-linked cold starts: {}", error_chain(&e));
                None
            }
        }
    }
}

/// Why a function could not be made ready (loaded and initialised).
struct NotReady {
    /// `InitFailed`, or `PolicyViolation` when init() broke the sandbox.
    outcome: Outcome,
    message: String,
    /// The forbidden system call, for a violation.
    detail: u64,
}

impl From<String> for NotReady {
    fn from(message: String) -> Self {
        Self {
            outcome: Outcome::InitFailed,
            message,
            detail: 0,
        }
    }
}

impl From<&str> for NotReady {
    fn from(message: &str) -> Self {
        message.to_owned().into()
    }
}

/// What one run produced before it is written to the reply.
struct Ran {
    outcome: Outcome,
    bytes: Vec<u8>,
    /// Output bytes already in the slot's output area (a successful run
    /// writes there directly: no copy through `bytes`, no allocation).
    written: usize,
    detail: u64,
    entered_ns: u64,
    returned_ns: u64,
}

impl Ran {
    fn fail(outcome: Outcome, message: String, detail: u64) -> Self {
        Self {
            outcome,
            bytes: message.into_bytes(),
            written: 0,
            detail,
            entered_ns: 0,
            returned_ns: 0,
        }
    }
}

/// Takes an inherited fd, if it is open.
fn inherited(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: F_GETFD only inspects the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the dispatcher hands this process `fd` for it to own; checked open.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs a worker until its parent dies. Called by the `microfaas-worker`
/// binary with its arguments; the shared region must be at fd 3 and the
/// catalog socket at fd 4.
pub fn run(args: Vec<String>) -> Result<(), WorkerError> {
    let args = WorkerArgs::parse(args)?;
    let layout = Layout::new(args.depth, args.input_limit, args.output_limit)?;
    let shm = inherited(SHM_FD).ok_or(WorkerError::MissingFd(SHM_FD))?;
    let socket = inherited(WORKER_SOCKET_FD).ok_or(WorkerError::MissingFd(WORKER_SOCKET_FD))?;
    // Maps the region and closes its fd.
    let region = Region::open_fd(shm, layout).map_err(WorkerError::Map)?;
    if let Some(cpu) = args.cpu {
        pin_to(cpu);
    }
    signals::install(args.preemption).map_err(WorkerError::Signals)?;
    if let Preemption::Periodic { quantum } = args.preemption {
        signals::start_timer(quantum).map_err(WorkerError::Signals)?;
    }
    let spec = SandboxSpec::parse(&args.sandbox)?;
    // Keys are allocated before the sandbox (which has no pkey_alloc).
    let (keys, pkeys_state) = set_up_keys(spec.settings.layers.pkeys);
    // The image arena too (the sandbox has no memfd_create).
    let prelinked = ColdImages::new(args.cold_start);
    let mut worker = Worker {
        region,
        socket,
        output_limit: args.output_limit,
        config: InstanceConfig {
            heap_limit_bytes: args.heap_limit,
            stack_bytes: args.stack_bytes,
        },
        init_budget_ns: u64::try_from(args.init_budget.as_nanos()).unwrap_or(u64::MAX),
        functions: IdMap::default(),
        images: IdMap::default(),
        resident: IdMap::default(),
        pending: IdMap::default(),
        stale: Vec::new(),
        retired: Vec::new(),
        prelinked,
        cold_shell: None,
        gate_without_keys: keys.is_none()
            && matches!(pkeys_state, PkeysState::Unavailable { .. })
            && pkeys::claim_gate_for_this_thread().is_ok(),
        keys,
    };
    if worker.gate_without_keys {
        pkeys::use_key_safe_imports();
    }
    {
        let header = worker.region.header();
        header.worker.pkeys_state.store(pkeys_state.code(), Ordering::Relaxed);
        let n = match pkeys_state {
            PkeysState::Enabled { keys } => u32::try_from(keys).unwrap_or(0),
            _ => 0,
        };
        header.worker.pkeys_keys.store(n, Ordering::Relaxed);
    }
    // The sandbox is in place before any function is loaded or initialised
    // (after the worker's own set-up: its maps took their random keys).
    let pagemap = worker.prelinked.as_ref().and_then(|c| c.space.page_scan_fd());
    let policy = sandbox::worker::policy_with_pagemap(&spec, std::process::id(), worker.socket.as_raw_fd(), pagemap)
        .map_err(SandboxError::from)?;
    sandbox::apply(&policy)?;
    // A function whose artifact or init fails now is simply not resident;
    // its next warm request reports `NotLoaded`. The end marker (or a
    // closed socket) ends the initial catalog.
    while let Some(Message::Function(entry, fd, module)) =
        catalog::recv(worker.socket.as_fd(), false).map_err(WorkerError::Catalog)?
    {
        let _ = worker.register(entry, fd, module);
    }
    let header = worker.region.header();
    header.worker.pid.store(std::process::id(), Ordering::Relaxed);
    header.worker.ready.store(1, Ordering::Release);
    worker.serve(args.idle_spin);
    Ok(())
}

/// Allocates the worker's protection keys if `wanted` and the host has them.
fn set_up_keys(wanted: bool) -> (Option<KeyPool>, PkeysState) {
    if !wanted {
        return (None, PkeysState::Disabled);
    }
    if !pkeys::cpu_has_ospke() {
        return (
            None,
            PkeysState::Unavailable {
                reason: "no PKU/OSPKE on this CPU".to_owned(),
            },
        );
    }
    // The claim takes one key for the runtime's read-only data; the
    // instances get the rest.
    if let Err(e) = pkeys::claim_for_this_thread() {
        return (None, PkeysState::Unavailable { reason: e.to_string() });
    }
    let keys = match pkeys::allocate_keys(pkeys::MAX_KEYS) {
        Ok(keys) if !keys.is_empty() => keys,
        Ok(_) => {
            return (
                None,
                PkeysState::Unavailable {
                    reason: "pkey_alloc gave no key".to_owned(),
                },
            );
        }
        Err(e) => {
            return (
                None,
                PkeysState::Unavailable {
                    reason: format!("pkey_alloc: {e}"),
                },
            );
        }
    };
    let n = keys.len();
    (Some(KeyPool::new(keys)), PkeysState::Enabled { keys: n })
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and
    // sched_setaffinity only access that local set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        // Best effort: pinning can fail in a restricted cpuset.
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

impl Worker {
    fn header(&self) -> &Header {
        self.region.header()
    }

    fn serve(&mut self, idle_spin: Duration) {
        let parent = ipc::spawn::ParentWatch::now();
        let idle_spin_ns = u64::try_from(idle_spin.as_nanos()).unwrap_or(u64::MAX);
        let mut idle_since = now_ns();
        let mut polls: u32 = 0;
        loop {
            if let Some((pos, request)) = self.region.requests().peek() {
                self.take(pos, request);
                idle_since = now_ns();
                continue;
            }
            polls = polls.wrapping_add(1);
            if !polls.is_multiple_of(64) || now_ns().saturating_sub(idle_since) < idle_spin_ns {
                std::hint::spin_loop();
                continue;
            }
            // Park: announce, re-check, sleep on the tail word.
            let header = self.header();
            let tail = self.region.requests().tail_word();
            header.worker.parked.store(1, Ordering::SeqCst);
            let seen = tail.load(Ordering::SeqCst);
            if self.region.requests().is_empty() {
                futex_wait(tail, seen, PARK_TIMEOUT_NS);
            }
            header.worker.parked.store(0, Ordering::Relaxed);
            if !parent.parent_alive() {
                return;
            }
            // `idle_since` stays: woken without work (a timeout, or a timer
            // tick in periodic mode), the worker parks again at once.
        }
    }

    /// Takes the request at `pos` off the ring, runs it and answers.
    fn take(&mut self, pos: u32, request: Request) {
        let inflight = &self.header().inflight;
        inflight.slot.store(request.slot, Ordering::Relaxed);
        inflight.func.store(request.func, Ordering::Relaxed);
        // Record before removing: a worker that dies now leaves the request
        // findable (the dispatcher then removes it from the ring itself).
        inflight.seq.store(request.seq, Ordering::Release);
        self.region.requests().advance(pos);

        let mut reply = self.execute(&request);
        reply.seq = request.seq;
        reply.slot = request.slot;
        let replies = self.region.replies();
        // Never full: at most `depth` requests are outstanding per worker.
        while let Err(back) = replies.try_push(reply) {
            reply = back;
            std::hint::spin_loop();
        }
        let header = self.header();
        header.inflight.seq.store(0, Ordering::Release);
        // Only this worker writes it: no locked read-modify-write.
        let completed = &header.worker.completed;
        completed.store(completed.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if header.reply_waiters.load(Ordering::Relaxed) > 0 {
            futex_wake_all(replies.tail_word());
        }
        self.close_retired();
    }

    fn execute(&mut self, request: &Request) -> Reply {
        let mut reply = Reply::default();
        let input = match self.input_of(request) {
            Some(input) => input,
            None => {
                return self.finish(
                    reply,
                    Ran::fail(Outcome::BadRequest, "request names a bad slot or length".into(), 0),
                    request.slot,
                );
            }
        };
        let ran = match request.op {
            op::INVOKE_WARM => self.invoke_warm(request, input),
            op::INVOKE_COLD => {
                let (ran, start_ns) = self.invoke_cold(request, input);
                reply.start_ns = start_ns;
                ran
            }
            op::LOAD => match self.load(request.func, request.reserved != LOAD_REGISTER_ONLY) {
                Ok(()) => Ran::fail(Outcome::Ok, String::new(), 0),
                Err(e) => Ran::fail(e.outcome, e.message, e.detail),
            },
            op::UNLOAD => {
                self.unload(request.func, request.reserved != 0);
                Ran::fail(Outcome::Ok, String::new(), 0)
            }
            other => Ran::fail(Outcome::BadRequest, format!("unknown operation {other}"), 0),
        };
        self.finish(reply, ran, request.slot)
    }

    /// The request's input bytes, in its slot's input area.
    fn input_of(&self, request: &Request) -> Option<&'static [u8]> {
        let len = usize::try_from(request.input_len).ok()?;
        if len > self.region.layout().input_area {
            return None;
        }
        let ptr = self.region.input_area(request.slot)?;
        // SAFETY: the slot's input area is `input_area` bytes inside the
        // mapping (checked above), which lives as long as the worker; the
        // dispatcher does not write it while the request is outstanding.
        Some(unsafe { std::slice::from_raw_parts(ptr, len) })
    }

    /// Writes `ran`'s bytes to the slot's output area and fills the reply.
    fn finish(&self, mut reply: Reply, mut ran: Ran, slot: u32) -> Reply {
        let area = self.out_area(slot).len;
        if ran.outcome == Outcome::Ok && ran.bytes.len() > area {
            ran.detail = u64::try_from(ran.bytes.len()).unwrap_or(u64::MAX);
            ran.outcome = Outcome::OutputTooLarge;
            ran.bytes.clear();
        }
        let n = ran.bytes.len().min(area);
        if ran.written > 0 {
            // `run_handle` put it in place (within `area`).
            reply.out_len = u64::try_from(ran.written.min(area)).unwrap_or(0);
        } else if let (Some(out), true) = (self.region.output_area(slot), n > 0) {
            // SAFETY: `n` <= the slot's output area inside the mapping; the
            // dispatcher reads it only after this reply is published.
            unsafe { std::ptr::copy_nonoverlapping(ran.bytes.as_ptr(), out, n) };
        }
        reply.outcome = ran.outcome as u32;
        if ran.written == 0 {
            reply.out_len = u64::try_from(n).unwrap_or(0);
        }
        reply.detail = ran.detail;
        reply.entered_ns = ran.entered_ns;
        reply.returned_ns = ran.returned_ns;
        reply
    }

    /// Slot `slot`'s output area, as much of it as the output limit allows
    /// (empty for a bad slot).
    fn out_area(&self, slot: u32) -> OutArea {
        match self.region.output_area(slot) {
            Some(ptr) => OutArea {
                ptr,
                len: self.region.layout().output_area.min(self.output_limit),
            },
            None => OutArea {
                ptr: std::ptr::null_mut(),
                len: 0,
            },
        }
    }

    fn invoke_warm(&mut self, request: &Request, input: &[u8]) -> Ran {
        let out = self.out_area(request.slot);
        let Some(image) = self.functions.get(&request.func).map(|f| f.image) else {
            return Ran::fail(Outcome::NotLoaded, "function not registered".into(), 0);
        };
        if !self.stale.is_empty() && self.stale.contains(&image) {
            self.reload(image);
        }
        let Some(instance) = self.resident.get_mut(&image) else {
            return Ran::fail(Outcome::NotLoaded, "function not resident".into(), 0);
        };
        let ran = run_handle(instance, input, request.budget_ns, self.region.header(), out);
        if needs_reload(ran.outcome) && !self.stale.contains(&image) {
            self.stale.push(image);
        }
        ran
    }

    /// Maps a fresh private copy, init, handle, unmap. Returns the run and
    /// the start time (map + relocate + init) in nanoseconds.
    fn invoke_cold(&mut self, request: &Request, input: &[u8]) -> (Ran, u64) {
        let t0 = now_ns();
        let out = self.out_area(request.slot);
        let Some(image) = self.functions.get(&request.func).map(|f| f.image) else {
            return (Ran::fail(Outcome::NotLoaded, "function not registered".into(), 0), 0);
        };
        if let Some(done) = self.invoke_prelinked(image, request, input, t0) {
            return done;
        }
        let shell = self.cold_shell.take();
        let mut instance = match self.instantiate(image, shell) {
            Ok(instance) => instance,
            Err(e) => return (Ran::fail(e.outcome, e.message, e.detail), 0),
        };
        let start_ns = now_ns().saturating_sub(t0);
        let ran = run_handle(&mut instance, input, request.budget_ns, self.region.header(), out);
        self.retired.push(instance);
        (ran, start_ns)
    }

    /// A cold start from `image`'s pre-linked image: mapped copy-on-write
    /// into its range, from its post-init snapshot if it has one (no
    /// `init`), else `init` (and, the first time, the snapshot is taken).
    /// `None` if the image has no pre-linked form (then the loader's path
    /// runs).
    fn invoke_prelinked(&mut self, image: u64, request: &Request, input: &[u8], t0: u64) -> Option<(Ran, u64)> {
        let out = self.out_area(request.slot);
        if !self.prelinked.as_ref()?.images.contains_key(&image) {
            return None;
        }
        let mut shell = match self.cold_shell.take() {
            Some(shell) => shell,
            None => match self.new_shell() {
                Ok(shell) => shell,
                Err(e) => return Some((Ran::fail(e.outcome, e.message, e.detail), 0)),
            },
        };
        let header = self.region.header();
        let init_budget_ns = self.init_budget_ns;
        let c = self.prelinked.as_mut()?;
        let (Some(pre), Some(artifact)) = (c.images.get_mut(&image), self.images.get(&image)) else {
            self.cold_shell = Some(shell);
            return None;
        };
        let from = if c.snapshots && pre.can_start_from_snapshot(&mut shell) {
            StartFrom::Snapshot
        } else {
            StartFrom::Pristine
        };
        let function = match c.space.enter(pre, artifact, &c.arena, &shell, from) {
            Ok(function) => {
                c.last = Some(image);
                function
            }
            Err(e) => {
                self.cold_shell = Some(shell);
                return Some((Ran::fail(Outcome::InitFailed, error_chain(&e), 0), 0));
            }
        };
        let instance = match (from, pre.snapshot_state()) {
            (StartFrom::Snapshot, Some(state)) => {
                // SAFETY: the range now holds the snapshot's writable pages
                // and the shell's persistent arena its heap (`enter` with
                // `StartFrom::Snapshot`), taken in this shell
                // (`can_start_from_snapshot`) right after init.
                let made = unsafe { Instance::from_shell_initialised(function, shell, state) };
                match made {
                    Ok(Ok(instance)) => Ok(instance),
                    Ok(Err(shell)) => {
                        self.cold_shell = Some(shell);
                        return Some((Ran::fail(Outcome::InitFailed, "snapshot of another heap".into(), 0), 0));
                    }
                    Err(e) => Err(NotReady::from(error_chain(&e))),
                }
            }
            _ => match Instance::from_shell(function, shell) {
                Ok(mut instance) => {
                    let result = with_deadline(header, init_budget_ns, || instance.init());
                    match result {
                        Ok(()) => {
                            if c.snapshots
                                && let Err(e) = pre.capture(&mut instance, &mut c.arena)
                            {
                                eprintln!("microfaas-worker: no post-init snapshot: {}", error_chain(&e));
                            }
                            Ok(instance)
                        }
                        Err(failure) => {
                            // Its memory goes back to the cold shell.
                            self.retired.push(instance);
                            Err(init_not_ready(failure, init_budget_ns))
                        }
                    }
                }
                Err(e) => Err(NotReady::from(error_chain(&e))),
            },
        };
        let mut instance = match instance {
            Ok(instance) => instance,
            Err(e) => return Some((Ran::fail(e.outcome, e.message, e.detail), 0)),
        };
        let start_ns = now_ns().saturating_sub(t0);
        let ran = run_handle(&mut instance, input, request.budget_ns, self.region.header(), out);
        self.retired.push(instance);
        Some((ran, start_ns))
    }

    /// Memory for cold instances, of the kind the worker's instances are.
    fn new_shell(&mut self) -> Result<InstanceShell, NotReady> {
        match self.keys.as_mut().and_then(KeyPool::acquire) {
            Some(key) => InstanceShell::new_keyed(&self.config, key).map_err(|e| {
                self.release_key(Some(key));
                NotReady::from(error_chain(&e))
            }),
            None if self.gate_without_keys => {
                InstanceShell::new_gated_without_keys(&self.config).map_err(|e| error_chain(&e).into())
            }
            None => InstanceShell::new(&self.config).map_err(|e| error_chain(&e).into()),
        }
    }

    /// Maps a fresh copy of `image` (reusing `shell`'s memory if given) and
    /// runs its init under the init budget.
    /// With keys, a new instance takes the least shared key (a recycled
    /// shell keeps its own); a failed one gives it back.
    fn instantiate(&mut self, image: u64, shell: Option<InstanceShell>) -> Result<Instance, NotReady> {
        let shell_key = shell.as_ref().and_then(InstanceShell::key);
        let result = self.instantiate_keyed(image, shell);
        if result.is_err() {
            self.release_key(shell_key);
        }
        result
    }

    fn release_key(&mut self, key: Option<u32>) {
        if let (Some(pool), Some(key)) = (self.keys.as_mut(), key) {
            pool.release(key);
        }
    }

    fn instantiate_keyed(&mut self, image: u64, shell: Option<InstanceShell>) -> Result<Instance, NotReady> {
        let artifact = self.images.get(&image).ok_or("artifact not delivered")?;
        let function = LoadedFunction::load(artifact).map_err(|e| error_chain(&e))?;
        let mut instance = match shell {
            Some(shell) => Instance::from_shell(function, shell).map_err(|e| error_chain(&e))?,
            None => match self.keys.as_mut().and_then(KeyPool::acquire) {
                Some(key) => match Instance::new_keyed(function, &self.config, key) {
                    Ok(instance) => instance,
                    Err(e) => {
                        self.release_key(Some(key));
                        return Err(error_chain(&e).into());
                    }
                },
                None if self.gate_without_keys => {
                    Instance::new_gated_without_keys(function, &self.config).map_err(|e| error_chain(&e))?
                }
                None => Instance::new(function, &self.config).map_err(|e| error_chain(&e))?,
            },
        };
        let header = self.region.header();
        let result = with_deadline(header, self.init_budget_ns, || instance.init());
        if result.is_err() {
            self.release_key(instance.key());
        }
        match result {
            Ok(()) => Ok(instance),
            Err(failure) => Err(init_not_ready(failure, self.init_budget_ns)),
        }
    }

    /// A `LOAD` request: registers `func` from its catalog message (sent on
    /// the socket before the request) and makes it resident. A function
    /// already registered (e.g. from this worker's initial catalog) needs no
    /// message.
    fn load(&mut self, func: u32, resident: bool) -> Result<(), NotReady> {
        loop {
            match catalog::recv(self.socket.as_fd(), true) {
                Ok(Some(Message::Function(entry, fd, module))) => {
                    self.pending.insert(entry.func, (entry, fd, module));
                }
                Ok(Some(Message::End)) => {}
                Ok(None) => break,
                Err(e) => return Err(format!("reading the catalog socket: {e}").into()),
            }
        }
        match self.pending.remove(&func) {
            Some((entry, fd, module)) => self.register(
                CatalogEntry {
                    preload: resident,
                    ..entry
                },
                fd,
                module,
            ),
            None => match self.functions.get(&func).map(|f| f.image) {
                // The image is held already (its module with it).
                Some(image) => self.register(
                    CatalogEntry {
                        func,
                        image,
                        preload: resident,
                        module: false,
                    },
                    None,
                    None,
                ),
                None => Err("no catalog message for the function".into()),
            },
        }
    }

    /// Registers a function (its artifact memfd `fd` is parsed unless the
    /// image is known already) and, if asked, makes it resident.
    fn register(&mut self, entry: CatalogEntry, fd: Option<OwnedFd>, module: Option<OwnedFd>) -> Result<(), NotReady> {
        let image = entry.image;
        if let std::collections::hash_map::Entry::Vacant(slot) = self.images.entry(image) {
            let fd = fd.ok_or("catalog message without an artifact fd")?;
            let module = match (entry.module, module) {
                (false, _) => None,
                (true, Some(module)) => Some(module),
                (true, None) => return Err("catalog message without its module fd".into()),
            };
            let artifact = SealedArtifact::from_fd(fd)
                .and_then(ArtifactImage::parse)
                .and_then(|image| match module {
                    Some(module) => image.with_module(SealedArtifact::from_fd(module)?),
                    None => Ok(image),
                })
                .map_err(|e| error_chain(&e))?;
            // Pre-linked once, at deploy; without it (a failure is only
            // reported) its cold starts take the loader's path.
            if let Some(c) = self.prelinked.as_mut() {
                match PrelinkedImage::build(&artifact, &mut c.space, &mut c.arena) {
                    Ok(pre) => {
                        if let Some(old) = c.images.insert(image, pre) {
                            old.release(&mut c.arena, &mut c.space);
                        }
                    }
                    Err(e) => eprintln!("microfaas-worker: image {image} not pre-linked: {}", error_chain(&e)),
                }
            }
            slot.insert(artifact);
        }
        if self.functions.get(&entry.func).is_some_and(|f| f.image != image) {
            // The index now names another artifact: drop the old one first.
            self.unload(entry.func, true);
        }
        let was_loaded = self.functions.get(&entry.func).is_some_and(|f| f.loaded);
        self.functions.insert(
            entry.func,
            Registered {
                image,
                loaded: was_loaded || entry.preload,
            },
        );
        if !entry.preload || self.resident.contains_key(&image) {
            return Ok(());
        }
        match self.instantiate(image, None) {
            Ok(instance) => {
                self.resident.insert(image, instance);
                Ok(())
            }
            Err(message) => {
                if let Some(f) = self.functions.get_mut(&entry.func) {
                    f.loaded = was_loaded;
                }
                Err(message)
            }
        }
    }

    /// Evicts a function (its image stays resident while other functions
    /// use it); `forget` also drops its registration.
    fn unload(&mut self, func: u32, forget: bool) {
        if forget {
            // A message whose LOAD never came (the deploy failed elsewhere).
            self.pending.remove(&func);
        }
        let Some(f) = self.functions.get_mut(&func) else {
            return;
        };
        let image = f.image;
        f.loaded = false;
        if forget {
            self.functions.remove(&func);
        }
        if !self.functions.values().any(|f| f.loaded && f.image == image) {
            if let Some(instance) = self.resident.remove(&image) {
                self.release_key(instance.key());
            }
            self.stale.retain(|&i| i != image);
        }
        if !self.functions.values().any(|f| f.image == image) {
            // Nobody can start it any more: close its memfd.
            self.images.remove(&image);
            if let Some(c) = self.prelinked.as_mut()
                && let Some(pre) = c.images.remove(&image)
            {
                pre.release(&mut c.arena, &mut c.space);
            }
        }
    }

    /// Closes retired cold instances (off the reply's critical path).
    fn close_retired(&mut self) {
        while let Some(instance) = self.retired.pop() {
            // A snapshot's heap is dropped by `leave` (its written pages only).
            let spared = self.prelinked.as_ref().map_or(0, |c| c.space.snapshot_heap_bytes());
            let shell = instance.into_shell_sparing(spared);
            // Whatever path the instance took, the image space's pages and the
            // shell's snapshot heap read as their image's again.
            if let Some(c) = self.prelinked.as_mut()
                && let Err(e) = c.space.leave(&shell, c.last.take().and_then(|i| c.images.get(&i)))
            {
                eprintln!("microfaas-worker: dropping a cold instance's pages: {e}");
            }
            if let Some(old) = self.cold_shell.replace(shell) {
                self.release_key(old.key());
            }
        }
    }

    /// Replaces an instance a failure may have left torn with a fresh copy
    /// (done lazily, at the function's next warm request, so that other
    /// functions do not pay for it).
    fn reload(&mut self, image: u64) {
        self.stale.retain(|&i| i != image);
        let Some(old) = self.resident.remove(&image) else {
            return;
        };
        // Unmap the old copy first, but keep its memory for the new one.
        let shell = old.into_shell();
        if let Ok(instance) = self.instantiate(image, Some(shell)) {
            self.resident.insert(image, instance);
        }
    }
}

/// What a failed `init()` makes of a function's start.
fn init_not_ready(failure: Failure, init_budget_ns: u64) -> NotReady {
    match failure {
        Failure::Preempted => match signals::take_policy_violation() {
            // The sandbox was in place before init() ran.
            Some(nr) => NotReady {
                outcome: Outcome::PolicyViolation,
                message: format!("init() made the forbidden system call {nr}"),
                detail: nr,
            },
            None => format!("init() exceeded its budget of {} us", init_budget_ns / 1000).into(),
        },
        Failure::FunctionError { message } => format!("init() returned an error: {message}").into(),
        failure @ Failure::KeyViolation { addr, .. } => NotReady {
            outcome: Outcome::PolicyViolation,
            message: format!("init(): {failure}"),
            detail: u64::try_from(addr).unwrap_or(0),
        },
        failure => failure.to_string().into(),
    }
}

/// Whether an outcome may have left the function's own state torn, so that
/// its instance is replaced before the next request.
fn needs_reload(outcome: Outcome) -> bool {
    !matches!(
        outcome,
        Outcome::Ok | Outcome::FunctionError | Outcome::OutputTooLarge | Outcome::NotLoaded
    )
}

/// Runs `f` with the invocation deadline `budget_ns` from now published to the
/// signal handler and the watchdog.
fn with_deadline<T>(header: &Header, budget_ns: u64, f: impl FnOnce() -> T) -> T {
    let deadline = now_ns().saturating_add(budget_ns).max(1);
    signals::arm(deadline);
    header.inflight.deadline_ns.store(deadline, Ordering::Release);
    let result = f();
    header.inflight.deadline_ns.store(0, Ordering::Release);
    signals::disarm();
    result
}

/// Where a run's output goes: a slot's output area (`len` bytes at `ptr`,
/// inside the shared region; the dispatcher reads it only after the reply
/// is published).
#[derive(Clone, Copy)]
struct OutArea {
    ptr: *mut u8,
    len: usize,
}

fn run_handle(instance: &mut Instance, input: &[u8], budget_ns: u64, header: &Header, out: OutArea) -> Ran {
    let result = with_deadline(header, budget_ns, || match instance.handle(input) {
        Ok(output) => {
            let bytes = output.bytes();
            if bytes.len() > out.len {
                return Ok((Err(bytes.len()), output.entered_ns, output.returned_ns));
            }
            if !bytes.is_empty() {
                // SAFETY: `out` is a live output area of `out.len` bytes
                // (checked above), not the instance's memory the bytes are in.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.ptr, bytes.len()) };
            }
            Ok((Ok(bytes.len()), output.entered_ns, output.returned_ns))
        }
        Err(failure) => Err(failure),
    });
    match result {
        Ok((Ok(written), entered_ns, returned_ns)) => Ran {
            outcome: Outcome::Ok,
            bytes: Vec::new(),
            written,
            detail: 0,
            entered_ns,
            returned_ns,
        },
        Ok((Err(len), entered_ns, returned_ns)) => Ran {
            outcome: Outcome::OutputTooLarge,
            bytes: Vec::new(),
            written: 0,
            detail: u64::try_from(len).unwrap_or(u64::MAX),
            entered_ns,
            returned_ns,
        },
        Err(failure) => {
            let ran = ran_of_failure(failure, instance.stack_bytes());
            if ran.outcome == Outcome::Preempted {
                header.worker.preemptions.fetch_add(1, Ordering::Relaxed);
            }
            ran
        }
    }
}

fn ran_of_failure(failure: Failure, stack_bytes: usize) -> Ran {
    let stack = u64::try_from(stack_bytes).unwrap_or(u64::MAX);
    match failure {
        Failure::FunctionError { message } => Ran::fail(Outcome::FunctionError, message, 0),
        Failure::Panicked { message } => Ran::fail(Outcome::Panicked, message, 0),
        Failure::OutOfMemory { message, limit_bytes } => {
            Ran::fail(Outcome::OutOfMemory, message, u64::try_from(limit_bytes).unwrap_or(0))
        }
        Failure::StackOverflow { .. } => Ran::fail(Outcome::StackOverflow, String::new(), stack),
        Failure::Preempted => match signals::take_policy_violation() {
            Some(nr) => Ran::fail(Outcome::PolicyViolation, format!("system call {nr}"), nr),
            None => Ran::fail(Outcome::Preempted, String::new(), 0),
        },
        // A typed policy violation, like a forbidden system call: reaching
        // outside its own key is an attack, not a crash of its own.
        failure @ Failure::KeyViolation { addr, .. } => Ran::fail(
            Outcome::PolicyViolation,
            failure.to_string(),
            u64::try_from(addr).unwrap_or(0),
        ),
        other @ (Failure::Fault { .. } | Failure::BadAbi | Failure::Malformed { .. } | Failure::Poisoned) => {
            Ran::fail(Outcome::Crashed, other.to_string(), 0)
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

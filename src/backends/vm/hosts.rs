//! The `vm` backend's VMM host processes (`microfaas-vmhost`): instances
//! that serve requests (function and argument restores, prestarts, the hot
//! pool) run in them, so that no address space carries more than a bounded
//! number of KVM MMU notifiers and no process more fds than its limit.
//!
//! Placement: host processes per tenant (a VM escape reaches one tenant's
//! instances at most, the rule the language workers follow); a function's
//! instances packed into the fewest processes (its node image registered,
//! and its page cache mapped, once per process): a process where the node
//! is registered and there is room, else any with room, else a new one;
//! at most `vms_per_host` VMs each (a slab of that many slots).
//!
//! Teardown: dropping an instance costs its caller nothing: its slot is
//! queued on its host, and the backend's dropper thread asks the host to
//! drop those VMs (one request each) while the host still serves other
//! instances. A host left with no instance is not asked at all: once it
//! has been empty for `vm.host_idle_exit_ms` it is killed, and its VMs go
//! with it at once (the kernel tears them down in the dying process, in
//! parallel over dying processes); so is one whose backend is dropped.
//! That is what makes evicting 50,000 instances fast, and what shrinks
//! the set of host processes when load goes down.
//!
//! A host process that dies (its pidfd, `ipc`'s death watcher): every
//! caller waiting on one of its slots is woken and fails once
//! (`RunError::Lost` -> `Error::WorkerLost`); its idle instances report
//! not alive and are dropped; the next restore spawns a new process, and
//! the functions serve again from their nodes.
//!
//! Trust: a host process may be controlled by a guest that escaped its VM.
//! Its replies are decoded by `vmhost::protocol` and only the TSC offset is
//! taken from a restore reply (the sequence number and checkpoint state
//! are the node's, known here); a slot is reused only after the process
//! confirmed its VM is gone (or the process is dead). A process that
//! breaks the protocol is *condemned*: killed at once, its waiting callers
//! fail once (`WorkerLost`), and it is never used again (the next restore
//! spawns a fresh one). Breaking the protocol is: no reply within
//! `reply_timeout`, a closed socket, bytes that are no reply, a reply to
//! another request (each request carries an id the reply must echo: a
//! late, doubled or unsolicited reply is caught), a reply of the wrong
//! kind, a run ring it stops draining, and a report word in a slot's
//! control block that no runner writes. A process that refuses a restore
//! (`Reply::Error`) is retired instead: no new instance is placed there,
//! its instances serve on. Its claim that KVM refused a node's state
//! (`Reply::StateRefused`) is believed only if no guest has run in it yet
//! (see `Shared::restore`).

use super::super::vm_snapshots::Restorable;
use crate::Error;
use ipc::futex;
use ipc::region::SharedRegion;
use ipc::spawn::Child;
use ipc::watch::DeathWatch;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmhost::protocol::{Reply, Request};
use vmhost::{HostArgs, RunEntry, RunRing};
use vmm::slab::{Slab, SlabSlot};
use vmm::{Instance, InstanceConfig, RemoteStart};

/// How long a host's runner polls its run ring after a request, by
/// default (`vm.host_poll_us`). With it and the caller's poll below,
/// table1's hot row (one caller pinned to core 0, 100 functions) went from
/// 72 us dispatch / 101 us end to end to 33-35 / 34-39 us, its reset row
/// from 120 to 54-64 us end to end, throughput unchanged (16-18 K/s with a
/// caller per core): every cross-core wake of a sleeping thread (the
/// request's two, the reply's one) costs tens of microseconds on this
/// nested host. `examples/vm_shard_bench.rs` has the knobs.
pub(crate) const DEFAULT_HOST_POLL_US: u32 = 100;

/// How long a lone caller polls for the reply of an instance in a host
/// process before it sleeps, by default (`vm.caller_spin_us`; only while
/// it is the backend's one invocation running, see
/// `VmBackend::reply_spin`).
pub(crate) const DEFAULT_CALLER_SPIN_US: u32 = 100;

/// How long a host process may hold no instance before it exits, by
/// default (`vm.host_idle_exit_ms`).
pub(crate) const DEFAULT_IDLE_EXIT: Duration = Duration::from_millis(1000);

/// How long a host process may take to answer a control request, by
/// default (`vm.host_reply_timeout_ms`).
pub(crate) const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// One VMM host process.
#[derive(Debug)]
pub(crate) struct Host {
    tenant: String,
    pid: u32,
    child: Mutex<Option<Child>>,
    control: Mutex<OwnedFd>,
    slab: Arc<Slab>,
    ring: RunRing,
    /// Serialises the callers' pushes (the ring has one producer).
    ring_lock: Mutex<()>,
    dead: AtomicBool,
    /// Refused a restore: no new instance is placed here.
    retired: AtomicBool,
    /// A restore succeeded here, so guest code may have run in this
    /// process (and, after an escape, may speak for it): its refusal of a
    /// node's state is not believed (see `Shared::restore`).
    guests_ran: AtomicBool,
    /// Why it was condemned (the first reason).
    condemned: Mutex<Option<String>>,
    /// The last control request's id.
    last_id: AtomicU32,
    /// How long a reply (or a full ring's drain) may take.
    reply_timeout: Duration,
    registered: Mutex<HashSet<u64>>,
    /// Slots in use, for waking their callers if the process dies.
    live: Mutex<HashMap<u32, Arc<SlabSlot>>>,
    /// Slots in use (instances, and dropped ones not yet confirmed gone).
    vms: AtomicUsize,
    /// Instances the backend holds here (placed and not dropped).
    instances: AtomicUsize,
    /// Dropped instances whose VMs the host has not dropped yet.
    pending: Mutex<Vec<(u32, Arc<SlabSlot>)>>,
    /// Since when it holds no instance.
    empty_since: Mutex<Option<std::time::Instant>>,
    /// Wakes the dropper thread.
    dropper: Arc<Signal>,
}

/// A wake-up flag for the dropper thread.
#[derive(Debug, Default)]
struct Signal {
    raised: Mutex<bool>,
    cond: std::sync::Condvar,
}

impl Signal {
    fn raise(&self) {
        if let Ok(mut r) = self.raised.lock() {
            *r = true;
        }
        self.cond.notify_one();
    }

    /// Waits until raised or `timeout`.
    fn wait(&self, timeout: Duration) {
        if let Ok(r) = self.raised.lock()
            && let Ok((mut r, _)) = self.cond.wait_timeout_while(r, timeout, |r| !*r)
        {
            *r = false;
        }
    }
}

impl Host {
    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// VMs in it.
    pub(crate) fn vms(&self) -> usize {
        self.vms.load(Ordering::Relaxed)
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// One control request and its reply. Any failure condemns the
    /// process ([`Host::condemn`]): an exchange out of step is never
    /// trusted to get back in step.
    fn call(&self, request: &Request, fd: Option<std::os::fd::BorrowedFd<'_>>) -> Result<Reply, CallError> {
        if self.is_dead() {
            return Err(CallError::gone(format!(
                "the host process is gone ({})",
                self.why_gone()
            )));
        }
        let result = {
            let control = self
                .control
                .lock()
                .map_err(|_| CallError::failed("poisoned".to_owned()))?;
            let id = self.last_id.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            exchange(control.as_fd(), id, request, fd)
        };
        result.map_err(|mut e| {
            let why = self.why_gone();
            self.condemn(&e.message);
            e.message = format!("{} ({why})", e.message);
            e
        })
    }

    /// Why the process stopped answering, in words: why it was condemned,
    /// else how it ended (reaped here if it has), else that it still runs.
    fn why_gone(&self) -> String {
        if let Some(why) = self.condemned.lock().ok().and_then(|c| c.clone()) {
            return format!("condemned: {why}");
        }
        let Ok(mut child) = self.child.lock() else {
            return "unknown".into();
        };
        match child.as_mut().map(Child::try_reap) {
            Some(Ok(Some(status))) => ipc::spawn::describe_status("the host process", Some(status)),
            Some(Ok(None)) => "the host process still runs".into(),
            Some(Err(e)) => format!("the host process: {e}"),
            None => "the host process was reaped".into(),
        }
    }

    /// The process broke the protocol: kill it, fail its waiting callers
    /// once, and never use it again.
    fn condemn(&self, why: &str) {
        if let Ok(mut c) = self.condemned.lock()
            && c.is_none()
        {
            *c = Some(why.to_owned());
        }
        self.kill();
        self.lost();
    }

    /// A control request got `reply` instead of its success: a refusal
    /// retires the process, any other reply (of the wrong kind) condemns it.
    fn refused(&self, reply: &Reply) {
        match reply {
            Reply::Error(_) | Reply::StateRefused(_) => self.retired.store(true, Ordering::Relaxed),
            other => self.condemn(&format!("a reply of the wrong kind: {other:?}")),
        }
    }

    /// Marks the process dead and wakes every caller waiting on it.
    fn lost(&self) {
        self.dead.store(true, Ordering::SeqCst);
        if let Ok(live) = self.live.lock() {
            for chan in live.values() {
                vmm::report::report_lost(chan.control());
            }
        }
    }

    /// Kills the process (for tests and teardown).
    pub(crate) fn kill(&self) {
        if let Ok(Some(child)) = self.child.lock().as_deref() {
            let _ = child.signal(libc::SIGKILL);
        }
    }
}

/// A control request that got no reply.
#[derive(Debug)]
struct CallError {
    /// What went wrong, and why the process stopped answering.
    message: String,
    /// The process was gone (dead or condemned already, or its socket
    /// closed before or while it was asked), as opposed to answering
    /// wrongly or late: the request may be asked of another process.
    gone: bool,
}

impl CallError {
    /// The process answered wrongly or late (or not at all, in time).
    fn failed(message: String) -> Self {
        Self { message, gone: false }
    }

    /// The process was gone.
    fn gone(message: String) -> Self {
        Self { message, gone: true }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Sends `request` as request `id` and takes its reply, which must echo
/// `id` (pure protocol checks; the socket has a receive timeout). An
/// error says what failed and whether the process was gone (its socket
/// closed).
fn exchange(
    control: std::os::fd::BorrowedFd<'_>,
    id: u32,
    request: &Request,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<Reply, CallError> {
    use vmhost::protocol::{FRAME_HEADER, MAX_MESSAGE, frame, unframe};
    vmhost::host::send_with(control, &frame(id, &request.encode()), fd).map_err(|e| {
        let message = format!("sending: {e}");
        if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) {
            CallError::gone(message)
        } else {
            CallError::failed(message)
        }
    })?;
    let mut buf = vec![0u8; MAX_MESSAGE + FRAME_HEADER + 1];
    let len = match vmhost::host::receive(control, &mut buf) {
        // A passed fd (the protocol has none in replies) closes here.
        Ok(Some((len, _fd))) => len,
        Ok(None) => return Err(CallError::gone("the host process closed its socket".into())),
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => return Err(CallError::gone(format!("receiving: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            return Err(CallError::failed("no reply in time".into()));
        }
        Err(e) => return Err(CallError::failed(format!("receiving: {e}"))),
    };
    let bad = |e: &dyn std::fmt::Display| CallError::failed(format!("bad reply: {e}"));
    let (got, message) = unframe(&buf[..len]).map_err(|e| bad(&e))?;
    if got != id {
        return Err(CallError::failed(format!(
            "a reply to request {got} when {id} was asked"
        )));
    }
    Reply::decode(message).map_err(|e| bad(&e))
}

impl Drop for Host {
    fn drop(&mut self) {
        // Closing the socket ends the process; reap it.
        if let Ok(mut c) = self.child.lock()
            && let Some(mut child) = c.take()
        {
            let _ = child.kill_and_reap();
        }
    }
}

/// The caller's handle on an instance in a host process.
#[derive(Debug)]
struct RemoteVm {
    host: Arc<Host>,
    chan: Arc<SlabSlot>,
    slot: u32,
}

impl vmm::Remote for RemoteVm {
    fn chan(&self) -> &Arc<SlabSlot> {
        &self.chan
    }

    fn submit(&self, resume: bool) -> bool {
        let op = if resume { RunEntry::RESUME } else { RunEntry::RUN };
        self.push(RunEntry { slot: self.slot, op })
    }

    fn kick(&self) {
        self.push(RunEntry {
            slot: self.slot,
            op: RunEntry::STOP,
        });
    }

    fn alive(&self) -> bool {
        !self.host.is_dead()
    }

    fn submit_reset(&self) -> bool {
        self.push(RunEntry {
            slot: self.slot,
            op: RunEntry::RESET,
        })
    }
}

impl RemoteVm {
    /// Queues `entry` on the host's run ring and wakes its dispatcher;
    /// false if the host process is gone.
    fn push(&self, entry: RunEntry) -> bool {
        {
            let Ok(_one) = self.host.ring_lock.lock() else {
                return false;
            };
            let ring = self.host.ring.ring();
            let mut waited: Option<std::time::Instant> = None;
            while ring.try_push(entry).is_err() {
                if self.host.is_dead() {
                    return false;
                }
                // Full: the process is not draining its ring (4,096 runs
                // queued). It gets as long as a control reply.
                let since = *waited.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > self.host.reply_timeout {
                    self.host.condemn("its run ring stayed full");
                    return false;
                }
                std::thread::yield_now();
            }
        }
        // A runner polling the ring takes it; else wake the dispatcher (a
        // stop always: a kill must not wait for a poller).
        std::sync::atomic::fence(Ordering::SeqCst);
        if entry.op == RunEntry::STOP || self.host.ring.pollers().load(Ordering::SeqCst) == 0 {
            futex::wake(self.host.ring.ring().tail_word(), 1);
        }
        !self.host.is_dead()
    }
}

impl Drop for RemoteVm {
    fn drop(&mut self) {
        if let Ok(mut live) = self.host.live.lock() {
            live.remove(&self.slot);
        }
        // A report no runner writes: the process forged it.
        if !self.host.is_dead() && vmm::report::forged(self.chan.control()) {
            self.host.condemn(&format!(
                "a forged report in slot {} ({})",
                self.slot,
                vmm::report::describe(self.chan.control())
            ));
        }
        // The dropper thread drops the VM (or the whole process, once it
        // holds no instance); the slot is reused only after that.
        if let Ok(mut p) = self.host.pending.lock() {
            p.push((self.slot, Arc::clone(&self.chan)));
        }
        self.host.released();
        self.host.dropper.raise();
    }
}

impl Host {
    /// One instance fewer (dropped, or its restore undone).
    fn released(&self) {
        if self.instances.fetch_sub(1, Ordering::SeqCst) == 1
            && let Ok(mut e) = self.empty_since.lock()
        {
            *e = Some(std::time::Instant::now());
        }
    }

    /// Asks the process to drop the VMs of dropped instances (it holds
    /// others still); a slot is free once its VM is confirmed gone.
    fn drop_pending(&self) {
        loop {
            let next = self.pending.lock().ok().and_then(|mut p| p.pop());
            let Some((slot, chan)) = next else {
                return;
            };
            if self.is_dead() {
                // Gone with the process (the slab with it).
                self.vms.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            match self.call(&Request::Drop { slot }, None) {
                Ok(Reply::Ok) => {
                    drop(chan);
                    self.vms.fetch_sub(1, Ordering::Relaxed);
                }
                // Not confirmed gone: the slot is never reused (the
                // process is misbehaving; it is condemned).
                other => {
                    std::mem::forget(chan);
                    self.condemn(&format!("dropping slot {slot}: {other:?}"));
                }
            }
        }
    }
}

/// Settings of the host processes.
#[derive(Debug, Clone)]
pub(crate) struct HostSettings {
    /// The host binary.
    pub(crate) binary: PathBuf,
    /// VMs per host process.
    pub(crate) vms_per_host: usize,
    /// Runner threads per host process.
    pub(crate) runners: usize,
    /// Sandbox settings (made per tenant).
    pub(crate) sandbox: lang_isolation::sandbox::SandboxSettings,
    /// How long a host process may hold no instance before it exits.
    pub(crate) idle_exit: Duration,
    /// VM shells each host process keeps made in advance.
    pub(crate) shells: usize,
    /// How long a host process may take to answer a control request.
    pub(crate) reply_timeout: Duration,
    /// How long a host's runner polls its run ring after a request, in
    /// microseconds.
    pub(crate) poll_us: u32,
}

/// All host processes of a backend.
#[derive(Debug)]
pub(crate) struct Hosts {
    shared: Arc<Shared>,
    dropper: Option<std::thread::JoinHandle<()>>,
}

/// What the backend and its dropper thread share.
#[derive(Debug)]
pub(crate) struct Shared {
    settings: HostSettings,
    config: InstanceConfig,
    watch: DeathWatch,
    hosts: Mutex<Vec<Arc<Host>>>,
    spawned: AtomicUsize,
    /// Host processes that exited empty.
    exited: AtomicUsize,
    signal: Arc<Signal>,
    stop: AtomicBool,
    /// The protocol's key of each node.
    keys: Mutex<HashMap<snapshots::NodeId, u64>>,
}

/// How one restore attempt in a host process ended, when it did not.
enum Attempt {
    /// The restore failed: the request fails with this.
    Failed(Error),
    /// A process that had run guests refused the node's state: retired,
    /// not believed; another process is tried.
    Disbelieved(String),
    /// The process placed on was gone when asked (killed, or condemned
    /// meanwhile for another instance): another is tried.
    HostGone(String),
}

impl From<Error> for Attempt {
    fn from(e: Error) -> Self {
        Attempt::Failed(e)
    }
}

fn io(context: &'static str, detail: impl std::fmt::Display) -> Error {
    Error::io(context, std::io::Error::other(detail.to_string()))
}

impl std::ops::Deref for Hosts {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.signal.raise();
        if let Some(t) = self.dropper.take() {
            let _ = t.join();
        }
        // Every host process goes now, with its VMs: killed first, all of
        // them, so that they tear down in parallel; reaped as they drop.
        let hosts = self
            .shared
            .hosts
            .lock()
            .map(|mut h| std::mem::take(&mut *h))
            .unwrap_or_default();
        for h in &hosts {
            h.kill();
        }
    }
}

impl Hosts {
    pub(crate) fn new(settings: HostSettings, config: InstanceConfig) -> Result<Self, Error> {
        let watch = DeathWatch::new("vm-host-watch").map_err(|e| Error::io("starting the vm host watcher", e))?;
        let shared = Arc::new(Shared {
            settings,
            config,
            watch,
            hosts: Mutex::new(Vec::new()),
            spawned: AtomicUsize::new(0),
            exited: AtomicUsize::new(0),
            signal: Arc::new(Signal::default()),
            stop: AtomicBool::new(false),
            keys: Mutex::new(HashMap::new()),
        });
        let s = Arc::clone(&shared);
        let dropper = std::thread::Builder::new()
            .name("vm-host-dropper".into())
            .spawn(move || s.drop_loop())
            .map_err(|e| Error::io("starting the vm host dropper", e))?;
        Ok(Self {
            shared,
            dropper: Some(dropper),
        })
    }
}

impl Shared {
    /// The dropper thread: drops the VMs of dropped instances in hosts that
    /// still serve, and ends hosts that have held no instance for
    /// `idle_exit` (or died).
    fn drop_loop(&self) {
        let tick = (self.settings.idle_exit / 4).clamp(Duration::from_millis(10), Duration::from_millis(500));
        while !self.stop.load(Ordering::SeqCst) {
            self.signal.wait(tick);
            let now = std::time::Instant::now();
            // Empty too long (decided under the lock `place` takes, so no
            // instance is being placed there).
            let ending: Vec<Arc<Host>> = match self.hosts.lock() {
                Ok(mut hosts) => {
                    let (end, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut *hosts).into_iter().partition(|h| {
                        h.is_dead()
                            || (h.instances.load(Ordering::SeqCst) == 0
                                && h.empty_since
                                    .lock()
                                    .ok()
                                    .and_then(|e| *e)
                                    .is_some_and(|t| now.duration_since(t) >= self.settings.idle_exit))
                    });
                    *hosts = keep;
                    end
                }
                Err(_) => Vec::new(),
            };
            for h in &ending {
                if !h.is_dead() {
                    self.exited.fetch_add(1, Ordering::Relaxed);
                }
                h.kill();
            }
            // Reaped (and their slabs freed) as they drop here.
            drop(ending);
            for h in self.list() {
                if h.instances.load(Ordering::SeqCst) > 0 || h.is_dead() {
                    h.drop_pending();
                }
            }
        }
    }

    /// The live host processes.
    pub(crate) fn list(&self) -> Vec<Arc<Host>> {
        self.hosts.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Host processes spawned so far (respawns included).
    pub(crate) fn spawned(&self) -> usize {
        self.spawned.load(Ordering::Relaxed)
    }

    /// Host processes that exited after holding no instance for the grace
    /// period.
    pub(crate) fn exited(&self) -> usize {
        self.exited.load(Ordering::Relaxed)
    }

    fn spawn(&self, tenant: &str) -> Result<Arc<Host>, Error> {
        let sandbox = self
            .settings
            .sandbox
            .for_tenant(tenant)
            .map_err(|e| io("a vm host process's sandbox", e))?;
        let l = self.config.layout;
        let args = HostArgs {
            layout: [l.stack_bytes, l.io_bytes, l.image_bytes, l.heap_bytes],
            output_limit: self.config.output_limit_bytes,
            spin_us: self.config.idle_spin_us,
            poll_us: self.settings.poll_us,
            shells: self.settings.shells,
            slots: self.settings.vms_per_host,
            runners: self.settings.runners,
            sandbox: sandbox.to_arg(),
        };
        let io_bytes = vmm::layout::Layout::new(l)
            .map_err(|e| io("a vm host slab", e))?
            .io_bytes;
        let slab = Slab::with_slots(io_bytes, self.settings.vms_per_host).map_err(|e| io("a vm host slab", e))?;
        let region = SharedRegion::create("microfaas-vm-ring", vmhost::RingLayout::bytes())
            .map_err(|e| io("a vm host run ring", e))?;
        // SAFETY: this backend is the ring's only producer (pushes are
        // serialised by `ring_lock`); it never consumes.
        let ring = unsafe { RunRing::new(region) }.map_err(|e| Error::io("a vm host run ring", e))?;
        let (ours, theirs) = socketpair()?;
        let slab_fd = slab.fd().ok_or_else(|| io("a vm host slab", "no fd"))?;
        let ring_fd = ring.region().fd().ok_or_else(|| io("a vm host run ring", "no fd"))?;
        let argv: Vec<String> = args.to_args();
        let argv: Vec<&OsStr> = argv.iter().map(OsStr::new).collect();
        let child = Child::spawn(
            &self.settings.binary,
            &argv,
            &[],
            &[
                (theirs.as_fd(), vmhost::CONTROL_FD),
                (slab_fd, vmhost::SLAB_FD),
                (ring_fd, vmhost::RING_FD),
            ],
        )
        .map_err(|e| Error::io("spawning a vm host process", e))?;
        drop(theirs);
        let reply_timeout = self.settings.reply_timeout.max(Duration::from_millis(1));
        let timeout = nix::sys::time::TimeVal::new(
            libc::time_t::try_from(reply_timeout.as_secs()).unwrap_or(20),
            libc::suseconds_t::from(reply_timeout.subsec_micros()),
        );
        let _ = nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::ReceiveTimeout, &timeout);
        let pid = u32::try_from(child.pid()).unwrap_or(0);
        let host = Arc::new(Host {
            tenant: tenant.to_owned(),
            pid,
            child: Mutex::new(None),
            control: Mutex::new(ours),
            slab,
            ring,
            ring_lock: Mutex::new(()),
            dead: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            guests_ran: AtomicBool::new(false),
            last_id: AtomicU32::new(0),
            condemned: Mutex::new(None),
            reply_timeout,
            registered: Mutex::new(HashSet::new()),
            live: Mutex::new(HashMap::new()),
            vms: AtomicUsize::new(0),
            instances: AtomicUsize::new(0),
            pending: Mutex::new(Vec::new()),
            empty_since: Mutex::new(None),
            dropper: Arc::clone(&self.signal),
        });
        let weak = Arc::downgrade(&host);
        self.watch
            .watch(child.pidfd(), move || {
                if let Some(h) = weak.upgrade() {
                    h.lost();
                }
            })
            .map_err(|e| Error::io("watching a vm host process", e))?;
        if let Ok(mut c) = host.child.lock() {
            *c = Some(child);
        }
        self.spawned.fetch_add(1, Ordering::Relaxed);
        Ok(host)
    }

    /// A host process of `tenant` for an instance of `node`.
    fn place(&self, tenant: &str, node: u64) -> Result<Arc<Host>, Error> {
        let mut hosts = self.hosts.lock().map_err(|_| super::super::vm::poisoned())?;
        hosts.retain(|h| !h.is_dead());
        let room = |h: &&Arc<Host>| {
            h.tenant == tenant && h.vms() < self.settings.vms_per_host && !h.retired.load(Ordering::Relaxed)
        };
        let registered = |h: &&Arc<Host>| h.registered.lock().is_ok_and(|r| r.contains(&node));
        let chosen = hosts
            .iter()
            .filter(room)
            .find(registered)
            .or_else(|| hosts.iter().find(room))
            .cloned();
        let host = match chosen {
            Some(h) => h,
            None => {
                let h = self.spawn(tenant)?;
                hosts.push(Arc::clone(&h));
                h
            }
        };
        host.vms.fetch_add(1, Ordering::Relaxed);
        host.instances.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut e) = host.empty_since.lock() {
            *e = None;
        }
        Ok(host)
    }

    /// Restores an instance of `node` (of `tenant`) in a host process.
    ///
    /// A host process's `StateRefused` (KVM refused the node's state) makes
    /// the node corrupt for every tenant (the caller refuses it), so it is
    /// believed only from a process in which no guest has run yet: freshly
    /// exec'd, nothing a function controls has spoken for it. A process
    /// that has run guests and refuses is retired and the restore tried
    /// again elsewhere (in the end in a fresh process, whose answer
    /// stands), so an escaped guest cannot condemn a node other tenants
    /// share.
    pub(crate) fn restore(&self, tenant: &str, node: &Restorable) -> Result<Instance, Error> {
        // Each disbelieved refusal retires a process, so retries reach a
        // fresh process once the tenant's others are retired; the bound is
        // for a tenant with very many processes.
        const ATTEMPTS: usize = 4;
        let mut last = None;
        for _ in 0..ATTEMPTS {
            match self.restore_once(tenant, node) {
                Ok(instance) => return Ok(instance),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Disbelieved(detail) | Attempt::HostGone(detail)) => last = Some(detail),
            }
        }
        Err(io(
            "restoring an instance in a vm host process",
            format!(
                "{ATTEMPTS} host processes refused the state of node {} (not believed from one that had run guests) or were gone when asked (last: {})",
                node.id,
                last.unwrap_or_default()
            ),
        ))
    }

    fn restore_once(&self, tenant: &str, node: &Restorable) -> Result<Instance, Attempt> {
        let id = {
            let mut keys = self.keys.lock().map_err(|_| super::super::vm::poisoned())?;
            let next = u64::try_from(keys.len()).unwrap_or(u64::MAX);
            *keys.entry(node.id).or_insert(next)
        };
        let host = self.place(tenant, id)?;
        let undo = |host: &Host| {
            host.vms.fetch_sub(1, Ordering::Relaxed);
            host.released();
        };
        let fail = |detail: String| Attempt::Failed(io("restoring an instance in a vm host process", detail));
        let first = host.registered.lock().is_ok_and(|r| !r.contains(&id));
        if first {
            let image = std::fs::File::open(node.image_path()).map_err(|e| {
                undo(&host);
                Error::io("opening a snapshot image for a vm host process", e)
            })?;
            let request = Request::Register {
                node: id,
                state: node.state().encode(),
            };
            match host.call(&request, Some(image.as_fd())) {
                Ok(Reply::Ok) => {
                    if let Ok(mut r) = host.registered.lock() {
                        r.insert(id);
                    }
                }
                Ok(other) => {
                    undo(&host);
                    host.refused(&other);
                    return Err(fail(format!("registering node {id}: {other:?}")));
                }
                Err(e) => {
                    undo(&host);
                    let detail = format!("registering node {id}: {e}");
                    return Err(if e.gone {
                        Attempt::HostGone(detail)
                    } else {
                        fail(detail)
                    });
                }
            }
        }
        let io_addr = vmm::layout::Layout::new(self.config.layout).map(|l| l.io_addr);
        let chan = match host.slab.take().and_then(|mut c| {
            c.bind(io_addr.unwrap_or(0))?;
            Ok(c)
        }) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                undo(&host);
                return Err(fail(e.to_string()));
            }
        };
        let slot = u32::try_from(chan.index()).unwrap_or(u32::MAX);
        if let Ok(mut live) = host.live.lock() {
            live.insert(slot, Arc::clone(&chan));
        }
        let remote = RemoteVm {
            host: Arc::clone(&host),
            chan,
            slot,
        };
        // From here, dropping `remote` gives the slot back (and the VM up).
        let tsc_offset = match host.call(&Request::Restore { node: id, slot }, None) {
            Ok(Reply::Restored { tsc_offset, .. }) => {
                host.guests_ran.store(true, Ordering::SeqCst);
                tsc_offset
            }
            Ok(Reply::Error(e)) => {
                host.retired.store(true, Ordering::Relaxed);
                return Err(fail(e));
            }
            Ok(Reply::StateRefused(e)) => {
                host.retired.store(true, Ordering::Relaxed);
                if host.guests_ran.load(Ordering::SeqCst) {
                    return Err(Attempt::Disbelieved(e));
                }
                return Err(Attempt::Failed(Error::SnapshotCorrupt {
                    path: node.path().to_owned(),
                    detail: format!(
                        "restoring an instance from snapshot node {} in a vm host process: {e}",
                        node.id
                    ),
                }));
            }
            Ok(other) => {
                host.refused(&other);
                return Err(fail(format!("{other:?}")));
            }
            Err(e) if e.gone => return Err(Attempt::HostGone(e.message)),
            Err(e) => return Err(fail(e.message)),
        };
        let start = RemoteStart {
            seq: node.state().seq,
            at_checkpoint: node.state().at_checkpoint,
            tsc_offset,
        };
        // The caller's own polling for replies (`caller_spin_us`) is set
        // per request (`VmBackend::reply_spin`).
        Instance::remote(Box::new(remote), &self.config, start).map_err(|e| fail(e.to_string()))
    }

    /// Threads and private memory of the host processes, from `/proc`
    /// (not from what they say).
    pub(crate) fn usage(&self) -> (u64, u64) {
        let (mut threads, mut private) = (0u64, 0u64);
        for h in self.list() {
            let status = std::fs::read_to_string(format!("/proc/{}/status", h.pid)).unwrap_or_default();
            let field = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            threads += field("Threads:");
            private += field("RssAnon:") * 1024 + field("RssShmem:") * 1024;
        }
        (threads, private)
    }
}

fn socketpair() -> Result<(OwnedFd, OwnedFd), Error> {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two fds into the local array; both are
    // owned right after.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(Error::io("a vm host control socket", std::io::Error::last_os_error()));
    }
    // SAFETY: two fresh fds nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

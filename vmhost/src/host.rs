//! The host process itself: maps the slab and the run ring it was given,
//! opens `/dev/kvm`, enters its sandbox, then serves: a dispatcher thread
//! takes queued runs off the ring and hands the instances to the runner
//! pool, and stops instances whose callers gave up (a stop entry); the
//! main thread answers control requests (register a node, restore into a
//! slot, drop a slot); a shell maker thread keeps VM shells made for the
//! restores. It exits when the backend closes the socket.

use crate::protocol::{Reply, Request};
use crate::{HostArgs, RING_FD, RunRing, SLAB_FD};
use ipc::futex;
use ipc::region::SharedRegion;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;
use vmm::slab::Slab;
use vmm::{ExternalMemory, Instance, InstanceConfig, ResetSource, RunnerConfig, SavedState, Shell, Vmm};

/// Why the host process stopped.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Its setup failed.
    #[error("{0}")]
    Setup(String),
    /// The control socket failed.
    #[error("the control socket")]
    Socket(#[source] std::io::Error),
}

/// A node's image (mapped privately for each instance) and saved state.
#[derive(Debug)]
struct Node {
    image: Arc<File>,
    state: SavedState,
    /// What its instances are reset to (an idle node's).
    reset: Option<Arc<ResetSource>>,
}

/// Guest memory: a private mapping of a node's image.
#[derive(Debug)]
struct ImageMemory {
    addr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the pointer is the base of a private mapping this value owns and
// unmaps only on drop.
unsafe impl Send for ImageMemory {}
// SAFETY: as above; it is never dereferenced here.
unsafe impl Sync for ImageMemory {}

// SAFETY: one private read/write mapping of `len` bytes at `addr`, owned by
// this value until it drops; the methods always return the same values.
unsafe impl ExternalMemory for ImageMemory {
    fn host_addr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Drop for ImageMemory {
    fn drop(&mut self) {
        // SAFETY: our mapping; the instance that used it (and its VM) is
        // gone before its memory drops.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

fn map_image(image: &File, len: usize) -> std::io::Result<ImageMemory> {
    // SAFETY: a fresh private mapping of a file we hold open; no existing
    // memory is affected; never executable.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            image.as_raw_fd(),
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let addr = std::ptr::NonNull::new(raw.cast::<u8>()).ok_or_else(|| std::io::Error::other("null mapping"))?;
    Ok(ImageMemory { addr, len })
}

/// Maps `image` privately over a shell's reservation `addr..addr + len`
/// (`Instance::restore_into_slot` hands it over for this).
fn map_image_over(image: &File, addr: std::ptr::NonNull<u8>, len: usize) -> std::io::Result<ImageMemory> {
    // SAFETY: `addr..addr + len` is the shell's reservation, which the
    // restore hands to this mapping (MAP_FIXED replaces only it); a private
    // mapping of a file we hold open; never executable.
    let raw = unsafe {
        libc::mmap(
            addr.as_ptr().cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE | libc::MAP_FIXED,
            image.as_raw_fd(),
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ImageMemory { addr, len })
}

struct Host {
    vmm: Vmm,
    io_addr: u64,
    slab: Arc<Slab>,
    ring: RunRing,
    /// Held by whoever consumes the ring (the dispatcher, or an idle
    /// runner polling it): one consumer at a time.
    consumer: Mutex<()>,
    config: InstanceConfig,
    mem_bytes: usize,
    nodes: Mutex<HashMap<u64, Node>>,
    instances: RwLock<Vec<Option<Arc<Instance>>>>,
    /// VM shells made in advance (by the shell maker thread).
    shells: Mutex<Vec<Shell>>,
    /// Signalled when a restore takes a shell.
    shell_taken: Condvar,
    /// How many to keep.
    shell_target: usize,
    /// The node new shells are primed for (`Shell::prime`): the one last
    /// registered or restored (the next restore is most likely of it).
    prime_for: Mutex<Option<u64>>,
}

/// Takes an fd the backend placed at `number`.
fn inherited(number: RawFd) -> OwnedFd {
    // SAFETY: the backend spawned this process with an open fd at
    // `number` (see the crate doc); nothing else in it owns that fd.
    unsafe { OwnedFd::from_raw_fd(number) }
}

/// Runs the host process (never returns while the backend is there).
pub fn run(args: &HostArgs) -> Result<(), HostError> {
    let setup = |what: &str, e: &dyn std::fmt::Display| HostError::Setup(format!("{what}: {e}"));
    let control = inherited(crate::CONTROL_FD);
    let config = args.instance_config();
    let layout = vmm::layout::Layout::new(config.layout).map_err(|e| setup("layout", &e))?;
    let mem_bytes = usize::try_from(layout.mem_bytes).map_err(|e| setup("layout", &e))?;
    let slab = Slab::from_fd(File::from(inherited(SLAB_FD)), layout.io_bytes, args.slots)
        .map_err(|e| setup("mapping the slab", &e))?;
    let region = SharedRegion::from_fd(inherited(RING_FD), crate::RingLayout::bytes())
        .map_err(|e| setup("mapping the run ring", &e))?;
    // SAFETY: this process is the ring's only consumer (the dispatcher
    // thread); it never produces.
    let ring = unsafe { RunRing::new(region) }.map_err(|e| setup("the run ring", &e))?;
    // Everything that needs a file or /proc happens before the sandbox:
    // /dev/kvm, the fd limit, the kick handler. The runner pool starts
    // with the first instance, inside the sandbox.
    // Grows, when every runner is busy (a long request), to about one per
    // core plus one (read before the sandbox).
    let defaults = RunnerConfig::default();
    let vmm = Vmm::with_runners(RunnerConfig {
        runners: args.runners.max(1),
        placement: defaults.placement,
        grow_to: defaults.grow_to.max(args.runners),
    })
    .map_err(|e| setup("opening /dev/kvm", &e))?;
    // Resets find a guest's written pages with PAGEMAP_SCAN, the one ioctl
    // the sandbox allows besides KVM's, on the pagemap fd only; nothing may
    // read that fd (frame numbers).
    let mut vmm = vmm;
    let pagemap_fd = vmm.pagemap_scan_only();
    enter_sandbox(&args.sandbox, pagemap_fd)?;
    let host = Arc::new(Host {
        vmm,
        io_addr: layout.io_addr,
        slab,
        ring,
        consumer: Mutex::new(()),
        config,
        mem_bytes,
        nodes: Mutex::new(HashMap::new()),
        instances: RwLock::new((0..args.slots).map(|_| None).collect()),
        shells: Mutex::new(Vec::new()),
        shell_taken: Condvar::new(),
        shell_target: args.shells,
        prime_for: Mutex::new(None),
    });
    if args.poll_us > 0 {
        vmm::runner::set_idle_poll(
            Box::new(RingPoll(Arc::clone(&host))),
            Duration::from_micros(u64::from(args.poll_us)),
        );
    }
    let h = Arc::clone(&host);
    std::thread::Builder::new()
        .name("vmhost-dispatch".into())
        .spawn(move || dispatch(&h))
        .map_err(|e| setup("the dispatcher thread", &e))?;
    if host.shell_target > 0 {
        let h = Arc::clone(&host);
        std::thread::Builder::new()
            .name("vmhost-shells".into())
            .spawn(move || make_shells(&h))
            .map_err(|e| setup("the shell maker thread", &e))?;
    }
    serve(&host, std::os::fd::AsFd::as_fd(&control))
}

/// Enters the VMM host sandbox (`lang_isolation::sandbox::vmhost`), on
/// the process's only thread.
fn enter_sandbox(spec: &str, pagemap_fd: Option<RawFd>) -> Result<(), HostError> {
    use lang_isolation::sandbox::{SandboxSpec, vmhost};
    let spec = SandboxSpec::parse(spec).map_err(|e| HostError::Setup(format!("sandbox spec: {e}")))?;
    vmhost::enter(&spec, crate::CONTROL_FD, pagemap_fd)
        .map_err(|e| HostError::Setup(format!("entering the sandbox: {e}")))?;
    Ok(())
}

/// Takes every queued run off the ring (as its one consumer at a time:
/// `wait` for the consumer lock, else give up if another holds it) and
/// hands the instances to runners, or stops an instance whose caller set
/// its kill flag (a `STOP` entry). True if it took any.
fn drain(host: &Host, wait: bool) -> bool {
    let _consumer = if wait {
        match host.consumer.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    } else {
        match host.consumer.try_lock() {
            Ok(g) => g,
            Err(_) => return false,
        }
    };
    let ring = host.ring.ring();
    let mut took = false;
    while let Some(run) = ring.pop() {
        took = true;
        let instance = host.instances.read().ok().and_then(|v| {
            v.get(usize::try_from(run.slot).unwrap_or(usize::MAX))
                .cloned()
                .flatten()
        });
        if let Some(instance) = instance {
            match run.op {
                crate::RunEntry::STOP => {
                    instance.stop_if_killed();
                }
                crate::RunEntry::RESET => instance.reset_published(),
                op => instance.run_published(op == crate::RunEntry::RESUME),
            }
        }
    }
    took
}

/// The dispatcher thread: drains the ring whenever the backend wakes it
/// (it does when no runner is polling the ring).
fn dispatch(host: &Host) {
    let ring = host.ring.ring();
    loop {
        let tail = ring.tail_word().load(Ordering::Acquire);
        if !drain(host, true) {
            futex::wait(ring.tail_word(), tail, Some(Duration::from_secs(1)));
        }
    }
}

/// An idle runner's poll of the run ring (`vm.host_poll_us`): while it
/// polls, the backend does not wake the dispatcher, and the runner takes
/// the next request itself (no sleep, no wake, no hand-off).
struct RingPoll(Arc<Host>);

impl vmm::runner::IdlePoll for RingPoll {
    fn enter(&self) {
        self.0.ring.pollers().fetch_add(1, Ordering::SeqCst);
    }

    fn poll(&self) -> bool {
        // Cheap while empty: one load, no lock.
        !self.0.ring.ring().is_empty() && drain(&self.0, false)
    }

    fn leave(&self) {
        self.0.ring.pollers().fetch_sub(1, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        // A push that saw this poller and did not wake the dispatcher.
        if !self.0.ring.ring().is_empty() {
            drain(&self.0, true);
        }
    }
}

fn serve(host: &Host, control: BorrowedFd<'_>) -> Result<(), HostError> {
    let mut buf = vec![0u8; crate::protocol::MAX_MESSAGE + crate::protocol::FRAME_HEADER + 1];
    loop {
        let (len, fd) = match receive(control, &mut buf) {
            Ok(Some(m)) => m,
            // The backend is gone.
            Ok(None) => return Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNRESET | libc::EPIPE)) => return Ok(()),
            Err(e) => return Err(HostError::Socket(e)),
        };
        let (id, reply) = match crate::protocol::unframe(&buf[..len]) {
            Ok((id, message)) => (
                id,
                match Request::decode(message) {
                    Ok(request) => handle(host, request, fd),
                    Err(e) => Reply::Error(format!("bad request: {e}")),
                },
            ),
            Err(e) => (0, Reply::Error(format!("bad frame: {e}"))),
        };
        send(control, &crate::protocol::frame(id, &reply.encode())).map_err(HostError::Socket)?;
    }
}

fn handle(host: &Host, request: Request, fd: Option<OwnedFd>) -> Reply {
    match request {
        Request::Register { node, state } => {
            let Some(fd) = fd else {
                return Reply::Error("register without an image fd".into());
            };
            match SavedState::decode(&state) {
                Ok(state) => {
                    let image = Arc::new(File::from(fd));
                    let reset = ResetSource::new(state.clone(), Box::new(Arc::clone(&image)))
                        .ok()
                        .map(Arc::new);
                    if let Ok(mut nodes) = host.nodes.lock() {
                        nodes.insert(node, Node { image, state, reset });
                    }
                    if let Ok(mut p) = host.prime_for.lock() {
                        *p = Some(node);
                    }
                    Reply::Ok
                }
                Err(e) => Reply::Error(format!("node {node}: bad saved state: {e}")),
            }
        }
        Request::Restore { node, slot } => match restore(host, node, slot) {
            Ok(reply) => reply,
            Err(e) => Reply::Error(e),
        },
        Request::Drop { slot } => {
            let taken = host.instances.write().ok().and_then(|mut v| {
                v.get_mut(usize::try_from(slot).unwrap_or(usize::MAX))
                    .and_then(Option::take)
            });
            if let Some(mut instance) = taken {
                // The dispatcher may hold it a moment.
                let instance = loop {
                    match Arc::try_unwrap(instance) {
                        Ok(i) => break i,
                        Err(back) => {
                            instance = back;
                            std::thread::sleep(Duration::from_micros(100));
                        }
                    }
                };
                if !instance.teardown(Duration::from_secs(10)) {
                    return Reply::Error(format!("slot {slot}: the VM did not stop"));
                }
            }
            Reply::Ok
        }
    }
}

/// The shell maker thread: keeps `shell_target` VM shells made
/// (KVM_CREATE_VM, the vCPU, its CPUID and the memory slots over
/// reservations, primed with the vCPU state of the node last registered or
/// restored: most of a restore's fixed cost, and its tail), so that
/// restores find one made. Its own thread, so that the control thread never
/// waits behind a shell being made (a memory slot's registration alone
/// took up to 13 ms here under load). A shell holds address space (the
/// guest memory's and a channel view's), not memory, and two or three fds.
fn make_shells(host: &Host) {
    loop {
        {
            let Ok(mut shells) = host.shells.lock() else {
                return;
            };
            while shells.len() >= host.shell_target {
                shells = match host.shell_taken.wait(shells) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
        }
        match Shell::with_memory_for_slots(&host.vmm, &host.config) {
            Ok(mut shell) => {
                let node = host.prime_for.lock().ok().and_then(|p| *p);
                let state = node.and_then(|n| host.nodes.lock().ok()?.get(&n).map(|n| n.state.vcpu.clone()));
                // A shell that refused the state is still a shell (a restore
                // sets the registers).
                if let Some(state) = state {
                    let _ = shell.prime(&state);
                }
                if let Ok(mut s) = host.shells.lock() {
                    s.push(shell);
                }
            }
            // Out of VMs or fds: restores make their own (and say why)
            // until this one succeeds again.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn restore(host: &Host, node: u64, slot: u32) -> Result<Reply, String> {
    let index = usize::try_from(slot).map_err(|_| "slot out of range".to_owned())?;
    if host
        .instances
        .read()
        .map_err(|_| "poisoned".to_owned())?
        .get(index)
        .ok_or_else(|| format!("slot {slot} out of range"))?
        .is_some()
    {
        return Err(format!("slot {slot} is in use"));
    }
    let (image, state, reset) = {
        let nodes = host.nodes.lock().map_err(|_| "poisoned".to_owned())?;
        let n = nodes
            .get(&node)
            .ok_or_else(|| format!("node {node} is not registered"))?;
        (Arc::clone(&n.image), n.state.clone(), n.reset.clone())
    };
    let mut chan = host.slab.slot_at(index).map_err(|e| format!("slot {slot}: {e}"))?;
    chan.bind(host.io_addr).map_err(|e| format!("slot {slot}: {e}"))?;
    let shell = host.shells.lock().ok().and_then(|mut s| s.pop());
    host.shell_taken.notify_one();
    let restored = match shell {
        // The usual case: the shell's memory slots point at reservations
        // the node's image and the slot are mapped over (no memory slot
        // change here).
        Some(shell) if shell.has_memory() => Instance::restore_into_slot(
            &host.vmm,
            shell,
            &host.config,
            |addr, len| {
                map_image_over(&image, addr, len)
                    .map(|m| Box::new(m) as Box<dyn ExternalMemory>)
                    .map_err(|e| format!("mapping node {node}: {e}").into())
            },
            &state,
            chan,
        ),
        // None made (out of fds or VMs, or restores faster than the
        // refills): a new VM and its slots, here.
        shell => {
            let memory = map_image(&image, host.mem_bytes).map_err(|e| format!("mapping node {node}: {e}"))?;
            Instance::restore_in_slot(&host.vmm, shell, &host.config, Box::new(memory), &state, chan)
        }
    };
    let instance = match restored {
        Ok(i) => i,
        // The node is at fault: KVM refused its registers, or its state
        // does not match its memory (not a VM or vCPU this process could
        // not make: that is a plain error).
        Err(e) if e.blames_saved_state() => return Ok(Reply::StateRefused(chain(&e))),
        Err(e) => return Err(chain(&e)),
    };
    if let Some(reset) = reset {
        instance.set_reset_source(reset);
    }
    if let Ok(mut p) = host.prime_for.lock() {
        *p = Some(node);
    }
    let reply = Reply::Restored {
        seq: instance.seq(),
        at_checkpoint: instance.at_checkpoint(),
        tsc_offset: instance.tsc_offset(),
    };
    if let Ok(mut v) = host.instances.write()
        && let Some(place) = v.get_mut(index)
    {
        *place = Some(Arc::new(instance));
    }
    Ok(reply)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Receives one message and at most one fd; `None` at end of stream.
pub fn receive(socket: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<Option<(usize, Option<OwnedFd>)>> {
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            // SAFETY: the kernel just installed these fds in
                            // this process for us; nothing else owns them.
                            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                        }
                    }
                }
                if msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
                    return Err(std::io::Error::other("a control message was cut"));
                }
                if msg.bytes == 0 {
                    return Ok(None);
                }
                let fd = fds.into_iter().next(); // more than one: the rest close
                return Ok(Some((msg.bytes, fd)));
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends one message (with `fd` if given).
pub fn send_with(socket: BorrowedFd<'_>, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = raw.as_ref().map(|r| ControlMessage::ScmRights(r)).into_iter().collect();
    loop {
        match sendmsg::<()>(socket.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(_) => return Err(std::io::Error::other("short control message")),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn send(socket: BorrowedFd<'_>, bytes: &[u8]) -> std::io::Result<()> {
    send_with(socket, bytes, None)
}

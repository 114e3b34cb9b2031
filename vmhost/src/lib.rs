//! The `vm` backend's VMM host process (`microfaas-vmhost`) and what the
//! backend shares with it.
//!
//! A host process holds a shard of one tenant's micro-VMs (a bounded number)
//! and runs their vCPUs from a small pool of runner threads. The backend
//! execs it with three fds at fixed numbers:
//!
//! ```text
//!  3 CONTROL_FD  SOCK_SEQPACKET socketpair end: protocol::Request / Reply, node image fds (SCM_RIGHTS)
//!  4 SLAB_FD     the channel slab memfd: per instance [control | mailbox | I/O window]
//!  5 RING_FD     the run ring memfd: RingLayout (SPSC ring of RunEntry + the kick word)
//! ```
//!
//! The request path never uses the socket: the caller (in the backend)
//! writes the slot's mailbox and window, pushes the slot on the run ring
//! and futex-wakes it; the host's dispatcher hands the instance to a
//! runner; the runner's report (in the slot's control block) wakes the
//! caller. A deadline kill sets the slot's kill flag and queues a stop of
//! the slot; the dispatcher kicks whichever runner runs it.
//!
//! Trust: the host process runs hostile guests; a VM escape speaks for it.
//! The backend reads nothing from it unchecked (replies are decoded by
//! [`protocol`], the slot by `vmm::channel` and `vmm::report`); the host
//! runs in its sandbox (`lang_isolation::sandbox::vmhost`), as the tenant's
//! uid.

pub mod host;
pub mod protocol;

use ipc::region::SharedRegion;
use ipc::ring::{Entry, Ring, RingIndices};

/// The control socket's fd number in the host process.
pub const CONTROL_FD: i32 = lang_isolation::sandbox::vmhost::CONTROL_FD;
/// The slab memfd's fd number.
pub const SLAB_FD: i32 = 4;
/// The run ring memfd's fd number.
pub const RING_FD: i32 = 5;

/// Entries of a host's run ring (runs in flight at once, at most).
pub const RING_CAPACITY: u32 = 4096;

/// One queued command: the slot, and what to do with it. Written by the
/// backend (trusted by the host).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunEntry {
    /// Slab slot.
    pub slot: u32,
    /// [`RunEntry::RUN`], [`RunEntry::RESUME`], [`RunEntry::STOP`] or
    /// [`RunEntry::RESET`].
    pub op: u32,
}

impl RunEntry {
    /// A request was published in the slot: run the guest.
    pub const RUN: u32 = 0;
    /// Resume the guest from its checkpoint.
    pub const RESUME: u32 = 1;
    /// The caller set the slot's kill flag: stop the guest (kick its runner).
    pub const STOP: u32 = 2;
    /// Reset the idle guest to the node it was restored from
    /// (`vmm::Instance::reset`); its runner reports the node's sequence
    /// number when done.
    pub const RESET: u32 = 3;
}

/// Where the ring's parts are in its region.
#[derive(Debug, Clone, Copy)]
pub struct RingLayout;

impl RingLayout {
    /// The ring's counters.
    pub const INDICES: usize = 0;
    /// The host's count of runners polling the ring (an `AtomicU32`): the
    /// backend wakes the dispatcher after a push only when it reads 0.
    /// Written by the host (untrusted: a wrong count only delays that
    /// host's own requests, to their deadline at worst, and the
    /// dispatcher also polls every second).
    pub const POLLERS: usize = 512;
    /// End of the counters (reserved up to here).
    pub const INDICES_END: usize = 1024;
    /// The entries.
    pub const ENTRIES: usize = 4096;

    /// Bytes of the region.
    pub fn bytes() -> usize {
        Self::ENTRIES + usize::try_from(RING_CAPACITY).unwrap_or(0) * std::mem::size_of::<Entry<RunEntry>>()
    }
}

const _: () = assert!(std::mem::size_of::<RingIndices>() <= RingLayout::POLLERS);
const _: () = assert!(RingLayout::POLLERS + 4 <= RingLayout::INDICES_END);

/// A run ring over its region (the backend produces, the host consumes).
#[derive(Debug)]
pub struct RunRing {
    ring: Ring<RunEntry>,
    // The mapping the ring points into (dropped after it).
    region: SharedRegion,
}

impl RunRing {
    /// A ring over `region` (at least [`RingLayout::bytes`], zeroed when
    /// made).
    ///
    /// # Safety
    /// At most one thread (in any process) may use the producer side and
    /// one the consumer side at a time.
    pub unsafe fn new(region: SharedRegion) -> std::io::Result<Self> {
        if region.len() < RingLayout::bytes() {
            return Err(std::io::Error::other("the run ring region is too small"));
        }
        let base = region.as_ptr();
        // SAFETY: both offsets are inside the region (checked above),
        // page-aligned (the region is) and suitably aligned for their types;
        // the region outlives the ring (field order); capacity is a power of
        // two; the single-producer / single-consumer rule is the caller's.
        let ring = unsafe {
            Ring::from_raw(
                base.add(RingLayout::INDICES).cast::<RingIndices>(),
                base.add(RingLayout::ENTRIES).cast::<Entry<RunEntry>>(),
                RING_CAPACITY,
            )
        };
        Ok(Self { ring, region })
    }

    /// The ring.
    pub fn ring(&self) -> &Ring<RunEntry> {
        &self.ring
    }

    /// The count of host runners polling the ring ([`RingLayout::POLLERS`]).
    pub fn pollers(&self) -> &std::sync::atomic::AtomicU32 {
        // SAFETY: the offset is inside the region (checked at `new`: the
        // region holds the entries, which start after it), 4-aligned (the
        // region is page-aligned), and an atomic is valid for any bytes;
        // the reference lives no longer than `self`, which keeps the
        // mapping.
        unsafe {
            &*self
                .region
                .as_ptr()
                .add(RingLayout::POLLERS)
                .cast::<std::sync::atomic::AtomicU32>()
        }
    }

    /// The region (its fd, to pass to the host).
    pub fn region(&self) -> &SharedRegion {
        &self.region
    }
}

/// What a host process is started with (its command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostArgs {
    /// Guest layout: stack, I/O window, image and heap bytes.
    pub layout: [u64; 4],
    /// Largest output accepted.
    pub output_limit: u64,
    /// Hot spinning of idle guests, in microseconds.
    pub spin_us: u32,
    /// How long a runner polls the run ring after finishing a command
    /// before it sleeps, in microseconds (0: it sleeps at once).
    pub poll_us: u32,
    /// Slots in the slab (the bound of VMs of this process).
    pub slots: usize,
    /// VM shells (VM + vCPU + memory slots over reservations, see
    /// `vmm::Shell::with_memory_for_slots`) kept made in advance, off the
    /// restore path.
    pub shells: usize,
    /// Runner threads.
    pub runners: usize,
    /// The sandbox to enter (`SandboxSettings::to_arg`).
    pub sandbox: String,
}

impl HostArgs {
    /// The command line (after `argv[0]`).
    pub fn to_args(&self) -> Vec<String> {
        let [s, i, m, h] = self.layout;
        vec![
            "--layout".into(),
            format!("{s},{i},{m},{h}"),
            "--output-limit".into(),
            self.output_limit.to_string(),
            "--spin-us".into(),
            self.spin_us.to_string(),
            "--poll-us".into(),
            self.poll_us.to_string(),
            "--slots".into(),
            self.slots.to_string(),
            "--shells".into(),
            self.shells.to_string(),
            "--runners".into(),
            self.runners.to_string(),
            "--sandbox".into(),
            self.sandbox.clone(),
        ]
    }

    /// Parses the command line (after `argv[0]`).
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut it = args.iter();
        let (mut layout, mut output_limit, mut spin_us, mut slots, mut runners, mut sandbox) =
            (None, None, None, None, None, None);
        let mut poll_us = None;
        let mut shells = None;
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let bad = |_| format!("bad value for {flag}: {value}");
            match flag.as_str() {
                "--layout" => {
                    let v: Vec<u64> = value
                        .split(',')
                        .map(str::parse)
                        .collect::<Result<_, _>>()
                        .map_err(bad)?;
                    let l: [u64; 4] = v.try_into().map_err(|_| format!("--layout takes 4 sizes: {value}"))?;
                    layout = Some(l);
                }
                "--output-limit" => output_limit = Some(value.parse().map_err(bad)?),
                "--spin-us" => spin_us = Some(value.parse().map_err(bad)?),
                "--poll-us" => poll_us = Some(value.parse().map_err(bad)?),
                "--shells" => shells = Some(value.parse().map_err(bad)?),
                "--slots" => slots = Some(value.parse().map_err(bad)?),
                "--runners" => runners = Some(value.parse().map_err(bad)?),
                "--sandbox" => sandbox = Some(value.clone()),
                other => return Err(format!("unknown flag {other}")),
            }
        }
        Ok(Self {
            layout: layout.ok_or("--layout missing")?,
            output_limit: output_limit.ok_or("--output-limit missing")?,
            spin_us: spin_us.unwrap_or(0),
            poll_us: poll_us.unwrap_or(0),
            shells: shells.unwrap_or(0),
            slots: slots.ok_or("--slots missing")?,
            runners: runners.ok_or("--runners missing")?,
            sandbox: sandbox.ok_or("--sandbox missing")?,
        })
    }

    /// The instance configuration both sides use.
    pub fn instance_config(&self) -> vmm::InstanceConfig {
        let [stack_bytes, io_bytes, image_bytes, heap_bytes] = self.layout;
        vmm::InstanceConfig {
            layout: vmm::LayoutConfig {
                stack_bytes,
                io_bytes,
                image_bytes,
                heap_bytes,
            },
            output_limit_bytes: self.output_limit,
            idle_spin_us: self.spin_us,
            vcpu_stats: false,
            dirty_log: false,
            ..vmm::InstanceConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip_and_refuse_garbage() {
        let a = HostArgs {
            layout: [1 << 20, 64 << 10, 2 << 20, 8 << 20],
            output_limit: 65536,
            spin_us: 0,
            poll_us: 50,
            slots: 3000,
            shells: 2,
            runners: 3,
            sandbox: "layers=all,uid=64901".into(),
        };
        assert_eq!(HostArgs::parse(&a.to_args()), Ok(a.clone()));
        let mut bad = a.to_args();
        bad[1] = "1,2,3".into();
        assert!(HostArgs::parse(&bad).is_err());
        assert!(HostArgs::parse(&["--slots".into()]).is_err());
        assert!(HostArgs::parse(&["--what".into(), "1".into()]).is_err());
    }

    #[test]
    fn the_ring_layout_fits() {
        assert!(RingLayout::bytes() > RingLayout::ENTRIES);
        assert_eq!(RingLayout::ENTRIES % 64, 0);
    }
}

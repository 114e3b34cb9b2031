//! The host<->guest channel ABI of the `vm` backend, shared by `vmm` (host)
//! and `guest` (the unikernel): the guest-physical layout constants, the
//! [`BootInfo`] page, the [`Mailbox`] page, the MMIO doorbell registers and
//! the request/reply codes. `#[repr(C)]`, `no_std`, versioned by
//! [`CHANNEL_ABI_VERSION`]; nothing here has behaviour beyond constants.
//!
//! # Protocol
//!
//! Guest memory is identity mapped (guest virtual = guest physical). The
//! guest runs at CPL3 and talks to the host through one mailbox page and one
//! MMIO doorbell: a page its page tables map but no KVM memory slot backs,
//! so each write to it is one exit. (Port I/O would be the classic doorbell,
//! but this host's nested KVM (PVM) raises #GP for `out` at CPL3 whatever
//! IOPL or the TSS I/O bitmap say.) One request costs one exit:
//!
//! 1. The guest is blocked in a 4-byte write of `seq` to [`REG_DOORBELL`]
//!    (seq = the last request it answered, 0 after boot).
//! 2. The host fills the I/O window and the request half of the [`Mailbox`],
//!    bumps `req_seq`, and resumes the vCPU.
//! 3. The guest handles the request, writes the reply half, sets
//!    `resp_seq = req_seq` and rings the doorbell again (back to 1).
//!
//! Hot instances may spin instead ([`BootInfo::idle_spin_us`]): after a
//! reply the guest polls `req_seq` for a while before ringing, and the host
//! polls `resp_seq`, so a request to a spinning guest costs no exit at all
//! (protocol in [`Mailbox::guest_spinning`]).
//!
//! A CPL0 exception handler writes the vector to [`REG_FAULT`] (on a
//! supervisor-only MMIO page, so CPL3 cannot forge a fault report), and the
//! host reads the hardware exception frame from the top of the fault stack
//! ([`FaultFrame`]). Guest logs (the serial console) are copied to the log
//! area of the mailbox page ([`LOG_OFFSET`]) and flushed with a write of
//! their length to [`REG_LOG`].
//!
//! `LOAD`: the host loads the function artifact into the image region
//! itself (from its own parse of the artifact bytes, with per-segment page
//! permissions the guest cannot change), then sends a [`LoadRequest`] in the
//! I/O window; the guest runs the function's `init()`.
//!
//! Replies: the output (or message) is copied into the I/O window; the host
//! refuses a reply whose range is not inside the window.
//!
//! # Privilege separation
//!
//! Everything the CPU uses at CPL0 (page tables, GDT/IDT/TSS, the fault
//! stubs, the fault stack, the fault register) is supervisor-only or not
//! mapped at all; the kernel's code is read-only and its data
//! non-executable to CPL3; the function image is mapped W^X per segment.
//!
//! Argument snapshots: when the host sets [`Mailbox::checkpoint_seq`] to the
//! request's `req_seq`, the function's `checkpoint()` writes `req_seq` to
//! [`REG_CHECKPOINT`] (one exit); the host snapshots the stopped guest,
//! clears the field and resumes it, and a guest restored from that snapshot
//! resumes right there.
#![no_std]

/// Version of this channel ABI; [`BootInfo::abi_version`] carries it.
pub const CHANNEL_ABI_VERSION: u32 = 3;
/// [`BootInfo::magic`].
pub const BOOT_MAGIC: u64 = 0x6d66_6161_735f_766d; // "mfaas_vm"

/// Size of a small page.
pub const PAGE_BYTES: u64 = 0x1000;
/// Size of a large (2 MiB) page.
pub const HUGE_PAGE_BYTES: u64 = 0x20_0000;

/// Guest-physical address of the [`BootInfo`] page (user read-only).
pub const BOOT_INFO_ADDR: u64 = 0x1000;
/// Guest-physical address of the [`Mailbox`] page (user read-write).
pub const MAILBOX_ADDR: u64 = 0x2000;
/// The CPL0 fault stubs (supervisor-only, read-only, executable), one per
/// vector, [`FAULT_STUB_STRIDE`] apart; the kernel links them here.
pub const FAULT_STUBS_ADDR: u64 = 0x1_6000;
/// Distance between two fault stubs (vector `v` at
/// `FAULT_STUBS_ADDR + v * stride`).
pub const FAULT_STUB_STRIDE: u64 = 16;
/// Number of exception vectors with a stub (0..32).
pub const FAULT_VECTORS: u64 = 32;
/// The guest kernel's code (user read-execute, one 2 MiB page).
pub const KERNEL_TEXT_ADDR: u64 = 0x20_0000;
/// The guest kernel's read-only data (user read-only, one 2 MiB page).
pub const KERNEL_RODATA_ADDR: u64 = 0x40_0000;
/// The guest kernel's data and bss (user read-write, non-executable, one
/// 2 MiB page).
pub const KERNEL_DATA_ADDR: u64 = 0x60_0000;
/// End (exclusive) of the region the guest kernel may occupy.
pub const KERNEL_LIMIT: u64 = 0x80_0000;

/// The fault register page: guest-physical, mapped supervisor-only and
/// backed by no memory slot (a CPL3 write to it is a page fault).
pub const FAULT_MMIO_ADDR: u64 = 0x1f_e000;
/// The doorbell page: guest-physical, mapped user-writable by the guest's
/// page tables but backed by no memory slot, so every write exits to the VMM.
pub const MMIO_ADDR: u64 = 0x1f_f000;
/// Doorbell register (u32 write): the guest is idle after answering `seq`.
pub const REG_DOORBELL: u64 = MMIO_ADDR;
/// Fault register (u32 write, from the CPL0 stubs): exception vector.
pub const REG_FAULT: u64 = FAULT_MMIO_ADDR;
/// Log register (u32 write): that many bytes at the log area are guest log.
pub const REG_LOG: u64 = MMIO_ADDR + 16;
/// Checkpoint register (u32 write of the request's `seq`): the function
/// called `checkpoint()` during a request whose [`Mailbox::checkpoint_seq`]
/// asked for it; the guest blocks until the host has snapshotted it.
pub const REG_CHECKPOINT: u64 = MMIO_ADDR + 24;
/// Offset of the log area in the mailbox page.
pub const LOG_OFFSET: u64 = 0x800;
/// Size of the log area.
pub const LOG_BYTES: u64 = 0x800;

/// What a CPL0 fault stub leaves at the top of the fault stack: the vector
/// and error code it pushed (0 when the CPU pushes none), then the frame the
/// CPU pushed. The host reads it at `fault_stack_top - size_of::<FaultFrame>()`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultFrame {
    /// Exception vector.
    pub vector: u64,
    /// Error code (0 for vectors without one).
    pub error_code: u64,
    /// Faulting instruction.
    pub rip: u64,
    /// Code segment at the fault.
    pub cs: u64,
    /// RFLAGS at the fault.
    pub rflags: u64,
    /// Stack pointer at the fault.
    pub rsp: u64,
    /// Stack segment at the fault.
    pub ss: u64,
}

/// Written by the host at [`BOOT_INFO_ADDR`] before the guest starts; the
/// guest's entry gets its address in `rdi`. All addresses are guest-physical
/// (= guest-virtual), all sizes in bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`CHANNEL_ABI_VERSION`].
    pub abi_version: u32,
    /// Microseconds the idle guest spins on [`Mailbox::req_seq`] before
    /// ringing the doorbell (0 = ring at once). See [`Mailbox::guest_spinning`].
    pub idle_spin_us: u32,
    /// The [`Mailbox`] page.
    pub mailbox_addr: u64,
    /// The I/O window: request payloads (a [`LoadRequest`] on `LOAD`, the
    /// input on `INVOKE`) and every reply's output or message.
    pub io_addr: u64,
    /// Size of the I/O window.
    pub io_bytes: u64,
    /// Where the host loads the function's segments (unmapped until then).
    pub image_addr: u64,
    /// Size of the image region.
    pub image_bytes: u64,
    /// The function heap.
    pub heap_addr: u64,
    /// Size of the function heap (the heap limit).
    pub heap_bytes: u64,
    /// Lowest address of the runtime/function stack (a guard lies below).
    pub stack_bottom: u64,
    /// Initial stack pointer.
    pub stack_top: u64,
    /// Clock calibration: a guest TSC reading...
    pub tsc_base: u64,
    /// ...and the host `CLOCK_MONOTONIC` ns taken at the same moment.
    pub mono_base_ns: u64,
    /// ns per TSC tick as a 32.32 fixed-point multiplier.
    pub ns_per_tsc_q32: u64,
}

/// The mailbox page at [`BootInfo::mailbox_addr`]: the request half is
/// written by the host, the reply half by the guest. The host treats every
/// reply field as untrusted.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mailbox {
    /// Host: sequence number of the current request (1, 2, ...).
    pub req_seq: u32,
    /// Host: one of [`op`].
    pub op: u32,
    /// Host: payload length in the I/O window.
    pub arg_len: u64,
    /// Guest: `req_seq` of the request this reply answers.
    pub resp_seq: u32,
    /// Guest: one of [`reply`].
    pub status: u32,
    /// Guest: address of the output (or message) bytes.
    pub out_addr: u64,
    /// Guest: length of the output (or message) bytes.
    pub out_len: u64,
    /// Guest: the function's entry timestamp (host `CLOCK_MONOTONIC` ns).
    pub entered_ns: u64,
    /// Guest: the function's return timestamp (host `CLOCK_MONOTONIC` ns).
    pub returned_ns: u64,
    /// Guest: heap bytes in use after the request.
    pub heap_used: u64,
    /// Host: its `CLOCK_MONOTONIC` ns when it sent the request...
    pub host_ns: u64,
    /// Host: ...and the guest's TSC at that moment (host TSC + the vCPU's
    /// TSC offset). The guest re-bases its clock on this pair, so its
    /// timestamps stay within about a microsecond of the host's clock
    /// however long the instance lives.
    pub host_tsc: u64,
    /// Guest: 1 while it spins on `req_seq` (a request published now is
    /// seen without an exit), 0 otherwise. The guest clears it, fences, and
    /// re-reads `req_seq` before ringing; the host stores `req_seq`, fences,
    /// and reads this: at least one side sees the other, so a request is
    /// never missed and needs a wake-up only when this read 0.
    pub guest_spinning: u32,
    /// Host: when equal to `req_seq`, the guest exits at the function's
    /// `checkpoint()` (a write of `req_seq` to [`REG_CHECKPOINT`]) so the
    /// host can snapshot it there; the host clears it before resuming.
    /// 0 = do not exit.
    pub checkpoint_seq: u32,
}

/// The payload of a `LOAD` request (at the start of the I/O window): the
/// host has loaded and relocated the artifact into the image region; these
/// are its entry points (guest addresses inside the image region).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadRequest {
    /// Address of `microfaas_v1_init`.
    pub init_addr: u64,
    /// Address of `microfaas_v1_handle`.
    pub handle_addr: u64,
    /// Address of `microfaas_v1_load`; 0 if the artifact has none.
    pub load_addr: u64,
}

/// The payload of a `MODULE` request (at the start of the I/O window): the
/// host has written the function's module (deploy-time data) into the
/// image region, read-only, past the artifact; the guest hands it to the
/// artifact's `load`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModuleRequest {
    /// Guest address of the module's first byte.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// Request operations ([`Mailbox::op`]).
pub mod op {
    /// Run the `init()` of the function the host loaded into the image
    /// region (a [`LoadRequest`](super::LoadRequest) in the I/O window).
    pub const LOAD: u32 = 1;
    /// Call the loaded function's `handle()` on the input in the I/O window.
    pub const INVOKE: u32 = 2;
    /// Hand the module the host wrote into the image region to the loaded
    /// function's `load()` (a [`ModuleRequest`](super::ModuleRequest) in
    /// the I/O window); once per instance, after `LOAD`.
    pub const MODULE: u32 = 3;
}

/// Reply codes ([`Mailbox::status`]). For every code but `OK`,
/// `out_addr/out_len` hold a UTF-8 message. Either lies in the I/O window.
pub mod reply {
    /// Success; for `INVOKE`, `out_addr/out_len` is the output.
    pub const OK: u32 = 1;
    /// `handle()` (or `init()`) returned an error.
    pub const FUNCTION_ERROR: u32 = 2;
    /// The function panicked; the instance cannot be reused.
    pub const PANICKED: u32 = 3;
    /// The function's heap refused an allocation and it gave up; the
    /// instance cannot be reused.
    pub const OUT_OF_MEMORY: u32 = 4;
    /// The artifact could not be loaded (bad ELF, relocation, import, ABI).
    pub const LOAD_FAILED: u32 = 5;
    /// The request was malformed (unknown op, length out of bounds, no
    /// function loaded).
    pub const BAD_REQUEST: u32 = 6;
    /// `init()` failed.
    pub const INIT_FAILED: u32 = 7;
}

const _: () = assert!(core::mem::size_of::<Mailbox>() as u64 <= LOG_OFFSET);
const _: () = assert!(core::mem::size_of::<BootInfo>() as u64 <= PAGE_BYTES);
const _: () = assert!(core::mem::size_of::<FaultFrame>() == 56);
const _: () = assert!(core::mem::size_of::<LoadRequest>() == 24);
const _: () = assert!(core::mem::size_of::<ModuleRequest>() == 16);
const _: () = assert!(FAULT_STUBS_ADDR + FAULT_VECTORS * FAULT_STUB_STRIDE + 64 <= FAULT_STUBS_ADDR + PAGE_BYTES);

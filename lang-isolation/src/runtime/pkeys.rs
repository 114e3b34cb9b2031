//! Memory protection keys (x86 PKU) between the function instances of one
//! process and the runtime around them: defence in depth inside a
//! `language` worker, where every resident function shares one address
//! space.
//!
//! ```text
//!  key 0 (the default)  everything not keyed below: the runtime's own state
//!                       (rings, slot table, in-flight record, the glibc heap
//!                       with its allocator metadata, worker stack, signal
//!                       stack, TLS, statics) and every function's code
//!  key k (1..=15)       one instance's heap (both arenas), stack, context
//!                       page (host table, heap state, reply buffer) and the
//!                       non-executable segments of its image (rodata,
//!                       RELRO/GOT, data, bss)
//!  key s (one more)     the runtime executable's read-only data: its
//!                       read-only segments (rodata, eh_frame) and its
//!                       RELRO (GOT, vtables), all public and constant
//!  PKRU in the runtime  0: every key readable and writable
//!  PKRU in a function   access- and write-disable for every key but k,
//!                       write-disable only for s
//! ```
//!
//! Key s exists because host services (`host_alloc`, `host_fail`, ...) run
//! compiled Rust on the function's stack with the function's PKRU, and
//! compiled code reads the executable's GOT for calls across codegen
//! units and crates (`call *sym@GOTPCREL(%rip)`, unrelaxed in debug and
//! release builds alike) and its rodata for constants: with those pages on
//! key 0, every such access faults (found by running the keyed path under
//! QEMU's emulated PKU, `scripts/pkeys-under-qemu.sh`). A function can
//! read that data too (addresses of the runtime and libc: code addresses
//! the host table already gives away), never write it; the runtime's state
//! stays on key 0.
//!
//! PKU does not restrict instruction fetch, so code stays key 0 and
//! executable; a function can run another's code but not read it, and that
//! code runs with the caller's rights. A function call goes through
//! [`gate_enter`], a small assembly gate: it saves the runtime's stack
//! pointer in a static (key 0), switches to the instance stack, writes the
//! function's PKRU and calls the entry; the way back (return, or
//! [`gate_bail`] from a host service or a redirected signal) writes PKRU 0
//! with constant operands, checks it, and reloads the stack pointer from
//! that static only — so jumping into the gate's exit never hands the
//! runtime a stack the function made. Nothing the runtime trusts after a
//! call lives in keyed memory: region bounds, the output's location and the
//! message length are re-checked against the runtime's own copies.
//!
//! Keys are few (the kernel hands out 15 per process): a worker allocates
//! them at start ([`allocate_keys`]) and gives each new instance the key
//! with the fewest live instances ([`KeyPool`]); with more resident
//! instances than keys, instances share keys round-robin and can reach each
//! other (what they could without keys: the tenant boundary is the
//! process, this is defence in depth).
//!
//! Signals: the kernel (6.12 and later) writes a signal frame with key 0
//! accessible and runs the handler with its default PKRU (key 0 only);
//! sigreturn restores the interrupted PKRU from the frame. The runtime's
//! handlers call [`open_all_keys`] first, so they can read an instance's
//! context; a redirected context resumes in [`gate_bail`], which writes
//! PKRU 0 itself.
//!
//! Residual risk: code reuse of the runtime's own PKRU writes and system
//! calls (a function with native code can jump to them); the gate's exit is
//! safe to jump to, the clock service's short PKRU-0 window is not (it runs
//! on the function's stack). The artifact verifier refuses `WRPKRU`,
//! `XRSTOR` and `XRSTORS` in function code, and the worker's seccomp filter
//! refuses memory-layout and signal system calls made from outside the
//! worker's own text (see `sandbox::origin`).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Keys the kernel can hand out to one process (key 0 is the default).
pub const MAX_KEYS: usize = 15;

/// PKRU with every key accessible (the runtime's).
pub const RUNTIME_PKRU: u32 = 0;

/// The PKRU value that leaves only `key` accessible: access-disable and
/// write-disable set for every other key, key 0 included. Pure.
pub fn only_key(key: u32) -> u32 {
    let own = 0b11u32.checked_shl(key.saturating_mul(2)).unwrap_or(0);
    !own
}

/// [`only_key`]`(key)`, plus read access (write-disable only) to `shared`,
/// the key of the runtime's read-only data, when there is one. Pure.
pub fn only_key_reading(key: u32, shared: Option<u32>) -> u32 {
    let readable = shared
        .and_then(|s| 0b01u32.checked_shl(s.saturating_mul(2)))
        .unwrap_or(0);
    only_key(key) & !readable
}

/// The PKRU a function with `key` runs with in this process: its own key,
/// and reading the runtime's read-only data (see the module docs).
pub fn function_pkru(key: u32) -> u32 {
    let shared = match SHARED_KEY.load(Ordering::Acquire) {
        0 => None,
        s => Some(s),
    };
    only_key_reading(key, shared)
}

/// The key of the runtime executable's read-only data (0: not set up).
static SHARED_KEY: AtomicU32 = AtomicU32::new(0);

/// A program header's fields that [`readonly_ranges`] needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// `p_type`.
    pub kind: u32,
    /// `p_flags`.
    pub flags: u32,
    /// `p_vaddr` (before the load bias).
    pub vaddr: u64,
    /// `p_memsz`.
    pub memsz: u64,
}

/// The page ranges `[start, end)` of an object loaded at `bias` that carry
/// read-only data: each `PT_LOAD` neither writable nor executable (whole
/// pages), and `PT_GNU_RELRO` as the dynamic loader protects it (start and
/// end rounded down to pages). Empty ranges and overflowing ones are left
/// out. Pure.
pub fn readonly_ranges(bias: u64, segments: &[Segment], page: u64) -> Vec<(u64, u64)> {
    const PT_LOAD: u32 = 1;
    const PT_GNU_RELRO: u32 = 0x6474_e552;
    const PF_X: u32 = 1;
    const PF_W: u32 = 2;
    let down = |a: u64| a - a % page;
    let up = |a: u64| a.checked_add(page - 1).map(down);
    let mut out = Vec::new();
    for seg in segments {
        let Some(start) = bias.checked_add(seg.vaddr) else {
            continue;
        };
        let Some(end) = start.checked_add(seg.memsz) else {
            continue;
        };
        let range = match seg.kind {
            PT_LOAD if seg.flags & (PF_W | PF_X) == 0 => up(end).map(|e| (down(start), e)),
            PT_GNU_RELRO => Some((down(start), down(end))),
            _ => None,
        };
        if let Some((s, e)) = range
            && s < e
        {
            out.push((s, e));
        }
    }
    out
}

/// The program headers of the object (the executable) holding this code,
/// and its load bias, from the dynamic loader (no file access: the worker
/// has none).
fn own_segments() -> io::Result<(u64, Vec<Segment>)> {
    struct Found {
        probe: u64,
        bias: u64,
        segments: Vec<Segment>,
    }
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info and our `data`.
        let (info, found) = unsafe { (&*info, &mut *data.cast::<Found>()) };
        let phdrs: &[libc::Elf64_Phdr] = if info.dlpi_phdr.is_null() {
            &[]
        } else {
            // SAFETY: the loader's program headers of this object,
            // `dlpi_phnum` of them, valid during the callback.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
        };
        let segments: Vec<Segment> = phdrs
            .iter()
            .map(|p| Segment {
                kind: p.p_type,
                flags: p.p_flags,
                vaddr: p.p_vaddr,
                memsz: p.p_memsz,
            })
            .collect();
        let holds_probe = segments.iter().any(|s| {
            s.kind == libc::PT_LOAD
                && s.flags & libc::PF_X != 0
                && info
                    .dlpi_addr
                    .checked_add(s.vaddr)
                    .is_some_and(|a| a <= found.probe && a.checked_add(s.memsz).is_some_and(|e| found.probe < e))
        });
        if holds_probe {
            found.bias = info.dlpi_addr;
            found.segments = segments;
            return 1;
        }
        0
    }
    let mut found = Found {
        probe: only_key as *const () as usize as u64,
        bias: 0,
        segments: Vec::new(),
    };
    // SAFETY: `visit` matches the callback ABI and only reads what the
    // loader hands it; `found` outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&raw mut found).cast()) };
    if found.segments.is_empty() {
        return Err(io::Error::other(
            "the runtime's own object is not among the loaded ones",
        ));
    }
    Ok((found.bias, found.segments))
}

/// Allocates one key and puts the runtime executable's read-only data under
/// it (readable by functions, see [`function_pkru`]); once per process.
fn share_runtime_readonly() -> io::Result<()> {
    if SHARED_KEY.load(Ordering::Acquire) != 0 {
        return Ok(());
    }
    let (bias, segments) = own_segments()?;
    // SAFETY: sysconf has no memory effects.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let ranges = readonly_ranges(bias, &segments, page);
    if ranges.is_empty() {
        return Err(io::Error::other("the runtime has no read-only segment to share"));
    }
    let key = allocate_keys(1)?
        .pop()
        .ok_or_else(|| io::Error::other("no key left for the runtime's read-only data"))?;
    for (start, end) in ranges {
        let (Ok(addr), Ok(len)) = (usize::try_from(start), usize::try_from(end - start)) else {
            return Err(io::Error::other("a read-only segment out of the address space"));
        };
        // SAFETY: read-only pages of this executable, mapped for the whole
        // process; they stay read-only (only their key changes), so no
        // reference into them is invalidated.
        unsafe { pkey_mprotect(addr, len, libc::PROT_READ, key)? };
    }
    SHARED_KEY.store(key, Ordering::Release);
    Ok(())
}

/// Whether the CPU has PKU and the kernel enabled it (CPUID.7.0:ECX.OSPKE).
pub fn cpu_has_ospke() -> bool {
    // Leaf 0 reports the highest leaf; leaf 7 is read only if it exists.
    let max = std::arch::x86_64::__cpuid(0).eax;
    if max < 7 {
        return false;
    }
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    leaf7.ecx & (1 << 4) != 0
}

/// Why keys cannot be used, or that they can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PkeysState {
    /// Switched off by configuration.
    Disabled,
    /// In use with this many keys.
    Enabled {
        /// Keys allocated.
        keys: usize,
    },
    /// Not available on this host.
    Unavailable {
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for PkeysState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Disabled => write!(f, "disabled by config"),
            Self::Enabled { keys } => write!(f, "enabled ({keys} keys)"),
            Self::Unavailable { reason } => write!(f, "unavailable ({reason})"),
        }
    }
}

impl PkeysState {
    /// A compact code for a shared-memory word: 0 disabled, 1 enabled, 2
    /// unavailable.
    pub fn code(&self) -> u32 {
        match self {
            Self::Disabled => 0,
            Self::Enabled { .. } => 1,
            Self::Unavailable { .. } => 2,
        }
    }
}

/// Probes this host: CPUID, then one `pkey_alloc` (freed again).
pub fn probe() -> PkeysState {
    if !cpu_has_ospke() {
        return PkeysState::Unavailable {
            reason: "the CPU has no PKU or the kernel did not enable it (CPUID OSPKE clear)".to_owned(),
        };
    }
    match allocate_keys(1) {
        Ok(keys) if !keys.is_empty() => {
            for k in keys {
                // SAFETY: freeing a key this function just allocated, which
                // nothing uses.
                unsafe { libc::syscall(libc::SYS_pkey_free, libc::c_long::from(k)) };
            }
            PkeysState::Enabled { keys: MAX_KEYS }
        }
        Ok(_) => PkeysState::Unavailable {
            reason: "pkey_alloc gave no key".to_owned(),
        },
        Err(e) => PkeysState::Unavailable {
            reason: format!("pkey_alloc failed: {e}"),
        },
    }
}

/// Allocates up to `max` keys (fewer if the kernel runs out; an error only
/// if the very first `pkey_alloc` fails).
pub fn allocate_keys(max: usize) -> io::Result<Vec<u32>> {
    let mut keys = Vec::new();
    while keys.len() < max.min(MAX_KEYS) {
        // SAFETY: pkey_alloc(flags 0, access rights 0) has no memory effects.
        let k = unsafe { libc::syscall(libc::SYS_pkey_alloc, 0 as libc::c_ulong, 0 as libc::c_ulong) };
        match u32::try_from(k) {
            Ok(k) => keys.push(k),
            Err(_) if keys.is_empty() => return Err(io::Error::last_os_error()),
            Err(_) => break,
        }
    }
    Ok(keys)
}

/// `pkey_mprotect(addr, len, prot, key)` on page-aligned memory the caller
/// owns.
///
/// # Safety
/// `[addr, addr + len)` must be a mapping the caller owns, with no Rust
/// reference into it that the new protection could invalidate.
pub unsafe fn pkey_mprotect(addr: usize, len: usize, prot: libc::c_int, key: u32) -> io::Result<()> {
    // SAFETY: caller contract.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pkey_mprotect,
            addr,
            len,
            libc::c_long::from(prot),
            libc::c_long::from(key),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The key assignment of a worker: each new instance takes the key with the
/// fewest live instances (lowest key first), so instances get keys of their
/// own while there are enough and share evenly past that. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPool {
    keys: Vec<u32>,
    users: Vec<u32>,
}

impl KeyPool {
    /// A pool over allocated `keys`.
    pub fn new(keys: Vec<u32>) -> Self {
        let users = vec![0; keys.len()];
        Self { keys, users }
    }

    /// Keys in the pool.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the pool has no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The least shared key, now used once more; `None` for an empty pool.
    pub fn acquire(&mut self) -> Option<u32> {
        let (i, _) = self.users.iter().enumerate().min_by_key(|&(i, n)| (*n, i))?;
        self.users[i] += 1;
        Some(self.keys[i])
    }

    /// Gives back one use of `key`.
    pub fn release(&mut self, key: u32) {
        if let Some(i) = self.keys.iter().position(|&k| k == key) {
            self.users[i] = self.users[i].saturating_sub(1);
        }
    }

    /// Live instances on `key`.
    pub fn users_of(&self, key: u32) -> u32 {
        self.keys.iter().position(|&k| k == key).map_or(0, |i| self.users[i])
    }
}

/// Set once keys are in use in this process: the signal handlers then open
/// every key before touching an instance's state.
static KEYS_IN_USE: AtomicBool = AtomicBool::new(false);
/// The thread allowed to make gated calls (the gate's saved stack pointer
/// is one static): 0 = none yet.
static GATE_THREAD: AtomicU64 = AtomicU64::new(0);

/// Makes the calling thread the process's one gated thread (the gate's
/// saved stack pointer is one static), without keys.
pub fn claim_gate_for_this_thread() -> io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = u64::try_from(unsafe { libc::gettid() }).unwrap_or(u64::MAX);
    match GATE_THREAD.compare_exchange(0, tid, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Ok(()),
        Err(owner) if owner == tid => Ok(()),
        Err(_) => Err(io::Error::other("the protection-key gate is in use by another thread")),
    }
}

/// Marks keys as in use by the calling thread (only one thread per process
/// may make gated calls) and, the first time, allocates one key for the
/// runtime's read-only data (see the module docs): allocate the instances'
/// keys after this, or leave one free. Call only after checking
/// [`cpu_has_ospke`], with no other thread running: a thread that existed
/// before keeps the kernel's default PKRU, which closes the new key, and
/// faults on its next call through the GOT (threads created later inherit
/// their creator's PKRU; the language worker is single-threaded).
pub fn claim_for_this_thread() -> io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = u64::try_from(unsafe { libc::gettid() }).unwrap_or(u64::MAX);
    match GATE_THREAD.compare_exchange(0, tid, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {}
        Err(owner) if owner == tid => {}
        Err(_) => return Err(io::Error::other("memory protection keys are in use by another thread")),
    }
    share_runtime_readonly()?;
    unregister_rseq()?;
    use_key_safe_imports();
    KEYS_IN_USE.store(true, Ordering::Release);
    Ok(())
}

unsafe extern "C" {
    /// glibc (2.35+): offset of this thread's `struct rseq` from the
    /// thread pointer.
    static __rseq_offset: isize;
    /// glibc: the size glibc registered (0: rseq not registered).
    static __rseq_size: u32;
}

/// `RSEQ_SIG` on x86: the signature glibc registered the area with.
const RSEQ_SIG: u32 = 0x5305_3053;

/// Takes this thread's restartable-sequences area away from the kernel.
///
/// glibc registers a `struct rseq` in every thread's TLS (key 0), and the
/// kernel writes it (the current CPU) on the way back to user space after
/// the thread was scheduled or migrated. Before Linux 6.15 ("rseq: Make
/// rseq work with protection keys") that write uses the thread's PKRU: in
/// the middle of a function call it fails and the kernel kills the thread
/// with SIGSEGV (`SI_KERNEL`), at whatever instruction the function was
/// preempted on. Found under QEMU's emulated PKU
/// (`scripts/pkeys-under-qemu.sh`). glibc reads the area only for
/// `sched_getcpu`, which falls back to the system call once the kernel
/// marks it unregistered.
fn unregister_rseq() -> io::Result<()> {
    // SAFETY: glibc's exported constants, set before `main`.
    let (offset, size) = unsafe { (__rseq_offset, __rseq_size) };
    if size == 0 {
        return Ok(());
    }
    let tp: usize;
    // SAFETY: reads the thread control block's self pointer (`%fs:0`, the
    // thread pointer on x86-64 glibc); no other effect.
    unsafe { std::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly, preserves_flags)) };
    let area = tp.wrapping_add_signed(offset);
    // glibc 2.40+ reports the feature size (20) but registers at least 32.
    for len in [size, size.max(32)] {
        // SAFETY: RSEQ_FLAG_UNREGISTER of the area glibc registered for this
        // thread: the kernel only compares and forgets it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_rseq,
                area,
                libc::c_ulong::from(len),
                1 as libc::c_ulong,
                libc::c_ulong::from(RSEQ_SIG),
            )
        };
        if rc == 0 {
            return Ok(());
        }
    }
    let err = io::Error::last_os_error();
    // Not registered (already done, or glibc's registration failed).
    if err.raw_os_error() == Some(libc::EINVAL) && !rseq_registered(area) {
        return Ok(());
    }
    Err(io::Error::other(format!("unregistering rseq: {err}")))
}

/// Whether this thread's rseq area says it is registered (the kernel keeps
/// `cpu_id` at a CPU number, glibc and unregistration leave it negative).
fn rseq_registered(area: usize) -> bool {
    // `struct rseq`: cpu_id_start (u32), then cpu_id (i32) at offset 4.
    let cpu_id = std::ptr::with_exposed_provenance::<i32>(area.wrapping_add(4));
    // SAFETY: this thread's live rseq area in its TLS, at least 20 bytes.
    unsafe { cpu_id.read_volatile() >= 0 }
}

/// Images loaded from now on import the runtime's own `mem*` (see
/// `super::memfns`): set once keys are claimed, or by
/// [`use_key_safe_imports`].
static KEY_SAFE_IMPORTS: AtomicBool = AtomicBool::new(false);

/// Whether images loaded now import the key-safe `mem*`.
pub fn key_safe_imports() -> bool {
    KEY_SAFE_IMPORTS.load(Ordering::Acquire)
}

/// Makes images loaded from now on import the key-safe `mem*` (done by
/// [`claim_for_this_thread`]; the benchmark and the tests of hosts without
/// PKU call it to run the same code).
pub fn use_key_safe_imports() {
    KEY_SAFE_IMPORTS.store(true, Ordering::Release);
}

/// In a signal handler: if keys are in use, make every key accessible
/// (sigreturn restores the interrupted PKRU). Async-signal-safe.
///
/// The kernel runs handlers with key 0 alone accessible, and the
/// executable's GOT and rodata carry the shared key: a handler must call
/// this first, before any call through the GOT (every call into another
/// crate or codegen unit, `clock_gettime` included). It is one inline
/// assembly block, always inlined, that reads the flag PC-relative (key 0)
/// and so touches nothing else.
#[inline(always)]
pub fn open_all_keys() {
    // SAFETY: reads a key-0 static; WRPKRU runs only once keys are in use,
    // so PKU exists; opening all keys only widens this thread's data
    // access to memory that is mapped anyway.
    unsafe {
        std::arch::asm!(
            "cmp byte ptr [rip + {flag}], 0",
            "je 2f",
            "xor eax, eax",
            "xor ecx, ecx",
            "xor edx, edx",
            "wrpkru",
            "2:",
            flag = sym KEYS_IN_USE,
            out("eax") _,
            out("ecx") _,
            out("edx") _,
            options(nostack),
        );
    }
}

/// The current PKRU. Only where PKU exists.
pub fn rdpkru() -> u32 {
    let pkru: u32;
    // SAFETY: RDPKRU reads a register (ECX must be 0); callers use it only
    // where the CPU has OSPKE.
    unsafe {
        std::arch::asm!("rdpkru", in("ecx") 0u32, out("eax") pkru, out("edx") _, options(nomem, nostack, preserves_flags));
    }
    pkru
}

/// Writes PKRU.
///
/// # Safety
/// Only where the CPU has OSPKE. Restricting keys makes memory of those
/// keys fault on access until PKRU is opened again.
pub unsafe fn wrpkru(pkru: u32) {
    // SAFETY: caller contract.
    unsafe {
        std::arch::asm!("wrpkru", in("eax") pkru, in("ecx") 0u32, in("edx") 0u32, options(nostack, preserves_flags));
    }
}

/// A gated call: `target(rdi, rsi, rdx, rcx)` on the stack ending at
/// `stack_top` with PKRU `pkru`. Layout shared with the assembly below.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct GateCall {
    pub target: usize,
    pub rdi: usize,
    pub rsi: usize,
    pub rdx: usize,
    pub rcx: usize,
    pub stack_top: usize,
    pub pkru: u32,
    /// Whether the gate writes PKRU (false: the `nop` copy, for hosts
    /// without PKU; not read by the assembly).
    pub writes_pkru: bool,
}

/// The runtime's stack pointer while a gated call runs (key 0).
static GATE_RSP: AtomicUsize = AtomicUsize::new(0);
/// The entry's return value (`rax`) after a gated call returned.
static GATE_RAX: AtomicU64 = AtomicU64::new(0);
/// The PKRU of the gated call in progress (for the clock service).
static GATE_PKRU: AtomicU32 = AtomicU32::new(RUNTIME_PKRU);

// The gate. Entry: save callee-saved registers, MXCSR and the x87 control
// word on the runtime stack, the stack pointer in GATE_RSP; switch to the
// function stack, write the function's PKRU, call. Exit (return, or the
// bail entry): PKRU 0 from constants, checked (a jump straight to the
// WRPKRU with another EAX ends in ud2), the stack pointer reloaded from
// GATE_RSP (never from the function's registers or memory), the trap,
// direction and alignment-check flags cleared,
// state restored; returns 0 after a return (rax in GATE_RAX), 1 after a
// bail. Two copies: with WRPKRU, and with `nop` in its place for hosts
// without PKU (the same control flow, exercised by the tests there).
macro_rules! gate_asm {
    ($enter:literal, $bail:literal, $wrpkru:literal) => {
        std::arch::global_asm!(
            ".pushsection .text.microfaas_gate,\"ax\",@progbits",
            ".p2align 4",
            concat!(".globl ", $enter),
            concat!(".hidden ", $enter),
            concat!(".type ", $enter, ", @function"),
            concat!($enter, ":"),
            "push rbp",
            "push rbx",
            "push r12",
            "push r13",
            "push r14",
            "push r15",
            "sub rsp, 8",
            "stmxcsr [rsp]",
            "fnstcw [rsp + 4]",
            "mov [rip + {rsp_slot}], rsp",
            "mov r10, [rdi]",
            "mov r11, [rdi + 40]",
            "mov r12, [rdi + 24]",
            "mov r13, [rdi + 32]",
            "mov r14d, [rdi + 48]",
            "mov rsi, [rdi + 16]",
            "mov rdi, [rdi + 8]",
            "mov rsp, r11",
            "mov eax, r14d",
            "xor ecx, ecx",
            "xor edx, edx",
            $wrpkru,
            "mov rdx, r12",
            "mov rcx, r13",
            "call r10",
            "mov r8, rax",
            "xor ecx, ecx",
            "xor edx, edx",
            "xor eax, eax",
            $wrpkru,
            "test eax, eax",
            "jnz 3f",
            "mov rsp, [rip + {rsp_slot}]",
            // The function's TF, DF and AC flags stay behind (POPFQ, the
            // slow part, only when one is set).
            "pushfq",
            "test dword ptr [rsp], 0x40500",
            "jz 5f",
            "and dword ptr [rsp], 0xfffbfaff",
            "popfq",
            "jmp 6f",
            "5:",
            "add rsp, 8",
            "6:",
            "mov [rip + {rax_slot}], r8",
            "xor eax, eax",
            "jmp 2f",
            ".p2align 4",
            concat!(".globl ", $bail),
            concat!(".hidden ", $bail),
            concat!(".type ", $bail, ", @function"),
            concat!($bail, ":"),
            "xor ecx, ecx",
            "xor edx, edx",
            "xor eax, eax",
            $wrpkru,
            "test eax, eax",
            "jnz 3f",
            "mov rsp, [rip + {rsp_slot}]",
            "pushfq",
            "test dword ptr [rsp], 0x40500",
            "jz 5f",
            "and dword ptr [rsp], 0xfffbfaff",
            "popfq",
            "jmp 6f",
            "5:",
            "add rsp, 8",
            "6:",
            "mov eax, 1",
            "2:",
            "ldmxcsr [rsp]",
            "fldcw [rsp + 4]",
            "add rsp, 8",
            "pop r15",
            "pop r14",
            "pop r13",
            "pop r12",
            "pop rbx",
            "pop rbp",
            "ret",
            "3:",
            "ud2",
            ".popsection",
            rsp_slot = sym GATE_RSP,
            rax_slot = sym GATE_RAX,
        );
    };
}

gate_asm!("microfaas_gate_enter", "microfaas_gate_bail", "wrpkru");
gate_asm!("microfaas_gate_enter_nokeys", "microfaas_gate_bail_nokeys", "nop");

unsafe extern "sysv64" {
    fn microfaas_gate_enter(call: *const GateCall) -> u64;
    fn microfaas_gate_bail() -> !;
    fn microfaas_gate_enter_nokeys(call: *const GateCall) -> u64;
    fn microfaas_gate_bail_nokeys() -> !;
}

/// The bail entry of the gated call in progress (key 0; read by the signal
/// handlers once the keys are open).
static BAIL_ADDR: AtomicUsize = AtomicUsize::new(0);

/// How a gated call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GateExit {
    /// The entry returned this `rax`.
    Returned(u64),
    /// It left through [`gate_bail`].
    Bailed,
}

/// Makes the gated call `call`.
///
/// # Safety
/// Only on the thread that [`claim_for_this_thread`]ed, not nested, with
/// PKU present; `call.stack_top` must end a 16-byte aligned stack the
/// callee may use whose memory carries the key `call.pkru` opens, and
/// `call.target` the entry of a loaded function taking those arguments.
pub(crate) unsafe fn gate_enter(call: &GateCall) -> GateExit {
    GATE_PKRU.store(call.pkru, Ordering::Relaxed);
    let (enter, bail): (unsafe extern "sysv64" fn(*const GateCall) -> u64, usize) = if call.writes_pkru {
        (microfaas_gate_enter, microfaas_gate_bail as *const () as usize)
    } else {
        (
            microfaas_gate_enter_nokeys,
            microfaas_gate_bail_nokeys as *const () as usize,
        )
    };
    BAIL_ADDR.store(bail, Ordering::Relaxed);
    // SAFETY: caller contract; the gate restores every callee-saved
    // register and the runtime's stack before it returns.
    let how = unsafe { enter(call) };
    GATE_PKRU.store(RUNTIME_PKRU, Ordering::Relaxed);
    if how == 0 {
        GateExit::Returned(GATE_RAX.load(Ordering::Relaxed))
    } else {
        GateExit::Bailed
    }
}

/// The address a redirected signal context resumes at to leave the gated
/// call in progress.
pub(crate) fn bail_address() -> usize {
    BAIL_ADDR.load(Ordering::Relaxed)
}

/// Leaves the gated call in progress from a host service running on the
/// function stack (`fail`, a deferred preemption).
///
/// `with_keys`: the call's gate writes PKRU (the context says so; a
/// function that lies about it only breaks its own call).
///
/// # Safety
/// Only inside a gated call, on its thread.
pub(crate) unsafe fn gate_bail(with_keys: bool) -> ! {
    // SAFETY: caller contract: GATE_RSP holds the runtime's stack of the
    // call in progress.
    unsafe {
        if with_keys {
            microfaas_gate_bail()
        } else {
            microfaas_gate_bail_nokeys()
        }
    }
}

/// For a host service inside a gated call: runs `f` with every key open,
/// then goes back to the call's PKRU (read from the runtime's static, not
/// from anything the function controls).
///
/// # Safety
/// Only inside a gated call; `f` must not touch keyed memory the function
/// could have corrupted in a way `f` relies on.
pub(crate) unsafe fn with_runtime_keys<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: PKU exists inside a gated call.
    unsafe { wrpkru(RUNTIME_PKRU) };
    let out = f();
    // SAFETY: as above; back to the call's own rights.
    unsafe { wrpkru(GATE_PKRU.load(Ordering::Relaxed)) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkru_values() {
        assert_eq!(only_key(0), 0xffff_fffc);
        assert_eq!(only_key(1), 0xffff_fff3);
        assert_eq!(only_key(15), 0x3fff_ffff);
        for k in 0..16 {
            let p = only_key(k);
            for other in 0..16 {
                let bits = (p >> (2 * other)) & 3;
                assert_eq!(bits, if other == k { 0 } else { 3 }, "key {k}, bits of {other}");
            }
        }
    }

    #[test]
    fn the_shared_key_is_readable_not_writable() {
        assert_eq!(only_key_reading(3, None), only_key(3));
        let p = only_key_reading(3, Some(15));
        assert_eq!((p >> 30) & 3, 0b10, "key 15: write-disable only");
        assert_eq!((p >> 6) & 3, 0, "own key open");
        assert_eq!(p & 3, 3, "key 0 closed");
        assert_eq!(p | (0b01 << 30), only_key(3));
        assert_eq!(
            only_key_reading(3, Some(99)),
            only_key(3),
            "no such key: nothing opened"
        );
    }

    #[test]
    fn rseq_is_unregistered_for_the_gated_thread_only() {
        // SAFETY: glibc's exported constant.
        if unsafe { __rseq_size } == 0 {
            eprintln!("glibc did not register rseq here: nothing to take away");
            return;
        }
        let area = || {
            let tp: usize;
            // SAFETY: as in `unregister_rseq`.
            unsafe { std::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly, preserves_flags)) };
            // SAFETY: glibc's exported constant.
            tp.wrapping_add_signed(unsafe { __rseq_offset })
        };
        std::thread::spawn(move || {
            assert!(rseq_registered(area()), "glibc registered this thread");
            unregister_rseq().unwrap();
            assert!(!rseq_registered(area()), "the kernel forgot it");
            unregister_rseq().expect("a second time is a no-op");
        })
        .join()
        .unwrap();
        std::thread::spawn(move || assert!(rseq_registered(area()), "other threads keep theirs"))
            .join()
            .unwrap();
    }

    #[test]
    fn readonly_ranges_cover_rodata_and_relro() {
        let seg = |kind, flags, vaddr, memsz| Segment {
            kind,
            flags,
            vaddr,
            memsz,
        };
        let segments = [
            seg(6, 4, 0x40, 0x2a0),                   // PT_PHDR: not a load
            seg(1, 4, 0, 0x1_2345),                   // rodata (R)
            seg(1, 5, 0x1_3345, 0x10_0000),           // text (R+X)
            seg(1, 6, 0x11_4345, 0x2_0000),           // data (R+W)
            seg(0x6474_e552, 4, 0x11_4345, 0x1_1cbb), // RELRO inside it
            seg(1, 4, 0x20_0000, 0),                  // empty
            seg(1, 4, u64::MAX, 2),                   // overflows
        ];
        let bias = 0x5555_5555_4000;
        assert_eq!(
            readonly_ranges(bias, &segments, 0x1000),
            [(bias, bias + 0x1_3000), (bias + 0x11_4000, bias + 0x12_6000),]
        );
        // RELRO shorter than its first page protects nothing (as the loader).
        assert!(readonly_ranges(0, &[seg(0x6474_e552, 4, 0x1100, 0x100)], 0x1000).is_empty());
    }

    #[test]
    fn keys_are_shared_evenly_once_exhausted() {
        let mut pool = KeyPool::new(vec![1, 2, 3]);
        let first: Vec<u32> = (0..3).map(|_| pool.acquire().unwrap()).collect();
        assert_eq!(first, [1, 2, 3], "a key of its own while there are enough");
        assert_eq!(pool.acquire(), Some(1), "then round robin");
        assert_eq!(pool.acquire(), Some(2));
        pool.release(1);
        pool.release(1);
        assert_eq!(pool.users_of(1), 0);
        assert_eq!(pool.acquire(), Some(1), "a freed key first");
        pool.release(99);
        assert_eq!(KeyPool::new(Vec::new()).acquire(), None);
    }

    #[test]
    fn state_is_reported_in_words() {
        assert_eq!(PkeysState::Enabled { keys: 15 }.to_string(), "enabled (15 keys)");
        assert_eq!(PkeysState::Disabled.to_string(), "disabled by config");
        let u = PkeysState::Unavailable {
            reason: "no PKU".into(),
        };
        assert_eq!(u.to_string(), "unavailable (no PKU)");
        assert_eq!((PkeysState::Disabled.code(), u.code()), (0, 2));
    }
}

//! The x86-64 pieces of the kernel: entry, CPL0 fault stubs, the MMIO
//! doorbell and log, the TSC, and the `mem*` functions the kernel and the
//! function artifacts link to.

use guest_abi::{LOG_BYTES, LOG_OFFSET, MAILBOX_ADDR, REG_CHECKPOINT, REG_DOORBELL, REG_FAULT, REG_LOG};

// Entry (CPL3): the VMM sets rsp = stack top (16-byte aligned) and rdi =
// boot info, so the call leaves the ABI's alignment for kernel_main.
core::arch::global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "    call {main}",
    "    ud2",
    main = sym crate::runtime::kernel_main,
);

// CPL0 fault stubs, one per vector, FAULT_STUB_STRIDE (16) bytes apart from
// FAULT_STUBS_ADDR (the linker script puts this section there, in its own
// segment, which the VMM maps supervisor-only and read-only). Each pushes an
// error code when the CPU does not, then the vector, and writes the vector to
// the MMIO fault register (a supervisor-only page); the host reads the rest
// of the frame from the fault stack. They read nothing CPL3 can write.
// Runs emulated on this host's KVM: keep it a handful of instructions.
core::arch::global_asm!(
    ".section .text.fault_stubs, \"ax\"",
    ".global fault_stubs",
    "fault_stubs:",
    ".set vec, 0",
    ".rept 32",
    ".balign 16",
    ".if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)",
    ".else",
    "    pushq $0",
    ".endif",
    "    pushq $vec",
    "    jmp 2f",
    ".set vec, vec + 1",
    ".endr",
    ".balign 16",
    "2:",
    "    movl (%rsp), %eax",
    "    movl %eax, {fault_reg}",
    "3:",
    "    hlt",
    "    jmp 3b",
    fault_reg = const REG_FAULT,
    options(att_syntax),
);

/// Rings the doorbell: tells the host the request `seq` is answered (0 at
/// boot) and blocks until the host resumes the vCPU with the next one.
pub fn doorbell(seq: u32) {
    // SAFETY: the doorbell register is an MMIO page the page tables map
    // user-writable; the write only exits to the VMM.
    unsafe { (REG_DOORBELL as *mut u32).write_volatile(seq) }
}

/// Stops at a checkpoint of request `seq`: the host snapshots the guest
/// here and resumes it.
pub fn checkpoint(seq: u32) {
    // SAFETY: as in `doorbell`: an MMIO register, the write only exits.
    unsafe { (REG_CHECKPOINT as *mut u32).write_volatile(seq) }
}

/// Writes `bytes` to the guest log (the serial console): copies them to the
/// log area and flushes with one MMIO exit per 2 KiB.
pub fn serial_write(bytes: &[u8]) {
    #[allow(clippy::cast_possible_truncation, reason = "2 KiB fits any usize")]
    const CHUNK: usize = LOG_BYTES as usize;
    for chunk in bytes.chunks(CHUNK) {
        // SAFETY: the log area is the upper half of the mailbox page, mapped
        // user-writable and used by nothing else; `chunk` fits it.
        unsafe {
            core::ptr::copy_nonoverlapping(chunk.as_ptr(), (MAILBOX_ADDR + LOG_OFFSET) as *mut u8, chunk.len());
            (REG_LOG as *mut u32).write_volatile(u32::try_from(chunk.len()).unwrap_or(0));
        }
    }
}

/// Reads the TSC (native at CPL3 here).
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: `rdtsc` only reads the time-stamp counter (CR4.TSD is clear).
    unsafe {
        core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Stops with an invalid-opcode fault, which the host reports.
pub fn abort() -> ! {
    // SAFETY: `ud2` raises #UD; the CPL0 stub reports it and never returns.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}

// The mem* functions: the kernel's own (no libc here) and the ones function
// artifacts' imports resolve to (the host reads their addresses from the
// kernel's symbol table; `.text.imports` is kept by the linker script, as
// the kernel itself may not call all of them). String instructions, so the
// compiler cannot turn them back into calls to themselves.

/// # Safety
/// `dst` and `src` valid for `n` bytes, not overlapping.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.imports")]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: caller contract; `rep movsb` copies exactly `n` bytes forward.
    unsafe {
        core::arch::asm!(
            "rep movsb",
            inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _,
            options(nostack, preserves_flags)
        );
    }
    dst
}

/// # Safety
/// `dst` and `src` valid for `n` bytes; they may overlap.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.imports")]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // No harmful overlap for a forward copy.
        // SAFETY: caller contract.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: caller contract; copies backwards with DF set, then clears it.
    unsafe {
        core::arch::asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rdi") dst.wrapping_add(n).wrapping_sub(1) => _,
            inout("rsi") src.wrapping_add(n).wrapping_sub(1) => _,
            inout("rcx") n => _,
            options(nostack)
        );
    }
    dst
}

/// # Safety
/// `dst` valid for `n` bytes.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.imports")]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: caller contract; `rep stosb` writes exactly `n` bytes. Only
    // the low byte of `c` is used, as C specifies.
    unsafe {
        core::arch::asm!(
            "rep stosb",
            inout("rdi") dst => _, inout("rcx") n => _, in("al") c.to_le_bytes()[0],
            options(nostack, preserves_flags)
        );
    }
    dst
}

/// # Safety
/// `a` and `b` valid for `n` bytes.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.imports")]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: caller contract, `i < n`.
        let (x, y) = unsafe { (a.add(i).read(), b.add(i).read()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// `a` and `b` valid for `n` bytes.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.imports")]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: caller contract.
    unsafe { memcmp(a, b, n) }
}

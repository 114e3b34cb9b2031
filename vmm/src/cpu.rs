//! The guest's privileged state, prepared from the host so the guest never
//! runs CPL0 code to set it up: GDT, TSS, IDT, control registers, and the
//! CPL3 entry registers. Pure functions over `kvm_bindings` structures.

use crate::layout::{FAULT_STACK_TOP, GDT_ADDR, IDT_ADDR, PAGE_TABLES_ADDR, TSS_ADDR};
use guest_abi::{BOOT_INFO_ADDR, FAULT_STUB_STRIDE, FAULT_STUBS_ADDR, FAULT_VECTORS};
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_xcrs};

/// Kernel 64-bit code selector (fault stubs).
pub const KERNEL_CS: u16 = 0x08;
/// User data selector (RPL 3).
pub const USER_DS: u16 = 0x18 | 3;
/// User 64-bit code selector (RPL 3).
pub const USER_CS: u16 = 0x20 | 3;
/// TSS selector.
pub const TSS_SEL: u16 = 0x28;
/// TSS size minus one.
const TSS_LIMIT: u32 = 103;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const RFLAGS_FIXED: u64 = 1 << 1;

/// The GDT: null, kernel code/data, user data/code, then the 16-byte TSS
/// descriptor. Accessed bits are preset so the CPU never writes the table.
pub fn gdt() -> [u64; 7] {
    let tss_low = u64::from(TSS_LIMIT & 0xffff)
        | ((TSS_ADDR & 0xff_ffff) << 16)
        | (0x8b << 40) // present, busy 64-bit TSS
        | (u64::from((TSS_LIMIT >> 16) & 0xf) << 48)
        | (((TSS_ADDR >> 24) & 0xff) << 56);
    [
        0,
        0x00af_9b00_0000_ffff, // kernel code, 64-bit, DPL0
        0x00cf_9300_0000_ffff, // kernel data
        0x00cf_f300_0000_ffff, // user data, DPL3
        0x00af_fb00_0000_ffff, // user code, 64-bit, DPL3
        tss_low,
        TSS_ADDR >> 32,
    ]
}

/// The 64-bit TSS: RSP0 and IST1 at the fault stack top, no I/O bitmap
/// (the guest has no port I/O: its doorbell is MMIO).
pub fn tss() -> [u8; 104] {
    let mut t = [0u8; 104];
    t[4..12].copy_from_slice(&FAULT_STACK_TOP.to_le_bytes()); // rsp0
    t[36..44].copy_from_slice(&FAULT_STACK_TOP.to_le_bytes()); // ist1
    t[102..104].copy_from_slice(&104u16.to_le_bytes()); // I/O map base: none
    t
}

/// The IDT: vectors 0..32 as DPL0 interrupt gates on IST1 into the kernel's
/// fault stubs (so `int n` from CPL3 is a #GP for every vector; 32 and up
/// lie past the IDT limit, also a #GP).
pub fn idt() -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * 32);
    for v in 0..FAULT_VECTORS {
        let handler = FAULT_STUBS_ADDR + v * FAULT_STUB_STRIDE;
        let low = (handler & 0xffff)
            | (u64::from(KERNEL_CS) << 16)
            | (1 << 32) // IST1
            | (0x8e << 40) // present, DPL0, interrupt gate
            | (((handler >> 16) & 0xffff) << 48);
        out.extend_from_slice(&low.to_le_bytes());
        out.extend_from_slice(&(handler >> 32).to_le_bytes());
    }
    out
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// CPU features the guest's control registers use when the host has them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// XSAVE (CR4.OSXSAVE, for AVX state).
    pub xsave: bool,
    /// SMEP: CPL0 never executes a user page.
    pub smep: bool,
    /// SMAP: CPL0 never reads or writes a user page.
    pub smap: bool,
}

/// `base` (the vCPU's current sregs) set up for 64-bit CPL3 execution.
/// EFER.SCE is clear (no `syscall`/`sysret`); with `features`, SMEP and
/// SMAP keep CPL0 (the fault stubs) off every user page.
pub fn cpl3_sregs(mut s: kvm_sregs, features: Features) -> kvm_sregs {
    s.cs = segment(USER_CS, true);
    let data = segment(USER_DS, false);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: TSS_ADDR,
        limit: TSS_LIMIT,
        selector: TSS_SEL,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.ldt = kvm_segment {
        type_: 0x2,
        present: 1,
        unusable: 1,
        ..kvm_segment::default()
    };
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = 7 * 8 - 1;
    s.idt.base = IDT_ADDR;
    s.idt.limit = u16::try_from(FAULT_VECTORS * 16 - 1).unwrap_or(u16::MAX);
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    s.cr3 = PAGE_TABLES_ADDR;
    let flag = |on: bool, bit: u64| if on { bit } else { 0 };
    s.cr4 = CR4_PAE
        | CR4_OSFXSR
        | CR4_OSXMMEXCPT
        | flag(features.xsave, CR4_OSXSAVE)
        | flag(features.smep, CR4_SMEP)
        | flag(features.smap, CR4_SMAP);
    s.efer = EFER_LME | EFER_LMA | EFER_NXE;
    s
}

/// The CPL3 entry registers: `entry` with the stack at `stack_top` and the
/// boot info address in `rdi`; IOPL=0, interrupts off.
pub fn entry_regs(entry: u64, stack_top: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: stack_top,
        rdi: BOOT_INFO_ADDR,
        rflags: RFLAGS_FIXED,
        ..kvm_regs::default()
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;

/// The system-call MSRs, all 0: `syscall` (which this host's PVM runs at
/// CPL3 by jumping to LSTAR without EFER.SCE) lands on the unmapped null
/// page, and `sysenter` has no code selector (#GP). A fresh vCPU has these
/// values too (KVM resets them), so restored instances need no write.
pub fn syscall_msrs() -> [kvm_msr_entry; 7] {
    [
        MSR_IA32_SYSENTER_CS,
        MSR_IA32_SYSENTER_ESP,
        MSR_IA32_SYSENTER_EIP,
        MSR_STAR,
        MSR_LSTAR,
        MSR_CSTAR,
        MSR_SYSCALL_MASK,
    ]
    .map(|index| kvm_msr_entry {
        index,
        data: 0,
        ..Default::default()
    })
}

/// x87/SSE reset state.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..kvm_fpu::default()
    }
}

/// XCR0 with x87, SSE and, where the host supports them, AVX and AVX-512
/// state, from CPUID leaf 0xD sub-leaf 0's `eax` (supported XCR0 bits).
pub fn xcr0(supported_low: u32) -> u64 {
    let s = u64::from(supported_low);
    let mut v = 0b11; // x87 | SSE
    if s & 0b100 != 0 {
        v |= 0b100; // AVX
        if s & 0xe0 == 0xe0 {
            v |= 0xe0; // opmask | ZMM_Hi256 | Hi16_ZMM
        }
    }
    v
}

/// A `kvm_xcrs` setting XCR0 to `value`.
pub fn xcrs(value: u64) -> kvm_xcrs {
    let mut x = kvm_xcrs {
        nr_xcrs: 1,
        ..kvm_xcrs::default()
    };
    x.xcrs[0].xcr = 0;
    x.xcrs[0].value = value;
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idt_points_at_the_stubs() {
        let idt = idt();
        assert_eq!(idt.len(), 512);
        let gate = |v: usize| {
            let lo = u64::from_le_bytes(idt[v * 16..v * 16 + 8].try_into().unwrap());
            let hi = u64::from_le_bytes(idt[v * 16 + 8..v * 16 + 16].try_into().unwrap());
            (lo & 0xffff) | (((lo >> 48) & 0xffff) << 16) | (hi << 32)
        };
        assert_eq!(gate(0), FAULT_STUBS_ADDR);
        assert_eq!(gate(14), FAULT_STUBS_ADDR + 14 * FAULT_STUB_STRIDE);
        for v in 0..32 {
            let lo = u64::from_le_bytes(idt[v * 16..v * 16 + 8].try_into().unwrap());
            assert_eq!((lo >> 45) & 3, 0, "vector {v}: DPL0, so `int {v}` at CPL3 is a #GP");
            assert_eq!((lo >> 16) & 0xffff, u64::from(KERNEL_CS));
        }
    }

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let g = gdt();
        assert_eq!(g[5] & 0xffff, u64::from(TSS_LIMIT));
        assert_eq!((g[5] >> 16) & 0xff_ffff, TSS_ADDR & 0xff_ffff);
        assert_eq!((g[5] >> 40) & 0xff, 0x8b);
        let t = tss();
        assert_eq!(u64::from_le_bytes(t[4..12].try_into().unwrap()), FAULT_STACK_TOP);
    }

    #[test]
    fn user_segments_are_ring3() {
        let s = cpl3_sregs(
            kvm_sregs::default(),
            Features {
                xsave: true,
                smep: true,
                smap: true,
            },
        );
        assert_ne!(s.cr4 & CR4_SMEP, 0);
        assert_ne!(s.cr4 & CR4_SMAP, 0);
        assert_eq!(s.efer & 1, 0, "EFER.SCE clear");
        assert_eq!(s.cs.dpl, 3);
        assert_eq!(s.cs.selector & 3, 3);
        assert_eq!(s.ss.selector & 3, 3);
        assert_eq!(s.cs.l, 1);
        assert_ne!(s.cr4 & CR4_OSXSAVE, 0);
        assert_eq!(entry_regs(1, 2).rflags, RFLAGS_FIXED);
    }

    #[test]
    fn xcr0_follows_support() {
        assert_eq!(xcr0(0b11), 0b11);
        assert_eq!(xcr0(0b111), 0b111);
        assert_eq!(xcr0(0xe7), 0xe7);
        assert_eq!(xcr0(0x67), 0b111);
    }
}

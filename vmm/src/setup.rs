//! Building a fresh instance's guest memory contents and calibration from
//! the host: memory slots, GDT/IDT/TSS, page tables, the guest kernel ELF,
//! and the boot info with the guest clock's TSC calibration.

use crate::cpu;
use crate::error::VmmError;
use crate::layout::{GDT_ADDR, IDT_ADDR, Layout, PAGE_TABLES_ADDR, PAGE_TABLES_END, TSS_ADDR};
use crate::memory::GuestRam;
use crate::paging::PageTables;
use crate::{GUEST_KERNEL, instance::kvm_err, instance::monotonic_ns};
use guest_abi::{
    BOOT_INFO_ADDR, BOOT_MAGIC, BootInfo, CHANNEL_ABI_VERSION, FAULT_MMIO_ADDR, KERNEL_LIMIT, KERNEL_TEXT_ADDR,
    MAILBOX_ADDR, MMIO_ADDR, PAGE_BYTES,
};
use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::VcpuFd;
use linux_loader::loader::{KernelLoader, elf::Elf};
use std::io::Cursor;
use vm_memory::{Bytes, GuestAddress};

const MSR_IA32_TSC: u32 = 0x10;

/// The KVM memory slots backed by guest RAM (slot, start, end): all of
/// guest memory but the fault-register and doorbell pages (which no slot
/// backs, so that writes to them exit) and the mailbox page and I/O window
/// (backed by the instance's channel slab slot, [`channel_slots`]).
pub(crate) fn memory_slots(layout: &Layout) -> [(u32, u64, u64); 4] {
    const _: () = assert!(FAULT_MMIO_ADDR + PAGE_BYTES == MMIO_ADDR);
    const _: () = assert!(MAILBOX_ADDR + PAGE_BYTES < FAULT_MMIO_ADDR);
    [
        (0, 0, MAILBOX_ADDR),
        (1, MAILBOX_ADDR + PAGE_BYTES, FAULT_MMIO_ADDR),
        (2, MMIO_ADDR + PAGE_BYTES, layout.io_addr),
        (3, layout.io_addr + layout.io_bytes, layout.mem_bytes),
    ]
}

/// The KVM memory slots backed by the channel slab (slot, start, end): the
/// mailbox page and the I/O window.
pub(crate) fn channel_slots(layout: &Layout) -> [(u32, u64, u64); 2] {
    [
        (4, MAILBOX_ADDR, MAILBOX_ADDR + PAGE_BYTES),
        (5, layout.io_addr, layout.io_addr + layout.io_bytes),
    ]
}

/// Writes the GDT, IDT, TSS, page tables and the guest kernel; returns the
/// kernel's entry point.
pub(crate) fn write_system_state(ram: &GuestRam, layout: &Layout) -> Result<u64, VmmError> {
    let mem = ram.mem();
    let w = |bytes: &[u8], addr: u64| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(VmmError::GuestMemory)
    };
    let gdt: Vec<u8> = cpu::gdt().iter().flat_map(|d| d.to_le_bytes()).collect();
    w(&gdt, GDT_ADDR)?;
    w(&cpu::idt(), IDT_ADDR)?;
    w(&cpu::tss(), TSS_ADDR)?;
    let max_pages = usize::try_from((PAGE_TABLES_END - PAGE_TABLES_ADDR) / PAGE_BYTES).unwrap_or(0);
    let tables = PageTables::build(&layout.regions(), layout.mem_bytes, PAGE_TABLES_ADDR, max_pages)?;
    w(&tables.to_bytes(), PAGE_TABLES_ADDR)?;
    let loaded = Elf::load(
        mem,
        None,
        &mut Cursor::new(GUEST_KERNEL),
        Some(GuestAddress(KERNEL_TEXT_ADDR)),
    )
    .map_err(VmmError::Kernel)?;
    if loaded.kernel_end > KERNEL_LIMIT {
        return Err(VmmError::KernelTooLarge { end: loaded.kernel_end });
    }
    Ok(loaded.kernel_load.0)
}

/// The guest's TSC offset from (host TSC before, guest TSC, host TSC after)
/// samples: 0 when every sample allows it (KVM applies no offset, as under
/// PVM, where CPL3 `rdtsc` is the host's), else the midpoint of the
/// narrowest sample.
pub(crate) fn tsc_offset(samples: &[(u64, u64, u64)]) -> u64 {
    if samples
        .iter()
        .all(|&(before, guest, after)| before <= guest && guest <= after)
    {
        return 0;
    }
    samples
        .iter()
        .min_by_key(|&&(before, _, after)| after.wrapping_sub(before))
        .map_or(0, |&(before, guest, after)| {
            guest.wrapping_sub(before.wrapping_add(after.wrapping_sub(before) / 2))
        })
}

pub(crate) fn host_rdtsc() -> u64 {
    // SAFETY: `rdtsc` only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Writes the boot info, with a TSC calibration read from the vCPU; returns
/// the guest's TSC offset from the host's (read between two host TSC reads,
/// the best of a few tries).
pub(crate) fn write_boot_info(
    ram: &GuestRam,
    layout: &Layout,
    vcpu: &VcpuFd,
    idle_spin_us: u32,
) -> Result<u64, VmmError> {
    let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
    let tsc_offset = measure_tsc_offset(vcpu)?;
    let tsc_base = host_rdtsc().wrapping_add(tsc_offset);
    let mono_base_ns = monotonic_ns();
    let info = BootInfo {
        magic: BOOT_MAGIC,
        abi_version: CHANNEL_ABI_VERSION,
        idle_spin_us,
        mailbox_addr: MAILBOX_ADDR,
        io_addr: layout.io_addr,
        io_bytes: layout.io_bytes,
        image_addr: layout.image_addr,
        image_bytes: layout.image_bytes,
        heap_addr: layout.heap_addr,
        heap_bytes: layout.heap_bytes,
        stack_bottom: layout.stack_bottom,
        stack_top: layout.stack_top,
        tsc_base,
        mono_base_ns,
        ns_per_tsc_q32: ns_per_tsc_q32(tsc_khz),
    };
    ram.mem()
        .write_slice(&boot_info_bytes(&info), GuestAddress(BOOT_INFO_ADDR))
        .map_err(VmmError::GuestMemory)?;
    Ok(tsc_offset)
}

/// The guest's TSC offset from the host's, read from the vCPU between two
/// host TSC reads (the best of a few tries).
pub(crate) fn measure_tsc_offset(vcpu: &VcpuFd) -> Result<u64, VmmError> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .map_err(|_| VmmError::Kvm {
        op: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let mut samples = [(0u64, 0u64, 0u64); 3];
    for sample in &mut samples {
        let before = host_rdtsc();
        vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        let after = host_rdtsc();
        *sample = (before, msrs.as_slice()[0].data, after);
    }
    Ok(tsc_offset(&samples))
}

/// The 32.32 ns-per-tick multiplier for a TSC of `tsc_khz` kHz.
pub(crate) fn ns_per_tsc_q32(tsc_khz: u32) -> u64 {
    if tsc_khz == 0 {
        0
    } else {
        (1_000_000u64 << 32) / u64::from(tsc_khz)
    }
}

pub(crate) fn boot_info_bytes(info: &BootInfo) -> Vec<u8> {
    let mut b = Vec::with_capacity(std::mem::size_of::<BootInfo>());
    b.extend_from_slice(&info.magic.to_le_bytes());
    b.extend_from_slice(&info.abi_version.to_le_bytes());
    b.extend_from_slice(&info.idle_spin_us.to_le_bytes());
    for v in [
        info.mailbox_addr,
        info.io_addr,
        info.io_bytes,
        info.image_addr,
        info.image_bytes,
        info.heap_addr,
        info.heap_bytes,
        info.stack_bottom,
        info.stack_top,
        info.tsc_base,
        info.mono_base_ns,
        info.ns_per_tsc_q32,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_offset_is_zero_when_consistent() {
        assert_eq!(tsc_offset(&[(100, 150, 200), (300, 300, 310)]), 0);
    }

    #[test]
    fn tsc_offset_uses_the_narrowest_sample() {
        // Guest TSC runs 1000 ahead; the second sample is the tightest.
        assert_eq!(tsc_offset(&[(100, 1150, 200), (300, 1305, 310)]), 1000);
        // ...or behind (wrapping arithmetic).
        assert_eq!(tsc_offset(&[(5000, 4005, 5010)]), 0u64.wrapping_sub(1000));
    }

    #[test]
    fn kernel_segments_lie_in_regions_with_their_rights() {
        let k = crate::GUEST_KERNEL;
        let u16_at = |o: usize| u16::from_le_bytes(k[o..o + 2].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(k[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(k[o..o + 8].try_into().unwrap());
        let (phoff, phnum) = (usize::try_from(u64_at(32)).unwrap(), usize::from(u16_at(56)));
        let layout = crate::layout::small_test_layout();
        let regions = layout.regions();
        let mut loads = 0;
        for i in 0..phnum {
            let ph = phoff + i * 56;
            if u32_at(ph) != 1 {
                continue;
            }
            loads += 1;
            let (flags, vaddr, memsz) = (u32_at(ph + 4), u64_at(ph + 16), u64_at(ph + 40));
            let region = regions
                .iter()
                .find(|r| vaddr >= r.start && vaddr + memsz <= r.start + r.len)
                .unwrap_or_else(|| panic!("kernel segment {vaddr:#x}+{memsz:#x} outside every region"));
            assert_eq!(region.access.exec, flags & 1 != 0, "segment at {vaddr:#x}");
            assert_eq!(region.access.write, flags & 2 != 0, "segment at {vaddr:#x}");
            assert_eq!(
                region.access.user,
                vaddr != guest_abi::FAULT_STUBS_ADDR,
                "only the fault stubs are supervisor code: {vaddr:#x}"
            );
        }
        assert_eq!(loads, 4, "stubs, text, rodata, data");
        assert_eq!(
            guest::elf::static_symbol(k, "fault_stubs"),
            Ok(guest_abi::FAULT_STUBS_ADDR)
        );
    }

    #[test]
    fn memory_slots_cover_guest_memory_but_the_mmio_pages_once() {
        let layout = crate::layout::small_test_layout();
        let mut ranges: Vec<(u64, u64)> = memory_slots(&layout)
            .iter()
            .chain(channel_slots(&layout).iter())
            .map(|&(_, a, b)| (a, b))
            .collect();
        ranges.sort_unstable();
        let mut at = 0;
        for (a, b) in ranges {
            assert!(a < b, "empty slot {a:#x}..{b:#x}");
            if at == FAULT_MMIO_ADDR {
                assert_eq!(a, MMIO_ADDR + PAGE_BYTES, "only the two MMIO pages are unbacked");
            } else {
                assert_eq!(a, at, "gap or overlap at {at:#x}");
            }
            at = b;
        }
        assert_eq!(at, layout.mem_bytes);
        let slots: Vec<u32> = memory_slots(&layout)
            .iter()
            .chain(channel_slots(&layout).iter())
            .map(|s| s.0)
            .collect();
        assert_eq!(slots, [0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn boot_info_bytes_match_the_struct() {
        assert_eq!(
            boot_info_bytes(&BootInfo::default()).len(),
            std::mem::size_of::<BootInfo>()
        );
    }
}

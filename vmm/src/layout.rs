//! The guest-physical memory layout of one instance (identity mapped), and
//! the page-table flags of each region. Everything CPL0 uses is
//! supervisor-only or unmapped; nothing is both writable and executable.
//!
//! ```text
//! 0          2 MiB   4 MiB   6 MiB   8 MiB       +stack chunk   +io       +image        +heap
//! | system   | text  | rodata| data  | guard|stack | I/O window | image     | heap     |
//! | 4K pages | U RX  | U R   | U RW  | 4K pages    | U RW, 2M   | W^X/seg.  | U RW, 2M |
//! system: 0 null | 1000 boot info (U R) | 2000 mailbox (U RW) | 3000 GDT/IDT/TSS (S RW)
//!         | 4000..10000 page tables (unmapped) | 10000 guard | 11000-15000 fault stack (S RW)
//!         | 16000 fault stubs (S RX) | 20000..40000 image page tables (unmapped)
//!         | 1fe000 fault register (S RW) | 1ff000 doorbell (U RW) (both MMIO: no memory slot)
//! ```
//!
//! The image region is unmapped until the host loads a function into it
//! (then each page gets its segment's rights: code RX, rodata R, RELRO R
//! once relocated, data RW; see `image.rs`). Data pages are never
//! executable (NX).

use guest_abi::{
    BOOT_INFO_ADDR, FAULT_MMIO_ADDR, FAULT_STUBS_ADDR, HUGE_PAGE_BYTES, KERNEL_DATA_ADDR, KERNEL_LIMIT,
    KERNEL_RODATA_ADDR, KERNEL_TEXT_ADDR, MAILBOX_ADDR, MMIO_ADDR, PAGE_BYTES,
};

/// Version of this layout and of the privileged state the VMM writes (page
/// tables, GDT/IDT/TSS): part of the snapshot store's base key, so a store
/// made with another layout is never restored with this one.
pub const LAYOUT_VERSION: u32 = 2;
/// GDT (with the TSS descriptor), IDT and TSS share this page.
pub const GDT_ADDR: u64 = 0x3000;
/// The IDT (32 gates of 16 bytes).
pub const IDT_ADDR: u64 = 0x3200;
/// The 64-bit TSS (104 bytes).
pub const TSS_ADDR: u64 = 0x3400;
/// First page-table page (the PML4); the page tables are not mapped (the
/// MMU reads them by physical address).
pub const PAGE_TABLES_ADDR: u64 = 0x4000;
/// End (exclusive) of the page-table area.
pub const PAGE_TABLES_END: u64 = 0x10000;
/// Lowest address of the CPL0 fault stack (an unmapped guard page lies below).
pub const FAULT_STACK_BOTTOM: u64 = 0x11000;
/// Top of the CPL0 fault stack (TSS RSP0 and IST1).
pub const FAULT_STACK_TOP: u64 = 0x15000;
/// The page tables of the function image region (written when a function
/// is loaded; not mapped).
pub const IMAGE_TABLES_ADDR: u64 = 0x2_0000;
/// End (exclusive) of the image page-table area.
pub const IMAGE_TABLES_END: u64 = 0x4_0000;
/// Guest memory below the stack chunk: the system area and the kernel.
pub const SYSTEM_AND_KERNEL_BYTES: u64 = KERNEL_LIMIT;
/// Unmapped bytes under the function stack: a #PF in here is a stack overflow.
pub const STACK_GUARD_BYTES: u64 = 0x10000;

/// Sizes the layout is computed from, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutConfig {
    /// Runtime + function stack.
    pub stack_bytes: u64,
    /// I/O window (largest input or artifact).
    pub io_bytes: u64,
    /// Function image region.
    pub image_bytes: u64,
    /// Function heap (its limit).
    pub heap_bytes: u64,
}

/// Why a layout cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A size is zero or the total overflows.
    #[error("guest layout does not fit: {0}")]
    DoesNotFit(&'static str),
}

/// Access rights of a mapped region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// Writable.
    pub write: bool,
    /// Reachable from CPL3.
    pub user: bool,
    /// Executable.
    pub exec: bool,
}

impl Access {
    /// User read-only data.
    pub const USER_RO: Access = Access {
        write: false,
        user: true,
        exec: false,
    };
    /// User read-write data.
    pub const USER_RW: Access = Access {
        write: true,
        user: true,
        exec: false,
    };
    /// User code.
    pub const USER_RX: Access = Access {
        write: false,
        user: true,
        exec: true,
    };
    /// Supervisor-only code.
    pub const SUPER_RX: Access = Access {
        write: false,
        user: false,
        exec: true,
    };
    /// Supervisor-only data.
    pub const SUPER_RW: Access = Access {
        write: true,
        user: false,
        exec: false,
    };
}

/// One mapped range `[start, start + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Rights.
    pub access: Access,
}

/// Where everything lives in one instance's guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Total guest memory.
    pub mem_bytes: u64,
    /// Lowest stack address.
    pub stack_bottom: u64,
    /// Initial stack pointer.
    pub stack_top: u64,
    /// I/O window start.
    pub io_addr: u64,
    /// I/O window size.
    pub io_bytes: u64,
    /// Image region start.
    pub image_addr: u64,
    /// Image region size.
    pub image_bytes: u64,
    /// Heap start.
    pub heap_addr: u64,
    /// Heap size.
    pub heap_bytes: u64,
}

fn round_up(v: u64, to: u64) -> Option<u64> {
    v.checked_add(to - 1).map(|x| x & !(to - 1))
}

impl Layout {
    /// Computes the layout for `cfg`.
    pub fn new(cfg: LayoutConfig) -> Result<Self, LayoutError> {
        let err = LayoutError::DoesNotFit;
        if cfg.stack_bytes < 4 * PAGE_BYTES || cfg.io_bytes == 0 || cfg.image_bytes == 0 || cfg.heap_bytes == 0 {
            return Err(err("every region needs a non-zero size (stack >= 16 KiB)"));
        }
        let stack_bytes = round_up(cfg.stack_bytes, PAGE_BYTES).ok_or(err("stack"))?;
        let stack_chunk = KERNEL_LIMIT;
        let stack_bottom = stack_chunk + STACK_GUARD_BYTES;
        let stack_top = stack_bottom.checked_add(stack_bytes).ok_or(err("stack"))?;
        let io_addr = round_up(stack_top, HUGE_PAGE_BYTES).ok_or(err("stack"))?;
        let io_bytes = round_up(cfg.io_bytes, HUGE_PAGE_BYTES).ok_or(err("io"))?;
        let image_addr = io_addr.checked_add(io_bytes).ok_or(err("io"))?;
        let image_bytes = round_up(cfg.image_bytes, HUGE_PAGE_BYTES).ok_or(err("image"))?;
        let heap_addr = image_addr.checked_add(image_bytes).ok_or(err("image"))?;
        let heap_bytes = round_up(cfg.heap_bytes, HUGE_PAGE_BYTES).ok_or(err("heap"))?;
        let mem_bytes = heap_addr.checked_add(heap_bytes).ok_or(err("heap"))?;
        // One PD maps 1 GiB; the page-table area holds PML4 + PDPT + PDs + 3 PTs.
        let pds = mem_bytes.div_ceil(1 << 30);
        if 2 + pds + 3 > (PAGE_TABLES_END - PAGE_TABLES_ADDR) / PAGE_BYTES {
            return Err(err("more guest memory than the page-table area can map"));
        }
        Ok(Self {
            mem_bytes,
            stack_bottom,
            stack_top,
            io_addr,
            io_bytes,
            image_addr,
            image_bytes,
            heap_addr,
            heap_bytes,
        })
    }

    /// The regions mapped at boot, in address order (everything else is
    /// unmapped; the image region is mapped when a function is loaded).
    pub fn regions(&self) -> [Region; 13] {
        let r = |start, end: u64, access| Region {
            start,
            len: end - start,
            access,
        };
        [
            r(BOOT_INFO_ADDR, BOOT_INFO_ADDR + PAGE_BYTES, Access::USER_RO),
            r(MAILBOX_ADDR, MAILBOX_ADDR + PAGE_BYTES, Access::USER_RW),
            r(GDT_ADDR, GDT_ADDR + PAGE_BYTES, Access::SUPER_RW),
            r(FAULT_STACK_BOTTOM, FAULT_STACK_TOP, Access::SUPER_RW),
            r(FAULT_STUBS_ADDR, FAULT_STUBS_ADDR + PAGE_BYTES, Access::SUPER_RX),
            r(FAULT_MMIO_ADDR, FAULT_MMIO_ADDR + PAGE_BYTES, Access::SUPER_RW),
            r(MMIO_ADDR, MMIO_ADDR + PAGE_BYTES, Access::USER_RW),
            r(KERNEL_TEXT_ADDR, KERNEL_RODATA_ADDR, Access::USER_RX),
            r(KERNEL_RODATA_ADDR, KERNEL_DATA_ADDR, Access::USER_RO),
            r(KERNEL_DATA_ADDR, KERNEL_LIMIT, Access::USER_RW),
            r(self.stack_bottom, self.stack_top, Access::USER_RW),
            r(self.io_addr, self.io_addr + self.io_bytes, Access::USER_RW),
            r(self.heap_addr, self.heap_addr + self.heap_bytes, Access::USER_RW),
        ]
    }

    /// Whether `[addr, addr + len)` lies inside the I/O window (the only
    /// range a reply's output or message may come from).
    pub fn in_io_window(&self, addr: u64, len: u64) -> bool {
        addr >= self.io_addr
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.io_addr + self.io_bytes)
    }

    /// Ranges worth backing with huge pages: the I/O window and the heap,
    /// past their first 2 MiB (which small requests and functions stay in,
    /// so a cold start never clears a whole huge page for them).
    pub fn huge_page_ranges(&self) -> [(u64, u64); 2] {
        let past_first = |addr: u64, len: u64| (addr + HUGE_PAGE_BYTES, len.saturating_sub(HUGE_PAGE_BYTES));
        [
            past_first(self.io_addr, self.io_bytes),
            past_first(self.heap_addr, self.heap_bytes),
        ]
    }

    /// Whether `[addr, addr + len)` lies inside guest memory.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr.checked_add(len).is_some_and(|end| end <= self.mem_bytes)
    }

    /// Whether a fault address is in the guard under the stack.
    pub fn in_stack_guard(&self, addr: u64) -> bool {
        addr < self.stack_bottom && addr >= self.stack_bottom - STACK_GUARD_BYTES
    }
}

/// A layout with 1 MiB of stack, I/O window, image and heap, for unit tests.
#[cfg(test)]
pub(crate) fn small_test_layout() -> Layout {
    Layout::new(LayoutConfig {
        stack_bytes: 1 << 20,
        io_bytes: 1 << 20,
        image_bytes: 1 << 20,
        heap_bytes: 1 << 20,
    })
    .expect("a small layout fits")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LayoutConfig {
        LayoutConfig {
            stack_bytes: 1 << 20,
            io_bytes: 4 << 20,
            image_bytes: 8 << 20,
            heap_bytes: 64 << 20,
        }
    }

    #[test]
    fn regions_are_ordered_and_disjoint() {
        let l = Layout::new(cfg()).unwrap();
        let regions = l.regions();
        for w in regions.windows(2) {
            assert!(w[0].start + w[0].len <= w[1].start, "{w:?}");
        }
        assert_eq!(regions.last().map(|r| r.start + r.len), Some(l.mem_bytes));
        // The image region is unmapped at boot.
        assert!(
            regions
                .iter()
                .all(|r| r.start + r.len <= l.image_addr || r.start >= l.image_addr + l.image_bytes)
        );
        assert_eq!(l.io_addr % HUGE_PAGE_BYTES, 0);
        assert_eq!(l.heap_bytes, 64 << 20);
    }

    #[test]
    fn guard_is_below_the_stack() {
        let l = Layout::new(cfg()).unwrap();
        assert!(l.in_stack_guard(l.stack_bottom - 1));
        assert!(!l.in_stack_guard(l.stack_bottom));
        assert!(!l.in_stack_guard(0));
    }

    #[test]
    fn refuses_absurd_sizes() {
        assert!(
            Layout::new(LayoutConfig {
                heap_bytes: u64::MAX,
                ..cfg()
            })
            .is_err()
        );
        assert!(
            Layout::new(LayoutConfig {
                heap_bytes: 64 << 30,
                ..cfg()
            })
            .is_err()
        );
        assert!(
            Layout::new(LayoutConfig {
                stack_bytes: 0,
                ..cfg()
            })
            .is_err()
        );
    }

    #[test]
    fn nothing_is_writable_and_executable_and_cpl0_state_is_supervisor_only() {
        let l = Layout::new(cfg()).unwrap();
        for r in l.regions() {
            assert!(!(r.access.write && r.access.exec), "{r:?}");
        }
        let access = |addr: u64| {
            l.regions()
                .into_iter()
                .find(|r| addr >= r.start && addr < r.start + r.len)
                .map(|r| r.access)
        };
        for sup in [
            GDT_ADDR,
            IDT_ADDR,
            TSS_ADDR,
            FAULT_STACK_TOP - 8,
            FAULT_STUBS_ADDR,
            FAULT_MMIO_ADDR,
        ] {
            assert!(access(sup).is_some_and(|a| !a.user), "{sup:#x}");
        }
        for unmapped in [
            0,
            PAGE_TABLES_ADDR,
            PAGE_TABLES_END - 8,
            IMAGE_TABLES_ADDR,
            l.image_addr,
        ] {
            assert_eq!(access(unmapped), None, "{unmapped:#x}");
        }
        assert_eq!(access(KERNEL_TEXT_ADDR), Some(Access::USER_RX));
        assert_eq!(access(KERNEL_RODATA_ADDR), Some(Access::USER_RO));
        assert_eq!(access(KERNEL_DATA_ADDR), Some(Access::USER_RW));
    }

    #[test]
    fn io_window_check() {
        let l = Layout::new(cfg()).unwrap();
        assert!(l.in_io_window(l.io_addr, l.io_bytes));
        assert!(l.in_io_window(l.io_addr + 5, 0));
        assert!(!l.in_io_window(l.io_addr - 1, 1));
        assert!(!l.in_io_window(l.io_addr, l.io_bytes + 1));
        assert!(!l.in_io_window(l.io_addr + 1, u64::MAX));
        assert!(!l.in_io_window(PAGE_TABLES_ADDR, 8));
        assert!(!l.in_io_window(l.heap_addr, 1));
    }

    #[test]
    fn contains_checks_overflow() {
        let l = Layout::new(cfg()).unwrap();
        assert!(l.contains(0, l.mem_bytes));
        assert!(!l.contains(1, l.mem_bytes));
        assert!(!l.contains(u64::MAX, 2));
    }
}

//! Decoding a guest fault report: the frame a CPL0 stub left on the fault
//! stack, classified (stack overflow = #PF in the guard under the stack).

use crate::layout::Layout;
use guest_abi::FaultFrame;

/// Page-fault vector.
pub const PAGE_FAULT: u64 = 14;

/// A guest exception, as reported by its fault stub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFault {
    /// Exception vector.
    pub vector: u64,
    /// Error code (0 when the exception has none).
    pub error_code: u64,
    /// Faulting instruction.
    pub rip: u64,
    /// CR2 (the faulting address, for #PF).
    pub cr2: u64,
    /// Stack pointer at the fault.
    pub rsp: u64,
    /// Privilege level of the faulting code (the low bits of its CS).
    pub cpl: u64,
    /// The fault was a page fault in the guard page under the stack.
    pub stack_overflow: bool,
}

fn vector_name(v: u64) -> &'static str {
    match v {
        0 => "#DE divide error",
        1 => "#DB debug",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD exception",
        _ => "exception",
    }
}

impl std::fmt::Display for GuestFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "guest exception {} ({}), error code {:#x}, rip {:#x}",
            self.vector,
            vector_name(self.vector),
            self.error_code,
            self.rip
        )?;
        if self.vector == PAGE_FAULT {
            write!(f, ", address {:#x}", self.cr2)?;
        }
        write!(f, ", at CPL{}", self.cpl)
    }
}

/// Decodes `frame` (read from the fault stack) reported as `reported_vector`.
/// A frame whose vector disagrees with the report is still decoded, with the
/// reported vector (the port write is what the CPU-entered stub produced).
pub fn decode(reported_vector: u32, frame: &FaultFrame, cr2: u64, layout: &Layout) -> GuestFault {
    let vector = u64::from(reported_vector);
    let stack_overflow = vector == PAGE_FAULT
        && (layout.in_stack_guard(cr2) || (layout.in_stack_guard(frame.rsp) && cr2 < layout.stack_bottom));
    GuestFault {
        vector,
        error_code: frame.error_code,
        rip: frame.rip,
        cr2,
        rsp: frame.rsp,
        cpl: frame.cs & 3,
        stack_overflow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        crate::layout::small_test_layout()
    }

    #[test]
    fn guard_page_fault_is_a_stack_overflow() {
        let l = layout();
        let frame = FaultFrame {
            vector: 14,
            error_code: 6,
            rip: 0x20_1000,
            rsp: l.stack_bottom - 64,
            ..FaultFrame::default()
        };
        let f = decode(14, &frame, l.stack_bottom - 8, &l);
        assert!(f.stack_overflow);
        assert!(f.to_string().contains("page fault"));
    }

    #[test]
    fn other_faults_are_not() {
        let l = layout();
        let frame = FaultFrame {
            vector: 14,
            rip: 0x20_1000,
            rsp: l.stack_top - 64,
            ..FaultFrame::default()
        };
        assert!(!decode(14, &frame, 0, &l).stack_overflow);
        assert!(!decode(13, &frame, l.stack_bottom - 8, &l).stack_overflow);
        let s = decode(6, &frame, 0, &l).to_string();
        assert!(s.contains("invalid opcode") && s.contains("0x201000"), "{s}");
        let user = FaultFrame { cs: 0x23, ..frame };
        assert!(decode(13, &user, 0, &l).to_string().ends_with("at CPL3"));
    }
}

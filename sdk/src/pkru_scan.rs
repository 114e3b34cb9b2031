//! The instructions function code must never contain: those that can change
//! the protection-key rights register (PKRU) without a system call. After
//! ERIM (Vahldiek-Oberwagner et al., USENIX Security 2019), every byte
//! offset of everything mapped executable is scanned, not only instruction
//! boundaries: x86 code can jump into the middle of an instruction.
//!
//! * `WRPKRU` — `0F 01 EF`.
//! * `XRSTOR` / `XRSTOR64` — `0F AE /5` with a memory operand (ModRM `mod !=
//!   11`; `mod == 11` with `/5` is `LFENCE`). Restores PKRU when the saved
//!   state's PKRU bit is set.
//! * `XRSTORS` / `XRSTORS64` — `0F C7 /3` with a memory operand (privileged,
//!   refused anyway for defence in depth).
//!
//! Prefixes (REX.W, operand size) do not change the opcode bytes matched.
//! Pure: used by the builder's verifier and, again, by the runtime's loader.

/// A forbidden instruction kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PkruInstruction {
    /// `WRPKRU` (`0F 01 EF`).
    Wrpkru,
    /// `XRSTOR` (`0F AE /5`, memory operand).
    Xrstor,
    /// `XRSTORS` (`0F C7 /3`, memory operand).
    Xrstors,
}

impl PkruInstruction {
    /// Its mnemonic.
    pub fn name(self) -> &'static str {
        match self {
            Self::Wrpkru => "WRPKRU",
            Self::Xrstor => "XRSTOR",
            Self::Xrstors => "XRSTORS",
        }
    }
}

/// The instruction (if any) whose encoding starts at `bytes[0]`. A match
/// needs all its bytes: a truncated encoding at the very end of the scanned
/// range cannot execute as that instruction from this range alone (callers
/// scan whole mapped pages, so a range never ends mid-page).
pub fn pkru_instruction_at(bytes: &[u8]) -> Option<PkruInstruction> {
    match bytes {
        [0x0f, 0x01, 0xef, ..] => Some(PkruInstruction::Wrpkru),
        [0x0f, 0xae, modrm, ..] if modrm >> 6 != 0b11 && (modrm >> 3) & 0b111 == 5 => Some(PkruInstruction::Xrstor),
        [0x0f, 0xc7, modrm, ..] if modrm >> 6 != 0b11 && (modrm >> 3) & 0b111 == 3 => Some(PkruInstruction::Xrstors),
        _ => None,
    }
}

/// The first forbidden instruction in `bytes`, at any byte offset: its
/// offset into `bytes` and its kind.
pub fn find_pkru_instruction(bytes: &[u8]) -> Option<(usize, PkruInstruction)> {
    // Every match starts with 0F: jump between candidates.
    let mut from = 0;
    while let Some(rel) = bytes.get(from..)?.iter().position(|&b| b == 0x0f) {
        let at = from + rel;
        if let Some(found) = pkru_instruction_at(&bytes[at..]) {
            return Some((at, found));
        }
        from = at + 1;
    }
    None
}

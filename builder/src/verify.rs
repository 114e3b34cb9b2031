//! Verification of a built artifact: the checks every loader (dlopen in the
//! workers, the guest's own ELF loader) relies on, done once on the host.

use goblin::elf::Elf;
use goblin::elf::dynamic::{
    DT_FINI, DT_FINI_ARRAYSZ, DT_INIT, DT_INIT_ARRAYSZ, DT_PREINIT_ARRAYSZ, DT_REL, DT_TEXTREL,
};
use goblin::elf::header::{EM_X86_64, ET_DYN};
use goblin::elf::program_header::{PF_W, PF_X, PT_DYNAMIC, PT_INTERP, PT_LOAD, PT_TLS};
use goblin::elf::reloc::{R_X86_64_64, R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT, R_X86_64_NONE, R_X86_64_RELATIVE};
/// `DT_RELR` (packed relative relocations), which goblin does not name.
const DT_RELR: u64 = 36;

use microfaas_sdk::{
    ABI_VERSION, ABI_VERSION_SYMBOL, ALLOWED_IMPORTS, HANDLE_SYMBOL, INIT_SYMBOL, LOAD_SYMBOL, PkruInstruction,
    find_pkru_instruction,
};

/// Why an artifact was refused.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Not a parseable ELF file.
    #[error("not a valid ELF file")]
    Parse(#[source] goblin::error::Error),
    /// A structural rule was broken.
    #[error("{0}")]
    Rule(String),
    /// Executable pages hold an instruction that can change the
    /// protection-key rights register (`WRPKRU`, `XRSTOR`, `XRSTORS`; see
    /// [`microfaas_sdk::find_pkru_instruction`]).
    #[error("executable bytes at file offset {offset:#x} encode {}, which function code must not contain (it could change its own memory-protection-key rights)", instruction.name())]
    ForbiddenInstruction {
        /// What it encodes.
        instruction: PkruInstruction,
        /// Its offset in the file.
        offset: u64,
    },
}

fn rule(msg: impl Into<String>) -> VerifyError {
    VerifyError::Rule(msg.into())
}

/// One loadable segment of a verified artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    /// Offset in the file.
    pub file_offset: u64,
    /// Bytes taken from the file.
    pub file_size: u64,
    /// Address relative to the load base.
    pub vaddr: u64,
    /// Bytes in memory (the rest zero-filled).
    pub mem_size: u64,
    /// Executable.
    pub executable: bool,
    /// Writable.
    pub writable: bool,
}

/// What verification learned about an artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactInfo {
    /// Loadable segments.
    pub segments: Vec<LoadSegment>,
    /// Bytes of address space the segments span from address 0.
    pub span: u64,
    /// Symbols imported (all on the allowlist).
    pub imports: Vec<String>,
    /// Number of relative relocations.
    pub relative_relocations: usize,
    /// Address of the init entry point.
    pub init_vaddr: u64,
    /// Address of the handle entry point.
    pub handle_vaddr: u64,
    /// Address of the (optional) load entry point.
    pub load_vaddr: Option<u64>,
}

/// Page size executable segments are mapped in.
const PAGE_BYTES: u64 = 4096;

/// Scans every byte offset of the whole file pages `segment` is mapped
/// from (a neighbouring segment's bytes on a shared page are executable
/// too) for `WRPKRU`/`XRSTOR`/`XRSTORS`, as the runtime's loader does again.
fn scan_executable_pages(bytes: &[u8], segment: &LoadSegment) -> Result<(), VerifyError> {
    let start = segment.file_offset - segment.file_offset % PAGE_BYTES;
    let end = segment
        .file_offset
        .checked_add(segment.file_size)
        .and_then(|e| e.checked_next_multiple_of(PAGE_BYTES))
        .ok_or_else(|| rule("segment file range overflows"))?;
    let start = usize::try_from(start).map_err(|_| rule("segment file range overflows"))?;
    let end = usize::try_from(end)
        .map_err(|_| rule("segment file range overflows"))?
        .min(bytes.len());
    let Some(pages) = bytes.get(start..end) else {
        return Err(rule("segment file range overflows"));
    };
    match find_pkru_instruction(pages) {
        Some((at, instruction)) => Err(VerifyError::ForbiddenInstruction {
            instruction,
            offset: u64::try_from(start + at).unwrap_or(u64::MAX),
        }),
        None => Ok(()),
    }
}

/// Checks that `bytes` are a microfaas artifact: 64-bit little-endian x86-64
/// ELF `ET_DYN`; no interpreter, TLS, `DT_NEEDED`, text relocations or
/// initialisers; no segment both writable and executable; only relative
/// relocations plus symbol relocations against [`ALLOWED_IMPORTS`]; no
/// `WRPKRU`/`XRSTOR`/`XRSTORS` at any offset of the executable pages; every
/// undefined symbol on that allowlist; the ABI version symbol holding
/// [`ABI_VERSION`] and both entry points defined in executable segments.
pub fn verify(bytes: &[u8]) -> Result<ArtifactInfo, VerifyError> {
    let elf = Elf::parse(bytes).map_err(VerifyError::Parse)?;
    if !elf.is_64 || !elf.little_endian {
        return Err(rule("not a 64-bit little-endian ELF"));
    }
    if elf.header.e_machine != EM_X86_64 {
        return Err(rule(format!("machine {} is not x86-64", elf.header.e_machine)));
    }
    if elf.header.e_type != ET_DYN {
        return Err(rule(format!(
            "ELF type {} is not ET_DYN (a shared object)",
            elf.header.e_type
        )));
    }
    let file_len = u64::try_from(bytes.len()).map_err(|_| rule("file too large"))?;

    let mut segments = Vec::new();
    let mut span = 0u64;
    let mut has_dynamic = false;
    for ph in &elf.program_headers {
        match ph.p_type {
            PT_INTERP => return Err(rule("has a program interpreter (PT_INTERP)")),
            PT_TLS => {
                return Err(rule(
                    "uses thread-local storage (PT_TLS), which runtimes do not provide",
                ));
            }
            PT_DYNAMIC => has_dynamic = true,
            PT_LOAD => {
                let writable = ph.p_flags & PF_W != 0;
                let executable = ph.p_flags & PF_X != 0;
                if writable && executable {
                    return Err(rule(format!(
                        "segment at {:#x} is both writable and executable",
                        ph.p_vaddr
                    )));
                }
                let file_end = ph
                    .p_offset
                    .checked_add(ph.p_filesz)
                    .ok_or_else(|| rule("segment file range overflows"))?;
                if file_end > file_len {
                    return Err(rule(format!(
                        "segment at {:#x} extends past the end of the file ({file_end} > {file_len})",
                        ph.p_vaddr
                    )));
                }
                if ph.p_filesz > ph.p_memsz {
                    return Err(rule("segment has more file bytes than memory bytes"));
                }
                let end = ph
                    .p_vaddr
                    .checked_add(ph.p_memsz)
                    .ok_or_else(|| rule("segment address range overflows"))?;
                span = span.max(end);
                segments.push(LoadSegment {
                    file_offset: ph.p_offset,
                    file_size: ph.p_filesz,
                    vaddr: ph.p_vaddr,
                    mem_size: ph.p_memsz,
                    executable,
                    writable,
                });
            }
            _ => {}
        }
    }
    if segments.is_empty() {
        return Err(rule("no loadable segments"));
    }
    for s in segments.iter().filter(|s| s.executable) {
        scan_executable_pages(bytes, s)?;
    }
    if !has_dynamic || elf.dynamic.is_none() {
        return Err(rule("no dynamic section"));
    }
    if let Some(needed) = elf.libraries.first() {
        return Err(rule(format!(
            "depends on shared library `{needed}` (DT_NEEDED); artifacts must be self-contained"
        )));
    }
    if let Some(dynamic) = &elf.dynamic {
        for d in &dynamic.dyns {
            let what = match d.d_tag {
                DT_TEXTREL => Some("text relocations (DT_TEXTREL)"),
                DT_INIT | DT_FINI => Some("initialiser or finaliser functions (DT_INIT/DT_FINI)"),
                DT_INIT_ARRAYSZ | DT_FINI_ARRAYSZ | DT_PREINIT_ARRAYSZ if d.d_val != 0 => {
                    Some("initialiser or finaliser arrays")
                }
                DT_REL => Some("REL relocations (only RELA is supported)"),
                DT_RELR => Some("packed RELR relocations (only RELA is supported)"),
                _ => None,
            };
            if let Some(what) = what {
                return Err(rule(format!("has {what}")));
            }
        }
    }

    // Undefined symbols: only the allowlist.
    let mut imports = Vec::new();
    for (index, sym) in elf.dynsyms.iter().enumerate() {
        if index == 0 || sym.st_shndx != 0 {
            continue;
        }
        let name = elf.dynstrtab.get_at(sym.st_name).unwrap_or("<unnamed>");
        if !ALLOWED_IMPORTS.contains(&name) {
            return Err(rule(format!(
                "imports symbol `{name}`, which is not on the allowlist ({})",
                ALLOWED_IMPORTS.join(", ")
            )));
        }
        imports.push(name.to_owned());
    }

    // Relocations: relative, or against an allowlisted import.
    let mut relative_relocations = 0;
    for reloc in elf.dynrelas.iter().chain(elf.pltrelocs.iter()) {
        match reloc.r_type {
            R_X86_64_NONE => {}
            R_X86_64_RELATIVE if reloc.r_sym == 0 => relative_relocations += 1,
            R_X86_64_GLOB_DAT | R_X86_64_JUMP_SLOT | R_X86_64_64 => {
                let sym = elf
                    .dynsyms
                    .get(reloc.r_sym)
                    .ok_or_else(|| rule(format!("relocation names symbol index {} out of range", reloc.r_sym)))?;
                let name = elf.dynstrtab.get_at(sym.st_name).unwrap_or("<unnamed>");
                if sym.st_shndx != 0 || !ALLOWED_IMPORTS.contains(&name) {
                    return Err(rule(format!(
                        "symbol relocation against `{name}`; only relative relocations and allowlisted imports are allowed"
                    )));
                }
            }
            other => {
                return Err(rule(format!(
                    "relocation type {} ({}) is not allowed; only relative relocations and allowlisted imports are",
                    other,
                    goblin::elf::reloc::r_to_str(other, EM_X86_64)
                )));
            }
        }
        let in_writable = segments.iter().any(|s| {
            s.writable
                && reloc.r_offset >= s.vaddr
                && reloc.r_offset.saturating_add(8) <= s.vaddr.saturating_add(s.mem_size)
        });
        if reloc.r_type != R_X86_64_NONE && !in_writable {
            return Err(rule(format!(
                "relocation at {:#x} is outside the writable segments",
                reloc.r_offset
            )));
        }
    }

    let find = |wanted: &str| {
        elf.dynsyms
            .iter()
            .find(|s| s.st_shndx != 0 && elf.dynstrtab.get_at(s.st_name) == Some(wanted))
    };
    let segment_of = |addr: u64, size: u64| {
        segments.iter().find(|s| {
            addr >= s.vaddr
                && addr
                    .checked_add(size)
                    .is_some_and(|end| end <= s.vaddr.saturating_add(s.mem_size))
        })
    };
    let version = find(ABI_VERSION_SYMBOL)
        .ok_or_else(|| rule(format!("ABI version symbol `{ABI_VERSION_SYMBOL}` is missing")))?;
    let seg = segment_of(version.st_value, 4)
        .ok_or_else(|| rule(format!("`{ABI_VERSION_SYMBOL}` is outside the loadable segments")))?;
    let offset_in_file = version.st_value - seg.vaddr + seg.file_offset;
    let found = usize::try_from(offset_in_file)
        .ok()
        .and_then(|o| bytes.get(o..o.checked_add(4)?))
        .filter(|_| version.st_value - seg.vaddr + 4 <= seg.file_size)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| rule(format!("`{ABI_VERSION_SYMBOL}` has no initialised value")))?;
    if found != ABI_VERSION {
        return Err(rule(format!(
            "built against ABI version {found}, this runtime speaks {ABI_VERSION}"
        )));
    }
    let entry = |name: &str| -> Result<u64, VerifyError> {
        let sym = find(name).ok_or_else(|| rule(format!("entry symbol `{name}` is missing")))?;
        match segment_of(sym.st_value, 1) {
            Some(s) if s.executable => Ok(sym.st_value),
            _ => Err(rule(format!("entry symbol `{name}` is not in an executable segment"))),
        }
    };
    let init_vaddr = entry(INIT_SYMBOL)?;
    let handle_vaddr = entry(HANDLE_SYMBOL)?;
    // Optional (artifacts built before it existed lack it), but if there,
    // an entry point like the others.
    let load_vaddr = find(LOAD_SYMBOL).map(|_| entry(LOAD_SYMBOL)).transpose()?;
    imports.sort();
    Ok(ArtifactInfo {
        segments,
        span,
        imports,
        relative_relocations,
        init_vaddr,
        handle_vaddr,
        load_vaddr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(file_offset: u64, file_size: u64) -> LoadSegment {
        LoadSegment {
            file_offset,
            file_size,
            vaddr: file_offset,
            mem_size: file_size,
            executable: true,
            writable: false,
        }
    }

    #[test]
    fn whole_executable_pages_are_scanned() {
        let mut file = vec![0x90u8; 0x3000];
        assert!(scan_executable_pages(&file, &text(0x1100, 0x200)).is_ok());
        // Outside the segment but on its last page: executable once mapped.
        file[0x1f00..0x1f03].copy_from_slice(&[0x0f, 0x01, 0xef]);
        let e = scan_executable_pages(&file, &text(0x1100, 0x200)).unwrap_err();
        assert!(
            matches!(
                e,
                VerifyError::ForbiddenInstruction {
                    instruction: PkruInstruction::Wrpkru,
                    offset: 0x1f00
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("0x1f00"), "{e}");
        // On another page: not mapped executable by this segment.
        assert!(scan_executable_pages(&file, &text(0x2000, 0x100)).is_ok());
        file[0x2ffd..0x3000].copy_from_slice(&[0x0f, 0xc7, 0x1f]);
        assert!(matches!(
            scan_executable_pages(&file, &text(0x2000, 0x100)),
            Err(VerifyError::ForbiddenInstruction {
                instruction: PkruInstruction::Xrstors,
                offset: 0x2ffd
            })
        ));
    }
}

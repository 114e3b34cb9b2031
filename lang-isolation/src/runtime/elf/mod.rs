//! Parsing a function artifact into a [`LoadPlan`]: pure, checked arithmetic
//! over untrusted bytes, no memory mapped. The plan says which pages come
//! from which file offset with which protection, which words to relocate to
//! what, what turns read-only afterwards, and where the entry points are.
//! The mapping itself is [`super::loader`]'s.
//!
//! Accepted: a little-endian ELF64 x86-64 `ET_DYN` whose `PT_LOAD` segments
//! are page-congruent, ascending and do not share pages, none writable and
//! executable, no bss in a read-only segment; a `PT_DYNAMIC` with `DT_RELA`
//! (and optionally `DT_JMPREL`) relocations of type `R_X86_64_RELATIVE`, or
//! `GLOB_DAT`/`JUMP_SLOT`/`64` against an undefined symbol on the `mem*`
//! allowlist, every one inside a writable segment; `DT_SYMTAB`/`DT_STRTAB`
//! with `DT_HASH` or `DT_GNU_HASH` (to bound the symbol table); the ABI
//! version symbol and both entry points. Section headers are never read.
//! Anything else is a [`ElfError`] naming it.

mod dynamic;

use dynamic::{Symbols, parse_dynamic};
use microfaas_sdk::{
    ABI_VERSION, ABI_VERSION_SYMBOL, HANDLE_SYMBOL, INIT_SYMBOL, LOAD_SYMBOL, PkruInstruction, find_pkru_instruction,
};

/// Largest address span an artifact may occupy: 1 GiB.
pub const MAX_SPAN_BYTES: u64 = 1 << 30;

/// Page size the plan is made for (x86-64).
const PAGE: u64 = 4096;
const EHDR_BYTES: u64 = 64;
const PHDR_BYTES: u64 = 56;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PT_TLS: u32 = 7;
const PT_GNU_RELRO: u32 = 0x6474_e552;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_PLTRELSZ: u64 = 2;
const DT_HASH: u64 = 4;
const DT_STRTAB: u64 = 5;
const DT_SYMTAB: u64 = 6;
const DT_RELA: u64 = 7;
const DT_RELASZ: u64 = 8;
const DT_RELAENT: u64 = 9;
const DT_STRSZ: u64 = 10;
const DT_SYMENT: u64 = 11;
const DT_INIT: u64 = 12;
const DT_FINI: u64 = 13;
const DT_REL: u64 = 17;
const DT_PLTREL: u64 = 20;
const DT_TEXTREL: u64 = 22;
const DT_JMPREL: u64 = 23;
const DT_INIT_ARRAYSZ: u64 = 27;
const DT_FINI_ARRAYSZ: u64 = 28;
const DT_PREINIT_ARRAYSZ: u64 = 33;
const DT_RELR: u64 = 36;
const DT_GNU_HASH: u64 = 0x6fff_fef5;
const R_NONE: u32 = 0;
const R_64: u32 = 1;
const R_GLOB_DAT: u32 = 6;
const R_JUMP_SLOT: u32 = 7;
const R_RELATIVE: u32 = 8;
const SYM_BYTES: u64 = 24;
const RELA_BYTES: u64 = 24;
const DYN_BYTES: u64 = 16;

/// Why an artifact's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    /// A structure or range lies (partly) outside the file.
    #[error("truncated or out-of-bounds {0}")]
    Truncated(&'static str),
    /// Not a little-endian ELF64 x86-64 shared object.
    #[error("not an ELF64 x86-64 shared object (ET_DYN)")]
    NotSharedObject,
    /// A header, segment, dynamic entry or table is inconsistent.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A feature the runtime does not provide (interpreter, TLS,
    /// initialisers, REL/RELR relocations, text relocations).
    #[error("uses {0}, which the runtime does not support")]
    Unsupported(&'static str),
    /// It needs a shared library (`DT_NEEDED`).
    #[error("needs a shared library (DT_NEEDED); artifacts must be self-contained")]
    NeedsLibrary,
    /// A `PT_LOAD` segment is both writable and executable.
    #[error("segment at {vaddr:#x} is both writable and executable")]
    WritableAndExecutable {
        /// Its virtual address.
        vaddr: u64,
    },
    /// The segments span more address space than allowed.
    #[error("segments span {span} bytes, more than the limit of {MAX_SPAN_BYTES}")]
    TooLarge {
        /// Bytes spanned.
        span: u64,
    },
    /// A relocation type the loader does not apply.
    #[error("unsupported relocation type {0}")]
    UnsupportedRelocation(u32),
    /// A relocation outside the writable segments.
    #[error("relocation at {offset:#x} is outside the writable segments")]
    RelocationOutsideWritable {
        /// Its `r_offset`.
        offset: u64,
    },
    /// A symbol relocation against anything but an allowlisted import.
    #[error("symbol relocation against `{name}`; only the mem* imports are allowed")]
    ForbiddenImport {
        /// The symbol (lossy UTF-8, at most 64 bytes).
        name: String,
    },
    /// A required exported symbol is missing or misplaced.
    #[error("exported symbol `{0}` is missing or outside its segment")]
    MissingSymbol(&'static str),
    /// Executable pages hold an instruction that can change the
    /// protection-key rights register (see [`scan_executable`]).
    #[error("executable bytes at file offset {offset:#x} encode {}, which function code must not contain", instruction.name())]
    ForbiddenInstruction {
        /// What it encodes.
        instruction: PkruInstruction,
        /// Its offset in the file.
        offset: u64,
    },
    /// The artifact was built against another ABI version.
    #[error("ABI version {found}, this runtime speaks {ABI_VERSION}")]
    AbiMismatch {
        /// The version it holds.
        found: u32,
    },
}

/// Protection of a mapped range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// Read only.
    Read,
    /// Read and execute (text; never writable).
    ReadExec,
    /// Read and write (data, bss; never executable).
    ReadWrite,
}

/// How one `PT_LOAD` segment is mapped. Offsets are relative to the image
/// base (the address file virtual address `lo` maps to) and page aligned,
/// except `zero_from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentPlan {
    /// First page of the segment in the image.
    pub start: usize,
    /// Page-aligned file offset the first page comes from.
    pub file_offset: u64,
    /// Bytes mapped from the file (whole pages; 0 if nothing comes from it).
    pub file_bytes: usize,
    /// Where the file data ends, if the last file page has bytes after it
    /// that must read as zero (writable segments only): from here to
    /// `start + file_bytes`.
    pub zero_from: Option<usize>,
    /// Anonymous zero pages after the file pages (bss), in bytes.
    pub anon_bytes: usize,
    /// Protection of the whole segment.
    pub protection: Protection,
}

impl SegmentPlan {
    /// First page after the segment.
    pub fn end(&self) -> usize {
        self.start + self.file_bytes + self.anon_bytes
    }
}

/// An allowlisted import, resolved by the loader to this process's libc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Import {
    /// `memcpy`.
    Memcpy,
    /// `memmove`.
    Memmove,
    /// `memset`.
    Memset,
    /// `memcmp`.
    Memcmp,
    /// `bcmp` (resolved to `memcmp`, a valid implementation of it).
    Bcmp,
}

impl Import {
    fn by_name(name: &[u8]) -> Option<Self> {
        Some(match name {
            b"memcpy" => Self::Memcpy,
            b"memmove" => Self::Memmove,
            b"memset" => Self::Memset,
            b"memcmp" => Self::Memcmp,
            b"bcmp" => Self::Bcmp,
            _ => return None,
        })
    }
}

/// What a relocated word becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelocValue {
    /// Image base + addend (`R_X86_64_RELATIVE`), with the base being the
    /// address of file virtual address 0.
    Relative(u64),
    /// An import's address + addend.
    Import(Import, u64),
}

/// One 8-byte word to write after mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relocation {
    /// Offset from the image base (inside a writable segment).
    pub offset: usize,
    /// Its value.
    pub value: RelocValue,
}

/// Everything needed to map an artifact, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadPlan {
    /// Page-aligned lowest virtual address; the image base maps it.
    pub lo: u64,
    /// Bytes of address space from `lo` (whole pages).
    pub span: usize,
    /// The segments, ascending, not sharing pages.
    pub segments: Vec<SegmentPlan>,
    /// Words to write, all inside writable segments.
    pub relocations: Vec<Relocation>,
    /// Range made read-only after relocation (`PT_GNU_RELRO`, page aligned,
    /// inside one writable segment), as (offset, bytes).
    pub relro: Option<(usize, usize)>,
    /// Offset of `microfaas_v1_init` (in an executable segment).
    pub init: usize,
    /// Offset of `microfaas_v1_handle` (in an executable segment).
    pub handle: usize,
    /// Offset of `microfaas_v1_load` (in an executable segment), if the
    /// artifact exports it (it is optional: only a function deployed with a
    /// module is called through it).
    pub load: Option<usize>,
}

impl LoadPlan {
    /// Mappings the image takes once loaded, at most: one per segment, one
    /// more for a segment with both file and anonymous pages, one more for
    /// a RELRO range that splits its segment, and the reservation's gaps.
    pub fn max_mappings(&self) -> usize {
        let segments: usize = self
            .segments
            .iter()
            .map(|s| 1 + usize::from(s.file_bytes > 0 && s.anon_bytes > 0))
            .sum();
        let gaps = self.segments.windows(2).filter(|w| w[0].end() != w[1].start).count()
            + usize::from(self.segments.first().is_some_and(|s| s.start != 0))
            + usize::from(self.segments.last().is_some_and(|s| s.end() != self.span));
        segments + gaps + usize::from(self.relro.is_some())
    }
}

fn range<'a>(b: &'a [u8], off: u64, len: u64, what: &'static str) -> Result<&'a [u8], ElfError> {
    let start = usize::try_from(off).map_err(|_| ElfError::Truncated(what))?;
    let len = usize::try_from(len).map_err(|_| ElfError::Truncated(what))?;
    let end = start.checked_add(len).ok_or(ElfError::Truncated(what))?;
    b.get(start..end).ok_or(ElfError::Truncated(what))
}

fn u16_at(b: &[u8], off: u64, what: &'static str) -> Result<u16, ElfError> {
    let s = range(b, off, 2, what)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: u64, what: &'static str) -> Result<u32, ElfError> {
    let s = range(b, off, 4, what)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], off: u64, what: &'static str) -> Result<u64, ElfError> {
    let s = range(b, off, 8, what)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

fn add(a: u64, b: u64, what: &'static str) -> Result<u64, ElfError> {
    a.checked_add(b).ok_or(ElfError::Malformed(what))
}

fn mul(a: u64, b: u64, what: &'static str) -> Result<u64, ElfError> {
    a.checked_mul(b).ok_or(ElfError::Malformed(what))
}

fn page_down(v: u64) -> u64 {
    v & !(PAGE - 1)
}

fn page_up(v: u64, what: &'static str) -> Result<u64, ElfError> {
    Ok(page_down(add(v, PAGE - 1, what)?))
}

fn to_usize(v: u64, what: &'static str) -> Result<usize, ElfError> {
    usize::try_from(v).map_err(|_| ElfError::Malformed(what))
}

/// One `PT_LOAD` as read from its program header.
#[derive(Debug, Clone, Copy)]
struct Segment {
    flags: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
}

impl Segment {
    fn writable(&self) -> bool {
        self.flags & PF_W != 0
    }

    fn executable(&self) -> bool {
        self.flags & PF_X != 0
    }

    /// Whether `[vaddr, vaddr + len)` lies in the file-backed part.
    fn holds_file(&self, vaddr: u64, len: u64) -> bool {
        vaddr >= self.vaddr
            && vaddr
                .checked_add(len)
                .is_some_and(|end| end <= self.vaddr.saturating_add(self.filesz))
    }

    /// Whether `[vaddr, vaddr + len)` lies in the segment's memory.
    fn holds(&self, vaddr: u64, len: u64) -> bool {
        vaddr >= self.vaddr
            && vaddr
                .checked_add(len)
                .is_some_and(|end| end <= self.vaddr.saturating_add(self.memsz))
    }
}

/// The file's loaded view: translates virtual addresses to file bytes.
struct Loaded<'a> {
    file: &'a [u8],
    segments: Vec<Segment>,
}

impl<'a> Loaded<'a> {
    /// The file bytes at virtual address `vaddr`, `len` long, which must lie
    /// in one segment's file-backed part.
    fn bytes(&self, vaddr: u64, len: u64, what: &'static str) -> Result<&'a [u8], ElfError> {
        let seg = self
            .segments
            .iter()
            .find(|s| s.holds_file(vaddr, len))
            .ok_or(ElfError::Truncated(what))?;
        // `holds_file` checked vaddr >= seg.vaddr.
        range(self.file, add(seg.offset, vaddr - seg.vaddr, what)?, len, what)
    }
}

/// What the program headers say: the loadable segments, and the
/// `(vaddr, size)` of `PT_DYNAMIC` and `PT_GNU_RELRO`.
struct Headers {
    segments: Vec<Segment>,
    dynamic: Option<(u64, u64)>,
    relro: Option<(u64, u64)>,
}

fn read_segments(file: &[u8]) -> Result<Headers, ElfError> {
    let ident = range(file, 0, EHDR_BYTES, "ELF header")?;
    if ident[0..4] != *b"\x7fELF" || ident[4] != 2 || ident[5] != 1 {
        return Err(ElfError::NotSharedObject);
    }
    if u16_at(file, 16, "ELF header")? != 3 || u16_at(file, 18, "ELF header")? != 62 {
        return Err(ElfError::NotSharedObject);
    }
    let phoff = u64_at(file, 32, "ELF header")?;
    let phentsize = u16_at(file, 54, "ELF header")?;
    let phnum = u16_at(file, 56, "ELF header")?;
    if u64::from(phentsize) != PHDR_BYTES {
        return Err(ElfError::Malformed("program header entry size"));
    }
    let headers = range(
        file,
        phoff,
        mul(u64::from(phnum), PHDR_BYTES, "program headers")?,
        "program headers",
    )?;
    let file_len = u64::try_from(file.len()).map_err(|_| ElfError::Malformed("file size"))?;
    let mut segments = Vec::new();
    let mut dynamic = None;
    let mut relro = None;
    for i in 0..u64::from(phnum) {
        let ph = i * PHDR_BYTES;
        let p_type = u32_at(headers, ph, "program header")?;
        let flags = u32_at(headers, ph + 4, "program header")?;
        let offset = u64_at(headers, ph + 8, "program header")?;
        let vaddr = u64_at(headers, ph + 16, "program header")?;
        let filesz = u64_at(headers, ph + 32, "program header")?;
        let memsz = u64_at(headers, ph + 40, "program header")?;
        match p_type {
            PT_INTERP => return Err(ElfError::Unsupported("a program interpreter (PT_INTERP)")),
            PT_TLS => return Err(ElfError::Unsupported("thread-local storage (PT_TLS)")),
            PT_DYNAMIC if dynamic.is_some() => return Err(ElfError::Malformed("program headers (two PT_DYNAMIC)")),
            PT_DYNAMIC => dynamic = Some((vaddr, filesz)),
            PT_GNU_RELRO if relro.is_some() => {
                return Err(ElfError::Malformed("program headers (two PT_GNU_RELRO)"));
            }
            PT_GNU_RELRO => relro = Some((vaddr, memsz)),
            PT_LOAD => {
                let seg = Segment {
                    flags,
                    offset,
                    vaddr,
                    filesz,
                    memsz,
                };
                if seg.writable() && seg.executable() {
                    return Err(ElfError::WritableAndExecutable { vaddr });
                }
                if filesz > memsz {
                    return Err(ElfError::Malformed("segment sizes (file bytes beyond memory bytes)"));
                }
                if add(offset, filesz, "segment file range")? > file_len {
                    return Err(ElfError::Truncated("segment data"));
                }
                if offset % PAGE != vaddr % PAGE {
                    return Err(ElfError::Malformed(
                        "segment alignment (offset and address not congruent)",
                    ));
                }
                if memsz > filesz && !seg.writable() {
                    return Err(ElfError::Malformed(
                        "segment (zero-filled bytes in a read-only segment)",
                    ));
                }
                if memsz == 0 {
                    continue;
                }
                if let Some(prev) = segments.last() {
                    let prev: &Segment = prev;
                    if page_down(vaddr) < page_up(add(prev.vaddr, prev.memsz, "segment")?, "segment")? {
                        return Err(ElfError::Malformed("segments (unordered or sharing a page)"));
                    }
                }
                segments.push(seg);
            }
            _ => {}
        }
    }
    if segments.is_empty() {
        return Err(ElfError::Malformed("program headers (no PT_LOAD)"));
    }
    Ok(Headers {
        segments,
        dynamic,
        relro,
    })
}

fn plan_segment(seg: &Segment, lo: u64) -> Result<SegmentPlan, ElfError> {
    let start = page_down(seg.vaddr);
    let mem_end = page_up(add(seg.vaddr, seg.memsz, "segment")?, "segment")?;
    let file_end = add(seg.vaddr, seg.filesz, "segment")?;
    let file_pages_end = if seg.filesz == 0 {
        start
    } else {
        page_up(file_end, "segment")?
    };
    let zero_from = (seg.writable() && seg.memsz > seg.filesz && seg.filesz > 0 && file_end < file_pages_end)
        .then(|| to_usize(file_end - lo, "segment"))
        .transpose()?;
    let protection = if seg.writable() {
        Protection::ReadWrite
    } else if seg.executable() {
        Protection::ReadExec
    } else {
        Protection::Read
    };
    Ok(SegmentPlan {
        start: to_usize(start - lo, "segment")?,
        file_offset: page_down(seg.offset),
        file_bytes: to_usize(file_pages_end - start, "segment")?,
        zero_from,
        anon_bytes: to_usize(mem_end - file_pages_end, "segment")?,
        protection,
    })
}

/// Refuses `WRPKRU`, `XRSTOR` and `XRSTORS` anywhere in the bytes that get
/// mapped executable: every byte offset of the whole file pages of each
/// `R+X` segment (a page is mapped whole, so bytes of a neighbouring
/// segment sharing it are executable too), as ERIM does. With them,
/// function code could change its own memory-protection-key rights
/// without the runtime.
pub fn scan_executable(file: &[u8], plans: &[SegmentPlan]) -> Result<(), ElfError> {
    for p in plans.iter().filter(|p| p.protection == Protection::ReadExec) {
        let start = usize::try_from(p.file_offset).map_err(|_| ElfError::Truncated("segment"))?;
        let end = start.saturating_add(p.file_bytes).min(file.len());
        let Some(bytes) = file.get(start..end) else {
            return Err(ElfError::Truncated("segment"));
        };
        if let Some((at, instruction)) = find_pkru_instruction(bytes) {
            let offset = u64::try_from(start + at).unwrap_or(u64::MAX);
            return Err(ElfError::ForbiddenInstruction { instruction, offset });
        }
    }
    Ok(())
}

/// Parses and checks `file`, the whole artifact, into a [`LoadPlan`].
pub fn plan(file: &[u8]) -> Result<LoadPlan, ElfError> {
    let Headers {
        segments,
        dynamic,
        relro,
    } = read_segments(file)?;
    let lo = page_down(segments[0].vaddr);
    let last = segments[segments.len() - 1];
    let hi = page_up(add(last.vaddr, last.memsz, "segment")?, "segment")?;
    let span = hi - lo;
    if span > MAX_SPAN_BYTES {
        return Err(ElfError::TooLarge { span });
    }
    let plans = segments
        .iter()
        .map(|s| plan_segment(s, lo))
        .collect::<Result<Vec<_>, _>>()?;
    scan_executable(file, &plans)?;
    let image = Loaded { file, segments };

    let (dyn_vaddr, dyn_size) = dynamic.ok_or(ElfError::Malformed("program headers (no PT_DYNAMIC)"))?;
    let d = parse_dynamic(image.bytes(dyn_vaddr, dyn_size, "dynamic section")?)?;
    if d.relaent.is_some_and(|e| e != RELA_BYTES) {
        return Err(ElfError::Malformed("relocation entry size"));
    }
    if d.pltrel.is_some_and(|p| p != DT_RELA) {
        return Err(ElfError::Unsupported("REL PLT relocations"));
    }
    let symbols = Symbols::new(&image, &d)?;

    let mut relocations = Vec::new();
    for (table, size) in [(d.rela, d.relasz), (d.jmprel, d.pltrelsz)] {
        let Some(table) = table else {
            if size != 0 {
                return Err(ElfError::Malformed("relocation table (size without address)"));
            }
            continue;
        };
        if size % RELA_BYTES != 0 {
            return Err(ElfError::Malformed("relocation table size"));
        }
        let bytes = image.bytes(table, size, "relocation table")?;
        for i in 0..size / RELA_BYTES {
            let at = i * RELA_BYTES;
            let r_offset = u64_at(bytes, at, "relocation")?;
            let r_info = u64_at(bytes, at + 8, "relocation")?;
            let addend = u64_at(bytes, at + 16, "relocation")?;
            let r_type = u32::try_from(r_info & 0xffff_ffff).map_err(|_| ElfError::Malformed("relocation"))?;
            let value = match r_type {
                R_NONE => continue,
                R_RELATIVE => RelocValue::Relative(addend),
                R_GLOB_DAT | R_JUMP_SLOT | R_64 => {
                    let sym = symbols.get(r_info >> 32)?;
                    let import = (sym.shndx == 0).then(|| Import::by_name(sym.name)).flatten();
                    let Some(import) = import else {
                        let name = &sym.name[..sym.name.len().min(64)];
                        return Err(ElfError::ForbiddenImport {
                            name: String::from_utf8_lossy(name).into_owned(),
                        });
                    };
                    RelocValue::Import(import, if r_type == R_64 { addend } else { 0 })
                }
                other => return Err(ElfError::UnsupportedRelocation(other)),
            };
            if !image.segments.iter().any(|s| s.writable() && s.holds(r_offset, 8)) {
                return Err(ElfError::RelocationOutsideWritable { offset: r_offset });
            }
            // Inside a segment, so at or above `lo`.
            relocations.push(Relocation {
                offset: to_usize(r_offset - lo, "relocation")?,
                value,
            });
        }
    }

    let relro = match relro {
        None => None,
        Some((vaddr, memsz)) => {
            let start = page_down(vaddr);
            let end = page_down(add(vaddr, memsz, "PT_GNU_RELRO")?);
            if end <= start {
                None
            } else {
                let bad = ElfError::Malformed("PT_GNU_RELRO (outside a writable segment)");
                let off = to_usize(start.checked_sub(lo).ok_or(bad.clone())?, "PT_GNU_RELRO")?;
                let len = to_usize(end - start, "PT_GNU_RELRO")?;
                let inside = plans.iter().any(|p| {
                    p.protection == Protection::ReadWrite && p.start <= off && off.saturating_add(len) <= p.end()
                });
                if !inside {
                    return Err(bad);
                }
                Some((off, len))
            }
        }
    };

    let version_at = symbols.lookup(ABI_VERSION_SYMBOL)?;
    let version = image
        .bytes(version_at, 4, "ABI version")
        .map_err(|_| ElfError::MissingSymbol(ABI_VERSION_SYMBOL))?;
    let found = u32::from_le_bytes([version[0], version[1], version[2], version[3]]);
    if found != ABI_VERSION {
        return Err(ElfError::AbiMismatch { found });
    }
    let entry = |name: &'static str| -> Result<usize, ElfError> {
        let value = symbols.lookup(name)?;
        if !image.segments.iter().any(|s| s.executable() && s.holds_file(value, 1)) {
            return Err(ElfError::MissingSymbol(name));
        }
        to_usize(value - lo, "entry symbol")
    };
    let init = entry(INIT_SYMBOL)?;
    let handle = entry(HANDLE_SYMBOL)?;
    let load = match symbols.lookup(LOAD_SYMBOL) {
        Ok(_) => Some(entry(LOAD_SYMBOL)?),
        Err(ElfError::MissingSymbol(_)) => None,
        Err(e) => return Err(e),
    };
    Ok(LoadPlan {
        lo,
        span: to_usize(span, "span")?,
        segments: plans,
        relocations,
        relro,
        init,
        handle,
        load,
    })
}

#[cfg(test)]
mod tests;

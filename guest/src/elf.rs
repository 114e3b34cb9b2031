//! The function ELF loader: maps an artifact's `PT_LOAD` segments into the
//! image region, applies its relocations (`R_X86_64_RELATIVE`, and
//! `GLOB_DAT`/`JUMP_SLOT`/`64` against the allowlisted `mem*` imports, which
//! the caller resolves to its own implementations) and finds the versioned
//! entry symbols, and reports each segment's rights (from `p_flags`) and the
//! `PT_GNU_RELRO` range so the caller can map the image W^X. Every offset
//! and length read from the file is checked; a file that does not fit is
//! refused, never trusted. The vm backend's host runs it on the artifact
//! bytes and writes the result into the guest's image region.

use core::fmt;

/// Why an artifact was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadError {
    /// Shorter than a structure it claims to hold, or an offset out of bounds.
    Truncated(&'static str),
    /// Not a little-endian ELF64 x86-64 shared object.
    NotSharedObject,
    /// Its segments do not fit the image region.
    TooLarge,
    /// A segment, dynamic entry or relocation is inconsistent.
    Malformed(&'static str),
    /// It needs a shared library (`DT_NEEDED`).
    NeedsLibrary,
    /// A relocation type the loader does not apply.
    UnsupportedRelocation(u32),
    /// An import outside the allowlist.
    ForbiddenImport,
    /// A required exported symbol is missing.
    MissingSymbol(&'static str),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Truncated(what) => write!(f, "truncated or out-of-bounds {what}"),
            LoadError::NotSharedObject => f.write_str("not an ELF64 x86-64 shared object"),
            LoadError::TooLarge => f.write_str("segments do not fit the image region"),
            LoadError::Malformed(what) => write!(f, "malformed {what}"),
            LoadError::NeedsLibrary => f.write_str("needs a shared library (DT_NEEDED)"),
            LoadError::UnsupportedRelocation(t) => write!(f, "unsupported relocation type {t}"),
            LoadError::ForbiddenImport => f.write_str("imports a symbol outside the allowlist"),
            LoadError::MissingSymbol(s) => write!(f, "missing exported symbol `{s}`"),
        }
    }
}

/// Most `PT_LOAD` segments an artifact may have.
pub const MAX_SEGMENTS: usize = 8;

/// One loaded segment: `[start, end)` as offsets into the image, and its
/// rights (readable always).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentRange {
    /// First byte (offset from the image start).
    pub start: u64,
    /// End, exclusive.
    pub end: u64,
    /// `PF_W`.
    pub write: bool,
    /// `PF_X`.
    pub exec: bool,
}

/// A loaded, relocated function: guest addresses of its entry points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedFunction {
    /// Address that file virtual address 0 maps to.
    pub base: u64,
    /// Bytes of the image region in use.
    pub span: u64,
    /// Value of `MICROFAAS_ABI_VERSION`.
    pub abi_version: u32,
    /// Address of `microfaas_v1_init`.
    pub init_addr: u64,
    /// Address of `microfaas_v1_handle`.
    pub handle_addr: u64,
    /// Address of `microfaas_v1_load`, or 0 if the artifact has none (it
    /// is optional).
    pub load_addr: u64,
    /// The `PT_LOAD` segments, in file order (`segment_count` of them).
    pub segments: [SegmentRange; MAX_SEGMENTS],
    /// How many of `segments` are used.
    pub segment_count: usize,
    /// The `PT_GNU_RELRO` range (offsets into the image; empty if none):
    /// read-only once relocated.
    pub relro: (u64, u64),
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_GNU_RELRO: u32 = 0x6474_e552;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const SHT_SYMTAB: u32 = 2;
const SHT_DYNSYM: u32 = 11;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_PLTRELSZ: u64 = 2;
const DT_RELA: u64 = 7;
const DT_RELASZ: u64 = 8;
const DT_RELAENT: u64 = 9;
const DT_REL: u64 = 17;
const DT_PLTREL: u64 = 20;
const DT_JMPREL: u64 = 23;
const DT_RELR: u64 = 36;
const R_NONE: u32 = 0;
const R_64: u32 = 1;
const R_GLOB_DAT: u32 = 6;
const R_JUMP_SLOT: u32 = 7;
const R_RELATIVE: u32 = 8;
const SYM_SIZE: u64 = 24;
const RELA_SIZE: u64 = 24;

fn slice<'a>(b: &'a [u8], off: u64, len: u64, what: &'static str) -> Result<&'a [u8], LoadError> {
    let start = usize::try_from(off).map_err(|_| LoadError::Truncated(what))?;
    let len = usize::try_from(len).map_err(|_| LoadError::Truncated(what))?;
    let end = start.checked_add(len).ok_or(LoadError::Truncated(what))?;
    b.get(start..end).ok_or(LoadError::Truncated(what))
}

fn u16_at(b: &[u8], off: u64, what: &'static str) -> Result<u16, LoadError> {
    let s = slice(b, off, 2, what)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: u64, what: &'static str) -> Result<u32, LoadError> {
    let s = slice(b, off, 4, what)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], off: u64, what: &'static str) -> Result<u64, LoadError> {
    let s = slice(b, off, 8, what)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

fn add(a: u64, b: u64, what: &'static str) -> Result<u64, LoadError> {
    a.checked_add(b).ok_or(LoadError::Malformed(what))
}

struct Segment {
    flags: u32,
    vaddr: u64,
    offset: u64,
    filesz: u64,
    memsz: u64,
}

struct Symbols<'a> {
    table: &'a [u8],
    strings: &'a [u8],
}

struct Sym<'a> {
    name: &'a [u8],
    value: u64,
    shndx: u16,
}

impl<'a> Symbols<'a> {
    fn find(file: &'a [u8], shoff: u64, shnum: u16, kind: u32) -> Result<Self, LoadError> {
        for i in 0..u64::from(shnum) {
            let sh = add(shoff, i * 64, "section header")?;
            if u32_at(file, sh + 4, "section header")? != kind {
                continue;
            }
            let off = u64_at(file, sh + 24, "section header")?;
            let size = u64_at(file, sh + 32, "section header")?;
            let link = u32_at(file, sh + 40, "section header")?;
            if link >= u32::from(shnum) {
                return Err(LoadError::Malformed("dynsym link"));
            }
            let strh = add(shoff, u64::from(link) * 64, "section header")?;
            let str_off = u64_at(file, strh + 24, "section header")?;
            let str_size = u64_at(file, strh + 32, "section header")?;
            return Ok(Self {
                table: slice(file, off, size, "dynamic symbol table")?,
                strings: slice(file, str_off, str_size, "dynamic string table")?,
            });
        }
        Err(LoadError::Malformed("section headers (no symbol table)"))
    }

    fn count(&self) -> u64 {
        // usize -> u64 never truncates on the 64-bit targets this runs on.
        self.table.len() as u64 / SYM_SIZE
    }

    fn get(&self, index: u64) -> Result<Sym<'a>, LoadError> {
        if index >= self.count() {
            return Err(LoadError::Malformed("symbol index"));
        }
        let at = index * SYM_SIZE;
        let name_off = u32_at(self.table, at, "symbol")?;
        let shndx = u16_at(self.table, at + 6, "symbol")?;
        let value = u64_at(self.table, at + 8, "symbol")?;
        let start = usize::try_from(name_off).map_err(|_| LoadError::Truncated("symbol name"))?;
        let rest = self.strings.get(start..).ok_or(LoadError::Truncated("symbol name"))?;
        let len = rest
            .iter()
            .position(|&c| c == 0)
            .ok_or(LoadError::Truncated("symbol name"))?;
        Ok(Sym {
            name: &rest[..len],
            value,
            shndx,
        })
    }

    fn lookup(&self, name: &'static str) -> Result<u64, LoadError> {
        for i in 1..self.count() {
            let sym = self.get(i)?;
            if sym.shndx != 0 && sym.name == name.as_bytes() {
                return Ok(sym.value);
            }
        }
        Err(LoadError::MissingSymbol(name))
    }
}

/// What the ELF header and program headers say about the image.
struct FileLayout {
    phoff: u64,
    shoff: u64,
    phnum: u16,
    shnum: u16,
    /// Lowest (page-aligned) and highest loaded address.
    lo: u64,
    hi: u64,
    dynamic: Option<(u64, u64)>,
    relro_vaddr: Option<(u64, u64)>,
}

fn file_layout(file: &[u8]) -> Result<FileLayout, LoadError> {
    let ident = slice(file, 0, 64, "ELF header")?;
    if ident[0..4] != *b"\x7fELF" || ident[4] != 2 || ident[5] != 1 {
        return Err(LoadError::NotSharedObject);
    }
    let e_type = u16_at(file, 16, "ELF header")?;
    let machine = u16_at(file, 18, "ELF header")?;
    if e_type != 3 || machine != 62 {
        return Err(LoadError::NotSharedObject);
    }
    let phoff = u64_at(file, 32, "ELF header")?;
    let shoff = u64_at(file, 40, "ELF header")?;
    let phentsize = u16_at(file, 54, "ELF header")?;
    let phnum = u16_at(file, 56, "ELF header")?;
    let shentsize = u16_at(file, 58, "ELF header")?;
    let shnum = u16_at(file, 60, "ELF header")?;
    if phentsize != 56 || (shnum != 0 && shentsize != 64) {
        return Err(LoadError::Malformed("header entry sizes"));
    }

    // Segments: extent first, then copy.
    let mut lo = u64::MAX;
    let mut hi = 0u64;
    let mut dynamic: Option<(u64, u64)> = None;
    let mut relro_vaddr: Option<(u64, u64)> = None;
    let mut loads = 0usize;
    for i in 0..u64::from(phnum) {
        let ph = add(phoff, i * 56, "program header")?;
        let p_type = u32_at(file, ph, "program header")?;
        if p_type == PT_DYNAMIC {
            dynamic = Some((
                u64_at(file, ph + 16, "program header")?,
                u64_at(file, ph + 40, "program header")?,
            ));
        }
        if p_type == PT_GNU_RELRO {
            let vaddr = u64_at(file, ph + 16, "program header")?;
            let memsz = u64_at(file, ph + 40, "program header")?;
            relro_vaddr = Some((vaddr, add(vaddr, memsz, "relro")?));
        }
        if p_type != PT_LOAD {
            continue;
        }
        let seg = segment(file, ph)?;
        lo = lo.min(seg.vaddr & !0xfff);
        hi = hi.max(add(seg.vaddr, seg.memsz, "segment")?);
        loads += 1;
    }
    if loads == 0 {
        return Err(LoadError::Malformed("program headers (no PT_LOAD)"));
    }
    if loads > MAX_SEGMENTS {
        return Err(LoadError::Malformed("program headers (too many PT_LOAD)"));
    }
    Ok(FileLayout {
        phoff,
        shoff,
        phnum,
        shnum,
        lo,
        hi,
        dynamic,
        relro_vaddr,
    })
}

/// Bytes of image region `file`'s segments span (what [`load`] needs).
pub fn span(file: &[u8]) -> Result<u64, LoadError> {
    let l = file_layout(file)?;
    Ok(l.hi - l.lo)
}

/// Loads `file` into `image` (which lives at guest address `image_addr`),
/// relocates it, and returns its entry points. `resolve` maps an allowlisted
/// import name to the address of the runtime's implementation (`None` =
/// forbidden). `image` must be zeroed or is zeroed over the span used.
pub fn load(
    file: &[u8],
    image: &mut [u8],
    image_addr: u64,
    resolve: &dyn Fn(&[u8]) -> Option<u64>,
) -> Result<LoadedFunction, LoadError> {
    let FileLayout {
        phoff,
        shoff,
        phnum,
        shnum,
        lo,
        hi,
        dynamic,
        relro_vaddr,
    } = file_layout(file)?;
    let span = hi - lo;
    let span_usize = usize::try_from(span).map_err(|_| LoadError::TooLarge)?;
    if span_usize > image.len() {
        return Err(LoadError::TooLarge);
    }
    let base = image_addr.checked_sub(lo).ok_or(LoadError::TooLarge)?;
    image[..span_usize].fill(0);
    let mut segments = [SegmentRange::default(); MAX_SEGMENTS];
    let mut segment_count = 0;
    for i in 0..u64::from(phnum) {
        let ph = add(phoff, i * 56, "program header")?;
        if u32_at(file, ph, "program header")? != PT_LOAD {
            continue;
        }
        let seg = segment(file, ph)?;
        let data = slice(file, seg.offset, seg.filesz, "segment data")?;
        let dest = usize::try_from(seg.vaddr - lo).map_err(|_| LoadError::TooLarge)?;
        image[dest..dest + data.len()].copy_from_slice(data);
        segments[segment_count] = SegmentRange {
            start: seg.vaddr - lo,
            end: seg.vaddr - lo + seg.memsz,
            write: seg.flags & PF_W != 0,
            exec: seg.flags & PF_X != 0,
        };
        segment_count += 1;
    }
    let relro = match relro_vaddr {
        Some((start, end)) => {
            let start = start.checked_sub(lo).ok_or(LoadError::Malformed("relro range"))?;
            let end = end - lo;
            if end > span {
                return Err(LoadError::Malformed("relro range"));
            }
            (start, end)
        }
        None => (0, 0),
    };

    let symbols = Symbols::find(file, shoff, shnum, SHT_DYNSYM)?;

    // Dynamic section (in the loaded image).
    let (dyn_vaddr, dyn_size) = dynamic.ok_or(LoadError::Malformed("program headers (no PT_DYNAMIC)"))?;
    let dyn_off = dyn_vaddr
        .checked_sub(lo)
        .ok_or(LoadError::Malformed("dynamic section"))?;
    let dyn_bytes = slice(image, dyn_off, dyn_size, "dynamic section")?;
    let mut rela = (0u64, 0u64);
    let mut plt = (0u64, 0u64);
    let mut relaent = RELA_SIZE;
    let mut pltrel = DT_RELA;
    let mut at = 0u64;
    while at + 16 <= dyn_size {
        let tag = u64_at(dyn_bytes, at, "dynamic entry")?;
        let val = u64_at(dyn_bytes, at + 8, "dynamic entry")?;
        match tag {
            DT_NULL => break,
            DT_NEEDED => return Err(LoadError::NeedsLibrary),
            DT_RELA => rela.0 = val,
            DT_RELASZ => rela.1 = val,
            DT_RELAENT => relaent = val,
            DT_JMPREL => plt.0 = val,
            DT_PLTRELSZ => plt.1 = val,
            DT_PLTREL => pltrel = val,
            DT_REL | DT_RELR => return Err(LoadError::Malformed("relocations (REL/RELR)")),
            _ => {}
        }
        at += 16;
    }
    if relaent != RELA_SIZE || pltrel != DT_RELA {
        return Err(LoadError::Malformed("relocation entry format"));
    }

    for (table, size) in [rela, plt] {
        if size == 0 {
            continue;
        }
        let table_off = table.checked_sub(lo).ok_or(LoadError::Malformed("relocation table"))?;
        let mut i = 0u64;
        while i < size / RELA_SIZE {
            let e = add(table_off, i * RELA_SIZE, "relocation")?;
            let r_offset = u64_at(image, e, "relocation")?;
            let r_info = u64_at(image, e + 8, "relocation")?;
            let addend = u64_at(image, e + 16, "relocation")?;
            let r_type = u32::try_from(r_info & 0xffff_ffff).map_err(|_| LoadError::Malformed("relocation"))?;
            let value = match r_type {
                R_NONE => {
                    i += 1;
                    continue;
                }
                R_RELATIVE => base.wrapping_add(addend),
                R_GLOB_DAT | R_JUMP_SLOT | R_64 => {
                    let sym = symbols.get(r_info >> 32)?;
                    let addr = if sym.shndx == 0 {
                        resolve(sym.name).ok_or(LoadError::ForbiddenImport)?
                    } else {
                        base.wrapping_add(sym.value)
                    };
                    if r_type == R_64 {
                        addr.wrapping_add(addend)
                    } else {
                        addr
                    }
                }
                other => return Err(LoadError::UnsupportedRelocation(other)),
            };
            let target = r_offset
                .checked_sub(lo)
                .ok_or(LoadError::Malformed("relocation offset"))?;
            let end = add(target, 8, "relocation offset")?;
            if end > span {
                return Err(LoadError::Malformed("relocation offset"));
            }
            let t = usize::try_from(target).map_err(|_| LoadError::Malformed("relocation offset"))?;
            image[t..t + 8].copy_from_slice(&value.to_le_bytes());
            i += 1;
        }
    }

    let in_image = |value: u64, len: u64, name: &'static str| -> Result<u64, LoadError> {
        let off = value.checked_sub(lo).ok_or(LoadError::MissingSymbol(name))?;
        if off.checked_add(len).is_none_or(|end| end > span) {
            return Err(LoadError::MissingSymbol(name));
        }
        Ok(off)
    };
    let version_off = in_image(symbols.lookup("MICROFAAS_ABI_VERSION")?, 4, "MICROFAAS_ABI_VERSION")?;
    let abi_version = u32_at(image, version_off, "ABI version")?;
    let init_off = in_image(symbols.lookup("microfaas_v1_init")?, 1, "microfaas_v1_init")?;
    let handle_off = in_image(symbols.lookup("microfaas_v1_handle")?, 1, "microfaas_v1_handle")?;
    let load_addr = match symbols.lookup("microfaas_v1_load") {
        Ok(value) => image_addr + in_image(value, 1, "microfaas_v1_load")?,
        Err(LoadError::MissingSymbol(_)) => 0,
        Err(e) => return Err(e),
    };
    Ok(LoadedFunction {
        base,
        span,
        abi_version,
        init_addr: image_addr + init_off,
        handle_addr: image_addr + handle_off,
        load_addr,
        segments,
        segment_count,
        relro,
    })
}

/// The value of the defined symbol `name` in the static symbol table
/// (`.symtab`) of ELF `file` (the guest kernel: where its `mem*` functions
/// are, for resolving function imports).
pub fn static_symbol(file: &[u8], name: &'static str) -> Result<u64, LoadError> {
    let ident = slice(file, 0, 64, "ELF header")?;
    if ident[0..4] != *b"\x7fELF" || ident[4] != 2 || ident[5] != 1 {
        return Err(LoadError::NotSharedObject);
    }
    let shoff = u64_at(file, 40, "ELF header")?;
    let shnum = u16_at(file, 60, "ELF header")?;
    Symbols::find(file, shoff, shnum, SHT_SYMTAB)?.lookup(name)
}

fn segment(file: &[u8], ph: u64) -> Result<Segment, LoadError> {
    let seg = Segment {
        flags: u32_at(file, ph + 4, "program header")?,
        offset: u64_at(file, ph + 8, "program header")?,
        vaddr: u64_at(file, ph + 16, "program header")?,
        filesz: u64_at(file, ph + 32, "program header")?,
        memsz: u64_at(file, ph + 40, "program header")?,
    };
    if seg.filesz > seg.memsz {
        return Err(LoadError::Malformed("segment sizes"));
    }
    Ok(seg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    const ECHO: &str = "/tmp/wrap/target/release/libmicrofaas_artifact.so";

    fn resolve(name: &[u8]) -> Option<u64> {
        match name {
            b"memcpy" => Some(0x1111),
            b"memmove" => Some(0x2222),
            b"memset" => Some(0x3333),
            b"memcmp" | b"bcmp" => Some(0x4444),
            _ => None,
        }
    }

    fn echo() -> Option<Vec<u8>> {
        match std::fs::read(ECHO) {
            Ok(b) => Some(b),
            Err(_) => {
                std::eprintln!("skipping: no example artifact at {ECHO}");
                None
            }
        }
    }

    #[test]
    fn loads_and_relocates_a_real_artifact() {
        let Some(file) = echo() else { return };
        let mut image = vec![0u8; 4 << 20];
        let f = load(&file, &mut image, 0x100_0000, &resolve).expect("loads");
        assert_eq!(f.abi_version, 1);
        assert_eq!(f.base, 0x100_0000);
        assert!(f.init_addr > f.base && f.init_addr < f.base + f.span);
        assert!(f.handle_addr > f.base && f.handle_addr < f.base + f.span);
    }

    #[test]
    fn refuses_an_image_too_small() {
        let Some(file) = echo() else { return };
        let mut image = vec![0u8; 4096];
        assert_eq!(load(&file, &mut image, 0x100_0000, &resolve), Err(LoadError::TooLarge));
    }

    #[test]
    fn refuses_forbidden_imports() {
        let Some(file) = echo() else { return };
        let mut image = vec![0u8; 4 << 20];
        let none = |_: &[u8]| None;
        // The echo artifact imports at least one mem* function.
        assert_eq!(
            load(&file, &mut image, 0x100_0000, &none),
            Err(LoadError::ForbiddenImport)
        );
    }

    #[test]
    fn every_truncation_is_refused_without_panicking() {
        let Some(file) = echo() else { return };
        let mut image = vec![0u8; 4 << 20];
        for len in (0..file.len()).step_by(97) {
            let loaded = load(&file[..len], &mut image, 0x100_0000, &resolve);
            // Cutting into the segments must fail; cutting only trailing
            // sections the loader never reads may succeed.
            assert!(len > file.len() / 2 || loaded.is_err(), "{len}");
        }
    }

    #[test]
    fn bit_flips_never_panic() {
        let Some(file) = echo() else { return };
        let mut image = vec![0u8; 4 << 20];
        let mut seed = 0x1234_5678_9abc_def0u64;
        for _ in 0..300 {
            let mut f = file.clone();
            for _ in 0..8 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Flip bytes in the first 4 KiB, where the headers live.
                let at = usize::try_from(seed % 4096).unwrap() % f.len();
                f[at] ^= u8::try_from(seed >> 56).unwrap() | 1;
            }
            let _ = load(&f, &mut image, 0x100_0000, &resolve);
        }
    }

    #[test]
    fn refuses_non_elf_and_wrong_type() {
        let mut image = vec![0u8; 4096];
        assert_eq!(
            load(b"hello", &mut image, 0, &resolve),
            Err(LoadError::Truncated("ELF header"))
        );
        let mut hdr = vec![0u8; 64];
        hdr[..4].copy_from_slice(b"\x7fELF");
        hdr[4] = 2;
        hdr[5] = 1;
        hdr[16] = 2; // ET_EXEC
        hdr[18] = 62;
        assert_eq!(load(&hdr, &mut image, 0, &resolve), Err(LoadError::NotSharedObject));
    }
}

//! The parts of an artifact reached through `PT_DYNAMIC`: the dynamic
//! entries the loader uses, and the dynamic symbol table bounded by
//! `DT_HASH` or `DT_GNU_HASH`.

use super::*;

/// The dynamic entries the loader uses.
#[derive(Debug, Default)]
pub(super) struct Dynamic {
    pub(super) rela: Option<u64>,
    pub(super) relasz: u64,
    pub(super) relaent: Option<u64>,
    pub(super) jmprel: Option<u64>,
    pub(super) pltrelsz: u64,
    pub(super) pltrel: Option<u64>,
    pub(super) symtab: Option<u64>,
    pub(super) syment: Option<u64>,
    pub(super) strtab: Option<u64>,
    pub(super) strsz: Option<u64>,
    pub(super) hash: Option<u64>,
    pub(super) gnu_hash: Option<u64>,
}

pub(super) fn parse_dynamic(bytes: &[u8]) -> Result<Dynamic, ElfError> {
    let mut d = Dynamic::default();
    let count = u64::try_from(bytes.len()).map_err(|_| ElfError::Malformed("dynamic section"))? / DYN_BYTES;
    for i in 0..count {
        let at = i * DYN_BYTES;
        let tag = u64_at(bytes, at, "dynamic entry")?;
        let val = u64_at(bytes, at + 8, "dynamic entry")?;
        match tag {
            DT_NULL => return Ok(d),
            DT_NEEDED => return Err(ElfError::NeedsLibrary),
            DT_RELA => d.rela = Some(val),
            DT_RELASZ => d.relasz = val,
            DT_RELAENT => d.relaent = Some(val),
            DT_JMPREL => d.jmprel = Some(val),
            DT_PLTRELSZ => d.pltrelsz = val,
            DT_PLTREL => d.pltrel = Some(val),
            DT_SYMTAB => d.symtab = Some(val),
            DT_SYMENT => d.syment = Some(val),
            DT_STRTAB => d.strtab = Some(val),
            DT_STRSZ => d.strsz = Some(val),
            DT_HASH => d.hash = Some(val),
            DT_GNU_HASH => d.gnu_hash = Some(val),
            DT_REL => return Err(ElfError::Unsupported("REL relocations")),
            DT_RELR => return Err(ElfError::Unsupported("packed RELR relocations")),
            DT_TEXTREL => return Err(ElfError::Unsupported("text relocations")),
            DT_INIT | DT_FINI => return Err(ElfError::Unsupported("initialiser or finaliser functions")),
            DT_INIT_ARRAYSZ | DT_FINI_ARRAYSZ | DT_PREINIT_ARRAYSZ if val != 0 => {
                return Err(ElfError::Unsupported("initialiser or finaliser arrays"));
            }
            _ => {}
        }
    }
    Err(ElfError::Malformed("dynamic section (no DT_NULL)"))
}

/// The dynamic symbol table, bounded.
pub(super) struct Symbols<'a> {
    table: &'a [u8],
    strings: &'a [u8],
    count: u64,
}

pub(super) struct Sym<'a> {
    pub(super) name: &'a [u8],
    pub(super) value: u64,
    pub(super) shndx: u16,
}

impl<'a> Symbols<'a> {
    pub(super) fn new(image: &Loaded<'a>, d: &Dynamic) -> Result<Self, ElfError> {
        let symtab = d.symtab.ok_or(ElfError::Malformed("dynamic section (no DT_SYMTAB)"))?;
        let strtab = d.strtab.ok_or(ElfError::Malformed("dynamic section (no DT_STRTAB)"))?;
        let strsz = d.strsz.ok_or(ElfError::Malformed("dynamic section (no DT_STRSZ)"))?;
        if d.syment.is_some_and(|e| e != SYM_BYTES) {
            return Err(ElfError::Malformed("symbol entry size"));
        }
        let count = match (d.hash, d.gnu_hash) {
            (Some(hash), _) => u64::from(u32_at(image.bytes(hash, 8, "DT_HASH")?, 4, "DT_HASH")?),
            (None, Some(gnu)) => gnu_symbol_count(image, gnu)?,
            (None, None) => return Err(ElfError::Malformed("dynamic section (no DT_HASH or DT_GNU_HASH)")),
        };
        let table = image.bytes(symtab, mul(count, SYM_BYTES, "symbol table")?, "symbol table")?;
        let strings = image.bytes(strtab, strsz, "string table")?;
        Ok(Self { table, strings, count })
    }

    pub(super) fn get(&self, index: u64) -> Result<Sym<'a>, ElfError> {
        if index >= self.count {
            return Err(ElfError::Malformed("symbol index"));
        }
        let at = index * SYM_BYTES;
        let name_off = u32_at(self.table, at, "symbol")?;
        let shndx = u16_at(self.table, at + 6, "symbol")?;
        let value = u64_at(self.table, at + 8, "symbol")?;
        let start = usize::try_from(name_off).map_err(|_| ElfError::Truncated("symbol name"))?;
        let rest = self.strings.get(start..).ok_or(ElfError::Truncated("symbol name"))?;
        let len = rest
            .iter()
            .position(|&c| c == 0)
            .ok_or(ElfError::Truncated("symbol name"))?;
        Ok(Sym {
            name: &rest[..len],
            value,
            shndx,
        })
    }

    /// The value of the defined symbol `name`.
    pub(super) fn lookup(&self, name: &'static str) -> Result<u64, ElfError> {
        for i in 1..self.count {
            let sym = self.get(i)?;
            if sym.shndx != 0 && sym.name == name.as_bytes() {
                return Ok(sym.value);
            }
        }
        Err(ElfError::MissingSymbol(name))
    }
}

/// Number of dynamic symbols from a GNU hash table: one past the last
/// symbol any bucket's chain reaches (or `symoffset` if none).
fn gnu_symbol_count(image: &Loaded<'_>, at: u64) -> Result<u64, ElfError> {
    let head = image.bytes(at, 16, "DT_GNU_HASH")?;
    let nbuckets = u64::from(u32_at(head, 0, "DT_GNU_HASH")?);
    let symoffset = u64::from(u32_at(head, 4, "DT_GNU_HASH")?);
    let bloom_size = u64::from(u32_at(head, 8, "DT_GNU_HASH")?);
    let buckets_at = add(
        add(at, 16, "DT_GNU_HASH")?,
        mul(bloom_size, 8, "DT_GNU_HASH")?,
        "DT_GNU_HASH",
    )?;
    let buckets = image.bytes(buckets_at, mul(nbuckets, 4, "DT_GNU_HASH")?, "GNU hash buckets")?;
    let chains_at = add(buckets_at, mul(nbuckets, 4, "DT_GNU_HASH")?, "DT_GNU_HASH")?;
    let mut count = symoffset;
    for b in 0..nbuckets {
        let first = u64::from(u32_at(buckets, b * 4, "GNU hash buckets")?);
        if first == 0 {
            continue;
        }
        if first < symoffset {
            return Err(ElfError::Malformed("GNU hash bucket"));
        }
        // Walk the chain to its end marker (low bit set); every step reads
        // a new word inside the file, so the walk is bounded by its size.
        let mut i = first;
        loop {
            let word_at = add(chains_at, mul(i - symoffset, 4, "GNU hash chain")?, "GNU hash chain")?;
            let word = u32_at(image.bytes(word_at, 4, "GNU hash chain")?, 0, "GNU hash chain")?;
            if word & 1 != 0 {
                break;
            }
            i = add(i, 1, "GNU hash chain")?;
        }
        count = count.max(add(i, 1, "GNU hash chain")?);
    }
    Ok(count)
}

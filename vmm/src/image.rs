//! Loading a function artifact into an instance's image region from the
//! host: the guest's own ELF loader (`guest::elf`) runs on the artifact
//! bytes the host was given, with the `mem*` imports resolved to the guest
//! kernel's, and every 4 KiB page of the image gets the rights of the
//! segments on it: code RX, read-only data R, RELRO R (once relocated),
//! data RW and NX; a page that would be both writable and executable is
//! refused. The guest cannot change any of it: its page tables are not
//! mapped. Pure: the instance writes the result before the guest first
//! touches the image (it is unmapped until then, so no stale translation
//! of it can exist).

use crate::GUEST_KERNEL;
use crate::layout::{Access, IMAGE_TABLES_ADDR, IMAGE_TABLES_END, Layout, PAGE_TABLES_ADDR, PAGE_TABLES_END, Region};
use crate::paging::{ChunkTables, PageTables, TooManyTables};
use guest::elf::{self, LoadError, LoadedFunction};
use guest_abi::{LoadRequest, ModuleRequest, PAGE_BYTES};
use std::sync::OnceLock;

/// Why an artifact cannot be loaded into the image region.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// The ELF loader refused the artifact.
    #[error("{0}")]
    Elf(LoadError),
    /// A writable and an executable segment share a page (no W^X mapping).
    #[error("a writable and an executable segment share the page at image offset {offset:#x}")]
    WriteAndExecute {
        /// Offset of the page in the image.
        offset: u64,
    },
    /// The artifact speaks another function ABI.
    #[error("artifact ABI version {got}, the guest runtime speaks {expected}")]
    AbiVersion {
        /// The artifact's `MICROFAAS_ABI_VERSION`.
        got: u32,
        /// The runtime's.
        expected: u32,
    },
    /// The guest kernel lacks a function the imports resolve to.
    #[error("the guest kernel does not define `{0}`")]
    KernelSymbol(&'static str),
    /// The image's page tables do not fit their area.
    #[error("the image's page tables")]
    PageTables(#[source] TooManyTables),
    /// The module does not fit the image region past the artifact.
    #[error(
        "the {len}-byte module does not fit the image region past the artifact ({room} bytes free of {image_bytes})"
    )]
    ModuleTooLarge {
        /// The module's length.
        len: u64,
        /// Bytes of the image region free past the artifact.
        room: u64,
        /// The image region's size.
        image_bytes: u64,
    },
    /// Mapping the module would change a translation of the artifact the
    /// guest may already hold (its page tables would move).
    #[error("mapping the module would remap the loaded artifact's pages")]
    ModuleRemaps,
}

/// An artifact loaded and relocated for one layout, ready to be written.
#[derive(Debug, Clone)]
pub struct LoadedImage {
    /// The image bytes, to write at the layout's `image_addr`.
    pub bytes: Vec<u8>,
    /// The mapped pages of the image region and their rights.
    pub regions: Vec<Region>,
    /// The entry points, for the `LOAD` request.
    pub entry: LoadRequest,
}

/// The allowlisted imports and the guest kernel's implementations.
const IMPORTS: [&str; 5] = ["memcpy", "memmove", "memset", "memcmp", "bcmp"];

/// The guest kernel's addresses of [`IMPORTS`], read once from its symbol
/// table (the kernel is ours, embedded at build time).
fn kernel_imports() -> Result<&'static [(&'static str, u64)], ImageError> {
    static TABLE: OnceLock<Result<Vec<(&'static str, u64)>, ImageError>> = OnceLock::new();
    TABLE
        .get_or_init(|| {
            IMPORTS
                .iter()
                .map(|&name| {
                    elf::static_symbol(GUEST_KERNEL, name)
                        .map(|addr| (name, addr))
                        .map_err(|_| ImageError::KernelSymbol(name))
                })
                .collect()
        })
        .as_ref()
        .map(Vec::as_slice)
        .map_err(Clone::clone)
}

/// Loads `artifact` for the image region of `layout`.
pub fn prepare(artifact: &[u8], layout: &Layout) -> Result<LoadedImage, ImageError> {
    let imports = kernel_imports()?;
    let resolve = |name: &[u8]| imports.iter().find(|(n, _)| n.as_bytes() == name).map(|&(_, a)| a);
    // Only the span (the region may be far larger: a zeroed buffer of all
    // of it would cost a memset of megabytes per load).
    let span = elf::span(artifact).map_err(ImageError::Elf)?;
    if span > layout.image_bytes {
        return Err(ImageError::Elf(LoadError::TooLarge));
    }
    let mut bytes = vec![0u8; usize::try_from(span).map_err(|_| ImageError::Elf(LoadError::TooLarge))?];
    let f = elf::load(artifact, &mut bytes, layout.image_addr, &resolve).map_err(ImageError::Elf)?;
    if f.abi_version != microfaas_sdk::ABI_VERSION {
        return Err(ImageError::AbiVersion {
            got: f.abi_version,
            expected: microfaas_sdk::ABI_VERSION,
        });
    }
    Ok(LoadedImage {
        bytes,
        regions: page_regions(&f, layout.image_addr)?,
        entry: LoadRequest {
            init_addr: f.init_addr,
            handle_addr: f.handle_addr,
            load_addr: f.load_addr,
        },
    })
}

/// A function's module placed in the image region of a loaded artifact.
#[derive(Debug, Clone)]
pub struct PlacedModule {
    /// The `MODULE` request's payload: where the module lies.
    pub request: ModuleRequest,
    /// The image region's pages with the module's added (read-only, not
    /// executable), for [`mapping`].
    pub regions: Vec<Region>,
}

/// Places a module of `len` bytes in `image`'s region: from the first page
/// past the artifact, mapped user read-only and never executable (it is
/// data the artifact reads; W^X holds as before).
pub fn place_module(image: &LoadedImage, len: usize, layout: &Layout) -> Result<PlacedModule, ImageError> {
    let len = u64::try_from(len).unwrap_or(u64::MAX);
    let span = u64::try_from(image.bytes.len()).unwrap_or(u64::MAX);
    let at = span.div_ceil(PAGE_BYTES).saturating_mul(PAGE_BYTES);
    let room = layout.image_bytes.saturating_sub(at);
    if len > room {
        return Err(ImageError::ModuleTooLarge {
            len,
            room,
            image_bytes: layout.image_bytes,
        });
    }
    let mut regions = image.regions.clone();
    if len > 0 {
        regions.push(Region {
            start: layout.image_addr + at,
            len: len.div_ceil(PAGE_BYTES) * PAGE_BYTES,
            access: Access::USER_RO,
        });
    }
    Ok(PlacedModule {
        request: ModuleRequest {
            addr: layout.image_addr + at,
            len,
        },
        regions,
    })
}

/// Checks that the tables `new` keep every translation `old` made: each
/// page-directory entry and each page-table entry present in `old` is the
/// same in `new` (so a guest that used the old tables holds no stale
/// translation once `new` is written over them).
pub fn keeps_translations(old: &ChunkTables, new: &ChunkTables) -> Result<(), ImageError> {
    if old.base != new.base || old.pages.len() > new.pages.len() {
        return Err(ImageError::ModuleRemaps);
    }
    let present = |e: u64| e & 1 != 0;
    let entries_kept = old
        .entries
        .iter()
        .filter(|(_, e)| present(*e))
        .all(|old_entry| new.entries.contains(old_entry));
    let pages_kept = old
        .pages
        .iter()
        .zip(&new.pages)
        .all(|(o, n)| o.iter().zip(n.iter()).all(|(&o, &n)| !present(o) || o == n));
    if entries_kept && pages_kept {
        Ok(())
    } else {
        Err(ImageError::ModuleRemaps)
    }
}

/// The rights of every page of the loaded image `f` at `image_addr`: pages
/// no segment touches stay unmapped; a page is writable if a writable
/// segment is on it (unless all of it that is loaded lies in RELRO),
/// executable if an executable one is, and refused if both.
pub fn page_regions(f: &LoadedFunction, image_addr: u64) -> Result<Vec<Region>, ImageError> {
    let segments = f.segments.get(..f.segment_count).unwrap_or(&[]);
    let (relro_start, relro_end) = f.relro;
    let mut regions: Vec<Region> = Vec::new();
    for page in 0..f.span.div_ceil(PAGE_BYTES) {
        let (lo, hi) = (page * PAGE_BYTES, (page + 1) * PAGE_BYTES);
        let (mut loaded, mut write, mut exec, mut all_relro) = (false, false, false, true);
        for s in segments {
            let (a, b) = (s.start.max(lo), s.end.min(hi));
            if a >= b {
                continue;
            }
            loaded = true;
            write |= s.write;
            exec |= s.exec;
            all_relro &= a >= relro_start && b <= relro_end;
        }
        if !loaded {
            continue;
        }
        if write && exec {
            return Err(ImageError::WriteAndExecute { offset: lo });
        }
        if all_relro && relro_start < relro_end {
            write = false;
        }
        let access = Access {
            write,
            user: true,
            exec,
        };
        let start = image_addr + lo;
        match regions.last_mut() {
            Some(last) if last.access == access && last.start + last.len == start => last.len += PAGE_BYTES,
            _ => regions.push(Region {
                start,
                len: PAGE_BYTES,
                access,
            }),
        }
    }
    Ok(regions)
}

/// What to write to map a loaded image: its page tables (at
/// [`IMAGE_TABLES_ADDR`]) and, for each 2 MiB chunk of the image region,
/// the page-directory entry (guest-physical address, value).
pub fn mapping(image: &LoadedImage, layout: &Layout) -> Result<(ChunkTables, Vec<(u64, u64)>), ImageError> {
    mapping_of(&image.regions, layout)
}

/// [`mapping`] of the image region's pages `regions` (an artifact's, with
/// or without its module).
pub fn mapping_of(regions: &[Region], layout: &Layout) -> Result<(ChunkTables, Vec<(u64, u64)>), ImageError> {
    let max = |from: u64, to: u64| usize::try_from((to - from) / PAGE_BYTES).unwrap_or(0);
    let boot = PageTables::build(
        &layout.regions(),
        layout.mem_bytes,
        PAGE_TABLES_ADDR,
        max(PAGE_TABLES_ADDR, PAGE_TABLES_END),
    )
    .map_err(ImageError::PageTables)?;
    let tables = ChunkTables::build(
        regions,
        layout.image_addr,
        layout.image_addr + layout.image_bytes,
        IMAGE_TABLES_ADDR,
        max(IMAGE_TABLES_ADDR, IMAGE_TABLES_END),
    )
    .map_err(ImageError::PageTables)?;
    let pdes = tables
        .entries
        .iter()
        .map(|&(chunk, entry)| {
            boot.pde_addr(chunk)
                .map(|at| (at, entry))
                .ok_or(ImageError::PageTables(TooManyTables { max_pages: 0 }))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((tables, pdes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest::elf::{MAX_SEGMENTS, SegmentRange};

    fn function(segments: &[SegmentRange], relro: (u64, u64)) -> LoadedFunction {
        let mut table = [SegmentRange::default(); MAX_SEGMENTS];
        table[..segments.len()].copy_from_slice(segments);
        LoadedFunction {
            base: 0,
            span: segments.iter().map(|s| s.end).max().unwrap_or(0),
            abi_version: 1,
            init_addr: 0,
            handle_addr: 0,
            load_addr: 0,
            segments: table,
            segment_count: segments.len(),
            relro,
        }
    }

    fn seg(start: u64, end: u64, write: bool, exec: bool) -> SegmentRange {
        SegmentRange {
            start,
            end,
            write,
            exec,
        }
    }

    const R: Access = Access::USER_RO;
    const RX: Access = Access::USER_RX;
    const RW: Access = Access::USER_RW;

    fn access(regions: &[Region], addr: u64) -> Option<Access> {
        regions
            .iter()
            .find(|r| addr >= r.start && addr < r.start + r.len)
            .map(|r| r.access)
    }

    #[test]
    fn a_typical_lld_layout_is_mapped_w_xor_x() {
        // echo's layout: R headers+rodata, RX text, RW relro (.got), RW bss.
        let f = function(
            &[
                seg(0, 0xacc, false, false),
                seg(0x1ad0, 0x2f2b, false, true),
                seg(0x3f30, 0x5000, true, false),
                seg(0x5060, 0x5070, true, false),
            ],
            (0x3f30, 0x5000),
        );
        let base = 0x100_0000;
        let r = page_regions(&f, base).unwrap();
        assert_eq!(access(&r, base), Some(R));
        assert_eq!(access(&r, base + 0x1000), Some(RX));
        assert_eq!(access(&r, base + 0x2fff), Some(RX));
        assert_eq!(access(&r, base + 0x3000), Some(R), "RELRO is read-only once relocated");
        assert_eq!(access(&r, base + 0x4fff), Some(R));
        assert_eq!(access(&r, base + 0x5000), Some(RW));
        assert_eq!(access(&r, base + 0x6000), None);
        for region in &r {
            assert!(!(region.access.write && region.access.exec));
        }
    }

    #[test]
    fn refuses_a_page_both_writable_and_executable() {
        let f = function(&[seg(0, 0x800, false, true), seg(0x800, 0x1000, true, false)], (0, 0));
        assert_eq!(page_regions(&f, 0), Err(ImageError::WriteAndExecute { offset: 0 }));
        let f = function(&[seg(0, 0x3000, true, true)], (0, 0));
        assert_eq!(page_regions(&f, 0), Err(ImageError::WriteAndExecute { offset: 0 }));
    }

    #[test]
    fn gaps_stay_unmapped_and_partial_relro_stays_writable() {
        let f = function(
            &[seg(0, 0x10, false, false), seg(0x3000, 0x3800, true, false)],
            (0x3000, 0x3400),
        );
        let r = page_regions(&f, 0).unwrap();
        assert_eq!(access(&r, 0x1000), None);
        assert_eq!(access(&r, 0x2000), None);
        assert_eq!(access(&r, 0x3000), Some(RW));
    }

    #[test]
    fn the_kernel_defines_every_import() {
        let imports = kernel_imports().unwrap();
        assert_eq!(imports.len(), IMPORTS.len());
        for (name, addr) in imports {
            assert!(
                (guest_abi::KERNEL_TEXT_ADDR..guest_abi::KERNEL_RODATA_ADDR).contains(addr),
                "{name} at {addr:#x}"
            );
        }
    }
}

//! Builds the guest's 4-level page tables from the layout's regions: 2 MiB
//! pages where a whole 2 MiB chunk has one access, 4 KiB pages elsewhere,
//! nothing for unmapped addresses. The directories cover all of guest
//! memory, so a region mapped later (the function image) only needs its
//! page-directory entries and tables ([`ChunkTables`]). Pure: the caller
//! writes the pages.

use crate::layout::{Access, Region};
use guest_abi::{HUGE_PAGE_BYTES, PAGE_BYTES};

const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;
/// Accessed: preset on every entry (and Dirty on writable leaves), so the
/// MMU never writes the tables, and so that KVM's shadow paging may
/// prefetch neighbouring entries (it skips entries not yet accessed).
const A: u64 = 1 << 5;
/// Dirty.
const D: u64 = 1 << 6;
const NX: u64 = 1 << 63;
const ENTRIES: usize = 512;

/// Page tables ready to be written at `base`: `pages[0]` is the PML4.
#[derive(Debug, Clone)]
pub struct PageTables {
    /// Guest-physical address of `pages[0]`.
    pub base: u64,
    /// The table pages, consecutive from `base`.
    pub pages: Vec<[u64; ENTRIES]>,
}

/// The page tables need more pages than the area allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("page tables need more than {max_pages} pages")]
pub struct TooManyTables {
    /// The area's size in pages.
    pub max_pages: usize,
}

fn leaf_flags(a: Access) -> u64 {
    let mut f = P | A;
    if a.write {
        f |= RW | D;
    }
    if a.user {
        f |= US;
    }
    if !a.exec {
        f |= NX;
    }
    f
}

fn access_at(regions: &[Region], addr: u64) -> Option<Access> {
    regions
        .iter()
        .find(|r| addr >= r.start && addr - r.start < r.len)
        .map(|r| r.access)
}

fn index(addr: u64, shift: u32) -> usize {
    // Masked to 9 bits: always a valid index.
    usize::try_from((addr >> shift) & 511).unwrap_or(0)
}

/// The page-directory entry for the 2 MiB chunk at `chunk`: a 2 MiB leaf
/// when the chunk has one access throughout, else a new page table from
/// `alloc` (filled here), or 0 when nothing in it is mapped.
fn chunk_entry(
    regions: &[Region],
    chunk: u64,
    pages: &mut Vec<[u64; ENTRIES]>,
    table_addr: impl FnOnce(&mut Vec<[u64; ENTRIES]>) -> Result<(usize, u64), TooManyTables>,
) -> Result<u64, TooManyTables> {
    let end = chunk + HUGE_PAGE_BYTES;
    let mut overlapping = regions
        .iter()
        .filter(|r| r.start < end && r.start.saturating_add(r.len) > chunk);
    let Some(first) = overlapping.next() else {
        return Ok(0);
    };
    // One region over the whole chunk: a 2 MiB page (the common case, decided
    // without looking at each 4 KiB page).
    if first.start <= chunk && first.start.saturating_add(first.len) >= end {
        return Ok(chunk | leaf_flags(first.access) | PS);
    }
    let access: Vec<Option<Access>> = (0..HUGE_PAGE_BYTES / PAGE_BYTES)
        .map(|i| access_at(regions, chunk + i * PAGE_BYTES))
        .collect();
    Ok(match access[0] {
        Some(a) if access.iter().all(|p| *p == Some(a)) => chunk | leaf_flags(a) | PS,
        _ => {
            let (pt, addr) = table_addr(pages)?;
            for (i, a) in (0u64..).zip(&access) {
                if let Some(a) = a {
                    let page = chunk + i * PAGE_BYTES;
                    pages[pt][index(page, 12)] = page | leaf_flags(*a);
                }
            }
            addr | P | RW | US | A
        }
    })
}

impl PageTables {
    /// Identity-maps `regions` (below `mem_bytes`) with tables placed from
    /// `base`, using at most `max_pages` pages. Every 2 MiB chunk below
    /// `mem_bytes` has a page directory (mapped or not).
    pub fn build(regions: &[Region], mem_bytes: u64, base: u64, max_pages: usize) -> Result<Self, TooManyTables> {
        let mut t = Self {
            base,
            pages: vec![[0; ENTRIES]],
        };
        let mut chunk = 0;
        while chunk < mem_bytes {
            let pd = t.table_for(chunk, max_pages)?;
            let entry = chunk_entry(regions, chunk, &mut t.pages, |pages| {
                if pages.len() >= max_pages {
                    return Err(TooManyTables { max_pages });
                }
                pages.push([0; ENTRIES]);
                let pt = pages.len() - 1;
                Ok((pt, base + (pt as u64) * PAGE_BYTES))
            })?;
            t.pages[pd][index(chunk, 21)] = entry;
            chunk += HUGE_PAGE_BYTES;
        }
        Ok(t)
    }

    /// The guest-physical address of the page-directory entry that maps
    /// `addr` (`None` above what the tables cover).
    pub fn pde_addr(&self, addr: u64) -> Option<u64> {
        let mut table = 0usize;
        for shift in [39, 30] {
            let entry = self.pages.get(table)?[index(addr, shift)];
            if entry & P == 0 {
                return None;
            }
            table = usize::try_from(((entry & 0x000f_ffff_ffff_f000) - self.base) / PAGE_BYTES).ok()?;
        }
        self.pages.get(table)?;
        Some(self.base + (table as u64) * PAGE_BYTES + (index(addr, 21) as u64) * 8)
    }

    fn addr(&self, page: usize) -> u64 {
        self.base + (page as u64) * PAGE_BYTES
    }

    fn alloc(&mut self, max_pages: usize) -> Result<usize, TooManyTables> {
        if self.pages.len() >= max_pages {
            return Err(TooManyTables { max_pages });
        }
        self.pages.push([0; ENTRIES]);
        Ok(self.pages.len() - 1)
    }

    /// The page directory covering `addr`, creating the path to it.
    fn table_for(&mut self, addr: u64, max_pages: usize) -> Result<usize, TooManyTables> {
        let mut table = 0;
        for shift in [39, 30] {
            let i = index(addr, shift);
            let entry = self.pages[table][i];
            table = if entry & P == 0 {
                let next = self.alloc(max_pages)?;
                self.pages[table][i] = self.addr(next) | P | RW | US | A;
                next
            } else {
                usize::try_from(((entry & 0x000f_ffff_ffff_f000) - self.base) / PAGE_BYTES).unwrap_or(0)
            };
        }
        Ok(table)
    }

    /// The tables as bytes, for writing at `base`.
    pub fn to_bytes(&self) -> Vec<u8> {
        pages_bytes(&self.pages)
    }
}

fn pages_bytes(pages: &[[u64; ENTRIES]]) -> Vec<u8> {
    pages
        .iter()
        .flat_map(|p| p.iter().flat_map(|e| e.to_le_bytes()))
        .collect()
}

/// The page-directory entries and page tables mapping `regions` over the
/// 2 MiB chunks of `[start, end)` (a region mapped after boot: the function
/// image), with the tables placed from `base`.
#[derive(Debug, Clone)]
pub struct ChunkTables {
    /// (chunk address, page-directory entry) for every chunk in the range.
    pub entries: Vec<(u64, u64)>,
    /// Guest-physical address of `pages[0]`.
    pub base: u64,
    /// The page tables, consecutive from `base`.
    pub pages: Vec<[u64; ENTRIES]>,
}

impl ChunkTables {
    /// Maps `regions` over the chunks of `[start, end)` (2 MiB aligned), with
    /// at most `max_pages` tables from `base`.
    pub fn build(regions: &[Region], start: u64, end: u64, base: u64, max_pages: usize) -> Result<Self, TooManyTables> {
        let mut t = Self {
            entries: Vec::new(),
            base,
            pages: Vec::new(),
        };
        let mut chunk = start & !(HUGE_PAGE_BYTES - 1);
        while chunk < end {
            let entry = chunk_entry(regions, chunk, &mut t.pages, |pages| {
                if pages.len() >= max_pages {
                    return Err(TooManyTables { max_pages });
                }
                pages.push([0; ENTRIES]);
                let pt = pages.len() - 1;
                Ok((pt, base + (pt as u64) * PAGE_BYTES))
            })?;
            t.entries.push((chunk, entry));
            chunk += HUGE_PAGE_BYTES;
        }
        Ok(t)
    }

    /// The tables as bytes, for writing at `base`.
    pub fn to_bytes(&self) -> Vec<u8> {
        pages_bytes(&self.pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Layout, LayoutConfig, PAGE_TABLES_ADDR};

    /// Walks the tables like the MMU: (physical address, writable, user, exec).
    fn walk(t: &PageTables, va: u64) -> Option<(u64, bool, bool, bool)> {
        let mut table = 0usize;
        let (mut w, mut u, mut x) = (true, true, true);
        for shift in [39u32, 30, 21, 12] {
            let e = t.pages[table][index(va, shift)];
            if e & P == 0 {
                return None;
            }
            w &= e & RW != 0;
            u &= e & US != 0;
            x &= e & NX == 0;
            if shift == 21 && e & PS != 0 {
                return Some(((e & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff), w, u, x));
            }
            if shift == 12 {
                return Some(((e & 0x000f_ffff_ffff_f000) | (va & 0xfff), w, u, x));
            }
            table = usize::try_from(((e & 0x000f_ffff_ffff_f000) - t.base) / PAGE_BYTES).unwrap();
        }
        None
    }

    #[test]
    fn maps_the_layout_exactly() {
        let l = Layout::new(LayoutConfig {
            stack_bytes: 1 << 20,
            io_bytes: 4 << 20,
            image_bytes: 8 << 20,
            heap_bytes: 64 << 20,
        })
        .unwrap();
        let regions = l.regions();
        let t = PageTables::build(&regions, l.mem_bytes, PAGE_TABLES_ADDR, 12).unwrap();
        // 2 MiB pages everywhere but the system and stack chunks.
        assert!(t.pages.len() <= 5, "{}", t.pages.len());
        let mut va = 0;
        while va < l.mem_bytes {
            let expect = access_at(&regions, va);
            match (walk(&t, va), expect) {
                (None, None) => {}
                (Some((pa, w, u, x)), Some(a)) => {
                    assert_eq!(pa, va);
                    assert_eq!((w, u, x), (a.write, a.user, a.exec), "{va:#x}");
                }
                (got, want) => panic!("{va:#x}: {got:?} vs {want:?}"),
            }
            va += PAGE_BYTES;
        }
        assert!(walk(&t, 0).is_none(), "null page must be unmapped");
        assert!(walk(&t, l.stack_bottom - 8).is_none(), "stack guard must be unmapped");
        assert!(walk(&t, l.mem_bytes).is_none());
    }

    /// Walks tables spread over several areas (gpa -> page), like the MMU.
    fn walk_pages(pages: &std::collections::HashMap<u64, [u64; ENTRIES]>, root: u64, va: u64) -> Option<(u64, Access)> {
        let mut table = root;
        let (mut w, mut u, mut x) = (true, true, true);
        for shift in [39u32, 30, 21, 12] {
            let e = pages.get(&table)?[index(va, shift)];
            if e & P == 0 {
                return None;
            }
            w &= e & RW != 0;
            u &= e & US != 0;
            x &= e & NX == 0;
            let access = Access {
                write: w,
                user: u,
                exec: x,
            };
            if shift == 21 && e & PS != 0 {
                return Some(((e & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff), access));
            }
            if shift == 12 {
                return Some(((e & 0x000f_ffff_ffff_f000) | (va & 0xfff), access));
            }
            table = e & 0x000f_ffff_ffff_f000;
        }
        None
    }

    #[test]
    fn image_chunks_patch_into_the_boot_tables() {
        use crate::layout::{IMAGE_TABLES_ADDR, LayoutConfig};
        let l = Layout::new(LayoutConfig {
            stack_bytes: 1 << 20,
            io_bytes: 4 << 20,
            image_bytes: 8 << 20,
            heap_bytes: 64 << 20,
        })
        .unwrap();
        let boot = PageTables::build(&l.regions(), l.mem_bytes, PAGE_TABLES_ADDR, 12).unwrap();
        let page = |i: u64, access| Region {
            start: l.image_addr + i * PAGE_BYTES,
            len: PAGE_BYTES,
            access,
        };
        // Code, rodata, data pages in the first chunk; a whole RW chunk next.
        let image = [
            page(0, Access::USER_RO),
            page(1, Access::USER_RX),
            page(2, Access::USER_RW),
            Region {
                start: l.image_addr + HUGE_PAGE_BYTES,
                len: HUGE_PAGE_BYTES,
                access: Access::USER_RW,
            },
        ];
        let chunks =
            ChunkTables::build(&image, l.image_addr, l.image_addr + l.image_bytes, IMAGE_TABLES_ADDR, 4).unwrap();
        assert_eq!(chunks.entries.len(), 4);
        assert_eq!(
            chunks.pages.len(),
            1,
            "one table for the mixed chunk, a 2 MiB page for the uniform one"
        );
        let mut mem: std::collections::HashMap<u64, [u64; ENTRIES]> = (0u64..)
            .zip(&boot.pages)
            .map(|(i, p)| (boot.base + i * PAGE_BYTES, *p))
            .collect();
        for (i, p) in (0u64..).zip(&chunks.pages) {
            mem.insert(chunks.base + i * PAGE_BYTES, *p);
        }
        // Before: the image region is unmapped.
        assert_eq!(walk_pages(&mem, PAGE_TABLES_ADDR, l.image_addr), None);
        for &(chunk, entry) in &chunks.entries {
            let at = boot.pde_addr(chunk).unwrap();
            let table = mem.get_mut(&(at & !0xfff)).unwrap();
            table[usize::try_from((at & 0xfff) / 8).unwrap()] = entry;
        }
        let at = |va: u64| walk_pages(&mem, PAGE_TABLES_ADDR, va);
        assert_eq!(at(l.image_addr), Some((l.image_addr, Access::USER_RO)));
        assert_eq!(
            at(l.image_addr + 0x1008),
            Some((l.image_addr + 0x1008, Access::USER_RX))
        );
        assert_eq!(
            at(l.image_addr + 0x2000),
            Some((l.image_addr + 0x2000, Access::USER_RW))
        );
        assert_eq!(at(l.image_addr + 0x3000), None);
        assert_eq!(
            at(l.image_addr + HUGE_PAGE_BYTES + 0x12345),
            Some((l.image_addr + HUGE_PAGE_BYTES + 0x12345, Access::USER_RW))
        );
        assert_eq!(at(l.image_addr + 2 * HUGE_PAGE_BYTES), None);
        // The rest of the boot mapping is untouched.
        assert_eq!(at(l.heap_addr), Some((l.heap_addr, Access::USER_RW)));
        assert_eq!(at(l.io_addr), Some((l.io_addr, Access::USER_RW)));
    }

    #[test]
    fn refuses_too_few_pages() {
        let r = [Region {
            start: 0x1000,
            len: 0x1000,
            access: Access::USER_RW,
        }];
        assert_eq!(
            PageTables::build(&r, 1 << 21, 0, 3).unwrap_err(),
            TooManyTables { max_pages: 3 }
        );
        assert!(PageTables::build(&r, 1 << 21, 0, 4).is_ok());
    }
}

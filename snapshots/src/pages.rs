//! Guest pages and page ranges: the pure arithmetic every other module uses
//! (run extraction from sorted indices and from KVM dirty bitmaps, zero
//! checks, guest-physical conversions).

use serde::{Deserialize, Serialize};

/// Size of one guest page in bytes; the unit of every delta.
pub const PAGE_SIZE: usize = 4096;
/// [`PAGE_SIZE`] as a `u64`, for file offsets and guest-physical addresses.
pub const PAGE_SIZE_U64: u64 = 4096;

/// A half-open run of guest page indices `[start, end)`; page `i` covers
/// guest-physical bytes `[i * 4096, (i + 1) * 4096)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PageRange {
    /// First page index in the run.
    pub start: u64,
    /// One past the last page index.
    pub end: u64,
}

impl PageRange {
    /// Number of pages in the run.
    pub fn pages(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Guest-physical address of the first byte.
    pub fn start_gpa(&self) -> u64 {
        self.start.saturating_mul(PAGE_SIZE_U64)
    }

    /// Guest-physical address one past the last byte.
    pub fn end_gpa(&self) -> u64 {
        self.end.saturating_mul(PAGE_SIZE_U64)
    }
}

impl std::fmt::Display for PageRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:#x}-{:#x} ({} pages)",
            self.start_gpa(),
            self.end_gpa(),
            self.pages()
        )
    }
}

/// Collapses ascending page indices into maximal runs; repeated indices
/// count once.
pub fn ranges_from_sorted(pages: impl IntoIterator<Item = u64>) -> Vec<PageRange> {
    let mut out: Vec<PageRange> = Vec::new();
    for page in pages {
        match out.last_mut() {
            Some(last) if page < last.end => {}
            Some(last) if page == last.end => last.end = page.saturating_add(1),
            _ => out.push(PageRange {
                start: page,
                end: page.saturating_add(1),
            }),
        }
    }
    out
}

/// Total pages in a list of runs.
pub fn total_pages(ranges: &[PageRange]) -> u64 {
    ranges.iter().map(PageRange::pages).sum()
}

/// The runs of set bits in a KVM dirty bitmap (`KVM_GET_DIRTY_LOG` layout:
/// bit `b` of word `w` is page `w * 64 + b`), ascending. Lets the VMM stream
/// dirty pages straight out of guest memory one run at a time.
pub fn dirty_runs(bitmap: &[u64]) -> Vec<PageRange> {
    let mut pages = Vec::new();
    for (word_index, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        let base = (word_index as u64).saturating_mul(64);
        while bits != 0 {
            let bit = u64::from(bits.trailing_zeros());
            pages.push(base.saturating_add(bit));
            bits &= bits - 1;
        }
    }
    ranges_from_sorted(pages)
}

/// Whether a page (or any byte slice) is all zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    // Word-at-a-time via chunks keeps this fast without unsafe.
    let mut chunks = bytes.chunks_exact(8);
    let words_zero = chunks
        .by_ref()
        .all(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) == 0);
    words_zero && chunks.remainder().iter().all(|&b| b == 0)
}

/// The runs of non-zero pages of a page-aligned memory image, ascending.
/// Used to write a base node from fresh guest memory (its parent is all zero).
pub fn nonzero_runs(memory: &[u8]) -> Vec<PageRange> {
    let pages = memory
        .chunks(PAGE_SIZE)
        .enumerate()
        .filter(|(_, page)| !is_zero(page))
        .map(|(i, _)| i as u64);
    ranges_from_sorted(pages)
}

/// Pages in `a` or `b` (both ascending, disjoint runs), as runs.
pub fn union(a: &[PageRange], b: &[PageRange]) -> Vec<PageRange> {
    let mut all: Vec<PageRange> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Vec<PageRange> = Vec::new();
    for r in all {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn expand(ranges: &[PageRange]) -> BTreeSet<u64> {
        ranges.iter().flat_map(|r| r.start..r.end).collect()
    }

    #[test]
    fn runs_merge_adjacent_and_skip_duplicates() {
        let r = ranges_from_sorted([1, 2, 2, 3, 7, 9, 10]);
        assert_eq!(
            r,
            vec![
                PageRange { start: 1, end: 4 },
                PageRange { start: 7, end: 8 },
                PageRange { start: 9, end: 11 }
            ]
        );
        assert_eq!(total_pages(&r), 6);
        assert_eq!(r[0].to_string(), "0x1000-0x4000 (3 pages)");
    }

    #[test]
    fn dirty_bitmap_runs_cross_words() {
        let bitmap = [1u64 << 63, 0b111, 0, 1];
        assert_eq!(
            dirty_runs(&bitmap),
            vec![PageRange { start: 63, end: 67 }, PageRange { start: 192, end: 193 }]
        );
    }

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
        assert!(is_zero(&[0, 0, 0]));
        assert!(!is_zero(&[0, 0, 1]));
        let mut mem = vec![0u8; PAGE_SIZE * 4];
        mem[PAGE_SIZE * 2 + 17] = 3;
        assert_eq!(nonzero_runs(&mem), vec![PageRange { start: 2, end: 3 }]);
    }

    proptest! {
        #[test]
        fn ranges_match_set_model(pages in proptest::collection::btree_set(0u64..300, 0..120)) {
            let ranges = ranges_from_sorted(pages.iter().copied());
            prop_assert_eq!(expand(&ranges), pages.clone());
            // Maximal: no two runs touch, all ascending.
            for w in ranges.windows(2) {
                prop_assert!(w[0].end < w[1].start);
            }
            prop_assert_eq!(total_pages(&ranges), pages.len() as u64);
        }

        #[test]
        fn dirty_runs_match_bit_model(bitmap in proptest::collection::vec(any::<u64>(), 0..6)) {
            let mut model = BTreeSet::new();
            for (w, word) in bitmap.iter().enumerate() {
                for b in 0..64 {
                    if word >> b & 1 == 1 {
                        model.insert(w as u64 * 64 + b);
                    }
                }
            }
            prop_assert_eq!(expand(&dirty_runs(&bitmap)), model);
        }

        #[test]
        fn union_matches_set_model(
            a in proptest::collection::btree_set(0u64..200, 0..60),
            b in proptest::collection::btree_set(0u64..200, 0..60),
        ) {
            let u = union(&ranges_from_sorted(a.iter().copied()), &ranges_from_sorted(b.iter().copied()));
            let model: BTreeSet<u64> = a.union(&b).copied().collect();
            prop_assert_eq!(expand(&u), model.clone());
            prop_assert_eq!(u, ranges_from_sorted(model));
        }
    }
}

//! Delta arithmetic over a chain of nodes (pure): which node provides each
//! page of a merged image (newest wins), which pages two images differ in,
//! and which pages two images share.

use crate::format::IndexEntry;
use crate::id::NodeId;

/// Where the merged image of a chain gets one page from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Source {
    /// Position of the providing node in the chain (0 = base).
    pub depth: usize,
    /// The providing node.
    pub node: NodeId,
    /// Position of the page in that node's index (and data section).
    pub slot: usize,
    /// The page's keyed tag (see [`crate::StoreKey::page_tag`]).
    pub crc: u64,
}

/// One node of a chain as the delta arithmetic sees it.
#[derive(Clone, Copy, Debug)]
pub struct ChainNode<'a> {
    /// The node's id.
    pub id: NodeId,
    /// Its page index (ascending pages).
    pub index: &'a [IndexEntry],
}

/// The merged image of `chain` (oldest first) page by page: for every page
/// some node stores, the newest node storing it. Ascending by page.
pub fn effective(chain: &[ChainNode<'_>]) -> Vec<(u64, Source)> {
    // Newest first, so the first claim on a page wins; a k-way merge keeps
    // this O(total entries * log depth) without a guest-sized bitmap.
    let mut cursors: Vec<usize> = vec![0; chain.len()];
    let mut out = Vec::new();
    loop {
        let mut best: Option<(u64, usize)> = None;
        for (depth, node) in chain.iter().enumerate() {
            if let Some(e) = node.index.get(cursors[depth]) {
                // `>=` on equal pages prefers the deeper (newer) node.
                match best {
                    Some((page, _)) if e.page > page => {}
                    Some((page, _)) if e.page == page => best = Some((page, depth)),
                    _ => best = Some((e.page, depth)),
                }
            }
        }
        let Some((page, depth)) = best else { break };
        let slot = cursors[depth];
        out.push((
            page,
            Source {
                depth,
                node: chain[depth].id,
                slot,
                crc: chain[depth].index[slot].crc,
            },
        ));
        for (d, node) in chain.iter().enumerate() {
            if node.index.get(cursors[d]).is_some_and(|e| e.page == page) {
                cursors[d] += 1;
            }
        }
    }
    out
}

/// For each node of the chain, the slots of its index the merged image takes
/// from it (ascending). Every page some node stores is provided exactly once.
pub fn providers(chain: &[ChainNode<'_>]) -> Vec<Vec<usize>> {
    let mut per_node = vec![Vec::new(); chain.len()];
    for (_, src) in effective(chain) {
        per_node[src.depth].push(src.slot);
    }
    per_node
}

/// Groups ascending slots into runs of consecutive slots (consecutive in the
/// node's data section, so each run is one read).
pub fn slot_runs(slots: &[usize], max_run: usize) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for &s in slots {
        match out.last_mut() {
            Some(r) if r.end == s && r.len() < max_run => r.end = s + 1,
            _ => out.push(s..s + 1),
        }
    }
    out
}

/// The pages in which two merged images (given by [`effective`]) differ.
/// Pages backed by the same stored page are equal without asking; for the
/// rest `same(page, a, b)` decides (`None`: the image has a zero page there).
pub fn differing_pages<E>(
    a: &[(u64, Source)],
    b: &[(u64, Source)],
    mut same: impl FnMut(u64, Option<&Source>, Option<&Source>) -> Result<bool, E>,
) -> Result<Vec<u64>, E> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let pa = a.get(i).map(|x| x.0);
        let pb = b.get(j).map(|x| x.0);
        let (page, sa, sb) = match (pa, pb) {
            (Some(x), Some(y)) if x == y => {
                i += 1;
                j += 1;
                (x, Some(&a[i - 1].1), Some(&b[j - 1].1))
            }
            (Some(x), Some(y)) if x < y => {
                i += 1;
                (x, Some(&a[i - 1].1), None)
            }
            (Some(x), None) => {
                i += 1;
                (x, Some(&a[i - 1].1), None)
            }
            (_, Some(y)) => {
                j += 1;
                (y, None, Some(&b[j - 1].1))
            }
            (None, None) => break,
        };
        let shared = matches!((sa, sb), (Some(x), Some(y)) if x.node == y.node && x.slot == y.slot);
        if !shared && !same(page, sa, sb)? {
            out.push(page);
        }
    }
    Ok(out)
}

/// Pages both images take from the same stored page of a common ancestor
/// (instances of the two share them in memory through one merged image
/// only if it is the same image, but they are stored once on disk).
pub fn shared_pages(a: &[(u64, Source)], b: &[(u64, Source)]) -> u64 {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].0.cmp(&b[j].0) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                if a[i].1.node == b[j].1.node && a[i].1.slot == b[j].1.slot {
                    n += 1;
                }
                i += 1;
                j += 1;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A node in the model: page -> content byte (the CRC stands in for it).
    type ModelNode = BTreeMap<u64, u8>;

    fn index_of(m: &ModelNode) -> Vec<IndexEntry> {
        m.iter()
            .map(|(&page, &c)| IndexEntry {
                page,
                crc: u64::from(c),
            })
            .collect()
    }

    fn materialize(chain: &[ModelNode]) -> BTreeMap<u64, u8> {
        let mut img = BTreeMap::new();
        for node in chain {
            for (&p, &c) in node {
                img.insert(p, c);
            }
        }
        img
    }

    fn chain_strategy() -> impl Strategy<Value = Vec<ModelNode>> {
        proptest::collection::vec(proptest::collection::btree_map(0u64..64, 0u8..4, 0..24), 1..4)
    }

    fn ids(n: usize, salt: u8) -> Vec<NodeId> {
        (0..n)
            .map(|i| NodeId::from_bytes([u8::try_from(i).unwrap() + salt; 16]))
            .collect()
    }

    #[test]
    fn newest_wins() {
        let base = vec![IndexEntry { page: 1, crc: 10 }, IndexEntry { page: 2, crc: 20 }];
        let child = vec![IndexEntry { page: 2, crc: 21 }, IndexEntry { page: 5, crc: 50 }];
        let id = ids(2, 1);
        let chain = [
            ChainNode {
                id: id[0],
                index: &base,
            },
            ChainNode {
                id: id[1],
                index: &child,
            },
        ];
        let eff = effective(&chain);
        let crcs: Vec<(u64, u64)> = eff.iter().map(|(p, s)| (*p, s.crc)).collect();
        assert_eq!(crcs, vec![(1, 10), (2, 21), (5, 50)]);
        assert_eq!(providers(&chain), vec![vec![0], vec![0, 1]]);
        assert_eq!(slot_runs(&[0, 1, 2, 5, 6], 2), vec![0..2, 2..3, 5..7]);
    }

    proptest! {
        #[test]
        fn effective_matches_overlay_model(chain in chain_strategy()) {
            let indexes: Vec<Vec<IndexEntry>> = chain.iter().map(index_of).collect();
            let id = ids(chain.len(), 1);
            let nodes: Vec<ChainNode<'_>> = indexes.iter().zip(&id).map(|(ix, &id)| ChainNode { id, index: ix }).collect();
            let eff = effective(&nodes);
            let got: BTreeMap<u64, u8> = eff.iter().map(|(p, s)| (*p, u8::try_from(s.crc).unwrap())).collect();
            prop_assert_eq!(got, materialize(&chain));
            // Each provider really stores the page, at the slot given.
            for (p, s) in &eff {
                prop_assert_eq!(indexes[s.depth][s.slot].page, *p);
                // ... and no newer node stores it.
                for newer in &chain[s.depth + 1..] {
                    prop_assert!(!newer.contains_key(p));
                }
            }
            let provided: usize = providers(&nodes).iter().map(Vec::len).sum();
            prop_assert_eq!(provided, eff.len());
        }

        #[test]
        fn diff_matches_materialized_model(a in chain_strategy(), b_tail in chain_strategy(), shared in 0usize..3) {
            // B shares A's first `shared` nodes (a common ancestry), then differs.
            let shared = shared.min(a.len());
            let b: Vec<ModelNode> = a[..shared].iter().chain(&b_tail).cloned().collect();
            let ia: Vec<Vec<IndexEntry>> = a.iter().map(index_of).collect();
            let ib: Vec<Vec<IndexEntry>> = b.iter().map(index_of).collect();
            let id_a = ids(a.len(), 1);
            let mut id_b = id_a[..shared].to_vec();
            id_b.extend(ids(b_tail.len(), 100));
            let na: Vec<ChainNode<'_>> = ia.iter().zip(&id_a).map(|(ix, &id)| ChainNode { id, index: ix }).collect();
            let nb: Vec<ChainNode<'_>> = ib.iter().zip(&id_b).map(|(ix, &id)| ChainNode { id, index: ix }).collect();
            let (ea, eb) = (effective(&na), effective(&nb));
            // Content 0 stands for a zero page; the CRC is the content.
            let got = differing_pages::<()>(&ea, &eb, |_, x, y| {
                Ok(x.map_or(0, |s| s.crc) == y.map_or(0, |s| s.crc))
            }).unwrap();
            let (ma, mb) = (materialize(&a), materialize(&b));
            let want: Vec<u64> = (0..64)
                .filter(|p| ma.get(p).copied().unwrap_or(0) != mb.get(p).copied().unwrap_or(0))
                .collect();
            prop_assert_eq!(got, want);
            prop_assert!(shared_pages(&ea, &eb) <= ea.len().min(eb.len()) as u64);
            prop_assert_eq!(shared_pages(&ea, &ea), ea.len() as u64);
        }
    }
}

//! Helpers shared by the integration tests: small stores built through the
//! public API.
#![allow(dead_code)]

use snapshots::{Label, Level, Node, NodeId, NodeSpec, PAGE_SIZE, StateSummary, Store};
use std::sync::Arc;

/// Guest memory of the test nodes: 1 MiB = 256 pages.
pub const MEM: u64 = 1 << 20;
pub const PAGES: u64 = MEM / 4096;

/// A page filled with a pattern derived from `seed` (never all zero).
pub fn page(seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in p.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    p
}

pub fn summary(rip: &str) -> StateSummary {
    [("rip".to_owned(), rip.to_owned())].into()
}

/// Writes a node storing `pages` (page index, content seed; ascending).
pub fn node(store: &Store, level: Level, parent: Option<NodeId>, label: Label, pages: &[(u64, u64)]) -> Arc<Node> {
    let mut w = store
        .create_node(NodeSpec {
            level,
            parent,
            label,
            guest_mem_bytes: MEM,
        })
        .unwrap();
    for &(p, seed) in pages {
        w.write_page(p, page(seed).as_slice().try_into().unwrap()).unwrap();
    }
    w.commit(format!("state of {pages:?}").as_bytes(), summary("0x1000"))
        .unwrap()
}

/// base (pages 0..8) -> function echo (pages 4..6 rewritten, 20 added)
/// -> argument h1 (page 5 rewritten, page 40 added).
pub struct Small {
    pub base: Arc<Node>,
    pub func: Arc<Node>,
    pub arg: Arc<Node>,
}

pub fn small(store: &Store) -> Small {
    let base = node(
        store,
        Level::Base,
        None,
        Label::base(None),
        &(0..8).map(|p| (p, p)).collect::<Vec<_>>(),
    );
    let func = node(
        store,
        Level::Function,
        Some(base.id()),
        Label::function("echo", "d1"),
        &[(4, 104), (5, 105), (20, 120)],
    );
    let arg = node(
        store,
        Level::Argument,
        Some(func.id()),
        Label::argument("echo", "d1", "h1"),
        &[(5, 205), (40, 240)],
    );
    Small { base, func, arg }
}

/// The expected memory of a chain: later seeds win; absent pages are zero.
pub fn expected_memory(layers: &[&[(u64, u64)]]) -> Vec<u8> {
    let mut mem = vec![0u8; usize::try_from(MEM).unwrap()];
    for layer in layers {
        for &(p, seed) in *layer {
            let off = usize::try_from(p).unwrap() * PAGE_SIZE;
            mem[off..off + PAGE_SIZE].copy_from_slice(&page(seed));
        }
    }
    mem
}

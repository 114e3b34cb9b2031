//! Maps keyed by ids the dispatcher hands out itself (function indices,
//! image ids): hashed with a multiply, not SipHash. Never for keys a
//! tenant or a function chooses.

use std::collections::HashMap;

/// A cheap hasher for the integer keys of the worker and the dispatcher
/// (function indices and image ids, chosen by the trusted dispatcher and
/// the worker itself, never by a function or a tenant): the warm
/// path's lookups cost a multiply, not SipHash over a path's components.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

/// A map keyed by dispatcher-chosen ids.
pub(crate) type IdMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_ids_stay_distinct() {
        let mut m: IdMap<u32, u32> = IdMap::default();
        for i in 0..10_000 {
            m.insert(i, i * 2);
        }
        assert_eq!(m.len(), 10_000);
        assert!((0..10_000).all(|i| m.get(&i) == Some(&(i * 2))));
        assert_eq!(m.get(&10_000), None);
    }
}

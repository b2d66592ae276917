//! [`ByteLru`]: a least-recently-used map within a byte budget, the one eviction rule of the
//! encoder cache ([`crate::encoder_cache`]) and the prefix cache ([`crate::prefix_cache`]).
//! Not thread-safe by itself: each cache keeps it behind its own mutex, with its counters.

use std::collections::{BTreeMap, HashMap};

/// A SHA-256 digest naming an entry (see [`crate::encoder_cache::KeyBuilder`]).
pub type CacheKey = [u8; 32];

/// One entry and its place in the LRU order.
struct Slot<V> {
    value: V,
    bytes: u64,
    tick: u64,
}

/// Entries of `bytes` each, their order by last use (`tick` → key) and the bytes held.
pub(crate) struct ByteLru<V> {
    map: HashMap<CacheKey, Slot<V>>,
    order: BTreeMap<u64, CacheKey>,
    tick: u64,
    bytes: u64,
}

impl<V> Default for ByteLru<V> {
    fn default() -> Self {
        ByteLru {
            map: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            bytes: 0,
        }
    }
}

impl<V> ByteLru<V> {
    /// The entry under `key`, now the most recently used.
    pub(crate) fn touch(&mut self, key: &CacheKey) -> Option<&V> {
        self.tick += 1;
        let tick = self.tick;
        let slot = self.map.get_mut(key)?;
        self.order.remove(&slot.tick);
        slot.tick = tick;
        self.order.insert(tick, *key);
        Some(&slot.value)
    }

    /// Whether `key` is held (its place in the order does not change).
    pub(crate) fn contains(&self, key: &CacheKey) -> bool {
        self.map.contains_key(key)
    }

    /// Inserts (or replaces) an entry of `bytes` as the most recently used, evicting the
    /// least recently used ones until it fits in `budget`; returns how many were evicted.
    /// An entry larger than the whole budget is not kept (a replaced one is still removed).
    pub(crate) fn insert(&mut self, key: CacheKey, value: V, bytes: u64, budget: u64) -> u64 {
        if let Some(old) = self.map.remove(&key) {
            self.order.remove(&old.tick);
            self.bytes -= old.bytes;
        }
        if bytes > budget {
            return 0;
        }
        let mut evicted = 0;
        while self.bytes + bytes > budget {
            let Some((_, victim)) = self.order.pop_first() else {
                break;
            };
            if let Some(old) = self.map.remove(&victim) {
                self.bytes -= old.bytes;
                evicted += 1;
            }
        }
        self.tick += 1;
        let tick = self.tick;
        self.order.insert(tick, key);
        self.map.insert(key, Slot { value, bytes, tick });
        self.bytes += bytes;
        evicted
    }

    /// Bytes held (the sum of the entries' `bytes`).
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Drops every entry.
    pub(crate) fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> CacheKey {
        [n; 32]
    }

    #[test]
    fn evicts_the_least_recently_used_first_and_keeps_the_budget() {
        let mut lru = ByteLru::default();
        assert_eq!(lru.insert(key(1), "a", 10, 30), 0);
        assert_eq!(lru.insert(key(2), "b", 10, 30), 0);
        assert_eq!(lru.insert(key(3), "c", 10, 30), 0);
        assert_eq!(lru.touch(&key(1)), Some(&"a"));
        // 2 is now the oldest.
        assert_eq!(lru.insert(key(4), "d", 10, 30), 1);
        assert!(!lru.contains(&key(2)) && lru.contains(&key(1)));
        assert_eq!((lru.len(), lru.bytes()), (3, 30));
        // Too big for the budget: not kept, nothing evicted.
        assert_eq!(lru.insert(key(5), "e", 31, 30), 0);
        assert_eq!((lru.len(), lru.bytes()), (3, 30));
        // Replacing does not count twice.
        assert_eq!(lru.insert(key(4), "d2", 10, 30), 0);
        assert_eq!((lru.len(), lru.bytes()), (3, 30));
        lru.clear();
        assert_eq!((lru.len(), lru.bytes()), (0, 0));
    }
}

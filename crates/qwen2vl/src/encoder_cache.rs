//! The encoder cache: what the vision tower and the image decoder computed for an image or
//! video, kept so the next request that brings the same one skips that work.
//!
//! Two kinds of entries share one LRU and one byte budget:
//! - **vision embeddings**: the merged output rows of one image or video `(tokens, hidden)`,
//!   in the model's dtype, exactly as the tower computed them (a hit gives the same f32
//!   numbers, so answers are bit-identical with and without the cache). Keyed by
//!   [`embeddings_key`]: the item's preprocessed pixel values (exact f32 bytes), its grid
//!   and the model's identity. The pixels already encode everything that changes the
//!   embeddings (resized size, min/max pixels, frame sampling), so two items with equal keys
//!   have equal embeddings.
//! - **decoded images**: the preprocessed pixels of one image ([`CachedImage`]), keyed by the
//!   image's encoded bytes together with every setting that changes its preprocessing (the
//!   processor builds that key, see `processing::processor`). A hit skips decoding and
//!   resizing; the bytes are still read (hashing them is what finds the entry), so a file,
//!   a `data:` URI and a URL holding the same bytes reach the same entry.
//!
//! Keys are SHA-256 digests (`ring`): a client who could craft two images with the same key
//! would be answered about the other's image, so a non-cryptographic hash will not do.
//!
//! The cache is shared (`Arc<EncoderCache>`, thread-safe behind one mutex) by a
//! [`crate::pipeline::Pipeline`] and the [`crate::engine::Engine`] that runs it; a budget of
//! 0 turns it off (no hashing, no counting). Requests that miss at the same time both
//! compute and both insert the same value: nothing is wrong, only work is repeated.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::Tensor;
use ring::digest;
use serde::Serialize;

use crate::error::Result;
use crate::inputs::ImageInfo;
use crate::lru::ByteLru;
pub use crate::lru::CacheKey;

/// Bytes counted for an entry on top of its values (map slots, key, bookkeeping), so even
/// tiny entries are bounded in number by the budget.
pub const ENTRY_OVERHEAD_BYTES: u64 = 256;

/// A SHA-256 over a domain tag and length-prefixed parts: parts cannot run into each other
/// (`"ab" + "c"` and `"a" + "bc"` differ), and keys of different kinds never meet.
pub struct KeyBuilder(digest::Context);

impl KeyBuilder {
    /// A key of kind `domain` (e.g. `"qwen2vl/vision-embeddings/v1"`).
    pub fn new(domain: &str) -> Self {
        let mut b = KeyBuilder(digest::Context::new(&digest::SHA256));
        b.bytes(domain.as_bytes());
        b
    }

    /// Adds a byte string (its length first).
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.update(&(b.len() as u64).to_le_bytes());
        self.0.update(b);
        self
    }

    /// Adds a number.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.update(&v.to_le_bytes());
        self
    }

    /// Adds an optional number (absent and every value differ).
    pub fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            Some(v) => self.u64(1).u64(v),
            None => self.u64(0),
        }
    }

    /// Adds f32 values as their exact little-endian bits (their count first).
    pub fn f32s(&mut self, values: &[f32]) -> &mut Self {
        self.u64(values.len() as u64);
        let mut buf = [0u8; 4 * 1024];
        for chunk in values.chunks(buf.len() / 4) {
            for (out, v) in buf.chunks_exact_mut(4).zip(chunk) {
                out.copy_from_slice(&v.to_le_bytes());
            }
            self.0.update(&buf[..4 * chunk.len()]);
        }
        self
    }

    /// The digest.
    pub fn finish(self) -> CacheKey {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.0.finish().as_ref());
        key
    }
}

/// The key of one image's or video's vision embeddings: its preprocessed `pixels`
/// `(t*h*w, patch_dim)` row-major, its `grid` `(t, h, w)` in patches and the identity of the
/// model that encodes them ([`crate::model::Qwen2VL::identity`]).
pub fn embeddings_key(model: &CacheKey, grid: [usize; 3], pixels: &[f32]) -> CacheKey {
    let mut k = KeyBuilder::new("qwen2vl/vision-embeddings/v1");
    k.bytes(model);
    for d in grid {
        k.u64(d as u64);
    }
    k.f32s(pixels);
    k.finish()
}

/// One image as the processor preprocessed it.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedImage {
    /// Its patches, row-major `(t*h*w, patch_dim)`.
    pub pixel_values: Vec<f32>,
    /// Sizes, grid and tokens.
    pub info: ImageInfo,
}

/// What an entry holds.
enum Cached {
    /// Merged vision rows `(tokens, hidden)` of one image or video, in their own storage.
    Embeddings(Tensor),
    /// A preprocessed image.
    Image(Arc<CachedImage>),
}

/// Counters and occupancy of an [`EncoderCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EncoderCacheStats {
    /// Images and videos whose vision embeddings were found (the tower skipped).
    pub hits: u64,
    /// Images and videos whose vision embeddings were looked up and not found.
    pub misses: u64,
    /// Images whose preprocessed pixels were found (decoding and resizing skipped).
    pub decode_hits: u64,
    /// Images whose preprocessed pixels were looked up and not found.
    pub decode_misses: u64,
    /// Entries removed to make room.
    pub evictions: u64,
    /// Bytes held (values plus [`ENTRY_OVERHEAD_BYTES`] each); never above the budget.
    pub bytes: u64,
    /// Entries held.
    pub entries: u64,
    /// The budget in bytes (0: off).
    pub budget_bytes: u64,
}

/// The mutable state: the entries and the counters.
#[derive(Default)]
struct Lru {
    entries: ByteLru<Cached>,
    stats: EncoderCacheStats,
}

impl Lru {
    /// The entry under `key`, now the most recently used.
    fn touch(&mut self, key: &CacheKey) -> Option<&Cached> {
        self.entries.touch(key)
    }

    /// Inserts (or replaces) an entry of `bytes` within `budget` ([`ByteLru::insert`]).
    fn insert(&mut self, key: CacheKey, value: Cached, bytes: u64, budget: u64) {
        self.stats.evictions += self.entries.insert(key, value, bytes, budget);
        self.stats.bytes = self.entries.bytes();
    }
}

/// A thread-safe LRU of vision embeddings and preprocessed images within a byte budget (see
/// the [module docs](self)).
pub struct EncoderCache {
    budget: u64,
    inner: Mutex<Lru>,
}

impl std::fmt::Debug for EncoderCache {
    /// The counters, not the entries (megabytes of pixels).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("EncoderCache").field(&self.stats()).finish()
    }
}

impl Default for EncoderCache {
    /// A cache that is off.
    fn default() -> Self {
        EncoderCache::new(0)
    }
}

impl EncoderCache {
    /// A cache of at most `budget_bytes` (0: off).
    pub fn new(budget_bytes: u64) -> Self {
        EncoderCache {
            budget: budget_bytes,
            inner: Mutex::new(Lru::default()),
        }
    }

    /// A cache of at most `mb` MiB (`--encoder-cache-mb`; 0: off).
    pub fn with_mb(mb: u64) -> Self {
        EncoderCache::new(mb.saturating_mul(1 << 20))
    }

    /// Whether it keeps anything (a budget above 0). When off, callers skip hashing.
    pub fn is_enabled(&self) -> bool {
        self.budget > 0
    }

    /// The budget in bytes.
    pub fn budget_bytes(&self) -> u64 {
        self.budget
    }

    /// The state; a panic elsewhere while it was held leaves it consistent (every update
    /// completes before anything that could panic), so a poisoned lock is taken as is.
    fn lock(&self) -> MutexGuard<'_, Lru> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The vision embeddings `(tokens, hidden)` under `key` ([`embeddings_key`]), counting a
    /// hit or a miss; `None` when off.
    pub fn get_embeddings(&self, key: &CacheKey) -> Option<Tensor> {
        if !self.is_enabled() {
            return None;
        }
        let mut lru = self.lock();
        let found = match lru.touch(key) {
            Some(Cached::Embeddings(t)) => Some(t.clone()),
            _ => None,
        };
        match found {
            Some(_) => lru.stats.hits += 1,
            None => lru.stats.misses += 1,
        }
        found
    }

    /// Keeps `embeddings` `(tokens, hidden)` under `key`, copied into storage of their own
    /// (a view would keep its whole parent alive, uncounted).
    pub fn put_embeddings(&self, key: CacheKey, embeddings: &Tensor) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        let own = embeddings.force_contiguous()?;
        let bytes = (own.elem_count() * own.dtype().size_in_bytes()) as u64 + ENTRY_OVERHEAD_BYTES;
        self.lock()
            .insert(key, Cached::Embeddings(own), bytes, self.budget);
        Ok(())
    }

    /// The preprocessed image under `key`, counting a decode hit or miss; `None` when off.
    pub fn get_image(&self, key: &CacheKey) -> Option<Arc<CachedImage>> {
        if !self.is_enabled() {
            return None;
        }
        let mut lru = self.lock();
        let found = match lru.touch(key) {
            Some(Cached::Image(i)) => Some(i.clone()),
            _ => None,
        };
        match found {
            Some(_) => lru.stats.decode_hits += 1,
            None => lru.stats.decode_misses += 1,
        }
        found
    }

    /// Keeps a preprocessed image under `key`.
    pub fn put_image(&self, key: CacheKey, image: Arc<CachedImage>) {
        if !self.is_enabled() {
            return;
        }
        let bytes = (image.pixel_values.len() * 4) as u64 + ENTRY_OVERHEAD_BYTES;
        self.lock()
            .insert(key, Cached::Image(image), bytes, self.budget);
    }

    /// Counters and occupancy.
    pub fn stats(&self) -> EncoderCacheStats {
        let lru = self.lock();
        EncoderCacheStats {
            entries: lru.entries.len() as u64,
            budget_bytes: self.budget,
            ..lru.stats
        }
    }

    /// Drops every entry (the counters stay).
    pub fn clear(&self) {
        let mut lru = self.lock();
        lru.entries.clear();
        lru.stats.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn key(n: u8) -> CacheKey {
        let mut k = KeyBuilder::new("test");
        k.u64(n as u64);
        k.finish()
    }

    /// `(rows, 4)` f32 embeddings: `rows * 16` bytes plus the overhead.
    fn rows(rows: usize, v: f32) -> Tensor {
        Tensor::full(v, (rows, 4), &Device::Cpu).expect("tensor")
    }

    #[test]
    fn keys_separate_their_parts_and_domains() {
        let ab_c = {
            let mut k = KeyBuilder::new("d");
            k.bytes(b"ab").bytes(b"c");
            k.finish()
        };
        let a_bc = {
            let mut k = KeyBuilder::new("d");
            k.bytes(b"a").bytes(b"bc");
            k.finish()
        };
        assert_ne!(ab_c, a_bc);
        let m = [7u8; 32];
        let px = [0.5f32; 8];
        assert_eq!(
            embeddings_key(&m, [1, 2, 4], &px),
            embeddings_key(&m, [1, 2, 4], &px)
        );
        assert_ne!(
            embeddings_key(&m, [1, 2, 4], &px),
            embeddings_key(&m, [1, 4, 2], &px)
        );
        assert_ne!(
            embeddings_key(&m, [1, 2, 4], &px),
            embeddings_key(&[8u8; 32], [1, 2, 4], &px)
        );
        // -0.0 and 0.0 are different bits, so different pixels.
        let mut neg = px;
        neg[3] = -0.0;
        let mut pos = px;
        pos[3] = 0.0;
        assert_ne!(
            embeddings_key(&m, [1, 2, 4], &neg),
            embeddings_key(&m, [1, 2, 4], &pos)
        );
        let mut opt = KeyBuilder::new("d");
        opt.opt_u64(None).opt_u64(Some(0));
        let mut opt2 = KeyBuilder::new("d");
        opt2.opt_u64(Some(0)).opt_u64(None);
        assert_ne!(opt.finish(), opt2.finish());
    }

    #[test]
    fn lru_evicts_the_least_recently_used_within_the_budget() {
        let entry = 10 * 16 + ENTRY_OVERHEAD_BYTES;
        let cache = EncoderCache::new(3 * entry);
        for i in 0..3 {
            cache.put_embeddings(key(i), &rows(10, i as f32)).unwrap();
        }
        assert_eq!(cache.stats().entries, 3);
        assert_eq!(cache.stats().bytes, 3 * entry);
        // Use 0, so 1 is the oldest; a fourth entry evicts 1.
        assert!(cache.get_embeddings(&key(0)).is_some());
        cache.put_embeddings(key(3), &rows(10, 3.0)).unwrap();
        let s = cache.stats();
        assert_eq!((s.entries, s.evictions, s.bytes), (3, 1, 3 * entry));
        assert!(cache.get_embeddings(&key(1)).is_none());
        let back = cache.get_embeddings(&key(0)).expect("kept");
        assert_eq!(back.to_vec2::<f32>().unwrap(), vec![vec![0.0; 4]; 10]);
        // A bigger entry evicts as many as it needs; one over the budget is not kept.
        cache.put_embeddings(key(4), &rows(25, 4.0)).unwrap();
        let s = cache.stats();
        assert!(s.bytes <= s.budget_bytes, "{s:?}");
        assert_eq!((s.entries, s.evictions), (2, 3));
        cache.put_embeddings(key(5), &rows(100, 5.0)).unwrap();
        assert!(cache.get_embeddings(&key(5)).is_none());
        assert_eq!(cache.stats().bytes, s.bytes);
        let s = cache.stats();
        assert_eq!((s.hits, s.misses), (2, 2));
        // Replacing an entry does not count it twice.
        cache.put_embeddings(key(4), &rows(25, 4.0)).unwrap();
        assert_eq!(cache.stats().bytes, s.bytes);
        cache.clear();
        assert_eq!((cache.stats().entries, cache.stats().bytes), (0, 0));
    }

    #[test]
    fn kinds_do_not_answer_for_each_other_and_zero_is_off() {
        let cache = EncoderCache::new(1 << 20);
        let img = Arc::new(CachedImage {
            pixel_values: vec![1.0; 6],
            info: ImageInfo {
                original_hw: (2, 3),
                resized_hw: (28, 28),
                grid_thw: [1, 2, 2],
                tokens: 1,
            },
        });
        cache.put_image(key(1), img.clone());
        assert!(cache.get_embeddings(&key(1)).is_none());
        assert_eq!(cache.get_image(&key(1)), Some(img.clone()));
        let s = cache.stats();
        assert_eq!((s.misses, s.decode_hits, s.decode_misses), (1, 1, 0));

        let off = EncoderCache::new(0);
        assert!(!off.is_enabled());
        off.put_image(key(1), img);
        off.put_embeddings(key(2), &rows(1, 1.0)).unwrap();
        assert!(off.get_image(&key(1)).is_none() && off.get_embeddings(&key(2)).is_none());
        assert_eq!(
            off.stats(),
            EncoderCacheStats::default(),
            "off: nothing kept, nothing counted"
        );
    }

    #[test]
    fn embeddings_are_copied_out_of_views() {
        let cache = EncoderCache::new(1 << 20);
        let big = rows(1000, 2.0);
        cache
            .put_embeddings(key(1), &big.narrow(0, 10, 5).unwrap())
            .unwrap();
        assert_eq!(cache.stats().bytes, 5 * 16 + ENTRY_OVERHEAD_BYTES);
        let back = cache.get_embeddings(&key(1)).unwrap();
        assert_eq!(back.dims(), &[5, 4]);
    }
}

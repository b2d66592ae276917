//! The prefix cache (issue 13): the keys and values of prompts already computed, so a new
//! request that starts the same way (the same system message, the same image, the earlier
//! turns of a conversation) prefills only what is new.
//!
//! **Keys.** A prompt is cut into blocks of [`BLOCK_TOKENS`] positions; block `i` is named
//! by a SHA-256 chain over the model's identity, block `i-1`'s name and block `i`'s
//! positions ([`PrefixKey::block_hashes`]). A position is its token id, except the
//! `<|image_pad|>` / `<|video_pad|>` of an image or video, which stands for that item's
//! digest (the encoder cache's key: its pixels, its grid and the model): every pad has the
//! same id, so keying on ids alone would hand a request the keys and values of another
//! image (a bug two other engines shipped). Sampling settings are not in the key: they do
//! not change the prompt's keys and values.
//!
//! **Matches.** A request reuses the longest run of leading blocks that are cached, cut
//! back so that it never ends inside an image or video (the vision items of the prefix are
//! then skipped whole, and those of the rest are encoded whole) and so that at least one
//! position is left to prefill (its logits give the first token). Since an image rarely
//! ends on a block boundary, a prompt's entries also include a partial block from the last
//! full block before each image's end to that end (named in a domain of its own): a second
//! question about the same image then reuses the image too, not only what precedes it.
//! The M-RoPE ids are those of the whole prompt; the prefill runs on the rest with its
//! slice of them.
//!
//! **Copies, not shares.** An entry holds its own copy of its block's keys and values
//! ([`KvBlock`]); a sequence that hits gets them copied into its own, preallocated cache
//! ([`PrefixMatch::copy_into`]). No sequence ever writes into memory another reads, and
//! the engine's KV accounting stays per sequence and exact (a sequence reserves its whole
//! prompt, cached or not); the cache's bytes are counted apart, within its own budget
//! (`--prefix-cache-mb`). Copying ~1 MB per block of the 2B model costs far less than
//! recomputing it.
//!
//! **Eviction.** Least recently used, per block, within the budget (`lru::ByteLru`, the
//! encoder cache's rule too). A lookup or an insert touches a chain's blocks from its last
//! to its first, so a block is always more recent than its successors and eviction takes
//! the ends of chains first: a chain never loses its head while its tail is kept
//! unreachable.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::encoder_cache::{KeyBuilder, ENTRY_OVERHEAD_BYTES};
use crate::error::{Error, Result};
use crate::kv_cache::{KvBlock, KvCache};
use crate::lru::{ByteLru, CacheKey};
use crate::rope::VisionTokens;

/// Positions per block: the granularity of matches and entries (vLLM's default block).
pub const BLOCK_TOKENS: usize = 16;

/// One position of a prompt as the keys see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyToken {
    /// A token id.
    Id(u32),
    /// A pad of the vision item with this index into [`PrefixKey::digests`].
    Media(usize),
}

/// What names a sequence's positions in the prefix cache (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct PrefixKey {
    model: CacheKey,
    tokens: Vec<KeyToken>,
    /// Per vision item (images, then videos): its digest.
    digests: Vec<CacheKey>,
    /// Per vision item: the positions of its pads.
    spans: Vec<Range<usize>>,
}

impl PrefixKey {
    /// The key of a prompt of `input_ids` on the model named `model`
    /// ([`crate::model::Qwen2VL::identity`]): `images` and `videos` give each item's pad
    /// count and digest, in prompt order. The pads of each kind must add up to its items'
    /// counts.
    pub fn new(
        model: &CacheKey,
        input_ids: &[u32],
        pads: VisionTokens,
        images: &[(usize, CacheKey)],
        videos: &[(usize, CacheKey)],
    ) -> Result<Self> {
        let mut digests: Vec<CacheKey> = images.iter().map(|i| i.1).collect();
        digests.extend(videos.iter().map(|v| v.1));
        let mut spans: Vec<Range<usize>> = vec![0..0; digests.len()];
        // Per kind: the next item and the pads it still expects.
        let mut cursors = [(0usize, 0usize, images), (images.len(), 0, videos)];
        let mut tokens = Vec::with_capacity(input_ids.len());
        for (p, &id) in input_ids.iter().enumerate() {
            let kind = if id == pads.image_pad {
                0
            } else if id == pads.video_pad {
                1
            } else {
                tokens.push(KeyToken::Id(id));
                continue;
            };
            let (base, item, items) = &mut cursors[kind];
            // Skip items whose pads are all placed (and items of no pads).
            while items
                .get(*item)
                .is_some_and(|it| spans[*base + *item].len() >= it.0)
            {
                *item += 1;
            }
            if *item >= items.len() {
                return Err(Error::Internal(format!(
                    "the prompt has more vision pads than its {} items hold",
                    items.len()
                )));
            }
            let index = *base + *item;
            if spans[index].is_empty() {
                spans[index] = p..p;
            }
            spans[index].end = p + 1;
            tokens.push(KeyToken::Media(index));
        }
        let placed: usize = spans.iter().map(|s| s.len()).sum();
        let expected: usize = images.iter().chain(videos).map(|i| i.0).sum();
        if placed != expected {
            return Err(Error::Internal(format!(
                "the prompt has {placed} vision pads, its items {expected}"
            )));
        }
        Ok(PrefixKey {
            model: *model,
            tokens,
            digests,
            spans,
        })
    }

    /// Positions named.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether it names nothing.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The digests of the vision items, images then videos (the encoder cache's keys).
    pub fn media_digests(&self) -> &[CacheKey] {
        &self.digests
    }

    /// Adds generated token ids after the named positions (a finished sequence's cache
    /// holds them after its prompt).
    pub fn extend_ids(&mut self, ids: &[u32]) {
        self.tokens.extend(ids.iter().map(|&id| KeyToken::Id(id)));
    }

    /// The name of each full block: `hashes[i]` covers positions `0..(i+1)*BLOCK_TOKENS`.
    pub fn block_hashes(&self) -> Vec<CacheKey> {
        let mut prev = self.model;
        self.tokens
            .chunks_exact(BLOCK_TOKENS)
            .map(|block| {
                prev = self.hash_block("qwen2vl/prefix-block/v1", &prev, block);
                prev
            })
            .collect()
    }

    /// The name of `block`'s positions after the block named `prev`, in domain `domain`.
    fn hash_block(&self, domain: &str, prev: &CacheKey, block: &[KeyToken]) -> CacheKey {
        let mut k = KeyBuilder::new(domain);
        k.bytes(prev);
        for t in block {
            match *t {
                KeyToken::Id(id) => k.u64(id as u64),
                // Not an id (ids are u32): the two kinds cannot meet.
                KeyToken::Media(i) => k.u64(u64::MAX).bytes(&self.digests[i]),
            };
        }
        k.finish()
    }

    /// The partial blocks that end where a vision item ends inside a block, up to position
    /// `upto`: `(start, end, name)`, named after the full block before (`hashes`, from
    /// [`Self::block_hashes`]). Without them, two prompts that differ right after an image
    /// (a second question) would share no position of it: the last full block they share
    /// ends inside the image, and a match is cut back to its start.
    fn media_ends(&self, hashes: &[CacheKey], upto: usize) -> Vec<(usize, usize, CacheKey)> {
        self.spans
            .iter()
            .filter(|s| !s.is_empty() && s.end % BLOCK_TOKENS != 0 && s.end <= upto)
            .filter_map(|s| {
                let k = s.end / BLOCK_TOKENS;
                let prev = match k {
                    0 => self.model,
                    _ => *hashes.get(k - 1)?,
                };
                let block = self.tokens.get(k * BLOCK_TOKENS..s.end)?;
                let name = self.hash_block("qwen2vl/prefix-media-end/v1", &prev, block);
                Some((k * BLOCK_TOKENS, s.end, name))
            })
            .collect()
    }

    /// `len` cut back to the start of the vision item it would end inside, if any.
    pub fn clamp_to_media(&self, len: usize) -> usize {
        self.spans
            .iter()
            .find(|s| s.start < len && len < s.end)
            .map_or(len, |s| s.start)
    }
}

/// Counters and occupancy of a [`PrefixCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PrefixCacheStats {
    /// Lookups that reused at least one position.
    pub hits: u64,
    /// Lookups that reused nothing.
    pub misses: u64,
    /// Prompt positions whose keys and values were copied instead of computed.
    pub cached_tokens: u64,
    /// Blocks removed to make room.
    pub evictions: u64,
    /// Bytes held (keys and values plus [`ENTRY_OVERHEAD_BYTES`] per block); never above
    /// the budget.
    pub bytes: u64,
    /// Blocks held.
    pub blocks: u64,
    /// The budget in bytes (0: off).
    pub budget_bytes: u64,
}

/// A cached prefix found for a prompt: its blocks, and how many of their positions to use.
#[derive(Debug, Default)]
pub struct PrefixMatch {
    blocks: Vec<Arc<KvBlock>>,
    tokens: usize,
}

impl PrefixMatch {
    /// Positions reused (0: none).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Copies the reused positions into `cache`, which must be empty.
    pub fn copy_into(&self, cache: &mut KvCache) -> Result<()> {
        if !cache.is_empty() {
            return Err(Error::Internal(
                "a cached prefix goes into an empty cache".into(),
            ));
        }
        let mut left = self.tokens;
        for b in &self.blocks {
            let t = left.min(b.tokens());
            cache.extend_from(b, t)?;
            left -= t;
        }
        if left > 0 {
            return Err(Error::Internal("a prefix match without its blocks".into()));
        }
        Ok(())
    }
}

/// The mutable state: the blocks and the counters.
#[derive(Default)]
struct State {
    blocks: ByteLru<Arc<KvBlock>>,
    stats: PrefixCacheStats,
}

/// A thread-safe LRU of prompt blocks' keys and values within a byte budget (see the
/// [module docs](self)).
pub struct PrefixCache {
    budget: u64,
    inner: Mutex<State>,
}

impl std::fmt::Debug for PrefixCache {
    /// The counters, not the entries.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PrefixCache").field(&self.stats()).finish()
    }
}

impl Default for PrefixCache {
    /// A cache that is off.
    fn default() -> Self {
        PrefixCache::new(0)
    }
}

impl PrefixCache {
    /// A cache of at most `budget_bytes` (0: off).
    pub fn new(budget_bytes: u64) -> Self {
        PrefixCache {
            budget: budget_bytes,
            inner: Mutex::new(State::default()),
        }
    }

    /// A cache of at most `mb` MiB (`--prefix-cache-mb`; 0: off).
    pub fn with_mb(mb: u64) -> Self {
        PrefixCache::new(mb.saturating_mul(1 << 20))
    }

    /// Whether it keeps anything (a budget above 0). When off, callers build no keys.
    pub fn is_enabled(&self) -> bool {
        self.budget > 0
    }

    /// The state; every update completes before anything that could panic, so a poisoned
    /// lock is taken as is.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The longest cached prefix of `key` of at most `limit` positions that does not end
    /// inside a vision item, counting a hit or a miss.
    pub fn lookup(&self, key: &PrefixKey, limit: usize) -> PrefixMatch {
        if !self.is_enabled() {
            return PrefixMatch::default();
        }
        let hashes = key.block_hashes();
        let mut guard = self.lock();
        let st = &mut *guard;
        let found = hashes.iter().take_while(|h| st.blocks.contains(h)).count();
        // A partial block ending where an image ends, right after the full ones.
        let partial = key
            .media_ends(&hashes, limit)
            .into_iter()
            .find(|(start, _, name)| *start == found * BLOCK_TOKENS && st.blocks.contains(name));
        let (tokens, mut names) = match partial {
            Some((_, end, name)) => (end, vec![name]),
            None => {
                let tokens = key.clamp_to_media((found * BLOCK_TOKENS).min(limit));
                (tokens, Vec::new())
            }
        };
        let full =
            tokens / BLOCK_TOKENS + usize::from(names.is_empty() && tokens % BLOCK_TOKENS != 0);
        names.extend(hashes[..full].iter().rev());
        // Last to first: a block stays more recent than the ones after it.
        let mut blocks: Vec<Arc<KvBlock>> = names
            .iter()
            .filter_map(|h| st.blocks.touch(h).cloned())
            .collect();
        blocks.reverse();
        if blocks.len() != names.len() {
            // Not reachable: the blocks were found under the same lock.
            return PrefixMatch::default();
        }
        if tokens > 0 {
            st.stats.hits += 1;
            st.stats.cached_tokens += tokens as u64;
        } else {
            st.stats.misses += 1;
        }
        PrefixMatch { blocks, tokens }
    }

    /// Keeps the full blocks of `key` that `cache` holds (its first `cache.len()`
    /// positions are those `key` names): blocks already held are touched, the others are
    /// copied out of `cache`.
    pub fn insert(&self, key: &PrefixKey, cache: &KvCache) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        let hashes = key.block_hashes();
        let stored = cache.len().min(key.len());
        let full = stored / BLOCK_TOKENS;
        // Partial blocks first: each is older than the full block before it.
        let mut todo: Vec<(usize, usize, CacheKey)> = key.media_ends(&hashes, stored);
        todo.extend(
            (0..full)
                .rev()
                .map(|i| (i * BLOCK_TOKENS, (i + 1) * BLOCK_TOKENS, hashes[i])),
        );
        let mut guard = self.lock();
        let st = &mut *guard;
        for (start, end, h) in todo {
            if st.blocks.touch(&h).is_some() {
                continue;
            }
            let block = cache.copy_block(start, end - start)?;
            let bytes = block.bytes() as u64 + ENTRY_OVERHEAD_BYTES;
            st.stats.evictions += st.blocks.insert(h, Arc::new(block), bytes, self.budget);
        }
        st.stats.bytes = st.blocks.bytes();
        Ok(())
    }

    /// Counters and occupancy.
    pub fn stats(&self) -> PrefixCacheStats {
        let st = self.lock();
        PrefixCacheStats {
            blocks: st.blocks.len() as u64,
            bytes: st.blocks.bytes(),
            budget_bytes: self.budget,
            ..st.stats
        }
    }

    /// Drops every block (the counters stay).
    pub fn clear(&self) {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.blocks.clear();
        st.stats.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    const PADS: VisionTokens = VisionTokens {
        image_pad: 9,
        video_pad: 8,
    };

    fn key(ids: &[u32], images: &[(usize, CacheKey)]) -> PrefixKey {
        PrefixKey::new(&[1; 32], ids, PADS, images, &[]).expect("key")
    }

    #[test]
    fn pads_stand_for_their_item_and_blocks_chain() {
        // 16 text ids, then an image of 20 pads, then 12 text ids: 48 positions, 3 blocks.
        let mut ids: Vec<u32> = (100..116).collect();
        ids.extend([9; 20]);
        ids.extend(200..212);
        let a = key(&ids, &[(20, [7; 32])]);
        let b = key(&ids, &[(20, [6; 32])]);
        let (ha, hb) = (a.block_hashes(), b.block_hashes());
        assert_eq!(ha.len(), 3);
        assert_eq!(ha[0], hb[0], "the text before the image is shared");
        assert_ne!(ha[1], hb[1], "same pads, other image: other blocks");
        assert_ne!(ha[2], hb[2], "and every block after it");
        // A match never ends inside the image (positions 16..36).
        assert_eq!(a.clamp_to_media(32), 16);
        assert_eq!(a.clamp_to_media(36), 36);
        assert_eq!(a.clamp_to_media(16), 16);
        // Another model: nothing shared.
        let other = PrefixKey::new(&[2; 32], &ids, PADS, &[(20, [7; 32])], &[]).unwrap();
        assert_ne!(other.block_hashes()[0], ha[0]);
        // Pads that do not add up are an internal error, not a wrong key.
        assert!(PrefixKey::new(&[1; 32], &ids, PADS, &[(19, [7; 32])], &[]).is_err());
        assert!(PrefixKey::new(&[1; 32], &ids, PADS, &[(21, [7; 32])], &[]).is_err());
    }

    /// A cache of `n` positions whose every value is its position.
    fn filled(n: usize) -> KvCache {
        let mut c = KvCache::new(2, 1, 4, 64, DType::F32, &Device::Cpu).unwrap();
        let pos: Vec<f32> = (0..n).flat_map(|p| [p as f32; 4]).collect();
        let t = candle_core::Tensor::from_vec(pos, (1, n, 4), &Device::Cpu).unwrap();
        for layer in 0..2 {
            c.append(layer, &t, &t).unwrap();
        }
        c.advance(n);
        c
    }

    #[test]
    fn lookups_copy_the_longest_cached_prefix_and_evict_chain_ends_first() {
        let ids: Vec<u32> = (100..140).collect();
        let k = key(&ids, &[]);
        let block = 2 * 2 * BLOCK_TOKENS as u64 * 4 * 4 + ENTRY_OVERHEAD_BYTES;
        let cache = PrefixCache::new(10 * block);
        assert_eq!(cache.lookup(&k, 39).tokens(), 0);
        cache.insert(&k, &filled(40)).unwrap();
        let s = cache.stats();
        assert_eq!((s.blocks, s.bytes, s.misses), (2, 2 * block, 1), "{s:?}");
        let m = cache.lookup(&k, 39);
        assert_eq!(m.tokens(), 32);
        // The limit keeps at least one position to prefill.
        assert_eq!(cache.lookup(&k, 20).tokens(), 20);
        let mut seq = KvCache::new(2, 1, 4, 64, DType::F32, &Device::Cpu).unwrap();
        m.copy_into(&mut seq).unwrap();
        assert_eq!(seq.len(), 32);
        let copied = seq.copy_block(0, 32).unwrap();
        assert_eq!(copied.tokens(), 32);
        assert!(m.copy_into(&mut seq).is_err(), "only into an empty cache");
        // A different second block: the first is shared, the second is not.
        let mut other = ids.clone();
        other[20] = 999;
        let m = cache.lookup(&key(&other, &[]), 39);
        assert_eq!(m.tokens(), 16);
        // A budget of three blocks: inserting a fourth evicts the end of the older chain.
        let small = PrefixCache::new(3 * block);
        small.insert(&k, &filled(40)).unwrap();
        small.insert(&key(&other, &[]), &filled(40)).unwrap();
        let s = small.stats();
        assert_eq!((s.blocks, s.evictions), (3, 0), "{s:?}");
        let third: Vec<u32> = (100..116).chain(500..516).collect();
        small.insert(&key(&third, &[]), &filled(32)).unwrap();
        let s = small.stats();
        assert_eq!((s.blocks, s.evictions), (3, 1), "{s:?}");
        assert!(s.bytes <= s.budget_bytes);
        // The shared head survives; `k`'s tail (the least recent) went.
        assert_eq!(small.lookup(&k, 39).tokens(), 16);
        assert_eq!(small.lookup(&key(&other, &[]), 39).tokens(), 32);
        // Off: nothing kept, nothing counted.
        let off = PrefixCache::new(0);
        off.insert(&k, &filled(40)).unwrap();
        assert_eq!(off.lookup(&k, 39).tokens(), 0);
        assert_eq!(off.stats(), PrefixCacheStats::default());
    }
}

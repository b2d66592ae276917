//! Per-sequence key/value cache, preallocated once and owned by whoever runs the sequence
//! (the engine), never by a layer: the same layers serve many sequences in one batch.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Keys and values of every decoder layer for one sequence.
///
/// Each layer holds `k, v: (kv_heads, capacity, head_dim)`, allocated up front; tokens are
/// written in place at `len..len+t`, so decoding never reallocates or copies the cache.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// Allocates a cache for `capacity` tokens.
    pub fn new(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let layers = (0..num_layers)
            .map(|_| {
                let k = Tensor::zeros((kv_heads, capacity, head_dim), dtype, device)?;
                let v = Tensor::zeros((kv_heads, capacity, head_dim), dtype, device)?;
                Ok((k, v))
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
        })
    }

    /// Tokens stored so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// Checks that `t` more tokens fit.
    pub fn ensure_room(&self, t: usize) -> Result<()> {
        if self.len + t > self.capacity {
            return Err(Error::bad_input(
                format!("the sequence needs {} tokens of context", self.len + t),
                format!(
                    "at most {} tokens (this sequence's KV cache)",
                    self.capacity
                ),
            ));
        }
        Ok(())
    }

    /// Writes `k, v: (kv_heads, t, head_dim)` for `layer` at positions `len..len+t` and returns
    /// the keys and values of positions `0..len+t`, each `(kv_heads, len+t, head_dim)` (views
    /// into the cache, no copy). Call [`KvCache::advance`] once all layers are written.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(1)?;
        self.ensure_room(t)?;
        let (ck, cv) = &self.layers[layer];
        ck.slice_set(&k.contiguous()?, 1, self.len)?;
        cv.slice_set(&v.contiguous()?, 1, self.len)?;
        Ok((
            ck.narrow(1, 0, self.len + t)?,
            cv.narrow(1, 0, self.len + t)?,
        ))
    }

    /// Marks `t` more tokens as stored (after every layer appended them).
    pub fn advance(&mut self, t: usize) {
        self.len += t;
        debug_assert!(self.len <= self.capacity);
    }

    /// Forgets the stored tokens (keeps the memory).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Copies the keys and values of positions `start..start+t` of every layer into a
    /// [`KvBlock`] of its own storage (a view would keep this whole cache alive, and the
    /// sequence goes on writing into it).
    pub fn copy_block(&self, start: usize, t: usize) -> Result<KvBlock> {
        if start + t > self.len {
            return Err(Error::Internal(format!(
                "KV block {start}..{} is past the {} stored tokens",
                start + t,
                self.len
            )));
        }
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.narrow(1, start, t)?.force_contiguous()?,
                    v.narrow(1, start, t)?.force_contiguous()?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(KvBlock { layers, tokens: t })
    }

    /// Appends the first `t` tokens of `block` (every layer) after the stored ones, as if
    /// they had been computed here.
    pub fn extend_from(&mut self, block: &KvBlock, t: usize) -> Result<()> {
        if t > block.tokens || block.layers.len() != self.layers.len() {
            return Err(Error::Internal(format!(
                "a KV block of {} tokens and {} layers cannot give {t} tokens to a cache of {} layers",
                block.tokens,
                block.layers.len(),
                self.layers.len()
            )));
        }
        self.ensure_room(t)?;
        for ((ck, cv), (bk, bv)) in self.layers.iter().zip(&block.layers) {
            ck.slice_set(&bk.narrow(1, 0, t)?.contiguous()?, 1, self.len)?;
            cv.slice_set(&bv.narrow(1, 0, t)?.contiguous()?, 1, self.len)?;
        }
        self.len += t;
        Ok(())
    }
}

/// Keys and values of a run of positions of every layer, copied out of a [`KvCache`]: each
/// layer `k, v: (kv_heads, tokens, head_dim)`. What the prefix cache keeps
/// ([`crate::prefix_cache`]); a sequence gets a copy into its own cache, never a share.
#[derive(Debug)]
pub struct KvBlock {
    layers: Vec<(Tensor, Tensor)>,
    tokens: usize,
}

impl KvBlock {
    /// Positions it holds.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Bytes of its keys and values.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

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
}

//! The Qwen2 decoder with M-RoPE (mirrors `Qwen2VLModel` + `lm_head`, transformers 4.49).
//!
//! Layers are pure compute: the caller passes, per sequence, its rotary tables and its
//! [`KvCache`]. The projections run on the whole batch at once; attention runs per sequence
//! against that sequence's cache (their lengths differ under continuous batching).

use std::ops::Range;

use candle_core::{DType, Tensor};

use crate::config::TextConfig;
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::nn::{attention_causal, Linear, Mlp, RmsNorm};
use crate::vision::{row_chunks, MIN_CHUNK_ROWS, MIN_PRODUCT_ROWS, UNIT_FLOPS};
use crate::weights::Weights;

/// `Qwen2VLAttention`: q/k/v with bias, o without, GQA, M-RoPE applied by the caller's tables.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// The sliding window, if any ([`TextConfig::attention_window`]).
    window: Option<usize>,
}

impl Attention {
    fn load(w: &Weights, prefix: &str, cfg: &TextConfig) -> Result<Self> {
        let (h, kv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let d = cfg.hidden_size;
        Ok(Attention {
            q_proj: Linear::load(w, &format!("{prefix}.q_proj"), d, h * hd, true)?,
            k_proj: Linear::load(w, &format!("{prefix}.k_proj"), d, kv * hd, true)?,
            v_proj: Linear::load(w, &format!("{prefix}.v_proj"), d, kv * hd, true)?,
            o_proj: Linear::load(w, &format!("{prefix}.o_proj"), h * hd, d, false)?,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: hd,
            window: cfg.attention_window(),
        })
    }

    /// `x: (..., hidden)` → q `(..., heads·hd)`, k and v `(..., kv_heads·hd)`, as one group
    /// product when the weights are quantized ([`Linear::forward_group`]).
    fn project(&self, x: &Tensor) -> Result<[Tensor; 3]> {
        <[Tensor; 3]>::try_from(Linear::forward_group(
            &[&self.q_proj, &self.k_proj, &self.v_proj],
            x,
        )?)
        .map_err(|_| Error::Internal("q/k/v: three outputs expected".into()))
    }

    /// `x: (B, T, hidden)`, `cos/sin: (B, T, head_dim/2)`; sequence `b` appends its `T` keys
    /// to `caches[b]` at `caches[b].len()`. Returns `(B, T, hidden)`.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        layer: usize,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let group = h / kv;
        let [q, k, v] = self.project(x)?;
        let q = q.reshape((b, t, h, hd))?;
        let k = k.reshape((b, t, kv, hd))?;
        let v = v.reshape((b, t, kv, hd))?;
        let q = candle_nn::rotary_emb::rope_thd(&q.contiguous()?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_thd(&k.contiguous()?, cos, sin)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outs = Vec::with_capacity(b);
        for (i, cache) in caches.iter_mut().enumerate() {
            let past = cache.len();
            // (T, kv, hd) → (kv, T, hd)
            let ki = k.get(i)?.transpose(0, 1)?;
            let vi = v.get(i)?.transpose(0, 1)?;
            let (keys, values) = cache.append(layer, &ki, &vi)?; // (kv, past+T, hd)
                                                                 // (T, h, hd) → (h, T, hd) → (kv, group, T, hd): head = kv_idx * group + g.
            let qi = q
                .get(i)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((kv, group, t, hd))?;
            let o = attention_causal(&qi, &keys, &values, scale, past, self.window)?; // (kv, group, T, hd)
            let o = o
                .reshape((h, t, hd))?
                .transpose(0, 1)?
                .reshape((t, h * hd))?;
            outs.push(o);
        }
        let o = Tensor::stack(&outs, 0)?; // (B, T, h*hd)
        self.o_proj.forward(&o)
    }
}

/// A decoder layer's feed-forward part: the SwiGLU MLP, or (`Qwen2MoeForCausalLM`) a sparse
/// mixture-of-experts block.
#[derive(Debug, Clone)]
enum FeedForward {
    Dense(Mlp),
    Sparse(crate::moe::SparseMoeBlock),
}

impl FeedForward {
    fn load(w: &Weights, prefix: &str, layer: usize, cfg: &TextConfig) -> Result<Self> {
        match &cfg.moe {
            Some(moe) if moe.is_sparse(layer) => Ok(FeedForward::Sparse(
                crate::moe::SparseMoeBlock::load(w, prefix, cfg.hidden_size, moe)?,
            )),
            _ => Ok(FeedForward::Dense(Mlp::load_sized(
                w,
                prefix,
                cfg.hidden_size,
                cfg.intermediate_size,
            )?)),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Dense(m) => m.forward(x),
            FeedForward::Sparse(m) => m.forward(x),
        }
    }
}

/// `Qwen2VLDecoderLayer`: pre-norm attention and MLP with residuals.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
}

impl DecoderLayer {
    fn load(w: &Weights, i: usize, cfg: &TextConfig) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let eps = cfg.rms_norm_eps;
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::load(
                w,
                &format!("{p}.input_layernorm"),
                cfg.hidden_size,
                eps,
            )?,
            self_attn: Attention::load(w, &format!("{p}.self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(
                w,
                &format!("{p}.post_attention_layernorm"),
                cfg.hidden_size,
                eps,
            )?,
            mlp: FeedForward::load(w, &format!("{p}.mlp"), i, cfg)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        layer: usize,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let a =
            self.self_attn
                .forward(&self.input_layernorm.forward(x)?, cos, sin, layer, caches)?;
        let x = (x + a)?;
        let m = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + m)?)
    }

    /// The first part of [`DecoderLayer::forward`] for rows of one sequence: `x: (c, hidden)`
    /// and their rope tables `(c, head_dim/2)` → roped q `(c, heads, hd)`, k and v
    /// `(c, kv_heads, hd)`.
    fn qkv_rows(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<[Tensor; 3]> {
        let a = &self.self_attn;
        let c = x.dim(0)?;
        let (h, kv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let x = self.input_layernorm.forward(x)?;
        let [q, k, v] = a.project(&x)?;
        let q = q.reshape((1, c, h, hd))?;
        let k = k.reshape((1, c, kv, hd))?;
        let v = v.reshape((c, kv, hd))?;
        let q = candle_nn::rotary_emb::rope_thd(&q.contiguous()?, cos, sin)?.squeeze(0)?;
        let k = candle_nn::rotary_emb::rope_thd(&k.contiguous()?, cos, sin)?.squeeze(0)?;
        Ok([q, k, v])
    }

    /// The rest of [`DecoderLayer::forward`] for query rows `rows` of a prompt whose first
    /// token sits at cache position `past`: `x: (c, hidden)` the layer's input rows, `q:
    /// (c, heads, hd)` their queries, `keys/values: (kv_heads, ≥ past + rows.end, hd)` the
    /// cache. Returns the layer's output rows `(c, hidden)`.
    fn attend_rows(
        &self,
        x: &Tensor,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        past: usize,
        rows: &Range<usize>,
    ) -> Result<Tensor> {
        let a = &self.self_attn;
        let c = rows.len();
        let (h, kv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let keys = keys.narrow(1, 0, past + rows.end)?;
        let values = values.narrow(1, 0, past + rows.end)?;
        // (c, h, hd) → (h, c, hd) → (kv, group, c, hd): head = kv_idx * group + g.
        let q = q
            .transpose(0, 1)?
            .contiguous()?
            .reshape((kv, h / kv, c, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let o = attention_causal(&q, &keys, &values, scale, past + rows.start, a.window)?;
        let o = o
            .reshape((h, c, hd))?
            .transpose(0, 1)?
            .reshape((c, h * hd))?;
        let x = (x + a.o_proj.forward(&o)?)?;
        let m = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + m)?)
    }
}

/// One decoder layer over one sequence's new tokens, cut into units of work of about
/// [`UNIT_FLOPS`] (see [`TextModel::begin_layer`]): chunks of rows of the first stage
/// (RMSNorm, q/k/v, rope; the keys and values go into the cache when it ends), then chunks
/// of query rows of the second (causal attention against the keys up to the chunk's last
/// row, output projection, residual, MLP). A layer over a long prompt (a 16k-token image)
/// thus holds the engine for a fraction of a second at a time, not for its whole attention.
///
/// [`TextModel::forward`] and [`TextModel::forward_layer`] run the same units for a single
/// sequence, so a layer run unit by unit gives their bits exactly.
#[derive(Debug)]
pub struct LayerPass<'t> {
    layer: &'t DecoderLayer,
    index: usize,
    /// `(T, hidden)` input rows.
    x: Tensor,
    /// `(T, head_dim/2)` rope tables.
    cos: Tensor,
    sin: Tensor,
    /// Cache position of the first new token.
    past: usize,
    /// `(attention stage?, rows)` in order.
    plan: Vec<(bool, Range<usize>)>,
    next: usize,
    qkv_parts: [Vec<Tensor>; 3],
    q: Option<Tensor>,
    kv: Option<(Tensor, Tensor)>,
    out: Vec<Tensor>,
    result: Option<Tensor>,
}

impl LayerPass<'_> {
    /// Runs the next unit; `true` once the layer is done (then take
    /// [`LayerPass::finish`]). `cache` must be the one the pass began with.
    pub fn step(&mut self, cache: &mut KvCache) -> Result<bool> {
        let Some((attend, rows)) = self.plan.get(self.next).cloned() else {
            return Ok(true);
        };
        let x = self.x.narrow(0, rows.start, rows.len())?;
        if attend {
            let (Some(q), Some((k, v))) = (&self.q, &self.kv) else {
                return Err(Error::Internal("layer pass: attention before q/k/v".into()));
            };
            let q = q.narrow(0, rows.start, rows.len())?;
            let out = self.layer.attend_rows(&x, &q, k, v, self.past, &rows)?;
            self.out.push(out);
        } else {
            let cos = self.cos.narrow(0, rows.start, rows.len())?;
            let sin = self.sin.narrow(0, rows.start, rows.len())?;
            let parts = self.layer.qkv_rows(&x, &cos, &sin)?;
            for (all, part) in self.qkv_parts.iter_mut().zip(parts) {
                all.push(part);
            }
        }
        self.next += 1;
        let next_attends = self.plan.get(self.next).map(|p| p.0);
        if !attend && next_attends != Some(false) {
            // q/k/v done: keys and values go into the cache at `past..past + T`.
            let [q, k, v] = std::mem::take(&mut self.qkv_parts).map(cat_rows);
            let (k, v) = (k?.transpose(0, 1)?, v?.transpose(0, 1)?); // (kv, T, hd)
            if cache.len() != self.past {
                return Err(Error::Internal(
                    "layer pass: the cache changed during the pass".into(),
                ));
            }
            self.kv = Some(cache.append(self.index, &k, &v)?);
            self.q = Some(q?);
        }
        if self.next >= self.plan.len() {
            let out = cat_rows(std::mem::take(&mut self.out))?;
            self.result = Some(out.unsqueeze(0)?);
            self.q = None;
            self.kv = None;
        }
        Ok(self.next >= self.plan.len())
    }

    /// Units in all.
    pub fn units(&self) -> usize {
        self.plan.len()
    }

    /// Runs the units left; the layer's output `(1, T, hidden)`.
    pub fn finish(mut self, cache: &mut KvCache) -> Result<Tensor> {
        while !self.step(cache)? {}
        self.result
            .take()
            .ok_or_else(|| Error::Internal("layer pass ended without output".into()))
    }
}

/// Row parts joined (one part as is).
fn cat_rows(mut parts: Vec<Tensor>) -> Result<Tensor> {
    match parts.len() {
        0 => Err(Error::Internal("layer pass: no rows".into())),
        1 => Ok(parts.pop().expect("one part")),
        _ => Ok(Tensor::cat(&parts, 0)?),
    }
}

/// The token embeddings `(vocab, hidden)`: float, or quantized rows dequantized on lookup
/// (then shared with a tied LM head, so the largest matrix of a small model is stored once).
#[derive(Debug, Clone)]
struct Embeddings {
    table: EmbeddingTable,
    /// The compute dtype lookups return.
    dtype: DType,
    device: candle_core::Device,
}

#[derive(Debug, Clone)]
enum EmbeddingTable {
    Dense(Tensor),
    Quant(std::sync::Arc<crate::ops::quant::QMatrix>),
    /// f16/bf16 rows left in the checkpoint, widened on lookup (f32 compute).
    Half(std::sync::Arc<crate::ops::gemm_half::HalfMatrix>),
}

impl Embeddings {
    fn load(w: &Weights, cfg: &TextConfig) -> Result<Self> {
        let name = "model.embed_tokens.weight";
        let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
        let table = match (
            w.stored_quant(name, vocab, hidden)?,
            w.quant_for(name, hidden),
        ) {
            (Some(q), _) => EmbeddingTable::Quant(std::sync::Arc::new(q)),
            (None, Some(t)) => EmbeddingTable::Quant(std::sync::Arc::new(
                w.get_quantized(name, vocab, hidden, t)?,
            )),
            (None, None) => match w.get_half(name, vocab, hidden)? {
                Some(h) => EmbeddingTable::Half(std::sync::Arc::new(h)),
                None => EmbeddingTable::Dense(w.get(name, (vocab, hidden))?),
            },
        };
        Ok(Embeddings {
            table,
            dtype: w.dtype(),
            device: w.device().clone(),
        })
    }

    /// The tied LM head over the same table.
    fn as_linear(&self) -> Linear {
        match &self.table {
            EmbeddingTable::Dense(t) => Linear::from_weight(t.clone()),
            EmbeddingTable::Quant(q) => Linear::Quant(crate::nn::QLinear {
                weight: q.clone(),
                bias: None,
                device: self.device.clone(),
            }),
            EmbeddingTable::Half(h) => Linear::Half(crate::nn::HalfLinear {
                weight: h.clone(),
                bias: None,
                device: self.device.clone(),
            }),
        }
    }

    /// `ids` (checked against the vocabulary) → `(n, hidden)`.
    fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        match &self.table {
            EmbeddingTable::Dense(t) => {
                let idx = Tensor::from_slice(ids, ids.len(), &self.device)?;
                Ok(t.index_select(&idx, 0)?)
            }
            EmbeddingTable::Quant(q) => {
                let k = q.dims().1;
                let mut out = vec![0f32; ids.len() * k];
                for (row, &id) in out.chunks_exact_mut(k).zip(ids) {
                    q.dequantize_row(id as usize, row);
                }
                Ok(Tensor::from_vec(out, (ids.len(), k), &self.device)?.to_dtype(self.dtype)?)
            }
            EmbeddingTable::Half(h) => {
                let (vocab, k) = h.dims();
                let mut out = vec![0f32; ids.len() * k];
                for (row, &id) in out.chunks_exact_mut(k).zip(ids) {
                    if id as usize >= vocab {
                        return Err(Error::Internal(format!(
                            "token id {id} is outside the {vocab}-row embedding table"
                        )));
                    }
                    h.row_f32(id as usize, row);
                }
                Ok(Tensor::from_vec(out, (ids.len(), k), &self.device)?.to_dtype(self.dtype)?)
            }
        }
    }
}

/// Embeddings, decoder layers, final norm and LM head.
#[derive(Debug, Clone)]
pub struct TextModel {
    embed_tokens: Embeddings,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    cfg: TextConfig,
}

impl TextModel {
    /// Loads `model.*` and `lm_head` (or ties it to the embeddings).
    pub fn load(w: &Weights, cfg: &TextConfig) -> Result<Self> {
        if cfg.num_attention_heads == 0
            || cfg.num_key_value_heads == 0
            || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
            || !cfg
                .num_attention_heads
                .is_multiple_of(cfg.num_key_value_heads)
        {
            return Err(Error::Weights(format!(
                "hidden_size {} / heads {} / kv heads {} do not divide evenly",
                cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
            )));
        }
        let sections: usize = cfg.mrope_section().iter().sum();
        if sections * 2 != cfg.head_dim() {
            return Err(Error::Weights(format!(
                "mrope_section {:?} sums to {sections}, but head_dim / 2 is {}",
                cfg.mrope_section(),
                cfg.head_dim() / 2
            )));
        }
        let embed_tokens = Embeddings::load(w, cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(w, i, cfg))
            .collect::<Result<_>>()?;
        let norm = RmsNorm::load(w, "model.norm", cfg.hidden_size, cfg.rms_norm_eps)?;
        // Tied checkpoints usually have no lm_head; some still store it. Use it when present.
        let lm_head = if !cfg.tie_word_embeddings || w.contains("lm_head.weight") {
            Linear::load(w, "lm_head", cfg.hidden_size, cfg.vocab_size, false)?
        } else {
            embed_tokens.as_linear()
        };
        Ok(TextModel {
            embed_tokens,
            layers,
            norm,
            lm_head,
            cfg: cfg.clone(),
        })
    }

    /// The text config.
    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// `ids` → `(n, hidden)`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let vocab = self.cfg.vocab_size;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::bad_input(
                format!("token id {bad} is outside the vocabulary"),
                format!("ids below {vocab}"),
            ));
        }
        self.embed_tokens.lookup(ids)
    }

    /// Runs the decoder layers: `x: (B, T, hidden)`, `cos/sin: (B, T, head_dim/2)`, one cache
    /// per sequence (each gets `T` tokens appended). Returns the last layer's output
    /// `(B, T, hidden)` (before the final norm). When `collect` is given, each layer's output
    /// is pushed to it (for layer-by-layer comparison with the reference).
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        caches: &mut [&mut KvCache],
        mut collect: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if caches.len() != b {
            return Err(Error::Internal(format!(
                "{} caches for a batch of {b}",
                caches.len()
            )));
        }
        for c in caches.iter() {
            c.ensure_room(t)?;
        }
        let mut x = x.clone();
        for i in 0..self.layers.len() {
            x = self.forward_layer(i, &x, cos, sin, caches)?;
            if let Some(c) = collect.as_deref_mut() {
                c.push(x.clone());
            }
        }
        for c in caches.iter_mut() {
            c.advance(t);
        }
        Ok(x)
    }

    /// Decoder layers in all.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Runs decoder layer `layer` alone (one iteration of [`TextModel::forward`]'s loop):
    /// `x: (B, T, hidden)` → `(B, T, hidden)`, writing the layer's keys and values after
    /// each cache's current length. Run every layer in order, then
    /// [`KvCache::advance`] each cache by `T`: that is exactly [`TextModel::forward`], cut
    /// where the serving engine interleaves other work. One sequence (`B = 1`) runs as a
    /// [`LayerPass`] to its end.
    pub fn forward_layer(
        &self,
        layer: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let l = self.layers.get(layer).ok_or_else(|| {
            Error::Internal(format!(
                "decoder layer {layer} of {} does not exist",
                self.layers.len()
            ))
        })?;
        let t = x.dim(1)?;
        for c in caches.iter() {
            c.ensure_room(t)?;
        }
        if let [cache] = caches {
            let pass = self.begin_layer(layer, x, cos, sin, cache, None)?;
            return pass.finish(cache);
        }
        l.forward(x, cos, sin, layer, caches)
    }

    /// Starts decoder layer `layer` over one sequence's `T` new tokens as a [`LayerPass`]:
    /// `x: (1, T, hidden)`, `cos/sin: (1, T, head_dim/2)`, `cache` holding the tokens before
    /// them (room for `T` more is checked). Nothing heavy runs here. `rows` cuts both stages
    /// into chunks of that many rows (at least [`MIN_CHUNK_ROWS`]) instead of chunks of about
    /// [`UNIT_FLOPS`] (tests cut short prompts as finely as long ones are cut).
    pub fn begin_layer(
        &self,
        layer: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: &KvCache,
        rows: Option<usize>,
    ) -> Result<LayerPass<'_>> {
        let l = self.layers.get(layer).ok_or_else(|| {
            Error::Internal(format!(
                "decoder layer {layer} of {} does not exist",
                self.layers.len()
            ))
        })?;
        let (b, t, _) = x.dims3()?;
        if b != 1 || cos.dims3()?.0 != 1 || sin.dims3()?.0 != 1 {
            return Err(Error::Internal(format!(
                "a layer pass runs one sequence, not {b}"
            )));
        }
        cache.ensure_room(t)?;
        let past = cache.len();
        Ok(LayerPass {
            layer: l,
            index: layer,
            x: x.squeeze(0)?,
            cos: cos.squeeze(0)?.contiguous()?,
            sin: sin.squeeze(0)?.contiguous()?,
            past,
            plan: self.layer_plan(t, past, rows),
            next: 0,
            qkv_parts: [Vec::new(), Vec::new(), Vec::new()],
            q: None,
            kv: None,
            out: Vec::new(),
            result: None,
        })
    }

    /// Units of a [`LayerPass`] over `t` new tokens after `past` cached ones.
    pub fn layer_units(&self, t: usize, past: usize, rows: Option<usize>) -> usize {
        self.layer_plan(t, past, rows).len()
    }

    /// The chunks of a [`LayerPass`]: `(attention stage?, rows)`.
    fn layer_plan(&self, t: usize, past: usize, rows: Option<usize>) -> Vec<(bool, Range<usize>)> {
        let cfg = &self.cfg;
        let (d, hd) = (cfg.hidden_size as f64, cfg.head_dim() as f64);
        let (h, kv) = (
            cfg.num_attention_heads as f64,
            cfg.num_key_value_heads as f64,
        );
        // Both stages multiply by weight matrices: see MIN_PRODUCT_ROWS.
        let rows_for = |per_row: f64| {
            rows.unwrap_or(((UNIT_FLOPS / per_row.max(1.0)) as usize).max(MIN_PRODUCT_ROWS))
                .max(MIN_CHUNK_ROWS)
        };
        let qkv = rows_for(2.0 * d * (h + 2.0 * kv) * hd);
        let keys = (past + t) as f64;
        let attend = rows_for(
            4.0 * keys * h * hd + 2.0 * h * hd * d + 6.0 * d * cfg.intermediate_size as f64,
        );
        let mut plan: Vec<(bool, Range<usize>)> =
            row_chunks(0..t, qkv).map(|r| (false, r)).collect();
        plan.extend(row_chunks(0..t, attend).map(|r| (true, r)));
        plan
    }

    /// Final norm of `(B, hidden)` hidden states.
    pub fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        self.norm.forward(h)
    }

    /// `(B, hidden)` (before the final norm) → logits `(B, vocab)` in f32.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let h = self.norm.forward(h)?;
        Ok(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
    }

    /// Last position of each sequence: `(B, T, hidden)` → `(B, hidden)`.
    pub fn last_position(h: &Tensor) -> Result<Tensor> {
        let t = h.dim(1)?;
        Ok(h.narrow(1, t - 1, 1)?.squeeze(1)?)
    }

    /// A fresh cache sized for `capacity` tokens.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        KvCache::new(
            self.cfg.num_hidden_layers,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim(),
            capacity,
            self.embed_tokens.dtype,
            &self.embed_tokens.device,
        )
    }
}

//! The Qwen2 decoder with M-RoPE (mirrors `Qwen2VLModel` + `lm_head`, transformers 4.49).
//!
//! Layers are pure compute: the caller passes, per sequence, its rotary tables and its
//! [`KvCache`]. The projections run on the whole batch at once; attention runs per sequence
//! against that sequence's cache (their lengths differ under continuous batching).

use candle_core::{DType, Tensor};

use crate::config::TextConfig;
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::nn::{attention, Linear, RmsNorm};
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
        })
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
        let q = self.q_proj.forward(x)?.reshape((b, t, h, hd))?;
        let k = self.k_proj.forward(x)?.reshape((b, t, kv, hd))?;
        let v = self.v_proj.forward(x)?.reshape((b, t, kv, hd))?;
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
            let o = attention(&qi, &keys, &values, scale, Some(past))?; // (kv, group, T, hd)
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

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(w: &Weights, prefix: &str, cfg: &TextConfig) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_proj: Linear::load(w, &format!("{prefix}.gate_proj"), d, i, false)?,
            up_proj: Linear::load(w, &format!("{prefix}.up_proj"), d, i, false)?,
            down_proj: Linear::load(w, &format!("{prefix}.down_proj"), i, d, false)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate_proj.forward(x)?.silu()?;
        let u = self.up_proj.forward(x)?;
        self.down_proj.forward(&(g * u)?)
    }
}

/// `Qwen2VLDecoderLayer`: pre-norm attention and MLP with residuals.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
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
            mlp: Mlp::load(w, &format!("{p}.mlp"), cfg)?,
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
}

/// Embeddings, decoder layers, final norm and LM head.
#[derive(Debug, Clone)]
pub struct TextModel {
    embed_tokens: Tensor,
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
        let embed_tokens = w.get(
            "model.embed_tokens.weight",
            (cfg.vocab_size, cfg.hidden_size),
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(w, i, cfg))
            .collect::<Result<_>>()?;
        let norm = RmsNorm::load(w, "model.norm", cfg.hidden_size, cfg.rms_norm_eps)?;
        // Tied checkpoints usually have no lm_head; some still store it. Use it when present.
        let lm_head = if !cfg.tie_word_embeddings || w.contains("lm_head.weight") {
            Linear::load(w, "lm_head", cfg.hidden_size, cfg.vocab_size, false)?
        } else {
            Linear::from_weight(embed_tokens.clone())
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
        let idx = Tensor::from_slice(ids, ids.len(), self.embed_tokens.device())?;
        Ok(self.embed_tokens.index_select(&idx, 0)?)
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
            return Err(Error::Weights(format!(
                "{} caches for a batch of {b}",
                caches.len()
            )));
        }
        for c in caches.iter() {
            c.ensure_room(t)?;
        }
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, cos, sin, i, caches)?;
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
    /// where the serving engine interleaves other work.
    pub fn forward_layer(
        &self,
        layer: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let l = self.layers.get(layer).ok_or_else(|| {
            Error::Weights(format!(
                "decoder layer {layer} of {} does not exist",
                self.layers.len()
            ))
        })?;
        let t = x.dim(1)?;
        for c in caches.iter() {
            c.ensure_room(t)?;
        }
        l.forward(x, cos, sin, layer, caches)
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
            self.embed_tokens.dtype(),
            self.embed_tokens.device(),
        )
    }
}

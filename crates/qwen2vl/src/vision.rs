//! The vision tower (mirrors `Qwen2VisionTransformerPretrainedModel`, transformers 4.49, and
//! Qwen2.5-VL's `Qwen2_5_VisionTransformerPretrainedModel`: RMSNorm, a SwiGLU MLP with
//! biases, and attention within windows of merged tokens except in the full-attention
//! blocks; the patches are put in window order before the blocks and the merged rows back
//! in the processor's order after the merger).
//!
//! `pixel_values (n_patches, 1176)` + grids → `(n_patches / merge², text_hidden)`.
//! Patches of several images/videos are packed in one sequence; attention is full within
//! each frame and never across frames (the reference's `cu_seqlens`), so each frame is
//! attended on its own and no `n x n` mask over the pack is ever built.

use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::config::VisionConfig;
use crate::error::{Error, Result};
use crate::nn::{attention, LayerNorm, Linear, RmsNorm};
use crate::ops::attention::{attention_keys, Keys};
use crate::rope;
use crate::weights::Weights;

const VISION_ROPE_THETA: f64 = 10000.0;
const LN_EPS: f64 = 1e-6;

/// Conv3d patch embedding with kernel = stride = (2, 14, 14) and no bias, done as one matmul:
/// the kernel `(embed, 3, 2, 14, 14)` flattened to `(embed, 1176)` in the same
/// (channel, frame, row, col) order as the processor's flattened patch.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    proj: Linear,
}

impl PatchEmbed {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let (c, t, p) = (cfg.in_chans, cfg.temporal_patch_size, cfg.patch_size);
        let kernel = w.get(
            "visual.patch_embed.proj.weight",
            (cfg.embed_dim, c, t, p, p),
        )?;
        let kernel = kernel.reshape((cfg.embed_dim, cfg.patch_dim()))?;
        Ok(PatchEmbed {
            proj: Linear::from_weight_in(w, kernel)?,
        })
    }

    /// `(n, 1176)` → `(n, embed_dim)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(x)
    }
}

/// Multi-head self-attention with 2-D rope, per frame (`VisionAttention` / `VisionSdpaAttention`).
#[derive(Debug, Clone)]
pub struct VisionAttention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl VisionAttention {
    fn load(w: &Weights, prefix: &str, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.embed_dim;
        Ok(VisionAttention {
            qkv: Linear::load(w, &format!("{prefix}.qkv"), d, 3 * d, true)?,
            proj: Linear::load(w, &format!("{prefix}.proj"), d, d, true)?,
            num_heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `x: (n, embed)`, `cos/sin: (n, head_dim/2)`, `segments`: `(start, len)` of each frame.
    /// Returns `(n, embed)`.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &[(usize, usize)],
    ) -> Result<Tensor> {
        let (h, hd) = (self.num_heads, self.head_dim);
        // q, k, v each (n, heads, hd), q and k roped.
        let (q, k, v) = self.qkv_rows(x, cos, sin)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outs = Vec::with_capacity(segments.len());
        for &(start, len) in segments {
            // (len, heads, hd) → (heads, 1, len, hd); keys/values (heads, len, hd). Views:
            // the fused kernel reads the rows where they lie.
            let qs = q.narrow(0, start, len)?.transpose(0, 1)?.unsqueeze(1)?;
            let ks = k.narrow(0, start, len)?.transpose(0, 1)?;
            let vs = v.narrow(0, start, len)?.transpose(0, 1)?;
            let o = attention(&qs, &ks, &vs, scale, None)?.squeeze(1)?; // (heads, len, hd)
            outs.push(o.transpose(0, 1)?.reshape((len, h * hd))?);
        }
        let o = if outs.len() == 1 {
            outs.pop().expect("one segment")
        } else {
            Tensor::cat(&outs, 0)?
        };
        self.proj.forward(&o)
    }

    /// The first half of [`VisionAttention::forward`] for a chunk of rows: `x: (c, embed)`
    /// (after `norm1`) and its rope tables `(c, head_dim/2)` → roped `q`, `k` and `v`, each
    /// `(c, heads, head_dim)`.
    fn qkv_rows(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (c, _) = x.dims2()?;
        let (h, hd) = (self.num_heads, self.head_dim);
        // (c, 3*embed) → (c, 3, heads, hd); q, k, v each (1, c, heads, hd).
        let qkv = self.qkv.forward(x)?.reshape((c, 3, h, hd))?;
        let q = qkv.narrow(1, 0, 1)?.reshape((1, c, h, hd))?.contiguous()?;
        let k = qkv.narrow(1, 1, 1)?.reshape((1, c, h, hd))?.contiguous()?;
        let v = qkv.narrow(1, 2, 1)?.reshape((c, h, hd))?;
        let q = candle_nn::rotary_emb::rope_thd(&q, cos, sin)?.squeeze(0)?;
        let k = candle_nn::rotary_emb::rope_thd(&k, cos, sin)?.squeeze(0)?;
        Ok((q, k, v))
    }

    /// Attention of query rows `q: (c, heads, head_dim)` of one frame over that frame's keys
    /// and values `(heads, len, head_dim)` (or the same packed, `keys`: bit-identical, without
    /// packing them again) → `(c, embed)` (before `proj`).
    fn attend_rows(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        keys: Option<&Keys>,
    ) -> Result<Tensor> {
        let (c, h, hd) = q.dims3()?;
        let scale = 1.0 / (hd as f64).sqrt();
        let qs = q.transpose(0, 1)?.unsqueeze(1)?; // (heads, 1, c, hd)
        let packed = match keys {
            Some(keys) => attention_keys(&qs, keys, scale, None)?,
            None => None,
        };
        let o = match packed {
            Some(o) => o,
            None => attention(&qs, k, v, scale, None)?,
        };
        let o = o.squeeze(1)?; // (heads, c, hd)
        Ok(o.transpose(0, 1)?.reshape((c, h * hd))?)
    }
}

/// Qwen2.5-VL's block MLP: `down_proj(silu(gate_proj(x)) * up_proj(x))`, each with a bias
/// (`Qwen2_5_VLMLP(bias=True)`).
#[derive(Debug, Clone)]
pub struct Qwen25VisionMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Qwen25VisionMlp {
    fn load(w: &Weights, prefix: &str, cfg: &VisionConfig) -> Result<Self> {
        if cfg.hidden_act != "silu" {
            return Err(Error::Weights(format!(
                "Qwen2.5-VL vision hidden_act {:?} is not supported (allowed: silu)",
                cfg.hidden_act
            )));
        }
        let (d, i) = (cfg.embed_dim, cfg.mlp_hidden_dim());
        Ok(Qwen25VisionMlp {
            gate_proj: Linear::load(w, &format!("{prefix}.gate_proj"), d, i, true)?,
            up_proj: Linear::load(w, &format!("{prefix}.up_proj"), d, i, true)?,
            down_proj: Linear::load(w, &format!("{prefix}.down_proj"), i, d, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate_proj.forward(x)?;
        let u = self.up_proj.forward(x)?;
        self.down_proj.forward(&crate::ops::fused::silu_mul(g, &u)?)
    }
}

/// A block's MLP: Qwen2-VL's [`VisionMlp`] or Qwen2.5-VL's [`Qwen25VisionMlp`].
#[derive(Debug, Clone)]
enum BlockMlp {
    Qwen2(VisionMlp),
    Qwen25(Qwen25VisionMlp),
}

impl BlockMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            BlockMlp::Qwen2(m) => m.forward(x),
            BlockMlp::Qwen25(m) => m.forward(x),
        }
    }
}

/// The vision tower's norms: LayerNorm in Qwen2-VL, RMSNorm (`Qwen2RMSNorm`) in Qwen2.5-VL;
/// eps 1e-6 in both.
#[derive(Debug, Clone)]
enum VisionNorm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl VisionNorm {
    fn load(w: &Weights, prefix: &str, cfg: &VisionConfig) -> Result<Self> {
        Ok(if cfg.qwen25.is_some() {
            VisionNorm::Rms(RmsNorm::load(w, prefix, cfg.embed_dim, LN_EPS)?)
        } else {
            VisionNorm::Layer(LayerNorm::load(w, prefix, cfg.embed_dim, LN_EPS)?)
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            VisionNorm::Layer(n) => n.forward(x),
            VisionNorm::Rms(n) => n.forward(x),
        }
    }
}

/// `fc2(quick_gelu(fc1(x)))`.
#[derive(Debug, Clone)]
pub struct VisionMlp {
    fc1: Linear,
    fc2: Linear,
    quick: bool,
}

impl VisionMlp {
    fn load(w: &Weights, prefix: &str, cfg: &VisionConfig) -> Result<Self> {
        let quick = match cfg.hidden_act.as_str() {
            "quick_gelu" => true,
            "gelu" => false,
            other => {
                return Err(Error::Weights(format!(
                    "vision hidden_act {other:?} is not supported (allowed: quick_gelu, gelu)"
                )))
            }
        };
        Ok(VisionMlp {
            fc1: Linear::load(
                w,
                &format!("{prefix}.fc1"),
                cfg.embed_dim,
                cfg.mlp_hidden_dim(),
                true,
            )?,
            fc2: Linear::load(
                w,
                &format!("{prefix}.fc2"),
                cfg.mlp_hidden_dim(),
                cfg.embed_dim,
                true,
            )?,
            quick,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(x)?;
        let h = if self.quick {
            crate::ops::fused::quick_gelu(h)?
        } else {
            h.gelu_erf()?
        };
        self.fc2.forward(&h)
    }
}

/// Pre-norm transformer block (`Qwen2VLVisionBlock`, `Qwen2_5_VLVisionBlock`).
#[derive(Debug, Clone)]
pub struct VisionBlock {
    norm1: VisionNorm,
    attn: VisionAttention,
    norm2: VisionNorm,
    mlp: BlockMlp,
}

impl VisionBlock {
    fn load(w: &Weights, i: usize, cfg: &VisionConfig) -> Result<Self> {
        let p = format!("visual.blocks.{i}");
        Ok(VisionBlock {
            norm1: VisionNorm::load(w, &format!("{p}.norm1"), cfg)?,
            attn: VisionAttention::load(w, &format!("{p}.attn"), cfg)?,
            norm2: VisionNorm::load(w, &format!("{p}.norm2"), cfg)?,
            mlp: if cfg.qwen25.is_some() {
                BlockMlp::Qwen25(Qwen25VisionMlp::load(w, &format!("{p}.mlp"), cfg)?)
            } else {
                BlockMlp::Qwen2(VisionMlp::load(w, &format!("{p}.mlp"), cfg)?)
            },
        })
    }

    /// `x: (n, embed)` → `(n, embed)`.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &[(usize, usize)],
    ) -> Result<Tensor> {
        let x = (x + self
            .attn
            .forward(&self.norm1.forward(x)?, cos, sin, segments)?)?;
        let y = self.mlp.forward(&self.norm2.forward(&x)?)?;
        Ok((x + y)?)
    }
}

/// LayerNorm (RMSNorm in Qwen2.5-VL) → concatenate each 2x2 block of neighbouring patches →
/// Linear → GELU → Linear (`PatchMerger`; weights `ln_q`, `mlp.0`, `mlp.2`). The processor
/// already orders patches so a block is 4 consecutive rows, so "concatenate" is a reshape.
#[derive(Debug, Clone)]
pub struct PatchMerger {
    ln_q: VisionNorm,
    fc1: Linear,
    fc2: Linear,
    merged_dim: usize,
}

impl PatchMerger {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let merged_dim = cfg.embed_dim * cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(PatchMerger {
            ln_q: VisionNorm::load(w, "visual.merger.ln_q", cfg)?,
            fc1: Linear::load(w, "visual.merger.mlp.0", merged_dim, merged_dim, true)?,
            fc2: Linear::load(w, "visual.merger.mlp.2", merged_dim, cfg.hidden_size, true)?,
            merged_dim,
        })
    }

    /// `(n, embed)` → `(n / merge², hidden)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.ln_q.forward(x)?;
        let n = x.dim(0)?;
        let x = x.reshape((n * x.dim(1)? / self.merged_dim, self.merged_dim))?;
        let x = self.fc1.forward(&x)?.gelu_erf()?;
        self.fc2.forward(&x)
    }
}

/// The whole vision tower.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    patch_embed: PatchEmbed,
    blocks: Vec<VisionBlock>,
    merger: PatchMerger,
    cfg: VisionConfig,
}

impl VisionTransformer {
    /// Loads `visual.*` from the checkpoint.
    pub fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        if cfg.num_heads == 0
            || !cfg.embed_dim.is_multiple_of(cfg.num_heads)
            || !cfg.head_dim().is_multiple_of(4)
        {
            return Err(Error::Weights(format!(
                "vision embed_dim {} / num_heads {} must give a head_dim divisible by 4",
                cfg.embed_dim, cfg.num_heads
            )));
        }
        Ok(VisionTransformer {
            patch_embed: PatchEmbed::load(w, cfg)?,
            blocks: (0..cfg.depth)
                .map(|i| VisionBlock::load(w, i, cfg))
                .collect::<Result<_>>()?,
            merger: PatchMerger::load(w, cfg)?,
            cfg: cfg.clone(),
        })
    }

    /// The tower's config.
    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// `pixel_values: (n_patches, patch_dim)` for the given `(t, h, w)` grids (in patches)
    /// → `(n_patches / merge², hidden)`.
    ///
    /// Runs a [`VisionPass`] to the end: the same units of work the serving engine runs
    /// between decode steps, so both give the same bits.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        self.begin(pixel_values, grids)?.finish()
    }

    /// The plain forward pass, one whole stage at a time (each block over every row, then
    /// the merger): the oracle of [`VisionTransformer::forward`]'s cut into units.
    pub fn forward_plain(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        self.check(pixel_values, grids)?;
        let l = self.layout(pixel_values, grids)?;
        let mut x = self.patch_embed.forward(&l.pixels)?;
        for (b, block) in self.blocks.iter().enumerate() {
            let segments = self.block_segments(b, &l.frames, l.windows.as_deref());
            x = block.forward(&x, &l.cos, &l.sin, segments)?;
        }
        l.restore(self.merger.forward(&x)?)
    }

    /// Starts a pass that the caller runs one unit of work per [`VisionPass::step`] (see
    /// [`VisionPass`]). Checks the inputs and builds the rope tables; nothing heavy.
    pub fn begin(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<VisionPass<'_>> {
        self.begin_with_rows(pixel_values, grids, None)
    }

    /// [`VisionTransformer::begin`] with every stage cut into chunks of `rows` rows (at
    /// least [`MIN_CHUNK_ROWS`]) instead of chunks of about [`UNIT_FLOPS`]; tests use it to
    /// cut small images as finely as the engine cuts large ones. The result is the same.
    pub fn begin_with_rows(
        &self,
        pixel_values: &Tensor,
        grids: &[[usize; 3]],
        rows: Option<usize>,
    ) -> Result<VisionPass<'_>> {
        self.check(pixel_values, grids)?;
        let l = self.layout(pixel_values, grids)?;
        let plan = self.plan(&l.frames, l.windows.as_deref(), rows);
        Ok(VisionPass {
            tower: self,
            pixels: l.pixels,
            cos: l.cos,
            sin: l.sin,
            segments: l.frames,
            windows: l.windows,
            restore: l.restore,
            plan,
            next: 0,
            x: None,
            parts: Vec::new(),
            qkv_parts: [Vec::new(), Vec::new(), Vec::new()],
            qkv: None,
            frame: None,
            attn: None,
            out: None,
        })
    }

    /// Units of work of a pass over `grids` (see [`VisionPass::step`]).
    pub fn pass_units(&self, grids: &[[usize; 3]], rows: Option<usize>) -> usize {
        let windows = self.window_index(grids).map(|(_, w)| w);
        self.plan(&frame_segments(grids), windows.as_deref(), rows)
            .len()
    }

    /// Qwen2.5-VL's window order of `grids` (see [`rope::vision_window_index`]); `None` for
    /// Qwen2-VL, whose blocks all attend over whole frames.
    fn window_index(&self, grids: &[[usize; 3]]) -> Option<rope::WindowIndex> {
        let q = self.cfg.qwen25.as_ref()?;
        Some(rope::vision_window_index(
            grids,
            self.cfg.spatial_merge_size,
            q.window_merged(&self.cfg),
        ))
    }

    /// The attention segments of block `b`: the frames for Qwen2-VL and Qwen2.5-VL's
    /// full-attention blocks, else the windows.
    fn block_segments<'s>(
        &self,
        b: usize,
        frames: &'s [(usize, usize)],
        windows: Option<&'s [(usize, usize)]>,
    ) -> &'s [(usize, usize)] {
        match (windows, &self.cfg.qwen25) {
            (Some(w), Some(q)) if !q.fullatt_block_indexes.contains(&b) => w,
            _ => frames,
        }
    }

    /// The rows a pass runs over: the patches in the order the blocks see them (Qwen2.5-VL:
    /// window order, whole 2x2 merge blocks moved together, as the reference reorders the
    /// embedded patches and their rotary rows by `window_index`), their rope tables, the
    /// frames' and windows' segments of that order, and the index that puts the merged
    /// rows back in the processor's order (the reference's `argsort(window_index)`).
    fn layout(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<Layout> {
        let device = pixel_values.device();
        let mut ids = rope::vision_rope_ids(grids, self.cfg.spatial_merge_size);
        let frames = frame_segments(grids);
        let (pixels, windows, restore) = match self.window_index(grids) {
            None => (pixel_values.clone(), None, None),
            Some((order, windows)) => {
                let unit = self.cfg.spatial_merge_size * self.cfg.spatial_merge_size;
                let rows: Vec<u32> = order
                    .iter()
                    .flat_map(|&j| (j * unit..(j + 1) * unit).map(|r| r as u32))
                    .collect();
                ids = rows.iter().map(|&r| ids[r as usize]).collect();
                let mut restore = vec![0u32; order.len()];
                for (pos, &j) in order.iter().enumerate() {
                    restore[j] = pos as u32;
                }
                let n = rows.len();
                let pixels = pixel_values.index_select(&Tensor::from_vec(rows, n, device)?, 0)?;
                let restore = Tensor::from_vec(restore, order.len(), device)?;
                (pixels, Some(windows), Some(restore))
            }
        };
        let (cos, sin) = self.rope_tables(&ids, pixel_values)?;
        Ok(Layout {
            pixels,
            cos,
            sin,
            frames,
            windows,
            restore,
        })
    }

    /// Checks `pixel_values (n, patch_dim)` against `grids`.
    fn check(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<()> {
        let merge = self.cfg.spatial_merge_size;
        let n: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let (rows, cols) = pixel_values.dims2()?;
        if rows != n || cols != self.cfg.patch_dim() {
            return Err(Error::bad_input(
                format!(
                    "pixel_values is ({rows}, {cols}) but the grids need ({n}, {})",
                    self.cfg.patch_dim()
                ),
                "one row per patch of every grid",
            ));
        }
        if n == 0 {
            return Err(Error::bad_input(
                "no images or video frames to encode",
                "at least one grid",
            ));
        }
        for g in grids {
            if g[1] % merge != 0 || g[2] % merge != 0 || g.contains(&0) {
                return Err(Error::bad_input(
                    format!("grid {g:?} is not a whole number of {merge}x{merge} merge blocks"),
                    "grid height and width divisible by the merge size",
                ));
            }
        }
        Ok(())
    }

    /// The 2-D rope tables `(n, head_dim/2)` of patches with (row, col) `ids`, in the dtype
    /// and on the device of `pixel_values`.
    fn rope_tables(&self, ids: &[(u32, u32)], pixel_values: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = ids.len();
        let dtype = pixel_values.dtype();
        let device = pixel_values.device();
        let (cos, sin) = rope::vision_cos_sin(ids, self.cfg.head_dim(), VISION_ROPE_THETA);
        let half = self.cfg.head_dim() / 2;
        let cos = Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// The units of a pass over `frames`, in order (see [`VisionPass`]); the blocks that
    /// attend within `windows` cut their attention by those instead.
    fn plan(
        &self,
        frames: &[(usize, usize)],
        windows: Option<&[(usize, usize)]>,
        rows: Option<usize>,
    ) -> Vec<Unit> {
        let cfg = &self.cfg;
        let n: usize = frames.iter().map(|s| s.1).sum();
        let merge2 = cfg.spatial_merge_size * cfg.spatial_merge_size;
        let e = cfg.embed_dim as f64;
        let md = self.merger.merged_dim as f64;
        let rows_for = |per_row: f64| -> usize {
            rows.unwrap_or((UNIT_FLOPS / per_row.max(1.0)) as usize)
                .max(MIN_CHUNK_ROWS)
        };
        // Stages of weight products: never fewer than MIN_PRODUCT_ROWS rows a chunk.
        let product_rows = |per_row: f64| -> usize {
            rows.unwrap_or(((UNIT_FLOPS / per_row.max(1.0)) as usize).max(MIN_PRODUCT_ROWS))
                .max(MIN_CHUNK_ROWS)
        };
        let mut plan = Vec::new();
        let embed_rows = product_rows(2.0 * cfg.patch_dim() as f64 * e);
        plan.extend(row_chunks(0..n, embed_rows).map(Unit::Embed));
        let qkv_rows = product_rows(6.0 * e * e);
        let mlp_rows = product_rows(2.0 * e * e + 4.0 * e * cfg.mlp_hidden_dim() as f64);
        for b in 0..self.blocks.len() {
            plan.extend(row_chunks(0..n, qkv_rows).map(|r| Unit::Qkv(b, r)));
            // Small frames share a unit (up to about UNIT_FLOPS); a large one is cut into
            // chunks of query rows.
            let mut pieces = Vec::new();
            let mut work = 0.0;
            let segments = self.block_segments(b, frames, windows);
            for (i, &(start, len)) in segments.iter().enumerate() {
                let per_row = 4.0 * len as f64 * e;
                for r in row_chunks(start..start + len, rows_for(per_row)) {
                    work += per_row * r.len() as f64;
                    pieces.push((i, r));
                    if rows.is_some() || work >= UNIT_FLOPS {
                        plan.push(Unit::Attend(b, std::mem::take(&mut pieces)));
                        work = 0.0;
                    }
                }
            }
            if !pieces.is_empty() {
                plan.push(Unit::Attend(b, pieces));
            }
            plan.extend(row_chunks(0..n, mlp_rows).map(|r| Unit::Mlp(b, r)));
        }
        let merge_rows = product_rows(2.0 * md * (md + cfg.hidden_size as f64));
        plan.extend(row_chunks(0..n / merge2, merge_rows).map(Unit::Merge));
        plan
    }

    /// Device of the weights.
    pub fn device(&self) -> &Device {
        self.patch_embed.proj_device()
    }
}

/// Fewest rows in a chunk of a [`VisionPass`] stage, or of a prompt's decoder layer
/// ([`crate::text::LayerPass`]), unless the whole stage has fewer.
/// With few rows the products take other kernels that sum in another order: our
/// small-batch gemv up to 16 rows, and gemm's small-matrix path (depth blocks of 512
/// instead of its cache-sized ones) when both the rows and the columns are at most 64,
/// as in attention's `probs · v` with a head dimension of 64 or less. With more rows every
/// row of a product is computed the same way whatever their number, so the chunks give
/// the bits of one go.
pub const MIN_CHUNK_ROWS: usize = 65;

/// Fewest rows in a chunk of a stage that multiplies by weight matrices (patch embedding,
/// qkv, MLP, merger; a decoder layer's stages), unless the stage has fewer.
///
/// candle's matmul (the `gemm` crate) packs the whole weight matrix again on every call,
/// which costs about as much as multiplying a few dozen rows by it: with chunks of
/// [`UNIT_FLOPS`] alone the 2B's vision MLP ran in chunks of 65 rows and the decoder's in
/// chunks of 65 too, and that packing took ~15% of the vision tower's time (perf,
/// `gemm_common::...::vectorize` next to the microkernel). 512 rows cut the 2B's vision
/// tower from 22.8 to 16.4 s on two cores; 1024 to 15.2–15.8 s (A/B back to back, quiet
/// machine, docs/benchmarks.md). A unit of the 2B then lasts up to ~160 ms in f32 on two
/// cores, still about half a decode step.
pub const MIN_PRODUCT_ROWS: usize = 1024;

/// About this many floating-point operations make one unit of a [`VisionPass`] or of a
/// [`crate::text::LayerPass`] (milliseconds of a CPU's matmul on the real shapes; about
/// 0.3 s for the tiny test model on a busy two-core machine, whose narrow products are slow
/// per operation). Chunks of rows are sized from it, per stage.
pub const UNIT_FLOPS: f64 = 1e9;

/// `range` cut into consecutive chunks of `rows` rows; a last chunk that would be shorter
/// than [`MIN_CHUNK_ROWS`] joins the one before.
pub(crate) fn row_chunks(range: Range<usize>, rows: usize) -> impl Iterator<Item = Range<usize>> {
    let rows = rows.max(1);
    let end = range.end;
    let mut start = range.start;
    std::iter::from_fn(move || {
        if start >= end {
            return None;
        }
        let left = end - start;
        let take = if left < rows + MIN_CHUNK_ROWS {
            left
        } else {
            rows
        };
        let r = start..start + take;
        start += take;
        Some(r)
    })
}

/// One unit of work of a [`VisionPass`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Unit {
    /// The patch embedding of these patch rows.
    Embed(Range<usize>),
    /// Block `.0`: LayerNorm, qkv and rope of these rows.
    Qkv(usize, Range<usize>),
    /// Block `.0`: attention of these query rows, each piece within one frame or window
    /// (its index among the block's segments, rows).
    Attend(usize, Vec<(usize, Range<usize>)>),
    /// Block `.0`: output projection, residual, LayerNorm, MLP, residual of these rows.
    Mlp(usize, Range<usize>),
    /// The patch merger of these merged rows.
    Merge(Range<usize>),
}

impl Unit {
    /// The stage a unit belongs to: kind and block.
    fn stage(&self) -> (u8, usize) {
        match self {
            Unit::Embed(_) => (0, 0),
            Unit::Qkv(b, _) => (1, *b),
            Unit::Attend(b, _) => (2, *b),
            Unit::Mlp(b, _) => (3, *b),
            Unit::Merge(_) => (4, 0),
        }
    }
}

/// A vision-tower pass in progress (see [`VisionTransformer::begin`]).
///
/// The pass is cut into units of work of about [`UNIT_FLOPS`] each, so the serving engine
/// can interleave decode steps of other requests and notice a cancellation within a few
/// milliseconds even when one frame has tens of thousands of patches (its attention alone
/// would take minutes). Each stage runs over chunks of rows: the patch embedding; per
/// block, LayerNorm + qkv + rope, then attention for chunks of query rows within each frame
/// (`cu_seqlens`) against the frame's whole keys and values, then output projection +
/// residual + MLP; then the merger. Every row is computed by the same operations as in
/// [`VisionTransformer::forward_plain`], and no product gets fewer than [`MIN_CHUNK_ROWS`]
/// rows unless the plain pass gives it as few, so the output is bit-identical to it (tested
/// on the fixture model).
#[derive(Debug)]
pub struct VisionPass<'t> {
    tower: &'t VisionTransformer,
    pixels: Tensor,
    cos: Tensor,
    sin: Tensor,
    /// Each frame's `(start, len)` rows.
    segments: Vec<(usize, usize)>,
    /// Each window's `(start, len)` rows (Qwen2.5-VL; the rows are in window order).
    windows: Option<Vec<(usize, usize)>>,
    /// Where each merged row of the processor's order is in the window order (Qwen2.5-VL).
    restore: Option<Tensor>,
    plan: Vec<Unit>,
    /// The next unit of `plan`.
    next: usize,
    /// Hidden states `(n, embed)` after the blocks done so far.
    x: Option<Tensor>,
    /// Rows produced by the current stage (embedding, attention, MLP or merger).
    parts: Vec<Tensor>,
    /// Roped q, k and v rows `(c, heads, head_dim)` of the current qkv stage.
    qkv_parts: [Vec<Tensor>; 3],
    /// The current block's q, k, v `(n, heads, head_dim)`.
    qkv: Option<[Tensor; 3]>,
    /// A frame's keys and values `(heads, len, head_dim)`, by frame index, and the same
    /// packed once for the fused kernel (`None` where it does not apply): a large frame is
    /// attended in many pieces of query rows.
    frame: Option<(usize, Tensor, Tensor, Option<Keys>)>,
    /// The current block's attention outputs `(n, embed)` (before `proj`).
    attn: Option<Tensor>,
    /// The merger's output `(n / merge², hidden)`.
    out: Option<Tensor>,
}

impl VisionPass<'_> {
    /// Runs the next unit of work; `true` once every unit has run (then call
    /// [`VisionPass::finish`]).
    pub fn step(&mut self) -> Result<bool> {
        let Some(unit) = self.plan.get(self.next).cloned() else {
            return Ok(true);
        };
        self.run(&unit)?;
        self.next += 1;
        let stage_ends = self
            .plan
            .get(self.next)
            .is_none_or(|u| u.stage() != unit.stage());
        if stage_ends {
            self.end_stage(&unit)?;
        }
        Ok(self.next >= self.plan.len())
    }

    /// Units run so far and in all.
    pub fn progress(&self) -> (usize, usize) {
        (self.next, self.plan.len())
    }

    /// Runs the units left: `(n_patches / merge², hidden)`.
    pub fn finish(mut self) -> Result<Tensor> {
        while !self.step()? {}
        self.out.take().ok_or_else(|| {
            Error::Internal("the vision pass ended without the merger's output".into())
        })
    }

    fn run(&mut self, unit: &Unit) -> Result<()> {
        let tower = self.tower;
        match unit {
            Unit::Embed(r) => {
                let rows = self.pixels.narrow(0, r.start, r.len())?;
                self.parts.push(tower.patch_embed.forward(&rows)?);
            }
            Unit::Qkv(b, r) => {
                let block = &tower.blocks[*b];
                let x = self.hidden()?.narrow(0, r.start, r.len())?;
                let cos = self.cos.narrow(0, r.start, r.len())?;
                let sin = self.sin.narrow(0, r.start, r.len())?;
                let (q, k, v) = block.attn.qkv_rows(&block.norm1.forward(&x)?, &cos, &sin)?;
                for (parts, t) in self.qkv_parts.iter_mut().zip([q, k, v]) {
                    parts.push(t);
                }
            }
            Unit::Attend(b, pieces) => {
                let attn = &tower.blocks[*b].attn;
                for (i, r) in pieces {
                    let [q, k, v] = self.qkv.as_ref().ok_or_else(|| stage_error("qkv"))?;
                    if self.frame.as_ref().is_none_or(|f| f.0 != *i) {
                        let &(start, len) = tower
                            .block_segments(*b, &self.segments, self.windows.as_deref())
                            .get(*i)
                            .ok_or_else(|| stage_error("frame"))?;
                        // (len, heads, hd) → (heads, len, hd), views.
                        let ks = k.narrow(0, start, len)?.transpose(0, 1)?;
                        let vs = v.narrow(0, start, len)?.transpose(0, 1)?;
                        let keys = Keys::pack(&ks, &vs)?;
                        self.frame = Some((*i, ks, vs, keys));
                    }
                    let (_, ks, vs, keys) =
                        self.frame.as_ref().ok_or_else(|| stage_error("frame"))?;
                    let qs = q.narrow(0, r.start, r.len())?;
                    self.parts
                        .push(attn.attend_rows(&qs, ks, vs, keys.as_ref())?);
                }
            }
            Unit::Mlp(b, r) => {
                let block = &tower.blocks[*b];
                let o = self
                    .attn
                    .as_ref()
                    .ok_or_else(|| stage_error("attention"))?
                    .narrow(0, r.start, r.len())?;
                let x = self.hidden()?.narrow(0, r.start, r.len())?;
                let x = (x + block.attn.proj.forward(&o)?)?;
                let y = block.mlp.forward(&block.norm2.forward(&x)?)?;
                self.parts.push((x + y)?);
            }
            Unit::Merge(r) => {
                let merge2 = tower.cfg.spatial_merge_size * tower.cfg.spatial_merge_size;
                let x = self
                    .hidden()?
                    .narrow(0, r.start * merge2, r.len() * merge2)?;
                self.parts.push(tower.merger.forward(&x)?);
            }
        }
        Ok(())
    }

    /// Joins what the stage of `unit` produced.
    fn end_stage(&mut self, unit: &Unit) -> Result<()> {
        match unit {
            Unit::Embed(_) => self.x = Some(cat_rows(std::mem::take(&mut self.parts))?),
            Unit::Qkv(..) => {
                let [q, k, v] = std::mem::take(&mut self.qkv_parts).map(cat_rows);
                self.qkv = Some([q?, k?, v?]);
            }
            Unit::Attend(..) => {
                self.attn = Some(cat_rows(std::mem::take(&mut self.parts))?);
                self.qkv = None;
                self.frame = None;
            }
            Unit::Mlp(..) => {
                self.x = Some(cat_rows(std::mem::take(&mut self.parts))?);
                self.attn = None;
            }
            Unit::Merge(_) => {
                let out = cat_rows(std::mem::take(&mut self.parts))?;
                self.out = Some(match &self.restore {
                    Some(r) => out.index_select(r, 0)?,
                    None => out,
                });
                self.x = None;
            }
        }
        Ok(())
    }

    fn hidden(&self) -> Result<&Tensor> {
        self.x.as_ref().ok_or_else(|| stage_error("hidden states"))
    }
}

/// The rows of one pass as the blocks see them (see [`VisionTransformer::layout`]).
struct Layout {
    /// `(n, patch_dim)`, in window order for Qwen2.5-VL.
    pixels: Tensor,
    /// `(n, head_dim/2)` each, in the same order.
    cos: Tensor,
    sin: Tensor,
    frames: Vec<(usize, usize)>,
    windows: Option<Vec<(usize, usize)>>,
    /// `(n / merge²,)`: the merged rows back in the processor's order.
    restore: Option<Tensor>,
}

impl Layout {
    /// The merger's output `(n / merge², hidden)` in the processor's order.
    fn restore(&self, merged: Tensor) -> Result<Tensor> {
        Ok(match &self.restore {
            Some(r) => merged.index_select(r, 0)?,
            None => merged,
        })
    }
}

/// Parts of a stage joined along the rows (one part is returned as is).
fn cat_rows(mut parts: Vec<Tensor>) -> Result<Tensor> {
    match parts.len() {
        0 => Err(stage_error("rows")),
        1 => Ok(parts.pop().expect("one part")),
        _ => Ok(Tensor::cat(&parts, 0)?),
    }
}

/// A pass used out of order (not reachable through the public API).
fn stage_error(what: &str) -> Error {
    Error::Internal(format!("vision pass: {what} missing at this stage"))
}

impl PatchEmbed {
    fn proj_device(&self) -> &Device {
        self.proj.device()
    }
}

/// `(start, len)` of each frame's patches in the packed sequence (the reference's `cu_seqlens`:
/// `h*w` repeated `t` times per grid).
pub fn frame_segments(grids: &[[usize; 3]]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for &[t, h, w] in grids {
        for _ in 0..t {
            out.push((start, h * w));
            start += h * w;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Qwen2VLConfig;
    use candle_core::DType;

    fn tiny_tower() -> VisionTransformer {
        fixture_tower("tiny-qwen2vl")
    }

    fn fixture_tower(model: &str) -> VisionTransformer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(model);
        let cfg = Qwen2VLConfig::from_file(&dir.join("config.json")).expect("config");
        let w = Weights::from_dir(&dir, DType::F32, &Device::Cpu).expect("weights");
        VisionTransformer::load(&w, &cfg.vision).expect("tower")
    }

    /// Deterministic pixel rows in [-1, 1).
    fn pixels(n: usize, dim: usize) -> Tensor {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let v: Vec<f32> = (0..n * dim)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(v, (n, dim), &Device::Cpu).expect("pixels")
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().and_then(|t| t.to_vec1()).expect("values")
    }

    #[test]
    fn row_chunks_cover_the_range_without_short_tails() {
        let all: Vec<_> = row_chunks(10..310, 100).collect();
        assert_eq!(all, vec![10..110, 110..210, 210..310]);
        let all: Vec<_> = row_chunks(0..260, 100).collect();
        assert_eq!(all, vec![0..100, 100..260]);
        assert_eq!(row_chunks(0..20, 100).collect::<Vec<_>>(), vec![0..20]);
        assert_eq!(row_chunks(5..5, 100).count(), 0);
        let n: usize = row_chunks(0..1000, MIN_CHUNK_ROWS).map(|r| r.len()).sum();
        assert_eq!(n, 1000);
        assert!(row_chunks(0..1000, MIN_CHUNK_ROWS).all(|r| r.len() >= MIN_CHUNK_ROWS));
    }

    #[test]
    fn a_pass_cut_into_row_chunks_is_bit_identical_to_the_plain_pass() {
        let tower = tiny_tower();
        // A 24x24 frame (more keys than gemm's small depth block), a two-frame video of
        // 4x4 (frames under the chunk size), a 14x14 frame: every stage of every block is
        // cut, and small frames share units.
        let grids = [[1, 24, 24], [2, 4, 4], [1, 14, 14]];
        let n: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let pv = pixels(n, tower.config().patch_dim());
        let plain = flat(&tower.forward_plain(&pv, &grids).expect("plain"));
        let whole = flat(&tower.forward(&pv, &grids).expect("forward"));
        assert_eq!(whole, plain, "default units");
        for rows in [1, MIN_CHUNK_ROWS, 100] {
            let mut pass = tower
                .begin_with_rows(&pv, &grids, Some(rows))
                .expect("begin");
            let (_, total) = pass.progress();
            assert_eq!(total, tower.pass_units(&grids, Some(rows)));
            // Per block at least: 2+ qkv chunks, 5 attention pieces, 2+ MLP chunks.
            assert!(
                total > 2 + tower.blocks.len() * 8,
                "{total} units for rows {rows}"
            );
            let mut steps = 1;
            while !pass.step().expect("unit") {
                steps += 1;
            }
            assert_eq!(steps, total);
            let got = flat(&pass.finish().expect("finish"));
            assert_eq!(got.len(), n / 4 * tower.config().hidden_size);
            assert_eq!(got, plain, "rows {rows}");
        }
    }

    #[test]
    fn a_qwen25_pass_cut_into_row_chunks_is_bit_identical_to_the_plain_pass() {
        let tower = fixture_tower("tiny-qwen25vl");
        assert!(tower.config().qwen25.is_some());
        // A 22x30 frame (11x15 merged: 3x4 windows of 4x4, the last row and column partial),
        // a two-frame video of 8x8 (one window a frame, the reference's empty padding window
        // dropped) and an 18x10 frame.
        let grids = [[1, 22, 30], [2, 8, 8], [1, 18, 10]];
        let n: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let pv = pixels(n, tower.config().patch_dim());
        let plain = flat(&tower.forward_plain(&pv, &grids).expect("plain"));
        assert_eq!(flat(&tower.forward(&pv, &grids).expect("forward")), plain);
        for rows in [1, MIN_CHUNK_ROWS] {
            let pass = tower
                .begin_with_rows(&pv, &grids, Some(rows))
                .expect("begin");
            assert_eq!(pass.progress().1, tower.pass_units(&grids, Some(rows)));
            assert_eq!(flat(&pass.finish().expect("finish")), plain, "rows {rows}");
        }
        // Each frame alone gives its rows of the pack: windows never cross frames.
        let alone = flat(
            &tower
                .forward_plain(&pv.narrow(0, 0, 660).expect("rows"), &grids[..1])
                .expect("alone"),
        );
        assert_eq!(alone[..], plain[..alone.len()]);
    }

    #[test]
    fn a_pass_refuses_inputs_that_do_not_match_the_grids() {
        let tower = tiny_tower();
        let pv = pixels(16, tower.config().patch_dim());
        assert!(tower.begin(&pv, &[[1, 4, 8]]).is_err());
        assert!(tower.begin(&pv, &[[1, 2, 8]]).is_ok());
        assert!(tower
            .begin(&pv.narrow(0, 0, 0).expect("empty"), &[])
            .is_err());
    }
}

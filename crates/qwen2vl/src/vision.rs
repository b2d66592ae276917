//! The vision tower (mirrors `Qwen2VisionTransformerPretrainedModel`, transformers 4.49).
//!
//! `pixel_values (n_patches, 1176)` + grids → `(n_patches / merge², text_hidden)`.
//! Patches of several images/videos are packed in one sequence; attention is full within
//! each frame and never across frames (the reference's `cu_seqlens`), so each frame is
//! attended on its own and no `n x n` mask over the pack is ever built.

use candle_core::{Device, Tensor};

use crate::config::VisionConfig;
use crate::error::{Error, Result};
use crate::nn::{attention, LayerNorm, Linear};
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
            proj: Linear::from_weight(kernel),
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
        let (n, _) = x.dims2()?;
        let (h, hd) = (self.num_heads, self.head_dim);
        // (n, 3*embed) → (n, 3, heads, hd); q, k, v each (1, n, heads, hd).
        let qkv = self.qkv.forward(x)?.reshape((n, 3, h, hd))?;
        let q = qkv.narrow(1, 0, 1)?.reshape((1, n, h, hd))?.contiguous()?;
        let k = qkv.narrow(1, 1, 1)?.reshape((1, n, h, hd))?.contiguous()?;
        let v = qkv.narrow(1, 2, 1)?.reshape((n, h, hd))?;
        let q = candle_nn::rotary_emb::rope_thd(&q, cos, sin)?.squeeze(0)?;
        let k = candle_nn::rotary_emb::rope_thd(&k, cos, sin)?.squeeze(0)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut outs = Vec::with_capacity(segments.len());
        for &(start, len) in segments {
            // (len, heads, hd) → (heads, 1, len, hd); keys/values (heads, len, hd).
            let qs = q.narrow(0, start, len)?.transpose(0, 1)?.unsqueeze(1)?;
            let ks = k.narrow(0, start, len)?.transpose(0, 1)?.contiguous()?;
            let vs = v.narrow(0, start, len)?.transpose(0, 1)?.contiguous()?;
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

/// Pre-norm transformer block (`Qwen2VLVisionBlock`).
#[derive(Debug, Clone)]
pub struct VisionBlock {
    norm1: LayerNorm,
    attn: VisionAttention,
    norm2: LayerNorm,
    mlp: VisionMlp,
}

impl VisionBlock {
    fn load(w: &Weights, i: usize, cfg: &VisionConfig) -> Result<Self> {
        let p = format!("visual.blocks.{i}");
        Ok(VisionBlock {
            norm1: LayerNorm::load(w, &format!("{p}.norm1"), cfg.embed_dim, LN_EPS)?,
            attn: VisionAttention::load(w, &format!("{p}.attn"), cfg)?,
            norm2: LayerNorm::load(w, &format!("{p}.norm2"), cfg.embed_dim, LN_EPS)?,
            mlp: VisionMlp::load(w, &format!("{p}.mlp"), cfg)?,
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

/// LayerNorm → concatenate each 2x2 block of neighbouring patches → Linear → GELU → Linear
/// (`PatchMerger`; weights `ln_q`, `mlp.0`, `mlp.2`). The processor already orders patches
/// so a block is 4 consecutive rows, so "concatenate" is a reshape.
#[derive(Debug, Clone)]
pub struct PatchMerger {
    ln_q: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    merged_dim: usize,
}

impl PatchMerger {
    fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let merged_dim = cfg.embed_dim * cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(PatchMerger {
            ln_q: LayerNorm::load(w, "visual.merger.ln_q", cfg.embed_dim, LN_EPS)?,
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
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        let mut pass = self.begin(pixel_values, grids)?;
        while !pass.step()? {}
        pass.finish()
    }

    /// Starts a pass that runs one block per [`VisionPass::step`]: the same arithmetic as
    /// [`VisionTransformer::forward`], cut where the serving engine can interleave decode
    /// steps of other requests (a large image's tower takes seconds on a CPU). Checks the
    /// inputs and runs the patch embedding.
    pub fn begin(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<VisionPass<'_>> {
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
        for g in grids {
            if g[1] % merge != 0 || g[2] % merge != 0 || g.contains(&0) {
                return Err(Error::bad_input(
                    format!("grid {g:?} is not a whole number of {merge}x{merge} merge blocks"),
                    "grid height and width divisible by the merge size",
                ));
            }
        }
        let dtype = pixel_values.dtype();
        let device = pixel_values.device();
        let ids = rope::vision_rope_ids(grids, merge);
        let (cos, sin) = rope::vision_cos_sin(&ids, self.cfg.head_dim(), VISION_ROPE_THETA);
        let half = self.cfg.head_dim() / 2;
        let cos = Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?;
        Ok(VisionPass {
            tower: self,
            x: self.patch_embed.forward(pixel_values)?,
            cos,
            sin,
            segments: frame_segments(grids),
            next_block: 0,
        })
    }

    /// Device of the weights.
    pub fn device(&self) -> &Device {
        self.patch_embed.proj_device()
    }
}

/// A vision-tower pass in progress (see [`VisionTransformer::begin`]): the hidden states
/// `(n_patches, embed)` after `next_block` blocks.
#[derive(Debug)]
pub struct VisionPass<'t> {
    tower: &'t VisionTransformer,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    segments: Vec<(usize, usize)>,
    next_block: usize,
}

impl VisionPass<'_> {
    /// Runs the next block; `true` once every block has run (then call
    /// [`VisionPass::finish`]).
    pub fn step(&mut self) -> Result<bool> {
        if let Some(block) = self.tower.blocks.get(self.next_block) {
            self.x = block.forward(&self.x, &self.cos, &self.sin, &self.segments)?;
            self.next_block += 1;
        }
        Ok(self.next_block >= self.tower.blocks.len())
    }

    /// Runs the blocks left, then the patch merger: `(n_patches / merge², hidden)`.
    pub fn finish(mut self) -> Result<Tensor> {
        while !self.step()? {}
        self.tower.merger.forward(&self.x)
    }
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

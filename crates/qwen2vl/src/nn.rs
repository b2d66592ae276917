//! Small building blocks shared by both towers, loaded by checkpoint name.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};

use crate::error::{Error, Result};
use crate::ops::gemm_bf16::PackedBf16;
use crate::ops::gemm_half::{HalfKind, HalfMatrix};
use crate::ops::quant::QMatrix;
use crate::weights::Weights;

/// `y = x W^T + b` with `W: (out, in)`; `x: (..., in)` → `(..., out)`.
///
/// Float weights are candle tensors; weights the load's quantization plan names
/// (`--quant`, [`Weights::quant_for`]) are quantized blocks ([`QMatrix`]) with an f32 bias;
/// with bf16 compute on the CPU (`--dtype bf16`, [`Weights::bf16_products`]) float weights
/// are rounded to bf16 and packed once at load ([`PackedBf16`]).
#[derive(Debug, Clone)]
pub enum Linear {
    /// Float weights.
    Dense(candle_nn::Linear),
    /// Quantized weights.
    Quant(QLinear),
    /// bf16 weights packed for [`crate::ops::gemm_bf16`].
    Bf16(Bf16Linear),
    /// f16/bf16 weights read in place by f32 products ([`crate::ops::gemm_half`]).
    Half(HalfLinear),
}

/// A linear layer for f32 compute whose weight stays as the checkpoint stores it, in f16 or
/// bf16 ([`HalfMatrix`], mapped, never widened); the bias in f32. The products widen each
/// weight exactly, so the numbers are the f32 model's.
#[derive(Debug, Clone)]
pub struct HalfLinear {
    /// `(out, in)`.
    pub weight: Arc<HalfMatrix>,
    /// `(out,)` in f32.
    pub bias: Option<Vec<f32>>,
    /// Where inputs and outputs live (the CPU).
    pub device: candle_core::Device,
}

impl HalfLinear {
    /// `x: (..., in)` → `(..., out)` in `x`'s dtype (computed in f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        f32_product(x, self.weight.dims(), "16-bit", &self.device, |xs, m| {
            self.weight.matmul(xs, m, self.bias.as_deref())
        })
    }
}

/// A linear layer for bf16 compute: the weight rounded to bf16 and packed, the bias in f32.
///
/// Why this split: `--dtype bf16` on the CPU means "the big products in bf16, everything
/// else in f32". The activations stay f32 between products (norms, softmax, rotary,
/// residual adds and the KV cache run in f32, as exact as the f32 model); only a product's
/// input is rounded to bf16 (to nearest even, as torch) and multiplied (AMX or `vdpbf16ps`)
/// into f32 sums. Running every op on bf16 tensors would round the residual stream at every
/// add and cost conversions for nothing: the products are where the time goes.
#[derive(Debug, Clone)]
pub struct Bf16Linear {
    /// `(out, in)` packed.
    pub weight: Arc<PackedBf16>,
    /// `(out,)` in f32.
    pub bias: Option<Vec<f32>>,
    /// Where inputs and outputs live (the CPU).
    pub device: candle_core::Device,
}

impl Bf16Linear {
    /// `x: (..., in)` in any float dtype → `(..., out)` in `x`'s dtype (computed from `x`
    /// in f32, rounded to bf16 for the product, f32 sums).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        f32_product(x, self.weight.dims(), "bf16", &self.device, |xs, m| {
            self.weight.matmul(xs, m, self.bias.as_deref())
        })
    }
}

/// `x: (..., k)` → `(..., n)` in `x`'s dtype through a product on f32 rows: `product(xs, m)`
/// gets `x` as `m` rows of `k` f32 values and returns `m × n` values (the bf16, 16-bit and
/// quantized kernels all take their input this way). `what` names the layer kind in the
/// shape error.
fn f32_product(
    x: &Tensor,
    (n, k): (usize, usize),
    what: &str,
    device: &candle_core::Device,
    product: impl FnOnce(&[f32], usize) -> Result<Vec<f32>>,
) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    if dims.last() != Some(&k) {
        return Err(Error::Internal(format!(
            "a {what} ({n}, {k}) layer got input {dims:?}"
        )));
    }
    let m = x.elem_count() / k.max(1);
    let y = with_f32_values(x, |xs| product(xs, m))?;
    *dims.last_mut().expect("rank >= 1") = n;
    Ok(Tensor::from_vec(y, dims, device)?.to_dtype(x.dtype())?)
}

/// `f(values)` on `x`'s elements as f32 in row-major order: read in place when `x` is a
/// contiguous f32 tensor on the CPU (the usual case: an activation on its way into a
/// product), else from a converted copy.
///
/// Why not always copy: the copy is a second full-size buffer beside `x` for the whole
/// product, and for the vision MLP's `fc2` input (1564 × 5120 f32 for a 640x480 image) that
/// is 32 MB more at the pass's peak memory.
pub(crate) fn with_f32_values<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    {
        let (storage, layout) = x.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            // The read guard is held while `f` runs: nothing writes this storage meanwhile
            // (in-place ops take it for writing, and the caller still borrows `x`).
            return f(&v[a..b]);
        }
    }
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    f(&xs)
}

/// A bias tensor `(out,)` as f32 values, for the kernels that take plain slices.
fn bias_f32(bias: Option<Tensor>) -> Result<Option<Vec<f32>>> {
    Ok(match bias {
        Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        None => None,
    })
}

/// A linear layer with quantized weights.
#[derive(Debug, Clone)]
pub struct QLinear {
    /// `(out, in)`, shared with the embeddings when they are tied.
    pub weight: Arc<QMatrix>,
    /// `(out,)` in f32.
    pub bias: Option<Vec<f32>>,
    /// Where inputs and outputs live.
    pub device: candle_core::Device,
}

impl Linear {
    /// Loads `{prefix}.weight` `(out, in)` and, when `bias`, `{prefix}.bias` `(out,)`;
    /// quantized when the checkpoint stores it quantized (a GGUF's q8_0/q4_K/q6_K, kept as
    /// stored) or the load's plan says so.
    pub fn load(
        w: &Weights,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let name = format!("{prefix}.weight");
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), out_dim)?)
        } else {
            None
        };
        let quantized = match w.stored_quant(&name, out_dim, in_dim)? {
            Some(q) => Some(q),
            None => match w.quant_for(&name, in_dim) {
                Some(t) => Some(w.get_quantized(&name, out_dim, in_dim, t)?),
                None => None,
            },
        };
        if let Some(weight) = quantized {
            return Ok(Linear::Quant(QLinear {
                weight: Arc::new(weight),
                bias: bias_f32(bias)?,
                device: w.device().clone(),
            }));
        }
        if w.bf16_products() {
            return Ok(Linear::Bf16(Bf16Linear {
                weight: Arc::new(w.get_packed_bf16(&name, out_dim, in_dim)?),
                bias: bias_f32(bias)?,
                device: w.device().clone(),
            }));
        }
        if let Some(weight) = w.get_half(&name, out_dim, in_dim)? {
            return Ok(Linear::Half(HalfLinear {
                weight: Arc::new(weight),
                bias: bias_f32(bias)?,
                device: w.device().clone(),
            }));
        }
        let weight = w.get(&name, (out_dim, in_dim))?;
        Ok(Linear::Dense(candle_nn::Linear::new(weight, bias)))
    }

    /// From an existing weight `(out, in)` (tied embeddings).
    pub fn from_weight(weight: Tensor) -> Self {
        Linear::Dense(candle_nn::Linear::new(weight, None))
    }

    /// From an existing weight `(out, in)` read from `w`, packed to bf16 when `w` packs
    /// products ([`Weights::bf16_products`]); the float tensor is dropped then.
    pub fn from_weight_in(w: &Weights, weight: Tensor) -> Result<Self> {
        if !w.bf16_products() {
            return Ok(Self::from_weight(weight));
        }
        Ok(Linear::Bf16(Bf16Linear {
            weight: Arc::new(Weights::pack_bf16(&weight)?),
            bias: None,
            device: w.device().clone(),
        }))
    }

    /// Device of the weight.
    pub fn device(&self) -> &candle_core::Device {
        match self {
            Linear::Dense(l) => l.weight().device(),
            Linear::Quant(q) => &q.device,
            Linear::Bf16(l) => &l.device,
            Linear::Half(l) => &l.device,
        }
    }

    /// `x: (..., in)` → `(..., out)`.
    ///
    /// A few rows on the CPU (decode: one per running sequence) take our small-batch kernel
    /// [`crate::ops::gemv`] (each weight row read once for all rows, and a row's result
    /// independent of the batch it sits in); other float products candle's matmul; quantized
    /// weights [`QMatrix::matmul`] (in f32, the result in `x`'s dtype); bf16-packed weights
    /// [`PackedBf16::matmul`] for every row count (see [`Bf16Linear`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(l) => {
                if let Some(y) = crate::ops::gemv::linear(x, l.weight(), l.bias())? {
                    return Ok(y);
                }
                Ok(l.forward(x)?)
            }
            Linear::Quant(q) => Ok(Self::forward_quant(&[q], x)?.remove(0)),
            Linear::Bf16(l) => l.forward(x),
            Linear::Half(l) => l.forward(x),
        }
    }

    /// `[l.forward(x) for l in layers]` for layers that read the same input (a layer's q, k
    /// and v; gate and up). When all are quantized they run as one group product
    /// ([`crate::ops::quant::matmul_group`]: the input quantized once, one parallel pass,
    /// each output bit-identical to its own product); otherwise one by one.
    pub fn forward_group(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let quant: Option<Vec<&QLinear>> = layers
            .iter()
            .map(|l| match l {
                Linear::Quant(q) => Some(q),
                Linear::Dense(_) | Linear::Bf16(_) | Linear::Half(_) => None,
            })
            .collect();
        match quant {
            Some(qs) if qs.len() > 1 => Self::forward_quant(&qs, x),
            _ => layers.iter().map(|l| l.forward(x)).collect(),
        }
    }

    /// Quantized layers with the same input width on `x: (..., in)`.
    fn forward_quant(layers: &[&QLinear], x: &Tensor) -> Result<Vec<Tensor>> {
        let dims = x.dims().to_vec();
        let k = dims.last().copied().unwrap_or(0);
        if let Some(q) = layers.iter().find(|q| q.weight.dims().1 != k) {
            return Err(Error::Internal(format!(
                "a quantized {:?} layer got input {dims:?}",
                q.weight.dims()
            )));
        }
        let m = x.elem_count() / k.max(1);
        let products: Vec<_> = layers
            .iter()
            .map(|q| (&*q.weight, q.bias.as_deref()))
            .collect();
        let ys = with_f32_values(x, |xs| crate::ops::quant::matmul_group(&products, xs, m))?;
        ys.into_iter()
            .zip(layers)
            .map(|(y, q)| {
                let mut dims = dims.clone();
                *dims.last_mut().expect("rank >= 1") = q.weight.dims().0;
                Ok(Tensor::from_vec(y, dims, &q.device)?.to_dtype(x.dtype())?)
            })
            .collect()
    }
}

/// GFLOP/s of a vision-MLP-sized product `(1024, 1280) x (1280, 5120)` in `dtype` on
/// `device`, through [`Linear`] (so through whatever kernel the model's own products of that
/// dtype take), best of 5 after a warm-up; the rate `qwen2vl bench` divides FLOPs by for its
/// arithmetic floor. Takes ~0.5 s on two cores in f32.
///
/// `dtype` is the dtype a model was loaded with: bf16 on the CPU measures the packed bf16
/// products ([`Bf16Linear`], f32 activations) that such a model's layers use; f32 on the CPU
/// measures both f32 kernels (candle's on widened weights, [`HalfLinear`] on 16-bit weights
/// read in place) and gives the faster, since a model's layers take either.
pub fn product_gflops(dtype: DType, device: &candle_core::Device) -> Result<f64> {
    let (m, k, n) = (1024usize, 1280usize, 5120usize);
    let w = Tensor::randn(0f32, 0.02, (n, k), device)?;
    let (x, layer) = if dtype == DType::BF16 && device.is_cpu() {
        let layer = Linear::Bf16(Bf16Linear {
            weight: Arc::new(Weights::pack_bf16(&w)?),
            bias: None,
            device: device.clone(),
        });
        (Tensor::randn(0f32, 1.0, (m, k), device)?, layer)
    } else {
        let x = Tensor::randn(0f32, 1.0, (m, k), device)?.to_dtype(dtype)?;
        (x, Linear::from_weight(w.to_dtype(dtype)?))
    };
    let mut layers = vec![layer];
    if dtype == DType::F32 && device.is_cpu() && crate::weights::half_in_place() {
        let bits = w
            .to_dtype(DType::BF16)?
            .flatten_all()?
            .to_vec1::<half::bf16>()?
            .iter()
            .map(|v| v.to_bits())
            .collect();
        layers.push(Linear::Half(HalfLinear {
            weight: Arc::new(HalfMatrix::from_bits(HalfKind::Bf16, bits, n, k)?),
            bias: None,
            device: device.clone(),
        }));
    }
    let mut best = f64::INFINITY;
    for layer in &layers {
        for i in 0..6 {
            let t = std::time::Instant::now();
            // Reading one value back waits for a GPU; on the CPU the product is already done.
            let y = layer.forward(&x)?;
            y.narrow(0, 0, 1)?
                .narrow(1, 0, 1)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if i > 0 {
                best = best.min(t.elapsed().as_secs_f64());
            }
        }
    }
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))` (`Qwen2MLP`; a decoder layer's, and each
/// expert of a sparse MoE block).
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    /// `gate_proj`/`up_proj` `(i, d)` and `down_proj` `(d, i)` under `prefix` (an MoE expert
    /// has its own width `i`).
    pub(crate) fn load_sized(w: &Weights, prefix: &str, d: usize, i: usize) -> Result<Self> {
        Ok(Mlp {
            gate_proj: Linear::load(w, &format!("{prefix}.gate_proj"), d, i, false)?,
            up_proj: Linear::load(w, &format!("{prefix}.up_proj"), d, i, false)?,
            down_proj: Linear::load(w, &format!("{prefix}.down_proj"), i, d, false)?,
        })
    }

    /// `x: (..., hidden)` → `(..., hidden)`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [g, u] =
            <[Tensor; 2]>::try_from(Linear::forward_group(&[&self.gate_proj, &self.up_proj], x)?)
                .map_err(|_| Error::Internal("gate/up: two outputs expected".into()))?;
        self.down_proj.forward(&crate::ops::fused::silu_mul(g, &u)?)
    }
}

/// LayerNorm over the last dimension (`torch.nn.LayerNorm`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    /// Loads `{prefix}.weight` and `{prefix}.bias`, each `(dim,)`.
    pub fn load(w: &Weights, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get(&format!("{prefix}.weight"), dim)?,
            bias: w.get(&format!("{prefix}.bias"), dim)?,
            eps: eps as f32,
        })
    }

    /// `x: (..., dim)` → same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::fused::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// RMSNorm over the last dimension (`Qwen2RMSNorm`: variance in f32, then scale).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// Loads `{prefix}.weight` `(dim,)`.
    pub fn load(w: &Weights, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.get(&format!("{prefix}.weight"), dim)?,
            eps: eps as f32,
        })
    }

    /// `x: (..., dim)` → same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() == candle_core::DType::F64 {
            return Ok(candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps)?);
        }
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// Largest score matrix one attention block may build, in elements (256 MiB of f32).
pub const MAX_SCORE_ELEMS: usize = 64 << 20;

/// `softmax(q kᵀ · scale + mask) v`.
///
/// - `q: (B, G, T, D)`: `G` query heads share each of the `B` key/value heads (GQA groups;
///   `G = 1` for plain multi-head attention with `B` heads).
/// - `k, v: (B, L, D)`; may be views (into a larger cache, or `(L, B, D)` rows transposed):
///   only the last dim needs unit stride.
/// - `causal_offset`: `Some(p)` when query `t` sits at position `p + t` and sees keys
///   `0..=p+t`; `None` for full attention.
///
/// Returns `(B, G, T, D)`. f32 on the CPU takes the fused kernel
/// ([`crate::ops::attention`]: no score matrix, a row's result independent of the other
/// rows in the call); anything else [`attention_blocked`].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal_offset: Option<usize>,
) -> Result<Tensor> {
    if let Some(o) = crate::ops::attention::attention(q, k, v, scale, causal_offset)? {
        return Ok(o);
    }
    // candle's matmul wants each key/value head's rows adjacent.
    let rows_adjacent = |x: &Tensor| -> Result<Tensor> {
        let (_, _, d) = x.dims3()?;
        Ok(if x.stride()[1..] == [d, 1] {
            x.clone()
        } else {
            x.contiguous()?
        })
    };
    let (k, v) = (rows_adjacent(k)?, rows_adjacent(v)?);
    attention_blocked(q, &k, &v, scale, causal_offset, MAX_SCORE_ELEMS)
}

/// [`attention`] for queries at positions `offset + t`, causal, and with a sliding `window`
/// when given: query position `i` then sees keys `i + 1 - window ..= i` only (transformers'
/// mask hides key `j` when `j <= i - window`; see
/// [`crate::config::TextConfig::attention_window`]).
///
/// The rows whose window reaches back to key 0 run as one causal call; each later row runs on
/// its own `window` keys (a narrowed view of the cache, no mask), so a row's attention is the
/// kernel's for that row alone, however a prompt is cut into chunks or batched. (One call
/// per row past the window: fine for the rare configs that set a window below the context,
/// not tuned for long prompts.)
pub fn attention_causal(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    offset: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    let t = q.dim(2)?;
    let Some(w) = window.filter(|&w| offset + t > w) else {
        return attention(q, k, v, scale, Some(offset));
    };
    // Rows at positions below `w` see keys from 0.
    let plain = w.saturating_sub(offset).min(t);
    let mut outs = Vec::with_capacity(t - plain + 1);
    if plain > 0 {
        outs.push(attention(
            &q.narrow(2, 0, plain)?,
            k,
            v,
            scale,
            Some(offset),
        )?);
    }
    for r in plain..t {
        let first = offset + r + 1 - w;
        outs.push(attention(
            &q.narrow(2, r, 1)?,
            &k.narrow(1, first, w)?,
            &v.narrow(1, first, w)?,
            scale,
            None,
        )?);
    }
    if outs.len() == 1 {
        Ok(outs.pop().expect("one part"))
    } else {
        Ok(Tensor::cat(&outs, 2)?)
    }
}

/// The blocked path of [`attention`] (the fused kernel's fallback, and its "before" in
/// `examples/attention_bench.rs`): candle's matmul for `q kᵀ` in blocks of queries so the
/// score matrix never exceeds `max_score_elems` (a 16k-patch image frame would otherwise
/// need hundreds of GiB), skipping keys a causal block cannot see, then the softmax and a
/// second matmul. Same shapes as [`attention`]; `k` and `v` need unit strides on their last
/// two dims.
pub fn attention_blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal_offset: Option<usize>,
    max_score_elems: usize,
) -> Result<Tensor> {
    let (b, g, t, d) = q.dims4()?;
    let l = k.dim(1)?;
    let chunk = (max_score_elems / (b * g * l).max(1)).clamp(1, t.max(1));
    let mut outs = Vec::with_capacity(t.div_ceil(chunk));
    let mut start = 0;
    while start < t {
        let c = chunk.min(t - start);
        // Keys this block can see: all of them, or up to the last query's position.
        let visible = match causal_offset {
            Some(p) => (p + start + c).min(l),
            None => l,
        };
        let qc = q
            .narrow(2, start, c)?
            .contiguous()?
            .reshape((b, g * c, d))?;
        let kc = k.narrow(1, 0, visible)?;
        let vc = v.narrow(1, 0, visible)?;
        let scores = qc.matmul(&kc.t()?)?; // (B, G*c, visible), unscaled
        let scores = match causal_offset {
            Some(p) if c > 1 => {
                let mask =
                    causal_block_mask(c, p + start, visible, scores.dtype(), scores.device())?;
                scores
                    .reshape((b, g, c, visible))?
                    .broadcast_add(&mask)?
                    .reshape((b, g * c, visible))?
            }
            _ => scores,
        };
        // The mask is 0 or -inf, so scaling after adding it is the same as before.
        let probs = crate::ops::fused::scaled_softmax(scores, scale)?.to_dtype(vc.dtype())?;
        outs.push(probs.matmul(&vc)?.reshape((b, g, c, d))?);
        start += c;
    }
    if outs.len() == 1 {
        Ok(outs.pop().expect("one block"))
    } else {
        Ok(Tensor::cat(&outs, 2)?)
    }
}

/// `(c, l)` additive mask: row `r` (position `first + r`) sees keys `0..=first + r`.
fn causal_block_mask(
    c: usize,
    first: usize,
    l: usize,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let data: Vec<f32> = (0..c)
        .flat_map(|r| {
            (0..l).map(move |j| {
                if j <= first + r {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(data, (c, l), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// The plain version: full scores, explicit mask, one softmax.
    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, offset: Option<usize>) -> Tensor {
        let (b, g, t, d) = q.dims4().unwrap();
        let l = k.dim(1).unwrap();
        let q = q.reshape((b, g * t, d)).unwrap();
        let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let s = match offset {
            Some(p) => {
                let m = causal_block_mask(t, p, l, s.dtype(), s.device()).unwrap();
                s.reshape((b, g, t, l))
                    .unwrap()
                    .broadcast_add(&m)
                    .unwrap()
                    .reshape((b, g * t, l))
                    .unwrap()
            }
            None => s,
        };
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        p.matmul(v).unwrap().reshape((b, g, t, d)).unwrap()
    }

    use crate::ops::max_diff;

    #[test]
    fn blocked_attention_equals_plain_attention() {
        let dev = Device::Cpu;
        for &(b, g, t, past, d) in &[
            (2, 3, 7, 0, 8),
            (1, 1, 5, 4, 16),
            (2, 2, 1, 9, 8),
            (4, 1, 33, 0, 8),
        ] {
            let l = past + t;
            let q = Tensor::randn(0f32, 1.0, (b, g, t, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, l, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, l, d), &dev).unwrap();
            for offset in [Some(past), None] {
                let want = naive(&q, &k, &v, 0.3, offset);
                let got = attention(&q, &k, &v, 0.3, offset).unwrap();
                assert!(
                    max_diff(&got, &want) < 1e-5,
                    "{b} {g} {t} {past} {offset:?}"
                );
            }
        }
    }

    #[test]
    fn small_blocks_equal_one_block() {
        let dev = Device::Cpu;
        let (b, g, t, past, d) = (2, 3, 11, 5, 8);
        let l = past + t;
        let q = Tensor::randn(0f32, 1.0, (b, g, t, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, l, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, l, d), &dev).unwrap();
        for offset in [Some(past), None] {
            let want = naive(&q, &k, &v, 0.5, offset);
            // b*g*l = 96 elements per query row: blocks of 1, 2 and 4 queries.
            for max in [96, 200, 400] {
                let got = attention_blocked(&q, &k, &v, 0.5, offset, max).unwrap();
                assert!(max_diff(&got, &want) < 1e-5, "max {max} offset {offset:?}");
            }
        }
    }

    /// The sliding window equals an explicit mask (key `j` hidden from position `i` when
    /// `j <= i - window`, transformers' rule) on top of the causal one, for windows shorter
    /// than, equal to and longer than the keys, and offsets before and past the window.
    #[test]
    fn windowed_attention_equals_a_masked_softmax() {
        let dev = Device::Cpu;
        let (b, g, d) = (2, 3, 8);
        for &(t, past) in &[(9, 0), (1, 20), (6, 7), (1, 3)] {
            let l = past + t;
            let q = Tensor::randn(0f32, 1.0, (b, g, t, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, l, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, l, d), &dev).unwrap();
            for w in [1, 3, 5, l, l + 4] {
                let mask: Vec<f32> = (0..t)
                    .flat_map(|r| {
                        let i = past + r;
                        (0..l).map(move |j| {
                            if j <= i && j + w > i {
                                0.0
                            } else {
                                f32::NEG_INFINITY
                            }
                        })
                    })
                    .collect();
                let mask = Tensor::from_vec(mask, (t, l), &dev).unwrap();
                let s = (q
                    .reshape((b, g * t, d))
                    .unwrap()
                    .matmul(&k.t().unwrap())
                    .unwrap()
                    * 0.4)
                    .unwrap()
                    .reshape((b, g, t, l))
                    .unwrap()
                    .broadcast_add(&mask)
                    .unwrap()
                    .reshape((b, g * t, l))
                    .unwrap();
                let want = candle_nn::ops::softmax(&s, D::Minus1)
                    .unwrap()
                    .matmul(&v)
                    .unwrap()
                    .reshape((b, g, t, d))
                    .unwrap();
                let got = attention_causal(&q, &k, &v, 0.4, past, Some(w)).unwrap();
                assert!(max_diff(&got, &want) < 1e-5, "t {t} past {past} window {w}");
            }
            let plain = attention_causal(&q, &k, &v, 0.4, past, None).unwrap();
            assert!(max_diff(&plain, &naive(&q, &k, &v, 0.4, Some(past))) < 1e-5);
        }
    }
}

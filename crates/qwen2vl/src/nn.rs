//! Small building blocks shared by both towers, loaded by checkpoint name.

use candle_core::{Module, Tensor};

use crate::error::Result;
use crate::weights::Weights;

/// `y = x W^T + b` with `W: (out, in)`; `x: (..., in)` → `(..., out)`.
#[derive(Debug, Clone)]
pub struct Linear(candle_nn::Linear);

impl Linear {
    /// Loads `{prefix}.weight` `(out, in)` and, when `bias`, `{prefix}.bias` `(out,)`.
    pub fn load(
        w: &Weights,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), (out_dim, in_dim))?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), out_dim)?)
        } else {
            None
        };
        Ok(Linear(candle_nn::Linear::new(weight, bias)))
    }

    /// From an existing weight `(out, in)` (tied embeddings).
    pub fn from_weight(weight: Tensor) -> Self {
        Linear(candle_nn::Linear::new(weight, None))
    }

    /// Device of the weight.
    pub fn device(&self) -> &candle_core::Device {
        self.0.weight().device()
    }

    /// `x: (..., in)` → `(..., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.0.forward(x)?)
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
        Ok(candle_nn::ops::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
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
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// Softmax over the last dimension, computed in f32 whatever the compute dtype
/// (transformers upcasts attention probabilities to f32 the same way).
pub fn softmax_f32(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let p = candle_nn::ops::softmax_last_dim(&x.to_dtype(candle_core::DType::F32)?)?;
    Ok(p.to_dtype(dtype)?)
}

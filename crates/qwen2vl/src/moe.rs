//! The sparse mixture-of-experts block of `Qwen2MoeForCausalLM` (mirrors
//! `Qwen2MoeSparseMoeBlock`, transformers 4.49): a router, `num_experts` SwiGLU experts of
//! which each token uses its top `num_experts_per_tok`, and a shared expert behind a sigmoid
//! gate that every token uses.
//!
//! Per token `x` (hidden):
//! - `p = softmax(gate(x))` over the experts, in f32; the top-k `(p_e, e)` by probability,
//!   divided by their sum when `norm_topk_prob`, then cast to the compute dtype;
//! - `routed = Σ_e p_e · expert_e(x)`, accumulated expert by expert in index order (the
//!   reference's loop of `index_add_`), each expert run only on the tokens routed to it;
//! - `out = routed + sigmoid(shared_expert_gate(x)) · shared_expert(x)`.

use candle_core::{DType, Tensor};

use crate::config::MoeConfig;
use crate::error::{Error, Result};
use crate::nn::{Linear, Mlp};
use crate::weights::Weights;

/// `Qwen2MoeSparseMoeBlock`: checkpoint names under `model.layers.N.mlp`: `gate`,
/// `experts.K.{gate,up,down}_proj`, `shared_expert.{gate,up,down}_proj`, `shared_expert_gate`.
#[derive(Debug, Clone)]
pub struct SparseMoeBlock {
    /// Router `(num_experts, hidden)`, no bias.
    gate: Linear,
    experts: Vec<Mlp>,
    shared_expert: Mlp,
    /// `(1, hidden)`, no bias.
    shared_expert_gate: Linear,
    top_k: usize,
    norm_topk_prob: bool,
}

/// The experts each token is routed to: `(token, expert, weight)` per token, top-k in order of
/// decreasing probability.
pub fn route(
    probs_logits: &[f32],
    experts: usize,
    top_k: usize,
    norm: bool,
) -> Vec<Vec<(usize, f32)>> {
    probs_logits
        .chunks_exact(experts)
        .map(|logits| {
            // softmax in f32 (`F.softmax(router_logits, dim=1, dtype=torch.float)`).
            let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            let mut order: Vec<usize> = (0..experts).collect();
            // Stable by index on ties, as torch.topk returns the lower index first on CPU.
            order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]).then(a.cmp(&b)));
            let mut chosen: Vec<(usize, f32)> =
                order[..top_k].iter().map(|&e| (e, exps[e] / sum)).collect();
            if norm {
                let total: f32 = chosen.iter().map(|c| c.1).sum();
                for c in &mut chosen {
                    c.1 /= total;
                }
            }
            chosen
        })
        .collect()
}

impl SparseMoeBlock {
    /// Loads the block under `prefix` (`model.layers.N.mlp`).
    pub fn load(w: &Weights, prefix: &str, hidden: usize, cfg: &MoeConfig) -> Result<Self> {
        let experts = (0..cfg.num_experts)
            .map(|k| {
                Mlp::load_sized(
                    w,
                    &format!("{prefix}.experts.{k}"),
                    hidden,
                    cfg.moe_intermediate_size,
                )
            })
            .collect::<Result<_>>()?;
        // The router and the shared expert's gate stay float under --quant (as llama.cpp
        // keeps `ffn_gate_inp` in f32): they are tiny, and rounding them could flip a
        // token's choice of experts.
        let float = |name: &str, rows: usize| -> Result<Linear> {
            Ok(Linear::from_weight(
                w.get(&format!("{prefix}.{name}.weight"), (rows, hidden))?,
            ))
        };
        Ok(SparseMoeBlock {
            gate: float("gate", cfg.num_experts)?,
            experts,
            shared_expert: Mlp::load_sized(
                w,
                &format!("{prefix}.shared_expert"),
                hidden,
                cfg.shared_expert_intermediate_size,
            )?,
            shared_expert_gate: float("shared_expert_gate", 1)?,
            top_k: cfg.num_experts_per_tok,
            norm_topk_prob: cfg.norm_topk_prob,
        })
    }

    /// `x: (..., hidden)` → `(..., hidden)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let hidden = *dims
            .last()
            .ok_or_else(|| Error::Internal("MoE input without dimensions".into()))?;
        let x = x.reshape(((), hidden))?; // (n, hidden)
        let n = x.dim(0)?;
        let e = self.experts.len();
        let logits = self.gate.forward(&x)?.to_dtype(DType::F32)?; // (n, E)
        let routes = route(
            &logits.flatten_all()?.to_vec1::<f32>()?,
            e,
            self.top_k,
            self.norm_topk_prob,
        );
        // Tokens and weights per expert, in token order.
        let mut per_expert: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); e];
        for (t, chosen) in routes.iter().enumerate() {
            for &(k, p) in chosen {
                per_expert[k].0.push(t as u32);
                per_expert[k].1.push(p);
            }
        }
        let mut out = x.zeros_like()?;
        for (expert, (tokens, weights)) in self.experts.iter().zip(&per_expert) {
            if tokens.is_empty() {
                continue;
            }
            let idx = Tensor::from_slice(tokens, tokens.len(), x.device())?;
            let rows = x.index_select(&idx, 0)?; // (m, hidden)
            let w =
                Tensor::from_slice(weights, (weights.len(), 1), x.device())?.to_dtype(x.dtype())?;
            let y = expert.forward(&rows)?.broadcast_mul(&w)?;
            out = out.index_add(&idx, &y, 0)?;
        }
        let shared = self.shared_expert.forward(&x)?;
        let g = candle_nn::ops::sigmoid(&self.shared_expert_gate.forward(&x)?)?; // (n, 1)
        let out = (out + shared.broadcast_mul(&g)?)?;
        debug_assert_eq!(out.dim(0)?, n);
        Ok(out.reshape(dims)?)
    }
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn top_k_of_the_softmax_with_and_without_renormalising() {
        // Two tokens, three experts.
        let logits = [0.0f32, 1.0, 2.0, 3.0, 3.0, -1.0];
        let r = route(&logits, 3, 2, false);
        let s: f32 = [0.0f32, 1.0, 2.0].iter().map(|x| x.exp()).sum();
        assert_eq!(r[0][0].0, 2);
        assert_eq!(r[0][1].0, 1);
        assert!((r[0][0].1 - 2f32.exp() / s).abs() < 1e-6);
        assert!((r[0][1].1 - 1f32.exp() / s).abs() < 1e-6);
        // A tie keeps the lower index first.
        assert_eq!((r[1][0].0, r[1][1].0), (0, 1));
        let r = route(&logits, 3, 2, true);
        assert!((r[0][0].1 + r[0][1].1 - 1.0).abs() < 1e-6);
        assert!((r[1][0].1 - 0.5).abs() < 1e-6);
    }
}

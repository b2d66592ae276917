//! Which weights are quantized to which format when a checkpoint loads with `--quant`.
//!
//! Only the matrices of linear layers and the token embeddings are quantized; norms, biases
//! and the vision patch embedding stay in the compute dtype. The vision tower keeps float
//! weights unless a vision scheme is given (it is a small share of the bytes, and none of the
//! peers quantize it well).
//!
//! `q4_k_m` is llama.cpp's mix (`llama_tensor_get_type` for `LLAMA_FTYPE_MOSTLY_Q4_K_M`):
//! Q4_K everywhere except Q6_K for the token embeddings / LM head and for the `v_proj` and
//! `down_proj` of the first and last eighth of the layers and every third layer between
//! (the layers where more bits pay off most).
//!
//! A matrix whose rows are not a multiple of 256 values cannot be stored in a K format; it
//! falls back to Q8_0 (rows a multiple of 32) or stays float, as llama.cpp falls back.

use std::str::FromStr;

use super::format::QType;
use crate::error::Error;

/// A quantization scheme a user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantScheme {
    /// Every quantized matrix in Q8_0.
    Q8_0,
    /// Every quantized matrix in Q4_K.
    Q4K,
    /// Every quantized matrix in Q6_K.
    Q6K,
    /// llama.cpp's Q4_K_M mix (see the module docs).
    Q4KM,
}

impl QuantScheme {
    /// The names [`FromStr`] accepts.
    pub const NAMES: &'static str = "q8_0, q4_k, q4_k_m or q6_k";

    /// The name users type.
    pub fn name(self) -> &'static str {
        match self {
            QuantScheme::Q8_0 => "q8_0",
            QuantScheme::Q4K => "q4_k",
            QuantScheme::Q6K => "q6_k",
            QuantScheme::Q4KM => "q4_k_m",
        }
    }
}

impl std::fmt::Display for QuantScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for QuantScheme {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(QuantScheme::Q8_0),
            "q4_k" | "q4_k_s" => Ok(QuantScheme::Q4K),
            "q6_k" => Ok(QuantScheme::Q6K),
            "q4_k_m" => Ok(QuantScheme::Q4KM),
            _ => Err(Error::bad_input(
                format!("unknown quantization {s:?}"),
                QuantScheme::NAMES,
            )),
        }
    }
}

/// The schemes of one load: for the decoder (and embeddings) and for the vision tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantPlan {
    /// Decoder layers, embeddings and LM head.
    pub text: Option<QuantScheme>,
    /// Vision blocks and merger (not the patch embedding).
    pub vision: Option<QuantScheme>,
    /// Decoder layers in the model (for the Q4_K_M layer choice).
    pub layers: usize,
}

/// llama.cpp's `use_more_bits(i, n)`: the first and last eighth and every third layer between.
fn more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The decoder layer a checkpoint name belongs to (`model.layers.12.mlp.down_proj.weight`).
fn layer_of(name: &str) -> Option<usize> {
    let rest = name.split("layers.").nth(1)?;
    rest.split('.').next()?.parse().ok()
}

impl QuantPlan {
    /// The format of the matrix `name` with rows of `k` values, or `None` to keep it float.
    pub fn type_for(&self, name: &str, k: usize) -> Option<QType> {
        let vision = name.starts_with("visual.") || name.contains(".visual.");
        let scheme = if vision { self.vision? } else { self.text? };
        // The patch kernel, and a MoE block's router and shared-expert gate: they stay float
        // (`moe.rs`; tiny, and rounding them could flip a token's choice of experts).
        if name.contains("patch_embed")
            || name.ends_with(".mlp.gate.weight")
            || name.ends_with(".mlp.shared_expert_gate.weight")
        {
            return None;
        }
        let wanted = match scheme {
            QuantScheme::Q8_0 => QType::Q8_0,
            QuantScheme::Q4K => QType::Q4K,
            QuantScheme::Q6K => QType::Q6K,
            QuantScheme::Q4KM => {
                let head = name.contains("embed_tokens") || name.starts_with("lm_head");
                let sensitive = name.contains("v_proj") || name.contains("down_proj");
                let deep = layer_of(name).is_some_and(|i| more_bits(i, self.layers));
                if head || (sensitive && deep) {
                    QType::Q6K
                } else {
                    QType::Q4K
                }
            }
        };
        if k.is_multiple_of(wanted.block_len()) {
            Some(wanted)
        } else if k.is_multiple_of(QType::Q8_0.block_len()) {
            Some(QType::Q8_0)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_follows_llama_cpp_layer_choice() {
        let plan = QuantPlan {
            text: Some(QuantScheme::Q4KM),
            vision: None,
            layers: 28,
        };
        let six: Vec<usize> = (0..28)
            .filter(|i| {
                plan.type_for(&format!("model.layers.{i}.mlp.down_proj.weight"), 8960)
                    == Some(QType::Q6K)
            })
            .collect();
        assert_eq!(six, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]);
        let q = |n: &str| plan.type_for(n, 1536);
        assert_eq!(
            q("model.layers.3.self_attn.q_proj.weight"),
            Some(QType::Q4K)
        );
        assert_eq!(
            q("model.layers.0.self_attn.v_proj.weight"),
            Some(QType::Q6K)
        );
        assert_eq!(
            q("model.layers.3.self_attn.v_proj.weight"),
            Some(QType::Q4K)
        );
        assert_eq!(q("model.embed_tokens.weight"), Some(QType::Q6K));
        assert_eq!(q("lm_head.weight"), Some(QType::Q6K));
        assert_eq!(q("visual.blocks.0.attn.qkv.weight"), None);
    }

    #[test]
    fn fallbacks_and_names() {
        let plan = QuantPlan {
            text: Some(QuantScheme::Q4K),
            vision: Some(QuantScheme::Q8_0),
            layers: 2,
        };
        assert_eq!(
            plan.type_for("model.layers.0.mlp.up_proj.weight", 64),
            Some(QType::Q8_0)
        );
        assert_eq!(plan.type_for("model.layers.0.mlp.up_proj.weight", 40), None);
        assert_eq!(
            plan.type_for("visual.blocks.0.mlp.fc1.weight", 1280),
            Some(QType::Q8_0)
        );
        assert_eq!(plan.type_for("visual.patch_embed.proj.weight", 1176), None);
        assert_eq!(plan.type_for("model.layers.0.mlp.gate.weight", 64), None);
        assert_eq!(
            plan.type_for("model.layers.0.mlp.shared_expert_gate.weight", 64),
            None
        );
        assert!(plan
            .type_for("model.layers.0.mlp.experts.0.gate_proj.weight", 64)
            .is_some());
        assert_eq!("Q4_K_M".parse::<QuantScheme>().unwrap(), QuantScheme::Q4KM);
        let e = "q3".parse::<QuantScheme>().unwrap_err().to_string();
        assert!(e.contains("q3") && e.contains("q4_k_m"), "{e}");
    }
}

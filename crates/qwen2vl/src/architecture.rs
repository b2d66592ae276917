//! Which model a checkpoint is: the `architectures` of its `config.json` ([`Architecture`]),
//! and the mixture-of-experts fields of a `Qwen2MoeForCausalLM` ([`MoeConfig`], mirrors
//! `transformers.Qwen2MoeConfig`, 4.49, with its defaults). Re-exported by [`crate::config`].

use serde::{Deserialize, Serialize};

/// The model a checkpoint's `config.json` names in `architectures`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Architecture {
    /// `Qwen2VLForConditionalGeneration`: vision tower + Qwen2 decoder with M-RoPE.
    #[default]
    Qwen2VL,
    /// `Qwen2_5_VLForConditionalGeneration`: Qwen2.5-VL's vision tower (RMSNorm, SwiGLU,
    /// window attention) + the same decoder; video positions in absolute time.
    Qwen25VL,
    /// `Qwen2ForCausalLM`: the Qwen2 decoder alone (Qwen2 / Qwen2.5 text models), 1-D RoPE,
    /// no vision tower.
    Qwen2,
    /// `Qwen2MoeForCausalLM`: Qwen2 with mixture-of-experts MLPs ([`MoeConfig`]; Qwen2
    /// 57B-A14B), text only.
    Qwen2Moe,
}

impl Architecture {
    /// The `architectures` names this engine runs.
    pub const SUPPORTED: [&'static str; 4] = [
        "Qwen2VLForConditionalGeneration",
        "Qwen2ForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen2_5_VLForConditionalGeneration",
    ];

    /// Its name in `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Qwen2VL => Self::SUPPORTED[0],
            Architecture::Qwen2 => Self::SUPPORTED[1],
            Architecture::Qwen2Moe => Self::SUPPORTED[2],
            Architecture::Qwen25VL => Self::SUPPORTED[3],
        }
    }

    /// What the boxes in this model's answers are measured in: Qwen2.5-VL writes pixels of
    /// the resized image, Qwen2-VL thousandths of the image.
    pub fn box_coordinates(self) -> crate::grounding::BoxCoordinates {
        match self {
            Architecture::Qwen25VL => crate::grounding::BoxCoordinates::ResizedPixels,
            _ => crate::grounding::BoxCoordinates::Thousandths,
        }
    }

    /// Whether checkpoints of this architecture have a vision tower.
    pub fn has_vision(self) -> bool {
        matches!(self, Architecture::Qwen2VL | Architecture::Qwen25VL)
    }

    /// The architecture of a `config.json`: its first `architectures` entry, else its
    /// `model_type` (`qwen2_vl`, `qwen2_5_vl`, `qwen2`, `qwen2_moe`), else Qwen2-VL (older hand-written files have
    /// neither). Anything else is an error naming it and what is supported.
    pub(crate) fn from_json(
        architectures: Option<&[String]>,
        model_type: Option<&str>,
    ) -> std::result::Result<Self, String> {
        let supported = || Self::SUPPORTED.join(", ");
        match architectures.and_then(|a| a.first()) {
            Some(a) if a == Self::SUPPORTED[0] => Ok(Architecture::Qwen2VL),
            Some(a) if a == Self::SUPPORTED[1] => Ok(Architecture::Qwen2),
            Some(a) if a == Self::SUPPORTED[2] => Ok(Architecture::Qwen2Moe),
            Some(a) if a == Self::SUPPORTED[3] => Ok(Architecture::Qwen25VL),
            Some(a) => Err(format!(
                "architecture {a} is not supported; supported: {}",
                supported()
            )),
            None => match model_type {
                None | Some("qwen2_vl") => Ok(Architecture::Qwen2VL),
                Some("qwen2") => Ok(Architecture::Qwen2),
                Some("qwen2_moe") => Ok(Architecture::Qwen2Moe),
                Some("qwen2_5_vl") => Ok(Architecture::Qwen25VL),
                Some(m) => Err(format!(
                    "model_type {m} (no \"architectures\") is not supported; supported: {}",
                    supported()
                )),
            },
        }
    }
}

fn d_sparse_step() -> usize {
    1
}
fn d_moe_intermediate() -> usize {
    1408
}
fn d_shared_intermediate() -> usize {
    5632
}
fn d_experts_per_tok() -> usize {
    4
}
fn d_experts() -> usize {
    60
}

/// The mixture-of-experts fields of a `Qwen2MoeForCausalLM` `config.json` (mirrors
/// `transformers.Qwen2MoeConfig`, 4.49, with its defaults).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MoeConfig {
    /// Every `decoder_sparse_step`-th layer (1-based) is sparse.
    #[serde(default = "d_sparse_step")]
    pub decoder_sparse_step: usize,
    /// Hidden width of each routed expert's SwiGLU MLP.
    #[serde(default = "d_moe_intermediate")]
    pub moe_intermediate_size: usize,
    /// Hidden width of the shared expert.
    #[serde(default = "d_shared_intermediate")]
    pub shared_expert_intermediate_size: usize,
    /// Experts each token is routed to (top-k).
    #[serde(default = "d_experts_per_tok")]
    pub num_experts_per_tok: usize,
    /// Routed experts per sparse layer.
    #[serde(default = "d_experts")]
    pub num_experts: usize,
    /// Renormalise the top-k routing weights to sum to 1.
    #[serde(default)]
    pub norm_topk_prob: bool,
    /// Layers (0-based) that keep a dense MLP of `intermediate_size`.
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
}

impl MoeConfig {
    /// Whether decoder layer `layer` (0-based) has a sparse MoE block
    /// (`Qwen2MoeDecoderLayer.__init__`).
    pub fn is_sparse(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer)
            && self.num_experts > 0
            && self.decoder_sparse_step > 0
            && (layer + 1).is_multiple_of(self.decoder_sparse_step)
    }
}

/// The error for images or videos given to a text model (`Qwen2ForCausalLM`,
/// `Qwen2MoeForCausalLM`): `part` names what was sent ("an image part").
pub fn text_model_vision(part: impl std::fmt::Display, arch: Architecture) -> crate::error::Error {
    crate::error::Error::bad_input(
        format!(
            "{part} was sent, but this model ({}) is a text model and has no vision tower",
            arch.name()
        ),
        "text-only messages (use a Qwen2-VL model for images and videos)",
    )
}

//! Serde mirrors of the checkpoint's JSON files, with Hugging Face's defaults.
//!
//! - `config.json` → [`Qwen2VLConfig`] (mirrors `transformers.Qwen2VLConfig`, 4.49), with the
//!   vision tower in [`VisionConfig`] (mirrors `Qwen2VLVisionConfig`; a Qwen2.5-VL checkpoint's
//!   `vision_config` is read as [`Qwen25VisionConfig`], mirrors `Qwen2_5_VLVisionConfig`).
//! - `preprocessor_config.json` → [`PreprocessorConfig`] (mirrors `Qwen2VLImageProcessor`).
//! - `generation_config.json` → [`GenerationConfig`] (mirrors `GenerationConfig`).
//!
//! Newer checkpoints (transformers ≥ 4.52) nest the text fields under `text_config`; both
//! layouts are accepted, the nested one taking precedence.
//!
//! The same file of a Qwen2 *text* checkpoint (`Qwen2ForCausalLM`: Qwen2 and Qwen2.5 0.5B–72B)
//! parses into the same struct: `architectures` picks the [`Architecture`]; such a model has no
//! vision tower and rotates with 1-D RoPE (mirrors `transformers.Qwen2Config`, 4.49).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use crate::architecture::{Architecture, MoeConfig};

fn d_vocab() -> usize {
    152064
}
fn d_hidden() -> usize {
    8192
}
fn d_intermediate() -> usize {
    29568
}
fn d_layers() -> usize {
    80
}
fn d_heads() -> usize {
    64
}
fn d_kv_heads() -> usize {
    8
}
fn d_max_pos() -> usize {
    32768
}
fn d_rms_eps() -> f64 {
    1e-5
}
fn d_rope_theta() -> f64 {
    1_000_000.0
}
fn d_act() -> String {
    "silu".into()
}
fn d_vision_start() -> u32 {
    151652
}
fn d_vision_end() -> u32 {
    151653
}
fn d_vision_token() -> u32 {
    151654
}
fn d_image_token() -> u32 {
    151655
}
fn d_video_token() -> u32 {
    151656
}

fn d_sliding_window() -> Option<usize> {
    Some(4096)
}

/// `rope_scaling` of `config.json`: `{"type": "mrope", "mrope_section": [16, 24, 24]}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeScaling {
    /// "mrope" in older files; newer ones write "default" here and in `rope_type`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// The newer name of `type` (files often carry both).
    #[serde(default)]
    pub rope_type: Option<String>,
    /// Split of the rotary half-dimension into (temporal, height, width) sections (Qwen2-VL
    /// only; empty when absent, as in a text model's `{"type": "yarn", ...}`).
    #[serde(default)]
    pub mrope_section: Vec<usize>,
}

impl RopeScaling {
    /// `rope_type`, else `type` ("mrope", "default", "yarn", …).
    pub fn kind(&self) -> Option<&str> {
        self.rope_type.as_deref().or(self.kind.as_deref())
    }
}

/// The text fields of `config.json` (Qwen2 decoder).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_kv_heads")]
    pub num_key_value_heads: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "d_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    /// `sliding_window` (HF's default 4096 when absent; `null` turns it off). See
    /// [`TextConfig::attention_window`] for where it applies.
    #[serde(default = "d_sliding_window")]
    pub sliding_window: Option<usize>,
    /// Layers from this index on use the window when `use_sliding_window`, in transformers'
    /// flash-attention path only (recorded; see [`TextConfig::attention_window`]).
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Set from [`Architecture`], not read from the file: a text-only model (`Qwen2ForCausalLM`)
    /// rotates with 1-D RoPE (`Qwen2RotaryEmbedding`), i.e. one section over the whole
    /// rotary half-dimension.
    #[serde(skip)]
    pub rope_1d: bool,
    /// The mixture-of-experts fields, for a `Qwen2MoeForCausalLM` (set from
    /// [`Architecture`]; `None` for dense models).
    #[serde(skip)]
    pub moe: Option<MoeConfig>,
}

impl TextConfig {
    /// Per-head dimension (`hidden_size / num_attention_heads`).
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Floating-point operations (a multiply-add is 2) of a prefill of `tokens` prompt
    /// positions after `past` cached ones: per layer the q, k, v and o projections, causal
    /// attention (position `i` attends to `past + i + 1` keys) and the MLP (for a sparse MoE
    /// layer the router, the top-k routed experts and the shared expert), then the LM head
    /// of the last position (the one whose logits give the first token). Element-wise work
    /// is left out. The 2B's 416-token prompt is about 1.1 TFLOP.
    pub fn prefill_flops(&self, tokens: usize, past: usize) -> f64 {
        let (d, t) = (self.hidden_size as f64, tokens as f64);
        let (h, kv, hd) = (
            self.num_attention_heads as f64,
            self.num_key_value_heads as f64,
            self.head_dim() as f64,
        );
        let projections = 2.0 * t * d * (2.0 * h * hd + 2.0 * kv * hd);
        let dense = 2.0 * t * 3.0 * d * self.intermediate_size as f64;
        // A sparse MoE layer: the router, each token's top-k experts and the shared one.
        let sparse = self.moe.as_ref().map(|m| {
            let widths = (m.num_experts_per_tok * m.moe_intermediate_size
                + m.shared_expert_intermediate_size) as f64;
            2.0 * t * d * (3.0 * widths + m.num_experts as f64 + 1.0)
        });
        let mlp: f64 = (0..self.num_hidden_layers)
            .map(|i| match (&self.moe, sparse) {
                (Some(m), Some(s)) if m.is_sparse(i) => s,
                _ => dense,
            })
            .sum();
        // Σ over the new positions of the keys each sees, times q·kᵀ and p·v per head.
        let keys = t * past as f64 + t * (t + 1.0) / 2.0;
        let attention = 4.0 * keys * h * hd;
        let head = if tokens > 0 {
            2.0 * d * self.vocab_size as f64
        } else {
            0.0
        };
        self.num_hidden_layers as f64 * (projections + attention) + mlp + head
    }

    /// The M-RoPE sections; `[16, 24, 24]` when absent (the released checkpoints' value).
    /// A text model's 1-D RoPE is one section `[head_dim / 2]`: every rotary frequency takes
    /// the first (temporal) position id, which is exactly `Qwen2RotaryEmbedding`'s rotation.
    pub fn mrope_section(&self) -> Vec<usize> {
        if self.rope_1d {
            return vec![self.head_dim() / 2];
        }
        self.rope_scaling
            .as_ref()
            .map(|r| r.mrope_section.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| vec![16, 24, 24])
    }

    /// The context this engine serves: `max_position_embeddings`.
    pub fn context_len(&self) -> usize {
        self.max_position_embeddings
    }

    /// The sliding window of every decoder layer's attention, if any: query position `i`
    /// sees keys `i - window + 1 ..= i` (fewer at the start). `None`: plain causal attention.
    ///
    /// This is what transformers 4.49 computes in its default attention paths (SDPA, and
    /// eager): `Qwen2Model._prepare_4d_causal_attention_mask_with_cache_position`
    /// (`modeling_qwen2.py` lines 738-745, the same in `modeling_qwen2_moe.py` and
    /// `modeling_qwen2_vl.py`) hides key `j` from query `i` when `j <= i - sliding_window`,
    /// in one mask shared by *every* layer, whenever `config.sliding_window` is not `None`.
    /// `use_sliding_window` and `max_window_layers` are read only to pass `sliding_window=`
    /// to the attention function (`modeling_qwen2.py` lines 174-180), which only
    /// flash-attention 2 uses; SDPA and eager take it in `**kwargs` and ignore it. What sets
    /// `config.sliding_window`:
    /// - `Qwen2Config` and `Qwen2VLConfig` keep `sliding_window` as given (default 4096),
    ///   whatever `use_sliding_window` says (`configuration_qwen2.py` line 177);
    /// - `Qwen2MoeConfig` sets it to `None` unless `use_sliding_window`
    ///   (`configuration_qwen2_moe.py` line 207).
    ///
    /// A window at or beyond `max_position_embeddings` never hides a key within the context
    /// (released Qwen2, Qwen2.5 and Qwen2-VL configs), so it is `None` here.
    pub fn attention_window(&self) -> Option<usize> {
        if self.moe.is_some() && !self.use_sliding_window {
            return None;
        }
        self.sliding_window
            .filter(|&w| w >= 1 && w < self.max_position_embeddings)
    }
}

fn d_v_depth() -> usize {
    32
}
fn d_v_embed() -> usize {
    1280
}
fn d_v_hidden() -> usize {
    3584
}
fn d_v_act() -> String {
    "quick_gelu".into()
}
fn d_v_mlp_ratio() -> f64 {
    4.0
}
fn d_v_heads() -> usize {
    16
}
fn d_v_chans() -> usize {
    3
}
fn d_v_patch() -> usize {
    14
}
fn d_v_merge() -> usize {
    2
}
fn d_v_temporal() -> usize {
    2
}

/// `vision_config` of `config.json` (mirrors `Qwen2VLVisionConfig`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VisionConfig {
    #[serde(default = "d_v_depth")]
    pub depth: usize,
    #[serde(default = "d_v_embed")]
    pub embed_dim: usize,
    /// Output width of the merger = the text model's hidden size.
    #[serde(default = "d_v_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_v_act")]
    pub hidden_act: String,
    #[serde(default = "d_v_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "d_v_heads")]
    pub num_heads: usize,
    #[serde(default = "d_v_chans", alias = "in_channels")]
    pub in_chans: usize,
    #[serde(default = "d_v_patch")]
    pub patch_size: usize,
    #[serde(default = "d_v_merge")]
    pub spatial_merge_size: usize,
    #[serde(default = "d_v_temporal")]
    pub temporal_patch_size: usize,
    /// What a Qwen2.5-VL tower adds (set from [`Qwen25VisionConfig`], not read here); `None`
    /// for Qwen2-VL's.
    #[serde(skip)]
    pub qwen25: Option<Qwen25Vision>,
}

/// What Qwen2.5-VL's vision tower has beyond Qwen2-VL's: RMSNorm instead of LayerNorm (blocks
/// and merger), a SwiGLU MLP with biases of `intermediate_size`, attention within windows
/// of `window_size` pixels except in `fullatt_block_indexes`, and absolute-time video
/// positions (`tokens_per_second`).
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen25Vision {
    /// Hidden width of the blocks' SwiGLU MLP.
    pub intermediate_size: usize,
    /// Side of an attention window in pixels (112: 4x4 merged tokens of 28 pixels).
    pub window_size: usize,
    /// Blocks (0-based) that attend over whole frames; the others attend within windows.
    pub fullatt_block_indexes: Vec<usize>,
    /// Temporal M-RoPE ids per second of video.
    pub tokens_per_second: f64,
}

impl Qwen25Vision {
    /// Side of a window in merged tokens (`window_size / merge / patch`, the reference's
    /// `vit_merger_window_size`).
    pub fn window_merged(&self, cfg: &VisionConfig) -> usize {
        self.window_size / cfg.spatial_merge_size / cfg.patch_size
    }
}

fn d_q25_depth() -> usize {
    32
}
fn d_q25_hidden() -> usize {
    3584
}
fn d_q25_intermediate() -> usize {
    3420
}
fn d_q25_tokens_per_second() -> f64 {
    4.0
}
fn d_q25_window() -> usize {
    112
}
fn d_q25_fullatt() -> Vec<usize> {
    vec![7, 15, 23, 31]
}

/// `vision_config` of a Qwen2.5-VL `config.json` (mirrors `Qwen2_5_VLVisionConfig`, 4.49,
/// with its defaults). Its `hidden_size` is the blocks' width (Qwen2-VL's `embed_dim`) and
/// `out_hidden_size` the merger's output (Qwen2-VL's `hidden_size`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Qwen25VisionConfig {
    #[serde(default = "d_q25_depth")]
    pub depth: usize,
    #[serde(default = "d_q25_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_q25_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_v_heads")]
    pub num_heads: usize,
    #[serde(default = "d_v_chans", alias = "in_chans")]
    pub in_channels: usize,
    #[serde(default = "d_v_patch")]
    pub patch_size: usize,
    #[serde(default = "d_v_merge")]
    pub spatial_merge_size: usize,
    #[serde(default = "d_v_temporal")]
    pub temporal_patch_size: usize,
    #[serde(default = "d_q25_tokens_per_second")]
    pub tokens_per_second: f64,
    #[serde(default = "d_q25_window")]
    pub window_size: usize,
    #[serde(default = "d_q25_hidden")]
    pub out_hidden_size: usize,
    #[serde(default = "d_q25_fullatt")]
    pub fullatt_block_indexes: Vec<usize>,
}

impl Qwen25VisionConfig {
    /// The tower's fields under Qwen2-VL's names, with the additions in
    /// [`VisionConfig::qwen25`].
    pub fn to_vision(&self) -> VisionConfig {
        VisionConfig {
            depth: self.depth,
            embed_dim: self.hidden_size,
            hidden_size: self.out_hidden_size,
            hidden_act: self.hidden_act.clone(),
            mlp_ratio: self.intermediate_size as f64 / self.hidden_size.max(1) as f64,
            num_heads: self.num_heads,
            in_chans: self.in_channels,
            patch_size: self.patch_size,
            spatial_merge_size: self.spatial_merge_size,
            temporal_patch_size: self.temporal_patch_size,
            qwen25: Some(Qwen25Vision {
                intermediate_size: self.intermediate_size,
                window_size: self.window_size,
                fullatt_block_indexes: self.fullatt_block_indexes.clone(),
                tokens_per_second: self.tokens_per_second,
            }),
        }
    }
}

impl Default for VisionConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all vision fields have defaults")
    }
}

impl VisionConfig {
    /// Per-head dimension of the vision attention (80 for the released models).
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }
    /// Hidden width of the vision MLP (`embed_dim * mlp_ratio`; Qwen2.5-VL's
    /// `intermediate_size`).
    pub fn mlp_hidden_dim(&self) -> usize {
        match &self.qwen25 {
            Some(q) => q.intermediate_size,
            None => (self.embed_dim as f64 * self.mlp_ratio) as usize,
        }
    }
    /// Length of one flattened patch: `in_chans * temporal_patch_size * patch_size²` (1176).
    pub fn patch_dim(&self) -> usize {
        self.in_chans * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Floating-point operations (a multiply-add is 2) of one vision-tower pass over items
    /// of `grids` (`[t, h, w]` patches each): the patch embedding, per block the qkv,
    /// attention within each frame of `h * w` patches (`q·kᵀ` and `p·v`), output
    /// projection and MLP, then the merger. Element-wise work (norms, GELU, softmax,
    /// rotary) is left out: it is what the arithmetic floor does not count. The 2B's
    /// tower on a 640x480 image (1564 patches) is about 2.4 TFLOP. A Qwen2.5-VL tower's MLP
    /// has three matrices, and its blocks outside `fullatt_block_indexes` attend within
    /// windows.
    pub fn flops(&self, grids: &[[usize; 3]]) -> f64 {
        let e = self.embed_dim as f64;
        let n: f64 = grids.iter().map(|g| (g[0] * g[1] * g[2]) as f64).sum();
        let frames: f64 = grids
            .iter()
            .map(|g| g[0] as f64 * ((g[1] * g[2]) as f64).powi(2))
            .sum();
        let (mlp_mats, attention) = match &self.qwen25 {
            None => (2.0, self.depth as f64 * 4.0 * frames * e),
            Some(q) => {
                let windows: f64 = crate::rope::vision_window_index(
                    grids,
                    self.spatial_merge_size,
                    q.window_merged(self),
                )
                .1
                .iter()
                .map(|w| (w.1 as f64).powi(2))
                .sum();
                let full = (0..self.depth)
                    .filter(|b| q.fullatt_block_indexes.contains(b))
                    .count() as f64;
                let windowed = self.depth as f64 - full;
                (3.0, 4.0 * e * (full * frames + windowed * windows))
            }
        };
        let md = e * (self.spatial_merge_size * self.spatial_merge_size) as f64;
        let merged = n / (self.spatial_merge_size * self.spatial_merge_size) as f64;
        let embed = 2.0 * n * self.patch_dim() as f64 * e;
        let block = 2.0 * n * e * (4.0 * e + mlp_mats * self.mlp_hidden_dim() as f64);
        let merger = 2.0 * merged * md * (md + self.hidden_size as f64);
        embed + self.depth as f64 * block + attention + merger
    }
}

/// `config.json` of a Qwen2-VL checkpoint, or of a Qwen2 text checkpoint (then `vision` holds
/// defaults nothing uses).
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VLConfig {
    /// What `architectures` names.
    pub architecture: Architecture,
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    pub vision_token_id: u32,
    pub image_token_id: u32,
    pub video_token_id: u32,
    /// `torch_dtype` as written in the file (e.g. "bfloat16"), if any.
    pub torch_dtype: Option<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(flatten)]
    text: TextConfig,
    #[serde(default)]
    text_config: Option<serde_json::Value>,
    #[serde(default)]
    vision_config: Option<serde_json::Value>,
    #[serde(default = "d_vision_start")]
    vision_start_token_id: u32,
    #[serde(default = "d_vision_end")]
    vision_end_token_id: u32,
    #[serde(default = "d_vision_token")]
    vision_token_id: u32,
    #[serde(default = "d_image_token")]
    image_token_id: u32,
    #[serde(default = "d_video_token")]
    video_token_id: u32,
    #[serde(default)]
    torch_dtype: Option<String>,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default)]
    architectures: Option<Vec<String>>,
    #[serde(default)]
    model_type: Option<String>,
}

impl Qwen2VLConfig {
    /// Parses the text of a `config.json`.
    pub fn from_json_str(s: &str) -> std::result::Result<Self, serde_json::Error> {
        let raw: RawConfig = serde_json::from_str(s)?;
        let mut text = raw.text;
        if let Some(nested) = raw.text_config {
            // Newer layout: text fields live under `text_config`; top-level ones fill gaps.
            let mut merged = serde_json::from_str::<serde_json::Value>(s)?;
            if let (Some(obj), serde_json::Value::Object(inner)) = (merged.as_object_mut(), nested)
            {
                for (k, v) in inner {
                    obj.insert(k, v);
                }
            }
            text = serde_json::from_value(merged)?;
        }
        let architecture =
            Architecture::from_json(raw.architectures.as_deref(), raw.model_type.as_deref())
                .map_err(serde::de::Error::custom)?;
        if architecture == Architecture::Qwen2Moe {
            let moe: MoeConfig = serde_json::from_str(s)?;
            if moe.num_experts_per_tok == 0 || moe.num_experts_per_tok > moe.num_experts {
                return Err(serde::de::Error::custom(format!(
                    "num_experts_per_tok is {} with {} experts; allowed: 1 to num_experts",
                    moe.num_experts_per_tok, moe.num_experts
                )));
            }
            text.moe = Some(moe);
        }
        if !architecture.has_vision() {
            text.rope_1d = true;
            // transformers 4.49 would apply these scalings (yarn, dynamic NTK, linear…) to the
            // rotary frequencies; running without them would give other numbers.
            if let Some(kind) = text.rope_scaling.as_ref().and_then(RopeScaling::kind) {
                if kind != "default" {
                    return Err(serde::de::Error::custom(format!(
                        "rope_scaling type {kind} is not supported for {}; supported: none (null) or \"default\"",
                        architecture.name()
                    )));
                }
            }
        }
        if text.max_position_embeddings < 2 {
            // A context must hold a prompt token and an answer token; 0 would make every
            // "at most context - 1 tokens" message wrap around.
            return Err(serde::de::Error::custom(format!(
                "max_position_embeddings is {}; a context of at least 2 tokens is needed",
                text.max_position_embeddings
            )));
        }
        let vision = match (architecture, raw.vision_config) {
            (Architecture::Qwen25VL, v) => {
                let v = v.unwrap_or_else(|| serde_json::json!({}));
                serde_json::from_value::<Qwen25VisionConfig>(v)?.to_vision()
            }
            (_, Some(v)) => serde_json::from_value(v)?,
            (_, None) => VisionConfig::default(),
        };
        Ok(Qwen2VLConfig {
            architecture,
            text,
            vision,
            vision_start_token_id: raw.vision_start_token_id,
            vision_end_token_id: raw.vision_end_token_id,
            vision_token_id: raw.vision_token_id,
            image_token_id: raw.image_token_id,
            video_token_id: raw.video_token_id,
            torch_dtype: raw.torch_dtype.or(raw.dtype),
        })
    }

    /// How videos' temporal patches become temporal M-RoPE ids: for Qwen2.5-VL, absolute
    /// time from each video's seconds per temporal patch (`second_per_grid_ts`, 1.0 for a
    /// video not listed) and `tokens_per_second`; `None` (one id per temporal patch) for
    /// the other architectures.
    pub fn video_times(&self, second_per_grid_ts: &[f32]) -> Option<crate::rope::VideoTimes> {
        let q = self.vision.qwen25.as_ref()?;
        Some(crate::rope::VideoTimes {
            second_per_grid_ts: second_per_grid_ts.to_vec(),
            tokens_per_second: q.tokens_per_second as f32,
        })
    }

    /// Reads `config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let s = read_text(path, "model config (config.json)")?;
        Self::from_json_str(&s).map_err(|e| Error::Config {
            file: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

fn d_min_pixels() -> u64 {
    56 * 56
}
fn d_max_pixels() -> u64 {
    28 * 28 * 1280
}
fn d_mean() -> [f32; 3] {
    [0.48145466, 0.4578275, 0.40821073]
}
fn d_std() -> [f32; 3] {
    [0.26862954, 0.261_302_6, 0.275_777_1]
}
fn d_rescale() -> f64 {
    1.0 / 255.0
}
fn d_true() -> bool {
    true
}

/// The `size` field of newer preprocessor configs: `{"shortest_edge": min, "longest_edge": max}`
/// (in pixels, despite the names).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct SizeField {
    #[serde(default)]
    pub shortest_edge: Option<u64>,
    #[serde(default)]
    pub longest_edge: Option<u64>,
    #[serde(default)]
    pub min_pixels: Option<u64>,
    #[serde(default)]
    pub max_pixels: Option<u64>,
}

/// `preprocessor_config.json` (mirrors `Qwen2VLImageProcessor`'s constructor arguments).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PreprocessorConfig {
    #[serde(default = "d_min_pixels")]
    pub min_pixels: u64,
    #[serde(default = "d_max_pixels")]
    pub max_pixels: u64,
    #[serde(default)]
    pub size: Option<SizeField>,
    #[serde(default = "d_mean")]
    pub image_mean: [f32; 3],
    #[serde(default = "d_std")]
    pub image_std: [f32; 3],
    #[serde(default = "d_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "d_true")]
    pub do_resize: bool,
    #[serde(default = "d_true")]
    pub do_rescale: bool,
    #[serde(default = "d_true")]
    pub do_normalize: bool,
    #[serde(default = "d_true")]
    pub do_convert_rgb: bool,
    #[serde(default = "d_v_patch")]
    pub patch_size: usize,
    #[serde(default = "d_v_merge")]
    pub merge_size: usize,
    #[serde(default = "d_v_temporal")]
    pub temporal_patch_size: usize,
}

impl Default for PreprocessorConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all preprocessor fields have defaults")
    }
}

impl PreprocessorConfig {
    /// Parses the text of a `preprocessor_config.json`.
    ///
    /// transformers 4.49 reads `min_pixels`/`max_pixels` and rebuilds `size` from them; files
    /// saved by later versions may carry only `size` (`shortest_edge`/`longest_edge`, in
    /// pixels despite the names), which is used when the explicit keys are absent.
    pub fn from_json_str(s: &str) -> std::result::Result<Self, serde_json::Error> {
        let raw: serde_json::Value = serde_json::from_str(s)?;
        let mut c: PreprocessorConfig = serde_json::from_value(raw.clone())?;
        if let Some(size) = &c.size {
            if raw.get("min_pixels").is_none() {
                if let Some(v) = size.min_pixels.or(size.shortest_edge) {
                    c.min_pixels = v;
                }
            }
            if raw.get("max_pixels").is_none() {
                if let Some(v) = size.max_pixels.or(size.longest_edge) {
                    c.max_pixels = v;
                }
            }
        }
        Ok(c)
    }

    /// Reads `preprocessor_config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let s = read_text(path, "preprocessor config (preprocessor_config.json)")?;
        Self::from_json_str(&s).map_err(|e| Error::Config {
            file: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Side length that resized images must be a multiple of (`patch_size * merge_size`, 28).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }
}

/// `eos_token_id` may be one id or a list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![*x],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

fn d_temperature() -> f64 {
    1.0
}
fn d_top_p() -> f64 {
    1.0
}
fn d_rep() -> f64 {
    1.0
}

/// `generation_config.json` (the fields this engine uses, with `GenerationConfig`'s defaults).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GenerationConfig {
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub do_sample: bool,
    #[serde(default = "d_temperature")]
    pub temperature: f64,
    #[serde(default = "d_top_p")]
    pub top_p: f64,
    /// HF's default is 50 when absent.
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default = "d_rep")]
    pub repetition_penalty: f64,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all generation fields have defaults")
    }
}

impl GenerationConfig {
    /// Parses the text of a `generation_config.json`.
    pub fn from_json_str(s: &str) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }

    /// Reads `generation_config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let s = read_text(path, "generation config (generation_config.json)")?;
        Self::from_json_str(&s).map_err(|e| Error::Config {
            file: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

fn read_text(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::Model {
        what: format!("cannot read the {what} ({e})"),
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text shapes that differ between the released sizes.
    struct Size {
        hidden: usize,
        inter: usize,
        layers: usize,
        heads: usize,
        kv: usize,
        vocab: usize,
        tied: bool,
    }

    const B2: Size = Size {
        hidden: 1536,
        inter: 8960,
        layers: 28,
        heads: 12,
        kv: 2,
        vocab: 151936,
        tied: true,
    };
    const B7: Size = Size {
        hidden: 3584,
        inter: 18944,
        layers: 28,
        heads: 28,
        kv: 4,
        vocab: 152064,
        tied: false,
    };
    const B72: Size = Size {
        hidden: 8192,
        inter: 29568,
        layers: 80,
        heads: 64,
        kv: 8,
        vocab: 152064,
        tied: false,
    };

    /// `config.json` of a released checkpoint, as published on the hub.
    fn official(z: &Size) -> String {
        let Size {
            hidden,
            inter,
            layers,
            heads,
            kv,
            vocab,
            tied,
        } = *z;
        format!(
            r#"{{
  "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0,
  "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
  "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
  "video_token_id": 151656, "hidden_act": "silu", "hidden_size": {hidden},
  "initializer_range": 0.02, "intermediate_size": {inter}, "max_position_embeddings": 32768,
  "max_window_layers": {layers}, "model_type": "qwen2_vl", "num_attention_heads": {heads},
  "num_hidden_layers": {layers}, "num_key_value_heads": {kv}, "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": {tied},
  "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": true,
  "use_sliding_window": false,
  "vision_config": {{"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16,
    "in_chans": 3, "hidden_size": {hidden}, "patch_size": 14, "spatial_merge_size": 2,
    "spatial_patch_size": 14, "temporal_patch_size": 2}},
  "rope_scaling": {{"type": "mrope", "mrope_section": [16, 24, 24]}},
  "vocab_size": {vocab}
}}"#
        )
    }

    fn check(z: &Size) {
        let c = Qwen2VLConfig::from_json_str(&official(z)).unwrap();
        let t = &c.text;
        assert_eq!(
            (
                t.hidden_size,
                t.num_hidden_layers,
                t.num_attention_heads,
                t.num_key_value_heads
            ),
            (z.hidden, z.layers, z.heads, z.kv)
        );
        assert_eq!(
            (t.intermediate_size, t.vocab_size, t.tie_word_embeddings),
            (z.inter, z.vocab, z.tied)
        );
        assert_eq!(t.head_dim(), 128);
        assert_eq!(t.mrope_section(), vec![16, 24, 24]);
        assert_eq!(t.mrope_section().iter().sum::<usize>() * 2, t.head_dim());
        let v = &c.vision;
        assert_eq!(
            (v.depth, v.embed_dim, v.num_heads, v.head_dim()),
            (32, 1280, 16, 80)
        );
        assert_eq!(
            (
                v.mlp_hidden_dim(),
                v.patch_size,
                v.spatial_merge_size,
                v.temporal_patch_size
            ),
            (5120, 14, 2, 2)
        );
        assert_eq!(v.hidden_size, z.hidden);
        assert_eq!(v.patch_dim(), 1176);
        assert_eq!(
            (c.image_token_id, c.video_token_id, c.vision_start_token_id),
            (151655, 151656, 151652)
        );
    }

    #[test]
    fn flops_of_the_2b_on_the_standard_workload() {
        let c = Qwen2VLConfig::from_json_str(&official(&B2)).unwrap();
        // photo640.png: 34x46 patches (1564), one frame.
        let v = c.vision.flops(&[[1, 34, 46]]);
        let n = 1564.0;
        let block = 2.0 * n * (3.0 * 1280.0 * 1280.0 + 1280.0 * 1280.0 + 2.0 * 1280.0 * 5120.0)
            + 2.0 * 2.0 * n * n * 1280.0;
        let want =
            2.0 * n * 1176.0 * 1280.0 + 32.0 * block + 2.0 * (n / 4.0) * 5120.0 * (5120.0 + 1536.0);
        assert!((v - want).abs() < 1e-9 * want, "{v} vs {want}");
        assert!((2.3e12..2.5e12).contains(&v), "{v}");
        // Two frames of one video: attention stays within each frame.
        let two = c.vision.flops(&[[2, 34, 46]]);
        assert!((two - 2.0 * v).abs() < 1e-9 * v);
        // 416 prompt tokens: 28 layers of projections, MLP and causal attention, one LM head row.
        let p = c.text.prefill_flops(416, 0);
        let layer = 2.0 * 416.0 * 1536.0 * (2.0 * 1536.0 + 2.0 * 256.0)
            + 2.0 * 416.0 * 3.0 * 1536.0 * 8960.0
            + 4.0 * (416.0 * 417.0 / 2.0) * 1536.0;
        let want = 28.0 * layer + 2.0 * 1536.0 * 151936.0;
        assert!((p - want).abs() < 1e-9 * want, "{p} vs {want}");
        assert!((1.0e12..1.2e12).contains(&p), "{p}");
        // A cached prefix: the suffix attends to it but is not recomputed.
        let rest = c.text.prefill_flops(16, 400);
        assert!(rest < p / 20.0 && rest > c.text.prefill_flops(16, 0));
        assert_eq!(c.text.prefill_flops(0, 10), 0.0);
    }

    /// Qwen2.5-VL-7B-Instruct's `config.json`, as published on the hub.
    const QWEN25_VL_7B: &str = r#"{
  "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
  "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
  "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
  "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584,
  "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
  "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28,
  "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": true,
  "use_sliding_window": false,
  "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280,
    "intermediate_size": 3420, "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584,
    "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
    "temporal_patch_size": 2},
  "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
  "vocab_size": 152064
}"#;

    #[test]
    fn qwen25_vl_config_maps_onto_the_vision_fields() {
        let c = Qwen2VLConfig::from_json_str(QWEN25_VL_7B).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen25VL);
        assert!(c.architecture.has_vision());
        let v = &c.vision;
        // hidden_size is the blocks' width, out_hidden_size the merger's output.
        assert_eq!(
            (v.depth, v.embed_dim, v.hidden_size, v.num_heads),
            (32, 1280, 3584, 16)
        );
        assert_eq!(
            (v.head_dim(), v.mlp_hidden_dim(), v.patch_dim()),
            (80, 3420, 1176)
        );
        let q = v.qwen25.as_ref().expect("Qwen2.5-VL fields");
        assert_eq!(q.fullatt_block_indexes, vec![7, 15, 23, 31]);
        assert_eq!((q.window_size, q.window_merged(v)), (112, 4));
        assert_eq!(q.tokens_per_second, 2.0);
        assert_eq!(c.text.mrope_section(), vec![16, 24, 24]);
        assert!(!c.text.rope_1d);
        let times = c.video_times(&[0.5]).expect("video times");
        assert_eq!(
            (times.tokens_per_second, times.second_per_grid_ts),
            (2.0, vec![0.5])
        );
        // Qwen2-VL has neither.
        let old = Qwen2VLConfig::from_json_str(&official(&B7)).unwrap();
        assert!(old.vision.qwen25.is_none() && old.video_times(&[0.5]).is_none());
        // HF's defaults where the file says nothing (Qwen2_5_VLVisionConfig, 4.49).
        let bare = Qwen2VLConfig::from_json_str(
            r#"{"model_type": "qwen2_5_vl", "vision_config": {"out_hidden_size": 2048}}"#,
        )
        .unwrap();
        let q = bare.vision.qwen25.as_ref().unwrap();
        assert_eq!(
            (bare.vision.embed_dim, bare.vision.hidden_size),
            (3584, 2048)
        );
        assert_eq!((q.intermediate_size, q.tokens_per_second), (3420, 4.0));
        assert_eq!(bare.vision.hidden_act, "silu");
        // Flops: the MLP has three matrices; windowed blocks attend within 8x8-patch windows.
        let f = v.flops(&[[1, 32, 32]]);
        let (n, e, i) = (1024.0, 1280.0, 3420.0);
        let want = 2.0 * n * 1176.0 * e
            + 32.0 * 2.0 * n * e * (4.0 * e + 3.0 * i)
            + 4.0 * e * (4.0 * n * n + 28.0 * 16.0 * 64.0 * 64.0)
            + 2.0 * (n / 4.0) * 4.0 * e * (4.0 * e + 3584.0);
        assert!((f - want).abs() < 1e-9 * want, "{f} vs {want}");
    }

    #[test]
    fn official_shapes_2b_7b_72b() {
        check(&B2);
        check(&B7);
        check(&B72);
    }

    #[test]
    fn nested_text_config_is_read() {
        let s = r#"{"text_config": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
            "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
            "rope_scaling": {"rope_type": "default", "type": "default", "mrope_section": [16, 24, 24]}},
            "vision_config": {"hidden_size": 1536}, "tie_word_embeddings": true}"#;
        let c = Qwen2VLConfig::from_json_str(s).unwrap();
        assert_eq!(c.text.hidden_size, 1536);
        assert_eq!(c.text.num_hidden_layers, 28);
        assert!(c.text.tie_word_embeddings);
        assert_eq!(c.text.mrope_section(), vec![16, 24, 24]);
    }

    #[test]
    fn malformed_config_names_the_file() {
        let dir = std::env::temp_dir().join(format!("qwen2vl-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("config.json");
        std::fs::write(&p, "{\"hidden_size\": \"big\"}").unwrap();
        let e = Qwen2VLConfig::from_file(&p).unwrap_err();
        assert!(matches!(e, Error::Config { .. }), "{e}");
        assert!(e.to_string().contains("config.json"), "{e}");
        let e = Qwen2VLConfig::from_json_str(r#"{"max_position_embeddings": 0}"#).unwrap_err();
        assert!(
            e.to_string().contains("max_position_embeddings is 0"),
            "{e}"
        );
        let e = Qwen2VLConfig::from_file(&dir.join("missing.json")).unwrap_err();
        assert!(e.to_string().contains("missing.json"), "{e}");
    }

    #[test]
    fn preprocessor_and_generation_defaults() {
        let p = PreprocessorConfig::from_json_str(
            r#"{"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}"#,
        )
        .unwrap();
        assert_eq!(
            (p.min_pixels, p.max_pixels, p.factor()),
            (3136, 12845056, 28)
        );
        let p = PreprocessorConfig::from_json_str(
            r#"{"size": {"shortest_edge": 100, "longest_edge": 2000}}"#,
        )
        .unwrap();
        assert_eq!((p.min_pixels, p.max_pixels), (100, 2000));
        // Explicit keys win over `size`, as in transformers 4.49.
        let p = PreprocessorConfig::from_json_str(
            r#"{"min_pixels": 3136, "max_pixels": 12845056, "size": {"shortest_edge": 100, "longest_edge": 2000}}"#,
        )
        .unwrap();
        assert_eq!((p.min_pixels, p.max_pixels), (3136, 12845056));
        let g = GenerationConfig::from_json_str(
            r#"{"bos_token_id": 151643, "do_sample": true, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                "repetition_penalty": 1.05, "temperature": 0.1, "top_k": 1, "top_p": 0.001}"#,
        )
        .unwrap();
        assert_eq!(g.eos_token_id.unwrap().to_vec(), vec![151645, 151643]);
        assert_eq!((g.top_k, g.repetition_penalty), (Some(1), 1.05));
        assert_eq!(GenerationConfig::default().temperature, 1.0);
    }
}

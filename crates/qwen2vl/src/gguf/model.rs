//! A Qwen2-VL checkpoint in llama.cpp's GGUF files: the text model (`general.architecture =
//! "qwen2vl"`) and, optionally, the vision projector (`mmproj`, `general.architecture =
//! "clip"`, `clip.projector_type = "qwen2vl_merger"`; Qwen2.5-VL's: `"qwen2.5vl_merger"`, with
//! `clip.vision.n_wa_pattern` for its full-attention blocks, see [`PROJECTOR_QWEN25`]), as
//! `convert_hf_to_gguf.py` writes them
//! (and `llama-quantize` requantizes them). A Qwen2 text model (`general.architecture =
//! "qwen2"`, the converter's name for `Qwen2ForCausalLM`) loads the same way: the same keys
//! under `qwen2.*` without `rope.dimension_sections` (1-D RoPE), the same tensor names, and
//! no projector. So does a Qwen2 mixture of experts (`"qwen2moe"`, `Qwen2MoeForCausalLM`),
//! with `qwen2moe.expert_count`, `expert_used_count`, `expert_feed_forward_length` and
//! `expert_shared_feed_forward_length` (see `moe_config` for the defaults and which layers are
//! sparse) and the expert tensors below.
//!
//! [`GgufModel`] reads everything the engine needs out of the two files: the config
//! ([`GgufModel::config`], from the `qwen2vl.*` and `clip.vision.*` keys), the tokenizer
//! ([`GgufModel::tokenizer_json`]: a `tokenizer.json` rebuilt from `tokenizer.ggml.*`), the
//! chat template, the image normalisation and the sampling defaults; and it maps every
//! tensor name the model asks for (the Hugging Face names, as [`crate::weights::Weights`]
//! serves them) to the GGUF tensors that hold it ([`GgufModel::locate`]):
//!
//! | Hugging Face name | GGUF |
//! |---|---|
//! | `model.embed_tokens.weight` | `token_embd.weight` |
//! | `model.layers.N.input_layernorm` / `post_attention_layernorm` | `blk.N.attn_norm` / `ffn_norm` |
//! | `model.layers.N.self_attn.{q,k,v}_proj` | `blk.N.attn_{q,k,v}`, or rows of a fused `blk.N.attn_qkv` |
//! | `model.layers.N.self_attn.o_proj` | `blk.N.attn_output` |
//! | `model.layers.N.mlp.{gate,up,down}_proj` | `blk.N.ffn_{gate,up,down}` |
//! | `model.layers.N.mlp.gate` (MoE router) | `blk.N.ffn_gate_inp` |
//! | `model.layers.N.mlp.experts.K.{gate,up,down}_proj` | matrix K of `blk.N.ffn_{gate,up,down}_exps` (`ne = [in, out, experts]`: rows `K·out..(K+1)·out`) |
//! | `model.layers.N.mlp.shared_expert.{gate,up,down}_proj` | `blk.N.ffn_{gate,up,down}_shexp` |
//! | `model.layers.N.mlp.shared_expert_gate` `(1, hidden)` | `blk.N.ffn_gate_inp_shexp` (`[hidden, 1]`, or `[hidden]`) |
//! | `model.norm` / `lm_head` | `output_norm` / `output` (absent when tied) |
//! | `visual.patch_embed.proj.weight` `(embed, 3, 2, p, p)` | `v.patch_embd.weight` (frame 0) and `v.patch_embd.weight.1` (frame 1), each `(embed, 3, p, p)` |
//! | `visual.blocks.N.norm1` / `norm2` | `v.blk.N.ln1` / `ln2` |
//! | `visual.blocks.N.attn.qkv` | `v.blk.N.attn_q`, `attn_k`, `attn_v` stacked as rows |
//! | `visual.blocks.N.attn.proj` | `v.blk.N.attn_out` |
//! | `visual.blocks.N.mlp.fc1` / `fc2` | `v.blk.N.ffn_up` / `ffn_down` |
//! | `visual.blocks.N.mlp.{gate,up,down}_proj` (Qwen2.5-VL) | `v.blk.N.ffn_{gate,up,down}` |
//! | `visual.merger.ln_q` / `mlp.0` / `mlp.2` | `v.post_ln` / `mm.0` / `mm.2` |
//!
//! A GGUF matrix with `ne = [in, out]` has the bytes of the row-major `(out, in)` PyTorch
//! matrix, so nothing is transposed; row slices and row stacks are byte ranges.
//!
//! Tensor types: f32, f16 and bf16 are converted to the compute dtype; q8_0, q4_K and q6_K
//! stay quantized ([`crate::ops::quant::QMatrix`], read as they are); q5_K (most of a
//! q5_k_m file; no kernel here) is widened and requantized to q8_0 as it loads; q4_0, q4_1,
//! q5_0 and q5_1 (which `llama-quantize` uses as fallbacks for rows that are not a multiple
//! of 256) are widened to float at load, since they are rare and small. Any other type is
//! refused when the file is opened, naming the tensor and its type.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use serde_json::{json, Value as Json};

use super::{GgmlType, GgufFile, TensorInfo};
use crate::config::{
    GenerationConfig, OneOrMany, PreprocessorConfig, Qwen2VLConfig, RopeScaling, TextConfig,
    VisionConfig,
};
use crate::error::{Error, Result};
use crate::ops::quant::QType;

/// The text model's architecture name.
pub const TEXT_ARCH: &str = "qwen2vl";
/// The architecture name of a Qwen2 text model (`Qwen2ForCausalLM`).
pub const QWEN2_ARCH: &str = "qwen2";
/// The architecture name of a Qwen2 mixture-of-experts model (`Qwen2MoeForCausalLM`).
pub const QWEN2MOE_ARCH: &str = "qwen2moe";
/// The projector type of Qwen2-VL's vision mmproj.
pub const PROJECTOR: &str = "qwen2vl_merger";
/// The projector type of Qwen2.5-VL's vision mmproj (its text model is a `qwen2vl` too).
pub const PROJECTOR_QWEN25: &str = "qwen2.5vl_merger";
/// Qwen2.5-VL's window side in pixels when the mmproj has no `clip.vision.window_size` (the
/// converter writes none; every released Qwen2.5-VL has 112, llama.cpp's default too).
pub const QWEN25_WINDOW_SIZE: usize = 112;
/// Qwen2.5-VL's temporal ids per second of video, which the mmproj does not record: 2 in
/// every released Qwen2.5-VL (3B, 7B, 32B, 72B; transformers' default of 4 is in none).
pub const QWEN25_TOKENS_PER_SECOND: f64 = 2.0;

/// Which of the two files a tensor is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// The text model.
    Text,
    /// The vision projector.
    Vision,
}

/// Where a Hugging Face tensor's data lives in the GGUF files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// One tensor, as it is.
    One(Part, String),
    /// Several tensors stacked along the first (row) dimension (a vision `qkv`).
    Rows(Part, Vec<String>),
    /// A range of rows of one tensor (q, k or v of a fused `attn_qkv`; one expert's matrix of
    /// a stacked `ffn_*_exps`). Rows count in the tensor seen as `(elements / ne[0], ne[0])`
    /// (a 1-D tensor's rows are its elements).
    RowSlice(Part, String, Range<usize>),
    /// The two temporal frames of the patch kernel, stacked at dimension 2.
    Frames(Part, String, String),
}

impl Source {
    /// The part and the GGUF tensor names it reads.
    pub fn tensors(&self) -> (Part, Vec<&str>) {
        match self {
            Source::One(p, n) | Source::RowSlice(p, n, _) => (*p, vec![n.as_str()]),
            Source::Rows(p, v) => (*p, v.iter().map(String::as_str).collect()),
            Source::Frames(p, a, b) => (*p, vec![a.as_str(), b.as_str()]),
        }
    }
}

/// The GGUF files of one Qwen2-VL model.
pub struct GgufModel {
    text: GgufFile,
    vision: Option<GgufFile>,
    config: Qwen2VLConfig,
    /// Hugging Face name → where it lives.
    index: HashMap<String, Source>,
}

impl std::fmt::Debug for GgufModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufModel")
            .field("text", &self.text)
            .field("vision", &self.vision)
            .finish()
    }
}

/// The type a GGUF tensor is kept in as [`crate::ops::quant::QMatrix`], if it is one.
pub fn qtype_of(t: GgmlType) -> Option<QType> {
    match t {
        GgmlType::Q8_0 => Some(QType::Q8_0),
        GgmlType::Q4_K => Some(QType::Q4K),
        GgmlType::Q6_K => Some(QType::Q6K),
        _ => None,
    }
}

/// Whether tensors of type `t` can be loaded (as float, quantized, or widened to float).
pub fn is_supported(t: GgmlType) -> bool {
    matches!(
        t,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q5_K
    ) || qtype_of(t).is_some()
}

/// The kernel format a stored type with no kernel of its own is requantized to at load:
/// q5_K (the bulk of a q5_k_m file) → q8_0, whose 8-bit grid adds about an eighth of q5_K's
/// own rounding error, at 8.5 bits a weight instead of f32's 32.
pub fn requantized_to(t: GgmlType) -> Option<QType> {
    match t {
        GgmlType::Q5_K => Some(QType::Q8_0),
        _ => None,
    }
}

/// The supported types, for messages.
pub const SUPPORTED_TYPES: &str = "f32, f16, bf16 (converted to the compute dtype), q8_0, q4_K, q6_K (kept quantized), q5_K (requantized to q8_0 at load), q4_0, q4_1, q5_0, q5_1 (widened to float at load)";

fn err(file: &GgufFile, m: impl std::fmt::Display) -> Error {
    Error::Weights(format!("GGUF file {}: {m}", file.origin()))
}

fn u(file: &GgufFile, key: &str) -> Result<usize> {
    Ok(file.get_u32(key)? as usize)
}

impl GgufModel {
    /// Opens the text model at `text` and the vision projector at `mmproj` (if any), checks
    /// their architectures, keys and tensor types, and derives the config.
    pub fn open(text: &Path, mmproj: Option<&Path>) -> Result<GgufModel> {
        let text = GgufFile::open(text)?;
        let vision = mmproj.map(GgufFile::open).transpose()?;
        Self::from_files(text, vision)
    }

    /// [`GgufModel::open`] for files already read.
    pub fn from_files(text: GgufFile, vision: Option<GgufFile>) -> Result<GgufModel> {
        let arch = text.get_str("general.architecture")?;
        if arch == "clip" {
            return Err(err(
                &text,
                "this is a vision projector (general.architecture is 'clip'); pass it with --mmproj and the text model with --model",
            ));
        }
        if arch != TEXT_ARCH && arch != QWEN2_ARCH && arch != QWEN2MOE_ARCH {
            return Err(err(
                &text,
                format!("general.architecture is '{arch}'; allowed: {TEXT_ARCH} (Qwen2-VL), {QWEN2_ARCH} (Qwen2 text) or {QWEN2MOE_ARCH} (Qwen2 MoE text)"),
            ));
        }
        if arch != TEXT_ARCH {
            if let Some(v) = &vision {
                return Err(err(
                    v,
                    format!("the text model is a {arch} (text-only) model, which has no vision tower; --mmproj goes with a {TEXT_ARCH} model"),
                ));
            }
        }
        if let Some(v) = &vision {
            let arch = v.get_str("general.architecture")?;
            if arch != "clip" {
                return Err(err(
                    v,
                    format!("general.architecture is '{arch}'; allowed: clip (a vision projector, mmproj)"),
                ));
            }
            let proj = v.get_str("clip.projector_type")?;
            if proj != PROJECTOR && proj != PROJECTOR_QWEN25 {
                return Err(err(
                    v,
                    format!("clip.projector_type is '{proj}'; allowed: {PROJECTOR} (Qwen2-VL) or {PROJECTOR_QWEN25} (Qwen2.5-VL)"),
                ));
            }
            if v.get_bool_opt("clip.has_vision_encoder")? == Some(false) {
                return Err(err(v, "clip.has_vision_encoder is false"));
            }
            // Qwen2.5-VL's SwiGLU MLP is what the converter marks with use_silu.
            if proj == PROJECTOR && v.get_bool_opt("clip.use_silu")? == Some(true) {
                return Err(err(
                    v,
                    "clip.use_silu is true; allowed: quick_gelu or gelu vision MLPs",
                ));
            }
        }
        for f in std::iter::once(&text).chain(vision.as_ref()) {
            for t in f.tensors() {
                if !is_supported(t.ggml_type()) {
                    return Err(err(
                        f,
                        format!(
                            "tensor '{}' has type {}, which qwen2vl cannot run; supported: {SUPPORTED_TYPES}",
                            t.name(),
                            t.ggml_type()
                        ),
                    ));
                }
            }
        }
        let config = build_config(&text, vision.as_ref())?;
        let index = build_index(&config, &text, vision.is_some());
        Ok(GgufModel {
            text,
            vision,
            config,
            index,
        })
    }

    /// The file of `part` (`None` for the vision part of a text-only model).
    pub fn file(&self, part: Part) -> Option<&GgufFile> {
        match part {
            Part::Text => Some(&self.text),
            Part::Vision => self.vision.as_ref(),
        }
    }

    /// Where the text model's file came from (its path), as messages name it.
    pub fn text_origin(&self) -> &str {
        self.text.origin()
    }

    /// Whether the vision projector was given.
    pub fn has_vision(&self) -> bool {
        self.vision.is_some()
    }

    /// The config derived from the metadata.
    pub fn config(&self) -> &Qwen2VLConfig {
        &self.config
    }

    /// Where the Hugging Face tensor `name` lives, if the files hold it.
    pub fn locate(&self, name: &str) -> Option<&Source> {
        let s = self.index.get(name)?;
        let (part, names) = s.tensors();
        let f = self.file(part)?;
        names.iter().all(|n| f.tensor(n).is_some()).then_some(s)
    }

    /// Every Hugging Face tensor the files hold, with where it lives (in no set order).
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Source)> {
        self.index
            .keys()
            .filter_map(|name| self.locate(name).map(|s| (name.as_str(), s)))
    }

    /// Where the Hugging Face tensor `name` would live (whether or not the files hold it).
    pub fn index_entry(&self, name: &str) -> Option<&Source> {
        self.index.get(name)
    }

    /// Every tensor of both files, with its part.
    pub fn tensors(&self) -> impl Iterator<Item = (Part, &TensorInfo)> {
        self.text.tensors().iter().map(|t| (Part::Text, t)).chain(
            self.vision
                .iter()
                .flat_map(|v| v.tensors().iter().map(|t| (Part::Vision, t))),
        )
    }

    /// The first tensor stored in a quantized type, in `part` or (`None`) in either file, if
    /// any (`--quant` / `--vision-quant` are refused then).
    pub fn first_quantized(&self, part: Option<Part>) -> Option<(&str, GgmlType)> {
        self.tensors()
            .filter(|(p, _)| part.is_none_or(|want| *p == want))
            .map(|(_, t)| t)
            .find(|t| {
                !matches!(
                    t.ggml_type(),
                    GgmlType::F32 | GgmlType::F16 | GgmlType::BF16
                )
            })
            .map(|t| (t.name(), t.ggml_type()))
    }

    /// A `tokenizer.json` equivalent to the one the GGUF was converted from: the BPE
    /// vocabulary (`tokenizer.ggml.tokens` of type normal), the merges, the added tokens
    /// (types control and user-defined; control ones are `special`), and Qwen2's normalizer
    /// (NFC), pre-tokenizer (its split regex, then byte-level) and decoder.
    pub fn tokenizer_json(&self) -> Result<String> {
        let f = &self.text;
        let model = f.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(err(
                f,
                format!("tokenizer.ggml.model is '{model}'; allowed: gpt2 (byte-level BPE)"),
            ));
        }
        if let Some(pre) = f.get_str_opt("tokenizer.ggml.pre")? {
            if pre != "qwen2" {
                return Err(err(
                    f,
                    format!("tokenizer.ggml.pre is '{pre}'; allowed: qwen2"),
                ));
            }
        }
        let tokens = f.get_str_array("tokenizer.ggml.tokens")?;
        let types = f.get_i32_array_opt("tokenizer.ggml.token_type")?;
        if let Some(t) = types {
            if t.len() != tokens.len() {
                return Err(err(
                    f,
                    format!(
                        "tokenizer.ggml.token_type has {} entries for {} tokens",
                        t.len(),
                        tokens.len()
                    ),
                ));
            }
        }
        let merges = f.get_str_array("tokenizer.ggml.merges")?;
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, tok) in tokens.iter().enumerate() {
            // 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
            match types.map_or(1, |t| t[id]) {
                3 | 4 => added.push(json!({
                    "id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false,
                    "special": types.map_or(1, |t| t[id]) == 3,
                })),
                5 => {}
                _ => {
                    vocab.insert(tok.clone(), json!(id));
                }
            }
        }
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
        let tj = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PRE_REGEX}, "behavior": "Isolated", "invert": false},
                byte_level.clone(),
            ]},
            "post_processor": byte_level.clone(),
            "decoder": byte_level,
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
                "byte_fallback": false, "vocab": vocab, "merges": merges,
            },
        });
        serde_json::to_string(&tj).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Frees the vocabulary arrays of the text file's metadata (`tokenizer.ggml.tokens`,
    /// `.merges`, `.token_type`: ~22 MiB of strings for Qwen2's 151 646 tokens) once the
    /// tokenizer and the chat template's special tokens were built from them
    /// ([`crate::processing::processor::Processor::from_gguf`]); the loaders call it before
    /// handing the files to the model, which only reads tensors and the config from then on.
    /// Building a tokenizer from the files afterwards fails (an empty vocabulary).
    pub fn release_vocabulary(&mut self) {
        self.text.release_arrays(&[
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.token_type",
        ]);
    }

    /// The chat template (`tokenizer.chat_template`), if the file has one.
    pub fn chat_template(&self) -> Result<Option<&str>> {
        self.text.get_str_opt("tokenizer.chat_template")
    }

    /// The template's special-token strings (`bos_token`, `eos_token`, `pad_token`) from the
    /// ids in `tokenizer.ggml.*_token_id`.
    pub fn special_tokens(&self) -> Result<serde_json::Map<String, Json>> {
        let f = &self.text;
        let tokens = f.get_str_array("tokenizer.ggml.tokens")?;
        let mut m = serde_json::Map::new();
        for (key, name) in [
            ("tokenizer.ggml.bos_token_id", "bos_token"),
            ("tokenizer.ggml.eos_token_id", "eos_token"),
            ("tokenizer.ggml.padding_token_id", "pad_token"),
        ] {
            if let Some(id) = f.get_u32_opt(key)? {
                if let Some(t) = tokens.get(id as usize) {
                    m.insert(name.into(), json!(t));
                }
            }
        }
        Ok(m)
    }

    /// Image preprocessing: Qwen2-VL's defaults (min/max pixels, patch 14, merge 2, temporal
    /// 2) with the mean and std of `clip.vision.image_mean` / `image_std` and the patch size
    /// of the projector.
    pub fn preprocessor(&self) -> Result<PreprocessorConfig> {
        let mut p = PreprocessorConfig::default();
        if let Some(v) = &self.vision {
            for (key, slot) in [
                ("clip.vision.image_mean", &mut p.image_mean),
                ("clip.vision.image_std", &mut p.image_std),
            ] {
                if let Some(a) = v.get_f32_array_opt(key)? {
                    *slot = a
                        .try_into()
                        .map_err(|_| err(v, format!("{key} has {} values; expected 3", a.len())))?;
                }
            }
            p.patch_size = self.config.vision.patch_size;
            p.merge_size = self.config.vision.spatial_merge_size;
            p.temporal_patch_size = self.config.vision.temporal_patch_size;
        }
        Ok(p)
    }

    /// Sampling defaults from `general.sampling.*` (written by the converter from
    /// `generation_config.json`) and the token ids of `tokenizer.ggml.*`.
    pub fn generation(&self) -> Result<GenerationConfig> {
        let f = &self.text;
        let mut g = GenerationConfig {
            bos_token_id: f.get_u32_opt("tokenizer.ggml.bos_token_id")?,
            eos_token_id: f
                .get_u32_opt("tokenizer.ggml.eos_token_id")?
                .map(OneOrMany::One),
            pad_token_id: f.get_u32_opt("tokenizer.ggml.padding_token_id")?,
            ..GenerationConfig::default()
        };
        let temp = f.get_f32_opt("general.sampling.temp")?;
        let top_k = f.get_i32_opt("general.sampling.top_k")?;
        let top_p = f.get_f32_opt("general.sampling.top_p")?;
        if let Some(t) = temp {
            g.temperature = widen(t);
            g.do_sample = t > 0.0;
        }
        if let Some(k) = top_k {
            g.top_k = usize::try_from(k).ok();
        }
        if let Some(p) = top_p {
            g.top_p = widen(p);
        }
        if let Some(r) = f.get_f32_opt("general.sampling.penalty_repeat")? {
            g.repetition_penalty = widen(r);
        }
        Ok(g)
    }
}

/// Qwen2's pre-tokenizer split (its `tokenizer.json`; llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
const QWEN2_PRE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// An f32 key as the f64 it was written from (the shortest decimal that reads back as the
/// same f32: 1e-6 stays 1e-6, not 9.99999997e-7).
fn widen(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

fn build_config(text: &GgufFile, vision: Option<&GgufFile>) -> Result<Qwen2VLConfig> {
    let arch = text.get_str("general.architecture")?;
    let text_only = arch != TEXT_ARCH;
    let a = |k: &str| format!("{arch}.{k}");
    let hidden = u(text, &a("embedding_length"))?;
    let heads = u(text, &a("attention.head_count"))?;
    let kv = u(text, &a("attention.head_count_kv"))?;
    let tokens = text.get_str_array("tokenizer.ggml.tokens")?;
    let embd = text.tensor_info("token_embd.weight")?;
    let vocab = tokens.len();
    if embd.shape() != [vocab, hidden] {
        return Err(err(
            text,
            format!(
                "token_embd.weight has shape {:?}; expected [{vocab}, {hidden}] ({vocab} tokens, embedding_length {hidden})",
                embd.shape()
            ),
        ));
    }
    // A qwen2 model has no sections (1-D RoPE, see `TextConfig::rope_1d`).
    let sections: &[i32] = if text_only {
        &[0, 0, 0]
    } else {
        text.get_i32_array(&a("rope.dimension_sections"))?
    };
    if sections.len() < 3 || sections[..3].iter().any(|&s| s < 0) {
        return Err(err(
            text,
            format!(
                "{} is {sections:?}; expected at least 3 non-negative sections",
                a("rope.dimension_sections")
            ),
        ));
    }
    let id = |s: &str| -> Result<u32> {
        tokens
            .iter()
            .position(|t| t == s)
            .map(|i| i as u32)
            .ok_or_else(|| {
                err(
                    text,
                    format!("the vocabulary has no {s} token; this is not a Qwen2-VL tokenizer"),
                )
            })
    };
    // The strings of processing::tokenizer's constants (gguf sits below processing).
    const VISION_START: &str = "<|vision_start|>";
    const VISION_END: &str = "<|vision_end|>";
    const IMAGE_PAD: &str = "<|image_pad|>";
    const VIDEO_PAD: &str = "<|video_pad|>";
    let t = TextConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: u(text, &a("feed_forward_length"))?,
        num_hidden_layers: u(text, &a("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        hidden_act: "silu".into(),
        max_position_embeddings: u(text, &a("context_length"))?,
        rms_norm_eps: widen(text.get_f32(&a("attention.layer_norm_rms_epsilon"))?),
        rope_theta: widen(text.get_f32(&a("rope.freq_base"))?),
        rope_scaling: (!text_only).then(|| RopeScaling {
            kind: Some("mrope".into()),
            rope_type: None,
            mrope_section: sections[..3].iter().map(|&s| s as usize).collect(),
        }),
        tie_word_embeddings: text.tensor("output.weight").is_none(),
        // `{arch}.attention.sliding_window`: written by `qwen2vl quantize` for a model whose
        // window hides keys within its context (the converter writes none for these
        // architectures); applied in every layer as transformers does.
        use_sliding_window: text.contains_key(&a("attention.sliding_window")),
        sliding_window: text
            .get_u32_opt(&a("attention.sliding_window"))?
            .map(|w| w as usize),
        max_window_layers: None,
        rope_1d: text_only,
        moe: if arch == QWEN2MOE_ARCH {
            Some(moe_config(text, arch)?)
        } else {
            None
        },
        bos_token_id: text.get_u32_opt("tokenizer.ggml.bos_token_id")?,
        eos_token_id: text.get_u32_opt("tokenizer.ggml.eos_token_id")?,
    };
    if heads == 0 || kv == 0 || !hidden.is_multiple_of(heads) || t.max_position_embeddings < 2 {
        return Err(err(
            text,
            format!(
                "embedding_length {hidden}, head_count {heads}, head_count_kv {kv}, context_length {}: not a valid Qwen2 decoder",
                t.max_position_embeddings
            ),
        ));
    }
    let vision = match vision {
        None => VisionConfig {
            hidden_size: hidden,
            ..VisionConfig::default()
        },
        Some(v) => {
            let qwen25 = v.get_str("clip.projector_type")? == PROJECTOR_QWEN25;
            let embed = u(v, "clip.vision.embedding_length")?;
            let up = v.tensor_info("v.blk.0.ffn_up.weight")?;
            // clip.vision.feed_forward_length is the text width for Qwen2-VL (a converter
            // quirk); the MLP width is the first block's fc1 rows.
            let mlp = up.shape()[0];
            let patch = v.tensor_info("v.patch_embd.weight")?;
            let chans = patch.shape().get(1).copied().unwrap_or(3);
            let cfg = VisionConfig {
                depth: u(v, "clip.vision.block_count")?,
                embed_dim: embed,
                hidden_size: u(v, "clip.vision.projection_dim")?,
                hidden_act: if qwen25 {
                    "silu".into()
                } else if v.get_bool_opt("clip.use_gelu")? == Some(true) {
                    "gelu".into()
                } else {
                    "quick_gelu".into()
                },
                mlp_ratio: mlp as f64 / embed.max(1) as f64,
                num_heads: u(v, "clip.vision.attention.head_count")?,
                in_chans: chans,
                patch_size: u(v, "clip.vision.patch_size")?,
                spatial_merge_size: match v.get_u32_opt("clip.vision.spatial_merge_size")? {
                    Some(m) => m as usize,
                    None => 2,
                },
                temporal_patch_size: 2,
                qwen25: if qwen25 {
                    Some(qwen25_fields(v, mlp)?)
                } else {
                    None
                },
            };
            if cfg.num_heads == 0
                || !cfg.embed_dim.is_multiple_of(cfg.num_heads)
                || cfg.mlp_hidden_dim() != mlp
                || cfg.spatial_merge_size == 0
            {
                return Err(err(
                    v,
                    format!(
                        "embedding_length {embed}, head_count {}, MLP width {mlp}, merge {}: not a valid Qwen2-VL vision tower",
                        cfg.num_heads, cfg.spatial_merge_size
                    ),
                ));
            }
            if cfg.hidden_size != hidden {
                return Err(err(
                    v,
                    format!(
                        "clip.vision.projection_dim is {} but the text model's embedding_length is {hidden}: this projector belongs to another model",
                        cfg.hidden_size
                    ),
                ));
            }
            cfg
        }
    };
    if text_only {
        // Qwen2's vocabulary may lack the vision tokens (Qwen2.5's has them); a text model
        // never uses them, so Qwen2-VL's ids stand in (as config.json's defaults do).
        let dflt = |s: &str, d: u32| id(s).unwrap_or(d);
        return Ok(Qwen2VLConfig {
            architecture: if t.moe.is_some() {
                crate::config::Architecture::Qwen2Moe
            } else {
                crate::config::Architecture::Qwen2
            },
            text: t,
            vision,
            vision_start_token_id: dflt(VISION_START, 151652),
            vision_end_token_id: dflt(VISION_END, 151653),
            vision_token_id: dflt("<|vision_pad|>", 151654),
            image_token_id: dflt(IMAGE_PAD, 151655),
            video_token_id: dflt(VIDEO_PAD, 151656),
            torch_dtype: None,
        });
    }
    Ok(Qwen2VLConfig {
        architecture: if vision.qwen25.is_some() {
            crate::config::Architecture::Qwen25VL
        } else {
            crate::config::Architecture::Qwen2VL
        },
        text: t,
        vision,
        vision_start_token_id: id(VISION_START)?,
        vision_end_token_id: id(VISION_END)?,
        vision_token_id: id("<|vision_pad|>").unwrap_or(151654),
        image_token_id: id(IMAGE_PAD)?,
        video_token_id: id(VIDEO_PAD)?,
        torch_dtype: None,
    })
}

/// The mixture-of-experts fields of a `qwen2moe` file: `expert_count`, `expert_used_count`,
/// `expert_feed_forward_length` and `expert_shared_feed_forward_length` (llama.cpp's
/// defaults when absent: `feed_forward_length / expert_used_count` and
/// `feed_forward_length`), `expert_weights_norm` (absent: false, as llama.cpp's qwen2moe
/// graph never renormalises). Every layer with a router (`blk.N.ffn_gate_inp`) is sparse;
/// the others (llama.cpp's files have none; ours keep `mlp_only_layers`) are dense.
fn moe_config(text: &GgufFile, arch: &str) -> Result<crate::config::MoeConfig> {
    let a = |k: &str| format!("{arch}.{k}");
    let experts = u(text, &a("expert_count"))?;
    let used = u(text, &a("expert_used_count"))?;
    let ff = u(text, &a("feed_forward_length"))?;
    if experts == 0 || used == 0 || used > experts {
        return Err(err(
            text,
            format!(
                "expert_count {experts}, expert_used_count {used}: not a valid mixture of experts"
            ),
        ));
    }
    if let Some(g) = text.get_u32_opt(&a("expert_gating_func"))? {
        if g != 1 {
            return Err(err(
                text,
                format!(
                    "{} is {g}; allowed: 1 (softmax, Qwen2-MoE's router)",
                    a("expert_gating_func")
                ),
            ));
        }
    }
    let opt =
        |k: &str| -> Result<Option<usize>> { Ok(text.get_u32_opt(&a(k))?.map(|v| v as usize)) };
    let layers = u(text, &a("block_count"))?;
    Ok(crate::config::MoeConfig {
        decoder_sparse_step: 1,
        moe_intermediate_size: opt("expert_feed_forward_length")?.unwrap_or(ff / used),
        shared_expert_intermediate_size: opt("expert_shared_feed_forward_length")?.unwrap_or(ff),
        num_experts_per_tok: used,
        num_experts: experts,
        norm_topk_prob: text
            .get_bool_opt(&a("expert_weights_norm"))?
            .unwrap_or(false),
        mlp_only_layers: (0..layers)
            .filter(|i| {
                text.tensor(&format!("blk.{i}.ffn_gate_inp.weight"))
                    .is_none()
            })
            .collect(),
    })
}

/// What a `qwen2.5vl_merger` mmproj says about its tower beyond Qwen2-VL's: the MLP width
/// `mlp`, the window side (`clip.vision.window_size`, else [`QWEN25_WINDOW_SIZE`]) and the
/// full-attention blocks. The converter writes `fullatt_block_indexes` as
/// `clip.vision.n_wa_pattern` = first index + 1 (refusing any list that is not every
/// pattern-th block), and llama.cpp attends over whole frames in block `i` when
/// `(i + 1) % n_wa_pattern == 0`; no key (or 0): every block full.
fn qwen25_fields(v: &GgufFile, mlp: usize) -> Result<crate::config::Qwen25Vision> {
    let depth = u(v, "clip.vision.block_count")?;
    let pattern = v.get_u32_opt("clip.vision.n_wa_pattern")?.unwrap_or(0) as usize;
    let fullatt_block_indexes = (0..depth)
        .filter(|i| pattern == 0 || (i + 1).is_multiple_of(pattern))
        .collect();
    Ok(crate::config::Qwen25Vision {
        intermediate_size: mlp,
        window_size: v
            .get_u32_opt("clip.vision.window_size")?
            .map_or(QWEN25_WINDOW_SIZE, |w| w as usize),
        fullatt_block_indexes,
        tokens_per_second: QWEN25_TOKENS_PER_SECOND,
    })
}

fn build_index(cfg: &Qwen2VLConfig, text: &GgufFile, vision: bool) -> HashMap<String, Source> {
    use Part::{Text, Vision};
    let mut m = HashMap::new();
    let one = |p: Part, s: String| Source::One(p, s);
    m.insert(
        "model.embed_tokens.weight".into(),
        one(Text, "token_embd.weight".into()),
    );
    m.insert("lm_head.weight".into(), one(Text, "output.weight".into()));
    m.insert(
        "model.norm.weight".into(),
        one(Text, "output_norm.weight".into()),
    );
    let t = &cfg.text;
    let (q_rows, kv_rows) = (
        t.num_attention_heads * t.head_dim(),
        t.num_key_value_heads * t.head_dim(),
    );
    for i in 0..t.num_hidden_layers {
        let hf = format!("model.layers.{i}");
        let g = format!("blk.{i}");
        m.insert(
            format!("{hf}.input_layernorm.weight"),
            one(Text, format!("{g}.attn_norm.weight")),
        );
        m.insert(
            format!("{hf}.post_attention_layernorm.weight"),
            one(Text, format!("{g}.ffn_norm.weight")),
        );
        for suffix in ["weight", "bias"] {
            let fused = format!("{g}.attn_qkv.{suffix}");
            let has_fused = text.tensor(&fused).is_some()
                && text.tensor(&format!("{g}.attn_q.{suffix}")).is_none();
            for (p, r) in [
                ("q", 0..q_rows),
                ("k", q_rows..q_rows + kv_rows),
                ("v", q_rows + kv_rows..q_rows + 2 * kv_rows),
            ] {
                let src = if has_fused {
                    Source::RowSlice(Text, fused.clone(), r)
                } else {
                    one(Text, format!("{g}.attn_{p}.{suffix}"))
                };
                m.insert(format!("{hf}.self_attn.{p}_proj.{suffix}"), src);
            }
        }
        m.insert(
            format!("{hf}.self_attn.o_proj.weight"),
            one(Text, format!("{g}.attn_output.weight")),
        );
        for (h, gg) in [("gate", "gate"), ("up", "up"), ("down", "down")] {
            m.insert(
                format!("{hf}.mlp.{h}_proj.weight"),
                one(Text, format!("{g}.ffn_{gg}.weight")),
            );
        }
        if let Some(moe) = &t.moe {
            // Router, shared expert and its gate; expert K's matrices are the K-th of the
            // stacked `ffn_*_exps` (PyTorch `(experts, out, in)`).
            m.insert(
                format!("{hf}.mlp.gate.weight"),
                one(Text, format!("{g}.ffn_gate_inp.weight")),
            );
            m.insert(
                format!("{hf}.mlp.shared_expert_gate.weight"),
                one(Text, format!("{g}.ffn_gate_inp_shexp.weight")),
            );
            for p in ["gate", "up", "down"] {
                m.insert(
                    format!("{hf}.mlp.shared_expert.{p}_proj.weight"),
                    one(Text, format!("{g}.ffn_{p}_shexp.weight")),
                );
                let rows = if p == "down" {
                    t.hidden_size
                } else {
                    moe.moe_intermediate_size
                };
                for k in 0..moe.num_experts {
                    m.insert(
                        format!("{hf}.mlp.experts.{k}.{p}_proj.weight"),
                        Source::RowSlice(
                            Text,
                            format!("{g}.ffn_{p}_exps.weight"),
                            k * rows..(k + 1) * rows,
                        ),
                    );
                }
            }
        }
    }
    if !vision {
        return m;
    }
    m.insert(
        "visual.patch_embed.proj.weight".into(),
        Source::Frames(
            Vision,
            "v.patch_embd.weight".into(),
            "v.patch_embd.weight.1".into(),
        ),
    );
    for suffix in ["weight", "bias"] {
        for i in 0..cfg.vision.depth {
            let hf = format!("visual.blocks.{i}");
            let g = format!("v.blk.{i}");
            for (h, gg) in [
                ("norm1", "ln1"),
                ("norm2", "ln2"),
                ("attn.proj", "attn_out"),
                // Qwen2-VL's MLP...
                ("mlp.fc1", "ffn_up"),
                ("mlp.fc2", "ffn_down"),
                // ...and Qwen2.5-VL's SwiGLU.
                ("mlp.gate_proj", "ffn_gate"),
                ("mlp.up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"),
            ] {
                m.insert(
                    format!("{hf}.{h}.{suffix}"),
                    one(Vision, format!("{g}.{gg}.{suffix}")),
                );
            }
            m.insert(
                format!("{hf}.attn.qkv.{suffix}"),
                Source::Rows(
                    Vision,
                    ["q", "k", "v"]
                        .iter()
                        .map(|p| format!("{g}.attn_{p}.{suffix}"))
                        .collect(),
                ),
            );
        }
        for (h, gg) in [("ln_q", "v.post_ln"), ("mlp.0", "mm.0"), ("mlp.2", "mm.2")] {
            m.insert(
                format!("visual.merger.{h}.{suffix}"),
                one(Vision, format!("{gg}.{suffix}")),
            );
        }
    }
    m
}

/// Widens values of a format without a kernel here (q4_0, q4_1, q5_0, q5_1, q5_K) to f32,
/// as ggml's `dequantize_row_*` do. `out.len()` is a multiple of the block size and `bytes`
/// holds its blocks.
pub fn dequantize_widened(
    t: GgmlType,
    bytes: &[u8],
    out: &mut [f32],
) -> std::result::Result<(), String> {
    if t == GgmlType::Q5_K {
        return dequantize_q5k(bytes, out);
    }
    let f16 = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    let size = t
        .type_size()
        .ok_or_else(|| format!("type {t} has no known size"))? as usize;
    if bytes.len() != out.len() / 32 * size || !out.len().is_multiple_of(32) {
        return Err(format!(
            "{} bytes of {t} for {} values",
            bytes.len(),
            out.len()
        ));
    }
    for (b, y) in bytes.chunks_exact(size).zip(out.chunks_exact_mut(32)) {
        let d = f16(b, 0);
        match t {
            GgmlType::Q4_0 => {
                for j in 0..16 {
                    y[j] = (f32::from(b[2 + j] & 0x0f) - 8.0) * d;
                    y[j + 16] = (f32::from(b[2 + j] >> 4) - 8.0) * d;
                }
            }
            GgmlType::Q4_1 => {
                let m = f16(b, 2);
                for j in 0..16 {
                    y[j] = f32::from(b[4 + j] & 0x0f) * d + m;
                    y[j + 16] = f32::from(b[4 + j] >> 4) * d + m;
                }
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let (m, qh_at) = if t == GgmlType::Q5_1 {
                    (f16(b, 2), 4)
                } else {
                    (0.0, 2)
                };
                let qh = u32::from_le_bytes([b[qh_at], b[qh_at + 1], b[qh_at + 2], b[qh_at + 3]]);
                let qs = &b[qh_at + 4..qh_at + 20];
                let offset = if t == GgmlType::Q5_0 { 16.0 } else { 0.0 };
                for j in 0..16 {
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    let x0 = (u32::from(qs[j] & 0x0f) | h0) as f32 - offset;
                    let x1 = (u32::from(qs[j] >> 4) | h1) as f32 - offset;
                    y[j] = x0 * d + m;
                    y[j + 16] = x1 * d + m;
                }
            }
            other => return Err(format!("type {other} is not a legacy block format")),
        }
    }
    Ok(())
}

/// q5_K: per 256 values, `d`, `dmin` (f16), 12 bytes of eight 6-bit scales and mins (packed
/// as q4_K's), `qh[32]` (the fifth bits: bit `2c` for the low-nibble half of 64-value chunk
/// `c`, bit `2c + 1` for its high-nibble half) and `qs[128]` (low nibbles then high nibbles
/// per chunk of 64). Value = `d · sc · q − dmin · m`.
fn dequantize_q5k(bytes: &[u8], out: &mut [f32]) -> std::result::Result<(), String> {
    const QK: usize = 256;
    const SIZE: usize = 176;
    if !out.len().is_multiple_of(QK) || bytes.len() != out.len() / QK * SIZE {
        return Err(format!(
            "{} bytes of q5_K for {} values",
            bytes.len(),
            out.len()
        ));
    }
    let f16 = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    for (b, y) in bytes.chunks_exact(SIZE).zip(out.chunks_exact_mut(QK)) {
        let (d, dmin) = (f16(b, 0), f16(b, 2));
        let sc = &b[4..16];
        let qh = &b[16..48];
        let qs = &b[48..176];
        // ggml's get_scale_min_k4.
        let scale_min = |j: usize| -> (f32, f32) {
            if j < 4 {
                (f32::from(sc[j] & 63), f32::from(sc[j + 4] & 63))
            } else {
                (
                    f32::from((sc[j + 4] & 0x0f) | ((sc[j - 4] >> 6) << 4)),
                    f32::from((sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)),
                )
            }
        };
        for c in 0..4 {
            let (s1, m1) = scale_min(2 * c);
            let (s2, m2) = scale_min(2 * c + 1);
            let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
            let ql = &qs[32 * c..32 * c + 32];
            let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
            for l in 0..32 {
                let hi1 = if qh[l] & u1 != 0 { 16.0 } else { 0.0 };
                let hi2 = if qh[l] & u2 != 0 { 16.0 } else { 0.0 };
                y[64 * c + l] = d1 * (f32::from(ql[l] & 0x0f) + hi1) - m1;
                y[64 * c + 32 + l] = d2 * (f32::from(ql[l] >> 4) + hi2) - m2;
            }
        }
    }
    Ok(())
}

//! The converter's layout: which keys and tensors each file gets, under which names.
//!
//! The names are the inverse of [`crate::gguf::model`]'s map (its module docs hold the
//! table); the keys are those `convert_hf_to_gguf.py` writes for `Qwen2VLForConditionalGeneration`
//! and its mmproj, with the values it reads from the same JSON files.

use std::path::Path;

use serde_json::Value as Json;

use super::{
    always_f32, file_type, matrix_type, ne_of, read_json, size_label, title_name, Checkpoint,
    GgufPlan, PlannedTensor, TensorSource,
};
use crate::config::Architecture;
use crate::error::{Error, Result};
use crate::gguf::model::{PROJECTOR, QWEN2MOE_ARCH, QWEN2_ARCH, TEXT_ARCH};
use crate::gguf::{GgmlType, MetaArray, MetaValue};
use crate::ops::quant::plan::{QuantPlan, QuantScheme};

/// The GGUF name of a decoder tensor (`model.layers.3.self_attn.q_proj.weight` →
/// `blk.3.attn_q.weight`), or `None` for a name outside the decoder.
pub fn gguf_text_name(hf: &str) -> Option<String> {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (i, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "mlp.gate" => "ffn_gate_inp",
        "mlp.shared_expert_gate" => "ffn_gate_inp_shexp",
        "mlp.shared_expert.gate_proj" => "ffn_gate_shexp",
        "mlp.shared_expert.up_proj" => "ffn_up_shexp",
        "mlp.shared_expert.down_proj" => "ffn_down_shexp",
        _ => return None,
    };
    Some(format!("blk.{i}.{g}.{suffix}"))
}

/// The GGUF name of a vision tensor other than `qkv` and the patch kernel
/// (`visual.blocks.0.mlp.fc1.bias` → `v.blk.0.ffn_up.bias`).
fn gguf_vision_name(hf: &str) -> Option<String> {
    let rest = hf.strip_prefix("visual.")?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if let Some(block) = module.strip_prefix("blocks.") {
        let (i, part) = block.split_once('.')?;
        let g = match part {
            "norm1" => "ln1",
            "norm2" => "ln2",
            "attn.proj" => "attn_out",
            "mlp.fc1" => "ffn_up",
            "mlp.fc2" => "ffn_down",
            _ => return None,
        };
        return Some(format!("v.blk.{i}.{g}.{suffix}"));
    }
    let g = match module {
        "merger.ln_q" => "v.post_ln",
        "merger.mlp.0" => "mm.0",
        "merger.mlp.2" => "mm.2",
        _ => return None,
    };
    Some(format!("{g}.{suffix}"))
}

/// gguf-py's size label of a text model: the parameter count, or for a mixture of experts
/// `<experts>x<shared + one expert's parameters>` ("4x4.9M"; `get_total_parameter_count`
/// counts a stacked `*_exps` tensor's parameters divided by its experts).
fn text_size_label(plan: &GgufPlan) -> String {
    let (mut shared, mut expert, mut experts, mut stacks) = (0u64, 0u64, 0u64, 0u64);
    for t in &plan.tensors {
        let n: u64 = t.ne.iter().product();
        match t.ne.get(2) {
            Some(&e) if t.name.contains("_exps.") && e > 0 => {
                expert += n / e;
                experts += e;
                stacks += 1;
            }
            _ => shared += n,
        }
    }
    if stacks == 0 {
        return size_label(plan.parameters());
    }
    format!("{}x{}", experts / stacks, size_label(shared + expert))
}

/// `(layer, expert, projection)` of a routed expert's matrix
/// (`model.layers.3.mlp.experts.7.up_proj.weight` → `(3, 7, "up_proj")`).
fn expert_of(hf: &str) -> Option<(usize, usize, &str)> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once(".mlp.experts.")?;
    let (k, rest) = rest.split_once('.')?;
    let proj = rest.strip_suffix(".weight")?;
    if !matches!(proj, "gate_proj" | "up_proj" | "down_proj") {
        return None;
    }
    Some((layer.parse().ok()?, k.parse().ok()?, proj))
}

/// The error for a checkpoint tensor the layout has no place for.
fn unknown_tensor(name: &str, file: &str) -> Error {
    Error::Weights(format!(
        "tensor {name} has no place in llama.cpp's Qwen2-VL {file} (is this a Qwen2-VL \
         checkpoint?)"
    ))
}

impl Checkpoint {
    fn quant_plan(&self, text: Option<QuantScheme>, vision: Option<QuantScheme>) -> QuantPlan {
        QuantPlan {
            text,
            vision,
            layers: self.config.text.num_hidden_layers,
        }
    }

    /// The text model's `general.architecture`: `qwen2vl`, or llama.cpp's names of the text
    /// models, `qwen2` and `qwen2moe`.
    pub fn text_arch(&self) -> &'static str {
        match self.config.architecture {
            // llama.cpp runs Qwen2.5-VL's decoder as `qwen2vl` too.
            Architecture::Qwen2VL | Architecture::Qwen25VL => TEXT_ARCH,
            Architecture::Qwen2 => QWEN2_ARCH,
            Architecture::Qwen2Moe => QWEN2MOE_ARCH,
        }
    }

    /// The text model's file: metadata and tensors, matrices as `scheme` says (`None`: f16).
    pub fn text_plan(&self, scheme: Option<QuantScheme>, name: &str) -> Result<GgufPlan> {
        let plan = self.quant_plan(scheme, None);
        let mut tensors = Vec::new();
        for hf in self.names.iter().filter(|n| !n.starts_with("visual.")) {
            // Older checkpoints store rotary tables, which are computed, not weights.
            if hf.ends_with("rotary_emb.inv_freq") {
                continue;
            }
            // A tied head is the embedding table: llama.cpp reads token_embd for both.
            if hf == "lm_head.weight" && self.config.text.tie_word_embeddings {
                continue;
            }
            if let Some((layer, k, proj)) = expert_of(hf) {
                let experts = self.config.text.moe.as_ref().map_or(0, |m| m.num_experts);
                if k >= experts {
                    return Err(Error::Weights(format!(
                        "{hf}: expert {k}, but config.json has {experts} experts (num_experts)"
                    )));
                }
                // The experts of a layer are one stacked tensor, written at expert 0's place.
                if k == 0 {
                    tensors.push(self.stacked_experts(&plan, scheme, layer, proj)?);
                }
                continue;
            }
            let g = gguf_text_name(hf).ok_or_else(|| unknown_tensor(hf, "text model"))?;
            let shape = self.shape(hf)?;
            // The MoE router and the shared expert's gate stay f32, as the converter writes
            // them and as the loader keeps them under --quant.
            let router = g.contains(".ffn_gate_inp");
            let ggml_type = if always_f32(hf, &shape) || router {
                GgmlType::F32
            } else {
                matrix_type(&plan, scheme, hf, shape[shape.len() - 1])
            };
            tensors.push(PlannedTensor {
                name: g,
                ggml_type,
                ne: ne_of(&shape),
                source: TensorSource::Whole(hf.clone()),
                hf_name: hf.clone(),
            });
        }
        let mut out = GgufPlan {
            metadata: Vec::new(),
            tensors,
        };
        let label = text_size_label(&out);
        self.general(
            &mut out,
            self.text_arch(),
            file_type(scheme),
            &label,
            "model",
            name,
        )?;
        self.text_hparams(&mut out)?;
        self.tokenizer_keys(&mut out)?;
        Ok(out)
    }

    /// `blk.N.ffn_{gate,up,down}_exps.weight`: the `num_experts` matrices of `proj` in layer
    /// `layer` stacked in expert order (PyTorch `(experts, out, in)`, as the converter's
    /// `torch.stack`), in the type `--quant` gives expert 0's matrix (all of them get the
    /// same; row-wise quantization makes the stack's blocks each expert's own).
    fn stacked_experts(
        &self,
        plan: &QuantPlan,
        scheme: Option<QuantScheme>,
        layer: usize,
        proj: &str,
    ) -> Result<PlannedTensor> {
        let experts = self.config.text.moe.as_ref().map_or(0, |m| m.num_experts);
        let names: Vec<String> = (0..experts)
            .map(|k| format!("model.layers.{layer}.mlp.experts.{k}.{proj}.weight"))
            .collect();
        let first = names.first().ok_or_else(|| {
            Error::Weights(format!(
                "layer {layer} has expert tensors, but config.json has no num_experts"
            ))
        })?;
        let shape = self.shape(first)?;
        let [rows, k] = shape[..] else {
            return Err(Error::Weights(format!(
                "{first} has shape {shape:?}; expected a matrix"
            )));
        };
        let ggml_type = matrix_type(plan, scheme, first, k);
        for n in &names {
            let s = self.shape(n)?;
            if s != shape {
                return Err(Error::Weights(format!(
                    "{n} has shape {s:?}, but {first} has {shape:?}: experts must match to be stacked"
                )));
            }
            if matrix_type(plan, scheme, n, k) != ggml_type {
                return Err(Error::Internal(format!(
                    "{n}: the experts of a layer would get different types"
                )));
            }
        }
        let short = proj.trim_end_matches("_proj");
        Ok(PlannedTensor {
            name: format!("blk.{layer}.ffn_{short}_exps.weight"),
            ggml_type,
            ne: vec![k as u64, rows as u64, experts as u64],
            source: TensorSource::Stack(names.clone()),
            hf_name: first.clone(),
        })
    }

    /// The vision projector's file, matrices as `scheme` says (`None`: f16).
    pub fn vision_plan(&self, scheme: Option<QuantScheme>, name: &str) -> Result<GgufPlan> {
        if self.config.vision.qwen25.is_some() {
            // Its layout (qwen2.5vl_merger, ffn_gate, n_wa_pattern) is read but not written
            // yet; refused before any file is written.
            return Err(Error::bad_input(
                "this is a Qwen2.5-VL checkpoint: qwen2vl quantize writes Qwen2-VL GGUF files only",
                "a Qwen2VLForConditionalGeneration checkpoint (run a Qwen2.5-VL from its safetensors with --quant, or convert it with llama.cpp's convert_hf_to_gguf.py)",
            ));
        }
        let plan = self.quant_plan(None, scheme);
        let mut tensors = Vec::new();
        for hf in self.names.iter().filter(|n| n.starts_with("visual.")) {
            tensors.extend(self.vision_tensors(&plan, scheme, hf)?);
        }
        let mut out = GgufPlan {
            metadata: Vec::new(),
            tensors,
        };
        let label = size_label(out.parameters());
        self.general(&mut out, "clip", file_type(scheme), &label, "mmproj", name)?;
        self.vision_hparams(&mut out)?;
        Ok(out)
    }

    /// The GGUF tensors of vision tensor `hf`: `qkv` as three row blocks, the Conv3d patch
    /// kernel as one kernel per frame (f16, or f32 under a scheme), the rest as they are.
    fn vision_tensors(
        &self,
        plan: &QuantPlan,
        scheme: Option<QuantScheme>,
        hf: &str,
    ) -> Result<Vec<PlannedTensor>> {
        let shape = self.shape(hf)?;
        let k = shape.last().copied().unwrap_or(1);
        let ty = |shape: &[usize]| {
            if always_f32(hf, shape) {
                GgmlType::F32
            } else {
                matrix_type(plan, scheme, hf, k)
            }
        };
        let one = |name: String, shape: &[usize], ggml_type: GgmlType, source: TensorSource| {
            PlannedTensor {
                name,
                ggml_type,
                ne: ne_of(shape),
                source,
                hf_name: hf.to_string(),
            }
        };
        if hf == "visual.patch_embed.proj.weight" {
            let [e, c, t, p, q] = shape[..] else {
                return Err(Error::Weights(format!(
                    "{hf} has shape {shape:?}; expected a Conv3d kernel (out, in, t, p, p)"
                )));
            };
            let ggml_type = if scheme.is_none() {
                GgmlType::F16
            } else {
                GgmlType::F32
            };
            return Ok((0..t)
                .map(|frame| {
                    let name = match frame {
                        0 => "v.patch_embd.weight".to_string(),
                        f => format!("v.patch_embd.weight.{f}"),
                    };
                    let source = TensorSource::Frame {
                        name: hf.to_string(),
                        frame,
                    };
                    one(name, &[e, c, p, q], ggml_type, source)
                })
                .collect());
        }
        if let Some(block) = hf
            .strip_suffix(".attn.qkv.weight")
            .or(hf.strip_suffix(".attn.qkv.bias"))
        {
            let i = block.strip_prefix("visual.blocks.").unwrap_or(block);
            let suffix = if hf.ends_with("weight") {
                "weight"
            } else {
                "bias"
            };
            if shape.first().is_none_or(|rows| rows % 3 != 0) {
                return Err(Error::Weights(format!(
                    "{hf} has shape {shape:?}; expected q, k and v stacked as rows (a first \
                     dimension divisible by 3)"
                )));
            }
            let mut part_shape = shape.clone();
            part_shape[0] /= 3;
            let ggml_type = ty(&part_shape);
            return Ok(["q", "k", "v"]
                .iter()
                .enumerate()
                .map(|(part, p)| {
                    let source = TensorSource::RowPart {
                        name: hf.to_string(),
                        part,
                        parts: 3,
                    };
                    one(
                        format!("v.blk.{i}.attn_{p}.{suffix}"),
                        &part_shape,
                        ggml_type,
                        source,
                    )
                })
                .collect());
        }
        let g = gguf_vision_name(hf).ok_or_else(|| unknown_tensor(hf, "vision projector"))?;
        Ok(vec![one(
            g,
            &shape,
            ty(&shape),
            TensorSource::Whole(hf.to_string()),
        )])
    }

    /// The `general.*` keys (sampling defaults from generation_config.json, when present).
    fn general(
        &self,
        out: &mut GgufPlan,
        arch: &str,
        file_type: u32,
        size: &str,
        kind: &str,
        name: &str,
    ) -> Result<()> {
        out.set("general.architecture", arch);
        out.set("general.type", kind);
        out.set("general.name", title_name(name).as_str());
        out.set("general.size_label", size);
        out.set("general.file_type", file_type);
        out.set("general.quantization_version", 2u32);
        let path = self.dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(());
        }
        let g = read_json(&path)?;
        if let Some(k) = g["top_k"].as_i64() {
            out.set("general.sampling.top_k", k.clamp(0, i32::MAX as i64) as i32);
        }
        for (key, ours) in [
            ("top_p", "top_p"),
            ("min_p", "min_p"),
            ("temperature", "temp"),
            ("repetition_penalty", "penalty_repeat"),
        ] {
            if let Some(v) = g[key].as_f64() {
                out.set(&format!("general.sampling.{ours}"), v as f32);
            }
        }
        Ok(())
    }

    /// The `qwen2vl.*` hyper-parameters.
    fn text_hparams(&self, out: &mut GgufPlan) -> Result<()> {
        let t = &self.config.text;
        let u = |x: usize, what: &str| -> Result<u32> {
            u32::try_from(x).map_err(|_| {
                Error::bad_input(format!("config.json {what} = {x}"), "at most 4294967295")
            })
        };
        let arch = self.text_arch();
        let a = |k: &str| format!("{arch}.{k}");
        out.set(
            &a("block_count"),
            u(t.num_hidden_layers, "num_hidden_layers")?,
        );
        out.set(
            &a("context_length"),
            u(t.max_position_embeddings, "max_position_embeddings")?,
        );
        out.set(&a("embedding_length"), u(t.hidden_size, "hidden_size")?);
        out.set(
            &a("feed_forward_length"),
            u(t.intermediate_size, "intermediate_size")?,
        );
        out.set(
            &a("attention.head_count"),
            u(t.num_attention_heads, "num_attention_heads")?,
        );
        out.set(
            &a("attention.head_count_kv"),
            u(t.num_key_value_heads, "num_key_value_heads")?,
        );
        out.set(&a("rope.freq_base"), t.rope_theta as f32);
        out.set(
            &a("attention.layer_norm_rms_epsilon"),
            t.rms_norm_eps as f32,
        );
        if let Some(m) = &t.moe {
            out.set(&a("expert_count"), u(m.num_experts, "num_experts")?);
            out.set(
                &a("expert_used_count"),
                u(m.num_experts_per_tok, "num_experts_per_tok")?,
            );
            out.set(
                &a("expert_feed_forward_length"),
                u(m.moe_intermediate_size, "moe_intermediate_size")?,
            );
            out.set(
                &a("expert_shared_feed_forward_length"),
                u(
                    m.shared_expert_intermediate_size,
                    "shared_expert_intermediate_size",
                )?,
            );
            // llama.cpp's qwen2moe never renormalises (the released models do not); the key
            // is written only for a model that does, for this loader.
            if m.norm_topk_prob {
                out.set(&a("expert_weights_norm"), true);
            }
        }
        // A window that hides keys within the context (transformers applies it in every
        // layer; see TextConfig::attention_window): llama.cpp's key, which its qwen2 and
        // qwen2moe graphs do not read, for this loader. Released configs have none.
        if let Some(w) = t.attention_window() {
            out.set(&a("attention.sliding_window"), u(w, "sliding_window")?);
        }
        if arch != TEXT_ARCH {
            // 1-D RoPE: no sections.
            return Ok(());
        }
        let mut sections: Vec<i32> = t
            .rope_scaling
            .as_ref()
            .map(|r| r.mrope_section.iter().map(|&s| s as i32).collect())
            .unwrap_or_default();
        if sections.is_empty() || sections.len() > 4 {
            return Err(Error::bad_input(
                format!("config.json rope_scaling.mrope_section is {sections:?}"),
                "one to four sections (Qwen2-VL's M-RoPE)",
            ));
        }
        sections.resize(4, 0);
        out.set(&a("rope.dimension_sections"), sections);
        Ok(())
    }

    /// The `clip.*` keys of the vision projector.
    fn vision_hparams(&self, out: &mut GgufPlan) -> Result<()> {
        let v = &self.config.vision;
        let pre = crate::config::PreprocessorConfig::from_file(
            &self.dir.join("preprocessor_config.json"),
        )?;
        out.set("clip.has_vision_encoder", true);
        // The converter's fixed value for Qwen2-VL (images are resized by min/max pixels).
        out.set("clip.vision.image_size", 560u32);
        out.set("clip.vision.patch_size", v.patch_size as u32);
        out.set("clip.vision.embedding_length", v.embed_dim as u32);
        // The converter's value: vision_config.hidden_size (the text width), not the MLP's.
        out.set("clip.vision.feed_forward_length", v.hidden_size as u32);
        out.set(
            "clip.vision.projection_dim",
            self.config.text.hidden_size as u32,
        );
        out.set("clip.vision.block_count", v.depth as u32);
        out.set("clip.vision.attention.head_count", v.num_heads as u32);
        out.set("clip.vision.image_mean", pre.image_mean.to_vec());
        out.set("clip.vision.image_std", pre.image_std.to_vec());
        out.set("clip.projector_type", PROJECTOR);
        let eps = self.raw_config["rms_norm_eps"].as_f64().unwrap_or(1e-6);
        out.set("clip.vision.attention.layer_norm_epsilon", eps as f32);
        Ok(())
    }

    /// The `tokenizer.*` keys: llama.cpp's "gpt2" (byte-level BPE) vocabulary as its
    /// converter builds it from tokenizer.json (see [`Vocab`]), and the chat template.
    fn tokenizer_keys(&self, out: &mut GgufPlan) -> Result<()> {
        let vocab = Vocab::read(&self.dir, self.config.text.vocab_size, &self.raw_config)?;
        out.set("tokenizer.ggml.model", "gpt2");
        out.set("tokenizer.ggml.pre", "qwen2");
        out.set(
            "tokenizer.ggml.tokens",
            MetaValue::Array(MetaArray::Str(vocab.tokens)),
        );
        out.set("tokenizer.ggml.token_type", vocab.types);
        out.set(
            "tokenizer.ggml.merges",
            MetaValue::Array(MetaArray::Str(vocab.merges)),
        );
        for (key, id) in [
            ("eos", vocab.eos),
            ("padding", vocab.pad),
            ("bos", vocab.bos),
        ] {
            if let Some(id) = id {
                out.set(&format!("tokenizer.ggml.{key}_token_id"), id);
            }
        }
        out.set("tokenizer.ggml.add_bos_token", vocab.add_bos);
        out.set("tokenizer.ggml.add_eos_token", vocab.add_eos);
        if let Some(t) = chat_template(&self.dir)? {
            out.set("tokenizer.chat_template", t.as_str());
        }
        Ok(())
    }
}

/// gguf-py's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The vocabulary as llama.cpp's converter lays it out for a byte-level BPE tokenizer.
struct Vocab {
    /// One token per id up to `vocab_size`; ids no token has are `[PAD<id>]`.
    tokens: Vec<String>,
    /// NORMAL for the BPE vocabulary, CONTROL for special added tokens (and added tokens
    /// that look special, `<|…|>`), USER_DEFINED for other added tokens, UNUSED for padding.
    types: Vec<i32>,
    /// "left right" pairs, in rank order.
    merges: Vec<String>,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

impl Vocab {
    fn read(dir: &Path, vocab_size: usize, config: &Json) -> Result<Vocab> {
        let path = dir.join("tokenizer.json");
        let tok = read_json(&path)?;
        let bad = |message: String| Error::Config {
            file: path.clone(),
            message,
        };
        let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
        let mut types = vec![UNUSED; vocab_size];
        let mut set = |id: Option<u64>, token: &str, ty: i32| -> Result<()> {
            let id = id.filter(|&i| (i as usize) < vocab_size).ok_or_else(|| {
                bad(format!(
                    "token {token:?} has no id below config.json's vocab_size {vocab_size}"
                ))
            })? as usize;
            tokens[id] = token.to_string();
            types[id] = ty;
            Ok(())
        };
        let vocab = tok["model"]["vocab"]
            .as_object()
            .ok_or_else(|| bad("no model.vocab object (a BPE tokenizer's)".into()))?;
        for (t, id) in vocab {
            set(id.as_u64(), t, NORMAL)?;
        }
        let added = tok["added_tokens"].as_array().cloned().unwrap_or_default();
        for a in &added {
            let content = a["content"].as_str().unwrap_or_default();
            let special = a["special"].as_bool().unwrap_or(false) || looks_special(content);
            set(
                a["id"].as_u64(),
                content,
                if special { CONTROL } else { USER_DEFINED },
            )?;
        }
        let merges = tok["model"]["merges"]
            .as_array()
            .ok_or_else(|| bad("no model.merges array (a BPE tokenizer's)".into()))?
            .iter()
            .map(|m| match m {
                Json::String(s) => Ok(s.clone()),
                Json::Array(p) if p.len() == 2 => Ok(format!(
                    "{} {}",
                    p[0].as_str().unwrap_or_default(),
                    p[1].as_str().unwrap_or_default()
                )),
                other => Err(bad(format!("merge {other} is not \"a b\" or [a, b]"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc = if tc_path.is_file() {
            read_json(&tc_path)?
        } else {
            Json::Null
        };
        let id_of = |typ: &str| special_id(&tc, config, vocab, &added, typ);
        Ok(Vocab {
            tokens,
            types,
            merges,
            bos: id_of("bos"),
            eos: id_of("eos"),
            pad: id_of("pad"),
            add_bos: tc["add_bos_token"].as_bool().unwrap_or(false),
            add_eos: tc["add_eos_token"].as_bool().unwrap_or(false),
        })
    }
}

/// gguf-py's `does_token_look_special`: added tokens some models forget to mark special.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// A special token's id as gguf-py's `SpecialVocab` finds it: tokenizer_config.json's
/// `<typ>_token` (a string or `{"content": …}`) looked up in the added tokens and the
/// vocabulary, else config.json's `<typ>_token_id`.
fn special_id(
    tc: &Json,
    config: &Json,
    vocab: &serde_json::Map<String, Json>,
    added: &[Json],
    typ: &str,
) -> Option<u32> {
    let entry = &tc[format!("{typ}_token")];
    let content = entry.as_str().or_else(|| entry["content"].as_str());
    let from_tc = content.and_then(|c| {
        added
            .iter()
            .find(|a| a["content"].as_str() == Some(c))
            .and_then(|a| a["id"].as_u64())
            .or_else(|| vocab.get(c).and_then(Json::as_u64))
    });
    from_tc
        .or_else(|| config[format!("{typ}_token_id")].as_u64())
        .and_then(|id| u32::try_from(id).ok())
}

/// The chat template as the converter finds it: tokenizer_config.json's `chat_template`
/// (a string, or the `default` of a list of named templates), else chat_template.jinja,
/// else chat_template.json's `chat_template`.
fn chat_template(dir: &Path) -> Result<Option<String>> {
    let tc_path = dir.join("tokenizer_config.json");
    if tc_path.is_file() {
        let tc = read_json(&tc_path)?;
        match &tc["chat_template"] {
            Json::String(s) => return Ok(Some(s.clone())),
            Json::Array(list) => {
                let default = list
                    .iter()
                    .find(|t| t["name"].as_str() == Some("default"))
                    .and_then(|t| t["template"].as_str());
                if let Some(s) = default {
                    return Ok(Some(s.to_string()));
                }
            }
            _ => {}
        }
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return Ok(Some(std::fs::read_to_string(jinja)?));
    }
    let json = dir.join("chat_template.json");
    if json.is_file() {
        return Ok(read_json(&json)?["chat_template"]
            .as_str()
            .map(str::to_string));
    }
    Ok(None)
}

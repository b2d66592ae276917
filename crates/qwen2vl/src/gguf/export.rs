//! Writing a safetensors Qwen2-VL checkpoint as GGUF files (`qwen2vl quantize`), in the
//! layout of llama.cpp's converter (`convert_hf_to_gguf.py`, commit 0c1e570). The Qwen2 text
//! models are written as the converter writes them too: one file, `general.architecture`
//! `qwen2` (`Qwen2ForCausalLM`) or `qwen2moe` (`Qwen2MoeForCausalLM`: each layer's experts
//! stacked in `ffn_{gate,up,down}_exps`, the router `ffn_gate_inp` and the shared expert's
//! gate `ffn_gate_inp_shexp` in f32, the `qwen2moe.expert_*` keys; `tests/gguf_text.rs`
//! holds both to the converter's own files, `tests/fixtures/gguf/llamacpp-qwen2-text.json`).
//! Two things llama.cpp's `qwen2moe` cannot hold are written for this loader only: the dense
//! MLPs of `mlp_only_layers` (as `ffn_{gate,up,down}`) and `norm_topk_prob: true`
//! (`qwen2moe.expert_weights_norm`).
//!
//! # Why GGUF
//!
//! A pre-quantized checkpoint has to be stored somewhere; GGUF is the format llama.cpp and
//! the tools around it (Ollama, LM Studio, gguf-py) already read and write, and
//! [`super::model::GgufModel`] already loads it. So the same files go both ways: a user's
//! llama.cpp download runs here, and what `qwen2vl quantize` writes runs in llama.cpp. The
//! blocks load as they are stored ([`crate::weights::Weights::stored_quant`]), so a server
//! restarts without quantizing anything.
//!
//! # What is written
//!
//! Two files, as the converter writes them (`tests/gguf_model.rs` holds both to the
//! manifest of the converter's own output, `tests/fixtures/gguf/llamacpp-tiny-qwen2vl.json`):
//!
//! - the text model (`general.architecture = "qwen2vl"`): `general.*` (name, size label,
//!   file type, sampling defaults from `generation_config.json`), the hyper-parameters
//!   (`qwen2vl.*`, with the M-RoPE sections padded to four), the tokenizer
//!   (`tokenizer.ggml.*`: every id's token, its type, the merges and the special ids, from
//!   `tokenizer.json`, `tokenizer_config.json` and `config.json`), the chat template, and
//!   the decoder's tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q`, ...);
//! - the vision projector (`general.architecture = "clip"`, `clip.projector_type =
//!   "qwen2vl_merger"`): the vision hyper-parameters, the image mean and std, and the vision
//!   tower's tensors (`qkv` split into `attn_q`/`attn_k`/`attn_v`, the Conv3d patch kernel
//!   split into one kernel per temporal frame).
//!
//! # Tensor types
//!
//! One-dimensional tensors, norms and biases are f32, as the converter writes them. The
//! matrices are f16 with no scheme (the converter's `--outtype f16`), or take exactly the
//! format `--quant` gives them at load ([`QuantPlan::type_for`]: q4_k_m's layer mix, the
//! q8_0 fallback for rows that are not a multiple of 256), quantized by the same
//! [`QMatrix::quantize`] from the same f32 values, so loading the file computes bit for bit
//! what loading the safetensors with `--quant` computes. A matrix no format fits stays f32
//! (the values the loader would compute with). The vision projector keeps f16 matrices and
//! patch kernels unless a vision scheme is given; then its matrices are quantized like
//! `--vision-quant` and its patch kernels are f32 (the converter's rule for quantized
//! outtypes, and what `--vision-quant` computes with).
//!
//! # Streaming
//!
//! The tensor table is planned from the safetensors headers alone ([`GgufPlan`]); then each
//! tensor is read from the memory map, converted or quantized and written before the next
//! is read, so at most one tensor is held in f32 at a time (plus its encoded bytes: the peak
//! is set by the largest tensor, the embedding table, 0.9 GB in f32 for the 2B, 2.2 GB for
//! the 7B; for a MoE model a layer's stacked experts, 2.4 GB for one of Qwen2-57B-A14B's),
//! and the mapped pages are released as each tensor is copied. Each file is written under a
//! temporary name in the output directory and renamed when complete, so an interrupted run
//! leaves no file under the final name.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value as Json;

use super::{GgmlType, GgufWriter, MetaValue};
use crate::config::Qwen2VLConfig;
use crate::error::{Error, Result};
use crate::ops::quant::plan::{QuantPlan, QuantScheme};
use crate::ops::quant::{QMatrix, QType};

mod layout;
mod source;
pub use layout::gguf_text_name;
use source::SafetensorsDir;

/// Told after every tensor written: output bytes so far out of both files' total.
pub type ExportProgressFn = Arc<dyn Fn(ExportProgress) + Send + Sync>;

/// Where an export stands, in bytes of output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportProgress {
    /// Bytes written so far (headers and tensors of both files).
    pub bytes_done: u64,
    /// Bytes the finished files will hold.
    pub bytes_total: u64,
}

/// How [`export`] writes a checkpoint.
#[derive(Clone, Default)]
pub struct ExportOptions {
    /// The decoder's scheme (`--quant`); `None` writes f16 matrices.
    pub quant: Option<QuantScheme>,
    /// The vision tower's scheme (`--vision-quant`); `None` writes f16 matrices.
    pub vision_quant: Option<QuantScheme>,
    /// `general.name` and the file names' stem; default: the model directory's name.
    pub name: Option<String>,
    /// Told after every tensor written.
    pub progress: Option<ExportProgressFn>,
}

/// The files an [`export`] wrote: the text model first, then the vision projector.
#[derive(Debug, Clone)]
pub struct Exported {
    /// Each file's path and size in bytes.
    pub files: Vec<(PathBuf, u64)>,
}

/// llama.cpp's `general.file_type` (`enum llama_ftype`) of a file whose matrices follow
/// `scheme` (`None`: f16).
pub fn file_type(scheme: Option<QuantScheme>) -> u32 {
    match scheme {
        None => 1,                     // MOSTLY_F16
        Some(QuantScheme::Q8_0) => 7,  // MOSTLY_Q8_0
        Some(QuantScheme::Q4K) => 14,  // MOSTLY_Q4_K_S
        Some(QuantScheme::Q4KM) => 15, // MOSTLY_Q4_K_M
        Some(QuantScheme::Q6K) => 18,  // MOSTLY_Q6_K
    }
}

/// The ggml type that stores a [`QType`]'s blocks (the layouts are byte-identical).
pub fn ggml_type_of(t: QType) -> GgmlType {
    match t {
        QType::Q8_0 => GgmlType::Q8_0,
        QType::Q4K => GgmlType::Q4_K,
        QType::Q6K => GgmlType::Q6_K,
    }
}

/// Writes the checkpoint in `dir` as `out/<name>-<scheme>.gguf` and
/// `out/mmproj-<name>-<vision scheme>.gguf` (see the module docs); `out` must exist.
pub fn export(dir: &Path, out: &Path, options: &ExportOptions) -> Result<Exported> {
    let ck = Checkpoint::open(dir)?;
    if let (Some(q), false) = (options.vision_quant, ck.has_vision()) {
        return Err(Error::bad_input(
            format!(
                "--vision-quant {q} was given, but {} is a {} checkpoint, which has no vision tower",
                dir.display(),
                ck.config().architecture.name()
            ),
            "--vision-quant with a Qwen2-VL checkpoint only",
        ));
    }
    let name = options.name.clone().unwrap_or_else(|| default_name(dir));
    let (text_file, mmproj_file) = file_names(&name, options.quant, options.vision_quant);
    let mut plans = vec![(out.join(text_file), ck.text_plan(options.quant, &name)?)];
    if ck.has_vision() {
        plans.push((
            out.join(mmproj_file),
            ck.vision_plan(options.vision_quant, &name)?,
        ));
    }
    let mut total = 0;
    for (_, plan) in &plans {
        total += plan.file_len()?;
    }
    let mut done = 0;
    let mut files = Vec::new();
    for (path, plan) in &plans {
        let mut report = |n: u64| {
            done += n;
            if let Some(p) = &options.progress {
                p(ExportProgress {
                    bytes_done: done,
                    bytes_total: total,
                });
            }
        };
        let len = plan.write(&ck, path, &mut report)?;
        files.push((path.clone(), len));
    }
    Ok(Exported { files })
}

/// The names [`export`] gives the text model and the vision projector of model `name`:
/// `<name>-<scheme>.gguf` and `mmproj-<name>-<vision scheme>.gguf` (`f16` for no scheme),
/// as llama.cpp's converter names its files.
pub fn file_names(
    name: &str,
    quant: Option<QuantScheme>,
    vision_quant: Option<QuantScheme>,
) -> (String, String) {
    let scheme = |s: Option<QuantScheme>| s.map_or("f16", QuantScheme::name);
    (
        format!("{name}-{}.gguf", scheme(quant)),
        format!("mmproj-{name}-{}.gguf", scheme(vision_quant)),
    )
}

/// The model directory's name (`general.name`'s source when none is given), or "model".
pub fn default_name(dir: &Path) -> String {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    canonical
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "model".into())
}

/// `general.name` as the converter derives it from a directory name: `-` and `_` become
/// spaces, then Python's `str.title()` (a letter after a non-letter is upper case, the rest
/// lower case): "tiny-qwen2vl" → "Tiny Qwen2Vl".
pub fn title_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut after_letter = false;
    for c in name.chars() {
        let c = if c == '-' || c == '_' { ' ' } else { c };
        if c.is_alphabetic() {
            if after_letter {
                out.extend(c.to_lowercase());
            } else {
                out.extend(c.to_uppercase());
            }
            after_letter = true;
        } else {
            out.push(c);
            after_letter = false;
        }
    }
    out
}

/// gguf-py's `size_label`: the parameter count in K, M, B or T with at least two digits
/// ("258K", "10M", "1.5B").
pub fn size_label(params: u64) -> String {
    let p = params as f64;
    let (scaled, suffix) = if p > 1e12 {
        (p * 1e-12, "T")
    } else if p > 1e9 {
        (p * 1e-9, "B")
    } else if p > 1e6 {
        (p * 1e-6, "M")
    } else {
        (p * 1e-3, "K")
    };
    let digits = format!("{}", scaled.round() as u64);
    let digits = digits.trim_start_matches('0').len();
    let fix = 2usize.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

/// Where a planned tensor's values come from.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorSource {
    /// A checkpoint tensor as it is (by its Hugging Face name).
    Whole(String),
    /// Rows `part` of `parts` equal row blocks of a checkpoint tensor (q, k or v of a
    /// vision `qkv`).
    RowPart {
        /// The checkpoint tensor.
        name: String,
        /// Which block, from 0.
        part: usize,
        /// How many blocks.
        parts: usize,
    },
    /// Checkpoint tensors stacked as rows (a fused `attn_qkv`, as the converter's
    /// `--fuse-qkv` writes it).
    Stack(Vec<String>),
    /// Temporal frame `frame` of a Conv3d kernel `(out, in, t, p, p)`, as `(out, in, p, p)`.
    Frame {
        /// The checkpoint tensor.
        name: String,
        /// The frame, from 0.
        frame: usize,
    },
    /// These bytes as they are, in the planned type (for files of hand-made types).
    Bytes(Vec<u8>),
}

/// One tensor of a GGUF file to write.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    /// The GGUF name.
    pub name: String,
    /// The stored type: f32, f16, q8_0, q4_K or q6_K from a checkpoint source, any type
    /// from [`TensorSource::Bytes`].
    pub ggml_type: GgmlType,
    /// ggml's dimensions, fastest first (the PyTorch shape reversed).
    pub ne: Vec<u64>,
    /// Where the values come from.
    pub source: TensorSource,
    /// The Hugging Face name whose quantization rule applies (for messages).
    pub hf_name: String,
}

/// One GGUF file before it is written: its metadata and tensor table, with the source of
/// every tensor. Cheap to build (no tensor is read) and open to change before writing.
#[derive(Debug, Clone, Default)]
pub struct GgufPlan {
    /// Keys and values, in writing order.
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensors, in writing order.
    pub tensors: Vec<PlannedTensor>,
}

impl GgufPlan {
    /// Sets `key` (replacing its value where present, else appending it).
    pub fn set(&mut self, key: &str, value: impl Into<MetaValue>) {
        let value = value.into();
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The planned tensor `name` (GGUF name), to change before writing.
    pub fn tensor_mut(&mut self, name: &str) -> Option<&mut PlannedTensor> {
        self.tensors.iter_mut().find(|t| t.name == name)
    }

    /// Parameters in the file (every tensor's element count).
    pub fn parameters(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.ne.iter().product::<u64>())
            .sum()
    }

    fn writer(&self) -> Result<GgufWriter> {
        let mut w = GgufWriter::new();
        for (k, v) in &self.metadata {
            w.add(k, v.clone())?;
        }
        for t in &self.tensors {
            w.add_tensor(&t.name, t.ggml_type, &t.ne)?;
        }
        Ok(w)
    }

    /// The size of the finished file in bytes.
    pub fn file_len(&self) -> Result<u64> {
        Ok(self.writer()?.file_len())
    }

    /// Writes the file at `path` (through a temporary name in the same directory, renamed
    /// when complete), reading each tensor from `ck` just before it is written; `progress`
    /// is told the bytes of each part written. Returns the file's size.
    pub fn write(
        &self,
        ck: &Checkpoint,
        path: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64> {
        let w = self.writer()?;
        let len = w.file_len();
        let header = w.header_len();
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{file_name}.partial"));
        // A leftover of an interrupted run under our temporary name is ours to replace.
        let _ = std::fs::remove_file(&tmp);
        let written = (|| -> Result<()> {
            let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            let mut s = w.begin(BufWriter::with_capacity(1 << 20, file))?;
            progress(header);
            for t in &self.tensors {
                let bytes = ck.encode(t)?;
                s.write_tensor(&t.name, &bytes)?;
                progress(bytes.len() as u64);
            }
            let file = s
                .finish()?
                .into_inner()
                .map_err(|e| Error::Io(e.into_error()))?;
            file.sync_all()?;
            Ok(())
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, path)?;
        Ok(len)
    }
}

/// A safetensors Qwen2-VL model directory opened for export: its config and memory-mapped
/// weights (read as f32, one tensor at a time).
pub struct Checkpoint {
    dir: PathBuf,
    config: Qwen2VLConfig,
    raw_config: Json,
    files: SafetensorsDir,
    /// Hugging Face name (`model.layers.…`, `visual.…`, `lm_head.weight`) → stored name.
    stored: HashMap<String, String>,
    /// The Hugging Face names, in natural order (layer 2 before layer 10).
    names: Vec<String>,
}

impl Checkpoint {
    /// Opens the model in `dir`: config.json and the safetensors files.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let config_path = dir.join("config.json");
        if !dir.is_dir() || !config_path.is_file() {
            return Err(Error::Model {
                what: "not a safetensors model directory (expected config.json, *.safetensors \
                       and tokenizer.json)"
                    .into(),
                path: dir.to_path_buf(),
            });
        }
        let config = Qwen2VLConfig::from_file(&config_path)?;
        let raw_config = read_json(&config_path)?;
        let files = SafetensorsDir::open(dir)?;
        let stored: HashMap<String, String> =
            files.names().map(|n| (hf_name(n), n.to_string())).collect();
        let mut names: Vec<String> = stored.keys().cloned().collect();
        names.sort_by_key(|n| natural_key(n));
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            raw_config,
            files,
            stored,
            names,
        })
    }

    /// The model's config.
    pub fn config(&self) -> &Qwen2VLConfig {
        &self.config
    }

    /// Whether the checkpoint holds a vision tower.
    pub fn has_vision(&self) -> bool {
        self.names.iter().any(|n| n.starts_with("visual."))
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.stored
            .get(name)
            .and_then(|s| self.files.shape(s))
            .map(<[usize]>::to_vec)
            .ok_or_else(|| Error::Weights(format!("missing tensor {name}")))
    }

    /// Checkpoint tensor `name` (Hugging Face naming) in f32.
    fn read(&self, name: &str) -> Result<Vec<f32>> {
        let stored = self
            .stored
            .get(name)
            .ok_or_else(|| Error::Weights(format!("missing tensor {name}")))?;
        self.files.read_f32(stored)
    }

    /// The f32 values of `source`, for a tensor of `ne`.
    fn values(&self, source: &TensorSource, ne: &[u64]) -> Result<Vec<f32>> {
        let read = |name: &str| self.read(name);
        match source {
            TensorSource::Whole(name) => read(name),
            TensorSource::RowPart { name, part, parts } => {
                let all = read(name)?;
                let per = all.len() / parts;
                Ok(all[part * per..(part + 1) * per].to_vec())
            }
            TensorSource::Stack(names) => {
                let mut all = Vec::new();
                for n in names {
                    all.extend(read(n)?);
                }
                Ok(all)
            }
            TensorSource::Frame { name, frame } => {
                let shape = self.shape(name)?;
                let [e, c, t, p, q] = shape[..] else {
                    return Err(Error::Weights(format!(
                        "{name} has shape {shape:?}; expected a Conv3d kernel (out, in, t, p, p)"
                    )));
                };
                let all = read(name)?;
                let plane = p * q;
                let mut k = Vec::with_capacity(e * c * plane);
                for ec in 0..e * c {
                    let at = (ec * t + frame) * plane;
                    k.extend_from_slice(&all[at..at + plane]);
                }
                Ok(k)
            }
            TensorSource::Bytes(_) => Err(Error::Internal(format!(
                "raw bytes have no values (a tensor of {ne:?})"
            ))),
        }
    }

    /// The bytes of planned tensor `t`, in its type.
    fn encode(&self, t: &PlannedTensor) -> Result<Vec<u8>> {
        match &t.source {
            TensorSource::Bytes(b) => Ok(b.clone()),
            TensorSource::Whole(name) => encode_values(t, &self.read(name)?),
            other => encode_values(t, &self.values(other, &t.ne)?),
        }
    }
}

/// `v`, the values of planned tensor `t`, in `t`'s type.
fn encode_values(t: &PlannedTensor, v: &[f32]) -> Result<Vec<u8>> {
    let n: u64 = t.ne.iter().product();
    if v.len() as u64 != n {
        return Err(Error::Internal(format!(
            "{}: {} values for ne {:?}",
            t.name,
            v.len(),
            t.ne
        )));
    }
    Ok(match t.ggml_type {
        GgmlType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        GgmlType::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        other => {
            let q = match other {
                GgmlType::Q8_0 => QType::Q8_0,
                GgmlType::Q4_K => QType::Q4K,
                GgmlType::Q6_K => QType::Q6K,
                _ => {
                    return Err(Error::bad_input(
                        format!("{}: cannot write type {other}", t.name),
                        "f32, f16, q8_0, q4_K or q6_K",
                    ))
                }
            };
            let k = t.ne[0] as usize;
            let m = QMatrix::quantize(q, v, v.len() / k, k)
                .map_err(|e| Error::Weights(format!("{}: {e}", t.hf_name)))?;
            m.ggml_bytes().into_owned()
        }
    })
}

/// The Hugging Face name of a stored name (newer checkpoints nest the towers under
/// `model.language_model.` and `model.visual.`).
fn hf_name(stored: &str) -> String {
    if let Some(rest) = stored.strip_prefix("model.language_model.") {
        format!("model.{rest}")
    } else if let Some(rest) = stored.strip_prefix("model.visual.") {
        format!("visual.{rest}")
    } else {
        stored.to_string()
    }
}

/// A sort key that orders the numbers inside names by value (`layers.2` before `layers.10`).
fn natural_key(name: &str) -> Vec<(u64, String)> {
    name.split('.')
        .map(|s| match s.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (u64::MAX, s.to_string()),
        })
        .collect()
}

/// Reads a JSON file, naming it in the error.
fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
        file: path.to_path_buf(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        file: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// `ne` of a PyTorch shape.
fn ne_of(shape: &[usize]) -> Vec<u64> {
    shape.iter().rev().map(|&d| d as u64).collect()
}

/// Whether a checkpoint tensor stays f32 whatever the scheme: 1-D tensors, norms, biases.
fn always_f32(name: &str, shape: &[usize]) -> bool {
    shape.len() < 2 || name.ends_with("norm.weight") || !name.ends_with(".weight")
}

/// The stored type of a matrix under `plan` (`None` scheme: f16): the format `--quant`
/// gives it, or f32 where no format fits its rows.
fn matrix_type(plan: &QuantPlan, scheme: Option<QuantScheme>, hf: &str, k: usize) -> GgmlType {
    match scheme {
        None => GgmlType::F16,
        Some(_) => plan.type_for(hf, k).map_or(GgmlType::F32, ggml_type_of),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_follow_the_converter() {
        assert_eq!(title_name("tiny-qwen2vl"), "Tiny Qwen2Vl");
        assert_eq!(title_name("Qwen2-VL-2B-Instruct"), "Qwen2 Vl 2B Instruct");
        assert_eq!(size_label(257_920), "258K");
        assert_eq!(size_label(9_780_000), "10M");
        assert_eq!(size_label(1_543_714_304), "1.5B");
        assert_eq!(size_label(72_000_000_000), "72B");
        assert_eq!(
            file_names("m", Some(QuantScheme::Q4KM), None),
            ("m-q4_k_m.gguf".to_string(), "mmproj-m-f16.gguf".to_string())
        );
        assert_eq!(
            [None, Some(QuantScheme::Q8_0), Some(QuantScheme::Q4K)].map(file_type),
            [1, 7, 14]
        );
        assert_eq!(
            [Some(QuantScheme::Q4KM), Some(QuantScheme::Q6K)].map(file_type),
            [15, 18]
        );
    }

    #[test]
    fn names_sort_by_layer_number() {
        let mut v = vec![
            "model.layers.10.mlp.up_proj.weight",
            "model.layers.2.mlp.up_proj.weight",
            "model.embed_tokens.weight",
            "model.layers.2.input_layernorm.weight",
        ];
        v.sort_by_key(|n| natural_key(n));
        assert_eq!(
            v,
            [
                "model.embed_tokens.weight",
                "model.layers.2.input_layernorm.weight",
                "model.layers.2.mlp.up_proj.weight",
                "model.layers.10.mlp.up_proj.weight",
            ]
        );
        assert_eq!(
            hf_name("model.language_model.norm.weight"),
            "model.norm.weight"
        );
        assert_eq!(
            hf_name("model.visual.merger.mlp.0.bias"),
            "visual.merger.mlp.0.bias"
        );
    }

    #[test]
    fn a_directory_without_config_is_refused() {
        let e = Checkpoint::open(Path::new("/nonexistent/model"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a safetensors model directory"), "{e}");
    }
}

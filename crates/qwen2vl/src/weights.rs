//! Finding and reading a checkpoint's tensors.
//!
//! A Hugging Face–format model directory holds either `model.safetensors` or shards listed in
//! `model.safetensors.index.json`. The files are memory-mapped; a tensor is read straight from
//! the map into compute-dtype memory in one pass (bf16 → f32 widening included), so a weight is
//! copied exactly once at load and never again.
//!
//! Tensors are asked for by their *original* checkpoint names (`model.layers.0.self_attn.q_proj.weight`,
//! `visual.blocks.0.attn.qkv.weight`, `lm_head.weight`). Checkpoints written by transformers ≥ 4.52
//! use `model.language_model.*` and `model.visual.*` instead; [`Weights::get`] tries both.
//! Every name handed out is recorded, so the loader can report tensors the model never used.
//!
//! A second backend serves the same names out of llama.cpp's GGUF files
//! ([`Weights::from_gguf`], the name map in [`crate::gguf::model`]): float tensors are converted
//! like safetensors ones, and quantized matrices are handed out as they are stored
//! ([`Weights::stored_quant`]), never widened and requantized.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, Result};
use crate::gguf::model::{dequantize_widened, qtype_of, requantized_to, GgufModel, Part, Source};
use crate::gguf::{GgmlType, GgufFile, TensorInfo};
use crate::mapped::{le16, par_decode, release_pages};
use crate::ops::gemm_bf16::PackedBf16;
use crate::ops::gemm_half::{HalfKind, HalfMatrix};
use crate::ops::quant::plan::QuantPlan;
use crate::ops::quant::{QMatrix, QType};

/// One tensor's place in the mapped files.
#[derive(Debug, Clone)]
struct TensorEntry {
    /// Index into `Weights::maps`.
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    /// Byte range of its data within the map.
    bytes: std::ops::Range<usize>,
}

/// How far reading the weights has got, reported after every tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadProgress {
    /// Checkpoint bytes read and converted so far (never more than `bytes_total`).
    pub bytes_done: u64,
    /// Bytes of all tensors in the checkpoint.
    pub bytes_total: u64,
    /// Tensors read so far.
    pub tensors_done: usize,
    /// Tensors in the checkpoint.
    pub tensors_total: usize,
}

/// A loading progress callback; it may be called from any thread.
pub type ProgressFn = std::sync::Arc<dyn Fn(LoadProgress) + Send + Sync>;

/// The memory-mapped safetensors files of one checkpoint.
pub struct Weights {
    maps: Vec<(PathBuf, Arc<Mmap>)>,
    /// name → where its bytes are, recorded once when the headers are parsed.
    index: HashMap<String, TensorEntry>,
    used: Mutex<BTreeSet<String>>,
    dtype: DType,
    device: Device,
    /// Called after each tensor is read, when set.
    progress: Option<ProgressFn>,
    /// (bytes, tensors) read so far, for `progress`.
    done: Mutex<(u64, usize)>,
    /// Which matrices are quantized as they load (`--quant`), when set.
    quant: Option<QuantPlan>,
    /// The GGUF files tensors come from instead of `maps` (then empty), when set.
    gguf: Option<Arc<GgufModel>>,
    /// Float matrices of linear layers are packed to bf16 for bf16 compute
    /// ([`Weights::set_bf16_products`]).
    bf16_products: bool,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("files", &self.maps.len())
            .field("tensors", &self.index.len())
            .field("dtype", &self.dtype)
            .finish()
    }
}

/// False when the environment sets `QWEN2VL_HALF_WEIGHTS=0`: f32 compute then widens 16-bit
/// matrices at load as it used to ([`Weights::get_half`]; for before/after comparisons with
/// one binary). Read once.
pub fn half_in_place() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("QWEN2VL_HALF_WEIGHTS").map_or(true, |v| v != "0"))
}

fn weights_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Weights(format!("{}: {e}", path.display()))
}

impl Weights {
    /// Maps the safetensors files of the model in `dir`: `model.safetensors.index.json`'s
    /// shards when that file exists, else `model.safetensors`, else every `*.safetensors`.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Config {
                    file: index_path.clone(),
                    message: e.to_string(),
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Config {
                    file: index_path.clone(),
                    message: "no \"weight_map\" object".into(),
                })?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else if dir.join("model.safetensors").is_file() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::Model {
                    what: format!("cannot read the model directory ({e})"),
                    path: dir.to_path_buf(),
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            v.sort();
            v
        };
        if files.is_empty() {
            return Err(Error::Model {
                what:
                    "no weights found (expected model.safetensors or model.safetensors.index.json)"
                        .into(),
                path: dir.to_path_buf(),
            });
        }
        Self::from_files(&files, dtype, device)
    }

    /// Maps the given safetensors files.
    pub fn from_files(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let mut maps = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let file = File::open(path).map_err(|e| Error::Model {
                what: format!("cannot open weights file ({e})"),
                path: path.clone(),
            })?;
            // SAFETY: the file is opened read-only; like every mmap-based loader we rely on
            // nobody truncating a checkpoint while it is being served.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| weights_err(path, e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| weights_err(path, e))?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - base;
                let entry = TensorEntry {
                    file: i,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: start..start + view.data().len(),
                };
                index.insert(name, entry);
            }
            maps.push((path.clone(), Arc::new(mmap)));
        }
        Ok(Weights {
            maps,
            index,
            used: Mutex::new(BTreeSet::new()),
            dtype,
            device: device.clone(),
            progress: None,
            done: Mutex::new((0, 0)),
            quant: None,
            gguf: None,
            bf16_products: false,
        })
    }

    /// Serves the tensors of llama.cpp GGUF files under their Hugging Face names (see
    /// [`crate::gguf::model`] for the map).
    pub fn from_gguf(model: Arc<GgufModel>, dtype: DType, device: &Device) -> Self {
        Weights {
            maps: Vec::new(),
            index: HashMap::new(),
            used: Mutex::new(BTreeSet::new()),
            dtype,
            device: device.clone(),
            progress: None,
            done: Mutex::new((0, 0)),
            quant: None,
            gguf: Some(model),
            bf16_products: false,
        }
    }

    /// About how many bytes the loaded model holds for its weights: every tensor of the
    /// checkpoint in `dtype`, except the matrices `plan` quantizes, at their quantized size
    /// ([`QuantPlan::type_for`]), and the f16/bf16 matrices f32 compute reads in place
    /// ([`Weights::get_half`]) at 2 bytes a value. Only the safetensors headers (or the GGUF
    /// tensor table) are read. A GGUF tensor stored in a format the kernels run (q8_0, q4_K,
    /// q6_K) counts its stored bytes, q5_K its q8_0 size (it is requantized), the other types
    /// their elements in `dtype` (or the plan's size for a float matrix under `--quant`, or
    /// 2 bytes for an f16/bf16 matrix read in place).
    pub fn resident_bytes(&self, dtype: DType, plan: Option<&QuantPlan>) -> u64 {
        if let Some(g) = &self.gguf {
            return g
                .entries()
                .map(|(name, src)| gguf_resident(g, name, src, dtype, plan))
                .sum();
        }
        self.index
            .iter()
            .map(|(name, e)| {
                let numel: usize = e.shape.iter().product();
                let quant = match (plan, e.shape.as_slice()) {
                    (Some(p), [n, k]) => p.type_for(name, *k).map(|t| n * t.row_bytes(*k)),
                    _ => None,
                };
                // f32 compute reads 16-bit matrices in place (`get_half`): 2 bytes each.
                let in_place = dtype == DType::F32
                    && half_in_place()
                    && e.shape.len() == 2
                    && matches!(e.dtype, StDtype::F16 | StDtype::BF16);
                let size = if in_place { 2 } else { dtype.size_in_bytes() };
                quant.unwrap_or(numel * size) as u64
            })
            .sum()
    }

    /// The GGUF files, when the weights come from them.
    pub fn gguf(&self) -> Option<&GgufModel> {
        self.gguf.as_deref()
    }

    /// Whether the checkpoint has a vision tower (a GGUF text model without its `mmproj`
    /// has none).
    pub fn has_vision(&self) -> bool {
        self.gguf.as_ref().is_none_or(|g| g.has_vision())
    }

    /// Matrix `name` `(n, k)` as it is stored, when the checkpoint stores it quantized in a
    /// format the kernels run (a GGUF's q8_0, q4_K or q6_K): no float copy is made. `None`
    /// for float tensors (and for a stack of differently quantized parts, which [`Weights::get`]
    /// widens).
    pub fn stored_quant(&self, name: &str, n: usize, k: usize) -> Result<Option<QMatrix>> {
        let Some(model) = self.gguf.as_deref() else {
            return Ok(None);
        };
        let Some(src) = model.locate(name) else {
            return Ok(None);
        };
        let (part, names) = src.tensors();
        let Some(file) = model.file(part) else {
            return Ok(None);
        };
        let mut infos = Vec::with_capacity(names.len());
        for n in &names {
            infos.push(file.tensor_info(n)?);
        }
        let stored = infos[0].ggml_type();
        if infos.iter().any(|i| i.ggml_type() != stored) || matches!(src, Source::Frames(..)) {
            return Ok(None);
        }
        // Kept as stored, or (a type with no kernel) widened and requantized.
        let (t, requantize) = match (qtype_of(stored), requantized_to(stored)) {
            (Some(t), _) => (t, false),
            (None, Some(t)) => (t, true),
            (None, None) => return Ok(None),
        };
        let (Some(block), Some(size)) = (stored.block_size(), stored.type_size()) else {
            return Ok(None);
        };
        let rb = k / block as usize * size as usize;
        for &info in &infos {
            let ne = info.ne();
            if ne[0] as usize != k {
                return Err(Error::Weights(format!(
                    "tensor {} (for {name}) has rows of {} values, expected {k}",
                    info.name(),
                    ne[0]
                )));
            }
        }
        // One copy, straight into the matrix's (huge-page) buffer, in its layout.
        let rows = gguf_matrix_rows(file, &infos, src, name, &names, n, k, rb)?;
        let fail = |e: String| Error::Weights(format!("{name}: {e}"));
        let matrix = if requantize {
            use rayon::prelude::*;
            let each: Vec<&[u8]> = rows.iter().flat_map(|p| p.chunks_exact(rb)).collect();
            let mut values = vec![0f32; n * k];
            values
                .par_chunks_mut(k)
                .zip(each.par_iter())
                .try_for_each(|(o, b)| dequantize_widened(stored, b, o))
                .map_err(fail)?;
            QMatrix::quantize(t, &values, n, k)?
        } else {
            QMatrix::from_row_parts(t, n, k, &rows)?
        };
        for (info, rows) in infos.iter().zip(rows) {
            self.record(info.name(), rows.len() as u64);
            file.release(rows);
        }
        Ok(Some(matrix))
    }

    /// Matrix `name` `(n, k)` left where the checkpoint stores it, as 16-bit floats
    /// ([`HalfMatrix`]: no copy, no widening), when f32 compute on the CPU reads a matrix
    /// stored in f16 or bf16 (Qwen2-VL's safetensors, a GGUF's f16 projector). `None` when
    /// that does not apply (then [`Weights::get`] reads it, with its errors for a missing
    /// tensor or a wrong shape): another dtype or device, bf16 products, quantized or f32
    /// storage, the patch kernel's stacked frames, or `QWEN2VL_HALF_WEIGHTS=0`.
    ///
    /// Why: widening to f32 doubles the memory of these matrices and most of a load's time
    /// goes into the kernel zeroing the pages of the copy; the f32 products read the 16-bit
    /// values exactly ([`crate::ops::gemm_half`]).
    pub fn get_half(&self, name: &str, n: usize, k: usize) -> Result<Option<HalfMatrix>> {
        if !half_in_place()
            || self.dtype != DType::F32
            || !self.device.is_cpu()
            || self.bf16_products
        {
            return Ok(None);
        }
        let Some(model) = &self.gguf else {
            let Some(stored) = self.resolve(name) else {
                return Ok(None);
            };
            let entry = &self.index[&stored];
            let kind = match entry.dtype {
                StDtype::F16 => HalfKind::F16,
                StDtype::BF16 => HalfKind::Bf16,
                _ => return Ok(None),
            };
            if entry.shape != [n, k] {
                return Ok(None);
            }
            let (_, mmap) = &self.maps[entry.file];
            let bytes = &mmap[entry.bytes.clone()];
            let m = HalfMatrix::new(kind, k, &[bytes], mmap.clone())
                .map_err(|e| Error::Weights(format!("tensor {stored}: {e}")))?;
            self.record(&stored, bytes.len() as u64);
            return Ok(Some(m));
        };
        let Some(src) = model.locate(name) else {
            return Ok(None);
        };
        if matches!(src, Source::Frames(..)) {
            return Ok(None);
        }
        let (part, names) = src.tensors();
        let Some(file) = model.file(part) else {
            return Ok(None);
        };
        let mut infos = Vec::with_capacity(names.len());
        for t in &names {
            infos.push(file.tensor_info(t)?);
        }
        let kind = match infos[0].ggml_type() {
            GgmlType::F16 => HalfKind::F16,
            GgmlType::BF16 => HalfKind::Bf16,
            _ => return Ok(None),
        };
        for &info in &infos {
            if info.ggml_type() != infos[0].ggml_type() || info.ne()[0] as usize != k {
                return Ok(None);
            }
        }
        let rows = gguf_matrix_rows(file, &infos, src, name, &names, n, k, 2 * k)?;
        let m = HalfMatrix::new(kind, k, &rows, model.clone())
            .map_err(|e| Error::Weights(format!("{name}: {e}")))?;
        for info in infos {
            self.record(info.name(), file.bytes_of(info)?.len() as u64);
        }
        Ok(Some(m))
    }

    /// Notes that stored tensor `stored` (`bytes` long) was read, and reports progress.
    fn record(&self, stored: &str, bytes: u64) {
        if let Ok(mut used) = self.used.lock() {
            used.insert(stored.to_string());
        }
        if let Some(f) = &self.progress {
            if let Ok(mut done) = self.done.lock() {
                done.0 += bytes;
                done.1 += 1;
            }
            f(self.progress());
        }
    }

    /// One GGUF tensor in the compute dtype, in PyTorch order.
    fn gguf_tensor(&self, model: &GgufModel, part: Part, name: &str) -> Result<Tensor> {
        self.gguf_rows(model, part, name, None)
    }

    /// Rows `rows` of a GGUF tensor seen as `(elements / ne[0], ne[0])` (a 1-D tensor's
    /// rows are its elements), or all of it in its own shape: only those rows' bytes are
    /// read and converted (one expert of a stacked `ffn_*_exps`, not all of them).
    fn gguf_rows(
        &self,
        model: &GgufModel,
        part: Part,
        name: &str,
        rows: Option<&std::ops::Range<usize>>,
    ) -> Result<Tensor> {
        let file = model
            .file(part)
            .ok_or_else(|| Error::Weights(format!("no vision projector for tensor {name}")))?;
        let info = file.tensor_info(name)?;
        let whole = file.bytes_of(info)?;
        let (bytes, shape) = match rows {
            None => (whole, Shape::from(info.shape())),
            Some(r) => {
                let ne = info.ne();
                let (n, width) = if ne.len() == 1 {
                    (ne[0] as usize, 1)
                } else {
                    let k = ne[0] as usize;
                    ((info.n_elements() as usize) / k.max(1), k)
                };
                let row_bytes = whole.len() / n.max(1);
                if r.end > n || r.start > r.end || (ne.len() == 1 && row_bytes * n != whole.len()) {
                    return Err(Error::Weights(format!(
                        "GGUF tensor {name} has {n} rows of {width}; rows {r:?} were asked for"
                    )));
                }
                let shape = if ne.len() == 1 {
                    Shape::from(r.len())
                } else {
                    Shape::from((r.len(), width))
                };
                (&whole[r.start * row_bytes..r.end * row_bytes], shape)
            }
        };
        let fail = |e: String| Error::Weights(format!("GGUF tensor {name}: {e}"));
        let float = |d: StDtype| convert(d, bytes, &shape, self.dtype, &self.device).map_err(fail);
        let t = match info.ggml_type() {
            GgmlType::F32 => float(StDtype::F32)?,
            GgmlType::F16 => float(StDtype::F16)?,
            GgmlType::BF16 => float(StDtype::BF16)?,
            ty => {
                let k = info.ne()[0] as usize;
                let n = shape.elem_count() / k.max(1);
                let values = match qtype_of(ty) {
                    Some(q) => QMatrix::from_bytes(q, n, k, bytes)?.dequantize(),
                    None => {
                        // Rows on all threads (a q5_k_m file widens most of its matrices).
                        use rayon::prelude::*;
                        let row_bytes = bytes.len() / n.max(1);
                        let mut out = vec![0f32; n * k];
                        out.par_chunks_mut(k.max(1))
                            .zip(bytes.par_chunks(row_bytes.max(1)))
                            .try_for_each(|(o, b)| dequantize_widened(ty, b, o))
                            .map_err(fail)?;
                        out
                    }
                };
                Tensor::from_vec(values, shape.clone(), &self.device)?.to_dtype(self.dtype)?
            }
        };
        self.record(name, bytes.len() as u64);
        file.release(bytes);
        Ok(t)
    }

    /// [`Weights::get`] from the GGUF files.
    fn get_gguf(&self, model: &GgufModel, name: &str, shape: &Shape) -> Result<Tensor> {
        let src = model.locate(name).ok_or_else(|| {
            let wanted = match model.index_entry(name) {
                Some(s) => {
                    let (part, names) = s.tensors();
                    let file = match part {
                        Part::Text => "the text model",
                        Part::Vision if model.has_vision() => "the vision projector (mmproj)",
                        Part::Vision => {
                            return Error::Weights(format!(
                                "missing tensor {name}: this model was loaded without its vision projector (--mmproj)"
                            ))
                        }
                    };
                    format!(" (GGUF tensor {} in {file})", names.join(" + "))
                }
                None => String::new(),
            };
            Error::Weights(format!(
                "missing tensor {name}{wanted}, expected shape {shape:?}"
            ))
        })?;
        let t = match src {
            Source::One(p, n) => self.gguf_tensor(model, *p, n)?,
            Source::Rows(p, names) => {
                let parts = names
                    .iter()
                    .map(|n| self.gguf_tensor(model, *p, n))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)?
            }
            Source::RowSlice(p, n, r) => self.gguf_rows(model, *p, n, Some(r))?,
            Source::Frames(p, a, b) => {
                let (a, b) = (
                    self.gguf_tensor(model, *p, a)?,
                    self.gguf_tensor(model, *p, b)?,
                );
                if a.rank() != 4 || a.dims() != b.dims() {
                    return Err(Error::Weights(format!(
                        "the patch kernels for {name} have shapes {:?} and {:?}; expected two (embed, channels, patch, patch)",
                        a.dims(),
                        b.dims()
                    )));
                }
                Tensor::stack(&[a, b], 2)?
            }
        };
        // llama.cpp stores some `(1, n)` matrices as `[n]` (the MoE shared expert's gate).
        let t = if t.rank() == 1 && shape.dims() == [1, t.dim(0)?] {
            t.reshape(shape.dims())?
        } else {
            t
        };
        if t.dims() != shape.dims() {
            let (_, names) = src.tensors();
            return Err(Error::Weights(format!(
                "tensor {name} (GGUF {}) has shape {:?}, expected {:?}",
                names.join(" + "),
                t.dims(),
                shape.dims()
            )));
        }
        Ok(t)
    }

    /// Reports progress to `f` after every tensor read from now on.
    pub fn set_progress(&mut self, f: ProgressFn) {
        self.progress = Some(f);
    }

    /// Quantizes the matrices `plan` names as they load (see [`Weights::quant_for`]).
    pub fn set_quant(&mut self, plan: QuantPlan) {
        self.quant = Some(plan);
    }

    /// Packs the float matrices of linear layers to bf16 as they load
    /// ([`crate::ops::gemm_bf16::PackedBf16`]) while every other tensor stays in the compute
    /// dtype: `--dtype bf16` on the CPU (see [`crate::nn::Linear`]). Only for a CPU device.
    pub fn set_bf16_products(&mut self, on: bool) {
        self.bf16_products = on && self.device.is_cpu();
    }

    /// Whether linear layers' float matrices are packed to bf16 (see
    /// [`Weights::set_bf16_products`]).
    pub fn bf16_products(&self) -> bool {
        self.bf16_products
    }

    /// Reads matrix `name` `(n, k)` and rounds it to bf16, packed for
    /// [`crate::ops::gemm_bf16`]; the float copy is dropped before this returns.
    pub fn get_packed_bf16(&self, name: &str, n: usize, k: usize) -> Result<PackedBf16> {
        let w = self.get(name, (n, k))?;
        Self::pack_bf16(&w).map_err(|e| Error::Weights(format!("{name}: {e}")))
    }

    /// A matrix `(n, k)` already read, rounded to bf16 and packed.
    pub fn pack_bf16(w: &Tensor) -> Result<PackedBf16> {
        let (n, k) = w.dims2()?;
        let w = w.flatten_all()?;
        match w.dtype() {
            DType::BF16 => PackedBf16::from_bf16(&w.to_vec1::<half::bf16>()?, n, k),
            _ => PackedBf16::from_f32(&w.to_dtype(DType::F32)?.to_vec1::<f32>()?, n, k),
        }
    }

    /// The format matrix `name` with rows of `k` values is to be quantized to, if any.
    pub fn quant_for(&self, name: &str, k: usize) -> Option<QType> {
        self.quant.as_ref()?.type_for(name, k)
    }

    /// Reads matrix `name` `(n, k)` and quantizes it to `t` (rows on all threads); the float
    /// copy is dropped before this returns.
    pub fn get_quantized(&self, name: &str, n: usize, k: usize, t: QType) -> Result<QMatrix> {
        let w = self.get(name, (n, k))?.to_dtype(DType::F32)?;
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        drop(w);
        QMatrix::quantize(t, &values, n, k).map_err(|e| Error::Weights(format!("{name}: {e}")))
    }

    /// Where loading stands: everything read so far out of the whole checkpoint.
    pub fn progress(&self) -> LoadProgress {
        let (bytes, tensors) = self.done.lock().map(|d| *d).unwrap_or_default();
        let (bytes_total, count) = match &self.gguf {
            Some(g) => g.tensors().fold((0, 0), |(b, n), (_, t)| {
                (b + t.byte_len().unwrap_or(0), n + 1)
            }),
            None => (
                self.index.values().map(|e| e.bytes.len() as u64).sum(),
                self.index.len(),
            ),
        };
        LoadProgress {
            bytes_done: bytes.min(bytes_total),
            bytes_total,
            tensors_done: tensors.min(count),
            tensors_total: count,
        }
    }

    /// The compute dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// All tensor names in the checkpoint (the GGUF names for GGUF files).
    pub fn names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match &self.gguf {
            Some(g) => Box::new(g.tensors().map(|(_, t)| t.name())),
            None => Box::new(self.index.keys().map(|s| s.as_str())),
        }
    }

    /// Resolves an original-style name to the name stored in this checkpoint.
    fn resolve(&self, name: &str) -> Option<String> {
        if self.index.contains_key(name) {
            return Some(name.to_string());
        }
        let alt = if let Some(rest) = name.strip_prefix("visual.") {
            format!("model.visual.{rest}")
        } else if let Some(rest) = name.strip_prefix("model.") {
            format!("model.language_model.{rest}")
        } else {
            return None;
        };
        self.index.contains_key(&alt).then_some(alt)
    }

    /// Whether the checkpoint holds `name` (under either naming).
    pub fn contains(&self, name: &str) -> bool {
        match &self.gguf {
            Some(g) => g.locate(name).is_some(),
            None => self.resolve(name).is_some(),
        }
    }

    /// Reads tensor `name`, checks it has `shape`, and converts it to the compute dtype.
    ///
    /// A missing tensor or a different shape is an error naming the tensor and both shapes.
    pub fn get<S: Into<Shape>>(&self, name: &str, shape: S) -> Result<Tensor> {
        let shape: Shape = shape.into();
        if let Some(g) = &self.gguf {
            return self.get_gguf(g, name, &shape);
        }
        let stored = self.resolve(name).ok_or_else(|| {
            Error::Weights(format!("missing tensor {name} (expected shape {shape:?})"))
        })?;
        let entry = &self.index[&stored];
        let (_, mmap) = &self.maps[entry.file];
        if entry.shape != shape.dims() {
            return Err(Error::Weights(format!(
                "tensor {stored} has shape {:?}, expected {:?}",
                entry.shape,
                shape.dims()
            )));
        }
        let data = &mmap[entry.bytes.clone()];
        let t = convert(entry.dtype, data, &shape, self.dtype, &self.device)
            .map_err(|e| Error::Weights(format!("tensor {stored}: {e}")))?;
        release_pages(mmap, data);
        self.record(&stored, data.len() as u64);
        Ok(t)
    }

    /// Tensors in the checkpoint that were never read, sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        let mut v: Vec<String> = self
            .names()
            .filter(|k| !used.contains(*k))
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }
}

/// The bytes Hugging Face tensor `name` (held at `src`) takes once loaded; see
/// [`Weights::resident_bytes`].
/// The bytes of matrix `name` (`n` rows of `k` values, `row_bytes` each) in GGUF tensors
/// `infos` of `file` (named `names`), as `src` takes them: each tensor whole, in order (a
/// stacked `qkv`), or a range of rows of one (q, k or v of a fused `attn_qkv`). An error
/// naming the tensors when they do not hold exactly `n` rows.
#[allow(clippy::too_many_arguments)]
fn gguf_matrix_rows<'a>(
    file: &'a GgufFile,
    infos: &[&TensorInfo],
    src: &Source,
    name: &str,
    names: &[&str],
    n: usize,
    k: usize,
    row_bytes: usize,
) -> Result<Vec<&'a [u8]>> {
    let mut rows = Vec::with_capacity(infos.len());
    for &info in infos {
        let bytes = file.bytes_of(info)?;
        rows.push(match src {
            Source::RowSlice(_, _, r) => bytes
                .get(r.start * row_bytes..r.end * row_bytes)
                .ok_or_else(|| {
                    Error::Weights(format!(
                        "tensor {} has no rows {r:?} for {name}",
                        info.name()
                    ))
                })?,
            _ => bytes,
        });
    }
    let total: usize = rows.iter().map(|r| r.len()).sum();
    if total != n * row_bytes {
        return Err(Error::Weights(format!(
            "tensor {name} ({}) holds {} rows of {k}, expected {n}",
            names.join(" + "),
            total / row_bytes.max(1)
        )));
    }
    Ok(rows)
}

fn gguf_resident(
    model: &GgufModel,
    name: &str,
    src: &Source,
    dtype: DType,
    plan: Option<&QuantPlan>,
) -> u64 {
    let (part, names) = src.tensors();
    let Some(file) = model.file(part) else {
        return 0;
    };
    let infos: Vec<_> = names.iter().filter_map(|n| file.tensor(n)).collect();
    let Some(&first) = infos.first() else {
        return 0;
    };
    let k = first.ne()[0].max(1);
    let (elements, stored): (u64, u64) = match src {
        Source::RowSlice(_, _, r) => {
            let (rows, width) = if first.ne().len() == 1 {
                (first.ne()[0], 1)
            } else {
                (first.n_elements() / k, k)
            };
            let bytes = first.byte_len().unwrap_or(0);
            let part = r.len() as u64;
            (part * width, bytes / rows.max(1) * part)
        }
        _ => infos.iter().fold((0, 0), |(e, b), i| {
            (e + i.n_elements(), b + i.byte_len().unwrap_or(0))
        }),
    };
    let float = elements * dtype.size_in_bytes() as u64;
    let t = first.ggml_type();
    let matrix = first.ne().len() >= 2 && !matches!(src, Source::Frames(..));
    if qtype_of(t).is_some() {
        stored
    } else if let Some(q) = requantized_to(t) {
        elements / k * q.row_bytes(k as usize) as u64
    } else if matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) && matrix {
        match plan.and_then(|p| p.type_for(name, k as usize)) {
            Some(q) => elements / k * q.row_bytes(k as usize) as u64,
            // f32 compute reads 16-bit matrices in place (`Weights::get_half`).
            None if dtype == DType::F32
                && half_in_place()
                && matches!(t, GgmlType::F16 | GgmlType::BF16) =>
            {
                elements * 2
            }
            None => float,
        }
    } else {
        float
    }
}

/// `n` little-endian f16 values widened to f32 on all threads, eight at a time with F16C
/// where the CPU has it (`half`'s slice conversion; the per-value conversion checks the CPU
/// on every call and was a third of loading an f16 vision projector).
fn f16_to_f32(bytes: &[u8], n: usize) -> std::result::Result<Vec<f32>, String> {
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    // SAFETY: `f16` is a transparent u16, valid for every bit pattern; `align_to` returns
    // only the correctly aligned middle.
    let (head, values, tail) = unsafe { bytes.align_to::<half::f16>() };
    if !head.is_empty() || !tail.is_empty() || cfg!(target_endian = "big") {
        return par_decode(bytes, n, 2, |c| half::f16::from_bits(le16(c)).to_f32());
    }
    if values.len() != n {
        return Err(format!("{} bytes for {n} elements of 2 bytes", bytes.len()));
    }
    let mut out = vec![0f32; n];
    out.par_chunks_mut(1 << 16)
        .zip(values.par_chunks(1 << 16))
        .for_each(|(o, v)| v.convert_to_f32_slice(o));
    Ok(out)
}

/// Converts raw little-endian safetensors bytes to a tensor of `dtype` in one pass.
fn convert(
    src: StDtype,
    bytes: &[u8],
    shape: &Shape,
    dtype: DType,
    device: &Device,
) -> std::result::Result<Tensor, String> {
    use half::{bf16, f16};
    let n = shape.elem_count();
    let t = match (src, dtype) {
        (StDtype::F32, DType::F32) => Tensor::from_vec(
            par_decode(bytes, n, 4, |c| {
                f32::from_le_bytes([c[0], c[1], c[2], c[3]])
            })?,
            shape.clone(),
            device,
        ),
        (StDtype::BF16, DType::F32) => Tensor::from_vec(
            par_decode(bytes, n, 2, |c| bf16::from_bits(le16(c)).to_f32())?,
            shape.clone(),
            device,
        ),
        (StDtype::F16, DType::F32) => {
            Tensor::from_vec(f16_to_f32(bytes, n)?, shape.clone(), device)
        }
        (StDtype::BF16, DType::BF16) => Tensor::from_vec(
            par_decode(bytes, n, 2, |c| bf16::from_bits(le16(c)))?,
            shape.clone(),
            device,
        ),
        (StDtype::F16, DType::F16) => Tensor::from_vec(
            par_decode(bytes, n, 2, |c| f16::from_bits(le16(c)))?,
            shape.clone(),
            device,
        ),
        (StDtype::F32 | StDtype::BF16 | StDtype::F16, _) => {
            // Rare combinations (e.g. an f32 checkpoint computed in f16): widen, then narrow.
            let wide = convert(src, bytes, shape, DType::F32, device)?;
            wide.to_dtype(dtype)
        }
        (other, _) => {
            return Err(format!(
                "unsupported dtype {other:?} (allowed: F32, BF16, F16)"
            ))
        }
    };
    t.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Progress rises with every tensor read and ends at the checkpoint's totals.
    #[test]
    fn progress_counts_every_tensor_up_to_the_total() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-qwen2vl");
        let mut w = Weights::from_dir(&dir, DType::F32, &Device::Cpu).unwrap();
        let seen: Arc<Mutex<Vec<LoadProgress>>> = Arc::default();
        let sink = seen.clone();
        w.set_progress(Arc::new(move |p| sink.lock().unwrap().push(p)));
        let mut names: Vec<(String, Vec<usize>)> = w
            .index
            .iter()
            .map(|(n, e)| (n.clone(), e.shape.clone()))
            .collect();
        names.sort();
        for (name, shape) in &names {
            w.get(name, shape.as_slice()).unwrap();
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), names.len());
        let total: u64 = std::fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .len();
        let last = *seen.last().unwrap();
        assert_eq!(last.tensors_done, last.tensors_total);
        assert_eq!(last.bytes_done, last.bytes_total);
        // The tensor data is the whole file but its JSON header.
        assert!(last.bytes_total > total * 9 / 10 && last.bytes_total < total);
        assert!(seen.windows(2).all(
            |p| p[1].bytes_done > p[0].bytes_done && p[1].tensors_done == p[0].tensors_done + 1
        ));
    }
}

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

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, Result};
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
    maps: Vec<(PathBuf, Mmap)>,
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
            maps.push((path.clone(), mmap));
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
        })
    }

    /// Reports progress to `f` after every tensor read from now on.
    pub fn set_progress(&mut self, f: ProgressFn) {
        self.progress = Some(f);
    }

    /// Quantizes the matrices `plan` names as they load (see [`Weights::quant_for`]).
    pub fn set_quant(&mut self, plan: QuantPlan) {
        self.quant = Some(plan);
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
        let bytes_total = self.index.values().map(|e| e.bytes.len() as u64).sum();
        LoadProgress {
            bytes_done: bytes.min(bytes_total),
            bytes_total,
            tensors_done: tensors.min(self.index.len()),
            tensors_total: self.index.len(),
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

    /// All tensor names in the checkpoint.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
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
        self.resolve(name).is_some()
    }

    /// Reads tensor `name`, checks it has `shape`, and converts it to the compute dtype.
    ///
    /// A missing tensor or a different shape is an error naming the tensor and both shapes.
    pub fn get<S: Into<Shape>>(&self, name: &str, shape: S) -> Result<Tensor> {
        let shape: Shape = shape.into();
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
        if let Ok(mut used) = self.used.lock() {
            used.insert(stored);
        }
        if let Some(f) = &self.progress {
            if let Ok(mut done) = self.done.lock() {
                done.0 += data.len() as u64;
                done.1 += 1;
            }
            f(self.progress());
        }
        Ok(t)
    }

    /// Tensors in the checkpoint that were never read, sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        let mut v: Vec<String> = self
            .index
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// Drops the mapped file pages of `data` (a slice of `mmap`) from this process's resident
/// set once the tensor has been copied out, so loading never holds a checkpoint twice (the
/// file pages plus the converted copy). Pages shared with a neighbouring tensor are kept.
fn release_pages(mmap: &Mmap, data: &[u8]) {
    #[cfg(unix)]
    {
        const PAGE: usize = 4096;
        let start = data.as_ptr() as usize - mmap.as_ptr() as usize;
        let end = start + data.len();
        let (a, b) = (start.div_ceil(PAGE) * PAGE, end / PAGE * PAGE);
        if b > a {
            // SAFETY: the map is a read-only private file mapping; after MADV_DONTNEED a later
            // read faults the same bytes back in from the file, so no reader sees a change.
            let _ = unsafe {
                mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a)
            };
        }
    }
}

/// Elements converted per parallel task.
const CONVERT_CHUNK: usize = 1 << 16;

/// Decodes little-endian elements of `size` bytes into `T`s on all cores.
fn par_decode<T: Send + Copy + Default>(
    bytes: &[u8],
    n: usize,
    size: usize,
    f: impl Fn(&[u8]) -> T + Sync,
) -> std::result::Result<Vec<T>, String> {
    use rayon::prelude::*;
    if bytes.len() != n * size {
        return Err(format!(
            "{} bytes for {n} elements of {size} bytes",
            bytes.len()
        ));
    }
    // `vec!` of zeros maps fresh pages lazily; each task faults in and fills its own chunk.
    let mut out = vec![T::default(); n];
    out.par_chunks_mut(CONVERT_CHUNK)
        .zip(bytes.par_chunks(CONVERT_CHUNK * size))
        .for_each(|(o, b)| {
            for (x, c) in o.iter_mut().zip(b.chunks_exact(size)) {
                *x = f(c);
            }
        });
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
    let le16 = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]);
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
        (StDtype::F16, DType::F32) => Tensor::from_vec(
            par_decode(bytes, n, 2, |c| f16::from_bits(le16(c)).to_f32())?,
            shape.clone(),
            device,
        ),
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

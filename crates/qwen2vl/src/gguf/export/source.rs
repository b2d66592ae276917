//! The safetensors files of a model directory, memory-mapped and read one tensor at a time
//! as f32, for the exporter.
//!
//! This is a reader of its own rather than [`crate::weights::Weights`] because `weights`
//! serves GGUF files through this module's parent (`gguf` stays below `weights` in the
//! module graph). It finds the files the same way (`model.safetensors.index.json`'s shards,
//! else `model.safetensors`, else every `*.safetensors`) and widens bf16/f16 exactly as the
//! loader does, so the exporter quantizes the very values `--quant` quantizes at load.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::mapped::{le16, par_decode, release_pages};

/// Where one tensor lies.
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Range<usize>,
}

/// The mapped safetensors files of a model, indexed by tensor name.
pub(super) struct SafetensorsDir {
    maps: Vec<(PathBuf, Mmap)>,
    index: HashMap<String, Entry>,
}

impl SafetensorsDir {
    /// Maps the safetensors files of the model in `dir`.
    pub(super) fn open(dir: &Path) -> Result<SafetensorsDir> {
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in weight_files(dir)?.into_iter().enumerate() {
            let bad =
                |e: &dyn std::fmt::Display| Error::Weights(format!("{}: {e}", path.display()));
            let file = File::open(&path).map_err(|e| bad(&e))?;
            // SAFETY: the file is opened read-only; like every mmap-based loader we rely on
            // nobody truncating a checkpoint while it is read.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| bad(&e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| bad(&e))?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - base;
                let entry = Entry {
                    file: i,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: start..start + view.data().len(),
                };
                index.insert(name, entry);
            }
            maps.push((path, mmap));
        }
        Ok(SafetensorsDir { maps, index })
    }

    /// The stored tensor names.
    pub(super) fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The PyTorch-order shape of stored tensor `name`.
    pub(super) fn shape(&self, name: &str) -> Option<&[usize]> {
        self.index.get(name).map(|e| e.shape.as_slice())
    }

    /// Stored tensor `name` widened to f32 (rows on all threads); its mapped pages are
    /// released once copied, so reading a checkpoint never holds it twice.
    pub(super) fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self
            .index
            .get(name)
            .ok_or_else(|| Error::Weights(format!("missing tensor {name}")))?;
        let (path, mmap) = &self.maps[e.file];
        let data = &mmap[e.bytes.clone()];
        let n: usize = e.shape.iter().product();
        let values = match e.dtype {
            Dtype::F32 => par_decode(data, n, 4, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            Dtype::BF16 => par_decode(data, n, 2, |c| half::bf16::from_bits(le16(c)).to_f32()),
            Dtype::F16 => par_decode(data, n, 2, |c| half::f16::from_bits(le16(c)).to_f32()),
            other => Err(format!("dtype {other:?}; allowed: F32, BF16, F16")),
        }
        .map_err(|m| Error::Weights(format!("{}: tensor {name}: {m}", path.display())))?;
        release_pages(mmap, data);
        Ok(values)
    }
}

/// The safetensors files of the model in `dir` (see the module docs).
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index_path = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index_path.is_file() {
        let json: Json =
            serde_json::from_str(&std::fs::read_to_string(&index_path)?).map_err(|e| {
                Error::Config {
                    file: index_path.clone(),
                    message: e.to_string(),
                }
            })?;
        let map = json["weight_map"]
            .as_object()
            .ok_or_else(|| Error::Config {
                file: index_path.clone(),
                message: "no \"weight_map\" object".into(),
            })?;
        let mut shards: Vec<&str> = map.values().filter_map(Json::as_str).collect();
        shards.sort_unstable();
        shards.dedup();
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else if dir.join("model.safetensors").is_file() {
        vec![dir.join("model.safetensors")]
    } else {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        v.sort();
        v
    };
    if files.is_empty() {
        return Err(Error::Model {
            what: "no weights found (expected model.safetensors or model.safetensors.index.json)"
                .into(),
            path: dir.to_path_buf(),
        });
    }
    Ok(files)
}

//! The two towers joined (mirrors `Qwen2VLForConditionalGeneration`, transformers 4.49):
//! vision rows are scattered at the pad tokens, the decoder runs prefill and decode steps,
//! and logits come out for the last position of each sequence.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::config::Qwen2VLConfig;
use crate::encoder_cache::{CacheKey, KeyBuilder};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::ops::quant::plan::{QuantPlan, QuantScheme};
use crate::rope::{self, MropePositions, VisionTokens};
use crate::text::TextModel;
use crate::vision::VisionTransformer;
use crate::weights::Weights;

mod prefill;
pub use prefill::PrefillJob;

/// One vision-tower pass: its grids (whole frames) and its range of the pixel values.
pub(crate) type VisionChunk = (Vec<[usize; 3]>, std::ops::Range<usize>);

/// One image or video for the vision tower: its grid `(t, h, w)` in patches, its range of the
/// pixel values (`t*h*w*patch_dim` values) and its passes, in order.
#[derive(Debug, Clone)]
pub(crate) struct VisionItem {
    pub grid: [usize; 3],
    pub rows: std::ops::Range<usize>,
    pub passes: Vec<VisionChunk>,
}

/// Patches per vision-tower pass (whole frames; a single larger frame is encoded alone).
pub const VISION_CHUNK_PATCHES: usize = 16 * 1024;

/// Splits grids into runs of whole frames of at most `max_patches` patches each (a frame
/// larger than that is a run of its own), preserving order: a video grid `(t, h, w)` may be
/// cut into `(t1, h, w), (t2, h, w)`.
pub fn frame_chunks(grids: &[[usize; 3]], max_patches: usize) -> Vec<Vec<[usize; 3]>> {
    let mut chunks = Vec::new();
    let mut current: Vec<[usize; 3]> = Vec::new();
    let mut used = 0;
    for &[t, h, w] in grids {
        let frame = h * w;
        let mut left = t;
        while left > 0 {
            let room = max_patches.saturating_sub(used) / frame.max(1);
            if room == 0 && used > 0 {
                chunks.push(std::mem::take(&mut current));
                used = 0;
                continue;
            }
            let take = room.clamp(1, left);
            current.push([take, h, w]);
            used += take * frame;
            left -= take;
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// Fails with a message saying what a model directory should hold when `dir` is not one.
pub fn check_model_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    Err(Error::Model {
        what: "model directory not found (expected a Hugging Face-format directory with config.json, *.safetensors and tokenizer.json)".into(),
        path: dir.to_path_buf(),
    })
}

/// The error for images or videos given to a model loaded without its vision tower.
pub fn no_vision() -> Error {
    Error::bad_input(
        "this model was loaded without its vision projector (--mmproj), so it cannot read images or videos",
        "text-only messages, or load the model with --mmproj",
    )
}

pub use crate::architecture::text_model_vision;

/// What loading reported.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Checkpoint tensors the model did not use.
    pub unused: Vec<String>,
    /// Seconds spent reading and converting weights.
    pub seconds: f64,
}

/// A loaded Qwen2-VL model.
#[derive(Debug, Clone)]
pub struct Qwen2VL {
    config: Qwen2VLConfig,
    /// `None` for a GGUF text model loaded without its vision projector.
    vision: Option<VisionTransformer>,
    text: TextModel,
    device: Device,
    dtype: DType,
    /// Names this load of the model in the encoder cache's keys (see [`Self::identity`]).
    identity: CacheKey,
}

/// Loads so far in this process: each load gets its own number in its identity.
static LOADS: AtomicU64 = AtomicU64::new(0);

/// The identity of a model being built from `config` in `dtype`: a digest of its vision
/// config, its dtype and a number no other load in this process has.
fn new_identity(config: &Qwen2VLConfig, dtype: DType) -> CacheKey {
    let mut k = KeyBuilder::new("qwen2vl/model-identity/v1");
    k.bytes(format!("{:?}", config.vision).as_bytes())
        .bytes(dtype.as_str().as_bytes())
        .u64(LOADS.fetch_add(1, Ordering::Relaxed));
    k.finish()
}

/// The dtype activations and the non-matrix weights load in for a requested `dtype`, and
/// whether the linear layers' matrices are packed to bf16.
///
/// bf16 on the CPU is bf16 *compute*: the products' inputs rounded to bf16 and multiplied
/// with AVX512_BF16 (or its fallbacks, [`crate::ops::gemm_bf16`]), everything else in f32
/// (see [`crate::nn::Bf16Linear`] for why); the model's [`Qwen2VL::dtype`] is then f32.
/// On another device bf16 stays bf16 tensors throughout.
fn compute_dtype(dtype: DType, device: &Device) -> (DType, bool) {
    if dtype == DType::BF16 && device.is_cpu() {
        (DType::F32, true)
    } else {
        (dtype, false)
    }
}

impl Qwen2VL {
    /// Loads `config.json` and the weights from a Hugging Face–format directory.
    ///
    /// `dtype` bf16 on the CPU loads the linear layers' matrices packed to bf16 and computes
    /// everything else in f32 (see [`compute_dtype`]); other dtypes load every float tensor
    /// in `dtype`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<(Self, LoadReport)> {
        Self::load_with_progress(dir, dtype, device, None)
    }

    /// [`Qwen2VL::load`], calling `progress` after every tensor read and once at the end
    /// (with everything done).
    pub fn load_with_progress(
        dir: &Path,
        dtype: DType,
        device: &Device,
        progress: Option<crate::weights::ProgressFn>,
    ) -> Result<(Self, LoadReport)> {
        Self::load_quantized(dir, dtype, device, progress, None, None)
    }

    /// [`Qwen2VL::load_with_progress`], quantizing the decoder's matrices (and embeddings)
    /// to `text` and the vision tower's to `vision` as they load (see
    /// [`crate::ops::quant::plan`]); `None` keeps them in `dtype`.
    pub fn load_quantized(
        dir: &Path,
        dtype: DType,
        device: &Device,
        progress: Option<crate::weights::ProgressFn>,
        text: Option<QuantScheme>,
        vision: Option<QuantScheme>,
    ) -> Result<(Self, LoadReport)> {
        check_model_dir(dir)?;
        let start = Instant::now();
        let config = Qwen2VLConfig::from_file(&dir.join("config.json"))?;
        let (compute, bf16) = compute_dtype(dtype, device);
        let mut weights = Weights::from_dir(dir, compute, device)?;
        weights.set_bf16_products(bf16);
        if device.is_cpu() {
            let plan = QuantPlan {
                text,
                vision,
                layers: config.text.num_hidden_layers,
            };
            // The requested dtype: bf16 compute keeps its matrices in bf16.
            let needed = weights.resident_bytes(dtype, Some(&plan));
            crate::memory::check_fits(
                needed,
                &format!(
                    "the {} model in {}",
                    config.architecture.name(),
                    dir.display()
                ),
            )?;
        }
        Self::load_weights(config, weights, start, progress, text, vision)
    }

    /// Loads llama.cpp's GGUF files of a Qwen2-VL model (see [`crate::gguf::model`]): the
    /// text model and, for images and videos, its vision projector. The tensors stored
    /// quantized stay so; `text`/`vision` quantize the float ones as they load, and are
    /// refused for a file that is already quantized.
    pub fn load_gguf(
        model: std::sync::Arc<crate::gguf::model::GgufModel>,
        dtype: DType,
        device: &Device,
        progress: Option<crate::weights::ProgressFn>,
        text: Option<QuantScheme>,
        vision: Option<QuantScheme>,
    ) -> Result<(Self, LoadReport)> {
        let start = Instant::now();
        use crate::gguf::model::Part;
        for (flag, scheme, part) in [
            ("--quant", text, Part::Text),
            ("--vision-quant", vision, Part::Vision),
        ] {
            let Some(q) = scheme else { continue };
            if let Some((name, t)) = model.first_quantized(Some(part)) {
                return Err(Error::bad_input(
                    format!(
                        "{flag} {q} was given for a GGUF file that is already quantized (tensor {name} is {t})"
                    ),
                    format!("{flag} with a float (f32/f16/bf16) GGUF or a safetensors checkpoint; a quantized GGUF runs as it is stored"),
                ));
            }
        }
        if !device.is_cpu() {
            if let Some((name, t)) = model.first_quantized(None) {
                return Err(Error::bad_input(
                    format!("tensor {name} is {t}; quantized weights run on the CPU only"),
                    "a float GGUF on the GPU, or the CPU",
                ));
            }
        }
        let config = model.config().clone();
        let (compute, bf16) = compute_dtype(dtype, device);
        let what = model.text_origin().to_string();
        let mut weights = Weights::from_gguf(model, compute, device);
        weights.set_bf16_products(bf16);
        if device.is_cpu() {
            let plan = QuantPlan {
                text,
                vision,
                layers: config.text.num_hidden_layers,
            };
            let needed = weights.resident_bytes(dtype, Some(&plan));
            crate::memory::check_fits(
                needed,
                &format!("the {} model in {what}", config.architecture.name()),
            )?;
        }
        Self::load_weights(config, weights, start, progress, text, vision)
    }

    fn load_weights(
        config: Qwen2VLConfig,
        mut weights: Weights,
        start: Instant,
        progress: Option<crate::weights::ProgressFn>,
        text: Option<QuantScheme>,
        vision: Option<QuantScheme>,
    ) -> Result<(Self, LoadReport)> {
        let device = weights.device().clone();
        if let Some(f) = &progress {
            weights.set_progress(f.clone());
        }
        if text.is_some() || vision.is_some() {
            if !device.is_cpu() {
                return Err(Error::bad_input(
                    "quantized weights run on the CPU only",
                    "--quant without a GPU device, or float weights on the GPU",
                ));
            }
            weights.set_quant(QuantPlan {
                text,
                vision,
                layers: config.text.num_hidden_layers,
            });
        }
        let model = Self::from_weights(&config, &weights)?;
        if let Some(f) = &progress {
            let p = weights.progress();
            f(crate::weights::LoadProgress {
                bytes_done: p.bytes_total,
                tensors_done: p.tensors_total,
                ..p
            });
        }
        let unused = weights.unused();
        if !unused.is_empty() {
            tracing::warn!(count = unused.len(), first = %unused[0], "unused tensors in the checkpoint");
        }
        Ok((
            model,
            LoadReport {
                unused,
                seconds: start.elapsed().as_secs_f64(),
            },
        ))
    }

    /// Builds the model from already-mapped weights.
    pub fn from_weights(config: &Qwen2VLConfig, w: &Weights) -> Result<Self> {
        if !config.architecture.has_vision() {
            // A text checkpoint (`Qwen2ForCausalLM`): the decoder alone, same weight names.
            return Ok(Qwen2VL {
                config: config.clone(),
                vision: None,
                text: TextModel::load(w, &config.text)?,
                device: w.device().clone(),
                dtype: w.dtype(),
                identity: new_identity(config, w.dtype()),
            });
        }
        if config.vision.hidden_size != config.text.hidden_size {
            return Err(Error::Weights(format!(
                "vision_config.hidden_size {} differs from the text hidden_size {}",
                config.vision.hidden_size, config.text.hidden_size
            )));
        }
        let vision = if w.has_vision() {
            Some(VisionTransformer::load(w, &config.vision)?)
        } else {
            None
        };
        Ok(Qwen2VL {
            config: config.clone(),
            vision,
            text: TextModel::load(w, &config.text)?,
            device: w.device().clone(),
            dtype: w.dtype(),
            identity: new_identity(config, w.dtype()),
        })
    }

    /// What names this model in the encoder cache's keys
    /// ([`crate::encoder_cache::embeddings_key`]): a digest of its vision config, its dtype
    /// and a number unique to this load in the process, so two models (or two loads of one
    /// checkpoint, perhaps quantized differently) sharing a cache never share an entry.
    /// Clones share it: they hold the same weights. (Naming the weights by their contents
    /// would mean hashing gigabytes at every load.)
    pub fn identity(&self) -> &CacheKey {
        &self.identity
    }

    /// The model's config.
    pub fn config(&self) -> &Qwen2VLConfig {
        &self.config
    }

    /// Compute dtype of the activations (f32 for a bf16-compute load on the CPU, whose
    /// products alone run in bf16).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The decoder.
    pub fn text(&self) -> &TextModel {
        &self.text
    }

    /// The vision tower, or an error when the model was loaded without one (a GGUF text
    /// model without `--mmproj`).
    pub fn vision(&self) -> Result<&VisionTransformer> {
        self.vision.as_ref().ok_or_else(|| self.no_vision_error())
    }

    /// Why this model cannot read images or videos: a text architecture has no vision tower;
    /// a GGUF Qwen2-VL was loaded without its projector.
    pub fn no_vision_error(&self) -> Error {
        if self.config.architecture.has_vision() {
            no_vision()
        } else {
            text_model_vision("an image or video", self.config.architecture)
        }
    }

    /// Whether the model has its vision tower.
    pub fn has_vision(&self) -> bool {
        self.vision.is_some()
    }

    /// Pad-token ids used for M-RoPE and scattering.
    pub fn vision_tokens(&self) -> VisionTokens {
        VisionTokens {
            image_pad: self.config.image_token_id,
            video_pad: self.config.video_token_id,
        }
    }

    /// A fresh KV cache for `capacity` tokens.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        self.text.new_cache(capacity)
    }

    /// Runs the vision tower: `pixel_values` row-major `(n_patches, patch_dim)` for `grids`
    /// → `(n_patches / merge², hidden)`.
    ///
    /// Each image or video is encoded on its own (see `vision_items`), so its rows
    /// are the same bits whatever came with it. Frames never attend to each other, so an item
    /// is encoded in chunks of whole frames of at most [`VISION_CHUNK_PATCHES`] patches each
    /// (one frame may exceed it): a long video's activations are bounded by the chunk, not by
    /// its length.
    pub fn encode_vision(&self, pixel_values: &[f32], grids: &[[usize; 3]]) -> Result<Tensor> {
        self.encode_vision_chunked(pixel_values, grids, VISION_CHUNK_PATCHES)
    }

    /// [`Qwen2VL::encode_vision`] with an explicit chunk size (in patches).
    pub fn encode_vision_chunked(
        &self,
        pixel_values: &[f32],
        grids: &[[usize; 3]],
        max_chunk_patches: usize,
    ) -> Result<Tensor> {
        crate::ops::pool::install(|| {
            self.encode_vision_on_pool(pixel_values, grids, max_chunk_patches)
        })
    }

    /// The body of [`Self::encode_vision_chunked`], on a compute-pool worker.
    fn encode_vision_on_pool(
        &self,
        pixel_values: &[f32],
        grids: &[[usize; 3]],
        max_chunk_patches: usize,
    ) -> Result<Tensor> {
        let mut outs = Vec::new();
        for item in self.vision_items(pixel_values, grids, max_chunk_patches)? {
            for (chunk, rows) in item.passes {
                let pv = self.patch_tensor(&pixel_values[rows])?;
                outs.push(self.vision()?.forward(&pv, &chunk)?);
            }
        }
        match outs.len() {
            0 => Err(Error::bad_input(
                "no images or video frames to encode",
                "at least one grid",
            )),
            1 => Ok(outs.pop().expect("one chunk")),
            _ => Ok(Tensor::cat(&outs, 0)?),
        }
    }

    /// Checks `pixel_values` against `grids` and cuts each image or video into tower passes
    /// of whole frames of its own ([`frame_chunks`] of its grid alone).
    ///
    /// Items never share a pass, so an item's embeddings do not depend on which other items
    /// came with it: with fewer than [`crate::vision::MIN_CHUNK_ROWS`] rows a product takes
    /// other kernels, so a small image packed with others would get other bits than alone,
    /// and the encoder cache could not hand its rows to another request.
    pub(crate) fn vision_items(
        &self,
        pixel_values: &[f32],
        grids: &[[usize; 3]],
        max_chunk_patches: usize,
    ) -> Result<Vec<VisionItem>> {
        if !grids.is_empty() && self.vision.is_none() {
            return Err(self.no_vision_error());
        }
        let dim = self.config.vision.patch_dim();
        if !pixel_values.len().is_multiple_of(dim) {
            return Err(Error::bad_input(
                format!("pixel_values has {} values", pixel_values.len()),
                format!("a multiple of {dim} (one row per patch)"),
            ));
        }
        if let Some(g) = grids.iter().find(|g| g.contains(&0)) {
            return Err(Error::bad_input(
                format!("grid {g:?} has no patches"),
                "grids (t, h, w) of at least one patch each way",
            ));
        }
        let total: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        if pixel_values.len() / dim != total {
            return Err(Error::bad_input(
                format!(
                    "pixel_values has {} patches but the grids need {total}",
                    pixel_values.len() / dim
                ),
                "one row per patch of every grid",
            ));
        }
        let mut start = 0;
        let mut items = Vec::with_capacity(grids.len());
        for &grid in grids {
            let item_start = start;
            let passes = frame_chunks(&[grid], max_chunk_patches)
                .into_iter()
                .map(|chunk| {
                    let n: usize = chunk.iter().map(|g| g[0] * g[1] * g[2]).sum();
                    let rows = start * dim..(start + n) * dim;
                    start += n;
                    (chunk, rows)
                })
                .collect();
            items.push(VisionItem {
                grid,
                rows: item_start * dim..start * dim,
                passes,
            });
        }
        Ok(items)
    }

    /// Patch rows `(n, patch_dim)` in the model's dtype and device.
    pub(crate) fn patch_tensor(&self, rows: &[f32]) -> Result<Tensor> {
        let dim = self.config.vision.patch_dim();
        Ok(
            Tensor::from_slice(rows, (rows.len() / dim, dim), &self.device)?
                .to_dtype(self.dtype)?,
        )
    }

    /// M-RoPE ids of a prompt (see [`rope::mrope_position_ids`]); a Qwen2.5-VL video whose
    /// seconds per temporal patch are not given takes 1.0 (see
    /// [`Qwen2VL::position_ids_timed`]).
    pub fn position_ids(
        &self,
        input_ids: &[u32],
        image_grids: &[[usize; 3]],
        video_grids: &[[usize; 3]],
    ) -> Result<MropePositions> {
        self.position_ids_timed(input_ids, image_grids, video_grids, &[])
    }

    /// M-RoPE ids of a prompt whose videos span `second_per_grid_ts` seconds per temporal
    /// patch (the processor's `second_per_grid_ts`): Qwen2.5-VL places video frames in
    /// absolute time ([`rope::mrope_position_ids_timed`]); Qwen2-VL ignores them.
    pub fn position_ids_timed(
        &self,
        input_ids: &[u32],
        image_grids: &[[usize; 3]],
        video_grids: &[[usize; 3]],
        second_per_grid_ts: &[f32],
    ) -> Result<MropePositions> {
        let times = self.config.video_times(second_per_grid_ts);
        rope::mrope_position_ids_timed(
            input_ids,
            self.vision_tokens(),
            image_grids,
            video_grids,
            self.config.vision.spatial_merge_size,
            times.as_ref(),
        )
    }

    /// Token embeddings with vision rows in place of the pad tokens: `(n, hidden)`.
    ///
    /// `image_embeds` go to the `<|image_pad|>` positions in order and `video_embeds` to the
    /// `<|video_pad|>` ones (the reference's two `masked_scatter`s); counts must match exactly.
    pub fn embed_prompt(
        &self,
        input_ids: &[u32],
        image_embeds: Option<&Tensor>,
        video_embeds: Option<&Tensor>,
    ) -> Result<Tensor> {
        let text = self.text.embed(input_ids)?;
        let n = input_ids.len();
        let ni = image_embeds.map(|t| t.dim(0)).transpose()?.unwrap_or(0);
        let nv = video_embeds.map(|t| t.dim(0)).transpose()?.unwrap_or(0);
        let (img, vid) = (self.config.image_token_id, self.config.video_token_id);
        let pads_i = input_ids.iter().filter(|&&t| t == img).count();
        let pads_v = input_ids.iter().filter(|&&t| t == vid).count();
        if pads_i != ni || pads_v != nv {
            return Err(Error::bad_input(
                format!(
                    "the prompt has {pads_i} image and {pads_v} video pad tokens, but the vision tower gave {ni} image and {nv} video rows"
                ),
                "exactly one pad token per vision row",
            ));
        }
        if ni + nv == 0 {
            return Ok(text);
        }
        let mut parts = vec![text];
        parts.extend(image_embeds.cloned());
        parts.extend(video_embeds.cloned());
        let all = Tensor::cat(&parts, 0)?;
        let (mut ki, mut kv) = (0u32, 0u32);
        let index: Vec<u32> = input_ids
            .iter()
            .enumerate()
            .map(|(p, &t)| {
                if t == img {
                    ki += 1;
                    (n + ki as usize - 1) as u32
                } else if t == vid {
                    kv += 1;
                    (n + ni + kv as usize - 1) as u32
                } else {
                    p as u32
                }
            })
            .collect();
        let index = Tensor::from_vec(index, n, &self.device)?;
        Ok(all.index_select(&index, 0)?)
    }

    /// Prefill: runs the whole prompt for one sequence, appending it to `cache`, and returns
    /// the last position's logits `(vocab,)` in f32.
    ///
    /// `positions` are the prompt's M-RoPE ids; when the cache already holds tokens
    /// (a continued conversation), they must continue from there.
    pub fn prefill(
        &self,
        input_ids: &[u32],
        positions: &MropePositions,
        image_embeds: Option<&Tensor>,
        video_embeds: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        crate::ops::pool::install(|| {
            self.prefill_on_pool(input_ids, positions, image_embeds, video_embeds, cache)
        })
    }

    /// The body of [`Self::prefill`], on a compute-pool worker.
    fn prefill_on_pool(
        &self,
        input_ids: &[u32],
        positions: &MropePositions,
        image_embeds: Option<&Tensor>,
        video_embeds: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let h = self.prefill_hidden(
            input_ids,
            positions,
            image_embeds,
            video_embeds,
            cache,
            None,
        )?;
        let last = TextModel::last_position(&h)?;
        Ok(self.text.logits(&last)?.squeeze(0)?)
    }

    /// Like [`Qwen2VL::prefill`] but returns the last layer's hidden states `(1, n, hidden)`
    /// and optionally every layer's output (for layer-by-layer comparison).
    pub fn prefill_hidden(
        &self,
        input_ids: &[u32],
        positions: &MropePositions,
        image_embeds: Option<&Tensor>,
        video_embeds: Option<&Tensor>,
        cache: &mut KvCache,
        collect: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let (x, cos, sin) =
            self.prefill_inputs(input_ids, positions, image_embeds, video_embeds, cache)?;
        let mut caches = [cache];
        self.text.forward(&x, &cos, &sin, &mut caches, collect)
    }

    /// What the decoder layers of a prefill start from: the prompt's embeddings with the
    /// vision rows in place `(1, n, hidden)` and its rope tables `(1, n, head_dim/2)`, after
    /// checking the prompt and that `cache` has room for it.
    pub(crate) fn prefill_inputs(
        &self,
        input_ids: &[u32],
        positions: &MropePositions,
        image_embeds: Option<&Tensor>,
        video_embeds: Option<&Tensor>,
        cache: &KvCache,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let n = input_ids.len();
        if n == 0 {
            return Err(Error::bad_input(
                "the prompt is empty",
                "at least one token",
            ));
        }
        if positions.ids.iter().any(|d| d.len() != n) {
            return Err(Error::bad_input(
                format!("position ids do not cover the {n} prompt tokens"),
                "3 x n position ids",
            ));
        }
        cache.ensure_room(n)?;
        let x = self
            .embed_prompt(input_ids, image_embeds, video_embeds)?
            .unsqueeze(0)?;
        let (cos, sin) = self.rope_tables(
            [&positions.ids[0], &positions.ids[1], &positions.ids[2]],
            (1, n),
        )?;
        Ok((x, cos, sin))
    }

    /// One decode step for a batch of sequences: `tokens[b]` is appended to `caches[b]` at
    /// M-RoPE position `caches[b].len() + rope_deltas[b]` (all three ids equal). Returns logits
    /// `(B, vocab)` in f32.
    pub fn decode_step(
        &self,
        tokens: &[u32],
        rope_deltas: &[i64],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        crate::ops::pool::install(|| self.decode_step_on_pool(tokens, rope_deltas, caches))
    }

    /// The body of [`Self::decode_step`], on a compute-pool worker.
    fn decode_step_on_pool(
        &self,
        tokens: &[u32],
        rope_deltas: &[i64],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let b = tokens.len();
        if rope_deltas.len() != b || caches.len() != b {
            return Err(Error::Internal(format!(
                "decode batch mismatch: {b} tokens, {} deltas, {} caches",
                rope_deltas.len(),
                caches.len()
            )));
        }
        let pos: Vec<i64> = caches
            .iter()
            .zip(rope_deltas)
            .map(|(c, d)| c.len() as i64 + d)
            .collect();
        let x = self.text.embed(tokens)?.unsqueeze(1)?; // (B, 1, hidden)
        let (cos, sin) = self.rope_tables([&pos, &pos, &pos], (b, 1))?;
        let h = self.text.forward(&x, &cos, &sin, caches, None)?;
        self.text.logits(&TextModel::last_position(&h)?)
    }

    /// `(B, T, head_dim/2)` cos/sin tensors for `B*T` tokens' 3-D positions.
    fn rope_tables(
        &self,
        positions: [&[i64]; 3],
        (b, t): (usize, usize),
    ) -> Result<(Tensor, Tensor)> {
        let cfg = &self.config.text;
        let hd = cfg.head_dim();
        let (cos, sin) = rope::mrope_cos_sin(positions, hd, cfg.rope_theta, &cfg.mrope_section());
        let cos = Tensor::from_vec(cos, (b, t, hd / 2), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (b, t, hd / 2), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }
}

#[cfg(test)]
mod tests {
    use super::frame_chunks;

    #[test]
    fn chunks_hold_whole_frames_in_order() {
        // Two images of 16 and 24 patches, then a video of 5 frames of 8 patches.
        let grids = [[1, 4, 4], [1, 4, 6], [5, 2, 4]];
        let chunks = frame_chunks(&grids, 32);
        assert_eq!(
            chunks,
            vec![vec![[1, 4, 4]], vec![[1, 4, 6], [1, 2, 4]], vec![[4, 2, 4]],]
        );
        // A frame larger than the limit goes alone; everything fits in one big chunk.
        assert_eq!(
            frame_chunks(&[[2, 8, 8]], 10),
            vec![vec![[1, 8, 8]], vec![[1, 8, 8]]]
        );
        assert_eq!(frame_chunks(&grids, 1000), vec![grids.to_vec()]);
        let flat: usize = frame_chunks(&grids, 17)
            .iter()
            .flatten()
            .map(|g| g[0] * g[1] * g[2])
            .sum();
        assert_eq!(flat, 16 + 24 + 40);
    }
}

//! A prompt's vision tower and prefill cut into short units of work.
//!
//! On a CPU the vision tower of one large image takes seconds, and so does the prefill of a
//! long prompt. The serving engine must not stop every running stream for that long, so it
//! runs a new request's [`PrefillJob`] a few units at a time between decode steps, and
//! checks for cancellation between units. A unit is the start of a vision-tower pass (whole
//! frames, see [`super::frame_chunks`]), one unit of that pass (a chunk of rows of one
//! stage of one block, about [`crate::vision::UNIT_FLOPS`] of work: see
//! [`crate::vision::VisionPass`]; a 16k-patch frame's attention is cut into chunks of query
//! rows), the embedding of the prompt, or one unit of a decoder layer over the prompt (a
//! chunk of rows of its q/k/v, or a chunk of query rows of its causal attention and MLP:
//! see [`crate::text::LayerPass`]). Every unit does exactly what
//! [`super::Qwen2VL::encode_vision`] and [`super::Qwen2VL::prefill`] do in one go (they run
//! the same chunks), in the same order, and no product gets a shape that sums in another
//! order, so the logits are bit-identical. Unlike vLLM's chunked prefill, a prompt's
//! chunks of query rows run within each layer, not through all layers, so no chunk waits
//! for a whole pass over the model.
//!
//! With an [`EncoderCache`] ([`PrefillJob::with_encoder_cache`]), each image or video is
//! looked up before its passes start (one unit: hashing its pixels), and only the misses run
//! the tower; their rows are kept for the next request. The rows of a hit are the bits the
//! tower computed for the same pixels and grid on the same model, and every item is encoded
//! on its own (see `Qwen2VL::vision_items`), so the logits are the same with or without the
//! cache.
//!
//! A job may start after a cached prefix ([`Qwen2VL::prefill_job_after`], see
//! [`crate::prefix_cache`]): the KV cache then holds the prompt's first positions already,
//! the images and videos there are skipped, and the decoder runs on the rest with its slice
//! of the whole prompt's M-RoPE ids, attending to the cached keys as to its own.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::Instant;

use candle_core::Tensor;

use super::{Qwen2VL, VisionChunk, VisionItem, VISION_CHUNK_PATCHES};
use crate::encoder_cache::{embeddings_key, CacheKey, EncoderCache};
use crate::error::{Error, Result};
use crate::inputs::ModelInputs;
use crate::kv_cache::KvCache;
use crate::text::{LayerPass, TextModel};
use crate::vision::VisionPass;

/// An image or video not looked up nor encoded yet, whether it is a video, and its index
/// among the prompt's items (images, then videos).
struct Pending {
    video: bool,
    index: usize,
    item: VisionItem,
}

/// An image or video being encoded (it missed the cache, or there is none): its key in the
/// cache, the passes not started yet and the outputs `(rows, hidden)` of those done.
struct Encoding {
    video: bool,
    key: Option<CacheKey>,
    passes: VecDeque<VisionChunk>,
    outs: Vec<Tensor>,
}

/// The decoder part: hidden states `(1, n, hidden)` after `next` layers, the prompt's
/// rope tables `(1, n, head_dim/2)`, and layer `next` in progress.
struct TextStage<'m> {
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    next: usize,
    pass: Option<LayerPass<'m>>,
}

/// A prefill in progress for one prompt (see the [module docs](self)). Create it with
/// [`Qwen2VL::prefill_job`], call [`PrefillJob::step`] with the same inputs and cache until
/// it returns `true`, then take [`PrefillJob::finish`]. Dropping it half-way leaves the cache
/// with keys and values written past its length, which the next prefill overwrites.
pub struct PrefillJob<'m> {
    model: &'m Qwen2VL,
    todo: VecDeque<Pending>,
    encoding: Option<Encoding>,
    cache: Option<&'m EncoderCache>,
    /// The items' encoder-cache keys, when the caller computed them already.
    media_keys: Option<Vec<CacheKey>>,
    /// Prompt positions already in the KV cache (a cached prefix): the prefill starts here.
    start: usize,
    vision_rows: Option<usize>,
    pass: Option<VisionPass<'m>>,
    images: Vec<Tensor>,
    videos: Vec<Tensor>,
    text: Option<TextStage<'m>>,
    logits: Option<Tensor>,
    units: usize,
    total_units: usize,
    vision_ms: f64,
    prefill_ms: f64,
}

impl std::fmt::Debug for PrefillJob<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefillJob")
            .field("units", &self.units)
            .field("total_units", &self.total_units)
            .finish()
    }
}

impl Qwen2VL {
    /// A [`PrefillJob`] for `inputs` (pixel values are checked against their grids here).
    pub fn prefill_job(&self, inputs: &ModelInputs) -> Result<PrefillJob<'_>> {
        self.prefill_job_with_rows(inputs, None)
    }

    /// [`Qwen2VL::prefill_job`] with the vision passes and the decoder layers cut into
    /// chunks of `vision_rows` rows (see
    /// [`crate::vision::VisionTransformer::begin_with_rows`] and
    /// [`crate::text::TextModel::begin_layer`]); the logits are the same.
    pub fn prefill_job_with_rows(
        &self,
        inputs: &ModelInputs,
        vision_rows: Option<usize>,
    ) -> Result<PrefillJob<'_>> {
        self.prefill_job_after(inputs, 0, vision_rows)
    }

    /// [`Qwen2VL::prefill_job_with_rows`] for a KV cache that already holds the prompt's
    /// first `start` positions (a cached prefix, [`crate::prefix_cache`]): only positions
    /// `start..` are prefilled, with their slice of the prompt's M-RoPE ids, and only the
    /// images and videos whose pads fall there are encoded. `start` must not fall inside
    /// an image or video, and must leave at least one position.
    pub fn prefill_job_after(
        &self,
        inputs: &ModelInputs,
        start: usize,
        vision_rows: Option<usize>,
    ) -> Result<PrefillJob<'_>> {
        let n = inputs.input_ids.len();
        if start >= n {
            return Err(Error::Internal(format!(
                "a prefill from position {start} of a {n}-token prompt"
            )));
        }
        let skip = self.items_before(inputs, start)?;
        let mut todo = VecDeque::new();
        let mut index = 0;
        for (video, pixels, grids, skip) in [
            (false, &inputs.pixel_values, &inputs.image_grid_thw, skip[0]),
            (
                true,
                &inputs.pixel_values_videos,
                &inputs.video_grid_thw,
                skip[1],
            ),
        ] {
            if grids.is_empty() {
                continue;
            }
            for (i, item) in self
                .vision_items(pixels, grids, VISION_CHUNK_PATCHES)?
                .into_iter()
                .enumerate()
            {
                if i >= skip {
                    todo.push_back(Pending { video, index, item });
                }
                index += 1;
            }
        }
        // Per item its lookup, per vision pass its start and its units (all of them: hits
        // are not known yet); then the embedding of the prompt and each decoder layer.
        let mut vision_units = todo.len();
        for (grids, _) in todo.iter().flat_map(|p| &p.item.passes) {
            vision_units += 1 + self.vision()?.pass_units(grids, vision_rows);
        }
        let layer_units = self.text.layer_units(n - start, start, vision_rows);
        let total_units = vision_units + 1 + self.text.num_layers() * layer_units;
        Ok(PrefillJob {
            model: self,
            todo,
            encoding: None,
            cache: None,
            media_keys: None,
            start,
            vision_rows,
            pass: None,
            images: Vec::new(),
            videos: Vec::new(),
            text: None,
            logits: None,
            units: 0,
            total_units,
            vision_ms: 0.0,
            prefill_ms: 0.0,
        })
    }
}

impl Qwen2VL {
    /// Each image's and each video's pad count and encoder-cache key
    /// ([`embeddings_key`]: its pixels, grid and this model), `[images, videos]` in prompt
    /// order: what stands for an item's pads in the prefix cache's keys.
    pub fn media_digests(&self, inputs: &ModelInputs) -> Result<[Vec<(usize, CacheKey)>; 2]> {
        let merge = self.config().vision.spatial_merge_size.max(1);
        let mut out = [Vec::new(), Vec::new()];
        for (slot, pixels, grids) in [
            (0, &inputs.pixel_values, &inputs.image_grid_thw),
            (1, &inputs.pixel_values_videos, &inputs.video_grid_thw),
        ] {
            if grids.is_empty() {
                continue;
            }
            for item in self.vision_items(pixels, grids, VISION_CHUNK_PATCHES)? {
                let [t, h, w] = item.grid;
                let rows = pixels.get(item.rows.clone()).unwrap_or_default();
                let key = embeddings_key(self.identity(), item.grid, rows);
                out[slot].push((t * h * w / (merge * merge), key));
            }
        }
        Ok(out)
    }

    /// How many images and videos have all their pads in the prompt's first `start`
    /// positions; an error when `start` falls inside one.
    fn items_before(&self, inputs: &ModelInputs, start: usize) -> Result<[usize; 2]> {
        let merge = self.config().vision.spatial_merge_size.max(1);
        let pads = self.vision_tokens();
        let head = inputs.input_ids.get(..start).unwrap_or_default();
        let mut out = [0; 2];
        for (slot, pad, grids) in [
            (0, pads.image_pad, &inputs.image_grid_thw),
            (1, pads.video_pad, &inputs.video_grid_thw),
        ] {
            let mut left = head.iter().filter(|&&t| t == pad).count();
            for g in grids {
                if left == 0 {
                    break;
                }
                let tokens = g[0] * g[1] * g[2] / (merge * merge);
                if tokens > left {
                    return Err(Error::Internal(format!(
                        "a cached prefix of {start} positions ends inside an image or video"
                    )));
                }
                left -= tokens;
                out[slot] += 1;
            }
            if left > 0 {
                return Err(Error::Internal(
                    "the prompt has more vision pads than its grids hold".into(),
                ));
            }
        }
        Ok(out)
    }
}

impl<'m> PrefillJob<'m> {
    /// Uses `keys` (one per image, then per video: [`crate::encoder_cache::embeddings_key`])
    /// for the encoder-cache lookups instead of hashing the pixels again (the prefix cache
    /// computed them already, [`crate::prefix_cache::PrefixKey::media_digests`]).
    pub fn with_media_keys(mut self, keys: Vec<CacheKey>) -> Self {
        self.media_keys = Some(keys);
        self
    }

    /// Looks each image and video up in `cache` before encoding it, and keeps the rows of
    /// those encoded (see the [module docs](self)); a cache that is off changes nothing.
    /// Call it before the first [`PrefillJob::step`].
    pub fn with_encoder_cache(mut self, cache: &'m EncoderCache) -> Self {
        self.cache = cache.is_enabled().then_some(cache);
        self
    }

    /// Runs one unit of work; `true` when the prefill is complete. `inputs` and `cache` must
    /// be the same at every call.
    pub fn step(&mut self, inputs: &ModelInputs, cache: &mut KvCache) -> Result<bool> {
        crate::ops::pool::install(|| self.step_on_pool(inputs, cache))
    }

    /// The body of [`Self::step`], on a compute-pool worker.
    fn step_on_pool(&mut self, inputs: &ModelInputs, cache: &mut KvCache) -> Result<bool> {
        if self.logits.is_some() {
            return Ok(true);
        }
        let t = Instant::now();
        self.units += 1;
        if self.text.is_some() {
            self.text_unit(cache)?;
            self.prefill_ms += ms(t);
            return Ok(self.logits.is_some());
        }
        if self.pass.is_some() || self.encoding.is_some() || !self.todo.is_empty() {
            self.vision_step(inputs)?;
            self.vision_ms += ms(t);
        } else {
            self.start_text(inputs, cache)?;
            self.prefill_ms += ms(t);
        }
        Ok(false)
    }

    /// One unit of the decoder layer in progress (starting it if needed); after the last
    /// layer, the logits of the last position.
    fn text_unit(&mut self, cache: &mut KvCache) -> Result<()> {
        let model = self.model;
        let Some(text) = &mut self.text else {
            return Err(Error::Internal("no decoder stage to step".into()));
        };
        let layers = model.text.num_layers();
        if text.next < layers {
            let pass = match &mut text.pass {
                Some(p) => p,
                None => text.pass.insert(model.text.begin_layer(
                    text.next,
                    &text.x,
                    &text.cos,
                    &text.sin,
                    cache,
                    self.vision_rows,
                )?),
            };
            if pass.step(cache)? {
                if let Some(pass) = text.pass.take() {
                    text.x = pass.finish(cache)?;
                }
                text.next += 1;
            }
        }
        if text.next == layers {
            cache.advance(text.x.dim(1)?);
            let last = TextModel::last_position(&text.x)?;
            self.logits = Some(model.text.logits(&last)?.squeeze(0)?);
            self.text = None;
        }
        Ok(())
    }

    /// One unit of the vision tower: a unit of the pass in progress, else the start of the
    /// next pass of the item being encoded, else the lookup of the next item.
    fn vision_step(&mut self, inputs: &ModelInputs) -> Result<()> {
        if self.pass.is_some() {
            return self.vision_unit();
        }
        if let Some(enc) = &mut self.encoding {
            let Some(chunk) = enc.passes.pop_front() else {
                return Err(Error::Internal("an item with no passes left".into()));
            };
            let video = enc.video;
            return self.start_vision_pass(video, chunk, inputs);
        }
        match self.todo.pop_front() {
            Some(p) => self.start_item(p, inputs),
            None => Err(Error::Internal("no vision work left".into())),
        }
    }

    /// One unit of the vision pass in progress; when it completes, its output joins its
    /// item's, and when that was the item's last pass, the item is done.
    fn vision_unit(&mut self) -> Result<()> {
        let Some(pass) = &mut self.pass else {
            return Err(Error::Internal("no vision pass to step".into()));
        };
        if !pass.step()? {
            return Ok(());
        }
        let out = match self.pass.take() {
            Some(pass) => pass.finish()?,
            None => return Err(Error::Internal("the vision pass disappeared".into())),
        };
        let Some(enc) = &mut self.encoding else {
            return Err(Error::Internal("a vision pass without its item".into()));
        };
        enc.outs.push(out);
        if enc.passes.is_empty() {
            if let Some(enc) = self.encoding.take() {
                self.finish_item(enc)?;
            }
        }
        Ok(())
    }

    /// The pixel rows `range` of the images (`video` false) or the videos.
    fn pixels(inputs: &ModelInputs, video: bool, range: Range<usize>) -> Result<&[f32]> {
        let pixels = if video {
            &inputs.pixel_values_videos
        } else {
            &inputs.pixel_values
        };
        pixels.get(range).ok_or_else(|| {
            Error::bad_input(
                "the inputs changed during the prefill",
                "the same inputs at every step",
            )
        })
    }

    /// Looks an image or video up in the cache: a hit gives its rows at once; otherwise its
    /// encoding starts (its first pass at the next unit).
    fn start_item(&mut self, pending: Pending, inputs: &ModelInputs) -> Result<()> {
        let Pending { video, index, item } = pending;
        let known = self.media_keys.as_ref().and_then(|k| k.get(index).copied());
        let key = match self.cache {
            Some(cache) => {
                let key = match known {
                    Some(k) => k,
                    None => {
                        let pixels = Self::pixels(inputs, video, item.rows.clone())?;
                        embeddings_key(self.model.identity(), item.grid, pixels)
                    }
                };
                if let Some(rows) = cache.get_embeddings(&key) {
                    self.push_rows(video, rows);
                    return Ok(());
                }
                Some(key)
            }
            None => None,
        };
        if item.passes.is_empty() {
            return Err(Error::Internal(format!(
                "grid {:?} has no passes",
                item.grid
            )));
        }
        self.encoding = Some(Encoding {
            video,
            key,
            passes: item.passes.into(),
            outs: Vec::new(),
        });
        Ok(())
    }

    /// An item's rows `(tokens, hidden)`, all passes done: kept in the cache (when it was
    /// looked up) and added to the images' or the videos'.
    fn finish_item(&mut self, enc: Encoding) -> Result<()> {
        let Some(rows) = cat(enc.outs)? else {
            return Err(Error::Internal("an item encoded to nothing".into()));
        };
        if let (Some(cache), Some(key)) = (self.cache, enc.key) {
            cache.put_embeddings(key, &rows)?;
        }
        self.push_rows(enc.video, rows);
        Ok(())
    }

    /// Adds an item's rows to the images' or the videos', in prompt order.
    fn push_rows(&mut self, video: bool, rows: Tensor) {
        if video {
            self.videos.push(rows);
        } else {
            self.images.push(rows);
        }
    }

    /// Starts the vision pass of `chunk` (grids of whole frames, a range of pixel values).
    fn start_vision_pass(
        &mut self,
        video: bool,
        (grids, rows): VisionChunk,
        inputs: &ModelInputs,
    ) -> Result<()> {
        let pv = self
            .model
            .patch_tensor(Self::pixels(inputs, video, rows)?)?;
        let pass = self
            .model
            .vision()?
            .begin_with_rows(&pv, &grids, self.vision_rows)?;
        self.pass = Some(pass);
        Ok(())
    }

    /// Embeds the prompt with the vision rows scattered in, and its rope tables: the decoder
    /// stage starts.
    fn start_text(&mut self, inputs: &ModelInputs, cache: &mut KvCache) -> Result<()> {
        if cache.len() != self.start {
            return Err(Error::Internal(format!(
                "a prefill from position {} into a cache of {} positions",
                self.start,
                cache.len()
            )));
        }
        let image = cat(std::mem::take(&mut self.images))?;
        let video = cat(std::mem::take(&mut self.videos))?;
        let ids = inputs.input_ids.get(self.start..).unwrap_or_default();
        let (x, cos, sin) = self.model.prefill_inputs(
            ids,
            &inputs.positions.tail(self.start),
            image.as_ref(),
            video.as_ref(),
            cache,
        )?;
        self.text = Some(TextStage {
            x,
            cos,
            sin,
            next: 0,
            pass: None,
        });
        Ok(())
    }

    /// Runs units until the prefill is complete (`true`) or `deadline` has passed after at
    /// least one unit (`false`).
    pub fn run_until(
        &mut self,
        inputs: &ModelInputs,
        cache: &mut KvCache,
        deadline: Instant,
    ) -> Result<bool> {
        loop {
            if self.step(inputs, cache)? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
        }
    }

    /// Units run so far and in all (an estimate of progress).
    pub fn progress(&self) -> (usize, usize) {
        (self.units, self.total_units)
    }

    /// The last position's logits `(vocab,)` in f32, and the vision and prefill
    /// milliseconds; an error when the job is not complete.
    pub fn finish(self) -> Result<(Tensor, f64, f64)> {
        match self.logits {
            Some(l) => Ok((l, self.vision_ms, self.prefill_ms)),
            None => Err(Error::Internal(
                "the prefill was taken before it was complete".into(),
            )),
        }
    }
}

/// The outputs of a kind's passes as one tensor, `None` when there were none.
fn cat(mut parts: Vec<Tensor>) -> Result<Option<Tensor>> {
    Ok(match parts.len() {
        0 => None,
        1 => parts.pop(),
        _ => Some(Tensor::cat(&parts, 0)?),
    })
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

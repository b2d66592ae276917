//! Messages → [`ModelInputs`]: what `Qwen2VLProcessor` + qwen-vl-utils' `process_vision_info`
//! produce in the reference, with M-RoPE ids attached.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{PreprocessorConfig, Qwen2VLConfig};
use crate::encoder_cache::{CacheKey, CachedImage, EncoderCache, KeyBuilder};
use crate::error::{Error, Item, ItemKind, Result};
use crate::inputs::{ImageInfo, ModelInputs, VideoInfo};
use crate::processing::fetch::{fetch, FetchOptions};
use crate::processing::image::{
    decode_image, image_dimensions, planned_image_size, preprocess_image,
    preprocess_image_with_size, vision_tokens, PreprocessedImage,
};
use crate::processing::messages::{ImagePart, Message, PartRef};
use crate::processing::template::ChatTemplate;
use crate::processing::tokenizer::Qwen2Tokenizer;
use crate::processing::video::preprocess_video;
use crate::rope::{self, VisionTokens};

/// Options of one prompt.
#[derive(Debug, Clone)]
pub struct ProcessOptions {
    /// Append `<|im_start|>assistant\n` (true for generation).
    pub add_generation_prompt: bool,
    /// Prefix each image/video with "Picture N: " / "Video N: ".
    pub add_vision_id: bool,
    /// Relative image paths are resolved against this directory (default: the current one).
    pub base_dir: Option<PathBuf>,
    /// How image sources are read: size cap, and whether http(s) URLs are fetched (off by
    /// default) and with what timeout.
    pub fetch: FetchOptions,
    /// The most tokens the prompt may have (the model's context less one). When set, limits
    /// are checked from cheap facts before expensive work: the text's length in bytes before
    /// tokenizing (at most [`TEXT_BYTES_PER_TOKEN`] per token), then each image's and video's
    /// token count from its header and settings before any pixel is decoded.
    pub max_prompt_tokens: Option<usize>,
    /// Where preprocessed images are kept and looked up, keyed by their encoded bytes and
    /// every setting that changes their preprocessing (see [`crate::encoder_cache`]): a hit
    /// skips decoding and resizing. `None` (the default) or a cache that is off: every image
    /// is decoded.
    pub cache: Option<Arc<EncoderCache>>,
}

/// Seconds one temporal patch of a video sampled at `fps` spans, as Qwen2.5-VL's processor
/// computes its `second_per_grid_ts` (`temporal_patch_size / fps` in Python floats, then a
/// float32 tensor). `fps` is the rate of the sampled frames ([`VideoInfo::fps`]: what
/// qwen-vl-utils' `process_vision_info(..., return_video_kwargs=True)` hands the processor).
pub fn second_per_grid_t(temporal_patch_size: usize, fps: f64) -> f32 {
    (temporal_patch_size as f64 / fps) as f32
}

/// Bytes of message text allowed per token of [`ProcessOptions::max_prompt_tokens`] before
/// anything is tokenized. Qwen2's tokenizer averages about 4 bytes a token on English and
/// fewer on code or CJK; 8 leaves room for unusual text while a 60 MB message is refused in
/// microseconds instead of tokenized for half a minute.
pub const TEXT_BYTES_PER_TOKEN: usize = 8;

impl Default for ProcessOptions {
    fn default() -> Self {
        ProcessOptions {
            add_generation_prompt: true,
            add_vision_id: false,
            base_dir: None,
            fetch: FetchOptions::default(),
            max_prompt_tokens: None,
            cache: None,
        }
    }
}

/// Tokenizer, chat template and image preprocessing of one checkpoint.
pub struct Processor {
    tokenizer: Qwen2Tokenizer,
    template: ChatTemplate,
    preprocessor: PreprocessorConfig,
    tokens: VisionTokens,
    merge: usize,
    /// The checkpoint is a text model (`Qwen2ForCausalLM`): images and videos are refused
    /// before anything is decoded.
    text_only: bool,
    /// The checkpoint's architecture (named when images are refused).
    architecture: crate::config::Architecture,
    /// Qwen2.5-VL's temporal ids per second of video (`None`: one id per temporal patch).
    tokens_per_second: Option<f32>,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("preprocessor", &self.preprocessor)
            .finish()
    }
}

impl Processor {
    /// Loads `tokenizer.json`, the chat template and `preprocessor_config.json` (defaults
    /// when absent) from a model directory.
    pub fn from_dir(dir: &Path, config: &Qwen2VLConfig) -> Result<Self> {
        let pre_path = dir.join("preprocessor_config.json");
        let preprocessor = if pre_path.is_file() {
            PreprocessorConfig::from_file(&pre_path)?
        } else {
            PreprocessorConfig::default()
        };
        Ok(Processor {
            tokenizer: Qwen2Tokenizer::from_dir(dir)?,
            template: ChatTemplate::from_model_dir(dir)?,
            preprocessor,
            tokens: VisionTokens {
                image_pad: config.image_token_id,
                video_pad: config.video_token_id,
            },
            merge: config.vision.spatial_merge_size,
            text_only: !config.architecture.has_vision(),
            architecture: config.architecture,
            tokens_per_second: config.video_times(&[]).map(|t| t.tokens_per_second),
        })
    }

    /// The tokenizer, chat template and image preprocessing stored in GGUF files.
    pub fn from_gguf(model: &crate::gguf::model::GgufModel) -> Result<Self> {
        let config = model.config();
        Ok(Processor {
            tokenizer: Qwen2Tokenizer::from_gguf(model)?,
            template: ChatTemplate::from_gguf(model.chat_template()?, model.special_tokens()?)?,
            preprocessor: model.preprocessor()?,
            tokens: VisionTokens {
                image_pad: config.image_token_id,
                video_pad: config.video_token_id,
            },
            merge: config.vision.spatial_merge_size,
            text_only: !config.architecture.has_vision(),
            architecture: config.architecture,
            tokens_per_second: config.video_times(&[]).map(|t| t.tokens_per_second),
        })
    }

    /// Whether this is a text model's processor (images and videos are refused).
    pub fn is_text_only(&self) -> bool {
        self.text_only
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Qwen2Tokenizer {
        &self.tokenizer
    }

    /// The chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The image preprocessing settings.
    pub fn preprocessor(&self) -> &PreprocessorConfig {
        &self.preprocessor
    }

    /// Renders, tokenizes and preprocesses a conversation.
    pub fn process(&self, messages: &[Message], opts: &ProcessOptions) -> Result<ModelInputs> {
        if messages.is_empty() {
            return Err(Error::bad_input(
                "the conversation has no messages",
                "at least one message",
            ));
        }
        let flattened;
        let messages = if self.text_only {
            refuse_media(messages, self.architecture)?;
            flattened = text_parts_as_strings(messages);
            flattened.as_slice()
        } else {
            messages
        };
        if let Some(max) = opts.max_prompt_tokens {
            check_text_bytes(messages, max)?;
        }
        // The template and the tokenizer first: the text's tokens tell what the context leaves
        // for the images and videos, checked before any of them is decoded.
        let rendered =
            self.template
                .render(messages, opts.add_generation_prompt, opts.add_vision_id)?;
        let ids = self.tokenizer.encode_prompt(&rendered)?;
        let budget = self.budget_after_text(&ids, opts.max_prompt_tokens)?;
        let (planned, budget) = self.plan_images(messages, opts, budget)?;
        let (pixel_values, images) = self.decode_images(planned, opts)?;
        let (pixel_values_videos, videos) = self.process_videos(messages, opts, budget)?;
        let input_ids = self.expand_pads(ids, &images, &videos)?;
        let image_grid_thw: Vec<[usize; 3]> = images.iter().map(|i| i.grid_thw).collect();
        let video_grid_thw: Vec<[usize; 3]> = videos.iter().map(|v| v.grid_thw).collect();
        let times = self
            .tokens_per_second
            .map(|tokens_per_second| rope::VideoTimes {
                second_per_grid_ts: videos
                    .iter()
                    .map(|v| second_per_grid_t(self.preprocessor.temporal_patch_size, v.fps))
                    .collect(),
                tokens_per_second,
            });
        let positions = rope::mrope_position_ids_timed(
            &input_ids,
            self.tokens,
            &image_grid_thw,
            &video_grid_thw,
            self.merge,
            times.as_ref(),
        )?;
        Ok(ModelInputs {
            prompt: rendered.text,
            input_ids,
            pixel_values,
            image_grid_thw,
            images,
            pixel_values_videos,
            video_grid_thw,
            videos,
            positions,
        })
    }

    /// The vision tokens the context leaves once the text's `ids` (pads not counted) are in
    /// (`None`: no limit); a text over `max_prompt_tokens` alone is refused.
    fn budget_after_text(
        &self,
        ids: &[u32],
        max_prompt_tokens: Option<usize>,
    ) -> Result<Option<usize>> {
        let pads = ids
            .iter()
            .filter(|&&id| id == self.tokens.image_pad || id == self.tokens.video_pad)
            .count();
        let text_tokens = ids.len() - pads;
        match max_prompt_tokens {
            Some(max) if text_tokens > max => Err(Error::bad_input(
                format!("the prompt's text is {text_tokens} tokens long"),
                format!(
                    "at most {max} tokens (the model's context of {} tokens less one)",
                    max.saturating_add(1)
                ),
            )),
            Some(max) => Ok(Some(max - text_tokens)),
            None => Ok(None),
        }
    }

    /// Every image's bytes and planned tokens (headers only), so the request's whole image
    /// load is checked against `budget` before the first one is decoded and resized. Returns
    /// the plans (with their message index) and what the budget leaves for the videos.
    fn plan_images<'m>(
        &self,
        messages: &'m [Message],
        opts: &ProcessOptions,
        budget: Option<usize>,
    ) -> Result<(Vec<Planned<'m>>, Option<usize>)> {
        let mut planned = Vec::new();
        let mut image_tokens_total = 0usize;
        for (mi, m) in messages.iter().enumerate() {
            for part in m.images() {
                let n = planned.len() + 1;
                let plan = self
                    .plan_image(part, opts)
                    .map_err(|e| name_item(e, n, mi + 1))?;
                image_tokens_total += plan.tokens;
                if let Some(b) = budget.filter(|&b| image_tokens_total > b) {
                    return Err(name_item(
                        over_image_budget(&plan, image_tokens_total, b),
                        n,
                        mi + 1,
                    ));
                }
                planned.push((mi, part, plan));
            }
        }
        Ok((planned, budget.map(|b| b - image_tokens_total)))
    }

    /// Decodes and preprocesses the planned images, in order: their `pixel_values`, one
    /// after the other, and what each became.
    fn decode_images(
        &self,
        planned: Vec<Planned<'_>>,
        opts: &ProcessOptions,
    ) -> Result<(Vec<f32>, Vec<ImageInfo>)> {
        let mut pixel_values = Vec::new();
        let mut images = Vec::new();
        for (n, (mi, part, plan)) in planned.into_iter().enumerate() {
            let image = self
                .decode_cached(part, plan, opts)
                .map_err(|e| name_item(e, n + 1, mi + 1))?;
            pixel_values.extend_from_slice(&image.pixel_values);
            images.push(image.info.clone());
        }
        Ok((pixel_values, images))
    }

    /// A planned image preprocessed: from the cache in `opts` when its bytes were seen with
    /// the same settings, else decoded (and then kept there).
    fn decode_cached(
        &self,
        part: &ImagePart,
        plan: PlannedImage<'_>,
        opts: &ProcessOptions,
    ) -> Result<Arc<CachedImage>> {
        let cache = opts.cache.as_deref().filter(|c| c.is_enabled());
        let key = cache.map(|_| self.image_key(part, &plan.fetched.bytes));
        if let (Some(cache), Some(key)) = (cache, &key) {
            if let Some(hit) = cache.get_image(key) {
                debug_assert_eq!(hit.info.resized_hw, plan.size, "same key, same size");
                return Ok(hit);
            }
        }
        let (original_hw, pre) = self.decode_planned(part, plan, opts)?;
        let [t, gh, gw] = pre.grid_thw;
        let image = Arc::new(CachedImage {
            info: ImageInfo {
                original_hw,
                resized_hw: pre.resized_hw,
                grid_thw: pre.grid_thw,
                tokens: t * gh * gw / (self.merge * self.merge),
            },
            pixel_values: pre.pixel_values,
        });
        if let (Some(cache), Some(key)) = (cache, key) {
            cache.put_image(key, image.clone());
        }
        Ok(image)
    }

    /// The cache key of an image's preprocessing: its encoded `bytes` (wherever they came
    /// from: a path, a URL and a data URI with the same bytes are one image), this
    /// processor's settings (`preprocessor_config.json`: patch and merge sizes, mean and
    /// std, default min/max pixels) and the item's own min/max pixels and resized size.
    fn image_key(&self, part: &ImagePart, bytes: &[u8]) -> CacheKey {
        let mut k = KeyBuilder::new("qwen2vl/preprocessed-image/v1");
        k.bytes(format!("{:?}", self.preprocessor).as_bytes())
            .u64(self.merge as u64)
            .opt_u64(part.min_pixels)
            .opt_u64(part.max_pixels)
            .opt_u64(part.resized_height.map(|h| h as u64))
            .opt_u64(part.resized_width.map(|w| w as u64))
            .bytes(bytes);
        k.finish()
    }

    /// Reads, samples and preprocesses every video in order, each within what `budget` still
    /// leaves (checked by the video reader from headers before decoding): their
    /// `pixel_values_videos` and what each became.
    fn process_videos(
        &self,
        messages: &[Message],
        opts: &ProcessOptions,
        mut budget: Option<usize>,
    ) -> Result<(Vec<f32>, Vec<VideoInfo>)> {
        let mut pixel_values_videos = Vec::new();
        let mut videos = Vec::new();
        for (mi, m) in messages.iter().enumerate() {
            for part in m.videos() {
                let n = videos.len() + 1;
                let fetch = FetchOptions {
                    token_budget: budget,
                    ..opts.fetch.clone()
                };
                let pre =
                    preprocess_video(part, &self.preprocessor, &fetch, opts.base_dir.as_deref())
                        .map_err(|e| name_media(e, ItemKind::Video, n, mi + 1))?;
                let [t, gh, gw] = pre.grid_thw;
                let tokens = t * gh * gw / (self.merge * self.merge);
                budget = budget.map(|b| b.saturating_sub(tokens));
                pixel_values_videos.extend_from_slice(&pre.pixel_values);
                videos.push(VideoInfo {
                    frames: pre.frame_indices.len(),
                    frame_indices: pre.frame_indices,
                    fps: pre.fps,
                    resized_hw: pre.resized_hw,
                    grid_thw: pre.grid_thw,
                    tokens,
                });
            }
        }
        Ok((pixel_values_videos, videos))
    }

    /// The prompt's ids with each `<|image_pad|>` / `<|video_pad|>` the template wrote
    /// repeated once per merged vision token of its item; the template must place every item
    /// exactly once.
    fn expand_pads(
        &self,
        ids: Vec<u32>,
        images: &[ImageInfo],
        videos: &[VideoInfo],
    ) -> Result<Vec<u32>> {
        let image_tokens: Vec<usize> = images.iter().map(|i| i.tokens).collect();
        let video_tokens: Vec<usize> = videos.iter().map(|v| v.tokens).collect();
        let mut input_ids = Vec::with_capacity(
            ids.len() + image_tokens.iter().sum::<usize>() + video_tokens.iter().sum::<usize>(),
        );
        let (mut next_image, mut next_video) = (0, 0);
        for id in ids {
            let (counts, next, kind) = if id == self.tokens.image_pad {
                (&image_tokens, &mut next_image, "image")
            } else if id == self.tokens.video_pad {
                (&video_tokens, &mut next_video, "video")
            } else {
                input_ids.push(id);
                continue;
            };
            let tokens = counts.get(*next).ok_or_else(|| {
                Error::bad_input(
                    format!(
                        "the chat template wrote more {kind} placeholders than there are {kind}s"
                    ),
                    format!("one placeholder per {kind}"),
                )
            })?;
            input_ids.extend(std::iter::repeat_n(id, *tokens));
            *next += 1;
        }
        if next_image != images.len() || next_video != videos.len() {
            return Err(Error::bad_input(
                format!(
                    "{} images and {} videos were given but the chat template placed {next_image} and {next_video}",
                    images.len(),
                    videos.len()
                ),
                "a chat template that places every image and video",
            ));
        }
        Ok(input_ids)
    }

    /// Reads one image's bytes (any
    /// [`ImageSource`](crate::processing::messages::ImageSource) form, see [`fetch`]) and
    /// plans its final size and token count from the header and the item's settings, without
    /// decoding a pixel. Errors name the path or URL.
    fn plan_image<'a>(
        &self,
        part: &'a ImagePart,
        opts: &ProcessOptions,
    ) -> Result<PlannedImage<'a>> {
        opts.fetch.interrupt.check("reading the images")?;
        let fetched = fetch(&part.source, &opts.fetch, opts.base_dir.as_deref())?;
        let (w, h) = image_dimensions(&fetched.bytes).map_err(|e| e.prefixed(&fetched.origin))?;
        // qwen-vl-utils 0.0.8 `fetch_image`: only both keys together set the size (and the
        // item's min/max_pixels are then ignored); one alone is ignored.
        let size = planned_image_size(
            h as usize,
            w as usize,
            &self.preprocessor,
            part.min_pixels,
            part.max_pixels,
            part.resized_height.zip(part.resized_width),
        )?;
        Ok(PlannedImage {
            tokens: vision_tokens(&self.preprocessor, 1, size.0, size.1),
            original: format!("{w}x{h}"),
            size,
            fetched,
        })
    }

    /// Decodes and preprocesses a planned image: the original `(height, width)` and the
    /// preprocessed image.
    fn decode_planned(
        &self,
        part: &ImagePart,
        plan: PlannedImage<'_>,
        opts: &ProcessOptions,
    ) -> Result<((usize, usize), PreprocessedImage)> {
        opts.fetch.interrupt.check("decoding the images")?;
        let img =
            decode_image(&plan.fetched.bytes).map_err(|e| e.prefixed(&plan.fetched.origin))?;
        let pre = match part.resized_height.zip(part.resized_width) {
            Some((rh, rw)) => preprocess_image_with_size(&img, &self.preprocessor, rh, rw),
            None => preprocess_image(&img, &self.preprocessor, part.min_pixels, part.max_pixels),
        }?;
        debug_assert_eq!(pre.resized_hw, plan.size, "planned and real sizes agree");
        Ok(((img.height() as usize, img.width() as usize), pre))
    }
}

/// A planned image with the index of its message and its part.
type Planned<'m> = (usize, &'m ImagePart, PlannedImage<'m>);

/// The error for an image that takes the images' vision tokens to `total`, over `budget`.
fn over_image_budget(plan: &PlannedImage<'_>, total: usize, budget: usize) -> Error {
    Error::bad_input(
        format!(
            "{} image would become {} vision tokens ({}x{} pixels), {} for the images up to it",
            plan.original, plan.tokens, plan.size.1, plan.size.0, total
        ),
        format!(
            "at most {budget} vision tokens for the images and videos (what the model's context \
             leaves for the prompt): lower min_pixels, max_pixels or resized_height/width, or \
             send fewer images"
        ),
    )
}

/// An image read but not decoded: its bytes and what it will become.
struct PlannedImage<'a> {
    fetched: crate::processing::fetch::Fetched<'a>,
    /// `WxH` as the header says.
    original: String,
    /// Final `(height, width)`.
    size: (usize, usize),
    /// Merged vision tokens.
    tokens: usize,
}

/// Refuses message text longer than [`TEXT_BYTES_PER_TOKEN`] bytes per token of
/// `max_tokens`, before anything is tokenized.
fn check_text_bytes(messages: &[Message], max_tokens: usize) -> Result<()> {
    let bytes: usize = messages
        .iter()
        .flat_map(|m| m.iter_parts())
        .map(|p| match p {
            PartRef::Text(t) => t.len(),
            _ => 0,
        })
        .sum();
    let max_bytes = max_tokens.saturating_mul(TEXT_BYTES_PER_TOKEN);
    if bytes > max_bytes {
        return Err(Error::bad_input(
            format!("the messages hold {bytes} bytes of text"),
            format!(
                "at most {max_bytes} bytes ({TEXT_BYTES_PER_TOKEN} per token of a prompt of at \
                 most {max_tokens} tokens: the model's context of {} tokens less one)",
                max_tokens.saturating_add(1)
            ),
        ));
    }
    Ok(())
}

/// Ties a bad-input error to the image it concerns ("image 2 (message 3): ...").
fn name_item(e: Error, image: usize, message: usize) -> Error {
    name_media(e, ItemKind::Image, image, message)
}

/// A text model's refusal of the first image or video of `messages`, naming it
/// ("image 1 (message 2): an image part was sent, but this model … has no vision tower").
fn refuse_media(messages: &[Message], arch: crate::config::Architecture) -> Result<()> {
    for (m, message) in messages.iter().enumerate() {
        let kind = message.iter_parts().find_map(|p| match p {
            PartRef::Image(_) => Some(ItemKind::Image),
            PartRef::Video(_) => Some(ItemKind::Video),
            PartRef::Text(_) => None,
        });
        if let Some(kind) = kind {
            let count = |k: ItemKind| {
                messages[..m]
                    .iter()
                    .flat_map(Message::iter_parts)
                    .filter(|p| match k {
                        ItemKind::Image => matches!(p, PartRef::Image(_)),
                        ItemKind::Video => matches!(p, PartRef::Video(_)),
                    })
                    .count()
            };
            let what = match kind {
                ItemKind::Image => "an image part",
                ItemKind::Video => "a video part",
            };
            return Err(
                crate::architecture::text_model_vision(what, arch).about(Item {
                    kind,
                    index: count(kind) + 1,
                    message: m + 1,
                }),
            );
        }
    }
    Ok(())
}

/// A text model's conversation with each list of text parts as one string, the parts
/// joined by "\n" (what vLLM does for a chat template that prints `message['content']` as a
/// string): Qwen2's and Qwen2.5's templates concatenate `message['content']` with `+`, which
/// fails on a list, while the CLI and OpenAI clients send parts.
fn text_parts_as_strings(messages: &[Message]) -> Vec<Message> {
    use crate::processing::messages::{Content, ContentPart};
    messages
        .iter()
        .map(|m| match &m.content {
            Content::Parts(parts) => {
                let texts: Vec<&str> = parts
                    .iter()
                    .filter_map(|p| match p {
                        ContentPart::Text { text } => Some(text.as_str()),
                        _ => None,
                    })
                    .collect();
                Message::text(m.role, texts.join("\n"))
            }
            Content::Text(_) => m.clone(),
        })
        .collect()
}

/// Ties a bad-input error to the item it concerns ("video 2 (message 3): ...").
fn name_media(e: Error, kind: ItemKind, index: usize, message: usize) -> Error {
    e.about(Item {
        kind,
        index,
        message,
    })
}

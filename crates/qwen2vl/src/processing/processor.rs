//! Messages → [`ModelInputs`]: what `Qwen2VLProcessor` + qwen-vl-utils' `process_vision_info`
//! produce in the reference, with M-RoPE ids attached.

use std::path::{Path, PathBuf};

use crate::config::{PreprocessorConfig, Qwen2VLConfig};
use crate::error::{Error, Result};
use crate::inputs::{ImageInfo, ModelInputs, VideoInfo};
use crate::processing::fetch::{fetch, FetchOptions};
use crate::processing::image::{decode_image, preprocess_image, preprocess_image_with_size};
use crate::processing::messages::{ImagePart, Message};
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
}

impl Default for ProcessOptions {
    fn default() -> Self {
        ProcessOptions {
            add_generation_prompt: true,
            add_vision_id: false,
            base_dir: None,
            fetch: FetchOptions::default(),
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
        })
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
        let mut pixel_values = Vec::new();
        let mut images = Vec::new();
        let mut pixel_values_videos = Vec::new();
        let mut videos = Vec::new();
        for (mi, m) in messages.iter().enumerate() {
            for part in m.images() {
                let n = images.len() + 1;
                let img = self.load(part, opts, n, mi + 1)?;
                let (h, w) = (img.height() as usize, img.width() as usize);
                let pre = match (part.resized_height, part.resized_width) {
                    // qwen-vl-utils 0.0.8 `fetch_image`: only both keys together set the size
                    // (and the item's min/max_pixels are then ignored); one alone is ignored.
                    (Some(rh), Some(rw)) => {
                        preprocess_image_with_size(&img, &self.preprocessor, rh, rw)
                    }
                    _ => {
                        preprocess_image(&img, &self.preprocessor, part.min_pixels, part.max_pixels)
                    }
                }
                .map_err(|e| name_item(e, n, mi + 1))?;
                pixel_values.extend_from_slice(&pre.pixel_values);
                let [t, gh, gw] = pre.grid_thw;
                images.push(ImageInfo {
                    original_hw: (h, w),
                    resized_hw: pre.resized_hw,
                    grid_thw: pre.grid_thw,
                    tokens: t * gh * gw / (self.merge * self.merge),
                });
            }
            for part in m.videos() {
                let n = videos.len() + 1;
                let pre = preprocess_video(
                    part,
                    &self.preprocessor,
                    &opts.fetch,
                    opts.base_dir.as_deref(),
                )
                .map_err(|e| name_media(e, "video", n, mi + 1))?;
                pixel_values_videos.extend_from_slice(&pre.pixel_values);
                let [t, gh, gw] = pre.grid_thw;
                videos.push(VideoInfo {
                    frames: pre.frame_indices.len(),
                    frame_indices: pre.frame_indices,
                    fps: pre.fps,
                    resized_hw: pre.resized_hw,
                    grid_thw: pre.grid_thw,
                    tokens: t * gh * gw / (self.merge * self.merge),
                });
            }
        }
        let rendered =
            self.template
                .render(messages, opts.add_generation_prompt, opts.add_vision_id)?;
        let ids = self.tokenizer.encode_prompt(&rendered)?;
        // Each `<|image_pad|>` / `<|video_pad|>` the template wrote becomes one pad per merged
        // vision token of its item.
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
        let image_grid_thw: Vec<[usize; 3]> = images.iter().map(|i| i.grid_thw).collect();
        let video_grid_thw: Vec<[usize; 3]> = videos.iter().map(|v| v.grid_thw).collect();
        let positions = rope::mrope_position_ids(
            &input_ids,
            self.tokens,
            &image_grid_thw,
            &video_grid_thw,
            self.merge,
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

    /// Reads and decodes one image (any [`ImageSource`](crate::processing::messages::ImageSource)
    /// form, see [`fetch`]); errors name the item (`image n (message m): ...`) and the
    /// path or URL.
    fn load(
        &self,
        part: &ImagePart,
        opts: &ProcessOptions,
        n: usize,
        message: usize,
    ) -> Result<image::RgbImage> {
        let fetched = fetch(&part.source, &opts.fetch, opts.base_dir.as_deref())
            .map_err(|e| name_item(e, n, message))?;
        decode_image(&fetched.bytes).map_err(|e| {
            let e = match e {
                Error::BadInput { what, allowed } => Error::BadInput {
                    what: format!("{}: {what}", fetched.origin),
                    allowed,
                },
                other => other,
            };
            name_item(e, n, message)
        })
    }
}

/// Prefixes a bad-input error with the image it concerns.
fn name_item(e: Error, image: usize, message: usize) -> Error {
    name_media(e, "image", image, message)
}

/// Prefixes a bad-input error with the item it concerns ("video 2 (message 3): ...").
fn name_media(e: Error, kind: &str, n: usize, message: usize) -> Error {
    match e {
        Error::BadInput { what, allowed } => Error::BadInput {
            what: format!("{kind} {n} (message {message}): {what}"),
            allowed,
        },
        other => other,
    }
}

//! What a request produces: [`Generation`] (text, token ids, log-probabilities, finish
//! reason, [`Usage`], [`Timings`], image/video facts, grounding).
//!
//! Assembled in one place, [`crate::generation::sequence::Sequence::into_generation`], for
//! both the one-at-a-time [`crate::pipeline::Pipeline`] and the batching
//! [`crate::engine::Engine`]; serialized as is by the CLI's `--json`.

use serde::Serialize;

use crate::generation::stop::FinishReason;
use crate::inputs::{ImageInfo, VideoInfo};

/// One alternative token with its log-probability.
#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub id: u32,
    pub token: String,
    pub logprob: f32,
}

/// A generated token with its log-probability and the top alternatives.
#[derive(Debug, Clone, Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub token: String,
    pub logprob: f32,
    pub top_logprobs: Vec<TopLogprob>,
}

/// Token counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub prompt_text_tokens: usize,
    pub prompt_image_tokens: usize,
    pub prompt_video_tokens: usize,
    /// Prompt tokens whose keys and values were reused from the prefix cache (OpenAI's
    /// `prompt_tokens_details.cached_tokens`).
    pub prompt_cached_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// Image decoding, resizing, template and tokenizer.
    pub preprocess_ms: f64,
    /// Vision tower.
    pub vision_ms: f64,
    /// Decoder prefill of the prompt.
    pub prefill_ms: f64,
    /// From the start of the request to the first token.
    pub ttft_ms: f64,
    /// Decode steps after the first token.
    pub decode_ms: f64,
    /// Tokens per second over the decode steps.
    pub decode_tokens_per_s: f64,
}

/// The answer to a request.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// The answer text (special tokens skipped).
    pub text: String,
    /// Generated ids, the final end-of-sequence token included when there was one.
    pub token_ids: Vec<u32>,
    /// Per generated token: its log-probability and the top alternatives.
    pub logprobs: Vec<TokenLogprob>,
    /// Why it ended; serialized as the OpenAI string ("stop", "length" or "cancelled").
    pub finish_reason: crate::generation::stop::FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    /// Each image's sizes, grid and token count.
    pub images: Vec<ImageInfo>,
    /// Each video's sampled frames, size, grid and token count.
    pub videos: Vec<VideoInfo>,
    /// Boxes and quads in the answer (`None` when there are none): parsed from a decode that
    /// keeps the grounding markers, which `text` (like transformers' `skip_special_tokens=True`)
    /// drops, leaving only "the red car(120,340),(560,780)". Coordinates are the model's
    /// ([`crate::grounding::Grounding::coordinates`]: Qwen2-VL's [0, 1000), Qwen2.5-VL's
    /// pixels of the resized image, its JSON `bbox_2d` boxes included); map them to an image
    /// with [`crate::grounding::Grounding::image_pixel_shapes`].
    pub grounding: Option<crate::grounding::Grounding>,
}

impl Generation {
    /// The answer of a request cancelled before it started: no text, no tokens, `finish_reason`
    /// `"cancelled"`.
    pub fn cancelled_before_start() -> Self {
        Generation {
            text: String::new(),
            token_ids: Vec::new(),
            logprobs: Vec::new(),
            finish_reason: FinishReason::Cancelled,
            usage: Usage::default(),
            timings: Timings::default(),
            images: Vec::new(),
            videos: Vec::new(),
            grounding: None,
        }
    }
}

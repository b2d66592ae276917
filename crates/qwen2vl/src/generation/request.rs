//! What a caller asks for: [`GenerateRequest`] (the conversation, sampling, limits, stop
//! strings, cancel flag) and the per-item [`MediaOptions`] of a command-line request.
//!
//! Built by the CLI (`GenerateRequest::from_media`) and the server (from an OpenAI request),
//! consumed by [`crate::pipeline::Pipeline::generate`] and [`crate::engine::Engine::submit`].

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::generation::sampler::SamplingParams;
use crate::processing::messages::{ContentPart, Message};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Sampling settings (see [`crate::pipeline::Pipeline::default_sampling`]).
    pub sampling: SamplingParams,
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// Prefix images with "Picture N: ".
    pub add_vision_id: bool,
    /// Keep generating through end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// Directory that relative image paths are resolved against.
    pub base_dir: Option<PathBuf>,
    /// How images are read: size cap, and whether http(s) URLs are fetched (off by default
    /// in the library; the CLI turns it on).
    pub fetch: crate::processing::fetch::FetchOptions,
    /// Set to `true` from anywhere (a Ctrl-C handler, a server noticing a disconnect) to stop
    /// generating after the current token; the answer so far is returned with
    /// `finish_reason` `"cancelled"`.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Stream text with the grounding markers kept (`<|object_ref_start|>`, `<|box_start|>`
    /// …; other special tokens still skipped), for a caller that renders boxes itself, e.g.
    /// with [`crate::grounding::GroundingStream`]. Off by default: the streamed pieces then
    /// concatenate to [`crate::generation::Generation::text`]. [`crate::generation::Generation::text`] is the same either way.
    pub stream_grounding_markup: bool,
    /// Stop strings (OpenAI `stop`): generation ends when the text contains one; the text
    /// is cut before it and the stop string itself is never returned or streamed (text
    /// that may begin one is held back until it cannot). Empty strings are ignored; at most
    /// [`MAX_STOP_STRINGS`](crate::generation::stop::MAX_STOP_STRINGS) of at most
    /// [`MAX_STOP_STRING_BYTES`](crate::generation::stop::MAX_STOP_STRING_BYTES) bytes each.
    pub stop: Vec<String>,
}

impl GenerateRequest {
    /// A conversation of one user turn: the images, then the text; an optional system turn.
    pub fn from_prompt(system: Option<&str>, images: &[PathBuf], prompt: &str) -> Self {
        Self::from_media(system, images, &[], &MediaOptions::default(), prompt)
    }

    /// One user turn: the images, then the videos, then the text, each item with the same
    /// per-item options; an optional system turn.
    pub fn from_media(
        system: Option<&str>,
        images: &[PathBuf],
        videos: &[PathBuf],
        opts: &MediaOptions,
        prompt: &str,
    ) -> Self {
        use crate::processing::messages::{ImagePart, VideoPart};
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message::system(s));
        }
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        let mut parts: Vec<ContentPart> = images
            .iter()
            .map(|p| {
                ContentPart::Image(ImagePart {
                    min_pixels: opts.min_pixels,
                    max_pixels: opts.max_pixels,
                    ..ImagePart::new(path(p))
                })
            })
            .collect();
        parts.extend(videos.iter().map(|p| {
            ContentPart::Video(VideoPart {
                min_pixels: opts.min_pixels,
                max_pixels: opts.max_pixels,
                fps: opts.fps,
                nframes: opts.nframes,
                ..VideoPart::new(path(p))
            })
        }));
        parts.push(ContentPart::text(prompt));
        messages.push(Message::parts(
            crate::processing::messages::Role::User,
            parts,
        ));
        Self::new(messages)
    }

    /// A request for `messages` with greedy decoding and 512 new tokens at most.
    pub fn new(messages: Vec<Message>) -> Self {
        GenerateRequest {
            messages,
            sampling: SamplingParams::greedy(),
            max_new_tokens: 512,
            add_vision_id: false,
            ignore_eos: false,
            base_dir: None,
            fetch: Default::default(),
            cancel: None,
            stream_grounding_markup: false,
            stop: Vec::new(),
        }
    }

    /// Whether [`GenerateRequest::cancel`] has been set.
    pub fn is_cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Sets the sampling parameters.
    pub fn with_sampling(mut self, s: SamplingParams) -> Self {
        self.sampling = s;
        self
    }

    /// Sets the new-token limit.
    pub fn with_max_new_tokens(mut self, n: usize) -> Self {
        self.max_new_tokens = n;
        self
    }

    /// Sets the stop strings.
    pub fn with_stop(mut self, stop: Vec<String>) -> Self {
        self.stop = stop;
        self
    }

    /// Sets how many alternatives to report per token.
    pub fn with_top_logprobs(mut self, n: usize) -> Self {
        self.sampling.top_logprobs = n;
        self
    }
}

/// Per-item options applied to every image/video of a command-line request (the reference's
/// per-item keys; `None` keeps the checkpoint's defaults).
#[derive(Debug, Clone, Default)]
pub struct MediaOptions {
    /// Lower bound on resized pixels per image / video frame.
    pub min_pixels: Option<u64>,
    /// Upper bound on resized pixels per image / video frame.
    pub max_pixels: Option<u64>,
    /// Video frames sampled per second.
    pub fps: Option<f64>,
    /// Exact number of video frames.
    pub nframes: Option<usize>,
}

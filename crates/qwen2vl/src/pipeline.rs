//! One model, one request at a time: load a checkpoint, turn a conversation into an answer.
//!
//! This is the single-sequence path the CLI uses; the batching engine (many sequences per
//! decode step) builds on the same [`Qwen2VL`] prefill/decode calls.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::config::GenerationConfig;
use crate::engine::sequence::{PrefillTimings, PromptInfo, Sequence};
use crate::error::{Error, Result};
use crate::generation::sampler::SamplingParams;
use crate::generation::stop::{FinishReason, StopCriteria};
use crate::inputs::{ImageInfo, ModelInputs, VideoInfo};
use crate::kv_cache::KvCache;
use crate::model::Qwen2VL;
use crate::processing::messages::{ContentPart, Message};
use crate::processing::processor::{ProcessOptions, Processor};

/// Compute dtype chosen by the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    /// float32: exact agreement with the reference (the CPU default).
    #[default]
    F32,
    /// float16.
    F16,
    /// bfloat16 (slow on CPU: candle widens it per matmul).
    BF16,
    /// float64: slow; for checking agreement beyond float32 rounding.
    F64,
}

impl DTypeChoice {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            DTypeChoice::F32 => DType::F32,
            DTypeChoice::F16 => DType::F16,
            DTypeChoice::BF16 => DType::BF16,
            DTypeChoice::F64 => DType::F64,
        }
    }
}

impl FromStr for DTypeChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DTypeChoice::F32),
            "f16" | "float16" => Ok(DTypeChoice::F16),
            "bf16" | "bfloat16" => Ok(DTypeChoice::BF16),
            "f64" | "float64" => Ok(DTypeChoice::F64),
            _ => Err(Error::bad_input(
                format!("unknown dtype {s:?}"),
                "f32, f16, bf16 or f64",
            )),
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Sampling settings (see [`Pipeline::default_sampling`]).
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
    /// concatenate to [`Generation::text`]. [`Generation::text`] is the same either way.
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
    /// [0, 1000); map them to an image with [`crate::grounding::Grounding::pixel_shapes`].
    pub grounding: Option<crate::grounding::Grounding>,
}

/// A loaded model with its processor and generation defaults.
pub struct Pipeline {
    model: Qwen2VL,
    processor: Processor,
    generation: GenerationConfig,
    load_ms: f64,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("load_ms", &self.load_ms)
            .finish()
    }
}

impl Pipeline {
    /// Loads everything from a Hugging Face–format model directory, on the CPU.
    pub fn load(dir: &Path, dtype: DTypeChoice) -> Result<Self> {
        Self::load_on(dir, dtype, &Device::Cpu)
    }

    /// Loads everything on a given device.
    pub fn load_on(dir: &Path, dtype: DTypeChoice, device: &Device) -> Result<Self> {
        Self::load_inner(dir, dtype, device, None)
    }

    /// [`Pipeline::load`] (on the CPU), reporting weight loading to `progress` (bytes and
    /// tensors read out of the checkpoint's total) after every tensor and once at the end.
    pub fn load_with_progress(
        dir: &Path,
        dtype: DTypeChoice,
        progress: crate::weights::ProgressFn,
    ) -> Result<Self> {
        Self::load_inner(dir, dtype, &Device::Cpu, Some(progress))
    }

    fn load_inner(
        dir: &Path,
        dtype: DTypeChoice,
        device: &Device,
        progress: Option<crate::weights::ProgressFn>,
    ) -> Result<Self> {
        let start = Instant::now();
        // The cheap parts first, so a broken tokenizer or template is reported before
        // gigabytes of weights are read.
        crate::model::check_model_dir(dir)?;
        let config = crate::config::Qwen2VLConfig::from_file(&dir.join("config.json"))?;
        let processor = Processor::from_dir(dir, &config)?;
        let (model, _report) = Qwen2VL::load_with_progress(dir, dtype.dtype(), device, progress)?;
        let gen_path = dir.join("generation_config.json");
        let generation = if gen_path.is_file() {
            GenerationConfig::from_file(&gen_path)?
        } else {
            GenerationConfig::default()
        };
        Ok(Pipeline {
            model,
            processor,
            generation,
            load_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// The model.
    pub fn model(&self) -> &Qwen2VL {
        &self.model
    }

    /// The processor.
    pub fn processor(&self) -> &Processor {
        &self.processor
    }

    /// Milliseconds spent loading.
    pub fn load_ms(&self) -> f64 {
        self.load_ms
    }

    /// The checkpoint's sampling defaults (`generation_config.json`).
    pub fn default_sampling(&self) -> SamplingParams {
        SamplingParams::from_generation_config(&self.generation)
    }

    /// End-of-sequence ids: `generation_config.json`'s, else `<|im_end|>` and `<|endoftext|>`.
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.generation.eos_token_id {
            Some(e) => e.to_vec(),
            None => {
                let t = self.processor.tokenizer();
                vec![t.im_end_id(), t.endoftext_id()]
            }
        }
    }

    /// Prepares the model inputs of a request (template, tokens, pixels, positions).
    pub fn prepare(&self, req: &GenerateRequest) -> Result<ModelInputs> {
        let opts = ProcessOptions {
            add_generation_prompt: true,
            add_vision_id: req.add_vision_id,
            base_dir: req.base_dir.clone(),
            fetch: req.fetch.clone(),
            max_prompt_tokens: Some(self.context_len().saturating_sub(1)),
        };
        self.processor.process(&req.messages, &opts)
    }

    /// Checks what can be checked before any preprocessing: sampling values, a zero token
    /// limit, the number and length of stop strings (empty ones are ignored).
    pub fn validate_request(&self, req: &GenerateRequest) -> Result<()> {
        req.sampling.validate()?;
        crate::generation::stop::check_stop_strings(&req.stop)?;
        if req.max_new_tokens == 0 {
            return Err(Error::bad_input("max_new_tokens is 0", "at least 1"));
        }
        Ok(())
    }

    /// The model's context length (`max_position_embeddings`).
    pub fn context_len(&self) -> usize {
        self.model.config().text.max_position_embeddings
    }

    /// Checks a prompt of `prompt_len` tokens against the context and returns how many new
    /// tokens it may have: `max_new_tokens` capped by what is left of the context.
    pub fn max_new_for(&self, prompt_len: usize, max_new_tokens: usize) -> Result<usize> {
        let context = self.context_len();
        if prompt_len >= context {
            return Err(Error::bad_input(
                format!("the prompt is {prompt_len} tokens long"),
                format!(
                    "at most {} tokens (the model's context is {context})",
                    context - 1
                ),
            ));
        }
        Ok(max_new_tokens.min(context - prompt_len))
    }

    /// The stopping rules of a request allowed `max_new` new tokens.
    pub fn stop_criteria(&self, req: &GenerateRequest, max_new: usize) -> StopCriteria {
        let eos = if req.ignore_eos {
            vec![]
        } else {
            self.eos_ids()
        };
        StopCriteria {
            stop_strings: req.stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..StopCriteria::new(eos, max_new)
        }
    }

    /// A fresh [`Sequence`] for a request whose prompt is `inputs`.
    pub fn new_sequence(
        &self,
        req: &GenerateRequest,
        inputs: &ModelInputs,
        max_new: usize,
    ) -> Result<Sequence<'_>> {
        Sequence::new(
            self.processor.tokenizer(),
            req.sampling.clone(),
            self.stop_criteria(req, max_new),
            inputs.input_ids.clone(),
            req.stream_grounding_markup,
        )
    }

    /// Runs the vision tower on the prompt's images and videos and prefills the decoder into
    /// `cache`; returns the last position's logits `(vocab,)` and the vision and prefill
    /// milliseconds.
    pub fn prefill(&self, inputs: &ModelInputs, cache: &mut KvCache) -> Result<(Tensor, f64, f64)> {
        let mut job = self.model.prefill_job(inputs)?;
        while !job.step(inputs, cache)? {}
        job.finish()
    }

    /// Generates an answer, calling `on_text` with each new piece of text as it is decoded.
    ///
    /// One [`Sequence`] driven by a simple loop of decode steps; the
    /// [`crate::engine::Engine`] runs the same per-sequence logic for many at once.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        self.validate_request(req)?;
        let start = Instant::now();
        let inputs = self.prepare(req)?;
        let preprocess_ms = ms(start);
        let n = inputs.input_ids.len();
        let max_new = self.max_new_for(n, req.max_new_tokens)?;

        let mut cache = self.model.new_cache(n + max_new)?;
        let (mut logits, vision_ms, prefill_ms) = self.prefill(&inputs, &mut cache)?;
        let mut seq = self.new_sequence(req, &inputs, max_new)?;
        loop {
            let step = seq.push_logits(&logits.to_vec1::<f32>()?)?;
            if !step.text.is_empty() {
                on_text(&step.text);
            }
            if step.finish.is_some() {
                break;
            }
            if req.is_cancelled() {
                let rest = seq.finish(FinishReason::Cancelled)?;
                if !rest.is_empty() {
                    on_text(&rest);
                }
                break;
            }
            logits = self
                .model
                .decode_step(
                    &[step.token],
                    &[inputs.positions.rope_delta],
                    &mut [&mut cache],
                )?
                .squeeze(0)?;
        }
        let prompt = PromptInfo {
            prompt_tokens: n,
            image_tokens: inputs.image_tokens(),
            video_tokens: inputs.video_tokens(),
            images: inputs.images,
            videos: inputs.videos,
        };
        Ok(seq.into_generation(
            prompt,
            start,
            PrefillTimings {
                preprocess_ms,
                vision_ms,
                prefill_ms,
            },
        ))
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

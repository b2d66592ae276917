//! One model, one request at a time: load a checkpoint, turn a conversation into an answer.
//!
//! This is the single-sequence path the CLI uses; the batching engine (many sequences per
//! decode step) builds on the same [`Qwen2VL`] prefill/decode calls.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use serde::Serialize;

use crate::config::GenerationConfig;
use crate::error::{Error, Result};
use crate::generation::detok::IncrementalDecoder;
use crate::generation::sampler::{Sampler, SamplingParams};
use crate::generation::stop::{FinishReason, StopCriteria};
use crate::inputs::{ImageInfo, ModelInputs, VideoInfo};
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
    /// "stop" or "length".
    pub finish_reason: String,
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
        };
        self.processor.process(&req.messages, &opts)
    }

    /// Generates an answer, calling `on_text` with each new piece of text as it is decoded.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        req.sampling.validate()?;
        if req.max_new_tokens == 0 {
            return Err(Error::bad_input("max_new_tokens is 0", "at least 1"));
        }
        let start = Instant::now();
        let inputs = self.prepare(req)?;
        let preprocess_ms = ms(start);

        let n = inputs.input_ids.len();
        let context = self.model.config().text.max_position_embeddings;
        if n >= context {
            return Err(Error::bad_input(
                format!("the prompt is {n} tokens long"),
                format!(
                    "at most {} tokens (the model's context is {context})",
                    context - 1
                ),
            ));
        }
        let max_new = req.max_new_tokens.min(context - n);

        let t = Instant::now();
        let image_embeds = if inputs.images.is_empty() {
            None
        } else {
            Some(
                self.model
                    .encode_vision(&inputs.pixel_values, &inputs.image_grid_thw)?,
            )
        };
        let video_embeds = if inputs.videos.is_empty() {
            None
        } else {
            Some(
                self.model
                    .encode_vision(&inputs.pixel_values_videos, &inputs.video_grid_thw)?,
            )
        };
        let vision_ms = ms(t);

        let t = Instant::now();
        let mut cache = self.model.new_cache(n + max_new)?;
        let mut logits = self.model.prefill(
            &inputs.input_ids,
            &inputs.positions,
            image_embeds.as_ref(),
            video_embeds.as_ref(),
            &mut cache,
        )?;
        let prefill_ms = ms(t);
        drop((image_embeds, video_embeds));

        let tokenizer = self.processor.tokenizer();
        let mut sampler = Sampler::new(req.sampling.clone())?;
        let eos = if req.ignore_eos {
            vec![]
        } else {
            self.eos_ids()
        };
        let stop = StopCriteria::new(eos, max_new);
        let mut detok = IncrementalDecoder::new(tokenizer);
        // A second decode keeping the grounding markers (ids 151646..=151651), for
        // `Generation::grounding` and `stream_grounding_markup`; `text` keeps parity.
        let mut marked_detok = IncrementalDecoder::keeping(tokenizer, tokenizer.grounding_ids());
        let mut marked = String::new();
        let plain_stream = !req.stream_grounding_markup;
        let mut history = inputs.input_ids.clone();
        let mut token_ids = Vec::new();
        let mut logprobs = Vec::new();
        let mut text = String::new();
        let mut ttft_ms = 0.0;
        let mut decode_start = Instant::now();
        let finish = loop {
            let values = logits.to_vec1::<f32>()?;
            let s = sampler.sample(&values, &history)?;
            if token_ids.is_empty() {
                ttft_ms = ms(start);
                decode_start = Instant::now();
            }
            token_ids.push(s.token);
            history.push(s.token);
            {
                logprobs.push(TokenLogprob {
                    id: s.token,
                    token: token_text(tokenizer, s.token),
                    logprob: s.logprob,
                    top_logprobs: s
                        .top
                        .iter()
                        .map(|&(id, lp)| TopLogprob {
                            id,
                            token: token_text(tokenizer, id),
                            logprob: lp,
                        })
                        .collect(),
                });
            }
            if let Some(piece) = detok.push(s.token)? {
                if plain_stream {
                    on_text(&piece);
                }
                text.push_str(&piece);
            }
            if let Some(piece) = marked_detok.push(s.token)? {
                if !plain_stream {
                    on_text(&piece);
                }
                marked.push_str(&piece);
            }
            if let Some(reason) = stop.check_token(s.token, token_ids.len()) {
                break reason;
            }
            if req.is_cancelled() {
                break FinishReason::Cancelled;
            }
            logits = self
                .model
                .decode_step(
                    &[s.token],
                    &[inputs.positions.rope_delta],
                    &mut [&mut cache],
                )?
                .squeeze(0)?;
        };
        if let Some(piece) = detok.finish()? {
            if plain_stream {
                on_text(&piece);
            }
            text.push_str(&piece);
        }
        if let Some(piece) = marked_detok.finish()? {
            if !plain_stream {
                on_text(&piece);
            }
            marked.push_str(&piece);
        }
        let grounding =
            Some(crate::grounding::Grounding::parse(&marked)).filter(|g| g.has_shapes());
        let decode_ms = ms(decode_start);
        let steps = token_ids.len().saturating_sub(1);
        let image_tokens = inputs.image_tokens();
        let video_tokens = inputs.video_tokens();
        Ok(Generation {
            text,
            finish_reason: finish.as_openai_str().to_string(),
            usage: Usage {
                prompt_tokens: n,
                prompt_text_tokens: n - image_tokens - video_tokens,
                prompt_image_tokens: image_tokens,
                prompt_video_tokens: video_tokens,
                completion_tokens: token_ids.len(),
                total_tokens: n + token_ids.len(),
            },
            timings: Timings {
                preprocess_ms,
                vision_ms,
                prefill_ms,
                ttft_ms,
                decode_ms,
                decode_tokens_per_s: if decode_ms > 0.0 {
                    steps as f64 / (decode_ms / 1e3)
                } else {
                    0.0
                },
            },
            token_ids,
            logprobs,
            images: inputs.images,
            videos: inputs.videos,
            grounding,
        })
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The text of one token as it would print (special tokens by name).
fn token_text(tok: &crate::processing::tokenizer::Qwen2Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

//! One model, one request at a time: load a checkpoint, turn a conversation into an answer.
//!
//! This is the single-sequence path the CLI uses; the batching engine (many sequences per
//! decode step) builds on the same [`Qwen2VL`] prefill/decode calls.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::config::GenerationConfig;
use crate::encoder_cache::EncoderCache;
use crate::error::{Error, Result};
use crate::generation::sampler::SamplingParams;
use crate::generation::sequence::{PrefillTimings, PromptInfo, Sequence};
use crate::generation::stop::{FinishReason, StopCriteria};
use crate::generation::{GenerateRequest, Generation};
use crate::inputs::ModelInputs;
use crate::kv_cache::KvCache;
use crate::model::{PrefillJob, Qwen2VL};
use crate::ops::quant::plan::QuantScheme;
use crate::prefix_cache::{PrefixCache, PrefixKey};
use crate::processing::processor::{ProcessOptions, Processor};

/// How [`Pipeline::load_with`] loads a checkpoint.
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// Compute dtype of the float weights and activations.
    pub dtype: DTypeChoice,
    /// Quantize the decoder's matrices and embeddings as they load (`--quant`).
    pub quant: Option<QuantScheme>,
    /// Quantize the vision tower's matrices too (`--vision-quant`).
    pub vision_quant: Option<QuantScheme>,
    /// Told after every tensor read.
    pub progress: Option<crate::weights::ProgressFn>,
    /// The vision projector (`mmproj-*.gguf`) of a GGUF model; without it a GGUF model is
    /// text-only. Refused for a Hugging Face directory.
    pub mmproj: Option<PathBuf>,
    /// The encoder cache's budget in MiB (`--encoder-cache-mb`; see
    /// [`crate::encoder_cache`]). 0 (the default) turns it off.
    pub encoder_cache_mb: u64,
    /// The prefix cache's budget in MiB (`--prefix-cache-mb`; see
    /// [`crate::prefix_cache`]). 0 (the default) turns it off.
    pub prefix_cache_mb: u64,
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("dtype", &self.dtype)
            .field("quant", &self.quant)
            .field("vision_quant", &self.vision_quant)
            .field("mmproj", &self.mmproj)
            .field("encoder_cache_mb", &self.encoder_cache_mb)
            .field("prefix_cache_mb", &self.prefix_cache_mb)
            .finish()
    }
}

/// Compute dtype chosen by the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    /// float32: exact agreement with the reference (the CPU default).
    #[default]
    F32,
    /// float16.
    F16,
    /// bfloat16 compute. On the CPU: every linear layer's weight rounded to bf16 and packed
    /// at load, its input rounded to bf16 per product, multiplied into f32 sums with AMX
    /// tiles or AVX512_BF16 `vdpbf16ps` (AVX2/portable fallbacks; [`crate::ops::gemm_bf16`]);
    /// activations, norms, attention and the KV cache stay f32 (so the model's
    /// [`Qwen2VL::dtype`] is f32). On another device, bf16 tensors throughout.
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

/// A loaded model with its processor, generation defaults and encoder cache.
pub struct Pipeline {
    model: Qwen2VL,
    processor: Processor,
    generation: GenerationConfig,
    /// Vision embeddings and preprocessed images of earlier requests (shared with the
    /// [`crate::engine::Engine`] that runs this pipeline).
    encoder_cache: Arc<EncoderCache>,
    /// Keys and values of earlier prompts and answers (shared with the engine).
    prefix_cache: Arc<PrefixCache>,
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
        Self::load_with(
            dir,
            &LoadOptions {
                dtype,
                progress: Some(progress),
                ..LoadOptions::default()
            },
        )
    }

    fn load_inner(
        dir: &Path,
        dtype: DTypeChoice,
        device: &Device,
        progress: Option<crate::weights::ProgressFn>,
    ) -> Result<Self> {
        Self::load_on_with(
            dir,
            device,
            &LoadOptions {
                dtype,
                progress,
                ..LoadOptions::default()
            },
        )
    }

    /// Loads everything on the CPU as `options` say (dtype, quantization, progress).
    ///
    /// `dir` is a Hugging Face–format model directory, or a llama.cpp GGUF text model
    /// (`*.gguf`, with its vision projector in [`LoadOptions::mmproj`]), or a directory of
    /// GGUF files such as `qwen2vl quantize` writes (see [`gguf_dir`]): config, tokenizer,
    /// chat template and image normalisation then come from the GGUF metadata.
    pub fn load_with(dir: &Path, options: &LoadOptions) -> Result<Self> {
        Self::load_on_with(dir, &Device::Cpu, options)
    }

    fn load_on_with(dir: &Path, device: &Device, options: &LoadOptions) -> Result<Self> {
        let loaded = Self::load_files(dir, device, options);
        // Building the tokenizer from its JSON (or from the GGUF vocabulary) peaks at ~200
        // MiB of short-lived heap blocks; hand those pages back now rather than keep them
        // until the first request reuses some.
        crate::memory::release_free_heap();
        loaded
    }

    fn load_files(dir: &Path, device: &Device, options: &LoadOptions) -> Result<Self> {
        if is_gguf_path(dir) {
            return Self::load_gguf(dir, device, options);
        }
        if let Some(found) = gguf_dir(dir)? {
            let mut options = options.clone();
            options.mmproj = options.mmproj.or(found.mmproj);
            return Self::load_gguf(&found.text, device, &options);
        }
        if let Some(m) = &options.mmproj {
            return Err(Error::bad_input(
                format!(
                    "--mmproj {} was given with a model directory; a directory holds its own vision tower",
                    m.display()
                ),
                "--mmproj only with a GGUF text model (--model model.gguf)",
            ));
        }
        let start = Instant::now();
        // The cheap parts first, so a broken tokenizer or template is reported before
        // gigabytes of weights are read.
        crate::model::check_model_dir(dir)?;
        let config = crate::config::Qwen2VLConfig::from_file(&dir.join("config.json"))?;
        let processor = Processor::from_dir(dir, &config)?;
        let (model, _report) = Qwen2VL::load_quantized(
            dir,
            options.dtype.dtype(),
            device,
            options.progress.clone(),
            options.quant,
            options.vision_quant,
        )?;
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
            encoder_cache: Arc::new(EncoderCache::with_mb(options.encoder_cache_mb)),
            prefix_cache: Arc::new(PrefixCache::with_mb(options.prefix_cache_mb)),
            load_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Loads llama.cpp GGUF files (see [`Pipeline::load_with`]).
    fn load_gguf(path: &Path, device: &Device, options: &LoadOptions) -> Result<Self> {
        let start = Instant::now();
        let mut gguf = crate::gguf::model::GgufModel::open(path, options.mmproj.as_deref())?;
        let processor = Processor::from_gguf(&gguf)?;
        let generation = gguf.generation()?;
        gguf.release_vocabulary();
        let gguf = std::sync::Arc::new(gguf);
        let (model, _report) = Qwen2VL::load_gguf(
            gguf,
            options.dtype.dtype(),
            device,
            options.progress.clone(),
            options.quant,
            options.vision_quant,
        )?;
        Ok(Pipeline {
            model,
            processor,
            generation,
            encoder_cache: Arc::new(EncoderCache::with_mb(options.encoder_cache_mb)),
            prefix_cache: Arc::new(PrefixCache::with_mb(options.prefix_cache_mb)),
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

    /// The encoder cache: its counters, or a handle to share with another pipeline.
    pub fn encoder_cache(&self) -> &Arc<EncoderCache> {
        &self.encoder_cache
    }

    /// Uses `cache` from now on (to share one between pipelines, or to resize it: a new
    /// cache starts empty). Entries of different models never meet: their keys hold the
    /// model's [`Qwen2VL::identity`].
    pub fn set_encoder_cache(&mut self, cache: Arc<EncoderCache>) {
        self.encoder_cache = cache;
    }

    /// The prefix cache: its counters, or a handle to share.
    pub fn prefix_cache(&self) -> &Arc<PrefixCache> {
        &self.prefix_cache
    }

    /// Uses `cache` from now on (a new cache starts empty; keys hold the model's
    /// [`Qwen2VL::identity`], so models sharing one never share an entry).
    pub fn set_prefix_cache(&mut self, cache: Arc<PrefixCache>) {
        self.prefix_cache = cache;
    }

    /// The prefix-cache key of a prepared prompt (hashing its images' and videos' pixels),
    /// or `None` when the prefix cache is off.
    pub fn prefix_key(&self, inputs: &ModelInputs) -> Result<Option<PrefixKey>> {
        if !self.prefix_cache.is_enabled() {
            return Ok(None);
        }
        let [images, videos] = self.model.media_digests(inputs)?;
        PrefixKey::new(
            self.model.identity(),
            &inputs.input_ids,
            self.model.vision_tokens(),
            &images,
            &videos,
        )
        .map(Some)
    }

    /// A [`PrefillJob`] for `inputs` that starts after the longest cached prefix of `key`,
    /// whose keys and values are copied into `cache` (empty, sized for the whole prompt);
    /// returns it with the positions reused. Without a key it is [`Pipeline::prefill_job`].
    pub fn prefill_job_cached(
        &self,
        inputs: &ModelInputs,
        key: Option<&PrefixKey>,
        cache: &mut KvCache,
    ) -> Result<(PrefillJob<'_>, usize)> {
        let Some(key) = key else {
            return Ok((self.prefill_job(inputs)?, 0));
        };
        // At least the last position is prefilled: its logits give the first token.
        let found = self
            .prefix_cache
            .lookup(key, inputs.input_ids.len().saturating_sub(1));
        found.copy_into(cache)?;
        let job = self
            .model
            .prefill_job_after(inputs, found.tokens(), None)?
            .with_encoder_cache(&self.encoder_cache)
            .with_media_keys(key.media_digests().to_vec());
        Ok((job, found.tokens()))
    }

    /// Keeps the full blocks of `key` that `cache` holds in the prefix cache (a failure
    /// is logged: the request it comes from is not at fault).
    pub fn remember_prefix(&self, key: Option<&PrefixKey>, cache: &KvCache) {
        if let Some(key) = key {
            if let Err(e) = self.prefix_cache.insert(key, cache) {
                tracing::warn!(error = %e, "a prompt's keys and values were not cached");
            }
        }
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
            cache: Some(self.encoder_cache.clone()),
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

    /// The model's context length (`max_position_embeddings`; see
    /// [`crate::config::TextConfig::context_len`]).
    pub fn context_len(&self) -> usize {
        self.model.config().text.context_len()
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
        Ok(Sequence::new(
            self.processor.tokenizer(),
            req.sampling.clone(),
            self.stop_criteria(req, max_new),
            inputs.input_ids.clone(),
            req.stream_grounding_markup,
        )?
        .with_box_coordinates(self.model.config().architecture.box_coordinates()))
    }

    /// A [`PrefillJob`] for `inputs` that looks their images and videos up in the encoder
    /// cache (the engine runs it in slices; [`Pipeline::prefill`] in one go).
    pub fn prefill_job(&self, inputs: &ModelInputs) -> Result<PrefillJob<'_>> {
        Ok(self
            .model
            .prefill_job(inputs)?
            .with_encoder_cache(&self.encoder_cache))
    }

    /// Runs the vision tower on the prompt's images and videos and prefills the decoder into
    /// `cache`; returns the last position's logits `(vocab,)` and the vision and prefill
    /// milliseconds.
    pub fn prefill(&self, inputs: &ModelInputs, cache: &mut KvCache) -> Result<(Tensor, f64, f64)> {
        let mut job = self.prefill_job(inputs)?;
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
        let mut inputs = self.prepare(req)?;
        let preprocess_ms = ms(start);
        let n = inputs.input_ids.len();
        let max_new = self.max_new_for(n, req.max_new_tokens)?;

        let mut cache = self.model.new_cache(n + max_new)?;
        let mut key = self.prefix_key(&inputs)?;
        let (mut job, cached_tokens) =
            self.prefill_job_cached(&inputs, key.as_ref(), &mut cache)?;
        while !job.step(&inputs, &mut cache)? {}
        let (mut logits, vision_ms, prefill_ms) = job.finish()?;
        self.remember_prefix(key.as_ref(), &cache);
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
        // The answer's keys and values follow the prompt's: a next turn can reuse both.
        if let Some(key) = key.as_mut() {
            key.extend_ids(seq.token_ids());
            self.remember_prefix(Some(key), &cache);
        }
        Ok(seq.into_generation(
            PromptInfo {
                cached_tokens,
                ..PromptInfo::take_from(&mut inputs)
            },
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

/// Whether `path` names a GGUF file: a file ending in `.gguf`, or any file starting with
/// the GGUF magic.
pub fn is_gguf_path(path: &Path) -> bool {
    if !path.is_file() {
        return path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| magic == crate::gguf::MAGIC)
}

/// The GGUF files of a model directory: one text model and, optionally, its vision
/// projector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufDir {
    /// The text model (a `*.gguf` whose name does not start with `mmproj`).
    pub text: PathBuf,
    /// The vision projector (`mmproj*.gguf`), when the directory holds one.
    pub mmproj: Option<PathBuf>,
}

/// The GGUF model in directory `path`, as `qwen2vl quantize` writes it: exactly one text
/// `*.gguf` whose name does not start with `mmproj`, and at most one `mmproj*.gguf`.
///
/// `Ok(None)` when `path` is not a directory, holds `config.json` (a Hugging Face
/// directory, whatever else it holds) or holds no text GGUF. Two text models or two
/// projectors are an error naming them: picking one would be a guess.
pub fn gguf_dir(path: &Path) -> Result<Option<GgufDir>> {
    if !path.is_dir() || path.join("config.json").exists() {
        return Ok(None);
    }
    let mut text = Vec::new();
    let mut mmproj = Vec::new();
    let entries = std::fs::read_dir(path).map_err(|e| Error::Model {
        what: format!("cannot read the model directory ({e})"),
        path: path.to_path_buf(),
    })?;
    for entry in entries.flatten() {
        let p = entry.path();
        let name = entry.file_name().to_string_lossy().to_ascii_lowercase();
        if !name.ends_with(".gguf") || name.starts_with('.') || !p.is_file() {
            continue;
        }
        if name.starts_with("mmproj") {
            mmproj.push(p);
        } else {
            text.push(p);
        }
    }
    text.sort();
    mmproj.sort();
    let names = |v: &[PathBuf]| {
        v.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let allowed = "one text model *.gguf and at most one mmproj*.gguf per directory, or \
                   --model FILE.gguf [--mmproj FILE.gguf]";
    if text.len() > 1 {
        return Err(Error::bad_input(
            format!(
                "{} holds {} text models ({}); which one to load is ambiguous",
                path.display(),
                text.len(),
                names(&text)
            ),
            allowed,
        ));
    }
    if mmproj.len() > 1 {
        return Err(Error::bad_input(
            format!(
                "{} holds {} vision projectors ({}); which one to load is ambiguous",
                path.display(),
                mmproj.len(),
                names(&mmproj)
            ),
            allowed,
        ));
    }
    Ok(text.pop().map(|text| GgufDir {
        text,
        mmproj: mmproj.pop(),
    }))
}

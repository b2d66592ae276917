//! Pieces every command shares: the model flags, sampling flags and media flags. (The error
//! type is in `error.rs`, so `hub.rs` can use it without importing this module back.)

use std::io::IsTerminal;
use std::sync::Arc;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use qwen2vl::generation::sampler::SamplingParams;
use qwen2vl::generation::MediaOptions;
use qwen2vl::ops::quant::plan::QuantScheme;
use qwen2vl::pipeline::{DTypeChoice, LoadOptions, Pipeline};
use qwen2vl::weights::LoadProgress;

use crate::error::CliError;

/// The model a command runs, where it comes from, and how it computes.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A local model directory (config.json, *.safetensors, tokenizer.json, ...), a Hugging
    /// Face repo id, optionally with a revision (Qwen/Qwen2-VL-2B-Instruct@main), a
    /// llama.cpp GGUF text model (model.gguf: f16, bf16, q8_0, q4_k_m, ...), or a directory
    /// of GGUF files (one text model, optionally one mmproj*.gguf; `qwen2vl quantize` writes
    /// one).
    #[arg(long, default_value = crate::hub::DEFAULT_MODEL)]
    pub model: String,
    /// The vision projector of a GGUF model (mmproj-*.gguf, from llama.cpp's converter);
    /// without it a GGUF model answers text only.
    #[arg(long, value_name = "PATH")]
    pub mmproj: Option<std::path::PathBuf>,
    /// Compute dtype: f32 (default on CPU: the reference's numbers), f16, bf16 (on the CPU:
    /// the matrix products in bf16 with f32 sums, everything else f32) or f64.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Quantize the language model's weights as they load: q8_0 (8.5 bits a weight, close to
    /// f16), q6_k (6.6), q4_k_m (about 4.9: llama.cpp's mix of q4_k and q6_k) or q4_k (4.5).
    /// Fewer bits decode faster and take less memory, at some accuracy (README: "Quantized
    /// weights").
    #[arg(long, value_name = "FORMAT")]
    pub quant: Option<String>,
    /// Quantize the vision tower too (default: it keeps --dtype), same formats as --quant.
    #[arg(long, value_name = "FORMAT")]
    pub vision_quant: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bars or status lines on stderr (errors are still printed).
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// The encoder and prefix caches of `run`, `chat` and `serve`.
#[derive(Args, Debug, Clone)]
pub struct EncoderCacheArgs {
    /// Memory for the encoder cache, in MiB: the vision embeddings and decoded pixels of
    /// recent images and videos, so a request that brings one again (a follow-up question,
    /// an agent's screenshot) skips decoding it and the vision tower. Least recently used
    /// entries go first; 0 turns it off.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    pub encoder_cache_mb: u64,
    /// Memory for the prefix cache, in MiB: the keys and values of recent prompts and
    /// answers, in blocks of 16 tokens keyed by their text and their images' contents, so a
    /// request that starts the same way (a system message, an image, the earlier turns of a
    /// chat) prefills only what is new. Least recently used blocks go first; 0 turns it off.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub prefix_cache_mb: u64,
}

impl ModelArgs {
    /// Applies `--threads` (before any tensor work), resolves `--model` (downloading from the
    /// hub if needed) and loads the pipeline.
    pub fn load(&self) -> Result<Pipeline, CliError> {
        self.load_with_cache(&EncoderCacheArgs {
            encoder_cache_mb: 0,
            prefix_cache_mb: 0,
        })
    }

    /// [`ModelArgs::load`] with an encoder cache of `cache`'s size (`run`, `chat`, `serve`;
    /// `bench` measures the vision tower, so it runs without one).
    pub fn load_with_cache(&self, cache: &EncoderCacheArgs) -> Result<Pipeline, CliError> {
        set_threads(self.threads)?;
        let usage = |e: qwen2vl::Error| CliError::Usage(e.to_string());
        let dtype: DTypeChoice = self.dtype.parse().map_err(usage)?;
        let scheme = |s: &Option<String>| -> Result<Option<QuantScheme>, CliError> {
            s.as_deref().map(str::parse).transpose().map_err(usage)
        };
        let mut options = LoadOptions {
            dtype,
            quant: scheme(&self.quant)?,
            vision_quant: scheme(&self.vision_quant)?,
            progress: None,
            mmproj: self.mmproj.clone(),
            encoder_cache_mb: cache.encoder_cache_mb,
            prefix_cache_mb: cache.prefix_cache_mb,
        };
        let dir = self.resolve()?;
        if self.quiet || !std::io::stderr().is_terminal() {
            return Ok(Pipeline::load_with(&dir, &options)?);
        }
        let style = ProgressStyle::with_template(
            "loading weights [{wide_bar}] {bytes}/{total_bytes} ({eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bar = ProgressBar::new(0).with_style(style);
        let shown = bar.clone();
        options.progress = Some(Arc::new(move |p: LoadProgress| {
            if shown.length() != Some(p.bytes_total) {
                shown.set_length(p.bytes_total);
            }
            shown.set_position(p.bytes_done);
        }));
        let loaded = Pipeline::load_with(&dir, &options);
        bar.finish_and_clear();
        Ok(loaded?)
    }
}

impl ModelArgs {
    /// `--model` as a path: a GGUF file as it is, else a directory or hub repo (downloaded
    /// if needed). `--mmproj` must name a file and goes with a GGUF model only.
    fn resolve(&self) -> Result<std::path::PathBuf, CliError> {
        let path = std::path::PathBuf::from(&self.model);
        // A directory of GGUF files (`qwen2vl quantize`'s output) loads like a GGUF file.
        let gguf_dir = qwen2vl::pipeline::gguf_dir(&path)?.is_some();
        let gguf = gguf_dir || qwen2vl::pipeline::is_gguf_path(&path);
        if let Some(m) = &self.mmproj {
            if !gguf {
                return Err(CliError::Usage(format!(
                    "--mmproj {} goes with a GGUF text model (--model model.gguf); {} is not one",
                    m.display(),
                    self.model
                )));
            }
            if !m.is_file() {
                return Err(CliError::Usage(format!(
                    "--mmproj {}: no such file",
                    m.display()
                )));
            }
        }
        if gguf_dir {
            return Ok(path);
        }
        if gguf {
            if !path.is_file() {
                return Err(CliError::Usage(format!(
                    "GGUF model {} not found",
                    self.model
                )));
            }
            return Ok(path);
        }
        crate::hub::resolve_model(&self.model, self.quiet)
    }
}

/// Most worker threads per available core: more only adds switching (and a huge count
/// spends minutes creating threads before any work).
pub const MAX_THREADS_PER_CORE: usize = 4;

/// The allowed `--threads` range's upper end: [`MAX_THREADS_PER_CORE`] x the cores available.
pub fn max_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores * MAX_THREADS_PER_CORE
}

/// Sets the worker thread count; must run before the first tensor operation.
pub fn set_threads(threads: Option<usize>) -> Result<(), CliError> {
    if let Some(n) = threads {
        let max = max_threads();
        if n == 0 || n > max {
            return Err(CliError::Usage(format!(
                "--threads {n} is out of range; allowed: 1 to {max} ({MAX_THREADS_PER_CORE} per \
                 available core)"
            )));
        }
        // candle's CPU kernels size their thread pools from this variable; it must be set
        // before the first tensor operation.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    Ok(())
}

/// Sampling flags; each left out keeps the checkpoint's `generation_config.json` value.
#[derive(Args, Debug, Clone)]
#[command(allow_negative_numbers = true)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Sampling temperature (0 = greedy). Default: the checkpoint's generation_config.json.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass in (0, 1]. Default: generation_config.json.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Keep only the k most likely tokens (0 = off). Default: generation_config.json.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Repetition penalty (1 = off). Default: generation_config.json.
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// Random seed: the same seed gives the same output.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The checkpoint's defaults with every given flag applied.
    pub fn params(&self, pipeline: &Pipeline) -> SamplingParams {
        let mut s = pipeline.default_sampling();
        if let Some(t) = self.temperature {
            s.temperature = t;
        }
        if let Some(p) = self.top_p {
            s.top_p = p;
        }
        if let Some(k) = self.top_k {
            s.top_k = k;
        }
        if let Some(r) = self.repetition_penalty {
            s.repetition_penalty = r;
        }
        s.seed = self.seed;
        s
    }
}

/// Per-item media flags, applied to every image and video of the request.
#[derive(Args, Debug, Clone)]
pub struct MediaArgs {
    /// Lower bound on the resized pixel count of every image and video frame.
    #[arg(long)]
    pub min_pixels: Option<u64>,
    /// Upper bound on the resized pixel count of every image and video frame.
    #[arg(long)]
    pub max_pixels: Option<u64>,
    /// Video frames sampled per second (default 2).
    #[arg(long, conflicts_with = "nframes")]
    pub fps: Option<f64>,
    /// Exact number of frames sampled from each video.
    #[arg(long)]
    pub nframes: Option<usize>,
    /// Prefix each image with "Picture N: " and each video with "Video N: " in the prompt.
    #[arg(long)]
    pub add_vision_id: bool,
    /// Refuse http(s) image URLs (they are fetched by default, with a 30 s timeout and a
    /// 512 MiB cap).
    #[arg(long)]
    pub no_remote: bool,
}

impl MediaArgs {
    /// The library's per-item options.
    pub fn options(&self) -> MediaOptions {
        MediaOptions {
            min_pixels: self.min_pixels,
            max_pixels: self.max_pixels,
            fps: self.fps,
            nframes: self.nframes,
        }
    }

    /// How media are read: remote fetching on unless `--no-remote`.
    pub fn fetch(&self) -> qwen2vl::processing::fetch::FetchOptions {
        if self.no_remote {
            Default::default()
        } else {
            qwen2vl::processing::fetch::FetchOptions::remote()
        }
    }
}

//! `qwen2vl`: run Qwen2-VL models from the command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use qwen2vl::pipeline::{DTypeChoice, GenerateRequest, MediaOptions, Pipeline};

#[derive(Parser)]
#[command(
    name = "qwen2vl",
    version,
    about = "Run Qwen2-VL vision-language models locally"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one prompt, optionally about images, streaming the answer to stdout.
    ///
    /// Example: qwen2vl run --model ./Qwen2-VL-2B-Instruct --image photo.jpg "Describe this image."
    Run(RunArgs),
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct RunArgs {
    /// Model directory (Hugging Face format: config.json, *.safetensors, tokenizer.json, ...).
    #[arg(long)]
    model: PathBuf,
    /// An image to show the model (repeatable; images come before the prompt text).
    #[arg(long = "image", value_name = "PATH")]
    images: Vec<PathBuf>,
    /// A video to show the model (repeatable; videos come after the images).
    #[arg(long = "video", value_name = "PATH")]
    videos: Vec<PathBuf>,
    /// Lower bound on the resized pixel count of every image and video frame.
    #[arg(long)]
    min_pixels: Option<u64>,
    /// Upper bound on the resized pixel count of every image and video frame.
    #[arg(long)]
    max_pixels: Option<u64>,
    /// Video frames sampled per second (default 2).
    #[arg(long, conflicts_with = "nframes")]
    fps: Option<f64>,
    /// Exact number of frames sampled from each video.
    #[arg(long)]
    nframes: Option<usize>,
    /// Prefix each image with "Picture N: " and each video with "Video N: " in the prompt.
    #[arg(long)]
    add_vision_id: bool,
    /// Refuse http(s) image URLs (they are fetched by default, with a 30 s timeout and a
    /// 512 MiB cap).
    #[arg(long)]
    no_remote: bool,
    /// The prompt (or use --prompt).
    #[arg(value_name = "PROMPT")]
    prompt_arg: Option<String>,
    /// The prompt text.
    #[arg(long, conflicts_with = "prompt_arg")]
    prompt: Option<String>,
    /// A system message (default: the chat template's "You are a helpful assistant.").
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Sampling temperature (0 = greedy). Default: the checkpoint's generation_config.json.
    #[arg(long)]
    temperature: Option<f64>,
    /// Nucleus sampling mass in (0, 1]. Default: generation_config.json.
    #[arg(long)]
    top_p: Option<f64>,
    /// Keep only the k most likely tokens (0 = off). Default: generation_config.json.
    #[arg(long)]
    top_k: Option<usize>,
    /// Repetition penalty (1 = off). Default: generation_config.json.
    #[arg(long)]
    repetition_penalty: Option<f64>,
    /// Random seed: the same seed gives the same output.
    #[arg(long)]
    seed: Option<u64>,
    /// Compute dtype: f32 (default on CPU), f16, bf16 or f64.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object (text, token ids, logprobs, usage, timings) instead of streaming.
    #[arg(long)]
    json: bool,
    /// With --json: how many alternatives to list per generated token.
    #[arg(long, default_value_t = 5)]
    top_logprobs: usize,
}

/// Keeps freed memory in the process instead of returning it to the OS.
///
/// Every tensor op allocates its output; glibc serves large blocks with fresh `mmap`s and
/// unmaps them on free, so each op on a big activation (a 1564x1564x16 attention score
/// matrix, a 1564x5120 MLP activation) page-faults and zeroes new memory: a third of the
/// vision tower's time on a 640x480 image. Serving every block from the heap and never
/// trimming it lets those buffers be reused; peak memory is unchanged.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QWEN2VL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run(args) => run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// A CLI failure with the exit code scripts can rely on.
#[derive(Debug)]
enum CliError {
    /// Bad flags or input, including a model path that is not a usable model (exit 2).
    Usage(String),
    /// Everything else (exit 1).
    Failed(String),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failed(_) => 1,
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Usage(m) | CliError::Failed(m) => f.write_str(m),
        }
    }
}

impl From<qwen2vl::Error> for CliError {
    fn from(e: qwen2vl::Error) -> Self {
        match e {
            qwen2vl::Error::BadInput { .. }
            | qwen2vl::Error::Model { .. }
            | qwen2vl::Error::Config { .. } => CliError::Usage(e.to_string()),
            _ => CliError::Failed(e.to_string()),
        }
    }
}

fn run(args: RunArgs) -> Result<(), CliError> {
    if let Some(n) = args.threads {
        if n == 0 {
            return Err(CliError::Usage("--threads must be at least 1".into()));
        }
        // candle's CPU kernels size their thread pools from this variable; it must be set
        // before the first tensor operation.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let dtype: DTypeChoice = args
        .dtype
        .parse()
        .map_err(|e: qwen2vl::Error| CliError::Usage(e.to_string()))?;
    let prompt = args.prompt.or(args.prompt_arg).ok_or_else(|| {
        CliError::Usage("no prompt given: pass it as an argument or with --prompt".into())
    })?;
    let pipeline = Pipeline::load(&args.model, dtype)?;
    let mut sampling = pipeline.default_sampling();
    if let Some(t) = args.temperature {
        sampling.temperature = t;
    }
    if let Some(p) = args.top_p {
        sampling.top_p = p;
    }
    if let Some(k) = args.top_k {
        sampling.top_k = k;
    }
    if let Some(r) = args.repetition_penalty {
        sampling.repetition_penalty = r;
    }
    sampling.seed = args.seed;
    let media = MediaOptions {
        min_pixels: args.min_pixels,
        max_pixels: args.max_pixels,
        fps: args.fps,
        nframes: args.nframes,
    };
    let mut request = GenerateRequest::from_media(
        args.system.as_deref(),
        &args.images,
        &args.videos,
        &media,
        &prompt,
    )
    .with_sampling(sampling)
    .with_max_new_tokens(args.max_new_tokens)
    .with_top_logprobs(if args.json { args.top_logprobs } else { 0 });
    request.add_vision_id = args.add_vision_id;
    if !args.no_remote {
        request.fetch = qwen2vl::processing::fetch::FetchOptions::remote();
    }
    let stdout = std::io::stdout();
    let json = args.json;
    let gen = pipeline.generate(&request, &mut |piece: &str| {
        if !json {
            let mut out = stdout.lock();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    })?;
    if json {
        let mut value = serde_json::to_value(&gen).map_err(|e| CliError::Failed(e.to_string()))?;
        value["timings"]["load_ms"] = serde_json::json!(pipeline.load_ms());
        println!("{value}");
    } else {
        println!();
    }
    Ok(())
}

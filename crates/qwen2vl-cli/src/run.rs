//! `qwen2vl run`: one prompt, streamed or as one JSON object.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use qwen2vl::pipeline::GenerateRequest;

use crate::common::{CliError, MediaArgs, ModelArgs, SamplingArgs};

/// Flags of `qwen2vl run`.
#[derive(Args)]
#[command(allow_negative_numbers = true)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An image to show the model (repeatable; images come before the prompt text). A path,
    /// file:// or http(s) URL, or data: URI.
    #[arg(long = "image", value_name = "PATH")]
    pub images: Vec<PathBuf>,
    /// A video to show the model (repeatable; videos come after the images).
    #[arg(long = "video", value_name = "PATH")]
    pub videos: Vec<PathBuf>,
    #[command(flatten)]
    pub media: MediaArgs,
    /// The prompt (or use --prompt).
    #[arg(value_name = "PROMPT")]
    pub prompt_arg: Option<String>,
    /// The prompt text.
    #[arg(long, conflicts_with = "prompt_arg")]
    pub prompt: Option<String>,
    /// A system message (default: the chat template's "You are a helpful assistant.").
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object (text, token ids, logprobs, usage, timings) instead of streaming.
    #[arg(long)]
    pub json: bool,
    /// With --json: how many alternatives to list per generated token.
    #[arg(long, default_value_t = 5)]
    pub top_logprobs: usize,
}

/// Runs `qwen2vl run`.
pub fn main(args: RunArgs) -> Result<(), CliError> {
    let prompt = args.prompt.or(args.prompt_arg).ok_or_else(|| {
        CliError::Usage("no prompt given: pass it as an argument or with --prompt".into())
    })?;
    let pipeline = args.model.load()?;
    let mut request = GenerateRequest::from_media(
        args.system.as_deref(),
        &args.images,
        &args.videos,
        &args.media.options(),
        &prompt,
    )
    .with_sampling(args.sampling.params(&pipeline))
    .with_max_new_tokens(args.sampling.max_new_tokens)
    .with_top_logprobs(if args.json { args.top_logprobs } else { 0 });
    request.add_vision_id = args.media.add_vision_id;
    request.fetch = args.media.fetch();
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

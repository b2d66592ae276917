//! `qwen2vl run`: one prompt, streamed or as one JSON object.
//!
//! Grounding answers (`<|object_ref_start|>the red car<|object_ref_end|><|box_start|>(120,340),
//! (560,780)<|box_end|>`) stream as clean text, each box or quad shown as a numbered marker
//! (`the red car [1]`), followed by the list of shapes in pixels. Qwen2-VL's coordinates are
//! relative to one image, and the answer does not say which: they are mapped to the **last
//! image of the request** (the one a grounding question is normally about).

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use qwen2vl::generation::stop::FinishReason;
use qwen2vl::generation::{GenerateRequest, Generation};
use qwen2vl::grounding::{Grounding, GroundingStream, PixelShape, ShapeKind};

use crate::common::{EncoderCacheArgs, MediaArgs, ModelArgs, SamplingArgs};
use crate::draw::DrawTarget;
use crate::error::CliError;

/// Flags of `qwen2vl run`.
#[derive(Args)]
#[command(allow_negative_numbers = true)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub encoder_cache: EncoderCacheArgs,
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
    /// Keep generating through end-of-sequence tokens (benchmarks and tests: a random-weight
    /// model may end at once, and the Ctrl-C test needs a long answer).
    #[arg(long, hide = true)]
    pub ignore_eos: bool,
    /// Write the last --image with the answer's boxes and quads drawn on it, each in its own
    /// colour with its number and label (PNG or JPEG, chosen by the extension). The image is
    /// written even when the answer has no boxes (a note says so on stderr).
    #[arg(long, value_name = "OUT.png")]
    pub draw_boxes: Option<PathBuf>,
}

/// Runs `qwen2vl run`.
pub fn main(args: RunArgs) -> Result<(), CliError> {
    let prompt = args
        .prompt
        .clone()
        .or(args.prompt_arg.clone())
        .ok_or_else(|| {
            CliError::Usage("no prompt given: pass it as an argument or with --prompt".into())
        })?;
    // Checked before loading the model: a bad output path should not cost a load.
    let draw = match &args.draw_boxes {
        Some(path) => Some(DrawTarget::prepare(path, !args.images.is_empty())?),
        None => None,
    };
    let pipeline = args.model.load_with_cache(&args.encoder_cache)?;
    let mut request = build_request(&args, &pipeline, &prompt);
    request.cancel = Some(install_ctrl_c()?);
    let json = args.json;
    let test_answer = test_answer();
    let mut stream = GroundingStream::new();
    let mut gen = pipeline.generate(&request, &mut |piece: &str| {
        if !json && test_answer.is_none() {
            print(&stream.push(piece));
        }
    })?;
    if let Some(answer) = &test_answer {
        let coordinates = pipeline.model().config().architecture.box_coordinates();
        replace_answer_for(&mut gen, answer, coordinates);
        if !json {
            // In small pieces, as a model would stream it.
            let chars: Vec<char> = answer.chars().collect();
            for piece in chars.chunks(3) {
                print(&stream.push(&piece.iter().collect::<String>()));
            }
        }
    }
    // Pixel coordinates refer to the last image of the request (see the module docs).
    let image_size = gen
        .images
        .last()
        .map(|i| (i.original_hw.1 as u32, i.original_hw.0 as u32));
    // What that image was resized to: Qwen2.5-VL's boxes are in its pixels.
    let resized = gen
        .images
        .last()
        .map(|i| (i.resized_hw.1 as u32, i.resized_hw.0 as u32));
    let shapes = gen
        .grounding
        .as_ref()
        .map(|g| pixel_shapes(g, image_size.zip(resized)))
        .unwrap_or_default();
    if json {
        print_json(&gen, pipeline.load_ms(), image_size, &shapes)?;
    } else {
        print(&stream.finish().0);
        println!();
        print_shapes(&shapes, image_size.is_some());
    }
    if let Some(target) = draw {
        let mut img = load_last_image(&args.images, &request)?;
        if shapes.is_empty() {
            eprintln!(
                "note: the answer has no boxes; writing the image unchanged to {}",
                target.path().display()
            );
        }
        crate::draw::draw_shapes(&mut img, &shapes);
        target.write(&img)?;
    }
    if gen.finish_reason == FinishReason::Cancelled {
        return Err(CliError::Interrupted);
    }
    Ok(())
}

/// The request `run`'s flags describe: one user turn of the images, the videos and `prompt`.
fn build_request(
    args: &RunArgs,
    pipeline: &qwen2vl::pipeline::Pipeline,
    prompt: &str,
) -> GenerateRequest {
    let mut request = GenerateRequest::from_media(
        args.system.as_deref(),
        &args.images,
        &args.videos,
        &args.media.options(),
        prompt,
    )
    .with_sampling(args.sampling.params(pipeline))
    .with_max_new_tokens(args.sampling.max_new_tokens)
    .with_top_logprobs(if args.json { args.top_logprobs } else { 0 });
    request.add_vision_id = args.media.add_vision_id;
    request.fetch = args.media.fetch();
    // The terminal gets the markup-free text of GroundingStream, so it needs the markers.
    request.stream_grounding_markup = !args.json;
    request.ignore_eos = args.ignore_eos;
    request
}

/// Ctrl-C stops the answer after the current token: what was written stays, `--json` still
/// prints the partial result (finish_reason "cancelled"), and the exit code is 130. A second
/// Ctrl-C (e.g. during a long vision pass, before any token) ends the process at once; the
/// shutdown action is registered first so it sees the flag before it is set. Returns the
/// flag to put in the request.
fn install_ctrl_c() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>, CliError> {
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sigint = signal_hook::consts::SIGINT;
    signal_hook::flag::register_conditional_shutdown(sigint, 130, cancel.clone())
        .and_then(|_| signal_hook::flag::register(sigint, cancel.clone()))
        .map_err(|e| CliError::Failed(format!("cannot install the Ctrl-C handler: {e}")))?;
    Ok(cancel)
}

/// Writes a piece of the answer to stdout at once (unbuffered, so it streams).
fn print(text: &str) {
    if !text.is_empty() {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

/// `--json`: the answer as one object, with the load time and the shapes in pixels of the
/// last image (`image_size` as `(width, height)`).
fn print_json(
    gen: &Generation,
    load_ms: f64,
    image_size: Option<(u32, u32)>,
    shapes: &[PixelShape],
) -> Result<(), CliError> {
    let mut value = serde_json::to_value(gen).map_err(|e| CliError::Failed(e.to_string()))?;
    value["timings"]["load_ms"] = serde_json::json!(load_ms);
    if let (Some(_), Some((width, height))) = (&gen.grounding, image_size) {
        value["grounding"]["pixels"] = serde_json::json!({
            "image": gen.images.len() - 1,
            "width": width,
            "height": height,
            "shapes": shapes,
        });
    }
    println!("{value}");
    Ok(())
}

/// After the streamed text: one line per box or quad, numbered as the markers in the text.
fn print_shapes(shapes: &[PixelShape], have_image: bool) {
    if shapes.is_empty() {
        return;
    }
    println!();
    if !have_image {
        println!("(no image in the request: coordinates are the model's own: 0-1000 for Qwen2-VL, resized-image pixels for Qwen2.5-VL)");
    }
    for s in shapes {
        println!("{}", shape_line(s));
    }
}

/// The shapes in pixels of the image (`(original, resized)` sizes, each `(width, height)`),
/// or in the model's coordinates (0-1000 for Qwen2-VL, resized-image pixels for Qwen2.5-VL)
/// when the request had no image.
fn pixel_shapes(g: &Grounding, sizes: Option<((u32, u32), (u32, u32))>) -> Vec<PixelShape> {
    match sizes {
        Some((original, resized)) => g.image_pixel_shapes(original, resized),
        None => g.shapes(),
    }
}

/// `[1] the red car: (123, 456)-(789, 1011)`; a quad lists its four points.
fn shape_line(s: &PixelShape) -> String {
    let label = s
        .label
        .as_deref()
        .map(|l| format!(" {l}:"))
        .unwrap_or_default();
    let pts: Vec<String> = s
        .points
        .iter()
        .map(|[x, y]| format!("({x}, {y})"))
        .collect();
    let sep = if s.kind == ShapeKind::Box { "-" } else { ", " };
    format!("[{}]{label} {}", s.number, pts.join(sep))
}

/// The last `--image`, decoded by the library's own loader (the pixels the model saw before
/// resizing: RGB, EXIF orientation not applied).
fn load_last_image(
    images: &[PathBuf],
    request: &GenerateRequest,
) -> Result<image::RgbImage, CliError> {
    let last = images
        .last()
        .ok_or_else(|| CliError::Usage("--draw-boxes needs an image (--image)".into()))?;
    let source =
        qwen2vl::processing::messages::ImageSource::Uri(last.to_string_lossy().into_owned());
    let fetched =
        qwen2vl::processing::fetch::fetch(&source, &request.fetch, request.base_dir.as_deref())?;
    Ok(qwen2vl::processing::image::decode_image(&fetched.bytes)?)
}

/// A hidden test hook, compiled into debug builds only: `QWEN2VL_TEST_GROUNDED_ANSWER` replaces
/// the model's answer (markers included) after generation. The tiny random test model never
/// writes boxes, and this is the only way to check the terminal listing, `--json` and
/// `--draw-boxes` end to end on a known answer.
fn test_answer() -> Option<String> {
    if cfg!(debug_assertions) {
        std::env::var("QWEN2VL_TEST_GROUNDED_ANSWER").ok()
    } else {
        None
    }
}

/// Makes `gen` describe `answer` (what the model would have produced with those markers):
/// `text` as skip_special_tokens would show it, `grounding` parsed from it. Used by `serve`'s
/// scripted test backend, which exists in debug builds only (so a release build of the CLI
/// does not warn about it).
#[cfg(debug_assertions)]
pub(crate) fn replace_answer(gen: &mut Generation, answer: &str) {
    replace_answer_for(gen, answer, qwen2vl::grounding::BoxCoordinates::Thousandths);
}

/// [`replace_answer`] for a model whose boxes are in `coordinates` (Qwen2.5-VL: pixels of the
/// resized image, JSON boxes included).
pub(crate) fn replace_answer_for(
    gen: &mut Generation,
    answer: &str,
    coordinates: qwen2vl::grounding::BoxCoordinates,
) {
    let mut text = answer.to_string();
    for m in qwen2vl::grounding::MARKERS {
        text = text.replace(m, "");
    }
    gen.text = text;
    gen.grounding = Some(Grounding::parse_for(answer, coordinates)).filter(Grounding::has_shapes);
}

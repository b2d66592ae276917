//! Peak memory and time of preparing and encoding one video through the vision tower.
//!
//! ```text
//! cargo run --release -p qwen2vl --example encode_video -- MODEL_DIR VIDEO [NFRAMES]
//! ```
//!
//! Prints the resident set after loading, after preprocessing and after the vision pass, the
//! process's peak (VmHWM) at each point, and the times. The whole model is loaded (as a user
//! running the model would), so the figures include the weights; the growth over the
//! post-load figure is what the video itself costs.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use qwen2vl::config::Qwen2VLConfig;
use qwen2vl::model::Qwen2VL;
use qwen2vl::processing::messages::{ContentPart, Message, Role, VideoPart};
use qwen2vl::processing::processor::{ProcessOptions, Processor};

/// `VmRSS` and `VmHWM` of this process in MiB (Linux; zeros elsewhere).
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn report(stage: &str, t: Instant) {
    let (rss, hwm) = memory();
    println!(
        "{stage:<14} {:>9.1} s   rss {:>8.0} MiB   peak {:>8.0} MiB",
        t.elapsed().as_secs_f64(),
        rss,
        hwm
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // As the CLI does: keep freed buffers in the process (see qwen2vl-cli's main.rs).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: allocator tuning only, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: encode_video MODEL_DIR VIDEO [NFRAMES]".into());
    }
    let dir = Path::new(&args[1]);
    let nframes = args.get(3).map(|s| s.parse::<usize>()).transpose()?;

    let t = Instant::now();
    let config = Qwen2VLConfig::from_file(&dir.join("config.json"))?;
    let processor = Processor::from_dir(dir, &config)?;
    let (model, _) = Qwen2VL::load(dir, DType::F32, &Device::Cpu)?;
    report("load", t);

    let t = Instant::now();
    let part = VideoPart {
        nframes,
        ..VideoPart::new(args[2].clone())
    };
    let messages = vec![Message::parts(
        Role::User,
        vec![
            ContentPart::Video(part),
            ContentPart::text("Describe this video."),
        ],
    )];
    let inputs = processor.process(&messages, &ProcessOptions::default())?;
    report("preprocess", t);
    let v = &inputs.videos[0];
    println!(
        "video: {} frames sampled, resized {}x{}, grid {:?}, {} LLM tokens, {} patches",
        v.frames,
        v.resized_hw.1,
        v.resized_hw.0,
        v.grid_thw,
        v.tokens,
        v.grid_thw.iter().product::<usize>()
    );

    let t = Instant::now();
    let embeds = model.encode_vision(&inputs.pixel_values_videos, &inputs.video_grid_thw)?;
    report("vision", t);
    println!("embeds: {:?}", embeds.dims());
    Ok(())
}

//! `qwen2vl bench`: the standard workload, timed.
//!
//! One image (a file, or a synthetic one of a given size), one prompt, N new tokens with
//! end-of-sequence ignored and greedy sampling, so every run does the same work; warm-up runs,
//! then timed runs. Reports load time, vision, prefill (ms and tokens/s), time to first token,
//! decode tokens/s and peak RSS as median, min and max, plus the machine's load average before
//! and after (a busy machine makes every figure worse). `tools/reference/bench_transformers.py`
//! runs the same workload through transformers.
//!
//! It also prints the arithmetic floor: the vision tower's and the prefill's floating-point
//! operations ([`qwen2vl::config::VisionConfig::flops`], [`qwen2vl::config::TextConfig::prefill_flops`])
//! divided by the rate this machine's matrix product reaches at the chosen dtype on the same
//! threads (measured after the runs, on a vision-MLP-sized product through the same layer
//! code the model uses), and the fraction of that floor the runs reached.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use qwen2vl::generation::{GenerateRequest, Generation};
use qwen2vl::processing::messages::{ContentPart, ImagePart, ImageSource, Message, Role};
use serde_json::json;

use crate::common::ModelArgs;
use crate::error::CliError;

/// Flags of `qwen2vl bench`.
#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The image to use (default: a synthetic image of --image-size).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["image_size", "no_image"])]
    pub image: Option<PathBuf>,
    /// Size of the synthetic image, WIDTHxHEIGHT.
    #[arg(long, default_value = "640x480", value_parser = parse_size)]
    pub image_size: (u32, u32),
    /// Text only: no image (the default for a model without a vision tower, such as a
    /// Qwen2 text model; --image is refused there).
    #[arg(long)]
    pub no_image: bool,
    /// The prompt.
    #[arg(long, default_value = "Describe this image.")]
    pub prompt: String,
    /// New tokens per run (end-of-sequence is ignored, so every run makes exactly this many).
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Untimed runs first (allocator growth, page faults, thread start-up).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{s:?} is not WIDTHxHEIGHT with both between 1 and 16384, e.g. 640x480");
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let w: u32 = w.trim().parse().map_err(|_| bad())?;
    let h: u32 = h.trim().parse().map_err(|_| bad())?;
    if !(1..=16384).contains(&w) || !(1..=16384).contains(&h) {
        return Err(bad());
    }
    Ok((w, h))
}

/// A deterministic test picture: colour gradients, a few hard-edged shapes and some noise,
/// so the vision tower sees something photo-like (its cost does not depend on content, but
/// the PNG decode does a little).
fn synthetic_image(w: u32, h: u32) -> image::RgbImage {
    let mut state: u32 = 0x9e37_79b9;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state >> 24) as i32 - 128
    };
    image::RgbImage::from_fn(w, h, |x, y| {
        let fx = x as f32 / w.max(2) as f32;
        let fy = y as f32 / h.max(2) as f32;
        let mut px = [
            (255.0 * fx) as i32,
            (255.0 * fy) as i32,
            (255.0 * (1.0 - fx) * (1.0 - fy)) as i32,
        ];
        let (cx, cy) = (fx - 0.35, fy - 0.5);
        if cx * cx + cy * cy < 0.04 {
            px = [220, 40, 40];
        }
        if (0.6..0.85).contains(&fx) && (0.2..0.7).contains(&fy) {
            px = [30, 160, 60];
        }
        let n = noise() / 16;
        image::Rgb(px.map(|c| (c + n).clamp(0, 255) as u8))
    })
}

/// `VmHWM` (peak resident set) of this process in bytes, if the kernel reports it.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak-RSS counter (Linux ≥ 4.0: writing 5 to `clear_refs`), so each run's peak
/// is its own. Returns whether it worked.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn load_average() -> Option<[f64; 3]> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = s.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// Median, min and max of some figures.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

impl Stat {
    fn of(values: &[f64]) -> Stat {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Stat {
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// Runs `qwen2vl bench`.
pub fn main(args: BenchArgs) -> Result<(), CliError> {
    if args.runs == 0 {
        return Err(CliError::Usage("--runs must be at least 1".into()));
    }
    if args.new_tokens == 0 {
        return Err(CliError::Usage("--new-tokens must be at least 1".into()));
    }
    let load_before = load_average();
    // The image first: a missing file should fail before the model loads.
    let mut image = bench_image(&args)?;
    let pipeline = args.model.load()?;
    if !pipeline.model().has_vision() {
        // A text model (Qwen2ForCausalLM, or a GGUF without --mmproj) benchmarks text only:
        // the default synthetic image is dropped; an explicit --image is refused.
        if let Some(p) = &args.image {
            return Err(CliError::Usage(format!(
                "--image {}: {}",
                p.display(),
                pipeline.model().no_vision_error()
            )));
        }
        image = None;
    }
    let mut parts = Vec::new();
    if let Some((src, _)) = &image {
        parts.push(ContentPart::Image(ImagePart::new(src.clone())));
    }
    parts.push(ContentPart::text(args.prompt.clone()));
    let mut request = GenerateRequest::new(vec![Message::parts(Role::User, parts)])
        .with_max_new_tokens(args.new_tokens);
    request.ignore_eos = true;
    let (runs, per_run_peak) = timed_runs(&args, &pipeline, &request)?;
    // Already checked by the load: a bad --dtype never gets here.
    let dtype = args.model.dtype.parse().unwrap_or_default();
    let floor = Floor::measure(&pipeline, &runs[0].0, dtype)?;
    let report = Report {
        threads: args
            .model
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        image_name: image.map(|(_, name)| name),
        load_ms: pipeline.load_ms(),
        load_before,
        load_after: load_average(),
        per_run_peak,
        runs,
        floor,
    };
    if args.json {
        println!("{}", report.json(&args));
    } else {
        print!("{}", report.table(&args));
    }
    Ok(())
}

/// The benchmark's image as bytes with a name for the report: `--image`'s file, a synthetic
/// PNG of `--image-size`, or none with `--no-image`.
fn bench_image(args: &BenchArgs) -> Result<Option<(ImageSource, String)>, CliError> {
    if args.no_image {
        return Ok(None);
    }
    if let Some(p) = &args.image {
        let bytes = std::fs::read(p)
            .map_err(|e| CliError::Usage(format!("cannot read --image {}: {e}", p.display())))?;
        return Ok(Some((ImageSource::Bytes(bytes), p.display().to_string())));
    }
    let (w, h) = args.image_size;
    let mut png = Vec::new();
    synthetic_image(w, h)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| CliError::Failed(format!("cannot encode the synthetic image: {e}")))?;
    Ok(Some((
        ImageSource::Bytes(png),
        format!("synthetic {w}x{h}"),
    )))
}

/// One timed run: its answer and its peak RSS in bytes, when the kernel reports it.
type TimedRun = (Generation, Option<u64>);

/// The warm-up runs, then the timed ones: each timed run's answer with its peak RSS, and
/// whether that peak is the run's own (the kernel could reset the counter between runs).
fn timed_runs(
    args: &BenchArgs,
    pipeline: &qwen2vl::pipeline::Pipeline,
    request: &GenerateRequest,
) -> Result<(Vec<TimedRun>, bool), CliError> {
    let quiet = args.model.quiet || args.json;
    let total = args.warmup + args.runs;
    let mut gens = Vec::with_capacity(args.runs);
    let can_reset = reset_peak_rss();
    for i in 0..total {
        if !quiet {
            let kind = if i < args.warmup { "warm-up" } else { "run" };
            eprint!("\r{kind} {}/{total} ...", i + 1);
            let _ = std::io::stderr().flush();
        }
        if can_reset {
            reset_peak_rss();
        }
        let gen = pipeline.generate(request, &mut |_| {})?;
        if i >= args.warmup {
            gens.push((gen, peak_rss_bytes()));
        }
    }
    if !quiet {
        eprintln!("\r{:30}", "");
    }
    Ok((gens, can_reset))
}

/// What a benchmark measured: the timed runs (at least one) and the machine around them.
struct Report {
    threads: usize,
    image_name: Option<String>,
    load_ms: f64,
    load_before: Option<[f64; 3]>,
    load_after: Option<[f64; 3]>,
    /// Whether each run's peak RSS is its own, not the process's so far.
    per_run_peak: bool,
    runs: Vec<TimedRun>,
    floor: Floor,
}

/// The arithmetic floor of a run: its vision and prefill FLOPs at the machine's measured
/// matrix-product rate.
struct Floor {
    /// GFLOP/s of the model dtype's products ([`qwen2vl::nn::product_gflops`]).
    peak_gflops: f64,
    vision_flops: f64,
    prefill_flops: f64,
}

impl Floor {
    /// Counts the FLOPs of `gen`'s prompt and measures the product rate of `dtype` (the
    /// requested one) now.
    fn measure(
        pipeline: &qwen2vl::pipeline::Pipeline,
        gen: &Generation,
        dtype: qwen2vl::pipeline::DTypeChoice,
    ) -> Result<Floor, CliError> {
        let dtype = dtype.dtype();
        let model = pipeline.model();
        let cfg = model.config();
        let grids: Vec<[usize; 3]> = gen
            .images
            .iter()
            .map(|i| i.grid_thw)
            .chain(gen.videos.iter().map(|v| v.grid_thw))
            .collect();
        let vision_flops = if grids.is_empty() {
            0.0
        } else {
            cfg.vision.flops(&grids)
        };
        let cached = gen.usage.prompt_cached_tokens;
        let prefill_flops = cfg
            .text
            .prefill_flops(gen.usage.prompt_tokens.saturating_sub(cached), cached);
        // The requested dtype, not the model's activations' (f32 for bf16 compute).
        let peak_gflops = qwen2vl::nn::product_gflops(dtype, model.device())?;
        Ok(Floor {
            peak_gflops,
            vision_flops,
            prefill_flops,
        })
    }

    /// Milliseconds `flops` take at the measured rate.
    fn ms(&self, flops: f64) -> f64 {
        flops / (self.peak_gflops * 1e6)
    }
}

impl Report {
    fn first(&self) -> &Generation {
        &self.runs[0].0
    }

    fn stat(&self, f: impl Fn(&Generation) -> f64) -> Stat {
        Stat::of(&self.runs.iter().map(|(g, _)| f(g)).collect::<Vec<_>>())
    }

    fn prefill_tps(&self) -> Stat {
        let n = self.first().usage.prompt_tokens as f64;
        self.stat(|g| n / (g.timings.prefill_ms / 1e3))
    }

    fn peak_mib(&self) -> Option<Stat> {
        let peaks: Vec<f64> = self
            .runs
            .iter()
            .filter_map(|(_, p)| p.map(|b| b as f64 / (1u64 << 20) as f64))
            .collect();
        (!peaks.is_empty()).then(|| Stat::of(&peaks))
    }

    /// The floor of `flops` over the median time of `f`, when there is work to time.
    fn fraction(&self, flops: f64, f: impl Fn(&Generation) -> f64) -> Option<f64> {
        let ms = self.stat(f).median;
        (flops > 0.0 && ms > 0.0).then(|| self.floor.ms(flops) / ms)
    }

    fn same_ids(&self) -> bool {
        let first = &self.first().token_ids;
        self.runs.iter().all(|(g, _)| &g.token_ids == first)
    }

    /// The `--json` object.
    fn json(&self, args: &BenchArgs) -> serde_json::Value {
        let first = self.first();
        json!({
            "engine": "qwen2vl",
            "version": env!("CARGO_PKG_VERSION"),
            "model": args.model.model,
            "dtype": args.model.dtype,
            "threads": self.threads,
            "image": self.image_name,
            "image_info": first.images.first(),
            "prompt_tokens": first.usage.prompt_tokens,
            "image_tokens": first.usage.prompt_image_tokens,
            "new_tokens": first.usage.completion_tokens,
            "warmup": args.warmup,
            "runs": args.runs,
            "load_ms": self.load_ms,
            "vision_ms": self.image_name.is_some().then(|| self.stat(|g| g.timings.vision_ms)),
            "prefill_ms": self.stat(|g| g.timings.prefill_ms),
            "prefill_tokens_per_s": self.prefill_tps(),
            "ttft_ms": self.stat(|g| g.timings.ttft_ms),
            "decode_tokens_per_s": self.stat(|g| g.timings.decode_tokens_per_s),
            "peak_rss_mib": self.peak_mib(),
            "peak_rss_per_run": self.per_run_peak,
            "token_ids": first.token_ids,
            "token_ids_same_every_run": self.same_ids(),
            "load_average_before": self.load_before,
            "load_average_after": self.load_after,
            "floor": {
                "product_gflops": self.floor.peak_gflops,
                "vision_flops": self.floor.vision_flops,
                "prefill_flops": self.floor.prefill_flops,
                "vision_floor_ms": self.floor.ms(self.floor.vision_flops),
                "prefill_floor_ms": self.floor.ms(self.floor.prefill_flops),
                "vision_fraction": self.fraction(self.floor.vision_flops, |g| g.timings.vision_ms),
                "prefill_fraction": self.fraction(self.floor.prefill_flops, |g| g.timings.prefill_ms),
            },
        })
    }

    /// The human-readable table.
    fn table(&self, args: &BenchArgs) -> String {
        let first = self.first();
        let img_desc = match (&self.image_name, first.images.first()) {
            (Some(name), Some(info)) => format!(
                "{name} → {}x{} ({} image tokens)",
                info.resized_hw.1, info.resized_hw.0, info.tokens
            ),
            _ => "none".to_string(),
        };
        let mut out = format!(
            "model {} ({}, {} threads)\nimage {img_desc}\nprompt {} tokens, {} new tokens (EOS ignored), {} warm-up + {} timed runs\n",
            args.model.model,
            args.model.dtype,
            self.threads,
            first.usage.prompt_tokens,
            args.new_tokens,
            args.warmup,
            args.runs
        );
        out.push_str(&format!(
            "load              {:>10.1} s\n",
            self.load_ms / 1e3
        ));
        out.push_str(&format!(
            "{:<18}{:>10} {:>10} {:>10}\n",
            "", "median", "min", "max"
        ));
        let mut row = |name: &str, s: Stat, prec: usize| {
            out.push_str(&format!(
                "{name:<18}{:>10.prec$} {:>10.prec$} {:>10.prec$}\n",
                s.median, s.min, s.max
            ));
        };
        if self.image_name.is_some() {
            row("vision ms", self.stat(|g| g.timings.vision_ms), 1);
        }
        row("prefill ms", self.stat(|g| g.timings.prefill_ms), 1);
        row("prefill tok/s", self.prefill_tps(), 1);
        row("TTFT ms", self.stat(|g| g.timings.ttft_ms), 1);
        row(
            "decode tok/s",
            self.stat(|g| g.timings.decode_tokens_per_s),
            2,
        );
        if let Some(p) = self.peak_mib() {
            let name = if self.per_run_peak {
                "peak RSS MiB"
            } else {
                "peak RSS MiB*"
            };
            row(name, p, 0);
            if !self.per_run_peak {
                out.push_str("* process peak so far (this kernel cannot reset it per run)\n");
            }
        }
        let fmt_load = |l: Option<[f64; 3]>| {
            l.map_or("unknown".to_string(), |l| {
                format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2])
            })
        };
        out.push_str(&format!(
            "load average      before {} · after {}\n",
            fmt_load(self.load_before),
            fmt_load(self.load_after)
        ));
        let fl = &self.floor;
        out.push_str(&format!(
            "arithmetic floor  vision {:.1} s ({:.2} TFLOP), prefill {:.1} s ({:.2} TFLOP) at {:.0} GFLOP/s\n",
            fl.ms(fl.vision_flops) / 1e3,
            fl.vision_flops / 1e12,
            fl.ms(fl.prefill_flops) / 1e3,
            fl.prefill_flops / 1e12,
            fl.peak_gflops
        ));
        out.push_str(&format!(
            "                  (the {} product rate of {} thread(s) here, measured after the runs)\n",
            args.model.dtype, self.threads
        ));
        let pct = |f: Option<f64>| f.map_or("-".to_string(), |f| format!("{:.0}%", f * 100.0));
        let both = self.fraction(fl.vision_flops + fl.prefill_flops, |g| {
            g.timings.vision_ms + g.timings.prefill_ms
        });
        out.push_str(&format!(
            "floor reached     vision {}, prefill {}, both {}\n",
            pct(self.fraction(fl.vision_flops, |g| g.timings.vision_ms)),
            pct(self.fraction(fl.prefill_flops, |g| g.timings.prefill_ms)),
            pct(both)
        ));
        let ids = if self.same_ids() {
            "the same in every run"
        } else {
            "DIFFER between runs"
        };
        out.push_str(&format!("token ids         {ids}\n"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("640x480"), Ok((640, 480)));
        assert_eq!(parse_size("28X28"), Ok((28, 28)));
        assert!(parse_size("640").is_err());
        assert!(parse_size("0x10").is_err());
        assert!(parse_size("20000x10").is_err());
        assert!(parse_size("axb").unwrap_err().contains("WIDTHxHEIGHT"));
    }

    #[test]
    fn medians() {
        let s = Stat::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Stat::of(&[4.0, 1.0, 2.0, 3.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
    }

    #[test]
    fn synthetic_image_is_deterministic_and_sized() {
        let a = synthetic_image(64, 48);
        let b = synthetic_image(64, 48);
        assert_eq!(a.dimensions(), (64, 48));
        assert!(a == b);
        // Not flat: the vision tower should see structure.
        let first = a.get_pixel(0, 0);
        assert!(a.pixels().any(|p| p != first));
    }
}

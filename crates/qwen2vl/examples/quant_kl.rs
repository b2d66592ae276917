//! How far quantization moves the model's numbers on real text, measured the way llama.cpp's
//! `llama-perplexity --kl-divergence` measures it, so the two engines' figures sit side by
//! side (issue 12, "Accuracy").
//!
//! The text is tokenized with the model's tokenizer (no BOS: Qwen2's GGUF says
//! `add_bos_token = false`, and llama.cpp then adds none) and cut into `--chunks` chunks of
//! `--ctx` tokens, each run from position 0 with an empty cache. As in llama-perplexity, only
//! the second half of a chunk is scored: the logits at positions `ctx/2 ..= ctx-2`, each
//! predicting the next token of the chunk (255 per chunk at 512).
//!
//! Every scored row of a format is compared with the same row of a base:
//! - KLD(p_base ‖ p_format) over the tokens whose base log-probability is above -16, with the
//!   base log-probabilities first rounded to llama.cpp's 16-bit grid (the span from the top
//!   log-probability down to 16 below it in 65535 steps), as its `--kl-divergence-base` file
//!   stores them; mean ± standard error, maximum, 99th percentile and median;
//! - "same top": the format's argmax equals the argmax of the rounded base log-probabilities;
//! - Δp = p_format(next token) − p_base(next token): its RMS and largest magnitude;
//! - ln(PPL(format)/PPL(base)) over the scored tokens;
//! - where the base has raw logits: the KLD with no rounding (f64), and max and mean
//!   |Δlogit| over the whole vocabulary.
//!
//! Sources (each usable as a base or a format):
//! - `f32`, `f16`, `bf16`: the safetensors model at that compute dtype;
//! - `q8_0`, `q4_k`, `q6_k`, `q4_k_m`: the safetensors model quantized at load (`--quant`);
//! - `PATH.gguf`: a llama.cpp GGUF text model loaded by this engine (f32 compute);
//! - `llama:PATH.kld`: the log-probabilities llama.cpp saved with `--kl-divergence-base`
//!   (its f16 base, or any of its formats saved the same way). Its token ids are checked
//!   against ours first. They are floored 16 below the top, so as a format (not a base)
//!   its KLD figures are lower bounds (marked ≥); its "same top" is exact.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo run --release -p qwen2vl --example quant_kl -- \
//!     --model /tmp/qwen2vl-2b-random --text TEXT --ctx 512 --chunks 4 \
//!     --bases f32,F16.gguf,llama:base.kld --formats q8_0,q4_k_m,Q8_0.gguf,Q4_K_M.gguf
//! ```
//!
//! Every format is compared with every base, and each base with the bases before it.
//! Figures and commands: docs/benchmarks.md ("accuracy of the quantized formats next to
//! llama.cpp").

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use qwen2vl::ops::quant::plan::QuantScheme;
use qwen2vl::pipeline::{DTypeChoice, LoadOptions, Pipeline};
use qwen2vl::processing::tokenizer::Qwen2Tokenizer;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// llama.cpp's `--kl-divergence-base` keeps log-probabilities down to this far below the top.
const SPAN: f32 = 16.0;

struct Args {
    model: PathBuf,
    text: PathBuf,
    ctx: usize,
    chunks: usize,
    bases: Vec<String>,
    formats: Vec<String>,
}

fn parse_args() -> Res<Args> {
    let mut args = Args {
        model: PathBuf::from("/tmp/qwen2vl-2b-random"),
        text: PathBuf::new(),
        ctx: 512,
        chunks: 4,
        bases: vec!["f32".into()],
        formats: vec!["q8_0".into(), "q4_k_m".into()],
    };
    let list = |s: String| s.split(',').map(str::to_string).collect::<Vec<_>>();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = value()?.into(),
            "--text" => args.text = value()?.into(),
            "--ctx" => args.ctx = value()?.parse()?,
            "--chunks" => args.chunks = value()?.parse()?,
            "--bases" => args.bases = list(value()?),
            "--formats" => args.formats = list(value()?),
            _ => return Err(format!("unknown argument {flag}").into()),
        }
    }
    if args.text.as_os_str().is_empty() {
        return Err("--text FILE is required".into());
    }
    if args.ctx < 4 {
        return Err("--ctx must be at least 4".into());
    }
    Ok(args)
}

/// The scored rows of one source: `rows[chunk][i]` are the logits (or log-probabilities) at
/// position `ctx/2 + i` of that chunk.
struct Rows {
    name: String,
    rows: Vec<Vec<Vec<f32>>>,
    /// Raw logits (false for llama.cpp's rounded log-probabilities).
    raw: bool,
}

/// Runs a model over every chunk and keeps the scored rows' logits.
fn model_rows(spec: &str, dir: &Path, chunks: &[Vec<u32>], ctx: usize) -> Res<Rows> {
    let mut options = LoadOptions::default();
    let path = if spec.ends_with(".gguf") {
        PathBuf::from(spec)
    } else {
        match spec {
            "f32" => {}
            "f16" => options.dtype = DTypeChoice::F16,
            "bf16" => options.dtype = DTypeChoice::BF16,
            q => options.quant = Some(q.parse::<QuantScheme>()?),
        }
        dir.to_path_buf()
    };
    let start = Instant::now();
    let pipeline = Pipeline::load_with(&path, &options)?;
    eprintln!("{spec}: loaded in {:.1} s", start.elapsed().as_secs_f64());
    let model = pipeline.model();
    let first = ctx / 2;
    let mut rows = Vec::new();
    for (c, ids) in chunks.iter().enumerate() {
        let start = Instant::now();
        let positions = model.position_ids(ids, &[], &[])?;
        let mut cache = model.new_cache(ids.len())?;
        let h = model.prefill_hidden(ids, &positions, None, None, &mut cache, None)?;
        let h = h.squeeze(0)?.narrow(0, first, ctx - 1 - first)?;
        let logits = model.text().logits(&h)?;
        rows.push(logits.to_vec2::<f32>()?);
        eprintln!(
            "{spec}: chunk {}/{} in {:.1} s",
            c + 1,
            chunks.len(),
            start.elapsed().as_secs_f64()
        );
    }
    let name = Path::new(spec)
        .file_name()
        .map_or(spec.to_string(), |n| n.to_string_lossy().into_owned());
    Ok(Rows {
        name,
        rows,
        raw: true,
    })
}

fn read_u32(r: &mut impl Read) -> Res<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Reads llama.cpp's `--kl-divergence-base` file: a `_logits_` tag, n_ctx, n_vocab, n_chunk,
/// the n_chunk x n_ctx token ids it used, then per chunk and scored row two f32 (scale, lowest
/// log-probability), one unused f32 and the vocabulary's log-probabilities as u16 steps above
/// the lowest. Checks its tokens against ours.
fn llama_rows(path: &Path, chunks: &[Vec<u32>], ctx: usize) -> Res<Rows> {
    let mut r = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut tag = [0u8; 8];
    r.read_exact(&mut tag)?;
    if &tag != b"_logits_" {
        return Err(format!("{} is not a llama.cpp log-probability file", path.display()).into());
    }
    let n_ctx = read_u32(&mut r)? as usize;
    let n_vocab = read_u32(&mut r)? as usize;
    let n_chunk = read_u32(&mut r)? as usize;
    if n_ctx != ctx || n_chunk < chunks.len() {
        return Err(format!(
            "{}: ctx {n_ctx} and {n_chunk} chunks; asked for ctx {ctx} and {} chunks",
            path.display(),
            chunks.len()
        )
        .into());
    }
    let mut tokens = vec![0u8; 4 * n_ctx * n_chunk];
    r.read_exact(&mut tokens)?;
    let tokens: Vec<u32> = tokens
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    for (c, ids) in chunks.iter().enumerate() {
        let theirs = &tokens[c * n_ctx..(c + 1) * n_ctx];
        if let Some(i) = (0..n_ctx).find(|&i| theirs[i] != ids[i]) {
            return Err(format!(
                "chunk {c}: llama.cpp's token {i} is {} where ours is {}",
                theirs[i], ids[i]
            )
            .into());
        }
    }
    eprintln!(
        "llama.cpp base: the {} x {n_ctx} token ids equal ours",
        chunks.len()
    );
    let nv = 2 * n_vocab.div_ceil(2) + 4;
    let scored = n_ctx - 1 - n_ctx / 2;
    let mut buf = vec![0u8; 2 * nv];
    let mut rows = Vec::new();
    for _ in 0..chunks.len() {
        let mut chunk = Vec::with_capacity(scored);
        for _ in 0..scored {
            r.read_exact(&mut buf)?;
            let f = |i: usize| f32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
            let (scale, lowest) = (f(0), f(4));
            let row: Vec<f32> = buf[8..8 + 2 * n_vocab]
                .chunks_exact(2)
                .map(|b| scale * u16::from_le_bytes([b[0], b[1]]) as f32 + lowest)
                .collect();
            chunk.push(row);
        }
        rows.push(chunk);
    }
    Ok(Rows {
        name: format!("llama.cpp {}", path.display()),
        rows,
        raw: false,
    })
}

/// Largest value, its first index, and ln Σ exp(x - max) (summed in f64).
fn max_lse(x: &[f32]) -> (f32, usize, f32) {
    let mut imax = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[imax] {
            imax = i;
        }
    }
    let m = x[imax];
    let sum: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
    (m, imax, sum.ln() as f32)
}

/// Log-probabilities of `logits` on llama.cpp's 16-bit grid: the span from the largest logit
/// down to `SPAN` below it (or the smallest, if nearer) in 65535 steps; everything below the
/// span sits at its bottom.
fn rounded_log_probs(logits: &[f32]) -> Vec<f32> {
    let (max, _, lse) = max_lse(logits);
    let min = logits
        .iter()
        .fold(f32::INFINITY, |a, &v| a.min(v))
        .max(max - SPAN);
    let lowest = min - max - lse;
    let scale = (max - min) / 65535.0;
    if scale == 0.0 {
        return vec![lowest; logits.len()];
    }
    logits
        .iter()
        .map(|&v| {
            let steps = if v > min {
                ((v - min) / scale).round()
            } else {
                0.0
            };
            scale * steps + lowest
        })
        .collect()
}

#[derive(Default)]
struct Stats {
    kld: Vec<f64>,
    kld_exact: f64,
    exact_rows: usize,
    same_top: usize,
    nll: f64,
    nll_base: f64,
    p_diff2: Vec<f64>,
    max_p_diff: f64,
    abs_sum: f64,
    abs_max: f64,
    abs_count: usize,
    format_raw: bool,
}

impl Stats {
    /// One scored row: the format's row `q`, the base's row `b` (raw logits when `raw`, else
    /// rounded log-probabilities), and the token that follows. |Δlogit| needs both raw.
    fn add(&mut self, q: &[f32], b: &[f32], raw: bool, both_raw: bool, next: usize) {
        let (qmax, qarg, qlse) = max_lse(q);
        let lq = |i: usize| q[i] - qmax - qlse;
        let lb = if raw {
            rounded_log_probs(b)
        } else {
            b.to_vec()
        };
        let mut barg = 0;
        let mut kld = 0f64;
        for (i, &l) in lb.iter().enumerate() {
            if l > lb[barg] {
                barg = i;
            }
            if l > -SPAN {
                kld += (l as f64).exp() * (l - lq(i)) as f64;
            }
        }
        self.kld.push(kld);
        self.same_top += usize::from(qarg == barg);
        let nll = -lq(next) as f64;
        let nll_base = -lb[next] as f64;
        self.nll += nll;
        self.nll_base += nll_base;
        let p_diff = (-nll).exp() - (-nll_base).exp();
        self.p_diff2.push(p_diff * p_diff);
        self.max_p_diff = self.max_p_diff.max(p_diff.abs());
        if raw {
            let (bmax, _, blse) = max_lse(b);
            let mut exact = 0f64;
            for (i, (&bv, &qv)) in b.iter().zip(q).enumerate() {
                let lbe = (bv - bmax - blse) as f64;
                exact += lbe.exp() * (lbe - lq(i) as f64);
                if !both_raw {
                    continue;
                }
                let d = (qv as f64 - bv as f64).abs();
                self.abs_sum += d;
                self.abs_max = self.abs_max.max(d);
            }
            if both_raw {
                self.abs_count += b.len();
            }
            self.kld_exact += exact;
            self.exact_rows += 1;
        }
    }

    fn row(&self, format: &str, base: &str) -> String {
        let n = self.kld.len() as f64;
        let (mean, err) = mean_err(&self.kld);
        let mut sorted = self.kld.clone();
        sorted.sort_by(f64::total_cmp);
        let pct = |f: f64| {
            let p = f * (sorted.len() - 1) as f64;
            let (i, frac) = (p as usize, p.fract());
            (1.0 - frac) * sorted[i] + frac * sorted[(i + 1).min(sorted.len() - 1)]
        };
        let top = self.same_top as f64 / n;
        let top_err = (top * (1.0 - top) / (n - 1.0)).sqrt();
        let rms = (self.p_diff2.iter().sum::<f64>() / n).sqrt();
        let ln_ratio = (self.nll - self.nll_base) / n;
        let exact = if self.exact_rows > 0 {
            format!("{:.6}", self.kld_exact / n)
        } else {
            "—".into()
        };
        let raw = if self.abs_count > 0 {
            format!(
                "| {exact} | {:.4} | {:.5}",
                self.abs_max,
                self.abs_sum / self.abs_count as f64
            )
        } else {
            format!("| {exact} | — | —")
        };
        // A format read from llama.cpp's file has its log-probabilities floored 16 below its
        // top, which can only lower the KLD: a lower bound.
        let ge = if self.format_raw { "" } else { "≥ " };
        format!(
            "| {format} | {base} | {ge}{mean:.6} ± {err:.6} | {ge}{:.6} | {ge}{:.6} | {ge}{:.6} | {:.2} ± {:.2} % | {:.3} % | {:.3} % | {ln_ratio:.5} {raw} |",
            sorted[sorted.len() - 1],
            pct(0.99),
            pct(0.5),
            100.0 * top,
            100.0 * top_err,
            100.0 * rms,
            100.0 * self.max_p_diff,
        )
    }
}

/// Mean and its standard error, as llama.cpp reports them.
fn mean_err(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| x * x).sum::<f64>() / n - mean * mean;
    let err = if var > 0.0 && n > 10.0 {
        (var / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (mean, err)
}

fn compare(format: &Rows, base: &Rows, chunks: &[Vec<u32>], ctx: usize) -> String {
    let first = ctx / 2;
    let mut stats = Stats {
        format_raw: format.raw,
        ..Stats::default()
    };
    for (c, ids) in chunks.iter().enumerate() {
        for (i, (q, b)) in format.rows[c].iter().zip(&base.rows[c]).enumerate() {
            stats.add(
                q,
                b,
                base.raw,
                base.raw && format.raw,
                ids[first + i + 1] as usize,
            );
        }
    }
    stats.row(&format.name, &base.name)
}

/// How peaked a source's distributions are: mean top-1 probability, mean standard deviation
/// of a row's logits, and how often the top-1 token is the text's next token.
fn describe(rows: &Rows, chunks: &[Vec<u32>], ctx: usize) -> String {
    let (mut top, mut spread, mut hits, mut n) = (0f64, 0f64, 0usize, 0usize);
    for (c, ids) in chunks.iter().enumerate() {
        for (i, row) in rows.rows[c].iter().enumerate() {
            let (_, arg, lse) = max_lse(row);
            top += f64::from(-lse).exp();
            let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / row.len() as f64;
            let var = row
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / row.len() as f64;
            spread += var.sqrt();
            hits += usize::from(arg == ids[ctx / 2 + i + 1] as usize);
            n += 1;
        }
    }
    let n = n as f64;
    format!(
        "{}: mean top-1 probability {:.3}, logit std {:.2}{}, top-1 = next token in {:.1}%",
        rows.name,
        top / n,
        spread / n,
        if rows.raw {
            ""
        } else {
            " (of log-probabilities)"
        },
        100.0 * hits as f64 / n
    )
}

const HEADER: &str = "| format | base | mean KLD | max KLD | 99% KLD | median KLD | same top | RMS Δp | max |Δp| | ln(PPL/PPL base) | KLD unrounded | max |Δlogit| | mean |Δlogit| |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|";

fn main() -> Res<()> {
    let args = parse_args()?;
    let text = std::fs::read_to_string(&args.text)?;
    let tokenizer = Qwen2Tokenizer::from_dir(&args.model)?;
    // llama.cpp tokenizes without parsing special-token text.
    let ids = tokenizer.encode_literal(&text)?;
    if ids.len() < 2 * args.ctx {
        return Err(format!(
            "{} tokenizes to {} tokens; at least {} are needed",
            args.text.display(),
            ids.len(),
            2 * args.ctx
        )
        .into());
    }
    let n_chunks = args.chunks.min(ids.len() / args.ctx);
    let chunks: Vec<Vec<u32>> = ids
        .chunks_exact(args.ctx)
        .take(n_chunks)
        .map(<[u32]>::to_vec)
        .collect();
    println!(
        "text {} ({} chars, {} tokens): {n_chunks} chunks of {}, {} scored positions",
        args.text.display(),
        text.chars().count(),
        ids.len(),
        args.ctx,
        n_chunks * (args.ctx - 1 - args.ctx / 2)
    );
    let load = |spec: &str| -> Res<Rows> {
        match spec.strip_prefix("llama:") {
            Some(path) => llama_rows(Path::new(path), &chunks, args.ctx),
            None => model_rows(spec, &args.model, &chunks, args.ctx),
        }
    };
    let mut bases = Vec::new();
    let mut lines = Vec::new();
    for spec in &args.bases {
        let rows = load(spec)?;
        println!("{}", describe(&rows, &chunks, args.ctx));
        for base in &bases {
            let line = compare(&rows, base, &chunks, args.ctx);
            eprintln!("{line}");
            lines.push(line);
        }
        bases.push(rows);
    }
    for spec in &args.formats {
        let rows = load(spec)?;
        for base in &bases {
            let line = compare(&rows, base, &chunks, args.ctx);
            eprintln!("{line}");
            lines.push(line);
        }
    }
    println!("{HEADER}");
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

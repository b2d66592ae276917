//! Decode throughput of the continuous-batching engine with 1, 4 and 8 concurrent greedy
//! requests, and the cost of one batched decode step against B single steps.
//!
//! ```text
//! cargo run --release -p qwen2vl --example engine_throughput -- [MODEL] [TOKENS] [THREADS] [QUANT]
//! ```
//!
//! MODEL is a model directory or a GGUF file (or a directory of them); QUANT (`q8_0`,
//! `q4_k_m`, ...) quantizes a safetensors model as it loads, like `--quant`.
//!
//! MODEL_DIR defaults to the tiny fixture model (`tests/fixtures/tiny-qwen2vl`); each request
//! generates TOKENS tokens (default 64, EOS ignored). Two tables:
//! - `decode_step`: milliseconds of one model step for a batch of B sequences (caches of
//!   different lengths), next to B separate single-sequence steps;
//! - engine: N text requests submitted at once through [`Engine`]; wall time from the first
//!   submit to the last `Finished`, generated tokens per second over all requests, the mean
//!   batch size the scheduler reached, and the mean per-request decode rate.
//!
//! What it showed before `ops::gemv` (tiny model, 2 cores): one step for B = 8 cost about 0.7x
//! of eight single steps, but B = 2 cost 1.2-2x two single steps, because candle's CPU gemm runs
//! a one-row product as a fast gemv and two to eight rows through its packed general kernel,
//! 3-4x slower per call (2B shapes: the LM head ~40 ms for one row, ~80-120 ms for 2-8).
//!
//! Since `Linear` runs up to 16 rows through our small-batch kernel (`qwen2vl::ops::gemv`:
//! each weight row read once and dotted with all B inputs), every B pays. On the 2B shapes,
//! 2 threads, 16 tokens (load average 1.6-2.0; `QWEN2VL_GEMV=0` is candle's path in the same
//! binary): a B = 2 step costs 311 ms against 436 ms, B = 8 600-710 ms against 878 ms and
//! 2.9x less than eight single steps; engine throughput with 4-8 requests is 4.3-6.1 tok/s
//! against 3.0-3.4. Figures and commands: docs/benchmarks.md.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use qwen2vl::engine::{Engine, EngineConfig, EngineEvent};
use qwen2vl::generation::GenerateRequest;
use qwen2vl::pipeline::{DTypeChoice, LoadOptions, Pipeline};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args
        .first()
        .filter(|a| !a.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-qwen2vl")
        });
    let tokens: usize = args.get(1).map_or(Ok(64), |s| s.parse())?;
    if let Some(t) = args.get(2) {
        std::env::set_var("RAYON_NUM_THREADS", t);
    }
    let quant = args.get(3).map(|q| q.parse()).transpose()?;
    let options = LoadOptions {
        dtype: DTypeChoice::F32,
        quant,
        vision_quant: None,
        progress: None,
        mmproj: None,
        encoder_cache_mb: 0,
        prefix_cache_mb: 0,
    };
    let pipeline = Arc::new(Pipeline::load_with(&model, &options)?);
    println!(
        "model {}  threads {}  tokens/request {tokens}  quant {:?}",
        model.display(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into()),
        quant
    );

    // 1. One batched decode step vs B single steps.
    println!("\ndecode_step        batch of B     B single steps   ratio");
    let m = pipeline.model();
    for b in [1usize, 2, 4, 8] {
        let mut caches = Vec::new();
        for i in 0..b {
            let mut c = m.new_cache(512)?;
            // Unequal lengths, as under continuous batching.
            for t in 0..(8 + 13 * i) {
                m.decode_step(&[100 + t as u32], &[0], &mut [&mut c])?;
            }
            caches.push(c);
        }
        let toks: Vec<u32> = (0..b as u32).map(|i| 200 + i).collect();
        let deltas = vec![0i64; b];
        let reps = 20;
        let t = Instant::now();
        for _ in 0..reps {
            let mut refs: Vec<&mut _> = caches.iter_mut().collect();
            m.decode_step(&toks, &deltas, &mut refs)?;
        }
        let batched = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
        let t = Instant::now();
        for _ in 0..reps {
            for (c, &tok) in caches.iter_mut().zip(&toks) {
                m.decode_step(&[tok], &[0], &mut [c])?;
            }
        }
        let single = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
        println!(
            "B = {b}            {batched:>8.2} ms    {single:>8.2} ms      {:.2}x",
            single / batched
        );
    }

    // 2. The engine with N concurrent requests.
    println!(
        "\nengine   requests   wall s   tok/s (all)   mean batch   tok/s per request   decode tok/s (all)"
    );
    let prompts = [
        "Tell me a story about a lighthouse.",
        "Why is the sky blue?",
        "List ten fruits.",
        "Explain continuous batching.",
        "Write a haiku about rust.",
        "What is a vision-language model?",
        "Describe a sunset over the sea.",
        "How do transformers work?",
    ];
    for n in [1usize, 4, 8] {
        let engine = Engine::start(
            pipeline.clone(),
            EngineConfig {
                max_running: 8,
                ..Default::default()
            },
        );
        // Warm-up request (allocator, thread pool).
        run(&engine, &prompts[..1], 8)?;
        let before = engine.stats();
        let t = Instant::now();
        let rates = run(&engine, &prompts[..n], tokens)?;
        let wall = t.elapsed().as_secs_f64();
        let after = engine.stats();
        let steps = after.decode_steps_total - before.decode_steps_total;
        let seqs = after.decode_batch_sequences_total - before.decode_batch_sequences_total;
        let generated = after.completion_tokens_total - before.completion_tokens_total;
        // The last column sums the requests' own decode rates (tokens after the first over
        // the time since it): the batch's decode throughput, without the prompts' prefill
        // that the wall-clock figure also holds.
        println!(
            "         {n:>8}   {wall:>6.2}   {:>11.1}   {:>10.2}   {:>17.1}   {:>18.1}",
            generated as f64 / wall,
            seqs as f64 / steps.max(1) as f64,
            rates.iter().sum::<f64>() / rates.len() as f64,
            rates.iter().sum::<f64>()
        );
        engine.shutdown();
    }
    Ok(())
}

/// Submits one request per prompt at once and waits for all; returns each request's decode
/// tokens per second.
fn run(
    engine: &Engine,
    prompts: &[&str],
    tokens: usize,
) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let mut subs = Vec::new();
    for p in prompts {
        let mut req = GenerateRequest::from_prompt(None, &[], p).with_max_new_tokens(tokens);
        req.ignore_eos = true;
        subs.push(engine.submit(req).map_err(|e| e.to_string())?);
    }
    let mut rates = Vec::new();
    for mut s in subs {
        while let Some(ev) = s.events.blocking_recv() {
            match ev {
                EngineEvent::Finished(g) => rates.push(g.timings.decode_tokens_per_s),
                EngineEvent::Failed(e) => return Err(e.into()),
                _ => {}
            }
        }
    }
    Ok(rates)
}

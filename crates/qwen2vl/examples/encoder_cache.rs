//! A second question about the same image, without and with the encoder and prefix caches
//! (issue 13): time to first token and its parts, and whether the answers agree.
//!
//! `cargo run --release -p qwen2vl --example encoder_cache -- MODEL_DIR IMAGE [THREADS] [NEW]`
//!
//! Runs question B alone with the caches off, then question A (which fills them) and
//! question B again with them on; B's greedy tokens must be the same both times.

use std::sync::Arc;

use qwen2vl::encoder_cache::EncoderCache;
use qwen2vl::generation::{GenerateRequest, Generation};
use qwen2vl::pipeline::{DTypeChoice, Pipeline};
use qwen2vl::prefix_cache::PrefixCache;

fn ask(p: &Pipeline, image: &str, question: &str, new: usize) -> qwen2vl::Result<Generation> {
    let req =
        GenerateRequest::from_prompt(None, &[image.into()], question).with_max_new_tokens(new);
    p.generate(&req, &mut |_| {})
}

fn show(what: &str, g: &Generation) {
    let t = &g.timings;
    println!(
        "{what:<34} preprocess {:>8.1} ms  vision {:>9.1} ms  prefill {:>8.1} ms  TTFT {:>9.1} ms  ({} of {} prompt tokens cached)",
        t.preprocess_ms, t.vision_ms, t.prefill_ms, t.ttft_ms, g.usage.prompt_cached_tokens, g.usage.prompt_tokens
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(model), Some(image)) = (args.get(1), args.get(2)) else {
        return Err("usage: encoder_cache MODEL_DIR IMAGE [THREADS] [NEW_TOKENS]".into());
    };
    if let Some(t) = args.get(3) {
        std::env::set_var("RAYON_NUM_THREADS", t);
    }
    let new: usize = args.get(4).map(|n| n.parse()).transpose()?.unwrap_or(8);
    let mut p = Pipeline::load(model.as_ref(), DTypeChoice::F32)?;
    let (a, b) = ("Describe this image.", "What colours are in this picture?");

    let uncached = ask(&p, image, b, new)?;
    show("B, cache off", &uncached);

    p.set_encoder_cache(Arc::new(EncoderCache::with_mb(512)));
    p.set_prefix_cache(Arc::new(PrefixCache::with_mb(1024)));
    let first = ask(&p, image, a, new)?;
    show("A, cache on (fills it)", &first);
    let second = ask(&p, image, b, new)?;
    show("B, cache on (same image again)", &second);
    println!("encoder cache: {:?}", p.encoder_cache().stats());
    println!("prefix cache: {:?}", p.prefix_cache().stats());
    println!(
        "B's tokens with and without the cache: {}",
        if second.token_ids == uncached.token_ids {
            "identical"
        } else {
            "DIFFERENT"
        }
    );
    Ok(())
}

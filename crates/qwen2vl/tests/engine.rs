//! The continuous-batching engine on the tiny fixture model: a request's tokens are the
//! same alone ([`Pipeline::generate`]) and batched with others; cancellation, queue limits,
//! KV admission and bad input behave as documented in `qwen2vl::engine`.
//!
//! Token ids are compared exactly: the decoder computes every row of a batch independently
//! (per-sequence attention over its own cache, no padding), so batching must not change a
//! single argmax.

mod common;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use qwen2vl::engine::{Engine, EngineConfig, EngineEvent, EngineStats, Submission, SubmitError};
use qwen2vl::generation::sampler::SamplingParams;
use qwen2vl::generation::{GenerateRequest, Generation};
use qwen2vl::pipeline::{DTypeChoice, Pipeline};

fn pipeline() -> Arc<Pipeline> {
    static P: OnceLock<Arc<Pipeline>> = OnceLock::new();
    P.get_or_init(|| {
        Arc::new(
            Pipeline::load(&common::fixtures().join("tiny-qwen2vl"), DTypeChoice::F32)
                .expect("tiny model loads"),
        )
    })
    .clone()
}

fn image(name: &str) -> PathBuf {
    common::fixtures().join("images").join(name)
}

fn text_request(prompt: &str, max_new: usize) -> GenerateRequest {
    GenerateRequest::from_prompt(None, &[], prompt).with_max_new_tokens(max_new)
}

fn image_request(images: &[&str], prompt: &str, max_new: usize) -> GenerateRequest {
    let paths: Vec<PathBuf> = images.iter().map(|n| image(n)).collect();
    GenerateRequest::from_prompt(None, &paths, prompt).with_max_new_tokens(max_new)
}

/// A request that runs until cancelled (EOS ignored, a long limit).
fn endless(prompt: &str) -> GenerateRequest {
    let mut r = text_request(prompt, 20_000);
    r.ignore_eos = true;
    r
}

/// What a submission produced.
struct Outcome {
    started: Option<(usize, usize, usize)>,
    tokens: Vec<u32>,
    streamed: String,
    finished: Option<Generation>,
    failed: Option<qwen2vl::Error>,
}

fn collect(s: Submission) -> Outcome {
    collect_rest(s, false)
}

/// The rest of a submission's events, after the caller took some (`seen_start`: it took
/// `Started`).
fn collect_rest(mut s: Submission, seen_start: bool) -> Outcome {
    let mut o = Outcome {
        started: seen_start.then_some((0, 0, 0)),
        tokens: vec![],
        streamed: String::new(),
        finished: None,
        failed: None,
    };
    while let Some(ev) = s.events.blocking_recv() {
        match ev {
            EngineEvent::Started {
                prompt_tokens,
                image_tokens,
                video_tokens,
            } => {
                assert!(o.started.is_none() && o.tokens.is_empty(), "Started first");
                o.started = Some((prompt_tokens, image_tokens, video_tokens));
            }
            EngineEvent::Token { id, text, logprob } => {
                assert!(o.started.is_some(), "Token after Started");
                assert_eq!(logprob.as_ref().map(|l| l.id), Some(id));
                o.tokens.push(id);
                o.streamed.push_str(&text);
            }
            EngineEvent::Finished(g) => {
                assert!(
                    o.finished.is_none() && o.failed.is_none(),
                    "one final event"
                );
                o.finished = Some(g);
            }
            EngineEvent::Failed(e) => {
                assert!(
                    o.finished.is_none() && o.failed.is_none(),
                    "one final event"
                );
                o.failed = Some(e);
            }
        }
    }
    o
}

fn finished(o: &Outcome) -> &Generation {
    match (&o.finished, &o.failed) {
        (Some(g), _) => g,
        (None, Some(e)) => panic!("request failed: {e}"),
        (None, None) => panic!("no final event"),
    }
}

fn alone(req: &GenerateRequest) -> Generation {
    pipeline()
        .generate(req, &mut |_| {})
        .expect("generate alone")
}

/// Polls the stats until `pred` holds (at most 10 s).
fn wait_for(engine: &Engine, what: &str, pred: impl Fn(&EngineStats) -> bool) -> EngineStats {
    let t = Instant::now();
    loop {
        let s = engine.stats();
        if pred(&s) {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out: {what}: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn config(max_running: usize, max_queue: usize, kv: usize) -> EngineConfig {
    EngineConfig {
        max_running,
        max_queue,
        kv_budget_tokens: kv,
        ..Default::default()
    }
}

/// Requests of different lengths, images and limits; EOS ignored on most so their lengths
/// really differ.
fn mixed_requests() -> Vec<GenerateRequest> {
    let mut v = vec![
        text_request("Hello! Tell me a story about a lighthouse.", 12),
        image_request(&["wide.png"], "Describe this image.", 20),
        image_request(&["small.png", "tall.png"], "Compare the two pictures.", 7),
        text_request("Why is the sky blue?", 30),
        image_request(&["tiny20.png"], "What is this?", 16),
    ];
    for r in v.iter_mut().take(4) {
        r.ignore_eos = true;
    }
    v
}

fn assert_same(alone: &Generation, batched: &Outcome, what: &str) {
    let g = finished(batched);
    assert_eq!(g.token_ids, alone.token_ids, "{what}: token ids");
    assert_eq!(g.text, alone.text, "{what}: text");
    assert_eq!(
        g.finish_reason, alone.finish_reason,
        "{what}: finish_reason"
    );
    assert_eq!(batched.tokens, g.token_ids, "{what}: streamed ids");
    assert_eq!(batched.streamed, g.text, "{what}: streamed text");
    assert_eq!(g.usage.prompt_tokens, alone.usage.prompt_tokens);
    assert_eq!(g.usage.prompt_image_tokens, alone.usage.prompt_image_tokens);
    assert_eq!(
        batched.started,
        Some((
            g.usage.prompt_tokens,
            g.usage.prompt_image_tokens,
            g.usage.prompt_video_tokens
        ))
    );
    for (a, b) in g.logprobs.iter().zip(&alone.logprobs) {
        assert!((a.logprob - b.logprob).abs() < 1e-4, "{what}: logprob");
    }
}

#[test]
fn greedy_batched_equals_alone() {
    let reqs: Vec<GenerateRequest> = mixed_requests()
        .into_iter()
        .map(|r| r.with_top_logprobs(2))
        .collect();
    let want: Vec<Generation> = reqs.iter().map(alone).collect();
    // The closest call between the two most likely tokens (raw log-probabilities): batching
    // moves logits by ~2e-5 (see `batched_decode_step_logits_match_single_steps`).
    let margin = want
        .iter()
        .flat_map(|g| &g.logprobs)
        .map(|l| l.top_logprobs[0].logprob - l.top_logprobs[1].logprob)
        .fold(f32::INFINITY, f32::min);
    eprintln!("smallest top-1/top-2 log-probability gap: {margin:e}");
    let engine = Engine::start(pipeline(), config(8, 64, 0));
    let subs: Vec<Submission> = reqs
        .iter()
        .map(|r| engine.submit(r.clone()).expect("accepted"))
        .collect();
    let got: Vec<Outcome> = subs.into_iter().map(collect).collect();
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_same(w, g, &format!("request {i}"));
    }
    let s = wait_for(&engine, "idle", |s| s.running == 0);
    assert_eq!(s.kv_tokens_used, 0);
    assert_eq!(s.requests_finished, reqs.len() as u64);
    // They really were decoded together.
    assert!(
        s.decode_batch_sequences_total > s.decode_steps_total,
        "mean batch > 1: {s:?}"
    );
    let lens: std::collections::BTreeSet<usize> = want.iter().map(|g| g.token_ids.len()).collect();
    assert!(lens.len() >= 3, "different lengths: {lens:?}");
    engine.shutdown();
}

#[test]
fn seeded_sampling_batched_equals_alone() {
    let sampling = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 40,
        repetition_penalty: 1.1,
        seed: Some(1234),
        top_logprobs: 3,
    };
    let mut reqs = mixed_requests();
    for (i, r) in reqs.iter_mut().enumerate() {
        r.sampling = SamplingParams {
            seed: Some(1000 + i as u64),
            ..sampling.clone()
        };
    }
    let want: Vec<Generation> = reqs.iter().map(alone).collect();
    let engine = Engine::start(pipeline(), config(8, 64, 0));
    let subs: Vec<Submission> = reqs
        .iter()
        .map(|r| engine.submit(r.clone()).expect("accepted"))
        .collect();
    for (i, (w, s)) in want.iter().zip(subs).enumerate() {
        let o = collect(s);
        assert_same(w, &o, &format!("sampled request {i}"));
        let g = finished(&o);
        assert!(g.logprobs.iter().all(|l| l.top_logprobs.len() == 3));
    }
}

#[test]
fn max_running_two_completes_five() {
    let reqs = mixed_requests();
    let want: Vec<Generation> = reqs.iter().map(alone).collect();
    let engine = Engine::start(pipeline(), config(2, 64, 0));
    let subs: Vec<Submission> = reqs
        .iter()
        .map(|r| engine.submit(r.clone()).expect("accepted"))
        .collect();
    for (i, (w, s)) in want.iter().zip(subs).enumerate() {
        assert_same(w, &collect(s), &format!("request {i}"));
    }
    let s = wait_for(&engine, "idle", |s| s.running == 0 && s.queued == 0);
    assert_eq!(s.requests_finished, 5);
    assert_eq!(s.kv_tokens_used, 0);
    // Never more than two in a step: 2 * steps >= sequences summed over steps.
    assert!(s.decode_batch_sequences_total <= 2 * s.decode_steps_total);
    assert!(s.decode_batch_sequences_total > s.decode_steps_total);
}

#[test]
fn cancel_frees_the_slot() {
    let engine = Engine::start(pipeline(), config(4, 8, 0));
    let mut sub = engine.submit(endless("Count forever.")).expect("accepted");
    let mut tokens = 0;
    while tokens < 5 {
        match sub.events.blocking_recv() {
            Some(EngineEvent::Token { .. }) => tokens += 1,
            Some(EngineEvent::Started { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let s = engine.stats();
    assert_eq!(s.running, 1);
    assert!(s.kv_tokens_used > 0);
    sub.cancel.store(true, Ordering::Relaxed);
    let o = collect_rest(sub, true);
    let g = finished(&o);
    assert_eq!(g.finish_reason, "cancelled");
    assert!(g.token_ids.len() >= 5 && g.token_ids.len() < 20_000);
    // The stream after the first five tokens is the tail of the text.
    assert!(g.text.ends_with(&o.streamed));
    let s = wait_for(&engine, "slot freed", |s| s.running == 0);
    assert_eq!(s.kv_tokens_used, 0);
    assert_eq!(s.requests_cancelled, 1);

    // The request's own cancel flag is the submission's.
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut req = endless("Again.");
    req.cancel = Some(flag.clone());
    let sub = engine.submit(req).expect("accepted");
    assert!(Arc::ptr_eq(&flag, &sub.cancel));
    flag.store(true, Ordering::Relaxed);
    assert_eq!(finished(&collect(sub)).finish_reason, "cancelled");
    wait_for(&engine, "slot freed", |s| {
        s.running == 0 && s.kv_tokens_used == 0
    });
}

#[test]
fn dropping_the_receiver_cancels() {
    let engine = Engine::start(pipeline(), config(4, 8, 0));
    let mut sub = engine.submit(endless("Talk.")).expect("accepted");
    // Started and one token, then hang up.
    for _ in 0..2 {
        assert!(sub.events.blocking_recv().is_some());
    }
    drop(sub);
    let s = wait_for(&engine, "dropped receiver cancels", |s| {
        s.running == 0 && s.requests_cancelled == 1
    });
    assert_eq!(s.kv_tokens_used, 0);
    // Others still run fine afterwards.
    let req = text_request("Still there?", 5);
    let want = alone(&req);
    assert_same(
        &want,
        &collect(engine.submit(req).expect("accepted")),
        "after",
    );
}

#[test]
fn queue_full_is_refused_with_retry_after() {
    let engine = Engine::start(pipeline(), config(1, 2, 0));
    let mut first = engine.submit(endless("One.")).expect("accepted");
    assert!(matches!(
        first.events.blocking_recv(),
        Some(EngineEvent::Started { .. })
    ));
    // One running; two fit in the queue; the fourth is refused.
    let b = engine.submit(text_request("Two.", 3)).expect("queued");
    let c = engine.submit(text_request("Three.", 3)).expect("queued");
    assert_eq!(engine.stats().queued, 2);
    match engine.submit(text_request("Four.", 3)) {
        Err(SubmitError::QueueFull { retry_after_s }) => assert!(retry_after_s >= 1),
        other => panic!("expected QueueFull, got {:?}", other.map(|_| ())),
    }
    assert_eq!(engine.stats().requests_rejected, 1);
    first.cancel.store(true, Ordering::Relaxed);
    assert_eq!(
        finished(&collect_rest(first, true)).finish_reason,
        "cancelled"
    );
    assert_eq!(finished(&collect(b)).token_ids.len(), 3);
    assert_eq!(finished(&collect(c)).token_ids.len(), 3);
}

#[test]
fn a_bad_image_fails_only_its_request() {
    let dir = std::env::temp_dir().join(format!("qwen2vl-engine-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bad = dir.join("corrupt.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nthis is not a png").expect("write");
    let good = mixed_requests();
    let want: Vec<Generation> = good.iter().take(2).map(alone).collect();
    let engine = Engine::start(pipeline(), config(8, 64, 0));
    let a = engine.submit(good[0].clone()).expect("accepted");
    let bad_req = GenerateRequest::from_prompt(None, std::slice::from_ref(&bad), "What is it?");
    let x = engine
        .submit(bad_req)
        .expect("accepted (images are read later)");
    let missing = GenerateRequest::from_prompt(None, &[dir.join("missing.png")], "Hi");
    let y = engine.submit(missing).expect("accepted");
    let b = engine.submit(good[1].clone()).expect("accepted");
    for sub in [x, y] {
        let o = collect(sub);
        let e = o.failed.expect("bad image fails");
        assert!(matches!(e, qwen2vl::Error::BadInput { .. }), "{e}");
        assert!(o.started.is_none() && o.tokens.is_empty());
    }
    assert_same(&want[0], &collect(a), "good 0");
    assert_same(&want[1], &collect(b), "good 1");
    let s = wait_for(&engine, "idle", |s| s.running == 0);
    assert_eq!((s.requests_failed, s.requests_finished), (2, 2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kv_budget_makes_requests_wait_or_refuses_them() {
    let p = pipeline();
    let a = text_request("First in line.", 20);
    let b = text_request("Second in line.", 20);
    let need = |r: &GenerateRequest| p.prepare(r).expect("prepare").input_ids.len() + 20;
    let (na, nb) = (need(&a), need(&b));
    // Room for either one, not both: they run one after the other, never together.
    let budget = na.max(nb) + 5;
    assert!(na + nb > budget);
    let (wa, wb) = (alone(&a), alone(&b));
    let engine = Engine::start(p.clone(), config(8, 8, budget));
    let sa = engine.submit(a).expect("accepted");
    let sb = engine.submit(b).expect("accepted");
    assert_same(&wa, &collect(sa), "a");
    assert_same(&wb, &collect(sb), "b");
    let s = wait_for(&engine, "idle", |s| s.running == 0);
    assert_eq!(
        s.decode_batch_sequences_total, s.decode_steps_total,
        "never two at once under the budget: {s:?}"
    );

    // A request that could never fit is refused: text-only at submit time...
    let huge = text_request("This asks for far too many tokens.", budget);
    match engine.submit(huge) {
        Err(SubmitError::Invalid(qwen2vl::Error::BadInput { what, .. })) => {
            assert!(what.contains("KV cache"), "{what}")
        }
        other => panic!("expected Invalid, got {:?}", other.map(|_| ())),
    }
    // ... with images once they are read.
    let o = collect(
        engine
            .submit(image_request(&["wide.png"], "Describe.", budget))
            .expect("accepted"),
    );
    assert!(matches!(o.failed, Some(qwen2vl::Error::BadInput { .. })));
    wait_for(&engine, "idle", |s| s.running == 0 && s.kv_tokens_used == 0);
}

#[test]
fn invalid_requests_are_refused_at_submit() {
    let engine = Engine::start(pipeline(), config(2, 4, 0));
    let zero = text_request("Hi", 0);
    assert!(matches!(engine.submit(zero), Err(SubmitError::Invalid(_))));
    let bad_t = text_request("Hi", 4).with_sampling(SamplingParams {
        temperature: -1.0,
        ..SamplingParams::greedy()
    });
    assert!(matches!(engine.submit(bad_t), Err(SubmitError::Invalid(_))));
    let long = "word ".repeat(40_000);
    assert!(matches!(
        engine.submit(text_request(&long, 4)),
        Err(SubmitError::Invalid(_))
    ));
    assert_eq!(engine.stats().requests_total, 0);
}

#[test]
fn stop_strings_cut_the_text_alone_and_batched() {
    let mut base = text_request("Write a long answer.", 40);
    base.ignore_eos = true;
    let full = alone(&base);
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 12, "need some text: {:?}", full.text);
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let cut = full.text.find(&stop).expect("stop string occurs");
    let req = base.clone().with_stop(vec![stop.clone(), String::new()]);
    let mut streamed = String::new();
    let g = pipeline()
        .generate(&req, &mut |s| streamed.push_str(s))
        .expect("generate");
    assert_eq!(g.text, full.text[..cut], "cut before the stop string");
    assert_eq!(streamed, g.text);
    assert_eq!(g.finish_reason, "stop");
    assert!(g.token_ids.len() < full.token_ids.len());
    assert_eq!(g.token_ids[..], full.token_ids[..g.token_ids.len()]);

    let engine = Engine::start(pipeline(), config(4, 8, 0));
    let other = engine.submit(mixed_requests().remove(1)).expect("accepted");
    let o = collect(engine.submit(req).expect("accepted"));
    assert_same(&g, &o, "stop string batched");
    let _ = collect(other);
}

#[test]
fn shutdown_cancels_running_and_refuses_new() {
    let engine = Engine::start(pipeline(), config(1, 8, 0));
    let mut running = engine.submit(endless("Go on.")).expect("accepted");
    assert!(matches!(
        running.events.blocking_recv(),
        Some(EngineEvent::Started { .. })
    ));
    let queued = engine.submit(text_request("Later.", 4)).expect("queued");
    let clone = engine.clone();
    clone.shutdown();
    let o = collect_rest(running, true);
    assert_eq!(finished(&o).finish_reason, "cancelled");
    assert_eq!(o.streamed, finished(&o).text);
    assert!(collect(queued).failed.is_some());
    assert!(matches!(
        engine.submit(text_request("After.", 4)),
        Err(SubmitError::ShuttingDown)
    ));
    assert!(!engine.stats().accepting);
    engine.shutdown(); // idempotent
}

#[test]
fn batched_decode_step_logits_match_single_steps() {
    // Three caches of unequal lengths: one step for all three together vs one at a time.
    let p = pipeline();
    let m = p.model();
    let lens = [3usize, 11, 26];
    let make = || -> Vec<qwen2vl::kv_cache::KvCache> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut c = m.new_cache(64).expect("cache");
                for t in 0..n {
                    m.decode_step(&[(500 + 7 * t + i) as u32], &[i as i64], &mut [&mut c])
                        .expect("fill");
                }
                c
            })
            .collect()
    };
    let toks = [42u32, 4242, 9999];
    let deltas = [0i64, 1, 2];
    let mut a = make();
    let mut refs: Vec<&mut _> = a.iter_mut().collect();
    let batched = common::flat(&m.decode_step(&toks, &deltas, &mut refs).expect("batched"));
    let mut b = make();
    let mut single = Vec::new();
    for i in 0..3 {
        let row = m
            .decode_step(&toks[i..=i], &deltas[i..=i], &mut [&mut b[i]])
            .expect("single");
        single.extend(common::flat(&row));
    }
    // Not bit-identical: candle's gemm sums in a different order for one row (a gemv path)
    // than for several, so the LM head and projections differ in the last bits (1.9e-5 on
    // this model; on the 2B shapes every M >= 2 agrees bit for bit and only M = 1 differs,
    // by up to 1.7e-4 on a matmul). Attention is per sequence (no padding, no mask across
    // sequences) and contributes nothing. A greedy token could flip only at a near-tie
    // within that margin; `greedy_batched_equals_alone` reports the smallest top-1/top-2
    // gap it met.
    let d = common::max_abs_diff(&batched, &single);
    eprintln!("batched vs single decode_step logits: max abs diff {d:e}");
    assert!(d <= 1e-4, "max abs diff {d}");
}

#[test]
fn a_prefill_in_units_gives_the_one_shot_logits() {
    // The engine runs a prompt's vision tower in chunks of rows of each stage of each block
    // and its prefill one layer at a time; every cut must give bit for bit what the
    // one-shot path gives. Chunks of the fewest rows allowed, so the small fixture images
    // are cut as finely as the engine cuts a 16k-patch frame.
    let p = pipeline();
    let m = p.model();
    let prompt = format!(
        "Compare them.{}",
        " Describe every detail you see in both pictures, one by one.".repeat(8)
    );
    let req = image_request(&["wide.png", "tiny20.png"], &prompt, 4);
    let inputs = p.prepare(&req).expect("prepare");
    let n = inputs.input_ids.len();

    let image_embeds = m
        .encode_vision(&inputs.pixel_values, &inputs.image_grid_thw)
        .expect("vision");
    let mut cache = m.new_cache(n + 4).expect("cache");
    let one_shot = m
        .prefill(
            &inputs.input_ids,
            &inputs.positions,
            Some(&image_embeds),
            None,
            &mut cache,
        )
        .expect("prefill");

    let mut job = m.prefill_job_with_rows(&inputs, Some(1)).expect("job");
    let (_, total) = job.progress();
    let cfg = m.config();
    let tower = m.vision().unwrap();
    let pass = tower.pass_units(&inputs.image_grid_thw, Some(1));
    // Each image is encoded on its own: its lookup in the encoder cache, its pass's start
    // and units.
    let per_image: usize = inputs
        .image_grid_thw
        .iter()
        .map(|g| 2 + tower.pass_units(&[*g], Some(1)))
        .sum();
    let layer = m.text().layer_units(n, 0, Some(1));
    assert_eq!(
        total,
        per_image + 1 + cfg.text.num_hidden_layers * layer,
        "per image its lookup and pass (its start, its units), the embedding, the layers' units"
    );
    // The decoder layers are cut too: at least two chunks of q/k/v rows and two of query
    // rows each.
    assert!(
        n >= 2 * 65 && layer >= 4,
        "{layer} units per layer for {n} tokens"
    );
    // Cut finer than one unit per stage: per block at least two chunks of qkv rows, of
    // attention rows and of MLP rows.
    assert!(
        pass >= 2 + 6 * cfg.vision.depth,
        "{pass} units for {} patches",
        inputs.pixel_values.len() / cfg.vision.patch_dim()
    );
    assert!(
        pass > m.vision().unwrap().pass_units(&inputs.image_grid_thw, None),
        "the default cut is coarser"
    );
    let mut cache2 = m.new_cache(n + 4).expect("cache");
    let mut calls = 0;
    // A deadline already passed: exactly one unit per call.
    while !job
        .run_until(&inputs, &mut cache2, Instant::now())
        .expect("unit")
    {
        calls += 1;
        assert_eq!(job.progress().0, calls);
    }
    assert_eq!(calls + 1, total);
    let (logits, vision_ms, prefill_ms) = job.finish().expect("complete");
    assert!(vision_ms > 0.0 && prefill_ms > 0.0);
    assert_eq!(
        common::flat(&logits),
        common::flat(&one_shot),
        "bit-identical"
    );
    assert_eq!(cache2.len(), n);
}

/// Starts an endless text stream and waits for its first token.
fn running_stream(engine: &Engine) -> Submission {
    let mut s = engine
        .submit(endless("Count to a million."))
        .expect("submit");
    assert!(matches!(
        s.events.blocking_recv(),
        Some(EngineEvent::Started { .. })
    ));
    s
}

#[test]
fn running_streams_go_on_while_a_new_image_is_prefilled() {
    // With a zero slice the engine runs one unit of the new request's prefill per decode
    // step, so the running stream gets a step after every unit but the last.
    let engine = Engine::start(
        pipeline(),
        EngineConfig {
            prefill_slice_ms: 0,
            ..config(4, 8, 0)
        },
    );
    let stream = running_stream(&engine);
    let req = image_request(&["wide.png", "small.png"], "Describe.", 5);
    let units = {
        let inputs = pipeline().prepare(&req).expect("prepare");
        pipeline()
            .model()
            .prefill_job(&inputs)
            .expect("job")
            .progress()
            .1
    };
    let o = collect(engine.submit(req.clone()).expect("submit"));
    assert_same(&alone(&req), &o, "image request next to a stream");
    let during = engine.stats().decode_steps_during_prefill_total;
    assert!(
        during >= (units - 1) as u64,
        "{during} decode steps during a prefill of {units} units"
    );
    stream.cancel.store(true, Ordering::Relaxed);
    assert_eq!(
        finished(&collect_rest(stream, true)).finish_reason,
        "cancelled"
    );
}

#[test]
fn running_streams_go_on_while_an_image_downloads() {
    // An image URL that answers after a second: the download happens off the scheduler
    // thread, so the running stream keeps getting tokens meanwhile.
    let png = std::fs::read(image("small.png")).expect("fixture");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/slow.png", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            std::thread::sleep(Duration::from_millis(1000));
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                png.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&png);
        }
    });
    let engine = Engine::start(pipeline(), config(4, 8, 0));
    let stream = running_stream(&engine);
    use qwen2vl::processing::messages::{ContentPart, ImageSource, Message, Role};
    let mut req = GenerateRequest::new(vec![Message::parts(
        Role::User,
        vec![
            ContentPart::image(ImageSource::Uri(url)),
            ContentPart::text("What is this?"),
        ],
    )])
    .with_max_new_tokens(3);
    req.fetch.allow_remote = true;
    let before = engine.stats().decode_steps_total;
    let t = Instant::now();
    let o = collect(engine.submit(req).expect("submit"));
    assert!(finished(&o).token_ids.len() <= 3);
    assert!(t.elapsed() >= Duration::from_millis(1000));
    let steps = engine.stats().decode_steps_total - before;
    // One step of the tiny model takes about a millisecond (tens on a loaded two-core
    // machine running the other tests); a blocked scheduler would have run only the
    // handful of steps of the image's own prefill and answer.
    assert!(
        steps >= 20,
        "only {steps} decode steps while the image downloaded"
    );
    stream.cancel.store(true, Ordering::Relaxed);
    assert_eq!(
        finished(&collect_rest(stream, true)).finish_reason,
        "cancelled"
    );
}

/// A loopback HTTP server that accepts connections and never answers (it keeps them open):
/// a download from it lasts until the client gives up. Returns an image URL on it.
fn stalled_image_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/never.png", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    url
}

/// A request whose image downloads from `url` (remote fetching on, loopback allowed).
fn url_request(url: &str) -> GenerateRequest {
    use qwen2vl::processing::fetch::FetchOptions;
    use qwen2vl::processing::messages::{ContentPart, ImageSource, Message, Role};
    let mut req = GenerateRequest::new(vec![Message::parts(
        Role::User,
        vec![
            ContentPart::image(ImageSource::Uri(url.to_string())),
            ContentPart::text("What is this?"),
        ],
    )])
    .with_max_new_tokens(3);
    req.fetch = FetchOptions::remote();
    req
}

fn pool_config(threads: usize, timeout: Duration) -> EngineConfig {
    EngineConfig {
        preprocess_threads: threads,
        preprocess_timeout: timeout,
        ..config(4, 16, 0)
    }
}

#[test]
fn stuck_media_requests_do_not_block_a_text_request() {
    // More stuck downloads than preprocessing threads: the text request (preprocessed at
    // submit) is answered at once, and so is an image request from a local file, which gets
    // a thread of its own when one is free.
    let engine = Engine::start(pipeline(), pool_config(2, Duration::from_secs(60)));
    let url = stalled_image_url();
    let stuck: Vec<Submission> = (0..3)
        .map(|_| engine.submit(url_request(&url)).expect("submit"))
        .collect();
    let s = wait_for(&engine, "two preprocessing", |s| s.preprocessing == 2);
    assert_eq!(s.queued, 3, "{s:?}");
    let t = Instant::now();
    let text = text_request("Hello there.", 4);
    let o = collect(engine.submit(text.clone()).expect("submit"));
    let text_s = t.elapsed().as_secs_f64();
    assert_same(&alone(&text), &o, "text next to stuck downloads");
    eprintln!("text request next to 3 stuck downloads: {text_s:.3} s");
    assert!(text_s < 5.0, "the text request took {text_s:.1} s");
    assert_eq!(engine.stats().preprocessing, 2, "the downloads still hang");
    // A free thread: the third stuck one is cancelled, its place goes to the queued one.
    stuck[0].cancel.store(true, Ordering::Relaxed);
    let mut stuck = stuck.into_iter();
    let first = stuck.next().expect("three");
    let t = Instant::now();
    assert_eq!(finished(&collect(first)).finish_reason, "cancelled");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    wait_for(&engine, "the third preprocessing", |s| {
        s.preprocessing == 2 && s.queued == 2
    });
    // Shutting down does not wait for the hanging downloads (Ctrl-C stays prompt).
    let t = Instant::now();
    engine.shutdown();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    for s in stuck {
        let o = collect(s);
        let e = o.failed.expect("shut down before starting");
        assert!(matches!(e, qwen2vl::Error::Shutdown(_)), "{e:?}");
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn a_preprocessing_past_its_deadline_fails_and_frees_its_thread() {
    let timeout = Duration::from_millis(800);
    let engine = Engine::start(pipeline(), pool_config(1, timeout));
    let url = stalled_image_url();
    let t = Instant::now();
    let slow = engine.submit(url_request(&url)).expect("submit");
    // Queued behind it on the single thread: a request with a local image.
    let next = engine
        .submit(image_request(&["tiny20.png"], "What is this?", 3))
        .expect("submit");
    let o = collect(slow);
    let took = t.elapsed();
    let e = o.failed.expect("the stuck request fails");
    let msg = e.to_string();
    assert!(msg.contains("took longer than"), "{msg}");
    assert!(matches!(e, qwen2vl::Error::BadInput { .. }), "{e:?}");
    eprintln!(
        "stuck download failed after {:.2} s: {msg}",
        took.as_secs_f64()
    );
    assert!(took >= timeout, "{took:?}");
    assert!(took < timeout + Duration::from_secs(3), "{took:?}");
    // Its thread is abandoned; the next request gets the place and is answered.
    let g = finished(&collect(next)).clone();
    assert!(!g.token_ids.is_empty());
    let s = wait_for(&engine, "idle", |s| !s.busy);
    assert_eq!(s.requests_failed, 1, "{s:?}");
    assert_eq!(s.requests_finished, 1, "{s:?}");
}

#[test]
fn abandoned_preprocessing_threads_are_capped() {
    // One thread: a stuck download past its deadline is abandoned (its read hangs on), and
    // so is the next; with two abandoned threads still alive a third media request waits
    // in the queue instead of starting a thread, while text requests go on.
    let engine = Engine::start(pipeline(), pool_config(1, Duration::from_millis(300)));
    let url = stalled_image_url();
    for _ in 0..2 {
        let o = collect(engine.submit(url_request(&url)).expect("submit"));
        assert!(o
            .failed
            .is_some_and(|e| e.to_string().contains("took longer than")));
    }
    let third = engine.submit(url_request(&url)).expect("submit");
    let s = wait_for(&engine, "two abandoned", |s| {
        s.preprocess_threads_abandoned == 2 && s.queued == 1
    });
    assert_eq!(s.preprocessing, 0, "{s:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(engine.stats().preprocessing, 0, "the third waits");
    let o = collect(
        engine
            .submit(text_request("Still here?", 2))
            .expect("submit"),
    );
    assert!(!finished(&o).token_ids.is_empty());
    drop(third);
    wait_for(&engine, "idle", |s| !s.busy);
}

#[test]
fn cancelling_a_preprocessing_request_frees_its_place_at_once() {
    let engine = Engine::start(pipeline(), pool_config(1, Duration::from_secs(60)));
    let url = stalled_image_url();
    let a = engine.submit(url_request(&url)).expect("submit");
    let b = engine.submit(url_request(&url)).expect("submit");
    let s = wait_for(&engine, "one preprocessing, one queued", |s| {
        s.preprocessing == 1 && s.queued == 2
    });
    assert!(s.busy);
    a.cancel.store(true, Ordering::Relaxed);
    let t = Instant::now();
    let o = collect(a);
    assert_eq!(finished(&o).finish_reason, "cancelled");
    assert!(o.tokens.is_empty() && o.started.is_none());
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // `b` takes the thread although `a`'s may still hang in its read.
    wait_for(&engine, "b preprocessing", |s| {
        s.preprocessing == 1 && s.queued == 1
    });
    drop(b); // dropping the receiver cancels too
    let s = wait_for(&engine, "idle", |s| !s.busy && s.queued == 0);
    assert_eq!(s.requests_cancelled, 2, "{s:?}");
}

#[test]
fn stats_say_busy_and_how_long_since_progress() {
    let engine = Engine::start(pipeline(), pool_config(1, Duration::from_secs(60)));
    let s = engine.stats();
    assert!(!s.busy, "{s:?}");
    // A stuck download: the engine has work and makes no progress.
    let stuck = engine
        .submit(url_request(&stalled_image_url()))
        .expect("submit");
    wait_for(&engine, "preprocessing", |s| s.preprocessing == 1);
    std::thread::sleep(Duration::from_millis(700));
    let s = engine.stats();
    assert!(s.busy, "{s:?}");
    assert!(s.seconds_since_progress >= 0.6, "{s:?}");
    // A stream decoding is progress, step after step.
    let stream = running_stream(&engine);
    std::thread::sleep(Duration::from_millis(300));
    let s = engine.stats();
    assert!(s.busy && s.seconds_since_progress < 0.5, "{s:?}");
    stream.cancel.store(true, Ordering::Relaxed);
    stuck.cancel.store(true, Ordering::Relaxed);
    let _ = collect_rest(stream, true);
    let _ = collect(stuck);
    let s = wait_for(&engine, "idle", |s| !s.busy);
    assert_eq!(s.queued + s.running, 0, "{s:?}");
}

#[test]
fn cancelling_a_large_image_during_its_prefill_frees_the_engine_within_a_unit() {
    // 2048 vision tokens (8192 patches in one frame): seconds of vision tower and prefill
    // on the tiny model, cut into units of a tenth of a second or so.
    let engine = Engine::start(pipeline(), config(4, 16, 0));
    let sub = engine
        .submit(big_image_request(2048 * 28 * 28))
        .expect("submit");
    wait_for(&engine, "prefilling", |s| s.running == 1);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    sub.cancel.store(true, Ordering::Relaxed);
    let o = collect(sub);
    let freed = t.elapsed();
    assert_eq!(finished(&o).finish_reason, "cancelled");
    assert!(o.started.is_none(), "cancelled before its first token");
    wait_for(&engine, "idle", |s| s.running == 0 && s.kv_tokens_used == 0);
    eprintln!(
        "cancel during a 2048-token image's prefill answered after {:.3} s",
        freed.as_secs_f64()
    );
    assert!(freed < Duration::from_secs(2), "{freed:?}");
    let t = Instant::now();
    let o = collect(engine.submit(text_request("next", 2)).expect("submit"));
    assert!(!finished(&o).token_ids.is_empty());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

/// A request with the fixture's 20x20 image resized up to at least `min_pixels` (a
/// per-item setting, as a client may send it).
fn big_image_request(min_pixels: u64) -> GenerateRequest {
    use qwen2vl::processing::messages::{ContentPart, ImagePart, Message, Role};
    let part = ImagePart {
        min_pixels: Some(min_pixels),
        ..ImagePart::new(image("tiny20.png").to_string_lossy().to_string())
    };
    GenerateRequest::new(vec![Message::parts(
        Role::User,
        vec![ContentPart::Image(part), ContentPart::text("Describe.")],
    )])
    .with_max_new_tokens(3)
}

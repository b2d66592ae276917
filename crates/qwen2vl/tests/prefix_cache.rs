//! The prefix cache (issue 13) on the tiny fixture model: a reused prefix gives the logits
//! of an uncached run (within 1e-5 relative; whether they are bit-identical is printed) and
//! its greedy tokens exactly; two images of one size never share a block, nor one image
//! resized two ways; a video is reused up to its end and another video never is; another
//! system message misses while other sampling settings hit; a conversation's next turn reuses the
//! last one; engine requests sharing a prefix, and a budget of a few blocks, lose nothing
//! and leak no KV.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use qwen2vl::engine::{Engine, EngineConfig, EngineEvent, EngineStats};
use qwen2vl::generation::{GenerateRequest, Generation};
use qwen2vl::pipeline::{DTypeChoice, LoadOptions, Pipeline};
use qwen2vl::prefix_cache::{PrefixCache, BLOCK_TOKENS};
use qwen2vl::processing::messages::{
    ContentPart, ImagePart, ImageSource, Message, Role, VideoPart, VideoSource,
};

fn model_dir() -> PathBuf {
    common::fixtures().join("tiny-qwen2vl")
}

/// A pipeline whose prefix cache holds `bytes` (its encoder cache off, so every image runs
/// the tower: only the prefix cache is under test).
fn with_prefix_bytes(bytes: u64) -> Pipeline {
    let mut p = Pipeline::load_with(&model_dir(), &LoadOptions::default()).expect("tiny model");
    p.set_prefix_cache(Arc::new(PrefixCache::new(bytes)));
    p
}

fn load() -> Pipeline {
    with_prefix_bytes(64 << 20)
}

/// The pipeline without caches: the oracle.
fn uncached() -> &'static Pipeline {
    static P: OnceLock<Pipeline> = OnceLock::new();
    P.get_or_init(|| {
        let p = Pipeline::load(&model_dir(), DTypeChoice::F32).expect("tiny model loads");
        assert!(!p.prefix_cache().is_enabled(), "the library default is off");
        p
    })
}

fn image(name: &str) -> PathBuf {
    common::fixtures().join("images").join(name)
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qwen2vl-pc-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn ask(system: Option<&str>, images: &[PathBuf], prompt: &str) -> GenerateRequest {
    GenerateRequest::from_prompt(system, images, prompt).with_max_new_tokens(6)
}

/// The prefill logits of `req` on `p` through its prefix cache (the prompt's blocks are
/// kept afterwards), and the positions reused.
fn cached_prefill(p: &Pipeline, req: &GenerateRequest) -> (Vec<f32>, usize) {
    let inputs = p.prepare(req).expect("prepare");
    let key = p.prefix_key(&inputs).expect("key");
    let mut kv = p.model().new_cache(inputs.input_ids.len()).expect("kv");
    let (mut job, cached) = p
        .prefill_job_cached(&inputs, key.as_ref(), &mut kv)
        .expect("job");
    while !job.step(&inputs, &mut kv).expect("step") {}
    let (logits, _, _) = job.finish().expect("logits");
    p.remember_prefix(key.as_ref(), &kv);
    (logits.to_vec1().expect("f32"), cached)
}

fn uncached_logits(req: &GenerateRequest) -> Vec<f32> {
    let p = uncached();
    let inputs = p.prepare(req).expect("prepare");
    let mut kv = p.model().new_cache(inputs.input_ids.len()).expect("kv");
    let (logits, _, _) = p.prefill(&inputs, &mut kv).expect("prefill");
    logits.to_vec1().expect("f32")
}

/// Fails unless `got` is within 1e-5 of `want` relative to its largest magnitude; returns
/// whether they are bit-identical.
fn assert_close(got: &[f32], want: &[f32], what: &str) -> bool {
    assert_eq!(got.len(), want.len(), "{what}: vocab");
    let scale = want
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(f32::MIN_POSITIVE);
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff / scale <= 1e-5,
        "{what}: max diff {diff} (scale {scale})"
    );
    let same = got
        .iter()
        .zip(want)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    eprintln!(
        "{what}: max relative difference {:e}, bit-identical: {same}",
        diff / scale
    );
    same
}

fn generate(p: &Pipeline, req: &GenerateRequest) -> Generation {
    p.generate(req, &mut |_| {}).expect("generate")
}

/// The positions of the prompt's first and last image pad.
fn image_span(p: &Pipeline, req: &GenerateRequest) -> (usize, usize) {
    let ids = p.prepare(req).expect("prepare").input_ids;
    let pad = p.model().config().image_token_id;
    let first = ids.iter().position(|&t| t == pad).expect("an image");
    let last = ids.iter().rposition(|&t| t == pad).expect("an image");
    (first, last)
}

/// The positions a prompt reuses when the cache holds `common` of its first positions (a
/// whole earlier prompt's blocks) and at most `limit` may be reused, its image at
/// `start..=last`: whole blocks, cut back to the image's start if they end inside it, unless
/// the image's end is in `common` (the earlier prompt kept a block ending there).
fn expected_reuse(common: usize, limit: usize, (start, last): (usize, usize)) -> usize {
    let reach = (common / BLOCK_TOKENS * BLOCK_TOKENS).min(limit);
    if reach > start && reach <= last {
        if last < common.min(limit) {
            last + 1
        } else {
            start
        }
    } else {
        reach
    }
}

#[test]
fn a_reused_prefix_gives_the_uncached_logits_and_tokens() {
    let p = load();
    let img = [image("photo.jpg")];
    let first = ask(None, &img, "What is it?");
    let (l1, c1) = cached_prefill(&p, &first);
    assert_eq!(c1, 0, "an empty cache reuses nothing");
    assert!(assert_close(&l1, &uncached_logits(&first), "first"));

    // Same image, another question: everything before the question may be reused, cut to
    // whole blocks and never inside the image.
    let second = ask(None, &img, "Describe it in a few words, please.");
    let (a, b) = (
        p.prepare(&first).unwrap().input_ids,
        p.prepare(&second).unwrap().input_ids,
    );
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let (start, last) = image_span(&p, &second);
    let want = expected_reuse(common, b.len() - 1, (start, last));
    let (l2, c2) = cached_prefill(&p, &second);
    eprintln!("second: {c2} positions reused, image at {start}..={last}, common {common}");
    assert_eq!(
        c2, want,
        "common prefix {common}, image at {start}..={last}"
    );
    assert!(c2 > 0, "the system message at least is reused");
    assert_close(&l2, &uncached_logits(&second), "second (reused prefix)");

    // The whole prompt is cached now: all but its last position are reused.
    let g = generate(&p, &second);
    assert_eq!(g.token_ids, generate(uncached(), &second).token_ids);
    let n = b.len();
    let full = expected_reuse(n, n - 1, (start, last));
    assert_eq!(g.usage.prompt_cached_tokens, full);
    let s = p.prefix_cache().stats();
    assert!(s.hits >= 2 && s.misses == 1, "{s:?}");
    assert!(s.bytes > 0 && s.bytes <= s.budget_bytes, "{s:?}");
}

#[test]
fn two_images_of_one_size_never_share_a_block() {
    let dir = temp_dir("two");
    let a = common::random_png(&dir, "a.png", 320, 240, 1);
    let b = common::random_png(&dir, "b.png", 320, 240, 2);
    let p = load();
    let q = "Describe this picture in detail, every colour and every shape you can see in it.";
    let (ra, rb) = (ask(None, &[a], q), ask(None, &[b], q));
    let ids = p.prepare(&ra).unwrap().input_ids;
    assert_eq!(
        ids,
        p.prepare(&rb).unwrap().input_ids,
        "the same ids: only the pixels differ"
    );
    // Keyed by ids alone, b would reuse a whole block past the image.
    let (_, last) = image_span(&p, &ra);
    assert!((ids.len() - 1) / BLOCK_TOKENS * BLOCK_TOKENS > last + 1);
    let ga = generate(&p, &ra);
    assert_eq!(ga.token_ids, generate(uncached(), &ra).token_ids);
    let (lb, cb) = cached_prefill(&p, &rb);
    let (start, _) = image_span(&p, &rb);
    assert!(
        cb <= start,
        "b reused {cb} positions, a's image starts at {start}"
    );
    assert_close(&lb, &uncached_logits(&rb), "b after a");
    let gb = generate(&p, &rb);
    assert_eq!(gb.token_ids, generate(uncached(), &rb).token_ids);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn one_image_as_a_file_and_as_a_data_uri_shares_its_blocks() {
    let p = load();
    let path = image("wide.png");
    let bytes = std::fs::read(&path).expect("fixture image");
    let uri = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&bytes)
    );
    let q = "What is in this picture, in a few words?";
    let from_file = ask(None, &[path], q);
    let from_uri = GenerateRequest::new(vec![Message::parts(
        Role::User,
        vec![
            ContentPart::image(ImageSource::Uri(uri)),
            ContentPart::text(q),
        ],
    )])
    .with_max_new_tokens(6);
    let ids = p.prepare(&from_file).unwrap().input_ids;
    assert_eq!(ids, p.prepare(&from_uri).unwrap().input_ids);
    let (_, c) = cached_prefill(&p, &from_file);
    assert_eq!(c, 0);
    let (l, c) = cached_prefill(&p, &from_uri);
    let (start, last) = image_span(&p, &from_uri);
    let n = ids.len();
    let want = expected_reuse(n, n - 1, (start, last));
    assert_eq!(c, want, "the same pixels: the same blocks");
    assert!(c > last, "the image's blocks are reused");
    assert_close(&l, &uncached_logits(&from_uri), "data URI after file");
}

#[test]
fn another_system_message_misses_and_sampling_settings_hit() {
    let p = load();
    let q = "Tell me one thing about rivers, lakes and the sea.";
    let (_, c) = cached_prefill(&p, &ask(Some("You are a pirate."), &[], q));
    assert_eq!(c, 0);
    let (_, c) = cached_prefill(&p, &ask(Some("You are a robot."), &[], q));
    assert_eq!(c, 0, "the first block holds the system message");
    let plain = ask(Some("You are a robot."), &[], q);
    let mut sampled = plain.clone();
    sampled.sampling.temperature = 0.7;
    sampled.sampling.top_p = 0.5;
    sampled.sampling.seed = Some(7);
    let n = p.prepare(&plain).unwrap().input_ids.len();
    let (l, c) = cached_prefill(&p, &sampled);
    assert_eq!(c, (n - 1).min(n / BLOCK_TOKENS * BLOCK_TOKENS));
    assert_close(&l, &uncached_logits(&plain), "sampled");
}

#[test]
fn a_next_turn_reuses_the_last_one() {
    let p = load();
    let img = [image("wide.png")];
    let turn1 = ask(None, &img, "What do you see?");
    let n1 = p.prepare(&turn1).unwrap().input_ids.len();
    let g1 = generate(&p, &turn1);
    let mut messages = turn1.messages.clone();
    messages.push(Message::assistant(g1.text.clone()));
    messages.push(Message::user("And what colour is it?"));
    let turn2 = GenerateRequest::new(messages).with_max_new_tokens(6);
    let g2 = generate(&p, &turn2);
    assert_eq!(g2.token_ids, generate(uncached(), &turn2).token_ids);
    assert!(
        g2.usage.prompt_cached_tokens >= n1 / BLOCK_TOKENS * BLOCK_TOKENS,
        "turn 1 had {n1} positions, turn 2 reused {}",
        g2.usage.prompt_cached_tokens
    );
    eprintln!(
        "turn 2: {} of {} prompt tokens reused (turn 1: {n1})",
        g2.usage.prompt_cached_tokens, g2.usage.prompt_tokens
    );
}

/// Runs `requests` on an engine over `p` all at once and checks each answer against the
/// uncached pipeline; returns the engine's stats once it is idle.
fn engine_answers_match(p: Arc<Pipeline>, requests: &[GenerateRequest]) -> EngineStats {
    let engine = Engine::start(
        p,
        EngineConfig {
            max_running: 4,
            ..EngineConfig::default()
        },
    );
    let subs: Vec<_> = requests
        .iter()
        .map(|r| engine.submit(r.clone()).expect("submit"))
        .collect();
    for (i, (req, mut sub)) in requests.iter().zip(subs).enumerate() {
        let mut answer = None;
        while let Some(ev) = sub.events.blocking_recv() {
            match ev {
                EngineEvent::Finished(g) => answer = Some(g),
                EngineEvent::Failed(e) => panic!("request {i}: {e}"),
                _ => {}
            }
        }
        let want = generate(uncached(), req);
        assert_eq!(
            answer.expect("finished").token_ids,
            want.token_ids,
            "request {i}"
        );
    }
    let t = Instant::now();
    let stats = loop {
        let s = engine.stats();
        if !s.busy {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "not idle: {s:?}");
        std::thread::sleep(Duration::from_millis(2));
    };
    engine.shutdown();
    assert_eq!(stats.kv_tokens_used, 0, "KV reservations all returned");
    stats
}

#[test]
fn concurrent_engine_requests_sharing_a_prefix_get_their_uncached_answers() {
    let p = Arc::new(load());
    let img = [image("photo.jpg")];
    let requests: Vec<_> = ["What is it?", "Describe it.", "Colours?", "Where is it?"]
        .iter()
        .map(|q| ask(Some("Answer briefly and precisely, in English."), &img, q))
        .collect();
    let s = engine_answers_match(p, &requests);
    let pc = s.prefix_cache;
    assert_eq!(pc.hits + pc.misses, 4, "{pc:?}");
    assert!(
        pc.hits >= 1 && pc.cached_tokens > 0,
        "one prefill at a time: {pc:?}"
    );
    assert!(pc.bytes <= pc.budget_bytes, "{pc:?}");
}

#[test]
fn a_budget_of_a_few_blocks_evicts_and_loses_nothing() {
    let cfg = uncached().model().config().text.clone();
    let block = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim() * 4;
    let budget = 3 * (BLOCK_TOKENS * block) as u64 + 3 * 256;
    let p = Arc::new(with_prefix_bytes(budget));
    let dir = temp_dir("evict");
    let requests: Vec<_> = (0..6u32)
        .map(|i| {
            let img = common::random_png(&dir, &format!("{i}.png"), 112, 84, i % 3);
            ask(None, &[img], &format!("Question number {i}?"))
        })
        .collect();
    let s = engine_answers_match(p.clone(), &requests).prefix_cache;
    assert!(s.evictions > 0, "{s:?}");
    assert!(s.bytes <= budget && s.blocks <= 3, "{s:?}");
    // The same again, now partly cached: still the uncached answers.
    let s = engine_answers_match(p, &requests).prefix_cache;
    assert!(s.bytes <= budget, "{s:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A user message with a video of four frames (112x112 each: 32 tokens) and a question.
/// A text part before the video moves its end off a block boundary.
fn ask_video(frames: [&str; 4], prompt: &str) -> GenerateRequest {
    let part = VideoPart {
        resized_height: Some(112),
        resized_width: Some(112),
        ..VideoPart::new(VideoSource::Frames(
            frames
                .iter()
                .map(|n| image(n).display().to_string())
                .collect(),
        ))
    };
    GenerateRequest::new(vec![Message::parts(
        Role::User,
        vec![
            ContentPart::text("Look:"),
            ContentPart::Video(part),
            ContentPart::text(prompt),
        ],
    )])
    .with_max_new_tokens(6)
}

#[test]
fn a_video_is_reused_up_to_its_end_and_another_video_never_is() {
    let p = load();
    let frames = ["photo.jpg", "photo.jpg", "wide.png", "wide.png"];
    let first = ask_video(frames, "What happens?");
    assert_eq!(cached_prefill(&p, &first).1, 0);

    // Another question about the same video: the reuse runs to the video's last pad (a
    // partial block ends there), never stops inside the video.
    let second = ask_video(frames, "Who is in it, and where?");
    let ids = p.prepare(&second).expect("prepare").input_ids;
    let pad = p.model().config().video_token_id;
    let start = ids.iter().position(|&t| t == pad).expect("a video");
    let last = ids.iter().rposition(|&t| t == pad).expect("a video");
    assert!(last - start + 1 > BLOCK_TOKENS, "the video spans blocks");
    let common = p
        .prepare(&first)
        .unwrap()
        .input_ids
        .iter()
        .zip(&ids)
        .take_while(|(x, y)| x == y)
        .count();
    let want = expected_reuse(common, ids.len() - 1, (start, last));
    let (logits, reused) = cached_prefill(&p, &second);
    assert_eq!(reused, want, "video at {start}..={last}, common {common}");
    assert_ne!(
        common % BLOCK_TOKENS,
        0,
        "the shared prefix ends inside a block"
    );
    assert_eq!(reused, last + 1, "up to the video's end (a partial block)");
    assert_close(&logits, &uncached_logits(&second), "same video");
    assert_eq!(
        generate(&p, &second).token_ids,
        generate(uncached(), &second).token_ids
    );

    // The same frame size and count with other pixels: only what precedes the video.
    let other = ask_video(
        ["wide.png", "wide.png", "photo.jpg", "photo.jpg"],
        "What happens?",
    );
    assert_eq!(
        p.prepare(&other).unwrap().input_ids,
        p.prepare(&first).unwrap().input_ids
    );
    let (logits, reused) = cached_prefill(&p, &other);
    assert!(
        reused <= start,
        "{reused} positions reused, video from {start}"
    );
    assert_close(&logits, &uncached_logits(&other), "other video");
}

#[test]
fn other_resize_settings_of_one_image_miss_at_the_image() {
    // 56x112 and 112x56 give the same number of image tokens, so the two prompts have the
    // same ids: only the pixels' digest tells them apart.
    let p = load();
    let ask_sized = |h: usize, w: usize| {
        let part = ImagePart {
            source: ImageSource::Uri(image("photo.jpg").display().to_string()),
            resized_height: Some(h),
            resized_width: Some(w),
            ..ImagePart::default()
        };
        GenerateRequest::new(vec![Message::parts(
            Role::User,
            vec![ContentPart::Image(part), ContentPart::text("What is it?")],
        )])
        .with_max_new_tokens(6)
    };
    let tall = ask_sized(112, 56);
    let wide = ask_sized(56, 112);
    assert_eq!(
        p.prepare(&tall).unwrap().input_ids,
        p.prepare(&wide).unwrap().input_ids
    );
    assert_eq!(cached_prefill(&p, &tall).1, 0);
    let (start, _) = image_span(&p, &wide);
    let (logits, reused) = cached_prefill(&p, &wide);
    assert!(reused <= start, "{reused} reused, image from {start}");
    assert_close(&logits, &uncached_logits(&wide), "other resize");
    // The first size again hits up to past its image.
    let (_, again) = cached_prefill(&p, &tall);
    assert!(again > start, "{again} reused, image from {start}");
}

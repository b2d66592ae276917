//! The encoder cache (issue 13) on the tiny fixture model: a hit gives the bits an uncached
//! run computes (logits compared bit for bit, greedy tokens exactly), keys separate what must
//! differ (other pixels, other resize settings, another model) and join what is the same
//! (one image sent as a file, a data: URI and a URL), the budget holds, and counters count.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use qwen2vl::encoder_cache::{EncoderCache, EncoderCacheStats};
use qwen2vl::engine::{Engine, EngineConfig, EngineEvent};
use qwen2vl::generation::GenerateRequest;
use qwen2vl::inputs::ModelInputs;
use qwen2vl::pipeline::{DTypeChoice, LoadOptions, Pipeline};
use qwen2vl::processing::fetch::FetchOptions;
use qwen2vl::processing::messages::{
    ContentPart, ImagePart, ImageSource, Message, Role, VideoPart, VideoSource,
};
use qwen2vl::processing::processor::ProcessOptions;

fn model_dir() -> PathBuf {
    common::fixtures().join("tiny-qwen2vl")
}

fn load(cache_mb: u64) -> Pipeline {
    Pipeline::load_with(
        &model_dir(),
        &LoadOptions {
            encoder_cache_mb: cache_mb,
            ..LoadOptions::default()
        },
    )
    .expect("tiny model loads")
}

/// The pipeline without a cache: the oracle of every cached answer.
fn uncached() -> &'static Pipeline {
    static P: OnceLock<Pipeline> = OnceLock::new();
    P.get_or_init(|| {
        let p = Pipeline::load(&model_dir(), DTypeChoice::F32).expect("tiny model loads");
        assert!(
            !p.encoder_cache().is_enabled(),
            "the library default is off"
        );
        p
    })
}

/// A pipeline whose cache holds at most `bytes`.
fn with_cache_bytes(bytes: u64) -> Pipeline {
    let mut p = load(0);
    p.set_encoder_cache(Arc::new(EncoderCache::new(bytes)));
    p
}

fn image(name: &str) -> PathBuf {
    common::fixtures().join("images").join(name)
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qwen2vl-ec-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// One user turn: the images (each with `part`'s settings), then `prompt`.
fn request(images: &[ImageSource], part: &ImagePart, prompt: &str) -> GenerateRequest {
    let mut parts: Vec<ContentPart> = images
        .iter()
        .map(|s| {
            ContentPart::Image(ImagePart {
                source: s.clone(),
                ..part.clone()
            })
        })
        .collect();
    parts.push(ContentPart::text(prompt));
    let mut r = GenerateRequest::new(vec![Message::parts(Role::User, parts)]);
    r.max_new_tokens = 6;
    r.fetch = FetchOptions::remote();
    r
}

fn path_source(p: &Path) -> ImageSource {
    ImageSource::Uri(p.display().to_string())
}

/// The prefill's logits as bits, and the prepared inputs.
fn prefill_bits(p: &Pipeline, req: &GenerateRequest) -> (Vec<u32>, ModelInputs) {
    let inputs = p.prepare(req).expect("prepare");
    let mut kv = p
        .model()
        .new_cache(inputs.input_ids.len())
        .expect("kv cache");
    let (logits, _, _) = p.prefill(&inputs, &mut kv).expect("prefill");
    let bits = logits
        .to_vec1::<f32>()
        .expect("f32 logits")
        .iter()
        .map(|x| x.to_bits())
        .collect();
    (bits, inputs)
}

/// Prefill logits and greedy tokens of `req` on `p` equal the uncached pipeline's, bit for
/// bit; returns the cache's counters after it.
fn same_as_uncached(p: &Pipeline, req: &GenerateRequest, what: &str) -> EncoderCacheStats {
    let (bits, inputs) = prefill_bits(p, req);
    let (want, want_inputs) = prefill_bits(uncached(), req);
    assert_eq!(
        inputs.pixel_values, want_inputs.pixel_values,
        "{what}: pixels"
    );
    assert_eq!(inputs.images, want_inputs.images, "{what}: image info");
    assert_eq!(inputs.positions, want_inputs.positions, "{what}: positions");
    assert!(bits == want, "{what}: logits differ from the uncached run");
    let got = p.generate(req, &mut |_| {}).expect("generate");
    let want = uncached().generate(req, &mut |_| {}).expect("generate");
    assert_eq!(got.token_ids, want.token_ids, "{what}: greedy tokens");
    p.encoder_cache().stats()
}

#[test]
fn items_are_encoded_alone_so_their_rows_do_not_depend_on_their_neighbours() {
    let p = uncached();
    let req = GenerateRequest::from_prompt(None, &[image("tiny20.png"), image("wide.png")], "x");
    let inputs = p.prepare(&req).expect("prepare");
    let [a, b] = [inputs.image_grid_thw[0], inputs.image_grid_thw[1]];
    let split = a[0] * a[1] * a[2] * 1176;
    let m = p.model();
    let both = m
        .encode_vision(&inputs.pixel_values, &inputs.image_grid_thw)
        .expect("both");
    let first = m
        .encode_vision(&inputs.pixel_values[..split], &[a])
        .expect("first alone");
    let second = m
        .encode_vision(&inputs.pixel_values[split..], &[b])
        .expect("second alone");
    let bits = |t: &candle_core::Tensor| -> Vec<u32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("rows")
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    let mut alone = bits(&first);
    alone.extend(bits(&second));
    assert!(bits(&both) == alone, "packed and alone differ");
    // The same holds with the passes cut into small units (the engine's way).
    let mut job = m.prefill_job_with_rows(&inputs, Some(65)).expect("job");
    let mut kv = m.new_cache(inputs.input_ids.len()).expect("kv");
    while !job.step(&inputs, &mut kv).expect("step") {}
    let (cut, _, _) = job.finish().expect("logits");
    let (whole, _) = prefill_bits(p, &req);
    let cut: Vec<u32> = cut
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect();
    assert!(cut == whole, "units change the logits");
}

#[test]
fn the_same_image_twice_hits_and_answers_as_without_the_cache() {
    let p = load(64);
    let req = request(
        &[path_source(&image("photo.jpg"))],
        &ImagePart::default(),
        "What is it?",
    );
    let first = same_as_uncached(&p, &req, "first");
    // prefill_bits and generate each ran it once: a miss, then hits.
    assert_eq!((first.misses, first.decode_misses), (1, 1), "{first:?}");
    assert_eq!((first.hits, first.decode_hits), (1, 1), "{first:?}");
    assert_eq!(first.entries, 2, "one decoded image, one set of embeddings");
    let again = same_as_uncached(&p, &req, "again");
    assert_eq!((again.misses, again.hits), (1, 3), "{again:?}");
    assert_eq!(again.entries, 2);
    assert!(again.bytes > 0 && again.bytes <= again.budget_bytes);
}

#[test]
fn two_images_of_one_size_are_two_entries_with_their_own_answers() {
    let dir = temp_dir("two");
    let a = common::random_png(&dir, "a.png", 84, 56, 1);
    let b = common::random_png(&dir, "b.png", 84, 56, 2);
    let p = load(64);
    let (ra, rb) = (
        request(&[path_source(&a)], &ImagePart::default(), "Describe."),
        request(&[path_source(&b)], &ImagePart::default(), "Describe."),
    );
    same_as_uncached(&p, &ra, "a");
    let s = same_as_uncached(&p, &rb, "b");
    assert_eq!((s.misses, s.decode_misses, s.entries), (2, 2, 4), "{s:?}");
    // Their embeddings differ (so sharing an entry would change an answer).
    let (ia, ib) = (
        uncached().prepare(&ra).unwrap(),
        uncached().prepare(&rb).unwrap(),
    );
    assert_eq!(ia.image_grid_thw, ib.image_grid_thw, "same size");
    let m = uncached().model();
    let ea = m
        .encode_vision(&ia.pixel_values, &ia.image_grid_thw)
        .unwrap();
    let eb = m
        .encode_vision(&ib.pixel_values, &ib.image_grid_thw)
        .unwrap();
    assert_ne!(
        ea.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        eb.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // Both in one request: both hit; a third, new image next to a cached one runs alone.
    let c = common::random_png(&dir, "c.png", 84, 56, 3);
    let both = request(
        &[path_source(&a), path_source(&c)],
        &ImagePart::default(),
        "Compare.",
    );
    let before = p.encoder_cache().stats();
    let (_, _) = prefill_bits(&p, &both);
    let after = p.encoder_cache().stats();
    assert_eq!(after.hits - before.hits, 1, "a hits");
    assert_eq!(after.misses - before.misses, 1, "only c is encoded");
    same_as_uncached(&p, &both, "a and c");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_file_a_data_uri_and_a_url_with_the_same_bytes_share_one_entry() {
    let path = image("wide.png");
    let bytes = std::fs::read(&path).unwrap();
    let data = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&bytes)
    );
    let body = bytes.clone();
    let url = common::serve_http(4, move |_| {
        (
            "200 OK",
            format!(
                "Content-Type: image/png\r\nContent-Length: {}\r\n",
                body.len()
            ),
            body.clone(),
        )
    });
    let p = load(64);
    let forms = [
        path_source(&path),
        ImageSource::Uri(data),
        ImageSource::Uri(format!("{url}/img.png")),
        ImageSource::Bytes(bytes),
    ];
    for (i, source) in forms.iter().enumerate() {
        let req = request(std::slice::from_ref(source), &ImagePart::default(), "Hi");
        let (bits, _) = prefill_bits(&p, &req);
        let s = p.encoder_cache().stats();
        assert_eq!(
            (s.decode_misses, s.decode_hits),
            (1, i as u64),
            "form {i}: {s:?}"
        );
        assert_eq!(
            (s.misses, s.hits, s.entries),
            (1, i as u64, 2),
            "form {i}: {s:?}"
        );
        if i == 0 {
            assert!(bits == prefill_bits(uncached(), &req).0);
        }
    }
}

#[test]
fn other_resize_settings_miss() {
    let p = load(64);
    let src = [path_source(&image("photo.jpg"))];
    let base = ImagePart::default();
    same_as_uncached(&p, &request(&src, &base, "q"), "default");
    let settings = [
        ImagePart {
            max_pixels: Some(56 * 56),
            ..ImagePart::default()
        },
        ImagePart {
            min_pixels: Some(300 * 300),
            ..ImagePart::default()
        },
        ImagePart {
            resized_height: Some(56),
            resized_width: Some(84),
            ..ImagePart::default()
        },
    ];
    for (i, part) in settings.iter().enumerate() {
        let before = p.encoder_cache().stats();
        let (_, inputs) = prefill_bits(&p, &request(&src, part, "q"));
        let after = p.encoder_cache().stats();
        assert_eq!(after.decode_misses - before.decode_misses, 1, "setting {i}");
        assert_eq!(after.misses - before.misses, 1, "setting {i}");
        assert_ne!(inputs.images[0].resized_hw, (0, 0));
        same_as_uncached(&p, &request(&src, part, "q"), "setting");
    }
    // Sampling settings change nothing the encoder sees: a hit.
    let mut sampled = request(&src, &base, "q");
    sampled.sampling.temperature = 0.7;
    let before = p.encoder_cache().stats();
    let _ = prefill_bits(&p, &sampled);
    let after = p.encoder_cache().stats();
    assert_eq!(
        (after.hits - before.hits, after.misses - before.misses),
        (1, 0)
    );
}

#[test]
fn eviction_keeps_the_budget_and_the_answers() {
    let dir = temp_dir("evict");
    let images: Vec<PathBuf> = (0..4)
        .map(|seed| common::random_png(&dir, &format!("{seed}.png"), 320, 240, seed))
        .collect();
    let req = |img: &Path| request(&[path_source(img)], &ImagePart::default(), "q");
    // What one image takes (its pixels and its embeddings); room for about one and a half.
    let one = {
        let p = load(64);
        let _ = prefill_bits(&p, &req(&images[0]));
        p.encoder_cache().stats().bytes
    };
    let p = with_cache_bytes(one + one / 2);
    let mut evicted = 0;
    for round in 0..2 {
        for (i, img) in images.iter().enumerate() {
            same_as_uncached(&p, &req(img), &format!("round {round} image {i}"));
            let s = p.encoder_cache().stats();
            assert!(s.bytes <= s.budget_bytes, "{s:?}");
            assert!(s.evictions >= evicted, "evictions only grow");
            evicted = s.evictions;
        }
    }
    let s = p.encoder_cache().stats();
    assert!(s.evictions > 0 && s.entries < 8, "{s:?}");
    // Two lookups per request (prefill_bits, then generate): the second hits; the first
    // misses even in the second round, since the three images between evicted it.
    assert_eq!((s.hits, s.misses), (8, 8), "{s:?}");
    assert_eq!((s.decode_hits, s.decode_misses), (8, 8), "{s:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_budget_of_zero_is_off() {
    let p = load(0);
    let req = request(
        &[path_source(&image("photo.jpg"))],
        &ImagePart::default(),
        "q",
    );
    same_as_uncached(&p, &req, "first");
    let s = same_as_uncached(&p, &req, "second");
    assert_eq!(s, EncoderCacheStats::default(), "nothing counted or kept");
}

#[test]
fn two_models_sharing_a_cache_never_share_an_entry() {
    let shared = Arc::new(EncoderCache::new(64 << 20));
    let mut a = load(0);
    let mut b = load(0);
    a.set_encoder_cache(shared.clone());
    b.set_encoder_cache(shared.clone());
    assert_ne!(a.model().identity(), b.model().identity());
    let req = request(
        &[path_source(&image("photo.jpg"))],
        &ImagePart::default(),
        "q",
    );
    let _ = prefill_bits(&a, &req);
    let _ = prefill_bits(&b, &req);
    let s = shared.stats();
    // One processor setting: the decoded image is shared; the embeddings are per model.
    assert_eq!((s.decode_hits, s.misses, s.hits), (1, 2, 0), "{s:?}");
}

#[test]
fn a_video_of_frames_hits_too() {
    let p = load(64);
    let frames: Vec<String> = ["photo.jpg", "photo.jpg", "wide.png", "wide.png"]
        .iter()
        .map(|n| image(n).display().to_string())
        .collect();
    let part = VideoPart {
        resized_height: Some(56),
        resized_width: Some(56),
        ..VideoPart::new(VideoSource::Frames(frames))
    };
    let mut req = GenerateRequest::new(vec![Message::parts(
        Role::User,
        vec![ContentPart::Video(part), ContentPart::text("What happens?")],
    )]);
    req.max_new_tokens = 4;
    let s = same_as_uncached(&p, &req, "video");
    assert_eq!((s.misses, s.hits), (1, 1), "{s:?}");
}

#[test]
fn concurrent_engine_requests_get_their_uncached_answers() {
    let p = Arc::new(load(64));
    let engine = Engine::start(p.clone(), EngineConfig::default());
    let src = [path_source(&image("photo.jpg"))];
    let prompts = ["What is it?", "Describe it.", "Colours?", "Where?"];
    let subs: Vec<_> = prompts
        .iter()
        .map(|q| {
            engine
                .submit(request(&src, &ImagePart::default(), q))
                .expect("submit")
        })
        .collect();
    for (q, mut sub) in prompts.iter().zip(subs) {
        let mut answer = None;
        while let Some(ev) = sub.events.blocking_recv() {
            match ev {
                EngineEvent::Finished(g) => answer = Some(g),
                EngineEvent::Failed(e) => panic!("{q}: {e}"),
                _ => {}
            }
        }
        let want = uncached()
            .generate(&request(&src, &ImagePart::default(), q), &mut |_| {})
            .unwrap();
        assert_eq!(answer.expect("finished").token_ids, want.token_ids, "{q}");
    }
    let s = engine.stats().encoder_cache;
    assert_eq!(s.hits + s.misses, 4, "{s:?}");
    assert!(s.hits >= 1, "the prefill lane runs one at a time: {s:?}");
    engine.shutdown();
}

#[test]
fn the_processor_alone_reuses_decoded_images() {
    let p = common::tiny_processor();
    let cache = Arc::new(EncoderCache::new(16 << 20));
    let opts = ProcessOptions {
        cache: Some(cache.clone()),
        ..ProcessOptions::default()
    };
    let msgs = vec![Message::parts(
        Role::User,
        vec![
            ContentPart::image(image("wide.png").display().to_string()),
            ContentPart::image(image("wide.png").display().to_string()),
            ContentPart::text("Same twice?"),
        ],
    )];
    let cached = p.process(&msgs, &opts).expect("process");
    let plain = p
        .process(&msgs, &ProcessOptions::default())
        .expect("process");
    assert_eq!(cached.pixel_values, plain.pixel_values);
    assert_eq!(cached.images, plain.images);
    assert_eq!(cached.input_ids, plain.input_ids);
    let s = cache.stats();
    assert_eq!(
        (s.decode_misses, s.decode_hits, s.entries),
        (1, 1, 1),
        "{s:?}"
    );
}

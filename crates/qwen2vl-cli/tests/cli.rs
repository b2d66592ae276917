//! The `qwen2vl` binary end to end on the tiny fixture model: a working run, and every kind
//! of bad input giving a one-line error, a non-zero exit code and no panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tiny() -> PathBuf {
    fixtures().join("tiny-qwen2vl")
}

fn qwen2vl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qwen2vl"))
        .args(args)
        .output()
        .expect("binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A scratch directory unique to one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qwen2vl-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of the tiny model with `config.json` replaced (weights linked, not copied).
fn model_with_config(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let d = scratch(name);
    let mut edit = Some(edit);
    for entry in std::fs::read_dir(tiny()).unwrap() {
        let p = entry.unwrap().path();
        let target = d.join(p.file_name().unwrap());
        if p.file_name().unwrap() == "config.json" {
            let mut cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            (edit.take().expect("one config.json"))(&mut cfg);
            std::fs::write(&target, cfg.to_string()).unwrap();
        } else {
            std::os::unix::fs::symlink(&p, &target).unwrap();
        }
    }
    d
}

/// `qwen2vl run --model <tiny> <args> --json <prompt>`: asserts success, returns the object.
fn run_json(args: &[&str], prompt: &str) -> serde_json::Value {
    let model = tiny();
    let mut all = vec!["run", "--model", model.to_str().unwrap()];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--json", prompt]);
    let o = qwen2vl(&all);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

fn assert_clean_failure(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.starts_with("error: "), "stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}: {err}");
    }
}

#[test]
fn run_json_on_tiny_model() {
    let image = fixtures().join("images/wide.png");
    let o = qwen2vl(&[
        "run",
        "--model",
        tiny().to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        "--json",
        "--top-logprobs",
        "3",
        "Describe this image.",
    ]);
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let ids = v["token_ids"].as_array().unwrap();
    assert!(!ids.is_empty() && ids.len() <= 8);
    assert_eq!(v["logprobs"].as_array().unwrap().len(), ids.len());
    assert_eq!(
        v["logprobs"][0]["top_logprobs"].as_array().unwrap().len(),
        3
    );
    let u = &v["usage"];
    let image_tokens = u["prompt_image_tokens"].as_u64().unwrap();
    // wide.png is 300x200 → 308x196 → 11x7 merged tokens... whatever the processor says,
    // usage and the image listing must agree.
    assert_eq!(image_tokens, v["images"][0]["tokens"].as_u64().unwrap());
    assert_eq!(
        u["prompt_tokens"].as_u64().unwrap(),
        u["prompt_text_tokens"].as_u64().unwrap() + image_tokens
    );
    assert_eq!(u["completion_tokens"].as_u64().unwrap(), ids.len() as u64);
    for key in ["load_ms", "vision_ms", "prefill_ms", "decode_ms", "ttft_ms"] {
        assert!(v["timings"][key].as_f64().unwrap() >= 0.0, "{key}");
    }
}

#[test]
fn streaming_text_matches_json_text() {
    let args = |json: bool| {
        let mut a = vec![
            "run".to_string(),
            "--model".into(),
            tiny().to_string_lossy().into_owned(),
            "--temperature".into(),
            "0".into(),
            "--max-new-tokens".into(),
            "12".into(),
            "--prompt".into(),
            "Write a haiku about Rust.".into(),
        ];
        if json {
            a.push("--json".into());
        }
        a
    };
    let a: Vec<String> = args(false);
    let plain = qwen2vl(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(plain.status.success(), "{}", stderr(&plain));
    let a: Vec<String> = args(true);
    let json = qwen2vl(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let streamed = String::from_utf8(plain.stdout).unwrap();
    assert_eq!(streamed.trim_end_matches('\n'), v["text"].as_str().unwrap());
}

#[test]
fn same_seed_same_sample() {
    let run = |seed: &str| {
        let args = [
            "--temperature",
            "1.0",
            "--top-k",
            "0",
            "--top-p",
            "1.0",
            "--seed",
            seed,
            "--max-new-tokens",
            "16",
        ];
        run_json(&args, "Hello")["token_ids"].clone()
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(
        run("7"),
        run("8"),
        "different seeds should differ over 16 free samples"
    );
}

#[test]
fn missing_model_dir() {
    let o = qwen2vl(&["run", "--model", "/nonexistent/model", "hi"]);
    assert_clean_failure(&o, &["/nonexistent/model", "config.json"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn malformed_config() {
    let d = scratch("badcfg");
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    let o = qwen2vl(&["run", "--model", d.to_str().unwrap(), "hi"]);
    assert_clean_failure(&o, &["config.json"]);
}

#[test]
fn missing_weights_file() {
    let d = scratch("noweights");
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ] {
        std::fs::copy(tiny().join(f), d.join(f)).unwrap();
    }
    let o = qwen2vl(&["run", "--model", d.to_str().unwrap(), "hi"]);
    assert_clean_failure(&o, &["safetensors"]);
}

#[test]
fn unreadable_image() {
    let d = scratch("badimg");
    let bad = d.join("not-an-image.png");
    std::fs::write(&bad, b"this is text, not a PNG").unwrap();
    let o = qwen2vl(&[
        "run",
        "--model",
        tiny().to_str().unwrap(),
        "--image",
        bad.to_str().unwrap(),
        "hi",
    ]);
    assert_clean_failure(&o, &["image 1"]);
    assert_eq!(o.status.code(), Some(2));
    let o = qwen2vl(&[
        "run",
        "--model",
        tiny().to_str().unwrap(),
        "--image",
        "/no/such/image.png",
        "hi",
    ]);
    assert_clean_failure(&o, &["/no/such/image.png"]);
}

#[test]
fn aspect_ratio_over_200() {
    let d = scratch("ratio");
    let strip = d.join("strip.png");
    image::RgbImage::from_pixel(1093, 5, image::Rgb([200, 10, 10]))
        .save(&strip)
        .unwrap();
    let o = qwen2vl(&[
        "run",
        "--model",
        tiny().to_str().unwrap(),
        "--image",
        strip.to_str().unwrap(),
        "hi",
    ]);
    assert_clean_failure(&o, &["200"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn prompt_longer_than_context() {
    let model = model_with_config("ctx", |c| {
        c["max_position_embeddings"] = serde_json::json!(64)
    });
    let long = "word ".repeat(200);
    let o = qwen2vl(&["run", "--model", model.to_str().unwrap(), &long]);
    assert_clean_failure(&o, &["tokens", "64"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn bad_flags() {
    let o = qwen2vl(&[
        "run",
        "--model",
        tiny().to_str().unwrap(),
        "--temperature",
        "-1",
        "hi",
    ]);
    assert_clean_failure(&o, &["temperature"]);
    let o = qwen2vl(&[
        "run",
        "--model",
        tiny().to_str().unwrap(),
        "--top-p",
        "1.5",
        "hi",
    ]);
    assert_clean_failure(&o, &["top_p"]);
    let o = qwen2vl(&[
        "run",
        "--model",
        tiny().to_str().unwrap(),
        "--dtype",
        "int3",
        "hi",
    ]);
    assert_clean_failure(&o, &["int3", "f32"]);
    let o = qwen2vl(&["run", "--model", tiny().to_str().unwrap()]);
    assert_clean_failure(&o, &["prompt"]);
    let o = qwen2vl(&["run", "--no-such-flag"]);
    assert!(!o.status.success());
    assert!(!stderr(&o).contains("panicked"));
}

#[test]
fn max_pixels_limits_image_tokens() {
    let image = fixtures().join("images/photo640.png");
    let image = image.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["--image", image, "--max-new-tokens", "1"];
        args.extend_from_slice(extra);
        run_json(&args, "Describe.")["images"][0].clone()
    };
    let full = run(&[]);
    assert_eq!(full["tokens"].as_u64().unwrap(), 391); // 644x476 → 23x17 merged tokens
    let small = run(&["--max-pixels", "50176"]); // 64 merged tokens at most
    let tokens = small["tokens"].as_u64().unwrap();
    assert!(tokens <= 64 && tokens > 0, "{small}");
    let hw = small["resized_hw"].as_array().unwrap();
    let pixels = hw[0].as_u64().unwrap() * hw[1].as_u64().unwrap();
    assert!(pixels <= 50176, "{small}");
}

#[test]
fn video_with_fps_and_nframes() {
    let clip = fixtures().join("video/clip.mp4");
    let clip = clip.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["--video", clip, "--max-new-tokens", "2"];
        args.extend_from_slice(extra);
        run_json(&args, "What happens?")
    };
    // clip.mp4: 3 s at 10 fps → 2 fps samples 6 frames = 3 temporal patches.
    let v = run(&[]);
    let video = &v["videos"][0];
    assert_eq!(video["frames"], 6);
    assert_eq!(video["grid_thw"][0], 3);
    let tokens = video["tokens"].as_u64().unwrap();
    assert_eq!(v["usage"]["prompt_video_tokens"].as_u64().unwrap(), tokens);
    let g = &video["grid_thw"];
    assert_eq!(
        tokens,
        g[0].as_u64().unwrap() * g[1].as_u64().unwrap() * g[2].as_u64().unwrap() / 4
    );
    let v = run(&["--nframes", "4"]);
    assert_eq!(v["videos"][0]["frames"], 4);
    assert_eq!(v["videos"][0]["grid_thw"][0], 2);
}

#[test]
fn bad_video() {
    let d = scratch("badvideo");
    let bad = d.join("broken.mp4");
    std::fs::write(&bad, b"not a video at all").unwrap();
    let o = qwen2vl(&[
        "run",
        "--model",
        tiny().to_str().unwrap(),
        "--video",
        bad.to_str().unwrap(),
        "hi",
    ]);
    assert_clean_failure(&o, &["video 1"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn missing_tokenizer_is_reported_before_weights_are_read() {
    let d = scratch("notokenizer");
    std::fs::copy(tiny().join("config.json"), d.join("config.json")).unwrap();
    let o = qwen2vl(&["run", "--model", d.to_str().unwrap(), "hi"]);
    assert_clean_failure(&o, &["tokenizer.json"]);
}

#[test]
fn remote_images_can_be_refused() {
    let o = qwen2vl(&[
        "run",
        "--model",
        tiny().to_str().unwrap(),
        "--no-remote",
        "--image",
        "http://127.0.0.1:9/x.png",
        "hi",
    ]);
    assert_clean_failure(&o, &["image 1", "http://127.0.0.1:9/x.png"]);
}

#[test]
fn add_vision_id_adds_prompt_tokens() {
    let image = fixtures().join("images/wide.png");
    let image = image.to_str().unwrap();
    let prompt_tokens = |extra: &[&str]| {
        let mut args = vec!["--image", image, "--max-new-tokens", "1"];
        args.extend_from_slice(extra);
        run_json(&args, "Describe.")["usage"]["prompt_text_tokens"]
            .as_u64()
            .unwrap()
    };
    // "Picture 1: " is a few text tokens more.
    assert!(prompt_tokens(&["--add-vision-id"]) > prompt_tokens(&[]));
}

#[test]
fn bench_json_reports_every_figure() {
    let o = qwen2vl(&[
        "bench",
        "--model",
        tiny().to_str().unwrap(),
        "--image-size",
        "64x48",
        "--new-tokens",
        "5",
        "--warmup",
        "1",
        "--runs",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    // EOS is ignored: exactly the asked-for token count, the same ids every run (greedy).
    assert_eq!(v["new_tokens"], 5);
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 5);
    assert_eq!(v["token_ids_same_every_run"], true);
    assert_eq!(v["runs"], 2);
    // 64x48 → 56x56 after smart_resize (min_pixels), 2x2 merged → 4 image tokens.
    assert_eq!(v["image_tokens"], 4);
    for key in [
        "vision_ms",
        "prefill_ms",
        "prefill_tokens_per_s",
        "ttft_ms",
        "decode_tokens_per_s",
        "peak_rss_mib",
    ] {
        let s = &v[key];
        let (med, min, max) = (
            s["median"].as_f64().unwrap_or(f64::NAN),
            s["min"].as_f64().unwrap_or(f64::NAN),
            s["max"].as_f64().unwrap_or(f64::NAN),
        );
        assert!(min > 0.0 && min <= med && med <= max, "{key}: {s}");
    }
    assert!(v["load_ms"].as_f64().unwrap() > 0.0);
    // Time to first token covers vision and prefill.
    assert!(
        v["ttft_ms"]["min"].as_f64().unwrap() >= v["prefill_ms"]["min"].as_f64().unwrap(),
        "{v}"
    );

    // Text only: no vision figure.
    let o = qwen2vl(&[
        "bench",
        "--model",
        tiny().to_str().unwrap(),
        "--no-image",
        "--new-tokens",
        "2",
        "--warmup",
        "0",
        "--runs",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["vision_ms"].is_null(), "{v}");
    assert_eq!(v["image_tokens"], 0);
}

#[test]
fn bench_table_and_bad_flags() {
    let o = qwen2vl(&[
        "bench",
        "--model",
        tiny().to_str().unwrap(),
        "--image-size",
        "40x40",
        "--new-tokens",
        "3",
        "--runs",
        "1",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    for row in [
        "vision ms",
        "prefill tok/s",
        "TTFT ms",
        "decode tok/s",
        "peak RSS",
        "load average",
    ] {
        assert!(table.contains(row), "missing {row:?}:\n{table}");
    }
    let m = tiny();
    let m = m.to_str().unwrap();
    assert_clean_failure(
        &qwen2vl(&["bench", "--model", m, "--runs", "0"]),
        &["--runs"],
    );
    assert_clean_failure(
        &qwen2vl(&["bench", "--model", m, "--new-tokens", "0"]),
        &["--new-tokens"],
    );
    assert_clean_failure(
        &qwen2vl(&["bench", "--model", m, "--image-size", "640by480"]),
        &["WIDTHxHEIGHT"],
    );
    let o = qwen2vl(&["bench", "--model", m, "--image", "/no/such/image.png"]);
    assert_clean_failure(&o, &["/no/such/image.png"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn every_command_has_help_with_an_example() {
    let top = qwen2vl(&["--help"]);
    assert!(top.status.success());
    let top = String::from_utf8_lossy(&top.stdout).into_owned();
    for cmd in ["run", "chat", "download", "bench", "serve"] {
        assert!(top.contains(cmd), "top-level help lists {cmd}:\n{top}");
        let o = qwen2vl(&[cmd, "--help"]);
        assert!(o.status.success(), "{cmd} --help: {}", stderr(&o));
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(
            help.contains(&format!("Example: qwen2vl {cmd} ")),
            "{cmd} --help has an example:\n{help}"
        );
    }
    // An unknown command or flag: exit 2 with a one-line error pointing at --help.
    let o = qwen2vl(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("unrecognized subcommand"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn ctrl_c_stops_the_answer_with_exit_130() {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_qwen2vl"))
        .args([
            "run",
            "--model",
            tiny().to_str().unwrap(),
            "--max-new-tokens",
            "30000",
            "--ignore-eos",
            "Tell me a very long story.",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("binary runs");
    // Wait for the answer to start streaming, then press Ctrl-C.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first).expect("the answer starts");
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "stderr: {err}");
    assert!(err.contains("error: interrupted"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Stopped well before 30000 tokens (each token is at least one byte of text or none).
    assert!(first.len() + rest.len() < 30000 * 8);
}

/// A copy of the tiny model with `generation_config.json` replaced (the rest linked).
fn model_with_generation_config(name: &str, gen: serde_json::Value) -> PathBuf {
    let d = scratch(name);
    for entry in std::fs::read_dir(tiny()).unwrap() {
        let p = entry.unwrap().path();
        let target = d.join(p.file_name().unwrap());
        if p.file_name().unwrap() == "generation_config.json" {
            std::fs::write(&target, gen.to_string()).unwrap();
        } else {
            std::os::unix::fs::symlink(&p, &target).unwrap();
        }
    }
    d
}

#[test]
fn sampling_defaults_come_from_generation_config_and_flags_override_them() {
    let ids = |model: &Path, extra: &[&str]| -> Vec<u64> {
        let mut args = vec![
            "run",
            "--model",
            model.to_str().unwrap(),
            "--max-new-tokens",
            "8",
            "--ignore-eos",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--json", "Say something."]);
        let o = qwen2vl(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect()
    };
    // The fixture ships top_k 1: its default is the argmax.
    let greedy = ids(&tiny(), &["--temperature", "0"]);
    assert_eq!(ids(&tiny(), &[]), greedy);
    // A checkpoint whose defaults sample from the full distribution.
    let sampling = model_with_generation_config(
        "gencfg",
        serde_json::json!({"do_sample": true, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                           "repetition_penalty": 1.0, "eos_token_id": [151645, 151643]}),
    );
    let sampled = ids(&sampling, &["--seed", "7"]);
    assert_ne!(
        sampled, greedy,
        "temperature 1 over 151,936 tokens should not be the argmax"
    );
    assert_eq!(
        ids(&sampling, &["--seed", "7"]),
        sampled,
        "same seed, same tokens"
    );
    // Each flag overrides its default.
    assert_eq!(ids(&sampling, &["--temperature", "0"]), greedy);
    assert_eq!(ids(&sampling, &["--top-k", "1", "--seed", "7"]), greedy);
}

#[test]
fn the_encoder_cache_flag_changes_no_answer() {
    // The same image twice in one request: with the cache the second is a hit (its bytes
    // and pixels seen), without it both are decoded and encoded; the answers are the same.
    let img = fixtures().join("images/wide.png");
    let img = img.to_str().unwrap();
    let answer = |mb: &str| {
        let j = run_json(
            &[
                "--image",
                img,
                "--image",
                img,
                "--max-new-tokens",
                "6",
                "--encoder-cache-mb",
                mb,
            ],
            "Same picture twice?",
        );
        j["token_ids"].clone()
    };
    assert_eq!(answer("64"), answer("0"));
    for cmd in ["run", "chat", "serve"] {
        let help = String::from_utf8_lossy(&qwen2vl(&[cmd, "--help"]).stdout).into_owned();
        assert!(help.contains("--encoder-cache-mb"), "{cmd}:\n{help}");
        assert!(help.contains("--prefix-cache-mb"), "{cmd}:\n{help}");
    }
    let o = qwen2vl(&["run", "--encoder-cache-mb", "-1", "hi"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// A Qwen2 text model (`Qwen2ForCausalLM`, `tests/fixtures/tiny-qwen2`): `run` answers text,
/// an image is exit 2 naming it and the missing vision tower; `bench` runs text only by
/// default and refuses an explicit `--image` with exit 2.
#[test]
fn text_model_runs_text_and_refuses_images() {
    let model = fixtures().join("tiny-qwen2");
    let model = model.to_str().unwrap();
    let o = qwen2vl(&[
        "run",
        "--model",
        model,
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
        "--json",
        "Hello! Who are you?",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 4);
    let image = fixtures().join("images/wide.png");
    let o = qwen2vl(&[
        "run",
        "--model",
        model,
        "--image",
        image.to_str().unwrap(),
        "What is this?",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_clean_failure(
        &o,
        &["image 1 (message 1)", "no vision tower", "Qwen2ForCausalLM"],
    );

    let bench = |extra: &[&str]| {
        let mut a = vec![
            "bench",
            "--model",
            model,
            "--new-tokens",
            "2",
            "--warmup",
            "0",
            "--runs",
            "1",
            "--json",
        ];
        a.extend_from_slice(extra);
        qwen2vl(&a)
    };
    let o = bench(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["vision_ms"].is_null(), "{v}");
    assert_eq!(v["image_tokens"], 0);
    let o = bench(&["--image", image.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_clean_failure(&o, &["--image", "no vision tower"]);
}

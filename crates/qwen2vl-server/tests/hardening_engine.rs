//! Issue 10's engine findings through the HTTP API, on the tiny fixture model: a large image
//! (a tiny PNG with a high per-item `min_pixels`) no longer freezes the running streams
//! while it is prefilled, a client that hangs up during that prefill frees the engine at
//! once, and `/health` says when the engine is stuck.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use qwen2vl::engine::{Engine, EngineConfig};
use qwen2vl_server::ServerConfig;
use serde_json::{json, Value};

mod common;
use common::{fixtures, pipeline, send_raw, start_engine, start_with};

/// Vision tokens of the large image: 4096 tokens, one frame of 16,384 patches (seconds of
/// vision tower on the tiny model, whose context is 32,768 tokens).
const BIG_TOKENS: u64 = 4096;

fn agent() -> ureq::Agent {
    common::agent(Duration::from_secs(300))
}

/// Status and body of a POST to `/v1/chat/completions`.
fn post(addr: SocketAddr, body: &Value) -> (u16, Value) {
    let mut r = agent()
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(body.to_string())
        .expect("post");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, v)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut r = agent()
        .get(format!("http://{addr}{path}"))
        .call()
        .expect("get");
    let status = r.status().as_u16();
    (status, r.body_mut().read_to_string().unwrap_or_default())
}

/// The big image request: the fixture's 20x20 PNG with a per-item `min_pixels` of
/// [`BIG_TOKENS`] vision tokens.
fn big_image(max_tokens: usize) -> Value {
    let png = std::fs::read(fixtures().join("images/tiny20.png")).expect("fixture");
    let uri = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    );
    json!({
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}, "min_pixels": BIG_TOKENS * 28 * 28},
            {"type": "text", "text": "Describe."}
        ]}],
        "max_tokens": max_tokens,
        "temperature": 0
    })
}

/// An endless streamed answer; a thread records when each chunk arrives. Returns the
/// connection (drop it to hang up) and the arrival times.
fn endless_stream(addr: SocketAddr) -> (TcpStream, Arc<Mutex<Vec<Instant>>>) {
    let body = json!({
        "messages": [{"role": "user", "content": "Count to a million, one number per line."}],
        "max_tokens": 20000,
        "temperature": 0,
        "stream": true
    });
    let s = send_raw(addr, &body);
    let times = Arc::new(Mutex::new(Vec::new()));
    let (reader, theirs) = (s.try_clone().expect("clone"), times.clone());
    std::thread::spawn(move || {
        let mut lines = BufReader::new(reader);
        let mut line = String::new();
        while lines.read_line(&mut line).is_ok_and(|n| n > 0) {
            if line.starts_with("data: {") {
                theirs.lock().expect("times").push(Instant::now());
            }
            line.clear();
        }
    });
    (s, times)
}

/// Waits until `times` holds at least `n` chunks (at most 60 s).
fn wait_chunks(times: &Mutex<Vec<Instant>>, n: usize) {
    let t = Instant::now();
    while times.lock().expect("times").len() < n {
        assert!(t.elapsed() < Duration::from_secs(60), "the stream stalled");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A `/metrics` gauge or counter.
fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, m) = get(addr, "/metrics");
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {m}"))
}

#[test]
fn a_running_stream_keeps_getting_tokens_while_a_large_image_is_prefilled() {
    let addr = start_engine(4, 16, ServerConfig::default());
    let (stream, times) = endless_stream(addr);
    wait_chunks(&times, 5);
    let during_before = metric(addr, "qwen2vl_decode_steps_during_prefill_total");
    let t0 = Instant::now();
    let (status, answer) = post(addr, &big_image(2));
    let t1 = Instant::now();
    assert_eq!(status, 200, "{answer}");
    let image_tokens = answer["usage"]["prompt_tokens_details"]["image_tokens"]
        .as_u64()
        .or_else(|| answer["usage"]["prompt_tokens"].as_u64())
        .expect("usage");
    assert!(image_tokens >= BIG_TOKENS, "{answer}");
    let took = (t1 - t0).as_secs_f64();
    // The gaps between the stream's chunks over the image's whole time, counting from the
    // last chunk before it was sent to the first one after it was answered.
    let seen = times.lock().expect("times").len();
    wait_chunks(&times, seen + 1);
    let all = times.lock().expect("times").clone();
    let first = all.iter().rposition(|&t| t <= t0).expect("chunks before");
    let last = first
        + all[first..]
            .iter()
            .position(|&t| t >= t1)
            .expect("chunks after");
    let window = &all[first..=last];
    let max_gap = window
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .fold(0.0, f64::max);
    let during = metric(addr, "qwen2vl_decode_steps_during_prefill_total") - during_before;
    eprintln!(
        "image of {image_tokens} prompt tokens answered in {took:.2} s; the stream got {} chunks meanwhile, max gap {max_gap:.3} s; {during} decode steps during prefill",
        window.len() - 2
    );
    // The prefill must really take a while, or nothing is measured.
    assert!(took > 1.0, "the large image took only {took:.2} s");
    assert!(
        max_gap < 2.0,
        "the stream stalled {max_gap:.2} s during the prefill"
    );
    assert!(window.len() > 10, "{} chunks in {took:.2} s", window.len());
    assert!(during >= 5.0, "{during} decode steps during the prefill");
    drop(stream);
}

#[test]
fn hanging_up_during_a_large_image_prefill_frees_the_engine() {
    let addr = start_engine(4, 16, ServerConfig::default());
    // Warm up (the tokenizer, the allocator): the figure below is the engine's wait.
    let (status, _) = post(
        addr,
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    );
    assert_eq!(status, 200);
    let conn = send_raw(addr, &big_image(2));
    let t = Instant::now();
    while metric(addr, "qwen2vl_running_sequences") < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(60), "never admitted");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Part-way into its vision tower, the client goes away.
    std::thread::sleep(Duration::from_millis(500));
    drop(conn);
    let t = Instant::now();
    let (status, answer) = post(
        addr,
        &json!({"messages": [{"role": "user", "content": "next"}], "max_tokens": 1, "temperature": 0}),
    );
    let ttft = t.elapsed().as_secs_f64();
    assert_eq!(status, 200, "{answer}");
    eprintln!("the next request after a hang-up during a {BIG_TOKENS}-token image's prefill: answered in {ttft:.3} s");
    assert!(ttft < 3.0, "the next request waited {ttft:.2} s");
    let t = Instant::now();
    while metric(addr, "qwen2vl_running_sequences") > 0.0
        || metric(addr, "qwen2vl_kv_cache_tokens_used") > 0.0
    {
        assert!(t.elapsed() < Duration::from_secs(5), "not freed");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn health_is_503_while_the_engine_has_work_but_makes_no_progress() {
    let engine = Engine::start(
        pipeline(),
        EngineConfig {
            preprocess_threads: 1,
            ..Default::default()
        },
    );
    let addr = start_with(
        Arc::new(engine.clone()),
        ServerConfig {
            health_stall_after: Duration::from_millis(800),
            ..Default::default()
        },
    );
    let (status, body) = get(addr, "/health");
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    // An image whose download never ends (a loopback server that never answers), submitted
    // through the library (the server itself refuses loopback URLs): the engine is busy
    // and makes no progress.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/never.png", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().flatten().collect();
        drop(held);
    });
    use qwen2vl::processing::messages::{ContentPart, ImageSource, Message, Role};
    let mut req = qwen2vl::generation::GenerateRequest::new(vec![Message::parts(
        Role::User,
        vec![
            ContentPart::image(ImageSource::Uri(url)),
            ContentPart::text("?"),
        ],
    )])
    .with_max_new_tokens(2);
    req.fetch = qwen2vl::processing::fetch::FetchOptions::remote();
    let stuck = engine.submit(req).expect("submit");
    std::thread::sleep(Duration::from_millis(1200));
    let (status, body) = get(addr, "/health");
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["status"], "unhealthy", "{v}");
    let reason = v["reason"].as_str().expect("reason");
    assert!(reason.contains("no progress"), "{reason}");
    assert!(
        v["seconds_since_progress"].as_f64().expect("seconds") >= 0.8,
        "{v}"
    );
    assert_eq!(v["queued"], 1, "{v}");
    // Cancelled, the engine is idle again: healthy.
    stuck.cancel.store(true, Ordering::Relaxed);
    let t = Instant::now();
    loop {
        let (status, body) = get(addr, "/health");
        if status == 200 {
            assert_eq!(body, r#"{"status":"ok"}"#);
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{status} {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

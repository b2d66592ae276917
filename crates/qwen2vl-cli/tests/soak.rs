//! Soak: many mixed requests (text, images, videos, streams cancelled mid-way, bad inputs)
//! against one `qwen2vl serve` process on the tiny model, from several clients at once.
//! Afterwards nothing is left behind: no request running or queued, no KV-cache token in use,
//! resident memory within 10% of its level after the warm-up, no temporary file, and no
//! response was a server error.
//!
//! `QWEN2VL_SOAK_REQUESTS` sets the count (CI: 600; the figures in docs/reliability.md come
//! from a 10,000-request run) and `QWEN2VL_SOAK_CLIENTS` the concurrency (default 8).

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{agent, data_uri, fixtures, temp_video_files, Server};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the clients send, by kind.
struct Inputs {
    png: String,
    mp4: String,
    frame: String,
}

/// Request `i`'s kind and body (`None`: a raw body that is not JSON).
fn request(i: usize, inp: &Inputs) -> (&'static str, Vec<u8>, bool) {
    let user = |content: serde_json::Value| serde_json::json!({"messages": [{"role": "user", "content": content}]});
    let with = |mut v: serde_json::Value, extra: serde_json::Value| {
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                o.insert(k.clone(), x.clone());
            }
        }
        serde_json::to_vec(&v).unwrap()
    };
    match i % 10 {
        0..=2 => (
            "text",
            with(
                user(serde_json::json!(format!(
                    "Question {i}: what is {i} plus one?"
                ))),
                serde_json::json!({"max_tokens": 4 + i % 5, "stream": i % 4 < 2}),
            ),
            false,
        ),
        3 => (
            "text-stop-n",
            with(
                user(serde_json::json!("Count to ten.")),
                serde_json::json!({"max_tokens": 6, "n": 2, "stop": ["7", "\n\n"], "temperature": 0.8, "seed": i}),
            ),
            false,
        ),
        4 => (
            "image",
            with(
                user(serde_json::json!([
                    {"type": "image_url", "image_url": {"url": inp.png}},
                    {"type": "text", "text": "Describe."}])),
                serde_json::json!({"max_tokens": 3}),
            ),
            false,
        ),
        5 => (
            "video",
            with(
                user(serde_json::json!([
                    {"type": "video_url", "video_url": {"url": inp.mp4}, "nframes": 4},
                    {"type": "text", "text": "What happens?"}])),
                serde_json::json!({"max_tokens": 3}),
            ),
            false,
        ),
        6 => (
            "cancel",
            with(
                user(serde_json::json!("Tell a very long story.")),
                serde_json::json!({"max_tokens": 400, "stream": true}),
            ),
            true,
        ),
        7 => {
            let bad: Vec<u8> = match (i / 10) % 6 {
                0 => b"{\"messages\": [".to_vec(),
                1 => with(
                    user(serde_json::json!("hi")),
                    serde_json::json!({"temperature": -1}),
                ),
                2 => with(
                    user(serde_json::json!([
                        {"type": "video_url", "video_url": {"url": data_uri("video/mp4", b"#EXTM3U\nfile:///etc/passwd\n#EXT-X-ENDLIST\n")}}])),
                    serde_json::json!({}),
                ),
                3 => with(
                    user(serde_json::json!([
                        {"type": "image_url", "image_url": {"url": data_uri("image/png", b"\x89PNG\r\n\x1a\nnot really")}}])),
                    serde_json::json!({}),
                ),
                4 => serde_json::to_vec(
                    &serde_json::json!({"messages": [{"role": "wizard", "content": "x"}]}),
                )
                .unwrap(),
                _ => with(
                    user(serde_json::json!([
                        {"type": "image_url", "image_url": {"url": inp.frame}, "min_pixels": 12_845_056},
                        {"type": "image_url", "image_url": {"url": inp.frame}, "min_pixels": 12_845_056},
                        {"type": "image_url", "image_url": {"url": inp.frame}, "min_pixels": 12_845_056}])),
                    serde_json::json!({}),
                ),
            };
            ("bad", bad, false)
        }
        8 => (
            "frames",
            with(
                user(serde_json::json!([
                    {"type": "video", "video": [inp.frame, inp.frame, inp.frame]},
                    {"type": "text", "text": "?"}])),
                serde_json::json!({"max_tokens": 2}),
            ),
            false,
        ),
        _ => (
            "text-long",
            with(
                user(serde_json::json!("word ".repeat(200 + i % 300))),
                serde_json::json!({"max_tokens": 8}),
            ),
            false,
        ),
    }
}

/// Sends one request; returns its HTTP status. A `cancel` request reads the first streamed
/// chunk and then drops the connection.
fn send(agent: &ureq::Agent, url: &str, body: Vec<u8>, cancel: bool) -> u16 {
    let r = agent
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(&body[..]);
    let mut r = match r {
        Ok(r) => r,
        Err(e) => panic!("request failed at the transport level: {e}"),
    };
    let status = r.status().as_u16();
    let mut reader = r.body_mut().as_reader();
    if cancel && status == 200 {
        let mut buf = [0u8; 64];
        let _ = reader.read(&mut buf);
        return status; // dropped here: the server sees the disconnect
    }
    let mut sink = Vec::new();
    let _ = reader.read_to_end(&mut sink);
    status
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[test]
fn soak_mixed_requests_leave_nothing_behind() {
    let total = env_usize("QWEN2VL_SOAK_REQUESTS", 600);
    let clients = env_usize("QWEN2VL_SOAK_CLIENTS", 8).max(1);
    let temp_before = temp_video_files();
    let server = Server::start(&[]);
    let inputs = Arc::new(Inputs {
        png: data_uri(
            "image/png",
            &std::fs::read(fixtures().join("images/small.png")).unwrap(),
        ),
        mp4: data_uri(
            "video/mp4",
            &std::fs::read(fixtures().join("video/clip.mp4")).unwrap(),
        ),
        frame: data_uri(
            "image/png",
            &std::fs::read(fixtures().join("images/tiny20.png")).unwrap(),
        ),
    });

    let run = |from: usize, to: usize| -> BTreeMap<(&'static str, u16), usize> {
        let next = Arc::new(AtomicUsize::new(from));
        let counts = Arc::new(Mutex::new(BTreeMap::new()));
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let (next, counts, inputs, url) = (
                    next.clone(),
                    counts.clone(),
                    inputs.clone(),
                    server.url.clone(),
                );
                std::thread::spawn(move || {
                    let agent = agent();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= to {
                            break;
                        }
                        let (kind, body, cancel) = request(i, &inputs);
                        let status = send(&agent, &url, body, cancel);
                        *counts.lock().unwrap().entry((kind, status)).or_insert(0) += 1;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        Arc::try_unwrap(counts).unwrap().into_inner().unwrap()
    };

    // Warm-up: the first fifth, at least 200 requests (every kind 20 times over: the
    // allocator's arenas reach their working size; with 80 the level after warm-up was
    // sometimes 7-15% under the steady one, which then stayed flat for 10,000 requests).
    let t0 = Instant::now();
    let warm = (total / 5).max(200);
    let mut counts = run(0, warm);
    std::thread::sleep(Duration::from_millis(500));
    let rss_warm = server.status_kib("VmRSS:");
    // The rest in tenths, RSS sampled after each (printed: growth that does not level off
    // would be a leak).
    let rest = total.max(warm) - warm;
    let mut samples = vec![rss_warm >> 10];
    for k in 0..10 {
        let (a, b) = (warm + rest * k / 10, warm + rest * (k + 1) / 10);
        for (key, n) in run(a, b) {
            *counts.entry(key).or_insert(0) += n;
        }
        std::thread::sleep(Duration::from_millis(500));
        samples.push(server.status_kib("VmRSS:") >> 10);
    }
    let elapsed = t0.elapsed();

    // Let cancelled streams be reaped, then read the engine's gauges.
    let agent = agent();
    let mut metrics = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        metrics = agent
            .get(format!("{}/metrics", server.url))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        if metric(&metrics, "qwen2vl_kv_cache_tokens_used") == Some(0.0)
            && metric(&metrics, "qwen2vl_running_sequences") == Some(0.0)
            && metric(&metrics, "qwen2vl_queue_depth") == Some(0.0)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss_end = server.status_kib("VmRSS:");
    let hwm = server.status_kib("VmHWM:");
    eprintln!(
        "soak: {} requests from {clients} clients in {:.1} s; RSS after warm-up {} MiB, at the \
         end {} MiB ({:+.1}%), peak {} MiB",
        total.max(warm),
        elapsed.as_secs_f64(),
        rss_warm >> 10,
        rss_end >> 10,
        (rss_end as f64 / rss_warm as f64 - 1.0) * 100.0,
        hwm >> 10
    );
    eprintln!("  RSS (MiB) after warm-up and each tenth: {samples:?}");
    for ((kind, status), n) in &counts {
        eprintln!("  {kind:12} HTTP {status}: {n}");
    }
    for ((kind, status), n) in &counts {
        assert!(*status < 500, "{n} {kind} requests got HTTP {status}");
        let expected = if *kind == "bad" { 400..=415 } else { 200..=200 };
        assert!(
            expected.contains(status),
            "{n} {kind} requests got HTTP {status}"
        );
    }
    assert_eq!(
        metric(&metrics, "qwen2vl_kv_cache_tokens_used"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "qwen2vl_running_sequences"), Some(0.0));
    assert_eq!(metric(&metrics, "qwen2vl_queue_depth"), Some(0.0));
    assert!(
        rss_end as f64 <= rss_warm as f64 * 1.10,
        "RSS grew from {} to {} KiB",
        rss_warm,
        rss_end
    );
    assert_eq!(
        temp_video_files(),
        temp_before,
        "temporary files left behind"
    );
    // The server still answers.
    let mut r = agent
        .post(format!("{}/v1/chat/completions", server.url))
        .header("content-type", "application/json")
        .send(r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}"#)
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "{}",
        r.body_mut().read_to_string().unwrap()
    );
}

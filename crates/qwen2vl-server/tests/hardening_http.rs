//! Issue 10 ("Hardening") through real HTTP on 127.0.0.1 with the tiny fixture model: stop
//! strings, Host and Content-Type checks, the video frame budget, slow clients and the
//! connection cap, and the smaller items (405 bodies, paths, per-item keys, model ids).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::{start_engine, start_with};
use qwen2vl_server::ServerConfig;

fn start(config: ServerConfig) -> SocketAddr {
    start_engine(4, 16, config)
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The OpenAI error object, checking its shape.
    fn error(&self) -> Value {
        let v = self.json();
        let e = v["error"].clone();
        assert!(e["message"].is_string(), "{}", self.body);
        assert!(e["type"].is_string(), "{}", self.body);
        e
    }
}

/// One HTTP/1.1 request over a fresh connection, written by hand so that every header (Host
/// included) is exactly what the test says; `Connection: close`, the whole answer read.
fn raw(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nconnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("host: {addr}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut bytes = Vec::new();
    s.read_to_end(&mut bytes).unwrap();
    parse_response(&bytes)
}

fn parse_response(bytes: &[u8]) -> Resp {
    let text = String::from_utf8_lossy(bytes).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head: {text:?}"));
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

fn post(addr: SocketAddr, body: &Value) -> Resp {
    raw(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        &body.to_string(),
    )
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn greedy(messages: Value, max_tokens: usize) -> Value {
    json!({"messages": messages, "max_tokens": max_tokens, "temperature": 0})
}

// ---------------------------------------------------------------------------------------------
// 5. Stop strings
// ---------------------------------------------------------------------------------------------

#[test]
fn long_stop_strings_are_refused_naming_stop() {
    let addr = start(ServerConfig::default());
    for stop in [
        json!("x".repeat(257)),
        json!(["ok", "é".repeat(200)]),
        json!(vec!["s"; 17]),
    ] {
        let mut body = greedy(user("Hi"), 2);
        body["stop"] = stop.clone();
        let r = post(addr, &body);
        assert_eq!(r.status, 400, "{}", r.body);
        let e = r.error();
        assert_eq!(e["param"], "stop", "{e}");
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains("allowed: at most"), "{msg}");
    }
    // At the limit: served.
    let mut body = greedy(user("Hi"), 2);
    body["stop"] = json!(["a".repeat(256), "b".repeat(256)]);
    let r = post(addr, &body);
    assert_eq!(r.status, 200, "{}", r.body);
}

// ---------------------------------------------------------------------------------------------
// 8. The video frame budget
// ---------------------------------------------------------------------------------------------

/// An animated GIF of `frames` frames of `size` x `size` pixels at 10 frames per second.
fn gif(frames: usize, size: u32) -> Vec<u8> {
    use image::codecs::gif::GifEncoder;
    use image::{Delay, Frame, Rgba, RgbaImage};
    let mut out = Vec::new();
    {
        let mut enc = GifEncoder::new_with_speed(&mut out, 30);
        for i in 0..frames {
            let img = RgbaImage::from_fn(size, size, |x, y| {
                let v = ((x / 50 + y / 50 + i as u32) % 2 * 200) as u8;
                Rgba([v, 255 - v, (i * 30) as u8, 255])
            });
            let frame = Frame::from_parts(img, 0, 0, Delay::from_numer_denom_ms(100, 1));
            enc.encode_frame(frame).unwrap();
        }
    }
    out
}

/// The video tokens the library's own `Processor` gives one message.
fn library_video_tokens(message: qwen2vl::processing::messages::Message) -> u64 {
    let inputs = common::pipeline()
        .processor()
        .process(&[message], &Default::default())
        .unwrap();
    inputs
        .video_grid_thw
        .iter()
        .map(|[t, h, w]| (t * h * w / 4) as u64)
        .sum()
}

#[test]
fn a_video_gets_the_reference_frame_budget_not_the_image_cap() {
    use base64::Engine as _;
    use qwen2vl::processing::messages::{ContentPart, Message, Role, VideoPart};
    let url = format!(
        "data:image/gif;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(gif(8, 1000))
    );
    let addr = start(ServerConfig::default());
    let ask = |part: Value| {
        let r = post(
            addr,
            &greedy(
                json!([{"role": "user", "content": [part, {"type": "text", "text": "?"}]}]),
                1,
            ),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["usage"]["prompt_tokens_details"]["video_tokens"]
            .as_u64()
            .unwrap()
    };
    let served = ask(json!({"type": "video_url", "video_url": {"url": url}}));
    let part = VideoPart::new(url.as_str());
    let reference = library_video_tokens(Message::parts(
        Role::User,
        vec![ContentPart::Video(part), ContentPart::text("?")],
    ));
    // 4 frames sampled at 2 fps from 0.8 s, 756 x 756 each (VIDEO_MAX_PIXELS): 2 temporal
    // patches of 27 x 27 tokens, as qwen-vl-utils gives; the image cap gave 2 x 36 x 36.
    assert_eq!(served, reference);
    assert_eq!(served, 1458);
    // An explicit max_pixels up to the server's cap is still honoured.
    let explicit =
        ask(json!({"type": "video_url", "video_url": {"url": url}, "max_pixels": 16384 * 28 * 28}));
    assert_eq!(explicit, 2 * 36 * 36);
    // Above it: refused, naming the key.
    let mut body = greedy(
        json!([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}, "max_pixels": 16385 * 28 * 28}]}]),
        1,
    );
    let r = post(addr, &body);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.error()["param"], "messages[0].content[0].max_pixels");
    body["messages"][0]["content"][0]
        .as_object_mut()
        .unwrap()
        .remove("max_pixels");
    assert_eq!(post(addr, &body).status, 200);
}

//! Issue 10 ("Hardening") through real HTTP on 127.0.0.1 with the tiny fixture model: stop
//! strings, Host and Content-Type checks, the video frame budget, slow clients and the
//! connection cap, and the smaller items (405 bodies, paths, per-item keys, model ids).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::{data_uri, start_engine, user, user_with, video_tokens, Resp};
use qwen2vl_server::ServerConfig;

fn start(config: ServerConfig) -> SocketAddr {
    start_engine(4, 16, config)
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
    let ask = |part: Value| video_tokens(&post(addr, &with_part(part)));
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

// ---------------------------------------------------------------------------------------------
// 7. Host header and Content-Type
// ---------------------------------------------------------------------------------------------

fn get_with_host(addr: SocketAddr, path: &str, host: &str) -> Resp {
    raw(addr, "GET", path, &[("host", host)], "")
}

#[test]
fn on_loopback_only_local_host_names_are_served() {
    let addr = start(ServerConfig::default());
    let port = addr.port();
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "LocalHost".to_string(),
    ] {
        let r = get_with_host(addr, "/v1/models", &host);
        assert_eq!(r.status, 200, "{host}: {}", r.body);
    }
    // The web page still works from http://localhost:PORT/.
    let page = get_with_host(addr, "/", &format!("localhost:{port}"));
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    // A rebound name (evil.example resolving to 127.0.0.1) is refused, page included.
    for path in ["/v1/models", "/", "/health"] {
        let r = get_with_host(addr, path, &format!("evil.example:{port}"));
        assert_eq!(r.status, 403, "{path}: {}", r.body);
        let e = r.error();
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains("evil.example"), "{msg}");
        assert!(msg.contains("--allowed-host"), "{msg}");
        assert_eq!(e["code"], "host_not_allowed");
    }
    let r = raw(
        addr,
        "POST",
        "/v1/chat/completions",
        &[
            ("host", "evil.example"),
            ("content-type", "application/json"),
        ],
        &greedy(user("Hi"), 1).to_string(),
    );
    assert_eq!(r.status, 403, "{}", r.body);
}

#[test]
fn allowed_host_adds_names_and_star_turns_the_check_off() {
    let addr = start(ServerConfig {
        allowed_hosts: Some(vec!["my.box".into()]),
        ..ServerConfig::default()
    });
    assert_eq!(get_with_host(addr, "/v1/models", "my.box:8080").status, 200);
    assert_eq!(get_with_host(addr, "/v1/models", "localhost").status, 200);
    assert_eq!(get_with_host(addr, "/v1/models", "other.box").status, 403);
    let any = start(ServerConfig {
        allowed_hosts: Some(vec!["*".into()]),
        ..ServerConfig::default()
    });
    assert_eq!(get_with_host(any, "/v1/models", "other.box").status, 200);
    // Bound to every interface with no --allowed-host: no Host check (the operator chose a
    // public address); with names given, only those (and the loopback ones).
    let public = start_on(ServerConfig::default());
    assert_eq!(get_with_host(public, "/v1/models", "other.box").status, 200);
}

fn start_on(config: ServerConfig) -> SocketAddr {
    let a = common::start_on(
        "0.0.0.0:0",
        qwen2vl_server::backend::start(common::pipeline(), 2, 8, 0),
        config,
    );
    SocketAddr::from(([127, 0, 0, 1], a.port()))
}

#[test]
fn json_endpoints_take_only_application_json_bodies() {
    let addr = start(ServerConfig::default());
    let body = greedy(user("Hi"), 1).to_string();
    for (ct, want) in [
        (Some("text/plain"), 415),
        (Some("text/plain;charset=UTF-8"), 415),
        (Some("application/x-www-form-urlencoded"), 415),
        (Some("multipart/form-data; boundary=x"), 415),
        (None, 415),
        (Some("application/json"), 200),
        (Some("application/json; charset=utf-8"), 200),
    ] {
        let headers: Vec<(&str, &str)> = ct.iter().map(|c| ("content-type", *c)).collect();
        let r = raw(addr, "POST", "/v1/chat/completions", &headers, &body);
        assert_eq!(r.status, want, "{ct:?}: {}", r.body);
        if want == 415 {
            let msg = r.error()["message"].as_str().unwrap().to_string();
            assert!(msg.contains("application/json"), "{msg}");
            if let Some(c) = ct {
                assert!(msg.contains(c), "{msg}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 9. Slow clients and the connection cap
// ---------------------------------------------------------------------------------------------

/// A connection that sent half a request head and stalls.
fn stalled(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-")
        .unwrap();
    s
}

/// Reads until the peer closes; true when it closed within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let t0 = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        let left = within.saturating_sub(t0.elapsed());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn stalled_headers_are_closed_after_the_timeout_and_others_are_served_meanwhile() {
    let timeout = Duration::from_secs(2);
    let addr = start(ServerConfig {
        header_read_timeout: timeout,
        ..ServerConfig::default()
    });
    let t0 = Instant::now();
    let mut held: Vec<TcpStream> = (0..40).map(|_| stalled(addr)).collect();
    // While they are held, a normal request is answered at once.
    let r = raw(addr, "GET", "/health", &[], "");
    assert_eq!(r.status, 200);
    assert!(
        t0.elapsed() < timeout,
        "answered only after {:?}",
        t0.elapsed()
    );
    for s in &mut held {
        assert!(closed_within(s, Duration::from_secs(10)), "still open");
    }
    assert!(t0.elapsed() >= timeout - Duration::from_millis(200));
    // An idle keep-alive connection is closed after the same time.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 512];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let idle = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(10)));
    assert!(idle.elapsed() >= timeout - Duration::from_millis(200));
}

#[test]
fn a_slow_body_gets_408() {
    let addr = start(ServerConfig {
        body_read_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    });
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"messages\": ",
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut bytes = Vec::new();
    let _ = s.read_to_end(&mut bytes);
    let r = parse_response(&bytes);
    assert_eq!(r.status, 408, "{}", r.body);
    assert!(r.error()["message"]
        .as_str()
        .unwrap()
        .contains("--body-read-timeout"));
}

#[test]
fn connections_beyond_the_cap_wait_until_one_closes() {
    let timeout = Duration::from_secs(2);
    let addr = start(ServerConfig {
        header_read_timeout: timeout,
        max_connections: 3,
        ..ServerConfig::default()
    });
    let t0 = Instant::now();
    let _held: Vec<TcpStream> = (0..3).map(|_| stalled(addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    // A fourth connection is not served while the three are held...
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1000)))
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(s.read(&mut buf).is_err(), "served beyond the cap");
    // ... and is once the header timeout closed them.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut bytes = Vec::new();
    s.read_to_end(&mut bytes).unwrap();
    assert_eq!(parse_response(&bytes).status, 200);
    assert!(t0.elapsed() >= timeout - Duration::from_millis(200));
}

// ---------------------------------------------------------------------------------------------
// 10. Smaller items
// ---------------------------------------------------------------------------------------------

#[test]
fn method_not_allowed_has_an_openai_error_body() {
    let addr = start(ServerConfig::default());
    let r = raw(
        addr,
        "POST",
        "/v1/models",
        &[("content-type", "application/json")],
        "{}",
    );
    assert_eq!(r.status, 405);
    let e = r.error();
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("POST") && msg.contains("allowed: GET"),
        "{msg}"
    );
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let allows = r
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("allow"))
        .count();
    assert_eq!(allows, 1, "{:?}", r.headers);
    let r = raw(addr, "GET", "/v1/chat/completions", &[], "");
    assert_eq!(r.status, 405);
    assert!(r.error()["message"]
        .as_str()
        .unwrap()
        .contains("allowed: POST"));
    assert_eq!(r.header("allow"), Some("POST"));
}

/// A greedy one-token request: `part`, then the question "?".
fn with_part(part: Value) -> Value {
    greedy(user_with(part), 1)
}

#[test]
fn a_path_outside_the_media_dir_says_the_same_whether_it_exists_or_not() {
    let root = std::env::temp_dir().join(format!("qwen2vl-hard-{}", std::process::id()));
    let inside = root.join("media");
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::copy(
        common::fixtures().join("images/gray.png"),
        root.join("secret.png"),
    )
    .unwrap();
    std::fs::copy(
        common::fixtures().join("images/gray.png"),
        inside.join("ok.png"),
    )
    .unwrap();
    let addr = start(ServerConfig {
        allowed_media_dir: Some(inside.clone()),
        ..ServerConfig::default()
    });
    let ask = |url: &str| {
        post(
            addr,
            &with_part(json!({"type": "image_url", "image_url": {"url": url}})),
        )
    };
    assert_eq!(ask("ok.png").status, 200);
    let secret = root.join("secret.png").display().to_string();
    let missing = root.join("missing.png").display().to_string();
    let missing_inside = inside.join("missing.png").display().to_string();
    let mut messages = Vec::new();
    for path in [&secret, &missing, &missing_inside] {
        let r = ask(path);
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        let msg = r.error()["message"].as_str().unwrap().to_string();
        let dir = inside.display().to_string();
        assert!(
            !msg.replace(path.as_str(), "PATH").contains(&dir),
            "the allowed directory is revealed: {msg}"
        );
        messages.push(msg.replace(path.as_str(), "PATH"));
    }
    assert_eq!(messages[0], messages[1]);
    assert_eq!(messages[0], messages[2]);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn per_item_keys_inside_image_url_and_video_url_are_honoured() {
    use base64::Engine as _;
    let addr = start(ServerConfig::default());
    let img = data_uri("images/photo640.png");
    let tokens = |r: Resp, kind: &str| {
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["usage"]["prompt_tokens_details"][kind]
            .as_u64()
            .unwrap()
    };
    let plain = tokens(
        post(
            addr,
            &with_part(json!({"type": "image_url", "image_url": {"url": img}})),
        ),
        "image_tokens",
    );
    let outside = tokens(
        post(
            addr,
            &with_part(
                json!({"type": "image_url", "image_url": {"url": img}, "max_pixels": 28 * 28 * 16}),
            ),
        ),
        "image_tokens",
    );
    let inside = tokens(
        post(
            addr,
            &with_part(
                json!({"type": "image_url", "image_url": {"url": img, "max_pixels": 28 * 28 * 16, "detail": "high"}}),
            ),
        ),
        "image_tokens",
    );
    assert!(outside < plain, "{outside} vs {plain}");
    assert_eq!(inside, outside);
    // An unknown key there is a 400 naming it and the allowed ones.
    let r = post(
        addr,
        &with_part(json!({"type": "image_url", "image_url": {"url": img, "max_pixel": 100}})),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    let e = r.error();
    assert_eq!(e["param"], "messages[0].content[0].image_url.max_pixel");
    assert!(e["message"].as_str().unwrap().contains("max_pixels"));
    // The same key with two values is refused.
    let r = post(
        addr,
        &with_part(
            json!({"type": "image_url", "image_url": {"url": img, "max_pixels": 3136}, "max_pixels": 6272}),
        ),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    // Video keys inside video_url: nframes.
    let clip = std::fs::read(common::fixtures().join("video/clip.mp4")).unwrap();
    let url = format!(
        "data:video/mp4;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(clip)
    );
    let video = |n: usize| {
        tokens(
            post(
                addr,
                &with_part(
                    json!({"type": "video_url", "video_url": {"url": url, "nframes": n, "max_pixels": 28 * 28 * 16}}),
                ),
            ),
            "video_tokens",
        )
    };
    let four = video(4);
    assert!(four > 0);
    assert_eq!(video(8), 2 * four);
}

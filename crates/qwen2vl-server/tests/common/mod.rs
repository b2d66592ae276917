//! What the server's integration tests share: the tiny fixture model, a server on its own
//! thread, an HTTP client and its answers ([`Resp`]), and the request pieces several files
//! build (a user turn, a media part with a question, a fixture image as a data URI).

#![allow(dead_code)] // each test binary uses its own subset

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use qwen2vl::pipeline::{DTypeChoice, Pipeline};
use qwen2vl_server::backend::Backend;
use qwen2vl_server::ServerConfig;

/// `tests/fixtures` at the workspace root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The tiny fixture model, loaded once per test binary.
pub fn pipeline() -> Arc<Pipeline> {
    static P: OnceLock<Arc<Pipeline>> = OnceLock::new();
    P.get_or_init(|| {
        Arc::new(Pipeline::load(&fixtures().join("tiny-qwen2vl"), DTypeChoice::F32).unwrap())
    })
    .clone()
}

/// A server on its own thread and runtime; returns its address.
pub fn start_with(backend: Arc<dyn Backend>, config: ServerConfig) -> SocketAddr {
    start_on("127.0.0.1:0", backend, config)
}

/// [`start_with`] listening on `bind` (e.g. `0.0.0.0:0` for every interface).
pub fn start_on(bind: &'static str, backend: Arc<dyn Backend>, config: ServerConfig) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            qwen2vl_server::serve(listener, backend, config, std::future::pending())
                .await
                .unwrap();
        });
    });
    rx.recv().unwrap()
}

/// A server with the batching engine (`max_running`, `max_queue`) on the tiny model.
pub fn start_engine(max_running: usize, max_queue: usize, config: ServerConfig) -> SocketAddr {
    start_with(
        qwen2vl_server::backend::start(pipeline(), max_running, max_queue, 0),
        config,
    )
}

/// An HTTP answer as the tests read it.
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// A header's value, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The OpenAI error object, checking its shape.
    pub fn error(&self) -> serde_json::Value {
        let v = self.json();
        let e = v["error"].clone();
        assert!(e["message"].is_string(), "{}", self.body);
        assert!(e["type"].is_string(), "{}", self.body);
        e
    }
}

/// An HTTP client that returns 4xx and 5xx answers instead of failing, with an overall
/// `timeout`.
pub fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

/// A client's answer as a [`Resp`] (panics when there is none).
pub fn read_response(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Resp {
    let mut r = r.unwrap();
    let headers = r
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    Resp {
        status: r.status().as_u16(),
        headers,
        body: r.body_mut().read_to_string().unwrap_or_default(),
    }
}

/// A conversation of one user turn of text.
pub fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// A conversation of one user turn: `part` (an image or a video), then the text "?".
pub fn user_with(part: Value) -> Value {
    json!([{"role": "user", "content": [part, {"type": "text", "text": "?"}]}])
}

/// A fixture PNG (a path under `tests/fixtures`) as a data URI.
pub fn data_uri(path: &str) -> String {
    let bytes = std::fs::read(fixtures().join(path)).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The video tokens of a successful answer's prompt (panics, with the body, on another
/// status).
pub fn video_tokens(r: &Resp) -> u64 {
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["usage"]["prompt_tokens_details"]["video_tokens"]
        .as_u64()
        .unwrap()
}

/// Writes a chat request on a raw connection (the caller reads or drops it: a client that
/// hangs up).
pub fn send_raw(addr: SocketAddr, body: &Value) -> TcpStream {
    let body = body.to_string();
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    s
}

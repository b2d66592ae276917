//! What the server's integration tests share: the tiny fixture model and a server on its own
//! thread.

#![allow(dead_code)] // each test binary uses its own subset

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

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

//! An OpenAI-compatible HTTP API for Qwen2-VL: `POST /v1/chat/completions` (streamed or not,
//! images and videos, tools), `GET /v1/models`, `GET /health` and `GET /metrics`.
//!
//! The server talks to the model only through [`backend::Backend`]: submit a request, read
//! its events. Limits are checked before any media is read; local files are served only from
//! an allowed directory and remote media only from public hosts, when enabled.

pub mod backend;
pub mod chat;
mod error;
pub mod guard;
pub mod listen;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod page;
pub mod request;
pub mod tools;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

pub use error::ApiError;

use crate::backend::Backend;
use crate::metrics::Metrics;
use crate::request::MediaPolicy;

/// Limits on what one request may ask for; each is checked before expensive work.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Most images in one request.
    pub max_images: usize,
    /// Most videos in one request.
    pub max_videos: usize,
    /// Most resized pixels per image or video frame: a `min_pixels`, `max_pixels` or
    /// `resized_height` x `resized_width` above it is refused, and it is the `max_pixels` of
    /// images that give none. Videos that give none keep the reference's per-frame video
    /// budget (lowered to this cap only when the cap is below it). `None`: no cap.
    pub max_image_pixels: Option<u64>,
    /// Most frames sampled from one video (and frames in a frame list).
    pub max_video_frames: usize,
    /// Most choices (`n`).
    pub max_n: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// Largest encoded image or video read from a data URI, file or URL.
    pub max_media_bytes: u64,
    /// Timeout of a remote media fetch.
    pub fetch_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 << 20,
            max_images: 16,
            max_videos: 2,
            max_image_pixels: Some(16384 * 28 * 28),
            max_video_frames: 768,
            max_n: 8,
            default_max_tokens: 1024,
            max_media_bytes: 48 << 20,
            fetch_timeout: Duration::from_secs(30),
        }
    }
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The model id shown by `/v1/models` and in responses.
    pub model_name: String,
    /// Required as `Authorization: Bearer KEY` on every route but `/health` and the web
    /// page's static files.
    pub api_key: Option<String>,
    /// The origin allowed by CORS (`*` for any); no CORS headers when `None`.
    pub cors_origin: Option<String>,
    /// Fetch http(s) media URLs (public hosts only).
    pub allow_remote_media: bool,
    /// Local media files are read only under this directory.
    pub allowed_media_dir: Option<PathBuf>,
    /// Request limits.
    pub limits: Limits,
    /// `Host` names served besides localhost, 127.0.0.1 and [::1] (`*`: any). On a loopback
    /// address only those are served; elsewhere any Host unless names are given (see
    /// [`guard::HostPolicy`]): a web page cannot reach the server through DNS rebinding.
    pub allowed_hosts: Option<Vec<String>>,
    /// The request head must arrive within this; also how long a keep-alive connection may
    /// stay idle.
    pub header_read_timeout: Duration,
    /// A request body must arrive within this (408 beyond).
    pub body_read_timeout: Duration,
    /// Connections served at once; more wait until one closes.
    pub max_connections: usize,
    /// On shutdown, how long running answers may go on before they are cancelled (each
    /// stream then ends with its finish chunk and `data: [DONE]`).
    pub shutdown_grace: Duration,
    /// `/health` answers 503 when the engine has work but has made no progress for this
    /// long (no decode step, no unit of prefill, no admission, no request leaving).
    pub health_stall_after: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            model_name: "qwen2vl".into(),
            api_key: None,
            cors_origin: None,
            allow_remote_media: false,
            allowed_media_dir: None,
            limits: Limits::default(),
            allowed_hosts: None,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 256,
            shutdown_grace: Duration::from_secs(10),
            health_stall_after: Duration::from_secs(60),
        }
    }
}

/// What the handlers share.
pub struct AppState {
    backend: Arc<dyn Backend>,
    config: ServerConfig,
    media: MediaPolicy,
    metrics: Metrics,
    created: u64,
    hosts: guard::HostPolicy,
}

/// The routes with their middleware. Fails when `allowed_media_dir` does not exist. The
/// Host check is that of a loopback address (see [`app_on`]).
pub fn app(backend: Arc<dyn Backend>, config: ServerConfig) -> Result<Router, String> {
    app_on(backend, config, None)
}

/// [`app`] for a server listening on `local` (its Host check depends on it).
pub fn app_on(
    backend: Arc<dyn Backend>,
    config: ServerConfig,
    local: Option<SocketAddr>,
) -> Result<Router, String> {
    let allowed_dir = match &config.allowed_media_dir {
        Some(d) => Some(
            d.canonicalize()
                .map_err(|e| format!("--allowed-media-dir {} cannot be used: {e}", d.display()))?,
        ),
        None => None,
    };
    let media = MediaPolicy {
        allow_remote: config.allow_remote_media,
        allowed_dir,
    };
    let body_limit = config.limits.max_body_bytes;
    let hosts = guard::HostPolicy::new(config.allowed_hosts.as_deref(), local);
    let state = Arc::new(AppState {
        backend,
        config,
        media,
        metrics: Metrics::default(),
        created: chat::unix_now(),
        hosts,
    });
    let mut router = Router::new();
    for asset in page::ASSETS {
        router = router.route(
            asset.path,
            get(move || async move { page::response(asset) }),
        );
    }
    Ok(router
        .route(
            "/v1/chat/completions",
            post(chat::chat_completions).route_layer(middleware::from_fn_with_state(
                state.clone(),
                guard::json_body,
            )),
        )
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::document))
        .method_not_allowed_fallback(guard::method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), cors))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard::check_host,
        ))
        .with_state(state))
}

/// Serves `app` on `listener` until `shutdown` completes, then drains the connections
/// (within [`ServerConfig::shutdown_grace`], then cancelling what still runs) and stops the
/// backend. See [`listen`] for the timeouts and the connection cap.
pub async fn serve(
    listener: tokio::net::TcpListener,
    backend: Arc<dyn Backend>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let conns = listen::Connections {
        header_read_timeout: config.header_read_timeout,
        max_connections: config.max_connections,
        shutdown_grace: config.shutdown_grace,
    };
    let local = listener.local_addr().ok();
    let router = app_on(backend.clone(), config, local)?;
    listen::serve(listener, router, backend, conns, shutdown).await;
    Ok(())
}

/// A JSON response.
fn json(v: &impl serde::Serialize) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(v).unwrap_or_default(),
    )
        .into_response()
}

/// `{"status": "ok"}`, or 503 with `{"status": "unhealthy", "reason": …}` when the engine
/// has work but has not moved on for [`ServerConfig::health_stall_after`].
async fn health(State(st): State<Arc<AppState>>) -> Response {
    let live = st.backend.liveness();
    let limit = st.config.health_stall_after.as_secs_f64();
    if !(live.busy && live.seconds_since_progress >= limit) {
        return json(&serde_json::json!({"status": "ok"}));
    }
    let load = st.backend.stats();
    let mut r = json(&serde_json::json!({
        "status": "unhealthy",
        "reason": format!(
            "the engine has work ({} running, {} queued) but has made no progress for {:.0} s (the limit is {:.0} s)",
            load.running, load.queued, live.seconds_since_progress, limit
        ),
        "seconds_since_progress": live.seconds_since_progress,
        "running": load.running,
        "queued": load.queued,
    }));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    let context = st.backend.pipeline().model().config().text.context_len();
    json(&openai::ModelList {
        object: "list",
        data: vec![openai::ModelCard {
            id: st.config.model_name.clone(),
            object: "model",
            created: st.created,
            owned_by: "qwen2vl",
            max_model_len: context,
        }],
    })
}

async fn metrics(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(st.backend.stats()),
    )
}

async fn not_found(req: Request) -> ApiError {
    ApiError::client(
        StatusCode::NOT_FOUND,
        format!("no route {} {}", req.method(), req.uri().path()),
    )
}

/// Equal-length-independent, data-independent comparison of two secrets.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = &st.config.api_key else {
        return next.run(req).await;
    };
    // The page's static files carry no data; the page sends the key on its API calls.
    let path = req.uri().path();
    if path == "/health"
        || (matches!(*req.method(), Method::GET | Method::HEAD) && page::is_page_path(path))
    {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => next.run(req).await,
        _ => ApiError::client(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API key; send the header Authorization: Bearer <key>",
        )
        .with_code("invalid_api_key")
        .into_response(),
    }
}

async fn cors(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(allowed) = &st.config.cors_origin else {
        return next.run(req).await;
    };
    let origin = req.headers().get(header::ORIGIN).cloned();
    let matches = origin
        .as_ref()
        .and_then(|o| o.to_str().ok())
        .is_some_and(|o| allowed == "*" || o == allowed);
    let allow_value = if allowed == "*" {
        HeaderValue::from_static("*")
    } else {
        match HeaderValue::from_str(allowed) {
            Ok(v) => v,
            Err(_) => return next.run(req).await,
        }
    };
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = if preflight && matches {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(req).await
    };
    if matches {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_value);
        h.insert(header::VARY, HeaderValue::from_static("origin"));
        if preflight {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, content-type"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
        }
    }
    resp
}

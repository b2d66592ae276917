//! `qwen2vl serve`: the OpenAI-compatible HTTP server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use qwen2vl_server::{Limits, ServerConfig};

use crate::common::{EncoderCacheArgs, ModelArgs};
use crate::error::CliError;

/// Flags of `qwen2vl serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub encoder_cache: EncoderCacheArgs,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Model id shown by /v1/models and in responses (default: the --model value).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on every route but /health (also read from the
    /// QWEN2VL_API_KEY environment variable).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Allow browser pages from this origin (e.g. http://localhost:3000, or * for any) to
    /// call the API; no CORS headers without it.
    #[arg(long)]
    pub cors_origin: Option<String>,
    /// Fetch http(s) image and video URLs (public hosts only: loopback, private and
    /// link-local addresses are refused, also after redirects). Off by default.
    #[arg(long)]
    pub allow_remote_media: bool,
    /// Serve local media paths and file:// URLs from this directory only (symlinks and ..
    /// that lead outside it are refused). Local files are refused without it.
    #[arg(long)]
    pub allowed_media_dir: Option<PathBuf>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 8)]
    pub max_running: usize,
    /// Requests waiting beyond the running ones (at least 1: every request passes through the
    /// queue); more get HTTP 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// KV-cache budget in tokens over all running sequences (0: from the model and memory).
    #[arg(long, default_value_t = 0)]
    pub kv_budget: usize,
    /// Milliseconds of a new request's image encoding and prefill run between two decode
    /// steps of the running streams (smaller: smoother streams; larger: sooner first tokens).
    #[arg(long, default_value_t = 300)]
    pub prefill_slice_ms: u64,
    /// Largest request body in bytes (HTTP 413 beyond).
    #[arg(long, default_value_t = 64 << 20)]
    pub max_body_bytes: usize,
    /// Most images in one request.
    #[arg(long, default_value_t = 16)]
    pub max_images: usize,
    /// Most videos in one request.
    #[arg(long, default_value_t = 2)]
    pub max_videos: usize,
    /// Most resized pixels per image or video frame (max_pixels above it is refused).
    #[arg(long, default_value_t = 16384 * 28 * 28)]
    pub max_image_pixels: u64,
    /// Most frames sampled from one video.
    #[arg(long, default_value_t = 768)]
    pub max_video_frames: usize,
    /// Most choices per request (n).
    #[arg(long, default_value_t = 8)]
    pub max_n: usize,
    /// max_tokens of requests that give none.
    #[arg(long, default_value_t = 1024)]
    pub default_max_tokens: usize,
    /// Largest image or video read from a data URI, file or URL, in bytes.
    #[arg(long, default_value_t = 48 << 20)]
    pub max_media_bytes: u64,
    /// Timeout of a remote media fetch, in seconds.
    #[arg(long, default_value_t = 30)]
    pub fetch_timeout: u64,
    /// A Host header name to serve besides localhost, 127.0.0.1 and [::1] (repeatable; any
    /// port; * serves any host). On a loopback --host only those names are served (a web page
    /// cannot reach the server through DNS rebinding); on other addresses any Host is served
    /// unless names are given.
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,
    /// Connections served at once; more wait until one closes.
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (also how long an idle keep-alive
    /// connection stays open).
    #[arg(long, default_value_t = 10)]
    pub header_read_timeout: u64,
    /// Seconds a client has to send a request's body (HTTP 408 beyond).
    #[arg(long, default_value_t = 60)]
    pub body_read_timeout: u64,
    /// On Ctrl-C or SIGTERM, seconds running answers may go on before they are cancelled
    /// (streams then end with their finish chunk and [DONE]); the process then exits 0.
    #[arg(long, default_value_t = 10)]
    pub shutdown_grace: u64,
    /// Requests whose images and videos are read and decoded at the same time (each on a
    /// thread of its own; text-only requests need none), so one slow download or video
    /// never holds the others.
    #[arg(long, default_value_t = 4)]
    pub preprocess_threads: usize,
    /// Seconds a request's preprocessing (fetching, decoding and resizing its media) may take
    /// before it fails with HTTP 400.
    #[arg(long, default_value_t = 120)]
    pub preprocess_timeout: u64,
    /// Seconds the engine may have work without making progress before /health answers 503.
    #[arg(long, default_value_t = 60)]
    pub health_stall_after: u64,
}

/// The id `/v1/models` shows for `--model`: a Hugging Face repo id as given, a local
/// directory by its last component (never the absolute path).
fn served_name(model: &str) -> String {
    let path = std::path::Path::new(model);
    if path.exists() {
        if let Some(name) = path
            .canonicalize()
            .ok()
            .as_deref()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
        {
            return name.to_string();
        }
        return "qwen2vl".to_string();
    }
    model.to_string()
}

/// Refuses settings that would leave the server open or useless (before the model loads).
fn check_flags(args: &ServeArgs, api_key: &Option<String>) -> Result<(), CliError> {
    if let Some(k) = api_key {
        if k.trim().is_empty() {
            return Err(CliError::Usage(
                "the API key (--api-key or QWEN2VL_API_KEY) is empty; give a non-empty key, or \
                 leave both out to serve without one"
                    .into(),
            ));
        }
    }
    if args.max_queue == 0 {
        return Err(CliError::Usage(
            "--max-queue 0 would refuse every request (each waits in the queue until the engine \
             takes it); allowed: at least 1"
                .into(),
        ));
    }
    for (flag, v) in [
        ("--max-connections", args.max_connections as u64),
        ("--header-read-timeout", args.header_read_timeout),
        ("--body-read-timeout", args.body_read_timeout),
        ("--preprocess-threads", args.preprocess_threads as u64),
        ("--preprocess-timeout", args.preprocess_timeout),
        ("--health-stall-after", args.health_stall_after),
    ] {
        if v == 0 {
            return Err(CliError::Usage(format!(
                "{flag} 0 would refuse every request; allowed: at least 1"
            )));
        }
    }
    if let Some(h) = args.allowed_hosts.iter().find(|h| h.trim().is_empty()) {
        return Err(CliError::Usage(format!(
            "--allowed-host {h:?} is empty; allowed: a host name, an address, or *"
        )));
    }
    Ok(())
}

/// Loads the model, binds and serves until Ctrl-C or SIGTERM (then drains and exits 0).
pub fn main(args: ServeArgs) -> Result<(), CliError> {
    let addr = bind_address(&args)?;
    if let Some(d) = &args.allowed_media_dir {
        if !d.is_dir() {
            return Err(CliError::Usage(format!(
                "--allowed-media-dir {} is not a directory",
                d.display()
            )));
        }
    }
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("QWEN2VL_API_KEY").ok());
    check_flags(&args, &api_key)?;
    let config = server_config(&args, api_key);
    let pipeline = Arc::new(args.model.load_with_cache(&args.encoder_cache)?);
    let backend = qwen2vl_server::backend::start_with(pipeline, engine_config(&args));
    #[cfg(debug_assertions)]
    let backend = scripted::wrap(backend);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| CliError::Usage(format!("cannot listen on {addr}: {e}")))?;
        let local = listener.local_addr()?;
        // Registered before the address is printed: from then on SIGTERM (systemd, Docker,
        // Kubernetes) drains like Ctrl-C instead of killing the process.
        let signals = Signals::register()?;
        if !args.model.quiet {
            eprintln!("qwen2vl: serving {} on http://{local}", config.model_name);
        }
        let quiet = args.model.quiet;
        let grace = args.shutdown_grace;
        let shutdown = async move {
            let which = signals.wait().await;
            if !quiet {
                eprintln!(
                    "qwen2vl: {which}: no new connections; running answers get {grace} s to finish"
                );
            }
        };
        qwen2vl_server::serve(listener, backend, config, shutdown)
            .await
            .map_err(CliError::Failed)
    })
}

/// `--host`:`--port` as a socket address (an IP literal, or a name that resolves).
fn bind_address(args: &ServeArgs) -> Result<SocketAddr, CliError> {
    format!("{}:{}", args.host, args.port)
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            (args.host.as_str(), args.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|_| CliError::Usage(format!("--host {} is not an address", args.host)))
}

/// The server's settings from the flags (already checked by [`check_flags`]).
fn server_config(args: &ServeArgs, api_key: Option<String>) -> ServerConfig {
    ServerConfig {
        model_name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| served_name(&args.model.model)),
        api_key,
        cors_origin: args.cors_origin.clone(),
        allow_remote_media: args.allow_remote_media,
        allowed_media_dir: args.allowed_media_dir.clone(),
        limits: Limits {
            max_body_bytes: args.max_body_bytes,
            max_images: args.max_images,
            max_videos: args.max_videos,
            max_image_pixels: Some(args.max_image_pixels),
            max_video_frames: args.max_video_frames,
            max_n: args.max_n.max(1),
            default_max_tokens: args.default_max_tokens.max(1),
            max_media_bytes: args.max_media_bytes,
            fetch_timeout: Duration::from_secs(args.fetch_timeout.max(1)),
        },
        allowed_hosts: (!args.allowed_hosts.is_empty()).then(|| args.allowed_hosts.clone()),
        header_read_timeout: Duration::from_secs(args.header_read_timeout),
        body_read_timeout: Duration::from_secs(args.body_read_timeout),
        max_connections: args.max_connections,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        health_stall_after: Duration::from_secs(args.health_stall_after),
    }
}

/// The engine's scheduling settings from the flags.
fn engine_config(args: &ServeArgs) -> qwen2vl::engine::EngineConfig {
    qwen2vl::engine::EngineConfig {
        max_running: args.max_running.max(1),
        max_queue: args.max_queue,
        kv_budget_tokens: args.kv_budget,
        prefill_slice_ms: args.prefill_slice_ms,
        preprocess_threads: args.preprocess_threads,
        preprocess_timeout: Duration::from_secs(args.preprocess_timeout),
    }
}

/// Ctrl-C and, on Unix, SIGTERM.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> Result<Signals, CliError> {
        Ok(Signals {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| CliError::Failed(format!("cannot handle SIGTERM: {e}")))?,
        })
    }

    /// Waits for the first of them; names it.
    async fn wait(mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => "interrupted",
                _ = self.term.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "interrupted"
        }
    }
}

/// A hidden test hook, compiled into debug builds only: with `QWEN2VL_TEST_SCRIPTED_ANSWER`
/// set, every request still runs through the real engine (so prompt processing, usage and
/// errors are real), but its answer is replaced by that text (grounding and tool-call markup
/// included) and streamed in pieces of a few characters. The tiny random test model never
/// writes boxes or tool calls; the end-to-end tests (`tools/e2e/`) need a known one.
#[cfg(debug_assertions)]
mod scripted {
    use std::sync::Arc;

    use qwen2vl::generation::stop::{FinishReason, StopReason};
    use qwen2vl::generation::GenerateRequest;
    use qwen2vl::pipeline::Pipeline;
    use qwen2vl_server::backend::{Backend, BackendStats, Event, Submission, SubmitError};

    struct Scripted {
        inner: Arc<dyn Backend>,
        answer: String,
    }

    /// `backend` itself, or wrapped when the environment variable is set.
    pub fn wrap(backend: Arc<dyn Backend>) -> Arc<dyn Backend> {
        match std::env::var("QWEN2VL_TEST_SCRIPTED_ANSWER") {
            Ok(answer) => Arc::new(Scripted {
                inner: backend,
                answer,
            }),
            Err(_) => backend,
        }
    }

    impl Backend for Scripted {
        fn submit(&self, request: GenerateRequest) -> Result<Submission, SubmitError> {
            let markup = request.stream_grounding_markup;
            let Submission { mut events, cancel } = self.inner.submit(request)?;
            let (tx, outer) = tokio::sync::mpsc::unbounded_channel();
            let answer = self.answer.clone();
            std::thread::spawn(move || {
                // `events` is dropped when this thread ends, which cancels the real request
                // if the client went away first.
                while let Some(event) = events.blocking_recv() {
                    if tx.is_closed() {
                        return;
                    }
                    match event {
                        Event::Token { .. } => {}
                        Event::Finished(mut gen) => {
                            crate::run::replace_answer(&mut gen, &answer);
                            let shown = if markup {
                                answer.as_str()
                            } else {
                                gen.text.as_str()
                            };
                            let chars: Vec<char> = shown.chars().collect();
                            for piece in chars.chunks(3) {
                                let _ = tx.send(Event::Token {
                                    id: 0,
                                    text: piece.iter().collect(),
                                    logprob: None,
                                });
                                std::thread::sleep(std::time::Duration::from_millis(5));
                            }
                            gen.usage.completion_tokens = chars.len().div_ceil(3);
                            gen.usage.total_tokens =
                                gen.usage.prompt_tokens + gen.usage.completion_tokens;
                            if gen.finish_reason == FinishReason::Length {
                                // The scripted text is the whole answer: a natural stop.
                                gen.finish_reason =
                                    FinishReason::Stop(StopReason::StopString(String::new()));
                            }
                            let _ = tx.send(Event::Finished(gen));
                        }
                        other => {
                            let _ = tx.send(other);
                        }
                    }
                }
            });
            Ok(Submission {
                events: outer,
                cancel,
            })
        }

        fn stats(&self) -> BackendStats {
            self.inner.stats()
        }

        fn pipeline(&self) -> &Pipeline {
            self.inner.pipeline()
        }

        fn shutdown(&self) {
            self.inner.shutdown()
        }
    }
}

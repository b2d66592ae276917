//! The one seam between the HTTP layer and the engine: submit a request, receive its events.
//!
//! [`Backend`] mirrors the library engine's interface (`Engine::submit` → a receiver of
//! events and a cancel flag). [`SerialBackend`] runs [`Pipeline::generate`] one request at a
//! time on a worker thread behind the same interface.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};

use qwen2vl::pipeline::{GenerateRequest, Generation, Pipeline, TokenLogprob};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// What happens to a submitted request, in order: at most one `Started`, any number of
/// `Token`s, then exactly one `Finished` or `Failed` (unless the receiver was dropped).
#[derive(Debug)]
pub enum Event {
    /// The prompt was prepared and admitted.
    Started {
        /// Prompt tokens in all.
        prompt_tokens: usize,
        /// Of them, image tokens.
        image_tokens: usize,
        /// Of them, video tokens.
        video_tokens: usize,
    },
    /// A generated token and the text it completed (may be empty inside a UTF-8 sequence).
    Token {
        /// The token id (0 when the backend does not report ids).
        id: u32,
        /// The new text.
        text: String,
        /// Its log-probability and alternatives, when asked for and reported per token.
        logprob: Option<TokenLogprob>,
    },
    /// The answer, complete.
    Finished(Box<Generation>),
    /// The request failed (bad media, prompt over the context, internal fault).
    Failed(qwen2vl::Error),
}

/// A submitted request: its events and a flag that stops it after the current token.
/// Dropping `events` cancels it too.
#[derive(Debug)]
pub struct Submission {
    /// The request's events.
    pub events: UnboundedReceiver<Event>,
    /// Set to stop generating.
    pub cancel: Arc<AtomicBool>,
}

/// Why a request was not accepted.
#[derive(Debug)]
pub enum SubmitError {
    /// Queue full: retry after this many seconds (HTTP 429).
    QueueFull {
        /// Suggested wait.
        retry_after_s: u64,
    },
    /// The request cannot be run (HTTP 400).
    Invalid(qwen2vl::Error),
    /// The server is stopping (HTTP 503).
    ShuttingDown,
}

/// Queue and batch occupancy, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Requests waiting to start.
    pub queued: usize,
    /// Sequences being generated.
    pub running: usize,
}

/// What the server needs from an engine.
pub trait Backend: Send + Sync + 'static {
    /// Queues a request.
    fn submit(&self, request: GenerateRequest) -> Result<Submission, SubmitError>;
    /// Current occupancy.
    fn stats(&self) -> BackendStats;
    /// The loaded model (defaults, tokenizer, context length).
    fn pipeline(&self) -> &Pipeline;
    /// Stops accepting requests.
    fn shutdown(&self) {}
}

struct Job {
    request: GenerateRequest,
    events: UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
}

/// Runs one request at a time with [`Pipeline::generate`] on a worker thread; `max_queue`
/// more may wait. Streams text per decoded piece (token ids and per-token logprobs are only
/// in the final [`Generation`]).
pub struct SerialBackend {
    pipeline: Arc<Pipeline>,
    jobs: Mutex<Option<std_mpsc::Sender<Job>>>,
    pending: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    max_queue: usize,
}

impl SerialBackend {
    /// Starts the worker thread.
    pub fn start(pipeline: Arc<Pipeline>, max_queue: usize) -> Self {
        let (tx, rx) = std_mpsc::channel::<Job>();
        let pending = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let (p, pend, run) = (pipeline.clone(), pending.clone(), running.clone());
        std::thread::Builder::new()
            .name("qwen2vl-generate".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    run.store(1, Ordering::Relaxed);
                    run_job(&p, job);
                    run.store(0, Ordering::Relaxed);
                    pend.fetch_sub(1, Ordering::Relaxed);
                }
            })
            .ok();
        SerialBackend {
            pipeline,
            jobs: Mutex::new(Some(tx)),
            pending,
            running,
            max_queue,
        }
    }
}

fn run_job(pipeline: &Pipeline, job: Job) {
    let Job {
        mut request,
        events,
        cancel,
    } = job;
    if cancel.load(Ordering::Relaxed) || events.is_closed() {
        return;
    }
    request.cancel = Some(cancel.clone());
    let result = pipeline.generate(&request, &mut |piece| {
        let token = Event::Token {
            id: 0,
            text: piece.to_string(),
            logprob: None,
        };
        if events.send(token).is_err() {
            // The client went away: stop after this token.
            cancel.store(true, Ordering::Relaxed);
        }
    });
    let _ = events.send(match result {
        Ok(g) => Event::Finished(Box::new(g)),
        Err(e) => Event::Failed(e),
    });
}

impl Backend for SerialBackend {
    fn submit(&self, request: GenerateRequest) -> Result<Submission, SubmitError> {
        let guard = self.jobs.lock().map_err(|_| SubmitError::ShuttingDown)?;
        let Some(tx) = guard.as_ref() else {
            return Err(SubmitError::ShuttingDown);
        };
        // One running plus `max_queue` waiting.
        if self.pending.load(Ordering::Relaxed) > self.max_queue {
            return Err(SubmitError::QueueFull { retry_after_s: 1 });
        }
        let (events_tx, events) = unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        self.pending.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            request,
            events: events_tx,
            cancel: cancel.clone(),
        };
        if tx.send(job).is_err() {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(Submission { events, cancel })
    }

    fn stats(&self) -> BackendStats {
        let running = self.running.load(Ordering::Relaxed);
        BackendStats {
            queued: self.pending.load(Ordering::Relaxed).saturating_sub(running),
            running,
        }
    }

    fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    fn shutdown(&self) {
        if let Ok(mut g) = self.jobs.lock() {
            g.take();
        }
    }
}

/// The backend `qwen2vl serve` runs: for now one request at a time ([`SerialBackend`], with
/// `max_running` and `kv_budget_tokens` unused) until the batching engine is wired in.
pub fn start(
    pipeline: Arc<Pipeline>,
    max_running: usize,
    max_queue: usize,
    kv_budget_tokens: usize,
) -> Arc<dyn Backend> {
    let _ = (max_running, kv_budget_tokens);
    Arc::new(SerialBackend::start(pipeline, max_queue))
}

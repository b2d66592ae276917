//! The one seam between the HTTP layer and the engine: submit a request, receive its events.
//!
//! [`Backend`] is what the handlers need from the library's batching
//! [`Engine`](qwen2vl::engine::Engine) (which implements it); tests put fakes behind it.

use std::sync::Arc;

use qwen2vl::encoder_cache::EncoderCacheStats;
use qwen2vl::engine::{Engine, EngineConfig};
use qwen2vl::generation::GenerateRequest;
use qwen2vl::pipeline::Pipeline;
use qwen2vl::prefix_cache::PrefixCacheStats;

pub use qwen2vl::engine::{EngineEvent as Event, Submission, SubmitError};

/// Queue and batch occupancy, and the engine's step counters, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Requests waiting to start.
    pub queued: usize,
    /// Sequences being generated.
    pub running: usize,
    /// KV-cache tokens reserved by the running sequences.
    pub kv_tokens_used: usize,
    /// The KV budget in tokens.
    pub kv_budget_tokens: usize,
    /// Batched decode steps run.
    pub decode_steps: u64,
    /// Sequences summed over the decode steps (divided by `decode_steps`: the mean batch).
    pub decode_batch_sequences: u64,
    /// Decode steps run while a new request's vision tower or prefill was part-way done.
    pub decode_steps_during_prefill: u64,
    /// Requests whose media are being read and decoded.
    pub preprocessing: usize,
    /// Preprocessing threads given up on at their deadline and not yet ended.
    pub preprocess_threads_abandoned: usize,
    /// The encoder cache's counters and occupancy.
    pub encoder_cache: EncoderCacheStats,
    /// The prefix cache's counters and occupancy.
    pub prefix_cache: PrefixCacheStats,
}

/// Whether the engine moves on (for `/health`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Liveness {
    /// It has work: requests queued, being preprocessed, prefilled or decoded.
    pub busy: bool,
    /// Seconds since it last made progress (a decode step, a unit of prefill, an admission,
    /// a preprocessed request, a request leaving).
    pub seconds_since_progress: f64,
}

/// What the server needs from an engine.
pub trait Backend: Send + Sync + 'static {
    /// Queues a request. The backend applies all of it, its stop strings included: the
    /// texts of its [`Event::Token`]s and its answer are cut before the earliest stop string
    /// (as the engine's [`qwen2vl::generation::stop::StopStringFilter`] does); the server
    /// does not cut them again.
    fn submit(&self, request: GenerateRequest) -> Result<Submission, SubmitError>;
    /// Current occupancy.
    fn stats(&self) -> BackendStats;
    /// The loaded model (defaults, tokenizer, context length).
    fn pipeline(&self) -> &Pipeline;
    /// Stops accepting requests.
    fn shutdown(&self) {}
    /// Whether the engine moves on; the default (a backend without a scheduler) is never
    /// busy.
    fn liveness(&self) -> Liveness {
        Liveness::default()
    }
}

impl Backend for Engine {
    fn submit(&self, request: GenerateRequest) -> Result<Submission, SubmitError> {
        Engine::submit(self, request)
    }

    fn stats(&self) -> BackendStats {
        let s = Engine::stats(self);
        BackendStats {
            queued: s.queued,
            running: s.running,
            kv_tokens_used: s.kv_tokens_used,
            kv_budget_tokens: s.kv_budget_tokens,
            decode_steps: s.decode_steps_total,
            decode_batch_sequences: s.decode_batch_sequences_total,
            decode_steps_during_prefill: s.decode_steps_during_prefill_total,
            preprocessing: s.preprocessing,
            preprocess_threads_abandoned: s.preprocess_threads_abandoned,
            encoder_cache: s.encoder_cache,
            prefix_cache: s.prefix_cache,
        }
    }

    fn pipeline(&self) -> &Pipeline {
        Engine::pipeline(self)
    }

    fn shutdown(&self) {
        Engine::shutdown(self)
    }

    fn liveness(&self) -> Liveness {
        let s = Engine::stats(self);
        Liveness {
            busy: s.busy,
            seconds_since_progress: s.seconds_since_progress,
        }
    }
}

/// Starts the batching engine `qwen2vl serve` runs (see [`EngineConfig`]; a
/// `kv_budget_tokens` of 0 is the engine's default for the model and the memory available).
pub fn start_with(pipeline: Arc<Pipeline>, config: EngineConfig) -> Arc<dyn Backend> {
    Arc::new(Engine::start(pipeline, config))
}

/// [`start_with`] the given limits and the engine's other defaults.
pub fn start(
    pipeline: Arc<Pipeline>,
    max_running: usize,
    max_queue: usize,
    kv_budget_tokens: usize,
) -> Arc<dyn Backend> {
    start_with(
        pipeline,
        EngineConfig {
            max_running,
            max_queue,
            kv_budget_tokens,
            ..EngineConfig::default()
        },
    )
}

//! The one seam between the HTTP layer and the engine: submit a request, receive its events.
//!
//! [`Backend`] is what the handlers need from the library's batching
//! [`Engine`](qwen2vl::engine::Engine) (which implements it); tests put fakes behind it.

use std::sync::Arc;

use qwen2vl::engine::{Engine, EngineConfig};
use qwen2vl::pipeline::{GenerateRequest, Pipeline};

pub use qwen2vl::engine::{EngineEvent as Event, Submission, SubmitError};

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

impl Backend for Engine {
    fn submit(&self, request: GenerateRequest) -> Result<Submission, SubmitError> {
        Engine::submit(self, request)
    }

    fn stats(&self) -> BackendStats {
        let s = Engine::stats(self);
        BackendStats {
            queued: s.queued,
            running: s.running,
        }
    }

    fn pipeline(&self) -> &Pipeline {
        Engine::pipeline(self)
    }

    fn shutdown(&self) {
        Engine::shutdown(self)
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

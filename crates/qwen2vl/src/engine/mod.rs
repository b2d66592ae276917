//! Many requests served together: a queue, a scheduler thread and continuous batching.
//!
//! [`Engine::submit`] puts a [`GenerateRequest`] in a bounded queue and returns a
//! [`Submission`]: a stream of [`EngineEvent`]s (started, one event per token, finished or
//! failed) and a cancel flag. One scheduler thread owns the model's compute and every
//! sequence's KV cache; it loops:
//!
//! 1. **Reap**: sequences whose receiver was dropped are removed and their KV freed;
//!    requests cancelled at any stage before (queued, preprocessing, ready, prefilling)
//!    leave it and free their place at once.
//! 2. **Preprocess, admit, prefill**. Requests move through three stages:
//!    - *preprocessing*: template, tokenizer, images and videos (files, URLs, decoding,
//!      resizing) are read on threads of their own, up to
//!      [`EngineConfig::preprocess_threads`] requests at a time, so a slow download or a
//!      large video stalls neither the decode steps nor the other requests' preprocessing.
//!      Each job has a deadline, [`EngineConfig::preprocess_timeout`]: it is set in the
//!      request's [`crate::processing::fetch::FetchOptions::interrupt`] (with a flag the
//!      scheduler sets on cancel), which the processing loops check, and the scheduler
//!      enforces it too: a job past it fails with [`crate::Error::BadInput`] ("took longer
//!      than …"), its place is reused at once and its thread, abandoned, ends at its next
//!      check (abandoned threads still running count against a second
//!      `preprocess_threads`: while that many hang, queued media requests wait, so stuck
//!      jobs cannot pile up). Text-only requests are already preprocessed at submit and
//!      skip this stage.
//!      The KV need, `prompt tokens + max_new_tokens` (the new tokens capped by the
//!      context), is known after it.
//!    - *ready*: preprocessed requests, in the order they became ready (a slow media
//!      request is overtaken by the ones ready before it). The front waits for a free slot
//!      (fewer than [`EngineConfig::max_running`]), its KV need to fit in what is left of
//!      [`EngineConfig::kv_budget_tokens`], and the prefill lane; the ones behind it do not
//!      overtake it (no starvation). One whose need alone is over the whole budget fails
//!      with [`crate::Error::BadInput`].
//!    - *prefill*: the admitted request's cache is reserved and its vision tower and
//!      prefill run as a [`crate::model::PrefillJob`], at most
//!      [`EngineConfig::prefill_slice_ms`] per iteration while other sequences decode, one
//!      unit of work at a time (about [`crate::vision::UNIT_FLOPS`], and at least
//!      [`crate::vision::MIN_PRODUCT_ROWS`] rows for weight products: a chunk of rows of one
//!      stage of a vision block, even inside the attention of a 16k-patch frame, or of a
//!      decoder layer over the prompt, see [`crate::text::LayerPass`]), with a cancel check
//!      after each; the arithmetic is the same as in one go, bit for bit. When it
//!      completes, its first token is sampled and it joins the batch. So a large image
//!      delays the running streams by about one slice per step, not by its whole vision
//!      pass or a whole layer (vLLM's chunked prefill, cut by rows within each layer), and
//!      a disconnect during it frees the engine within a unit. Images and videos whose
//!      embeddings are in the pipeline's [`crate::encoder_cache::EncoderCache`] skip the
//!      tower (and images seen with the same bytes skip decoding during preprocessing);
//!      [`EngineStats::encoder_cache`] counts the hits. With the pipeline's
//!      [`crate::prefix_cache::PrefixCache`] on, the longest cached prefix of the prompt
//!      (its key is built during preprocessing) is copied into the new sequence's own
//!      cache at admission and only the rest is prefilled; the prompt's blocks are kept
//!      when its prefill completes, and the answer's when it finishes. The sequence still
//!      reserves its whole prompt, so the KV accounting is unchanged and exact, and no
//!      sequence shares memory with another or with the cache.
//! 3. **Decode**: one [`crate::model::Qwen2VL::decode_step`] over *all* running sequences:
//!    each brings its own last token, KV cache and M-RoPE `rope_delta` (positions are
//!    `cache length + rope_delta`), and attention runs per sequence against its own cache, so
//!    there is no padding and no masking across sequences. The projections and the LM head
//!    run on the whole batch, so the weights are read once per step for every sequence.
//! 4. **Sample and stop**, per sequence with its own [`crate::generation::Sequence`] (the same code as
//!    [`Pipeline::generate`]): its own seeded sampler, repetition penalty over its own
//!    history, EOS / length / stop strings, incremental detokenization. A finished or
//!    cancelled sequence leaves the batch at once and its KV reservation is released.
//!
//! This is the continuous batching ("iteration-level scheduling") of Orca and vLLM: the
//! batch is re-formed at every decode step instead of waiting for a whole batch to finish.
//! It mirrors vLLM's default scheduler in its FCFS order, its `max_num_seqs` (here
//! `max_running`) and its admission by free KV memory; unlike vLLM, KV is reserved whole per
//! sequence at admission (our caches are preallocated, not paged), so a running sequence is
//! never preempted.
//!
//! Because sampling, stopping and detokenization are per sequence, and the decoder computes
//! every row of a batch independently, a request's tokens do not depend on what it is
//! batched with: greedy output, and seeded sampling, equal [`Pipeline::generate`]'s (tested
//! in `tests/engine.rs`).
//!
//! Cancellation: setting [`Submission::cancel`] (or the request's own
//! [`GenerateRequest::cancel`]) or dropping [`Submission::events`] is noticed within one
//! step (or one unit of prefill); the sequence leaves the batch, its KV is freed and (when
//! someone still listens) it finishes with `finish_reason` `"cancelled"`.
//!
//! Liveness: [`Engine::stats`] says whether the engine is `busy` and how long ago it last
//! made progress ([`EngineStats::seconds_since_progress`]); the server's `/health` turns a
//! busy engine without progress for a while into a 503.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use qwen2vl::engine::{Engine, EngineConfig, EngineEvent};
//! use qwen2vl::generation::GenerateRequest;
//! use qwen2vl::pipeline::{DTypeChoice, Pipeline};
//!
//! # let model_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tiny-qwen2vl");
//! let pipeline = Arc::new(Pipeline::load(model_dir.as_ref(), DTypeChoice::F32)?);
//! let engine = Engine::start(pipeline, EngineConfig::default());
//! let request = GenerateRequest::from_prompt(None, &[], "Hello!").with_max_new_tokens(8);
//! let mut submission = engine.submit(request)?;
//! let mut streamed = String::new();
//! // From async code: `submission.events.recv().await`.
//! while let Some(event) = submission.events.blocking_recv() {
//!     match event {
//!         EngineEvent::Started { prompt_tokens, .. } => assert!(prompt_tokens > 0),
//!         EngineEvent::Token { text, .. } => streamed.push_str(&text),
//!         EngineEvent::Finished(answer) => assert_eq!(answer.text, streamed),
//!         EngineEvent::Failed(e) => return Err(e.into()),
//!     }
//! }
//! engine.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Nothing a request brings can stop the scheduler: errors, and even panics, in one
//! request's preprocessing or prefill fail only that request ([`EngineEvent::Failed`]); a
//! fault in a shared decode step fails the sequences of that step, and the engine goes on.

pub(crate) mod scheduler;

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::generation::{GenerateRequest, Generation, TokenLogprob};
use crate::inputs::ModelInputs;
use crate::pipeline::Pipeline;

/// How the engine schedules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// The most sequences decoded together in one step (vLLM's `max_num_seqs`). Default 8.
    pub max_running: usize,
    /// The most requests waiting to be admitted; beyond it [`Engine::submit`] answers
    /// [`SubmitError::QueueFull`]. Default 64.
    pub max_queue: usize,
    /// KV-cache tokens over all running sequences together (each reserves
    /// `prompt + max_new_tokens` at admission). `0` (the default) means
    /// [`EngineConfig::default_kv_budget`] of the model.
    pub kv_budget_tokens: usize,
    /// Milliseconds of a new request's vision tower and prefill run between two decode
    /// steps while other sequences are running (at least one unit of work: a vision block or
    /// a decoder layer). Smaller keeps the running streams smoother, larger gives new
    /// requests their first token sooner. Default 300.
    pub prefill_slice_ms: u64,
    /// Requests whose media are read and decoded at the same time, each on a thread of its
    /// own (text-only requests need none). A slow or stuck request holds one of them, never
    /// the others. `0` is taken as 1. Default 4.
    pub preprocess_threads: usize,
    /// Longest a request's preprocessing (template, tokenizer, fetching, decoding and
    /// resizing its images and videos) may take. The limit is passed to the processing code
    /// ([`crate::processing::fetch::FetchOptions::interrupt`], which the engine sets for
    /// each media request, with a flag it raises when the request is cancelled), and past
    /// it (and a short grace) the scheduler fails the request with
    /// [`crate::Error::BadInput`] ("took longer than …") itself and gives its place to the
    /// next; the thread is abandoned and ends at its next check. Default 120 s.
    pub preprocess_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_running: 8,
            max_queue: 64,
            kv_budget_tokens: 0,
            prefill_slice_ms: 300,
            preprocess_threads: 4,
            preprocess_timeout: Duration::from_secs(120),
        }
    }
}

impl EngineConfig {
    /// The default KV budget for a model: four full contexts
    /// (`4 * max_position_embeddings`), capped so the caches take at most a quarter of the
    /// memory available now (`MemAvailable` of `/proc/meminfo`, when readable), but never
    /// below 4096 tokens (or the four contexts, if smaller).
    pub fn default_kv_budget(pipeline: &Pipeline) -> usize {
        let cfg = &pipeline.model().config().text;
        let context = cfg.context_len();
        let per_token = kv_bytes_per_token(pipeline).max(1);
        let wanted = 4 * context;
        match mem_available_bytes() {
            Some(avail) => {
                let cap = (avail / 4) as usize / per_token;
                wanted.min(cap).max(4096.min(wanted))
            }
            None => wanted,
        }
    }
}

/// Bytes of K and V one token takes over all layers.
pub fn kv_bytes_per_token(pipeline: &Pipeline) -> usize {
    let cfg = &pipeline.model().config().text;
    2 * cfg.num_hidden_layers
        * cfg.num_key_value_heads
        * cfg.head_dim()
        * pipeline.model().dtype().size_in_bytes()
}

use crate::memory::mem_available_bytes;

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The queue holds [`EngineConfig::max_queue`] requests; try again after about
    /// `retry_after_s` seconds (an estimate from recent service times; HTTP 429 with
    /// `Retry-After`).
    #[error("the queue is full; retry after {retry_after_s} s")]
    QueueFull {
        /// Suggested wait in seconds (at least 1).
        retry_after_s: u64,
    },
    /// The request cannot be served (invalid sampling values, `max_new_tokens` 0, a
    /// text-only prompt over the context or over the whole KV budget). Only checks that
    /// are cheap run here; the rest (images, videos) surface as [`EngineEvent::Failed`].
    #[error("{0}")]
    Invalid(crate::Error),
    /// [`Engine::shutdown`] was called.
    #[error("the engine is shutting down")]
    ShuttingDown,
}

/// An accepted request: its events, and a flag that cancels it.
#[derive(Debug)]
pub struct Submission {
    /// [`EngineEvent::Started`], then one [`EngineEvent::Token`] per token, then exactly one
    /// [`EngineEvent::Finished`] or [`EngineEvent::Failed`] (and then the channel closes).
    /// Works from threads (`blocking_recv`) and async code (`recv().await`). Dropping it
    /// cancels the request.
    pub events: UnboundedReceiver<EngineEvent>,
    /// Set it to `true` to cancel; the same flag as [`GenerateRequest::cancel`] when the
    /// request had one.
    pub cancel: Arc<AtomicBool>,
}

/// What happens to a request.
///
/// `Finished` carries the whole [`Generation`] unboxed (the shape the server matches on);
/// it is sent once per request, so the larger enum costs nothing that matters.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum EngineEvent {
    /// Prefill is done (sent before the first token).
    Started {
        /// Prompt tokens in all.
        prompt_tokens: usize,
        /// Of which image pads.
        image_tokens: usize,
        /// Of which video pads.
        video_tokens: usize,
    },
    /// One generated token.
    Token {
        /// Its id.
        id: u32,
        /// Text newly released by it (may be empty; the texts of all tokens concatenate to
        /// [`Generation::text`], or with grounding markup when the request asked for it).
        text: String,
        /// Its log-probability and the request's `top_logprobs` alternatives.
        logprob: Option<TokenLogprob>,
    },
    /// The answer, as [`Pipeline::generate`] returns it (`finish_reason` "stop", "length"
    /// or "cancelled").
    Finished(Generation),
    /// The request failed (a bad image, a prompt over the context, an internal fault).
    Failed(crate::Error),
}

/// A snapshot of the engine's load and totals (for `/metrics`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineStats {
    /// Requests waiting to be admitted.
    pub queued: usize,
    /// Sequences being decoded.
    pub running: usize,
    /// KV-cache tokens reserved by the running sequences.
    pub kv_tokens_used: usize,
    /// The KV budget in tokens.
    pub kv_budget_tokens: usize,
    /// [`EngineConfig::max_running`].
    pub max_running: usize,
    /// [`EngineConfig::max_queue`].
    pub max_queue: usize,
    /// Whether new requests are accepted.
    pub accepting: bool,
    /// Requests accepted by [`Engine::submit`].
    pub requests_total: u64,
    /// Requests refused with [`SubmitError::QueueFull`].
    pub requests_rejected: u64,
    /// Requests that finished with "stop" or "length".
    pub requests_finished: u64,
    /// Requests cancelled (queued or running).
    pub requests_cancelled: u64,
    /// Requests that failed.
    pub requests_failed: u64,
    /// Prompt tokens prefilled.
    pub prompt_tokens_total: u64,
    /// Tokens generated.
    pub completion_tokens_total: u64,
    /// Batched decode steps run.
    pub decode_steps_total: u64,
    /// Sequences summed over decode steps (`/ decode_steps_total` = mean batch size).
    pub decode_batch_sequences_total: u64,
    /// Decode steps run while a new request's vision tower or prefill was part-way done
    /// (the running streams went on instead of waiting for it).
    pub decode_steps_during_prefill_total: u64,
    /// Requests whose media are being read and decoded now (of `queued`).
    pub preprocessing: usize,
    /// Preprocessing threads abandoned (past their deadline or cancelled) that have not
    /// ended yet. They count against a second [`EngineConfig::preprocess_threads`]: stuck
    /// ones cannot pile up without bound, and while that many are stuck media requests wait.
    pub preprocess_threads_abandoned: usize,
    /// Whether the engine has work: requests queued, being preprocessed, prefilled or
    /// decoded.
    pub busy: bool,
    /// Seconds since the engine last made progress: a decode step, a unit of prefill, an
    /// admission, a preprocessed request, or a request leaving (finished, failed,
    /// cancelled); counted from when it last became busy if it was idle. A busy engine with
    /// a large value is stuck (`/health` reports it).
    pub seconds_since_progress: f64,
    /// The pipeline's encoder cache: hits, misses, evictions, bytes and entries (see
    /// [`crate::encoder_cache`]).
    pub encoder_cache: crate::encoder_cache::EncoderCacheStats,
    /// The pipeline's prefix cache: hits, misses, tokens reused, evictions, bytes and
    /// blocks (see [`crate::prefix_cache`]).
    pub prefix_cache: crate::prefix_cache::PrefixCacheStats,
}

/// A request waiting in the queue.
pub(crate) struct Pending {
    pub(crate) request: GenerateRequest,
    pub(crate) tx: UnboundedSender<EngineEvent>,
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) submitted: Instant,
    /// Preprocessed inputs (at submit time for text-only requests, else by the scheduler).
    pub(crate) prepared: Option<Prepared>,
}

impl Pending {
    /// Cancel flag set, or nobody listening.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancel.load(std::sync::atomic::Ordering::Relaxed) || self.tx.is_closed()
    }
}

/// A request's preprocessed prompt and its KV need.
pub(crate) struct Prepared {
    pub(crate) inputs: ModelInputs,
    pub(crate) preprocess_ms: f64,
    /// `max_new_tokens` capped by the context.
    pub(crate) max_new: usize,
    /// The prompt's prefix-cache key (`None` when the cache is off).
    pub(crate) key: Option<crate::prefix_cache::PrefixKey>,
}

impl Prepared {
    /// KV tokens the sequence reserves.
    pub(crate) fn need(&self) -> usize {
        self.inputs.input_ids.len() + self.max_new
    }
}

/// State shared by the handles and the scheduler thread.
pub(crate) struct Shared {
    pub(crate) config: EngineConfig,
    pub(crate) state: Mutex<State>,
    pub(crate) wake: Condvar,
}

impl Shared {
    /// The state, even if a thread panicked while holding the lock (the state is plain
    /// counters and a queue; it stays usable).
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The mutable part of [`Shared`].
#[derive(Default)]
pub(crate) struct State {
    pub(crate) queue: VecDeque<Pending>,
    /// Requests taken off the queue but not admitted yet: being preprocessed, or waiting for
    /// KV room (still counted as queued).
    pub(crate) held: usize,
    pub(crate) accepting: bool,
    pub(crate) stop: bool,
    pub(crate) stats: EngineStats,
    /// Moving average of seconds from admission to finish (for `Retry-After`).
    pub(crate) service_s: f64,
    /// When work last moved on (see [`EngineStats::seconds_since_progress`]).
    pub(crate) last_progress: Option<Instant>,
}

struct Inner {
    shared: Arc<Shared>,
    pipeline: Arc<Pipeline>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        shutdown(&self.shared, &self.thread);
    }
}

/// The serving engine: a cheap handle (clone it freely) to a queue and a scheduler thread.
/// The thread stops when [`Engine::shutdown`] is called or the last handle is dropped.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.inner.shared.config)
            .finish()
    }
}

impl Engine {
    /// Starts the scheduler thread for `pipeline`. A `kv_budget_tokens` of 0 becomes
    /// [`EngineConfig::default_kv_budget`]; `max_running` 0 is taken as 1.
    pub fn start(pipeline: Arc<Pipeline>, mut config: EngineConfig) -> Engine {
        if config.kv_budget_tokens == 0 {
            config.kv_budget_tokens = EngineConfig::default_kv_budget(&pipeline);
        }
        config.max_running = config.max_running.max(1);
        config.preprocess_threads = config.preprocess_threads.max(1);
        let state = State {
            accepting: true,
            last_progress: Some(Instant::now()),
            stats: EngineStats {
                kv_budget_tokens: config.kv_budget_tokens,
                max_running: config.max_running,
                max_queue: config.max_queue,
                accepting: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(state),
            wake: Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            let pipeline = pipeline.clone();
            std::thread::Builder::new()
                .name("qwen2vl-engine".into())
                .spawn(move || scheduler::run(shared, pipeline))
        };
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                // No thread, no service: refuse everything rather than queue forever.
                tracing::error!(error = %e, "cannot start the engine thread");
                let mut st = shared.lock();
                st.accepting = false;
                st.stats.accepting = false;
                None
            }
        };
        Engine {
            inner: Arc::new(Inner {
                shared,
                pipeline,
                thread: Mutex::new(thread),
            }),
        }
    }

    /// Queues a request. Cheap checks run here (sampling values, `max_new_tokens` 0; a
    /// text-only request is also templated and tokenized here, so a prompt over the context
    /// or over the KV budget is refused at once); images and videos are read by the
    /// scheduler, and their errors come as [`EngineEvent::Failed`].
    pub fn submit(&self, request: GenerateRequest) -> Result<Submission, SubmitError> {
        let shared = &self.inner.shared;
        let pipeline = &self.inner.pipeline;
        if !shared.lock().accepting {
            return Err(SubmitError::ShuttingDown);
        }
        pipeline
            .validate_request(&request)
            .map_err(SubmitError::Invalid)?;
        let submitted = Instant::now();
        let text_only = crate::processing::messages::vision_inputs(&request.messages)
            .next()
            .is_none();
        let prepared = if text_only {
            Some(
                prepare_checked(pipeline, &request, shared.config.kv_budget_tokens)
                    .map_err(SubmitError::Invalid)?,
            )
        } else {
            None
        };
        let (tx, events) = unbounded_channel();
        let cancel = request
            .cancel
            .clone()
            .unwrap_or_else(|| Arc::new(AtomicBool::new(false)));
        let mut st = shared.lock();
        if !st.accepting {
            return Err(SubmitError::ShuttingDown);
        }
        if st.queue.len() + st.held >= shared.config.max_queue {
            st.stats.requests_rejected += 1;
            let waiting = st.queue.len() + st.held;
            let per = if st.service_s > 0.0 {
                st.service_s
            } else {
                1.0
            };
            let rounds = waiting as f64 / shared.config.max_running as f64 + 1.0;
            return Err(SubmitError::QueueFull {
                retry_after_s: (per * rounds).ceil().max(1.0) as u64,
            });
        }
        if st.queue.is_empty() && st.held == 0 && st.stats.running == 0 {
            // Idle until now: progress is counted from here.
            st.last_progress = Some(Instant::now());
        }
        st.queue.push_back(Pending {
            request,
            tx,
            cancel: cancel.clone(),
            submitted,
            prepared,
        });
        st.stats.requests_total += 1;
        st.stats.queued = st.queue.len() + st.held;
        drop(st);
        shared.wake.notify_all();
        Ok(Submission { events, cancel })
    }

    /// The current load and totals.
    pub fn stats(&self) -> EngineStats {
        let st = self.inner.shared.lock();
        let mut s = st.stats.clone();
        s.queued = st.queue.len() + st.held;
        s.accepting = st.accepting;
        s.busy = s.queued > 0 || s.running > 0;
        s.seconds_since_progress = st.last_progress.map_or(0.0, |t| t.elapsed().as_secs_f64());
        drop(st);
        s.encoder_cache = self.pipeline().encoder_cache().stats();
        s.prefix_cache = self.pipeline().prefix_cache().stats();
        s
    }

    /// The effective configuration (with the KV budget resolved).
    pub fn config(&self) -> &EngineConfig {
        &self.inner.shared.config
    }

    /// Stops accepting requests, cancels the running ones (they finish with
    /// `finish_reason` "cancelled"), fails the queued ones, and joins the scheduler thread.
    /// Idempotent; also done when the last handle is dropped.
    pub fn shutdown(&self) {
        shutdown(&self.inner.shared, &self.inner.thread);
    }

    /// The pipeline the engine runs.
    pub fn pipeline(&self) -> &Pipeline {
        &self.inner.pipeline
    }
}

fn shutdown(shared: &Shared, thread: &Mutex<Option<JoinHandle<()>>>) {
    {
        let mut st = shared.lock();
        st.accepting = false;
        st.stats.accepting = false;
        st.stop = true;
    }
    shared.wake.notify_all();
    let handle = thread.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(h) = handle {
        if h.thread().id() != std::thread::current().id() && h.join().is_err() {
            tracing::error!("the engine thread panicked");
        }
    }
}

/// Template, tokenizer and media of a request, with its token limit checked against the
/// context.
fn prepare(pipeline: &Pipeline, request: &GenerateRequest) -> crate::Result<Prepared> {
    let t = Instant::now();
    let inputs = pipeline.prepare(request)?;
    let max_new = pipeline.max_new_for(inputs.input_ids.len(), request.max_new_tokens)?;
    // Hashing the pixels here keeps it off the scheduler thread for media requests.
    let key = pipeline.prefix_key(&inputs)?;
    let preprocess_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(Prepared {
        inputs,
        preprocess_ms,
        max_new,
        key,
    })
}

/// [`prepare`], then [`check_need`] against `budget`.
pub(crate) fn prepare_checked(
    pipeline: &Pipeline,
    request: &GenerateRequest,
    budget: usize,
) -> crate::Result<Prepared> {
    let p = prepare(pipeline, request)?;
    check_need(&p, budget)?;
    Ok(p)
}

/// Fails when a request's KV need alone is over the whole budget (it could never run).
fn check_need(p: &Prepared, budget: usize) -> crate::Result<()> {
    let need = p.need();
    if need > budget {
        return Err(crate::Error::bad_input(
            format!(
                "the request needs {need} tokens of KV cache ({} prompt + {} new)",
                p.inputs.input_ids.len(),
                p.max_new
            ),
            format!("at most {budget} tokens (the engine's KV budget; lower max_tokens or shorten the prompt)"),
        ));
    }
    Ok(())
}

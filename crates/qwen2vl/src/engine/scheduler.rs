//! The scheduler thread: admit, prefill, one batched decode step, sample, stop; repeat.
//! The policy is described in the [module docs](super).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::sequence::{PrefillTimings, PromptInfo, Sequence};
use super::{check_need, prepare, EngineEvent, Pending, Shared};
use crate::error::{Error, Result};
use crate::generation::stop::FinishReason;
use crate::kv_cache::KvCache;
use crate::pipeline::{Generation, Pipeline, Timings, Usage};

/// One sequence in the decode batch.
struct Running<'p> {
    seq: Sequence<'p>,
    cache: KvCache,
    rope_delta: i64,
    /// KV tokens reserved (the cache's capacity).
    reserved: usize,
    tx: UnboundedSender<EngineEvent>,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
    admitted: Instant,
    prompt: PromptInfo,
    before: PrefillTimings,
}

impl Running<'_> {
    fn flag_set(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// How a request left the engine (for the totals).
enum Outcome {
    Finished,
    Cancelled,
    Failed,
}

struct Scheduler<'p> {
    shared: Arc<Shared>,
    pipeline: &'p Pipeline,
    running: Vec<Running<'p>>,
    /// The queue's head, taken off to be preprocessed, waiting for KV room.
    head: Option<Pending>,
    kv_used: usize,
}

/// The thread's body: loops until [`Shared`]'s `stop`, then cancels what runs and fails what
/// waits.
pub(crate) fn run(shared: Arc<Shared>, pipeline: Arc<Pipeline>) {
    let mut s = Scheduler {
        shared,
        pipeline: &pipeline,
        running: Vec::new(),
        head: None,
        kv_used: 0,
    };
    loop {
        match catch_unwind(AssertUnwindSafe(|| s.iteration())) {
            Ok(true) => {}
            Ok(false) => break,
            Err(panic) => {
                // A fault outside any one request's guarded work: fail what runs, go on.
                let msg = panic_message(&*panic);
                tracing::error!(%msg, "engine iteration panicked");
                s.fail_all_running(&format!("internal fault in the decode step: {msg}"));
            }
        }
    }
    s.drain();
}

impl<'p> Scheduler<'p> {
    /// One round: reap, admit, decode. Returns `false` when the engine stops.
    fn iteration(&mut self) -> bool {
        if self.shared.lock().stop {
            return false;
        }
        self.reap();
        self.admit();
        self.publish();
        if self.running.is_empty() {
            let st = self.shared.lock();
            if st.stop {
                return false;
            }
            if st.queue.is_empty() && self.head.is_none() {
                // Wake on submit/shutdown; the timeout only bounds a missed notification.
                let _unused = self
                    .shared
                    .wake
                    .wait_timeout(st, Duration::from_millis(200))
                    .map_err(|_| ());
            } else if self.head.is_some() {
                drop(st);
                // A waiting head with nothing running can only be a cancelled one being
                // reaped next round; do not spin hard.
                std::thread::sleep(Duration::from_millis(1));
            }
            return true;
        }
        self.decode();
        self.publish();
        true
    }

    /// Drops running sequences nobody listens to any more, and cancelled queued requests.
    fn reap(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].tx.is_closed() {
                let r = self.running.swap_remove(i);
                self.kv_used -= r.reserved;
                self.count(Outcome::Cancelled, 0.0);
            } else {
                i += 1;
            }
        }
        let mut gone = Vec::new();
        {
            let mut st = self.shared.lock();
            let queue = std::mem::take(&mut st.queue);
            for p in queue {
                if p.is_cancelled() {
                    gone.push(p);
                } else {
                    st.queue.push_back(p);
                }
            }
        }
        if let Some(h) = self.head.take() {
            if h.is_cancelled() {
                gone.push(h);
            } else {
                self.head = Some(h);
            }
        }
        for p in gone {
            let _ = p.tx.send(EngineEvent::Finished(cancelled_before_start()));
            self.count(Outcome::Cancelled, 0.0);
        }
    }

    /// Admits queued requests while a slot and KV room are free, prefilling each.
    fn admit(&mut self) {
        let budget = self.shared.config.kv_budget_tokens;
        let mut prefilled = 0usize;
        while self.running.len() < self.shared.config.max_running
            && (prefilled == 0 || prefilled < self.shared.config.max_prefill_tokens)
        {
            if self.head.is_none() {
                let mut st = self.shared.lock();
                self.head = st.queue.pop_front();
                st.head_waiting = self.head.is_some();
            }
            let Some(mut head) = self.head.take() else {
                break;
            };
            if head.is_cancelled() {
                let _ = head
                    .tx
                    .send(EngineEvent::Finished(cancelled_before_start()));
                self.count(Outcome::Cancelled, 0.0);
                continue;
            }
            if head.prepared.is_none() {
                let pipeline = self.pipeline;
                let req = &head.request;
                match guarded(|| {
                    prepare(pipeline, req).and_then(|p| check_need(&p, budget).map(|()| p))
                }) {
                    Ok(p) => head.prepared = Some(p),
                    Err(e) => {
                        let _ = head.tx.send(EngineEvent::Failed(e));
                        self.count(Outcome::Failed, 0.0);
                        continue;
                    }
                }
            }
            let need = head.prepared.as_ref().map_or(0, |p| p.need());
            if self.kv_used + need > budget {
                // Wait for running sequences to free KV; nobody overtakes the head.
                self.head = Some(head);
                break;
            }
            self.shared.lock().head_waiting = false;
            prefilled += need.saturating_sub(head.prepared.as_ref().map_or(0, |p| p.max_new));
            self.start(head, need);
        }
    }

    /// Vision tower, prefill and first token of an admitted request.
    fn start(&mut self, head: Pending, need: usize) {
        let pipeline = self.pipeline;
        let Pending {
            request,
            tx,
            cancel,
            submitted,
            prepared,
        } = head;
        let Some(prepared) = prepared else {
            return;
        };
        let admitted = Instant::now();
        let inputs = prepared.inputs;
        let result = guarded(|| {
            let mut cache = pipeline.model().new_cache(need)?;
            let (logits, vision_ms, prefill_ms) = pipeline.prefill(&inputs, &mut cache)?;
            let seq = pipeline.new_sequence(&request, &inputs, prepared.max_new)?;
            Ok((cache, logits.to_vec1::<f32>()?, seq, vision_ms, prefill_ms))
        });
        let (cache, logits, seq, vision_ms, prefill_ms) = match result {
            Ok(x) => x,
            Err(e) => {
                let _ = tx.send(EngineEvent::Failed(e));
                self.count(Outcome::Failed, 0.0);
                return;
            }
        };
        let prompt = PromptInfo {
            prompt_tokens: inputs.input_ids.len(),
            image_tokens: inputs.image_tokens(),
            video_tokens: inputs.video_tokens(),
            images: inputs.images,
            videos: inputs.videos,
        };
        {
            let mut st = self.shared.lock();
            st.stats.prompt_tokens_total += prompt.prompt_tokens as u64;
        }
        let started = tx.send(EngineEvent::Started {
            prompt_tokens: prompt.prompt_tokens,
            image_tokens: prompt.image_tokens,
            video_tokens: prompt.video_tokens,
        });
        let r = Running {
            seq,
            cache,
            rope_delta: inputs.positions.rope_delta,
            reserved: need,
            tx,
            cancel,
            submitted,
            admitted,
            prompt,
            before: PrefillTimings {
                preprocess_ms: prepared.preprocess_ms,
                vision_ms,
                prefill_ms,
            },
        };
        if started.is_err() {
            self.count(Outcome::Cancelled, 0.0);
            return;
        }
        self.kv_used += need;
        if let Some(r) = self.step(r, &logits) {
            self.running.push(r);
        }
    }

    /// Samples one token for `r` from its logits row and sends it; returns the sequence
    /// if it goes on, or finishes it (events, totals, KV) and returns `None`.
    fn step(&mut self, mut r: Running<'p>, logits: &[f32]) -> Option<Running<'p>> {
        let step = match guarded(|| r.seq.push_logits(logits)) {
            Ok(s) => s,
            Err(e) => {
                self.kv_used -= r.reserved;
                let _ = r.tx.send(EngineEvent::Failed(e));
                self.count(Outcome::Failed, 0.0);
                return None;
            }
        };
        let mut text = step.text;
        let mut finished = step.finish.is_some();
        if !finished && r.flag_set() {
            // Cancelled: what was held back goes out with this token.
            if let Ok(rest) = r.seq.finish(FinishReason::Cancelled) {
                text.push_str(&rest);
            }
            finished = true;
        }
        self.shared.lock().stats.completion_tokens_total += 1;
        let sent = r.tx.send(EngineEvent::Token {
            id: step.token,
            text,
            logprob: Some(step.logprob),
        });
        if sent.is_err() {
            self.kv_used -= r.reserved;
            self.count(Outcome::Cancelled, 0.0);
            return None;
        }
        if !finished {
            return Some(r);
        }
        self.kv_used -= r.reserved;
        let cancelled = matches!(r.seq.finish_reason(), Some(FinishReason::Cancelled));
        let service = r.admitted.elapsed().as_secs_f64();
        let generation = r.seq.into_generation(r.prompt, r.submitted, r.before);
        let _ = r.tx.send(EngineEvent::Finished(generation));
        drop(r.cache);
        if cancelled {
            self.count(Outcome::Cancelled, 0.0);
        } else {
            self.count(Outcome::Finished, service);
        }
        None
    }

    /// One decode step over every running sequence, then a token for each.
    fn decode(&mut self) {
        let pipeline = self.pipeline;
        let tokens: Vec<u32> = self
            .running
            .iter()
            .map(|r| r.seq.last_token().unwrap_or(0))
            .collect();
        let deltas: Vec<i64> = self.running.iter().map(|r| r.rope_delta).collect();
        let b = tokens.len();
        let result = {
            let mut caches: Vec<&mut KvCache> =
                self.running.iter_mut().map(|r| &mut r.cache).collect();
            guarded(|| {
                let logits = pipeline
                    .model()
                    .decode_step(&tokens, &deltas, &mut caches)?;
                Ok(logits.to_vec2::<f32>()?)
            })
        };
        {
            let mut st = self.shared.lock();
            st.stats.decode_steps_total += 1;
            st.stats.decode_batch_sequences_total += b as u64;
        }
        let rows = match result {
            Ok(rows) if rows.len() == b => rows,
            Ok(rows) => {
                self.fail_all_running(&format!(
                    "the decode step returned {} rows for {b} sequences",
                    rows.len()
                ));
                return;
            }
            Err(e) => {
                self.fail_all_running(&format!("decode step failed: {e}"));
                return;
            }
        };
        let running = std::mem::take(&mut self.running);
        for (r, row) in running.into_iter().zip(rows) {
            if let Some(r) = self.step(r, &row) {
                self.running.push(r);
            }
        }
    }

    /// Fails every running sequence with `msg` and frees their KV.
    fn fail_all_running(&mut self, msg: &str) {
        for r in std::mem::take(&mut self.running) {
            self.kv_used -= r.reserved;
            let _ = r.tx.send(EngineEvent::Failed(internal(msg)));
            self.count(Outcome::Failed, 0.0);
        }
    }

    /// On shutdown: cancels what runs, fails what waits.
    fn drain(&mut self) {
        for mut r in std::mem::take(&mut self.running) {
            self.kv_used -= r.reserved;
            // Text held back (a partial character or stop string) is dropped, so the
            // streamed texts still add up to `Generation::text`.
            r.seq.abort(FinishReason::Cancelled);
            let g = r.seq.into_generation(r.prompt, r.submitted, r.before);
            let _ = r.tx.send(EngineEvent::Finished(g));
            self.count(Outcome::Cancelled, 0.0);
        }
        let mut waiting: Vec<Pending> = self.head.take().into_iter().collect();
        {
            let mut st = self.shared.lock();
            waiting.extend(st.queue.drain(..));
            st.head_waiting = false;
        }
        for p in waiting {
            let _ = p.tx.send(EngineEvent::Failed(Error::bad_input(
                "the engine shut down before the request started",
                "a running server",
            )));
            self.count(Outcome::Failed, 0.0);
        }
        self.publish();
    }

    /// Updates the totals for a request that left.
    fn count(&self, outcome: Outcome, service_s: f64) {
        let mut st = self.shared.lock();
        match outcome {
            Outcome::Finished => {
                st.stats.requests_finished += 1;
                st.service_s = if st.service_s == 0.0 {
                    service_s
                } else {
                    0.8 * st.service_s + 0.2 * service_s
                };
            }
            Outcome::Cancelled => st.stats.requests_cancelled += 1,
            Outcome::Failed => st.stats.requests_failed += 1,
        }
    }

    /// Publishes running / KV figures for [`super::Engine::stats`].
    fn publish(&self) {
        let mut st = self.shared.lock();
        st.stats.running = self.running.len();
        st.stats.kv_tokens_used = self.kv_used;
        st.stats.queued = st.queue.len() + usize::from(self.head.is_some());
        st.head_waiting = self.head.is_some();
    }
}

/// Runs `f`, turning a panic into an error (a panic in one request's work must not take the
/// scheduler down).
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(internal(&format!("internal fault: {}", panic_message(&*p)))),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

/// An internal error carrying `msg` (our fault, not the user's).
fn internal(msg: &str) -> Error {
    Error::Tensor(candle_core::Error::Msg(msg.to_string()))
}

/// The answer of a request cancelled before it started.
fn cancelled_before_start() -> Generation {
    Generation {
        text: String::new(),
        token_ids: Vec::new(),
        logprobs: Vec::new(),
        finish_reason: FinishReason::Cancelled.as_openai_str().to_string(),
        usage: Usage::default(),
        timings: Timings::default(),
        images: Vec::new(),
        videos: Vec::new(),
        grounding: None,
    }
}

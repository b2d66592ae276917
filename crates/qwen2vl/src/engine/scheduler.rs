//! The scheduler thread: admit, prefill, one batched decode step, sample, stop; repeat.
//! The policy is described in the [module docs](super).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::sequence::{PrefillTimings, PromptInfo, Sequence};
use super::{prepare_checked, EngineEvent, Pending, Prepared, Shared};
use crate::error::{Error, Result};
use crate::generation::stop::FinishReason;
use crate::kv_cache::KvCache;
use crate::model::PrefillJob;
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

/// A request whose template, tokens and media are being read on a helper thread (file and
/// network reads, image decoding and resizing must not stall the decode steps).
struct Preparing {
    done: mpsc::Receiver<(Pending, Result<Prepared>)>,
}

/// The admitted request whose vision tower and prefill run, a slice at a time.
struct Prefilling<'p> {
    /// `prepared` is always `Some` here.
    pending: Pending,
    cache: KvCache,
    job: PrefillJob<'p>,
    /// KV tokens reserved.
    need: usize,
    admitted: Instant,
}

/// Requests flow queue → `preparing` → `head` → `prefilling` → `running`, one at a time
/// through each of the middle stages, so first come is first served.
struct Scheduler<'p> {
    shared: Arc<Shared>,
    pipeline: &'p Pipeline,
    /// The same pipeline, for the preprocessing threads.
    owned: Arc<Pipeline>,
    running: Vec<Running<'p>>,
    preparing: Option<Preparing>,
    /// The next request to admit, preprocessed, waiting for a slot, KV room or the
    /// prefill lane.
    head: Option<Pending>,
    prefilling: Option<Prefilling<'p>>,
    kv_used: usize,
}

/// The thread's body: loops until [`Shared`]'s `stop`, then cancels what runs and fails what
/// waits.
pub(crate) fn run(shared: Arc<Shared>, pipeline: Arc<Pipeline>) {
    let mut s = Scheduler {
        shared,
        pipeline: &pipeline,
        owned: pipeline.clone(),
        running: Vec::new(),
        preparing: None,
        head: None,
        prefilling: None,
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
    /// One round: reap, move requests along, a slice of prefill, one decode step. Returns
    /// `false` when the engine stops.
    fn iteration(&mut self) -> bool {
        if self.shared.lock().stop {
            return false;
        }
        self.reap();
        self.advance_preparation();
        self.admit();
        self.publish();
        let prefilled = self.prefill_slice();
        if !self.running.is_empty() {
            self.decode();
            self.publish();
            return true;
        }
        self.publish();
        if prefilled || self.prefilling.is_some() {
            return true;
        }
        let st = self.shared.lock();
        if st.stop {
            return false;
        }
        if self.preparing.is_some() {
            // The helper thread notifies when done; the timeout bounds a missed one.
            let _unused = self
                .shared
                .wake
                .wait_timeout(st, Duration::from_millis(5))
                .map_err(|_| ());
        } else if st.queue.is_empty() && self.head.is_none() {
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
        true
    }

    /// Drops running sequences nobody listens to any more, and cancelled requests at every
    /// stage before it.
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
        if self
            .prefilling
            .as_ref()
            .is_some_and(|p| p.pending.is_cancelled())
        {
            if let Some(p) = self.prefilling.take() {
                self.kv_used -= p.need;
                self.cancel_unstarted(&p.pending.tx);
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
            self.cancel_unstarted(&p.tx);
        }
    }

    /// Collects a finished preprocessing as the new head, and starts preprocessing the
    /// next queued request when the stage is free.
    fn advance_preparation(&mut self) {
        if let Some(p) = &self.preparing {
            match p.done.try_recv() {
                Ok((pending, result)) => {
                    self.preparing = None;
                    self.take_prepared(pending, result);
                }
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => {
                    // Cannot happen (the thread catches panics and always sends); the
                    // request's sender went with the thread, so its stream just ends.
                    self.preparing = None;
                    self.count(Outcome::Failed, 0.0);
                }
            }
        }
        while self.preparing.is_none() && self.head.is_none() {
            let Some(next) = self.shared.lock().queue.pop_front() else {
                break;
            };
            if next.is_cancelled() {
                self.cancel_unstarted(&next.tx);
                continue;
            }
            if next.prepared.is_some() {
                self.head = Some(next);
                break;
            }
            self.preparing = self.spawn_preparation(next);
        }
    }

    /// Preprocesses `pending` on a helper thread (or here, if no thread can be started).
    fn spawn_preparation(&mut self, pending: Pending) -> Option<Preparing> {
        let (tx, done) = mpsc::channel();
        let pipeline = self.owned.clone();
        let shared = self.shared.clone();
        let budget = self.shared.config.kv_budget_tokens;
        let work = move |pending: Pending| {
            let result = guarded(|| prepare_checked(&pipeline, &pending.request, budget));
            let _ = tx.send((pending, result));
            // Taking the lock orders this wake-up after the scheduler's check.
            drop(shared.lock());
            shared.wake.notify_all();
        };
        // The thread takes the request; if it cannot start, the request comes back through
        // this slot and is preprocessed here.
        let slot = Arc::new(Mutex::new(Some(pending)));
        let theirs = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("qwen2vl-preprocess".into())
            .spawn(move || {
                let taken = theirs.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(p) = taken {
                    work(p);
                }
            });
        if spawned.is_err() {
            let pending = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(pending) = pending {
                let result = guarded(|| prepare_checked(self.pipeline, &pending.request, budget));
                self.take_prepared(pending, result);
            }
            return None;
        }
        Some(Preparing { done })
    }

    /// A preprocessed request becomes the head, or fails.
    fn take_prepared(&mut self, mut pending: Pending, result: Result<Prepared>) {
        match result {
            Ok(p) => {
                pending.prepared = Some(p);
                self.head = Some(pending);
            }
            Err(e) => self.fail(&pending.tx, 0, e),
        }
    }

    /// Admits the head when the prefill lane and a slot are free and its KV fits: reserves
    /// its cache and starts its [`PrefillJob`]. A head that does not fit yet waits (later
    /// requests do not overtake it: no starvation).
    fn admit(&mut self) {
        if self.prefilling.is_some() || self.running.len() >= self.shared.config.max_running {
            return;
        }
        let Some(head) = self.head.take() else {
            return;
        };
        let Some(prepared) = head.prepared.as_ref() else {
            // Not reachable: only preprocessed requests become the head.
            self.head = Some(head);
            return;
        };
        let need = prepared.need();
        if self.kv_used + need > self.shared.config.kv_budget_tokens {
            self.head = Some(head);
            return;
        }
        let model = self.pipeline.model();
        match guarded(|| Ok((model.new_cache(need)?, model.prefill_job(&prepared.inputs)?))) {
            Ok((cache, job)) => {
                self.kv_used += need;
                self.prefilling = Some(Prefilling {
                    pending: head,
                    cache,
                    job,
                    need,
                    admitted: Instant::now(),
                });
            }
            Err(e) => self.fail(&head.tx, 0, e),
        }
    }

    /// Runs admitted requests' prefills for a slice of time
    /// ([`super::EngineConfig::prefill_slice_ms`] while others are decoding, longer when
    /// nothing else runs). A request whose prefill completes gets its first token and joins
    /// the decode batch, and the next head is admitted and prefilled in what is left of the
    /// slice (so a burst of short prompts starts together). Returns whether there was
    /// prefill work.
    fn prefill_slice(&mut self) -> bool {
        let slice = Duration::from_millis(self.shared.config.prefill_slice_ms);
        let mut deadline = Instant::now()
            + if self.running.is_empty() {
                // Nobody waits for a decode step: only come back to notice cancellations.
                Duration::from_millis(1000)
            } else {
                slice
            };
        let mut worked = false;
        loop {
            if self.prefilling.is_none() {
                self.advance_preparation();
                self.admit();
            }
            let Some(pf) = self.prefilling.as_mut() else {
                break;
            };
            worked = true;
            let result = match pf.pending.prepared.as_ref() {
                Some(prepared) => {
                    let (job, cache) = (&mut pf.job, &mut pf.cache);
                    guarded(|| job.run_until(&prepared.inputs, cache, deadline))
                }
                None => Err(internal("an admitted request has no inputs")),
            };
            match result {
                Ok(false) => break,
                Ok(true) => {
                    if let Some(pf) = self.prefilling.take() {
                        self.start(pf);
                    }
                    if !self.running.is_empty() {
                        // Someone now waits for the next decode step.
                        deadline = deadline.min(Instant::now() + slice);
                    }
                }
                Err(e) => {
                    if let Some(pf) = self.prefilling.take() {
                        self.fail(&pf.pending.tx, pf.need, e);
                    }
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        self.advance_preparation();
        worked
    }

    /// First token of a request whose prefill is complete; it joins the decode batch.
    fn start(&mut self, pf: Prefilling<'p>) {
        let Prefilling {
            pending,
            cache,
            job,
            need,
            admitted,
        } = pf;
        let Pending {
            request,
            tx,
            cancel,
            submitted,
            prepared,
        } = pending;
        let pipeline = self.pipeline;
        let result = guarded(|| {
            let prepared = prepared.ok_or_else(|| internal("an admitted request has no inputs"))?;
            let (logits, vision_ms, prefill_ms) = job.finish()?;
            let seq = pipeline.new_sequence(&request, &prepared.inputs, prepared.max_new)?;
            Ok((
                prepared,
                logits.to_vec1::<f32>()?,
                seq,
                vision_ms,
                prefill_ms,
            ))
        });
        let (prepared, logits, seq, vision_ms, prefill_ms) = match result {
            Ok(x) => x,
            Err(e) => {
                self.fail(&tx, need, e);
                return;
            }
        };
        let inputs = prepared.inputs;
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
        if started.is_err() {
            self.kv_used -= need;
            self.count(Outcome::Cancelled, 0.0);
            return;
        }
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
                self.fail(&r.tx, r.reserved, e);
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
            if self.prefilling.is_some() {
                st.stats.decode_steps_during_prefill_total += 1;
            }
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
            self.fail(&r.tx, r.reserved, internal(msg));
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
        let mut waiting: Vec<Pending> = Vec::new();
        if let Some(pf) = self.prefilling.take() {
            self.kv_used -= pf.need;
            waiting.push(pf.pending);
        }
        if let Some(p) = self.preparing.take() {
            // Bounded by the fetch timeout of a remote image or video.
            if let Ok((pending, _)) = p.done.recv() {
                waiting.push(pending);
            }
        }
        waiting.extend(self.head.take());
        {
            let mut st = self.shared.lock();
            waiting.extend(st.queue.drain(..));
            st.held = 0;
        }
        for p in waiting {
            let e = Error::bad_input(
                "the engine shut down before the request started",
                "a running server",
            );
            self.fail(&p.tx, 0, e);
        }
        self.publish();
    }

    /// Fails a request with `e`, releasing the `reserved` KV tokens it held.
    fn fail(&mut self, tx: &UnboundedSender<EngineEvent>, reserved: usize, e: Error) {
        self.kv_used -= reserved;
        let _ = tx.send(EngineEvent::Failed(e));
        self.count(Outcome::Failed, 0.0);
    }

    /// Finishes a request cancelled before its first token ("cancelled", no text).
    fn cancel_unstarted(&self, tx: &UnboundedSender<EngineEvent>) {
        let _ = tx.send(EngineEvent::Finished(cancelled_before_start()));
        self.count(Outcome::Cancelled, 0.0);
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

    /// Publishes running / KV figures for [`super::Engine::stats`] (the request being
    /// prefilled counts as running: it holds a slot and its KV).
    fn publish(&self) {
        let mut st = self.shared.lock();
        st.stats.running = self.running.len() + usize::from(self.prefilling.is_some());
        st.stats.kv_tokens_used = self.kv_used;
        st.held = usize::from(self.preparing.is_some()) + usize::from(self.head.is_some());
        st.stats.queued = st.queue.len() + st.held;
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

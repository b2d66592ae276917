//! The scheduler thread: admit, prefill, one batched decode step, sample, stop; repeat.
//! The policy is described in the [module docs](super).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::{prepare_checked, EngineEvent, Pending, Prepared, Shared};
use crate::error::{Error, Result};
use crate::generation::sequence::{PrefillTimings, PromptInfo, Sequence};
use crate::generation::stop::FinishReason;
use crate::generation::{GenerateRequest, Generation};
use crate::kv_cache::KvCache;
use crate::model::PrefillJob;
use crate::pipeline::Pipeline;
use crate::prefix_cache::PrefixKey;
use crate::processing::fetch::Interrupt;

/// How long past its deadline a preprocessing job may still answer before the scheduler
/// fails it itself (the job's own checks give the more precise message).
const PREPROCESS_GRACE: Duration = Duration::from_millis(500);

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
    /// The prompt's prefix-cache key: at the finish, the answer's ids are added and the
    /// sequence's blocks kept.
    key: Option<PrefixKey>,
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

/// A request whose template, tokens and media are being read on a thread of its own (file
/// and network reads, image decoding and resizing must not stall the decode steps). The
/// thread gets only the [`crate::generation::GenerateRequest`]; the scheduler keeps the rest,
/// so it can answer the request without the thread (a deadline passed, a cancel) and
/// abandon it, and the answer's channel closes then, not when the thread ends.
struct Preparing {
    id: u64,
    tx: UnboundedSender<EngineEvent>,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
    /// The interrupt flag of the request's fetch options: set, the thread stops at its next
    /// check.
    abort: Arc<AtomicBool>,
    started: Instant,
}

impl Preparing {
    fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.tx.is_closed()
    }
}

/// What a preprocessing thread sends back: its job's id, the request, the result.
type Done = (u64, GenerateRequest, Result<Prepared>);

/// Counts a preprocessing thread as alive until it ends (even by a panic).
struct Alive(Arc<AtomicUsize>);

impl Alive {
    fn new(count: &Arc<AtomicUsize>) -> Alive {
        count.fetch_add(1, Ordering::SeqCst);
        Alive(count.clone())
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The admitted request whose vision tower and prefill run, a slice at a time.
struct Prefilling<'p> {
    /// `prepared` is always `Some` here.
    pending: Pending,
    cache: KvCache,
    job: PrefillJob<'p>,
    /// KV tokens reserved (the whole prompt, even the part copied from the prefix cache).
    need: usize,
    /// Prompt positions copied from the prefix cache.
    cached: usize,
    admitted: Instant,
}

/// Requests flow queue → `preparing` (several at once, media requests only) → `ready` →
/// `prefilling` (one) → `running`. `ready` is admitted in order from its front, so a
/// request that waits for KV room is not overtaken.
struct Scheduler<'p> {
    shared: Arc<Shared>,
    pipeline: &'p Pipeline,
    /// The same pipeline, for the preprocessing threads.
    owned: Arc<Pipeline>,
    running: Vec<Running<'p>>,
    preparing: Vec<Preparing>,
    done_tx: mpsc::Sender<Done>,
    done_rx: mpsc::Receiver<Done>,
    next_job: u64,
    /// Preprocessing threads alive, abandoned ones included.
    alive: Arc<AtomicUsize>,
    /// Preprocessed requests waiting for a slot, KV room or the prefill lane; the front is
    /// the next to admit.
    ready: VecDeque<Pending>,
    prefilling: Option<Prefilling<'p>>,
    kv_used: usize,
    /// Whether freed heap memory was handed back since the engine last worked.
    trimmed: bool,
}

/// The thread's body: loops until [`Shared`]'s `stop`, then cancels what runs and fails what
/// waits.
pub(crate) fn run(shared: Arc<Shared>, pipeline: Arc<Pipeline>) {
    let (done_tx, done_rx) = mpsc::channel();
    let mut s = Scheduler {
        shared,
        pipeline: &pipeline,
        owned: pipeline.clone(),
        running: Vec::new(),
        preparing: Vec::new(),
        done_tx,
        done_rx,
        next_job: 0,
        alive: Arc::new(AtomicUsize::new(0)),
        ready: VecDeque::new(),
        prefilling: None,
        kv_used: 0,
        trimmed: true,
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
        if prefilled || !self.running.is_empty() || !self.preparing.is_empty() {
            self.trimmed = false;
        }
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
        if !self.preparing.is_empty() {
            // A preprocessing thread notifies when done; the timeout bounds how late a
            // cancel or a deadline is seen.
            let _unused = self
                .shared
                .wake
                .wait_timeout(st, Duration::from_millis(10))
                .map_err(|_| ());
        } else if st.queue.is_empty() && self.ready.is_empty() && !self.trimmed {
            drop(st);
            crate::memory::release_free_heap();
            self.trimmed = true;
        } else if st.queue.is_empty() && self.ready.is_empty() {
            // Wake on submit/shutdown; the timeout only bounds a missed notification.
            let _unused = self
                .shared
                .wake
                .wait_timeout(st, Duration::from_millis(200))
                .map_err(|_| ());
        } else if self.ready.is_empty() {
            // Queued media requests wait for abandoned preprocessing threads to end (they
            // do not notify); look again now and then.
            let _unused = self
                .shared
                .wake
                .wait_timeout(st, Duration::from_millis(10))
                .map_err(|_| ());
        } else {
            drop(st);
            // A ready request with nothing running can only be a cancelled one being
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
                    gone.push(p.tx);
                } else {
                    st.queue.push_back(p);
                }
            }
        }
        for p in std::mem::take(&mut self.ready) {
            if p.is_cancelled() {
                gone.push(p.tx);
            } else {
                self.ready.push_back(p);
            }
        }
        // A cancelled preprocessing frees its place now; its thread stops at its next
        // check.
        for p in std::mem::take(&mut self.preparing) {
            if p.is_cancelled() {
                p.abort.store(true, Ordering::Relaxed);
                gone.push(p.tx);
            } else {
                self.preparing.push(p);
            }
        }
        for tx in gone {
            self.cancel_unstarted(&tx);
        }
    }

    /// Collects finished preprocessing jobs (into `ready`, or failed), fails the ones past
    /// their deadline, and starts preprocessing queued media requests while threads are
    /// free; text-only requests (preprocessed at submit) go straight to `ready`.
    fn advance_preparation(&mut self) {
        while let Ok((id, request, result)) = self.done_rx.try_recv() {
            // A job no longer listed was already answered (cancelled, or past its
            // deadline); its late result is dropped.
            if let Some(i) = self.preparing.iter().position(|p| p.id == id) {
                let p = self.preparing.swap_remove(i);
                let pending = Pending {
                    request,
                    tx: p.tx,
                    cancel: p.cancel,
                    submitted: p.submitted,
                    prepared: None,
                };
                self.take_prepared(pending, result);
            }
        }
        let timeout = self.shared.config.preprocess_timeout;
        let now = Instant::now();
        for p in std::mem::take(&mut self.preparing) {
            if now.duration_since(p.started) >= timeout + PREPROCESS_GRACE {
                p.abort.store(true, Ordering::Relaxed);
                tracing::warn!(
                    seconds = timeout.as_secs_f64(),
                    "a request's preprocessing passed its deadline; its thread is abandoned"
                );
                self.fail(&p.tx, 0, preprocess_timeout_error(timeout));
            } else {
                self.preparing.push(p);
            }
        }
        let threads = self.shared.config.preprocess_threads.max(1);
        let mut start = Vec::new();
        let mut gone = Vec::new();
        {
            let mut st = self.shared.lock();
            let ready_media = self.ready.iter().filter(|p| has_media(p)).count();
            for p in std::mem::take(&mut st.queue) {
                if p.is_cancelled() {
                    gone.push(p.tx);
                } else if p.prepared.is_some() {
                    self.ready.push_back(p);
                } else if self.preparing.len() + start.len() + ready_media < threads
                    && self.alive.load(Ordering::SeqCst) + start.len() < 2 * threads
                {
                    // Media requests prepared or being prepared stay within `threads`
                    // (their pixels take memory); abandoned threads still running count
                    // against a second `threads`, so stuck jobs cannot pile up.
                    start.push(p);
                } else {
                    st.queue.push_back(p);
                }
            }
        }
        for tx in gone {
            self.cancel_unstarted(&tx);
        }
        for p in start {
            self.spawn_preparation(p);
        }
    }

    /// Preprocesses `pending` on a thread of its own, with a deadline of
    /// [`super::EngineConfig::preprocess_timeout`] and an abort flag set in its fetch
    /// options (or here, if no thread can be started).
    fn spawn_preparation(&mut self, pending: Pending) {
        let Pending {
            mut request,
            tx,
            cancel,
            submitted,
            prepared: _,
        } = pending;
        let timeout = self.shared.config.preprocess_timeout;
        let abort = Arc::new(AtomicBool::new(false));
        request.fetch.interrupt = Interrupt::within(timeout, Some(abort.clone()));
        let id = self.next_job;
        self.next_job += 1;
        let entry = Preparing {
            id,
            tx,
            cancel,
            submitted,
            abort,
            started: Instant::now(),
        };
        let done = self.done_tx.clone();
        let pipeline = self.owned.clone();
        let shared = self.shared.clone();
        let budget = self.shared.config.kv_budget_tokens;
        let alive = Alive::new(&self.alive);
        let work = move |request: GenerateRequest| {
            let _alive = alive;
            let result = guarded(|| prepare_checked(&pipeline, &request, budget));
            let _ = done.send((id, request, result));
            // Taking the lock orders this wake-up after the scheduler's check.
            drop(shared.lock());
            shared.wake.notify_all();
        };
        // The thread takes the request; if it cannot start, the request comes back through
        // this slot and is preprocessed here.
        let slot = Arc::new(Mutex::new(Some(request)));
        let theirs = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("qwen2vl-preprocess".into())
            .spawn(move || {
                let taken = theirs.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(p) = taken {
                    work(p);
                }
            });
        match spawned {
            Ok(_) => self.preparing.push(entry),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a preprocessing thread; preprocessing on the scheduler");
                let request = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(request) = request {
                    let result = guarded(|| prepare_checked(self.pipeline, &request, budget));
                    let pending = Pending {
                        request,
                        tx: entry.tx,
                        cancel: entry.cancel,
                        submitted: entry.submitted,
                        prepared: None,
                    };
                    self.take_prepared(pending, result);
                }
            }
        }
    }

    /// A preprocessed request joins `ready`, or fails.
    fn take_prepared(&mut self, mut pending: Pending, result: Result<Prepared>) {
        self.note_progress();
        match result {
            Ok(p) => {
                pending.prepared = Some(p);
                self.ready.push_back(pending);
            }
            Err(e) => self.fail(&pending.tx, 0, e),
        }
    }

    /// Admits the front of `ready` when the prefill lane and a slot are free and its KV
    /// fits: reserves its cache and starts its [`PrefillJob`]. A request that does not fit
    /// yet waits (later requests do not overtake it: no starvation).
    fn admit(&mut self) {
        if self.prefilling.is_some() || self.running.len() >= self.shared.config.max_running {
            return;
        }
        let Some(head) = self.ready.pop_front() else {
            return;
        };
        let Some(prepared) = head.prepared.as_ref() else {
            // Not reachable: only preprocessed requests are ready.
            self.fail(&head.tx, 0, internal("a ready request has no inputs"));
            return;
        };
        let need = prepared.need();
        if self.kv_used + need > self.shared.config.kv_budget_tokens {
            self.ready.push_front(head);
            return;
        }
        self.note_progress();
        let pipeline = self.pipeline;
        match guarded(|| {
            let mut cache = pipeline.model().new_cache(need)?;
            let (job, cached) =
                pipeline.prefill_job_cached(&prepared.inputs, prepared.key.as_ref(), &mut cache)?;
            Ok((cache, job, cached))
        }) {
            Ok((cache, job, cached)) => {
                self.kv_used += need;
                self.prefilling = Some(Prefilling {
                    pending: head,
                    cache,
                    job,
                    need,
                    cached,
                    admitted: Instant::now(),
                });
            }
            Err(e) => self.fail(&head.tx, 0, e),
        }
    }

    /// Runs admitted requests' prefills for a slice of time
    /// ([`super::EngineConfig::prefill_slice_ms`] while others are decoding, longer when
    /// nothing else runs), one unit of work at a time, and drops a request cancelled
    /// meanwhile after the unit it is in. A request whose prefill completes gets its first
    /// token and joins the decode batch, and the next ready request is admitted and
    /// prefilled in what is left of the slice (so a burst of short prompts starts
    /// together). Returns whether there was prefill work.
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
                    guarded(|| job.step(&prepared.inputs, cache))
                }
                None => Err(internal("an admitted request has no inputs")),
            };
            let cancelled = pf.pending.is_cancelled();
            self.note_progress();
            match result {
                Ok(false) if cancelled => {
                    if let Some(p) = self.prefilling.take() {
                        self.kv_used -= p.need;
                        self.cancel_unstarted(&p.pending.tx);
                    }
                }
                Ok(false) => {}
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
            cached,
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
        pipeline.remember_prefix(prepared.key.as_ref(), &cache);
        let mut inputs = prepared.inputs;
        let prompt = PromptInfo {
            cached_tokens: cached,
            ..PromptInfo::take_from(&mut inputs)
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
            key: prepared.key,
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
        if let Some(mut key) = r.key.take() {
            // The answer's keys and values follow the prompt's: a next turn reuses both.
            key.extend_ids(r.seq.token_ids());
            self.pipeline.remember_prefix(Some(&key), &r.cache);
        }
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
        self.note_progress();
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
        let mut txs: Vec<UnboundedSender<EngineEvent>> = Vec::new();
        // Preprocessing threads are not waited for: they stop at their next check.
        for p in std::mem::take(&mut self.preparing) {
            p.abort.store(true, Ordering::Relaxed);
            txs.push(p.tx);
        }
        waiting.extend(self.ready.drain(..));
        {
            let mut st = self.shared.lock();
            waiting.extend(st.queue.drain(..));
            st.held = 0;
        }
        txs.extend(waiting.into_iter().map(|p| p.tx));
        for tx in txs {
            let e = Error::Shutdown("before the request started".into());
            self.fail(&tx, 0, e);
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
        let _ = tx.send(EngineEvent::Finished(Generation::cancelled_before_start()));
        self.count(Outcome::Cancelled, 0.0);
    }

    /// Updates the totals for a request that left.
    fn count(&self, outcome: Outcome, service_s: f64) {
        let mut st = self.shared.lock();
        st.last_progress = Some(Instant::now());
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

    /// Records that work moved on (for [`super::EngineStats::seconds_since_progress`]).
    fn note_progress(&self) {
        self.shared.lock().last_progress = Some(Instant::now());
    }

    /// Publishes running / KV figures for [`super::Engine::stats`] (the request being
    /// prefilled counts as running: it holds a slot and its KV).
    fn publish(&self) {
        let mut st = self.shared.lock();
        st.stats.running = self.running.len() + usize::from(self.prefilling.is_some());
        st.stats.kv_tokens_used = self.kv_used;
        st.held = self.preparing.len() + self.ready.len();
        st.stats.queued = st.queue.len() + st.held;
        st.stats.preprocessing = self.preparing.len();
        let alive = self.alive.load(Ordering::SeqCst);
        st.stats.preprocess_threads_abandoned = alive.saturating_sub(self.preparing.len());
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

/// Whether a prepared request carries pixels (images or video frames).
fn has_media(p: &Pending) -> bool {
    p.prepared.as_ref().is_some_and(|x| {
        !x.inputs.pixel_values.is_empty() || !x.inputs.pixel_values_videos.is_empty()
    })
}

/// The error of a request whose preprocessing passed `timeout`.
fn preprocess_timeout_error(timeout: Duration) -> Error {
    Error::bad_input(
        format!(
            "reading and decoding the request's media took longer than {:.1} s",
            timeout.as_secs_f64()
        ),
        format!(
            "media that can be fetched and decoded within {:.1} s (the engine's preprocessing limit)",
            timeout.as_secs_f64()
        ),
    )
}

/// An internal error carrying `msg` (our fault, not the user's).
fn internal(msg: &str) -> Error {
    Error::Internal(msg.to_string())
}

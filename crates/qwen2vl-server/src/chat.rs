//! `POST /v1/chat/completions`: submit one engine request per choice, then answer with one
//! JSON object or a stream of server-sent events in the OpenAI chunk format.
//!
//! Stop strings are the engine's: each choice's request carries them, and the engine cuts its
//! token texts and its answer before the earliest one (holding back a possible start of one),
//! so the token texts read here never contain one. What this module adds to the engine's
//! events is the OpenAI shape: `<tool_call>` blocks held back from the stream and parsed into
//! `tool_calls`, per-token log-probabilities, usage counted once per prompt, and the finish
//! reason (`"tool_calls"`, and `"stop"` for a sequence the engine reports cancelled).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use qwen2vl::generation::stop::StopCriteria;
use qwen2vl::generation::{GenerateRequest, Generation};
use qwen2vl::processing::fetch::FetchOptions;
use tokio::sync::mpsc;

use crate::backend::{Event, Submission, SubmitError};
use crate::error::ApiError;
use crate::openai::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChoiceLogprobs, ChunkChoice,
    Delta, PromptTokensDetails, TokenLogprob, ToolCall, ToolCallDelta, TopLogprob, Usage,
};
use crate::request::{self, ChatRequest};
use crate::tools::{self, CALL_OPEN};
use crate::AppState;

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The handler.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let start = Instant::now();
    let resp = match handle(&state, body, start).await {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::error!("chat completion failed: {}", e.message);
            }
            e.into_response()
        }
    };
    state.metrics.request(resp.status().as_u16());
    resp
}

fn submit_error(req: &ChatRequest, e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull { retry_after_s } => ApiError {
            retry_after_s: Some(retry_after_s.max(1)),
            kind: "rate_limit_exceeded",
            ..ApiError::client(
                StatusCode::TOO_MANY_REQUESTS,
                "the server is busy: the request queue is full; retry later",
            )
            .with_code("rate_limit_exceeded")
        },
        SubmitError::Invalid(e) => library_error(req, &e),
        SubmitError::ShuttingDown => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            ..ApiError::internal("the server is shutting down")
        },
    }
}

/// Parses the request, submits its choices and waits for each one's first event (so that a
/// bad image or a prompt over the context is still a 4xx, streamed or not), then answers.
async fn handle(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    start: Instant,
) -> Result<Response, ApiError> {
    let body = read_body(state, body)?;
    let pipeline = state.backend.pipeline();
    let context = pipeline.model().config().text.context_len();
    let req = request::parse(
        &body,
        pipeline.default_sampling(),
        context,
        &state.config.limits,
        &state.media,
    )?;
    let mut subs = submit_choices(state, &req).await?;
    let firsts = first_events(&req, &mut subs).await?;
    let ctx = Arc::new(Ctx {
        id: format!("chatcmpl-{:x}{:x}", unix_now(), rand_id()),
        created: unix_now(),
        model: state.config.model_name.clone(),
        include_usage: req.include_usage,
        req,
        start,
        state: state.clone(),
    });
    if ctx.req.stream {
        Ok(stream_response(ctx, subs, firsts))
    } else {
        complete_response(&ctx, subs, firsts).await
    }
}

/// The body, or the 413 / 4xx for one that could not be read.
fn read_body(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::client(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is too large; allowed: at most {} bytes",
                    state.config.limits.max_body_bytes
                ),
            )
        } else {
            ApiError::client(e.status(), format!("cannot read the request body: {e}"))
        }
    })
}

/// How the engine may fetch this server's media: the policy's remote switch, public hosts
/// only, within the limits.
fn fetch_options(state: &AppState) -> FetchOptions {
    let limits = &state.config.limits;
    FetchOptions {
        allow_remote: state.media.allow_remote,
        refuse_private_hosts: true,
        timeout: limits.fetch_timeout,
        max_bytes: limits.max_media_bytes,
        max_video_bytes: limits.max_media_bytes,
        ..FetchOptions::default()
    }
}

/// One engine request per choice; choice `i` samples with `seed + i`.
async fn submit_choices(state: &AppState, req: &ChatRequest) -> Result<Vec<Submission>, ApiError> {
    let fetch = fetch_options(state);
    let mut subs = Vec::with_capacity(req.n);
    for i in 0..req.n {
        let mut g = GenerateRequest::new(req.messages.clone());
        g.sampling = req.sampling.clone();
        if !req.logprobs {
            g.sampling.top_logprobs = 0;
        }
        g.sampling.seed = req.sampling.seed.map(|s| s.wrapping_add(i as u64));
        g.max_new_tokens = req.max_tokens;
        g.stop = req.stop.clone();
        g.fetch = fetch.clone();
        // The engine templates and tokenizes a text-only prompt inside `submit`: off the
        // async workers.
        let backend = state.backend.clone();
        let submitted = tokio::task::spawn_blocking(move || backend.submit(g))
            .await
            .map_err(|e| ApiError::internal(format!("submit task failed: {e}")))?;
        subs.push(submitted.map_err(|e| submit_error(req, e))?);
    }
    Ok(subs)
}

/// The first event of each choice, before any header is sent: a failure is the request's
/// error.
async fn first_events(
    req: &ChatRequest,
    subs: &mut [Submission],
) -> Result<Vec<Option<Event>>, ApiError> {
    let mut firsts = Vec::with_capacity(subs.len());
    for s in subs.iter_mut() {
        match s.events.recv().await {
            Some(Event::Failed(e)) => return Err(library_error(req, &e)),
            Some(ev) => firsts.push(Some(ev)),
            None => return Err(ApiError::internal("the engine dropped the request")),
        }
    }
    Ok(firsts)
}

/// The non-streamed answer: every choice run to its end, one `chat.completion` object.
async fn complete_response(
    ctx: &Ctx,
    subs: Vec<Submission>,
    firsts: Vec<Option<Event>>,
) -> Result<Response, ApiError> {
    let runs = subs
        .into_iter()
        .zip(firsts)
        .enumerate()
        .map(|(i, (s, f))| run_choice(ctx, i, s, f, None));
    let outcomes = futures_util::future::join_all(runs).await;
    let mut choices = Vec::new();
    let mut usage = Usage::default();
    for (i, o) in outcomes.into_iter().enumerate() {
        let o = o.map_err(|Disconnected| ApiError::internal("no client to send to"))??;
        add_usage(&mut usage, &o.usage, i == 0);
        choices.push(Choice {
            index: i,
            message: AssistantMessage {
                role: "assistant",
                content: o.content,
                tool_calls: o.tool_calls,
                grounding: o.grounding,
            },
            logprobs: ctx.req.logprobs.then_some(ChoiceLogprobs {
                content: o.logprobs,
            }),
            finish_reason: o.finish_reason,
        });
    }
    ctx.record_metrics(&usage);
    let body = ChatCompletion {
        id: ctx.id.clone(),
        object: "chat.completion",
        created: ctx.created,
        model: ctx.model.clone(),
        choices,
        usage,
    };
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&body).unwrap_or_default(),
    )
        .into_response())
}

/// A library error as the client sees it: a bad input names the image or video it concerns.
fn library_error(req: &ChatRequest, e: &qwen2vl::Error) -> ApiError {
    let mut err = ApiError::from_library(e);
    if err.param.is_some() {
        err.param = Some(req.param_of(e));
    }
    err
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(unix_now());
    h.finish()
}

fn add_usage(total: &mut Usage, u: &qwen2vl::generation::Usage, first: bool) {
    if first {
        // The prompt is the same for every choice: counted once, as OpenAI does.
        total.prompt_tokens = u.prompt_tokens;
        total.prompt_tokens_details = PromptTokensDetails {
            cached_tokens: u.prompt_cached_tokens,
            text_tokens: u.prompt_text_tokens,
            image_tokens: u.prompt_image_tokens,
            video_tokens: u.prompt_video_tokens,
        };
    }
    total.completion_tokens += u.completion_tokens;
    total.total_tokens = total.prompt_tokens + total.completion_tokens;
}

/// What every choice of one request shares.
struct Ctx {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    req: ChatRequest,
    start: Instant,
    state: Arc<AppState>,
}

impl Ctx {
    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> Bytes {
        let c = ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: self.include_usage.then_some(usage),
        };
        sse(&serde_json::to_string(&c).unwrap_or_default())
    }

    fn delta(
        &self,
        index: usize,
        delta: Delta,
        logprobs: Vec<TokenLogprob>,
        finish: Option<String>,
    ) -> Bytes {
        let logprobs = (self.req.logprobs && !logprobs.is_empty())
            .then_some(ChoiceLogprobs { content: logprobs });
        self.chunk(
            vec![ChunkChoice {
                index,
                delta,
                logprobs,
                finish_reason: finish,
            }],
            None,
        )
    }

    /// The request's latency and token counts, once its choices have ended.
    fn record_metrics(&self, usage: &Usage) {
        let metrics = &self.state.metrics;
        metrics.latency(self.start.elapsed().as_secs_f64());
        metrics.tokens(usage.prompt_tokens, usage.completion_tokens);
    }
}

fn sse(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// One choice's result.
struct Outcome {
    content: Option<String>,
    tool_calls: Vec<ToolCall>,
    finish_reason: String,
    logprobs: Vec<TokenLogprob>,
    usage: qwen2vl::generation::Usage,
    grounding: Option<serde_json::Value>,
}

/// The client went away while streaming.
struct Disconnected;

fn convert_logprob(l: &qwen2vl::generation::TokenLogprob) -> TokenLogprob {
    TokenLogprob {
        token: l.token.clone(),
        logprob: l.logprob,
        bytes: l.token.as_bytes().to_vec(),
        top_logprobs: l
            .top_logprobs
            .iter()
            .map(|t| TopLogprob {
                token: t.token.clone(),
                logprob: t.logprob,
                bytes: t.token.as_bytes().to_vec(),
            })
            .collect(),
    }
}

/// Holds back text that may be the start of a `<tool_call>` block; once one starts, keeps
/// everything after it for the parser.
#[derive(Default)]
struct ToolGate {
    pending: String,
    calls: Option<String>,
}

impl ToolGate {
    fn push(&mut self, text: &str) -> String {
        if let Some(c) = &mut self.calls {
            c.push_str(text);
            return String::new();
        }
        self.pending.push_str(text);
        if let Some(k) = self.pending.find(CALL_OPEN) {
            self.calls = Some(self.pending[k..].to_string());
            let out = self.pending[..k].to_string();
            self.pending.clear();
            return out;
        }
        let crit = StopCriteria {
            stop_strings: vec![CALL_OPEN.to_string()],
            ..Default::default()
        };
        let hold = crit.partial_stop_len(&self.pending);
        let out = self.pending[..self.pending.len() - hold].to_string();
        self.pending.drain(..self.pending.len() - hold);
        out
    }
}

/// Runs one choice to its end: its events become deltas on `sink` (when streaming) and its
/// [`Outcome`]. `first` is the event [`first_events`] already took.
async fn run_choice(
    ctx: &Ctx,
    index: usize,
    mut sub: Submission,
    first: Option<Event>,
    sink: Option<&mpsc::Sender<Bytes>>,
) -> Result<Result<Outcome, ApiError>, Disconnected> {
    let mut run = ChoiceRun::new(ctx, index, sink);
    let mut first = first;
    let generation = loop {
        let ev = match first.take() {
            Some(e) => Some(e),
            None => sub.events.recv().await,
        };
        match ev {
            None => break None,
            Some(Event::Started {
                prompt_tokens,
                image_tokens,
                video_tokens,
            }) => run.started(prompt_tokens, image_tokens, video_tokens),
            Some(Event::Token { text, logprob, .. }) => run.token(text, logprob).await?,
            Some(Event::Finished(g)) => break Some(g),
            Some(Event::Failed(e)) => return run.failed(&e).await.map(Err),
        }
    };
    run.finish(generation).await.map(Ok)
}

/// One choice's output while its events arrive.
struct ChoiceRun<'a> {
    ctx: &'a Ctx,
    index: usize,
    /// Where deltas go when streaming.
    sink: Option<&'a mpsc::Sender<Bytes>>,
    /// With tools: holds back `<tool_call>` blocks.
    gate: Option<ToolGate>,
    /// The content shown so far.
    text: String,
    logprobs: Vec<TokenLogprob>,
    /// Whether any token brought its log-probability (else they come with the answer).
    streamed_lp: bool,
    /// The prompt's usage, for a choice that ends without its answer.
    started_usage: qwen2vl::generation::Usage,
    tokens_seen: usize,
}

impl<'a> ChoiceRun<'a> {
    fn new(ctx: &'a Ctx, index: usize, sink: Option<&'a mpsc::Sender<Bytes>>) -> Self {
        ChoiceRun {
            ctx,
            index,
            sink,
            gate: ctx.req.parse_tools.then(ToolGate::default),
            text: String::new(),
            logprobs: Vec::new(),
            streamed_lp: false,
            started_usage: qwen2vl::generation::Usage::default(),
            tokens_seen: 0,
        }
    }

    /// Sends a delta of this choice when streaming.
    async fn send(&self, delta: Delta, lp: Vec<TokenLogprob>, finish: Option<String>) -> Sent {
        match self.sink {
            Some(s) => s
                .send(self.ctx.delta(self.index, delta, lp, finish))
                .await
                .map_err(|_| Disconnected),
            None => Ok(()),
        }
    }

    /// Prefill is done: the prompt's counts.
    fn started(&mut self, prompt_tokens: usize, image_tokens: usize, video_tokens: usize) {
        self.started_usage = qwen2vl::generation::Usage {
            prompt_tokens,
            prompt_text_tokens: prompt_tokens
                .saturating_sub(image_tokens)
                .saturating_sub(video_tokens),
            prompt_image_tokens: image_tokens,
            prompt_video_tokens: video_tokens,
            ..Default::default()
        };
    }

    /// A token: its text (already cut at a stop string by the engine) past the tool gate,
    /// and its log-probability, as one delta.
    async fn token(
        &mut self,
        piece: String,
        logprob: Option<qwen2vl::generation::TokenLogprob>,
    ) -> Sent {
        self.tokens_seen += 1;
        if self.tokens_seen == 1 && self.index == 0 {
            let ctx = self.ctx;
            ctx.state.metrics.ttft(ctx.start.elapsed().as_secs_f64());
        }
        let lp: Vec<_> = logprob.iter().map(convert_logprob).collect();
        self.streamed_lp |= !lp.is_empty();
        self.logprobs.extend(lp.iter().cloned());
        let shown = match &mut self.gate {
            Some(g) => g.push(&piece),
            None => piece,
        };
        self.text.push_str(&shown);
        if shown.is_empty() && lp.is_empty() {
            return Ok(());
        }
        let delta = Delta {
            content: (!shown.is_empty()).then_some(shown),
            ..Default::default()
        };
        self.send(delta, lp, None).await
    }

    /// The engine failed the choice: the error, also sent as an event when streaming.
    async fn failed(&self, e: &qwen2vl::Error) -> Result<ApiError, Disconnected> {
        let err = library_error(&self.ctx.req, e);
        if let Some(s) = self.sink {
            s.send(sse(&err.body().to_string()))
                .await
                .map_err(|_| Disconnected)?;
        }
        Ok(err)
    }

    /// The choice ended (`generation`: the engine's answer; `None`: its events stopped
    /// without one): the held-back text and the tool calls, the finish chunk when streaming,
    /// and the outcome.
    async fn finish(mut self, generation: Option<Generation>) -> Result<Outcome, Disconnected> {
        let (content_tail, tool_calls) = self.take_tail_and_calls();
        self.text.push_str(&content_tail);
        let (usage, finish, grounding) = match &generation {
            Some(g) => {
                if self.logprobs.is_empty() {
                    self.logprobs = g.logprobs.iter().map(convert_logprob).collect();
                }
                (
                    g.usage.clone(),
                    g.finish_reason.to_string(),
                    g.grounding
                        .as_ref()
                        .and_then(|gr| serde_json::to_value(gr).ok()),
                )
            }
            None => {
                let mut u = self.started_usage.clone();
                u.completion_tokens = self.tokens_seen;
                u.total_tokens = u.prompt_tokens + self.tokens_seen;
                (u, "stop".to_string(), None)
            }
        };
        let finish_reason = if !tool_calls.is_empty() {
            "tool_calls".to_string()
        } else if finish == "cancelled" {
            "stop".to_string()
        } else {
            finish
        };
        if self.sink.is_some() {
            self.send_finish(content_tail, &tool_calls, &grounding, &finish_reason)
                .await?;
        }
        // With calls, `text` is what came before the first `<tool_call>`.
        let content = if tool_calls.is_empty() {
            Some(self.text)
        } else {
            let t = self.text.trim();
            (!t.is_empty()).then(|| t.to_string())
        };
        Ok(Outcome {
            content,
            tool_calls,
            finish_reason,
            logprobs: self.logprobs,
            usage,
            grounding,
        })
    }

    /// The text the tool gate still holds, and the calls parsed from a `<tool_call>` block
    /// (a block that does not parse stays text).
    fn take_tail_and_calls(&mut self) -> (String, Vec<ToolCall>) {
        let Some(g) = &mut self.gate else {
            return (String::new(), Vec::new());
        };
        let mut tail = std::mem::take(&mut g.pending);
        let Some(calls_text) = g.calls.take() else {
            return (tail, Vec::new());
        };
        let prefix = format!("call_{}_{}_", self.ctx.id, self.index);
        let (_, calls) = tools::parse_calls(&calls_text, &prefix);
        if calls.is_empty() {
            tail.push_str(&calls_text);
        }
        (tail, calls)
    }

    /// The last deltas of a streamed choice: the held-back text, then the tool calls,
    /// grounding, late log-probabilities and the finish reason.
    async fn send_finish(
        &self,
        content_tail: String,
        tool_calls: &[ToolCall],
        grounding: &Option<serde_json::Value>,
        finish_reason: &str,
    ) -> Sent {
        // Per-token logprobs that only came with the final generation go out with it.
        let late_lp = if self.streamed_lp {
            vec![]
        } else {
            self.logprobs.clone()
        };
        if !content_tail.is_empty() {
            let delta = Delta {
                content: Some(content_tail),
                ..Default::default()
            };
            self.send(delta, vec![], None).await?;
        }
        let delta = Delta {
            tool_calls: tool_calls
                .iter()
                .enumerate()
                .map(|(k, c)| ToolCallDelta {
                    index: k,
                    id: c.id.clone(),
                    kind: "function",
                    function: c.function.clone(),
                })
                .collect(),
            grounding: grounding.clone(),
            ..Default::default()
        };
        self.send(delta, late_lp, Some(finish_reason.to_string()))
            .await
    }
}

/// A send to a streaming client.
type Sent = Result<(), Disconnected>;

fn stream_response(ctx: Arc<Ctx>, subs: Vec<Submission>, firsts: Vec<Option<Event>>) -> Response {
    let (tx, mut rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        let n = subs.len();
        for i in 0..n {
            let delta = Delta {
                role: Some("assistant"),
                content: Some(String::new()),
                ..Default::default()
            };
            if tx.send(ctx.delta(i, delta, vec![], None)).await.is_err() {
                return;
            }
        }
        let runs = subs
            .into_iter()
            .zip(firsts)
            .enumerate()
            .map(|(i, (s, f))| run_choice(&ctx, i, s, f, Some(&tx)));
        let outcomes = futures_util::future::join_all(runs).await;
        let mut usage = Usage::default();
        for (i, o) in outcomes.into_iter().enumerate() {
            match o {
                // The client is gone: the submissions were dropped, which cancels them.
                Err(Disconnected) => return,
                Ok(Err(_)) => {}
                Ok(Ok(o)) => add_usage(&mut usage, &o.usage, i == 0),
            }
        }
        ctx.record_metrics(&usage);
        if ctx.include_usage && tx.send(ctx.chunk(vec![], Some(usage))).await.is_err() {
            return;
        }
        let _ = tx.send(sse("[DONE]")).await;
    });
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|o| o.map(Ok::<Bytes, Infallible>))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| ApiError::internal("cannot build the response").into_response())
}

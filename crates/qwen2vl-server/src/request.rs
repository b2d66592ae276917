//! An OpenAI chat-completion request → the library's request, with every field checked
//! and each error naming its field (`param`). Cheap checks only: nothing here decodes an
//! image or tokenizes; limits on counts, pixels and frames are checked before any media is read.

use std::path::{Path, PathBuf};

use qwen2vl::generation::sampler::{SamplingParams, MAX_TOP_LOGPROBS};
use qwen2vl::generation::stop::{MAX_STOP_STRINGS, MAX_STOP_STRING_BYTES};
use qwen2vl::processing::image::MAX_PIXELS;
use qwen2vl::processing::messages::{
    Content, ContentPart, ImageSource, Location, Message, Role, VideoSource,
};
use qwen2vl::processing::video::VIDEO_MAX_PIXELS;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::tools::{self, Tool, ToolChoice};
use crate::Limits;
use qwen2vl::processing::messages::kind_of as type_name;

/// Where media may come from.
#[derive(Debug, Clone, Default)]
pub struct MediaPolicy {
    /// Fetch http(s) URLs (public hosts only).
    pub allow_remote: bool,
    /// Local files are read only inside this (canonical) directory; `None` refuses them.
    pub allowed_dir: Option<PathBuf>,
}

/// A checked request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The conversation, tools rendered into it, local paths made canonical.
    pub messages: Vec<Message>,
    /// Sampling: the checkpoint's defaults with the request's values applied.
    pub sampling: SamplingParams,
    /// New tokens at most.
    pub max_tokens: usize,
    /// Answer as server-sent events.
    pub stream: bool,
    /// With `stream`: a last chunk with usage.
    pub include_usage: bool,
    /// Number of choices.
    pub n: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Report per-token log-probabilities.
    pub logprobs: bool,
    /// Whether to look for `<tool_call>` blocks in the output.
    pub parse_tools: bool,
    /// The request field of each image, in conversation order (`messages[i].content[j]`).
    pub image_params: Vec<String>,
    /// The request field of each video, in conversation order.
    pub video_params: Vec<String>,
}

impl ChatRequest {
    /// The field a library error is about: the image or video it names (its
    /// [`qwen2vl::Item`], counted over the whole conversation), else `messages`.
    pub fn param_of(&self, e: &qwen2vl::Error) -> String {
        e.item()
            .and_then(|it| {
                let list = match it.kind {
                    qwen2vl::ItemKind::Image => &self.image_params,
                    qwen2vl::ItemKind::Video => &self.video_params,
                };
                list.get(it.index.checked_sub(1)?).cloned()
            })
            .unwrap_or_else(|| "messages".into())
    }
}

fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn number(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match get(obj, key) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::invalid(key, format!("{key} must be a finite number"))),
        Some(v) => Err(ApiError::invalid(
            key,
            format!("{key} must be a number, got {}", type_name(v)),
        )),
    }
}

fn integer(obj: &Map<String, Value>, key: &str) -> Result<Option<i64>, ApiError> {
    match get(obj, key) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Ok(Some(i)),
            (None, Some(_)) => Ok(Some(i64::MAX)),
            _ => Err(ApiError::invalid(
                key,
                format!("{key} must be an integer, got {n}"),
            )),
        },
        Some(v) => Err(ApiError::invalid(
            key,
            format!("{key} must be an integer, got {}", type_name(v)),
        )),
    }
}

fn boolean(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match get(obj, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ApiError::invalid(
            key,
            format!("{key} must be a boolean, got {}", type_name(v)),
        )),
    }
}

/// Parses and checks a request body. `defaults` are the checkpoint's sampling defaults,
/// `context` the model's context length.
pub fn parse(
    body: &[u8],
    defaults: SamplingParams,
    context: usize,
    limits: &Limits,
    media: &MediaPolicy,
) -> Result<ChatRequest, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::client(
            axum::http::StatusCode::BAD_REQUEST,
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(ApiError::client(
            axum::http::StatusCode::BAD_REQUEST,
            format!(
                "the request body must be a JSON object, got {}",
                type_name(&value)
            ),
        ));
    };
    if let Some(m) = obj.get("model") {
        if !m.is_string() && !m.is_null() {
            return Err(ApiError::invalid("model", "model must be a string"));
        }
    }

    // Sampling.
    let mut sampling = defaults;
    sampling.seed = None;
    if let Some(t) = number(&obj, "temperature")? {
        if t < 0.0 {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature {t} is invalid; allowed: a number >= 0 (0 = greedy)"),
            ));
        }
        sampling.temperature = t;
    }
    if let Some(p) = number(&obj, "top_p")? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p {p} is invalid; allowed: a number in (0, 1]"),
            ));
        }
        sampling.top_p = p;
    }
    if let Some(k) = integer(&obj, "top_k")? {
        if k < 0 {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k {k} is invalid; allowed: an integer >= 0 (0 = off)"),
            ));
        }
        sampling.top_k = usize::try_from(k).unwrap_or(usize::MAX);
    }
    if let Some(r) = number(&obj, "repetition_penalty")? {
        if r <= 0.0 {
            return Err(ApiError::invalid(
                "repetition_penalty",
                format!("repetition_penalty {r} is invalid; allowed: a number > 0 (1 = off)"),
            ));
        }
        sampling.repetition_penalty = r;
    }
    for key in ["presence_penalty", "frequency_penalty"] {
        if let Some(x) = number(&obj, key)? {
            if x != 0.0 {
                return Err(ApiError::invalid(
                    key,
                    format!("{key} is not supported; allowed: 0 (use repetition_penalty)"),
                ));
            }
        }
    }
    if let Some(s) = integer(&obj, "seed")? {
        if s < 0 {
            return Err(ApiError::invalid(
                "seed",
                format!("seed {s} is invalid; allowed: an integer >= 0"),
            ));
        }
        sampling.seed = Some(s as u64);
    }
    let logprobs = boolean(&obj, "logprobs")?.unwrap_or(false);
    if let Some(k) = integer(&obj, "top_logprobs")? {
        if k < 0 || k > MAX_TOP_LOGPROBS as i64 {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs {k} is invalid; allowed: 0 to {MAX_TOP_LOGPROBS}"),
            ));
        }
        if k > 0 && !logprobs {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs \"logprobs\": true",
            ));
        }
        sampling.top_logprobs = k as usize;
    }

    // Lengths.
    let max_key = if get(&obj, "max_completion_tokens").is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_tokens = match integer(&obj, max_key)? {
        None => limits.default_max_tokens.min(context.saturating_sub(1)),
        Some(m) if m <= 0 => {
            return Err(ApiError::invalid(
                max_key,
                format!("{max_key} {m} is invalid; allowed: an integer >= 1"),
            ))
        }
        Some(m) if m as u64 >= context as u64 => {
            return Err(ApiError::invalid(
                max_key,
                format!(
                    "{max_key} {m} is over the model's context; allowed: at most {} \
                     (the context is {context} tokens, prompt included)",
                    context.saturating_sub(1)
                ),
            ))
        }
        Some(m) => m as usize,
    };
    let n = match integer(&obj, "n")? {
        None => 1,
        Some(n) if n < 1 || n > limits.max_n as i64 => {
            return Err(ApiError::invalid(
                "n",
                format!("n {n} is invalid; allowed: 1 to {}", limits.max_n),
            ))
        }
        Some(n) => n as usize,
    };
    let stop = match get(&obj, "stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP_STRINGS {
                return Err(ApiError::invalid(
                    "stop",
                    format!(
                        "stop has {} strings; allowed: at most {MAX_STOP_STRINGS}",
                        items.len()
                    ),
                ));
            }
            items
                .iter()
                .map(|s| {
                    s.as_str().map(str::to_string).ok_or_else(|| {
                        ApiError::invalid("stop", "stop must be a string or a list of strings")
                    })
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "stop must be a string or a list of strings, got {}",
                    type_name(v)
                ),
            ))
        }
    };
    if let Some(s) = stop.iter().find(|s| s.len() > MAX_STOP_STRING_BYTES) {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "a stop string is {} bytes long; allowed: at most {MAX_STOP_STRING_BYTES} bytes each",
                s.len()
            ),
        ));
    }
    let stream = boolean(&obj, "stream")?.unwrap_or(false);
    let include_usage = match get(&obj, "stream_options") {
        None => false,
        Some(Value::Object(o)) => {
            if !stream {
                return Err(ApiError::invalid(
                    "stream_options",
                    "stream_options is only allowed with \"stream\": true",
                ));
            }
            match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::invalid(
                        "stream_options.include_usage",
                        "stream_options.include_usage must be a boolean",
                    ))
                }
            }
        }
        Some(v) => {
            return Err(ApiError::invalid(
                "stream_options",
                format!("stream_options must be an object, got {}", type_name(v)),
            ))
        }
    };
    if let Some(rf) = get(&obj, "response_format") {
        let ty = rf.get("type").and_then(Value::as_str);
        if ty != Some("text") {
            return Err(ApiError::invalid(
                "response_format",
                "response_format is not supported; allowed: {\"type\": \"text\"}",
            ));
        }
    }

    // Tools.
    let (tool_list, choice) = parse_tools(&obj)?;

    // Messages.
    let raw = match obj.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "messages",
                "messages is empty; allowed: at least one message",
            ))
        }
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("messages", "messages is required"))
        }
        Some(v) => {
            return Err(ApiError::invalid(
                "messages",
                format!("messages must be a list, got {}", type_name(v)),
            ))
        }
    };
    check_text_bytes(raw, context)?;
    let mut params = (Vec::new(), Vec::new());
    let mut messages = parse_messages(raw, limits, media, &mut params)?;
    let (image_params, video_params) = params;
    let parse_tools = !tool_list.is_empty() && choice != ToolChoice::None;
    if parse_tools {
        let offered: Vec<Tool> = match &choice {
            ToolChoice::Named(n) => tool_list.iter().filter(|t| &t.name == n).cloned().collect(),
            _ => tool_list,
        };
        let section = tools::system_section(&offered, &choice);
        match messages.first_mut() {
            Some(Message {
                role: Role::System,
                content,
            }) => match content {
                Content::Text(t) => t.push_str(&section),
                Content::Parts(p) => p.push(ContentPart::text(section)),
            },
            _ => messages.insert(
                0,
                Message::system(format!("You are a helpful assistant.{section}")),
            ),
        }
    }
    Ok(ChatRequest {
        messages,
        sampling,
        max_tokens,
        stream,
        include_usage,
        n,
        stop,
        logprobs,
        parse_tools,
        image_params,
        video_params,
    })
}

fn parse_tools(obj: &Map<String, Value>) -> Result<(Vec<Tool>, ToolChoice), ApiError> {
    let mut list = Vec::new();
    match get(obj, "tools") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, t) in items.iter().enumerate() {
                let param = format!("tools[{i}]");
                let name = t
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|n| !n.is_empty());
                let ty_ok = t.get("type").and_then(Value::as_str) == Some("function");
                match (ty_ok, name) {
                    (true, Some(name)) => list.push(Tool {
                        name: name.to_string(),
                        spec: t.clone(),
                    }),
                    _ => {
                        return Err(ApiError::invalid(
                            param,
                            "a tool must be {\"type\": \"function\", \"function\": {\"name\": \
                             \"...\", \"description\": \"...\", \"parameters\": {...}}}",
                        ))
                    }
                }
            }
        }
        Some(v) => {
            return Err(ApiError::invalid(
                "tools",
                format!("tools must be a list, got {}", type_name(v)),
            ))
        }
    }
    let choice = match get(obj, "tool_choice") {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("tool_choice {other:?} is invalid; allowed: \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"),
                ))
            }
        },
        Some(v) => match v
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
        {
            Some(name) => ToolChoice::Named(name.to_string()),
            None => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                ))
            }
        },
    };
    if let ToolChoice::Named(n) = &choice {
        if !list.iter().any(|t| &t.name == n) {
            return Err(ApiError::invalid(
                "tool_choice",
                format!("tool_choice names the function {n:?}, which is not in tools"),
            ));
        }
    }
    if list.is_empty() && matches!(choice, ToolChoice::Required | ToolChoice::Named(_)) {
        return Err(ApiError::invalid("tool_choice", "tool_choice needs tools"));
    }
    Ok((list, choice))
}

fn parse_content(v: &Value, i: usize) -> Result<Content, ApiError> {
    match v {
        Value::Null => Ok(Content::Text(String::new())),
        Value::String(s) => Ok(Content::Text(s.clone())),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(j, p)| {
                let param = format!("messages[{i}].content[{j}]");
                let hoisted = hoist_item_keys(p, &param)?;
                ContentPart::deserialize(hoisted.as_ref().unwrap_or(p))
                    .map_err(|e| ApiError::invalid(param, e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Content::Parts),
        other => Err(ApiError::invalid(
            format!("messages[{i}].content"),
            format!(
                "content must be a string or a list of parts, got {}",
                type_name(other)
            ),
        )),
    }
}

/// Per-item keys an `image_url` object may carry besides `url` (and OpenAI's `detail`).
const IMAGE_URL_KEYS: &[&str] = &[
    "min_pixels",
    "max_pixels",
    "resized_height",
    "resized_width",
];
/// Per-item keys a `video_url` object may carry besides `url`.
const VIDEO_URL_KEYS: &[&str] = &[
    "fps",
    "nframes",
    "min_frames",
    "max_frames",
    "min_pixels",
    "max_pixels",
    "total_pixels",
    "resized_height",
    "resized_width",
    "video_start",
    "video_end",
];

/// Per-item keys written inside the `image_url` / `video_url` object (`{"url": .., "max_pixels":
/// ..}`) moved up to the part, where the library reads them; `None` when there are none. An
/// unknown key there, or a key given at both places with different values, is a 400 naming it.
fn hoist_item_keys(part: &Value, param: &str) -> Result<Option<Value>, ApiError> {
    let Value::Object(map) = part else {
        return Ok(None);
    };
    let (field, allowed) = match (map.get("image_url"), map.get("video_url")) {
        (Some(Value::Object(_)), _) => ("image_url", IMAGE_URL_KEYS),
        (_, Some(Value::Object(_))) => ("video_url", VIDEO_URL_KEYS),
        _ => return Ok(None),
    };
    let Some(Value::Object(inner)) = map.get(field) else {
        return Ok(None);
    };
    if inner.len() == 1 && inner.contains_key("url") {
        return Ok(None);
    }
    let mut out = map.clone();
    let mut url_only = Map::new();
    for (key, value) in inner {
        if key == "url" {
            url_only.insert(key.clone(), value.clone());
            continue;
        }
        if field == "image_url" && key == "detail" {
            // OpenAI's hint for its own models; the image is read at its own resolution.
            continue;
        }
        let at = format!("{param}.{field}.{key}");
        if !allowed.contains(&key.as_str()) {
            let mut names = vec!["url"];
            if field == "image_url" {
                names.push("detail");
            }
            names.extend(allowed);
            return Err(ApiError::invalid(
                at,
                format!(
                    "{field} has an unknown key {key:?}; allowed: {}",
                    names.join(", ")
                ),
            ));
        }
        match map.get(key) {
            Some(outer) if !outer.is_null() && outer != value => {
                return Err(ApiError::invalid(
                    at,
                    format!(
                        "{key} is given twice with different values (in the part and in \
                         {field}); allowed: one of them"
                    ),
                ))
            }
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    out.insert(field.to_string(), Value::Object(url_only));
    Ok(Some(Value::Object(out)))
}

fn content_text(c: &Content) -> String {
    match c {
        Content::Text(t) => t.clone(),
        Content::Parts(p) => p
            .iter()
            .filter_map(|p| match p {
                ContentPart::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(""),
    }
}

/// Refuses message text longer than the library's bound (`TEXT_BYTES_PER_TOKEN` bytes per
/// token of the prompt the context allows) while it is still the parsed JSON: before it is
/// converted, copied per choice and queued, so a 60 MB message costs one parse, not several
/// copies of itself.
fn check_text_bytes(raw: &[Value], context: usize) -> Result<(), ApiError> {
    use qwen2vl::processing::processor::TEXT_BYTES_PER_TOKEN;
    let text_len = |v: &Value| match v {
        Value::String(s) => s.len(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(str::len)
            .sum(),
        _ => 0,
    };
    let bytes: usize = raw
        .iter()
        .filter_map(|m| m.get("content"))
        .map(text_len)
        .sum();
    let max_tokens = context.saturating_sub(1);
    let max_bytes = max_tokens.saturating_mul(TEXT_BYTES_PER_TOKEN);
    if bytes > max_bytes {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the messages hold {bytes} bytes of text; allowed: at most {max_bytes} bytes \
                 ({TEXT_BYTES_PER_TOKEN} per token of a prompt of at most {max_tokens} tokens: \
                 the model's context of {context} tokens less one)"
            ),
        ));
    }
    Ok(())
}

fn parse_messages(
    raw: &[Value],
    limits: &Limits,
    policy: &MediaPolicy,
    params: &mut (Vec<String>, Vec<String>),
) -> Result<Vec<Message>, ApiError> {
    let mut out: Vec<Message> = Vec::new();
    let mut prev_tool = false;
    for (i, m) in raw.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(ApiError::invalid(
                format!("messages[{i}]"),
                format!("a message must be an object, got {}", type_name(m)),
            ));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) => match r.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "tool" => Role::Tool,
                other => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role"),
                        format!(
                            "role {other:?} is invalid; allowed: system, user, assistant, tool"
                        ),
                    ))
                }
            },
            _ => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    "role must be one of the strings system, user, assistant, tool",
                ))
            }
        };
        let mut content = parse_content(m.get("content").unwrap_or(&Value::Null), i)?;
        // Tool results and assistant turns with tool calls become plain text below: media in
        // them would be dropped unseen (and shift the numbering of the request's images).
        if role == Role::Tool || (role == Role::Assistant && get(m, "tool_calls").is_some()) {
            if let Content::Parts(parts) = &content {
                if let Some(j) = parts
                    .iter()
                    .position(|p| !matches!(p, ContentPart::Text { .. }))
                {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].content[{j}]"),
                        "a tool result or a turn with tool_calls holds text only; allowed: text \
                         parts (images and videos go in user messages)",
                    ));
                }
            }
        }
        check_media(&mut content, i, params, limits, policy)?;
        match role {
            Role::Tool => {
                // Tool results go back as a user turn of <tool_response> blocks; consecutive
                // ones share the turn (the Qwen2.5 template).
                let block = tools::render_response(&content_text(&content));
                match (prev_tool, out.last_mut()) {
                    (
                        true,
                        Some(Message {
                            content: Content::Text(t),
                            ..
                        }),
                    ) => {
                        t.push('\n');
                        t.push_str(&block);
                    }
                    _ => out.push(Message::user(block)),
                }
                prev_tool = true;
                continue;
            }
            Role::Assistant => {
                let mut content = content;
                if let Some(calls) = get(m, "tool_calls") {
                    let Value::Array(calls) = calls else {
                        return Err(ApiError::invalid(
                            format!("messages[{i}].tool_calls"),
                            "tool_calls must be a list",
                        ));
                    };
                    let mut text = content_text(&content);
                    for (k, c) in calls.iter().enumerate() {
                        let f = c.get("function");
                        let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
                        let args = match f.and_then(|f| f.get("arguments")) {
                            None | Some(Value::Null) => Some("{}".to_string()),
                            Some(Value::String(s)) => Some(s.clone()),
                            Some(_) => None,
                        };
                        let (Some(name), Some(args)) = (name, args) else {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].tool_calls[{k}]"),
                                "a tool call must be {\"type\": \"function\", \"function\": \
                                 {\"name\": \"...\", \"arguments\": \"<JSON string>\"}}",
                            ));
                        };
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(&tools::render_call(name, &args));
                    }
                    content = Content::Text(text);
                }
                out.push(Message { role, content });
            }
            _ => out.push(Message { role, content }),
        }
        prev_tool = false;
    }
    Ok(out)
}

/// Counts, sizes and sources of one message's images and videos, against the limits and the media
/// policy; local paths are replaced by their canonical form (what was checked is what is read).
fn check_media(
    content: &mut Content,
    i: usize,
    (images, videos): &mut (Vec<String>, Vec<String>),
    limits: &Limits,
    policy: &MediaPolicy,
) -> Result<(), ApiError> {
    {
        let Content::Parts(parts) = content else {
            return Ok(());
        };
        for (j, part) in parts.iter_mut().enumerate() {
            let param = format!("messages[{i}].content[{j}]");
            match part {
                ContentPart::Text { .. } => {}
                ContentPart::Image(img) => {
                    images.push(param.clone());
                    if images.len() > limits.max_images {
                        return Err(ApiError::invalid(
                            param,
                            format!(
                                "too many images; allowed: at most {} per request",
                                limits.max_images
                            ),
                        ));
                    }
                    check_pixels(
                        &param,
                        img.min_pixels,
                        img.max_pixels,
                        img.resized_height,
                        img.resized_width,
                        limits,
                    )?;
                    if img.max_pixels.is_none() {
                        img.max_pixels = limits.max_image_pixels;
                    }
                    if let ImageSource::Uri(s) = &mut img.source {
                        *s = check_source(s, &param, policy)?;
                    }
                }
                ContentPart::Video(v) => {
                    videos.push(param.clone());
                    if videos.len() > limits.max_videos {
                        return Err(ApiError::invalid(
                            param,
                            format!(
                                "too many videos; allowed: at most {} per request",
                                limits.max_videos
                            ),
                        ));
                    }
                    check_pixels(
                        &param,
                        v.min_pixels,
                        v.max_pixels,
                        v.resized_height,
                        v.resized_width,
                        limits,
                    )?;
                    // A video item without max_pixels keeps the reference's default, which
                    // is not the image one: frames of a video file get qwen-vl-utils'
                    // per-frame video budget (at most VIDEO_MAX_PIXELS, less for many frames,
                    // see `video_frame_size`), a list of frames the image default MAX_PIXELS.
                    // The server's cap only lowers that default when it is below it.
                    if v.max_pixels.is_none() {
                        let default = match &v.source {
                            VideoSource::Uri(_) => VIDEO_MAX_PIXELS,
                            VideoSource::Frames(_) => MAX_PIXELS,
                        };
                        v.max_pixels = limits.max_image_pixels.filter(|&cap| cap < default);
                    }
                    let max_f = limits.max_video_frames;
                    for (key, val) in [
                        ("nframes", v.nframes),
                        ("max_frames", v.max_frames),
                        ("min_frames", v.min_frames),
                    ] {
                        if val.is_some_and(|x| x > max_f) {
                            return Err(ApiError::invalid(
                                format!("{param}.{key}"),
                                format!("{key} is over the server's limit; allowed: at most {max_f} frames per video"),
                            ));
                        }
                    }
                    if v.max_frames.is_none() {
                        v.max_frames = Some(max_f);
                    }
                    match &mut v.source {
                        VideoSource::Uri(s) => *s = check_source(s, &param, policy)?,
                        VideoSource::Frames(frames) => {
                            if frames.len() > max_f {
                                return Err(ApiError::invalid(
                                    param,
                                    format!(
                                        "the video has {} frames; allowed: at most {max_f} frames per video",
                                        frames.len()
                                    ),
                                ));
                            }
                            for f in frames.iter_mut() {
                                *f = check_source(f, &param, policy)?;
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn check_pixels(
    param: &str,
    min: Option<u64>,
    max: Option<u64>,
    h: Option<usize>,
    w: Option<usize>,
    limits: &Limits,
) -> Result<(), ApiError> {
    let Some(limit) = limits.max_image_pixels else {
        return Ok(());
    };
    let over = |key: &str, v: u64| {
        ApiError::invalid(
            format!("{param}.{key}"),
            format!("{key} {v} is over the server's limit; allowed: at most {limit} pixels per image or frame"),
        )
    };
    if let Some(v) = min.filter(|&v| v > limit) {
        return Err(over("min_pixels", v));
    }
    if let Some(v) = max.filter(|&v| v > limit) {
        return Err(over("max_pixels", v));
    }
    if let (Some(h), Some(w)) = (h, w) {
        let px = (h as u64).saturating_mul(w as u64);
        if px > limit {
            return Err(over("resized_height", px));
        }
    }
    Ok(())
}

/// Checks one media source against the policy; returns the string to hand the library
/// (a local path made canonical).
fn check_source(s: &str, param: &str, policy: &MediaPolicy) -> Result<String, ApiError> {
    match Location::parse(s) {
        Location::Data { .. } => Ok(s.to_string()),
        Location::Http(_) => {
            if policy.allow_remote {
                Ok(s.to_string())
            } else {
                Err(ApiError::invalid(
                    param,
                    "remote media URLs are disabled on this server; allowed: data: URIs \
                     (and http(s) URLs when the server runs with --allow-remote-media)",
                ))
            }
        }
        Location::Path(p) => {
            let Some(dir) = &policy.allowed_dir else {
                return Err(ApiError::invalid(
                    param,
                    "local files are not served; allowed: data: URIs (and file paths under \
                     the server's --allowed-media-dir)",
                ));
            };
            let path = Path::new(p);
            let joined = if path.is_absolute() {
                path.to_path_buf()
            } else {
                dir.join(path)
            };
            // One answer whether the file is missing, unreadable or outside the directory, and
            // the directory itself is not named: a client learns nothing about other files.
            let refused = || {
                ApiError::invalid(
                    param,
                    format!(
                        "media file {p:?} cannot be served; allowed: existing files under the \
                         server's --allowed-media-dir (paths relative to it)"
                    ),
                )
            };
            let canon = joined.canonicalize().map_err(|_| refused())?;
            if !canon.starts_with(dir) || !canon.is_file() {
                return Err(refused());
            }
            canon
                .into_os_string()
                .into_string()
                .map_err(|_| ApiError::invalid(param, "media file path is not valid UTF-8"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    fn parse_json(v: Value) -> Result<ChatRequest, ApiError> {
        parse(
            v.to_string().as_bytes(),
            SamplingParams::greedy(),
            1000,
            &limits(),
            &MediaPolicy::default(),
        )
    }

    fn param_of(v: Value) -> Option<String> {
        parse_json(v).expect_err("should fail").param
    }

    #[test]
    fn fields_and_params() {
        let m = serde_json::json!([{"role": "user", "content": "hi"}]);
        let ok = parse_json(serde_json::json!({"messages": m, "temperature": 0.5, "top_k": 3, "seed": 7, "n": 2, "stop": "x", "max_tokens": 9})).unwrap();
        assert_eq!(ok.sampling.temperature, 0.5);
        assert_eq!(ok.sampling.top_k, 3);
        assert_eq!(ok.sampling.seed, Some(7));
        assert_eq!((ok.n, ok.max_tokens), (2, 9));
        assert_eq!(ok.stop, ["x"]);
        let cases = [
            (
                serde_json::json!({"messages": m, "temperature": -1}),
                "temperature",
            ),
            (
                serde_json::json!({"messages": m, "temperature": "hot"}),
                "temperature",
            ),
            (serde_json::json!({"messages": m, "top_p": 0}), "top_p"),
            (serde_json::json!({"messages": m, "top_p": 1.5}), "top_p"),
            (serde_json::json!({"messages": m, "top_k": -1}), "top_k"),
            (
                serde_json::json!({"messages": m, "max_tokens": 0}),
                "max_tokens",
            ),
            (
                serde_json::json!({"messages": m, "max_completion_tokens": -3}),
                "max_completion_tokens",
            ),
            (
                serde_json::json!({"messages": m, "max_tokens": 5000}),
                "max_tokens",
            ),
            (serde_json::json!({"messages": m, "n": 0}), "n"),
            (serde_json::json!({"messages": m, "stop": 3}), "stop"),
            (
                serde_json::json!({"messages": m, "top_logprobs": 2}),
                "top_logprobs",
            ),
            (
                serde_json::json!({"messages": m, "stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (serde_json::json!({"messages": []}), "messages"),
            (serde_json::json!({"messages": "hi"}), "messages"),
            (
                serde_json::json!({"messages": [{"role": "robot", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": 5}]}),
                "messages[0].content",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}),
                "messages[0].content[0]",
            ),
            (
                serde_json::json!({"messages": m, "tool_choice": "required"}),
                "tool_choice",
            ),
        ];
        for (body, param) in cases {
            assert_eq!(param_of(body.clone()).as_deref(), Some(param), "{body}");
        }
    }

    #[test]
    fn tools_render_into_the_system_turn_and_results_into_user_turns() {
        let r = parse_json(serde_json::json!({
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c0", "type": "function", "function": {"name": "w", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "c0", "content": "20C"},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
            ],
            "tools": [{"type": "function", "function": {"name": "w", "parameters": {}}}]
        }))
        .unwrap();
        assert!(r.parse_tools);
        assert_eq!(r.messages.len(), 4);
        assert_eq!(r.messages[0].role, Role::System);
        assert!(content_text(&r.messages[0].content).contains("<tools>\n{\"type\":\"function\""));
        assert_eq!(
            content_text(&r.messages[2].content),
            "<tool_call>\n{\"name\":\"w\",\"arguments\":{\"city\":\"Paris\"}}\n</tool_call>"
        );
        assert_eq!(r.messages[3].role, Role::User);
        assert_eq!(
            content_text(&r.messages[3].content),
            "<tool_response>\n20C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
        );
    }
}

//! The request's scalar fields: the body as a JSON object, typed readers (a number, an
//! integer, a boolean, each error naming its key), and the fields built from them: sampling,
//! `max_tokens`, `n`, `stop`, `stream` / `stream_options`, `response_format`, and `tools` /
//! `tool_choice`.

use std::fmt::Display;

use axum::http::StatusCode;
use qwen2vl::generation::sampler::{SamplingParams, MAX_TOP_LOGPROBS};
use qwen2vl::generation::stop::{MAX_STOP_STRINGS, MAX_STOP_STRING_BYTES};
use qwen2vl::processing::messages::kind_of as type_name;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::tools::{Tool, ToolChoice};
use crate::Limits;

/// The request body as a JSON object, with a `model` that is a string when given.
pub(super) fn body_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::client(
            StatusCode::BAD_REQUEST,
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(ApiError::client(
            StatusCode::BAD_REQUEST,
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
    Ok(obj)
}

/// `obj[key]`, a JSON `null` counting as absent.
pub(super) fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// `obj[key]` read by `read`; `None` from `read` (a value of another JSON type) is the 400
/// "`key` must be `what`, got <its type>".
fn typed<'a, T>(
    obj: &'a Map<String, Value>,
    key: &str,
    what: &str,
    read: impl FnOnce(&'a Value) -> Option<Result<T, ApiError>>,
) -> Result<Option<T>, ApiError> {
    let Some(v) = get(obj, key) else {
        return Ok(None);
    };
    match read(v) {
        Some(r) => r.map(Some),
        None => Err(ApiError::invalid(
            key,
            format!("{key} must be {what}, got {}", type_name(v)),
        )),
    }
}

/// A finite number.
fn number(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    typed(obj, key, "a number", |v| {
        let Value::Number(n) = v else { return None };
        Some(
            n.as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| ApiError::invalid(key, format!("{key} must be a finite number"))),
        )
    })
}

/// An integer; one above `i64::MAX` reads as `i64::MAX` (over every limit anyway).
fn integer(obj: &Map<String, Value>, key: &str) -> Result<Option<i64>, ApiError> {
    typed(obj, key, "an integer", |v| {
        let Value::Number(n) = v else { return None };
        Some(match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Ok(i),
            (None, Some(_)) => Ok(i64::MAX),
            _ => Err(ApiError::invalid(
                key,
                format!("{key} must be an integer, got {n}"),
            )),
        })
    })
}

/// A boolean.
pub(super) fn boolean(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    typed(obj, key, "a boolean", |v| v.as_bool().map(Ok))
}

/// The 400 "`key` `value` is invalid; allowed: `allowed`".
fn out_of_range(key: &str, value: impl Display, allowed: impl Display) -> ApiError {
    ApiError::invalid(key, format!("{key} {value} is invalid; allowed: {allowed}"))
}

/// The sampling fields applied to the checkpoint's `defaults` (without their seed), and
/// whether per-token log-probabilities are asked for.
pub(super) fn sampling(
    obj: &Map<String, Value>,
    defaults: SamplingParams,
) -> Result<(SamplingParams, bool), ApiError> {
    let mut sampling = defaults;
    sampling.seed = None;
    if let Some(t) = number(obj, "temperature")? {
        if t < 0.0 {
            return Err(out_of_range("temperature", t, "a number >= 0 (0 = greedy)"));
        }
        sampling.temperature = t;
    }
    if let Some(p) = number(obj, "top_p")? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(out_of_range("top_p", p, "a number in (0, 1]"));
        }
        sampling.top_p = p;
    }
    if let Some(k) = integer(obj, "top_k")? {
        if k < 0 {
            return Err(out_of_range("top_k", k, "an integer >= 0 (0 = off)"));
        }
        sampling.top_k = usize::try_from(k).unwrap_or(usize::MAX);
    }
    if let Some(r) = number(obj, "repetition_penalty")? {
        if r <= 0.0 {
            return Err(out_of_range(
                "repetition_penalty",
                r,
                "a number > 0 (1 = off)",
            ));
        }
        sampling.repetition_penalty = r;
    }
    for key in ["presence_penalty", "frequency_penalty"] {
        if let Some(x) = number(obj, key)? {
            if x != 0.0 {
                return Err(ApiError::invalid(
                    key,
                    format!("{key} is not supported; allowed: 0 (use repetition_penalty)"),
                ));
            }
        }
    }
    if let Some(s) = integer(obj, "seed")? {
        if s < 0 {
            return Err(out_of_range("seed", s, "an integer >= 0"));
        }
        sampling.seed = Some(s as u64);
    }
    let logprobs = boolean(obj, "logprobs")?.unwrap_or(false);
    if let Some(k) = integer(obj, "top_logprobs")? {
        if k < 0 || k > MAX_TOP_LOGPROBS as i64 {
            return Err(out_of_range(
                "top_logprobs",
                k,
                format!("0 to {MAX_TOP_LOGPROBS}"),
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
    Ok((sampling, logprobs))
}

/// `max_completion_tokens` (or else `max_tokens`): at least 1 and below the model's
/// `context`; absent, the server's default capped by the context.
pub(super) fn max_tokens(
    obj: &Map<String, Value>,
    context: usize,
    limits: &Limits,
) -> Result<usize, ApiError> {
    let key = if get(obj, "max_completion_tokens").is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    match integer(obj, key)? {
        None => Ok(limits.default_max_tokens.min(context.saturating_sub(1))),
        Some(m) if m <= 0 => Err(out_of_range(key, m, "an integer >= 1")),
        Some(m) if m as u64 >= context as u64 => Err(ApiError::invalid(
            key,
            format!(
                "{key} {m} is over the model's context; allowed: at most {} \
                 (the context is {context} tokens, prompt included)",
                context.saturating_sub(1)
            ),
        )),
        Some(m) => Ok(m as usize),
    }
}

/// `n`, the number of choices: 1 to the server's limit, 1 when absent.
pub(super) fn n(obj: &Map<String, Value>, limits: &Limits) -> Result<usize, ApiError> {
    match integer(obj, "n")? {
        None => Ok(1),
        Some(n) if n < 1 || n > limits.max_n as i64 => {
            Err(out_of_range("n", n, format!("1 to {}", limits.max_n)))
        }
        Some(n) => Ok(n as usize),
    }
}

/// `stop`: one string or a list of them, within the library's bounds on their count and
/// length.
pub(super) fn stop(obj: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let stop = match get(obj, "stop") {
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
    Ok(stop)
}

/// `stream`, and `stream_options.include_usage` (options only with `"stream": true`).
pub(super) fn stream(obj: &Map<String, Value>) -> Result<(bool, bool), ApiError> {
    let stream = boolean(obj, "stream")?.unwrap_or(false);
    let include_usage = match get(obj, "stream_options") {
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
    Ok((stream, include_usage))
}

/// `response_format`: only `{"type": "text"}` (plain text, the default) is served.
pub(super) fn response_format(obj: &Map<String, Value>) -> Result<(), ApiError> {
    if let Some(rf) = get(obj, "response_format") {
        let ty = rf.get("type").and_then(Value::as_str);
        if ty != Some("text") {
            return Err(ApiError::invalid(
                "response_format",
                "response_format is not supported; allowed: {\"type\": \"text\"}",
            ));
        }
    }
    Ok(())
}

/// `tools` and `tool_choice`: the functions offered and how the model is told to use them.
pub(super) fn tools(obj: &Map<String, Value>) -> Result<(Vec<Tool>, ToolChoice), ApiError> {
    let list = tool_list(obj)?;
    let choice = tool_choice(obj)?;
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

/// `tools`: a list of `{"type": "function", "function": {"name": ..}}` objects.
fn tool_list(obj: &Map<String, Value>) -> Result<Vec<Tool>, ApiError> {
    let items = match get(obj, "tools") {
        None => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(v) => {
            return Err(ApiError::invalid(
                "tools",
                format!("tools must be a list, got {}", type_name(v)),
            ))
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let name = t
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty());
            let ty_ok = t.get("type").and_then(Value::as_str) == Some("function");
            match (ty_ok, name) {
                (true, Some(name)) => Ok(Tool {
                    name: name.to_string(),
                    spec: t.clone(),
                }),
                _ => Err(ApiError::invalid(
                    format!("tools[{i}]"),
                    "a tool must be {\"type\": \"function\", \"function\": {\"name\": \
                     \"...\", \"description\": \"...\", \"parameters\": {...}}}",
                )),
            }
        })
        .collect()
}

/// `tool_choice`: `"none"`, `"auto"` (the default), `"required"` or a named function.
fn tool_choice(obj: &Map<String, Value>) -> Result<ToolChoice, ApiError> {
    match get(obj, "tool_choice") {
        None => Ok(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            other => Err(ApiError::invalid(
                "tool_choice",
                format!("tool_choice {other:?} is invalid; allowed: \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"),
            )),
        },
        Some(v) => match v
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
        {
            Some(name) => Ok(ToolChoice::Named(name.to_string())),
            None => Err(ApiError::invalid(
                "tool_choice",
                "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
            )),
        },
    }
}

//! `messages` → the library's [`Message`]s: roles, content parts (with per-item keys written
//! inside `image_url` / `video_url` moved to the part), tool results and earlier tool calls
//! rendered as text in the Qwen2.5 convention, and the offered tools rendered into the system
//! turn. The text is bounded before anything is converted; each message's media go through
//! [`super::media::check_media`].

use qwen2vl::processing::messages::kind_of as type_name;
use qwen2vl::processing::messages::{Content, ContentPart, Message, Role};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::fields::get;
use super::media::{check_media, MediaParams, MediaPolicy};
use crate::error::ApiError;
use crate::tools::{self, Tool, ToolChoice};
use crate::Limits;

/// `messages`: a non-empty list.
pub(super) fn raw_messages(obj: &Map<String, Value>) -> Result<&[Value], ApiError> {
    match obj.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => Ok(m),
        Some(Value::Array(_)) => Err(ApiError::invalid(
            "messages",
            "messages is empty; allowed: at least one message",
        )),
        None | Some(Value::Null) => Err(ApiError::invalid("messages", "messages is required")),
        Some(v) => Err(ApiError::invalid(
            "messages",
            format!("messages must be a list, got {}", type_name(v)),
        )),
    }
}

/// Refuses message text longer than the library's bound (`TEXT_BYTES_PER_TOKEN` bytes per
/// token of the prompt the context allows) while it is still the parsed JSON: before it is
/// converted, copied per choice and queued, so a 60 MB message costs one parse, not several
/// copies of itself.
pub(super) fn check_text_bytes(raw: &[Value], context: usize) -> Result<(), ApiError> {
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

/// Converts and checks every message; the request field of each image and video is recorded
/// in `params`, in conversation order.
pub(super) fn parse_messages(
    raw: &[Value],
    limits: &Limits,
    policy: &MediaPolicy,
    params: &mut MediaParams,
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
        let role = parse_role(m, i)?;
        let mut content = parse_content(m.get("content").unwrap_or(&Value::Null), i)?;
        // Tool results and assistant turns with tool calls become plain text below: media in
        // them would be dropped unseen (and shift the numbering of the request's images).
        if role == Role::Tool || (role == Role::Assistant && get(m, "tool_calls").is_some()) {
            check_text_only(&content, i)?;
        }
        check_media(&mut content, i, params, limits, policy)?;
        match role {
            Role::Tool => push_tool_result(&mut out, prev_tool, &content),
            Role::Assistant => {
                let content = render_tool_calls(m, i, content)?;
                out.push(Message { role, content });
            }
            _ => out.push(Message { role, content }),
        }
        prev_tool = role == Role::Tool;
    }
    Ok(out)
}

/// `messages[i].role`; `developer` is a system turn.
fn parse_role(m: &Map<String, Value>, i: usize) -> Result<Role, ApiError> {
    match m.get("role") {
        Some(Value::String(r)) => match r.as_str() {
            "system" | "developer" => Ok(Role::System),
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            "tool" => Ok(Role::Tool),
            other => Err(ApiError::invalid(
                format!("messages[{i}].role"),
                format!("role {other:?} is invalid; allowed: system, user, assistant, tool"),
            )),
        },
        _ => Err(ApiError::invalid(
            format!("messages[{i}].role"),
            "role must be one of the strings system, user, assistant, tool",
        )),
    }
}

/// Refuses an image or video part in a message that becomes plain text.
fn check_text_only(content: &Content, i: usize) -> Result<(), ApiError> {
    let Content::Parts(parts) = content else {
        return Ok(());
    };
    match parts
        .iter()
        .position(|p| !matches!(p, ContentPart::Text { .. }))
    {
        Some(j) => Err(ApiError::invalid(
            format!("messages[{i}].content[{j}]"),
            "a tool result or a turn with tool_calls holds text only; allowed: text \
             parts (images and videos go in user messages)",
        )),
        None => Ok(()),
    }
}

/// Tool results go back as a user turn of `<tool_response>` blocks; consecutive ones share
/// the turn (the Qwen2.5 template).
fn push_tool_result(out: &mut Vec<Message>, prev_tool: bool, content: &Content) {
    let block = tools::render_response(&content_text(content));
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
}

/// An assistant turn's `tool_calls`, when it has them, appended to its text as
/// `<tool_call>` blocks; the content is unchanged otherwise.
fn render_tool_calls(
    m: &Map<String, Value>,
    i: usize,
    content: Content,
) -> Result<Content, ApiError> {
    let Some(calls) = get(m, "tool_calls") else {
        return Ok(content);
    };
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
    Ok(Content::Text(text))
}

/// Renders the offered tools (only the named one for a named `tool_choice`) into the system
/// turn, adding the default system turn when the conversation has none.
pub(super) fn offer_tools(messages: &mut Vec<Message>, list: Vec<Tool>, choice: &ToolChoice) {
    let offered: Vec<Tool> = match choice {
        ToolChoice::Named(n) => list.iter().filter(|t| &t.name == n).cloned().collect(),
        _ => list,
    };
    let section = tools::system_section(&offered, choice);
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

/// `messages[i].content`: a string, `null` (empty text) or a list of parts.
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

/// The text of a message, its text parts joined.
pub(super) fn content_text(c: &Content) -> String {
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

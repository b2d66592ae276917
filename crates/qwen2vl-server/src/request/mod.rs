//! An OpenAI chat-completion request → the library's request, with every field checked
//! and each error naming its field (`param`). Cheap checks only: nothing here decodes an
//! image or tokenizes; limits on counts, pixels and frames are checked before any media is read.
//!
//! [`parse`] runs the steps in the order their errors take precedence:
//!
//! | module | checks |
//! |---|---|
//! | `fields` | the body, sampling, `max_tokens`, `n`, `stop`, `stream`, `response_format`, `tools` |
//! | `messages` | `messages`: roles, content parts, tool calls and results, the tools' system turn |
//! | `media` | each image's and video's count, pixels, frames and source ([`MediaPolicy`]) |

mod fields;
mod media;
mod messages;

use qwen2vl::generation::sampler::SamplingParams;
use qwen2vl::processing::messages::Message;

use crate::error::ApiError;
use crate::tools::ToolChoice;
use crate::Limits;
use media::MediaParams;

pub use media::MediaPolicy;

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

/// Parses and checks a request body. `defaults` are the checkpoint's sampling defaults,
/// `context` the model's context length.
pub fn parse(
    body: &[u8],
    defaults: SamplingParams,
    context: usize,
    limits: &Limits,
    media: &MediaPolicy,
) -> Result<ChatRequest, ApiError> {
    let obj = fields::body_object(body)?;
    let (sampling, logprobs) = fields::sampling(&obj, defaults)?;
    let max_tokens = fields::max_tokens(&obj, context, limits)?;
    let n = fields::n(&obj, limits)?;
    let stop = fields::stop(&obj)?;
    let (stream, include_usage) = fields::stream(&obj)?;
    fields::response_format(&obj)?;
    let (tool_list, choice) = fields::tools(&obj)?;

    let raw = messages::raw_messages(&obj)?;
    messages::check_text_bytes(raw, context)?;
    let mut params = MediaParams::default();
    let mut messages = messages::parse_messages(raw, limits, media, &mut params)?;
    let parse_tools = !tool_list.is_empty() && choice != ToolChoice::None;
    if parse_tools {
        messages::offer_tools(&mut messages, tool_list, &choice);
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
        image_params: params.images,
        video_params: params.videos,
    })
}

#[cfg(test)]
mod tests {
    use super::messages::content_text;
    use super::*;
    use qwen2vl::processing::messages::Role;
    use serde_json::Value;

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

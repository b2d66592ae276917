//! Function calling with the Qwen2.5 / Hermes convention.
//!
//! Qwen2-VL-Instruct's own chat template has no tools section, so the prompt follows the
//! convention of Qwen2.5's template (which the Qwen2-VL models were trained alongside): the
//! system turn gets a `# Tools` section listing each function's JSON signature inside
//! `<tools></tools>`, the model answers with
//! `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` blocks, earlier assistant
//! calls are rendered the same way and tool results go back as a user turn of
//! `<tool_response>\n…\n</tool_response>` blocks (consecutive tool messages in one turn).
//! `<tool_call>` is plain text to the Qwen2-VL tokenizer, so it survives decoding.

use serde_json::Value;

use crate::openai::{FunctionCall, ToolCall};

/// The opening tag of a call in the model's output.
pub const CALL_OPEN: &str = "<tool_call>";
/// The closing tag.
pub const CALL_CLOSE: &str = "</tool_call>";

/// A function the client offers (`tools[i].function`).
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    /// `function.name`.
    pub name: String,
    /// The whole `tools[i]` object as the client sent it, rendered into the prompt.
    pub spec: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// Tools left out of the prompt, output never parsed for calls.
    None,
    /// The model decides.
    Auto,
    /// The model is told it must call at least one function.
    Required,
    /// The model is told to call this function.
    Named(String),
}

/// The `# Tools` section appended to the system prompt.
pub fn system_section(tools: &[Tool], choice: &ToolChoice) -> String {
    let mut s = String::from(
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for t in tools {
        s.push('\n');
        s.push_str(&t.spec.to_string());
    }
    s.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and \
         arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
         {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    match choice {
        ToolChoice::Required => {
            s.push_str("\n\nYou must call at least one of the functions above.")
        }
        ToolChoice::Named(n) => {
            s.push_str(&format!("\n\nYou must call the function \"{n}\"."));
        }
        ToolChoice::None | ToolChoice::Auto => {}
    }
    s
}

/// An earlier assistant call as the model would have written it. `arguments` is the JSON
/// string of the OpenAI request; it is embedded as JSON when it parses, else as a string.
pub fn render_call(name: &str, arguments: &str) -> String {
    let args: Value =
        serde_json::from_str(arguments).unwrap_or_else(|_| Value::String(arguments.into()));
    let call = serde_json::json!({"name": name, "arguments": args});
    format!("{CALL_OPEN}\n{call}\n{CALL_CLOSE}")
}

/// A tool's result as it goes back to the model.
pub fn render_response(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// The model's output split into text and calls. When any `<tool_call>` block is malformed
/// (not closed, not a JSON object, no string `name`), the whole output stays text and no
/// call is returned.
pub fn parse_calls(output: &str, id_prefix: &str) -> (Option<String>, Vec<ToolCall>) {
    let Some(first) = output.find(CALL_OPEN) else {
        return (Some(output.to_string()), vec![]);
    };
    let mut calls = Vec::new();
    let mut rest = &output[first..];
    loop {
        let trimmed = rest.trim_start();
        if trimmed.is_empty() {
            break;
        }
        let Some(body) = trimmed.strip_prefix(CALL_OPEN) else {
            // Text after the calls: keep everything as text.
            return (Some(output.to_string()), vec![]);
        };
        let Some(end) = body.find(CALL_CLOSE) else {
            return (Some(output.to_string()), vec![]);
        };
        match parse_one(&body[..end]) {
            Some((name, arguments)) => calls.push(ToolCall {
                id: format!("{id_prefix}{}", calls.len()),
                kind: "function",
                function: FunctionCall { name, arguments },
            }),
            None => return (Some(output.to_string()), vec![]),
        }
        rest = &body[end + CALL_CLOSE.len()..];
    }
    let before = output[..first].trim();
    let content = (!before.is_empty()).then(|| before.to_string());
    (content, calls)
}

fn parse_one(json: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(json.trim()).ok()?;
    let obj = v.as_object()?;
    let name = obj.get("name")?.as_str()?.to_string();
    let arguments = match obj.get("arguments").or_else(|| obj.get("parameters")) {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    Some((name, arguments))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_call() {
        let out = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (content, calls) = parse_calls(out, "call_");
        assert_eq!(content, None);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].id, "call_0");
        assert_eq!(calls[0].function.name, "get_weather");
        let args: Value = serde_json::from_str(&calls[0].function.arguments).unwrap();
        assert_eq!(args, serde_json::json!({"city": "Paris"}));
    }

    #[test]
    fn text_before_and_two_calls() {
        let out = "Let me check.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n\
                   <tool_call>\n{\"name\": \"b\", \"arguments\": \"{\\\"x\\\": 1}\"}\n</tool_call>\n";
        let (content, calls) = parse_calls(out, "c");
        assert_eq!(content.as_deref(), Some("Let me check."));
        let names: Vec<_> = calls.iter().map(|c| c.function.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(calls[1].function.arguments, "{\"x\": 1}");
        assert_eq!(calls[1].id, "c1");
    }

    #[test]
    fn malformed_stays_text() {
        for out in [
            "<tool_call>\n{\"name\": \"a\", \"arguments\": {}\n</tool_call>", // bad JSON
            "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}",              // never closed
            "<tool_call>\n[1, 2]\n</tool_call>",                              // not an object
            "<tool_call>\n{\"arguments\": {}}\n</tool_call>",                 // no name
            "<tool_call>{\"name\": 3}</tool_call>",                           // name not a string
            "<tool_call>{\"name\": \"a\"}</tool_call> and then some text",
        ] {
            let (content, calls) = parse_calls(out, "c");
            assert!(calls.is_empty(), "{out}");
            assert_eq!(content.as_deref(), Some(out));
        }
    }

    #[test]
    fn plain_text_is_untouched() {
        let (content, calls) = parse_calls("The answer is 4.", "c");
        assert_eq!(content.as_deref(), Some("The answer is 4."));
        assert!(calls.is_empty());
    }

    #[test]
    fn prompt_pieces() {
        let tool = Tool {
            name: "f".into(),
            spec: serde_json::json!({"type": "function", "function": {"name": "f"}}),
        };
        let s = system_section(&[tool], &ToolChoice::Named("f".into()));
        assert!(s.starts_with("\n\n# Tools\n"));
        assert!(
            s.contains("<tools>\n{\"type\":\"function\",\"function\":{\"name\":\"f\"}}\n</tools>")
        );
        assert!(s.ends_with("You must call the function \"f\"."));
        assert_eq!(
            render_call("f", "{\"a\":1}"),
            "<tool_call>\n{\"name\":\"f\",\"arguments\":{\"a\":1}}\n</tool_call>"
        );
        assert_eq!(
            render_response("42"),
            "<tool_response>\n42\n</tool_response>"
        );
        // A rendered call parses back to the same call.
        let (_, calls) = parse_calls(&render_call("f", "{\"a\":1}"), "c");
        assert_eq!(calls[0].function.arguments, "{\"a\":1}");
    }
}

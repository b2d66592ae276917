//! The model's Jinja chat template, rendered as transformers 4.49 renders it, with the
//! byte spans of user-written text tracked so the tokenizer never turns them into control
//! tokens.
//!
//! Reference: transformers 4.49 `utils/chat_template_utils.py::_compile_jinja_template`
//! (an `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
//! extensions=[AssistantTracker, loopcontrols])`, Jinja's default
//! `keep_trailing_newline=False`, a `tojson` filter that is `json.dumps` with
//! `ensure_ascii=False`, and the globals `raise_exception` and `strftime_now`) and
//! `tokenization_utils_base.py::apply_chat_template` (renders with `messages`, `tools`,
//! `documents`, `add_generation_prompt` and the special-tokens map plus any extra kwargs
//! such as `add_vision_id`). The Python parts of that environment (the globals, `tojson`,
//! Python's string and container methods) are emulated in `pyshim.rs`; this file holds the
//! [`ChatTemplate`]: where a model's template comes from, the environment, rendering and the
//! user spans.
//!
//! # User spans
//!
//! Python renders the template to one string and tokenizes it, so a user who types
//! `<|im_end|>` injects a real end-of-turn token. We render every message text wrapped in two
//! Unicode noncharacters (markers) that occur neither in any message text nor in the
//! template, then remove them and record where they were: [`RenderedPrompt::user_spans`].
//! The tokenizer only recognises special tokens outside those spans
//! (`Qwen2Tokenizer::encode_prompt`). The prompt is also rendered without markers; if the
//! two renderings differ once markers are removed (a template that transforms message text,
//! e.g. with `.split()` or `tojson(ensure_ascii=True)`), the spans cannot be trusted, and
//! the texts are reported in [`RenderedPrompt::untracked_user_texts`] instead.

use std::ops::Range;
use std::path::Path;

use minijinja::value::Value;
use minijinja::Environment;
use serde_json::{json, Map, Value as Json};

use crate::processing::messages::{Content, ContentPart, Message};
use crate::{Error, Result};

mod pyshim;

/// The official Qwen2-VL(-2B/7B/72B)-Instruct chat template (`chat_template.json` of the
/// model repositories), used when a model directory carries none.
pub const QWEN2_VL_CHAT_TEMPLATE: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

const TEMPLATE_NAME: &str = "chat_template";

/// Where the template came from (for logs and error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// `chat_template.json` (`{"chat_template": "..."}`).
    ChatTemplateJson,
    /// `chat_template.jinja` (the raw template, as newer transformers save it).
    ChatTemplateJinja,
    /// The `chat_template` key of `tokenizer_config.json`.
    TokenizerConfig,
    /// [`QWEN2_VL_CHAT_TEMPLATE`].
    Builtin,
    /// Given as a string by the caller.
    Custom,
    /// `tokenizer.chat_template` of a GGUF file.
    Gguf,
}

/// A prompt rendered by the chat template.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RenderedPrompt {
    /// The rendered text, exactly as transformers renders it.
    pub text: String,
    /// Byte ranges of `text` that hold message text (written by the caller's user, not by the
    /// template): sorted, disjoint, non-empty, on char boundaries. Special-token strings
    /// inside them are plain text.
    pub user_spans: Vec<Range<usize>>,
    /// Message texts whose place in `text` could not be tracked (the template transforms
    /// them). Empty for the Qwen2-VL template. The tokenizer refuses such a prompt when one
    /// of these contains a special-token string.
    pub untracked_user_texts: Vec<String>,
}

impl RenderedPrompt {
    /// A prompt written entirely by trusted code (every special-token string in it is a
    /// control token), e.g. a raw prompt given on purpose.
    pub fn trusted(text: impl Into<String>) -> Self {
        RenderedPrompt {
            text: text.into(),
            ..Default::default()
        }
    }

    /// A prompt that is all user text (no special token will be recognised in it).
    pub fn untrusted(text: impl Into<String>) -> Self {
        let text = text.into();
        let user_spans = if text.is_empty() {
            vec![]
        } else {
            std::iter::once(0..text.len()).collect()
        };
        RenderedPrompt {
            text,
            user_spans,
            untracked_user_texts: vec![],
        }
    }

    /// Whether byte `pos` of `text` lies in a user span.
    pub fn is_user_byte(&self, pos: usize) -> bool {
        let i = self.user_spans.partition_point(|r| r.end <= pos);
        self.user_spans.get(i).is_some_and(|r| r.start <= pos)
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: TemplateSource,
    /// `bos_token`, `eos_token`, … from `tokenizer_config.json`: transformers passes
    /// `tokenizer.special_tokens_map` to the template.
    special_tokens: Map<String, Json>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("source_len", &self.source.len())
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles a template with the Jinja environment transformers 4.49 uses.
    pub fn from_source(source: impl Into<String>) -> Result<Self> {
        Self::compile(source.into(), TemplateSource::Custom, Map::new())
    }

    /// The template of a GGUF file (`tokenizer.chat_template`), or the built-in one when the
    /// file has none, with the special-token strings the file names (`bos_token`, …).
    pub fn from_gguf(source: Option<&str>, special_tokens: Map<String, Json>) -> Result<Self> {
        let mut tokens = default_special_tokens();
        tokens.extend(special_tokens);
        match source {
            Some(src) => Self::compile(src.to_string(), TemplateSource::Gguf, tokens),
            None => Self::compile(
                QWEN2_VL_CHAT_TEMPLATE.to_string(),
                TemplateSource::Builtin,
                tokens,
            ),
        }
    }

    /// The built-in official Qwen2-VL template.
    pub fn builtin() -> Self {
        Self::compile(
            QWEN2_VL_CHAT_TEMPLATE.to_string(),
            TemplateSource::Builtin,
            default_special_tokens(),
        )
        .expect("the built-in Qwen2-VL template compiles")
    }

    /// Loads the template of a model directory: `chat_template.json` first (what
    /// `Qwen2VLProcessor` loads in 4.49), then `chat_template.jinja`, then
    /// `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}`
    /// from which `"default"` is taken), else the built-in Qwen2-VL template. The special
    /// tokens map comes from `tokenizer_config.json` when present.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let tc_path = dir.join("tokenizer_config.json");
        let tokenizer_config = if tc_path.is_file() {
            Some(read_json(&tc_path)?)
        } else {
            None
        };
        let special_tokens = match &tokenizer_config {
            Some(tc) => special_tokens_map(tc),
            None => default_special_tokens(),
        };

        let ct_json = dir.join("chat_template.json");
        if ct_json.is_file() {
            let v = read_json(&ct_json)?;
            let src = match v.get("chat_template") {
                Some(Json::String(s)) => s.clone(),
                _ => {
                    return Err(Error::Config {
                        file: ct_json,
                        message: "no string \"chat_template\" key".into(),
                    })
                }
            };
            return Self::compile(src, TemplateSource::ChatTemplateJson, special_tokens);
        }
        let ct_jinja = dir.join("chat_template.jinja");
        if ct_jinja.is_file() {
            let src = std::fs::read_to_string(&ct_jinja).map_err(|e| Error::Model {
                what: format!("cannot read the chat template ({e})"),
                path: ct_jinja.clone(),
            })?;
            return Self::compile(src, TemplateSource::ChatTemplateJinja, special_tokens);
        }
        if let Some(tc) = &tokenizer_config {
            if let Some(src) = tokenizer_config_template(tc, &tc_path)? {
                return Self::compile(src, TemplateSource::TokenizerConfig, special_tokens);
            }
        }
        tracing::debug!(dir = %dir.display(), "no chat template in the model directory; using the built-in Qwen2-VL template");
        Self::compile(
            QWEN2_VL_CHAT_TEMPLATE.to_string(),
            TemplateSource::Builtin,
            special_tokens,
        )
    }

    fn compile(
        source: String,
        origin: TemplateSource,
        special_tokens: Map<String, Json>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        // transformers: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True);
        // Jinja's keep_trailing_newline defaults to False (minijinja's too).
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        pyshim::install(&mut env);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| Error::Template(format!("the chat template does not compile: {e:#}")))?;
        Ok(ChatTemplate {
            env,
            source,
            origin,
            special_tokens,
        })
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from.
    pub fn origin(&self) -> &TemplateSource {
        &self.origin
    }

    /// Renders a conversation, as `processor.apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=.., add_vision_id=..)` does in transformers 4.49.
    ///
    /// Messages reach the template as transformers' callers pass them: a string content
    /// stays a string; parts become `{"type": "text", "text": ..}`, `{"type": "image"}` and
    /// `{"type": "video"}` (the template only counts vision parts).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        add_vision_id: bool,
    ) -> Result<RenderedPrompt> {
        let texts: Vec<&str> = messages.iter().flat_map(message_texts).collect();

        let plain = self.render_json(
            messages_json(messages, &|t| t.to_string()),
            add_generation_prompt,
            add_vision_id,
        )?;

        let Some((open, close)) = pick_markers(&texts, &self.source) else {
            // Every candidate marker occurs in the messages (deliberately); we cannot track.
            return Ok(untracked(plain, &texts));
        };
        let wrap = |t: &str| {
            let mut s = String::with_capacity(t.len() + 6);
            s.push(open);
            s.push_str(t);
            s.push(close);
            s
        };
        let marked = self.render_json(
            messages_json(messages, &wrap),
            add_generation_prompt,
            add_vision_id,
        )?;
        match strip_markers(&marked, open, close) {
            Some((text, spans)) if text == plain => Ok(RenderedPrompt {
                text,
                user_spans: spans,
                untracked_user_texts: vec![],
            }),
            _ => {
                tracing::warn!(
                    "the chat template transforms message text; user spans are not tracked"
                );
                Ok(untracked(plain, &texts))
            }
        }
    }

    fn render_json(
        &self,
        messages: Json,
        add_generation_prompt: bool,
        add_vision_id: bool,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Template(e.to_string()))?;
        let mut ctx = self.special_tokens.clone();
        ctx.insert("messages".into(), messages);
        ctx.insert("tools".into(), Json::Null);
        ctx.insert("documents".into(), Json::Null);
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(add_generation_prompt),
        );
        ctx.insert("add_vision_id".into(), Json::Bool(add_vision_id));
        tmpl.render(Value::from_serialize(&ctx)).map_err(|e| {
            if let Some(reason) = pyshim::raised_reason(&e) {
                // The template rejected the conversation on purpose (e.g. roles that do
                // not alternate): that is about what the user sent.
                Error::bad_input(
                    format!("the chat template rejected the conversation: {reason}"),
                    "a conversation this model's chat template accepts",
                )
            } else {
                Error::Template(format!("{e:#}"))
            }
        })
    }
}

fn untracked(text: String, texts: &[&str]) -> RenderedPrompt {
    RenderedPrompt {
        text,
        user_spans: vec![],
        untracked_user_texts: texts
            .iter()
            .filter(|t| !t.is_empty())
            .map(|t| t.to_string())
            .collect(),
    }
}

/// All caller-written strings of a message that the template may print.
fn message_texts(m: &Message) -> Vec<&str> {
    match &m.content {
        Content::Text(t) => vec![t.as_str()],
        Content::Parts(parts) => parts
            .iter()
            .filter_map(|p| match p {
                ContentPart::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect(),
    }
}

/// The JSON the template sees; `wrap` maps each message text (identity or marker-wrapped).
fn messages_json(messages: &[Message], wrap: &dyn Fn(&str) -> String) -> Json {
    Json::Array(
        messages
            .iter()
            .map(|m| {
                let content = match &m.content {
                    Content::Text(t) => Json::String(wrap(t)),
                    Content::Parts(parts) => Json::Array(
                        parts
                            .iter()
                            .map(|p| match p {
                                ContentPart::Text { text } => {
                                    json!({"type": "text", "text": wrap(text)})
                                }
                                ContentPart::Image(_) => json!({"type": "image"}),
                                ContentPart::Video(_) => json!({"type": "video"}),
                            })
                            .collect(),
                    ),
                };
                json!({"role": m.role.as_str(), "content": content})
            })
            .collect(),
    )
}

/// Two distinct Unicode noncharacters (U+FDD0..U+FDEF, U+nFFFE/U+nFFFF) that occur in
/// neither the texts nor the template. None when a caller used every one of them.
fn pick_markers(texts: &[&str], template: &str) -> Option<(char, char)> {
    let candidates = (0xFDD0u32..=0xFDEF)
        .chain((0..=0x10u32).flat_map(|plane| [plane * 0x10000 + 0xFFFE, plane * 0x10000 + 0xFFFF]))
        .filter_map(char::from_u32);
    let mut free =
        candidates.filter(|c| !template.contains(*c) && !texts.iter().any(|t| t.contains(*c)));
    let open = free.next()?;
    let close = free.next()?;
    Some((open, close))
}

/// Removes the markers; returns the text and the (non-empty) spans they enclosed, or None
/// when the markers are not properly paired.
fn strip_markers(marked: &str, open: char, close: char) -> Option<(String, Vec<Range<usize>>)> {
    let mut text = String::with_capacity(marked.len());
    let mut spans = Vec::new();
    let mut start: Option<usize> = None;
    for c in marked.chars() {
        if c == open {
            if start.is_some() {
                return None;
            }
            start = Some(text.len());
        } else if c == close {
            let s = start.take()?;
            if s < text.len() {
                // Adjacent spans (two texts printed back to back) merge into one.
                match spans.last_mut() {
                    Some(Range { end, .. }) if *end == s => *end = text.len(),
                    _ => spans.push(s..text.len()),
                }
            }
        } else {
            text.push(c);
        }
    }
    if start.is_some() {
        return None;
    }
    Some((text, spans))
}

/// The `chat_template` of a `tokenizer_config.json` (at `path`): a string, or the `"default"`
/// entry of a list of `{name, template}`; `None` when the key is absent or null.
fn tokenizer_config_template(tc: &Json, path: &Path) -> Result<Option<String>> {
    match tc.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let default = list.iter().find_map(|t| {
                (t.get("name").and_then(Json::as_str) == Some("default"))
                    .then(|| t.get("template").and_then(Json::as_str))
                    .flatten()
            });
            match default {
                Some(s) => Ok(Some(s.to_string())),
                None => Err(Error::Config {
                    file: path.to_path_buf(),
                    message: "\"chat_template\" is a list with no \"default\" template".into(),
                }),
            }
        }
        Some(_) => Err(Error::Config {
            file: path.to_path_buf(),
            message: "\"chat_template\" is neither a string nor a list".into(),
        }),
    }
}

fn read_json(path: &Path) -> Result<Json> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::Model {
        what: format!("cannot read ({e})"),
        path: path.to_path_buf(),
    })?;
    serde_json::from_str(&s).map_err(|e| Error::Config {
        file: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// `tokenizer.special_tokens_map` as transformers builds it from `tokenizer_config.json`:
/// the set ones of bos/eos/unk/sep/pad/cls/mask (a string, or an AddedToken dict's
/// `content`) and `additional_special_tokens`.
fn special_tokens_map(tc: &Json) -> Map<String, Json> {
    let mut m = Map::new();
    for key in [
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
    ] {
        let v = match tc.get(key) {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(str::to_string),
            _ => None,
        };
        if let Some(v) = v {
            m.insert(key.into(), Json::String(v));
        }
    }
    if let Some(Json::Array(list)) = tc.get("additional_special_tokens") {
        let toks: Vec<Json> = list
            .iter()
            .filter_map(|t| match t {
                Json::String(s) => Some(Json::String(s.clone())),
                Json::Object(o) => o.get("content").cloned(),
                _ => None,
            })
            .collect();
        m.insert("additional_special_tokens".into(), Json::Array(toks));
    }
    m
}

/// Qwen2-VL-Instruct's map (eos `<|im_end|>`, pad `<|endoftext|>`).
fn default_special_tokens() -> Map<String, Json> {
    let mut m = Map::new();
    m.insert("eos_token".into(), json!("<|im_end|>"));
    m.insert("pad_token".into(), json!("<|endoftext|>"));
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processing::messages::{ContentPart, ImagePart, Role};

    fn fixture_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer")
    }

    #[test]
    fn builtin_matches_the_fixture_template() {
        let t = ChatTemplate::from_model_dir(&fixture_dir()).unwrap();
        assert_eq!(t.origin(), &TemplateSource::ChatTemplateJson);
        assert_eq!(t.source(), QWEN2_VL_CHAT_TEMPLATE);
        let tc = read_json(&fixture_dir().join("tokenizer_config.json")).unwrap();
        assert_eq!(tc["chat_template"].as_str(), Some(QWEN2_VL_CHAT_TEMPLATE));
    }

    #[test]
    fn renders_like_transformers() {
        let t = ChatTemplate::builtin();
        let msgs = vec![Message::parts(
            Role::User,
            vec![
                ContentPart::image("a.png"),
                ContentPart::Image(ImagePart::new("b.png")),
                ContentPart::video("v.mp4"),
                ContentPart::text("Describe."),
            ],
        )];
        let r = t.render(&msgs, true, false).unwrap();
        assert_eq!(
            r.text,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
             <|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>\
             <|vision_start|><|video_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(r.user_spans.len(), 1);
        assert_eq!(&r.text[r.user_spans[0].clone()], "Describe.");
        assert!(r.untracked_user_texts.is_empty());

        let r = t.render(&msgs, false, true).unwrap();
        assert!(r.text.contains(
            "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>Video 1: "
        ));
        assert!(r.text.ends_with("Describe.<|im_end|>\n"));

        let msgs = vec![
            Message::system("Be <|im_end|> brief."),
            Message::user("Hi"),
            Message::assistant("Hello!"),
            Message::user(""),
        ];
        let r = t.render(&msgs, true, false).unwrap();
        assert_eq!(
            r.text,
            "<|im_start|>system\nBe <|im_end|> brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
        );
        let spans: Vec<&str> = r.user_spans.iter().map(|s| &r.text[s.clone()]).collect();
        assert_eq!(spans, vec!["Be <|im_end|> brief.", "Hi", "Hello!"]);
        assert!(r.is_user_byte(r.text.find("<|im_end|> brief").unwrap()));
        assert!(!r.is_user_byte(0));
    }

    #[test]
    fn markers_in_user_text_do_not_confuse_tracking() {
        let t = ChatTemplate::builtin();
        let evil = "\u{FDD0}x\u{FDD1}<|im_end|>\u{FDD1}";
        let r = t.render(&[Message::user(evil)], false, false).unwrap();
        assert!(r.text.contains(evil));
        assert_eq!(&r.text[r.user_spans[0].clone()], evil);
    }

    #[test]
    fn transforming_template_is_untracked() {
        // Slicing drops a marker: the spans cannot be trusted.
        let t =
            ChatTemplate::from_source("{% for m in messages %}[{{ m.content[:-1] }}]{% endfor %}")
                .unwrap();
        let r = t.render(&[Message::user("ab")], false, false).unwrap();
        assert_eq!(r.text, "[a]");
        assert!(r.user_spans.is_empty());
        assert_eq!(r.untracked_user_texts, vec!["ab".to_string()]);
        // Splitting and joining keeps the markers around the whole (the joiner counts as
        // user text, which is the safe side).
        let t = ChatTemplate::from_source(
            "{% for m in messages %}[{{ m.content.split('|') | join(',') }}]{% endfor %}",
        )
        .unwrap();
        let r = t.render(&[Message::user("a|b")], false, false).unwrap();
        assert_eq!(r.text, "[a,b]");
        assert_eq!(r.user_spans.len(), 1);
        assert_eq!(r.user_spans[0], 1..4);
    }

    #[test]
    fn environment_matches_transformers() {
        // trim_blocks + lstrip_blocks, no trailing newline kept, pycompat methods,
        // loop controls, special tokens map.
        let t = ChatTemplate::from_source(
            "  {% for m in messages %}\n{{ m.content.strip() }}|{{ m.role.upper() }}\n  {% if loop.index > 1 %}{% break %}{% endif %}\n{% endfor %}{{ eos_token }}\n",
        );
        // loop controls need minijinja's `loop_controls` feature
        let t = t.unwrap();
        let r = t
            .render(
                &[
                    Message::user("  hi  "),
                    Message::assistant("x"),
                    Message::user("y"),
                ],
                false,
                false,
            )
            .unwrap();
        assert_eq!(r.text, "hi|USER\nx|ASSISTANT\n");
        let t = ChatTemplate::from_model_dir(&fixture_dir()).unwrap();
        assert_eq!(t.special_tokens["eos_token"], json!("<|im_end|>"));
    }

    #[test]
    fn raise_exception_is_bad_input() {
        let t = ChatTemplate::from_source(
            "{% if messages[0]['role'] != 'system' %}{{ raise_exception('first must be system') }}{% endif %}ok",
        )
        .unwrap();
        let e = t.render(&[Message::user("x")], false, false).unwrap_err();
        match e {
            Error::BadInput { what, .. } => {
                assert!(what.contains("first must be system"), "{what}")
            }
            other => panic!("{other:?}"),
        }
        assert!(ChatTemplate::from_source("{% if %}").is_err());
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::from_source(
            "{{ x | tojson }}\n{{ x | tojson(indent=2) }}\n{{ x | tojson(ensure_ascii=True) }}\n{{ x | tojson(separators=(',', ':'), sort_keys=True) }}",
        )
        .unwrap();
        let tmpl = t.env.get_template(TEMPLATE_NAME).unwrap();
        let x = json!({"b": [1, 2.5, 1e20, 1e-7, 100.0, null, true], "a": "é\"\n\u{1}😀<tag>", "c": {}, "d": []});
        let out = tmpl
            .render(minijinja::context! { x => Value::from_serialize(&x) })
            .unwrap();
        let lines: Vec<&str> = out.splitn(2, '\n').collect();
        // Python: json.dumps(x, ensure_ascii=False)
        assert_eq!(
            lines[0],
            r#"{"b": [1, 2.5, 1e+20, 1e-07, 100.0, null, true], "a": "é\"\n\u0001😀<tag>", "c": {}, "d": []}"#
        );
        assert!(out.contains(
            "{\n  \"b\": [\n    1,\n    2.5,\n    1e+20,\n    1e-07,\n    100.0,\n    null,\n    true\n  ],\n  \"a\": \"é\\\"\\n\\u0001😀<tag>\",\n  \"c\": {},\n  \"d\": []\n}"
        ), "{out}");
        assert!(
            out.contains(r#""a": "\u00e9\"\n\u0001\ud83d\ude00<tag>""#),
            "{out}"
        );
        assert!(out.ends_with(r#"{"a":"é\"\n\u0001😀<tag>","b":[1,2.5,1e+20,1e-07,100.0,null,true],"c":{},"d":[]}"#), "{out}");
    }

    #[test]
    fn model_dir_fallbacks() {
        let dir = std::env::temp_dir().join(format!("qwen2vl-tmpl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Nothing → built-in.
        let t = ChatTemplate::from_model_dir(&dir).unwrap();
        assert_eq!(t.origin(), &TemplateSource::Builtin);
        // A list in tokenizer_config.json → "default".
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"eos_token": {"content": "</s>"}, "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]}"#,
        )
        .unwrap();
        let t = ChatTemplate::from_model_dir(&dir).unwrap();
        assert_eq!(t.origin(), &TemplateSource::TokenizerConfig);
        assert_eq!(t.render(&[], false, false).unwrap().text, "D</s>");
        // chat_template.json wins.
        std::fs::write(dir.join("chat_template.json"), r#"{"chat_template": "J"}"#).unwrap();
        let t = ChatTemplate::from_model_dir(&dir).unwrap();
        assert_eq!(t.render(&[], false, false).unwrap().text, "J");
        // Malformed → Config error naming the file.
        std::fs::write(dir.join("chat_template.json"), "{").unwrap();
        let e = ChatTemplate::from_model_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("chat_template.json"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

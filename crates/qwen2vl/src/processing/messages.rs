//! Conversation types: messages with text, image and video parts.
//!
//! The JSON form is the one `qwen-vl-utils` 0.0.8 (`process_vision_info`,
//! `extract_vision_info`) and the Qwen2-VL chat template read, plus the OpenAI chat form:
//!
//! ```json
//! {"role": "user", "content": [
//!     {"type": "image", "image": "file:///tmp/cat.png", "max_pixels": 602112},
//!     {"type": "image_url", "image_url": {"url": "https://example.com/dog.jpg"}},
//!     {"type": "video", "video": ["f1.png", "f2.png"], "fps": 1.0},
//!     {"type": "text", "text": "Compare them."}
//! ]}
//! ```
//!
//! A part without `"type"` is classified by its keys, as the chat template does
//! (`content['type'] == 'image' or 'image' in content or 'image_url' in content`, then
//! video, then `'text' in content`). Unknown keys are ignored, as qwen-vl-utils ignores them.

use std::fmt;

use serde::de::Error as _;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Who wrote a message (the `role` of a ChatML turn).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the assistant; the template adds a default one when the first message
    /// is not a system message.
    System,
    /// The person talking to the model.
    User,
    /// The model (earlier turns of the conversation).
    Assistant,
    /// A tool's answer.
    Tool,
}

impl Role {
    /// The role as the template sees it (`"user"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// What it says. A missing or `null` content (an OpenAI assistant turn that only called a
    /// tool) is the empty string.
    #[serde(default, deserialize_with = "content_or_null")]
    pub content: Content,
}

fn content_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<Content, D::Error> {
    Ok(Option::<Content>::deserialize(d)?.unwrap_or_default())
}

impl Message {
    /// A message whose content is one plain string.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Message {
            role,
            content: Content::Text(text.into()),
        }
    }

    /// A system message with plain text.
    pub fn system(text: impl Into<String>) -> Self {
        Self::text(Role::System, text)
    }

    /// A user message with plain text.
    pub fn user(text: impl Into<String>) -> Self {
        Self::text(Role::User, text)
    }

    /// An assistant message with plain text.
    pub fn assistant(text: impl Into<String>) -> Self {
        Self::text(Role::Assistant, text)
    }

    /// A message made of parts.
    pub fn parts(role: Role, parts: Vec<ContentPart>) -> Self {
        Message {
            role,
            content: Content::Parts(parts),
        }
    }

    /// The message's parts in order (a plain-string content is one text part).
    pub fn iter_parts(&self) -> impl Iterator<Item = PartRef<'_>> {
        let (text, parts): (Option<&str>, &[ContentPart]) = match &self.content {
            Content::Text(t) => (Some(t.as_str()), &[]),
            Content::Parts(p) => (None, p.as_slice()),
        };
        text.map(PartRef::Text)
            .into_iter()
            .chain(parts.iter().map(|p| match p {
                ContentPart::Text { text } => PartRef::Text(text.as_str()),
                ContentPart::Image(i) => PartRef::Image(i),
                ContentPart::Video(v) => PartRef::Video(v),
            }))
    }

    /// The images of this message, in order.
    pub fn images(&self) -> impl Iterator<Item = &ImagePart> {
        self.iter_parts().filter_map(|p| match p {
            PartRef::Image(i) => Some(i),
            _ => None,
        })
    }

    /// The videos of this message, in order.
    pub fn videos(&self) -> impl Iterator<Item = &VideoPart> {
        self.iter_parts().filter_map(|p| match p {
            PartRef::Video(v) => Some(v),
            _ => None,
        })
    }
}

/// A borrowed view of one part of a message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PartRef<'a> {
    /// Text.
    Text(&'a str),
    /// An image.
    Image(&'a ImagePart),
    /// A video.
    Video(&'a VideoPart),
}

/// A vision input (image or video) in conversation order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VisionRef<'a> {
    /// An image.
    Image(&'a ImagePart),
    /// A video.
    Video(&'a VideoPart),
}

/// The images across all messages, in the order the template renders them — the order of
/// `process_vision_info`'s `image_inputs` (qwen-vl-utils `extract_vision_info`).
pub fn images(messages: &[Message]) -> impl Iterator<Item = &ImagePart> {
    messages.iter().flat_map(|m| m.images())
}

/// The videos across all messages, in order (qwen-vl-utils' `video_inputs`).
pub fn videos(messages: &[Message]) -> impl Iterator<Item = &VideoPart> {
    messages.iter().flat_map(|m| m.videos())
}

/// Images and videos across all messages, interleaved in conversation order.
pub fn vision_inputs(messages: &[Message]) -> impl Iterator<Item = VisionRef<'_>> {
    messages.iter().flat_map(|m| {
        m.iter_parts().filter_map(|p| match p {
            PartRef::Image(i) => Some(VisionRef::Image(i)),
            PartRef::Video(v) => Some(VisionRef::Video(v)),
            PartRef::Text(_) => None,
        })
    })
}

/// A message's content: a plain string or a list of parts (the template distinguishes the
/// two with `message['content'] is string`, and so do we when rendering).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Text, images and videos in order.
    Parts(Vec<ContentPart>),
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(Content::Text(s)),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    match item {
                        Value::Object(map) => part_from_map(map),
                        other => Err(format!(
                            "a content part must be a JSON object, got {}; allowed: {PART_KINDS}",
                            kind_of(other)
                        )),
                    }
                    .map_err(|e| D::Error::custom(format!("content part {}: {e}", i + 1)))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Content::Parts),
            other => Err(D::Error::custom(format!(
                "message content must be a string or a list of parts, got {}",
                kind_of(&other)
            ))),
        }
    }
}

impl Default for Content {
    fn default() -> Self {
        Content::Text(String::new())
    }
}

impl From<&str> for Content {
    fn from(s: &str) -> Self {
        Content::Text(s.to_string())
    }
}

impl From<String> for Content {
    fn from(s: String) -> Self {
        Content::Text(s)
    }
}

impl From<Vec<ContentPart>> for Content {
    fn from(p: Vec<ContentPart>) -> Self {
        Content::Parts(p)
    }
}

/// One part of a message's content.
#[derive(Debug, Clone, PartialEq)]
pub enum ContentPart {
    /// Text.
    Text {
        /// The text, as the user wrote it.
        text: String,
    },
    /// An image with optional per-image resize options.
    Image(ImagePart),
    /// A video with optional sampling and resize options.
    Video(VideoPart),
}

impl ContentPart {
    /// A text part.
    pub fn text(text: impl Into<String>) -> Self {
        ContentPart::Text { text: text.into() }
    }

    /// An image part with no options.
    pub fn image(source: impl Into<ImageSource>) -> Self {
        ContentPart::Image(ImagePart::new(source))
    }

    /// A video part with no options.
    pub fn video(source: impl Into<VideoSource>) -> Self {
        ContentPart::Video(VideoPart::new(source))
    }
}

/// An image and the options qwen-vl-utils' `fetch_image` reads from its dict.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ImagePart {
    /// Where the image comes from.
    pub source: ImageSource,
    /// Lower bound on the resized pixel count (`min_pixels`).
    pub min_pixels: Option<u64>,
    /// Upper bound on the resized pixel count (`max_pixels`).
    pub max_pixels: Option<u64>,
    /// Exact target height (`resized_height`, rounded to a multiple of 28 by `smart_resize`).
    pub resized_height: Option<usize>,
    /// Exact target width (`resized_width`).
    pub resized_width: Option<usize>,
}

impl ImagePart {
    /// An image with no options.
    pub fn new(source: impl Into<ImageSource>) -> Self {
        ImagePart {
            source: source.into(),
            ..Default::default()
        }
    }
}

/// A video and the options qwen-vl-utils' `fetch_video` / `smart_nframes` read from its dict.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VideoPart {
    /// A video file/URL, or a list of frame images.
    pub source: VideoSource,
    /// Frames per second to sample (`fps`; default 2.0 in qwen-vl-utils).
    pub fps: Option<f64>,
    /// Exact number of frames to sample (`nframes`; excludes `fps`).
    pub nframes: Option<usize>,
    /// Lower bound on sampled frames (`min_frames`).
    pub min_frames: Option<usize>,
    /// Upper bound on sampled frames (`max_frames`).
    pub max_frames: Option<usize>,
    /// Lower bound on pixels per frame (`min_pixels`).
    pub min_pixels: Option<u64>,
    /// Upper bound on pixels per frame (`max_pixels`).
    pub max_pixels: Option<u64>,
    /// Budget of pixels over all frames (`total_pixels`).
    pub total_pixels: Option<u64>,
    /// Exact frame height (`resized_height`).
    pub resized_height: Option<usize>,
    /// Exact frame width (`resized_width`).
    pub resized_width: Option<usize>,
    /// Start of the clip in seconds (`video_start`).
    pub video_start: Option<f64>,
    /// End of the clip in seconds (`video_end`).
    pub video_end: Option<f64>,
}

impl VideoPart {
    /// A video with no options.
    pub fn new(source: impl Into<VideoSource>) -> Self {
        VideoPart {
            source: source.into(),
            ..Default::default()
        }
    }
}

/// Where an image comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A local path, a `file://` URL, an `http(s)://` URL or a `data:` URI (see [`Location`]).
    Uri(String),
    /// Encoded image bytes (PNG, JPEG, …) handed over directly by a library user.
    Bytes(Vec<u8>),
}

impl Default for ImageSource {
    fn default() -> Self {
        ImageSource::Uri(String::new())
    }
}

impl fmt::Debug for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::Uri(s) => {
                // data: URIs can be megabytes; show their head only.
                let head: String = s.chars().take(80).collect();
                if head.len() < s.len() {
                    write!(f, "Uri({head:?}…)")
                } else {
                    write!(f, "Uri({s:?})")
                }
            }
            ImageSource::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
        }
    }
}

impl From<&str> for ImageSource {
    fn from(s: &str) -> Self {
        ImageSource::Uri(s.to_string())
    }
}

impl From<String> for ImageSource {
    fn from(s: String) -> Self {
        ImageSource::Uri(s)
    }
}

impl From<Vec<u8>> for ImageSource {
    fn from(b: Vec<u8>) -> Self {
        ImageSource::Bytes(b)
    }
}

/// Where a video comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VideoSource {
    /// A video file: path, `file://` or `http(s)://` URL.
    Uri(String),
    /// Frames given as images (paths or URLs), in order (qwen-vl-utils: `"video": [..]`).
    Frames(Vec<String>),
}

impl Default for VideoSource {
    fn default() -> Self {
        VideoSource::Uri(String::new())
    }
}

impl From<&str> for VideoSource {
    fn from(s: &str) -> Self {
        VideoSource::Uri(s.to_string())
    }
}

impl From<String> for VideoSource {
    fn from(s: String) -> Self {
        VideoSource::Uri(s)
    }
}

impl From<Vec<String>> for VideoSource {
    fn from(f: Vec<String>) -> Self {
        VideoSource::Frames(f)
    }
}

/// What a source string points at, classified as qwen-vl-utils' `fetch_image` does
/// (`http://`/`https://` → download, `file://` → strip the scheme, `data:image` → base64,
/// anything else → a local path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location<'a> {
    /// A local path (the `file://` prefix already removed).
    Path(&'a str),
    /// An `http://` or `https://` URL.
    Http(&'a str),
    /// A `data:` URI: its media type (may be empty) and its payload after the comma.
    Data {
        /// The part between `data:` and the first `;` or `,` (e.g. `image/png`).
        media_type: &'a str,
        /// Whether the payload is base64 (`;base64,`).
        base64: bool,
        /// The text after the first comma.
        payload: &'a str,
    },
}

impl<'a> Location<'a> {
    /// Classifies a source string. Scheme matching ignores ASCII case.
    pub fn parse(s: &'a str) -> Location<'a> {
        let lower_starts = |p: &str| s.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p));
        if lower_starts("http://") || lower_starts("https://") {
            Location::Http(s)
        } else if lower_starts("file://") {
            Location::Path(&s["file://".len()..])
        } else if lower_starts("data:") {
            let rest = &s["data:".len()..];
            let (meta, payload) = rest.split_once(',').unwrap_or((rest, ""));
            let media_type = meta.split(';').next().unwrap_or("");
            let base64 = meta
                .split(';')
                .skip(1)
                .any(|p| p.eq_ignore_ascii_case("base64"));
            Location::Data {
                media_type,
                base64,
                payload,
            }
        } else {
            Location::Path(s)
        }
    }
}

// ---------------------------------------------------------------------------------------
// JSON: deserialize by hand so a bad part gets a message naming the key and what is allowed.

const PART_KINDS: &str =
    "parts {\"type\": \"text\", \"text\": ..}, {\"type\": \"image\", \"image\": ..}, \
{\"type\": \"image_url\", \"image_url\": {\"url\": ..}}, {\"type\": \"video\", \"video\": ..} or \
{\"type\": \"video_url\", \"video_url\": {\"url\": ..}}";

impl<'de> Deserialize<'de> for ContentPart {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        let Value::Object(map) = v else {
            return Err(D::Error::custom(format!(
                "a content part must be a JSON object; allowed: {PART_KINDS}"
            )));
        };
        part_from_map(&map).map_err(D::Error::custom)
    }
}

fn part_from_map(map: &Map<String, Value>) -> Result<ContentPart, String> {
    let ty = match map.get("type") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(other) => {
            return Err(format!(
                "content part \"type\" must be a string, got {other}"
            ))
        }
    };
    let has = |k: &str| map.contains_key(k);
    // Same precedence as the Qwen2-VL chat template: image, then video, then text.
    if ty == Some("image") || ty == Some("image_url") || has("image") || has("image_url") {
        let source = image_source(map)?;
        Ok(ContentPart::Image(ImagePart {
            source,
            min_pixels: opt_u64(map, "min_pixels")?,
            max_pixels: opt_u64(map, "max_pixels")?,
            resized_height: opt_usize(map, "resized_height")?,
            resized_width: opt_usize(map, "resized_width")?,
        }))
    } else if ty == Some("video") || ty == Some("video_url") || has("video") || has("video_url") {
        let source = video_source(map)?;
        Ok(ContentPart::Video(VideoPart {
            source,
            fps: opt_f64(map, "fps")?,
            nframes: opt_usize(map, "nframes")?,
            min_frames: opt_usize(map, "min_frames")?,
            max_frames: opt_usize(map, "max_frames")?,
            min_pixels: opt_u64(map, "min_pixels")?,
            max_pixels: opt_u64(map, "max_pixels")?,
            total_pixels: opt_u64(map, "total_pixels")?,
            resized_height: opt_usize(map, "resized_height")?,
            resized_width: opt_usize(map, "resized_width")?,
            video_start: opt_f64(map, "video_start")?,
            video_end: opt_f64(map, "video_end")?,
        }))
    } else if has("text") || ty == Some("text") {
        match map.get("text") {
            Some(Value::String(s)) => Ok(ContentPart::Text { text: s.clone() }),
            Some(other) => Err(format!(
                "a text part's \"text\" must be a string, got {}",
                kind_of(other)
            )),
            None => Err("a text part has no \"text\"".to_string()),
        }
    } else {
        match ty {
            Some(t) => Err(format!(
                "content part type {t:?} is not supported; allowed: {PART_KINDS}"
            )),
            None => Err(format!(
                "a content part has neither \"type\" nor an \"image\", \"video\" or \"text\" key; \
                 allowed: {PART_KINDS}"
            )),
        }
    }
}

/// How a JSON value's type is named in error messages ("a string", "a list", …).
pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// `"image": "..."`, or `"image_url": "..."` (qwen-vl-utils), or
/// `"image_url": {"url": "..."}` (OpenAI).
fn image_source(map: &Map<String, Value>) -> Result<ImageSource, String> {
    let v = map
        .get("image")
        .filter(|v| !v.is_null())
        .or_else(|| map.get("image_url").filter(|v| !v.is_null()));
    match v {
        Some(Value::String(s)) => Ok(ImageSource::Uri(s.clone())),
        Some(Value::Object(o)) => match o.get("url") {
            Some(Value::String(s)) => Ok(ImageSource::Uri(s.clone())),
            _ => Err("an image part's \"image_url\" object has no string \"url\"".to_string()),
        },
        Some(other) => Err(format!(
            "an image part's source must be a string (path, file:// or http(s) URL, data: URI), \
             got {}",
            kind_of(other)
        )),
        None => Err("an image part has no \"image\" or \"image_url\"".to_string()),
    }
}

/// `"video": "path"`, `"video": ["f1.png", ..]`, or `"video_url": {"url": ".."}`.
fn video_source(map: &Map<String, Value>) -> Result<VideoSource, String> {
    let v = map
        .get("video")
        .filter(|v| !v.is_null())
        .or_else(|| map.get("video_url").filter(|v| !v.is_null()));
    match v {
        Some(Value::String(s)) => Ok(VideoSource::Uri(s.clone())),
        Some(Value::Object(o)) => match o.get("url") {
            Some(Value::String(s)) => Ok(VideoSource::Uri(s.clone())),
            _ => Err("a video part's \"video_url\" object has no string \"url\"".to_string()),
        },
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, f)| match f {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "frame {} of a video part must be a string (path or URL), got {}",
                    i + 1,
                    kind_of(other)
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(VideoSource::Frames),
        Some(other) => Err(format!(
            "a video part's source must be a string or a list of frame strings, got {}",
            kind_of(other)
        )),
        None => Err("a video part has no \"video\" or \"video_url\"".to_string()),
    }
}

fn opt_f64(map: &Map<String, Value>, key: &str) -> Result<Option<f64>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(format!("\"{key}\" must be a finite number")),
        },
        Some(other) => Err(format!(
            "\"{key}\" must be a number, got {}",
            kind_of(other)
        )),
    }
}

/// A non-negative integer; an integral float such as `3136.0` is accepted (Python callers
/// often compute pixel counts with `*` on floats).
fn opt_u64(map: &Map<String, Value>, key: &str) -> Result<Option<u64>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                return Ok(Some(u));
            }
            match n.as_f64() {
                Some(x) if x >= 0.0 && x.fract() == 0.0 && x <= 9.0e15 => Ok(Some(x as u64)),
                _ => Err(format!("\"{key}\" must be a non-negative integer, got {n}")),
            }
        }
        Some(other) => Err(format!(
            "\"{key}\" must be a non-negative integer, got {}",
            kind_of(other)
        )),
    }
}

fn opt_usize(map: &Map<String, Value>, key: &str) -> Result<Option<usize>, String> {
    opt_u64(map, key)?
        .map(|u| usize::try_from(u).map_err(|_| format!("\"{key}\" is too large ({u})")))
        .transpose()
}

impl Serialize for ContentPart {
    /// Writes the qwen-vl-utils form (`{"type": "image", "image": .., "max_pixels": ..}`);
    /// raw image bytes become a `data:` URI.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        match self {
            ContentPart::Text { text } => {
                m.serialize_entry("type", "text")?;
                m.serialize_entry("text", text)?;
            }
            ContentPart::Image(p) => {
                m.serialize_entry("type", "image")?;
                match &p.source {
                    ImageSource::Uri(u) => m.serialize_entry("image", u)?,
                    ImageSource::Bytes(b) => m.serialize_entry(
                        "image",
                        &format!("data:application/octet-stream;base64,{}", base64(b)),
                    )?,
                }
                opt_entry(&mut m, "min_pixels", &p.min_pixels)?;
                opt_entry(&mut m, "max_pixels", &p.max_pixels)?;
                opt_entry(&mut m, "resized_height", &p.resized_height)?;
                opt_entry(&mut m, "resized_width", &p.resized_width)?;
            }
            ContentPart::Video(p) => {
                m.serialize_entry("type", "video")?;
                match &p.source {
                    VideoSource::Uri(u) => m.serialize_entry("video", u)?,
                    VideoSource::Frames(f) => m.serialize_entry("video", f)?,
                }
                opt_entry(&mut m, "fps", &p.fps)?;
                opt_entry(&mut m, "nframes", &p.nframes)?;
                opt_entry(&mut m, "min_frames", &p.min_frames)?;
                opt_entry(&mut m, "max_frames", &p.max_frames)?;
                opt_entry(&mut m, "min_pixels", &p.min_pixels)?;
                opt_entry(&mut m, "max_pixels", &p.max_pixels)?;
                opt_entry(&mut m, "total_pixels", &p.total_pixels)?;
                opt_entry(&mut m, "resized_height", &p.resized_height)?;
                opt_entry(&mut m, "resized_width", &p.resized_width)?;
                opt_entry(&mut m, "video_start", &p.video_start)?;
                opt_entry(&mut m, "video_end", &p.video_end)?;
            }
        }
        m.end()
    }
}

fn opt_entry<M: SerializeMap, T: Serialize>(
    m: &mut M,
    key: &str,
    v: &Option<T>,
) -> Result<(), M::Error> {
    match v {
        Some(v) => m.serialize_entry(key, v),
        None => Ok(()),
    }
}

/// Standard base64 with padding (RFC 4648), for serializing raw image bytes.
fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Vec<Message>, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn qwen_vl_utils_and_openai_forms() {
        let msgs = parse(
            r#"[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "image", "image": "file:///tmp/a.png", "min_pixels": 3136, "max_pixels": 602112.0},
                {"type": "image_url", "image_url": {"url": "https://x/b.jpg", "detail": "auto"}},
                {"image_url": "data:image/png;base64,AAAA"},
                {"type": "video", "video": ["f1.png", "f2.png"], "fps": 1, "max_frames": 8},
                {"video": "clip.mp4", "video_start": 1.5, "nframes": 4},
                {"type": "video_url", "video_url": {"url": "http://x/v.mp4"}},
                {"type": "text", "text": "What?"},
                {"text": "And?"}
            ]},
            {"role": "assistant", "content": null},
            {"role": "tool"}
        ]"#,
        )
        .unwrap();
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[0].content, Content::Text("Be brief.".into()));
        assert_eq!(msgs[2].content, Content::Text(String::new()));
        assert_eq!(msgs[3].role, Role::Tool);
        let imgs: Vec<_> = images(&msgs).collect();
        assert_eq!(imgs.len(), 3);
        assert_eq!(imgs[0].source, ImageSource::Uri("file:///tmp/a.png".into()));
        assert_eq!(imgs[0].min_pixels, Some(3136));
        assert_eq!(imgs[0].max_pixels, Some(602112));
        assert_eq!(imgs[1].source, ImageSource::Uri("https://x/b.jpg".into()));
        assert_eq!(
            imgs[2].source,
            ImageSource::Uri("data:image/png;base64,AAAA".into())
        );
        let vids: Vec<_> = videos(&msgs).collect();
        assert_eq!(vids.len(), 3);
        assert_eq!(
            vids[0].source,
            VideoSource::Frames(vec!["f1.png".into(), "f2.png".into()])
        );
        assert_eq!(vids[0].fps, Some(1.0));
        assert_eq!(vids[0].max_frames, Some(8));
        assert_eq!(vids[1].video_start, Some(1.5));
        assert_eq!(vids[1].nframes, Some(4));
        assert_eq!(vids[2].source, VideoSource::Uri("http://x/v.mp4".into()));
        let order: Vec<char> = vision_inputs(&msgs)
            .map(|v| match v {
                VisionRef::Image(_) => 'i',
                VisionRef::Video(_) => 'v',
            })
            .collect();
        assert_eq!(order, vec!['i', 'i', 'i', 'v', 'v', 'v']);
        let texts: Vec<_> = msgs[1]
            .iter_parts()
            .filter_map(|p| match p {
                PartRef::Text(t) => Some(t),
                _ => None,
            })
            .collect();
        assert_eq!(texts, vec!["What?", "And?"]);
    }

    #[test]
    fn bad_parts_are_named() {
        let e = parse(r#"[{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"audio\" is not supported"), "{e}");
        let e = parse(r#"[{"role": "user", "content": [{"type": "image"}]}]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no \"image\""), "{e}");
        let e = parse(
            r#"[{"role": "user", "content": [{"type": "image", "image": "a", "max_pixels": -5}]}]"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_pixels"), "{e}");
        let e = parse(r#"[{"role": "user", "content": [{"type": "video", "video": [1, 2]}]}]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("frame 1"), "{e}");
        let e = parse(r#"[{"role": "user", "content": [{"type": "text", "text": 3}]}]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be a string"), "{e}");
        assert!(parse(r#"[{"role": "developer", "content": "x"}]"#).is_err());
        assert!(parse(r#"[{"role": "user", "content": [{"foo": 1}]}]"#).is_err());
    }

    #[test]
    fn serialize_round_trip() {
        let msgs = vec![
            Message::user("hi"),
            Message::parts(
                Role::User,
                vec![
                    ContentPart::Image(ImagePart {
                        max_pixels: Some(1000),
                        ..ImagePart::new("a.png")
                    }),
                    ContentPart::video(vec!["1.png".to_string(), "2.png".to_string()]),
                    ContentPart::text("x"),
                ],
            ),
        ];
        let json = serde_json::to_string(&msgs).unwrap();
        assert!(json.contains(r#"{"type":"image","image":"a.png","max_pixels":1000}"#));
        let back: Vec<Message> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, msgs);
        let bytes = ContentPart::image(vec![1u8, 2, 3, 4]);
        let json = serde_json::to_string(&bytes).unwrap();
        assert!(json.contains("base64,AQIDBA=="), "{json}");
    }

    #[test]
    fn locations() {
        assert_eq!(Location::parse("/a/b.png"), Location::Path("/a/b.png"));
        assert_eq!(
            Location::parse("file:///a/b.png"),
            Location::Path("/a/b.png")
        );
        assert_eq!(
            Location::parse("HTTPS://x/y"),
            Location::Http("HTTPS://x/y")
        );
        assert_eq!(
            Location::parse("data:image/png;base64,QUJD"),
            Location::Data {
                media_type: "image/png",
                base64: true,
                payload: "QUJD"
            }
        );
        assert_eq!(
            Location::parse("data:,hi"),
            Location::Data {
                media_type: "",
                base64: false,
                payload: "hi"
            }
        );
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}

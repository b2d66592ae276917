//! Messages → model inputs: what `Qwen2VLProcessor` and qwen-vl-utils' `process_vision_info`
//! do in the reference, step by step.
//!
//! - [`messages`]: the conversation types (messages with text, image and video parts), their
//!   JSON forms and the source strings' classification ([`messages::Location`]).
//! - [`fetch`]: image sources → encoded bytes (paths and `file://` URLs against a base
//!   directory, `data:` URIs, raw bytes, http(s) downloads with their limits);
//!   [`fetch::FetchOptions`] with the deadline/cancel [`fetch::Interrupt`] and the token budget.
//! - [`sizes`]: the `smart_resize` rules of qwen-vl-utils and transformers (the size an image
//!   or a video frame is resized to), shared by images and videos.
//! - [`image`]: decoding as Pillow does, the two-stage Pillow-exact resize, rescale/normalize
//!   and the patch layout ([`image::patchify`]).
//! - [`video`]: video sources, frame sampling (`smart_nframes`, the frame indices), the
//!   per-frame budget, frame lists and the processor stage for videos; `video/decode.rs`, the
//!   FFmpeg reader.
//! - [`template`]: the model's Jinja chat template ([`template::ChatTemplate`]) rendered as
//!   transformers renders it, with the user-written spans tracked; `template/pyshim.rs`, the
//!   Python emulation its templates expect (`tojson`, `strftime_now`, Python's methods).
//! - [`tokenizer`]: Qwen2's byte-level BPE tokenizer, which keeps user-typed special-token
//!   strings as text.
//! - [`processor`]: all of it in order ([`processor::Processor::process`]), from messages to
//!   [`ModelInputs`](crate::inputs::ModelInputs) with M-RoPE ids, within a token budget checked
//!   from headers before any pixel is decoded.

pub mod fetch;
pub mod image;
pub mod messages;
pub mod processor;
pub mod sizes;
pub mod template;
#[cfg(test)]
mod test_util;
pub mod tokenizer;
pub mod video;

//! Incremental, UTF-8-safe detokenization for streaming.
//!
//! Byte-level BPE can split one character (a CJK character, an emoji) across tokens; the
//! decode of a prefix then ends in U+FFFD. Reference: transformers 4.49
//! `generation/streamers.py::TextStreamer.put`, which re-decodes the whole output and holds
//! text back until it is printable, and text-generation-inference's `decode_token` (prefix
//! and read offsets), whose window approach this follows: decode `ids[prefix..]` and
//! `ids[prefix..read]`, release the difference unless it ends in U+FFFD.
//!
//! The concatenation of all pieces (including [`IncrementalDecoder::finish`]) equals
//! `decode(all ids)` without the `clean_up_tokenization_spaces` step (off for Qwen2-VL).

use std::ops::Deref;

use crate::processing::tokenizer::Qwen2Tokenizer;
use crate::Result;

/// Decodes generated ids one at a time into text pieces.
///
/// Generic over how the tokenizer is held: `&Qwen2Tokenizer`, `Arc<Qwen2Tokenizer>`, ….
#[derive(Debug, Clone)]
pub struct IncrementalDecoder<T: Deref<Target = Qwen2Tokenizer>> {
    tokenizer: T,
    skip_special_tokens: bool,
    /// Special tokens kept even though `skip_special_tokens` (see [`Self::keeping`]).
    keep: Vec<u32>,
    ids: Vec<u32>,
    /// Start of the window re-decoded for context.
    prefix: usize,
    /// End of what has been released.
    read: usize,
}

impl<T: Deref<Target = Qwen2Tokenizer>> IncrementalDecoder<T> {
    /// A decoder that skips special tokens (as a chat response is shown).
    pub fn new(tokenizer: T) -> Self {
        Self::with_options(tokenizer, true)
    }

    /// A decoder with an explicit `skip_special_tokens`.
    pub fn with_options(tokenizer: T, skip_special_tokens: bool) -> Self {
        IncrementalDecoder {
            tokenizer,
            skip_special_tokens,
            keep: Vec::new(),
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// A decoder that skips special tokens except those in `keep` (e.g. the grounding
    /// markers, [`Qwen2Tokenizer::grounding_ids`]).
    pub fn keeping(tokenizer: T, keep: Vec<u32>) -> Self {
        IncrementalDecoder {
            keep,
            ..Self::with_options(tokenizer, true)
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        if self.skip_special_tokens {
            self.tokenizer.decode_raw_keeping(ids, &self.keep)
        } else {
            self.tokenizer.decode_raw(ids, false)
        }
    }

    /// Every id pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Adds one id; returns the text it completes, or `None` while the text so far ends in
    /// an incomplete character (or the token decodes to nothing).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix_text = self.decode(&self.ids[self.prefix..self.read])?;
        let new_text = self.decode(&self.ids[self.prefix..])?;
        if new_text.len() > prefix_text.len() && !new_text.ends_with('\u{FFFD}') {
            let piece = suffix_after(&new_text, &prefix_text);
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Releases whatever was held back (an incomplete character at the very end comes out
    /// as U+FFFD, as `decode` shows it). Returns `None` when nothing was held.
    pub fn finish(&mut self) -> Result<Option<String>> {
        if self.read == self.ids.len() {
            return Ok(None);
        }
        let prefix_text = self.decode(&self.ids[self.prefix..self.read])?;
        let new_text = self.decode(&self.ids[self.prefix..])?;
        self.prefix = self.read;
        self.read = self.ids.len();
        let piece = suffix_after(&new_text, &prefix_text);
        Ok((!piece.is_empty()).then_some(piece))
    }
}

/// `new` minus its leading `old`. For byte-level BPE `old` is always a prefix of `new`;
/// otherwise release what follows their common prefix (on a char boundary).
fn suffix_after(new: &str, old: &str) -> String {
    if let Some(rest) = new.strip_prefix(old) {
        return rest.to_string();
    }
    let common = new
        .char_indices()
        .zip(old.chars())
        .find(|((_, a), b)| a != b)
        .map_or(old.len().min(new.len()), |((i, _), _)| i);
    let mut at = common;
    while !new.is_char_boundary(at) {
        at -= 1;
    }
    new[at..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processing::tokenizer::tests::fixture;
    use std::sync::Arc;

    fn stream(ids: &[u32], skip: bool) -> (Vec<String>, String) {
        let tok = fixture();
        let mut d = IncrementalDecoder::with_options(tok, skip);
        let mut pieces = Vec::new();
        for &id in ids {
            if let Some(p) = d.push(id).unwrap() {
                pieces.push(p);
            }
        }
        if let Some(p) = d.finish().unwrap() {
            pieces.push(p);
        }
        (pieces, tok.decode(ids, skip).unwrap())
    }

    #[test]
    fn pieces_concatenate_to_decode() {
        let tok = fixture();
        for text in [
            "你好，世界！这是一个测试。",
            "I ❤️ Rust 🦀🚀 family: 👨‍👩‍👧‍👦 flags: 🇯🇵🇫🇷",
            "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀀𠀁 mixed 混合 text",
            "plain ascii, nothing special",
        ] {
            let ids = tok.encode_plain(text).unwrap();
            let (pieces, full) = stream(&ids, true);
            assert_eq!(pieces.concat(), full, "{text:?}");
            assert_eq!(full, text);
            // No piece holds a broken character.
            assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        }
    }

    #[test]
    fn split_characters_are_held_back() {
        let tok = fixture();
        // " 🦀" is three byte-level tokens ([11162, 99, 222] in encodings.json).
        let ids = tok.encode_plain(" 🦀").unwrap();
        assert!(ids.len() >= 2, "{ids:?}");
        let mut d = IncrementalDecoder::new(tok);
        let mut out = Vec::new();
        for &id in &ids {
            out.push(d.push(id).unwrap());
        }
        // Only the last token completes the character.
        assert!(
            out[..out.len() - 1]
                .iter()
                .all(|p| p.as_deref().unwrap_or(" ") == " "),
            "{out:?}"
        );
        let text: String = out.into_iter().flatten().collect();
        assert_eq!(text, " 🦀");
        assert_eq!(d.finish().unwrap(), None);
    }

    #[test]
    fn special_tokens() {
        let tok = fixture();
        let mut ids = vec![tok.im_start_id()];
        ids.extend(tok.encode_plain("assistant\n回答 🚀").unwrap());
        ids.push(tok.im_end_id());
        ids.push(tok.endoftext_id());
        let (pieces, full) = stream(&ids, true);
        assert_eq!(full, "assistant\n回答 🚀");
        assert_eq!(pieces.concat(), full);
        let (pieces, full) = stream(&ids, false);
        assert_eq!(
            full,
            "<|im_start|>assistant\n回答 🚀<|im_end|><|endoftext|>"
        );
        assert_eq!(pieces.concat(), full);
    }

    #[test]
    fn grounding_markers_are_kept_when_asked() {
        let tok = fixture();
        let text =
            "看<|object_ref_start|>红车 🚗<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>";
        let mut ids = tok.encode_plain(text).unwrap();
        ids.push(tok.im_end_id());
        let mut d = IncrementalDecoder::keeping(tok, tok.grounding_ids());
        let mut out = String::new();
        for &id in &ids {
            if let Some(p) = d.push(id).unwrap() {
                out.push_str(&p);
            }
        }
        if let Some(p) = d.finish().unwrap() {
            out.push_str(&p);
        }
        assert_eq!(out, text);
        let (pieces, full) = stream(&ids, true);
        assert_eq!(pieces.concat(), "看红车 🚗(1,2),(3,4)");
        assert_eq!(full, "看红车 🚗(1,2),(3,4)");
    }

    #[test]
    fn truncated_character_is_flushed_by_finish() {
        let tok = Arc::new(fixture().clone());
        // The first byte-level token of " 🦀" alone: an incomplete character forever.
        let ids = tok.encode_plain(" 🦀").unwrap();
        let mut d = IncrementalDecoder::new(tok.clone());
        assert_eq!(d.push(ids[0]).unwrap(), None);
        let rest = d.finish().unwrap().unwrap();
        assert_eq!(rest, tok.decode(&ids[..1], true).unwrap());
        assert!(rest.ends_with('\u{FFFD}'));
        assert_eq!(d.ids(), &ids[..1]);
    }

    #[test]
    fn suffix_after_falls_back_to_common_prefix() {
        assert_eq!(suffix_after("abcdef", "abc"), "def");
        assert_eq!(suffix_after("abXdef", "abc"), "Xdef");
        assert_eq!(suffix_after("a你好", "a你"), "好");
    }
}

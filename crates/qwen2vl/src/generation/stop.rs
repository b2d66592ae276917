//! When to stop generating: an end-of-sequence token, a length limit, or a stop string in
//! the decoded text.
//!
//! Reference: transformers 4.49 `generation/stopping_criteria.py` (`MaxLengthCriteria`
//! counted in new tokens as `max_new_tokens` sets it, `EosTokenCriteria` over every id of
//! `generation_config.eos_token_id`, and `StopStringCriteria`). Stop strings follow the
//! OpenAI API (as vLLM implements it): the output is cut before the earliest occurrence and
//! the stop string itself is not returned. EOS takes precedence over the length limit when
//! both happen on the same token, and the EOS token is not part of the text.
//!
//! Cost: stop strings are bounded ([`MAX_STOP_STRINGS`] of at most [`MAX_STOP_STRING_BYTES`]
//! bytes, checked by [`check_stop_strings`]), and [`StopStringFilter::push`] looks only at the
//! text held back plus the new piece, so the work per token is linear in the new text and the
//! stop strings' total length, never in the length of the answer.

use crate::{Error, Result};

/// Most stop strings in one request (the OpenAI API allows 4; vLLM any number).
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_STRING_BYTES: usize = 256;

/// Refuses more than [`MAX_STOP_STRINGS`] stop strings or one longer than
/// [`MAX_STOP_STRING_BYTES`] bytes (empty ones are allowed and ignored).
pub fn check_stop_strings(stop: &[String]) -> Result<()> {
    if stop.len() > MAX_STOP_STRINGS {
        return Err(Error::bad_input(
            format!("{} stop strings were given", stop.len()),
            format!("at most {MAX_STOP_STRINGS} stop strings"),
        ));
    }
    if let Some((i, s)) = stop
        .iter()
        .enumerate()
        .find(|(_, s)| s.len() > MAX_STOP_STRING_BYTES)
    {
        return Err(Error::bad_input(
            format!("stop string {} is {} bytes long", i + 1, s.len()),
            format!("stop strings of at most {MAX_STOP_STRING_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// Why a sequence stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// A natural stop (OpenAI `"stop"`).
    Stop(StopReason),
    /// `max_new_tokens` reached (OpenAI `"length"`).
    Length,
    /// The caller cancelled the request (Ctrl-C, a client that went away).
    Cancelled,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_openai_str(&self) -> &'static str {
        match self {
            FinishReason::Stop(_) => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_openai_str())
    }
}

/// Serialized as the OpenAI string (`"stop"`, `"length"`, `"cancelled"`), as `--json` and
/// the API have always written it.
impl serde::Serialize for FinishReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_openai_str())
    }
}

/// Compares with the OpenAI string: `reason == "stop"` whatever stopped it.
impl PartialEq<&str> for FinishReason {
    fn eq(&self, other: &&str) -> bool {
        self.as_openai_str() == *other
    }
}

/// What caused a natural stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence token (its id).
    Eos(u32),
    /// One of the caller's stop strings.
    StopString(String),
}

/// The stopping rules of one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopCriteria {
    /// Token ids that end the sequence (`<|im_end|>`, `<|endoftext|>` for Qwen2-VL-Instruct).
    pub eos_ids: Vec<u32>,
    /// The most tokens to generate.
    pub max_new_tokens: usize,
    /// Strings that end the output when they appear in the decoded text.
    pub stop_strings: Vec<String>,
}

impl StopCriteria {
    /// Criteria with no stop strings.
    pub fn new(eos_ids: Vec<u32>, max_new_tokens: usize) -> Self {
        StopCriteria {
            eos_ids,
            max_new_tokens,
            stop_strings: vec![],
        }
    }

    /// Checks the token just generated; `generated` counts the new tokens including it.
    pub fn check_token(&self, token: u32, generated: usize) -> Option<FinishReason> {
        if self.eos_ids.contains(&token) {
            Some(FinishReason::Stop(StopReason::Eos(token)))
        } else if generated >= self.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    /// The earliest stop string in `text`: its byte offset (where the output is cut) and
    /// which string it is. At equal offsets the longest string wins. Empty stop strings are
    /// ignored.
    pub fn find_stop_string<'a>(&'a self, text: &str) -> Option<(usize, &'a str)> {
        let mut best: Option<(usize, &str)> = None;
        for s in self.stop_strings.iter().filter(|s| !s.is_empty()) {
            if let Some(i) = text.find(s.as_str()) {
                let better = match best {
                    None => true,
                    Some((bi, bs)) => i < bi || (i == bi && s.len() > bs.len()),
                };
                if better {
                    best = Some((i, s.as_str()));
                }
            }
        }
        best
    }

    /// The length in bytes of the longest suffix of `text` that is a proper prefix of a stop
    /// string: text a stream must hold back because the next token may complete a stop
    /// string. Always on a char boundary (the suffix starts like a stop string, so with a
    /// lead byte). Linear in the stop strings' lengths: only the last `len - 1` bytes of
    /// `text` are read for each stop string, scanned once with its prefix function.
    pub fn partial_stop_len(&self, text: &str) -> usize {
        let mut best = 0;
        for s in self.stop_strings.iter().filter(|s| !s.is_empty()) {
            best = best.max(longest_suffix_prefix(text.as_bytes(), s.as_bytes()));
        }
        best
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `pat` (non-empty):
/// Knuth-Morris-Pratt's automaton of `pat` run over the last `pat.len() - 1` bytes of `text`.
/// O(`pat.len()`) time and memory.
fn longest_suffix_prefix(text: &[u8], pat: &[u8]) -> usize {
    let m = pat.len();
    if m < 2 {
        return 0;
    }
    // fail[i]: the longest proper border of pat[..=i].
    let mut fail = vec![0usize; m];
    let mut k = 0;
    for i in 1..m {
        while k > 0 && pat[i] != pat[k] {
            k = fail[k - 1];
        }
        if pat[i] == pat[k] {
            k += 1;
        }
        fail[i] = k;
    }
    let window = &text[text.len() - (m - 1).min(text.len())..];
    let mut q = 0;
    for &b in window {
        while q > 0 && (q == m || pat[q] != b) {
            q = fail[q - 1];
        }
        if pat[q] == b {
            q += 1;
        }
    }
    // The window is shorter than `pat`, so `q` < m: a proper prefix.
    q
}

/// Applies stop strings to a stream of decoded text pieces: returns the text that is safe
/// to show now, holding back a tail that could still become a stop string.
#[derive(Debug, Clone)]
pub struct StopStringFilter {
    criteria: StopCriteria,
    /// Text received but not yet released.
    pending: String,
    stopped: bool,
}

impl StopStringFilter {
    /// A filter for the criteria's stop strings.
    pub fn new(criteria: StopCriteria) -> Self {
        StopStringFilter {
            criteria,
            pending: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string was found (everything after it is dropped).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Takes the next decoded piece; returns the text to release and, when a stop string
    /// completed, the finish reason (the text before it is released, the rest dropped).
    pub fn push(&mut self, piece: &str) -> (String, Option<FinishReason>) {
        if self.stopped {
            return (String::new(), None);
        }
        // `pending` holds less than the longest stop string (see below), so this search
        // reads at most (longest stop string - 1) + `piece.len()` bytes: exactly the tail
        // where a stop string completed by this piece can be.
        self.pending.push_str(piece);
        if let Some((at, s)) = self.criteria.find_stop_string(&self.pending) {
            let s = s.to_string();
            let out = self.pending[..at].to_string();
            self.pending.clear();
            self.stopped = true;
            return (out, Some(FinishReason::Stop(StopReason::StopString(s))));
        }
        let hold = self.criteria.partial_stop_len(&self.pending);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, None)
    }

    /// The sequence ended for another reason: releases what was held back.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed reason is written and compared as the OpenAI string, whatever stopped it.
    #[test]
    fn finish_reasons_read_as_the_openai_strings() {
        let eos = FinishReason::Stop(StopReason::Eos(7));
        let string = FinishReason::Stop(StopReason::StopString("\n\n".into()));
        for (r, want) in [
            (&eos, "stop"),
            (&string, "stop"),
            (&FinishReason::Length, "length"),
            (&FinishReason::Cancelled, "cancelled"),
        ] {
            assert_eq!(serde_json::to_string(r).unwrap(), format!("\"{want}\""));
            assert_eq!(r.to_string(), want);
            assert!(*r == want, "{r:?}");
            assert!(*r != "other", "{r:?}");
        }
        assert_ne!(eos, string, "the typed reasons keep what stopped them");
    }

    #[test]
    fn eos_before_length() {
        let c = StopCriteria::new(vec![151645, 151643], 3);
        assert_eq!(c.check_token(5, 1), None);
        assert_eq!(
            c.check_token(151643, 1),
            Some(FinishReason::Stop(StopReason::Eos(151643)))
        );
        assert_eq!(c.check_token(5, 3), Some(FinishReason::Length));
        assert_eq!(
            c.check_token(151645, 3),
            Some(FinishReason::Stop(StopReason::Eos(151645)))
        );
        assert_eq!(FinishReason::Length.as_openai_str(), "length");
    }

    #[test]
    fn stop_strings() {
        let c = StopCriteria {
            stop_strings: vec!["END".into(), "ab".into(), "abc".into(), "".into()],
            ..Default::default()
        };
        assert_eq!(c.find_stop_string("xx abc END"), Some((3, "abc")));
        assert_eq!(c.find_stop_string("xENDab"), Some((1, "END")));
        assert_eq!(c.find_stop_string("nothing"), None);
        assert_eq!(c.partial_stop_len("foo EN"), 2);
        assert_eq!(c.partial_stop_len("foo a"), 1);
        assert_eq!(c.partial_stop_len("foo"), 0);
        let c = StopCriteria {
            stop_strings: vec!["你好吗".into()],
            ..Default::default()
        };
        assert_eq!(c.partial_stop_len("说你好"), "你好".len());
        assert_eq!(c.partial_stop_len("好"), 0);
    }

    /// The former quadratic `partial_stop_len`: every char-boundary suffix start tried against
    /// every stop string. The oracle of the linear one.
    fn partial_naive(c: &StopCriteria, text: &str) -> usize {
        let mut best = 0;
        for s in c.stop_strings.iter().filter(|s| !s.is_empty()) {
            let mut from = text.len() - (s.len() - 1).min(text.len());
            while !text.is_char_boundary(from) {
                from += 1;
            }
            for (i, _) in text[from..].char_indices() {
                let suffix = &text[from + i..];
                if s.starts_with(suffix) {
                    best = best.max(suffix.len());
                    break;
                }
            }
        }
        best
    }

    /// Streams `pieces` through the filter; the released text and where it stopped.
    fn stream(c: &StopCriteria, pieces: &[&str]) -> (String, Option<FinishReason>, String) {
        let mut f = StopStringFilter::new(c.clone());
        let mut out = String::new();
        let mut reason = None;
        for p in pieces {
            let (s, r) = f.push(p);
            out.push_str(&s);
            reason = reason.or(r);
        }
        let tail = f.finish();
        (out, reason, tail)
    }

    #[test]
    fn linear_matching_agrees_with_the_naive_one_on_multibyte_text() {
        let stops: Vec<Vec<String>> = vec![
            vec!["你好吗".into(), "好吗?".into()],
            vec!["ééé".into(), "é".into(), "aéa".into()],
            vec!["abab".into(), "aab".into()],
            vec!["🙂🙂x".into(), "x🙂".into()],
            vec!["</answer>".into(), "\n\nUser:".into()],
        ];
        let alphabet = [
            "a", "b", "x", "é", "你", "好", "吗", "?", "🙂", "<", "/", "\n", " ",
        ];
        // A deterministic pseudo-random walk over texts built from the stop strings' pieces.
        let mut seed = 0x2545_f491_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for stop in &stops {
            let c = StopCriteria {
                stop_strings: stop.clone(),
                ..Default::default()
            };
            for _ in 0..400 {
                let len = next(12);
                let text: String = (0..len).map(|_| alphabet[next(alphabet.len())]).collect();
                assert_eq!(
                    c.partial_stop_len(&text),
                    partial_naive(&c, &text),
                    "{stop:?} {text:?}"
                );
                // Streamed in pieces, the released text is what the whole-text rule gives:
                // cut before the earliest stop string, or everything when there is none.
                let chars: Vec<&str> = text
                    .char_indices()
                    .map(|(i, ch)| &text[i..i + ch.len_utf8()])
                    .collect();
                let (out, reason, tail) = stream(&c, &chars);
                match c.find_stop_string(&text) {
                    Some((at, s)) => {
                        assert_eq!(out, &text[..at], "{stop:?} {text:?}");
                        assert_eq!(
                            reason,
                            Some(FinishReason::Stop(StopReason::StopString(s.to_string())))
                        );
                        assert_eq!(tail, "");
                    }
                    None => {
                        assert_eq!(format!("{out}{tail}"), text, "{stop:?} {text:?}");
                        assert_eq!(reason, None);
                    }
                }
            }
        }
        // Hand-checked cases: the held-back tail and the cut position.
        let c = StopCriteria {
            stop_strings: vec!["你好吗".into(), "ééx".into()],
            ..Default::default()
        };
        assert_eq!(c.partial_stop_len("说你好"), "你好".len());
        assert_eq!(c.partial_stop_len("aéé"), "éé".len());
        assert_eq!(c.partial_stop_len("éxé"), "é".len());
        assert_eq!(
            stream(&c, &["说", "你", "好", "吗", "!"]),
            (
                "说".to_string(),
                Some(FinishReason::Stop(StopReason::StopString("你好吗".into()))),
                String::new()
            )
        );
        assert_eq!(
            stream(&c, &["éé", "é", "éx", "y"]),
            (
                "éé".to_string(),
                Some(FinishReason::Stop(StopReason::StopString("ééx".into()))),
                String::new()
            )
        );
    }

    #[test]
    fn stop_strings_are_bounded() {
        assert!(check_stop_strings(&["a".repeat(MAX_STOP_STRING_BYTES)]).is_ok());
        assert!(check_stop_strings(&vec!["".into(); MAX_STOP_STRINGS]).is_ok());
        let long = check_stop_strings(&["x".into(), "é".repeat(129)]).unwrap_err();
        assert_eq!(
            long.to_string(),
            Error::bad_input(
                "stop string 2 is 258 bytes long",
                "stop strings of at most 256 bytes"
            )
            .to_string()
        );
        assert!(check_stop_strings(&vec!["s".into(); MAX_STOP_STRINGS + 1]).is_err());
    }

    #[test]
    fn filter_streams_and_cuts() {
        let c = StopCriteria {
            stop_strings: vec!["</answer>".into()],
            ..Default::default()
        };
        let mut f = StopStringFilter::new(c.clone());
        let mut out = String::new();
        let mut reason = None;
        for piece in ["The ", "answer is 4", "</", "ans", "wer>", " trailing"] {
            let (s, r) = f.push(piece);
            out.push_str(&s);
            if r.is_some() {
                reason = r;
            }
        }
        assert_eq!(out, "The answer is 4");
        assert_eq!(
            reason,
            Some(FinishReason::Stop(StopReason::StopString(
                "</answer>".into()
            )))
        );
        assert!(f.stopped());
        assert_eq!(f.finish(), "");

        // A false start is released once it cannot match; held text is flushed at the end.
        let mut f = StopStringFilter::new(c);
        assert_eq!(f.push("a </").0, "a ");
        assert_eq!(f.push("b>").0, "</b>");
        assert_eq!(f.push(" </ans").0, " ");
        assert_eq!(f.finish(), "</ans");
    }
}

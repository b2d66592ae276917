//! When to stop generating: an end-of-sequence token, a length limit, or a stop string in
//! the decoded text.
//!
//! Reference: transformers 4.49 `generation/stopping_criteria.py` (`MaxLengthCriteria`
//! counted in new tokens as `max_new_tokens` sets it, `EosTokenCriteria` over every id of
//! `generation_config.eos_token_id`, and `StopStringCriteria`). Stop strings follow the
//! OpenAI API (as vLLM implements it): the output is cut before the earliest occurrence and
//! the stop string itself is not returned. EOS takes precedence over the length limit when
//! both happen on the same token, and the EOS token is not part of the text.

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
    /// string. Always on a char boundary.
    pub fn partial_stop_len(&self, text: &str) -> usize {
        let mut best = 0;
        for s in self.stop_strings.iter().filter(|s| !s.is_empty()) {
            // Candidate suffix starts, longest first, on char boundaries.
            let mut from = text.len() - (s.len() - 1).min(text.len());
            while !text.is_char_boundary(from) {
                from += 1;
            }
            for (i, _) in text[from..].char_indices() {
                let suffix = &text[from + i..];
                if suffix.len() <= best {
                    break;
                }
                if s.starts_with(suffix) {
                    best = suffix.len();
                    break;
                }
            }
        }
        best
    }
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

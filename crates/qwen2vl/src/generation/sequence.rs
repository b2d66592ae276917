//! The state of one generating sequence, shared by [`crate::pipeline::Pipeline::generate`]
//! (one sequence, a simple loop) and the [`crate::engine::Engine`] (many sequences per
//! decode step): its sampler and random stream, stopping rules, incremental detokenizers,
//! token history and what it produced so far.
//!
//! The model is not in here: the caller runs prefill / decode steps and hands each row of
//! logits to [`Sequence::push_logits`], so the same per-token logic serves a batch of one
//! and a batch of many, and a request's output cannot depend on who it was batched with.

use std::time::Instant;

use crate::error::Result;
use crate::generation::answer::{Generation, Timings, TokenLogprob, TopLogprob, Usage};
use crate::generation::detok::IncrementalDecoder;
use crate::generation::sampler::{Sampler, SamplingParams};
use crate::generation::stop::{FinishReason, StopCriteria, StopReason, StopStringFilter};
use crate::inputs::{ImageInfo, ModelInputs, VideoInfo};
use crate::processing::tokenizer::Qwen2Tokenizer;

/// What one [`Sequence::push_logits`] produced.
#[derive(Debug, Clone)]
pub struct SequenceStep {
    /// The chosen token.
    pub token: u32,
    /// Text released by this token (possibly empty: an incomplete character, a special
    /// token, text held back because it may start a stop string). The pieces of all steps
    /// concatenate to the streamed text (plain, or with grounding markup when asked).
    pub text: String,
    /// The token's log-probability and the requested alternatives.
    pub logprob: TokenLogprob,
    /// Set when the sequence ended with this token.
    pub finish: Option<FinishReason>,
}

/// Where the prompt's tokens came from and what the vision inputs were (for
/// [`Generation::usage`], `images` and `videos`).
#[derive(Debug, Clone, Default)]
pub struct PromptInfo {
    /// Prompt tokens in all.
    pub prompt_tokens: usize,
    /// Of which image pads.
    pub image_tokens: usize,
    /// Of which video pads.
    pub video_tokens: usize,
    /// Per-image details.
    pub images: Vec<ImageInfo>,
    /// Per-video details.
    pub videos: Vec<VideoInfo>,
    /// Of the prompt tokens, those whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
}

impl PromptInfo {
    /// What the answer reports about the prompt of `inputs` (which give up their image and
    /// video details; their tensors stay).
    pub fn take_from(inputs: &mut ModelInputs) -> Self {
        PromptInfo {
            prompt_tokens: inputs.input_ids.len(),
            image_tokens: inputs.image_tokens(),
            video_tokens: inputs.video_tokens(),
            images: std::mem::take(&mut inputs.images),
            videos: std::mem::take(&mut inputs.videos),
            cached_tokens: 0,
        }
    }
}

/// Milliseconds spent before the first token (the parts a sequence does not see itself).
#[derive(Debug, Clone, Copy, Default)]
pub struct PrefillTimings {
    /// Template, tokenizer, image/video decoding.
    pub preprocess_ms: f64,
    /// Vision tower.
    pub vision_ms: f64,
    /// Decoder prefill.
    pub prefill_ms: f64,
}

/// One sequence's generation state: sampler, stopping rules, detokenizers, history, output.
#[derive(Debug)]
pub struct Sequence<'t> {
    tokenizer: &'t Qwen2Tokenizer,
    sampler: Sampler,
    stop: StopCriteria,
    /// Stop strings over the plain text (what `text` holds).
    plain_filter: StopStringFilter,
    /// The same stop strings over the text with grounding markers.
    marked_filter: StopStringFilter,
    detok: IncrementalDecoder<&'t Qwen2Tokenizer>,
    /// A second decode keeping the grounding markers (ids 151646..=151651), for
    /// `Generation::grounding` and `stream_grounding_markup`; `text` keeps parity.
    marked_detok: IncrementalDecoder<&'t Qwen2Tokenizer>,
    stream_markup: bool,
    /// Prompt and generated ids (the repetition penalty's window).
    history: Vec<u32>,
    token_ids: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    text: String,
    marked: String,
    finish: Option<FinishReason>,
    first_token_at: Option<Instant>,
    /// What the model's box coordinates mean (for `Generation::grounding`).
    coordinates: crate::grounding::BoxCoordinates,
}

impl<'t> Sequence<'t> {
    /// A sequence after `prompt_ids`, sampling with `sampling` (validated here) and stopping
    /// by `stop`. `stream_grounding_markup` picks which text [`SequenceStep::text`] carries.
    pub fn new(
        tokenizer: &'t Qwen2Tokenizer,
        sampling: SamplingParams,
        stop: StopCriteria,
        prompt_ids: Vec<u32>,
        stream_grounding_markup: bool,
    ) -> Result<Self> {
        Ok(Sequence {
            tokenizer,
            sampler: Sampler::new(sampling)?,
            plain_filter: StopStringFilter::new(stop.clone()),
            marked_filter: StopStringFilter::new(stop.clone()),
            stop,
            detok: IncrementalDecoder::new(tokenizer),
            marked_detok: IncrementalDecoder::keeping(tokenizer, tokenizer.grounding_ids()),
            stream_markup: stream_grounding_markup,
            history: prompt_ids,
            token_ids: Vec::new(),
            logprobs: Vec::new(),
            text: String::new(),
            marked: String::new(),
            finish: None,
            first_token_at: None,
            coordinates: Default::default(),
        })
    }

    /// Reads the answer's boxes as a model whose coordinates mean `coordinates` writes them
    /// (Qwen2-VL's thousandths by default; Qwen2.5-VL's resized pixels, JSON included).
    pub fn with_box_coordinates(mut self, coordinates: crate::grounding::BoxCoordinates) -> Self {
        self.coordinates = coordinates;
        self
    }

    /// Samples the next token from one row of logits `(vocab,)`, records it, decodes it and
    /// checks the stopping rules. When the sequence ends, everything held back is released
    /// in this step's text.
    pub fn push_logits(&mut self, logits: &[f32]) -> Result<SequenceStep> {
        let s = self.sampler.sample(logits, &self.history)?;
        if self.first_token_at.is_none() {
            self.first_token_at = Some(Instant::now());
        }
        let token = s.token;
        self.token_ids.push(token);
        self.history.push(token);
        let logprob = TokenLogprob {
            id: token,
            token: token_text(self.tokenizer, token),
            logprob: s.logprob,
            top_logprobs: s
                .top
                .iter()
                .map(|&(id, lp)| TopLogprob {
                    id,
                    token: token_text(self.tokenizer, id),
                    logprob: lp,
                })
                .collect(),
        };
        self.logprobs.push(logprob.clone());
        let mut out = String::new();
        let mut stop_string = None;
        if let Some(piece) = self.detok.push(token)? {
            let (released, reason) = self.plain_filter.push(&piece);
            if !self.stream_markup {
                out.push_str(&released);
            }
            self.text.push_str(&released);
            stop_string = reason;
        }
        if let Some(piece) = self.marked_detok.push(token)? {
            let (released, _) = self.marked_filter.push(&piece);
            if self.stream_markup {
                out.push_str(&released);
            }
            self.marked.push_str(&released);
        }
        // EOS first (its text is empty anyway), then a completed stop string, then length.
        let finish = match self.stop.check_token(token, self.token_ids.len()) {
            Some(eos @ FinishReason::Stop(StopReason::Eos(_))) => Some(eos),
            other => stop_string.or(other),
        };
        if let Some(reason) = finish.clone() {
            out.push_str(&self.finish(reason)?);
        }
        Ok(SequenceStep {
            token,
            text: out,
            logprob,
            finish,
        })
    }

    /// Ends the sequence for `reason` (e.g. [`FinishReason::Cancelled`]) unless it has ended
    /// already; returns the text that was still held back (to stream). Idempotent.
    pub fn finish(&mut self, reason: FinishReason) -> Result<String> {
        if self.finish.is_some() {
            return Ok(String::new());
        }
        self.finish = Some(reason);
        let mut out = String::new();
        let mut plain = String::new();
        if let Some(piece) = self.detok.finish()? {
            plain.push_str(&self.plain_filter.push(&piece).0);
        }
        plain.push_str(&self.plain_filter.finish());
        self.text.push_str(&plain);
        let mut marked = String::new();
        if let Some(piece) = self.marked_detok.finish()? {
            marked.push_str(&self.marked_filter.push(&piece).0);
        }
        // After a stop string in the plain text, nothing more of the marked text is kept.
        if !self.plain_filter.stopped() {
            marked.push_str(&self.marked_filter.finish());
        }
        self.marked.push_str(&marked);
        out.push_str(if self.stream_markup { &marked } else { &plain });
        Ok(out)
    }

    /// Ends the sequence for `reason` without releasing text that was held back (a partial
    /// character, a possible stop string): `text` stays what was already returned. For a
    /// caller that can no longer stream (the engine shutting down). Idempotent.
    pub fn abort(&mut self, reason: FinishReason) {
        if self.finish.is_none() {
            self.finish = Some(reason);
        }
    }

    /// The last generated token (the next decode step's input).
    pub fn last_token(&self) -> Option<u32> {
        self.token_ids.last().copied()
    }

    /// The ids generated so far.
    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.token_ids.len()
    }

    /// Why the sequence ended, once it has.
    pub fn finish_reason(&self) -> Option<&FinishReason> {
        self.finish.as_ref()
    }

    /// The plain text so far (stop strings cut, special tokens skipped).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The finished answer. `start` is when the request began (for `ttft_ms`); `decode_ms`
    /// runs from the first token to now.
    pub fn into_generation(
        self,
        prompt: PromptInfo,
        start: Instant,
        before: PrefillTimings,
    ) -> Generation {
        let now = Instant::now();
        let first = self.first_token_at.unwrap_or(now);
        let ttft_ms = first.saturating_duration_since(start).as_secs_f64() * 1e3;
        let decode_ms = now.saturating_duration_since(first).as_secs_f64() * 1e3;
        let steps = self.token_ids.len().saturating_sub(1);
        let grounding = Some(crate::grounding::Grounding::parse_for(
            &self.marked,
            self.coordinates,
        ))
        .filter(|g| g.has_shapes());
        let n = prompt.prompt_tokens;
        let finish = self.finish.unwrap_or(FinishReason::Length);
        Generation {
            text: self.text,
            finish_reason: finish.clone(),
            usage: Usage {
                prompt_tokens: n,
                prompt_text_tokens: n.saturating_sub(prompt.image_tokens + prompt.video_tokens),
                prompt_image_tokens: prompt.image_tokens,
                prompt_video_tokens: prompt.video_tokens,
                prompt_cached_tokens: prompt.cached_tokens,
                completion_tokens: self.token_ids.len(),
                total_tokens: n + self.token_ids.len(),
            },
            timings: Timings {
                preprocess_ms: before.preprocess_ms,
                vision_ms: before.vision_ms,
                prefill_ms: before.prefill_ms,
                ttft_ms,
                decode_ms,
                decode_tokens_per_s: if decode_ms > 0.0 {
                    steps as f64 / (decode_ms / 1e3)
                } else {
                    0.0
                },
            },
            token_ids: self.token_ids,
            logprobs: self.logprobs,
            images: prompt.images,
            videos: prompt.videos,
            grounding,
        }
    }
}

/// The text of one token as it would print (special tokens by name).
fn token_text(tok: &Qwen2Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processing::tokenizer::tests::fixture;

    /// Logits that make `id` the argmax.
    fn one_hot(id: u32, vocab: usize) -> Vec<f32> {
        let mut v = vec![0.0f32; vocab];
        v[id as usize] = 10.0;
        v
    }

    /// Feeds `ids` greedily; returns the streamed text, the finish reason and the sequence.
    fn feed<'t>(
        tok: &'t Qwen2Tokenizer,
        stop: StopCriteria,
        ids: &[u32],
        markup: bool,
    ) -> (String, Option<FinishReason>, Sequence<'t>) {
        let vocab = 151_936;
        let mut seq = Sequence::new(tok, SamplingParams::greedy(), stop, vec![1, 2, 3], markup)
            .expect("sequence");
        let mut out = String::new();
        for &id in ids {
            let step = seq.push_logits(&one_hot(id, vocab)).expect("step");
            assert_eq!(step.token, id);
            assert_eq!(step.logprob.id, id);
            out.push_str(&step.text);
            if step.finish.is_some() {
                return (out, step.finish, seq);
            }
        }
        (out, None, seq)
    }

    #[test]
    fn eos_and_length_end_the_sequence() {
        let tok = fixture();
        let mut ids = tok.encode_plain("Hello there").unwrap();
        let upto_eos = ids.len() + 1;
        ids.push(tok.im_end_id());
        ids.extend(tok.encode_plain(" never seen").unwrap());
        let stop = StopCriteria::new(vec![tok.im_end_id()], 100);
        let (out, reason, seq) = feed(tok, stop, &ids, false);
        assert_eq!(out, "Hello there");
        assert!(matches!(
            reason,
            Some(FinishReason::Stop(StopReason::Eos(_)))
        ));
        assert_eq!(seq.generated(), upto_eos);
        assert_eq!(seq.last_token(), Some(tok.im_end_id()));
        let g = seq.into_generation(PromptInfo::default(), Instant::now(), Default::default());
        assert_eq!(g.text, "Hello there");
        assert_eq!(g.finish_reason, "stop");

        let ids = tok.encode_plain("one two three four five").unwrap();
        let (out, reason, seq) = feed(tok, StopCriteria::new(vec![], 2), &ids, false);
        assert_eq!(reason, Some(FinishReason::Length));
        assert_eq!(out, tok.decode(&ids[..2], true).unwrap());
        assert_eq!(seq.generated(), 2);
    }

    #[test]
    fn stop_string_is_cut_and_held_back_text_never_streamed() {
        let tok = fixture();
        let ids = tok
            .encode_plain("The answer is 4</answer> and more")
            .unwrap();
        let stop = StopCriteria {
            stop_strings: vec!["</answer>".into()],
            ..StopCriteria::new(vec![], 100)
        };
        let (out, reason, seq) = feed(tok, stop.clone(), &ids, false);
        assert_eq!(out, "The answer is 4");
        assert_eq!(
            reason,
            Some(FinishReason::Stop(StopReason::StopString(
                "</answer>".into()
            )))
        );
        assert_eq!(seq.text(), "The answer is 4");
        // The same with grounding markup streamed.
        let (out, _, _) = feed(tok, stop, &ids, true);
        assert_eq!(out, "The answer is 4");
    }

    #[test]
    fn finish_flushes_abort_does_not() {
        let tok = fixture();
        let ids = tok.encode_plain("Hello </ans").unwrap();
        let stop = StopCriteria {
            stop_strings: vec!["</answer>".into()],
            ..StopCriteria::new(vec![], 100)
        };
        let (out, reason, mut seq) = feed(tok, stop.clone(), &ids, false);
        assert_eq!((out.as_str(), reason), ("Hello ", None));
        assert_eq!(seq.finish(FinishReason::Cancelled).unwrap(), "</ans");
        assert_eq!(seq.finish(FinishReason::Length).unwrap(), "");
        assert_eq!(seq.finish_reason(), Some(&FinishReason::Cancelled));
        assert_eq!(seq.text(), "Hello </ans");

        let (_, _, mut seq) = feed(tok, stop, &ids, false);
        seq.abort(FinishReason::Cancelled);
        let g = seq.into_generation(PromptInfo::default(), Instant::now(), Default::default());
        assert_eq!(g.text, "Hello ");
        assert_eq!(g.finish_reason, "cancelled");
        assert_eq!(g.token_ids, ids);
    }
}

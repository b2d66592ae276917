//! From logits to an answer, for one sequence: the request and answer types, the sampler, stop
//! conditions, the incremental detokenizer, and [`Sequence`], which joins them per token.
//!
//! Data flows one way: `processing` → `model` → `generation` → `pipeline` / `engine`. Nothing
//! in here runs the model or knows about batching; the pipeline (one request) and the engine
//! (many) both drive a [`Sequence`] with rows of logits, so a request's answer cannot depend
//! on which of them served it.
//!
//! | module | holds |
//! |---|---|
//! | [`request`] | [`GenerateRequest`], [`MediaOptions`] |
//! | [`answer`] | [`Generation`], [`Usage`], [`Timings`], [`TokenLogprob`], [`TopLogprob`] |
//! | [`sequence`] | [`Sequence`]: one sequence's sampler, stop rules, detokenizers, history |
//! | [`sampler`] | [`SamplingParams`] and the seeded [`sampler::Sampler`] |
//! | [`stop`] | [`FinishReason`], stop criteria and the stop-string filter |
//! | [`detok`] | the incremental detokenizer |

pub mod answer;
pub mod detok;
pub mod request;
pub mod sampler;
pub mod sequence;
pub mod stop;

pub use answer::{Generation, Timings, TokenLogprob, TopLogprob, Usage};
pub use request::{GenerateRequest, MediaOptions};
pub use sampler::SamplingParams;
pub use sequence::{PrefillTimings, PromptInfo, Sequence, SequenceStep};
pub use stop::FinishReason;

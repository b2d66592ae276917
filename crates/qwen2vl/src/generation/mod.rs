//! Token selection and streaming: sampler, stop conditions, incremental detokenizer.

pub mod detok;
pub mod sampler;
pub mod stop;

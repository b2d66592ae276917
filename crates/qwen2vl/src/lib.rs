//! qwen2vl: Qwen2-VL vision-language inference in Rust.

pub mod config;
pub mod error;
pub mod generation;
pub mod processing;

pub use error::{Error, Result};
pub mod inputs;
pub mod kv_cache;
pub mod model;
pub mod nn;
pub mod ops;
pub mod pipeline;
pub mod rope;
pub mod text;
pub mod vision;
pub mod weights;

//! qwen2vl: Qwen2-VL vision-language inference in Rust.

pub mod error;

pub use error::{Error, Result};

//! qwen2vl: Qwen2-VL vision-language inference in Rust.
//!
//! A conversation (text, images) goes through the [`processing::processor::Processor`]
//! (chat template, tokenizer, Pillow-exact image preprocessing, M-RoPE ids) into
//! [`inputs::ModelInputs`], then through the [`model::Qwen2VL`] towers (vision tower,
//! decoder with a per-sequence [`kv_cache::KvCache`]) and the sampler. [`pipeline::Pipeline`]
//! ties it together for one request at a time; [`engine::Engine`] serves many at once
//! with continuous batching (one decode step for every running sequence).
//!
//! # Quick start
//!
//! ```
//! use qwen2vl::generation::GenerateRequest;
//! use qwen2vl::pipeline::{DTypeChoice, Pipeline};
//!
//! # let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
//! # let model_dir = format!("{fixtures}/tiny-qwen2vl");
//! # let photo = format!("{fixtures}/images/wide.png");
//! // `model_dir`: a Hugging Face-format Qwen2-VL directory (config.json, *.safetensors, ...).
//! let pipeline = Pipeline::load(model_dir.as_ref(), DTypeChoice::F32)?;
//! let request = GenerateRequest::from_prompt(None, &[photo.into()], "Describe this image.")
//!     .with_max_new_tokens(16);
//! let mut streamed = String::new();
//! let answer = pipeline.generate(&request, &mut |piece| streamed.push_str(piece))?;
//! assert_eq!(streamed, answer.text);
//! assert!(answer.usage.prompt_image_tokens > 0);
//! # Ok::<(), qwen2vl::Error>(())
//! ```

pub mod architecture;
pub mod config;
pub mod encoder_cache;
pub mod engine;
pub mod error;
pub mod generation;
pub mod gguf;
pub mod grounding;
pub mod processing;

pub use error::{Error, Item, ItemKind, Result};
pub mod inputs;
pub mod kv_cache;
mod lru;
mod mapped;
pub mod memory;
pub mod model;
pub mod moe;
pub mod nn;
pub mod ops;
pub mod pipeline;
pub mod prefix_cache;
pub mod rope;
pub mod text;
pub mod vision;
pub mod weights;

//! Where `--model` points: a local directory, or a Hugging Face Hub repo id.

use std::path::PathBuf;

use crate::common::CliError;

/// The model used when `--model` is not given.
pub const DEFAULT_MODEL: &str = "Qwen/Qwen2-VL-2B-Instruct";

/// Resolves `--model` to a local directory.
pub fn resolve_model(spec: &str, _quiet: bool) -> Result<PathBuf, CliError> {
    let p = PathBuf::from(spec);
    if p.is_dir() {
        return Ok(p);
    }
    // TODO(issue 4): hub downloads.
    Err(CliError::Usage(format!(
        "model directory {spec} not found: give a directory holding config.json, *.safetensors and tokenizer.json"
    )))
}

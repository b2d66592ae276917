//! `qwen2vl quantize`: write a safetensors model as pre-quantized GGUF files, once, so that
//! every later load reads the blocks as they are (no quantizing at startup).
//!
//! The files are llama.cpp's converter layout (see the library's `gguf::export`), so
//! llama.cpp reads them too; `--model OUT` loads the directory.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use qwen2vl::gguf::export::{self, ExportOptions, ExportProgress};
use qwen2vl::ops::quant::plan::QuantScheme;

use crate::common::set_threads;
use crate::error::CliError;

/// The `quantize` command's flags.
#[derive(Args, Debug, Clone)]
pub struct QuantizeArgs {
    /// The safetensors model to quantize: a local directory (config.json, *.safetensors,
    /// tokenizer.json, ...) or a Hugging Face repo id (downloaded if needed).
    #[arg(long)]
    pub model: String,
    /// Format of the language model's matrices: q8_0, q6_k, q4_k_m or q4_k (the same
    /// formats, and the same blocks, as `--quant` when loading).
    #[arg(long, value_name = "FORMAT")]
    pub quant: String,
    /// Quantize the vision tower too (default: f16, as llama.cpp's converter writes it).
    #[arg(long, value_name = "FORMAT")]
    pub vision_quant: Option<String>,
    /// The directory to write the GGUF files into (created; must be empty unless --force).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Write into a --out directory that is not empty (files of the same names are replaced).
    #[arg(long)]
    pub force: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bar on stderr (errors and the summary are still printed).
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Runs `qwen2vl quantize`.
pub fn main(args: QuantizeArgs) -> Result<(), CliError> {
    set_threads(args.threads)?;
    let usage = |e: qwen2vl::Error| CliError::Usage(e.to_string());
    let quant: QuantScheme = args.quant.parse().map_err(usage)?;
    let vision_quant: Option<QuantScheme> = args
        .vision_quant
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(usage)?;
    let name = model_name(&args.model);
    // The cheap checks first: nothing is downloaded or read for a bad --out.
    check_out(&args.out, args.force, &name, quant, vision_quant)?;
    let dir = source_dir(&args)?;
    let name = name.unwrap_or_else(|| export::default_name(&dir));
    check_out(
        &args.out,
        args.force,
        &Some(name.clone()),
        quant,
        vision_quant,
    )?;
    std::fs::create_dir_all(&args.out).map_err(|e| {
        CliError::Failed(format!("cannot create --out {}: {e}", args.out.display()))
    })?;
    let bar = progress_bar(args.quiet);
    let mut options = ExportOptions {
        quant: Some(quant),
        vision_quant,
        name: Some(name),
        progress: None,
    };
    if let Some(bar) = &bar {
        let shown = bar.clone();
        options.progress = Some(Arc::new(move |p: ExportProgress| {
            if shown.length() != Some(p.bytes_total) {
                shown.set_length(p.bytes_total);
            }
            shown.set_position(p.bytes_done);
        }));
    }
    let start = Instant::now();
    let written = export::export(&dir, &args.out, &options);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let written = written?;
    print_summary(&written.files, start.elapsed().as_secs_f64(), &args.out);
    Ok(())
}

/// The name for `general.name` and the file names: a repo id's last part; `None` for a
/// local directory (its own name is used once it is resolved).
fn model_name(spec: &str) -> Option<String> {
    if Path::new(spec).is_dir() {
        return None;
    }
    let id = spec.split('@').next().unwrap_or(spec);
    id.rsplit('/')
        .next()
        .filter(|s| !s.is_empty() && !s.starts_with('.'))
        .map(str::to_string)
}

/// `--model` as a safetensors directory: GGUF files (already converted) and directories
/// without config.json are refused, naming what was given.
fn source_dir(args: &QuantizeArgs) -> Result<PathBuf, CliError> {
    let given = Path::new(&args.model);
    let is_gguf = qwen2vl::pipeline::is_gguf_path(given)
        || (given.is_dir() && qwen2vl::pipeline::gguf_dir(given)?.is_some());
    if is_gguf {
        return Err(CliError::Usage(format!(
            "--model {} is a GGUF model; quantize reads a safetensors model (a directory \
             holding config.json and *.safetensors, or a Hugging Face repo id)",
            args.model
        )));
    }
    let dir = crate::hub::resolve_model(&args.model, args.quiet)?;
    if !dir.join("config.json").is_file() {
        return Err(CliError::Usage(format!(
            "--model {} is not a safetensors model: {} has no config.json (allowed: a \
             directory holding config.json, *.safetensors and tokenizer.json, or a Hugging \
             Face repo id)",
            args.model,
            dir.display()
        )));
    }
    Ok(dir)
}

/// Refuses an `--out` that is a file, or a non-empty directory without `--force`; with
/// `--force`, one that holds other GGUF files (the directory would then hold two models).
fn check_out(
    out: &Path,
    force: bool,
    name: &Option<String>,
    quant: QuantScheme,
    vision_quant: Option<QuantScheme>,
) -> Result<(), CliError> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        return Err(CliError::Usage(format!(
            "--out {} is a file; allowed: a new or empty directory",
            out.display()
        )));
    }
    // The temporaries an interrupted run left (`.NAME.partial`) do not count: they are
    // replaced when the same file is written again.
    let entries: Vec<String> = std::fs::read_dir(out)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !(n.starts_with('.') && n.ends_with(".partial")))
        .collect();
    if entries.is_empty() {
        return Ok(());
    }
    if !force {
        return Err(CliError::Usage(format!(
            "--out {} is not empty ({} entries); allowed: a new or empty directory, or --force \
             to write into it",
            out.display(),
            entries.len()
        )));
    }
    let Some(name) = name else {
        return Ok(());
    };
    let (text, mmproj) = export::file_names(name, Some(quant), vision_quant);
    let mut others: Vec<&String> = entries
        .iter()
        .filter(|e| e.to_ascii_lowercase().ends_with(".gguf") && !e.starts_with('.'))
        .filter(|e| **e != text && **e != mmproj)
        .collect();
    others.sort();
    if !others.is_empty() {
        return Err(CliError::Usage(format!(
            "--out {} already holds other GGUF files ({}); with them the directory would hold \
             two models. Allowed: remove them, or choose another --out",
            out.display(),
            others
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(())
}

/// A byte progress bar on an interactive stderr, unless `-q`.
fn progress_bar(quiet: bool) -> Option<ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let style =
        ProgressStyle::with_template("quantizing [{wide_bar}] {bytes}/{total_bytes} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    Some(ProgressBar::new(0).with_style(style))
}

/// The files written, their sizes, the time taken, and how to run the result.
fn print_summary(files: &[(PathBuf, u64)], seconds: f64, out: &Path) {
    let list: Vec<String> = files
        .iter()
        .map(|(p, len)| format!("{} ({})", p.display(), HumanBytes(*len)))
        .collect();
    println!(
        "wrote {} file{}: {} in {seconds:.1} s",
        files.len(),
        if files.len() == 1 { "" } else { "s" },
        list.join(", ")
    );
    let example = if files.len() > 1 {
        "--image photo.jpg \"Describe this image.\""
    } else {
        "\"Hello!\""
    };
    println!("run it: qwen2vl run --model {} {example}", out.display());
}

//! `qwen2vl`: run Qwen2-VL models from the command line.

mod bench;
mod chat;
mod common;
mod draw;
mod error;
mod hub;
mod quantize;
mod run;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "qwen2vl",
    version,
    about = "Run Qwen2-VL vision-language models locally"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once at startup: boxing the big variants would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Answer one prompt, optionally about images and videos, streaming the answer to stdout.
    ///
    /// Example: qwen2vl run --model ./Qwen2-VL-2B-Instruct --image photo.jpg "Describe this image."
    Run(run::RunArgs),
    /// Talk with a model over several turns: a prompt with line editing, or a script on stdin.
    ///
    /// Example: qwen2vl chat --model ./Qwen2-VL-2B-Instruct --image photo.jpg
    Chat(chat::ChatArgs),
    /// Download a model from the Hugging Face Hub into the local cache and print its directory.
    ///
    /// Example: qwen2vl download Qwen/Qwen2-VL-2B-Instruct
    Download(hub::DownloadArgs),
    /// Time the standard workload (one image, one prompt, N new tokens with EOS ignored):
    /// load, vision, prefill, time to first token, decode tokens/s and peak memory, as median,
    /// min and max over repeated runs.
    ///
    /// Example: qwen2vl bench --model ./Qwen2-VL-2B-Instruct --image-size 640x480 --new-tokens 32 --runs 3
    Bench(bench::BenchArgs),
    /// Serve an OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models, /health,
    /// /metrics) on 127.0.0.1 unless --host says otherwise.
    ///
    /// Example: qwen2vl serve --model ./Qwen2-VL-2B-Instruct --port 8080 --api-key secret
    Serve(serve::ServeArgs),
    /// Write a safetensors model as pre-quantized GGUF files (llama.cpp's layout: a text
    /// model and an mmproj vision projector) that load without quantizing; --model OUT then
    /// loads them, and llama.cpp reads them too.
    ///
    /// Example: qwen2vl quantize --model ./Qwen2-VL-2B-Instruct --quant q4_k_m --out ./Qwen2-VL-2B-q4_k_m
    Quantize(quantize::QuantizeArgs),
}

/// Keeps freed memory in the process instead of returning it to the OS.
///
/// Every tensor op allocates its output; glibc serves large blocks with fresh `mmap`s and
/// unmaps them on free, so each op on a big activation (a 1564x1564x16 attention score
/// matrix, a 1564x5120 MLP activation) page-faults and zeroes new memory: a third of the
/// vision tower's time on a 640x480 image. Serving every block from the heap and never
/// trimming it lets those buffers be reused; peak memory is unchanged. (The engine hands the
/// free pages back when it goes idle.)
///
/// One malloc arena for the whole process instead of glibc's eight per core. A server's many
/// short-lived threads (HTTP workers, a preprocessing thread per media request) otherwise
/// spread their blocks over up to 8 x cores heaps, each keeping its own high-water mark: in
/// the soak test (`tests/soak.rs`, 2 cores) the resting size after 600 mixed requests varied
/// from 199 to 328 MiB from run to run with the default and stayed at 160-177 MiB with one
/// arena per core. And a second arena splits the same working set in two: the tokenizer is
/// built on the main thread, the forward passes run on the compute pool's threads, so with
/// one arena per core the free blocks the load left could not serve the vision tower, whose
/// own arena grew beside them (peak RSS of the 2B q8_0 model on a 640x480 image 3 188 MiB
/// with two arenas, 3 125 MiB with one, at the same speed; the allocations of a forward
/// pass are one per tensor op, too few to contend on the lock).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator tuning; called before any other thread
        // exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QWEN2VL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run(args) => run::main(args),
        Command::Chat(args) => chat::main(args),
        Command::Download(args) => hub::download_main(args),
        Command::Bench(args) => bench::main(args),
        Command::Serve(args) => serve::main(args),
        Command::Quantize(args) => quantize::main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

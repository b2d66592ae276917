//! `qwen2vl quantize` from the command line: the tiny model quantized to a directory that
//! `qwen2vl run --model DIR` then answers from, as `--quant` of the safetensors does; and
//! the flag errors. (The files themselves are tested in the library's `tests/gguf_model.rs`
//! and, for the text models, `tests/gguf_text.rs`.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tiny() -> String {
    fixtures().join("tiny-qwen2vl").display().to_string()
}

/// A fresh scratch directory for one test under the target directory.
fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cli-quantize-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn qwen2vl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qwen2vl"))
        .args(args)
        .output()
        .expect("binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Quantized once, the directory runs with and without an image and answers as the
/// safetensors model does with `--quant q4_k_m`; the summary names both files and how to
/// run them.
#[test]
fn quantize_then_run_the_directory() {
    let out = scratch("q4_k_m").join("out");
    let out_s = out.display().to_string();
    let o = qwen2vl(&[
        "quantize",
        "--model",
        &tiny(),
        "--quant",
        "q4_k_m",
        "--out",
        &out_s,
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = stdout(&o);
    assert!(
        summary.contains("wrote 2 files")
            && summary.contains("tiny-qwen2vl-q4_k_m.gguf")
            && summary.contains("mmproj-tiny-qwen2vl-f16.gguf")
            && summary.contains(&format!("qwen2vl run --model {out_s}")),
        "{summary}"
    );
    assert!(out.join("tiny-qwen2vl-q4_k_m.gguf").is_file());
    let image = fixtures().join("images/photo640.png").display().to_string();
    let common = [
        "--max-new-tokens",
        "6",
        "--image",
        &image,
        "-q",
        "Describe.",
    ];
    let ours = qwen2vl(&[&["run", "--model", &out_s][..], &common].concat());
    assert!(ours.status.success(), "{}", stderr(&ours));
    let reference = qwen2vl(
        &[
            &["run", "--model", &tiny(), "--quant", "q4_k_m"][..],
            &common,
        ]
        .concat(),
    );
    assert!(reference.status.success(), "{}", stderr(&reference));
    assert!(!stdout(&ours).trim().is_empty());
    assert_eq!(stdout(&ours), stdout(&reference));
}

/// A text model (`Qwen2MoeForCausalLM`, experts included) quantizes to one `qwen2moe` file
/// that answers as `--quant q8_0` of the safetensors does (greedy); `--vision-quant` is refused for it
/// (it has no vision tower).
#[test]
fn a_text_model_quantizes_to_one_file() {
    let moe = fixtures().join("tiny-qwen2-moe").display().to_string();
    let out = scratch("moe").join("out");
    let out_s = out.display().to_string();
    let o = qwen2vl(&[
        "quantize", "--model", &moe, "--quant", "q8_0", "--out", &out_s, "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = stdout(&o);
    assert!(
        summary.contains("wrote 1 file:") && summary.contains("tiny-qwen2-moe-q8_0.gguf"),
        "{summary}"
    );
    // Greedy: the GGUF keeps only some sampling defaults of generation_config.json.
    let common = [
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
        "-q",
        "Hello! Who are you?",
    ];
    let ours = qwen2vl(&[&["run", "--model", &out_s][..], &common].concat());
    assert!(ours.status.success(), "{}", stderr(&ours));
    let reference = qwen2vl(&[&["run", "--model", &moe, "--quant", "q8_0"][..], &common].concat());
    assert!(reference.status.success(), "{}", stderr(&reference));
    assert!(!stdout(&ours).trim().is_empty());
    assert_eq!(stdout(&ours), stdout(&reference));

    let out2 = scratch("moe-vision").join("out").display().to_string();
    let o = qwen2vl(&[
        "quantize",
        "--model",
        &moe,
        "--quant",
        "q8_0",
        "--vision-quant",
        "q8_0",
        "--out",
        &out2,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("Qwen2MoeForCausalLM checkpoint, which has no vision tower"),
        "{}",
        stderr(&o)
    );
}

/// Bad flags are usage errors (exit 2) that say what is allowed, before any work.
#[test]
fn bad_arguments_are_named() {
    let d = scratch("bad");
    let out = d.join("out").display().to_string();
    let o = qwen2vl(&[
        "quantize",
        "--model",
        &tiny(),
        "--quant",
        "q3_k",
        "--out",
        &out,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("unknown quantization \"q3_k\"") && stderr(&o).contains("q4_k_m"),
        "{}",
        stderr(&o)
    );

    let full = d.join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("notes.txt"), "keep").unwrap();
    let full_s = full.display().to_string();
    let o = qwen2vl(&[
        "quantize",
        "--model",
        &tiny(),
        "--quant",
        "q8_0",
        "--out",
        &full_s,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is not empty") && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    // --force writes beside the other files, but refuses to leave two models there.
    let o = qwen2vl(&[
        "quantize",
        "--model",
        &tiny(),
        "--quant",
        "q8_0",
        "--out",
        &full_s,
        "--force",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = qwen2vl(&[
        "quantize",
        "--model",
        &tiny(),
        "--quant",
        "q6_k",
        "--out",
        &full_s,
        "--force",
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("already holds other GGUF files (tiny-qwen2vl-q8_0.gguf)"),
        "{}",
        stderr(&o)
    );

    let mmproj = fixtures().join("gguf/mmproj-tiny-qwen2vl-f16.gguf");
    let o = qwen2vl(&[
        "quantize",
        "--model",
        &mmproj.display().to_string(),
        "--quant",
        "q8_0",
        "--out",
        &out,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is a GGUF model; quantize reads a safetensors model"),
        "{}",
        stderr(&o)
    );
    let o = qwen2vl(&[
        "quantize", "--model", &full_s, "--quant", "q8_0", "--out", &out,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("is a GGUF model"), "{}", stderr(&o));
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = qwen2vl(&[
        "quantize",
        "--model",
        &empty.display().to_string(),
        "--quant",
        "q8_0",
        "--out",
        &out,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is not a safetensors model") && stderr(&o).contains("config.json"),
        "{}",
        stderr(&o)
    );
    assert!(!Path::new(&out).exists(), "nothing written for bad flags");
}

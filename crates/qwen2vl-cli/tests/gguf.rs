//! `--model model.gguf --mmproj mmproj.gguf` from the command line: the flag rules, and (with
//! `QWEN2VL_LLAMACPP_GGUF_DIR` set to `tools/reference/make_gguf_models.py`'s output) a run
//! on llama.cpp's files of the tiny model that answers as the safetensors model does. The
//! loading itself is tested in the library's `tests/gguf_model.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
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

fn mmproj() -> String {
    fixtures()
        .join("gguf/mmproj-tiny-qwen2vl-f16.gguf")
        .display()
        .to_string()
}

#[test]
fn mmproj_goes_with_a_gguf_model_only() {
    let tiny = fixtures().join("tiny-qwen2vl").display().to_string();
    let o = qwen2vl(&["run", "--model", &tiny, "--mmproj", &mmproj(), "-q", "Hi"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--mmproj") && stderr(&o).contains("goes with a GGUF text model"),
        "{}",
        stderr(&o)
    );
    let o = qwen2vl(&["run", "--model", "/nonexistent/model.gguf", "-q", "Hi"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("GGUF model /nonexistent/model.gguf not found"));
    let o = qwen2vl(&[
        "run",
        "--model",
        "/nonexistent/model.gguf",
        "--mmproj",
        "/nonexistent/mmproj.gguf",
        "-q",
        "Hi",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--mmproj /nonexistent/mmproj.gguf: no such file"));
}

#[test]
fn a_projector_given_as_the_model_is_named() {
    let o = qwen2vl(&["run", "--model", &mmproj(), "-q", "Hi"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("this is a vision projector") && e.contains("--mmproj"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

#[test]
fn llama_cpp_files_answer_like_safetensors() {
    let Some(dir) = std::env::var_os("QWEN2VL_LLAMACPP_GGUF_DIR").map(PathBuf::from) else {
        eprintln!("QWEN2VL_LLAMACPP_GGUF_DIR not set; skipped");
        return;
    };
    let image = fixtures().join("images/photo640.png").display().to_string();
    let tiny = fixtures().join("tiny-qwen2vl").display().to_string();
    let gguf = dir.join("tiny-qwen2vl-f16.gguf").display().to_string();
    let common = [
        "--image",
        &image,
        "--temperature",
        "0",
        "--max-new-tokens",
        "10",
        "-q",
        "Describe this image.",
    ];
    let st = qwen2vl(&[&["run", "--model", &tiny][..], &common].concat());
    let gg = qwen2vl(
        &[
            &["run", "--model", &gguf, "--mmproj", &mmproj()][..],
            &common,
        ]
        .concat(),
    );
    assert!(
        st.status.success() && gg.status.success(),
        "{}",
        stderr(&gg)
    );
    assert_eq!(st.stdout, gg.stdout);
}

//! Qwen2 text models (`Qwen2ForCausalLM`, `Qwen2MoeForCausalLM`) as GGUF files: llama.cpp's
//! `qwen2` and `qwen2moe` architectures, written by `qwen2vl quantize` (the library's
//! `gguf::export`) and loaded back.
//!
//! - the exporter writes the converter's layout: the keys, tensor names, types and `ne` of
//!   `convert_hf_to_gguf.py`'s own files (`tests/fixtures/gguf/llamacpp-qwen2-text.json`,
//!   from `tools/reference/make_gguf_text.py`), the f16 files byte for byte, for the dense
//!   tiny model and for an all-sparse MoE one (experts stacked in `ffn_*_exps`, router
//!   `ffn_gate_inp`, shared expert `ffn_*_shexp` and its gate `ffn_gate_inp_shexp`);
//! - an f16 file answers as the safetensors model does: the same greedy tokens, logits
//!   within f16 rounding;
//! - a quantized file (experts in q8_0, and in q4_K / q6_K on a model wide enough for them)
//!   gives the logits of `--quant` at load bit for bit;
//! - a sliding window below the context travels in the file;
//! - a GGUF model's weights are checked against the free memory before they are read.

mod common;
#[path = "common/manifest.rs"]
mod manifest;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use qwen2vl::config::Architecture;
use qwen2vl::generation::sampler::SamplingParams;
use qwen2vl::generation::GenerateRequest;
use qwen2vl::gguf::export::{export, ExportOptions};
use qwen2vl::gguf::GgufFile;
use qwen2vl::ops::quant::plan::QuantScheme;
use qwen2vl::pipeline::{DTypeChoice, LoadOptions, Pipeline};
use qwen2vl::processing::messages::Message;
use serde_json::Value as Json;

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh directory of its own (tests run in parallel).
fn tmp(name: &str) -> Scratch {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!(
        "qwen2vl-gguf-text-{}-{n}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

/// Writes an all-sparse `Qwen2MoeForCausalLM` into `dir`: 2 layers, hidden 32, 4 experts of
/// width 32 (top 2, not renormalised, as the released models), a shared expert of width 64,
/// tied embeddings over the Qwen2 vocabulary (the converter needs the real tokenizer),
/// bf16 weights from a fixed LCG, and the tokenizer files of `tiny-qwen2-moe`. Wide enough
/// for q8_0 blocks in every expert.
fn write_sparse_moe(dir: &Path) {
    write_sparse_moe_sized(dir, 32, 32, 64);
}

/// [`write_sparse_moe`] with hidden size `d`, experts of width `inter` and a shared expert of
/// width `shared`.
fn write_sparse_moe_sized(dir: &Path, d: usize, inter: usize, shared: usize) {
    let (e, vocab) = (4usize, 151936usize);
    let cfg = serde_json::json!({
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "vocab_size": vocab, "hidden_size": d, "intermediate_size": shared,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": true, "sliding_window": null, "use_sliding_window": false,
        "num_experts": e, "num_experts_per_tok": 2, "moe_intermediate_size": inter,
        "shared_expert_intermediate_size": shared, "norm_topk_prob": false,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu",
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16"
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    let src = common::fixtures().join("tiny-qwen2-moe");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = |shape: &[usize], scale: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    };
    let s = 1.0 / (d as f32).sqrt();
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), rand(&[vocab, d], 1.0));
    let norm = |rand: &mut dyn FnMut(&[usize], f32) -> Tensor| {
        rand(&[d], 0.1)
            .to_dtype(DType::F32)
            .unwrap()
            .affine(1.0, 1.0)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    };
    t.insert("model.norm.weight".into(), norm(&mut rand));
    let mlp = |t: &mut HashMap<String, Tensor>,
               rand: &mut dyn FnMut(&[usize], f32) -> Tensor,
               p: String,
               width: usize| {
        t.insert(format!("{p}.gate_proj.weight"), rand(&[width, d], s));
        t.insert(format!("{p}.up_proj.weight"), rand(&[width, d], s));
        t.insert(
            format!("{p}.down_proj.weight"),
            rand(&[d, width], 1.0 / (width as f32).sqrt()),
        );
    };
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(format!("{p}.{n}.weight"), norm(&mut rand));
        }
        let a = format!("{p}.self_attn");
        for (n, rows) in [("q_proj", d), ("k_proj", d / 2), ("v_proj", d / 2)] {
            t.insert(format!("{a}.{n}.weight"), rand(&[rows, d], s));
            t.insert(format!("{a}.{n}.bias"), rand(&[rows], 0.1));
        }
        t.insert(format!("{a}.o_proj.weight"), rand(&[d, d], s));
        t.insert(format!("{p}.mlp.gate.weight"), rand(&[e, d], 4.0 * s));
        t.insert(
            format!("{p}.mlp.shared_expert_gate.weight"),
            rand(&[1, d], s),
        );
        mlp(&mut t, &mut rand, format!("{p}.mlp.shared_expert"), shared);
        for k in 0..e {
            mlp(&mut t, &mut rand, format!("{p}.mlp.experts.{k}"), inter);
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

/// The sparse MoE checkpoint (10 MB), written once into the temporary directory and reused
/// by later runs (it is the same every time): written under a name of its own, then renamed.
fn sparse_moe() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join("qwen2vl-gguf-text-sparse-moe-v1");
        if !d.join("complete").is_file() {
            let part = std::env::temp_dir().join(format!(
                "qwen2vl-gguf-text-sparse-moe-{}.partial",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&part);
            std::fs::create_dir_all(&part).unwrap();
            write_sparse_moe(&part);
            std::fs::write(part.join("complete"), b"").unwrap();
            let _ = std::fs::remove_dir_all(&d);
            if std::fs::rename(&part, &d).is_err() {
                // Another test process got there first.
                let _ = std::fs::remove_dir_all(&part);
            }
        }
        d
    })
}

/// With QWEN2VL_WRITE_SPARSE_MOE=DIR, writes the sparse MoE checkpoint there (for
/// `tools/reference/make_gguf_text.py`).
#[test]
fn sparse_moe_checkpoint_is_written() {
    if let Ok(dir) = std::env::var("QWEN2VL_WRITE_SPARSE_MOE") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        write_sparse_moe(&dir);
    }
    let c = qwen2vl::config::Qwen2VLConfig::from_file(&sparse_moe().join("config.json")).unwrap();
    assert_eq!(c.architecture, Architecture::Qwen2Moe);
}

/// `dir` exported as `<name>-<scheme>.gguf` into a fresh directory; that directory.
fn export_to(dir: &Path, name: &str, quant: Option<QuantScheme>) -> Scratch {
    let out = tmp(&format!("{name}-{}", quant.map_or("f16", |q| q.name())));
    let written = export(
        dir,
        &out,
        &ExportOptions {
            quant,
            name: Some(name.to_string()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(written.files.len(), 1, "a text model has no projector");
    out
}

fn file_in(out: &Path) -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(v.len(), 1, "{v:?}");
    v.pop().unwrap()
}

fn load(model: &Path, quant: Option<QuantScheme>) -> Pipeline {
    Pipeline::load_with(
        model,
        &LoadOptions {
            dtype: DTypeChoice::F32,
            quant,
            ..LoadOptions::default()
        },
    )
    .unwrap()
}

fn request() -> GenerateRequest {
    GenerateRequest::new(vec![Message::user(
        "Write a haiku about experts: ünïcødé 你好",
    )])
    .with_sampling(SamplingParams::greedy())
    .with_max_new_tokens(10)
}

fn greedy(p: &Pipeline) -> Vec<u32> {
    p.generate(&request(), &mut |_| {}).unwrap().token_ids
}

/// Every prompt position's logits, in f32.
fn prompt_logits(p: &Pipeline) -> Vec<f32> {
    let inputs = p.prepare(&request()).unwrap();
    let m = p.model();
    let mut cache = m.new_cache(inputs.input_ids.len()).unwrap();
    let h = m
        .prefill_hidden(
            &inputs.input_ids,
            &inputs.positions,
            None,
            None,
            &mut cache,
            None,
        )
        .unwrap();
    common::flat(&m.text().logits(&h.squeeze(0).unwrap()).unwrap())
}

fn manifest() -> Json {
    let path = common::fixtures().join("gguf/llamacpp-qwen2-text.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Our files are the converter's: the f16 ones byte for byte (every key, every tensor's
/// bytes), the MoE's q8_0 one in keys, names, types and `ne` (gguf-py's q8_0 rounds a few
/// blocks differently from ggml's, whose blocks ours are). The dense tiny model's q8_0 file
/// is not compared: its rows of 16 and 8 values fit no q8_0 block, and there the converter
/// falls back to f16 while we keep f32 (what `--quant q8_0` computes with).
#[test]
fn the_layout_is_the_llama_cpp_converters() {
    let m = manifest();
    let tiny = common::fixtures().join("tiny-qwen2");
    for (dir, stem, quants) in [
        (tiny.as_path(), "tiny-qwen2", &[None][..]),
        (
            sparse_moe(),
            "tiny-qwen2moe",
            &[None, Some(QuantScheme::Q8_0)][..],
        ),
    ] {
        for &quant in quants {
            let out = export_to(dir, stem, quant);
            let name = format!("{stem}-{}.gguf", quant.map_or("f16", |q| q.name()));
            let ours = GgufFile::open(&out.join(&name)).unwrap();
            manifest::check(&ours, &m["files"][&name], quant.is_none());
        }
    }
}

/// The converter's own files, when `QWEN2VL_LLAMACPP_TEXT_GGUF_DIR` names the directory
/// `make_gguf_text.py` wrote them to: they load and answer as the safetensors models do
/// (f16: the same greedy tokens; q8_0: the same greedy tokens as `--quant q8_0`).
#[test]
fn llama_cpp_text_files_when_given() {
    let Ok(dir) = std::env::var("QWEN2VL_LLAMACPP_TEXT_GGUF_DIR") else {
        eprintln!("QWEN2VL_LLAMACPP_TEXT_GGUF_DIR not set: skipped");
        return;
    };
    let dir = PathBuf::from(dir);
    let tiny = common::fixtures().join("tiny-qwen2");
    for (model, stem) in [
        (tiny.as_path(), "tiny-qwen2"),
        (sparse_moe(), "tiny-qwen2moe"),
    ] {
        let st = load(model, None);
        let gg = load(&dir.join(format!("{stem}-f16.gguf")), None);
        assert_eq!(greedy(&gg), greedy(&st), "{stem} f16");
        let max = common::max_abs_diff(&prompt_logits(&gg), &prompt_logits(&st));
        eprintln!("{stem}: llama.cpp's f16 file vs safetensors f32: max |Δlogit| {max}");
        let st = load(model, Some(QuantScheme::Q8_0));
        let gg = load(&dir.join(format!("{stem}-q8_0.gguf")), None);
        assert_eq!(greedy(&gg), greedy(&st), "{stem} q8_0");
    }
    // `llama-quantize tiny-qwen2moe-f16.gguf tiny-qwen2moe-q4_k_m.gguf Q4_K_M`, when present:
    // rows of 32 fit no k-quant, so its experts are llama-quantize's q5_0 fallback (widened
    // at load); the logits stay near the float model's.
    let q4 = dir.join("tiny-qwen2moe-q4_k_m.gguf");
    if q4.is_file() {
        let f = GgufFile::open(&q4).unwrap();
        let t = f.tensor_info("blk.0.ffn_up_exps.weight").unwrap();
        assert_eq!(t.ggml_type().name(), "q5_0");
        let (a, b) = (
            prompt_logits(&load(sparse_moe(), None)),
            prompt_logits(&load(&q4, None)),
        );
        let max = common::max_abs_diff(&a, &b);
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        eprintln!("llama-quantize's q4_k_m MoE vs f32: max |Δlogit| {max} (max |logit| {scale})");
        assert!(max < 0.1 * scale, "{max}");
    }
}

/// An f16 file answers as the f32 safetensors model: the same greedy tokens and the same
/// prompt logits within f16 rounding (the tiny models' weights are bf16 or f16, which f16
/// holds exactly but for a few subnormals), for the dense models, the tiny MoE (one sparse
/// and one dense layer, `mlp_only_layers`, kept as `ffn_*` tensors) and the all-sparse one.
#[test]
fn f16_files_answer_as_the_safetensors_models() {
    let f = common::fixtures();
    let (tiny, untied, moe) = (
        f.join("tiny-qwen2"),
        f.join("tiny-qwen2-untied"),
        f.join("tiny-qwen2-moe"),
    );
    for (dir, arch) in [
        (tiny.as_path(), Architecture::Qwen2),
        (untied.as_path(), Architecture::Qwen2),
        (moe.as_path(), Architecture::Qwen2Moe),
        (sparse_moe(), Architecture::Qwen2Moe),
    ] {
        let out = export_to(dir, "m", None);
        let gg = load(&file_in(&out), None);
        let st = load(dir, None);
        assert_eq!(gg.model().config().architecture, arch);
        let (mut want, mut got) = (st.model().config().clone(), gg.model().config().clone());
        // Not in the GGUF metadata (and the window is not applied below it).
        for c in [&mut want, &mut got] {
            c.torch_dtype = None;
            c.text.sliding_window = None;
            c.text.max_window_layers = None;
            c.text.use_sliding_window = false;
            c.text.bos_token_id = None;
            c.text.eos_token_id = None;
        }
        assert_eq!(got.architecture, want.architecture);
        assert_eq!(got.text, want.text, "{}", dir.display());
        let (a, b) = (prompt_logits(&st), prompt_logits(&gg));
        let max = common::max_abs_diff(&a, &b);
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        eprintln!(
            "{}: f16 GGUF vs safetensors: max |Δlogit| {max} (max |logit| {scale})",
            dir.display()
        );
        assert!(max <= 1e-2 * scale.max(1.0), "{}: {max}", dir.display());
        let tokens = greedy(&st);
        assert_eq!(tokens.len(), 10);
        assert_eq!(greedy(&gg), tokens, "{}", dir.display());
    }
}

/// `qwen2vl quantize` of a text model gives what `--quant` at load gives, bit for bit: the
/// same prompt logits and tokens (the experts' matrices in q8_0, stacked; the router and the
/// shared expert's gate in f32, as both keep them).
#[test]
fn quantized_files_are_quant_at_load() {
    let f = common::fixtures();
    let (tiny, moe) = (f.join("tiny-qwen2"), f.join("tiny-qwen2-moe"));
    for dir in [tiny.as_path(), moe.as_path(), sparse_moe()] {
        for scheme in [QuantScheme::Q8_0, QuantScheme::Q4KM] {
            let out = export_to(dir, "m", Some(scheme));
            let path = file_in(&out);
            if dir == sparse_moe() {
                let f = GgufFile::open(&path).unwrap();
                let t = f.tensor_info("blk.1.ffn_down_exps.weight").unwrap();
                assert_eq!(t.ne(), [32, 32, 4]);
                assert_eq!(t.ggml_type().name(), "q8_0");
                let r = f.tensor_info("blk.1.ffn_gate_inp.weight").unwrap();
                assert_eq!(r.ggml_type().name(), "f32");
            }
            let gg = load(&path, None);
            let st = load(dir, Some(scheme));
            let (a, b) = (prompt_logits(&st), prompt_logits(&gg));
            // Matrices the plan leaves float are f32 in the file and bf16 in the checkpoint:
            // the same values, both multiplied in f32, but the f32 ones through candle's
            // matmul and the bf16 ones in place through `ops::gemm_half`, which sum in
            // another order. Bit-identical when every matrix is quantized.
            let float_left = GgufFile::open(&path)
                .unwrap()
                .tensors()
                .iter()
                .any(|t| t.ne().len() >= 2 && t.ggml_type().name() == "f32");
            let diff = common::max_abs_diff(&a, &b);
            assert!(
                if float_left { diff <= 1e-4 } else { a == b },
                "{} {scheme}: max |Δlogit| {diff} (float matrices left: {float_left})",
                dir.display(),
            );
            assert_eq!(greedy(&gg), greedy(&st), "{} {scheme}", dir.display());
        }
    }
}

/// The memory estimate of a GGUF model counts its tensors as they will be held: an f16 file
/// in f32 counts what the f32 safetensors load counts, a q8_0 file its blocks (what
/// `--quant q8_0` of the safetensors counts). A file whose weights exceed the free memory is
/// refused before anything is read, naming both figures and the override.
#[test]
fn gguf_loads_are_checked_against_free_memory() {
    use qwen2vl::ops::quant::plan::QuantPlan;
    use qwen2vl::weights::Weights;
    let untied = common::fixtures().join("tiny-qwen2-untied");
    for dir in [untied.as_path(), sparse_moe()] {
        let st = Weights::from_dir(dir, DType::F32, &Device::Cpu).unwrap();
        for scheme in [None, Some(QuantScheme::Q8_0)] {
            let plan = QuantPlan {
                text: scheme,
                vision: None,
                layers: 2,
            };
            let out = export_to(dir, "m", scheme);
            let model = qwen2vl::gguf::model::GgufModel::open(&file_in(&out), None).unwrap();
            let gg = Weights::from_gguf(std::sync::Arc::new(model), DType::F32, &Device::Cpu);
            let (a, b) = (
                st.resident_bytes(DType::F32, Some(&plan)),
                gg.resident_bytes(DType::F32, None),
            );
            // f32 compute reads the checkpoint's bf16 matrices in place (2 bytes a value);
            // the matrices a quantized file keeps float are f32 there (4 bytes).
            let f32_matrices: u64 = GgufFile::open(&file_in(&out))
                .unwrap()
                .tensors()
                .iter()
                .filter(|&t| t.ne().len() >= 2 && t.ggml_type().name() == "f32")
                .map(|t| t.ne().iter().product::<u64>())
                .sum();
            assert_eq!(a + 2 * f32_matrices, b, "{} {scheme:?}", dir.display());
            assert!(a > 0);
        }
    }
    let dir = untied;

    // A file whose first MLP matrix claims 2^36 f16 values (a 128 GiB file, read in place by f32
    // compute, so 128 GiB of weights), its data a
    // hole in a sparse file: refused up front, before a byte of it is read.
    let out = export_to(&dir, "m", None);
    let plan = qwen2vl::gguf::export::Checkpoint::open(&dir)
        .unwrap()
        .text_plan(None, "m")
        .unwrap();
    let mut w = qwen2vl::gguf::GgufWriter::new();
    for (k, v) in &plan.metadata {
        w.add(k, v.clone()).unwrap();
    }
    for t in &plan.tensors {
        let ne: Vec<u64> = if t.name == "blk.0.ffn_up.weight" {
            vec![1 << 18, 1 << 18]
        } else {
            t.ne.clone()
        };
        w.add_tensor(&t.name, t.ggml_type, &ne).unwrap();
    }
    let huge = out.join("huge.gguf");
    let file = std::fs::File::create(&huge).unwrap();
    let len = w.file_len();
    drop(w.begin(std::io::BufWriter::new(&file)).unwrap());
    file.set_len(len).unwrap();
    if std::env::var_os(qwen2vl::memory::OVERRIDE_ENV).is_some() {
        eprintln!(
            "{} is set: the refusal is not checked",
            qwen2vl::memory::OVERRIDE_ENV
        );
    } else {
        let Err(e) = Pipeline::load_with(&huge, &LoadOptions::default()) else {
            panic!("a 128 GiB model was loaded");
        };
        let e = e.to_string();
        assert!(
            e.contains("needs about 128.") && e.contains("GiB is available (MemAvailable)"),
            "{e}"
        );
        assert!(
            e.contains("huge.gguf") && e.contains(qwen2vl::memory::OVERRIDE_ENV),
            "{e}"
        );
    }
}

/// A window below the context travels in the file (`qwen2.attention.sliding_window`, which
/// llama.cpp's qwen2 graph does not read): the GGUF of `reference-swa.json`'s model gives
/// transformers' 24 greedy tokens past the window, as the safetensors model does.
#[test]
fn a_sliding_window_travels_in_the_file() {
    let dir = tmp("swa-model");
    let meta = common::tiny_qwen2_swa(&dir);
    let r = candle_core::safetensors::load(
        common::fixtures().join("tiny-qwen2/reference-swa.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let want: Vec<u32> = r["greedy_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let out = export_to(&dir, "swa", None);
    let path = file_in(&out);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(
        f.get("qwen2.attention.sliding_window"),
        Some(&qwen2vl::gguf::MetaValue::U32(12))
    );
    let p = load(&path, None);
    assert_eq!(p.model().config().text.attention_window(), Some(12));
    let messages: Vec<Message> = serde_json::from_value(meta["messages"].clone()).unwrap();
    let req = GenerateRequest::new(messages)
        .with_sampling(SamplingParams::greedy())
        .with_max_new_tokens(want.len());
    assert_eq!(p.generate(&req, &mut |_| {}).unwrap().token_ids, want);
}

/// Experts in k-quants: a sparse MoE wide enough for 256-value blocks (hidden 256), written
/// as q4_k_m, holds llama.cpp's mix in its stacked experts (q4_K; q6_K for the down
/// projections of the last layer, `use_more_bits`) and loads, each expert read out of its
/// stack as stored, to the logits of `--quant q4_k_m`, bit for bit.
#[test]
fn k_quant_experts_are_quant_at_load() {
    let dir = tmp("k-moe");
    write_sparse_moe_sized(&dir, 256, 256, 256);
    let out = export_to(&dir, "k", Some(QuantScheme::Q4KM));
    let path = file_in(&out);
    let f = GgufFile::open(&path).unwrap();
    for (name, ty) in [
        ("blk.0.ffn_gate_exps.weight", "q4_K"),
        ("blk.0.ffn_down_exps.weight", "q4_K"),
        ("blk.1.ffn_up_exps.weight", "q4_K"),
        ("blk.1.ffn_down_exps.weight", "q6_K"),
        ("blk.1.ffn_gate_inp.weight", "f32"),
    ] {
        let t = f.tensor_info(name).unwrap();
        assert_eq!(t.ggml_type().name(), ty, "{name}");
    }
    let gg = load(&path, None);
    let st = load(&dir, Some(QuantScheme::Q4KM));
    let (a, b) = (prompt_logits(&st), prompt_logits(&gg));
    assert!(a == b, "max |Δlogit| {}", common::max_abs_diff(&a, &b));
}

//! Loading llama.cpp's GGUF files of Qwen2-VL (`--model model.gguf --mmproj mmproj.gguf`).
//!
//! The text GGUFs of the tiny fixture are ~25 MB (f16) and ~16 MB (q8_0) — the 151,936-row
//! embedding and the tokenizer's 152k tokens and 151k merges — too big to commit. So the
//! tests write them from the safetensors fixture with the library's exporter
//! (`qwen2vl::gguf::export`, what `qwen2vl quantize` runs), in the layout of llama.cpp's
//! converter (`convert_hf_to_gguf.py`, commit 0c1e570), and hold that layout to what the
//! converter wrote: `tests/fixtures/gguf/llamacpp-tiny-qwen2vl.json` lists
//! every key (type, value or length) and tensor (type, `ne`) of the converter's three files,
//! and the converter's own vision projector (`mmproj-tiny-qwen2vl-f16.gguf`, 0.5 MB) is
//! committed and used as it is. `tools/reference/make_gguf_models.py` regenerates both; with
//! `QWEN2VL_LLAMACPP_GGUF_DIR` set to its output directory, the converter's text files are
//! checked byte for byte against ours and loaded too.

mod common;
#[path = "common/manifest.rs"]
mod manifest;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use qwen2vl::generation::sampler::SamplingParams;
use qwen2vl::generation::GenerateRequest;
use qwen2vl::gguf::export::{gguf_text_name, GgufPlan, PlannedTensor, TensorSource};
use qwen2vl::gguf::{GgmlType, GgufFile, GgufWriter, MetaArray, MetaValue};
use qwen2vl::ops::quant::plan::QuantScheme;
use qwen2vl::ops::quant::{QMatrix, QType};
use qwen2vl::pipeline::{DTypeChoice, LoadOptions, Pipeline};
use qwen2vl::processing::tokenizer::Qwen2Tokenizer;
use serde_json::Value as Json;

fn tiny() -> PathBuf {
    common::fixtures().join("tiny-qwen2vl")
}

fn gguf_fixtures() -> PathBuf {
    common::fixtures().join("gguf")
}

/// llama.cpp's vision projector of the tiny model (committed).
fn mmproj() -> PathBuf {
    gguf_fixtures().join("mmproj-tiny-qwen2vl-f16.gguf")
}

/// This process's scratch directory under the target directory (~70 MB of GGUF files);
/// those of earlier runs whose process is gone are removed the first time.
fn tmp_dir() -> PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        if let Ok(entries) = std::fs::read_dir(root) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("gguf-model-") {
                    // (Only where /proc tells which processes are alive.)
                    let proc = Path::new("/proc");
                    if proc.join("self").exists() && !proc.join(pid).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let d = root.join(format!("gguf-model-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
    .clone()
}

/// Checkpoint name → (shape, values in f32).
type Checkpoint = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// The safetensors fixture's tensors in f32, PyTorch order.
fn checkpoint() -> &'static Checkpoint {
    static T: OnceLock<Checkpoint> = OnceLock::new();
    T.get_or_init(|| {
        let bytes = std::fs::read(tiny().join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(name, v)| {
                assert_eq!(v.dtype(), safetensors::Dtype::BF16, "{name}");
                let vals = v
                    .data()
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect();
                (name, (v.shape().to_vec(), vals))
            })
            .collect()
    })
}

fn json(path: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// How the text file is written.
#[derive(Clone, Copy, PartialEq)]
enum OutType {
    F16,
    Q8_0,
}

#[derive(Clone)]
struct TextOptions {
    out: OutType,
    /// `blk.N.attn_qkv` instead of q, k, v (the converter's `--fuse-qkv`).
    fuse_qkv: bool,
    arch: &'static str,
    /// Tensors left out.
    drop: Vec<&'static str>,
    /// A tensor stored in another type: (name, type, bytes).
    retype: Option<(&'static str, GgmlType, Vec<u8>)>,
}

impl Default for TextOptions {
    fn default() -> Self {
        TextOptions {
            out: OutType::F16,
            fuse_qkv: false,
            arch: "qwen2vl",
            drop: Vec::new(),
            retype: None,
        }
    }
}

/// One tensor to write: name, type, `ne`, bytes.
type Planned = (String, GgmlType, Vec<u64>, Vec<u8>);

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write(path: &Path, meta: Vec<(&str, MetaValue)>, tensors: Vec<Planned>) {
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.add(k, v).unwrap();
    }
    for (name, t, ne, _) in &tensors {
        w.add_tensor(name, *t, ne).unwrap();
    }
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut s = w.begin(file).unwrap();
    for (name, _, _, data) in &tensors {
        s.write_tensor(name, data).unwrap();
    }
    s.finish().unwrap();
}

/// The exporter's view of the tiny model (the library's `gguf::export`).
fn exporter() -> qwen2vl::gguf::export::Checkpoint {
    qwen2vl::gguf::export::Checkpoint::open(&tiny()).unwrap()
}

fn scheme(out: OutType) -> Option<QuantScheme> {
    match out {
        OutType::F16 => None,
        OutType::Q8_0 => Some(QuantScheme::Q8_0),
    }
}

/// The text model as the library's exporter writes it (llama.cpp's converter layout; see
/// the manifest test), changed as `o` says for the loader's error tests.
fn write_text(path: &Path, o: &TextOptions) {
    let ck = exporter();
    let mut plan = ck.text_plan(scheme(o.out), "tiny-qwen2vl").unwrap();
    if o.arch != "qwen2vl" {
        for (k, _) in plan.metadata.iter_mut() {
            if let Some(rest) = k.strip_prefix("qwen2vl.") {
                *k = format!("{}.{rest}", o.arch);
            }
        }
        plan.set("general.architecture", o.arch);
    }
    if o.fuse_qkv {
        fuse_qkv(&mut plan);
    }
    plan.tensors.retain(|t| !o.drop.contains(&t.name.as_str()));
    if let Some((name, t, bytes)) = &o.retype {
        let slot = plan.tensor_mut(name).unwrap();
        slot.ggml_type = *t;
        slot.source = TensorSource::Bytes(bytes.clone());
    }
    plan.write(&ck, path, &mut |_| {}).unwrap();
}

/// Each layer's q, k and v as one `attn_qkv` (rows stacked), as the converter's
/// `--fuse-qkv` writes them.
fn fuse_qkv(plan: &mut GgufPlan) {
    let find = |n: &str| plan.tensors.iter().find(|t| t.name == n).unwrap().clone();
    let mut fused = Vec::new();
    for q in plan.tensors.iter().filter(|t| t.name.contains(".attn_q.")) {
        let parts: Vec<PlannedTensor> = ["attn_q", "attn_k", "attn_v"]
            .iter()
            .map(|p| find(&q.name.replace("attn_q", p)))
            .collect();
        let mut ne = q.ne.clone();
        *ne.last_mut().unwrap() = parts.iter().map(|p| *p.ne.last().unwrap()).sum();
        fused.push(PlannedTensor {
            name: q.name.replace("attn_q", "attn_qkv"),
            ne,
            source: TensorSource::Stack(parts.iter().map(|p| p.hf_name.clone()).collect()),
            ..q.clone()
        });
    }
    let split = [".attn_q.", ".attn_k.", ".attn_v."];
    plan.tensors
        .retain(|t| !split.iter().any(|p| t.name.contains(p)));
    plan.tensors.extend(fused);
}

/// The vision projector as the library's exporter writes it.
fn write_mmproj(path: &Path, out: OutType) {
    let ck = exporter();
    let plan = ck.vision_plan(scheme(out), "tiny-qwen2vl").unwrap();
    plan.write(&ck, path, &mut |_| {}).unwrap();
}

/// The f16 and q8_0 text files and our mmproj, written once per test binary.
struct Files {
    f16: PathBuf,
    q8_0: PathBuf,
    mmproj: PathBuf,
}

fn files() -> &'static Files {
    static F: OnceLock<Files> = OnceLock::new();
    F.get_or_init(|| {
        let d = tmp_dir();
        let f = Files {
            f16: d.join("tiny-qwen2vl-f16.gguf"),
            q8_0: d.join("tiny-qwen2vl-q8_0.gguf"),
            mmproj: d.join("mmproj-tiny-qwen2vl-f16.gguf"),
        };
        write_text(&f.f16, &TextOptions::default());
        write_text(
            &f.q8_0,
            &TextOptions {
                out: OutType::Q8_0,
                ..TextOptions::default()
            },
        );
        write_mmproj(&f.mmproj, OutType::F16);
        f
    })
}

/// Our writer's files have the keys, types and tensors llama.cpp's converter wrote, and our
/// vision projector is the converter's byte for byte (tensor data and metadata values).
#[test]
fn the_layout_is_the_llama_cpp_converters() {
    let theirs = json(&gguf_fixtures().join("llamacpp-tiny-qwen2vl.json"));
    let f = files();
    for (path, name) in [
        (&f.f16, "tiny-qwen2vl-f16.gguf"),
        (&f.q8_0, "tiny-qwen2vl-q8_0.gguf"),
        (&f.mmproj, "mmproj-tiny-qwen2vl-f16.gguf"),
    ] {
        manifest::check(
            &GgufFile::open(path).unwrap(),
            &theirs["files"][name],
            false,
        );
    }
    let ours = GgufFile::open(&f.mmproj).unwrap();
    let theirs = GgufFile::open(&mmproj()).unwrap();
    for t in theirs.tensors() {
        assert_eq!(
            ours.tensor_bytes(t.name()).unwrap(),
            theirs.bytes_of(t).unwrap(),
            "mmproj tensor {}",
            t.name()
        );
    }
    for (k, v) in theirs.metadata() {
        assert_eq!(ours.get(k), Some(v), "mmproj key {k}");
    }
}

/// With the converter's own text files (tools/reference/make_gguf_models.py's output
/// directory in QWEN2VL_LLAMACPP_GGUF_DIR): every tensor and key of our f16 file equals
/// theirs, and their q8_0 file gives the same tokens as ours.
#[test]
fn llama_cpp_text_files_when_given() {
    let Some(dir) = std::env::var_os("QWEN2VL_LLAMACPP_GGUF_DIR").map(PathBuf::from) else {
        eprintln!("QWEN2VL_LLAMACPP_GGUF_DIR not set; the converter's text files are not checked");
        return;
    };
    let f = files();
    for (ours, name) in [
        (&f.f16, "tiny-qwen2vl-f16.gguf"),
        (&f.q8_0, "tiny-qwen2vl-q8_0.gguf"),
    ] {
        let ours = GgufFile::open(ours).unwrap();
        let theirs = GgufFile::open(&dir.join(name)).unwrap();
        let mut differ = Vec::new();
        for t in theirs.tensors() {
            if ours.tensor_bytes(t.name()).unwrap() != theirs.bytes_of(t).unwrap() {
                differ.push(t.name().to_string());
            }
        }
        for (k, v) in theirs.metadata() {
            assert_eq!(ours.get(k), Some(v), "{name}: key {k}");
        }
        eprintln!("{name}: tensors whose bytes differ from llama.cpp's: {differ:?}");
        if name.contains("f16") {
            assert!(differ.is_empty(), "{name}: {differ:?}");
        }
        let a = greedy(
            &load(&dir.join(name), Some(&mmproj()), DTypeChoice::F32, None),
            true,
        );
        let b = greedy(
            &load(name_path(f, name), Some(&mmproj()), DTypeChoice::F32, None),
            true,
        );
        assert_eq!(a, b, "{name}");
    }
}

fn name_path<'a>(f: &'a Files, name: &str) -> &'a Path {
    if name.contains("q8_0") {
        &f.q8_0
    } else {
        &f.f16
    }
}

fn load(
    model: &Path,
    mmproj: Option<&Path>,
    dtype: DTypeChoice,
    quant: Option<QuantScheme>,
) -> Pipeline {
    Pipeline::load_with(
        model,
        &LoadOptions {
            dtype,
            quant,
            mmproj: mmproj.map(Path::to_path_buf),
            ..LoadOptions::default()
        },
    )
    .unwrap()
}

fn request(image: bool) -> GenerateRequest {
    let images = if image {
        vec![common::fixtures().join("images/photo640.png")]
    } else {
        vec![]
    };
    GenerateRequest::from_prompt(None, &images, "Describe this, please: ünïcødé 你好")
        .with_sampling(SamplingParams::greedy())
        .with_max_new_tokens(12)
}

fn greedy(p: &Pipeline, image: bool) -> Vec<u32> {
    p.generate(&request(image), &mut |_| {}).unwrap().token_ids
}

/// Every position's logits of the prompt (with the image), in f32.
fn prompt_logits(p: &Pipeline) -> Vec<Vec<f32>> {
    prompt_logits_of(p, true)
}

/// Every position's logits of the prompt, with or without the image, in f32.
fn prompt_logits_of(p: &Pipeline, image: bool) -> Vec<Vec<f32>> {
    let inputs = p.prepare(&request(image)).unwrap();
    let m = p.model();
    let img = image.then(|| {
        m.encode_vision(&inputs.pixel_values, &inputs.image_grid_thw)
            .unwrap()
    });
    let mut cache = m.new_cache(inputs.input_ids.len()).unwrap();
    let h = m
        .prefill_hidden(
            &inputs.input_ids,
            &inputs.positions,
            img.as_ref(),
            None,
            &mut cache,
            None,
        )
        .unwrap();
    let l: Tensor = m.text().logits(&h.squeeze(0).unwrap()).unwrap();
    l.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
}

/// The f16 GGUF pair gives the safetensors model's answer in f16: the same greedy tokens
/// (text and image prompts) and the same logits (f16 weights are the bf16 ones exactly, so
/// within f16 rounding; in fact identical).
#[test]
fn f16_gguf_matches_the_safetensors_model_in_f16() {
    let f = files();
    let st = load(&tiny(), None, DTypeChoice::F16, None);
    let gg = load(&f.f16, Some(&mmproj()), DTypeChoice::F16, None);
    assert_eq!(gg.model().config(), &{
        let mut c = st.model().config().clone();
        c.torch_dtype = None;
        // Not in GGUF metadata (and unused by Qwen2-VL).
        c.text.sliding_window = None;
        c.text.max_window_layers = None;
        c
    });
    for image in [false, true] {
        let (a, b) = (greedy(&st, image), greedy(&gg, image));
        assert_eq!(a, b, "image: {image}");
        assert_eq!(a.len(), 12);
    }
    let (a, b) = (prompt_logits(&st), prompt_logits(&gg));
    let max = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = a.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    eprintln!("f16 GGUF vs safetensors f16: max |Δlogit| {max} (max |logit| {scale})");
    assert!(max <= 1e-2 * scale.max(1.0), "max |Δlogit| {max}");
    // Our own mmproj (written from the safetensors) is interchangeable with llama.cpp's.
    let ours = load(&f.f16, Some(&f.mmproj), DTypeChoice::F16, None);
    assert_eq!(greedy(&ours, true), greedy(&gg, true));
}

/// A q8_0 GGUF keeps its blocks (no requantization) and answers as `--quant q8_0` of the
/// safetensors model does (the same Q8_0 blocks, so the same tokens); `--quant` on it is
/// refused, and a float GGUF with `--quant` is quantized as it loads.
#[test]
fn q8_0_gguf_matches_quant_q8_0() {
    let f = files();
    let st = load(&tiny(), None, DTypeChoice::F32, Some(QuantScheme::Q8_0));
    let gg = load(&f.q8_0, Some(&mmproj()), DTypeChoice::F32, None);
    for image in [false, true] {
        assert_eq!(greedy(&st, image), greedy(&gg, image), "image: {image}");
    }
    let requant = load(
        &f.f16,
        Some(&mmproj()),
        DTypeChoice::F32,
        Some(QuantScheme::Q8_0),
    );
    assert_eq!(greedy(&requant, false).len(), 12);
    let e = Pipeline::load_with(
        &f.q8_0,
        &LoadOptions {
            quant: Some(QuantScheme::Q4KM),
            ..LoadOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("already quantized") && e.contains("token_embd.weight is q8_0"),
        "{e}"
    );
    // The float projector of a q8_0 text model may still be quantized as it loads.
    let p = Pipeline::load_with(
        &f.q8_0,
        &LoadOptions {
            vision_quant: Some(QuantScheme::Q8_0),
            mmproj: Some(mmproj()),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(greedy(&p, true).len(), 12);
}

/// The tokenizer rebuilt from `tokenizer.ggml.*` gives tokenizer.json's ids and text.
#[test]
fn gguf_tokenizer_matches_tokenizer_json() {
    let f = files();
    let model = qwen2vl::gguf::model::GgufModel::open(&f.f16, None).unwrap();
    let ours = Qwen2Tokenizer::from_gguf(&model).unwrap();
    let reference = Qwen2Tokenizer::from_dir(&tiny()).unwrap();
    assert_eq!(ours.special_ids(), reference.special_ids());
    assert_eq!(ours.vocab_size(), reference.vocab_size());
    for s in [
        "Hello, world!",
        "  leading spaces and\ttabs\n\nnewlines\r\n",
        "ünïcødé, 你好世界, こんにちは, Привет, 🤖🚀 emoji",
        "<|im_start|>user\nWhat is in <|vision_start|><|image_pad|><|vision_end|>?<|im_end|>",
        "numbers 1234567890 3.14159 and code: fn main() { println!(\"x\"); }",
        "<|endoftext|><|box_start|>(1,2),(3,4)<|box_end|>",
        "I'm sure it's the DON'T-case we'll test",
    ] {
        let a = reference.encode_plain(s).unwrap();
        assert_eq!(ours.encode_plain(s).unwrap(), a, "{s:?}");
        assert_eq!(
            ours.encode_literal(s).unwrap(),
            reference.encode_literal(s).unwrap(),
            "{s:?}"
        );
        assert_eq!(
            ours.decode(&a, false).unwrap(),
            reference.decode(&a, false).unwrap()
        );
    }
    let p = qwen2vl::processing::processor::Processor::from_gguf(&model).unwrap();
    assert_eq!(
        p.template().source(),
        json(&tiny().join("chat_template.json"))["chat_template"]
            .as_str()
            .unwrap()
    );
    // What the loaders do once the tokenizer is built: the vocabulary arrays are emptied
    // (their memory freed), the rest of the metadata stays, and the tokenizer built before
    // is unaffected; building another one from the files is an error, not a panic.
    let mut model = model;
    let config_before = format!("{:?}", model.config());
    model.release_vocabulary();
    for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.merges"] {
        assert_eq!(
            model
                .file(qwen2vl::gguf::model::Part::Text)
                .unwrap()
                .get_str_array(key)
                .unwrap()
                .len(),
            0,
            "{key}"
        );
    }
    assert_eq!(
        model
            .file(qwen2vl::gguf::model::Part::Text)
            .unwrap()
            .get_i32_array("tokenizer.ggml.token_type")
            .unwrap()
            .len(),
        0
    );
    assert!(model.chat_template().unwrap().is_some());
    assert_eq!(format!("{:?}", model.config()), config_before);
    let s = "ünïcødé, 你好世界 <|im_start|>user";
    assert_eq!(
        ours.encode_plain(s).unwrap(),
        reference.encode_plain(s).unwrap()
    );
    assert!(Qwen2Tokenizer::from_gguf(&model).is_err());
}

/// A fused `attn_qkv` (the converter's `--fuse-qkv`) gives the same answer as split q/k/v.
#[test]
fn fused_qkv_is_split_into_q_k_v() {
    let path = tmp_dir().join("fused.gguf");
    write_text(
        &path,
        &TextOptions {
            fuse_qkv: true,
            ..TextOptions::default()
        },
    );
    let a = greedy(&load(&path, None, DTypeChoice::F32, None), false);
    let b = greedy(&load(&files().f16, None, DTypeChoice::F32, None), false);
    assert_eq!(a, b);
}

/// A text model without `--mmproj` answers text and refuses images with a clear error.
#[test]
fn text_only_gguf_refuses_images() {
    let p = load(&files().f16, None, DTypeChoice::F32, None);
    assert!(!p.model().has_vision());
    assert_eq!(greedy(&p, false).len(), 12);
    let e = p
        .generate(&request(true), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("loaded without its vision projector (--mmproj)"),
        "{e}"
    );
}

/// A plain `qwen2` GGUF (llama.cpp's architecture name for `Qwen2ForCausalLM`): the tiny
/// model's text file with its keys under `qwen2.*` and no `rope.dimension_sections`. It loads
/// as a text model (1-D RoPE, which on a text prompt is the M-RoPE of the same weights: the
/// same tokens as the `qwen2vl` file), refuses images naming the missing vision tower, and
/// refuses an mmproj.
#[test]
fn qwen2_text_gguf_loads_as_a_text_model() {
    let path = tmp_dir().join("qwen2-text.gguf");
    let ck = exporter();
    let mut plan = ck.text_plan(scheme(OutType::F16), "tiny-qwen2").unwrap();
    for (k, _) in plan.metadata.iter_mut() {
        if let Some(rest) = k.strip_prefix("qwen2vl.") {
            *k = format!("qwen2.{rest}");
        }
    }
    plan.metadata
        .retain(|(k, _)| k != "qwen2.rope.dimension_sections");
    plan.set("general.architecture", "qwen2");
    plan.write(&ck, &path, &mut |_| {}).unwrap();

    let p = load(&path, None, DTypeChoice::F32, None);
    assert_eq!(
        p.model().config().architecture,
        qwen2vl::config::Architecture::Qwen2
    );
    assert!(p.model().config().text.rope_1d && p.processor().is_text_only());
    let want = greedy(&load(&files().f16, None, DTypeChoice::F32, None), false);
    assert_eq!(greedy(&p, false), want);
    let e = p
        .generate(&request(true), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("image 1 (message 1)") && e.contains("no vision tower"),
        "{e}"
    );
    let e = load_err(&path, Some(&mmproj()));
    assert!(
        e.contains("has no vision tower; --mmproj goes with a qwen2vl model"),
        "{e}"
    );
}

fn load_err(path: &Path, mmproj: Option<&Path>) -> String {
    Pipeline::load_with(
        path,
        &LoadOptions {
            mmproj: mmproj.map(Path::to_path_buf),
            ..LoadOptions::default()
        },
    )
    .unwrap_err()
    .to_string()
}

/// Wrong architectures, a missing tensor, an unsupported tensor type and a projector of
/// another model are errors that name what is wrong.
#[test]
fn bad_files_are_named_errors() {
    let d = tmp_dir();
    let llama = d.join("llama.gguf");
    write_text(
        &llama,
        &TextOptions {
            arch: "llama",
            ..TextOptions::default()
        },
    );
    let e = load_err(&llama, None);
    assert!(
        e.contains("general.architecture is 'llama'; allowed: qwen2vl"),
        "{e}"
    );
    let e = load_err(&mmproj(), None);
    assert!(e.contains("this is a vision projector"), "{e}");
    let e = load_err(&files().f16, Some(&files().f16));
    assert!(
        e.contains("general.architecture is 'qwen2vl'; allowed: clip"),
        "{e}"
    );

    let missing = d.join("missing.gguf");
    write_text(
        &missing,
        &TextOptions {
            drop: vec!["blk.1.ffn_down.weight"],
            ..TextOptions::default()
        },
    );
    let e = load_err(&missing, None);
    assert!(
        e.contains("missing tensor model.layers.1.mlp.down_proj.weight")
            && e.contains("blk.1.ffn_down.weight"),
        "{e}"
    );

    // An iq4_nl tensor (a type with no kernel here; rows of 64 fit its 32-value blocks):
    // refused when the file opens, before any weight is read.
    let iq4 = d.join("iq4_nl.gguf");
    write_text(
        &iq4,
        &TextOptions {
            retype: Some((
                "blk.0.ffn_gate.weight",
                GgmlType::IQ4_NL,
                vec![0u8; 128 * 2 * 18],
            )),
            ..TextOptions::default()
        },
    );
    let e = load_err(&iq4, None);
    assert!(
        e.contains("tensor 'blk.0.ffn_gate.weight' has type iq4_nl, which qwen2vl cannot run"),
        "{e}"
    );
}

/// q5_0 and q4_0 tensors (llama-quantize's fallbacks for rows that are not a multiple of
/// 256) are widened to float at load and give the values ggml's dequantizer gives.
#[test]
fn legacy_block_types_are_widened() {
    // One q5_0 block: d = 0.5, high bits set for elements 0 and 17, low nibbles 0..15.
    let mut b = vec![0u8; 22];
    b[..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
    b[2..6].copy_from_slice(&(1u32 | (1 << 17)).to_le_bytes());
    for j in 0..16 {
        b[6 + j] = (j as u8) | (((15 - j) as u8) << 4);
    }
    let mut out = vec![0f32; 32];
    qwen2vl::gguf::model::dequantize_widened(GgmlType::Q5_0, &b, &mut out).unwrap();
    assert_eq!(out[0], (16.0 - 16.0) * 0.5);
    assert_eq!(out[1], (1.0 - 16.0) * 0.5);
    assert_eq!(out[16], (15.0 - 16.0) * 0.5);
    assert_eq!(out[17], (14.0 + 16.0 - 16.0) * 0.5);

    // A model whose ffn_down of layer 0 is stored in q4_0: loads, and answers.
    let k = 128;
    let (shape, vals) = &checkpoint()["model.layers.0.mlp.down_proj.weight"];
    assert_eq!(shape[1], k);
    let mut q = Vec::new();
    let mut widened = Vec::new();
    for blk in vals.chunks_exact(32) {
        let amax = blk
            .iter()
            .fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
        let d = amax / -8.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        let dh = half::f16::from_f32(d);
        q.extend_from_slice(&dh.to_le_bytes());
        let code = |x: f32| ((x * id + 8.5) as i32).clamp(0, 15) as u8;
        let mut qs = [0u8; 16];
        for j in 0..16 {
            qs[j] = code(blk[j]) | (code(blk[j + 16]) << 4);
        }
        q.extend_from_slice(&qs);
        for j in 0..32 {
            let c = if j < 16 { qs[j] & 15 } else { qs[j - 16] >> 4 };
            widened.push((f32::from(c) - 8.0) * dh.to_f32());
        }
    }
    let path = tmp_dir().join("q4_0.gguf");
    write_text(
        &path,
        &TextOptions {
            retype: Some(("blk.0.ffn_down.weight", GgmlType::Q4_0, q)),
            ..TextOptions::default()
        },
    );
    let p = load(&path, None, DTypeChoice::F32, None);
    assert_eq!(greedy(&p, false).len(), 12);
    let w = qwen2vl::weights::Weights::from_gguf(
        std::sync::Arc::new(qwen2vl::gguf::model::GgufModel::open(&path, None).unwrap()),
        DType::F32,
        &Device::Cpu,
    );
    let t = w
        .get("model.layers.0.mlp.down_proj.weight", (shape[0], k))
        .unwrap();
    assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), widened);
}

/// A q4_k_m GGUF (llama-quantize's mix: q4_K, q6_K for the tied embeddings and the chosen
/// layers' attn_v / ffn_down) on a model whose rows are multiples of 256 runs its blocks as
/// stored: the same logits, bit for bit, as the float GGUF of the same weights quantized
/// with `--quant q4_k_m` as it loads (the same blocks), and a tied q6_K embedding table.
/// A q5_K matrix (no kernel here) comes out of `stored_quant` as q8_0 within half a q8_0
/// step of its widened values.
#[test]
fn q4_k_m_blocks_run_as_stored() {
    use qwen2vl::ops::quant::plan::QuantPlan;
    use rand::{Rng, SeedableRng};
    const H: usize = 256;
    const I: usize = 512;
    const L: usize = 3;
    const HEADS: usize = 4;
    const KV: usize = 2;
    const V: usize = 2048;
    let hd = H / HEADS;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
    let mut draw = |shape: &[usize], sigma: f32| -> Vec<f32> {
        let n: usize = shape.iter().product();
        (0..n)
            .map(|_| {
                if sigma == 0.0 {
                    1.0
                } else {
                    (rng.random::<f32>() - 0.5) * 3.46 * sigma
                }
            })
            .collect()
    };
    let mut model: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, sigma: f32| {
        let v = draw(&shape, sigma);
        model.push((name, shape, v));
    };
    add("model.embed_tokens.weight".into(), vec![V, H], 0.1);
    add("model.norm.weight".into(), vec![H], 0.0);
    for i in 0..L {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), vec![H], 0.0);
        add(format!("{p}.post_attention_layernorm.weight"), vec![H], 0.0);
        for (n, out) in [("q", H), ("k", KV * hd), ("v", KV * hd)] {
            add(format!("{p}.self_attn.{n}_proj.weight"), vec![out, H], 0.03);
            add(format!("{p}.self_attn.{n}_proj.bias"), vec![out], 0.02);
        }
        add(format!("{p}.self_attn.o_proj.weight"), vec![H, H], 0.03);
        add(format!("{p}.mlp.gate_proj.weight"), vec![I, H], 0.03);
        add(format!("{p}.mlp.up_proj.weight"), vec![I, H], 0.03);
        add(format!("{p}.mlp.down_proj.weight"), vec![H, I], 0.03);
    }
    let mut tokens: Vec<String> = (0..V).map(|i| format!("t{i}")).collect();
    for (i, s) in [
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    .iter()
    .enumerate()
    {
        tokens[2000 + i] = s.to_string();
    }
    let meta = || -> Vec<(&'static str, MetaValue)> {
        vec![
            ("general.architecture", "qwen2vl".into()),
            ("qwen2vl.block_count", (L as u32).into()),
            ("qwen2vl.context_length", 4096u32.into()),
            ("qwen2vl.embedding_length", (H as u32).into()),
            ("qwen2vl.feed_forward_length", (I as u32).into()),
            ("qwen2vl.attention.head_count", (HEADS as u32).into()),
            ("qwen2vl.attention.head_count_kv", (KV as u32).into()),
            ("qwen2vl.rope.freq_base", 1e6f32.into()),
            ("qwen2vl.attention.layer_norm_rms_epsilon", 1e-6f32.into()),
            (
                "qwen2vl.rope.dimension_sections",
                vec![8i32, 12, 12, 0].into(),
            ),
            (
                "tokenizer.ggml.tokens",
                MetaValue::Array(MetaArray::Str(tokens.clone())),
            ),
        ]
    };
    let scheme = QuantPlan {
        text: Some(QuantScheme::Q4KM),
        vision: None,
        layers: L,
    };
    let (mut float, mut mixed) = (Vec::new(), Vec::new());
    let mut seen = std::collections::BTreeSet::new();
    for (hf, shape, vals) in &model {
        let g = gguf_text_name(hf).unwrap();
        let ne: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        float.push((g.clone(), GgmlType::F32, ne.clone(), f32_bytes(vals)));
        let k = shape[shape.len() - 1];
        let q = (shape.len() == 2).then(|| scheme.type_for(hf, k)).flatten();
        mixed.push(match q {
            Some(t) => {
                let m = QMatrix::quantize(t, vals, vals.len() / k, k).unwrap();
                let ty = match t {
                    QType::Q8_0 => GgmlType::Q8_0,
                    QType::Q4K => GgmlType::Q4_K,
                    QType::Q6K => GgmlType::Q6_K,
                };
                seen.insert(ty.name());
                (g, ty, ne, m.ggml_bytes().into_owned())
            }
            None => (g, GgmlType::F32, ne, f32_bytes(vals)),
        });
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["q4_K", "q6_K"],
        "the mix"
    );
    let d = tmp_dir();
    let (fp, mp) = (d.join("q4km-float.gguf"), d.join("q4km-mixed.gguf"));
    // A q5_K matrix (no kernel here): random blocks with sane scales.
    let mut q5 = mixed.clone();
    let slot = q5
        .iter_mut()
        .find(|t| t.0 == "blk.1.ffn_up.weight")
        .unwrap();
    let mut bytes: Vec<u8> = (0..I * H / 256 * 176)
        .map(|_| rng_bytes(&mut slot.3))
        .collect();
    for b in bytes.chunks_exact_mut(176) {
        b[..2].copy_from_slice(&half::f16::from_f32(0.001).to_le_bytes());
        b[2..4].copy_from_slice(&half::f16::from_f32(0.0005).to_le_bytes());
    }
    slot.1 = GgmlType::Q5_K;
    slot.3 = bytes.clone();
    write(&fp, meta(), float);
    write(&mp, meta(), mixed);
    let qp = d.join("q5k.gguf");
    write(&qp, meta(), q5);
    let w = qwen2vl::weights::Weights::from_gguf(
        std::sync::Arc::new(qwen2vl::gguf::model::GgufModel::open(&qp, None).unwrap()),
        DType::F32,
        &Device::Cpu,
    );
    let q = w
        .stored_quant("model.layers.1.mlp.up_proj.weight", I, H)
        .unwrap()
        .unwrap();
    assert_eq!(q.qtype(), QType::Q8_0);
    let mut widened = vec![0f32; I * H];
    qwen2vl::gguf::model::dequantize_widened(GgmlType::Q5_K, &bytes, &mut widened).unwrap();
    let got = q.dequantize();
    for (row, (a, b)) in got.chunks(32).zip(widened.chunks(32)).enumerate() {
        let amax = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (x, y) in a.iter().zip(b) {
            // Half a q8_0 step, plus the step's own f16 rounding.
            assert!(
                (x - y).abs() <= amax / 127.0 * 0.6 + 1e-7,
                "block {row}: {x} vs {y}"
            );
        }
    }
    let load = |p: &Path, quant: Option<QuantScheme>| {
        let g = std::sync::Arc::new(qwen2vl::gguf::model::GgufModel::open(p, None).unwrap());
        qwen2vl::model::Qwen2VL::load_gguf(g, DType::F32, &Device::Cpu, None, quant, None)
            .unwrap()
            .0
    };
    let logits = |m: &qwen2vl::model::Qwen2VL| -> Vec<f32> {
        let ids: Vec<u32> = (0..40).map(|i| (i * 37 % 1999) as u32).collect();
        let pos = qwen2vl::rope::mrope_position_ids(&ids, m.vision_tokens(), &[], &[], 2).unwrap();
        let mut cache = m.new_cache(ids.len()).unwrap();
        let h = m
            .prefill_hidden(&ids, &pos, None, None, &mut cache, None)
            .unwrap();
        let l: Tensor = m.text().logits(&h.squeeze(0).unwrap()).unwrap();
        l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let stored = load(&mp, None);
    let requantized = load(&fp, Some(QuantScheme::Q4KM));
    let float = load(&fp, None);
    let (a, b, c) = (logits(&stored), logits(&requantized), logits(&float));
    assert_eq!(
        a, b,
        "stored q4_k_m blocks vs the same blocks quantized at load"
    );
    assert_ne!(a, c, "the quantized model differs from the float one");
    let max = a
        .iter()
        .zip(&c)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = c.iter().fold(0f32, |m, x| m.max(x.abs()));
    eprintln!("q4_k_m GGUF vs its float weights: max |Δlogit| {max} (max |logit| {scale})");
    // Accuracy per format is tests/quant_accuracy.rs's job; this only guards against a
    // layout mix-up (which gives noise as large as the logits).
    assert!(max < 0.25 * scale, "{max} vs {scale}");
}

/// A q8_0 vision projector keeps its blocks (the split q/k/v stacked back into `qkv` as
/// blocks): the vision tower's output equals the safetensors model's with
/// `--vision-quant q8_0`, bit for bit.
#[test]
fn q8_0_mmproj_runs_as_stored() {
    let path = tmp_dir().join("mmproj-q8_0.gguf");
    write_mmproj(&path, OutType::Q8_0);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(
        f.tensor_info("v.blk.0.attn_q.weight").unwrap().ggml_type(),
        GgmlType::Q8_0
    );
    assert_eq!(
        f.tensor_info("v.patch_embd.weight").unwrap().ggml_type(),
        GgmlType::F32
    );
    let st = Pipeline::load_with(
        &tiny(),
        &LoadOptions {
            vision_quant: Some(QuantScheme::Q8_0),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let gg = load(&files().f16, Some(&path), DTypeChoice::F32, None);
    let inputs = st.prepare(&request(true)).unwrap();
    let encode = |p: &Pipeline| -> Vec<f32> {
        p.model()
            .encode_vision(&inputs.pixel_values, &inputs.image_grid_thw)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(encode(&st), encode(&gg));
}

/// llama.cpp's own k-quant blocks read right: with QWEN2VL_LLAMACPP_2B_GGUF set to a
/// llama-quantize output (e.g. `qwen2vl-2b-random-q4_k_m.gguf` of `../shared/peers`) and
/// QWEN2VL_2B_DIR to the safetensors it came from, the first and last layers' matrices and
/// the embeddings, dequantized from the GGUF's blocks, stay within each format's rounding of
/// the original weights (a wrong layout would give errors as large as the weights).
#[test]
fn llama_cpp_k_quants_when_given() {
    let (Some(gguf), Some(dir)) = (
        std::env::var_os("QWEN2VL_LLAMACPP_2B_GGUF").map(PathBuf::from),
        std::env::var_os("QWEN2VL_2B_DIR").map(PathBuf::from),
    ) else {
        eprintln!("QWEN2VL_LLAMACPP_2B_GGUF / QWEN2VL_2B_DIR not set; skipped");
        return;
    };
    let model = std::sync::Arc::new(qwen2vl::gguf::model::GgufModel::open(&gguf, None).unwrap());
    let cfg = model.config().text.clone();
    let g = qwen2vl::weights::Weights::from_gguf(model.clone(), DType::F32, &Device::Cpu);
    let st = qwen2vl::weights::Weights::from_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let (h, i, kv) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_key_value_heads * cfg.head_dim(),
    );
    let last = cfg.num_hidden_layers - 1;
    let mut names = vec![("model.embed_tokens.weight".to_string(), cfg.vocab_size, h)];
    for l in [0, last] {
        let p = format!("model.layers.{l}");
        names.extend([
            (format!("{p}.self_attn.q_proj.weight"), h, h),
            (format!("{p}.self_attn.v_proj.weight"), kv, h),
            (format!("{p}.mlp.down_proj.weight"), h, i),
            (format!("{p}.mlp.up_proj.weight"), i, h),
        ]);
    }
    for (name, n, k) in names {
        let info = model
            .tensors()
            .find(|(_, t)| Some(t.name()) == gguf_text_name(&name).as_deref())
            .unwrap()
            .1
            .ggml_type();
        let a = g.get(&name, (n, k)).unwrap();
        let b = st.get(&name, (n, k)).unwrap();
        let err = (&a - &b).unwrap().sqr().unwrap().mean_all().unwrap();
        let rms = b.sqr().unwrap().mean_all().unwrap();
        let rel = (err.to_scalar::<f32>().unwrap() / rms.to_scalar::<f32>().unwrap()).sqrt();
        eprintln!("{name} ({info}): relative RMS error {rel:.4}");
        let bound = match info {
            GgmlType::Q8_0 => 0.01,
            GgmlType::Q6_K => 0.03,
            GgmlType::Q5_K => 0.06,
            GgmlType::Q4_K | GgmlType::Q5_0 => 0.12,
            _ => 0.002,
        };
        assert!(rel < bound, "{name} ({info}): {rel} >= {bound}");
    }
}

/// q5_K (the bulk of a q5_k_m file) is widened as ggml's `dequantize_row_q5_K` does: 6-bit
/// scales and mins packed as q4_K's, the fifth bit of the low/high nibble halves of chunk
/// `c` in bits `2c`/`2c + 1` of `qh`.
#[test]
fn q5_k_is_widened_like_ggml() {
    let mut b = vec![0u8; 176];
    b[..2].copy_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
    b[2..4].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
    let sc = 4;
    b[sc] = 2; // scale 0
    b[sc + 1] = 1; // scale 1
    b[sc + 4] = 3; // min 0
    b[sc + 8] = 0x37; // scale 4 = 7, min 4 = 3
    let (qh, qs) = (16, 48);
    b[qh] = 0b01; // fifth bit of value 0 (chunk 0, low half)
    b[qs] = 0x5A; // value 0: 10, value 32: 5
    b[qs + 64] = 0x03; // value 128 (chunk 2, low half): 3
    let mut y = vec![0f32; 256];
    qwen2vl::gguf::model::dequantize_widened(GgmlType::Q5_K, &b, &mut y).unwrap();
    assert_eq!(y[0], 2.0 * (10.0 + 16.0) - 0.5 * 3.0);
    assert_eq!(y[32], 5.0);
    assert_eq!(y[128], 7.0 * 3.0 - 0.5 * 3.0);
    assert_eq!(y[1], -1.5);
    assert!(qwen2vl::gguf::model::dequantize_widened(GgmlType::Q5_K, &b[..175], &mut y).is_err());
}

/// A pseudo-random byte (an xorshift over a small state kept in `state`'s first 8 bytes).
fn rng_bytes(state: &mut Vec<u8>) -> u8 {
    if state.len() < 8 {
        state.resize(8, 1);
    }
    let mut x = u64::from_le_bytes(state[..8].try_into().unwrap()) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    state[..8].copy_from_slice(&x.to_le_bytes());
    (x >> 24) as u8
}

/// Exports the tiny model with the library's exporter into a fresh directory.
fn export_tiny(
    dir_name: &str,
    quant: Option<QuantScheme>,
    vision_quant: Option<QuantScheme>,
) -> PathBuf {
    let out = tmp_dir().join(dir_name);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let written = qwen2vl::gguf::export::export(
        &tiny(),
        &out,
        &qwen2vl::gguf::export::ExportOptions {
            quant,
            vision_quant,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(written.files.len(), 2);
    for (path, len) in &written.files {
        assert_eq!(std::fs::metadata(path).unwrap().len(), *len);
    }
    out
}

/// `qwen2vl quantize`'s files, loaded as a directory, compute bit for bit what the
/// safetensors model computes with `--quant` of the same scheme (the same blocks from the
/// same values), for every scheme; each file carries llama.cpp's file type, and nothing
/// but the two files is left in the directory.
///
/// Bit for bit on a text prompt: the projector is f16, as llama.cpp writes it, and 14 of
/// the tiny model's bf16 vision weights are f16 subnormals, which moves the vision output
/// by ~2e-6; the quantized activations of the decoder amplify that to visible logit
/// differences (0.5 of 18 with q8_0), so with an image only the greedy tokens are held
/// equal.
#[test]
fn exported_files_give_the_logits_of_quant_at_load() {
    for (scheme, ftype) in [
        (QuantScheme::Q8_0, 7u32),
        (QuantScheme::Q4K, 14),
        (QuantScheme::Q4KM, 15),
        (QuantScheme::Q6K, 18),
    ] {
        let out = export_tiny(&format!("export-{scheme}"), Some(scheme), None);
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "mmproj-tiny-qwen2vl-f16.gguf".to_string(),
                format!("tiny-qwen2vl-{scheme}.gguf")
            ]
        );
        let text = GgufFile::open(&out.join(&names[1])).unwrap();
        assert_eq!(
            text.get("general.file_type"),
            Some(&MetaValue::U32(ftype)),
            "{scheme}"
        );
        let st = load(&tiny(), None, DTypeChoice::F32, Some(scheme));
        let gg = load(&out, None, DTypeChoice::F32, None);
        assert!(gg.model().has_vision(), "the directory's mmproj is loaded");
        let (a, b) = (prompt_logits_of(&gg, false), prompt_logits_of(&st, false));
        let max = a
            .iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(a == b, "{scheme}: max |Δlogit| {max}");
        if scheme == QuantScheme::Q4KM {
            assert_eq!(greedy(&gg, true), greedy(&st, true), "{scheme}, image");
        }
    }
}

/// `--vision-quant q8_0` stores the projector's matrices in q8_0 and its patch kernels in
/// f32 (file type 7); the tower then computes what `--vision-quant q8_0` computes.
#[test]
fn exported_vision_quant_matches_vision_quant_at_load() {
    let out = export_tiny("export-vision-q8_0", None, Some(QuantScheme::Q8_0));
    let f = GgufFile::open(&out.join("mmproj-tiny-qwen2vl-q8_0.gguf")).unwrap();
    assert_eq!(f.get("general.file_type"), Some(&MetaValue::U32(7)));
    let ty = |n: &str| f.tensor_info(n).unwrap().ggml_type();
    assert_eq!(ty("v.blk.1.ffn_down.weight"), GgmlType::Q8_0);
    assert_eq!(ty("mm.2.weight"), GgmlType::Q8_0);
    assert_eq!(ty("v.patch_embd.weight.1"), GgmlType::F32);
    assert_eq!(ty("v.blk.0.attn_q.bias"), GgmlType::F32);
    let st = Pipeline::load_with(
        &tiny(),
        &LoadOptions {
            vision_quant: Some(QuantScheme::Q8_0),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let gg = load(&out, None, DTypeChoice::F32, None);
    let inputs = st.prepare(&request(true)).unwrap();
    let encode = |p: &Pipeline| -> Vec<f32> {
        p.model()
            .encode_vision(&inputs.pixel_values, &inputs.image_grid_thw)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(encode(&st), encode(&gg));
}

/// A directory is a GGUF model only without config.json; two text models (or two
/// projectors) in one are an error naming them.
#[test]
fn gguf_directories_are_found_or_named_ambiguous() {
    use qwen2vl::pipeline::gguf_dir;
    let f = files();
    let d = tmp_dir().join("dirs");
    let _ = std::fs::remove_dir_all(&d);
    let (one, two, hf) = (d.join("one"), d.join("two"), d.join("hf"));
    for x in [&one, &two, &hf] {
        std::fs::create_dir_all(x).unwrap();
        std::fs::hard_link(&f.q8_0, x.join("tiny-q8_0.gguf")).unwrap();
    }
    std::fs::hard_link(&f.mmproj, one.join("mmproj-tiny-f16.gguf")).unwrap();
    let found = gguf_dir(&one).unwrap().unwrap();
    assert_eq!(found.text, one.join("tiny-q8_0.gguf"));
    assert_eq!(found.mmproj, Some(one.join("mmproj-tiny-f16.gguf")));
    std::fs::hard_link(&f.f16, two.join("tiny-f16.gguf")).unwrap();
    let e = gguf_dir(&two).unwrap_err().to_string();
    assert!(
        e.contains("2 text models")
            && e.contains("tiny-f16.gguf")
            && e.contains("tiny-q8_0.gguf")
            && e.contains("ambiguous"),
        "{e}"
    );
    let e = load_err(&two, None);
    assert!(e.contains("ambiguous"), "{e}");
    std::fs::write(hf.join("config.json"), "{}").unwrap();
    assert_eq!(gguf_dir(&hf).unwrap(), None);
    assert_eq!(gguf_dir(&d).unwrap(), None, "no GGUF file in it");
    assert_eq!(
        gguf_dir(&f.q8_0).unwrap(),
        None,
        "a file is not a directory"
    );
}

/// A write that fails midway leaves neither the file nor its temporary.
#[test]
fn a_failed_export_leaves_no_file() {
    let ck = exporter();
    let mut plan = ck
        .text_plan(Some(QuantScheme::Q8_0), "tiny-qwen2vl")
        .unwrap();
    let last = plan.tensors.last().unwrap().name.clone();
    // Too few bytes for the tensor: the stream refuses it after the others are written.
    plan.tensor_mut(&last).unwrap().source = TensorSource::Bytes(vec![0u8; 3]);
    let d = tmp_dir().join("failed");
    std::fs::create_dir_all(&d).unwrap();
    let path = d.join("x.gguf");
    assert!(plan.write(&ck, &path, &mut |_| {}).is_err());
    let left: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A model directory like the tiny fixture (its vision tower, tokenizer and templates) but
/// with a decoder whose rows are multiples of 256, so every K format applies: hidden 256,
/// intermediate 512, 3 layers (q4_k_m gives layer 2's v_proj and down_proj q6_K), random
/// bf16 weights.
fn k_quant_model() -> PathBuf {
    use rand::{Rng, SeedableRng};
    const H: usize = 256;
    let dir = tmp_dir().join("k-model");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "preprocessor_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(tiny().join(f), dir.join(f)).unwrap();
    }
    let mut cfg = json(&tiny().join("config.json"));
    cfg["hidden_size"] = H.into();
    cfg["intermediate_size"] = 512.into();
    cfg["num_hidden_layers"] = 3.into();
    cfg["vision_config"]["hidden_size"] = H.into();
    cfg["rope_scaling"]["mrope_section"] = serde_json::json!([8, 12, 12]);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, sigma: f32| {
        let n: usize = shape.iter().product();
        let bytes = (0..n)
            .flat_map(|_| {
                let x = if sigma == 0.0 {
                    1.0
                } else {
                    (rng.random::<f32>() - 0.5) * 3.46 * sigma
                };
                half::bf16::from_f32(x).to_le_bytes()
            })
            .collect();
        tensors.push((name, shape, bytes));
    };
    add("model.embed_tokens.weight".into(), vec![151936, H], 0.1);
    add("model.norm.weight".into(), vec![H], 0.0);
    for i in 0..3 {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), vec![H], 0.0);
        add(format!("{p}.post_attention_layernorm.weight"), vec![H], 0.0);
        for (n, rows) in [("q", H), ("k", 128), ("v", 128)] {
            add(
                format!("{p}.self_attn.{n}_proj.weight"),
                vec![rows, H],
                0.03,
            );
            add(format!("{p}.self_attn.{n}_proj.bias"), vec![rows], 0.02);
        }
        add(format!("{p}.self_attn.o_proj.weight"), vec![H, H], 0.03);
        add(format!("{p}.mlp.gate_proj.weight"), vec![512, H], 0.03);
        add(format!("{p}.mlp.up_proj.weight"), vec![512, H], 0.03);
        add(format!("{p}.mlp.down_proj.weight"), vec![H, 512], 0.03);
    }
    add("visual.merger.mlp.2.weight".into(), vec![H, 256], 0.03);
    add("visual.merger.mlp.2.bias".into(), vec![H], 0.02);
    let bytes = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, v) in st.tensors() {
        if name.starts_with("visual.") && !name.starts_with("visual.merger.mlp.2") {
            tensors.push((name, v.shape().to_vec(), v.data().to_vec()));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b);
            (n.clone(), view.unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    dir
}

/// On a model where the K formats apply, the exported q4_k_m file holds llama.cpp's mix
/// (q4_K, q6_K for the embeddings and layer 2's v_proj / down_proj) and loads to the
/// logits of `--quant q4_k_m`, bit for bit.
#[test]
fn exported_k_quants_give_the_logits_of_quant_at_load() {
    let model = k_quant_model();
    let out = tmp_dir().join("k-model-q4_k_m");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let options = qwen2vl::gguf::export::ExportOptions {
        quant: Some(QuantScheme::Q4KM),
        ..Default::default()
    };
    qwen2vl::gguf::export::export(&model, &out, &options).unwrap();
    let f = GgufFile::open(&out.join("k-model-q4_k_m.gguf")).unwrap();
    let ty = |n: &str| f.tensor_info(n).unwrap().ggml_type();
    assert_eq!(ty("token_embd.weight"), GgmlType::Q6_K);
    assert_eq!(ty("blk.2.attn_v.weight"), GgmlType::Q6_K);
    assert_eq!(ty("blk.2.ffn_down.weight"), GgmlType::Q6_K);
    assert_eq!(ty("blk.1.attn_v.weight"), GgmlType::Q4_K);
    assert_eq!(ty("blk.0.ffn_gate.weight"), GgmlType::Q4_K);
    assert_eq!(ty("blk.0.attn_q.bias"), GgmlType::F32);
    let st = load(&model, None, DTypeChoice::F32, Some(QuantScheme::Q4KM));
    let gg = load(&out, None, DTypeChoice::F32, None);
    assert!(prompt_logits_of(&gg, false) == prompt_logits_of(&st, false));
    assert_eq!(greedy(&gg, true), greedy(&st, true));
}

//! Qwen2.5-VL in llama.cpp's GGUF pair: the text model (arch `qwen2vl`, the same decoder as
//! Qwen2-VL's; written here by the library's exporter in the converter's layout) with the
//! vision projector that llama.cpp's `convert_hf_to_gguf.py --mmproj` wrote for the tiny
//! Qwen2.5-VL fixture (`clip.projector_type = "qwen2.5vl_merger"`, SwiGLU `ffn_gate/up/down`,
//! RMSNorm without biases, `clip.vision.n_wa_pattern = 2`; committed, from
//! tools/reference/make_gguf_models.py --qwen25) loads as Qwen2.5-VL and answers as the
//! safetensors checkpoint does.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use qwen2vl::config::Architecture;
use qwen2vl::generation::sampler::SamplingParams;
use qwen2vl::generation::GenerateRequest;
use qwen2vl::pipeline::{DTypeChoice, LoadOptions, Pipeline};

fn tiny() -> PathBuf {
    common::fixtures().join("tiny-qwen25vl")
}

fn mmproj() -> PathBuf {
    common::fixtures().join("gguf/mmproj-tiny-qwen25vl-f16.gguf")
}

/// The text model as an f16 GGUF, written once per test binary.
fn text_gguf() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("gguf-qwen25vl-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join("tiny-qwen25vl-f16.gguf");
        let ck = qwen2vl::gguf::export::Checkpoint::open(&tiny()).unwrap();
        let plan = ck.text_plan(None, "tiny-qwen25vl").unwrap();
        plan.write(&ck, &path, &mut |_| {}).unwrap();
        path
    })
}

fn load(model: &Path, mmproj: Option<&Path>) -> Pipeline {
    Pipeline::load_with(
        model,
        &LoadOptions {
            dtype: DTypeChoice::F16,
            mmproj: mmproj.map(Path::to_path_buf),
            ..LoadOptions::default()
        },
    )
    .unwrap()
}

/// The case qwen25_image_video_fps3's conversation: an image and a video sampled at 3 fps.
fn request() -> GenerateRequest {
    let case = common::Case::load("qwen25_image_video_fps3");
    let messages = serde_json::from_value(case.json["messages"].clone()).unwrap();
    let mut req = GenerateRequest::new(messages)
        .with_sampling(SamplingParams::greedy())
        .with_max_new_tokens(12);
    req.base_dir = Some(case.dir.clone());
    req
}

#[test]
fn the_mmproj_reads_as_qwen25vl() {
    let st = qwen2vl::config::Qwen2VLConfig::from_file(&tiny().join("config.json")).unwrap();
    let gg = qwen2vl::gguf::model::GgufModel::open(text_gguf(), Some(&mmproj())).unwrap();
    let c = gg.config();
    assert_eq!(c.architecture, Architecture::Qwen25VL);
    // n_wa_pattern 2 → blocks 1 and 3 full, as config.json's fullatt_block_indexes [1, 3];
    // window 112 and 2 tokens a second are not in the file (the released models' values).
    assert_eq!(c.vision, st.vision);
    assert_eq!(
        c.vision.qwen25.as_ref().unwrap().fullatt_block_indexes,
        vec![1, 3]
    );
    // Without the projector the text model is a Qwen2-VL decoder that refuses images.
    let alone = qwen2vl::gguf::model::GgufModel::open(text_gguf(), None).unwrap();
    assert_eq!(alone.config().architecture, Architecture::Qwen2VL);
}

/// The f16 GGUF pair gives the safetensors model's answer in f16 (f16 holds the bf16 weights
/// exactly): the same greedy tokens for an image and a video, and the same vision rows.
#[test]
fn f16_gguf_matches_the_safetensors_model_in_f16() {
    let st = load(&tiny(), None);
    let gg = load(text_gguf(), Some(&mmproj()));
    assert_eq!(gg.model().config().architecture, Architecture::Qwen25VL);
    let case = common::Case::load("qwen25_image");
    let pv = case.f32s("pixel_values");
    let grids = case.grids("image_grid_thw");
    let a = common::flat(&st.model().encode_vision(&pv, &grids).unwrap());
    let b = common::flat(&gg.model().encode_vision(&pv, &grids).unwrap());
    let d = common::max_abs_diff(&a, &b);
    eprintln!("vision rows, GGUF vs safetensors (f16): max |Δ| {d}");
    assert_eq!(d, 0.0);
    let req = request();
    let x = st.generate(&req, &mut |_| {}).unwrap();
    let y = gg.generate(&req, &mut |_| {}).unwrap();
    assert_eq!(x.token_ids.len(), 12);
    assert_eq!(x.token_ids, y.token_ids);
    assert_eq!(x.videos.len(), 1);
}

/// `qwen2vl quantize` does not write Qwen2.5-VL projectors yet: refused before any file is
/// written, naming what to do instead.
#[test]
fn export_refuses_the_qwen25_projector() {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("gguf-qwen25vl-export-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let (what, allowed) = common::bad_input(qwen2vl::gguf::export::export(
        &tiny(),
        &out,
        &Default::default(),
    ));
    assert!(what.contains("Qwen2.5-VL"), "{what}");
    assert!(allowed.contains("--quant"), "{allowed}");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
}

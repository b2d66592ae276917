//! Vision tower output against the reference (f32; max abs diff within [`common::tolerance`]).

mod common;

use candle_core::{DType, Device};
use qwen2vl::model::Qwen2VL;

/// Video frames through the vision tower (`pixel_values_videos` → `video_embeds`).
#[test]
fn video_embeds_match_reference() {
    let mut checked = 0;
    for name in common::case_names() {
        let case = common::Case::load(&name);
        if !case.has("pixel_values_videos") {
            continue;
        }
        let (model, _) = Qwen2VL::load(&case.model_dir(), DType::F32, &Device::Cpu).expect("load");
        let out = model
            .encode_vision(
                &case.f32s("pixel_values_videos"),
                &case.grids("video_grid_thw"),
            )
            .expect("vision");
        let want = case.f32s("video_embeds");
        let diff = common::max_abs_diff(&common::flat(&out), &want);
        let tol = common::tolerance(&want);
        println!("{name}: video max abs diff {diff:e} (tolerance {tol:e})");
        assert!(
            diff <= tol,
            "case {name}: video max abs diff {diff} > {tol}"
        );
        checked += 1;
    }
    assert!(checked >= 1, "no case with a video");
}

#[test]
fn vision_embeds_match_reference() {
    let mut checked = 0;
    for name in common::case_names() {
        let case = common::Case::load(&name);
        if !case.has("pixel_values") {
            continue;
        }
        let (model, _) = Qwen2VL::load(&case.model_dir(), DType::F32, &Device::Cpu).expect("load");
        let pv = case.f32s("pixel_values");
        let grids = case.grids("image_grid_thw");
        let out = model.encode_vision(&pv, &grids).expect("vision");
        let want = case.f32s("vision_embeds");
        let got = common::flat(&out);
        let diff = common::max_abs_diff(&got, &want);
        let tol = common::tolerance(&want);
        println!(
            "{name}: vision max abs diff {diff:e} (tolerance {tol:e}) over {} values",
            want.len()
        );
        assert!(
            diff <= tol,
            "case {name}: vision max abs diff {diff} > {tol}"
        );
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} cases with images");
}

/// Encoding in chunks of whole frames gives the same rows as one pass (Qwen2.5-VL's windows
/// lie within frames, so its chunks do too).
#[test]
fn chunked_encoding_equals_one_pass() {
    for name in ["two_images", "qwen25_two_images"] {
        let case = common::Case::load(name);
        let (model, _) = Qwen2VL::load(&case.model_dir(), DType::F32, &Device::Cpu).expect("load");
        let pv = case.f32s("pixel_values");
        let grids = case.grids("image_grid_thw");
        let whole = model
            .encode_vision_chunked(&pv, &grids, usize::MAX)
            .expect("one pass");
        let chunked = model
            .encode_vision_chunked(&pv, &grids, 1)
            .expect("one frame per pass");
        assert_eq!(whole.dims(), chunked.dims());
        assert_eq!(
            common::max_abs_diff(&common::flat(&whole), &common::flat(&chunked)),
            0.0,
            "{name}"
        );
    }
}

/// Qwen2.5-VL's window attention and window order are what make its tower match: the same
/// weights with every block attending over whole frames (as Qwen2-VL's do) land far outside
/// the tolerance on every image case, so the comparison above could not pass without them.
#[test]
fn qwen25_windows_change_the_output() {
    let mut checked = 0;
    for name in common::case_names() {
        let case = common::Case::load(&name);
        let dir = case.model_dir();
        let mut cfg =
            qwen2vl::config::Qwen2VLConfig::from_file(&dir.join("config.json")).expect("config");
        let Some(q) = cfg.vision.qwen25.as_mut() else {
            continue;
        };
        if !case.has("pixel_values") {
            continue;
        }
        assert!(q.fullatt_block_indexes.len() < cfg.vision.depth);
        q.fullatt_block_indexes = (0..cfg.vision.depth).collect();
        let w = qwen2vl::weights::Weights::from_dir(&dir, DType::F32, &Device::Cpu).expect("w");
        let model = Qwen2VL::from_weights(&cfg, &w).expect("model");
        let out = model
            .encode_vision(&case.f32s("pixel_values"), &case.grids("image_grid_thw"))
            .expect("vision");
        let want = case.f32s("vision_embeds");
        let diff = common::max_abs_diff(&common::flat(&out), &want);
        let tol = common::tolerance(&want);
        println!("{name}: without windows, vision max abs diff {diff:e}");
        assert!(diff > 100.0 * tol, "case {name}: {diff} without windows");
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} Qwen2.5-VL image cases");
}

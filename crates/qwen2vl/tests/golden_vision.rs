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

/// Encoding in chunks of whole frames gives the same rows as one pass.
#[test]
fn chunked_encoding_equals_one_pass() {
    let case = common::Case::load("two_images");
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
        0.0
    );
}

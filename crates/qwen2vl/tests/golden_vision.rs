//! Vision tower output against the reference (f32; max abs diff within [`common::tolerance`]).

mod common;

use candle_core::{DType, Device};
use qwen2vl::model::Qwen2VL;

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

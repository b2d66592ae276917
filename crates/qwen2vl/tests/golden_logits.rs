//! Prefill logits of the last position against the reference (f32; max abs diff within [`common::tolerance`]),
//! starting from the reference's own input ids and pixel values (so this isolates the model
//! from the processor).

mod common;

use candle_core::{DType, Device};
use qwen2vl::model::Qwen2VL;

#[test]
fn prefill_logits_match_reference() {
    for name in common::case_names() {
        let case = common::Case::load(&name);
        let (model, report) =
            Qwen2VL::load(&case.model_dir(), DType::F32, &Device::Cpu).expect("load");
        assert!(
            report.unused.is_empty(),
            "unused tensors: {:?}",
            report.unused
        );
        let ids = case.u32s("input_ids");
        let grids = case.grids("image_grid_thw");
        let image_embeds = if case.has("pixel_values") {
            Some(
                model
                    .encode_vision(&case.f32s("pixel_values"), &grids)
                    .expect("vision"),
            )
        } else {
            None
        };
        let pos = model.position_ids(&ids, &grids, &[]).expect("positions");
        let mut cache = model.new_cache(ids.len() + 1).expect("cache");
        let mut layers = Vec::new();
        let h = model
            .prefill_hidden(
                &ids,
                &pos,
                image_embeds.as_ref(),
                None,
                &mut cache,
                Some(&mut layers),
            )
            .expect("prefill");
        if case.has("layer0_out") {
            let want = case.f32s("layer0_out");
            let d = common::max_abs_diff(&common::flat(&layers[0]), &want);
            let tol = common::tolerance(&want);
            println!("{name}: layer 0 max abs diff {d:e} (tolerance {tol:e})");
            assert!(d <= tol, "case {name}: layer 0 max abs diff {d} > {tol}");
        }
        let last = qwen2vl::text::TextModel::last_position(&h).expect("last");
        let logits = model.text().logits(&last).expect("logits");
        let got = common::flat(&logits);
        let want = case.f32s("logits");
        let diff = common::max_abs_diff(&got, &want);
        let tol = common::tolerance(&want);
        println!(
            "{name}: logits max abs diff {diff:e} (tolerance {tol:e}, |logit| max {:.2})",
            want.iter().fold(0f32, |a, b| a.max(b.abs()))
        );
        assert!(
            diff <= tol,
            "case {name}: logits max abs diff {diff} > {tol}"
        );
        assert_eq!(cache.len(), ids.len());
    }
}

/// Greedy decoding from the reference's inputs with the raw model API: the token ids must be
/// identical to transformers' `generate(do_sample=False)`.
#[test]
fn greedy_tokens_match_reference_from_reference_inputs() {
    for name in common::case_names() {
        let case = common::Case::load(&name);
        let (model, _) = Qwen2VL::load(&case.model_dir(), DType::F32, &Device::Cpu).expect("load");
        let cfg = qwen2vl::config::GenerationConfig::from_file(
            &case.model_dir().join("generation_config.json"),
        )
        .expect("gen config");
        let eos = cfg.eos_token_id.map(|e| e.to_vec()).unwrap_or_default();
        let ids = case.u32s("input_ids");
        let grids = case.grids("image_grid_thw");
        let image_embeds = if case.has("pixel_values") {
            Some(
                model
                    .encode_vision(&case.f32s("pixel_values"), &grids)
                    .expect("vision"),
            )
        } else {
            None
        };
        let pos = model.position_ids(&ids, &grids, &[]).expect("positions");
        let want = case.u32s("greedy_ids");
        let mut cache = model.new_cache(ids.len() + 40).expect("cache");
        let mut logits = model
            .prefill(&ids, &pos, image_embeds.as_ref(), None, &mut cache)
            .expect("prefill");
        let mut got = Vec::new();
        for _ in 0..32 {
            let tok = logits
                .argmax(0)
                .expect("argmax")
                .to_scalar::<u32>()
                .expect("u32");
            got.push(tok);
            if eos.contains(&tok) {
                break;
            }
            logits = model
                .decode_step(&[tok], &[pos.rope_delta], &mut [&mut cache])
                .expect("decode")
                .squeeze(0)
                .expect("squeeze");
        }
        assert_eq!(got, want, "case {name}: greedy tokens differ");
    }
}

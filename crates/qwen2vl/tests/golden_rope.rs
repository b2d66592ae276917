//! M-RoPE position ids against the reference's `get_rope_index` (exact); Qwen2.5-VL videos
//! in absolute time from the case's `second_per_grid_ts`.

mod common;

use qwen2vl::rope::{mrope_position_ids_timed, VisionTokens};

#[test]
fn position_ids_match_reference_exactly() {
    let names = common::case_names();
    assert!(!names.is_empty());
    for name in names {
        let case = common::Case::load(&name);
        let cfg = qwen2vl::config::Qwen2VLConfig::from_file(&case.model_dir().join("config.json"))
            .expect("config");
        let ids = case.u32s("input_ids");
        let tokens = VisionTokens {
            image_pad: cfg.image_token_id,
            video_pad: cfg.video_token_id,
        };
        let seconds = case.second_per_grid_ts();
        let p = mrope_position_ids_timed(
            &ids,
            tokens,
            &case.grids("image_grid_thw"),
            &case.grids("video_grid_thw"),
            cfg.vision.spatial_merge_size,
            cfg.video_times(&seconds).as_ref(),
        )
        .expect("position ids");
        let want = case.i64s("position_ids");
        let n = ids.len();
        for d in 0..3 {
            assert_eq!(p.ids[d], want[d * n..(d + 1) * n], "case {name}, dim {d}");
        }
        assert_eq!(p.rope_delta, case.i64s("rope_delta")[0], "case {name}");
    }
}

//! Rotary position ids, as pure host-side functions.
//!
//! - [`vision_rope_ids`]: the (row, col) id of every patch of the packed vision sequence,
//!   in the processor's patch order (mirrors `Qwen2VisionTransformerPretrainedModel.rot_pos_emb`).
//! - [`mrope_position_ids`]: the (temporal, height, width) ids of every prompt token and the
//!   sequence's `rope_delta` (mirrors `Qwen2VLForConditionalGeneration.get_rope_index`,
//!   transformers 4.49: text after a vision block resumes at max(all ids so far) + 1).
//! - [`inv_freq`] / [`mrope_cos_sin`]: the rotary tables the towers apply.

use crate::error::{Error, Result};

/// `1 / theta^(2i/dim)` for `i in 0..dim/2`, in f32 as transformers computes it.
pub fn inv_freq(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / dim as f32;
            1.0f32 / (theta as f32).powf(exponent)
        })
        .collect()
}

/// (row, col) ids of each patch for a packed sequence of images/videos.
///
/// For a grid (t, h, w) the patches come in the processor's order: frame, then 2x2 merge
/// blocks in raster order, then the 4 patches inside a block in raster order. Returns
/// `t*h*w` pairs per grid, grids concatenated.
pub fn vision_rope_ids(grids: &[[usize; 3]], merge: usize) -> Vec<(u32, u32)> {
    let mut ids = Vec::with_capacity(grids.iter().map(|g| g[0] * g[1] * g[2]).sum());
    for &[t, h, w] in grids {
        for _ in 0..t {
            for bh in 0..h / merge {
                for bw in 0..w / merge {
                    for mh in 0..merge {
                        for mw in 0..merge {
                            ids.push(((bh * merge + mh) as u32, (bw * merge + mw) as u32));
                        }
                    }
                }
            }
        }
    }
    ids
}

/// A window order: merged-token indices in window order, and each window's `(start, len)` in
/// patch rows (see [`vision_window_index`]).
pub type WindowIndex = (Vec<usize>, Vec<(usize, usize)>);

/// Qwen2.5-VL's window order of the merged tokens of `grids` (mirrors
/// `Qwen2_5_VisionTransformerPretrainedModel.get_window_index`, transformers 4.49).
///
/// Each frame's `(h/merge) x (w/merge)` merged tokens are cut into windows of `window` x
/// `window` tokens, in raster order of windows and of tokens within a window; windows on the
/// bottom and right edges are smaller (the reference pads them with -100 and drops the
/// padding). Frames stay in order, so each frame's tokens stay together.
///
/// Returns `(order, windows)`: `order[j]` is the index (over all grids, in the processor's
/// order) of the merged token at position `j` of the window order, and `windows` the
/// `(start, len)` of each non-empty window in patch rows (`merge²` rows a token) of the
/// reordered sequence (the reference's `cu_window_seqlens` after `unique_consecutive`).
pub fn vision_window_index(grids: &[[usize; 3]], merge: usize, window: usize) -> WindowIndex {
    let window = window.max(1);
    let unit = merge * merge;
    let mut order = Vec::new();
    let mut windows = Vec::new();
    let mut base = 0;
    let mut row = 0;
    for &[t, h, w] in grids {
        let (gh, gw) = (h / merge, w / merge);
        // The reference pads by `window - g % window`: a whole empty window when `g` divides.
        let (nh, nw) = (gh / window + 1, gw / window + 1);
        for ft in 0..t {
            let frame = base + ft * gh * gw;
            for wy in 0..nh {
                for wx in 0..nw {
                    let rows = wy * window..((wy + 1) * window).min(gh);
                    let cols = wx * window..((wx + 1) * window).min(gw);
                    let len = rows.len() * cols.len();
                    if len == 0 {
                        continue;
                    }
                    for r in rows {
                        order.extend(cols.clone().map(|c| frame + r * gw + c));
                    }
                    windows.push((row, len * unit));
                    row += len * unit;
                }
            }
        }
        base += t * gh * gw;
    }
    (order, windows)
}

/// The temporal M-RoPE id of temporal patch `index` of a Qwen2.5-VL video:
/// `int(index * second_per_grid_t * tokens_per_second)` in float32, as transformers 4.49's
/// `get_rope_index` computes it (`expanded_range * second_per_grid_t * tokens_per_second`,
/// an int64 range times a float32 tensor, then `.long()`, which truncates toward zero).
pub fn video_time_id(index: usize, second_per_grid_t: f32, tokens_per_second: f32) -> i64 {
    ((index as f32 * second_per_grid_t) * tokens_per_second) as i64
}

/// Cos/sin tables for the vision tower's 2-D rotary embedding.
///
/// `head_dim` is the vision head size (80); the rotary frequencies are over `head_dim / 2`
/// (`VisionRotaryEmbedding(head_dim // 2)`), so each patch gets `head_dim / 4` row
/// frequencies followed by `head_dim / 4` column frequencies. Returns `(cos, sin)`, each
/// `(n_patches, head_dim / 2)` row-major, for a non-interleaved (rotate-half) rope.
pub fn vision_cos_sin(ids: &[(u32, u32)], head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let inv = inv_freq(head_dim / 2, theta);
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(ids.len() * half);
    let mut sin = Vec::with_capacity(ids.len() * half);
    for &(r, c) in ids {
        for pos in [r, c] {
            for &f in &inv {
                let a = pos as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    (cos, sin)
}

/// M-RoPE cos/sin for tokens with 3-D position ids.
///
/// `positions` is `3 x n` (temporal, height, width ids). Frequency `j` of the rotary half
/// (`head_dim / 2`) takes its angle from the section it falls in: `mrope_section = [16, 24, 24]`
/// gives j < 16 → temporal, j < 40 → height, else width. This is what
/// `apply_multimodal_rotary_pos_emb` does by splitting the doubled cos/sin into
/// `mrope_section * 2` chunks and taking chunk `i % 3` from dimension `i % 3`.
/// Returns `(cos, sin)`, each `(n, head_dim / 2)` row-major.
pub fn mrope_cos_sin(
    positions: [&[i64]; 3],
    head_dim: usize,
    theta: f64,
    mrope_section: &[usize],
) -> (Vec<f32>, Vec<f32>) {
    let inv = inv_freq(head_dim, theta);
    let half = head_dim / 2;
    let mut section_of = Vec::with_capacity(half);
    for (s, &len) in mrope_section.iter().enumerate() {
        section_of.extend(std::iter::repeat_n(s.min(2), len));
    }
    section_of.resize(half, 2);
    let n = positions[0].len();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    let (t, h, w) = (positions[0], positions[1], positions[2]);
    for ((&pt, &ph), &pw) in t.iter().zip(h).zip(w) {
        let p = [pt, ph, pw];
        for (&section, &f) in section_of.iter().zip(&inv) {
            let a = p[section] as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

/// Token ids that mark vision content in a prompt.
#[derive(Debug, Clone, Copy)]
pub struct VisionTokens {
    pub image_pad: u32,
    pub video_pad: u32,
}

/// M-RoPE position ids of a prompt: `3 x len` and the `rope_delta` for decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MropePositions {
    /// `[temporal, height, width]`, each `len` long.
    pub ids: [Vec<i64>; 3],
    /// `max(ids) + 1 - len`: decoding position `p` (cache length) uses id `p + rope_delta`.
    pub rope_delta: i64,
}

impl MropePositions {
    /// The ids of positions `start..` (the part of a prompt left to prefill after a cached
    /// prefix), with the same `rope_delta`; empty when `start` is past the end.
    pub fn tail(&self, start: usize) -> MropePositions {
        let cut = |d: &Vec<i64>| d.get(start..).unwrap_or_default().to_vec();
        MropePositions {
            ids: [cut(&self.ids[0]), cut(&self.ids[1]), cut(&self.ids[2])],
            rope_delta: self.rope_delta,
        }
    }
}

/// The 3-D position ids of a tokenized prompt (transformers 4.49 `get_rope_index`).
///
/// Text tokens get equal t/h/w ids counting up. A run of `n` image (video) pad tokens
/// consumes the next image (video) grid `(t, h, w)`; it must hold `t*h*w / merge²` tokens.
/// With `s` the id the next text token would have had, its tokens get
/// `t = s + frame`, `h = s + row`, `w = s + col` (row/col in merged units). The text after it
/// resumes at `max(all ids so far) + 1`.
pub fn mrope_position_ids(
    input_ids: &[u32],
    tokens: VisionTokens,
    image_grids: &[[usize; 3]],
    video_grids: &[[usize; 3]],
    merge: usize,
) -> Result<MropePositions> {
    mrope_position_ids_timed(input_ids, tokens, image_grids, video_grids, merge, None)
}

/// How a video's temporal patches map to temporal M-RoPE ids.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoTimes {
    /// Seconds each video's temporal patch spans (the processor's `second_per_grid_ts`:
    /// `temporal_patch_size / fps`), one per video in prompt order.
    pub second_per_grid_ts: Vec<f32>,
    /// Temporal ids per second (`vision_config.tokens_per_second`).
    pub tokens_per_second: f32,
}

/// [`mrope_position_ids`] with Qwen2.5-VL's absolute-time video positions when `times` is
/// given: temporal patch `k` of a video gets `t = start + `[`video_time_id`]`(k, ...)`
/// instead of `start + k` (images keep `t = start`); the text after it resumes at
/// `max(all ids so far) + 1`. A video without an entry in `second_per_grid_ts` takes 1.0
/// (the reference's default when the processor gave none).
pub fn mrope_position_ids_timed(
    input_ids: &[u32],
    tokens: VisionTokens,
    image_grids: &[[usize; 3]],
    video_grids: &[[usize; 3]],
    merge: usize,
    times: Option<&VideoTimes>,
) -> Result<MropePositions> {
    let n = input_ids.len();
    let mut ids: [Vec<i64>; 3] = [
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    ];
    let mut images = GridQueue::new("image", image_grids);
    let mut videos = GridQueue::new("video", video_grids);
    // The id the next text token gets: max(all ids so far) + 1.
    let mut next: i64 = 0;
    let mut i = 0;
    while i < n {
        let tok = input_ids[i];
        let queue = if tok == tokens.image_pad {
            &mut images
        } else if tok == tokens.video_pad {
            &mut videos
        } else {
            for d in &mut ids {
                d.push(next);
            }
            next += 1;
            i += 1;
            continue;
        };
        let (item, is_video) = (queue.next, queue.kind == "video");
        let grid = queue.take()?;
        let run = input_ids[i..].iter().take_while(|&&x| x == tok).count();
        // Temporal id of each temporal patch, relative to the block's start.
        let [t, h, w] = grid;
        let time: Vec<i64> = match times {
            Some(times) if is_video => {
                let s = times.second_per_grid_ts.get(item).copied().unwrap_or(1.0);
                (0..t)
                    .map(|k| video_time_id(k, s, times.tokens_per_second))
                    .collect()
            }
            Some(_) => vec![0; t],
            None => (0..t as i64).collect(),
        };
        let count = push_vision_block(&mut ids, next, grid, &time, merge, run, queue.kind)?;
        let last = time.iter().copied().max().unwrap_or(0);
        next += 1 + last.max((h / merge) as i64 - 1).max((w / merge) as i64 - 1);
        i += count;
    }
    let (next_image, next_video) = (images.next, videos.next);
    if next_image != image_grids.len() || next_video != video_grids.len() {
        return Err(Error::bad_input(
            format!(
                "{} image(s) and {} video(s) were given but the prompt has {} image and {} video placeholders",
                image_grids.len(),
                video_grids.len(),
                next_image,
                next_video
            ),
            "one placeholder per image and per video",
        ));
    }
    let rope_delta = next - n as i64;
    Ok(MropePositions { ids, rope_delta })
}

/// The grids of one kind of vision item, consumed in prompt order.
struct GridQueue<'a> {
    kind: &'static str,
    grids: &'a [[usize; 3]],
    next: usize,
}

impl<'a> GridQueue<'a> {
    fn new(kind: &'static str, grids: &'a [[usize; 3]]) -> Self {
        GridQueue {
            kind,
            grids,
            next: 0,
        }
    }

    /// The next item's grid; an error when the prompt has more placeholders than grids.
    fn take(&mut self) -> Result<[usize; 3]> {
        let kind = self.kind;
        let g = self.grids.get(self.next).ok_or_else(|| {
            Error::bad_input(
                format!(
                    "the prompt has more {kind}s than the {} given",
                    self.grids.len()
                ),
                format!("one <|{kind}_pad|> run per {kind}"),
            )
        })?;
        self.next += 1;
        Ok(*g)
    }
}

/// Appends the ids of one vision item of grid `(t, h, w)` starting at `start`: `t = start +
/// time[frame]`, `h = start + row`, `w = start + col` in merged units. `run` is the number of
/// pad tokens the prompt has there; it must equal the item's merged token count, which is
/// returned.
fn push_vision_block(
    ids: &mut [Vec<i64>; 3],
    start: i64,
    [t, h, w]: [usize; 3],
    time: &[i64],
    merge: usize,
    run: usize,
    kind: &str,
) -> Result<usize> {
    let (gh, gw) = (h / merge, w / merge);
    let count = t * gh * gw;
    if run != count {
        return Err(Error::bad_input(
            format!(
                "an {kind} with grid ({t}, {h}, {w}) needs {count} pad tokens, the prompt has {run}"
            ),
            "as many pad tokens as merged vision tokens",
        ));
    }
    for &ft in time.iter().take(t) {
        for r in 0..gh {
            for c in 0..gw {
                ids[0].push(start + ft);
                ids[1].push(start + r as i64);
                ids[2].push(start + c as i64);
            }
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: VisionTokens = VisionTokens {
        image_pad: 9,
        video_pad: 8,
    };

    #[test]
    fn text_only_counts_up() {
        let p = mrope_position_ids(&[1, 2, 3, 4], T, &[], &[], 2).unwrap();
        for d in &p.ids {
            assert_eq!(d, &vec![0, 1, 2, 3]);
        }
        assert_eq!(p.rope_delta, 0);
    }

    #[test]
    fn one_image_by_hand() {
        // 2 text tokens, an image with grid (1, 4, 6) → 2x3 merged tokens, then 2 text tokens.
        let ids = [1, 2, 9, 9, 9, 9, 9, 9, 3, 4];
        let p = mrope_position_ids(&ids, T, &[[1, 4, 6]], &[], 2).unwrap();
        assert_eq!(p.ids[0], vec![0, 1, 2, 2, 2, 2, 2, 2, 5, 6]);
        assert_eq!(p.ids[1], vec![0, 1, 2, 2, 2, 3, 3, 3, 5, 6]);
        assert_eq!(p.ids[2], vec![0, 1, 2, 3, 4, 2, 3, 4, 5, 6]);
        // max id 6, length 10.
        assert_eq!(p.rope_delta, 6 + 1 - 10);
    }

    #[test]
    fn two_images_by_hand() {
        // image A grid (1,2,2) → 1 token; image B grid (1,2,4) → 1x2 tokens.
        let ids = [1, 9, 2, 9, 9, 3];
        let p = mrope_position_ids(&ids, T, &[[1, 2, 2], [1, 2, 4]], &[], 2).unwrap();
        assert_eq!(p.ids[0], vec![0, 1, 2, 3, 3, 5]);
        assert_eq!(p.ids[1], vec![0, 1, 2, 3, 3, 5]);
        assert_eq!(p.ids[2], vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(p.rope_delta, 5 + 1 - 6);
    }

    #[test]
    fn video_by_hand() {
        // video grid (3, 2, 4): 3 temporal patches of 1x2 merged tokens.
        let ids = [1, 8, 8, 8, 8, 8, 8, 2];
        let p = mrope_position_ids(&ids, T, &[], &[[3, 2, 4]], 2).unwrap();
        assert_eq!(p.ids[0], vec![0, 1, 1, 2, 2, 3, 3, 4]);
        assert_eq!(p.ids[1], vec![0, 1, 1, 1, 1, 1, 1, 4]);
        assert_eq!(p.ids[2], vec![0, 1, 2, 1, 2, 1, 2, 4]);
        assert_eq!(p.rope_delta, 4 + 1 - 8);
    }

    #[test]
    fn pad_count_mismatch_is_an_error() {
        let err = mrope_position_ids(&[9, 9, 9], T, &[[1, 4, 4]], &[], 2).unwrap_err();
        assert!(err.to_string().contains("needs 4 pad tokens"), "{err}");
        let err = mrope_position_ids(&[1, 2], T, &[[1, 4, 4]], &[], 2).unwrap_err();
        assert!(err.to_string().contains("placeholders"), "{err}");
    }

    #[test]
    fn video_in_absolute_time_by_hand() {
        // Video grid (3, 2, 4) at 1 fps: 2 s per temporal patch, 2 ids a second → t = 0, 4, 8.
        let times = VideoTimes {
            second_per_grid_ts: vec![2.0],
            tokens_per_second: 2.0,
        };
        let ids = [1, 8, 8, 8, 8, 8, 8, 2];
        let p = mrope_position_ids_timed(&ids, T, &[], &[[3, 2, 4]], 2, Some(&times)).unwrap();
        assert_eq!(p.ids[0], vec![0, 1, 1, 5, 5, 9, 9, 10]);
        assert_eq!(p.ids[1], vec![0, 1, 1, 1, 1, 1, 1, 10]);
        assert_eq!(p.ids[2], vec![0, 1, 2, 1, 2, 1, 2, 10]);
        assert_eq!(p.rope_delta, 10 + 1 - 8);
        // Images keep t = start; at 4 fps (0.5 s a patch) times are 0, 1, 2: Qwen2-VL's ids.
        let img = [1, 9, 9, 2];
        let p = mrope_position_ids_timed(&img, T, &[[1, 2, 4]], &[], 2, Some(&times)).unwrap();
        assert_eq!(
            p,
            mrope_position_ids(&img, T, &[[1, 2, 4]], &[], 2).unwrap()
        );
        let quick = VideoTimes {
            second_per_grid_ts: vec![0.5],
            tokens_per_second: 2.0,
        };
        let p = mrope_position_ids_timed(&ids, T, &[], &[[3, 2, 4]], 2, Some(&quick)).unwrap();
        assert_eq!(
            p,
            mrope_position_ids(&ids, T, &[], &[[3, 2, 4]], 2).unwrap()
        );
    }

    #[test]
    fn video_time_truncates_in_float32() {
        // 2 / 3 fps in f32 is 0.6666667: 3 * 0.6666667 * 2 = 4.0000005 → 4, not 3.
        assert_eq!(video_time_id(3, 2.0f32 / 3.0, 2.0), 4);
        assert_eq!(video_time_id(1, 2.0f32 / 3.0, 2.0), 1);
        // 0.7 s a patch, 4 ids a second: 2.8 → 2 (truncated, not rounded).
        assert_eq!(video_time_id(1, 0.7, 4.0), 2);
        assert_eq!(video_time_id(0, 0.7, 4.0), 0);
    }

    #[test]
    fn windows_by_hand() {
        // One frame of 6x10 patches = 3x5 merged tokens, windows of 2x2 tokens: windows
        // (rows 0-1: cols 0-1, 2-3, 4), (row 2: cols 0-1, 2-3, 4).
        let (order, windows) = vision_window_index(&[[1, 6, 10]], 2, 2);
        assert_eq!(
            order,
            vec![0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]
        );
        let lens: Vec<usize> = windows.iter().map(|w| w.1).collect();
        assert_eq!(lens, vec![16, 16, 8, 8, 8, 4]);
        assert_eq!(windows[1].0, 16);
        // A frame that the windows divide (4x4 tokens, windows of 2): no empty windows; two
        // frames and a second grid continue the numbering.
        let (order, windows) = vision_window_index(&[[2, 8, 8], [1, 2, 2]], 2, 2);
        assert_eq!(windows.len(), 4 + 4 + 1);
        assert_eq!(&order[..8], &[0, 1, 4, 5, 2, 3, 6, 7]);
        assert_eq!(&order[16..20], &[16, 17, 20, 21]);
        assert_eq!(order[32], 32);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..33).collect::<Vec<_>>());
        assert_eq!(windows.iter().map(|w| w.1).sum::<usize>(), 33 * 4);
    }

    #[test]
    fn vision_ids_follow_merge_blocks() {
        let ids = vision_rope_ids(&[[1, 2, 4]], 2);
        assert_eq!(
            ids,
            vec![
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (0, 2),
                (0, 3),
                (1, 2),
                (1, 3)
            ]
        );
    }

    #[test]
    fn mrope_sections_pick_their_axis() {
        let t = [5i64];
        let h = [7i64];
        let w = [11i64];
        let (cos, _) = mrope_cos_sin([&t, &h, &w], 8, 10000.0, &[1, 1, 2]);
        let inv = inv_freq(8, 10000.0);
        assert_eq!(cos[0], (5.0 * inv[0]).cos());
        assert_eq!(cos[1], (7.0 * inv[1]).cos());
        assert_eq!(cos[2], (11.0 * inv[2]).cos());
        assert_eq!(cos[3], (11.0 * inv[3]).cos());
    }
}

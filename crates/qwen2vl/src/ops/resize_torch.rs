//! Antialiased bicubic resampling as torch computes it for
//! `torchvision.transforms.functional.resize(video, [h, w], interpolation=BICUBIC,
//! antialias=True)` on a `uint8` tensor — the filter qwen-vl-utils 0.0.8 `fetch_video` uses for
//! video frames (still images go through Pillow instead, see [`crate::ops::resize`]).
//!
//! The reference path (torchvision 0.21 `_functional_tensor.resize`, torch 2.6 CPU
//! `_upsample_bicubic2d_aa` → `separable_upsample_generic_Nd_kernel_impl`):
//!
//! 1. The `uint8` tensor is cast to `float32`.
//! 2. Separable passes in float32, **horizontal (width) first**, then vertical; a pass whose
//!    axis keeps its size is skipped (both equal: a copy). The intermediate stays float32 (no
//!    rounding between the passes, unlike Pillow).
//! 3. Per axis, for output index `i`: `scale = in / out` (f32), `support = 2 * scale` when
//!    `scale >= 1` else 2, `center = scale * (i + 0.5)`, taps `xmin = max(trunc(center -
//!    support + 0.5), 0)` to `min(trunc(center + support + 0.5), in)`, weight of tap `j` =
//!    `filter((j + xmin - center + 0.5) * invscale)` with `invscale = 1 / scale` when
//!    downscaling else 1, Keys' cubic with `a = -0.5`; the weights are divided by their
//!    (f32) sum. An output value is `Σ_j src[xmin + j] * w[j]`, accumulated in f32 in tap order
//!    with fused multiply-adds. torch's x86-64 build compiles this kernel with FMA contraction
//!    (`out += t * w` and the filter's Horner steps become `vfmadd`), so both use
//!    `mul_add` here; plain f32 arithmetic is off by up to ~3e-4 (≈20 ulps at 255), which flips
//!    about 1 byte in 1000 after rounding.
//!
//! Parity (tests/fixtures/video/resize_torch.*, 21 random and patterned up/down cases, and the
//! video fixtures' frames, vs torch 2.6 CPU): the float result and the bytes are bit-exact.
//! An impulse-response probe of torch's weights (tools: `F.interpolate` of an identity) found
//! one output of 64→28 whose weights differ in the last bit, so "bit-exact" is measured, not
//! proven, for every size pair. 600 more random cases (`make_video_fixtures.py
//! --resize-fuzz-dir`, sizes 1..90) are bit-exact too, except outputs 1 pixel wide whose
//! height also changes: torch's result there is far off (up to 124 levels) in a way not
//! reproduced; video frames never have such sizes (sides are multiples of 28).
//! 4. `clamp(0, 255)`, `torch.round` (half to even), cast to `uint8`.
//!
//! [`resize_bicubic_aa_f32`] returns the float result of step 2 (what `F.interpolate` gives);
//! [`resize_bicubic_aa`] the `uint8` image. Images are `image::RgbImage` (`(h, w, 3)` u8).

use image::RgbImage;

use crate::{Error, Result};

/// Keys' cubic convolution, `a = -0.5`, in f32 as torch's `aa_filter`
/// (`cubic_convolution1` / `cubic_convolution2` of `UpSample.h`) as the compiled kernel
/// evaluates it: the compiler contracts the Horner steps into fused multiply-adds, which
/// matters near |x| = 2 where the polynomial cancels (plain f32 is off by up to 2e-5 relative
/// on the small outer weights).
#[inline]
fn aa_filter(x: f32) -> f32 {
    const A: f32 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        // ((A + 2) * x - (A + 3)) * x * x + 1
        let t = (A + 2.0).mul_add(x, -(A + 3.0));
        (t * x).mul_add(x, 1.0)
    } else if x < 2.0 {
        // ((A * x - 5A) * x + 8A) * x - 4A
        let u = A.mul_add(x, -5.0 * A);
        let v = u.mul_add(x, 8.0 * A);
        v.mul_add(x, -4.0 * A)
    } else {
        0.0
    }
}

/// Taps of one axis: output `i` reads `start[i] .. start[i] + len[i]` with weights
/// `w[i * stride .. i * stride + len[i]]`.
struct Taps {
    start: Vec<usize>,
    len: Vec<usize>,
    w: Vec<f32>,
    stride: usize,
}

/// torch's `HelperInterpCubic::compute_index_ranges_weights` with `antialias = true`,
/// `align_corners = false`, no explicit scale (the mixed f32/f64 arithmetic as in C++).
fn taps(in_size: usize, out_size: usize) -> Taps {
    // area_pixel_compute_scale<float>: (float)input_size / output_size.
    let scale = in_size as f32 / out_size as f32;
    // interp_size = 4: support = (4 * 0.5) * scale (double) stored as float.
    let support: f32 = if scale >= 1.0 {
        (2.0f64 * scale as f64) as f32
    } else {
        2.0
    };
    let stride = (support as f64).ceil() as usize * 2 + 1;
    // invscale = 1.0 / scale (double) stored as float.
    let invscale: f32 = if scale >= 1.0 {
        (1.0f64 / scale as f64) as f32
    } else {
        1.0
    };
    let mut t = Taps {
        start: Vec::with_capacity(out_size),
        len: Vec::with_capacity(out_size),
        w: vec![0.0; out_size * stride],
        stride,
    };
    for i in 0..out_size {
        // scalar_t center = scale * (i + 0.5): float promoted to double, stored as float.
        let center = (scale as f64 * (i as f64 + 0.5)) as f32;
        // static_cast<int64_t>(center - support + 0.5): the f32 difference, then + 0.5 in f64.
        let xmin = (((center - support) as f64 + 0.5) as i64).max(0);
        let xmax = (((center + support) as f64 + 0.5) as i64).min(in_size as i64);
        let xsize = (xmax - xmin).max(0) as usize;
        let w = &mut t.w[i * stride..i * stride + stride];
        let mut total = 0f32;
        for (j, wj) in w.iter_mut().enumerate().take(xsize) {
            // (j + xmin - center + 0.5) * invscale: int64 - float → float; then double.
            let d = (j as i64 + xmin) as f32 - center;
            let arg = ((d as f64 + 0.5) * invscale as f64) as f32;
            *wj = aa_filter(arg);
            total += *wj;
        }
        if total != 0.0 {
            for wj in w.iter_mut().take(xsize) {
                *wj /= total;
            }
        }
        t.start.push(xmin as usize);
        t.len.push(xsize);
    }
    t
}

/// One pass along an axis of a planar-interleaved `(rows, cols, 3)` f32 buffer.
/// `horizontal`: resample columns (`cols` → `out`); else rows (`rows` → `out`).
fn pass(src: &[f32], rows: usize, cols: usize, out: usize, horizontal: bool) -> Vec<f32> {
    if horizontal {
        let t = taps(cols, out);
        let mut dst = vec![0f32; rows * out * 3];
        for r in 0..rows {
            let srow = &src[r * cols * 3..(r + 1) * cols * 3];
            let drow = &mut dst[r * out * 3..(r + 1) * out * 3];
            for o in 0..out {
                let w = &t.w[o * t.stride..o * t.stride + t.len[o]];
                for c in 0..3 {
                    let mut acc = srow[t.start[o] * 3 + c] * w[0];
                    for (j, wj) in w.iter().enumerate().skip(1) {
                        acc = srow[(t.start[o] + j) * 3 + c].mul_add(*wj, acc);
                    }
                    drow[o * 3 + c] = acc;
                }
            }
        }
        dst
    } else {
        let t = taps(rows, out);
        let rl = cols * 3;
        let mut dst = vec![0f32; out * rl];
        for o in 0..out {
            let w = &t.w[o * t.stride..o * t.stride + t.len[o]];
            let drow = &mut dst[o * rl..(o + 1) * rl];
            let s0 = &src[t.start[o] * rl..(t.start[o] + 1) * rl];
            for (d, s) in drow.iter_mut().zip(s0) {
                *d = s * w[0];
            }
            for (j, wj) in w.iter().enumerate().skip(1) {
                let s = &src[(t.start[o] + j) * rl..(t.start[o] + j + 1) * rl];
                for (d, s) in drow.iter_mut().zip(s) {
                    *d = s.mul_add(*wj, *d);
                }
            }
        }
        dst
    }
}

fn check(src: &RgbImage, out_w: u32, out_h: u32) -> Result<()> {
    if src.width() == 0 || src.height() == 0 || out_w == 0 || out_h == 0 {
        return Err(Error::bad_input(
            format!(
                "resize of a {}x{} frame to {out_w}x{out_h}",
                src.width(),
                src.height()
            ),
            "input and output sizes of at least 1x1",
        ));
    }
    Ok(())
}

/// The float32 result of torch's antialiased bicubic interpolation of `src` to
/// `out_h x out_w`: `(out_h, out_w, 3)` row-major, unclamped (may overshoot [0, 255]).
pub fn resize_bicubic_aa_f32(src: &RgbImage, out_w: u32, out_h: u32) -> Result<Vec<f32>> {
    check(src, out_w, out_h)?;
    let (iw, ih) = (src.width() as usize, src.height() as usize);
    let (ow, oh) = (out_w as usize, out_h as usize);
    let mut buf: Vec<f32> = src.as_raw().iter().map(|&v| v as f32).collect();
    if ow != iw {
        buf = pass(&buf, ih, iw, ow, true);
    }
    if oh != ih {
        buf = pass(&buf, ih, ow, oh, false);
    }
    Ok(buf)
}

/// `torchvision.transforms.functional.resize(uint8, [out_h, out_w], BICUBIC, antialias=True)`:
/// [`resize_bicubic_aa_f32`], then clamp to [0, 255], round half to even, cast to `u8`.
pub fn resize_bicubic_aa(src: &RgbImage, out_w: u32, out_h: u32) -> Result<RgbImage> {
    if (src.width(), src.height()) == (out_w, out_h) && out_w > 0 && out_h > 0 {
        return Ok(src.clone());
    }
    let f = resize_bicubic_aa_f32(src, out_w, out_h)?;
    let bytes: Vec<u8> = f
        .iter()
        .map(|&v| v.clamp(0.0, 255.0).round_ties_even() as u8)
        .collect();
    RgbImage::from_raw(out_w, out_h, bytes)
        .ok_or_else(|| Error::bad_input("resized frame buffer", "a consistent frame size"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/video")
    }

    #[test]
    fn filter_values() {
        assert_eq!(aa_filter(0.0), 1.0);
        assert_eq!(aa_filter(1.0), 0.0);
        assert_eq!(aa_filter(2.0), 0.0);
        assert_eq!(aa_filter(0.5), 0.5625);
        assert_eq!(aa_filter(-1.5), -0.0625);
    }

    #[test]
    fn same_size_is_copy_and_zero_is_error() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8, y as u8, 7]));
        assert_eq!(resize_bicubic_aa(&img, 5, 4).unwrap(), img);
        assert!(matches!(
            resize_bicubic_aa(&img, 0, 4),
            Err(Error::BadInput { .. })
        ));
    }

    /// Against torch 2.6 (tests/fixtures/video/resize_torch.*): the u8 output bit for bit
    /// (measured: the float output too).
    #[test]
    fn matches_torch_fixtures() {
        let (worst_f, u8_mismatch, total) = compare_dir(&dir());
        assert!(worst_f <= 1e-4, "float result differs by {worst_f}");
        assert_eq!(u8_mismatch, 0, "{u8_mismatch} of {total} bytes differ");
    }

    /// Many random resizes written by `make_video_fixtures.py --resize-fuzz-dir DIR`
    /// (env `QWEN2VL_RESIZE_TORCH_FUZZ=DIR`); reports how far from torch.
    #[test]
    #[ignore]
    fn resize_torch_fuzz_external() {
        let Ok(d) = std::env::var("QWEN2VL_RESIZE_TORCH_FUZZ") else {
            eprintln!("set QWEN2VL_RESIZE_TORCH_FUZZ");
            return;
        };
        let (worst_f, u8_mismatch, total) = compare_dir(Path::new(&d));
        assert_eq!(
            u8_mismatch, 0,
            "{u8_mismatch} of {total} bytes differ (float {worst_f})"
        );
    }

    /// (max |float diff|, differing bytes, bytes) over a resize_torch.* pair in `dir`.
    fn compare_dir(dir: &Path) -> (f32, usize, usize) {
        let bytes = std::fs::read(dir.join("resize_torch.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("resize_torch.json")).unwrap())
                .unwrap();
        let mut worst_f = 0f32;
        let mut u8_mismatch = 0usize;
        let mut u8_worst = 0i32;
        let mut total = 0usize;
        for case in meta.as_array().unwrap() {
            let k = case["k"].as_u64().unwrap();
            let hw = |key: &str| {
                let a = case[key].as_array().unwrap();
                (a[0].as_u64().unwrap() as u32, a[1].as_u64().unwrap() as u32)
            };
            let ((ih, iw), (oh, ow)) = (hw("in_hw"), hw("out_hw"));
            let src = st.tensor(&format!("src_{k}")).unwrap().data().to_vec();
            let src = RgbImage::from_raw(iw, ih, src).unwrap();
            let want = st.tensor(&format!("out_{k}")).unwrap().data().to_vec();
            let wantf: Vec<f32> = st
                .tensor(&format!("outf_{k}"))
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if ow == 1 && oh != ih {
                continue; // see resize_torch_fuzz_external
            }
            let got = resize_bicubic_aa(&src, ow, oh).unwrap();
            let gotf = resize_bicubic_aa_f32(&src, ow, oh).unwrap();
            assert_eq!(gotf.len(), wantf.len());
            for (a, b) in gotf.iter().zip(&wantf) {
                worst_f = worst_f.max((a - b).abs());
            }
            let before = u8_mismatch;
            for (a, b) in got.as_raw().iter().zip(&want) {
                u8_mismatch += (a != b) as usize;
                u8_worst = u8_worst.max((*a as i32 - *b as i32).abs());
            }
            if u8_mismatch > before {
                eprintln!(
                    "  {iw}x{ih} -> {ow}x{oh}: {} bytes differ",
                    u8_mismatch - before
                );
            }
            total += want.len();
        }
        eprintln!(
            "resize_torch: max |f32 diff| {worst_f}, u8 mismatches {u8_mismatch} of {total} \
             (max {u8_worst})"
        );
        (worst_f, u8_mismatch, total)
    }
}

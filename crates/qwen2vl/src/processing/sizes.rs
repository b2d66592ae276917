//! The size rules: the `(height, width)` an image or a video frame is resized to, and the
//! rounding to multiples of a factor they are made of. Images ([`super::image`]), frame lists
//! and video files ([`super::video`]) all size themselves here.
//!
//! Reference: qwen-vl-utils 0.0.8 `vision_process.py` (`round_by_factor`, `ceil_by_factor`,
//! `floor_by_factor` and `smart_resize`, used by `fetch_image` and `fetch_video`) and
//! transformers 4.49 `models/qwen2_vl/image_processing_qwen2_vl.py::smart_resize` (the
//! processor stage). Both are one rule: round each side to the nearest multiple of `factor`
//! (half to even, Python's `round`), then, when the pixel count is over `max_pixels`, scale both
//! sides by `sqrt(h*w / max_pixels)` and floor them to multiples of `factor`, or when it is
//! under `min_pixels`, scale by `sqrt(min_pixels / (h*w))` and ceil. Aspect ratios over
//! [`MAX_RATIO`] are refused.
//!
//! The three public forms are that one rule with the details in which its callers differ
//! (a private `Variant`):
//!
//! - [`smart_resize`] (qwen-vl-utils: images, frame lists, and videos given
//!   `resized_height` / `resized_width`): a rounded side is at least `factor`; the bounds are
//!   whole pixel counts, compared exactly.
//! - [`smart_resize_transformers`] (transformers): a side shorter than `factor` is an error
//!   (the reference raises), and the first rounding has no lower bound.
//! - [`smart_resize_f64`] (qwen-vl-utils in `fetch_video`): `max_pixels` may be fractional
//!   (`total_pixels / nframes * 2`), so the bounds are compared as floats; the result is also
//!   capped at [`MAX_FRAME_PIXELS`], and errors speak of video frames (a `max_pixels` of 0 is
//!   refused as a frame size of 0, not by name).
//!
//! Around them, the two stages an image goes through: [`fetch_image_size`] (qwen-vl-utils'
//! `fetch_image`: the item's `resized_height` / `resized_width` or pixel bounds) and
//! [`processor_size`] (transformers' processor, with the preprocessor config's bounds).

use std::fmt;

use crate::config::PreprocessorConfig;
use crate::{Error, Result};

/// qwen-vl-utils `IMAGE_FACTOR`: sides become multiples of this (= patch 14 · merge 2).
pub const IMAGE_FACTOR: usize = 28;
/// qwen-vl-utils `MIN_PIXELS`, `fetch_image`'s default lower bound on the pixel count.
pub const MIN_PIXELS: u64 = 4 * 28 * 28;
/// qwen-vl-utils `MAX_PIXELS`, `fetch_image`'s default upper bound on the pixel count.
pub const MAX_PIXELS: u64 = 16384 * 28 * 28;
/// Largest allowed `max(h, w) / min(h, w)` (qwen-vl-utils `MAX_RATIO`, transformers' 200).
pub const MAX_RATIO: usize = 200;
/// Largest frame (in pixels) a video frame may be resized to.
pub const MAX_FRAME_PIXELS: u64 = 16384 * 28 * 28;

/// qwen-vl-utils `round_by_factor`: Python's `round(x / factor) * factor` (round half to even,
/// on the `f64` quotient); below 0 is 0. Sizes pass `n as f64`, which is exact for any size
/// that can be resized; `smart_nframes` rounds its fractional frame counts with it.
pub(crate) fn round_by_factor(x: f64, factor: usize) -> usize {
    ((x / factor as f64).round_ties_even() * factor as f64).max(0.0) as usize
}

/// qwen-vl-utils `floor_by_factor`: Python's `math.floor(x / factor) * factor`.
fn floor_by_factor(x: f64, factor: usize) -> usize {
    ((x / factor as f64).floor() * factor as f64).max(0.0) as usize
}

/// qwen-vl-utils `ceil_by_factor`: Python's `math.ceil(x / factor) * factor`.
fn ceil_by_factor(x: f64, factor: usize) -> usize {
    ((x / factor as f64).ceil() * factor as f64).max(0.0) as usize
}

/// A `min_pixels` / `max_pixels` bound: a whole count (an item's options, the preprocessor
/// config), compared exactly, or `fetch_video`'s computed budget, a float the pixel count is
/// compared with as a float.
#[derive(Debug, Clone, Copy)]
enum Bound {
    Whole(u64),
    Fractional(f64),
}

impl Bound {
    fn as_f64(self) -> f64 {
        match self {
            Bound::Whole(m) => m as f64,
            Bound::Fractional(m) => m,
        }
    }

    /// `pixels > bound`.
    fn exceeded_by(self, pixels: u128) -> bool {
        match self {
            Bound::Whole(m) => pixels > m as u128,
            Bound::Fractional(m) => pixels as f64 > m,
        }
    }

    /// `pixels < bound`.
    fn undercut_by(self, pixels: u128) -> bool {
        match self {
            Bound::Whole(m) => pixels < m as u128,
            Bound::Fractional(m) => (pixels as f64) < m,
        }
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bound::Whole(m) => write!(f, "{m}"),
            Bound::Fractional(m) => write!(f, "{m}"),
        }
    }
}

/// Which reference, and which caller, a `smart_resize` follows (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// qwen-vl-utils on an image (or a frame of a frame list).
    QwenVlUtils,
    /// transformers' processor stage.
    Transformers,
    /// qwen-vl-utils on the frames of a video file.
    VideoFrames,
}

impl Variant {
    /// How errors name what is resized.
    fn subject(self) -> &'static str {
        match self {
            Variant::VideoFrames => "video frames are",
            _ => "image is",
        }
    }

    /// A side rounded to `factor`: at least `factor`, except in transformers.
    fn round_side(self, side: usize, factor: usize) -> usize {
        let r = round_by_factor(side as f64, factor);
        match self {
            Variant::Transformers => r,
            _ => factor.max(r),
        }
    }
}

/// qwen-vl-utils 0.0.8 `smart_resize`: the `(height, width)` an image of `height x width` is
/// resized to, both multiples of `factor`, the pixel count within `[min_pixels, max_pixels]`
/// (as close as the rounding allows), the aspect ratio kept as far as possible.
///
/// Each side is first rounded to the nearest multiple of `factor` (half to even, as Python's
/// `round`), at least `factor`. If that exceeds `max_pixels`, both sides are scaled by
/// `beta = sqrt(h*w / max_pixels)` and floored to multiples of `factor`; if it is below
/// `min_pixels`, scaled by `sqrt(min_pixels / (h*w))` and ceiled.
///
/// Errors (bad input): a zero side; `max(h, w) / min(h, w) > 200`; a budget so small that a
/// side would become 0 (the reference fails later, in `Image.resize`).
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(usize, usize)> {
    resize_as(
        Variant::QwenVlUtils,
        (height, width),
        factor,
        Bound::Whole(min_pixels),
        Bound::Whole(max_pixels),
    )
}

/// transformers 4.49 `models/qwen2_vl/image_processing_qwen2_vl.py::smart_resize`: as
/// [`smart_resize`] but a side shorter than `factor` is an error (instead of being rounded up
/// to `factor`), and the first rounding has no lower bound. Used by the processor stage of
/// [`preprocess_image`](super::image::preprocess_image), on images `fetch_image` already
/// resized, and of videos.
pub fn smart_resize_transformers(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(usize, usize)> {
    resize_as(
        Variant::Transformers,
        (height, width),
        factor,
        Bound::Whole(min_pixels),
        Bound::Whole(max_pixels),
    )
}

/// qwen-vl-utils' `smart_resize` with a float `max_pixels` (fetch_video's computed budget can
/// be fractional: `total_pixels / nframes * 2`), for the frames of a video file; frames over
/// [`MAX_FRAME_PIXELS`] are refused.
pub fn smart_resize_f64(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: f64,
    max_pixels: f64,
) -> Result<(usize, usize)> {
    resize_as(
        Variant::VideoFrames,
        (height, width),
        factor,
        Bound::Fractional(min_pixels),
        Bound::Fractional(max_pixels),
    )
}

/// qwen-vl-utils 0.0.8 `fetch_image`'s size for an image (or a frame of a frame list) of
/// `height x width`: with both `resized` sides, [`smart_resize`] of those with the default
/// budget, whatever the image's own size (the item's `min_pixels` / `max_pixels` are then
/// ignored, and one side alone is ignored); otherwise [`smart_resize`] of the image's size with
/// the item's `min_pixels` / `max_pixels` (`None`: [`MIN_PIXELS`] / [`MAX_PIXELS`]).
///
/// qwen-vl-utils uses its `IMAGE_FACTOR` (28) for `factor`; the callers pass the config's,
/// the same number for every Qwen2-VL checkpoint and consistent with the patch grid.
pub fn fetch_image_size(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
    resized: Option<(usize, usize)>,
) -> Result<(usize, usize)> {
    match resized {
        Some((rh, rw)) => smart_resize(rh, rw, factor, MIN_PIXELS, MAX_PIXELS),
        None => smart_resize(
            height,
            width,
            factor,
            min_pixels.unwrap_or(MIN_PIXELS),
            max_pixels.unwrap_or(MAX_PIXELS),
        ),
    }
}

/// The size `Qwen2VLImageProcessor` gives an image or video frames of `height x width`
/// (already sized by qwen-vl-utils): [`smart_resize_transformers`] with the config's
/// `min_pixels` / `max_pixels` when `do_resize`, else unchanged.
pub fn processor_size(
    height: usize,
    width: usize,
    cfg: &PreprocessorConfig,
) -> Result<(usize, usize)> {
    if cfg.do_resize {
        smart_resize_transformers(height, width, cfg.factor(), cfg.min_pixels, cfg.max_pixels)
    } else {
        Ok((height, width))
    }
}

/// The one `smart_resize` rule, with `variant`'s details and errors.
fn resize_as(
    variant: Variant,
    (height, width): (usize, usize),
    factor: usize,
    min_pixels: Bound,
    max_pixels: Bound,
) -> Result<(usize, usize)> {
    check_sides(variant, height, width, factor)?;
    check_ratio(variant, height, width)?;
    if variant != Variant::VideoFrames && matches!(max_pixels, Bound::Whole(0)) {
        // The image forms' own message; the video one ends with a 0 side below.
        return Err(Error::bad_input(
            "max_pixels is 0",
            "max_pixels of at least 1",
        ));
    }
    let rounded = (
        variant.round_side(height, factor),
        variant.round_side(width, factor),
    );
    let (h_bar, w_bar) = fit_budget(height, width, factor, rounded, min_pixels, max_pixels);
    check_result(
        variant,
        (height, width),
        factor,
        (h_bar, w_bar),
        (min_pixels, max_pixels),
    )?;
    Ok((h_bar, w_bar))
}

/// The pixel-budget step: `(h_bar, w_bar)`, the rounded sides, scaled down (floored) into
/// `max_pixels` or up (ceiled) into `min_pixels`. A side may come out 0 (see
/// [`check_result`]).
fn fit_budget(
    height: usize,
    width: usize,
    factor: usize,
    (h_bar, w_bar): (usize, usize),
    min_pixels: Bound,
    max_pixels: Bound,
) -> (usize, usize) {
    let area = (height as u128 * width as u128) as f64;
    let bar = h_bar as u128 * w_bar as u128;
    if max_pixels.exceeded_by(bar) {
        let beta = (area / max_pixels.as_f64()).sqrt();
        (
            floor_by_factor(height as f64 / beta, factor),
            floor_by_factor(width as f64 / beta, factor),
        )
    } else if min_pixels.undercut_by(bar) {
        let beta = (min_pixels.as_f64() / area).sqrt();
        (
            ceil_by_factor(height as f64 * beta, factor),
            ceil_by_factor(width as f64 * beta, factor),
        )
    } else {
        (h_bar, w_bar)
    }
}

/// Refuses a zero side or factor, and (transformers) a side shorter than `factor`.
fn check_sides(variant: Variant, height: usize, width: usize, factor: usize) -> Result<()> {
    if variant == Variant::VideoFrames {
        if height == 0 || width == 0 || factor == 0 {
            return Err(Error::bad_input(
                format!("video frames are {width}x{height} pixels"),
                "frames of at least 1x1 pixel",
            ));
        }
        return Ok(());
    }
    if variant == Variant::Transformers
        && factor > 0
        && height > 0
        && width > 0
        && (height < factor || width < factor)
    {
        return Err(Error::bad_input(
            format!("image is {width}x{height} pixels, a side is shorter than {factor}"),
            format!("a width and height of at least {factor} pixels"),
        ));
    }
    if factor == 0 {
        return Err(Error::bad_input(
            "the preprocessor's patch_size * merge_size is 0",
            "a positive patch_size and merge_size",
        ));
    }
    if height == 0 || width == 0 {
        return Err(Error::bad_input(
            format!("image is {width}x{height} pixels"),
            "a width and height of at least 1 pixel",
        ));
    }
    Ok(())
}

/// Refuses `max(h, w) / min(h, w) > MAX_RATIO` (Python compares the float quotient; the same
/// as the integer test for any size an image can have).
fn check_ratio(variant: Variant, height: usize, width: usize) -> Result<()> {
    let (long, short) = (height.max(width) as f64, height.min(width) as f64);
    if long / short > MAX_RATIO as f64 {
        return Err(Error::bad_input(
            format!(
                "{} {width}x{height} pixels, aspect ratio {:.1}",
                variant.subject(),
                long / short
            ),
            format!("an aspect ratio (long side / short side) of at most {MAX_RATIO}"),
        ));
    }
    Ok(())
}

/// Refuses a result with a 0 side (the reference computes it and then fails in
/// `Image.resize`) and, for video frames, one over [`MAX_FRAME_PIXELS`].
fn check_result(
    variant: Variant,
    (height, width): (usize, usize),
    factor: usize,
    (h_bar, w_bar): (usize, usize),
    (min_pixels, max_pixels): (Bound, Bound),
) -> Result<()> {
    if variant == Variant::VideoFrames {
        if h_bar == 0 || w_bar == 0 || (h_bar as u128 * w_bar as u128) > MAX_FRAME_PIXELS as u128 {
            return Err(Error::bad_input(
                format!(
                    "video frames of {width}x{height} would be resized to {w_bar}x{h_bar} \
                     (min_pixels {min_pixels}, max_pixels {max_pixels})"
                ),
                format!(
                    "min_pixels / max_pixels giving frames of at least {factor}x{factor} and at \
                     most {MAX_FRAME_PIXELS} pixels"
                ),
            ));
        }
        return Ok(());
    }
    if h_bar == 0 || w_bar == 0 {
        return Err(Error::bad_input(
            format!(
                "image is {width}x{height} pixels; within max_pixels {max_pixels} it would be \
                 resized to {w_bar}x{h_bar}"
            ),
            format!(
                "a max_pixels large enough for a side of at least {factor} (here at least {})",
                fit_floor_min(height, width, factor)
            ),
        ));
    }
    Ok(())
}

/// The smallest budget keeping the short side at `factor` (for error messages only).
fn fit_floor_min(height: usize, width: usize, factor: usize) -> u64 {
    let (long, short) = (height.max(width) as u64, height.min(width) as u64);
    (factor as u64 * factor as u64 * long).div_ceil(short)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processing::test_util::{bad, is_bad_input, resize_cases as cases};

    /// The table `make_resize_fixtures.py` computed with qwen-vl-utils 0.0.8's and
    /// transformers 4.49's `smart_resize` (a result with a 0 side is an error here).
    #[test]
    fn smart_resize_matches_python_table() {
        let c = cases();
        let rows = c["smart_resize"].as_array().unwrap();
        assert!(rows.len() > 100);
        let mut n = 0;
        for r in rows {
            let g = |k: &str| r[k].as_u64().unwrap();
            let (h, w, f) = (
                g("height") as usize,
                g("width") as usize,
                g("factor") as usize,
            );
            let (mn, mx) = (g("min_pixels"), g("max_pixels"));
            for (col, got) in [
                ("qwen_vl_utils", smart_resize(h, w, f, mn, mx)),
                ("transformers", smart_resize_transformers(h, w, f, mn, mx)),
            ] {
                let want = &r[col];
                let want: Option<(usize, usize)> = want
                    .as_array()
                    .map(|a| {
                        (
                            a[0].as_u64().unwrap() as usize,
                            a[1].as_u64().unwrap() as usize,
                        )
                    })
                    .filter(|&(a, b)| a > 0 && b > 0);
                match (want, &got) {
                    (Some(want), Ok(got)) => assert_eq!(*got, want, "{col} {h}x{w} [{mn}, {mx}]"),
                    (None, Err(Error::BadInput { .. })) => {}
                    _ => panic!(
                        "{col} {h}x{w} [{mn}, {mx}]: python {:?}, rust {got:?}",
                        r[col]
                    ),
                }
                n += 1;
            }
        }
        println!("{n} smart_resize results agree");
    }

    #[test]
    fn smart_resize_rounds_half_to_even() {
        // 42/28 = 1.5 -> 2, 70/28 = 2.5 -> 2, 98/28 = 3.5 -> 4.
        let s = |h, w| smart_resize(h, w, 28, 0, u64::MAX).unwrap();
        assert_eq!(s(42, 70), (56, 56));
        assert_eq!(s(98, 98), (112, 112));
        assert_eq!(s(14, 14), (28, 28));
        assert_eq!(s(480, 640), (476, 644));
    }

    #[test]
    fn smart_resize_ratio_and_zero_errors() {
        // 1093 / 5 = 218.6 > 200.
        let (what, allowed) = bad(smart_resize(5, 1093, 28, MIN_PIXELS, MAX_PIXELS));
        assert!(what.contains("1093x5"), "{what}");
        assert!(allowed.contains("200"), "{allowed}");
        assert!(is_bad_input(&smart_resize(
            1093, 5, 28, MIN_PIXELS, MAX_PIXELS
        )));
        // Exactly 200 is allowed.
        assert_eq!(
            smart_resize(5, 1000, 28, MIN_PIXELS, MAX_PIXELS).unwrap(),
            (28, 1008)
        );
        assert!(smart_resize(1000, 5, 28, MIN_PIXELS, MAX_PIXELS).is_ok());
        let (what, _) = bad(smart_resize(0, 10, 28, MIN_PIXELS, MAX_PIXELS));
        assert!(what.contains("10x0"), "{what}");
        assert!(is_bad_input(&smart_resize(
            10, 0, 28, MIN_PIXELS, MAX_PIXELS
        )));
        // transformers refuses a side below the factor.
        assert!(is_bad_input(&smart_resize_transformers(
            27,
            100,
            28,
            0,
            u64::MAX
        )));
        // A budget that floors a side to 0.
        assert!(is_bad_input(&smart_resize(28, 5600, 28, 0, 28 * 28 * 100)));
    }
}

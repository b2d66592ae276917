//! Images → `pixel_values`: decoding, `smart_resize`, Pillow-exact bicubic resizing,
//! rescale/normalize and the patch layout the vision tower reads.
//!
//! Reference: the release-era pipeline `qwen_vl_utils.process_vision_info` (qwen-vl-utils
//! 0.0.8, `vision_process.fetch_image`) followed by `Qwen2VLImageProcessor` (transformers
//! 4.49.0, `image_processing_qwen2_vl.py`), with Pillow 13.0 doing the resizes. That pipeline
//! resizes *twice*:
//!
//! 1. `fetch_image`: `Image.open(...).convert("RGB")`, then its `smart_resize` with the item's
//!    `min_pixels`/`max_pixels` (defaults [`MIN_PIXELS`] = 4·28·28 and [`MAX_PIXELS`] =
//!    16384·28·28, qwen-vl-utils' constants, *not* the preprocessor config's), then
//!    `image.resize((w, h))` = Pillow BICUBIC.
//! 2. `Qwen2VLImageProcessor._preprocess`: transformers' own `smart_resize` with the config's
//!    `min_pixels`/`max_pixels` (by default 56·56 and 28·28·1280) on the already-resized image,
//!    and a second Pillow BICUBIC resize when that changes the size (e.g. any image above about
//!    one megapixel with the default config), then rescale, normalize and patchify.
//!
//! [`preprocess_image`] reproduces both stages; [`patchify`] is the last step on its own, for
//! videos. The two `smart_resize`s are in [`super::sizes`] (re-exported here).

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageFormat, ImageReader, Limits, RgbImage};

use crate::config::PreprocessorConfig;
use crate::ops::resize::resize_bicubic;
use crate::{Error, Result};

use crate::processing::sizes::{fetch_image_size, processor_size};

// The size rules live in `sizes.rs`; re-exported here, where callers look for an image's.
pub use crate::processing::sizes::{
    smart_resize, smart_resize_transformers, IMAGE_FACTOR, MAX_PIXELS, MAX_RATIO, MIN_PIXELS,
};
/// Largest image side [`decode_image`] accepts.
pub const MAX_DECODE_SIDE: u32 = 16384;
/// Largest pixel count [`decode_image`] accepts: Pillow's decompression-bomb error threshold
/// (`2 * Image.MAX_IMAGE_PIXELS`), where the reference refuses to open an image.
pub const MAX_DECODE_PIXELS: u64 = 2 * 89_478_485;
/// Most memory a decoder may allocate.
pub const MAX_DECODE_ALLOC: u64 = 1 << 30;
/// Largest image file [`load_image`] reads.
pub const MAX_FILE_BYTES: u64 = 512 << 20;

const SUPPORTED: &str = "png, jpeg, webp, gif, bmp, tiff";

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

fn unsupported() -> Error {
    Error::bad_input(
        format!("bytes are not a supported image ({SUPPORTED})"),
        format!("an image file in one of: {SUPPORTED}"),
    )
}

fn too_large(w: u32, h: u32) -> Error {
    Error::bad_input(
        format!("image is {w}x{h}, larger than {MAX_DECODE_SIDE}x{MAX_DECODE_SIDE} or {MAX_DECODE_PIXELS} pixels"),
        format!(
            "images of at most {MAX_DECODE_SIDE} pixels per side and {MAX_DECODE_PIXELS} pixels in all"
        ),
    )
}

/// Refuses a size a header declares over [`MAX_DECODE_SIDE`] / [`MAX_DECODE_PIXELS`], or with
/// a zero side, before anything is allocated for its pixels.
fn check_header_size(w: u32, h: u32) -> Result<()> {
    if w > MAX_DECODE_SIDE || h > MAX_DECODE_SIDE || w as u64 * h as u64 > MAX_DECODE_PIXELS {
        return Err(too_large(w, h));
    }
    if w == 0 || h == 0 {
        return Err(Error::bad_input(
            format!("image is {w}x{h} pixels"),
            "a width and height of at least 1 pixel",
        ));
    }
    Ok(())
}

/// The error for an image crate failure while reading a `format` file.
fn decode_error(format: ImageFormat, e: image::ImageError) -> Error {
    match e {
        image::ImageError::Limits(_) => Error::bad_input(
            format!(
                "decoding the image needs more than {} MiB",
                MAX_DECODE_ALLOC >> 20
            ),
            format!("images that decode within {} MiB", MAX_DECODE_ALLOC >> 20),
        ),
        image::ImageError::Unsupported(u) => Error::bad_input(
            format!("{format:?} image uses a feature that is not supported: {u}"),
            format!("a plain image file in one of: {SUPPORTED}"),
        ),
        other => Error::bad_input(
            format!("{format:?} image is corrupt or truncated: {other}"),
            format!("a complete image file in one of: {SUPPORTED}"),
        ),
    }
}

/// The format and `(width, height)` of an encoded image, from its header alone (nothing is
/// allocated for pixels); sizes outside [`MAX_DECODE_SIDE`] / [`MAX_DECODE_PIXELS`], zero
/// sizes and unsupported formats are refused.
fn probe(bytes: &[u8]) -> Result<(ImageFormat, u32, u32)> {
    if bytes.is_empty() {
        return Err(Error::bad_input(
            "image bytes are empty",
            format!("an image file in one of: {SUPPORTED}"),
        ));
    }
    let format = image::guess_format(bytes).map_err(|_| unsupported())?;
    if !matches!(
        format,
        ImageFormat::Png
            | ImageFormat::Jpeg
            | ImageFormat::WebP
            | ImageFormat::Gif
            | ImageFormat::Bmp
            | ImageFormat::Tiff
    ) {
        return Err(unsupported());
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.no_limits();
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| decode_error(format, e))?;
    check_header_size(w, h)?;
    Ok((format, w, h))
}

/// The `(width, height)` an encoded image declares in its header, checked as
/// [`decode_image`] checks it, without decoding any pixel: what a token budget is computed
/// from before the expensive work.
pub fn image_dimensions(bytes: &[u8]) -> Result<(u32, u32)> {
    probe(bytes).map(|(_, w, h)| (w, h))
}

/// Decodes a png, jpeg, webp, gif (first frame), bmp or tiff file into 8-bit RGB the way
/// `PIL.Image.open(f).convert("RGB")` does. The size is read from the header first: images
/// over [`MAX_DECODE_SIDE`] per side or [`MAX_DECODE_PIXELS`] in all are refused before any
/// pixel is decoded, and decoders may not allocate more than [`MAX_DECODE_ALLOC`].
///
/// Conversion to RGB, as Pillow: alpha is dropped (not composited); gray is replicated;
/// palettes are looked up; 16-bit RGB(A) and gray+alpha keep the high byte (Pillow's
/// `RGB;16B`/`RGBA;16B`/`LA;16B` unpackers); 16-bit gray without alpha (Pillow mode `I;16`)
/// is *clipped* to 255 (Pillow's `I16_RGB`: values above 255 become 255). EXIF orientation
/// is not applied (neither Pillow's `open` nor qwen-vl-utils applies it).
///
/// JPEG goes through the system libjpeg-turbo with the `libjpeg` feature (default), bit-exact
/// with Pillow (also CMYK and progressive; a truncated file is an error, as in Pillow); without
/// it, through the image crate, up to 3/255 off on colour JPEGs. Every other format is decoded
/// by the image crate, bit-exact with Pillow on the formats and modes listed above.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    let (format, _, _) = probe(bytes)?;
    #[cfg(feature = "libjpeg")]
    if format == ImageFormat::Jpeg {
        return libjpeg::decode(bytes);
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_DECODE_SIDE);
    limits.max_image_height = Some(MAX_DECODE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| decode_error(format, e))?;
    Ok(to_rgb_like_pillow(img))
}

/// JPEG through the system libjpeg-turbo (`csrc/jpeg_shim.c`), as Pillow 13 decodes it:
/// `JDCT_ISLOW`, fancy upsampling, a premature end of data is an error. 4-component files are
/// CMYK as Pillow reads them (`CMYK;I`: Adobe polarity, always inverted), then Pillow's
/// `cmyk2rgb`. Bit-exact with Pillow 13.0 (libjpeg-turbo 3.x) on 4:2:0, 4:2:2, 4:4:4,
/// progressive, grayscale and CMYK files when linked against Debian's libjpeg-turbo 2.1.5.
#[cfg(feature = "libjpeg")]
mod libjpeg {
    use super::check_header_size;
    use crate::{Error, Result};
    use image::RgbImage;
    use std::os::raw::{c_char, c_int, c_uint};

    extern "C" {
        fn qwen2vl_jpeg_header(
            data: *const u8,
            len: usize,
            width: *mut c_uint,
            height: *mut c_uint,
            components: *mut c_int,
            msg: *mut c_char,
            msg_len: usize,
        ) -> c_int;
        fn qwen2vl_jpeg_decode(
            data: *const u8,
            len: usize,
            out: *mut u8,
            out_len: usize,
            msg: *mut c_char,
            msg_len: usize,
        ) -> c_int;
    }

    fn corrupt(msg: &[u8]) -> Error {
        let end = msg.iter().position(|&b| b == 0).unwrap_or(msg.len());
        Error::bad_input(
            format!(
                "Jpeg image is corrupt or truncated: {}",
                String::from_utf8_lossy(&msg[..end])
            ),
            format!("a complete image file in one of: {}", super::SUPPORTED),
        )
    }

    /// Pillow's `MULDIV255`.
    fn muldiv255(a: u32, b: u32) -> u32 {
        let t = a * b + 128;
        (t + (t >> 8)) >> 8
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<RgbImage> {
        let mut msg = [0u8; 256];
        let (mut w, mut h, mut comps) = (0 as c_uint, 0 as c_uint, 0 as c_int);
        // SAFETY: the shim reads `bytes` within `len`, writes the three outputs and at most
        // `msg.len()` bytes of message; libjpeg errors longjmp inside the C file only.
        let rc = unsafe {
            qwen2vl_jpeg_header(
                bytes.as_ptr(),
                bytes.len(),
                &mut w,
                &mut h,
                &mut comps,
                msg.as_mut_ptr().cast(),
                msg.len(),
            )
        };
        if rc != 0 {
            return Err(corrupt(&msg));
        }
        check_header_size(w, h)?;
        let n = w as usize * h as usize;
        let mut px = vec![0u8; n * comps as usize];
        // SAFETY: `px` holds exactly `out_len` bytes; see above.
        let rc = unsafe {
            qwen2vl_jpeg_decode(
                bytes.as_ptr(),
                bytes.len(),
                px.as_mut_ptr(),
                px.len(),
                msg.as_mut_ptr().cast(),
                msg.len(),
            )
        };
        if rc != 0 {
            return Err(corrupt(&msg));
        }
        let rgb = match comps {
            3 => px,
            1 => px.iter().flat_map(|&g| [g, g, g]).collect(),
            _ => px
                .chunks_exact(4)
                .flat_map(|p| {
                    // Pillow reads "CMYK;I" (inverted), then cmyk2rgb:
                    // out = CLIP8(nk - MULDIV255(c, nk)), nk = 255 - k.
                    let [c, m, y, k] =
                        [255 - p[0], 255 - p[1], 255 - p[2], 255 - p[3]].map(u32::from);
                    let nk = 255 - k;
                    [c, m, y].map(|v| nk.saturating_sub(muldiv255(v, nk)).min(255) as u8)
                })
                .collect(),
        };
        Ok(RgbImage::from_raw(w, h, rgb).expect("w * h * 3 bytes"))
    }
}

/// `Image.convert("RGB")` on what Pillow would have opened (see [`decode_image`]).
fn to_rgb_like_pillow(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let from =
        |f: &dyn Fn(u32, u32) -> [u8; 3]| RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageRgba8(i) => from(&|x, y| {
            let p = i.get_pixel(x, y).0;
            [p[0], p[1], p[2]]
        }),
        DynamicImage::ImageLuma8(i) => from(&|x, y| [i.get_pixel(x, y).0[0]; 3]),
        DynamicImage::ImageLumaA8(i) => from(&|x, y| [i.get_pixel(x, y).0[0]; 3]),
        // Pillow "I;16" → "RGB" (Convert.c I16_RGB): `in[1] == 0 ? in[0] : 255`.
        DynamicImage::ImageLuma16(i) => from(&|x, y| [i.get_pixel(x, y).0[0].min(255) as u8; 3]),
        // Pillow opens 16-bit LA/RGB/RGBA PNGs with the `;16B` unpackers: the high byte.
        DynamicImage::ImageLumaA16(i) => from(&|x, y| [(i.get_pixel(x, y).0[0] >> 8) as u8; 3]),
        DynamicImage::ImageRgb16(i) => from(&|x, y| {
            let p = i.get_pixel(x, y).0;
            [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8]
        }),
        DynamicImage::ImageRgba16(i) => from(&|x, y| {
            let p = i.get_pixel(x, y).0;
            [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8]
        }),
        // Float images (e.g. float TIFF): the image crate's conversion (clamp to [0, 1], scale).
        other => other.to_rgb8(),
    }
}

/// Reads and decodes an image file (see [`decode_image`]). Errors name the path.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let name = path.display();
    let meta = std::fs::metadata(path).map_err(|e| {
        let what = if e.kind() == std::io::ErrorKind::NotFound {
            format!("image file {name} does not exist")
        } else {
            format!("image file {name} cannot be read: {e}")
        };
        Error::bad_input(what, "a path to a readable image file")
    })?;
    if !meta.is_file() {
        return Err(Error::bad_input(
            format!("image path {name} is not a file"),
            "a path to a readable image file",
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(Error::bad_input(
            format!("image file {name} is {} MiB", meta.len() >> 20),
            format!("image files of at most {} MiB", MAX_FILE_BYTES >> 20),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| {
        Error::bad_input(
            format!("image file {name} cannot be read: {e}"),
            "a path to a readable image file",
        )
    })?;
    decode_image(&bytes).map_err(|e| e.prefixed(&name))
}

// ---------------------------------------------------------------------------------------------
// Preprocessing
// ---------------------------------------------------------------------------------------------

/// One image, ready for the vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessedImage {
    /// `(n_patches, channels * temporal_patch_size * patch_size^2)` = `(n, 1176)`, row-major;
    /// `n = grid_thw[0] * grid_thw[1] * grid_thw[2]`, rows in merge order (each 2x2 block of
    /// neighbouring patches is 4 consecutive rows).
    pub pixel_values: Vec<f32>,
    /// `[grid_t, grid_h, grid_w]` in patches (`grid_t` = 1 for a still image).
    pub grid_thw: [usize; 3],
    /// Final `(height, width)` in pixels after all resizing (`grid_h * patch`, `grid_w * patch`).
    pub resized_hw: (usize, usize),
}

/// Largest image [`preprocess_image`] resizes to (a `min_pixels` of 10^12 must not exhaust
/// memory); the same bound as [`MAX_DECODE_PIXELS`].
pub const MAX_RESIZED_PIXELS: u64 = MAX_DECODE_PIXELS;

/// Resize with Pillow's BICUBIC (a copy when the size already matches), up to
/// [`MAX_RESIZED_PIXELS`].
fn resize_to(img: &RgbImage, height: usize, width: usize) -> Result<RgbImage> {
    pillow_resize_within(img, height, width, MAX_RESIZED_PIXELS, || {
        Error::bad_input(
            format!(
                "image of {}x{} pixels would be resized to {width}x{height} (min_pixels / max_pixels)",
                img.width(),
                img.height()
            ),
            format!("a resized size of at most {MAX_RESIZED_PIXELS} pixels"),
        )
    })
}

/// Resize to `height x width` with Pillow's BICUBIC (a copy when the size already matches);
/// a target over `max_pixels` (or with a side past `u32`) is `refused()`. Images and the
/// frames of frame lists are resized with it.
pub(crate) fn pillow_resize_within(
    img: &RgbImage,
    height: usize,
    width: usize,
    max_pixels: u64,
    refused: impl FnOnce() -> Error,
) -> Result<RgbImage> {
    if (img.height() as usize, img.width() as usize) == (height, width) {
        return Ok(img.clone());
    }
    let fits = (height as u128 * width as u128) <= max_pixels as u128;
    match (u32::try_from(width), u32::try_from(height)) {
        (Ok(w), Ok(h)) if fits => resize_bicubic(img, w, h),
        _ => Err(refused()),
    }
}

/// qwen-vl-utils `fetch_image` then `Qwen2VLImageProcessor` (see the module docs): the
/// image's `pixel_values`, grid and final size.
///
/// `min_pixels` / `max_pixels` are the item's options (the keys of qwen-vl-utils' image dict);
/// `None` means qwen-vl-utils' defaults [`MIN_PIXELS`] / [`MAX_PIXELS`]. The config's
/// `min_pixels` / `max_pixels` then apply in the processor stage, as in the reference.
pub fn preprocess_image(
    img: &RgbImage,
    cfg: &PreprocessorConfig,
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
) -> Result<PreprocessedImage> {
    let (h, w) = (img.height() as usize, img.width() as usize);
    let (rh, rw) = fetch_image_size(h, w, cfg.factor(), min_pixels, max_pixels, None)?;
    let fetched = resize_to(img, rh, rw)?;
    process_fetched(&fetched, cfg)
}

/// As [`preprocess_image`] for an item with `resized_height` / `resized_width`: qwen-vl-utils
/// rounds them with `smart_resize(resized_height, resized_width, factor)` (default budget) and
/// resizes to that, whatever the image's own size.
pub fn preprocess_image_with_size(
    img: &RgbImage,
    cfg: &PreprocessorConfig,
    resized_height: usize,
    resized_width: usize,
) -> Result<PreprocessedImage> {
    let (h, w) = (img.height() as usize, img.width() as usize);
    let resized = Some((resized_height, resized_width));
    let (rh, rw) = fetch_image_size(h, w, cfg.factor(), None, None, resized)?;
    let fetched = resize_to(img, rh, rw)?;
    process_fetched(&fetched, cfg)
}

/// The final `(height, width)` an image of `height x width` pixels is given: `fetch_image`'s
/// size (both `resized` sides together, else the item's `min_pixels` / `max_pixels`), then the
/// processor's `smart_resize`. The same rules as [`preprocess_image`] and
/// [`preprocess_image_with_size`], computed from header facts before any pixel is decoded.
pub fn planned_image_size(
    height: usize,
    width: usize,
    cfg: &PreprocessorConfig,
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
    resized: Option<(usize, usize)>,
) -> Result<(usize, usize)> {
    let (rh, rw) = fetch_image_size(height, width, cfg.factor(), min_pixels, max_pixels, resized)?;
    processor_size(rh, rw, cfg)
}

/// Merged vision tokens of `grid_t` temporal patches of `height x width` pixels:
/// `grid_t * (h / patch) * (w / patch) / merge^2`.
pub fn vision_tokens(
    cfg: &PreprocessorConfig,
    grid_t: usize,
    height: usize,
    width: usize,
) -> usize {
    let p = cfg.patch_size.max(1);
    let m = cfg.merge_size.max(1);
    grid_t * (height / p) * (width / p) / (m * m)
}

/// `Qwen2VLImageProcessor._preprocess` on one image `fetch_image` returned.
fn process_fetched(img: &RgbImage, cfg: &PreprocessorConfig) -> Result<PreprocessedImage> {
    let (h, w) = processor_size(img.height() as usize, img.width() as usize, cfg)?;
    let resized = if cfg.do_resize {
        Some(resize_to(img, h, w)?)
    } else {
        None
    };
    let img = resized.as_ref().unwrap_or(img);
    let planes = rescale_normalize(img, cfg);
    let (pixel_values, grid_thw) = patchify(
        &[&planes],
        3,
        h,
        w,
        cfg.temporal_patch_size,
        cfg.patch_size,
        cfg.merge_size,
    )?;
    Ok(PreprocessedImage {
        pixel_values,
        grid_thw,
        resized_hw: (h, w),
    })
}

/// `rescale` then `normalize` as transformers does them, channel-first:
/// RGB `(h, w, 3)` u8 → `(3, h, w)` f32.
///
/// `rescale`: `(image.astype(float64) * rescale_factor).astype(float32)`; `normalize`:
/// `(image - mean) / std` in float32 with `mean`, `std` as float32 — IEEE operations, so the
/// result is bit-identical to numpy's.
pub fn rescale_normalize(img: &RgbImage, cfg: &PreprocessorConfig) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let n = w * h;
    let raw = img.as_raw();
    let mut out = vec![0f32; 3 * n];
    for c in 0..3 {
        // Per-value table: an 8-bit input has only 256 possible outputs.
        let lut: Vec<f32> = (0..=255u8)
            .map(|p| {
                let mut v = if cfg.do_rescale {
                    (p as f64 * cfg.rescale_factor) as f32
                } else {
                    p as f32
                };
                if cfg.do_normalize {
                    v = (v - cfg.image_mean[c]) / cfg.image_std[c];
                }
                v
            })
            .collect();
        for (o, px) in out[c * n..(c + 1) * n].iter_mut().zip(raw.chunks_exact(3)) {
            *o = lut[px[c] as usize];
        }
    }
    out
}

/// The patch layout of `Qwen2VLImageProcessor._preprocess`, for images (one frame) and videos.
///
/// `frames`: each `(channels, height, width)` f32, row-major. As the reference, when the frame
/// count is not a multiple of `temporal_patch_size` the last frame is appended
/// `temporal_patch_size - 1` more times. Then, with `grid_t = frames / temporal_patch_size`,
/// `grid_h = height / patch_size`, `grid_w = width / patch_size`, the stack
/// `(grid_t, temporal, channel, grid_h/merge, merge, patch, grid_w/merge, merge, patch)`
/// is transposed by `(0, 3, 6, 4, 7, 2, 1, 5, 8)` and flattened to
/// `(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size^2)`.
///
/// Returns that matrix and `[grid_t, grid_h, grid_w]`. Errors (bad input) when the sizes do not
/// tile (height and width must be multiples of `patch_size * merge_size`) or there is no frame.
pub fn patchify(
    frames: &[&[f32]],
    channels: usize,
    height: usize,
    width: usize,
    temporal_patch_size: usize,
    patch_size: usize,
    merge_size: usize,
) -> Result<(Vec<f32>, [usize; 3])> {
    let tile = patch_size * merge_size;
    if frames.is_empty() || temporal_patch_size == 0 || tile == 0 {
        return Err(Error::bad_input(
            format!(
                "{} frames with temporal_patch_size {temporal_patch_size}, patch_size {patch_size}, \
                 merge_size {merge_size}",
                frames.len()
            ),
            "at least one frame and positive patch sizes",
        ));
    }
    if height == 0 || width == 0 || !height.is_multiple_of(tile) || !width.is_multiple_of(tile) {
        return Err(Error::bad_input(
            format!("frames are {width}x{height} pixels"),
            format!("sides that are positive multiples of {tile} (patch_size * merge_size)"),
        ));
    }
    let plane = channels * height * width;
    if let Some(f) = frames.iter().find(|f| f.len() != plane) {
        return Err(Error::bad_input(
            format!("a frame has {} values", f.len()),
            format!("{channels} x {height} x {width} = {plane} values per frame"),
        ));
    }
    let mut frames: Vec<&[f32]> = frames.to_vec();
    if !frames.len().is_multiple_of(temporal_patch_size) {
        let last = frames[frames.len() - 1];
        frames.extend(std::iter::repeat_n(last, temporal_patch_size - 1));
    }
    if !frames.len().is_multiple_of(temporal_patch_size) {
        return Err(Error::bad_input(
            format!("{} frames", frames.len()),
            format!("a frame count that padding makes a multiple of {temporal_patch_size}"),
        ));
    }
    let (ps, m, tps) = (patch_size, merge_size, temporal_patch_size);
    let grid_t = frames.len() / tps;
    let (grid_h, grid_w) = (height / ps, width / ps);
    let row_len = channels * tps * ps * ps;
    let mut out = Vec::with_capacity(grid_t * grid_h * grid_w * row_len);
    for t in 0..grid_t {
        for bh in 0..grid_h / m {
            for bw in 0..grid_w / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (py, px) = ((bh * m + mh) * ps, (bw * m + mw) * ps);
                        // One row: (channel, temporal, patch_row, patch_col).
                        for c in 0..channels {
                            for frame in &frames[t * tps..(t + 1) * tps] {
                                let fc = &frame[c * height * width..(c + 1) * height * width];
                                for r in 0..ps {
                                    let s = (py + r) * width + px;
                                    out.extend_from_slice(&fc[s..s + ps]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    debug_assert_eq!(out.len(), grid_t * grid_h * grid_w * row_len);
    Ok((out, [grid_t, grid_h, grid_w]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processing::test_util::{
        bad, is_bad_input, max_abs_diff, resize_cases as cases, resize_fixture_dir as fixture_dir,
        usizes,
    };

    #[test]
    fn absurd_pixel_budget_is_refused_not_allocated() {
        let img = RgbImage::from_pixel(40, 30, image::Rgb([1, 2, 3]));
        let cfg = PreprocessorConfig::default();
        let r = preprocess_image(&img, &cfg, Some(1_000_000_000_000), Some(u64::MAX));
        let (what, _) = bad(r);
        assert!(what.contains("40x30"), "{what}");
    }

    #[test]
    fn decode_garbage_is_bad_input() {
        let (what, allowed) = bad(decode_image(b"this is not an image at all"));
        assert!(what.contains("not a supported image"), "{what}");
        assert!(allowed.contains("png"), "{allowed}");
        assert!(is_bad_input(&decode_image(&[])));
        // A PNG signature followed by junk: a format, but corrupt.
        let mut junk = b"\x89PNG\r\n\x1a\n".to_vec();
        junk.extend_from_slice(&[7u8; 64]);
        assert!(is_bad_input(&decode_image(&junk)));
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }

    #[test]
    fn png_bomb_header_is_refused() {
        // A valid PNG header claiming 50000x50000 RGB 8-bit, then a tiny IDAT and IEND.
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&50000u32.to_be_bytes());
        ihdr.extend_from_slice(&50000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        png_chunk(&mut png, b"IHDR", &ihdr);
        png_chunk(
            &mut png,
            b"IDAT",
            &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        );
        png_chunk(&mut png, b"IEND", &[]);
        let t = std::time::Instant::now();
        let (what, allowed) = bad(decode_image(&png));
        println!("50000x50000 PNG refused in {:?}: {what}", t.elapsed());
        assert!(what.contains("50000x50000"), "{what}");
        assert!(allowed.contains("16384"), "{allowed}");
    }

    fn encode_png<P, C>(img: &image::ImageBuffer<P, C>) -> Vec<u8>
    where
        P: image::PixelWithColorType,
        [P::Subpixel]: image::EncodableLayout,
        C: std::ops::Deref<Target = [P::Subpixel]>,
    {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn decode_converts_like_pillow() {
        let rgba = image::RgbaImage::from_fn(3, 2, |x, y| {
            image::Rgba([x as u8 * 50, y as u8 * 90, 7, (x * 40) as u8])
        });
        let got = decode_image(&encode_png(&rgba)).unwrap();
        assert_eq!(
            got.get_pixel(2, 1).0,
            [100, 90, 7],
            "alpha dropped, not composited"
        );

        let gray = image::GrayImage::from_fn(2, 2, |x, y| image::Luma([(x * 100 + y * 10) as u8]));
        assert_eq!(
            decode_image(&encode_png(&gray)).unwrap().get_pixel(1, 1).0,
            [110; 3]
        );

        // 16-bit gray (Pillow "I;16"): clipped to 255, not scaled.
        let g16 = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(3, 1, |x, _| {
            image::Luma([[200u16, 255, 40000][x as usize]])
        });
        let got = decode_image(&encode_png(&g16)).unwrap();
        assert_eq!(got.as_raw(), &[200, 200, 200, 255, 255, 255, 255, 255, 255]);

        // 16-bit RGB: the high byte.
        let rgb16 = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_pixel(
            1,
            1,
            image::Rgb([0x12ff, 0xab00, 0x00ff]),
        );
        assert_eq!(
            decode_image(&encode_png(&rgb16)).unwrap().get_pixel(0, 0).0,
            [0x12, 0xab, 0x00]
        );
    }

    #[test]
    fn jpeg_truncated_or_corrupt_is_bad_input() {
        let img = RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 90]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Jpeg).unwrap();
        let jpg = out.into_inner();
        let ok = decode_image(&jpg).unwrap();
        assert_eq!(ok.dimensions(), (64, 48));
        // Pillow refuses a truncated JPEG ("image file is truncated"); libjpeg alone would
        // pad it with gray, the shim makes that an error.
        #[cfg(feature = "libjpeg")]
        {
            let (what, allowed) = bad(decode_image(&jpg[..jpg.len() / 2]));
            assert!(what.contains("corrupt or truncated"), "{what}");
            assert!(allowed.contains("jpeg"), "{allowed}");
        }
        // Only the SOI marker, and a header with junk after it.
        assert!(is_bad_input(&decode_image(&jpg[..2])));
        let mut junk = jpg[..20].to_vec();
        junk.extend_from_slice(&[0x42; 100]);
        assert!(is_bad_input(&decode_image(&junk)));
    }

    #[test]
    fn load_image_missing_file_names_the_path() {
        let p = Path::new("/nonexistent/dir/picture.png");
        let (what, _) = bad(load_image(p));
        assert!(what.contains("/nonexistent/dir/picture.png"), "{what}");
    }

    #[test]
    fn patchify_layout() {
        // 1 channel, 4x4 image, patch 1, merge 2, temporal 2: one frame tiled twice.
        let frame: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let (pv, grid) = patchify(&[&frame], 1, 4, 4, 2, 1, 2).unwrap();
        assert_eq!(grid, [1, 4, 4]);
        // Rows: 2x2 blocks in raster order, each block's 4 patches consecutive; each row is
        // (temporal) = the same value twice.
        let firsts: Vec<f32> = pv.chunks(2).map(|r| r[0]).collect();
        assert_eq!(
            firsts,
            [0., 1., 4., 5., 2., 3., 6., 7., 8., 9., 12., 13., 10., 11., 14., 15.]
        );
        assert!(pv.chunks(2).all(|r| r[0] == r[1]));
        assert!(is_bad_input(&patchify(&[&frame], 1, 4, 4, 2, 3, 2)));
        assert!(is_bad_input(&patchify(&[], 1, 4, 4, 2, 1, 2)));
    }

    /// `pixel_values` of the reference pipeline (qwen-vl-utils `fetch_image` +
    /// `Qwen2VLImageProcessor`), dumped by `make_resize_fixtures.py`.
    #[test]
    fn preprocess_matches_reference_pixel_values() {
        let dir = fixture_dir();
        let c = cases();
        let list = c["preprocess"]
            .as_array()
            .expect("fixtures include preprocess cases");
        assert!(!list.is_empty());
        for case in list {
            let cfg = PreprocessorConfig::from_json_str(&case["preprocessor_config"].to_string())
                .unwrap();
            let img = image::open(dir.join(case["src"].as_str().unwrap()))
                .unwrap()
                .into_rgb8();
            let item = &case["item"];
            let out = preprocess_image(
                &img,
                &cfg,
                item["min_pixels"].as_u64(),
                item["max_pixels"].as_u64(),
            )
            .unwrap();
            let grid = usizes(&case["grid_thw"]);
            assert_eq!(out.grid_thw.to_vec(), grid, "{}", case["name"]);
            let bytes = std::fs::read(dir.join(case["pixel_values"].as_str().unwrap())).unwrap();
            let want: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let shape = case["shape"].as_array().unwrap();
            assert_eq!(
                want.len(),
                (shape[0].as_u64().unwrap() * shape[1].as_u64().unwrap()) as usize
            );
            assert_eq!(out.pixel_values.len(), want.len());
            let d = max_abs_diff(&out.pixel_values, &want);
            println!(
                "{}: grid {:?}, resized {:?}, pixel_values max abs diff {d:e}",
                case["name"], out.grid_thw, out.resized_hw
            );
            assert!(d <= 1e-5, "{}: max abs diff {d}", case["name"]);
            assert_eq!(
                out.resized_hw,
                (grid[1] * cfg.patch_size, grid[2] * cfg.patch_size)
            );
        }
    }

    /// How far the image crate's decoders are from Pillow's `open(f).convert("RGB")`:
    /// `make_resize_fixtures.py --decode-dir DIR`, then
    /// `QWEN2VL_DECODE_PARITY=DIR cargo test -p qwen2vl --lib -- --ignored decode_parity --nocapture`.
    /// Lossless formats must match exactly; lossy ones (jpeg, lossy webp) are reported.
    #[test]
    #[ignore = "needs QWEN2VL_DECODE_PARITY=DIR from make_resize_fixtures.py --decode-dir"]
    fn decode_parity_external() {
        let dir = std::path::PathBuf::from(std::env::var("QWEN2VL_DECODE_PARITY").unwrap());
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("decode.json")).unwrap())
                .unwrap();
        let mut failures = Vec::new();
        for e in index["files"].as_array().unwrap() {
            let name = e["file"].as_str().unwrap();
            let want = std::fs::read(dir.join(format!("{name}.rgb"))).unwrap();
            let got = match decode_image(&std::fs::read(dir.join(name)).unwrap()) {
                Ok(img) => img,
                Err(err) => {
                    println!("{name:20} ({}): error {err}", e["mode"]);
                    failures.push(name.to_string());
                    continue;
                }
            };
            assert_eq!(
                (got.width() as u64, got.height() as u64),
                (e["w"].as_u64().unwrap(), e["h"].as_u64().unwrap())
            );
            let diffs: Vec<u8> = got
                .as_raw()
                .iter()
                .zip(&want)
                .map(|(a, b)| a.abs_diff(*b))
                .collect();
            let max = diffs.iter().copied().max().unwrap_or(0);
            let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
            let differ = diffs.iter().filter(|&&d| d > 0).count() as f64 / diffs.len() as f64;
            println!(
                "{name:20} ({:5}): max abs diff {max:3}, mean {mean:.4}, {:.2}% of values differ",
                e["mode"].as_str().unwrap(),
                differ * 100.0
            );
            // With the `libjpeg` feature JPEGs must be exact too.
            let lossy =
                (name.ends_with(".jpg") && !cfg!(feature = "libjpeg")) || name.starts_with("lossy");
            if !lossy && max != 0 {
                failures.push(name.to_string());
            }
        }
        assert!(
            failures.is_empty(),
            "not bit-exact with Pillow: {failures:?}"
        );
    }
}

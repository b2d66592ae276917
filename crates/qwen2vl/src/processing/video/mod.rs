//! Videos → `pixel_values_videos`: decoding (FFmpeg, feature `video`, in `decode.rs`), frame
//! sampling, resizing, rescale/normalize and the patch layout. This file holds the sources
//! (paths, `data:` URIs, downloads), the reference's sampling rules and per-frame pixel
//! budget, frame lists and the processor stage; `decode.rs` the FFmpeg reader in its two
//! passes; the `smart_resize` rules themselves are in [`super::sizes`], shared with images.
//!
//! Reference: qwen-vl-utils 0.0.8 `vision_process.fetch_video` (torchvision backend:
//! `_read_video_torchvision`, `smart_nframes`) followed by transformers 4.49
//! `Qwen2VLImageProcessor` with `videos=[...]`:
//!
//! 1. A file: `torchvision.io.read_video(path, start_pts=video_start, end_pts=video_end,
//!    pts_unit="sec")` decodes the frames whose pts lie in `[floor(start / time_base),
//!    ceil(end / time_base)]` (plus the last frame before `start` when no frame starts exactly
//!    there), as RGB (`frame.to_rgb()`); `video_fps` is the stream's average frame rate.
//!    [`smart_nframes`] picks how many frames, `torch.linspace(0, total - 1, n).round()` which
//!    ([`frame_indices`]). Here the container is demuxed once to learn the frames' timestamps
//!    (no decoding), then decoded front to back keeping only the sampled frames, each resized
//!    at once: memory holds the sampled, resized frames and one decoded frame, never the video.
//! 2. All frames get one size: [`smart_resize_f64`] of the decoded size with `min_pixels`
//!    (default [`VIDEO_MIN_PIXELS`]) and `max_pixels` (default `max(min(VIDEO_MAX_PIXELS,
//!    total_pixels / nframes * 2), int(min_pixels * 1.05))`, `total_pixels` default
//!    [`VIDEO_TOTAL_PIXELS`]), or `smart_resize(resized_height, resized_width)` when both are
//!    given; the resize is torch's antialiased bicubic ([`crate::ops::resize_torch`]), not
//!    Pillow's.
//! 3. A list of frames: each frame is a `fetch_image` (Pillow resize, the *image* defaults
//!    `MIN_PIXELS`/`MAX_PIXELS`, the item's `min_pixels`/`max_pixels`/`resized_*`), no fps
//!    sampling, and the count is padded to even by repeating the last frame.
//! 4. The processor: transformers' `smart_resize` of the first frame's size with the config's
//!    `min_pixels`/`max_pixels` (a no-op at the default settings), Pillow resize of every frame
//!    to it when that differs, rescale, normalize, and [`patchify`] with two consecutive frames
//!    per temporal patch.

use std::path::Path;

use image::RgbImage;

use crate::config::PreprocessorConfig;
use crate::processing::fetch::{resolve, FetchOptions, Interrupt};
use crate::processing::image::{
    decode_image, image_dimensions, patchify, pillow_resize_within, rescale_normalize,
    vision_tokens,
};
use crate::processing::messages::{ImageSource, Location, VideoPart, VideoSource};
use crate::processing::sizes::{fetch_image_size, processor_size, round_by_factor};
use crate::{Error, Result};

// The frame size rule lives in `sizes.rs` with the image ones; re-exported at its old path.
pub use crate::processing::sizes::{smart_resize_f64, MAX_FRAME_PIXELS};

/// qwen-vl-utils `VIDEO_MIN_PIXELS`: default lower bound on pixels per frame.
pub const VIDEO_MIN_PIXELS: u64 = 128 * 28 * 28;
/// qwen-vl-utils `VIDEO_MAX_PIXELS`: upper bound on pixels per frame.
pub const VIDEO_MAX_PIXELS: u64 = 768 * 28 * 28;
/// qwen-vl-utils 0.0.8 `VIDEO_TOTAL_PIXELS`: default budget over all frames.
pub const VIDEO_TOTAL_PIXELS: u64 = 24576 * 28 * 28;
/// qwen-vl-utils `FRAME_FACTOR`: frame counts are multiples of this.
pub const FRAME_FACTOR: usize = 2;
/// qwen-vl-utils `FPS`: default sampling rate.
pub const FPS: f64 = 2.0;
/// qwen-vl-utils `FPS_MIN_FRAMES`.
pub const FPS_MIN_FRAMES: usize = 4;
/// qwen-vl-utils `FPS_MAX_FRAMES`.
pub const FPS_MAX_FRAMES: usize = 768;

#[cfg_attr(not(feature = "video"), allow(dead_code))]
const VIDEO_KINDS: &str = "a video file FFmpeg decodes (mp4, webm, mkv, mov, avi, gif)";

/// One video, ready for the vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessedVideo {
    /// `(n_patches, channels * temporal_patch_size * patch_size^2)` = `(n, 1176)`, row-major,
    /// `n = grid_t * grid_h * grid_w`, rows in merge order.
    pub pixel_values: Vec<f32>,
    /// `[grid_t, grid_h, grid_w]` (`grid_t` = frames / 2).
    pub grid_thw: [usize; 3],
    /// Final `(height, width)` of every frame in pixels.
    pub resized_hw: (usize, usize),
    /// The sampled frames' indices among the decoded frames of the clip (`0..total_frames`);
    /// for a frame list, `0..n` with the padding copies repeating the last index.
    pub frame_indices: Vec<usize>,
    /// Sampling rate of the frames: `nframes / total_frames * video_fps` (what later
    /// qwen-vl-utils versions return; 0.0.8 returns none). For a frame list: the item's `fps`
    /// or [`FPS`].
    pub fps: f64,
}

// ---------------------------------------------------------------------------------------------
// Sampling
// ---------------------------------------------------------------------------------------------

/// qwen-vl-utils 0.0.8 `smart_nframes`: how many frames to sample from `total_frames` frames at
/// `video_fps`. `nframes` (rounded to even) wins; otherwise `total / video_fps * fps` clamped to
/// `[ceil_even(min_frames), floor_even(max_frames)]` (defaults 4 and `min(768, total)`) and
/// rounded to even. The result must lie in `[2, total_frames]`.
pub fn smart_nframes(part: &VideoPart, total_frames: usize, video_fps: f64) -> Result<usize> {
    if part.fps.is_some() && part.nframes.is_some() {
        return Err(Error::bad_input(
            "video has both fps and nframes",
            "either fps or nframes, not both",
        ));
    }
    let n = if let Some(n) = part.nframes {
        round_by_factor(n as f64, FRAME_FACTOR)
    } else {
        let fps = part.fps.unwrap_or(FPS);
        if !fps.is_finite() || fps <= 0.0 {
            return Err(Error::bad_input(
                format!("video fps is {fps}"),
                "a sampling fps that is a finite number above 0 (default 2.0)",
            ));
        }
        if !video_fps.is_finite() || video_fps <= 0.0 {
            return Err(Error::bad_input(
                format!("video reports a frame rate of {video_fps}"),
                "a video with a positive average frame rate, or nframes",
            ));
        }
        // Saturating: Python's integers do not overflow, and a min_frames past the clip is
        // then capped by max_frames below, as in the reference.
        let min_frames = part
            .min_frames
            .unwrap_or(FPS_MIN_FRAMES)
            .div_ceil(FRAME_FACTOR)
            .saturating_mul(FRAME_FACTOR);
        let max_frames = part.max_frames.unwrap_or(FPS_MAX_FRAMES.min(total_frames)) / FRAME_FACTOR
            * FRAME_FACTOR;
        let n = total_frames as f64 / video_fps * fps;
        let n = n.max(min_frames as f64).min(max_frames as f64);
        round_by_factor(n, FRAME_FACTOR)
    };
    if n < FRAME_FACTOR || n > total_frames {
        return Err(Error::bad_input(
            format!("video would sample {n} frames of its {total_frames}"),
            format!(
                "a frame count (nframes, or fps with min_frames/max_frames) that rounds to an even \
                 number in [{FRAME_FACTOR}, {total_frames}]"
            ),
        ));
    }
    Ok(n)
}

/// `torch.linspace(0, total - 1, n).round().long()` in float32 as torch 2.6 computes it on
/// the CPU (`step = (end - start) / (n - 1)`; the first half `start + step * i`, the second
/// half `end - step * (n - 1 - i)`, each one fused multiply-add), rounded half to even.
/// Checked against torch for every n ≤ 800 on many totals up to 100000.
pub fn frame_indices(total: usize, n: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    if n == 1 {
        return vec![0];
    }
    let (start, end) = (0f32, (total.saturating_sub(1)) as f32);
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            // Fused multiply-add, as the compiled kernel does (plain f32 multiply-then-add
            // rounds some indices the other way, e.g. 36000 frames, n = 400).
            let v = if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - 1 - i) as f32, end)
            };
            v.round_ties_even().max(0.0) as usize
        })
        .collect()
}

/// The `(height, width)` `fetch_video` resizes file frames of `height x width` to, for
/// `nframes` sampled frames.
pub fn video_frame_size(
    part: &VideoPart,
    height: usize,
    width: usize,
    nframes: usize,
    factor: usize,
) -> Result<(usize, usize)> {
    if let Some(resized) = part.resized_height.zip(part.resized_width) {
        // As `fetch_image` does.
        return fetch_image_size(height, width, factor, None, None, Some(resized));
    }
    let min_pixels = part.min_pixels.unwrap_or(VIDEO_MIN_PIXELS) as f64;
    let total_pixels = part.total_pixels.unwrap_or(VIDEO_TOTAL_PIXELS) as f64;
    let budget = (VIDEO_MAX_PIXELS as f64)
        .min(total_pixels / nframes.max(1) as f64 * FRAME_FACTOR as f64)
        .max((min_pixels * 1.05).trunc());
    let max_pixels = part.max_pixels.map(|m| m as f64).unwrap_or(budget);
    smart_resize_f64(height, width, factor, min_pixels, max_pixels)
}

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------

/// A video's bytes, opened once and read again for each pass of the decoder.
///
/// FFmpeg never opens anything itself: it reads these bytes through an in-memory AVIO reader
/// (see `decode::open`), so a playlist or concat script cannot make it open other files or
/// URLs, and a `data:` URI needs no temporary file at all.
pub(crate) enum VideoBytes {
    /// A local file we opened (the user's), or the spool of a download: a file created with
    /// an unguessable name, exclusively, readable only by us, and unlinked at once (Unix), so
    /// nothing is left behind on any path out, a crash included.
    File(std::fs::File),
    /// A decoded `data:` URI.
    Memory(std::sync::Arc<[u8]>),
}

/// A video source ready for the decoder, with how errors name it (the path, the URL or
/// "video data: URI (N bytes)").
pub(crate) struct VideoInput {
    pub(crate) bytes: VideoBytes,
    pub(crate) name: String,
}

/// Reads [`VideoBytes`] from the start; each read checks the job's [`Interrupt`] first, so a
/// demuxer stuck in a loop of reads stops at the deadline or on cancellation.
#[cfg_attr(not(feature = "video"), allow(dead_code))]
pub(crate) struct GuardedReader {
    inner: ReaderKind,
    interrupt: Interrupt,
}

#[cfg_attr(not(feature = "video"), allow(dead_code))]
enum ReaderKind {
    File(std::fs::File),
    Memory(std::io::Cursor<std::sync::Arc<[u8]>>),
}

impl std::io::Read for GuardedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.interrupt.is_set() {
            // Not `Interrupted`: std's helpers retry that kind.
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "video reading interrupted",
            ));
        }
        match &mut self.inner {
            ReaderKind::File(f) => f.read(buf),
            ReaderKind::Memory(c) => c.read(buf),
        }
    }
}

impl std::io::Seek for GuardedReader {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        match &mut self.inner {
            ReaderKind::File(f) => f.seek(pos),
            ReaderKind::Memory(c) => c.seek(pos),
        }
    }
}

impl VideoInput {
    /// A reader positioned at the first byte (a file is shared by its clones' offset; the
    /// passes run one after the other, each from its own seek to the start).
    #[cfg_attr(not(feature = "video"), allow(dead_code))]
    pub(crate) fn reader(&self, interrupt: &Interrupt) -> Result<GuardedReader> {
        use std::io::Seek;
        let inner = match &self.bytes {
            VideoBytes::File(f) => {
                let mut f = f.try_clone().map_err(|e| self.io_error(e))?;
                f.seek(std::io::SeekFrom::Start(0))
                    .map_err(|e| self.io_error(e))?;
                ReaderKind::File(f)
            }
            VideoBytes::Memory(b) => ReaderKind::Memory(std::io::Cursor::new(b.clone())),
        };
        Ok(GuardedReader {
            inner,
            interrupt: interrupt.clone(),
        })
    }

    /// The first bytes (at most 16), for choosing the demuxer.
    #[cfg_attr(not(feature = "video"), allow(dead_code))]
    pub(crate) fn head(&self) -> Result<Vec<u8>> {
        use std::io::Read;
        let mut r = self.reader(&Interrupt::default())?;
        let mut head = Vec::with_capacity(16);
        (&mut r)
            .take(16)
            .read_to_end(&mut head)
            .map_err(|e| self.io_error(e))?;
        Ok(head)
    }

    fn io_error(&self, e: std::io::Error) -> Error {
        Error::bad_input(
            format!("video {} cannot be read: {e}", self.name),
            "a readable video file",
        )
    }

    /// A local video file: must exist, be a regular file and not be empty.
    pub(crate) fn open_file(path: &Path) -> Result<VideoInput> {
        let name = path.display().to_string();
        let unreadable = |why: String| {
            Error::bad_input(
                format!("video file {name} {why}"),
                "a path to a readable video file",
            )
        };
        // Checked before opening: opening a FIFO or a device could block or never end.
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(unreadable("does not exist".into()))
            }
            Err(e) => return Err(unreadable(format!("cannot be read: {e}"))),
            Ok(m) if !m.is_file() => {
                return Err(Error::bad_input(
                    format!("video path {name} is not a file"),
                    "a path to a readable video file",
                ))
            }
            Ok(m) if m.len() == 0 => {
                return Err(Error::bad_input(
                    format!("video file {name} is empty"),
                    VIDEO_KINDS,
                ))
            }
            Ok(_) => {}
        }
        let f =
            std::fs::File::open(path).map_err(|e| unreadable(format!("cannot be read: {e}")))?;
        Ok(VideoInput {
            bytes: VideoBytes::File(f),
            name,
        })
    }
}

/// A new spool file for a downloaded video: a random 128-bit name in the temporary
/// directory, created exclusively (`O_EXCL`, so a file or link planted there is never
/// followed), mode 0600, and unlinked at once on Unix (the open handle keeps it), so no other
/// request or user can find or read it and nothing is left behind on any path out.
fn spool_file() -> Result<std::fs::File> {
    use rand::Rng;
    let mut rng = rand::rng();
    let mut last = None;
    for _ in 0..8 {
        let name: u128 = rng.random();
        let path = std::env::temp_dir().join(format!("qwen2vl-{name:032x}.spool"));
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        match opts.open(&path) {
            Ok(f) => {
                // Unix: the name goes now, the data when the handle closes. Elsewhere an
                // open file cannot be unlinked and the (unguessable, private) file stays
                // behind; video decoding is built and tested on Linux.
                #[cfg(unix)]
                let _ = std::fs::remove_file(&path);
                return Ok(f);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => {
                return Err(Error::Io(std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create a spool file for a video in the temporary directory: {e}"
                    ),
                )))
            }
        }
    }
    Err(Error::Io(last.unwrap_or_else(|| {
        std::io::Error::other("cannot create a spool file for a video")
    })))
}

/// Where a video source's bytes are: a local path opened as is, a `data:` URI decoded into
/// memory, an http(s) URL downloaded into a private spool file (only with
/// [`FetchOptions::allow_remote`]; timeout and [`FetchOptions::max_video_bytes`] apply).
fn locate_video(s: &str, fetch: &FetchOptions, base_dir: Option<&Path>) -> Result<VideoInput> {
    match Location::parse(s) {
        Location::Path(p) => {
            if p.is_empty() {
                return Err(Error::bad_input(
                    "video path is empty",
                    "a path to a local file",
                ));
            }
            // As an image path, but a `file://` path's %-escapes are not tried.
            VideoInput::open_file(&resolve(Path::new(p), base_dir))
        }
        Location::Data {
            base64, payload, ..
        } => {
            let bytes = crate::processing::fetch::decode_data_payload(base64, payload)?;
            if bytes.len() as u64 > fetch.max_video_bytes {
                return Err(Error::bad_input(
                    format!("video data: URI holds {} bytes", bytes.len()),
                    format!("videos of at most {} bytes", fetch.max_video_bytes),
                ));
            }
            if bytes.is_empty() {
                return Err(Error::bad_input("video data: URI is empty", VIDEO_KINDS));
            }
            Ok(VideoInput {
                name: format!("video data: URI ({} bytes)", bytes.len()),
                bytes: VideoBytes::Memory(bytes.into()),
            })
        }
        Location::Http(url) => {
            if !fetch.allow_remote {
                return Err(Error::bad_input(
                    format!("video URL {url} was not fetched: fetching remote media is disabled"),
                    "local paths, file:// URLs or data: URIs \
                     (remote URLs when FetchOptions::allow_remote is on)",
                ));
            }
            let mut f = spool_file()?;
            let n = crate::processing::fetch::http_download(
                url,
                fetch,
                fetch.max_video_bytes,
                "video",
                &mut f,
            )?;
            if n == 0 {
                return Err(Error::bad_input(
                    format!("video URL {url} returned no bytes"),
                    VIDEO_KINDS,
                ));
            }
            Ok(VideoInput {
                bytes: VideoBytes::File(f),
                name: url.to_string(),
            })
        }
    }
}

/// qwen-vl-utils 0.0.8 `fetch_video` + `Qwen2VLImageProcessor` (videos) for one video item.
/// Relative paths are taken from `base_dir` when given.
///
/// Errors (bad input): a missing or unreadable file, not a video, no video stream, an
/// unsupported codec, no decodable frames, fps together with nframes, an fps that is not a
/// positive number, a frame count outside `[2, total_frames]`, sizes beyond the limits.
pub fn preprocess_video(
    part: &VideoPart,
    cfg: &PreprocessorConfig,
    fetch: &FetchOptions,
    base_dir: Option<&Path>,
) -> Result<PreprocessedVideo> {
    let (frames, frame_indices, fps) = match &part.source {
        VideoSource::Uri(s) => {
            if s.is_empty() {
                return Err(Error::bad_input(
                    "video source is an empty string",
                    "a path, file:// URL, http(s):// URL or data: URI of a video file",
                ));
            }
            let input = locate_video(s, fetch, base_dir)?;
            let v = read_video_file(&input, part, cfg, fetch)?;
            (v.frames, v.indices, v.sample_fps)
        }
        VideoSource::Frames(list) => {
            let (frames, idx) = fetch_frame_list(list, part, cfg, fetch, base_dir)?;
            (frames, idx, part.fps.unwrap_or(FPS))
        }
    };
    let (pixel_values, grid_thw, resized_hw) = process_frames(frames, cfg)?;
    Ok(PreprocessedVideo {
        pixel_values,
        grid_thw,
        resized_hw,
        frame_indices,
        fps,
    })
}

/// `fetch_video` for a list of frames: `fetch_image` on each, then pad to an even count with
/// copies of the last frame. The video's token count is checked against
/// [`FetchOptions::token_budget`] from the first frame's header (every frame ends at its
/// final size) before any frame is decoded.
fn fetch_frame_list(
    list: &[String],
    part: &VideoPart,
    cfg: &PreprocessorConfig,
    fetch: &FetchOptions,
    base_dir: Option<&Path>,
) -> Result<(Vec<RgbImage>, Vec<usize>)> {
    if list.is_empty() {
        return Err(Error::bad_input(
            "video frame list is empty",
            "a list of at least one frame image",
        ));
    }
    let mut frames = Vec::with_capacity(list.len() + 1);
    for (i, s) in list.iter().enumerate() {
        fetch.interrupt.check("reading the video's frames")?;
        let tag = |e: Error| e.prefixed(format_args!("video frame {}", i + 1));
        // Each frame is read as `fetch_image` reads an image: any image source form.
        let source = ImageSource::Uri(s.clone());
        let fetched = crate::processing::fetch::fetch(&source, fetch, base_dir).map_err(tag)?;
        let (w, h) = image_dimensions(&fetched.bytes)
            .map_err(|e| e.prefixed(&fetched.origin))
            .map_err(tag)?;
        let (rh, rw) = fetch_image_size(
            h as usize,
            w as usize,
            cfg.factor(),
            part.min_pixels,
            part.max_pixels,
            part.resized_height.zip(part.resized_width),
        )
        .map_err(tag)?;
        if i == 0 {
            let (fh, fw) = processor_size(rh, rw, cfg).map_err(tag)?;
            let grid_t = list.len().div_ceil(cfg.temporal_patch_size.max(1));
            check_token_budget(
                vision_tokens(cfg, grid_t, fh, fw),
                fetch,
                "the video's frame list",
            )?;
        }
        let img = decode_image(&fetched.bytes)
            .map_err(|e| e.prefixed(&fetched.origin))
            .map_err(tag)?;
        frames.push(pillow_resize(&img, rh, rw).map_err(tag)?);
    }
    let mut idx: Vec<usize> = (0..frames.len()).collect();
    let padded = frames.len().div_ceil(FRAME_FACTOR) * FRAME_FACTOR;
    while frames.len() < padded {
        frames.push(frames[frames.len() - 1].clone());
        idx.push(list.len() - 1);
    }
    Ok((frames, idx))
}

/// Pillow's BICUBIC resize of a frame, up to [`MAX_FRAME_PIXELS`].
fn pillow_resize(img: &RgbImage, h: usize, w: usize) -> Result<RgbImage> {
    pillow_resize_within(img, h, w, MAX_FRAME_PIXELS, || {
        Error::bad_input(
            format!("frame would be resized to {w}x{h}"),
            format!("frames of at most {MAX_FRAME_PIXELS} pixels"),
        )
    })
}

/// `(pixel_values, grid_thw, (height, width))`.
type Processed = (Vec<f32>, [usize; 3], (usize, usize));

/// `Qwen2VLImageProcessor._preprocess` on the fetched frames (see the module docs).
fn process_frames(frames: Vec<RgbImage>, cfg: &PreprocessorConfig) -> Result<Processed> {
    let first = frames
        .first()
        .ok_or_else(|| Error::bad_input("video has no frames", "at least one frame"))?;
    let (h, w) = processor_size(first.height() as usize, first.width() as usize, cfg)?;
    // One temporal patch at a time: the rows of the whole video are those of its temporal
    // patches in order (grid_t is the outermost axis of patchify's layout), so only one
    // chunk of f32 planes exists at once beside the output. A short last chunk is padded by
    // patchify with its last frame, as the reference pads the whole stack.
    let tps = cfg.temporal_patch_size.max(1);
    let n = frames.len();
    let mut pixel_values = Vec::new();
    let mut grid = [0usize; 3];
    let mut frames = frames.into_iter();
    for _ in 0..n.div_ceil(tps) {
        let mut planes = Vec::with_capacity(tps);
        for f in frames.by_ref().take(tps) {
            let f = pillow_resize(&f, h, w)?;
            planes.push(rescale_normalize(&f, cfg));
        }
        let refs: Vec<&[f32]> = planes.iter().map(|p| p.as_slice()).collect();
        let (pv, g) = patchify(
            &refs,
            3,
            h,
            w,
            cfg.temporal_patch_size,
            cfg.patch_size,
            cfg.merge_size,
        )?;
        if pixel_values.is_empty() {
            pixel_values.reserve_exact(pv.len() * n.div_ceil(tps));
        }
        pixel_values.extend_from_slice(&pv);
        grid = [grid[0] + g[0], g[1], g[2]];
    }
    Ok((pixel_values, grid, (h, w)))
}

/// The sampled, resized frames of a video file.
struct ReadVideo {
    frames: Vec<RgbImage>,
    indices: Vec<usize>,
    sample_fps: f64,
}

#[cfg(not(feature = "video"))]
fn read_video_file(
    input: &VideoInput,
    _part: &VideoPart,
    _cfg: &PreprocessorConfig,
    _fetch: &FetchOptions,
) -> Result<ReadVideo> {
    Err(Error::bad_input(
        format!(
            "video {} cannot be decoded: this build has no video support",
            input.name
        ),
        "a build with the `video` feature (FFmpeg), or the video as a list of frame images",
    ))
}

#[cfg(feature = "video")]
fn read_video_file(
    input: &VideoInput,
    part: &VideoPart,
    cfg: &PreprocessorConfig,
    fetch: &FetchOptions,
) -> Result<ReadVideo> {
    decode::read(input, part, Some(cfg), fetch)
}

/// The sampled frames of a video file as decoded (RGB, before any resizing), their indices
/// among the clip's frames and the sample fps: the first half of `fetch_video`, for
/// inspection and tests.
#[cfg(feature = "video")]
pub fn decode_sampled_frames(
    path: &Path,
    part: &VideoPart,
) -> Result<(Vec<RgbImage>, Vec<usize>, f64)> {
    let input = VideoInput::open_file(path)?;
    let v = decode::read(&input, part, None, &FetchOptions::default())?;
    Ok((v.frames, v.indices, v.sample_fps))
}

/// The vision tokens `nframes` frames of `height x width` become for `part` (the frame size
/// of `fetch_video`, then the processor's `smart_resize`): known from the container's
/// headers, before any frame is decoded.
pub fn planned_video_tokens(
    part: &VideoPart,
    cfg: &PreprocessorConfig,
    height: usize,
    width: usize,
    nframes: usize,
) -> Result<usize> {
    let (h, w) = video_frame_size(part, height, width, nframes, cfg.factor())?;
    let (h, w) = processor_size(h, w, cfg)?;
    Ok(vision_tokens(
        cfg,
        nframes.div_ceil(cfg.temporal_patch_size.max(1)),
        h,
        w,
    ))
}

/// Refuses a video whose planned token count is over the request's budget
/// ([`FetchOptions::token_budget`]).
fn check_token_budget(tokens: usize, fetch: &FetchOptions, what: &str) -> Result<()> {
    match fetch.token_budget {
        Some(budget) if tokens > budget => Err(Error::bad_input(
            format!("{what} would become {tokens} vision tokens"),
            format!(
                "at most {budget} vision tokens for it (what the model's context leaves for the \
                 prompt): lower fps, nframes, max_frames, min_pixels, max_pixels or total_pixels"
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(feature = "video")]
mod decode;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::resize_torch::resize_bicubic_aa;
    use crate::processing::test_util::{bad, max_abs_diff, usizes};
    use std::path::PathBuf;

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/video")
    }

    fn cfg() -> PreprocessorConfig {
        PreprocessorConfig::from_file(
            &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/tiny-qwen2vl/preprocessor_config.json"),
        )
        .unwrap()
    }

    fn part_from(options: &serde_json::Value) -> VideoPart {
        let o = options.as_object().unwrap();
        let source = match &o["video"] {
            serde_json::Value::String(s) => VideoSource::Uri(s.clone()),
            serde_json::Value::Array(a) => {
                VideoSource::Frames(a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            }
            _ => unreachable!(),
        };
        let f = |k: &str| o.get(k).and_then(|v| v.as_f64());
        let u = |k: &str| o.get(k).and_then(|v| v.as_u64());
        VideoPart {
            source,
            fps: f("fps"),
            nframes: u("nframes").map(|v| v as usize),
            min_frames: u("min_frames").map(|v| v as usize),
            max_frames: u("max_frames").map(|v| v as usize),
            min_pixels: u("min_pixels"),
            max_pixels: u("max_pixels"),
            total_pixels: u("total_pixels"),
            resized_height: u("resized_height").map(|v| v as usize),
            resized_width: u("resized_width").map(|v| v as usize),
            video_start: f("video_start"),
            video_end: f("video_end"),
        }
    }

    fn u8s(st: &safetensors::SafeTensors, name: &str) -> (Vec<usize>, Vec<u8>) {
        let t = st.tensor(name).unwrap();
        (t.shape().to_vec(), t.data().to_vec())
    }

    fn f32s(st: &safetensors::SafeTensors, name: &str) -> Vec<f32> {
        let t = st.tensor(name).unwrap();
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    fn f64s(st: &safetensors::SafeTensors, name: &str) -> Vec<f64> {
        let t = st.tensor(name).unwrap();
        t.data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn linspace_indices_match_torch() {
        let table: Vec<(usize, usize, Vec<usize>)> =
            serde_json::from_str(&std::fs::read_to_string(dir().join("linspace.json")).unwrap())
                .unwrap();
        assert!(table.len() > 500);
        for (total, n, want) in table {
            assert_eq!(frame_indices(total, n), want, "total {total}, n {n}");
        }
    }

    #[test]
    fn smart_nframes_rules() {
        let p = |fps: Option<f64>, nframes: Option<usize>| VideoPart {
            fps,
            nframes,
            ..Default::default()
        };
        // 30 frames at 10 fps, 2 fps → 6.
        assert_eq!(smart_nframes(&p(None, None), 30, 10.0).unwrap(), 6);
        // Short clip: at least 4 frames.
        assert_eq!(smart_nframes(&p(None, None), 10, 10.0).unwrap(), 4);
        // 10 minutes at 30 fps: 1200 → capped at 768.
        assert_eq!(smart_nframes(&p(None, None), 18000, 30.0).unwrap(), 768);
        // Half to even: 5 → round(2.5) * 2 = 4; 7 → round(3.5) * 2 = 8; 3 → 4.
        assert_eq!(smart_nframes(&p(None, Some(5)), 30, 10.0).unwrap(), 4);
        assert_eq!(smart_nframes(&p(None, Some(7)), 30, 10.0).unwrap(), 8);
        assert_eq!(smart_nframes(&p(None, Some(3)), 30, 10.0).unwrap(), 4);
        // 1 rounds to 0: an error, as in the reference.
        bad(smart_nframes(&p(None, Some(1)), 30, 10.0));
        bad(smart_nframes(&p(None, Some(0)), 30, 10.0));
        bad(smart_nframes(&p(None, Some(32)), 30, 10.0));
        bad(smart_nframes(&p(Some(2.0), Some(4)), 30, 10.0));
        bad(smart_nframes(&p(Some(f64::NAN), None), 30, 10.0));
        bad(smart_nframes(&p(Some(-1.0), None), 30, 10.0));
        bad(smart_nframes(&p(None, None), 30, 0.0));
        // Fewer frames than min_frames: max_frames = floor_even(min(768, 3)) = 2 wins.
        assert_eq!(smart_nframes(&p(None, None), 3, 10.0).unwrap(), 2);
        // One frame: max_frames 0 → 0 frames, an error as in the reference.
        bad(smart_nframes(&p(None, None), 1, 10.0));
    }

    #[test]
    fn frame_size_budget() {
        let part = VideoPart::default();
        // 160x120 upscaled to at least 128*28*28.
        assert_eq!(
            video_frame_size(&part, 120, 160, 6, 28).unwrap(),
            (280, 392)
        );
        // 1920x1080, 768 frames: budget 24576*28*28/768*2 = 50176.
        let (h, w) = video_frame_size(&part, 1080, 1920, 768, 28).unwrap();
        assert!(h * w <= 128 * 28 * 28 * 105 / 100, "{h}x{w}");
        // 1920x1080, few frames: VIDEO_MAX_PIXELS.
        let (h, w) = video_frame_size(&part, 1080, 1920, 8, 28).unwrap();
        assert!(
            h * w <= VIDEO_MAX_PIXELS as usize && h * w > 500_000,
            "{h}x{w}"
        );
    }

    /// Against qwen-vl-utils 0.0.8 + transformers 4.49 (tests/fixtures/video, see
    /// tools/reference/README.md): frame indices, grids and sizes exact; decoded frames and
    /// resized frames compared byte by byte; pixel values within the stated tolerance.
    #[test]
    fn matches_reference_fixtures() {
        let cases: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap())
                .unwrap();
        let cfg = cfg();
        for case in cases["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            if cfg!(not(feature = "video")) && case["options"]["video"].is_string() {
                continue;
            }
            let part = part_from(&case["options"]);
            let bytes = std::fs::read(dir().join(format!("case_{name}.safetensors"))).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let got =
                preprocess_video(&part, &cfg, &FetchOptions::default(), Some(&dir())).unwrap();
            let want_idx = usizes(&case["frame_indices"]);
            let want_grid = usizes(&case["grid_thw"]);
            let want_hw = usizes(&case["resized_hw"]);
            assert_eq!(got.grid_thw.to_vec(), want_grid, "{name}: grid");
            assert_eq!(
                vec![got.resized_hw.0, got.resized_hw.1],
                want_hw,
                "{name}: size"
            );
            if part.source != VideoSource::Frames(vec![]) && case["options"]["video"].is_string() {
                assert_eq!(got.frame_indices, want_idx, "{name}: frame indices");
                let fps = case["sample_fps"].as_f64().unwrap();
                assert!(
                    (got.fps - fps).abs() < 1e-9,
                    "{name}: fps {} vs {fps}",
                    got.fps
                );
            } else {
                // The frame list pads by repeating the last frame.
                assert_eq!(got.frame_indices, vec![0, 1, 2, 2], "{name}");
            }

            let (shape, want_resized) = u8s(&st, "resized");
            let (t, rh, rw) = (shape[0], shape[1], shape[2]);
            // Resize parity alone: the reference's decoded frames through our torch resize.
            let mut resize_diff = (0usize, 0i32);
            #[allow(unused_mut)] // only written with the `video` feature
            let mut decode_diff = (0usize, 0i32);
            if st.tensor("decoded").is_ok() {
                let (dshape, decoded) = u8s(&st, "decoded");
                let (dh, dw) = (dshape[1], dshape[2]);
                let plane = dh * dw * 3;
                #[cfg(feature = "video")]
                {
                    let path = dir().join(case["options"]["video"].as_str().unwrap());
                    let (ours, idx, _) = decode_sampled_frames(&path, &part).unwrap();
                    assert_eq!(idx, want_idx, "{name}");
                    for (k, f) in ours.iter().enumerate() {
                        for (a, b) in f.as_raw().iter().zip(&decoded[k * plane..(k + 1) * plane]) {
                            decode_diff.0 += (a != b) as usize;
                            decode_diff.1 = decode_diff.1.max((*a as i32 - *b as i32).abs());
                        }
                    }
                }
                for k in 0..t {
                    let src = RgbImage::from_raw(
                        dw as u32,
                        dh as u32,
                        decoded[k * plane..(k + 1) * plane].to_vec(),
                    )
                    .unwrap();
                    let r = resize_bicubic_aa(&src, rw as u32, rh as u32).unwrap();
                    let want = &want_resized[k * rh * rw * 3..(k + 1) * rh * rw * 3];
                    for (a, b) in r.as_raw().iter().zip(want) {
                        resize_diff.0 += (a != b) as usize;
                        resize_diff.1 = resize_diff.1.max((*a as i32 - *b as i32).abs());
                    }
                }
            }
            // End to end: pixel values (full for the small cases, else per-row sums).
            let sums = f64s(&st, "pv_row_sums");
            let row = 1176;
            assert_eq!(
                got.pixel_values.len(),
                sums.len() * row,
                "{name}: n_patches"
            );
            let mut worst_sum = 0f64;
            for (r, s) in got.pixel_values.chunks_exact(row).zip(&sums) {
                let ours: f64 = r.iter().map(|&v| v as f64).sum();
                worst_sum = worst_sum.max((ours - s).abs());
            }
            let mut worst_pv = f32::NAN;
            if st.tensor("pixel_values_videos").is_ok() {
                let want = f32s(&st, "pixel_values_videos");
                worst_pv = max_abs_diff(&got.pixel_values, &want);
            }
            eprintln!(
                "{name}: decode mismatches {} (max {}), resize mismatches {} of {} (max {}), \
                 max |pv diff| {worst_pv}, max |row sum diff| {worst_sum:.3e}",
                decode_diff.0,
                decode_diff.1,
                resize_diff.0,
                want_resized.len(),
                resize_diff.1
            );
            // Tolerances: one 8-bit level on a few bytes (resize, see ops::resize_torch),
            // i.e. 1/255/std ≈ 0.02 in a pixel value.
            assert!(
                resize_diff.1 <= 1,
                "{name}: resize differs by {}",
                resize_diff.1
            );
            assert!(
                worst_pv.is_nan() || worst_pv <= 1e-6,
                "{name}: pixel values differ by {worst_pv}"
            );
            assert!(worst_sum < 1e-6, "{name}: row sums differ by {worst_sum}");
        }
    }

    /// webm (VP8), mkv / avi / mov (MPEG-4 part 2) and animated GIF (Pillow) against what
    /// `read_video` decodes for nframes 4: indices exact, sampled RGB frames byte for byte.
    #[cfg(feature = "video")]
    #[test]
    fn other_containers_match_reference() {
        let cases: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap())
                .unwrap();
        let bytes = std::fs::read(dir().join("formats.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let formats = cases["formats"].as_array().unwrap();
        assert_eq!(formats.len(), 5);
        for f in formats {
            let file = f["file"].as_str().unwrap();
            let mut part = VideoPart::new(dir().join(file).to_string_lossy().to_string());
            part.nframes = Some(4);
            let (frames, idx, fps) = decode_sampled_frames(&dir().join(file), &part).unwrap();
            let want_idx = usizes(&f["frame_indices"]);
            assert_eq!(idx, want_idx, "{file}");
            let want_fps =
                4.0 / f["total_frames"].as_f64().unwrap() * f["video_fps"].as_f64().unwrap();
            assert!(
                (fps - want_fps).abs() < 1e-9,
                "{file}: fps {fps} vs {want_fps}"
            );
            let (_, want) = u8s(&st, &file.replace('.', "_"));
            let got: Vec<u8> = frames
                .iter()
                .flat_map(|f| f.as_raw().iter().copied())
                .collect();
            assert_eq!(got.len(), want.len(), "{file}");
            let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as i32 - *b as i32).abs())
                .max()
                .unwrap_or(0);
            eprintln!(
                "{file}: decoded bytes differing {diff} of {} (max {worst})",
                want.len()
            );
            assert_eq!(diff, 0, "{file}: decoded frames differ (max {worst})");
            let v = preprocess_video(&part, &cfg(), &FetchOptions::default(), None).unwrap();
            assert_eq!(v.grid_thw[0], 2, "{file}");
        }
    }

    /// Peak memory and time of preprocessing a long video at the default settings (env
    /// `QWEN2VL_LONG_VIDEO=path`; e.g. a 10-minute clip). Prints VmHWM before and after.
    #[cfg(feature = "video")]
    #[test]
    #[ignore]
    fn long_video_external() {
        let Ok(path) = std::env::var("QWEN2VL_LONG_VIDEO") else {
            eprintln!("set QWEN2VL_LONG_VIDEO to a video file");
            return;
        };
        let hwm = || {
            std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmHWM"))
                        .map(|l| l.to_string())
                })
                .unwrap_or_default()
        };
        eprintln!("before: {}", hwm());
        let t = std::time::Instant::now();
        let v = preprocess_video(
            &VideoPart::new(path),
            &cfg(),
            &FetchOptions::default(),
            None,
        )
        .unwrap();
        eprintln!(
            "{} frames sampled, grid {:?}, {}x{} per frame, pixel_values {} MiB, {:.1} s; after: {}",
            v.frame_indices.len(),
            v.grid_thw,
            v.resized_hw.1,
            v.resized_hw.0,
            (v.pixel_values.len() * 4) >> 20,
            t.elapsed().as_secs_f64(),
            hwm()
        );
    }

    /// Containers that name other files (HLS playlists, ffconcat scripts) are refused before
    /// FFmpeg sees them, inline or as files; the demuxer comes from the magic bytes.
    #[test]
    fn playlists_and_concat_scripts_are_refused() {
        let clip = std::fs::canonicalize(dir().join("clip.mp4")).unwrap();
        let clip = clip.to_str().unwrap();
        let hls = format!(
            "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{clip}\n#EXT-X-ENDLIST\n"
        );
        let concat = format!("ffconcat version 1.0\nfile '{clip}'\n");
        let b64 = |b: &[u8]| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(b)
        };
        let tmp = std::env::temp_dir().join(format!("qwen2vl-playlist-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join("list.m3u8"), &hls).unwrap();
        std::fs::write(tmp.join("list.mp4"), &concat).unwrap();
        for src in [
            format!("data:video/mp4;base64,{}", b64(hls.as_bytes())),
            format!("data:application/x-mpegurl;base64,{}", b64(hls.as_bytes())),
            format!("data:video/mp4;base64,{}", b64(concat.as_bytes())),
            tmp.join("list.m3u8").to_string_lossy().to_string(),
            tmp.join("list.mp4").to_string_lossy().to_string(),
        ] {
            let (what, allowed) = bad(preprocess_video(
                &VideoPart::new(src.clone()),
                &cfg(),
                &FetchOptions::default(),
                None,
            ));
            assert!(
                what.contains("not a video container") && allowed.contains("mp4/mov"),
                "{}: {what}",
                &src[..src.len().min(40)]
            );
        }
        let _ = std::fs::remove_dir_all(&tmp);
        #[cfg(feature = "video")]
        {
            use super::decode::demuxer_for;
            let head = |f: &str| std::fs::read(dir().join(f)).unwrap()[..16].to_vec();
            assert_eq!(demuxer_for(&head("clip.mp4")), Some("mov"));
            assert_eq!(demuxer_for(&head("clip.mov")), Some("mov"));
            assert_eq!(demuxer_for(&head("clip.mkv")), Some("matroska"));
            assert_eq!(demuxer_for(&head("clip.webm")), Some("matroska"));
            assert_eq!(demuxer_for(&head("clip.avi")), Some("avi"));
            assert_eq!(demuxer_for(&head("clip.gif")), Some("gif"));
            assert_eq!(demuxer_for(b"#EXTM3U\n"), None);
            assert_eq!(demuxer_for(b"ffconcat version 1.0"), None);
            assert_eq!(demuxer_for(b""), None);
        }
    }

    /// A deadline in the past or a set cancel flag stops the read with a bad input naming
    /// it; a token budget below the video's planned tokens refuses it before decoding.
    #[cfg(feature = "video")]
    #[test]
    fn interrupts_and_token_budget() {
        let part = || {
            let mut p = VideoPart::new(dir().join("clip.mp4").to_string_lossy().to_string());
            p.nframes = Some(4);
            p
        };
        let past = FetchOptions {
            interrupt: Interrupt::within(std::time::Duration::ZERO, None),
            ..FetchOptions::default()
        };
        let (what, allowed) = bad(preprocess_video(&part(), &cfg(), &past, None));
        assert!(what.contains("took longer"), "{what}");
        assert!(allowed.contains("0 s"), "{allowed}");
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let cancelled = FetchOptions {
            interrupt: Interrupt {
                cancel: Some(flag),
                ..Interrupt::default()
            },
            ..FetchOptions::default()
        };
        let (what, _) = bad(preprocess_video(&part(), &cfg(), &cancelled, None));
        assert!(what.contains("cancelled"), "{what}");

        let full = preprocess_video(&part(), &cfg(), &FetchOptions::default(), None).unwrap();
        let [t, h, w] = full.grid_thw;
        let tokens = t * h * w / 4;
        let planned = planned_video_tokens(&part(), &cfg(), 120, 160, 4).unwrap();
        assert_eq!(planned, tokens, "header-based count equals the real one");
        let tight = FetchOptions {
            token_budget: Some(tokens - 1),
            ..FetchOptions::default()
        };
        let (what, allowed) = bad(preprocess_video(&part(), &cfg(), &tight, None));
        assert!(what.contains(&format!("{tokens} vision tokens")), "{what}");
        assert!(
            allowed.contains(&format!("at most {}", tokens - 1)),
            "{allowed}"
        );
        let exact = FetchOptions {
            token_budget: Some(tokens),
            ..FetchOptions::default()
        };
        assert_eq!(
            preprocess_video(&part(), &cfg(), &exact, None).unwrap(),
            full
        );
        // video_start after video_end names both.
        let mut p = part();
        p.video_start = Some(2.0);
        p.video_end = Some(1.0);
        let (what, _) = bad(preprocess_video(&p, &cfg(), &FetchOptions::default(), None));
        assert!(
            what.contains("video_start (2 s) is after video_end (1 s)"),
            "{what}"
        );
    }

    #[test]
    fn bad_inputs() {
        let cfg = cfg();
        let tmp = std::env::temp_dir().join(format!("qwen2vl-video-test-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let garbage = tmp.join("garbage.mp4");
        std::fs::write(
            &garbage,
            b"this is not a video at all, just some bytes".repeat(50),
        )
        .unwrap();
        let empty = tmp.join("empty.mp4");
        std::fs::write(&empty, b"").unwrap();
        // A truncated clip: the first 600 bytes of the fixture.
        let clip = std::fs::read(dir().join("clip.mp4")).unwrap();
        let truncated = tmp.join("truncated.mp4");
        std::fs::write(&truncated, &clip[..600]).unwrap();
        let png = dir().join("frames/f0.png");
        let video = |p: &Path| VideoPart::new(p.to_string_lossy().to_string());
        for (what, part) in [
            ("missing", video(&tmp.join("nope.mp4"))),
            ("garbage", video(&garbage)),
            ("empty", video(&empty)),
            ("truncated", video(&truncated)),
            ("directory", video(&tmp)),
            ("http", VideoPart::new("https://example.com/v.mp4")),
            ("empty list", VideoPart::new(Vec::<String>::new())),
            (
                "missing frame",
                VideoPart::new(vec![
                    png.to_string_lossy().to_string(),
                    "/no/such.png".to_string(),
                ]),
            ),
        ] {
            let (w, a) = bad(preprocess_video(
                &part,
                &cfg,
                &FetchOptions::default(),
                None,
            ));
            assert!(!w.is_empty() && !a.is_empty(), "{what}");
            eprintln!("{what}: {w}; allowed: {a}");
        }
        if cfg!(feature = "video") {
            let clip = dir().join("clip.mp4");
            let with = |f: &dyn Fn(&mut VideoPart)| {
                let mut p = video(&clip);
                f(&mut p);
                p
            };
            for (what, part) in [
                ("nframes 0", with(&|p| p.nframes = Some(0))),
                ("nframes 1", with(&|p| p.nframes = Some(1))),
                ("nframes 100", with(&|p| p.nframes = Some(100))),
                (
                    "fps and nframes",
                    with(&|p| {
                        p.nframes = Some(4);
                        p.fps = Some(2.0)
                    }),
                ),
                ("fps nan", with(&|p| p.fps = Some(f64::NAN))),
                ("fps 0", with(&|p| p.fps = Some(0.0))),
                (
                    "start after end",
                    with(&|p| {
                        p.video_start = Some(10.0);
                        p.video_end = Some(11.0)
                    }),
                ),
                ("negative start", with(&|p| p.video_start = Some(-1.0))),
                ("max_pixels 0", with(&|p| p.max_pixels = Some(0))),
            ] {
                let (w, a) = bad(preprocess_video(
                    &part,
                    &cfg,
                    &FetchOptions::default(),
                    None,
                ));
                eprintln!("{what}: {w}; allowed: {a}");
            }
            // A PNG is not a video (one frame: fewer than the 4 the default fps needs).
            bad(preprocess_video(
                &video(&png),
                &cfg,
                &FetchOptions::default(),
                None,
            ));
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }
}

//! The media policy of a request's images and videos, checked before any of them is read:
//! their count, their pixel and frame keys against the server's limits (and the limits'
//! defaults filled in), and where each may come from ([`MediaPolicy`]: data URIs always,
//! http(s) URLs when allowed, local files only inside the allowed directory, made canonical
//! so that what was checked is what is read).

use std::path::{Path, PathBuf};

use qwen2vl::processing::image::MAX_PIXELS;
use qwen2vl::processing::messages::{
    Content, ContentPart, ImagePart, ImageSource, Location, VideoPart, VideoSource,
};
use qwen2vl::processing::video::VIDEO_MAX_PIXELS;

use crate::error::ApiError;
use crate::Limits;

/// Where media may come from.
#[derive(Debug, Clone, Default)]
pub struct MediaPolicy {
    /// Fetch http(s) URLs (public hosts only).
    pub allow_remote: bool,
    /// Local files are read only inside this (canonical) directory; `None` refuses them.
    pub allowed_dir: Option<PathBuf>,
}

/// The request field of each image and video seen so far (`messages[i].content[j]`), in
/// conversation order: their count is checked against the limits, and a library error about
/// the k-th image names its field.
#[derive(Debug, Default)]
pub(super) struct MediaParams {
    pub images: Vec<String>,
    pub videos: Vec<String>,
}

/// Counts, sizes and sources of message `i`'s images and videos, against the limits and the
/// media policy; local paths are replaced by their canonical form (what was checked is what
/// is read).
pub(super) fn check_media(
    content: &mut Content,
    i: usize,
    params: &mut MediaParams,
    limits: &Limits,
    policy: &MediaPolicy,
) -> Result<(), ApiError> {
    let Content::Parts(parts) = content else {
        return Ok(());
    };
    for (j, part) in parts.iter_mut().enumerate() {
        let param = format!("messages[{i}].content[{j}]");
        match part {
            ContentPart::Text { .. } => {}
            ContentPart::Image(img) => {
                count(
                    &mut params.images,
                    param.clone(),
                    limits.max_images,
                    "images",
                )?;
                check_image(img, &param, limits, policy)?;
            }
            ContentPart::Video(v) => {
                count(
                    &mut params.videos,
                    param.clone(),
                    limits.max_videos,
                    "videos",
                )?;
                check_video(v, &param, limits, policy)?;
            }
        }
    }
    Ok(())
}

/// Records one more image or video (`what`) at `param`; refuses it past `max` per request.
fn count(seen: &mut Vec<String>, param: String, max: usize, what: &str) -> Result<(), ApiError> {
    seen.push(param.clone());
    if seen.len() > max {
        return Err(ApiError::invalid(
            param,
            format!("too many {what}; allowed: at most {max} per request"),
        ));
    }
    Ok(())
}

/// One image: its pixel keys within the cap (the cap is its `max_pixels` when it gives none),
/// its source within the policy.
fn check_image(
    img: &mut ImagePart,
    param: &str,
    limits: &Limits,
    policy: &MediaPolicy,
) -> Result<(), ApiError> {
    let resized = img.resized_height.zip(img.resized_width);
    check_pixels(param, [img.min_pixels, img.max_pixels], resized, limits)?;
    if img.max_pixels.is_none() {
        img.max_pixels = limits.max_image_pixels;
    }
    if let ImageSource::Uri(s) = &mut img.source {
        *s = check_source(s, param, policy)?;
    }
    Ok(())
}

/// One video: its pixel keys within the cap, its frame keys and frame list within the frame
/// limit (which is its `max_frames` when it gives none), its sources within the policy.
fn check_video(
    v: &mut VideoPart,
    param: &str,
    limits: &Limits,
    policy: &MediaPolicy,
) -> Result<(), ApiError> {
    let resized = v.resized_height.zip(v.resized_width);
    check_pixels(param, [v.min_pixels, v.max_pixels], resized, limits)?;
    // A video item without max_pixels keeps the reference's default, which is not the image
    // one: frames of a video file get qwen-vl-utils' per-frame video budget (at most
    // VIDEO_MAX_PIXELS, less for many frames, see `video_frame_size`), a list of frames the
    // image default MAX_PIXELS. The server's cap only lowers that default when it is below it.
    if v.max_pixels.is_none() {
        let default = match &v.source {
            VideoSource::Uri(_) => VIDEO_MAX_PIXELS,
            VideoSource::Frames(_) => MAX_PIXELS,
        };
        v.max_pixels = limits.max_image_pixels.filter(|&cap| cap < default);
    }
    let max_f = limits.max_video_frames;
    for (key, val) in [
        ("nframes", v.nframes),
        ("max_frames", v.max_frames),
        ("min_frames", v.min_frames),
    ] {
        if val.is_some_and(|x| x > max_f) {
            return Err(ApiError::invalid(
                format!("{param}.{key}"),
                format!(
                    "{key} is over the server's limit; allowed: at most {max_f} frames per video"
                ),
            ));
        }
    }
    if v.max_frames.is_none() {
        v.max_frames = Some(max_f);
    }
    match &mut v.source {
        VideoSource::Uri(s) => *s = check_source(s, param, policy)?,
        VideoSource::Frames(frames) => {
            if frames.len() > max_f {
                return Err(ApiError::invalid(
                    param,
                    format!(
                        "the video has {} frames; allowed: at most {max_f} frames per video",
                        frames.len()
                    ),
                ));
            }
            for f in frames.iter_mut() {
                *f = check_source(f, param, policy)?;
            }
        }
    }
    Ok(())
}

/// `[min_pixels, max_pixels]` and `resized_height` x `resized_width` (both given) of one
/// image or video against the server's cap on pixels per image or frame.
fn check_pixels(
    param: &str,
    [min, max]: [Option<u64>; 2],
    resized: Option<(usize, usize)>,
    limits: &Limits,
) -> Result<(), ApiError> {
    let Some(limit) = limits.max_image_pixels else {
        return Ok(());
    };
    let over = |key: &str, v: u64| {
        ApiError::invalid(
            format!("{param}.{key}"),
            format!("{key} {v} is over the server's limit; allowed: at most {limit} pixels per image or frame"),
        )
    };
    if let Some(v) = min.filter(|&v| v > limit) {
        return Err(over("min_pixels", v));
    }
    if let Some(v) = max.filter(|&v| v > limit) {
        return Err(over("max_pixels", v));
    }
    if let Some((h, w)) = resized {
        let px = (h as u64).saturating_mul(w as u64);
        if px > limit {
            return Err(over("resized_height", px));
        }
    }
    Ok(())
}

/// Checks one media source against the policy; returns the string to hand the library
/// (a local path made canonical).
fn check_source(s: &str, param: &str, policy: &MediaPolicy) -> Result<String, ApiError> {
    match Location::parse(s) {
        Location::Data { .. } => Ok(s.to_string()),
        Location::Http(_) => {
            if policy.allow_remote {
                Ok(s.to_string())
            } else {
                Err(ApiError::invalid(
                    param,
                    "remote media URLs are disabled on this server; allowed: data: URIs \
                     (and http(s) URLs when the server runs with --allow-remote-media)",
                ))
            }
        }
        Location::Path(p) => check_path(p, param, policy),
    }
}

/// A local file: only an existing file inside the allowed directory, returned canonical.
fn check_path(p: &str, param: &str, policy: &MediaPolicy) -> Result<String, ApiError> {
    let Some(dir) = &policy.allowed_dir else {
        return Err(ApiError::invalid(
            param,
            "local files are not served; allowed: data: URIs (and file paths under \
             the server's --allowed-media-dir)",
        ));
    };
    let path = Path::new(p);
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    };
    // One answer whether the file is missing, unreadable or outside the directory, and
    // the directory itself is not named: a client learns nothing about other files.
    let refused = || {
        ApiError::invalid(
            param,
            format!(
                "media file {p:?} cannot be served; allowed: existing files under the \
                 server's --allowed-media-dir (paths relative to it)"
            ),
        )
    };
    let canon = joined.canonicalize().map_err(|_| refused())?;
    if !canon.starts_with(dir) || !canon.is_file() {
        return Err(refused());
    }
    canon
        .into_os_string()
        .into_string()
        .map_err(|_| ApiError::invalid(param, "media file path is not valid UTF-8"))
}

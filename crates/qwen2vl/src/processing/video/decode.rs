//! FFmpeg side: demux for timestamps, then decode keeping only the sampled frames.
//!
//! FFmpeg is opened with a demuxer chosen from the container's magic bytes (mov/mp4,
//! matroska/webm, avi, gif) instead of its content probe, reads only through our AVIO
//! reader (no protocol, no file of its own), and any nested open (HLS segments, concat
//! entries, QuickTime data references) is refused by an `io_open` callback. So a
//! playlist (`#EXTM3U`), a concat script (`ffconcat version 1.0`) or any other container
//! that names other files is a bad input, never a way to read a local file. Every loop
//! over the demuxer's output is bounded: read errors are counted and capped, and the
//! job's [`Interrupt`] (deadline, cancel flag) is checked on every packet and every read.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::os::raw::{c_char, c_int};
use std::sync::Once;

use ffmpeg_next as ff;
use image::RgbImage;

use super::{
    check_token_budget, frame_indices, planned_video_tokens, smart_nframes, video_frame_size,
    ReadVideo, VideoInput, VIDEO_KINDS,
};
use crate::config::PreprocessorConfig;
use crate::ops::resize_torch::resize_bicubic_aa;
use crate::processing::fetch::{FetchOptions, Interrupt};
use crate::processing::messages::VideoPart;
use crate::{Error, Result};

/// Largest decoded frame accepted (pixels).
const MAX_DECODED_PIXELS: u64 = 16384 * 16384;
/// Read errors tolerated in one pass before the file is refused as corrupt (a demuxer
/// that resyncs past bad data makes progress; one that fails forever must not spin).
const MAX_READ_ERRORS: usize = 64;
/// The demuxers we open, by FFmpeg short name; none of them opens other files.
const DEMUXERS: &str = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,gif";

fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = ff::init();
        ff::util::log::set_level(ff::util::log::Level::Fatal);
    });
}

fn not_video(name: &str, why: impl std::fmt::Display) -> Error {
    Error::bad_input(
        format!("{name} is not a readable video ({why})"),
        VIDEO_KINDS,
    )
}

/// The FFmpeg demuxer for a container, from its first bytes; `None` for anything else
/// (playlists, concat scripts, raw streams, images, text).
pub(crate) fn demuxer_for(head: &[u8]) -> Option<&'static str> {
    const MOV_BOXES: [&[u8; 4]; 8] = [
        b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid",
    ];
    if head.len() >= 8 && MOV_BOXES.iter().any(|b| &head[4..8] == *b) {
        Some("mov")
    } else if head.starts_with(&[0x1a, 0x45, 0xdf, 0xa3]) {
        Some("matroska")
    } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"AVI " {
        Some("avi")
    } else if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
        Some("gif")
    } else {
        None
    }
}

/// FFmpeg's `io_open` for our contexts: every nested open is refused.
unsafe extern "C" fn refuse_io_open(
    _s: *mut ff::ffi::AVFormatContext,
    _pb: *mut *mut ff::ffi::AVIOContext,
    _url: *const c_char,
    _flags: c_int,
    _options: *mut *mut ff::ffi::AVDictionary,
) -> c_int {
    // AVERROR(EPERM); EPERM is 1 on every platform FFmpeg runs on.
    -1
}

/// Opens `input` with the demuxer its magic bytes name, reading through our reader only.
fn open(input: &VideoInput, interrupt: &Interrupt) -> Result<(ff::format::context::Input, usize)> {
    let name = input.name.as_str();
    let head = input.head()?;
    let Some(demuxer) = demuxer_for(&head) else {
        return Err(Error::bad_input(
            format!(
                "{name} is not a video container this server opens (playlists such as HLS \
                 .m3u8, ffconcat scripts and other formats are refused)"
            ),
            "an mp4/mov, webm/mkv, avi or gif file",
        ));
    };
    let mut io = ff::format::context::StreamIo::from_read_seek(input.reader(interrupt)?)
        .map_err(|e| not_video(name, e))?;
    let demuxer_c = CString::new(demuxer).expect("no NUL in a demuxer name");
    let mut options = ff::Dictionary::new();
    // Belt and braces: nested contexts inherit these (none should ever exist).
    options.set("format_whitelist", DEMUXERS);
    options.set("protocol_whitelist", "none");
    // SAFETY: the context is allocated here and either freed by a failing
    // `avformat_open_input`, closed below, or owned by the returned `Input` together with
    // the AVIO context it reads through (`wrap_with_custom_io`), which outlives it.
    unsafe {
        let fmt = ff::ffi::av_find_input_format(demuxer_c.as_ptr());
        if fmt.is_null() {
            return Err(not_video(
                name,
                format!("this FFmpeg has no {demuxer} demuxer"),
            ));
        }
        let mut ps = ff::ffi::avformat_alloc_context();
        if ps.is_null() {
            return Err(Error::Io(std::io::Error::other(
                "FFmpeg could not allocate a format context",
            )));
        }
        (*ps).pb = io.as_mut_ptr();
        (*ps).flags |= ff::ffi::AVFMT_FLAG_CUSTOM_IO as c_int;
        (*ps).io_open = Some(refuse_io_open);
        let mut opts = options.disown();
        let res = ff::ffi::avformat_open_input(&mut ps, std::ptr::null(), fmt, &mut opts);
        drop(ff::Dictionary::own(opts));
        if res < 0 {
            // `ps` was freed by FFmpeg; `io` is freed when dropped.
            interrupt.check(&format!("opening {name}"))?;
            return Err(not_video(name, ff::Error::from(res)));
        }
        let info = ff::ffi::avformat_find_stream_info(ps, std::ptr::null_mut());
        let ctx = ff::format::context::Input::wrap_with_custom_io(ps, io);
        if info < 0 {
            drop(ctx);
            interrupt.check(&format!("reading {name}"))?;
            return Err(not_video(name, ff::Error::from(info)));
        }
        let idx = ctx
            .streams()
            .find(|s| s.parameters().medium() == ff::media::Type::Video)
            .map(|s| s.index())
            .ok_or_else(|| Error::bad_input(format!("{name} has no video stream"), VIDEO_KINDS))?;
        Ok((ctx, idx))
    }
}

/// The next packet of stream `si`, `None` at the end. Read errors are skipped (a demuxer
/// may resync past bad data, as PyAV's loop does) but counted: past
/// [`MAX_READ_ERRORS`] the file is refused. The interrupt is checked on every call.
fn next_packet(
    ctx: &mut ff::format::context::Input,
    si: usize,
    errors: &mut usize,
    interrupt: &Interrupt,
    name: &str,
) -> Result<Option<ff::Packet>> {
    loop {
        interrupt.check(&format!("reading {name}"))?;
        let mut packet = ff::Packet::empty();
        match packet.read(ctx) {
            Ok(()) if packet.stream() == si => return Ok(Some(packet)),
            Ok(()) => continue,
            Err(ff::Error::Eof) => return Ok(None),
            Err(e) => {
                *errors += 1;
                if *errors > MAX_READ_ERRORS {
                    interrupt.check(&format!("reading {name}"))?;
                    return Err(not_video(
                        name,
                        format!("more than {MAX_READ_ERRORS} read errors, the last: {e}"),
                    ));
                }
            }
        }
    }
}

fn check_times(part: &VideoPart) -> Result<()> {
    for (key, v) in [
        ("video_start", part.video_start),
        ("video_end", part.video_end),
    ] {
        if let Some(v) = v {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::bad_input(
                    format!("{key} is {v}"),
                    "a time in seconds that is a finite number of at least 0",
                ));
            }
        }
    }
    if let (Some(s), Some(e)) = (part.video_start, part.video_end) {
        if s > e {
            return Err(Error::bad_input(
                format!("video_start ({s} s) is after video_end ({e} s)"),
                "video_start at or before video_end",
            ));
        }
    }
    Ok(())
}

/// Pass 1 (packets only, nothing decoded): the timestamps of the clip's frames, the
/// stream's average frame rate and its coded size.
struct Clip {
    pts: Vec<i64>,
    video_fps: f64,
    coded_hw: (usize, usize),
}

fn scan(input: &VideoInput, part: &VideoPart, interrupt: &Interrupt) -> Result<Clip> {
    let name = input.name.as_str();
    let (mut ctx, si) = open(input, interrupt)?;
    let stream = ctx.stream(si).expect("stream index from this input");
    let tb = stream.time_base();
    let rate = stream.avg_frame_rate();
    let params = stream.parameters();
    let codec_id = params.id();
    // SAFETY: `params` points at the stream's live codec parameters.
    let coded_hw = unsafe {
        let p = params.as_ptr();
        ((*p).height.max(0) as usize, (*p).width.max(0) as usize)
    };
    if ff::codec::decoder::find(codec_id).is_none() {
        return Err(Error::bad_input(
            format!("{name} uses the video codec {codec_id:?}, which this FFmpeg cannot decode"),
            "a video in a codec FFmpeg decodes (H.264, HEVC, VP8, VP9, AV1, MPEG-4, …)",
        ));
    }
    // read_video: start_offset = floor(start * (1 / time_base)), end = ceil(...) or inf.
    let inv_tb = if tb.numerator() != 0 {
        tb.denominator() as f64 / tb.numerator() as f64
    } else {
        1.0
    };
    let start_off = (part.video_start.unwrap_or(0.0) * inv_tb).floor() as i64;
    let end_off = part
        .video_end
        .map(|e| (e * inv_tb).ceil() as i64)
        .unwrap_or(i64::MAX);
    let mut all_pts = BTreeSet::new();
    let mut errors = 0;
    while let Some(packet) = next_packet(&mut ctx, si, &mut errors, interrupt, name)? {
        if let Some(p) = packet.pts().or(packet.dts()) {
            all_pts.insert(p);
        }
    }
    drop(ctx);
    let mut pts: Vec<i64> = all_pts
        .range(start_off..=end_off.max(start_off))
        .copied()
        .filter(|p| *p <= end_off)
        .collect();
    if start_off > 0 && !all_pts.contains(&start_off) {
        if let Some(prev) = all_pts.range(..start_off).next_back() {
            pts.insert(0, *prev);
        }
    }
    if pts.is_empty() {
        return Err(Error::bad_input(
            format!(
                "{name} has no video frames{}",
                if part.video_start.is_some() || part.video_end.is_some() {
                    " between video_start and video_end"
                } else {
                    ""
                }
            ),
            "a video with at least one decodable frame in the requested range",
        ));
    }
    let video_fps = if rate.denominator() != 0 && rate.numerator() > 0 {
        rate.numerator() as f64 / rate.denominator() as f64
    } else {
        0.0
    };
    Ok(Clip {
        pts,
        video_fps,
        coded_hw,
    })
}

/// Decodes the sampled frames of `input`: resized to `fetch_video`'s size and checked
/// against [`FetchOptions::token_budget`] before any frame is decoded when `cfg` is
/// given, as decoded otherwise.
pub(super) fn read(
    input: &VideoInput,
    part: &VideoPart,
    cfg: Option<&PreprocessorConfig>,
    fetch: &FetchOptions,
) -> Result<ReadVideo> {
    init();
    check_times(part)?;
    let interrupt = &fetch.interrupt;
    let name = input.name.as_str();
    let clip = scan(input, part, interrupt)?;
    let total = clip.pts.len();
    let n = smart_nframes(part, total, clip.video_fps)?;
    let indices = frame_indices(total, n);
    // The token count from the headers' frame size, before anything is decoded.
    if let Some(cfg) = cfg {
        let (h, w) = clip.coded_hw;
        if h > 0 && w > 0 {
            let tokens = planned_video_tokens(part, cfg, h, w, n)?;
            check_token_budget(tokens, fetch, name)?;
        }
    }
    // pts → the output slots that want it.
    let mut want: HashMap<i64, Vec<usize>> = HashMap::new();
    for (slot, &i) in indices.iter().enumerate() {
        want.entry(clip.pts[i]).or_default().push(slot);
    }
    let frames = decode_wanted(input, part, cfg, fetch, &want, n)?;
    let sample_fps = n as f64 / (total as f64).max(1e-6) * clip.video_fps;
    Ok(ReadVideo {
        frames,
        indices,
        sample_fps,
    })
}

/// Pass 2: decodes front to back and keeps the frames whose pts `want` names (resized at
/// once when `cfg` is given); stops after the last one.
fn decode_wanted(
    input: &VideoInput,
    part: &VideoPart,
    cfg: Option<&PreprocessorConfig>,
    fetch: &FetchOptions,
    want: &HashMap<i64, Vec<usize>>,
    n: usize,
) -> Result<Vec<RgbImage>> {
    let interrupt = &fetch.interrupt;
    let name = input.name.as_str();
    let (mut ctx, si) = open(input, interrupt)?;
    let stream = ctx.stream(si).expect("stream index from this input");
    let codec = ff::codec::context::Context::from_parameters(stream.parameters())
        .map_err(|e| not_video(name, e))?;
    let mut decoder = codec.decoder().video().map_err(|e| {
        Error::bad_input(
            format!("{name}: the video decoder cannot be opened ({e})"),
            VIDEO_KINDS,
        )
    })?;
    let mut sink = FrameSink {
        name,
        part,
        cfg,
        fetch,
        want,
        n,
        out: vec![None; n],
        remaining: n,
        target: None,
        scaler: None,
        rgb: ff::frame::Video::empty(),
    };
    let mut decoded = ff::frame::Video::empty();
    let mut errors = 0;
    while let Some(packet) = next_packet(&mut ctx, si, &mut errors, interrupt, name)? {
        // A corrupt packet is skipped, as PyAV's decode loop does until it fails.
        if decoder.send_packet(&packet).is_err() {
            errors += 1;
            if errors > MAX_READ_ERRORS {
                return Err(not_video(
                    name,
                    format!("more than {MAX_READ_ERRORS} undecodable packets"),
                ));
            }
            continue;
        }
        while decoder.receive_frame(&mut decoded).is_ok() {
            sink.take(&decoded)?;
        }
        // Nothing after the last sampled frame is decoded.
        if sink.remaining == 0 {
            break;
        }
    }
    if sink.remaining > 0 {
        let _ = decoder.send_eof();
        while decoder.receive_frame(&mut decoded).is_ok() {
            interrupt.check(&format!("decoding {name}"))?;
            sink.take(&decoded)?;
        }
    }
    if sink.remaining > 0 {
        let got = n - sink.remaining;
        return Err(Error::bad_input(
            format!(
                "{name}: only {got} of the {n} sampled frames could be decoded (the file is \
                 corrupt, truncated or not decodable)"
            ),
            "a complete, decodable video file",
        ));
    }
    Ok(sink.out.into_iter().flatten().collect())
}

/// Where pass 2's decoded frames go: converted to RGB, resized, put in their slots.
struct FrameSink<'a> {
    name: &'a str,
    part: &'a VideoPart,
    cfg: Option<&'a PreprocessorConfig>,
    fetch: &'a FetchOptions,
    want: &'a HashMap<i64, Vec<usize>>,
    n: usize,
    out: Vec<Option<RgbImage>>,
    remaining: usize,
    target: Option<(usize, usize)>,
    scaler: Option<(ff::software::scaling::Context, ff::format::Pixel, u32, u32)>,
    rgb: ff::frame::Video,
}

impl FrameSink<'_> {
    fn take(&mut self, decoded: &ff::frame::Video) -> Result<()> {
        let name = self.name;
        let Some(pts) = decoded.pts().or(decoded.timestamp()) else {
            return Ok(());
        };
        let Some(slots) = self.want.get(&pts) else {
            return Ok(());
        };
        if slots.iter().all(|&s| self.out[s].is_some()) {
            return Ok(());
        }
        let (w, h, fmt) = (decoded.width(), decoded.height(), decoded.format());
        if w == 0 || h == 0 || w as u64 * h as u64 > MAX_DECODED_PIXELS {
            return Err(Error::bad_input(
                format!("{name} has {w}x{h} frames"),
                format!("video frames of 1 to {MAX_DECODED_PIXELS} pixels"),
            ));
        }
        if !matches!(&self.scaler, Some((_, f, sw, sh)) if *f == fmt && *sw == w && *sh == h) {
            let ctx = ff::software::scaling::Context::get(
                fmt,
                w,
                h,
                ff::format::Pixel::RGB24,
                w,
                h,
                ff::software::scaling::Flags::BILINEAR,
            )
            .map_err(|e| not_video(name, format!("pixel format {fmt:?}: {e}")))?;
            self.scaler = Some((ctx, fmt, w, h));
        }
        let (sws, ..) = self.scaler.as_mut().expect("set above");
        sws.run(decoded, &mut self.rgb)
            .map_err(|e| not_video(name, format!("colour conversion failed: {e}")))?;
        let stride = self.rgb.stride(0);
        let data = self.rgb.data(0);
        let (wu, hu) = (w as usize, h as usize);
        let mut raw = Vec::with_capacity(wu * hu * 3);
        for y in 0..hu {
            raw.extend_from_slice(&data[y * stride..y * stride + wu * 3]);
        }
        let img = RgbImage::from_raw(w, h, raw).expect("w*h*3 bytes");
        let img = if let Some(cfg) = self.cfg {
            let (th, tw) = match self.target {
                Some(t) => t,
                None => {
                    // The decoded size can differ from the header's (cropping, a size
                    // change mid-stream): check the budget again on what is real.
                    let tokens = planned_video_tokens(self.part, cfg, hu, wu, self.n)?;
                    check_token_budget(tokens, self.fetch, name)?;
                    let t = video_frame_size(self.part, hu, wu, self.n, cfg.factor())?;
                    self.target = Some(t);
                    t
                }
            };
            resize_bicubic_aa(&img, tw as u32, th as u32)?
        } else {
            img
        };
        for &s in slots {
            if self.out[s].is_none() {
                self.out[s] = Some(img.clone());
                self.remaining -= 1;
            }
        }
        Ok(())
    }
}

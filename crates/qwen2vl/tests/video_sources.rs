//! Every video form a user can send (path, `file://`, `data:` URI, http(s) from a loopback
//! server, a frame list of any image forms) reaches the preprocessing as the same pixels, and
//! each bad one is a `BadInput` naming the item, what was wrong and what is allowed.
#![cfg(feature = "video")]

mod common;

use common::{bad_input as bad, tiny_processor as processor};

use std::path::PathBuf;

use base64::Engine as _;
use qwen2vl::processing::fetch::FetchOptions;
use qwen2vl::processing::messages::{ContentPart, Message, Role, VideoPart, VideoSource};
use qwen2vl::processing::processor::ProcessOptions;

fn clip(name: &str) -> PathBuf {
    common::fixtures().join("video").join(name)
}

/// One user turn with one video (4 frames, so the test stays fast) and a question.
fn one_video(source: impl Into<VideoSource>) -> Vec<Message> {
    let part = VideoPart {
        nframes: Some(4),
        ..VideoPart::new(source)
    };
    vec![Message::parts(
        Role::User,
        vec![ContentPart::Video(part), ContentPart::text("What happens?")],
    )]
}

fn remote() -> ProcessOptions {
    ProcessOptions {
        fetch: FetchOptions::remote(),
        ..Default::default()
    }
}

/// A loopback HTTP/1.1 server ([`common::serve_http`]): `/clip.mp4` (any query) → `body`,
/// anything else → 404. Serves `n` connections.
fn serve(body: Vec<u8>, n: usize) -> String {
    common::serve_http(n, move |path| {
        let ok = path.split('?').next() == Some("/clip.mp4");
        let payload = if ok { body.clone() } else { vec![] };
        let status = if ok { "200 OK" } else { "404 Not Found" };
        (
            status,
            format!("Content-Length: {}\r\n", payload.len()),
            payload,
        )
    })
}

/// Our temporary video files still on disk.
fn leftover_temp_files() -> Vec<PathBuf> {
    let prefix = format!("qwen2vl-video-{}-", std::process::id());
    std::fs::read_dir(std::env::temp_dir())
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_video_form_gives_the_same_inputs() {
    let p = processor();
    let path = clip("clip.mp4");
    let bytes = std::fs::read(&path).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let url = serve(bytes, 2);
    let want = p
        .process(
            &one_video(path.display().to_string()),
            &ProcessOptions::default(),
        )
        .expect("path");
    assert_eq!(want.videos.len(), 1);
    assert!(!want.pixel_values_videos.is_empty());
    let forms = [
        format!("file://{}", path.display()),
        format!("data:video/mp4;base64,{b64}"),
        // No media type: FFmpeg probes the content.
        format!("data:;base64,{b64}"),
        format!("{url}/clip.mp4"),
        format!("{url}/clip.mp4?token=abc"),
    ];
    for form in forms {
        let shown: String = form.chars().take(40).collect();
        let got = p
            .process(&one_video(form.clone()), &remote())
            .expect(&shown);
        assert_eq!(got.input_ids, want.input_ids, "{shown}");
        assert_eq!(got.video_grid_thw, want.video_grid_thw, "{shown}");
        assert_eq!(got.videos, want.videos, "{shown}");
        assert!(
            got.pixel_values_videos == want.pixel_values_videos,
            "{shown}: pixels differ"
        );
    }
    assert!(
        leftover_temp_files().is_empty(),
        "temporary files left behind: {:?}",
        leftover_temp_files()
    );
}

#[test]
fn frame_lists_take_every_image_form() {
    let p = processor();
    let dir = clip("frames");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let as_paths: Vec<String> = names.iter().map(|p| p.display().to_string()).collect();
    let mixed: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, p)| match i % 3 {
            0 => p.display().to_string(),
            1 => format!("file://{}", p.display()),
            _ => format!(
                "data:image/png;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap())
            ),
        })
        .collect();
    let msgs = |frames: Vec<String>| {
        vec![Message::parts(
            Role::User,
            vec![ContentPart::video(frames), ContentPart::text("And?")],
        )]
    };
    let want = p
        .process(&msgs(as_paths), &ProcessOptions::default())
        .unwrap();
    let got = p.process(&msgs(mixed), &ProcessOptions::default()).unwrap();
    assert_eq!(got.video_grid_thw, want.video_grid_thw);
    assert!(got.pixel_values_videos == want.pixel_values_videos);
}

#[test]
fn remote_and_inline_video_errors_name_the_item() {
    let p = processor();
    // Remote fetching off (the library default).
    let (what, allowed) = bad(p.process(
        &one_video("http://127.0.0.1:9/clip.mp4"),
        &ProcessOptions::default(),
    ));
    assert!(
        what.starts_with("video 1 (message 1): video URL http://127.0.0.1:9/clip.mp4"),
        "{what}"
    );
    assert!(what.contains("disabled"), "{what}");
    assert!(allowed.contains("allow_remote"), "{allowed}");

    // 404.
    let url = serve(Vec::new(), 1);
    let (what, _) = bad(p.process(&one_video(format!("{url}/nope.mp4")), &remote()));
    assert!(what.contains("answered HTTP 404"), "{what}");

    // A video over the size cap.
    let body = std::fs::read(clip("clip.mp4")).unwrap();
    let len = body.len();
    let url = serve(body, 1);
    let small = ProcessOptions {
        fetch: FetchOptions {
            max_video_bytes: 1000,
            ..FetchOptions::remote()
        },
        ..Default::default()
    };
    let (what, allowed) = bad(p.process(&one_video(format!("{url}/clip.mp4")), &small));
    assert!(what.contains(&format!("{len} bytes")), "{what}");
    assert!(allowed.contains("at most 1000 bytes"), "{allowed}");

    // Bad base64, an empty payload, bytes that are no video: the error names the data URI
    // (never the temporary file it was spooled to).
    let (what, _) = bad(p.process(
        &one_video("data:video/mp4;base64,not*base64"),
        &ProcessOptions::default(),
    ));
    assert!(what.starts_with("video 1 (message 1): "), "{what}");
    assert!(what.contains("base64"), "{what}");
    let (what, _) = bad(p.process(
        &one_video("data:video/mp4;base64,"),
        &ProcessOptions::default(),
    ));
    assert!(what.contains("empty payload"), "{what}");
    let junk = base64::engine::general_purpose::STANDARD.encode(b"this is not a video at all");
    let (what, allowed) = bad(p.process(
        &one_video(format!("data:video/mp4;base64,{junk}")),
        &ProcessOptions::default(),
    ));
    assert!(what.contains("video data: URI (26 bytes)"), "{what}");
    assert!(!what.contains("qwen2vl-video-"), "temp path leaked: {what}");
    assert!(allowed.contains("mp4"), "{allowed}");
    let (what, _) = bad(p.process(&one_video(""), &ProcessOptions::default()));
    assert!(what.contains("empty string"), "{what}");
    assert!(leftover_temp_files().is_empty());
}

/// An AVI whose stream claims a codec (fourcc `QQQ9`) no FFmpeg has: the container opens, the
/// decoder does not exist.
#[test]
fn unsupported_codec_is_named() {
    let mut bytes = std::fs::read(clip("clip.avi")).unwrap();
    let mut patched = 0;
    for i in 0..bytes.len().saturating_sub(4) {
        if &bytes[i..i + 4] == b"FMP4" {
            bytes[i..i + 4].copy_from_slice(b"QQQ9");
            patched += 1;
        }
    }
    assert_eq!(patched, 2, "fixture layout changed: FMP4 in strh and strf");
    let path = std::env::temp_dir().join(format!("qwen2vl-codec-{}.avi", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    let p = processor();
    let r = p.process(
        &one_video(path.display().to_string()),
        &ProcessOptions::default(),
    );
    let _ = std::fs::remove_file(&path);
    let (what, allowed) = bad(r);
    assert!(what.starts_with("video 1 (message 1): "), "{what}");
    assert!(what.contains("codec"), "{what}");
    assert!(allowed.contains("H.264"), "{allowed}");
}

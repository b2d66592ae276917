//! Every image form a user can send (path, `file://`, `data:` URI, bytes, http(s) from a
//! loopback server) reaches the preprocessing as the same pixels; each bad form is a
//! `BadInput` naming the item, what was wrong and what is allowed.

mod common;

use common::{bad_input as bad, tiny_processor as processor};

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use qwen2vl::processing::fetch::{http_get, FetchOptions};
use qwen2vl::processing::messages::{ContentPart, ImagePart, ImageSource, Message, Role};
use qwen2vl::processing::processor::ProcessOptions;
use qwen2vl::Error;

fn image_path(name: &str) -> PathBuf {
    common::fixtures().join("images").join(name)
}

fn user(parts: Vec<ContentPart>) -> Message {
    Message::parts(Role::User, parts)
}

fn one_image(source: ImageSource) -> Vec<Message> {
    vec![user(vec![
        ContentPart::image(source),
        ContentPart::text("What is this?"),
    ])]
}

/// A loopback HTTP/1.1 server ([`common::serve_http`]): `/img.png` → `body`, `/empty` → 200
/// with no body, `/big` → a Content-Length of 1 GiB, anything else → 404. Serves `n`
/// connections.
fn serve(body: Vec<u8>, n: usize) -> String {
    common::serve_http(n, move |path| match path {
        "/img.png" => (
            "200 OK",
            format!(
                "Content-Type: image/png\r\nContent-Length: {}\r\n",
                body.len()
            ),
            body.clone(),
        ),
        "/empty" => ("200 OK", "Content-Length: 0\r\n".into(), vec![]),
        "/big" => (
            "200 OK",
            format!("Content-Length: {}\r\n", 1u64 << 30),
            vec![],
        ),
        _ => ("404 Not Found", "Content-Length: 0\r\n".into(), vec![]),
    })
}

#[test]
fn every_image_form_gives_the_same_inputs() {
    let p = processor();
    let path = image_path("wide.png");
    let bytes = std::fs::read(&path).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let url = serve(bytes.clone(), 1);
    let abs = path.display().to_string();
    let remote = ProcessOptions {
        fetch: FetchOptions::remote(),
        ..Default::default()
    };
    let base = p
        .process(&one_image(ImageSource::Uri(abs.clone())), &remote)
        .expect("path");
    assert_eq!(base.image_grid_thw, vec![[1, 14, 22]]);
    let forms: Vec<(&str, ImageSource, ProcessOptions)> = vec![
        (
            "file://",
            ImageSource::Uri(format!("file://{abs}")),
            remote.clone(),
        ),
        (
            "relative to base_dir",
            ImageSource::Uri("wide.png".into()),
            ProcessOptions {
                base_dir: Some(image_path("")),
                ..Default::default()
            },
        ),
        (
            "data: base64",
            ImageSource::Uri(format!("data:image/png;base64,{b64}")),
            Default::default(),
        ),
        (
            "data: base64, line-wrapped, percent-escaped",
            ImageSource::Uri(format!(
                "data:image/png;base64,{}",
                b64.as_bytes()
                    .chunks(76)
                    .map(|c| std::str::from_utf8(c).unwrap())
                    .collect::<Vec<_>>()
                    .join("\n")
                    .replace('+', "%2B")
                    .replace('/', "%2F")
                    .replace('=', "%3D")
            )),
            Default::default(),
        ),
        (
            "data: percent-encoded bytes",
            ImageSource::Uri(format!(
                "data:image/png,{}",
                bytes
                    .iter()
                    .map(|b| format!("%{b:02X}"))
                    .collect::<String>()
            )),
            Default::default(),
        ),
        (
            "bytes",
            ImageSource::Bytes(bytes.clone()),
            Default::default(),
        ),
        (
            "http",
            ImageSource::Uri(format!("{url}/img.png")),
            remote.clone(),
        ),
    ];
    for (name, source, opts) in forms {
        let got = p
            .process(&one_image(source), &opts)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.input_ids, base.input_ids, "{name}");
        assert_eq!(got.image_grid_thw, base.image_grid_thw, "{name}");
        assert!(
            got.pixel_values == base.pixel_values,
            "{name}: pixels differ"
        );
    }
}

#[test]
fn remote_urls_are_off_by_default() {
    let p = processor();
    let msgs = one_image(ImageSource::Uri("http://127.0.0.1:9/cat.png".into()));
    let (what, allowed) = bad(p.process(&msgs, &ProcessOptions::default()));
    assert!(
        what.starts_with("image 1 (message 1): image URL http://127.0.0.1:9/cat.png"),
        "{what}"
    );
    assert!(what.contains("disabled"), "{what}");
    assert!(allowed.contains("allow_remote"), "{allowed}");
}

#[test]
fn http_errors_name_the_url() {
    let url = serve(b"\x89PNG but not really".to_vec(), 4);
    let opts = FetchOptions::remote();
    for (path, want) in [
        ("/missing.png", "answered HTTP 404"),
        ("/empty", "empty body"),
        ("/big", "1073741824 bytes"),
    ] {
        let u = format!("{url}{path}");
        match http_get(&u, &opts) {
            Err(Error::BadInput { what, .. }) => {
                assert!(what.contains(&u), "{what}");
                assert!(what.contains(want), "{path}: {what}");
            }
            other => panic!("{path}: {other:?}"),
        }
    }
    // A body over the cap without a Content-Length would be cut while reading; here the
    // served body is 19 bytes and the cap 10.
    let small = FetchOptions {
        max_bytes: 10,
        ..FetchOptions::remote()
    };
    match http_get(&format!("{url}/img.png"), &small) {
        Err(Error::BadInput { what, allowed, .. }) => {
            assert!(what.contains("19 bytes"), "{what}");
            assert!(allowed.contains("at most 10 bytes"), "{allowed}");
        }
        other => panic!("{other:?}"),
    }
    // Nothing listens on a closed port.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/x.png", closed.local_addr().unwrap());
    drop(closed);
    match http_get(&dead, &opts) {
        Err(Error::BadInput { what, .. }) => assert!(what.contains(&dead), "{what}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn url_that_never_answers_times_out() {
    // Bound but never accepted: the kernel completes the handshake, nobody answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/slow.png", silent.local_addr().unwrap());
    let p = processor();
    let opts = ProcessOptions {
        fetch: FetchOptions {
            timeout: Duration::from_millis(800),
            ..FetchOptions::remote()
        },
        ..Default::default()
    };
    let msgs = vec![user(vec![
        ContentPart::image(image_path("small.png").display().to_string()),
        ContentPart::image(url.clone()),
    ])];
    let t = Instant::now();
    let (what, allowed) = bad(p.process(&msgs, &opts));
    let took = t.elapsed();
    assert!(
        what.starts_with(&format!("image 2 (message 1): image URL {url} timed out")),
        "{what}"
    );
    assert!(allowed.contains("0.8 s"), "{allowed}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    drop(silent);
}

/// Bytes of a PNG of the given size (all one colour).
fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 200, 30]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn bad_images_name_the_item() {
    let p = processor();
    let good = std::fs::read(image_path("small.png")).unwrap();
    let dir = std::env::temp_dir().join(format!("qwen2vl-bad-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let truncated = dir.join("truncated.png");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let corrupt = dir.join("corrupt.png");
    let mut c = good.clone();
    for b in &mut c[40..good.len() - 20] {
        *b ^= 0x5a;
    }
    std::fs::write(&corrupt, &c).unwrap();
    let cases: Vec<(&str, ImageSource, &str, &str)> = vec![
        (
            "truncated file",
            ImageSource::Uri(truncated.display().to_string()),
            "corrupt or truncated",
            "truncated.png",
        ),
        (
            "corrupt file",
            ImageSource::Uri(corrupt.display().to_string()),
            "corrupt or truncated",
            "corrupt.png",
        ),
        (
            "missing file",
            ImageSource::Uri("file:///nonexistent/qwen2vl/x.png".into()),
            "does not exist",
            "/nonexistent/qwen2vl/x.png",
        ),
        (
            "not an image",
            ImageSource::Bytes(b"GIF? no, just some text that is no image".to_vec()),
            "not a supported image",
            "image bytes",
        ),
        (
            "bad base64",
            ImageSource::Uri("data:image/png;base64,iVBORw0K$$$$".into()),
            "not valid base64",
            "data: URI",
        ),
        (
            "empty data URI",
            ImageSource::Uri("data:image/png;base64,".into()),
            "empty payload",
            "data: URI",
        ),
        (
            "data URI that is no image",
            ImageSource::Uri("data:image/png;base64,aGVsbG8gd29ybGQ=".into()),
            "not a supported image",
            "data: URI (11 bytes)",
        ),
        (
            "ratio over 200",
            ImageSource::Bytes(png(1093, 5)),
            "aspect ratio 218.6",
            "1093x5",
        ),
        (
            "over the pixel limit",
            ImageSource::Bytes(png(16385, 1)),
            "larger than 16384x16384",
            "16385x1",
        ),
    ];
    for (name, source, want, names) in cases {
        // The bad image is the second of the second user message.
        let msgs = vec![
            user(vec![
                ContentPart::image(ImageSource::Bytes(good.clone())),
                ContentPart::text("one"),
            ]),
            Message::assistant("ok"),
            user(vec![
                ContentPart::image(ImageSource::Bytes(good.clone())),
                ContentPart::image(source),
                ContentPart::text("two"),
            ]),
        ];
        let (what, allowed) = bad(p.process(&msgs, &ProcessOptions::default()));
        println!("{name}: {what} | allowed: {allowed}");
        assert!(what.starts_with("image 3 (message 3): "), "{name}: {what}");
        assert!(what.contains(want), "{name}: {what}");
        assert!(what.contains(names), "{name}: {what}");
        assert!(!allowed.is_empty());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ratio_of_exactly_200_is_accepted() {
    let p = processor();
    let got = p
        .process(
            &one_image(ImageSource::Bytes(png(1000, 5))),
            &ProcessOptions::default(),
        )
        .expect("1000x5");
    // qwen-vl-utils: 28x1008 (min_pixels 3136 is met); the processor keeps it.
    assert_eq!(got.images[0].resized_hw, (28, 1008));
    assert_eq!(got.image_grid_thw, vec![[1, 2, 72]]);
}

#[test]
fn per_item_size_controls() {
    let p = processor();
    let path = image_path("photo640.png").display().to_string();
    let run = |part: ImagePart| {
        p.process(
            &[user(vec![ContentPart::Image(part)])],
            &ProcessOptions::default(),
        )
        .expect("process")
    };
    let with = |f: &dyn Fn(&mut ImagePart)| {
        let mut part = ImagePart::new(path.as_str());
        f(&mut part);
        run(part).images[0].resized_hw
    };
    assert_eq!(with(&|_| {}), (476, 644));
    // resized_height/width are rounded by smart_resize to multiples of 28 (100 -> 112,
    // 150 -> 140) and override min/max_pixels.
    assert_eq!(
        with(&|p| {
            p.resized_height = Some(100);
            p.resized_width = Some(150);
            p.max_pixels = Some(28 * 28 * 4);
        }),
        (112, 140)
    );
    // Only one of the two: ignored, as qwen-vl-utils does.
    assert_eq!(with(&|p| p.resized_height = Some(100)), (476, 644));
    // max_pixels: 640x480 within 100 merged tokens' worth of pixels.
    assert_eq!(with(&|p| p.max_pixels = Some(28 * 28 * 100)), (224, 308));
    // min_pixels: qwen-vl-utils upscales to 868x1176, within the checkpoint's own
    // [3136, 12845056] (Qwen2-VL-2B-Instruct's preprocessor_config.json).
    assert_eq!(with(&|p| p.min_pixels = Some(1000 * 1000)), (868, 1176));
}

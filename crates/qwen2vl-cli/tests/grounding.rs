//! Grounding through the `qwen2vl` binary: the terminal listing, `--json` and `--draw-boxes`
//! with its error handling, on the tiny random fixture model.
//!
//! That model never writes boxes, so the tests with boxes use the debug-build-only hook
//! `QWEN2VL_TEST_GROUNDED_ANSWER` (see `run.rs`), which replaces the answer after generation.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qwen2vl::grounding::{Grounding, ShapeKind};

/// `draw::PALETTE[0]`, the colour of shape 1.
// Only the debug-build tests (the scripted backend) draw shapes.
#[cfg(debug_assertions)]
const SHAPE1: [u8; 3] = [230, 25, 75];

const ANSWER: &str = "It is <|object_ref_start|>the red car<|object_ref_end|><|box_start|>(100,200),(500,600)<|box_end|>, next to <|object_ref_start|>出口<|object_ref_end|><|quad_start|>(600,100),(900,100),(900,300),(600,300)<|quad_end|>.";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn image(name: &str) -> String {
    fixtures()
        .join("images")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn tiny() -> String {
    fixtures()
        .join("tiny-qwen2vl")
        .to_string_lossy()
        .into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qwen2vl-grounding-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn qwen2vl(args: &[&str], answer: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qwen2vl"));
    c.args(args).env_remove("QWEN2VL_TEST_GROUNDED_ANSWER");
    if let Some(a) = answer {
        c.env("QWEN2VL_TEST_GROUNDED_ANSWER", a);
    }
    c.output().expect("binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_usage_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}: {err}");
    }
}

#[test]
fn pixel_mapping_of_a_hand_made_answer_on_a_real_image() {
    let img = qwen2vl::processing::image::load_image(Path::new(&image("photo640.png"))).unwrap();
    let (w, h) = img.dimensions();
    assert_eq!((w, h), (640, 480));
    let g = Grounding::parse(ANSWER);
    assert_eq!(g.text, "It is the red car [1], next to 出口 [2].");
    let shapes = g.pixel_shapes(w, h);
    assert_eq!(shapes.len(), 2);
    assert_eq!(shapes[0].label.as_deref(), Some("the red car"));
    assert_eq!(shapes[0].kind, ShapeKind::Box);
    // x by width, y by height: 100/1000*640, 200/1000*480, ...
    assert_eq!(shapes[0].points, vec![[64, 96], [320, 288]]);
    assert_eq!(shapes[1].kind, ShapeKind::Quad);
    assert_eq!(
        shapes[1].points,
        vec![[384, 48], [576, 48], [576, 144], [384, 144]]
    );
}

#[test]
fn draw_boxes_without_an_image_is_a_usage_error() {
    let d = scratch("noimage");
    let out = d.join("out.png");
    let o = qwen2vl(
        &[
            "run",
            "--model",
            &tiny(),
            "--draw-boxes",
            out.to_str().unwrap(),
            "Hi",
        ],
        None,
    );
    assert_usage_error(&o, &["--draw-boxes", "--image"]);
    assert!(!out.exists());
}

#[test]
fn unwritable_or_unsupported_targets_fail_before_the_model_loads() {
    let d = scratch("unwritable");
    // A model path that does not exist: had the model been loaded first, the error would
    // name it instead of the output path.
    let no_model = d.join("no-model");
    let run = |target: &Path| {
        qwen2vl(
            &[
                "run",
                "--model",
                no_model.to_str().unwrap(),
                "--image",
                &image("wide.png"),
                "--draw-boxes",
                target.to_str().unwrap(),
                "Where?",
            ],
            None,
        )
    };
    let missing_dir = d.join("missing/dir/out.png");
    assert_usage_error(&run(&missing_dir), &[missing_dir.to_str().unwrap()]);
    // A directory is not a file.
    let as_dir = d.join("adir.png");
    std::fs::create_dir_all(&as_dir).unwrap();
    assert_usage_error(&run(&as_dir), &[as_dir.to_str().unwrap()]);
    let gif = d.join("out.gif");
    assert_usage_error(&run(&gif), &["out.gif", ".png", ".jpg"]);
    assert!(!gif.exists());
    // No permission (meaningless as root, who may write anywhere).
    use std::os::unix::fs::PermissionsExt;
    let ro = d.join("readonly");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).unwrap();
    if std::fs::write(ro.join("probe"), b"").is_err() {
        let target = ro.join("out.png");
        assert_usage_error(&run(&target), &[target.to_str().unwrap()]);
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o700)).unwrap();
    // And with a valid target the missing model is what fails, leaving no empty file.
    let ok = d.join("ok.png");
    let o = run(&ok);
    assert_usage_error(&o, &["no-model"]);
    assert!(!ok.exists());
}

#[test]
fn an_answer_without_boxes_still_writes_the_original_image() {
    let d = scratch("noboxes");
    let out = d.join("out.png");
    let o = qwen2vl(
        &[
            "run",
            "--model",
            &tiny(),
            "--image",
            &image("wide.png"),
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
            "--draw-boxes",
            out.to_str().unwrap(),
            "Where is the car?",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("no boxes"), "{}", stderr(&o));
    let written = image::open(&out).unwrap().to_rgb8();
    let original = qwen2vl::processing::image::load_image(Path::new(&image("wide.png"))).unwrap();
    assert_eq!(written.dimensions(), (300, 200));
    assert!(written == original, "unchanged pixels");
}

#[cfg(debug_assertions)]
#[test]
fn boxes_are_listed_drawn_and_in_json() {
    let d = scratch("boxes");
    let out = d.join("out.png");
    let args = |extra: &[&str]| {
        let mut a: Vec<String> = [
            "run",
            "--model",
            &tiny(),
            // Two images: the boxes refer to the last one (640x480), not wide.png (300x200).
            "--image",
            &image("wide.png"),
            "--image",
            &image("photo640.png"),
            "--max-new-tokens",
            "2",
            "--temperature",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push("Find the car.".into());
        a
    };
    let a = args(&["--draw-boxes", out.to_str().unwrap()]);
    let o = qwen2vl(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        Some(ANSWER),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert_eq!(
        stdout,
        "It is the red car [1], next to 出口 [2].\n\n\
         [1] the red car: (64, 96)-(320, 288)\n\
         [2] 出口: (384, 48), (576, 48), (576, 144), (384, 144)\n"
    );

    // Drawn on photo640.png at its original size; the box's left edge in shape 1's colour,
    // pixels away from every shape untouched.
    let drawn = image::open(&out).unwrap().to_rgb8();
    let original =
        qwen2vl::processing::image::load_image(Path::new(&image("photo640.png"))).unwrap();
    assert_eq!(drawn.dimensions(), (640, 480));
    assert_eq!(drawn.get_pixel(64, 200).0, SHAPE1);
    assert_eq!(drawn.get_pixel(320, 200).0, SHAPE1);
    assert_eq!(drawn.get_pixel(200, 200), original.get_pixel(200, 200));
    assert_eq!(drawn.get_pixel(10, 470), original.get_pixel(10, 470));
    assert_ne!(drawn, original);

    // --json: the skip_special_tokens text and the structured grounding with pixels.
    let a = args(&["--json"]);
    let o = qwen2vl(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        Some(ANSWER),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["text"],
        "It is the red car(100,200),(500,600), next to 出口(600,100),(900,100),(900,300),(600,300)."
    );
    let g = &v["grounding"];
    assert_eq!(g["objects"][0]["label"], "the red car");
    assert_eq!(g["objects"][0]["boxes"][0]["x1"], 100);
    assert_eq!(g["pixels"]["image"], 1);
    assert_eq!(g["pixels"]["width"], 640);
    assert_eq!(g["pixels"]["height"], 480);
    assert_eq!(
        g["pixels"]["shapes"][0]["points"],
        serde_json::json!([[64, 96], [320, 288]])
    );
    assert_eq!(g["pixels"]["shapes"][1]["kind"], "quad");
}

#[cfg(debug_assertions)]
#[test]
fn jpeg_output_and_malformed_markup_in_the_terminal() {
    let d = scratch("jpeg");
    let out = d.join("out.JPG");
    let answer = "<|box_start|>(1,2)<|box_end|> <|box_start|>(0,0),(999,999)<|box_end|>";
    let o = qwen2vl(
        &[
            "run",
            "--model",
            &tiny(),
            "--image",
            &image("small.png"),
            "--max-new-tokens",
            "2",
            "--draw-boxes",
            out.to_str().unwrap(),
            "Boxes?",
        ],
        Some(answer),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // The malformed box stays text; the valid one is [1], clamped inside the 30x20 image.
    assert_eq!(
        String::from_utf8(o.stdout).unwrap(),
        "<|box_start|>(1,2)<|box_end|> [1]\n\n[1] (0, 0)-(29, 19)\n"
    );
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(
        image::guess_format(&bytes).unwrap(),
        image::ImageFormat::Jpeg
    );
    assert_eq!(
        image::load_from_memory(&bytes)
            .unwrap()
            .to_rgb8()
            .dimensions(),
        (30, 20)
    );
}

#[cfg(debug_assertions)]
#[test]
fn boxes_without_an_image_are_listed_in_model_coordinates() {
    let o = qwen2vl(
        &["run", "--model", &tiny(), "--max-new-tokens", "2", "Boxes?"],
        Some("<|object_ref_start|>a<|object_ref_end|><|box_start|>(10,20),(1000,40)<|box_end|>"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert!(stdout.contains("0-1000"), "{stdout}");
    assert!(stdout.ends_with("[1] a: (10, 20)-(1000, 40)\n"), "{stdout}");
}

/// A Qwen2.5-VL answers in pixels of the image as it saw it (photo640.png is resized to
/// 644x476), here as JSON: the listing, `--json` and `--draw-boxes` map the box onto the
/// 640x480 original.
#[cfg(debug_assertions)]
#[test]
fn qwen25_json_boxes_map_from_the_resized_image() {
    let d = scratch("qwen25");
    let out = d.join("out.png");
    let model = fixtures()
        .join("tiny-qwen25vl")
        .to_string_lossy()
        .into_owned();
    let answer = "```json\n[{\"bbox_2d\": [322, 119, 644, 476], \"label\": \"car\"}]\n```";
    let photo = image("photo640.png");
    let run = |extra: &[&str]| {
        let mut a = vec![
            "run",
            "--model",
            &model,
            "--image",
            &photo,
            "--max-new-tokens",
            "2",
            "--temperature",
            "0",
        ];
        a.extend_from_slice(extra);
        a.push("Find the car.");
        qwen2vl(&a, Some(answer))
    };
    let o = run(&["--draw-boxes", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert_eq!(
        stdout,
        format!("{answer}\n\n[1] car: (320, 120)-(639, 479)\n")
    );
    let drawn = image::open(&out).unwrap().to_rgb8();
    assert_eq!(drawn.dimensions(), (640, 480));
    assert_eq!(drawn.get_pixel(320, 300).0, SHAPE1);
    let o = run(&["--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let g = &v["grounding"];
    assert_eq!(g["coordinates"], "resized_pixels");
    assert_eq!(g["objects"][0]["boxes"][0]["x2"], 644);
    assert_eq!(
        g["pixels"]["shapes"][0]["points"],
        serde_json::json!([[320, 120], [639, 479]])
    );
}

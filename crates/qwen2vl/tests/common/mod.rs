//! Shared helpers for the golden tests: fixture paths, reference dumps, comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures` at the workspace root.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// `tests/fixtures/tiny-qwen2` with the sliding window of `reference-swa.json` (its
/// `config` keys set in config.json), written into `dir`; the reference's metadata.
pub fn tiny_qwen2_swa(dir: &Path) -> serde_json::Value {
    let src = fixtures().join("tiny-qwen2");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("reference-swa.json")).unwrap())
            .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    for (k, v) in meta["config"].as_object().unwrap() {
        cfg[k] = v.clone();
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    meta
}

/// The model in `dir`, loaded in `dtype` on the CPU; fails if the checkpoint holds tensors
/// the model did not use (a misnamed weight would otherwise go unnoticed).
pub fn load_model(dir: &Path, dtype: DType) -> qwen2vl::model::Qwen2VL {
    let (model, report) = qwen2vl::model::Qwen2VL::load(dir, dtype, &Device::Cpu).expect("load");
    assert!(
        report.unused.is_empty(),
        "unused tensors: {:?}",
        report.unused
    );
    model
}

/// The processor of the tiny fixture model.
pub fn tiny_processor() -> qwen2vl::processing::processor::Processor {
    let dir = fixtures().join("tiny-qwen2vl");
    let cfg = qwen2vl::config::Qwen2VLConfig::from_file(&dir.join("config.json")).expect("config");
    qwen2vl::processing::processor::Processor::from_dir(&dir, &cfg).expect("processor")
}

/// The `(what, allowed)` of a `BadInput` error; panics on success or any other error.
pub fn bad_input<T>(r: qwen2vl::Result<T>) -> (String, String) {
    match r {
        Err(qwen2vl::Error::BadInput { what, allowed, .. }) => (what, allowed),
        Err(other) => panic!("expected BadInput, got {other}"),
        Ok(_) => panic!("expected BadInput, got a result"),
    }
}

/// One reference case: `tests/fixtures/cases/<name>/{case.json, reference.safetensors}`.
pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    pub json: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
}

impl Case {
    pub fn load(name: &str) -> Case {
        let dir = fixtures().join("cases").join(name);
        let text = std::fs::read_to_string(dir.join("case.json"))
            .unwrap_or_else(|e| panic!("case {name}: case.json: {e}"));
        let json: serde_json::Value = serde_json::from_str(&text).expect("case.json parses");
        let tensors =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
                .unwrap_or_else(|e| panic!("case {name}: reference.safetensors: {e}"));
        Case {
            name: name.to_string(),
            dir,
            json,
            tensors,
        }
    }

    /// The model directory the case was made with.
    pub fn model_dir(&self) -> PathBuf {
        let rel = self.json["model"].as_str().expect("case.json has a model");
        self.dir.join(rel)
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("case {}: no tensor {name}", self.name))
    }

    pub fn i64s(&self, name: &str) -> Vec<i64> {
        self.tensor(name)
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::I64))
            .and_then(|t| t.to_vec1::<i64>())
            .expect("i64 tensor")
    }

    pub fn u32s(&self, name: &str) -> Vec<u32> {
        self.i64s(name).into_iter().map(|x| x as u32).collect()
    }

    pub fn f32s(&self, name: &str) -> Vec<f32> {
        self.tensor(name)
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .expect("f32 tensor")
    }

    /// The processor's `second_per_grid_ts` of a Qwen2.5-VL case's videos (empty for others).
    pub fn second_per_grid_ts(&self) -> Vec<f32> {
        if self.has("second_per_grid_ts") {
            self.f32s("second_per_grid_ts")
        } else {
            vec![]
        }
    }

    /// `(n, 3)` grids.
    pub fn grids(&self, name: &str) -> Vec<[usize; 3]> {
        if !self.has(name) {
            return vec![];
        }
        self.i64s(name)
            .chunks(3)
            .map(|c| [c[0] as usize, c[1] as usize, c[2] as usize])
            .collect()
    }
}

/// Names of every case directory.
pub fn case_names() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(fixtures().join("cases"))
        .expect("tests/fixtures/cases exists")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("case.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Max |a - b| over two equal-length slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// A tensor's values as a flat f32 vec.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 values")
}

/// Tolerance for a float tensor compared with the reference: `1e-5 + 3e-5 * max|reference|`.
///
/// The reference is float32 too; its own error against the same computation in float64
/// reaches 2.8e-4 on these fixtures' logits (largest |logit| ≈ 34) and 8.5e-5 on the first
/// layer's output (tools/reference/README.md), so no implementation can promise a flat 1e-4
/// there: two independent float32 computations may each be that far from the exact value.
/// This bound (about 1e-3 on logits of 34, 6e-5 on vision outputs of 2) is 3.6x the
/// reference's own error and four orders below what a real mistake produces (swapping
/// M-RoPE for 1-D positions moves logits by 18-45).
pub fn tolerance(reference: &[f32]) -> f32 {
    1e-5 + 3e-5 * reference.iter().fold(0f32, |a, b| a.max(b.abs()))
}

/// A case's prompt as the model takes it, built from the reference's own inputs (input ids,
/// pixel values, grids), so model tests do not depend on the processor.
pub struct ReferencePrompt {
    pub ids: Vec<u32>,
    pub image_embeds: Option<Tensor>,
    pub video_embeds: Option<Tensor>,
    pub positions: qwen2vl::rope::MropePositions,
}

impl ReferencePrompt {
    pub fn new(case: &Case, model: &qwen2vl::model::Qwen2VL) -> Self {
        let ids = case.u32s("input_ids");
        let grids = case.grids("image_grid_thw");
        let image_embeds = case.has("pixel_values").then(|| {
            model
                .encode_vision(&case.f32s("pixel_values"), &grids)
                .expect("vision")
        });
        let video_grids = case.grids("video_grid_thw");
        let video_embeds = case.has("pixel_values_videos").then(|| {
            model
                .encode_vision(&case.f32s("pixel_values_videos"), &video_grids)
                .expect("video vision")
        });
        let positions = model
            .position_ids_timed(&ids, &grids, &video_grids, &case.second_per_grid_ts())
            .expect("positions");
        ReferencePrompt {
            ids,
            image_embeds,
            video_embeds,
            positions,
        }
    }

    /// Prefill into a fresh cache with room for `extra` more tokens; last-position logits.
    pub fn prefill(
        &self,
        model: &qwen2vl::model::Qwen2VL,
        extra: usize,
    ) -> (Tensor, qwen2vl::kv_cache::KvCache) {
        let mut cache = model.new_cache(self.ids.len() + extra).expect("cache");
        let logits = model
            .prefill(
                &self.ids,
                &self.positions,
                self.image_embeds.as_ref(),
                self.video_embeds.as_ref(),
                &mut cache,
            )
            .expect("prefill");
        (logits, cache)
    }
}

/// A loopback HTTP/1.1 server on its own thread, for `n` connections: each request's path
/// (query included) goes to `route`, which gives the status (`"200 OK"`), header lines (each
/// ending in `\r\n`) and the body; every answer closes its connection. Returns
/// `http://127.0.0.1:PORT`.
pub fn serve_http<F>(n: usize, route: F) -> String
where
    F: Fn(&str) -> (&'static str, String, Vec<u8>) + Send + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(n) {
            let Ok(mut s) = stream else { continue };
            let _ = answer_http(&mut s, &route);
        }
    });
    format!("http://{addr}")
}

/// Reads one request's head and writes `route`'s answer (nothing when the client hangs up
/// first).
fn answer_http<F>(s: &mut std::net::TcpStream, route: &F) -> std::io::Result<()>
where
    F: Fn(&str) -> (&'static str, String, Vec<u8>),
{
    use std::io::{Read, Write};
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let k = s.read(&mut buf)?;
        if k == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..k]);
    }
    let line = String::from_utf8_lossy(&req);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let (status, headers, body) = route(path);
    write!(s, "HTTP/1.1 {status}\r\n{headers}Connection: close\r\n\r\n")?;
    s.write_all(&body)?;
    s.flush()
}

/// A random RGB PNG of `w`x`h` from `seed`, written as `dir/name` (same-size images
/// whose pixels differ, for the cache tests).
pub fn random_png(dir: &Path, name: &str, w: u32, h: u32, seed: u32) -> PathBuf {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let img = image::RgbImage::from_fn(w, h, |_, _| {
        let mut px = [0u8; 3];
        for c in &mut px {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            *c = (state >> 24) as u8;
        }
        image::Rgb(px)
    });
    let path = dir.join(name);
    img.save(&path).expect("png written");
    path
}

//! The GGUF reader and writer (issue 12): files written by llama.cpp's Python writer
//! (`tests/fixtures/gguf/`, made by `tools/reference/make_gguf_fixture.py`) read back with the
//! metadata and tensor bytes gguf-py reports; our writer reproduces gguf-py's file byte for
//! byte; every metadata type and several tensor types and alignments round-trip; and every
//! class of corrupt file is an error naming what is wrong (never a panic). The mutation fuzz
//! target is `gguf_files_survive_mutation` in `fuzz_parsers.rs` (it needs that file's
//! counting allocator).

mod common;

use std::path::PathBuf;

use qwen2vl::gguf::{GgmlType, GgufFile, GgufWriter, MetaArray, MetaValue};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    common::fixtures().join("gguf").join(name)
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn fnv1a64(b: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h = (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A JSON number as f64 (gguf-py's expected floats are the f32/f64 values printed exactly, but
/// serde_json's default parser may be one ulp off, so f32s are compared after rounding to f32
/// and f64s within a relative 1e-15).
fn num(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-15 * b.abs()
}

/// Whether `ours` is the value gguf-py wrote (`want`: {type, element?, value}).
fn same_value(ours: &MetaValue, want: &Value) -> bool {
    let v = &want["value"];
    let ints = |v: &Value| -> Vec<i128> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| {
                x.as_i64()
                    .map(i128::from)
                    .or_else(|| x.as_u64().map(i128::from))
                    .unwrap()
            })
            .collect()
    };
    let int = |v: &Value| -> i128 {
        v.as_i64()
            .map(i128::from)
            .or_else(|| v.as_u64().map(i128::from))
            .unwrap()
    };
    match (want["type"].as_str().unwrap(), ours) {
        ("string", MetaValue::Str(s)) => s == v.as_str().unwrap(),
        ("bool", MetaValue::Bool(b)) => *b == v.as_bool().unwrap(),
        ("float32", MetaValue::F32(x)) => *x == num(v) as f32,
        ("float64", MetaValue::F64(x)) => close(*x, num(v)),
        ("uint8", MetaValue::U8(_))
        | ("int8", MetaValue::I8(_))
        | ("uint16", MetaValue::U16(_))
        | ("int16", MetaValue::I16(_))
        | ("uint32", MetaValue::U32(_))
        | ("int32", MetaValue::I32(_))
        | ("uint64", MetaValue::U64(_))
        | ("int64", MetaValue::I64(_)) => ours.as_integer() == Some(int(v)),
        ("array", MetaValue::Array(a)) => {
            let el = want["element"].as_str().unwrap();
            match (el, a) {
                ("string", MetaArray::Str(s)) => {
                    let w: Vec<&str> = v
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_str().unwrap())
                        .collect();
                    s.iter().map(String::as_str).eq(w)
                }
                ("bool", MetaArray::Bool(b)) => {
                    b.iter()
                        .copied()
                        .eq(v.as_array().unwrap().iter().map(|x| x.as_bool().unwrap()))
                }
                ("float32", MetaArray::F32(x)) => {
                    x.iter()
                        .copied()
                        .eq(v.as_array().unwrap().iter().map(|x| num(x) as f32))
                }
                ("float64", MetaArray::F64(x)) => {
                    x.len() == v.as_array().unwrap().len()
                        && x.iter()
                            .zip(v.as_array().unwrap())
                            .all(|(&a, b)| close(a, num(b)))
                }
                ("uint8", MetaArray::U8(x)) => x.iter().map(|&x| i128::from(x)).eq(ints(v)),
                ("int8", MetaArray::I8(x)) => x.iter().map(|&x| i128::from(x)).eq(ints(v)),
                ("uint16", MetaArray::U16(x)) => x.iter().map(|&x| i128::from(x)).eq(ints(v)),
                ("int16", MetaArray::I16(x)) => x.iter().map(|&x| i128::from(x)).eq(ints(v)),
                ("uint32", MetaArray::U32(x)) => x.iter().map(|&x| i128::from(x)).eq(ints(v)),
                ("int32", MetaArray::I32(x)) => x.iter().map(|&x| i128::from(x)).eq(ints(v)),
                ("uint64", MetaArray::U64(x)) => x.iter().map(|&x| i128::from(x)).eq(ints(v)),
                ("int64", MetaArray::I64(x)) => x.iter().map(|&x| i128::from(x)).eq(ints(v)),
                _ => false,
            }
        }
        _ => false,
    }
}

#[test]
fn files_written_by_gguf_py_read_back_as_gguf_py_reads_them() {
    let expected = expected();
    for name in ["tiny.gguf", "align64.gguf"] {
        let f = GgufFile::open(&fixture(name)).unwrap();
        let want = &expected[name];
        assert_eq!(f.version(), 3, "{name}");
        let meta = want["metadata"].as_object().unwrap();
        assert_eq!(f.metadata().len(), meta.len(), "{name}: key count");
        for (key, w) in meta {
            let ours = f.get(key).unwrap_or_else(|| panic!("{name}: no key {key}"));
            assert!(
                same_value(ours, w),
                "{name}: {key} is {ours:?}, gguf-py wrote {w}"
            );
        }
        let tensors = want["tensors"].as_object().unwrap();
        assert_eq!(f.tensors().len(), tensors.len(), "{name}: tensor count");
        for (tname, w) in tensors {
            let t = f.tensor_info(tname).unwrap();
            assert_eq!(
                u64::from(t.ggml_type().id()),
                w["type"].as_u64().unwrap(),
                "{tname}"
            );
            let ne: Vec<u64> = serde_json::from_value(w["ne"].clone()).unwrap();
            assert_eq!(t.ne(), ne.as_slice(), "{tname}");
            assert_eq!(t.byte_len(), w["nbytes"].as_u64(), "{tname}");
            assert_eq!(
                f.data_start() + t.offset(),
                w["offset"].as_u64().unwrap(),
                "{tname}"
            );
            let bytes = f.tensor_bytes(tname).unwrap();
            assert_eq!(fnv1a64(bytes), w["fnv1a64"].as_str().unwrap(), "{tname}");
            // The bytes are borrowed from the map, not copied.
            let base = f.bytes().as_ptr() as usize;
            assert_eq!(
                bytes.as_ptr() as usize - base,
                (f.data_start() + t.offset()) as usize
            );
        }
    }
    // The typed getters on the keys a Qwen2-VL loader reads.
    let f = GgufFile::open(&fixture("tiny.gguf")).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), "qwen2vl");
    assert_eq!(f.get_u32("qwen2vl.block_count").unwrap(), 2);
    assert_eq!(f.get_f32("qwen2vl.rope.freq_base").unwrap(), 1e6);
    assert_eq!(
        f.get_i32_array("qwen2vl.rope.dimension_sections").unwrap(),
        &[16, 24, 24, 0]
    );
    assert_eq!(f.get_str_array("tokenizer.ggml.tokens").unwrap()[2], "你好");
    assert_eq!(f.get_f32_array("clip.vision.image_mean").unwrap().len(), 3);
    assert!(!f.get_bool("tokenizer.ggml.add_bos_token").unwrap());
    let t = f.tensor_info("v.patch_embd.weight").unwrap();
    assert_eq!(t.ne(), &[2, 2, 3, 2]);
    assert_eq!(t.shape(), vec![2, 3, 2, 2]);
    assert_eq!(t.ggml_type(), GgmlType::F32);
    let norm = f.tensor_bytes("blk.0.attn_norm.weight").unwrap();
    let values: Vec<f32> = norm
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(values, (0..32).map(|i| i as f32).collect::<Vec<_>>());
    let a = GgufFile::open(&fixture("align64.gguf")).unwrap();
    assert_eq!(a.alignment(), 64);
    assert_eq!(a.data_start() % 64, 0);
}

/// Rewrites `src` with our writer: the same keys (but `general.alignment`, which the writer
/// sets itself) and tensors in the same order.
fn rewrite(src: &GgufFile) -> Vec<u8> {
    let mut w = GgufWriter::with_alignment(src.alignment() as u32).unwrap();
    for (k, v) in src.metadata() {
        if k != "general.alignment" {
            w.add(k, v.clone()).unwrap();
        }
    }
    for t in src.tensors() {
        w.add_tensor(t.name(), t.ggml_type(), t.ne()).unwrap();
    }
    let len = w.file_len();
    let mut s = w.begin(Vec::new()).unwrap();
    for t in src.tensors() {
        s.write_tensor(t.name(), src.tensor_bytes(t.name()).unwrap())
            .unwrap();
    }
    let out = s.finish().unwrap();
    assert_eq!(out.len() as u64, len);
    out
}

#[test]
fn our_writer_reproduces_gguf_py_byte_for_byte() {
    let original = std::fs::read(fixture("tiny.gguf")).unwrap();
    let f = GgufFile::from_bytes(original.clone()).unwrap();
    let ours = rewrite(&f);
    assert_eq!(ours.len(), original.len());
    assert!(ours == original, "our writer's bytes differ from gguf-py's");
    // With another alignment the key order differs (gguf-py writes general.alignment after
    // general.architecture, we write it first), so compare what reads back.
    let f = GgufFile::open(&fixture("align64.gguf")).unwrap();
    let g = GgufFile::from_bytes(rewrite(&f)).unwrap();
    assert_eq!(g.alignment(), 64);
    for (k, v) in f.metadata() {
        assert_eq!(g.get(k), Some(v), "{k}");
    }
    for t in f.tensors() {
        assert_eq!(g.tensor(t.name()), Some(t));
        assert_eq!(
            g.tensor_bytes(t.name()).unwrap(),
            f.tensor_bytes(t.name()).unwrap()
        );
    }
}

fn every_type() -> Vec<(&'static str, MetaValue)> {
    vec![
        ("u8", MetaValue::U8(200)),
        ("i8", MetaValue::I8(-7)),
        ("u16", MetaValue::U16(60000)),
        ("i16", MetaValue::I16(-30000)),
        ("u32", MetaValue::U32(4_000_000_000)),
        ("i32", MetaValue::I32(-2_000_000_000)),
        ("u64", MetaValue::U64(u64::MAX)),
        ("i64", MetaValue::I64(i64::MIN)),
        ("f32", MetaValue::F32(-0.125)),
        ("f64", MetaValue::F64(1e300)),
        ("bool", MetaValue::Bool(true)),
        ("str", MetaValue::Str("héllo\n\u{0}x".into())),
        ("empty_str", MetaValue::Str(String::new())),
        ("a.u8", vec![1u8, 2, 255].into()),
        ("a.i8", vec![-1i8, 0, 1].into()),
        ("a.u16", vec![1u16, 65535].into()),
        ("a.i16", vec![-1i16, 7].into()),
        ("a.u32", vec![1u32, 2, 3].into()),
        ("a.i32", vec![16i32, 24, 24, 0].into()),
        ("a.u64", vec![u64::MAX, 0].into()),
        ("a.i64", vec![i64::MIN, i64::MAX].into()),
        ("a.f32", vec![0.5f32, f32::INFINITY, -0.0].into()),
        ("a.f64", vec![0.1f64, -2.0].into()),
        ("a.bool", vec![true, false].into()),
        ("a.str", vec!["a b", "", "ĠĊ", "<|im_end|>"].into()),
        ("a.empty", MetaValue::Array(MetaArray::I32(vec![]))),
    ]
}

#[test]
fn every_metadata_type_and_tensor_type_round_trips() {
    for alignment in [1u32, 8, 32, 64, 4096] {
        let mut w = GgufWriter::with_alignment(alignment).unwrap();
        for (k, v) in every_type() {
            w.add(k, v).unwrap();
        }
        let plan: Vec<(String, GgmlType, Vec<u64>)> = vec![
            ("f32".into(), GgmlType::F32, vec![3]),
            ("f16".into(), GgmlType::F16, vec![5, 3]),
            ("bf16".into(), GgmlType::BF16, vec![2, 1, 3]),
            ("q8_0".into(), GgmlType::Q8_0, vec![64, 3]),
            ("q4_0".into(), GgmlType::Q4_0, vec![32, 1, 1, 2]),
            ("q4_K".into(), GgmlType::Q4_K, vec![512, 2]),
            ("q6_K".into(), GgmlType::Q6_K, vec![256]),
            ("q5_0".into(), GgmlType::Q5_0, vec![32, 7]),
            ("i8".into(), GgmlType::I8, vec![1]),
        ];
        let mut data = Vec::new();
        for (i, (name, t, ne)) in plan.iter().enumerate() {
            let n = w.add_tensor(name, *t, ne).unwrap();
            data.push(
                (0..n)
                    .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8))
                    .collect::<Vec<u8>>(),
            );
        }
        let mut s = w.begin(Vec::new()).unwrap();
        for ((name, ..), d) in plan.iter().zip(&data) {
            s.write_tensor(name, d).unwrap();
        }
        let bytes = s.finish().unwrap();
        // For the hand cross-check with gguf-py and llama.cpp (see the script's `--check`).
        if let Some(dir) = std::env::var_os("QWEN2VL_GGUF_DUMP_DIR") {
            let path = PathBuf::from(dir).join(format!("ours-align{alignment}.gguf"));
            std::fs::write(path, &bytes).unwrap();
        }
        let f = GgufFile::from_bytes(bytes).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.alignment(), u64::from(alignment));
        let extra = usize::from(alignment != 32);
        assert_eq!(f.metadata().len(), every_type().len() + extra);
        for (k, v) in every_type() {
            assert_eq!(f.get(k), Some(&v), "{k} at alignment {alignment}");
        }
        for ((name, t, ne), d) in plan.iter().zip(&data) {
            let info = f.tensor_info(name).unwrap();
            assert_eq!(info.ggml_type(), *t);
            assert_eq!(info.ne(), ne.as_slice());
            assert_eq!(info.offset() % u64::from(alignment), 0);
            assert_eq!(f.tensor_bytes(name).unwrap(), d.as_slice(), "{name}");
        }
        // The typed getters agree with the values.
        assert_eq!(f.get_u8("u8").unwrap(), 200);
        assert_eq!(f.get_i64("i64").unwrap(), i64::MIN);
        assert_eq!(f.get_f64("f64").unwrap(), 1e300);
        assert_eq!(f.get_str("str").unwrap(), "héllo\n\u{0}x");
        assert_eq!(f.get_u32_array("a.u32").unwrap(), &[1, 2, 3]);
        assert_eq!(f.get_u8_array("a.u8").unwrap(), &[1, 2, 255]);
        assert_eq!(f.get_str_array("a.str").unwrap()[3], "<|im_end|>");
        assert_eq!(f.get_i32_array("a.empty").unwrap(), &[] as &[i32]);
    }
    // No tensors: a metadata-only file.
    let mut w = GgufWriter::new();
    w.add("general.architecture", "qwen2vl").unwrap();
    let bytes = w.begin(Vec::new()).unwrap().finish().unwrap();
    let f = GgufFile::from_bytes(bytes.clone()).unwrap();
    assert!(f.tensors().is_empty());
    assert_eq!(f.data_start(), bytes.len() as u64);
}

#[test]
fn open_names_the_path() {
    let dir = std::env::temp_dir().join(format!("qwen2vl-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken.gguf");
    std::fs::write(&path, b"GGUF\x01\0\0\0").unwrap();
    let e = GgufFile::open(&path).unwrap_err().to_string();
    assert!(e.contains("broken.gguf"), "{e}");
    let missing = dir.join("missing.gguf");
    let e = GgufFile::open(&missing).unwrap_err();
    assert!(matches!(e, qwen2vl::Error::Model { .. }), "{e}");
    let good = dir.join("good.gguf");
    std::fs::copy(fixture("tiny.gguf"), &good).unwrap();
    let f = GgufFile::open(&good).unwrap();
    assert_eq!(f.path(), Some(good.as_path()));
    let e = f.get_u32("qwen2vl.nope").unwrap_err().to_string();
    assert!(
        e.contains("good.gguf") && e.contains("'qwen2vl.nope' is missing"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Corrupt files, each class with its own error. The files are written by hand (the writer
// refuses to write them).
// ---------------------------------------------------------------------------------------------

/// A raw GGUF under construction.
#[derive(Clone)]
struct Raw {
    version: u32,
    kvs: Vec<Vec<u8>>,
    tensors: Vec<Vec<u8>>,
    /// Overrides of the counts written in the header.
    n_kv: Option<u64>,
    n_tensors: Option<u64>,
    alignment: usize,
    data: Vec<u8>,
}

fn s(x: &str) -> Vec<u8> {
    let mut v = (x.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(x.as_bytes());
    v
}

/// A key-value entry with a u32 value.
fn kv_u32(key: &str, v: u32) -> Vec<u8> {
    let mut e = s(key);
    e.extend_from_slice(&4u32.to_le_bytes());
    e.extend_from_slice(&v.to_le_bytes());
    e
}

/// A tensor description.
fn ti(name: &str, ne: &[u64], ty: u32, offset: u64) -> Vec<u8> {
    let mut e = s(name);
    e.extend_from_slice(&(ne.len() as u32).to_le_bytes());
    for d in ne {
        e.extend_from_slice(&d.to_le_bytes());
    }
    e.extend_from_slice(&ty.to_le_bytes());
    e.extend_from_slice(&offset.to_le_bytes());
    e
}

impl Raw {
    /// Two keys, two f32 tensors ([4] at 0 and [2, 2] at 32) and 64 data bytes.
    fn valid() -> Raw {
        Raw {
            version: 3,
            kvs: vec![
                {
                    let mut e = s("general.architecture");
                    e.extend_from_slice(&8u32.to_le_bytes());
                    e.extend(s("qwen2vl"));
                    e
                },
                kv_u32("qwen2vl.block_count", 2),
            ],
            tensors: vec![ti("a", &[4], 0, 0), ti("b", &[2, 2], 0, 32)],
            n_kv: None,
            n_tensors: None,
            alignment: 32,
            data: (0..64).collect(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&self.version.to_le_bytes());
        let nt = self.n_tensors.unwrap_or(self.tensors.len() as u64);
        b.extend_from_slice(&nt.to_le_bytes());
        b.extend_from_slice(&self.n_kv.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for e in self.kvs.iter().chain(&self.tensors) {
            b.extend_from_slice(e);
        }
        if !self.tensors.is_empty() {
            b.resize(b.len().div_ceil(self.alignment) * self.alignment, 0);
        }
        b.extend_from_slice(&self.data);
        b
    }

    /// The error message of reading it (panics if it reads).
    fn err(&self) -> String {
        err_of(self.bytes())
    }
}

fn err_of(bytes: Vec<u8>) -> String {
    match GgufFile::from_bytes(bytes) {
        Ok(_) => panic!("a corrupt file was read"),
        Err(qwen2vl::Error::Weights(m)) => m,
        Err(e) => panic!("not a Weights error: {e}"),
    }
}

#[track_caller]
fn has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{p:?} not in: {msg}");
    }
}

#[test]
fn the_hand_made_valid_file_reads() {
    let f = GgufFile::from_bytes(Raw::valid().bytes()).unwrap();
    assert_eq!(
        f.tensor_bytes("b").unwrap(),
        &(32..48).collect::<Vec<u8>>()[..]
    );
}

#[test]
fn bad_magic_and_versions() {
    let mut b = Raw::valid().bytes();
    b[..4].copy_from_slice(b"GGML");
    has(
        &err_of(b),
        &["not a GGUF file", "GGML", "allowed: the magic \"GGUF\""],
    );
    has(&err_of(b"PK\x03\x04".to_vec()), &["not a GGUF file"]);
    let mut r = Raw::valid();
    r.version = 1;
    has(&r.err(), &["version 1 is not supported", "allowed: 2 or 3"]);
    r.version = 4;
    has(&r.err(), &["version 4 is not supported", "allowed: 2 or 3"]);
    r.version = 0;
    has(&r.err(), &["version 0 is not supported"]);
    r.version = 3u32.swap_bytes();
    has(&r.err(), &["big-endian", "allowed: little-endian"]);
    r.version = 2;
    GgufFile::from_bytes(r.bytes()).unwrap();
}

#[test]
fn every_truncation_is_an_error() {
    for file in [
        Raw::valid().bytes(),
        std::fs::read(fixture("tiny.gguf")).unwrap(),
        std::fs::read(fixture("align64.gguf")).unwrap(),
    ] {
        // gguf-py pads the last tensor too: a cut in that padding still reads.
        let f = GgufFile::from_bytes(file.clone()).unwrap();
        let end = f
            .tensors()
            .iter()
            .map(|t| f.data_start() + t.offset() + t.byte_len().unwrap())
            .max()
            .unwrap() as usize;
        for n in end..file.len() {
            GgufFile::from_bytes(file[..n].to_vec()).unwrap();
        }
        for n in 0..end {
            let m = err_of(file[..n].to_vec());
            assert!(
                m.contains("truncated")
                    || m.contains("cannot fit")
                    || m.contains("has length")
                    || m.contains("elements of type"),
                "prefix of {n} bytes: {m}"
            );
        }
    }
    has(&err_of(Vec::new()), &["truncated", "0 bytes"]);
}

#[test]
fn absurd_counts_and_lengths() {
    let mut r = Raw::valid();
    r.n_tensors = Some(1 << 60);
    has(
        &r.err(),
        &[
            "tensor count 1152921504606846976 cannot fit",
            "allowed: at most",
        ],
    );
    let mut r = Raw::valid();
    r.n_kv = Some(1 << 60);
    has(
        &r.err(),
        &["key-value count 1152921504606846976 cannot fit"],
    );
    let mut r = Raw::valid();
    r.n_kv = Some(u64::MAX);
    has(
        &r.err(),
        &["key-value count 18446744073709551615 cannot fit"],
    );
    // Fits the bytes-left bound but the entries are not there.
    let mut r = Raw::valid();
    r.n_kv = Some(3);
    r.err();
    // A huge string length (a key), and a huge array length.
    let mut r = Raw::valid();
    r.kvs[0][..8].copy_from_slice(&(1u64 << 62).to_le_bytes());
    has(
        &r.err(),
        &[
            "key 0 at byte 24 has length 4611686018427387904",
            "allowed: at most",
        ],
    );
    let mut r = Raw::valid();
    let mut e = s("tokenizer.ggml.tokens");
    e.extend_from_slice(&9u32.to_le_bytes());
    e.extend_from_slice(&8u32.to_le_bytes());
    e.extend_from_slice(&(1u64 << 40).to_le_bytes());
    r.kvs.push(e);
    has(
        &r.err(),
        &[
            "array 'tokenizer.ggml.tokens'",
            "1099511627776 elements of type string",
            "allowed: at most",
        ],
    );
    // A string value longer than the file.
    let mut r = Raw::valid();
    let mut e = s("general.name");
    e.extend_from_slice(&8u32.to_le_bytes());
    e.extend_from_slice(&1000u64.to_le_bytes());
    r.kvs.push(e);
    has(
        &r.err(),
        &["the value of key 'general.name'", "has length 1000"],
    );
}

#[test]
fn bad_keys_and_values() {
    let mut r = Raw::valid();
    r.kvs.push(kv_u32("qwen2vl.block_count", 3));
    has(
        &r.err(),
        &["key 'qwen2vl.block_count' appears twice", "entries 1 and 2"],
    );
    let mut r = Raw::valid();
    r.kvs.push(kv_u32("", 3));
    has(&r.err(), &["key 2", "is empty"]);
    let mut r = Raw::valid();
    let mut e = kv_u32("x", 1);
    e[8] = 0xff;
    r.kvs.push(e);
    has(&r.err(), &["key 2", "not UTF-8"]);
    let mut r = Raw::valid();
    let mut e = s("x");
    e.extend_from_slice(&13u32.to_le_bytes());
    r.kvs.push(e);
    has(
        &r.err(),
        &["key 'x' has value type id 13", "allowed: 0 to 12"],
    );
    let mut r = Raw::valid();
    let mut e = s("nested");
    e.extend_from_slice(&9u32.to_le_bytes());
    e.extend_from_slice(&9u32.to_le_bytes());
    e.extend_from_slice(&1u64.to_le_bytes());
    r.kvs.push(e);
    has(&r.err(), &["key 'nested'", "array of arrays"]);
}

#[test]
fn bad_alignments() {
    for (a, _) in [(0u32, "0"), (3, "3"), (48, "48")] {
        let mut r = Raw::valid();
        r.kvs.push(kv_u32("general.alignment", a));
        has(
            &r.err(),
            &[
                "key 'general.alignment' is u32",
                &format!("U32({a})"),
                "allowed: a u32 power of two",
            ],
        );
    }
    let mut r = Raw::valid();
    let mut e = s("general.alignment");
    e.extend_from_slice(&10u32.to_le_bytes());
    e.extend_from_slice(&64u64.to_le_bytes());
    r.kvs.push(e);
    has(
        &r.err(),
        &[
            "key 'general.alignment' is u64",
            "allowed: a u32 power of two",
        ],
    );
    // A valid alignment of 64 moves the data section.
    let mut r = Raw::valid();
    r.kvs.push(kv_u32("general.alignment", 64));
    r.alignment = 64;
    r.tensors[1] = ti("b", &[2, 2], 0, 64);
    r.data = (0..128).map(|x| x as u8).collect();
    let f = GgufFile::from_bytes(r.bytes()).unwrap();
    assert_eq!(f.tensor_bytes("b").unwrap()[0], 64);
    // ...and an offset aligned to 32 only is then refused.
    r.tensors[1] = ti("b", &[2, 2], 0, 32);
    has(
        &r.err(),
        &[
            "tensor 'b' has data offset 32",
            "not a multiple of the alignment 64",
        ],
    );
}

#[test]
fn bad_tensor_descriptions() {
    let with = |t: Vec<u8>| {
        let mut r = Raw::valid();
        r.tensors[1] = t;
        r.err()
    };
    has(
        &with(ti("b", &[1 << 32, 1 << 32], 0, 32)),
        &["tensor 'b'", "more than i64::MAX elements", "overflows"],
    );
    has(
        &with(ti("b", &[u64::MAX], 0, 32)),
        &["tensor 'b'", "more than i64::MAX elements"],
    );
    has(
        &with(ti("b", &[1 << 61], 28, 32)),
        &["tensor 'b'", "2^64 bytes"],
    );
    has(
        &with(ti("b", &[4, 0], 0, 32)),
        &["tensor 'b'", "ne[1] is 0", "at least 1"],
    );
    has(
        &with(ti("b", &[], 0, 32)),
        &["tensor 'b' has 0 dimensions", "allowed: 1 to 4"],
    );
    has(
        &with(ti("b", &[1, 1, 1, 1, 1], 0, 32)),
        &["tensor 'b' has 5 dimensions", "allowed: 1 to 4"],
    );
    has(
        &with(ti("b", &[2, 2], 0, 33)),
        &["tensor 'b' has data offset 33", "alignment 32"],
    );
    has(
        &with(ti("b", &[16, 1], 8, 32)),
        &[
            "tensor 'b' (q8_0, ne [16, 1])",
            "ne[0] = 16 is not a multiple of the q8_0 block size 32",
        ],
    );
    has(
        &with(ti("b", &[4, 3], 0, 32)),
        &["truncated: tensor 'b'", "needs 48 bytes at data offset 32"],
    );
    has(
        &with(ti("b", &[2, 2], 0, 1 << 40)),
        &["truncated: tensor 'b'", "past the end"],
    );
    has(
        &with(ti("b", &[2, 2], 0, u64::MAX - 31)),
        &["truncated: tensor 'b'"],
    );
    has(
        &with(ti("a", &[2, 2], 0, 32)),
        &["tensor name 'a' appears twice", "tensors 0 and 1"],
    );
    has(
        &with(ti("", &[2, 2], 0, 32)),
        &["tensor 1", "name of 0 bytes"],
    );
    has(
        &with(ti(&"x".repeat(64), &[2, 2], 0, 32)),
        &["name of 64 bytes", "1 to 63"],
    );
    // Overlaps: the same offset, and a tensor running into the next one.
    has(
        &with(ti("b", &[2, 2], 0, 0)),
        &["tensors 'a' (data bytes 0..16) and 'b' (data bytes 0..16) overlap"],
    );
    let mut r = Raw::valid();
    r.tensors[0] = ti("a", &[12], 0, 0);
    has(
        &r.err(),
        &["tensors 'a' (data bytes 0..48) and 'b' (data bytes 32..48) overlap"],
    );
    // Tensor counts that fit the bytes but whose tensors are missing.
    let mut r = Raw::valid();
    r.n_tensors = Some(3);
    r.err();
}

#[test]
fn unknown_types_fail_only_when_read() {
    let mut r = Raw::valid();
    r.tensors.push(ti("future", &[8], 99, 64));
    r.data.extend_from_slice(&[0; 32]);
    let f = GgufFile::from_bytes(r.bytes()).unwrap();
    let t = f.tensor_info("future").unwrap();
    assert_eq!(t.ggml_type(), GgmlType::Unknown(99));
    assert_eq!(t.byte_len(), None);
    has(
        &f.tensor_bytes("future").unwrap_err().to_string(),
        &["tensor 'future' has ggml type id 99", "known: f32 (0)"],
    );
    assert_eq!(f.tensor_bytes("a").unwrap().len(), 16);
    // Its offset is still checked: inside another tensor, or past the end.
    r.tensors[2] = ti("future", &[8], 99, 32);
    has(
        &r.err(),
        &["'future' (data bytes 32..33) and 'b' (data bytes 32..48) overlap"],
    );
    r.tensors[2] = ti("future", &[8], 99, 96);
    has(&r.err(), &["truncated: tensor 'future'", "at least 1"]);
    // A removed ggml id (4, Q4_2) is unknown too.
    r.tensors[2] = ti("old", &[32], 4, 64);
    let f = GgufFile::from_bytes(r.bytes()).unwrap();
    has(
        &f.tensor_bytes("old").unwrap_err().to_string(),
        &["ggml type id 4"],
    );
}

#[test]
fn a_file_whose_data_section_starts_past_the_end() {
    let mut r = Raw::valid();
    r.data.clear();
    let mut b = r.bytes();
    // Header end padded past the end: cut the padding.
    let header_end = 24 + r.kvs.iter().chain(&r.tensors).map(Vec::len).sum::<usize>();
    b.truncate(header_end);
    assert_ne!(header_end % 32, 0);
    has(&err_of(b), &["truncated: the data section starts at byte"]);
}

/// A header the size of the real Qwen2-VL text GGUF's (151,936 tokens, 151,387 merges, 338
/// tensor descriptions) reads, with every array intact. (How long it takes is a benchmark
/// matter; `--nocapture` prints it.)
#[test]
fn a_qwen_sized_header_reads() {
    let tokens: Vec<String> = (0..151_936).map(|i| format!("Ġtok{i}")).collect();
    let merges: Vec<String> = (0..151_387).map(|i| format!("Ġt ok{i}")).collect();
    let types: Vec<i32> = (0..151_936)
        .map(|i| 1 + 2 * i32::from(i >= 151_643))
        .collect();
    let mut w = GgufWriter::new();
    w.add("general.architecture", "qwen2vl").unwrap();
    w.add("tokenizer.ggml.tokens", tokens.clone()).unwrap();
    w.add("tokenizer.ggml.merges", merges.clone()).unwrap();
    w.add("tokenizer.ggml.token_type", types.clone()).unwrap();
    let names: Vec<String> = (0..28)
        .flat_map(|l| {
            [
                "attn_norm.weight",
                "attn_q.weight",
                "attn_q.bias",
                "attn_k.weight",
                "attn_k.bias",
                "attn_v.weight",
                "attn_v.bias",
                "attn_output.weight",
                "ffn_norm.weight",
                "ffn_gate.weight",
                "ffn_up.weight",
                "ffn_down.weight",
            ]
            .map(|t| format!("blk.{l}.{t}"))
        })
        .chain(["token_embd.weight".into(), "output_norm.weight".into()])
        .collect();
    for n in &names {
        w.add_tensor(n, GgmlType::Q8_0, &[32]).unwrap();
    }
    let mut s = w.begin(Vec::new()).unwrap();
    for n in &names {
        s.write_tensor(n, &[0; 34]).unwrap();
    }
    let bytes = s.finish().unwrap();
    let start = std::time::Instant::now();
    let f = GgufFile::from_bytes(bytes).unwrap();
    eprintln!(
        "a {}-byte header with {} tensors read in {:?}",
        f.data_start(),
        f.tensors().len(),
        start.elapsed()
    );
    assert_eq!(f.get_str_array("tokenizer.ggml.tokens").unwrap(), tokens);
    assert_eq!(f.get_str_array("tokenizer.ggml.merges").unwrap(), merges);
    assert_eq!(f.get_i32_array("tokenizer.ggml.token_type").unwrap(), types);
    assert_eq!(f.tensors().len(), 338);
    assert_eq!(f.tensor_bytes("blk.27.ffn_down.weight").unwrap().len(), 34);
}

//! A GGUF file held to the manifest of one llama.cpp's converter wrote
//! (`tools/reference/make_gguf_*.py`): every metadata key with its gguf-py type and value
//! (long arrays and strings by length), every tensor with its type and `ne`, and, where asked,
//! the SHA-256 of its bytes.
#![allow(dead_code)]

use qwen2vl::gguf::{GgufFile, MetaArray, MetaValue};
use serde_json::Value as Json;

/// "UINT32", "ARRAY/STRING", … as gguf-py names them (the manifest's spelling).
pub fn type_name(v: &MetaValue) -> String {
    let scalar = |v: &MetaValue| match v {
        MetaValue::U8(_) => "UINT8",
        MetaValue::I8(_) => "INT8",
        MetaValue::U16(_) => "UINT16",
        MetaValue::I16(_) => "INT16",
        MetaValue::U32(_) => "UINT32",
        MetaValue::I32(_) => "INT32",
        MetaValue::U64(_) => "UINT64",
        MetaValue::I64(_) => "INT64",
        MetaValue::F32(_) => "FLOAT32",
        MetaValue::F64(_) => "FLOAT64",
        MetaValue::Bool(_) => "BOOL",
        MetaValue::Str(_) => "STRING",
        MetaValue::Array(_) => "ARRAY",
    };
    match v {
        MetaValue::Array(a) => {
            let elem = match a {
                MetaArray::Str(_) => "STRING",
                MetaArray::I32(_) => "INT32",
                MetaArray::F32(_) => "FLOAT32",
                MetaArray::U32(_) => "UINT32",
                _ => "OTHER",
            };
            format!("ARRAY/{elem}")
        }
        v => scalar(v).to_string(),
    }
}

/// A metadata value as the manifest writes it (long arrays and strings by length only).
pub fn same_value(ours: &MetaValue, theirs: &Json) -> bool {
    if let Some(len) = theirs.get("len") {
        let n = match ours {
            MetaValue::Array(a) => a.len(),
            MetaValue::Str(s) => s.len(),
            _ => return false,
        };
        return len.as_u64() == Some(n as u64);
    }
    match ours {
        MetaValue::F32(x) => theirs.as_f64().map(|t| t as f32) == Some(*x),
        MetaValue::Array(MetaArray::F32(v)) => {
            let t: Vec<f32> = theirs
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            &t == v
        }
        MetaValue::Array(MetaArray::I32(v)) => {
            theirs
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap() as i32)
                .collect::<Vec<_>>()
                == *v
        }
        MetaValue::Str(s) => theirs.as_str() == Some(s),
        MetaValue::Bool(b) => theirs.as_bool() == Some(*b),
        v => v.as_integer().map(|i| i as i64) == theirs.as_i64(),
    }
}

/// Holds `ours` to `theirs` (one file's entry of a manifest): the same keys, types and
/// values, the same tensors with the same types and `ne`, and with `bytes` the same tensor
/// bytes (SHA-256).
pub fn check(ours: &GgufFile, theirs: &Json, bytes: bool) {
    let what = ours.origin().to_string();
    let meta = theirs["metadata"].as_object().unwrap();
    let mut keys: Vec<&str> = ours.metadata().map(|(k, _)| k).collect();
    keys.sort();
    let mut want: Vec<&str> = meta.keys().map(String::as_str).collect();
    want.sort();
    assert_eq!(keys, want, "{what}: metadata keys");
    for (k, v) in ours.metadata() {
        let t = &meta[k];
        assert_eq!(
            type_name(v),
            t["type"].as_str().unwrap(),
            "{what}: type of {k}"
        );
        assert!(
            same_value(v, &t["value"]),
            "{what}: {k} = {v:?}, llama.cpp: {}",
            t["value"]
        );
    }
    let tensors = theirs["tensors"].as_object().unwrap();
    assert_eq!(ours.tensors().len(), tensors.len(), "{what}: tensor count");
    for t in ours.tensors() {
        let m = tensors
            .get(t.name())
            .unwrap_or_else(|| panic!("{what}: llama.cpp has no tensor {}", t.name()));
        let ty = m["type"].as_str().unwrap().to_ascii_lowercase();
        assert_eq!(
            t.ggml_type().name().to_ascii_lowercase(),
            ty,
            "{what}: {}",
            t.name()
        );
        let ne: Vec<u64> = m["ne"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(t.ne(), ne.as_slice(), "{what}: ne of {}", t.name());
        if bytes {
            assert_eq!(
                sha256(ours.bytes_of(t).unwrap()),
                m["sha256"].as_str().unwrap(),
                "{what}: bytes of {}",
                t.name()
            );
        }
    }
}

/// Lower-case hex SHA-256.
pub fn sha256(b: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

//! Checkpoint loading: shape checks, missing and unused tensors, dtypes, both namings.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use qwen2vl::weights::Weights;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qwen2vl-weights-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(path: &std::path::Path, tensors: &[(&str, Tensor)]) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn reads_f32_bf16_f16_into_the_compute_dtype() {
    let d = scratch("dtypes");
    let v = Tensor::new(&[[1.5f32, -2.25], [0.125, 3.0]], &Device::Cpu).unwrap();
    write(
        &d.join("model.safetensors"),
        &[
            ("a", v.clone()),
            ("b", v.to_dtype(DType::BF16).unwrap()),
            ("c", v.to_dtype(DType::F16).unwrap()),
        ],
    );
    let w = Weights::from_dir(&d, DType::F32, &Device::Cpu).unwrap();
    for name in ["a", "b", "c"] {
        let t = w.get(name, (2, 2)).unwrap();
        assert_eq!(t.dtype(), DType::F32);
        // These values are exact in every format.
        assert_eq!(
            t.to_vec2::<f32>().unwrap(),
            v.to_vec2::<f32>().unwrap(),
            "{name}"
        );
    }
    let w16 = Weights::from_dir(&d, DType::F16, &Device::Cpu).unwrap();
    assert_eq!(w16.get("b", (2, 2)).unwrap().dtype(), DType::F16);
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let d = scratch("shape");
    write(
        &d.join("model.safetensors"),
        &[(
            "model.norm.weight",
            Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap(),
        )],
    );
    let w = Weights::from_dir(&d, DType::F32, &Device::Cpu).unwrap();
    let e = w.get("model.norm.weight", 16).unwrap_err().to_string();
    assert!(
        e.contains("model.norm.weight") && e.contains("[8]") && e.contains("[16]"),
        "{e}"
    );
    let e = w
        .get("model.embed_tokens.weight", (4, 2))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing tensor model.embed_tokens.weight") && e.contains("[4, 2]"),
        "{e}"
    );
}

#[test]
fn unused_tensors_are_reported_and_new_names_resolve() {
    let d = scratch("unused");
    let z = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    write(
        &d.join("model.safetensors"),
        &[
            ("model.language_model.norm.weight", z.clone()),
            ("model.visual.merger.ln_q.weight", z.clone()),
            ("extra.head.weight", z),
        ],
    );
    let w = Weights::from_dir(&d, DType::F32, &Device::Cpu).unwrap();
    // Original names find the newer layout's tensors.
    w.get("model.norm.weight", 4).unwrap();
    w.get("visual.merger.ln_q.weight", 4).unwrap();
    assert_eq!(w.unused(), vec!["extra.head.weight".to_string()]);
}

#[test]
fn sharded_index_and_missing_files() {
    let d = scratch("shards");
    let z = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    write(&d.join("part-1.safetensors"), &[("a", z.clone())]);
    write(&d.join("part-2.safetensors"), &[("b", z)]);
    std::fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}"#,
    )
    .unwrap();
    let w = Weights::from_dir(&d, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(w.get("b", 3).unwrap().dims(), &[3]);
    // An index naming a shard that is not there.
    std::fs::remove_file(d.join("part-2.safetensors")).unwrap();
    let e = Weights::from_dir(&d, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("part-2.safetensors"), "{e}");
    // No weights at all.
    let empty = scratch("empty");
    let e = Weights::from_dir(&empty, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no weights found"), "{e}");
    // A file that is not safetensors.
    let bad = scratch("bad");
    std::fs::write(bad.join("model.safetensors"), b"garbage").unwrap();
    let e = Weights::from_dir(&bad, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn f32_compute_reads_16_bit_matrices_in_place_with_the_widened_values() {
    let d = scratch("in-place");
    let v = Tensor::new(
        &[
            [1.5f32, -2.25, 7.0],
            [0.125, 3.0, -0.5],
            [1e-3, 65504.0, -1e-4],
        ],
        &Device::Cpu,
    )
    .unwrap();
    write(
        &d.join("model.safetensors"),
        &[
            ("a", v.clone()),
            ("b", v.to_dtype(DType::BF16).unwrap()),
            ("c", v.to_dtype(DType::F16).unwrap()),
            (
                "vec",
                v.flatten_all().unwrap().to_dtype(DType::BF16).unwrap(),
            ),
        ],
    );
    let w = Weights::from_dir(&d, DType::F32, &Device::Cpu).unwrap();
    // f32 storage and 1-D tensors are read (copied) as before.
    assert!(w.get_half("a", 3, 3).unwrap().is_none());
    assert!(w.get_half("vec", 9, 1).unwrap().is_none());
    // A wrong shape is left to `get`, which names it.
    assert!(w.get_half("b", 9, 1).unwrap().is_none());
    assert!(w.get_half("missing", 3, 3).unwrap().is_none());
    for name in ["b", "c"] {
        let h = w
            .get_half(name, 3, 3)
            .unwrap()
            .expect("16-bit matrix in place");
        assert_eq!(h.dims(), (3, 3));
        let widened = w.get(name, (3, 3)).unwrap().flatten_all().unwrap();
        assert_eq!(h.to_f32(), widened.to_vec1::<f32>().unwrap(), "{name}");
        // And its product is the f32 product of those values.
        let x = [1.0f32, 2.0, 3.0];
        let y = h.matmul(&x, 1, None).unwrap();
        let wv = widened.to_vec1::<f32>().unwrap();
        for (j, &yj) in y.iter().enumerate() {
            let want: f64 = (0..3).map(|t| x[t] as f64 * wv[j * 3 + t] as f64).sum();
            assert!(
                (yj as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{name} row {j}"
            );
        }
    }
    // It counts as read, and at 2 bytes a value in the memory estimate.
    assert!(!w.unused().contains(&"b".to_string()));
    let all_f32 = Weights::from_dir(&d, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        all_f32.resident_bytes(DType::F32, None),
        (9 * 4 + 9 * 2 + 9 * 2 + 9 * 4) as u64
    );
    // Other compute dtypes never read in place.
    let f64w = Weights::from_dir(&d, DType::F64, &Device::Cpu).unwrap();
    assert!(f64w.get_half("b", 3, 3).unwrap().is_none());
    let mut bf = Weights::from_dir(&d, DType::F32, &Device::Cpu).unwrap();
    bf.set_bf16_products(true);
    assert!(bf.get_half("b", 3, 3).unwrap().is_none());
}

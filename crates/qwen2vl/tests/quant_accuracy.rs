//! How far each quantization format moves the model's numbers (issue 12, "Accuracy").
//!
//! A small random-weight Qwen2-VL whose matrices have rows of 256 and 768 values (so every
//! K format applies, unlike the 64-wide tiny fixture, which falls back to Q8_0) is written to
//! a temporary directory and loaded twice: in f32 and quantized. Over teacher-forced token
//! sequences, each format's logits are compared with the f32 ones: max and mean |Δlogit|,
//! mean KL(p_f32 ‖ p_quant) and top-1 agreement, held to the bounds below and printed.
//!
//! Random weights give flat next-token distributions, where any noise flips the argmax; the
//! tied embeddings are drawn wider than an initializer would (σ 0.1, the matrices σ 0.03) so
//! the f32 model's mean top-1 probability is about 0.3, like a small trained model on real
//! text. The figures are a proxy for a real checkpoint's, and a guard: each format within
//! its bounds, and the divergence ordered by bits. bf16 compute (`--dtype bf16`, issue 14)
//! is measured on the same model and sequences beside them.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use qwen2vl::model::Qwen2VL;
use qwen2vl::ops::quant::plan::QuantScheme;
use qwen2vl::rope::{mrope_position_ids, VisionTokens};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const HIDDEN: usize = 256;
const INTER: usize = 768;
const LAYERS: usize = 4;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const VOCAB: usize = 2048;
const VISION: usize = 64;
const EMBED_SIGMA: f32 = 0.1;
const MATRIX_SIGMA: f32 = 0.03;

fn config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": true, "hidden_act": "silu",
        "bos_token_id": 2000, "eos_token_id": 2001,
        "vision_start_token_id": 2002, "vision_end_token_id": 2003, "vision_token_id": 2004,
        "image_token_id": 2005, "video_token_id": 2006,
        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
        "vision_config": {
            "depth": 1, "embed_dim": VISION, "mlp_ratio": 4, "num_heads": 4, "in_chans": 3,
            "hidden_size": HIDDEN, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2
        }
    })
}

/// Every tensor of the model with its shape and the σ it is drawn with (0 = ones).
fn tensors() -> Vec<(String, Vec<usize>, f32)> {
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![VOCAB, HIDDEN],
        EMBED_SIGMA,
    )];
    let hd = HIDDEN / HEADS;
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        t.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN], 0.0));
        t.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![HIDDEN],
            0.0,
        ));
        for (name, out) in [("q", HIDDEN), ("k", KV_HEADS * hd), ("v", KV_HEADS * hd)] {
            t.push((
                format!("{p}.self_attn.{name}_proj.weight"),
                vec![out, HIDDEN],
                MATRIX_SIGMA,
            ));
            t.push((format!("{p}.self_attn.{name}_proj.bias"), vec![out], 0.02));
        }
        t.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![HIDDEN, HIDDEN],
            MATRIX_SIGMA,
        ));
        t.push((
            format!("{p}.mlp.gate_proj.weight"),
            vec![INTER, HIDDEN],
            MATRIX_SIGMA,
        ));
        t.push((
            format!("{p}.mlp.up_proj.weight"),
            vec![INTER, HIDDEN],
            MATRIX_SIGMA,
        ));
        t.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![HIDDEN, INTER],
            MATRIX_SIGMA,
        ));
    }
    t.push(("model.norm.weight".into(), vec![HIDDEN], 0.0));
    let v = VISION;
    t.push((
        "visual.patch_embed.proj.weight".into(),
        vec![v, 3, 2, 14, 14],
        0.02,
    ));
    let b = "visual.blocks.0";
    for n in ["norm1", "norm2"] {
        t.push((format!("{b}.{n}.weight"), vec![v], 0.0));
        t.push((format!("{b}.{n}.bias"), vec![v], 0.02));
    }
    for (name, shape) in [
        ("attn.qkv", vec![3 * v, v]),
        ("attn.proj", vec![v, v]),
        ("mlp.fc1", vec![4 * v, v]),
        ("mlp.fc2", vec![v, 4 * v]),
    ] {
        t.push((format!("{b}.{name}.bias"), vec![shape[0]], 0.02));
        t.push((format!("{b}.{name}.weight"), shape, 0.02));
    }
    t.push(("visual.merger.ln_q.weight".into(), vec![v], 0.0));
    t.push(("visual.merger.ln_q.bias".into(), vec![v], 0.02));
    for (i, (o, k)) in [(4 * v, 4 * v), (HIDDEN, 4 * v)].into_iter().enumerate() {
        let i = 2 * i;
        t.push((format!("visual.merger.mlp.{i}.weight"), vec![o, k], 0.02));
        t.push((format!("visual.merger.mlp.{i}.bias"), vec![o], 0.02));
    }
    t
}

/// Writes the random model into a fresh directory under the system's temp dir.
fn write_model() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qwen2vl-quant-acc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config().to_string()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors()
        .into_iter()
        .map(|(name, shape, sigma)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    if sigma == 0.0 {
                        1.0
                    } else {
                        // Box-Muller.
                        let (u1, u2): (f32, f32) = (rng.random(), rng.random());
                        sigma
                            * (-2.0 * u1.max(1e-12).ln()).sqrt()
                            * (std::f32::consts::TAU * u2).cos()
                    }
                })
                .collect();
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, shape, bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(name, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap();
            (name.clone(), view)
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    dir
}

/// Teacher-forced logits `(n, vocab)` of `ids`.
fn logits(model: &Qwen2VL, ids: &[u32]) -> Vec<Vec<f32>> {
    let tokens = VisionTokens {
        image_pad: 2005,
        video_pad: 2006,
    };
    let positions = mrope_position_ids(ids, tokens, &[], &[], 2).unwrap();
    let mut cache = model.new_cache(ids.len()).unwrap();
    let h = model
        .prefill_hidden(ids, &positions, None, None, &mut cache, None)
        .unwrap();
    let l: Tensor = model.text().logits(&h.squeeze(0).unwrap()).unwrap();
    l.to_vec2::<f32>().unwrap()
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
    let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(x: &[f32]) -> usize {
    (0..x.len())
        .max_by(|&a, &b| x[a].total_cmp(&x[b]))
        .unwrap_or(0)
}

#[derive(Debug)]
struct Figures {
    max_abs: f64,
    mean_abs: f64,
    mean_kl: f64,
    top1: f64,
}

fn compare(reference: &[Vec<f32>], quant: &[Vec<f32>]) -> Figures {
    let (mut max_abs, mut sum_abs, mut count, mut kl, mut agree) = (0f64, 0f64, 0usize, 0f64, 0);
    for (r, q) in reference.iter().zip(quant) {
        for (&a, &b) in r.iter().zip(q) {
            let d = (a as f64 - b as f64).abs();
            max_abs = max_abs.max(d);
            sum_abs += d;
            count += 1;
        }
        let (lr, lq) = (log_softmax(r), log_softmax(q));
        kl += lr
            .iter()
            .zip(&lq)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>();
        agree += usize::from(argmax(r) == argmax(q));
    }
    let n = reference.len() as f64;
    Figures {
        max_abs,
        mean_abs: sum_abs / count as f64,
        mean_kl: kl / n,
        top1: agree as f64 / n,
    }
}

fn load(dir: &Path, quant: Option<QuantScheme>) -> Qwen2VL {
    Qwen2VL::load_quantized(dir, DType::F32, &Device::Cpu, None, quant, None)
        .unwrap()
        .0
}

/// bf16 compute's bounds on this model (see the measurement where they are checked).
const BF16_MAX_KL: f64 = 0.0002;
const BF16_MAX_ABS: f64 = 0.3;
const BF16_MAX_MEAN_ABS: f64 = 0.03;

#[test]
fn each_format_stays_within_its_bounds() {
    let dir = write_model();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let seqs: Vec<Vec<u32>> = (0..48)
        .map(|_| (0..64).map(|_| rng.random_range(0..2000u32)).collect())
        .collect();
    let f32_model = load(&dir, None);
    let reference: Vec<Vec<f32>> = seqs.iter().flat_map(|s| logits(&f32_model, s)).collect();
    drop(f32_model);
    let ids: Vec<u32> = seqs.concat();
    let (mut conf, mut copies) = (0f64, 0usize);
    for (i, r) in reference.iter().enumerate() {
        conf += log_softmax(r)[argmax(r)].exp();
        copies += usize::from(argmax(r) == ids[i] as usize);
    }
    eprintln!(
        "f32: mean top-1 probability {:.3}, top-1 = input token in {:.1}%",
        conf / reference.len() as f64,
        100.0 * copies as f64 / reference.len() as f64
    );
    // (format, top-1 agreement at least, mean KL at most)
    // Measured on this model (48 sequences, 3072 positions) with the quantizers that follow
    // ggml's (per-32 weighting of the Q4_K search, roundf ties for Q8_0): q8_0 99.2% / KL
    // 0.00049, q6_k 98.1% / 0.0039, q4_k_m 94.5% / 0.036, q4_k 93.6% / 0.054. q8_0 is held
    // to the 99% (about five flips of near-tied tokens to spare); the others leave
    // room for a few more flips.
    let bounds = [
        (QuantScheme::Q8_0, 0.99, 0.001),
        (QuantScheme::Q6K, 0.965, 0.006),
        (QuantScheme::Q4KM, 0.91, 0.05),
        (QuantScheme::Q4K, 0.90, 0.075),
    ];
    eprintln!("format   max|Δ|   mean|Δ|   mean KL   top-1");
    let mut failures = Vec::new();
    let mut kls = Vec::new();
    for (scheme, top1, kl) in bounds {
        let model = load(&dir, Some(scheme));
        let quant: Vec<Vec<f32>> = seqs.iter().flat_map(|s| logits(&model, s)).collect();
        let f = compare(&reference, &quant);
        eprintln!(
            "{:<8} {:>7.4} {:>9.5} {:>9.6} {:>6.1}%",
            scheme.name(),
            f.max_abs,
            f.mean_abs,
            f.mean_kl,
            100.0 * f.top1
        );
        kls.push(f.mean_kl);
        if f.top1 < top1 || f.mean_kl > kl || f.mean_abs == 0.0 {
            failures.push(format!(
                "{scheme}: {f:?} (bounds top-1 ≥ {top1}, KL ≤ {kl})"
            ));
        }
    }
    // bf16 compute (`--dtype bf16`: bf16 products with f32 sums, f32 activations; issue 14)
    // on the same model and sequences. Measured (AMX path / AVX512_BF16 path): top-1
    // 99.8% / 99.9%, KL 0.000036 both, max |Δ| 0.055 / 0.056, mean |Δ| 0.0074 both (below
    // q8_0 everywhere); held to the 99% top-1 and ~5x the rest.
    let bf16_model = Qwen2VL::load(&dir, DType::BF16, &Device::Cpu).unwrap().0;
    let bf16: Vec<Vec<f32>> = seqs.iter().flat_map(|s| logits(&bf16_model, s)).collect();
    drop(bf16_model);
    let f = compare(&reference, &bf16);
    eprintln!(
        "{:<8} {:>7.4} {:>9.5} {:>9.6} {:>6.1}%",
        "bf16",
        f.max_abs,
        f.mean_abs,
        f.mean_kl,
        100.0 * f.top1
    );
    if f.top1 < 0.99
        || f.mean_kl > BF16_MAX_KL
        || f.max_abs > BF16_MAX_ABS
        || f.mean_abs > BF16_MAX_MEAN_ABS
        || f.mean_abs == 0.0
    {
        failures.push(format!(
            "bf16: {f:?} (bounds top-1 ≥ 0.99, KL ≤ {BF16_MAX_KL}, max|Δ| ≤ {BF16_MAX_ABS}, mean|Δ| ≤ {BF16_MAX_MEAN_ABS})"
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{failures:#?}");
    // More bits, less divergence: q8_0 < q6_k < q4_k_m < q4_k.
    assert!(
        kls.windows(2).all(|w| w[0] < w[1]),
        "KL not ordered by bits: {kls:?}"
    );
}

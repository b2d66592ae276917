//! Milliseconds and GFLOP/s of attention on the Qwen2-VL-2B shapes: the blocked path
//! (`qwen2vl::nn::attention_blocked`: candle matmuls and a softmax pass over the score matrix)
//! next to the fused kernel (`qwen2vl::ops::attention`, each instruction set this CPU runs).
//!
//! ```text
//! cargo run --release -p qwen2vl --example attention_bench -- [THREADS] [REPS]
//! ```
//!
//! Shapes: one vision frame of a 640x480 image (16 heads, 1,564 patches, head dim 80, full
//! attention; queries and keys read as the tower holds them, `(len, heads, hd)`), a 416-token
//! prefill (2 kv heads x 6 query heads, head dim 128, causal) and one decode step after it.
//! FLOPs: `4·T·L·D` per query head for full attention, the visible part for causal.

use std::time::Instant;

use candle_core::{Device, Tensor};
use qwen2vl::ops::attention::{attention_f32, attention_keys, Isa, Keys, KvView, QView};

/// Best of `reps` calls, in milliseconds (after one warm-up call).
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

/// `q: (B, G, T, D)` and `k, v: (B, L, D)` tensors (views allowed) as kernel views.
fn with_views<R>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    f: impl FnOnce(&QView, &KvView, &KvView) -> R,
) -> R {
    use candle_core::{CpuStorage, Storage};
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (
        Storage::Cpu(CpuStorage::F32(qd)),
        Storage::Cpu(CpuStorage::F32(kd)),
        Storage::Cpu(CpuStorage::F32(vd)),
    ) = (&*qs, &*ks, &*vs)
    else {
        panic!("f32 CPU tensors expected");
    };
    let (qd4, kd3) = (q.dims(), k.dims());
    let (qst, kst, vst) = (ql.stride(), kl.stride(), vl.stride());
    let qv = QView {
        data: qd,
        start: ql.start_offset(),
        dims: [qd4[0], qd4[1], qd4[2], qd4[3]],
        strides: [qst[0], qst[1], qst[2]],
    };
    let kv = KvView {
        data: kd,
        start: kl.start_offset(),
        dims: [kd3[0], kd3[1], kd3[2]],
        strides: [kst[0], kst[1]],
    };
    let vv = KvView {
        data: vd,
        start: vl.start_offset(),
        dims: [kd3[0], kd3[1], kd3[2]],
        strides: [vst[0], vst[1]],
    };
    f(&qv, &kv, &vv)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads = std::env::args().nth(1).unwrap_or_else(|| "2".into());
    std::env::set_var("RAYON_NUM_THREADS", &threads);
    let reps: usize = match std::env::args().nth(2) {
        Some(r) => r.parse()?,
        None => 5,
    };
    // Third argument: only the shapes whose name contains it (vision, prefill, decode).
    let only = std::env::args().nth(3).unwrap_or_default();
    let dev = Device::Cpu;
    let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2, Isa::Portable]
        .into_iter()
        .filter(|i| i.available())
        .collect();
    println!("threads {threads}, best of {reps} calls");
    println!("{:<34} {:>10} {:>10}", "shape / path", "ms", "GFLOP/s");
    let line = |name: &str, ms: f64, flops: f64| {
        println!("{name:<34} {ms:>10.3} {:>10.1}", flops / ms / 1e6);
    };

    // What the cores do on a plain f32 GEMM in the same run (the machine may be shared).
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
    let ms = time(reps, || {
        a.matmul(&b).unwrap();
    });
    line(
        "reference: candle f32 GEMM 1024^3",
        ms,
        2.0 * (n * n * n) as f64,
    );

    if "vision".contains(&only) {
        vision(reps, &isas, &line)?;
    }
    if "prefill".contains(&only) || "decode".contains(&only) {
        text(reps, &isas, &line, &only)?;
    }
    Ok(())
}

type Line<'a> = &'a dyn Fn(&str, f64, f64);

fn vision(reps: usize, isas: &[Isa], line: Line) -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    // Vision: q, k, v as the tower holds them, (len, heads, hd), read as (heads, len, hd).
    let (len, heads, hd) = (1564, 16, 80);
    let q = Tensor::randn(0f32, 1.0, (len, heads, hd), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (len, heads, hd), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (len, heads, hd), &dev)?;
    let qs = q.transpose(0, 1)?.unsqueeze(1)?;
    let (ks, vs) = (k.transpose(0, 1)?, v.transpose(0, 1)?);
    let scale = 1.0 / (hd as f64).sqrt();
    let flops = 4.0 * (len * len * hd * heads) as f64;
    println!("vision frame: {heads} heads, T = L = {len}, D = {hd}, full");
    let ms = time(reps, || {
        // As the tower called it before: keys and values copied to (heads, len, hd).
        let (kc, vc) = (ks.contiguous().unwrap(), vs.contiguous().unwrap());
        qwen2vl::nn::attention_blocked(&qs, &kc, &vc, scale, None, qwen2vl::nn::MAX_SCORE_ELEMS)
            .unwrap();
    });
    line("  blocked (before)", ms, flops);
    for &isa in isas {
        let ms = with_views(&qs, &ks, &vs, |q, k, v| {
            time(reps, || {
                attention_f32(isa, q, k, v, scale as f32, None);
            })
        });
        line(&format!("  fused {isa:?}"), ms, flops);
    }
    let ms = time(reps, || {
        qwen2vl::nn::attention(&qs, &ks, &vs, scale, None).unwrap();
    });
    line("  nn::attention (fused, tensors)", ms, flops);
    // As the serving engine's vision pass runs it: the query rows in pieces of 125 (units of
    // ~1 GFLOP), the frame's keys packed once.
    let pieces: Vec<Tensor> = (0..len)
        .step_by(125)
        .map(|s| qs.narrow(2, s, 125.min(len - s)))
        .collect::<Result<_, _>>()?;
    let ms = time(reps, || {
        for p in &pieces {
            qwen2vl::nn::attention(p, &ks, &vs, scale, None).unwrap();
        }
    });
    line("  13 pieces, keys packed per piece", ms, flops);
    let ms = time(reps, || {
        let keys = Keys::pack(&ks, &vs).unwrap().expect("f32 CPU");
        for p in &pieces {
            attention_keys(p, &keys, scale, None).unwrap();
        }
    });
    line("  13 pieces, keys packed once", ms, flops);
    Ok(())
}

fn text(
    reps: usize,
    isas: &[Isa],
    line: Line,
    only: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;

    // Text prefill: 416 tokens, causal, 2 kv heads x 6 query heads, head dim 128, keys and
    // values in a cache of 1,024 rows.
    let (t, kv, group, hd, cap) = (416, 2, 6, 128, 1024);
    let q = Tensor::randn(0f32, 1.0, (kv, group, t, hd), &dev)?;
    let kc = Tensor::randn(0f32, 1.0, (kv, cap, hd), &dev)?;
    let vc = Tensor::randn(0f32, 1.0, (kv, cap, hd), &dev)?;
    let (k, v) = (kc.narrow(1, 0, t)?, vc.narrow(1, 0, t)?);
    let scale = 1.0 / (hd as f64).sqrt();
    // Visible pairs: t (t + 1) / 2 per query head.
    let flops = 4.0 * (t * (t + 1) / 2 * hd * kv * group) as f64;
    if "prefill".contains(only) {
        println!("prefill: {kv} kv heads x {group}, T = L = {t}, D = {hd}, causal");
        let ms = time(reps * 4, || {
            qwen2vl::nn::attention_blocked(
                &q,
                &k,
                &v,
                scale,
                Some(0),
                qwen2vl::nn::MAX_SCORE_ELEMS,
            )
            .unwrap();
        });
        line("  blocked (before)", ms, flops);
        for &isa in isas {
            let ms = with_views(&q, &k, &v, |q, k, v| {
                time(reps * 4, || {
                    attention_f32(isa, q, k, v, scale as f32, Some(0));
                })
            });
            line(&format!("  fused {isa:?}"), ms, flops);
        }
    }
    if !"decode".contains(only) {
        return Ok(());
    }

    // One decode step after the prompt: T = 1 at position 416.
    let q1 = Tensor::randn(0f32, 1.0, (kv, group, 1, hd), &dev)?;
    let (k, v) = (kc.narrow(1, 0, t + 1)?, vc.narrow(1, 0, t + 1)?);
    let flops = 4.0 * ((t + 1) * hd * kv * group) as f64;
    println!("decode: T = 1, L = {}, D = {hd}", t + 1);
    let ms = time(reps * 100, || {
        qwen2vl::nn::attention_blocked(&q1, &k, &v, scale, Some(t), qwen2vl::nn::MAX_SCORE_ELEMS)
            .unwrap();
    });
    line("  blocked (before)", ms, flops);
    for &isa in isas {
        let ms = with_views(&q1, &k, &v, |q, k, v| {
            time(reps * 100, || {
                attention_f32(isa, q, k, v, scale as f32, Some(t));
            })
        });
        line(&format!("  fused {isa:?}"), ms, flops);
    }
    Ok(())
}

//! GFLOP/s of the big float products of Qwen2-VL-2B: candle's f32 matmul next to our bf16
//! kernel (`qwen2vl::ops::gemm_bf16`, `vdpbf16ps` where the CPU has AVX512_BF16), on the
//! vision block's MLP shape (1564 patches of a 640x480 image, 1280 → 5120) and the prefill's
//! MLP shape (416 tokens, 1536 → 8960).
//!
//! ```text
//! cargo run --release -p qwen2vl --example gemm_bf16 -- [THREADS (2)] [PATH]
//! ```
//! PATH: `amx`, `avx512`, `avx2` or `portable` (default: the fastest this CPU has).

use std::time::Instant;

use candle_core::{Device, Module, Tensor};
use qwen2vl::ops::gemm_bf16::{Isa, PackedBf16};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads = std::env::args().nth(1).unwrap_or_else(|| "2".into());
    std::env::set_var("RAYON_NUM_THREADS", &threads);
    let isa = match std::env::args().nth(2) {
        None => Isa::detect(),
        Some(name) => Isa::all()
            .into_iter()
            .find(|i| i.name() == name && i.available())
            .ok_or(format!("path {name:?} unknown or not on this CPU"))?,
    };
    let dev = Device::Cpu;
    println!("threads {threads}, bf16 path {isa:?}");
    println!("shape                          f32 candle GFLOP/s   bf16 ours GFLOP/s   speed-up");
    // (name, m, k, n)
    let shapes = [
        ("vision mlp.fc1 1564x1280x5120", 1564, 1280, 5120),
        ("vision qkv     1564x1280x3840", 1564, 1280, 3840),
        ("prefill up     416x1536x8960", 416, 1536, 8960),
        ("prefill down   416x8960x1536", 416, 8960, 1536),
    ];
    for (name, m, k, n) in shapes {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let b = Tensor::randn(0f32, 0.02, n, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let lin = candle_nn::Linear::new(w.clone(), Some(b.clone()));
        let packed = PackedBf16::from_f32(&w.flatten_all()?.to_vec1::<f32>()?, n, k)?;
        let bias = b.to_vec1::<f32>()?;
        let flops = 2.0 * (m * n * k) as f64;
        let time = |f: &dyn Fn()| {
            f(); // warm-up
            let reps = 3;
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / reps as f64
        };
        // Alternate the two, three rounds, and keep each one's best: the machine is shared,
        // and interference only ever adds time.
        let (mut f32_s, mut bf16_s) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..3 {
            f32_s = f32_s.min(time(&|| {
                std::hint::black_box(lin.forward(&x).expect("candle matmul"));
            }));
            bf16_s = bf16_s.min(time(&|| {
                // As the model calls it: the f32 activations read out of a tensor.
                let xs = x.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("x");
                std::hint::black_box(packed.matmul_with(isa, &xs, m, Some(&bias)).expect("bf16"));
            }));
        }
        println!(
            "{name:<30} {:>16.1}   {:>17.1}   {:>7.2}x",
            flops / f32_s / 1e9,
            flops / bf16_s / 1e9,
            f32_s / bf16_s
        );
    }
    // Decode: a few rows, bound by reading the weight. The bf16 model used to run these on
    // the small-batch kernel (`ops::gemv`) with bf16 weight tensors; it now runs them here.
    println!("decode 1536x8960, ms per call   gemv bf16 weights   bf16 packed (ours)");
    let (k, n) = (1536, 8960);
    let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
    let wb = w.to_dtype(candle_core::DType::BF16)?;
    let packed = PackedBf16::from_f32(&w.flatten_all()?.to_vec1::<f32>()?, n, k)?;
    for m in [1usize, 4, 16] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let xb = x.to_dtype(candle_core::DType::BF16)?;
        let time = |f: &dyn Fn()| {
            f();
            let reps = 50;
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() * 1e3 / reps as f64
        };
        let (mut gemv, mut ours) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..3 {
            gemv = gemv.min(time(&|| {
                std::hint::black_box(
                    qwen2vl::ops::gemv::linear_up_to(&xb, &wb, None, usize::MAX)
                        .expect("gemv")
                        .expect("CPU bf16"),
                );
            }));
            ours = ours.min(time(&|| {
                let xs = x.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("x");
                std::hint::black_box(packed.matmul_with(isa, &xs, m, None).expect("bf16"));
            }));
        }
        println!("m = {m:<2}                           {gemv:>14.3}   {ours:>18.3}");
    }
    Ok(())
}

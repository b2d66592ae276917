//! GFLOP/s of the big float products of Qwen2-VL-2B in f32: candle's matmul on widened
//! weights next to our kernel on the 16-bit weights read in place
//! (`qwen2vl::ops::gemm_half`), on the vision block's shapes (1564 patches of a 640x480
//! image) and the prefill's MLP (416 tokens); and ms per decode call (a few rows).
//!
//! ```text
//! cargo run --release -p qwen2vl --example gemm_half -- [THREADS (2)] [PATH]
//! ```
//! PATH: `avx512`, `avx2` or `portable` (default: the fastest this CPU has).

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use qwen2vl::ops::gemm_half::{matmul_with, HalfKind, HalfMatrix, Isa};

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
    println!("threads {threads}, path {isa:?}");
    println!("shape                          candle f32 GFLOP/s   16-bit in place GFLOP/s   ratio");
    // (name, m, k, n)
    let shapes = [
        ("vision mlp.fc1 1564x1280x5120", 1564, 1280, 5120),
        ("vision mlp.fc2 1564x5120x1280", 1564, 5120, 1280),
        ("vision qkv     1564x1280x3840", 1564, 1280, 3840),
        ("merger 391x5120x5120", 391, 5120, 5120),
        ("prefill up     416x1536x8960", 416, 1536, 8960),
        ("prefill down   416x8960x1536", 416, 8960, 1536),
    ];
    let time = |f: &dyn Fn()| {
        f(); // warm-up
        let reps = 3;
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        t.elapsed().as_secs_f64() / reps as f64
    };
    for (name, m, k, n) in shapes {
        let w16 = Tensor::randn(0f32, 0.02, (n, k), &dev)?.to_dtype(DType::BF16)?;
        let w = w16.to_dtype(DType::F32)?;
        let b = Tensor::randn(0f32, 0.02, n, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let lin = candle_nn::Linear::new(w, Some(b.clone()));
        let bits = w16
            .flatten_all()?
            .to_vec1::<half::bf16>()?
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let hm = HalfMatrix::from_bits(HalfKind::Bf16, bits, n, k)?;
        let bias = b.to_vec1::<f32>()?;
        let flops = 2.0 * (m * n * k) as f64;
        // Alternate the two, three rounds, each one's best (interference only adds time).
        let (mut a, mut h) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..3 {
            a = a.min(time(&|| {
                std::hint::black_box(lin.forward(&x).expect("candle matmul"));
            }));
            h = h.min(time(&|| {
                let xs = x.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("x");
                let mut y = vec![0f32; m * n];
                matmul_with(isa, &hm, &xs, m, Some(&bias), &mut y);
                std::hint::black_box(y);
            }));
        }
        println!(
            "{name:<30} {:>18.1}   {:>23.1}   {:>5.2}x",
            flops / a / 1e9,
            flops / h / 1e9,
            a / h
        );
    }
    Ok(())
}

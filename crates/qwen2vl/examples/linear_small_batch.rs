//! Milliseconds per call of a linear layer on the Qwen2-VL-2B decode shapes, candle's matmul
//! next to our small-batch kernel (`qwen2vl::ops::gemv`), for m = 1..32 input rows; used to
//! choose `gemv::MAX_ROWS`.
//!
//! ```text
//! cargo run --release -p qwen2vl --example linear_small_batch -- [THREADS] [M,M,...]
//! ```

use std::time::Instant;

use candle_core::{Device, Module, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Some(t) = std::env::args().nth(1) {
        std::env::set_var("RAYON_NUM_THREADS", t);
    }
    // Second argument: the row counts to time, comma-separated.
    let rows: Vec<usize> = match std::env::args().nth(2) {
        Some(list) => list.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![1, 2, 4, 8, 12, 16, 24, 32],
    };
    let dev = Device::Cpu;
    // (name, in, out): MLP up, MLP down, attention q and k (v is k's shape), the tied LM head.
    let shapes = [
        ("mlp.up_proj", 1536, 8960),
        ("mlp.down_proj", 8960, 1536),
        ("self_attn.q_proj", 1536, 1536),
        ("self_attn.k_proj", 1536, 256),
        ("lm_head", 1536, 151936),
    ];
    println!("layer               m    candle ms     gemv ms   speed-up");
    for (name, k, n) in shapes {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let lin = candle_nn::Linear::new(w.clone(), None);
        // Enough calls to stream ~1 GB of weights per measurement.
        let reps = (1usize << 28) / (n * k) + 1;
        for &m in &rows {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let time = |f: &dyn Fn() -> Tensor| {
                f(); // warm-up
                let t = Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(f());
                }
                t.elapsed().as_secs_f64() * 1e3 / reps as f64
            };
            // Alternate the two, three rounds, and keep each one's best: the machine is shared,
            // and interference only ever adds time.
            let (mut candle, mut ours) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..3 {
                candle = candle.min(time(&|| lin.forward(&x).expect("candle matmul")));
                ours = ours.min(time(&|| {
                    qwen2vl::ops::gemv::linear_up_to(&x, &w, None, usize::MAX)
                        .expect("gemv")
                        .expect("f32 CPU")
                }));
            }
            println!(
                "{name:<18} {m:>2}   {candle:>10.2}  {ours:>10.2}   {:>7.2}x",
                candle / ours
            );
        }
    }
    Ok(())
}

//! The decode products of the Qwen2-VL-2B decoder with quantized weights, timed against this
//! machine's memory bandwidth (issue 12: "decode at the bandwidth limit").
//!
//! Builds every matrix a decode step reads (28 layers of q, k, v, o, gate, up, down, and the
//! 151936 x 1536 LM head) in each format from random weights, then runs decode steps (one
//! product per matrix, `m` rows) and prints the time per step, the bytes it read, the
//! bandwidth that implies, and the floor: the same bytes at the bandwidth a plain parallel
//! read reaches, measured in the same run. Also how long quantizing took (what `--quant`
//! adds to a load).
//!
//! ```sh
//! cargo run --release -p qwen2vl --example quant_decode -- [formats] [rows] [steps]
//! # e.g. quant_decode q8_0,q4_k,q6_k 1 8
//! ```

use std::time::Instant;

use qwen2vl::ops::quant::{matmul_group, QMatrix, QType, WeightBytes};
use rayon::prelude::*;

const HIDDEN: usize = 1536;
const INTER: usize = 8960;
const KV: usize = 256;
const LAYERS: usize = 28;
const VOCAB: usize = 151936;

/// This thread's CPU time in seconds: the kernels' compute rate is then the same whether or
/// not other processes share the cores (time spent descheduled is not counted).
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_THREAD_CPUTIME_ID exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut out = vec![0f32; len];
    out.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut s = (seed ^ (c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
            for v in chunk {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                *v = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04;
            }
        });
    out
}

/// Best of three parallel read-only sums over 2 GiB: bytes per second. The buffer is a
/// [`WeightBytes`], in the same (huge) pages as the weights, so the floor is what this
/// machine's memory gives a plain stream of the same kind.
fn read_bandwidth() -> f64 {
    let mut buf = WeightBytes::zeroed(2 << 30);
    buf.par_chunks_mut(1 << 20)
        .enumerate()
        .for_each(|(i, c)| c.fill(i as u8));
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let s: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                c.chunks_exact(8).fold(0u64, |a, w| {
                    a.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")))
                })
            })
            .reduce(|| 0, u64::wrapping_add);
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max(buf.len() as f64 / secs);
    }
    best
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let formats: Vec<QType> = args
        .get(1)
        .map_or("q8_0,q6_k,q4_k", String::as_str)
        .split(',')
        .map(|f| match f {
            "q8_0" => QType::Q8_0,
            "q4_k" => QType::Q4K,
            "q6_k" => QType::Q6K,
            other => panic!("unknown format {other}"),
        })
        .collect();
    let m: usize = args.get(2).map_or(1, |s| s.parse().expect("rows"));
    let steps: usize = args.get(3).map_or(8, |s| s.parse().expect("steps"));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "threads {}, rows {m}, load average {}",
        rayon::current_num_threads(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let bw = read_bandwidth();
    println!(
        "read bandwidth {:.1} GB/s (parallel sum over 2 GiB)",
        bw / 1e9
    );
    let layer_shapes = [
        (HIDDEN, HIDDEN),
        (KV, HIDDEN),
        (KV, HIDDEN),
        (HIDDEN, HIDDEN),
        (INTER, HIDDEN),
        (INTER, HIDDEN),
        (HIDDEN, INTER),
    ];
    for t in formats {
        let start = Instant::now();
        // One layer quantized from random weights, its bytes copied for the others (same
        // cost to read, a fraction of the time to build); the LM head on its own.
        let layer: Vec<QMatrix> = layer_shapes
            .iter()
            .enumerate()
            .map(|(i, &(n, k))| QMatrix::quantize(t, &values(n * k, i as u64), n, k).unwrap())
            .collect();
        let layer_secs = start.elapsed().as_secs_f64();
        let head = QMatrix::quantize(t, &values(VOCAB * HIDDEN, 99), VOCAB, HIDDEN).unwrap();
        let quant_secs = start.elapsed().as_secs_f64();
        let mut mats: Vec<QMatrix> = Vec::new();
        for _ in 0..LAYERS {
            for q in &layer {
                let (n, k) = q.dims();
                mats.push(QMatrix::from_bytes(t, n, k, &q.ggml_bytes()).unwrap());
            }
        }
        mats.push(head);
        let bytes: usize = mats.iter().map(|q| q.bytes().len()).sum();
        let params: usize = mats.iter().map(|q| q.dims().0 * q.dims().1).sum();
        let xs: Vec<Vec<f32>> = [HIDDEN, INTER].iter().map(|&k| values(m * k, 7)).collect();
        // As the engine runs them: q, k and v as one group, o, gate and up as one group, down;
        // then the LM head.
        // Seconds and bytes per part of a step (q/k/v, o, gate/up, down, LM head), summed
        // over the timed steps: where the time goes, and which products stream slower.
        let parts = std::sync::Mutex::new([(0f64, 0usize); 5]);
        let step = |mats: &[QMatrix]| {
            let group = |part: usize, ms: &[QMatrix], x: &[f32]| {
                let products: Vec<_> = ms.iter().map(|q| (q, None)).collect();
                let t0 = Instant::now();
                std::hint::black_box(matmul_group(&products, x, m).unwrap());
                let mut p = parts.lock().unwrap();
                p[part].0 += t0.elapsed().as_secs_f64();
                p[part].1 += ms.iter().map(|q| q.bytes().len()).sum::<usize>();
            };
            for layer in mats[..LAYERS * 7].chunks_exact(7) {
                group(0, &layer[0..3], &xs[0]);
                group(1, &layer[3..4], &xs[0]);
                group(2, &layer[4..6], &xs[0]);
                group(3, &layer[6..7], &xs[1]);
            }
            group(4, &mats[LAYERS * 7..], &xs[0]);
        };
        // The LM head alone, per backend: the kernel's own streaming rate.
        let head = mats.last().expect("the LM head");
        for backend in qwen2vl::ops::quant::Backend::available() {
            let x = &xs[0];
            head.matmul_with(backend, x, m, None).unwrap();
            let t0 = Instant::now();
            for _ in 0..3 {
                std::hint::black_box(head.matmul_with(backend, x, m, None).unwrap());
            }
            let secs = t0.elapsed().as_secs_f64() / 3.0;
            println!(
                "  {t} LM head alone, {backend:?}: {:.1} ms, {:.1} GB/s",
                secs * 1e3,
                head.bytes().len() as f64 / secs / 1e9
            );
        }
        // One weight row that stays in L1, dotted with the `m` activation rows again and
        // again on this thread: the kernel's compute rate with no memory traffic and no call
        // overhead.
        // 16 rows (one packed group) of 1536: 26 KB, in L1; `L1_ROWS=15` times the rows
        // layout (a matrix of fewer than 16 rows is not packed).
        let n_small: usize = std::env::var("L1_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16);
        let small = QMatrix::quantize(t, &values(n_small * HIDDEN, 5), n_small, HIDDEN).unwrap();
        let acts = qwen2vl::ops::quant::QActs::quantize(t, &xs[0][..m * HIDDEN], m, HIDDEN);
        let rows: Vec<_> = (0..m).map(|r| acts.row(r)).collect();
        let mut out = vec![0f32; n_small * m];
        for backend in qwen2vl::ops::quant::Backend::available() {
            let reps = 400_000 / (n_small * m);
            let t0 = thread_cpu_seconds();
            for _ in 0..reps {
                std::hint::black_box(&small).rows_into(backend, 0..n_small, &rows, &mut out);
                std::hint::black_box(&out);
            }
            let secs = (thread_cpu_seconds() - t0) / (n_small * reps) as f64;
            println!(
                "  {t} in L1, one thread, {backend:?}: {:.1} GB/s of weights ({:.1} ns per row of {HIDDEN} and {m} activation rows)",
                small.bytes().len() as f64 / n_small as f64 / secs / 1e9,
                secs * 1e9
            );
        }
        qwen2vl::ops::pool::install(|| step(&mats)); // warm-up
        *parts.lock().unwrap() = Default::default();
        let mut times = Vec::new();
        for _ in 0..steps {
            let t0 = Instant::now();
            qwen2vl::ops::pool::install(|| step(&mats));
            times.push(t0.elapsed().as_secs_f64());
        }
        let per_part: Vec<String> = ["q/k/v", "o", "gate/up", "down", "LM head"]
            .iter()
            .zip(parts.lock().unwrap().iter())
            .map(|(name, &(secs, b))| {
                format!(
                    "{name} {:.1} ms {:.1} GB/s",
                    secs * 1e3 / steps as f64,
                    b as f64 / secs / 1e9
                )
            })
            .collect();
        println!("  {t} per step: {}", per_part.join(", "));
        times.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        let floor = bytes as f64 / bw;
        println!(
            "{t:<5} {:.2} GB ({:.2} bits/weight): step {:.1} ms (min {:.1}), {:.1} GB/s, floor {:.1} ms → {:.0}% of the floor; {:.1} steps/s; quantize {:.2} s/layer-set, {:.1} s in all ({:.0} M weights/s)",
            bytes as f64 / 1e9,
            bytes as f64 * 8.0 / params as f64,
            med * 1e3,
            times[0] * 1e3,
            bytes as f64 / med / 1e9,
            floor * 1e3,
            100.0 * floor / med,
            1.0 / med,
            layer_secs,
            quant_secs,
            (layer.iter().map(|q| q.dims().0 * q.dims().1).sum::<usize>() + VOCAB * HIDDEN) as f64
                / quant_secs
                / 1e6,
        );
    }
}

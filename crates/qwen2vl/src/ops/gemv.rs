//! Small-batch matrix × vector products for decode: `y = x Wᵀ + b` for a few rows of `x`.
//!
//! - `x: (m, k)` f32, row-major, `m` small (one row per running sequence in a decode step);
//! - `W: (n, k)` row-major (the checkpoint's `(out, in)`), f32, bf16 or f16;
//! - `b: (n,)` optional, same element type as `W`;
//! - `y: (m, n)`.
//!
//! Why: a decode step reads every weight once, so it is bound by memory bandwidth. candle's
//! CPU gemm runs a one-row product as a fast gemv but two to sixteen rows through its packed
//! general kernel, 3-4x slower per call, so batching sequences barely paid. Here each tile of
//! weight rows is streamed from memory once and dotted with all `m` inputs while it sits in
//! L1/L2; output rows are split across the rayon pool candle uses (sized by
//! `RAYON_NUM_THREADS`, which `--threads` sets).
//!
//! Determinism: every output element is computed by the same sequence of operations whatever
//! `m` is and wherever its row sits in the batch (see `avx2::tile` for the sequence: four
//! eight-lane accumulators, a fixed reduction, the leftovers in order, then the bias; the
//! portable path rounds each product before adding it, the AVX2 path fuses them). So a
//! sequence decoded alone and in a batch gets bit-identical logits (on one machine; the two
//! paths round differently from each other).
//!
//! [`gemv_plain`] is the oracle: the same product in f64.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use half::{bf16, f16};

use super::SyncPtr;
use crate::error::Result;

/// Most input rows (`x` flattened to `(m, k)`) for which [`linear`] runs [`gemv`]; above it
/// candle's packed gemm, which is compute-efficient for prefill and the vision tower, wins.
/// Covers a full decode batch of the engine (see docs/benchmarks.md for the measurement).
pub const MAX_ROWS: usize = 16;

/// False when the environment sets `QWEN2VL_GEMV=0`: every product then takes candle's
/// matmul (for before/after comparisons with one binary). Read once.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("QWEN2VL_GEMV").map_or(true, |v| v != "0"))
}

/// `x (..., k) · Wᵀ + b` → `(..., n)` through [`gemv`], or `Ok(None)` when it does not apply
/// and the caller should use candle's matmul: not on the CPU, `W` not f32/bf16/f16 or not
/// contiguous, `x` of another dtype or last dimension, or more than [`MAX_ROWS`] rows.
///
/// `W: (n, k)`, `b: (n,)`. `x` may be non-contiguous (it is copied). For 16-bit types `x` is
/// widened to f32, the product and bias are accumulated in f32 and the result rounded once.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Option<Tensor>> {
    linear_up_to(x, w, b, MAX_ROWS)
}

/// [`linear`] with another row limit (the benchmark that chose [`MAX_ROWS`] runs past it).
pub fn linear_up_to(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    max_rows: usize,
) -> Result<Option<Tensor>> {
    let dtype = w.dtype();
    if !enabled()
        || !x.device().is_cpu()
        || !matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        || x.dtype() != dtype
        || b.is_some_and(|b| b.dtype() != dtype)
    {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    let Some(&kx) = x.dims().last() else {
        return Ok(None);
    };
    if kx != k || k == 0 || b.is_some_and(|b| b.dims() != [n]) {
        return Ok(None);
    }
    let m = x.elem_count() / k;
    if m == 0 || m > max_rows {
        return Ok(None);
    }
    let (Some((w0, w1)), Some(bias_range)) = (
        w.layout().contiguous_offsets(),
        match b {
            Some(b) => b.layout().contiguous_offsets().map(Some),
            None => Some(None),
        },
    ) else {
        return Ok(None);
    };
    let xf = x.to_dtype(DType::F32)?.contiguous()?;
    let mut y = vec![0f32; m * n];
    {
        let (xs, xl) = xf.storage_and_layout();
        let (ws, _) = w.storage_and_layout();
        let bs = b.map(|b| b.storage_and_layout().0);
        let (Storage::Cpu(CpuStorage::F32(xv)), Storage::Cpu(wc)) = (&*xs, &*ws) else {
            return Ok(None);
        };
        let xv = &xv[xl.start_offset()..xl.start_offset() + m * k];
        let bc = match &bs {
            Some(s) => match &**s {
                Storage::Cpu(c) => Some(c),
                _ => return Ok(None),
            },
            None => None,
        };
        let br = bias_range.unwrap_or((0, 0));
        match (wc, bc) {
            (CpuStorage::F32(wv), None) => gemv(xv, m, k, &wv[w0..w1], n, None, &mut y),
            (CpuStorage::F32(wv), Some(CpuStorage::F32(bv))) => {
                gemv(xv, m, k, &wv[w0..w1], n, Some(&bv[br.0..br.1]), &mut y)
            }
            (CpuStorage::BF16(wv), None) => gemv(xv, m, k, &wv[w0..w1], n, None, &mut y),
            (CpuStorage::BF16(wv), Some(CpuStorage::BF16(bv))) => {
                gemv(xv, m, k, &wv[w0..w1], n, Some(&bv[br.0..br.1]), &mut y)
            }
            (CpuStorage::F16(wv), None) => gemv(xv, m, k, &wv[w0..w1], n, None, &mut y),
            (CpuStorage::F16(wv), Some(CpuStorage::F16(bv))) => {
                gemv(xv, m, k, &wv[w0..w1], n, Some(&bv[br.0..br.1]), &mut y)
            }
            _ => return Ok(None),
        }
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = n;
    let y = Tensor::from_vec(y, dims, x.device())?;
    Ok(Some(if dtype == DType::F32 {
        y
    } else {
        y.to_dtype(dtype)?
    }))
}

/// Lanes per accumulator (one AVX2 register of f32).
pub const LANES: usize = 8;

/// A weight element: f32, or a 16-bit float widened to f32 as it is loaded.
pub trait WeightElem: Copy + Send + Sync + 'static {
    /// The value as f32 (exact for every type here).
    fn widen(self) -> f32;
    /// `f32` → `Self`, rounding to nearest even (identity for f32).
    fn narrow(v: f32) -> Self;
    /// Eight consecutive elements widened to f32.
    ///
    /// # Safety
    /// `p..p+8` must be readable, and the CPU must support AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        v
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // bf16 is the top half of an f32: zero-extend each u16 to 32 bits, shift left 16.
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

impl WeightElem for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn narrow(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// Which inner loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `std::arch` AVX2 + FMA (+ F16C for 16-bit weights); chosen when the CPU has them.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Plain Rust on `[f32; 8]` lanes, auto-vectorised for the build's target.
    Portable,
}

impl Backend {
    /// The fastest backend this CPU runs (detected once by `std`, cached).
    pub fn detect() -> Backend {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Backend::Avx2;
        }
        Backend::Portable
    }
}

/// Below this many weight elements the product runs on the calling thread (a rayon hand-off
/// costs a few microseconds; 32k elements take about that long to stream).
const MIN_PARALLEL_ELEMS: usize = 1 << 15;
/// Smallest share of the weights one task streams (elements), so each task amortises its
/// scheduling and its start-up misses.
const MIN_TASK_ELEMS: usize = 1 << 14;

/// `y (m, n) = x (m, k) · Wᵀ + b` with the fastest [`Backend`]; see the module docs.
///
/// Panics when a slice is shorter than its stated shape (an internal invariant; callers
/// check shapes).
pub fn gemv<W: WeightElem>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    n: usize,
    bias: Option<&[W]>,
    y: &mut [f32],
) {
    gemv_with(Backend::detect(), x, m, k, w, n, bias, y)
}

/// [`gemv`] with a chosen backend (tests run both).
#[allow(clippy::too_many_arguments)]
pub fn gemv_with<W: WeightElem>(
    backend: Backend,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    n: usize,
    bias: Option<&[W]>,
    y: &mut [f32],
) {
    assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= m * n);
    assert!(bias.is_none_or(|b| b.len() >= n));
    if m == 0 || n == 0 {
        return;
    }
    let p = Problem {
        x,
        m,
        k,
        w,
        n,
        bias,
        y: SyncPtr(y.as_mut_ptr()),
        backend,
    };
    let threads = rayon::current_num_threads();
    if threads <= 1 || n * k < MIN_PARALLEL_ELEMS {
        p.columns(0, n);
        return;
    }
    // Tasks that shrink as the rows run out (the rows left ÷ 2 threads, at least
    // MIN_TASK_ELEMS of weights), claimed in order: the thread that finishes first waits for
    // the other only a short task's time (the same "guided" split as `ops::quant`'s).
    let min_rows = MIN_TASK_ELEMS.div_ceil(k.max(1));
    let mut bounds = vec![0];
    let mut j0 = 0;
    while j0 < n {
        j0 = (j0 + (n - j0).div_ceil(2 * threads).max(min_rows)).min(n);
        bounds.push(j0);
    }
    crate::ops::team::for_each(bounds.len() - 1, |t| p.columns(bounds[t], bounds[t + 1]));
}

/// The plain oracle: `y (m, n) = x (m, k) · Wᵀ + b` accumulated in f64.
pub fn gemv_plain<W: WeightElem>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    n: usize,
    bias: Option<&[W]>,
) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let xi = &x[i * k..(i + 1) * k];
            let wj = &w[j * k..(j + 1) * k];
            let dot: f64 = xi
                .iter()
                .zip(wj)
                .map(|(&a, &b)| a as f64 * b.widen() as f64)
                .sum();
            y[i * n + j] = dot + bias.map_or(0.0, |b| b[j].widen() as f64);
        }
    }
    y
}

struct Problem<'a, W> {
    x: &'a [f32],
    m: usize,
    k: usize,
    w: &'a [W],
    n: usize,
    bias: Option<&'a [W]>,
    y: SyncPtr,
    backend: Backend,
}

impl<W: WeightElem> Problem<'_, W> {
    /// Output columns `j0..j1` for all `m` rows, in blocks of weight rows that fit in L2.
    ///
    /// Within a block, each group of [`MAX_MR`] inputs (small enough for L1) is dotted with
    /// every row of the block in turn. The first group streams the block from memory in order
    /// (one sequential stream, which the hardware prefetcher follows best); later groups find
    /// it in L2. So weights cross the memory bus once and each input is re-read from cache
    /// once per block, not once per weight row.
    fn columns(&self, j0: usize, j1: usize) {
        let block = (BLOCK_BYTES / (self.k * std::mem::size_of::<W>()).max(1)).max(1);
        let mut jb = j0;
        while jb < j1 {
            let je = (jb + block).min(j1);
            let mut i = 0;
            while i < self.m {
                for j in jb..je {
                    match self.m - i {
                        1 => self.tile::<1>(i, j),
                        _ => self.tile::<MAX_MR>(i, j),
                    }
                }
                i += MAX_MR;
            }
            jb = je;
        }
    }

    /// Inputs `i..i+MR` · weight row `j`, written to `y` with the bias.
    fn tile<const MR: usize>(&self, i: usize, j: usize) {
        let k = self.k;
        let xs: [&[f32]; MR] = std::array::from_fn(|a| &self.x[(i + a) * k..(i + a + 1) * k]);
        let w = &self.w[j * k..(j + 1) * k];
        let out = match self.backend {
            // SAFETY: `Backend::Avx2` comes from `detect`, which checked the CPU (tests only
            // pass what `detect` returned).
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => unsafe { avx2::tile::<W, MR>(&xs, w) },
            Backend::Portable => portable::tile::<W, MR>(&xs, w),
        };
        let b = self.bias.map(|b| b[j].widen());
        for (a, &v) in out.iter().enumerate() {
            let v = match b {
                Some(b) => v + b,
                None => v,
            };
            // SAFETY: `(i + a, j)` is inside `y (m, n)` (checked at entry), and only the task
            // owning column `j` writes it.
            unsafe { *self.y.0.add((i + a) * self.n + j) = v };
        }
    }
}

/// Weights per block of rows in [`Problem::columns`]: well inside a core's L2 (1-2 MiB on
/// current x86 server parts) next to the inputs.
const BLOCK_BYTES: usize = 96 << 10;

/// Most input rows one tile dots with a weight row: `MAX_MR × ACCS` accumulators (8 of the 16
/// AVX2 registers). Measured on the 2B shapes (examples/linear_small_batch.rs): tiles of three
/// rows (12 accumulators) ran slower than pairs, e.g. the LM head for 8 rows took 93 ms in
/// threes and 64 ms in pairs.
const MAX_MR: usize = 2;

/// Accumulators per output: enough independent FMA chains to keep a single input row (decode
/// with one sequence) streaming weights at memory speed.
const ACCS: usize = 4;

/// Elements one step of the main loop consumes per row.
const STEP: usize = LANES * ACCS;

/// The fixed order in which the eight lanes are summed (shared by every backend).
#[inline(always)]
fn reduce_lanes(a: [f32; LANES]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// Plain Rust, the same sequence of roundings as [`avx2`] except that each product is
/// rounded before it is added (no fused multiply-add).
mod portable {
    use super::{reduce_lanes, WeightElem, ACCS, LANES, STEP};

    #[inline(always)]
    fn fma8<W: WeightElem>(acc: &mut [f32; LANES], x: &[f32], w: &[W]) {
        for l in 0..LANES {
            acc[l] += x[l] * w[l].widen();
        }
    }

    #[inline(always)]
    pub(super) fn tile<W: WeightElem, const MR: usize>(xs: &[&[f32]; MR], w: &[W]) -> [f32; MR] {
        let k = w.len();
        let (k32, k8) = (k / STEP * STEP, k / LANES * LANES);
        let mut acc = [[[0f32; LANES]; ACCS]; MR];
        for c in (0..k32).step_by(STEP) {
            for (a, x) in xs.iter().enumerate() {
                for (q, acc) in acc[a].iter_mut().enumerate() {
                    let o = c + q * LANES;
                    fma8(acc, &x[o..o + LANES], &w[o..o + LANES]);
                }
            }
        }
        let mut out = [0f32; MR];
        for (a, x) in xs.iter().enumerate() {
            let [a0, a1, a2, a3] = acc[a];
            let mut s: [f32; LANES] = std::array::from_fn(|l| (a0[l] + a1[l]) + (a2[l] + a3[l]));
            for c in (k32..k8).step_by(LANES) {
                fma8(&mut s, &x[c..c + LANES], &w[c..c + LANES]);
            }
            let mut v = reduce_lanes(s);
            for t in k8..k {
                v += x[t] * w[t].widen();
            }
            out[a] = v;
        }
        out
    }
}

/// How far ahead of the weights being read the AVX2 path asks for them into L1 (bytes;
/// `QWEN2VL_GEMV_PREFETCH` overrides it, 0 = none).
#[cfg(target_arch = "x86_64")]
fn prefetch_ahead() -> usize {
    static A: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *A.get_or_init(|| env_bytes("QWEN2VL_GEMV_PREFETCH", 1024))
}

/// How far ahead it also asks for them into L2 only (`prefetcht1`; bytes,
/// `QWEN2VL_GEMV_PREFETCH_L2` overrides it, 0 = none). Measured on the 2B's f16 GGUF decode
/// (`bench --no-image --runs 3`, 2 threads, twice each, 22:50 UTC 2026-12-07): L1 at 2048 and
/// nothing into L2 (before) 6.7–6.9 tok/s; L1 1024 + L2 4096 7.9–8.3; L2 at 6–8 KB 7.6–8.5;
/// L2 at 3 KB 7.7–8.0, at 2 KB 6.8–7.5. The hardware prefetchers alone leave each core
/// waiting for misses between its short bursts of arithmetic; a miss asked for 4 KB early
/// has arrived by the time the arithmetic gets there.
#[cfg(target_arch = "x86_64")]
fn prefetch_l2() -> usize {
    static A: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *A.get_or_init(|| env_bytes("QWEN2VL_GEMV_PREFETCH_L2", 4096))
}

/// A byte count from the environment, or `default` when unset or not a number.
#[cfg(target_arch = "x86_64")]
fn env_bytes(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// AVX2 + FMA: four `__m256` accumulators per output, products fused into them.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{prefetch_ahead, prefetch_l2, reduce_lanes, WeightElem, ACCS, LANES, STEP};
    use std::arch::x86_64::*;

    /// Per output `a`: lane `l` of accumulator `q` takes the products `t = c + 8q + l` for
    /// every `c` multiple of 32 below `k32`; the four are summed `(0 + 1) + (2 + 3)`; the
    /// products `k32..k8` are fused into that sum eight at a time; its lanes are reduced by
    /// [`reduce_lanes`]; the last `k mod 8` products are added one by one.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    // Index loops keep the register tile `acc[a][q]` explicit.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile<W: WeightElem, const MR: usize>(
        xs: &[&[f32]; MR],
        w: &[W],
    ) -> [f32; MR] {
        let k = w.len();
        for x in xs {
            assert!(x.len() >= k);
        }
        let (k32, k8) = (k / STEP * STEP, k / LANES * LANES);
        let xp: [*const f32; MR] = std::array::from_fn(|a| xs[a].as_ptr());
        let wp = w.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); ACCS]; MR];
        let mut c = 0;
        let step_bytes = STEP * std::mem::size_of::<W>();
        let ahead = prefetch_ahead();
        let ahead2 = prefetch_l2();
        while c < k32 {
            // Ask for the weights `ahead` bytes on into L1 and `ahead2` into L2 (past this
            // row: the next rows of the block, which are contiguous); a prefetch never
            // faults, so `wrapping_add`.
            let here = wp.add(c) as *const i8;
            let mut off = 0;
            while off < step_bytes {
                if ahead > 0 {
                    _mm_prefetch::<_MM_HINT_T0>(here.wrapping_add(ahead + off));
                }
                if ahead2 > 0 {
                    _mm_prefetch::<_MM_HINT_T1>(here.wrapping_add(ahead2 + off));
                }
                off += 64;
            }
            // c + 32 <= k32 <= k: every load below is inside its slice.
            for q in 0..ACCS {
                let wv = W::load8(wp.add(c + q * LANES));
                for a in 0..MR {
                    let xv = _mm256_loadu_ps(xp[a].add(c + q * LANES));
                    acc[a][q] = _mm256_fmadd_ps(xv, wv, acc[a][q]);
                }
            }
            c += STEP;
        }
        let mut out = [0f32; MR];
        for a in 0..MR {
            let [a0, a1, a2, a3] = acc[a];
            let mut s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            let mut c = k32;
            while c < k8 {
                let wv = W::load8(wp.add(c));
                s = _mm256_fmadd_ps(_mm256_loadu_ps(xp[a].add(c)), wv, s);
                c += LANES;
            }
            let mut lanes = [0f32; LANES];
            _mm256_storeu_ps(lanes.as_mut_ptr(), s);
            let mut v = reduce_lanes(lanes);
            for t in k8..k {
                v += xs[a][t] * w[t].widen();
            }
            out[a] = v;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn backends() -> Vec<Backend> {
        let mut b = vec![Backend::Portable];
        if Backend::detect() != Backend::Portable {
            b.push(Backend::detect());
        }
        b
    }

    fn random(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Checks `y` against the f64 oracle with a forward-error bound.
    ///
    /// Each output is a sum of `k` products plus a bias. A product passes through at most
    /// `k / 32` additions in its accumulator chain, 2 combining the four accumulators, 3 for
    /// the leftover groups of eight, 3 reducing the lanes, 7 for the last `k mod 8` products
    /// and 1 for the bias, plus its own rounding (portable path): at most `k / 32 + 17`
    /// roundings. With unit roundoff `u = 2^-24`, the standard bound for recursive summation
    /// gives `|y - exact| <= (k / 32 + 17) · u · (Σ|x_t w_t| + |b|)` (first order; the
    /// second-order term is negligible at these sizes).
    fn check<W: WeightElem>(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[W],
        n: usize,
        bias: Option<&[W]>,
        y: &[f32],
    ) {
        let exact = gemv_plain(x, m, k, w, n, bias);
        let u = f32::EPSILON as f64 / 2.0;
        for i in 0..m {
            for j in 0..n {
                let mag: f64 = (0..k)
                    .map(|t| (x[i * k + t] as f64 * w[j * k + t].widen() as f64).abs())
                    .sum::<f64>()
                    + bias.map_or(0.0, |b| (b[j].widen() as f64).abs());
                let tol = (k / 32 + 17) as f64 * u * mag;
                let err = (y[i * n + j] as f64 - exact[i * n + j]).abs();
                assert!(
                    err <= tol,
                    "m={m} k={k} n={n} ({i},{j}): {} vs {} (err {err:e} > tol {tol:e})",
                    y[i * n + j],
                    exact[i * n + j]
                );
            }
        }
    }

    #[test]
    fn matches_f64_oracle_on_odd_sizes() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for backend in backends() {
            for &(k, n) in &[
                (1, 1),
                (7, 3),
                (8, 5),
                (13, 9),
                (33, 17),
                (100, 70),
                (517, 131),
            ] {
                for m in 1..=17 {
                    let x = random(&mut rng, m * k);
                    let w = random(&mut rng, n * k);
                    let b = random(&mut rng, n);
                    for bias in [None, Some(&b[..])] {
                        let mut y = vec![f32::NAN; m * n];
                        gemv_with(backend, &x, m, k, &w, n, bias, &mut y);
                        check(&x, m, k, &w, n, bias, &y);
                    }
                }
            }
        }
    }

    #[test]
    fn matches_f64_oracle_in_parallel_and_for_16_bit_weights() {
        // Big enough to be split across the pool (n·k above MIN_PARALLEL_ELEMS).
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (k, n) = (300, 389);
        for backend in backends() {
            for m in [1, 2, 5, 16] {
                let x = random(&mut rng, m * k);
                let w = random(&mut rng, n * k);
                let b = random(&mut rng, n);
                let mut y = vec![f32::NAN; m * n];
                gemv_with(backend, &x, m, k, &w, n, Some(&b), &mut y);
                check(&x, m, k, &w, n, Some(&b), &y);

                let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                let bb: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
                gemv_with(backend, &x, m, k, &wb, n, Some(&bb), &mut y);
                check(&x, m, k, &wb, n, Some(&bb), &y);

                let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                gemv_with(backend, &x, m, k, &wh, n, None, &mut y);
                check(&x, m, k, &wh, n, None, &y);
            }
        }
    }

    #[test]
    fn a_row_is_bit_identical_whatever_the_batch() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (k, n) = (405, 203);
        let w = random(&mut rng, n * k);
        let b = random(&mut rng, n);
        let x = random(&mut rng, 17 * k);
        for backend in backends() {
            let mut alone = vec![0f32; 17 * n];
            for i in 0..17 {
                gemv_with(
                    backend,
                    &x[i * k..(i + 1) * k],
                    1,
                    k,
                    &w,
                    n,
                    Some(&b),
                    &mut alone[i * n..(i + 1) * n],
                );
            }
            for m in 2..=17 {
                // Rows 17-m..17 of x, so every row sits at several positions across the m's.
                let first = 17 - m;
                let mut y = vec![0f32; m * n];
                gemv_with(backend, &x[first * k..], m, k, &w, n, Some(&b), &mut y);
                for (a, row) in y.chunks(n).enumerate() {
                    let want = &alone[(first + a) * n..(first + a + 1) * n];
                    let same = row
                        .iter()
                        .zip(want)
                        .all(|(p, q)| p.to_bits() == q.to_bits());
                    assert!(
                        same,
                        "{backend:?}: row {} differs in a batch of {m}",
                        first + a
                    );
                }
            }
        }
    }

    #[test]
    fn linear_handles_shapes_layouts_and_falls_back() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (37, 21), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 37, &dev).unwrap();
        let reference = candle_nn::Linear::new(w.clone(), Some(b.clone()));
        let close = |x: &Tensor| {
            let got = linear(x, &w, Some(&b))
                .unwrap()
                .expect("small f32 x takes gemv");
            let want = candle_core::Module::forward(&reference, x).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(crate::ops::max_diff(&got, &want) < 1e-4);
        };
        // Leading dims, and a non-contiguous x (a transposed view).
        close(&Tensor::randn(0f32, 1.0, (2, 3, 21), &dev).unwrap());
        close(
            &Tensor::randn(0f32, 1.0, 21, &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        );
        let xt = Tensor::randn(0f32, 1.0, (21, 5), &dev)
            .unwrap()
            .t()
            .unwrap();
        assert!(!xt.is_contiguous());
        close(&xt);
        // Too many rows, or f64: candle's path.
        let big = Tensor::randn(0f32, 1.0, (MAX_ROWS + 1, 21), &dev).unwrap();
        assert!(linear(&big, &w, Some(&b)).unwrap().is_none());
        let x64 = Tensor::randn(0f64, 1.0, (2, 21), &dev).unwrap();
        let w64 = w.to_dtype(DType::F64).unwrap();
        assert!(linear(&x64, &w64, None).unwrap().is_none());
        // bf16 in, bf16 out, close to the f32 product of the same rounded values.
        let xb = Tensor::randn(0f32, 1.0, (3, 21), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let wb = w.to_dtype(DType::BF16).unwrap();
        let got = linear(&xb, &wb, None).unwrap().unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let want = xb
            .to_dtype(DType::F32)
            .unwrap()
            .matmul(&wb.to_dtype(DType::F32).unwrap().t().unwrap())
            .unwrap();
        let got = got.to_dtype(DType::F32).unwrap();
        // One bf16 rounding of values of magnitude <~ 20: 2^-8 relative.
        assert!(crate::ops::max_diff(&got, &want) < 0.1);
    }
}

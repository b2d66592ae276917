//! Quantized weights and their products: `y (m, n) = x (m, k) · Wᵀ + b` with `W` stored in
//! ggml's Q8_0, Q4_K or Q6_K blocks ([`format`]).
//!
//! Why: decoding reads every weight once per token, so its speed is memory bandwidth ÷ bytes
//! per token. Q8_0 halves the bytes of f16, Q4_K roughly quarters them.
//!
//! How: the activation rows are quantized once per product to 8 bits ([`act::QActs`], the
//! granularity of the weight format), then each weight row is dotted with every activation
//! row in integer arithmetic ([`kernels`]: AVX2 or portable, picked at run time), its blocks'
//! scales applied in f32. Output columns are split across the rayon pool (the one candle and
//! [`crate::ops::gemv`] use), so the weights are streamed once per product whatever `m` is,
//! and each output element is computed by the same code wherever its row sits in a batch: a
//! sequence decoded alone or in a batch gets bit-identical logits.
//!
//! Oracle: `tests` compare every backend with the f64 dot product of the dequantized weight
//! and activation rows.

pub mod act;
pub mod bytes;
pub mod format;
pub mod kernels;
pub mod packed;
pub mod plan;

use rayon::prelude::*;

use crate::error::{Error, Result};
pub use act::QActs;
pub use bytes::WeightBytes;
pub use format::QType;
pub use kernels::Backend;
use packed::ROWS;

/// A quantized `(n, k)` weight matrix: `n` rows of `k / block_len` blocks each.
///
/// Rows are kept in groups of 16 ([`packed`]: one instruction per 16 output rows) up to the
/// last multiple of 16 — Q8_0 always, Q4_K and Q6_K where the CPU has AVX-512 VNNI — and in
/// ggml's layout, one row after another, otherwise. [`QMatrix::ggml_bytes`] gives ggml's
/// layout back.
#[derive(Clone)]
pub struct QMatrix {
    t: QType,
    n: usize,
    k: usize,
    data: WeightBytes,
    /// Rows `0..packed` are in [`packed`] groups (a multiple of 16).
    packed: usize,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({}, {}x{})", self.t, self.n, self.k)
    }
}

/// Below this many weight bytes a product runs on the calling thread.
const MIN_PARALLEL_BYTES: usize = 1 << 15;
/// Smallest share of the weight bytes one task streams.
const MIN_TASK_BYTES: usize = 1 << 14;

impl QMatrix {
    /// Quantizes `w: (n, k)` row-major f32 (rows on all rayon threads).
    pub fn quantize(t: QType, w: &[f32], n: usize, k: usize) -> Result<QMatrix> {
        check_shape(t, n, k)?;
        if w.len() != n * k {
            return Err(Error::Internal(format!(
                "quantize: {} values for a ({n}, {k}) matrix",
                w.len()
            )));
        }
        let rb = t.row_bytes(k);
        let mut data = WeightBytes::zeroed_par(n * rb);
        data.par_chunks_mut(rb)
            .zip(w.par_chunks(k))
            .for_each(|(out, row)| format::quantize_row(t, row, out));
        Self::from_weight_bytes(t, n, k, data)
    }

    /// A matrix from its blocks as stored (a GGUF tensor's bytes): `n` rows of
    /// `t.row_bytes(k)` bytes, copied into [`WeightBytes`].
    pub fn from_bytes(t: QType, n: usize, k: usize, data: &[u8]) -> Result<QMatrix> {
        Self::from_row_parts(t, n, k, &[data])
    }

    /// [`QMatrix::from_bytes`] taking the buffer as it is (no copy, except that Q8_0 rows are
    /// repacked into a new buffer).
    pub fn from_weight_bytes(t: QType, n: usize, k: usize, data: WeightBytes) -> Result<QMatrix> {
        check_bytes(t, n, k, data.len())?;
        if packed::packs(t, n) {
            return Self::from_row_parts(t, n, k, &[&data]);
        }
        Ok(QMatrix {
            t,
            n,
            k,
            data,
            packed: 0,
        })
    }

    /// A matrix whose rows are the concatenation of `parts` (whole rows of ggml's layout, e.g.
    /// the slices of a fused tensor in a memory-mapped file), written once into the matrix's
    /// buffer in its own layout.
    pub fn from_row_parts(t: QType, n: usize, k: usize, parts: &[&[u8]]) -> Result<QMatrix> {
        check_bytes(t, n, k, parts.iter().map(|p| p.len()).sum())?;
        if !packed::packs(t, n) {
            return Ok(QMatrix {
                t,
                n,
                k,
                data: WeightBytes::concat(parts),
                packed: 0,
            });
        }
        let rb = t.row_bytes(k);
        let rows: Vec<&[u8]> = parts.iter().flat_map(|p| p.chunks_exact(rb)).collect();
        let packed = n / ROWS * ROWS;
        let mut data = WeightBytes::zeroed_par(n * rb);
        let (groups, rest) = data.split_at_mut(packed * rb);
        groups
            .par_chunks_mut(ROWS * rb)
            .enumerate()
            .for_each(|(g, dst)| {
                let group: [&[u8]; ROWS] = std::array::from_fn(|i| rows[g * ROWS + i]);
                packed::pack_group(t, &group, dst);
            });
        for (dst, src) in rest.chunks_exact_mut(rb).zip(&rows[packed..]) {
            dst.copy_from_slice(src);
        }
        Ok(QMatrix {
            t,
            n,
            k,
            data,
            packed,
        })
    }

    /// The format.
    pub fn qtype(&self) -> QType {
        self.t
    }

    /// `(n, k)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The stored bytes, in the matrix's own layout (see [`QMatrix`]); `n × row_bytes(k)`
    /// long, like ggml's.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The blocks in ggml's layout, one row after another (what a GGUF file stores).
    pub fn ggml_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.packed == 0 {
            return std::borrow::Cow::Borrowed(&self.data);
        }
        let rb = self.t.row_bytes(self.k);
        let mut out = vec![0u8; self.data.len()];
        for (j, row) in out.chunks_exact_mut(rb).enumerate() {
            self.ggml_row(j, row);
        }
        std::borrow::Cow::Owned(out)
    }

    /// Row `j` in ggml's layout, into `out` (`row_bytes(k)` bytes).
    fn ggml_row(&self, j: usize, out: &mut [u8]) {
        let rb = self.t.row_bytes(self.k);
        if j < self.packed {
            let g = j / ROWS * ROWS;
            let group = &self.data[g * rb..(g + ROWS) * rb];
            packed::unpack_row(self.t, group, j - g, out);
        } else {
            out.copy_from_slice(&self.data[j * rb..(j + 1) * rb]);
        }
    }

    /// Row `j` dequantized into `out` (`k` values): an embedding lookup.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let rb = self.t.row_bytes(self.k);
        if j < self.packed {
            let mut row = vec![0u8; rb];
            self.ggml_row(j, &mut row);
            format::dequantize_row(self.t, &row, out);
        } else {
            format::dequantize_row(self.t, &self.data[j * rb..(j + 1) * rb], out);
        }
    }

    /// The whole matrix as f32 `(n, k)`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        for (j, row) in out.chunks_exact_mut(self.k).enumerate() {
            self.dequantize_row(j, row);
        }
        out
    }

    /// `y (m, n) = x (m, k) · Wᵀ + b` with the fastest [`Backend`].
    pub fn matmul(&self, x: &[f32], m: usize, bias: Option<&[f32]>) -> Result<Vec<f32>> {
        self.matmul_with(Backend::detect(), x, m, bias)
    }

    /// [`QMatrix::matmul`] with a chosen backend (tests run all).
    pub fn matmul_with(
        &self,
        backend: Backend,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let mut ys = matmul_group_with(backend, &[(self, bias)], x, m)?;
        Ok(ys.pop().unwrap_or_default())
    }
}

/// One product of a group: a weight matrix `(n, k)` and its optional bias `(n,)`.
pub type Product<'a> = (&'a QMatrix, Option<&'a [f32]>);

/// `y_i (m, n_i) = x (m, k) · W_iᵀ + b_i` for matrices that read the same input (a layer's q,
/// k and v; gate and up), with the fastest [`Backend`].
///
/// Why a group: a decode step's products are small (a 2B layer's k and v are 0.4 MB each in
/// q8_0) and each one pays fixed costs — waking the worker threads, quantizing the input,
/// the first cache misses of a new stream. Here the input is quantized once per activation
/// format and the rows of all the matrices are split over the threads in one parallel pass.
/// Every output element is computed by the same code as [`QMatrix::matmul`] alone, so the
/// results are bit-identical to separate products.
pub fn matmul_group(products: &[Product<'_>], x: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
    matmul_group_with(Backend::detect(), products, x, m)
}

/// [`matmul_group`] with a chosen backend.
pub fn matmul_group_with(
    backend: Backend,
    products: &[Product<'_>],
    x: &[f32],
    m: usize,
) -> Result<Vec<Vec<f32>>> {
    let Some(&(first, _)) = products.first() else {
        return Ok(Vec::new());
    };
    let k = first.k;
    for &(w, bias) in products {
        if w.k != k || x.len() != m * k || bias.is_some_and(|b| b.len() != w.n) {
            return Err(Error::Internal(format!(
                "quantized matmul: x has {} values for ({m}, {k}), a ({}, {}) matrix, bias {:?}",
                x.len(),
                w.n,
                w.k,
                bias.map(<[f32]>::len)
            )));
        }
    }
    if m == 0 {
        return Ok(vec![Vec::new(); products.len()]);
    }
    let (q8, qk) = (
        quantize_for(products, true, x, m),
        quantize_for(products, false, x, m),
    );
    let (rows_q8, rows_k) = (row_views(&q8), row_views(&qk));
    // Global row g of the group is row g - starts[p] of product p.
    let mut starts = Vec::with_capacity(products.len() + 1);
    let mut total = 0;
    for &(w, _) in products {
        starts.push(total);
        total += w.n;
    }
    starts.push(total);
    // Output transposed, (rows, m): each task owns whole weight rows of one product.
    let mut yt = vec![0f32; total * m];
    let bytes: usize = products.iter().map(|(w, _)| w.data.len()).sum();
    let threads = rayon::current_num_threads();
    let parallel = threads > 1 && bytes >= MIN_PARALLEL_BYTES;
    let tasks = split(products, k, if parallel { threads } else { 0 });
    let bounds: Vec<usize> = tasks
        .iter()
        .map(|t| (starts[t.p] + t.j0) * m)
        .chain([total * m])
        .collect();
    let run = |i: usize, out: &mut [f32]| {
        let t = &tasks[i];
        let (w, bias) = products[t.p];
        let acts = if w.t == QType::Q8_0 {
            &rows_q8
        } else {
            &rows_k
        };
        w.rows_into(backend, t.j0..t.j1, acts, out);
        if let Some(bias) = bias {
            for (col, b) in out.chunks_exact_mut(m).zip(&bias[t.j0..t.j1]) {
                col.iter_mut().for_each(|o| *o += b);
            }
        }
    };
    if parallel {
        crate::ops::team::for_each_split_mut(&mut yt, &bounds, run);
    } else {
        for (i, w) in bounds.windows(2).enumerate() {
            run(i, &mut yt[w[0]..w[1]]);
        }
    }
    Ok(products
        .iter()
        .zip(&starts)
        .map(|(&(w, _), &s)| untranspose(&yt[s * m..(s + w.n) * m], w.n, m))
        .collect())
}

/// Rows `j0..j1` of product `p`.
struct Task {
    p: usize,
    j0: usize,
    j1: usize,
}

/// The group's rows cut into tasks in order, or one task per product when `threads` is 0 (run
/// serially). Tasks shrink as the rows run out ("guided" sizes): each takes the rows left in
/// the whole group ÷ (2 · threads), at least [`MIN_TASK_BYTES`] of weights, in whole groups
/// of 16 rows. The threads claim tasks in order, so the last ones are small and the thread
/// that finishes first waits for the other only a short task's time at the end of each
/// product; with equal tasks of a quarter of a thread's share (before), that wait was up to
/// one of them, and perf put 5–9% of a decode step's samples in the waiting thread's
/// `sched_yield`.
fn split(products: &[Product<'_>], k: usize, threads: usize) -> Vec<Task> {
    let mut left: usize = products.iter().map(|(w, _)| w.n).sum();
    let mut tasks = Vec::new();
    for (p, &(w, _)) in products.iter().enumerate() {
        let min_rows = MIN_TASK_BYTES.div_ceil(w.t.row_bytes(k).max(1));
        let mut j0 = 0;
        while j0 < w.n {
            let rows = if threads == 0 {
                w.n
            } else {
                left.div_ceil(2 * threads).max(min_rows).div_ceil(ROWS) * ROWS
            };
            let j1 = (j0 + rows).min(w.n);
            tasks.push(Task { p, j0, j1 });
            left -= j1 - j0;
            j0 = j1;
        }
    }
    tasks
}

impl QMatrix {
    /// `out[(j - rows.start) · m + r] = dot(row j, acts[r])` for `j` in `rows` (transposed
    /// output), on this thread; `rows.start` is best a multiple of 16 where rows are packed.
    /// The kernel itself, for benchmarks (`examples/quant_decode.rs`); products go through
    /// [`matmul_group`].
    pub fn rows_into(
        &self,
        backend: Backend,
        rows: std::ops::Range<usize>,
        acts: &[act::ActRow<'_>],
        out: &mut [f32],
    ) {
        let m = acts.len();
        let rb = self.t.row_bytes(self.k);
        let mut j = rows.start;
        // AMX: the whole groups of the range with the tiles configured once.
        if self.t == QType::Q8_0 && j.is_multiple_of(ROWS) {
            let end = rows.end.min(self.packed) / ROWS * ROWS;
            if end > j
                && packed::q8_0::dot_groups_amx(
                    backend,
                    &self.data[j * rb..end * rb],
                    ROWS * rb,
                    acts,
                    &mut out[..(end - j) * m],
                )
            {
                j = end;
            }
        }
        while j < rows.end {
            let at = (j - rows.start) * m;
            let whole_group = j < self.packed && j.is_multiple_of(ROWS) && j + ROWS <= rows.end;
            let group = j * rb..(j + ROWS) * rb;
            if whole_group
                && packed::dot_group(
                    self.t,
                    backend,
                    &self.data[group],
                    acts,
                    &mut out[at..at + ROWS * m],
                )
            {
                j += ROWS;
            } else if j < self.packed {
                // A row of a group the backend cannot read packed (K formats without VNNI:
                // tests),
                // or of a range that cuts a group (never made by `split`): the row alone,
                // back in ggml's layout.
                let mut row = vec![0u8; rb];
                self.ggml_row(j, &mut row);
                kernels::dot_rows(backend, self.t, &row, acts, &mut out[at..at + m]);
                j += 1;
            } else {
                let row = &self.data[j * rb..(j + 1) * rb];
                kernels::dot_rows(backend, self.t, row, acts, &mut out[at..at + m]);
                j += 1;
            }
        }
    }
}

/// `(n, m)` → `(m, n)`.
fn untranspose(yt: &[f32], n: usize, m: usize) -> Vec<f32> {
    if m == 1 {
        return yt.to_vec();
    }
    let mut y = vec![0f32; m * n];
    for (j, col) in yt.chunks_exact(m).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            y[r * n + j] = v;
        }
    }
    y
}

/// Every row's view of `a` (none when `None`), made once per product.
fn row_views(a: &Option<QActs>) -> Vec<act::ActRow<'_>> {
    a.iter()
        .flat_map(|a| (0..a.rows).map(|r| a.row(r)))
        .collect()
}

/// The group's input quantized for the weights whose format is (`q8`) or is not Q8_0: Q8_0
/// takes per-32 scales, the K formats per-256 scales and sums (the same for Q4_K and Q6_K);
/// `None` when no matrix of the group needs it.
fn quantize_for(products: &[Product<'_>], q8: bool, x: &[f32], m: usize) -> Option<QActs> {
    products
        .iter()
        .find(|(w, _)| (w.t == QType::Q8_0) == q8)
        .map(|(w, _)| QActs::quantize(w.t, x, m, w.k))
}

/// A `(n, k)` matrix of type `t` in `len` bytes.
fn check_bytes(t: QType, n: usize, k: usize, len: usize) -> Result<()> {
    check_shape(t, n, k)?;
    if len != n * t.row_bytes(k) {
        return Err(Error::Weights(format!(
            "a {t} ({n}, {k}) matrix needs {} bytes, got {len}",
            n * t.row_bytes(k)
        )));
    }
    Ok(())
}

fn check_shape(t: QType, n: usize, k: usize) -> Result<()> {
    if k == 0 || n == 0 || !k.is_multiple_of(t.block_len()) {
        return Err(Error::Weights(format!(
            "a ({n}, {k}) matrix cannot be stored as {t}: rows must be a non-zero multiple of \
             {} values",
            t.block_len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = |b: u64| ((s >> b) & 0xffff) as f32 / 65535.0;
                (u(0) + u(16) + u(32) + u(48) - 2.0) * scale
            })
            .collect()
    }

    /// The oracle: f64 dot products of the dequantized weights and activations, with the
    /// sum of |terms| for the tolerance.
    fn oracle(w: &QMatrix, acts: &QActs, bias: Option<&[f32]>) -> (Vec<f64>, Vec<f64>) {
        let (n, k) = w.dims();
        let wd = w.dequantize();
        let ad = acts.dequantize();
        let mut y = vec![0f64; acts.rows * n];
        let mut mag = vec![0f64; acts.rows * n];
        for r in 0..acts.rows {
            for j in 0..n {
                let (mut s, mut a) = (0f64, 0f64);
                for i in 0..k {
                    let t = f64::from(wd[j * k + i]) * f64::from(ad[r * k + i]);
                    s += t;
                    a += t.abs();
                }
                y[r * n + j] = s + bias.map_or(0.0, |b| f64::from(b[j]));
                mag[r * n + j] = a;
            }
        }
        (y, mag)
    }

    #[test]
    fn every_backend_matches_the_oracle_and_each_other() {
        let backends = Backend::available();
        // Q8_0 also with block counts that are not a multiple of four (the kernels' tails).
        let q8_tails = [
            (QType::Q8_0, 9, 224, 5),
            (QType::Q8_0, 3, 32, 4),
            (QType::Q8_0, 4, 416, 9),
            // Two packed groups and a tail of rows, over AMX's row count (tiles of 12 rows).
            (QType::Q8_0, 40, 256, 12),
            (QType::Q8_0, 32, 96, 33),
        ];
        let shapes = [(7, 256, 1), (33, 512, 3), (64, 1536, 2), (5, 768, 17)];
        let cases = [QType::Q8_0, QType::Q4K, QType::Q6K]
            .into_iter()
            .flat_map(|t| shapes.map(|(n, k, m)| (t, n, k, m)))
            .chain(q8_tails);
        for (t, n, k, m) in cases {
            {
                let w = values(n * k, (n * k) as u64, 0.05);
                let x = values(m * k, (m + 3 * k) as u64, 1.0);
                let bias = values(n, 99, 0.1);
                let q = QMatrix::quantize(t, &w, n, k).unwrap();
                let acts = QActs::quantize(t, &x, m, k);
                let (want, mag) = oracle(&q, &acts, Some(&bias));
                let first = q.matmul_with(backends[0], &x, m, Some(&bias)).unwrap();
                for &b in &backends {
                    let y = q.matmul_with(b, &x, m, Some(&bias)).unwrap();
                    assert_eq!(y, first, "{t} ({n},{k}) m={m}: {b:?} differs from portable");
                    for i in 0..y.len() {
                        let tol = 1e-5 * mag[i] + 1e-6;
                        assert!(
                            (f64::from(y[i]) - want[i]).abs() <= tol,
                            "{t} {b:?} ({n},{k}) m={m} [{i}]: {} vs {} (tol {tol})",
                            y[i],
                            want[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_in_a_batch() {
        for t in [QType::Q8_0, QType::Q4K, QType::Q6K] {
            let (n, k, m) = (300, 512, 9);
            let w = values(n * k, 5, 0.05);
            let x = values(m * k, 6, 1.0);
            let q = QMatrix::quantize(t, &w, n, k).unwrap();
            let all = q.matmul(&x, m, None).unwrap();
            for r in 0..m {
                let one = q.matmul(&x[r * k..(r + 1) * k], 1, None).unwrap();
                assert_eq!(one, all[r * n..(r + 1) * n], "{t} row {r}");
            }
        }
    }

    /// A group of products (mixed formats, with and without bias, in parallel and alone)
    /// gives each matrix the bits of its own product.
    #[test]
    fn a_group_gives_each_matrix_its_own_product() {
        let k = 512;
        let formats = [
            (QType::Q4K, 300),
            (QType::Q8_0, 64),
            (QType::Q6K, 200),
            (QType::Q8_0, 7),
        ];
        let mats: Vec<QMatrix> = formats
            .iter()
            .enumerate()
            .map(|(i, &(t, n))| QMatrix::quantize(t, &values(n * k, i as u64, 0.05), n, k).unwrap())
            .collect();
        let biases: Vec<Vec<f32>> = mats.iter().map(|q| values(q.dims().0, 3, 0.1)).collect();
        for m in [1, 3] {
            let x = values(m * k, 40 + m as u64, 1.0);
            let products: Vec<Product<'_>> = mats
                .iter()
                .zip(&biases)
                .enumerate()
                .map(|(i, (q, b))| (q, (i % 2 == 0).then_some(b.as_slice())))
                .collect();
            for backend in Backend::available() {
                let group = matmul_group_with(backend, &products, &x, m).unwrap();
                assert_eq!(group.len(), products.len());
                for (i, ((q, b), y)) in products.iter().zip(&group).enumerate() {
                    let alone = q.matmul_with(backend, &x, m, *b).unwrap();
                    assert_eq!(*y, alone, "matrix {i}, m = {m}, {backend:?}");
                }
            }
        }
        let other_k = QMatrix::quantize(QType::Q8_0, &values(32 * 256, 1, 0.1), 32, 256).unwrap();
        let x = values(k, 2, 1.0);
        assert!(matmul_group(&[(&mats[0], None), (&other_k, None)], &x, 1).is_err());
        assert!(matmul_group(&[], &x, 1).unwrap().is_empty());
    }

    /// Quantized products are close to the f32 ones: the error is what the formats' bits
    /// allow (relative to the output's RMS).
    #[test]
    fn products_are_close_to_f32() {
        for (t, bound) in [(QType::Q8_0, 0.02), (QType::Q6K, 0.04), (QType::Q4K, 0.12)] {
            let (n, k, m) = (64, 1024, 4);
            let w = values(n * k, 11, 0.05);
            let x = values(m * k, 12, 1.0);
            let q = QMatrix::quantize(t, &w, n, k).unwrap();
            let y = q.matmul(&x, m, None).unwrap();
            let (mut err, mut rms) = (0f64, 0f64);
            for r in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|i| f64::from(w[j * k + i]) * f64::from(x[r * k + i]))
                        .sum();
                    err += (f64::from(y[r * n + j]) - exact).powi(2);
                    rms += exact * exact;
                }
            }
            let rel = (err / rms).sqrt();
            assert!(rel < bound, "{t}: relative error {rel} >= {bound}");
        }
    }

    #[test]
    fn shapes_are_checked() {
        assert!(QMatrix::quantize(QType::Q4K, &[0.0; 128], 1, 128).is_err());
        assert!(QMatrix::quantize(QType::Q8_0, &[0.0; 64], 2, 32).is_ok());
        assert!(QMatrix::from_bytes(QType::Q8_0, 2, 32, &[0; 67]).is_err());
        let q = QMatrix::quantize(QType::Q8_0, &[0.0; 64], 2, 32).unwrap();
        assert!(q.matmul(&[0.0; 31], 1, None).is_err());
    }
}

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
pub mod format;
pub mod kernels;
pub mod plan;

use rayon::prelude::*;

use crate::error::{Error, Result};
pub use act::QActs;
pub use format::QType;
pub use kernels::Backend;

/// A quantized `(n, k)` weight matrix: `n` rows of `k / block_len` blocks each.
#[derive(Clone)]
pub struct QMatrix {
    t: QType,
    n: usize,
    k: usize,
    data: Vec<u8>,
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
        let mut data = vec![0u8; n * rb];
        data.par_chunks_mut(rb)
            .zip(w.par_chunks(k))
            .for_each(|(out, row)| format::quantize_row(t, row, out));
        Ok(QMatrix { t, n, k, data })
    }

    /// A matrix from its blocks as stored (a GGUF tensor's bytes): `n` rows of
    /// `t.row_bytes(k)` bytes.
    pub fn from_bytes(t: QType, n: usize, k: usize, data: Vec<u8>) -> Result<QMatrix> {
        check_shape(t, n, k)?;
        if data.len() != n * t.row_bytes(k) {
            return Err(Error::Weights(format!(
                "a {t} ({n}, {k}) matrix needs {} bytes, got {}",
                n * t.row_bytes(k),
                data.len()
            )));
        }
        Ok(QMatrix { t, n, k, data })
    }

    /// The format.
    pub fn qtype(&self) -> QType {
        self.t
    }

    /// `(n, k)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The stored blocks.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// Row `j` dequantized into `out` (`k` values): an embedding lookup.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let rb = self.t.row_bytes(self.k);
        format::dequantize_row(self.t, &self.data[j * rb..(j + 1) * rb], out);
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
        let (n, k) = (self.n, self.k);
        if x.len() != m * k || bias.is_some_and(|b| b.len() != n) {
            return Err(Error::Internal(format!(
                "quantized matmul: x has {} values for ({m}, {k}), bias {:?} for {n}",
                x.len(),
                bias.map(<[f32]>::len)
            )));
        }
        let acts = QActs::quantize(self.t, x, m, k);
        let rb = self.t.row_bytes(k);
        // Output transposed, (n, m): each task owns whole weight rows.
        let mut yt = vec![0f32; n * m];
        let column = |j: usize, out: &mut [f32]| {
            let w = &self.data[j * rb..(j + 1) * rb];
            let b = bias.map_or(0.0, |b| b[j]);
            for (r, o) in out.iter_mut().enumerate() {
                *o = kernels::dot(backend, self.t, w, acts.row(r)) + b;
            }
        };
        let threads = rayon::current_num_threads();
        if threads <= 1 || n * rb < MIN_PARALLEL_BYTES || m == 0 {
            for (j, out) in yt.chunks_exact_mut(m.max(1)).enumerate().take(n) {
                column(j, out);
            }
        } else {
            let rows = n.div_ceil(threads * 4).max(MIN_TASK_BYTES.div_ceil(rb));
            yt.par_chunks_mut(rows * m)
                .enumerate()
                .for_each(|(t, chunk)| {
                    for (i, out) in chunk.chunks_exact_mut(m).enumerate() {
                        column(t * rows + i, out);
                    }
                });
        }
        if m == 1 {
            return Ok(yt);
        }
        let mut y = vec![0f32; m * n];
        for (j, col) in yt.chunks_exact(m).enumerate() {
            for (r, &v) in col.iter().enumerate() {
                y[r * n + j] = v;
            }
        }
        Ok(y)
    }
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
        for t in [QType::Q8_0, QType::Q4K, QType::Q6K] {
            for &(n, k, m) in &[(7, 256, 1), (33, 512, 3), (64, 1536, 2), (5, 768, 17)] {
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
        assert!(QMatrix::from_bytes(QType::Q8_0, 2, 32, vec![0; 67]).is_err());
        let q = QMatrix::quantize(QType::Q8_0, &[0.0; 64], 2, 32).unwrap();
        assert!(q.matmul(&[0.0; 31], 1, None).is_err());
    }
}

//! Activation rows quantized to 8 bits, once per product, in the form the kernels of one
//! weight format read: ggml's scheme (`quantize_row_q8_0` / `q8_K`), written here.
//!
//! - For Q8_0 weights: one f32 scale per 32 values (the same granularity as the weights, as
//!   llama.cpp does, so Q8_0 stays close to f16).
//! - For the K formats: one f32 scale per 256 values, and the sum of every 16 quantized
//!   values (Q4_K's mins and Q6_K's offset of 32 are applied through these sums instead of per
//!   value).
//!
//! Values are `round(x / d)` with `d = max|x| / 127` (ties to even), so every `q` is in
//! `-127..=127`: the kernels' sign tricks rely on `-128` never occurring.

use super::format::QType;

/// `rows` activation rows of `k` values, quantized for weights of type `t`.
#[derive(Debug, Clone)]
pub struct QActs {
    /// The weight format these are for.
    pub t: QType,
    /// Rows.
    pub rows: usize,
    /// Values per row (a multiple of the format's block length).
    pub k: usize,
    /// `rows × k` values in row order.
    pub q: Vec<i8>,
    /// One scale per block of the activation (32 values for Q8_0, 256 for the K formats):
    /// `rows × k / block`.
    pub d: Vec<f32>,
    /// The sum of every 16 values (at most 16 × 127, so an i16), `rows × k / 16`: the K
    /// formats apply their mins and offsets through them, packed Q8_0 its `+128` offset
    /// ([`super::packed`]).
    pub sums: Vec<i16>,
    /// Q8_0 only (else empty): `−128 ×` the sum of each block of 32 values, `rows × k / 32`,
    /// where the packed kernels start each block's integer sum (it undoes the `+128` of the
    /// stored weights, [`super::packed`]).
    pub offs: Vec<i32>,
}

impl QActs {
    /// Quantizes `x: (rows, k)` (row-major) for weights of type `t`.
    pub fn quantize(t: QType, x: &[f32], rows: usize, k: usize) -> QActs {
        let block = t.block_len();
        let blocks = rows * k / block;
        let mut q = vec![0i8; rows * k];
        let mut d = vec![0f32; blocks];
        let mut sums = vec![0i16; rows * k / 16];
        for (b, (xs, qs)) in x[..rows * k]
            .chunks_exact(block)
            .zip(q.chunks_exact_mut(block))
            .enumerate()
        {
            let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            d[b] = scale;
            for (o, &v) in qs.iter_mut().zip(xs) {
                *o = super::format::nearest(v * inv).clamp(-127, 127) as i8;
            }
            for (g, s) in qs.chunks_exact(16).enumerate() {
                sums[b * block / 16 + g] = s.iter().map(|&v| i16::from(v)).sum();
            }
        }
        let offs = if t == QType::Q8_0 {
            sums.chunks_exact(2)
                .map(|p| -128 * (i32::from(p[0]) + i32::from(p[1])))
                .collect()
        } else {
            Vec::new()
        };
        QActs {
            t,
            rows,
            k,
            q,
            d,
            sums,
            offs,
        }
    }

    /// Row `r`'s view.
    pub fn row(&self, r: usize) -> ActRow<'_> {
        let per_block = self.k / self.t.block_len();
        let groups = self.k / 16;
        let offs = if self.offs.is_empty() {
            &self.offs[..]
        } else {
            &self.offs[r * self.k / 32..(r + 1) * self.k / 32]
        };
        ActRow {
            q: &self.q[r * self.k..(r + 1) * self.k],
            d: &self.d[r * per_block..(r + 1) * per_block],
            sums: &self.sums[r * groups..(r + 1) * groups],
            offs,
        }
    }

    /// The dequantized values `(rows, k)` (for the oracle).
    pub fn dequantize(&self) -> Vec<f32> {
        let block = self.t.block_len();
        self.q
            .iter()
            .enumerate()
            .map(|(i, &v)| f32::from(v) * self.d[i / block])
            .collect()
    }
}

/// One quantized activation row.
#[derive(Debug, Clone, Copy)]
pub struct ActRow<'a> {
    /// `k` values.
    pub q: &'a [i8],
    /// One scale per block.
    pub d: &'a [f32],
    /// One sum per 16 values.
    pub sums: &'a [i16],
    /// Q8_0: `−128 ×` each block's sum ([`QActs::offs`]); empty for the K formats.
    pub offs: &'a [i32],
}

//! The block formats of quantized weights, byte for byte those of ggml (so GGUF files written
//! by llama.cpp are read as they are), with our own quantizers and the exact dequantizers.
//!
//! | format | block | bytes | layout | value |
//! |---|---|---|---|---|
//! | Q8_0 | 32 | 34 | `d: f16`, `qs: [i8; 32]` | `d * q` |
//! | Q4_K | 256 | 144 | `d: f16`, `dmin: f16`, `scales: [u8; 12]`, `qs: [u8; 128]` | `d * sc_j * q - dmin * m_j`, `q` in 0..=15, 6-bit `sc_j`/`m_j` per 32 |
//! | Q6_K | 256 | 210 | `ql: [u8; 128]`, `qh: [u8; 64]`, `scales: [i8; 16]`, `d: f16` | `d * sc_g * (q - 32)`, `q` in 0..=63, `sc_g` per 16 |
//!
//! Where each value's bits sit (ggml's `dequantize_row_*`):
//! - Q4_K: element `e` of a block is in 64-element chunk `c = e / 64`; the low nibble of
//!   `qs[32c + i]` is element `64c + i`, its high nibble element `64c + 32 + i`. The 12 scale
//!   bytes pack eight 6-bit scales and eight 6-bit mins ([`q4k_scales_mins`]).
//! - Q6_K: per half `n` of 128 (`ql[64n..]`, `qh[32n..]`), for `l` in 0..32: element
//!   `128n + l` is the low nibble of `ql[64n + l]` with bits 0-1 of `qh[32n + l]`; `+32` the
//!   low nibble of `ql[64n + 32 + l]` with bits 2-3; `+64` the high nibble of `ql[64n + l]`
//!   with bits 4-5; `+96` the high nibble of `ql[64n + 32 + l]` with bits 6-7. Scale
//!   `e / 16`.
//!
//! The quantizers are written here (not ggml's code) and follow ggml's reference algorithms
//! (`quantize_row_*_ref` in `ggml-quants.c`), so a file we write holds the blocks
//! llama-quantize would write, up to float rounding in the searches: Q8_0 rounds `x / d` to
//! the nearest of 255 levels with ties away from zero (`roundf`); Q6_K picks each 16-value
//! group's scale by ggml's `make_qx_quants` search (error weighted by `x²`); Q4_K each
//! 32-value sub-block's scale and min by `make_qkx2_quants` (error weighted by the
//! sub-block's RMS + |x|, 21 step counts, the first candidate kept unless beaten). Both then
//! quantize the sub-block scales to the super-block's 8 or 6 bits and requantize every value
//! with the scale it will actually be decoded with (`x / d`, ties to even as ggml's
//! `nearest_int`). Compared with llama.cpp's files of the same 2B weights, the Q8_0 blocks
//! are identical and the K formats' accuracy matches (docs/benchmarks.md, 2026-12-07).

use half::f16;

/// A quantized weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    /// 8-bit values, one f16 scale per 32 (8.5 bits per weight).
    Q8_0,
    /// 4-bit values with 6-bit scales and mins per 32, two f16 per 256 (4.5 bits per weight).
    Q4K,
    /// 6-bit values with 8-bit scales per 16, one f16 per 256 (6.5625 bits per weight).
    Q6K,
}

impl QType {
    /// Values per block.
    pub const fn block_len(self) -> usize {
        match self {
            QType::Q8_0 => 32,
            QType::Q4K | QType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            QType::Q8_0 => 34,
            QType::Q4K => 144,
            QType::Q6K => 210,
        }
    }

    /// The name users type and GGUF tools print (`q8_0`, `q4_k`, `q6_k`).
    pub const fn name(self) -> &'static str {
        match self {
            QType::Q8_0 => "q8_0",
            QType::Q4K => "q4_k",
            QType::Q6K => "q6_k",
        }
    }

    /// Bytes of a row of `k` values (`k` a multiple of [`QType::block_len`]).
    pub const fn row_bytes(self, k: usize) -> usize {
        k / self.block_len() * self.block_bytes()
    }
}

impl std::fmt::Display for QType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// The nearest integer to `x` (ties to even), for `|x| < 2^22`: adding 1.5 · 2^23 leaves no
/// fraction bits, so the float addition itself rounds. A few instructions, where `f32::round`
/// is a library call on baseline x86-64; quantizing a 2B model calls it billions of times.
#[inline(always)]
pub(crate) fn nearest(x: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    ((x + MAGIC) - MAGIC) as i32
}

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K block from its 12 scale bytes, as
/// two little-endian u64s of bytes `[sc0..sc7]` and `[m0..m7]`. Scales 0-3 and mins 0-3 are
/// the low 6 bits of bytes 0-3 and 4-7; scales 4-7 have their low 4 bits in the low nibbles of
/// bytes 8-11 and their top 2 bits in the top bits of bytes 0-3; mins 4-7 likewise in the high
/// nibbles of bytes 8-11 and the top bits of bytes 4-7.
#[inline]
pub(crate) fn q4k_scales_mins(s: &[u8]) -> (u64, u64) {
    let word = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (a, b, c) = (word(0), word(4), word(8));
    let sc_lo = a & 0x3f3f_3f3f;
    let m_lo = b & 0x3f3f_3f3f;
    let sc_hi = (c & 0x0f0f_0f0f) | ((a >> 2) & 0x3030_3030);
    let m_hi = ((c >> 4) & 0x0f0f_0f0f) | ((b >> 2) & 0x3030_3030);
    (
        u64::from(sc_lo) | (u64::from(sc_hi) << 32),
        u64::from(m_lo) | (u64::from(m_hi) << 32),
    )
}

/// Packs eight 6-bit scales and mins into Q4_K's 12 bytes (the inverse of
/// [`q4k_scales_mins`]).
fn pack_q4k_scales(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4);
    }
    s
}

/// [`nearest`] as a float (for `|x| < 2^22`): vectorises where the integer form does not.
#[inline(always)]
fn nearest_f(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// `(Σ w·l, Σ w·l², Σ w·l·x)` over the levels `l = clamp(nearest(iscale · (x − shift)), lo, hi)`,
/// in eight-lane partial sums so the compiler vectorises it (the lanes are added in a fixed
/// order, so the result does not depend on the machine).
#[inline(always)]
fn level_sums(x: &[f32], w: &[f32], iscale: f32, shift: f32, lo: f32, hi: f32) -> (f32, f32, f32) {
    let (mut sl, mut sll, mut sxl) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    for (xs, ws) in x.chunks_exact(8).zip(w.chunks_exact(8)) {
        for i in 0..8 {
            let l = nearest_f(iscale * (xs[i] - shift)).max(lo).min(hi);
            sl[i] += ws[i] * l;
            sll[i] += ws[i] * l * l;
            sxl[i] += ws[i] * l * xs[i];
        }
    }
    let total = |a: [f32; 8]| ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
    (total(sl), total(sll), total(sxl))
}

/// Dequantizes one row of blocks (`out.len()` values) exactly as ggml does.
pub fn dequantize_row(t: QType, bytes: &[u8], out: &mut [f32]) {
    let (bl, bb) = (t.block_len(), t.block_bytes());
    for (blk, y) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bl)) {
        match t {
            QType::Q8_0 => {
                let d = f16_at(blk, 0);
                for (v, &q) in y.iter_mut().zip(&blk[2..34]) {
                    *v = d * f32::from(q as i8);
                }
            }
            QType::Q4K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let (sc, m) = q4k_scales_mins(&blk[4..16]);
                let qs = &blk[16..144];
                for (e, v) in y.iter_mut().enumerate() {
                    let (c, r) = (e / 64, e % 64);
                    let byte = qs[32 * c + r % 32];
                    let q = if r < 32 { byte & 0x0f } else { byte >> 4 };
                    let j = e / 32;
                    let scj = ((sc >> (8 * j)) & 0xff) as f32;
                    let mj = ((m >> (8 * j)) & 0xff) as f32;
                    *v = d * scj * f32::from(q) - dmin * mj;
                }
            }
            QType::Q6K => {
                let d = f16_at(blk, 208);
                for (e, v) in y.iter_mut().enumerate() {
                    let q = q6k_value(blk, e);
                    let sc = f32::from(blk[192 + e / 16] as i8);
                    *v = d * sc * f32::from(q - 32);
                }
            }
        }
    }
}

/// Element `e`'s 6-bit value (0..=63) in a Q6_K block.
#[inline]
pub(crate) fn q6k_value(blk: &[u8], e: usize) -> i16 {
    let (n, r) = (e / 128, e % 128);
    let (l, quarter) = (r % 32, r / 32);
    let ql = blk[64 * n + l + 32 * (quarter & 1)];
    let low = if quarter < 2 { ql & 0x0f } else { ql >> 4 };
    let high = (blk[128 + 32 * n + l] >> (2 * quarter)) & 3;
    i16::from(low | (high << 4))
}

/// Quantizes one row (`x.len()` a multiple of the block length) into `out`
/// (`t.row_bytes(x.len())` bytes).
pub fn quantize_row(t: QType, x: &[f32], out: &mut [u8]) {
    let (bl, bb) = (t.block_len(), t.block_bytes());
    for (xb, blk) in x.chunks_exact(bl).zip(out.chunks_exact_mut(bb)) {
        match t {
            QType::Q8_0 => quantize_q8_0_block(xb, blk),
            QType::Q4K => quantize_q4k_block(xb, blk),
            QType::Q6K => quantize_q6k_block(xb, blk),
        }
    }
}

fn quantize_q8_0_block(x: &[f32], blk: &mut [u8]) {
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    put_f16(blk, 0, d);
    for (q, &v) in blk[2..34].iter_mut().zip(x) {
        // `roundf`: ties away from zero, as ggml's `quantize_row_q8_0_ref` (not `nearest`,
        // whose ties go to even), so the blocks are llama-quantize's byte for byte.
        *q = ((v * id).round() as i32).clamp(-127, 127) as i8 as u8;
    }
}

/// Below this a group is all zeros (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// The scale `s` for `x ≈ s * q` with integer `q` in `[-nmax, nmax - 1]` minimising the
/// squared error weighted by `x²`, searched around `-nmax / x_absmax` (so the largest value
/// maps to `-nmax`, using the wider negative side) and refitted by least squares; `levels`
/// gets the chosen `q + nmax`. The search of ggml's `make_qx_quants` (rmse_type 1): the
/// first candidate is kept unless another scores strictly better.
fn best_symmetric_scale(x: &[f32], nmax: i32, levels: &mut [u8]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let mut w = [0f32; 16];
    for (wi, &v) in w.iter_mut().zip(x) {
        *wi = v * v;
    }
    let (lo, hi) = (-nmax as f32, (nmax - 1) as f32);
    let put = |iscale: f32, levels: &mut [u8]| {
        for (l, &v) in levels.iter_mut().zip(x) {
            *l = (nearest_f(iscale * v).max(lo).min(hi) as i32 + nmax) as u8;
        }
    };
    let iscale = -(nmax as f32) / max;
    let (_, sll, sxl) = level_sums(x, &w[..x.len()], iscale, 0.0, lo, hi);
    put(iscale, levels);
    let mut scale = if sll > 0.0 { sxl / sll } else { 0.0 };
    let mut best = scale * sxl;
    for step in (-9..=9).filter(|&s| s != 0) {
        let iscale = -(nmax as f32 + 0.1 * step as f32) / max;
        let (_, sll, sxl) = level_sums(x, &w[..x.len()], iscale, 0.0, lo, hi);
        if sll > 0.0 && sxl * sxl > best * sll {
            put(iscale, levels);
            scale = sxl / sll;
            best = scale * sxl;
        }
    }
    scale
}

fn quantize_q6k_block(x: &[f32], blk: &mut [u8]) {
    blk.fill(0);
    let mut scales = [0f32; 16];
    let mut levels = [0u8; 256];
    for (g, s) in scales.iter_mut().enumerate() {
        *s = best_symmetric_scale(
            &x[16 * g..16 * g + 16],
            32,
            &mut levels[16 * g..16 * g + 16],
        );
    }
    let (mut amax, mut max) = (0f32, 0f32);
    for &s in &scales {
        if s.abs() > amax {
            amax = s.abs();
            max = s;
        }
    }
    if amax < GROUP_MAX_EPS {
        // All zero: every byte 0 (d 0), as ggml writes it.
        return;
    }
    let iscale = -128.0 / max;
    put_f16(blk, 208, 1.0 / iscale);
    let d = f16_at(blk, 208);
    for (g, &s) in scales.iter().enumerate() {
        let sc = nearest(iscale * s).clamp(-128, 127);
        blk[192 + g] = sc as i8 as u8;
        let dg = d * sc as f32;
        for e in 16 * g..16 * g + 16 {
            // A group whose scale rounds to 0 keeps the search's levels (as ggml does).
            let q6 = if dg != 0.0 {
                (nearest(x[e] / dg).clamp(-32, 31) + 32) as u8
            } else {
                levels[e]
            };
            put_q6k_value(blk, e, q6);
        }
    }
}

fn put_q6k_value(blk: &mut [u8], e: usize, q6: u8) {
    let (n, r) = (e / 128, e % 128);
    let (l, quarter) = (r % 32, r / 32);
    let at = 64 * n + l + 32 * (quarter & 1);
    let low = q6 & 0x0f;
    blk[at] |= if quarter < 2 { low } else { low << 4 };
    blk[128 + 32 * n + l] |= (q6 >> 4) << (2 * quarter);
}

/// `(scale, min)` with `x ≈ scale * q - min`, `q` in `0..=nmax`, `scale >= 0`, `min >= 0`,
/// minimising the error weighted by `w`, with the chosen `q` in `levels`: ggml's
/// `make_qkx2_quants(rmin -1, rdelta 0.1, nstep 20)`. The first candidate maps the extremes
/// to 0 and `nmax`; each of 21 step counts around it is refitted by weighted least squares
/// (the min clamped at 0) and kept when its weighted error is strictly smaller.
fn best_affine_scale(x: &[f32], w: &[f32], nmax: i32, levels: &mut [u8]) -> (f32, f32) {
    let mut min = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    min = min.min(0.0);
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let (mut sw, mut swx) = (0f32, 0f32);
    for (&v, &wi) in x.iter().zip(w) {
        sw += wi;
        swx += wi * v;
    }
    let top = nmax as f32;
    let quantize = |iscale: f32, min: f32, out: &mut [u8]| {
        for (l, &v) in out.iter_mut().zip(x) {
            *l = nearest_f(iscale * (v - min)).max(0.0).min(top) as u8;
        }
    };
    let error = |scale: f32, min: f32, ls: &[u8]| -> f32 {
        let mut acc = [0f32; 8];
        for (i, ((&v, &wi), &l)) in x.iter().zip(w).zip(ls).enumerate() {
            let diff = scale * f32::from(l) + min - v;
            acc[i % 8] += wi * diff * diff;
        }
        ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
    };
    let iscale = top / (max - min);
    let mut scale = 1.0 / iscale;
    quantize(iscale, min, levels);
    let mut best_err = error(scale, min, levels);
    let mut cand = [0u8; 32];
    let cand = &mut cand[..x.len()];
    for step in 0..=20 {
        let iscale = (-1.0 + 0.1 * step as f32 + top) / (max - min);
        let (sl, sll, sxl) = level_sums(x, w, iscale, min, 0.0, top);
        let det = sw * sll - sl * sl;
        if det <= 0.0 {
            continue;
        }
        let mut this_scale = (sw * sxl - swx * sl) / det;
        let mut this_min = (sll * swx - sl * sxl) / det;
        if this_min > 0.0 {
            this_min = 0.0;
            this_scale = sxl / sll;
        }
        quantize(iscale, min, cand);
        let err = error(this_scale, this_min, cand);
        if err < best_err {
            levels.copy_from_slice(cand);
            best_err = err;
            scale = this_scale;
            min = this_min;
        }
    }
    (scale, -min)
}

fn quantize_q4k_block(x: &[f32], blk: &mut [u8]) {
    blk.fill(0);
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut levels = [0u8; 256];
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        // ggml's weights: the sub-block's RMS plus |x|.
        let av_x = (xs.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
        let w: [f32; 32] = std::array::from_fn(|i| av_x + xs[i].abs());
        (scales[j], mins[j]) = best_affine_scale(xs, &w, 15, &mut levels[32 * j..32 * j + 32]);
    }
    let max_scale = scales.iter().fold(0f32, |a, &v| a.max(v));
    let max_min = mins.iter().fold(0f32, |a, &v| a.max(v));
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = nearest(inv_scale * scales[j]).clamp(0, 63) as u8;
        lm[j] = nearest(inv_min * mins[j]).clamp(0, 63) as u8;
    }
    put_f16(blk, 0, max_scale / 63.0);
    put_f16(blk, 2, max_min / 63.0);
    blk[4..16].copy_from_slice(&pack_q4k_scales(&ls, &lm));
    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
    for (e, &v) in x.iter().enumerate() {
        let j = e / 32;
        let dj = d * f32::from(ls[j]);
        let mj = dmin * f32::from(lm[j]);
        // A sub-block whose scale rounds to 0 keeps the search's levels (as ggml does).
        let q = if dj != 0.0 {
            nearest((v + mj) / dj).clamp(0, 15) as u8
        } else {
            levels[e]
        };
        let (c, r) = (e / 64, e % 64);
        blk[16 + 32 * c + r % 32] |= if r < 32 { q } else { q << 4 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(k: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..k)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                // Roughly normal: the sum of four uniforms, centred.
                let u = |b: u64| ((s >> b) & 0xffff) as f32 / 65535.0;
                (u(0) + u(16) + u(32) + u(48) - 2.0) * 0.05
            })
            .collect()
    }

    #[test]
    fn scale_bytes_round_trip() {
        for seed in 0..64u8 {
            let sc: [u8; 8] =
                std::array::from_fn(|j| seed.wrapping_mul(7).wrapping_add(j as u8 * 9) % 64);
            let m: [u8; 8] =
                std::array::from_fn(|j| seed.wrapping_mul(5).wrapping_add(j as u8 * 13) % 64);
            let (s, mm) = q4k_scales_mins(&pack_q4k_scales(&sc, &m));
            assert_eq!(s.to_le_bytes(), sc);
            assert_eq!(mm.to_le_bytes(), m);
        }
    }

    #[test]
    fn q6k_values_round_trip() {
        let mut blk = [0u8; 210];
        for e in 0..256 {
            put_q6k_value(&mut blk, e, (e * 37 % 64) as u8);
        }
        for e in 0..256 {
            assert_eq!(q6k_value(&blk, e), (e * 37 % 64) as i16, "element {e}");
        }
    }

    /// Quantization error relative to the row's RMS, per format: bounded by what its bits
    /// allow (measured on rows shaped like trained weights, then given headroom).
    #[test]
    fn round_trip_error_is_what_the_bits_allow() {
        for (t, bound) in [(QType::Q8_0, 0.01), (QType::Q6K, 0.04), (QType::Q4K, 0.12)] {
            let k = 1024;
            let mut worst = 0f32;
            for seed in 1..20 {
                let x = row(k, seed);
                let mut q = vec![0u8; t.row_bytes(k)];
                quantize_row(t, &x, &mut q);
                let mut y = vec![0f32; k];
                dequantize_row(t, &q, &mut y);
                let rms = (x.iter().map(|v| v * v).sum::<f32>() / k as f32).sqrt();
                let err = (x
                    .iter()
                    .zip(&y)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    / k as f32)
                    .sqrt();
                worst = worst.max(err / rms);
            }
            assert!(worst < bound, "{t}: relative RMS error {worst} >= {bound}");
            assert!(worst > 0.0, "{t}: no error at all is suspicious");
        }
    }

    #[test]
    fn zeros_and_constants_survive() {
        for t in [QType::Q8_0, QType::Q4K, QType::Q6K] {
            for c in [0.0f32, 0.5, -0.25] {
                let x = vec![c; 256];
                let mut q = vec![0u8; t.row_bytes(256)];
                quantize_row(t, &x, &mut q);
                let mut y = vec![9f32; 256];
                dequantize_row(t, &q, &mut y);
                for v in y {
                    assert!((v - c).abs() <= c.abs() * 0.02 + 1e-6, "{t} {c} -> {v}");
                }
            }
        }
    }
}

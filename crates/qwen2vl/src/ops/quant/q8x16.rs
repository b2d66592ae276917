//! Q8_0 weights repacked in groups of 16 rows, so one instruction works on 16 output rows.
//!
//! Why: in ggml's layout (one row after another, 34-byte blocks) a dot product of one weight
//! row with one activation row ends in a horizontal sum per 32-value block (the block's
//! scale must be applied to its own sum), which costs more instructions than the products
//! themselves; with several activation rows (batched decode, prefill) that work is repeated
//! per row and the kernel becomes compute-bound. Here the 16 rows of a group are interleaved
//! four bytes at a time: one 64-byte load holds the same four values of all 16 rows, a
//! `vpdpbusd` against four broadcast activation values adds them into 16 lanes, one lane per
//! output row, and a block's scales are applied to 16 rows with one multiply. Nothing is
//! summed across lanes. (llama.cpp repacks Q8_0 the same way on CPUs with AVX-512.)
//!
//! Layout of a group (`16 × row_bytes` bytes, the size of its 16 rows in ggml's layout): for
//! each block `b` in order, 544 bytes:
//! - the 16 rows' f16 scales `d` (32 bytes, row `i` at `2i`);
//! - for each 4-value run `g` in 0..8 of the block, 64 bytes: row `i`'s values
//!   `4g..4g+4` at `4i`, each stored as `q + 128` (`q ^ 0x80`, an unsigned byte), which is
//!   what `vpdpbusd` multiplies; the kernels subtract `128 · Σ a` to undo the offset.
//!
//! Arithmetic (every backend, so the bits are the same): per row `i` and block `b`, the exact
//! integer `p = Σ q_w q_a` over the block's 32 values, then `acc += (d_w · d_a) · p` with one
//! f32 accumulator per row, blocks in order (a multiply, then an add; no fused multiply-add).
//! This is the order of ggml's own reference `vec_dot_q8_0_q8_0` (one sum, blocks in order).

use super::act::ActRow;
use super::format::f16_at;

/// Rows per group.
pub const ROWS: usize = 16;
/// Bytes of one block of a group: 16 scales and 16 × 32 values.
pub const BLOCK: usize = ROWS * 34;

/// Writes the group of the 16 ggml-layout Q8_0 rows `rows` (each `nb × 34` bytes) into `dst`
/// (`16 × nb × 34` bytes) in this module's layout.
pub fn pack_group(rows: &[&[u8]; ROWS], dst: &mut [u8]) {
    for (b, out) in dst.chunks_exact_mut(BLOCK).enumerate() {
        let (scales, values) = out.split_at_mut(2 * ROWS);
        for (i, row) in rows.iter().enumerate() {
            let blk = &row[34 * b..34 * b + 34];
            scales[2 * i..2 * i + 2].copy_from_slice(&blk[..2]);
            for g in 0..8 {
                for v in 0..4 {
                    values[64 * g + 4 * i + v] = blk[2 + 4 * g + v] ^ 0x80;
                }
            }
        }
    }
}

/// Row `i` of a packed `group` back in ggml's layout (`nb × 34` bytes into `dst`).
pub fn unpack_row(group: &[u8], i: usize, dst: &mut [u8]) {
    for (blk, out) in group.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(34)) {
        out[..2].copy_from_slice(&blk[2 * i..2 * i + 2]);
        for g in 0..8 {
            for v in 0..4 {
                out[2 + 4 * g + v] = blk[2 * ROWS + 64 * g + 4 * i + v] ^ 0x80;
            }
        }
    }
}

/// `out[i · m + r] = Σ_k w_i,k · a_r,k` for the 16 rows `i` of `group` and the `m =
/// acts.len()` activation rows (the output's layout is the caller's transposed `(rows, m)`).
pub fn dot_group(backend: super::Backend, group: &[u8], acts: &[ActRow<'_>], out: &mut [f32]) {
    let m = acts.len();
    assert!(out.len() >= ROWS * m && group.len().is_multiple_of(BLOCK));
    let nb = group.len() / BLOCK;
    assert!(acts
        .iter()
        .all(|a| a.q.len() >= 32 * nb && a.d.len() >= nb && a.sums.len() >= 2 * nb));
    match backend {
        // SAFETY: `Backend::Vnni` is only produced when the CPU has AVX-512 F/BW/VL/VNNI, AVX2
        // and F16C; the lengths were checked above.
        #[cfg(target_arch = "x86_64")]
        super::Backend::Vnni => unsafe { vnni::dot_group(group, acts, out) },
        // SAFETY: `Avx2` and `Avx512` are only produced when the CPU has AVX2 and F16C.
        #[cfg(target_arch = "x86_64")]
        super::Backend::Avx2 | super::Backend::Avx512 => unsafe {
            avx2::dot_group(group, acts, out)
        },
        super::Backend::Portable => portable_dot_group(group, acts, out),
    }
}

/// The plain version of [`dot_group`] (and the definition of its arithmetic).
fn portable_dot_group(group: &[u8], acts: &[ActRow<'_>], out: &mut [f32]) {
    let m = acts.len();
    for (r, a) in acts.iter().enumerate() {
        let mut acc = [0f32; ROWS];
        for (b, blk) in group.chunks_exact(BLOCK).enumerate() {
            let qa = &a.q[32 * b..32 * b + 32];
            for (i, acc) in acc.iter_mut().enumerate() {
                let mut p = 0i32;
                for g in 0..8 {
                    for v in 0..4 {
                        let w = (blk[2 * ROWS + 64 * g + 4 * i + v] ^ 0x80) as i8;
                        p += i32::from(w) * i32::from(qa[4 * g + v]);
                    }
                }
                *acc += (f16_at(blk, 2 * i) * a.d[b]) * p as f32;
            }
        }
        for (i, v) in acc.iter().enumerate() {
            out[i * m + r] = *v;
        }
    }
}

/// The four activation values `4g..4g+4` of block `b` as one little-endian i32.
///
/// # Safety
/// `a.q` holds block `b` (checked once by [`dot_group`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn quad(a: &ActRow<'_>, b: usize, g: usize) -> i32 {
    std::ptr::read_unaligned(a.q.as_ptr().add(32 * b + 4 * g) as *const i32)
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::*;
    use std::arch::x86_64::*;

    /// Activation rows per pass over the group's blocks (their accumulators stay in registers).
    const PASS: usize = 8;

    /// # Safety
    /// AVX-512 F/BW/VL/VNNI, AVX2, F16C; lengths checked by [`super::dot_group`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    pub(super) unsafe fn dot_group(group: &[u8], acts: &[ActRow<'_>], out: &mut [f32]) {
        let m = acts.len();
        let nb = group.len() / BLOCK;
        let gp = group.as_ptr();
        for (pass, rows) in acts.chunks(PASS).enumerate() {
            let mut acc = [_mm512_setzero_ps(); PASS];
            for b in 0..nb {
                let blk = gp.add(b * BLOCK);
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH + 64) as *const i8);
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
                let w: [__m512i; 8] = std::array::from_fn(|g| {
                    _mm512_loadu_si512(blk.add(2 * ROWS + 64 * g) as *const _)
                });
                for (r, a) in rows.iter().enumerate() {
                    // Two chains of four, so the multiply-adds overlap.
                    let mut p0 = _mm512_dpbusd_epi32(
                        _mm512_setzero_si512(),
                        w[0],
                        _mm512_set1_epi32(quad(a, b, 0)),
                    );
                    let mut p1 = _mm512_dpbusd_epi32(
                        _mm512_setzero_si512(),
                        w[1],
                        _mm512_set1_epi32(quad(a, b, 1)),
                    );
                    for g in (2..8).step_by(2) {
                        p0 = _mm512_dpbusd_epi32(p0, w[g], _mm512_set1_epi32(quad(a, b, g)));
                        p1 =
                            _mm512_dpbusd_epi32(p1, w[g + 1], _mm512_set1_epi32(quad(a, b, g + 1)));
                    }
                    // Undo the +128 of the stored values: Σ (q + 128) a − 128 Σ a.
                    let offset = 128 * (i32::from(a.sums[2 * b]) + i32::from(a.sums[2 * b + 1]));
                    let p = _mm512_sub_epi32(_mm512_add_epi32(p0, p1), _mm512_set1_epi32(offset));
                    let s = _mm512_mul_ps(dw, _mm512_set1_ps(a.d[b]));
                    acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(s, _mm512_cvtepi32_ps(p)));
                }
            }
            for (r, acc) in acc[..rows.len()].iter().enumerate() {
                let mut lanes = [0f32; ROWS];
                _mm512_storeu_ps(lanes.as_mut_ptr(), *acc);
                for (i, v) in lanes.iter().enumerate() {
                    out[i * m + pass * PASS + r] = *v;
                }
            }
        }
    }

    /// How far ahead the group's blocks are asked for (bytes).
    const PREFETCH: usize = 4 * BLOCK;
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// Activation rows per pass over the group's blocks.
    const PASS: usize = 4;

    /// The signed values (`stored ^ 0x80`) of rows `8h..8h+8`, run `g`, of block `blk`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values(blk: *const u8, g: usize, h: usize) -> __m256i {
        let v = _mm256_loadu_si256(blk.add(2 * ROWS + 64 * g + 32 * h) as *const __m256i);
        _mm256_xor_si256(v, _mm256_set1_epi8(-128))
    }

    /// # Safety
    /// AVX2 and F16C; lengths checked by [`super::dot_group`].
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn dot_group(group: &[u8], acts: &[ActRow<'_>], out: &mut [f32]) {
        let m = acts.len();
        let nb = group.len() / BLOCK;
        let gp = group.as_ptr();
        let ones = _mm256_set1_epi16(1);
        for (pass, rows) in acts.chunks(PASS).enumerate() {
            // Rows 0..8 and 8..16 of the group, per activation row.
            let mut acc = [[_mm256_setzero_ps(); 2]; PASS];
            for b in 0..nb {
                let blk = gp.add(b * BLOCK);
                let dw = [
                    _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i)),
                    _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i)),
                ];
                for (r, a) in rows.iter().enumerate() {
                    let mut p = [_mm256_setzero_si256(); 2];
                    for g in 0..8 {
                        let av = _mm256_set1_epi32(quad(a, b, g));
                        for (h, p) in p.iter_mut().enumerate() {
                            // |w| · (a with w's sign): pairs fit i16 (|w| <= 128 as an
                            // unsigned byte, also for a stored -128; a is never -128).
                            let w = values(blk, g, h);
                            let pair =
                                _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(av, w));
                            *p = _mm256_add_epi32(*p, _mm256_madd_epi16(pair, ones));
                        }
                    }
                    let da = _mm256_set1_ps(a.d[b]);
                    for h in 0..2 {
                        let s = _mm256_mul_ps(dw[h], da);
                        let f = _mm256_cvtepi32_ps(p[h]);
                        acc[r][h] = _mm256_add_ps(acc[r][h], _mm256_mul_ps(s, f));
                    }
                }
            }
            for (r, acc) in acc[..rows.len()].iter().enumerate() {
                let mut lanes = [0f32; ROWS];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[1]);
                for (i, v) in lanes.iter().enumerate() {
                    out[i * m + pass * PASS + r] = *v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::quant::{format, Backend, QActs, QType};

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    /// 16 ggml rows of `k` values, with the extremes -127/127 and a -128 the quantizer never
    /// writes but a GGUF file may hold.
    fn rows(k: usize, seed: u64) -> Vec<Vec<u8>> {
        let rb = QType::Q8_0.row_bytes(k);
        (0..ROWS)
            .map(|i| {
                let mut out = vec![0u8; rb];
                format::quantize_row(QType::Q8_0, &values(k, seed + i as u64), &mut out);
                if i == 3 {
                    out[2] = 0x80; // -128
                    out[3] = 0x7f;
                }
                out
            })
            .collect()
    }

    #[test]
    fn packing_round_trips() {
        let k = 96;
        let rs = rows(k, 1);
        let refs: [&[u8]; ROWS] = std::array::from_fn(|i| rs[i].as_slice());
        let mut group = vec![0u8; ROWS * rs[0].len()];
        pack_group(&refs, &mut group);
        for (i, r) in rs.iter().enumerate() {
            let mut back = vec![0u8; r.len()];
            unpack_row(&group, i, &mut back);
            assert_eq!(&back, r, "row {i}");
        }
    }

    /// Every backend against the f64 dot product of the dequantized values, and all of them
    /// bit-identical to the portable one, for 1..=17 activation rows (passes and tails).
    #[test]
    fn every_backend_matches_the_oracle_and_each_other() {
        for k in [32, 96, 1536] {
            let rs = rows(k, 7);
            let refs: [&[u8]; ROWS] = std::array::from_fn(|i| rs[i].as_slice());
            let mut group = vec![0u8; ROWS * rs[0].len()];
            pack_group(&refs, &mut group);
            for m in [1, 2, 3, 4, 5, 8, 9, 17] {
                let x = values(m * k, 100 + m as u64);
                let acts = QActs::quantize(QType::Q8_0, &x, m, k);
                let views: Vec<_> = (0..m).map(|r| acts.row(r)).collect();
                let mut want = vec![0f32; ROWS * m];
                portable_dot_group(&group, &views, &mut want);
                let xq = acts.dequantize();
                for (i, r) in rs.iter().enumerate() {
                    let mut w = vec![0f32; k];
                    format::dequantize_row(QType::Q8_0, r, &mut w);
                    for j in 0..m {
                        let exact: f64 = w
                            .iter()
                            .zip(&xq[j * k..(j + 1) * k])
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum();
                        let got = f64::from(want[i * m + j]);
                        assert!(
                            (got - exact).abs() <= 1e-4 * (1.0 + exact.abs()),
                            "k {k} m {m} row {i} act {j}: {got} vs {exact}"
                        );
                    }
                }
                for backend in Backend::available() {
                    let mut got = vec![0f32; ROWS * m];
                    dot_group(backend, &group, &views, &mut got);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{backend:?} k {k} m {m}: {got:?} vs {want:?}");
                }
            }
        }
    }
}

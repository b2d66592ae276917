//! Q4_K weights repacked in groups of 16 rows for CPUs with AVX-512 VNNI: the Q4_K sibling
//! of [`super::q8x16`].
//!
//! Why: a Q4_K row dotted alone unpacks each block's 4-bit values and 6-bit scales and sums
//! each 32-value sub-block across lanes before scaling it; one core then computes about as
//! fast as its share of the memory bandwidth delivers, so decode is compute-bound (55% of
//! the bandwidth floor), and a batch of rows multiplies the work. With 16 rows interleaved,
//! one 64-byte load holds four values of two sub-blocks for all 16 rows (ggml's own byte:
//! low nibble sub-block `2c`, high nibble `2c + 1`), a `vpdpbusd` per nibble half adds them
//! into 16 lanes, one per output row, and the scales, mins and `d`s are applied to 16 rows
//! per instruction.
//!
//! Layout of a block `b` of a group (2304 bytes, the size of the 16 rows' blocks in ggml's
//! layout): the 16 rows' `d` (f16, 32 bytes), their `dmin` (32 bytes), the 12 packed
//! scale/min bytes as 12 runs of 16 (byte `t` of row `i` at `64 + 16t + i`), then for each
//! sub-block pair `c` in 0..4 and run `g` in 0..8 the 64 bytes `qs[32c + 4g .. +4]` of the 16
//! rows (row `i` at `4i`).
//!
//! Arithmetic: exactly the rows kernels' (`kernels.rs`, Q4_K): per row and block the exact
//! integers `isum = Σ_j sc_j Σ q a` and `msum = Σ_j m_j Σ a`, then
//! `acc += d_a · (d · isum − dmin · msum)`, blocks in order; so a packed matrix gives the
//! same bits as its rows do one by one, on every backend. Only VNNI reads this layout; the
//! other backends get each row back in ggml's layout ([`unpack_row`]), which is why matrices
//! are packed only where [`super::Backend::detect`] is VNNI.

use super::ROWS;
use crate::ops::quant::act::ActRow;
/// Bytes of one block of a group.
pub const BLOCK: usize = ROWS * 144;

/// Writes the 16 ggml-layout Q4_K rows `rows` into `dst` (`16 × row_bytes`) in this layout.
pub fn pack_group(rows: &[&[u8]; ROWS], dst: &mut [u8]) {
    for (b, out) in dst.chunks_exact_mut(BLOCK).enumerate() {
        for (i, row) in rows.iter().enumerate() {
            let blk = &row[144 * b..144 * b + 144];
            out[2 * i..2 * i + 2].copy_from_slice(&blk[0..2]);
            out[32 + 2 * i..32 + 2 * i + 2].copy_from_slice(&blk[2..4]);
            for t in 0..12 {
                out[64 + 16 * t + i] = blk[4 + t];
            }
            for c in 0..4 {
                for g in 0..8 {
                    let at = 256 + 512 * c + 64 * g + 4 * i;
                    out[at..at + 4].copy_from_slice(&blk[16 + 32 * c + 4 * g..][..4]);
                }
            }
        }
    }
}

/// Row `i` of a packed `group` back in ggml's layout (into `dst`, `row_bytes` long).
pub fn unpack_row(group: &[u8], i: usize, dst: &mut [u8]) {
    for (blk, out) in group.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(144)) {
        out[0..2].copy_from_slice(&blk[2 * i..2 * i + 2]);
        out[2..4].copy_from_slice(&blk[32 + 2 * i..32 + 2 * i + 2]);
        for t in 0..12 {
            out[4 + t] = blk[64 + 16 * t + i];
        }
        for c in 0..4 {
            for g in 0..8 {
                let at = 256 + 512 * c + 64 * g + 4 * i;
                out[16 + 32 * c + 4 * g..][..4].copy_from_slice(&blk[at..at + 4]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod vnni {
    use super::*;
    use std::arch::x86_64::*;

    /// Activation rows per pass over the group's blocks.
    const PASS: usize = 4;

    /// The four activation values `at..at + 4`, broadcast.
    #[inline(always)]
    unsafe fn quad(a: &ActRow<'_>, at: usize) -> __m512i {
        _mm512_set1_epi32(super::super::quad(a, at))
    }

    /// The 8 scales and 8 mins of the 16 rows of a block, as 16 i32 lanes each (ggml's
    /// `get_scale_min_k4`, 16 rows at a time).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    unsafe fn scales_mins(blk: *const u8) -> ([__m512i; 8], [__m512i; 8]) {
        let s: [__m128i; 12] =
            std::array::from_fn(|t| _mm_loadu_si128(blk.add(64 + 16 * t) as *const __m128i));
        let low6 = _mm_set1_epi8(63);
        let low4 = _mm_set1_epi8(0x0f);
        let top2 = |x: __m128i| {
            _mm_slli_epi16::<4>(_mm_and_si128(_mm_srli_epi16::<6>(x), _mm_set1_epi8(3)))
        };
        let mut sc = [_mm512_setzero_si512(); 8];
        let mut mn = [_mm512_setzero_si512(); 8];
        for j in 0..8 {
            let (d, m) = if j < 4 {
                (_mm_and_si128(s[j], low6), _mm_and_si128(s[j + 4], low6))
            } else {
                (
                    _mm_or_si128(_mm_and_si128(s[j + 4], low4), top2(s[j - 4])),
                    _mm_or_si128(
                        _mm_and_si128(_mm_srli_epi16::<4>(s[j + 4]), low4),
                        top2(s[j]),
                    ),
                )
            };
            sc[j] = _mm512_cvtepu8_epi32(d);
            mn[j] = _mm512_cvtepu8_epi32(m);
        }
        (sc, mn)
    }

    /// # Safety
    /// AVX-512 F/BW/VL/VNNI, AVX2, F16C; lengths checked by [`super::super::dot_group`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    pub(in crate::ops::quant::packed) unsafe fn dot_group(
        group: &[u8],
        acts: &[ActRow<'_>],
        out: &mut [f32],
    ) {
        super::super::by_passes::<PASS>(acts, out, |rows| match rows.len() {
            1 => pass_rows::<1>(group, rows),
            2 => pass_rows::<2>(group, rows),
            3 => pass_rows::<3>(group, rows),
            _ => pass_rows::<4>(group, rows),
        });
    }

    /// The 16 rows' results for `R` activation rows (`rows.len() == R`) in the slots `0..R`:
    /// with `R` a constant the accumulators stay in registers and the loops over the rows
    /// are unrolled (as in Q8_0's kernel, where that made 8 rows 29% faster).
    ///
    /// # Safety
    /// As [`dot_group`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    #[inline]
    unsafe fn pass_rows<const R: usize>(group: &[u8], rows: &[ActRow<'_>]) -> [[f32; ROWS]; PASS] {
        let rows: &[ActRow<'_>; R] = rows.try_into().expect("R activation rows");
        let nb = group.len() / BLOCK;
        let gp = group.as_ptr();
        let low4 = _mm512_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let blk = gp.add(b * BLOCK);
            super::super::prefetch_ahead(blk, BLOCK);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
            let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(32) as *const __m256i));
            let (sc, mn) = scales_mins(blk);
            let mut isum = [_mm512_setzero_si512(); R];
            for c in 0..4 {
                let mut lo = [_mm512_setzero_si512(); R];
                let mut hi = [_mm512_setzero_si512(); R];
                for g in 0..8 {
                    let v = _mm512_loadu_si512(blk.add(256 + 512 * c + 64 * g) as *const _);
                    let vl = _mm512_and_si512(v, low4);
                    let vh = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low4);
                    for (r, a) in rows.iter().enumerate() {
                        let at = 256 * b + 64 * c + 4 * g;
                        lo[r] = _mm512_dpbusd_epi32(lo[r], vl, quad(a, at));
                        hi[r] = _mm512_dpbusd_epi32(hi[r], vh, quad(a, at + 32));
                    }
                }
                for r in 0..R {
                    let s = _mm512_add_epi32(
                        _mm512_mullo_epi32(lo[r], sc[2 * c]),
                        _mm512_mullo_epi32(hi[r], sc[2 * c + 1]),
                    );
                    isum[r] = _mm512_add_epi32(isum[r], s);
                }
            }
            for (r, a) in rows.iter().enumerate() {
                let sums = &a.sums[16 * b..16 * b + 16];
                let mut msum = _mm512_setzero_si512();
                for (j, mn) in mn.iter().enumerate() {
                    let asum = i32::from(sums[2 * j]) + i32::from(sums[2 * j + 1]);
                    msum = _mm512_add_epi32(msum, _mm512_mullo_epi32(*mn, _mm512_set1_epi32(asum)));
                }
                let t = _mm512_sub_ps(
                    _mm512_mul_ps(d, _mm512_cvtepi32_ps(isum[r])),
                    _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(msum)),
                );
                acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(_mm512_set1_ps(a.d[b]), t));
            }
        }
        let mut lanes = [[0f32; ROWS]; PASS];
        for (l, acc) in lanes.iter_mut().zip(&acc) {
            _mm512_storeu_ps(l.as_mut_ptr(), *acc);
        }
        lanes
    }
}

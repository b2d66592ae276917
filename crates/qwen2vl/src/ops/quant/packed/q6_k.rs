//! Q6_K weights repacked in groups of 16 rows for CPUs with AVX-512 VNNI: the Q6_K sibling
//! of [`super::q4kx16`] (same reasons; a q4_k_m model keeps its LM head, and some `v` and
//! `down` matrices, in Q6_K: about a third of its bytes).
//!
//! Layout of a block of a group (3360 bytes, the 16 rows' blocks in ggml's layout): the 16
//! rows' `d` (f16, 32 bytes); the 16 sub-block scales (i8) as 16 runs of 16 rows (scale `g` of
//! row `i` at `32 + 16g + i`); the low bits `ql` as 32 runs of four bytes, run `(n, t)` =
//! `ql[64n + 4t .. +4]` of the 16 rows at `288 + 64 (16n + t) + 4i`; the high bits `qh` as 16
//! runs, run `(n, t)` = `qh[32n + 4t .. +4]` at `2336 + 64 (8n + t) + 4i`. A run of `ql` with
//! the matching run of `qh` gives four 6-bit values of each of 16 rows, ready for
//! `vpdpbusd`.
//!
//! Arithmetic: exactly the rows kernels' (Q6_K in `kernels.rs`): per row and block the exact
//! integer `isum = Σ_g sc_g (Σ q a − 32 Σ a)` over the 16-value sub-blocks `g`, then
//! `acc += d_a · (d · isum)`, blocks in order. Only VNNI reads this layout (see
//! [`super::q4kx16`]).

use super::ROWS;
use crate::ops::quant::act::ActRow;
/// Bytes of one block of a group.
pub const BLOCK: usize = ROWS * 210;
const SCALES: usize = 32;
const QL: usize = SCALES + 256;
const QH: usize = QL + 2048;

/// Writes the 16 ggml-layout Q6_K rows `rows` into `dst` (`16 × row_bytes`) in this layout.
pub fn pack_group(rows: &[&[u8]; ROWS], dst: &mut [u8]) {
    for (b, out) in dst.chunks_exact_mut(BLOCK).enumerate() {
        for (i, row) in rows.iter().enumerate() {
            let blk = &row[210 * b..210 * b + 210];
            out[2 * i..2 * i + 2].copy_from_slice(&blk[208..210]);
            for g in 0..16 {
                out[SCALES + 16 * g + i] = blk[192 + g];
            }
            for run in 0..32 {
                out[QL + 64 * run + 4 * i..][..4].copy_from_slice(&blk[4 * run..4 * run + 4]);
            }
            for run in 0..16 {
                out[QH + 64 * run + 4 * i..][..4]
                    .copy_from_slice(&blk[128 + 4 * run..128 + 4 * run + 4]);
            }
        }
    }
}

/// Row `i` of a packed `group` back in ggml's layout (into `dst`, `row_bytes` long).
pub fn unpack_row(group: &[u8], i: usize, dst: &mut [u8]) {
    for (blk, out) in group.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(210)) {
        out[208..210].copy_from_slice(&blk[2 * i..2 * i + 2]);
        for g in 0..16 {
            out[192 + g] = blk[SCALES + 16 * g + i];
        }
        for run in 0..32 {
            out[4 * run..4 * run + 4].copy_from_slice(&blk[QL + 64 * run + 4 * i..][..4]);
        }
        for run in 0..16 {
            out[128 + 4 * run..128 + 4 * run + 4]
                .copy_from_slice(&blk[QH + 64 * run + 4 * i..][..4]);
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

    /// The 6-bit values of quarters 0..4 of run `(n, t)` (values `128n + 32q + 4t .. +4` of
    /// the 16 rows), from its `ql` runs `t` and `t + 8` and its `qh` run.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    unsafe fn sixes(blk: *const u8, n: usize, t: usize) -> [__m512i; 4] {
        let load = |at: usize| _mm512_loadu_si512(blk.add(at) as *const _);
        let (a, b) = (
            load(QL + 64 * (16 * n + t)),
            load(QL + 64 * (16 * n + t + 8)),
        );
        let h = load(QH + 64 * (8 * n + t));
        let low4 = _mm512_set1_epi8(0x0f);
        let bits45 = _mm512_set1_epi8(0x30);
        let hi = |x: __m512i| _mm512_and_si512(x, bits45);
        [
            _mm512_or_si512(_mm512_and_si512(a, low4), hi(_mm512_slli_epi16::<4>(h))),
            _mm512_or_si512(_mm512_and_si512(b, low4), hi(_mm512_slli_epi16::<2>(h))),
            _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(a), low4), hi(h)),
            _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16::<4>(b), low4),
                hi(_mm512_srli_epi16::<2>(h)),
            ),
        ]
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
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let blk = gp.add(b * BLOCK);
            super::super::prefetch_ahead(blk, BLOCK);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
            let mut isum = [_mm512_setzero_si512(); R];
            // Sub-blocks g = 8n + 2q + half: runs t = 4 half .. 4 half + 4 of quarter q.
            for n in 0..2 {
                for half in 0..2 {
                    let mut p = [[_mm512_setzero_si512(); 4]; R];
                    for t in 4 * half..4 * half + 4 {
                        let v = sixes(blk, n, t);
                        for (r, a) in rows.iter().enumerate() {
                            for q in 0..4 {
                                let at = 256 * b + 128 * n + 32 * q + 4 * t;
                                p[r][q] = _mm512_dpbusd_epi32(p[r][q], v[q], quad(a, at));
                            }
                        }
                    }
                    for (r, a) in rows.iter().enumerate() {
                        for (q, p) in p[r].iter().enumerate() {
                            let g = 8 * n + 2 * q + half;
                            let sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                                blk.add(SCALES + 16 * g) as *const __m128i,
                            ));
                            // The stored values are q + 32: take 32 × Σa back off.
                            let offset = 32 * i32::from(a.sums[16 * b + g]);
                            let t = _mm512_sub_epi32(*p, _mm512_set1_epi32(offset));
                            isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(sc, t));
                        }
                    }
                }
            }
            for (r, a) in rows.iter().enumerate() {
                let t = _mm512_mul_ps(d, _mm512_cvtepi32_ps(isum[r]));
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

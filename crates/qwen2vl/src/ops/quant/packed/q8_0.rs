//! Q8_0 in groups of 16 rows ([`super`] says why).
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

use super::ROWS;
use crate::ops::quant::act::ActRow;
use crate::ops::quant::format::f16_at;
use crate::ops::quant::Backend;
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

/// [`super::dot_group`] for Q8_0 (lengths checked there).
pub(super) fn dot_group(backend: Backend, group: &[u8], acts: &[ActRow<'_>], out: &mut [f32]) {
    match backend {
        // SAFETY: `Backend::Vnni` is only produced when the CPU has AVX-512 F/BW/VL/VNNI, AVX2
        // and F16C; the lengths were checked by the caller.
        #[cfg(target_arch = "x86_64")]
        Backend::Vnni => unsafe { vnni::dot_group(group, acts, out) },
        // SAFETY: `Avx2` and `Avx512` are only produced when the CPU has AVX2 and F16C.
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 | Backend::Avx512 => unsafe { avx2::dot_group(group, acts, out) },
        Backend::Portable => portable_dot_group(group, acts, out),
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

/// The four activation values `4g..4g+4` of block `b`.
///
/// # Safety
/// `a.q` holds block `b`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn quad(a: &ActRow<'_>, b: usize, g: usize) -> i32 {
    super::quad(a, 32 * b + 4 * g)
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::*;
    use std::arch::x86_64::*;

    /// Activation rows per pass over the group's blocks (their accumulators stay in registers).
    const PASS: usize = 8;

    /// # Safety
    /// AVX-512 F/BW/VL/VNNI, AVX2, F16C; lengths checked by [`super::super::dot_group`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    pub(super) unsafe fn dot_group(group: &[u8], acts: &[ActRow<'_>], out: &mut [f32]) {
        let m = acts.len();
        let nb = group.len() / BLOCK;
        let gp = group.as_ptr();
        for (pass, rows) in acts.chunks(PASS).enumerate() {
            let mut acc = [_mm512_setzero_ps(); PASS];
            for b in 0..nb {
                let blk = gp.add(b * BLOCK);
                super::super::prefetch_ahead(blk, BLOCK);
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
                super::super::scatter(&lanes, out, m, pass * PASS + r);
            }
        }
    }
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
    /// AVX2 and F16C; lengths checked by [`super::super::dot_group`].
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
                super::super::scatter(&lanes, out, m, pass * PASS + r);
            }
        }
    }
}

//! Dot products of one quantized weight row with one quantized activation row.
//!
//! Every path computes each block's integer sums exactly (they fit in i32: at most 256 ×
//! 127 × 127 × 128) and then the same f32 expression in the same order, so the AVX2 path and
//! the portable one give bit-identical results; the oracle (f64 over dequantized values, in
//! `super::tests`) bounds them both.
//!
//! - Q8_0: `Σ_b (d_w,b · d_a,b) · Σ q_w q_a`, blocks added in order.
//! - Q4_K: per block `d_a · (d · Σ_j sc_j Σ q a − dmin · Σ_j m_j · Σa_j)`, with `Σa_j`, the
//!   sum of the 32 activation values of sub-block `j`, taken from the activation's sums.
//! - Q6_K: per block `d_a · d · Σ_g sc_g (Σ q a − 32 Σa_g)`.

use super::act::ActRow;
use super::format::{f16_at, q4k_scales_mins, q6k_value, QType};

/// Which inner loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `std::arch` AVX2 (integer multiply-adds on 32 bytes at a time); chosen when the CPU
    /// has it.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Plain Rust.
    Portable,
}

impl Backend {
    /// The fastest backend this CPU runs (detected once by `std`, cached).
    pub fn detect() -> Backend {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Backend::Avx2;
        }
        Backend::Portable
    }

    /// Every backend this CPU can run (tests compare them all).
    pub fn available() -> Vec<Backend> {
        let mut v = vec![Backend::Portable];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            v.push(Backend::Avx2);
        }
        v
    }
}

/// `Σ w·a` of weight row `w` (`t.row_bytes(k)` bytes) and activation row `a`.
#[inline]
pub fn dot(backend: Backend, t: QType, w: &[u8], a: ActRow<'_>) -> f32 {
    match backend {
        // SAFETY: `Backend::Avx2` is only produced when the CPU has AVX2 (`detect`,
        // `available`); the slices' lengths are checked inside.
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 => unsafe {
            match t {
                QType::Q8_0 => avx2::dot_q8_0(w, a),
                QType::Q4K => avx2::dot_q4k(w, a),
                QType::Q6K => avx2::dot_q6k(w, a),
            }
        },
        Backend::Portable => match t {
            QType::Q8_0 => portable::dot_q8_0(w, a),
            QType::Q4K => portable::dot_q4k(w, a),
            QType::Q6K => portable::dot_q6k(w, a),
        },
    }
}

/// The f32 part of a Q4_K block, shared by every backend so they round alike.
#[inline(always)]
fn q4k_block(blk: &[u8], da: f32, isum: i32, msum: i32) -> f32 {
    da * (f16_at(blk, 0) * isum as f32 - f16_at(blk, 2) * msum as f32)
}

/// `Σ_j m_j · (Σa over sub-block j)` of a Q4_K block.
#[inline(always)]
fn q4k_min_sum(m: u64, sums: &[i32]) -> i32 {
    (0..8)
        .map(|j| ((m >> (8 * j)) & 0xff) as i32 * (sums[2 * j] + sums[2 * j + 1]))
        .sum()
}

/// `Σ_g sc_g · Σa_g` of a Q6_K block (the offset of 32 is subtracted through it).
#[inline(always)]
fn q6k_offset_sum(scales: &[u8], sums: &[i32]) -> i32 {
    scales
        .iter()
        .zip(sums)
        .map(|(&s, &a)| i32::from(s as i8) * a)
        .sum()
}

mod portable {
    use super::*;

    pub(super) fn dot_q8_0(w: &[u8], a: ActRow<'_>) -> f32 {
        let mut acc = 0f32;
        for (b, blk) in w.chunks_exact(34).enumerate() {
            let isum: i32 = blk[2..34]
                .iter()
                .zip(&a.q[32 * b..32 * b + 32])
                .map(|(&x, &y)| i32::from(x as i8) * i32::from(y))
                .sum();
            acc += (f16_at(blk, 0) * a.d[b]) * isum as f32;
        }
        acc
    }

    pub(super) fn dot_q4k(w: &[u8], a: ActRow<'_>) -> f32 {
        let mut acc = 0f32;
        for (b, blk) in w.chunks_exact(144).enumerate() {
            let (sc, m) = q4k_scales_mins(&blk[4..16]);
            let qs = &blk[16..144];
            let aq = &a.q[256 * b..256 * b + 256];
            let mut isum = 0i32;
            for c in 0..4 {
                let (mut lo, mut hi) = (0i32, 0i32);
                for i in 0..32 {
                    let byte = qs[32 * c + i];
                    lo += i32::from(byte & 0x0f) * i32::from(aq[64 * c + i]);
                    hi += i32::from(byte >> 4) * i32::from(aq[64 * c + 32 + i]);
                }
                isum += ((sc >> (16 * c)) & 0xff) as i32 * lo;
                isum += ((sc >> (16 * c + 8)) & 0xff) as i32 * hi;
            }
            let msum = q4k_min_sum(m, &a.sums[16 * b..16 * b + 16]);
            acc += q4k_block(blk, a.d[b], isum, msum);
        }
        acc
    }

    pub(super) fn dot_q6k(w: &[u8], a: ActRow<'_>) -> f32 {
        let mut acc = 0f32;
        for (b, blk) in w.chunks_exact(210).enumerate() {
            let aq = &a.q[256 * b..256 * b + 256];
            let mut isum = 0i32;
            for g in 0..16 {
                let s: i32 = (16 * g..16 * g + 16)
                    .map(|e| i32::from(q6k_value(blk, e)) * i32::from(aq[e]))
                    .sum();
                isum += i32::from(blk[192 + g] as i8) * s;
            }
            isum -= 32 * q6k_offset_sum(&blk[192..208], &a.sums[16 * b..16 * b + 16]);
            acc += a.d[b] * (f16_at(blk, 208) * isum as f32);
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// Sum of the eight i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// `Σ w·a` over 32 signed bytes each, as eight i32 partial sums (`a` never -128).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot32_i8(w: __m256i, a: __m256i) -> __m256i {
        let p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }

    /// Block `b`'s eight partial sums.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn q8_0_block(wp: *const u8, ap: *const i8, b: usize) -> __m256i {
        let wv = _mm256_loadu_si256(wp.add(34 * b + 2) as *const __m256i);
        let av = _mm256_loadu_si256(ap.add(32 * b) as *const __m256i);
        dot32_i8(wv, av)
    }

    /// # Safety
    /// AVX2; `w` whole Q8_0 blocks matching `a`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_q8_0(w: &[u8], a: ActRow<'_>) -> f32 {
        let nb = w.len() / 34;
        assert!(a.q.len() >= 32 * nb && a.d.len() >= nb);
        let (wp, ap) = (w.as_ptr(), a.q.as_ptr());
        let mut acc = 0f32;
        let mut b = 0;
        // Four blocks' sums at once: two rounds of pairwise adds, then the halves.
        while b + 4 <= nb {
            let h01 = _mm256_hadd_epi32(q8_0_block(wp, ap, b), q8_0_block(wp, ap, b + 1));
            let h23 = _mm256_hadd_epi32(q8_0_block(wp, ap, b + 2), q8_0_block(wp, ap, b + 3));
            let h = _mm256_hadd_epi32(h01, h23);
            let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
            let mut sums = [0i32; 4];
            _mm_storeu_si128(sums.as_mut_ptr() as *mut __m128i, s);
            for (i, &isum) in sums.iter().enumerate() {
                let blk = &w[34 * (b + i)..];
                acc += (f16_at(blk, 0) * a.d[b + i]) * isum as f32;
            }
            b += 4;
        }
        while b < nb {
            let isum = hsum(q8_0_block(wp, ap, b));
            acc += (f16_at(&w[34 * b..], 0) * a.d[b]) * isum as f32;
            b += 1;
        }
        acc
    }

    /// # Safety
    /// AVX2; `w` whole Q4_K blocks matching `a`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_q4k(w: &[u8], a: ActRow<'_>) -> f32 {
        let nb = w.len() / 144;
        assert!(a.q.len() >= 256 * nb && a.d.len() >= nb && a.sums.len() >= 16 * nb);
        let low = _mm256_set1_epi8(0x0f);
        let mut acc = 0f32;
        for b in 0..nb {
            let blk = &w[144 * b..144 * b + 144];
            let (sc, m) = q4k_scales_mins(&blk[4..16]);
            let qs = blk.as_ptr().add(16);
            let aq = a.q.as_ptr().add(256 * b);
            let mut isum = _mm256_setzero_si256();
            for c in 0..4 {
                let wv = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
                let lo = _mm256_and_si256(wv, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(wv), low);
                let a_lo = _mm256_loadu_si256(aq.add(64 * c) as *const __m256i);
                let a_hi = _mm256_loadu_si256(aq.add(64 * c + 32) as *const __m256i);
                let s_lo = _mm256_set1_epi16(((sc >> (16 * c)) & 0xff) as i16);
                let s_hi = _mm256_set1_epi16(((sc >> (16 * c + 8)) & 0xff) as i16);
                let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a_lo), s_lo);
                let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a_hi), s_hi);
                isum = _mm256_add_epi32(isum, _mm256_add_epi32(p_lo, p_hi));
            }
            let msum = q4k_min_sum(m, &a.sums[16 * b..16 * b + 16]);
            acc += q4k_block(blk, a.d[b], hsum(isum), msum);
        }
        acc
    }

    /// Bits `SHIFT..SHIFT+2` of each byte of `qh`, moved to bits 4-5 (the top of a 6-bit
    /// value).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn q6_high<const SHIFT: i32>(qh: __m256i, three: __m256i) -> __m256i {
        let h = _mm256_srli_epi16::<SHIFT>(qh);
        _mm256_slli_epi16::<4>(_mm256_and_si256(h, three))
    }

    /// # Safety
    /// AVX2; `w` whole Q6_K blocks matching `a`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_q6k(w: &[u8], a: ActRow<'_>) -> f32 {
        let nb = w.len() / 210;
        assert!(a.q.len() >= 256 * nb && a.d.len() >= nb && a.sums.len() >= 16 * nb);
        let low = _mm256_set1_epi8(0x0f);
        let three = _mm256_set1_epi8(3);
        let mut acc = 0f32;
        for b in 0..nb {
            let blk = &w[210 * b..210 * b + 210];
            let p = blk.as_ptr();
            let aq = a.q.as_ptr().add(256 * b);
            let mut isum = _mm256_setzero_si256();
            for n in 0..2 {
                let ql0 = _mm256_loadu_si256(p.add(64 * n) as *const __m256i);
                let ql1 = _mm256_loadu_si256(p.add(64 * n + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(p.add(128 + 32 * n) as *const __m256i);
                let quarters = [
                    _mm256_or_si256(_mm256_and_si256(ql0, low), q6_high::<0>(qh, three)),
                    _mm256_or_si256(_mm256_and_si256(ql1, low), q6_high::<2>(qh, three)),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low),
                        q6_high::<4>(qh, three),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low),
                        q6_high::<6>(qh, three),
                    ),
                ];
                for (q, v) in quarters.into_iter().enumerate() {
                    let e0 = 128 * n + 32 * q;
                    let av = _mm256_loadu_si256(aq.add(e0) as *const __m256i);
                    let g = e0 / 16;
                    let s = _mm256_set_m128i(
                        _mm_set1_epi16(i16::from(blk[192 + g + 1] as i8)),
                        _mm_set1_epi16(i16::from(blk[192 + g] as i8)),
                    );
                    let d = _mm256_madd_epi16(_mm256_maddubs_epi16(v, av), s);
                    isum = _mm256_add_epi32(isum, d);
                }
            }
            let isum =
                hsum(isum) - 32 * q6k_offset_sum(&blk[192..208], &a.sums[16 * b..16 * b + 16]);
            acc += a.d[b] * (f16_at(blk, 208) * isum as f32);
        }
        acc
    }
}

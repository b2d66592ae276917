//! Dot products of one quantized weight row with one quantized activation row.
//!
//! Every path computes each block's integer sums exactly (they fit in i32: at most 256 ×
//! 127 × 127 × 128) and then the same f32 expression in the same order, so the AVX2 path and
//! the portable one give bit-identical results; the oracle (f64 over dequantized values, in
//! `super::tests`) bounds them both.
//!
//! - Q8_0: `(d_w,b · d_a,b) · Σ q_w q_a` per block, added into four accumulators by block
//!   number mod 4 (so the additions are not one long chain), summed `(0 + 1) + (2 + 3)`.
//! - Q4_K: per block `d_a · (d · Σ_j sc_j Σ q a − dmin · Σ_j m_j · Σa_j)`, with `Σa_j`, the
//!   sum of the 32 activation values of sub-block `j`, taken from the activation's sums.
//! - Q6_K: per block `d_a · d · Σ_g sc_g (Σ q a − 32 Σa_g)`.

use super::act::ActRow;
use super::format::{f16_at, q4k_scales_mins, q6k_value, QType};

/// Which inner loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `std::arch` AVX2 with F16C (integer multiply-adds on 32 bytes at a time); chosen when
    /// the CPU has them and not AVX-512.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 F/BW (64 bytes at a time) for the K formats, AVX2 for Q8_0; chosen when the CPU
    /// has them.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX-512 F/BW/VL with VNNI: as `Avx512`, and Q8_0 products over up to four
    /// activation rows per pass of the weight row with `vpdpbusd` (one instruction per 32
    /// products instead of two multiply-adds), for batched decode and prefill.
    #[cfg(target_arch = "x86_64")]
    Vnni,
    /// `Vnni`, and Intel AMX-INT8 tiles (`tdpbsud`, 16 output rows × up to 16 activation rows
    /// × one 32-value block per instruction) for packed Q8_0 over
    /// [`super::packed::q8_0::AMX_MIN_ROWS`] or more activation rows: batched decode and
    /// prefill, where `vpdpbusd`'s eight instructions per block and activation row made the
    /// product compute-bound. The same bits as `Vnni` (exact integer sums, the same f32
    /// expression). `QWEN2VL_QUANT_AMX=0` keeps `Vnni`.
    #[cfg(target_arch = "x86_64")]
    Amx,
    /// Plain Rust.
    Portable,
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    has_avx2()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

#[cfg(target_arch = "x86_64")]
fn has_vnni() -> bool {
    has_avx512()
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

impl Backend {
    /// The fastest backend this CPU runs (detected once, cached).
    pub fn detect() -> Backend {
        static DETECTED: std::sync::OnceLock<Backend> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(Backend::fastest)
    }

    fn fastest() -> Backend {
        #[cfg(target_arch = "x86_64")]
        {
            if has_vnni() {
                let off = std::env::var("QWEN2VL_QUANT_AMX").is_ok_and(|v| v == "0");
                if crate::ops::amx::int8_available() && !off {
                    return Backend::Amx;
                }
                return Backend::Vnni;
            }
            if has_avx512() {
                return Backend::Avx512;
            }
            if has_avx2() {
                return Backend::Avx2;
            }
        }
        Backend::Portable
    }

    /// Every backend this CPU can run (tests compare them all).
    pub fn available() -> Vec<Backend> {
        let mut v = vec![Backend::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2() {
                v.push(Backend::Avx2);
            }
            if has_avx512() {
                v.push(Backend::Avx512);
            }
            if has_vnni() {
                v.push(Backend::Vnni);
                if crate::ops::amx::int8_available() {
                    v.push(Backend::Amx);
                }
            }
        }
        v
    }
}

/// `Σ w·a` of weight row `w` (`t.row_bytes(k)` bytes) and activation row `a`.
#[inline]
pub fn dot(backend: Backend, t: QType, w: &[u8], a: ActRow<'_>) -> f32 {
    match backend {
        // SAFETY: `Backend::Avx2` is only produced when the CPU has AVX2 and F16C (`detect`,
        // `available`); the slices' lengths are checked inside.
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2 => unsafe {
            match t {
                QType::Q8_0 => avx2::dot_q8_0(w, a),
                QType::Q4K => avx2::dot_q4k(w, a),
                QType::Q6K => avx2::dot_q6k(w, a),
            }
        },
        // SAFETY: `Backend::Avx512` (and `Vnni`, a superset) is only produced when the CPU has
        // AVX-512 F/BW, AVX2 and F16C.
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 | Backend::Vnni | Backend::Amx => unsafe {
            match t {
                QType::Q8_0 => avx2::dot_q8_0(w, a),
                QType::Q4K => avx512::dot_q4k(w, a),
                QType::Q6K => avx512::dot_q6k(w, a),
            }
        },
        Backend::Portable => match t {
            QType::Q8_0 => portable::dot_q8_0(w, a),
            QType::Q4K => portable::dot_q4k(w, a),
            QType::Q6K => portable::dot_q6k(w, a),
        },
    }
}

/// A kernel over one weight row and up to four activation rows.
#[cfg(target_arch = "x86_64")]
type RowsKernel = unsafe fn(&[u8], &[ActRow<'_>], &mut [f32]);

/// `out[r] = dot(w, acts[r])` for every activation row: one weight row against a batch
/// (decode of several sequences, prefill). Each result has the bits [`dot`] gives alone;
/// with AVX-512 the K formats, and with VNNI Q8_0, unpack each weight block once for up to
/// four activation rows and reduce the four rows' sums together.
#[inline]
pub fn dot_rows(backend: Backend, t: QType, w: &[u8], acts: &[ActRow<'_>], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if matches!(backend, Backend::Avx512 | Backend::Vnni | Backend::Amx) && acts.len() > 1 {
        let rows: Option<RowsKernel> = match (backend, t) {
            (Backend::Vnni | Backend::Amx, QType::Q8_0) => Some(vnni::dot_q8_0_rows),
            (_, QType::Q4K) => Some(avx512::dot_q4k_rows),
            (_, QType::Q6K) => Some(avx512::dot_q6k_rows),
            _ => None,
        };
        if let Some(kernel) = rows {
            for (a, o) in acts.chunks(4).zip(out.chunks_mut(4)) {
                // SAFETY: `Backend::Avx512` is only produced when the CPU has AVX-512 F/BW,
                // AVX2 and F16C, `Vnni` when it also has VL and VNNI; lengths are checked
                // inside.
                unsafe { kernel(w, a, o) };
            }
            return;
        }
    }
    for (o, &a) in out.iter_mut().zip(acts) {
        *o = dot(backend, t, w, a);
    }
}

/// The f32 part of a Q4_K block (`d`, `dmin` its scales), shared by every backend so they
/// round alike.
#[inline(always)]
fn q4k_block(d: f32, dmin: f32, da: f32, isum: i32, msum: i32) -> f32 {
    da * (d * isum as f32 - dmin * msum as f32)
}

/// How far ahead of the block being read the kernels ask for weights (bytes): a software
/// prefetch (of an address that may lie past the row: `wrapping_add`, and a prefetch never
/// faults), so the next rows are on their way while this block's arithmetic runs.
const PREFETCH: usize = 1536;

/// `pshufb` index meaning "write 0".
const Z: i8 = -128;

/// Shuffle masks turning a broadcast u64 of eight bytes into i16 lanes all equal to byte `j`
/// (each 128-bit lane takes the same bytes), for `j` in 0..8.
const BYTE_TO_I16: [[i8; 32]; 8] = {
    let mut t = [[Z; 32]; 8];
    let mut j = 0;
    while j < 8 {
        let mut i = 0;
        while i < 32 {
            t[j][i] = j as i8;
            i += 2;
        }
        j += 1;
    }
    t
};

/// i16 lanes `[m0, m0, m1, m1, …, m7, m7]` out of a broadcast u64 of Q4_K's eight mins.
const MIN_PAIRS: [i8; 32] = [
    0, Z, 0, Z, 1, Z, 1, Z, 2, Z, 2, Z, 3, Z, 3, Z, 4, Z, 4, Z, 5, Z, 5, Z, 6, Z, 6, Z, 7, Z, 7, Z,
];

/// Q6_K scale bytes `[g x8, g+1 x8]` for the 32 values starting at `16g`, `g` = 0, 2, …, 14.
const Q6_PAIRS: [[i8; 16]; 8] = {
    let mut t = [[0i8; 16]; 8];
    let mut p = 0;
    while p < 8 {
        let mut i = 0;
        while i < 16 {
            t[p][i] = (2 * p + i / 8) as i8;
            i += 1;
        }
        p += 1;
    }
    t
};

/// AVX-512 Q4_K: i16 lanes `[byte j x16 | byte k x16]` (low two 128-bit lanes byte `j`, high
/// two byte `k`) for the sub-block pairs of 64 bytes of `qs`: (0, 2), (1, 3), (4, 6), (5, 7).
const Q4_PAIRS_512: [[i8; 64]; 4] = {
    let pairs = [(0, 2), (1, 3), (4, 6), (5, 7)];
    let mut t = [[Z; 64]; 4];
    let mut v = 0;
    while v < 4 {
        let mut i = 0;
        while i < 64 {
            t[v][i] = if i < 32 { pairs[v].0 } else { pairs[v].1 };
            i += 2;
        }
        v += 1;
    }
    t
};

/// AVX-512 Q6_K: scale bytes `[g x8, g+1 x8 | g+2 x8, g+3 x8]` for `g` = 0, 4, 8, 12.
const Q6_QUADS: [[i8; 32]; 4] = {
    let mut t = [[0i8; 32]; 4];
    let mut v = 0;
    while v < 4 {
        let mut i = 0;
        while i < 32 {
            t[v][i] = (4 * v + i / 8) as i8;
            i += 1;
        }
        v += 1;
    }
    t
};

/// The four Q8_0 accumulators summed.
#[inline(always)]
fn q8_0_total(acc: [f32; 4]) -> f32 {
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

mod portable {
    use super::*;

    pub(super) fn dot_q8_0(w: &[u8], a: ActRow<'_>) -> f32 {
        let mut acc = [0f32; 4];
        for (b, blk) in w.chunks_exact(34).enumerate() {
            let isum: i32 = blk[2..34]
                .iter()
                .zip(&a.q[32 * b..32 * b + 32])
                .map(|(&x, &y)| i32::from(x as i8) * i32::from(y))
                .sum();
            acc[b % 4] += (f16_at(blk, 0) * a.d[b]) * isum as f32;
        }
        q8_0_total(acc)
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
            let sums = &a.sums[16 * b..16 * b + 16];
            let msum: i32 = (0..8)
                .map(|j| {
                    ((m >> (8 * j)) & 0xff) as i32
                        * (i32::from(sums[2 * j]) + i32::from(sums[2 * j + 1]))
                })
                .sum();
            acc += q4k_block(f16_at(blk, 0), f16_at(blk, 2), a.d[b], isum, msum);
        }
        acc
    }

    pub(super) fn dot_q6k(w: &[u8], a: ActRow<'_>) -> f32 {
        let mut acc = 0f32;
        for (b, blk) in w.chunks_exact(210).enumerate() {
            let aq = &a.q[256 * b..256 * b + 256];
            let sums = &a.sums[16 * b..16 * b + 16];
            let mut isum = 0i32;
            for g in 0..16 {
                let s: i32 = (16 * g..16 * g + 16)
                    .map(|e| i32::from(q6k_value(blk, e)) * i32::from(aq[e]))
                    .sum();
                // The stored values are q + 32: take 32 × the activations' sum back off.
                isum += i32::from(blk[192 + g] as i8) * (s - 32 * i32::from(sums[g]));
            }
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

    /// The f16 at `p` as f32 (exact, like `half`'s conversion).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn f16_load(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
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
    /// AVX2 and F16C; `w` whole Q8_0 blocks matching `a`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn dot_q8_0(w: &[u8], a: ActRow<'_>) -> f32 {
        let nb = w.len() / 34;
        assert!(a.q.len() >= 32 * nb && a.d.len() >= nb);
        let (wp, ap) = (w.as_ptr(), a.q.as_ptr());
        // Lane i of `acc` is accumulator i: blocks b + i of each group of four.
        let mut acc = _mm_setzero_ps();
        let mut b = 0;
        while b + 4 <= nb {
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(34 * b + PREFETCH) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(34 * b + PREFETCH + 64) as *const i8);
            // Four blocks' sums at once: two rounds of pairwise adds, then the halves.
            let h01 = _mm256_hadd_epi32(q8_0_block(wp, ap, b), q8_0_block(wp, ap, b + 1));
            let h23 = _mm256_hadd_epi32(q8_0_block(wp, ap, b + 2), q8_0_block(wp, ap, b + 3));
            let h = _mm256_hadd_epi32(h01, h23);
            let isums = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
            let dw = _mm_cvtph_ps(_mm_setr_epi16(
                i16::from_le_bytes([*wp.add(34 * b), *wp.add(34 * b + 1)]),
                i16::from_le_bytes([*wp.add(34 * b + 34), *wp.add(34 * b + 35)]),
                i16::from_le_bytes([*wp.add(34 * b + 68), *wp.add(34 * b + 69)]),
                i16::from_le_bytes([*wp.add(34 * b + 102), *wp.add(34 * b + 103)]),
                0,
                0,
                0,
                0,
            ));
            let da = _mm_loadu_ps(a.d.as_ptr().add(b));
            let p = _mm_mul_ps(_mm_mul_ps(dw, da), _mm_cvtepi32_ps(isums));
            acc = _mm_add_ps(acc, p);
            b += 4;
        }
        let mut lanes = [0f32; 4];
        _mm_storeu_ps(lanes.as_mut_ptr(), acc);
        while b < nb {
            let isum = hsum(q8_0_block(wp, ap, b));
            lanes[b % 4] += (f16_load(wp.add(34 * b)) * a.d[b]) * isum as f32;
            b += 1;
        }
        q8_0_total(lanes)
    }

    /// # Safety
    /// AVX2 and F16C; `w` whole Q4_K blocks matching `a`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn dot_q4k(w: &[u8], a: ActRow<'_>) -> f32 {
        let nb = w.len() / 144;
        assert!(a.q.len() >= 256 * nb && a.d.len() >= nb && a.sums.len() >= 16 * nb);
        let low = _mm256_set1_epi8(0x0f);
        let mask = |j: usize| _mm256_loadu_si256(BYTE_TO_I16[j].as_ptr() as *const __m256i);
        let min_pairs = _mm256_loadu_si256(MIN_PAIRS.as_ptr() as *const __m256i);
        let mut acc = 0f32;
        for b in 0..nb {
            let p = w.as_ptr().add(144 * b);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 64) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 128) as *const i8);
            let (sc, m) = q4k_scales_mins(std::slice::from_raw_parts(p.add(4), 12));
            let sc_b = _mm256_set1_epi64x(sc as i64);
            let qs = p.add(16);
            let aq = a.q.as_ptr().add(256 * b);
            let mut isum = _mm256_setzero_si256();
            for c in 0..4 {
                let wv = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
                let lo = _mm256_and_si256(wv, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(wv), low);
                let a_lo = _mm256_loadu_si256(aq.add(64 * c) as *const __m256i);
                let a_hi = _mm256_loadu_si256(aq.add(64 * c + 32) as *const __m256i);
                let s_lo = _mm256_shuffle_epi8(sc_b, mask(2 * c));
                let s_hi = _mm256_shuffle_epi8(sc_b, mask(2 * c + 1));
                let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a_lo), s_lo);
                let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a_hi), s_hi);
                isum = _mm256_add_epi32(isum, _mm256_add_epi32(p_lo, p_hi));
            }
            let sums = _mm256_loadu_si256(a.sums.as_ptr().add(16 * b) as *const __m256i);
            let mins = _mm256_shuffle_epi8(_mm256_set1_epi64x(m as i64), min_pairs);
            let msum = hsum(_mm256_madd_epi16(sums, mins));
            acc += q4k_block(f16_load(p), f16_load(p.add(2)), a.d[b], hsum(isum), msum);
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
    /// AVX2 and F16C; `w` whole Q6_K blocks matching `a`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn dot_q6k(w: &[u8], a: ActRow<'_>) -> f32 {
        let nb = w.len() / 210;
        assert!(a.q.len() >= 256 * nb && a.d.len() >= nb && a.sums.len() >= 16 * nb);
        let low = _mm256_set1_epi8(0x0f);
        let three = _mm256_set1_epi8(3);
        let mut acc = 0f32;
        for b in 0..nb {
            let p = w.as_ptr().add(210 * b);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 64) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 128) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 192) as *const i8);
            let aq = a.q.as_ptr().add(256 * b);
            let scales = _mm_loadu_si128(p.add(192) as *const __m128i);
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
                    let s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(
                        scales,
                        _mm_loadu_si128(Q6_PAIRS[e0 / 32].as_ptr() as *const __m128i),
                    ));
                    let d = _mm256_madd_epi16(_mm256_maddubs_epi16(v, av), s);
                    isum = _mm256_add_epi32(isum, d);
                }
            }
            // The stored values are q + 32: take 32 × Σ_g sc_g · Σa_g back off.
            let sums = _mm256_loadu_si256(a.sums.as_ptr().add(16 * b) as *const __m256i);
            let offset = _mm256_madd_epi16(_mm256_cvtepi8_epi16(scales), sums);
            isum = _mm256_sub_epi32(isum, _mm256_slli_epi32::<5>(offset));
            acc += a.d[b] * (f16_load(p.add(208)) * hsum(isum) as f32);
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
    unsafe fn f16_load(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    /// Two 32-byte pieces `p` and `q` as one 64-byte vector.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn load_halves(p: *const i8, q: *const i8) -> __m512i {
        let lo = _mm512_castsi256_si512(_mm256_loadu_si256(p as *const __m256i));
        _mm512_inserti64x4::<1>(lo, _mm256_loadu_si256(q as *const __m256i))
    }

    /// Sum of the eight i32 lanes of a 256-bit vector.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn hsum256(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// # Safety
    /// AVX-512 F/BW, AVX2, F16C; `w` whole Q4_K blocks matching `a`.
    #[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
    pub(super) unsafe fn dot_q4k(w: &[u8], a: ActRow<'_>) -> f32 {
        let nb = w.len() / 144;
        assert!(a.q.len() >= 256 * nb && a.d.len() >= nb && a.sums.len() >= 16 * nb);
        let low = _mm512_set1_epi8(0x0f);
        // 64 bytes of `qs` (chunks 2p, 2p+1): low nibbles are sub-blocks 4p and 4p+2, high
        // nibbles 4p+1 and 4p+3.
        let mask = |v: usize| _mm512_loadu_si512(Q4_PAIRS_512[v].as_ptr() as *const __m512i);
        let min_pairs = _mm256_loadu_si256(MIN_PAIRS.as_ptr() as *const __m256i);
        let mut acc = 0f32;
        for b in 0..nb {
            let p = w.as_ptr().add(144 * b);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 64) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 128) as *const i8);
            let (sc, m) = q4k_scales_mins(std::slice::from_raw_parts(p.add(4), 12));
            let sc_b = _mm512_set1_epi64(sc as i64);
            let aq = a.q.as_ptr().add(256 * b);
            let mut isum = _mm512_setzero_si512();
            for half in 0..2 {
                let wv = _mm512_loadu_si512(p.add(16 + 64 * half) as *const __m512i);
                let lo = _mm512_and_si512(wv, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(wv), low);
                let e = 128 * half;
                let a_lo = load_halves(aq.add(e), aq.add(e + 64));
                let a_hi = load_halves(aq.add(e + 32), aq.add(e + 96));
                let s_lo = _mm512_shuffle_epi8(sc_b, mask(2 * half));
                let s_hi = _mm512_shuffle_epi8(sc_b, mask(2 * half + 1));
                let p_lo = _mm512_madd_epi16(_mm512_maddubs_epi16(lo, a_lo), s_lo);
                let p_hi = _mm512_madd_epi16(_mm512_maddubs_epi16(hi, a_hi), s_hi);
                isum = _mm512_add_epi32(isum, _mm512_add_epi32(p_lo, p_hi));
            }
            let sums = _mm256_loadu_si256(a.sums.as_ptr().add(16 * b) as *const __m256i);
            let mins = _mm256_shuffle_epi8(_mm256_set1_epi64x(m as i64), min_pairs);
            let msum = hsum256(_mm256_madd_epi16(sums, mins));
            let isum = _mm512_reduce_add_epi32(isum);
            acc += q4k_block(f16_load(p), f16_load(p.add(2)), a.d[b], isum, msum);
        }
        acc
    }

    /// # Safety
    /// AVX-512 F/BW, AVX2, F16C; `w` whole Q6_K blocks matching `a`.
    #[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
    pub(super) unsafe fn dot_q6k(w: &[u8], a: ActRow<'_>) -> f32 {
        let nb = w.len() / 210;
        assert!(a.q.len() >= 256 * nb && a.d.len() >= nb && a.sums.len() >= 16 * nb);
        let low = _mm512_set1_epi8(0x0f);
        let three = _mm512_set1_epi8(3);
        let mut acc = 0f32;
        for b in 0..nb {
            let p = w.as_ptr().add(210 * b);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 64) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 128) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 192) as *const i8);
            let aq = a.q.as_ptr().add(256 * b);
            let scales = _mm_loadu_si128(p.add(192) as *const __m128i);
            let scales2 = _mm256_broadcastsi128_si256(scales);
            let mut isum = _mm512_setzero_si512();
            for n in 0..2 {
                // ql[64n..64n+64]: low nibbles are elements 128n..128n+64 in order, high
                // nibbles 128n+64..128n+128; qh[32n..32n+32] holds their top two bits.
                let ql = _mm512_loadu_si512(p.add(64 * n) as *const __m512i);
                let qh = _mm256_loadu_si256(p.add(128 + 32 * n) as *const __m256i);
                let qh_lo =
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qh), _mm256_srli_epi16::<2>(qh));
                let qh_hi = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_srli_epi16::<4>(qh)),
                    _mm256_srli_epi16::<6>(qh),
                );
                let top = |h: __m512i| _mm512_slli_epi16::<4>(_mm512_and_si512(h, three));
                let v_lo = _mm512_or_si512(_mm512_and_si512(ql, low), top(qh_lo));
                let v_hi = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql), low),
                    top(qh_hi),
                );
                for (i, v) in [v_lo, v_hi].into_iter().enumerate() {
                    let e0 = 128 * n + 64 * i;
                    let av = _mm512_loadu_si512(aq.add(e0) as *const __m512i);
                    let s = _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(
                        scales2,
                        _mm256_loadu_si256(Q6_QUADS[e0 / 64].as_ptr() as *const __m256i),
                    ));
                    let d = _mm512_madd_epi16(_mm512_maddubs_epi16(v, av), s);
                    isum = _mm512_add_epi32(isum, d);
                }
            }
            // The stored values are q + 32: take 32 × Σ_g sc_g · Σa_g back off.
            let sums = _mm256_loadu_si256(a.sums.as_ptr().add(16 * b) as *const __m256i);
            let offset = hsum256(_mm256_madd_epi16(_mm256_cvtepi8_epi16(scales), sums));
            let isum = _mm512_reduce_add_epi32(isum) - 32 * offset;
            acc += a.d[b] * (f16_load(p.add(208)) * isum as f32);
        }
        acc
    }

    /// The four vectors' lane sums `[Σv0, Σv1, Σv2, Σv3]` (exact: integer adds).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn reduce4_256(y: &[__m256i; 4]) -> [i32; 4] {
        let h = _mm256_hadd_epi32(_mm256_hadd_epi32(y[0], y[1]), _mm256_hadd_epi32(y[2], y[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
        let mut out = [0i32; 4];
        _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, s);
        out
    }

    /// [`reduce4_256`] of 512-bit vectors.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn reduce4_512(v: &[__m512i; 4]) -> [i32; 4] {
        let y = |x: __m512i| {
            _mm256_add_epi32(_mm512_castsi512_si256(x), _mm512_extracti64x4_epi64::<1>(x))
        };
        reduce4_256(&[y(v[0]), y(v[1]), y(v[2]), y(v[3])])
    }

    /// Q4_K row `w` against up to four activation rows (`out[r] = dot_q4k(w, acts[r])`, the
    /// same bits): each block's nibbles and scale vectors are unpacked once, the rows' sums
    /// reduced together, then each row's f32 step as in [`dot_q4k`].
    ///
    /// # Safety
    /// AVX-512 F/BW, AVX2, F16C; `w` whole Q4_K blocks matching every row.
    #[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
    pub(super) unsafe fn dot_q4k_rows(w: &[u8], acts: &[ActRow<'_>], out: &mut [f32]) {
        let nb = w.len() / 144;
        let rows = acts.len().min(out.len()).min(4);
        assert!(acts[..rows]
            .iter()
            .all(|a| a.q.len() >= 256 * nb && a.d.len() >= nb && a.sums.len() >= 16 * nb));
        let low = _mm512_set1_epi8(0x0f);
        let mask = |v: usize| _mm512_loadu_si512(Q4_PAIRS_512[v].as_ptr() as *const __m512i);
        let min_pairs = _mm256_loadu_si256(MIN_PAIRS.as_ptr() as *const __m256i);
        let mut acc = [0f32; 4];
        for b in 0..nb {
            let p = w.as_ptr().add(144 * b);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 64) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 128) as *const i8);
            let (sc, m) = q4k_scales_mins(std::slice::from_raw_parts(p.add(4), 12));
            let sc_b = _mm512_set1_epi64(sc as i64);
            // [lo nibbles, hi nibbles] of each 64-byte half, and their scale vectors.
            let mut nib = [_mm512_setzero_si512(); 4];
            let mut scl = [_mm512_setzero_si512(); 4];
            for half in 0..2 {
                let wv = _mm512_loadu_si512(p.add(16 + 64 * half) as *const __m512i);
                nib[2 * half] = _mm512_and_si512(wv, low);
                nib[2 * half + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(wv), low);
                scl[2 * half] = _mm512_shuffle_epi8(sc_b, mask(2 * half));
                scl[2 * half + 1] = _mm512_shuffle_epi8(sc_b, mask(2 * half + 1));
            }
            let mins = _mm256_shuffle_epi8(_mm256_set1_epi64x(m as i64), min_pairs);
            let mut isums = [_mm512_setzero_si512(); 4];
            let mut msums = [_mm256_setzero_si256(); 4];
            for (r, a) in acts[..rows].iter().enumerate() {
                let aq = a.q.as_ptr().add(256 * b);
                let mut isum = _mm512_setzero_si512();
                for half in 0..2 {
                    let e = 128 * half;
                    let a_lo = load_halves(aq.add(e), aq.add(e + 64));
                    let a_hi = load_halves(aq.add(e + 32), aq.add(e + 96));
                    let p_lo =
                        _mm512_madd_epi16(_mm512_maddubs_epi16(nib[2 * half], a_lo), scl[2 * half]);
                    let p_hi = _mm512_madd_epi16(
                        _mm512_maddubs_epi16(nib[2 * half + 1], a_hi),
                        scl[2 * half + 1],
                    );
                    isum = _mm512_add_epi32(isum, _mm512_add_epi32(p_lo, p_hi));
                }
                isums[r] = isum;
                let sums = _mm256_loadu_si256(a.sums.as_ptr().add(16 * b) as *const __m256i);
                msums[r] = _mm256_madd_epi16(sums, mins);
            }
            let (is, ms) = (reduce4_512(&isums), reduce4_256(&msums));
            let (d, dmin) = (f16_load(p), f16_load(p.add(2)));
            for (r, a) in acts[..rows].iter().enumerate() {
                acc[r] += q4k_block(d, dmin, a.d[b], is[r], ms[r]);
            }
        }
        out[..rows].copy_from_slice(&acc[..rows]);
    }

    /// Q6_K row `w` against up to four activation rows (`out[r] = dot_q6k(w, acts[r])`, the
    /// same bits), each block's 6-bit values and scale vectors unpacked once.
    ///
    /// # Safety
    /// AVX-512 F/BW, AVX2, F16C; `w` whole Q6_K blocks matching every row.
    #[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
    pub(super) unsafe fn dot_q6k_rows(w: &[u8], acts: &[ActRow<'_>], out: &mut [f32]) {
        let nb = w.len() / 210;
        let rows = acts.len().min(out.len()).min(4);
        assert!(acts[..rows]
            .iter()
            .all(|a| a.q.len() >= 256 * nb && a.d.len() >= nb && a.sums.len() >= 16 * nb));
        let low = _mm512_set1_epi8(0x0f);
        let three = _mm512_set1_epi8(3);
        let mut acc = [0f32; 4];
        for b in 0..nb {
            let p = w.as_ptr().add(210 * b);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 64) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 128) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 192) as *const i8);
            let scales = _mm_loadu_si128(p.add(192) as *const __m128i);
            let scales2 = _mm256_broadcastsi128_si256(scales);
            let scales16 = _mm256_cvtepi8_epi16(scales);
            // Values 64q..64q+64 (q = 0..4) and their scale vectors, as in `dot_q6k`.
            let mut vals = [_mm512_setzero_si512(); 4];
            let mut scl = [_mm512_setzero_si512(); 4];
            for n in 0..2 {
                let ql = _mm512_loadu_si512(p.add(64 * n) as *const __m512i);
                let qh = _mm256_loadu_si256(p.add(128 + 32 * n) as *const __m256i);
                let qh_lo =
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qh), _mm256_srli_epi16::<2>(qh));
                let qh_hi = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_srli_epi16::<4>(qh)),
                    _mm256_srli_epi16::<6>(qh),
                );
                let top = |h: __m512i| _mm512_slli_epi16::<4>(_mm512_and_si512(h, three));
                vals[2 * n] = _mm512_or_si512(_mm512_and_si512(ql, low), top(qh_lo));
                vals[2 * n + 1] = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql), low),
                    top(qh_hi),
                );
            }
            for (q, s) in scl.iter_mut().enumerate() {
                *s = _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(
                    scales2,
                    _mm256_loadu_si256(Q6_QUADS[q].as_ptr() as *const __m256i),
                ));
            }
            let mut isums = [_mm512_setzero_si512(); 4];
            let mut offsets = [_mm256_setzero_si256(); 4];
            for (r, a) in acts[..rows].iter().enumerate() {
                let aq = a.q.as_ptr().add(256 * b);
                let mut isum = _mm512_setzero_si512();
                for q in 0..4 {
                    let av = _mm512_loadu_si512(aq.add(64 * q) as *const __m512i);
                    let d = _mm512_madd_epi16(_mm512_maddubs_epi16(vals[q], av), scl[q]);
                    isum = _mm512_add_epi32(isum, d);
                }
                isums[r] = isum;
                let sums = _mm256_loadu_si256(a.sums.as_ptr().add(16 * b) as *const __m256i);
                offsets[r] = _mm256_madd_epi16(scales16, sums);
            }
            let (is, os) = (reduce4_512(&isums), reduce4_256(&offsets));
            let d = f16_load(p.add(208));
            for (r, a) in acts[..rows].iter().enumerate() {
                // The stored values are q + 32: take 32 × Σ_g sc_g · Σa_g back off.
                let isum = is[r] - 32 * os[r];
                acc[r] += a.d[b] * (d * isum as f32);
            }
        }
        out[..rows].copy_from_slice(&acc[..rows]);
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::*;
    use std::arch::x86_64::*;

    /// The f16 at `p` as f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    unsafe fn f16_load(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    /// Sum of the eight i32 lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2")]
    unsafe fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// Block `b` of the row whose `|w|` is `wabs` and signs `w`, against activation `ap`:
    /// eight partial sums, `Σ |w| · (a · sign w)` with `vpdpbusd` (u8 × i8; `a` is never
    /// -128, so the sign flip cannot overflow).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2")]
    unsafe fn block(wabs: __m256i, w: __m256i, ap: *const i8) -> __m256i {
        let av = _mm256_loadu_si256(ap as *const __m256i);
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), wabs, _mm256_sign_epi8(av, w))
    }

    /// Q8_0 row `w` against up to four activation rows: `out[r] = dot(w, acts[r])`, with the
    /// arithmetic of the AVX2 and portable kernels (exact block sums; per block
    /// `(d_w · d_a) · Σ` into accumulator `b mod 4`), so the bits are the same.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/VNNI, AVX2 and F16C; `acts.len() <= 4 == out.len()` or fewer.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    pub(super) unsafe fn dot_q8_0_rows(w: &[u8], acts: &[ActRow<'_>], out: &mut [f32]) {
        let nb = w.len() / 34;
        let rows = acts.len().min(out.len()).min(4);
        assert!(acts[..rows]
            .iter()
            .all(|a| a.q.len() >= 32 * nb && a.d.len() >= nb));
        let wp = w.as_ptr();
        let mut acc = [_mm_setzero_ps(); 4];
        let mut b = 0;
        while b + 4 <= nb {
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(34 * b + PREFETCH) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(34 * b + PREFETCH + 64) as *const i8);
            let ws: [__m256i; 4] = std::array::from_fn(|i| {
                _mm256_loadu_si256(wp.add(34 * (b + i) + 2) as *const __m256i)
            });
            let wabs: [__m256i; 4] = std::array::from_fn(|i| _mm256_abs_epi8(ws[i]));
            let dw = _mm_cvtph_ps(_mm_setr_epi16(
                i16::from_le_bytes([*wp.add(34 * b), *wp.add(34 * b + 1)]),
                i16::from_le_bytes([*wp.add(34 * b + 34), *wp.add(34 * b + 35)]),
                i16::from_le_bytes([*wp.add(34 * b + 68), *wp.add(34 * b + 69)]),
                i16::from_le_bytes([*wp.add(34 * b + 102), *wp.add(34 * b + 103)]),
                0,
                0,
                0,
                0,
            ));
            for (r, a) in acts[..rows].iter().enumerate() {
                let ap = a.q.as_ptr().add(32 * b);
                let h01 =
                    _mm256_hadd_epi32(block(wabs[0], ws[0], ap), block(wabs[1], ws[1], ap.add(32)));
                let h23 = _mm256_hadd_epi32(
                    block(wabs[2], ws[2], ap.add(64)),
                    block(wabs[3], ws[3], ap.add(96)),
                );
                let h = _mm256_hadd_epi32(h01, h23);
                let isums =
                    _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
                let da = _mm_loadu_ps(a.d.as_ptr().add(b));
                let p = _mm_mul_ps(_mm_mul_ps(dw, da), _mm_cvtepi32_ps(isums));
                acc[r] = _mm_add_ps(acc[r], p);
            }
            b += 4;
        }
        for (r, a) in acts[..rows].iter().enumerate() {
            let mut lanes = [0f32; 4];
            _mm_storeu_ps(lanes.as_mut_ptr(), acc[r]);
            for tail in b..nb {
                let wv = _mm256_loadu_si256(wp.add(34 * tail + 2) as *const __m256i);
                let isum = hsum(block(_mm256_abs_epi8(wv), wv, a.q.as_ptr().add(32 * tail)));
                lanes[tail % 4] += (f16_load(wp.add(34 * tail)) * a.d[tail]) * isum as f32;
            }
            out[r] = q8_0_total(lanes);
        }
    }
}

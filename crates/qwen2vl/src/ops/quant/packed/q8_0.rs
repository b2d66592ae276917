//! Q8_0 in groups of 16 rows ([`super`] says why).
//!
//! Layout of a group (`16 × row_bytes` bytes, the size of its 16 rows in ggml's layout): for
//! each block `b` in order, 544 bytes:
//! - the 16 rows' f16 scales `d` (32 bytes, row `i` at `2i`);
//! - for each 4-value run `g` in 0..8 of the block, 64 bytes: row `i`'s values
//!   `4g..4g+4` at `4i`, each stored as `q + 128` (`q ^ 0x80`, an unsigned byte), which is
//!   what `vpdpbusd` multiplies; the kernels add `−128 · Σ a`
//!   ([`crate::ops::quant::QActs::offs`]) to undo the offset.
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

/// Activation rows from which [`Backend::Amx`] gives packed Q8_0 products to the AMX tiles;
/// fewer go through `vpdpbusd`. Measured on the 2B decode products (`quant_decode`, 2
/// threads, 22:40 UTC 2026-12-07): 8 rows 96–109 ms a step either way, 16 rows 158–160 ms
/// with `vpdpbusd` against 139–141 with tiles, 64 rows 620–700 against 530–540. A tile
/// product covers one 32-value block only (Q8_0's scales change every block), so moving
/// `C` through memory for the f32 scales costs about what the tile saves until the tile's
/// rows fill up.
pub const AMX_MIN_ROWS: usize = 9;

/// `out[(16 g + i) · m + r]` for the whole groups `groups` (each `group_bytes` bytes) and the
/// `m = acts.len()` activation rows, on AMX tiles with the tiles configured once for all the
/// groups; `false` (nothing written) where that path does not apply: a `backend` other than
/// [`Backend::Amx`], fewer than [`AMX_MIN_ROWS`] rows, or rows that are not one contiguous
/// `(m, k)` array (the tiles load rows at a fixed stride).
///
/// # Panics
/// When the lengths disagree (an internal invariant: the matrix checked them).
pub fn dot_groups_amx(
    backend: Backend,
    groups: &[u8],
    group_bytes: usize,
    acts: &[ActRow<'_>],
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let m = acts.len();
        if m < AMX_MIN_ROWS || backend != Backend::Amx {
            return false;
        }
        let nb = group_bytes / BLOCK;
        let n_groups = groups.len() / group_bytes.max(1);
        assert!(
            nb > 0
                && group_bytes == nb * BLOCK
                && groups.len() == n_groups * group_bytes
                && out.len() >= n_groups * ROWS * m
                && acts
                    .iter()
                    .all(|a| a.q.len() >= 32 * nb && a.d.len() >= nb && a.offs.len() >= nb),
            "packed q8_0 groups of {group_bytes} bytes against {m} activation rows"
        );
        // SAFETY: `Backend::Amx` is only produced when the CPU has AVX-512 F/BW/VL/VNNI, AVX2,
        // F16C and AMX-INT8 with the tile data granted; the lengths were checked above.
        unsafe { amx::dot_groups(groups, group_bytes, acts, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (backend, groups, group_bytes, acts, out);
        false
    }
}

/// [`super::dot_group`] for Q8_0 (lengths checked there).
pub(super) fn dot_group(backend: Backend, group: &[u8], acts: &[ActRow<'_>], out: &mut [f32]) {
    if dot_groups_amx(backend, group, group.len(), acts, out) {
        return;
    }
    match backend {
        // SAFETY: `Backend::Vnni` is only produced when the CPU has AVX-512 F/BW/VL/VNNI, AVX2
        // and F16C; the lengths were checked by the caller.
        #[cfg(target_arch = "x86_64")]
        Backend::Vnni | Backend::Amx => unsafe { vnni::dot_group(group, acts, out) },
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
        let nb = group.len() / BLOCK;
        super::super::by_passes::<PASS>(acts, out, |rows| match rows.len() {
            1 => pass_rows::<1>(group, nb, rows),
            2 => pass_rows::<2>(group, nb, rows),
            3 => pass_rows::<3>(group, nb, rows),
            4 => pass_rows::<4>(group, nb, rows),
            5 => pass_rows::<5>(group, nb, rows),
            6 => pass_rows::<6>(group, nb, rows),
            7 => pass_rows::<7>(group, nb, rows),
            _ => pass_rows::<8>(group, nb, rows),
        });
    }

    /// The 16 rows' results for `R` activation rows (`rows.len() == R`), in the slots
    /// `0..R` of the returned array.
    ///
    /// `R` is a constant so the `R` accumulators live in registers and the loop over the
    /// rows is unrolled; each row's pointers are read once, not per block. At 8 rows the
    /// kernel is bound by its vector instructions (8 `vpdpbusd` per block and row), so
    /// every other instruction in the loop costs: with a run-time row count the
    /// accumulators went through memory and each block re-read and bounds-checked each
    /// row's slices (`quant_decode`, one thread, weights in L1: 90.6 → 86.5 ns a row of
    /// 1536 from the single chain alone).
    ///
    /// # Safety
    /// As [`dot_group`]; `rows.len() == R`, each row holds `nb` blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
    #[inline]
    unsafe fn pass_rows<const R: usize>(
        group: &[u8],
        nb: usize,
        rows: &[ActRow<'_>],
    ) -> [[f32; ROWS]; PASS] {
        debug_assert!(rows.len() == R && rows.iter().all(|a| a.offs.len() >= nb));
        let gp = group.as_ptr();
        let q: [*const u8; R] = std::array::from_fn(|r| rows[r].q.as_ptr().cast());
        let d: [*const f32; R] = std::array::from_fn(|r| rows[r].d.as_ptr());
        let off: [*const i32; R] = std::array::from_fn(|r| rows[r].offs.as_ptr());
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let blk = gp.add(b * BLOCK);
            super::super::prefetch_ahead(blk, BLOCK);
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
            let w: [__m512i; 8] =
                std::array::from_fn(|g| _mm512_loadu_si512(blk.add(2 * ROWS + 64 * g) as *const _));
            for r in 0..R {
                // Activation values 4g..4g+4 of block b.
                let a = |g: usize| {
                    _mm512_set1_epi32(std::ptr::read_unaligned(
                        q[r].add(32 * b + 4 * g) as *const i32
                    ))
                };
                // The sums start at −128 Σ a, which undoes the +128 of the stored values:
                // Σ (q + 128) a − 128 Σ a (exact integers, in any order).
                let start = _mm512_set1_epi32(*off[r].add(b));
                let p = if R >= 4 {
                    // The rows' chains overlap one another: one chain of 8 per row.
                    let mut p = start;
                    for (g, w) in w.iter().enumerate() {
                        p = _mm512_dpbusd_epi32(p, *w, a(g));
                    }
                    p
                } else {
                    // Two chains of four, so the multiply-adds of a row overlap.
                    let mut p0 = _mm512_dpbusd_epi32(start, w[0], a(0));
                    let mut p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], a(1));
                    for g in (2..8).step_by(2) {
                        p0 = _mm512_dpbusd_epi32(p0, w[g], a(g));
                        p1 = _mm512_dpbusd_epi32(p1, w[g + 1], a(g + 1));
                    }
                    _mm512_add_epi32(p0, p1)
                };
                let s = _mm512_mul_ps(dw, _mm512_set1_ps(*d[r].add(b)));
                acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(s, _mm512_cvtepi32_ps(p)));
            }
        }
        let mut lanes = [[0f32; ROWS]; PASS];
        for (l, acc) in lanes.iter_mut().zip(&acc) {
            _mm512_storeu_ps(l.as_mut_ptr(), *acc);
        }
        lanes
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    //! AMX-INT8: per block, one `tdpbsud` multiplies the activation tile `A` (up to 16 rows ×
    //! the block's 32 values, signed) by the group's block, which in this module's layout is
    //! already a `B` tile (8 rows of 64 bytes: four values of 16 weight rows each, unsigned
    //! `q + 128`), giving `C = Σ a (q + 128)` for 16 activation × 16 weight rows as exact
    //! i32. `C` goes through memory (`tilestored`) to the same f32 expression as the other
    //! backends, blocks in order per row, so the bits are theirs. Rounds of four blocks use
    //! tmm0–3 for `C`, tmm4–5 for `A` and tmm6–7 for `B`; the next round's tile products are
    //! issued before this round's f32 work, so the two overlap.

    use super::*;
    use crate::ops::amx::{release, TileConfig};
    use std::arch::x86_64::*;

    /// Blocks per round (one `C` tile each).
    const ROUND: usize = 4;

    /// Two rounds of `C` tiles: 16 rows × 16 i32 per block.
    #[repr(C, align(64))]
    struct Scratch([[[i32; 256]; ROUND]; 2]);

    /// The configuration for `rows` activation rows: tmm0–3 `C` (rows × 64 bytes), tmm4–5 `A`
    /// (rows × 32 bytes), tmm6–7 `B` (8 × 64 bytes).
    fn config(rows: usize) -> TileConfig {
        let r = rows as u8;
        TileConfig::new([
            (r, 64),
            (r, 64),
            (r, 64),
            (r, 64),
            (r, 32),
            (r, 32),
            (8, 64),
            (8, 64),
        ])
    }

    /// The base and row stride of `acts` when its rows are one contiguous array.
    fn contiguous(acts: &[ActRow<'_>]) -> Option<(*const i8, usize)> {
        let k = acts.first()?.q.len();
        let base = acts[0].q.as_ptr();
        acts.iter()
            .enumerate()
            .all(|(r, a)| a.q.len() == k && std::ptr::eq(a.q.as_ptr(), base.wrapping_add(r * k)))
            .then_some((base, k))
    }

    /// See [`super::dot_groups_amx`]; `false` when the rows are not contiguous.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL, AVX2, F16C and AMX-INT8 with the tile data granted; lengths checked
    /// by the caller.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
    pub(super) unsafe fn dot_groups(
        groups: &[u8],
        group_bytes: usize,
        acts: &[ActRow<'_>],
        out: &mut [f32],
    ) -> bool {
        let Some((base, k)) = contiguous(acts) else {
            return false;
        };
        let m = acts.len();
        let nb = group_bytes / BLOCK;
        let mut scratch = Scratch([[[0; 256]; ROUND]; 2]);
        let mut configured = 0;
        for (g, group) in groups.chunks_exact(group_bytes).enumerate() {
            let gout = &mut out[g * ROWS * m..(g + 1) * ROWS * m];
            for r0 in (0..m).step_by(ROWS) {
                let rows = ROWS.min(m - r0);
                if rows != configured {
                    config(rows).load();
                    configured = rows;
                }
                chunk(
                    group.as_ptr(),
                    nb,
                    base.add(r0 * k),
                    k,
                    &acts[r0..r0 + rows],
                    &mut scratch,
                    gout,
                    m,
                    r0,
                );
            }
        }
        if configured != 0 {
            release();
        }
        true
    }

    /// Issues the tile products of round `c` (blocks `4c ..`, at most `nb`) into `out`.
    ///
    /// # Safety
    /// Tiles configured for the chunk's rows; `a` holds the rows × `k` values, `group` the
    /// `nb` blocks.
    #[inline(always)]
    unsafe fn issue(
        group: *const u8,
        nb: usize,
        a: *const i8,
        k: usize,
        c: usize,
        out: &mut [[i32; 256]; ROUND],
    ) {
        macro_rules! block {
            ($c:literal, $a:literal, $b:literal, $j:expr) => {{
                let b = c * ROUND + $j;
                let blk = group.add(b * BLOCK);
                super::super::prefetch_ahead(blk, BLOCK);
                std::arch::asm!(
                    concat!("tilezero tmm", $c),
                    concat!("tileloadd tmm", $a, ", [{a} + {sa} * 1]"),
                    concat!("tileloadd tmm", $b, ", [{b} + {sb} * 1]"),
                    concat!("tdpbsud tmm", $c, ", tmm", $a, ", tmm", $b),
                    concat!("tilestored [{c} + {sc} * 1], tmm", $c),
                    a = in(reg) a.add(32 * b),
                    sa = in(reg) k,
                    b = in(reg) blk.add(2 * ROWS),
                    sb = in(reg) 64usize,
                    c = in(reg) out[$j].as_mut_ptr(),
                    sc = in(reg) 64usize,
                    options(nostack)
                );
            }};
        }
        let n = ROUND.min(nb - c * ROUND);
        block!("0", "4", "6", 0);
        if n > 1 {
            block!("1", "5", "7", 1);
        }
        if n > 2 {
            block!("2", "4", "6", 2);
        }
        if n > 3 {
            block!("3", "5", "7", 3);
        }
    }

    /// One chunk of at most 16 activation rows (`acts`, starting at row `r0` of the `m`)
    /// against one group: every block's tile products, then the f32 sums.
    ///
    /// # Safety
    /// As [`dot_groups`], tiles configured for `acts.len()` rows.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
    unsafe fn chunk(
        group: *const u8,
        nb: usize,
        a: *const i8,
        k: usize,
        acts: &[ActRow<'_>],
        scratch: &mut Scratch,
        out: &mut [f32],
        m: usize,
        r0: usize,
    ) {
        let rows = acts.len();
        let mut acc = [_mm512_setzero_ps(); ROWS];
        let rounds = nb.div_ceil(ROUND);
        issue(group, nb, a, k, 0, &mut scratch.0[0]);
        for c in 0..rounds {
            if c + 1 < rounds {
                issue(group, nb, a, k, c + 1, &mut scratch.0[(c + 1) % 2]);
            }
            let tiles = &scratch.0[c % 2];
            for (j, tile) in tiles.iter().enumerate().take(ROUND.min(nb - c * ROUND)) {
                let b = c * ROUND + j;
                let dw =
                    _mm512_cvtph_ps(_mm256_loadu_si256(group.add(b * BLOCK) as *const __m256i));
                for (r, a) in acts.iter().enumerate() {
                    // `a.offs[b]` is −128 Σ a: what the stored `+ 128` added, taken off.
                    let p = _mm512_add_epi32(
                        _mm512_loadu_si512(tile.as_ptr().add(16 * r) as *const _),
                        _mm512_set1_epi32(a.offs[b]),
                    );
                    let s = _mm512_mul_ps(dw, _mm512_set1_ps(a.d[b]));
                    acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(s, _mm512_cvtepi32_ps(p)));
                }
            }
        }
        for (r, acc) in acc[..rows].iter().enumerate() {
            let mut lanes = [0f32; ROWS];
            _mm512_storeu_ps(lanes.as_mut_ptr(), *acc);
            super::super::scatter(&lanes, out, m, r0 + r);
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

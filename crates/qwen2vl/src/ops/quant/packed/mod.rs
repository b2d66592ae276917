//! Quantized weights repacked in groups of 16 rows, so one instruction works on 16 output
//! rows.
//!
//! Why: in ggml's layout (one row after another) a dot product of one weight row with one
//! activation row ends each block (Q8_0) or sub-block (K formats) in a sum across vector
//! lanes before its scale is applied, which costs more instructions than the products
//! themselves: one core then computes about as fast as its share of the memory bandwidth
//! delivers (decode is compute-bound), and a batch of activation rows (batched decode,
//! prefill) multiplies that work. With 16 rows interleaved four bytes at a time, one 64-byte
//! load holds the same four values of all 16 rows, a `vpdpbusd` against four broadcast
//! activation values adds them into 16 lanes, one per output row, and the scales are applied
//! to 16 rows per instruction; nothing is summed across lanes. (llama.cpp repacks its
//! weights the same way on CPUs with AVX-512.)
//!
//! - [`q8_0`]: read by every backend (AVX2 too), so Q8_0 matrices are always packed; its
//!   arithmetic is one f32 accumulator per row, blocks in order (ggml's reference order).
//! - [`q4_k`], [`q6_k`]: read with AVX-512 VNNI only, so K matrices are packed only where
//!   [`super::Backend::detect`] is VNNI; their arithmetic is exactly the rows kernels', so a
//!   packed matrix gives the same bits as its rows one by one, on every backend (the others
//!   get each row back in ggml's layout).
//!
//! A group takes as many bytes as its 16 rows in ggml's layout; rows past the last multiple
//! of 16 stay in ggml's layout after the groups.

pub mod q4_k;
pub mod q6_k;
pub mod q8_0;

use super::act::ActRow;
use super::{Backend, QType};

/// Rows per group.
pub const ROWS: usize = 16;

/// Whether an `(n, _)` matrix of type `t` is stored in groups (see the module docs).
pub fn packs(t: QType, n: usize) -> bool {
    n >= ROWS
        && match t {
            QType::Q8_0 => true,
            QType::Q4K | QType::Q6K => has_vnni(),
        }
}

/// Whether this CPU runs the [`Backend::Vnni`] kernels.
fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(Backend::detect(), Backend::Vnni | Backend::Amx)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Writes the 16 ggml-layout rows `rows` of type `t` into `dst` (`16 × row_bytes`) packed.
pub fn pack_group(t: QType, rows: &[&[u8]; ROWS], dst: &mut [u8]) {
    match t {
        QType::Q8_0 => q8_0::pack_group(rows, dst),
        QType::Q4K => q4_k::pack_group(rows, dst),
        QType::Q6K => q6_k::pack_group(rows, dst),
    }
}

/// Row `i` of a packed `group` of type `t` back in ggml's layout (into `dst`).
pub fn unpack_row(t: QType, group: &[u8], i: usize, dst: &mut [u8]) {
    match t {
        QType::Q8_0 => q8_0::unpack_row(group, i, dst),
        QType::Q4K => q4_k::unpack_row(group, i, dst),
        QType::Q6K => q6_k::unpack_row(group, i, dst),
    }
}

/// `out[i · m + r] = Σ_k w_i,k · a_r,k` for the 16 rows `i` of `group` and the `m =
/// acts.len()` activation rows (the caller's transposed `(rows, m)` output); `false`
/// (nothing written) when `backend` cannot read type `t` packed.
///
/// # Panics
/// When `out`, `group` or an activation row is shorter than the shapes say (an internal
/// invariant: the matrix checked them).
pub fn dot_group(
    t: QType,
    backend: Backend,
    group: &[u8],
    acts: &[ActRow<'_>],
    out: &mut [f32],
) -> bool {
    let (bl, bb) = (t.block_len(), t.block_bytes());
    let nb = group.len() / (ROWS * bb);
    assert!(
        out.len() >= ROWS * acts.len()
            && group.len() == nb * ROWS * bb
            && acts
                .iter()
                .all(|a| a.q.len() >= nb * bl && a.d.len() >= nb && a.sums.len() >= nb * bl / 16)
            && (t != QType::Q8_0 || acts.iter().all(|a| a.offs.len() >= nb)),
        "packed {t} group of {} bytes against {} activation rows",
        group.len(),
        acts.len()
    );
    if t == QType::Q8_0 {
        q8_0::dot_group(backend, group, acts, out);
        return true;
    }
    // The K formats' packed kernels need VNNI (module docs).
    #[cfg(target_arch = "x86_64")]
    if matches!(backend, Backend::Vnni | Backend::Amx) {
        // SAFETY: `Vnni` is only produced when the CPU has AVX-512 F/BW/VL/VNNI, AVX2 and
        // F16C; the lengths were checked above.
        unsafe {
            match t {
                QType::Q4K => q4_k::vnni::dot_group(group, acts, out),
                _ => q6_k::vnni::dot_group(group, acts, out),
            }
        }
        return true;
    }
    false
}

/// The four activation values `at..at + 4` as one little-endian i32 (what a 32-bit lane of
/// `vpdpbusd` takes).
///
/// # Safety
/// `a.q` holds `at + 4` values (checked once by [`dot_group`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn quad(a: &ActRow<'_>, at: usize) -> i32 {
    std::ptr::read_unaligned(a.q.as_ptr().add(at) as *const i32)
}

/// How far ahead of the block being read the kernels ask for weights (bytes). Measured on
/// the 2B decode products (`examples/quant_decode.rs`, 2 threads): 512–1024 best for Q4_K
/// (41–43 ms a step against 46–50 at 2–3 KB), Q8_0 and Q6_K within noise from 512 to 3072.
#[cfg(target_arch = "x86_64")]
const AHEAD: usize = 1024;

/// How far ahead the kernels also ask for weights into L2 only (`prefetcht1`). Measured
/// (`quant_decode`, 2 threads, 10 steps, twice, 22:30 UTC 2026-12-07): Q8_0 one row 65 →
/// 58–60 ms a step at 3–4 KB (6 KB: no gain), eight rows 102 → 93–97 ms; Q4_K within noise.
/// A miss then starts about two blocks' compute earlier than [`AHEAD`] alone starts it.
#[cfg(target_arch = "x86_64")]
const AHEAD_L2: usize = 3072;

/// Asks for every cache line of the `len` bytes [`AHEAD`] bytes past `p` (an address that
/// may lie past the matrix: `wrapping_add`, and a prefetch never faults).
///
/// # Safety
/// SSE (every x86-64 CPU).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_ahead(p: *const u8, len: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
    let mut off = 0;
    while off < len {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD + off) as *const i8);
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(AHEAD_L2 + off) as *const i8);
        off += 64;
    }
}

/// Runs `pass` on `acts` in passes of up to `P` activation rows and writes each pass's
/// results (slot `r` of the returned array for the pass's row `r`) into the transposed
/// output: the loop of the VNNI kernels, whose `pass` picks a monomorphization for the
/// pass's row count (so its accumulators stay in registers).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn by_passes<const P: usize>(
    acts: &[ActRow<'_>],
    out: &mut [f32],
    mut pass: impl FnMut(&[ActRow<'_>]) -> [[f32; ROWS]; P],
) {
    let m = acts.len();
    for (i, rows) in acts.chunks(P).enumerate() {
        let lanes = pass(rows);
        for (r, lanes) in lanes[..rows.len()].iter().enumerate() {
            scatter(lanes, out, m, i * P + r);
        }
    }
}

/// Writes the 16 rows' results `lanes` for activation row `col` into the transposed output.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn scatter(lanes: &[f32; ROWS], out: &mut [f32], m: usize, col: usize) {
    for (i, v) in lanes.iter().enumerate() {
        out[i * m + col] = *v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::quant::{format, kernels, QActs};

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

    /// 16 ggml rows of `k` values of type `t`, one of them at the integer sums' extremes: for
    /// Q8_0 a -128 (which a GGUF file may hold though the quantizer never writes it) beside a
    /// 127; for Q4_K every scale, min and value at its top; for Q6_K every value 63 and every
    /// scale -128.
    fn rows(t: QType, k: usize, seed: u64) -> Vec<Vec<u8>> {
        (0..ROWS)
            .map(|i| {
                let mut out = vec![0u8; t.row_bytes(k)];
                format::quantize_row(t, &values(k, seed + i as u64), &mut out);
                if i == 3 {
                    for blk in out.chunks_exact_mut(t.block_bytes()) {
                        match t {
                            QType::Q8_0 => blk[2..4].copy_from_slice(&[0x80, 0x7f]),
                            QType::Q4K => blk[4..144].fill(0xff),
                            QType::Q6K => {
                                blk[..192].fill(0xff);
                                blk[192..208].fill(0x80);
                            }
                        }
                    }
                }
                out
            })
            .collect()
    }

    fn packed(t: QType, rs: &[Vec<u8>]) -> Vec<u8> {
        let refs: [&[u8]; ROWS] = std::array::from_fn(|i| rs[i].as_slice());
        let mut group = vec![0u8; ROWS * rs[0].len()];
        pack_group(t, &refs, &mut group);
        group
    }

    const TYPES: [QType; 3] = [QType::Q8_0, QType::Q4K, QType::Q6K];

    #[test]
    fn packing_round_trips() {
        for t in TYPES {
            let rs = rows(t, 512, 3);
            let group = packed(t, &rs);
            for (i, r) in rs.iter().enumerate() {
                let mut back = vec![0u8; r.len()];
                unpack_row(t, &group, i, &mut back);
                assert_eq!(&back, r, "{t} row {i}");
            }
        }
    }

    /// Every backend that reads a packed group against the f64 dot product of the
    /// dequantized values, and bit-identical to the portable kernel: Q8_0's own (one
    /// accumulator per row), the K formats' rows kernel row by row. 1..=17 activation rows
    /// (passes and tails).
    #[test]
    fn every_backend_matches_the_oracle_and_the_portable_bits() {
        for t in TYPES {
            for k in [256, 1536] {
                let rs = rows(t, k, 7);
                let group = packed(t, &rs);
                for m in [1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 15, 17] {
                    let x = values(m * k, 100 + m as u64);
                    let acts = QActs::quantize(t, &x, m, k);
                    let views: Vec<_> = (0..m).map(|r| acts.row(r)).collect();
                    let want = portable(t, &rs, &group, &views);
                    check_oracle(t, &rs, &acts, &want, m, k);
                    for backend in Backend::available() {
                        let mut got = vec![0f32; ROWS * m];
                        if !dot_group(t, backend, &group, &views, &mut got) {
                            continue; // this backend reads the rows unpacked
                        }
                        let same = got
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{t} {backend:?} k {k} m {m}: {got:?} vs {want:?}");
                    }
                }
            }
        }
    }

    /// The AMX path takes rows that are one contiguous array and declines others (tiles load
    /// at a fixed stride); what it computes has the bits of the portable kernel, over several
    /// groups at once too.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn amx_reads_contiguous_rows_and_gives_the_portable_bits() {
        if !Backend::available().contains(&Backend::Amx) {
            return; // no AMX-INT8 here: `dot_group` test above covers the other backends
        }
        let k = 1536;
        let (a, b) = (rows(QType::Q8_0, k, 21), rows(QType::Q8_0, k, 37));
        let groups = [packed(QType::Q8_0, &a), packed(QType::Q8_0, &b)].concat();
        let gb = groups.len() / 2;
        for m in [q8_0::AMX_MIN_ROWS, 16, 20] {
            let x = values(m * k, 5 + m as u64);
            let acts = QActs::quantize(QType::Q8_0, &x, m, k);
            let views: Vec<_> = (0..m).map(|r| acts.row(r)).collect();
            let mut want = vec![0f32; 2 * ROWS * m];
            for g in 0..2 {
                let out = &mut want[g * ROWS * m..(g + 1) * ROWS * m];
                assert!(dot_group(
                    QType::Q8_0,
                    Backend::Portable,
                    &groups[g * gb..(g + 1) * gb],
                    &views,
                    out
                ));
            }
            let mut got = vec![0f32; 2 * ROWS * m];
            assert!(
                q8_0::dot_groups_amx(Backend::Amx, &groups, gb, &views, &mut got),
                "m {m}"
            );
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "m {m}: {got:?} vs {want:?}"
            );
            assert!(!q8_0::dot_groups_amx(
                Backend::Vnni,
                &groups,
                gb,
                &views,
                &mut got
            ));
            let reversed: Vec<_> = views.iter().rev().copied().collect();
            assert!(!q8_0::dot_groups_amx(
                Backend::Amx,
                &groups,
                gb,
                &reversed,
                &mut got
            ));
        }
        // Fewer rows than `AMX_MIN_ROWS` stay on `vpdpbusd`.
        let acts = QActs::quantize(QType::Q8_0, &values(2 * k, 3), 2, k);
        let views: Vec<_> = (0..2).map(|r| acts.row(r)).collect();
        let mut out = vec![0f32; 2 * ROWS * 2];
        assert!(!q8_0::dot_groups_amx(
            Backend::Amx,
            &groups,
            gb,
            &views,
            &mut out
        ));
    }

    /// What the portable code computes for the group: Q8_0's packed kernel, or the rows
    /// kernel of each (unpacked) K row.
    fn portable(t: QType, rs: &[Vec<u8>], group: &[u8], views: &[ActRow<'_>]) -> Vec<f32> {
        let m = views.len();
        let mut want = vec![0f32; ROWS * m];
        if t == QType::Q8_0 {
            assert!(dot_group(t, Backend::Portable, group, views, &mut want));
            return want;
        }
        for (i, r) in rs.iter().enumerate() {
            for (j, a) in views.iter().enumerate() {
                want[i * m + j] = kernels::dot(Backend::Portable, t, r, *a);
            }
        }
        want
    }

    fn check_oracle(t: QType, rs: &[Vec<u8>], acts: &QActs, got: &[f32], m: usize, k: usize) {
        let xq = acts.dequantize();
        for (i, r) in rs.iter().enumerate() {
            let mut w = vec![0f32; k];
            format::dequantize_row(t, r, &mut w);
            for j in 0..m {
                let (exact, mag) = w
                    .iter()
                    .zip(&xq[j * k..(j + 1) * k])
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .fold((0f64, 0f64), |(s, g), p| (s + p, g + p.abs()));
                let v = f64::from(got[i * m + j]);
                assert!(
                    (v - exact).abs() <= 1e-5 * mag + 1e-6,
                    "{t} k {k} m {m} row {i} act {j}: {v} vs {exact}"
                );
            }
        }
    }
}

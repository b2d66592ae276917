//! The AMX path: `tdpbf16ps` on 16 × 16 tiles (Intel AMX-BF16, Sapphire Rapids and later).
//!
//! Why: on these cores `vdpbf16ps` issues at about half the rate of an f32 FMA, so the
//! AVX-512 path barely beats f32; one `tdpbf16ps` does 16 × 16 × 32 multiply-adds.
//!
//! Layout: a `B` tile is 16 pair-rows of one packed panel (16 columns × 64 bytes), exactly
//! [`super::PackedBf16`]'s layout, read in place (the panels are padded to whole tiles for
//! this). `A` is `x` rounded to bf16, row-major with rows padded to 32 and `k` to the panels'
//! stored length: a tile is 16 rows × 32 consecutive `k`. A block of 32 rows × 32 columns
//! keeps its four `C` tiles in tmm0–3 over all of `k` (A in tmm4–5, B in tmm6–7), then
//! stores them to a scratch tile and copies the valid part out with the bias.
//!
//! Each output is one chain over `k` in the tiles' order whatever `m` is, so a row's result
//! does not depend on the batch either; the hardware sums a pair in its own order and flushes
//! subnormals, so its bits may differ from the AVX2/portable chain's.

use super::{to_bf16_bits, PackedBf16, SendPtr, KSTEP, NR};
use crate::ops::amx::{release, TileConfig};

/// Rows of a block (two tiles).
const BM: usize = 32;
/// Row blocks per parallel task (128 rows): the task's `A` (128 × k bf16) stays in L2 while
/// its column blocks pass over it.
const TASK_BLOCKS: usize = 4;

/// Whether the CPU has AMX-TILE and AMX-BF16 and the kernel let this process use the tile
/// data ([`crate::ops::amx`]).
pub(super) fn available() -> bool {
    crate::ops::amx::bf16_available()
}

/// `y = x Wᵀ + bias` on AMX (see the module doc); `y: (m, n)` zero-filled, `m, n, k > 0`.
pub(super) fn matmul(w: &PackedBf16, x: &[f32], m: usize, bias: Option<&[f32]>, y: &mut [f32]) {
    use rayon::prelude::*;
    let (n, k) = (w.n, w.k);
    // bf16 per A row: the panels' stored k (whole tiles of 32).
    let ka = 2 * w.kstride;
    let mpad = m.next_multiple_of(BM);
    let mut a = vec![0u16; mpad * ka];
    a.par_chunks_mut(ka)
        .zip(x.par_chunks(k))
        .for_each(|(row, xs)| {
            for (d, &v) in row.iter_mut().zip(xs) {
                *d = to_bf16_bits(v);
            }
        });
    let row_blocks = mpad / BM;
    let col_blocks = w.panels / 2;
    let tasks_m = row_blocks.div_ceil(TASK_BLOCKS);
    // Split columns too when there are few row tasks (a decode step: one).
    let threads = rayon::current_num_threads();
    let tasks_n = (4 * threads).div_ceil(tasks_m).clamp(1, col_blocks);
    let per_task_n = col_blocks.div_ceil(tasks_n);
    let tasks_n = col_blocks.div_ceil(per_task_n);
    let out = SendPtr(y.as_mut_ptr());
    let a = &a;
    let run = |t: usize| {
        let (tm, tn) = (t / tasks_n, t % tasks_n);
        let rbs = tm * TASK_BLOCKS..((tm + 1) * TASK_BLOCKS).min(row_blocks);
        let cbs = tn * per_task_n..((tn + 1) * per_task_n).min(col_blocks);
        let cfg = TileConfig::new([(16, 64); 8]);
        let mut scratch = [[0f32; 256]; 4];
        // SAFETY: AMX is available (checked by the caller through `available`), the
        // configuration is valid (eight tiles of 16 × 64 bytes), and the tiles are released
        // before the task ends.
        unsafe { cfg.load() };
        for cb in cbs {
            for rb in rbs.clone() {
                // SAFETY: rows `rb * 32 .. + 32` are inside the padded `a`; panels
                // `2 cb, 2 cb + 1` inside the weight (an even count is stored); `ka` and
                // `kstride` cover the same whole tiles of k.
                unsafe { block(w, a, ka, rb * BM, 2 * cb, &mut scratch) };
                let row0 = rb * BM;
                for (t, tile) in scratch.iter().enumerate() {
                    let (r0, c0) = (row0 + 16 * (t / 2), (2 * cb + t % 2) * NR);
                    if r0 >= m || c0 >= n {
                        continue;
                    }
                    for r in 0..16.min(m - r0) {
                        let cols = 16.min(n - c0);
                        // SAFETY: row `r0 + r < m`, columns `c0 .. c0 + cols <= n` of `y`;
                        // this task alone writes its blocks.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(out.get().add((r0 + r) * n + c0), cols)
                        };
                        let src = &tile[16 * r..16 * r + cols];
                        match bias {
                            Some(b) => {
                                for ((d, s), bb) in dst.iter_mut().zip(src).zip(&b[c0..]) {
                                    *d = s + bb;
                                }
                            }
                            None => dst.copy_from_slice(src),
                        }
                    }
                }
            }
        }
        // SAFETY: releases the tile state this task configured.
        unsafe { release() };
    };
    let tasks = tasks_m * tasks_n;
    if m <= super::super::gemv::MAX_ROWS {
        super::super::team::for_each(tasks, run);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// One 32 × 32 block over all of `k`: rows `row0..row0 + 32` of `a`, panels `p0, p0 + 1`;
/// the four C tiles (rows 0–15 × panel 0, rows 0–15 × panel 1, rows 16–31 × panel 0, rows
/// 16–31 × panel 1) stored to `scratch` (16 × 16 f32 each).
///
/// # Safety
/// Tiles configured (16 × 64 bytes each); the rows and panels in bounds.
unsafe fn block(
    w: &PackedBf16,
    a: &[u16],
    ka: usize,
    row0: usize,
    p0: usize,
    scratch: &mut [[f32; 256]; 4],
) {
    let a0 = a.as_ptr().add(row0 * ka) as *const u8;
    let a1 = a.as_ptr().add((row0 + 16) * ka) as *const u8;
    let b0 = w.data.as_ptr().add(p0 * w.kstride) as *const u8;
    let b1 = w.data.as_ptr().add((p0 + 1) * w.kstride) as *const u8;
    let sa = 2 * ka;
    let sb = 64usize;
    std::arch::asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
    for s in 0..w.kstride / KSTEP {
        // 32 bf16 of k per A tile row (64 bytes); 16 pair-rows of 64 bytes per B tile.
        let (ao, bo) = (s * 64, s * KSTEP * 64);
        std::arch::asm!(
            "tileloadd tmm4, [{a0} + {sa} * 1]",
            "tileloadd tmm5, [{a1} + {sa} * 1]",
            "tileloadd tmm6, [{b0} + {sb} * 1]",
            "tileloadd tmm7, [{b1} + {sb} * 1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0.add(ao),
            a1 = in(reg) a1.add(ao),
            b0 = in(reg) b0.add(bo),
            b1 = in(reg) b1.add(bo),
            sa = in(reg) sa,
            sb = in(reg) sb,
            options(nostack, readonly)
        );
    }
    std::arch::asm!(
        "tilestored [{c0} + {sc} * 1], tmm0",
        "tilestored [{c1} + {sc} * 1], tmm1",
        "tilestored [{c2} + {sc} * 1], tmm2",
        "tilestored [{c3} + {sc} * 1], tmm3",
        c0 = in(reg) scratch[0].as_mut_ptr(),
        c1 = in(reg) scratch[1].as_mut_ptr(),
        c2 = in(reg) scratch[2].as_mut_ptr(),
        c3 = in(reg) scratch[3].as_mut_ptr(),
        sc = in(reg) 64usize,
        options(nostack)
    );
}

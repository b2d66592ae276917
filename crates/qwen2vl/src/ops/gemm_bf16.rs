//! bf16 × bf16 → f32 matrix products for `--dtype bf16`: `y = x Wᵀ + b`.
//!
//! - `W: (n, k)` (the checkpoint's `(out, in)`), rounded to bf16 and packed once at load
//!   ([`PackedBf16`]);
//! - `x: (m, k)` f32 activations, rounded to bf16 (to nearest even, as torch's
//!   `tensor.to(torch.bfloat16)`) into a packed copy at every call;
//! - `b: (n,)` f32, optional; `y: (m, n)` f32.
//!
//! Why: the vision tower and the prefill are compute-bound, and the CPU's bf16 instructions
//! do more multiply-adds per cycle than f32 FMAs: AMX's `tdpbf16ps` (16 × 16 × 32 per
//! instruction; the `amx` child module, picked first where the CPU and the OS allow it) by
//! several times, AVX512_BF16's `vdpbf16ps` (32 per instruction) on CPUs that issue it as
//! fast as an FMA (on our Sapphire Rapids VM it issues at half that rate, so it barely beats
//! f32 there). candle's CPU matmul has no bf16 kernel of its own.
//!
//! Layout. `vdpbf16ps` multiplies, in each 32-bit lane, a pair of bf16 from `x` with a pair
//! from `W` and adds both products to that lane's f32 accumulator; a pair is two consecutive
//! `k` (the lower 16 bits hold the even `k`). So:
//! - `W` is stored as panels of [`NR`] = 16 output columns; a panel is `kp = ceil(k / 2)`
//!   pair-rows of 16 lanes (64 bytes, one zmm), lane `c` of pair-row `p` holding
//!   `(W[c, 2p], W[c, 2p + 1])`. `n` is padded to a multiple of 16 and `k` to an even
//!   count with zeros; the storage pads each panel to whole AMX tiles of 16 pair-rows and
//!   the panel count to even (a 16-row pair-row block is exactly an AMX `B` tile).
//! - `x` is packed per call in micro-panels of [`MR`] = 8 rows: pair-row `p` of a
//!   micro-panel is 8 lanes, lane `r` holding `(x[r, 2p], x[r, 2p + 1])`, one 32-bit
//!   broadcast per row in the kernel.
//!
//! Kernel: a tile of up to 8 rows × 48 columns (three panels) keeps 24 zmm accumulators; each
//! pair-row costs three 64-byte loads of `W`, eight broadcasts of `x` and 24 `vdpbf16ps`.
//! `k` is split into blocks of [`KC`] pairs so a tile's 48-column strip of `W` (24 KiB) stays
//! in L1 while the row tiles of a block pass over it; the products are split into
//! (rows × columns) blocks run on rayon's pool (a decode step's few rows: on the spinning
//! team, [`super::team`]).
//!
//! Determinism: every output element is one chain over `k` in order: for each pair, the
//! accumulator plus the odd product, then plus the even product (each product of two bf16 is
//! exact in f32), each sum rounded to f32 — the order Intel documents for `vdpbf16ps` —
//! then the bias added. The chain does not depend on `m`, on the row's place in the batch or
//! on the blocking (a block continues from the partial sums it stored), so a sequence decoded
//! alone and in a batch gets identical results. The AVX2 path (FMA on the widened
//! values) and the portable path compute exactly that chain and agree bit for bit; the
//! AVX-512 path may differ from them where the hardware flushes subnormals.
//!
//! [`matmul_plain`] is the oracle: f64 sums over the bf16-rounded inputs.

use std::sync::OnceLock;

use half::bf16;

use crate::error::{Error, Result};

/// Output columns per packed panel of `W`: the 16 f32 lanes of a zmm.
pub const NR: usize = 16;
/// Rows per packed micro-panel of `x` (and per kernel tile).
pub const MR: usize = 8;
/// Panels per kernel tile: 8 rows × 48 columns = 24 accumulators.
const NP: usize = 3;
/// `k` pairs per cache block: a tile's strip of `W` is `KC × 48 × 4` bytes = 24 KiB.
const KC: usize = 128;
/// Row micro-panels per parallel block (192 rows): the block's packed `x` for one `k` block
/// is 96 KiB, in L2 while the column tiles pass over it.
const MC_PANELS: usize = 24;
/// Most 48-column tiles in one parallel block: its `W` for one `k` block is at most 768 KiB.
const MAX_TILES_PER_BLOCK: usize = 16;
/// Pair-rows of one AMX tile (16 rows of 64 bytes): the packed panels' `k` granule.
const KSTEP: usize = 16;

#[cfg(target_arch = "x86_64")]
mod amx;

/// Which inner loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AMX-BF16 tiles (`tdpbf16ps`, 32 × 32 blocks; see `amx.rs`), where the CPU and the OS
    /// allow them.
    #[cfg(target_arch = "x86_64")]
    Amx,
    /// AVX-512 F with AVX512_BF16: `vdpbf16ps`, 8 × 48 tiles.
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16,
    /// AVX2 with FMA: the bf16 pairs widened to f32 by shifts, two FMAs per pair, 4 × 16 tiles.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// Plain Rust (`f32::mul_add`).
    Portable,
}

impl Isa {
    /// The fastest path this CPU runs (detected once, cached), or the one the environment
    /// names in `QWEN2VL_BF16_ISA` (`amx`, `avx512`, `avx2`, `portable`) when the CPU has it:
    /// for before/after comparisons with one binary.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let named = std::env::var("QWEN2VL_BF16_ISA").ok();
            Isa::all()
                .into_iter()
                .filter(|i| named.as_deref().is_none_or(|n| n == i.name()))
                .find(|i| i.available())
                .unwrap_or(Isa::Portable)
        })
    }

    /// The path's short name (`amx`, `avx512`, `avx2`, `portable`).
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => "amx",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => "avx512",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// Every path, fastest first.
    pub fn all() -> Vec<Isa> {
        #[cfg(target_arch = "x86_64")]
        let all = vec![Isa::Amx, Isa::Avx512Bf16, Isa::Avx2Fma, Isa::Portable];
        #[cfg(not(target_arch = "x86_64"))]
        let all = vec![Isa::Portable];
        all
    }

    /// Whether this CPU has the instructions the path needs.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => amx::available(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            Isa::Portable => true,
        }
    }
}

/// `x` rounded to bf16 to nearest even, as torch does (`c10::round_to_nearest_even`: a NaN
/// becomes the quiet NaN `0x7FC0`; values past the largest bf16 become ±inf).
#[inline]
pub fn to_bf16_bits(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7FC0;
    }
    let b = x.to_bits();
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of a bf16 bit pattern (exact).
#[inline]
fn bf16_value(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Two bf16 in one 32-bit lane: `lo` (the even `k`) in the lower half.
#[inline]
fn pair(lo: u16, hi: u16) -> u32 {
    u32::from(lo) | (u32::from(hi) << 16)
}

/// One pair-row of a panel: 16 lanes, aligned to a cache line (one aligned zmm load).
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Lanes([u32; NR]);

/// A weight `W: (n, k)` rounded to bf16 and packed for [`PackedBf16::matmul`] (see the
/// module doc for the layout): `ceil(n / 16)` panels of `ceil(k / 2)` pair-rows.
#[derive(Clone)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    /// Pair-rows per panel: `ceil(k / 2)`.
    kp: usize,
    /// Pair-rows stored per panel: `kp` rounded up to [`KSTEP`] (zeros), so an AMX tile of
    /// 16 pair-rows never runs past its panel.
    kstride: usize,
    /// Panels stored: `ceil(n / 16)` rounded up to even (a zero panel), so AMX's tiles of
    /// two panels never run past the end.
    panels: usize,
    /// `panels × kstride` pair-rows, panel after panel.
    data: Vec<Lanes>,
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedBf16")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

impl PackedBf16 {
    /// Packs `w: (n, k)` row-major f32, each value rounded to bf16 (exact for weights a
    /// checkpoint stores in bf16).
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Result<Self> {
        check_len("weight", w.len(), n * k)?;
        Ok(Self::pack(n, k, |r, c| to_bf16_bits(w[r * k + c])))
    }

    /// Packs `w: (n, k)` row-major bf16.
    pub fn from_bf16(w: &[bf16], n: usize, k: usize) -> Result<Self> {
        check_len("weight", w.len(), n * k)?;
        Ok(Self::pack(n, k, |r, c| w[r * k + c].to_bits()))
    }

    /// Packs element `(row, col) = get(row, col)` of an `(n, k)` matrix; panels in parallel.
    fn pack(n: usize, k: usize, get: impl Fn(usize, usize) -> u16 + Sync) -> Self {
        use rayon::prelude::*;
        let kp = k.div_ceil(2);
        let kstride = kp.next_multiple_of(KSTEP);
        let panels = n.div_ceil(NR).next_multiple_of(2);
        let mut data = vec![Lanes::default(); panels * kstride];
        if kp > 0 {
            data.par_chunks_mut(kstride)
                .enumerate()
                .for_each(|(j, panel)| {
                    for c in 0..NR.min(n.saturating_sub(j * NR)) {
                        let row = j * NR + c;
                        for (p, lanes) in panel[..kp].iter_mut().enumerate() {
                            let lo = get(row, 2 * p);
                            let hi = if 2 * p + 1 < k {
                                get(row, 2 * p + 1)
                            } else {
                                0
                            };
                            lanes.0[c] = pair(lo, hi);
                        }
                    }
                });
        }
        PackedBf16 {
            n,
            k,
            kp,
            kstride,
            panels,
            data,
        }
    }

    /// `(n, k)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<Lanes>()
    }

    /// `x: (m, k)` row-major f32 → `x Wᵀ + bias: (m, n)`, on the fastest path this CPU has.
    pub fn matmul(&self, x: &[f32], m: usize, bias: Option<&[f32]>) -> Result<Vec<f32>> {
        self.matmul_with(Isa::detect(), x, m, bias)
    }

    /// [`PackedBf16::matmul`] on a given path (tests and benchmarks compare them).
    ///
    /// # Errors
    /// When `x` is not `m × k` long, `bias` not `n` long, or the CPU lacks `isa`.
    pub fn matmul_with(
        &self,
        isa: Isa,
        x: &[f32],
        m: usize,
        bias: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let (n, k, kp) = (self.n, self.k, self.kp);
        check_len("input", x.len(), m * k)?;
        if let Some(b) = bias {
            check_len("bias", b.len(), n)?;
        }
        if !isa.available() {
            return Err(Error::Internal(format!(
                "bf16 matmul: this CPU cannot run {isa:?}"
            )));
        }
        let mut y = vec![0f32; m * n];
        if m == 0 || n == 0 {
            return Ok(y);
        }
        if kp == 0 {
            if let Some(b) = bias {
                y.chunks_exact_mut(n).for_each(|row| row.copy_from_slice(b));
            }
            return Ok(y);
        }
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Amx {
            amx::matmul(self, x, m, bias, &mut y);
            return Ok(y);
        }
        let a = pack_x(x, m, k);
        let row_panels = m.div_ceil(MR);
        let row_blocks = row_panels.div_ceil(MC_PANELS);
        let tiles = n.div_ceil(NR * NP);
        // Enough blocks that every thread gets several (a decode step's one row block is
        // split by columns), none wider than MAX_TILES_PER_BLOCK.
        let threads = rayon::current_num_threads();
        let col_blocks = (4 * threads)
            .div_ceil(row_blocks)
            .max(tiles.div_ceil(MAX_TILES_PER_BLOCK))
            .clamp(1, tiles);
        let tiles_per_block = tiles.div_ceil(col_blocks);
        let col_blocks = tiles.div_ceil(tiles_per_block);
        let out = SendPtr(y.as_mut_ptr());
        let bias_ptr = bias.map_or(std::ptr::null(), <[f32]>::as_ptr);
        let job = Job {
            a: &a,
            w: self,
            m,
            bias: bias_ptr,
            out,
            isa,
        };
        let run = |t: usize| {
            let (rb, cb) = (t / col_blocks, t % col_blocks);
            let panels = rb * MC_PANELS..((rb + 1) * MC_PANELS).min(row_panels);
            let tile_range = cb * tiles_per_block..((cb + 1) * tiles_per_block).min(tiles);
            job.block(panels, tile_range);
        };
        // A decode step's few rows: the spinning team, as `gemv` (no wake-up per product).
        // Prefill and the vision tower: rayon, whose workers then run the attention and
        // element-wise passes between products without pollers beside them.
        if m <= super::gemv::MAX_ROWS {
            super::team::for_each(row_blocks * col_blocks, run);
        } else {
            use rayon::prelude::*;
            (0..row_blocks * col_blocks).into_par_iter().for_each(run);
        }
        Ok(y)
    }
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::Internal(format!(
            "bf16 matmul: {what} has {got} values, expected {want}"
        )))
    }
}

/// `x: (m, k)` → micro-panels of [`MR`] rows (rows past `m` are zeros): panel `i`,
/// pair-row `p`, lane `r` at `(i * kp + p) * MR + r`.
fn pack_x(x: &[f32], m: usize, k: usize) -> Vec<u32> {
    use rayon::prelude::*;
    let kp = k.div_ceil(2);
    let mut a = vec![0u32; m.div_ceil(MR) * kp * MR];
    let pack_panel = |(i, panel): (usize, &mut [u32])| {
        for r in 0..MR.min(m - i * MR) {
            let row = &x[(i * MR + r) * k..(i * MR + r + 1) * k];
            let mut pairs = row.chunks_exact(2);
            for (p, two) in pairs.by_ref().enumerate() {
                panel[p * MR + r] = pair(to_bf16_bits(two[0]), to_bf16_bits(two[1]));
            }
            if let [last] = pairs.remainder() {
                panel[(kp - 1) * MR + r] = pair(to_bf16_bits(*last), 0);
            }
        }
    };
    // Packing is O(m k) against the product's O(m n k): parallel only when it is big.
    if m * k >= 1 << 16 {
        a.par_chunks_mut(kp * MR).enumerate().for_each(pack_panel);
    } else {
        a.chunks_mut(kp * MR).enumerate().for_each(pack_panel);
    }
    a
}

/// A raw output pointer that may cross threads: the blocks write disjoint parts of it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used to write disjoint (rows × columns) blocks of one `Vec<f32>` that the
// caller keeps borrowed until every block has finished (see `Job::block`).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// One call's shared inputs.
struct Job<'a> {
    /// Packed `x` ([`pack_x`]).
    a: &'a [u32],
    w: &'a PackedBf16,
    m: usize,
    /// `n` values, or null.
    bias: *const f32,
    /// `y: (m, n)`.
    out: SendPtr,
    isa: Isa,
}

// SAFETY: `bias` points into a slice the caller of `matmul_with` keeps borrowed for the call
// and is only read.
unsafe impl Sync for Job<'_> {}

/// One kernel call's operands: a tile of `rows ≤ 8` rows × `panels ≤ 3` panels over the
/// `kc` pair-rows of one `k` block.
#[derive(Clone, Copy)]
struct Tile {
    /// Pair-rows in this `k` block.
    kc: usize,
    /// The rows' micro-panel at the block's first pair-row: `MR` lanes per pair-row.
    a: *const u32,
    /// The first panel at the block's first pair-row; panel `j` starts `j * b_stride` lanes on.
    b: *const u32,
    b_stride: usize,
    /// `y` at the tile's first row and column; rows `ldc` apart.
    c: *mut f32,
    ldc: usize,
    /// Valid columns of the tile (the last panel may be partly padding).
    cols: usize,
    /// The first `k` block: start from zero instead of the stored partial sums.
    first: bool,
    /// The bias at the tile's first column when this is the last `k` block, else null.
    bias: *const f32,
}

impl Job<'_> {
    /// Row micro-panels `panels` × 48-column tiles `tiles`, all of `k`.
    fn block(&self, panels: std::ops::Range<usize>, tiles: std::ops::Range<usize>) {
        let (n, kp, ks) = (self.w.n, self.w.kp, self.w.kstride);
        let total_panels = n.div_ceil(NR);
        let mut pc = 0;
        while pc < kp {
            let kc = KC.min(kp - pc);
            let last = pc + kc == kp;
            for tile in tiles.clone() {
                let p0 = tile * NP;
                let np = NP.min(total_panels - p0);
                let col0 = p0 * NR;
                let cols = (np * NR).min(n - col0);
                for i in panels.clone() {
                    let r0 = i * MR;
                    let rows = MR.min(self.m - r0);
                    let t = Tile {
                        kc,
                        // SAFETY (both offsets): inside `a` (panel `i < m / MR` rounded up,
                        // pair-row `pc < kp`) and inside the weight (panel `p0 < panels`).
                        a: unsafe { self.a.as_ptr().add((i * kp + pc) * MR) },
                        b: unsafe { self.w.data.as_ptr().add(p0 * ks + pc) as *const u32 },
                        b_stride: ks * NR,
                        // SAFETY: row `r0 < m`, column `col0 < n` of the `(m, n)` output.
                        c: unsafe { self.out.0.add(r0 * n + col0) },
                        ldc: n,
                        cols,
                        first: pc == 0,
                        bias: if last && !self.bias.is_null() {
                            // SAFETY: `col0 < n` and the bias has `n` values.
                            unsafe { self.bias.add(col0) }
                        } else {
                            std::ptr::null()
                        },
                    };
                    // SAFETY: the tile's operands are in bounds as computed above, `rows`
                    // and `np` are within the kernels' limits, the CPU has `isa` (checked
                    // by `matmul_with`), and no other block writes these rows × columns.
                    unsafe { run_tile(self.isa, rows, np, &t) };
                }
            }
            pc += kc;
        }
    }
}

/// Runs one tile on `isa`.
///
/// # Safety
/// `rows ∈ 1..=8`, `np ∈ 1..=3`, the pointers of `t` valid for the tile (reads of `kc`
/// pair-rows; `rows × cols` outputs), the CPU has `isa`.
unsafe fn run_tile(isa: Isa, rows: usize, np: usize, t: &Tile) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Amx => unreachable!("AMX runs its own blocks"),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => avx512::tile(rows, np, t),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => {
            // 4 × 16 tiles: two row halves for each panel.
            for j in 0..np {
                let cols = t.cols.saturating_sub(j * NR).min(NR);
                for r0 in (0..rows).step_by(4) {
                    let sub = Tile {
                        a: t.a.add(r0),
                        b: t.b.add(j * t.b_stride),
                        c: t.c.add(r0 * t.ldc + j * NR),
                        cols,
                        bias: if t.bias.is_null() {
                            t.bias
                        } else {
                            t.bias.add(j * NR)
                        },
                        ..*t
                    };
                    avx2::tile(4.min(rows - r0), &sub);
                }
            }
        }
        Isa::Portable => portable_tile(rows, np, t),
    }
}

/// The plain tile: per output, the chain of the module doc with `f32::mul_add`.
///
/// # Safety
/// As [`run_tile`].
unsafe fn portable_tile(rows: usize, np: usize, t: &Tile) {
    for r in 0..rows {
        for c in 0..t.cols.min(np * NR) {
            let (j, lane) = (c / NR, c % NR);
            let out = t.c.add(r * t.ldc + c);
            let mut acc = if t.first { 0.0 } else { *out };
            for p in 0..t.kc {
                let a = *t.a.add(p * MR + r);
                let b = *t.b.add(j * t.b_stride + p * NR + lane);
                acc = f32::mul_add(
                    bf16_value((a >> 16) as u16),
                    bf16_value((b >> 16) as u16),
                    acc,
                );
                acc = f32::mul_add(bf16_value(a as u16), bf16_value(b as u16), acc);
            }
            if !t.bias.is_null() {
                acc += *t.bias.add(c);
            }
            *out = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Tile, MR, NR};
    use std::arch::x86_64::*;

    /// Dispatches to the kernel for `rows × np`.
    ///
    /// # Safety
    /// As [`super::run_tile`], with AVX-512 F and AVX512_BF16.
    pub(super) unsafe fn tile(rows: usize, np: usize, t: &Tile) {
        match np {
            1 => by_rows::<1>(rows, t),
            2 => by_rows::<2>(rows, t),
            _ => by_rows::<3>(rows, t),
        }
    }

    unsafe fn by_rows<const P: usize>(rows: usize, t: &Tile) {
        match rows {
            1 => kernel::<1, P>(t),
            2 => kernel::<2, P>(t),
            3 => kernel::<3, P>(t),
            4 => kernel::<4, P>(t),
            5 => kernel::<5, P>(t),
            6 => kernel::<6, P>(t),
            7 => kernel::<7, P>(t),
            _ => kernel::<8, P>(t),
        }
    }

    /// The lanes of output panel `j` that are real columns.
    #[inline(always)]
    fn mask(cols: usize, j: usize) -> __mmask16 {
        let valid = cols.saturating_sub(j * NR).min(NR);
        ((1u32 << valid) - 1) as __mmask16
    }

    /// `R` rows × `P` panels: `R * P` accumulators, the x pair broadcast from memory.
    ///
    /// # Safety
    /// As [`tile`]; `R ≤ MR`, `P ≤ 3`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel<const R: usize, const P: usize>(t: &Tile) {
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        if !t.first {
            for (r, row) in acc.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(mask(t.cols, j), t.c.add(r * t.ldc + j * NR));
                }
            }
        }
        for p in 0..t.kc {
            let mut b = [_mm512_setzero_si512(); P];
            for (j, v) in b.iter_mut().enumerate() {
                // Aligned: panels and pair-rows are whole cache lines.
                *v = _mm512_load_si512(t.b.add(j * t.b_stride + p * NR) as *const _);
            }
            let a = t.a.add(p * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_epi32(*a.add(r) as i32);
                for (j, v) in row.iter_mut().enumerate() {
                    *v = _mm512_dpbf16_ps(
                        *v,
                        std::mem::transmute::<__m512i, __m512bh>(x),
                        std::mem::transmute::<__m512i, __m512bh>(b[j]),
                    );
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                let m = mask(t.cols, j);
                let mut y = *v;
                if !t.bias.is_null() {
                    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, t.bias.add(j * NR)));
                }
                _mm512_mask_storeu_ps(t.c.add(r * t.ldc + j * NR), m, y);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Tile, MR, NR};
    use std::arch::x86_64::*;

    /// Up to 4 rows × one panel (two 8-lane halves).
    ///
    /// # Safety
    /// As [`super::run_tile`] for one panel (`t.b`, `t.cols ≤ 16`, `t.bias` already at the
    /// panel), `rows ≤ 4`, with AVX2 and FMA.
    pub(super) unsafe fn tile(rows: usize, t: &Tile) {
        match rows {
            1 => kernel::<1>(t),
            2 => kernel::<2>(t),
            3 => kernel::<3>(t),
            _ => kernel::<4>(t),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel<const R: usize>(t: &Tile) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut buf = [0f32; NR];
        if !t.first {
            for (r, row) in acc.iter_mut().enumerate() {
                let c = t.c.add(r * t.ldc);
                std::ptr::copy_nonoverlapping(c, buf.as_mut_ptr(), t.cols);
                row[0] = _mm256_loadu_ps(buf.as_ptr());
                row[1] = _mm256_loadu_ps(buf.as_ptr().add(8));
            }
        }
        let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        for p in 0..t.kc {
            let b = t.b.add(p * NR);
            let mut odd = [_mm256_setzero_ps(); 2];
            let mut even = [_mm256_setzero_ps(); 2];
            for h in 0..2 {
                let v = _mm256_loadu_si256(b.add(8 * h) as *const __m256i);
                odd[h] = _mm256_castsi256_ps(_mm256_and_si256(v, high));
                even[h] = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
            }
            let a = t.a.add(p * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let x = *a.add(r);
                let xo = _mm256_set1_ps(f32::from_bits(x & 0xFFFF_0000));
                let xe = _mm256_set1_ps(f32::from_bits(x << 16));
                for ((v, o), e) in row.iter_mut().zip(&odd).zip(&even) {
                    *v = _mm256_fmadd_ps(xo, *o, *v);
                    *v = _mm256_fmadd_ps(xe, *e, *v);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(buf.as_mut_ptr(), row[0]);
            _mm256_storeu_ps(buf.as_mut_ptr().add(8), row[1]);
            if !t.bias.is_null() {
                for (c, v) in buf.iter_mut().enumerate().take(t.cols) {
                    *v += *t.bias.add(c);
                }
            }
            std::ptr::copy_nonoverlapping(buf.as_ptr(), t.c.add(r * t.ldc), t.cols);
        }
    }
}

/// The oracle: `x Wᵀ + bias` with `x: (m, k)` and `W: (n, k)` rounded to bf16 (half's
/// round-to-nearest-even) and the sums taken in f64.
pub fn matmul_plain(
    x: &[f32],
    w: &[f32],
    m: usize,
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let xr: Vec<f64> = x.iter().map(|&v| f64::from(bf16::from_f32(v))).collect();
    let wr: Vec<f64> = w.iter().map(|&v| f64::from(bf16::from_f32(v))).collect();
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k).map(|c| xr[i * k + c] * wr[j * k + c]).sum();
            y[i * n + j] = (s + bias.map_or(0.0, |b| f64::from(b[j]))) as f32;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(len: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Bound for one output: the f32 chain's rounding, `(2k + 1) · 2⁻²⁴ · Σ|x w| + |b|`,
    /// with room.
    fn tolerance(x: &[f32], w: &[f32], b: f32) -> f32 {
        let s: f32 = x
            .iter()
            .zip(w)
            .map(|(a, c)| (bf16::from_f32(*a).to_f32() * bf16::from_f32(*c).to_f32()).abs())
            .sum();
        2.0 * (2 * x.len() + 2) as f32 * f32::EPSILON / 2.0 * (s + b.abs()) + 1e-30
    }

    #[test]
    fn rounding_matches_half_and_torch() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut values: Vec<f32> = (0..100_000)
            .map(|_| f32::from_bits(rng.random::<u32>()))
            .filter(|v| !v.is_nan())
            .collect();
        // Exact ties (round to even both ways), the largest values, zeros, infinities.
        values.extend([
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            f32::from_bits(0x7F7F_FFFF),
            f32::from_bits(0xFF7F_FFFF),
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(1),
        ]);
        for v in values {
            assert_eq!(to_bf16_bits(v), bf16::from_f32(v).to_bits(), "{v:e}");
        }
        assert_eq!(to_bf16_bits(f32::NAN), 0x7FC0);
        assert_eq!(to_bf16_bits(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(to_bf16_bits(f32::from_bits(0x3F81_8000)), 0x3F82);
    }

    #[test]
    fn every_path_matches_the_oracle_on_odd_shapes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut shapes: Vec<(usize, usize, usize)> = (1..=17).map(|m| (m, 53, 37)).collect();
        shapes.extend([
            (1, 1, 1),
            (3, 16, 2),
            (9, 48, 64),
            (8, 49, 255),
            (20, 100, 259),
            (33, 97, 301),
            (197, 150, 513),
            (5, 17, 0),
        ]);
        for &(m, n, k) in &shapes {
            let x = random(m * k, &mut rng);
            let w = random(n * k, &mut rng);
            let b = random(n, &mut rng);
            let packed = PackedBf16::from_f32(&w, n, k).unwrap();
            for bias in [None, Some(&b[..])] {
                let want = matmul_plain(&x, &w, m, n, k, bias);
                for isa in Isa::all().into_iter().filter(|i| i.available()) {
                    let got = packed.matmul_with(isa, &x, m, bias).unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            let bj = bias.map_or(0.0, |b| b[j]);
                            let tol = tolerance(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k], bj);
                            let (g, e) = (got[i * n + j], want[i * n + j]);
                            assert!(
                                (g - e).abs() <= tol,
                                "{isa:?} m {m} n {n} k {k} bias {} at ({i}, {j}): {g} vs {e} (tol {tol:e})",
                                bias.is_some()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_paths_agree_and_rows_do_not_depend_on_the_batch() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (m, n, k) = (203, 211, 301);
        let x = random(m * k, &mut rng);
        let w = random(n * k, &mut rng);
        let b = random(n, &mut rng);
        let packed = PackedBf16::from_f32(&w, n, k).unwrap();
        let portable = packed.matmul_with(Isa::Portable, &x, m, Some(&b)).unwrap();
        for isa in Isa::all().into_iter().filter(|i| i.available()) {
            let all = packed.matmul_with(isa, &x, m, Some(&b)).unwrap();
            // A row alone gives the same bits as in the batch.
            for r in [0, 7, 8, 100, m - 1] {
                let one = packed
                    .matmul_with(isa, &x[r * k..(r + 1) * k], 1, Some(&b))
                    .unwrap();
                assert_eq!(one, all[r * n..(r + 1) * n], "{isa:?} row {r}");
            }
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx2Fma {
                assert_eq!(all, portable, "AVX2 and portable compute one chain");
            }
            let worst = all
                .iter()
                .zip(&portable)
                .map(|(a, p)| (a - p).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{isa:?} differs from portable by {worst}");
        }
    }

    #[test]
    fn bf16_input_packs_like_rounded_f32() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (n, k) = (35, 19);
        let w = random(n * k, &mut rng);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let a = PackedBf16::from_f32(&w, n, k).unwrap();
        let b = PackedBf16::from_bf16(&wb, n, k).unwrap();
        assert!(a.data.iter().zip(&b.data).all(|(p, q)| p.0 == q.0));
        assert!(PackedBf16::from_f32(&w, n, k + 1).is_err());
        assert!(a.matmul(&[0.0; 18], 1, None).is_err());
        assert!(a.matmul(&[0.0; 19], 1, Some(&[0.0; 3])).is_err());
    }
}

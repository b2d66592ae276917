//! f32 matrix products on 16-bit weights read in place: `y = x Wᵀ + b`.
//!
//! - `W: (n, k)` row-major (the checkpoint's `(out, in)`), f16 or bf16, read straight from
//!   the memory-mapped file ([`HalfMatrix`]): never widened into a second copy;
//! - `x: (m, k)` f32; `b: (n,)` f32, optional; `y: (m, n)` f32.
//!
//! Why: checkpoints store their weights in 16 bits (Qwen2-VL's safetensors in bf16, a GGUF
//! projector in f16), and f32 compute used to widen every matrix at load: twice the memory
//! (the 2B's f16 projector became 2.6 GB of anonymous pages), and a load dominated by the
//! kernel zeroing those pages. Widening a 16-bit float to f32 is exact, so computing in f32
//! from the 16-bit bits gives the f32 model's numbers (only the order of the sums is ours,
//! as it already was with candle's gemm).
//!
//! Kernel (many rows: the vision tower, prefill). Per parallel block of [`NC`] output
//! columns and `k` block of [`KC`]: the block's weights are widened once into a panel of
//! `NR`-column strips (`panel[s][kk][c] = W[n0 + s·NR + c, k0 + kk]`, zero past `n`), then for
//! every group of `MR` rows of `x` (copied to a `(KC, MR)` micro-panel, zero past `m`) each
//! strip runs an `MR × NR` register tile: one load of `NR` weights and `MR` broadcasts of `x`
//! per `kk`, `MR × NR / lanes` FMAs, added into `y`. The widening costs `1 / m` of the
//! multiply-adds; `x` is copied into micro-panels once per call.
//! - AVX-512F: `MR = 12`, `NR = 32` (24 zmm accumulators);
//! - AVX2 + FMA: `MR = 6`, `NR = 16` (12 ymm accumulators);
//! - portable: the AVX2 tile in plain Rust, product and sum rounded separately.
//!
//! A few rows (decode: at most [`crate::ops::gemv::MAX_ROWS`]) take [`crate::ops::gemv`] on
//! the same bytes where they are 2-byte aligned (each weight streamed once for all rows), as
//! candle's f32 products did before: so, as before, a row's bits depend on whether its call
//! had at most 16 rows or more.
//!
//! Determinism of the tiled path: an output element starts at its bias (or zero) and adds,
//! `k` block by `k` block in order, each block's chain of products summed in `k` order from
//! zero (fused on the SIMD paths). Nothing depends on `m` or on a
//! row's place among the rows, so chunked and whole passes give the same bits.
//!
//! [`matmul_plain`] is the oracle: the same product in f64.

use std::sync::{Arc, OnceLock};

use half::{bf16, f16};
use rayon::prelude::*;

use super::SyncPtr;
use crate::error::{Error, Result};

/// The 16-bit format of a [`HalfMatrix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfKind {
    /// IEEE binary16.
    F16,
    /// bfloat16 (the upper half of an f32).
    Bf16,
}

impl HalfKind {
    /// The exact f32 value of `bits`.
    #[inline]
    pub fn widen(self, bits: u16) -> f32 {
        match self {
            HalfKind::F16 => f16::from_bits(bits).to_f32(),
            HalfKind::Bf16 => f32::from_bits((bits as u32) << 16),
        }
    }

    /// Widens `src` into `dst` (same length), with the CPU's conversion instructions where
    /// `half` finds them.
    fn widen_slice(self, src: &[u16], dst: &mut [f32]) {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        match self {
            HalfKind::F16 => src.reinterpret_cast::<f16>().convert_to_f32_slice(dst),
            HalfKind::Bf16 => {
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = f32::from_bits((s as u32) << 16);
                }
            }
        }
    }
}

/// Rows `first..first + rows` of a matrix, `rows × k` little-endian 16-bit values at `ptr`.
#[derive(Debug, Clone, Copy)]
struct Part {
    ptr: *const u8,
    first: usize,
    rows: usize,
}

/// An `(n, k)` matrix of 16-bit floats left where the checkpoint's bytes are (a memory map),
/// possibly in several row blocks (a GGUF stores the vision tower's q, k and v apart; the
/// model reads them as one `qkv`).
pub struct HalfMatrix {
    kind: HalfKind,
    n: usize,
    k: usize,
    parts: Vec<Part>,
    /// Keeps the bytes mapped (the `Mmap` or the GGUF files they are in).
    _owner: Arc<dyn std::any::Any + Send + Sync>,
}

// SAFETY: the parts point into read-only memory that `_owner` keeps mapped for as long as the
// matrix lives; nothing writes through them.
unsafe impl Send for HalfMatrix {}
unsafe impl Sync for HalfMatrix {}

impl std::fmt::Debug for HalfMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HalfMatrix")
            .field("kind", &self.kind)
            .field("dims", &(self.n, self.k))
            .field("parts", &self.parts.len())
            .finish()
    }
}

impl HalfMatrix {
    /// A matrix of `k` columns from row blocks `parts` (bytes of `rows × k` 16-bit values
    /// each, in order), which `owner` keeps alive and unchanged.
    ///
    /// An error when a block's length is not a whole number of rows.
    pub fn new(
        kind: HalfKind,
        k: usize,
        parts: &[&[u8]],
        owner: Arc<dyn std::any::Any + Send + Sync>,
    ) -> Result<Self> {
        let row_bytes = 2 * k;
        let mut out = Vec::with_capacity(parts.len());
        let mut n = 0;
        for p in parts {
            if k == 0 || p.len() % row_bytes != 0 {
                return Err(Error::Weights(format!(
                    "{} bytes are not whole rows of {k} 16-bit values",
                    p.len()
                )));
            }
            let rows = p.len() / row_bytes;
            out.push(Part {
                ptr: p.as_ptr(),
                first: n,
                rows,
            });
            n += rows;
        }
        Ok(Self {
            kind,
            n,
            k,
            parts: out,
            _owner: owner,
        })
    }

    /// A matrix over owned values (tests, benchmarks).
    pub fn from_bits(kind: HalfKind, bits: Vec<u16>, n: usize, k: usize) -> Result<Self> {
        if bits.len() != n * k {
            return Err(Error::Weights(format!(
                "{} values for a ({n}, {k}) matrix",
                bits.len()
            )));
        }
        let bits: Arc<Vec<u16>> = Arc::new(bits);
        // SAFETY: the Vec's buffer is never moved or changed while the Arc lives.
        let bytes = unsafe { std::slice::from_raw_parts(bits.as_ptr() as *const u8, 2 * n * k) };
        Self::new(kind, k, &[bytes], bits.clone())
    }

    /// `(n, k)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The format.
    pub fn kind(&self) -> HalfKind {
        self.kind
    }

    /// Bytes of the matrix.
    pub fn byte_len(&self) -> usize {
        2 * self.n * self.k
    }

    /// Row `j`'s bytes (`2k`).
    #[inline]
    fn row_bytes(&self, j: usize) -> &[u8] {
        let p = self
            .parts
            .iter()
            .rev()
            .find(|p| p.first <= j)
            .expect("row inside the matrix");
        debug_assert!(j - p.first < p.rows);
        // SAFETY: `j - p.first < p.rows` (rows are in order and `j < n`), and the part holds
        // `rows × 2k` readable bytes (checked in `new`, kept alive by `_owner`).
        unsafe { std::slice::from_raw_parts(p.ptr.add((j - p.first) * 2 * self.k), 2 * self.k) }
    }

    /// Row `j` widened into `dst[..k']` for columns `k0..k0 + k'` (`k' = dst.len()`).
    fn widen_row(&self, j: usize, k0: usize, dst: &mut [f32], tmp: &mut Vec<u16>) {
        let bytes = &self.row_bytes(j)[2 * k0..2 * (k0 + dst.len())];
        tmp.clear();
        tmp.extend(
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]])),
        );
        self.kind.widen_slice(tmp, dst);
    }

    /// Row `j < n` widened into `dst` (`k` values): an embedding lookup.
    pub fn row_f32(&self, j: usize, dst: &mut [f32]) {
        let mut tmp = Vec::with_capacity(self.k);
        self.widen_row(j, 0, &mut dst[..self.k], &mut tmp);
    }

    /// The whole matrix widened (tests, and the rare caller that needs a candle tensor).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        let mut tmp = Vec::new();
        for (j, row) in out.chunks_exact_mut(self.k.max(1)).enumerate() {
            self.widen_row(j, 0, row, &mut tmp);
        }
        out
    }

    /// The part holding every row as one 2-byte-aligned slice of `T` (f16 or bf16), when
    /// there is one part and it is aligned: what [`crate::ops::gemv`] reads.
    fn as_single<T>(&self) -> Option<&[T]> {
        let [p] = self.parts.as_slice() else {
            return None;
        };
        if !(p.ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return None;
        }
        // SAFETY: aligned, `n × k` 2-byte values inside the mapping kept by `_owner`; f16
        // and bf16 are `repr(transparent)` over u16, and every bit pattern is a value.
        Some(unsafe { std::slice::from_raw_parts(p.ptr as *const T, self.n * self.k) })
    }

    /// `y (m, n) = x (m, k) · Wᵀ + b` (see the module docs).
    pub fn matmul(&self, x: &[f32], m: usize, bias: Option<&[f32]>) -> Result<Vec<f32>> {
        let (n, k) = (self.n, self.k);
        if x.len() != m * k || bias.is_some_and(|b| b.len() != n) {
            return Err(Error::Internal(format!(
                "a ({n}, {k}) 16-bit product got {} inputs for {m} rows{}",
                x.len(),
                bias.map_or(String::new(), |b| format!(" and {} biases", b.len()))
            )));
        }
        let mut y = vec![0f32; m * n];
        if m <= crate::ops::gemv::MAX_ROWS && crate::ops::gemv::enabled() && m > 0 {
            let done = match self.kind {
                HalfKind::F16 => self.as_single::<f16>().map(|w| {
                    crate::ops::gemv::gemv(x, m, k, w, n, None, &mut y);
                }),
                HalfKind::Bf16 => self.as_single::<bf16>().map(|w| {
                    crate::ops::gemv::gemv(x, m, k, w, n, None, &mut y);
                }),
            };
            if done.is_some() {
                if let Some(b) = bias {
                    for row in y.chunks_exact_mut(n) {
                        for (v, &b) in row.iter_mut().zip(b) {
                            *v += b;
                        }
                    }
                }
                return Ok(y);
            }
        }
        matmul_with(Isa::detect(), self, x, m, bias, &mut y);
        Ok(y)
    }
}

/// Which tile kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F: 12 × 32 tiles.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX2 + FMA: 6 × 16 tiles.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Plain Rust: 6 × 16 tiles, unfused.
    Portable,
}

impl Isa {
    /// The fastest path this CPU runs (detected once), or the one `QWEN2VL_HALF_ISA` names
    /// (`avx512`, `avx2`, `portable`) when the CPU has it.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let named = std::env::var("QWEN2VL_HALF_ISA").ok();
            Isa::all()
                .into_iter()
                .filter(|i| named.as_deref().is_none_or(|n| n == i.name()))
                .find(|i| i.available())
                .unwrap_or(Isa::Portable)
        })
    }

    /// Every path, fastest first.
    pub fn all() -> Vec<Isa> {
        #[cfg(target_arch = "x86_64")]
        let all = vec![Isa::Avx512, Isa::Avx2, Isa::Portable];
        #[cfg(not(target_arch = "x86_64"))]
        let all = vec![Isa::Portable];
        all
    }

    /// The short name.
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// Whether this CPU runs it.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            Isa::Portable => true,
        }
    }

    /// `(MR, NR)` of the tile.
    fn tile(self) -> (usize, usize) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => (12, 32),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => (6, 16),
            Isa::Portable => (6, 16),
        }
    }
}

/// Output columns per parallel block: its widened panel for one `k` block is
/// `NC × KC × 4` = 256 KiB, in L2 while the row groups pass over it.
const NC: usize = 256;
/// `k` per block: a row group's micro-panel is `KC × MR × 4` bytes (12 KiB for 12 rows), in
/// L1 while the block's strips pass over it.
const KC: usize = 256;
/// Parallel tasks per thread, for balance on a shared pool.
const TASKS_PER_THREAD: usize = 4;

/// [`HalfMatrix::matmul`]'s tiled path with a chosen [`Isa`] (tests run each); `y` is
/// overwritten. Panics on slices shorter than the shapes (callers check).
pub fn matmul_with(
    isa: Isa,
    w: &HalfMatrix,
    x: &[f32],
    m: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let (n, k) = w.dims();
    assert!(x.len() >= m * k && y.len() >= m * n && bias.is_none_or(|b| b.len() >= n));
    if m == 0 || n == 0 {
        return;
    }
    // Every element starts at its bias; the k blocks add to it.
    for row in y.chunks_exact_mut(n).take(m) {
        match bias {
            Some(b) => row.copy_from_slice(&b[..n]),
            None => row.fill(0.0),
        }
    }
    if k == 0 {
        return;
    }
    let (mr, _) = isa.tile();
    let groups = m.div_ceil(mr);
    // x in micro-panels, once per call: group g holds rows g·mr.. as xp[g][kk][r] (zero past
    // m), so every k block of a group is one contiguous (kc, mr) slice.
    let mut xp = vec![0f32; groups * k * mr];
    {
        let xpp = SyncPtr(xp.as_mut_ptr());
        let pack = |g: usize| {
            // SAFETY: group g's k·mr values are written by this task only.
            let dst = unsafe { std::slice::from_raw_parts_mut(xpp.get().add(g * k * mr), k * mr) };
            for r in 0..mr.min(m - g * mr) {
                let src = &x[(g * mr + r) * k..(g * mr + r + 1) * k];
                for (kk, &v) in src.iter().enumerate() {
                    dst[kk * mr + r] = v;
                }
            }
        };
        if groups * k * mr < 1 << 16 {
            (0..groups).for_each(pack);
        } else {
            (0..groups).into_par_iter().for_each(pack);
        }
    }
    let col_blocks = n.div_ceil(NC);
    let threads = rayon::current_num_threads().max(1);
    // Split the rows too when there are few column blocks (whole groups of `mr` rows).
    let want = threads * TASKS_PER_THREAD;
    let row_splits = want.div_ceil(col_blocks).min(groups).max(1);
    let groups_per = groups.div_ceil(row_splits);
    let row_blocks = groups.div_ceil(groups_per);
    let out = SyncPtr(y.as_mut_ptr());
    let xp = &xp;
    let task = |t: usize| {
        let (cb, rb) = (t % col_blocks, t / col_blocks);
        let (j0, j1) = (cb * NC, ((cb + 1) * NC).min(n));
        let (g0, g1) = (rb * groups_per, ((rb + 1) * groups_per).min(groups));
        block(isa, w, xp, m, g0, g1, j0, j1, out, n);
    };
    let tasks = col_blocks * row_blocks;
    if tasks == 1 || threads == 1 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// Row groups `g0..g1` (rows `g·mr..`, below `m`) × columns `j0..j1` of `y` (row stride
/// `ldy`), added to what `y` holds; `xp` is the packed `x` of [`matmul_with`].
#[allow(clippy::too_many_arguments)]
fn block(
    isa: Isa,
    w: &HalfMatrix,
    xp: &[f32],
    m: usize,
    g0: usize,
    g1: usize,
    j0: usize,
    j1: usize,
    out: SyncPtr,
    ldy: usize,
) {
    let k = w.k;
    let (mr, nr) = isa.tile();
    let strips = (j1 - j0).div_ceil(nr);
    let mut panel = vec![0f32; strips * nr * KC];
    let mut tile = vec![0f32; mr * nr];
    let mut row = vec![0f32; KC];
    let mut tmp = Vec::with_capacity(KC);
    let mut k0 = 0;
    while k0 < k {
        let kc = KC.min(k - k0);
        // Widen the block's weights into strips: panel[s][kk][c].
        for c in 0..strips * nr {
            let j = j0 + c;
            let (s, cc) = (c / nr, c % nr);
            let base = s * nr * KC + cc;
            if j < j1 {
                w.widen_row(j, k0, &mut row[..kc], &mut tmp);
                for (kk, &v) in row[..kc].iter().enumerate() {
                    panel[base + kk * nr] = v;
                }
            } else {
                for kk in 0..kc {
                    panel[base + kk * nr] = 0.0;
                }
            }
        }
        for g in g0..g1 {
            let i = g * mr;
            let rows = mr.min(m - i);
            let a = &xp[g * k * mr + k0 * mr..g * k * mr + (k0 + kc) * mr];
            for s in 0..strips {
                let p = &panel[s * nr * KC..s * nr * KC + kc * nr];
                let c0 = j0 + s * nr;
                let cols = nr.min(j1 - c0);
                // SAFETY: rows i.. < m and columns c0.. < n belong to this task alone; a
                // full tile is mr rows of nr columns at stride ldy inside y.
                let yp = unsafe { out.get().add(i * ldy + c0) };
                if rows == mr && cols == nr {
                    match isa {
                        // SAFETY: `Avx512`/`Avx2` come from `detect` or tests that checked
                        // `available`; `a` holds kc × mr and `p` kc × nr values.
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx512 => unsafe { avx512::tile(a, p, kc, yp, ldy) },
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx2 => unsafe { avx2::tile(a, p, kc, yp, ldy) },
                        // SAFETY: as above.
                        Isa::Portable => unsafe { portable::tile(a, p, kc, yp, ldy) },
                    }
                    continue;
                }
                // An edge tile: into a zeroed scratch tile, then the valid part added.
                tile.fill(0.0);
                let tp = tile.as_mut_ptr();
                match isa {
                    // SAFETY: as above; the scratch tile is mr × nr at stride nr.
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => unsafe { avx512::tile(a, p, kc, tp, nr) },
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { avx2::tile(a, p, kc, tp, nr) },
                    // SAFETY: as above.
                    Isa::Portable => unsafe { portable::tile(a, p, kc, tp, nr) },
                }
                for r in 0..rows {
                    // SAFETY: row i + r < m, columns c0..c0 + cols <= j1 are this task's.
                    let y = unsafe { std::slice::from_raw_parts_mut(yp.add(r * ldy), cols) };
                    for (y, &t) in y.iter_mut().zip(&tile[r * nr..r * nr + cols]) {
                        *y += t;
                    }
                }
            }
        }
        k0 += kc;
    }
}

/// The oracle: `y (m, n) = x (m, k) · Wᵀ + b` summed in f64.
pub fn matmul_plain(w: &HalfMatrix, x: &[f32], m: usize, bias: Option<&[f32]>) -> Vec<f64> {
    let (n, k) = w.dims();
    let wf = w.to_f32();
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = x[i * k..(i + 1) * k]
                .iter()
                .zip(&wf[j * k..(j + 1) * k])
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            y[i * n + j] = dot + bias.map_or(0.0, |b| b[j] as f64);
        }
    }
    y
}

/// Plain Rust 6 × 16 tile: `y[r][c] += Σ_kk xp[kk][r] · p[kk][c]`, the sum over `kk` from
/// zero, each product rounded and then added.
mod portable {
    const MR: usize = 6;
    const NR: usize = 16;

    /// # Safety
    /// `y` points at 6 rows of 16 writable values at stride `ldy`; `xp` holds `kc × 6` and
    /// `p` `kc × 16` values.
    pub(super) unsafe fn tile(xp: &[f32], p: &[f32], kc: usize, y: *mut f32, ldy: usize) {
        let mut acc = [[0f32; NR]; MR];
        for kk in 0..kc {
            let b: &[f32; NR] = p[kk * NR..kk * NR + NR].try_into().expect("NR values");
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = xp[kk * MR + r];
                for c in 0..NR {
                    acc[c] += a * b[c];
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let y = std::slice::from_raw_parts_mut(y.add(r * ldy), NR);
            for (y, &a) in y.iter_mut().zip(acc) {
                *y += a;
            }
        }
    }
}

/// AVX2 + FMA 6 × 16 tile: 12 ymm accumulators.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    const MR: usize = 6;
    const NR: usize = 16;

    /// # Safety
    /// The CPU must support AVX2 and FMA; `xp` holds `kc × 6` and `p` `kc × 16` values; `y`
    /// points at 6 rows of 16 writable values at stride `ldy`, to which the tile is added.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(xp: &[f32], p: &[f32], kc: usize, y: *mut f32, ldy: usize) {
        assert!(xp.len() >= kc * MR && p.len() >= kc * NR);
        let (xa, pa) = (xp.as_ptr(), p.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for kk in 0..kc {
            let b0 = _mm256_loadu_ps(pa.add(kk * NR));
            let b1 = _mm256_loadu_ps(pa.add(kk * NR + 8));
            for r in 0..MR {
                let a = _mm256_broadcast_ss(&*xa.add(kk * MR + r));
                acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
            }
        }
        for r in 0..MR {
            let t = y.add(r * ldy);
            _mm256_storeu_ps(t, _mm256_add_ps(_mm256_loadu_ps(t), acc[r][0]));
            _mm256_storeu_ps(
                t.add(8),
                _mm256_add_ps(_mm256_loadu_ps(t.add(8)), acc[r][1]),
            );
        }
    }
}

/// AVX-512F 12 × 32 tile: 24 zmm accumulators.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    const MR: usize = 12;
    const NR: usize = 32;

    /// # Safety
    /// The CPU must support AVX-512F; `xp` holds `kc × 12` and `p` `kc × 32` values; `y`
    /// points at 12 rows of 32 writable values at stride `ldy`, to which the tile is added.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(xp: &[f32], p: &[f32], kc: usize, y: *mut f32, ldy: usize) {
        assert!(xp.len() >= kc * MR && p.len() >= kc * NR);
        let (xa, pa) = (xp.as_ptr(), p.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for kk in 0..kc {
            let b0 = _mm512_loadu_ps(pa.add(kk * NR));
            let b1 = _mm512_loadu_ps(pa.add(kk * NR + 16));
            for r in 0..MR {
                let a = _mm512_set1_ps(*xa.add(kk * MR + r));
                acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
            }
        }
        for r in 0..MR {
            let t = y.add(r * ldy);
            _mm512_storeu_ps(t, _mm512_add_ps(_mm512_loadu_ps(t), acc[r][0]));
            _mm512_storeu_ps(
                t.add(16),
                _mm512_add_ps(_mm512_loadu_ps(t.add(16)), acc[r][1]),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_matrix(rng: &mut ChaCha8Rng, kind: HalfKind, n: usize, k: usize) -> HalfMatrix {
        let bits = (0..n * k)
            .map(|_| {
                let v: f32 = rng.random_range(-1.0..1.0);
                match kind {
                    HalfKind::F16 => f16::from_f32(v).to_bits(),
                    HalfKind::Bf16 => bf16::from_f32(v).to_bits(),
                }
            })
            .collect();
        HalfMatrix::from_bits(kind, bits, n, k).expect("shape")
    }

    /// Max |y - oracle| over |oracle| + 1 (relative for large, absolute for small values).
    fn worst(y: &[f32], oracle: &[f64]) -> f64 {
        y.iter()
            .zip(oracle)
            .map(|(&a, &b)| (a as f64 - b).abs() / (b.abs() + 1.0))
            .fold(0.0, f64::max)
    }

    #[test]
    fn every_path_matches_the_f64_oracle_on_odd_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for kind in [HalfKind::F16, HalfKind::Bf16] {
            // Shapes cross every boundary: m around the tile rows, n around a strip and a
            // block, k around a k block, and tiny ones.
            for &(m, n, k) in &[
                (1, 1, 1),
                (5, 3, 7),
                (13, 33, 257),
                (25, 129, 300),
                (40, 200, 513),
                (17, 16, 16),
            ] {
                let w = random_matrix(&mut rng, kind, n, k);
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let b: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let oracle = matmul_plain(&w, &x, m, Some(&b));
                for isa in Isa::all().into_iter().filter(|i| i.available()) {
                    let mut y = vec![f32::NAN; m * n];
                    matmul_with(isa, &w, &x, m, Some(&b), &mut y);
                    let e = worst(&y, &oracle);
                    // f32 sums of k products of size ~1: ~k · 2^-24 relative.
                    assert!(
                        e < 2e-6 * (k as f64).sqrt().max(1.0),
                        "{kind:?} {} ({m}, {n}, {k}): error {e}",
                        isa.name()
                    );
                }
                // The dispatching entry (gemv for few rows) too.
                let y = w.matmul(&x, m, Some(&b)).expect("shapes");
                assert!(worst(&y, &oracle) < 2e-6 * (k as f64).sqrt().max(1.0));
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_wherever_it_sits() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (m, n, k) = (37, 70, 600);
        let w = random_matrix(&mut rng, HalfKind::Bf16, n, k);
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
        for isa in Isa::all().into_iter().filter(|i| i.available()) {
            let mut whole = vec![0f32; m * n];
            matmul_with(isa, &w, &x, m, None, &mut whole);
            // Rows 20..37 alone (another tile grouping and task split).
            let mut part = vec![0f32; 17 * n];
            matmul_with(isa, &w, &x[20 * k..], 17, None, &mut part);
            assert_eq!(&whole[20 * n..], &part[..], "{}", isa.name());
        }
    }

    #[test]
    fn row_blocks_read_as_one_matrix() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (n, k) = (50, 40);
        let whole = random_matrix(&mut rng, HalfKind::F16, n, k);
        let bits: Vec<u16> = whole
            .to_f32()
            .iter()
            .map(|&v| f16::from_f32(v).to_bits())
            .collect();
        let owner: Arc<Vec<u16>> = Arc::new(bits);
        // SAFETY: the Arc'd buffer outlives the slices (it is the matrix's owner).
        let bytes = unsafe { std::slice::from_raw_parts(owner.as_ptr() as *const u8, 2 * n * k) };
        let split = HalfMatrix::new(
            HalfKind::F16,
            k,
            &[
                &bytes[..2 * 20 * k],
                &bytes[2 * 20 * k..2 * 21 * k],
                &bytes[2 * 21 * k..],
            ],
            owner.clone(),
        )
        .expect("whole rows");
        assert_eq!(split.dims(), (n, k));
        assert_eq!(split.to_f32(), whole.to_f32());
        let x: Vec<f32> = (0..30 * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        assert_eq!(
            split.matmul(&x, 30, None).expect("shapes"),
            whole.matmul(&x, 30, None).expect("shapes")
        );
        assert!(HalfMatrix::new(HalfKind::F16, k, &[&bytes[..2 * k + 2]], owner).is_err());
    }
}

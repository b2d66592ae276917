//! Fused attention on the CPU: `softmax(q kᵀ · scale + mask) v` without the score matrix.
//!
//! - `q: (B, G, T, D)`: `G` query heads share each of the `B` key/value heads (GQA);
//! - `k, v: (B, L, D)`, views: any stride on the first two dims, unit stride on the last (the
//!   vision tower's `(len, heads, hd)` rows and the KV cache are read where they lie);
//! - causal `Some(p)`: query `t` sits at position `p + t` and sees keys `0..=p+t`;
//! - result `(B, G, T, D)`, contiguous.
//!
//! Why: the blocked path ([`crate::nn::attention_blocked`]) writes a `T x L` score matrix per
//! head, runs the softmax over it in a second pass and multiplies it with `v` in a third; for a
//! vision frame (16 heads, 1,564 patches, head dim 80) its `q kᵀ` ran at a third of the cores'
//! f32 peak. Here (flash-attention style, "online softmax") each task takes one key/value head
//! and a block of [`ROW_BLOCK`] query rows, walks the keys in blocks of [`KEY_BLOCK`] and keeps
//! everything a block needs in L1/L2: the block's scores (`rows x 64`, computed in
//! registers), each row's running max `m` and sum `l`, and its output accumulator `o`. Per key
//! block: `m' = max(m, max_j s_j)`, `p_j = exp(s_j - m')`, `l = l·exp(m - m') + Σ p_j`,
//! `o = o·exp(m - m') + Σ p_j v_j`; at the end `o / l`. Keys past a row's causal limit get
//! `p = 0`; key blocks past every row's limit are never visited.
//!
//! Layout: the score tile wants keys along the vector lanes, so each call first transposes
//! its keys per kv head into `(D, 64)` tiles (8x8 register blocks; for a decode step this is
//! most of the cost, still under the blocked path's time). Values are read where they lie
//! when their rows are adjacent (the KV cache), else copied once per call (the vision
//! tower's rows lie 5 KiB apart). A caller that attends the same keys many times (the vision
//! pass: a frame in pieces of query rows) packs them once with [`Keys`].
//! `QWEN2VL_ATTENTION=blocked` sends every call to the blocked path (before/after runs).
//!
//! Determinism (tests rely on it: the vision tower cut into row chunks is bit-identical to the
//! whole pass, a prompt prefilled unit by unit to one prefill): the result for one query row
//! depends only on that row, its visible keys and the instruction set, never on which other
//! rows share the call or its tasks. Its keys are visited in the same fixed blocks `[0, 64)`,
//! `[64, 128)`, … whatever `T`, `L` or the row's neighbours; every score is one FMA chain over
//! `d` in order; a block past the row's limit (visited for a neighbour) leaves its `m`, `l`
//! and `o` exactly as they were (`alpha = 1`, `p = 0`); so does a key past its limit inside a
//! block (`p = 0`). The three instruction sets ([`Isa`]) round differently from each other.
//!
//! `exp` is a Cody–Waite reduction and a degree-7 polynomial, within 2 ulp of the true value
//! (tested) — the softmax is as accurate as with `f32::exp`. [`attention_plain`] (straight
//! softmax in f64) is the oracle.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// Keys per block. Fixed: a row's rounding depends on the block boundaries (see the module
/// doc), so it must not depend on anything but the key index.
pub const KEY_BLOCK: usize = 64;

/// Query rows per task: enough to reuse each key block 48 times from L1, few enough that a
/// vision frame gives hundreds of tasks. A multiple of every [`Isa::row_pad`].
pub const ROW_BLOCK: usize = 48;

/// Largest head dimension the fused kernel takes (Qwen2-VL has 80 and 128); larger ones take
/// the blocked path.
pub const MAX_HEAD_DIM: usize = 256;

/// Below this many multiply-adds (`rows x visible keys x D`, both products) a call runs on
/// the calling thread: a short decode step is not worth waking the pool. The result is the
/// same either way.
const SERIAL_WORK: usize = 1 << 20;

/// The instruction set a call runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F: 16 lanes, 32 registers.
    Avx512,
    /// AVX2 and FMA: 8 lanes, 16 registers.
    Avx2,
    /// Plain Rust (the compiler may vectorise it); `f32::exp`.
    Portable,
}

impl Isa {
    /// The fastest this CPU runs (detected once by `std`, cached).
    pub fn detect() -> Isa {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|i| i.available())
            .unwrap_or(Isa::Portable)
    }

    /// Whether this CPU runs it.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            Isa::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Row length of the packed values and of the output accumulator: `d` rounded up to
    /// whole register tiles (the padding columns are zero).
    fn dpad(self, d: usize) -> usize {
        match self {
            Isa::Avx512 => {
                let dv = d.div_ceil(16);
                let nv = avx512_chunk(dv);
                dv.div_ceil(nv) * nv * 16
            }
            Isa::Avx2 => d.div_ceil(16) * 16,
            Isa::Portable => d,
        }
    }

    /// A task's rows are padded (with zero queries whose results are dropped) to a multiple
    /// of this: the register tiles take 6 rows at a time (a decode step of 6 query heads per
    /// kv head needs no padding), AVX-512's `p·v` tile 4 for head dim 80.
    fn row_pad(self, d: usize) -> usize {
        match self {
            Isa::Avx512 if avx512_chunk(d.div_ceil(16)) > 4 => 12,
            _ => 6,
        }
    }

    /// `s (rows, KEY_BLOCK) = q (rows, d) · kt (d, KEY_BLOCK)`, unscaled; one FMA chain over
    /// `d` in order per score.
    fn scores(self, q: &[f32], d: usize, kt: &[f32], s: &mut [f32]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `attention_f32` runs an `Isa` only when `available()` says this CPU has it.
            Isa::Avx512 => unsafe { avx512::scores(q, d, kt, s) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { avx2::scores(q, d, kt, s) },
            Isa::Portable => portable::scores(q, d, kt, s),
            #[allow(unreachable_patterns)]
            _ => unreachable!("an instruction set of another architecture"),
        }
    }

    /// The online-softmax step over one key block, in place: `s` (scores) becomes `p`; `m`,
    /// `l` are updated and `alpha` gets each row's rescale factor. `vis[r]` is how many of the
    /// block's keys row `r` sees (a prefix); a row that sees none gets `p = 0`, `alpha = 1`.
    fn softmax(
        self,
        s: &mut [f32],
        vis: &[usize],
        scale: f32,
        m: &mut [f32],
        l: &mut [f32],
        alpha: &mut [f32],
    ) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `attention_f32` runs an `Isa` only when `available()` says this CPU has it.
            Isa::Avx512 => unsafe { avx512::softmax(s, vis, scale, m, l, alpha) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { avx2::softmax(s, vis, scale, m, l, alpha) },
            Isa::Portable => portable::softmax(s, vis, scale, m, l, alpha),
            #[allow(unreachable_patterns)]
            _ => unreachable!("an instruction set of another architecture"),
        }
    }

    /// `o (rows, dpad) = o · alpha (per row) + p (rows, KEY_BLOCK) · v (jcount, dpad)`, over
    /// the block's first `jcount` keys (the rest have `p = 0` in every row); value row `j`
    /// starts at `v.0[j * v.1]`.
    fn pv(self, o: &mut [f32], dpad: usize, p: &[f32], v: Rows, alpha: &[f32], jcount: usize) {
        assert!(jcount <= KEY_BLOCK && (jcount == 0 || v.0.len() >= (jcount - 1) * v.1 + dpad));
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `attention_f32` runs an `Isa` only when `available()` says this CPU has
            // it; the value rows the kernel reads lie inside `v` (asserted above).
            Isa::Avx512 => unsafe { avx512::pv(o, dpad, p, v, alpha, jcount) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { avx2::pv(o, dpad, p, v, alpha, jcount) },
            Isa::Portable => portable::pv(o, dpad, p, v, alpha, jcount),
            #[allow(unreachable_patterns)]
            _ => unreachable!("an instruction set of another architecture"),
        }
    }
}

/// Value rows for [`Isa::pv`]: the data and the distance between rows, in elements.
type Rows<'a> = (&'a [f32], usize);

/// 16-lane vectors per column chunk of the AVX-512 `p·v` tile for `dv` vectors per row: the
/// whole row up to 5 (head dim 80: 4 rows x 5 = 20 accumulators), else 4 (128: two chunks).
fn avx512_chunk(dv: usize) -> usize {
    if dv <= 5 {
        dv.max(1)
    } else {
        4
    }
}

/// A strided f32 view of `q: (B, G, T, D)`; the last dimension has unit stride.
#[derive(Debug, Clone, Copy)]
pub struct QView<'a> {
    /// The storage the strides index into.
    pub data: &'a [f32],
    /// Element index of `q[0, 0, 0, 0]`.
    pub start: usize,
    /// `(B, G, T, D)`.
    pub dims: [usize; 4],
    /// Strides of `B`, `G` and `T`, in elements.
    pub strides: [usize; 3],
}

/// A strided f32 view of `k` or `v: (B, L, D)`; the last dimension has unit stride.
#[derive(Debug, Clone, Copy)]
pub struct KvView<'a> {
    /// The storage the strides index into.
    pub data: &'a [f32],
    /// Element index of `x[0, 0, 0]`.
    pub start: usize,
    /// `(B, L, D)`.
    pub dims: [usize; 3],
    /// Strides of `B` and `L`, in elements.
    pub strides: [usize; 2],
}

impl QView<'_> {
    /// Row `(b, g, t)`: `D` values.
    fn row(&self, b: usize, g: usize, t: usize) -> &[f32] {
        let [sb, sg, st] = self.strides;
        let at = self.start + b * sb + g * sg + t * st;
        &self.data[at..at + self.dims[3]]
    }

    /// Whether every row lies inside `data`.
    fn in_bounds(&self) -> bool {
        let [b, g, t, d] = self.dims;
        if b * g * t * d == 0 {
            return true;
        }
        let [sb, sg, st] = self.strides;
        let last = self.start + (b - 1) * sb + (g - 1) * sg + (t - 1) * st + d;
        last <= self.data.len()
    }
}

impl KvView<'_> {
    /// Row `(b, j)`: `D` values.
    fn row(&self, b: usize, j: usize) -> &[f32] {
        let [sb, sl] = self.strides;
        let at = self.start + b * sb + j * sl;
        &self.data[at..at + self.dims[2]]
    }

    /// Whether every row lies inside `data`.
    fn in_bounds(&self) -> bool {
        let [b, l, d] = self.dims;
        if b * l * d == 0 {
            return true;
        }
        let [sb, sl] = self.strides;
        self.start + (b - 1) * sb + (l - 1) * sl + d <= self.data.len()
    }
}

/// False when the environment sets `QWEN2VL_ATTENTION=blocked`: every call then takes the
/// blocked path (for before/after comparisons with one binary). Read once.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("QWEN2VL_ATTENTION").map_or(true, |v| v != "blocked"))
}

/// Fused attention of candle tensors (shapes in the module doc), or `Ok(None)` when it does
/// not apply and the caller should take the blocked path: not on the CPU, not all f32, shapes
/// that do not fit together, no keys (`L = 0`), a head dim over [`MAX_HEAD_DIM`], or
/// `QWEN2VL_ATTENTION=blocked`. None of these depends on `T`, so the rows of one tensor cut
/// into chunks take the same path as the whole.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal_offset: Option<usize>,
) -> Result<Option<Tensor>> {
    if !applies(&[q, k, v]) {
        return Ok(None);
    }
    let (Ok((b, g, t, d)), Ok((kb, l, kd))) = (q.dims4(), k.dims3()) else {
        return Ok(None);
    };
    if kb != b || kd != d || v.dims() != k.dims() || l == 0 || d == 0 || d > MAX_HEAD_DIM {
        return Ok(None);
    }
    if b * g * t == 0 {
        return Ok(Some(Tensor::zeros((b, g, t, d), DType::F32, q.device())?));
    }
    let (q, k, v) = (unit_rows(q)?, unit_rows(k)?, unit_rows(v)?);
    let out = {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (
            Storage::Cpu(CpuStorage::F32(qd)),
            Storage::Cpu(CpuStorage::F32(kd)),
            Storage::Cpu(CpuStorage::F32(vd)),
        ) = (&*qs, &*ks, &*vs)
        else {
            return Ok(None);
        };
        let qv = q_view(qd, ql, [b, g, t, d]);
        let (kv, vv) = (kv_view(kd, kl, k.dims()), kv_view(vd, vl, k.dims()));
        if !qv.in_bounds() || !kv.in_bounds() || !vv.in_bounds() {
            return Ok(None);
        }
        attention_f32(Isa::detect(), &qv, &kv, &vv, scale as f32, causal_offset)
    };
    Ok(Some(Tensor::from_vec(out, (b, g, t, d), q.device())?))
}

/// Whether the fused kernel takes these tensors: f32 on the CPU, and not switched off.
fn applies(xs: &[&Tensor]) -> bool {
    enabled()
        && xs
            .iter()
            .all(|x| x.device().is_cpu() && x.dtype() == DType::F32)
}

/// `x`, or a contiguous copy when its rows' values are not adjacent (the kernel reads rows
/// where they lie but needs each row's values in a run).
fn unit_rows(x: &Tensor) -> Result<Tensor> {
    Ok(
        if x.stride().last() == Some(&1) || x.dims().last() == Some(&1) {
            x.clone()
        } else {
            x.contiguous()?
        },
    )
}

/// The view of a rank-4 `q` tensor's data (`dims` its shape).
fn q_view<'a>(data: &'a [f32], l: &candle_core::Layout, dims: [usize; 4]) -> QView<'a> {
    let st = l.stride();
    QView {
        data,
        start: l.start_offset(),
        dims,
        strides: [st[0], st[1], st[2]],
    }
}

/// The view of a rank-3 `k` or `v` tensor's data (`dims` its shape).
fn kv_view<'a>(data: &'a [f32], l: &candle_core::Layout, dims: &[usize]) -> KvView<'a> {
    let st = l.stride();
    KvView {
        data,
        start: l.start_offset(),
        dims: [dims[0], dims[1], dims[2]],
        strides: [st[0], st[1]],
    }
}

/// A zeroed f32 buffer whose data starts on a 64-byte boundary where the allocator allows
/// (vector loads then never split a cache line; correctness does not depend on it).
struct Aligned {
    buf: Vec<f32>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn zeroed(len: usize) -> Aligned {
        let buf = vec![0f32; len + 16];
        let off = buf.as_ptr().align_offset(64);
        let off = if off < 16 { off } else { 0 };
        Aligned { buf, off, len }
    }

    fn as_slice(&self) -> &[f32] {
        &self.buf[self.off..self.off + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// One key/value head laid out for the tiles: keys transposed per block, `(blocks, D,
/// KEY_BLOCK)` (keys past `need` are zero), and the values `(need, dpad)` with zero padding
/// columns when `dpad > D`, the rows are not adjacent or the packing is kept ([`Keys`]);
/// else they are read where they lie (the KV cache).
struct Packed {
    kt: Aligned,
    v: Option<Aligned>,
}

fn pack(
    isa: Isa,
    k: &KvView,
    v: &KvView,
    b: usize,
    need: usize,
    dpad: usize,
    own_v: bool,
) -> Packed {
    let d = k.dims[2];
    let blocks = need.div_ceil(KEY_BLOCK);
    let mut kt = Aligned::zeroed(blocks * d * KEY_BLOCK);
    for (blk, tile) in kt
        .as_mut_slice()
        .chunks_exact_mut(d * KEY_BLOCK)
        .enumerate()
    {
        let keys = blk * KEY_BLOCK..need.min((blk + 1) * KEY_BLOCK);
        let rows: Vec<&[f32]> = keys.map(|j| k.row(b, j)).collect();
        transpose_keys(isa, &rows, d, tile);
    }
    // Rows far apart (the vision tower's `(len, heads, hd)`: one 320-byte row per 5 KiB)
    // touch a page per key; copied, a block's values are 20 KiB in a row.
    let v = (own_v || dpad > d || v.strides[1] != d).then(|| {
        let mut vp = Aligned::zeroed(need * dpad);
        for (j, out) in vp.as_mut_slice().chunks_exact_mut(dpad).enumerate() {
            out[..d].copy_from_slice(v.row(b, j));
        }
        vp
    });
    Packed { kt, v }
}

/// `tile (d, KEY_BLOCK)` = the key `rows` (at most `KEY_BLOCK`, `d` values each)
/// transposed. A decode step's keys are read once and transposed once: this is most of its
/// cost, hence 8x8 blocks in registers where the CPU has AVX.
fn transpose_keys(isa: Isa, rows: &[&[f32]], d: usize, tile: &mut [f32]) {
    assert!(rows.len() <= KEY_BLOCK && tile.len() == d * KEY_BLOCK);
    assert!(rows.iter().all(|r| r.len() == d));
    // Keys `..keys8` and dims `..d8` done in 8x8 blocks.
    let (mut keys8, mut d8) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512 | Isa::Avx2) {
        (keys8, d8) = (rows.len() / 8 * 8, d / 8 * 8);
        // SAFETY: both instruction sets include AVX (an AVX-512 CPU has it, and the OS
        // support `is_x86_feature_detected!("avx512f")` checks covers the 256-bit state).
        unsafe { avx2::transpose8(&rows[..keys8], d8, tile) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    // The rest: every dim of the keys past `keys8`, the dims past `d8` of the others.
    for (e, out) in tile.chunks_exact_mut(KEY_BLOCK).enumerate() {
        let from = if e < d8 { keys8 } else { 0 };
        for (y, r) in out[from..].iter_mut().zip(&rows[from..]) {
            *y = r[e];
        }
    }
}

/// Fused attention on strided f32 views (shapes in the module doc) with instruction set
/// `isa`; returns `(B, G, T, D)` contiguous.
///
/// Panics (internal invariants, checked by [`attention`] for tensors) if `isa` is not
/// available, the shapes do not fit together, `L = 0`, or a view reaches outside its data.
pub fn attention_f32(
    isa: Isa,
    q: &QView,
    k: &KvView,
    v: &KvView,
    scale: f32,
    causal_offset: Option<usize>,
) -> Vec<f32> {
    assert!(isa.available(), "{isa:?} is not available on this CPU");
    let [b, g, t, d] = q.dims;
    let l = k.dims[1];
    assert!(k.dims == [b, l, d] && v.dims == k.dims && l > 0 && d > 0);
    assert!(q.in_bounds() && k.in_bounds() && v.in_bounds());
    if b * g * t == 0 {
        return Vec::new();
    }
    // Keys any row sees: row `t` sees `min(p + t + 1, L)`.
    let need = match causal_offset {
        Some(p) => (p + t).min(l),
        None => l,
    };
    let heads = pack_heads(isa, k, v, need, false);
    run(isa, q, &heads, Some(v), need, scale, causal_offset)
}

/// Keys and values `(B, L, D)` laid out for the kernel once, for several calls over the same
/// keys: the vision tower attends a frame's keys in pieces of query rows (units of work of
/// the serving engine), and packing the frame for every piece would cost a fifth of the
/// arithmetic. Calls with these keys give bit-identical results to [`attention_f32`] with
/// the views they were packed from.
pub struct Keys {
    isa: Isa,
    dims: [usize; 3],
    heads: Vec<Packed>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("isa", &self.isa)
            .field("dims", &self.dims)
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// Packs strided views (values copied too, so the views may go).
    ///
    /// Panics (internal invariants) if `isa` is not available, `k` and `v` differ in shape,
    /// `L = 0`, `D = 0` or a view reaches outside its data.
    pub fn pack_f32(isa: Isa, k: &KvView, v: &KvView) -> Keys {
        assert!(isa.available(), "{isa:?} is not available on this CPU");
        let [_, l, d] = k.dims;
        assert!(v.dims == k.dims && l > 0 && d > 0 && k.in_bounds() && v.in_bounds());
        Keys {
            isa,
            dims: k.dims,
            heads: pack_heads(isa, k, v, l, true),
        }
    }

    /// Packs f32 CPU tensors `k, v: (B, L, D)` (views allowed), or `Ok(None)` when
    /// [`attention`] would not take them (the caller keeps the tensors for
    /// [`crate::nn::attention`]).
    pub fn pack(k: &Tensor, v: &Tensor) -> Result<Option<Keys>> {
        if !applies(&[k, v]) {
            return Ok(None);
        }
        let Ok((_, l, d)) = k.dims3() else {
            return Ok(None);
        };
        if v.dims() != k.dims() || l == 0 || d == 0 || d > MAX_HEAD_DIM {
            return Ok(None);
        }
        let (k, v) = (unit_rows(k)?, unit_rows(v)?);
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(kd)), Storage::Cpu(CpuStorage::F32(vd))) = (&*ks, &*vs)
        else {
            return Ok(None);
        };
        let (kv, vv) = (kv_view(kd, kl, k.dims()), kv_view(vd, vl, k.dims()));
        if !kv.in_bounds() || !vv.in_bounds() {
            return Ok(None);
        }
        Ok(Some(Keys::pack_f32(Isa::detect(), &kv, &vv)))
    }

    /// `(B, L, D)`.
    pub fn dims(&self) -> [usize; 3] {
        self.dims
    }
}

/// [`attention_f32`] over packed keys: `q: (B, G, T, D)` with `B` and `D` of `keys`.
pub fn attention_f32_keys(
    q: &QView,
    keys: &Keys,
    scale: f32,
    causal_offset: Option<usize>,
) -> Vec<f32> {
    let [b, g, t, d] = q.dims;
    let l = keys.dims[1];
    assert!(keys.dims == [b, l, d] && q.in_bounds());
    if b * g * t == 0 {
        return Vec::new();
    }
    let need = match causal_offset {
        Some(p) => (p + t).min(l),
        None => l,
    };
    run(keys.isa, q, &keys.heads, None, need, scale, causal_offset)
}

/// [`attention`] over packed keys, or `Ok(None)` when `q` is not an f32 CPU tensor of the
/// keys' `B` and `D` (the caller then takes [`crate::nn::attention`] with the tensors).
pub fn attention_keys(
    q: &Tensor,
    keys: &Keys,
    scale: f64,
    causal_offset: Option<usize>,
) -> Result<Option<Tensor>> {
    if !applies(&[q]) {
        return Ok(None);
    }
    let Ok((b, g, t, d)) = q.dims4() else {
        return Ok(None);
    };
    if [b, d] != [keys.dims[0], keys.dims[2]] {
        return Ok(None);
    }
    if b * g * t == 0 {
        return Ok(Some(Tensor::zeros((b, g, t, d), DType::F32, q.device())?));
    }
    let q = unit_rows(q)?;
    let out = {
        let (qs, ql) = q.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(qd)) = &*qs else {
            return Ok(None);
        };
        let qv = q_view(qd, ql, [b, g, t, d]);
        if !qv.in_bounds() {
            return Ok(None);
        }
        attention_f32_keys(&qv, keys, scale as f32, causal_offset)
    };
    Ok(Some(Tensor::from_vec(out, (b, g, t, d), q.device())?))
}

/// Each kv head packed ([`pack`]), in parallel when there is enough to copy.
fn pack_heads(isa: Isa, k: &KvView, v: &KvView, need: usize, own_v: bool) -> Vec<Packed> {
    let [b, _, d] = k.dims;
    let dpad = isa.dpad(d);
    let pack_head = |bi| pack(isa, k, v, bi, need, dpad, own_v);
    if b > 1 && need * d * b >= SERIAL_WORK / 8 {
        (0..b).into_par_iter().map(pack_head).collect()
    } else {
        (0..b).map(pack_head).collect()
    }
}

/// The tasks of one call: `q (B, G, T, D)` against packed `heads` (values in place from `v`
/// where a head has none packed); `need` keys at most per row. Returns `(B, G, T, D)`.
fn run(
    isa: Isa,
    q: &QView,
    heads: &[Packed],
    v: Option<&KvView>,
    need: usize,
    scale: f32,
    causal_offset: Option<usize>,
) -> Vec<f32> {
    let [b, g, t, d] = q.dims;
    let dpad = isa.dpad(d);
    let mut out = vec![0f32; b * g * t * d];
    // Each kv head's `G·T` rows, `g`-major (row `r` is `(r / T, r % T)`), cut into tasks: a
    // contiguous range of rows is a contiguous range of the output. With `T >= ROW_BLOCK`
    // the tasks stay inside one query head (neighbouring positions, similar causal limits);
    // shorter `T` (decode) puts several query heads of one kv head in a task.
    let mut ranges = Vec::new();
    if t >= ROW_BLOCK {
        for gi in 0..g {
            let mut r = 0;
            while r < t {
                let n = ROW_BLOCK.min(t - r);
                ranges.push((gi * t + r, n));
                r += n;
            }
        }
    } else {
        let per = (ROW_BLOCK / t).max(1) * t;
        let mut r = 0;
        while r < g * t {
            let n = per.min(g * t - r);
            ranges.push((r, n));
            r += n;
        }
    }
    let mut jobs = Vec::with_capacity(b * ranges.len());
    let mut rest = out.as_mut_slice();
    for bi in 0..b {
        for &(r0, n) in &ranges {
            let (head, tail) = rest.split_at_mut(n * d);
            jobs.push((bi, r0, n, head));
            rest = tail;
        }
    }
    let ctx = Ctx {
        isa,
        q,
        v,
        t,
        d,
        dpad,
        need,
        causal_offset,
        scale,
    };
    let task = |(bi, r0, n, o): (usize, usize, usize, &mut [f32])| {
        rows_task(&ctx, &heads[bi], bi, r0, n, o);
    };
    if b * g * t * need * d < SERIAL_WORK {
        jobs.into_iter().for_each(task);
    } else {
        jobs.into_par_iter().for_each(task);
    }
    out
}

/// What every task of one call shares.
struct Ctx<'a> {
    isa: Isa,
    q: &'a QView<'a>,
    /// The values where a head has none packed.
    v: Option<&'a KvView<'a>>,
    t: usize,
    d: usize,
    dpad: usize,
    need: usize,
    causal_offset: Option<usize>,
    scale: f32,
}

/// Rows `r0..r0+n` (`g`-major, see [`run`]) of kv head `bi` into `out (n, D)`.
fn rows_task(c: &Ctx, head: &Packed, bi: usize, r0: usize, n: usize, out: &mut [f32]) {
    let (d, dpad) = (c.d, c.dpad);
    let pad = c.isa.row_pad(d);
    let rows = n.div_ceil(pad) * pad;
    let mut q = Aligned::zeroed(rows * d);
    // Keys each row sees; padding rows see none.
    let mut limit = vec![0usize; rows];
    for (i, (lim, qr)) in limit
        .iter_mut()
        .zip(q.as_mut_slice().chunks_exact_mut(d))
        .take(n)
        .enumerate()
    {
        let (gi, ti) = ((r0 + i) / c.t, (r0 + i) % c.t);
        qr.copy_from_slice(c.q.row(bi, gi, ti));
        *lim = match c.causal_offset {
            Some(p) => (p + ti + 1).min(c.need),
            None => c.need,
        };
    }
    let blocks = limit.iter().max().copied().unwrap_or(0).div_ceil(KEY_BLOCK);
    let mut s = Aligned::zeroed(rows * KEY_BLOCK);
    let mut o = Aligned::zeroed(rows * dpad);
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut sum = vec![0f32; rows];
    let mut alpha = vec![1f32; rows];
    let mut vis = vec![0usize; rows];
    let kt = head.kt.as_slice();
    // The values: packed `(need, dpad)`, or head `bi` of the view, rows `sl` apart.
    let (vdata, vstart, vstride) = match &head.v {
        Some(p) => (p.as_slice(), 0, dpad),
        None => {
            let v = c.v.expect("values in place for a head without packed ones");
            let [sb, sl] = v.strides;
            (v.data, v.start + bi * sb, sl)
        }
    };
    for blk in 0..blocks {
        let base = blk * KEY_BLOCK;
        for (v, &lim) in vis.iter_mut().zip(&limit) {
            *v = lim.saturating_sub(base).min(KEY_BLOCK);
        }
        let jcount = vis.iter().max().copied().unwrap_or(0);
        if jcount == 0 {
            continue; // no row sees these keys (blocks end at the last limit: never)
        }
        let kt = &kt[blk * d * KEY_BLOCK..(blk + 1) * d * KEY_BLOCK];
        let at = vstart + base * vstride;
        let vb = (&vdata[at..at + (jcount - 1) * vstride + dpad], vstride);
        c.isa.scores(q.as_slice(), d, kt, s.as_mut_slice());
        c.isa.softmax(
            s.as_mut_slice(),
            &vis,
            c.scale,
            &mut m,
            &mut sum,
            &mut alpha,
        );
        c.isa
            .pv(o.as_mut_slice(), dpad, s.as_slice(), vb, &alpha, jcount);
    }
    // A row with no visible key has `sum = 0` and `o = 0`: NaN, as the blocked path's
    // softmax gives (torch too). Cannot happen with `L > 0`.
    let o = o.as_slice();
    for (i, row) in out.chunks_exact_mut(d).enumerate() {
        let inv = 1.0 / sum[i];
        for (y, &x) in row.iter_mut().zip(&o[i * dpad..i * dpad + d]) {
            *y = x * inv;
        }
    }
}

/// The plain version (the oracle): per row, the scores of its visible keys in f64, a straight
/// softmax, the weighted sum of values. Same views; returns `(B, G, T, D)`.
pub fn attention_plain(
    q: &QView,
    k: &KvView,
    v: &KvView,
    scale: f64,
    causal_offset: Option<usize>,
) -> Vec<f64> {
    let [b, g, t, d] = q.dims;
    let l = k.dims[1];
    let mut out = Vec::with_capacity(b * g * t * d);
    for bi in 0..b {
        for gi in 0..g {
            for ti in 0..t {
                let seen = causal_offset.map_or(l, |p| (p + ti + 1).min(l));
                let qr = q.row(bi, gi, ti);
                let s: Vec<f64> = (0..seen)
                    .map(|j| {
                        let kr = k.row(bi, j);
                        qr.iter()
                            .zip(kr)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|&x| (x - max).exp()).collect();
                let total: f64 = e.iter().sum();
                let mut row = vec![0f64; d];
                for (j, &w) in e.iter().enumerate() {
                    for (y, &x) in row.iter_mut().zip(v.row(bi, j)) {
                        *y += w / total * x as f64;
                    }
                }
                if seen == 0 {
                    row.fill(f64::NAN);
                }
                out.extend(row);
            }
        }
    }
    out
}

/// Constants of the vector `exp`: `exp(x) = 2^n · exp(r)`, `n = round(x / ln 2)`,
/// `r = x - n ln 2` (`ln 2` in two parts so `n · LN2_HI` is exact), `exp(r)` by its Taylor
/// polynomial of degree 7 (`|r| <= ln2/2`: truncation under 0.1 ulp).
mod expc {
    /// Below this `exp` is under `f32::MIN_POSITIVE`: the result is 0.
    pub const LO: f32 = -87.336_55;
    /// Above this the result saturates (softmax only takes `x <= 0`).
    pub const HI: f32 = 88.0;
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    pub const LN2_HI: f32 = 0.693_145_75;
    pub const LN2_LO: f32 = 1.428_606_8e-6;
    /// `1/k!` for `k = 7, 6, …, 2` (the `k = 1, 0` terms are 1).
    pub const C: [f32; 6] = [
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
    ];
}

mod portable {
    use super::KEY_BLOCK as KB;

    pub fn scores(q: &[f32], d: usize, kt: &[f32], s: &mut [f32]) {
        assert!(kt.len() == d * KB && q.len() * KB == s.len() * d);
        for (qr, sr) in q.chunks_exact(d).zip(s.chunks_exact_mut(KB)) {
            sr.fill(0.0);
            for (&x, kr) in qr.iter().zip(kt.chunks_exact(KB)) {
                for (y, &kv) in sr.iter_mut().zip(kr) {
                    *y += x * kv;
                }
            }
        }
    }

    pub fn softmax(
        s: &mut [f32],
        vis: &[usize],
        scale: f32,
        m: &mut [f32],
        l: &mut [f32],
        alpha: &mut [f32],
    ) {
        assert!(s.len() == vis.len() * KB);
        for (r, row) in s.chunks_exact_mut(KB).enumerate() {
            let n = vis[r];
            if n == 0 {
                row.fill(0.0);
                alpha[r] = 1.0;
                continue;
            }
            let mut bm = f32::NEG_INFINITY;
            for x in &mut row[..n] {
                *x *= scale;
                bm = bm.max(*x);
            }
            let m_new = m[r].max(bm);
            let a = (m[r] - m_new).exp();
            let mut total = 0f32;
            for x in &mut row[..n] {
                *x = (*x - m_new).exp();
                total += *x;
            }
            row[n..].fill(0.0);
            l[r] = l[r] * a + total;
            m[r] = m_new;
            alpha[r] = a;
        }
    }

    pub fn pv(o: &mut [f32], dpad: usize, p: &[f32], v: super::Rows, alpha: &[f32], jcount: usize) {
        assert!(o.len() == alpha.len() * dpad && p.len() == alpha.len() * KB);
        let (v, vstride) = v;
        for ((orow, prow), &a) in o.chunks_exact_mut(dpad).zip(p.chunks_exact(KB)).zip(alpha) {
            for y in orow.iter_mut() {
                *y *= a;
            }
            for (j, &w) in prow[..jcount].iter().enumerate() {
                let vr = &v[j * vstride..j * vstride + dpad];
                for (y, &x) in orow.iter_mut().zip(vr) {
                    *y += w * x;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::expc;
    use super::KEY_BLOCK as KB;

    /// Rows of the score tile (6 rows x 64 keys: 24 accumulators).
    const RS: usize = 6;
    /// Rows of the `p·v` tile: 6 rows x up to 4 vectors (24 accumulators), 4 rows x 5
    /// (head dim 80: 20).
    fn rows_pv(nv: usize) -> usize {
        if nv > 4 {
            4
        } else {
            6
        }
    }

    /// `exp` of 16 lanes, within 2 ulp on `[LO, HI]`; 0 below `LO` (and for `-inf`), NaN
    /// for NaN, exactly 1 for 0.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn exp(x: __m512) -> __m512 {
        // `max(c, x)` and `min(c, x)` return `x` when it is NaN (the second operand).
        let xc = _mm512_min_ps(
            _mm512_set1_ps(expc::HI),
            _mm512_max_ps(_mm512_set1_ps(expc::LO), x),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(xc, _mm512_set1_ps(expc::LOG2E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(expc::LN2_HI), xc);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(expc::LN2_LO), r);
        let mut p = _mm512_set1_ps(expc::C[0]);
        for &c in &expc::C[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let one = _mm512_set1_ps(1.0);
        p = _mm512_fmadd_ps(p, r, one);
        p = _mm512_fmadd_ps(p, r, one);
        let y = _mm512_scalef_ps(p, n);
        let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(expc::LO));
        _mm512_mask_mov_ps(y, under, _mm512_setzero_ps())
    }

    /// `exp` over a slice whose length is a multiple of 16 (tests).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[cfg(test)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_slice(x: &[f32], y: &mut [f32]) {
        for (a, b) in x.chunks_exact(16).zip(y.chunks_exact_mut(16)) {
            _mm512_storeu_ps(b.as_mut_ptr(), exp(_mm512_loadu_ps(a.as_ptr())));
        }
    }

    /// See `Isa::scores`.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scores(q: &[f32], d: usize, kt: &[f32], s: &mut [f32]) {
        let rows = s.len() / KB;
        assert!(rows.is_multiple_of(RS) && q.len() == rows * d && kt.len() == d * KB);
        let (qp, ktp, sp) = (q.as_ptr(), kt.as_ptr(), s.as_mut_ptr());
        for i0 in (0..rows).step_by(RS) {
            let mut acc = [[_mm512_setzero_ps(); 4]; RS];
            let qr = qp.add(i0 * d);
            for e in 0..d {
                // SAFETY (pointer reads here and below): `e < d`, `i0 + i < rows` and
                // `c < 4` keep every index inside the lengths asserted above.
                let kr = ktp.add(e * KB);
                let kv = [
                    _mm512_loadu_ps(kr),
                    _mm512_loadu_ps(kr.add(16)),
                    _mm512_loadu_ps(kr.add(32)),
                    _mm512_loadu_ps(kr.add(48)),
                ];
                for (i, a) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*qr.add(i * d + e));
                    for c in 0..4 {
                        a[c] = _mm512_fmadd_ps(x, kv[c], a[c]);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate() {
                for (c, &x) in a.iter().enumerate() {
                    _mm512_storeu_ps(sp.add((i0 + i) * KB + c * 16), x);
                }
            }
        }
    }

    /// See `Isa::softmax`.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax(
        s: &mut [f32],
        vis: &[usize],
        scale: f32,
        m: &mut [f32],
        l: &mut [f32],
        alpha: &mut [f32],
    ) {
        let rows = vis.len();
        assert!(s.len() == rows * KB && m.len() == rows && l.len() == rows);
        assert!(alpha.len() == rows && rows <= super::ROW_BLOCK);
        let mut total = [0f32; super::ROW_BLOCK];
        let sc = _mm512_set1_ps(scale);
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        for (r, row) in s.chunks_exact_mut(KB).enumerate() {
            let rp = row.as_mut_ptr();
            let n = vis[r].min(KB);
            if n == 0 {
                // Nothing changes: `exp(0) = 1` exactly, `Σp = 0`.
                row.fill(0.0);
                alpha[r] = 0.0;
                total[r] = 0.0;
                continue;
            }
            let mut x = [ninf; 4];
            for (c, xc) in x.iter_mut().enumerate() {
                let lanes = n.saturating_sub(c * 16).min(16);
                let mask = ((1u32 << lanes) - 1) as __mmask16;
                // SAFETY: `c * 16 + 16 <= KB`, the row's length.
                *xc = _mm512_mask_mul_ps(ninf, mask, _mm512_loadu_ps(rp.add(c * 16)), sc);
            }
            let bm = _mm512_reduce_max_ps(_mm512_max_ps(
                _mm512_max_ps(x[0], x[1]),
                _mm512_max_ps(x[2], x[3]),
            ));
            let m_new = m[r].max(bm);
            let mv = _mm512_set1_ps(m_new);
            let mut p = [ninf; 4];
            for c in 0..4 {
                p[c] = exp(_mm512_sub_ps(x[c], mv));
                // SAFETY: as above.
                _mm512_storeu_ps(rp.add(c * 16), p[c]);
            }
            total[r] = _mm512_reduce_add_ps(_mm512_add_ps(
                _mm512_add_ps(p[0], p[1]),
                _mm512_add_ps(p[2], p[3]),
            ));
            alpha[r] = m[r] - m_new; // exponentiated below
            m[r] = m_new;
        }
        // `alpha = exp(m - m')` and `l = l·alpha + Σp`, 16 rows at a time.
        for ((a, l), t) in alpha
            .chunks_mut(16)
            .zip(l.chunks_mut(16))
            .zip(total.chunks(16))
        {
            let mut buf = [0f32; 16];
            buf[..a.len()].copy_from_slice(a);
            _mm512_storeu_ps(buf.as_mut_ptr(), exp(_mm512_loadu_ps(buf.as_ptr())));
            for (((a, l), t), &e) in a.iter_mut().zip(l.iter_mut()).zip(t).zip(&buf) {
                *a = e;
                *l = *l * e + t;
            }
        }
    }

    /// See `Isa::pv`.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pv(
        o: &mut [f32],
        dpad: usize,
        p: &[f32],
        v: super::Rows,
        alpha: &[f32],
        jcount: usize,
    ) {
        let rows = alpha.len();
        let nv = super::avx512_chunk(dpad / 16);
        let rp = rows_pv(nv);
        assert!(
            rows.is_multiple_of(rp) && dpad.is_multiple_of(16) && (dpad / 16).is_multiple_of(nv)
        );
        assert!(o.len() == rows * dpad && p.len() == rows * KB && jcount <= KB);
        assert!(jcount == 0 || v.0.len() >= (jcount - 1) * v.1 + dpad);
        let (op, pp, vp, ap) = (o.as_mut_ptr(), p.as_ptr(), v.0.as_ptr(), alpha.as_ptr());
        let vstride = v.1;
        for i0 in (0..rows).step_by(rp) {
            for c0 in (0..dpad).step_by(nv * 16) {
                // SAFETY: rows `i0..i0 + rp` and columns `c0..c0 + nv·16` lie inside `o`
                // (rows x dpad) and `p` (rows x KB); value rows `j < jcount` inside `v`;
                // asserted above.
                let (o, p, a) = (op.add(i0 * dpad + c0), pp.add(i0 * KB), ap.add(i0));
                let v = (vp.add(c0), vstride);
                match nv {
                    1 => pv_tile::<1, 6>(o, dpad, p, v, a, jcount),
                    2 => pv_tile::<2, 6>(o, dpad, p, v, a, jcount),
                    3 => pv_tile::<3, 6>(o, dpad, p, v, a, jcount),
                    4 => pv_tile::<4, 6>(o, dpad, p, v, a, jcount),
                    _ => pv_tile::<5, 4>(o, dpad, p, v, a, jcount),
                }
            }
        }
    }

    /// One `RP x (NV·16)` tile of `o = o·alpha + p·v`, accumulators in registers.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `o`, `p`, `v.0`, `alpha` point at a tile inside their buffers
    /// (row strides `dpad`, `KB`, `v.1`) with `jcount` keys.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn pv_tile<const NV: usize, const RP: usize>(
        o: *mut f32,
        dpad: usize,
        p: *const f32,
        v: (*const f32, usize),
        alpha: *const f32,
        jcount: usize,
    ) {
        let (v, vstride) = v;
        let mut acc = [[_mm512_setzero_ps(); NV]; RP];
        for (i, a) in acc.iter_mut().enumerate() {
            let s = _mm512_set1_ps(*alpha.add(i));
            for (c, x) in a.iter_mut().enumerate() {
                *x = _mm512_mul_ps(_mm512_loadu_ps(o.add(i * dpad + c * 16)), s);
            }
        }
        for j in 0..jcount {
            let vr = v.add(j * vstride);
            let mut vv = [_mm512_setzero_ps(); NV];
            for (c, x) in vv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(vr.add(c * 16));
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*p.add(i * KB + j));
                for c in 0..NV {
                    a[c] = _mm512_fmadd_ps(w, vv[c], a[c]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (c, &x) in a.iter().enumerate() {
                _mm512_storeu_ps(o.add(i * dpad + c * 16), x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::expc;
    use super::KEY_BLOCK as KB;

    /// Rows of both tiles (6 rows x 16 columns: 12 accumulators of 8 lanes).
    const R: usize = 6;

    /// `exp` of 8 lanes; same contract as the AVX-512 one.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn exp(x: __m256) -> __m256 {
        // `max(c, x)` and `min(c, x)` return `x` when it is NaN (the second operand).
        let xc = _mm256_min_ps(
            _mm256_set1_ps(expc::HI),
            _mm256_max_ps(_mm256_set1_ps(expc::LO), x),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(xc, _mm256_set1_ps(expc::LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(expc::LN2_HI), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(expc::LN2_LO), r);
        let mut p = _mm256_set1_ps(expc::C[0]);
        for &c in &expc::C[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let one = _mm256_set1_ps(1.0);
        p = _mm256_fmadd_ps(p, r, one);
        p = _mm256_fmadd_ps(p, r, one);
        // 2^n from the exponent bits: n is in [-126, 127] after the clamps (NaN lanes give
        // a garbage scale times a NaN polynomial: NaN).
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(expc::LO));
        _mm256_andnot_ps(under, y)
    }

    /// `tile[e * KB + j] = rows[j][e]` for `j < rows.len()` (a multiple of 8) and `e < d8` (a
    /// multiple of 8), by 8x8 blocks: 8 loads, 24 shuffles, 8 stores per 64 values.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[target_feature(enable = "avx")]
    pub unsafe fn transpose8(rows: &[&[f32]], d8: usize, tile: &mut [f32]) {
        assert!(rows.len().is_multiple_of(8) && rows.len() <= KB && d8.is_multiple_of(8));
        assert!(rows.iter().all(|r| r.len() >= d8) && tile.len() >= d8 * KB);
        let out = tile.as_mut_ptr();
        for (g, r) in rows.chunks_exact(8).enumerate() {
            for e0 in (0..d8).step_by(8) {
                // SAFETY: `e0 + 8 <= d8 <= r[u].len()`; the stores go to rows `e0..e0 + 8`,
                // columns `g·8..g·8 + 8 <= KB` of `tile` (asserted above).
                let x: [__m256; 8] =
                    std::array::from_fn(|u| _mm256_loadu_ps(r[u].as_ptr().add(e0)));
                let t0 = _mm256_unpacklo_ps(x[0], x[1]);
                let t1 = _mm256_unpackhi_ps(x[0], x[1]);
                let t2 = _mm256_unpacklo_ps(x[2], x[3]);
                let t3 = _mm256_unpackhi_ps(x[2], x[3]);
                let t4 = _mm256_unpacklo_ps(x[4], x[5]);
                let t5 = _mm256_unpackhi_ps(x[4], x[5]);
                let t6 = _mm256_unpacklo_ps(x[6], x[7]);
                let t7 = _mm256_unpackhi_ps(x[6], x[7]);
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let y = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
                for (e, &row) in y.iter().enumerate() {
                    _mm256_storeu_ps(out.add((e0 + e) * KB + g * 8), row);
                }
            }
        }
    }

    /// Max of 8 lanes in a fixed order.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hmax(v: __m256) -> f32 {
        let x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let x = _mm_max_ps(x, _mm_movehl_ps(x, x));
        _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps::<1>(x, x)))
    }

    /// Sum of 8 lanes in a fixed order.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps::<1>(x, x)))
    }

    /// `exp` over a slice whose length is a multiple of 8 (tests).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_slice(x: &[f32], y: &mut [f32]) {
        for (a, b) in x.chunks_exact(8).zip(y.chunks_exact_mut(8)) {
            _mm256_storeu_ps(b.as_mut_ptr(), exp(_mm256_loadu_ps(a.as_ptr())));
        }
    }

    /// See `Isa::scores`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores(q: &[f32], d: usize, kt: &[f32], s: &mut [f32]) {
        let rows = s.len() / KB;
        assert!(rows.is_multiple_of(R) && q.len() == rows * d && kt.len() == d * KB);
        let (qp, ktp, sp) = (q.as_ptr(), kt.as_ptr(), s.as_mut_ptr());
        for i0 in (0..rows).step_by(R) {
            let qr = qp.add(i0 * d);
            for j0 in (0..KB).step_by(16) {
                let mut acc = [[_mm256_setzero_ps(); 2]; R];
                for e in 0..d {
                    // SAFETY (pointer reads here and below): `e < d`, `i0 + i < rows`,
                    // `j0 + 16 <= KB` keep every index inside the lengths asserted above.
                    let kr = ktp.add(e * KB + j0);
                    let (k0, k1) = (_mm256_loadu_ps(kr), _mm256_loadu_ps(kr.add(8)));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let x = _mm256_set1_ps(*qr.add(i * d + e));
                        a[0] = _mm256_fmadd_ps(x, k0, a[0]);
                        a[1] = _mm256_fmadd_ps(x, k1, a[1]);
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    let at = sp.add((i0 + i) * KB + j0);
                    _mm256_storeu_ps(at, a[0]);
                    _mm256_storeu_ps(at.add(8), a[1]);
                }
            }
        }
    }

    /// See `Isa::softmax`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax(
        s: &mut [f32],
        vis: &[usize],
        scale: f32,
        m: &mut [f32],
        l: &mut [f32],
        alpha: &mut [f32],
    ) {
        let rows = vis.len();
        assert!(s.len() == rows * KB && m.len() == rows && l.len() == rows);
        assert!(alpha.len() == rows && rows <= super::ROW_BLOCK);
        let mut total = [0f32; super::ROW_BLOCK];
        let sc = _mm256_set1_ps(scale);
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for (r, row) in s.chunks_exact_mut(KB).enumerate() {
            let rp = row.as_mut_ptr();
            let n = vis[r].min(KB);
            if n == 0 {
                // Nothing changes: `exp(0) = 1` exactly, `Σp = 0`.
                row.fill(0.0);
                alpha[r] = 0.0;
                total[r] = 0.0;
                continue;
            }
            let mut x = [ninf; 8];
            for (c, xc) in x.iter_mut().enumerate() {
                // Lanes `c·8 + i` with `c·8 + i < n`, i.e. `i < n - c·8`.
                let seen = _mm256_cmpgt_epi32(_mm256_set1_epi32((n as i32) - (c as i32) * 8), lane);
                // SAFETY: `c * 8 + 8 <= KB`, the row's length.
                let y = _mm256_mul_ps(_mm256_loadu_ps(rp.add(c * 8)), sc);
                *xc = _mm256_blendv_ps(ninf, y, _mm256_castsi256_ps(seen));
            }
            let bm = hmax(_mm256_max_ps(
                _mm256_max_ps(_mm256_max_ps(x[0], x[1]), _mm256_max_ps(x[2], x[3])),
                _mm256_max_ps(_mm256_max_ps(x[4], x[5]), _mm256_max_ps(x[6], x[7])),
            ));
            let m_new = m[r].max(bm);
            let mv = _mm256_set1_ps(m_new);
            let mut p = [ninf; 8];
            for c in 0..8 {
                p[c] = exp(_mm256_sub_ps(x[c], mv));
                // SAFETY: as above.
                _mm256_storeu_ps(rp.add(c * 8), p[c]);
            }
            total[r] = hsum(_mm256_add_ps(
                _mm256_add_ps(_mm256_add_ps(p[0], p[1]), _mm256_add_ps(p[2], p[3])),
                _mm256_add_ps(_mm256_add_ps(p[4], p[5]), _mm256_add_ps(p[6], p[7])),
            ));
            alpha[r] = m[r] - m_new; // exponentiated below
            m[r] = m_new;
        }
        // `alpha = exp(m - m')` and `l = l·alpha + Σp`, 8 rows at a time.
        for ((a, l), t) in alpha
            .chunks_mut(8)
            .zip(l.chunks_mut(8))
            .zip(total.chunks(8))
        {
            let mut buf = [0f32; 8];
            buf[..a.len()].copy_from_slice(a);
            _mm256_storeu_ps(buf.as_mut_ptr(), exp(_mm256_loadu_ps(buf.as_ptr())));
            for (((a, l), t), &e) in a.iter_mut().zip(l.iter_mut()).zip(t).zip(&buf) {
                *a = e;
                *l = *l * e + t;
            }
        }
    }

    /// See `Isa::pv`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn pv(
        o: &mut [f32],
        dpad: usize,
        p: &[f32],
        v: super::Rows,
        alpha: &[f32],
        jcount: usize,
    ) {
        let rows = alpha.len();
        assert!(rows.is_multiple_of(R) && dpad.is_multiple_of(16) && jcount <= KB);
        assert!(o.len() == rows * dpad && p.len() == rows * KB);
        assert!(jcount == 0 || v.0.len() >= (jcount - 1) * v.1 + dpad);
        let (op, pp, vp, ap) = (o.as_mut_ptr(), p.as_ptr(), v.0.as_ptr(), alpha.as_ptr());
        let vstride = v.1;
        for i0 in (0..rows).step_by(R) {
            for c0 in (0..dpad).step_by(16) {
                // SAFETY (pointer accesses in this tile): rows `i0..i0 + R` and columns
                // `c0..c0 + 16` lie inside `o` (rows x dpad) and `p` (rows x KB); value rows
                // `j < jcount` inside `v`; asserted above.
                let (o, p, v) = (op.add(i0 * dpad + c0), pp.add(i0 * KB), vp.add(c0));
                let mut acc = [[_mm256_setzero_ps(); 2]; R];
                for (i, a) in acc.iter_mut().enumerate() {
                    let s = _mm256_set1_ps(*ap.add(i0 + i));
                    a[0] = _mm256_mul_ps(_mm256_loadu_ps(o.add(i * dpad)), s);
                    a[1] = _mm256_mul_ps(_mm256_loadu_ps(o.add(i * dpad + 8)), s);
                }
                for j in 0..jcount {
                    let vr = v.add(j * vstride);
                    let (v0, v1) = (_mm256_loadu_ps(vr), _mm256_loadu_ps(vr.add(8)));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let w = _mm256_set1_ps(*p.add(i * KB + j));
                        a[0] = _mm256_fmadd_ps(w, v0, a[0]);
                        a[1] = _mm256_fmadd_ps(w, v1, a[1]);
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(o.add(i * dpad), a[0]);
                    _mm256_storeu_ps(o.add(i * dpad + 8), a[1]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISAS: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];

    /// A small deterministic generator (xorshift64*), uniform in `[-amp, amp)`.
    struct Rng(u64);

    impl Rng {
        fn uniform(&mut self, amp: f32) -> f32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
            (x as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        }

        fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
            (0..n).map(|_| self.uniform(amp)).collect()
        }
    }

    /// Inputs of one case, stored contiguously or as strided views: `q` as the vision tower's
    /// `(T, B·G, D)` rows (plus padding columns), `k` as `(L, B, D)` rows with padding, `v`
    /// as a KV cache `(B, capacity, D)` with room past `L`.
    struct Inputs {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        dims: [usize; 5], // b, g, t, l, d
        strided: bool,
    }

    impl Inputs {
        fn new(seed: u64, [b, g, t, l, d]: [usize; 5], strided: bool) -> Inputs {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            // Scores of standard deviation ~1.3 after the 1/sqrt(d) scale: peaked softmaxes.
            let (qn, kn, vn) = if strided {
                (
                    t * b * g * (d + 3) + 5,
                    l * b * (d + 5) + 2,
                    b * (l + 7) * d,
                )
            } else {
                (b * g * t * d, b * l * d, b * l * d)
            };
            Inputs {
                q: rng.vec(qn, 2.0),
                k: rng.vec(kn, 2.0),
                v: rng.vec(vn, 1.0),
                dims: [b, g, t, l, d],
                strided,
            }
        }

        fn views(&self) -> (QView<'_>, KvView<'_>, KvView<'_>) {
            let [b, g, t, l, d] = self.dims;
            if self.strided {
                let (qr, kr) = (d + 3, d + 5);
                (
                    QView {
                        data: &self.q,
                        start: 5,
                        dims: [b, g, t, d],
                        strides: [g * qr, qr, b * g * qr],
                    },
                    KvView {
                        data: &self.k,
                        start: 2,
                        dims: [b, l, d],
                        strides: [kr, b * kr],
                    },
                    KvView {
                        data: &self.v,
                        start: 0,
                        dims: [b, l, d],
                        strides: [(l + 7) * d, d],
                    },
                )
            } else {
                (
                    QView {
                        data: &self.q,
                        start: 0,
                        dims: [b, g, t, d],
                        strides: [g * t * d, t * d, d],
                    },
                    KvView {
                        data: &self.k,
                        start: 0,
                        dims: [b, l, d],
                        strides: [l * d, d],
                    },
                    KvView {
                        data: &self.v,
                        start: 0,
                        dims: [b, l, d],
                        strides: [l * d, d],
                    },
                )
            }
        }
    }

    /// `(b, g, t, l, d, causal offset)`: the vision and text shapes, head dims that are not
    /// a multiple of 16, decode, offsets, GQA, `L` around the key block, `L < p + T`.
    type Case = (usize, usize, usize, usize, usize, Option<usize>);
    const CASES: &[Case] = &[
        (2, 1, 70, 70, 80, None),
        (2, 6, 37, 37, 128, Some(0)),
        (2, 6, 1, 150, 128, Some(149)),
        (1, 3, 20, 130, 72, Some(110)),
        (3, 2, 9, 65, 8, None),
        (1, 1, 5, 3, 40, Some(0)),
        (1, 2, 50, 200, 1, Some(150)),
        (2, 1, 100, 64, 16, None),
        (1, 4, 60, 128, 24, Some(68)),
    ];

    fn max_err(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        got.iter()
            .zip(want)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn every_instruction_set_matches_the_f64_oracle() {
        for (n, &(b, g, t, l, d, causal)) in CASES.iter().enumerate() {
            for strided in [false, true] {
                let x = Inputs::new(n as u64, [b, g, t, l, d], strided);
                let (q, k, v) = x.views();
                let scale = 1.0 / (d as f64).sqrt();
                let want = attention_plain(&q, &k, &v, scale, causal);
                for isa in ISAS.into_iter().filter(|i| i.available()) {
                    let got = attention_f32(isa, &q, &k, &v, scale as f32, causal);
                    let err = max_err(&got, &want);
                    assert!(
                        err < 1e-5,
                        "{isa:?} case {n} strided {strided}: max error {err:e}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_instruction_sets_agree() {
        let x = Inputs::new(7, [2, 6, 150, 300, 128], true);
        let (q, k, v) = x.views();
        for causal in [None, Some(150)] {
            let plain = attention_f32(Isa::Portable, &q, &k, &v, 0.2, causal);
            for isa in [Isa::Avx512, Isa::Avx2]
                .into_iter()
                .filter(|i| i.available())
            {
                let got = attention_f32(isa, &q, &k, &v, 0.2, causal);
                let err = got
                    .iter()
                    .zip(&plain)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-5, "{isa:?} vs portable, {causal:?}: {err:e}");
            }
        }
    }

    /// Rows `t0..t1` of `x`'s queries as a call of their own, with keys narrowed to what the
    /// last of them sees when causal (as the prefill's units do); returns `(B, G, t1-t0, D)`.
    fn rows_alone(isa: Isa, x: &Inputs, t0: usize, t1: usize, past: Option<usize>) -> Vec<f32> {
        let (mut q, mut k, mut v) = x.views();
        q.start += t0 * q.strides[2];
        q.dims[2] = t1 - t0;
        if let Some(p) = past {
            k.dims[1] = p + t1;
            v.dims[1] = p + t1;
        }
        let scale = 1.0 / (q.dims[3] as f32).sqrt();
        attention_f32(isa, &q, &k, &v, scale, past.map(|p| p + t0))
    }

    #[test]
    fn a_row_does_not_depend_on_the_rows_beside_it() {
        // Text (causal GQA, keys narrowed per chunk) and vision (full attention).
        for (dims, past) in [
            ([2, 6, 100, 130, 128], Some(30)),
            ([3, 1, 130, 130, 80], None),
        ] {
            let x = Inputs::new(11, dims, true);
            let [b, g, t, _, d] = dims;
            for isa in ISAS.into_iter().filter(|i| i.available()) {
                let whole = rows_alone(isa, &x, 0, t, past);
                let mut cuts = vec![(0, 1), (1, 49), (49, 50), (50, 100), (100, t)];
                cuts.extend((0..t).map(|i| (i, i + 1))); // decode: one row at a time
                for (t0, t1) in cuts {
                    let part = rows_alone(isa, &x, t0, t1, past);
                    for bg in 0..b * g {
                        let n = t1 - t0;
                        let want = &whole[(bg * t + t0) * d..(bg * t + t1) * d];
                        let got = &part[bg * n * d..(bg + 1) * n * d];
                        assert!(
                            want.iter()
                                .zip(got)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{isa:?} rows {t0}..{t1} of head {bg} ({dims:?})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn packed_keys_give_the_same_bits_as_the_views() {
        for (dims, past) in [
            ([2, 6, 70, 100, 128], Some(30)),
            ([3, 1, 130, 130, 72], None),
        ] {
            let x = Inputs::new(5, dims, true);
            let [b, g, t, _, d] = dims;
            let (q, k, v) = x.views();
            for isa in ISAS.into_iter().filter(|i| i.available()) {
                let whole = rows_alone(isa, &x, 0, t, past);
                let keys = Keys::pack_f32(isa, &k, &v);
                for (t0, t1) in [(0, t), (0, 1), (1, 49), (49, t), (t - 1, t)] {
                    let mut qc = q;
                    qc.start += t0 * q.strides[2];
                    qc.dims[2] = t1 - t0;
                    let scale = 1.0 / (d as f32).sqrt();
                    let part = attention_f32_keys(&qc, &keys, scale, past.map(|p| p + t0));
                    let n = t1 - t0;
                    for bg in 0..b * g {
                        let want = &whole[(bg * t + t0) * d..(bg * t + t1) * d];
                        let got = &part[bg * n * d..(bg + 1) * n * d];
                        assert!(
                            want.iter()
                                .zip(got)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{isa:?} rows {t0}..{t1} of head {bg} ({dims:?})"
                        );
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_exp_is_within_two_ulp() {
        let mut xs: Vec<f32> = (0..200_000)
            .map(|i| expc::LO + (expc::HI - expc::LO) * i as f32 / 200_000.0)
            .collect();
        xs.extend([0.0, -0.0, 1e-8, -1e-8, -0.5, 0.5, expc::LO, -1.0e-30]);
        let specials = [
            f32::NEG_INFINITY,
            -1000.0,
            -87.4,
            -100.0,
            f32::NAN,
            0.0,
            -0.0,
            0.0,
        ];
        xs.extend(specials);
        while !xs.len().is_multiple_of(16) {
            xs.push(-1.0);
        }
        let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
        for isa in [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .filter(|i| i.available())
        {
            let mut ys = vec![0f32; xs.len()];
            // SAFETY: the instruction set is available (filtered above).
            unsafe {
                match isa {
                    Isa::Avx512 => avx512::exp_slice(&xs, &mut ys),
                    _ => avx2::exp_slice(&xs, &mut ys),
                }
            }
            for (&x, &y) in xs.iter().zip(&ys) {
                if x.is_nan() {
                    assert!(y.is_nan(), "{isa:?}: exp(NaN) = {y}");
                } else if x < expc::LO {
                    assert_eq!(y, 0.0, "{isa:?}: exp({x})");
                } else {
                    let want = (x as f64).exp() as f32;
                    assert!(ulps(y, want) <= 2, "{isa:?}: exp({x}) = {y}, want {want}");
                }
                if x == 0.0 {
                    assert_eq!(y, 1.0, "{isa:?}: exp(0) must be exactly 1");
                }
            }
        }
    }

    #[test]
    fn tensors_take_the_kernel_and_other_dtypes_do_not() {
        use candle_core::{Device, Tensor};
        let dev = Device::Cpu;
        // Vision-like views: (len, heads, hd) rows transposed to (heads, len, hd).
        let (len, h, d) = (90, 4, 80);
        let q = Tensor::randn(0f32, 1.0, (len, h, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (len, h, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (len, h, d), &dev).unwrap();
        let qs = q.transpose(0, 1).unwrap().unsqueeze(1).unwrap();
        let (ks, vs) = (k.transpose(0, 1).unwrap(), v.transpose(0, 1).unwrap());
        let got = attention(&qs, &ks, &vs, 0.11, None)
            .unwrap()
            .expect("fused");
        let want = crate::nn::attention_blocked(
            &qs,
            &ks.contiguous().unwrap(),
            &vs.contiguous().unwrap(),
            0.11,
            None,
            crate::nn::MAX_SCORE_ELEMS,
        )
        .unwrap();
        assert!(crate::ops::max_diff(&got, &want) < 1e-5);
        let wide = |x: &Tensor| x.to_dtype(candle_core::DType::F64).unwrap();
        assert!(attention(&wide(&qs), &wide(&ks), &wide(&vs), 0.11, None)
            .unwrap()
            .is_none());
        // No queries: an empty result; no keys: the blocked path.
        let none = qs.narrow(2, 0, 0).unwrap();
        let empty = attention(&none, &ks, &vs, 0.11, None)
            .unwrap()
            .expect("fused");
        assert_eq!(empty.dims(), &[h, 1, 0, d]);
        let (k0, v0) = (ks.narrow(1, 0, 0).unwrap(), vs.narrow(1, 0, 0).unwrap());
        assert!(attention(&qs, &k0, &v0, 0.11, None).unwrap().is_none());
        assert!(Keys::pack(&k0, &v0).unwrap().is_none());
        // Packed keys: the same bits as the views, for any piece of the query rows.
        let keys = Keys::pack(&ks, &vs).unwrap().expect("packed");
        assert_eq!(keys.dims(), [h, len, d]);
        let piece = qs.narrow(2, 17, 40).unwrap();
        let a = attention_keys(&piece, &keys, 0.11, None)
            .unwrap()
            .expect("fused");
        let b = got.narrow(2, 17, 40).unwrap();
        assert_eq!(crate::ops::max_diff(&a, &b), 0.0);
        assert!(attention_keys(&wide(&piece), &keys, 0.11, None)
            .unwrap()
            .is_none());
    }
}

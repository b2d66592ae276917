//! What the AMX kernels share: whether this CPU and OS let the process use Intel AMX tiles
//! (Sapphire Rapids and later), and the tile configuration `ldtilecfg` reads.
//!
//! Users: [`super::gemm_bf16`] (`tdpbf16ps`, prefill and the vision tower in bf16) and
//! [`super::quant::packed`] (`tdpbsud`, packed Q8_0 over several activation rows: batched
//! decode and prefill). Tiles are per thread: each task configures them, runs, and releases
//! them (`tilerelease`) before it returns, so no state crosses tasks.

use std::sync::OnceLock;

/// CPUID leaf 7 EDX bits: AMX-BF16 (22), AMX-TILE (24), AMX-INT8 (25).
const BF16: u32 = 1 << 22;
const TILE: u32 = 1 << 24;
const INT8: u32 = 1 << 25;

/// Leaf 7's EDX when the CPU has AVX-512 F and AMX-TILE and the kernel granted this process
/// the tile data (Linux `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once for
/// the whole process); `0` otherwise.
fn features() -> u32 {
    static FEATURES: OnceLock<u32> = OnceLock::new();
    *FEATURES.get_or_init(|| {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return 0;
        }
        #[allow(unused_unsafe)]
        // SAFETY: CPUID leaf 7 exists on every x86-64 CPU with AVX-512 (checked above).
        let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0).edx };
        if edx & TILE == 0 || !request_tile_data() {
            return 0;
        }
        edx
    })
}

/// Whether `tdpbf16ps` may run (AMX-TILE, AMX-BF16, tile data granted).
pub(crate) fn bf16_available() -> bool {
    features() & BF16 != 0
}

/// Whether `tdpbsud` and the other int8 tile products may run (AMX-TILE, AMX-INT8, tile data
/// granted).
pub(crate) fn int8_available() -> bool {
    features() & INT8 != 0
}

#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments; it changes only this process's
    // permission to use the AMX tile state.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// The 64-byte tile configuration `ldtilecfg` reads (palette 1): per tile its rows and bytes
/// per row; unused tiles stay 0 × 0.
#[repr(C, align(64))]
pub(crate) struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// Tiles `tmm0..tmm8` shaped `(rows, bytes per row)` as `shapes` says (at most 16 rows of
    /// 64 bytes each: palette 1's limits).
    pub(crate) fn new(shapes: [(u8, u16); 8]) -> Self {
        let mut c = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for (t, (rows, colsb)) in shapes.into_iter().enumerate() {
            debug_assert!(rows <= 16 && colsb <= 64);
            c.rows[t] = rows;
            c.colsb[t] = colsb;
        }
        c
    }

    /// Loads this configuration into the calling thread's tile state (`ldtilecfg`).
    ///
    /// # Safety
    /// AMX-TILE is available ([`bf16_available`] or [`int8_available`] said so) and the shapes
    /// are valid; the caller releases the tiles ([`release`]) before its task ends.
    pub(crate) unsafe fn load(&self) {
        std::arch::asm!("ldtilecfg [{0}]", in(reg) self as *const TileConfig, options(nostack, readonly));
    }
}

/// Releases the calling thread's tile state (`tilerelease`).
///
/// # Safety
/// AMX-TILE is available.
pub(crate) unsafe fn release() {
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

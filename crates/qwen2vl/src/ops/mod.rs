//! Kernels this crate owns. Each optimised kernel keeps a plain version beside it as its oracle.

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
pub mod attention;
pub mod fused;
pub mod gemm_bf16;
pub mod gemm_half;
pub mod gemv;
pub mod pool;
pub mod quant;
pub mod resize;
pub mod resize_torch;
pub mod team;

/// An output pointer shared by parallel tasks that write disjoint parts of its buffer (the
/// owner stays mutably borrowed until every task has finished).
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: only used for buffers whose tasks write disjoint elements while the owner is
// mutably borrowed for the whole parallel section (see each use).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Max |a - b| of two tensors (test helper shared by the kernel tests).
#[cfg(test)]
pub(crate) fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("max diff of two f32 tensors of one shape")
}

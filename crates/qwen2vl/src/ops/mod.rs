//! Kernels this crate owns. Each optimised kernel keeps a plain version beside it as its oracle.

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

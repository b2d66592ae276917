//! Kernels this crate owns. Each optimised kernel keeps a plain version beside it as its oracle.

pub mod fused;
pub mod resize;

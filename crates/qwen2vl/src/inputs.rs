//! [`ModelInputs`]: the contract between the processor and the model.

use serde::Serialize;

use crate::rope::MropePositions;

/// One image as the processor prepared it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    /// Decoded size `(height, width)`.
    pub original_hw: (usize, usize),
    /// Size after `smart_resize` `(height, width)`, multiples of 28.
    pub resized_hw: (usize, usize),
    /// `(t, h, w)` in patches.
    pub grid_thw: [usize; 3],
    /// Merged tokens it occupies in the prompt (`t*h*w / merge²`).
    pub tokens: usize,
}

/// Everything the model needs for one prompt.
#[derive(Debug, Clone)]
pub struct ModelInputs {
    /// The rendered chat-template text (before pad expansion).
    pub prompt: String,
    /// Token ids, `<|image_pad|>` expanded to one per merged token: `(seq,)`.
    pub input_ids: Vec<u32>,
    /// All images' patches, row-major `(n_patches, 1176)`.
    pub pixel_values: Vec<f32>,
    /// `(t, h, w)` per image, in patches.
    pub image_grid_thw: Vec<[usize; 3]>,
    /// Per-image details (sizes, token counts).
    pub images: Vec<ImageInfo>,
    /// M-RoPE ids `(3, seq)` and `rope_delta`.
    pub positions: MropePositions,
}

impl ModelInputs {
    /// Prompt tokens that are image pads.
    pub fn image_tokens(&self) -> usize {
        self.images.iter().map(|i| i.tokens).sum()
    }
}

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

/// One video as the processor prepared it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VideoInfo {
    /// Sampled frames (an even count; two make one temporal patch).
    pub frames: usize,
    /// Which decoded frames were sampled.
    pub frame_indices: Vec<usize>,
    /// Frames per second of the samples.
    pub fps: f64,
    /// Frame size after resizing `(height, width)`, multiples of 28.
    pub resized_hw: (usize, usize),
    /// `(t, h, w)` in patches (`t` = frames / 2).
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
    /// All videos' patches, row-major `(n_patches, 1176)`.
    pub pixel_values_videos: Vec<f32>,
    /// `(t, h, w)` per video, in patches.
    pub video_grid_thw: Vec<[usize; 3]>,
    /// Per-video details (frames, sizes, token counts).
    pub videos: Vec<VideoInfo>,
    /// M-RoPE ids `(3, seq)` and `rope_delta`.
    pub positions: MropePositions,
}

impl ModelInputs {
    /// Prompt tokens that are image pads.
    pub fn image_tokens(&self) -> usize {
        self.images.iter().map(|i| i.tokens).sum()
    }

    /// Prompt tokens that are video pads.
    pub fn video_tokens(&self) -> usize {
        self.videos.iter().map(|v| v.tokens).sum()
    }
}

//! Small helpers shared by the format modules.

use half::{bf16, f16};

/// A little-endian IEEE half stored as bytes, so that blocks have alignment 1.
#[inline]
pub fn f16_to_f32(b: [u8; 2]) -> f32 {
    f16::from_le_bytes(b).to_f32()
}

/// Rounds to nearest even, as ggml's `GGML_FP32_TO_FP16` does.
#[inline]
pub fn f32_to_f16(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

#[inline]
pub fn bf16_to_f32(b: [u8; 2]) -> f32 {
    bf16::from_le_bytes(b).to_f32()
}

/// C's `roundf`: halfway cases away from zero (ggml's reference quantizers use it).
#[inline]
pub fn roundf(x: f32) -> f32 {
    x.round()
}

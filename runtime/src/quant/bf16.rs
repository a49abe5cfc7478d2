//! BF16: bfloat16, the upper half of an f32. As in ggml, activations for BF16 weights are
//! rounded to BF16 (`GGML_FP32_TO_BF16`: nearest even, NaNs made quiet) and the dot is
//! accumulated in f64 (`ggml_vec_dot_bf16`, generic path).
//!
//! ```text
//! byte 0..2   bits 16..32 of the f32 (little-endian)
//! ```

use super::util::{bf16_to_f32, f32_to_bf16};
use super::{FormatOps, GgmlType};

pub static OPS: FormatOps = FormatOps {
    ty: GgmlType::BF16,
    dequantize,
    quantize,
    vec_dot_type: GgmlType::BF16,
    vec_dot: dot,
};

/// ggml `ggml_bf16_to_fp32_row`: exact.
pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *o = bf16_to_f32([b[0], b[1]]);
    }
}

/// ggml `ggml_fp32_to_bf16_row_ref`.
pub fn quantize(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
        b.copy_from_slice(&f32_to_bf16(*x));
    }
}

/// ggml `ggml_vec_dot_bf16` (generic): each product is exact in f32 (8-bit significands),
/// the sum is taken in f64 and rounded once.
pub fn dot(w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f64;
    for (x, y) in w.chunks_exact(2).zip(a.chunks_exact(2)) {
        sum += (bf16_to_f32([x[0], x[1]]) * bf16_to_f32([y[0], y[1]])) as f64;
    }
    sum as f32
}

#[cfg(test)]
mod tests {
    use super::super::util::test_util::{assert_dot_consistent, assert_round_trip};
    use super::super::GgmlType;

    #[test]
    fn round_trip_error_ceiling() {
        // Relative RMS ceiling, about 1.25x what the reference quantizer measures here.
        // 8-bit significand: the relative error of one value is at most 2^-9; measured 0.0017.
        assert_round_trip(GgmlType::BF16, 0.0021);
    }

    #[test]
    fn dot_matches_dequantized_dot() {
        assert_dot_consistent(GgmlType::BF16);
    }
}

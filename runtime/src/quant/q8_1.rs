//! Q8_1: the activation format for Q4_1 and Q5_1 weights. As Q8_0 plus `s = d * sum(qs)`,
//! which lets a dot apply the weights' min without a pass over the activations:
//! x = d * q.
//!
//! ```text
//! byte 0..2    d   (f16)
//! byte 2..4    s   (f16) d * sum of qs
//! byte 4..36   qs  (i8 x 32)
//! ```
//!
//! Layout and quantizer follow llama.cpp's `quantize_row_q8_1_ref` (ggml-quants.c). ggml has
//! no Q8_1 x Q8_1 dot; [`dot`] is sparrow's own, the same as Q8_0's (`s` is not needed).

use super::util::{blocks, blocks_mut, f16_to_f32, f32_to_f16, roundf};
use super::{FormatOps, GgmlType};
use bytemuck::{Pod, Zeroable};

pub const QK: usize = 32;

#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ8_1 {
    pub d: [u8; 2],
    pub s: [u8; 2],
    pub qs: [i8; QK],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);

pub static OPS: FormatOps = FormatOps {
    ty: GgmlType::Q8_1,
    dequantize: |s, d| dequantize(blocks(s), d),
    quantize: |s, d| quantize(s, blocks_mut(d)),
    vec_dot_type: GgmlType::Q8_1,
    vec_dot: |w, a| dot(blocks(w), blocks(a)),
};

/// x = d * q, as ggml's Q8_0 (ggml has no Q8_1 `to_float`).
pub fn dequantize(src: &[BlockQ8_1], dst: &mut [f32]) {
    for (b, out) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = f16_to_f32(b.d);
        for (o, &q) in out.iter_mut().zip(&b.qs) {
            *o = q as f32 * d;
        }
    }
}

/// ggml `quantize_row_q8_1_ref`: as Q8_0 (d = amax / 127, `roundf`), then s = f16(sum * d)
/// with d the f32 scale before rounding to f16.
pub fn quantize(src: &[f32], dst: &mut [BlockQ8_1]) {
    for (x, b) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f32_to_f16(d);
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(x) {
            *q = roundf(v * id) as i8;
            sum += *q as i32;
        }
        b.s = f32_to_f16(sum as f32 * d);
    }
}

/// Q8_1 x Q8_1: per block the integer dot times both scales (as ggml's Q8_0 x Q8_0).
pub fn dot(w: &[BlockQ8_1], a: &[BlockQ8_1]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let sumi: i32 =
            x.qs.iter()
                .zip(&y.qs)
                .map(|(&p, &q)| p as i32 * q as i32)
                .sum();
        sum += sumi as f32 * (f16_to_f32(x.d) * f16_to_f32(y.d));
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::super::util::test_util::{assert_dot_consistent, assert_round_trip};
    use super::super::GgmlType;
    use super::*;

    #[test]
    fn round_trip_error_ceiling() {
        // Relative RMS ceiling, about 1.25x what the reference quantizer measures here.
        // As Q8_0: step amax/127; measured 0.0052 on noise.
        assert_round_trip(GgmlType::Q8_1, 0.0066);
    }

    #[test]
    fn dot_matches_dequantized_dot() {
        assert_dot_consistent(GgmlType::Q8_1);
    }

    #[test]
    fn s_is_scaled_sum() {
        let x: Vec<f32> = (0..QK).map(|i| i as f32 - 10.0).collect();
        let mut b = [BlockQ8_1::zeroed()];
        quantize(&x, &mut b);
        let sum: i32 = b[0].qs.iter().map(|&q| q as i32).sum();
        let d = 21.0f32 / 127.0;
        assert_eq!(f16_to_f32(b[0].s), f16_to_f32(f32_to_f16(sum as f32 * d)));
    }
}

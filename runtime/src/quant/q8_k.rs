//! Q8_K: the activation format of the K-quants. Super-blocks of 256 values with an f32 scale
//! (not f16), 256 signed bytes, and the sum of every 16 bytes, which the K-quant dots use to
//! apply their mins without touching each weight: x = d * q.
//!
//! ```text
//! byte    0..4    d      (f32, little-endian)
//! byte    4..260  qs     (i8 x 256)
//! byte  260..292  bsums  (i16 x 16, little-endian) bsums[j] = sum of qs[16 j .. 16 j + 16]
//! ```
//!
//! Layout and quantizer follow llama.cpp's `quantize_row_q8_K_ref` (ggml-quants.c). ggml has
//! no Q8_K x Q8_K dot; [`dot`] is sparrow's own (integer dot times both scales per block).

use super::kquant::QK_K;
use super::util::{blocks, blocks_mut, nearest_int};
use super::{FormatOps, GgmlType};
use bytemuck::{Pod, Zeroable};

#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ8K {
    pub d: [u8; 4],
    pub qs: [i8; QK_K],
    pub bsums: [[u8; 2]; QK_K / 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);

pub static OPS: FormatOps = FormatOps {
    ty: GgmlType::Q8_K,
    dequantize: |s, d| dequantize(blocks(s), d),
    quantize: |s, d| quantize(s, blocks_mut(d)),
    vec_dot_type: GgmlType::Q8_K,
    vec_dot: |w, a| dot(blocks(w), blocks(a)),
};

/// ggml `dequantize_row_q8_K`.
pub fn dequantize(src: &[BlockQ8K], dst: &mut [f32]) {
    for (b, out) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = f32::from_le_bytes(b.d);
        for (o, &q) in out.iter_mut().zip(&b.qs) {
            *o = d * q as f32;
        }
    }
}

/// ggml `quantize_row_q8_K_ref`: scale -127 / max where max is the value of largest magnitude
/// (so that value maps to exactly -127), rounded with `nearest_int` (ties to even).
///
/// For an all-zero block ggml writes d = 0 and zero quants but leaves `bsums` as they were in
/// the output buffer; sparrow writes zero sums, which is what ggml's sums would be.
pub fn quantize(src: &[f32], dst: &mut [BlockQ8K]) {
    for (x, b) in src.chunks_exact(QK_K).zip(dst.iter_mut()) {
        let mut max = 0.0f32;
        let mut amax = 0.0f32;
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *b = BlockQ8K::zeroed();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in b.qs.iter_mut().zip(x) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (s, q) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            let sum: i32 = q.iter().map(|&q| q as i32).sum();
            *s = (sum as i16).to_le_bytes();
        }
        b.d = (1.0 / iscale).to_le_bytes();
    }
}

/// Q8_K x Q8_K: per block the integer dot times both f32 scales.
pub fn dot(w: &[BlockQ8K], a: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let sumi: i32 =
            x.qs.iter()
                .zip(&y.qs)
                .map(|(&p, &q)| p as i32 * q as i32)
                .sum();
        sum += sumi as f32 * (f32::from_le_bytes(x.d) * f32::from_le_bytes(y.d));
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
        // Step amax/127 over 256 values (coarser than Q8_0); measured 0.0062 on noise.
        assert_round_trip(GgmlType::Q8_K, 0.0078);
    }

    #[test]
    fn dot_matches_dequantized_dot() {
        assert_dot_consistent(GgmlType::Q8_K);
    }

    #[test]
    fn bsums_are_block_sums() {
        let x: Vec<f32> = (0..QK_K).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut b = [BlockQ8K::zeroed()];
        quantize(&x, &mut b);
        for (j, s) in b[0].bsums.iter().enumerate() {
            let want: i32 = b[0].qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum();
            assert_eq!(i16::from_le_bytes(*s) as i32, want);
        }
    }
}

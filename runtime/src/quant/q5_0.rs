//! Q5_0: blocks of 32 weights, one f16 scale and 32 5-bit levels; x = d * (q - 16).
//!
//! ```text
//! byte 0..2    d   (f16)
//! byte 2..6    qh  u32 little-endian: bit i is bit 4 of weight i
//! byte 6..22   qs  16 bytes: low nibble = weight i, high nibble = weight i + 16 (bits 0-3)
//! ```
//!
//! Layout, quantizer (`quantize_row_q5_0_ref`) and dot (`ggml_vec_dot_q5_0_q8_0_generic`)
//! follow llama.cpp's `ggml-quants.c` / `ggml-cpu/quants.c`.

use super::q8_0::BlockQ8_0;
use super::util::{blocks, blocks_mut, f16_to_f32, f32_to_f16};
use super::{FormatOps, GgmlType};
use bytemuck::{Pod, Zeroable};

pub const QK: usize = 32;

#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ5_0 {
    pub d: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);

pub static OPS: FormatOps = FormatOps {
    ty: GgmlType::Q5_0,
    dequantize: |s, d| dequantize(blocks(s), d),
    quantize: |s, d| quantize(s, blocks_mut(d)),
    vec_dot_type: GgmlType::Q8_0,
    vec_dot: |w, a| dot(blocks(w), blocks(a)),
};

/// The unsigned 5-bit levels of weights j and j + 16 from `qs[j]` and the high-bit word.
/// Shared with Q5_1, whose quants are packed the same way.
#[inline]
pub(crate) fn levels5(qs: u8, qh: u32, j: usize) -> (u8, u8) {
    let h0 = ((qh >> j) & 1) as u8;
    let h1 = ((qh >> (j + QK / 2)) & 1) as u8;
    ((qs & 0xF) | (h0 << 4), (qs >> 4) | (h1 << 4))
}

/// Packs 32 5-bit levels into `qs` and the high-bit word (ggml's Q5_0 / Q5_1 layout).
pub(crate) fn pack5(levels: impl Fn(usize) -> u8, qs: &mut [u8; QK / 2]) -> [u8; 4] {
    let mut qh = 0u32;
    for (j, q) in qs.iter_mut().enumerate() {
        let (l0, l1) = (levels(j), levels(j + QK / 2));
        *q = (l0 & 0xF) | ((l1 & 0xF) << 4);
        qh |= (((l0 & 0x10) >> 4) as u32) << j;
        qh |= (((l1 & 0x10) >> 4) as u32) << (j + QK / 2);
    }
    qh.to_le_bytes()
}

/// ggml `dequantize_row_q5_0`.
pub fn dequantize(src: &[BlockQ5_0], dst: &mut [f32]) {
    for (b, out) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = f16_to_f32(b.d);
        let qh = u32::from_le_bytes(b.qh);
        let (lo, hi) = out.split_at_mut(QK / 2);
        for (j, ((&q, lo), hi)) in b.qs.iter().zip(lo).zip(hi).enumerate() {
            let (l0, l1) = levels5(q, qh, j);
            *lo = (l0 as i32 - 16) as f32 * d;
            *hi = (l1 as i32 - 16) as f32 * d;
        }
    }
}

/// ggml `quantize_row_q5_0_ref`: d = max / -16 (max: the value of largest magnitude),
/// levels `min(31, trunc(x / d + 16.5))`.
pub fn quantize(src: &[f32], dst: &mut [BlockQ5_0]) {
    for (x, b) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f32_to_f16(d);
        b.qh = pack5(|i| ((x[i] * id + 16.5) as i8).min(31) as u8, &mut b.qs);
    }
}

/// ggml `ggml_vec_dot_q5_0_q8_0_generic`.
pub fn dot(w: &[BlockQ5_0], a: &[BlockQ8_0]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let qh = u32::from_le_bytes(x.qh);
        let (y0, y1) = y.qs.split_at(QK / 2);
        let mut sumi = 0i32;
        for (j, ((&q, &a0), &a1)) in x.qs.iter().zip(y0).zip(y1).enumerate() {
            let (l0, l1) = levels5(q, qh, j);
            sumi += (l0 as i32 - 16) * a0 as i32 + (l1 as i32 - 16) * a1 as i32;
        }
        sumf += (f16_to_f32(x.d) * f16_to_f32(y.d)) * sumi as f32;
    }
    sumf
}

#[cfg(test)]
mod tests {
    use super::super::util::test_util::{assert_dot_consistent, assert_round_trip};
    use super::super::GgmlType;

    #[test]
    fn round_trip_error_ceiling() {
        // Relative RMS ceiling, about 1.25x what the reference quantizer measures here.
        // Half the step of Q4_0; measured 0.041 on noise.
        assert_round_trip(GgmlType::Q5_0, 0.05);
    }

    #[test]
    fn dot_matches_dequantized_dot() {
        assert_dot_consistent(GgmlType::Q5_0);
    }
}

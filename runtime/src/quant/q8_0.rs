//! Q8_0: blocks of 32 weights, one f16 scale and 32 signed bytes; x = d * q.
//!
//! ```text
//! byte 0..2   d   (f16, little-endian)
//! byte 2..34  qs  (i8 x 32)
//! ```

use super::util::{blocks, blocks_mut, f16_to_f32, f32_to_f16, roundf};
use super::{FormatOps, GgmlType};
use bytemuck::{Pod, Zeroable};

pub const QK: usize = 32;

#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: [u8; 2],
    pub qs: [i8; QK],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

pub static OPS: FormatOps = FormatOps {
    ty: GgmlType::Q8_0,
    dequantize: |s, d| dequantize(blocks(s), d),
    quantize: |s, d| quantize(s, blocks_mut(d)),
    vec_dot_type: GgmlType::Q8_0,
    vec_dot: |w, a| dot(blocks(w), blocks(a)),
};

pub fn dequantize(src: &[BlockQ8_0], dst: &mut [f32]) {
    for (b, out) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = f16_to_f32(b.d);
        for (o, &q) in out.iter_mut().zip(&b.qs) {
            *o = q as f32 * d;
        }
    }
}

/// ggml `quantize_row_q8_0_ref`.
pub fn quantize(src: &[f32], dst: &mut [BlockQ8_0]) {
    for (x, b) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f32_to_f16(d);
        for (q, &v) in b.qs.iter_mut().zip(x) {
            *q = roundf(v * id) as i8;
        }
    }
}

/// ggml `ggml_vec_dot_q8_0_q8_0` (generic): per block, the integer dot times both scales.
pub fn dot(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
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

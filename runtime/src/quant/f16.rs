//! F16: IEEE half floats. As in ggml, activations are rounded to F16 and the dot is
//! accumulated in f32 (`ggml_vec_dot_f16`).

use super::util::{f16_to_f32, f32_to_f16};
use super::{FormatOps, GgmlType};

pub static OPS: FormatOps = FormatOps {
    ty: GgmlType::F16,
    dequantize,
    quantize,
    vec_dot_type: GgmlType::F16,
    vec_dot: dot,
};

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *o = f16_to_f32([b[0], b[1]]);
    }
}

pub fn quantize(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
        b.copy_from_slice(&f32_to_f16(*x));
    }
}

pub fn dot(w: &[u8], a: &[u8]) -> f32 {
    w.chunks_exact(2)
        .zip(a.chunks_exact(2))
        .map(|(x, y)| f16_to_f32([x[0], x[1]]) * f16_to_f32([y[0], y[1]]))
        .sum()
}

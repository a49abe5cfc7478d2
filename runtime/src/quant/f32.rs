//! F32: plain little-endian floats. Activations for F32 weights stay F32.

use super::{FormatOps, GgmlType};

pub static OPS: FormatOps = FormatOps {
    ty: GgmlType::F32,
    dequantize,
    quantize,
    vec_dot_type: GgmlType::F32,
    vec_dot: dot,
};

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

pub fn quantize(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.iter().zip(dst.chunks_exact_mut(4)) {
        b.copy_from_slice(&x.to_le_bytes());
    }
}

/// Both rows are F32 bytes.
pub fn dot(w: &[u8], a: &[u8]) -> f32 {
    w.chunks_exact(4)
        .zip(a.chunks_exact(4))
        .map(|(x, y)| {
            f32::from_le_bytes([x[0], x[1], x[2], x[3]])
                * f32::from_le_bytes([y[0], y[1], y[2], y[3]])
        })
        .sum()
}

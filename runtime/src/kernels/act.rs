//! Activation quantizers: rows of f32 activations into the Q8 formats that the integer dot
//! products take.
//!
//! Activations are never stored, so these need not equal the reference quantizers of
//! `quant/`; they follow what ggml's CPU backend runs on x86 (AVX2 `quantize_row_q8_0` /
//! `quantize_row_q8_1` in ggml-cpu/arch/x86/quants.c), so that sparrow's products see the
//! same integers as llama.cpp's on the same input:
//! - the inverse scale is `127 / amax` (the reference uses `1 / (amax / 127)`, which can
//!   differ in the last bit),
//! - values round half to even (`_mm256_round_ps`; the reference uses `roundf`),
//! - Q8_1's `s` is `d * sum(q)` with `d` in f32 before it is stored as f16.

use crate::quant::q8_0::{BlockQ8_0, QK};
use crate::quant::q8_1::BlockQ8_1;
use crate::quant::util::{blocks_mut, f32_to_f16};

/// Scale and quantized values of one block of 32.
#[inline]
fn block(x: &[f32], q: &mut [i8; QK]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(x) {
        let r = (v * id).round_ties_even() as i32;
        *o = r as i8;
        sum += r;
    }
    (d, sum)
}

pub fn quantize_row_q8_0(x: &[f32], dst: &mut [u8]) {
    let out: &mut [BlockQ8_0] = blocks_mut(dst);
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let (d, _) = block(xb, &mut b.qs);
        b.d = f32_to_f16(d);
    }
}

pub fn quantize_row_q8_1(x: &[f32], dst: &mut [u8]) {
    let out: &mut [BlockQ8_1] = blocks_mut(dst);
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let (d, sum) = block(xb, &mut b.qs);
        b.d = f32_to_f16(d);
        b.s = f32_to_f16(d * sum as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{self, GgmlType};

    /// Within one step of the reference quantizer everywhere, and equal to it away from
    /// rounding ties.
    #[test]
    fn agrees_with_the_reference_up_to_ties() {
        let x: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.173)
            .collect();
        for (ty, f) in [
            (GgmlType::Q8_0, quantize_row_q8_0 as fn(&[f32], &mut [u8])),
            (GgmlType::Q8_1, quantize_row_q8_1),
        ] {
            let n = ty.row_bytes(256).unwrap() as usize;
            let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
            f(&x, &mut a);
            quant::quantize(ty, &x, &mut b).unwrap();
            let (mut da, mut db) = (vec![0f32; 256], vec![0f32; 256]);
            quant::dequantize(ty, &a, &mut da).unwrap();
            quant::dequantize(ty, &b, &mut db).unwrap();
            for (i, (p, q)) in da.iter().zip(&db).enumerate() {
                let step = x[i / 32 * 32..i / 32 * 32 + 32]
                    .iter()
                    .fold(0.0f32, |m, v| m.max(v.abs()))
                    / 127.0;
                assert!((p - q).abs() <= step * 1.01, "{ty} element {i}: {p} vs {q}");
            }
        }
    }
}

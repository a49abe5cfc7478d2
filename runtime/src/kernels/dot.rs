//! Portable dot products for the 32-element block formats, accumulated in the order of
//! ggml's x86 kernels (`ggml_vec_dot_q4_0_q8_0` and friends in ggml-cpu/arch/x86/quants.c,
//! and llamafile's tinyBLAS, which sums the same way):
//!
//! ```text
//! per block:  lane l (0..8) = exact integer sum of elements 4l..4l+3 of x*y  (maddubs+madd / dpbusd)
//!             acc[l] = fma(d_x * d_y, lane l, acc[l])
//! end:        ((acc[0]+acc[4]) + (acc[2]+acc[6])) + ((acc[1]+acc[5]) + (acc[3]+acc[7]))   (hsum_float_8)
//!             + the min terms m_x * s_y summed block by block (Q4_1, Q5_1)
//! ```
//!
//! Q4_0 is the exception: see [`q4_0_q8_0`].
//!
//! The integers are those of the reference dots in `quant/`; only the float summation order
//! differs. Following ggml's order makes sparrow's activations equal llama.cpp's bit for bit
//! in most places, which is what keeps greedy decoding on the same tokens; SIMD kernels that
//! keep this order give the same results as these.

use crate::quant::q4_0::BlockQ4_0;
use crate::quant::q4_1::BlockQ4_1;
use crate::quant::q5_0::BlockQ5_0;
use crate::quant::q5_1::BlockQ5_1;
use crate::quant::q8_0::BlockQ8_0;
use crate::quant::q8_1::BlockQ8_1;
use super::math::fma32;
use crate::quant::util::{blocks, f16_to_f32};

const QK: usize = 32;

/// Lane sums of one block: lane l holds the products of elements 4l..4l+3.
#[inline]
fn lanes(x: &[i8; QK], y: &[i8; QK]) -> [f32; 8] {
    std::array::from_fn(|l| {
        (0..4).map(|k| x[4 * l + k] as i32 * y[4 * l + k] as i32).sum::<i32>() as f32
    })
}

/// `hsum_float_8`: (x[i] + x[4+i]) pairwise, then (0+2), (1+3), then the two.
#[inline]
fn hsum8(a: &[f32; 8]) -> f32 {
    let r: [f32; 4] = std::array::from_fn(|i| a[4 + i] + a[i]);
    (r[0] + r[2]) + (r[1] + r[3])
}

#[inline]
fn accumulate(acc: &mut [f32; 8], d: f32, l: [f32; 8]) {
    for (a, v) in acc.iter_mut().zip(l) {
        *a = fma32(d, v, *a);
    }
}

/// Unpacks 32 nibbles: element j < 16 is the low nibble of byte j, element 16 + j its high one.
#[inline]
fn nibbles(qs: &[u8; 16], offset: i8) -> [i8; QK] {
    std::array::from_fn(|j| if j < 16 { (qs[j] & 0x0F) as i8 - offset } else { (qs[j - 16] >> 4) as i8 - offset })
}

/// Adds the fifth bits (bit j of `qh` belongs to element j).
#[inline]
fn with_high_bits(mut q: [i8; QK], qh: [u8; 4], offset: i8) -> [i8; QK] {
    let h = u32::from_le_bytes(qh);
    for (j, v) in q.iter_mut().enumerate() {
        *v += ((((h >> j) & 1) << 4) as i8) - offset;
    }
    q
}

pub fn q8_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (x, y) in blocks::<BlockQ8_0>(w).iter().zip(blocks::<BlockQ8_0>(a)) {
        accumulate(&mut acc, f16_to_f32(x.d) * f16_to_f32(y.d), lanes(&x.qs, &y.qs));
    }
    hsum8(&acc)
}

/// Q4_0 weights are repacked by llama.cpp on x86 (`ggml_gemv_q4_0_8x8_q8_0` and
/// `ggml_gemm_...` in ggml-cpu/repack.cpp), which sum each block's products as one integer
/// and accumulate blocks in order: `acc = fma(isum_b, d_w * d_a, acc)`.
pub fn q4_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = 0.0f32;
    for (x, y) in blocks::<BlockQ4_0>(w).iter().zip(blocks::<BlockQ8_0>(a)) {
        let l = lanes(&nibbles(&x.qs, 8), &y.qs);
        let isum: f32 = l.iter().sum();
        acc = fma32(isum, f16_to_f32(x.d) * f16_to_f32(y.d), acc);
    }
    acc
}

pub fn q4_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut summs = 0.0f32;
    for (x, y) in blocks::<BlockQ4_1>(w).iter().zip(blocks::<BlockQ8_1>(a)) {
        summs += f16_to_f32(x.m) * f16_to_f32(y.s);
        accumulate(&mut acc, f16_to_f32(x.d) * f16_to_f32(y.d), lanes(&nibbles(&x.qs, 0), &y.qs));
    }
    hsum8(&acc) + summs
}

pub fn q5_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (x, y) in blocks::<BlockQ5_0>(w).iter().zip(blocks::<BlockQ8_0>(a)) {
        let q = with_high_bits(nibbles(&x.qs, 0), x.qh, 16);
        accumulate(&mut acc, f16_to_f32(x.d) * f16_to_f32(y.d), lanes(&q, &y.qs));
    }
    hsum8(&acc)
}

pub fn q5_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut summs = 0.0f32;
    for (x, y) in blocks::<BlockQ5_1>(w).iter().zip(blocks::<BlockQ8_1>(a)) {
        summs += f16_to_f32(x.m) * f16_to_f32(y.s);
        let q = with_high_bits(nibbles(&x.qs, 0), x.qh, 0);
        accumulate(&mut acc, f16_to_f32(x.d) * f16_to_f32(y.d), lanes(&q, &y.qs));
    }
    hsum8(&acc) + summs
}

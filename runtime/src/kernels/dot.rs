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
//! The K-quants (Q4_K, Q5_K, Q6_K against Q8_K) follow further down the kernels llama.cpp
//! picks for them on x86: the repacked Q4_K gemv / gemm, the AVX2 `ggml_vec_dot_q{5,6}_K_q8_K`
//! for one token, and the tiled K-quant matmul for batches of 8 or more (`DotKernel::dot_for` in kernels/mod.rs).
//!
//! The integers are those of the reference dots in `quant/`; only the float summation order
//! differs. Following ggml's order makes sparrow's activations equal llama.cpp's bit for bit
//! in most places, which is what keeps greedy decoding on the same tokens; SIMD kernels that
//! keep this order give the same results as these.

use super::math::fma32;
use crate::quant::kquant::{get_scale_min_k4, QK_K};
use crate::quant::q4_0::BlockQ4_0;
use crate::quant::q4_1::BlockQ4_1;
use crate::quant::q4_k::BlockQ4K;
use crate::quant::q5_0::BlockQ5_0;
use crate::quant::q5_1::BlockQ5_1;
use crate::quant::q5_k::BlockQ5K;
use crate::quant::q6_k::BlockQ6K;
use crate::quant::q8_0::BlockQ8_0;
use crate::quant::q8_1::BlockQ8_1;
use crate::quant::q8_k::BlockQ8K;
use crate::quant::util::{blocks, f16_to_f32};

const QK: usize = 32;

/// Lane sums of one block: lane l holds the products of elements 4l..4l+3.
#[inline]
fn lanes(x: &[i8; QK], y: &[i8; QK]) -> [f32; 8] {
    std::array::from_fn(|l| {
        (0..4)
            .map(|k| x[4 * l + k] as i32 * y[4 * l + k] as i32)
            .sum::<i32>() as f32
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
    std::array::from_fn(|j| {
        if j < 16 {
            (qs[j] & 0x0F) as i8 - offset
        } else {
            (qs[j - 16] >> 4) as i8 - offset
        }
    })
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
        accumulate(
            &mut acc,
            f16_to_f32(x.d) * f16_to_f32(y.d),
            lanes(&x.qs, &y.qs),
        );
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
        accumulate(
            &mut acc,
            f16_to_f32(x.d) * f16_to_f32(y.d),
            lanes(&nibbles(&x.qs, 0), &y.qs),
        );
    }
    hsum8(&acc) + summs
}

pub fn q5_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (x, y) in blocks::<BlockQ5_0>(w).iter().zip(blocks::<BlockQ8_0>(a)) {
        let q = with_high_bits(nibbles(&x.qs, 0), x.qh, 16);
        accumulate(
            &mut acc,
            f16_to_f32(x.d) * f16_to_f32(y.d),
            lanes(&q, &y.qs),
        );
    }
    hsum8(&acc)
}

pub fn q5_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut summs = 0.0f32;
    for (x, y) in blocks::<BlockQ5_1>(w).iter().zip(blocks::<BlockQ8_1>(a)) {
        summs += f16_to_f32(x.m) * f16_to_f32(y.s);
        let q = with_high_bits(nibbles(&x.qs, 0), x.qh, 0);
        accumulate(
            &mut acc,
            f16_to_f32(x.d) * f16_to_f32(y.d),
            lanes(&q, &y.qs),
        );
    }
    hsum8(&acc) + summs
}

/// F16 x F16 in the order of `ggml_vec_dot_f16` (AVX-512 build): 4 accumulators of 16 lanes
/// over steps of 64 elements (element i into lane i % 64), folded (0+2) + (1+3) and reduced
/// as `_mm512_reduce_add_ps`; the elements after the last whole step are added one by one
/// in f64, and the f64 sum is rounded to f32 at the end.
pub fn f16_f16(w: &[u8], a: &[u8]) -> f32 {
    let h = |b: &[u8], i: usize| f16_to_f32([b[2 * i], b[2 * i + 1]]);
    let n = w.len().min(a.len()) / 2;
    let np = n / 64 * 64;
    let mut acc = [0.0f32; 64];
    for i in 0..np {
        acc[i % 64] = fma32(h(w, i), h(a, i), acc[i % 64]);
    }
    let t: [f32; 16] =
        std::array::from_fn(|l| (acc[l] + acc[32 + l]) + (acc[16 + l] + acc[48 + l]));
    let mut sum = super::math::reduce_add16(&t) as f64;
    for i in np..n {
        sum += (h(w, i) * h(a, i)) as f64;
    }
    sum as f32
}

// ---------------------------------------------------------------------------------------------
// K-quants: super-blocks of 256 weights against Q8_K activations.
//
// Q8_K activations: ggml's CPU backend makes them with `quantize_row_q8_K`, which on x86 is
// `quantize_row_q8_K_ref` itself (arch/x86/quants.c), i.e. sparrow's `quant::q8_k::quantize`.
// The repacked Q4_K gemm quantizes groups of 4 rows with `ggml_quantize_mat_q8_K_4x8`
// (arch/x86/repack.cpp); it differs from the reference only when a block holds both +amax
// and -amax (it then takes the positive one as `max`, the reference the first one), which
// negates every quant, every bsum and d together: the products come out bit for bit the same.
// So the format's own quantizer is the x86 one for every K-quant entry.
//
// Integer sums are exact (the i16 stages of ggml's maddubs chains cannot overflow for these
// ranges), so only the grouping of the integers before conversion to f32 and the order of the
// float operations below matter.
// ---------------------------------------------------------------------------------------------

#[inline]
fn q8k_d(y: &BlockQ8K) -> f32 {
    f32::from_le_bytes(y.d)
}

/// Sum of the 16 activations of group `g` (0..16).
#[inline]
fn q8k_bsum(y: &BlockQ8K, g: usize) -> i32 {
    i16::from_le_bytes(y.bsums[g]) as i32
}

/// Sum of the 32 activations of sub-block `j` (0..8): `_mm_hadd_epi16` of the bsums.
#[inline]
fn q8k_bsum32(y: &BlockQ8K, j: usize) -> i32 {
    q8k_bsum(y, 2 * j) + q8k_bsum(y, 2 * j + 1)
}

/// Q4_K level (0..16) of element i (0..32) of sub-block j: qs[32 (j/2) + i], low nibble for
/// even j, high for odd.
#[inline]
fn q4k_level(x: &BlockQ4K, j: usize, i: usize) -> i32 {
    let b = x.qs[32 * (j / 2) + i];
    (if j.is_multiple_of(2) { b & 0xF } else { b >> 4 }) as i32
}

/// Sub-block j of a Q4_K block against its activations: (sc_j * sum(q * y), m_j * sum(y)).
#[inline]
fn q4k_sub(x: &BlockQ4K, y: &BlockQ8K, j: usize) -> (i32, i32) {
    let (sc, m) = get_scale_min_k4(j, &x.scales);
    let dot: i32 = (0..32)
        .map(|i| q4k_level(x, j, i) * y.qs[32 * j + i] as i32)
        .sum();
    (sc as i32 * dot, m as i32 * q8k_bsum32(y, j))
}

/// Q4_K x Q8_K as llama.cpp computes it for one activation row. On x86 (AVX2) llama.cpp
/// repacks Q4_K weights with rows % 8 == 0 into `block_q4_Kx8` (repack.cpp,
/// `ggml_repack_get_optimal_repack_type`), and a row of activations that is not part of a
/// group of four (every decode step; the last `n % 4` tokens of a batch) goes through
/// `ggml_gemv_q4_K_8x8_q8_K` (arch/x86/repack.cpp): one integer per super-block for the
/// scales and one for the mins, each fma'd into its own accumulator:
///
/// ```text
/// per super-block:  I = sum_j sc_j * sum_i q_ji * y_ji          M = sum_j m_j * bsum32_j   (i32)
///                   acc  = fma(I as f32, d_x * d_y,    acc)
///                   accm = fma(M as f32, dmin_x * d_y, accm)
/// end:              acc - accm
/// ```
pub fn q4_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let (mut acc, mut accm) = (0.0f32, 0.0f32);
    for (x, y) in blocks::<BlockQ4K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let (mut isum, mut imin) = (0i32, 0i32);
        for j in 0..QK_K / 32 {
            let (s, m) = q4k_sub(x, y, j);
            isum += s;
            imin += m;
        }
        let dy = q8k_d(y);
        acc = fma32(isum as f32, f16_to_f32(x.d) * dy, acc);
        accm = fma32(imin as f32, f16_to_f32(x.dmin) * dy, accm);
    }
    acc - accm
}

/// Q4_K x Q8_K for the rows of a batch that llama.cpp's repacked kernel takes four at a time
/// (`ggml_gemm_q4_K_8x8_q8_K`, arch/x86/repack.cpp, AVX-512 and AVX2 branches alike: the
/// first `n - n % 4` tokens of a batch of `n >= 4`). As [`q4_k_q8_k`], but the fma's happen
/// once per pair of sub-blocks (the kernel's `sb` loop) instead of once per super-block:
///
/// ```text
/// per super-block, sb = 0..4:  I = sc_2sb * dot_2sb + sc_2sb+1 * dot_2sb+1
///                              M = m_2sb * bsum32_2sb + m_2sb+1 * bsum32_2sb+1
///                              acc  = fma(I as f32, d_x * d_y,    acc)
///                              accm = fma(M as f32, dmin_x * d_y, accm)
/// end:                         acc - accm
/// ```
pub fn q4_k_q8_k_gemm(w: &[u8], a: &[u8]) -> f32 {
    let (mut acc, mut accm) = (0.0f32, 0.0f32);
    for (x, y) in blocks::<BlockQ4K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let dy = q8k_d(y);
        let (d, dmin) = (f16_to_f32(x.d) * dy, f16_to_f32(x.dmin) * dy);
        for sb in 0..QK_K / 64 {
            let (s0, m0) = q4k_sub(x, y, 2 * sb);
            let (s1, m1) = q4k_sub(x, y, 2 * sb + 1);
            acc = fma32((s0 + s1) as f32, d, acc);
            accm = fma32((m0 + m1) as f32, dmin, accm);
        }
    }
    acc - accm
}

/// Q5_K level (0..32) of element i of sub-block j: the Q4_K nibble plus bit j of qh[i].
#[inline]
fn q5k_level(x: &BlockQ5K, j: usize, i: usize) -> i32 {
    let b = x.qs[32 * (j / 2) + i];
    let lo = if j.is_multiple_of(2) { b & 0xF } else { b >> 4 };
    (lo | (((x.qh[i] >> j) & 1) << 4)) as i32
}

/// Q5_K x Q8_K in the order of `ggml_vec_dot_q5_K_q8_K` (arch/x86/quants.c, AVX2 branch;
/// llama.cpp repacks Q5_K only on ARM): 8 int lanes per super-block, lane l holding elements
/// 4l..4l+3 of every sub-block times its scale; the mins go into a scalar, fused (GCC
/// contracts `summs += dmin * M`: vfmadd231ss in llama-cpp-python's libggml-cpu.so).
///
/// ```text
/// per super-block:  lane l = sum_j sc_j * sum_{i=4l..4l+3} q_ji * y_ji                   (i32)
///                   acc[l] = fma(d_y * d_x, lane l, acc[l])
///                   summs  = fma(-d_y * dmin_x, sum_j m_j * bsum32_j, summs)
/// end:              hsum_float_8(acc) + summs
/// ```
pub fn q5_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut summs = 0.0f32;
    for (x, y) in blocks::<BlockQ5K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let dy = q8k_d(y);
        let d = dy * f16_to_f32(x.d);
        let dmin = -dy * f16_to_f32(x.dmin);
        let mut mins = 0i32;
        let mut lane = [0i32; 8];
        for j in 0..QK_K / 32 {
            let (sc, m) = get_scale_min_k4(j, &x.scales);
            mins += m as i32 * q8k_bsum32(y, j);
            for (l, v) in lane.iter_mut().enumerate() {
                let s: i32 = (4 * l..4 * l + 4)
                    .map(|i| q5k_level(x, j, i) * y.qs[32 * j + i] as i32)
                    .sum();
                *v += sc as i32 * s;
            }
        }
        summs = fma32(dmin, mins as f32, summs);
        accumulate(&mut acc, d, lane.map(|v| v as f32));
    }
    hsum8(&acc) + summs
}

/// Q6_K level (0..64, before the -32) of element e (0..256): in each half of 128, element
/// 32 g + l has its low nibble in ql[64 half + 32 (g % 2) + l] (low for g < 2, high after)
/// and its high bits at bits 2g..2g+2 of qh[32 half + l].
#[inline]
fn q6k_level(x: &BlockQ6K, e: usize) -> i32 {
    let (half, p) = (e / 128, e % 128);
    let (g, l) = (p / 32, p % 32);
    let ql = x.ql[64 * half + 32 * (g % 2) + l];
    let low = if g < 2 { ql & 0xF } else { ql >> 4 };
    let high = (x.qh[32 * half + l] >> (2 * g)) & 3;
    (low | (high << 4)) as i32
}

/// Q6_K x Q8_K in the order of `ggml_vec_dot_q6_K_q8_K` (arch/x86/quants.c, AVX2 branch;
/// llama.cpp repacks Q6_K only on ARM). The levels enter unsigned (0..64) and the -32 comes
/// back through the bsums, lane by lane (`q8sclsub`):
///
/// ```text
/// per super-block:  lane l = sum over the 8 chunks c of 32: sc[(32c + 4l) / 16] * sum_{e=32c+4l..+3} q_e * y_e
///                            - 32 * (bsum[2l] * sc[2l] + bsum[2l+1] * sc[2l+1])        (i32)
///                   acc[l] = fma(d_y * d_x, lane l, acc[l])
/// end:              hsum_float_8(acc)
/// ```
pub fn q6_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (x, y) in blocks::<BlockQ6K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let d = q8k_d(y) * f16_to_f32(x.d);
        let sc = |g: usize| x.scales[g] as i32;
        let mut lane: [i32; 8] = std::array::from_fn(|l| {
            -32 * (q8k_bsum(y, 2 * l) * sc(2 * l) + q8k_bsum(y, 2 * l + 1) * sc(2 * l + 1))
        });
        for c in 0..QK_K / 32 {
            for (l, v) in lane.iter_mut().enumerate() {
                let e0 = 32 * c + 4 * l;
                let s: i32 = (e0..e0 + 4).map(|e| q6k_level(x, e) * y.qs[e] as i32).sum();
                *v += sc(e0 / 16) * s;
            }
        }
        accumulate(&mut acc, d, lane.map(|v| v as f32));
    }
    hsum8(&acc)
}

/// Q6_K x Q8_K as llama.cpp's tiled K-quant matmul computes it (ggml-cpu/tiled/, taken by
/// `ggml_compute_forward_mul_mat` before everything else when the batch has >= 8 tokens and
/// the weights are not repacked; AVX-512 VNNI kernel `tiled_run_micro_vnni_8x16`): one integer
/// per super-block, the -32 applied through the bsums, the weight scale applied by a multiply
/// and the activation scale by an fma into the row's accumulator (GCC contracts the kernel's
/// `buf + result * d1` into vfmadd213ps):
///
/// ```text
/// per super-block:  I = sum_s sc_s * (sum_{e in s} q_e * y_e - 32 * bsum_s)       (i32, s = 16 groups of 16)
///                   acc = fma(I as f32 * d_x, d_y, acc)
/// end:              acc
/// ```
pub fn q6_k_q8_k_tiled(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = 0.0f32;
    for (x, y) in blocks::<BlockQ6K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let mut isum = 0i32;
        for s in 0..QK_K / 16 {
            let raw: i32 = (16 * s..16 * s + 16)
                .map(|e| q6k_level(x, e) * y.qs[e] as i32)
                .sum();
            isum += x.scales[s] as i32 * (raw - 32 * q8k_bsum(y, s));
        }
        acc = fma32(isum as f32 * f16_to_f32(x.d), q8k_d(y), acc);
    }
    acc
}

/// The tiled form for the formats with mins (Q4_K, Q5_K): `level(x, j, i)` is the weight level
/// of element i of sub-block j.
///
/// ```text
/// per super-block:  I = sum_j sc_j * sum_i q_ji * y_ji      M = sum_j m_j * bsum32_j   (i32)
///                   r = fma(-dmin_x, M as f32, I as f32 * d_x)       (_mm512_fnmadd_ps)
///                   acc = fma(r, d_y, acc)
/// end:              acc
/// ```
#[inline]
fn tiled_with_mins<B>(
    x: &[B],
    y: &[BlockQ8K],
    parts: impl Fn(&B) -> (f32, f32, [u8; 12]),
    level: impl Fn(&B, usize, usize) -> i32,
) -> f32 {
    let mut acc = 0.0f32;
    for (x, y) in x.iter().zip(y) {
        let (d, dmin, scales) = parts(x);
        let (mut isum, mut imin) = (0i32, 0i32);
        for j in 0..QK_K / 32 {
            let (sc, m) = get_scale_min_k4(j, &scales);
            let raw: i32 = (0..32)
                .map(|i| level(x, j, i) * y.qs[32 * j + i] as i32)
                .sum();
            isum += sc as i32 * raw;
            imin += m as i32 * q8k_bsum32(y, j);
        }
        let r = fma32(-dmin, imin as f32, isum as f32 * d);
        acc = fma32(r, q8k_d(y), acc);
    }
    acc
}

/// Q5_K x Q8_K in llama.cpp's tiled K-quant matmul (batches of >= 8 tokens; see
/// [`q6_k_q8_k_tiled`] and `tiled_with_mins`).
pub fn q5_k_q8_k_tiled(w: &[u8], a: &[u8]) -> f32 {
    tiled_with_mins(
        blocks::<BlockQ5K>(w),
        blocks::<BlockQ8K>(a),
        |x| (f16_to_f32(x.d), f16_to_f32(x.dmin), x.scales),
        q5k_level,
    )
}

/// Q4_K x Q8_K in llama.cpp's tiled K-quant matmul: only for Q4_K weights that are not
/// repacked (rows % 8 != 0) in batches of >= 8 tokens.
pub fn q4_k_q8_k_tiled(w: &[u8], a: &[u8]) -> f32 {
    tiled_with_mins(
        blocks::<BlockQ4K>(w),
        blocks::<BlockQ8K>(a),
        |x| (f16_to_f32(x.d), f16_to_f32(x.dmin), x.scales),
        q4k_level,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::VecDotFn;
    use crate::quant::{self, GgmlType};

    /// Every K-quant order computes the same dot as the format's reference, up to rounding.
    #[test]
    fn k_quant_orders_agree_with_the_reference() {
        let cols = 512;
        let w: Vec<f32> = (0..cols)
            .map(|i| ((i * 7919 % 263) as f32 - 131.0) * 0.0113)
            .collect();
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 104729 % 251) as f32 - 125.0) * 0.0271)
            .collect();
        let mut act = vec![0u8; GgmlType::Q8_K.row_bytes(cols as u64).unwrap() as usize];
        quant::quantize(GgmlType::Q8_K, &x, &mut act).unwrap();
        let cases: [(GgmlType, &[VecDotFn]); 3] = [
            (
                GgmlType::Q4_K,
                &[q4_k_q8_k, q4_k_q8_k_gemm, q4_k_q8_k_tiled],
            ),
            (GgmlType::Q5_K, &[q5_k_q8_k, q5_k_q8_k_tiled]),
            (GgmlType::Q6_K, &[q6_k_q8_k, q6_k_q8_k_tiled]),
        ];
        for (ty, fs) in cases {
            let mut wq = vec![0u8; ty.row_bytes(cols as u64).unwrap() as usize];
            quant::quantize(ty, &w, &mut wq).unwrap();
            let want = (quant::ops(ty).unwrap().vec_dot)(&wq, &act);
            for (i, f) in fs.iter().enumerate() {
                let got = f(&wq, &act);
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{ty} order {i}: {got} vs {want}"
                );
            }
        }
    }
}

//! NEON / dotprod kernels for the K-quants (Q4_K, Q5_K, Q6_K against Q8_K activations).
//!
//! The integer parts are computed 16 elements at a time ([`Isa::dot4`]: i32 lane l holds the
//! products of elements 4l..4l+3), times the sub-block's scale (`mla`), and are exact (see
//! the bounds in `kernels/dot.rs`); the float steps follow the portable orders of
//! `kernels/dot.rs` one for one: the per-token order, the repacked Q4_K gemm order and the
//! tiled order.

use super::neon::{entries, fp16, ld_i8, ld_u8, s8, Acc8, Isa};
use crate::quant::kquant::{get_scale_min_k4, QK_K};
use crate::quant::q4_k::BlockQ4K;
use crate::quant::q5_k::BlockQ5K;
use crate::quant::q6_k::BlockQ6K;
use crate::quant::q8_k::BlockQ8K;
use crate::quant::util::blocks;
use std::arch::aarch64::*;

const _: () = assert!(QK_K == 256);

#[inline(always)]
fn q8k_d(y: &BlockQ8K) -> f32 {
    f32::from_le_bytes(y.d)
}

/// Sum of the 32 activations of sub-block j (two bsums of 16).
#[inline(always)]
fn bsum32(y: &BlockQ8K, j: usize) -> i32 {
    i16::from_le_bytes(y.bsums[2 * j]) as i32 + i16::from_le_bytes(y.bsums[2 * j + 1]) as i32
}

/// The six-bit scales and mins of a Q4_K / Q5_K super-block, and `sum_j m_j * bsum32_j`.
#[inline(always)]
fn scales_mins(scales: &[u8; 12], y: &BlockQ8K) -> ([i32; 8], i32) {
    let mut sc = [0i32; 8];
    let mut mins = 0i32;
    for (j, s) in sc.iter_mut().enumerate() {
        let (a, m) = get_scale_min_k4(j, scales);
        *s = a as i32;
        mins += m as i32 * bsum32(y, j);
    }
    (sc, mins)
}

/// The activations of elements 32 j .. 32 j + 32 as two vectors of 16.
#[inline(always)]
unsafe fn act32(y: &BlockQ8K, j: usize) -> (int8x16_t, int8x16_t) {
    let p = y.qs.as_ptr().add(32 * j);
    (ld_i8(p), ld_i8(p.add(16)))
}

/// `sc * (x . y)` over the 32 elements of one sub-block, as 8 lane-structured i32 (lanes
/// 0..3 from elements 0..15, 4..7 from 16..31), added to `s`.
#[inline(always)]
unsafe fn scaled<I: Isa>(
    s: (int32x4_t, int32x4_t),
    q: (uint8x16_t, uint8x16_t),
    y: (int8x16_t, int8x16_t),
    sc: i32,
) -> (int32x4_t, int32x4_t) {
    let z = vdupq_n_s32(0);
    (
        vmlaq_n_s32(s.0, I::dot4(z, s8(q.0), y.0), sc),
        vmlaq_n_s32(s.1, I::dot4(z, s8(q.1), y.1), sc),
    )
}

#[inline(always)]
fn zero2() -> (int32x4_t, int32x4_t) {
    unsafe { (vdupq_n_s32(0), vdupq_n_s32(0)) }
}

#[inline(always)]
unsafe fn total(s: (int32x4_t, int32x4_t)) -> i32 {
    vaddvq_s32(vaddq_s32(s.0, s.1))
}

// ---- Q4_K ----------------------------------------------------------------------------------

/// Q4_K: the scaled lanes of the two sub-blocks 2p, 2p+1 of pair p (0..4), added to `s`.
#[inline(always)]
unsafe fn q4k_pair<I: Isa>(
    s: (int32x4_t, int32x4_t),
    x: &BlockQ4K,
    y: &BlockQ8K,
    sc: (i32, i32),
    p: usize,
) -> (int32x4_t, int32x4_t) {
    let q = x.qs.as_ptr().add(32 * p);
    let (q0, q1) = (ld_u8(q), ld_u8(q.add(16)));
    let m4 = vdupq_n_u8(0x0F);
    let lo = (vandq_u8(q0, m4), vandq_u8(q1, m4));
    let hi = (vshrq_n_u8::<4>(q0), vshrq_n_u8::<4>(q1));
    let s = scaled::<I>(s, lo, act32(y, 2 * p), sc.0);
    scaled::<I>(s, hi, act32(y, 2 * p + 1), sc.1)
}

/// `I = sum_j sc_j * dot_j` of a Q4_K super-block.
#[inline(always)]
unsafe fn q4k_isum<I: Isa>(x: &BlockQ4K, y: &BlockQ8K, sc: &[i32; 8]) -> i32 {
    let mut s = zero2();
    for p in 0..4 {
        s = q4k_pair::<I>(s, x, y, (sc[2 * p], sc[2 * p + 1]), p);
    }
    total(s)
}

#[inline(always)]
unsafe fn q4_k_imp<I: Isa>(w: &[u8], a: &[u8]) -> f32 {
    let (mut acc, mut accm) = (0.0f32, 0.0f32);
    for (x, y) in blocks::<BlockQ4K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let (sc, mins) = scales_mins(&x.scales, y);
        let isum = q4k_isum::<I>(x, y, &sc);
        let dy = q8k_d(y);
        acc = (isum as f32).mul_add(fp16(x.d) * dy, acc);
        accm = (mins as f32).mul_add(fp16(x.dmin) * dy, accm);
    }
    acc - accm
}

#[inline(always)]
unsafe fn q4_k_gemm_imp<I: Isa>(w: &[u8], a: &[u8]) -> f32 {
    let (mut acc, mut accm) = (0.0f32, 0.0f32);
    for (x, y) in blocks::<BlockQ4K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let dy = q8k_d(y);
        let (d, dmin) = (fp16(x.d) * dy, fp16(x.dmin) * dy);
        for p in 0..4 {
            let (a0, m0) = get_scale_min_k4(2 * p, &x.scales);
            let (a1, m1) = get_scale_min_k4(2 * p + 1, &x.scales);
            let m = m0 as i32 * bsum32(y, 2 * p) + m1 as i32 * bsum32(y, 2 * p + 1);
            let i = total(q4k_pair::<I>(zero2(), x, y, (a0 as i32, a1 as i32), p));
            acc = (i as f32).mul_add(d, acc);
            accm = (m as f32).mul_add(dmin, accm);
        }
    }
    acc - accm
}

/// The tiled order for formats with mins, one super-block: `r = fma(-dmin_x, M, I * d_x)`,
/// `acc = fma(r, d_y, acc)`.
#[inline(always)]
fn tiled_step(acc: f32, isum: i32, imin: i32, d: f32, dmin: f32, dy: f32) -> f32 {
    let r = (-dmin).mul_add(imin as f32, isum as f32 * d);
    r.mul_add(dy, acc)
}

#[inline(always)]
unsafe fn q4_k_tiled_imp<I: Isa>(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = 0.0f32;
    for (x, y) in blocks::<BlockQ4K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let (sc, mins) = scales_mins(&x.scales, y);
        let isum = q4k_isum::<I>(x, y, &sc);
        acc = tiled_step(acc, isum, mins, fp16(x.d), fp16(x.dmin), q8k_d(y));
    }
    acc
}

// ---- Q5_K ----------------------------------------------------------------------------------

/// Q5_K: the lane-structured scaled products of a whole super-block (lane l: elements
/// 4l..4l+3 of every sub-block, times its scale).
#[inline(always)]
unsafe fn q5k_lanes<I: Isa>(x: &BlockQ5K, y: &BlockQ8K, sc: &[i32; 8]) -> (int32x4_t, int32x4_t) {
    let m4 = vdupq_n_u8(0x0F);
    let b5 = vdupq_n_u8(0x10);
    // Bit j of qh[i] is the fifth bit of element i of sub-block j: shifted right by one per
    // sub-block, bit 0 moved to bit 4.
    let mut h = (ld_u8(x.qh.as_ptr()), ld_u8(x.qh.as_ptr().add(16)));
    let mut s = zero2();
    for p in 0..4 {
        let q = x.qs.as_ptr().add(32 * p);
        let (q0, q1) = (ld_u8(q), ld_u8(q.add(16)));
        let nibs = [
            (vandq_u8(q0, m4), vandq_u8(q1, m4)),
            (vshrq_n_u8::<4>(q0), vshrq_n_u8::<4>(q1)),
        ];
        for (half, n) in nibs.into_iter().enumerate() {
            let j = 2 * p + half;
            let q5 = (
                vorrq_u8(n.0, vandq_u8(vshlq_n_u8::<4>(h.0), b5)),
                vorrq_u8(n.1, vandq_u8(vshlq_n_u8::<4>(h.1), b5)),
            );
            s = scaled::<I>(s, q5, act32(y, j), sc[j]);
            h = (vshrq_n_u8::<1>(h.0), vshrq_n_u8::<1>(h.1));
        }
    }
    s
}

#[inline(always)]
unsafe fn q5_k_imp<I: Isa>(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = Acc8::zero();
    let mut summs = 0.0f32;
    for (x, y) in blocks::<BlockQ5K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let dy = q8k_d(y);
        let d = dy * fp16(x.d);
        let dmin = -dy * fp16(x.dmin);
        let (sc, mins) = scales_mins(&x.scales, y);
        let (lo, hi) = q5k_lanes::<I>(x, y, &sc);
        summs = dmin.mul_add(mins as f32, summs);
        acc.fma(d, lo, hi);
    }
    acc.hsum() + summs
}

#[inline(always)]
unsafe fn q5_k_tiled_imp<I: Isa>(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = 0.0f32;
    for (x, y) in blocks::<BlockQ5K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let (sc, mins) = scales_mins(&x.scales, y);
        let isum = total(q5k_lanes::<I>(x, y, &sc));
        acc = tiled_step(acc, isum, mins, fp16(x.d), fp16(x.dmin), q8k_d(y));
    }
    acc
}

// ---- Q6_K ----------------------------------------------------------------------------------

/// Q6_K: lane l = sum over the 8 chunks c of 32 of sc[(32c + 4l) / 16] * (products of
/// elements 32c+4l..+3, levels 0..64), minus 32 * (bsum[2l] sc[2l] + bsum[2l+1] sc[2l+1])
/// (see `dot::q6_k_q8_k`).
#[inline(always)]
unsafe fn q6k_lanes<I: Isa>(x: &BlockQ6K, y: &BlockQ8K) -> (int32x4_t, int32x4_t) {
    let m4 = vdupq_n_u8(0x0F);
    let m2 = vdupq_n_u8(0x03);
    let m30 = vdupq_n_u8(0x30);
    let z = vdupq_n_s32(0);
    let (mut s0, mut s1) = (z, z);
    for h in 0..2 {
        let ql = x.ql.as_ptr().add(64 * h);
        let qh = x.qh.as_ptr().add(32 * h);
        // Two vectors per 32 bytes: (elements 0..15, 16..31) of each chunk.
        let ql0 = (ld_u8(ql), ld_u8(ql.add(16)));
        let ql1 = (ld_u8(ql.add(32)), ld_u8(ql.add(48)));
        let qhv = (ld_u8(qh), ld_u8(qh.add(16)));
        // Chunk g (0..4) of this half: low nibble from ql0 / ql1 (g = 0, 1) or high nibble
        // (g = 2, 3), high bits 2g..2g+2 of qh, placed at bits 4..6.
        let level = |g: usize, k: usize| {
            let src = [ql0, ql1][g & 1];
            let (l, hb) = if k == 0 {
                (src.0, qhv.0)
            } else {
                (src.1, qhv.1)
            };
            let low = if g < 2 {
                vandq_u8(l, m4)
            } else {
                vshrq_n_u8::<4>(l)
            };
            let high = match g {
                0 => vshlq_n_u8::<4>(vandq_u8(hb, m2)),
                1 => vandq_u8(vshlq_n_u8::<2>(hb), m30),
                2 => vandq_u8(hb, m30),
                _ => vandq_u8(vshrq_n_u8::<2>(hb), m30),
            };
            s8(vorrq_u8(low, high))
        };
        for g in 0..4 {
            let c = 4 * h + g;
            let (y0, y1) = act32(y, c);
            s0 = vmlaq_n_s32(s0, I::dot4(z, level(g, 0), y0), x.scales[2 * c] as i32);
            s1 = vmlaq_n_s32(s1, I::dot4(z, level(g, 1), y1), x.scales[2 * c + 1] as i32);
        }
    }
    // bsums . scales pairwise: lane l = bsum[2l] sc[2l] + bsum[2l+1] sc[2l+1].
    // (bsums are little-endian i16 stored as bytes: loaded as bytes, no alignment needed.)
    let bs = y.bsums.as_ptr() as *const u8;
    let (b0, b1) = (
        vreinterpretq_s16_u8(ld_u8(bs)),
        vreinterpretq_s16_u8(ld_u8(bs.add(16))),
    );
    let sc = vld1q_s8(x.scales.as_ptr());
    let (c0, c1) = (vmovl_s8(vget_low_s8(sc)), vmovl_high_s8(sc));
    let corr0 = vpaddq_s32(
        vmull_s16(vget_low_s16(b0), vget_low_s16(c0)),
        vmull_high_s16(b0, c0),
    );
    let corr1 = vpaddq_s32(
        vmull_s16(vget_low_s16(b1), vget_low_s16(c1)),
        vmull_high_s16(b1, c1),
    );
    (
        vsubq_s32(s0, vshlq_n_s32::<5>(corr0)),
        vsubq_s32(s1, vshlq_n_s32::<5>(corr1)),
    )
}

#[inline(always)]
unsafe fn q6_k_imp<I: Isa>(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = Acc8::zero();
    for (x, y) in blocks::<BlockQ6K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let d = q8k_d(y) * fp16(x.d);
        let (lo, hi) = q6k_lanes::<I>(x, y);
        acc.fma(d, lo, hi);
    }
    acc.hsum()
}

#[inline(always)]
unsafe fn q6_k_tiled_imp<I: Isa>(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = 0.0f32;
    for (x, y) in blocks::<BlockQ6K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let isum = total(q6k_lanes::<I>(x, y));
        acc = (isum as f32 * fp16(x.d)).mul_add(q8k_d(y), acc);
    }
    acc
}

entries! {
    q4_k_q8_k, q4_k_q8_k_sdot => q4_k_imp;
    q4_k_q8_k_gemm, q4_k_q8_k_gemm_sdot => q4_k_gemm_imp;
    q4_k_q8_k_tiled, q4_k_q8_k_tiled_sdot => q4_k_tiled_imp;
    q5_k_q8_k, q5_k_q8_k_sdot => q5_k_imp;
    q5_k_q8_k_tiled, q5_k_q8_k_tiled_sdot => q5_k_tiled_imp;
    q6_k_q8_k, q6_k_q8_k_sdot => q6_k_imp;
    q6_k_q8_k_tiled, q6_k_q8_k_tiled_sdot => q6_k_tiled_imp;
}

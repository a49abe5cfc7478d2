//! AVX2 kernels for the K-quants (Q4_K, Q5_K, Q6_K against Q8_K activations).
//!
//! The integer parts are computed 32 elements at a time (`maddubs` then `madd` with the
//! sub-block's scale, so i32 lane l holds scale times the products of elements 4l..4l+3) and
//! are exact; the float steps follow the portable orders in `kernels/dot.rs` one for one:
//! the per-token order, the repacked Q4_K gemm order and the tiled order.

use super::avx2::{fp16, hsum4x8, hsum_float_8, hsum_i32_8};
use crate::quant::kquant::{get_scale_min_k4, QK_K};
use crate::quant::q4_k::BlockQ4K;
use crate::quant::q5_k::BlockQ5K;
use crate::quant::q6_k::BlockQ6K;
use crate::quant::q8_k::BlockQ8K;
use crate::quant::util::blocks;
use std::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// `sc * (x . y)` over 32 elements as 8 lane-structured i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scaled(q: __m256i, y: __m256i, sc: i16) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), _mm256_set1_epi16(sc))
}

/// Sum of the 32 activations of sub-block j (two bsums of 16).
#[inline]
fn bsum32(y: &BlockQ8K, j: usize) -> i32 {
    i16::from_le_bytes(y.bsums[2 * j]) as i32 + i16::from_le_bytes(y.bsums[2 * j + 1]) as i32
}

/// The six-bit scales and mins of a Q4_K / Q5_K super-block, and `sum_j m_j * bsum32_j`.
#[inline]
fn scales_mins(scales: &[u8; 12], y: &BlockQ8K) -> ([i16; 8], i32) {
    let mut sc = [0i16; 8];
    let mut mins = 0i32;
    for (j, s) in sc.iter_mut().enumerate() {
        let (a, m) = get_scale_min_k4(j, scales);
        *s = a as i16;
        mins += m as i32 * bsum32(y, j);
    }
    (sc, mins)
}

/// Q4_K: the scaled lanes of the two sub-blocks of pair p (0..4), summed.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_pair(x: &BlockQ4K, y: &BlockQ8K, sc: &[i16; 8], p: usize) -> __m256i {
    let q = load(x.qs.as_ptr().add(32 * p));
    let m = _mm256_set1_epi8(0x0F);
    let lo = _mm256_and_si256(q, m);
    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m);
    let y0 = load(y.qs.as_ptr().add(64 * p) as *const u8);
    let y1 = load(y.qs.as_ptr().add(64 * p + 32) as *const u8);
    _mm256_add_epi32(scaled(lo, y0, sc[2 * p]), scaled(hi, y1, sc[2 * p + 1]))
}

/// Q4_K: the scaled lanes of a whole super-block (the four pairs summed).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_lanes(x: &BlockQ4K, y: &BlockQ8K, sc: &[i16; 8]) -> __m256i {
    let mut s = _mm256_setzero_si256();
    for p in 0..4 {
        s = _mm256_add_epi32(s, q4k_pair(x, y, sc, p));
    }
    s
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_imp(w: &[u8], a: &[u8]) -> f32 {
    let (mut acc, mut accm) = (0.0f32, 0.0f32);
    for (x, y) in blocks::<BlockQ4K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let (sc, mins) = scales_mins(&x.scales, y);
        let s = q4k_lanes(x, y, &sc);
        let dy = f32::from_le_bytes(y.d);
        acc = (hsum_i32_8(s) as f32).mul_add(fp16(x.d) * dy, acc);
        accm = (mins as f32).mul_add(fp16(x.dmin) * dy, accm);
    }
    acc - accm
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_gemm_imp(w: &[u8], a: &[u8]) -> f32 {
    let (mut acc, mut accm) = (0.0f32, 0.0f32);
    for (x, y) in blocks::<BlockQ4K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let dy = f32::from_le_bytes(y.d);
        let (d, dmin) = (fp16(x.d) * dy, fp16(x.dmin) * dy);
        for p in 0..4 {
            let (a0, m0) = get_scale_min_k4(2 * p, &x.scales);
            let (a1, m1) = get_scale_min_k4(2 * p + 1, &x.scales);
            let sc = {
                let mut s = [0i16; 8];
                s[2 * p] = a0 as i16;
                s[2 * p + 1] = a1 as i16;
                s
            };
            let m = m0 as i32 * bsum32(y, 2 * p) + m1 as i32 * bsum32(y, 2 * p + 1);
            acc = (hsum_i32_8(q4k_pair(x, y, &sc, p)) as f32).mul_add(d, acc);
            accm = (m as f32).mul_add(dmin, accm);
        }
    }
    acc - accm
}

/// The tiled order for formats with mins, given each super-block's (I, M, d_x, dmin_x).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn tiled_step(acc: f32, isum: i32, imin: i32, d: f32, dmin: f32, dy: f32) -> f32 {
    let r = (-dmin).mul_add(imin as f32, isum as f32 * d);
    r.mul_add(dy, acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_tiled_imp(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = 0.0f32;
    for (x, y) in blocks::<BlockQ4K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let (sc, mins) = scales_mins(&x.scales, y);
        let s = q4k_lanes(x, y, &sc);
        let dy = f32::from_le_bytes(y.d);
        acc = tiled_step(acc, hsum_i32_8(s), mins, fp16(x.d), fp16(x.dmin), dy);
    }
    acc
}

/// Q5_K: the lane-structured scaled products of a whole super-block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5k_lanes(x: &BlockQ5K, y: &BlockQ8K, sc: &[i16; 8]) -> __m256i {
    let hbits = load(x.qh.as_ptr());
    let m4 = _mm256_set1_epi8(0x0F);
    let b5 = _mm256_set1_epi8(0x10);
    let mut s = _mm256_setzero_si256();
    for p in 0..4 {
        let q = load(x.qs.as_ptr().add(32 * p));
        for (half, nib) in [
            _mm256_and_si256(q, m4),
            _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4),
        ]
        .into_iter()
        .enumerate()
        {
            let j = 2 * p + half;
            let bit = _mm256_set1_epi8((1u8 << j) as i8);
            let h = _mm256_cmpeq_epi8(_mm256_and_si256(hbits, bit), bit);
            let q5 = _mm256_or_si256(nib, _mm256_and_si256(h, b5));
            let yv = load(y.qs.as_ptr().add(32 * j) as *const u8);
            s = _mm256_add_epi32(s, scaled(q5, yv, sc[j]));
        }
    }
    s
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k_imp(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0.0f32;
    for (x, y) in blocks::<BlockQ5K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let dy = f32::from_le_bytes(y.d);
        let d = dy * fp16(x.d);
        let dmin = -dy * fp16(x.dmin);
        let (sc, mins) = scales_mins(&x.scales, y);
        let lanes = _mm256_cvtepi32_ps(q5k_lanes(x, y, &sc));
        summs = dmin.mul_add(mins as f32, summs);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), lanes, acc);
    }
    hsum_float_8(acc) + summs
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k_tiled_imp(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = 0.0f32;
    for (x, y) in blocks::<BlockQ5K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let (sc, mins) = scales_mins(&x.scales, y);
        let isum = hsum_i32_8(q5k_lanes(x, y, &sc));
        let dy = f32::from_le_bytes(y.d);
        acc = tiled_step(acc, isum, mins, fp16(x.d), fp16(x.dmin), dy);
    }
    acc
}

/// Q6_K: lane l = sum over the 8 chunks of 32 of scale * (products of elements 32c+4l..+3),
/// minus 32 * (bsum[2l] sc[2l] + bsum[2l+1] sc[2l+1]) (see `dot::q6_k_q8_k`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_lanes(x: &BlockQ6K, y: &BlockQ8K) -> __m256i {
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x03);
    let mut s = _mm256_setzero_si256();
    for h in 0..2 {
        let ql0 = load(x.ql.as_ptr().add(64 * h));
        let ql1 = load(x.ql.as_ptr().add(64 * h + 32));
        let qh = load(x.qh.as_ptr().add(32 * h));
        let levels = [
            _mm256_or_si256(
                _mm256_and_si256(ql0, m4),
                _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m2)),
            ),
            _mm256_or_si256(
                _mm256_and_si256(ql1, m4),
                _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2)),
            ),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(qh), m2)),
            ),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(qh), m2)),
            ),
        ];
        for (g, q) in levels.into_iter().enumerate() {
            let c = 4 * h + g;
            let yv = load(y.qs.as_ptr().add(32 * c) as *const u8);
            let scv = _mm256_set_m128i(
                _mm_set1_epi16(x.scales[2 * c + 1] as i16),
                _mm_set1_epi16(x.scales[2 * c] as i16),
            );
            s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(q, yv), scv));
        }
    }
    // bsums . scales pairwise: lane l = bsum[2l] sc[2l] + bsum[2l+1] sc[2l+1].
    let bs = load(y.bsums.as_ptr() as *const u8);
    let scs = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.scales.as_ptr() as *const __m128i));
    let corr = _mm256_slli_epi32::<5>(_mm256_madd_epi16(bs, scs));
    _mm256_sub_epi32(s, corr)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_imp(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (x, y) in blocks::<BlockQ6K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let d = f32::from_le_bytes(y.d) * fp16(x.d);
        let lanes = _mm256_cvtepi32_ps(q6k_lanes(x, y));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), lanes, acc);
    }
    hsum_float_8(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_tiled_imp(w: &[u8], a: &[u8]) -> f32 {
    let mut acc = 0.0f32;
    for (x, y) in blocks::<BlockQ6K>(w).iter().zip(blocks::<BlockQ8K>(a)) {
        let isum = hsum_i32_8(q6k_lanes(x, y));
        acc = (isum as f32 * fp16(x.d)).mul_add(f32::from_le_bytes(y.d), acc);
    }
    acc
}

// ---- four tokens at once (batches): lane t of each accumulator is token t's scalar one ----

/// The four tokens' blocks `b` and their scales d as [t0, t1, t2, t3].
#[inline(always)]
unsafe fn tokens4<'a>(a: &[&'a [BlockQ8K]; 4], b: usize) -> ([&'a BlockQ8K; 4], __m128) {
    let y: [&BlockQ8K; 4] = std::array::from_fn(|t| &a[t][b]);
    let d = _mm_setr_ps(
        f32::from_le_bytes(y[0].d),
        f32::from_le_bytes(y[1].d),
        f32::from_le_bytes(y[2].d),
        f32::from_le_bytes(y[3].d),
    );
    (y, d)
}

#[inline(always)]
fn rows4<'a, W: bytemuck::Pod>(w: &'a [u8], a: [&'a [u8]; 4]) -> (&'a [W], [&'a [BlockQ8K]; 4]) {
    let x = blocks::<W>(w);
    (
        x,
        build!(4, &[][..], |t| &blocks::<BlockQ8K>(a[t])[..x.len()]),
    )
}

#[inline(always)]
unsafe fn lanes4(v: __m128) -> [f32; 4] {
    let mut o = [0f32; 4];
    _mm_storeu_ps(o.as_mut_ptr(), v);
    o
}

/// The six-bit scales of a Q4_K / Q5_K super-block, and its mins each twice
/// (`[m0, m0, m1, m1, ..]` as i16), for [`pair_mins4`].
#[inline(always)]
unsafe fn scales_mins2(scales: &[u8; 12]) -> ([i16; 8], __m256i) {
    let mut sc = [0i16; 8];
    let mut mins = [0i16; 16];
    for j in 0..8 {
        let (a, m) = get_scale_min_k4(j, scales);
        sc[j] = a as i16;
        mins[2 * j] = m as i16;
        mins[2 * j + 1] = m as i16;
    }
    (sc, _mm256_loadu_si256(mins.as_ptr() as *const __m256i))
}

/// For each pair p (0..4) of sub-blocks, the four tokens' `m_2p * bsum32_2p + m_2p+1 *
/// bsum32_2p+1` (lane t), given the mins each twice (`[m0, m0, m1, m1, ..]` as i16): one
/// `madd` per token of its 16 bsums, then pair sums and a transpose (exact integers, the
/// scalar sums of [`q4_k_gemm_imp`]).
#[inline(always)]
unsafe fn pair_mins4(y: [&BlockQ8K; 4], mins: __m256i) -> [__m128i; 4] {
    // Lane j of token t: m_j * bsum32_j.
    let v: [__m256i; 4] = std::array::from_fn(|t| {
        _mm256_madd_epi16(
            _mm256_loadu_si256(y[t].bsums.as_ptr() as *const __m256i),
            mins,
        )
    });
    // Per 128-bit lane (pairs 0, 1 low; 2, 3 high): [t0 p, t0 p+1, t1 p, t1 p+1].
    let h01 = _mm256_castsi256_ps(_mm256_hadd_epi32(v[0], v[1]));
    let h23 = _mm256_castsi256_ps(_mm256_hadd_epi32(v[2], v[3]));
    let even = _mm256_castps_si256(_mm256_shuffle_ps::<0b10_00_10_00>(h01, h23));
    let odd = _mm256_castps_si256(_mm256_shuffle_ps::<0b11_01_11_01>(h01, h23));
    [
        _mm256_castsi256_si128(even),
        _mm256_castsi256_si128(odd),
        _mm256_extracti128_si256::<1>(even),
        _mm256_extracti128_si256::<1>(odd),
    ]
}

/// [`q4_k_gemm_imp`] for four tokens.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_gemm4_imp(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    let (x, y) = rows4::<BlockQ4K>(w, a);
    let (mut acc, mut accm) = (_mm_setzero_ps(), _mm_setzero_ps());
    for (b, xb) in x.iter().enumerate() {
        let (yb, dy) = tokens4(&y, b);
        let d = _mm_mul_ps(_mm_set1_ps(fp16(xb.d)), dy);
        let dmin = _mm_mul_ps(_mm_set1_ps(fp16(xb.dmin)), dy);
        let (sc, mins) = scales_mins2(&xb.scales);
        for (p, &m) in pair_mins4(yb, mins).iter().enumerate() {
            let i = hsum4x8(build!(4, _mm256_setzero_si256(), |t| q4k_pair(
                xb, yb[t], &sc, p
            )));
            acc = _mm_fmadd_ps(_mm_cvtepi32_ps(i), d, acc);
            accm = _mm_fmadd_ps(_mm_cvtepi32_ps(m), dmin, accm);
        }
    }
    lanes4(_mm_sub_ps(acc, accm))
}

/// The tiled step for formats with mins, four tokens: r = fma(-dmin, M, I d_x), acc = fma(r,
/// d_y, acc).
#[inline(always)]
unsafe fn tiled_step4(
    acc: __m128,
    i: __m128i,
    m: __m128i,
    d: f32,
    dmin: f32,
    dy: __m128,
) -> __m128 {
    let r = _mm_fmadd_ps(
        _mm_set1_ps(-dmin),
        _mm_cvtepi32_ps(m),
        _mm_mul_ps(_mm_cvtepi32_ps(i), _mm_set1_ps(d)),
    );
    _mm_fmadd_ps(r, dy, acc)
}

/// The tiled order for formats with mins, four tokens: `lanes` gives a super-block's scaled
/// lanes for one token.
#[inline(always)]
unsafe fn tiled4_with_mins<B: bytemuck::Pod>(
    w: &[u8],
    a: [&[u8]; 4],
    parts: impl Fn(&B) -> (&[u8; 12], [u8; 2], [u8; 2]),
    lanes: impl Fn(&B, &BlockQ8K, &[i16; 8]) -> __m256i,
) -> [f32; 4] {
    let (x, y) = rows4::<B>(w, a);
    let mut acc = _mm_setzero_ps();
    for (b, xb) in x.iter().enumerate() {
        let (yb, dy) = tokens4(&y, b);
        let (scales, d, dmin) = parts(xb);
        let (sc, mins) = scales_mins2(scales);
        let i = hsum4x8(build!(4, _mm256_setzero_si256(), |t| lanes(xb, yb[t], &sc)));
        // Each token's sum_j m_j * bsum32_j (exact integers).
        let pm = pair_mins4(yb, mins);
        let m = _mm_add_epi32(_mm_add_epi32(pm[0], pm[1]), _mm_add_epi32(pm[2], pm[3]));
        acc = tiled_step4(acc, i, m, fp16(d), fp16(dmin), dy);
    }
    lanes4(acc)
}

/// [`q4_k_tiled_imp`] for four tokens.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_tiled4_imp(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    tiled4_with_mins::<BlockQ4K>(
        w,
        a,
        |x| (&x.scales, x.d, x.dmin),
        |x, y, sc| q4k_lanes(x, y, sc),
    )
}

/// [`q5_k_tiled_imp`] for four tokens.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k_tiled4_imp(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    tiled4_with_mins::<BlockQ5K>(
        w,
        a,
        |x| (&x.scales, x.d, x.dmin),
        |x, y, sc| q5k_lanes(x, y, sc),
    )
}

/// [`q6_k_tiled_imp`] for four tokens.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_tiled4_imp(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    let (x, y) = rows4::<BlockQ6K>(w, a);
    let mut acc = _mm_setzero_ps();
    for (b, xb) in x.iter().enumerate() {
        let (yb, dy) = tokens4(&y, b);
        let i = hsum4x8(build!(4, _mm256_setzero_si256(), |t| q6k_lanes(xb, yb[t])));
        let s = _mm_mul_ps(_mm_cvtepi32_ps(i), _mm_set1_ps(fp16(xb.d)));
        acc = _mm_fmadd_ps(s, dy, acc);
    }
    lanes4(acc)
}

const _: () = assert!(QK_K == 256);

macro_rules! entry {
    ($name:ident, $imp:ident) => {
        pub(super) fn $name(w: &[u8], a: &[u8]) -> f32 {
            // SAFETY: only registered by `x86::plug` after the CPU features were detected.
            unsafe { $imp(w, a) }
        }
    };
}

entry!(q4_k_q8_k, q4_k_imp);
entry!(q4_k_q8_k_gemm, q4_k_gemm_imp);
entry!(q4_k_q8_k_tiled, q4_k_tiled_imp);
entry!(q5_k_q8_k, q5_k_imp);
entry!(q5_k_q8_k_tiled, q5_k_tiled_imp);
entry!(q6_k_q8_k, q6_k_imp);
entry!(q6_k_q8_k_tiled, q6_k_tiled_imp);

macro_rules! entry4 {
    ($name:ident, $imp:ident) => {
        pub(super) fn $name(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
            // SAFETY: only registered by `x86::plug` after the CPU features were detected.
            unsafe { $imp(w, a) }
        }
    };
}

entry4!(q4_k_q8_k_gemm4, q4_k_gemm4_imp);
entry4!(q4_k_q8_k_tiled4, q4_k_tiled4_imp);
entry4!(q5_k_q8_k_tiled4, q5_k_tiled4_imp);
entry4!(q6_k_q8_k_tiled4, q6_k_tiled4_imp);

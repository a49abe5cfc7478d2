//! NEON kernels for the 32-element block formats, their activation quantizers, and the
//! pieces the K-quant kernels share.
//!
//! Every kernel body is written once, generic over [`Isa`], the way the 4-element integer
//! lanes are made: [`Neon`] with widening multiplies and pairwise adds (every aarch64 CPU),
//! [`Sdot`] with the dot product extension's `sdot` (one instruction per 16 byte pairs).
//! Both give the same exact i32 lanes, so the float steps that follow, which copy the
//! portable orders of `kernels/dot.rs` one for one (two `float32x4_t` accumulators for the 8
//! lanes of ggml's x86 kernels, `vfmaq_f32` for their fused multiply-adds, and
//! `hsum_float_8`'s pairing at the end), give the same bits as the portable kernels.
//!
//! Safety model: the kernel bodies are `unsafe` `#[inline(always)]` generics; the safe entry
//! points made by `entries!` instantiate them for `Neon` (the aarch64 baseline) and, inside
//! a `#[target_feature(enable = "dotprod")]` function, for `Sdot`. The dotprod entry points are
//! only registered by `aarch64::plug` at `Level::Dotprod` and above, which `detected()` only
//! reports when the CPU has the extension. (An `sdot` that ends up outside such a function is
//! a compile error, "instruction requires: dotprod", not a silent fallback.)

use crate::quant::q4_0::BlockQ4_0;
use crate::quant::q4_1::BlockQ4_1;
use crate::quant::q5_0::BlockQ5_0;
use crate::quant::q5_1::BlockQ5_1;
use crate::quant::q8_0::BlockQ8_0;
use crate::quant::q8_1::BlockQ8_1;
use crate::quant::util::{blocks, blocks_mut};
use std::arch::aarch64::*;
use std::arch::asm;

/// How 16 byte pairs become 4 exact i32 lanes of 4 neighbours each.
pub(super) trait Isa {
    /// `acc + [x0y0+..+x3y3, x4y4+..+x7y7, x8y8+..+x11y11, x12y12+..+x15y15]`, exact.
    unsafe fn dot4(acc: int32x4_t, x: int8x16_t, y: int8x16_t) -> int32x4_t;
}

/// Baseline NEON: `smull` / `smull2` to 8 i16 products each (|x y| <= 2^14, exact), pairwise
/// widened to i32 (`saddlp`), then pairwise added again (`addp`).
pub(super) struct Neon;

impl Isa for Neon {
    #[inline(always)]
    unsafe fn dot4(acc: int32x4_t, x: int8x16_t, y: int8x16_t) -> int32x4_t {
        let p0 = vpaddlq_s16(vmull_s8(vget_low_s8(x), vget_low_s8(y)));
        let p1 = vpaddlq_s16(vmull_high_s8(x, y));
        vaddq_s32(acc, vpaddq_s32(p0, p1))
    }
}

/// The dot product extension (FEAT_DotProd): `sdot`, which Rust stable does not expose as an
/// intrinsic, in inline assembly. Only usable inside `#[target_feature(enable = "dotprod")]`
/// functions (the assembler refuses it elsewhere).
pub(super) struct Sdot;

impl Isa for Sdot {
    #[inline(always)]
    unsafe fn dot4(mut acc: int32x4_t, x: int8x16_t, y: int8x16_t) -> int32x4_t {
        asm!(
            "sdot {acc:v}.4s, {x:v}.16b, {y:v}.16b",
            acc = inout(vreg) acc,
            x = in(vreg) x,
            y = in(vreg) y,
            options(pure, nomem, nostack, preserves_flags)
        );
        acc
    }
}

/// f16 bits to f32 (`fcvt s, h`: base ARMv8 floating point, exact). The `half` crate only
/// uses the instruction when the CPU has FEAT_FP16 arithmetic, which it checks per call.
#[inline(always)]
pub(super) fn fp16(b: [u8; 2]) -> f32 {
    let out: f32;
    // SAFETY: a register-only conversion, available on every aarch64 CPU.
    unsafe {
        asm!(
            "fcvt {o:s}, {i:h}",
            o = lateout(vreg) out,
            i = in(vreg) u16::from_le_bytes(b) as u32,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    out
}

/// f32 to f16 bits, rounding to nearest even (`fcvt h, s` under the default FPCR), as
/// `half::f16::from_f32` (the portable quantizers) does for every non-NaN value.
#[inline(always)]
pub(super) fn to_fp16(x: f32) -> [u8; 2] {
    let out: u32;
    // SAFETY: register-only conversion and move, available on every aarch64 CPU.
    unsafe {
        asm!(
            "fcvt {t:h}, {i:s}",
            "fmov {o:w}, {t:s}",
            i = in(vreg) x,
            t = out(vreg) _,
            o = lateout(reg) out,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    (out as u16).to_le_bytes()
}

#[inline(always)]
pub(super) unsafe fn ld_i8(p: *const i8) -> int8x16_t {
    vld1q_s8(p)
}

#[inline(always)]
pub(super) unsafe fn ld_u8(p: *const u8) -> uint8x16_t {
    vld1q_u8(p)
}

/// Unsigned levels (< 128) as signed bytes.
#[inline(always)]
pub(super) fn s8(v: uint8x16_t) -> int8x16_t {
    unsafe { vreinterpretq_s8_u8(v) }
}

/// The 8 f32 lanes of ggml's x86 accumulators: `lo` holds lanes 0..3, `hi` lanes 4..7.
#[derive(Clone, Copy)]
pub(super) struct Acc8 {
    lo: float32x4_t,
    hi: float32x4_t,
}

impl Acc8 {
    #[inline(always)]
    pub(super) fn zero() -> Acc8 {
        unsafe {
            Acc8 {
                lo: vdupq_n_f32(0.0),
                hi: vdupq_n_f32(0.0),
            }
        }
    }

    /// `acc[l] = fma(d, lane l, acc[l])` for the i32 lanes 0..3 (`lo`) and 4..7 (`hi`),
    /// converted to f32 first (round to nearest, as `as f32` does).
    #[inline(always)]
    pub(super) fn fma(&mut self, d: f32, lo: int32x4_t, hi: int32x4_t) {
        unsafe {
            let dv = vdupq_n_f32(d);
            self.lo = vfmaq_f32(self.lo, dv, vcvtq_f32_s32(lo));
            self.hi = vfmaq_f32(self.hi, dv, vcvtq_f32_s32(hi));
        }
    }

    /// `hsum_float_8`: r[i] = acc[4+i] + acc[i], then (r0 + r2) + (r1 + r3).
    #[inline(always)]
    pub(super) fn hsum(self) -> f32 {
        unsafe {
            let r = vaddq_f32(self.hi, self.lo);
            let t = vadd_f32(vget_low_f32(r), vget_high_f32(r));
            vpadds_f32(t)
        }
    }
}

/// Elements 0..15 and 16..31 of the 32 nibbles of 16 bytes: element j < 16 is the low nibble
/// of byte j, element 16 + j its high one.
#[inline(always)]
unsafe fn nibbles(qs: &[u8; 16]) -> (uint8x16_t, uint8x16_t) {
    let q = ld_u8(qs.as_ptr());
    (vandq_u8(q, vdupq_n_u8(0x0F)), vshrq_n_u8::<4>(q))
}

/// 0xFF in byte j (of elements 0..15, 16..31) where bit j of the little-endian `qh` is set.
#[inline(always)]
unsafe fn bits32(qh: [u8; 4]) -> (uint8x16_t, uint8x16_t) {
    const BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    let bit = ld_u8(BIT.as_ptr());
    let h0 = vcombine_u8(vdup_n_u8(qh[0]), vdup_n_u8(qh[1]));
    let h1 = vcombine_u8(vdup_n_u8(qh[2]), vdup_n_u8(qh[3]));
    (vtstq_u8(h0, bit), vtstq_u8(h1, bit))
}

/// The lanes of one block of 32: (lanes 0..3 from elements 0..15, lanes 4..7 from 16..31).
#[inline(always)]
unsafe fn lanes<I: Isa>(x: (int8x16_t, int8x16_t), y: &[i8; 32]) -> (int32x4_t, int32x4_t) {
    let z = vdupq_n_s32(0);
    (
        I::dot4(z, x.0, ld_i8(y.as_ptr())),
        I::dot4(z, x.1, ld_i8(y.as_ptr().add(16))),
    )
}

// ---- dots ----------------------------------------------------------------------------------

/// One row and one token: the multi-row bodies below with R = N = 1.
macro_rules! one_by_one {
    ($($name:ident => $body:ident;)*) => {$(
        #[inline(always)]
        unsafe fn $name<I: Isa>(w: &[u8], a: &[u8]) -> f32 {
            $body::<I, 1, 1>([w], [a])[0][0]
        }
    )*};
}

one_by_one! {
    q8_0_q8_0_imp => q8_0_rn;
    q4_0_q8_0_imp => q4_0_rn;
    q4_1_q8_1_imp => q4_1_rn;
    q5_0_q8_0_imp => q5_0_rn;
    q5_1_q8_1_imp => q5_1_rn;
}

// ---- several rows and tokens at once ---------------------------------------------------------
//
// `rows4` (four rows, one token: four independent chains in a decode step), `vec_dot4` (one
// row, four tokens: each weight block unpacked once for four tokens) and `tile2x4` (two rows
// by four tokens) of the bodies above: each (row, token) pair goes through the one-pair
// operations in the one-pair order, so the bits are those of the `vec_dot` entries.

/// R weight rows of blocks `W` against N activation rows of blocks `A` (the first `nb` of
/// each, `nb` from the first weight row).
#[inline(always)]
fn rows_of<'a, W: bytemuck::Pod, A: bytemuck::Pod, const R: usize, const N: usize>(
    w: [&'a [u8]; R],
    a: [&'a [u8]; N],
) -> ([&'a [W]; R], [&'a [A]; N], usize) {
    let nb = blocks::<W>(w[0]).len();
    (
        std::array::from_fn(|r| &blocks::<W>(w[r])[..nb]),
        std::array::from_fn(|t| &blocks::<A>(a[t])[..nb]),
        nb,
    )
}

#[inline(always)]
unsafe fn q8_0_rn<I: Isa, const R: usize, const N: usize>(
    w: [&[u8]; R],
    a: [&[u8]; N],
) -> [[f32; N]; R] {
    let (x, y, nb) = rows_of::<BlockQ8_0, BlockQ8_0, R, N>(w, a);
    let mut acc = [[Acc8::zero(); N]; R];
    for b in 0..nb {
        for r in 0..R {
            let xb = &x[r][b];
            let qx = (ld_i8(xb.qs.as_ptr()), ld_i8(xb.qs.as_ptr().add(16)));
            let dx = fp16(xb.d);
            for t in 0..N {
                let (lo, hi) = lanes::<I>(qx, &y[t][b].qs);
                acc[r][t].fma(dx * fp16(y[t][b].d), lo, hi);
            }
        }
    }
    acc.map(|a| a.map(Acc8::hsum))
}

/// Q4_0 in the repacked order (see `dot::q4_0_q8_0`): one exact integer per block (the f32
/// sum of the portable lanes is exact too: |sum| <= 2^15), fma'd into a scalar.
#[inline(always)]
unsafe fn q4_0_rn<I: Isa, const R: usize, const N: usize>(
    w: [&[u8]; R],
    a: [&[u8]; N],
) -> [[f32; N]; R] {
    let (x, y, nb) = rows_of::<BlockQ4_0, BlockQ8_0, R, N>(w, a);
    let mut acc = [[0.0f32; N]; R];
    let off = vdupq_n_s8(8);
    for b in 0..nb {
        for r in 0..R {
            let (n0, n1) = nibbles(&x[r][b].qs);
            let qx = (vsubq_s8(s8(n0), off), vsubq_s8(s8(n1), off));
            let dx = fp16(x[r][b].d);
            for t in 0..N {
                let (lo, hi) = lanes::<I>(qx, &y[t][b].qs);
                let isum = vaddvq_s32(vaddq_s32(lo, hi)) as f32;
                acc[r][t] = isum.mul_add(dx * fp16(y[t][b].d), acc[r][t]);
            }
        }
    }
    acc
}

#[inline(always)]
unsafe fn q4_1_rn<I: Isa, const R: usize, const N: usize>(
    w: [&[u8]; R],
    a: [&[u8]; N],
) -> [[f32; N]; R] {
    let (x, y, nb) = rows_of::<BlockQ4_1, BlockQ8_1, R, N>(w, a);
    let mut acc = [[Acc8::zero(); N]; R];
    let mut summs = [[0.0f32; N]; R];
    for b in 0..nb {
        for r in 0..R {
            let xb = &x[r][b];
            let (n0, n1) = nibbles(&xb.qs);
            let (dx, mx) = (fp16(xb.d), fp16(xb.m));
            for t in 0..N {
                let yb = &y[t][b];
                summs[r][t] += mx * fp16(yb.s);
                let (lo, hi) = lanes::<I>((s8(n0), s8(n1)), &yb.qs);
                acc[r][t].fma(dx * fp16(yb.d), lo, hi);
            }
        }
    }
    std::array::from_fn(|r| std::array::from_fn(|t| acc[r][t].hsum() + summs[r][t]))
}

#[inline(always)]
unsafe fn q5_0_rn<I: Isa, const R: usize, const N: usize>(
    w: [&[u8]; R],
    a: [&[u8]; N],
) -> [[f32; N]; R] {
    let (x, y, nb) = rows_of::<BlockQ5_0, BlockQ8_0, R, N>(w, a);
    let mut acc = [[Acc8::zero(); N]; R];
    let f0 = vdupq_n_u8(0xF0);
    for b in 0..nb {
        for r in 0..R {
            let xb = &x[r][b];
            let (n0, n1) = nibbles(&xb.qs);
            let (b0, b1) = bits32(xb.qh);
            let qx = (
                s8(vorrq_u8(n0, vbicq_u8(f0, b0))),
                s8(vorrq_u8(n1, vbicq_u8(f0, b1))),
            );
            let dx = fp16(xb.d);
            for t in 0..N {
                let (lo, hi) = lanes::<I>(qx, &y[t][b].qs);
                acc[r][t].fma(dx * fp16(y[t][b].d), lo, hi);
            }
        }
    }
    acc.map(|a| a.map(Acc8::hsum))
}

#[inline(always)]
unsafe fn q5_1_rn<I: Isa, const R: usize, const N: usize>(
    w: [&[u8]; R],
    a: [&[u8]; N],
) -> [[f32; N]; R] {
    let (x, y, nb) = rows_of::<BlockQ5_1, BlockQ8_1, R, N>(w, a);
    let mut acc = [[Acc8::zero(); N]; R];
    let mut summs = [[0.0f32; N]; R];
    let b5 = vdupq_n_u8(0x10);
    for b in 0..nb {
        for r in 0..R {
            let xb = &x[r][b];
            let (n0, n1) = nibbles(&xb.qs);
            let (b0, b1) = bits32(xb.qh);
            let qx = (
                s8(vorrq_u8(n0, vandq_u8(b0, b5))),
                s8(vorrq_u8(n1, vandq_u8(b1, b5))),
            );
            let (dx, mx) = (fp16(xb.d), fp16(xb.m));
            for t in 0..N {
                let yb = &y[t][b];
                summs[r][t] += mx * fp16(yb.s);
                let (lo, hi) = lanes::<I>(qx, &yb.qs);
                acc[r][t].fma(dx * fp16(yb.d), lo, hi);
            }
        }
    }
    std::array::from_fn(|r| std::array::from_fn(|t| acc[r][t].hsum() + summs[r][t]))
}

/// The `rows4`, `vec_dot4` and `tile2x4` entries of one multi-row body, for NEON and for
/// the dot product extension (registered only at `Level::Dotprod` and above).
macro_rules! shapes {
    ($($m:ident => $body:ident;)*) => {$(
        pub(super) mod $m {
            use super::*;
            /// NEON (`Neon`) or dotprod (`Sdot`) forms, `$body::<I, R, N>`.
            macro_rules! forms {
                ($isa:ty, $feat:tt) => {
                    pub fn rows4(w: &[u8], rb: usize, a: &[u8], y: &mut [f32]) {
                        let wy = (w, rb, y);
                        forms!(@call $feat, (&[u8], usize, &mut [f32]), &[u8], (),
                            wy, a, row_parts!(4, wy.0, wy.1, wy.2, |rows| {
                                $body::<$isa, 4, 1>(rows, [a]).map(|r| r[0])
                            }))
                    }
                    pub fn vec_dot4(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
                        forms!(@call $feat, &[u8], [&[u8]; 4], [f32; 4], w, a,
                            $body::<$isa, 1, 4>([w], a)[0])
                    }
                    pub fn tile2x4(w: [&[u8]; 2], a: [&[u8]; 4]) -> [[f32; 4]; 2] {
                        forms!(@call $feat, [&[u8]; 2], [&[u8]; 4], [[f32; 4]; 2], w, a,
                            $body::<$isa, 2, 4>(w, a))
                    }
                };
                (@call neon, $w:ty, $a:ty, $o:ty, $wn:ident, $an:ident, $e:expr) => {
                    // SAFETY: NEON is part of the aarch64 baseline.
                    unsafe { $e }
                };
                (@call dotprod, $w:ty, $a:ty, $o:ty, $wn:ident, $an:ident, $e:expr) => {{
                    #[target_feature(enable = "dotprod")]
                    unsafe fn imp($wn: $w, $an: $a) -> $o {
                        $e
                    }
                    // SAFETY: only registered by `aarch64::plug` at `Level::Dotprod` and
                    // above, which `detected()` reports only when the CPU has the extension.
                    unsafe { imp($wn, $an) }
                }};
            }
            pub mod neon {
                use super::*;
                forms!($crate::kernels::aarch64::neon::Neon, neon);
            }
            pub mod sdot {
                use super::*;
                forms!($crate::kernels::aarch64::neon::Sdot, dotprod);
            }
        }
    )*};
}

shapes! {
    q8_0_q8_0_n => q8_0_rn;
    q4_0_q8_0_n => q4_0_rn;
    q4_1_q8_1_n => q4_1_rn;
    q5_0_q8_0_n => q5_0_rn;
    q5_1_q8_1_n => q5_1_rn;
}

// ---- Q4_0 over eight rows: transposed blocks and `sdot` by element -------------------------

/// `acc + [dot(w.s[0..4], y.word K), .., dot(w.s[12..16], y.word K)]`: `sdot` by element,
/// word K (4 bytes) of `y` against each 4-byte lane of `w`, exact. Dot product extension.
#[inline(always)]
unsafe fn sdot_lane<const K: i32>(mut acc: int32x4_t, w: int8x16_t, y: int8x16_t) -> int32x4_t {
    asm!(
        "sdot {acc:v}.4s, {w:v}.16b, {y:v}.4b[{k}]",
        acc = inout(vreg) acc,
        w = in(vreg) w,
        y = in(vreg) y,
        k = const K,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// Word k of each of `a[0..4]` to lane j of result k: a 4x4 transpose of 32-bit words.
#[inline(always)]
pub(crate) unsafe fn transpose4(a: [int8x16_t; 4]) -> [int8x16_t; 4] {
    let w = |v: int8x16_t| vreinterpretq_s32_s8(v);
    let (t0, t1) = (vtrn1q_s32(w(a[0]), w(a[1])), vtrn2q_s32(w(a[0]), w(a[1])));
    let (t2, t3) = (vtrn1q_s32(w(a[2]), w(a[3])), vtrn2q_s32(w(a[2]), w(a[3])));
    let d = |v: int32x4_t| vreinterpretq_s64_s32(v);
    let b = |v: int64x2_t| vreinterpretq_s8_s64(v);
    [
        b(vtrn1q_s64(d(t0), d(t2))),
        b(vtrn1q_s64(d(t1), d(t3))),
        b(vtrn2q_s64(d(t0), d(t2))),
        b(vtrn2q_s64(d(t1), d(t3))),
    ]
}

/// Q4_0 for eight rows by N tokens (N = 1: a decode step, N = 4: a batch tile), in the order
/// of [`q4_0_q8_0_imp`]: per block one exact integer per (row, token), fma'd with
/// `d_x * d_y`. Each block of four rows is transposed once (`W_k`: lane r holds row r's
/// levels 4k..4k+3, minus 8) for all N tokens; then eight `sdot`s by element, word k of the
/// token's activation block against `W_k`, leave the four rows' block integers in the four
/// lanes, with no horizontal sum. Dot product extension.
#[inline(always)]
unsafe fn q4_0_t8<const N: usize>(w: [&[u8]; 8], a: [&[u8]; N]) -> [[f32; N]; 8] {
    let (x, y, nb) = rows_of::<BlockQ4_0, BlockQ8_0, 8, N>(w, a);
    let mut acc = [[vdupq_n_f32(0.0); N]; 2];
    let (m, off) = (vdupq_n_u8(0x0F), vdupq_n_s8(8));
    for b in 0..nb {
        for g in 0..2 {
            let rows: [&BlockQ4_0; 4] = std::array::from_fn(|i| &x[4 * g + i][b]);
            let q: [uint8x16_t; 4] = std::array::from_fn(|i| ld_u8(rows[i].qs.as_ptr()));
            let lo = transpose4(q.map(|v| vsubq_s8(s8(vandq_u8(v, m)), off)));
            let hi = transpose4(q.map(|v| vsubq_s8(s8(vshrq_n_u8::<4>(v)), off)));
            let dx: [f32; 4] = std::array::from_fn(|i| fp16(rows[i].d));
            let dx = vld1q_f32(dx.as_ptr());
            for t in 0..N {
                let yb = &y[t][b];
                let (y0, y1) = (ld_i8(yb.qs.as_ptr()), ld_i8(yb.qs.as_ptr().add(16)));
                let mut i = vdupq_n_s32(0);
                i = sdot_lane::<0>(i, lo[0], y0);
                i = sdot_lane::<1>(i, lo[1], y0);
                i = sdot_lane::<2>(i, lo[2], y0);
                i = sdot_lane::<3>(i, lo[3], y0);
                i = sdot_lane::<0>(i, hi[0], y1);
                i = sdot_lane::<1>(i, hi[1], y1);
                i = sdot_lane::<2>(i, hi[2], y1);
                i = sdot_lane::<3>(i, hi[3], y1);
                // |block integer| <= 32 * 8 * 127 < 2^24: the conversion is exact.
                let d = vmulq_n_f32(dx, fp16(yb.d));
                acc[g][t] = vfmaq_f32(acc[g][t], vcvtq_f32_s32(i), d);
            }
        }
    }
    let mut out = [[0f32; N]; 8];
    for (g, acc) in acc.iter().enumerate() {
        for (t, v) in acc.iter().enumerate() {
            let mut l = [0f32; 4];
            vst1q_f32(l.as_mut_ptr(), *v);
            for i in 0..4 {
                out[4 * g + i][t] = l[i];
            }
        }
    }
    out
}

/// Only registered by `aarch64::plug` at `Level::Dotprod` and above (see `entries!`).
pub(super) fn q4_0_q8_0_rows8_sdot(w: &[u8], rb: usize, a: &[u8], y: &mut [f32]) {
    #[target_feature(enable = "dotprod")]
    unsafe fn imp(w: &[u8], rb: usize, a: &[u8], y: &mut [f32]) {
        row_parts!(8, w, rb, y, |rows| q4_0_t8::<1>(rows, [a]).map(|r| r[0]))
    }
    // SAFETY: as for the `entries!` dotprod entry points.
    unsafe { imp(w, rb, a, y) }
}

/// As [`q4_0_q8_0_rows8_sdot`], for eight rows by four tokens.
pub(super) fn q4_0_q8_0_tile8x4_sdot(w: [&[u8]; 8], a: [&[u8]; 4]) -> [[f32; 4]; 8] {
    #[target_feature(enable = "dotprod")]
    unsafe fn imp(w: [&[u8]; 8], a: [&[u8]; 4]) -> [[f32; 4]; 8] {
        q4_0_t8::<4>(w, a)
    }
    // SAFETY: as above.
    unsafe { imp(w, a) }
}

// ---- activation quantizers (as `kernels::act`: ggml's x86 quantize_row_q8_0 / _q8_1) -------

/// One block of 32: returns d and the exact sum of the quants, and writes the quants.
#[inline(always)]
unsafe fn quantize_block(x: &[f32], q: &mut [i8; 32]) -> (f32, i32) {
    let p = x.as_ptr();
    let v: [float32x4_t; 8] = std::array::from_fn(|k| vld1q_f32(p.add(4 * k)));
    // `fold(0.0, max(|v|))`: maxNum ignores NaNs as f32::max does; max is exact in any order.
    let mut m = vdupq_n_f32(0.0);
    for vk in v {
        m = vmaxnmq_f32(m, vabsq_f32(vk));
    }
    let amax = vmaxnmvq_f32(m);
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mul = vdupq_n_f32(id);
    // Round half to even and convert, saturating (NaN to 0), as `round_ties_even() as i32`.
    let i: [int32x4_t; 8] = std::array::from_fn(|k| vcvtnq_s32_f32(vmulq_f32(v[k], mul)));
    let sum = vaddvq_s32(vaddq_s32(
        vaddq_s32(vaddq_s32(i[0], i[1]), vaddq_s32(i[2], i[3])),
        vaddq_s32(vaddq_s32(i[4], i[5]), vaddq_s32(i[6], i[7])),
    ));
    // Truncating narrows, as `r as i8`.
    let h: [int16x8_t; 4] =
        std::array::from_fn(|k| vcombine_s16(vmovn_s32(i[2 * k]), vmovn_s32(i[2 * k + 1])));
    let out = q.as_mut_ptr();
    vst1q_s8(out, vcombine_s8(vmovn_s16(h[0]), vmovn_s16(h[1])));
    vst1q_s8(out.add(16), vcombine_s8(vmovn_s16(h[2]), vmovn_s16(h[3])));
    (d, sum)
}

pub(super) fn quantize_row_q8_0(x: &[f32], dst: &mut [u8]) {
    let out: &mut [BlockQ8_0] = blocks_mut(dst);
    for (xb, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        // SAFETY: NEON is part of the aarch64 baseline; `xb` holds 32 values.
        let (d, _) = unsafe { quantize_block(xb, &mut b.qs) };
        b.d = to_fp16(d);
    }
}

pub(super) fn quantize_row_q8_1(x: &[f32], dst: &mut [u8]) {
    let out: &mut [BlockQ8_1] = blocks_mut(dst);
    for (xb, b) in x.chunks_exact(32).zip(out.iter_mut()) {
        // SAFETY: as in `quantize_row_q8_0`.
        let (d, sum) = unsafe { quantize_block(xb, &mut b.qs) };
        b.d = to_fp16(d);
        b.s = to_fp16(d * sum as f32);
    }
}

// ---- safe entry points ---------------------------------------------------------------------

/// For each generic body, a NEON entry point and a dotprod one.
macro_rules! entries {
    ($($neon:ident, $dotprod:ident => $imp:ident;)*) => {$(
        pub(in crate::kernels::aarch64) fn $neon(w: &[u8], a: &[u8]) -> f32 {
            // SAFETY: NEON is part of the aarch64 baseline.
            unsafe { $imp::<$crate::kernels::aarch64::neon::Neon>(w, a) }
        }

        pub(in crate::kernels::aarch64) fn $dotprod(w: &[u8], a: &[u8]) -> f32 {
            #[target_feature(enable = "dotprod")]
            unsafe fn imp(w: &[u8], a: &[u8]) -> f32 {
                $imp::<$crate::kernels::aarch64::neon::Sdot>(w, a)
            }
            // SAFETY: only registered by `aarch64::plug` at `Level::Dotprod` and above, which
            // `detected()` reports only when the CPU has the dot product extension.
            unsafe { imp(w, a) }
        }
    )*};
}
pub(super) use entries;

entries! {
    q8_0_q8_0, q8_0_q8_0_sdot => q8_0_q8_0_imp;
    q4_0_q8_0, q4_0_q8_0_sdot => q4_0_q8_0_imp;
    q4_1_q8_1, q4_1_q8_1_sdot => q4_1_q8_1_imp;
    q5_0_q8_0, q5_0_q8_0_sdot => q5_0_q8_0_imp;
    q5_1_q8_1, q5_1_q8_1_sdot => q5_1_q8_1_imp;
}

//! The exact int8 dot step both sparse encodings' aarch64 kernels are generic over: NEON
//! (`smull` + pairwise adds) or `sdot` (FEAT_DotProd, through inline assembly since stable
//! Rust has no intrinsic). `Sdot` may only be used inside functions compiled with
//! `#[target_feature(enable = "dotprod")]` and handed out at `Level::Dotprod` or above.

use std::arch::aarch64::*;
use std::arch::asm;

pub(crate) trait Isa {
    /// `acc + [x0y0+..+x3y3, .., x12y12+..+x15y15]`, exact.
    unsafe fn dot4(acc: int32x4_t, x: int8x16_t, y: int8x16_t) -> int32x4_t;
}

pub(crate) struct Neon;

impl Isa for Neon {
    #[inline(always)]
    unsafe fn dot4(acc: int32x4_t, x: int8x16_t, y: int8x16_t) -> int32x4_t {
        let p0 = vpaddlq_s16(vmull_s8(vget_low_s8(x), vget_low_s8(y)));
        let p1 = vpaddlq_s16(vmull_high_s8(x, y));
        vaddq_s32(acc, vpaddq_s32(p0, p1))
    }
}

pub(crate) struct Sdot;

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

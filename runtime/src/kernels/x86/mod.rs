//! The x86_64 plug: AVX2 (+FMA, F16C) kernels, and AVX-512 (F, BW, VL, VNNI) where the CPU
//! has it. Each kernel sums in the same order as its portable twin in [`super::dot`], so the
//! results are bit-identical; they differ only in how the exact integer parts are computed.
//!
//! Safety model: the kernels are `unsafe fn`s compiled with `#[target_feature]`; the safe
//! wrappers registered in the table are only reachable through [`plug`], which runs after
//! [`detected`] confirmed the features on the running CPU.

/// `[e(0), e(1), .., e(n - 1)]` (`init` fills the array first), built by a loop in the
/// enclosing function. SIMD kernels use this instead of `std::array::from_fn` or `map` with
/// a closure: a closure is compiled without its caller's target features, so whether the
/// intrinsics in it are inlined is up to the inliner's cost model, and an unrelated change
/// in the crate once made it call them out of line (Q4_0 decode fell to a fifteenth).
macro_rules! build {
    ($n:expr, $init:expr, |$i:ident| $e:expr) => {{
        let mut out = [$init; $n];
        let mut $i = 0;
        while $i < $n {
            out[$i] = $e;
            $i += 1;
        }
        out
    }};
}
pub(crate) use build;

pub(crate) mod attn;
pub(crate) mod avx2;
mod kquant;
pub(crate) mod math;

use super::{KernelTable, Level};
use crate::quant::GgmlType;

/// The x86 levels this CPU supports, lowest first.
pub fn detected() -> Vec<Level> {
    let mut v = Vec::new();
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        v.push(Level::Avx2);
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
        {
            v.push(Level::Avx512);
        }
    }
    v
}

/// Overwrites the entries of `t` that have x86 kernels at or below `level`. The caller has
/// checked that the CPU supports `level`.
pub(super) fn plug(t: &mut KernelTable, level: Level) {
    if level < Level::Avx2 {
        return;
    }
    use GgmlType::*;
    let l = Level::Avx2;
    let vnni = level >= Level::Avx512;
    // The 32-element formats take activation rows with extra bytes per block (avx2.rs): the
    // block scales as f32, Q4_0's block sums, and with VNNI the signed formats' lane
    // corrections (`signed_step`).
    let q8_0_signed = |e: &mut super::DotKernel| {
        if vnni {
            e.quantize_act = avx2::quantize_row_q8_0_corr;
            e.act_extra = 36;
        } else {
            e.quantize_act = avx2::quantize_row_q8_0;
            e.act_extra = 4;
        }
    };
    let q8_0_sum = |e: &mut super::DotKernel| {
        e.quantize_act = avx2::quantize_row_q8_0_sum;
        e.act_extra = 8;
    };
    let q8_1 = |e: &mut super::DotKernel| {
        e.quantize_act = avx2::quantize_row_q8_1;
        e.act_extra = 8;
    };
    let lv = if vnni { Level::Avx512 } else { l };
    macro_rules! set {
        ($ty:ident, $act:ident, $avx2:ident, $vnni:ident) => {
            let (name, d1, d4, r4, t24): (
                &'static str,
                super::VecDotFn,
                super::VecDot4Fn,
                super::RowsFn,
                super::Tile2x4Fn,
            ) = if vnni {
                (
                    concat!("avx512_dot_", stringify!($avx2), "_vnni"),
                    avx2::$vnni::vec_dot,
                    avx2::$vnni::vec_dot4,
                    avx2::$vnni::rows4,
                    avx2::$vnni::tile2x4,
                )
            } else {
                (
                    concat!("avx2_dot_", stringify!($avx2)),
                    avx2::$avx2::vec_dot,
                    avx2::$avx2::vec_dot4,
                    avx2::$avx2::rows4,
                    avx2::$avx2::tile2x4,
                )
            };
            t.plug($ty, lv, name, |e| {
                $act(e);
                e.vec_dot = d1;
                e.vec_dot4 = Some(d4);
                e.rows4 = Some(r4);
                e.tile2x4 = Some(t24);
            });
        };
    }
    set!(Q8_0, q8_0_signed, q8_0_q8_0, q8_0_q8_0_vnni);
    set!(Q4_0, q8_0_sum, q4_0_q8_0, q4_0_q8_0_vnni);
    // Q4_0's one integer per block: eight rows share one hadd tree per block.
    t.plug(Q4_0, lv, name_q4_0(vnni), |e| {
        e.rows8 = Some(if vnni {
            avx2::q4_0_q8_0_rows8_vnni
        } else {
            avx2::q4_0_q8_0_rows8
        });
        e.tile8x4 = Some(if vnni {
            avx2::q4_0_q8_0_tile8x4_vnni
        } else {
            avx2::q4_0_q8_0_tile8x4
        });
    });
    set!(Q4_1, q8_1, q4_1_q8_1, q4_1_q8_1_vnni);
    set!(Q5_0, q8_0_signed, q5_0_q8_0, q5_0_q8_0_vnni);
    // Signed-weight formats: four rows by four tokens, twice over, for batches.
    let t8x4: [(GgmlType, [&'static str; 2], [super::Tile8x4Fn; 2]); 2] = [
        (
            Q8_0,
            ["avx2_dot_q8_0_q8_0", "avx512_dot_q8_0_q8_0_vnni"],
            [avx2::q8_0_q8_0_tile8x4, avx2::q8_0_q8_0_tile8x4_vnni],
        ),
        (
            Q5_0,
            ["avx2_dot_q5_0_q8_0", "avx512_dot_q5_0_q8_0_vnni"],
            [avx2::q5_0_q8_0_tile8x4, avx2::q5_0_q8_0_tile8x4_vnni],
        ),
    ];
    for (ty, names, tile) in t8x4 {
        t.plug(ty, lv, names[vnni as usize], |e| {
            e.tile8x4 = Some(tile[vnni as usize])
        });
    }
    set!(Q5_1, q8_1, q5_1_q8_1, q5_1_q8_1_vnni);
    t.plug(F16, l, "avx2_dot_f16_f16", |e| e.vec_dot = avx2::f16_f16);
    t.plug(Q4_K, l, "avx2_dot_q4_k_q8_k", |e| {
        e.vec_dot = kquant::q4_k_q8_k;
        e.gemm = Some(kquant::q4_k_q8_k_gemm);
        e.tiled = Some(kquant::q4_k_q8_k_tiled);
        e.gemm4 = Some(kquant::q4_k_q8_k_gemm4);
        e.tiled4 = Some(kquant::q4_k_q8_k_tiled4);
    });
    t.plug(Q5_K, l, "avx2_dot_q5_k_q8_k", |e| {
        e.vec_dot = kquant::q5_k_q8_k;
        e.tiled = Some(kquant::q5_k_q8_k_tiled);
        e.tiled4 = Some(kquant::q5_k_q8_k_tiled4);
    });
    t.plug(Q6_K, l, "avx2_dot_q6_k_q8_k", |e| {
        e.vec_dot = kquant::q6_k_q8_k;
        e.tiled = Some(kquant::q6_k_q8_k_tiled);
        e.tiled4 = Some(kquant::q6_k_q8_k_tiled4);
    });
}

fn name_q4_0(vnni: bool) -> &'static str {
    if vnni {
        "avx512_dot_q4_0_q8_0_vnni"
    } else {
        "avx2_dot_q4_0_q8_0"
    }
}

//! The aarch64 plug: NEON kernels for every aarch64 CPU, and `sdot` (dotprod) kernels where
//! the CPU has the dot product extension, each summing in the order of its portable twin in
//! [`super::dot`], so the results are bit-identical; they differ only in how the exact integer
//! parts are computed (see `neon.rs`).
//!
//! `Level::I8mm` registers nothing of its own yet: `smmla` multiplies a 2x8 by an 8x2 block of
//! bytes, i.e. two weight rows by two activation rows, each output a sum of 8 products, so it
//! pays off only in kernels over several rows and tokens. The table has such entry points now
//! (`tile2x4`: two weight rows by four tokens, used for prompt batches), which is where an
//! i8mm kernel belongs; until one is written, an I8mm table holds the dotprod kernels under
//! their own names (the suite only asks that an entry's level be at most the table's). Q4_0
//! has `rows8` (decode) and `tile8x4` (batches) at the dotprod level: eight rows transposed
//! once per block, `sdot` by element, as the x86 kernels do. The five 32-block formats have
//! `rows4` (four rows, one token), `vec_dot4` (one row, four tokens) and `tile2x4` (two rows,
//! four tokens) at both levels: each weight block unpacked once for the tokens, each pair
//! summed in its one-pair order. The K-quants have their `gemm` / `tiled` forms.
//!
//! Safety model: see `neon.rs`. [`plug`] runs only for a level in [`detected`], and registers
//! the dotprod entry points only at `Level::Dotprod` and above.

mod kquant;
pub(crate) mod neon;

use super::{KernelTable, Level, QuantizeRowFn, RowsFn, Tile2x4Fn, VecDot4Fn, VecDotFn};
use crate::quant::GgmlType;

/// The aarch64 levels this CPU supports, lowest first.
pub fn detected() -> Vec<Level> {
    let mut v = vec![Level::Neon];
    if std::arch::is_aarch64_feature_detected!("dotprod") {
        v.push(Level::Dotprod);
        if std::arch::is_aarch64_feature_detected!("i8mm") {
            v.push(Level::I8mm);
        }
    }
    v
}

/// One level's kernels and their names.
struct Set {
    level: Level,
    /// Names for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, in that order.
    names: [&'static str; 8],
    q8_0: VecDotFn,
    q4_0: VecDotFn,
    q4_1: VecDotFn,
    q5_0: VecDotFn,
    q5_1: VecDotFn,
    /// vec_dot, gemm, tiled.
    q4_k: [VecDotFn; 3],
    /// vec_dot, tiled.
    q5_k: [VecDotFn; 2],
    /// vec_dot, tiled.
    q6_k: [VecDotFn; 2],
    /// rows4, vec_dot4 and tile2x4 of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.
    shapes: [(RowsFn, VecDot4Fn, Tile2x4Fn); 5],
}

/// The `rows4`, `vec_dot4`, `tile2x4` of the five 32-block formats, in `Set::names` order,
/// from the `neon` or `sdot` forms of `neon.rs`'s `shapes!`.
macro_rules! shapes {
    ($isa:ident) => {
        [
            (
                neon::q8_0_q8_0_n::$isa::rows4,
                neon::q8_0_q8_0_n::$isa::vec_dot4,
                neon::q8_0_q8_0_n::$isa::tile2x4,
            ),
            (
                neon::q4_0_q8_0_n::$isa::rows4,
                neon::q4_0_q8_0_n::$isa::vec_dot4,
                neon::q4_0_q8_0_n::$isa::tile2x4,
            ),
            (
                neon::q4_1_q8_1_n::$isa::rows4,
                neon::q4_1_q8_1_n::$isa::vec_dot4,
                neon::q4_1_q8_1_n::$isa::tile2x4,
            ),
            (
                neon::q5_0_q8_0_n::$isa::rows4,
                neon::q5_0_q8_0_n::$isa::vec_dot4,
                neon::q5_0_q8_0_n::$isa::tile2x4,
            ),
            (
                neon::q5_1_q8_1_n::$isa::rows4,
                neon::q5_1_q8_1_n::$isa::vec_dot4,
                neon::q5_1_q8_1_n::$isa::tile2x4,
            ),
        ]
    };
}

macro_rules! names {
    ($p:literal) => {
        [
            concat!($p, "_dot_q8_0_q8_0"),
            concat!($p, "_dot_q4_0_q8_0"),
            concat!($p, "_dot_q4_1_q8_1"),
            concat!($p, "_dot_q5_0_q8_0"),
            concat!($p, "_dot_q5_1_q8_1"),
            concat!($p, "_dot_q4_k_q8_k"),
            concat!($p, "_dot_q5_k_q8_k"),
            concat!($p, "_dot_q6_k_q8_k"),
        ]
    };
}

const NEON: Set = Set {
    level: Level::Neon,
    names: names!("neon"),
    q8_0: neon::q8_0_q8_0,
    q4_0: neon::q4_0_q8_0,
    q4_1: neon::q4_1_q8_1,
    q5_0: neon::q5_0_q8_0,
    q5_1: neon::q5_1_q8_1,
    q4_k: [
        kquant::q4_k_q8_k,
        kquant::q4_k_q8_k_gemm,
        kquant::q4_k_q8_k_tiled,
    ],
    q5_k: [kquant::q5_k_q8_k, kquant::q5_k_q8_k_tiled],
    q6_k: [kquant::q6_k_q8_k, kquant::q6_k_q8_k_tiled],
    shapes: shapes!(neon),
};

/// Only ever registered after `detected()` reported `Level::Dotprod` (the entry points are
/// `unsafe` inside: see `neon.rs`).
const DOTPROD: Set = Set {
    level: Level::Dotprod,
    names: names!("dotprod"),
    q8_0: neon::q8_0_q8_0_sdot,
    q4_0: neon::q4_0_q8_0_sdot,
    q4_1: neon::q4_1_q8_1_sdot,
    q5_0: neon::q5_0_q8_0_sdot,
    q5_1: neon::q5_1_q8_1_sdot,
    q4_k: [
        kquant::q4_k_q8_k_sdot,
        kquant::q4_k_q8_k_gemm_sdot,
        kquant::q4_k_q8_k_tiled_sdot,
    ],
    q5_k: [kquant::q5_k_q8_k_sdot, kquant::q5_k_q8_k_tiled_sdot],
    q6_k: [kquant::q6_k_q8_k_sdot, kquant::q6_k_q8_k_tiled_sdot],
    shapes: shapes!(sdot),
};

fn register(t: &mut KernelTable, s: &Set) {
    use GgmlType::*;
    let (l, n) = (s.level, &s.names);
    // The activation quantizers use no dotprod instruction: the NEON ones at every level.
    let q8_0 = neon::quantize_row_q8_0 as QuantizeRowFn;
    let q8_1 = neon::quantize_row_q8_1 as QuantizeRowFn;
    for ((ty, name, dot, act), (r4, d4, t24)) in [
        (Q8_0, n[0], s.q8_0, q8_0),
        (Q4_0, n[1], s.q4_0, q8_0),
        (Q4_1, n[2], s.q4_1, q8_1),
        (Q5_0, n[3], s.q5_0, q8_0),
        (Q5_1, n[4], s.q5_1, q8_1),
    ]
    .into_iter()
    .zip(s.shapes)
    {
        t.plug(ty, l, name, |e| {
            e.vec_dot = dot;
            e.quantize_act = act;
            e.rows4 = Some(r4);
            e.vec_dot4 = Some(d4);
            e.tile2x4 = Some(t24);
        });
    }
    // Q8_K activations: the format's own quantizer, which is the x86 one (see dot.rs).
    t.plug(Q4_K, l, n[5], |e| {
        e.vec_dot = s.q4_k[0];
        e.gemm = Some(s.q4_k[1]);
        e.tiled = Some(s.q4_k[2]);
    });
    t.plug(Q5_K, l, n[6], |e| {
        e.vec_dot = s.q5_k[0];
        e.tiled = Some(s.q5_k[1]);
    });
    t.plug(Q6_K, l, n[7], |e| {
        e.vec_dot = s.q6_k[0];
        e.tiled = Some(s.q6_k[1]);
    });
}

/// Overwrites the entries of `t` that have aarch64 kernels at or below `level`. The caller
/// has checked that the CPU supports `level`.
pub(super) fn plug(t: &mut KernelTable, level: Level) {
    if level >= Level::Neon {
        register(t, &NEON);
    }
    if level >= Level::Dotprod {
        register(t, &DOTPROD);
        // Q4_0's one integer per block: eight rows transposed, `sdot` by element.
        t.plug(GgmlType::Q4_0, Level::Dotprod, DOTPROD.names[1], |e| {
            e.rows8 = Some(neon::q4_0_q8_0_rows8_sdot);
            e.tile8x4 = Some(neon::q4_0_q8_0_tile8x4_sdot);
        });
    }
}

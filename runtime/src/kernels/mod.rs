//! CPU kernels: the one dispatch point for matrix products, keyed on the weight's encoding.
//!
//! [`KernelTable::get`] returns the table built once at start-up: the portable entries first
//! ([`KernelTable::generic`], built from the routines in [`dot`] and [`act`]), then the arch
//! plug of the running CPU ([`x86`] or [`aarch64`]) overwrites the entries it has faster
//! kernels for, up to the highest [`Level`] that the CPU reports at run time. The model code
//! never changes when a kernel is added.
//!
//! Every entry computes the same numbers as the portable one, bit for bit: the portable dots
//! sum in the lane orders of ggml's x86 kernels (see [`dot`]), and the SIMD kernels keep those
//! orders. The shared test suite (`tests/kernels.rs` of the runtime crate) checks every entry
//! of every level the CPU has against the portable table.
//!
//! `SPARROW_KERNELS` limits the level for A/B runs: `generic` (or `off`) turns every plug
//! off; `avx2`, `avx512`, `neon`, `dotprod`, `i8mm` cap the plug at that level.

/// The loop of a [`RowsFn`] with K rows per step (`$k`), for the inside of the kernel's
/// target-feature function so that its K-row body (`|rows| body`, mapping `[&[u8]; K]` to
/// `[f32; K]`) inlines. Panics unless the shapes are as [`RowsFn`] says.
macro_rules! row_parts {
    ($k:literal, $w:expr, $rb:expr, $y:expr, |$rows:ident| $body:expr) => {{
        let (w, rb, y): (&[u8], usize, &mut [f32]) = ($w, $rb, $y);
        let q = y.len() / $k;
        assert!(
            y.len() == $k * q && Some(w.len()) == y.len().checked_mul(rb),
            "rows: {} rows of {rb} bytes in {} bytes (a multiple of {} rows)",
            y.len(),
            w.len(),
            $k
        );
        for r in 0..q {
            // A loop, not `std::array::from_fn`: a closure is compiled without the kernel's
            // target features and may stay out of line (see x86's `build!`).
            let mut $rows: [&[u8]; $k] = [&[]; $k];
            for (i, s) in $rows.iter_mut().enumerate() {
                // SAFETY: (r + i q + 1) rb <= K q rb == w.len() for i < K, r < q. (Some
                // callers expand this inside an unsafe block.)
                #[allow(unused_unsafe)]
                let row = unsafe { w.get_unchecked((r + i * q) * rb..(r + i * q + 1) * rb) };
                *s = row;
            }
            let v: [f32; $k] = $body;
            for (i, v) in v.into_iter().enumerate() {
                // SAFETY: r + i q < K q == y.len().
                #[allow(unused_unsafe)]
                let out = unsafe { y.get_unchecked_mut(r + i * q) };
                *out = v;
            }
        }
    }};
}

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
pub mod act;
pub mod attn;
pub mod bandwidth;
pub mod dot;
pub mod math;
mod matmul;
mod pool;
#[cfg(target_arch = "x86_64")]
pub mod x86;

pub(crate) use matmul::Held;
pub use matmul::{matmul, matmul_shared, MatmulScratch};
pub use pool::{default_threads, DisjointOut, ThreadPool};

use crate::quant::{self, GgmlType};
use std::sync::OnceLock;

/// Quantizes one row of activations into the entry's activation type.
pub type QuantizeRowFn = fn(&[f32], &mut [u8]);
/// Dot product of one weight row and one quantized activation row of the same length.
pub type VecDotFn = fn(&[u8], &[u8]) -> f32;
/// The dot products of one weight row with four activation rows: four `VecDotFn` results,
/// bit for bit, with the weight row's blocks unpacked once.
pub type VecDot4Fn = fn(&[u8], [&[u8]; 4]) -> [f32; 4];
/// `rows(w, rb, a, y)`: the dot products of the `y.len()` weight rows of `w` (`rb` bytes
/// each, `w.len() == y.len() * rb`) with one activation row, `y[j] = VecDotFn(row j, a)` bit
/// for bit, computed K rows side by side (K independent accumulator chains: 4 for `rows4`,
/// 8 for `rows8`; `y.len()` a multiple of K). The K rows of a step come from the K equal
/// parts of the slice, rows `r, r + q, .., r + (K - 1) q` with `q = y.len() / K`: K
/// sequential streams, which the hardware prefetchers follow (K neighbouring rows read side
/// by side are not a stream to them, and run slower than one). The loop over the slice runs
/// inside the kernel (`row_parts!`): a call per K rows, with its row slices and results
/// copied through memory, cost 6-12% of a decode step's product time (SmolLM2 Q4_0, 1 and
/// 2 threads).
pub type RowsFn = fn(&[u8], usize, &[u8], &mut [f32]);

/// The dot products of two weight rows with four activation rows (`[row][token]`), bit for bit
/// the `VecDotFn` results: the tile of a batch, sharing weight unpacking across tokens and
/// activation loads across rows.
pub type Tile2x4Fn = fn([&[u8]; 2], [&[u8]; 4]) -> [[f32; 4]; 2];
/// As [`Tile2x4Fn`] for eight weight rows by four tokens.
pub type Tile8x4Fn = fn([&[u8]; 8], [&[u8]; 4]) -> [[f32; 4]; 8];

/// CPU feature levels a plug can target, lowest first within each architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Portable Rust, no arch plug.
    Generic,
    /// x86_64 with AVX2, FMA and F16C.
    Avx2,
    /// x86_64 with AVX-512 F, BW, VL and VNNI on top of `Avx2`.
    Avx512,
    /// aarch64 Advanced SIMD (every aarch64 CPU).
    Neon,
    /// aarch64 with the dot product extension (`sdot`).
    Dotprod,
    /// aarch64 with the int8 matrix multiply extension (`smmla`) on top of `Dotprod`.
    I8mm,
}

impl Level {
    /// The name used by `SPARROW_KERNELS` and in kernel names.
    pub fn name(self) -> &'static str {
        match self {
            Level::Generic => "generic",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Neon => "neon",
            Level::Dotprod => "dotprod",
            Level::I8mm => "i8mm",
        }
    }

    fn parse(s: &str) -> Option<Level> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "generic" | "off" | "none" | "portable" => Level::Generic,
            "avx2" => Level::Avx2,
            "avx512" => Level::Avx512,
            "neon" => Level::Neon,
            "dotprod" => Level::Dotprod,
            "i8mm" => Level::I8mm,
            _ => return None,
        })
    }

    /// Every level the running CPU supports, lowest first (always starts with `Generic`).
    pub fn detected() -> Vec<Level> {
        let mut v = vec![Level::Generic];
        #[cfg(target_arch = "x86_64")]
        v.extend(x86::detected());
        #[cfg(target_arch = "aarch64")]
        v.extend(aarch64::detected());
        v
    }

    /// The level `KernelTable::get` uses: the highest detected one, capped by
    /// `SPARROW_KERNELS` when it is set.
    pub fn selected() -> Level {
        let detected = Level::detected();
        let best = *detected.last().unwrap_or(&Level::Generic);
        let Ok(want) = std::env::var("SPARROW_KERNELS") else {
            return best;
        };
        match Level::parse(&want) {
            Some(l) if l == Level::Generic || detected.contains(&l) => l,
            Some(l) => {
                log::warn!(
                    "SPARROW_KERNELS={want}: this CPU has no {} support; using {}",
                    l.name(),
                    best.name()
                );
                best
            }
            None => {
                log::warn!(
                    "SPARROW_KERNELS={want} is not one of generic, avx2, avx512, neon, dotprod, i8mm; using {}",
                    best.name()
                );
                best
            }
        }
    }
}

/// How to multiply weights of one encoding by activations.
#[derive(Clone, Copy)]
pub struct DotKernel {
    /// A name that says arch, op and types (`generic_dot_q4_1_q8_1`, `avx2_dot_q4_1_q8_1`).
    pub name: &'static str,
    /// The level of the plug that registered it.
    pub level: Level,
    pub weight_type: GgmlType,
    /// The format activations are quantized to once per row before the dot products.
    pub act_type: GgmlType,
    /// Extra bytes per activation block that `quantize_act` appends after the row of
    /// `act_type` blocks, for what a kernel wants precomputed once per row instead of once
    /// per weight row (e.g. the block scales as f32). 0 for the portable entries.
    pub act_extra: usize,
    /// Writes one row of activations: `act_type` blocks, then `act_extra` bytes per block.
    pub quantize_act: QuantizeRowFn,
    /// The dot for one token (every decode step), in llama.cpp's order for one token.
    pub vec_dot: VecDotFn,
    /// `vec_dot` for four tokens at once, where the plug has it (batches).
    pub vec_dot4: Option<VecDot4Fn>,
    /// `vec_dot` for four weight rows at once, where the plug has it (decode steps).
    pub rows4: Option<RowsFn>,
    /// `vec_dot` for eight weight rows at once, where the plug has it (decode; preferred over
    /// `rows4`).
    pub rows8: Option<RowsFn>,
    /// `vec_dot` for two weight rows by four tokens, where the plug has it (batches).
    pub tile2x4: Option<Tile2x4Fn>,
    /// `vec_dot` for eight weight rows by four tokens, where the plug has it (batches;
    /// preferred over `tile2x4`).
    pub tile8x4: Option<Tile8x4Fn>,
    /// Q4_K only: the order of llama.cpp's repacked gemm, for tokens taken four at a time.
    pub gemm: Option<VecDotFn>,
    /// K-quants only: the order of llama.cpp's tiled matmul, for batches of 8 or more.
    pub tiled: Option<VecDotFn>,
    /// `gemm` for four tokens at once, where the plug has it.
    pub gemm4: Option<VecDot4Fn>,
    /// `tiled` for four tokens at once, where the plug has it.
    pub tiled4: Option<VecDot4Fn>,
}

impl DotKernel {
    /// Bytes of one quantized activation row of `cols` values (a whole number of blocks).
    pub fn act_row_bytes(&self, cols: usize) -> Option<usize> {
        let base = self.act_type.row_bytes(cols as u64)? as usize;
        Some(base + cols / self.act_type.block_size() * self.act_extra)
    }

    /// The order llama.cpp uses for token `t` of a batch of `n` tokens against a weight
    /// matrix of `rows` rows, where it differs from the per-token kernel:
    /// - Q4_K, repacked (rows % 8 == 0): `forward_mul_mat` in repack.cpp runs
    ///   `ggml_gemm_q4_K_8x8_q8_K` on the first `n - n % 4` tokens when n >= 4 and
    ///   `ggml_gemv_q4_K_8x8_q8_K` on the rest ([`dot::q4_k_q8_k_gemm`]);
    /// - Q5_K, Q6_K, and Q4_K that is not repacked: the tiled matmul (ggml-cpu/tiled) takes
    ///   the whole batch when n >= 8 ([`dot::q5_k_q8_k_tiled`] and friends).
    ///
    /// (Not reproduced: unrepacked Q4_K with n < 8, which llama.cpp sends through
    /// `ggml_vec_dot_q4_K_q8_K`; the table's Q4_K kernel follows the repacked gemv.)
    pub fn variant_for(&self, rows: usize, n: usize, t: usize) -> Variant {
        match self.weight_type {
            GgmlType::Q4_K if rows.is_multiple_of(8) => {
                if n >= 4 && t < n - n % 4 {
                    Variant::Gemm
                } else {
                    Variant::Token
                }
            }
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K if n >= 8 => Variant::Tiled,
            _ => Variant::Token,
        }
    }

    /// The four-token dot of a variant, where the entry has one.
    pub fn dot4(&self, v: Variant) -> Option<VecDot4Fn> {
        match v {
            Variant::Token => self.vec_dot4,
            Variant::Gemm => self.gemm4,
            Variant::Tiled => self.tiled4,
        }
    }

    /// The dot of a variant (the per-token one where the entry lacks it).
    pub fn dot(&self, v: Variant) -> VecDotFn {
        match v {
            Variant::Token => self.vec_dot,
            Variant::Gemm => self.gemm.unwrap_or(self.vec_dot),
            Variant::Tiled => self.tiled.unwrap_or(self.vec_dot),
        }
    }
}

/// Which of an entry's summation orders a token takes (see [`DotKernel::variant_for`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// `vec_dot`: one token, every decode step.
    Token,
    /// `gemm`: Q4_K tokens that llama.cpp's repacked gemm takes four at a time.
    Gemm,
    /// `tiled`: K-quant batches of 8 or more.
    Tiled,
}

/// The table of kernels, indexed by ggml type id.
pub struct KernelTable {
    level: Level,
    dot: Vec<Option<DotKernel>>,
}

impl KernelTable {
    /// The process-wide table, built on first use at [`Level::selected`].
    pub fn get() -> &'static KernelTable {
        static TABLE: OnceLock<KernelTable> = OnceLock::new();
        TABLE.get_or_init(|| {
            let t = KernelTable::for_level(Level::selected());
            log::debug!("CPU kernels: {}", t.level.name());
            t
        })
    }

    /// The portable entries plus the plugs up to `level` (which must be one of
    /// [`Level::detected`]; a level the CPU lacks gives the portable table).
    pub fn for_level(level: Level) -> KernelTable {
        let mut t = KernelTable::generic();
        if level == Level::Generic || !Level::detected().contains(&level) {
            return t;
        }
        #[cfg(target_arch = "x86_64")]
        x86::plug(&mut t, level);
        #[cfg(target_arch = "aarch64")]
        aarch64::plug(&mut t, level);
        t.level = level;
        t
    }

    /// The level this table was built for.
    pub fn level(&self) -> Level {
        self.level
    }

    /// Portable entries for every weight type sparrow computes with.
    pub fn generic() -> KernelTable {
        let mut dot = vec![None; 64];
        for ty in quant::WEIGHT_TYPES {
            let Some(w) = quant::ops(ty) else { continue };
            let Some(a) = quant::ops(w.vec_dot_type) else {
                continue;
            };
            // Q8_0 / Q8_1 activations as ggml's CPU backend makes them; the rest (F32, F16,
            // BF16, Q8_K) with the format's own quantizer, as ggml does.
            let quantize_act: QuantizeRowFn = match w.vec_dot_type {
                GgmlType::Q8_0 => act::quantize_row_q8_0,
                GgmlType::Q8_1 => act::quantize_row_q8_1,
                _ => a.quantize,
            };
            // F16 and the 32-element formats sum in ggml's x86 lane orders, the K-quants in
            // the order llama.cpp uses for one token (dot.rs; a batch takes other orders, see
            // DotKernel::dot_for); the rest use the format's reference dot.
            let vec_dot: VecDotFn = match ty {
                GgmlType::F16 => dot::f16_f16,
                GgmlType::Q8_0 => dot::q8_0_q8_0,
                GgmlType::Q4_0 => dot::q4_0_q8_0,
                GgmlType::Q4_1 => dot::q4_1_q8_1,
                GgmlType::Q5_0 => dot::q5_0_q8_0,
                GgmlType::Q5_1 => dot::q5_1_q8_1,
                GgmlType::Q4_K => dot::q4_k_q8_k,
                GgmlType::Q5_K => dot::q5_k_q8_k,
                GgmlType::Q6_K => dot::q6_k_q8_k,
                _ => w.vec_dot,
            };
            let (gemm, tiled): (Option<VecDotFn>, Option<VecDotFn>) = match ty {
                GgmlType::Q4_K => (Some(dot::q4_k_q8_k_gemm), Some(dot::q4_k_q8_k_tiled)),
                GgmlType::Q5_K => (None, Some(dot::q5_k_q8_k_tiled)),
                GgmlType::Q6_K => (None, Some(dot::q6_k_q8_k_tiled)),
                _ => (None, None),
            };
            dot[ty.id() as usize] = Some(DotKernel {
                name: generic_name(ty),
                level: Level::Generic,
                weight_type: ty,
                act_type: w.vec_dot_type,
                act_extra: 0,
                quantize_act,
                vec_dot,
                vec_dot4: None,
                rows4: None,
                rows8: None,
                tile2x4: None,
                tile8x4: None,
                gemm,
                tiled,
                gemm4: None,
                tiled4: None,
            });
        }
        KernelTable {
            level: Level::Generic,
            dot,
        }
    }

    /// The dot kernel for weights of type `ty`, if any.
    pub fn dot(&self, ty: GgmlType) -> Option<&DotKernel> {
        self.dot.get(ty.id() as usize).and_then(Option::as_ref)
    }

    /// Every registered entry (for the shared kernel test suite).
    pub fn entries(&self) -> impl Iterator<Item = &DotKernel> {
        self.dot.iter().flatten()
    }

    /// For plugs: replaces parts of the entry for `ty` (which must exist) and renames it.
    #[allow(dead_code)]
    pub(crate) fn plug(
        &mut self,
        ty: GgmlType,
        level: Level,
        name: &'static str,
        f: impl FnOnce(&mut DotKernel),
    ) {
        if let Some(Some(e)) = self.dot.get_mut(ty.id() as usize) {
            f(e);
            e.name = name;
            e.level = level;
        }
    }
}

fn generic_name(ty: GgmlType) -> &'static str {
    use GgmlType::*;
    match ty {
        F32 => "generic_dot_f32_f32",
        F16 => "generic_dot_f16_f16",
        BF16 => "generic_dot_bf16_bf16",
        Q8_0 => "generic_dot_q8_0_q8_0",
        Q4_0 => "generic_dot_q4_0_q8_0",
        Q4_1 => "generic_dot_q4_1_q8_1",
        Q5_0 => "generic_dot_q5_0_q8_0",
        Q5_1 => "generic_dot_q5_1_q8_1",
        Q4_K => "generic_dot_q4_k_q8_k",
        Q5_K => "generic_dot_q5_k_q8_k",
        Q6_K => "generic_dot_q6_k_q8_k",
        _ => "generic_dot",
    }
}

//! CPU kernels: the one dispatch point for matrix products, keyed on the weight's encoding.
//!
//! [`KernelTable::get`] returns the table built once at start-up. Today it holds the portable
//! entries, built from the reference routines in [`crate::quant`]; arch plugs (AVX2, NEON)
//! overwrite entries for the CPUs that support them, so the model code never changes when a
//! kernel is added.

pub mod act;
pub mod dot;
pub mod math;
mod matmul;
mod pool;

pub use matmul::{matmul, MatmulScratch};
pub use pool::{default_threads, DisjointOut, ThreadPool};

use crate::quant::{self, GgmlType};
use std::sync::OnceLock;

/// Quantizes one row of activations into the entry's activation type.
pub type QuantizeRowFn = fn(&[f32], &mut [u8]);
/// Dot product of one weight row and one quantized activation row of the same length.
pub type VecDotFn = fn(&[u8], &[u8]) -> f32;

/// How to multiply weights of one encoding by activations.
#[derive(Clone, Copy)]
pub struct DotKernel {
    /// A name that says arch, op and types (`generic_dot_q4_1_q8_1`).
    pub name: &'static str,
    pub weight_type: GgmlType,
    /// The format activations are quantized to once per row before the dot products.
    pub act_type: GgmlType,
    pub quantize_act: QuantizeRowFn,
    pub vec_dot: VecDotFn,
}

/// The table of kernels, indexed by ggml type id.
pub struct KernelTable {
    dot: Vec<Option<DotKernel>>,
}

impl KernelTable {
    /// The process-wide table, built on first use.
    pub fn get() -> &'static KernelTable {
        static TABLE: OnceLock<KernelTable> = OnceLock::new();
        TABLE.get_or_init(KernelTable::generic)
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
            // The 32-element formats sum in ggml's x86 lane order, the K-quants in the order
            // llama.cpp uses for one token (dot.rs; a batch takes other kernels there, see
            // dot::batch_vec_dot); the rest use the format's reference dot.
            let vec_dot: VecDotFn = match ty {
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
            dot[ty.id() as usize] = Some(DotKernel {
                name: generic_name(ty),
                weight_type: ty,
                act_type: w.vec_dot_type,
                quantize_act,
                vec_dot,
            });
        }
        KernelTable { dot }
    }

    /// The dot kernel for weights of type `ty`, if any.
    pub fn dot(&self, ty: GgmlType) -> Option<&DotKernel> {
        self.dot.get(ty.id() as usize).and_then(Option::as_ref)
    }

    /// Every registered entry (for the shared kernel test suite).
    pub fn entries(&self) -> impl Iterator<Item = &DotKernel> {
        self.dot.iter().flatten()
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

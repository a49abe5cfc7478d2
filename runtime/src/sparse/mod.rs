//! Sparse base weights (see DESIGN.md, "Sparse weights"): encodings that store only the
//! weights a pruned matrix keeps, and the matrix-vector and matrix-matrix (batch) kernels
//! that read them ([`matmul`] runs a model's products through them).
//!
//! - [`nm`]: N:M structured sparsity: in every group of M consecutive input weights of a row,
//!   N are kept (2:4, 4:8, general N <= M <= 16); values quantized per block.
//! - [`group`]: group sparsity: rows cut into groups of g consecutive input weights, only the
//!   groups that are not all zero are stored (CSR over groups), values quantized per group.
//!
//! Each encoding is a byte layout meant to be read in place from a memory map (the GGUF
//! container stores it as raw bytes with self-describing metadata), with a reference encoder
//! from f32 rows, a reference decoder back to f32, and kernels checked against the dense
//! product of the decoded weights.

#[cfg(target_arch = "aarch64")]
mod arm;
pub mod edit;
pub mod group;
pub mod matmul;
pub mod nm;
pub mod prune;
pub mod store;

//! The operations a forward pass needs, behind one trait, so that the model is written once
//! and runs on the CPU backend today and on a GPU backend later.
//!
//! Buffers hold f32 activations laid out row-major, one row per token. Weights are loaded
//! once from their tensor's bytes in the mapping; `host` is the whole mapping, which a
//! backend that keeps weights as views (the CPU) reads at run time and a backend with its own
//! copies (a GPU) ignores.

use super::config::Config;
use crate::adapter::side::Side;
use crate::gguf::TensorInfo;
use crate::sparse::store::SparseMatrix;
use crate::Result;
use std::sync::Arc;

pub trait Backend {
    /// A weight tensor as this backend holds it.
    type Weight;
    /// An activation buffer.
    type Buf;
    /// The key/value cache of every layer.
    type Kv;

    fn name(&self) -> String;
    fn threads(&self) -> usize;

    /// Prepares a weight. `data` is the tensor's bytes, `offset` where they start in `host`;
    /// `sparse` describes a sparse matrix (stored as raw bytes, see `sparse::store`).
    fn load_weight(
        &mut self,
        info: &TensorInfo,
        offset: usize,
        sparse: Option<SparseMatrix>,
    ) -> Result<Self::Weight>;
    /// Sets (or clears) the terms computed beside weight `w` in every later product
    /// (unfused LoRA, sparse residuals of fused adapters).
    fn set_side(&mut self, w: &mut Self::Weight, side: Option<Arc<Side>>);
    fn alloc(&mut self, len: usize) -> Self::Buf;
    fn kv_cache(&mut self, cfg: &Config, n_ctx: usize) -> Result<Self::Kv>;

    /// `out[t]` = row `ids[t]` of the embedding table, dequantized.
    fn embed(
        &mut self,
        host: &[u8],
        table: &Self::Weight,
        ids: &[u32],
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `out[t]` = rms_norm(`x[t]`) * `w`, for `n` rows of `w`'s length.
    fn rms_norm(
        &mut self,
        host: &[u8],
        x: &Self::Buf,
        w: &Self::Weight,
        eps: f32,
        n: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `out[t]` = W `x[t]`, for `n` rows.
    fn matmul(
        &mut self,
        host: &[u8],
        w: &Self::Weight,
        x: &Self::Buf,
        n: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `outs[i][t]` = `ws[i]` `x[t]` for several weights that take the same input (attention's
    /// q, k and v; the MLP's gate and up), as `matmul` gives them one by one; a backend may
    /// run them together.
    fn matmul_shared(
        &mut self,
        host: &[u8],
        ws: &[&Self::Weight],
        x: &Self::Buf,
        n: usize,
        outs: &mut [&mut Self::Buf],
    ) -> Result<()> {
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            self.matmul(host, w, x, n, out)?;
        }
        Ok(())
    }
    /// `x[t]` += `b`, for `n` rows of `b`'s length.
    fn add_bias(
        &mut self,
        host: &[u8],
        b: &Self::Weight,
        x: &mut Self::Buf,
        n: usize,
    ) -> Result<()>;
    /// Rotary embedding of `n` rows of `n_heads` heads, row t at position `pos0 + t`.
    fn rope(&mut self, cfg: &Config, x: &mut Self::Buf, n: usize, n_heads: usize, pos0: usize);
    /// Stores `k`, `v` of `n` tokens at `pos0..` in layer `layer`'s cache, then causal
    /// attention of `q` over positions `0..pos0 + n`, heads concatenated into `out`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        cfg: &Config,
        kv: &mut Self::Kv,
        layer: usize,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        pos0: usize,
        n: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `gate[i]` = silu(`gate[i]`) * `up[i]` for the first `len` elements.
    fn swiglu(&mut self, gate: &mut Self::Buf, up: &Self::Buf, len: usize);
    /// `x[i]` += `y[i]` for the first `len` elements.
    fn add(&mut self, x: &mut Self::Buf, y: &Self::Buf, len: usize);
    /// Copies `len` elements starting at `offset` from `src` to the start of `dst`.
    fn copy(&mut self, src: &Self::Buf, offset: usize, len: usize, dst: &mut Self::Buf);
    /// Reads `out.len()` elements from the start of `buf` into host memory.
    fn read(&mut self, buf: &Self::Buf, out: &mut [f32]);
}

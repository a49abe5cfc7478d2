//! The CPU backend: weights are views into the mapping, products go through the kernel table.
//!
//! Numerics follow llama.cpp's CPU path with flash attention off, so that greedy decoding
//! matches it token for token: an F16 key/value cache, queries rounded to F16 for Q.K, the
//! softmax rounded to F16 before it weighs V, RMSNorm summed in f64, RoPE angles built by
//! repeated multiplication as ggml builds them.

use super::backend::Backend;
use super::config::{Config, RopeKind};
use crate::adapter::side::Side;
use crate::gguf::TensorInfo;
use crate::kernels::attn::{self, KvRows, SumOrder};
use crate::kernels::{self, math, MatmulScratch, ThreadPool};
use crate::quant::{self, GgmlType};
use crate::sparse::{self, matmul::SparseScratch, store::SparseMatrix};
use crate::{Error, Result};
use half::f16;
use half::slice::HalfFloatSliceExt;
use std::collections::HashMap;
use std::sync::Arc;

/// A weight as a view: its type, shape and byte range in the mapping.
#[derive(Clone, Debug)]
pub struct CpuWeight {
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub range: std::ops::Range<usize>,
    /// Terms added beside the product (unfused LoRA, residuals).
    pub side: Option<Arc<Side>>,
    /// A sparse matrix (then `ty` is the storage type, I8).
    pub sparse: Option<SparseMatrix>,
}

impl CpuWeight {
    fn bytes<'a>(&self, host: &'a [u8]) -> Result<&'a [u8]> {
        host.get(self.range.clone())
            .ok_or_else(|| Error::tensor(&self.name, "outside the mapping"))
    }

    /// The whole tensor as f32 (norm weights and biases, small and read on every token):
    /// borrowed from the mapping where it is stored as aligned little-endian f32, else
    /// dequantized into `tmp`.
    fn f32_view<'a>(&self, host: &'a [u8], tmp: &'a mut Vec<f32>) -> Result<&'a [f32]> {
        let bytes = self.bytes(host)?;
        if self.ty == GgmlType::F32 && cfg!(target_endian = "little") {
            if let Ok(v) = bytemuck::try_cast_slice::<u8, f32>(bytes) {
                if v.len() == self.rows * self.cols {
                    return Ok(v);
                }
            }
        }
        tmp.resize(self.rows * self.cols, 0.0);
        quant::dequantize(self.ty, bytes, tmp)
            .map_err(|e| Error::tensor(&self.name, e.to_string()))?;
        Ok(tmp)
    }
}

/// Element type of the key/value cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// llama.cpp's default: half the memory; queries and attention weights are rounded to
    /// f16 where they meet the cache, as in ggml's f16 matrix products.
    #[default]
    F16,
    /// Exact f32 (reference comparisons).
    F32,
}

enum KvBuf {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl KvBuf {
    fn new(ty: KvType, len: usize) -> Self {
        match ty {
            KvType::F16 => KvBuf::F16(vec![f16::ZERO; len]),
            KvType::F32 => KvBuf::F32(vec![0.0; len]),
        }
    }

    fn store(&mut self, at: usize, src: &[f32]) {
        match self {
            // half's slice conversion: F16C eight at a time where the CPU has it, rounding
            // as f16::from_f32 does.
            KvBuf::F16(b) => b[at..at + src.len()].convert_from_f32_slice(src),
            KvBuf::F32(b) => b[at..at + src.len()].copy_from_slice(src),
        }
    }

    fn rows(&self) -> KvRows<'_> {
        match self {
            KvBuf::F16(b) => KvRows::F16(b),
            KvBuf::F32(b) => KvRows::F32(b),
        }
    }
}

/// Elements (of `unit` values each: a token's row, or 1) from which the elementwise steps of
/// a batch (norms, RoPE, SwiGLU, residual adds) are split over the pool: about 16 tokens of
/// a small model's rows; below that a dispatch costs more than it saves.
const PARALLEL_ELEMENTS: usize = 16 * 576;

/// Runs `f(i0, i1)` over ranges that cover `0..n` (items of `unit` values): one range per
/// thread where there are at least [`PARALLEL_ELEMENTS`] values, else `f(0, n)` on the
/// calling thread. Ranges of single values are cut at multiples of 64.
fn by_parts(pool: &ThreadPool, n: usize, unit: usize, f: impl Fn(usize, usize) + Sync) {
    let threads = pool.threads();
    if threads < 2 || n * unit < PARALLEL_ELEMENTS {
        f(0, n);
        return;
    }
    let per = if unit == 1 {
        n.div_ceil(threads).div_ceil(64) * 64
    } else {
        n.div_ceil(threads)
    };
    pool.run(n.div_ceil(per), |task| {
        f(task * per, ((task + 1) * per).min(n))
    });
}

/// Per-thread buffers of one attention task (a query head of one token).
#[derive(Default)]
struct AttnScratch {
    q: Vec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
    acc: Vec<f32>,
}

thread_local! {
    static ATTN_SCRATCH: std::cell::RefCell<AttnScratch> = Default::default();
}

pub struct CpuKv {
    /// Per layer: [n_ctx, kv_dim].
    k: Vec<KvBuf>,
    v: Vec<KvBuf>,
    n_ctx: usize,
    ty: KvType,
}

pub struct CpuBackend {
    pool: ThreadPool,
    scratch: MatmulScratch,
    sparse_scratch: SparseScratch,
    /// Sums of squared inputs per column of every matrix product, by weight name (the
    /// calibration statistics of Wanda pruning); collected only while `Some`.
    input_sq: Option<HashMap<String, Vec<f64>>>,
    tmp: Vec<f32>,
    kv_type: KvType,
}

impl CpuBackend {
    pub fn new(threads: usize) -> Result<Self> {
        Self::with_kv_type(threads, KvType::F16)
    }

    pub fn with_kv_type(threads: usize, kv_type: KvType) -> Result<Self> {
        Ok(CpuBackend {
            pool: ThreadPool::new(threads)?,
            scratch: MatmulScratch::default(),
            sparse_scratch: SparseScratch::default(),
            input_sq: None,
            tmp: Vec::new(),
            kv_type,
        })
    }
}

impl CpuBackend {
    /// Starts (or, with `false`, stops and discards) collecting the sum of squared inputs
    /// per column of every matrix product.
    pub fn collect_input_stats(&mut self, on: bool) {
        self.input_sq = on.then(HashMap::new);
    }

    /// The statistics collected so far, by weight name (empty when not collecting).
    pub fn input_stats(&self) -> HashMap<String, Vec<f64>> {
        self.input_sq.clone().unwrap_or_default()
    }
}

impl Backend for CpuBackend {
    type Weight = CpuWeight;
    type Buf = Vec<f32>;
    type Kv = CpuKv;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn threads(&self) -> usize {
        self.pool.threads()
    }

    fn load_weight(
        &mut self,
        info: &TensorInfo,
        offset: usize,
        sparse: Option<SparseMatrix>,
    ) -> Result<CpuWeight> {
        let (rows, cols) = match &sparse {
            Some(s) => (s.rows, s.cols),
            None => (info.n_rows() as usize, info.row_len() as usize),
        };
        Ok(CpuWeight {
            name: info.name.clone(),
            ty: info.ty,
            rows,
            cols,
            range: offset..offset + info.n_bytes as usize,
            side: None,
            sparse,
        })
    }

    fn set_side(&mut self, w: &mut CpuWeight, side: Option<Arc<Side>>) {
        w.side = side;
    }

    fn alloc(&mut self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }

    fn kv_cache(&mut self, cfg: &Config, n_ctx: usize) -> Result<CpuKv> {
        let len = n_ctx
            .checked_mul(cfg.kv_dim())
            .ok_or_else(|| Error::InvalidArgument(format!("context {n_ctx} too large")))?;
        let ty = self.kv_type;
        Ok(CpuKv {
            k: (0..cfg.n_layer).map(|_| KvBuf::new(ty, len)).collect(),
            v: (0..cfg.n_layer).map(|_| KvBuf::new(ty, len)).collect(),
            n_ctx,
            ty,
        })
    }

    fn embed(
        &mut self,
        host: &[u8],
        table: &CpuWeight,
        ids: &[u32],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let row_bytes = table.ty.row_bytes(table.cols as u64).unwrap_or(0) as usize;
        let data = table.bytes(host)?;
        for (t, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id >= table.rows {
                return Err(Error::InvalidArgument(format!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    table.rows
                )));
            }
            let src = &data[id * row_bytes..(id + 1) * row_bytes];
            quant::dequantize(
                table.ty,
                src,
                &mut out[t * table.cols..(t + 1) * table.cols],
            )?;
        }
        Ok(())
    }

    fn rms_norm(
        &mut self,
        host: &[u8],
        x: &Vec<f32>,
        w: &CpuWeight,
        eps: f32,
        n: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let g = w.f32_view(host, &mut self.tmp)?;
        let d = g.len();
        let dst = kernels::DisjointOut::new(&mut out[..n * d]);
        by_parts(&self.pool, n, d, |t0, t1| {
            // SAFETY: each part writes the rows of its own tokens.
            let o = unsafe { dst.part(t0 * d, (t1 - t0) * d) };
            for (xr, or) in x[t0 * d..t1 * d].chunks_exact(d).zip(o.chunks_exact_mut(d)) {
                // ggml_compute_forward_rms_norm_f32: f64 sum of f32 squares, f32 mean.
                let sum: f64 = xr.iter().map(|&v| (v * v) as f64).sum();
                let mean = (sum / d as f64) as f32;
                let scale = 1.0 / (mean + eps).sqrt();
                for ((o, &v), &g) in or.iter_mut().zip(xr).zip(g) {
                    *o = (v * scale) * g;
                }
            }
        });
        Ok(())
    }

    fn matmul(
        &mut self,
        host: &[u8],
        w: &CpuWeight,
        x: &Vec<f32>,
        n: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if let Some(stats) = &mut self.input_sq {
            let sq = stats
                .entry(w.name.clone())
                .or_insert_with(|| vec![0.0; w.cols]);
            for xr in x.chunks_exact(w.cols).take(n) {
                for (s, &v) in sq.iter_mut().zip(xr) {
                    *s += (v as f64) * (v as f64);
                }
            }
        }
        match &w.sparse {
            Some(s) => sparse::matmul::matmul(
                &self.pool,
                &mut self.sparse_scratch,
                s,
                w.bytes(host)?,
                x,
                n,
                out,
            ),
            None => kernels::matmul(
                &self.pool,
                &mut self.scratch,
                w.ty,
                w.bytes(host)?,
                w.rows,
                w.cols,
                x,
                n,
                out,
            ),
        }
        .map_err(|e| Error::tensor(&w.name, e.to_string()))?;
        if let Some(side) = &w.side {
            side.add_to(x, n, w.rows, w.cols, out, &mut self.tmp);
        }
        Ok(())
    }

    fn matmul_shared(
        &mut self,
        host: &[u8],
        ws: &[&CpuWeight],
        x: &Vec<f32>,
        n: usize,
        outs: &mut [&mut Vec<f32>],
    ) -> Result<()> {
        // Together (one quantization, one dispatch) where the weights are all dense of one
        // type or all sparse, of one width, without side terms, and no statistics are being
        // collected; else one by one.
        let together = ws.first().is_some_and(|w0| {
            ws.iter().all(|w| {
                w.side.is_none()
                    && w.cols == w0.cols
                    && match (&w.sparse, &w0.sparse) {
                        (None, None) => w.ty == w0.ty,
                        (Some(_), Some(_)) => true,
                        _ => false,
                    }
            })
        }) && self.input_sq.is_none()
            && ws.len() == outs.len();
        // An error names every weight of the call.
        let names = || {
            ws.iter()
                .map(|w| w.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if together && ws[0].sparse.is_some() {
            let mut mats = Vec::with_capacity(ws.len());
            for (w, out) in ws.iter().zip(outs.iter_mut()) {
                if let Some(sm) = &w.sparse {
                    mats.push((sm, w.bytes(host)?, &mut out[..]));
                }
            }
            return sparse::matmul::matmul_shared(&self.pool, &mut self.sparse_scratch, mats, x, n)
                .map_err(|e| Error::tensor(names(), e.to_string()));
        }
        if !together {
            for (w, out) in ws.iter().zip(outs.iter_mut()) {
                self.matmul(host, w, x, n, out)?;
            }
            return Ok(());
        }
        let mut parts = Vec::with_capacity(ws.len());
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            parts.push((w.bytes(host)?, w.rows, &mut out[..]));
        }
        kernels::matmul_shared(
            &self.pool,
            &mut self.scratch,
            ws[0].ty,
            parts,
            ws[0].cols,
            x,
            n,
        )
        .map_err(|e| Error::tensor(names(), e.to_string()))
    }

    fn add_bias(&mut self, host: &[u8], b: &CpuWeight, x: &mut Vec<f32>, n: usize) -> Result<()> {
        let v = b.f32_view(host, &mut self.tmp)?;
        for xr in x.chunks_exact_mut(v.len()).take(n) {
            xr.iter_mut().zip(v).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn rope(&mut self, cfg: &Config, x: &mut Vec<f32>, n: usize, n_heads: usize, pos0: usize) {
        let hd = cfg.head_dim;
        let nd = cfg.rope_dim;
        // ggml_rope: theta_scale = base^(-2/n_dims), theta for pair i = p * theta_scale^i,
        // built by repeated multiplication in f32.
        let theta_scale = cfg.rope_base.powf(-2.0 / nd as f32);
        let w = n_heads * hd;
        let dst = kernels::DisjointOut::new(&mut x[..n * w]);
        by_parts(&self.pool, n, w, |t0, t1| {
            // SAFETY: each part writes the rows of its own tokens.
            let rows = unsafe { dst.part(t0 * w, (t1 - t0) * w) };
            let mut cs = vec![(0.0f32, 0.0f32); nd / 2];
            for (t, row) in (t0..t1).zip(rows.chunks_exact_mut(w)) {
                let mut theta = (pos0 + t) as f32;
                for c in cs.iter_mut() {
                    let th = cfg.rope_scale * theta;
                    *c = (th.cos(), th.sin());
                    theta *= theta_scale;
                }
                for head in row.chunks_exact_mut(hd) {
                    for (i, &(c, s)) in cs.iter().enumerate() {
                        let (a, b) = match cfg.rope_kind {
                            RopeKind::Normal => (2 * i, 2 * i + 1),
                            RopeKind::Neox => (i, i + nd / 2),
                        };
                        // ggml's rotation as GCC contracts it: fma(x0, cos, -(x1 sin)),
                        // fma(x0, sin, x1 cos).
                        let (x0, x1) = (head[a], head[b]);
                        head[a] = math::fma32(x0, c, -(x1 * s));
                        head[b] = math::fma32(x0, s, x1 * c);
                    }
                }
            }
        });
    }

    fn attention(
        &mut self,
        cfg: &Config,
        kv: &mut CpuKv,
        layer: usize,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        pos0: usize,
        n: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let kvd = cfg.kv_dim();
        if pos0 + n > kv.n_ctx {
            return Err(Error::InvalidArgument(format!(
                "context full: {} tokens do not fit in a context of {}",
                pos0 + n,
                kv.n_ctx
            )));
        }
        kv.k[layer].store(pos0 * kvd, &k[..n * kvd]);
        kv.v[layer].store(pos0 * kvd, &v[..n * kvd]);
        let (kc, vc, ty) = (&kv.k[layer], &kv.v[layer], kv.ty);
        let hd = cfg.head_dim;
        let nh = cfg.n_head;
        let group = cfg.n_head / cfg.n_head_kv;
        let scale = 1.0 / (hd as f32).sqrt();
        let qd = cfg.q_dim();
        // llama.cpp multiplies a batch of queries with tinyBLAS and a single query with
        // ggml's vec_dot; they sum in different orders.
        let order = if n == 1 {
            SumOrder::GgmlVecDot
        } else {
            SumOrder::TinyBlas
        };
        let (krows, vrows) = (kc.rows(), vc.rows());
        let dst = crate::kernels::DisjointOut::new(out);
        self.pool.run(n * nh, |task| {
            let (t, h) = (task / nh, task % nh);
            let kvh = h / group;
            let n_kv = pos0 + t + 1;
            ATTN_SCRATCH.with(|cell| {
                let sc = &mut *cell.borrow_mut();
                sc.q.clear();
                sc.q.extend_from_slice(&q[t * qd + h * hd..t * qd + (h + 1) * hd]);
                sc.s.resize(n_kv, 0.0);
                // Where the cache is f16, ggml converts q and the probabilities to f16.
                if matches!(ty, KvType::F16) {
                    math::scale_round_f16(&mut sc.q, 1.0);
                }
                attn::scores(order, krows, kvh * hd, kvd, &sc.q, scale, &mut sc.s);
                let inv = math::softmax_unnormalized(&mut sc.s);
                match ty {
                    KvType::F16 => math::scale_round_f16(&mut sc.s, inv),
                    KvType::F32 => sc.s.iter_mut().for_each(|p| *p *= inv),
                }
                // out = sum_j p_j v_j, summed in the order llama.cpp sums V^T p.
                sc.o.resize(hd, 0.0);
                attn::weighted_sum(order, vrows, kvh * hd, kvd, &sc.s, &mut sc.acc, &mut sc.o);
                // SAFETY: each task writes only its own (token, head) slice of `out`.
                unsafe { dst.write(t * qd + h * hd, &sc.o) };
            });
        });
        Ok(())
    }

    fn swiglu(&mut self, gate: &mut Vec<f32>, up: &Vec<f32>, len: usize) {
        let dst = kernels::DisjointOut::new(&mut gate[..len]);
        by_parts(&self.pool, len, 1, |i0, i1| {
            // SAFETY: each part writes its own elements.
            math::swiglu(unsafe { dst.part(i0, i1 - i0) }, &up[i0..i1]);
        });
    }

    fn add(&mut self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) {
        let dst = kernels::DisjointOut::new(&mut x[..len]);
        by_parts(&self.pool, len, 1, |i0, i1| {
            // SAFETY: each part writes its own elements.
            let x = unsafe { dst.part(i0, i1 - i0) };
            x.iter_mut().zip(&y[i0..i1]).for_each(|(a, b)| *a += b);
        });
    }

    fn copy(&mut self, src: &Vec<f32>, offset: usize, len: usize, dst: &mut Vec<f32>) {
        dst[..len].copy_from_slice(&src[offset..offset + len]);
    }

    fn read(&mut self, buf: &Vec<f32>, out: &mut [f32]) {
        let n = out.len();
        out.copy_from_slice(&buf[..n]);
    }
}

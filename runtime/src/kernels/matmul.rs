//! The matrix product driver: `out[t, r] = dot(W[r, :], x[t, :])` for weights in any
//! encoding that has a table entry. Activations are quantized once per row into the entry's
//! activation type (plus the entry's extra bytes), as ggml does; then each pool task takes a
//! range of weight rows:
//! - tokens in groups of four (a prompt batch) go through the entry's tiles: `tile8x4` over
//!   groups of eight rows, `tile2x4` over pairs, else `vec_dot4` row by row, the four
//!   activation rows staying in L1 while the task's weight rows go past;
//! - the other tokens (every decode step) go through `rows4`, four rows from the four
//!   quarters of the task's range (four sequential streams for the prefetcher), then
//!   `vec_dot` for what is left.
//!
//! Every path gives each (row, token) the bits of the entry's one-token dot in the order
//! llama.cpp would use for it ([`super::DotKernel::variant_for`]).

use super::pool::{DisjointOut, ThreadPool};
use super::{DotKernel, KernelTable, Variant};
use crate::quant::GgmlType;
use crate::{Error, Result};

/// Reused buffers, so that decode allocates nothing per step.
#[derive(Default)]
pub struct MatmulScratch {
    act: Vec<u8>,
    /// What `act` holds, (weight type, tokens, columns): the weight type picks the table
    /// entry, hence the quantizer.
    held: Held<(GgmlType, usize, usize)>,
}

/// Which activations a scratch holds quantized, and a copy of the rows they came from, so
/// that consecutive products by the same activations and quantizer (attention's q, k and v;
/// the MLP's gate and up) quantize them once. Used by the dense and the sparse drivers.
pub(crate) struct Held<K> {
    key: Option<K>,
    x: Vec<f32>,
}

impl<K> Default for Held<K> {
    fn default() -> Self {
        Held {
            key: None,
            x: Vec::new(),
        }
    }
}

impl<K: PartialEq + Copy> Held<K> {
    /// Whether the held activations are `x` quantized as `key` says (the same bits); if not,
    /// forgets them and keeps a copy of `x`, for [`Held::hold`] once they are quantized.
    pub(crate) fn holds(&mut self, key: K, x: &[f32]) -> bool {
        if self.key == Some(key)
            && bytemuck::cast_slice::<f32, u8>(&self.x) == bytemuck::cast_slice::<f32, u8>(x)
        {
            return true;
        }
        self.key = None;
        self.x.clear();
        self.x.extend_from_slice(x);
        false
    }

    /// Records that the activations of the last `holds` call are quantized as `key` says.
    pub(crate) fn hold(&mut self, key: K) {
        self.key = Some(key);
    }
}

/// Tokens from which a batch's activations are quantized in parallel (below, a second
/// dispatch to the pool costs more than it saves).
const PARALLEL_QUANTIZE_TOKENS: usize = 16;

/// Rows of weights per task: enough work to amortise scheduling, enough tasks to balance.
/// A decode step (one token) takes one task per thread: its four or eight row streams
/// (`rows4`, `rows8`) are then four times longer than with four tasks per thread, which the
/// prefetchers follow better, and that outweighs the balancing that smaller tasks give
/// (SmolLM2-135M decode, interleaved runs: 1 thread Q4_0 ~+8%; 2 threads +7% to +22% for
/// Q4_0, Q4_1, Q8_0 and Q4_K_M).
fn rows_per_task(rows: usize, n_tokens: usize, threads: usize) -> usize {
    let tasks = threads.max(1) * if n_tokens == 1 { 1 } else { 4 };
    let per = rows.div_ceil(tasks);
    let min = (64 / n_tokens.max(1)).max(4);
    per.max(min).min(rows.max(1))
}

/// One matrix of a product, checked and ready for its tasks: its kernel entry, each token's
/// kernel variant, and where its results go.
struct Job<'a> {
    k: &'static DotKernel,
    w: &'a [u8],
    w_row: usize,
    rows: usize,
    a_row: usize,
    variants: Vec<Variant>,
    /// Leading groups of four tokens that go through a four-token kernel.
    quads: usize,
    dst: DisjointOut<'a>,
}

impl<'a> Job<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        ty: GgmlType,
        w: &'a [u8],
        rows: usize,
        cols: usize,
        x: &[f32],
        n: usize,
        out: &'a mut [f32],
    ) -> Result<Job<'a>> {
        let k = KernelTable::get()
            .dot(ty)
            .ok_or_else(|| Error::Unsupported(format!("matrix product with {ty} weights")))?;
        let w_row = ty.row_bytes(cols as u64).ok_or_else(|| {
            Error::InvalidArgument(format!("{cols} columns are not whole {ty} blocks"))
        })? as usize;
        let a_row = k.act_row_bytes(cols).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{cols} columns are not whole {} blocks (activations for {ty})",
                k.act_type
            ))
        })?;
        if w.len() != rows * w_row || x.len() < n * cols || out.len() < n * rows {
            return Err(Error::InvalidArgument(format!(
                "matmul shapes: weights {} bytes for [{rows}, {cols}] {ty}, x {} for [{n}, {cols}], out {} for [{n}, {rows}]",
                w.len(),
                x.len(),
                out.len()
            )));
        }
        // llama.cpp runs some formats through other kernels depending on the batch size and
        // the token's place in it (DotKernel::dot_for); pick each token's kernel once.
        let variants: Vec<Variant> = (0..n).map(|t| k.variant_for(rows, n, t)).collect();
        // Leading groups of four tokens that share a variant with a four-token kernel go
        // through it (tiles / vec_dot4, or the K-quant gemm4 / tiled4), which unpack each
        // weight block once for the four.
        let quads = (0..n / 4)
            .take_while(|g| {
                let v = variants[4 * g];
                variants[4 * g..4 * g + 4].iter().all(|u| *u == v) && k.dot4(v).is_some()
            })
            .count();
        Ok(Job {
            k,
            w,
            w_row,
            rows,
            a_row,
            variants,
            quads,
            dst: DisjointOut::new(out),
        })
    }

    /// Rows `r0..r1` for every token of the quantized activations `act`.
    fn run(&self, act: &[u8], r0: usize, r1: usize) {
        let (k, w, w_row, rows, a_row) = (self.k, self.w, self.w_row, self.rows, self.a_row);
        let (variants, quads, dst) = (&self.variants, self.quads, &self.dst);
        let act_row = |t: usize| &act[t * a_row..(t + 1) * a_row];
        let w_row_at = |r: usize| &w[r * w_row..(r + 1) * w_row];
        // Token groups outside, rows inside: the four activation rows stay in L1 while the
        // task's weight rows (a slice of one matrix, in L2) go past them.
        for g in 0..quads {
            let t = 4 * g;
            let v = variants[t];
            if let Some(dot4) = k.dot4(v) {
                let a4 = [act_row(t), act_row(t + 1), act_row(t + 2), act_row(t + 3)];
                let mut rest = r0;
                if let (Some(tile), Variant::Token) = (k.tile8x4, v) {
                    while rest + 8 <= r1 {
                        let v = tile(std::array::from_fn(|i| w_row_at(rest + i)), a4);
                        for (j, row) in v.into_iter().enumerate() {
                            for (i, v) in row.into_iter().enumerate() {
                                // SAFETY: tasks own disjoint row ranges, so no two write the
                                // same element.
                                unsafe { dst.set((t + i) * rows + rest + j, v) };
                            }
                        }
                        rest += 8;
                    }
                }
                if let (Some(tile), Variant::Token) = (k.tile2x4, v) {
                    while rest + 2 <= r1 {
                        let v = tile([w_row_at(rest), w_row_at(rest + 1)], a4);
                        for (j, row) in v.into_iter().enumerate() {
                            for (i, v) in row.into_iter().enumerate() {
                                // SAFETY: tasks own disjoint row ranges, so no two write the
                                // same element.
                                unsafe { dst.set((t + i) * rows + rest + j, v) };
                            }
                        }
                        rest += 2;
                    }
                }
                for r in rest..r1 {
                    let v = dot4(w_row_at(r), a4);
                    for (i, v) in v.into_iter().enumerate() {
                        // SAFETY: tasks own disjoint row ranges, so no two write the same
                        // element.
                        unsafe { dst.set((t + i) * rows + r, v) };
                    }
                }
            }
        }
        // The other tokens: eight or four weight rows at a time where the entry can (from
        // the eighths or quarters of the range, see `RowsFn`), then one by one.
        for (t, v) in variants.iter().enumerate().skip(4 * quads) {
            let a = act_row(t);
            let mut rest = r0;
            let rows_k = match (k.rows8, k.rows4, v) {
                (Some(f), _, Variant::Token) => Some((f, 8)),
                (None, Some(f), Variant::Token) => Some((f, 4)),
                _ => None,
            };
            if let Some((f, kr)) = rows_k {
                let len = (r1 - r0) / kr * kr;
                // SAFETY: tasks own disjoint row ranges, so no two write the same element.
                let y = unsafe { dst.part(t * rows + r0, len) };
                f(&w[r0 * w_row..(r0 + len) * w_row], w_row, a, y);
                rest = r0 + len;
            }
            let dot = k.dot(*v);
            for r in rest..r1 {
                // SAFETY: as above.
                unsafe { dst.set(t * rows + r, dot(w_row_at(r), a)) };
            }
        }
    }
}

/// `out` ([n, rows], row-major) = `x` ([n, cols]) times the transpose of `w` ([rows, cols] of
/// type `ty`, raw bytes).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    pool: &ThreadPool,
    scratch: &mut MatmulScratch,
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    matmul_shared(pool, scratch, ty, vec![(w, rows, out)], cols, x, n)
}

/// Several products by the same activations and weights of one type (attention's q, k and
/// v; the MLP's gate and up): `parts[i].2 = x times the transpose of parts[i].0` (raw
/// bytes of `parts[i].1` rows), as [`matmul`] would give them one by one, with the
/// activations quantized once and all the matrices' tasks in one dispatch to the pool (a
/// decode step's products are tens of microseconds each, so every dispatch and its wait
/// count).
pub fn matmul_shared(
    pool: &ThreadPool,
    scratch: &mut MatmulScratch,
    ty: GgmlType,
    parts: Vec<(&[u8], usize, &mut [f32])>,
    cols: usize,
    x: &[f32],
    n: usize,
) -> Result<()> {
    let mut jobs = Vec::with_capacity(parts.len());
    for (w, rows, out) in parts {
        jobs.push(Job::new(ty, w, rows, cols, x, n, out)?);
    }
    let Some(first) = jobs.first() else {
        return Ok(());
    };
    let act = quantized(pool, scratch, first, x, n, cols);
    let parts: Vec<(usize, usize)> = jobs
        .iter()
        .map(|j| (j.rows, rows_per_task(j.rows, n, pool.threads())))
        .collect();
    pool.run_ranges(&parts, |j, r0, r1| jobs[j].run(act, r0, r1));
    Ok(())
}

/// The activations of `job`'s products, quantized into `scratch` (or found there).
fn quantized<'s>(
    pool: &ThreadPool,
    scratch: &'s mut MatmulScratch,
    job: &Job,
    x: &[f32],
    n: usize,
    cols: usize,
) -> &'s [u8] {
    let key = (job.k.weight_type, n, cols);
    if !scratch.held.holds(key, &x[..n * cols]) {
        quantize_acts(
            pool,
            &mut scratch.act,
            job.k.quantize_act,
            x,
            n,
            cols,
            job.a_row,
        );
        scratch.held.hold(key);
    }
    &scratch.act
}

/// Quantizes the `n` activation rows of `x` ([n, cols]) into `act` (`a_row` bytes each).
fn quantize_acts(
    pool: &ThreadPool,
    act: &mut Vec<u8>,
    quantize: fn(&[f32], &mut [u8]),
    x: &[f32],
    n: usize,
    cols: usize,
    a_row: usize,
) {
    act.resize(n * a_row, 0);
    if n >= PARALLEL_QUANTIZE_TOKENS && pool.threads() > 1 {
        // A batch's activation rows quantized by all threads, a share of tokens each: done by
        // the calling thread alone it was a serial part of every product (about a tenth of a
        // 2-thread prompt, the other thread waiting).
        let per = n.div_ceil(pool.threads());
        let dst = DisjointOut::new(&mut act[..n * a_row]);
        pool.run(n.div_ceil(per), |task| {
            for t in task * per..((task + 1) * per).min(n) {
                // SAFETY: each task fills the rows of its own tokens.
                let ar = unsafe { dst.part(t * a_row, a_row) };
                quantize(&x[t * cols..(t + 1) * cols], ar);
            }
        });
    } else {
        for (xr, ar) in x
            .chunks_exact(cols)
            .zip(act.chunks_exact_mut(a_row))
            .take(n)
        {
            quantize(xr, ar);
        }
    }
}

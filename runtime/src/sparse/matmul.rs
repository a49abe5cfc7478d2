//! Matrix products with sparse weights, split over the thread pool by rows as the dense
//! `kernels::matmul` splits them: each token's activations are quantized into buffers kept
//! between calls (once for consecutive products by the same activations), then every task
//! runs the encoding's matrix-matrix kernel over its share of the rows for all the tokens
//! (four tokens at a time through the kernel's tiles, each weight block decoded once for the
//! four; one token, as in decode, through the matrix-vector kernel).

use super::group::{GroupActs, GroupKernel, GroupMatrix};
use super::nm::{NmActs, NmFormat, NmKernel};
use super::store::{Encoding, SparseMatrix};
use crate::kernels::{DisjointOut, ThreadPool};
use crate::{Error, Result};
use std::cell::RefCell;

/// Activations quantized for a sparse kernel, kept between calls.
#[derive(Default)]
pub struct SparseScratch {
    nm: Vec<NmActs>,
    group: Vec<GroupActs>,
    /// What `nm` or `group` hold: products by the same activations (attention's q, k and v;
    /// the MLP's gate and up) quantize them once.
    held: crate::kernels::Held<ActsKey>,
}

/// The quantizer and the shape of held activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ActsKey {
    Nm(NmFormat, usize, usize),
    Group(usize, usize),
}

thread_local! {
    /// A task's outputs ([tokens, its rows]) before they are copied out, kept per thread so
    /// that a product allocates nothing once the buffers have grown.
    static TASK_OUT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Rows per task: four tasks per thread, at least 16 rows, a multiple of 8 (so that tasks
/// start on the eight-row blocks of group-sparse row tiles).
/// A decode step (one token) takes one task per thread, as in the dense driver (longer row
/// streams outweigh finer balancing); batches four per thread.
fn rows_per_task(rows: usize, n_tokens: usize, threads: usize) -> usize {
    let tasks = threads.max(1) * if n_tokens == 1 { 1 } else { 4 };
    rows.div_ceil(tasks)
        .max(16)
        .next_multiple_of(8)
        .min(rows.max(1))
}

/// A sparse matrix checked against its shape, with its kernel.
enum Prepared<'a> {
    Group(GroupMatrix<'a>, GroupKernel),
    /// The kernel, the row bytes and the matrix bytes.
    Nm(NmKernel, usize, &'a [u8]),
}

impl<'a> Prepared<'a> {
    /// Checks `w` (the bytes of `s`) and the shapes of `x` ([n, cols]) and `out` ([n, rows]).
    fn new(s: &SparseMatrix, w: &'a [u8], x: &[f32], n: usize, out: &[f32]) -> Result<Self> {
        let (rows, cols) = (s.rows, s.cols);
        if x.len() < n * cols || out.len() < n * rows {
            return Err(Error::InvalidArgument(format!(
                "sparse matmul shapes: x {} for [{n}, {cols}], out {} for [{n}, {rows}]",
                x.len(),
                out.len()
            )));
        }
        match s.encoding {
            Encoding::Group(_) => {
                // SAFETY: the model validated these bytes with GroupMatrix::new at load
                // (SparseMatrix::check_bytes). What writes them afterwards keeps them valid:
                // fused adapters (sparse::edit) rewrite only scales, always finite, and
                // levels, never a count, group number or offset; unapplying restores the
                // loaded bytes; moving pages to anonymous memory copies them unchanged.
                let m = unsafe { GroupMatrix::new_validated(w)? };
                if m.rows() != rows || m.cols() != cols {
                    return Err(Error::InvalidArgument(format!(
                        "group-sparse matrix is {} x {}, expected {rows} x {cols}",
                        m.rows(),
                        m.cols()
                    )));
                }
                Ok(Prepared::Group(m, GroupKernel::get()))
            }
            Encoding::Nm(f) => {
                let rb = s.row_bytes()?;
                if Some(w.len()) != rb.checked_mul(rows) {
                    return Err(Error::InvalidArgument(format!(
                        "N:M matrix is {} bytes, {rows} rows of {rb} expected",
                        w.len()
                    )));
                }
                Ok(Prepared::Nm(NmKernel::get(f)?, rb, w))
            }
        }
    }

    /// Rows `r0..r0 + c` for all `n` tokens into `y` ([n, c]), from the activations the
    /// scratch holds for this matrix's encoding.
    fn rows_of(&self, scratch: &SparseScratch, n: usize, r0: usize, y: &mut [f32]) -> Result<()> {
        match self {
            // One kernel call per task for all the tokens: the kernel prepares per-row
            // tables (activation scales per group) once per call and row.
            Prepared::Group(m, k) => k.matmat_rows(m, &scratch.group[..n], r0, y),
            Prepared::Nm(k, rb, w) => {
                let r1 = r0 + y.len() / n;
                k.matmat(&w[r0 * rb..r1 * rb], &scratch.nm[..n], y)
            }
        }
    }
}

/// What activations a product by `s` needs: its quantizer and shape.
fn held_for(s: &SparseMatrix, n: usize) -> ActsKey {
    match s.encoding {
        Encoding::Group(_) => ActsKey::Group(n, s.cols),
        Encoding::Nm(f) => ActsKey::Nm(f, n, s.cols),
    }
}

/// Quantizes `x` ([n, cols]) as the products by `s` need it, unless the scratch holds it.
fn quantize(
    pool: &ThreadPool,
    scratch: &mut SparseScratch,
    s: &SparseMatrix,
    x: &[f32],
    n: usize,
) -> Result<()> {
    let cols = s.cols;
    let what = held_for(s, n);
    if scratch.held.holds(what, &x[..n * cols]) {
        return Ok(());
    }
    match s.encoding {
        Encoding::Group(_) => {
            if scratch.group.len() < n {
                scratch.group.resize_with(n, GroupActs::default);
            }
            per_token(pool, &mut scratch.group[..n], |t, a| {
                a.quantize(&x[t * cols..(t + 1) * cols]);
                Ok(())
            })?;
        }
        Encoding::Nm(f) => {
            if scratch.nm.len() < n {
                scratch.nm.resize_with(n, NmActs::new);
            }
            per_token(pool, &mut scratch.nm[..n], |t, a| {
                a.quantize(&f, &x[t * cols..(t + 1) * cols])
            })?;
        }
    }
    scratch.held.hold(what);
    Ok(())
}

/// `out` ([n, rows], row-major) = `x` ([n, cols]) times the transpose of the sparse matrix
/// `w` (`s.rows` rows of `s.cols` inputs, raw bytes).
///
/// A group-sparse `w` must have passed [`SparseMatrix::check_bytes`] and be unchanged since
/// (it is not validated again on every product).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    pool: &ThreadPool,
    scratch: &mut SparseScratch,
    s: &SparseMatrix,
    w: &[u8],
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    matmul_shared(pool, scratch, vec![(s, w, out)], x, n)
}

/// Several products by the same activations (attention's q, k and v; the MLP's gate and
/// up), each as [`matmul`] gives it: where every matrix takes the same quantized activations
/// (one encoding and format), they are quantized once and all the matrices' row tasks go to
/// the pool in one dispatch; otherwise the products run one by one.
pub(crate) fn matmul_shared(
    pool: &ThreadPool,
    scratch: &mut SparseScratch,
    mats: Vec<(&SparseMatrix, &[u8], &mut [f32])>,
    x: &[f32],
    n: usize,
) -> Result<()> {
    let Some(first) = mats.first().map(|m| held_for(m.0, n)) else {
        return Ok(());
    };
    if mats.iter().any(|m| held_for(m.0, n) != first) {
        for (s, w, out) in mats {
            matmul_shared(pool, scratch, vec![(s, w, out)], x, n)?;
        }
        return Ok(());
    }
    let s0 = mats[0].0;
    let mut jobs = Vec::with_capacity(mats.len());
    for (s, w, out) in mats {
        jobs.push((Prepared::new(s, w, x, n, out)?, s.rows, out));
    }
    quantize(pool, scratch, s0, x, n)?;
    let scratch = &*scratch;
    by_rows(pool, n, jobs, |p, r0, y| p.rows_of(scratch, n, r0, y))
}

/// Tokens from which a batch's activations are quantized in parallel (as in the dense
/// driver).
const PARALLEL_QUANTIZE_TOKENS: usize = 16;

/// Runs `quantize(t, &mut acts[t])` for every token t: a share of the tokens per thread for
/// a batch, on the calling thread below [`PARALLEL_QUANTIZE_TOKENS`]. The first error of any
/// token is returned.
fn per_token<A: Send>(
    pool: &ThreadPool,
    acts: &mut [A],
    quantize: impl Fn(usize, &mut A) -> Result<()> + Sync,
) -> Result<()> {
    let n = acts.len();
    if n < PARALLEL_QUANTIZE_TOKENS || pool.threads() < 2 {
        return acts
            .iter_mut()
            .enumerate()
            .try_for_each(|(t, a)| quantize(t, a));
    }
    let per = n.div_ceil(pool.threads());
    let dst = DisjointOut::new(acts);
    let failed = std::sync::Mutex::new(None);
    pool.run(n.div_ceil(per), |task| {
        let t0 = task * per;
        // SAFETY: each task takes the buffers of its own tokens.
        let mine = unsafe { dst.part(t0, (t0 + per).min(n) - t0) };
        for (i, a) in mine.iter_mut().enumerate() {
            if let Err(e) = quantize(t0 + i, a) {
                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                return;
            }
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Runs `rows_of(job, r0, y)` (rows `r0..r0 + c` of all `n` tokens into `y`, [n, c]) over
/// the pool for every job (a matrix, its row count and its output, [n, rows]), each task
/// owning a range of one matrix's rows, all the matrices' tasks in one dispatch, and gathers
/// the results into the outputs. The first error of any task is returned.
fn by_rows<J: Sync>(
    pool: &ThreadPool,
    n: usize,
    jobs: Vec<(J, usize, &mut [f32])>,
    rows_of: impl Fn(&J, usize, &mut [f32]) -> Result<()> + Sync,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let parts: Vec<(usize, usize)> = jobs
        .iter()
        .map(|j| (j.1, rows_per_task(j.1, n, pool.threads())))
        .collect();
    let jobs: Vec<(J, usize, DisjointOut<f32>)> = jobs
        .into_iter()
        .map(|(j, rows, out)| (j, rows, DisjointOut::new(out)))
        .collect();
    let failed = std::sync::Mutex::new(None);
    pool.run_ranges(&parts, |j, r0, r1| {
        let (job, rows, dst) = &jobs[j];
        let c = r1 - r0;
        TASK_OUT.with_borrow_mut(|y| {
            y.resize(n * c, 0.0);
            if let Err(err) = rows_of(job, r0, &mut y[..n * c]) {
                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
                return;
            }
            for (t, yt) in y[..n * c].chunks_exact(c).enumerate() {
                // SAFETY: tasks own disjoint row ranges, so no two write the same element.
                unsafe { dst.write(t * rows + r0, yt) };
            }
        });
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sparse::group::{self, GroupFormat, Values};
    use crate::sparse::nm::{self, NmValues};

    fn rows(n: usize, cols: usize, seed: u32) -> Vec<f32> {
        (0..n * cols)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect()
    }

    /// Products by shared activations give each matrix the bits of its own product: N:M
    /// matrices of several heights in one dispatch, and a mix of encodings one by one.
    #[test]
    fn shared_products_match_separate_ones() {
        let pool = ThreadPool::new(2).unwrap();
        let c = 128;
        let f = NmFormat::new(2, 4, NmValues::Q8).unwrap();
        let rb = f.row_bytes(c).unwrap();
        let nm_of = |r: usize, seed: u32| {
            let w = rows(r, c, seed);
            let mut b = vec![0u8; r * rb];
            for (src, dst) in w.chunks_exact(c).zip(b.chunks_exact_mut(rb)) {
                nm::encode_row(&f, src, dst).unwrap();
            }
            (
                SparseMatrix {
                    encoding: Encoding::Nm(f),
                    rows: r,
                    cols: c,
                },
                b,
            )
        };
        let gf = GroupFormat::new(16, Values::Q4).unwrap();
        let mut wg = rows(24, c, 9);
        group::prune(&mut wg, c, 16, 0.5).unwrap();
        let g = (
            SparseMatrix {
                encoding: Encoding::Group(gf),
                rows: 24,
                cols: c,
            },
            group::encode(&wg, 24, c, gf).unwrap(),
        );
        let (a, b, d) = (nm_of(40, 3), nm_of(8, 4), nm_of(24, 5));
        for set in [vec![&a, &b, &d], vec![&a, &g, &b]] {
            for n in [1usize, 5, 20] {
                let x = rows(n, c, 11);
                let mut outs: Vec<Vec<f32>> =
                    set.iter().map(|m| vec![f32::NAN; n * m.0.rows]).collect();
                let mats = set
                    .iter()
                    .zip(outs.iter_mut())
                    .map(|(m, o)| (&m.0, &m.1[..], &mut o[..]))
                    .collect();
                let mut scratch = SparseScratch::default();
                matmul_shared(&pool, &mut scratch, mats, &x, n).unwrap();
                for (m, got) in set.iter().zip(&outs) {
                    let mut want = vec![0f32; n * m.0.rows];
                    let mut fresh = SparseScratch::default();
                    matmul(&pool, &mut fresh, &m.0, &m.1, &x, n, &mut want).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(got), bits(&want), "{:?} n {n}", m.0.encoding);
                }
            }
        }
    }

    /// The products match the kernels' own, token by token, whether the scratch holds the
    /// activations from the call before (the same rows again) or must quantize them anew (the
    /// same buffer with other values, another token count, another encoding).
    #[test]
    fn held_activations_are_used_only_for_the_same_rows() {
        let pool = ThreadPool::new(2).unwrap();
        let (r, c) = (40, 128);
        let w = rows(r, c, 7);
        let f = NmFormat::new(2, 4, NmValues::Q8).unwrap();
        let rb = f.row_bytes(c).unwrap();
        let mut wn = vec![0u8; r * rb];
        for (src, dst) in w.chunks_exact(c).zip(wn.chunks_exact_mut(rb)) {
            nm::encode_row(&f, src, dst).unwrap();
        }
        let mut wg = w.clone();
        group::prune(&mut wg, c, 16, 0.5).unwrap();
        let gf = GroupFormat::new(16, Values::Q4).unwrap();
        let wg = group::encode(&wg, r, c, gf).unwrap();
        let sn = SparseMatrix {
            encoding: Encoding::Nm(f),
            rows: r,
            cols: c,
        };
        let sg = SparseMatrix {
            encoding: Encoding::Group(gf),
            rows: r,
            cols: c,
        };
        let want = |s: &SparseMatrix, x: &[f32], n: usize| -> Vec<f32> {
            let mut y = vec![0f32; n * r];
            for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(r)) {
                match s.encoding {
                    Encoding::Nm(f) => {
                        let mut a = NmActs::new();
                        a.quantize(&f, xr).unwrap();
                        NmKernel::get(f).unwrap().matvec(&wn, &a, yr).unwrap();
                    }
                    Encoding::Group(_) => {
                        let m = GroupMatrix::new(&wg).unwrap();
                        GroupKernel::get()
                            .matvec(&m, &GroupActs::new(xr), yr)
                            .unwrap();
                    }
                }
            }
            y
        };
        let mut scratch = SparseScratch::default();
        // Batches of 20 are quantized on both threads.
        let mut x = rows(20, c, 1);
        for (s, bytes, n, change) in [
            (&sn, &wn, 6, false),
            (&sn, &wn, 6, false),
            (&sn, &wn, 6, true),
            (&sn, &wn, 5, false),
            (&sg, &wg, 5, false),
            (&sg, &wg, 5, false),
            (&sg, &wg, 5, true),
            (&sn, &wn, 5, false),
            (&sn, &wn, 20, false),
            (&sn, &wn, 20, true),
            (&sg, &wg, 20, false),
            (&sg, &wg, 20, true),
        ] {
            if change {
                x[3 * c + 17] += 0.25;
            }
            let mut y = vec![f32::NAN; n * r];
            matmul(&pool, &mut scratch, s, bytes, &x, n, &mut y).unwrap();
            let want = want(s, &x[..n * c], n);
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y), bits(&want), "{:?} {n} tokens", s.encoding);
        }
    }
}

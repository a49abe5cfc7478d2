//! Matrix products with sparse weights, split over the thread pool by rows as the dense
//! `kernels::matmul` splits them: each token's activations are quantized once per call into
//! buffers kept between calls, then every task runs the encoding's matrix-matrix kernel
//! over its share of the rows for all the tokens (four tokens at a time through the
//! kernel's tiles, each weight block decoded once for the four; one token, as in decode,
//! through the matrix-vector kernel).

use super::group::{GroupActs, GroupKernel, GroupMatrix};
use super::nm::{NmActs, NmKernel};
use super::store::{Encoding, SparseMatrix};
use crate::kernels::{DisjointOut, ThreadPool};
use crate::{Error, Result};
use std::cell::RefCell;

/// Activations quantized for a sparse kernel, kept between calls.
#[derive(Default)]
pub struct SparseScratch {
    nm: Vec<NmActs>,
    group: Vec<GroupActs>,
}

thread_local! {
    /// A task's outputs ([tokens, its rows]) before they are copied out, kept per thread so
    /// that a product allocates nothing once the buffers have grown.
    static TASK_OUT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Rows per task: four tasks per thread, at least 16 rows.
fn rows_per_task(rows: usize, threads: usize) -> usize {
    rows.div_ceil((threads * 4).max(1)).max(16).min(rows.max(1))
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
            // fused adapters (sparse::edit) rewrite only scales, always finite, and levels,
            // never a count, group number or offset; unapplying restores the loaded bytes;
            // moving pages to anonymous memory copies them unchanged.
            let m = unsafe { GroupMatrix::new_validated(w)? };
            if m.rows() != rows || m.cols() != cols {
                return Err(Error::InvalidArgument(format!(
                    "group-sparse matrix is {} x {}, expected {rows} x {cols}",
                    m.rows(),
                    m.cols()
                )));
            }
            let k = GroupKernel::get();
            if scratch.group.len() < n {
                scratch.group.resize_with(n, GroupActs::default);
            }
            for (a, xr) in scratch.group.iter_mut().zip(x.chunks_exact(cols).take(n)) {
                a.quantize(xr);
            }
            let acts = &scratch.group[..n];
            // One kernel call per task for all the tokens: the kernel prepares per-row
            // tables (activation scales per group) once per call and row.
            by_rows(pool, rows, n, out, |r0, y| k.matmat_rows(&m, acts, r0, y))
        }
        Encoding::Nm(f) => {
            let rb = s.row_bytes()?;
            if Some(w.len()) != rb.checked_mul(rows) {
                return Err(Error::InvalidArgument(format!(
                    "N:M matrix is {} bytes, {rows} rows of {rb} expected",
                    w.len()
                )));
            }
            let k = NmKernel::get(f)?;
            if scratch.nm.len() < n {
                scratch.nm.resize_with(n, NmActs::new);
            }
            for (a, xr) in scratch.nm.iter_mut().zip(x.chunks_exact(cols).take(n)) {
                a.quantize(&f, xr)?;
            }
            let acts = &scratch.nm[..n];
            by_rows(pool, rows, n, out, |r0, y| {
                let r1 = r0 + y.len() / n;
                k.matmat(&w[r0 * rb..r1 * rb], acts, y)
            })
        }
    }
}

/// Runs `rows_of(r0, y)` (rows `r0..r0 + c` of all `n` tokens into `y`, [n, c]) over the
/// pool, each task owning a range of rows, and gathers the results into `out` ([n, rows]).
/// The first error of any task is returned.
fn by_rows(
    pool: &ThreadPool,
    rows: usize,
    n: usize,
    out: &mut [f32],
    rows_of: impl Fn(usize, &mut [f32]) -> Result<()> + Sync,
) -> Result<()> {
    if n == 0 || rows == 0 {
        return Ok(());
    }
    let per = rows_per_task(rows, pool.threads());
    let dst = DisjointOut::new(out);
    let failed = std::sync::Mutex::new(None);
    pool.run(rows.div_ceil(per), |task| {
        let r0 = task * per;
        let c = (r0 + per).min(rows) - r0;
        TASK_OUT.with_borrow_mut(|y| {
            y.resize(n * c, 0.0);
            if let Err(err) = rows_of(r0, &mut y[..n * c]) {
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

//! Matrix products with sparse weights, split over the thread pool by rows as the dense
//! `kernels::matmul` splits them: each token's activations are quantized once, then every
//! task runs the encoding's matrix-vector kernel over its share of the rows.

use super::group::{GroupActs, GroupKernel, GroupMatrix};
use super::nm::{NmActs, NmKernel};
use super::store::{Encoding, SparseMatrix};
use crate::kernels::{DisjointOut, ThreadPool};
use crate::{Error, Result};

/// Activations quantized for a sparse kernel, kept between calls.
#[derive(Default)]
pub struct SparseScratch {
    nm: Vec<NmActs>,
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
            let acts: Vec<GroupActs> = x.chunks_exact(cols).take(n).map(GroupActs::new).collect();
            // One kernel call per token and task: the kernel prepares per-call tables
            // (activation scales per group) that smaller calls would rebuild.
            by_rows(pool, rows, n, out, |t, r0, y| {
                k.matvec_rows(&m, &acts[t], r0, y)
            })
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
            scratch.nm.resize_with(n, NmActs::new);
            for (a, xr) in scratch.nm.iter_mut().zip(x.chunks_exact(cols)) {
                a.quantize(&f, xr)?;
            }
            let acts = &scratch.nm[..n];
            by_rows(pool, rows, n, out, |t, r0, y| {
                k.matvec(&w[r0 * rb..(r0 + y.len()) * rb], &acts[t], y)
            })
        }
    }
}

/// Runs `rows_of(t, r0, y)` (rows `r0..r0 + y.len()` of token `t` into `y`) over the pool,
/// each task owning a range of rows for every token, and gathers the results into `out`
/// ([n, rows]). The first error of any task is returned.
fn by_rows(
    pool: &ThreadPool,
    rows: usize,
    n: usize,
    out: &mut [f32],
    rows_of: impl Fn(usize, usize, &mut [f32]) -> Result<()> + Sync,
) -> Result<()> {
    let per = rows_per_task(rows, pool.threads());
    let dst = DisjointOut::new(out);
    let failed = std::sync::Mutex::new(None);
    pool.run(rows.div_ceil(per), |task| {
        let r0 = task * per;
        let r1 = (r0 + per).min(rows);
        let mut y = vec![0.0f32; r1 - r0];
        for t in 0..n {
            if let Err(err) = rows_of(t, r0, &mut y) {
                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
                return;
            }
            // SAFETY: tasks own disjoint row ranges, so no two write the same element.
            unsafe { dst.write(t * rows + r0, &y) };
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

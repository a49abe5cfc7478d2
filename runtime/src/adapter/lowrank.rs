//! Turning dense deltas into sparse ones: a LoRA's s B A, or a fine-tuned model minus its
//! base, reduced to its largest entries so that it can be fused and switched like a sparse
//! adapter.

use super::patch::dense_row;
use super::{Adapter, Delta, Format, LowRank, NameScheme, SparseDelta, Target};
use crate::gguf::GgufFile;
use crate::quant;
use crate::{Error, Result};

/// How much of a dense delta a sparse one kept.
#[derive(Clone, Debug, Default)]
pub struct Kept {
    pub name: String,
    pub kept: usize,
    pub total: usize,
    /// ||dense - sparse||_F^2 and ||dense||_F^2 (f64).
    pub err2: f64,
    pub norm2: f64,
}

impl Kept {
    /// ||dense - sparse||_F / ||dense||_F (0 for a zero delta).
    pub fn relative_error(&self) -> f64 {
        if self.norm2 == 0.0 {
            0.0
        } else {
            (self.err2 / self.norm2).sqrt()
        }
    }
}

/// Sums `Kept` over tensors.
pub fn total(k: &[Kept]) -> Kept {
    let mut t = Kept {
        name: "all".into(),
        ..Kept::default()
    };
    for x in k {
        t.kept += x.kept;
        t.total += x.total;
        t.err2 += x.err2;
        t.norm2 += x.norm2;
    }
    t
}

/// The `k` entries of largest magnitude of `dense` (row-major), in index order (ties at the
/// threshold go to the lowest indices), and what was kept.
pub fn top_k(name: &str, dense: &[f32], k: usize) -> (SparseDelta, Kept) {
    let k = k.min(dense.len());
    let mut mags: Vec<f32> = dense.iter().map(|v| v.abs()).collect();
    let norm2: f64 = dense.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let thr = if k == 0 {
        f32::INFINITY
    } else {
        let at = dense.len() - k;
        *mags.select_nth_unstable_by(at, |a, b| a.total_cmp(b)).1
    };
    let above = dense.iter().filter(|v| v.abs() > thr).count();
    let mut ties = k.saturating_sub(above);
    let mut s = SparseDelta::default();
    let mut kept2 = 0f64;
    for (i, &v) in dense.iter().enumerate() {
        let m = v.abs();
        let take = m > thr
            || (m == thr && ties > 0 && {
                ties -= 1;
                true
            });
        if take && v != 0.0 {
            s.idx.push(i as u32);
            s.val.push(v);
            kept2 += (v as f64) * (v as f64);
        }
    }
    let kept = Kept {
        name: name.to_string(),
        kept: s.idx.len(),
        total: dense.len(),
        err2: (norm2 - kept2).max(0.0),
        norm2,
    };
    (s, kept)
}

/// Number of entries kept at `density` of `n` (at least one when density > 0).
pub fn count_for(density: f64, n: usize) -> usize {
    if density <= 0.0 {
        0
    } else {
        ((density * n as f64).round() as usize).clamp(1, n)
    }
}

/// A sparse adapter keeping `density` of each low-rank target's entries of s B A (sparse
/// targets are kept whole). The scheme and names of `a` are kept.
pub fn lora_to_sparse(a: &Adapter, density: f64) -> Result<(Adapter, Vec<Kept>)> {
    check_density(density)?;
    let mut targets = Vec::with_capacity(a.targets.len());
    let mut report = Vec::with_capacity(a.targets.len());
    for t in &a.targets {
        let delta = match &t.delta {
            Delta::LowRank(l) => {
                let dense = dense_low_rank(l, t.rows, t.cols);
                let (s, kept) = top_k(&t.name, &dense, count_for(density, dense.len()));
                report.push(kept);
                Delta::Sparse(s)
            }
            d => d.clone(),
        };
        targets.push(Target { delta, ..t.clone() });
    }
    Ok((
        Adapter {
            format: Format::SparseDelta,
            targets,
            uid: super::new_uid(),
            ..a.clone()
        },
        report,
    ))
}

/// s B A of one low-rank delta, row-major `rows` x `cols`.
pub fn dense_low_rank(l: &LowRank, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    let parts = [(l, 1.0f32)];
    let mut acc = Vec::new();
    for (r, row) in out.chunks_exact_mut(cols).enumerate() {
        dense_row(&parts, r, cols, row, &mut acc);
    }
    out
}

/// The sparse delta `tuned - base` over every 2-D tensor the two files share with equal
/// shapes whose values differ, keeping `density` of each tensor's entries (1.0 keeps every
/// nonzero difference). Names are GGUF names; the files must describe the same model.
pub fn diff_models(
    tuned: &GgufFile,
    base: &GgufFile,
    density: f64,
    source: &std::path::Path,
) -> Result<(Adapter, Vec<Kept>)> {
    check_density(density)?;
    let err = |m: String| Error::adapter(source, m);
    let mut targets = Vec::new();
    let mut report = Vec::new();
    for t in tuned.tensors() {
        let b = base
            .tensor(&t.name)
            .ok_or_else(|| err(format!("tensor `{}` is not in the base model", t.name)))?;
        if b.shape != t.shape {
            return Err(err(format!(
                "tensor `{}` is {:?} in the fine-tuned model and {:?} in the base",
                t.name, t.shape, b.shape
            )));
        }
        if t.shape.len() != 2 {
            continue;
        }
        let n = t.n_elements() as usize;
        let read = |f: &GgufFile, ti: &crate::gguf::TensorInfo| -> Result<Vec<f32>> {
            let mut v = vec![0f32; n];
            quant::dequantize(ti.ty, f.tensor_data(ti)?, &mut v)
                .map_err(|e| err(format!("tensor `{}`: {e}", ti.name)))?;
            Ok(v)
        };
        let (x, y) = (read(tuned, t)?, read(base, b)?);
        let dense: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a - b).collect();
        if dense.iter().all(|&v| v == 0.0) {
            continue;
        }
        let (s, kept) = top_k(&t.name, &dense, count_for(density, n));
        report.push(kept);
        targets.push(Target {
            name: t.name.clone(),
            rows: t.n_rows() as usize,
            cols: t.row_len() as usize,
            delta: Delta::Sparse(s),
        });
    }
    if targets.is_empty() {
        return Err(err("the two models have no differing matrices".into()));
    }
    Ok((
        Adapter {
            source: source.to_path_buf(),
            format: Format::SparseDelta,
            names: NameScheme::Gguf,
            targets,
            default_scale: 1.0,
            info: Vec::new(),
            base_hash: Some(super::base_shape_hash(base)),
            base_arch: None,
            uid: super::new_uid(),
        },
        report,
    ))
}

fn check_density(d: f64) -> Result<()> {
    if !(d > 0.0 && d <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "density {d} must be in (0, 1]"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_the_largest_and_reports_the_error() {
        let d = [0.5, -3.0, 1.0, 0.0, 2.0, -1.0];
        let (s, k) = top_k("t", &d, 3);
        assert_eq!(s.idx, [1, 2, 4]); // -3, 2, then the first of the two ±1 ties
        assert_eq!(s.val, [-3.0, 1.0, 2.0]);
        assert_eq!(k.norm2, 0.25 + 9.0 + 1.0 + 4.0 + 1.0);
        assert_eq!(k.err2, 0.25 + 1.0);
        let (s, k) = top_k("t", &d, 6);
        assert_eq!(s.idx, [0, 1, 2, 4, 5]); // the zero is not stored
        assert_eq!(k.relative_error(), 0.0);
    }

    #[test]
    fn lora_to_sparse_at_full_density_is_exact() {
        let l = LowRank {
            rank: 2,
            a: vec![1.0, 2.0, 3.0, -1.0, 0.5, 0.25],
            b: vec![1.0, 0.0, 0.0, 2.0],
            scale: 0.5,
        };
        // s B A = 0.5 * [[1, 2, 3], [-2, 1, 0.5]]
        let dense = dense_low_rank(&l, 2, 3);
        assert_eq!(dense, [0.5, 1.0, 1.5, -1.0, 0.5, 0.25]);
    }
}

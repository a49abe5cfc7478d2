//! Pruning a dense model into a sparse one: every chosen matrix is decoded to f32, scored,
//! and re-encoded N:M (the N best-scored weights of every group of M inputs are kept) or
//! group-sparse (the groups of g inputs with the smallest score norm are removed, a
//! fraction S of each row).
//!
//! Scores: magnitude |w|, or Wanda (Sun et al. 2023): |w_ij| * ||x_j||, the weight times
//! the L2 norm of its input over calibration tokens, so that weights fed by large
//! activations survive. Other tensors are copied unchanged.

use super::group::{self, GroupFormat, Values};
use super::nm::{self, NmFormat, NmValues};
use super::store::{self, Encoding, SparseMatrix};
use crate::gguf::{GgufFile, GgufWriter, TensorInfo};
use crate::quant::{self, GgmlType};
use crate::{Error, Result};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

/// How weights are ranked within a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Magnitude,
    Wanda,
}

/// The matrices pruned when no pattern is given: attention and MLP of every block.
pub const DEFAULT_TENSORS: [&str; 7] = [
    "blk.*.attn_q.weight",
    "blk.*.attn_k.weight",
    "blk.*.attn_v.weight",
    "blk.*.attn_output.weight",
    "blk.*.ffn_gate.weight",
    "blk.*.ffn_up.weight",
    "blk.*.ffn_down.weight",
];

/// The sparsity pattern.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Structure {
    /// N kept in every M consecutive inputs.
    Nm { n: usize, m: usize },
    /// Groups of `g` consecutive inputs; a fraction `sparsity` of each row's groups removed,
    /// or with `tile` > 0 (8, 16 or 32) of each tile's groups, the rows of a tile of `tile`
    /// rows dropping the same groups (`sparse::group`'s row tiles).
    Group {
        g: usize,
        sparsity: f64,
        tile: usize,
    },
}

#[derive(Clone, Debug)]
pub struct PruneOptions {
    pub structure: Structure,
    /// Value precision, Q8 (`true`) or Q4; `None`: Q8 for sources of 6 bits or more, Q4
    /// below.
    pub q8: Option<bool>,
    pub method: Method,
    /// Glob patterns (`*` matches any run of characters) of the tensors to prune.
    pub tensors: Vec<String>,
    /// Wanda: sum of squared inputs per column of each matrix, by tensor name.
    pub input_sq: Option<HashMap<String, Vec<f64>>>,
}

/// What was pruned.
#[derive(Clone, Debug, Default)]
pub struct PruneReport {
    pub tensors: usize,
    pub dense_bytes: u64,
    pub sparse_bytes: u64,
}

/// `*` globbing.
pub fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            let Some(tail) = name.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| glob(rest, &tail[i..]))
        }
    }
}

fn default_q8(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(ty, F32 | F16 | BF16 | Q8_0 | Q8_1 | Q6_K | Q8_K)
}

/// Prunes the matrices of `src` chosen by `o` and writes the model to `dst`.
/// `progress(i, n, name)` runs per tensor.
pub fn prune_file(
    src: &GgufFile,
    dst: &Path,
    o: &PruneOptions,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<PruneReport> {
    let patterns: Vec<&str> = if o.tensors.is_empty() {
        DEFAULT_TENSORS.to_vec()
    } else {
        o.tensors.iter().map(String::as_str).collect()
    };
    if o.method == Method::Wanda && o.input_sq.is_none() {
        return Err(Error::InvalidArgument(
            "Wanda pruning needs input statistics from calibration text".into(),
        ));
    }
    let mut w = GgufWriter::new();
    for (k, v) in src.metadata().iter() {
        if !k.starts_with("sparrow.sparse.") {
            w.set(k, v.clone());
        }
    }
    if let Structure::Group { sparsity, .. } = o.structure {
        if !(0.0..=1.0).contains(&sparsity) {
            return Err(Error::InvalidArgument(format!(
                "group sparsity {sparsity} is not in [0, 1]"
            )));
        }
    }
    // The plan: for every tensor, its encoded bytes if it is pruned (group-sparse sizes are
    // known only once encoded, and the writer lays out every tensor before any data).
    let mut plan: Vec<Option<Vec<u8>>> = Vec::new();
    let mut report = PruneReport::default();
    let n_tensors = src.tensors().len();
    for (i, t) in src.tensors().iter().enumerate() {
        progress(i, n_tensors, &t.name);
        if store::read(src.metadata(), t)?.is_some() {
            return Err(Error::tensor(
                &t.name,
                "is sparse already; prune a dense model",
            ));
        }
        let chosen = patterns.iter().any(|p| glob(p, &t.name));
        if !chosen {
            w.add_tensor(&t.name, &t.shape, t.ty)?;
            plan.push(None);
            continue;
        }
        if t.name == "token_embd.weight" {
            return Err(Error::tensor(
                &t.name,
                "the embeddings stay dense (rows are looked up, not multiplied)",
            ));
        }
        if t.shape.len() != 2 || quant::ops(t.ty).is_none() {
            return Err(Error::tensor(
                &t.name,
                format!("cannot prune a {} tensor of shape {:?}", t.ty, t.shape),
            ));
        }
        let q8 = o.q8.unwrap_or_else(|| default_q8(t.ty));
        let encoding = match o.structure {
            Structure::Nm { n, m } => {
                let v = if q8 { NmValues::Q8 } else { NmValues::Q4 };
                Encoding::Nm(NmFormat::new(n, m, v)?)
            }
            Structure::Group { g, tile, .. } => {
                let v = if q8 { Values::Q8 } else { Values::Q4 };
                Encoding::Group(GroupFormat::new(g, v)?.with_tile(tile)?)
            }
        };
        let s = SparseMatrix {
            encoding,
            rows: t.shape[1] as usize,
            cols: t.shape[0] as usize,
        };
        let norms = match &o.input_sq {
            None => None,
            Some(sq) => match sq.get(&t.name) {
                Some(v) if v.len() == s.cols => Some(v),
                _ => {
                    return Err(Error::tensor(
                        &t.name,
                        "no calibration statistics for this matrix (Wanda)",
                    ))
                }
            },
        };
        let bytes = prune_tensor(t, src.tensor_data(t)?, &s, o, norms).map_err(|e| match e {
            Error::Tensor { .. } => e,
            e => Error::tensor(&t.name, e.to_string()),
        })?;
        store::declare(&mut w, &t.name, &s, bytes.len())?;
        report.tensors += 1;
        report.dense_bytes += t.n_bytes;
        report.sparse_bytes += bytes.len() as u64;
        plan.push(Some(bytes));
    }
    if report.tensors == 0 {
        return Err(Error::InvalidArgument(format!(
            "no tensor matches {patterns:?}"
        )));
    }
    w.write_file(dst, |i, _| match &plan[i] {
        Some(b) => Ok(Cow::Borrowed(b.as_slice())),
        None => Ok(Cow::Owned(src.tensor_data(&src.tensors()[i])?.to_vec())),
    })?;
    Ok(report)
}

/// Decodes, scores and encodes one matrix.
fn prune_tensor(
    t: &TensorInfo,
    data: &[u8],
    s: &SparseMatrix,
    o: &PruneOptions,
    input_sq: Option<&Vec<f64>>,
) -> Result<Vec<u8>> {
    let mut dense = vec![0.0f32; s.rows * s.cols];
    quant::dequantize(t.ty, data, &mut dense)?;
    let col_norm: Option<Vec<f32>> = match o.method {
        Method::Magnitude => None,
        Method::Wanda => input_sq.map(|v| v.iter().map(|&q| q.sqrt() as f32).collect()),
    };
    match (s.encoding, o.structure) {
        (Encoding::Nm(f), _) => {
            let rb = s.row_bytes()?;
            let mut out = vec![0u8; rb * s.rows];
            let mut keep = vec![false; s.cols];
            let mut score = vec![0.0f32; s.cols];
            for (row, o) in dense.chunks_exact(s.cols).zip(out.chunks_exact_mut(rb)) {
                match &col_norm {
                    None => nm::encode_row(&f, row, o)?,
                    Some(norm) => {
                        for ((sc, w), n) in score.iter_mut().zip(row).zip(norm) {
                            *sc = w.abs() * n;
                        }
                        keep_best(&score, f.n, f.m, &mut keep);
                        nm::encode_row_with_mask(&f, row, &keep, o)?
                    }
                }
            }
            Ok(out)
        }
        (Encoding::Group(f), Structure::Group { g, sparsity, tile }) => {
            let tile = tile.max(1);
            match &col_norm {
                None => group::prune_tiles(&mut dense, s.cols, g, sparsity, tile)?,
                Some(norm) => {
                    // Groups ranked by the L2 norm of their Wanda scores: prune a scaled copy,
                    // then zero the same groups of the weights.
                    let mut scaled: Vec<f32> = dense
                        .chunks_exact(s.cols)
                        .flat_map(|row| row.iter().zip(norm).map(|(w, n)| w * n))
                        .collect();
                    group::prune_tiles(&mut scaled, s.cols, g, sparsity, tile)?;
                    for (gw, gs) in dense.chunks_mut(g).zip(scaled.chunks(g)) {
                        if gs.iter().all(|&v| v == 0.0) {
                            gw.fill(0.0);
                        }
                    }
                }
            }
            group::encode(&dense, s.rows, s.cols, f)
        }
        (Encoding::Group(_), Structure::Nm { .. }) => Err(Error::InvalidArgument(
            "internal: a group encoding planned for N:M pruning".into(),
        )),
    }
}

/// Marks the `n` highest scores of every group of `m` (ties to the lower position).
fn keep_best(score: &[f32], n: usize, m: usize, keep: &mut [bool]) {
    let mut idx: Vec<usize> = Vec::with_capacity(m);
    for (g, kg) in score.chunks(m).zip(keep.chunks_mut(m)) {
        idx.clear();
        idx.extend(0..g.len());
        idx.sort_by(|&a, &b| g[b].total_cmp(&g[a]).then(a.cmp(&b)));
        kg.fill(false);
        for &i in idx.iter().take(n) {
            kg[i] = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_stars_anywhere() {
        assert!(glob("blk.*.attn_q.weight", "blk.12.attn_q.weight"));
        assert!(!glob("blk.*.attn_q.weight", "blk.12.attn_k.weight"));
        assert!(glob("*", "anything"));
        assert!(glob("*.weight", "output.weight"));
        assert!(!glob("blk.*", "output.weight"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
    }

    #[test]
    fn keep_best_takes_the_n_largest_per_group() {
        let score = [0.1, 0.9, 0.5, 0.2, 3.0, 1.0, 1.0, 0.0];
        let mut keep = [false; 8];
        keep_best(&score, 2, 4, &mut keep);
        assert_eq!(keep, [false, true, true, false, true, true, false, false]);
    }
}

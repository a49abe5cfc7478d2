//! Terms computed beside a weight instead of fused into it: y = W x + side(x).
//!
//! - Unfused LoRA: scale * B (A x) per adapter, as PEFT's unmerged forward computes it
//!   (selectable per request, no patching).
//! - Sparse residuals: what requantizing a patched block dropped (exact sum minus stored
//!   value, per element), so that a fused adapter on a 4-bit base computes the exact f32
//!   merge at the cost of a sparse product.

use super::LowRank;

/// A sparse matrix in compressed rows: row r holds `col[ptr[r]..ptr[r + 1]]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Csr {
    pub ptr: Vec<u32>,
    pub col: Vec<u32>,
    pub val: Vec<f32>,
}

impl Csr {
    /// From (flat index, value) pairs of a `rows` x `cols` matrix, in any order; equal
    /// indices are summed.
    pub fn from_pairs(rows: usize, cols: usize, mut pairs: Vec<(u32, f32)>) -> Csr {
        pairs.sort_by_key(|p| p.0);
        let mut c = Csr {
            ptr: vec![0; rows + 1],
            col: Vec::with_capacity(pairs.len()),
            val: Vec::with_capacity(pairs.len()),
        };
        let mut last = None;
        for (i, v) in pairs {
            if last == Some(i) {
                *c.val.last_mut().unwrap() += v;
                continue;
            }
            last = Some(i);
            let r = i as usize / cols;
            c.ptr[r + 1] += 1;
            c.col.push((i as usize % cols) as u32);
            c.val.push(v);
        }
        for r in 0..rows {
            c.ptr[r + 1] += c.ptr[r];
        }
        c
    }

    pub fn nnz(&self) -> usize {
        self.val.len()
    }
}

/// Everything added beside one weight.
#[derive(Clone, Debug, Default)]
pub struct Side {
    /// Low-rank terms, each with its scale folded into `LowRank::scale`.
    pub lora: Vec<LowRank>,
    pub sparse: Option<Csr>,
}

impl Side {
    pub fn is_empty(&self) -> bool {
        self.lora.is_empty() && self.sparse.as_ref().is_none_or(|c| c.nnz() == 0)
    }

    /// `out[t] += side(x[t])` for `n` rows of `x` (`cols` wide) and `out` (`rows` wide).
    /// `tmp` is scratch.
    pub fn add_to(
        &self,
        x: &[f32],
        n: usize,
        rows: usize,
        cols: usize,
        out: &mut [f32],
        tmp: &mut Vec<f32>,
    ) {
        for t in 0..n {
            let xt = &x[t * cols..(t + 1) * cols];
            let ot = &mut out[t * rows..(t + 1) * rows];
            for l in &self.lora {
                tmp.clear();
                tmp.extend(l.a.chunks_exact(cols).map(|a| dot(a, xt)));
                for (o, b) in ot.iter_mut().zip(l.b.chunks_exact(l.rank)) {
                    *o += dot(b, tmp) * l.scale;
                }
            }
            if let Some(c) = &self.sparse {
                for (r, o) in ot.iter_mut().enumerate() {
                    let (s, e) = (c.ptr[r] as usize, c.ptr[r + 1] as usize);
                    let mut acc = 0f32;
                    for (&j, &v) in c.col[s..e].iter().zip(&c.val[s..e]) {
                        acc += v * xt[j as usize];
                    }
                    *o += acc;
                }
            }
        }
    }
}

/// A dot product in eight lanes (vectorizes without fast-math).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_terms_against_dense() {
        let (rows, cols, n) = (5, 11, 2);
        let l = LowRank {
            rank: 2,
            a: (0..2 * cols).map(|i| (i as f32 * 0.37).sin()).collect(),
            b: (0..rows * 2).map(|i| (i as f32 * 0.71).cos()).collect(),
            scale: 0.5,
        };
        let pairs = vec![(3u32, 1.5f32), (12, -2.0), (54, 0.25), (3, 0.5)];
        let side = Side {
            lora: vec![l.clone()],
            sparse: Some(Csr::from_pairs(rows, cols, pairs.clone())),
        };
        let x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.13).sin()).collect();
        let mut out = vec![1.0f32; n * rows];
        side.add_to(&x, n, rows, cols, &mut out, &mut Vec::new());
        // Dense reference in f64.
        let mut d = vec![0f64; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                for k in 0..2 {
                    d[r * cols + c] += 0.5 * l.b[r * 2 + k] as f64 * l.a[k * cols + c] as f64;
                }
            }
        }
        for (i, v) in pairs {
            d[i as usize] += v as f64;
        }
        for t in 0..n {
            for r in 0..rows {
                let want: f64 = 1.0
                    + (0..cols)
                        .map(|c| d[r * cols + c] * x[t * cols + c] as f64)
                        .sum::<f64>();
                assert!((out[t * rows + r] as f64 - want).abs() < 1e-5);
            }
        }
    }
}

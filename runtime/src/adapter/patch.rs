//! The patcher: adds deltas to the weights in place and keeps what it overwrote.
//!
//! For each target tensor, touched elements are grouped by quantization block. Before a
//! block is changed its raw bytes are appended to the tensor's undo log (as runs of
//! consecutive blocks); then the block is edited ([`crate::quant::edit`]). Restoring copies
//! the saved bytes back, which gives the base bit for bit whatever the edit did.
//!
//! Everything that can fail is checked before the first byte is written
//! ([`super::Adapter::check`] and [`plan`]), so an apply either happens completely or not at
//! all. Tensors are independent and are patched in parallel.

use super::{Adapter, Delta, LowRank, SparseDelta};
use crate::gguf::GgufFile;
use crate::quant::edit::{self, Outcome, Requant};
use crate::quant::GgmlType;
use crate::{Error, Result};
use rayon::prelude::*;
use std::ops::Range;

/// One adapter's delta for a tensor, with the scale it is applied at.
#[derive(Clone, Copy)]
pub struct Part<'a> {
    pub delta: &'a Delta,
    pub scale: f32,
}

/// The work for one tensor: where it is, its format and shape, and the deltas to add.
pub struct TensorPlan<'a> {
    pub name: String,
    pub range: Range<usize>,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub parts: Vec<Part<'a>>,
}

/// Groups the targets of `adapters` (each already checked against `file`, see
/// [`Adapter::check`]) by tensor. Several adapters on one tensor are composed: their deltas
/// are summed before the tensor is requantized once.
pub fn plan<'a>(file: &GgufFile, adapters: &[(&'a Adapter, f32)]) -> Result<Vec<TensorPlan<'a>>> {
    let mut plans: Vec<TensorPlan<'a>> = Vec::new();
    for &(a, scale) in adapters {
        if !scale.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "adapter scale {scale} is not finite"
            )));
        }
        a.check(file)?;
        for t in &a.targets {
            let info = file.tensor(&t.name).expect("checked");
            if let Some(p) = plans.iter_mut().find(|p| p.name == t.name) {
                p.parts.push(Part {
                    delta: &t.delta,
                    scale,
                });
                continue;
            }
            plans.push(TensorPlan {
                name: t.name.clone(),
                range: file.range(info)?,
                ty: info.ty,
                rows: t.rows,
                cols: t.cols,
                parts: vec![Part {
                    delta: &t.delta,
                    scale,
                }],
            });
        }
    }
    Ok(plans)
}

/// The saved bytes of one tensor.
struct TensorUndo {
    name: String,
    rows: usize,
    cols: usize,
    /// (flat index, exact - stored) where requantization dropped part of the sum; filled
    /// when [`Options::residual`] is set.
    residual: Vec<(u32, f32)>,
    start: usize,
    block_bytes: usize,
    /// (first block, number of blocks), increasing and disjoint.
    runs: Vec<(u32, u32)>,
    saved: Vec<u8>,
}

impl TensorUndo {
    #[inline]
    fn save(&mut self, block: usize, bytes: &[u8]) {
        match self.runs.last_mut() {
            Some((first, n)) if (*first + *n) as usize == block => *n += 1,
            _ => self.runs.push((block as u32, 1)),
        }
        self.saved.extend_from_slice(bytes);
    }
}

/// What one apply changed: enough to undo it.
#[derive(Default)]
pub struct Undo {
    tensors: Vec<TensorUndo>,
}

impl Undo {
    /// Heap bytes held by the log (saved blocks, runs, residuals).
    pub fn bytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|t| t.saved.len() + 8 * t.runs.len() + 8 * t.residual.len())
            .sum()
    }

    /// The residuals kept per tensor: (name, rows, cols, (flat index, value) sorted).
    pub fn residuals(&self) -> impl Iterator<Item = (&str, usize, usize, &[(u32, f32)])> {
        self.tensors
            .iter()
            .filter(|t| !t.residual.is_empty())
            .map(|t| (t.name.as_str(), t.rows, t.cols, &t.residual[..]))
    }
}

/// Counts of one apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub tensors: usize,
    /// Elements given a delta.
    pub elements: usize,
    /// Blocks changed (and saved).
    pub blocks: usize,
    /// Blocks re-encoded from scratch because the delta left their grid.
    pub reencoded: usize,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.tensors += o.tensors;
        self.elements += o.elements;
        self.blocks += o.blocks;
        self.reencoded += o.reencoded;
    }
}

/// Options of an apply.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub requant: Requant,
    /// Keep what requantization drops as a sparse residual per tensor (see
    /// [`super::side`]), for exact fused adapters on coarse bases.
    pub residual: bool,
}

/// Patches `map` (the whole model mapping) with `plans`. Cannot fail: [`plan`] did every
/// check.
pub fn apply(map: &mut [u8], plans: &[TensorPlan<'_>], o: Options) -> (Undo, Stats) {
    let slices = disjoint(map, plans.iter().map(|p| p.range.clone()));
    let results: Vec<(TensorUndo, Stats)> = plans
        .par_iter()
        .zip(slices)
        .map(|(p, bytes)| patch_tensor(p, bytes, o))
        .collect();
    let mut stats = Stats::default();
    let mut undo = Undo::default();
    for (u, s) in results {
        stats += s;
        undo.tensors.push(u);
    }
    (undo, stats)
}

/// Writes the saved bytes back.
pub fn restore(map: &mut [u8], undo: &Undo) {
    let ranges = undo.tensors.iter().map(|t| {
        let end = t
            .runs
            .last()
            .map_or(t.start, |&(f, n)| t.start + (f + n) as usize * t.block_bytes);
        t.start..end
    });
    let slices = disjoint(map, ranges);
    undo.tensors
        .par_iter()
        .zip(slices)
        .for_each(|(t, bytes)| {
            let mut at = 0;
            for &(first, n) in &t.runs {
                let (s, len) = (first as usize * t.block_bytes, n as usize * t.block_bytes);
                bytes[s..s + len].copy_from_slice(&t.saved[at..at + len]);
                at += len;
            }
        });
}

/// Splits `map` into the mutable sub-slices `ranges` (disjoint, in any order), returned in
/// the order of `ranges`.
fn disjoint(map: &mut [u8], ranges: impl Iterator<Item = Range<usize>>) -> Vec<&mut [u8]> {
    let ranges: Vec<Range<usize>> = ranges.collect();
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| ranges[i].start);
    let mut out: Vec<Option<&mut [u8]>> = (0..ranges.len()).map(|_| None).collect();
    let mut rest = map;
    let mut consumed = 0;
    for i in order {
        let r = &ranges[i];
        assert!(r.start >= consumed, "tensor ranges overlap");
        let tail = std::mem::take(&mut rest);
        let (_, tail) = tail.split_at_mut(r.start - consumed);
        let (mine, tail) = tail.split_at_mut(r.len());
        out[i] = Some(mine);
        rest = tail;
        consumed = r.end;
    }
    out.into_iter().map(|s| s.expect("every range split")).collect()
}

fn patch_tensor(p: &TensorPlan<'_>, bytes: &mut [u8], o: Options) -> (TensorUndo, Stats) {
    let (bs, bb) = p.ty.block_layout();
    let mut u = TensorUndo {
        name: p.name.clone(),
        rows: p.rows,
        cols: p.cols,
        residual: Vec::new(),
        start: p.range.start,
        block_bytes: bb,
        runs: Vec::new(),
        saved: Vec::new(),
    };
    let mut st = Stats {
        tensors: 1,
        ..Stats::default()
    };
    let mut scratch = edit::Scratch::default();
    let mut deltas: Vec<(u32, f32)> = Vec::with_capacity(bs);
    let mut res: Vec<(u32, f32)> = Vec::new();
    let mut edit_block = |u: &mut TensorUndo, st: &mut Stats, block: usize, d: &[(u32, f32)]| {
        let b = &mut bytes[block * bb..(block + 1) * bb];
        u.save(block, b);
        st.blocks += 1;
        st.elements += d.len();
        res.clear();
        let keep = o.residual.then_some(&mut res);
        if edit::add_to_block(p.ty, b, d, o.requant, &mut scratch, keep) == Outcome::Reencoded {
            st.reencoded += 1;
        }
        let first = (block * bs) as u32;
        u.residual.extend(res.iter().map(|&(e, v)| (first + e, v)));
    };

    let low_rank: Vec<(&LowRank, f32)> = p
        .parts
        .iter()
        .filter_map(|q| match q.delta {
            Delta::LowRank(l) => Some((l, q.scale)),
            _ => None,
        })
        .collect();
    let sparse = merged_sparse(&p.parts);

    if low_rank.is_empty() {
        u.saved.reserve(sparse.len().min(p.rows * p.cols / bs) * bb);
        let mut i = 0;
        while i < sparse.len() {
            let block = sparse[i].0 as usize / bs;
            let base = (block * bs) as u32;
            deltas.clear();
            while i < sparse.len() && sparse[i].0 as usize / bs == block {
                deltas.push((sparse[i].0 - base, sparse[i].1));
                i += 1;
            }
            edit_block(&mut u, &mut st, block, &deltas);
        }
    } else {
        u.saved.reserve(p.rows * p.cols / bs * bb);
        let (mut row, mut acc) = (vec![0f32; p.cols], Vec::new());
        let mut si = 0;
        for r in 0..p.rows {
            dense_row(&low_rank, r, p.cols, &mut row, &mut acc);
            let row_end = ((r + 1) * p.cols) as u32;
            while si < sparse.len() && sparse[si].0 < row_end {
                row[sparse[si].0 as usize - r * p.cols] += sparse[si].1;
                si += 1;
            }
            for (k, chunk) in row.chunks_exact(bs).enumerate() {
                deltas.clear();
                deltas.extend(chunk.iter().enumerate().map(|(e, &d)| (e as u32, d)));
                edit_block(&mut u, &mut st, (r * p.cols) / bs + k, &deltas);
            }
        }
    }
    (u, st)
}

/// The sparse parts of a tensor summed into one sorted (index, scaled value) list.
fn merged_sparse(parts: &[Part<'_>]) -> Vec<(u32, f32)> {
    let sparse: Vec<(&SparseDelta, f32)> = parts
        .iter()
        .filter_map(|q| match q.delta {
            Delta::Sparse(s) => Some((s, q.scale)),
            _ => None,
        })
        .collect();
    let mut out: Vec<(u32, f32)> = Vec::with_capacity(sparse.iter().map(|s| s.0.idx.len()).sum());
    for (s, scale) in &sparse {
        out.extend(s.idx.iter().zip(&s.val).map(|(&i, &v)| (i, v * scale)));
    }
    if sparse.len() > 1 {
        // Stable sort keeps adapter order among equal indices, so sums are deterministic.
        out.sort_by_key(|p| p.0);
        out.dedup_by(|next, prev| {
            if next.0 == prev.0 {
                prev.1 += next.1;
                true
            } else {
                false
            }
        });
    }
    out
}

/// Row `r` of sum(scale * B A) over the low-rank parts, into `out` (`cols` long); `acc` is
/// scratch. Each part is computed as (B A) then scaled, the order PEFT's merge uses.
pub fn dense_row(
    parts: &[(&LowRank, f32)],
    r: usize,
    cols: usize,
    out: &mut [f32],
    acc: &mut Vec<f32>,
) {
    out.fill(0.0);
    acc.resize(cols, 0.0);
    for &(l, scale) in parts {
        acc.fill(0.0);
        let b = &l.b[r * l.rank..(r + 1) * l.rank];
        for (k, &bk) in b.iter().enumerate() {
            let a = &l.a[k * cols..(k + 1) * cols];
            for (d, &x) in acc.iter_mut().zip(a) {
                *d += bk * x;
            }
        }
        let s = scale * l.scale;
        for (o, &x) in out.iter_mut().zip(acc.iter()) {
            *o += x * s;
        }
    }
}

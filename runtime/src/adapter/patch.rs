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
use crate::quant::edit::{self, BlockLog, Outcome, Requant};
use crate::quant::GgmlType;
use crate::sparse::store::SparseMatrix;
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
    /// The encoding of a sparse (pruned) base matrix, edited by [`crate::sparse::edit`]'s
    /// rule instead of block by block.
    pub sparse: Option<SparseMatrix>,
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
                sparse: crate::sparse::store::read(file.metadata(), info)?,
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
    log: BlockLog,
}

impl TensorUndo {
    /// An empty undo of plan `p`'s tensor, logging into `log` in units of `block_bytes`.
    fn new(p: &TensorPlan<'_>, block_bytes: usize, log: BlockLog) -> TensorUndo {
        TensorUndo {
            name: p.name.clone(),
            rows: p.rows,
            cols: p.cols,
            residual: Vec::new(),
            start: p.range.start,
            block_bytes,
            log,
        }
    }

    /// End of the last saved block in the mapping.
    fn end(&self) -> usize {
        self.start + self.log.end_block(self.block_bytes) * self.block_bytes
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
            .map(|t| t.log.len_bytes() + 8 * t.residual.len())
            .sum()
    }

    /// The block logs with the mapping offset of their tensor, for reuse by a later apply.
    pub fn into_logs(self) -> impl Iterator<Item = (usize, BlockLog)> {
        self.tensors.into_iter().map(|t| (t.start, t.log))
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
    /// Blocks changed (and saved); for a sparse matrix, rows edited.
    pub blocks: usize,
    /// Blocks re-encoded from scratch because the delta left their grid.
    pub reencoded: usize,
    /// Deltas at pruned positions of sparse matrices, dropped (see [`crate::sparse::edit`]).
    pub dropped: usize,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.tensors += o.tensors;
        self.elements += o.elements;
        self.blocks += o.blocks;
        self.reencoded += o.reencoded;
        self.dropped += o.dropped;
    }
}

/// Options of an apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub requant: Requant,
    /// Keep what requantization drops as a sparse residual per tensor (see
    /// [`super::side`]), for exact fused adapters on coarse bases.
    pub residual: bool,
}

/// Patches `map` (the whole model mapping) with `plans`, in parallel over tensors. [`plan`]
/// did every check that can be made up front; what remains is a sparse row that does not
/// decode or a sum its encoding cannot hold, found while editing: then every tensor is
/// restored and the error returned, so that an apply happens completely or not at all.
///
/// `spare` holds logs of earlier, undone patches by tensor offset: their buffers are reused,
/// so that a switch does not allocate (and have the kernel zero) tens of megabytes each time.
pub fn apply(
    map: &mut [u8],
    plans: &[TensorPlan<'_>],
    o: Options,
    spare: &mut Spare,
) -> Result<(Undo, Stats)> {
    let slices = disjoint(map, plans.iter().map(|p| p.range.clone()));
    let logs: Vec<BlockLog> = plans
        .iter()
        .map(|p| take_spare(spare, p.range.start))
        .collect();
    let results: Vec<(TensorUndo, Stats, Option<Error>)> = plans
        .par_iter()
        .zip(slices)
        .zip(logs)
        .map(|((p, bytes), log)| patch_tensor(p, bytes, o, log))
        .collect();
    let mut stats = Stats::default();
    let mut undo = Undo::default();
    let mut failed = None;
    for (u, s, e) in results {
        stats += s;
        undo.tensors.push(u);
        failed = failed.or(e);
    }
    if let Some(e) = failed {
        restore(map, &undo);
        return Err(e);
    }
    Ok((undo, stats))
}

/// Block logs of undone patches, by the mapping offset of their tensor.
pub type Spare = std::collections::HashMap<usize, BlockLog>;

/// The spare log of the tensor at `start` (its buffers fit that tensor's next patch best),
/// emptied, or a new one.
fn take_spare(spare: &mut Spare, start: usize) -> BlockLog {
    let mut l = spare.remove(&start).unwrap_or_default();
    l.clear();
    l
}

/// Writes the saved bytes back.
pub fn restore(map: &mut [u8], undo: &Undo) {
    let ranges = undo.tensors.iter().map(|t| t.start..t.end());
    let slices = disjoint(map, ranges);
    undo.tensors
        .par_iter()
        .zip(slices)
        .for_each(|(t, bytes)| t.log.restore(bytes, t.block_bytes));
}

/// A patch kept with the bytes it wrote ([`compile`]), so that it can be made again on the
/// same base bytes by copying ([`replay`]) instead of editing blocks. Replaying writes
/// exactly what the original apply wrote, and its undo log restores the base as usual.
pub struct Compiled {
    undo: Undo,
    redo: Vec<edit::Redo>,
    stats: Stats,
}

impl Compiled {
    pub fn undo(&self) -> &Undo {
        &self.undo
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Heap bytes held: the undo log and the new bytes.
    pub fn bytes(&self) -> usize {
        self.undo.bytes() + self.redo.iter().map(|r| r.len_bytes()).sum::<usize>()
    }
}

/// Keeps what the apply that returned `undo` wrote into `map`; call it right after that
/// apply. Apply-time residuals are not kept: compile only patches made without them.
pub fn compile(map: &[u8], undo: Undo, stats: Stats) -> Compiled {
    let redo = capture(map, &undo);
    Compiled { undo, redo, stats }
}

/// What the places logged in `undo` hold now in `map` (see [`edit::BlockLog::capture`]).
pub fn capture(map: &[u8], undo: &Undo) -> Vec<edit::Redo> {
    undo.tensors
        .par_iter()
        .map(|t| t.log.capture(&map[t.start..t.end()], t.block_bytes))
        .collect()
}

/// Makes the patch of `c` again by copying its new bytes. `map` must hold the bytes the
/// patch was compiled on (the base, in [`super::stack::Stack`]'s use).
pub fn replay(map: &mut [u8], c: &Compiled) {
    redo(map, &c.undo, &c.redo);
}

/// Writes `redo` (from [`capture`]) at the places logged in `undo`.
pub fn redo(map: &mut [u8], undo: &Undo, redo: &[edit::Redo]) {
    let ranges = undo.tensors.iter().map(|t| t.start..t.end());
    let slices = disjoint(map, ranges);
    undo.tensors
        .par_iter()
        .zip(redo)
        .zip(slices)
        .for_each(|((t, r), bytes)| t.log.redo(bytes, t.block_bytes, r));
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
    out.into_iter()
        .map(|s| s.expect("every range split"))
        .collect()
}

/// Patches one tensor. On an error (sparse tensors only) the log holds what was changed
/// before it, so that restoring undoes the partial patch.
fn patch_tensor(
    p: &TensorPlan<'_>,
    bytes: &mut [u8],
    o: Options,
    log: BlockLog,
) -> (TensorUndo, Stats, Option<Error>) {
    if let Some(m) = &p.sparse {
        return patch_sparse(p, m, bytes, o, log);
    }
    let (u, st) = patch_dense(p, bytes, o, log);
    (u, st, None)
}

/// Patches one tensor of a block format (or floats).
fn patch_dense(
    p: &TensorPlan<'_>,
    bytes: &mut [u8],
    o: Options,
    log: BlockLog,
) -> (TensorUndo, Stats) {
    let (bs, bb) = p.ty.block_layout();
    let mut u = TensorUndo::new(p, bb, log);
    let mut st = Stats {
        tensors: 1,
        ..Stats::default()
    };
    let (low_rank, sparse) = split_parts(p);
    let residual = o.residual.then_some(&mut u.residual);

    if low_rank.is_empty() {
        // One adapter: its indices and values as they are; several: summed first.
        let merged;
        let (idx, val, scale) = match sparse.as_slice() {
            [(s, scale)] => (&s.idx[..], &s.val[..], *scale),
            _ => {
                merged = merged_sparse(&sparse);
                (&merged.0[..], &merged.1[..], 1.0)
            }
        };
        // Mostly single changed bytes; whole blocks only where a block is re-encoded.
        u.log.byte_at.reserve(idx.len());
        u.log.byte_old.reserve(idx.len());
        let c = edit::add_sparse(
            p.ty, bytes, idx, val, scale, o.requant, &mut u.log, residual,
        );
        st.elements += c.elements;
        st.blocks += c.blocks;
        st.reencoded += c.reencoded;
        return (u, st);
    }

    // Low-rank: every element of every row changes; rows are computed densely.
    u.log.saved.reserve(p.rows * p.cols / bs * bb);
    let merged = merged_sparse(&sparse);
    let mut res = residual;
    let mut scratch = edit::Scratch::default();
    let mut deltas: Vec<(u32, f32)> = Vec::with_capacity(bs);
    let mut local: Vec<(u32, f32)> = Vec::new();
    let (mut row, mut acc) = (vec![0f32; p.cols], Vec::new());
    let mut si = 0;
    for r in 0..p.rows {
        dense_row(&low_rank, r, p.cols, &mut row, &mut acc);
        let row_end = ((r + 1) * p.cols) as u32;
        while si < merged.0.len() && merged.0[si] < row_end {
            row[merged.0[si] as usize - r * p.cols] += merged.1[si];
            si += 1;
        }
        for (k, chunk) in row.chunks_exact(bs).enumerate() {
            let block = (r * p.cols) / bs + k;
            let b = &mut bytes[block * bb..(block + 1) * bb];
            u.log.save(block, b);
            deltas.clear();
            deltas.extend(chunk.iter().enumerate().map(|(e, &d)| (e as u32, d)));
            local.clear();
            let keep = res.is_some().then_some(&mut local);
            if edit::add_to_block(p.ty, b, &deltas, o.requant, &mut scratch, keep)
                == Outcome::Reencoded
            {
                st.reencoded += 1;
            }
            if let Some(rv) = res.as_deref_mut() {
                let first = (block * bs) as u32;
                rv.extend(local.iter().map(|&(e, v)| (first + e, v)));
            }
            st.blocks += 1;
            st.elements += bs;
        }
    }
    (u, st)
}

/// Patches a sparse (pruned) matrix row by row ([`crate::sparse::edit::add_to_row`]): each
/// touched row is edited, then the bytes that changed are logged one by one (a row's scales
/// and values are in different places, and mostly a byte or two change).
fn patch_sparse(
    p: &TensorPlan<'_>,
    m: &SparseMatrix,
    bytes: &mut [u8],
    o: Options,
    log: BlockLog,
) -> (TensorUndo, Stats, Option<Error>) {
    let mut u = TensorUndo::new(p, 1, log);
    let mut st = Stats {
        tensors: 1,
        ..Stats::default()
    };
    let fail = |u, st, e: Error| (u, st, Some(Error::tensor(&p.name, e.to_string())));
    let ranges = match crate::sparse::edit::row_ranges(m, bytes) {
        Ok(r) => r,
        Err(e) => return fail(u, st, e),
    };
    let (low_rank, sparse) = split_parts(p);
    let merged = merged_sparse(&sparse);
    let cols = p.cols;
    let (mut delta, mut acc) = (vec![0f32; cols], Vec::new());
    let mut scratch = crate::sparse::edit::RowScratch::default();
    let (mut old, mut local) = (Vec::new(), Vec::new());
    let mut si = 0;
    for (r, range) in ranges.into_iter().enumerate() {
        let row_end = ((r + 1) * cols) as u32;
        let first = si;
        while si < merged.0.len() && merged.0[si] < row_end {
            si += 1;
        }
        if low_rank.is_empty() && si == first {
            continue;
        }
        dense_row(&low_rank, r, cols, &mut delta, &mut acc);
        for k in first..si {
            delta[merged.0[k] as usize - r * cols] += merged.1[k];
        }
        let row = &mut bytes[range.clone()];
        old.clear();
        old.extend_from_slice(row);
        local.clear();
        let keep = o.residual.then_some(&mut local);
        match crate::sparse::edit::add_to_row(m, row, &delta, &mut scratch, keep) {
            Ok(dropped) => st.dropped += dropped,
            Err(e) => return fail(u, st, e),
        }
        for (k, (&a, &b)) in old.iter().zip(row.iter()).enumerate() {
            if a != b {
                u.log.byte_at.push((range.start + k) as u32);
                u.log.byte_old.push(a);
            }
        }
        let at = (r * cols) as u32;
        u.residual.extend(local.iter().map(|&(c, v)| (at + c, v)));
        st.elements += delta.iter().filter(|&&d| d != 0.0).count();
        st.blocks += 1;
    }
    (u, st, None)
}

/// The low-rank and the sparse deltas of a plan, each with its scale.
#[allow(clippy::type_complexity)]
fn split_parts<'a>(p: &TensorPlan<'a>) -> (Vec<(&'a LowRank, f32)>, Vec<(&'a SparseDelta, f32)>) {
    let mut low_rank = Vec::new();
    let mut sparse = Vec::new();
    for q in &p.parts {
        match q.delta {
            Delta::LowRank(l) => low_rank.push((l, q.scale)),
            Delta::Sparse(s) => sparse.push((s, q.scale)),
            Delta::Coo(_) => {}
        }
    }
    (low_rank, sparse)
}

/// Several sparse deltas summed into one (indices, scaled values), sorted.
fn merged_sparse(sparse: &[(&SparseDelta, f32)]) -> (Vec<u32>, Vec<f32>) {
    let mut all: Vec<(u32, f32)> = Vec::with_capacity(sparse.iter().map(|s| s.0.idx.len()).sum());
    for (s, scale) in sparse {
        all.extend(s.idx.iter().zip(&s.val).map(|(&i, &v)| (i, v * scale)));
    }
    // Stable sort keeps adapter order among equal indices, so sums are deterministic.
    all.sort_by_key(|p| p.0);
    all.dedup_by(|next, prev| {
        if next.0 == prev.0 {
            prev.1 += next.1;
            true
        } else {
            false
        }
    });
    all.into_iter().unzip()
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

//! The adapters fused into one mapped model, as a stack: applied on top of each other,
//! removed in reverse order, each with the undo log that restores what it overwrote.

use super::patch::{self, Compiled, Options, Stats, Undo};
use super::{Adapter, NameScheme};
use crate::gguf::GgufFile;
use crate::quant::edit::BlockLog;
use crate::{Error, Result};
use std::sync::Arc;

/// An adapter (or several composed) fused into a model's weights.
pub struct Applied {
    pub id: u64,
    /// Source paths and scales, for display.
    pub label: String,
    pub stats: Stats,
    undo: Log,
}

/// How an entry is undone: its own log, or the log of a compiled patch it was replayed
/// from (or compiled into).
enum Log {
    Own(Undo),
    Compiled(Arc<Compiled>),
}

impl Log {
    fn undo(&self) -> &Undo {
        match self {
            Log::Own(u) => u,
            Log::Compiled(c) => c.undo(),
        }
    }
}

impl Applied {
    /// Bytes of base weights saved to undo this patch.
    pub fn undo_bytes(&self) -> usize {
        self.undo.undo().bytes()
    }

    /// Residuals kept by this entry (see [`super::patch::Options::residual`]).
    pub fn residuals(&self) -> impl Iterator<Item = (&str, usize, usize, &[(u32, f32)])> {
        self.undo.undo().residuals()
    }
}

/// Which adapters at which scales a patch fuses: (adapter uid, scale bits) each, in order.
type Key = Vec<(u64, u32)>;

/// Patches compiled on this file's base bytes ([`patch::compile`]), most recently used last,
/// within a byte budget.
///
/// A sparse adapter is applied by editing scattered elements, each dequantized, moved and
/// requantized: on a 1% adapter that is most of a switch's time. The first time a list of
/// adapters is fused onto the bare base, the bytes it wrote are kept next to its undo log;
/// when the same list at the same scales is fused onto the bare base again, those bytes are
/// copied in instead, which writes exactly what the edit wrote (the base bytes are the
/// same: unapplying restores them bit for bit). Patches fused on top of other adapters, and
/// applies with non-default [`Options`], always edit.
struct Cache {
    budget: usize,
    entries: Vec<(Key, Arc<Compiled>)>,
}

impl Cache {
    fn get(&mut self, key: &Key) -> Option<Arc<Compiled>> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        let e = self.entries.remove(i);
        let c = e.1.clone();
        self.entries.push(e);
        Some(c)
    }

    /// Whether a patch whose undo log holds `undo_bytes` could be kept (the new bytes take
    /// at most as much again).
    fn may_keep(&self, undo_bytes: usize) -> bool {
        undo_bytes.saturating_mul(2) <= self.budget
    }

    /// Keeps `c`, dropping the least recently used entries beyond the budget.
    fn insert(&mut self, key: Key, c: Arc<Compiled>) {
        self.entries.retain(|(k, _)| *k != key);
        self.entries.push((key, c));
        self.shrink();
    }

    /// Drops the least recently used entries until the rest fit the budget.
    fn shrink(&mut self) {
        let mut total = self.bytes();
        while total > self.budget && !self.entries.is_empty() {
            total -= self.entries.remove(0).1.bytes();
        }
    }

    fn bytes(&self) -> usize {
        self.entries.iter().map(|(_, c)| c.bytes()).sum()
    }
}

/// Default budget of compiled patches per model: eight 1% sparse adapters on a 135M model
/// at Q8_0 (about 7.4 MiB each, undo log and new bytes).
pub const DEFAULT_COMPILED_BUDGET: usize = 64 << 20;

/// Moves the tensors a patch will touch on (nearly) every page to anonymous, huge-page
/// backed memory first (see [`GgufFile::make_private`]): low-rank deltas and sparse ones
/// with at least one element per 4 KiB page on average. Sparser patches stay copy-on-write,
/// so that they copy only the pages they touch.
/// Neighbouring tensors are joined (a gap of other tensors under 2 MiB is moved too; its
/// contents do not change), so that the huge pages between them are not lost.
fn make_private(file: &mut GgufFile, plans: &[patch::TensorPlan<'_>]) {
    let mut spans: Vec<std::ops::Range<usize>> = plans
        .iter()
        .filter(|p| {
            let touched: usize = p
                .parts
                .iter()
                .map(|q| match q.delta {
                    super::Delta::Sparse(s) => s.idx.len(),
                    _ => usize::MAX / 2,
                })
                .fold(0, usize::saturating_add);
            touched >= p.range.len() / 4096
        })
        .map(|p| p.range.clone())
        .collect();
    spans.sort_by_key(|r| r.start);
    let mut merged: Vec<std::ops::Range<usize>> = Vec::new();
    for r in spans {
        match merged.last_mut() {
            Some(m) if r.start <= m.end + (2 << 20) => m.end = m.end.max(r.end),
            _ => merged.push(r),
        }
    }
    for r in merged {
        file.make_private(r);
    }
}

/// The fused adapters of one file, oldest first.
pub struct Stack {
    applied: Vec<Applied>,
    next_id: u64,
    /// Logs of removed entries, whose buffers the next apply reuses.
    spare: patch::Spare,
    compiled: Cache,
}

impl Default for Stack {
    fn default() -> Self {
        Stack::with_compiled_budget(DEFAULT_COMPILED_BUDGET)
    }
}

impl Stack {
    /// Fuses the adapters of `list` (each at its scale, composed: summed per tensor, each
    /// touched block requantized once) into `file` as one new entry, whose id is returned.
    /// Adapters in the HF name scheme are bound first. Every check runs before the first
    /// byte is written: on an error `file` is unchanged.
    pub fn apply(
        &mut self,
        file: &mut GgufFile,
        list: &[(&Adapter, f32)],
        o: Options,
    ) -> Result<u64> {
        if list.is_empty() {
            return Err(Error::InvalidArgument("no adapter to apply".into()));
        }
        let bound: Vec<Option<Adapter>> = list
            .iter()
            .map(|(a, _)| match a.names {
                NameScheme::Gguf => Ok(None),
                NameScheme::Hf => a.bind(file).map(Some),
            })
            .collect::<Result<_>>()?;
        let list: Vec<(&Adapter, f32)> = list
            .iter()
            .zip(&bound)
            .map(|(&(a, s), b)| (b.as_ref().unwrap_or(a), s))
            .collect();
        let plans = patch::plan(file, &list)?;
        let key = list.iter().map(|(a, s)| (a.uid, s.to_bits())).collect();
        let label = list
            .iter()
            .map(|(a, s)| format!("{}:{s}", a.source.display()))
            .collect::<Vec<_>>()
            .join(" + ");
        self.fuse(file, &plans, key, o, label)
    }

    /// Fuses planned (checked) adapters as a new entry: replays their compiled patch when
    /// one fits (bare base, default options), else edits and, on the bare base, compiles.
    /// On an error (see [`patch::apply`]) the file is unchanged.
    fn fuse(
        &mut self,
        file: &mut GgufFile,
        plans: &[patch::TensorPlan<'_>],
        key: Key,
        o: Options,
        label: String,
    ) -> Result<u64> {
        make_private(file, plans);
        let bare = self.applied.is_empty() && o == Options::default();
        let (undo, stats) = match self.compiled.get(&key).filter(|_| bare) {
            Some(c) => {
                patch::replay(file.bytes_mut(), &c);
                (Log::Compiled(c.clone()), c.stats())
            }
            None => {
                let (undo, stats) = patch::apply(file.bytes_mut(), plans, o, &mut self.spare)?;
                if bare && self.compiled.may_keep(undo.bytes()) {
                    let c = Arc::new(patch::compile(file.bytes(), undo, stats));
                    self.compiled.insert(key, c.clone());
                    (Log::Compiled(c), stats)
                } else {
                    (Log::Own(undo), stats)
                }
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        self.applied.push(Applied {
            id,
            label,
            stats,
            undo,
        });
        Ok(id)
    }

    /// Removes entry `id`, which must be the last applied, restoring the bytes it overwrote.
    pub fn unapply(&mut self, file: &mut GgufFile, id: u64) -> Result<()> {
        self.check_top(id)?;
        let top = self.applied.pop().expect("checked");
        patch::restore(file.bytes_mut(), top.undo.undo());
        self.recycle(top.undo);
        Ok(())
    }

    /// `id` is the last entry applied, or an error says why not.
    fn check_top(&self, id: u64) -> Result<()> {
        match self.applied.last() {
            Some(top) if top.id == id => {}
            Some(top) if self.applied.iter().any(|a| a.id == id) => {
                return Err(Error::InvalidArgument(format!(
                    "adapter #{id} is under #{}: adapters are removed in reverse order of \
                     application",
                    top.id
                )))
            }
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "no adapter #{id} is applied"
                )))
            }
        }
        Ok(())
    }

    /// Removes every entry: the file's bytes are the base's again.
    pub fn unapply_all(&mut self, file: &mut GgufFile) {
        while let Some(top) = self.applied.pop() {
            patch::restore(file.bytes_mut(), top.undo.undo());
            self.recycle(top.undo);
        }
    }

    /// Replaces entry `id` (the last applied) by `to` at `scale`: unapply then apply, with
    /// `to` checked and planned before anything is written, so a bad `to` leaves everything
    /// in place. (A single pass that restores and edits each tensor a cache-sized stretch at
    /// a time was tried twice and measured no faster: the edits are compute-bound.)
    pub fn switch(
        &mut self,
        file: &mut GgufFile,
        id: u64,
        to: &Adapter,
        scale: f32,
    ) -> Result<u64> {
        // Binding (HF names) and planning run every check, the scale's included, before
        // anything is written.
        let bound = match to.names {
            NameScheme::Gguf => None,
            NameScheme::Hf => Some(to.bind(file)?),
        };
        self.check_top(id)?;
        let to = bound.as_ref().unwrap_or(to);
        let plans = patch::plan(file, &[(to, scale)])?;
        // Editing sparse matrices can still fail (see `patch::apply`); keep what the current
        // entry wrote, to put it back then.
        let fallible = plans.iter().any(|p| p.sparse.is_some());
        let old = self.applied.pop().expect("checked");
        let written = fallible.then(|| patch::capture(file.bytes(), old.undo.undo()));
        patch::restore(file.bytes_mut(), old.undo.undo());
        let label = format!("{}:{scale}", to.source.display());
        let key = vec![(to.uid, scale.to_bits())];
        match self.fuse(file, &plans, key, Options::default(), label) {
            Ok(new_id) => {
                self.recycle(old.undo);
                Ok(new_id)
            }
            Err(e) => {
                if let Some(w) = written {
                    patch::redo(file.bytes_mut(), old.undo.undo(), &w);
                }
                self.applied.push(old);
                Err(e)
            }
        }
    }

    /// A stack whose compiled patches (see [`Cache`]) may hold `bytes` in all; 0 turns
    /// compiling off.
    pub fn with_compiled_budget(bytes: usize) -> Stack {
        Stack {
            applied: Vec::new(),
            next_id: 1,
            spare: patch::Spare::new(),
            compiled: Cache {
                budget: bytes,
                entries: Vec::new(),
            },
        }
    }

    /// Changes the budget of compiled patches, dropping the least recently used beyond it
    /// (an applied entry keeps the patch it uses until it is unapplied).
    pub fn set_compiled_budget(&mut self, bytes: usize) {
        self.compiled.budget = bytes;
        self.compiled.shrink();
    }

    /// Heap bytes held by compiled patches.
    pub fn compiled_bytes(&self) -> usize {
        self.compiled.bytes()
    }

    /// Keeps the buffers of an undone log for reuse, one per tensor (the larger). Logs of
    /// compiled patches stay with them.
    fn recycle(&mut self, undo: Log) {
        let Log::Own(undo) = undo else { return };
        for (start, l) in undo.into_logs() {
            let cap = |l: &BlockLog| l.saved.capacity() + 5 * l.byte_at.capacity();
            match self.spare.get(&start) {
                Some(old) if cap(old) >= cap(&l) => {}
                _ => {
                    self.spare.insert(start, l);
                }
            }
        }
    }

    pub fn applied(&self) -> &[Applied] {
        &self.applied
    }
}

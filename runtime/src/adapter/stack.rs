//! The adapters fused into one mapped model, as a stack: applied on top of each other,
//! removed in reverse order, each with the undo log that restores what it overwrote.

use super::patch::{self, Options, Stats, Undo};
use super::{Adapter, NameScheme};
use crate::gguf::GgufFile;
use crate::quant::edit::BlockLog;
use crate::{Error, Result};

/// An adapter (or several composed) fused into a model's weights.
pub struct Applied {
    pub id: u64,
    /// Source paths and scales, for display.
    pub label: String,
    pub stats: Stats,
    undo: Undo,
}

impl Applied {
    /// Bytes of base weights saved to undo this patch.
    pub fn undo_bytes(&self) -> usize {
        self.undo.bytes()
    }

    /// Residuals kept by this entry (see [`super::patch::Options::residual`]).
    pub fn residuals(&self) -> impl Iterator<Item = (&str, usize, usize, &[(u32, f32)])> {
        self.undo.residuals()
    }
}

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
}

impl Default for Stack {
    fn default() -> Self {
        Stack {
            applied: Vec::new(),
            next_id: 1,
            spare: patch::Spare::new(),
        }
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
        make_private(file, &plans);
        let (undo, stats) = patch::apply(file.bytes_mut(), &plans, o, &mut self.spare);
        let id = self.next_id;
        self.next_id += 1;
        let label = list
            .iter()
            .map(|(a, s)| format!("{}:{s}", a.source.display()))
            .collect::<Vec<_>>()
            .join(" + ");
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
        patch::restore(file.bytes_mut(), &top.undo);
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
            patch::restore(file.bytes_mut(), &top.undo);
            self.recycle(top.undo);
        }
    }

    /// Replaces entry `id` (the last applied) by `to` at `scale`: unapply then apply, with
    /// `to` checked and planned before anything is written, so a bad `to` leaves everything
    /// in place. (A single pass that restores and edits each tensor together was tried and
    /// measured slower.)
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
        make_private(file, &plans);
        let old = self.applied.pop().expect("checked");
        patch::restore(file.bytes_mut(), &old.undo);
        self.recycle(old.undo);
        let (undo, stats) = patch::apply(
            file.bytes_mut(),
            &plans,
            Options::default(),
            &mut self.spare,
        );
        let new_id = self.next_id;
        self.next_id += 1;
        self.applied.push(Applied {
            id: new_id,
            label: format!("{}:{scale}", to.source.display()),
            stats,
            undo,
        });
        Ok(new_id)
    }

    /// Keeps the buffers of an undone log for reuse, one per tensor (the larger).
    fn recycle(&mut self, undo: Undo) {
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

//! Adapters fused into the base weights by delta patching.
//!
//! An [`Adapter`] is a set of per-tensor deltas read from one of four formats:
//!
//! - a PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`), [`peft`];
//! - a PEFT SHiRA folder (sparse high-rank: `shira_indices` + `shira_weight`), [`peft`];
//! - a llama.cpp GGUF LoRA file, [`gguf_lora`];
//! - sparrow's sparse delta v1 (`*.sdelta.safetensors`), [`sdelta`].
//!
//! Deltas are kept as the format gives them: sparse (sorted flat indices and values) or low
//! rank (A, B and a scale). [`Adapter::bind`] maps HF module names to GGUF tensor names, moves
//! rows of llama's q/k deltas the way the GGUF converter moved the base's rows ([`names`]),
//! and checks every target against the base before anything is touched. The [`patch`]
//! module then adds the deltas to the weights in place and keeps the original bytes of every
//! touched block, so that unpatching restores the base bit for bit; [`stack::Stack`] keeps the
//! adapters fused into one file (LIFO, switch in one pass).
//!
//! Beside fusing: [`side`] holds terms computed next to a weight (unfused LoRA, and the
//! residuals that make a fused sparse adapter exact on a coarse base); [`lowrank`] turns
//! dense deltas (a LoRA, a fine-tuned model minus its base) into sparse ones; [`synth`] makes
//! random adapters for benchmarks and writes GGUF LoRAs.

pub mod gguf_lora;
pub mod lowrank;
pub mod names;
pub mod patch;
pub mod peft;
pub mod sdelta;
pub mod side;
mod st;
pub mod stack;
pub mod synth;

use crate::gguf::GgufFile;
use crate::quant::edit;
use crate::{Error, Result};
use names::RowOrder;
use std::path::{Path, PathBuf};

/// Where an adapter came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    PeftLora,
    PeftShira,
    GgufLora,
    SparseDelta,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::PeftLora => "PEFT LoRA",
            Format::PeftShira => "PEFT SHiRA",
            Format::GgufLora => "GGUF LoRA",
            Format::SparseDelta => "sparse delta v1",
        }
    }
}

/// Whether the deltas are sparse or low-rank (what `bench-switch` reports as `kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Sparse,
    Lora,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Sparse => "sparse",
            Kind::Lora => "lora",
        }
    }
}

/// Which names the targets use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameScheme {
    /// HF module names and HF row order (PEFT files, sparse deltas written from them).
    Hf,
    /// GGUF tensor names and the base file's row order.
    Gguf,
}

/// A sparse delta: `W.flat[idx[k]] += val[k]`, indices strictly increasing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseDelta {
    pub idx: Vec<u32>,
    pub val: Vec<f32>,
}

/// A low-rank delta: `W += scale * B A` with A `[rank, cols]` and B `[rows, rank]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct LowRank {
    pub rank: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub scale: f32,
}

/// Sparse coordinates of a weight whose shape the file does not give (PEFT SHiRA);
/// [`Adapter::bind`] turns them into a [`SparseDelta`] with the base's shape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Coo {
    pub row: Vec<u32>,
    pub col: Vec<u32>,
    pub val: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Delta {
    Sparse(SparseDelta),
    Coo(Coo),
    LowRank(LowRank),
}

/// The delta for one weight matrix of `rows` x `cols` (output x input, row-major as HF and
/// as GGUF store them: a GGUF tensor of shape `[cols, rows]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub delta: Delta,
}

impl Target {
    /// Elements the delta changes (all of them for a low-rank delta).
    pub fn touched(&self) -> usize {
        match &self.delta {
            Delta::Sparse(s) => s.idx.len(),
            Delta::Coo(c) => c.val.len(),
            Delta::LowRank(_) => self.rows * self.cols,
        }
    }

    /// Parameters the delta stores.
    pub fn stored(&self) -> usize {
        match &self.delta {
            Delta::Sparse(s) => s.idx.len(),
            Delta::Coo(c) => c.val.len(),
            Delta::LowRank(l) => l.a.len() + l.b.len(),
        }
    }
}

/// A loaded adapter.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub source: PathBuf,
    pub format: Format,
    pub names: NameScheme,
    /// The deltas. Not public, so that an adapter cannot change after it is made: its
    /// [`Adapter::uid`] names its contents (see [`stack::Stack`]'s compiled patches).
    pub(crate) targets: Vec<Target>,
    /// See [`Adapter::uid`].
    pub(crate) uid: u64,
    /// Scale the adapter asks for when the user gives none (sparse delta `default_scale`).
    pub default_scale: f32,
    /// Free-form facts for `sparrow adapter inspect` (config keys, base model name).
    pub info: Vec<(String, String)>,
    /// `base_shape_hash` of a sparse delta: the shapes of the base it was made for.
    pub base_hash: Option<String>,
    /// `general.architecture` of a GGUF LoRA: the architecture it was made for.
    pub base_arch: Option<String>,
}

/// A number no other adapter made in this process has.
pub(crate) fn new_uid() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Adapter {
    /// An adapter made in code (for example to write it with [`sdelta::write`]): default
    /// scale 1, no facts, no base fingerprint.
    pub fn new(
        source: PathBuf,
        format: Format,
        names: NameScheme,
        targets: Vec<Target>,
    ) -> Adapter {
        Adapter {
            source,
            format,
            names,
            targets,
            uid: new_uid(),
            default_scale: 1.0,
            info: Vec::new(),
            base_hash: None,
            base_arch: None,
        }
    }

    /// The deltas, one per target tensor.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Identifies this adapter's contents within the process. Adapters read or made
    /// separately have different ids even when their contents are equal; a clone, and the
    /// adapter [`Adapter::bind`] makes for a base, keep the id (binding to one base always
    /// gives the same deltas).
    pub fn uid(&self) -> u64 {
        self.uid
    }

    /// Reads an adapter, choosing the reader by what `path` is: a folder with
    /// `adapter_config.json` (PEFT), a `.gguf` file (GGUF LoRA) or a safetensors file with
    /// `format = sparse_delta` metadata.
    pub fn load(path: impl AsRef<Path>) -> Result<Adapter> {
        let path = path.as_ref();
        let md = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if md.is_dir() {
            return peft::load(path);
        }
        let mut magic = [0u8; 4];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
            if n < 4 {
                return Err(Error::adapter(path, "file too short to be an adapter"));
            }
        }
        if magic == crate::gguf::MAGIC {
            gguf_lora::load(path)
        } else {
            sdelta::load(path)
        }
    }

    pub fn kind(&self) -> Kind {
        if self
            .targets
            .iter()
            .any(|t| matches!(t.delta, Delta::LowRank(_)))
        {
            Kind::Lora
        } else {
            Kind::Sparse
        }
    }

    /// Elements the adapter changes, over all targets.
    pub fn touched(&self) -> usize {
        self.targets.iter().map(Target::touched).sum()
    }

    /// Maps the adapter onto `base`: GGUF names, the base's row order, shapes for SHiRA
    /// coordinates, and then every [`Adapter::check`]. An adapter already in the GGUF name
    /// scheme is only checked (and cloned).
    pub fn bind(&self, base: &GgufFile) -> Result<Adapter> {
        let err = |msg: String| Error::adapter(&self.source, msg);
        self.check_base(base)?;
        let bound = match self.names {
            NameScheme::Gguf => self.clone(),
            NameScheme::Hf => {
                let (arch, n_head, n_head_kv) = heads(base);
                let mut targets = Vec::with_capacity(self.targets.len());
                for t in &self.targets {
                    let name = names::hf_to_gguf(&t.name)
                        .ok_or_else(|| err(format!("module `{}` has no GGUF tensor", t.name)))?;
                    let info = self.find(base, &t.name, &name)?;
                    let (rows, cols) = base_shape(base, info)?;
                    let delta = match &t.delta {
                        Delta::Coo(c) => Delta::Sparse(peft::coo_to_sparse(
                            &self.source,
                            &t.name,
                            c,
                            rows,
                            cols,
                        )?),
                        d => {
                            self.check_shape(base, t, &name, info)?;
                            d.clone()
                        }
                    };
                    let order = names::row_order(arch, n_head, n_head_kv, &name);
                    order
                        .check(rows)
                        .map_err(|m| err(format!("module `{}`: {m}", t.name)))?;
                    targets.push(Target {
                        name,
                        rows,
                        cols,
                        delta: reorder_rows(delta, order, rows, cols),
                    });
                }
                Adapter {
                    names: NameScheme::Gguf,
                    targets,
                    ..self.clone()
                }
            }
        };
        bound.check(base)?;
        Ok(bound)
    }

    /// Every check that must pass before a byte of `base` is touched: the adapter is in the
    /// GGUF name scheme, was made for this base (architecture, shape fingerprint), every
    /// target exists once with the delta's shape and a type that can be patched, and sparse
    /// indices lie inside their tensor. Cheap: nothing is copied.
    pub fn check(&self, base: &GgufFile) -> Result<()> {
        let err = |msg: String| Error::adapter(&self.source, msg);
        if self.names != NameScheme::Gguf {
            return Err(err("not bound to a base model yet (HF module names)".into()));
        }
        self.check_base(base)?;
        let mut seen = std::collections::HashSet::with_capacity(self.targets.len());
        for t in &self.targets {
            if !seen.insert(t.name.as_str()) {
                return Err(err(format!("two deltas for tensor `{}`", t.name)));
            }
            let info = self.find(base, &t.name, &t.name)?;
            self.check_shape(base, t, &t.name, info)?;
            if t.rows * t.cols > u32::MAX as usize + 1 {
                return Err(err(format!(
                    "`{}` has more than 2^32 elements, which this build cannot patch",
                    t.name
                )));
            }
            match &t.delta {
                Delta::Sparse(s) => {
                    if let Some(&last) = s.idx.last() {
                        if last as usize >= t.rows * t.cols {
                            return Err(err(format!(
                                "`{}`: index {last} is outside the {} x {} tensor",
                                t.name, t.rows, t.cols
                            )));
                        }
                    }
                }
                Delta::Coo(_) => {
                    return Err(err(format!("`{}`: coordinates not bound", t.name)));
                }
                Delta::LowRank(_) => {}
            }
        }
        Ok(())
    }

    fn check_base(&self, base: &GgufFile) -> Result<()> {
        let err = |msg: String| Error::adapter(&self.source, msg);
        let arch = heads(base).0;
        if let Some(want) = self.base_arch.as_deref().filter(|a| *a != arch) {
            return Err(err(format!(
                "made for architecture `{want}`, the base model is `{arch}`"
            )));
        }
        if let Some(want) = &self.base_hash {
            let got = base_shape_hash(base);
            if *want != got {
                return Err(err(format!(
                    "made for another base model (base_shape_hash {want}, this model has {got})"
                )));
            }
        }
        Ok(())
    }

    /// The base tensor `gguf_name` that target `name` patches.
    fn find<'f>(
        &self,
        base: &'f GgufFile,
        name: &str,
        gguf_name: &str,
    ) -> Result<&'f crate::gguf::TensorInfo> {
        let err = |msg: String| Error::adapter(&self.source, msg);
        let info = base.tensor(gguf_name).ok_or_else(|| {
            if gguf_name == "output.weight" && base.tensor("token_embd.weight").is_some() {
                err(format!(
                    "`{name}`: this model ties the output matrix to the token embeddings, \
                     which this build does not patch"
                ))
            } else {
                err(format!(
                    "target `{name}` (tensor `{gguf_name}`) does not exist in the base model"
                ))
            }
        })?;
        if crate::sparse::store::read(base.metadata(), info)?.is_some() {
            // Patched by the rule of `sparse::edit` (pruned positions stay pruned).
            return Ok(info);
        }
        if !edit::supported(info.ty) {
            return Err(err(format!(
                "target `{name}`: base tensor type {} cannot be patched",
                info.ty
            )));
        }
        Ok(info)
    }

    fn check_shape(
        &self,
        base: &GgufFile,
        t: &Target,
        gguf_name: &str,
        info: &crate::gguf::TensorInfo,
    ) -> Result<()> {
        let (rows, cols) = base_shape(base, info)?;
        if (t.rows, t.cols) != (rows, cols) {
            return Err(Error::adapter(
                &self.source,
                format!(
                    "target `{}`: delta is {} x {}, base tensor `{gguf_name}` is {rows} x {cols}",
                    t.name, t.rows, t.cols
                ),
            ));
        }
        Ok(())
    }
}

/// (architecture, query heads, key/value heads) of a base model, from its metadata.
fn heads(base: &GgufFile) -> (&str, usize, usize) {
    let md = base.metadata();
    let arch = md.str("general.architecture").unwrap_or("");
    let get = |k: &str| md.u64(&format!("{arch}.attention.{k}")).unwrap_or(0) as usize;
    let (n_head, n_head_kv) = (get("head_count"), get("head_count_kv"));
    (
        arch,
        n_head,
        if n_head_kv == 0 { n_head } else { n_head_kv },
    )
}

/// Moves the rows of a delta from HF order into the base's order.
fn reorder_rows(d: Delta, order: RowOrder, rows: usize, cols: usize) -> Delta {
    if order == RowOrder::Same {
        return d;
    }
    match d {
        Delta::Sparse(s) => {
            let mut pairs: Vec<(u32, f32)> = s
                .idx
                .iter()
                .zip(&s.val)
                .map(|(&i, &v)| {
                    let (r, c) = (i as usize / cols, i as usize % cols);
                    ((order.to_gguf(r, rows) * cols + c) as u32, v)
                })
                .collect();
            pairs.sort_unstable_by_key(|p| p.0);
            Delta::Sparse(SparseDelta {
                idx: pairs.iter().map(|p| p.0).collect(),
                val: pairs.iter().map(|p| p.1).collect(),
            })
        }
        Delta::LowRank(l) => {
            let mut b = vec![0f32; l.b.len()];
            for r in 0..rows {
                let g = order.to_gguf(r, rows);
                b[g * l.rank..(g + 1) * l.rank].copy_from_slice(&l.b[r * l.rank..(r + 1) * l.rank]);
            }
            Delta::LowRank(LowRank { b, ..l })
        }
        Delta::Coo(_) => unreachable!("bind turns coordinates into flat indices first"),
    }
}

/// The (rows, columns) of a base matrix: of the weights it stands for, for a sparse matrix
/// (whose GGUF shape is that of its bytes). A matrix must be 1-D or 2-D.
pub fn base_shape(base: &GgufFile, info: &crate::gguf::TensorInfo) -> Result<(usize, usize)> {
    if let Some(m) = crate::sparse::store::read(base.metadata(), info)? {
        return Ok((m.rows, m.cols));
    }
    if info.shape.len() > 2 {
        return Err(Error::tensor(
            &info.name,
            format!("{}-D tensors are not adapter targets", info.shape.len()),
        ));
    }
    Ok((info.n_rows() as usize, info.row_len() as usize))
}

/// A fingerprint of a model's tensor names and shapes (not types or values, so every
/// quantization of one model shares it, and so does a pruned one: a sparse matrix counts
/// with the shape of the weights it stands for): FNV-1a 64 over `name:dims;` in file order.
pub fn base_shape_hash(base: &GgufFile) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for &x in b {
            h ^= x as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for t in base.tensors() {
        eat(t.name.as_bytes());
        eat(b":");
        let logical = match crate::sparse::store::read(base.metadata(), t) {
            Ok(Some(m)) => vec![m.cols as u64, m.rows as u64],
            _ => t.shape.clone(),
        };
        for d in &logical {
            eat(d.to_string().as_bytes());
            eat(b",");
        }
        eat(b";");
    }
    format!("{h:016x}")
}

/// Checks a sparse delta read from a file: same lengths, strictly increasing indices inside
/// the tensor, finite values.
pub(crate) fn check_sparse(path: &Path, name: &str, s: &SparseDelta, numel: usize) -> Result<()> {
    let err = |m: String| Error::adapter(path, format!("tensor `{name}`: {m}"));
    if s.idx.len() != s.val.len() {
        return Err(err(format!(
            "{} indices but {} values",
            s.idx.len(),
            s.val.len()
        )));
    }
    for w in s.idx.windows(2) {
        if w[1] <= w[0] {
            return Err(err(format!(
                "indices are not strictly increasing ({} then {})",
                w[0], w[1]
            )));
        }
    }
    if let Some(&last) = s.idx.last() {
        if last as usize >= numel {
            return Err(err(format!(
                "index {last} is outside the tensor of {numel} elements"
            )));
        }
    }
    if let Some(v) = s.val.iter().find(|v| !v.is_finite()) {
        return Err(err(format!("value {v} is not finite")));
    }
    Ok(())
}

/// Checks that low-rank factors have the sizes their shapes claim and finite values.
pub(crate) fn check_low_rank(
    path: &Path,
    name: &str,
    rows: usize,
    cols: usize,
    l: &LowRank,
) -> Result<()> {
    let err = |m: String| Error::adapter(path, format!("module `{name}`: {m}"));
    if l.rank == 0 || l.a.len() != l.rank * cols || l.b.len() != rows * l.rank {
        return Err(err(format!(
            "A has {} and B {} elements, expected rank {} x {cols} and {rows} x rank",
            l.a.len(),
            l.b.len(),
            l.rank
        )));
    }
    if !l.scale.is_finite() {
        return Err(err(format!("scale {} is not finite", l.scale)));
    }
    if l.a.iter().chain(&l.b).any(|v| !v.is_finite()) {
        return Err(err("A or B holds a value that is not finite".into()));
    }
    Ok(())
}

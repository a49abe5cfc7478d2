//! sparrow sparse delta v1 (`*.sdelta.safetensors`): a plain safetensors file.
//!
//! `__metadata__`: `format = sparse_delta`, `format_version = 1`, `semantics = add`,
//! `index = flat_row_major`, `name_scheme = hf | gguf`, and optionally `default_scale`,
//! `source`, `base_model` and `base_shape_hash` (see [`super::base_shape_hash`]).
//!
//! For each base tensor W (rows x cols, row-major as HF stores it):
//! - `W.sd_idx`: U32 (U64 when rows * cols >= 2^32), strictly increasing `row * cols + col`;
//! - `W.sd_val`: F16, BF16 or F32, every scale folded in;
//! - `W.sd_shape`: I64 `[rows, cols]` (or `[n]` for a vector).
//!
//! W is an HF module name (`model.layers.0.self_attn.q_proj`, rows in HF order) or a GGUF
//! tensor name (`blk.0.attn_q.weight`, rows in the GGUF file's order), as `name_scheme` says.

use super::st::{self, Owned};
use super::{check_sparse, Adapter, Delta, Format, NameScheme, SparseDelta, Target};
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const SUFFIX_IDX: &str = ".sd_idx";
pub const SUFFIX_VAL: &str = ".sd_val";
pub const SUFFIX_SHAPE: &str = ".sd_shape";

/// Element type of the values written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ValueType {
    #[default]
    F32,
    F16,
    BF16,
}

pub fn load(path: &Path) -> Result<Adapter> {
    let file = st::File::read(path)?;
    let md = file.metadata(path)?;
    let err = |m: String| Error::adapter(path, m);
    let get = |k: &str| md.get(k).map(String::as_str);
    match get("format") {
        Some("sparse_delta") => {}
        Some(f) => return Err(err(format!("metadata format is `{f}`, not `sparse_delta`"))),
        None => {
            return Err(err(
                "not a sparse delta (no `format` metadata) and not a GGUF file or PEFT folder"
                    .into(),
            ))
        }
    }
    match get("format_version") {
        Some("1") => {}
        v => {
            return Err(err(format!(
                "sparse delta format_version {v:?} is not supported (this build reads 1)"
            )))
        }
    }
    for (k, want) in [("semantics", "add"), ("index", "flat_row_major")] {
        if get(k) != Some(want) {
            return Err(err(format!(
                "metadata `{k}` is {:?}, only `{want}` is supported",
                get(k)
            )));
        }
    }
    let names = match get("name_scheme") {
        Some("hf") => NameScheme::Hf,
        Some("gguf") => NameScheme::Gguf,
        v => {
            return Err(err(format!(
                "metadata `name_scheme` is {v:?}, not hf or gguf"
            )))
        }
    };
    let default_scale = match get("default_scale") {
        None => 1.0,
        Some(s) => s
            .parse::<f32>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| err(format!("metadata `default_scale` = `{s}` is not a number")))?,
    };

    let parsed = file.parse(path)?;
    // Group the three tensors of each target by base name.
    let mut groups: BTreeMap<String, [Option<safetensors::tensor::TensorView<'_>>; 3]> =
        BTreeMap::new();
    for (name, view) in parsed.iter() {
        let (base, slot) = if let Some(b) = name.strip_suffix(SUFFIX_IDX) {
            (b, 0)
        } else if let Some(b) = name.strip_suffix(SUFFIX_VAL) {
            (b, 1)
        } else if let Some(b) = name.strip_suffix(SUFFIX_SHAPE) {
            (b, 2)
        } else {
            return Err(err(format!(
                "tensor `{name}` is not a .sd_idx, .sd_val or .sd_shape tensor"
            )));
        };
        groups.entry(base.to_string()).or_default()[slot] = Some(view);
    }
    if groups.is_empty() {
        return Err(err("the sparse delta has no tensors".into()));
    }
    let mut targets = Vec::with_capacity(groups.len());
    for (name, [idx, val, shape]) in groups {
        let missing = |s: &str| err(format!("tensor `{name}{s}` is missing"));
        let (idx, val, shape) = (
            idx.ok_or_else(|| missing(SUFFIX_IDX))?,
            val.ok_or_else(|| missing(SUFFIX_VAL))?,
            shape.ok_or_else(|| missing(SUFFIX_SHAPE))?,
        );
        let dims = st::indices(path, &format!("{name}{SUFFIX_SHAPE}"), &shape, 1 << 40)?;
        let (rows, cols) = match dims[..] {
            [r, c] if r > 0 && c > 0 => (r as usize, c as usize),
            [n] if n > 0 => (1, n as usize),
            _ => {
                return Err(err(format!(
                    "`{name}{SUFFIX_SHAPE}` is {dims:?}; [rows, cols] or [n] expected"
                )))
            }
        };
        let numel = rows
            .checked_mul(cols)
            .filter(|&n| n <= u32::MAX as usize + 1)
            .ok_or_else(|| {
                err(format!(
                    "tensor `{name}` has more than 2^32 elements, which this build cannot patch"
                ))
            })?;
        let i = st::indices(path, &format!("{name}{SUFFIX_IDX}"), &idx, numel as u64)?;
        let s = SparseDelta {
            idx: i.into_iter().map(|x| x as u32).collect(),
            val: st::floats(path, &format!("{name}{SUFFIX_VAL}"), &val)?,
        };
        check_sparse(path, &name, &s, numel)?;
        targets.push(Target {
            name,
            rows,
            cols,
            delta: Delta::Sparse(s),
        });
    }
    let mut info: Vec<(String, String)> = md
        .iter()
        .filter(|(k, _)| matches!(k.as_str(), "source" | "base_model" | "base_shape_hash"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    info.sort();
    Ok(Adapter {
        uid: super::new_uid(),
        source: path.to_path_buf(),
        format: Format::SparseDelta,
        names,
        targets,
        default_scale,
        info,
        base_hash: md.get("base_shape_hash").cloned(),
        base_arch: None,
    })
}

/// Optional metadata of a sparse delta file.
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    pub values: ValueType,
    pub default_scale: Option<f32>,
    pub source: Option<String>,
    pub base_model: Option<String>,
    pub base_shape_hash: Option<String>,
}

/// Writes the sparse targets of `a` (which must all be sparse) as a sparse delta v1 file.
pub fn write(path: &Path, a: &Adapter, o: &WriteOptions) -> Result<()> {
    let mut tensors = Vec::with_capacity(3 * a.targets.len());
    for t in &a.targets {
        let Delta::Sparse(s) = &t.delta else {
            return Err(Error::InvalidArgument(format!(
                "`{}` is a low-rank delta; convert it to sparse first",
                t.name
            )));
        };
        let n = s.idx.len();
        tensors.push((
            format!("{}{SUFFIX_IDX}", t.name),
            Owned::u32s(vec![n], &s.idx),
        ));
        let val = match o.values {
            ValueType::F32 => Owned::f32s(vec![n], &s.val),
            ValueType::F16 => Owned::f16s(vec![n], &s.val),
            ValueType::BF16 => Owned::bf16s(vec![n], &s.val),
        };
        tensors.push((format!("{}{SUFFIX_VAL}", t.name), val));
        tensors.push((
            format!("{}{SUFFIX_SHAPE}", t.name),
            Owned::i64s(vec![2], &[t.rows as i64, t.cols as i64]),
        ));
    }
    let mut md = HashMap::new();
    for (k, v) in [
        ("format", "sparse_delta"),
        ("format_version", "1"),
        ("semantics", "add"),
        ("index", "flat_row_major"),
        (
            "name_scheme",
            match a.names {
                NameScheme::Hf => "hf",
                NameScheme::Gguf => "gguf",
            },
        ),
    ] {
        md.insert(k.to_string(), v.to_string());
    }
    if let Some(s) = o.default_scale {
        md.insert("default_scale".into(), s.to_string());
    }
    for (k, v) in [
        ("source", &o.source),
        ("base_model", &o.base_model),
        ("base_shape_hash", &o.base_shape_hash),
    ] {
        if let Some(v) = v {
            md.insert(k.into(), v.clone());
        }
    }
    st::write(path, tensors, md)
}

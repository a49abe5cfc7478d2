//! How sparse matrices are stored in a GGUF file: as a raw byte tensor (type I8) of the
//! encoding's bytes, described by metadata, so that the file stays a valid GGUF that any
//! reader can list and copy, and dense tensors in the same file are unchanged.
//!
//! An N:M matrix of `rows` x `cols` logical weights is the I8 tensor `NAME` of shape
//! `[row_bytes, rows]` (ggml order; `row_bytes` = [`NmFormat::row_bytes`]`(cols)`) with
//!
//! | key | type | value |
//! |---|---|---|
//! | `sparrow.sparse.NAME.encoding` | string | `"nm"` |
//! | `sparrow.sparse.NAME.n`, `.m` | u32 | N and M |
//! | `sparrow.sparse.NAME.values` | string | `"q8"` or `"q4"` |
//! | `sparrow.sparse.NAME.cols` | u64 | logical inputs per row |
//! | `sparrow.sparse.NAME.layout` | u32 | byte layout, [`super::nm::LAYOUT`] (2) |
//!
//! A group-sparse matrix is the I8 tensor `NAME` of shape `[n_bytes]` holding the encoded
//! buffer of `sparse::group` (header, row offsets, rows), with `.encoding` = `"group"`,
//! `.g` (u32), `.values` (`"q8"` or `"q4"`), `.scale_groups` (u32), `.rows` and `.cols`
//! (u64), `.tile` (u32, only where rows are tiled: rows per tile that store the same
//! groups), and `.layout` (u32) = the buffer layout's version, [`group::LAYOUT_VERSION`] (2: a
//! count and index per row; tensors of layout 1, a bitmap per row and no key, are refused
//! with a message to prune again); the buffer's own header must agree, and the whole buffer
//! is validated at load.
//!
//! The file carries `sparrow.sparse.version` = 1.

use super::group::{self, GroupFormat, GroupMatrix, Values};
use super::nm::{NmFormat, NmValues, LAYOUT as NM_LAYOUT};
use crate::gguf::{GgufWriter, Metadata, TensorInfo, Value};
use crate::quant::GgmlType;
use crate::{Error, Result};

pub const VERSION: u32 = 1;

/// A sparse encoding of a matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Nm(NmFormat),
    Group(GroupFormat),
}

/// A sparse matrix as a file describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseMatrix {
    pub encoding: Encoding,
    pub rows: usize,
    pub cols: usize,
}

impl SparseMatrix {
    /// Bytes of one row (N:M rows have a fixed size; group-sparse rows do not).
    pub fn row_bytes(&self) -> Result<usize> {
        match self.encoding {
            Encoding::Nm(f) => f.row_bytes(self.cols),
            Encoding::Group(_) => Err(Error::InvalidArgument(
                "group-sparse rows have no fixed size".into(),
            )),
        }
    }

    /// Checks the stored bytes of the matrix where the encoding can be checked once (the
    /// group-sparse buffer: header, offsets, every row); N:M rows are safe to read whatever
    /// their bytes.
    pub fn check_bytes(&self, name: &str, bytes: &[u8]) -> Result<()> {
        match self.encoding {
            Encoding::Nm(_) => Ok(()),
            Encoding::Group(f) => {
                let m = GroupMatrix::new(bytes).map_err(|e| Error::tensor(name, e.to_string()))?;
                if m.rows() != self.rows || m.cols() != self.cols || m.format() != f {
                    return Err(Error::tensor(
                        name,
                        format!(
                            "group-sparse buffer holds {} x {} {:?}, the metadata says {} x {} \
                             {f:?}",
                            m.rows(),
                            m.cols(),
                            m.format(),
                            self.rows,
                            self.cols
                        ),
                    ));
                }
                Ok(())
            }
        }
    }
}

fn values_name(q8: bool) -> &'static str {
    if q8 {
        "q8"
    } else {
        "q4"
    }
}

fn key(tensor: &str, field: &str) -> String {
    format!("sparrow.sparse.{tensor}.{field}")
}

/// The sparse description of tensor `t`, checked against its type and shape, or `None` for a
/// dense tensor.
pub fn read(md: &Metadata, t: &TensorInfo) -> Result<Option<SparseMatrix>> {
    let enc_key = key(&t.name, "encoding");
    let Some(enc) = md.get(&enc_key) else {
        return Ok(None);
    };
    let bad = |msg: String| Error::tensor(&t.name, format!("sparse encoding: {msg}"));
    let version = md.get("sparrow.sparse.version").and_then(Value::as_u64);
    if version != Some(VERSION as u64) {
        return Err(bad(format!(
            "sparrow.sparse.version is {version:?}; this build reads version {VERSION}"
        )));
    }
    let encoding = match enc.as_str() {
        Some("nm") => {
            let layout = md.get(&key(&t.name, "layout")).and_then(Value::as_u64);
            if layout != Some(NM_LAYOUT as u64) {
                return Err(bad(format!(
                    "N:M byte layout {}; this build reads layout {NM_LAYOUT} (a file from an \
                     older build: prune the dense model again)",
                    layout.map_or("1 (no layout key)".to_string(), |l| l.to_string())
                )));
            }
            let n = md.u64(&key(&t.name, "n"))?;
            let m = md.u64(&key(&t.name, "m"))?;
            let values = match md.str(&key(&t.name, "values"))? {
                "q8" => NmValues::Q8,
                "q4" => NmValues::Q4,
                v => return Err(bad(format!("unknown N:M values `{v}` (q8 or q4)"))),
            };
            let small = |v: u64| usize::try_from(v).ok().filter(|&v| v <= 64);
            match (small(n), small(m)) {
                (Some(n), Some(m)) => {
                    Encoding::Nm(NmFormat::new(n, m, values).map_err(|e| bad(e.to_string()))?)
                }
                _ => return Err(bad(format!("N:M {n}:{m} out of range"))),
            }
        }
        Some("group") => {
            let layout = md.get(&key(&t.name, "layout")).and_then(Value::as_u64);
            if layout != Some(group::LAYOUT_VERSION as u64) {
                return Err(bad(format!(
                    "group-sparse byte layout {}; this build reads layout {} (a file from an \
                     older build: prune the dense model again)",
                    layout.map_or("1 (no layout key)".to_string(), |l| l.to_string()),
                    group::LAYOUT_VERSION
                )));
            }
            let small = |k: &str| -> Result<usize> {
                usize::try_from(md.u64(&key(&t.name, k))?)
                    .ok()
                    .filter(|&v| v <= 64)
                    .ok_or_else(|| bad(format!("{k} out of range")))
            };
            let values = match md.str(&key(&t.name, "values"))? {
                "q8" => Values::Q8,
                "q4" => Values::Q4,
                v => return Err(bad(format!("unknown group values `{v}` (q8 or q4)"))),
            };
            // Row tiles: a key only files with tiles carry (0 = none).
            let tile = match md.get(&key(&t.name, "tile")) {
                None => 0,
                Some(_) => small("tile")?,
            };
            let f = GroupFormat::new(small("g")?, values)
                .and_then(|f| f.with_scale_groups(small("scale_groups")?))
                .and_then(|f| f.with_tile(tile))
                .map_err(|e| bad(e.to_string()))?;
            let dim = |k: &str| -> Result<usize> {
                usize::try_from(md.u64(&key(&t.name, k))?)
                    .map_err(|_| bad(format!("{k} too large")))
            };
            let (rows, cols) = (dim("rows")?, dim("cols")?);
            if t.ty != GgmlType::I8 || t.shape.len() != 1 {
                return Err(bad(format!(
                    "stored as {} {:?}, expected a one-dimensional I8 buffer",
                    t.ty, t.shape
                )));
            }
            return Ok(Some(SparseMatrix {
                encoding: Encoding::Group(f),
                rows,
                cols,
            }));
        }
        other => return Err(bad(format!("unknown encoding {other:?}"))),
    };
    let cols = usize::try_from(md.u64(&key(&t.name, "cols"))?)
        .map_err(|_| bad("cols too large".into()))?;
    let s = SparseMatrix {
        encoding,
        rows: 0,
        cols,
    };
    let row_bytes = s.row_bytes().map_err(|e| bad(e.to_string()))?;
    if t.ty != GgmlType::I8 || t.shape.len() != 2 || t.shape[0] != row_bytes as u64 {
        return Err(bad(format!(
            "stored as {} {:?}, expected I8 [{row_bytes}, rows] for {cols} inputs per row",
            t.ty, t.shape
        )));
    }
    let rows = usize::try_from(t.shape[1]).map_err(|_| bad("too many rows".into()))?;
    Ok(Some(SparseMatrix { rows, ..s }))
}

/// Declares the sparse tensor `name` in `w` (tensor and metadata); `n_bytes` is the size of
/// a group-sparse buffer (N:M sizes follow from the shape).
pub fn declare(w: &mut GgufWriter, name: &str, s: &SparseMatrix, n_bytes: usize) -> Result<()> {
    w.set("sparrow.sparse.version", Value::U32(VERSION));
    w.set(key(name, "cols"), Value::U64(s.cols as u64));
    match s.encoding {
        Encoding::Nm(f) => {
            w.set(key(name, "encoding"), Value::String("nm".into()));
            w.set(key(name, "layout"), Value::U32(NM_LAYOUT));
            w.set(key(name, "n"), Value::U32(f.n as u32));
            w.set(key(name, "m"), Value::U32(f.m as u32));
            let v = values_name(f.values == NmValues::Q8);
            w.set(key(name, "values"), Value::String(v.into()));
            let row_bytes = s.row_bytes()?;
            w.add_tensor(name, &[row_bytes as u64, s.rows as u64], GgmlType::I8)
        }
        Encoding::Group(f) => {
            w.set(key(name, "layout"), Value::U32(group::LAYOUT_VERSION));
            w.set(key(name, "encoding"), Value::String("group".into()));
            w.set(key(name, "g"), Value::U32(f.g as u32));
            let v = values_name(f.values == Values::Q8);
            w.set(key(name, "values"), Value::String(v.into()));
            w.set(key(name, "scale_groups"), Value::U32(f.scale_groups as u32));
            if f.tile > 0 {
                w.set(key(name, "tile"), Value::U32(f.tile as u32));
            }
            w.set(key(name, "rows"), Value::U64(s.rows as u64));
            w.add_tensor(name, &[n_bytes as u64], GgmlType::I8)
        }
    }
}

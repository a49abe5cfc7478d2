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
//!
//! and the file carries `sparrow.sparse.version` = 1.

use super::nm::{NmFormat, NmValues};
use crate::gguf::{GgufWriter, Metadata, TensorInfo, Value};
use crate::quant::GgmlType;
use crate::{Error, Result};

pub const VERSION: u32 = 1;

/// A sparse encoding of a matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Nm(NmFormat),
}

/// A sparse matrix as a file describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseMatrix {
    pub encoding: Encoding,
    pub rows: usize,
    pub cols: usize,
}

impl SparseMatrix {
    /// Bytes of one row.
    pub fn row_bytes(&self) -> Result<usize> {
        match self.encoding {
            Encoding::Nm(f) => f.row_bytes(self.cols),
        }
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

/// Declares the sparse tensor `name` in `w` (tensor and metadata).
pub fn declare(w: &mut GgufWriter, name: &str, s: &SparseMatrix) -> Result<()> {
    let row_bytes = s.row_bytes()?;
    w.set("sparrow.sparse.version", Value::U32(VERSION));
    match s.encoding {
        Encoding::Nm(f) => {
            w.set(key(name, "encoding"), Value::String("nm".into()));
            w.set(key(name, "n"), Value::U32(f.n as u32));
            w.set(key(name, "m"), Value::U32(f.m as u32));
            let v = match f.values {
                NmValues::Q8 => "q8",
                NmValues::Q4 => "q4",
            };
            w.set(key(name, "values"), Value::String(v.into()));
        }
    }
    w.set(key(name, "cols"), Value::U64(s.cols as u64));
    w.add_tensor(name, &[row_bytes as u64, s.rows as u64], GgmlType::I8)
}

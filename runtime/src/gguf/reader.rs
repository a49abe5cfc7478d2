//! Bounds-checked GGUF v2/v3 parser.
//!
//! ```text
//! "GGUF" u32 version  u64 n_tensors  u64 n_kv
//! n_kv x      { string key, u32 type, value }
//! n_tensors x { string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset }
//! padding to general.alignment (default 32)
//! tensor data; each tensor at data_start + offset, offset a multiple of the alignment
//! ```
//!
//! Every count, length, offset and dimension read from the file is checked against the bytes
//! that remain (or the data section) before it is used, so that a truncated or hostile file
//! gives an error and never a panic or a huge allocation.

use super::value::{Value, ValueType};
use super::{Metadata, TensorInfo, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS};
use crate::quant::GgmlType;
use crate::{Error, Result};
use std::collections::HashSet;

/// Nested arrays deeper than this are refused (bounds recursion on hostile input).
const MAX_ARRAY_DEPTH: usize = 8;
/// More elements than this in one metadata array are refused: real vocabularies have
/// at most a few hundred thousand entries, and each element costs ~32 bytes in memory.
const MAX_ARRAY_LEN: u64 = 1 << 24;

/// The parsed header of a GGUF file: everything but the tensor data.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the tensor data section.
    pub data_offset: u64,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::gguf(format!(
                "truncated: {what} needs {n} bytes at offset {} but only {} remain",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items that take at least `min_size` bytes each: bounded by what remains.
    fn count(&mut self, what: &str, min_size: usize) -> Result<u64> {
        let n = self.u64(what)?;
        let fits = (self.remaining() / min_size.max(1)) as u64;
        if n > fits {
            return Err(Error::gguf(format!(
                "truncated or corrupt: {what} is {n}, but the {} bytes that remain can hold at most {fits}",
                self.remaining()
            )));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(Error::gguf(format!(
                "truncated: {what} has length {len} at offset {} but only {} bytes remain",
                self.pos,
                self.remaining()
            )));
        }
        let at = self.pos;
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::gguf(format!("{what} at offset {at} is not valid UTF-8")))
    }

    fn value(&mut self, ty: ValueType, what: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => {
                let b = self.array::<1>(what)?[0];
                match b {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    _ => return Err(Error::gguf(format!("{what}: bool byte is {b}, not 0 or 1"))),
                }
            }
            ValueType::String => Value::String(self.string(what)?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(Error::gguf(format!(
                        "{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let id = self.u32(what)?;
                let ety = ValueType::from_id(id).ok_or_else(|| {
                    Error::gguf(format!("{what}: unknown array element type {id}"))
                })?;
                let n = self.count(&format!("{what}: array length"), ety.min_size())?;
                if n > MAX_ARRAY_LEN {
                    return Err(Error::gguf(format!(
                        "{what}: array of {n} elements exceeds the limit of {MAX_ARRAY_LEN}"
                    )));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(ety, what, depth + 1)?);
                }
                Value::Array(ety, items)
            }
        })
    }
}

/// Parses and validates the header of a GGUF file held in `buf` (the whole file).
pub fn parse_header(buf: &[u8]) -> Result<Header> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.array::<4>("magic")?;
    if magic != MAGIC {
        return Err(Error::gguf(format!(
            "bad magic {:?}, expected \"GGUF\" (is this a GGUF file?)",
            String::from_utf8_lossy(&magic)
        )));
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        1 => return Err(Error::gguf("GGUF version 1 is not supported (32-bit counts); convert the file with a current llama.cpp")),
        v if v.swap_bytes() <= 3 => {
            return Err(Error::gguf("big-endian GGUF files are not supported"))
        }
        v => return Err(Error::gguf(format!("unsupported GGUF version {v} (supported: 2, 3)"))),
    }
    // A tensor info takes at least 8 (name) + 4 + 8 + 4 + 8 bytes; a key/value at least 8 + 4 + 1.
    let n_tensors = c.count("tensor count", 32)?;
    let n_kv = c.count("metadata key/value count", 13)?;

    let mut metadata = Metadata::default();
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key #{i}"))?;
        let id = c.u32(&format!("type of metadata key `{key}`"))?;
        let ty = ValueType::from_id(id)
            .ok_or_else(|| Error::gguf(format!("metadata key `{key}` has unknown type {id}")))?;
        let value = c.value(ty, &format!("metadata key `{key}`"), 0)?;
        if metadata.get(&key).is_some() {
            return Err(Error::gguf(format!("duplicate metadata key `{key}`")));
        }
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => *a as u64,
        Some(v) => {
            return Err(Error::gguf(format!(
                "general.alignment must be a u32 power of two, got {v}"
            )))
        }
    };

    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let name = c.string(&format!("name of tensor #{i}"))?;
        let n_dims = c.u32(&format!("tensor `{name}`: dimension count"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(Error::gguf(format!(
                "tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})"
            )));
        }
        let mut shape = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            shape.push(c.u64(&format!("tensor `{name}`: dimension {d}"))?);
        }
        let tid = c.u32(&format!("tensor `{name}`: type"))?;
        let ty = GgmlType::from_id(tid)
            .ok_or_else(|| Error::gguf(format!("tensor `{name}` has unknown type id {tid}")))?;
        let offset = c.u64(&format!("tensor `{name}`: offset"))?;
        let n_bytes = tensor_bytes(&name, &shape, ty)?;
        if offset % alignment != 0 {
            return Err(Error::gguf(format!(
                "tensor `{name}` offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(Error::gguf(format!("duplicate tensor name `{name}`")));
        }
        tensors.push(TensorInfo {
            name,
            shape,
            ty,
            offset,
            n_bytes,
        });
    }

    let data_offset = (c.pos as u64).next_multiple_of(alignment);
    if !tensors.is_empty() && data_offset > buf.len() as u64 {
        return Err(Error::gguf(format!(
            "truncated: the tensor data section starts at offset {data_offset}, past the end of the file ({} bytes)",
            buf.len()
        )));
    }
    let data_len = (buf.len() as u64).saturating_sub(data_offset);
    for t in &tensors {
        let end = t.offset.checked_add(t.n_bytes);
        if end.is_none_or(|e| e > data_len) {
            return Err(Error::gguf(format!(
                "tensor `{}` data ({} bytes at offset {}) runs past the end of the file (data section is {data_len} bytes; truncated file?)",
                t.name, t.n_bytes, t.offset
            )));
        }
    }
    // Tensors must not overlap: patching one must never change another.
    let mut spans: Vec<(u64, u64, &str)> = tensors
        .iter()
        .map(|t| (t.offset, t.offset + t.n_bytes, t.name.as_str()))
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(Error::gguf(format!(
                "tensors `{}` and `{}` overlap",
                w[0].2, w[1].2
            )));
        }
    }

    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// Bytes of a tensor of `shape` and `ty`, with every step checked.
pub(crate) fn tensor_bytes(name: &str, shape: &[u64], ty: GgmlType) -> Result<u64> {
    let bad = |msg: String| Error::gguf(format!("tensor `{name}` {msg}"));
    let ne0 = shape.first().copied().unwrap_or(1);
    let bs = ty.block_size() as u64;
    if ne0 % bs != 0 {
        return Err(bad(format!(
            "has a row of {ne0} elements, not a multiple of the {ty} block size {bs}"
        )));
    }
    let mut n: u64 = 1;
    for &d in shape {
        if d > i64::MAX as u64 {
            return Err(bad(format!("has an absurd dimension {d}")));
        }
        n = n
            .checked_mul(d)
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    }
    if n > i64::MAX as u64 {
        return Err(bad(format!("shape {shape:?} has too many elements")));
    }
    (n / bs)
        .checked_mul(ty.type_size() as u64)
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))
}

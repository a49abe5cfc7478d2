//! GGUF v3 writer: metadata, tensor infos, then each tensor's data at aligned offsets.

use super::value::Value;
use super::{reader::tensor_bytes, Metadata, TensorInfo, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS};
use crate::quant::GgmlType;
use crate::{Error, Result};
use std::borrow::Cow;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Builds a GGUF file. Tensor data is asked for one tensor at a time while writing, so a
/// converter never holds a whole model in memory.
#[derive(Default)]
pub struct GgufWriter {
    pub metadata: Metadata,
    tensors: Vec<TensorInfo>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&mut self, key: impl Into<String>, value: Value) {
        self.metadata.insert(key.into(), value);
    }

    fn alignment(&self) -> Result<u64> {
        match self.metadata.get("general.alignment") {
            None => Ok(DEFAULT_ALIGNMENT),
            Some(Value::U32(a)) if a.is_power_of_two() => Ok(*a as u64),
            Some(v) => Err(Error::InvalidArgument(format!(
                "general.alignment must be a u32 power of two, got {v}"
            ))),
        }
    }

    /// Declares a tensor; its data is supplied to [`write`](Self::write) in the same order.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        shape: &[u64],
        ty: GgmlType,
    ) -> Result<()> {
        let name = name.into();
        if shape.len() > MAX_DIMS {
            return Err(Error::tensor(
                &name,
                format!("{} dimensions (at most {MAX_DIMS})", shape.len()),
            ));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(Error::tensor(&name, "declared twice"));
        }
        let n_bytes = tensor_bytes(&name, shape, ty)?;
        let align = self.alignment()?;
        let offset = match self.tensors.last() {
            Some(t) => (t.offset + t.n_bytes).next_multiple_of(align),
            None => 0,
        };
        self.tensors.push(TensorInfo {
            name,
            shape: shape.to_vec(),
            ty,
            offset,
            n_bytes,
        });
        Ok(())
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Writes the file to `path` (through a temporary file renamed into place, so a failure
    /// leaves no half-written file). `data(i)` returns the bytes of tensor `i`, which must be
    /// exactly its declared size.
    pub fn write_file<'a>(
        &self,
        path: &Path,
        data: impl FnMut(usize, &TensorInfo) -> Result<Cow<'a, [u8]>>,
    ) -> Result<()> {
        let tmp = path.with_extension("gguf.partial");
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = BufWriter::new(file);
        let res = self
            .write(&mut w, data)
            .and_then(|_| w.flush().map_err(|e| Error::io(&tmp, e)));
        drop(w);
        match res {
            Ok(()) => std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Writes the whole file to `w`.
    pub fn write<'a>(
        &self,
        w: &mut impl Write,
        mut data: impl FnMut(usize, &TensorInfo) -> Result<Cow<'a, [u8]>>,
    ) -> Result<()> {
        let align = self.alignment()?;
        let mut out = Counting { w, n: 0 };
        out.put(&MAGIC)?;
        out.put(&3u32.to_le_bytes())?;
        out.put(&(self.tensors.len() as u64).to_le_bytes())?;
        out.put(&(self.metadata.len() as u64).to_le_bytes())?;
        for (k, v) in self.metadata.iter() {
            out.string(k)?;
            out.put(&(v.value_type() as u32).to_le_bytes())?;
            out.value(v)?;
        }
        for t in &self.tensors {
            out.string(&t.name)?;
            out.put(&(t.shape.len() as u32).to_le_bytes())?;
            for d in &t.shape {
                out.put(&d.to_le_bytes())?;
            }
            out.put(&t.ty.id().to_le_bytes())?;
            out.put(&t.offset.to_le_bytes())?;
        }
        out.pad(align)?;
        let data_start = out.n;
        for (i, t) in self.tensors.iter().enumerate() {
            out.pad_to(data_start + t.offset)?;
            let bytes = data(i, t)?;
            if bytes.len() as u64 != t.n_bytes {
                return Err(Error::tensor(
                    &t.name,
                    format!(
                        "{} bytes of data given, {} expected for {:?} {}",
                        bytes.len(),
                        t.n_bytes,
                        t.shape,
                        t.ty
                    ),
                ));
            }
            out.put(&bytes)?;
        }
        out.pad(align)
    }
}

struct Counting<'w, W: Write> {
    w: &'w mut W,
    n: u64,
}

impl<W: Write> Counting<'_, W> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.w
            .write_all(b)
            .map_err(|e| Error::io("<gguf output>", e))?;
        self.n += b.len() as u64;
        Ok(())
    }

    fn string(&mut self, s: &str) -> Result<()> {
        self.put(&(s.len() as u64).to_le_bytes())?;
        self.put(s.as_bytes())
    }

    fn pad(&mut self, align: u64) -> Result<()> {
        self.pad_to(self.n.next_multiple_of(align))
    }

    fn pad_to(&mut self, at: u64) -> Result<()> {
        let zeros = [0u8; 64];
        while self.n < at {
            let k = ((at - self.n) as usize).min(zeros.len());
            self.put(&zeros[..k])?;
        }
        Ok(())
    }

    fn value(&mut self, v: &Value) -> Result<()> {
        match v {
            Value::U8(x) => self.put(&[*x]),
            Value::I8(x) => self.put(&x.to_le_bytes()),
            Value::U16(x) => self.put(&x.to_le_bytes()),
            Value::I16(x) => self.put(&x.to_le_bytes()),
            Value::U32(x) => self.put(&x.to_le_bytes()),
            Value::I32(x) => self.put(&x.to_le_bytes()),
            Value::F32(x) => self.put(&x.to_le_bytes()),
            Value::Bool(x) => self.put(&[*x as u8]),
            Value::U64(x) => self.put(&x.to_le_bytes()),
            Value::I64(x) => self.put(&x.to_le_bytes()),
            Value::F64(x) => self.put(&x.to_le_bytes()),
            Value::String(s) => self.string(s),
            Value::Array(ty, items) => {
                if let Some(bad) = items.iter().find(|x| x.value_type() != *ty) {
                    return Err(Error::InvalidArgument(format!(
                        "array of {ty:?} holds a {:?} value",
                        bad.value_type()
                    )));
                }
                self.put(&(*ty as u32).to_le_bytes())?;
                self.put(&(items.len() as u64).to_le_bytes())?;
                items.iter().try_for_each(|x| self.value(x))
            }
        }
    }
}

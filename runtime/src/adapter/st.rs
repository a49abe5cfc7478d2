//! Reading and writing the safetensors files of PEFT adapters and sparse deltas.

use crate::{Error, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::Path;

/// A whole safetensors file in memory (adapters are small next to their base).
pub struct File {
    bytes: Vec<u8>,
}

impl File {
    pub fn read(path: &Path) -> Result<File> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let f = File { bytes };
        f.parse(path)?;
        Ok(f)
    }

    /// The parsed view (offsets and dtypes checked by the safetensors crate).
    pub fn parse(&self, path: &Path) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes)
            .map_err(|e| Error::adapter(path, format!("not a valid safetensors file: {e}")))
    }

    /// The `__metadata__` map (empty when absent).
    pub fn metadata(&self, path: &Path) -> Result<HashMap<String, String>> {
        let (_, md) = SafeTensors::read_metadata(&self.bytes)
            .map_err(|e| Error::adapter(path, format!("not a valid safetensors file: {e}")))?;
        Ok(md.metadata().clone().unwrap_or_default())
    }
}

/// The values of a float tensor (F32, F16 or BF16) as f32.
pub fn floats(path: &Path, name: &str, t: &TensorView<'_>) -> Result<Vec<f32>> {
    let d = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::adapter(
                path,
                format!("tensor `{name}` has dtype {other:?}; F32, F16 or BF16 expected"),
            ))
        }
    })
}

/// The values of an integer tensor (I32, I64, U32 or U64), each checked to fit in
/// `0..limit`.
pub fn indices(path: &Path, name: &str, t: &TensorView<'_>, limit: u64) -> Result<Vec<u64>> {
    let d = t.data();
    let v: Vec<i128> = match t.dtype() {
        Dtype::I32 => d
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i128)
            .collect(),
        Dtype::U32 => d
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i128)
            .collect(),
        Dtype::I64 => d
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as i128)
            .collect(),
        Dtype::U64 => d
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()) as i128)
            .collect(),
        other => {
            return Err(Error::adapter(
                path,
                format!("tensor `{name}` has dtype {other:?}; an integer type expected"),
            ))
        }
    };
    if let Some(bad) = v.iter().find(|&&x| x < 0 || x >= limit as i128) {
        return Err(Error::adapter(
            path,
            format!("tensor `{name}`: index {bad} is outside 0..{limit}"),
        ));
    }
    Ok(v.into_iter().map(|x| x as u64).collect())
}

/// An owned tensor to write.
pub struct Owned {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Owned {
    pub fn f32s(shape: Vec<usize>, v: &[f32]) -> Owned {
        Owned {
            dtype: Dtype::F32,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    pub fn f16s(shape: Vec<usize>, v: &[f32]) -> Owned {
        Owned {
            dtype: Dtype::F16,
            shape,
            data: v
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
        }
    }
    pub fn bf16s(shape: Vec<usize>, v: &[f32]) -> Owned {
        Owned {
            dtype: Dtype::BF16,
            shape,
            data: v
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        }
    }
    pub fn u32s(shape: Vec<usize>, v: &[u32]) -> Owned {
        Owned {
            dtype: Dtype::U32,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    pub fn i64s(shape: Vec<usize>, v: &[i64]) -> Owned {
        Owned {
            dtype: Dtype::I64,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// Writes `tensors` and `metadata` as one safetensors file.
pub fn write(
    path: &Path,
    tensors: Vec<(String, Owned)>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let err = |e: safetensors::SafeTensorError| {
        Error::InvalidArgument(format!("writing {}: {e}", path.display()))
    };
    let views = tensors
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data)?,
            ))
        })
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(err)?;
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(err)?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

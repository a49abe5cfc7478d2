//! Converting a GGUF model between block formats (`sparrow quantize`), with llama.cpp's
//! choice of per-tensor types for its mixed presets (`llama-quant.cpp`,
//! `llama_tensor_get_type`), so that `Q4_K_M` here means what it means there.

use crate::gguf::{GgufFile, GgufWriter, TensorInfo, Value};
use crate::quant::{self, GgmlType};
use crate::{Error, Result};
use rayon::prelude::*;
use std::borrow::Cow;
use std::path::Path;

/// A target of `sparrow quantize`: a llama.cpp file type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4_K_S,
    Q4_K_M,
    Q5_K_S,
    Q5_K_M,
    Q6_K,
}

impl FileType {
    pub const ALL: [FileType; 13] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q8_0,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q4_K_S,
        Self::Q4_K_M,
        Self::Q5_K_S,
        Self::Q5_K_M,
        Self::Q6_K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q8_0 => "Q8_0",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q4_K_S => "Q4_K_S",
            Self::Q4_K_M => "Q4_K_M",
            Self::Q5_K_S => "Q5_K_S",
            Self::Q5_K_M => "Q5_K_M",
            Self::Q6_K => "Q6_K",
        }
    }

    /// Parses a name; `Q4_K` and `Q5_K` mean the `_S` presets, as in llama.cpp.
    pub fn parse(s: &str) -> Result<FileType> {
        let u = s.to_ascii_uppercase();
        let u = match u.as_str() {
            "Q4_K" => "Q4_K_S",
            "Q5_K" => "Q5_K_S",
            x => x,
        };
        FileType::ALL
            .iter()
            .copied()
            .find(|t| t.name() == u)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown type `{s}` (known: {})",
                    FileType::ALL.map(|t| t.name()).join(", ")
                ))
            })
    }

    /// The type most weight matrices get.
    pub fn default_type(self) -> GgmlType {
        use GgmlType as G;
        match self {
            Self::F32 => G::F32,
            Self::F16 => G::F16,
            Self::BF16 => G::BF16,
            Self::Q8_0 => G::Q8_0,
            Self::Q4_0 => G::Q4_0,
            Self::Q4_1 => G::Q4_1,
            Self::Q5_0 => G::Q5_0,
            Self::Q5_1 => G::Q5_1,
            Self::Q4_K_S | Self::Q4_K_M => G::Q4_K,
            Self::Q5_K_S | Self::Q5_K_M => G::Q5_K,
            Self::Q6_K => G::Q6_K,
        }
    }

    /// `general.file_type` (`enum llama_ftype`).
    pub fn llama_ftype(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 7,
            Self::Q5_0 => 8,
            Self::Q5_1 => 9,
            Self::Q4_K_S => 14,
            Self::Q4_K_M => 15,
            Self::Q5_K_S => 16,
            Self::Q5_K_M => 17,
            Self::Q6_K => 18,
            Self::BF16 => 32,
        }
    }

    fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third one
/// between, get more bits in the `_M` presets.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize) % 3 == 2
}

/// The layer number of a `blk.N.*` tensor. llama.cpp visits tensors in layer order, so its
/// per-layer counters equal the layer number; files list tensors in other orders
/// (`blk.1`, `blk.10`, ...), so the number is read from the name.
fn layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Picks the type of each tensor as llama.cpp's `llama_tensor_get_type` does for the file
/// types above. Returns `None` for tensors that stay as they are (not a weight matrix).
pub struct TypePlan {
    ftype: FileType,
    pure: bool,
    has_output: bool,
    n_attn_v: usize,
    n_ffn_down: usize,
    i_attn_v: usize,
    i_ffn_down: usize,
}

impl TypePlan {
    pub fn new(ftype: FileType, pure: bool, tensors: &[TensorInfo]) -> Self {
        TypePlan {
            ftype,
            pure,
            has_output: tensors.iter().any(|t| t.name == "output.weight"),
            n_attn_v: tensors
                .iter()
                .filter(|t| t.name.contains("attn_v.weight"))
                .count(),
            n_ffn_down: tensors
                .iter()
                .filter(|t| t.name.contains("ffn_down"))
                .count(),
            i_attn_v: 0,
            i_ffn_down: 0,
        }
    }

    /// The type for `t`; call once per tensor, in file order.
    pub fn choose(&mut self, t: &TensorInfo) -> GgmlType {
        // Only matrices named *weight are quantized (norms, biases stay F32).
        if t.shape.iter().filter(|&&d| d > 1).count() < 2 || !t.name.ends_with("weight") {
            return t.ty;
        }
        let ft = self.ftype;
        let mut ty = ft.default_type();
        if !self.pure && !ft.is_float() {
            let is_output =
                t.name == "output.weight" || (!self.has_output && t.name == "token_embd.weight");
            if is_output {
                if ty != GgmlType::Q8_0 {
                    ty = GgmlType::Q6_K;
                }
            } else if t.name.contains("attn_v.weight") {
                let i = layer_index(&t.name).unwrap_or(self.i_attn_v);
                let more = matches!(ft, FileType::Q4_K_M | FileType::Q5_K_M)
                    && use_more_bits(i, self.n_attn_v);
                if more {
                    ty = GgmlType::Q6_K;
                } else if ft == FileType::Q4_K_S && i < 4 {
                    ty = GgmlType::Q5_K;
                }
                self.i_attn_v += 1;
            } else if t.name.contains("ffn_down") {
                let i = layer_index(&t.name).unwrap_or(self.i_ffn_down);
                let more = matches!(ft, FileType::Q4_K_M | FileType::Q5_K_M)
                    && use_more_bits(i, self.n_ffn_down);
                if more {
                    ty = GgmlType::Q6_K;
                } else if ft == FileType::Q4_K_S && i < self.n_ffn_down / 8 {
                    ty = GgmlType::Q5_K;
                }
                self.i_ffn_down += 1;
            }
        }
        // Rows that are not whole 256-element super-blocks fall back as llama.cpp does.
        let (bs, _) = ty.block_layout();
        if !t.row_len().is_multiple_of(bs as u64) {
            ty = match ty {
                GgmlType::Q4_K => GgmlType::Q5_0,
                GgmlType::Q5_K => GgmlType::Q5_1,
                GgmlType::Q6_K => GgmlType::Q8_0,
                other => other,
            };
            if !t.row_len().is_multiple_of(ty.block_size() as u64) {
                ty = GgmlType::F16;
            }
        }
        ty
    }
}

/// Converts `src` to `ftype`, writing `dst`. `progress(i, n, name)` is called per tensor.
pub fn quantize_file(
    src: &GgufFile,
    dst: &Path,
    ftype: FileType,
    pure: bool,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<()> {
    let mut w = GgufWriter::new();
    for (k, v) in src.metadata().iter() {
        w.set(k, v.clone());
    }
    w.set("general.file_type", Value::U32(ftype.llama_ftype()));
    w.set("general.quantization_version", Value::U32(2));
    let mut plan = TypePlan::new(ftype, pure, src.tensors());
    let mut types = Vec::with_capacity(src.tensors().len());
    for t in src.tensors() {
        let ty = plan.choose(t);
        if ty != t.ty && quant::ops(t.ty).is_none() {
            return Err(Error::tensor(
                &t.name,
                format!("cannot convert from {}", t.ty),
            ));
        }
        w.add_tensor(&t.name, &t.shape, ty)?;
        types.push(ty);
    }
    let n = src.tensors().len();
    w.write_file(dst, |i, info| {
        let t = &src.tensors()[i];
        progress(i, n, &t.name);
        let data = src.tensor_data(t)?;
        if info.ty == t.ty {
            return Ok(Cow::Owned(data.to_vec()));
        }
        convert_tensor(t, data, info.ty).map(Cow::Owned)
    })
}

/// Dequantizes `data` (tensor `t`) and requantizes it to `to`, row by row in parallel.
pub fn convert_tensor(t: &TensorInfo, data: &[u8], to: GgmlType) -> Result<Vec<u8>> {
    let cols = t.row_len() as usize;
    let rows = t.n_rows() as usize;
    let src_row = t.ty.row_bytes(cols as u64).unwrap_or(0) as usize;
    let dst_row = to.row_bytes(cols as u64).ok_or_else(|| {
        Error::tensor(&t.name, format!("rows of {cols} are not whole {to} blocks"))
    })? as usize;
    let mut out = vec![0u8; rows * dst_row];
    out.par_chunks_mut(dst_row.max(1))
        .zip(data.par_chunks(src_row.max(1)))
        .try_for_each_init(
            || vec![0f32; cols],
            |buf, (o, s)| -> Result<()> {
                quant::dequantize(t.ty, s, buf)?;
                quant::quantize(to, buf, o)
            },
        )
        .map_err(|e| Error::tensor(&t.name, e.to_string()))?;
    Ok(out)
}

//! Block formats: one module per format, each with its `#[repr(C)]` block, a size assertion
//! and the reference dequantize / quantize / dot routines that every SIMD or GPU kernel is
//! checked against. Bit layouts follow ggml (`ggml-common.h`, `ggml-quants.c`).
//!
//! All blocks have alignment 1 (scales are stored as `[u8; 2]` little-endian halves), so a
//! view into a memory-mapped file can be reinterpreted as blocks whatever its offset.

pub mod bf16;
pub mod edit;
pub mod f16;
pub mod f32;
pub mod kquant;
pub mod q4_0;
pub mod q4_1;
pub mod q4_k;
pub mod q5_0;
pub mod q5_1;
pub mod q5_k;
pub mod q6_k;
pub mod q8_0;
pub mod q8_1;
pub mod q8_k;
pub(crate) mod util;

use std::fmt;

/// Tensor element types as numbered by ggml (`enum ggml_type`). Every type ggml defines is
/// listed so that files can be inspected; [`ops`] tells which ones sparrow can compute with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(non_camel_case_types)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    IQ2_XXS = 16,
    IQ2_XS = 17,
    IQ3_XXS = 18,
    IQ1_S = 19,
    IQ4_NL = 20,
    IQ3_S = 21,
    IQ2_S = 22,
    IQ4_XS = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    IQ1_M = 29,
    BF16 = 30,
    TQ1_0 = 34,
    TQ2_0 = 35,
    MXFP4 = 39,
}

impl GgmlType {
    /// All known types, in id order.
    pub const ALL: [GgmlType; 32] = [
        Self::F32,
        Self::F16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q8_1,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
        Self::Q8_K,
        Self::IQ2_XXS,
        Self::IQ2_XS,
        Self::IQ3_XXS,
        Self::IQ1_S,
        Self::IQ4_NL,
        Self::IQ3_S,
        Self::IQ2_S,
        Self::IQ4_XS,
        Self::I8,
        Self::I16,
        Self::I32,
        Self::I64,
        Self::F64,
        Self::IQ1_M,
        Self::BF16,
        Self::TQ1_0,
        Self::TQ2_0,
        Self::MXFP4,
    ];

    /// The type with ggml id `id`, if it is one ggml defines.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| *t as u32 == id)
    }

    /// Parses a name as `sparrow quantize --type` and ggml spell it (`q4_0`, `Q4_K`, `f16`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    pub fn id(self) -> u32 {
        self as u32
    }

    /// (elements per block, bytes per block), as in ggml's `type_traits`.
    pub fn block_layout(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            IQ4_NL => (32, 18),
            MXFP4 => (32, 17),
            Q2_K => (256, 84),
            Q3_K => (256, 110),
            Q4_K => (256, 144),
            Q5_K => (256, 176),
            Q6_K => (256, 210),
            Q8_K => (256, 292),
            IQ2_XXS => (256, 66),
            IQ2_XS => (256, 74),
            IQ3_XXS => (256, 98),
            IQ1_S => (256, 50),
            IQ3_S => (256, 110),
            IQ2_S => (256, 82),
            IQ4_XS => (256, 136),
            IQ1_M => (256, 56),
            TQ1_0 => (256, 54),
            TQ2_0 => (256, 66),
        }
    }

    pub fn block_size(self) -> usize {
        self.block_layout().0
    }

    pub fn type_size(self) -> usize {
        self.block_layout().1
    }

    /// Bytes taken by a row of `n` elements, or `None` when `n` is not a whole number of
    /// blocks or the size overflows.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        let (bs, ts) = self.block_layout();
        if !n.is_multiple_of(bs as u64) {
            return None;
        }
        (n / bs as u64).checked_mul(ts as u64)
    }

    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The reference routines of one block format, over raw bytes.
///
/// Lengths: `dequantize(src, dst)` and `quantize(src, dst)` take whole blocks, `src` and `dst`
/// describing the same number of elements. `vec_dot(w, a)` takes one row of weights in this
/// format and the same number of elements of activations already quantized to
/// `vec_dot_type`, as ggml's `vec_dot` does. Callers check lengths; the routines never index
/// out of bounds (they iterate over whole blocks and stop at the shorter input).
pub struct FormatOps {
    pub ty: GgmlType,
    pub dequantize: fn(&[u8], &mut [f32]),
    pub quantize: fn(&[f32], &mut [u8]),
    pub vec_dot_type: GgmlType,
    pub vec_dot: fn(&[u8], &[u8]) -> f32,
}

/// The reference routines for `ty`, or `None` when sparrow cannot compute with that type.
pub fn ops(ty: GgmlType) -> Option<&'static FormatOps> {
    use GgmlType::*;
    Some(match ty {
        F32 => &f32::OPS,
        F16 => &f16::OPS,
        BF16 => &bf16::OPS,
        Q8_0 => &q8_0::OPS,
        Q8_1 => &q8_1::OPS,
        Q4_0 => &q4_0::OPS,
        Q4_1 => &q4_1::OPS,
        Q5_0 => &q5_0::OPS,
        Q5_1 => &q5_1::OPS,
        Q4_K => &q4_k::OPS,
        Q5_K => &q5_k::OPS,
        Q6_K => &q6_k::OPS,
        Q8_K => &q8_k::OPS,
        _ => return None,
    })
}

/// The types that `sparrow quantize` can write and models can be run with.
pub const WEIGHT_TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Dequantizes `src` (whole blocks of `ty`) into `dst`.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> crate::Result<()> {
    let o = ops(ty).ok_or_else(|| crate::Error::Unsupported(format!("dequantize {ty}")))?;
    check_lengths(ty, src.len(), dst.len())?;
    (o.dequantize)(src, dst);
    Ok(())
}

/// Quantizes `src` into `dst` (whole blocks of `ty`) with ggml's reference quantizer.
pub fn quantize(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> crate::Result<()> {
    let o = ops(ty).ok_or_else(|| crate::Error::Unsupported(format!("quantize {ty}")))?;
    check_lengths(ty, dst.len(), src.len())?;
    (o.quantize)(src, dst);
    Ok(())
}

fn check_lengths(ty: GgmlType, bytes: usize, elems: usize) -> crate::Result<()> {
    let (bs, ts) = ty.block_layout();
    if !elems.is_multiple_of(bs) || bytes != elems / bs * ts {
        return Err(crate::Error::InvalidArgument(format!(
            "{elems} elements and {bytes} bytes are not whole {ty} blocks of {bs} elements / {ts} bytes"
        )));
    }
    Ok(())
}

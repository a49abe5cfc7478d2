//! Q4_K: placeholder so the crate compiles; see the quant helper's work.
use super::{FormatOps, GgmlType};
pub static OPS: FormatOps = FormatOps {
    ty: GgmlType::Q4_K,
    dequantize: |_, _| unimplemented!(),
    quantize: |_, _| unimplemented!(),
    vec_dot_type: GgmlType::Q4_K,
    vec_dot: |_, _| unimplemented!(),
};

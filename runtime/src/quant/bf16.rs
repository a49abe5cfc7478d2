//! BF16: placeholder so the crate compiles; see the quant helper's work.
use super::{FormatOps, GgmlType};
pub static OPS: FormatOps = FormatOps {
    ty: GgmlType::BF16,
    dequantize: |_, _| unimplemented!(),
    quantize: |_, _| unimplemented!(),
    vec_dot_type: GgmlType::BF16,
    vec_dot: |_, _| unimplemented!(),
};

//! llama.cpp GGUF LoRA files (`convert_lora_to_gguf.py`): `general.type = adapter`,
//! `adapter.type = lora`, `adapter.lora.alpha`, and per base tensor W the pair `W.lora_a`
//! (ggml shape [in, r], i.e. A row-major [r, in]) and `W.lora_b` (ggml [r, out]: B [out, r]).
//!
//! The scale is llama.cpp's: alpha / r with r the rank of that tensor's A, or 1 when alpha
//! is 0 or absent. Names are GGUF names and rows are already in the GGUF order (the converter
//! permutes B's rows for llama's q/k as it permutes the base).

use super::{check_low_rank, Adapter, Delta, Format, LowRank, NameScheme, Target};
use crate::gguf::GgufFile;
use crate::quant::{self, GgmlType};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

pub fn load(path: &Path) -> Result<Adapter> {
    let f = GgufFile::open(path)?;
    let md = f.metadata();
    let err = |m: String| Error::adapter(path, m);
    match md.get("general.type").and_then(|v| v.as_str()) {
        Some("adapter") => {}
        Some(t) => {
            return Err(err(format!(
                "general.type is `{t}`: a model, not an adapter (did you swap -m and --adapter?)"
            )))
        }
        None => return Err(err("general.type is missing: not a GGUF adapter".into())),
    }
    match md.get("adapter.type").and_then(|v| v.as_str()) {
        Some("lora") => {}
        t => {
            return Err(err(format!(
                "adapter.type is {t:?}; only `lora` is supported"
            )))
        }
    }
    let alpha = match md.get("adapter.lora.alpha") {
        None => 0.0,
        Some(v) => v
            .as_f64()
            .filter(|a| a.is_finite())
            .ok_or_else(|| err("adapter.lora.alpha is not a number".into()))?,
    };
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .map(str::to_string);

    let mut pairs: BTreeMap<&str, [Option<&crate::gguf::TensorInfo>; 2]> = BTreeMap::new();
    for t in f.tensors() {
        let (base, slot) = if let Some(b) = t.name.strip_suffix(".lora_a") {
            (b, 0)
        } else if let Some(b) = t.name.strip_suffix(".lora_b") {
            (b, 1)
        } else {
            return Err(err(format!(
                "tensor `{}` is not a .lora_a / .lora_b tensor",
                t.name
            )));
        };
        pairs.entry(base).or_default()[slot] = Some(t);
    }
    if pairs.is_empty() {
        return Err(err("the adapter has no tensors".into()));
    }
    let mut targets = Vec::with_capacity(pairs.len());
    for (name, [a, b]) in pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(err(format!("`{name}` needs both .lora_a and .lora_b")));
        };
        let (cols, rank, rank_b, rows) = match (&a.shape[..], &b.shape[..]) {
            ([c, r], [rb, o]) => (*c as usize, *r as usize, *rb as usize, *o as usize),
            _ => {
                return Err(err(format!(
                    "`{name}`: lora_a is {:?} and lora_b {:?}; two dimensions each expected",
                    a.shape, b.shape
                )))
            }
        };
        if rank != rank_b || rank == 0 {
            return Err(err(format!(
                "`{name}`: lora_a has rank {rank}, lora_b {rank_b}"
            )));
        }
        let scale = if alpha == 0.0 {
            1.0
        } else {
            (alpha / rank as f64) as f32
        };
        let l = LowRank {
            rank,
            a: floats(&f, a)?,
            b: floats(&f, b)?,
            scale,
        };
        check_low_rank(path, name, rows, cols, &l)?;
        targets.push(Target {
            name: name.to_string(),
            rows,
            cols,
            delta: Delta::LowRank(l),
        });
    }
    let mut info = vec![("adapter.lora.alpha".to_string(), alpha.to_string())];
    if let Some(a) = &arch {
        info.push(("general.architecture".into(), a.clone()));
    }
    Ok(Adapter {
        uid: super::new_uid(),
        source: path.to_path_buf(),
        format: Format::GgufLora,
        names: NameScheme::Gguf,
        targets,
        default_scale: 1.0,
        info,
        base_hash: None,
        base_arch: arch,
    })
}

/// A tensor of the adapter file as f32 (F32, F16, BF16 or Q8_0, as the converter writes).
fn floats(f: &GgufFile, t: &crate::gguf::TensorInfo) -> Result<Vec<f32>> {
    if !matches!(
        t.ty,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0
    ) {
        return Err(Error::adapter(
            f.path(),
            format!(
                "tensor `{}` has type {}; F32, F16, BF16 or Q8_0 expected",
                t.name, t.ty
            ),
        ));
    }
    let mut out = vec![0f32; t.n_elements() as usize];
    quant::dequantize(t.ty, f.tensor_data(t)?, &mut out)
        .map_err(|e| Error::adapter(f.path(), format!("tensor `{}`: {e}", t.name)))?;
    Ok(out)
}

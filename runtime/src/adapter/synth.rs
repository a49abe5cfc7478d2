//! Random adapters for benchmarks (`sparrow adapter synth`), and the GGUF LoRA writer.
//!
//! Targets are every linear matrix of every layer (attn_q, attn_k, attn_v, attn_output,
//! ffn_gate, ffn_up, ffn_down). Values are scaled to each base tensor's RMS so that the
//! adapters change the model about as much as a trained one might:
//! - sparse (SHiRA-style): exactly round(density * rows * cols) positions per tensor, drawn
//!   uniformly (Knuth's selection sampling), values ~ N(0, (0.1 rms)^2);
//! - LoRA of rank r: A ~ N(0, 1/cols), B ~ N(0, sigma^2) with alpha = 2 r (scale 2), sigma
//!   chosen so that the entries of s B A have a standard deviation of 0.02 rms.

use super::lowrank::count_for;
use super::{Adapter, Delta, Format, LowRank, NameScheme, SparseDelta, Target};
use crate::gguf::{GgufFile, GgufWriter, Value};
use crate::quant::{self, GgmlType};
use crate::sample::Rng;
use crate::{Error, Result};
use std::borrow::Cow;
use std::path::Path;

const LINEAR: [&str; 7] = [
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
];

/// What to make.
#[derive(Clone, Copy, Debug)]
pub enum Spec {
    Sparse { density: f64 },
    Lora { rank: usize },
}

/// Draws from the sampler's SplitMix64, so that a seed gives the same adapter on every
/// machine.
struct Draw(Rng);

impl Draw {
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// The linear tensors of `base`, in file order.
fn linear_tensors(base: &GgufFile) -> Vec<&crate::gguf::TensorInfo> {
    base.tensors()
        .iter()
        .filter(|t| {
            t.name.starts_with("blk.") && LINEAR.iter().any(|s| t.name.ends_with(&format!(".{s}")))
        })
        .collect()
}

/// Root mean square of a base matrix's weights (a sparse one's pruned zeros included).
fn rms(base: &GgufFile, t: &crate::gguf::TensorInfo) -> Result<f32> {
    let v = match crate::sparse::store::read(base.metadata(), t)? {
        Some(m) => {
            use crate::sparse::edit;
            let bytes = base.tensor_data(t)?;
            let mut v = vec![0f32; m.rows * m.cols];
            let mut keep = vec![false; m.cols];
            let ranges =
                edit::row_ranges(&m, bytes).map_err(|e| Error::tensor(&t.name, e.to_string()))?;
            for (row, r) in v.chunks_exact_mut(m.cols).zip(ranges) {
                edit::decode_row(&m, &bytes[r], row, &mut keep)
                    .map_err(|e| Error::tensor(&t.name, e.to_string()))?;
            }
            v
        }
        None => {
            let mut v = vec![0f32; t.n_elements() as usize];
            quant::dequantize(t.ty, base.tensor_data(t)?, &mut v)
                .map_err(|e| Error::tensor(&t.name, e.to_string()))?;
            v
        }
    };
    let s: f64 = v.iter().map(|&x| (x as f64) * (x as f64)).sum();
    Ok((s / v.len().max(1) as f64).sqrt() as f32)
}

/// A random adapter for `base` (GGUF names, bound to its shapes).
pub fn synth(base: &GgufFile, spec: Spec, seed: u64, source: &Path) -> Result<Adapter> {
    let mut rng = Draw(Rng(seed));
    let tensors = linear_tensors(base);
    if tensors.is_empty() {
        return Err(Error::InvalidArgument(
            "the model has no blk.N linear tensors to adapt".into(),
        ));
    }
    let mut targets = Vec::with_capacity(tensors.len());
    for t in tensors {
        let (rows, cols) = super::base_shape(base, t)?;
        let rms = rms(base, t)?;
        let delta = match spec {
            Spec::Sparse { density } => {
                if !(density > 0.0 && density <= 1.0) {
                    return Err(Error::InvalidArgument(format!(
                        "density {density} must be in (0, 1]"
                    )));
                }
                let n = rows * cols;
                let mut need = count_for(density, n);
                let mut s = SparseDelta::default();
                for i in 0..n {
                    // Selection sampling: take i with probability need / (n - i).
                    if (n - i) as f64 * rng.uniform() < need as f64 {
                        s.idx.push(i as u32);
                        s.val.push(0.1 * rms * rng.normal());
                        need -= 1;
                    }
                }
                Delta::Sparse(s)
            }
            Spec::Lora { rank } => {
                if rank == 0 || rank > rows.min(cols) {
                    return Err(Error::InvalidArgument(format!(
                        "rank {rank} must be in 1..={} for `{}`",
                        rows.min(cols),
                        t.name
                    )));
                }
                let scale = 2.0f32;
                let sa = 1.0 / (cols as f32).sqrt();
                // std(s B A) = s * sigma_b * sqrt(rank) * sa
                let sb = 0.02 * rms / (scale * (rank as f32).sqrt() * sa);
                let a = (0..rank * cols).map(|_| sa * rng.normal()).collect();
                let b = (0..rows * rank).map(|_| sb * rng.normal()).collect();
                Delta::LowRank(LowRank { rank, a, b, scale })
            }
        };
        targets.push(Target {
            name: t.name.clone(),
            rows,
            cols,
            delta,
        });
    }
    let (format, what) = match spec {
        Spec::Sparse { density } => (Format::SparseDelta, format!("sparse density {density}")),
        Spec::Lora { rank } => (Format::GgufLora, format!("lora rank {rank}")),
    };
    Ok(Adapter {
        uid: super::new_uid(),
        source: source.to_path_buf(),
        format,
        names: NameScheme::Gguf,
        targets,
        default_scale: 1.0,
        info: vec![("synth".into(), format!("{what}, seed {seed}"))],
        base_hash: Some(super::base_shape_hash(base)),
        base_arch: None,
    })
}

/// Writes the low-rank targets of `a` (GGUF names) as a llama.cpp GGUF LoRA file for a base
/// of architecture `arch`. The file has one alpha; it is taken from the first target
/// (alpha = scale * rank) and any other target's scale is folded into its B.
pub fn write_gguf_lora(path: &Path, a: &Adapter, arch: &str) -> Result<()> {
    if a.names != NameScheme::Gguf {
        return Err(Error::InvalidArgument(
            "bind the adapter to its base before writing a GGUF LoRA".into(),
        ));
    }
    let lows: Vec<(&Target, &LowRank)> = a
        .targets
        .iter()
        .map(|t| match &t.delta {
            Delta::LowRank(l) => Ok((t, l)),
            _ => Err(Error::InvalidArgument(format!(
                "`{}` is not a low-rank delta; a GGUF LoRA holds only LoRA pairs",
                t.name
            ))),
        })
        .collect::<Result<_>>()?;
    let alpha = lows.first().map_or(0.0, |(_, l)| l.scale * l.rank as f32);
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String(arch.to_string()));
    w.set("general.type", Value::String("adapter".into()));
    w.set("adapter.type", Value::String("lora".into()));
    w.set("adapter.lora.alpha", Value::F32(alpha));
    let mut data: Vec<Vec<u8>> = Vec::with_capacity(2 * lows.len());
    for (t, l) in &lows {
        w.add_tensor(
            format!("{}.lora_a", t.name),
            &[t.cols as u64, l.rank as u64],
            GgmlType::F32,
        )?;
        w.add_tensor(
            format!("{}.lora_b", t.name),
            &[l.rank as u64, t.rows as u64],
            GgmlType::F32,
        )?;
        // llama.cpp applies alpha / rank; fold the rest of this target's scale into B.
        let fold = if alpha == 0.0 {
            l.scale
        } else {
            l.scale * l.rank as f32 / alpha
        };
        data.push(l.a.iter().flat_map(|x| x.to_le_bytes()).collect());
        data.push(
            l.b.iter()
                .flat_map(|&x| if fold == 1.0 { x } else { x * fold }.to_le_bytes())
                .collect(),
        );
    }
    w.write_file(path, |i, _| Ok(Cow::Borrowed(&data[i][..])))
}

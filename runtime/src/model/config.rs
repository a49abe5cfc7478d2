//! Hyper-parameters of a llama-family model, read from GGUF metadata.

use crate::gguf::Metadata;
use crate::{Error, Result};

/// How rotary embeddings pair dimensions (ggml's `LLAMA_ROPE_TYPE_NORM` / `_NEOX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeKind {
    /// Adjacent pairs (x[2i], x[2i+1]): llama, as GGUF converters permute q/k rows for it.
    Normal,
    /// Halves (x[i], x[i + d/2]): qwen2 and other HF-layout models.
    Neox,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub arch: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub rope_kind: RopeKind,
    pub rope_dim: usize,
    pub rope_base: f32,
    pub rope_scale: f32,
    pub rms_eps: f32,
}

/// Architectures whose forward pass is the llama block (with optional q/k/v biases).
const ARCHES: [(&str, RopeKind); 2] = [("llama", RopeKind::Normal), ("qwen2", RopeKind::Neox)];

impl Config {
    pub fn from_metadata(md: &Metadata) -> Result<Config> {
        let arch = md.str("general.architecture")?.to_string();
        let rope_kind = ARCHES
            .iter()
            .find(|(a, _)| *a == arch)
            .map(|(_, k)| *k)
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "architecture `{arch}` (supported: {})",
                    ARCHES.map(|a| a.0).join(", ")
                ))
            })?;
        let key = |k: &str| format!("{arch}.{k}");
        let usize_of = |k: &str| -> Result<usize> {
            let v = md.u64(&key(k))?;
            if v == 0 || v > (1 << 24) {
                return Err(Error::metadata(key(k), format!("implausible value {v}")));
            }
            Ok(v as usize)
        };
        let n_layer = usize_of("block_count")?;
        let n_embd = usize_of("embedding_length")?;
        let n_head = usize_of("attention.head_count")?;
        let n_head_kv = match md.get(&key("attention.head_count_kv")) {
            Some(_) => usize_of("attention.head_count_kv")?,
            None => n_head,
        };
        let n_ff = usize_of("feed_forward_length")?;
        let n_ctx_train = usize_of("context_length")?;
        if n_embd % n_head != 0 || n_head % n_head_kv != 0 {
            return Err(Error::metadata(
                key("attention.head_count"),
                format!(
                    "{n_head} heads / {n_head_kv} KV heads do not divide embedding length {n_embd}"
                ),
            ));
        }
        let head_dim = match md.get(&key("attention.key_length")) {
            Some(_) => usize_of("attention.key_length")?,
            None => n_embd / n_head,
        };
        let rope_dim = match md.get(&key("rope.dimension_count")) {
            Some(_) => usize_of("rope.dimension_count")?,
            None => head_dim,
        };
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(Error::metadata(
                key("rope.dimension_count"),
                format!("{rope_dim} for head size {head_dim}"),
            ));
        }
        let rope_base = md
            .opt(&key("rope.freq_base"), |v| v.as_f64())?
            .unwrap_or(10000.0) as f32;
        let rope_scale =
            match md.opt(&key("rope.scaling.type"), |v| v.as_str().map(str::to_owned))? {
                None => 1.0,
                Some(t) if t == "none" => 1.0,
                Some(t) if t == "linear" => {
                    let f = md
                        .opt(&key("rope.scaling.factor"), |v| v.as_f64())?
                        .unwrap_or(1.0) as f32;
                    if f > 0.0 {
                        1.0 / f
                    } else {
                        1.0
                    }
                }
                Some(t) => return Err(Error::Unsupported(format!("rope scaling `{t}`"))),
            };
        let rms_eps = md.f64(&key("attention.layer_norm_rms_epsilon"))? as f32;
        let n_vocab = match md.get(&key("vocab_size")) {
            Some(_) => usize_of("vocab_size")?,
            None => md.array("tokenizer.ggml.tokens")?.len(),
        };
        Ok(Config {
            arch,
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            n_vocab,
            n_ctx_train,
            rope_kind,
            rope_dim,
            rope_base,
            rope_scale,
            rms_eps,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}

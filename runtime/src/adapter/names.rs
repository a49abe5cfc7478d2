//! Hugging Face module names <-> GGUF tensor names, and the row permutation that GGUF
//! converters apply to llama's q and k projections.
//!
//! llama.cpp's `convert_hf_to_gguf.py` stores `q_proj` and `k_proj` of the `llama`
//! architecture with the rows of each head reordered from HF's "halves" rotary layout to
//! ggml's "adjacent pairs" layout (`LlamaModel.permute`): inside a head of `hd` rows, HF row
//! `j * hd/2 + i` (j in 0..2, i in 0..hd/2) becomes GGUF row `2 i + j`. A delta written for
//! the HF weights must be moved the same way before it is added to the GGUF tensor.

/// (HF suffix inside a decoder layer, GGUF suffix inside `blk.N.`).
const LAYER_MODULES: [(&str, &str); 7] = [
    ("self_attn.q_proj", "attn_q.weight"),
    ("self_attn.k_proj", "attn_k.weight"),
    ("self_attn.v_proj", "attn_v.weight"),
    ("self_attn.o_proj", "attn_output.weight"),
    ("mlp.gate_proj", "ffn_gate.weight"),
    ("mlp.up_proj", "ffn_up.weight"),
    ("mlp.down_proj", "ffn_down.weight"),
];

/// Whole-model modules.
const MODEL_MODULES: [(&str, &str); 2] = [
    ("model.embed_tokens", "token_embd.weight"),
    ("lm_head", "output.weight"),
];

/// The GGUF tensor of an HF module name such as `model.layers.3.self_attn.q_proj`
/// (a leading `base_model.model.` as PEFT writes it is accepted).
pub fn hf_to_gguf(module: &str) -> Option<String> {
    let m = module.strip_prefix("base_model.model.").unwrap_or(module);
    if let Some((_, g)) = MODEL_MODULES.iter().find(|(h, _)| *h == m) {
        return Some(g.to_string());
    }
    let rest = m.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    LAYER_MODULES
        .iter()
        .find(|(h, _)| *h == suffix)
        .map(|(_, g)| format!("blk.{layer}.{g}"))
}

/// The HF module name of a GGUF tensor name (inverse of [`hf_to_gguf`]).
pub fn gguf_to_hf(name: &str) -> Option<String> {
    if let Some((h, _)) = MODEL_MODULES.iter().find(|(_, g)| *g == name) {
        return Some(h.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    LAYER_MODULES
        .iter()
        .find(|(_, g)| *g == suffix)
        .map(|(h, _)| format!("model.layers.{layer}.{h}"))
}

/// How the rows of a base tensor were reordered by the GGUF converter, relative to HF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowOrder {
    /// Same order as HF.
    Same,
    /// Rotary row permutation inside each of `heads` heads.
    Rope { heads: usize },
}

/// The row order of GGUF tensor `name` in a model of architecture `arch` with `n_head`
/// query heads and `n_head_kv` key/value heads.
pub fn row_order(arch: &str, n_head: usize, n_head_kv: usize, name: &str) -> RowOrder {
    if arch != "llama" {
        return RowOrder::Same;
    }
    if name.ends_with(".attn_q.weight") {
        RowOrder::Rope { heads: n_head }
    } else if name.ends_with(".attn_k.weight") {
        RowOrder::Rope { heads: n_head_kv }
    } else {
        RowOrder::Same
    }
}

impl RowOrder {
    /// The GGUF row that holds HF row `row` of a tensor with `rows` rows. `rows` must be a
    /// multiple of 2 * heads (checked by [`RowOrder::check`]).
    #[inline]
    pub fn to_gguf(self, row: usize, rows: usize) -> usize {
        match self {
            RowOrder::Same => row,
            RowOrder::Rope { heads } => {
                let hd = rows / heads;
                let (h, r) = (row / hd, row % hd);
                let (j, i) = (r / (hd / 2), r % (hd / 2));
                h * hd + 2 * i + j
            }
        }
    }

    /// The HF row held by GGUF row `row` (inverse of [`RowOrder::to_gguf`]).
    #[inline]
    pub fn to_hf(self, row: usize, rows: usize) -> usize {
        match self {
            RowOrder::Same => row,
            RowOrder::Rope { heads } => {
                let hd = rows / heads;
                let (h, r) = (row / hd, row % hd);
                let (i, j) = (r / 2, r % 2);
                h * hd + j * (hd / 2) + i
            }
        }
    }

    /// Whether a tensor of `rows` rows can be permuted this way.
    pub fn check(self, rows: usize) -> Result<(), String> {
        match self {
            RowOrder::Same => Ok(()),
            RowOrder::Rope { heads } if heads > 0 && rows.is_multiple_of(2 * heads) => Ok(()),
            RowOrder::Rope { heads } => Err(format!(
                "{rows} rows cannot be split into {heads} rotary heads of even size"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (h, g) in [
            ("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"),
            ("model.layers.29.mlp.down_proj", "blk.29.ffn_down.weight"),
            ("lm_head", "output.weight"),
            ("model.embed_tokens", "token_embd.weight"),
        ] {
            assert_eq!(hf_to_gguf(h).as_deref(), Some(g));
            assert_eq!(gguf_to_hf(g).as_deref(), Some(h));
        }
        assert_eq!(
            hf_to_gguf("base_model.model.model.layers.2.self_attn.v_proj").as_deref(),
            Some("blk.2.attn_v.weight")
        );
        assert_eq!(hf_to_gguf("model.layers.x.self_attn.q_proj"), None);
        assert_eq!(hf_to_gguf("model.layers.1.self_attn.rotary_emb"), None);
        assert_eq!(gguf_to_hf("blk.1.attn_norm.weight"), None);
    }

    /// The permutation is llama.cpp's `reshape(n_head, 2, hd/2, ...).swapaxes(1, 2)`:
    /// written out for 2 heads of 8 rows.
    #[test]
    fn rope_rows_follow_the_converter() {
        let o = RowOrder::Rope { heads: 2 };
        // GGUF row g holds HF row perm[g].
        let perm: Vec<usize> = (0..16).map(|g| o.to_hf(g, 16)).collect();
        assert_eq!(perm, [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]);
        for r in 0..16 {
            assert_eq!(o.to_hf(o.to_gguf(r, 16), 16), r);
        }
        assert!(RowOrder::Rope { heads: 3 }.check(16).is_err());
        assert_eq!(
            row_order("qwen2", 4, 2, "blk.0.attn_q.weight"),
            RowOrder::Same
        );
        assert_eq!(
            row_order("llama", 4, 2, "blk.0.attn_k.weight"),
            RowOrder::Rope { heads: 2 }
        );
    }
}

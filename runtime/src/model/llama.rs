//! The llama-family transformer (llama, SmolLM, qwen2): weights by GGUF name, and the forward
//! pass written against [`Backend`].

use super::backend::Backend;
use super::config::Config;
use crate::gguf::GgufFile;
use crate::{Error, Result};

pub struct LayerWeights<W> {
    pub attn_norm: W,
    pub wq: W,
    pub wk: W,
    pub wv: W,
    pub wo: W,
    pub bq: Option<W>,
    pub bk: Option<W>,
    pub bv: Option<W>,
    pub ffn_norm: W,
    pub w_gate: W,
    pub w_up: W,
    pub w_down: W,
}

pub struct Weights<W> {
    pub tok_embd: W,
    pub layers: Vec<LayerWeights<W>>,
    pub out_norm: W,
    /// `output.weight`, or the embedding table when the model ties them.
    pub output: W,
}

/// Finds tensor `name`, checks its shape against `[cols, rows]` (ggml order), and hands it to
/// the backend.
fn load<B: Backend>(b: &mut B, f: &GgufFile, name: &str, shape: &[usize]) -> Result<B::Weight> {
    let t = f
        .tensor(name)
        .ok_or_else(|| Error::tensor(name, "missing from the model file"))?;
    let want: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    if let Some(sp) = crate::sparse::store::read(f.metadata(), t)? {
        if name == "token_embd.weight" {
            return Err(Error::tensor(
                name,
                "the embeddings must be dense, not sparse",
            ));
        }
        if want != [sp.cols as u64, sp.rows as u64] {
            return Err(Error::tensor(
                name,
                format!(
                    "sparse matrix of {} rows x {} inputs, expected {want:?} (inputs, rows)",
                    sp.rows, sp.cols
                ),
            ));
        }
        sp.check_bytes(name, f.tensor_data(t)?)?;
        let range = f.range(t)?;
        return b.load_weight(t, range.start, Some(sp));
    }
    // A trailing dimension of 1 is the same tensor (some writers emit it).
    let mut got = t.shape.clone();
    while got.len() > want.len() && got.last() == Some(&1) {
        got.pop();
    }
    if got != want {
        return Err(Error::tensor(
            name,
            format!("shape {:?}, expected {:?}", t.shape, want),
        ));
    }
    if crate::kernels::KernelTable::get().dot(t.ty).is_none() {
        return Err(Error::tensor(
            name,
            format!("type {} is not supported", t.ty),
        ));
    }
    let range = f.range(t)?;
    b.load_weight(t, range.start, None)
}

fn load_opt<B: Backend>(
    b: &mut B,
    f: &GgufFile,
    name: &str,
    shape: &[usize],
) -> Result<Option<B::Weight>> {
    match f.tensor(name) {
        None => Ok(None),
        Some(_) => load(b, f, name, shape).map(Some),
    }
}

impl<W> Weights<W> {
    /// The matrix of GGUF tensor `name` (`blk.N.attn_q.weight`, `output.weight`, ...). When
    /// the output matrix is tied to the embeddings, `output.weight` is not found.
    pub fn matrix_mut(&mut self, name: &str) -> Option<&mut W> {
        if name == "output.weight" {
            return Some(&mut self.output);
        }
        let rest = name.strip_prefix("blk.")?;
        let (i, suffix) = rest.split_once('.')?;
        let l = self.layers.get_mut(i.parse::<usize>().ok()?)?;
        Some(match suffix {
            "attn_q.weight" => &mut l.wq,
            "attn_k.weight" => &mut l.wk,
            "attn_v.weight" => &mut l.wv,
            "attn_output.weight" => &mut l.wo,
            "ffn_gate.weight" => &mut l.w_gate,
            "ffn_up.weight" => &mut l.w_up,
            "ffn_down.weight" => &mut l.w_down,
            _ => return None,
        })
    }

    pub fn load<B: Backend<Weight = W>>(b: &mut B, f: &GgufFile, c: &Config) -> Result<Self> {
        let (d, qd, kvd) = (c.n_embd, c.q_dim(), c.kv_dim());
        let tok_embd = load(b, f, "token_embd.weight", &[d, c.n_vocab])?;
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            layers.push(LayerWeights {
                attn_norm: load(b, f, &n("attn_norm.weight"), &[d])?,
                wq: load(b, f, &n("attn_q.weight"), &[d, qd])?,
                wk: load(b, f, &n("attn_k.weight"), &[d, kvd])?,
                wv: load(b, f, &n("attn_v.weight"), &[d, kvd])?,
                wo: load(b, f, &n("attn_output.weight"), &[qd, d])?,
                bq: load_opt(b, f, &n("attn_q.bias"), &[qd])?,
                bk: load_opt(b, f, &n("attn_k.bias"), &[kvd])?,
                bv: load_opt(b, f, &n("attn_v.bias"), &[kvd])?,
                ffn_norm: load(b, f, &n("ffn_norm.weight"), &[d])?,
                w_gate: load(b, f, &n("ffn_gate.weight"), &[d, c.n_ff])?,
                w_up: load(b, f, &n("ffn_up.weight"), &[d, c.n_ff])?,
                w_down: load(b, f, &n("ffn_down.weight"), &[c.n_ff, d])?,
            });
        }
        let out_norm = load(b, f, "output_norm.weight", &[d])?;
        let output = match f.tensor("output.weight") {
            Some(_) => load(b, f, "output.weight", &[d, c.n_vocab])?,
            None => load(b, f, "token_embd.weight", &[d, c.n_vocab])?,
        };
        Ok(Weights {
            tok_embd,
            layers,
            out_norm,
            output,
        })
    }
}

/// Activation buffers for batches of up to `cap` tokens, reused across calls.
pub struct Activations<B: Backend> {
    cap: usize,
    x: B::Buf,
    h: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    attn: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    /// The final norm of the rows whose logits are wanted.
    xn: B::Buf,
    logits: B::Buf,
}

impl<B: Backend> Activations<B> {
    fn new(b: &mut B, c: &Config, cap: usize) -> Self {
        Activations {
            cap,
            x: b.alloc(cap * c.n_embd),
            h: b.alloc(cap * c.n_embd.max(c.q_dim())),
            q: b.alloc(cap * c.q_dim()),
            k: b.alloc(cap * c.kv_dim()),
            v: b.alloc(cap * c.kv_dim()),
            attn: b.alloc(cap * c.q_dim()),
            gate: b.alloc(cap * c.n_ff),
            up: b.alloc(cap * c.n_ff),
            xn: b.alloc(cap * c.n_embd),
            logits: b.alloc(cap * c.n_vocab),
        }
    }
}

/// Which positions of a batch to compute logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (`sparrow logits`).
    All,
    /// The tokens' from index `k` of the batch on (perplexity scores the second half of a
    /// window); `k` is capped at the last token.
    From(usize),
}

/// One forward pass over `tokens` at positions `pos0..`: appends their keys and values to
/// `kv` and returns the logits asked for, row-major [rows, n_vocab].
#[allow(clippy::too_many_arguments)]
pub fn forward<B: Backend>(
    b: &mut B,
    host: &[u8],
    c: &Config,
    w: &Weights<B::Weight>,
    kv: &mut B::Kv,
    act: &mut Option<Activations<B>>,
    tokens: &[u32],
    pos0: usize,
    which: Logits,
    out: &mut Vec<f32>,
) -> Result<()> {
    let n = tokens.len();
    if n == 0 {
        return Err(Error::InvalidArgument("no tokens to evaluate".into()));
    }
    if act.as_ref().is_none_or(|a| a.cap < n) {
        *act = Some(Activations::new(b, c, n));
    }
    let Some(a) = act.as_mut() else {
        unreachable!()
    };
    let d = c.n_embd;

    b.embed(host, &w.tok_embd, tokens, &mut a.x)?;
    for (l, lw) in w.layers.iter().enumerate() {
        b.rms_norm(host, &a.x, &lw.attn_norm, c.rms_eps, n, &mut a.h)?;
        b.matmul_shared(
            host,
            &[&lw.wq, &lw.wk, &lw.wv],
            &a.h,
            n,
            &mut [&mut a.q, &mut a.k, &mut a.v],
        )?;
        if let Some(bq) = &lw.bq {
            b.add_bias(host, bq, &mut a.q, n)?;
        }
        if let Some(bk) = &lw.bk {
            b.add_bias(host, bk, &mut a.k, n)?;
        }
        if let Some(bv) = &lw.bv {
            b.add_bias(host, bv, &mut a.v, n)?;
        }
        b.rope(c, &mut a.q, n, c.n_head, pos0);
        b.rope(c, &mut a.k, n, c.n_head_kv, pos0);
        b.attention(c, kv, l, &a.q, &a.k, &a.v, pos0, n, &mut a.attn)?;
        b.matmul(host, &lw.wo, &a.attn, n, &mut a.h)?;
        b.add(&mut a.x, &a.h, n * d);

        b.rms_norm(host, &a.x, &lw.ffn_norm, c.rms_eps, n, &mut a.h)?;
        b.matmul_shared(
            host,
            &[&lw.w_gate, &lw.w_up],
            &a.h,
            n,
            &mut [&mut a.gate, &mut a.up],
        )?;
        b.swiglu(&mut a.gate, &a.up, n * c.n_ff);
        b.matmul(host, &lw.w_down, &a.gate, n, &mut a.h)?;
        b.add(&mut a.x, &a.h, n * d);
    }

    let rows = match which {
        Logits::All => {
            b.rms_norm(host, &a.x, &w.out_norm, c.rms_eps, n, &mut a.xn)?;
            n
        }
        Logits::Last => {
            b.copy(&a.x, (n - 1) * d, d, &mut a.h);
            b.rms_norm(host, &a.h, &w.out_norm, c.rms_eps, 1, &mut a.xn)?;
            1
        }
        Logits::From(k) => {
            let k = k.min(n - 1);
            b.copy(&a.x, k * d, (n - k) * d, &mut a.h);
            b.rms_norm(host, &a.h, &w.out_norm, c.rms_eps, n - k, &mut a.xn)?;
            n - k
        }
    };
    b.matmul(host, &w.output, &a.xn, rows, &mut a.logits)?;
    // Into the caller's buffer: a decode step's logits (196 KB for a 49k vocabulary) in a
    // new allocation each step cost page faults and zeroing in the profile.
    out.clear();
    out.resize(rows * c.n_vocab, 0.0);
    b.read(&a.logits, out);
    Ok(())
}

//! Models: configuration from metadata, the backend trait, the CPU backend, the llama-family
//! forward pass, and sessions (a KV cache and a position).

pub mod backend;
pub mod config;
pub mod cpu;
pub mod llama;

pub use backend::Backend;
pub use config::{Config, RopeKind};
pub use cpu::{CpuBackend, KvType};
pub use llama::Logits;

use crate::adapter::stack::{Applied, Stack};
use crate::adapter::{patch, Adapter};
use crate::gguf::GgufFile;
use crate::{Error, Result};
use std::path::Path;

/// Options for opening a model.
#[derive(Clone, Debug, Default)]
pub struct ModelOptions {
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// Element type of the key/value cache.
    pub kv_type: KvType,
}

/// A memory-mapped model ready to run on a backend.
pub struct Model<B: Backend = CpuBackend> {
    file: GgufFile,
    config: Config,
    backend: B,
    weights: llama::Weights<B::Weight>,
    /// Adapters fused into the weights.
    adapters: Stack,
}

impl Model<CpuBackend> {
    /// Maps `path` and prepares it for the CPU. Reads no weights beyond what the mapping
    /// pages in on use.
    pub fn open(path: impl AsRef<Path>, opts: &ModelOptions) -> Result<Self> {
        let file = GgufFile::open(path)?;
        Model::with_backend(file, CpuBackend::with_kv_type(opts.threads, opts.kv_type)?)
    }
}

impl<B: Backend> Model<B> {
    pub fn with_backend(file: GgufFile, mut backend: B) -> Result<Self> {
        let config = Config::from_metadata(file.metadata())?;
        let weights = llama::Weights::load(&mut backend, &file, &config)?;
        Ok(Model {
            file,
            config,
            backend,
            weights,
            adapters: Stack::default(),
        })
    }

    /// `a` mapped onto this model (GGUF names, row order) and checked; see [`Adapter::bind`].
    /// Binding once and applying the result many times keeps the mapping out of switches.
    pub fn bind_adapter(&self, a: &Adapter) -> Result<Adapter> {
        a.bind(&self.file)
    }

    /// Fuses one adapter into the weights at `scale` (see [`Model::apply_adapters`]).
    pub fn apply_adapter(&mut self, a: &Adapter, scale: f32) -> Result<u64> {
        self.apply_adapters(&[(a, scale)], patch::Options::default())
    }

    /// Fuses several adapters at once, each at its scale: their deltas are summed per tensor
    /// and each touched block is requantized once. The result is one entry on the adapter
    /// stack, whose id is returned. All-or-nothing: every check runs before the first byte
    /// is written, and on an error the weights are unchanged.
    ///
    /// A session's KV cache keeps what the earlier weights computed: reset sessions after
    /// changing adapters for results that depend only on the new weights.
    pub fn apply_adapters(&mut self, list: &[(&Adapter, f32)], o: patch::Options) -> Result<u64> {
        self.adapters.apply(&mut self.file, list, o)
    }

    /// Removes adapter `id`, restoring the bytes it overwrote. Adapters unstack in LIFO
    /// order: `id` must be the last one applied.
    pub fn unapply_adapter(&mut self, id: u64) -> Result<()> {
        self.adapters.unapply(&mut self.file, id)
    }

    /// Removes every adapter: the weights are the base's again, bit for bit.
    pub fn unapply_all(&mut self) {
        self.adapters.unapply_all(&mut self.file)
    }

    /// Replaces adapter `id` (the last applied) by `to` at `scale`. `to` is checked against
    /// the base before `id` is removed, so a bad `to` leaves `id` in place.
    pub fn switch_adapter(&mut self, id: u64, to: &Adapter, scale: f32) -> Result<u64> {
        self.adapters.switch(&mut self.file, id, to, scale)
    }

    /// The adapters fused now, oldest first.
    pub fn applied_adapters(&self) -> &[Applied] {
        self.adapters.applied()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Bytes of weights one decode step (one token) reads, from the tensor table: every
    /// per-layer matrix, bias and norm, the final norm, the output matrix (the embedding table
    /// when the model ties them), and one row of the embedding table for the lookup. Decode
    /// streams these from memory once per token, so this over the memory bandwidth is the
    /// fastest a decode step can be.
    pub fn decode_weight_bytes(&self) -> u64 {
        let f = &self.file;
        let bytes = |name: &str| f.tensor(name).map_or(0, |t| t.n_bytes);
        let mut total = 0u64;
        for i in 0..self.config.n_layer {
            for s in [
                "attn_norm.weight",
                "attn_q.weight",
                "attn_k.weight",
                "attn_v.weight",
                "attn_output.weight",
                "attn_q.bias",
                "attn_k.bias",
                "attn_v.bias",
                "ffn_norm.weight",
                "ffn_gate.weight",
                "ffn_up.weight",
                "ffn_down.weight",
            ] {
                total += bytes(&format!("blk.{i}.{s}"));
            }
        }
        total += bytes("output_norm.weight");
        total += match f.tensor("output.weight") {
            Some(t) => t.n_bytes,
            None => bytes("token_embd.weight"),
        };
        if let Some(t) = f.tensor("token_embd.weight") {
            total += t.n_bytes / t.n_rows().max(1);
        }
        total
    }

    /// A new session with room for `n_ctx` tokens (0: the training context, capped at 4096).
    pub fn new_session(&mut self, n_ctx: usize) -> Result<Session<B>> {
        let n_ctx = if n_ctx == 0 {
            self.config.n_ctx_train.min(4096)
        } else {
            n_ctx
        };
        Ok(Session {
            kv: self.backend.kv_cache(&self.config, n_ctx)?,
            n_ctx,
            pos: 0,
            act: None,
        })
    }

    /// Evaluates `tokens` after what `s` has seen, as one batch, and returns the logits asked
    /// for ([rows, n_vocab] row-major).
    pub fn eval(&mut self, s: &mut Session<B>, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        if s.pos + tokens.len() > s.n_ctx {
            return Err(Error::InvalidArgument(format!(
                "context full: {} + {} tokens exceed the context size {}",
                s.pos,
                tokens.len(),
                s.n_ctx
            )));
        }
        let logits = llama::forward(
            &mut self.backend,
            self.file.bytes(),
            &self.config,
            &self.weights,
            &mut s.kv,
            &mut s.act,
            tokens,
            s.pos,
            which,
        )?;
        s.pos += tokens.len();
        Ok(logits)
    }
}

/// The state of one conversation with a model: its KV cache and how far it has got.
pub struct Session<B: Backend = CpuBackend> {
    kv: B::Kv,
    n_ctx: usize,
    pos: usize,
    act: Option<llama::Activations<B>>,
}

impl<B: Backend> Session<B> {
    /// Tokens evaluated so far.
    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Forgets everything after the first `pos` tokens (the cache beyond is overwritten).
    pub fn truncate(&mut self, pos: usize) {
        self.pos = self.pos.min(pos);
    }

    pub fn reset(&mut self) {
        self.pos = 0;
    }
}

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
    /// Adapters run beside the weights (unfused LoRA), bound to this model, with scales.
    unfused: Vec<(Adapter, f32)>,
    /// Weights that have side terms now.
    sided: Vec<String>,
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
            unfused: Vec::new(),
            sided: Vec::new(),
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
    ///
    /// With `o.residual`, what requantization drops is kept as a sparse term computed beside
    /// the weights, so that the model computes the exact f32 merge (see [`patch::Options`]).
    pub fn apply_adapters(&mut self, list: &[(&Adapter, f32)], o: patch::Options) -> Result<u64> {
        if o.residual {
            for (a, _) in list {
                if a.kind() == crate::adapter::Kind::Lora {
                    return Err(Error::adapter(
                        &a.source,
                        "residuals of a fused LoRA are dense (every weight changes): run a LoRA \
                         unfused for an exact result on a quantized base",
                    ));
                }
                self.check_side_targets(a)?;
            }
        }
        let id = self.adapters.apply(&mut self.file, list, o)?;
        if o.residual {
            self.refresh_sides();
        }
        Ok(id)
    }

    /// Runs `list` unfused from now on: every product with a target computes
    /// W x + scale * B (A x) beside the (unchanged) weights, as PEFT's unmerged forward does.
    /// Replaces the previous unfused set; an empty list turns unfused adapters off. Only
    /// low-rank (LoRA) adapters can run unfused.
    pub fn set_unfused_adapters(&mut self, list: &[(&Adapter, f32)]) -> Result<()> {
        let mut bound = Vec::with_capacity(list.len());
        for &(a, scale) in list {
            if !scale.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "adapter scale {scale} is not finite"
                )));
            }
            let b = a.bind(&self.file)?;
            if let Some(t) = b
                .targets
                .iter()
                .find(|t| !matches!(t.delta, crate::adapter::Delta::LowRank(_)))
            {
                return Err(Error::adapter(
                    &a.source,
                    format!(
                        "`{}` is a sparse delta: sparse adapters are fused, only LoRA runs unfused",
                        t.name
                    ),
                ));
            }
            self.check_side_targets(&b)?;
            bound.push((b, scale));
        }
        self.unfused = bound;
        self.refresh_sides();
        Ok(())
    }

    /// Every target of `a` must be a matrix this model multiplies by.
    fn check_side_targets(&mut self, a: &Adapter) -> Result<()> {
        let names: Vec<String> = match a.names {
            crate::adapter::NameScheme::Gguf => a.targets.iter().map(|t| t.name.clone()).collect(),
            crate::adapter::NameScheme::Hf => a
                .bind(&self.file)?
                .targets
                .into_iter()
                .map(|t| t.name)
                .collect(),
        };
        for n in names {
            if self.weights.matrix_mut(&n).is_none() {
                return Err(Error::adapter(
                    &a.source,
                    format!("`{n}` is not a matrix of the forward pass"),
                ));
            }
        }
        Ok(())
    }

    /// Rebuilds the side terms of every weight from the unfused adapters and the residuals
    /// of the fused ones.
    fn refresh_sides(&mut self) {
        use crate::adapter::side::{Csr, Side};
        use std::collections::BTreeMap;
        // Per weight: its LoRA terms, residual pairs, rows and columns.
        type Pending = (Side, Vec<(u32, f32)>, usize, usize);
        let mut sides: BTreeMap<String, Pending> = BTreeMap::new();
        for (a, scale) in &self.unfused {
            for t in &a.targets {
                if let crate::adapter::Delta::LowRank(l) = &t.delta {
                    let e = sides
                        .entry(t.name.clone())
                        .or_insert_with(|| (Side::default(), Vec::new(), t.rows, t.cols));
                    e.0.lora.push(crate::adapter::LowRank {
                        scale: l.scale * scale,
                        ..l.clone()
                    });
                }
            }
        }
        for entry in self.adapters.applied() {
            for (name, rows, cols, res) in entry.residuals() {
                let e = sides
                    .entry(name.to_string())
                    .or_insert_with(|| (Side::default(), Vec::new(), rows, cols));
                e.1.extend_from_slice(res);
            }
        }
        for name in std::mem::take(&mut self.sided) {
            if let Some(w) = self.weights.matrix_mut(&name) {
                self.backend.set_side(w, None);
            }
        }
        for (name, (mut side, pairs, rows, cols)) in sides {
            if !pairs.is_empty() {
                side.sparse = Some(Csr::from_pairs(rows, cols, pairs));
            }
            if let Some(w) = self.weights.matrix_mut(&name) {
                self.backend.set_side(w, Some(std::sync::Arc::new(side)));
                self.sided.push(name);
            }
        }
    }

    /// Removes adapter `id`, restoring the bytes it overwrote. Adapters unstack in LIFO
    /// order: `id` must be the last one applied.
    pub fn unapply_adapter(&mut self, id: u64) -> Result<()> {
        self.adapters.unapply(&mut self.file, id)?;
        self.refresh_sides_if_needed();
        Ok(())
    }

    fn refresh_sides_if_needed(&mut self) {
        if !self.sided.is_empty() {
            self.refresh_sides();
        }
    }

    /// Removes every adapter: the weights are the base's again, bit for bit.
    pub fn unapply_all(&mut self) {
        self.adapters.unapply_all(&mut self.file);
        self.refresh_sides_if_needed();
    }

    /// Replaces adapter `id` (the last applied) by `to` at `scale`. `to` is checked against
    /// the base before `id` is removed, so a bad `to` leaves `id` in place.
    pub fn switch_adapter(&mut self, id: u64, to: &Adapter, scale: f32) -> Result<u64> {
        let id = self.adapters.switch(&mut self.file, id, to, scale)?;
        self.refresh_sides_if_needed();
        Ok(id)
    }

    /// Sets how many bytes this model may keep in compiled patches, so that fusing an
    /// adapter again (on the bare base) is a copy rather than an edit; see
    /// [`crate::adapter::stack::Stack`]. The default is
    /// [`crate::adapter::stack::DEFAULT_COMPILED_BUDGET`]; 0 turns it off.
    pub fn set_compiled_patch_budget(&mut self, bytes: usize) {
        self.adapters.set_compiled_budget(bytes);
    }

    /// Heap bytes held by compiled patches now.
    pub fn compiled_patch_bytes(&self) -> usize {
        self.adapters.compiled_bytes()
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

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
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
        let mut logits = Vec::new();
        self.eval_into(s, tokens, which, &mut logits)?;
        Ok(logits)
    }

    /// [`Model::eval`] into `logits` (cleared and resized), reusing its allocation: a
    /// generation loop keeps one buffer for all its steps.
    pub fn eval_into(
        &mut self,
        s: &mut Session<B>,
        tokens: &[u32],
        which: Logits,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        if s.pos + tokens.len() > s.n_ctx {
            return Err(Error::InvalidArgument(format!(
                "context full: {} + {} tokens exceed the context size {}",
                s.pos,
                tokens.len(),
                s.n_ctx
            )));
        }
        llama::forward(
            &mut self.backend,
            self.file.bytes(),
            &self.config,
            &self.weights,
            &mut s.kv,
            &mut s.act,
            tokens,
            s.pos,
            which,
            logits,
        )?;
        s.pos += tokens.len();
        Ok(())
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

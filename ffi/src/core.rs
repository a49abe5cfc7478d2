//! The safe layer under both bindings (C in `c_api.rs`, JNI in `jni.rs`): handle registries,
//! the objects behind handles, and every operation as a Rust function that returns a
//! [`Failure`] (status and message) instead of an error type.
//!
//! Handles are ids, not pointers: the C side sees `SparrowModel *` and so on, but the value is
//! a number looked up in a registry. A destroyed, forged or wrong-kind handle is simply not
//! found, so it gets `SPARROW_ERR_INVALID_HANDLE` instead of a use-after-free. Ids are never
//! reused.
//!
//! Locks: a model's state (weights, adapter stack) sits behind one mutex, taken by every
//! operation that evaluates or patches it; a session's state behind another, taken with
//! `try_lock` so that two threads using one session get `SPARROW_ERR_BUSY` instead of
//! waiting. A thread inside a generation callback holds both, so calls that would take them
//! again from that thread are refused (`IN_CALLBACK`) instead of deadlocking.

use sparrow::adapter::Adapter;
use sparrow::generate::{generate_each, GenerateOptions, StopReason};
use sparrow::model::{Model, ModelOptions, Session};
use sparrow::sample::SamplerConfig;
use sparrow::tokenizer::{ChatTemplate, Message, Tokenizer};
use sparrow::Error;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

/// Status codes of the C ABI (`SparrowStatus`). Values are stable: new codes are only added.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SparrowStatus {
    /// Success.
    SPARROW_OK = 0,
    /// A required pointer argument was null.
    SPARROW_ERR_NULL = 1,
    /// A handle that is not (or no longer) a live handle of the expected kind: destroyed,
    /// never created, or a handle of another kind.
    SPARROW_ERR_INVALID_HANDLE = 2,
    /// An argument out of range or inconsistent (zero context, negative scale count...), or
    /// text that is not UTF-8.
    SPARROW_ERR_INVALID_ARGUMENT = 3,
    /// A file could not be opened or read.
    SPARROW_ERR_IO = 4,
    /// The model file is malformed, truncated, or lacks what the model needs.
    SPARROW_ERR_MODEL = 5,
    /// An adapter could not be read, does not fit the model, or is not in the state the call
    /// needs (not applied, applied twice, not the last applied).
    SPARROW_ERR_ADAPTER = 6,
    /// Tokenization or chat-template failure.
    SPARROW_ERR_TOKENIZER = 7,
    /// The output buffer is too small; the size it needs was written.
    SPARROW_ERR_BUFFER_TOO_SMALL = 8,
    /// The session is in use by another call (another thread, or this thread's generation
    /// callback calling back into the library).
    SPARROW_ERR_BUSY = 9,
    /// A feature this build or this model does not support (for example the GPU backend).
    SPARROW_ERR_UNSUPPORTED = 10,
    /// The prompt does not fit in what is left of the session's context.
    SPARROW_ERR_CONTEXT_FULL = 11,
    /// An internal error (a bug): the call was stopped and the message says where. A model
    /// whose state an internal error may have left half-changed refuses further use.
    SPARROW_ERR_INTERNAL = 12,
}

/// Why a generation stopped (`SparrowStopReason`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SparrowStopReason {
    /// `max_tokens` tokens were generated.
    SPARROW_STOP_MAX_TOKENS = 0,
    /// The model produced an end-of-generation token.
    SPARROW_STOP_EOG = 1,
    /// The callback returned non-zero, or `sparrow_session_cancel` was called.
    SPARROW_STOP_CANCELLED = 2,
    /// The session's context is full.
    SPARROW_STOP_CONTEXT_FULL = 3,
}

/// A failed call: the status the binding returns and the message it keeps as the last error.
#[derive(Debug)]
pub struct Failure {
    pub status: SparrowStatus,
    pub msg: String,
}

impl Failure {
    pub fn new(status: SparrowStatus, msg: impl Into<String>) -> Self {
        Failure {
            status,
            msg: msg.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        use SparrowStatus::*;
        let status = match &e {
            Error::Io { .. } => SPARROW_ERR_IO,
            Error::Gguf { .. } | Error::Metadata { .. } | Error::Tensor { .. } => SPARROW_ERR_MODEL,
            Error::Unsupported(_) => SPARROW_ERR_UNSUPPORTED,
            Error::Tokenizer(_) | Error::Template(_) => SPARROW_ERR_TOKENIZER,
            Error::InvalidArgument(m) if m.starts_with("context full") => SPARROW_ERR_CONTEXT_FULL,
            Error::InvalidArgument(_) => SPARROW_ERR_INVALID_ARGUMENT,
            Error::Adapter { .. } => SPARROW_ERR_ADAPTER,
        };
        Failure::new(status, e.to_string())
    }
}

pub type FfiResult<T> = Result<T, Failure>;

fn invalid(msg: impl Into<String>) -> Failure {
    Failure::new(SparrowStatus::SPARROW_ERR_INVALID_ARGUMENT, msg)
}

fn adapter_err(msg: impl Into<String>) -> Failure {
    Failure::new(SparrowStatus::SPARROW_ERR_ADAPTER, msg)
}

// ---------------------------------------------------------------------------------------
// Registries

/// The next handle id; shared by every kind so that an id names one object of one kind.
static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

/// Live handles of one kind, by id.
pub struct Registry<T> {
    kind: &'static str,
    map: Mutex<BTreeMap<usize, Arc<T>>>,
}

impl<T> Registry<T> {
    const fn new(kind: &'static str) -> Self {
        Registry {
            kind,
            map: Mutex::new(BTreeMap::new()),
        }
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<usize, Arc<T>>> {
        // Nothing panics while this lock is held; recover rather than poison every call.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `make(id)` under a fresh id.
    fn insert(&self, make: impl FnOnce(usize) -> T) -> FfiResult<Arc<T>> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        if id == 0 || id == usize::MAX {
            return Err(Failure::new(
                SparrowStatus::SPARROW_ERR_INTERNAL,
                "handle ids exhausted",
            ));
        }
        let v = Arc::new(make(id));
        self.map().insert(id, v.clone());
        Ok(v)
    }

    /// The live object of handle `id`.
    pub fn get(&self, id: usize) -> FfiResult<Arc<T>> {
        self.map().get(&id).cloned().ok_or_else(|| {
            Failure::new(
                SparrowStatus::SPARROW_ERR_INVALID_HANDLE,
                format!(
                    "invalid {} handle {id:#x}: destroyed, never created, or not a {}",
                    self.kind, self.kind
                ),
            )
        })
    }

    /// Unregisters handle `id`; the object lives on while others hold it.
    pub fn remove(&self, id: usize) -> FfiResult<()> {
        match self.map().remove(&id) {
            Some(_) => Ok(()),
            None => Err(Failure::new(
                SparrowStatus::SPARROW_ERR_INVALID_HANDLE,
                format!(
                    "invalid {} handle {id:#x}: already destroyed, never created, or not a {}",
                    self.kind, self.kind
                ),
            )),
        }
    }
}

pub static MODELS: Registry<ModelObj> = Registry::new("model");
pub static SESSIONS: Registry<SessionObj> = Registry::new("session");
pub static ADAPTERS: Registry<AdapterObj> = Registry::new("adapter");

thread_local! {
    /// Set while this thread runs a generation callback (and so holds a model and a
    /// session lock).
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as inside a generation callback until dropped (unwinding included).
struct InCallback;

impl InCallback {
    fn enter() -> Self {
        IN_CALLBACK.with(|c| c.set(true));
        InCallback
    }
}

impl Drop for InCallback {
    fn drop(&mut self) {
        IN_CALLBACK.with(|c| c.set(false));
    }
}

fn refuse_in_callback(what: &str) -> FfiResult<()> {
    if IN_CALLBACK.with(Cell::get) {
        return Err(Failure::new(
            SparrowStatus::SPARROW_ERR_BUSY,
            format!(
                "{what} cannot be called from inside a generation callback (the generation \
                 holds the model); call it after the generation returns"
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Models

/// The backend a model runs on (`SparrowBackend`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SparrowBackend {
    /// The best available: the CPU in this build.
    SPARROW_BACKEND_AUTO = 0,
    SPARROW_BACKEND_CPU = 1,
    /// Not in this build: opening with it fails with `SPARROW_ERR_UNSUPPORTED`.
    SPARROW_BACKEND_GPU = 2,
}

/// Options of [`model_open`], as the bindings pass them.
#[derive(Clone, Copy, Debug)]
pub struct OpenOptions {
    /// Worker threads; 0 uses one per core.
    pub threads: u32,
    /// Context size of new sessions; 0 uses the model's training context, capped at 4096.
    pub n_ctx: u32,
    /// A `SparrowBackend` value.
    pub backend: i32,
}

/// An open model: its weights (with the adapters applied), tokenizer and chat template.
pub struct ModelObj {
    pub id: usize,
    pub tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    n_ctx: usize,
    state: Mutex<ModelState>,
}

struct ModelState {
    model: Model,
    /// Adapters fused now, oldest first, with the stack id the model gave each.
    applied: Vec<AppliedAdapter>,
}

struct AppliedAdapter {
    adapter: Arc<AdapterObj>,
    stack_id: u64,
    scale: f32,
}

impl ModelObj {
    fn state(&self) -> FfiResult<MutexGuard<'_, ModelState>> {
        self.state.lock().map_err(|_| {
            Failure::new(
                SparrowStatus::SPARROW_ERR_INTERNAL,
                "this model was left in an unknown state by an earlier internal error; \
                 destroy it and open the file again",
            )
        })
    }

    /// The model's lock, refused from a generation callback.
    fn lock(&self, what: &str) -> FfiResult<MutexGuard<'_, ModelState>> {
        refuse_in_callback(what)?;
        self.state()
    }
}

/// Opens the GGUF model at `path`.
pub fn model_open(path: &str, o: OpenOptions) -> FfiResult<Arc<ModelObj>> {
    match o.backend {
        0 | 1 => {}
        2 => {
            return Err(Failure::new(
                SparrowStatus::SPARROW_ERR_UNSUPPORTED,
                "the GPU backend is not in this build; use SPARROW_BACKEND_CPU or \
                 SPARROW_BACKEND_AUTO",
            ))
        }
        b => {
            return Err(invalid(format!(
                "unknown backend {b} (0 auto, 1 CPU, 2 GPU)"
            )))
        }
    }
    let model = Model::open(
        path,
        &ModelOptions {
            threads: o.threads as usize,
            ..Default::default()
        },
    )?;
    let md = model.file().metadata();
    let tokenizer = Tokenizer::from_metadata(md)?;
    // A model without a chat template still generates from raw text.
    let template = ChatTemplate::from_metadata(md).ok();
    let n_ctx = match o.n_ctx {
        0 => model.config().n_ctx_train.clamp(1, 4096),
        n => n as usize,
    };
    MODELS.insert(|id| ModelObj {
        id,
        tokenizer,
        template,
        n_ctx,
        state: Mutex::new(ModelState {
            model,
            applied: Vec::new(),
        }),
    })
}

// ---------------------------------------------------------------------------------------
// Adapters

/// An adapter read from a file and bound to one model (names mapped, every check run).
pub struct AdapterObj {
    pub id: usize,
    model_id: usize,
    adapter: Adapter,
}

/// Reads the adapter at `path` (PEFT folder, GGUF LoRA or sparse delta) for `model`, and
/// checks it against the model: a bad adapter fails here, not at apply.
pub fn adapter_load(model: &ModelObj, path: &str) -> FfiResult<Arc<AdapterObj>> {
    refuse_in_callback("sparrow_adapter_load")?;
    let a = Adapter::load(path)?;
    let bound = {
        let st = model.lock("sparrow_adapter_load")?;
        st.model.bind_adapter(&a)?
    };
    ADAPTERS.insert(|id| AdapterObj {
        id,
        model_id: model.id,
        adapter: bound,
    })
}

fn check_scale(scale: f32) -> FfiResult<()> {
    if !scale.is_finite() {
        return Err(invalid(format!("adapter scale {scale} is not finite")));
    }
    Ok(())
}

fn check_owner(model: &ModelObj, a: &AdapterObj) -> FfiResult<()> {
    if a.model_id != model.id {
        return Err(adapter_err(format!(
            "adapter {:#x} was loaded for model {:#x}, not for model {:#x}; load it again for \
             this model",
            a.id, a.model_id, model.id
        )));
    }
    Ok(())
}

impl ModelState {
    fn position(&self, a: &AdapterObj) -> Option<usize> {
        self.applied.iter().position(|x| x.adapter.id == a.id)
    }
}

/// Fuses `a` into `model`'s weights at `scale`, on top of the adapters applied before.
pub fn adapter_apply(model: &ModelObj, a: &Arc<AdapterObj>, scale: f32) -> FfiResult<()> {
    check_owner(model, a)?;
    check_scale(scale)?;
    let mut st = model.lock("sparrow_adapter_apply")?;
    if st.position(a).is_some() {
        return Err(adapter_err(format!(
            "adapter {:#x} is already applied; use sparrow_adapter_set_scale to change its scale",
            a.id
        )));
    }
    let stack_id = st.model.apply_adapter(&a.adapter, scale)?;
    st.applied.push(AppliedAdapter {
        adapter: a.clone(),
        stack_id,
        scale,
    });
    Ok(())
}

fn not_applied(a: &AdapterObj) -> Failure {
    adapter_err(format!("adapter {:#x} is not applied", a.id))
}

fn not_last(st: &ModelState, a: &AdapterObj) -> FfiResult<()> {
    match st.applied.last() {
        Some(top) if top.adapter.id == a.id => Ok(()),
        Some(top) => Err(adapter_err(format!(
            "adapter {:#x} is under adapter {:#x}: adapters are removed in reverse order of \
             application",
            a.id, top.adapter.id
        ))),
        None => Err(not_applied(a)),
    }
}

/// Removes `a`, which must be the last adapter applied to `model`, restoring the weights'
/// bytes.
pub fn adapter_unapply(model: &ModelObj, a: &AdapterObj) -> FfiResult<()> {
    check_owner(model, a)?;
    let mut st = model.lock("sparrow_adapter_unapply")?;
    st.position(a).ok_or_else(|| not_applied(a))?;
    not_last(&st, a)?;
    let top = st.applied.last().expect("checked").stack_id;
    st.model.unapply_adapter(top)?;
    st.applied.pop();
    Ok(())
}

/// Replaces `from` (the last applied) by `to` at `scale`; a `to` that does not fit leaves
/// `from` applied.
pub fn adapter_switch(
    model: &ModelObj,
    from: &AdapterObj,
    to: &Arc<AdapterObj>,
    scale: f32,
) -> FfiResult<()> {
    check_owner(model, from)?;
    check_owner(model, to)?;
    check_scale(scale)?;
    let mut st = model.lock("sparrow_adapter_switch")?;
    st.position(from).ok_or_else(|| not_applied(from))?;
    not_last(&st, from)?;
    if from.id != to.id && st.position(to).is_some() {
        return Err(adapter_err(format!(
            "adapter {:#x} is already applied",
            to.id
        )));
    }
    let top = st.applied.last().expect("checked").stack_id;
    let stack_id = st.model.switch_adapter(top, &to.adapter, scale)?;
    *st.applied.last_mut().expect("checked") = AppliedAdapter {
        adapter: to.clone(),
        stack_id,
        scale,
    };
    Ok(())
}

/// Changes the scale of applied adapter `a`: the adapters above it are removed, `a` is
/// re-fused at `scale`, and they are applied again at their scales.
pub fn adapter_set_scale(model: &ModelObj, a: &AdapterObj, scale: f32) -> FfiResult<()> {
    check_owner(model, a)?;
    check_scale(scale)?;
    let mut st = model.lock("sparrow_adapter_set_scale")?;
    let at = st.position(a).ok_or_else(|| not_applied(a))?;
    let above: Vec<AppliedAdapter> = st.applied.drain(at..).collect();
    // Every entry was applied once already, so re-applying passes the same checks; a
    // failure here would be a bug, and the error says what is still applied.
    let st = &mut *st;
    for x in above.iter().rev() {
        st.model.unapply_adapter(x.stack_id)?;
    }
    for (i, x) in above.iter().enumerate() {
        let s = if i == 0 { scale } else { x.scale };
        let stack_id = st.model.apply_adapter(&x.adapter.adapter, s)?;
        st.applied.push(AppliedAdapter {
            adapter: x.adapter.clone(),
            stack_id,
            scale: s,
        });
    }
    Ok(())
}

/// Removes every adapter of `model`: its weights are the file's again, bit for bit.
pub fn adapter_unapply_all(model: &ModelObj) -> FfiResult<()> {
    let mut st = model.lock("sparrow_adapter_unapply_all")?;
    st.model.unapply_all();
    st.applied.clear();
    Ok(())
}

/// The ids of the adapters applied to `model`, oldest first.
pub fn applied_adapters(model: &ModelObj) -> FfiResult<Vec<usize>> {
    let st = model.lock("sparrow_model_applied_adapters")?;
    Ok(st.applied.iter().map(|x| x.adapter.id).collect())
}

// ---------------------------------------------------------------------------------------
// Tokens

pub fn tokenize(
    model: &ModelObj,
    text: &str,
    add_special: bool,
    parse_special: bool,
) -> FfiResult<Vec<u32>> {
    Ok(model.tokenizer.encode(text, add_special, parse_special)?)
}

pub fn detokenize(model: &ModelObj, tokens: &[u32]) -> FfiResult<String> {
    let n = model.tokenizer.vocab_size();
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= n) {
        return Err(invalid(format!(
            "token {bad} is out of the vocabulary (size {n})"
        )));
    }
    Ok(model.tokenizer.decode(tokens)?)
}

// ---------------------------------------------------------------------------------------
// Sessions and generation

/// A conversation with a model: KV cache, the tokens it holds, and chat messages.
pub struct SessionObj {
    pub id: usize,
    pub model: Arc<ModelObj>,
    /// Set by `cancel`; the running generation, or the next one, stops at its next token
    /// and clears it.
    cancel: AtomicBool,
    state: Mutex<SessionState>,
}

struct SessionState {
    session: Session,
    /// The tokens in the KV cache, in order (session.pos() of them).
    seen: Vec<u32>,
    /// Sampled tokens not evaluated yet (the last token of a generation); the next raw
    /// prompt starts with them.
    pending: Vec<u32>,
    /// The chat so far (chat mode).
    messages: Vec<Message>,
}

pub fn session_create(model: &Arc<ModelObj>, n_ctx: u32) -> FfiResult<Arc<SessionObj>> {
    let n_ctx = match n_ctx {
        0 => model.n_ctx,
        n => n as usize,
    };
    let session = model
        .lock("sparrow_session_create")?
        .model
        .new_session(n_ctx)?;
    SESSIONS.insert(|id| SessionObj {
        id,
        model: model.clone(),
        cancel: AtomicBool::new(false),
        state: Mutex::new(SessionState {
            session,
            seen: Vec::new(),
            pending: Vec::new(),
            messages: Vec::new(),
        }),
    })
}

impl SessionObj {
    fn lock(&self) -> FfiResult<MutexGuard<'_, SessionState>> {
        match self.state.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::WouldBlock) => Err(Failure::new(
                SparrowStatus::SPARROW_ERR_BUSY,
                format!(
                    "session {:#x} is in use by another call; a session takes one call at a \
                     time",
                    self.id
                ),
            )),
            Err(TryLockError::Poisoned(_)) => Err(Failure::new(
                SparrowStatus::SPARROW_ERR_INTERNAL,
                "this session was left in an unknown state by an earlier internal error; \
                 destroy it",
            )),
        }
    }

    /// Asks the running generation (or, if none runs, the next one) to stop at its next
    /// token. Safe from any thread, and from the generation's callback.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
}

/// Forgets the conversation: the next generation starts from an empty context.
pub fn session_reset(s: &SessionObj) -> FfiResult<()> {
    refuse_in_callback("sparrow_session_reset")?;
    let mut st = s.lock()?;
    st.session.reset();
    st.seen.clear();
    st.pending.clear();
    st.messages.clear();
    Ok(())
}

/// Generation settings, as the bindings pass them.
#[derive(Clone, Debug)]
pub struct GenOptions {
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: u32,
    pub seed: u64,
    pub stop_at_eog: bool,
    /// The prompt is a user message: the conversation is rendered with the model's chat
    /// template and the reply is added to it.
    pub chat: bool,
}

impl Default for GenOptions {
    fn default() -> Self {
        let s = SamplerConfig::default();
        GenOptions {
            max_tokens: 128,
            temperature: s.temperature,
            top_k: s.top_k as u32,
            top_p: s.top_p,
            min_p: s.min_p,
            repeat_penalty: s.repeat_penalty,
            repeat_last_n: s.repeat_last_n as u32,
            seed: s.seed,
            stop_at_eog: true,
            chat: false,
        }
    }
}

impl GenOptions {
    fn to_runtime(&self) -> FfiResult<GenerateOptions> {
        for (name, v) in [
            ("temperature", self.temperature),
            ("top_p", self.top_p),
            ("min_p", self.min_p),
            ("repeat_penalty", self.repeat_penalty),
        ] {
            if !v.is_finite() {
                return Err(invalid(format!("{name} {v} is not finite")));
            }
        }
        if !(0.0..=1.0).contains(&self.top_p) || !(0.0..=1.0).contains(&self.min_p) {
            return Err(invalid(format!(
                "top_p {} and min_p {} must lie in [0, 1]",
                self.top_p, self.min_p
            )));
        }
        if self.repeat_penalty <= 0.0 {
            return Err(invalid(format!(
                "repeat_penalty {} must be positive (1 is none)",
                self.repeat_penalty
            )));
        }
        Ok(GenerateOptions {
            max_tokens: self.max_tokens as usize,
            sampler: SamplerConfig {
                temperature: self.temperature,
                top_k: self.top_k as usize,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                repeat_last_n: self.repeat_last_n as usize,
                seed: self.seed,
            },
            stop: Vec::new(),
            stop_at_eog: self.stop_at_eog,
        })
    }
}

/// What a generation did.
#[derive(Clone, Copy, Debug)]
pub struct GenResult {
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub stop_reason: SparrowStopReason,
    pub prompt_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// Generates after `prompt` in session `s`. `on_token(Some(id), text)` runs after each
/// generated token with the text it completed (possibly empty), `on_token(None, text)` at
/// the end if text was held back; `false` cancels.
pub fn generate(
    s: &SessionObj,
    prompt: &str,
    o: &GenOptions,
    mut on_token: impl FnMut(Option<u32>, &str) -> bool,
) -> FfiResult<GenResult> {
    refuse_in_callback("sparrow_session_generate")?;
    let opts = o.to_runtime()?;
    let mut st = s.lock()?;
    let model = &s.model;
    let mut mst = model.state()?;
    let st = &mut *st;
    let tok = &model.tokenizer;

    // The tokens to evaluate: the whole rendered chat after what the cache already holds,
    // or the raw prompt after the cache (and any pending sampled token).
    let (keep, new): (usize, Vec<u32>) = if o.chat {
        let template = model.template.as_ref().ok_or_else(|| {
            Failure::new(
                SparrowStatus::SPARROW_ERR_UNSUPPORTED,
                "this model has no chat template; generate without chat mode",
            )
        })?;
        let mut messages = st.messages.clone();
        messages.push(Message::new("user", prompt));
        let all = tok.encode(&template.render(&messages, true)?, true, true)?;
        let common = st.seen.iter().zip(&all).take_while(|(a, b)| a == b).count();
        let common = common.min(all.len().saturating_sub(1));
        (common, all[common..].to_vec())
    } else {
        let mut new = st.pending.clone();
        new.extend(tok.encode(prompt, st.seen.is_empty() && new.is_empty(), true)?);
        (st.seen.len(), new)
    };
    if new.is_empty() {
        return Err(invalid("the prompt has no tokens"));
    }
    let n_ctx = st.session.n_ctx();
    if keep + new.len() > n_ctx {
        return Err(Failure::new(
            SparrowStatus::SPARROW_ERR_CONTEXT_FULL,
            format!(
                "the prompt needs {} tokens after the {keep} in the session, but the context \
                 holds {n_ctx}; reset the session or create one with a larger context",
                new.len()
            ),
        ));
    }
    st.session.truncate(keep);
    st.seen.truncate(keep);
    st.pending.clear();

    let cancel = &s.cancel;
    let g = {
        let r = generate_each(
            &mut mst.model,
            &mut st.session,
            tok,
            &new,
            &opts,
            |id, text| {
                if id.is_some() && cancel.load(Ordering::SeqCst) {
                    return false;
                }
                let go = {
                    let _in = InCallback::enter();
                    on_token(id, text)
                };
                go && !cancel.load(Ordering::SeqCst)
            },
        );
        cancel.store(false, Ordering::SeqCst);
        r?
    };
    st.seen.extend(&new);
    st.seen.extend(&g.tokens[..g.decode_steps]);
    debug_assert_eq!(st.seen.len(), st.session.pos());
    let rest = &g.tokens[g.decode_steps..];
    if o.chat {
        st.messages.push(Message::new("user", prompt));
        st.messages.push(Message::new("assistant", g.text.trim()));
    } else {
        st.pending = rest.iter().copied().filter(|&t| !tok.is_eog(t)).collect();
    }
    use SparrowStopReason::*;
    Ok(GenResult {
        prompt_tokens: new.len() as u32,
        generated_tokens: g.tokens.len() as u32,
        stop_reason: match g.stop_reason {
            StopReason::MaxTokens => SPARROW_STOP_MAX_TOKENS,
            StopReason::EndOfGeneration => SPARROW_STOP_EOG,
            StopReason::Cancelled => SPARROW_STOP_CANCELLED,
            StopReason::ContextFull => SPARROW_STOP_CONTEXT_FULL,
            // No stop strings are passed.
            StopReason::StopString => SPARROW_STOP_MAX_TOKENS,
        },
        prompt_tokens_per_s: g.prompt_tokens_per_s(),
        decode_tokens_per_s: g.decode_tokens_per_s(),
    })
}

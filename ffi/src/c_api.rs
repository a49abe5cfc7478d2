//! The C entry points. Each one clears the thread's last error, checks its pointers, runs
//! the operation of `core.rs` under `catch_unwind`, and turns the outcome into a status
//! (keeping the message as the thread's last error).

use crate::core::{self, Failure, FfiResult, GenOptions, OpenOptions, SparrowStatus};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use SparrowStatus::*;

/// A model: an opened GGUF file, its tokenizer, and the adapters fused into it. May be used
/// from several threads at once; its calls (and the generations of all its sessions) take
/// turns.
pub struct SparrowModel {
    _opaque: [u8; 0],
}

/// A session: one conversation (KV cache, tokens, chat messages) with a model. One call at a
/// time: a call while another runs on the same session returns `SPARROW_ERR_BUSY`.
/// `sparrow_session_cancel` may be called from any thread at any time.
pub struct SparrowSession {
    _opaque: [u8; 0],
}

/// An adapter loaded for one model (checked against it). Immutable: may be shared between
/// threads.
pub struct SparrowAdapter {
    _opaque: [u8; 0],
}

/// Options for `sparrow_model_open`; start from `sparrow_model_options_default()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SparrowModelOptions {
    /// Worker threads for the matrix products; 0 uses one per core.
    pub n_threads: u32,
    /// Context size (tokens) of sessions created with n_ctx 0; 0 uses the model's training
    /// context, capped at 4096.
    pub n_ctx: u32,
    /// A `SparrowBackend` value.
    pub backend: i32,
}

/// Options for `sparrow_session_generate`; start from `sparrow_generate_options_default()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SparrowGenerateOptions {
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// 0 is greedy (the most likely token).
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: u32,
    /// In [0, 1]; 1 keeps every token.
    pub top_p: f32,
    /// In [0, 1]; 0 keeps every token.
    pub min_p: f32,
    /// 1 is no penalty.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: u32,
    /// Seed of the sampler.
    pub seed: u64,
    /// Stop at the model's end-of-generation tokens.
    pub stop_at_eog: bool,
    /// The prompt is a user message: the session's conversation is rendered with the model's
    /// chat template, and the reply is added to it. Otherwise the prompt is raw text that
    /// continues the session's context.
    pub chat: bool,
}

/// What `sparrow_session_generate` did.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SparrowGenerateResult {
    /// Tokens evaluated as the prompt.
    pub prompt_tokens: u32,
    /// Tokens sampled (an end-of-generation token included).
    pub generated_tokens: u32,
    /// A `SparrowStopReason` value.
    pub stop_reason: i32,
    pub prompt_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// Called by `sparrow_session_generate` after each generated token with the text it
/// completed (`length` bytes at `text`, NUL-terminated; empty while a character is
/// unfinished) and the token id, and once at the end with token -1 if text was held back.
/// Return 0 to go on, anything else to stop (the stop reason is then
/// `SPARROW_STOP_CANCELLED`). `text` is valid only during the call. The callback runs on the
/// calling thread while the model is in use: it may call `sparrow_session_cancel`,
/// `sparrow_last_error`, `sparrow_tokenize` and `sparrow_detokenize`; other calls on the same
/// model return `SPARROW_ERR_BUSY`.
pub type SparrowTokenCallback = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        text: *const c_char,
        length: usize,
        token: i32,
    ) -> i32,
>;

thread_local! {
    static LAST_ERROR: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn set_error(msg: &str) {
    LAST_ERROR.with(|e| {
        let mut e = e.borrow_mut();
        e.clear();
        // A NUL inside the message would cut it short in C; none is expected.
        e.extend(msg.bytes().map(|b| if b == 0 { b'?' } else { b }));
        e.push(0);
    });
}

fn clear_error() {
    LAST_ERROR.with(|e| e.borrow_mut().clear());
}

/// Runs `f` as an entry point: last error cleared first, panics caught, failures recorded.
fn entry(f: impl FnOnce() -> FfiResult<()>) -> SparrowStatus {
    clear_error();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => SPARROW_OK,
        Ok(Err(e)) => {
            set_error(&e.msg);
            e.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(&format!("internal error: {what}"));
            SPARROW_ERR_INTERNAL
        }
    }
}

fn null(arg: &str) -> Failure {
    Failure::new(SPARROW_ERR_NULL, format!("`{arg}` is NULL"))
}

/// The string at `p`, which must be non-null, NUL-terminated UTF-8.
unsafe fn str_arg<'a>(p: *const c_char, arg: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(null(arg));
    }
    CStr::from_ptr(p).to_str().map_err(|e| {
        Failure::new(
            SPARROW_ERR_INVALID_ARGUMENT,
            format!("`{arg}` is not UTF-8: {e}"),
        )
    })
}

fn model_of(p: *const SparrowModel) -> FfiResult<Arc<core::ModelObj>> {
    if p.is_null() {
        return Err(null("model"));
    }
    core::MODELS.get(p as usize)
}

fn session_of(p: *const SparrowSession) -> FfiResult<Arc<core::SessionObj>> {
    if p.is_null() {
        return Err(null("session"));
    }
    core::SESSIONS.get(p as usize)
}

fn adapter_of(p: *const SparrowAdapter, arg: &str) -> FfiResult<Arc<core::AdapterObj>> {
    if p.is_null() {
        return Err(null(arg));
    }
    core::ADAPTERS.get(p as usize)
}

/// The two-call list output: writes `items.len()` to `*n` (not null), then the items to
/// `out` if `capacity` holds them (`out` may be null for an empty list), else
/// `SPARROW_ERR_BUFFER_TOO_SMALL`.
unsafe fn write_list<T: Copy>(
    items: &[T],
    out: *mut T,
    capacity: usize,
    n: *mut usize,
    what: &str,
) -> FfiResult<()> {
    n.write(items.len());
    if items.len() > capacity {
        return Err(Failure::new(
            SPARROW_ERR_BUFFER_TOO_SMALL,
            format!("{} {what} do not fit in capacity {capacity}", items.len()),
        ));
    }
    if !items.is_empty() {
        if out.is_null() {
            return Err(null(what));
        }
        std::ptr::copy_nonoverlapping(items.as_ptr(), out, items.len());
    }
    Ok(())
}

/// Writes `v` to `out` if `out` is not null.
unsafe fn put<T>(out: *mut T, v: T) {
    if !out.is_null() {
        out.write(v);
    }
}

/// The library's version, as a static NUL-terminated string.
#[no_mangle]
pub extern "C" fn sparrow_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last failed call on this thread, or "" if the last call succeeded.
/// Valid until the next call into the library from this thread.
#[no_mangle]
pub extern "C" fn sparrow_last_error() -> *const c_char {
    LAST_ERROR.with(|e| {
        let e = e.borrow();
        if e.is_empty() {
            c"".as_ptr()
        } else {
            // The buffer lives in this thread's storage until the next call changes it.
            e.as_ptr().cast()
        }
    })
}

/// The default model options: all cores, the model's context (at most 4096), automatic
/// backend.
#[no_mangle]
pub extern "C" fn sparrow_model_options_default() -> SparrowModelOptions {
    SparrowModelOptions {
        n_threads: 0,
        n_ctx: 0,
        backend: core::SparrowBackend::SPARROW_BACKEND_AUTO as i32,
    }
}

/// Opens the GGUF model at `path` (memory-mapped; weights are not copied). `options` may be
/// NULL for the defaults. On success `*model` is the new handle; on failure it is NULL.
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string; `options` NULL or valid; `model` NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn sparrow_model_open(
    path: *const c_char,
    options: *const SparrowModelOptions,
    model: *mut *mut SparrowModel,
) -> SparrowStatus {
    entry(|| {
        if model.is_null() {
            return Err(null("model"));
        }
        model.write(std::ptr::null_mut());
        let path = str_arg(path, "path")?;
        let o = if options.is_null() {
            sparrow_model_options_default()
        } else {
            options.read()
        };
        let m = core::model_open(
            path,
            OpenOptions {
                threads: o.n_threads,
                n_ctx: o.n_ctx,
                backend: o.backend,
            },
        )?;
        model.write(m.id as *mut SparrowModel);
        Ok(())
    })
}

/// Destroys a model handle. NULL is accepted (nothing happens); a handle already destroyed
/// returns `SPARROW_ERR_INVALID_HANDLE`. The model's memory is freed once its sessions are
/// destroyed too; its adapters' handles stay valid but can no longer be applied.
#[no_mangle]
pub extern "C" fn sparrow_model_destroy(model: *mut SparrowModel) -> SparrowStatus {
    entry(|| {
        if model.is_null() {
            return Ok(());
        }
        core::MODELS.remove(model as usize)
    })
}

/// Tokenizes UTF-8 `text`. `add_special` adds the model's BOS (as at the start of a
/// context); `parse_special` reads special-token text such as `<|im_start|>` as those
/// tokens. Writes the count to `*n_tokens` and, if `capacity` suffices, the tokens to
/// `tokens`; otherwise returns `SPARROW_ERR_BUFFER_TOO_SMALL` (`tokens` may be NULL when
/// `capacity` is 0, to ask for the size).
///
/// # Safety
/// `text` NUL-terminated; `tokens` NULL or writable for `capacity` elements; `n_tokens`
/// writable.
#[no_mangle]
pub unsafe extern "C" fn sparrow_tokenize(
    model: *const SparrowModel,
    text: *const c_char,
    add_special: bool,
    parse_special: bool,
    tokens: *mut u32,
    capacity: usize,
    n_tokens: *mut usize,
) -> SparrowStatus {
    entry(|| {
        let m = model_of(model)?;
        let text = str_arg(text, "text")?;
        if n_tokens.is_null() {
            return Err(null("n_tokens"));
        }
        let ids = core::tokenize(&m, text, add_special, parse_special)?;
        write_list(&ids, tokens, capacity, n_tokens, "tokens")
    })
}

/// Turns `n_tokens` tokens into UTF-8 text (special tokens shown as their text). Writes the
/// length in bytes (without the NUL) to `*length` and, if `capacity` >= length + 1, the
/// NUL-terminated text to `text`; otherwise returns `SPARROW_ERR_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `tokens` readable for `n_tokens` elements (NULL allowed when 0); `text` NULL or writable
/// for `capacity` bytes; `length` writable.
#[no_mangle]
pub unsafe extern "C" fn sparrow_detokenize(
    model: *const SparrowModel,
    tokens: *const u32,
    n_tokens: usize,
    text: *mut c_char,
    capacity: usize,
    length: *mut usize,
) -> SparrowStatus {
    entry(|| {
        let m = model_of(model)?;
        if length.is_null() {
            return Err(null("length"));
        }
        let ids = match n_tokens {
            0 => &[][..],
            _ if tokens.is_null() => return Err(null("tokens")),
            n => std::slice::from_raw_parts(tokens, n),
        };
        let s = core::detokenize(&m, ids)?;
        length.write(s.len());
        if s.len() >= capacity {
            return Err(Failure::new(
                SPARROW_ERR_BUFFER_TOO_SMALL,
                format!(
                    "{} bytes and a NUL do not fit in capacity {capacity}",
                    s.len()
                ),
            ));
        }
        if text.is_null() {
            return Err(null("text"));
        }
        std::ptr::copy_nonoverlapping(s.as_ptr(), text.cast::<u8>(), s.len());
        text.add(s.len()).write(0);
        Ok(())
    })
}

/// Creates a session with room for `n_ctx` tokens (0: the model's option). On failure
/// `*session` is NULL.
///
/// # Safety
/// `session` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sparrow_session_create(
    model: *mut SparrowModel,
    n_ctx: u32,
    session: *mut *mut SparrowSession,
) -> SparrowStatus {
    entry(|| {
        if session.is_null() {
            return Err(null("session"));
        }
        session.write(std::ptr::null_mut());
        let m = model_of(model)?;
        let s = core::session_create(&m, n_ctx)?;
        session.write(s.id as *mut SparrowSession);
        Ok(())
    })
}

/// Destroys a session handle; NULL is accepted, a destroyed handle returns
/// `SPARROW_ERR_INVALID_HANDLE`. A generation running in it finishes first (cancel it to
/// make that quick) before its memory is freed.
#[no_mangle]
pub extern "C" fn sparrow_session_destroy(session: *mut SparrowSession) -> SparrowStatus {
    entry(|| {
        if session.is_null() {
            return Ok(());
        }
        core::SESSIONS.remove(session as usize)
    })
}

/// Forgets the session's conversation. Call it after changing adapters for output that
/// depends only on the new weights (the cache holds what the old weights computed).
#[no_mangle]
pub extern "C" fn sparrow_session_reset(session: *mut SparrowSession) -> SparrowStatus {
    entry(|| core::session_reset(&*session_of(session)?))
}

/// Stops the generation running in `session` at its next token, or, if none runs, the next
/// one before its first token. Safe from any thread and from the generation's callback.
#[no_mangle]
pub extern "C" fn sparrow_session_cancel(session: *mut SparrowSession) -> SparrowStatus {
    entry(|| {
        session_of(session)?.cancel();
        Ok(())
    })
}

/// The default generation options: 128 tokens, temperature 0.8, top-k 40, top-p 0.95,
/// min-p 0.05, no repeat penalty, seed 0x5eed, stop at end of generation, raw text.
#[no_mangle]
pub extern "C" fn sparrow_generate_options_default() -> SparrowGenerateOptions {
    let d = GenOptions::default();
    SparrowGenerateOptions {
        max_tokens: d.max_tokens,
        temperature: d.temperature,
        top_k: d.top_k,
        top_p: d.top_p,
        min_p: d.min_p,
        repeat_penalty: d.repeat_penalty,
        repeat_last_n: d.repeat_last_n,
        seed: d.seed,
        stop_at_eog: d.stop_at_eog,
        chat: d.chat,
    }
}

/// Generates after `prompt` (UTF-8) in `session`, streaming through `callback` (may be
/// NULL). `options` may be NULL for the defaults, `result` NULL if not wanted. A
/// cancellation is not an error: the status is `SPARROW_OK` and the stop reason says it.
/// Raw text continues the session's context, after the last generated token; an empty
/// prompt just continues generating (an error in an empty session). A prompt that does not
/// fit in the context left returns `SPARROW_ERR_CONTEXT_FULL` and changes nothing.
///
/// # Safety
/// `prompt` NUL-terminated; `options` NULL or valid; `result` NULL or writable; `callback`
/// NULL or a function that may be called with `user_data`.
#[no_mangle]
pub unsafe extern "C" fn sparrow_session_generate(
    session: *mut SparrowSession,
    prompt: *const c_char,
    options: *const SparrowGenerateOptions,
    callback: SparrowTokenCallback,
    user_data: *mut c_void,
    result: *mut SparrowGenerateResult,
) -> SparrowStatus {
    entry(|| {
        let s = session_of(session)?;
        let prompt = str_arg(prompt, "prompt")?;
        let o = if options.is_null() {
            sparrow_generate_options_default()
        } else {
            options.read()
        };
        let o = GenOptions {
            max_tokens: o.max_tokens,
            temperature: o.temperature,
            top_k: o.top_k,
            top_p: o.top_p,
            min_p: o.min_p,
            repeat_penalty: o.repeat_penalty,
            repeat_last_n: o.repeat_last_n,
            seed: o.seed,
            stop_at_eog: o.stop_at_eog,
            chat: o.chat,
        };
        let mut buf: Vec<u8> = Vec::new();
        let r = core::generate(&s, prompt, &o, |id, text| {
            let Some(cb) = callback else { return true };
            buf.clear();
            buf.extend_from_slice(text.as_bytes());
            buf.push(0);
            let token = id.map_or(-1, |t| t as i32);
            cb(user_data, buf.as_ptr().cast(), text.len(), token) == 0
        })?;
        put(
            result,
            SparrowGenerateResult {
                prompt_tokens: r.prompt_tokens,
                generated_tokens: r.generated_tokens,
                stop_reason: r.stop_reason as i32,
                prompt_tokens_per_s: r.prompt_tokens_per_s,
                decode_tokens_per_s: r.decode_tokens_per_s,
            },
        );
        Ok(())
    })
}

/// Loads the adapter at `path` for `model`: a PEFT LoRA or SHiRA folder, a llama.cpp GGUF
/// LoRA file, or a `.sdelta.safetensors` sparse delta. It is checked against the model here
/// (targets exist, shapes and types fit); nothing is applied. On failure `*adapter` is NULL.
///
/// # Safety
/// `path` NUL-terminated; `adapter` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sparrow_adapter_load(
    model: *mut SparrowModel,
    path: *const c_char,
    adapter: *mut *mut SparrowAdapter,
) -> SparrowStatus {
    entry(|| {
        if adapter.is_null() {
            return Err(null("adapter"));
        }
        adapter.write(std::ptr::null_mut());
        let m = model_of(model)?;
        let path = str_arg(path, "path")?;
        let a = core::adapter_load(&m, path)?;
        adapter.write(a.id as *mut SparrowAdapter);
        Ok(())
    })
}

/// Destroys an adapter handle; NULL is accepted, a destroyed handle returns
/// `SPARROW_ERR_INVALID_HANDLE`. An adapter still applied stays fused (and its memory held)
/// until `sparrow_adapter_unapply_all` or the model's destruction.
#[no_mangle]
pub extern "C" fn sparrow_adapter_destroy(adapter: *mut SparrowAdapter) -> SparrowStatus {
    entry(|| {
        if adapter.is_null() {
            return Ok(());
        }
        core::ADAPTERS.remove(adapter as usize)
    })
}

/// Fuses `adapter` into `model`'s weights at `scale` (1 is the adapter as trained), on top
/// of the adapters already applied. All or nothing: on an error the weights are unchanged.
#[no_mangle]
pub extern "C" fn sparrow_adapter_apply(
    model: *mut SparrowModel,
    adapter: *mut SparrowAdapter,
    scale: f32,
) -> SparrowStatus {
    entry(|| {
        let m = model_of(model)?;
        core::adapter_apply(&m, &adapter_of(adapter, "adapter")?, scale)
    })
}

/// Removes `adapter`, which must be the last one applied: the weights' bytes are restored
/// exactly.
#[no_mangle]
pub extern "C" fn sparrow_adapter_unapply(
    model: *mut SparrowModel,
    adapter: *mut SparrowAdapter,
) -> SparrowStatus {
    entry(|| {
        let m = model_of(model)?;
        core::adapter_unapply(&m, &*adapter_of(adapter, "adapter")?)
    })
}

/// Replaces `from` (the last applied) by `to` at `scale`. `to` is checked first: if it does
/// not fit, `from` stays applied.
#[no_mangle]
pub extern "C" fn sparrow_adapter_switch(
    model: *mut SparrowModel,
    from: *mut SparrowAdapter,
    to: *mut SparrowAdapter,
    scale: f32,
) -> SparrowStatus {
    entry(|| {
        let m = model_of(model)?;
        let from = adapter_of(from, "from")?;
        let to = adapter_of(to, "to")?;
        core::adapter_switch(&m, &from, &to, scale)
    })
}

/// Changes the scale of applied `adapter` (the adapters above it are re-applied).
#[no_mangle]
pub extern "C" fn sparrow_adapter_set_scale(
    model: *mut SparrowModel,
    adapter: *mut SparrowAdapter,
    scale: f32,
) -> SparrowStatus {
    entry(|| {
        let m = model_of(model)?;
        core::adapter_set_scale(&m, &*adapter_of(adapter, "adapter")?, scale)
    })
}

/// Removes every adapter from `model`: its weights are the file's again, bit for bit.
#[no_mangle]
pub extern "C" fn sparrow_adapter_unapply_all(model: *mut SparrowModel) -> SparrowStatus {
    entry(|| core::adapter_unapply_all(&*model_of(model)?))
}

/// The adapters applied to `model`, oldest first: writes the count to `*n_adapters` and, if
/// `capacity` suffices, the handles to `adapters` (NULL allowed when `capacity` is 0);
/// otherwise returns `SPARROW_ERR_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `adapters` NULL or writable for `capacity` elements; `n_adapters` writable.
#[no_mangle]
pub unsafe extern "C" fn sparrow_model_applied_adapters(
    model: *mut SparrowModel,
    adapters: *mut *mut SparrowAdapter,
    capacity: usize,
    n_adapters: *mut usize,
) -> SparrowStatus {
    entry(|| {
        let m = model_of(model)?;
        if n_adapters.is_null() {
            return Err(null("n_adapters"));
        }
        let ids: Vec<*mut SparrowAdapter> = core::applied_adapters(&m)?
            .into_iter()
            .map(|id| id as *mut SparrowAdapter)
            .collect();
        write_list(&ids, adapters, capacity, n_adapters, "adapters")
    })
}

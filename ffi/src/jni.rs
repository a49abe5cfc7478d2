//! The JNI entry points of the Android library (`android/`): the native methods of the
//! Kotlin object `dev.sparrow.Native`, over the safe layer of `core.rs`.
//!
//! Handles travel to the JVM as `long` (the registry ids of `core.rs`), so a closed, forged or
//! wrong-kind handle is refused like in C. Every entry point runs under
//! [`EnvUnowned::with_env`], which catches panics; a [`Failure`], a JNI error or a panic
//! becomes a `dev.sparrow.SparrowException(message, status)` thrown to the caller (a Java
//! exception already pending, one thrown by the token callback for instance, is left to
//! propagate instead). Nothing unwinds into the JVM.
//!
//! Classes called back from here (keep them in `android/consumer-rules.pro`):
//! - `dev.sparrow.SparrowException(String, int)`, thrown on failures;
//! - `dev.sparrow.TokenSink.onToken(String, int): boolean`, the streaming callback.
//!
//! The header stays C only: cbindgen exports `extern "C"` functions, and these are
//! `extern "system"` (the header test, `tests/header.rs`, fails if one ever shows up).

use crate::core::{self, Failure, GenOptions, OpenOptions, SparrowStatus};
use jni::errors::{Error as JniError, ErrorPolicy};
use jni::objects::{JClass, JDoubleArray, JIntArray, JLongArray, JObject, JString, JThrowable};
use jni::sys::{jboolean, jfloat, jint, jlong};
use jni::{jni_sig, jni_str, Env, EnvUnowned, JValue};
use std::sync::Arc;

use SparrowStatus::*;

/// Why an entry point failed: a failure of the library, or of JNI itself (then a Java
/// exception may already be pending).
enum Fail {
    Sparrow(Failure),
    Jni(JniError),
}

impl From<Failure> for Fail {
    fn from(f: Failure) -> Self {
        Fail::Sparrow(f)
    }
}

impl From<JniError> for Fail {
    fn from(e: JniError) -> Self {
        Fail::Jni(e)
    }
}

type JResult<T> = Result<T, Fail>;

/// Throws `dev.sparrow.SparrowException(msg, status)`. On success the exception is pending
/// (JNI reports that as `Error::JavaException`, which is what a thrown exception is here).
fn throw(env: &mut Env, status: SparrowStatus, msg: &str) -> jni::errors::Result<()> {
    let jmsg = env.new_string(msg)?;
    let obj = env.new_object(
        jni_str!("dev/sparrow/SparrowException"),
        jni_sig!("(Ljava/lang/String;I)V"),
        &[JValue::Object(&jmsg), JValue::Int(status as jint)],
    )?;
    let e = env.cast_local::<JThrowable>(obj)?;
    match env.throw(e) {
        Ok(()) | Err(JniError::JavaException) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Turns every error and panic of an entry point into a `SparrowException`, and returns the
/// default value (0, null, false) that the JVM ignores since an exception is pending.
struct Throw;

impl<T: Default> ErrorPolicy<T, Fail> for Throw {
    type Captures<'local: 'native_method, 'native_method> = ();

    fn on_error<'local: 'native_method, 'native_method>(
        env: &mut Env<'local>,
        _cap: &mut (),
        err: Fail,
    ) -> jni::errors::Result<T> {
        if env.exception_check() {
            // Thrown on the Java side (the token callback) or by JNI: it propagates as is.
            return Ok(T::default());
        }
        match err {
            Fail::Sparrow(f) => throw(env, f.status, &f.msg)?,
            Fail::Jni(e) => throw(
                env,
                SPARROW_ERR_INTERNAL,
                &format!("internal error: JNI: {e}"),
            )?,
        }
        Ok(T::default())
    }

    fn on_panic<'local: 'native_method, 'native_method>(
        env: &mut Env<'local>,
        _cap: &mut (),
        payload: Box<dyn std::any::Any + Send + 'static>,
    ) -> jni::errors::Result<T> {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        if env.exception_check() {
            env.exception_clear();
        }
        throw(
            env,
            SPARROW_ERR_INTERNAL,
            &format!("internal error: {what}"),
        )?;
        Ok(T::default())
    }
}

// ---------------------------------------------------------------------------------------
// Arguments

fn null(arg: &str) -> Failure {
    Failure::new(SPARROW_ERR_NULL, format!("`{arg}` is null"))
}

fn string(env: &Env, s: &JString, arg: &str) -> JResult<String> {
    if s.is_null() {
        return Err(null(arg).into());
    }
    Ok(s.try_to_string(env)?)
}

fn id(h: jlong) -> usize {
    // A negative handle is never a live one: usize::MAX is never issued.
    usize::try_from(h).unwrap_or(usize::MAX)
}

fn unsigned(v: jint, arg: &str) -> JResult<u32> {
    u32::try_from(v).map_err(|_| {
        Failure::new(
            SPARROW_ERR_INVALID_ARGUMENT,
            format!("`{arg}` is {v}; it must not be negative"),
        )
        .into()
    })
}

fn handle(id: usize) -> jlong {
    // Ids are small counters; a jlong holds any of them.
    id as jlong
}

fn model(h: jlong) -> JResult<Arc<core::ModelObj>> {
    Ok(core::MODELS.get(id(h))?)
}

fn session(h: jlong) -> JResult<Arc<core::SessionObj>> {
    Ok(core::SESSIONS.get(id(h))?)
}

fn adapter(h: jlong) -> JResult<Arc<core::AdapterObj>> {
    Ok(core::ADAPTERS.get(id(h))?)
}

// ---------------------------------------------------------------------------------------
// Models

#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_modelOpen<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    path: JString<'l>,
    threads: jint,
    n_ctx: jint,
    backend: jint,
) -> jlong {
    env.with_env(|env| -> JResult<jlong> {
        let path = string(env, &path, "path")?;
        let o = OpenOptions {
            threads: unsigned(threads, "threads")?,
            n_ctx: unsigned(n_ctx, "contextSize")?,
            backend,
        };
        Ok(handle(core::model_open(&path, o)?.id))
    })
    .resolve::<Throw>()
}

#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_modelDestroy<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    model: jlong,
) {
    env.with_env(|_| -> JResult<()> { Ok(core::MODELS.remove(id(model))?) })
        .resolve::<Throw>()
}

#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_tokenize<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    h: jlong,
    text: JString<'l>,
    add_special: jboolean,
    parse_special: jboolean,
) -> JIntArray<'l> {
    env.with_env(|env| -> JResult<JIntArray<'l>> {
        let m = model(h)?;
        let text = string(env, &text, "text")?;
        let ids = core::tokenize(&m, &text, add_special, parse_special)?;
        // Token ids are below the vocabulary size, far below i32::MAX.
        let ids: Vec<jint> = ids.into_iter().map(|t| t as jint).collect();
        let out = JIntArray::new(env, ids.len())?;
        out.set_region(env, 0, &ids)?;
        Ok(out)
    })
    .resolve::<Throw>()
}

#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_detokenize<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    h: jlong,
    tokens: JIntArray<'l>,
) -> JString<'l> {
    env.with_env(|env| -> JResult<JString<'l>> {
        let m = model(h)?;
        if tokens.is_null() {
            return Err(null("tokens").into());
        }
        let mut buf = vec![0 as jint; tokens.len(env)?];
        tokens.get_region(env, 0, &mut buf)?;
        let ids = buf
            .iter()
            .map(|&t| {
                u32::try_from(t).map_err(|_| {
                    Failure::new(
                        SPARROW_ERR_INVALID_ARGUMENT,
                        format!("token {t} is out of the vocabulary"),
                    )
                })
            })
            .collect::<Result<Vec<u32>, Failure>>()?;
        let text = core::detokenize(&m, &ids)?;
        Ok(env.new_string(text)?)
    })
    .resolve::<Throw>()
}

// ---------------------------------------------------------------------------------------
// Sessions and generation

#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_sessionCreate<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    model_h: jlong,
    n_ctx: jint,
) -> jlong {
    env.with_env(|_| -> JResult<jlong> {
        let m = model(model_h)?;
        Ok(handle(
            core::session_create(&m, unsigned(n_ctx, "contextSize")?)?.id,
        ))
    })
    .resolve::<Throw>()
}

#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_sessionDestroy<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    h: jlong,
) {
    env.with_env(|_| -> JResult<()> { Ok(core::SESSIONS.remove(id(h))?) })
        .resolve::<Throw>()
}

#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_sessionReset<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    h: jlong,
) {
    env.with_env(|_| -> JResult<()> { Ok(core::session_reset(&*session(h)?)?) })
        .resolve::<Throw>()
}

#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_sessionCancel<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    h: jlong,
) {
    env.with_env(|_| -> JResult<()> {
        session(h)?.cancel();
        Ok(())
    })
    .resolve::<Throw>()
}

/// The C defaults of the generation options, for the Kotlin side's check of its own
/// defaults: max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
/// seed, stop_at_eog (1 or 0), chat (1 or 0).
#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_generateOptionsDefault<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
) -> JDoubleArray<'l> {
    env.with_env(|env| -> JResult<JDoubleArray<'l>> {
        let d = GenOptions::default();
        let v = [
            d.max_tokens as f64,
            d.temperature as f64,
            d.top_k as f64,
            d.top_p as f64,
            d.min_p as f64,
            d.repeat_penalty as f64,
            d.repeat_last_n as f64,
            d.seed as f64,
            d.stop_at_eog as u8 as f64,
            d.chat as u8 as f64,
        ];
        let out = JDoubleArray::new(env, v.len())?;
        out.set_region(env, 0, &v)?;
        Ok(out)
    })
    .resolve::<Throw>()
}

/// Generates after `prompt`, calling `sink.onToken(text, token)` per token (token -1 for the
/// held-back text at the end); `false` from it cancels. Returns `[prompt_tokens,
/// generated_tokens, stop_reason, prompt_tokens_per_s, decode_tokens_per_s]`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "system" fn Java_dev_sparrow_Native_generate<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    h: jlong,
    prompt: JString<'l>,
    max_tokens: jint,
    temperature: jfloat,
    top_k: jint,
    top_p: jfloat,
    min_p: jfloat,
    repeat_penalty: jfloat,
    repeat_last_n: jint,
    seed: jlong,
    stop_at_eog: jboolean,
    chat: jboolean,
    sink: JObject<'l>,
) -> JDoubleArray<'l> {
    env.with_env(|env| -> JResult<JDoubleArray<'l>> {
        let s = session(h)?;
        let prompt = string(env, &prompt, "prompt")?;
        let o = GenOptions {
            max_tokens: unsigned(max_tokens, "maxTokens")?,
            temperature,
            top_k: unsigned(top_k, "topK")?,
            top_p,
            min_p,
            repeat_penalty,
            repeat_last_n: unsigned(repeat_last_n, "repeatLastN")?,
            // The bits of the Java long: any seed is a seed.
            seed: seed as u64,
            stop_at_eog,
            chat,
        };
        // The first JNI error of the callback (usually a pending Java exception); the
        // generation stops there and the error is reported after it.
        let mut failed: Option<JniError> = None;
        let r = core::generate(&s, &prompt, &o, |id, text| {
            if sink.is_null() {
                return true;
            }
            if failed.is_some() {
                return false;
            }
            let token = id.map_or(-1, |t| t as jint);
            // A frame per token, so a long generation does not pile up local references.
            let go = env.with_local_frame(4, |env| -> jni::errors::Result<bool> {
                let text = env.new_string(text)?;
                env.call_method(
                    &sink,
                    jni_str!("onToken"),
                    jni_sig!("(Ljava/lang/String;I)Z"),
                    &[JValue::Object(&text), JValue::Int(token)],
                )?
                .z()
            });
            match go {
                Ok(go) => go,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        let v = [
            r.prompt_tokens as f64,
            r.generated_tokens as f64,
            r.stop_reason as i32 as f64,
            r.prompt_tokens_per_s,
            r.decode_tokens_per_s,
        ];
        let out = JDoubleArray::new(env, v.len())?;
        out.set_region(env, 0, &v)?;
        Ok(out)
    })
    .resolve::<Throw>()
}

// ---------------------------------------------------------------------------------------
// Adapters

#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_adapterLoad<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    model_h: jlong,
    path: JString<'l>,
) -> jlong {
    env.with_env(|env| -> JResult<jlong> {
        let m = model(model_h)?;
        let path = string(env, &path, "path")?;
        Ok(handle(core::adapter_load(&m, &path)?.id))
    })
    .resolve::<Throw>()
}

#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_adapterDestroy<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    h: jlong,
) {
    env.with_env(|_| -> JResult<()> { Ok(core::ADAPTERS.remove(id(h))?) })
        .resolve::<Throw>()
}

#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_adapterApply<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    model_h: jlong,
    adapter_h: jlong,
    scale: jfloat,
) {
    env.with_env(|_| -> JResult<()> {
        Ok(core::adapter_apply(
            &*model(model_h)?,
            &adapter(adapter_h)?,
            scale,
        )?)
    })
    .resolve::<Throw>()
}

#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_adapterUnapply<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    model_h: jlong,
    adapter_h: jlong,
) {
    env.with_env(|_| -> JResult<()> {
        Ok(core::adapter_unapply(
            &*model(model_h)?,
            &*adapter(adapter_h)?,
        )?)
    })
    .resolve::<Throw>()
}

#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_adapterSwitch<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    model_h: jlong,
    from_h: jlong,
    to_h: jlong,
    scale: jfloat,
) {
    env.with_env(|_| -> JResult<()> {
        let m = model(model_h)?;
        let from = adapter(from_h)?;
        let to = adapter(to_h)?;
        Ok(core::adapter_switch(&m, &from, &to, scale)?)
    })
    .resolve::<Throw>()
}

#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_adapterSetScale<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    model_h: jlong,
    adapter_h: jlong,
    scale: jfloat,
) {
    env.with_env(|_| -> JResult<()> {
        Ok(core::adapter_set_scale(
            &*model(model_h)?,
            &*adapter(adapter_h)?,
            scale,
        )?)
    })
    .resolve::<Throw>()
}

#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_adapterUnapplyAll<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    model_h: jlong,
) {
    env.with_env(|_| -> JResult<()> { Ok(core::adapter_unapply_all(&*model(model_h)?)?) })
        .resolve::<Throw>()
}

/// The handles of the adapters applied to the model, oldest first.
#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_appliedAdapters<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
    model_h: jlong,
) -> JLongArray<'l> {
    env.with_env(|env| -> JResult<JLongArray<'l>> {
        let ids: Vec<jlong> = core::applied_adapters(&*model(model_h)?)?
            .into_iter()
            .map(handle)
            .collect();
        let out = JLongArray::new(env, ids.len())?;
        out.set_region(env, 0, &ids)?;
        Ok(out)
    })
    .resolve::<Throw>()
}

// ---------------------------------------------------------------------------------------
// Test only

/// TEST ONLY: panics, so that the JVM tests can check that a Rust panic inside a native
/// method reaches Java as a `SparrowException` (status INTERNAL) instead of a crash. The
/// Kotlin API does not call it.
#[no_mangle]
pub extern "system" fn Java_dev_sparrow_Native_panicForTest<'l>(
    mut env: EnvUnowned<'l>,
    _class: JClass<'l>,
) {
    env.with_env(|_| -> JResult<()> {
        panic!("panic requested by Native.panicForTest (test only)")
    })
    .resolve::<Throw>()
}

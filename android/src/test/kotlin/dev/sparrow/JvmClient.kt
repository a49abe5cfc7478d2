package dev.sparrow

import java.util.concurrent.CountDownLatch
import java.util.concurrent.TimeUnit
import java.lang.reflect.InvocationTargetException
import kotlin.system.exitProcess

/*
 * The JVM client of the Android library: the flow of ffi/tests/c/client.c through the Kotlin
 * API and the JNI glue, on the desktop JVM. Built and run by ffi/tests/jvm_client.rs.
 *
 *   JvmClientKt MODEL_F32 MODEL_Q8 MODEL_QWEN LORA_GGUF SHIRA_DIR NOT_A_MODEL
 *
 * Prints "greedy: ID ID ..." lines for the Rust side to compare with the runtime, and
 * "ok: N checks" at the end; exits 1 at the first failed check.
 */

private var checks = 0

private fun check(cond: Boolean, what: () -> String) {
    checks++
    if (!cond) throw AssertionError(what())
}

/** Runs [block], which must throw a SparrowException with [status] and a message. */
private inline fun expect(status: Status, what: String, block: () -> Unit): SparrowException {
    try {
        block()
    } catch (e: SparrowException) {
        check(e.status == status && e.code == status.code) { "$what: threw $e, expected $status" }
        check(!e.message.isNullOrEmpty()) { "$what: no message" }
        return e
    }
    throw AssertionError("$what: returned, expected SparrowException($status)")
}

/** Calls a Native method through reflection, to pass the nulls that Kotlin would not. */
private fun callNative(name: String, vararg args: Any?) {
    val m = Native::class.java.declaredMethods.single { it.name == name }
    try {
        m.invoke(null, *args)
    } catch (e: InvocationTargetException) {
        throw e.targetException
    }
}

private const val PROMPT = "The little bird"
private val GREEDY = GenerateOptions.greedy(12).copy(stopAtEog = false)

/** Greedy generation of [n] tokens after the prompt in a reset session. */
private fun runGreedy(s: Session, n: Int = 12): GenerateResult {
    s.reset()
    val streamed = ArrayList<Int>()
    val r = s.generate(PROMPT, GREEDY.copy(maxTokens = n)) { _, id ->
        if (id >= 0) streamed.add(id)
        true
    }
    check(r.stopReason == StopReason.MAX_TOKENS) { "stop reason ${r.stopReason}" }
    check(r.generatedTokens == n && r.tokens == streamed && streamed.size == n) {
        "${r.generatedTokens} tokens, ${streamed.size} streamed"
    }
    return r
}

private fun printIds(label: String, r: GenerateResult) = println("$label: " + r.tokens.joinToString(" "))

fun main(args: Array<String>) {
    if (args.size != 6) {
        System.err.println("usage: JvmClientKt MODEL_F32 MODEL_Q8 MODEL_QWEN LORA_GGUF SHIRA_DIR NOT_A_MODEL")
        exitProcess(2)
    }
    try {
        run(args[0], args[1], args[2], args[3], args[4], args[5])
    } catch (e: AssertionError) {
        System.err.println("check failed: ${e.message}")
        e.printStackTrace()
        exitProcess(1)
    }
    println("ok: $checks checks")
}

private fun run(f32: String, q8: String, qwen: String, loraPath: String, shiraPath: String, notAModel: String) {
    // --- the Kotlin defaults are the C defaults ------------------------------------------
    val d = Native.generateOptionsDefault()
    val k = GenerateOptions()
    val mine = doubleArrayOf(
        k.maxTokens.toDouble(), k.temperature.toDouble(), k.topK.toDouble(), k.topP.toDouble(),
        k.minP.toDouble(), k.repeatPenalty.toDouble(), k.repeatLastN.toDouble(), k.seed.toDouble(),
        if (k.stopAtEog) 1.0 else 0.0, if (k.chat) 1.0 else 0.0
    )
    check(d.contentEquals(mine)) { "GenerateOptions() ${mine.toList()} differs from the C defaults ${d.toList()}" }

    // --- opening: every way to fail first ----------------------------------------------
    val e = expect(Status.IO, "open a missing file") { Model.open("/nonexistent/model.gguf") }
    check(e.message!!.contains("/nonexistent/model.gguf")) { "the message names the path: ${e.message}" }
    expect(Status.MODEL, "open a file that is not a model") { Model.open(notAModel) }
    expect(Status.UNSUPPORTED, "open on the GPU") { Model.open(f32, ModelOptions(backend = Backend.GPU)) }
    expect(Status.INVALID_ARGUMENT, "negative threads") { Model.open(f32, ModelOptions(threads = -1)) }
    expect(Status.NULL, "null path") { callNative("modelOpen", null, 0, 0, 0) }

    val model = Model.open(f32, ModelOptions(threads = 2, contextSize = 128))

    // --- tokens -----------------------------------------------------------------------
    // Ids from the model's own tokenizer in transformers (tests/fixtures/tiny/index.json).
    val text = "The little bird sang a song to the sun."
    val want = intArrayOf(316, 278, 283, 450, 366, 267, 298, 259, 267, 269, 73, 348, 262, 352, 16)
    val ids = model.tokenize(text)
    check(ids.contentEquals(want)) { "token ids ${ids.toList()} differ from transformers'" }
    check(model.tokenize(text, addSpecial = true).contentEquals(want)) { "this model asks for no BOS" }
    check(model.tokenize("<|im_start|>", parseSpecial = true).contentEquals(intArrayOf(1))) { "parse_special" }
    check(model.tokenize("").isEmpty()) { "empty text has no tokens" }
    check(model.detokenize(want) == text) { "round trip: '${model.detokenize(want)}'" }
    // Text outside ASCII and the BMP (a surrogate pair in Java) survives the JNI strings.
    val wide = "Grüße, 鳥 and 🐦!"
    check(model.detokenize(model.tokenize(wide)) == wide) { "round trip of '$wide': '${model.detokenize(model.tokenize(wide))}'" }
    expect(Status.INVALID_ARGUMENT, "detokenize an id out of the vocabulary") { model.detokenize(intArrayOf(512)) }
    expect(Status.INVALID_ARGUMENT, "detokenize a negative id") { model.detokenize(intArrayOf(-1)) }
    expect(Status.NULL, "null text") { callNative("tokenize", model.handle, null, false, false) }
    expect(Status.NULL, "null tokens") { callNative("detokenize", model.handle, null) }

    // --- generation -------------------------------------------------------------------
    val session = model.newSession()
    val base = runGreedy(session)
    printIds("greedy", base)
    check(model.detokenize(base.tokens.toIntArray()) == base.text) {
        "streamed text '${base.text}' differs from the detokenized ids"
    }
    check(runGreedy(session).tokens == base.tokens) { "greedy generation is not repeatable" }

    // Continuing a conversation: the second call starts where the first stopped.
    session.reset()
    val t1 = session.generate(PROMPT, GREEDY.copy(maxTokens = 6))
    val t2 = session.generate(" and", GREEDY.copy(maxTokens = 6))
    check(t1.tokens.size == 6 && t2.tokens.size == 6 && t2.promptTokens >= 1) { "two turns of 6 tokens" }

    // Sampling with a seed is repeatable too.
    val seeded = GenerateOptions(maxTokens = 10, stopAtEog = false, seed = 7)
    session.reset()
    val a = session.generate(PROMPT, seeded)
    session.reset()
    val b = session.generate(PROMPT, seeded)
    check(a.tokens == b.tokens && a.tokens.size == 10) { "seeded sampling is not repeatable" }

    // Cancel by the callback's return value.
    session.reset()
    var n = 0
    val stopped = session.generate(PROMPT, GREEDY) { _, id -> if (id >= 0) n++; n < 3 }
    check(stopped.stopReason == StopReason.CANCELLED && n == 3 && stopped.generatedTokens == 3) {
        "callback cancel: ${stopped.stopReason} after $n tokens"
    }

    // Cancel with cancel() from inside the callback, with re-entry checks: the model is busy.
    session.reset()
    n = 0
    var reentryChecked = false
    val cancelled = session.generate(PROMPT, GREEDY) { _, id ->
        if (id >= 0) n++
        if (!reentryChecked) {
            expect(Status.BUSY, "unapplyAll in a callback") { model.unapplyAll() }
            expect(Status.BUSY, "reset in a callback") { session.reset() }
            expect(Status.BUSY, "generate in a callback") { session.generate("x") }
            expect(Status.BUSY, "loadAdapter in a callback") { model.loadAdapter("/nonexistent") }
            check(model.tokenize("hi").isNotEmpty()) { "tokenize in a callback" }
            reentryChecked = true
        }
        if (n == 4) session.cancel()
        true
    }
    check(cancelled.stopReason == StopReason.CANCELLED && n == 4 && reentryChecked) {
        "explicit cancel: ${cancelled.stopReason} after $n tokens"
    }
    check(runGreedy(session).tokens == base.tokens) { "generation after a cancel" }

    // A cancel with no generation running stops the next one before its first token.
    session.reset()
    session.cancel()
    val pending = session.generate(PROMPT, GREEDY)
    check(pending.stopReason == StopReason.CANCELLED && pending.tokens.isEmpty()) {
        "pending cancel: ${pending.stopReason}, ${pending.tokens.size} tokens"
    }

    // Cancel from another thread while the generation runs; that thread finds the session busy.
    val started = CountDownLatch(1)
    val done = CountDownLatch(1)
    var otherFailure: Throwable? = null
    val canceller = Thread {
        try {
            started.await()
            expect(Status.BUSY, "generate from another thread") { session.generate("x") }
            expect(Status.BUSY, "reset from another thread") { session.reset() }
            session.cancel()
        } catch (t: Throwable) {
            otherFailure = t
        } finally {
            done.countDown()
        }
    }
    canceller.start()
    session.reset()
    n = 0
    val crossThread = session.generate(PROMPT, GREEDY.copy(maxTokens = 40)) { _, id ->
        if (id >= 0) n++
        started.countDown()
        check(done.await(60, TimeUnit.SECONDS)) { "the other thread did not finish" }
        true
    }
    canceller.join()
    otherFailure?.let { throw it }
    check(crossThread.stopReason == StopReason.CANCELLED && n == 1) {
        "cross-thread cancel: ${crossThread.stopReason} after $n tokens"
    }

    // An exception thrown by the callback stops the generation and comes out of generate().
    session.reset()
    val boom = IllegalStateException("boom from the callback")
    try {
        session.generate(PROMPT, GREEDY) { _, _ -> throw boom }
        check(false) { "the callback's exception was lost" }
    } catch (t: IllegalStateException) {
        check(t === boom) { "another exception came out: $t" }
    }
    check(runGreedy(session).tokens == base.tokens) { "the session works after a callback's exception" }

    // Generation errors.
    session.reset()
    expect(Status.INVALID_ARGUMENT, "empty prompt in an empty session") { session.generate("", GREEDY) }
    session.generate(PROMPT, GREEDY.copy(maxTokens = 3))
    val more = session.generate("", GREEDY.copy(maxTokens = 3))
    check(more.promptTokens == 1 && more.generatedTokens == 3) { "continuation: ${more.promptTokens} prompt tokens" }
    expect(Status.INVALID_ARGUMENT, "top_p 2") { session.generate(PROMPT, GREEDY.copy(topP = 2f)) }
    expect(Status.INVALID_ARGUMENT, "negative maxTokens") { session.generate(PROMPT, GREEDY.copy(maxTokens = -1)) }
    expect(Status.UNSUPPORTED, "chat without a template") { session.generate(PROMPT, GREEDY.copy(chat = true)) }
    expect(Status.NULL, "null prompt") {
        callNative("generate", session.handle, null, 4, 0f, 40, 1f, 0f, 1f, 64, 0L, false, false, null)
    }
    model.newSession(8).use { small ->
        expect(Status.CONTEXT_FULL, "a prompt longer than the context") { small.generate(text) }
        val full = small.generate("The", GREEDY.copy(maxTokens = 40))
        check(full.stopReason == StopReason.CONTEXT_FULL) { "a small context fills: ${full.stopReason}" }
    }

    // --- adapters ---------------------------------------------------------------------
    expect(Status.IO, "load a missing adapter") { model.loadAdapter("/nonexistent/adapter.gguf") }
    expect(Status.ADAPTER, "load a file that is not an adapter") { model.loadAdapter(notAModel) }
    val lora = model.loadAdapter(loraPath)
    val shira = model.loadAdapter(shiraPath)

    model.apply(lora)
    val withLora = runGreedy(session)
    printIds("greedy+lora", withLora)
    expect(Status.ADAPTER, "apply twice") { model.apply(lora) }
    expect(Status.INVALID_ARGUMENT, "a NaN scale") { model.apply(shira, Float.NaN) }
    model.apply(shira, 1f)
    val withBoth = runGreedy(session)
    printIds("greedy+lora+shira", withBoth)
    check(model.appliedAdapters.size == 2 && model.appliedAdapters[0] === lora && model.appliedAdapters[1] === shira) {
        "applied: ${model.appliedAdapters}"
    }
    expect(Status.ADAPTER, "unapply an adapter under another") { model.unapply(lora) }
    model.unapply(shira)
    check(runGreedy(session).tokens == withLora.tokens) { "unapplying shira gives the lora output back" }
    expect(Status.ADAPTER, "unapply an adapter not applied") { model.unapply(shira) }
    model.switch(lora, shira)
    val withShira = runGreedy(session)
    printIds("greedy+shira", withShira)
    check(model.appliedAdapters.size == 1 && model.appliedAdapters[0] === shira) { "after the switch, only shira" }
    model.setScale(shira, 0f)
    check(runGreedy(session).tokens == base.tokens) { "an adapter at scale 0 changes nothing" }
    model.setScale(shira, 1f)
    check(runGreedy(session).tokens == withShira.tokens) { "scale back to 1" }
    expect(Status.ADAPTER, "setScale of an adapter not applied") { model.setScale(lora, 2f) }
    model.unapplyAll()
    check(model.appliedAdapters.isEmpty()) { "nothing applied after unapplyAll" }
    check(runGreedy(session).tokens == base.tokens) { "unapplyAll restores the base output" }

    // Wrong adapters: one loaded for another model, one that does not fit.
    val other = Model.open(q8)
    val otherLora = other.loadAdapter(loraPath)
    expect(Status.ADAPTER, "an adapter of another model") { model.apply(otherLora) }
    expect(Status.ADAPTER, "switch to an adapter of another model") { model.switch(lora, otherLora) }
    Model.open(qwen).use { q ->
        expect(Status.ADAPTER, "an adapter that does not fit") { q.loadAdapter(loraPath) }
    }
    other.apply(otherLora) // it works on its own model

    // --- closed, stale, forged and wrong-kind handles ------------------------------------
    expect(Status.INVALID_HANDLE, "a session handle as a model") { Native.tokenize(session.handle, text, false, false) }
    expect(Status.INVALID_HANDLE, "a model handle as an adapter") { Native.adapterApply(model.handle, model.handle, 1f) }
    expect(Status.INVALID_HANDLE, "a forged handle") { Native.sessionReset(0xdeadbeefL) }
    expect(Status.INVALID_HANDLE, "a negative handle") { Native.sessionReset(-1L) }
    expect(Status.INVALID_HANDLE, "handle 0") { Native.modelDestroy(0L) }

    lora.close()
    lora.close() // harmless
    expect(Status.INVALID_HANDLE, "apply a closed adapter") { model.apply(lora) }
    expect(Status.INVALID_HANDLE, "destroy a stale adapter handle") { Native.adapterDestroy(lora.handle) }
    session.close()
    session.close()
    expect(Status.INVALID_HANDLE, "generate in a closed session") { session.generate(PROMPT) }
    expect(Status.INVALID_HANDLE, "cancel a closed session") { session.cancel() }
    expect(Status.INVALID_HANDLE, "destroy a stale session handle") { Native.sessionDestroy(session.handle) }

    // A session outlives its model's handle; the model goes when both are closed.
    val orphan = other.newSession()
    other.close()
    other.close()
    expect(Status.INVALID_HANDLE, "apply on a closed model") { other.apply(otherLora) }
    expect(Status.INVALID_HANDLE, "tokenize on a closed model") { other.tokenize(text) }
    check(orphan.generate(PROMPT, GREEDY.copy(maxTokens = 3)).generatedTokens == 3) { "the orphan session generates" }
    orphan.close()
    otherLora.close()

    // --- a panic in Rust is a Java exception, and the library goes on working -------------
    val p = expect(Status.INTERNAL, "a panic inside the library") { Native.panicForTest() }
    check(p.message!!.contains("panicForTest")) { "the panic's message: ${p.message}" }
    check(model.tokenize(text).contentEquals(want)) { "the library works after a panic" }

    shira.close()
    model.close()
    model.close()
    expect(Status.INVALID_HANDLE, "newSession on a closed model") { model.newSession() }
    expect(Status.INVALID_HANDLE, "destroy a stale model handle") { Native.modelDestroy(model.handle) }
}

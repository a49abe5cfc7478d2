package dev.sparrow

import java.io.Closeable
import java.util.concurrent.atomic.AtomicBoolean

/**
 * One conversation with a model: its KV cache, tokens and chat messages. One call at a time
 * (a concurrent call throws [Status.BUSY]); [cancel] may be called from any thread.
 *
 * Generation streams through a callback: kotlinx-coroutines (for a `Flow`) is not a
 * dependency of this library. Wrap [generate] in `callbackFlow` on a background dispatcher
 * if the app uses coroutines.
 */
class Session internal constructor(internal val handle: Long) : Closeable {
    private val closed = AtomicBoolean(false)

    /**
     * Generates after [prompt], calling [onToken] on this thread after each token with the text
     * it completed (empty while a character is unfinished) and its id, and once at the end
     * with id -1 if text was held back. Returning false from [onToken] cancels (that is not an
     * error: the result says [StopReason.CANCELLED]); an exception thrown by [onToken] stops
     * the generation and is rethrown here. Raw text continues the session's context.
     */
    @JvmOverloads
    fun generate(
        prompt: String,
        options: GenerateOptions = GenerateOptions(),
        onToken: (text: String, token: Int) -> Boolean = { _, _ -> true }
    ): GenerateResult {
        val sink = TokenSink(onToken)
        val o = options
        val r = Native.generate(
            handle, prompt, o.maxTokens, o.temperature, o.topK, o.topP, o.minP,
            o.repeatPenalty, o.repeatLastN, o.seed, o.stopAtEog, o.chat, sink
        )
        sink.error?.let { throw it }
        return GenerateResult(
            text = sink.text.toString(),
            tokens = sink.tokens,
            promptTokens = r[0].toInt(),
            generatedTokens = r[1].toInt(),
            stopReason = StopReason.of(r[2].toInt()),
            promptTokensPerSecond = r[3],
            decodeTokensPerSecond = r[4]
        )
    }

    /**
     * Stops the running generation at its next token, or, if none runs, the next one before
     * its first token. Safe from any thread and from the callback.
     */
    fun cancel() = Native.sessionCancel(handle)

    /** Forgets the conversation; the next generation starts from an empty context. */
    fun reset() = Native.sessionReset(handle)

    override fun close() {
        if (closed.compareAndSet(false, true)) Native.sessionDestroy(handle)
    }
}

/**
 * What the native generation calls per token (`onToken(String, int): boolean`, kept by
 * consumer-rules.pro). Collects the output and keeps the callback's exception for
 * [Session.generate] to rethrow, so no exception crosses the native frames.
 */
internal class TokenSink(private val callback: (String, Int) -> Boolean) {
    val text = StringBuilder()
    val tokens = ArrayList<Int>()
    var error: Throwable? = null

    fun onToken(text: String, token: Int): Boolean {
        this.text.append(text)
        if (token >= 0) tokens.add(token)
        return try {
            callback(text, token)
        } catch (t: Throwable) {
            error = t
            false
        }
    }
}

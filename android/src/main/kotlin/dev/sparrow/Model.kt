package dev.sparrow

import java.io.Closeable
import java.util.concurrent.ConcurrentHashMap
import java.util.concurrent.atomic.AtomicBoolean

/**
 * An opened GGUF model: weights (memory-mapped), tokenizer, and the adapters fused into them.
 * Usable from several threads; its calls and the generations of its sessions take turns.
 *
 * [close] releases the handle (twice is harmless); the weights are freed once the sessions
 * are closed too. A call on a closed model throws [SparrowException] ([Status.INVALID_HANDLE]).
 */
class Model private constructor(internal val handle: Long) : Closeable {
    private val closed = AtomicBoolean(false)

    /** The adapters loaded for this model, by handle, to answer [appliedAdapters]. */
    private val adapters = ConcurrentHashMap<Long, Adapter>()

    companion object {
        /** Opens the GGUF model at [path]. */
        @JvmStatic
        @JvmOverloads
        fun open(path: String, options: ModelOptions = ModelOptions()): Model =
            Model(Native.modelOpen(path, options.threads, options.contextSize, options.backend.code))
    }

    /**
     * The token ids of [text]. [addSpecial] adds the model's BOS token if it wants one;
     * [parseSpecial] reads special-token text such as `<|im_start|>` as those tokens.
     */
    @JvmOverloads
    fun tokenize(text: String, addSpecial: Boolean = false, parseSpecial: Boolean = false): IntArray =
        Native.tokenize(handle, text, addSpecial, parseSpecial)

    /** The text of [tokens] (special tokens shown as their text). */
    fun detokenize(tokens: IntArray): String = Native.detokenize(handle, tokens)

    /** A new conversation with room for [contextSize] tokens (0: the model's option). */
    @JvmOverloads
    fun newSession(contextSize: Int = 0): Session = Session(Native.sessionCreate(handle, contextSize))

    /**
     * Loads the adapter at [path] (a PEFT LoRA or SHiRA folder, a GGUF LoRA, or a sparse
     * delta) for this model and checks that it fits; nothing is applied yet.
     */
    fun loadAdapter(path: String): Adapter {
        val adapter = Adapter(Native.adapterLoad(handle, path))
        adapters[adapter.handle] = adapter
        return adapter
    }

    /** Fuses [adapter] into the weights at [scale], on top of those applied before. */
    @JvmOverloads
    fun apply(adapter: Adapter, scale: Float = 1f) = Native.adapterApply(handle, adapter.handle, scale)

    /** Removes [adapter], which must be the last applied; the weights are restored exactly. */
    fun unapply(adapter: Adapter) = Native.adapterUnapply(handle, adapter.handle)

    /** Replaces [from] (the last applied) by [to] at [scale]; if [to] does not fit, [from] stays. */
    @JvmOverloads
    fun switch(from: Adapter, to: Adapter, scale: Float = 1f) =
        Native.adapterSwitch(handle, from.handle, to.handle, scale)

    /** Changes the scale of the applied [adapter] (0 leaves the weights as without it). */
    fun setScale(adapter: Adapter, scale: Float) = Native.adapterSetScale(handle, adapter.handle, scale)

    /** Removes every adapter: the weights are the file's again, bit for bit. */
    fun unapplyAll() = Native.adapterUnapplyAll(handle)

    /** The adapters applied now, oldest first. */
    val appliedAdapters: List<Adapter>
        get() = Native.appliedAdapters(handle).map { id ->
            adapters[id] ?: throw SparrowException("adapter $id is applied but unknown", Status.INTERNAL.code)
        }

    override fun close() {
        if (closed.compareAndSet(false, true)) {
            adapters.clear()
            Native.modelDestroy(handle)
        }
    }
}

package dev.sparrow

/**
 * The native methods of libsparrow_ffi.so (ffi/src/jni.rs). Handles are the library's
 * registry ids: a closed or forged handle is refused with [Status.INVALID_HANDLE], never
 * dereferenced. Every failure is thrown as a [SparrowException].
 *
 * The names and signatures here are the JNI symbols `Java_dev_sparrow_Native_*`: keep them
 * in step with jni.rs (consumer-rules.pro keeps them through R8).
 */
internal object Native {
    init {
        System.loadLibrary("sparrow_ffi")
    }

    @JvmStatic external fun modelOpen(path: String, threads: Int, contextSize: Int, backend: Int): Long
    @JvmStatic external fun modelDestroy(model: Long)
    @JvmStatic external fun tokenize(model: Long, text: String, addSpecial: Boolean, parseSpecial: Boolean): IntArray
    @JvmStatic external fun detokenize(model: Long, tokens: IntArray): String

    @JvmStatic external fun sessionCreate(model: Long, contextSize: Int): Long
    @JvmStatic external fun sessionDestroy(session: Long)
    @JvmStatic external fun sessionReset(session: Long)
    @JvmStatic external fun sessionCancel(session: Long)

    /** The C defaults of the generation options (see jni.rs for the order). */
    @JvmStatic external fun generateOptionsDefault(): DoubleArray

    /**
     * Returns [prompt tokens, generated tokens, stop reason, prompt tokens/s, decode tokens/s].
     * [sink] may be null (no streaming).
     */
    @JvmStatic external fun generate(
        session: Long, prompt: String,
        maxTokens: Int, temperature: Float, topK: Int, topP: Float, minP: Float,
        repeatPenalty: Float, repeatLastN: Int, seed: Long, stopAtEog: Boolean, chat: Boolean,
        sink: TokenSink?
    ): DoubleArray

    @JvmStatic external fun adapterLoad(model: Long, path: String): Long
    @JvmStatic external fun adapterDestroy(adapter: Long)
    @JvmStatic external fun adapterApply(model: Long, adapter: Long, scale: Float)
    @JvmStatic external fun adapterUnapply(model: Long, adapter: Long)
    @JvmStatic external fun adapterSwitch(model: Long, from: Long, to: Long, scale: Float)
    @JvmStatic external fun adapterSetScale(model: Long, adapter: Long, scale: Float)
    @JvmStatic external fun adapterUnapplyAll(model: Long)
    @JvmStatic external fun appliedAdapters(model: Long): LongArray

    /**
     * TEST ONLY: panics in Rust, so that the JVM tests can check that a panic reaches Java as
     * a [SparrowException] with [Status.INTERNAL]. Nothing in the API calls it.
     */
    @JvmStatic external fun panicForTest()
}

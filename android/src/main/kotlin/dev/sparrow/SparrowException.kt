package dev.sparrow

/** The status of a failed call: the `SparrowStatus` codes of the C ABI (include/sparrow.h). */
enum class Status(val code: Int) {
    NULL(1),
    INVALID_HANDLE(2),
    INVALID_ARGUMENT(3),
    IO(4),
    MODEL(5),
    ADAPTER(6),
    TOKENIZER(7),
    BUFFER_TOO_SMALL(8),
    BUSY(9),
    UNSUPPORTED(10),
    CONTEXT_FULL(11),
    INTERNAL(12);

    companion object {
        /** The status of [code]; a code this version does not know reads as [INTERNAL]. */
        fun of(code: Int): Status = values().firstOrNull { it.code == code } ?: INTERNAL
    }
}

/**
 * A failed call into the library: [message] says what was wrong, [code] is the C status code
 * and [status] its meaning. A panic inside the library arrives as [Status.INTERNAL].
 *
 * Thrown by the native code through the constructor (String, int): keep it (consumer-rules.pro).
 */
class SparrowException(message: String, val code: Int) : RuntimeException(message) {
    val status: Status get() = Status.of(code)

    override fun toString(): String = "SparrowException($status): $message"
}

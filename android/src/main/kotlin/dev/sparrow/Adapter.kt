package dev.sparrow

import java.io.Closeable
import java.util.concurrent.atomic.AtomicBoolean

/**
 * An adapter loaded for one model ([Model.loadAdapter]); immutable, shareable between threads.
 * Applying it to another model throws [Status.ADAPTER]. [close] releases the handle (twice is
 * harmless); an adapter still applied stays fused until [Model.unapplyAll] or the model's close.
 */
class Adapter internal constructor(internal val handle: Long) : Closeable {
    private val closed = AtomicBoolean(false)

    override fun close() {
        if (closed.compareAndSet(false, true)) Native.adapterDestroy(handle)
    }
}

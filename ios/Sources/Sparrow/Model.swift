import Foundation
import SparrowFFI

/// A model: an opened GGUF file, its tokenizer, and the adapters fused into it.
///
/// May be used from several threads at once: its calls, and the generations of all its
/// sessions, take turns (one runs at a time). Inside a generation's token callback only
/// `tokenize`, `detokenize` and `Session.cancel()` may be used on the model; other calls
/// throw `.busy`.
public final class Model: @unchecked Sendable {
    let handle: OpaquePointer
    private let lock = NSLock()
    /// The adapters applied to the model, by handle: held so that an applied adapter lives
    /// as long as it is fused, and so that `appliedAdapters()` can return the objects.
    private var applied: [OpaquePointer: Adapter] = [:]

    /// Opens the GGUF model at `path` (memory-mapped; weights are not copied).
    public init(path: String, options: ModelOptions = ModelOptions()) throws {
        var c = options.cOptions
        var model: OpaquePointer?
        try check(sparrow_model_open(path, &c, &model))
        handle = try created(model, by: "sparrow_model_open")
    }

    deinit {
        do {
            try check(sparrow_model_destroy(handle))
        } catch {
            assertionFailure("\(error)")
        }
    }

    /// Tokenizes `text`. `addSpecial` adds the model's BOS (as at the start of a context);
    /// `parseSpecial` reads special-token text such as `<|im_start|>` as those tokens.
    public func tokenize(_ text: String, addSpecial: Bool = false, parseSpecial: Bool = false) throws -> [UInt32] {
        var capacity = text.utf8.count + 8
        while true {
            var count = 0
            var tokens = [UInt32](repeating: 0, count: capacity)
            let fits = try tokens.withUnsafeMutableBufferPointer { buffer in
                try check(
                    sparrow_tokenize(handle, text, addSpecial, parseSpecial, buffer.baseAddress, capacity, &count),
                    allowing: .bufferTooSmall)
            }
            if fits { return Array(tokens[0..<count]) }
            capacity = count
        }
    }

    /// Turns `tokens` into text (special tokens shown as their text).
    public func detokenize(_ tokens: [UInt32]) throws -> String {
        var capacity = tokens.count * 8 + 1
        while true {
            var length = 0
            var text = [CChar](repeating: 0, count: capacity)
            let fits = try tokens.withUnsafeBufferPointer { ids in
                try text.withUnsafeMutableBufferPointer { buffer in
                    try check(
                        sparrow_detokenize(handle, ids.baseAddress, ids.count, buffer.baseAddress, capacity, &length),
                        allowing: .bufferTooSmall)
                }
            }
            if fits {
                return text.withUnsafeBufferPointer { buffer in
                    String(decoding: UnsafeRawBufferPointer(start: UnsafeRawPointer(buffer.baseAddress), count: length),
                           as: UTF8.self)
                }
            }
            capacity = length + 1
        }
    }

    /// Creates a session with room for `contextSize` tokens (0: the model's option).
    public func makeSession(contextSize: UInt32 = 0) throws -> Session {
        try Session(model: self, contextSize: contextSize)
    }

    /// Loads the adapter at `path` for this model: a PEFT LoRA or SHiRA folder, a llama.cpp
    /// GGUF LoRA file, or a `.sdelta.safetensors` sparse delta. It is checked against the
    /// model here; nothing is applied.
    public func loadAdapter(path: String) throws -> Adapter {
        var adapter: OpaquePointer?
        try check(sparrow_adapter_load(handle, path, &adapter))
        return Adapter(handle: try created(adapter, by: "sparrow_adapter_load"), path: path)
    }

    /// Fuses `adapter` into the weights at `scale` (1 is the adapter as trained), on top of
    /// the adapters already applied. All or nothing. Reset the sessions whose output should
    /// depend only on the new weights.
    public func apply(_ adapter: Adapter, scale: Float = 1) throws {
        try check(sparrow_adapter_apply(handle, adapter.handle, scale))
        hold(adapter)
    }

    /// Removes `adapter`, which must be the last one applied: the weights' bytes are
    /// restored exactly.
    public func unapply(_ adapter: Adapter) throws {
        try check(sparrow_adapter_unapply(handle, adapter.handle))
        release(adapter)
    }

    /// Replaces `from` (the last applied) by `to` at `scale`. If `to` does not fit, `from`
    /// stays applied.
    public func switchAdapter(from: Adapter, to: Adapter, scale: Float = 1) throws {
        try check(sparrow_adapter_switch(handle, from.handle, to.handle, scale))
        release(from)
        hold(to)
    }

    /// Changes the scale of the applied `adapter` (the adapters above it are re-applied).
    public func setScale(of adapter: Adapter, to scale: Float) throws {
        try check(sparrow_adapter_set_scale(handle, adapter.handle, scale))
    }

    /// Removes every adapter: the weights are the file's again, bit for bit.
    public func unapplyAll() throws {
        try check(sparrow_adapter_unapply_all(handle))
        lock.lock()
        applied.removeAll()
        lock.unlock()
    }

    /// The adapters applied to the model, oldest first.
    public func appliedAdapters() throws -> [Adapter] {
        var capacity = 4
        while true {
            var count = 0
            var handles = [OpaquePointer?](repeating: nil, count: capacity)
            let fits = try handles.withUnsafeMutableBufferPointer { buffer in
                try check(sparrow_model_applied_adapters(handle, buffer.baseAddress, capacity, &count),
                          allowing: .bufferTooSmall)
            }
            if fits {
                lock.lock()
                defer { lock.unlock() }
                return try handles[0..<count].map { (h: OpaquePointer?) throws -> Adapter in
                    guard let h, let adapter = applied[h] else {
                        // Only when adapter calls on this model race each other on several
                        // threads.
                        throw SparrowError(
                            code: .internalError,
                            message: "an applied adapter was applied outside this Model object")
                    }
                    return adapter
                }
            }
            capacity = count
        }
    }

    private func hold(_ adapter: Adapter) {
        lock.lock()
        applied[adapter.handle] = adapter
        lock.unlock()
    }

    private func release(_ adapter: Adapter) {
        lock.lock()
        applied[adapter.handle] = nil
        lock.unlock()
    }
}

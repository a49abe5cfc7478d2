import Foundation
import SparrowFFI

/// A session: one conversation (KV cache, tokens, chat messages) with a model.
///
/// One call at a time: a call made while another runs on the same session throws `.busy`.
/// `cancel()` may be called from any thread at any time.
public final class Session: @unchecked Sendable {
    let handle: OpaquePointer
    /// The model of the session (held: the session keeps it open).
    public let model: Model

    /// Creates a session with room for `contextSize` tokens (0: the model's option).
    public init(model: Model, contextSize: UInt32 = 0) throws {
        var session: OpaquePointer?
        try check(sparrow_session_create(model.handle, contextSize, &session))
        handle = try created(session, by: "sparrow_session_create")
        self.model = model
    }

    deinit {
        do {
            try check(sparrow_session_destroy(handle))
        } catch {
            assertionFailure("\(error)")
        }
    }

    /// Forgets the conversation. Call it after changing adapters for output that depends
    /// only on the new weights.
    public func reset() throws {
        try check(sparrow_session_reset(handle))
    }

    /// Stops the generation running in the session at its next token, or, if none runs, the
    /// next one before its first token. Safe from any thread and from a token callback.
    public func cancel() throws {
        try check(sparrow_session_cancel(handle))
    }

    /// Generates after `prompt`, blocking the calling thread. `onToken` runs on this thread
    /// after each generated token with the text it completed (empty while a character is
    /// unfinished) and the token id, and once at the end with a nil id if text was held back;
    /// it returns `true` to go on and `false` to stop (the stop reason is then
    /// `.cancelled`). A cancellation is not an error.
    @discardableResult
    public func generate(
        prompt: String,
        options: GenerateOptions = GenerateOptions(),
        onToken: ((_ text: String, _ token: Int32?) -> Bool)? = nil
    ) throws -> GenerateResult {
        var c = options.cOptions
        var result = SparrowGenerateResult()
        if let onToken {
            let sink = TokenSink(onToken)
            try withExtendedLifetime(sink) {
                let context = Unmanaged.passUnretained(sink).toOpaque()
                try check(sparrow_session_generate(handle, prompt, &c, tokenCallback, context, &result))
            }
        } else {
            try check(sparrow_session_generate(handle, prompt, &c, nil, nil, &result))
        }
        return GenerateResult(result)
    }

    /// Generates after `prompt` on a thread of its own, streaming the text as it comes
    /// (empty pieces are left out). When the consumer stops (leaves its `for try await`
    /// loop, or its task is cancelled), the generation is cancelled with
    /// `sparrow_session_cancel` at its next token. The session stays busy until the
    /// generation has stopped.
    public func stream(
        prompt: String,
        options: GenerateOptions = GenerateOptions()
    ) -> AsyncThrowingStream<String, Error> {
        AsyncThrowingStream { continuation in
            let stop = StopFlag()
            continuation.onTermination = { termination in
                if case .cancelled = termination { stop.set() }
            }
            let thread = Thread { [self] in
                do {
                    try generate(prompt: prompt, options: options) { text, _ in
                        if stop.isSet {
                            // Called from inside the generation, the cancel reaches the
                            // generation that runs now; from the consumer's thread it could
                            // land after the generation ended and stop the next one.
                            do {
                                try self.cancel()
                            } catch {
                                return false
                            }
                            return true
                        }
                        if !text.isEmpty { continuation.yield(text) }
                        return true
                    }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            thread.name = "sparrow.generate"
            thread.start()
        }
    }
}

/// The Swift closure of a generation, passed to the C callback as its context.
private final class TokenSink {
    let onToken: (String, Int32?) -> Bool

    init(_ onToken: @escaping (String, Int32?) -> Bool) {
        self.onToken = onToken
    }
}

/// The C callback of every generation: a non-capturing function that finds its closure in
/// the context pointer.
private let tokenCallback: SparrowTokenCallback = { context, text, length, token in
    guard let context else { return 1 }
    let sink = Unmanaged<TokenSink>.fromOpaque(context).takeUnretainedValue()
    let piece = text.map {
        String(decoding: UnsafeRawBufferPointer(start: UnsafeRawPointer($0), count: length), as: UTF8.self)
    } ?? ""
    return sink.onToken(piece, token < 0 ? nil : token) ? 0 : 1
}

/// Set once by a stream's consumer when it stops; read by the generation's callback.
private final class StopFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false

    func set() {
        lock.lock()
        value = true
        lock.unlock()
    }

    var isSet: Bool {
        lock.lock()
        defer { lock.unlock() }
        return value
    }
}

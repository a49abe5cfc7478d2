import SparrowFFI

/// The backend a model runs on (`SparrowBackend`).
public struct Backend: RawRepresentable, Hashable, Sendable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    /// The best available: the CPU in this build.
    public static let auto = Backend(rawValue: cValue(SPARROW_BACKEND_AUTO))
    public static let cpu = Backend(rawValue: cValue(SPARROW_BACKEND_CPU))
    /// Not in this build: opening a model with it throws `.unsupported`.
    public static let gpu = Backend(rawValue: cValue(SPARROW_BACKEND_GPU))
}

/// Why a generation stopped (`SparrowStopReason`).
public struct StopReason: RawRepresentable, Hashable, Sendable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    /// `maxTokens` tokens were generated.
    public static let maxTokens = StopReason(rawValue: cValue(SPARROW_STOP_MAX_TOKENS))
    /// The model produced an end-of-generation token.
    public static let endOfGeneration = StopReason(rawValue: cValue(SPARROW_STOP_EOG))
    /// The token callback returned `false`, or the session was cancelled.
    public static let cancelled = StopReason(rawValue: cValue(SPARROW_STOP_CANCELLED))
    /// The session's context is full.
    public static let contextFull = StopReason(rawValue: cValue(SPARROW_STOP_CONTEXT_FULL))
}

/// Options for opening a model (`SparrowModelOptions`); `ModelOptions()` has the library's
/// defaults.
public struct ModelOptions: Equatable, Sendable {
    /// Worker threads for the matrix products; 0 uses one per core.
    public var threads: UInt32
    /// Context size (tokens) of sessions created with `contextSize` 0; 0 uses the model's
    /// training context, capped at 4096.
    public var contextSize: UInt32
    public var backend: Backend

    /// The library's defaults (`sparrow_model_options_default()`): all cores, the model's
    /// context (at most 4096), automatic backend.
    public init() {
        self.init(sparrow_model_options_default())
    }

    init(_ c: SparrowModelOptions) {
        threads = c.n_threads
        contextSize = c.n_ctx
        backend = Backend(rawValue: c.backend)
    }

    var cOptions: SparrowModelOptions {
        var c = sparrow_model_options_default()
        c.n_threads = threads
        c.n_ctx = contextSize
        c.backend = backend.rawValue
        return c
    }
}

/// Options for a generation (`SparrowGenerateOptions`); `GenerateOptions()` has the library's
/// defaults.
public struct GenerateOptions: Equatable, Sendable {
    /// Tokens to generate at most.
    public var maxTokens: UInt32
    /// 0 is greedy (the most likely token).
    public var temperature: Float
    /// 0 keeps every token.
    public var topK: UInt32
    /// In [0, 1]; 1 keeps every token.
    public var topP: Float
    /// In [0, 1]; 0 keeps every token.
    public var minP: Float
    /// 1 is no penalty.
    public var repeatPenalty: Float
    /// How many recent tokens the penalty looks at.
    public var repeatLastN: UInt32
    /// Seed of the sampler.
    public var seed: UInt64
    /// Stop at the model's end-of-generation tokens.
    public var stopAtEndOfGeneration: Bool
    /// The prompt is a user message rendered with the model's chat template, and the reply
    /// is added to the session's conversation. Otherwise the prompt is raw text that
    /// continues the session's context.
    public var chat: Bool

    /// The library's defaults (`sparrow_generate_options_default()`): 128 tokens,
    /// temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, no repeat penalty, seed 0x5eed,
    /// stop at end of generation, raw text.
    public init() {
        self.init(sparrow_generate_options_default())
    }

    init(_ c: SparrowGenerateOptions) {
        maxTokens = c.max_tokens
        temperature = c.temperature
        topK = c.top_k
        topP = c.top_p
        minP = c.min_p
        repeatPenalty = c.repeat_penalty
        repeatLastN = c.repeat_last_n
        seed = c.seed
        stopAtEndOfGeneration = c.stop_at_eog
        chat = c.chat
    }

    var cOptions: SparrowGenerateOptions {
        var c = sparrow_generate_options_default()
        c.max_tokens = maxTokens
        c.temperature = temperature
        c.top_k = topK
        c.top_p = topP
        c.min_p = minP
        c.repeat_penalty = repeatPenalty
        c.repeat_last_n = repeatLastN
        c.seed = seed
        c.stop_at_eog = stopAtEndOfGeneration
        c.chat = chat
        return c
    }
}

/// What a generation did (`SparrowGenerateResult`).
public struct GenerateResult: Equatable, Sendable {
    /// Tokens evaluated as the prompt.
    public var promptTokens: UInt32
    /// Tokens sampled (an end-of-generation token included).
    public var generatedTokens: UInt32
    public var stopReason: StopReason
    public var promptTokensPerSecond: Double
    public var decodeTokensPerSecond: Double

    init(_ c: SparrowGenerateResult) {
        promptTokens = c.prompt_tokens
        generatedTokens = c.generated_tokens
        stopReason = StopReason(rawValue: c.stop_reason)
        promptTokensPerSecond = c.prompt_tokens_per_s
        decodeTokensPerSecond = c.decode_tokens_per_s
    }
}

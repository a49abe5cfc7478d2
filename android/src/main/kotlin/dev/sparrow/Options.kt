package dev.sparrow

/** Where a model runs (`SparrowBackend`). */
enum class Backend(internal val code: Int) {
    /** The best available: the CPU in this build. */
    AUTO(0),
    CPU(1),
    /** Not in this build: opening with it throws [Status.UNSUPPORTED]. */
    GPU(2)
}

/** Options of [Model.open]; the defaults are those of `sparrow_model_options_default()`. */
data class ModelOptions(
    /** Worker threads; 0 uses one per core. */
    val threads: Int = 0,
    /** Context size of new sessions; 0 uses the model's training context, at most 4096. */
    val contextSize: Int = 0,
    val backend: Backend = Backend.AUTO
)

/**
 * Options of [Session.generate]; the defaults are those of
 * `sparrow_generate_options_default()`: 128 tokens, temperature 0.8, top-k 40, top-p 0.95,
 * min-p 0.05, no repeat penalty (1.0, last 64 tokens), seed 0x5eed, stop at the end of
 * generation, raw text.
 */
data class GenerateOptions(
    val maxTokens: Int = 128,
    /** 0 is greedy (always the most likely token). */
    val temperature: Float = 0.8f,
    /** 0 keeps every token. */
    val topK: Int = 40,
    /** In [0, 1]; 1 keeps every token. */
    val topP: Float = 0.95f,
    /** In [0, 1]; 0 keeps every token. */
    val minP: Float = 0.05f,
    /** 1 is no penalty. */
    val repeatPenalty: Float = 1.0f,
    val repeatLastN: Int = 64,
    val seed: Long = 0x5eed,
    /** Stop at the model's end-of-generation tokens. */
    val stopAtEog: Boolean = true,
    /**
     * The prompt is a user message: the conversation is rendered with the model's chat
     * template and the reply added to it. Otherwise the prompt is raw text continuing the
     * session's context.
     */
    val chat: Boolean = false
) {
    companion object {
        /** Greedy decoding: the most likely token each step, so the output is repeatable. */
        fun greedy(maxTokens: Int = 128) = GenerateOptions(maxTokens = maxTokens, temperature = 0f)
    }
}

/** Why a generation stopped (`SparrowStopReason`). */
enum class StopReason {
    MAX_TOKENS,
    END_OF_GENERATION,
    /** The callback returned false, or [Session.cancel] was called. */
    CANCELLED,
    CONTEXT_FULL;

    internal companion object {
        fun of(code: Int): StopReason = values()[code]
    }
}

/** What [Session.generate] did. */
data class GenerateResult(
    /** The text generated (all that the callback received). */
    val text: String,
    /** The generated token ids, in order. */
    val tokens: List<Int>,
    /** Tokens evaluated as the prompt. */
    val promptTokens: Int,
    /** Tokens sampled (an end-of-generation token included). */
    val generatedTokens: Int,
    val stopReason: StopReason,
    val promptTokensPerSecond: Double,
    val decodeTokensPerSecond: Double
)

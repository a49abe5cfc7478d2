import SparrowFFI

/// The value of a C enum constant or status. The constants of sparrow.h may be imported as
/// integers or as RawRepresentable structs depending on the Clang importer; both give the
/// same Int32.
@inline(__always)
func cValue<T: BinaryInteger>(_ value: T) -> Int32 {
    Int32(truncatingIfNeeded: value)
}

@inline(__always)
func cValue<T: RawRepresentable>(_ value: T) -> Int32 where T.RawValue: BinaryInteger {
    Int32(truncatingIfNeeded: value.rawValue)
}

/// A failed call of the C ABI: its status and the message of `sparrow_last_error()`.
public struct SparrowError: Error, Equatable, CustomStringConvertible, Sendable {
    /// A `SparrowStatus` value.
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        public let rawValue: Int32
        public init(rawValue: Int32) { self.rawValue = rawValue }

        public static let ok = Code(rawValue: cValue(SPARROW_OK))
        /// A required pointer argument was null.
        public static let null = Code(rawValue: cValue(SPARROW_ERR_NULL))
        /// A destroyed, never created, or wrong-kind handle.
        public static let invalidHandle = Code(rawValue: cValue(SPARROW_ERR_INVALID_HANDLE))
        /// An argument out of range or inconsistent, or text that is not UTF-8.
        public static let invalidArgument = Code(rawValue: cValue(SPARROW_ERR_INVALID_ARGUMENT))
        /// A file could not be opened or read.
        public static let io = Code(rawValue: cValue(SPARROW_ERR_IO))
        /// The model file is malformed, truncated, or lacks what the model needs.
        public static let model = Code(rawValue: cValue(SPARROW_ERR_MODEL))
        /// An adapter could not be read, does not fit the model, or is not in the state the
        /// call needs.
        public static let adapter = Code(rawValue: cValue(SPARROW_ERR_ADAPTER))
        /// Tokenization or chat-template failure.
        public static let tokenizer = Code(rawValue: cValue(SPARROW_ERR_TOKENIZER))
        /// An output buffer was too small (the Swift API retries with the size it needs).
        public static let bufferTooSmall = Code(rawValue: cValue(SPARROW_ERR_BUFFER_TOO_SMALL))
        /// The session is in use by another call, or the model by this thread's generation
        /// callback.
        public static let busy = Code(rawValue: cValue(SPARROW_ERR_BUSY))
        /// A feature this build or this model does not support.
        public static let unsupported = Code(rawValue: cValue(SPARROW_ERR_UNSUPPORTED))
        /// The prompt does not fit in what is left of the session's context.
        public static let contextFull = Code(rawValue: cValue(SPARROW_ERR_CONTEXT_FULL))
        /// An internal error of the library (a bug).
        public static let internalError = Code(rawValue: cValue(SPARROW_ERR_INTERNAL))

        public var description: String {
            switch self {
            case .ok: return "ok"
            case .null: return "null"
            case .invalidHandle: return "invalidHandle"
            case .invalidArgument: return "invalidArgument"
            case .io: return "io"
            case .model: return "model"
            case .adapter: return "adapter"
            case .tokenizer: return "tokenizer"
            case .bufferTooSmall: return "bufferTooSmall"
            case .busy: return "busy"
            case .unsupported: return "unsupported"
            case .contextFull: return "contextFull"
            case .internalError: return "internalError"
            default: return "status \(rawValue)"
            }
        }
    }

    public let code: Code
    /// What was wrong, as the library said it.
    public let message: String

    public init(code: Code, message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "sparrow error \(code): \(message)" }
}

/// Checks the status of a C call: success returns `true`; a status equal to `allowing`
/// returns `false` (the buffer-size protocol of tokenize, detokenize and applied adapters);
/// any other status throws a `SparrowError` with the message of `sparrow_last_error()`.
/// Every call of the C ABI goes through here.
@discardableResult
func check<S: BinaryInteger>(_ status: S, allowing: SparrowError.Code? = nil) throws -> Bool {
    let code = SparrowError.Code(rawValue: cValue(status))
    if code == .ok { return true }
    if let allowing, code == allowing { return false }
    throw SparrowError(code: code, message: String(cString: sparrow_last_error()))
}

@discardableResult
func check<S: RawRepresentable>(_ status: S, allowing: SparrowError.Code? = nil) throws -> Bool
where S.RawValue: BinaryInteger {
    try check(status.rawValue, allowing: allowing)
}

/// A handle that a successful C call must have written.
func created(_ handle: OpaquePointer?, by function: String) throws -> OpaquePointer {
    guard let handle else {
        throw SparrowError(code: .internalError, message: "\(function) succeeded without a handle")
    }
    return handle
}

/// The version of the sparrow library.
public let sparrowVersion: String = String(cString: sparrow_version())

import SparrowFFI

/// An adapter loaded for one model (`Model.loadAdapter(path:)`), checked against it.
/// Immutable: may be shared between threads. While applied, its model holds it.
public final class Adapter: @unchecked Sendable {
    let handle: OpaquePointer
    /// The path it was loaded from.
    public let path: String

    init(handle: OpaquePointer, path: String) {
        self.handle = handle
        self.path = path
    }

    deinit {
        do {
            try check(sparrow_adapter_destroy(handle))
        } catch {
            assertionFailure("\(error)")
        }
    }
}

// The flow of the C client (ffi/tests/c/client.c) through the Swift API, on the tiny llama of
// tests/fixtures. Run on macOS after ios/build-xcframework.sh:
//
//   SPARROW_FIXTURES=$PWD/tests/fixtures swift test --package-path ios
//
// Without SPARROW_FIXTURES every test fails (it does not skip).
import Foundation
import XCTest
import Sparrow

/// Paths of the fixtures, from the environment variable SPARROW_FIXTURES.
struct Fixtures {
    let root: URL

    init() throws {
        guard let dir = ProcessInfo.processInfo.environment["SPARROW_FIXTURES"], !dir.isEmpty else {
            throw FixtureError(
                message: "SPARROW_FIXTURES is not set; point it at the repository's tests/fixtures")
        }
        root = URL(fileURLWithPath: dir)
    }

    func path(_ relative: String) -> String { root.appendingPathComponent(relative).path }

    var llamaF32: String { path("tiny/tiny-llama.f32.gguf") }
    var llamaQ8: String { path("tiny/tiny-llama.q8_0.gguf") }
    var qwen: String { path("tiny/tiny-qwen2.f32.gguf") }
    var lora: String { path("adapters/lora_plain.lora.f32.gguf") }
    var shira: String { path("adapters/shira") }

    /// A file that is not a GGUF model.
    func notAModel() throws -> String {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("sparrow-not-a-model.gguf")
        try Data("this is not a GGUF file\n".utf8).write(to: url)
        return url.path
    }
}

struct FixtureError: Error, CustomStringConvertible {
    let message: String
    var description: String { message }
}

/// Ids from the model's own tokenizer in transformers (tests/fixtures/tiny/index.json).
let text = "The little bird sang a song to the sun."
let wantIds: [UInt32] = [316, 278, 283, 450, 366, 267, 298, 259, 267, 269, 73, 348, 262, 352, 16]
let prompt = "The little bird"

func greedy(_ maxTokens: UInt32) -> GenerateOptions {
    var o = GenerateOptions()
    o.temperature = 0
    o.maxTokens = maxTokens
    o.stopAtEndOfGeneration = false
    return o
}

/// Asserts that `body` throws a SparrowError with `code` and a message.
func assertThrows<T>(
    _ code: SparrowError.Code, _ body: @autoclosure () throws -> T,
    file: StaticString = #filePath, line: UInt = #line
) {
    do {
        _ = try body()
        XCTFail("expected a \(code) error, the call succeeded", file: file, line: line)
    } catch let error as SparrowError {
        XCTAssertEqual(error.code, code, "\(error)", file: file, line: line)
        XCTAssertFalse(error.message.isEmpty, "\(code) error without a message", file: file, line: line)
    } catch {
        XCTFail("expected a SparrowError, got \(error)", file: file, line: line)
    }
}

/// What a generation streamed through its callback.
struct Streamed {
    var ids: [Int32] = []
    var text = ""
    var result: GenerateResult?
}

/// Greedy generation of `n` tokens after `prompt` in a reset session.
func runGreedy(_ session: Session, _ n: UInt32, file: StaticString = #filePath, line: UInt = #line) throws -> Streamed {
    var s = Streamed()
    try session.reset()
    var ids: [Int32] = []
    var streamed = ""
    let result = try session.generate(prompt: prompt, options: greedy(n)) { piece, token in
        streamed += piece
        if let token { ids.append(token) }
        return true
    }
    s.ids = ids
    s.text = streamed
    s.result = result
    XCTAssertEqual(s.result?.stopReason, .maxTokens, file: file, line: line)
    XCTAssertEqual(s.result?.generatedTokens, n, file: file, line: line)
    XCTAssertEqual(s.ids.count, Int(n), file: file, line: line)
    return s
}

final class SparrowTests: XCTestCase {
    var fixtures: Fixtures!

    override func setUpWithError() throws {
        fixtures = try Fixtures()
    }

    func openModel() throws -> Model {
        var options = ModelOptions()
        options.threads = 2
        options.contextSize = 128
        return try Model(path: fixtures.llamaF32, options: options)
    }

    func testVersionAndDefaults() {
        XCTAssertFalse(sparrowVersion.isEmpty)
        let g = GenerateOptions()
        XCTAssertEqual(g.maxTokens, 128)
        XCTAssertEqual(g.temperature, 0.8, accuracy: 1e-6)
        XCTAssertEqual(g.topK, 40)
        XCTAssertEqual(g.seed, 0x5eed)
        XCTAssertTrue(g.stopAtEndOfGeneration)
        XCTAssertFalse(g.chat)
        let m = ModelOptions()
        XCTAssertEqual(m.threads, 0)
        XCTAssertEqual(m.backend, .auto)
    }

    func testOpenErrors() throws {
        do {
            _ = try Model(path: "/nonexistent/model.gguf")
            XCTFail("opened a missing file")
        } catch let error as SparrowError {
            XCTAssertEqual(error.code, .io)
            XCTAssertTrue(error.message.contains("/nonexistent/model.gguf"), "the message names the path: \(error)")
        }
        assertThrows(.model, try Model(path: fixtures.notAModel()))
        var options = ModelOptions()
        options.backend = .gpu
        assertThrows(.unsupported, try Model(path: fixtures.llamaF32, options: options))
        options.backend = Backend(rawValue: 42)
        assertThrows(.invalidArgument, try Model(path: fixtures.llamaF32, options: options))
    }

    func testTokens() throws {
        let model = try openModel()
        XCTAssertEqual(try model.tokenize(text), wantIds)
        // This model's metadata asks for no BOS.
        XCTAssertEqual(try model.tokenize(text, addSpecial: true), wantIds)
        XCTAssertEqual(try model.tokenize("<|im_start|>", parseSpecial: true), [1])
        XCTAssertEqual(try model.tokenize(""), [])
        // A longer text round-trips too.
        let long = String(repeating: "a b c d ", count: 64)
        XCTAssertEqual(try model.detokenize(model.tokenize(long)), long)
        XCTAssertEqual(try model.detokenize(wantIds), text)
        XCTAssertEqual(try model.detokenize([]), "")
        assertThrows(.invalidArgument, try model.detokenize([512]))
    }

    func testGreedyIsRepeatable() throws {
        let model = try openModel()
        let session = try model.makeSession()
        let base = try runGreedy(session, 12)
        XCTAssertEqual(try model.detokenize(base.ids.map { UInt32($0) }), base.text)
        let again = try runGreedy(session, 12)
        XCTAssertEqual(base.ids, again.ids)

        // Two turns: the second continues the first.
        try session.reset()
        let first = try session.generate(prompt: prompt, options: greedy(6))
        let second = try session.generate(prompt: " and", options: greedy(6))
        XCTAssertEqual(first.generatedTokens, 6)
        XCTAssertEqual(second.generatedTokens, 6)

        // Sampling with a seed is repeatable.
        var sampled = GenerateOptions()
        sampled.maxTokens = 10
        sampled.stopAtEndOfGeneration = false
        sampled.seed = 7
        var a: [Int32] = [], b: [Int32] = []
        try session.reset()
        try session.generate(prompt: prompt, options: sampled) { _, t in if let t { a.append(t) }; return true }
        try session.reset()
        try session.generate(prompt: prompt, options: sampled) { _, t in if let t { b.append(t) }; return true }
        XCTAssertEqual(a, b)
        XCTAssertEqual(a.count, 10)
    }

    func testStream() async throws {
        let model = try openModel()
        let session = try model.makeSession()
        let base = try runGreedy(session, 12)
        try session.reset()
        var streamed = ""
        for try await piece in session.stream(prompt: prompt, options: greedy(12)) {
            XCTAssertFalse(piece.isEmpty)
            streamed += piece
        }
        XCTAssertEqual(streamed, base.text)

        // A consumer that stops early cancels the generation; the cancel does not outlive it.
        try session.reset()
        var pieces = 0
        for try await _ in session.stream(prompt: prompt, options: greedy(40)) {
            pieces += 1
            if pieces == 2 { break }
        }
        XCTAssertEqual(pieces, 2)
        let after = try waitUntilFree { try runGreedy(session, 12) }
        XCTAssertEqual(after.ids, base.ids, "generation after a stopped stream")

        // Errors reach the consumer.
        var invalid = greedy(4)
        invalid.topP = 2
        do {
            for try await _ in session.stream(prompt: "bad", options: invalid) {}
            XCTFail("the stream did not throw")
        } catch let error as SparrowError {
            XCTAssertEqual(error.code, .invalidArgument)
        }
    }

    /// Retries `body` while the session is still busy with a generation that was stopped.
    func waitUntilFree<T>(_ body: () throws -> T) throws -> T {
        for _ in 0..<500 {
            do {
                return try body()
            } catch let error as SparrowError where error.code == .busy {
                Thread.sleep(forTimeInterval: 0.01)
            }
        }
        return try body()
    }

    func testCancel() throws {
        let model = try openModel()
        let session = try model.makeSession()
        let base = try runGreedy(session, 12)

        // By the callback's return value.
        var n = 0
        try session.reset()
        var r = try session.generate(prompt: prompt, options: greedy(12)) { _, t in
            if t != nil { n += 1 }
            return n < 3
        }
        XCTAssertEqual(r.stopReason, .cancelled)
        XCTAssertEqual(n, 3)
        XCTAssertEqual(r.generatedTokens, 3)

        // With cancel() from inside the callback; re-entry is refused, tokenizing allowed.
        n = 0
        try session.reset()
        r = try session.generate(prompt: prompt, options: greedy(12)) { _, t in
            guard t != nil else { return true }
            n += 1
            if n == 1 {
                assertThrows(.busy, try model.unapplyAll())
                assertThrows(.busy, try session.reset())
                assertThrows(.busy, try session.generate(prompt: "x"))
                XCTAssertEqual(try? model.tokenize("hi").isEmpty, false)
            }
            if n == 4 { XCTAssertNoThrow(try session.cancel()) }
            return true
        }
        XCTAssertEqual(r.stopReason, .cancelled)
        XCTAssertEqual(n, 4)
        XCTAssertEqual(try runGreedy(session, 12).ids, base.ids, "the cancel was consumed")

        // A cancel with no generation running stops the next one before its first token.
        try session.reset()
        try session.cancel()
        n = 0
        r = try session.generate(prompt: prompt, options: greedy(12)) { _, t in
            if t != nil { n += 1 }
            return true
        }
        XCTAssertEqual(r.stopReason, .cancelled)
        XCTAssertEqual(n, 0)

        // From another thread, while the generation runs.
        let started = DispatchSemaphore(value: 0)
        let cancelled = DispatchSemaphore(value: 0)
        let canceller = Thread {
            started.wait()
            assertThrows(.busy, try session.reset())
            XCTAssertNoThrow(try session.cancel())
            cancelled.signal()
        }
        canceller.start()
        n = 0
        try session.reset()
        r = try session.generate(prompt: prompt, options: greedy(40)) { _, t in
            guard t != nil else { return true }
            n += 1
            if n == 1 {
                started.signal()
                cancelled.wait()
            }
            return true
        }
        XCTAssertEqual(r.stopReason, .cancelled)
        XCTAssertEqual(n, 1)
    }

    func testGenerationErrors() throws {
        let model = try openModel()
        let session = try model.makeSession()
        assertThrows(.invalidArgument, try session.generate(prompt: "", options: greedy(3)))
        var o = greedy(4)
        o.chat = true  // the tiny model has no chat template
        assertThrows(.unsupported, try session.generate(prompt: prompt, options: o))
        let small = try model.makeSession(contextSize: 8)
        assertThrows(.contextFull, try small.generate(prompt: text))
        let r = try small.generate(prompt: "The", options: greedy(40))
        XCTAssertEqual(r.stopReason, .contextFull)
    }

    func testAdapters() throws {
        let model = try openModel()
        let session = try model.makeSession()
        let base = try runGreedy(session, 12)

        assertThrows(.io, try model.loadAdapter(path: "/nonexistent/adapter.gguf"))
        assertThrows(.adapter, try model.loadAdapter(path: fixtures.notAModel()))
        let lora = try model.loadAdapter(path: fixtures.lora)
        let shira = try model.loadAdapter(path: fixtures.shira)

        try model.apply(lora, scale: 1)
        let withLora = try runGreedy(session, 12)
        XCTAssertNotEqual(withLora.ids, base.ids, "the lora changes the output")
        assertThrows(.adapter, try model.apply(lora))  // already applied
        assertThrows(.invalidArgument, try model.apply(shira, scale: .nan))
        try model.apply(shira)
        _ = try runGreedy(session, 12)  // stacked: 12 greedy tokens
        XCTAssertEqual(try model.appliedAdapters().map { ObjectIdentifier($0) },
                       [ObjectIdentifier(lora), ObjectIdentifier(shira)])
        assertThrows(.adapter, try model.unapply(lora))  // not the last applied
        try model.unapply(shira)
        XCTAssertEqual(try runGreedy(session, 12).ids, withLora.ids, "unapplying shira gives the lora output back")
        assertThrows(.adapter, try model.unapply(shira))  // not applied

        try model.switchAdapter(from: lora, to: shira, scale: 1)
        let withShira = try runGreedy(session, 12)
        XCTAssertNotEqual(withShira.ids, base.ids, "shira changes the output")
        XCTAssertEqual(try model.appliedAdapters().map { ObjectIdentifier($0) }, [ObjectIdentifier(shira)])
        try model.setScale(of: shira, to: 0)
        XCTAssertEqual(try runGreedy(session, 12).ids, base.ids, "an adapter at scale 0 changes nothing")
        try model.setScale(of: shira, to: 1)
        XCTAssertEqual(try runGreedy(session, 12).ids, withShira.ids, "scale back to 1")
        assertThrows(.adapter, try model.setScale(of: lora, to: 2))  // not applied
        try model.unapplyAll()
        XCTAssertTrue(try model.appliedAdapters().isEmpty)
        XCTAssertEqual(try runGreedy(session, 12).ids, base.ids, "unapplyAll restores the base output")
    }

    func testWrongAdapters() throws {
        let model = try openModel()
        let lora = try model.loadAdapter(path: fixtures.lora)
        let other = try Model(path: fixtures.llamaQ8)
        let otherLora = try other.loadAdapter(path: fixtures.lora)
        assertThrows(.adapter, try model.apply(otherLora))
        try model.apply(lora)
        assertThrows(.adapter, try model.switchAdapter(from: lora, to: otherLora))
        XCTAssertEqual(try model.appliedAdapters().map { ObjectIdentifier($0) }, [ObjectIdentifier(lora)],
                       "a refused switch keeps the current adapter")
        let qwen = try Model(path: fixtures.qwen)
        assertThrows(.adapter, try qwen.loadAdapter(path: fixtures.lora))
        // The adapter of the other model works there.
        XCTAssertNoThrow(try other.apply(otherLora))
    }
}

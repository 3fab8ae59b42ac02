// The fuzz targets in ordinary builds: each replays its checked-in seed corpus
// (Tools/fuzz/corpus/TARGET, written from FuzzTargets.seeds when IOPF_WRITE_FUZZ_SEEDS=1)
// and a few thousand seeded mutations of it. A violated property traps, failing the run.
// The real fuzzing, with coverage and ASan, is Tools/fuzz.sh.

import Foundation
import Testing
import IOPFTestSupport
import IOPFFuzzing

@Suite(.timeLimit(.minutes(15))) struct FuzzReplayTests {
    static let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../../Tools/fuzz/corpus").standardized

    @Test(arguments: FuzzTargets.names)
    func theCheckedInCorpusReplaysCleanly(target: String) throws {
        let dir = Self.corpus.appendingPathComponent(target)
        let seeds = FuzzTargets.seeds(target)
        #expect(!seeds.isEmpty)
        if ProcessInfo.processInfo.environment["IOPF_WRITE_FUZZ_SEEDS"] == "1" {
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            for (i, s) in seeds.enumerated() { try Data(s).write(to: dir.appendingPathComponent("seed-\(i)")) }
        }
        let files = try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted()
        #expect(
            files.count >= seeds.count,
            "the corpus of \(target) lacks its seeds: IOPF_WRITE_FUZZ_SEEDS=1 swift test --filter FuzzReplay")
        var inputs: [[UInt8]] = try files.map { [UInt8](try Data(contentsOf: dir.appendingPathComponent($0))) }
        // Seeded mutations: flips, truncations, splices.
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        func next() -> UInt64 { state = state &* 6364136223846793005 &+ 1442695040888963407; return state >> 11 }
        for i in 0..<1000 {
            var b = inputs[i % inputs.count]
            switch next() % 4 {
            case 0 where !b.isEmpty: b[Int(next() % UInt64(b.count))] ^= UInt8(truncatingIfNeeded: next())
            case 1 where !b.isEmpty: b.removeLast(Int(next() % UInt64(b.count)))
            case 2: b += inputs[Int(next() % UInt64(inputs.count))]
            default: b.insert(UInt8(truncatingIfNeeded: next()), at: b.isEmpty ? 0 : Int(next() % UInt64(b.count)))
            }
            inputs.append(b)
        }
        for input in inputs { #expect(input.withUnsafeBytes { FuzzTargets.run(target, $0) }) }
    }
}

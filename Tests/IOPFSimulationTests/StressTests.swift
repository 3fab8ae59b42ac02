// The stress tester finds planted bugs: each one makes a short run report violations,
// and the same run without it reports none. This is what shows the checks can fail.

import Foundation
import Glibc
import Testing
@_spi(FaultInjection) @testable import IOPFCore
@_spi(FaultInjection) @testable import IOPFService
@testable import IOPFSimulation

@Suite(.serialized, .timeLimit(.minutes(15))) struct StressTests {
    static func run(
        _ bugs: InjectedBugs, seconds: Double = 3, external: Bool = false, seed: UInt64 = 11,
        outstanding: Int = 1
    ) throws -> StressResult {
        var o = StressOptions()
        o.outstanding = outstanding
        o.seed = seed
        o.seconds = seconds
        o.devices = 3
        o.injected = bugs
        if external {
            // Single pages out of process: adaptive fault-around (the default, exercised by
            // the in-process runs) maps most pages ahead, and the no-retry race needs
            // faults; under TSan it was then missed in 3 runs of 6 s.
            o.faultAround = .off
            o.external = true
            let dir = URL(fileURLWithPath: try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
                .deletingLastPathComponent()
            o.deviceCommand = [dir.appendingPathComponent("iopf").path, "device"]
        }
        return try StressSession.run(o)
    }

    @Test func aCleanRunHasNoViolations() throws {
        let r = try Self.run([])
        #expect(r.violations == 0, "\(r.violationKinds) \(r.firstViolation ?? "")")
        #expect(r.faults > 1000 && r.invalidations > 100 && r.checks > 1000)
        #expect(r.stormOperations.count == 6, "every kind of storm operation ran: \(r.stormOperations)")
        // Dirty tracking is on by default: the log was read many times and lost nothing.
        #expect(
            r.dirty != nil && r.dirty!.rounds > 20 && r.dirty!.written > 100 && r.dirty!.missed == 0,
            "\(String(describing: r.dirty))")
    }

    /// Devices with 8 groups in flight each: clean, and a skipped sync is still caught.
    @Test func pipelinedDevicesRunCleanAndASkippedSyncIsFound() throws {
        let clean = try Self.run([], seconds: 2, outstanding: 8)
        #expect(clean.violations == 0, "\(clean.violationKinds) \(clean.firstViolation ?? "")")
        #expect(clean.faults > 1000 && clean.dmaOps > 0)  // DMA errors are expected: the storm takes memory away
        let planted = try Self.run(.skipSync, seconds: 2, outstanding: 8)
        #expect(planted.violationKinds["staleTranslation"] ?? 0 > 0, "\(planted.violationKinds)")
    }

    /// Under TSan everything runs several times slower, and races are met less often in
    /// the same time.
    static let sanitizedByTSan = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "__tsan_init") != nil
    static let sanitized = sanitizedByTSan || dlsym(UnsafeMutableRawPointer(bitPattern: 0), "__asan_init") != nil

    @Test(arguments: InjectedBugs.names.map(\.0))
    func aPlantedBugIsFound(name: String) throws {
        let expected: [String: Set<String>] = [
            "skip-sync": ["staleTranslation"],
            "clear-requested": ["bitWithoutLeaf"],
            "no-retry": ["leafOnGoneMemory", "leafWithoutBit", "stormOperationFailed"],
            "early-free": ["tablePageFreedBeforeSync"],
            "double-answer": ["groupNotAnsweredOnce"],
            "lose-dirty": ["dirtyWriteLost"],
        ]
        // no-retry needs an invalidation between a fault's lookup and its install; a 3-second
        // run under TSan (seed 11) once missed it, so each bug gets up to three seeds there.
        let seconds = Self.sanitizedByTSan ? 6.0 : 3.0
        var seed: UInt64 = 11
        var r = try Self.run(InjectedBugs(name: name)!, seconds: seconds)
        for next: UInt64 in [12, 13] where expected[name]!.isDisjoint(with: r.violationKinds.keys) {
            seed = next
            r = try Self.run(InjectedBugs(name: name)!, seconds: seconds, seed: next)
        }
        #expect(r.violations > 0, "\(name) went unnoticed")
        #expect(r.firstViolation?.contains("seed \(seed)") == true)
        #expect(!expected[name]!.isDisjoint(with: r.violationKinds.keys), "\(name) was caught as \(r.violationKinds)")
    }

    @Test func externalDevicesRunCleanAndThePlantedBugsAreStillFound() throws {
        let clean = try Self.run([], external: true)
        #expect(clean.devices == "external")
        #expect(clean.violations == 0, "\(clean.violationKinds) \(clean.firstViolation ?? "")")
        #expect(clean.faults > 500 && clean.invalidations > 100 && clean.dmaOps > 0)
        let expected: [String: Set<String>] = [
            "skip-sync": ["invalidationNotDelivered"],
            "clear-requested": ["bitWithoutLeaf"],
            "no-retry": ["leafOnGoneMemory", "leafWithoutBit", "stormOperationFailed"],
            "early-free": ["tablePageFreedBeforeSync"],
            "double-answer": ["groupNotAnsweredOnce"],
        ]
        // Out of process the race no-retry needs (an invalidation between a fault's lookup and
        // its install) is found in most 2-second runs but not all (seed 2 of 1...4 missed it on
        // a loaded machine), so each bug gets up to three seeds; a clean run never gets a retry.
        // Under a sanitizer the device processes and the storm are tens of times slower (a
        // debug ASan run made 850 groups and 600 invalidations in 2 s, and met the race in 1
        // of 3 seeds; under TSan five 6-second seeds once all missed it while the rest of
        // the suite shared the cores). There the other bugs get 6-second runs, and no-retry
        // is left to the in-process test above, which meets the race under every sanitizer.
        // A plain run beside the other suites once missed it in all three seeds too, so
        // no-retry gets up to eight (a clean run never needs a retry).
        let seconds = Self.sanitized ? 6.0 : 2.0
        for (name, kinds) in expected where !(Self.sanitized && name == "no-retry") {
            let retrySeeds: [UInt64] = name == "no-retry" ? [12, 13, 14, 15, 16, 17, 18] : [12, 13]
            var r = try Self.run(InjectedBugs(name: name)!, seconds: seconds, external: true)
            for seed in retrySeeds where kinds.isDisjoint(with: r.violationKinds.keys) {
                r = try Self.run(InjectedBugs(name: name)!, seconds: seconds, external: true, seed: seed)
            }
            #expect(
                !kinds.isDisjoint(with: r.violationKinds.keys),
                "\(name) with external devices was caught as \(r.violationKinds)")
        }
    }
}

// Microbench.swift — `iopf-microbench`: timings and allocation counts of the engine's hot
// paths, run in-process over `SimulatedHostMemory` so that only the engine is measured.
//
// Scenarios (each reports the median of --repeat runs):
// - bitmap-scan: walk every set run of a 1 GiB bitmap (262,144 pages) with
//   findNextSet/findNextClear, as the invalidation walk does.
// - fault: handle one-page groups for pages whose host memory is resident, in steady
//   state (table pages and scratch buffers already exist), counting mallocs.
// - invalidate: unmap a dense (and a sparse) 1 GiB fault-mode mapping in one
//   invalidation under each gather policy, against unmapping and syncing page by page;
//   and one 4 KiB invalidation inside each 2 MiB block of 1 GiB mapped with blocks (the
//   whole block goes) against the same inside 4 KiB pages (one page goes).
// - faults: the whole path through one service thread (`iopf bench --scenario faults`,
//   real shared rings and real memory, 0.5 s per run): one group in flight, judged by
//   its p50 latency, and 32 in flight, judged by time per fault (1 / faults per second).
//   Mallocs are per fault, device side included, so that one more per fault shows.

import ArgumentParser
import Foundation
import IOPFCore
import IOPFSimulation
import Logging
import MallocInterposerSwift

@main
struct Microbench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "iopf-microbench",
        abstract: """
            Measure the fault engine's hot paths (bitmap scans, fault handling, invalidation) and faults through \
            the service.
            """
    )

    enum Scenario: String, ExpressibleByArgument, CaseIterable {
        case all, bitmapScan = "bitmap-scan", fault, invalidate, faults
    }

    @Option(help: "Which scenario to run: \(Scenario.allCases.map(\.rawValue).joined(separator: ", ")).")
    var scenario: Scenario = .all

    @Option(help: "Runs per measurement; the median is reported.")
    var `repeat` = 5

    @Option(help: "Nanoseconds each IOTLB sync spins, standing in for a device's invalidation round trip.")
    var syncCostNs = 0

    @Flag(help: "Print one JSON object instead of a table.")
    var json = false

    @Option(help: ArgumentHelp("Also write the results as JSON to FILE (a baseline for --compare).", valueName: "FILE"))
    var save: String?

    @Option(
        help: ArgumentHelp(
            """
            Compare with a baseline written by --save: each result's time per unit against the baseline's, and its \
            mallocs; exit 1 when one is slower than --tolerance allows or allocates more.
            """,
            valueName: "FILE"))
    var compare: String?

    @Option(help: "With --compare: the slow-down accepted as noise, as a fraction (0.2: 20% slower).")
    var tolerance = 0.2

    @Flag(
        help: ArgumentHelp(
            "With --compare: judge allocations only (they do not depend on the machine's speed: CI runs this)."))
    var allocationsOnly = false

    func validate() throws {
        guard tolerance >= 0 else { throw ValidationError("--tolerance must not be negative, got \(tolerance)") }
        guard `repeat` >= 1 else { throw ValidationError("--repeat must be at least 1, got \(`repeat`)") }
        guard syncCostNs >= 0 else { throw ValidationError("--sync-cost-ns must not be negative, got \(syncCostNs)") }
    }

    func run() throws {
        MallocInterposerSwift.initialize()
        var results: [Result] = []
        if scenario == .all || scenario == .bitmapScan { results += bitmapScan() }
        if scenario == .all || scenario == .fault { results += try fault() }
        if scenario == .all || scenario == .invalidate { results += try invalidate() }
        if scenario == .all || scenario == .faults { results += try faults() }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let report = try encoder.encode(Report(syncCostNs: syncCostNs, results: results))
        if let save { try report.write(to: URL(fileURLWithPath: save)) }
        if let compare { return try self.compare(results, with: compare) }
        if json {
            print(String(decoding: report, as: UTF8.self))
        } else {
            print("iopf micro-benchmarks (median of \(`repeat`), sync cost \(syncCostNs) ns)")
            print(pad("name", 44) + pad("total", 12) + pad("per unit", 14) + pad("syncs", 9) + "mallocs")
            for r in results {
                print(
                    pad(r.name, 44) + pad(format(r.seconds), 12)
                        + pad(String(format: "%.1f ns/\(r.unit)", r.nsPerUnit), 14)
                        + pad(r.syncs.map(String.init) ?? "-", 9) + String(r.mallocs))
            }
        }
    }

    struct Report: Codable {
        var syncCostNs: Int
        var results: [Result]
    }

    /// Prints each result beside the baseline's and throws ExitCode(1) when one is slower
    /// than the tolerance allows or allocates more. Results missing on either side are
    /// listed, not judged.
    func compare(_ results: [Result], with path: String) throws {
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path)) } catch {
            throw ValidationError("--compare: cannot read \(path): \(error.localizedDescription)")
        }
        let baseline: Report
        do { baseline = try JSONDecoder().decode(Report.self, from: data) } catch {
            throw ValidationError("--compare: \(path) is not a baseline written by --save (\(error))")
        }
        if baseline.syncCostNs != syncCostNs {
            print(
                "note: the baseline was taken with --sync-cost-ns \(baseline.syncCostNs), this run with \(syncCostNs)")
        }
        let before = Dictionary(baseline.results.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        print("iopf micro-benchmarks against \(path) (median of \(`repeat`), tolerance \(Int(tolerance * 100))%)")
        print(pad("name", 44) + pad("baseline", 14) + pad("now", 14) + pad("ratio", 8) + "verdict")
        var worse: [String] = []
        for r in results {
            guard let b = before[r.name] else {
                print(
                    pad(r.name, 44) + pad("-", 14) + pad(String(format: "%.1f ns", r.nsPerUnit), 14) + pad("-", 8)
                        + "new")
                continue
            }
            let ratio = r.nsPerUnit / max(b.nsPerUnit, 1e-9)
            var verdict = ratio > 1 + tolerance ? "SLOWER" : ratio < 1 / (1 + tolerance) ? "faster" : "same"
            if r.mallocs > b.mallocs { verdict += ", mallocs \(b.mallocs) -> \(r.mallocs)" }
            if (ratio > 1 + tolerance && !allocationsOnly) || r.mallocs > b.mallocs { worse.append(r.name) }
            print(
                pad(r.name, 44) + pad(String(format: "%.2f ns", b.nsPerUnit), 14)
                    + pad(String(format: "%.2f ns", r.nsPerUnit), 14)
                    + pad(String(format: "%.2f", ratio), 8) + verdict)
        }
        for name in before.keys.sorted() where !results.contains(where: { $0.name == name }) {
            print(pad(name, 44) + "not run")
        }
        if !worse.isEmpty {
            print("\(worse.count) result(s) worse than the baseline: \(worse.joined(separator: "; "))")
            throw ExitCode(1)
        }
    }

    struct Result: Codable {
        var name: String
        var seconds: Double
        var unit: String
        var units: Int
        var nsPerUnit: Double
        var syncs: Int?
        var mallocs: Int
    }

    // MARK: Scenarios

    func bitmapScan() -> [Result] {
        let pages = 262_144
        var bitmap = PageBitmap(count: pages)
        var rng = SplitMix(state: 12)  // the same bitmap every run, so that runs compare
        var i = 0
        while i < pages {  // runs of 1...64 pages, about half set
            let length = Int.random(in: 1...64, using: &rng)
            if Bool.random(using: &rng) { bitmap.set(i..<min(i + length, pages)) }
            i += length
        }
        var runs = 0
        let (seconds, mallocs) = measure {
            runs = 0
            var p = bitmap.findNextSet(from: 0)
            while p < pages {
                let end = bitmap.findNextClear(from: p)
                runs &+= 1
                p = bitmap.findNextSet(from: end)
            }
        }
        precondition(runs > 0, "the bitmap scan found no runs")
        return [
            Result(
                name: "bitmap-scan 1 GiB, runs of 1-64 pages", seconds: seconds, unit: "page", units: pages,
                nsPerUnit: seconds * 1e9 / Double(pages), syncs: nil, mallocs: mallocs)
        ]
    }

    func fault() throws -> [Result] {
        let pages = 65_536  // 256 MiB
        let host: UInt64 = 0x7f00_0000_0000
        let engine = FaultEngine(memory: SimulatedHostMemory(), configuration: configuration(pageSizes: [.size4K]))
        _ = try engine.createDomain(invalidator: SpinInvalidator(costNs: syncCostNs))
        try engine.map(iova: 0, vaddr: host, size: UInt64(pages) << 12, prot: .readWrite)
        let handler = engine.makeFaultHandler()
        var group = [
            PageRequest(flags: .lastPage, deviceID: 1, groupIndex: 0, perm: [.read, .write], addr: 0, cookie: 1)
        ]
        var failures = 0
        func faultAll() {
            for p in 0..<pages {
                group[0].addr = UInt64(p) << 12
                if handler.handle(group).code != .success { failures += 1 }
            }
        }
        // Warm up: table pages, gathers and scratch buffers come to their steady size.
        faultAll()
        _ = try engine.invalidate(hostAddress: host, length: UInt64(pages) << 12)
        var samples: [(Double, Int)] = []
        for _ in 0..<`repeat` {
            samples.append(measure(once: true) { faultAll() })
            _ = try engine.invalidate(hostAddress: host, length: UInt64(pages) << 12)
        }
        precondition(failures == 0, "\(failures) faults were not answered SUCCESS")
        let (seconds, mallocs) = median(samples)
        return [
            Result(
                name: "fault (resident page, 1-page group)", seconds: seconds, unit: "fault", units: pages,
                nsPerUnit: seconds * 1e9 / Double(pages), syncs: nil, mallocs: mallocs)
        ]
    }

    func faults() throws -> [Result] {
        var results: [Result] = []
        var logger = Logger(label: "iopf.microbench")
        logger.logLevel = .warning  // not every device's goodbye
        for outstanding in [1, 32] {
            var rows: [(row: FaultsRow, mallocs: Int)] = []
            for _ in 0..<`repeat` {
                MallocInterposerSwift.reset()
                MallocInterposerSwift.hook()
                let row = try FaultsBench.measure(outstanding: outstanding, seconds: 0.5, logger: logger)
                MallocInterposerSwift.unhook()
                guard row.problems.isEmpty else {
                    throw ValidationError("faults, \(outstanding) in flight: \(row.problems.joined(separator: "; "))")
                }
                rows.append((row, MallocInterposerSwift.getStatistics().mallocCount / max(row.faults, 1)))
            }
            let key: (FaultsRow) -> Double =
                outstanding == 1
                ? { Double($0.faultLatencyNs.p50) } : { 1e9 / $0.faultsPerSecond }
            let median = rows.sorted { key($0.row) < key($1.row) }[rows.count / 2]
            results.append(
                Result(
                    name: outstanding == 1
                        ? "faults, 1 in flight: p50 round trip" : "faults, \(outstanding) in flight: time per fault",
                    seconds: median.row.seconds, unit: "fault", units: median.row.faults, nsPerUnit: key(median.row),
                    syncs: nil, mallocs: median.mallocs))
        }
        return results
    }

    func invalidate() throws -> [Result] {
        let pages = 262_144  // 1 GiB
        let size = UInt64(pages) << 12
        let host: UInt64 = 0x7e00_0000_0000
        var results: [Result] = []
        for dense in [true, false] {
            let policies: [GatherPolicy?] = [.linux, .defaultRangeList, nil]  // nil: page by page
            for policy in policies {
                let engine = FaultEngine(
                    memory: SimulatedHostMemory(),
                    configuration: configuration(pageSizes: [.size4K], policy: policy ?? .linux))
                _ = try engine.createDomain(invalidator: SpinInvalidator(costNs: syncCostNs))
                try engine.map(iova: 0, vaddr: host, size: size, prot: .readWrite)
                var samples: [(Double, Int)] = []
                var syncs = 0
                for run in 0...`repeat` {  // run 0 warms up: pool free list and gathers reach their size
                    if dense {
                        try engine.premap(iova: 0, size: size, write: true)
                    } else {
                        for p in stride(from: 0, to: pages, by: 2) {
                            try engine.premap(iova: UInt64(p) << 12, size: 4096, write: true)
                        }
                    }
                    let before = engine.statistics.iotlbSyncs
                    samples.append(
                        try measure(once: true) {
                            if policy == nil {
                                for p in 0..<pages {
                                    _ = try engine.invalidate(hostAddress: host + UInt64(p) << 12, length: 4096)
                                }
                            } else {
                                _ = try engine.invalidate(hostAddress: host, length: size)
                            }
                        })
                    syncs = engine.statistics.iotlbSyncs - before
                    precondition(engine.mappedPageCount == 0, "pages left mapped after invalidating everything")
                    if run == 0 { samples.removeAll() }
                }
                let (seconds, mallocs) = median(samples)
                let label = policy.map { "one invalidation, \($0)" } ?? "page by page, sync each"
                results.append(
                    Result(
                        name: "invalidate 1 GiB \(dense ? "dense" : "sparse"): \(label)", seconds: seconds,
                        unit: "page", units: pages, nsPerUnit: seconds * 1e9 / Double(pages), syncs: syncs,
                        mallocs: mallocs))
            }
        }
        for blocks in [false, true] {
            let engine = FaultEngine(
                memory: SimulatedHostMemory(),
                configuration: configuration(pageSizes: blocks ? [.size4K, .size2M] : [.size4K]))
            _ = try engine.createDomain(invalidator: SpinInvalidator(costNs: syncCostNs))
            try engine.map(iova: 0, vaddr: host, size: size, prot: .readWrite)
            let count = pages / 512
            var samples: [(Double, Int)] = []
            for run in 0...`repeat` {
                try engine.premap(iova: 0, size: size, write: true)
                samples.append(
                    try measure(once: true) {
                        for b in 0..<count {
                            _ = try engine.invalidate(hostAddress: host + UInt64(b) << 21 + 5 << 12, length: 4096)
                        }
                    })
                if run == 0 { samples.removeAll() }
                _ = try engine.invalidate(hostAddress: host, length: size)
            }
            let (seconds, mallocs) = median(samples)
            results.append(
                Result(
                    name: "invalidate 4 KiB inside \(blocks ? "a 2 MiB block" : "4 KiB pages")", seconds: seconds,
                    unit: "call", units: count, nsPerUnit: seconds * 1e9 / Double(count), syncs: count, mallocs: mallocs
                ))
        }
        return results
    }

    // MARK: Helpers

    func configuration(pageSizes: Set<PageSize>, policy: GatherPolicy = .defaultRangeList) -> EngineConfiguration {
        var c = EngineConfiguration()
        c.pageSizes = pageSizes
        c.gatherPolicy = policy
        return c
    }

    /// Median seconds and mallocs of `repeat` runs (or of one run when `once`).
    func measure(once: Bool = false, _ body: () throws -> Void) rethrows -> (Double, Int) {
        var samples: [(Double, Int)] = []
        for _ in 0..<(once ? 1 : `repeat`) {
            MallocInterposerSwift.reset()
            MallocInterposerSwift.hook()
            let start = ContinuousClock.now
            try body()
            let elapsed = ContinuousClock.now - start
            MallocInterposerSwift.unhook()
            samples.append(
                (
                    Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18,
                    MallocInterposerSwift.getStatistics().mallocCount
                ))
        }
        return median(samples)
    }

    func median(_ samples: [(Double, Int)]) -> (Double, Int) {
        let sorted = samples.sorted { $0.0 < $1.0 }
        return sorted[sorted.count / 2]
    }

    func format(_ seconds: Double) -> String {
        seconds >= 1
            ? String(format: "%.2f s", seconds)
            : seconds >= 1e-3 ? String(format: "%.2f ms", seconds * 1e3) : String(format: "%.1f µs", seconds * 1e6)
    }

    func pad(_ s: String, _ width: Int) -> String {
        s.count >= width ? s + " " : s + String(repeating: " ", count: width - s.count)
    }
}

/// SplitMix64: a fixed sequence per seed.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Stands in for the devices' IOTLBs: counts nothing, spins `costNs` per sync.
final class SpinInvalidator: IOTLBInvalidator {
    let costNs: Int
    init(costNs: Int) { self.costNs = costNs }
    func invalidate(_ ranges: [IOVARange]) {
        guard costNs > 0 else { return }
        let until = ContinuousClock.now + .nanoseconds(costNs)
        while ContinuousClock.now < until {}
    }
}

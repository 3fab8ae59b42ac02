// Bench.swift — `iopf bench`: pinned against fault-driven memory, same machine, same run,
// with this machine's floors measured alongside so that every figure has a yardstick.

import ArgumentParser
import Foundation
import IOPFCore
import IOPFSimulation
import IOPFService
import Logging

/// What `iopf bench` measures.
enum BenchScenario: String, CaseIterable, ExpressibleByArgument {
    case pinnedVsFault = "pinned-vs-fault"
    case faultAround = "fault-around"
    case dirtyLog = "dirty-log"
    case faults
    case hostChurn = "host-churn"
}

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure pinned and fault-driven memory side by side: start-up, density, throughput.",
        discussion: """
            Each (size, touch) runs both modes, interleaved, --repeat times; medians are reported. \
            --scenario fault-around instead compares single-page faulting with --fault-around on one device's \
            first touch: sequential over each size, and random 4 KiB touches of each --touch fraction. \
            --scenario dirty-log runs devices that write --dirty-share of each size per round and reads the dirty log \
            every --dirty-interval ms, fault mode and pinned mode, holding what each reports against what was written.
            """
    )

    @Option(
        help: ArgumentHelp(
            """
            pinned-vs-fault, fault-around (single pages against --fault-around), dirty-log (what the dirty log \
            reports, fault against pinned), faults (resident-page faults through one service thread, --outstanding \
            groups in flight), or host-churn (what a host with --mappings one-page mappings costs per event, unmap \
            and teardown).
            """, valueName: "scenario"))
    var scenario: BenchScenario = .pinnedVsFault

    @Option(help: "host-churn: one-page mappings of the host, comma-separated counts (k = 1024).")
    var mappings = "1k,16k,64k"

    @Option(help: "faults: groups the device keeps in flight (1-256).")
    var outstanding = 32

    @Option(help: "faults: seconds to run.")
    var seconds = 2.0

    @Option(help: "dirty-log: milliseconds between reads of the log.")
    var dirtyInterval = 200.0

    @Option(help: "dirty-log: rounds (reads of the log) per run.")
    var dirtyRounds = 10

    @Option(help: "dirty-log: share of the memory the devices write per round.")
    var dirtyShare = 0.1

    @Option(
        help: ArgumentHelp(
            "The policy --scenario fault-around compares with single pages: adaptive or a page count.",
            valueName: "adaptive|N"))
    var faultAround = "adaptive"

    @Flag(
        help:
            """
            fault-around: also run single pages over memory backed by 2 MiB transparent huge pages, one block \
            mapped per fault (JSON blockMappings). Sets the shmem THP knob to advise if it is off.
            """
    )
    var hugePages = false

    @Option(help: "Memory sizes, comma-separated (e.g. 1G,2G,4G,8G).")
    var sizes = "1G,2G,4G,8G"

    @Option(help: "Fractions of the pages the devices touch, comma-separated, each in (0, 1].")
    var touch = "0.1,1.0"

    @Option(help: "Runs per (size, touch, mode); the median is reported.")
    var `repeat` = 3

    @Option(help: "Seconds of random whole-page DMA for the throughput figure.")
    var dmaSeconds = 0.5

    @Flag(help: "Print one JSON object instead of the table.")
    var json = false

    @Flag(
        inversion: .prefixedNo,
        help:
            """
            Touch and free twice the largest size once first (up to 3/4 of available memory), so that every run \
            sees warm memory; matters on virtual machines.
            """
    )
    var warmUp = true

    @Option(help: "Also write the rows as CSV to this file.")
    var csv: String?

    @Option(help: "Also draw the comparison as a PNG with gnuplot (Debian: gnuplot-nox).")
    var plot: String?

    var parsedSizes: [UInt64] { sizes.split(separator: ",").compactMap { parseSize(String($0)) } }
    var parsedTouch: [Double] { touch.split(separator: ",").compactMap { Double($0) } }

    func validate() throws {
        let s = sizes.split(separator: ",")
        guard !s.isEmpty, s.count == parsedSizes.count, parsedSizes.allSatisfy({ $0 >= 4 << 20 }) else {
            throw ValidationError("--sizes '\(sizes)' must be sizes like 1G,2G of at least 4M each")
        }
        let t = touch.split(separator: ",")
        guard !t.isEmpty, t.count == parsedTouch.count, parsedTouch.allSatisfy({ $0 > 0 && $0 <= 1 }) else {
            throw ValidationError("--touch '\(touch)' must be fractions in (0, 1], e.g. 0.1,1.0")
        }
        guard let counts = parsedMappings, counts.allSatisfy({ (1...65535).contains($0) }) else {
            throw ValidationError("--mappings must be counts 1...65535 (k = 1024), comma-separated, got '\(mappings)'")
        }
        guard (1...FaultsBench.maxOutstanding).contains(outstanding) else {
            throw ValidationError("--outstanding must be 1...\(FaultsBench.maxOutstanding), got \(outstanding)")
        }
        guard seconds > 0 && seconds <= 3600 else {
            throw ValidationError("--seconds must be in (0, 3600], got \(seconds)")
        }
        guard dirtyInterval >= 1 && dirtyRounds >= 1 && dirtyShare > 0 && dirtyShare <= 1 else {
            throw ValidationError(
                "--dirty-interval must be at least 1 ms, --dirty-rounds at least 1, --dirty-share in (0, 1]")
        }
        guard let policy = FaultAroundPolicy(faultAround), policy != .off else {
            throw ValidationError("--fault-around must be adaptive or a page count 1...512, got '\(faultAround)'")
        }
        guard !hugePages || scenario == .faultAround else {
            throw ValidationError("--huge-pages is for --scenario fault-around (and iopf serve and stress)")
        }
        guard `repeat` >= 1 else { throw ValidationError("--repeat must be at least 1, got \(`repeat`)") }
        guard dmaSeconds > 0 else { throw ValidationError("--dma-seconds must be positive, got \(dmaSeconds)") }
        if plot != nil && !gnuplotAvailable() {
            throw ValidationError("--plot needs gnuplot: apt-get install -y gnuplot-nox")
        }
    }

    func run() throws {
        var logger = Logger(label: "iopf.bench")
        logger.logLevel = .error
        let say = Output.progress
        // The faults scenario walks 64 MiB of resident memory: nothing to warm.
        if warmUp && scenario != .faults && scenario != .hostChurn {
            let bytes = min(2 * (parsedSizes.max() ?? 0), Floors.availableMemory() / 4 * 3)
            say("warming \(human(bytes)) of memory…")
            try Floors.warmUp(bytes: bytes)
        }
        switch scenario {
        case .faults: return try runFaults(logger: logger)
        case .hostChurn: return try runHostChurn()
        case .faultAround: return try runFaultAround(logger: logger)
        case .dirtyLog: return try runDirtyLog(logger: logger)
        case .pinnedVsFault: break
        }
        say("measuring floors…")
        let floors = try Floors.measure()
        var rows: [BenchRow] = []
        for size in parsedSizes {
            for t in parsedTouch {
                var runs: [MemoryMode: [BenchRow]] = [:]
                for r in 1...`repeat` {
                    for mode in MemoryMode.allCases {  // interleaved, so drift hits both modes alike
                        say("\(human(size)) touch \(t): \(mode) run \(r)/\(`repeat`)")
                        runs[mode, default: []].append(
                            try BenchSession.measureWithFloor(
                                size: size, touch: t, mode: mode, dmaSeconds: dmaSeconds, logger: logger))
                    }
                }
                for mode in MemoryMode.allCases { rows.append(BenchSession.median(runs[mode]!)) }
            }
        }
        say(nil)
        if let csv { try writeCSV(rows, to: csv) }
        if let plot { try drawPlot(rows, to: plot) }
        if json {
            struct Report: Encodable {
                struct FloorsOut: Encodable {
                    var mlockSecondsPerGiB: Double
                    var populateNsPerPage: Double
                    var uffdRoundTripNs: Double
                    var uffdRoundTripPolledNs: Double
                }
                var floors: FloorsOut
                var rows: [BenchRow]
            }
            try Output.printJSON(
                Report(
                    floors: .init(
                        mlockSecondsPerGiB: floors.mlockSecondsPerGiB, populateNsPerPage: floors.populateNsPerPage,
                        uffdRoundTripNs: floors.uffdRoundTripNs, uffdRoundTripPolledNs: floors.uffdRoundTripPolledNs),
                    rows: rows))
        } else {
            printTable(rows, floors)
        }
    }

    /// Resident-page faults through one service thread with `--outstanding` groups in flight.
    var parsedMappings: [Int]? {
        let counts = mappings.split(separator: ",").map { part -> Int? in
            let text = part.trimmingCharacters(in: .whitespaces).lowercased()
            return text.hasSuffix("k") ? Int(text.dropLast()).map { min($0 * 1024, 65535) } : Int(text)
        }
        return counts.contains(nil) || counts.isEmpty ? nil : counts.map { $0! }
    }

    /// Per event, unmap and teardown, for each mapping count, with the ratio of the largest
    /// count's figures to the smallest's (at most logarithmic growth is the goal: ≤ 3×).
    func runHostChurn() throws {
        var rows: [HostChurnRow] = []
        for n in parsedMappings! {
            var runs: [HostChurnRow] = []
            for r in 1...`repeat` {
                Output.progress("host-churn: \(n) mappings, run \(r)/\(`repeat`)")
                runs.append(try HostChurnBench.measure(mappings: n))
            }
            // The run with the median page-event cost stands for the count.
            rows.append(runs.sorted { $0.pageEventNs < $1.pageEventNs }[runs.count / 2])
        }
        Output.progress(nil)
        if json { return try Output.printJSON(rows) }
        print(
            "mappings   map ns  event ns (page)  event ns (empty)  whole event ns/mapping  unmap ns"
                + "  teardown ns/mapping")
        for r in rows {
            print(
                String(
                    format: "%8d %8.0f %16.0f %17.0f %23.1f %9.0f %20.1f", r.mappings, r.mapNs, r.pageEventNs,
                    r.emptyEventNs, r.wholeEventNsPerMapping, r.unmapNs, r.teardownNsPerMapping))
        }
        if let a = rows.first, let b = rows.last, rows.count > 1 {
            let format = "ratio %d/%d: page event %.2fx, empty event %.2fx, unmap %.2fx, teardown per mapping %.2fx"
            print(
                String(
                    format: format,
                    b.mappings, a.mappings, b.pageEventNs / a.pageEventNs, b.emptyEventNs / a.emptyEventNs,
                    b.unmapNs / a.unmapNs, b.teardownNsPerMapping / a.teardownNsPerMapping))
        }
    }

    func runFaults(logger: Logger) throws {
        Output.progress("faults: \(outstanding) in flight for \(seconds) s")
        var row = try FaultsBench.measure(outstanding: outstanding, seconds: seconds, logger: logger)
        row.crossCoreRoundTripNs = Floors.crossCoreRoundTrip()
        Output.progress(nil)
        if json {
            try Output.printJSON(row)
        } else {
            let l = row.faultLatencyNs
            print(
                String(
                    format:
                        """
                        faults: %d in %.2f s through one service thread, %d in flight: %.0f faults/s, %.1f faults \
                        per loop turn
                        """,
                    row.faults, row.seconds, row.outstanding, row.faultsPerSecond,
                    Double(row.faults) / Double(max(row.loopTurns, 1))))
            print(
                String(
                    format: "fault latency (device): p50 %.2f µs  p90 %.2f µs  p99 %.2f µs  p99.9 %.2f µs  "
                        + "max %.1f µs",
                    Double(l.p50) / 1000, Double(l.p90) / 1000, Double(l.p99) / 1000, Double(l.p999) / 1000,
                    Double(l.max) / 1000))
            if let floor = row.crossCoreRoundTripNs {
                print(
                    String(
                        format: "floor: a cache line to another CPU and back %.0f ns (p50 %.1f× that)", floor,
                        Double(l.p50) / floor))
            }
        }
        if !row.problems.isEmpty {
            print("problems: \(row.problems.prefix(3).joined(separator: "; "))")
            throw ExitCode(1)
        }
    }

    /// Single pages against `--fault-around`, interleaved, on sequential and random first touch.
    func runFaultAround(logger: Logger) throws {
        let say = Output.progress
        let policies = [FaultAroundPolicy.off, FaultAroundPolicy(faultAround)!]
        // Single pages, the policy, and with --huge-pages single pages over huge pages.
        let configs = policies.map { ($0, false) } + (hugePages ? policies.map { ($0, true) } : [])
        if hugePages, let notice = try HugePages.enableForShmem() {
            FileHandle.standardError.write(Data("iopf: \(notice)\n".utf8))
        }
        var rows: [FaultAroundRow] = []
        for size in parsedSizes {
            for (pattern, t) in [(Workload.sequential, 1.0)] + parsedTouch.map({ (Workload.random, $0) }) {
                var runs: [[FaultAroundRow]] = Array(repeating: [], count: configs.count)
                for r in 1...`repeat` {
                    for (k, (p, huge)) in configs.enumerated() {
                        say(
                            """
                            \(human(size)) \(pattern) touch \(t): fault-around \(p)\(huge ? ", huge pages" : "") \
                            run \(r)/\(`repeat`)
                            """
                        )
                        runs[k].append(
                            try FaultAroundBench.measure(
                                size: size, pattern: pattern, touch: t, policy: p, hugePages: huge,
                                logger: logger))
                    }
                }
                rows += runs.map(FaultAroundBench.median)
            }
        }
        say(nil)
        if json {
            struct Report: Encodable { var rows: [FaultAroundRow] }
            return try Output.printJSON(Report(rows: rows))
        }
        let small = rows.filter { !$0.hugePages }
        printFaultAroundTable(small, around: policies[1].description)
        if hugePages {
            let huge = rows.filter(\.hugePages)
            printHugePageTable(
                base: small.filter { $0.faultAround == "off" }, huge: huge.filter { $0.faultAround == "off" },
                around: huge.filter { $0.faultAround != "off" })
        }
        let problems = rows.flatMap(\.problems)
        if !problems.isEmpty {
            print("problems: \(problems.prefix(3).joined(separator: "; "))")
            throw ExitCode(1)
        }
    }

    /// 2 MiB blocks on fault (alone, and with the fault-around policy) against single
    /// 4 KiB pages, row by row.
    func printHugePageTable(base: [FaultAroundRow], huge: [FaultAroundRow], around: [FaultAroundRow]) {
        let policy = around.first?.faultAround ?? faultAround
        print("")
        print(
            "2 MiB blocks on fault (--huge-pages), single and with fault-around \(policy), against single 4 KiB pages")
        print(
            """
            size  pattern    touch | groups                        | first touch GB/s       | resident MiB         \
             | fault p50 µs           | invalidate 4 KiB: pages, p50 µs
            """
        )
        print(
            """
                                   | 4 KiB  2 MiB  \
            +\(policy.prefix(5).padding(toLength: 5, withPad: " ", startingAt: 0))  fewer    | 4 KiB  2 MiB  \
            +\(policy.prefix(5).padding(toLength: 5, withPad: " ", startingAt: 0))  | 4 KiB  2 MiB  \
            +\(policy.prefix(5).padding(toLength: 5, withPad: " ", startingAt: 0)) | 4 KiB  2 MiB  \
            +\(policy.prefix(5).padding(toLength: 5, withPad: " ", startingAt: 0))  | 4 KiB        2 MiB
            """
        )
        for ((a, b), c) in zip(zip(base, huge), around) {
            let head =
                human(a.sizeBytes).padding(toLength: 5, withPad: " ", startingAt: 0) + " "
                + a.pattern.padding(toLength: 10, withPad: " ", startingAt: 0)
            let invalidate =
                a.pattern == "sequential"
                ? String(
                    format: "%3.0f, %5.1f   %3.0f, %5.1f", a.pagesUnmappedPer4K, Double(a.invalidate4KNs.p50) / 1000,
                    b.pagesUnmappedPer4K, Double(b.invalidate4KNs.p50) / 1000)
                : "–"
            print(
                head
                    + String(
                        format:
                            """
                             %5.2f | %5d  %5d  %5d  %6.1f×  | %5.3f  %5.3f  %5.3f  | %5.0f  %5.0f  %5.0f | %5.1f  \
                            %5.1f  %5.1f  | 
                            """,
                        a.touchFraction, a.groups, b.groups, c.groups, Double(a.groups) / Double(max(c.groups, 1)),
                        a.touchGBps, b.touchGBps, c.touchGBps,
                        Double(a.residentBytes) / 1048576, Double(b.residentBytes) / 1048576,
                        Double(c.residentBytes) / 1048576,
                        Double(a.faultLatencyNs.p50) / 1000, Double(b.faultLatencyNs.p50) / 1000,
                        Double(c.faultLatencyNs.p50) / 1000) + invalidate)
        }
    }

    func printFaultAroundTable(_ rows: [FaultAroundRow], around: String) {
        print(
            """
            size  pattern    touch | groups                  | first touch GB/s            | resident MiB      | \
            fault p50 / p99 µs
            """
        )
        print(
            """
                                   | single  \(around.padding(toLength: 8, withPad: " ", startingAt: 0)) fewer  | \
            single  \(around.padding(toLength: 8, withPad: " ", startingAt: 0)) populate  | single  \
            \(around.padding(toLength: 8, withPad: " ", startingAt: 0))  | single        \(around)
            """
        )
        for i in stride(from: 0, to: rows.count, by: 2) {
            let (a, b) = (rows[i], rows[i + 1])
            let populate =
                a.pattern == "sequential" ? String(format: "%8.3f", max(a.populateGBps, b.populateGBps)) : "       –"
            let head =
                human(a.sizeBytes).padding(toLength: 5, withPad: " ", startingAt: 0) + " "
                + a.pattern.padding(toLength: 10, withPad: " ", startingAt: 0)
            print(
                head
                    + String(
                        format: " %5.2f | %6d  %8d  %5.1f× | %6.3f  %8.3f  ", a.touchFraction, a.groups, b.groups,
                        Double(a.groups) / Double(max(b.groups, 1)), a.touchGBps, b.touchGBps)
                    + populate
                    + String(
                        format: "  | %6.0f  %8.0f  | %5.1f / %-6.1f %5.1f / %.1f",
                        Double(a.residentBytes) / 1048576, Double(b.residentBytes) / 1048576,
                        Double(a.faultLatencyNs.p50) / 1000, Double(a.faultLatencyNs.p99) / 1000,
                        Double(b.faultLatencyNs.p50) / 1000, Double(b.faultLatencyNs.p99) / 1000))
        }
    }

    /// Fault mode against pinned mode: pages the dirty log reports per page written.
    func runDirtyLog(logger: Logger) throws {
        var rows: [DirtyLogRow] = []
        for size in parsedSizes {
            for mode in MemoryMode.allCases.reversed() {
                Output.progress("\(human(size)) dirty log: \(mode)")
                var o = ServeOptions()
                o.mode = mode
                o.devices = 2
                o.memoryBytes = size
                o.invalidateInterval = 0
                o.dirtyLogInterval = dirtyInterval / 1000
                o.dirtyShare = dirtyShare
                o.seconds = dirtyInterval / 1000 * Double(dirtyRounds) + 0.05
                let r = try ServeSession.run(o, logger: logger)
                rows.append(DirtyLogRow(size: size, result: r))
            }
        }
        Output.progress(nil)
        if let csv {
            var text =
                "sizeBytes,mode,rounds,written,reported,missed,extra,reportedPerWritten,writtenSharePerRound,"
                + "readP50Ns,readMaxNs\n"
            for r in rows {
                text +=
                    "\(r.sizeBytes),\(r.mode),\(r.rounds),\(r.written),\(r.reported),\(r.missed),\(r.extra),"
                    + "\(r.reportedPerWritten),"
                    + "\(r.writtenSharePerRound),\(r.readNs.p50),\(r.readNs.max)\n"
            }
            try text.write(toFile: csv, atomically: true, encoding: .utf8)
        }
        if json {
            struct Report: Encodable { var rows: [DirtyLogRow] }
            try Output.printJSON(Report(rows: rows))
        } else {
            print(
                """
                size   mode   | rounds  written/round | reported   written    reported/written | missed  extra   | \
                read p50 / max
                """
            )
            for r in rows {
                print(
                    pad(human(r.sizeBytes), 6) + " " + pad(r.mode, 6) + " | " + pad("\(r.rounds)", 6)
                        + String(format: "  %6.1f%%        | ", 100 * r.writtenSharePerRound)
                        + pad("\(r.reported)", 10) + " " + pad("\(r.written)", 10)
                        + String(format: " %8.3f         | ", r.reportedPerWritten)
                        + pad("\(r.missed)", 7) + " " + pad("\(r.extra)", 7) + " | "
                        + String(
                            format: "%.0f µs / %.0f µs", Double(r.readNs.p50) / 1000, Double(r.readNs.max) / 1000))
            }
        }
        let problems = rows.flatMap(\.problems)
        if !problems.isEmpty || rows.contains(where: { $0.missed > 0 }) {
            print("problems: \(problems.prefix(3).joined(separator: "; "))")
            throw ExitCode(1)
        }
    }

    func printTable(_ rows: [BenchRow], _ f: Floors) {
        print(
            String(
                format:
                    """
                    floors: mlock %.3f s/GiB, MADV_POPULATE_WRITE %.0f ns/page, userfaultfd round trip %.1f µs \
                    (%.1f µs polled)
                    """,
                f.mlockSecondsPerGiB, f.populateNsPerPage, f.uffdRoundTripNs / 1000, f.uffdRoundTripPolledNs / 1000))
        print("")
        print(
            """
            size   touch | time to first DMA        | map call             | touch          | resident        | \
            locked          | DMA GB/s
            """
        )
        print(
            """
                         | pinned   fault  speed-up | pinned     fault     | pinned  fault  | pinned  fault   | \
            pinned  fault   | pinned fault
            """
        )
        var i = 0
        while i + 1 < rows.count {
            let (p, q) = rows[i].mode == "pinned" ? (rows[i], rows[i + 1]) : (rows[i + 1], rows[i])
            print(
                pad(human(p.sizeBytes), 6) + " " + pad(String(format: "%.2f", p.touchFraction), 5) + " | "
                    + pad(secs(p.firstDmaSeconds), 8) + " " + pad(secs(q.firstDmaSeconds), 7)
                    + pad(String(format: "%.0fx", p.firstDmaSeconds / max(q.firstDmaSeconds, 1e-9)), 9) + " | "
                    + pad(secs(p.mapSeconds), 10) + " " + pad(secs(q.mapSeconds), 10) + "| "
                    + pad(secs(p.touchSeconds), 7) + " " + pad(secs(q.touchSeconds), 7) + "| "
                    + pad(human(p.residentBytes), 7) + " " + pad(human(q.residentBytes), 8) + "| "
                    + pad(human(p.lockedBytes), 7) + " " + pad(human(q.lockedBytes), 8) + "| "
                    + pad(String(format: "%.2f", p.dmaGBps), 6) + " " + String(format: "%.2f", q.dmaGBps))
            i += 2
        }
        print("")
        print("against the floors:")
        for r in rows {
            let gib = Double(r.sizeBytes) / Double(1 << 30)
            if r.mode == "pinned" {
                print(
                    String(
                        format:
                            """
                              pinned %@ touch %.2f: map %.3f s/GiB = %.2fx plain mlock of the same size (%.3f \
                            s/GiB); runs %.2f-%.2fx
                            """,
                        human(r.sizeBytes),
                        r.touchFraction, r.mapSeconds / gib, r.ratioToFloor, r.adjacentFloor, r.ratioSpread.min,
                        r.ratioSpread.max))
            } else {
                let pages = Double(r.sizeBytes >> 12) * r.touchFraction
                let perPage = r.touchSeconds * 1e9 / pages
                // Touch groups carry 32 page requests, so a group's latency is set beside 32
                // userfaultfd round trips, not one.
                print(
                    String(
                        format:
                            """
                              fault  %@ touch %.2f: first touch %.0f ns/page = %.2fx the throughput of plain \
                            MADV_POPULATE_WRITE on as many pages (%.0f ns/page); 
                            """
                                + """
                                runs %.2f-%.2fx; 32-page group p50 %.1f µs = %.2fx 32 uffd round trips; resident \
                                %.2f%% of touched
                                """,
                        human(r.sizeBytes), r.touchFraction, perPage, r.ratioToFloor, r.adjacentFloor,
                        r.ratioSpread.min, r.ratioSpread.max,
                        Double(r.faultLatencyNs.p50) / 1000, Double(r.faultLatencyNs.p50) / (32 * f.uffdRoundTripNs),
                        100 * Double(r.residentBytes) / (pages * 4096)))
            }
        }
    }

    func writeCSV(_ rows: [BenchRow], to path: String) throws {
        var text =
            "sizeBytes,touchFraction,mode,mapSeconds,firstDmaSeconds,touchSeconds,residentBytes,lockedBytes,dmaGBps,"
            + "faultP50Ns,faultP99Ns,adjacentFloor,ratioToFloor,ratioMin,ratioMax\n"
        for r in rows {
            text +=
                "\(r.sizeBytes),\(r.touchFraction),\(r.mode),\(r.mapSeconds),\(r.firstDmaSeconds),\(r.touchSeconds),"
                + "\(r.residentBytes),\(r.lockedBytes),\(r.dmaGBps),\(r.faultLatencyNs.p50),\(r.faultLatencyNs.p99),"
                + "\(r.adjacentFloor),\(r.ratioToFloor),\(r.ratioSpread.min),\(r.ratioSpread.max)\n"
        }
        try text.write(toFile: path, atomically: true, encoding: .utf8)
    }

    /// Two panels over size: time to the first DMA (log scale) and resident memory, one
    /// line per mode and touch fraction.
    func drawPlot(_ rows: [BenchRow], to path: String) throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("iopf-plot-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        var series: [String] = []
        for mode in MemoryMode.allCases {
            for t in parsedTouch {
                let name = "\(mode.rawValue) touch \(t)"
                let file = dir.appendingPathComponent("\(mode.rawValue)-\(t).dat").path
                let data = rows.filter { $0.mode == mode.rawValue && $0.touchFraction == t }
                    .map {
                        """
                        \(Double($0.sizeBytes) / Double(1 << 30)) \($0.firstDmaSeconds) \
                        \(Double($0.residentBytes) / Double(1 << 30)) \($0.lockedBytes >> 30)
                        """
                    }
                try (data.joined(separator: "\n") + "\n").write(toFile: file, atomically: true, encoding: .utf8)
                series.append("'\(file)' using 1:COL with linespoints lw 2 title '\(name)'")
            }
        }
        let script = """
            set terminal pngcairo size 1200,500 font 'DejaVu Sans,11'
            set output '\(path)'
            set multiplot layout 1,2 title 'iopf bench: pinned vs fault-driven'
            set xlabel 'memory (GiB)'
            set grid
            set key top left
            set logscale y
            set ylabel 'time to first DMA (s)'
            plot \(series.map { $0.replacingOccurrences(of: "COL", with: "2") }.joined(separator: ", "))
            unset logscale y
            set ylabel 'resident memory (GiB)'
            plot \(series.map { $0.replacingOccurrences(of: "COL", with: "3") }.joined(separator: ", "))
            unset multiplot
            """
        let scriptPath = dir.appendingPathComponent("plot.gp").path
        try script.write(toFile: scriptPath, atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["gnuplot", scriptPath]
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            throw ValidationError("gnuplot failed (status \(p.terminationStatus)) drawing \(path)")
        }
    }

    func gnuplotAvailable() -> Bool {
        (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":")
            .contains { FileManager.default.isExecutableFile(atPath: "\($0)/gnuplot") }
    }

    func human(_ bytes: UInt64) -> String {
        bytes >= 1 << 30 && bytes % (1 << 30) == 0
            ? "\(bytes >> 30)G"
            : bytes >= 1 << 30
                ? String(format: "%.1fG", Double(bytes) / Double(1 << 30))
                : String(format: "%.0fM", Double(bytes) / Double(1 << 20))
    }

    func secs(_ s: Double) -> String {
        s >= 1
            ? String(format: "%.2fs", s)
            : s >= 1e-3 ? String(format: "%.1fms", s * 1e3) : String(format: "%.0fµs", s * 1e6)
    }

    func pad(_ s: String, _ n: Int) -> String {
        s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count)
    }
}

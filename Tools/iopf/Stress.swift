// Stress.swift — `iopf stress`: find races between device faults and invalidations. The
// only command that can plant known bugs (`--inject`), to show the checks catch them.

import ArgumentParser
import Foundation
@_spi(FaultInjection) import IOPFCore
import IOPFSimulation
@_spi(FaultInjection) import IOPFService
import Logging

struct Stress: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stress faults against invalidations, checking invariants all along.",
        discussion: "Exits non-zero on any violation. Use --inject list to see the bugs that can be planted."
    )

    @Option(help: "Seed for every random choice; a failing run is repeated with the same seed.")
    var seed: UInt64 = 1

    @Option(help: "Seconds to run.")
    var seconds = 10.0

    @Option(
        help: "Stop after this many storm operations (invalidations, take-aways, pre-maps, re-mappings, host changes).")
    var ops: Int?

    @Option(help: "Simulated devices.")
    var devices = 4

    @Option(help: "I/O page tables; devices are spread over them.")
    var domains = 2

    @Flag(
        inversion: .prefixedNo,
        help: "Change host memory for real (madvise, mmap MAP_FIXED, mremap) so that userfaultfd events flow.")
    var hostChurn = true

    @Option(help: "Plant a known bug (repeatable): \(InjectedBugs.names.map(\.0).joined(separator: ", ")), or 'list'.")
    var inject: [String] = []

    @Flag(help: "Run the devices as `iopf device` processes attached over the device protocol.")
    var external = false

    @Option(
        help: ArgumentHelp(
            "Map ahead of sequential faults: off, adaptive or a page count (1-512).", valueName: "off|adaptive|N"))
    var faultAround = "adaptive"

    @Option(
        help: ArgumentHelp(
            """
            Track the devices' writes and read the dirty log every MS milliseconds, checking that no write is lost \
            (0: no dirty tracking; in-process devices only). Default 10, or 0 with --huge-pages (tracked mappings \
            take no blocks).
            """,
            valueName: "MS"))
    var dirtyLog: Double?

    @Flag(
        help:
            """
            Back the devices' memory with 2 MiB transparent huge pages and map whole blocks on faults, so that \
            invalidations land inside blocks (JSON blockMappings). Sets the shmem THP knob to advise if it is off.
            """
    )
    var hugePages = false

    @Option(help: "Page request groups each device keeps in flight (1-64), as PRI allows up to a device's credit.")
    var outstanding = 1

    @Flag(help: "Print one JSON object at the end instead of progress and a summary.")
    var json = false

    @Option(
        help: ArgumentHelp(
            """
            Every this many seconds, print the service's footprint (RSS, descriptors, table pages, mapped pages, \
            mappings, devices, peers, hosts) as one JSON line.
            """,
            valueName: "seconds"))
    var sampleEvery: Double?

    func validate() throws {
        guard FaultAroundPolicy(faultAround) != nil else {
            throw ValidationError("--fault-around must be off, adaptive or a page count 1...512, got '\(faultAround)'")
        }
        for name in inject where name != "list" && InjectedBugs(name: name) == nil {
            throw ValidationError(
                "--inject '\(name)' is not a known bug; known: \(InjectedBugs.names.map(\.0).joined(separator: ", "))")
        }
        guard sampleEvery.map({ $0 > 0 }) ?? true else { throw ValidationError("--sample-every must be positive") }
        if let dirtyLog, !(dirtyLog >= 0 && dirtyLog <= 600_000) {
            throw ValidationError("--dirty-log must be 0...600000 ms, got \(dirtyLog)")
        }
        guard seconds > 0 else { throw ValidationError("--seconds must be positive, got \(seconds)") }
        guard ops.map({ $0 > 0 }) ?? true else { throw ValidationError("--ops must be positive") }
        guard devices >= 1 && devices <= 64 else { throw ValidationError("--devices must be 1...64, got \(devices)") }
        guard (1...64).contains(outstanding) else {
            throw ValidationError("--outstanding must be 1...64, got \(outstanding)")
        }
        guard domains >= 1 && domains <= 16 else { throw ValidationError("--domains must be 1...16, got \(domains)") }
    }

    func run() throws {
        if inject.contains("list") {
            for (name, _, what) in InjectedBugs.names {
                print(name.padding(toLength: 16, withPad: " ", startingAt: 0) + what)
            }
            return
        }
        var o = StressOptions()
        o.seed = seed
        o.seconds = seconds
        o.operations = ops
        o.devices = devices
        o.domains = domains
        o.hostChurn = hostChurn
        o.external = external
        o.faultAround = FaultAroundPolicy(faultAround)!
        o.outstanding = outstanding
        o.sampleEvery = sampleEvery
        let dirtyLog = dirtyLog ?? (hugePages ? 0 : 10)
        o.dirtyLogInterval = dirtyLog > 0 ? dirtyLog / 1000 : nil
        o.hugePages = hugePages
        o.deviceCommand = [try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"), "device"]
        o.injected = inject.reduce(into: InjectedBugs()) { $0.insert(InjectedBugs(name: $1)!) }
        var logger = Logger(label: "iopf.stress")
        logger.logLevel = .error
        let r = try StressSession.run(
            o, logger: logger,
            progress: { p in
                guard !json else { return }
                Output.progress(
                    String(
                        format: "%5.1fs  faults %9d (%7.0f/s)  invalidations %8d (%6.0f/s)  violations %d",
                        p.elapsed, p.faults, Double(p.faults) / p.elapsed, p.invalidations,
                        Double(p.invalidations) / p.elapsed, p.violations))
            },
            sample: { s in
                try? Output.printJSONLine(s)
            })
        if json {
            try Output.printJSON(r)
        } else {
            Output.progress(nil)
            print(
                "iopf stress: seed \(r.seed), \(String(format: "%.1f", r.seconds)) s, \(r.devices) devices"
                    + (r.injected.isEmpty ? "" : ", injected: \(r.injected.joined(separator: ", "))"))
            print(
                """
                  faults \(r.faults) in \(r.groups) groups (\(Int(Double(r.faults) / r.seconds))/s), DMA \
                \(r.dmaOps) ops, \(r.dmaErrors) errors
                """
            )
            if r.prefetchedPages > 0 {
                print("  pages mapped ahead (fault-around \(faultAround)): \(r.prefetchedPages)")
            }
            if hugePages { print("  2 MiB blocks mapped on faults: \(r.blockMappings)") }
            print(
                """
                  invalidations \(r.invalidations) (\(Int(Double(r.invalidations) / r.seconds))/s), IOTLB syncs \
                \(r.iotlbSyncs), retries \(r.retries), uffd events \(r.uffdEvents), late accesses \
                \(r.lateAccesses)
                """
            )
            if let d = r.dirty {
                print(
                    """
                      dirty log: \(d.rounds) rounds, \(d.reported) pages reported, \(d.written) written, \
                    \(d.missed) missed, \(d.extra) extra
                    """
                )
            }
            print(
                "  storm: "
                    + r.stormOperations.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(
                        separator: ", "))
            print(
                "  checks \(r.checks), violations \(r.violations)"
                    + (r.violationKinds.isEmpty
                        ? ""
                        : ": "
                            + r.violationKinds.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(
                                separator: ", ")))
            if let f = r.firstViolation { print("  first violation (repeat with --seed \(r.seed)): \(f)") }
        }
        if r.violations > 0 { throw ExitCode(1) }
    }
}

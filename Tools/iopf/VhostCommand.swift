// VhostCommand.swift — `iopf vhost`: iopf as the IOMMU between a virtio-net driver in this
// process and a vhost-user back-end in another (DPDK's testpmd with iommu-support=1).

import ArgumentParser
import Foundation
import IOPFSimulation
import IOPFVhost
import IOPFWire
import Logging

struct Vhost: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Drive a vhost-user back-end (DPDK testpmd) whose every buffer access is translated by iopf.",
        discussion: """
            Connects to the back-end's socket (testpmd: --vdev 'net_vhost0,iface=SOCK,iommu-support=1,client=0' \
            -- --forward-mode=io), sets up one queue pair over --memory of this process's memory, and sends \
            packets with checked payloads for --seconds; the back-end returns them and every byte is checked. \
            --mode fault serves each IOTLB miss as a page fault; pinned maps and announces all memory up front \
            (VFIO type1); no-iommu does not negotiate VIRTIO_F_IOMMU_PLATFORM (the ceiling). --compare runs \
            all three in turn. Exit status: 0 on a clean run; 1 when a payload was wrong, an invalidation \
            was not acknowledged or the back-end went away; 2 when the back-end could not be set up.
            """
    )

    @Option(help: "The back-end's vhost-user socket.")
    var backend: String

    @Option(help: "fault, pinned or no-iommu.")
    var mode = "fault"

    @Option(
        help: ArgumentHelp(
            "Hand the driver's memory to the service at --service as host NAME (as a VMM does) "
                + "and the back-end to it with VHOST, instead of serving it in this process.",
            valueName: "name"))
    var addressSpace: String?

    @Option(help: "The service's socket (iopf serve --listen PATH), with --address-space.")
    var service: String?

    @Flag(help: "Run no-iommu, pinned and fault one after another and report them side by side.")
    var compare = false

    @Option(help: "The driver's memory (rings and packet buffers), e.g. 256M.")
    var memory = "256M"

    @Option(help: "The part of --memory packet buffers come from (default: all of it); the rest is never touched.")
    var workingSet: String?

    @Option(help: "Seconds of traffic per run.")
    var seconds = 10.0

    @Option(help: "Seconds of each run counted as warm-up (mppsAfterWarmup leaves them out).")
    var warmup = 1.0

    @Option(help: "Milliseconds between invalidations of a random range of 1-16 pages of the working set (0: none).")
    var invalidateInterval = 0.0

    @Option(
        help: ArgumentHelp(
            "Milliseconds between madvise(MADV_DONTNEED) of a random range of 1-16 pages of the working set, "
                + "seen through userfaultfd (fault mode; 0: none).")
    )
    var hostChurn = 0.0

    @Option(
        name: [.customLong("packet-size"), .customLong("packets-size")],
        help: "Ethernet frame bytes per packet (60-2000; the 12-byte virtio-net header comes on top).")
    var packetSize = 64

    @Option(help: "Pages a miss maps: the missed page and those after it (1-512).")
    var faultAround = 16

    @Option(
        help: ArgumentHelp(
            "Pages of the aligned block inside which an UPDATE names the whole mapped run around a miss "
                + "(a power of two up to 262144).")
    )
    var updatePages = 512

    @Flag(help: "Print one JSON object at the end instead of a summary.")
    var json = false

    func validate() throws {
        if let addressSpace {
            guard AddressSpaceName.isValid(addressSpace) else {
                throw ValidationError(
                    "--address-space must be 1-64 characters of A-Z a-z 0-9 . _ -, got '\(addressSpace)'")
            }
            guard service != nil, mode == "fault", !compare, invalidateInterval == 0 else {
                throw ValidationError(
                    "--address-space needs --service PATH and --mode fault, without --compare or "
                        + "--invalidate-interval (a host's invalidations are its own memory changes: --host-churn)")
            }
        } else if service != nil {
            throw ValidationError("--service is for --address-space")
        }
        guard VhostMode(cliName: mode) != nil else {
            throw ValidationError("--mode '\(mode)' is not one of fault, pinned, no-iommu")
        }
        guard let bytes = parseSize(memory), bytes >= 8 << 20, bytes % 4096 == 0 else {
            throw ValidationError("--memory '\(memory)' is not a size of at least 8M in whole pages")
        }
        if let workingSet {
            guard let w = parseSize(workingSet), w >= 8 << 20 else {
                throw ValidationError(
                    "--working-set '\(workingSet)' is not a size of at least 8M (the rings take the first 2M)")
            }
        }
        guard seconds > 0 && seconds <= 86_400, warmup >= 0 else {
            throw ValidationError("--seconds must be positive, --warmup not negative")
        }
        guard invalidateInterval >= 0, hostChurn >= 0 else {
            throw ValidationError("--invalidate-interval and --host-churn must not be negative")
        }
        guard hostChurn == 0 || (mode == "fault" && !compare) else {
            throw ValidationError(
                "--host-churn needs --mode fault without --compare: pinned memory cannot be given back")
        }
        guard (60...2000).contains(packetSize) else {
            throw ValidationError("--packet-size must be 60...2000, got \(packetSize)")
        }
        guard (1...(1 << 18)).contains(updatePages), updatePages & (updatePages - 1) == 0,
            (1...512).contains(faultAround)
        else {
            throw ValidationError("--update-pages must be a power of two up to 262144 and --fault-around 1...512")
        }
    }

    func run() throws {
        var o = VhostOptions()
        o.backendPath = backend
        o.mode = VhostMode(cliName: mode)!
        o.memoryBytes = parseSize(memory)!
        o.seconds = seconds
        o.workingSetBytes = workingSet.flatMap(parseSize) ?? .max
        o.warmupSeconds = warmup
        o.invalidateInterval = invalidateInterval / 1000
        o.hostChurnInterval = hostChurn / 1000
        o.frameBytes = packetSize
        o.faultAroundPages = faultAround
        o.maxUpdatePages = updatePages
        var logger = json ? Logger(label: "iopf") { JSONLinesLogHandler(label: $0) } : Logger(label: "iopf")
        logger.logLevel = .warning
        let runs: [VhostRunResult]
        do {
            if compare {
                let r = try VhostSession.compare(o, logger: logger) { run in
                    if !json {
                        Output.progress("\(run.mode.cliName): \(String(format: "%.3f", run.mppsAfterWarmup)) Mpps")
                    }
                }
                if !json { Output.progress(nil) }
                runs = r.runs
                if json { try Output.printJSON(r) }
            } else if let addressSpace, let service {
                o.addressSpaceName = addressSpace
                let r = try VhostSession.runOnHost(o, servicePath: service)
                runs = [r]
                if json { try Output.printJSON(r) }
            } else {
                let r = try VhostSession.run(o, logger: logger)
                runs = [r]
                if json { try Output.printJSON(r) }
            }
        } catch {
            FileHandle.standardError.write(Data("iopf vhost: \(error)\n".utf8))
            throw ExitCode(2)
        }
        if !json {
            for r in runs { Self.summarize(r) }
        }
        let clean = runs.allSatisfy {
            $0.payloadErrors == 0 && $0.backendEnded == nil && $0.invalidationsAcked == $0.invalidationsPosted
        }
        if !clean { throw ExitCode(1) }
    }

    static func summarize(_ r: VhostRunResult) {
        let f = { (v: Double) in String(format: "%.3f", v) }
        print(
            "iopf vhost \(r.mode.cliName): \(f(r.mpps)) Mpps (\(f(r.mppsAfterWarmup)) after warm-up) "
                + "over \(f(r.seconds)) s; "
                + "\(r.packetsReceived) of \(r.packetsSent) packets back, \(r.payloadErrors) payload errors")
        if let name = r.addressSpace {
            print(
                "  served by the service as host '\(name)': its IOTLB figures are in iopf serve --json, hosts[].vhost")
            if r.hostChanges > 0 { print("  host changes: \(r.hostChanges) madvise") }
        } else if r.mode != .noIOMMU {
            print(
                "  IOTLB: \(r.iotlbMisses) misses (\(Int(r.missesPerSecond))/s), "
                    + "\(r.iotlbUpdates) updates of \(r.pagesUpdated) pages; "
                    + "miss to UPDATE acknowledged p50 \(r.missLatencyNs.p50 / 1000) µs, "
                    + "p99 \(r.missLatencyNs.p99 / 1000) µs, "
                    + "max \(r.missLatencyNs.max / 1000) µs; in the service p50 \(r.missServiceNs.p50 / 1000) µs, "
                    + "p99 \(r.missServiceNs.p99 / 1000) µs")
            if r.hostChanges > 0 {
                print("  host changes: \(r.hostChanges) madvise, \(r.uffdEvents) userfaultfd events read")
            }
            print(
                "  invalidations: \(r.invalidationsRequested) asked, \(r.invalidationsPosted) reached the back-end "
                    + "(\(r.invalidatesSent) IOTLB INVALIDATEs), \(r.invalidationsAcked) acknowledged")
        }
        print("  mapped \(r.mappedBytes >> 20) MiB, resident \(r.residentBytes >> 20) MiB")
        if let why = r.firstPayloadError { print("  ! first payload error: \(why)") }
        if let why = r.backendEnded { print("  ! the back-end: \(why)") }
    }
}

extension VhostMode {
    init?(cliName: String) {
        switch cliName {
        case "fault": self = .fault
        case "pinned": self = .pinned
        case "no-iommu": self = .noIOMMU
        default: return nil
        }
    }

    var cliName: String { self == .noIOMMU ? "no-iommu" : rawValue }
}

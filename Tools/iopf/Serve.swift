// Serve.swift — `iopf serve`: the fault service with simulated SVA devices. With no flags
// it runs the built-in demo: 4 devices over 256 MiB for 3 seconds with periodic
// invalidations of random ranges.

import ArgumentParser
import Foundation
import IOPFCore
import IOPFSimulation
import IOPFService
import IOPFSystem
import Logging

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve device page faults for simulated SVA devices and report what happened.",
        discussion: "Exits non-zero when data checks or invariant checks failed."
    )

    @Option(
        help:
            """
            Memory mode: fault (map on demand, nothing pinned) or pinned (VFIO type1: pin, lock and map everything \
            first).
            """
    )
    var mode = "fault"

    @Option(help: "Number of simulated devices in this process (0: only devices that connect to --listen).")
    var devices = 4

    @Option(help: "Host memory shared among the devices, e.g. 256M, 1G.")
    var memory = "256M"

    @Option(help: "Seconds to run (0: until SIGINT or SIGTERM).")
    var duration = 3.0

    @Option(
        help: "Accept devices and hosts in other processes on this AF_UNIX socket (protocol: IOPFWire's Protocol.md).")
    var listen: String?

    @Option(help: "Permissions of the --listen socket, in octal.")
    var socketMode = "0600"

    @Option(help: "Memory (and DMA window) each device that connects gets, e.g. 64M.")
    var deviceMemory = "64M"

    @Option(help: "Milliseconds a device that connected has to acknowledge an invalidation before it is fenced.")
    var invalidateTimeout = 1000.0

    @Option(help: "DMA pattern: \(Workload.allCases.map(\.rawValue).joined(separator: ", ")).")
    var workload = "random"

    @Option(help: "Milliseconds between invalidations of a random host range (0: none).")
    var invalidateInterval = 5.0

    @Option(
        help:
            """
            Milliseconds between host changes (madvise DONTNEED, mmap MAP_FIXED, mremap) to random parts of the \
            devices' memory, seen through userfaultfd (0: none).
            """
    )
    var hostChurn = 0.0

    @Option(help: "I/O page tables (domains); devices are spread over them.")
    var domains = 1

    @Option(
        help:
            """
            Fault channel: shared (memfd rings + eventfd doorbells), socket (AF_UNIX socketpair) or pipe (a pipe \
            each way).
            """
    )
    var transport = "shared"

    @Option(
        help:
            """
            Microseconds the simulated devices busy-poll for an answer before sleeping, and the service at most \
            after its last work (it spins less while work comes further apart: KVM's halt-polling rule).
            """
    )
    var spinMicroseconds = 200

    @Option(
        help:
            """
            Page request groups each simulated device keeps in flight, as PRI allows up to a device's credit \
            (1-64; the credit grows to cover them).
            """
    )
    var outstanding = 1

    @Option(
        help: ArgumentHelp(
            """
            DMA bursts each simulated device starts per second, or max (as fast as its thread runs: then the \
            devices' threads, not the service, decide the tail on a machine with few cores).
            """,
            valueName: "N|max"))
    var deviceRate = "100000"

    @Option(
        help: ArgumentHelp(
            """
            Scheduling of the simulated devices' threads: idle (SCHED_IDLE: they never take a CPU the service \
            wants, as hardware does not) or normal.
            """,
            valueName: "idle|normal"))
    var devicePriority = "idle"

    @Option(
        help: ArgumentHelp(
            """
            Threads the simulated devices share, each running its devices a DMA burst at a time and polling their \
            answers (a device waiting for an answer neither stops the others nor waits for a CPU when it comes), or \
            each (a thread per device). 1 on a 2-core machine takes the scheduler out of the tail; see \
            docs/benchmarks.md.
            """, valueName: "N|each"))
    var deviceThreads = "each"

    @Option(
        help:
            """
            Seconds between invariant checks while the devices run (0: only at the end). A check stops fault \
            service while it walks the I/O page tables, about 0.5 µs per mapped page.
            """
    )
    var checkInterval = 0.0

    @Option(help: "Seed for workloads and invalidations.")
    var seed: UInt64 = 1

    @Option(
        help: ArgumentHelp(
            """
            Map ahead of sequential faults: off, adaptive (a window per stream that grows while faults stay \
            sequential), or a fixed number of pages (1-512).
            """,
            valueName: "off|adaptive|N"))
    var faultAround = "adaptive"

    @Option(
        help: ArgumentHelp(
            """
            The CPU the service thread runs on alone, the in-process devices on the others (an IOMMU does not take \
            the devices' CPUs); auto: the last CPU this process may use when it may use two or more; none: \
            placement left to the scheduler.
            """,
            valueName: "N|auto|none"))
    var serviceCPU = "auto"

    @Flag(
        help:
            """
            Back the devices' memory with 2 MiB transparent huge pages and map a whole 2 MiB block on a fault \
            where one backs it (JSON blockMappings). Sets the shmem THP knob to advise if it is off.
            """
    )
    var hugePages = false

    @Option(
        help: ArgumentHelp(
            """
            Track which pages the in-process devices write and read the dirty log every MS milliseconds, checking \
            it against the pages really written (JSON dirty).
            """,
            valueName: "MS"))
    var dirtyLog: Double?

    @Option(help: ArgumentHelp("Memfd bytes one host may hand over, their sizes added (e.g. 1T).", valueName: "SIZE"))
    var maxHostMemory = "1T"

    @Option(help: ArgumentHelp("DMA-mapped bytes one host may hold, their sizes added (e.g. 4T).", valueName: "SIZE"))
    var maxHostMapped = "4T"

    @Option(
        help: ArgumentHelp(
            "Bytes one host may have pinned (DMA_MAP with PIN) at once, besides its RLIMIT_MEMLOCK "
                + "(default: half the RAM).", valueName: "SIZE"))
    var maxHostPinned: String?

    @Option(help: "Hosts one uid may have attached at once.")
    var maxHostsPerUid = ServiceConfiguration().maxHostsPerUID

    @Option(help: "Connections one uid may hold at once.")
    var maxPeersPerUid = ServiceConfiguration().maxPeersPerUID

    @Option(help: "Milliseconds a new connection has to send HELLO before it is cut.")
    var greetingTimeout = 2000.0

    @Flag(help: "Print one JSON object at the end instead of progress and a table.")
    var json = false

    func validate() throws {
        guard FaultAroundPolicy(faultAround) != nil else {
            throw ValidationError("--fault-around must be off, adaptive or a page count 1...512, got '\(faultAround)'")
        }
        if serviceCPU != "none" && serviceCPU != "auto",
            !(Int(serviceCPU).map { (0..<Sys.onlineCPUs).contains($0) } ?? false)
        {
            throw ValidationError(
                "--service-cpu must be auto, none or a CPU 0...\(Sys.onlineCPUs - 1), got '\(serviceCPU)'")
        }
        guard devices >= 0 && devices <= 4096 else {
            throw ValidationError("--devices must be 0...4096, got \(devices)")
        }
        guard devices > 0 || listen != nil else {
            throw ValidationError("--devices 0 needs --listen PATH: there would be no device")
        }
        guard let bytes = parseSize(memory), bytes >= 4096 * UInt64(max(devices, 1)) else {
            throw ValidationError(
                "--memory '\(memory)' must be a size like 256M or 1G, at least one 4 KiB page per device")
        }
        guard bytes <= 1 << 40 else { throw ValidationError("--memory '\(memory)' is above 1 TiB") }
        guard duration >= 0 && duration <= 86_400 else {
            throw ValidationError("--duration must be in [0, 86400] seconds, got \(duration)")
        }
        guard mode_t(socketMode, radix: 8).map({ $0 <= 0o777 }) == true else {
            throw ValidationError("--socket-mode '\(socketMode)' must be octal permissions like 0600 or 0660")
        }
        guard let dm = parseSize(deviceMemory), dm >= 4096, dm <= 1 << 30, dm & 0xFFF == 0 else {
            throw ValidationError(
                "--device-memory '\(deviceMemory)' must be a multiple of 4 KiB from 4K to 1G, e.g. 64M")
        }
        for (flag, value) in [
            ("--max-host-memory", maxHostMemory), ("--max-host-mapped", maxHostMapped),
            ("--max-host-pinned", maxHostPinned ?? "4K"),
        ] {
            guard let bytes = parseSize(value), bytes >= 4096 else {
                throw ValidationError("\(flag) '\(value)' is not a size like 64G")
            }
        }
        guard maxHostsPerUid >= 1, maxPeersPerUid >= 1 else {
            throw ValidationError("--max-hosts-per-uid and --max-peers-per-uid must be at least 1")
        }
        guard greetingTimeout >= 1 && greetingTimeout <= 600_000 else {
            throw ValidationError("--greeting-timeout must be 1...600000 ms, got \(greetingTimeout)")
        }
        guard invalidateTimeout >= 1 && invalidateTimeout <= 600_000 else {
            throw ValidationError("--invalidate-timeout must be 1...600000 ms, got \(invalidateTimeout)")
        }
        guard Workload(rawValue: workload) != nil else {
            throw ValidationError(
                "--workload '\(workload)' is not one of \(Workload.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        guard invalidateInterval >= 0 else {
            throw ValidationError("--invalidate-interval must not be negative, got \(invalidateInterval)")
        }
        guard let m = MemoryMode(rawValue: mode) else {
            throw ValidationError("--mode '\(mode)' is not one of fault, pinned")
        }
        guard m == .fault || hostChurn == 0 else {
            throw ValidationError("--host-churn needs --mode fault: pinned memory ignores host events")
        }
        guard hostChurn >= 0 else { throw ValidationError("--host-churn must not be negative, got \(hostChurn)") }
        guard domains >= 1 && domains <= 64 else { throw ValidationError("--domains must be 1...64, got \(domains)") }
        guard ChannelTransport(rawValue: transport) != nil else {
            throw ValidationError(
                """
                --transport '\(transport)' is not one of \
                \(ChannelTransport.allCases.map(\.rawValue).joined(separator: ", "))
                """
            )
        }
        if let dirtyLog {
            guard dirtyLog >= 1 && dirtyLog <= 600_000 else {
                throw ValidationError("--dirty-log must be 1...600000 ms, got \(dirtyLog)")
            }
            guard devices > 0 else {
                throw ValidationError("--dirty-log logs the in-process devices' memory: it needs --devices 1 or more")
            }
        }
        guard deviceRate == "max" || (Double(deviceRate).map { $0 >= 1 && $0 <= 100_000_000 } ?? false) else {
            throw ValidationError("--device-rate must be max or bursts per second 1...100000000, got '\(deviceRate)'")
        }
        guard devicePriority == "idle" || devicePriority == "normal" else {
            throw ValidationError("--device-priority must be idle or normal, got '\(devicePriority)'")
        }
        if deviceThreads != "each", !(Int(deviceThreads).map { (1...1024).contains($0) } ?? false) {
            throw ValidationError("--device-threads must be each or a thread count 1...1024, got '\(deviceThreads)'")
        }
        guard checkInterval >= 0 && checkInterval <= 86_400 else {
            throw ValidationError("--check-interval must be in [0, 86400] seconds, got \(checkInterval)")
        }
        guard (1...64).contains(outstanding) else {
            throw ValidationError("--outstanding must be 1...64, got \(outstanding)")
        }
        guard spinMicroseconds >= 0 else {
            throw ValidationError("--spin-microseconds must not be negative, got \(spinMicroseconds)")
        }
    }

    func run() throws {
        var o = ServeOptions()
        o.mode = MemoryMode(rawValue: mode)!
        o.devices = devices
        o.memoryBytes = parseSize(memory)! & ~0xFFF
        o.seconds = duration
        o.workload = Workload(rawValue: workload)!
        o.invalidateInterval = invalidateInterval / 1000
        o.domains = domains
        o.transport = ChannelTransport(rawValue: transport)!
        o.spinNanoseconds = Int64(spinMicroseconds) * 1000
        o.outstanding = outstanding
        o.checkInterval = checkInterval
        o.deviceRate = deviceRate == "max" ? nil : Double(deviceRate)
        o.idleDevices = devicePriority == "idle"
        o.deviceThreads = deviceThreads == "each" ? nil : Int(deviceThreads)
        o.faultAround = FaultAroundPolicy(faultAround)!
        o.hugePages = hugePages
        switch serviceCPU {
        case "none": o.serviceCPU = nil
        case "auto":
            let cpus = Sys.allowedCPUs
            o.serviceCPU = cpus.count >= 2 ? cpus.last : nil
        default: o.serviceCPU = Int(serviceCPU)
        }
        o.seed = seed
        o.hostChurnInterval = hostChurn / 1000
        o.listenPath = listen
        o.socketMode = mode_t(socketMode, radix: 8)!
        o.deviceMemoryBytes = parseSize(deviceMemory)!
        o.invalidateTimeout = .milliseconds(invalidateTimeout)
        o.tenantLimits.maxHostMemoryBytes = parseSize(maxHostMemory)!
        o.tenantLimits.maxHostMappedBytes = parseSize(maxHostMapped)!
        if let maxHostPinned { o.tenantLimits.maxHostPinnedBytes = parseSize(maxHostPinned)! }
        o.tenantLimits.maxHostsPerUID = maxHostsPerUid
        o.tenantLimits.maxPeersPerUID = maxPeersPerUid
        o.tenantLimits.greetingTimeout = .milliseconds(greetingTimeout)
        o.dirtyLogInterval = dirtyLog.map { $0 / 1000 }
        // With --json the log stays, as JSON lines on standard error; the result alone is on standard output.
        var logger = json ? Logger(label: "iopf") { JSONLinesLogHandler(label: $0) } : Logger(label: "iopf")
        logger.logLevel = listen != nil ? .info : .warning
        Signals.stopOnInterrupt()
        let result = try ServeSession.run(o, logger: logger, shouldStop: Signals.stopRequested) { p in
            guard !json else { return }
            Output.progress(
                String(
                    format: "%5.1fs  faults %9d (%7.0f/s)  groups %8d  invalidations %6d  violations %d  external %d",
                    p.elapsed, p.faults, Double(p.faults) / max(p.elapsed, 0.001), p.groups, p.invalidations,
                    p.violations, p.externalDevices))
        }
        if json {
            try Output.printJSON(result)
        } else {
            Output.progress(nil)
            printSummary(result)
        }
        if result.integrityErrors > 0 || result.violations > 0 { throw ExitCode(1) }
    }

    func printSummary(_ r: ServeResult) {
        func row(_ name: String, _ value: String) {
            print(name.padding(toLength: 26, withPad: " ", startingAt: 0) + value)
        }
        print(
            """
            iopf serve (\(r.mode)): \(r.devices) devices, \(memory) memory, \(r.domains) domain(s), \(r.transport) \
            channel, \(String(format: "%.2f", r.elapsedSeconds)) s
            """
        )
        if devices > 0 {
            let rate = deviceRate == "max" ? "as fast as their threads run" : "at up to \(deviceRate) DMA bursts/s each"
            let placement = r.deviceThreads == devices ? "a thread each" : "sharing \(r.deviceThreads) thread(s)"
            print("devices: \(rate), \(placement), \(devicePriority) priority, \(outstanding) group(s) in flight each")
        }
        if let cpu = r.serviceCPU { print("service thread: CPU \(cpu), alone (--service-cpu)") }
        row("DMA operations", "\(r.dmaOps) (\(r.dmaErrors) errors)")
        row("page requests (faults)", "\(r.faults) in \(r.groups) groups")
        row("responses", "\(r.responses.success) success, \(r.responses.invalid) invalid")
        if r.prefetchedPages > 0 { row("pages mapped ahead", "\(r.prefetchedPages) (fault-around \(faultAround))") }
        if hugePages { row("2 MiB blocks on faults", "\(r.blockMappings)") }
        func latency(_ l: LatencySummary) -> String {
            "p50 \(us(l.p50))  p90 \(us(l.p90))  p99 \(us(l.p99))  p99.9 \(us(l.p999))  max \(us(l.max))"
        }
        if let a = r.answerLatencyNs { row("fault latency (answer)", latency(a)) }
        row("fault latency (device)", latency(r.faultLatencyNs))
        row(
            "invalidations",
            """
            \(r.invalidations): \(r.pagesUnmapped) pages unmapped, \(r.iotlbSyncs) IOTLB syncs, \(r.retries) fault \
            retries
            """
        )
        if r.uffdEvents > 0 || r.hostChanges > 0 {
            let kinds = r.uffdEventKinds.sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }.joined(
                separator: ", ")
            row("host events (uffd)", "\(r.uffdEvents) (\(kinds)) from \(r.hostChanges) host changes")
            row("late accesses", "\(r.lateAccesses) (after an event was read, before its sync)")
            row("faults on gone memory", "\(r.hostGoneFaults) answered INVALID")
        }
        if listen != nil {
            let kinds = r.protocolErrorKinds.sorted { $0.key.rawValue < $1.key.rawValue }.map {
                "\($0.value) \($0.key.rawValue)"
            }.joined(separator: ", ")
            row(
                "external devices",
                "\(r.externalDevices) attached, \(r.devicesFenced) fenced, \(r.peersDisconnected) disconnected")
            row("protocol errors", "\(r.protocolErrors)" + (kinds.isEmpty ? "" : " (\(kinds))"))
            for h in r.hosts {
                row(
                    "host '\(h.name)'",
                    """
                    pid \(h.pid), \(mib(h.memoryBytes)), \(h.mappings) mappings, \(h.addressUpdates) address \
                    updates, \(h.devices) devices, \(h.uffdEvents) uffd events
                    """
                        + (h.ended.map { "; ended: \($0)" } ?? ""))
            }
        }
        if let d = r.dirty {
            let ratio =
                d.written > 0 ? String(format: " (%.3f of written)", Double(d.reported) / Double(d.written)) : ""
            row(
                "dirty log",
                """
                \(d.rounds) rounds: \(d.reported) pages reported\(ratio), \(d.written) written, \(d.missed) \
                missed, \(d.extra) extra
                """
            )
        }
        row("resident / locked", "\(mib(r.residentBytes)) / \(mib(r.lockedBytes))")
        row("integrity errors", "\(r.integrityErrors)")
        row("invariant violations", "\(r.violations)")
        for p in r.problems { print("  ! \(p)") }
    }

    func us(_ ns: UInt64) -> String { String(format: "%.1fµs", Double(ns) / 1000) }
    func mib(_ b: UInt64) -> String { String(format: "%.1f MiB", Double(b) / 1_048_576) }
}

/// "256M", "1G", "4096", "2T" → bytes.
func parseSize(_ text: String) -> UInt64? {
    let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
    var s = text.uppercased()
    if s.hasSuffix("IB") { s.removeLast(2) } else if s.hasSuffix("B") { s.removeLast() }
    guard let last = s.last else { return nil }
    if let unit = units[last] {
        guard let n = UInt64(s.dropLast()), n.multipliedReportingOverflow(by: unit).overflow == false else {
            return nil
        }
        return n * unit
    }
    return UInt64(s)
}

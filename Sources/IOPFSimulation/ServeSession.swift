// ServeSession.swift — one run of the fault service with simulated devices, shared by
// `iopf serve` and the end-to-end tests.
//
// Layout: one shared host region of `memoryBytes`, split evenly among the in-process
// devices; device d's slice is one DMA mapping at IOVA `iovaBase + d * slice`. Devices
// attach to domain `d % domains`. With `listenPath`, devices in other processes attach
// over the socket too, each to a DMA window of its own (`deviceMemoryBytes` of fresh
// memory at `externalIOVABase + k * 1 GiB`), so devices never share pages by accident.
// A host thread asks for invalidations of random page ranges, over all of that memory,
// every `invalidateInterval`.

import CIOPFShim
import Foundation
import Glibc
import Histogram
import IOPFCore
import IOPFDevice
import IOPFService
import IOPFSystem
import Logging

/// Fault-driven (nothing pinned, pages mapped on demand) or pinned (VFIO type1: all
/// memory pinned, locked and mapped before the devices start).
package enum MemoryMode: String, Sendable, CaseIterable, Codable {
    case fault, pinned
}

extension EngineConfiguration {
    /// The engine for `mode` in this process: faults map single pages (and 2 MiB blocks
    /// where huge pages back them, with `hugePages`), pinning maps whole runs with blocks;
    /// locked memory follows this process's RLIMIT_MEMLOCK and CAP_IPC_LOCK.
    package static func forThisProcess(mode: MemoryMode, hugePages: Bool = false) -> EngineConfiguration {
        var config = EngineConfiguration()
        config.pageSizes = mode == .pinned ? Set(PageSize.allCases) : hugePages ? [.size4K, .size2M] : [.size4K]
        config.blocksOnFault = mode == .fault && hugePages
        let limits = LockedMemoryLimits.current()
        config.lockedMemoryLimit = limits.limitBytes
        config.bypassesLockedMemoryLimit = limits.capIPCLock
        return config
    }
}

package struct ServeOptions: Sendable {
    package var mode = MemoryMode.fault
    package var devices = 4
    package var memoryBytes: UInt64 = 256 << 20
    package var seconds = 3.0
    package var workload = Workload.random
    /// Seconds between invalidations (0: none).
    package var invalidateInterval = 0.005
    /// Largest invalidation, in pages.
    package var invalidateMaxPages = 512
    package var domains = 1
    package var seed: UInt64 = 1
    package var transport = ChannelTransport.shared
    package var spinNanoseconds: Int64 = 200_000
    /// Page request groups each in-process device keeps in flight (`--outstanding`); its
    /// credit is raised to cover them.
    package var outstanding = 1
    /// DMA bursts each in-process device starts per second, at most (`--device-rate`);
    /// nil: as fast as its thread runs. Hardware devices do not take the host's CPUs; a
    /// paced device leaves them to the service, so the latency measured is the service's.
    package var deviceRate: Double? = 100_000
    /// In-process devices run at idle priority (`--device-priority idle`): the service
    /// thread always gets a CPU when it wants one.
    package var idleDevices = true
    /// Threads the in-process devices share (`--device-threads N`): each runs its devices
    /// a step at a time and polls their answers, so that a device waiting for an answer
    /// neither stops the others nor waits for a CPU once it comes. nil (`each`, the
    /// default): a thread per device. Devices with a dirty-log quota always get their own.
    package var deviceThreads: Int?
    /// Seconds between invariant checks while devices run (`--check-interval`; 0: only
    /// at the end). A check walks every I/O page table on the service thread, holding the
    /// engine's lock: about 0.5 µs per mapped page, during which no fault is served.
    package var checkInterval = 0.0
    /// Mapping ahead of sequential faults (`--fault-around`).
    package var faultAround = FaultAroundPolicy.adaptive
    /// Back the devices' memory with 2 MiB transparent huge pages and map a whole block
    /// on a fault where one backs it (`--huge-pages`); each device's share is rounded
    /// down to whole 2 MiB blocks.
    package var hugePages = false
    /// The CPU the service thread runs on alone, the in-process devices on the others, as
    /// an IOMMU's fault handling does not compete with the devices it serves; nil: no
    /// placement (`--service-cpu`).
    package var serviceCPU: Int?
    package var gatherPolicy = GatherPolicy.defaultRangeList
    /// Stop each device after this many DMA operations instead of after `seconds`.
    package var operationsPerDevice: Int?
    /// Seconds between host changes to the devices' memory: madvise(MADV_DONTNEED),
    /// mmap(MAP_FIXED) over a range, or mremap of a range (0: none).
    package var hostChurnInterval = 0.0
    /// Largest host change, in pages.
    package var hostChurnMaxPages = 64
    /// Accept devices in other processes on this AF_UNIX socket.
    package var listenPath: String?
    package var socketMode: mode_t = 0o600
    /// Memory (and DMA window) each external device gets.
    package var deviceMemoryBytes: UInt64 = 64 << 20
    package var invalidateTimeout: Duration = .seconds(1)
    /// Trust between tenants: the limits a peer, a uid and a host live within (`serve` flags;
    /// ServiceConfiguration documents each).
    package var tenantLimits = TenantLimits()
    /// Seconds between reads of the dirty log over the in-process devices' memory (nil:
    /// no dirty tracking). `--dirty-log MS`.
    package var dirtyLogInterval: Double?
    /// With `dirtyLogInterval`: the share of the in-process memory the devices write per
    /// round, at most (random pages; then they wait for the next round). Nil: no limit.
    package var dirtyShare: Double?
    package static let iovaBase: UInt64 = 1 << 32
    package static let externalIOVABase: UInt64 = 1 << 44
    package init() {}
}

extension Histogram where Count == UInt64 {
    /// A histogram of latencies in nanoseconds: up to 60 s, three significant digits.
    static func nanoseconds() -> Histogram<UInt64> {
        Histogram(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
    }
}

package struct LatencySummary: Codable, Sendable, Equatable {
    package var p50: UInt64 = 0
    package var p90: UInt64 = 0
    package var p99: UInt64 = 0
    package var p999: UInt64 = 0
    package var max: UInt64 = 0

    package init() {}

    package init(_ h: Histogram<UInt64>) {
        guard h.totalCount > 0 else { return }
        p50 = h.valueAtPercentile(50)
        p90 = h.valueAtPercentile(90)
        p99 = h.valueAtPercentile(99)
        p999 = h.valueAtPercentile(99.9)
        max = h.max
    }
}

/// What a serve run itself saw: its shape, the devices' DMA and latencies, the checks.
package struct ServeRun: Codable, Sendable {
    package var mode = "fault"
    package var devices = 0
    package var domains = 0
    package var transport = ""
    package var dmaOps = 0
    package var dmaErrors = 0
    package var integrityErrors = 0
    package var violations = 0
    /// Threads the in-process devices ran on (`--device-threads`; as many as devices when
    /// each had its own).
    package var deviceThreads = 0
    /// The CPU the service thread ran on alone (`--service-cpu`); nil: no placement.
    package var serviceCPU: Int?
    /// Host changes made by `--host-churn`.
    package var hostChanges = 0
    /// Device accesses through a translation after its host event was read but before
    /// its sync (see HostChangeWindow).
    package var lateAccesses = 0
    package var residentBytes: UInt64 = 0
    /// Of the devices' memory (the in-process region and external devices' windows), at
    /// the end of the run; a pinned run checks that all of it is unlocked after unmap.
    package var lockedBytes: UInt64 = 0
    /// Device-observed: from sending a group to the device taking its answer, which
    /// includes the simulated device's thread waiting for a CPU to look.
    package var faultLatencyNs = LatencySummary(Histogram<UInt64>())
    /// From sending a group to the service publishing its answer, as a hardware device
    /// would see it (shared rings only: their "answered at" stamp; absent otherwise).
    package var answerLatencyNs: LatencySummary?
    package var elapsedSeconds = 0.0
    /// With `--dirty-log`: reads of the log against what the devices really wrote.
    package var dirty: DirtySummary?
    /// The first problems seen, enough to reproduce (empty on a clean run).
    package var problems: [String] = []
}

/// What a session prints as JSON: the run's own figures (`Run`) and, embedded whole, the
/// service's and the engine's statistics at its end. The JSON is one flat object (the keys
/// scripts use: `faults`, `groups`, `protocolErrorKinds`, `hosts`, ...); in Swift the
/// statistics' fields read through as if they were the report's own.
@dynamicMemberLookup
package struct RunReport<Run: Codable & Sendable>: Encodable, Sendable {
    /// Responses by code.
    package struct Responses: Codable, Sendable, Equatable {
        package var success = 0
        package var invalid = 0
    }

    package var run: Run
    package var service = ServiceStatistics()
    package var engine = EngineStatistics()

    package init(run: Run) { self.run = run }

    package subscript<T>(dynamicMember path: WritableKeyPath<Run, T>) -> T {
        get { run[keyPath: path] }
        set { run[keyPath: path] = newValue }
    }
    package subscript<T>(dynamicMember path: KeyPath<ServiceStatistics, T>) -> T { service[keyPath: path] }
    package subscript<T>(dynamicMember path: KeyPath<EngineStatistics, T>) -> T { engine[keyPath: path] }

    /// Page requests served (the service's well-formed records).
    package var faults: Int { service.records }
    /// Groups answered, as the service counts them.
    package var groups: Int { service.groups }
    /// Pages mapped ahead of faults (`--fault-around`), as the service counts them.
    package var prefetchedPages: Int { service.prefetchedPages }
    package var responses: Responses { Responses(success: service.success, invalid: service.invalid) }
    /// Host events by kind.
    package var uffdEventKinds: [String: Int] {
        ["remove": service.uffdRemove, "unmap": service.uffdUnmap, "remap": service.uffdRemap]
    }

    private enum Derived: String, CodingKey { case faults, responses, uffdEventKinds }

    /// One object: the engine's statistics, then the service's (which win where both have
    /// a key), then the run's, then the derived keys.
    package func encode(to encoder: any Encoder) throws {
        try engine.encode(to: encoder)
        try service.encode(to: encoder)
        try run.encode(to: encoder)
        var c = encoder.container(keyedBy: Derived.self)
        try c.encode(faults, forKey: .faults)
        try c.encode(responses, forKey: .responses)
        try c.encode(uffdEventKinds, forKey: .uffdEventKinds)
    }
}

/// What `iopf serve --json` prints.
package typealias ServeResult = RunReport<ServeRun>

package struct ServeProgress: Sendable {
    package var elapsed: Double
    package var faults: Int
    package var groups: Int
    package var invalidations: Int
    package var violations: Int
    package var externalDevices: Int
}

/// Gives each external device a DMA window of fresh shared memory, mapped at attach and
/// removed at detach (on the service thread: `unmap` unwatches the range before the
/// region is unmapped, so nothing waits for a host event there).
final class ServeProvisioner: DeviceProvisioner, @unchecked Sendable {
    weak var service: FaultService?
    let domains: [DomainID]
    let bytes: UInt64
    let mode: MemoryMode
    let hugePages: Bool
    private let state = Lock<(next: Int, free: [Int], live: [Int: HostRegion])>((0, [], [:]))

    init(domains: [DomainID], bytes: UInt64, mode: MemoryMode, hugePages: Bool = false) {
        self.domains = domains
        self.bytes = bytes
        self.mode = mode
        self.hugePages = hugePages
    }

    func provision(deviceID: UInt32, pasid: UInt32?) throws(ServiceError) -> DeviceProvision {
        guard let service else { throw .stopped }
        let k = state.withLock { s in
            if let k = s.free.popLast() { return k }
            defer { s.next += 1 }
            return s.next
        }
        let iova = ServeOptions.externalIOVABase + UInt64(k) << 30
        do {
            let region = try HostRegion(length: bytes, alignment: 2 << 20, hugePages: hugePages)
            switch mode {
            case .fault: try service.map(iova: iova, vaddr: region.base, size: bytes, prot: .readWrite)
            case .pinned: try service.mapPinned(iova: iova, vaddr: region.base, size: bytes, prot: .readWrite)
            }
            state.withLock { $0.live[k] = region }
            return DeviceProvision(
                domain: domains[k % domains.count], windows: [DMAWindow(iova: iova, size: bytes, prot: 3)],
                regions: [region], token: k)
        } catch {
            state.withLock { $0.free.append(k) }
            throw .invalidRequest("cannot give device \(deviceID) \(bytes >> 20) MiB of memory: \(error)")
        }
    }

    func release(_ p: DeviceProvision) {
        _ = try? service?.unmap(iova: p.windows[0].iova, size: p.windows[0].size)
        state.withLock { s in
            s.live[p.token] = nil
            s.free.append(p.token)
        }
    }

    /// The external devices' memory now, for invalidating it.
    var regions: [HostRegion] { state.withLock { Array($0.live.values) } }
}

package enum ServeSession {
    /// Runs the demo and returns its summary. `progress` is called about twice a second.
    /// With `seconds` 0 it runs until `shouldStop` says so (SIGINT/SIGTERM in the CLI).
    package static func run(
        _ o: ServeOptions, logger: Logger = Logger(label: "iopf"),
        shouldStop: @escaping () -> Bool = { false },
        progress: (ServeProgress) -> Void = { _ in }
    ) throws -> ServeResult {
        precondition(o.devices >= 0 && o.domains > 0, "devices must not be negative; at least one domain")
        precondition(o.devices > 0 || o.listenPath != nil, "no devices: at least one in-process device or --listen")
        let setup = try ServeSetup(o, logger: logger)
        defer { setup.service.stop() }
        var result = ServeResult(run: ServeRun())
        result.deviceThreads = setup.startDevices()
        result.serviceCPU = o.serviceCPU
        var loop = try ServeLoop(setup)
        loop.run(shouldStop: shouldStop, progress: progress)
        setup.summarize(loop, into: &result)
        return result
    }

    /// The value of a /proc "Name:<whitespace>N kB" line, in bytes. The padding after the
    /// colon is tabs and spaces, or just a tab once N has 8 digits.
    static func procBytes(_ line: Substring) -> UInt64? {
        line.split(whereSeparator: \.isWhitespace).dropFirst().first.flatMap { UInt64($0) }.map { $0 * 1024 }
    }
}

/// Changes the devices' host memory the way a VMM or guest would, so that real
/// userfaultfd events flow: MADV_REMOVE (REMOVE: the shared pages are freed),
/// mmap(MAP_FIXED) of the same memfd range over itself (UNMAP), mremap with
/// MREMAP_DONTUNMAP (REMAP). The ranges always stay mapped to the same memfd pages, so a
/// device that still holds a translation touches memory of the region rather than a hole. After an UNMAP or
/// REMAP the mapping's host address is re-declared (VFIO_DMA_MAP_FLAG_VADDR), as a VMM
/// does after replacing guest memory; faults in between are answered INVALID.
/// A serve run's first phase: the memory, the service, the in-process devices (mapped,
/// not started) and the listener.
struct ServeSetup {
    let options: ServeOptions
    let slicePages: Int
    let slice: UInt64
    let region: HostRegion?
    let rig: Rig
    let devices: [SimulatedDevice]
    let ledger: DirtyLedger?
    let provisioner: ServeProvisioner

    var engine: FaultEngine { rig.engine }
    var service: FaultService { rig.service }
    /// The in-process devices' memory, which the dirty log covers.
    var loggedBytes: UInt64 { slice * UInt64(options.devices) }

    init(_ o: ServeOptions, logger: Logger) throws {
        options = o
        var slicePages = o.devices > 0 ? Int(o.memoryBytes >> 12) / o.devices : 0
        if o.hugePages {
            slicePages &= ~(hugeBlockPages - 1)
            if let notice = try HugePages.enableForShmem() { logger.warning("\(notice)") }
        }
        guard o.devices == 0 || slicePages > 0 else {
            let unit = o.hugePages ? " of 2 MiB blocks" : ""
            throw ServiceError.invalidRequest("--memory is too small for \(o.devices) devices\(unit)")
        }
        self.slicePages = slicePages
        slice = UInt64(slicePages) << 12
        region =
            o.devices > 0
            ? try HostRegion(length: slice * UInt64(o.devices), alignment: 2 << 20, hugePages: o.hugePages) : nil

        var config = EngineConfiguration.forThisProcess(mode: o.mode, hugePages: o.hugePages)
        config.gatherPolicy = o.gatherPolicy
        var serviceConfig = ServiceConfiguration()
        serviceConfig.transport = o.transport
        serviceConfig.spinNanoseconds = o.spinNanoseconds
        serviceConfig.faultAround = o.faultAround
        serviceConfig.loopCPU = o.serviceCPU
        serviceConfig.hostEvents = o.mode == .fault
        serviceConfig.invalidateTimeout = o.invalidateTimeout
        o.tenantLimits.apply(to: &serviceConfig)
        rig = try Rig(engine: config, service: serviceConfig, domains: o.domains, logger: logger)
        let service = rig.service
        do {
            ledger =
                o.dirtyLogInterval != nil && o.devices > 0
                ? DirtyLedger(iovaBase: ServeOptions.iovaBase, pages: slicePages * o.devices) : nil
            devices = try Self.makeDevices(o, rig: rig, region: region, slicePages: slicePages, ledger: ledger)
            if ledger != nil {
                try rig.engine.startDirtyTracking(iova: ServeOptions.iovaBase, size: slice * UInt64(o.devices))
                ledger!.trackingStarted()
            }
            provisioner = ServeProvisioner(
                domains: rig.domains, bytes: o.deviceMemoryBytes, mode: o.mode, hugePages: o.hugePages)
            provisioner.service = service
            if let path = o.listenPath {
                try service.listen(path: path, mode: o.socketMode, provisioner: provisioner)
            }
        } catch {
            service.stop()
            throw error
        }
    }

    /// One device per slice of the region, mapped (fault-driven or pinned) at its IOVA.
    private static func makeDevices(
        _ o: ServeOptions, rig: Rig, region: HostRegion?, slicePages: Int, ledger: DirtyLedger?
    ) throws -> [SimulatedDevice] {
        let slice = UInt64(slicePages) << 12
        var devices: [SimulatedDevice] = []
        for d in 0..<o.devices {
            let iova = ServeOptions.iovaBase + UInt64(d) * slice
            let host = region!.base + UInt64(d) * slice
            switch o.mode {
            case .fault: try rig.service.map(iova: iova, vaddr: host, size: slice, prot: .readWrite)
            case .pinned: try rig.service.mapPinned(iova: iova, vaddr: host, size: slice, prot: .readWrite)
            }
            var dc = DeviceConfiguration(
                deviceID: UInt32(d + 1), iovaBase: iova, pages: slicePages, hostBase: host,
                physBase: region!.phys! + UInt64(d) * slice)
            dc.workload = o.workload
            dc.avoidCPU = o.serviceCPU
            dc.seed = o.seed &+ UInt64(d) &* 7919
            dc.spinNanoseconds = o.spinNanoseconds
            dc.outstanding = o.outstanding
            dc.burstsPerSecond = o.deviceRate
            dc.idlePriority = o.idleDevices
            dc.credit = DeviceConfiguration.credit(outstanding: o.outstanding, burst: dc.burst)
            dc.operationLimit = o.operationsPerDevice
            dc.hostMayChangeMemory = o.hostChurnInterval > 0
            dc.dirtyLedger = ledger
            dc.writesPerRound = o.dirtyShare.map { max(1, Int(Double(slicePages) * $0)) }
            if o.dirtyShare != nil { dc.writePercent = 100 }
            devices.append(try rig.device(dc, domain: d % o.domains, regions: [region!]))
        }
        return devices
    }

    /// Starts the devices, on shared threads with `--device-threads`; the threads used.
    func startDevices() -> Int {
        let o = options
        guard let n = o.deviceThreads, devices.allSatisfy({ $0.configuration.writesPerRound == nil }) else {
            devices.forEach { $0.start() }
            return devices.count
        }
        let threads = min(n, devices.count)
        for t in 0..<threads {
            SimulatedDevice.startShared(
                stride(from: t, to: devices.count, by: threads).map { devices[$0] },
                idlePriority: o.idleDevices, avoidCPU: o.serviceCPU, name: "iopf-devices-\(t)")
        }
        return threads
    }

    /// The last phase: stops the devices and the service and fills `result` from their
    /// reports, the statistics, the checks and the memory's state.
    func summarize(_ loop: ServeLoop, into result: inout ServeResult) {
        let o = options
        var problems = loop.problems
        var violations = loop.violations
        let reports = devices.map { $0.finish() }
        if let ledger {  // the last round: every write has landed
            if let bits = try? engine.readAndClearDirty(iova: ServeOptions.iovaBase, size: loggedBytes) {
                ledger.roundRead(bits)
            }
            result.dirty = ledger.finish()
            result.dirty!.readNs = LatencySummary(loop.readTimes)
            if result.dirty!.missed > 0 { problems += result.dirty!.firstMissed ?? [] }
        }
        let seconds = loop.elapsed()
        violations += (try? service.checkInvariants().wait()) ?? []
        service.stop()

        result.mode = o.mode.rawValue
        result.devices = o.devices
        result.domains = o.domains
        result.transport = o.transport.rawValue
        var latency = Histogram<UInt64>.nanoseconds()
        var answerLatency = latency
        var deviceViolations = 0
        for r in reports {
            result.dmaOps += r.dmaOps
            result.dmaErrors += r.dmaErrors
            result.integrityErrors += r.integrityErrors + r.wrongTranslations
            deviceViolations += r.staleTranslations
            problems += r.firstProblems
            latency.add(r.latency)
            answerLatency.add(r.answerLatency)
        }
        for d in devices {
            let bad = d.verifyHostMemory()
            result.integrityErrors += bad.count
            problems += bad
        }
        result.service = service.statistics
        result.service.uffdEventsBySource["own", default: 0] += 0
        result.engine = engine.statistics
        result.hostChanges = loop.churn?.changes ?? 0
        result.lateAccesses = service.window.lateAccesses
        // Every group answered exactly once: what devices sent, got, and the service answered
        // agree (checked when every device is in this process).
        let s = result.service
        let sent = reports.reduce(0) { $0 + $1.groups }
        let answered = reports.reduce(0) { $0 + $1.success + $1.invalid }
        let protocolErrors = reports.reduce(0) { $0 + $1.protocolErrors }
        var accounting: [String] = []
        if s.externalDevices == 0 && (sent != answered || answered != s.groups - s.abandonedGroups) {
            accounting.append(
                "groups sent \(sent), answered to devices \(answered), "
                    + "answered by the service \(s.groups - s.abandonedGroups)")
        }
        result.violations =
            violations.count + protocolErrors + accounting.count + deviceViolations + (result.dirty?.missed ?? 0)
        problems += violations.prefix(5).map(\.description) + accounting
        result.residentBytes = (try? region?.residentBytes() ?? 0) ?? 0
        result.lockedBytes = ([region].compactMap { $0 } + provisioner.regions).reduce(0) { $0 + $1.lockedBytes() }
        if o.mode == .pinned {
            for d in 0..<o.devices {
                _ = try? service.unmap(iova: ServeOptions.iovaBase + UInt64(d) * slice, size: slice)
            }
            if let stillLocked = region?.lockedBytes(), stillLocked > 0 {
                problems.append("\(stillLocked) bytes of the devices' memory stayed locked after unmap")
            }
        }
        result.faultLatencyNs = LatencySummary(latency)
        if answerLatency.totalCount > 0 { result.answerLatencyNs = LatencySummary(answerLatency) }
        result.elapsedSeconds = seconds
        result.problems = Array(problems.prefix(10))
    }
}

/// A serve run's middle phase: until the run ends, the periodic work (invalidations, host
/// churn, dirty-log reads, invariant checks, progress), each on its own schedule.
struct ServeLoop {
    let setup: ServeSetup
    let start = ContinuousClock.now
    var rng: Xoshiro
    var violations: [InvariantViolation] = []
    var problems: [String] = []
    var readTimes = Histogram<UInt64>.nanoseconds()
    var churn: HostChurn?
    private var nextInvalidate = 0.0
    private var nextProgress = 0.5
    private var nextCheck: Double
    private var nextChurn = 0.0
    private var nextDirtyRead: Double

    init(_ setup: ServeSetup) throws {
        let o = setup.options
        self.setup = setup
        rng = Xoshiro(seed: o.seed ^ 0x5EED)
        nextCheck = o.checkInterval > 0 ? o.checkInterval : .infinity
        nextDirtyRead = o.dirtyLogInterval ?? .infinity
        let service = setup.service
        if o.hostChurnInterval > 0 && service.hostEventsEnabled, let region = setup.region {
            churn = try HostChurn(
                service: service, region: region, slice: setup.slice, devices: setup.devices,
                maxPages: o.hostChurnMaxPages, seed: o.seed)
        }
        if o.hostChurnInterval > 0 && !service.hostEventsEnabled {
            problems.append("--host-churn needs host events, which are off: \(service.hostEventsUnavailable ?? "")")
        }
    }

    /// Seconds since the run started.
    func elapsed() -> Double { (ContinuousClock.now - start).seconds }

    /// Whether the run goes on: not asked to stop, devices with work left, time left.
    func running(_ shouldStop: () -> Bool) -> Bool {
        let o = setup.options
        if shouldStop() { return false }
        if o.operationsPerDevice != nil && o.devices > 0 { return !setup.devices.allSatisfy { $0.isFinished } }
        return o.seconds == 0 || elapsed() < o.seconds
    }

    mutating func run(shouldStop: () -> Bool, progress: (ServeProgress) -> Void) {
        let o = setup.options
        while running(shouldStop) {
            let now = elapsed()
            if o.invalidateInterval > 0 && now >= nextInvalidate {
                invalidateSomewhere()
                nextInvalidate = now + o.invalidateInterval
            }
            if churn != nil && now >= nextChurn {
                do { try churn!.step() } catch {
                    problems.append("host change failed: \(error)")
                    churn = nil
                }
                nextChurn = now + o.hostChurnInterval
            }
            if let ledger = setup.ledger, now >= nextDirtyRead {
                do {
                    let t0 = ContinuousClock.now
                    let bits = try setup.engine.readAndClearDirty(iova: ServeOptions.iovaBase, size: setup.loggedBytes)
                    readTimes.record(UInt64(max(0, (ContinuousClock.now - t0).nanoseconds)))
                    ledger.roundRead(bits)
                } catch {
                    problems.append("reading the dirty log failed: \(error)")
                }
                nextDirtyRead = now + o.dirtyLogInterval!
            }
            if now >= nextCheck {
                violations += (try? setup.service.checkInvariants().wait()) ?? []
                nextCheck = now + o.checkInterval
            }
            if now >= nextProgress {
                let s = setup.service.statistics
                progress(
                    ServeProgress(
                        elapsed: now, faults: s.records, groups: s.groups, invalidations: s.invalidationRequests,
                        violations: violations.count, externalDevices: s.externalDevices))
                nextProgress = now + 0.5
            }
            let nap = min(
                o.invalidateInterval > 0 ? o.invalidateInterval / 2 : 0.01, 0.025, (o.dirtyLogInterval ?? 1) / 4)
            usleep(UInt32(nap * 1e6))
        }
    }

    /// Invalidates a random range of the in-process region or of an external device's window.
    private mutating func invalidateSomewhere() {
        let o = setup.options
        let targets = (setup.region.map { [$0] } ?? []) + setup.provisioner.regions
        guard !targets.isEmpty else { return }
        let target = targets[Int(rng.next() % UInt64(targets.count))]
        let pages = 1 + Int(rng.next() % UInt64(o.invalidateMaxPages))
        let first = Int(rng.next() % UInt64(target.length >> 12))
        let length = UInt64(min(pages, Int(target.length >> 12) - first)) << 12
        do {
            _ = try setup.service.invalidate(hostAddress: target.base + UInt64(first) << 12, length: length).wait()
        } catch {
            problems.append("invalidation failed: \(error)")
        }
    }
}

struct HostChurn {
    let service: FaultService
    let region: HostRegion
    /// The region is a run of equal DMA mappings of this size, the first at `iovaBase`.
    let mappingBytes: UInt64
    let iovaBase: UInt64
    let devices: [SimulatedDevice]
    let maxPages: Int
    let scratch: HostRegion
    var rng: Xoshiro
    var changes = 0

    init(
        service: FaultService, region: HostRegion, slice: UInt64, devices: [SimulatedDevice], maxPages: Int,
        seed: UInt64,
        iovaBase: UInt64 = ServeOptions.iovaBase
    ) throws {
        self.service = service
        self.region = region
        mappingBytes = slice
        self.iovaBase = iovaBase
        self.devices = devices
        self.maxPages = max(1, min(maxPages, Int(slice >> 12)))
        scratch = try HostRegion(length: UInt64(self.maxPages) << 12, shared: false)
        rng = Xoshiro(seed: seed ^ 0xC4A2)
    }

    mutating func step() throws {
        let d = Int(rng.next() % (region.length / mappingBytes))
        let pages = 1 + Int(rng.next() % UInt64(maxPages))
        let slicePages = Int(mappingBytes >> 12)
        let first = Int(rng.next() % UInt64(slicePages - pages + 1))
        let sliceBase = region.base + UInt64(d) * mappingBytes
        let start = sliceBase + UInt64(first) << 12
        // mremap moves ranges within one VMA; earlier changes split the slice into several.
        let vma = Self.mapping(containing: start) ?? start..<(start + 4096)
        let length = min(UInt64(pages) << 12, vma.upperBound - start)
        let range = start..<(start + length)
        let pointer = UnsafeMutableRawPointer(bitPattern: UInt(start))
        service.window.beginHostChange(range)
        defer { service.window.endHostChange(range) }
        for device in devices { device.iotlb.barrier() }
        let kind = rng.next() % 3
        switch kind {
        case 0:
            _ = try syscall("madvise(MADV_REMOVE)") { madvise(pointer, Int(length), MADV_REMOVE) }
        case 1:
            let p = mmap(
                pointer, Int(length), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, region.fd,
                off_t(start - region.base))
            guard p == pointer else { throw SystemCallError("mmap(MAP_FIXED)", .init(rawValue: errno)) }
        default:
            let target = UnsafeMutableRawPointer(bitPattern: UInt(scratch.base))
            let p = iopf_mremap_dontunmap(pointer, Int(length), target)
            guard p == target else { throw SystemCallError("mremap(MREMAP_DONTUNMAP)", .init(rawValue: errno)) }
        }
        // The op returned, so its events were read; the barrier completes after they are handled.
        try service.barrier().wait()
        if kind != 0 {
            let iova = iovaBase + UInt64(d) * mappingBytes
            try service.updateHostAddress(iova: iova, size: mappingBytes, vaddr: sliceBase)
        }
        changes += 1
    }

    /// The VMA holding `address`, from /proc/self/maps.
    static func mapping(containing address: UInt64) -> Range<UInt64>? {
        guard let maps = Sys.readText("/proc/self/maps") else { return nil }
        for line in maps.split(separator: "\n") {
            let bounds = line.prefix { $0 != " " }.split(separator: "-")
            guard bounds.count == 2, let lo = UInt64(bounds[0], radix: 16), let hi = UInt64(bounds[1], radix: 16) else {
                continue
            }
            if lo <= address && address < hi { return lo..<hi }
        }
        return nil
    }
}

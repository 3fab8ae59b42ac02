// StressSession.swift — `iopf stress`: devices fault and DMA while a storm thread
// invalidates, takes memory away, pre-maps blocks, removes and re-creates mappings and
// changes host memory for real; invariants are checked continuously and at the end.
//
// Layout: device d owns `mappingsPerDevice` DMA mappings of 2 MiB each, contiguous in IOVA
// and in 2 MiB-aligned host memory, so that pre-mapping can use 2 MiB blocks and random
// invalidations cut through blocks and across mappings.

import Foundation
import Glibc
@_spi(FaultInjection) import IOPFCore
@_spi(FaultInjection) import IOPFService
import IOPFDevice
import Logging

package struct StressOptions: Sendable {
    package var seed: UInt64 = 1
    /// Stop after this many seconds, or after `operations` storm operations, whichever first.
    package var seconds = 10.0
    package var operations: Int?
    package var devices = 4
    package var mappingsPerDevice = 2
    package var domains = 2
    package var hostChurn = true
    /// Run the devices as `iopf device` processes: `deviceCommand` is the `iopf` executable
    /// followed by `device`.
    package var external = false
    package var deviceCommand: [String] = []
    package var injected: InjectedBugs = []
    /// Mapping ahead of sequential faults (`--fault-around`).
    package var faultAround = FaultAroundPolicy.adaptive
    /// Page request groups each device keeps in flight (`--outstanding`).
    package var outstanding = 1
    /// Memory backed by 2 MiB transparent huge pages, whole blocks mapped on faults
    /// (`--huge-pages`); tracked mappings (`dirtyLogInterval`) still take single pages.
    package var hugePages = false
    /// Take the service's footprint every this many seconds (soak runs); nil: never.
    package var sampleEvery: Double?
    /// Seconds between reads of the dirty log, with the in-process devices' writes held
    /// against it ("a dirty write lost"); nil: no dirty tracking. Ignored with `external`.
    package var dirtyLogInterval: Double? = 0.01
    package static let mappingBytes: UInt64 = 2 << 20
    package static let iovaBase: UInt64 = 1 << 40
    package init() {}
}

/// What the stress run itself found: its storm, the checks and what broke them.
package struct StressRun: Codable, Sendable {
    package var seed: UInt64 = 0
    package var seconds = 0.0
    package var injected: [String] = []
    /// "in-process" or "external".
    package var devices = "in-process"
    /// Changes made by the `iopf host` of an `--external` run.
    package var hostChanges = 0
    /// Engine invariant checks run, plus translations checked by devices.
    package var checks = 0
    package var violations = 0
    package var violationKinds: [String: Int] = [:]
    package var lateAccesses = 0
    /// The dirty log held against the devices' writes (absent without dirty tracking).
    package var dirty: DirtySummary?
    package var dmaOps = 0
    package var dmaErrors = 0
    package var stormOperations: [String: Int] = [:]
    /// The first violation, with the seed and what was happening.
    package var firstViolation: String?
}

/// What `iopf stress --json` prints: the run's findings with the service's and the
/// engine's statistics, as `serve` prints its run.
package typealias StressResult = RunReport<StressRun>

/// The service's footprint at one moment of a stress run.
package struct StressSample: Sendable, Codable {
    package var elapsed: Double
    package var faults: Int
    package var footprint: ServiceFootprint
}

package struct StressProgress: Sendable {
    package var elapsed: Double
    package var faults: Int
    package var invalidations: Int
    package var violations: Int
}

package enum StressSession {
    package static func run(
        _ o: StressOptions, logger: Logger = Logger(label: "iopf.stress"),
        progress: (StressProgress) -> Void = { _ in },
        sample: (StressSample) -> Void = { _ in }
    ) throws -> StressResult {
        precondition(
            o.devices > 0 && o.mappingsPerDevice > 0 && o.domains > 0, "stress needs devices, mappings and domains")
        let setup = try StressSetup(o, logger: logger)
        let service = setup.rig.service
        defer { service.stop() }
        let fleet = o.external ? try startFleet(o, rig: setup.rig, region: setup.region, slice: setup.slice) : nil
        let hosted = o.external ? try startHost(o, service: service) : nil
        defer {
            hosted?.host.kill()
            hosted?.devices.kill()
        }
        setup.tallies.forEach { $0.reset() }  // count from here, when every device is attached
        setup.hostTally.reset()

        var result = StressResult(run: StressRun())
        result.seed = o.seed
        result.devices = o.external ? "external" : "in-process"
        result.injected = InjectedBugs.names.filter { o.injected.contains($0.1) }.map(\.0)
        var findings = StressFindings(seed: o.seed)
        let start = ContinuousClock.now
        let elapsed = { (ContinuousClock.now - start).seconds }
        setup.devices.forEach { $0.start() }
        var storm = try StressStorm(setup, logger: logger)
        var nextProgress = 0.5
        var nextSample = o.sampleEvery ?? .infinity
        var nextCheck = 0.05
        var nextDirtyRead = o.dirtyLogInterval ?? .infinity
        while elapsed() < o.seconds && storm.operations < (o.operations ?? .max) {
            storm.step(&findings)
            let now = elapsed()
            if let ledger = setup.ledger, now >= nextDirtyRead {
                findings.doing = "a read of the dirty log"
                try setup.readDirtyLog(ledger)
                nextDirtyRead = now + o.dirtyLogInterval!
            }
            if now >= nextCheck {
                findings.doing = "a periodic check"
                findings.record(try service.checkInvariants().wait())
                nextCheck = now + 0.05
            }
            if now >= nextProgress {
                progress(
                    StressProgress(
                        elapsed: now, faults: service.statistics.records,
                        invalidations: setup.rig.engine.statistics.invalidations, violations: findings.count))
                nextProgress = now + 0.5
            }
            if now >= nextSample, let every = o.sampleEvery {
                findings.doing = "taking a footprint"
                sample(
                    StressSample(
                        elapsed: now, faults: service.statistics.records, footprint: try service.footprint().wait()))
                nextSample += every
            }
        }
        findings.doing = "the final checks"
        if let fleet {
            try collect(fleet, tallies: setup.tallies, service: service, into: &result, findings: &findings)
        }
        if let hosted {
            try collect(
                hosted.devices, tallies: [setup.hostTally], service: service, into: &result, findings: &findings,
                label: "host device")
            let host = hosted.host.stop(as: HostResult.self)[0]
            result.hostChanges = host?.hostChanges ?? 0
            if host == nil || !(host?.problems.isEmpty ?? false) || host!.hostChanges == 0 {
                findings.note(
                    "hostFailed",
                    "the iopf host process failed: \(host?.problems.first ?? "it died or made no change")")
            }
        }
        try setup.finish(into: &result, findings: &findings)
        result.seconds = elapsed()
        service.stop()
        result.service = service.statistics
        result.engine = setup.rig.engine.statistics
        result.lateAccesses = service.window.lateAccesses
        result.stormOperations = storm.counts
        result.checks += findings.engineChecks
        result.violationKinds = findings.kinds
        result.violations = findings.count
        result.firstViolation = findings.first
        return result
    }

    /// The name the stress run's `iopf host` declares.
    static let hostName = "stress-host"

    /// Listens on a fresh socket, starts the device processes and waits until all attached.
    static func startFleet(_ o: StressOptions, rig: Rig, region: HostRegion, slice: UInt64) throws -> ExternalFleet {
        let path = "/tmp/iopf-stress-\(getpid()).sock"
        let provisioner = StressProvisioner(domains: rig.domains, region: region, slice: slice, devices: o.devices)
        try rig.service.listen(path: path, provisioner: provisioner)
        let fleet = try ExternalFleet(
            command: o.deviceCommand, socket: path, count: o.devices, seed: o.seed,
            extra: ["--outstanding", "\(o.outstanding)"])
        let deadline = ContinuousClock.now + .seconds(30)
        while rig.service.statistics.externalDevices < o.devices {
            guard ContinuousClock.now < deadline, fleet.members.allSatisfy({ $0.process.isRunning }) else {
                fleet.kill()
                throw ServiceError.invalidRequest(
                    """
                    only \(rig.service.statistics.externalDevices) of \(o.devices) device processes attached \
                    (\(o.deviceCommand.joined(separator: " ")))
                    """
                )
            }
            usleep(2000)
        }
        return fleet
    }

    /// Starts an `iopf host` with churn on the stress service's socket and two
    /// `iopf device --address-space` processes on it; returns once all are attached.
    static func startHost(_ o: StressOptions, service: FaultService) throws -> (
        host: ExternalFleet, devices: ExternalFleet
    ) {
        let path = "/tmp/iopf-stress-\(getpid()).sock"
        let name = hostName
        let hostCommand = [o.deviceCommand.first ?? "", "host"]
        let host = try ExternalFleet(
            command: hostCommand,
            arguments: [
                [
                    "--connect", path, "--name", name, "--memory", "16M", "--mappings", "2", "--churn", "2",
                    "--seconds", "0",
                    "--seed", "\(o.seed)", "--json",
                ]
            ])
        func attached(_ devices: Int) -> Bool {
            service.statistics.hosts.contains { $0.name == name && $0.ended == nil && $0.devices >= devices }
        }
        let deadline = ContinuousClock.now + .seconds(30)
        while !attached(0) {
            guard ContinuousClock.now < deadline, host.members[0].process.isRunning else {
                host.kill()
                throw ServiceError.invalidRequest("the iopf host process never handed over its memory")
            }
            usleep(2000)
        }
        let devices = try ExternalFleet(
            command: o.deviceCommand, socket: path, count: 2, seed: o.seed ^ 0x4057,
            extra: ["--address-space", name])
        while !attached(2) {
            guard ContinuousClock.now < deadline, devices.members.allSatisfy({ $0.process.isRunning }) else {
                devices.kill()
                host.kill()
                throw ServiceError.invalidRequest("the devices of the iopf host never attached")
            }
            usleep(2000)
        }
        return (host, devices)
    }

    /// Makes sure every INVALIDATE posted so far was acknowledged, stops the devices and
    /// checks what they report.
    static func collect(
        _ fleet: ExternalFleet, tallies: [SyncTally], service: FaultService, into result: inout StressResult,
        findings: inout StressFindings, label: String = "device"
    ) throws {
        // A barrier completes once every device acknowledged every INVALIDATE posted so far.
        try service.barrier().wait()
        let synced = tallies.map(\.count)
        for (d, r) in fleet.stop().enumerated() {
            guard let r else {
                findings.note("deviceFailed", "\(label) \(d + 1) died or printed no summary")
                continue
            }
            result.dmaOps += r.dmaOps
            result.dmaErrors += r.dmaErrors
            result.checks += r.translations
            for (k, n) in [
                ("wrongData", r.integrityErrors),
                ("groupNotAnsweredOnce", r.unexpectedResponses + abs(r.groups - r.success - r.invalid)),
                ("deviceDisconnected", r.disconnected ? 1 : 0),
            ] where n > 0 {
                findings.note(k, count: n, "\(label) \(d + 1): \(r.problems.first ?? k)")
            }
            let owed = synced[d % synced.count]
            if r.pagesInvalidated < owed {
                findings.note(
                    "invalidationNotDelivered",
                    "\(label) \(d + 1) was told of \(r.pagesInvalidated) invalidated pages, its domain synced \(owed)")
            }
        }
    }

    /// A random host range in `[base, base + total)`: mostly small, sometimes several
    /// mappings long, with unaligned edges.
    static func randomRange(_ rng: inout Xoshiro, base: UInt64, total: UInt64) -> (UInt64, UInt64) {
        let start = base + rng.next() % total
        let scale: UInt64 = [4096, 64 << 10, 2 << 20, 8 << 20][Int(rng.next() % 4)]
        let length = 1 + rng.next() % scale
        return (start, min(length, base + total - start))
    }
}

/// What broke during a stress run: violations by kind, the first one with the seed and
/// what was happening, and the engine checks run.
struct StressFindings {
    let seed: UInt64
    var kinds: [String: Int] = [:]
    var first: String?
    var engineChecks = 0
    /// What the run was doing, for the first violation's message.
    var doing = "starting"

    init(seed: UInt64) { self.seed = seed }

    /// Violations in all.
    var count: Int { kinds.values.reduce(0, +) }

    /// Counts one engine check and the violations it found.
    mutating func record(_ violations: [InvariantViolation]) {
        engineChecks += 1
        for v in violations { note(v.kind.rawValue, "while \(doing): \(v)") }
    }

    /// Counts `count` violations of `kind`; the first one of the run keeps `message`.
    mutating func note(_ kind: String, count: Int = 1, _ message: String) {
        kinds[kind, default: 0] += count
        if first == nil { first = "seed \(seed), \(message)" }
    }
}

/// A stress run's setup: the memory, the service with its audits, the mappings and the
/// in-process devices (not started).
struct StressSetup {
    struct Mapping {
        var iova: UInt64
        var host: UInt64
    }

    let options: StressOptions
    let slice: UInt64
    let region: HostRegion
    let rig: Rig
    let tallies: [SyncTally]
    let hostTally = SyncTally()
    var mappings: [Mapping] = []
    var devices: [SimulatedDevice] = []
    let ledger: DirtyLedger?
    var totalPages: Int { Int(slice >> 12) * options.devices }

    init(_ o: StressOptions, logger: Logger) throws {
        options = o
        slice = StressOptions.mappingBytes * UInt64(o.mappingsPerDevice)
        if o.hugePages, let notice = try HugePages.enableForShmem() { logger.warning("\(notice)") }
        region = try HostRegion(
            length: slice * UInt64(o.devices), alignment: StressOptions.mappingBytes, hugePages: o.hugePages)
        var config = EngineConfiguration()
        config.blocksOnFault = o.hugePages
        config.injectedBugs = o.injected
        let pages = Int(slice >> 12) * o.devices
        let audits = (0..<o.domains).map { _ in TranslationAudit(iovaBase: StressOptions.iovaBase, pages: pages) }
        tallies = (0..<o.domains).map { _ in SyncTally() }
        var serviceConfig = ServiceConfiguration()
        serviceConfig.spinNanoseconds = 50_000
        serviceConfig.hostEvents = o.hostChurn
        serviceConfig.faultAround = o.faultAround
        serviceConfig.injectedBugs = o.injected
        serviceConfig.invalidateTimeout = .seconds(2)
        if o.external {
            serviceConfig.hostEngine.injectedBugs = o.injected
            serviceConfig.hostSyncObserver = (StressSession.hostName, hostTally)
        }
        let observers: [any IOTLBSyncObserver] = o.external ? tallies : audits
        rig = try Rig(engine: config, service: serviceConfig, domains: o.domains, observers: observers, logger: logger)
        ledger =
            o.dirtyLogInterval != nil && !o.external
            ? DirtyLedger(iovaBase: StressOptions.iovaBase, pages: pages) : nil
        do {
            try mapAndMakeDevices()
            if let ledger {
                try rig.engine.startDirtyTracking(iova: StressOptions.iovaBase, size: UInt64(pages) << 12)
                ledger.trackingStarted()
            }
        } catch {
            rig.service.stop()
            throw error
        }
    }

    /// Maps each device's 2 MiB mappings and, unless the devices are external, makes them.
    private mutating func mapAndMakeDevices() throws {
        let o = options
        for d in 0..<o.devices {
            let iova = StressOptions.iovaBase + UInt64(d) * slice
            let host = region.base + UInt64(d) * slice
            for k in 0..<o.mappingsPerDevice {
                let m = Mapping(
                    iova: iova + UInt64(k) * StressOptions.mappingBytes,
                    host: host + UInt64(k) * StressOptions.mappingBytes)
                try rig.service.map(iova: m.iova, vaddr: m.host, size: StressOptions.mappingBytes, prot: .readWrite)
                mappings.append(m)
            }
            guard !o.external else { continue }
            var dc = DeviceConfiguration(
                deviceID: UInt32(d + 1), iovaBase: iova, pages: Int(slice >> 12), hostBase: host,
                physBase: region.phys! + UInt64(d) * slice)
            dc.seed = o.seed &+ UInt64(d) &* 104_729
            dc.burst = 8
            dc.outstanding = o.outstanding
            dc.credit = DeviceConfiguration.credit(outstanding: o.outstanding, burst: dc.burst)
            dc.iotlbEntries = 32
            dc.spinNanoseconds = 50_000
            dc.hostMayChangeMemory = true
            dc.dirtyLedger = ledger
            devices.append(try rig.device(dc, domain: d % o.domains, regions: [region]))
        }
    }

    /// One read of the dirty log over every device's memory, handed to the ledger.
    func readDirtyLog(_ ledger: DirtyLedger) throws {
        ledger.roundRead(
            try rig.engine.readAndClearDirty(iova: StressOptions.iovaBase, size: UInt64(totalPages) << 12))
    }

    /// The final checks: every device came back and answered once, the dirty log lost no
    /// write, nothing stayed locked; the devices' DMA into `result`.
    func finish(into result: inout StressResult, findings: inout StressFindings) throws {
        devices.forEach { $0.stop() }
        // No device may be left waiting: each must come back within a few seconds.
        let deadline = ContinuousClock.now + .seconds(10)
        while !devices.allSatisfy({ $0.isFinished }) && ContinuousClock.now < deadline { usleep(1000) }
        let stuck = devices.filter { !$0.isFinished }.count
        if stuck > 0 {
            findings.note(
                "deviceLeftWaiting", count: stuck, "\(stuck) devices still waiting for an answer after the run")
        }
        let reports = stuck == 0 ? devices.map { $0.finish() } : []
        findings.record(try rig.service.checkInvariants().wait())
        if let ledger, stuck == 0 {  // the last round: every write has landed
            try readDirtyLog(ledger)
            let dirty = ledger.finish()
            result.dirty = dirty
            if dirty.missed > 0 {
                findings.note(
                    "dirtyWriteLost", count: dirty.missed,
                    "\(dirty.missed) pages written but never reported by the dirty log, "
                        + "e.g. \(dirty.firstMissed?.first ?? "")")
            }
        }
        for r in reports {
            result.dmaOps += r.dmaOps
            result.dmaErrors += r.dmaErrors
            result.checks += r.checks
            for (k, n) in [
                ("staleTranslation", r.staleTranslations), ("wrongTranslation", r.wrongTranslations),
                ("wrongData", r.integrityErrors), ("groupNotAnsweredOnce", r.protocolErrors),
            ] where n > 0 {
                findings.note(k, count: n, "device side: \(r.firstProblems.first ?? k)")
            }
        }
        let sent = reports.reduce(0) { $0 + $1.groups }
        let answered = reports.reduce(0) { $0 + $1.success + $1.invalid }
        if sent != answered {
            findings.note(
                "groupNotAnsweredOnce", count: abs(sent - answered),
                "devices sent \(sent) groups and got \(answered) answers")
        }
        // This engine's own account: the process's VmLck also counts other users (tests
        // running beside this one).
        let locked = rig.engine.lockedBytes
        if locked != 0 { findings.note("lockedMemoryLeft", "\(locked) bytes still locked after the run") }
    }
}

/// The storm: one random operation per step, against the mappings of a stress run.
struct StressStorm {
    let setup: StressSetup
    let logger: Logger
    var rng: Xoshiro
    var churn: HostChurn?
    var counts: [String: Int] = [:]
    var operations = 0

    init(_ setup: StressSetup, logger: Logger) throws {
        let o = setup.options
        self.setup = setup
        self.logger = logger
        rng = Xoshiro(seed: o.seed ^ 0x57_0235)
        if o.hostChurn && setup.rig.service.hostEventsEnabled {
            churn = try HostChurn(
                service: setup.rig.service, region: setup.region, slice: StressOptions.mappingBytes,
                devices: setup.devices, maxPages: 64, seed: o.seed, iovaBase: StressOptions.iovaBase)
        }
    }

    /// One operation, chosen at random; an operation that fails is itself a violation (a
    /// correct engine never fails these).
    mutating func step(_ findings: inout StressFindings) {
        operations += 1
        do { try operate(&findings) } catch {
            findings.note("stormOperationFailed", "while \(findings.doing): \(error)")
        }
    }

    private mutating func operate(_ findings: inout StressFindings) throws {
        let (engine, service) = (setup.rig.engine, setup.rig.service)
        let region = setup.region
        let size = StressOptions.mappingBytes
        let roll = rng.next() % 100
        let m = setup.mappings[Int(rng.next() % UInt64(setup.mappings.count))]
        switch roll {
        case 0..<45:  // an invalidation storm through the loop: any size, unaligned edges, across mappings
            findings.doing = "a service invalidation"
            let (s, len) = StressSession.randomRange(&rng, base: region.base, total: region.length)
            _ = try service.invalidate(hostAddress: s, length: len).wait()
            counts["serviceInvalidate", default: 0] += 1
        case 45..<75:  // from this thread, as an MMU notifier runs in the thread changing memory
            findings.doing = "a direct invalidation"
            let (s, len) = StressSession.randomRange(&rng, base: region.base, total: region.length)
            try engine.invalidate(hostAddress: s, length: len)
            counts["directInvalidate", default: 0] += 1
        case 75..<85:  // take memory away under running faults, check, give it back
            findings.doing = "a take-away of \(hex(m.host))"
            try engine.invalidate(hostAddress: m.host, length: size, hostGone: true)
            usleep(50)
            findings.record(engine.checkInvariants())
            try service.updateHostAddress(iova: m.iova, size: size, vaddr: m.host)
            counts["takeAway", default: 0] += 1
        case 85..<92:  // pre-map a whole mapping: 2 MiB blocks that later invalidations cut into
            findings.doing = "a pre-map of \(hex(m.iova))"
            try engine.invalidate(hostAddress: m.host, length: size)
            do {
                try engine.premap(iova: m.iova, size: size, write: true)
            } catch let error as HostMemoryError {
                logger.debug("pre-map: \(error)")  // the host may be changing it: fine
            }
            counts["premap", default: 0] += 1
        case 92..<96:  // remove a mapping and create it again; faults in between are INVALID
            findings.doing = "re-creating the mapping at \(hex(m.iova))"
            if let ledger = setup.ledger {  // read what was written there with the removal, as a VMM must
                ledger.alsoReported(iova: m.iova, try service.unmapReadingDirty(iova: m.iova, size: size))
            } else {
                try service.unmap(iova: m.iova, size: size)
            }
            try service.map(iova: m.iova, vaddr: m.host, size: size, prot: .readWrite)
            counts["remap", default: 0] += 1
        default:  // real host events
            if churn != nil {
                findings.doing = "a host change"
                try churn!.step()
                counts["hostChange", default: 0] += 1
            }
        }
    }
}

// VhostSession.swift — `iopf vhost`: a virtio-net driver in this process's memory, a
// vhost-user back-end in another (DPDK's testpmd), and iopf between them as the IOMMU.
// One run per translation mode:
//   fault   — nothing mapped up front; each IOTLB miss of the back-end is a page fault
//             served by the engine, answered with an UPDATE of the mapped run;
//   pinned  — VFIO type1: the memory pinned and mapped before the device starts, and one
//             UPDATE per contiguous run of it sent up front (misses should not happen);
//   noIOMMU — VIRTIO_F_IOMMU_PLATFORM not negotiated: the back-end uses the memory table's
//             addresses directly, no translation at all (the ceiling).
// `--compare` runs all three, one after another, against the same back-end.

import CIOPFShim
import Foundation
import Glibc
import Histogram
import IOPFCore
import IOPFDevice
import IOPFService
import IOPFSimulation
import IOPFSystem
import IOPFWire
import Logging
import SystemPackage

package enum VhostMode: String, Sendable, CaseIterable, Codable {
    case fault, pinned, noIOMMU
}

package struct VhostOptions: Sendable {
    package var backendPath = ""
    package var mode = VhostMode.fault
    package var memoryBytes: UInt64 = 256 << 20
    /// The part of the memory packet buffers come from (the rest is never touched: what
    /// pinning costs for memory a device never uses).
    package var workingSetBytes: UInt64 = .max
    package var seconds = 10.0
    /// Seconds counted as warm-up (the first pass over the memory): `mppsAfterWarmup`
    /// counts what came after.
    package var warmupSeconds = 1.0
    /// Seconds between invalidations of a random range of the working set (0: none).
    package var invalidateInterval = 0.0
    /// Seconds between host changes: `madvise(MADV_DONTNEED)` of a random range of 1-16
    /// pages of the working set, seen by the service through userfaultfd (fault mode).
    package var hostChurnInterval = 0.0
    package var invalidateMaxPages = 16
    /// Ethernet frame bytes (the 12-byte virtio_net_hdr comes on top).
    package var frameBytes = 64
    package var queueSize = 256
    /// Pages a miss maps (the missed one and those after it, fault-around), and the
    /// aligned block (pages, a power of two) inside which an UPDATE names the whole mapped run.
    package var faultAroundPages = 16
    package var maxUpdatePages = 512
    package var burst = 32
    /// The nice value the driver's thread runs at during the traffic (never lowered).
    package var driverNice: Int32 = 5
    /// The host name the memory is handed over under (`runOnHost`).
    package var addressSpaceName = "vhost"
    package static let iovaBase: UInt64 = 1 << 32
    package init() {}
}

/// What one run measured; the JSON keys are the ones VhostUser.md lists.
/// What the run itself saw: the driver's packets, throughput, latencies, host changes.
package struct VhostRun: Codable, Sendable, Equatable {
    package var mode: VhostMode
    /// The host name the back-end was served under by another process's service (whose
    /// statistics, `hosts[].vhost`, hold the IOTLB figures); nil when served here.
    package var addressSpace: String?
    package var seconds = 0.0
    package var packetsSent = 0
    package var packetsReceived = 0
    package var payloadErrors = 0
    package var firstPayloadError: String?
    package var mpps = 0.0
    package var mppsAfterWarmup = 0.0
    package var missesPerSecond = 0.0
    /// From the service reading a miss to the back-end's REPLY_ACK of its UPDATE, and to
    /// the UPDATE being sent (the service's own part).
    package var missLatencyNs = LatencySummary()
    package var missServiceNs = LatencySummary()
    /// Invalidations asked of the service.
    package var invalidationsRequested = 0
    /// madvise calls made (`hostChurnInterval`), and userfaultfd events the service read.
    package var hostChanges = 0
    package var uffdEvents = 0
    /// Pages the I/O page table maps at the end, and the driver memory resident.
    package var mappedBytes: UInt64 = 0
    package var residentBytes: UInt64 = 0
    /// Why the service stopped serving the back-end before the end (gone, fenced).
    package var backendEnded: String?
}

/// What `iopf vhost --json` prints for one run: the run's own figures and, embedded
/// whole, the back-end's `VhostStatistics` as the service kept them. One flat JSON object
/// (`iotlbMisses`, `entriesMerged`, `invalidationsAcked`, ...); in Swift the statistics'
/// fields read through as the result's own.
@dynamicMemberLookup
package struct VhostRunResult: Encodable, Sendable, Equatable {
    package var run: VhostRun
    package var backend = VhostStatistics()

    package init(mode: VhostMode) { run = VhostRun(mode: mode) }

    package subscript<T>(dynamicMember path: WritableKeyPath<VhostRun, T>) -> T {
        get { run[keyPath: path] }
        set { run[keyPath: path] = newValue }
    }
    package subscript<T>(dynamicMember path: KeyPath<VhostStatistics, T>) -> T { backend[keyPath: path] }

    /// Entries the back-end held at the end, as far as the service knows.
    package var iotlbEntries: Int { backend.entries }

    private enum Derived: String, CodingKey { case iotlbEntries }

    /// One object: the back-end's statistics, then the run's, then the derived keys.
    package func encode(to encoder: any Encoder) throws {
        try backend.encode(to: encoder)
        try run.encode(to: encoder)
        var c = encoder.container(keyedBy: Derived.self)
        try c.encode(iotlbEntries, forKey: .iotlbEntries)
    }
}

package struct VhostCompareResult: Encodable, Sendable, Equatable {
    package var runs: [VhostRunResult]
    /// Throughput after warm-up, fault-driven over pinned and pinned over no IOMMU.
    package var faultToPinned: Double?
    package var pinnedToNoIOMMU: Double?
}

package enum VhostSession {
    /// Runs `o.mode` against the back-end at `o.backendPath` on a service of its own.
    package static func run(_ o: VhostOptions, logger: Logger = Logger(label: "iopf.vhost")) throws -> VhostRunResult {
        var config = ServiceConfiguration()
        config.hostEvents = o.mode == .fault
        let engine = FaultEngine(
            memory: ProcessMemory(),
            configuration: .forThisProcess(mode: o.mode == .fault ? .fault : .pinned))
        let service = try FaultService(engine: engine, configuration: config, logger: logger)
        let domain = try service.createDomain()
        try service.start()
        defer { service.stop() }
        return try run(o, service: service, domain: domain)
    }

    /// Every mode in turn, no IOMMU first, against the same back-end.
    package static func compare(
        _ o: VhostOptions, logger: Logger = Logger(label: "iopf.vhost"),
        progress: (VhostRunResult) -> Void = { _ in }
    ) throws -> VhostCompareResult {
        var runs: [VhostRunResult] = []
        for mode in [VhostMode.noIOMMU, .pinned, .fault] {
            var m = o
            m.mode = mode
            let r = try run(m, logger: logger)
            progress(r)
            runs.append(r)
            usleep(300_000)  // the back-end tears the device down before it listens again
        }
        func ratio(_ a: VhostMode, _ b: VhostMode) -> Double? {
            guard let x = runs.first(where: { $0.mode == a }), let y = runs.first(where: { $0.mode == b }),
                y.mppsAfterWarmup > 0
            else { return nil }
            return x.mppsAfterWarmup / y.mppsAfterWarmup
        }
        return VhostCompareResult(
            runs: runs, faultToPinned: ratio(.fault, .pinned), pinnedToNoIOMMU: ratio(.pinned, .noIOMMU))
    }

    /// Runs `o.mode` with its driver memory mapped in `domain` of a running `service`
    /// (whose engine must be of the mode: pinned for pinned and noIOMMU). `stop` ends the
    /// traffic early (tests).
    package static func run(
        _ o: VhostOptions, service: FaultService, domain: DomainID,
        stop: @escaping @Sendable () -> Bool = { false }
    ) throws -> VhostRunResult {
        let region = try HostRegion(length: o.memoryBytes, alignment: 2 << 20)
        let iova = VhostOptions.iovaBase
        // Without an IOMMU nothing is mapped or pinned: the back-end reaches all of the
        // memory table directly, as a vhost-user back-end of a guest without a vIOMMU does.
        switch o.mode {
        case .fault: try service.map(iova: iova, vaddr: region.base, size: o.memoryBytes, prot: .readWrite)
        case .pinned: try service.mapPinned(iova: iova, vaddr: region.base, size: o.memoryBytes, prot: .readWrite)
        case .noIOMMU: break
        }
        defer { if o.mode != .noIOMMU { _ = try? service.unmap(iova: iova, size: o.memoryBytes) } }
        let eventsBefore = service.statistics.uffdEvents
        // The user address of the region is its physical base: an UPDATE names what the
        // I/O page table holds (VhostBackend.swift).
        let plumbing = Plumbing(
            base: region.base, memfd: region.fd, userAddress: region.phys!,
            premapped: o.mode == .pinned
                ? premappedRuns(service.engine.pageTable(domain), iova: iova, size: o.memoryBytes) : [],
            attach: { main, channel in
                try service.attachVhost(
                    main: FileDescriptor(rawValue: main), channel: FileDescriptor(rawValue: channel), domain: domain,
                    deviceID: 1,
                    runPages: o.maxUpdatePages, faultAroundPages: o.faultAroundPages)
            },
            detach: { device in
                _ = try? service.barrier().wait()
                if let device { service.detachVhost(device) }
            },
            invalidate: { start, length in service.invalidate(hostAddress: start, length: length) },
            finish: { result in
                result.mappedBytes = UInt64(service.engine.mappedPageCount) << 12
                result.uffdEvents = service.statistics.uffdEvents - eventsBefore
                result.residentBytes = (try? region.residentBytes()) ?? 0
            })
        return try drive(o, plumbing, stop: stop)
    }

    /// Runs `o.mode` (fault) with the driver's memory handed to the service at `path` as
    /// host `o.addressSpaceName`, as a VMM in another process would: a sealed memfd mapped
    /// here, this process's userfaultfd, one DMA mapping; the back-end is handed over with
    /// VHOST. The memory table gives this process's own addresses as user addresses, as
    /// QEMU does. What the service did is in its statistics (`hosts[].vhost`), not here.
    package static func runOnHost(
        _ o: VhostOptions, servicePath path: String,
        stop: @escaping @Sendable () -> Bool = { false }
    ) throws -> VhostRunResult {
        guard o.mode == .fault else {
            throw VhostError("a host's address space is fault-driven: --address-space needs --mode fault")
        }
        let memfd = try syscall("memfd_create") { iopf_memfd_create_sealable("iopf-vhost-\(o.addressSpaceName)") }
        defer { Sys.close(memfd) }
        _ = try syscall("ftruncate") { ftruncate(memfd, off_t(o.memoryBytes)) }
        _ = try syscall("fcntl(F_ADD_SEALS)") { iopf_seal_size(memfd) }
        guard let mapped = mmap(nil, Int(o.memoryBytes), PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0),
            mapped != MAP_FAILED
        else { throw SystemCallError("mmap of the memfd", .init(rawValue: errno)) }
        let base = UInt64(UInt(bitPattern: mapped))
        let host = try HostClient(connectingTo: path)
        let uffd = try HostClient.makeUserfaultfd()
        defer { Sys.close(uffd) }
        try host.declare(
            name: o.addressSpaceName,
            regions: [HostRegionEntry(hostAddress: base, size: o.memoryBytes, fdOffset: 0, fdIndex: 0)],
            userfaultfd: uffd, memfds: [FileDescriptor(rawValue: memfd)])
        var detached = false
        defer {
            // The service lets go of the memory (and unregisters it) before it is unmapped.
            if !detached { _ = try? host.detach() }
            host.close()
            munmap(mapped, Int(o.memoryBytes))
        }
        try host.map(iova: VhostOptions.iovaBase, hostAddress: base, size: o.memoryBytes, prot: .readWrite)
        let plumbing = Plumbing(
            base: base, memfd: memfd, userAddress: base, premapped: [],
            attach: { main, channel in
                defer {
                    Sys.close(main)
                    Sys.close(channel)
                }
                try host.attachVhost(
                    socket: FileDescriptor(rawValue: main), channel: FileDescriptor(rawValue: channel),
                    VhostAttachRequest(
                        deviceID: 1, blockPages: UInt32(o.maxUpdatePages), faultAroundPages: UInt32(o.faultAroundPages))
                )
                return nil
            },
            detach: { _ in
                _ = try? host.sync()
                _ = try? host.detach()
                detached = true
            },
            invalidate: nil,
            finish: { result in
                result.addressSpace = o.addressSpaceName
                var vec = [UInt8](repeating: 0, count: Int(o.memoryBytes >> 12))
                if mincore(mapped, Int(o.memoryBytes), &vec) == 0 {
                    result.residentBytes = UInt64(vec.reduce(0) { $0 + Int($1 & 1) }) << 12
                }
            })
        return try drive(o, plumbing, stop: stop)
    }

    /// The memory a run drives and who serves its back-end.
    struct Plumbing {
        var base: UInt64
        var memfd: CInt
        /// The memory table's user address for the memory's start.
        var userAddress: UInt64
        /// UPDATEs to send before the vrings' addresses (pinned).
        var premapped: [(iova: UInt64, size: UInt64, phys: UInt64)]
        /// Hands the back-end (a copy of its socket, the channel) to the service; the
        /// handle when the service is in this process.
        var attach: (CInt, CInt) throws -> VhostDevice?
        /// Takes it back once the traffic stopped and everything was acknowledged.
        var detach: (VhostDevice?) -> Void
        var invalidate: ((UInt64, UInt64) -> Ticket<InvalidationOutcome>)?
        var finish: (inout VhostRunResult) -> Void
    }

    static func drive(_ o: VhostOptions, _ plumbing: Plumbing, stop: @Sendable () -> Bool) throws -> VhostRunResult {
        var result = VhostRunResult(mode: o.mode)
        let iova = VhostOptions.iovaBase
        let driver = try VirtioNetDriver(
            base: UnsafeMutableRawPointer(bitPattern: UInt(plumbing.base))!, iovaBase: iova,
            memory: o.memoryBytes, workingSet: o.workingSetBytes, frameBytes: o.frameBytes,
            queueSize: o.queueSize)
        let frontEnd = try VhostFrontEnd(connectingTo: o.backendPath)
        defer { frontEnd.close() }
        let translated = o.mode != .noIOMMU
        var features = VhostUser.Feature.version1 | VhostUser.Feature.protocolFeatures
        if translated { features |= VhostUser.Feature.iommuPlatform }
        try frontEnd.negotiate(features: features)
        let channel = translated ? try frontEnd.openBackendChannel().rawValue : -1
        var channelOwned = channel >= 0
        defer { if channelOwned { Sys.close(channel) } }
        // Without an IOMMU, guest addresses are IOVAs.
        try frontEnd.setMemoryTable(
            VhostUser.MemoryTable(regions: [
                .init(guestAddress: iova, size: o.memoryBytes, userAddress: plumbing.userAddress, mmapOffset: 0)
            ]), fds: [FileDescriptor(rawValue: plumbing.memfd)])
        // Without an IOMMU a vring's addresses are the front-end's user addresses (the
        // buffers' are guest addresses, here the IOVAs).
        let rings = [driver.rx.setup, driver.tx.setup].map { v in
            var v = v
            if !translated {
                let user = { (a: UInt64) in a - iova + plumbing.userAddress }
                (v.descriptors, v.available, v.used) = (user(v.descriptors), user(v.available), user(v.used))
            }
            return v
        }
        try frontEnd.setSize(rings[0])
        try frontEnd.setSize(rings[1])
        // Once the vrings exist (DPDK keeps an IOTLB per vring and fills those it has) and
        // before their addresses, whose translation would miss.
        for run in plumbing.premapped {
            try frontEnd.update(iova: run.iova, size: run.size, userAddress: run.phys)
        }
        try frontEnd.setUp(rings[0])
        try frontEnd.setUp(rings[1])
        try frontEnd.enable(0)
        try frontEnd.enable(1)
        var device: VhostDevice?
        var handedOver = false
        if translated {
            channelOwned = false
            device = try plumbing.attach(try Sys.dup(frontEnd.fd), channel)
            handedOver = true
        }

        var latencies = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        var serviceTimes = latencies
        func takeLatencies() {
            guard let taken = device?.takeLatencies() else { return }
            for v in taken.samples { latencies.record(v) }
            for v in taken.serviceTimes { serviceTimes.record(v) }
        }
        var rng = SystemRandomNumberGenerator()
        let start = ContinuousClock.now
        let end = start + .nanoseconds(Int64(o.seconds * 1e9))
        let warm = start + .nanoseconds(Int64(min(o.warmupSeconds, o.seconds) * 1e9))
        var receivedAtWarm: Int?
        var nextInvalidate = start
        var nextChurn = start
        let used = min(o.memoryBytes, o.workingSetBytes) >> 12
        var pending: Ticket<InvalidationOutcome>?
        var nextCheck = start
        var idle = 0
        // The driver stands for a guest's vCPU, which has a CPU of its own; here it shares
        // two with the back-end's poller and the service. At a higher nice value the
        // service's thread, woken by a miss, takes the CPU at once instead of a tick later.
        let tid = id_t(iopf_gettid())
        let nice = getpriority(__priority_which_t(PRIO_PROCESS.rawValue), tid)
        setpriority(__priority_which_t(PRIO_PROCESS.rawValue), tid, max(nice, o.driverNice))
        defer { setpriority(__priority_which_t(PRIO_PROCESS.rawValue), tid, nice) }
        driver.refill()
        while true {
            let now = ContinuousClock.now
            if now >= end || stop() { break }
            if receivedAtWarm == nil && now >= warm { receivedAtWarm = driver.counts.packetsReceived }
            let n = driver.poll()
            driver.refill()
            if driver.tx.inFlight <= o.queueSize - o.burst { driver.send(o.burst) }
            if o.hostChurnInterval > 0 && now >= nextChurn {
                // Waits until the service read the REMOVE event (userfaultfd's rule).
                let first = UInt64.random(in: 0..<used, using: &rng)
                let pages = min(UInt64.random(in: 1...16, using: &rng), used - first)
                if madvise(
                    UnsafeMutableRawPointer(bitPattern: UInt(plumbing.base + first << 12)), Int(pages << 12),
                    MADV_DONTNEED) == 0
                {
                    result.hostChanges += 1
                }
                nextChurn = now + .nanoseconds(Int64(o.hostChurnInterval * 1e9))
            }
            if let invalidate = plumbing.invalidate,
                o.invalidateInterval > 0 && now >= nextInvalidate
                    && pending?.isDone != false
            {
                let first = UInt64.random(in: 0..<used, using: &rng)
                let pages = min(UInt64.random(in: 1...UInt64(o.invalidateMaxPages), using: &rng), used - first)
                pending = invalidate(plumbing.base + first << 12, pages << 12)
                result.invalidationsRequested += 1
                nextInvalidate = now + .nanoseconds(Int64(o.invalidateInterval * 1e9))
            }
            if now >= nextCheck {
                nextCheck = now + .milliseconds(100)
                takeLatencies()
                if let device, device.statistics.ended != nil { break }
                if device == nil && !Self.alive(frontEnd.fd) {
                    result.backendEnded = "gone: it closed its socket"
                    break
                }
            }
            // Two cores are shared by this thread, the service and the back-end's poller.
            idle = n == 0 ? idle + 1 : 0
            if idle > 64 { sched_yield() }
        }
        let elapsed = ContinuousClock.now - start
        // Let what is in flight come back (a quarter second at most).
        let drainUntil = ContinuousClock.now + .milliseconds(250)
        while driver.tx.inFlight > 0 && ContinuousClock.now < drainUntil && device?.statistics.ended == nil {
            _ = driver.poll()
        }
        _ = driver.poll()
        _ = try? pending?.wait()
        if handedOver { plumbing.detach(device) }
        if let device {
            takeLatencies()
            result.backend = device.statistics
            if let ended = result.backend.ended, ended != "detached" { result.backendEnded = ended }
        }
        if result.backendEnded == nil {
            // Stop the rings as QEMU does, so the back-end tears the device down cleanly.
            _ = try? frontEnd.stop(0)
            _ = try? frontEnd.stop(1)
        }
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        result.seconds = seconds
        result.packetsSent = driver.counts.packetsSent
        result.packetsReceived = driver.counts.packetsReceived
        result.payloadErrors = driver.counts.payloadErrors
        result.firstPayloadError = driver.counts.firstPayloadError
        result.mpps = Double(result.packetsReceived) / seconds / 1e6
        let afterWarm = seconds - min(o.warmupSeconds, o.seconds)
        if let r = receivedAtWarm, afterWarm > 0 {
            result.mppsAfterWarmup = Double(result.packetsReceived - r) / afterWarm / 1e6
        }
        result.missesPerSecond = Double(result.iotlbMisses) / seconds
        result.missLatencyNs = LatencySummary(latencies)
        result.missServiceNs = LatencySummary(serviceTimes)
        plumbing.finish(&result)
        return result
    }

    /// The page table's contiguous runs over `[iova, iova + size)`, for the pinned mode's
    /// UPDATEs up front.
    static func premappedRuns(_ table: IOPageTable, iova: UInt64, size: UInt64) -> [(
        iova: UInt64, size: UInt64, phys: UInt64
    )] {
        var runs: [(iova: UInt64, size: UInt64, phys: UInt64)] = []
        var at = iova
        while at < iova + size {
            guard let x = table.translate(at) else {
                at += 4096
                continue
            }
            if let last = runs.last, last.iova + last.size == at, last.phys + last.size == x.phys {
                runs[runs.count - 1].size += 4096
            } else {
                runs.append((at, 4096, x.phys))
            }
            at += 4096
        }
        return runs
    }

    /// False once the peer closed the socket (poll says HUP, or readable at end of file).
    static func alive(_ fd: CInt) -> Bool {
        let rdhup: Int16 = 0x2000  // POLLRDHUP, which Glibc's module does not export
        var p = pollfd(fd: fd, events: Int16(POLLIN) | rdhup, revents: 0)
        guard poll(&p, 1, 0) == 1 else { return true }
        return p.revents & (Int16(POLLHUP | POLLERR) | rdhup) == 0
    }
}

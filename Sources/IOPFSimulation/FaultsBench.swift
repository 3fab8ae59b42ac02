// FaultsBench.swift — `iopf bench --scenario faults`: how many faults one
// service thread serves when a device keeps several groups in flight, as PRI allows (up
// to its credit of outstanding requests).
//
// One device, one page per group, resident pages (populated before the run, so the
// host's allocation is not measured): each request is a real fault, a page whose host
// memory is there and whose I/O page-table entry is not. The device walks its memory (64
// MiB by default) in order; before walking a quarter of it again it invalidates that
// quarter from its own thread, as an MMU notifier runs in the thread that changes memory. It keeps up to
// `outstanding` groups in flight, sending as many as it may in one go and taking every
// answer that arrived.

import Foundation
import Histogram
import IOPFCore
import IOPFDevice
import IOPFService
import IOPFWire
import Logging

package struct FaultsRow: Codable, Sendable {
    package var outstanding: Int
    package var seconds = 0.0
    package var faults = 0
    package var faultsPerSecond = 0.0
    /// Device-observed, from sending a group to taking its answer.
    package var faultLatencyNs = LatencySummary()
    /// The service loop's turns during the run: faults per turn is the batch it found.
    package var loopTurns = 0
    /// Invalidations the device ran to make its pages fault again.
    package var invalidations = 0
    /// This machine's floor for one in flight, measured just after the run
    /// (`Floors.crossCoreRoundTrip`; the caller fills it in): a request and its answer
    /// each hand at least one cache line between the device's CPU and the service's.
    package var crossCoreRoundTripNs: Double?
    package var problems: [String] = []

    package init(outstanding: Int) { self.outstanding = outstanding }
}

package enum FaultsBench {
    /// The memory the device walks by default: 64 MiB, resident. A quarter of it is
    /// invalidated at a time, just before it is faulted again.
    package static let pages = 16384
    /// The most groups in flight: PRI's 9-bit group index gives 512; half keeps indices
    /// of groups still in flight unique with room to spare.
    package static let maxOutstanding = 256

    package static func measure(
        outstanding: Int, seconds: Double, pages: Int = pages,
        logger: Logger = Logger(label: "iopf.bench")
    ) throws -> FaultsRow {
        precondition((1...maxOutstanding).contains(outstanding), "outstanding must be 1...\(maxOutstanding)")
        precondition(
            pages >= 4 * maxOutstanding && pages % 4 == 0,
            "pages must be a multiple of 4 and at least \(4 * maxOutstanding)")
        let chunk = pages / 4
        let region = try HostRegion(length: UInt64(pages) << 12, alignment: 2 << 20)
        var physical: [UInt64] = []
        try ProcessMemory().resolve(address: region.base, pageCount: pages, write: true, physical: &physical)
        var serviceConfig = ServiceConfiguration()
        serviceConfig.faultAround = .off  // one page per fault: the loop is what is measured
        let rig = try Rig(engine: .forThisProcess(mode: .fault), service: serviceConfig, domains: 1, logger: logger)
        let service = rig.service
        defer { service.stop() }
        let iova = ServeOptions.iovaBase
        try service.map(iova: iova, vaddr: region.base, size: UInt64(pages) << 12, prot: .readWrite)
        let channel = try DeviceChannel(try service.attach(deviceID: 1, domain: rig.domains[0], credit: outstanding))
        defer { channel.close() }

        var row = FaultsRow(outstanding: outstanding)
        var latency = Histogram<UInt64>.nanoseconds()
        // Send time by cookie; cookies count groups from 1, so a cookie names its slot.
        var sentAt = [ContinuousClock.Instant](repeating: .now, count: 2 * maxOutstanding)
        var records: [PageRequest] = []
        records.reserveCapacity(outstanding)
        var responses: [PageResponse] = []
        responses.reserveCapacity(outstanding)
        var sent: UInt32 = 0
        var answered: UInt32 = 0
        var next = 0
        let turnsBefore = service.statistics.loopTurns
        let start = ContinuousClock.now
        let deadline = start + .seconds(seconds)
        var now = start
        while true {
            records.removeAll(keepingCapacity: true)
            while Int(sent &- answered) + records.count < outstanding && now < deadline {
                if next % chunk == 0 && sent >= UInt32(pages) {
                    // This chunk was faulted a cycle ago and answered: make it fault again.
                    _ = try rig.engine.invalidate(
                        hostAddress: region.base + UInt64(next) << 12, length: UInt64(chunk) << 12)
                    row.invalidations += 1
                }
                let cookie = sent &+ UInt32(records.count) &+ 1
                records.append(
                    PageRequest(
                        flags: [.lastPage], deviceID: 1, groupIndex: cookie & PageRequest.maxGroupIndex,
                        perm: [.read, .write], addr: iova + UInt64(next) << 12, cookie: cookie))
                next = (next + 1) % pages
            }
            if !records.isEmpty {
                let at = ContinuousClock.now
                for r in records { sentAt[Int(r.cookie) % sentAt.count] = at }
                try channel.send(records)
                sent &+= UInt32(records.count)
            }
            if sent == answered { break }  // the deadline passed and every answer is in
            guard try channel.receive(into: &responses, spinNanoseconds: 1_000_000_000, timeoutMs: 5000) else {
                row.problems.append("the service closed the channel")
                break
            }
            now = ContinuousClock.now
            if responses.isEmpty {
                row.problems.append("no answer for 5 s with \(sent &- answered) groups in flight")
                break
            }
            for r in responses {
                guard r.cookie &- answered &- 1 < sent &- answered else {
                    if row.problems.count < 5 { row.problems.append("an answer for cookie \(r.cookie), not in flight") }
                    continue
                }
                if r.code != .success && row.problems.count < 5 {
                    row.problems.append("cookie \(r.cookie) answered \(r.code)")
                }
                latency.record(UInt64((now - sentAt[Int(r.cookie) % sentAt.count]).nanoseconds))
                answered &+= 1
            }
        }
        let elapsed = ContinuousClock.now - start
        row.seconds = BenchSession.seconds(elapsed)
        row.faults = Int(answered)
        row.faultsPerSecond = Double(answered) / row.seconds
        row.faultLatencyNs = LatencySummary(latency)
        row.loopTurns = service.statistics.loopTurns - turnsBefore
        withExtendedLifetime(region) {}
        return row
    }
}

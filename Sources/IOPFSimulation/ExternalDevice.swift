// ExternalDevice.swift — `iopf device`: the simulated device as a process of its own. It
// connects to a service's socket, attaches, maps the memory it is given, and runs its DMA
// workload through translations it asks for (TRANSLATE) after page requests over the
// fault channel, checking every read against what it wrote. A thread answers
// INVALIDATEs (or, with `ignoreInvalidations`, never does, to show fencing).

import Foundation
import Histogram
import IOPFCore
import IOPFDevice
import Synchronization

package struct ExternalDeviceOptions: Sendable {
    package var path: String
    package var deviceID: UInt32 = 1
    package var pasid: UInt32?
    package var workload = Workload.random
    /// Seconds to run (0: until `shouldStop`).
    package var seconds = 3.0
    package var ignoreInvalidations = false
    package var stream = false
    /// Page requests asked for at ATTACH; nil: enough for `outstanding` bursts (at least 32).
    package var credit: UInt32?
    /// Page request groups kept in flight (`--outstanding`), within the credit granted.
    package var outstanding = 1
    package var seed: UInt64 = 1
    package var spinNanoseconds: Int64 = 200_000
    /// The host changes this memory (stress): data checks accept zeroed pages.
    package var hostMayChangeMemory = false
    package var burst = 4
    package var iotlbEntries = 64
    /// Attach to this host's address space (`iopf host --name`) instead of the service's memory.
    package var addressSpace: String?
    package init(path: String) { self.path = path }
}

/// What `iopf device --json` prints; the keys are the ones RunningTheService.md lists.
package struct ExternalDeviceResult: Codable, Sendable {
    package var deviceID: UInt32 = 0
    package var channel = ""
    package var windowBytes: UInt64 = 0
    package var dmaOps = 0
    package var dmaErrors = 0
    package var faults = 0
    package var groups = 0
    package var integrityErrors = 0
    package var invalidationsAcked = 0
    /// Pages named by the INVALIDATEs received (a range counts every page it touches).
    package var pagesInvalidated = 0
    /// Groups answered SUCCESS and INVALID, and responses no group was waiting for.
    package var success = 0
    package var invalid = 0
    package var unexpectedResponses = 0
    package var translations = 0
    package var staleReplies = 0
    /// From connect to the ATTACH reply mapped.
    package var attachMicroseconds = 0.0
    /// The service closed the connection (fenced or stopped) before the device detached.
    package var disconnected = false
    /// Why, when the service said (e.g. the host of its address space went away).
    package var detachReason: String?
    package var faultLatencyNs = LatencySummary(Histogram<UInt64>())
    /// Request to the service's answer, as hardware would see it (shared ring only).
    package var answerLatencyNs: LatencySummary?
    package var elapsedSeconds = 0.0
    package var problems: [String] = []
}

package enum ExternalDeviceSession {
    package static func run(_ o: ExternalDeviceOptions, shouldStop: @escaping () -> Bool = { false }) throws
        -> ExternalDeviceResult
    {
        let started = ContinuousClock.now
        let client = try DeviceClient(connectingTo: o.path)
        defer { client.close() }
        let attachment = try client.attach(
            Attach(
                deviceID: o.deviceID, pasid: o.pasid,
                credit: o.credit ?? UInt32(DeviceConfiguration.credit(outstanding: o.outstanding, burst: o.burst)),
                wantsStream: o.stream,
                addressSpaceName: o.addressSpace))
        let attached = ContinuousClock.now
        guard !attachment.windows.isEmpty else {
            throw DeviceClientError.protocolViolation("ATTACH gave no DMA window")
        }
        // A host's devices share its mappings: device n works in window (n - 1) mod count.
        let window = attachment.windows[o.addressSpace == nil ? 0 : Int(o.deviceID &- 1) % attachment.windows.count]
        var dc = DeviceConfiguration(deviceID: o.deviceID, iovaBase: window.iova, pages: Int(window.size >> 12))
        dc.pasid = o.pasid
        dc.workload = o.workload
        dc.seed = o.seed
        dc.spinNanoseconds = o.spinNanoseconds
        dc.hostMayChangeMemory = o.hostMayChangeMemory || o.addressSpace != nil
        dc.checkHostTags = o.addressSpace != nil
        dc.burst = min(o.burst, attachment.credit)
        dc.credit = attachment.credit
        dc.outstanding = o.outstanding
        dc.iotlbEntries = o.iotlbEntries
        let device = SimulatedDevice(
            configuration: dc, channel: attachment.channel, memory: attachment.memory,
            translator: .remote(client))
        let ignore = o.ignoreInvalidations
        let pagesInvalidated = PageCounter()
        client.serveInvalidations { [iotlb = device.iotlb] inv in
            guard !ignore else { return false }
            iotlb.invalidate(inv.ranges.map { IOVARange(start: $0.start, last: $0.last) }, sequence: inv.sequence)
            pagesInvalidated.count.add(
                inv.ranges.reduce(0) { $0 + IOVARange(start: $1.start, last: $1.last).pagesTouched },
                ordering: .relaxed)
            return true
        }
        device.start()
        while !device.isFinished && !shouldStop()
            && (o.seconds == 0 || (ContinuousClock.now - attached) < .seconds(o.seconds))
        {
            usleep(10_000)
        }
        let finishedEarly = device.isFinished
        let report = device.stopWorkload()
        let elapsed = ContinuousClock.now - attached
        var result = ExternalDeviceResult()
        result.disconnected = finishedEarly
        if finishedEarly, let why = client.detachedBecause(waitingUpTo: .seconds(2)) {
            result.detachReason = why
            result.problems.append("the service detached this device: \(why)")
        }
        if !finishedEarly {
            do { try client.detach() } catch {
                result.disconnected = true
                result.problems.append("DETACH: \(error)")
            }
        }
        result.deviceID = o.deviceID
        result.channel = o.stream ? "stream" : "shared"
        result.windowBytes = window.size
        result.dmaOps = report.dmaOps
        result.dmaErrors = report.dmaErrors
        result.faults = report.faults
        result.groups = report.groups
        result.integrityErrors = report.integrityErrors + report.wrongTranslations
        result.invalidationsAcked = client.invalidationsAcked.load(ordering: .relaxed)
        result.pagesInvalidated = pagesInvalidated.count.load(ordering: .relaxed)
        result.success = report.success
        result.invalid = report.invalid
        result.unexpectedResponses = report.protocolErrors
        result.translations = report.translations
        result.staleReplies = report.staleReplies
        result.attachMicroseconds = (attached - started).seconds * 1e6
        result.faultLatencyNs = LatencySummary(report.latency)
        if report.answerLatency.totalCount > 0 { result.answerLatencyNs = LatencySummary(report.answerLatency) }
        result.elapsedSeconds = elapsed.seconds
        result.problems = report.firstProblems + result.problems
        return result
    }
}

/// Pages invalidated so far, counted on one thread and read on another.
final class PageCounter: Sendable {
    let count = Atomic<Int>(0)
}

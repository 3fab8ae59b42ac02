// BenchSession.swift — pinned against fault-driven memory on the same workload, with the
// VFIO maintainer's yardsticks side by side: start-up (map time, time to the first DMA),
// density (resident and locked bytes), and throughput under load. One run per (size,
// touch fraction, mode); the bench interleaves the modes and repeats.

import Foundation
import Histogram
import IOPFCore
import IOPFService
import Logging

package struct BenchRow: Codable, Sendable {
    package var sizeBytes: UInt64
    package var touchFraction: Double
    package var mode: String
    /// Until every mapping call returned.
    package var mapSeconds: Double
    /// From the first mapping call to the first completed device DMA.
    package var firstDmaSeconds: Double
    /// From the end of mapping until the devices had touched the fraction of pages.
    package var touchSeconds: Double
    package var residentBytes: UInt64
    package var lockedBytes: UInt64
    /// Aggregate device DMA over the touched pages, whole 4 KiB pages per access.
    package var dmaGBps: Double
    package var faultLatencyNs: LatencySummary
    /// The floor measured right after this run at the same size: mlock seconds per GiB for
    /// pinned rows, MADV_POPULATE_WRITE ns per page for fault rows.
    package var adjacentFloor = 0.0
    /// This run against `adjacentFloor`: pinned map time per GiB over the mlock floor, or
    /// fault first-touch throughput over the populate floor's.
    package var ratioToFloor = 0.0
    /// Over the repeated runs of this row: each run's `ratioToFloor` and `mapSeconds`,
    /// smallest, median and largest (the row holds the medians).
    package var ratioSpread = Spread()
    package var mapSecondsSpread = Spread()
}

/// The smallest, median and largest of a row's runs.
package struct Spread: Codable, Sendable, Equatable {
    package var min = 0.0
    package var median = 0.0
    package var max = 0.0

    package init() {}

    package init(_ values: [Double]) {
        guard !values.isEmpty else { return }
        let sorted = values.sorted()
        (min, median, max) = (sorted[0], sorted[sorted.count / 2], sorted[sorted.count - 1])
    }
}

/// A bench run that went wrong in a way its numbers cannot show.
package struct BenchError: Error, CustomStringConvertible {
    package let description: String
    init(_ description: String) { self.description = description }
}

package enum BenchSession {
    package static let devices = 2

    /// Measures one (size, touch, mode) run on fresh memory.
    /// Measures the run, then its floor on fresh memory of the same size: mlock of the whole
    /// size for pinned, one MADV_POPULATE_WRITE per page over the touched pages for fault.
    ///
    /// Each starts on memory warmed just before (`Floors.warmUp` of the size): this VM's
    /// hypervisor backs guest pages lazily and takes back what stays free, so the first
    /// clear of a page it took back costs several times a warm one. Unwarmed, a pinned run
    /// that followed the fault run met such pages and the floor after it reused the run's
    /// own warm ones: the kernel's `clear_page` took 3.4x the samples in the pinned map as
    /// in the floor for the same bytes, with every other kernel and iopf frame within 10%.
    package static func measureWithFloor(
        size: UInt64, touch: Double, mode: MemoryMode, dmaSeconds: Double,
        logger: Logger = Logger(label: "iopf.bench")
    ) throws -> BenchRow {
        try Floors.warmUp(bytes: size)
        var row = try measure(size: size, touch: touch, mode: mode, dmaSeconds: dmaSeconds, logger: logger)
        try Floors.warmUp(bytes: size)
        let floor =
            mode == .pinned
            ? try Floors.mlockPerGiB(bytes: row.sizeBytes)
            : try Floors.populatePerPage(pages: max(1, Int(Double(row.sizeBytes >> 12) * touch)))
        row.adjacentFloor = floor
        let gib = Double(row.sizeBytes) / Double(1 << 30)
        let touchedPages = Double(row.sizeBytes >> 12) * touch
        row.ratioToFloor =
            mode == .pinned ? row.mapSeconds / gib / floor : floor / (row.touchSeconds * 1e9 / touchedPages)
        return row
    }

    package static func measure(
        size: UInt64, touch: Double, mode: MemoryMode, dmaSeconds: Double,
        logger: Logger = Logger(label: "iopf.bench")
    ) throws -> BenchRow {
        let slice = (size / UInt64(devices)) & ~((2 << 20) - 1)
        precondition(slice > 0, "bench size \(size) is below 2 MiB per device")
        let region = try HostRegion(length: slice * UInt64(devices), alignment: 2 << 20)
        var serviceConfig = ServiceConfiguration()
        serviceConfig.hostEvents = mode == .fault
        let rig = try Rig(engine: .forThisProcess(mode: mode), service: serviceConfig, domains: 1, logger: logger)
        let service = rig.service
        defer { service.stop() }

        let iova = { (d: Int) in ServeOptions.iovaBase + UInt64(d) * slice }
        let host = { (d: Int) in region.base + UInt64(d) * slice }
        let start = ContinuousClock.now
        for d in 0..<devices {
            switch mode {
            case .fault: try service.map(iova: iova(d), vaddr: host(d), size: slice, prot: .readWrite)
            case .pinned: try service.mapPinned(iova: iova(d), vaddr: host(d), size: slice, prot: .readWrite)
            }
        }
        let mapped = ContinuousClock.now

        // Touch: each device writes its first `touch` of pages once, 32 pages a burst.
        let touchPages = max(1, Int(Double(slice >> 12) * touch))
        func devicesFor(phase: Int, _ shape: (inout DeviceConfiguration) -> Void) throws -> [SimulatedDevice] {
            try (0..<devices).map { d in
                var dc = DeviceConfiguration(
                    deviceID: UInt32(phase * 100 + d + 1), iovaBase: iova(d), pages: touchPages,
                    hostBase: host(d), physBase: region.phys! + UInt64(d) * slice)
                shape(&dc)
                return try rig.device(dc, domain: 0, regions: [region])
            }
        }
        let touchers = try devicesFor(phase: 0) { dc in
            dc.workload = .sequential
            dc.burst = 32
            dc.fixedBurst = true
            dc.writePercent = 100
            dc.operationLimit = (touchPages + 31) / 32
        }
        touchers.forEach { $0.start() }
        while !touchers.allSatisfy({ $0.isFinished }) { usleep(200) }
        let touched = ContinuousClock.now
        let touchReports = touchers.map { $0.finish() }
        touchers.forEach { rig.remove($0, domain: 0) }
        let resident = try region.residentBytes()
        let locked = region.lockedBytes()

        // Throughput: random whole-page reads and writes over the touched pages.
        let movers = try devicesFor(phase: 1) { dc in
            dc.workload = .random
            dc.bytesPerAccess = 4096
            dc.seed = 42 &+ UInt64(dc.deviceID)
        }
        let dmaStart = ContinuousClock.now
        movers.forEach { $0.start() }
        usleep(UInt32(dmaSeconds * 1e6))
        let moverReports = movers.map { $0.finish() }
        let dmaElapsed = seconds(ContinuousClock.now - dmaStart)

        for d in 0..<devices { try service.unmap(iova: iova(d), size: slice) }
        service.stop()
        let stillLocked = region.lockedBytes()
        guard stillLocked == 0 else {
            throw BenchError("\(stillLocked) bytes of the \(mode.rawValue) run's memory stayed locked after unmap")
        }
        withExtendedLifetime(region) {}

        var latency = Histogram<UInt64>.nanoseconds()
        for r in touchReports { latency.add(r.latency) }
        let firstDMA = touchReports.compactMap(\.firstCompletion).min() ?? touched
        let problems = (touchReports + moverReports).flatMap(\.firstProblems)
        if !problems.isEmpty { logger.warning("bench run had problems: \(problems.prefix(3))") }
        return BenchRow(
            sizeBytes: slice * UInt64(devices), touchFraction: touch, mode: mode.rawValue,
            mapSeconds: seconds(mapped - start), firstDmaSeconds: seconds(firstDMA - start),
            touchSeconds: seconds(touched - mapped),
            residentBytes: resident, lockedBytes: locked,
            dmaGBps: Double(moverReports.reduce(0) { $0 + $1.bytesMoved }) / dmaElapsed / 1e9,
            faultLatencyNs: LatencySummary(latency))
    }

    static func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }

    /// The median of each measure over runs of the same (size, touch, mode).
    package static func median(_ runs: [BenchRow]) -> BenchRow {
        func mid<T: Comparable>(_ values: [T]) -> T { values.sorted()[values.count / 2] }
        var row = runs[0]
        row.mapSeconds = mid(runs.map(\.mapSeconds))
        row.firstDmaSeconds = mid(runs.map(\.firstDmaSeconds))
        row.touchSeconds = mid(runs.map(\.touchSeconds))
        row.residentBytes = mid(runs.map(\.residentBytes))
        row.lockedBytes = mid(runs.map(\.lockedBytes))
        row.dmaGBps = mid(runs.map(\.dmaGBps))
        row.adjacentFloor = mid(runs.map(\.adjacentFloor))
        row.ratioToFloor = mid(runs.map(\.ratioToFloor))
        row.ratioSpread = Spread(runs.map(\.ratioToFloor))
        row.mapSecondsSpread = Spread(runs.map(\.mapSeconds))
        row.faultLatencyNs =
            runs.sorted { $0.faultLatencyNs.p50 < $1.faultLatencyNs.p50 }[runs.count / 2].faultLatencyNs
        return row
    }
}

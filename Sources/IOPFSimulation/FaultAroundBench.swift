// FaultAroundBench.swift — `iopf bench --scenario fault-around`: single-page
// faulting against fault-around, on the same memory in the same run.
//
// One device first-touches fresh memory, writing whole pages: either all of it in order
// (sequential: 32 pages per DMA, so the single-page baseline already sends up to 32 pages
// per group), or a fraction of it at random, 4 KiB per touch. Each row gives the groups
// the device sent, the first-touch throughput, and the resident bytes afterwards. Beside
// the sequential rows stands the yardstick: one MADV_POPULATE_WRITE call over the same
// size of fresh memory, measured right after the run.

import Foundation
import Glibc
import Histogram
import IOPFCore
import IOPFService
import Logging

package struct FaultAroundRow: Codable, Sendable {
    package var sizeBytes: UInt64
    /// "sequential" or "random".
    package var pattern: String
    /// Touches as a fraction of the pages (random touches may repeat a page).
    package var touchFraction: Double
    /// The policy: "off", "adaptive" or a page count.
    package var faultAround: String
    /// Memory backed by 2 MiB transparent huge pages, blocks mapped on faults (`--huge-pages`).
    package var hugePages = false
    /// 2 MiB blocks mapped on faults with one entry each.
    package var blockMappings = 0
    package var groups = 0
    /// Page requests the device sent, and pages mapped ahead of them.
    package var faults = 0
    package var prefetchedPages = 0
    package var touchSeconds = 0.0
    /// Bytes touched (first touch) per second.
    package var touchGBps = 0.0
    /// One MADV_POPULATE_WRITE over the same size of fresh memory, right after the run
    /// (sequential rows only; 0 otherwise).
    package var populateGBps = 0.0
    package var residentBytes: UInt64 = 0
    package var faultLatencyNs = LatencySummary()
    /// Sequential rows: the engine's invalidation of one 4 KiB page inside each of 64
    /// blocks spread over the memory (what an MMU notifier for a 4 KiB madvise runs),
    /// and the pages each really unmapped (512 where a 2 MiB block stood).
    package var invalidate4KNs = LatencySummary()
    package var pagesUnmappedPer4K = 0.0
    package var problems: [String] = []
}

package enum FaultAroundBench {
    /// Runs one device over `size` of fresh memory under `policy`.
    package static func measure(
        size: UInt64, pattern: Workload, touch: Double, policy: FaultAroundPolicy,
        hugePages: Bool = false,
        logger: Logger = Logger(label: "iopf.bench")
    ) throws -> FaultAroundRow {
        precondition(
            pattern == .sequential || pattern == .random, "fault-around bench patterns are sequential and random")
        let size = size & ~((2 << 20) - 1)
        precondition(size > 0, "bench size below 2 MiB")
        if hugePages, let notice = try HugePages.enableForShmem() { logger.warning("\(notice)") }
        let region = try HostRegion(length: size, alignment: 2 << 20, hugePages: hugePages)
        var serviceConfig = ServiceConfiguration()
        serviceConfig.faultAround = policy
        let rig = try Rig(
            engine: .forThisProcess(mode: .fault, hugePages: hugePages), service: serviceConfig, domains: 1,
            logger: logger)
        let service = rig.service
        defer { service.stop() }
        let iova = ServeOptions.iovaBase
        try service.map(iova: iova, vaddr: region.base, size: size, prot: .readWrite)

        let pages = Int(size >> 12)
        var dc = DeviceConfiguration(
            deviceID: 1, iovaBase: iova, pages: pages, hostBase: region.base, physBase: region.phys!)
        dc.writePercent = 100
        dc.workload = pattern
        if pattern == .sequential {
            dc.burst = 32
            dc.fixedBurst = true
            dc.operationLimit = (Int(Double(pages) * touch) + 31) / 32
        } else {
            dc.burst = 1
            dc.fixedBurst = true
            dc.bytesPerAccess = 4096
            dc.operationLimit = max(1, Int(Double(pages) * touch))
        }
        let before = service.statistics
        let device = try rig.device(dc, domain: 0, regions: [region])
        let start = ContinuousClock.now
        device.start()
        while !device.isFinished { usleep(200) }
        let touched = ContinuousClock.now
        let report = device.finish()
        rig.remove(device, domain: 0)
        try service.barrier().wait()
        let after = service.statistics

        var row = FaultAroundRow(
            sizeBytes: size, pattern: pattern.rawValue, touchFraction: touch, faultAround: policy.description)
        row.hugePages = hugePages
        row.blockMappings = rig.engine.statistics.blockMappings
        row.groups = after.groups - before.groups
        row.faults = after.records - before.records
        row.prefetchedPages = after.prefetchedPages - before.prefetchedPages
        row.touchSeconds = BenchSession.seconds(touched - start)
        let touchedBytes = Double(min(dc.operationLimit! * (pattern == .sequential ? 32 : 1), pages)) * 4096
        row.touchGBps = touchedBytes / row.touchSeconds / 1e9
        row.residentBytes = try region.residentBytes()
        var latency = Histogram<UInt64>.nanoseconds()
        latency.add(report.latency)
        row.faultLatencyNs = LatencySummary(latency)
        row.problems = report.firstProblems
        if pattern == .sequential {
            (row.invalidate4KNs, row.pagesUnmappedPer4K) = try invalidateInsideBlocks(rig.engine, region: region)
        }
        try service.unmap(iova: iova, size: size)
        service.stop()
        withExtendedLifetime(region) {}
        if pattern == .sequential { row.populateGBps = Double(size) / (try Floors.populateOnce(bytes: size)) / 1e9 }
        return row
    }

    /// Times the engine's invalidation of one 4 KiB page (the sixth) inside each of 64
    /// blocks spread over `region`, and averages the pages each really unmapped.
    static func invalidateInsideBlocks(_ engine: FaultEngine, region: HostRegion) throws -> (LatencySummary, Double) {
        var times = Histogram<UInt64>.nanoseconds()
        let blocks = region.length / hugeBlockBytes
        let count = min(64, blocks)
        var unmapped = 0
        for k in 0..<count {
            let address = region.base + (k * blocks / count) * hugeBlockBytes + 5 * pageBytes
            let start = ContinuousClock.now
            unmapped += try engine.invalidate(hostAddress: address, length: pageBytes).pagesUnmapped
            times.record(UInt64((ContinuousClock.now - start).nanoseconds))
        }
        return (LatencySummary(times), Double(unmapped) / Double(count))
    }

    /// The median of each measure over runs of the same (size, pattern, policy).
    package static func median(_ runs: [FaultAroundRow]) -> FaultAroundRow {
        func mid<T: Comparable>(_ values: [T]) -> T { values.sorted()[values.count / 2] }
        var row = runs.sorted { $0.touchSeconds < $1.touchSeconds }[runs.count / 2]
        row.groups = mid(runs.map(\.groups))
        row.faults = mid(runs.map(\.faults))
        row.prefetchedPages = mid(runs.map(\.prefetchedPages))
        row.touchGBps = mid(runs.map(\.touchGBps))
        row.populateGBps = mid(runs.map(\.populateGBps))
        row.residentBytes = mid(runs.map(\.residentBytes))
        row.blockMappings = mid(runs.map(\.blockMappings))
        row.problems = runs.flatMap(\.problems)
        return row
    }
}

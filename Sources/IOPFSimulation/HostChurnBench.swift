// HostChurnBench.swift — `iopf bench --scenario host-churn`: what a host with N one-page DMA
// mappings costs the service's loop per host event, per unmap and per teardown. These are
// the costs a hostile host controls (defects 3-5 of the tenant boundary), so they must grow
// at most logarithmically with N. Measured on the engine a host's address space uses, over
// simulated memory, so that the data structures are timed and not the system calls around
// them (which cost the same for every N).

import Foundation
import IOPFCore

package struct HostChurnRow: Codable, Sendable, Equatable {
    package var mappings = 0
    /// DMA_MAP of one more mapping.
    package var mapNs = 0.0
    /// A REMOVE of one page that is mapped (the page is faulted in again, untimed).
    package var pageEventNs = 0.0
    /// A REMOVE of one page that no mapping has mapped: what a madvise loop costs.
    package var emptyEventNs = 0.0
    /// A REMOVE of the whole memory with every page mapped, per mapping.
    package var wholeEventNsPerMapping = 0.0
    /// DMA_UNMAP of one mapping among N.
    package var unmapNs = 0.0
    /// The host's teardown (every mapping removed at once), per mapping.
    package var teardownNsPerMapping = 0.0
}

package enum HostChurnBench {
    /// Runs the measurements for `mappings` one-page mappings, `events` timed events each.
    package static func measure(mappings n: Int, events: Int = 20_000, seed: UInt64 = 1) throws -> HostChurnRow {
        var configuration = EngineConfiguration()
        configuration.pageSizes = [.size4K]
        let engine = FaultEngine(memory: SimulatedHostMemory(), configuration: configuration)
        _ = try engine.createDomain()
        let hostBase: UInt64 = 0x7000_0000_0000
        func iova(_ k: Int) -> UInt64 { UInt64(k + 1) << 12 }
        func host(_ k: Int) -> UInt64 { hostBase + UInt64(k) << 12 }
        var rng = Xoshiro(seed: seed)
        var row = HostChurnRow()
        row.mappings = n
        row.mapNs = try time(n) { k in try engine.map(iova: iova(k), vaddr: host(k), size: 4096, prot: [.read, .write])
        }
        for k in 0..<n { try engine.premap(iova: iova(k), size: 4096, write: true) }
        var picks = (0..<events).map { _ in Int(rng.next() % UInt64(n)) }
        var elapsed = Duration.zero
        for k in picks {
            let start = ContinuousClock.now
            try engine.invalidate(hostAddress: host(k), length: 4096)
            elapsed += ContinuousClock.now - start
            try engine.premap(iova: iova(k), size: 4096, write: true)
        }
        row.pageEventNs = nanoseconds(elapsed) / Double(events)
        try engine.invalidate(hostAddress: host(picks[0]), length: 4096)
        row.emptyEventNs = try time(events) { _ in try engine.invalidate(hostAddress: host(picks[0]), length: 4096) }
        try engine.premap(iova: iova(picks[0]), size: 4096, write: true)
        row.wholeEventNsPerMapping =
            try time(1) { _ in try engine.invalidate(hostAddress: hostBase, length: UInt64(n) << 12) }
            / Double(n)
        picks = Array(picks.prefix(min(events, 5000)))
        elapsed = .zero
        for k in picks {
            let start = ContinuousClock.now
            try engine.unmap(iova: iova(k), size: 4096)
            elapsed += ContinuousClock.now - start
            try engine.map(iova: iova(k), vaddr: host(k), size: 4096, prot: [.read, .write])
        }
        row.unmapNs = nanoseconds(elapsed) / Double(picks.count)
        for k in 0..<n { try engine.premap(iova: iova(k), size: 4096, write: true) }
        row.teardownNsPerMapping =
            try time(1) { _ in try engine.unmap(iova: 0, size: IOPageTable.iovaLimit) } / Double(n)
        return row
    }

    /// Nanoseconds per call of `body` over `count` calls.
    private static func time(_ count: Int, _ body: (Int) throws -> Void) rethrows -> Double {
        let start = ContinuousClock.now
        for k in 0..<count { try body(k) }
        return nanoseconds(ContinuousClock.now - start) / Double(count)
    }

    private static func nanoseconds(_ d: Duration) -> Double {
        Double(d.components.seconds) * 1e9 + Double(d.components.attoseconds) / 1e9
    }
}

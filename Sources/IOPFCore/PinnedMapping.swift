// PinnedMapping.swift — the pinned path, with VFIO type1 semantics (vfio_pin_map_dma),
// so that pinned and fault-driven memory can be compared on the same engine.
//
// Two-phase, as iommufd maps: the IOVA range is reserved in the mapping table first (faults
// there are answered INVALID until it is filled), then pages are pinned in batches of 512,
// charged, and each maximal physically contiguous run of one page kind is mapped with one
// call (2 MiB / 1 GiB blocks where aligned). Runs may span batches. Any failure (limit,
// pinning, mapping) undoes everything this call did: nothing half-mapped, half-pinned or
// half-charged remains (seed 001).
//
// Seed 000's bug was an exit path that left a partially consumed batch referring to another
// kind of page; here a batch is always consumed whole before the next is pinned, and the
// run being built is flushed whenever the kind changes.

extension FaultEngine {
    public static let pinBatchPages = 512

    public struct PinStatistics: Sendable, Equatable {
        /// Map calls made for pinned runs.
        public var mapCalls = 0
        public var pinnedPages = 0
        public var chargedPages = 0
    }

    /// Maps `[iova, iova + size)` to host memory at `vaddr`, pinned and fully mapped
    /// before it returns. Throws with the reason on any failure, leaving nothing behind.
    @discardableResult
    public func mapPinned(iova: UInt64, vaddr: UInt64, size: UInt64, prot: Protection) throws -> (MappingID, PinStatistics) {
        let m = try state.withLock { s throws in
            let m = try s.mappings.insert(iova: iova, vaddr: vaddr, size: size, prot: prot)
            m.pinned = true
            return m
        }
        var stats = PinStatistics()
        var pages: [PinnedPage] = []
        pages.reserveCapacity(Self.pinBatchPages)
        // The run being built: first page index, first phys, length, kind.
        var run: (first: Int, phys: UInt64, count: Int, chargeable: Bool)?
        var pinned = 0
        do {
            while pinned < m.pageCount {
                let n = min(Self.pinBatchPages, m.pageCount - pinned)
                pages.removeAll(keepingCapacity: true)
                try memory.pin(address: m.hostAddress(page: pinned), pageCount: n, into: &pages)
                let batchStart = pinned
                pinned += n
                precondition(pages.count == n, "pin returned \(pages.count) pages for \(n)")
                let chargeable = pages.reduce(0) { $0 + ($1.chargeable ? 1 : 0) }
                try lockedMemory.charge(pages: chargeable)
                stats.chargedPages += chargeable
                for (k, page) in pages.enumerated() {
                    if let r = run, r.chargeable == page.chargeable, r.phys + UInt64(r.count) << pageShift == page.phys {
                        run!.count += 1
                        continue
                    }
                    if let r = run { try mapPinnedRun(m, r.first, r.phys, r.count, &stats) }
                    run = (batchStart + k, page.phys, 1, page.chargeable)
                }
            }
            if let r = run { try mapPinnedRun(m, r.first, r.phys, r.count, &stats) }
        } catch {
            state.withLock { s in
                beginInvalidation()
                _ = try? unmapPages(of: m, in: 0..<m.pageCount, &s)
                syncAll(&s)
                endInvalidation()
                s.mappings.remove(m)
            }
            if pinned > 0 { memory.unpin(address: vaddr, pageCount: pinned) }
            lockedMemory.uncharge(pages: stats.chargedPages)
            throw PinError(iova: iova, size: size, pinnedBeforeFailure: pinned, underlying: "\(error)")
        }
        state.withLock { s in
            m.chargedPages = stats.chargedPages
            s.stats.pinnedMapCalls += stats.mapCalls
        }
        stats.pinnedPages = pinned
        return (m.id, stats)
    }

    /// Maps one physically contiguous run into every domain and marks it mapped.
    private func mapPinnedRun(_ m: DMAMapping, _ first: Int, _ phys: UInt64, _ count: Int, _ stats: inout PinStatistics) throws {
        try state.withLock { s throws in
            let iova = m.iova(page: first)
            let bytes = UInt64(count) << pageShift
            for (i, d) in s.domains.enumerated() {
                do {
                    try d.map(iova: iova, phys: phys, size: bytes, prot: m.prot)
                } catch {
                    for u in 0..<i {
                        _ = s.domains[u].unmap(iova: iova, size: bytes, gather: &s.gathers[u])
                        s.domains[u].sync(&s.gathers[u])
                    }
                    throw error
                }
            }
            m.iopfMapped.set(first..<(first + count))
            stats.mapCalls += 1
        }
    }

    /// Locked memory charged by pinned mappings, in bytes.
    public var lockedBytes: UInt64 { lockedMemory.lockedBytes }
}

public struct PinError: Error, Sendable, CustomStringConvertible {
    public var iova: UInt64
    public var size: UInt64
    public var pinnedBeforeFailure: Int
    public var underlying: String
    public var description: String {
        "pinned map of [\(hex(iova)), +\(hex(size))) failed after pinning \(pinnedBeforeFailure) pages: \(underlying); "
            + "everything this call pinned, charged and mapped was released"
    }
}

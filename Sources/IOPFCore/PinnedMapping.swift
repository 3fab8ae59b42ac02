// PinnedMapping.swift — the pinned path, with VFIO type1 semantics (vfio_pin_map_dma),
// so that pinned and fault-driven memory can be compared on the same engine.
//
// Two-phase, as iommufd maps: the IOVA range is reserved in the mapping table first (faults
// there are answered INVALID until it is filled), then pages are pinned in batches of 512,
// charged, and each maximal physically contiguous run of one page kind is mapped with one
// call (2 MiB / 1 GiB blocks where aligned). Runs may span batches. Any failure (limit,
// pinning, mapping) undoes everything this call did: nothing half-mapped, half-pinned or
// half-charged remains (the "vfio/type1: Remove locked page accounting workqueue" thread).
//
// Seed 000's bug was an exit path that left a partially consumed batch referring to another
// kind of page; here a batch is always consumed whole before the next is pinned, and the
// run being built is flushed whenever the kind changes.

extension FaultEngine {
    /// Pages pinned per `mlock` call, as VFIO pins in batches.
    public static let pinBatchPages = 512

    /// What pinned maps did.
    public struct PinStatistics: Sendable, Equatable {
        /// Map calls made for pinned runs.
        public var mapCalls = 0
        /// Pages pinned.
        public var pinnedPages = 0
        /// Pages charged to locked memory (pinned pages without page backing are not).
        public var chargedPages = 0
    }

    /// Maps `[iova, iova + size)` to host memory at `vaddr`, pinned and fully mapped
    /// before it returns. Throws with the reason on any failure, leaving nothing behind.
    @discardableResult
    public func mapPinned(iova: UInt64, vaddr: UInt64, size: UInt64, prot: Protection) throws -> (
        MappingID, PinStatistics
    ) {
        // Inserted as `populating`: until this call returns, unmap and update refuse it
        // (busy), so nothing can remove it while its pages are pinned outside the lock.
        let m = try state.withLock { s throws in
            if let failure = s.failure { throw failure }
            let m = try s.mappings.insert(iova: iova, vaddr: vaddr, size: size, prot: prot)
            m.pinned = true
            m.populating = true
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
                // Charged before pinned, as vfio_pin_pages_remote checks the limit before
                // it holds pages; device memory (not chargeable) is refunded after.
                try lockedMemory.charge(pages: n)
                stats.chargedPages += n
                pages.removeAll(keepingCapacity: true)
                do {
                    try memory.pin(address: m.hostAddress(page: pinned), pageCount: n, into: &pages)
                } catch {
                    lockedMemory.uncharge(pages: n)  // nothing of this batch stays pinned
                    stats.chargedPages -= n
                    throw error
                }
                let batchStart = pinned
                pinned += n
                precondition(pages.count == n, "pin returned \(pages.count) pages for \(n)")
                let refund = n - pages.reduce(0) { $0 + ($1.chargeable ? 1 : 0) }
                lockedMemory.uncharge(pages: refund)
                stats.chargedPages -= refund
                for (k, page) in pages.enumerated() {
                    if let r = run, r.chargeable == page.chargeable, r.phys + UInt64(r.count) << pageShift == page.phys
                    {
                        run!.count += 1
                        continue
                    }
                    if let r = run { try mapPinnedRun(m, r.first, r.phys, r.count, &stats) }
                    run = (batchStart + k, page.phys, 1, page.chargeable)
                }
            }
            if let r = run { try mapPinnedRun(m, r.first, r.phys, r.count, &stats) }
        } catch {
            let unwound = state.withLock { s in
                beginInvalidation()
                defer { endInvalidation() }
                do {
                    try unmapAllOrStop([m], &s)
                } catch {
                    // Translations remain: the pages must stay pinned and charged, and the
                    // mapping stays so that its charge is accounted for.
                    m.chargedPages = stats.chargedPages
                    m.populating = false
                    return false
                }
                s.mappings.remove(m)
                return true
            }
            guard unwound else {
                throw PinError(
                    iova: iova, size: size, pinnedBeforeFailure: pinned,
                    underlying: "\(error), and undoing it failed: \(failure.map { "\($0)" } ?? "")", released: false)
            }
            if pinned > 0 { memory.unpin(address: vaddr, pageCount: pinned) }
            lockedMemory.uncharge(pages: stats.chargedPages)
            throw PinError(iova: iova, size: size, pinnedBeforeFailure: pinned, underlying: "\(error)")
        }
        state.withLock { s in
            m.chargedPages = stats.chargedPages
            m.populating = false
            s.stats.pinnedMapCalls += stats.mapCalls
        }
        stats.pinnedPages = pinned
        return (m.id, stats)
    }

    /// Maps one physically contiguous run into every domain and marks it mapped.
    private func mapPinnedRun(_ m: DMAMapping, _ first: Int, _ phys: UInt64, _ count: Int, _ stats: inout PinStatistics)
        throws
    {
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

/// A pinned map that failed; everything it did was undone.
public struct PinError: Error, Sendable, CustomStringConvertible {
    /// The first IOVA of the refused map.
    public var iova: UInt64
    /// The size of the refused map in bytes.
    public var size: UInt64
    /// Pages pinned (and then unpinned) before the failure.
    public var pinnedBeforeFailure: Int
    /// What failed, in words.
    public var underlying: String
    /// False only when undoing failed too (the engine stopped): then the pages stay pinned
    /// and charged, because a translation to them may remain.
    public var released = true
    public var description: String {
        "pinned map of [\(hex(iova)), +\(hex(size))) failed after pinning \(pinnedBeforeFailure) pages: \(underlying); "
            + (released
                ? "everything this call pinned, charged and mapped was released"
                : "its pages stay pinned and charged because a device may still reach them")
    }
}

/// How many times each host page is pinned, kept as boundaries, so that the pages of
/// aliased pinned mappings (two IOVA ranges over one host range) are unlocked only when
/// the last pin goes: mlock(2) does not count, one munlock unlocks every lock.
public struct PinCounts: Sendable {
    /// Boundary → change of the count there; zero entries are dropped, so adjacent pins
    /// (512-page batches) cost no boundary between them.
    private var delta: [UInt64: Int] = [:]

    /// No page pinned.
    public init() {}

    /// Whether no page is pinned.
    public var isEmpty: Bool { delta.isEmpty }

    /// Counts one more pin of every page in `r`.
    public mutating func add(_ r: Range<UInt64>) {
        guard !r.isEmpty else { return }
        bump(r.lowerBound, 1)
        bump(r.upperBound, -1)
    }

    /// Drops one pin of every page of `r` (each must be pinned) and returns the parts of
    /// `r` that no pin covers any more: those, and only those, may be unlocked.
    public mutating func remove(_ r: Range<UInt64>) -> [Range<UInt64>] {
        guard !r.isEmpty else { return [] }
        bump(r.lowerBound, -1)
        bump(r.upperBound, 1)
        var free: [Range<UInt64>] = []
        var count = 0
        var zeroFrom: UInt64? = nil
        let keys = delta.keys.sorted()
        var i = 0
        while i < keys.count, keys[i] <= r.lowerBound { count += delta[keys[i]]!; i += 1 }
        if count <= 0 { zeroFrom = r.lowerBound }
        while i < keys.count, keys[i] < r.upperBound {
            count += delta[keys[i]]!
            if count <= 0, zeroFrom == nil { zeroFrom = keys[i] }
            if count > 0, let z = zeroFrom { free.append(z..<keys[i]); zeroFrom = nil }
            i += 1
        }
        if let z = zeroFrom { free.append(z..<r.upperBound) }
        return free
    }

    /// Pins covering `address`.
    public func count(at address: UInt64) -> Int {
        delta.reduce(0) { $0 + ($1.key <= address ? $1.value : 0) }
    }

    private mutating func bump(_ at: UInt64, _ by: Int) {
        let v = delta[at, default: 0] + by
        delta[at] = v == 0 ? nil : v
    }
}

// DirtyTracking.swift — which pages devices wrote, for live migration (iommufd's
// IOMMU_HWPT_SET_DIRTY_TRACKING and IOMMU_HWPT_GET_DIRTY_BITMAP, done with write faults
// instead of hardware dirty bits).
//
// While a mapping is tracked, its leaves are writable only for pages whose dirty bit is
// set. A device writing a write-protected page takes a permission fault and sends a
// write page request; the fault path sets the bit and restores write access to the leaf
// (no host page is resolved again, no sync: widening a permission needs none). Reading
// the log takes the update lock once: report the set bits, write-protect those leaves,
// sync each domain once, clear the bits. A write that lands before the sync went through
// a writable leaf, whose bit was set and is reported now; a write after it faults and is
// reported next time. Bits survive invalidations, so a page written and then unmapped in
// the same round is still reported.
//
// Pinned mappings are never write-protected: every page is reported dirty on every read
// (VFIO type1 without device dirty tracking). A fault-mode mapping that is not tracked is
// reported whole too: without a log, every page may have been written.
//
// Ranges are `[iova, iova + size)`, page-aligned; bit k of a returned bitmap is the page
// at `iova + k * 4 KiB`. Tracking covers whole mappings: any mapping the range touches.

/// A dirty-tracking request on a range that is not tracked, or not wholly inside mappings.
public struct DirtyTrackingError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The first IOVA of the refused range.
    public var iova: UInt64
    /// The size of the refused range in bytes.
    public var size: UInt64
    public var description: String {
        "dirty tracking range [\(hex(iova)), +\(hex(size))) must be page-aligned, non-empty "
            + "and inside the I/O address space"
    }
}

extension FaultEngine {
    /// Starts dirty tracking on every fault-mode mapping the range touches, and on every
    /// mapping created inside the range later: present leaves lose write access, with one
    /// gather and one sync per domain. Mappings already tracked keep their bits. Returns
    /// the mappings newly tracked.
    @discardableResult
    public func startDirtyTracking(iova: UInt64, size: UInt64) throws -> Int {
        let last = try Self.dirtyRange(iova: iova, size: size)
        return try state.withLock { s throws in
            if let failure = s.failure { throw failure }
            s.dirtyTracked.append(iova...last)
            var started = 0
            s.mappings.forEachMapping(overlappingIOVA: iova, last: last) { m in
                guard !m.pinned, m.dirty == nil else { return }
                m.dirty = PageBitmap(count: m.pageCount)
                started += 1
                guard m.prot.contains(.write) else { return }
                for d in s.domains.indices {
                    _ = s.domains[d].writeProtect(iova: m.iova, size: m.size, gather: &s.gathers[d])
                }
            }
            syncAll(&s)
            return started
        }
    }

    /// The IOVAs tracking `[iova, iova + size)` covers: the range and every mapping it
    /// touches, whole (one interval, since each such mapping overlaps the range). Two
    /// ranges whose spans overlap share a mapping or overlap themselves.
    public func trackingSpan(iova: UInt64, size: UInt64) -> ClosedRange<UInt64> {
        let last = iova + (size - 1)
        return state.withLock { s in
            (s.mappings.mapping(containing: iova)?.iova ?? iova)...(s.mappings.mapping(containing: last)?.iovaLast
                ?? last)
        }
    }

    /// Stops tracking the mappings the range touches, and forgets every tracked range it
    /// touches: write access comes back to every present leaf (no sync needed) and their
    /// bits are dropped.
    public func stopDirtyTracking(iova: UInt64, size: UInt64) throws {
        let last = try Self.dirtyRange(iova: iova, size: size)
        state.withLock { s in
            s.dirtyTracked.removeAll { $0.overlaps(iova...last) }
            s.mappings.forEachMapping(overlappingIOVA: iova, last: last) { m in
                guard m.dirty != nil else { return }
                m.dirty = nil
                guard m.prot.contains(.write) else { return }
                var p = m.iopfMapped.findNextSet(from: 0)
                while p < m.pageCount {
                    for d in s.domains { _ = d.restoreWrite(iova: m.iova(page: p)) }
                    p = m.iopfMapped.findNextSet(from: p + 1)
                }
            }
        }
    }

    /// The pages written in `[iova, iova + size)` since the last call (or since tracking
    /// started), write-protecting them again with one sync per domain. Pinned and
    /// untracked mappings report every page; holes report none.
    public func readAndClearDirty(iova: UInt64, size: UInt64) throws -> PageBitmap {
        let last = try Self.dirtyRange(iova: iova, size: size)
        var out = PageBitmap(count: Int(size >> pageShift))
        try state.withLock { s throws in
            if let failure = s.failure { throw failure }
            s.mappings.forEachMapping(overlappingIOVA: iova, last: last) { m in
                let lo = m.iova >= iova ? 0 : m.pageIndex(iova: iova)
                let hi = m.iovaLast <= last ? m.pageCount : m.pageIndex(iova: last) + 1
                let shift = Int((m.iova(page: lo) - iova) >> pageShift) - lo  // mapping page + shift = bit in `out`
                Self.report(m, pages: lo..<hi, into: &out, at: shift)
                guard !m.pinned, let dirty = m.dirty else { return }
                var p = dirty.findNextSet(from: lo, to: hi)
                while p < hi {
                    let end = dirty.findNextClear(from: p, to: hi)
                    let bytes = UInt64(end - p) << pageShift
                    for d in s.domains.indices {
                        _ = s.domains[d].writeProtect(iova: m.iova(page: p), size: bytes, gather: &s.gathers[d])
                    }
                    p = dirty.findNextSet(from: end, to: hi)
                }
                // A block leaf is protected whole: its pages outside the range lose write
                // access with their bits still set, which only costs them a fault.
                m.dirty?.clear(lo..<hi)  // `dirty` is a copy: clear in place
            }
            syncAll(&s)
            s.stats.dirtyReads += 1
        }
        return out
    }

    /// Sets in `out`, from bit `shift` on, the pages of `m` in `pages` to report: its dirty
    /// bits, or every page of a pinned or untracked mapping.
    static func report(_ m: DMAMapping, pages: Range<Int>, into out: inout PageBitmap, at shift: Int) {
        guard !m.pinned, let dirty = m.dirty else {
            out.set((pages.lowerBound + shift)..<(pages.upperBound + shift))
            return
        }
        var p = dirty.findNextSet(from: pages.lowerBound, to: pages.upperBound)
        while p < pages.upperBound {
            let end = dirty.findNextClear(from: p, to: pages.upperBound)
            out.set((p + shift)..<(end + shift))
            p = dirty.findNextSet(from: end, to: pages.upperBound)
        }
    }

    private static func dirtyRange(iova: UInt64, size: UInt64) throws(DirtyTrackingError) -> UInt64 {
        guard size > 0, isPageAligned(iova), isPageAligned(size), let last = lastAddress(start: iova, size: size) else {
            throw DirtyTrackingError(iova: iova, size: size)
        }
        return last
    }
}

extension FaultEngine.State {
    /// The permission a page of `m` is installed with: while `m` is tracked, write only
    /// for a write request (whose page becomes dirty now) or a page already dirty.
    @inline(__always)
    func installProtection(_ m: DMAMapping, page: Int, writeRequest: Bool) -> Protection {
        guard let dirty = m.dirty, m.prot.contains(.write), !writeRequest, !dirty.test(page) else { return m.prot }
        return m.prot.subtracting(.write)
    }

    /// A write request for a page already mapped in a tracked mapping: the page becomes
    /// dirty and its leaf writable in every domain (a block's every page). No sync: the
    /// device dropped its read-only translation before asking.
    mutating func restoreWrite(iova: UInt64, mapping m: DMAMapping) -> RequestOutcome {
        let index = m.pageIndex(iova: iova)
        guard m.iopfMapped.test(index) else { return .mapFailed }  // cannot happen: same sequence
        var block = pageBytes
        for d in domains { block = max(block, d.restoreWrite(iova: iova)) }
        let first = max(iova & ~(block - 1), m.iova)
        let end = min((iova & ~(block - 1)) + block - 1, m.iovaLast)
        m.dirty?.set(m.pageIndex(iova: first)..<(m.pageIndex(iova: end) + 1))
        stats.writeRestores += 1
        return .writeRestored
    }
}

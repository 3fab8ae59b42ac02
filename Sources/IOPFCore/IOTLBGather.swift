// IOTLBGather.swift — collects unmapped IOVA ranges and freed table pages so that one
// IOTLB sync covers many unmaps (`struct iommu_iotlb_gather` in Linux).
//
// Ranges are inclusive `[start, last]`. A gather belongs to one I/O page table for the
// time of one operation; `IOPageTable.sync(_:)` flushes it.

/// Who must drop cached translations when a gather is synced: the devices' IOTLBs.
///
/// `invalidate` returns only when every cache has dropped every translation in `ranges`
/// (like an ATS invalidation completion). It is called on the engine's thread with the
/// update lock held, so it must not call back into the engine.
public protocol IOTLBInvalidator: AnyObject {
    func invalidate(_ ranges: [IOVARange])
}

/// When a gather must sync before it can take another range.
public enum GatherPolicy: Sendable, Hashable, CustomStringConvertible {
    /// Linux's `iommu_iotlb_gather_add_page`: sync first when the page size changes or the
    /// new range is disjoint from the gathered one (adjacent counts as joint). One range.
    case linux
    /// Keep up to `maxRanges` disjoint ranges and sync them together; sync early only when
    /// a further disjoint range would not fit.
    case rangeList(maxRanges: Int)

    public static let defaultRangeList = GatherPolicy.rangeList(maxRanges: 64)

    public var description: String {
        switch self {
        case .linux: "linux"
        case .rangeList(let n): "range-list(\(n))"
        }
    }
}

public struct IOTLBGather {
    public let policy: GatherPolicy
    /// Pending ranges, disjoint and non-adjacent.
    public private(set) var ranges: [IOVARange] = []
    /// Page size of the pending range under the Linux policy (0 when empty).
    private var pageSize: UInt64 = 0
    /// Table pages unlinked from the table but not yet returned to the pool.
    var freedPages: [TablePageID] = []

    public init(policy: GatherPolicy = .defaultRangeList) {
        if case .rangeList(let n) = policy {
            precondition(n >= 1, "a range-list gather needs room for at least one range, got \(n)")
        }
        self.policy = policy
    }

    public var isEmpty: Bool { ranges.isEmpty && freedPages.isEmpty }

    /// Whether the pending contents must be synced before `range` (unmapped with leaves of
    /// `pageSize` bytes) can be added.
    @inline(__always)
    func needsSync(before range: IOVARange, pageSize size: UInt64) -> Bool {
        guard let tail = ranges.last else { return false }
        switch policy {
        case .linux:
            return size != pageSize || !tail.touches(range)
        case .rangeList(let maxRanges):
            if tail.touches(range) || ranges.count < maxRanges { return false }
            return !ranges.contains { $0.touches(range) }
        }
    }

    /// Adds a range; the caller has synced first if `needsSync` said so.
    @inline(__always)
    mutating func add(_ range: IOVARange, pageSize size: UInt64) {
        pageSize = size
        let n = ranges.count
        if n > 0, ranges[n - 1].touches(range) {
            ranges[n - 1] = IOVARange(start: min(ranges[n - 1].start, range.start), last: max(ranges[n - 1].last, range.last))
            return
        }
        if case .rangeList = policy, let i = ranges.firstIndex(where: { $0.touches(range) }) {
            var merged = IOVARange(start: min(ranges[i].start, range.start), last: max(ranges[i].last, range.last))
            ranges.remove(at: i)
            // The widened range may now touch others; fold them in so ranges stay disjoint.
            while let j = ranges.firstIndex(where: { $0.touches(merged) }) {
                merged = IOVARange(start: min(ranges[j].start, merged.start), last: max(ranges[j].last, merged.last))
                ranges.remove(at: j)
            }
            ranges.append(merged)
            return
        }
        ranges.append(range)
    }

    /// Empties the gather, keeping its storage so steady-state use does not allocate.
    mutating func reset() {
        ranges.removeAll(keepingCapacity: true)
        freedPages.removeAll(keepingCapacity: true)
        pageSize = 0
    }
}

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
    /// Drops cached translations of `ranges` from every device of the domain; returns when none is in use.
    func invalidate(_ ranges: [IOVARange])
}

/// Told of every IOTLB sync of a page table: `willSync` after the table changed and before
/// the devices are told to drop the ranges, `synced` once they have. Lets a checker know
/// which translations no device may use any more. Called with the engine's update lock
/// held.
public protocol IOTLBSyncObserver: AnyObject, Sendable {
    /// Called before a sync starts.
    func willSync()
    /// Called after a sync of `ranges` completed.
    func synced(_ ranges: [IOVARange])
}

extension IOTLBSyncObserver {
    /// Does nothing.
    public func willSync() {}
}

/// When a gather must sync before it can take another range.
public enum GatherPolicy: Sendable, Hashable, CustomStringConvertible {
    /// Linux's `iommu_iotlb_gather_add_page`: sync first when the page size changes or the
    /// new range is disjoint from the gathered one (adjacent counts as joint). One range.
    case linux
    /// Keep up to `maxRanges` disjoint ranges and sync them together; sync early only when
    /// a further disjoint range would not fit.
    case rangeList(maxRanges: Int)

    /// A range list of up to 64 ranges, then one sync.
    public static let defaultRangeList = GatherPolicy.rangeList(maxRanges: 64)

    public var description: String {
        switch self {
        case .linux: "linux"
        case .rangeList(let n): "range-list(\(n))"
        }
    }
}

/// Unmapped ranges and freed table pages, held until one IOTLB sync covers them all.
public struct IOTLBGather {
    /// How ranges are merged and when the gather must sync.
    public let policy: GatherPolicy
    /// Pending ranges: sorted by start, disjoint and non-adjacent.
    public private(set) var ranges: [IOVARange] = []
    /// Page size of the pending range under the Linux policy (0 when empty).
    private var pageSize: UInt64 = 0
    /// Table pages unlinked from the table but not yet returned to the pool.
    var freedPages: [TablePageID] = []

    /// An empty gather following `policy`.
    public init(policy: GatherPolicy = .defaultRangeList) {
        if case .rangeList(let n) = policy {
            precondition(n >= 1, "a range-list gather needs room for at least one range, got \(n)")
        }
        self.policy = policy
    }

    /// Whether nothing waits for a sync.
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

    /// Adds a range; the caller has synced first if `needsSync` said so. Ranges stay
    /// sorted by start, so a new range merges only with its neighbours; the insertion
    /// point is searched from the end because unmap walks ascend.
    @inline(__always)
    mutating func add(_ range: IOVARange, pageSize size: UInt64) {
        pageSize = size
        var lo = ranges.count
        while lo > 0, ranges[lo - 1].start > range.start { lo -= 1 }
        var hi = lo
        var merged = range
        if lo > 0, ranges[lo - 1].touches(merged) {
            lo -= 1
            merged = IOVARange(start: ranges[lo].start, last: max(ranges[lo].last, merged.last))
        }
        while hi < ranges.count, ranges[hi].touches(merged) {
            merged.last = max(ranges[hi].last, merged.last)
            hi += 1
        }
        if lo == hi {
            ranges.insert(merged, at: lo)
        } else if hi == lo + 1 {
            ranges[lo] = merged
        } else {
            ranges.replaceSubrange(lo..<hi, with: CollectionOfOne(merged))
        }
    }

    /// Empties the gather, keeping its storage so steady-state use does not allocate.
    mutating func reset() {
        ranges.removeAll(keepingCapacity: true)
        freedPages.removeAll(keepingCapacity: true)
        pageSize = 0
    }
}

// TranslationAudit.swift — makes "no device uses a translation after the sync of an
// invalidation that covered it" checkable: every sync of a domain stamps the pages it
// covered with a new epoch (after the devices were told), and every IOTLB entry records
// the epoch it was filled in. A device that uses an entry older than its page's last sync
// has kept a translation it was told to drop.
//
// Pages are those of the IOVA window `[iovaBase, iovaBase + pages * 4 KiB)`.

import IOPFCore
import Synchronization

public final class TranslationAudit: IOTLBSyncObserver, @unchecked Sendable {
    let iovaBase: UInt64
    let pages: Int
    private let epoch = Atomic<UInt64>(1)
    /// Last sync epoch per page; the only unsafe memory here, written by the syncing
    /// thread, read by devices.
    private let lastSync: UnsafeMutablePointer<Atomic<UInt64>>

    public init(iovaBase: UInt64, pages: Int) {
        self.iovaBase = iovaBase
        self.pages = pages
        lastSync = .allocate(capacity: pages)
        for i in 0..<pages { (lastSync + i).initialize(to: Atomic(0)) }
    }

    deinit {
        lastSync.deinitialize(count: pages)
        lastSync.deallocate()
    }

    /// The epoch a walk starting now belongs to.
    var current: UInt64 { epoch.load(ordering: .acquiring) }

    public func synced(_ ranges: [IOVARange]) {
        let stamp = epoch.add(1, ordering: .acquiringAndReleasing).newValue
        let end = iovaBase + UInt64(pages) << 12
        for r in ranges where r.last >= iovaBase && r.start < end {
            let first = Int((max(r.start, iovaBase) - iovaBase) >> 12)
            let last = Int((min(r.last, end - 1) - iovaBase) >> 12)
            for p in first...last { lastSync[p].store(stamp, ordering: .releasing) }
        }
    }

    /// True when a translation of `iova` filled at epoch `filled` was covered by a sync
    /// stamped later. A sync stamps after its unmap and its IOTLB invalidation, so a walk
    /// that read epoch E either saw the unmap (and filled nothing) or precedes every sync
    /// stamped above E: only those can make the entry stale. (A walk after sync E reads E
    /// itself, hence `>`, not `>=`.)
    func isStale(iova: UInt64, filled: UInt64) -> Bool {
        guard iova >= iovaBase else { return false }
        let p = Int((iova - iovaBase) >> 12)
        return p < pages && lastSync[p].load(ordering: .acquiring) > filled
    }
}

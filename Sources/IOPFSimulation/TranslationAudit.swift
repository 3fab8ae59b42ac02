// TranslationAudit.swift — makes "no device uses a translation after the sync of an
// invalidation that covered it" checkable: every sync of a domain takes a new epoch before
// the devices are told and stamps the pages it covered with it after, and every IOTLB
// entry records the epoch it was filled in. A device that uses an entry older than its page's last sync
// has kept a translation it was told to drop.
//
// Pages are those of the IOVA window `[iovaBase, iovaBase + pages * 4 KiB)`.

import IOPFCore
import Synchronization

package final class TranslationAudit: IOTLBSyncObserver, @unchecked Sendable {
    let iovaBase: UInt64
    let pages: Int
    private let epoch = Atomic<UInt64>(1)
    /// Last sync epoch per page; the only unsafe memory here, written by the syncing
    /// thread, read by devices.
    private let lastSync: UnsafeMutablePointer<Atomic<UInt64>>

    package init(iovaBase: UInt64, pages: Int) {
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

    /// The epoch of the sync under way: taken before the drop, stamped after it.
    private let pending = Atomic<UInt64>(0)

    package func willSync() {
        pending.store(epoch.add(1, ordering: .acquiringAndReleasing).newValue, ordering: .relaxed)
    }

    package func synced(_ ranges: [IOVARange]) {
        let stamp = pending.load(ordering: .relaxed)
        let end = iovaBase + UInt64(pages) << 12
        for r in ranges where r.last >= iovaBase && r.start < end {
            let first = Int((max(r.start, iovaBase) - iovaBase) >> 12)
            let last = Int((min(r.last, end - 1) - iovaBase) >> 12)
            for p in first...last { lastSync[p].store(stamp, ordering: .releasing) }
        }
    }

    /// True when a translation of `iova` filled at epoch `filled` was covered by a sync
    /// stamped later. A sync takes its epoch after the table changed and before the IOTLBs
    /// drop the ranges, and stamps the pages with it once they have; a device reads the
    /// epoch and fills its entry under its IOTLB lock, which the drop takes too. So an
    /// entry filled below the sync's epoch was filled before the drop and should be gone,
    /// and one filled at it (hence `>`, not `>=`) holds the table as changed; a use during
    /// the sync is no use after it. Taking the epoch after the drop was wrong for syncs
    /// that leave a page mapped (write protection for dirty tracking): a walk between the
    /// drop and the stamp filled the new, read-only translation at the old epoch and was
    /// reported stale (pipelined stress devices met it).
    func isStale(iova: UInt64, filled: UInt64) -> Bool {
        guard iova >= iovaBase else { return false }
        let p = Int((iova - iovaBase) >> 12)
        return p < pages && lastSync[p].load(ordering: .acquiring) > filled
    }
}

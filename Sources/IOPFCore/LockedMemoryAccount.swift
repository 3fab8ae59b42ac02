// LockedMemoryAccount.swift — locked-memory accounting for the pinned path, after VFIO
// type1's `vfio_lock_acct`: charged synchronously before pages are locked, checked
// against RLIMIT_MEMLOCK unless the process holds CAP_IPC_LOCK, and failing without
// changing anything.
//
// Counts are in 4 KiB pages. Pages without page backing (device memory) are never charged.

import Synchronization

/// A pin refused because it would lock more memory than the limit allows.
public struct LockedMemoryError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Pages the refused pin asked for.
    public var requestedPages: Int
    /// Pages locked when it asked.
    public var lockedPages: Int
    /// The limit, in pages.
    public var limitPages: Int

    public var description: String {
        let b = { (pages: Int) in byteCount(UInt64(pages) << pageShift) }
        return "cannot lock \(requestedPages) pages (\(b(requestedPages))): \(lockedPages) pages (\(b(lockedPages))) "
            + "are locked already and RLIMIT_MEMLOCK allows \(limitPages) (\(b(limitPages))); "
            + "raise the limit (ulimit -l) or run with CAP_IPC_LOCK"
    }
}

/// Locked memory charged by pins, against `RLIMIT_MEMLOCK`, as VFIO's `locked_vm` accounting does.
public final class LockedMemoryAccount: Sendable {
    /// The limit in pages; ignored when `bypassesLimit`.
    public let limitPages: Int
    /// CAP_IPC_LOCK: locking is counted but never refused.
    public let bypassesLimit: Bool
    private let locked = Atomic<Int>(0)

    /// An account with `limitBytes`, not enforced when `bypassesLimit` (CAP_IPC_LOCK).
    public init(limitBytes: UInt64, bypassesLimit: Bool) {
        limitPages = Int(clamping: limitBytes >> pageShift)
        self.bypassesLimit = bypassesLimit
    }

    /// Pages charged now.
    public var lockedPages: Int { locked.load(ordering: .relaxed) }
    /// Bytes charged now.
    public var lockedBytes: UInt64 { UInt64(lockedPages) << pageShift }

    /// Charges `pages`, or throws and charges nothing. Concurrent callers never exceed
    /// the limit together: the check and the charge are one compare-and-swap.
    public func charge(pages: Int) throws(LockedMemoryError) {
        precondition(pages >= 0, "cannot charge a negative page count \(pages)")
        var current = locked.load(ordering: .relaxed)
        while true {
            let wanted = current + pages
            if !bypassesLimit && wanted > limitPages {
                throw LockedMemoryError(requestedPages: pages, lockedPages: current, limitPages: limitPages)
            }
            let (exchanged, original) = locked.compareExchange(
                expected: current, desired: wanted, successOrdering: .acquiringAndReleasing, failureOrdering: .relaxed)
            if exchanged { return }
            current = original
        }
    }

    /// Returns pages charged earlier. Uncharging more than is charged is a bug in the
    /// caller and traps.
    public func uncharge(pages: Int) {
        let before = locked.subtract(pages, ordering: .acquiringAndReleasing).oldValue
        precondition(pages >= 0 && before >= pages, "uncharged \(pages) pages with only \(before) charged")
    }
}

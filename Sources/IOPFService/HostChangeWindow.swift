// HostChangeWindow.swift — the ordering window between the host changing memory and the
// devices losing their translations, made visible.
//
// Linux lets madvise/munmap/mremap proceed as soon as the userfaultfd event is *read*,
// before the service has unmapped and synced. So between "event read" and "sync done" a
// device may still use the old translation. What iopf guarantees is only this: after the
// service's sync, no device uses the old translation. This window counts the accesses in
// between (`lateAccesses`): ranges are entered when the event loop takes an event and left
// when its invalidation has synced.
//
// Simulation safety: a host thread that changes memory on purpose (`iopf serve
// --host-churn`) first marks its range as changing; devices then neither access nor
// verify pages in it until the service has handled the event, because the host address
// is what they write through and its contents are in flux. Real DMA to a freed page would
// corrupt memory instead; the count says how often that window was hit.
//
// Ranges are host addresses `[start, end)`.

import IOPFCore
import Synchronization

/// Host ranges being changed and not yet synced: a simulated device skips its access there, and counts one that came
/// too late.
public final class HostChangeWindow: Sendable {
    private struct State {
        var changing: [Range<UInt64>] = []
        var eventRead: [Range<UInt64>] = []
    }

    private let state = Lock(State())
    /// Entries in both lists: a device checks only this while nothing is in flux.
    private let active = Atomic<Int>(0)
    private let late = Atomic<Int>(0)

    /// A window with nothing in flux.
    public init() {}

    /// Accesses that used a translation after its event was read but before its sync.
    public var lateAccesses: Int { late.load(ordering: .relaxed) }

    /// A host thread is about to change `r` on purpose.
    package func beginHostChange(_ r: Range<UInt64>) { enter(\.changing, r) }
    package func endHostChange(_ r: Range<UInt64>) { leave(\.changing, r) }

    /// The event loop has taken the event for `r`; its sync is not done yet.
    func beginEvent(_ r: Range<UInt64>) { enter(\.eventRead, r) }
    func endEvent(_ r: Range<UInt64>) { leave(\.eventRead, r) }

    private func enter(_ list: WritableKeyPath<State, [Range<UInt64>]>, _ r: Range<UInt64>) {
        state.withLock { $0[keyPath: list].append(r) }
        active.add(1, ordering: .sequentiallyConsistent)
    }

    private func leave(_ list: WritableKeyPath<State, [Range<UInt64>]>, _ r: Range<UInt64>) {
        state.withLock { s in if let i = s[keyPath: list].firstIndex(of: r) { s[keyPath: list].remove(at: i) } }
        active.subtract(1, ordering: .sequentiallyConsistent)
    }

    /// Called by a device, under its IOTLB lock, before it accesses host address `address`
    /// through a translation. True when the access must be skipped (the memory is in flux);
    /// counts it when its event was already read.
    @inline(__always)
    package func mustSkip(_ address: UInt64) -> Bool {
        guard active.load(ordering: .sequentiallyConsistent) > 0 else { return false }
        return state.withLock { s in
            let read = s.eventRead.contains { $0.contains(address) }
            if read { late.add(1, ordering: .relaxed) }
            return read || s.changing.contains { $0.contains(address) }
        }
    }
}

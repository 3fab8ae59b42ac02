// IOTLB.swift — a device's translation cache (direct-mapped, invalidated by range) and,
// under the same lock, what the device last wrote to each page. The lock is held across
// lookup, fill and access, and an invalidation takes it too: when `invalidate` returns,
// no access that used a dropped translation is still in flight. That is what a device
// must guarantee before it acknowledges an invalidation.

import IOPFCore

/// A device's translation cache (direct-mapped, invalidated by range) and, under the same
/// lock, its record of what it last wrote to each page.
public final class DeviceIOTLB: Sendable {
    package struct Entry {
        package var page: UInt64 = .max  // IOVA page number, .max when empty
        package var phys: UInt64 = 0
        package var prot: Protection = []
        /// The audit epoch when the entry was filled (0 without an audit).
        package var filled: UInt64 = 0
        package init(page: UInt64 = .max, phys: UInt64 = 0, prot: Protection = [], filled: UInt64 = 0) {
            self.page = page
            self.phys = phys
            self.prot = prot
            self.filled = filled
        }
    }

    package struct State {
        package var slots: [Entry]
        /// Last value written to each page's first 8 bytes: 0 never written (fresh memory
        /// reads 0), `unknown` after the host may have changed the page.
        package var shadow: [UInt64]
        /// The last INVALIDATE sequence processed (remote translations older than it are dropped).
        package var invalidationSequence: UInt64 = 0
    }

    package static let unknown = UInt64.max
    package let state: Lock<State>
    package let iovaBase: UInt64
    /// Set when the host may drop or move pages (userfaultfd churn): an invalidation then
    /// makes the pages' contents unknown until the device writes them again.
    let forgetOnInvalidate: Bool

    /// An empty IOTLB of `entries` slots for a window of `pages` pages at `iovaBase`; with `forgetOnInvalidate`,
    /// invalidated pages' contents become unknown.
    public init(entries: Int, iovaBase: UInt64, pages: Int, forgetOnInvalidate: Bool) {
        precondition(entries > 0, "an IOTLB needs at least one entry")
        self.iovaBase = iovaBase
        self.forgetOnInvalidate = forgetOnInvalidate
        state = Lock(State(slots: Array(repeating: Entry(), count: entries), shadow: Array(repeating: 0, count: pages)))
    }

    /// Drops every cached translation in `ranges`; returns once no access is using one.
    public func invalidate(_ ranges: [IOVARange], sequence: UInt64? = nil) {
        state.withLock { s in
            if let sequence { s.invalidationSequence = max(s.invalidationSequence, sequence) }
            for i in s.slots.indices where s.slots[i].page != .max {
                let iova = s.slots[i].page << 12
                if ranges.contains(where: { $0.start <= iova && iova <= $0.last }) { s.slots[i] = Entry() }
            }
            guard forgetOnInvalidate else { return }
            let end = iovaBase + UInt64(s.shadow.count) << 12
            for r in ranges where r.last >= iovaBase && r.start < end {
                let first = Int((max(r.start, iovaBase) - iovaBase) >> 12)
                let last = Int((min(r.last, end - 1) - iovaBase) >> 12)
                for p in first...last { s.shadow[p] = Self.unknown }
            }
        }
    }

    /// Returns once any access in progress has finished: later ones see what was published
    /// before the call (e.g. a range entered into the host change window).
    public func barrier() { state.withLock { _ in } }

    /// Translations cached now.
    public var cachedCount: Int { state.withLock { $0.slots.reduce(0) { $1.page == .max ? $0 : $0 + 1 } } }
}

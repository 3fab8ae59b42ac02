// FaultInjection.swift — known bugs that `iopf stress` and the tests can plant in the
// engine, to show that the checks catch them. Reachable only through
// `@_spi(FaultInjection) import`; `iopf serve` and `iopf bench` never import it. When
// none is planted each hook is one predictable branch on a constant.

@_spi(FaultInjection)
public struct InjectedBugs: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    /// The IOTLB sync does not reach the devices.
    public static let skipSync = InjectedBugs(rawValue: 1 << 0)
    /// Invalidation clears bits by the requested size, not by what was unmapped (Alex Williamson's review of the 2021
    /// VFIO IOPF MMU-notifier patch).
    public static let clearRequested = InjectedBugs(rawValue: 1 << 1)
    /// A fault installs without checking the invalidation sequence.
    public static let noRetry = InjectedBugs(rawValue: 1 << 2)
    /// Emptied table pages return to the pool before the gather's sync.
    public static let earlyFree = InjectedBugs(rawValue: 1 << 3)
    /// The service answers every group twice (planted in the runtime).
    public static let doubleAnswer = InjectedBugs(rawValue: 1 << 4)
    /// Unmapping a page forgets that it was written (dirty tracking).
    public static let loseDirty = InjectedBugs(rawValue: 1 << 5)

    public static let names: [(String, InjectedBugs, String)] = [
        ("skip-sync", .skipSync, "skip the IOTLB sync: devices keep stale translations"),
        ("clear-requested", .clearRequested, "clear the bitmap by the requested size instead of the unmapped size"),
        ("no-retry", .noRetry, "skip the sequence retry: a fault racing an invalidation installs a stale translation"),
        ("early-free", .earlyFree, "free page-table pages before the IOTLB sync"),
        ("double-answer", .doubleAnswer, "answer every page request group twice"),
        (
            "lose-dirty", .loseDirty,
            "forget a page's dirty bit when it is unmapped: a write before an invalidation is lost"
        ),
    ]

    public init?(name: String) {
        guard let entry = Self.names.first(where: { $0.0 == name }) else { return nil }
        self = entry.1
    }
}

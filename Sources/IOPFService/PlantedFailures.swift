// OS failures planted by tests at named call sites. A planted entry is an
// errno to fail the next call at that site with, or 0 to let that call through, so
// "fail the second mlock" is `[0, ENOMEM]`. Entries are taken one per call, in order.

import IOPFCore
import Synchronization

/// Failures planted at the service's system-call sites. With nothing planted a site
/// pays one acquiring atomic load per call.
public final class PlantedFailures: Sendable {
    /// Where a failure can be planted.
    public enum Site: Int, Sendable, CaseIterable {
        /// `io_uring_submit` in the event loop (the result becomes `-errno`).
        case submit
        /// The completion of a write to a sleeping device's wake eventfd.
        case wakeWrite
        /// The write to the service's own command eventfd.
        case commandDoorbell
        /// `madvise(MADV_POPULATE_*)` in `ProcessMemory.resolve`.
        case madvise
        /// Each `mlock` in `ProcessMemory.pin` (one per run of normal memory).
        case mlock
    }

    private let planted = Lock<[[Int32]]>(Array(repeating: [], count: Site.allCases.count))
    private let count = Atomic<Int>(0)

    /// Nothing planted.
    public init() {}

    /// Makes the next calls at `site` fail with `errnos`, one call each, in order.
    public func plant(_ site: Site, _ errnos: [Int32]) {
        planted.withLock { $0[site.rawValue] += errnos }
        count.add(errnos.count, ordering: .releasing)
    }

    /// The next planted entry for `site`: nil when none is, 0 to make the real call, else
    /// the errno to fail with.
    public func take(_ site: Site) -> Int32? {
        guard count.load(ordering: .acquiring) > 0 else { return nil }
        return planted.withLock { p in
            guard !p[site.rawValue].isEmpty else { return nil }
            count.subtract(1, ordering: .releasing)
            return p[site.rawValue].removeFirst()
        }
    }

    /// Entries planted and not yet taken at `site`.
    public func remaining(_ site: Site) -> Int { planted.withLock { $0[site.rawValue].count } }
}

// HostMemory.swift — how the engine reaches host memory without making system calls
// itself. The runtime implements it over real anonymous memory (MADV_POPULATE_*,
// /proc/self/pagemap); `SimulatedHostMemory` serves tests and micro-benchmarks.
//
// Addresses are host virtual addresses, page aligned; runs are `[address, address +
// pageCount * 4 KiB)`.

/// A host page that could not be resolved: where, and what the kernel said.
public struct HostMemoryError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The host address that failed.
    public var address: UInt64
    /// Why, in words.
    public var reason: String
    /// An error for `address` with `reason`.
    public init(address: UInt64, reason: String) {
        self.address = address
        self.reason = reason
    }
    public var description: String { "host memory at \(hex(address)): \(reason)" }
}

/// The host memory an engine maps: resolves host pages to physical addresses, pins and unpins them.
public protocol HostMemory: AnyObject, Sendable {
    /// Makes a run of pages resident for the access (faulting them in for write when
    /// `write`), then appends the physical address of each page to `physical`, in order.
    /// Called without the engine's lock held: an invalidation may run meanwhile, and the
    /// engine's sequence check discards the result if one did.
    func resolve(address: UInt64, pageCount: Int, write: Bool, physical: inout [UInt64]) throws(HostMemoryError)

    /// The physical address now backing a page, without faulting it in; nil when unknown.
    /// Used by invariant checks only.
    func currentPhysical(of address: UInt64) -> UInt64?

    /// Pins a run of pages (faults them in and locks them) and appends one entry per
    /// page. Pages without page backing (device memory) are mapped but not charged.
    /// On a throw nothing of this call stays pinned.
    func pin(address: UInt64, pageCount: Int, into pages: inout [PinnedPage]) throws(HostMemoryError)

    /// Releases pages pinned earlier.
    func unpin(address: UInt64, pageCount: Int)

    /// Appends, for each of `pageCount` pages from `address`, the physical address of the
    /// page if it is resident now, nil otherwise, without faulting anything in (one
    /// mincore for the run). Fault-around maps the resident neighbours of a random fault
    /// as they are, as the kernel's fault-around maps cached pages: no memory and no
    /// populate call. Only for memory whose resident pages stay put (shared memory, where
    /// the page-cache page is the page); anything else reports none.
    func residentPages(address: UInt64, pageCount: Int, into resident: inout [UInt64?])

    /// The physical address of the 2 MiB block at `address` (2 MiB aligned) when one
    /// huge page backs all of it now, mapped in place; nil otherwise. Faults map such a
    /// block with one entry (`EngineConfiguration.blocksOnFault`). Nothing is faulted in.
    func hugeBlock(at address: UInt64) -> UInt64?
}

extension HostMemory {
    /// Knows of no resident page.
    public func residentPages(address: UInt64, pageCount: Int, into resident: inout [UInt64?]) {
        resident.append(contentsOf: repeatElement(nil, count: pageCount))
    }

    /// Knows of no huge page.
    public func hugeBlock(at address: UInt64) -> UInt64? { nil }
}

/// One pinned page: where it is, and whether it counts against locked memory.
public struct PinnedPage: Sendable, Hashable {
    /// The page's physical address.
    public var phys: UInt64
    /// False for memory without page backing (device memory, VM_PFNMAP): never charged.
    public var chargeable: Bool
    /// A pinned page at `phys`, charged to locked memory when `chargeable`.
    public init(phys: UInt64, chargeable: Bool) {
        self.phys = phys
        self.chargeable = chargeable
    }
}

/// Host memory whose physical address is the host address plus a fixed offset, so that a
/// translation that skips the offset, or uses another page's, shows up as a wrong address.
/// Resolving always succeeds except in ranges marked unresolvable; `beforeResolve` lets a
/// test act in the window between resolve and install (e.g. run an invalidation).
public final class SimulatedHostMemory: HostMemory {
    /// What is added to a host address to make its physical address.
    public let physicalOffset: UInt64
    private let state = Lock(State())

    struct State {
        var unresolvable: [Range<UInt64>] = []
        var resolvedPages = 0
        var resolveCalls = 0
        var hook: (@Sendable (UInt64, Int) -> Void)?
        var pinHook: (@Sendable (UInt64, Int) -> Void)?
        var deviceMemory: [(range: Range<UInt64>, phys: UInt64)] = []
        var pinned: [UInt64: Int] = [:]  // page address -> pin count
        var resident: [Range<UInt64>] = []
        var huge: [Range<UInt64>] = []
    }

    /// Backs the 2 MiB blocks inside `range` with huge pages, as far as `hugeBlock` tells.
    public func markHuge(_ range: Range<UInt64>) {
        state.withLock { $0.huge.append(range) }
    }

    public func hugeBlock(at address: UInt64) -> UInt64? {
        let block = address..<(address + hugeBlockBytes)
        let huge = state.withLock { s in s.huge.contains { $0.clamped(to: block) == block } }
        return huge && address & (hugeBlockBytes - 1) == 0 ? address + physicalOffset : nil
    }

    /// Makes the pages of `range` resident as far as `residentPages` tells.
    public func markResident(_ range: Range<UInt64>) {
        state.withLock { $0.resident.append(range) }
    }

    public func residentPages(address: UInt64, pageCount: Int, into resident: inout [UInt64?]) {
        let ranges = state.withLock { $0.resident }
        for i in 0..<pageCount {
            let page = address + UInt64(i) << pageShift
            resident.append(ranges.contains { $0.contains(page) } ? page + physicalOffset : nil)
        }
    }

    /// Simulated memory whose physical addresses are host addresses plus `physicalOffset`.
    public init(physicalOffset: UInt64 = 0x10_0000_0000) {
        precondition(isPageAligned(physicalOffset), "physical offset must be page aligned")
        self.physicalOffset = physicalOffset
    }

    /// Runs at the start of every `resolve(address:pageCount:…)` call, outside any engine lock.
    public func setBeforeResolve(_ hook: (@Sendable (_ address: UInt64, _ pageCount: Int) -> Void)?) {
        state.withLock { $0.hook = hook }
    }

    /// Runs at the start of every `pin` call, outside any engine lock.
    public func setBeforePin(_ hook: (@Sendable (_ address: UInt64, _ pageCount: Int) -> Void)?) {
        state.withLock { $0.pinHook = hook }
    }

    /// Makes resolving any page in `range` fail, as for memory the host took away.
    public func markUnresolvable(_ range: Range<UInt64>) {
        state.withLock { $0.unresolvable.append(range) }
    }

    /// Pages resolved so far.
    public var resolvedPages: Int { state.withLock { $0.resolvedPages } }

    /// Makes `range` device memory (no page backing) whose pages sit at `phys` onwards.
    public func markDeviceMemory(_ range: Range<UInt64>, phys: UInt64) {
        state.withLock { $0.deviceMemory.append((range, phys)) }
    }

    /// Pages now pinned (device memory included), for tests of the pinned path.
    public var pinnedPageCount: Int { state.withLock { $0.pinned.values.reduce(0, +) } }

    public func pin(address: UInt64, pageCount: Int, into pages: inout [PinnedPage]) throws(HostMemoryError) {
        let end = address + UInt64(pageCount) << pageShift
        state.withLock { $0.pinHook }?(address, pageCount)
        try state.withLock { (s) throws(HostMemoryError) in
            if let bad = s.unresolvable.first(where: { $0.overlaps(address..<end) }) {
                throw HostMemoryError(address: max(bad.lowerBound, address), reason: "no memory is mapped there")
            }
            for i in 0..<pageCount {
                let page = address + UInt64(i) << pageShift
                if let d = s.deviceMemory.first(where: { $0.range.contains(page) }) {
                    pages.append(PinnedPage(phys: d.phys + (page - d.range.lowerBound), chargeable: false))
                } else {
                    pages.append(PinnedPage(phys: page + physicalOffset, chargeable: true))
                }
                s.pinned[page, default: 0] += 1
            }
        }
    }

    public func unpin(address: UInt64, pageCount: Int) {
        state.withLock { s in
            for i in 0..<pageCount {
                let page = address + UInt64(i) << pageShift
                guard let n = s.pinned[page] else {
                    preconditionFailure("unpin of page \(hex(page)), which is not pinned")
                }
                s.pinned[page] = n == 1 ? nil : n - 1
            }
        }
    }
    /// Calls to resolve so far.
    public var resolveCalls: Int { state.withLock { $0.resolveCalls } }

    public func resolve(address: UInt64, pageCount: Int, write: Bool, physical: inout [UInt64]) throws(HostMemoryError)
    {
        let end = address + UInt64(pageCount) << pageShift
        let (hook, bad) = state.withLock { s in
            s.resolveCalls += 1
            let bad = s.unresolvable.first { $0.overlaps(address..<end) }
            if bad == nil { s.resolvedPages += pageCount }
            return (s.hook, bad)
        }
        hook?(address, pageCount)
        if let bad {
            throw HostMemoryError(address: max(bad.lowerBound, address), reason: "no memory is mapped there")
        }
        for i in 0..<pageCount {
            physical.append(address + UInt64(i) << pageShift + physicalOffset)
        }
    }

    public func currentPhysical(of address: UInt64) -> UInt64? {
        if let d = state.withLock({ s in s.deviceMemory.first { $0.range.contains(address) } }) {
            return d.phys + (address - d.range.lowerBound)
        }
        return address + physicalOffset
    }
}

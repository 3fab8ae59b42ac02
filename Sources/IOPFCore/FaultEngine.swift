// FaultEngine.swift — every decision of the fault service: DMA mappings, I/O page tables
// (domains), fault handling and invalidation. No system calls; host memory is reached
// through `HostMemory`.
//
// Conventions: page ranges are half-open `Range<Int>` of page indices within a mapping;
// host ranges are `[start, end)`; gathered IOVA ranges are inclusive.
//
// Concurrency, after the MMU interval notifier (include/linux/mmu_notifier.h): one update
// lock guards mappings, bitmaps and page-table writes. A sequence number is bumped (odd)
// when an invalidation or unmap starts and again (even) when it ends, both under the lock.
// A fault reads the sequence and looks up its mapping under the lock, resolves the host
// page without it, then re-takes the lock and installs only if the sequence has not
// moved; otherwise it starts again. This closes the window in which a fault installs a
// translation for a page that an invalidation has just taken away (Alex Williamson's review of the 2021 VFIO IOPF
// MMU-notifier patch).

import Synchronization

/// Names one I/O address space (an IOMMU domain) of an engine.
public struct DomainID: Hashable, Sendable, CustomStringConvertible {
    /// The domain's index in the engine, from 0.
    public let rawValue: Int
    public var description: String { "domain#\(rawValue)" }
}

/// How an engine maps and unmaps: gather policy, page sizes, fault-around, locked memory.
public struct EngineConfiguration: Sendable {
    /// VFIO type1's `dma_entry_limit`.
    public var entryLimit = DMAMappingTable.defaultEntryLimit
    /// How unmapped ranges are batched before an IOTLB sync.
    public var gatherPolicy = GatherPolicy.defaultRangeList
    /// Page sizes the domains' page tables may use.
    public var pageSizes = Set(PageSize.allCases)
    /// RLIMIT_MEMLOCK for the pinned path, and whether CAP_IPC_LOCK lifts it.
    public var lockedMemoryLimit: UInt64 = .max
    /// Pins without checking `RLIMIT_MEMLOCK` (a process with CAP_IPC_LOCK).
    public var bypassesLockedMemoryLimit = true
    /// Whether a fault maps the whole aligned 2 MiB block around it with one entry when
    /// one huge page backs the block (`HostMemory.hugeBlock`) and the mapping holds all of
    /// it unmapped and untracked; needs `.size2M` in `pageSizes`. `--huge-pages`.
    public var blocksOnFault = false
    /// Bugs planted for `iopf stress` and tests; none otherwise.
    @_spi(FaultInjection) public var injectedBugs: InjectedBugs = []
    /// The defaults: VFIO's entry limit, range-list gathering, every page size, no locked-memory limit, no blocks on
    /// fault.
    public init() {}
}

/// Why one page request got the answer it did.
public enum RequestOutcome: Sendable, Hashable {
    /// Resolved and mapped into every domain.
    case mapped
    /// Already mapped (its bit was set): answered SUCCESS, nothing done.
    case spurious
    /// No DMA mapping holds the address.
    case noMapping
    /// The mapping does not grant the requested access.
    case permissionDenied
    /// The host could not provide the page.
    case resolveFailed
    /// The page table refused the page (pool exhausted or an inconsistent entry).
    case mapFailed
    /// The engine is stopped after a fatal invalidation failure.
    case engineFailed
    /// The host unmapped or moved the memory behind the page (until the host address is
    /// updated, as VFIO answers for an invalid vaddr).
    case hostGone
    /// A write to a page mapped read-only by dirty tracking: now dirty and writable.
    case writeRestored

    /// Whether the page is usable by the device afterwards.
    public var succeeded: Bool { self == .mapped || self == .spurious || self == .writeRestored }
}

/// What handling one page-request group did.
public struct GroupOutcome: Sendable, Equatable {
    /// SUCCESS only if every request of the group succeeded.
    public var code: ResponseCode
    /// Pages newly mapped for the group (faulting pages and pages mapped around them).
    public var mapped = 0
    /// Requests for pages that were already mapped.
    public var spurious = 0
    /// Pages mapped ahead of the group's last request (fault-around).
    public var prefetched = 0
    /// Pages after the group's last request inside the 2 MiB block mapped for it (0 when
    /// no block was): mapped ahead as surely as `prefetched`, for the sequential detector.
    public var blockTail = 0
    /// Writes to pages write-protected by dirty tracking, now writable.
    public var writeRestored = 0
    /// Times the group was resolved again because an invalidation ran meanwhile.
    public var retries = 0
}

/// What one invalidation did.
public struct InvalidationOutcome: Sendable, Equatable {
    /// Mappings that overlapped the invalidated range.
    public var mappingsTouched = 0
    /// Pages whose bits were cleared because they were really unmapped in every domain;
    /// more than asked when a block was removed whole.
    public var pagesUnmapped = 0
}

/// Counters of everything the engine has done since it was created.
public struct EngineStatistics: Sendable, Equatable, Codable {
    /// All zero.
    public init() {}

    /// Page-request groups handled.
    public var groups = 0
    /// Page requests handled, in all groups.
    public var requests = 0
    /// Groups answered SUCCESS.
    public var successGroups = 0
    /// Groups answered INVALID.
    public var invalidGroups = 0
    /// Pages mapped on faults.
    public var mappedPages = 0
    /// Pages mapped ahead of faults (fault-around), included in `mappedPages`.
    public var prefetchedPages = 0
    /// 2 MiB blocks mapped on faults with one entry each; their pages are in `mappedPages`.
    public var blockMappings = 0
    /// Requests for pages already mapped.
    public var spurious = 0
    /// Faults resolved again because an invalidation ran while they resolved host pages.
    public var retries = 0
    /// Requests outside every mapping.
    public var noMapping = 0
    /// Requests for an access the mapping does not grant.
    public var permissionDenied = 0
    /// Requests whose host page could not be resolved.
    public var resolveFailures = 0
    /// Requests the page table refused to map.
    public var mapFailures = 0
    /// Requests on host memory that was unmapped or moved.
    public var hostGoneFaults = 0
    /// Calls that mapped a pinned run.
    public var pinnedMapCalls = 0
    /// Dirty tracking: write faults that restored write access, and dirty-log reads.
    public var writeRestores = 0
    /// Reads of the dirty log.
    public var dirtyReads = 0
    /// Invalidations of host ranges, DMA unmaps and host-address updates.
    public var invalidations = 0
    /// Pages unmapped by invalidations and unmaps.
    public var pagesUnmapped = 0
    /// IOTLB syncs over all domains, and the ranges they carried.
    public var iotlbSyncs = 0
    /// Ranges handed to IOTLB syncs.
    public var syncedRanges = 0
}

/// Why the engine stopped granting: an unmap that could not remove a present translation
/// (the device would keep access to memory the host took back), or the host's events
/// lost (the engine could no longer follow the host). Every later request is answered
/// INVALID and the caller must detach devices.
public struct FatalInvalidationError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The domain and IOVA of the unmap that failed; nil when the engine was stopped for
    /// another reason (`stopGranting`).
    public var domain: DomainID?
    /// The IOVA of the unmap that failed.
    public var iova: UInt64?
    /// What went wrong, in words.
    public var reason: String
    public var description: String {
        guard let domain, let iova else {
            return "fatal: \(reason); fault service is stopped (every request is answered INVALID)"
        }
        return "fatal: \(domain) could not unmap iova \(hex(iova)) during an invalidation (\(reason)); "
            + "a device would keep access to memory the host took back, so fault service is stopped"
    }
}

/// Serves page faults and invalidations for DMA mappings over host memory, across domains.
public final class FaultEngine: Sendable {
    /// The host memory the engine resolves pages in.
    public let memory: any HostMemory
    /// The configuration the engine was created with.
    public let configuration: EngineConfiguration
    /// Locked memory charged by pinned mappings.
    public let lockedMemory: LockedMemoryAccount
    let state: Lock<State>
    /// Odd while an invalidation or unmap runs; changed only under the lock.
    let sequence = Atomic<UInt64>(0)

    struct State {
        var mappings: DMAMappingTable
        var domains: [IOPageTable] = []
        /// One gather per domain, kept between invalidations (allocation-free reuse).
        var gathers: [IOTLBGather] = []
        var stats = EngineStatistics()
        var failure: FatalInvalidationError?
        /// IOVA ranges under dirty tracking: mappings created inside one are tracked from
        /// the start, as iommufd tracks every mapping of a domain with tracking on.
        var dirtyTracked: [ClosedRange<UInt64>] = []
        /// Scratch of `invalidate`: mappings it left with nothing mapped, to leave the active
        /// index once the walk is over (kept, so that an event allocates nothing).
        var emptied: [DMAMapping] = []
    }

    /// An engine with no domains and no mappings over `memory`.
    public init(memory: any HostMemory, configuration: EngineConfiguration = EngineConfiguration()) {
        precondition(
            !configuration.blocksOnFault || configuration.pageSizes.contains(.size2M),
            "blocks on fault need 2 MiB pages in the page tables")
        self.memory = memory
        self.configuration = configuration
        lockedMemory = LockedMemoryAccount(
            limitBytes: configuration.lockedMemoryLimit, bypassesLimit: configuration.bypassesLockedMemoryLimit)
        state = Lock(State(mappings: DMAMappingTable(entryLimit: configuration.entryLimit)))
    }

    // MARK: Domains

    /// Adds an I/O page table. Pages already faulted in are replayed into it, so that a
    /// set bit keeps meaning "mapped in every domain".
    public func createDomain(invalidator: (any IOTLBInvalidator)? = nil, observer: (any IOTLBSyncObserver)? = nil)
        throws(IOPageTableError) -> DomainID
    {
        let table = IOPageTable(pageSizes: configuration.pageSizes, invalidator: invalidator)
        table.bugs = configuration.injectedBugs
        table.observer = observer
        return try state.withLock { s throws(IOPageTableError) in
            if let source = s.domains.first {
                for m in s.mappings.byIOVA {
                    var p = m.iopfMapped.findNextSet(from: 0)
                    while p < m.pageCount {
                        let iova = m.iova(page: p)
                        let t = source.translate(iova)!
                        try table.map(iova: iova, phys: t.phys, size: pageBytes, prot: t.prot)
                        p = m.iopfMapped.findNextSet(from: p + 1)
                    }
                }
            }
            s.domains.append(table)
            s.gathers.append(IOTLBGather(policy: configuration.gatherPolicy))
            return DomainID(rawValue: s.domains.count - 1)
        }
    }

    /// The page table of a domain, for lock-free `translate` walks by devices.
    public func pageTable(_ domain: DomainID) -> IOPageTable {
        state.withLock { $0.domains[domain.rawValue] }
    }

    /// Sets (or, with nil, removes) the IOTLB invalidator that `domain`'s syncs call.
    public func setInvalidator(_ invalidator: (any IOTLBInvalidator)?, for domain: DomainID) {
        state.withLock { $0.domains[domain.rawValue].invalidator = invalidator }
    }

    // MARK: DMA mappings

    /// Adds a DMA mapping (VFIO_IOMMU_MAP_DMA in fault mode): nothing is pinned or mapped
    /// until a device faults.
    @discardableResult
    public func map(iova: UInt64, vaddr: UInt64, size: UInt64, prot: Protection) throws(DMAMapError) -> MappingID {
        try state.withLock { s throws(DMAMapError) in
            let m = try s.mappings.insert(iova: iova, vaddr: vaddr, size: size, prot: prot)
            if s.dirtyTracked.contains(where: { $0.overlaps(m.iova...m.iovaLast) }) {
                m.dirty = PageBitmap(count: m.pageCount)
            }
            return m.id
        }
    }

    /// Removes every mapping inside `[iova, iova + size)` (which must not cut one), unmapping
    /// their faulted pages from every domain with one sync per domain. Returns the bytes of
    /// the mappings removed.
    @discardableResult
    public func unmap(iova: UInt64, size: UInt64) throws -> UInt64 {
        try removeMappings(iova: iova, size: size).reduce(0) { $0 + ($1.upperBound - $1.lowerBound) }
    }

    /// `unmap`, returning the host ranges of the mappings removed.
    /// A pinned mapping still being populated is refused (`busy`), as iommufd refuses to
    /// unmap an area that is not yet filled: its pages are not all pinned and charged yet.
    /// If an unmap fails, what was unmapped is still synced, the engine stops granting, and
    /// the mappings stay (pinned pages stay pinned: a device may still reach them).
    public func removeMappings(iova: UInt64, size: UInt64) throws -> [Range<UInt64>] {
        var dirty: PageBitmap?
        return try removeMappings(iova: iova, size: size, dirty: &dirty)
    }

    /// `removeMappings`, also returning what was written in `[iova, iova + size)` since the
    /// last read of the dirty log, read under the same lock as the removal so that no
    /// write falls between (VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP). Bits as
    /// `readAndClearDirty` gives them.
    public func unmapReadingDirty(iova: UInt64, size: UInt64)
        throws -> (hostRanges: [Range<UInt64>], dirty: PageBitmap)
    {
        var dirty: PageBitmap? = PageBitmap(count: Int(size >> pageShift))
        let ranges = try removeMappings(iova: iova, size: size, dirty: &dirty)
        return (ranges, dirty!)
    }

    func removeMappings(iova: UInt64, size: UInt64, dirty: inout PageBitmap?) throws -> [Range<UInt64>] {
        try state.withLock { s throws in
            if let failure = s.failure { throw failure }
            let victims = try s.mappings.mappings(coveringWhole: iova, size: size)
            guard !victims.isEmpty else { return [] }
            if let m = victims.first(where: \.populating) {
                throw DMAMapError.busy(iova: m.iova, size: m.size, mapping: m.id)
            }
            beginInvalidation()
            defer { endInvalidation() }
            try unmapAllOrStop(victims, &s)
            s.stats.invalidations += 1
            s.mappings.remove(all: victims)
            for m in victims {
                if dirty != nil {
                    Self.report(m, pages: 0..<m.pageCount, into: &dirty!, at: Int((m.iova - iova) >> pageShift))
                }
                if m.pinned {  // unmapped and synced: now the pages can go
                    memory.unpin(address: m.vaddr, pageCount: m.pageCount)
                    lockedMemory.uncharge(pages: m.chargedPages)
                }
            }
            return victims.map { $0.vaddr..<$0.vaddrEnd }
        }
    }

    /// Unmaps every faulted page of `victims` and syncs every domain, also when an unmap
    /// fails part way (what was unmapped must not stay in an IOTLB); a failure stops the
    /// engine. Called under the lock, inside an invalidation.
    func unmapAllOrStop(_ victims: [DMAMapping], _ s: inout State) throws(FatalInvalidationError) {
        do {
            for m in victims { _ = try unmapPages(of: m, in: 0..<m.pageCount, &s) }
        } catch {
            syncAll(&s)
            s.failure = error
            throw error
        }
        syncAll(&s)
    }

    /// Stops granting: every later request is answered INVALID and every later
    /// invalidation or unmap throws `reason`. For when the engine can no longer follow the
    /// host (its events were lost). The first reason is kept.
    public func stopGranting(reason: String) {
        state.withLock { s in
            if s.failure == nil { s.failure = FatalInvalidationError(domain: nil, iova: nil, reason: reason) }
        }
    }

    /// The parts of host range `[start, end)` that no live mapping covers.
    public func uncoveredHostRanges(_ range: Range<UInt64>) -> [Range<UInt64>] {
        state.withLock { s in
            var covered: [Range<UInt64>] = []
            s.mappings.forEachMapping(overlappingHost: range.lowerBound, end: range.upperBound) {
                covered.append($0.vaddr..<$0.vaddrEnd)
            }
            covered.sort { $0.lowerBound < $1.lowerBound }
            var out: [Range<UInt64>] = []
            var cursor = range.lowerBound
            for c in covered {
                if c.lowerBound > cursor { out.append(cursor..<min(c.lowerBound, range.upperBound)) }
                cursor = max(cursor, c.upperBound)
                if cursor >= range.upperBound { break }
            }
            if cursor < range.upperBound { out.append(cursor..<range.upperBound) }
            return out
        }
    }

    /// Points a mapping at a new host address (VFIO_DMA_MAP_FLAG_VADDR). Pages already
    /// mapped are unmapped first: they translate to the old memory.
    public func updateHostAddress(iova: UInt64, size: UInt64, vaddr: UInt64) throws {
        try state.withLock { s throws in
            guard let m = s.mappings.mapping(containing: iova), m.iova == iova, m.size == size else {
                throw DMAMapError.noSuchMapping(iova: iova, size: size)
            }
            try DMAMappingTable.validate(iova: iova, vaddr: vaddr, size: size, prot: m.prot)
            if let failure = s.failure { throw failure }
            if m.populating { throw DMAMapError.busy(iova: m.iova, size: m.size, mapping: m.id) }
            beginInvalidation()
            defer { endInvalidation() }
            try unmapAllOrStop([m], &s)
            s.stats.invalidations += 1
            s.mappings.updateHostAddress(m, to: vaddr)
            m.hostGone = nil
        }
    }

    /// The number of DMA mappings.
    public var mappingCount: Int { state.withLock { $0.mappings.count } }

    /// Every mapping's range, host address and permission, by IOVA.
    public var mappingList: [(iova: UInt64, size: UInt64, vaddr: UInt64, prot: Protection)] {
        state.withLock { s in s.mappings.byIOVA.map { ($0.iova, $0.size, $0.vaddr, $0.prot) } }
    }

    /// A mapping's range, host address and permission, by any IOVA inside it.
    public func mappingInfo(iova: UInt64) -> (iova: UInt64, size: UInt64, vaddr: UInt64, prot: Protection)? {
        state.withLock { s in s.mappings.mapping(containing: iova).map { ($0.iova, $0.size, $0.vaddr, $0.prot) } }
    }

    // MARK: Faults

    /// A handler owns the scratch buffers of the fault path; use one per thread.
    public func makeFaultHandler() -> FaultHandler { FaultHandler(engine: self) }

    /// Resolves and maps `[iova, iova + size)` ahead of any fault, with the largest pages
    /// that alignment and physical contiguity allow (the VFIO IOPF series' pre-mapping).
    /// Pages already mapped are left alone. Returns the pages newly mapped.
    @discardableResult
    public func premap(iova: UInt64, size: UInt64, write: Bool) throws -> Int {
        var physical: [UInt64] = []
        while true {
            let (seq, m, first, count) = try state.withLock { s throws in
                guard isPageAligned(iova), isPageAligned(size), size > 0,
                    let m = s.mappings.mapping(containing: iova), let last = lastAddress(start: iova, size: size),
                    last <= m.iovaLast
                else { throw DMAMapError.unaligned(what: "premap range inside one mapping at iova", value: iova) }
                return (sequence.load(ordering: .relaxed), m, m.pageIndex(iova: iova), Int(size >> pageShift))
            }
            physical.removeAll(keepingCapacity: true)
            try memory.resolve(address: m.hostAddress(page: first), pageCount: count, write: write, physical: &physical)
            let done: Int? = try state.withLock { s throws in
                guard sequence.load(ordering: .relaxed) == seq else { return nil }
                var mapped = 0
                var p = m.iopfMapped.findNextClear(from: first)
                while p < first + count {
                    // A run of clear bits whose physical pages are contiguous maps in one call.
                    var end = p + 1
                    while end < first + count, !m.iopfMapped.test(end),
                        physical[end - first] == physical[end - first - 1] + pageBytes
                    { end += 1 }
                    let bytes = UInt64(end - p) << pageShift
                    for (i, d) in s.domains.enumerated() {
                        do {
                            // While tracked, pages come in read-only: a write faults and is logged.
                            try d.map(
                                iova: m.iova(page: p), phys: physical[p - first], size: bytes,
                                prot: m.dirty == nil ? m.prot : m.prot.subtracting(.write))
                        } catch {
                            for u in 0..<i {
                                _ = s.domains[u].unmap(iova: m.iova(page: p), size: bytes, gather: &s.gathers[u])
                                s.domains[u].sync(&s.gathers[u])
                            }
                            throw error
                        }
                    }
                    m.iopfMapped.set(p..<end)
                    s.mappings.activate(m)
                    mapped += end - p
                    p = m.iopfMapped.findNextClear(from: end)
                }
                s.stats.mappedPages += mapped
                return mapped
            }
            if let done { return done }
            state.withLock { $0.stats.retries += 1 }
        }
    }

    // MARK: Invalidation

    /// Handles an MMU-notifier event for host range `[start, start + length)`: every
    /// faulted page of every mapping that overlaps it (widened outwards to whole pages) is
    /// unmapped from every domain, bits are cleared by what was really unmapped, and each
    /// domain syncs once at the end.
    ///
    /// With `hostGone` (UNMAP and REMAP events) the overlapped pages are also marked as
    /// having no host memory: later faults there are answered INVALID until the mapping's
    /// host address is updated.
    @discardableResult
    public func invalidate(hostAddress start: UInt64, length: UInt64, hostGone: Bool = false)
        throws(FatalInvalidationError) -> InvalidationOutcome
    {
        guard length > 0 else { return InvalidationOutcome() }
        let first = start & ~pageMask
        let (sum, overflow) = start.addingReportingOverflow(length)
        let end = overflow || sum > UInt64.max - pageMask ? UInt64.max & ~pageMask : (sum + pageMask) & ~pageMask
        return try state.withLock { s throws(FatalInvalidationError) in
            if let failure = s.failure { throw failure }
            beginInvalidation()
            defer { endInvalidation() }
            var outcome = InvalidationOutcome()
            var failure: FatalInvalidationError?
            // A REMOVE needs only the mappings with pages mapped (the active index): a
            // host cannot make each madvise cost its whole table. UNMAP and REMAP mark
            // every overlapping mapping gone, mapped or not.
            s.mappings.forEachMapping(overlappingHost: first, end: end, activeOnly: !hostGone) { m in
                // Pinned pages stay where they are whatever the host does (VFIO type1).
                guard failure == nil, !m.pinned else { return }
                let lo = Int((max(first, m.vaddr) - m.vaddr) >> pageShift)
                let hi = Int((min(end, m.vaddrEnd) - m.vaddr) >> pageShift)
                outcome.mappingsTouched += 1
                if hostGone {
                    if m.hostGone == nil { m.hostGone = PageBitmap(count: m.pageCount) }
                    m.hostGone!.set(lo..<hi)
                }
                do throws(FatalInvalidationError) {
                    outcome.pagesUnmapped += try unmapPages(of: m, in: lo..<hi, &s)
                } catch {
                    failure = error
                }
                if m.iopfMapped.isEmpty && m.isActive { s.emptied.append(m) }
            }
            syncAll(&s)
            for m in s.emptied { s.mappings.deactivate(m) }
            s.emptied.removeAll(keepingCapacity: true)
            s.stats.invalidations += 1
            if let failure {
                s.failure = failure
                throw failure
            }
            return outcome
        }
    }

    @inline(__always) func beginInvalidation() { sequence.add(1, ordering: .releasing) }
    @inline(__always) func endInvalidation() { sequence.add(1, ordering: .releasing) }

    func syncAll(_ s: inout State) {
        for d in s.domains.indices { s.domains[d].sync(&s.gathers[d]) }
    }

    /// Unmaps the faulted pages of `m` in `pages` from every domain, walking the bitmap by
    /// runs, and clears the bits of what was really unmapped. Returns the bits cleared.
    func unmapPages(of m: DMAMapping, in pages: Range<Int>, _ s: inout State) throws(FatalInvalidationError) -> Int {
        var cleared = 0
        var i = m.iopfMapped.findNextSet(from: pages.lowerBound, to: pages.upperBound)
        while i < pages.upperBound {
            let runEnd = m.iopfMapped.findNextClear(from: i, to: pages.upperBound)
            let really = try unmapRun(of: m, i..<runEnd, &s)
            let clear = configuration.injectedBugs.contains(.clearRequested) ? i..<runEnd : really
            cleared += m.iopfMapped.population(in: clear)
            m.iopfMapped.clear(clear)
            if configuration.injectedBugs.contains(.loseDirty) { m.dirty?.clear(clear) }
            i = m.iopfMapped.findNextSet(from: min(really.upperBound, pages.upperBound), to: pages.upperBound)
        }
        s.stats.pagesUnmapped += cleared
        return cleared
    }

    /// Unmaps `run` in every domain and returns the page range really unmapped in all of
    /// them. Unmap may remove more than asked (a block reached at its first address) or
    /// stop early (a block entered in its middle, or a hole); the range widens to whole
    /// blocks and every domain is brought to the same extent, so bitmap and tables stay in
    /// step (the review of the 2021 VFIO IOPF MMU-notifier patch: continue from `iova + unmapped`, never from `iova +
    /// requested`).
    private func unmapRun(of m: DMAMapping, _ run: Range<Int>, _ s: inout State) throws(FatalInvalidationError)
        -> Range<Int>
    {
        var (lo, hi) = (run.lowerBound, run.upperBound)
        var widened = true
        while widened {
            widened = false
            for d in s.domains.indices {
                let table = s.domains[d]
                var pos = lo
                while pos < hi {
                    let iova = m.iova(page: pos)
                    let bytes = table.unmap(iova: iova, size: UInt64(hi - pos) << pageShift, gather: &s.gathers[d])
                    if bytes > 0 {
                        pos += Int(bytes >> pageShift)
                        if pos > hi {
                            hi = pos
                            widened = true
                        }
                        continue
                    }
                    guard let t = table.translate(iova) else {
                        // A hole: nothing to unmap here in this domain, up to the next leaf.
                        let next = table.firstMapped(from: iova, end: m.iova(page: hi - 1) + pageBytes)
                        pos = max(pos + 1, Int((next - m.iova) >> pageShift))
                        continue
                    }
                    let blockIOVA = iova & ~(t.pageSize.bytes - 1)
                    guard t.pageSize != .size4K, blockIOVA >= m.iova, blockIOVA + t.pageSize.bytes - 1 <= m.iovaLast
                    else {
                        let reason =
                            t.pageSize == .size4K
                            ? "the page table kept a present 4 KiB leaf"
                            : "a \(t.pageSize) block crosses the bounds of \(m.id)"
                        throw FatalInvalidationError(domain: DomainID(rawValue: d), iova: iova, reason: reason)
                    }
                    // Inside a block: unmap it whole from its first address.
                    let blockFirst = m.pageIndex(iova: blockIOVA)
                    let blockEnd = blockFirst + Int(t.pageSize.bytes >> pageShift)
                    if blockFirst < lo { lo = blockFirst; widened = true }
                    if blockEnd > hi { hi = blockEnd; widened = true }
                    pos = blockFirst
                }
            }
        }
        return lo..<hi
    }

    // MARK: Inspection

    /// A snapshot of the engine's counters.
    public var statistics: EngineStatistics {
        state.withLock { s in
            var stats = s.stats
            stats.iotlbSyncs = s.domains.reduce(0) { $0 + $1.syncCount }
            stats.syncedRanges = s.domains.reduce(0) { $0 + $1.syncedRanges }
            return stats
        }
    }

    /// The fatal invalidation failure that stopped the engine, if any.
    public var failure: FatalInvalidationError? { state.withLock { $0.failure } }

    /// The invalidation sequence: odd while an invalidation runs.
    public var invalidationSequence: UInt64 { sequence.load(ordering: .acquiring) }

    /// I/O page-table pages allocated and not freed, over every domain.
    public var liveTablePages: Int { state.withLock { s in s.domains.reduce(0) { $0 + $1.liveTablePages } } }

    /// Faulted pages over all mappings (the bits set).
    public var mappedPageCount: Int {
        state.withLock { s in s.mappings.byIOVA.reduce(0) { $0 + $1.iopfMapped.population } }
    }

    /// A run of mapped pages: its IOVAs, and the physical and host addresses of its first
    /// page (both consecutive over the run).
    public struct MappedRun: Sendable, Equatable {
        /// The run's IOVAs.
        public var range: Range<UInt64>
        /// The physical address of the run's first page.
        public var phys: UInt64
        /// The host address of the run's first page.
        public var host: UInt64
        /// What the run's mapping grants.
        public var prot: Protection
    }

    /// The pages around `iova`, inside `window`, that are mapped in `domain` and translate
    /// to consecutive physical addresses with one protection: what one IOTLB entry of a
    /// translating device (a vhost-user back-end) can name. Found from the mapping's bitmap
    /// (a few words, not a page walk each) and checked at both ends against the page table;
    /// a run whose ends disagree, or any run under dirty tracking (whose pages differ in
    /// write access), shrinks to the page itself. Nil when `iova` is not mapped.
    public func mappedRun(domain: DomainID, around iova: UInt64, within window: Range<UInt64>) -> MappedRun? {
        state.withLock { s in
            let page = iova & ~0xFFF
            let table = s.domains[domain.rawValue]
            guard let x = table.translate(page) else { return nil }
            let m = s.mappings.mapping(containing: page)
            let host = { (a: UInt64) in m.map { $0.vaddr + (a - $0.iova) } ?? 0 }
            let single = MappedRun(range: page..<(page + 4096), phys: x.phys & ~0xFFF, host: host(page), prot: x.prot)
            guard let m, !m.pinned, m.dirty == nil, window.contains(page) else { return single }
            let p = m.pageIndex(iova: page)
            let low = max(window.lowerBound, m.iova)
            let high = min(window.upperBound, m.iova + m.size)
            let first = m.iopfMapped.findPreviousClear(from: Int((low - m.iova) >> 12), to: p) + 1
            let end = m.iopfMapped.findNextClear(from: p, to: Int((high - m.iova + 4095) >> 12))
            let a = m.iova + UInt64(first) << 12
            let last = m.iova + UInt64(end - 1) << 12
            guard end > p, let xa = table.translate(a), let xl = table.translate(last), xa.prot == x.prot,
                xl.prot == x.prot, xl.phys &- xa.phys == last - a, x.phys &- xa.phys == page - a
            else { return single }
            return MappedRun(range: a..<(last + 4096), phys: xa.phys & ~0xFFF, host: host(a), prot: x.prot)
        }
    }

    /// Whether page `iova` is marked mapped in its mapping's bitmap.
    public func isMarkedMapped(iova: UInt64) -> Bool {
        state.withLock { s in
            guard let m = s.mappings.mapping(containing: iova) else { return false }
            return m.iopfMapped.test(m.pageIndex(iova: iova))
        }
    }
}

// MARK: - Fault handler

/// Handles page request groups for one thread, reusing its scratch buffers so that the
/// steady state allocates nothing. Not thread-safe; make one per thread.
public final class FaultHandler {
    /// The engine whose faults this handler serves.
    public let engine: FaultEngine

    private struct Work {
        var iova: UInt64
        var host: UInt64
        var write: Bool
        var mapping: DMAMapping?
        var outcome: RequestOutcome?
        /// Mapped ahead of the group (fault-around): best effort, not part of the answer.
        var ahead = false
        /// A neighbour mapped only if already resident (never populated), and where it is.
        var residentOnly = false
        var residentPhys: UInt64?
        /// A write to a mapped page that dirty tracking write-protected: nothing to
        /// resolve, write access to restore.
        var restore = false
    }

    @exclusivity(unchecked) private var work: [Work] = []
    /// The groups' requests at the head of `work` (the rest are mapped ahead).
    @exclusivity(unchecked) private var demandCount = 0
    /// Where each group's requests end in `work` (one entry per group, the last being
    /// `demandCount`), and each group's answer.
    @exclusivity(unchecked) private var groupEnds: [Int] = []
    @exclusivity(unchecked) private var outcomes: [GroupOutcome] = []
    /// The neighbourhood whose resident pages are mapped (host address, pages), if any.
    @exclusivity(unchecked) private var cluster: (host: UInt64, pages: Int)?
    /// The 2 MiB block around the group's last request, when a huge page may back it
    /// (`blocksOnFault`), and its physical address once the host said one does.
    @exclusivity(unchecked) private var block: (iova: UInt64, host: UInt64, phys: UInt64?)?
    @exclusivity(unchecked) private var resident: [UInt64?] = []
    @exclusivity(unchecked) private var physical: [UInt64] = []
    /// Index into `physical` for each work item, or -1 when it was not resolved.
    @exclusivity(unchecked) private var physicalIndex: [Int] = []

    init(engine: FaultEngine) {
        self.engine = engine
        work.reserveCapacity(32)
        physical.reserveCapacity(32)
        physicalIndex.reserveCapacity(32)
    }

    /// Handles one complete page request group and returns its single answer. With
    /// `ahead` > 0, up to that many pages after the group's last request are mapped too
    /// (fault-around), never past its mapping, a page already mapped or a gone page.
    /// Otherwise, with `neighbours` > 0 (a power of two), the pages of the aligned block
    /// of that many around the last request that are already resident are mapped, as the
    /// kernel's own fault-around maps cached pages: nothing is populated for them.
    public func handle(_ group: [PageRequest], ahead: Int = 0, neighbours: Int = 0) -> GroupOutcome {
        groupEnds.removeAll(keepingCapacity: true)
        groupEnds.append(group.count)
        var retries = 0
        while true {
            let seq = lookUp(group, ahead: ahead, neighbours: neighbours)
            resolve()
            if engine.configuration.injectedBugs.contains(.noRetry) { Self.stretchRaceWindow() }
            if install(seq: seq) { break }
            retries += 1
        }
        outcomes[0].retries = retries
        return outcomes[0]
    }

    /// Handles several complete groups at once, with nothing mapped ahead: one lock for
    /// the lookup, one resolve per contiguous run across groups (a device streaming
    /// faults over consecutive pages costs one populate call per batch instead of one per
    /// group), one lock to install. `requests` holds the groups in order, `ends` where
    /// each ends. Answers, one per group, in `body`'s argument (valid during the call).
    public func handle(batch requests: [PageRequest], ends: [Int], _ body: (borrowing [GroupOutcome]) -> Void) {
        precondition(ends.last == requests.count && !ends.isEmpty, "group ends must cover the requests")
        groupEnds.removeAll(keepingCapacity: true)
        groupEnds.append(contentsOf: ends)
        var retries = 0
        while true {
            let seq = lookUp(requests, ahead: 0, neighbours: 0)
            resolve()
            if engine.configuration.injectedBugs.contains(.noRetry) { Self.stretchRaceWindow() }
            if install(seq: seq) { break }
            retries += 1
        }
        for g in outcomes.indices { outcomes[g].retries = retries }
        body(outcomes)
    }

    /// Maps, ahead of any fault, the pages of `[iova, iova + pages × 4 KiB)` that are not
    /// mapped yet, as fault-around's pages ahead: resolved in one call per run and installed
    /// under the same sequence check. Stops at the mapping's end and at a gone page; skips
    /// pages already mapped (a device that caught up faulted them). The event loop calls it
    /// a chunk at a time after answering, so that the device writes the pages of its last
    /// window while the next one is populated. Returns the pages mapped and whether it
    /// stopped before the end.
    ///
    /// With `blocksOnFault`, an aligned 2 MiB block wholly inside the range that could be
    /// mapped with one entry is populated whole and mapped as a block if one huge page
    /// backs it (its pages otherwise, populated already).
    public func mapAhead(from iova: UInt64, pages: Int, write: Bool) -> (mapped: Int, stopped: Bool) {
        guard engine.configuration.blocksOnFault else { return mapPagesAhead(from: iova, pages: pages, write: write) }
        let end = iova + UInt64(pages) << pageShift
        var pos = iova
        var mapped = 0
        while pos < end {
            if pos & (hugeBlockBytes - 1) == 0 && end - pos >= hugeBlockBytes,
                let n = mapBlockAhead(at: pos, write: write)
            {
                mapped += n
                pos += hugeBlockBytes
                continue
            }
            let segmentEnd = min(end, (pos & ~(hugeBlockBytes - 1)) + hugeBlockBytes)
            let r = mapPagesAhead(from: pos, pages: Int((segmentEnd - pos) >> pageShift), write: write)
            mapped += r.mapped
            if r.stopped { return (mapped, true) }
            pos = segmentEnd
        }
        return (mapped, false)
    }

    /// The block at `iova` ahead of any fault: nil unless it is a block candidate that
    /// one huge page backs once populated; then the pages it mapped (512, or 0 when a page
    /// of it was mapped meanwhile). An invalidation in flight sends it round again.
    private func mapBlockAhead(at iova: UInt64, write: Bool) -> Int? {
        while true {
            let candidate = engine.state.withLock { s -> (m: DMAMapping, host: UInt64, seq: UInt64)? in
                guard s.failure == nil, let m = s.mappings.mapping(containing: iova), !m.pinned,
                    let b = blockCandidate(Work(iova: iova, host: 0, write: write), in: m)
                else { return nil }
                return (m, b.host, engine.sequence.load(ordering: .relaxed))
            }
            guard let candidate else { return nil }
            physical.removeAll(keepingCapacity: true)
            do {
                try engine.memory.resolve(
                    address: candidate.host, pageCount: hugeBlockPages, write: write,
                    physical: &physical)
            } catch {
                return nil  // the pages' own resolve says which one
            }
            guard let phys = engine.memory.hugeBlock(at: candidate.host) else { return nil }
            let mapped = engine.state.withLock { s -> Int? in
                guard engine.sequence.load(ordering: .relaxed) == expectedSequence(candidate.seq) else {
                    s.stats.retries += 1
                    return nil
                }
                guard s.mapFaultedBlock(iova: iova, phys: phys, mapping: candidate.m) else { return 0 }
                s.stats.prefetchedPages += hugeBlockPages
                return hugeBlockPages
            }
            if let mapped { return mapped }
        }
    }

    /// The sequence an install must still see: the one noted at lookup, or whatever it
    /// is now with no-retry planted (which skips the check here too).
    private func expectedSequence(_ noted: UInt64) -> UInt64 {
        engine.configuration.injectedBugs.contains(.noRetry) ? engine.sequence.load(ordering: .relaxed) : noted
    }

    private func mapPagesAhead(from iova: UInt64, pages: Int, write: Bool) -> (mapped: Int, stopped: Bool) {
        while true {
            work.removeAll(keepingCapacity: true)
            demandCount = 0
            cluster = nil
            block = nil
            var stopped = false
            let seq = engine.state.withLock { s -> UInt64 in
                guard s.failure == nil, let m = s.mappings.mapping(containing: iova), !m.pinned else {
                    stopped = true
                    return 0
                }
                var page = iova
                for _ in 0..<pages {
                    guard page <= m.iovaLast else { stopped = true; break }
                    let index = m.pageIndex(iova: page)
                    if let gone = m.hostGone, gone.test(index) { stopped = true; break }
                    if !m.iopfMapped.test(index) {
                        work.append(
                            Work(
                                iova: page, host: m.hostAddress(page: index), write: write, mapping: m,
                                outcome: nil, ahead: true))
                    }
                    page += pageBytes
                }
                return engine.sequence.load(ordering: .relaxed)
            }
            if work.isEmpty { return (0, stopped) }
            resolve()
            groupEnds.removeAll(keepingCapacity: true)
            if install(seq: seq) { return (outcomes[0].prefetched, stopped) }
        }
    }

    /// Maps the resident pages of the aligned block of `pages` (a power of two) around
    /// `iova` that are not mapped yet, as fault-around's neighbours of a random fault,
    /// after its answer went out: nothing is populated, and nothing inside a gone range,
    /// outside the mapping or across an invalidation (same sequence retry). Returns the
    /// pages mapped.
    public func mapResidentAround(_ iova: UInt64, pages: Int, write: Bool) -> Int {
        while true {
            work.removeAll(keepingCapacity: true)
            demandCount = 0
            cluster = nil
            block = nil
            let seq = engine.state.withLock { s -> UInt64? in
                guard s.failure == nil, let m = s.mappings.mapping(containing: iova), !m.pinned else { return nil }
                lookAround(
                    Work(iova: iova & ~(pageBytes - 1), host: 0, write: write, mapping: m, outcome: nil), in: m,
                    pages: pages)
                return engine.sequence.load(ordering: .relaxed)
            }
            guard let seq, !work.isEmpty else { return 0 }
            resolve()
            groupEnds.removeAll(keepingCapacity: true)
            if install(seq: seq) { return outcomes[0].prefetched }
        }
    }

    /// With no-retry planted: 100 µs between resolve and install, standing in for a slow
    /// page population, so that a short stress run (out of process, or under TSan, where
    /// the loop is slower than the invalidating threads) meets the race it plants. At 20 µs
    /// half of 2-second runs with devices in other processes missed it; at 100 µs, 1 in 10.
    private static func stretchRaceWindow() {
        let until = ContinuousClock.now + .microseconds(100)
        while ContinuousClock.now < until {}
    }

    /// Phase 1, under the lock: classify each request and note the sequence.
    private func lookUp(_ group: [PageRequest], ahead: Int, neighbours: Int) -> UInt64 {
        work.removeAll(keepingCapacity: true)
        demandCount = group.count
        cluster = nil
        block = nil
        return engine.state.withLock { s in
            let failed = s.failure != nil
            for r in group {
                let iova = r.page
                var w = Work(iova: iova, host: 0, write: r.wantsWrite, mapping: nil, outcome: nil)
                if failed {
                    w.outcome = .engineFailed
                } else if let m = s.mappings.mapping(containing: iova),
                    !m.pinned || m.iopfMapped.test(m.pageIndex(iova: iova))
                {
                    let wants: Protection = r.wantsWrite ? .write : .read
                    // EXEC needs READ (a DMA mapping has no separate execute right); PRIV
                    // asks for a supervisor address space, which iopf never serves.
                    if !m.prot.contains(wants) || (r.perm.contains(.read) && !m.prot.contains(.read))
                        || (r.perm.contains(.exec) && !m.prot.contains(.read)) || r.perm.contains(.priv)
                    {
                        w.outcome = .permissionDenied
                    } else if let gone = m.hostGone, gone.test(m.pageIndex(iova: iova)) {
                        w.outcome = .hostGone
                    } else if m.iopfMapped.test(m.pageIndex(iova: iova)) {
                        if r.wantsWrite && m.dirty != nil {
                            w.mapping = m
                            w.restore = true
                        } else {
                            w.outcome = .spurious
                        }
                    } else {
                        w.host = m.hostAddress(page: m.pageIndex(iova: iova))
                        w.mapping = m
                    }
                } else {
                    w.outcome = .noMapping
                }
                work.append(w)
            }
            if groupEnds.count == 1, let last = work.last, let m = last.mapping, !m.pinned, !last.restore {
                if engine.configuration.blocksOnFault, let b = blockCandidate(last, in: m) {
                    block = b  // nothing ahead or around: the block covers it
                } else if ahead > 0 {
                    lookAhead(after: last, in: m, pages: ahead)
                } else if neighbours > 1 {
                    lookAround(last, in: m, pages: neighbours)
                }
            }
            return engine.sequence.load(ordering: .relaxed)
        }
    }

    /// The aligned 2 MiB block around `last` if it could be mapped with one entry: inside
    /// the mapping, host address aligned alike, no page of it mapped, gone or tracked.
    private func blockCandidate(_ last: Work, in m: DMAMapping) -> (iova: UInt64, host: UInt64, phys: UInt64?)? {
        let iova = last.iova & ~(hugeBlockBytes - 1)
        guard m.dirty == nil, iova >= m.iova, iova + (hugeBlockBytes - 1) <= m.iovaLast else { return nil }
        let first = m.pageIndex(iova: iova)
        let host = m.hostAddress(page: first)
        let pages = first..<(first + hugeBlockPages)
        guard host & (hugeBlockBytes - 1) == 0, m.iopfMapped.population(in: pages) == 0,
            (m.hostGone?.population(in: pages) ?? 0) == 0
        else { return nil }
        return (iova, host, nil)
    }

    /// Adds the pages after `last` to map ahead, under the lock: stops at the mapping's
    /// end, at a page already mapped (what follows was faulted or mapped ahead before) and
    /// at a page whose host memory is gone.
    private func lookAhead(after last: Work, in m: DMAMapping, pages: Int) {
        var iova = last.iova
        var host = last.host
        for _ in 0..<pages {
            iova += pageBytes
            guard iova <= m.iovaLast else { return }  // iovaLast is the mapping's last byte
            host += pageBytes
            let index = m.pageIndex(iova: iova)
            if m.iopfMapped.test(index) { return }
            if let gone = m.hostGone, gone.test(index) { return }
            work.append(Work(iova: iova, host: host, write: last.write, mapping: m, outcome: nil, ahead: true))
        }
    }

    /// Adds the other pages of the aligned block of `pages` around `last`, inside the
    /// mapping, not mapped, not gone and not requested: mapped only if resident.
    private func lookAround(_ last: Work, in m: DMAMapping, pages: Int) {
        let span = UInt64(pages) << pageShift
        let start = max(last.iova & ~(span - 1), m.iova)
        let end = min((last.iova & ~(span - 1)) + span - 1, m.iovaLast)
        let first = work.count
        var iova = start
        while iova < end {
            let index = m.pageIndex(iova: iova)
            if !m.iopfMapped.test(index), !(m.hostGone?.test(index) ?? false),
                !work[..<demandCount].contains(where: { $0.iova == iova })
            {
                work.append(
                    Work(
                        iova: iova, host: m.hostAddress(page: index), write: last.write, mapping: m, outcome: nil,
                        ahead: true, residentOnly: true))
            }
            iova += pageBytes
        }
        if work.count > first {
            cluster = (m.hostAddress(page: m.pageIndex(iova: start)), Int((end - start + 1) >> pageShift))
        }
    }

    /// Phase 2, without the lock: resolve host pages, one call per contiguous run.
    private func resolve() {
        physical.removeAll(keepingCapacity: true)
        physicalIndex.removeAll(keepingCapacity: true)
        if let cluster {
            // One mincore for the block; neighbours not resident are dropped, not populated.
            resident.removeAll(keepingCapacity: true)
            engine.memory.residentPages(address: cluster.host, pageCount: cluster.pages, into: &resident)
            for k in demandCount..<work.count where work[k].residentOnly {
                let i = Int((work[k].host - cluster.host) >> pageShift)
                if i < resident.count, let phys = resident[i] {
                    work[k].residentPhys = phys
                } else {
                    work[k].mapping = nil
                    work[k].outcome = .resolveFailed
                }
            }
        }
        var i = 0
        while i < work.count {
            if let phys = work[i].residentPhys {  // a resident neighbour: mapped as it is
                physicalIndex.append(physical.count)
                physical.append(phys)
                i += 1
                continue
            }
            guard work[i].mapping != nil, !work[i].restore else {
                physicalIndex.append(-1)
                i += 1
                continue
            }
            var end = i + 1
            while end < work.count, work[end].mapping != nil, !work[end].restore, work[end].residentPhys == nil,
                work[end].write == work[i].write,
                work[end].host == work[end - 1].host + pageBytes
            { end += 1 }
            let base = physical.count
            do {
                try engine.memory.resolve(
                    address: work[i].host, pageCount: end - i, write: work[i].write, physical: &physical)
                for k in i..<end { physicalIndex.append(base + k - i) }
            } catch {
                physical.removeSubrange(base...)
                // Pages mapped ahead are best effort: without them, the requests may resolve.
                var demandEnd = i
                while demandEnd < end && !work[demandEnd].ahead { demandEnd += 1 }
                if demandEnd < end && demandEnd > i,
                    (try? engine.memory.resolve(
                        address: work[i].host, pageCount: demandEnd - i, write: work[i].write, physical: &physical))
                        != nil
                {
                    for k in i..<demandEnd { physicalIndex.append(base + k - i) }
                } else {
                    physical.removeSubrange(base...)
                    for k in i..<demandEnd {
                        physicalIndex.append(-1)
                        work[k].outcome = .resolveFailed
                    }
                }
                for k in demandEnd..<end {
                    physicalIndex.append(-1)
                    work[k].outcome = .resolveFailed
                }
            }
            i = end
        }
        // The block is worth asking about only if the request it holds was resolved.
        if let b = block, work[demandCount - 1].outcome == nil {
            block!.phys = engine.memory.hugeBlock(at: b.host)
        }
    }

    /// Phase 3, under the lock: install unless an invalidation ran since phase 1. Fills
    /// `outcomes`, one per group (one for pages ahead only, from `mapAhead`).
    private func install(seq: UInt64) -> Bool {
        engine.state.withLock { s in
            guard
                engine.sequence.load(ordering: .relaxed) == seq || engine.configuration.injectedBugs.contains(.noRetry)
            else {
                s.stats.retries += 1
                return false
            }
            outcomes.removeAll(keepingCapacity: true)
            outcomes.append(GroupOutcome(code: .success))
            var g = 0
            // A block first (single groups only): the group's requests inside it are then mapped by it.
            var blockMapped: ClosedRange<UInt64>?
            if let b = block, let phys = b.phys, let m = work[demandCount - 1].mapping,
                s.mapFaultedBlock(iova: b.iova, phys: phys, mapping: m)
            {
                blockMapped = b.iova...(b.iova + hugeBlockBytes - 1)
                outcomes[0].blockTail = Int((b.iova + hugeBlockBytes - work[demandCount - 1].iova) >> pageShift) - 1
            }
            for k in work.indices {
                if k < demandCount && k == groupEnds[g] {
                    g += 1
                    outcomes.append(GroupOutcome(code: .success))
                }
                var result = work[k].outcome ?? .mapped
                if result == .mapped, let blockMapped, blockMapped.contains(work[k].iova), !work[k].restore,
                    work[k].mapping === work[demandCount - 1].mapping
                {
                    outcomes[g].mapped += 1
                    continue
                }
                if result == .mapped, let m = work[k].mapping {
                    result =
                        work[k].restore
                        ? s.restoreWrite(iova: work[k].iova, mapping: m)
                        : s.mapFaultedPage(
                            iova: work[k].iova, phys: physical[physicalIndex[k]], mapping: m,
                            writeRequest: work[k].write && !work[k].ahead)
                }
                if work[k].ahead {
                    if result == .mapped {
                        outcomes[g].prefetched += 1
                        s.stats.mappedPages += 1
                        s.stats.prefetchedPages += 1
                    }
                    continue
                }
                switch result {
                case .mapped: outcomes[g].mapped += 1; s.stats.mappedPages += 1
                case .spurious: outcomes[g].spurious += 1; s.stats.spurious += 1
                case .writeRestored: outcomes[g].writeRestored += 1
                case .noMapping: s.stats.noMapping += 1
                case .permissionDenied: s.stats.permissionDenied += 1
                case .resolveFailed: s.stats.resolveFailures += 1
                case .mapFailed: s.stats.mapFailures += 1
                case .engineFailed: break
                case .hostGone: s.stats.hostGoneFaults += 1
                }
                if !result.succeeded { outcomes[g].code = .invalid }
            }
            guard demandCount > 0 else { return true }  // pages ahead only (mapAhead)
            s.stats.groups += outcomes.count
            s.stats.requests += demandCount
            for o in outcomes {
                if o.code == .success { s.stats.successGroups += 1 } else { s.stats.invalidGroups += 1 }
            }
            return true
        }
    }
}

extension FaultEngine.State {
    /// Maps one faulted page into every domain and sets its bit; on failure undoes the
    /// domains already mapped so that the bit keeps meaning "mapped everywhere".
    /// While dirty tracking, a write request's page becomes dirty and writable; other
    /// pages are mapped read-only unless already dirty (`installProtection`).
    mutating func mapFaultedPage(
        iova: UInt64, phys: UInt64, mapping m: DMAMapping,
        writeRequest: Bool
    ) -> RequestOutcome {
        let index = m.pageIndex(iova: iova)
        // A duplicate within the group, or another thread, may have mapped it meanwhile.
        if m.iopfMapped.test(index) { return .spurious }
        let prot = installProtection(m, page: index, writeRequest: writeRequest)
        for d in domains.indices {
            do {
                try domains[d].mapPage(iova: iova, phys: phys, prot: prot)
            } catch {
                for undo in 0..<d {
                    _ = domains[undo].unmap(iova: iova, size: pageBytes, gather: &gathers[undo])
                    domains[undo].sync(&gathers[undo])
                }
                return .mapFailed
            }
        }
        m.iopfMapped.set(index)
        mappings.activate(m)
        if writeRequest { m.dirty?.set(index) }
        return .mapped
    }

    /// Maps the 2 MiB block at `iova` with one entry in every domain and sets its 512
    /// bits, unless a page of it was mapped meanwhile (another thread's fault); on a
    /// failure undoes the domains already mapped. Returns whether the block is mapped.
    mutating func mapFaultedBlock(iova: UInt64, phys: UInt64, mapping m: DMAMapping) -> Bool {
        let first = m.pageIndex(iova: iova)
        let pages = first..<(first + hugeBlockPages)
        guard m.dirty == nil, m.iopfMapped.population(in: pages) == 0 else { return false }
        for d in domains.indices {
            do {
                try domains[d].map(iova: iova, phys: phys, size: hugeBlockBytes, prot: m.prot)
            } catch {
                for undo in 0..<d {
                    _ = domains[undo].unmap(iova: iova, size: hugeBlockBytes, gather: &gathers[undo])
                    domains[undo].sync(&gathers[undo])
                }
                return false
            }
        }
        m.iopfMapped.set(pages)
        mappings.activate(m)
        stats.mappedPages += hugeBlockPages
        stats.blockMappings += 1
        return true
    }
}

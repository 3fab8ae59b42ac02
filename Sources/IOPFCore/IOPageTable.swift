// IOPageTable.swift — a 4-level radix I/O page table over a 48-bit IOVA space, one per
// IOMMU domain.
//
// Levels: 0 is the root (512 GiB per entry), 1 maps 1 GiB blocks, 2 maps 2 MiB blocks,
// 3 maps 4 KiB pages. Every walk is one short loop or recursion per operation, after
// drivers/iommu/io-pgtable-arm.c.
//
// Threading: one writer (map, unmap, sync), serialised by the owner (the engine's update
// lock); any number of concurrent `translate` walkers on other threads. Entries are
// published with release stores and table pages are reused only after the gather that
// freed them is synced, so a walker never follows an entry into a recycled page unless
// a sync was skipped.
//
// Ranges: `iova`/`size` pairs are `[iova, iova + size)`; gathered ranges are inclusive.

/// What `translate` found for one IOVA.
public struct Translation: Sendable, Hashable {
    /// Physical address of the byte at the translated IOVA.
    public var phys: UInt64
    /// What the leaf grants.
    public var prot: Protection
    /// Size of the leaf that holds it.
    public var pageSize: PageSize
}

/// Why the page table refused a map or unmap.
public enum IOPageTableError: Error, Sendable, Equatable, CustomStringConvertible {
    /// An address or size not aligned to the page size asked for.
    case unaligned(iova: UInt64, phys: UInt64, size: UInt64)
    /// The range lies outside the table's IOVA space.
    case outOfRange(iova: UInt64, size: UInt64)
    /// A leaf is present at `at` already.
    case overlap(iova: UInt64, size: UInt64, at: UInt64)
    /// A mapping that grants neither read nor write.
    case noPermission(iova: UInt64)
    /// The pool has no free table page left.
    case outOfTablePages

    public var description: String {
        switch self {
        case .unaligned(let iova, let phys, let size):
            "map: iova \(hex(iova)), phys \(hex(phys)) and size \(hex(size)) must all be non-zero multiples of 4 KiB"
        case .outOfRange(let iova, let size):
            "map: [\(hex(iova)), +\(hex(size))) does not fit in the 48-bit IOVA space"
        case .overlap(let iova, let size, let at):
            "map: [\(hex(iova)), +\(hex(size))) overlaps an existing mapping at \(hex(at)); nothing was mapped"
        case .noPermission(let iova):
            "map: the mapping at \(hex(iova)) grants neither read nor write"
        case .outOfTablePages:
            "map: the page-table pool is exhausted (16 TiB of 4 KiB leaves); nothing was mapped"
        }
    }
}

/// A 4-level I/O page table with 4 KiB, 2 MiB and 1 GiB leaves, as an IOMMU walks it.
public final class IOPageTable: @unchecked Sendable {
    /// Bits of IOVA the table translates.
    public static let iovaBits: UInt64 = 48
    /// The first IOVA past the table's space.
    public static let iovaLimit: UInt64 = 1 << iovaBits

    let pool = TablePagePool()
    let root: TablePageID
    /// Page sizes `map` may use, largest first.
    public let pageSizes: [PageSize]
    /// The devices' IOTLBs, flushed on every sync. Set by the runtime as devices attach.
    @exclusivity(unchecked) public var invalidator: (any IOTLBInvalidator)?

    /// Tests only: makes every unmap remove nothing, to exercise the fatal path.
    @exclusivity(unchecked) var testsOnly_refuseUnmap = false
    /// Planted bugs (skip-sync, early-free); empty outside `iopf stress` and tests.
    @exclusivity(unchecked) var bugs: InjectedBugs = []
    /// Told after each sync, for checkers.
    @exclusivity(unchecked) public var observer: (any IOTLBSyncObserver)?

    /// Syncs that flushed something, and how many ranges they carried in total.
    @exclusivity(unchecked) public private(set) var syncCount = 0
    /// Ranges handed to IOTLB syncs.
    @exclusivity(unchecked) public private(set) var syncedRanges = 0

    /// An empty table that maps leaves of `pageSizes` and syncs through `invalidator`.
    public init(pageSizes: Set<PageSize> = Set(PageSize.allCases), invalidator: (any IOTLBInvalidator)? = nil) {
        precondition(pageSizes.contains(.size4K), "an I/O page table must support 4 KiB pages")
        self.pageSizes = pageSizes.sorted { $0.bytes > $1.bytes }
        self.invalidator = invalidator
        root = pool.allocate()!
    }

    /// Table pages allocated, freed, and live (allocated - freed), root included.
    public var tablePageAllocations: Int { pool.allocations }
    /// Table pages returned to the pool after their sync.
    public var tablePageFrees: Int { pool.frees }
    /// Table pages in use now.
    public var liveTablePages: Int { pool.livePages }

    @inline(__always) static func shift(level: Int) -> UInt64 { 39 - 9 * UInt64(level) }
    @inline(__always) static func index(_ iova: UInt64, level: Int) -> Int { Int((iova >> shift(level: level)) & 511) }
    @inline(__always) static func level(of size: PageSize) -> Int {
        switch size {
        case .size4K: 3
        case .size2M: 2
        case .size1G: 1
        }
    }

    // MARK: Map

    /// Maps `[iova, iova + size)` to `[phys, phys + size)`, using the largest page sizes
    /// that the alignment of both addresses allows (like `iommu_map`). On any failure the
    /// part already mapped is unmapped and synced again: nothing is left half-mapped.
    public func map(iova: UInt64, phys: UInt64, size: UInt64, prot: Protection) throws(IOPageTableError) {
        guard size > 0, isPageAligned(iova), isPageAligned(phys), isPageAligned(size) else {
            throw .unaligned(iova: iova, phys: phys, size: size)
        }
        guard let last = lastAddress(start: iova, size: size), last < Self.iovaLimit,
            lastAddress(start: phys, size: size).map({ $0 <= PTE.addressMask }) == true
        else { throw .outOfRange(iova: iova, size: size) }
        guard !prot.isEmpty else { throw .noPermission(iova: iova) }

        var done: UInt64 = 0
        while done < size {
            let (va, pa, left) = (iova + done, phys + done, size - done)
            let pageSize = pageSizes.first { s in
                (va | pa) & (s.bytes - 1) == 0 && s.bytes <= left
            }!
            do {
                try mapOne(iova: va, phys: pa, pageSize: pageSize, prot: prot)
            } catch {
                if done > 0 {
                    var gather = IOTLBGather()
                    _ = unmap(iova: iova, size: done, gather: &gather)
                    sync(&gather)
                }
                throw error
            }
            done += pageSize.bytes
        }
    }

    /// Maps one 4 KiB page: the fault path's call.
    @inline(__always)
    public func mapPage(iova: UInt64, phys: UInt64, prot: Protection) throws(IOPageTableError) {
        guard isPageAligned(iova), isPageAligned(phys), iova < Self.iovaLimit, phys <= PTE.addressMask else {
            throw .unaligned(iova: iova, phys: phys, size: pageBytes)
        }
        guard !prot.isEmpty else { throw .noPermission(iova: iova) }
        try mapOne(iova: iova, phys: phys, pageSize: .size4K, prot: prot)
    }

    @inline(__always)
    private func mapOne(iova: UInt64, phys: UInt64, pageSize: PageSize, prot: Protection) throws(IOPageTableError) {
        let target = Self.level(of: pageSize)
        var page = root
        for level in 0..<target {
            let i = Self.index(iova, level: level)
            let e = pool.load(page, i)
            if !PTE.isPresent(e) {
                guard let child = pool.allocate() else { throw .outOfTablePages }
                pool.store(page, i, PTE.table(child))
                page = child
            } else if PTE.isLeaf(e) {
                throw .overlap(iova: iova, size: pageSize.bytes, at: iova & ~((1 << Self.shift(level: level)) - 1))
            } else {
                page = PTE.child(e)
            }
        }
        let i = Self.index(iova, level: target)
        guard !PTE.isPresent(pool.load(page, i)) else {
            throw .overlap(iova: iova, size: pageSize.bytes, at: iova)
        }
        pool.store(page, i, PTE.leaf(phys: phys, prot: prot))
    }

    // MARK: Unmap

    /// Unmaps from `iova` onwards and returns the bytes really unmapped, which may be more
    /// or less than `size`:
    /// - a block whose first address is reached is removed whole, even past `iova + size`;
    /// - a block entered in its middle cannot be split: the walk stops there;
    /// - the walk stops at the first hole.
    /// Unaligned or zero `iova`/`size` unmaps nothing. Removed leaves and emptied table pages
    /// go on `gather`; the caller syncs (as `iommu_unmap_fast`).
    public func unmap(iova: UInt64, size: UInt64, gather: inout IOTLBGather) -> UInt64 {
        guard !testsOnly_refuseUnmap, size > 0, isPageAligned(iova), isPageAligned(size), iova < Self.iovaLimit else {
            return 0
        }
        let end = min(iova.addingReportingOverflow(size).overflow ? Self.iovaLimit : iova + size, Self.iovaLimit)
        let reached = unmap(page: root, level: 0, from: iova, end: end, gather: &gather).reached
        return reached - iova
    }

    /// Unmaps entries of `page` (at `level`) from `start` towards `end`. Returns the address
    /// reached and whether the walk stopped early (hole or block interior).
    private func unmap(
        page: TablePageID, level: Int, from start: UInt64, end: UInt64, gather: inout IOTLBGather
    ) -> (reached: UInt64, stopped: Bool) {
        let shift = Self.shift(level: level)
        let entrySize: UInt64 = 1 << shift
        if level == 3 {
            // Leaf level: entries are 4 KiB pages; clear the present run in one go.
            let i = Self.index(start, level: 3)
            let wanted = Int(min(end - start, UInt64(TablePagePool.entriesPerPage - i) << 12) >> 12)
            let n = pool.clearPresentRun(page, from: i, limit: wanted)
            guard n > 0 else { return (start, true) }
            let reached = start + UInt64(n) << 12
            gatherAdd(IOVARange(start: start, last: reached - 1), pageSize: entrySize, &gather)
            return (reached, n < wanted)
        }
        var pos = start
        while pos < end {
            let i = Self.index(pos, level: level)
            let e = pool.load(page, i)
            guard PTE.isPresent(e) else { return (pos, true) }
            if PTE.isLeaf(e) {
                guard pos & (entrySize - 1) == 0 else { return (pos, true) }
                pool.store(page, i, 0)
                gatherAdd(IOVARange(start: pos, last: pos + entrySize - 1), pageSize: entrySize, &gather)
                pos += entrySize
            } else {
                let child = PTE.child(e)
                let entryEnd = (pos & ~(entrySize - 1)) + entrySize
                let (reached, stopped) = unmap(
                    page: child, level: level + 1, from: pos, end: min(end, entryEnd), gather: &gather)
                if pool.isEmpty(child) {
                    pool.store(page, i, 0)
                    pool.unlinked(child)
                    gather.freedPages.append(child)
                    if bugs.contains(.earlyFree) { pool.free(child) }
                }
                pos = reached
                if stopped { return (pos, true) }
            }
        }
        return (pos, false)
    }

    @inline(__always)
    private func gatherAdd(_ range: IOVARange, pageSize: UInt64, _ gather: inout IOTLBGather) {
        if gather.needsSync(before: range, pageSize: pageSize) { sync(&gather) }
        gather.add(range, pageSize: pageSize)
    }

    // MARK: Sync

    /// Flushes the devices' IOTLBs for the gathered ranges, then returns the gathered table
    /// pages to the pool: only now can no walker or cache still refer to them.
    public func sync(_ gather: inout IOTLBGather) {
        guard !gather.isEmpty else { return }
        if !gather.ranges.isEmpty {
            observer?.willSync()
            if !bugs.contains(.skipSync) { invalidator?.invalidate(gather.ranges) }
            observer?.synced(gather.ranges)
            syncCount += 1
            syncedRanges += gather.ranges.count
        }
        for page in gather.freedPages {
            pool.synced(page)
            if !bugs.contains(.earlyFree) { pool.free(page) }
        }
        gather.reset()
    }

    // MARK: Write protection (dirty tracking)

    /// Clears the write permission of every present writable leaf overlapping `[iova,
    /// iova + size)` (a block whole, even where it reaches past the range) and adds each
    /// to `gather`, so that one sync takes the old permission out of the IOTLBs. Returns
    /// the bytes of the leaves changed. Writer side only; walkers see either entry.
    public func writeProtect(iova: UInt64, size: UInt64, gather: inout IOTLBGather) -> UInt64 {
        guard size > 0, let last = lastAddress(start: iova, size: size), iova < Self.iovaLimit else { return 0 }
        return writeProtect(
            page: root, level: 0, base: 0, first: iova, last: min(last, Self.iovaLimit - 1), gather: &gather)
    }

    private func writeProtect(
        page: TablePageID, level: Int, base: UInt64, first: UInt64, last: UInt64,
        gather: inout IOTLBGather
    ) -> UInt64 {
        let shift = Self.shift(level: level)
        let span: UInt64 = 1 << shift
        let lo = first > base ? Int((first - base) >> shift) : 0
        let hi = min(Int((last - base) >> shift), TablePagePool.entriesPerPage - 1)
        var changed: UInt64 = 0
        guard lo <= hi else { return 0 }
        for i in lo...hi {
            let e = pool.load(page, i)
            guard PTE.isPresent(e) else { continue }
            let entryIOVA = base | UInt64(i) << shift
            if PTE.isLeaf(e) || level == 3 {
                guard e & PTE.write != 0 else { continue }
                pool.store(page, i, e & ~PTE.write)
                let range = IOVARange(start: entryIOVA, last: entryIOVA + span - 1)
                if gather.needsSync(before: range, pageSize: span) { sync(&gather) }
                gather.add(range, pageSize: span)
                changed += span
            } else {
                changed += writeProtect(
                    page: PTE.child(e), level: level + 1, base: entryIOVA, first: first, last: last, gather: &gather)
            }
        }
        return changed
    }

    /// Gives the leaf holding `iova` its write permission back (a tracked page's first
    /// write). Widening a permission needs no sync. Returns the leaf's size in bytes, or 0
    /// when no leaf is there.
    @discardableResult
    public func restoreWrite(iova: UInt64) -> UInt64 {
        guard iova < Self.iovaLimit else { return 0 }
        var page = root
        for level in 0...3 {
            let i = Self.index(iova, level: level)
            let e = pool.load(page, i)
            guard PTE.isPresent(e) else { return 0 }
            if PTE.isLeaf(e) || level == 3 {
                pool.store(page, i, e | PTE.write)
                return 1 << Self.shift(level: level)
            }
            page = PTE.child(e)
        }
        return 0
    }

    // MARK: Walk

    /// Translates one IOVA; nil when nothing is mapped there. Safe to call from any thread
    /// concurrently with the writer.
    @inline(__always)
    public func translate(_ iova: UInt64) -> Translation? {
        guard iova < Self.iovaLimit else { return nil }
        var page = root
        for level in 0...3 {
            let e = pool.load(page, Self.index(iova, level: level))
            guard PTE.isPresent(e) else { return nil }
            if PTE.isLeaf(e) || level == 3 {
                let size: PageSize = level == 3 ? .size4K : (level == 2 ? .size2M : .size1G)
                return Translation(phys: PTE.phys(e) + (iova & (size.bytes - 1)), prot: PTE.prot(e), pageSize: size)
            }
            page = PTE.child(e)
        }
        return nil
    }

    /// The first address in `[iova, end)` that a leaf maps, or `end` when none does:
    /// skips a hole whole entries at a time (an unmap walk stopped at a hole resumes here
    /// instead of page by page). Writer side only.
    public func firstMapped(from iova: UInt64, end: UInt64) -> UInt64 {
        let end = min(end, Self.iovaLimit)
        guard iova < end else { return end }
        return min(firstMapped(page: root, level: 0, from: iova, end: end), end)
    }

    private func firstMapped(page: TablePageID, level: Int, from start: UInt64, end: UInt64) -> UInt64 {
        let entrySize: UInt64 = 1 << Self.shift(level: level)
        var pos = start
        while pos < end {
            let i = Self.index(pos, level: level)
            let e = pool.load(page, i)
            let entryEnd = (pos & ~(entrySize - 1)) + entrySize
            if PTE.isPresent(e) {
                if PTE.isLeaf(e) || level == 3 { return pos }
                let found = firstMapped(page: PTE.child(e), level: level + 1, from: pos, end: min(end, entryEnd))
                if found < min(end, entryEnd) { return found }
            }
            // The last entry of this table page ends where the parent's entry ends.
            if i == TablePagePool.entriesPerPage - 1 { return entryEnd }
            pos = entryEnd
        }
        return end
    }

    /// Calls `body` for every leaf in IOVA order: (iova, translation of its first byte).
    /// Writer side only.
    public func forEachLeaf(_ body: (UInt64, Translation) throws -> Void) rethrows {
        try forEachLeaf(page: root, level: 0, base: 0, body)
    }

    private func forEachLeaf(page: TablePageID, level: Int, base: UInt64, _ body: (UInt64, Translation) throws -> Void)
        rethrows
    {
        let shift = Self.shift(level: level)
        for i in 0..<TablePagePool.entriesPerPage {
            let e = pool.load(page, i)
            guard PTE.isPresent(e) else { continue }
            let iova = base | UInt64(i) << shift
            if PTE.isLeaf(e) || level == 3 {
                let size: PageSize = level == 3 ? .size4K : (level == 2 ? .size2M : .size1G)
                try body(iova, Translation(phys: PTE.phys(e), prot: PTE.prot(e), pageSize: size))
            } else {
                try forEachLeaf(page: PTE.child(e), level: level + 1, base: iova, body)
            }
        }
    }
}

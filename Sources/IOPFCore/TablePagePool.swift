// TablePagePool.swift — storage for I/O page-table pages. The only unsafe memory in the
// core lives here.
//
// A table page is 512 entries of 64 bits, like a hardware page-table page. Pages live in
// chunks that never move once allocated, so a walker on another thread (a device doing an
// ATS-like translation) can follow an entry to a child page without taking any lock. Each
// entry is an `Atomic<UInt64>`: the single writer (the engine, under its update lock)
// publishes with release stores; walkers read with acquire loads.
//
// A page is reused only after the IOTLB gather that freed it has been synced (see
// `IOTLBGather`), because walkers and device caches may still hold it until then.

import Synchronization

/// Index of a table page in its pool. Page 0 is always the root.
public typealias TablePageID = UInt32

final class TablePagePool: @unchecked Sendable {
    static let entriesPerPage = 512
    static let pagesPerChunk = 256  // 1 MiB of entries per chunk
    static let maxChunks = 16384  // 4 Mi pages: 16 TiB of IOVA mapped with 4 KiB leaves

    /// Chunk directory; slots are written once, before any entry refers into the chunk.
    private let chunks: UnsafeMutablePointer<UnsafeMutablePointer<Atomic<UInt64>>?>
    @exclusivity(unchecked) private var chunkCount = 0
    /// Pages ever taken from fresh chunk memory; ids below this are allocated or free.
    @exclusivity(unchecked) private var highWater: TablePageID = 0
    @exclusivity(unchecked) private var freeList: [TablePageID] = []
    /// Present entries per page, kept by the writer so that empty pages can be freed.
    @exclusivity(unchecked) private(set) var presentEntries: [UInt16] = []

    /// Pages unlinked from the table whose gather has not been synced yet; freeing one of
    /// them is a bug (`freedBeforeSync` counts it).
    @exclusivity(unchecked) private var awaitingSync: [Bool] = []
    @exclusivity(unchecked) private(set) var freedBeforeSync = 0

    /// Counts for the "allocated = freed + live" invariant.
    @exclusivity(unchecked) private(set) var allocations = 0
    @exclusivity(unchecked) private(set) var frees = 0
    var livePages: Int { allocations - frees }

    init() {
        chunks = .allocate(capacity: Self.maxChunks)
        chunks.initialize(repeating: nil, count: Self.maxChunks)
    }

    deinit {
        for c in 0..<chunkCount {
            chunks[c]!.deinitialize(count: Self.pagesPerChunk * Self.entriesPerPage)
            chunks[c]!.deallocate()
        }
        chunks.deallocate()
    }

    /// A zeroed page. Returns nil when the pool's fixed directory is full.
    func allocate() -> TablePageID? {
        allocations += 1
        if let page = freeList.popLast() {
            return page
        }
        let page = highWater
        let chunk = Int(page) / Self.pagesPerChunk
        if chunk == chunkCount {
            guard chunk < Self.maxChunks else {
                allocations -= 1
                return nil
            }
            let count = Self.pagesPerChunk * Self.entriesPerPage
            let memory = UnsafeMutablePointer<Atomic<UInt64>>.allocate(capacity: count)
            for i in 0..<count { (memory + i).initialize(to: Atomic(0)) }
            chunks[chunk] = memory
            chunkCount += 1
        }
        highWater += 1
        presentEntries.append(0)
        awaitingSync.append(false)
        return page
    }

    /// Returns a page for reuse. Its entries must all be clear already (the unmap walk
    /// frees a page only when its present count reaches zero).
    func free(_ page: TablePageID) {
        precondition(presentEntries[Int(page)] == 0, "table page \(page) freed with entries present")
        if awaitingSync[Int(page)] { freedBeforeSync += 1 }
        frees += 1
        freeList.append(page)
    }

    /// The page was unlinked from its parent; it may be freed once `synced` is called.
    func unlinked(_ page: TablePageID) { awaitingSync[Int(page)] = true }

    /// The gather that unlinked the page has been synced.
    func synced(_ page: TablePageID) { awaitingSync[Int(page)] = false }

    @inline(__always)
    private func entryPointer(_ page: TablePageID, _ index: Int) -> UnsafeMutablePointer<Atomic<UInt64>> {
        let chunk = Int(page) / Self.pagesPerChunk
        let offset = (Int(page) % Self.pagesPerChunk) * Self.entriesPerPage + index
        return chunks[chunk].unsafelyUnwrapped + offset
    }

    @inline(__always)
    func load(_ page: TablePageID, _ index: Int) -> UInt64 {
        entryPointer(page, index).pointee.load(ordering: .acquiring)
    }

    /// Writer only: stores an entry and keeps the page's present count.
    @inline(__always)
    func store(_ page: TablePageID, _ index: Int, _ value: UInt64) {
        let entry = entryPointer(page, index)
        let was = entry.pointee.load(ordering: .relaxed)
        entry.pointee.store(value, ordering: .releasing)
        let wasPresent = was & PTE.present != 0
        let isPresent = value & PTE.present != 0
        if wasPresent != isPresent {
            presentEntries[Int(page)] = isPresent ? presentEntries[Int(page)] + 1 : presentEntries[Int(page)] - 1
        }
    }

    /// Writer only: clears up to `limit` consecutive present entries of `page` from
    /// `index`, stopping at the first entry that is not present, and returns how many it
    /// cleared. The leaf level's unmap loop: one present-count update per run.
    @inline(__always)
    func clearPresentRun(_ page: TablePageID, from index: Int, limit: Int) -> Int {
        let base = entryPointer(page, index)
        var n = 0
        while n < limit, base[n].load(ordering: .relaxed) & PTE.present != 0 {
            base[n].store(0, ordering: .releasing)
            n += 1
        }
        presentEntries[Int(page)] -= UInt16(truncatingIfNeeded: n)
        return n
    }

    @inline(__always)
    func isEmpty(_ page: TablePageID) -> Bool { presentEntries[Int(page)] == 0 }
}

/// Page-table entry encoding, modelled on hardware formats.
///
/// bit 0 present; bit 1 leaf (always set at the last level; at upper levels a block);
/// bit 2 read; bit 3 write; bits 12...51 the physical address of a leaf, or the child
/// table page id shifted left by 12 for a table entry.
enum PTE {
    static let present: UInt64 = 1 << 0
    static let leaf: UInt64 = 1 << 1
    static let read: UInt64 = 1 << 2
    static let write: UInt64 = 1 << 3
    static let addressMask: UInt64 = 0x000F_FFFF_FFFF_F000

    @inline(__always) static func leaf(phys: UInt64, prot: Protection) -> UInt64 {
        present | leaf | (prot.contains(.read) ? read : 0) | (prot.contains(.write) ? write : 0) | phys
    }

    @inline(__always) static func table(_ page: TablePageID) -> UInt64 {
        present | UInt64(page) << 12
    }

    @inline(__always) static func isPresent(_ e: UInt64) -> Bool { e & present != 0 }
    @inline(__always) static func isLeaf(_ e: UInt64) -> Bool { e & leaf != 0 }
    @inline(__always) static func child(_ e: UInt64) -> TablePageID { TablePageID(truncatingIfNeeded: e >> 12) }
    @inline(__always) static func phys(_ e: UInt64) -> UInt64 { e & addressMask }
    @inline(__always) static func prot(_ e: UInt64) -> Protection {
        Protection(rawValue: (e & read != 0 ? 1 : 0) | (e & write != 0 ? 2 : 0))
    }
}

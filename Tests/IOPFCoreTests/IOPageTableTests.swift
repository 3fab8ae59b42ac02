// I/O page table: map, translate, unmap returning what was really unmapped, and table
// pages that are freed only after the gather's sync.

import Testing
@testable import IOPFCore

@Suite(.timeLimit(.minutes(15))) struct IOPageTableTests {
    @Test func mapsAndTranslatesEachPageSize() throws {
        let t = IOPageTable()
        try t.map(iova: 0x1000, phys: 0xA000, size: 4 * KiB, prot: .read)
        try t.map(iova: 2 * MiB, phys: 6 * MiB, size: 2 * MiB, prot: .readWrite)
        try t.map(iova: GiB, phys: 3 * GiB, size: GiB, prot: .write)
        #expect(t.translate(0x1234) == Translation(phys: 0xA234, prot: .read, pageSize: .size4K))
        #expect(
            t.translate(2 * MiB + 0x5678) == Translation(phys: 6 * MiB + 0x5678, prot: .readWrite, pageSize: .size2M))
        #expect(t.translate(GiB + 12345) == Translation(phys: 3 * GiB + 12345, prot: .write, pageSize: .size1G))
        #expect(t.translate(0) == nil)
        #expect(t.translate(0x2000) == nil)
        #expect(t.translate(IOPageTable.iovaLimit) == nil)
    }

    /// `firstMapped` skips holes at every level and agrees with a page-by-page search.
    @Test func firstMappedFindsTheNextLeafAcrossHoles() throws {
        let t = IOPageTable()
        try t.map(iova: 0x5000, phys: 0x5000, size: 4 * KiB, prot: .read)
        try t.map(iova: 6 * MiB, phys: 6 * MiB, size: 2 * MiB, prot: .read)
        try t.map(iova: 3 * GiB, phys: 3 * GiB, size: GiB, prot: .read)
        try t.map(iova: 600 * GiB + 0x3000, phys: 0x3000, size: 4 * KiB, prot: .read)
        #expect(t.firstMapped(from: 0, end: GiB) == 0x5000)
        #expect(t.firstMapped(from: 0x5000, end: GiB) == 0x5000)
        #expect(t.firstMapped(from: 0x6000, end: GiB) == 6 * MiB)
        #expect(t.firstMapped(from: 7 * MiB, end: GiB) == 7 * MiB)  // inside a block
        #expect(t.firstMapped(from: 8 * MiB, end: 4 * GiB) == 3 * GiB)
        #expect(t.firstMapped(from: 8 * MiB, end: 2 * GiB) == 2 * GiB)  // none before end
        #expect(t.firstMapped(from: 4 * GiB, end: IOPageTable.iovaLimit) == 600 * GiB + 0x3000)
        #expect(t.firstMapped(from: 600 * GiB + 0x4000, end: IOPageTable.iovaLimit) == IOPageTable.iovaLimit)
        // Against a page-by-page search over the first 16 MiB.
        var rng = SeededGenerator(seed: 9)
        for _ in 0..<200 {
            let from = (rng.next() % 4096) << 12
            let end = from + (rng.next() % 1024) << 12
            var slow = from
            while slow < end && t.translate(slow) == nil { slow += 4096 }
            #expect(t.firstMapped(from: from, end: end) == slow, "from \(hex(from)) to \(hex(end))")
        }
    }

    @Test func mapPicksLargestPagesAlignmentAllows() throws {
        let t = IOPageTable()
        // 4 KiB below a 2 MiB boundary, then a 2 MiB block, then 4 KiB.
        try t.map(iova: 2 * MiB - 4 * KiB, phys: 10 * MiB - 4 * KiB, size: 2 * MiB + 8 * KiB, prot: .read)
        var leaves: [(UInt64, PageSize)] = []
        t.forEachLeaf { iova, tr in leaves.append((iova, tr.pageSize)) }
        #expect(leaves.map(\.0) == [2 * MiB - 4 * KiB, 2 * MiB, 4 * MiB])
        #expect(leaves.map(\.1) == [.size4K, .size2M, .size4K])
        // Misaligned physical address: 4 KiB leaves only.
        let u = IOPageTable()
        try u.map(iova: 2 * MiB, phys: 0x1000, size: 2 * MiB, prot: .read)
        var count = 0
        u.forEachLeaf { _, tr in
            count += 1; #expect(tr.pageSize == .size4K)
        }
        #expect(count == 512)
        // Page sizes can be restricted.
        let v = IOPageTable(pageSizes: [.size4K])
        try v.map(iova: 0, phys: 0, size: 2 * MiB, prot: .read)
        #expect(v.translate(0)?.pageSize == .size4K)
    }

    @Test func refusesBadInputAndChangesNothing() throws {
        let t = IOPageTable()
        #expect(throws: IOPageTableError.unaligned(iova: 0x800, phys: 0, size: 4096)) {
            try t.map(iova: 0x800, phys: 0, size: 4096, prot: .read)
        }
        #expect(throws: IOPageTableError.unaligned(iova: 0, phys: 0, size: 0)) {
            try t.map(iova: 0, phys: 0, size: 0, prot: .read)
        }
        #expect(throws: IOPageTableError.outOfRange(iova: IOPageTable.iovaLimit - 4096, size: 8192)) {
            try t.map(iova: IOPageTable.iovaLimit - 4096, phys: 0, size: 8192, prot: .read)
        }
        #expect(throws: IOPageTableError.noPermission(iova: 0)) {
            try t.map(iova: 0, phys: 0, size: 4096, prot: [])
        }
        try t.map(iova: 8 * MiB, phys: 0, size: 4 * KiB, prot: .read)
        let before = t.liveTablePages
        // Overlap at the far end: the first part is mapped then rolled back.
        let error = #expect(throws: IOPageTableError.self) {
            try t.map(iova: 8 * MiB - 64 * KiB, phys: 0x100000, size: 128 * KiB, prot: .read)
        }
        #expect(error?.description.contains("overlaps") == true)
        var leaves = 0
        t.forEachLeaf { _, _ in leaves += 1 }
        #expect(leaves == 1)
        #expect(t.translate(8 * MiB - 64 * KiB) == nil)
        #expect(t.liveTablePages == before)
        // A block over an existing 4 KiB leaf overlaps too.
        #expect(throws: IOPageTableError.self) { try t.map(iova: 8 * MiB, phys: 0, size: 2 * MiB, prot: .read) }
    }

    @Test func unmapReturnsWhatWasReallyUnmapped() throws {
        let t = IOPageTable()
        var g = IOTLBGather()
        try t.map(iova: 0, phys: 0, size: 16 * KiB, prot: .read)
        // Stops at the first hole: 4 pages mapped, 8 asked.
        #expect(t.unmap(iova: 0, size: 32 * KiB, gather: &g) == 16 * KiB)
        // A block reached at its first address goes whole: more than asked.
        try t.map(iova: 4 * MiB, phys: 4 * MiB, size: 2 * MiB, prot: .read)
        #expect(t.unmap(iova: 4 * MiB, size: 4 * KiB, gather: &g) == 2 * MiB)
        #expect(t.translate(4 * MiB + 1 * MiB) == nil)
        // Entered in its middle, a block cannot be split: nothing.
        try t.map(iova: 8 * MiB, phys: 8 * MiB, size: 2 * MiB, prot: .read)
        #expect(t.unmap(iova: 8 * MiB + 4 * KiB, size: 4 * KiB, gather: &g) == 0)
        #expect(t.translate(8 * MiB + 4 * KiB) != nil)
        // Unaligned or empty requests unmap nothing.
        #expect(t.unmap(iova: 8 * MiB + 1, size: 4 * KiB, gather: &g) == 0)
        #expect(t.unmap(iova: 8 * MiB, size: 100, gather: &g) == 0)
        #expect(t.unmap(iova: 8 * MiB, size: 0, gather: &g) == 0)
        #expect(t.translate(8 * MiB) != nil)
        t.sync(&g)
    }

    @Test func tablePagesAreFreedOnlyAfterSync() throws {
        let inv = RecordingInvalidator()
        let t = IOPageTable(invalidator: inv)
        try t.map(iova: 3 * GiB, phys: 0, size: 4 * KiB, prot: .read)
        #expect(t.liveTablePages == 4)  // root + three levels
        var g = IOTLBGather()
        #expect(t.unmap(iova: 3 * GiB, size: 4 * KiB, gather: &g) == 4 * KiB)
        // Unlinked but not freed: a walker or IOTLB may still hold them until the sync.
        #expect(t.liveTablePages == 4)
        #expect(g.freedPages.count == 3)
        // Mapping again before the sync must not reuse those pages.
        try t.map(iova: 5 * GiB, phys: 0, size: 4 * KiB, prot: .read)
        #expect(t.tablePageFrees == 0)
        #expect(t.tablePageAllocations == 7)
        // Pages are returned to the pool at the sync, after the devices were told.
        var freesSeenByDevice = -1
        inv.onInvalidate = { _ in freesSeenByDevice = t.tablePageFrees }
        t.sync(&g)
        #expect(freesSeenByDevice == 0)
        #expect(t.tablePageFrees == 3)
        #expect(t.liveTablePages == 4)
        #expect(inv.syncs == [[IOVARange(start: 3 * GiB, last: 3 * GiB + 4 * KiB - 1)]])
        #expect(t.reachableTablePages == t.liveTablePages)
    }

    @Test func linuxGatherSyncsEarlyOnDisjointRangeOrPageSizeChange() throws {
        let inv = RecordingInvalidator()
        let t = IOPageTable(invalidator: inv)
        try t.map(iova: 0, phys: 0, size: 16 * KiB, prot: .read)  // adjacent pages
        try t.map(iova: 1 * MiB, phys: 0, size: 4 * KiB, prot: .read)  // disjoint page
        try t.map(iova: 2 * MiB, phys: 2 * MiB, size: 2 * MiB, prot: .read)  // adjacent but 2 MiB
        var g = IOTLBGather(policy: .linux)
        #expect(t.unmap(iova: 0, size: 16 * KiB, gather: &g) == 16 * KiB)
        #expect(inv.syncs.isEmpty)  // adjacent pages joined
        #expect(t.unmap(iova: 1 * MiB, size: 4 * KiB, gather: &g) == 4 * KiB)
        #expect(inv.syncs.count == 1)  // disjoint: synced first
        #expect(t.unmap(iova: 2 * MiB, size: 2 * MiB, gather: &g) == 2 * MiB)
        #expect(inv.syncs.count == 2)  // page size changed (and adjacent): synced first
        t.sync(&g)
        #expect(inv.syncs.count == 3)
        #expect(inv.syncs[0] == [IOVARange(start: 0, last: 16 * KiB - 1)])
        #expect(inv.syncs[2] == [IOVARange(start: 2 * MiB, last: 4 * MiB - 1)])
        #expect(t.syncCount == 3)
    }

    @Test func rangeListGatherSyncsOnceForUpToNRanges() throws {
        let inv = RecordingInvalidator()
        let t = IOPageTable(invalidator: inv)
        for i in 0..<10 { try t.map(iova: UInt64(i) * MiB, phys: 0, size: 4 * KiB, prot: .read) }
        try t.map(iova: 20 * MiB, phys: 20 * MiB, size: 2 * MiB, prot: .read)
        var g = IOTLBGather(policy: .rangeList(maxRanges: 8))
        for i in 0..<8 { _ = t.unmap(iova: UInt64(i) * MiB, size: 4 * KiB, gather: &g) }
        _ = t.unmap(iova: 20 * MiB, size: 2 * MiB, gather: &g)  // a ninth range: sync first
        #expect(inv.syncs.count == 1)
        #expect(inv.syncs[0].count == 8)
        for i in 8..<10 { _ = t.unmap(iova: UInt64(i) * MiB, size: 4 * KiB, gather: &g) }
        t.sync(&g)
        #expect(inv.syncs.count == 2)
        #expect(inv.syncs[1].count == 3)
        // Ranges are merged when they touch, in any order.
        var h = IOTLBGather(policy: .rangeList(maxRanges: 4))
        h.add(IOVARange(start: 0x3000, last: 0x3fff), pageSize: 4096)
        h.add(IOVARange(start: 0x1000, last: 0x1fff), pageSize: 4096)
        h.add(IOVARange(start: 0x2000, last: 0x2fff), pageSize: 4096)
        #expect(h.ranges == [IOVARange(start: 0x1000, last: 0x3fff)])
    }

    @Test func syncWithNothingGatheredDoesNothing() {
        let inv = RecordingInvalidator()
        let t = IOPageTable(invalidator: inv)
        var g = IOTLBGather()
        #expect(t.unmap(iova: 0, size: 4 * KiB, gather: &g) == 0)
        t.sync(&g)
        #expect(inv.syncs.isEmpty && t.syncCount == 0)
    }
}

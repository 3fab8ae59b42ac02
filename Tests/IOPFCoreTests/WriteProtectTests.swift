// Write protection for dirty tracking: present
// writable leaves lose write permission with one gather and one sync, blocks whole, and
// a tracked page's first write gets it back without a sync.

import Testing
@testable import IOPFCore

@Suite(.timeLimit(.minutes(15))) struct WriteProtectTests {
    @Test func writableLeavesInTheRangeLoseWriteWithOneSync() throws {
        let t = IOPageTable()
        let inv = RecordingInvalidator()
        t.invalidator = inv
        try t.map(iova: 0x10_0000, phys: 0x8000_0000, size: 16 * KiB, prot: .readWrite)
        try t.map(iova: 0x10_4000, phys: 0x9000_0000, size: 4 * KiB, prot: .read)  // already read-only
        try t.map(iova: 0x20_0000, phys: 0xA000_0000, size: 4 * KiB, prot: .readWrite)  // outside the range
        var gather = IOTLBGather()
        let changed = t.writeProtect(iova: 0x10_1000, size: 0x8000, gather: &gather)
        #expect(changed == 3 * 4 * KiB, "pages 1-3 of the first mapping; the read-only page is left alone")
        t.sync(&gather)
        #expect(inv.syncs == [[IOVARange(start: 0x10_1000, last: 0x10_3FFF)]])
        #expect(t.translate(0x10_0000)?.prot == .readWrite)
        for p: UInt64 in 1...3 {
            #expect(
                t.translate(0x10_0000 + p * 4 * KiB)
                    == Translation(phys: 0x8000_0000 + p * 4 * KiB, prot: .read, pageSize: .size4K))
        }
        #expect(t.translate(0x10_4000)?.prot == .read)
        #expect(t.translate(0x20_0000)?.prot == .readWrite)
        // Again: nothing writable is left there, so nothing changes and nothing is synced.
        #expect(t.writeProtect(iova: 0x10_0000, size: 16 * KiB, gather: &gather) == 4 * KiB)
        t.sync(&gather)
        #expect(t.writeProtect(iova: 0x10_0000, size: 16 * KiB, gather: &gather) == 0)
        #expect(gather.isEmpty)
    }

    @Test func aBlockIsProtectedWholeAndRestoredWhole() throws {
        let t = IOPageTable()
        let inv = RecordingInvalidator()
        t.invalidator = inv
        try t.map(iova: 2 * MiB, phys: 8 * MiB, size: 2 * MiB, prot: .readWrite)
        var gather = IOTLBGather()
        // One page in the block's middle protects the whole block.
        #expect(t.writeProtect(iova: 3 * MiB, size: 4 * KiB, gather: &gather) == 2 * MiB)
        t.sync(&gather)
        #expect(inv.syncs == [[IOVARange(start: 2 * MiB, last: 4 * MiB - 1)]])
        #expect(t.translate(2 * MiB + 0x1234) == Translation(phys: 8 * MiB + 0x1234, prot: .read, pageSize: .size2M))
        #expect(t.restoreWrite(iova: 3 * MiB + 0x10) == 2 * MiB)
        #expect(t.translate(4 * MiB - 1)?.prot == .readWrite)
        #expect(inv.syncs.count == 1, "widening needs no sync")
    }

    @Test func restoreWriteTouchesOnlyItsLeaf() throws {
        let t = IOPageTable()
        try t.map(iova: 0x40_0000, phys: 0x7000_0000, size: 8 * KiB, prot: .readWrite)
        var gather = IOTLBGather()
        _ = t.writeProtect(iova: 0x40_0000, size: 8 * KiB, gather: &gather)
        t.sync(&gather)
        #expect(t.restoreWrite(iova: 0x40_1000) == 4 * KiB)
        #expect(t.translate(0x40_0000)?.prot == .read && t.translate(0x40_1000)?.prot == .readWrite)
        #expect(t.restoreWrite(iova: 0x50_0000) == 0, "nothing mapped there")
        #expect(t.translate(0x50_0000) == nil)
    }
}

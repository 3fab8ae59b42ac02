// DMA mapping table: VFIO type1 validation, lookups, whole-mapping unmap.

import Testing
@testable import IOPFCore

@Suite struct DMAMappingTableTests {
    @Test func validatesLikeType1() {
        var t = DMAMappingTable()
        #expect(throws: DMAMapError.zeroSize(iova: 0)) { try t.insert(iova: 0, vaddr: 0, size: 0, prot: .read) }
        #expect(throws: DMAMapError.unaligned(what: "size", value: 100)) { try t.insert(iova: 0, vaddr: 0, size: 100, prot: .read) }
        #expect(throws: DMAMapError.unaligned(what: "iova", value: 0x10)) { try t.insert(iova: 0x10, vaddr: 0, size: 4096, prot: .read) }
        #expect(throws: DMAMapError.unaligned(what: "vaddr", value: 0x10)) { try t.insert(iova: 0, vaddr: 0x10, size: 4096, prot: .read) }
        #expect(throws: DMAMapError.overflow(what: "iova", start: UInt64.max - 4095, size: 8192)) {
            try t.insert(iova: UInt64.max - 4095, vaddr: 0, size: 8192, prot: .read)
        }
        #expect(throws: DMAMapError.overflow(what: "vaddr", start: UInt64.max - 4095, size: 8192)) {
            try t.insert(iova: 0, vaddr: UInt64.max - 4095, size: 8192, prot: .read)
        }
        #expect(throws: DMAMapError.outOfIOVASpace(iova: 1 << 48, size: 4096)) {
            try t.insert(iova: 1 << 48, vaddr: 0, size: 4096, prot: .read)
        }
        #expect(throws: DMAMapError.noPermission(iova: 0)) { try t.insert(iova: 0, vaddr: 0, size: 4096, prot: []) }
        #expect(t.count == 0)
        let messages = [DMAMapError.zeroSize(iova: 0), .unaligned(what: "iova", value: 1), .entryLimit(limit: 3)].map(\.description)
        #expect(messages[0].contains("size is zero"))
        #expect(messages[1].contains("iova 0x1 is not a multiple of 4 KiB"))
        #expect(messages[2].contains("limit of 3"))
    }

    @Test func refusesOverlapAndHonoursEntryLimit() throws {
        var t = DMAMappingTable(entryLimit: 3)
        let a = try t.insert(iova: 0x10000, vaddr: 0x7000_0000, size: 0x4000, prot: .read)
        #expect(throws: DMAMapError.overlap(iova: 0x13000, size: 0x2000, existing: a.id, existingIOVA: 0x10000, existingSize: 0x4000)) {
            try t.insert(iova: 0x13000, vaddr: 0, size: 0x2000, prot: .read)
        }
        #expect(throws: DMAMapError.self) { try t.insert(iova: 0xF000, vaddr: 0, size: 0x2000, prot: .read) }
        // Adjacent on both sides is fine.
        _ = try t.insert(iova: 0xF000, vaddr: 0, size: 0x1000, prot: .read)
        _ = try t.insert(iova: 0x14000, vaddr: 0, size: 0x1000, prot: .read)
        #expect(throws: DMAMapError.entryLimit(limit: 3)) { try t.insert(iova: 0x100000, vaddr: 0, size: 0x1000, prot: .read) }
        #expect(t.count == 3)
    }

    @Test func findsByIOVAAndByHostRange() throws {
        var t = DMAMappingTable()
        let a = try t.insert(iova: 0x100000, vaddr: 0x5000_0000, size: 0x10000, prot: .read)
        let b = try t.insert(iova: 0x200000, vaddr: 0x5000_8000, size: 0x1000, prot: .read)  // aliases inside a
        let c = try t.insert(iova: 0x300000, vaddr: 0x6000_0000, size: 0x100000, prot: .read)
        #expect(t.mapping(containing: 0x100000) === a)
        #expect(t.mapping(containing: 0x10ffff) === a)
        #expect(t.mapping(containing: 0x110000) == nil)
        #expect(t.mapping(containing: 0x2000ff) === b)
        #expect(t.mapping(containing: 0x3fffff) === c)
        func host(_ s: UInt64, _ e: UInt64) -> [MappingID] {
            var ids: [MappingID] = []
            t.forEachMapping(overlappingHost: s, end: e) { ids.append($0.id) }
            return ids
        }
        #expect(Set(host(0x5000_8000, 0x5000_8001)) == [a.id, b.id])
        #expect(host(0x5000_9000, 0x5001_0000) == [a.id])
        #expect(host(0x5001_0000, 0x6000_0000) == [])
        #expect(host(0x6000_0000 + 0xfffff, 0x7000_0000) == [c.id])
        #expect(Set(host(0, .max)) == [a.id, b.id, c.id])
    }

    @Test func unmapMustCoverWholeMappings() throws {
        var t = DMAMappingTable()
        let a = try t.insert(iova: 0x10000, vaddr: 0, size: 0x4000, prot: .read)
        let b = try t.insert(iova: 0x20000, vaddr: 0, size: 0x4000, prot: .read)
        #expect(throws: DMAMapError.partialUnmap(iova: 0x11000, size: 0x20000, mapping: a.id, mappingIOVA: 0x10000, mappingSize: 0x4000)) {
            _ = try t.mappings(coveringWhole: 0x11000, size: 0x20000)
        }
        #expect(throws: DMAMapError.partialUnmap(iova: 0x10000, size: 0x11000, mapping: b.id, mappingIOVA: 0x20000, mappingSize: 0x4000)) {
            _ = try t.mappings(coveringWhole: 0x10000, size: 0x11000)
        }
        #expect(try t.mappings(coveringWhole: 0, size: 0x100000).map(\.id) == [a.id, b.id])
        #expect(try t.mappings(coveringWhole: 0x30000, size: 0x1000).isEmpty)
        t.remove(a)
        #expect(t.count == 1 && t.mapping(containing: 0x10000) == nil)
    }
}

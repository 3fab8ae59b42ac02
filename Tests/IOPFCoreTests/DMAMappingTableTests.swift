// DMA mapping table: VFIO type1 validation, lookups, whole-mapping unmap.

import Testing
@testable import IOPFCore

@Suite(.timeLimit(.minutes(15))) struct DMAMappingTableTests {
    @Test func validatesLikeType1() {
        var t = DMAMappingTable()
        #expect(throws: DMAMapError.zeroSize(iova: 0)) { try t.insert(iova: 0, vaddr: 0, size: 0, prot: .read) }
        #expect(throws: DMAMapError.unaligned(what: "size", value: 100)) {
            try t.insert(iova: 0, vaddr: 0, size: 100, prot: .read)
        }
        #expect(throws: DMAMapError.unaligned(what: "iova", value: 0x10)) {
            try t.insert(iova: 0x10, vaddr: 0, size: 4096, prot: .read)
        }
        #expect(throws: DMAMapError.unaligned(what: "vaddr", value: 0x10)) {
            try t.insert(iova: 0, vaddr: 0x10, size: 4096, prot: .read)
        }
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
        let messages = [DMAMapError.zeroSize(iova: 0), .unaligned(what: "iova", value: 1), .entryLimit(limit: 3)].map(
            \.description)
        #expect(messages[0].contains("size is zero"))
        #expect(messages[1].contains("iova 0x1 is not a multiple of 4 KiB"))
        #expect(messages[2].contains("limit of 3"))
    }

    @Test func refusesOverlapAndHonoursEntryLimit() throws {
        var t = DMAMappingTable(entryLimit: 3)
        let a = try t.insert(iova: 0x10000, vaddr: 0x7000_0000, size: 0x4000, prot: .read)
        #expect(
            throws: DMAMapError.overlap(
                iova: 0x13000, size: 0x2000, existing: a.id, existingIOVA: 0x10000, existingSize: 0x4000)
        ) {
            try t.insert(iova: 0x13000, vaddr: 0, size: 0x2000, prot: .read)
        }
        #expect(throws: DMAMapError.self) { try t.insert(iova: 0xF000, vaddr: 0, size: 0x2000, prot: .read) }
        // Adjacent on both sides is fine.
        _ = try t.insert(iova: 0xF000, vaddr: 0, size: 0x1000, prot: .read)
        _ = try t.insert(iova: 0x14000, vaddr: 0, size: 0x1000, prot: .read)
        #expect(throws: DMAMapError.entryLimit(limit: 3)) {
            try t.insert(iova: 0x100000, vaddr: 0, size: 0x1000, prot: .read)
        }
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

    /// The IOVA and host indexes against a brute-force scan, through random inserts, removals
    /// (one at a time and by span), address updates and queries: mappings of every size, aliased.
    @Test func hostIndexMatchesABruteForceScan() throws {
        var t = DMAMappingTable()
        var rng = SeededGenerator(seed: 7)
        var live: [DMAMapping] = []
        var nextIOVA: UInt64 = 0
        for step in 0..<3000 {
            switch rng.next() % 10 {
            case 0..<5:
                let pages = rng.next() % 4 == 0 ? 1 + rng.next() % 4096 : 1 + rng.next() % 8
                let vaddr = (rng.next() % 2048) << 12
                live.append(try t.insert(iova: nextIOVA, vaddr: vaddr, size: pages << 12, prot: .read))
                nextIOVA += (pages + 1) << 12
            case 5..<7 where !live.isEmpty:
                t.remove(live.remove(at: Int(rng.next() % UInt64(live.count))))
            case 7 where !live.isEmpty:
                let m = live[Int(rng.next() % UInt64(live.count))]
                t.updateHostAddress(m, to: (rng.next() % 2048) << 12)
            case 8 where live.count > 4:
                // The whole mappings inside an IOVA range, as an unmap removes them.
                let sorted = t.byIOVA
                let lo = Int(rng.next() % UInt64(sorted.count - 2))
                let (first, last) = (sorted[lo], sorted[lo + 2])
                let span = try t.mappings(coveringWhole: first.iova, size: last.iova + last.size - first.iova)
                #expect(span.map(\.id) == sorted[lo...(lo + 2)].map(\.id))
                t.remove(all: span)
                live.removeAll { m in span.contains { $0 === m } }
            default:
                break
            }
            let start = (rng.next() % 2100) << 12
            let end = start + (1 + rng.next() % 64) << 12
            var found: [MappingID] = []
            t.forEachMapping(overlappingHost: start, end: end) { found.append($0.id) }
            let expected = live.filter { $0.vaddr < end && $0.vaddrEnd > start }.map(\.id)
            #expect(Set(found) == Set(expected) && found.count == expected.count, "step \(step)")
            #expect(t.count == live.count)
            // By IOVA: the mapping holding an address, and the order.
            let address = rng.next() % max(nextIOVA, 1)
            #expect(t.mapping(containing: address)?.id == live.first { $0.contains(iova: address) }?.id, "step \(step)")
            #expect(t.byIOVA.map(\.id) == live.sorted { $0.iova < $1.iova }.map(\.id))
        }
    }

    /// A fault that raced a mapping's removal (the no-retry planted bug found this) must not
    /// put the removed mapping back into the active index.
    @Test func aRemovedMappingIsNeverMadeActive() throws {
        var t = DMAMappingTable()
        let m = try t.insert(iova: 0x10000, vaddr: 0x5000_0000, size: 0x1000, prot: .read)
        t.activate(m)
        t.remove(m)
        t.activate(m)
        var found = 0
        t.forEachMapping(overlappingHost: 0, end: .max, activeOnly: true) { _ in found += 1 }
        #expect(found == 0 && !m.isActive)
        let n = try t.insert(iova: 0x10000, vaddr: 0x5000_0000, size: 0x1000, prot: .read)
        t.remove(all: [n])
        t.activate(n)
        t.forEachMapping(overlappingHost: 0, end: .max, activeOnly: true) { _ in found += 1 }
        #expect(found == 0 && t.count == 0)
    }

    @Test func unmapMustCoverWholeMappings() throws {
        var t = DMAMappingTable()
        let a = try t.insert(iova: 0x10000, vaddr: 0, size: 0x4000, prot: .read)
        let b = try t.insert(iova: 0x20000, vaddr: 0, size: 0x4000, prot: .read)
        #expect(
            throws: DMAMapError.partialUnmap(
                iova: 0x11000, size: 0x20000, mapping: a.id, mappingIOVA: 0x10000, mappingSize: 0x4000)
        ) {
            _ = try t.mappings(coveringWhole: 0x11000, size: 0x20000)
        }
        #expect(
            throws: DMAMapError.partialUnmap(
                iova: 0x10000, size: 0x11000, mapping: b.id, mappingIOVA: 0x20000, mappingSize: 0x4000)
        ) {
            _ = try t.mappings(coveringWhole: 0x10000, size: 0x11000)
        }
        #expect(try t.mappings(coveringWhole: 0, size: 0x100000).map(\.id) == [a.id, b.id])
        #expect(try t.mappings(coveringWhole: 0x30000, size: 0x1000).isEmpty)
        t.remove(a)
        #expect(t.count == 1 && t.mapping(containing: 0x10000) == nil)
    }
}

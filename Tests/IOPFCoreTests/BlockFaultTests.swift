// 2 MiB mappings on fault: a fault where one huge page backs the aligned
// block maps it with one entry and sets its 512 bits; invalidating any page of it removes
// the whole block and clears the 512 bits together; anything that would make the block
// wrong (a page of it mapped, tracked, gone, outside the mapping, host misaligned, no
// huge page, an invalidation in flight) leaves the fault to a 4 KiB page.

import Synchronization
import Testing
@testable import IOPFCore

@Suite(.timeLimit(.minutes(15))) struct BlockFaultTests {
    static let host: UInt64 = 0x7f00_0000_0000
    static let iova: UInt64 = 0x1_0000_0000
    let memory = SimulatedHostMemory()
    let invalidator = RecordingInvalidator()

    func request(_ page: Int, write: Bool = false) -> PageRequest {
        PageRequest(
            flags: [.lastPage], deviceID: 1, groupIndex: 3, perm: write ? [.read, .write] : [.read],
            addr: Self.iova + UInt64(page) << 12, cookie: 1)
    }

    /// An engine mapping `blocks` 2 MiB blocks of huge host memory at `host`.
    func engine(blocks: Int = 2, host: UInt64 = host, huge: Bool = true) throws -> FaultEngine {
        var config = EngineConfiguration()
        config.blocksOnFault = true
        let e = FaultEngine(memory: memory, configuration: config)
        _ = try e.createDomain(invalidator: invalidator)
        let size = UInt64(blocks) * hugeBlockBytes
        if huge { memory.markHuge(host..<(host + size)) }
        try e.map(iova: Self.iova, vaddr: host, size: size, prot: .readWrite)
        return e
    }

    func mappedCount(_ e: FaultEngine, _ pages: Range<Int>) -> Int {
        pages.filter { e.isMarkedMapped(iova: Self.iova + UInt64($0) << 12) }.count
    }

    @Test func aFaultMapsItsHugeBlockWithOneEntry() throws {
        let e = try engine()
        let out = e.makeFaultHandler().handle([request(700, write: true)])
        #expect(out.code == .success && out.mapped == 1)
        #expect(e.statistics.blockMappings == 1 && e.statistics.mappedPages == 512)
        #expect(mappedCount(e, 512..<1024) == 512 && mappedCount(e, 0..<512) == 0)
        let table = e.pageTable(DomainID(rawValue: 0))
        var leaves: [PageSize] = []
        table.forEachLeaf { _, t in leaves.append(t.pageSize) }
        #expect(leaves == [.size2M])
        // Every page of the block translates to its own host page.
        for page in [512, 513, 700, 1023] {
            let t = try #require(table.translate(Self.iova + UInt64(page) << 12))
            #expect(t.phys == Self.host + UInt64(page) << 12 + memory.physicalOffset, "page \(page)")
        }
        #expect(e.checkInvariants(limit: 3).isEmpty)
    }

    @Test func invalidatingOnePageRemovesTheWholeBlockWithOneSync() throws {
        let e = try engine()
        _ = e.makeFaultHandler().handle([request(10)])
        let syncs = invalidator.syncs.count
        let out = try e.invalidate(hostAddress: Self.host + 300 << 12, length: 4096)
        #expect(out.pagesUnmapped == 512)
        #expect(mappedCount(e, 0..<1024) == 0)
        #expect(invalidator.syncs.count == syncs + 1)
        #expect(e.pageTable(DomainID(rawValue: 0)).translate(Self.iova) == nil)
        // The device re-faults: the block comes back whole.
        _ = e.makeFaultHandler().handle([request(20)])
        #expect(mappedCount(e, 0..<512) == 512 && e.statistics.blockMappings == 2)
        #expect(e.checkInvariants(limit: 3).isEmpty)
    }

    @Test func withoutAHugePageTheFaultMapsOnePage() throws {
        let e = try engine(huge: false)
        _ = e.makeFaultHandler().handle([request(5)])
        #expect(mappedCount(e, 0..<1024) == 1 && e.statistics.blockMappings == 0)
    }

    @Test func aBlockWithAPageAlreadyMappedIsLeftToPages() throws {
        let e = try engine()
        try e.premap(iova: Self.iova + 3 << 12, size: 4096, write: false)
        _ = e.makeFaultHandler().handle([request(5)])
        #expect(mappedCount(e, 0..<512) == 2 && e.statistics.blockMappings == 0)
        // The other block has nothing mapped: it still maps whole.
        _ = e.makeFaultHandler().handle([request(600)])
        #expect(mappedCount(e, 512..<1024) == 512 && e.statistics.blockMappings == 1)
    }

    @Test func aHostAddressNotAlignedLikeTheIOVAMapsPages() throws {
        let e = try engine(host: Self.host + 4096)
        _ = e.makeFaultHandler().handle([request(700)])
        #expect(mappedCount(e, 0..<1024) == 1 && e.statistics.blockMappings == 0)
    }

    @Test func aMappingThatEndsInsideTheBlockMapsPages() throws {
        var config = EngineConfiguration()
        config.blocksOnFault = true
        let e = FaultEngine(memory: memory, configuration: config)
        _ = try e.createDomain(invalidator: invalidator)
        memory.markHuge(Self.host..<(Self.host + 4 * hugeBlockBytes))
        try e.map(iova: Self.iova, vaddr: Self.host, size: hugeBlockBytes + 100 << 12, prot: .readWrite)
        _ = e.makeFaultHandler().handle([request(520)])
        #expect(mappedCount(e, 512..<612) == 1 && e.statistics.blockMappings == 0)
    }

    @Test func trackedAndGoneBlocksMapPages() throws {
        let e = try engine()
        try e.startDirtyTracking(iova: Self.iova, size: hugeBlockBytes)
        _ = e.makeFaultHandler().handle([request(7, write: true)])
        #expect(mappedCount(e, 0..<512) == 1 && e.statistics.blockMappings == 0)
        try e.invalidate(hostAddress: Self.host + 600 << 12, length: 4096, hostGone: true)
        _ = e.makeFaultHandler().handle([request(700)])
        #expect(mappedCount(e, 512..<1024) == 1 && e.statistics.blockMappings == 0)
    }

    /// An invalidation between resolve and install (here, of a page of the block) sends
    /// the group round again; the block is mapped only from the second, clean pass.
    @Test func anInvalidationInFlightRetriesTheBlock() throws {
        let e = try engine()
        let fired = Atomic<Int>(0)
        memory.setBeforeResolve { address, _ in
            if fired.add(1, ordering: .relaxed).oldValue == 0 {
                _ = try? e.invalidate(hostAddress: Self.host + 200 << 12, length: 4096)
            }
        }
        let out = e.makeFaultHandler().handle([request(100)])
        #expect(out.retries == 1 && out.code == .success)
        #expect(mappedCount(e, 0..<512) == 512 && e.statistics.blockMappings == 1)
        #expect(e.checkInvariants(limit: 3).isEmpty)
    }

    /// The background window over huge pages: a whole block in range becomes one entry,
    /// a block without a huge page and a part of a block become pages.
    @Test func backgroundWindowsMapWholeBlocks() throws {
        var config = EngineConfiguration()
        config.blocksOnFault = true
        let e = FaultEngine(memory: memory, configuration: config)
        _ = try e.createDomain(invalidator: invalidator)
        memory.markHuge(Self.host..<(Self.host + 2 * hugeBlockBytes))  // blocks 0 and 1; 2 and 3 are small pages
        try e.map(iova: Self.iova, vaddr: Self.host, size: 4 * hugeBlockBytes, prot: .readWrite)
        let h = e.makeFaultHandler()
        // From page 500: 12 pages of block 0, block 1 whole, block 2 whole (no huge page), 4 of block 3.
        let r = h.mapAhead(from: Self.iova + 500 << 12, pages: 12 + 512 + 512 + 4, write: true)
        #expect(r.mapped == 12 + 512 + 512 + 4 && !r.stopped)
        #expect(e.statistics.blockMappings == 1 && e.statistics.prefetchedPages == r.mapped)
        var leaves: [PageSize: Int] = [:]
        e.pageTable(DomainID(rawValue: 0)).forEachLeaf { _, t in leaves[t.pageSize, default: 0] += 1 }
        #expect(leaves == [.size2M: 1, .size4K: 12 + 512 + 4])
        #expect(mappedCount(e, 0..<2048) == r.mapped && e.checkInvariants(limit: 3).isEmpty)
    }

    /// Fault-around never maps ahead into a block it could map whole: the next block's
    /// fault still gets one entry.
    @Test func sequentialFaultsMapOneBlockEach() throws {
        let e = try engine(blocks: 4)
        let handler = e.makeFaultHandler()
        for block in 0..<4 {
            let out = handler.handle([request(block * 512 + 3, write: true)], ahead: 64)
            #expect(out.code == .success && out.prefetched == 0)
        }
        #expect(e.statistics.blockMappings == 4 && mappedCount(e, 0..<2048) == 2048)
    }
}

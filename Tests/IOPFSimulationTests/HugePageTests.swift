// 2 MiB mappings on fault over real memory: the probe tells a huge page from
// small ones, `--huge-pages` devices doing real DMA get one block per 2 MiB with every data
// check passing, invalidations inside blocks take the block whole, and the bench shows
// the groups saved. Needs root (the THP knob and PFNs in pagemap), as the suite does.

import Foundation
import Glibc
import Testing
@_spi(FaultInjection) @testable import IOPFCore
@testable import IOPFService
@testable import IOPFSimulation

@Suite(.serialized, .timeLimit(.minutes(15))) struct HugePageTests {
    /// Populates one page in the middle of each region's first block, then asks.
    @Test func theProbeTellsAHugePageFromSmallOnes() throws {
        _ = try HugePages.enableForShmem()
        let huge = try HostRegion(length: 4 << 20, alignment: 2 << 20, hugePages: true)
        let small = try HostRegion(length: 4 << 20, alignment: 2 << 20)
        let memory = ProcessMemory()
        var physical: [UInt64] = []
        // Nothing faulted in yet: no huge page to be found, and asking faults nothing in.
        #expect(memory.hugeBlock(at: huge.base) == nil)
        #expect(try huge.residentBytes() == 0)
        for region in [huge, small] {
            try memory.resolve(address: region.base + 300 << 12, pageCount: 1, write: true, physical: &physical)
        }
        #expect(memory.hugeBlock(at: huge.base) == huge.phys, "the first block of a THP region after one write")
        #expect(try huge.residentBytes() == 2 << 20, "the whole huge page is resident, the next block is not")
        #expect(memory.hugeBlock(at: huge.base + (2 << 20)) == nil)
        #expect(memory.hugeBlock(at: small.base) == nil, "4 KiB pages")
        #expect(memory.hugeBlock(at: huge.base + 4096) == nil, "not aligned")
        // MADV_DONTNEED only unmaps shmem: the huge page stays in the file and comes back whole.
        let page = UnsafeMutableRawPointer(bitPattern: UInt(huge.base + 8192))
        #expect(madvise(page, 4096, MADV_DONTNEED) == 0)
        try memory.resolve(address: huge.base + 8192, pageCount: 1, write: true, physical: &physical)
        #expect(memory.hugeBlock(at: huge.base) == huge.phys, "a shmem huge page after a 4 KiB MADV_DONTNEED")
        // A 4 KiB hole punched in it (MADV_REMOVE) splits it: no longer one block.
        #expect(madvise(page, 4096, MADV_REMOVE) == 0)
        try memory.resolve(address: huge.base + 8192, pageCount: 1, write: true, physical: &physical)
        #expect(memory.hugeBlock(at: huge.base) == nil, "a huge page split by a 4 KiB MADV_REMOVE")
    }

    /// Devices touching their memory in order map one block per 2 MiB, with random
    /// invalidations (4 KiB to 64 KiB) landing inside blocks all along; every DMA's data
    /// check passes and the engine's invariants hold at the end.
    @Test func devicesDoRealDMAThroughBlocks() throws {
        var o = ServeOptions()
        o.devices = 2
        o.memoryBytes = 16 << 20
        o.workload = .sequential
        o.operationsPerDevice = 4000
        o.invalidateInterval = 0.002
        o.invalidateMaxPages = 16
        o.spinNanoseconds = 20_000
        o.hugePages = true
        let r = try ServeSession.run(o)
        #expect(r.problems.isEmpty, "\(r.problems)")
        #expect(r.dmaErrors == 0 && r.integrityErrors == 0 && r.violations == 0)
        #expect(r.blockMappings >= 8, "16 MiB is 8 blocks, each mapped at least once: \(r.blockMappings)")
        #expect(
            r.invalidations > 0 && r.pagesUnmapped >= 512, "\(r.invalidations) invalidations, \(r.pagesUnmapped) pages")
        let json = try JSONSerialization.jsonObject(with: JSONEncoder().encode(r)) as! [String: Any]
        #expect(json["blockMappings"] as? Int == r.blockMappings)
    }

    /// The bench's huge-page row: one group per block on a sequential touch, 4 KiB
    /// invalidations inside blocks unmapping 512 pages each, against 4 KiB pages.
    @Test func benchRowsCompareBlocksWithPages() throws {
        let pages = try FaultAroundBench.measure(size: 16 << 20, pattern: .sequential, touch: 1, policy: .off)
        let blocks = try FaultAroundBench.measure(
            size: 16 << 20, pattern: .sequential, touch: 1, policy: .off, hugePages: true)
        #expect(pages.problems.isEmpty && blocks.problems.isEmpty, "\(pages.problems + blocks.problems)")
        #expect(pages.groups == 4096 / 32 && pages.blockMappings == 0 && pages.pagesUnmappedPer4K == 1)
        #expect(
            blocks.groups == 8 && blocks.blockMappings == 8, "\(blocks.groups) groups, \(blocks.blockMappings) blocks")
        #expect(blocks.pagesUnmappedPer4K == 512)
        #expect(blocks.residentBytes == 16 << 20)
        // With adaptive fault-around, blocks go ahead in the background: far fewer groups.
        let around = try FaultAroundBench.measure(
            size: 64 << 20, pattern: .sequential, touch: 1, policy: .adaptive,
            hugePages: true)
        #expect(around.problems.isEmpty, "\(around.problems)")
        #expect(around.blockMappings == 32 && around.groups <= 16, "\(around.groups) groups for 32 blocks")
        #expect(around.prefetchedPages >= 8 * 512 && around.residentBytes == 64 << 20)
    }

    /// The stress tool over huge pages: blocks are mapped, invalidated inside and taken
    /// away under host churn with no violation; clear-requested (bits cleared by the size
    /// asked, not by the block really unmapped) is caught.
    @Test func stressOverBlocksIsCleanAndCatchesClearRequested() throws {
        var o = StressOptions()
        o.seconds = 3
        o.hugePages = true
        o.dirtyLogInterval = nil
        let clean = try StressSession.run(o)
        #expect(clean.violations == 0, "\(clean.firstViolation ?? "")")
        #expect(
            clean.blockMappings > 10 && clean.invalidations > 10,
            "\(clean.blockMappings) blocks, \(clean.invalidations) invalidations")
        o.injected = .clearRequested
        let planted = try StressSession.run(o)
        #expect(planted.violations > 0 && planted.blockMappings > 0)
    }
}

// The pinned path (VFIO type1 semantics): batches, accounting, runs, and failure that
// leaves nothing behind (seeds 000, 001, 002).

import Testing
@testable import IOPFCore

@Suite(.timeLimit(.minutes(15))) struct PinnedMappingTests {
    static let host: UInt64 = 0x7000_0000_0000  // 2 MiB aligned, so are its physical addresses

    func engine(limitPages: Int = .max, bypass: Bool = false) throws -> (FaultEngine, SimulatedHostMemory) {
        let memory = SimulatedHostMemory()
        var c = EngineConfiguration()
        c.lockedMemoryLimit = limitPages == .max ? .max : UInt64(limitPages) << 12
        c.bypassesLockedMemoryLimit = bypass
        let e = FaultEngine(memory: memory, configuration: c)
        _ = try e.createDomain(invalidator: RecordingInvalidator())
        return (e, memory)
    }

    @Test func accountingIsExactOverMapUnmapCycles() throws {
        let (e, memory) = try engine()
        for round in 1...3 {
            let (_, s) = try e.mapPinned(iova: 1 << 30, vaddr: Self.host, size: 4 * MiB, prot: .readWrite)
            #expect(s.pinnedPages == 1024 && s.chargedPages == 1024)
            #expect(e.lockedMemory.lockedPages == 1024, "round \(round)")
            #expect(memory.pinnedPageCount == 1024)
            #expect(e.mappedPageCount == 1024)
            #expect(e.checkInvariants().isEmpty)
            try e.unmap(iova: 1 << 30, size: 4 * MiB)
            #expect(e.lockedMemory.lockedPages == 0 && memory.pinnedPageCount == 0 && e.mappedPageCount == 0)
        }
    }

    @Test func contiguousMemoryIsMappedWithTheFewestCallsAndBlocks() throws {
        let (e, _) = try engine()
        let (_, s) = try e.mapPinned(iova: 1 << 30, vaddr: Self.host, size: 4 * MiB + 8 * KiB, prot: .read)
        #expect(s.mapCalls == 1)  // one run across batches: 1026 pages in 3 batches
        let t = e.pageTable(DomainID(rawValue: 0))
        #expect(t.translate(1 << 30)?.pageSize == .size2M)
        #expect(t.translate((1 << 30) + 4 * MiB)?.pageSize == .size4K)
        #expect(
            t.translate((1 << 30) + 4 * MiB + 4096)?.phys == Self.host + 4 * MiB + 4096
                + SimulatedHostMemory().physicalOffset)
    }

    @Test func deviceMemoryIsMappedButNeverCharged() throws {
        let (e, memory) = try engine()
        memory.markDeviceMemory(Self.host + 64 * KiB..<Self.host + 128 * KiB, phys: 0xF0_0000_0000)
        let (_, s) = try e.mapPinned(iova: 1 << 30, vaddr: Self.host, size: 256 * KiB, prot: .readWrite)
        #expect(s.chargedPages == 48 && e.lockedMemory.lockedPages == 48)
        #expect(s.mapCalls == 3)  // normal, device, normal: a run ends where the kind changes
        #expect(e.pageTable(DomainID(rawValue: 0)).translate((1 << 30) + 64 * KiB)?.phys == 0xF0_0000_0000)
        #expect(e.checkInvariants().isEmpty)
        try e.unmap(iova: 1 << 30, size: 256 * KiB)
        #expect(e.lockedMemory.lockedPages == 0)
    }

    @Test func alternatingPageKindsNeverReuseAStaleBatchEntry() throws {
        // Seed 000: after a pinned -> pfnmap transition a stale batch entry was reused.
        let (e, memory) = try engine()
        let pages = 1500  // three batches, with the kind changing on every page
        for p in stride(from: 1, to: pages, by: 2) {
            let a = Self.host + UInt64(p) << 12
            memory.markDeviceMemory(a..<a + 4096, phys: 0xE0_0000_0000 + UInt64(p) << 20)
        }
        let (_, s) = try e.mapPinned(iova: 1 << 32, vaddr: Self.host, size: UInt64(pages) << 12, prot: .read)
        #expect(s.mapCalls == pages)
        #expect(s.chargedPages == pages / 2)
        let t = e.pageTable(DomainID(rawValue: 0))
        for p in 0..<pages {
            let expected =
                p % 2 == 1 ? 0xE0_0000_0000 + UInt64(p) << 20 : Self.host + UInt64(p) << 12 + memory.physicalOffset
            guard t.translate((1 << 32) + UInt64(p) << 12)?.phys == expected else {
                Issue.record(
                    """
                    page \(p) translates to \(String(describing: t.translate((1 << 32) + UInt64(p) << 12))), \
                    expected \(expected)
                    """
                )
                return
            }
        }
    }

    @Test func overTheLimitFailsClearlyAndLeavesNothing() throws {
        let (e, memory) = try engine(limitPages: 700)
        let error = #expect(throws: PinError.self) {
            try e.mapPinned(iova: 1 << 30, vaddr: Self.host, size: 4 * MiB, prot: .readWrite)
        }
        #expect(error?.description.contains("RLIMIT_MEMLOCK") == true)
        #expect(error?.description.contains("released") == true)
        #expect(e.lockedMemory.lockedPages == 0 && memory.pinnedPageCount == 0)
        #expect(e.mappingCount == 0 && e.mappedPageCount == 0)
        #expect(e.pageTable(DomainID(rawValue: 0)).translate(1 << 30) == nil)
        #expect(e.checkInvariants().isEmpty)
        // CAP_IPC_LOCK lifts the limit.
        let (privileged, _) = try engine(limitPages: 700, bypass: true)
        try privileged.mapPinned(iova: 1 << 30, vaddr: Self.host, size: 4 * MiB, prot: .readWrite)
        #expect(privileged.lockedMemory.lockedPages == 1024)
    }

    @Test func aPinFailureMidwayReleasesEverythingPinnedSoFar() throws {
        let (e, memory) = try engine()
        memory.markUnresolvable(Self.host + 3 * MiB..<Self.host + 4 * MiB)
        #expect(throws: PinError.self) { try e.mapPinned(iova: 1 << 30, vaddr: Self.host, size: 4 * MiB, prot: .read) }
        #expect(e.lockedMemory.lockedPages == 0 && memory.pinnedPageCount == 0 && e.mappingCount == 0)
        #expect(e.checkInvariants().isEmpty)
    }

    @Test func twoThreadsMappingConcurrentlyNeverExceedTheLimit() async throws {
        let (e, memory) = try engine(limitPages: 1500)
        let results = await withTaskGroup(of: Bool.self) { group in
            for k in 0..<2 {
                group.addTask {
                    (try? e.mapPinned(
                        iova: UInt64(k + 1) << 32, vaddr: Self.host + UInt64(k) << 30, size: 4 * MiB, prot: .read))
                        != nil
                }
            }
            return await group.reduce(into: [Bool]()) { $0.append($1) }
        }
        #expect(results.filter { $0 }.count == 1)
        #expect(e.lockedMemory.lockedPages == 1024 && memory.pinnedPageCount == 1024)
        #expect(e.checkInvariants().isEmpty)
    }

    @Test func pinnedPagesIgnoreHostEventsAndFaultsOnThemAreSpurious() throws {
        let (e, _) = try engine()
        try e.mapPinned(iova: 1 << 30, vaddr: Self.host, size: 64 * KiB, prot: .readWrite)
        #expect(try e.invalidate(hostAddress: Self.host, length: 64 * KiB).pagesUnmapped == 0)
        #expect(e.pageTable(DomainID(rawValue: 0)).translate(1 << 30) != nil)
        let out = e.makeFaultHandler().handle([
            PageRequest(flags: .lastPage, deviceID: 1, groupIndex: 0, perm: .read, addr: 1 << 30, cookie: 1)
        ])
        #expect(out.code == .success && out.spurious == 1)
    }
}

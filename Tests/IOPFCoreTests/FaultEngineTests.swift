// Fault and invalidation handling: the answers, the mappings they leave behind, the
// sequence retry, and the the review of the 2021 VFIO IOPF MMU-notifier patch review points.

import Synchronization
import Testing
@testable import IOPFCore

@Suite(.timeLimit(.minutes(15))) struct FaultEngineTests {
    static let host: UInt64 = 0x7f00_0000_0000
    let memory = SimulatedHostMemory()

    func request(_ addr: UInt64, write: Bool = false, last: Bool = true, cookie: UInt32 = 1) -> PageRequest {
        PageRequest(
            flags: last ? [.lastPage] : [], deviceID: 1, groupIndex: 3, perm: write ? [.read, .write] : [.read],
            addr: addr, cookie: cookie)
    }

    func engine(domains: Int = 1, policy: GatherPolicy = .defaultRangeList) throws -> (
        FaultEngine, [RecordingInvalidator]
    ) {
        var config = EngineConfiguration()
        config.gatherPolicy = policy
        let e = FaultEngine(memory: memory, configuration: config)
        let invs = (0..<domains).map { _ in RecordingInvalidator() }
        for inv in invs { _ = try e.createDomain(invalidator: inv) }
        return (e, invs)
    }

    @Test func faultMapsThePageInEveryDomainAndSetsItsBit() throws {
        let (e, _) = try engine(domains: 2)
        try e.map(iova: 0x100000, vaddr: Self.host, size: 64 * KiB, prot: .readWrite)
        let h = e.makeFaultHandler()
        let out = h.handle([request(0x103abc, write: true)])
        #expect(out == GroupOutcome(code: .success, mapped: 1, spurious: 0, retries: 0))
        for d in 0..<2 {
            #expect(
                e.pageTable(DomainID(rawValue: d)).translate(0x103abc)
                    == Translation(
                        phys: Self.host + 0x3abc + memory.physicalOffset, prot: .readWrite, pageSize: .size4K))
        }
        #expect(e.isMarkedMapped(iova: 0x103000))
        #expect(!e.isMarkedMapped(iova: 0x104000))
        // Faulting it again is spurious: SUCCESS, nothing resolved.
        let calls = memory.resolveCalls
        #expect(h.handle([request(0x103000)]) == GroupOutcome(code: .success, mapped: 0, spurious: 1, retries: 0))
        #expect(memory.resolveCalls == calls)
        #expect(e.checkInvariants().isEmpty)
    }

    /// What one IOTLB entry of a translating device can name: the mapped run around a
    /// page, clipped to the window and the mapping, at its first page's physical address.
    @Test func mappedRunIsTheContiguousMappedPagesAroundAPage() throws {
        let (e, _) = try engine()
        try e.map(iova: 0x100000, vaddr: Self.host, size: 64 * KiB, prot: .readWrite)
        let d = DomainID(rawValue: 0)
        #expect(e.mappedRun(domain: d, around: 0x104000, within: 0..<(1 << 40)) == nil)
        let h = e.makeFaultHandler()
        for page in [3, 4, 5, 6, 9] { _ = h.handle([request(0x100000 + UInt64(page) << 12)]) }
        let run = try #require(e.mappedRun(domain: d, around: 0x105123, within: 0..<(1 << 40)))
        #expect(run.range == 0x103000..<0x107000 && run.prot == .readWrite)
        #expect(run.phys == Self.host + 0x3000 + memory.physicalOffset)
        let clipped = try #require(e.mappedRun(domain: d, around: 0x105000, within: 0x104000..<0x106000))
        #expect(clipped.range == 0x104000..<0x106000 && clipped.phys == Self.host + 0x4000 + memory.physicalOffset)
        #expect(e.mappedRun(domain: d, around: 0x109000, within: 0..<(1 << 40))?.range == 0x109000..<0x10A000)
        _ = try e.invalidate(hostAddress: Self.host + 0x4000, length: 4096)
        #expect(e.mappedRun(domain: d, around: 0x105000, within: 0..<(1 << 40))?.range == 0x105000..<0x107000)
        #expect(e.mappedRun(domain: d, around: 0x104000, within: 0..<(1 << 40)) == nil)
    }

    @Test func badRequestsAreAnsweredInvalid() throws {
        let (e, _) = try engine()
        try e.map(iova: 0x100000, vaddr: Self.host, size: 16 * KiB, prot: .read)
        try e.map(iova: 0x200000, vaddr: Self.host, size: 16 * KiB, prot: .write)
        let h = e.makeFaultHandler()
        #expect(h.handle([request(0x900000)]).code == .invalid)  // no mapping
        #expect(h.handle([request(0x100000, write: true)]).code == .invalid)  // write to read-only
        #expect(h.handle([request(0x200000)]).code == .invalid)  // read of write-only
        let s = e.statistics
        #expect(s.noMapping == 1 && s.permissionDenied == 2 && s.invalidGroups == 3 && s.mappedPages == 0)
        memory.markUnresolvable(Self.host + 0x2000..<Self.host + 0x3000)
        #expect(h.handle([request(0x102000)]).code == .invalid)
        #expect(e.statistics.resolveFailures == 1)
        #expect(!e.isMarkedMapped(iova: 0x102000))
        #expect(e.checkInvariants().isEmpty)
    }

    @Test func oneAnswerPerGroupAndOneResolvePerContiguousRun() throws {
        let (e, _) = try engine()
        try e.map(iova: 0x100000, vaddr: Self.host, size: 64 * KiB, prot: .readWrite)
        let h = e.makeFaultHandler()
        let group = (0..<4).map { request(0x100000 + UInt64($0) * 4096, last: $0 == 3) } + [request(0x10a000)]
        let out = h.handle(group)
        #expect(out.code == .success && out.mapped == 5)
        #expect(memory.resolveCalls == 2)  // pages 0-3 in one call, page 10 in another
        // One bad request makes the whole group INVALID; the good pages stay mapped.
        let bad = h.handle([request(0x10b000), request(0x999000)])
        #expect(bad.code == .invalid && bad.mapped == 1)
        #expect(e.isMarkedMapped(iova: 0x10b000))
        #expect(e.checkInvariants().isEmpty)
    }

    /// Several groups in one call: each gets its own answer (a bad request fails only its
    /// group), contiguous pages across groups resolve in one call, the stats count groups.
    @Test func aBatchAnswersEachGroupAndResolvesRunsAcrossGroups() throws {
        let (e, _) = try engine()
        try e.map(iova: 0x100000, vaddr: Self.host, size: 64 * KiB, prot: .readWrite)
        let h = e.makeFaultHandler()
        _ = h.handle([request(0x105000)])  // mapped already: spurious in the batch
        let calls = memory.resolveCalls
        let requests = [
            request(0x100000, last: false), request(0x101000),  // group 0: pages 0, 1
            request(0x102000, write: true),  // group 1: page 2
            request(0x900000),  // group 2: no mapping
            request(0x103000), request(0x105000),
        ]  // group 3: page 3, and 5 (spurious)
        var answers: [GroupOutcome] = []
        h.handle(batch: requests, ends: [2, 3, 4, 6]) { answers = Array($0) }
        #expect(answers.map(\.code) == [.success, .success, .invalid, .success])
        #expect(answers.map(\.mapped) == [2, 1, 0, 1] && answers[3].spurious == 1)
        #expect(memory.resolveCalls == calls + 3, "pages 0-1 (read), 2 (write), 3 (read): three runs")
        #expect((0..<4).allSatisfy { e.isMarkedMapped(iova: 0x100000 + UInt64($0) << 12) })
        let stats = e.statistics
        #expect(stats.groups == 5 && stats.successGroups == 4 && stats.invalidGroups == 1 && stats.requests == 7)
        #expect(e.checkInvariants().isEmpty)
    }

    /// A batch whose resolve meets an invalidation is retried whole, every group with it.
    @Test func aBatchIsRetriedWholeAcrossAnInvalidation() throws {
        let (e, _) = try engine()
        try e.map(iova: 0x100000, vaddr: Self.host, size: 64 * KiB, prot: .readWrite)
        let fired = Atomic<Bool>(false)
        let engineRef = e
        memory.setBeforeResolve { _, _ in
            if !fired.exchange(true, ordering: .relaxed) {
                _ = try? engineRef.invalidate(hostAddress: Self.host + 0x1000, length: 4096, hostGone: true)
            }
        }
        var answers: [GroupOutcome] = []
        e.makeFaultHandler().handle(batch: [request(0x100000), request(0x101000), request(0x102000)], ends: [1, 2, 3]) {
            answers = Array($0)
        }
        memory.setBeforeResolve(nil)
        #expect(answers.map(\.code) == [.success, .invalid, .success], "page 1 went away before install")
        #expect(answers.allSatisfy { $0.retries == 1 })
        #expect(!e.isMarkedMapped(iova: 0x101000) && e.checkInvariants().isEmpty)
    }

    @Test func anInvalidationDuringResolveForcesARetry() throws {
        let (e, _) = try engine()
        try e.map(iova: 0x100000, vaddr: Self.host, size: 64 * KiB, prot: .readWrite)
        let h = e.makeFaultHandler()
        // The host takes the page away between resolve and install, and the notifier runs.
        let fired = LockedFlag()
        memory.setBeforeResolve { [memory] address, _ in
            guard fired.setOnce() else { return }
            memory.markUnresolvable(address..<address + 4096)
            _ = try? e.invalidate(hostAddress: address, length: 4096)
        }
        let out = h.handle([request(0x101000)])
        // Without the sequence check the stale translation would be installed and answered SUCCESS.
        #expect(out.retries == 1)
        #expect(out.code == .invalid)
        #expect(!e.isMarkedMapped(iova: 0x101000))
        #expect(e.pageTable(DomainID(rawValue: 0)).translate(0x101000) == nil)
        #expect(e.statistics.retries == 1)
    }

    @Test func invalidationUnmapsRunsWithOneSyncPerDomain() throws {
        let (e, invs) = try engine(domains: 2)
        try e.map(iova: 0x100000, vaddr: Self.host, size: 4 * MiB, prot: .readWrite)
        let h = e.makeFaultHandler()
        for p in Array(0..<100) + Array(200..<300) + [1000] {
            #expect(h.handle([request(0x100000 + UInt64(p) * 4096)]).code == .success)
        }
        // Invalidate pages 50..<250 (host range, unaligned edges widen to whole pages).
        let out = try e.invalidate(hostAddress: Self.host + 50 * 4096 + 17, length: 200 * 4096 - 20)
        #expect(out.pagesUnmapped == 100)
        for inv in invs {
            #expect(inv.syncs.count == 1)
            #expect(
                inv.syncs[0] == [
                    IOVARange(start: 0x100000 + 50 * 4096, last: 0x100000 + 100 * 4096 - 1),
                    IOVARange(start: 0x100000 + 200 * 4096, last: 0x100000 + 250 * 4096 - 1),
                ])
        }
        #expect(e.isMarkedMapped(iova: 0x100000 + 49 * 4096))
        #expect(!e.isMarkedMapped(iova: 0x100000 + 50 * 4096))
        #expect(e.pageTable(DomainID(rawValue: 1)).translate(0x100000 + 249 * 4096) == nil)
        #expect(e.pageTable(DomainID(rawValue: 1)).translate(0x100000 + 250 * 4096) != nil)
        #expect(e.mappedPageCount == 101)
        #expect(e.invalidationSequence == 2)
        #expect(e.checkInvariants().isEmpty)
        // The device re-faults what was taken.
        #expect(h.handle([request(0x100000 + 60 * 4096)]).mapped == 1)
    }

    @Test func linuxPolicySyncsPerDisjointRun() throws {
        let (e, invs) = try engine(domains: 1, policy: .linux)
        try e.map(iova: 0, vaddr: Self.host, size: 1 * MiB, prot: .read)
        let h = e.makeFaultHandler()
        for p in stride(from: 0, to: 64, by: 2) { _ = h.handle([request(UInt64(p) * 4096)]) }
        try e.invalidate(hostAddress: Self.host, length: 1 * MiB)
        #expect(invs[0].syncs.count == 32)
    }

    @Test func aliasedHostMemoryIsInvalidatedInEveryMapping() throws {
        let (e, _) = try engine()
        try e.map(iova: 0x100000, vaddr: Self.host, size: 64 * KiB, prot: .read)
        try e.map(iova: 0x900000, vaddr: Self.host + 32 * KiB, size: 64 * KiB, prot: .read)
        let h = e.makeFaultHandler()
        _ = h.handle([request(0x108000)])  // host + 32 KiB via the first mapping
        _ = h.handle([request(0x900000)])  // the same host page via the second
        let out = try e.invalidate(hostAddress: Self.host + 32 * KiB, length: 4096)
        #expect(out.mappingsTouched == 2 && out.pagesUnmapped == 2)
        #expect(e.mappedPageCount == 0)
    }

    @Test func unmapMoreThanAskedClearsMoreAndTheDeviceRefaults() throws {
        // Seed 003: a block reached from inside goes whole; bits follow what was really unmapped.
        let (e, invs) = try engine(domains: 1)
        try e.map(iova: 4 * MiB, vaddr: Self.host, size: 8 * MiB, prot: .readWrite)
        #expect(try e.premap(iova: 6 * MiB, size: 2 * MiB, write: true) == 512)
        let table = e.pageTable(DomainID(rawValue: 0))
        #expect(table.translate(6 * MiB)?.pageSize == .size2M)
        // A domain created now gets the same pages replayed as 4 KiB leaves.
        let d1 = try e.createDomain(invalidator: RecordingInvalidator())
        #expect(e.pageTable(d1).translate(7 * MiB)?.pageSize == .size4K)
        #expect(e.checkInvariants().isEmpty)
        // Invalidate one page in the middle of the block: the whole block goes, in both domains.
        let host7M = Self.host + 3 * MiB
        let out = try e.invalidate(hostAddress: host7M, length: 4096)
        #expect(out.pagesUnmapped == 512)
        #expect(table.translate(6 * MiB) == nil && table.translate(8 * MiB - 4096) == nil)
        #expect(e.pageTable(d1).translate(6 * MiB) == nil)
        #expect(e.mappedPageCount == 0)
        #expect(invs[0].syncs == [[IOVARange(start: 6 * MiB, last: 8 * MiB - 1)]])
        #expect(e.checkInvariants().isEmpty)
        #expect(e.makeFaultHandler().handle([request(6 * MiB + 8192)]).mapped == 1)
        #expect(table.translate(6 * MiB + 8192)?.pageSize == .size4K)
        #expect(e.checkInvariants().isEmpty)
    }

    @Test func unmapLessThanAskedKeepsBitsForWhatStayed() throws {
        // An invalidation that ends inside a block cannot stop there: the block is widened
        // to and removed whole, and only then are bits cleared.
        let (e, _) = try engine()
        try e.map(iova: 2 * MiB, vaddr: Self.host, size: 4 * MiB, prot: .read)
        try e.premap(iova: 2 * MiB, size: 4 * MiB, write: false)
        #expect(e.mappedPageCount == 1024)
        let out = try e.invalidate(hostAddress: Self.host + 2 * MiB - 4096, length: 8192)  // straddles both blocks
        #expect(out.pagesUnmapped == 1024)
        #expect(e.checkInvariants().isEmpty)
    }

    @Test func dmaUnmapRemovesWholeMappingsOnly() throws {
        let (e, invs) = try engine()
        try e.map(iova: 0x100000, vaddr: Self.host, size: 64 * KiB, prot: .read)
        let h = e.makeFaultHandler()
        _ = h.handle([request(0x100000), request(0x10f000)])
        #expect(throws: DMAMapError.self) { try e.unmap(iova: 0x100000, size: 32 * KiB) }
        #expect(e.mappedPageCount == 2 && e.mappingCount == 1)
        #expect(try e.unmap(iova: 0, size: 16 * MiB) == 64 * KiB)
        #expect(e.mappingCount == 0)
        #expect(invs[0].syncs.count == 1)
        #expect(e.pageTable(DomainID(rawValue: 0)).translate(0x10f000) == nil)
        #expect(h.handle([request(0x100000)]).code == .invalid)
        #expect(e.checkInvariants().isEmpty)
    }

    @Test func updatingTheHostAddressDropsOldTranslations() throws {
        let (e, _) = try engine()
        try e.map(iova: 0x100000, vaddr: Self.host, size: 16 * KiB, prot: .read)
        let h = e.makeFaultHandler()
        _ = h.handle([request(0x101000)])
        try e.updateHostAddress(iova: 0x100000, size: 16 * KiB, vaddr: Self.host + GiB)
        #expect(e.mappedPageCount == 0)
        _ = h.handle([request(0x101000)])
        #expect(
            e.pageTable(DomainID(rawValue: 0)).translate(0x101000)?.phys == Self.host + GiB + 0x1000
                + memory.physicalOffset)
        // The old host range no longer touches this mapping.
        #expect(try e.invalidate(hostAddress: Self.host, length: 16 * KiB).mappingsTouched == 0)
        #expect(e.checkInvariants().isEmpty)
    }

    @Test func hostGonePagesAnswerInvalidUntilTheHostAddressIsUpdated() throws {
        let (e, _) = try engine()
        try e.map(iova: 0x100000, vaddr: Self.host, size: 16 * KiB, prot: .read)
        let h = e.makeFaultHandler()
        _ = h.handle([request(0x100000), request(0x101000)])
        let out = try e.invalidate(hostAddress: Self.host + 4096, length: 8192, hostGone: true)
        #expect(out.pagesUnmapped == 1)
        #expect(h.handle([request(0x101000)]).code == .invalid)
        #expect(h.handle([request(0x102000)]).code == .invalid)
        #expect(h.handle([request(0x103000)]).code == .success)
        #expect(e.statistics.hostGoneFaults == 2)
        try e.updateHostAddress(iova: 0x100000, size: 16 * KiB, vaddr: Self.host)
        #expect(h.handle([request(0x101000)]).code == .success)
        #expect(throws: DMAMapError.noSuchMapping(iova: 0x100000, size: 8 * KiB)) {
            try e.updateHostAddress(iova: 0x100000, size: 8 * KiB, vaddr: Self.host)
        }
    }

    @Test func uncoveredHostRangesSubtractLiveMappings() throws {
        let (e, _) = try engine()
        try e.map(iova: 0x100000, vaddr: 0x10000, size: 0x4000, prot: .read)
        try e.map(iova: 0x200000, vaddr: 0x12000, size: 0x4000, prot: .read)
        #expect(e.uncoveredHostRanges(0x8000..<0x20000) == [0x8000..<0x10000, 0x16000..<0x20000])
        #expect(e.uncoveredHostRanges(0x11000..<0x15000) == [])
        #expect(e.uncoveredHostRanges(0x30000..<0x31000) == [0x30000..<0x31000])
    }

    @Test func anUnmapThatFailsStopsTheEngine() throws {
        let (e, _) = try engine()
        try e.map(iova: 0x100000, vaddr: Self.host, size: 16 * KiB, prot: .read)
        let h = e.makeFaultHandler()
        _ = h.handle([request(0x100000)])
        e.pageTable(DomainID(rawValue: 0)).testsOnly_refuseUnmap = true
        let error = #expect(throws: FatalInvalidationError.self) {
            try e.invalidate(hostAddress: Self.host, length: 4096)
        }
        #expect(error?.description.contains("would keep access") == true)
        #expect(e.failure != nil)
        #expect(h.handle([request(0x101000)]).code == .invalid)
        #expect(throws: FatalInvalidationError.self) { try e.invalidate(hostAddress: Self.host, length: 4096) }
    }

    @Test func checkerReportsATranslationWithoutItsBit() throws {
        let (e, _) = try engine()
        try e.map(iova: 0x100000, vaddr: Self.host, size: 16 * KiB, prot: .read)
        try e.pageTable(DomainID(rawValue: 0)).mapPage(iova: 0x102000, phys: 0x1000, prot: .read)
        try e.pageTable(DomainID(rawValue: 0)).mapPage(iova: 0x900000, phys: 0x1000, prot: .read)
        let kinds = Set(e.checkInvariants().map(\.kind))
        #expect(kinds == [.leafWithoutBit, .wrongPhysical, .leafOutsideMapping])
    }
}

/// A flag that is set once across threads.
final class LockedFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    /// True for the first caller only.
    func setOnce() -> Bool { !flag.exchange(true, ordering: .relaxed) }
}

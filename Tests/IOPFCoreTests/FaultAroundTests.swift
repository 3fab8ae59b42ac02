// Fault-around: the sequential detector, and pages mapped ahead never going
// past the mapping, a page already mapped, a gone page, or an invalidation in flight.

import Synchronization
import Testing
@testable import IOPFCore

@Suite(.timeLimit(.minutes(15))) struct FaultAroundTests {
    static let host: UInt64 = 0x7f00_0000_0000
    static let iova: UInt64 = 0x1_0000_0000
    let memory = SimulatedHostMemory()

    func request(_ page: Int, write: Bool = false) -> PageRequest {
        PageRequest(
            flags: [.lastPage], deviceID: 1, groupIndex: 3, perm: write ? [.read, .write] : [.read],
            addr: Self.iova + UInt64(page) << 12, cookie: 1)
    }

    func engine(pages: Int = 64) throws -> FaultEngine {
        let e = FaultEngine(memory: memory)
        _ = try e.createDomain(invalidator: RecordingInvalidator())
        try e.map(iova: Self.iova, vaddr: Self.host, size: UInt64(pages) << 12, prot: .readWrite)
        return e
    }

    func mapped(_ e: FaultEngine, _ pages: Range<Int>) -> [Int] {
        pages.filter { e.isMarkedMapped(iova: Self.iova + UInt64($0) << 12) }
    }

    // MARK: The detector

    @Test func sequentialFaultsGrowTheWindowAndRandomOnesGetNone() {
        var d = FaultAroundState()
        var page: UInt64 = 1000
        var windows: [Int] = []
        for _ in 0..<8 {
            let w = d.window(for: page << 12, policy: .adaptive)
            windows.append(w)
            d.record(iova: page << 12, mappedAhead: w)
            page += 1 + UInt64(w)  // the device's next fault is just past what was mapped
        }
        #expect(windows == [0, 16, 32, 64, 128, 256, 512, 512])
        // Random pages: each starts a stream of its own, with nothing ahead.
        var g = SystemRandomNumberGenerator()
        for _ in 0..<100 {
            let p = UInt64.random(in: 1 << 20..<1 << 30, using: &g)
            let w = d.window(for: p << 12, policy: .adaptive)
            #expect(w == 0)
            d.record(iova: p << 12, mappedAhead: w)
        }
        var o = FaultAroundState()
        #expect(o.window(for: 0, policy: .off) == 0)
        var f = FaultAroundState()
        #expect(f.window(for: 12345 << 12, policy: .fixed(40)) == 40)
    }

    /// A group of several pages is sequential when its stream expected any page of it (a
    /// device faults the missing pages of one DMA together).
    @Test func groupsOfSeveralPagesFollowTheirStream() {
        var d = FaultAroundState()
        var first: UInt64 = 5000
        var windows: [Int] = []
        for _ in 0..<5 {
            let last = first + 2
            let w = d.window(from: first << 12, to: last << 12, policy: .adaptive)
            windows.append(w)
            d.record(iova: last << 12, mappedAhead: w)
            first = last + 1 + UInt64(w)
        }
        #expect(windows == [0, 16, 32, 64, 128])
    }

    /// A device that catches up with pages still being mapped in the background faults
    /// inside the span its stream expects, not at its end: still sequential. A fault
    /// before the span, or past its end, is not.
    @Test func aFaultInsideTheExpectedSpanIsSequential() {
        var d = FaultAroundState()
        _ = d.window(for: 1000 << 12, policy: .adaptive)
        d.record(iova: 1000 << 12, mappedAhead: 0)
        #expect(d.window(for: 1001 << 12, policy: .adaptive) == 16)
        d.record(iova: 1001 << 12, mappedAhead: 300)  // 1002...1302 expected
        #expect(d.window(for: 1100 << 12, policy: .adaptive) == 32, "inside the span")
        d.record(iova: 1100 << 12, mappedAhead: 50)  // 1101...1151
        var other = d
        #expect(other.window(for: 1151 << 12, policy: .adaptive) == 64, "at its end")
        #expect(d.window(for: 1152 << 12, policy: .adaptive) == 0, "past its end")
        var before = FaultAroundState()
        _ = before.window(for: 1000 << 12, policy: .adaptive)
        before.record(iova: 1000 << 12, mappedAhead: 10)
        #expect(before.window(for: 1000 << 12, policy: .adaptive) == 0, "the page faulted last is not ahead of it")
    }

    @Test func fourInterleavedStreamsAreEachFollowedAndAFifthEvictsTheOldest() {
        var d = FaultAroundState()
        var next: [UInt64] = [100, 10_000, 20_000, 30_000]
        var last = [Int](repeating: -1, count: 4)
        for _ in 0..<4 {
            for s in 0..<4 {
                let w = d.window(for: next[s] << 12, policy: .adaptive)
                d.record(iova: next[s] << 12, mappedAhead: w)
                next[s] += 1 + UInt64(w)
                last[s] = w
            }
        }
        #expect(last == [64, 64, 64, 64])
        // A fifth stream takes the least recently used slot (stream 0's).
        let w = d.window(for: 90_000 << 12, policy: .adaptive)
        d.record(iova: 90_000 << 12, mappedAhead: w)
        #expect(w == 0)
        #expect(d.window(for: next[1] << 12, policy: .adaptive) == 128, "stream 1 kept its window")
        d.record(iova: next[1] << 12, mappedAhead: 128)
        #expect(d.window(for: next[0] << 12, policy: .adaptive) == 0, "stream 0 was evicted")
    }

    /// Lookups that find few resident neighbours back off (1, 2, 4 … 64 random faults
    /// without one); a lookup that finds a quarter of the block or more resets it.
    @Test func residentNeighbourLookupsBackOffWhenTheyFindLittle() {
        var d = FaultAroundState()
        #expect(d.neighbours(policy: .off) == 0 && d.neighbours(policy: .fixed(8)) == 0)
        var skipped: [Int] = []
        for _ in 0..<8 {
            #expect(d.neighbours(policy: .adaptive) == FaultAroundPolicy.neighbourPages)
            d.recordNeighbours(mapped: 1)
            var n = 0
            while d.neighbours(policy: .adaptive) == 0 { n += 1 }
            skipped.append(n)
            d.recordNeighbours(mapped: 0)
            while d.neighbours(policy: .adaptive) == 0 {}
        }
        #expect(skipped == [1, 4, 16, 64, 64, 64, 64, 64])
        d.recordNeighbours(mapped: 4)
        #expect(d.neighbours(policy: .adaptive) == FaultAroundPolicy.neighbourPages)
    }

    @Test func policiesParse() {
        #expect(FaultAroundPolicy("off") == .off)
        #expect(FaultAroundPolicy("adaptive") == .adaptive)
        #expect(FaultAroundPolicy("64") == .fixed(64))
        #expect(FaultAroundPolicy("513") == nil)
        #expect(FaultAroundPolicy("-1") == nil)
        #expect(FaultAroundPolicy("lots") == nil)
    }

    // MARK: The handler

    @Test func pagesAheadAreOrdinaryMappedPages() throws {
        let e = try engine()
        let h = e.makeFaultHandler()
        let calls = memory.resolveCalls
        let out = h.handle([request(0, write: true)], ahead: 8)
        #expect(out.code == .success && out.mapped == 1 && out.prefetched == 8)
        #expect(memory.resolveCalls == calls + 1, "the request and its pages ahead are one resolve")
        #expect(mapped(e, 0..<64) == Array(0...8))
        let t = e.pageTable(DomainID(rawValue: 0))
        for p in 0...8 {
            #expect(
                t.translate(Self.iova + UInt64(p) << 12)?.phys == Self.host + UInt64(p) << 12 + memory.physicalOffset)
        }
        let s = e.statistics
        #expect(s.requests == 1 && s.mappedPages == 9 && s.prefetchedPages == 8)
        // Invalidated like any other page.
        _ = try e.invalidate(hostAddress: Self.host + 4 << 12, length: 4096)
        #expect(mapped(e, 0..<64) == [0, 1, 2, 3, 5, 6, 7, 8])
        #expect(e.checkInvariants().isEmpty)
    }

    @Test func neverPastTheMappingAMappedPageOrAGonePage() throws {
        let e = try engine()
        let h = e.makeFaultHandler()
        // The mapping's end.
        #expect(h.handle([request(60)], ahead: 16).prefetched == 3)
        #expect(mapped(e, 56..<64) == [60, 61, 62, 63])
        // A page already mapped stops the window.
        #expect(h.handle([request(20)]).prefetched == 0)
        #expect(h.handle([request(15)], ahead: 10).prefetched == 4)
        #expect(mapped(e, 10..<30) == [15, 16, 17, 18, 19, 20])
        // A gone page stops it too.
        _ = try e.invalidate(hostAddress: Self.host + 35 << 12, length: 4096, hostGone: true)
        #expect(h.handle([request(30)], ahead: 10).prefetched == 4)
        #expect(mapped(e, 30..<40) == [30, 31, 32, 33, 34])
        // Another mapping right after is not entered.
        try e.map(iova: Self.iova + 64 << 12, vaddr: Self.host + 64 << 12, size: 16 << 12, prot: .readWrite)
        #expect(h.handle([request(50)], ahead: 30).prefetched == 9)
        #expect(mapped(e, 64..<80).isEmpty)
        #expect(e.checkInvariants().isEmpty)
    }

    /// Pages ahead that the host cannot provide are skipped; the request is still served.
    @Test func unresolvablePagesAheadDoNotFailTheRequest() throws {
        let e = try engine()
        memory.markUnresolvable(Self.host + 5 << 12..<Self.host + 6 << 12)
        let h = e.makeFaultHandler()
        let out = h.handle([request(2)], ahead: 8)
        #expect(out.code == .success && out.prefetched == 0)
        #expect(mapped(e, 0..<16) == [2])
        #expect(e.statistics.resolveFailures == 0)
        #expect(h.handle([request(5)], ahead: 8).code == .invalid)
    }

    /// The host takes pages 4-7 away between resolve and install: the group is retried,
    /// pages ahead included, and the window now stops before the gone pages. Without the
    /// retry, pages 4-7 would be mapped to memory the host no longer has.
    @Test func anInvalidationInFlightIsNeverCrossed() throws {
        let e = try engine()
        let fired = Atomic<Bool>(false)
        let engineRef = e
        memory.setBeforeResolve { _, _ in
            if !fired.exchange(true, ordering: .relaxed) {
                _ = try? engineRef.invalidate(hostAddress: Self.host + 4 << 12, length: 4 << 12, hostGone: true)
            }
        }
        let h = e.makeFaultHandler()
        let out = h.handle([request(0)], ahead: 16)
        #expect(out.retries == 1 && out.prefetched == 3)
        #expect(mapped(e, 0..<64) == [0, 1, 2, 3])
        memory.setBeforeResolve(nil)
        #expect(e.checkInvariants().isEmpty)
    }

    /// The background window (`mapAhead`): pages already mapped are skipped, the mapping's
    /// end and a gone page stop it, and nothing counts as a group.
    @Test func backgroundWindowsSkipMappedPagesAndStopAtTheEndOrAGonePage() throws {
        let e = try engine()
        let h = e.makeFaultHandler()
        _ = h.handle([request(3)])
        _ = h.handle([request(5)])
        var r = h.mapAhead(from: Self.iova, pages: 8, write: true)
        #expect(r.mapped == 6 && !r.stopped)
        #expect(mapped(e, 0..<16) == Array(0..<8))
        _ = try e.invalidate(hostAddress: Self.host + 12 << 12, length: 4096, hostGone: true)
        r = h.mapAhead(from: Self.iova + 8 << 12, pages: 8, write: false)
        #expect(r.mapped == 4 && r.stopped)
        #expect(mapped(e, 8..<16) == [8, 9, 10, 11])
        r = h.mapAhead(from: Self.iova + 60 << 12, pages: 8, write: false)
        #expect(r.mapped == 4 && r.stopped, "the mapping ends at page 63")
        r = h.mapAhead(from: Self.iova + 200 << 12, pages: 8, write: false)
        #expect(r.mapped == 0 && r.stopped, "no mapping there")
        let stats = e.statistics
        #expect(stats.groups == 2 && stats.prefetchedPages == 14)
        #expect(e.checkInvariants().isEmpty)
    }

    /// The background window under an invalidation in flight: retried, and never maps a
    /// page the host took away meanwhile.
    @Test func backgroundWindowsRetryAcrossAnInvalidation() throws {
        let e = try engine()
        let fired = Atomic<Bool>(false)
        let engineRef = e
        memory.setBeforeResolve { _, _ in
            if !fired.exchange(true, ordering: .relaxed) {
                _ = try? engineRef.invalidate(hostAddress: Self.host + 6 << 12, length: 2 << 12, hostGone: true)
            }
        }
        let r = e.makeFaultHandler().mapAhead(from: Self.iova, pages: 16, write: true)
        memory.setBeforeResolve(nil)
        #expect(r.mapped == 6 && r.stopped)
        #expect(mapped(e, 0..<64) == Array(0..<6))
        #expect(e.statistics.retries == 1 && e.checkInvariants().isEmpty)
    }

    /// Pinned mappings are mapped whole already: nothing ahead.
    @Test func pinnedMappingsAreLeftAlone() throws {
        let e = FaultEngine(memory: memory)
        _ = try e.createDomain(invalidator: RecordingInvalidator())
        try e.mapPinned(iova: Self.iova, vaddr: Self.host, size: 16 << 12, prot: .readWrite)
        #expect(e.makeFaultHandler().handle([request(0)], ahead: 8) == GroupOutcome(code: .success, spurious: 1))
    }

    /// A random fault maps the resident pages of its aligned 16-page block and nothing
    /// else: no page is populated for it.
    @Test func residentNeighboursOfARandomFaultAreMapped() throws {
        let e = try engine()
        memory.markResident(Self.host + 16 << 12..<Self.host + 20 << 12)
        memory.markResident(Self.host + 30 << 12..<Self.host + 40 << 12)
        let h = e.makeFaultHandler()
        let resolvedBefore = memory.resolvedPages
        let out = h.handle([request(22)], neighbours: 16)
        #expect(out.code == .success && out.mapped == 1)
        // Block 16..<32: resident 16-19 and 30-31, plus the fault itself.
        #expect(mapped(e, 0..<64) == [16, 17, 18, 19, 22, 30, 31])
        #expect(out.prefetched == 6)
        #expect(
            memory.resolvedPages - resolvedBefore == 1,
            "only the fault was resolved: resident pages are mapped as they are")
        // Pages ahead take precedence: with a window, neighbours are not looked at.
        #expect(h.handle([request(50)], ahead: 2, neighbours: 16).prefetched == 2)
        #expect(mapped(e, 48..<64) == [50, 51, 52])
        #expect(e.checkInvariants().isEmpty)
    }

    /// After a random fault's answer, its resident neighbours are mapped as they are: not
    /// the pages already mapped, not gone ones, not outside the mapping, nothing resolved.
    @Test func residentNeighboursAreMappedAfterTheAnswer() throws {
        let e = try engine(pages: 40)
        memory.markResident(Self.host..<Self.host + 64 << 12)
        let h = e.makeFaultHandler()
        #expect(h.handle([request(20, write: true)]).mapped == 1)
        _ = try e.invalidate(hostAddress: Self.host + 25 << 12, length: 4096, hostGone: true)
        let resolvedBefore = memory.resolvedPages
        #expect(h.mapResidentAround(Self.iova + 20 << 12, pages: 16, write: true) == 14)
        #expect(mapped(e, 0..<40) == Array(16..<25) + Array(26..<32))
        #expect(memory.resolvedPages == resolvedBefore, "resident neighbours are not populated")
        // The block 32..<48 ends with the mapping (40 pages): nothing past it.
        #expect(h.mapResidentAround(Self.iova + 33 << 12, pages: 16, write: false) == 8)
        #expect(mapped(e, 32..<64) == Array(32..<40))
        // Everything around is mapped already: nothing more.
        #expect(h.mapResidentAround(Self.iova + 20 << 12, pages: 16, write: true) == 0)
        #expect(e.checkInvariants().isEmpty)
    }
}

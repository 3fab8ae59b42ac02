// Dirty tracking: what the log reports against a model of what a device
// really wrote, under random writes, reads, invalidations and reads of the log; blocks,
// pinned and untracked mappings; nothing lost across an invalidation or an unmap.

import Testing
@_spi(FaultInjection) @testable import IOPFCore

@Suite(.timeLimit(.minutes(15))) struct DirtyTrackingTests {
    static let host: UInt64 = 0x7f00_0000_0000
    static let iova: UInt64 = 0x1_0000_0000

    /// A device over domain 0: writes go through a writable translation or fault for one.
    final class Device {
        let engine: FaultEngine
        let table: IOPageTable
        let handler: FaultHandler
        /// Pages really written since the last read of the log, by IOVA.
        var written: Set<UInt64> = []
        var faults = 0

        init(_ engine: FaultEngine) {
            self.engine = engine
            table = engine.pageTable(DomainID(rawValue: 0))
            handler = engine.makeFaultHandler()
        }

        func access(_ iova: UInt64, write: Bool) {
            for _ in 0..<3 {
                if let t = table.translate(iova), t.prot.contains(write ? .write : .read) {
                    if write { written.insert(iova) }
                    return
                }
                faults += 1
                let r = PageRequest(
                    flags: [.lastPage], deviceID: 1, groupIndex: 1, perm: write ? [.read, .write] : [.read],
                    addr: iova, cookie: 1)
                #expect(handler.handle([r]).code == .success)
            }
            Issue.record("iova \(hex(iova)) still not \(write ? "writable" : "readable") after two faults")
        }
    }

    func engine(pages: Int = 256, bugs: InjectedBugs = [], pageSizes: Set<PageSize> = [.size4K]) throws -> FaultEngine {
        var config = EngineConfiguration()
        config.injectedBugs = bugs
        config.pageSizes = pageSizes
        let e = FaultEngine(memory: SimulatedHostMemory(), configuration: config)
        _ = try e.createDomain(invalidator: RecordingInvalidator())
        try e.map(iova: Self.iova, vaddr: Self.host, size: UInt64(pages) << 12, prot: .readWrite)
        return e
    }

    func setOf(_ bitmap: PageBitmap, base: UInt64 = iova) -> Set<UInt64> {
        var out: Set<UInt64> = []
        var p = bitmap.findNextSet(from: 0)
        while p < bitmap.count {
            out.insert(base + UInt64(p) << 12)
            p = bitmap.findNextSet(from: p + 1)
        }
        return out
    }

    /// The invariant the design rests on: while tracked, a writable leaf's page is dirty.
    func writableLeavesAreDirty(_ e: FaultEngine, pages: Int) -> Bool {
        let table = e.pageTable(DomainID(rawValue: 0))
        return e.state.withLock { s in
            let m = s.mappings.byIOVA[0]
            return (0..<pages).allSatisfy { p in
                guard let t = table.translate(m.iova(page: p)), t.prot.contains(.write) else { return true }
                return m.dirty?.test(p) ?? true
            }
        }
    }

    /// Random writes, reads, invalidations and log reads: each read reports exactly the
    /// pages written since the one before (4 KiB leaves), whatever was invalidated between.
    func runModel(seed: UInt64, bugs: InjectedBugs = []) throws -> (
        rounds: Int, mismatches: Int, firstMismatch: String?
    ) {
        let pages = 256
        let e = try engine(pages: pages, bugs: bugs)
        let device = Device(e)
        var rng = SeededGenerator(seed: seed)
        for _ in 0..<64 { device.access(Self.iova + (rng.next() % UInt64(pages)) << 12, write: rng.next() % 2 == 0) }
        try e.startDirtyTracking(iova: Self.iova, size: UInt64(pages) << 12)
        device.written = []
        var (rounds, mismatches) = (0, 0)
        var first: String?
        for step in 0..<4000 {
            let roll = rng.next() % 100
            let page = rng.next() % UInt64(pages)
            switch roll {
            case 0..<45: device.access(Self.iova + page << 12, write: true)
            case 45..<75: device.access(Self.iova + page << 12, write: false)
            case 75..<95:
                let length = 1 + rng.next() % 32
                try e.invalidate(hostAddress: Self.host + page << 12, length: length << 12)
            default:
                let reported = setOf(try e.readAndClearDirty(iova: Self.iova, size: UInt64(pages) << 12))
                rounds += 1
                if reported != device.written {
                    mismatches += 1
                    if first == nil {
                        first =
                            """
                            step \(step): missed \(device.written.subtracting(reported).map(hex)), extra \
                            \(reported.subtracting(device.written).map(hex))
                            """
                    }
                }
                device.written = []
            }
            if step % 97 == 0 && !writableLeavesAreDirty(e, pages: pages) {
                mismatches += 1
                if first == nil { first = "step \(step): a writable leaf whose page is not dirty" }
            }
        }
        return (rounds, mismatches, first)
    }

    @Test(arguments: [1, 2, 3] as [UInt64]) func theLogMatchesWhatTheDeviceWrote(seed: UInt64) throws {
        let r = try runModel(seed: seed)
        #expect(r.rounds > 100)
        #expect(r.mismatches == 0, "\(r.firstMismatch ?? "")")
    }

    @Test func losingDirtyBitsOnUnmapIsCaught() throws {
        let r = try runModel(seed: 1, bugs: .loseDirty)
        #expect(r.mismatches > 0, "the model must notice writes lost to invalidations")
    }

    @Test func startingWriteProtectsPresentLeavesWithOneSync() throws {
        let e = try engine(pages: 16)
        let inv = RecordingInvalidator()
        e.setInvalidator(inv, for: DomainID(rawValue: 0))
        let device = Device(e)
        for p in 0..<8 { device.access(Self.iova + UInt64(p) << 12, write: true) }
        #expect(try e.startDirtyTracking(iova: Self.iova, size: 16 << 12) == 1)
        #expect(inv.syncs.count == 1 && inv.syncs[0] == [IOVARange(start: Self.iova, last: Self.iova + 8 << 12 - 1)])
        #expect((0..<8).allSatisfy { device.table.translate(Self.iova + UInt64($0) << 12)?.prot == .read })
        #expect(
            try e.readAndClearDirty(iova: Self.iova, size: 16 << 12).isEmpty, "nothing written since tracking started")
        // The first write faults once, restores write without resolving again, and is logged.
        let faults = device.faults
        device.access(Self.iova + 3 << 12, write: true)
        device.access(Self.iova + 3 << 12, write: true)
        #expect(device.faults == faults + 1 && e.statistics.writeRestores == 1)
        let syncs = inv.syncs.count
        #expect(setOf(try e.readAndClearDirty(iova: Self.iova, size: 16 << 12)) == [Self.iova + 3 << 12])
        #expect(inv.syncs.count == syncs + 1, "one sync per read of the log")
        #expect(device.table.translate(Self.iova + 3 << 12)?.prot == .read, "protected again for the next round")
        // A read fault maps read-only; stopping gives write back to every present leaf.
        device.access(Self.iova + 12 << 12, write: false)
        #expect(device.table.translate(Self.iova + 12 << 12)?.prot == .read)
        try e.stopDirtyTracking(iova: Self.iova, size: 16 << 12)
        #expect(device.table.translate(Self.iova + 12 << 12)?.prot == .readWrite)
        #expect(device.table.translate(Self.iova + 3 << 12)?.prot == .readWrite)
    }

    @Test func aPageWrittenThenInvalidatedOrUnmappedIsStillReported() throws {
        let e = try engine(pages: 16)
        try e.startDirtyTracking(iova: Self.iova, size: 16 << 12)
        let device = Device(e)
        device.access(Self.iova + 5 << 12, write: true)
        try e.invalidate(hostAddress: Self.host + 5 << 12, length: 4096, hostGone: true)
        #expect(device.table.translate(Self.iova + 5 << 12) == nil)
        #expect(setOf(try e.readAndClearDirty(iova: Self.iova, size: 16 << 12)) == [Self.iova + 5 << 12])
        // An unmap reads the log under the same lock as the removal.
        try e.updateHostAddress(iova: Self.iova, size: 16 << 12, vaddr: Self.host)
        device.access(Self.iova + 9 << 12, write: true)
        let (_, dirty) = try e.unmapReadingDirty(iova: Self.iova, size: 16 << 12)
        #expect(setOf(dirty) == [Self.iova + 9 << 12])
        // A mapping created inside the tracked range is tracked from the start.
        try e.map(iova: Self.iova, vaddr: Self.host, size: 16 << 12, prot: .readWrite)
        device.access(Self.iova + 2 << 12, write: true)
        device.access(Self.iova + 4 << 12, write: false)
        #expect(setOf(try e.readAndClearDirty(iova: Self.iova, size: 16 << 12)) == [Self.iova + 2 << 12])
    }

    @Test func pinnedAndUntrackedMappingsReportEveryPageAndHolesNone() throws {
        let e = try engine(pages: 16)
        try e.mapPinned(iova: Self.iova + 1 * GiB, vaddr: Self.host + 1 * GiB, size: 8 << 12, prot: .readWrite)
        try e.startDirtyTracking(iova: Self.iova + 1 * GiB, size: 8 << 12)  // pinned: nothing to track
        // The range spans the untracked fault mapping's last 4 pages, a hole, and the pinned one.
        let start = Self.iova + 12 << 12
        let size = 1 * GiB - 12 << 12 + 8 << 12
        let bits = try e.readAndClearDirty(iova: start, size: size)
        #expect(bits.population == 4 + 8)
        #expect(bits.population(in: 0..<4) == 4 && bits.population(in: (bits.count - 8)..<bits.count) == 8)
        #expect(try e.readAndClearDirty(iova: start, size: size).population == 12, "every read reports them again")
        #expect(throws: DirtyTrackingError.self) { try e.readAndClearDirty(iova: start + 1, size: 4096) }
    }

    @Test func aWriteInsideABlockMakesTheWholeBlockDirty() throws {
        let e = try engine(pages: 1024, pageSizes: Set(PageSize.allCases))
        try e.premap(iova: Self.iova, size: 4 * MiB, write: false)
        #expect(e.pageTable(DomainID(rawValue: 0)).translate(Self.iova)?.pageSize == .size2M)
        try e.startDirtyTracking(iova: Self.iova, size: 4 * MiB)
        let device = Device(e)
        device.access(Self.iova + 700 << 12, write: true)  // inside the second block
        let bits = try e.readAndClearDirty(iova: Self.iova, size: 4 * MiB)
        #expect(
            bits.population == 512 && bits.population(in: 512..<1024) == 512,
            "a block is one leaf: all of it is reported")
        device.access(Self.iova + 700 << 12, write: true)
        #expect(device.faults == 2, "protected whole again after the read")
    }
}

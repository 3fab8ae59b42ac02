// Fail closed: the defects found by reading the engine, each shown by a test
// that failed before its fix. An unmap that fails still syncs what it unmapped and stops
// the engine; a pinned mapping cannot be removed while it is being populated; pages are
// charged before they are pinned; aliased pins are counted; loose record fields are
// handled as FaultRecord.swift decides.

import Synchronization
import Testing
@testable import IOPFCore

@Suite(.timeLimit(.minutes(15))) struct FailClosedTests {
    static let host: UInt64 = 0x7000_0000_0000
    static let iova: UInt64 = 1 << 30

    func request(_ addr: UInt64, perm: PageRequest.Permission = [.read], length: UInt32 = 0) -> PageRequest {
        PageRequest(flags: [.lastPage], deviceID: 1, groupIndex: 3, perm: perm, addr: addr, length: length, cookie: 1)
    }

    /// Two domains, the second refusing every unmap: the first domain's unmaps are gathered
    /// before the second fails, so whether they were synced shows.
    func engineWithFailingSecondDomain() throws -> (FaultEngine, SimulatedHostMemory, RecordingInvalidator) {
        let memory = SimulatedHostMemory()
        let e = FaultEngine(memory: memory)
        let first = RecordingInvalidator()
        _ = try e.createDomain(invalidator: first)
        _ = try e.createDomain(invalidator: RecordingInvalidator())
        return (e, memory, first)
    }

    @Test func anUnmapThatFailsStillSyncsAndStopsTheEngine() throws {
        let (e, _, first) = try engineWithFailingSecondDomain()
        try e.map(iova: Self.iova, vaddr: Self.host, size: 64 * KiB, prot: .read)
        let h = e.makeFaultHandler()
        #expect(h.handle([request(Self.iova)]).code == .success)
        e.pageTable(DomainID(rawValue: 1)).testsOnly_refuseUnmap = true
        let syncsBefore = first.syncs.count
        #expect(throws: FatalInvalidationError.self) { try e.unmap(iova: Self.iova, size: 64 * KiB) }
        #expect(first.syncs.count == syncsBefore + 1, "what the first domain unmapped was not synced")
        #expect(e.failure != nil, "the engine kept granting after a failed unmap")
        #expect(e.mappingCount == 1, "a mapping with a translation left was removed")
        #expect(h.handle([request(Self.iova + 4096)]).code == .invalid)
    }

    @Test func anUpdateWhoseUnmapFailsStillSyncsAndStopsTheEngine() throws {
        let (e, _, first) = try engineWithFailingSecondDomain()
        try e.map(iova: Self.iova, vaddr: Self.host, size: 64 * KiB, prot: .read)
        #expect(e.makeFaultHandler().handle([request(Self.iova)]).code == .success)
        e.pageTable(DomainID(rawValue: 1)).testsOnly_refuseUnmap = true
        let syncsBefore = first.syncs.count
        #expect(throws: FatalInvalidationError.self) {
            try e.updateHostAddress(iova: Self.iova, size: 64 * KiB, vaddr: Self.host + 1 * MiB)
        }
        #expect(first.syncs.count == syncsBefore + 1)
        #expect(e.failure != nil)
        #expect(
            e.mappingInfo(iova: Self.iova)?.vaddr == Self.host,
            "the host address changed although the old translations stayed")
    }

    @Test func aPinnedUnwindThatCannotUnmapKeepsThePagesPinned() throws {
        let (e, memory, _) = try engineWithFailingSecondDomain()
        // The second batch cannot be pinned; a device page in the first batch ends a run,
        // so pages are mapped by then.
        memory.markDeviceMemory(Self.host + 400 * KiB..<Self.host + 404 * KiB, phys: 0xF0_0000_0000)
        memory.markUnresolvable(Self.host + 3 * MiB..<Self.host + 4 * MiB)
        e.pageTable(DomainID(rawValue: 1)).testsOnly_refuseUnmap = true
        let error = #expect(throws: PinError.self) {
            try e.mapPinned(iova: Self.iova, vaddr: Self.host, size: 4 * MiB, prot: .read)
        }
        #expect(error?.released == false)
        #expect(error?.description.contains("stay pinned") == true)
        #expect(memory.pinnedPageCount > 0, "pages were unpinned while a device could still reach them")
        // The first batch stays pinned (one of its pages is device memory, never charged).
        #expect(
            memory.pinnedPageCount == 512 && e.lockedMemory.lockedPages == 511,
            "pinned pages must stay charged, and only those")
        #expect(e.failure != nil)
    }

    @Test func aPinnedMappingBeingPopulatedCannotBeUnmappedOrMoved() throws {
        let memory = SimulatedHostMemory()
        let e = FaultEngine(memory: memory)
        _ = try e.createDomain(invalidator: RecordingInvalidator())
        let results = Lock<[String]>([])
        // During the second batch's pin, another thread tries to take the mapping away.
        let calls = Atomic<Int>(0)
        memory.setBeforePin { _, _ in
            guard calls.add(1, ordering: .relaxed).newValue == 2 else { return }
            do { try e.unmap(iova: Self.iova, size: 4 * MiB); results.withLock { $0.append("unmapped") } } catch {
                results.withLock { $0.append("\(error)") }
            }
            do { try e.updateHostAddress(iova: Self.iova, size: 4 * MiB, vaddr: Self.host + 8 * MiB) } catch {
                results.withLock { $0.append("\(error)") }
            }
        }
        try e.mapPinned(iova: Self.iova, vaddr: Self.host, size: 4 * MiB, prot: .read)
        let seen = results.withLock { $0 }
        #expect(seen.count == 2 && seen.allSatisfy { $0.contains("still being pinned") }, "\(seen)")
        #expect(memory.pinnedPageCount == 1024 && e.lockedMemory.lockedPages == 1024)
        memory.setBeforePin(nil)
        try e.unmap(iova: Self.iova, size: 4 * MiB)
        #expect(memory.pinnedPageCount == 0 && e.lockedMemory.lockedPages == 0)
    }

    @Test func pagesAreChargedBeforeTheyArePinned() throws {
        let memory = SimulatedHostMemory()
        var c = EngineConfiguration()
        c.lockedMemoryLimit = 600 << 12  // room for the first batch only
        c.bypassesLockedMemoryLimit = false
        let e = FaultEngine(memory: memory, configuration: c)
        _ = try e.createDomain(invalidator: RecordingInvalidator())
        let chargedAtPin = Lock<[Int]>([])
        memory.setBeforePin { _, n in chargedAtPin.withLock { $0.append(e.lockedMemory.lockedPages) } }
        #expect(throws: PinError.self) {
            try e.mapPinned(iova: Self.iova, vaddr: Self.host, size: 4 * MiB, prot: .read)
        }
        // The first batch was charged before its pin; the second was refused before any
        // of its pages were pinned, so pin was called once.
        #expect(chargedAtPin.withLock { $0 } == [512])
        #expect(memory.pinnedPageCount == 0 && e.lockedMemory.lockedPages == 0)
    }

    @Test func deviceMemoryChargedAheadIsRefunded() throws {
        let memory = SimulatedHostMemory()
        memory.markDeviceMemory(Self.host..<Self.host + 1 * MiB, phys: 0xF0_0000_0000)
        let e = FaultEngine(memory: memory)
        _ = try e.createDomain(invalidator: RecordingInvalidator())
        let (_, s) = try e.mapPinned(iova: Self.iova, vaddr: Self.host, size: 4 * MiB, prot: .read)
        #expect(s.chargedPages == 768 && e.lockedMemory.lockedPages == 768)
        try e.unmap(iova: Self.iova, size: 4 * MiB)
        #expect(e.lockedMemory.lockedPages == 0)
    }

    @Test func pinCountsFreeOnlyWhatNoOtherPinHolds() {
        var p = PinCounts()
        p.add(0x1000..<0x5000)
        p.add(0x3000..<0x8000)  // aliases 0x3000..<0x5000
        #expect(p.count(at: 0x4000) == 2 && p.count(at: 0x1000) == 1 && p.count(at: 0x8000) == 0)
        #expect(p.remove(0x1000..<0x5000) == [0x1000..<0x3000])
        #expect(p.remove(0x3000..<0x8000) == [0x3000..<0x8000])
        #expect(p.isEmpty)
        // Adjacent batches leave no boundary between them; a middle part can go alone.
        p.add(0x0..<0x2000)
        p.add(0x2000..<0x4000)
        p.add(0x2000..<0x3000)
        #expect(p.remove(0x0..<0x4000) == [0x0..<0x2000, 0x3000..<0x4000])
        #expect(p.remove(0x2000..<0x3000) == [0x2000..<0x3000] && p.isEmpty)
    }

    // MARK: Loose record fields, as decided in FaultRecord.swift

    @Test func looseRecordFieldsAreHandledAsDocumented() throws {
        let e = FaultEngine(memory: SimulatedHostMemory())
        let d = try e.createDomain(invalidator: RecordingInvalidator())
        try e.map(iova: Self.iova, vaddr: Self.host, size: 64 * KiB, prot: .read)
        let h = e.makeFaultHandler()
        // length is a hint: one request maps one page whatever it says.
        #expect(h.handle([request(Self.iova, length: 64 << 10)]).code == .success)
        #expect(e.mappedPageCount == 1)
        // The low 12 bits of addr are ignored: the page containing it is served.
        #expect(h.handle([request(Self.iova + 0x2abc)]).code == .success)
        #expect(e.pageTable(d).translate(Self.iova + 0x2000) != nil && e.mappedPageCount == 2)
        // EXEC needs a readable mapping, PRIV is never served.
        #expect(h.handle([request(Self.iova + 0x3000, perm: [.read, .exec])]).code == .success)
        #expect(h.handle([request(Self.iova + 0x4000, perm: [.read, .priv])]).code == .invalid)
        try e.map(iova: 1 << 32, vaddr: Self.host, size: 64 * KiB, prot: .write)
        #expect(h.handle([request(1 << 32, perm: [.write, .exec])]).code == .invalid)
        // A PASID wider than 20 bits is malformed.
        var r = request(Self.iova)
        r.flags = [.lastPage, .pasidValid]
        r.pasid = 1 << 20
        #expect(throws: FaultRecordError.pasidOutOfRange(1 << 20)) {
            try r.bytes.withUnsafeBytes { try PageRequest(bytes: $0) }
        }
        r.pasid = (1 << 20) - 1
        #expect(try r.bytes.withUnsafeBytes { try PageRequest(bytes: $0) }.pasid == (1 << 20) - 1)
    }
}

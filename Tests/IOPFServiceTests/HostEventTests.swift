// Real MMU-notifier events through userfaultfd: FileDescriptor(rawValue: madvise), munmap and mremap on mapped
// memory reach the service, which unmaps, syncs, and answers later faults as the event
// requires.

import CIOPFShim
import Foundation
import Glibc
import SystemPackage
import Testing
import IOPFTestSupport
@testable import IOPFCore
@testable import IOPFService
@testable import IOPFDevice
@testable import IOPFSimulation
@testable import IOPFSystem

/// A service over `pages` of real memory mapped at IOVA 1 GiB, with host events on.
final class EventHarness {
    let region: HostRegion
    let engine: FaultEngine
    let domain: DomainID
    let service: FaultService
    let channel: DeviceChannel
    static let iova: UInt64 = 1 << 30
    var cookie: UInt32 = 0

    init(pages: Int = 64) throws {
        region = try HostRegion(length: UInt64(pages) << 12)
        engine = FaultEngine(memory: ProcessMemory())
        domain = try engine.createDomain(invalidator: DomainIOTLBs())
        var config = ServiceConfiguration()
        config.spinNanoseconds = 20_000
        service = try FaultService(engine: engine, configuration: config)
        try service.start()
        try #require(service.hostEventsEnabled, "userfaultfd events are needed: \(service.hostEventsUnavailable ?? "")")
        try service.map(iova: Self.iova, vaddr: region.base, size: region.length, prot: .readWrite)
        channel = try DeviceChannel(service.attach(deviceID: 1, domain: domain))
    }

    deinit { service.stop() }

    func address(_ page: Int) -> UInt64 { region.base + UInt64(page) << 12 }

    /// Faults `pages` in one group and returns the answer.
    func fault(_ pages: [Int]) throws -> ResponseCode? {
        cookie += 1
        try channel.send(
            pages.enumerated().map { k, p in
                PageRequest(
                    flags: k == pages.count - 1 ? [.lastPage] : [], deviceID: 1, groupIndex: 1, perm: [.read, .write],
                    addr: Self.iova + UInt64(p) << 12, cookie: cookie)
            })
        // Answers to earlier groups may still be queued (a test that gave up waiting on
        // one): skip them until this group's answer, or nil if the channel closed.
        let deadline = ContinuousClock.now + .seconds(5)
        while ContinuousClock.now < deadline {
            guard let batch = try channel.receive(spinNanoseconds: 0, timeoutMs: 1000) else { return nil }
            if let answer = batch.first(where: { $0.cookie == cookie }) { return answer.code }
        }
        return nil
    }

    func translated(_ page: Int) -> Bool { engine.pageTable(domain).translate(Self.iova + UInt64(page) << 12) != nil }
    func marked(_ page: Int) -> Bool { engine.isMarkedMapped(iova: Self.iova + UInt64(page) << 12) }
}

@Suite(.serialized, .timeLimit(.minutes(15))) struct HostEventTests {
    /// Shared memory is taken back with MADV_REMOVE (it frees the pages); MADV_DONTNEED
    /// raises the same REMOVE event but leaves the shared pages' contents alone.
    @Test(arguments: [MADV_REMOVE, MADV_DONTNEED])
    func madviseUnmapsAndTheDeviceFaultsAgain(advice: Int32) throws {
        let h = try EventHarness()
        #expect(try h.fault(Array(0..<8)) == .success)
        UnsafeMutableRawPointer(bitPattern: UInt(h.address(2)))!.storeBytes(of: 0xABCD, as: UInt64.self)
        let before = h.service.hostEventsCompleted
        // Blocks until the service has read the REMOVE event.
        #expect(madvise(UnsafeMutableRawPointer(bitPattern: UInt(h.address(2))), 4 << 12, advice) == 0)
        try h.service.barrier().wait()
        #expect(h.service.hostEventsCompleted == before + 1)
        #expect(h.service.statistics.uffdRemove == 1)
        for p in 2..<6 { #expect(!h.translated(p) && !h.marked(p), "page \(p) survived its REMOVE") }
        for p in [0, 1, 6, 7] { #expect(h.translated(p) && h.marked(p)) }
        // The device's next access faults again and gets the page back (zeroed when freed).
        #expect(try h.fault([3]) == .success)
        #expect(h.translated(3))
        #expect(
            UnsafeRawPointer(bitPattern: UInt(h.address(2)))!.load(as: UInt64.self)
                == (advice == MADV_REMOVE ? 0 : 0xABCD))
        #expect(try h.service.checkInvariants().wait().isEmpty)
    }

    /// Punching a hole in the memfd acts on the file: the pages are freed, but no uffd
    /// event says so (the table in WritingADevice.md); the stale translation stays until invalidated.
    @Test func aHolePunchedInTheMemfdRaisesNoEvent() throws {
        let h = try EventHarness()
        #expect(try h.fault(Array(0..<4)) == .success)
        UnsafeMutableRawPointer(bitPattern: UInt(h.address(1)))!.storeBytes(of: 0xABCD, as: UInt64.self)
        #expect(iopf_punch_hole(h.region.fd, 0, 4 << 12) == 0)
        try h.service.barrier().wait()
        #expect(h.service.statistics.uffdEvents == 0)
        #expect(h.translated(1) && h.marked(1))
        #expect(UnsafeRawPointer(bitPattern: UInt(h.address(1)))!.load(as: UInt64.self) == 0, "the hole reads as zeros")
    }

    @Test func munmapMarksTheRangeGoneUntilTheMappingIsReplaced() throws {
        let h = try EventHarness()
        #expect(try h.fault([0, 1, 2, 3]) == .success)
        let gone = UnsafeMutableRawPointer(bitPattern: UInt(h.address(1)))
        #expect(munmap(gone, 2 << 12) == 0)  // blocks until the UNMAP event is read
        try h.service.barrier().wait()
        #expect(h.service.statistics.uffdUnmap == 1)
        #expect(!h.translated(1) && !h.translated(2) && h.translated(0) && h.translated(3))
        #expect(try h.fault([1]) == .invalid)
        #expect(try h.fault([5]) == .success)  // the rest of the mapping is fine
        #expect(h.engine.statistics.hostGoneFaults == 1)
        // The region's pages mapped at the same place again, declared with a host-address update.
        #expect(mmap(gone, 2 << 12, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, h.region.fd, 4096) == gone)
        try h.service.updateHostAddress(iova: EventHarness.iova, size: h.region.length, vaddr: h.region.base)
        #expect(try h.fault([1]) == .success)
        #expect(try h.service.checkInvariants().wait().isEmpty)
    }

    @Test func mremapMarksTheOldRangeGoneAndTheNewAddressCanBeDeclared() throws {
        let h = try EventHarness(pages: 16)
        #expect(try h.fault([0, 1]) == .success)
        UnsafeMutableRawPointer(bitPattern: UInt(h.address(0)))!.storeBytes(of: 0x5151, as: UInt64.self)
        let target = try HostRegion(length: h.region.length)
        let moved = iopf_mremap(
            UnsafeMutableRawPointer(bitPattern: UInt(h.region.base)), Int(h.region.length), Int(h.region.length),
            UnsafeMutableRawPointer(bitPattern: UInt(target.base)))
        #expect(moved == UnsafeMutableRawPointer(bitPattern: UInt(target.base)))
        // The old range is free now; another test's thread may map it at once, so the
        // region must not unmap it at its end (found by a TSan run: a device's ring, mapped
        // there meanwhile, vanished).
        h.region.movedAway()
        try h.service.barrier().wait()
        #expect(h.service.statistics.uffdRemap == 1)
        #expect(!h.translated(0) && !h.translated(1))
        #expect(try h.fault([0]) == .invalid)
        // VFIO_DMA_MAP_FLAG_VADDR: the memory lives at `target` now.
        try h.service.updateHostAddress(iova: EventHarness.iova, size: h.region.length, vaddr: target.base)
        #expect(try h.fault([0]) == .success)
        // The pages moved, their physical address did not.
        #expect(h.engine.pageTable(h.domain).translate(EventHarness.iova)?.phys == h.region.phys!)
        #expect(UnsafeRawPointer(bitPattern: UInt(target.base))!.load(as: UInt64.self) == 0x5151)
        #expect(try h.service.checkInvariants().wait().isEmpty)
        withExtendedLifetime(target) {}
    }

    @Test func concurrentHostChangesAndFaultsNeverDeadlock() throws {
        let h = try EventHarness(pages: 256)
        let done = DispatchSemaphore(value: 0)
        let hostThread = Thread { [region = h.region] in
            for i in 0..<300 {
                let p = (i * 37) % 250
                _ = madvise(
                    UnsafeMutableRawPointer(bitPattern: UInt(region.base) + UInt(p) << 12), 4 << 12, MADV_DONTNEED)
            }
            done.signal()
        }
        hostThread.start()
        var answered = 0
        for i in 0..<300 where try h.fault([(i * 11) % 256]) != nil { answered += 1 }
        #expect(done.wait(timeout: .now() + 30) == .success, "a host thread is stuck in madvise")
        #expect(answered == 300)
        try h.service.barrier().wait()
        #expect(h.service.statistics.uffdRemove == 300)
        #expect(try h.service.checkInvariants().wait().isEmpty)
    }

    @Test func removingAMappingUnwatchesItsRange() throws {
        let h = try EventHarness()
        try h.service.unmap(iova: EventHarness.iova, size: h.region.length)
        // No longer registered: no event, and madvise does not wait for one.
        #expect(madvise(UnsafeMutableRawPointer(bitPattern: UInt(h.region.base)), 4096, MADV_DONTNEED) == 0)
        try h.service.barrier().wait()
        #expect(h.service.statistics.uffdEvents == 0)
    }

    @Test func aliasedHostMemoryStaysWatchedWhileAMappingUsesIt() throws {
        let h = try EventHarness()
        try h.service.map(iova: 2 << 30, vaddr: h.region.base, size: 8 << 12, prot: .read)
        try h.service.unmap(iova: 2 << 30, size: 8 << 12)
        #expect(madvise(UnsafeMutableRawPointer(bitPattern: UInt(h.region.base)), 4096, MADV_DONTNEED) == 0)
        try h.service.barrier().wait()
        #expect(h.service.statistics.uffdEvents == 1)
    }

    @Test func memoryTheKernelCannotWatchIsRefusedAtMapTime() throws {
        let h = try EventHarness()
        let fd = open("/proc/self/exe", O_RDONLY)
        defer { close(fd) }
        let file = mmap(nil, 4096, PROT_READ, MAP_SHARED, fd, 0)!
        defer { munmap(file, 4096) }
        let error = #expect(throws: UserfaultfdError.self) {
            try h.service.map(iova: 3 << 30, vaddr: UInt64(UInt(bitPattern: file)), size: 4096, prot: .read)
        }
        #expect(error?.description.contains("file mappings") == true)
        #expect(h.engine.mappingCount == 1)
        // Unmapped memory is refused too.
        let hole = try HostRegion(length: 4096)
        let holeAddress = hole.base
        withExtendedLifetime(hole) {}
        #expect(throws: UserfaultfdError.self) {
            try h.service.map(iova: 4 << 30, vaddr: holeAddress + (1 << 40), size: 4096, prot: .read)
        }
        #expect(h.engine.mappingCount == 1)
    }

    @Test func withoutHostEventsTheServiceStillServes() throws {
        var config = ServiceConfiguration()
        config.hostEvents = false
        let engine = FaultEngine(memory: ProcessMemory())
        let service = try FaultService(engine: engine, configuration: config)
        #expect(!service.hostEventsEnabled && service.hostEventsUnavailable != nil)
        try service.start()
        defer { service.stop() }
        let domain = try service.createDomain(local: DomainIOTLBs())
        let region = try HostRegion(length: 1 << 20)
        try service.map(iova: 0, vaddr: region.base, size: region.length, prot: .read)
        // madvise returns (nothing watches the range), and a fault there is still served:
        // mapped, answered SUCCESS, and translated to the region's page.
        #expect(madvise(UnsafeMutableRawPointer(bitPattern: UInt(region.base)), 4096, MADV_DONTNEED) == 0)
        let channel = try DeviceChannel(service.attach(deviceID: 1, pasid: nil, domain: domain, credit: 8))
        try channel.send([
            PageRequest(flags: [.lastPage], deviceID: 1, groupIndex: 1, perm: [.read], addr: 4096, cookie: 3)
        ])
        #expect(try channel.receive(spinNanoseconds: 0, timeoutMs: 5000) == [PageResponse(cookie: 3, code: .success)])
        #expect(engine.isMarkedMapped(iova: 4096))
        #expect(engine.pageTable(domain).translate(4096)?.phys == region.phys! + 4096)
    }

    @Test func lateAccessesAreCountedOnlyInsideAnEventWindow() {
        let w = HostChangeWindow()
        #expect(!w.mustSkip(0x1000))
        w.beginHostChange(0x1000..<0x3000)
        #expect(w.mustSkip(0x2000) && w.lateAccesses == 0)  // changing, event not read yet
        w.beginEvent(0x1000..<0x3000)
        #expect(w.mustSkip(0x2fff) && w.lateAccesses == 1)
        #expect(!w.mustSkip(0x3000) && w.lateAccesses == 1)
        w.endEvent(0x1000..<0x3000)
        w.endHostChange(0x1000..<0x3000)
        #expect(!w.mustSkip(0x2000) && w.lateAccesses == 1)
    }

    @Test func serveWithHostChurnSeesEventsAndStaysConsistent() throws {
        var o = ServeOptions()
        o.devices = 2
        o.memoryBytes = 16 << 20
        o.seconds = 1.5
        o.hostChurnInterval = 0.005
        o.spinNanoseconds = 20_000
        let r = try ServeSession.run(o)
        #expect(r.problems.isEmpty, "\(r.problems)")
        #expect(r.uffdEvents > 0 && r.hostChanges > 0)
        #expect(r.uffdEventKinds.values.allSatisfy { $0 > 0 }, "\(r.uffdEventKinds)")
        #expect(r.integrityErrors == 0 && r.violations == 0)
    }
}

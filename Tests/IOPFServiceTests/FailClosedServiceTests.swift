// Fail closed in the service, and OS failures injected through its seams:
// lost host events stop granting; transient io_uring submit errors are retried and a
// fatal one fails later commands at once; an overflowed completion queue loses nothing;
// a refused host-address update leaves nothing watched; aliased pins stay locked;
// madvise, mlock, submission-queue and eventfd failures planted at their call sites.

import CIOPFShim
import Foundation
import Glibc
import SystemPackage
import Testing
import IOPFTestSupport
@testable import IOPFCore
@testable import IOPFDevice
@testable import IOPFService
@testable import IOPFSimulation
@_spi(SharedRings) @testable import IOPFSystem

@Suite(.serialized, .timeLimit(.minutes(15))) struct FailClosedServiceTests {
    @Test func aReadErrorOnTheUserfaultfdStopsGranting() throws {
        let h = try EventHarness()
        #expect(try h.fault([0]) == .success)
        h.service.uffd!.planted.withLock { $0.append(.error(.ioError)) }
        // A real event makes the loop read; the read fails; the uffd is closed, which also
        // lets this madvise return.
        #expect(madvise(UnsafeMutableRawPointer(bitPattern: UInt(h.address(8))), 4096, MADV_DONTNEED) == 0)
        try h.service.barrier().wait()
        let stats = h.service.statistics
        #expect(stats.stopped?.contains("reading host events failed") == true, "\(stats.stopped ?? "nil")")
        #expect(h.engine.failure != nil)
        #expect(try h.fault([1]) == .invalid, "a fault was granted with host events gone")
    }

    @Test func anEventKindNeverAskedForStopsGranting() throws {
        let h = try EventHarness()
        #expect(try h.fault([0]) == .success)
        var msg = [UInt8](repeating: 0, count: UserfaultfdSource.messageBytes)
        msg[0] = UInt8(UFFD_EVENT_FORK)
        h.service.uffd!.planted.withLock { $0.append(.bytes(msg)) }
        #expect(madvise(UnsafeMutableRawPointer(bitPattern: UInt(h.address(8))), 4096, MADV_DONTNEED) == 0)
        try h.service.barrier().wait()
        #expect(h.service.statistics.stopped?.contains("never asked for") == true)
        #expect(try h.fault([1]) == .invalid)
    }

    @Test func transientSubmitErrorsAreRetried() throws {
        let h = try EventHarness()
        h.service.planted.plant(.submit, [EAGAIN, EBUSY, EINTR, EAGAIN])
        for p in 0..<8 { #expect(try h.fault([p]) == .success) }
        try h.service.barrier().wait()
        #expect(h.service.statistics.stopped == nil)
    }

    @Test func aFatalSubmitErrorFailsLaterCommandsAtOnce() throws {
        let h = try EventHarness()
        #expect(try h.fault([0]) == .success)
        h.service.planted.plant(.submit, [EBADF])
        // The loop stops at its next submit; the barrier queued now or after fails at once.
        let first = Result { try h.service.barrier().wait() }
        let start = ContinuousClock.now
        let later = Result { try h.service.barrier().wait() }
        #expect(ContinuousClock.now - start < .seconds(1))
        #expect(throws: ServiceError.self) { try later.get() }
        _ = first
        #expect(h.service.statistics.stopped?.contains("event loop stopped") == true)
        #expect(throws: ServiceError.self) { try h.service.invalidate(hostAddress: h.address(0), length: 4096).wait() }
    }

    /// A service on an io_uring of two entries (stream channels, no host events) with
    /// `devices` attached over 64 pages mapped at 1 GiB. The region must outlive the test.
    static func twoEntryRing(devices: Int) throws -> (HostRegion, FaultService, [DeviceChannel]) {
        let region = try HostRegion(length: 64 << 12)
        let engine = FaultEngine(memory: ProcessMemory())
        let domain = try engine.createDomain(invalidator: DomainIOTLBs())
        var config = ServiceConfiguration()
        config.transport = .socket
        config.ringEntries = 2
        config.hostEvents = false
        let service = try FaultService(engine: engine, configuration: config)
        try service.start()
        do {
            try service.map(iova: 1 << 30, vaddr: region.base, size: region.length, prot: .readWrite)
            let channels = try (1...devices).map { id in
                try DeviceChannel(service.attach(deviceID: UInt32(id), domain: domain))
            }
            return (region, service, channels)
        } catch {
            service.stop()
            throw error
        }
    }

    /// Eight stream devices on a ring of two entries (four completions): their reads
    /// complete together, the queue overflows, and every group is still answered.
    @Test func anOverflowedCompletionQueueLosesNothing() throws {
        let (region, service, channels) = try Self.twoEntryRing(devices: 8)
        defer { service.stop() }
        _ = region
        for round in 0..<8 {
            for (k, c) in channels.enumerated() {
                try c.send([
                    PageRequest(
                        flags: [.lastPage], deviceID: UInt32(k + 1), groupIndex: 1, perm: [.read],
                        addr: (1 << 30) + UInt64(round * 8 + k) << 12, cookie: UInt32(round + 1))
                ])
            }
            for (k, c) in channels.enumerated() {
                let answer = try c.receive(spinNanoseconds: 0, timeoutMs: 5000)
                #expect(
                    answer?.first?.code == .success, "device \(k + 1) round \(round): \(String(describing: answer))")
            }
        }
        #expect(service.engine.mappedPageCount == 64)
        try service.barrier().wait()
        #expect(
            service.statistics.completionOverflows > 0, "the queue never overflowed: the test did not test anything")
    }

    @Test func aRefusedHostAddressUpdateLeavesNothingWatched() throws {
        let h = try EventHarness()
        let other = try HostRegion(length: 64 << 12)
        // The new range registers, then the engine refuses (it is stopped).
        h.engine.stopGranting(reason: "stopped by the test")
        #expect(throws: FatalInvalidationError.self) {
            try h.service.updateHostAddress(iova: EventHarness.iova, size: 64 << 12, vaddr: other.base)
        }
        try #require(!Self.vmas(in: other.base..<(other.base + other.length)).isEmpty, "smaps was not read")
        #expect(
            Self.vmas(in: other.base..<(other.base + other.length)).allSatisfy { !$0.registered },
            "the refused update left its range registered")
        #expect(Self.vmas(in: h.region.base..<(h.region.base + 4096)).allSatisfy { $0.registered })
    }

    /// The VMAs overlapping `range`, from /proc/self/smaps: whether each is registered with
    /// a userfaultfd (VmFlags `um`/`uw`) and its `Locked:` kB.
    static func vmas(in range: Range<UInt64>) -> [(range: Range<UInt64>, registered: Bool, lockedKB: Int)] {
        Sys.mappings(overlapping: range).map { m in
            (m.range, m.flags.contains("um") || m.flags.contains("uw"), m.lockedKB)
        }
    }

    static func lockedKB(_ range: Range<UInt64>) -> Int { vmas(in: range).reduce(0) { $0 + $1.lockedKB } }

    @Test func aliasedPinnedMappingsStayLockedUntilTheLastGoes() throws {
        let region = try HostRegion(length: 256 << 10)
        let engine = FaultEngine(memory: ProcessMemory())
        _ = try engine.createDomain(invalidator: DomainIOTLBs())
        var config = ServiceConfiguration()
        config.hostEvents = false
        let service = try FaultService(engine: engine, configuration: config)
        try service.start()
        defer { service.stop() }
        try service.mapPinned(iova: 1 << 30, vaddr: region.base, size: region.length, prot: .read)
        try service.mapPinned(iova: 1 << 31, vaddr: region.base + (128 << 10), size: 128 << 10, prot: .read)
        let all = region.base..<(region.base + region.length)
        #expect(Self.lockedKB(all) == 256)
        try service.unmap(iova: 1 << 30, size: region.length)
        // The first half is free now; the second is still pinned by the alias.
        #expect(Self.lockedKB(all) == 128, "munlock of one alias unlocked pages the other pins")
        try service.unmap(iova: 1 << 31, size: 128 << 10)
        #expect(Self.lockedKB(all) == 0)
    }

    // MARK: OS failures injected (§5)

    /// A page the kernel would not populate is answered INVALID and leaves nothing behind:
    /// no translation, no bit, no mapped page; the same page faults in on the next try.
    @Test(arguments: [EFAULT, ENOMEM, EHWPOISON])
    func aFailedPopulateAnswersInvalidAndLeavesNothing(errno e: Int32) throws {
        let h = try EventHarness()
        let memory = try #require(h.engine.memory as? ProcessMemory)
        #expect(try h.fault([0]) == .success)
        memory.planted.plant(.madvise, [e])
        #expect(try h.fault([3, 4]) == .invalid)
        #expect(memory.planted.remaining(.madvise) == 0, "the planted failure was never reached")
        #expect(h.engine.statistics.resolveFailures == 2)  // one per request
        #expect(!h.translated(3) && !h.marked(3) && !h.translated(4) && !h.marked(4))
        #expect(h.engine.mappedPageCount == 1)
        #expect(try h.fault([3, 4]) == .success)
        #expect(h.translated(3) && h.marked(4) && h.engine.mappedPageCount == 3)
    }

    /// EINTR and EAGAIN are retried (three attempts in all); a third in a row fails the group.
    @Test func interruptedOrBusyPopulatesAreRetried() throws {
        let h = try EventHarness()
        let memory = try #require(h.engine.memory as? ProcessMemory)
        memory.planted.plant(.madvise, [EINTR, EAGAIN])
        #expect(try h.fault([1]) == .success)
        memory.planted.plant(.madvise, [EAGAIN, EINTR, EAGAIN])
        #expect(try h.fault([2]) == .invalid)
        #expect(memory.planted.remaining(.madvise) == 0)
        #expect(try h.fault([2]) == .success)
        #expect(h.engine.statistics.resolveFailures == 1)
    }

    /// mlock failing on the second batch of a pinned mapping: the first batch is unlocked
    /// and uncharged, no mapping is left, the error says why, faults elsewhere are still
    /// served, and the same mapping succeeds afterwards.
    @Test func anMlockFailingMidwayUnwindsEverything() throws {
        let h = try EventHarness()
        let memory = try #require(h.engine.memory as? ProcessMemory)
        let pages = 2 * FaultEngine.pinBatchPages
        let region = try HostRegion(length: UInt64(pages) << 12)
        let all = region.base..<(region.base + region.length)
        let mappingsBefore = h.engine.mappingCount
        memory.planted.plant(.mlock, [0, ENOMEM])
        do {
            try h.service.mapPinned(iova: 1 << 36, vaddr: region.base, size: region.length, prot: .readWrite)
            Issue.record("mapPinned succeeded with mlock failing")
        } catch {
            #expect("\(error)".contains("mlock"), "\(error)")
        }
        #expect(memory.planted.remaining(.mlock) == 0, "the planted failure was never reached")
        #expect(Self.lockedKB(all) == 0, "the first batch stayed locked")
        #expect(h.engine.lockedMemory.lockedPages == 0, "the first batch stayed charged")
        #expect(h.engine.mappingCount == mappingsBefore)
        #expect(memory.pinCount(at: region.base) == 0)
        #expect(try h.fault([5]) == .success)
        try h.service.mapPinned(iova: 1 << 36, vaddr: region.base, size: region.length, prot: .readWrite)
        #expect(Self.lockedKB(all) == Int(region.length >> 10))
        #expect(h.engine.lockedMemory.lockedPages == pages)
        try h.service.unmap(iova: 1 << 36, size: region.length)
        #expect(Self.lockedKB(all) == 0 && h.engine.lockedMemory.lockedPages == 0)
    }

    /// A kernel refusing submits (EBUSY) on a two-entry queue, so the queue fills:
    /// retried (completions set aside) while it clears within `Ring.busyLimit`, and a loud
    /// stop with commands failing at once when it does not.
    @Test func refusedSubmitsAreRetriedThenStopTheLoopLoudly() throws {
        let (region, service, channels) = try Self.twoEntryRing(devices: 4)
        defer { service.stop() }
        _ = region
        func round(_ r: Int) throws -> [ResponseCode?] {
            for (k, c) in channels.enumerated() {
                try c.send([
                    PageRequest(
                        flags: [.lastPage], deviceID: UInt32(k + 1), groupIndex: 1, perm: [.read],
                        addr: (1 << 30) + UInt64(r * 4 + k) << 12, cookie: UInt32(r + 1))
                ])
            }
            return try channels.map { try $0.receive(spinNanoseconds: 0, timeoutMs: 5000)?.first?.code }
        }
        // Transient: 40 refusals in a row, a few milliseconds of backoff.
        service.planted.plant(.submit, Array(repeating: EBUSY, count: 40))
        #expect(try round(0) == Array(repeating: .success, count: 4))
        #expect(try round(1) == Array(repeating: .success, count: 4))
        #expect(service.planted.remaining(.submit) == 0, "the refusals were never met")
        #expect(service.statistics.stopped == nil)
        // Persistent: the loop stops within about a second, says why, and answers the rest.
        service.planted.plant(.submit, Array(repeating: EBUSY, count: 1_000_000))
        _ = try? round(2)
        let deadline = ContinuousClock.now + .seconds(10)
        while service.statistics.stopped == nil && ContinuousClock.now < deadline { usleep(10_000) }
        #expect(
            service.statistics.stopped?.contains("refused every submit") == true,
            "\(service.statistics.stopped ?? "nil")")
        let start = ContinuousClock.now
        #expect(throws: ServiceError.self) { try service.barrier().wait() }
        #expect(ContinuousClock.now - start < .seconds(1))
    }

    /// A wake the kernel refused would leave the device asleep with answers waiting: that
    /// device alone is let go; another keeps being served. EAGAIN (its counter is full, so
    /// it is awake anyway) is not a failure.
    @Test func aFailedWakeLetsThatDeviceGoAlone() throws {
        let h = try EventHarness()
        let other = try DeviceChannel(h.service.attach(deviceID: 2, domain: h.domain))
        guard case .shared(let queue, _, _) = h.channel.backing else { Issue.record("not a shared ring"); return }
        // Faults with the device marked asleep until the planted wake result has been
        // taken: a wake is written only when none is in flight, and under a slow build the
        // previous one may not have completed yet.
        var page = 0
        func faultUntilWakesTaken() {
            for _ in 0..<50 where h.service.planted.remaining(.wakeWrite) > 0 {
                queue.storeSequential(.deviceWaiting, 1)
                _ = try? h.fault([page % 48])
                page += 1
                usleep(1000)
            }
        }
        h.service.planted.plant(.wakeWrite, [EAGAIN])
        faultUntilWakesTaken()
        #expect(h.service.planted.remaining(.wakeWrite) == 0, "no wake was written")
        #expect(try h.fault([60]) == .success)
        #expect(h.service.statistics.devicesClosed == 0)
        h.service.planted.plant(.wakeWrite, [EIO])
        faultUntilWakesTaken()
        #expect(h.service.planted.remaining(.wakeWrite) == 0, "no wake was written")
        let deadline = ContinuousClock.now + .seconds(5)
        while h.service.statistics.devicesClosed == 0 && ContinuousClock.now < deadline { usleep(1000) }
        #expect(h.service.statistics.devicesClosed == 1)
        // The device learns it was let go: the ring says the service closed it.
        #expect(try h.channel.receive(spinNanoseconds: 0, timeoutMs: 1000) == nil)
        try other.send([
            PageRequest(
                flags: [.lastPage], deviceID: 2, groupIndex: 1, perm: [.read],
                addr: EventHarness.iova + (9 << 12), cookie: 77)
        ])
        #expect(try other.receive(spinNanoseconds: 0, timeoutMs: 5000)?.first?.code == .success)
    }

    /// A lost ring of the command doorbell delays the command by at most one sweep.
    @Test func aLostCommandDoorbellLosesNothing() throws {
        let h = try EventHarness()
        h.service.planted.plant(.commandDoorbell, [EBADF])
        _ = try h.service.invalidate(hostAddress: h.address(0), length: 4096).wait()
        try h.service.barrier().wait()
        #expect(h.service.planted.remaining(.commandDoorbell) == 0)
        #expect(h.service.statistics.doorbellWriteFailures == 1)
        #expect(try h.fault([2]) == .success)
    }
}

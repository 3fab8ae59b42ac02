// The device protocol over a real socket: the Swift client's happy path, invalidations
// acknowledged and fenced, and one hostile peer per protocol error class and per ring
// abuse. Each test checks that the misbehaving peer alone is answered or disconnected and
// that the service goes on serving.

import Foundation
import Glibc
import Testing
import IOPFTestSupport
@testable import IOPFCore
@testable import IOPFDevice
@testable import IOPFService
@testable import IOPFSimulation
@_spi(SharedRings) @testable import IOPFSystem

@Suite(.serialized, .timeLimit(.minutes(15))) struct ProtocolTests {
    @Test func aDeviceAttachesFaultsTranslatesAndWritesTheHostsMemory() throws {
        let s = try ListeningService()
        let (client, a) = try s.device(7)
        #expect(
            a.windows.count == 1 && a.memory.regionInfo.count == 1 && a.credit == 32 && a.invalidateTimeoutMs == 1000)
        let iova = a.windows[0].iova + 5 << 12
        #expect(try client.translate(iova: iova, pages: 1).entries == [0])  // not present yet
        try a.channel.send([
            PageRequest(flags: [.lastPage], deviceID: 7, groupIndex: 1, perm: [.read, .write], addr: iova, cookie: 1)
        ])
        let responses = try a.channel.receive(spinNanoseconds: 0, timeoutMs: 5000)
        #expect(responses == [PageResponse(cookie: 1, code: .success)])
        let entry = try client.translate(iova: iova, pages: 1).entries[0]
        #expect(entry & TranslateReply.write != 0)
        // DMA through the translation into this process's mapping of the region lands in
        // the host's memory at the mapping's address.
        #expect(a.memory.store(entry & ~0xFFF, 0xFEED_F00D))
        #expect(
            UnsafeRawPointer(bitPattern: UInt(s.host(of: a.windows[0]) + 5 << 12))!.load(as: UInt64.self) == 0xFEED_F00D
        )
        // Outside its window a device translates nothing and faults in nothing.
        #expect(try client.translate(iova: a.windows[0].iova + a.windows[0].size, pages: 1).entries == [0])
        try client.detach()
        let stats = s.waitFor { $0.devicesClosed == 1 }
        #expect(stats.externalDevices == 1 && stats.protocolErrors == 0 && stats.peersDisconnected == 0)
    }

    @Test func aSyncWaitsForTheAcknowledgementAndAStaleReplyIsDropped() throws {
        let s = try ListeningService()
        let (client, a) = try s.device()
        client.serveInvalidations { _ in true }
        let window = a.windows[0]
        try a.channel.send([
            PageRequest(flags: [.lastPage], deviceID: 1, groupIndex: 1, perm: [.read], addr: window.iova, cookie: 1)
        ])
        _ = try a.channel.receive(spinNanoseconds: 0, timeoutMs: 5000)
        let before = try client.translate(iova: window.iova, pages: 1)
        _ = try s.service.invalidate(hostAddress: s.host(of: window), length: 4096).wait()
        let stats = s.service.statistics
        #expect(stats.invalidationsSent >= 1 && stats.invalidationsAcked == stats.invalidationsSent)
        #expect(client.invalidationsAcked.load(ordering: .relaxed) >= 1)
        // A reply produced before that INVALIDATE is older than what the device processed.
        let iotlb = DeviceIOTLB(entries: 4, iovaBase: window.iova, pages: 1, forgetOnInvalidate: false)
        iotlb.invalidate([IOVARange(start: window.iova, last: window.iova + 4095)], sequence: before.sequence + 1)
        #expect(iotlb.state.withLock { $0.invalidationSequence } > before.sequence)
        #expect(try client.translate(iova: window.iova, pages: 1).sequence >= before.sequence + 1)
    }

    @Test func aDeviceThatNeverAcknowledgesIsFencedAndTheOthersKeepGoing() throws {
        let s = try ListeningService(timeout: .milliseconds(200))
        let (good, ga) = try s.device(1)
        good.serveInvalidations { _ in true }
        let (bad, ba) = try s.device(2)
        bad.serveInvalidations { _ in false }
        // Both fault a page in, so that both hold translations to be invalidated.
        for (id, a) in [(UInt32(1), ga), (UInt32(2), ba)] {
            try a.channel.send([
                PageRequest(
                    flags: [.lastPage], deviceID: id, groupIndex: 1, perm: [.read], addr: a.windows[0].iova, cookie: 1)
            ])
            _ = try a.channel.receive(spinNanoseconds: 0, timeoutMs: 5000)
        }
        let start = ContinuousClock.now
        _ = try s.service.invalidate(hostAddress: s.host(of: ba.windows[0]), length: 4096).wait()
        _ = try s.service.invalidate(hostAddress: s.host(of: ga.windows[0]), length: 4096).wait()
        let waited = ContinuousClock.now - start
        let stats = s.waitFor { $0.devicesFenced == 1 }
        #expect(stats.devicesFenced == 1 && stats.protocolErrorKinds[.invalidateTimeout] == 1)
        #expect(waited < .seconds(2), "the sync waited \(waited) for a 200 ms deadline")
        // The fenced device is disconnected; the other still faults.
        #expect(throws: DeviceClientError.self) { try bad.translate(iova: ba.windows[0].iova, pages: 1) }
        try ga.channel.send([
            PageRequest(
                flags: [.lastPage], deviceID: 1, groupIndex: 2, perm: [.read], addr: ga.windows[0].iova + 4096,
                cookie: 2)
        ])
        #expect(
            try ga.channel.receive(spinNanoseconds: 0, timeoutMs: 5000) == [PageResponse(cookie: 2, code: .success)])
    }

    @Test func protocolErrorsGetAnErrorReplyOrADisconnectAndAreCountedByKind() throws {
        let s = try ListeningService()
        // An unknown command: an error reply; the connection stays usable.
        let p = try RawPeer(s.path)
        try p.send(
            Wire.message(command: .hello, id: 3, payload: []).enumerated().map { $0.offset == 2 ? 42 : $0.element })
        let unknown = try p.receive()
        #expect(
            unknown?.header.isError == true && unknown?.header.error == WireErrno.notSupported
                && unknown?.header.id == 3)
        // A payload of the wrong size: EINVAL, still connected.
        try p.send(Wire.message(command: .hello, id: 4, payload: [1, 2, 3]))
        #expect(try p.receive()?.header.error == WireErrno.invalid)
        // ATTACH before HELLO: refused.
        try p.send(Attach(deviceID: 1).message(id: 5))
        #expect(try p.receive()?.header.error == WireErrno.protocolError)
        // Descriptors on a request that takes none: refused, and closed by the service.
        let stray = try Sys.eventfd()
        try p.send(Hello().message(id: 6), fds: [stray])
        Sys.close(stray)
        #expect(try p.receive()?.header.error == WireErrno.invalid)
        // A message beyond the size limit.
        try p.send([UInt8](repeating: 0, count: WireLimits.maxMessageBytes + 100))
        #expect(try p.receive()?.header.error == WireErrno.messageSize)
        try p.hello()
        // A header whose size lies: the framing cannot be trusted, the peer goes.
        var lying = Translate(iova: 0, pages: 1).message(id: 8)
        lying[4] = 200
        try p.send(lying)
        #expect(try p.isClosed())
        // A major version the service does not speak: an error reply, then the disconnect.
        let old = try RawPeer(s.path)
        try old.send(Hello(major: 2).message(id: 1))
        #expect(try old.receive()?.header.error == WireErrno.notSupported)
        #expect(try old.isClosed())
        let stats = s.waitFor { $0.peersDisconnected == 2 }
        #expect(stats.protocolErrorKinds[.unknownCommand] == 1 && stats.protocolErrorKinds[.badSize] == 1)
        #expect(stats.protocolErrorKinds[.badState] == 1 && stats.protocolErrorKinds[.unexpectedFDs] == 1)
        #expect(stats.protocolErrorKinds[.tooLarge] == 1 && stats.protocolErrorKinds[.badHeader] == 1)
        #expect(stats.protocolErrorKinds[.badVersion] == 1 && stats.peersDisconnected == 2)
        // And the service still serves.
        let (client, a) = try s.device(9)
        #expect(try client.translate(iova: a.windows[0].iova, pages: 4).entries.count == 4)
    }

    @Test func acknowledgementsAreChecked() throws {
        let s = try ListeningService()
        let (client, _) = try s.device(1)
        let invalidation = RawPeer(fd: try Sys.dup(client.invalidationFD))
        try invalidation.send(InvalidateAck(sequence: 99).message(id: 1, flags: .reply))
        #expect(s.waitFor { $0.protocolErrorKinds[.unknownAck] == 1 }.protocolErrorKinds[.unknownAck] == 1)
        try invalidation.send(Hello().message(id: 2))  // not an acknowledgement at all
        let stats = s.waitFor { $0.peersDisconnected == 1 }
        #expect(stats.protocolErrorKinds[.badAck] == 1 && stats.peersDisconnected == 1)
    }

    // MARK: The shared ring

    func ring(_ a: DeviceAttachment) -> (SharedQueue, doorbell: CInt) {
        guard case .shared(let q, let doorbell, _) = a.channel.backing else {
            preconditionFailure("shared channel expected")
        }
        return (q, doorbell)
    }

    @Test func theRingMemfdCannotBeResizedByTheDevice() throws {
        let s = try ListeningService()
        let (_, a) = try s.device()
        let (q, _) = ring(a)
        #expect(ftruncate(q.fd, 0) == -1 && errno == EPERM)
        #expect(ftruncate(q.fd, off_t(SharedQueue.byteCount * 2)) == -1 && errno == EPERM)
    }

    @Test func aTailFarAheadOfTheHeadFencesTheDevice() throws {
        let s = try ListeningService()
        let (_, a) = try s.device(1)
        let (_, other) = try s.device(2)
        let (q, doorbell) = ring(a)
        q.storeSequential(.requestTail, 100_000)
        FaultService.ring(doorbell)
        let stats = s.waitFor { $0.devicesFenced == 1 }
        #expect(stats.protocolErrorKinds[.ringOverrun] == 1 && stats.records == 0)
        try other.channel.send([
            PageRequest(
                flags: [.lastPage], deviceID: 2, groupIndex: 1, perm: [.read], addr: other.windows[0].iova, cookie: 3)
        ])
        #expect(
            try other.channel.receive(spinNanoseconds: 0, timeoutMs: 5000) == [PageResponse(cookie: 3, code: .success)])
    }

    /// The "answered at" words are the device's to scribble on: any "stamps wanted" value
    /// only asks for a clock read, and the service never reads "answered at" back.
    @Test func garbageInTheStampWordsChangesNothingButTheStamp() throws {
        let s = try ListeningService()
        let (_, a) = try s.device(1)
        let (q, _) = ring(a)
        let raw = try #require(mmap(nil, SharedQueue.byteCount, PROT_READ | PROT_WRITE, MAP_SHARED, q.fd, 0))
        defer { munmap(raw, SharedQueue.byteCount) }
        raw.storeBytes(of: 0xDEAD_BEEF, toByteOffset: SharedRingLayout.stampsWantedOffset, as: UInt32.self)
        raw.storeBytes(of: UInt64.max, toByteOffset: SharedRingLayout.answeredAtOffset, as: UInt64.self)
        let before = Sys.monotonicNanoseconds()
        try a.channel.send([
            PageRequest(
                flags: [.lastPage], deviceID: 1, groupIndex: 1, perm: [.read],
                addr: a.windows[0].iova, cookie: 5)
        ])
        #expect(try a.channel.receive(spinNanoseconds: 0, timeoutMs: 5000) == [PageResponse(cookie: 5, code: .success)])
        #expect(
            a.channel.answeredAt >= before && a.channel.answeredAt <= Sys.monotonicNanoseconds(),
            "the service's stamp replaced the garbage: \(a.channel.answeredAt)")
        let stats = s.waitFor { $0.groups == 1 }
        #expect(stats.protocolErrors == 0 && stats.devicesFenced == 0)
    }

    @Test func malformedRecordsAndCreditOverrunsAreAnsweredInvalidAndCounted() throws {
        let s = try ListeningService()
        let (_, a) = try s.device(1)
        var bad = PageRequest(
            flags: [.lastPage], deviceID: 1, groupIndex: 1, perm: [.read], addr: a.windows[0].iova, cookie: 4)
        bad.deviceID = 5  // another device's id
        try a.channel.send([bad])
        #expect(try a.channel.receive(spinNanoseconds: 0, timeoutMs: 5000) == [PageResponse(cookie: 4, code: .invalid)])
        let (q, doorbell) = ring(a)
        var raw = PageRequest(
            flags: [.lastPage], deviceID: 1, groupIndex: 2, perm: [.read], addr: a.windows[0].iova, cookie: 6
        ).bytes
        raw[20] = 7  // reserved field
        raw.withUnsafeBytes { q.requestSlot(1).copyMemory(from: $0) }
        q.storeSequential(.requestTail, 2)
        FaultService.ring(doorbell)
        let stats = s.waitFor { $0.protocolErrorKinds[.badRecord] == 1 }
        #expect(stats.protocolErrorKinds[.unknownDevice] == 1 && stats.protocolErrorKinds[.badRecord] == 1)
        #expect(stats.devicesFenced == 0)
    }

    @Test(arguments: [false, true])
    func creditOverrunsAreAnsweredInvalidAndPartialGroupsOfADeadDeviceToo(stream: Bool) throws {
        let s = try ListeningService()
        let (client, a) = try s.device(1, stream: stream, keep: false)
        let iova = a.windows[0].iova
        // 32 requests of credit: one group of 32 partial pages, then a 33rd request in another group.
        try a.channel.send(
            (0..<32).map { k in
                PageRequest(
                    flags: [], deviceID: 1, groupIndex: 1, perm: [.read], addr: iova + UInt64(k) << 12, cookie: 10)
            })
        try a.channel.send([
            PageRequest(flags: [.lastPage], deviceID: 1, groupIndex: 2, perm: [.read], addr: iova, cookie: 11)
        ])
        #expect(
            try a.channel.receive(spinNanoseconds: 0, timeoutMs: 5000) == [PageResponse(cookie: 11, code: .invalid)])
        #expect(s.waitFor { $0.protocolErrorKinds[.creditExceeded] == 1 }.protocolErrorKinds[.creditExceeded] == 1)
        // The device dies with group 1 open: it is answered INVALID (to nobody) and its credit freed.
        client.close()
        withExtendedLifetime(a) {}
        let stats = s.waitFor { $0.devicesClosed == 1 }
        #expect(stats.abandonedGroups == 1 && stats.devicesFenced == 0)
        let (_, b) = try s.device(1, stream: stream)
        try b.channel.send([
            PageRequest(flags: [.lastPage], deviceID: 1, groupIndex: 1, perm: [.read], addr: iova, cookie: 12)
        ])
        #expect(
            try b.channel.receive(spinNanoseconds: 0, timeoutMs: 5000) == [PageResponse(cookie: 12, code: .success)])
    }

    @Test func aStreamDeviceThatNeverReadsIsHeldBackAloneAndStopDoesNotBlock() throws {
        let s = try ListeningService()
        let (_, a) = try s.device(1, stream: true)
        let (_, other) = try s.device(2)
        guard case .stream(_, let writeFD) = a.channel.backing else { preconditionFailure("stream channel expected") }
        try Sys.setNonBlocking(writeFD, true)
        // One-page groups until the socket takes no more: the responses nobody reads fill the
        // socket, the service stops taking this device's requests (or fences it) and queues
        // nothing without bound.
        var cookie: UInt32 = 1
        var blocked = false
        for _ in 0..<100_000 where !blocked {
            let record = PageRequest(
                flags: [.lastPage], deviceID: 1, groupIndex: cookie % 512, perm: [.read],
                addr: a.windows[0].iova + UInt64(cookie % 256) << 12, cookie: cookie)
            do {
                try record.bytes.withUnsafeBytes { try Sys.writeAll(writeFD, $0) }
                cookie += 1
            } catch {
                blocked = true
            }
        }
        #expect(blocked, "the service kept reading 100000 requests whose responses nobody read")
        usleep(200_000)
        let held = s.service.statistics.records
        usleep(300_000)
        #expect(s.service.statistics.records == held, "still taking requests from a device that reads nothing")
        // The other device does not notice.
        try other.channel.send([
            PageRequest(
                flags: [.lastPage], deviceID: 2, groupIndex: 1, perm: [.read], addr: other.windows[0].iova, cookie: 9)
        ])
        #expect(
            try other.channel.receive(spinNanoseconds: 0, timeoutMs: 5000) == [PageResponse(cookie: 9, code: .success)])
        let before = ContinuousClock.now
        s.service.stop()
        #expect(ContinuousClock.now - before < .seconds(2))
    }

    @Test func aDeviceThatNeverReadsItsResponsesIsDisconnectedNotQueuedForever() throws {
        let s = try ListeningService()
        let (_, a) = try s.device(1)
        let (q, doorbell) = ring(a)
        var tail: UInt32 = 0
        // Send one-page groups, never consume a response; the service must give up.
        for k in 0..<5000 {
            while tail &- q.load(.requestHead) >= UInt32(SharedQueue.capacity) {
                if s.service.statistics.devicesFenced > 0 { break }
                usleep(100)
            }
            if s.service.statistics.devicesFenced > 0 { break }
            PageRequest(
                flags: [.lastPage], deviceID: 1, groupIndex: UInt32(k % 512), perm: [.read],
                addr: a.windows[0].iova + UInt64(k % 256) << 12, cookie: UInt32(k + 1)
            ).encode(into: q.requestSlot(tail))
            tail &+= 1
            q.storeSequential(.requestTail, tail)
            FaultService.ring(doorbell)
        }
        let stats = s.waitFor { $0.devicesFenced == 1 }
        #expect(stats.protocolErrorKinds[.responseBacklog] == 1)
    }

    @Test func aNonBlockingDoorbellOrAForgedHeadDoesNotMakeTheLoopSpin() throws {
        let s = try ListeningService()
        let (_, a) = try s.device(1)
        let (q, doorbell) = ring(a)
        try Sys.setNonBlocking(doorbell, true)  // shared with the service's copy
        FaultService.ring(doorbell)
        q.storeSequential(.requestHead, 77)  // the service's field, forged
        usleep(300_000)
        let before = s.service.statistics.loopTurns
        usleep(500_000)
        let turns = s.service.statistics.loopTurns - before
        #expect(turns < 50, "the loop turned \(turns) times in 0.5 s while idle")
        // And it still serves the device (once the device's own end sees the true head again).
        q.storeSequential(.requestHead, 0)
        try a.channel.send([
            PageRequest(
                flags: [.lastPage], deviceID: 1, groupIndex: 1, perm: [.read], addr: a.windows[0].iova, cookie: 8)
        ])
        #expect(try a.channel.receive(spinNanoseconds: 0, timeoutMs: 5000) == [PageResponse(cookie: 8, code: .success)])
    }

    @Test func aThousandConnectionsLeaveNoDescriptorOrMemoryBehind() throws {
        descriptorCounting.wait()
        defer { descriptorCounting.signal() }
        let s = try ListeningService()
        func cycle(_ k: Int) throws {
            let (client, a) = try s.device(UInt32(k % 7 + 1), stream: k % 2 == 1, keep: false)
            if k % 3 == 0 { try client.detach() }
            _ = a
            client.close()
        }
        for k in 0..<50 { try cycle(k) }  // warm up allocations and caches
        #expect(s.waitUntil { $0.devicesClosed == 50 })
        let fds = openFDs()
        // Other suites run beside this one and allocate meanwhile, so one batch's growth in
        // resident memory can be theirs. A leak grows every batch; their allocations do not
        // repeat in lockstep with ours. So: up to three batches of 1,000 connections, and the
        // test passes on the first batch that leaves resident memory and mappings flat.
        // ASan's quarantine keeps freed memory resident; the RSS check means nothing there.
        // TSan's shadow memory is several times what the other suites allocate meanwhile.
        let allowedKiB = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "__tsan_init") == nil ? 20_000 : 80_000
        let checkRSS = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "__asan_init") == nil
        var growth: [(rssKiB: Int, maps: Int)] = []
        var done = 50
        for _ in 0..<3 {
            let (rss, maps) = (residentKiB(), mappingCount())
            for k in done..<done + 1000 { try cycle(k) }
            done += 1000
            let stats = s.waitFor { $0.devicesClosed == done }
            #expect(stats.devicesClosed == done && stats.externalDevices == done)
            usleep(100_000)
            growth.append((residentKiB() - rss, mappingCount() - maps))
            if (!checkRSS || growth.last!.rssKiB < allowedKiB) && growth.last!.maps < 50 { break }
        }
        // A leak of even one descriptor per ten cycles stands out of the other suites' noise;
        // a suite that holds hundreds of connections for a moment (TenantTests) does not
        // hold them for five seconds. A leak only adds descriptors: fewer after than before
        // is another suite letting go of what it held when the count was taken.
        var after = openFDs()
        for _ in 0..<50 where after - fds >= 100 * growth.count {
            usleep(100_000)
            after = openFDs()
        }
        #expect(after - fds < 100 * growth.count, "descriptors: \(fds) before, \(after) after")
        let flat = growth.contains { (!checkRSS || $0.rssKiB < allowedKiB) && $0.maps < 50 }
        #expect(flat, "every batch of 1,000 connections grew (resident KiB, mappings): \(growth)")
        let footprint = try s.service.footprint().wait()
        #expect(footprint.peers == 0 && footprint.devices == 0, "\(footprint)")
    }
}

// A vhost-user back-end is another program: these play one that is wrong on purpose (its
// two sockets held by the test), against a service that also serves a bystander host and
// device, which must keep its throughput and its data. Each misbehaviour is fenced alone;
// a back-end that hangs up is gone, not fenced. The well-behaved path is checked byte for
// byte too: the UPDATE a miss gets names the physical address of exactly the page asked.

import Foundation
import Glibc
import IOPFCore
import IOPFDevice
import Synchronization
import SystemPackage
import Testing
import IOPFTestSupport

@testable import IOPFService
@testable import IOPFSystem
@testable import IOPFWire

/// The back-end's ends of a vhost-user connection the service serves, over 1 MiB of
/// memory mapped at `iova` in the service's domain.
final class FakeBackend {
    static let iova: UInt64 = 1 << 34
    let main: CInt
    let channel: CInt
    let device: VhostDevice
    let region: HostRegion

    init(_ s: ListeningService, runPages: Int = 512, faultAround: Int = 2) throws {
        region = try HostRegion(length: 1 << 20, alignment: 2 << 20)
        try s.service.map(iova: Self.iova, vaddr: region.base, size: 1 << 20, prot: .readWrite)
        var fds: [CInt] = [-1, -1]
        #expect(socketpair(AF_UNIX, CInt(SOCK_STREAM.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &fds) == 0)
        let (serviceChannel, backendChannel) = try Sys.seqpacketPair()
        main = fds[1]
        channel = backendChannel
        device = try s.service.attachVhost(
            main: FileDescriptor(rawValue: fds[0]), channel: FileDescriptor(rawValue: serviceChannel),
            domain: s.domain, deviceID: 9,
            runPages: runPages, faultAroundPages: faultAround)
    }

    deinit {
        Sys.close(main)
        Sys.close(channel)
    }

    func miss(_ iova: UInt64, permission: UInt8 = 3) throws {
        let m = VhostUser.IOTLBMessage(iova: iova, size: 0, userAddress: 0, permission: permission, kind: .miss)
        try Sys.send(
            channel, VhostUser.message(VhostUser.BackendRequest.iotlbMessage.rawValue, payload: m.bytes),
            nonBlocking: false)
    }

    /// The next request on the main socket (5 s at most): its header and IOTLB message.
    func next() throws -> (VhostUser.Header, VhostUser.IOTLBMessage) {
        let head = try read(VhostUser.headerBytes)
        let header = try head.withUnsafeBytes { try VhostUser.Header(bytes: $0) }
        let p = try read(Int(header.size))
        #expect(p.count == 32)
        let kind = VhostUser.IOTLBMessage.Kind(rawValue: p[25]) ?? .miss
        let m = p.withUnsafeBytes {
            VhostUser.IOTLBMessage(
                iova: $0.load(as: UInt64.self), size: $0.load(fromByteOffset: 8, as: UInt64.self),
                userAddress: $0.load(fromByteOffset: 16, as: UInt64.self), permission: p[24],
                kind: kind)
        }
        return (header, m)
    }

    private func read(_ count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            guard try Sys.pollReadable(main, timeoutMs: 5000) else { throw SystemCallError("recv", .timedOut) }
            let n = bytes.withUnsafeMutableBytes { recv(main, $0.baseAddress! + got, count - got, 0) }
            guard n > 0 else { throw SystemCallError("recv", .connectionReset) }
            got += n
        }
        return bytes
    }

    func ack(_ status: UInt64 = 0) throws {
        try Sys.send(
            main, VhostUser.message(.iotlbMessage, flags: .reply, payload: VhostUser.u64(status)), nonBlocking: false)
    }

    /// The statistics once `condition` holds (5 s at most).
    func waitFor(_ condition: (VhostStatistics) -> Bool) -> VhostStatistics {
        let deadline = ContinuousClock.now + .seconds(5)
        while !condition(device.statistics) && ContinuousClock.now < deadline { usleep(1000) }
        return device.statistics
    }
}

@Suite(.serialized, .timeLimit(.minutes(15))) struct HostileVhostTests {
    /// A miss is a page fault: the UPDATE names the whole mapped run in the block, at the
    /// physical address of its first page; a later miss beside it merges the two entries
    /// (INVALIDATE of the run, then its UPDATE); an invalidation reaches the back-end and
    /// its REPLY_ACK completes the invalidation.
    @Test func aMissGetsItsPagesTranslationAndEntriesMerge() throws {
        let s = try ListeningService()
        let f = try FakeBackend(s)
        let base = FakeBackend.iova
        try f.miss(base + 5 << 12 + 123, permission: VhostUser.IOTLBMessage.write)
        let (h1, u1) = try f.next()
        #expect(h1.request == VhostUser.Request.iotlbMessage.rawValue && h1.flags.contains(.needsReply))
        #expect(u1.kind == .update && u1.iova == base + 5 << 12 && u1.size == 2 << 12, "\(u1)")
        #expect(u1.userAddress == f.region.phys! + 5 << 12 && u1.permission == 3, "\(u1)")
        try f.ack()
        try f.miss(base + 7 << 12)
        let (_, drop) = try f.next()
        let (_, u2) = try f.next()
        #expect(drop.kind == .invalidate && drop.iova == base + 5 << 12 && drop.size == 4 << 12, "\(drop)")
        #expect(u2.kind == .update && u2.iova == base + 5 << 12 && u2.size == 4 << 12, "\(u2)")
        #expect(u2.userAddress == f.region.phys! + 5 << 12)
        try f.ack()
        try f.ack()
        let stats = f.waitFor { $0.iotlbMisses == 2 && $0.entriesMerged == 1 }
        #expect(stats.iotlbUpdates == 2 && stats.pagesUpdated == 6 && stats.updatesRefused == 0)
        var samples = 0
        let until = ContinuousClock.now + .seconds(5)
        while samples < 2 && ContinuousClock.now < until {
            samples += f.device.takeLatencies().samples.count
            usleep(1000)
        }
        #expect(samples == 2)
        // An invalidation of the middle page drops the whole entry at the back-end: what is
        // left of it, still mapped, comes right behind as two UPDATEs.
        let ticket = s.service.invalidate(hostAddress: f.region.base + 6 << 12, length: 4096)
        let (h3, inv) = try f.next()
        #expect(
            h3.flags.contains(.needsReply) && inv.kind == .invalidate && inv.iova == base + 6 << 12 && inv.size == 4096)
        let (_, left) = try f.next()
        let (_, right) = try f.next()
        #expect(
            left.kind == .update && left.iova == base + 5 << 12 && left.size == 4096
                && left.userAddress == f.region.phys! + 5 << 12, "\(left)")
        #expect(
            right.kind == .update && right.iova == base + 7 << 12 && right.size == 2 << 12
                && right.userAddress == f.region.phys! + 7 << 12, "\(right)")
        #expect(!ticket.isDone, "the invalidation completed before the back-end acknowledged it")
        try f.ack()
        try f.ack()
        try f.ack()
        _ = try ticket.wait()
        #expect(f.waitFor { $0.entriesRestored == 2 }.entriesRestored == 2)
        #expect(f.waitFor { $0.invalidationsAcked == 1 }.invalidationsAcked == 1)
        // A miss outside every mapping is refused: no UPDATE, counted.
        try f.miss(1 << 40)
        #expect(f.waitFor { $0.missesRefused == 1 }.missesRefused == 1)
        #expect(f.device.statistics.ended == nil)
    }

    /// Garbage on the back-end channel, a message too long, descriptors: each fenced alone.
    @Test func garbageOnTheBackEndChannelIsFencedAlone() throws {
        let s = try ListeningService()
        let b = try Bystander(s.path)
        defer { b.finish() }
        let attacks: [(String, (FakeBackend) throws -> Void)] = [
            (
                "random bytes",
                { try Sys.send($0.channel, (0..<44).map { _ in UInt8.random(in: 0...255) }, nonBlocking: false) }
            ),
            ("a MISS with permission 0", { try $0.miss(FakeBackend.iova, permission: 0) }),
            (
                "a message longer than any",
                { try Sys.send($0.channel, [UInt8](repeating: 1, count: 70_000), nonBlocking: false) }
            ),
            ("a descriptor", { f in try Sys.send(f.channel, [1, 2, 3], fds: [f.main], nonBlocking: false) }),
        ]
        for (what, attack) in attacks {
            let before = s.service.statistics.devicesFenced
            try b.keepsServing(what, s.service) {
                let f = try FakeBackend(s)
                try attack(f)
                let stats = f.waitFor { $0.ended != nil }
                #expect(
                    stats.fenced && stats.ended?.contains("fenced") == true, "\(what): \(stats.ended ?? "not ended")")
                _ = try s.service.unmap(iova: FakeBackend.iova, size: 1 << 20)
                return {}
            }
            #expect(s.service.statistics.devicesFenced == before + 1, "\(what)")
        }
        #expect(s.service.statistics.protocolErrorKinds[.badVhostMessage, default: 0] >= 4)
    }

    /// An INVALIDATE never acknowledged: the invalidation completes at the deadline, the
    /// back-end is fenced, the bystander never waits for it.
    @Test func anUnacknowledgedInvalidateIsFencedAtItsDeadline() throws {
        let s = try ListeningService(timeout: .milliseconds(300))
        let b = try Bystander(s.path)
        defer { b.finish() }
        try b.keepsServing("a back-end that never acknowledges", s.service) {
            let f = try FakeBackend(s)
            try f.miss(FakeBackend.iova)
            _ = try f.next()
            try f.ack()
            let start = ContinuousClock.now
            _ = try s.service.invalidate(hostAddress: f.region.base, length: 4096).wait()
            #expect(ContinuousClock.now - start < .seconds(2))
            let stats = f.waitFor { $0.ended != nil }
            #expect(stats.fenced && stats.ended?.contains("no acknowledgement") == true, "\(stats.ended ?? "")")
            _ = try s.service.unmap(iova: FakeBackend.iova, size: 1 << 20)
            return {}
        }
    }

    /// A REPLY_ACK nobody asked for, and a reply that is not a REPLY_ACK: fenced.
    @Test func repliesNobodyAskedForAreFenced() throws {
        let s = try ListeningService()
        let f = try FakeBackend(s)
        try f.ack()
        let stats = f.waitFor { $0.ended != nil }
        #expect(stats.fenced && stats.ended?.contains("nothing was owed") == true, "\(stats.ended ?? "")")
        _ = try s.service.unmap(iova: FakeBackend.iova, size: 1 << 20)
        let g = try FakeBackend(s)
        try g.miss(FakeBackend.iova)
        _ = try g.next()
        try Sys.send(
            g.main, VhostUser.message(.getFeatures, flags: .reply, payload: VhostUser.u64(0)), nonBlocking: false)
        let stats2 = g.waitFor { $0.ended != nil }
        #expect(stats2.fenced && stats2.ended?.contains("not the REPLY_ACK") == true, "\(stats2.ended ?? "")")
    }

    /// A back-end that floods misses and reads nothing: at most 256 replies are owed
    /// before its misses wait, nothing grows, and the bystander keeps its throughput.
    @Test func aFloodOfMissesWithoutReadingIsBounded() throws {
        let s = try ListeningService(timeout: .milliseconds(300))
        let b = try Bystander(s.path)
        defer { b.finish() }
        try b.keepsServing("a flood of misses", s.service) {
            let f = try FakeBackend(s, runPages: 1, faultAround: 1)
            try Sys.setNonBlocking(f.channel, true)
            var sent = 0
            for k in 0..<256 * 8 {
                do { try f.miss(FakeBackend.iova + UInt64(k % 256) << 12) } catch { break }
                sent += 1
            }
            usleep(300_000)
            let stats = f.device.statistics
            #expect(
                sent > 256 && stats.iotlbUpdates <= VhostBackend.maxOwed,
                "\(stats.iotlbUpdates) updates for \(sent) misses")
            _ = try s.service.unmap(iova: FakeBackend.iova, size: 1 << 20)
            #expect(f.waitFor { $0.ended != nil }.fenced)
            return {}
        }
    }

    /// VHOST from a host: exactly an AF_UNIX stream socket and a seqpacket socket, at most
    /// four back-ends at once; each refusal closes what was sent, and the host's going
    /// takes its back-ends with it.
    @Test func vhostFromAHostIsCheckedAndBounded() throws {
        let s = try ListeningService()
        let memory = try TestHostMemory(size: 1 << 20)
        let host = try memory.attach(s.path, name: "vhost-host", iova: 1 << 36)
        func refusal(_ fds: [CInt], _ request: VhostAttachRequest = VhostAttachRequest(deviceID: 3)) -> String? {
            defer { for fd in fds { Sys.close(fd) } }
            do {
                try host.attachVhost(
                    socket: FileDescriptor(rawValue: fds[0]),
                    channel: FileDescriptor(rawValue: fds.count > 1 ? fds[1] : fds[0]), request)
                return nil
            } catch { return "\(error)" }
        }
        func streamPair() throws -> (CInt, CInt) {
            var fds: [CInt] = [-1, -1]
            #expect(socketpair(AF_UNIX, CInt(SOCK_STREAM.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &fds) == 0)
            return (fds[0], fds[1])
        }
        var kept: [CInt] = []
        defer { for fd in kept { Sys.close(fd) } }
        // Two seqpacket sockets, and an eventfd where the channel goes: refused.
        let (a, b) = try Sys.seqpacketPair()
        #expect(refusal([a, b])?.contains("SOCK_STREAM") == true)
        let (m, _) = try streamPair()
        #expect(refusal([m, try Sys.eventfd()])?.contains("SOCK_SEQPACKET") == true)
        // Four are taken; the fifth is refused for the budget.
        for k in 0..<5 {
            let (main, theirMain) = try streamPair()
            let (channel, theirChannel) = try Sys.seqpacketPair()
            kept += [theirMain, theirChannel]
            let why = refusal([main, channel], VhostAttachRequest(deviceID: UInt32(10 + k)))
            if k < 4 {
                #expect(why == nil, "\(why ?? "")")
            } else {
                #expect(why?.contains("already has 4") == true, "\(why ?? "")")
            }
        }
        let kinds = s.waitFor { $0.protocolErrorKinds[.tooManyVhostBackends, default: 0] == 1 }.protocolErrorKinds
        #expect(kinds[.badVhostSockets, default: 0] == 2 && kinds[.tooManyVhostBackends, default: 0] == 1, "\(kinds)")
        #expect(s.waitFor { $0.hosts.first?.vhost.count == 4 }.hosts.first?.vhost.count == 4)
        try host.detach()
        let ended = s.waitFor { $0.hosts.first?.vhost.allSatisfy { $0.ended != nil } == true }
        #expect(ended.hosts.first?.vhost.allSatisfy { $0.ended?.contains("went away") == true && !$0.fenced } == true)
    }

    /// A back-end that hangs up is gone: not fenced, nothing left waiting for it.
    @Test func aBackEndThatHangsUpIsGoneNotFenced() throws {
        let s = try ListeningService()
        let f = try FakeBackend(s)
        shutdown(f.channel, CInt(SHUT_RDWR))
        shutdown(f.main, CInt(SHUT_RDWR))
        let stats = f.waitFor { $0.ended != nil }
        #expect(!stats.fenced && stats.ended?.contains("gone") == true, "\(stats.ended ?? "")")
        #expect(s.service.statistics.devicesFenced == 0)
        _ = try s.service.invalidate(hostAddress: f.region.base, length: 1 << 20).wait()
    }
}

// The fault channel and event loop, driven by hand through a device's raw channel:
// split records, late LAST_PAGE, closed devices, credits, malformed and foreign records,
// shutdown. Each runs over both transports.

import Foundation
import Testing
import IOPFTestSupport
@testable import IOPFCore
@testable import IOPFService
@testable import IOPFDevice
@testable import IOPFSimulation
@testable import IOPFSystem

/// A running service over real memory with one 1 MiB mapping at IOVA 1 MiB.
final class Harness {
    let region: HostRegion
    let engine: FaultEngine
    let domain: DomainID
    let service: FaultService
    static let iova: UInt64 = 1 << 20

    init(transport: ChannelTransport, spinNanoseconds: Int64 = 20_000) throws {
        region = try HostRegion(length: 1 << 20)
        engine = FaultEngine(memory: ProcessMemory())
        domain = try engine.createDomain(invalidator: DomainIOTLBs())
        var config = ServiceConfiguration()
        config.transport = transport
        config.spinNanoseconds = spinNanoseconds
        service = try FaultService(engine: engine, configuration: config)
        try service.start()
        try engine.map(iova: Self.iova, vaddr: region.base, size: region.length, prot: .readWrite)
    }

    deinit { service.stop() }

    /// Attaches an in-process device and opens its end of the channel.
    func attach(deviceID: UInt32, pasid: UInt32? = nil, domain: DomainID, credit: Int = 32) throws -> DeviceChannel {
        try DeviceChannel(service.attach(deviceID: deviceID, pasid: pasid, domain: domain, credit: credit))
    }

    func request(
        page: Int, cookie: UInt32, group: UInt32 = 1, last: Bool = true, device: UInt32 = 1,
        pasid: UInt32? = nil, write: Bool = false
    ) -> PageRequest {
        var flags: PageRequest.Flags = last ? [.lastPage] : []
        if pasid != nil { flags.insert(.pasidValid) }
        return PageRequest(
            flags: flags, deviceID: device, pasid: pasid ?? 0, groupIndex: group,
            perm: write ? [.read, .write] : [.read], addr: Self.iova + UInt64(page) << 12, cookie: cookie)
    }

    /// Waits up to 5 s for `count` responses.
    func responses(_ channel: DeviceChannel, count: Int) throws -> [PageResponse] {
        var out: [PageResponse] = []
        let deadline = ContinuousClock.now + .seconds(5)
        while out.count < count && ContinuousClock.now < deadline {
            guard let got = try channel.receive(spinNanoseconds: 0, timeoutMs: 100) else { break }
            out += got
        }
        return out
    }

    /// Waits up to 5 s for the service's statistics to satisfy `condition`.
    /// Waits up to 5 s for the service's statistics to satisfy `condition`; whether they did.
    func waitUntil(_ condition: (ServiceStatistics) -> Bool) -> Bool { condition(waitFor(condition)) }

    /// Waits up to 5 s for the statistics to satisfy `condition`; the last statistics seen.
    func waitFor(_ condition: (ServiceStatistics) -> Bool) -> ServiceStatistics {
        let deadline = ContinuousClock.now + .seconds(5)
        while !condition(service.statistics) && ContinuousClock.now < deadline { usleep(1000) }
        return service.statistics
    }
}

@Suite(.serialized, .timeLimit(.minutes(15))) struct FaultChannelTests {
    @Test(arguments: [ChannelTransport.socket, .pipe])
    func recordsSplitAcrossReadsAreReassembled(transport: ChannelTransport) throws {
        let h = try Harness(transport: transport)
        let channel = try h.attach(deviceID: 1, domain: h.domain)
        let bytes = h.request(page: 0, cookie: 7, last: false).bytes + h.request(page: 1, cookie: 7).bytes
        try channel.sendRaw(Array(bytes[0..<17]))
        usleep(20_000)
        try channel.sendRaw(Array(bytes[17..<63]))
        usleep(20_000)
        try channel.sendRaw(Array(bytes[63...]))
        #expect(try h.responses(channel, count: 1) == [PageResponse(cookie: 7, code: .success)])
        #expect(h.engine.isMarkedMapped(iova: Harness.iova) && h.engine.isMarkedMapped(iova: Harness.iova + 4096))
        #expect(h.engine.pageTable(h.domain).translate(Harness.iova + 4096)?.phys == h.region.phys! + 4096)
    }

    /// The shared ring's "answered at" stamp, once asked for, says when the service
    /// published an answer, not when the device looked: a device that looks 50 ms late
    /// still reads a stamp from before it looked. A stream carries none.
    @Test(arguments: ChannelTransport.allCases)
    func theAnsweredAtStampIsWhenTheServiceAnswered(transport: ChannelTransport) throws {
        let h = try Harness(transport: transport)
        let channel = try h.attach(deviceID: 1, domain: h.domain)
        defer { channel.close() }
        // Not asked for: none.
        try channel.send([h.request(page: 2, cookie: 6)])
        #expect(try h.responses(channel, count: 1).map(\.cookie) == [6])
        #expect(channel.answeredAt == 0)
        channel.wantsAnswerStamps = true
        let sent = Sys.monotonicNanoseconds()
        try channel.send([h.request(page: 3, cookie: 7)])
        #expect(h.waitUntil { $0.groups >= 2 })  // published after the turn's answers went out
        usleep(50_000)
        let looked = Sys.monotonicNanoseconds()
        let got = try h.responses(channel, count: 1)
        #expect(got.map(\.cookie) == [7] && got.first?.code == .success)
        if transport == .shared {
            let answered = Int64(channel.answeredAt) - Int64(sent)
            #expect(
                channel.answeredAt >= sent && channel.answeredAt + 50_000_000 <= looked,
                "answered \(answered) ns after the request; looked \(looked - sent) ns after")
        } else {
            #expect(channel.answeredAt == 0)
        }
    }

    @Test(arguments: ChannelTransport.allCases)
    func aGroupIsAnsweredOnlyWhenItsLastPageArrives(transport: ChannelTransport) throws {
        let h = try Harness(transport: transport)
        let channel = try h.attach(deviceID: 1, domain: h.domain)
        try channel.send([
            h.request(page: 3, cookie: 9, group: 5, last: false), h.request(page: 4, cookie: 9, group: 5, last: false),
        ])
        // An interleaved group completes first; the open one stays unanswered.
        try channel.send([h.request(page: 8, cookie: 10, group: 6)])
        #expect(try h.responses(channel, count: 1) == [PageResponse(cookie: 10, code: .success)])
        #expect(try channel.receive(spinNanoseconds: 0, timeoutMs: 50) == [])
        #expect(!h.engine.isMarkedMapped(iova: Harness.iova + 3 * 4096))
        try channel.send([h.request(page: 5, cookie: 9, group: 5)])
        #expect(try h.responses(channel, count: 1) == [PageResponse(cookie: 9, code: .success)])
        #expect((3...5).allSatisfy { h.engine.isMarkedMapped(iova: Harness.iova + UInt64($0) << 12) })
        #expect(h.service.statistics.groups == 2)
    }

    @Test(arguments: ChannelTransport.allCases)
    func aClosedDeviceLosesItsGroupsAndOthersAreStillServed(transport: ChannelTransport) throws {
        let h = try Harness(transport: transport)
        let leaving = try h.attach(deviceID: 1, domain: h.domain)
        let staying = try h.attach(deviceID: 2, domain: h.domain)
        try leaving.send([
            h.request(page: 1, cookie: 1, group: 1, last: false), h.request(page: 2, cookie: 2, group: 2, last: false),
        ])
        #expect(h.waitUntil { $0.records == 2 })
        leaving.close()
        let s = h.waitFor { $0.devicesClosed == 1 }
        #expect(s.abandonedGroups == 2 && s.invalid == 2)
        try staying.send([h.request(page: 9, cookie: 3, device: 2)])
        #expect(try h.responses(staying, count: 1) == [PageResponse(cookie: 3, code: .success)])
    }

    @Test(arguments: ChannelTransport.allCases)
    func aDeviceOverItsCreditIsAnsweredInvalid(transport: ChannelTransport) throws {
        let h = try Harness(transport: transport)
        let channel = try h.attach(deviceID: 1, domain: h.domain, credit: 2)
        try channel.send((0..<3).map { h.request(page: $0, cookie: 4, last: $0 == 2) })
        #expect(try h.responses(channel, count: 1) == [PageResponse(cookie: 4, code: .invalid)])
        #expect(h.service.statistics.creditExceeded == 1)
        // The credit is returned with the answer: a group within it is served.
        try channel.send((0..<2).map { h.request(page: $0, cookie: 5, last: $0 == 1) })
        #expect(try h.responses(channel, count: 1) == [PageResponse(cookie: 5, code: .success)])
    }

    @Test func malformedAndForeignRecordsAreAnsweredInvalidAndCounted() throws {
        let h = try Harness(transport: .socket)
        let channel = try h.attach(deviceID: 1, pasid: 77, domain: h.domain)
        var bad = h.request(page: 0, cookie: 11, pasid: 77).bytes
        bad[20] = 1  // reserved field
        try channel.sendRaw(bad)
        try channel.send([h.request(page: 0, cookie: 12, device: 99, pasid: 77)])  // another device's id
        try channel.send([h.request(page: 0, cookie: 13, pasid: 78)])  // a PASID not attached
        try channel.send([h.request(page: 0, cookie: 14)])  // no PASID on a PASID-only attachment
        try channel.send([h.request(page: 0, cookie: 15, pasid: 77)])  // fine
        let answers = try h.responses(channel, count: 5)
        #expect(
            answers == [
                PageResponse(cookie: 11, code: .invalid), PageResponse(cookie: 12, code: .invalid),
                PageResponse(cookie: 13, code: .invalid), PageResponse(cookie: 14, code: .invalid),
                PageResponse(cookie: 15, code: .success),
            ])
        let s = h.service.statistics
        #expect(s.malformed == 1 && s.unknownDevice == 3 && s.success == 1)
    }

    @Test(arguments: ChannelTransport.allCases)
    func stoppingAnswersIncompleteGroupsInvalid(transport: ChannelTransport) throws {
        let h = try Harness(transport: transport)
        let channel = try h.attach(deviceID: 1, domain: h.domain)
        try channel.send([h.request(page: 0, cookie: 21, group: 3, last: false)])
        #expect(h.waitUntil { $0.records == 1 })
        h.service.stop()
        #expect(try h.responses(channel, count: 1) == [PageResponse(cookie: 21, code: .invalid)])
        #expect(try channel.receive(spinNanoseconds: 0, timeoutMs: 1000) == nil)  // then EOF
    }

    @Test(arguments: ChannelTransport.allCases)
    func invalidationThroughTheServiceUnmapsAndTheDeviceRefaults(transport: ChannelTransport) throws {
        let h = try Harness(transport: transport)
        let channel = try h.attach(deviceID: 1, domain: h.domain)
        try channel.send((0..<4).map { h.request(page: $0, cookie: 30, last: $0 == 3, write: true) })
        #expect(try h.responses(channel, count: 1) == [PageResponse(cookie: 30, code: .success)])
        let out = try h.service.invalidate(hostAddress: h.region.base + 4096, length: 8192).wait()
        #expect(out.pagesUnmapped == 2)
        #expect(h.engine.pageTable(h.domain).translate(Harness.iova + 4096) == nil)
        #expect(h.engine.pageTable(h.domain).translate(Harness.iova) != nil)
        try channel.send([h.request(page: 1, cookie: 31)])
        #expect(try h.responses(channel, count: 1) == [PageResponse(cookie: 31, code: .success)])
        #expect(try h.service.checkInvariants().wait().isEmpty)
    }
}

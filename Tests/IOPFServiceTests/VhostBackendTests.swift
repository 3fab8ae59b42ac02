// A vhost-user back-end nobody here wrote: DPDK's testpmd (Debian's dpdk-dev, installed by
// `Tools/setup.sh --dpdk`) with iommu-support=1, asked what it offers in the messages
// IOPFWire's VhostUser encodes and decodes. The first step of the vhost front-end: the
// wire layer against the real thing. Enabled where testpmd is installed.

import Foundation
import Glibc
import Testing
import IOPFTestSupport
@testable import IOPFSystem
@testable import IOPFWire

@Suite(.serialized, .timeLimit(.minutes(15))) struct VhostBackendTests {
    /// One request and its reply over the stream socket: the header, then exactly its size.
    func ask(_ fd: CInt, _ request: VhostUser.Request) throws -> UInt64 {
        try Sys.send(fd, VhostUser.message(request), nonBlocking: false)
        var reply = [UInt8](repeating: 0, count: VhostUser.headerBytes + 8)
        var got = 0
        while got < reply.count {
            guard try Sys.pollReadable(fd, timeoutMs: 5000) else { throw SystemCallError("recv", .timedOut) }
            let n = reply.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress! + got, $0.count - got, 0) }
            guard n > 0 else { throw SystemCallError("recv", .connectionReset) }
            got += n
        }
        return try reply.withUnsafeBytes { try VhostUser.decodeU64Reply(to: request, $0) }
    }

    @Test(.enabled(if: TestPMD.installed)) func testpmdOffersAnIOMMUAndTheBackEndChannel() throws {
        let pmd = try TestPMD()
        defer { pmd.stop() }
        let fd = try pmd.connect()
        defer { Sys.close(fd) }
        let features = try ask(fd, .getFeatures)
        let bits = [
            ("IOMMU_PLATFORM", VhostUser.Feature.iommuPlatform), ("VERSION_1", VhostUser.Feature.version1),
            ("PROTOCOL_FEATURES", VhostUser.Feature.protocolFeatures),
        ]
        for (name, bit) in bits {
            #expect(features & bit != 0, "testpmd does not offer \(name): features \(String(features, radix: 16))")
        }
        let offered = try ask(fd, .getProtocolFeatures)
        let wanted = VhostUser.ProtocolFeature.replyAck | VhostUser.ProtocolFeature.backendRequests
        #expect(offered & wanted == wanted, "protocol features \(String(offered, radix: 16))")
    }
}

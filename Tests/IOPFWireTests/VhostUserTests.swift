// The vhost-user messages iopf's front-end sends, byte for byte as vhost-user.rst lays them
// out, and everything a back-end may send decoded strictly: a lying size, an unknown flag,
// a reply to something else, an IOTLB message a back-end must not send.

import Testing
@testable import IOPFWire

@Suite(.timeLimit(.minutes(15))) struct VhostUserTests {
    /// The decoder's result, or the `DecodeError` it threw (anything else fails the test).
    func decode<T>(_ bytes: [UInt8], _ body: (UnsafeRawBufferPointer) throws -> T) -> Result<T, VhostUser.DecodeError> {
        bytes.withUnsafeBytes { p in
            do { return .success(try body(p)) } catch let error as VhostUser.DecodeError {
                return .failure(error)
            } catch {
                Issue.record("unexpected error \(error)")
                return .failure(.short(got: -1, need: -1))
            }
        }
    }

    @Test func requestsAreLaidOutAsTheSpecSays() {
        let m = VhostUser.message(
            .setVringAddr, flags: .needsReply,
            payload: VhostUser.VringAddress(
                index: 1, descriptors: 0x1000, used: 0x3000,
                available: 0x2000
            ).bytes)
        #expect(m.count == 12 + 40)
        #expect(Array(m[0..<12]) == [9, 0, 0, 0, 0x9, 0, 0, 0, 40, 0, 0, 0])  // request 9, version 1 | NEED_REPLY, size
        #expect(Array(m[12..<16]) == [1, 0, 0, 0] && m[20] == 0x00 && m[21] == 0x10)  // index, flags, desc low bytes
        let table = VhostUser.MemoryTable(regions: [
            .init(
                guestAddress: 0, size: 1 << 20, userAddress: 0x7f00_0000_0000,
                mmapOffset: 0)
        ])
        #expect(table.bytes.count == 8 + 32 && table.bytes[0] == 1)
        let update = VhostUser.IOTLBMessage(
            iova: 0x1000, size: 0x2000, userAddress: 0x7f00_0000_1000,
            permission: VhostUser.IOTLBMessage.read | VhostUser.IOTLBMessage.write,
            kind: .update)
        #expect(update.bytes.count == 32 && update.bytes[24] == 3 && update.bytes[25] == 2)
        #expect(VhostUser.VringState(index: 0, num: 256).bytes == [0, 0, 0, 0, 0, 1, 0, 0])
    }

    @Test func repliesAreCheckedWhole() throws {
        let good = VhostUser.message(.getFeatures, flags: .reply, payload: VhostUser.u64(0x3_4000_0000))
        #expect(decode(good) { try VhostUser.decodeU64Reply(to: .getFeatures, $0) } == .success(0x3_4000_0000))
        let cases: [([UInt8], VhostUser.DecodeError)] = [
            (Array(good.prefix(8)), .short(got: 8, need: 12)),
            (VhostUser.message(.getFeatures, payload: VhostUser.u64(1)), .notAReply(request: 1)),
            (
                VhostUser.message(.getProtocolFeatures, flags: .reply, payload: VhostUser.u64(1)),
                .wrongReply(request: 15, expected: 1)
            ),
            (
                VhostUser.message(.getFeatures, flags: .reply, payload: [1, 2, 3, 4]),
                .payloadSize(request: 1, got: 4, expected: 8)
            ),
        ]
        for (bytes, expected) in cases {
            #expect(decode(bytes) { try VhostUser.decodeU64Reply(to: .getFeatures, $0) } == .failure(expected))
        }
        var version2 = good
        version2[4] = 0x6
        #expect(decode(version2) { try VhostUser.Header(bytes: $0) } == .failure(.badVersion(2)))
        var strange = good
        strange[6] = 1
        #expect(decode(strange) { try VhostUser.Header(bytes: $0) } == .failure(.unknownFlags(0x1_0005)))
        var huge = good
        huge[10] = 1  // size 65536 + 8
        #expect(decode(huge) { try VhostUser.Header(bytes: $0) } == .failure(.tooLarge(size: 0x1_0008)))
    }

    @Test func backEndRequestsAreMissesOrAccessFailuresOnly() {
        func request(_ kind: UInt8, perm: UInt8 = 1, flags: VhostUser.Flags = .needsReply, code: UInt32 = 1) -> [UInt8]
        {
            var payload = VhostUser.IOTLBMessage(iova: 0x5000, size: 0, userAddress: 0, permission: perm, kind: .miss)
                .bytes
            payload[25] = kind
            return VhostUser.message(code, flags: flags, payload: payload)
        }
        let miss = decode(request(1)) { try VhostUser.BackendMessage(bytes: $0) }
        #expect((try? miss.get())?.iotlb.iova == 0x5000 && (try? miss.get())?.needsReply == true)
        #expect(
            decode(request(2)) { try VhostUser.BackendMessage(bytes: $0) }
                == .failure(.badIOTLB("type 2 is not MISS (1) or ACCESS_FAIL (4)")))
        #expect(
            decode(request(1, perm: 0)) { try VhostUser.BackendMessage(bytes: $0) }
                == .failure(.badIOTLB("permission 0 is not 1, 2 or 3")))
        #expect(decode(request(1, code: 3)) { try VhostUser.BackendMessage(bytes: $0) } == .failure(.unknownRequest(3)))
        #expect(
            decode(request(1, flags: .reply)) { try VhostUser.BackendMessage(bytes: $0) }
                == .failure(.unknownFlags(VhostUser.Flags.reply.rawValue)))
        // A size that promises more than was received.
        var lying = request(1)
        lying[8] = 40
        #expect(
            decode(lying) { try VhostUser.BackendMessage(bytes: $0) }
                == .failure(.payloadSize(request: 1, got: 32, expected: 40)))
        #expect(
            VhostUser.backendAck(.iotlbMessage, failed: false) == [1, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0]
                + [UInt8](repeating: 0, count: 8))
    }
}

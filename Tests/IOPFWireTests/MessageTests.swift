// Protocol messages: every payload round-trips, and every decoder refuses what the
// protocol document says is malformed, naming the kind the service counts it by.

import Testing
@testable import IOPFWire

@Suite(.timeLimit(.minutes(15))) struct MessageTests {
    func roundTrip<P: WirePayload>(_ p: P) throws -> P {
        let bytes = p.message(id: 9)
        let header = try bytes.withUnsafeBytes { try MessageHeader(message: $0) }
        #expect(header.id == 9 && header.command == P.command && Int(header.size) == bytes.count)
        return try P(message: bytes)
    }

    @Test func everyPayloadRoundTrips() throws {
        #expect(try roundTrip(Hello()) == Hello())
        let reply = HelloReply(major: 1, minor: 0, capabilities: [.sharedRing, .translate])
        #expect(try roundTrip(reply) == reply)
        let attach = Attach(deviceID: 7, pasid: 3, credit: 64, wantsStream: true)
        #expect(try roundTrip(attach) == attach)
        let attached = AttachReply(
            credit: 32, channel: .sharedRing, invalidateTimeoutMs: 1000, ringEntries: 256,
            windows: [DMAWindow(iova: 1 << 44, size: 64 << 20, prot: 3)],
            regions: [MemoryRegionInfo(phys: 1 << 30, size: 64 << 20)])
        #expect(try roundTrip(attached) == attached)
        #expect(attached.fdCount == 1 + 3 + 1)
        #expect(try roundTrip(Translate(iova: 0x1000, pages: 512)) == Translate(iova: 0x1000, pages: 512))
        let t = TranslateReply(sequence: 4, entries: [0x4000_0003, 0])
        #expect(try roundTrip(t) == t)
        let inv = Invalidate(sequence: 12, pasid: nil, ranges: [(0x1000, 0x1fff), (0x8000, 0x8fff)])
        #expect(try roundTrip(inv) == inv)
        #expect(try roundTrip(InvalidateAck(sequence: 12)) == InvalidateAck(sequence: 12))
        let named = Attach(deviceID: 2, credit: 8, addressSpaceName: "vm-1.a_b")
        #expect(try roundTrip(named) == named)
        let host = HostDeclaration(
            name: "guest0",
            regions: [
                HostRegionEntry(hostAddress: 0x7f00_0000_0000, size: 1 << 30, fdOffset: 0, fdIndex: 0),
                HostRegionEntry(hostAddress: 0x7f10_0000_0000, size: 1 << 21, fdOffset: 1 << 21, fdIndex: 1),
            ])
        #expect(try roundTrip(host) == host && host.memfdCount == 2)
        let map = DMAMapRequest(iova: 1 << 40, hostAddress: 0x7f00_0000_0000, size: 1 << 20, flags: DMAMapRequest.vaddr)
        #expect(try roundTrip(map) == map && map.updatesHostAddress)
        #expect(try roundTrip(DMAUnmapRequest(iova: 1 << 40, size: 4096)) == DMAUnmapRequest(iova: 1 << 40, size: 4096))
        #expect(try roundTrip(DMAUnmapReply(bytes: 1 << 20)) == DMAUnmapReply(bytes: 1 << 20))
        // 1.3: GET_DIRTY, 32 bytes; its reply carries a DIRTY_READ reply after the bytes.
        let unmapDirty = DMAUnmapRequest(iova: 1 << 40, size: 1 << 20, flags: DMAUnmapRequest.getDirty, bitmapOffset: 8)
        #expect(try roundTrip(unmapDirty) == unmapDirty && unmapDirty.message(id: 1).count == 16 + 32)
        let unmapReply = DMAUnmapReply(
            bytes: 1 << 20, dirty: DirtyReadReply(reportedPages: 1, bitmap: [1, 0, 0, 0, 0, 0, 0, 0]))
        #expect(try roundTrip(unmapReply) == unmapReply && unmapReply.message(id: 1).count == 16 + 8 + 16 + 8)
        let start = DirtyStartRequest(iova: 1 << 40, size: 1 << 30)
        let stop = DirtyStopRequest(iova: 1 << 40, size: 1 << 30)
        let read = DirtyReadRequest(iova: 1 << 40, size: 1 << 30, bitmapOffset: 64)
        let dirty = DirtyReadReply(reportedPages: 3, bitmap: [0x15, 0, 0, 0, 0, 0, 0, 0])
        #expect(try roundTrip(start) == start && roundTrip(stop) == stop && roundTrip(read) == read)
        #expect(try roundTrip(dirty) == dirty && read.bitmapBytes == 32768)
    }

    /// Dirty-tracking messages refuse empty, unaligned, wrapping and oversized ranges, and
    /// replies whose bitmap is not whole words within the inline limit.
    @Test func dirtyMessagesRefuseMalformedFields() throws {
        func refused<P: WirePayload>(_: P.Type, _ bytes: [UInt8]) -> Bool { (try? P(message: bytes)) == nil }
        #expect(refused(DirtyStartRequest.self, DirtyStartRequest(iova: 0, size: 0).message(id: 1)))
        #expect(refused(DirtyStartRequest.self, DirtyStartRequest(iova: 0x800, size: 4096).message(id: 1)))
        #expect(refused(DirtyStopRequest.self, DirtyStopRequest(iova: 0, size: 0x1800).message(id: 1)))
        #expect(refused(DirtyStopRequest.self, DirtyStopRequest(iova: UInt64.max - 4095, size: 8192).message(id: 1)))
        #expect(refused(DirtyReadRequest.self, DirtyReadRequest(iova: 0, size: 128 << 30).message(id: 1)))
        #expect(refused(DirtyReadRequest.self, DirtyReadRequest(iova: 0, size: 4096, bitmapOffset: 4).message(id: 1)))
        #expect(!refused(DirtyReadRequest.self, DirtyReadRequest(iova: 0, size: 64 << 30).message(id: 1)))
        #expect(refused(DirtyReadReply.self, DirtyReadReply(reportedPages: 1, bitmap: [1, 2, 3]).message(id: 1)))
        #expect(
            refused(
                DirtyReadReply.self,
                DirtyReadReply(reportedPages: 65, bitmap: [255] + [UInt8](repeating: 0, count: 7)).message(id: 1)))
        let big = DirtyReadReply(reportedPages: 0, bitmap: [UInt8](repeating: 0, count: 8200))
        #expect(refused(DirtyReadReply.self, big.message(id: 1)))
        var truncated = DirtyReadReply(reportedPages: 0, bitmap: [UInt8](repeating: 0, count: 16)).message(id: 1)
        truncated.removeLast(8)
        #expect(refused(DirtyReadReply.self, truncated))
    }

    /// Host messages and named ATTACHes refuse what the document says is malformed.
    @Test func hostMessagesRefuseMalformedFields() throws {
        func error<P: WirePayload>(_: P.Type, _ bytes: [UInt8]) -> WireError? {
            do {
                _ = try P(message: bytes)
                return nil
            } catch { return error }
        }
        let region = HostRegionEntry(hostAddress: 0x10000, size: 0x4000, fdOffset: 0, fdIndex: 0)
        for bad in ["", "has space", "ünï", String(repeating: "x", count: 65)] {
            var m = Attach(deviceID: 1).message(id: 1)
            m[20] |= 4  // ADDRESS_SPACE
            m += Array(bad.utf8)
            m[4] = UInt8(m.count)
            #expect(error(Attach.self, m)?.kind == .badField, "name '\(bad)'")
            #expect(
                error(HostDeclaration.self, HostDeclaration(name: bad, regions: [region]).message(id: 1))?.kind != nil)
        }
        var unaligned = region
        unaligned.fdOffset = 100
        #expect(
            error(HostDeclaration.self, HostDeclaration(name: "h", regions: [unaligned]).message(id: 1))
                == .unaligned(field: "HOST region 0 fd offset", value: 100))
        var huge = region
        huge.size = UInt64.max - 0xFFF
        #expect(
            error(HostDeclaration.self, HostDeclaration(name: "h", regions: [huge]).message(id: 1))?.kind == .badField)
        var page = region
        page.pageSize = 3000
        #expect(
            error(HostDeclaration.self, HostDeclaration(name: "h", regions: [page]).message(id: 1))?.kind == .badField)
        let overlap = HostRegionEntry(hostAddress: 0x12000, size: 0x4000, fdOffset: 0x4000, fdIndex: 0)
        #expect(
            error(HostDeclaration.self, HostDeclaration(name: "h", regions: [region, overlap]).message(id: 1))?
                .description.contains("must not overlap") == true)
        #expect(error(HostDeclaration.self, HostDeclaration(name: "h", regions: []).message(id: 1))?.kind == .badField)
        var padded = HostDeclaration(name: "h", regions: [region]).message(id: 1)
        padded[16 + 16 + 3] = 1  // a non-zero byte in the name's padding
        #expect(error(HostDeclaration.self, padded) == .reservedNonZero(field: "HOST name padding"))
        #expect(
            error(DMAMapRequest.self, DMAMapRequest(iova: 0, hostAddress: 0, size: 4096, flags: 16).message(id: 1))?
                .kind
                == .badField)
        #expect(
            error(DMAMapRequest.self, DMAMapRequest(iova: 0, hostAddress: 0, size: 4096, flags: 5).message(id: 1))?.kind
                == .badField)
        #expect(
            error(DMAUnmapRequest.self, Array(DMAUnmapRequest(iova: 0, size: 4096).message(id: 1).dropLast()))?.kind
                == .badSize)
        // GET_DIRTY's range and bitmap offset are checked as DIRTY_READ's; unknown flags refused.
        for bad in [
            DMAUnmapRequest(iova: 0, size: 4096, flags: 2),
            DMAUnmapRequest(iova: 0, size: 4095, flags: DMAUnmapRequest.getDirty),
            DMAUnmapRequest(iova: 0, size: 4096, flags: DMAUnmapRequest.getDirty, bitmapOffset: 4),
            DMAUnmapRequest(iova: 0, size: 1 << 40, flags: DMAUnmapRequest.getDirty),
            DMAUnmapRequest(iova: 0, size: 4096, bitmapOffset: 8),
        ] {
            #expect(error(DMAUnmapRequest.self, bad.message(id: 1))?.kind == .badField, "\(bad)")
        }
        var reserved = DMAUnmapRequest(iova: 0, size: 4096, flags: DMAUnmapRequest.getDirty).message(id: 1)
        reserved[16 + 20] = 1
        #expect(error(DMAUnmapRequest.self, reserved) == .reservedNonZero(field: "DMA_UNMAP.reserved"))
        #expect(error(DMAUnmapRequest.self, Array(reserved.dropLast(8)))?.kind == .badSize)
    }

    /// The worked example of the protocol document, byte for byte.
    @Test func theDocumentsWorkedExample() throws {
        let attach = Attach(deviceID: 7, pasid: nil, credit: 32, wantsStream: false).message(id: 2)
        #expect(
            attach == [
                0x02, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x20, 0x00, 0x00, 0x00,
            ])
        let hello = Hello(minor: 0).message(id: 1)
        #expect(
            hello == [
                0x01, 0x00, 0x01, 0x00, 0x1C, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                0x01, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            ])
        let invalidate = Invalidate(sequence: 5, pasid: nil, ranges: [(0x1_0000_0000, 0x1_0000_0FFF)]).message(id: 5)
        #expect(
            invalidate == [
                0x05, 0x00, 0x05, 0x00, 0x38, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0xFF, 0x0F, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
            ])
        let host = HostDeclaration(
            name: "vm1",
            regions: [HostRegionEntry(hostAddress: 0x7f00_0000_0000, size: 64 << 20, fdOffset: 0, fdIndex: 0)])
        #expect(
            host.message(id: 2) == [
                0x02, 0x00, 0x06, 0x00, 0x48, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                0x01, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                0x76, 0x6D, 0x31, 0x00, 0x00, 0x00, 0x00, 0x00,
                0x00, 0x00, 0x00, 0x00, 0x00, 0x7F, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00,
                0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            ])
        let map = DMAMapRequest(iova: 1 << 40, hostAddress: 0x7f00_0000_0000, size: 16 << 20, flags: 3).message(id: 3)
        #expect(
            map == [
                0x03, 0x00, 0x07, 0x00, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x7F, 0x00, 0x00,
                0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            ])
        let ack = InvalidateAck(sequence: 5).message(id: 5, flags: .reply)
        #expect(
            ack == [
                0x05, 0x00, 0x05, 0x00, 0x18, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            ])
    }

    func headerError(_ bytes: [UInt8]) -> WireError? {
        do {
            _ = try bytes.withUnsafeBytes { try MessageHeader(message: $0) }
            return nil
        } catch { return error as? WireError }
    }

    @Test func headersAreCheckedAgainstWhatWasReceived() {
        var m = Hello().message(id: 1)
        #expect(headerError(Array(m.prefix(15))) == .truncated(have: 15, need: 16))
        #expect(headerError(m + [0]) == .sizeMismatch(header: 28, received: 29))
        m[8] = 2  // type 2
        #expect(headerError(m)?.kind == .badHeader)
        m[8] = 0x40  // unknown flag bit 6
        #expect(headerError(m) == .unknownFlags(0x40))
        m[8] = 0
        m[2] = 99
        #expect(headerError(m) == .unknownCommand(99))
        #expect(headerError(m)?.kind == .unknownCommand)
        #expect(
            headerError([UInt8](repeating: 0, count: WireLimits.maxMessageBytes + 1))
                == .tooLarge(WireLimits.maxMessageBytes + 1))
    }

    func payloadError<P: WirePayload>(_: P.Type, _ payload: [UInt8]) -> WireError? {
        do {
            _ = try payload.withUnsafeBytes { try P(payload: $0) }
            return nil
        } catch { return error as? WireError }
    }

    @Test func payloadsRefuseBadSizesCountsAndFields() {
        #expect(payloadError(Hello.self, [UInt8](repeating: 0, count: 11))?.kind == .badSize)
        #expect(payloadError(Hello.self, [1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0])?.kind == .badField)  // role 9
        var attach = Attach(deviceID: 1, credit: 0).message(id: 1)
        #expect(
            payloadError(Attach.self, Array(attach[16...]))
                == .outOfRange(field: "ATTACH.credit", value: 0, allowed: "1...256"))
        attach = Attach(deviceID: 1, credit: 4).message(id: 1)
        attach[16 + 8] = 5  // a PASID without PASID_VALID
        #expect(payloadError(Attach.self, Array(attach[16...]))?.kind == .badField)
        #expect(
            payloadError(Translate.self, Array(Translate(iova: 0x1001, pages: 1).message(id: 1)[16...]))?.kind
                == .badField)
        #expect(
            payloadError(Translate.self, Array(Translate(iova: 0x1000, pages: 513).message(id: 1)[16...]))?.kind
                == .badField)
        #expect(
            payloadError(Translate.self, Array(Translate(iova: UInt64.max & ~0xFFF, pages: 2).message(id: 1)[16...]))
                != nil)
        // A count that claims more ranges than the payload holds.
        var inv = Array(Invalidate(sequence: 1, pasid: nil, ranges: [(0, 0xfff)]).message(id: 1)[16...])
        inv[16] = 2
        #expect(payloadError(Invalidate.self, inv)?.kind == .badSize)
        inv[16] = 0
        #expect(payloadError(Invalidate.self, inv)?.kind == .badField)
        let backwards = Array(Invalidate(sequence: 1, pasid: nil, ranges: [(0x2000, 0x1000)]).message(id: 1)[16...])
        #expect(payloadError(Invalidate.self, backwards)?.kind == .badField)
        var reply = Array(TranslateReply(sequence: 1, entries: [0x1004]).message(id: 1)[16...])
        #expect(payloadError(TranslateReply.self, reply)?.kind == .badField)  // bit 2 set
        reply = Array(
            AttachReply(
                credit: 1, channel: .stream, invalidateTimeoutMs: 1, ringEntries: 0, windows: [],
                regions: [MemoryRegionInfo(phys: 0x1000, size: 0x1000)]
            ).message(id: 1)[16...])
        reply.removeLast()
        #expect(payloadError(AttachReply.self, reply)?.kind == .badSize)
    }
}

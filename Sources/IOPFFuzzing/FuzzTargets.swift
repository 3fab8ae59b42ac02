// FuzzTargets.swift — the bodies of the libFuzzer targets (Tools/fuzz.sh), here so that
// they reach the service's internals and so that the test suite can replay their seed
// corpora (Tools/fuzz/corpus/TARGET) in ordinary builds. Each takes arbitrary bytes,
// must not crash, and checks a property that could fail (a round trip, an invariant):
// a violated property is a trap, which libFuzzer reports like a crash.

import IOPFCore
@_spi(SharedRings) import IOPFSystem
import IOPFWire
import CIOPFShim
import IOPFService
import Glibc

package enum FuzzTargets {
    package static let names = ["fault-record", "group-assembly", "message", "uffd-events", "shared-ring"]

    /// Runs target `name` on `data`. False when `name` is unknown.
    package static func run(_ name: String, _ data: UnsafeRawBufferPointer) -> Bool {
        switch name {
        case "fault-record": faultRecord(data)
        case "group-assembly": groupAssembly(data)
        case "message": message(data)
        case "uffd-events": uffdEvents(data)
        case "shared-ring": sharedRing(data)
        default: return false
        }
        return true
    }

    /// Seed inputs for `name`: valid encodings of what the target reads, so that the
    /// fuzzer starts past the first checks. Written to Tools/fuzz/corpus by the test
    /// suite when IOPF_WRITE_FUZZ_SEEDS=1, and compared with what is checked in.
    package static func seeds(_ name: String) -> [[UInt8]] {
        let record = { (page: UInt64, last: Bool, group: UInt32, cookie: UInt32) in
            PageRequest(
                flags: last ? [.lastPage] : [], deviceID: 1, groupIndex: group, perm: [.read, .write],
                addr: page << 12, cookie: cookie
            ).bytes
        }
        func payload<P: WirePayload>(_ p: P, tag: UInt8) -> [UInt8] {
            var w = WireWriter()
            p.encode(into: &w)
            return [tag] + w.bytes
        }
        switch name {
        case "fault-record":
            var response = [UInt8](repeating: 0, count: 8)
            response.withUnsafeMutableBytes { PageResponse(cookie: 7, code: .invalid).encode(into: $0) }
            return [record(1, true, 0, 1), record(0x12345, false, 511, 9) + record(0x12346, true, 511, 9), response]
        case "group-assembly":
            return [
                [3, 0] + record(1, false, 4, 2) + record(2, true, 4, 2),
                [0, 0] + record(1, true, 1, 1) + record(1, true, 1, 1) + record(5, false, 2, 3),
            ]
        case "message":
            var seeds = [Hello().message(id: 1), Attach(deviceID: 3, pasid: 5, addressSpaceName: "vm0").message(id: 2)]
            seeds += [
                payload(Hello(role: .host), tag: 0), payload(Attach(deviceID: 1, credit: 8), tag: 2),
                payload(Translate(iova: 1 << 30, pages: 4), tag: 4),
                payload(Invalidate(sequence: 1, pasid: nil, ranges: [(1 << 30, (1 << 30) + 4095)]), tag: 6),
                payload(
                    HostDeclaration(
                        name: "vm0",
                        regions: [
                            HostRegionEntry(
                                hostAddress: 0x7f00_0000_0000, size: 1 << 21,
                                fdOffset: 0, fdIndex: 0)
                        ]), tag: 8),
                payload(DMAMapRequest(iova: 1 << 30, hostAddress: 0x7f00_0000_0000, size: 1 << 21, flags: 3), tag: 9),
                payload(DMAUnmapRequest(iova: 1 << 30, size: 1 << 21), tag: 10),
                payload(
                    DMAUnmapRequest(iova: 1 << 30, size: 1 << 21, flags: DMAUnmapRequest.getDirty, bitmapOffset: 64),
                    tag: 10),
                payload(DMAUnmapReply(bytes: 1 << 21, dirty: DirtyReadReply(reportedPages: 0, bitmap: [])), tag: 16),
            ]
            let miss = VhostUser.IOTLBMessage(iova: 1 << 30, size: 0, userAddress: 0, permission: 3, kind: .miss)
            seeds += [
                VhostUser.message(1, flags: .needsReply, payload: miss.bytes),
                VhostUser.message(.getFeatures, flags: .reply, payload: VhostUser.u64(1 << 33)),
            ]
            return seeds
        case "uffd-events":
            func msg(_ event: Int32, _ a: UInt64, _ b: UInt64, _ c: UInt64, move: Bool) -> [UInt8] {
                var m = [UInt8](repeating: 0, count: HostEventSeam.messageBytes)
                m.withUnsafeMutableBytes { p in
                    p.storeBytes(of: UInt8(event), toByteOffset: 0, as: UInt8.self)
                    p.storeBytes(of: UInt8(move ? 1 : 0), toByteOffset: 1, as: UInt8.self)
                    p.storeBytes(of: a, toByteOffset: 8, as: UInt64.self)
                    p.storeBytes(of: b, toByteOffset: 16, as: UInt64.self)
                    p.storeBytes(of: c, toByteOffset: 24, as: UInt64.self)
                }
                return m
            }
            let host: UInt64 = 0x7000_0000_0000
            return [
                msg(Int32(UFFD_EVENT_REMOVE), host, host + 0x4000, 0, move: false),
                msg(Int32(UFFD_EVENT_UNMAP), host + 0x2000, host + 0x30000, 0, move: true)
                    + msg(Int32(UFFD_EVENT_REMAP), host, host + 0x100_0000, 0x8000, move: false),
            ]
        case "shared-ring":
            return [
                [2, 0, 0, 0, 0, 7, 0, 0] + record(1, false, 3, 4) + record(2, true, 3, 4),
                [1, 0, 0, 0, 1, 0, 0, 0] + record(9, true, 0, 1),
            ]
        default:
            return []
        }
    }

    static func check(_ ok: Bool, _ what: @autoclosure () -> String) {
        if !ok { fatalError("fuzz property violated: \(what())") }
    }

    /// Records and responses: whatever decodes re-encodes to the same bytes.
    static func faultRecord(_ data: UnsafeRawBufferPointer) {
        var at = 0
        while at < data.count {
            let n = min(PageRequest.byteCount, data.count - at)
            let chunk = UnsafeRawBufferPointer(rebasing: data[at..<(at + n)])
            if let r = try? PageRequest(bytes: chunk) {
                check(r.bytes.elementsEqual(chunk), "a page request does not round-trip")
            }
            if n >= PageResponse.byteCount {
                let head = UnsafeRawBufferPointer(rebasing: chunk[0..<PageResponse.byteCount])
                if let r = try? PageResponse(bytes: head) {
                    var out = [UInt8](repeating: 0, count: PageResponse.byteCount)
                    out.withUnsafeMutableBytes { r.encode(into: $0) }
                    check(out.elementsEqual(head), "a page response does not round-trip")
                }
            }
            at += n
        }
    }

    /// A record stream from one device with a small credit: every group handed out is
    /// within credit, and nothing stays outstanding once all are answered or abandoned.
    static func groupAssembly(_ data: UnsafeRawBufferPointer) {
        guard data.count > 1 else { return }
        let credit = 1 + Int(data[0] % 8)
        var a = GroupAssembler(deviceID: 1, pasid: data[1] & 1 == 0 ? nil : 5, credit: credit)
        var at = 2
        var open: [PageRequestGroup] = []
        while at + PageRequest.byteCount <= data.count {
            if let g = a.add(UnsafeRawBufferPointer(rebasing: data[at..<(at + PageRequest.byteCount)])) {
                check(
                    g.counted == g.requests.count && g.requests.count <= credit,
                    "a group of \(g.requests.count) requests, credit \(credit)")
                open.append(g)
                // Answer some groups at once, keep others outstanding.
                if data[at] & 1 == 0 { a.answered(open.removeFirst()) }
            }
            check(a.outstanding >= 0 && a.outstanding <= credit, "outstanding \(a.outstanding) with credit \(credit)")
            at += PageRequest.byteCount
        }
        for g in open { a.answered(g) }
        _ = a.abandonAll()
        check(a.outstanding == 0, "groups still counted against credit after all were answered")
    }

    /// Protocol messages: a header that decodes matches the buffer; every payload decoder
    /// survives any bytes, and what decodes re-encodes to the same payload.
    static func message(_ data: UnsafeRawBufferPointer) {
        _ = peekMessageID(data)
        vhostUser(data)
        if let h = try? MessageHeader(message: data) {
            check(Int(h.size) == data.count, "a header decoded with a size other than the message's")
        }
        guard !data.isEmpty else { return }
        let payload = UnsafeRawBufferPointer(rebasing: data[1...])
        func roundTrip<P: WirePayload>(_ type: P.Type) {
            guard let p = try? P(payload: payload) else { return }
            var w = WireWriter()
            p.encode(into: &w)
            check(
                (try? P(payload: w.bytes.withUnsafeBytes { UnsafeRawBufferPointer($0) })) == p,
                "\(P.self) does not round-trip")
        }
        switch data[0] % 17 {
        case 0: roundTrip(Hello.self)
        case 1: roundTrip(HelloReply.self)
        case 2: roundTrip(Attach.self)
        case 3: roundTrip(AttachReply.self)
        case 4: roundTrip(Translate.self)
        case 5: roundTrip(TranslateReply.self)
        case 6: roundTrip(Invalidate.self)
        case 7: roundTrip(InvalidateAck.self)
        case 8: roundTrip(HostDeclaration.self)
        case 9: roundTrip(DMAMapRequest.self)
        case 10: roundTrip(DMAUnmapRequest.self)
        case 11: roundTrip(VhostAttachRequest.self)
        case 12: roundTrip(DirtyStartRequest.self)
        case 13: roundTrip(DirtyStopRequest.self)
        case 14: roundTrip(DirtyReadRequest.self)
        case 15: roundTrip(DirtyReadReply.self)
        default: roundTrip(DMAUnmapReply.self)
        }
    }

    /// What a vhost-user back-end may send: a header, a u64 reply, a back-end request. What
    /// decodes re-encodes to the same bytes.
    static func vhostUser(_ data: UnsafeRawBufferPointer) {
        if let h = try? VhostUser.Header(bytes: data) {
            check(h.size <= VhostUser.maxPayloadBytes, "a vhost-user header decoded with a size past the limit")
        }
        if let v = try? VhostUser.decodeU64Reply(to: .getFeatures, data), let h = try? VhostUser.Header(bytes: data) {
            check(
                Array(data) == VhostUser.message(.getFeatures, flags: h.flags, payload: VhostUser.u64(v)),
                "a u64 reply does not round-trip")
        }
        if let m = try? VhostUser.BackendMessage(bytes: data) {
            let again = VhostUser.message(
                VhostUser.BackendRequest.iotlbMessage.rawValue,
                flags: m.needsReply ? .needsReply : [], payload: m.iotlb.bytes)
            check(
                (try? again.withUnsafeBytes { try VhostUser.BackendMessage(bytes: $0) }) == m,
                "a back-end IOTLB message does not round-trip")
        }
    }

    /// Arbitrary uffd messages applied to an engine with faulted pages: the engine's
    /// invariants hold after each.
    static func uffdEvents(_ data: UnsafeRawBufferPointer) {
        // One engine for every input (a new one costs a page-table pool): the mapping is
        // removed and added again, which must leave it as good as new.
        guard let (engine, handler) = uffdEngine else { return }
        let host: UInt64 = 0x7000_0000_0000
        _ = try? engine.unmap(iova: 1 << 30, size: 64 << 12)
        check(engine.mappedPageCount == 0, "pages still marked after unmapping the only mapping")
        _ = try? engine.map(iova: 1 << 30, vaddr: host, size: 64 << 12, prot: .readWrite)
        for p in stride(from: 0, to: 64, by: 3) {
            _ = handler.handle([
                PageRequest(
                    flags: [.lastPage], deviceID: 1, groupIndex: 0, perm: [.read],
                    addr: (1 << 30) + UInt64(p) << 12, cookie: 1)
            ])
        }
        let size = HostEventSeam.messageBytes
        var at = 0
        while at + size <= data.count {
            // Half the messages are moved into the mapped range so that they touch it.
            var bytes = [UInt8](UnsafeRawBufferPointer(rebasing: data[at..<(at + size)]))
            if bytes[1] & 1 == 1 {
                bytes.withUnsafeMutableBytes { b in
                    b.storeBytes(of: host + UInt64(b[9] % 64) << 12 + UInt64(b[10]), toByteOffset: 8, as: UInt64.self)
                    b.storeBytes(of: host + UInt64(b[17] % 80) << 12, toByteOffset: 16, as: UInt64.self)
                }
            }
            if let (range, gone) = bytes.withUnsafeBytes({ HostEventSeam.invalidation($0) }),
                range.lowerBound < range.upperBound
            {
                _ = try? engine.invalidate(
                    hostAddress: range.lowerBound, length: range.upperBound - range.lowerBound, hostGone: gone)
            }
            at += size
        }
        let violations = engine.checkInvariants(limit: 3)
        check(violations.isEmpty, "invariants after uffd events: \(violations)")
    }

    nonisolated(unsafe) static let uffdEngine: (FaultEngine, FaultHandler)? = {
        let engine = FaultEngine(memory: SimulatedHostMemory())
        guard (try? engine.createDomain()) != nil else { return nil }
        return (engine, engine.makeFaultHandler())
    }()

    /// The shared-ring consumer against a device that writes anything: indices, records
    /// and its closed flag. It takes at most a ring's worth, or refuses the ring.
    static func sharedRing(_ data: UnsafeRawBufferPointer) {
        guard data.count >= 8, let t = sharedTransport else { return }
        let q = t.queue
        let head = q.load(.requestHead)
        // The device's tail: near the head mostly, anywhere sometimes.
        let raw = data.loadUnaligned(as: UInt32.self)
        let tail = raw & 0x8000_0000 != 0 ? raw : head &+ (raw % UInt32(2 * SharedQueue.capacity))
        q.store(.deviceClosed, UInt32(data[4] & 1))
        var at = 8
        var slot = head
        while at < data.count && slot != tail {
            let dst = q.requestSlot(slot)
            let n = min(dst.count, data.count - at)
            dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: data[at..<(at + n)]))
            at += n
            slot &+= 1
        }
        q.store(.requestTail, tail)
        var a = GroupAssembler(deviceID: 1, pasid: nil, credit: 32)
        // nil: refused (overrun or closed), and the service would disconnect this device.
        let taken = t.poll(limit: Int(data[5]) + 1) { bytes in
            check(bytes.count == PageRequest.byteCount, "a record of \(bytes.count) bytes")
            if let g = a.add(bytes) { a.answered(g) }
        }
        if let taken {
            check(taken <= SharedQueue.capacity, "took \(taken) records from a ring of \(SharedQueue.capacity)")
        }
        // Start the next input from a consistent ring (the transport stored its head).
        q.store(.requestTail, q.load(.requestHead))
    }

    /// One shared ring for every input (a memfd and two eventfds per input would dominate).
    /// The loop thread owns a transport; here the fuzzer's one thread does.
    nonisolated(unsafe) static let sharedTransport: SharedRingSeam? = try? SharedRingSeam()
}

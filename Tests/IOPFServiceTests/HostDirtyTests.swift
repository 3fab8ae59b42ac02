// Dirty tracking for hosts over the socket (protocol 1.2), with this test process as the
// host and a device of its own: the log reports what the device wrote through its
// translations and nothing else, inline and into a memfd; every refusal Protocol.md lists
// is tried while a bystander keeps serving; a read waits for the devices' acknowledgements.

import Foundation
import Glibc
import Synchronization
import SystemPackage
import Testing
import IOPFTestSupport
@testable import CIOPFShim
@testable import IOPFCore
@testable import IOPFDevice
@testable import IOPFService
@testable import IOPFSystem
@testable import IOPFWire

@Suite(.serialized, .timeLimit(.minutes(15))) struct HostDirtyTests {
    static let iova: UInt64 = 1 << 40

    /// A device of the host that writes a page the way hardware with ATS would: translate,
    /// and on a read-only or missing translation send a write page request first.
    struct Writer {
        let client: DeviceClient
        let attachment: DeviceAttachment
        var cookie: UInt32 = 0

        init(_ path: String, space: String) throws {
            client = try DeviceClient(connectingTo: path)
            attachment = try client.attach(Attach(deviceID: 5, addressSpaceName: space))
            client.serveInvalidations { _ in true }
        }

        /// Whether the translation of page `page` is writable now.
        func writable(page: Int) throws -> Bool {
            try client.translate(iova: HostDirtyTests.iova + UInt64(page) << 12, pages: 1).entries[0]
                & TranslateReply.write != 0
        }

        mutating func write(page: Int, _ value: UInt64) throws {
            let iova = HostDirtyTests.iova + UInt64(page) << 12
            var entry = try client.translate(iova: iova, pages: 1).entries[0]
            if entry & TranslateReply.write == 0 {
                cookie += 1
                #expect(try fault(attachment, device: 5, iova: iova, cookie: cookie) == .success)
                entry = try client.translate(iova: iova, pages: 1).entries[0]
            }
            #expect(entry & TranslateReply.write != 0, "page \(page) is not writable after a write fault")
            #expect(attachment.memory.store(entry & ~0xFFF, value))
        }
    }

    static func setBits(_ b: PageBitmap) -> [Int] {
        var out: [Int] = []
        var p = b.findNextSet(from: 0)
        while p < b.count {
            out.append(p)
            p = b.findNextSet(from: p + 1)
        }
        return out
    }

    static func bitmapMemfd(_ size: Int, seal: Bool = true) -> CInt {
        let fd = iopf_memfd_create_sealable("iopf-test-bitmap")
        #expect(ftruncate(fd, off_t(size)) == 0)
        if seal { #expect(iopf_seal_size(fd) == 0) }
        return fd
    }

    @Test func theLogReportsWhatTheDeviceWroteInlineAndIntoAMemfd() throws {
        let s = try ListeningService()
        let m = try TestHostMemory()
        let host = try m.attach(s.path, name: "vm-d", iova: Self.iova)
        var w = try Writer(s.path, space: "vm-d")
        try w.write(page: 1, 0x11)  // before tracking: never reported
        try host.startDirtyTracking(iova: Self.iova, size: m.size)
        #expect(try !w.writable(page: 1), "a present page keeps write access after DIRTY_START")
        #expect(Self.setBits(try host.readDirty(iova: Self.iova, size: m.size)).isEmpty)
        try w.write(page: 3, 0x33)
        try w.write(page: 200, 0x200)
        try w.write(page: 3, 0x34)
        #expect(m.pointer(3 << 12).load(as: UInt64.self) == 0x34)
        #expect(Self.setBits(try host.readDirty(iova: Self.iova, size: m.size)) == [3, 200])
        // Read and cleared: nothing until the next write, which must fault again.
        #expect(try !w.writable(page: 3))
        #expect(Self.setBits(try host.readDirty(iova: Self.iova, size: m.size)).isEmpty)
        // A sub-range reports its own pages, bit 0 at its start.
        try w.write(page: 130, 0x130)
        try w.write(page: 5, 0x5)
        #expect(Self.setBits(try host.readDirty(iova: Self.iova + 128 << 12, size: 64 << 12)) == [2])
        // Into a memfd at an offset: the bitmap lands there, the reply says how many pages.
        let fd = Self.bitmapMemfd(4096)
        let small = Self.bitmapMemfd(16)
        defer { for f in [fd, small] { Sys.close(f) } }
        // A bitmap that cannot be written is refused before the log is read: nothing is lost.
        let tooSmall = refusal {
            try host.readDirty(iova: Self.iova, size: m.size, into: FileDescriptor(rawValue: small))
        }
        #expect(tooSmall?.errno == WireErrno.invalid, "\(String(describing: tooSmall))")
        #expect(try host.readDirty(iova: Self.iova, size: m.size, into: FileDescriptor(rawValue: fd), at: 64) == 1)
        var words = [UInt64](repeating: 0, count: 4)
        #expect(words.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 32, 64) } == 32)
        #expect(words == [1 << 5, 0, 0, 0])
        try host.stopDirtyTracking(iova: Self.iova, size: m.size)
        #expect(try w.writable(page: 5), "write access comes back at DIRTY_STOP")
        let stopped = refusal { _ = try host.readDirty(iova: Self.iova, size: m.size) }
        #expect(stopped?.errno == WireErrno.noEntry && stopped?.text.contains("not inside a started range") == true)
        let stats = s.waitFor { $0.protocolErrorKinds[.badDirtyRange] == 1 }
        let record = stats.hosts[0]
        #expect(record.dirtyReads == 5 && record.dirtyPagesReported == 4 && record.dirtyRanges == 0, "\(record)")
        #expect(stats.protocolErrorKinds[.badDirtyRange] == 1)
    }

    /// DMA_UNMAP with GET_DIRTY (1.3): the pages written since the last read come back with
    /// the unmap, inline or in a memfd, once and only once; the IOVAs are gone; a refused
    /// one removes nothing and loses no bit; a 1.2 host is told it needs 1.3.
    @Test func anUnmapReadsTheLogWithTheRemoval() throws {
        let s = try ListeningService()
        let m = try TestHostMemory()
        let host = try m.declare(s.path, name: "vm-u")
        let half = m.size / 2  // two mappings of 128 pages
        try host.map(iova: Self.iova, hostAddress: m.base, size: half, prot: [.read, .write])
        try host.map(iova: Self.iova + half, hostAddress: m.base + half, size: half, prot: [.read, .write])
        var w = try Writer(s.path, space: "vm-u")
        try host.startDirtyTracking(iova: Self.iova, size: m.size)
        for page in [3, 100, 200] { try w.write(page: page, UInt64(page)) }
        // Refused before anything is read or removed: a range that cuts a mapping, one
        // outside the started range, a bitmap too small.
        let cut = refusal { _ = try host.unmapReadingDirty(iova: Self.iova, size: 64 << 12) }
        #expect(cut?.errno == WireErrno.invalid, "\(String(describing: cut))")
        let outside = refusal { _ = try host.unmapReadingDirty(iova: Self.iova + m.size, size: 4096) }
        #expect(outside?.errno == WireErrno.noEntry && outside?.text.contains("not inside a started range") == true)
        let small = Self.bitmapMemfd(8)
        let fd = Self.bitmapMemfd(4096)
        defer { for f in [small, fd] { Sys.close(f) } }
        let tooSmall = refusal {
            _ = try host.unmapReadingDirty(iova: Self.iova, size: half, into: FileDescriptor(rawValue: small))
        }
        #expect(tooSmall?.errno == WireErrno.invalid && tooSmall?.text.contains("GET_DIRTY") == true)
        #expect(try w.writable(page: 3), "a refused unmap left the mapping and its write access")
        // The first mapping goes with its two pages; they are not reported again.
        let (bytes, dirty) = try host.unmapReadingDirty(iova: Self.iova, size: half)
        #expect(bytes == half && Self.setBits(dirty) == [3, 100])
        #expect(try fault(w.attachment, device: 5, iova: Self.iova + 3 << 12, cookie: 900) == .invalid)
        #expect(Self.setBits(try host.readDirty(iova: Self.iova, size: m.size)) == [200])
        // Into a memfd at an offset: the bitmap of the second mapping, one page written.
        try w.write(page: 201, 0x201)
        let second = try host.unmapReadingDirty(
            iova: Self.iova + half, size: half, into: FileDescriptor(rawValue: fd), at: 8)
        #expect(second.bytes == half && second.reportedPages == 1)
        var words = [UInt64](repeating: 0, count: 3)
        #expect(words.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 24, 0) } == 24)
        #expect(words == [0, 0, 1 << (201 - 128 - 64)])
        #expect(m.pointer(201 << 12).load(as: UInt64.self) == 0x201)
        let record = s.waitFor { $0.hosts.first?.unmaps == 2 }.hosts[0]
        #expect(record.unmaps == 2 && record.dirtyReads == 3 && record.dirtyPagesReported == 4, "\(record)")
        // A host that agreed 1.2 sends the 32-byte form: not supported, said so.
        let old = try TestHostMemory()
        let raw = try RawPeer(s.path)
        try raw.send(Hello(minor: 2, role: .host).message(id: 1))
        _ = try raw.receive()
        try raw.send(HostDeclaration(name: "vm-old", regions: [old.region]).message(id: 2), fds: [old.uffd, old.memfd])
        #expect(try raw.receive()?.header.isError == false)
        try raw.send(
            DMAUnmapRequest(iova: Self.iova, size: 4096, flags: DMAUnmapRequest.getDirty).message(id: 3))
        let refused = try raw.receive()
        let text = refused.map { r in r.payload.withUnsafeBytes { Wire.errorText($0) } } ?? ""
        #expect(refused?.header.isError == true && text.contains("needs protocol 1.3"), "\(text)")
        // A descriptor on a plain unmap, an unknown flag: errors naming what was wrong.
        try raw.send(DMAUnmapRequest(iova: Self.iova, size: 4096).message(id: 4), fds: [fd])
        #expect(try raw.receive()?.header.isError == true)
        try raw.send(DMAUnmapRequest(iova: Self.iova, size: 4096, flags: 2).message(id: 5))
        #expect(try raw.receive()?.header.isError == true)
        let kinds = s.waitFor { $0.protocolErrorKinds[.unexpectedFDs] == 1 && $0.protocolErrorKinds[.badField] == 1 }
            .protocolErrorKinds
        #expect(kinds[.unexpectedFDs] == 1 && kinds[.badField] == 1, "\(kinds)")
        try w.client.detach()
        try host.detach()
    }

    @Test func hostileDirtyRequestsAreRefusedSayingWhyAndTheBystanderKeepsServing() throws {
        let s = try ListeningService()
        let b = try Bystander(s.path)
        defer { b.finish() }
        let m = try TestHostMemory(size: 4 << 20)
        let host = try m.attach(s.path, name: "vm-h", iova: Self.iova)
        let half = m.size / 2
        func expectRefused(_ errno: UInt32, _ text: String, _ body: () throws -> Void) {
            let r = refusal(body)
            #expect(r?.errno == errno && r?.text.contains(text) == true, "\(String(describing: r))")
        }
        try host.startDirtyTracking(iova: Self.iova, size: half)
        // Overlapping starts, directly and through the one mapping both would touch.
        expectRefused(WireErrno.exists, "overlaps the started range") {
            try host.startDirtyTracking(iova: Self.iova + 4096, size: 4096)
        }
        expectRefused(WireErrno.exists, "through a mapping both touch") {
            try host.startDirtyTracking(iova: Self.iova + half, size: half)
        }
        // Huge ranges: past the I/O address space, past one read's limit, past an inline bitmap.
        expectRefused(WireErrno.invalid, "past the I/O address space") {
            try host.startDirtyTracking(iova: 1 << 60, size: 1 << 62)
        }
        expectRefused(WireErrno.invalid, "at most") { _ = try host.readDirty(iova: Self.iova, size: 1 << 40) }
        expectRefused(WireErrno.messageSize, "send a memfd") {
            try host.stopDirtyTracking(iova: Self.iova, size: half)
            try host.startDirtyTracking(iova: 0, size: 1 << 40)
            _ = try host.readDirty(iova: 0, size: 1 << 30)
        }
        // Reading or stopping what was not started.
        expectRefused(WireErrno.noEntry, "not a started range") { try host.stopDirtyTracking(iova: 0, size: 4096) }
        try host.stopDirtyTracking(iova: 0, size: 1 << 40)
        expectRefused(WireErrno.noEntry, "not inside a started range") {
            _ = try host.readDirty(iova: Self.iova, size: 4096)
        }
        // Bitmaps too small, unsealed, not memfds, or two of them.
        try host.startDirtyTracking(iova: Self.iova, size: m.size)
        let small = Self.bitmapMemfd(64)
        let unsealed = Self.bitmapMemfd(4096, seal: false)
        var pair: [CInt] = [0, 0]
        #expect(socketpair(AF_UNIX, CInt(SOCK_STREAM.rawValue), 0, &pair) == 0)
        defer { for fd in [small, unsealed] + pair { Sys.close(fd) } }
        expectRefused(WireErrno.invalid, "the bitmap ends at byte 192") {
            try host.readDirty(iova: Self.iova, size: m.size, into: FileDescriptor(rawValue: small), at: 64)
        }
        expectRefused(WireErrno.notPermitted, "F_SEAL_SHRINK") {
            try host.readDirty(iova: Self.iova, size: m.size, into: FileDescriptor(rawValue: unsealed))
        }
        expectRefused(WireErrno.badFD, "not a regular file") {
            try host.readDirty(iova: Self.iova, size: m.size, into: FileDescriptor(rawValue: pair[0]))
        }
        // 64 ranges at most (of the 4 MiB mapping's neighbours: ranges with no mapping).
        try host.stopDirtyTracking(iova: Self.iova, size: m.size)
        for k in 0..<UInt64(DirtyLimits.maxRanges) { try host.startDirtyTracking(iova: k << 12, size: 4096) }
        expectRefused(WireErrno.noSpace, "ranges are started already") {
            try host.startDirtyTracking(iova: 1 << 30, size: 4096)
        }
        // A bad offset never reaches the service's checks: the wire decoder refuses it.
        let raw = try RawPeer(s.path)
        try raw.send(Hello(role: .host).message(id: 1))
        _ = try raw.receive()
        try raw.send(DirtyReadRequest(iova: Self.iova, size: 4096, bitmapOffset: 3).message(id: 2))
        let reply = try raw.receive()
        #expect(reply?.header.isError == true)
        // The same, over and over, while the bystander works: errors only, nothing grows.
        let stop = Atomic<Bool>(false)
        try b.keepsServing("hostile dirty requests", s.service) {
            attackerThread {
                while !stop.load(ordering: .relaxed) {
                    _ = refusal { try host.startDirtyTracking(iova: 1 << 20, size: 4096) }
                    _ = refusal { _ = try host.readDirty(iova: 1 << 30, size: 1 << 30) }
                    _ = refusal { try host.readDirty(iova: 0, size: 4096, into: FileDescriptor(rawValue: small)) }
                    _ = refusal { try host.stopDirtyTracking(iova: 1 << 30, size: 4096) }
                    _ = refusal { _ = try host.unmapReadingDirty(iova: 1 << 30, size: 1 << 30) }
                }
            }
            return { stop.store(true, ordering: .relaxed) }
        }
        #expect(s.waitUntil { $0.hosts.first { $0.name == "vm-h" }?.dirtyRanges == DirtyLimits.maxRanges })
        #expect(try s.service.checkInvariants().wait().isEmpty)
    }

    @Test func aReadIsAnsweredOnlyOnceTheDevicesDroppedWriteAccessAndOneAtATime() throws {
        let s = try ListeningService(timeout: .milliseconds(600))
        let m = try TestHostMemory()
        // The host, raw: it pipelines requests as a hostile one would.
        let raw = try RawPeer(s.path)
        try raw.send(Hello(role: .host).message(id: 1))
        #expect(try raw.receive()?.header.isError == false)
        try raw.send(HostDeclaration(name: "vm-slow", regions: [m.region]).message(id: 2), fds: [m.uffd, m.memfd])
        #expect(try raw.receive()?.header.isError == false)
        try raw.send(
            DMAMapRequest(iova: Self.iova, hostAddress: m.base, size: m.size, flags: DMAMapRequest.read | 2)
                .message(id: 3))
        #expect(try raw.receive()?.header.isError == false)
        // Devices that never acknowledge: each request's write-protection waits until they are fenced.
        func silentWriter(_ id: UInt32, page: UInt64) throws -> (DeviceClient, DeviceAttachment) {
            let c = try DeviceClient(connectingTo: s.path)
            let a = try c.attach(Attach(deviceID: id, addressSpaceName: "vm-slow"))
            #expect(try fault(a, device: id, iova: Self.iova + page << 12, cookie: 1) == .success)
            #expect(try c.translate(iova: Self.iova + page << 12, pages: 1).entries[0] & TranslateReply.write != 0)
            return (c, a)
        }
        let first = try silentWriter(1, page: 9)
        var t0 = ContinuousClock.now
        try raw.send(DirtyStartRequest(iova: Self.iova, size: m.size).message(id: 4))
        #expect(try raw.receive()?.header.isError == false)
        #expect(
            ContinuousClock.now - t0 >= .milliseconds(400),
            "DIRTY_START answered before its device dropped write access")
        let second = try silentWriter(2, page: 11)
        t0 = ContinuousClock.now
        try raw.send(DirtyReadRequest(iova: Self.iova, size: m.size).message(id: 5))
        try raw.send(DirtyReadRequest(iova: Self.iova, size: m.size).message(id: 6))
        let busy = try raw.receive()
        #expect(busy?.header.id == 6 && busy?.header.error == WireErrno.busy)
        let read = try raw.receive()
        #expect(read?.header.id == 5 && read?.header.isError == false)
        #expect(
            ContinuousClock.now - t0 >= .milliseconds(400), "DIRTY_READ answered before its device dropped write access"
        )
        let reply = try DirtyReadReply(payload: read?.payload ?? [], from: 0)
        #expect(reply.reportedPages == 1)
        #expect(reply.bitmap.withUnsafeBytes { PageBitmap(count: 256, littleEndianBytes: $0) }.test(11))
        #expect(s.waitUntil { $0.protocolErrorKinds[.invalidateTimeout, default: 0] == 2 })
        _ = (first, second)
    }
}

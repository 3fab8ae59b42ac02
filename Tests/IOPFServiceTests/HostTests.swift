// Hosts over the socket, with this test process as the host: it hands over memfd memory and
// a real userfaultfd, maps it, and changes it with madvise / mmap(MAP_FIXED) while devices
// (DeviceClient, also here) fault and DMA. Every refusal the protocol document lists is
// tried once, and the service is checked to go on serving afterwards.

import Foundation
import Glibc
import SystemPackage
import Testing
import IOPFTestSupport
@testable import CIOPFShim
@testable import IOPFCore
@testable import IOPFDevice
@testable import IOPFService
@testable import IOPFSystem
@testable import IOPFWire

@Suite(.serialized, .timeLimit(.minutes(15))) struct HostTests {
    static let iova: UInt64 = 1 << 40

    @Test func aDeviceReachesTheHostsMemoryAndTheHostsChangesBecomeInvalidations() throws {
        let s = try ListeningService()
        let m = try TestHostMemory()
        let host = try m.attach(s.path, name: "vm-a", iova: Self.iova)
        let client = try DeviceClient(connectingTo: s.path)
        let a = try client.attach(Attach(deviceID: 3, addressSpaceName: "vm-a"))
        let invalidated = Lock<[Invalidate]>([])
        client.serveInvalidations { inv in
            invalidated.withLock { $0.append(inv) }
            return true
        }
        #expect(a.windows == [DMAWindow(iova: Self.iova, size: m.size, prot: 3)] && a.memory.regionInfo.count == 1)
        // A write through the translation lands in the host's memory at the mapped address.
        let iova = Self.iova + 7 << 12
        #expect(try fault(a, device: 3, iova: iova, cookie: 1) == .success)
        let entry = try client.translate(iova: iova, pages: 1).entries[0]
        #expect(entry & TranslateReply.write != 0)
        #expect(a.memory.store(entry & ~0xFFF, 0xC0FFEE))
        #expect(m.pointer(7 << 12).load(as: UInt64.self) == 0xC0FFEE)
        // madvise(MADV_DONTNEED) by the host: REMOVE, an INVALIDATE to the device, the
        // translation gone once SYNC returns; the memfd page keeps its data.
        #expect(madvise(m.pointer(7 << 12), 4096, MADV_DONTNEED) == 0)
        try host.sync()
        #expect(try client.translate(iova: iova, pages: 1).entries == [0])
        #expect(invalidated.withLock { $0.contains { $0.ranges.contains { $0.start <= iova && iova <= $0.last } } })
        #expect(try fault(a, device: 3, iova: iova, cookie: 2) == .success)
        #expect(m.pointer(7 << 12).load(as: UInt64.self) == 0xC0FFEE)
        // mmap(MAP_FIXED) over the range: UNMAP, the range is gone (INVALID) until the host
        // re-declares it, which registers it again: a later madvise is seen.
        #expect(
            mmap(m.pointer(0), Int(m.size), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, m.memfd, 0) == m.pointer(0))
        try host.sync()
        #expect(try fault(a, device: 3, iova: iova, cookie: 3) == .invalid)
        try host.updateHostAddress(iova: Self.iova, size: m.size, hostAddress: m.base)
        #expect(try fault(a, device: 3, iova: iova, cookie: 4) == .success)
        let before = s.service.statistics.uffdEventsBySource["vm-a"] ?? 0
        #expect(madvise(m.pointer(7 << 12), 4096, MADV_DONTNEED) == 0)
        try host.sync()
        #expect(s.service.statistics.uffdEventsBySource["vm-a"] == before + 1)
        #expect(try client.translate(iova: iova, pages: 1).entries == [0])
        // DMA_UNMAP: the bytes, and the IOVA answers INVALID after.
        #expect(try host.unmap(iova: Self.iova, size: m.size) == m.size)
        #expect(try fault(a, device: 3, iova: iova, cookie: 5) == .invalid)
        let stats = s.service.statistics
        #expect(
            stats.hosts.count == 1 && stats.hosts[0].devices == 1 && stats.hosts[0].addressUpdates == 1,
            "\(stats.hosts)")
        #expect(
            stats.uffdRemove >= 2 && stats.uffdUnmap >= 1 && stats.protocolErrors == 0, "\(stats.protocolErrorKinds)")
        #expect(try s.service.checkInvariants().wait().isEmpty)
        try client.detach()
        try host.detach()
    }

    @Test func twoHostsNeverSeeEachOthersPages() throws {
        let s = try ListeningService()
        let (ma, mb) = (try TestHostMemory(), try TestHostMemory())
        let ha = try ma.attach(s.path, name: "vm-a", iova: Self.iova)
        let hb = try mb.attach(s.path, name: "vm-b", iova: Self.iova << 1)
        let (ca, cb) = (try DeviceClient(connectingTo: s.path), try DeviceClient(connectingTo: s.path))
        // The same device id in two address spaces is two devices.
        let a = try ca.attach(Attach(deviceID: 1, addressSpaceName: "vm-a"))
        let b = try cb.attach(Attach(deviceID: 1, addressSpaceName: "vm-b"))
        #expect(a.memory.regionInfo[0].phys != b.memory.regionInfo[0].phys)
        #expect(try fault(a, device: 1, iova: Self.iova << 1, cookie: 1) == .invalid)
        #expect(try fault(b, device: 1, iova: Self.iova, cookie: 1) == .invalid)
        #expect(try fault(a, device: 1, iova: Self.iova, cookie: 2) == .success)
        #expect(try fault(b, device: 1, iova: Self.iova << 1, cookie: 2) == .success)
        #expect(try ca.translate(iova: Self.iova << 1, pages: 1).entries == [0])
        let pa = try ca.translate(iova: Self.iova, pages: 1).entries[0] & ~0xFFF
        let pb = try cb.translate(iova: Self.iova << 1, pages: 1).entries[0] & ~0xFFF
        // Each translation lies in its own host's region and outside the other's.
        #expect(b.memory.load(pa) == nil && a.memory.load(pb) == nil)
        #expect(a.memory.store(pa, 0xAAAA) && b.memory.store(pb, 0xBBBB))
        #expect(ma.pointer(0).load(as: UInt64.self) == 0xAAAA && mb.pointer(0).load(as: UInt64.self) == 0xBBBB)
        _ = (ha, hb)
    }

    @Test func aHostThatGoesTakesItsDevicesAndKeepsNothingRegistered() throws {
        let s = try ListeningService()
        let m = try TestHostMemory()
        var host: HostClient? = try m.attach(s.path, name: "vm-gone", iova: Self.iova)
        let client = try DeviceClient(connectingTo: s.path)
        let a = try client.attach(Attach(deviceID: 1, addressSpaceName: "vm-gone"))
        client.serveInvalidations { _ in true }
        #expect(try fault(a, device: 1, iova: Self.iova, cookie: 1) == .success)
        host!.close()  // the host's connection closes; it keeps its own copy of the uffd
        host = nil
        let stats = s.waitFor { $0.hosts.first?.ended != nil && $0.devicesClosed == 1 }
        #expect(stats.hosts.first?.ended?.contains("closed the connection") == true, "\(stats.hosts)")
        // The notice is read by the device's invalidation thread, which may not have run yet.
        let deadline = ContinuousClock.now + .seconds(5)
        while client.detachedBecause == nil && ContinuousClock.now < deadline { usleep(1000) }
        #expect(
            client.detachedBecause?.contains("its host 'vm-gone' went away") == true,
            "\(client.detachedBecause ?? "no notice")")
        #expect(throws: DeviceClientError.self) { _ = try client.translate(iova: Self.iova, pages: 1) }
        // The ranges are unregistered although the host still holds the uffd: its munmap
        // and madvise do not wait for a reader that is gone.
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            madvise(m.pointer(0), Int(m.size), MADV_DONTNEED)
            done.signal()
        }
        #expect(done.wait(timeout: .now() + 5) == .success, "the host's madvise blocked after the service let go")
        // The name is free again, and unknown names are refused.
        let again = try m.attach(s.path, name: "vm-gone", iova: Self.iova)
        let other = try DeviceClient(connectingTo: s.path)
        #expect(
            refusal { _ = try other.attach(Attach(deviceID: 1, addressSpaceName: "vm-nope")) }?.errno
                == WireErrno.noEntry)
        _ = again
    }

    /// A host that comes and goes under new names must not grow the statistics: ended
    /// records beyond `keptEndedHosts` are dropped and their events folded together.
    @Test func hostsThatComeAndGoKeepTheStatisticsBounded() throws {
        let s = try ListeningService()
        let m = try TestHostMemory()
        let rounds = ServiceStatistics.keptEndedHosts + 8
        for i in 0..<rounds {
            let host = try m.attach(s.path, name: "vm-\(i)", iova: Self.iova)
            // One REMOVE event from this host's memory, counted under its name.
            let before = s.service.statistics.uffdEvents
            #expect(madvise(m.pointer(0), 4096, MADV_DONTNEED) == 0)
            #expect(s.waitUntil { $0.uffdEvents > before })
            host.close()
            #expect(s.waitUntil { $0.hostsEnded == i + 1 })
        }
        let stats = s.service.statistics
        #expect(stats.hostsEnded == rounds)
        #expect(stats.hosts.count == ServiceStatistics.keptEndedHosts)
        #expect(stats.hosts.first?.name == "vm-8" && stats.hosts.last?.name == "vm-\(rounds - 1)")
        #expect(stats.uffdEventsBySource["ended hosts"] == 8, "\(stats.uffdEventsBySource)")
        #expect(stats.uffdEventsBySource.count <= ServiceStatistics.keptEndedHosts + 2)
        #expect(stats.uffdEventsBySource.values.reduce(0, +) == stats.uffdEvents)
    }

    @Test func handOversThatAreWrongAreRefusedSayingWhy() throws {
        let s = try ListeningService()
        let m = try TestHostMemory()
        func declare(_ name: String, regions: [HostRegionEntry]? = nil, uffd: CInt? = nil, memfds: [CInt]? = nil) -> (
            UInt32, String
        )? {
            refusal {
                let h = try HostClient(connectingTo: s.path)
                defer { h.close() }
                try h.declare(
                    name: name, regions: regions ?? [m.region], userfaultfd: FileDescriptor(rawValue: uffd ?? m.uffd),
                    memfds: (memfds ?? [m.memfd]).map(FileDescriptor.init(rawValue:))
                )
            }
        }
        // A uffd without the events.
        let bare = iopf_userfaultfd(O_CLOEXEC | O_NONBLOCK)
        var granted: UInt64 = 0, ioctls: UInt64 = 0
        #expect(iopf_uffd_api(bare, 0, &granted, &ioctls) == 0)
        let noEvents = declare("h1", uffd: bare)
        #expect(
            noEvents?.1.contains("lacks EVENT_REMOVE, EVENT_UNMAP, EVENT_REMAP") == true,
            "\(String(describing: noEvents))")
        Sys.close(bare)
        // Something that is not a uffd.
        let notUffd = declare("h2", uffd: m.memfd)
        #expect(
            notUffd?.0 == WireErrno.badFD && notUffd?.1.contains("must be a userfaultfd") == true,
            "\(String(describing: notUffd))")
        // A region table that does not match the memfd's size.
        var big = m.region
        big.size = m.size * 2
        #expect(declare("h3", regions: [big])?.1.contains("exceeds memfd 0's size") == true)
        // Overlapping regions (refused by the decoder).
        let half = HostRegionEntry(hostAddress: m.base + 4096, size: 8192, fdOffset: 4096, fdIndex: 0)
        #expect(declare("h4", regions: [m.region, half])?.1.contains("must not overlap") == true)
        // A region that is not the host's memory: anonymous memory, and the memfd at the wrong offset.
        let anon = mmap(nil, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        defer { munmap(anon, 1 << 20) }
        let notMine = declare(
            "h5",
            regions: [
                HostRegionEntry(hostAddress: UInt64(UInt(bitPattern: anon)), size: 1 << 20, fdOffset: 0, fdIndex: 0)
            ])
        #expect(
            notMine?.0 == WireErrno.fault && notMine?.1.contains("not the host's memory") == true,
            "\(String(describing: notMine))")
        let shifted = declare(
            "h6", regions: [HostRegionEntry(hostAddress: m.base, size: 4096, fdOffset: 8192, fdIndex: 0)])
        #expect(shifted?.1.contains("not memfd 0 at") == true, "\(String(describing: shifted))")
        // An unsealed memfd.
        let loose = try TestHostMemory(sealed: false)
        #expect(
            declare("h7", regions: [loose.region], uffd: loose.uffd, memfds: [loose.memfd])?.1.contains("F_SEAL_SHRINK")
                == true)
        // Descriptors that do not match the table.
        #expect(declare("h8", memfds: [])?.0 == WireErrno.badFD)
        // A good host; then a second under its name, and mappings outside its memory.
        let host = try m.attach(s.path, name: "vm", iova: Self.iova)
        let twin = try TestHostMemory()
        #expect(refusal { _ = try twin.attach(s.path, name: "vm", iova: Self.iova) }?.errno == WireErrno.exists)
        let outside = refusal {
            try host.map(iova: Self.iova << 1, hostAddress: m.base + m.size, size: 4096, prot: [.read])
        }
        #expect(
            outside?.errno == WireErrno.fault && outside?.text.contains("not the host's memory") == true,
            "\(String(describing: outside))")
        #expect(
            refusal { try host.map(iova: Self.iova, hostAddress: m.base, size: 4096, prot: [.read]) }?.errno
                == WireErrno.exists)
        let moved = refusal { try host.updateHostAddress(iova: Self.iova, size: m.size, hostAddress: twin.base) }
        #expect(moved?.errno == WireErrno.fault, "VADDR onto another process's memfd: \(String(describing: moved))")
        #expect(refusal { try host.unmap(iova: Self.iova, size: 4096) }?.errno == WireErrno.invalid)  // cuts a mapping
        // Still serving: the good host's device works.
        let client = try DeviceClient(connectingTo: s.path)
        let a = try client.attach(Attach(deviceID: 9, addressSpaceName: "vm"))
        #expect(try fault(a, device: 9, iova: Self.iova, cookie: 1) == .success)
        let kinds = s.service.statistics.protocolErrorKinds
        #expect(kinds[.badUserfaultfd] == 2 && kinds[.notHostMemory] == 4 && kinds[.badMemfd] == 1, "\(kinds)")
    }

    /// A hugetlbfs memfd is taken with its 2 MiB page size and served in whole blocks: one
    /// fault maps the block, its other pages translate without faults, and a madvise of the
    /// huge page takes the block away.
    @Test func aHostOnHugePagesIsServedInWholeBlocks() throws {
        guard let reservation = HugePageReservation(pages: 2) else {
            Issue.record("no 2 MiB huge pages could be reserved (/proc/sys/vm/nr_hugepages)")
            return
        }
        defer { withExtendedLifetime(reservation) {} }
        let s = try ListeningService()
        let size: UInt64 = 4 << 20
        let fd = iopf_memfd_create_huge("iopf-test-huge")
        #expect(fd >= 0 && ftruncate(fd, off_t(size)) == 0 && iopf_seal_size(fd) == 0)
        defer { Sys.close(fd) }
        let p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)!
        #expect(p != MAP_FAILED)
        defer { munmap(p, Int(size)) }
        let base = UInt64(UInt(bitPattern: p))
        func declare(_ region: HostRegionEntry) throws -> (HostClient, (errno: UInt32, text: String)?) {
            let host = try HostClient(connectingTo: s.path)
            let uffd = try HostClient.makeUserfaultfd()
            defer { Sys.close(uffd) }
            let r = refusal {
                try host.declare(
                    name: "vm-huge", regions: [region], userfaultfd: uffd, memfds: [FileDescriptor(rawValue: fd)])
            }
            return (host, r)
        }
        let wrongSize = try declare(HostRegionEntry(hostAddress: base, size: size, fdOffset: 0, fdIndex: 0)).1
        #expect(wrongSize?.errno == WireErrno.invalid && wrongSize?.text.contains("has 2097152-byte pages") == true)
        let unaligned = try declare(
            HostRegionEntry(hostAddress: base + 4096, size: 2 << 20, fdOffset: 4096, pageSize: 2 << 20, fdIndex: 0)
        ).1
        #expect(unaligned?.errno == WireErrno.invalid && unaligned?.text.contains("not aligned") == true)
        let (host, refused) = try declare(
            HostRegionEntry(hostAddress: base, size: size, fdOffset: 0, pageSize: 2 << 20, fdIndex: 0))
        #expect(refused == nil)
        try host.map(iova: Self.iova, hostAddress: base, size: size, prot: [.read, .write])
        let client = try DeviceClient(connectingTo: s.path)
        let a = try client.attach(Attach(deviceID: 4, addressSpaceName: "vm-huge"))
        client.serveInvalidations { _ in true }
        #expect(try fault(a, device: 4, iova: Self.iova + 5 << 12, cookie: 1) == .success)
        let entries = try client.translate(iova: Self.iova, pages: 512).entries
        #expect(entries.allSatisfy { $0 != 0 }, "the faulted block translates whole")
        #expect(entries[300] & ~0xFFF == (entries[5] & ~0xFFF) + 295 << 12)
        #expect(try client.translate(iova: Self.iova + 2 << 20, pages: 1).entries == [0], "the next block waits")
        #expect(a.memory.store(entries[300] & ~0xFFF, 0xB10C))
        #expect(p.load(fromByteOffset: 300 << 12, as: UInt64.self) == 0xB10C)
        #expect(s.waitUntil { $0.hosts.first?.blockMappings == 1 && $0.hosts.first?.faults == 1 })
        // The host gives the huge page back: REMOVE, and the block is gone once SYNC returns.
        #expect(madvise(p, 2 << 20, MADV_DONTNEED) == 0)
        try host.sync()
        #expect(try client.translate(iova: Self.iova + 300 << 12, pages: 1).entries == [0])
        #expect(try fault(a, device: 4, iova: Self.iova + 7 << 12, cookie: 2) == .success)
        #expect(s.waitUntil { $0.hosts.first?.blockMappings == 2 })
        try client.detach()
        try host.detach()
    }
}

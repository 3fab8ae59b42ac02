// Trust between tenants: each test plays one hostile host or device (a separate process of
// another uid where the attack needs one, run through setpriv) while a bystander — a host
// of its own with a device doing DMA through the service — must keep at least half its
// throughput with every write landing where it should. Limits are set low through the
// service's configuration so that the attacks are quick.

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

@Suite(.serialized, .timeLimit(.minutes(15))) struct TenantTests {
    static let nobody: UInt32 = 65534
    static var canRunAsNobody: Bool {
        geteuid() == 0
            && ["/usr/bin/setpriv", "/usr/bin/chrt"].allSatisfy { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// Defect 1: sparse memfds of 2^63 - 4096 bytes crashed the service in an overflow.
    @Test func hugeSparseMemfdsAreRefusedAndTheServiceLives() throws {
        let s = try ListeningService { $0.maxTotalHostMemoryBytes = 3 << 40 }
        let b = try Bystander(s.path)
        defer { b.finish() }
        func memfd(_ size: UInt64) -> CInt {
            let fd = iopf_memfd_create_sealable("iopf-test-sparse")
            #expect(ftruncate(fd, off_t(size)) == 0 && iopf_seal_size(fd) == 0)
            return fd
        }
        func declare(_ sizes: [UInt64]) -> (errno: UInt32, text: String)? {
            let fds = sizes.map(memfd)
            defer { for fd in fds { Sys.close(fd) } }
            var regions: [HostRegionEntry] = []
            var maps: [UnsafeMutableRawPointer] = []
            for (k, fd) in fds.enumerated() {
                let p = mmap(nil, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)!
                maps.append(p)
                regions.append(
                    HostRegionEntry(
                        hostAddress: UInt64(UInt(bitPattern: p)), size: 1 << 20, fdOffset: 0,
                        fdIndex: UInt32(k)))
            }
            defer { for p in maps { munmap(p, 1 << 20) } }
            return refusal {
                let host = try HostClient(connectingTo: s.path)
                let uffd = try HostClient.makeUserfaultfd()
                defer { Sys.close(uffd) }
                try host.declare(
                    name: "sparse", regions: regions, userfaultfd: uffd, memfds: fds.map(FileDescriptor.init(rawValue:))
                )
                try host.detach()
            }
        }
        try b.keepsServing("huge memfds", s.service) {
            // Whatever the budget, a range the physical space cannot hold is refused, not trapped on.
            #expect(PhysicalSpace.shared.reserve(size: PhysicalSpace.reservationLimit) == nil)
            #expect(PhysicalSpace.shared.reserve(size: PhysicalSpace.reservationLimit - (2 << 20)) == nil)
            let huge = UInt64(Int64.max) - 4095
            let r = declare([huge, huge])
            #expect(r?.errno == WireErrno.noSpace && r?.text.contains("budget") == true, "\(String(describing: r))")
            // At the budget it is taken, and what it reserved comes back when it goes.
            for _ in 0..<4 { #expect(declare([1 << 40]) == nil) }
            #expect(declare([1 << 40, 1 << 40])?.errno == WireErrno.noSpace)
            return {}
        }
        #expect(s.service.statistics.hostBudgetsExceeded >= 2)
    }

    /// Defect 2: fallocate on the host's memfd stalled the loop while the host held the
    /// memfd's inode lock (a write(2) into it from a buffer on its own MISSING-mode uffd).
    @Test func aHostHoldingItsMemfdsInodeLockStallsNobody() throws {
        let s = try ListeningService()
        let b = try Bystander(s.path)
        defer { b.finish() }
        let m = try TestHostMemory(size: 1 << 20)
        let host = try m.attach(s.path, name: "locker", iova: 1 << 40)
        let client = try DeviceClient(connectingTo: s.path)
        let a = try client.attach(Attach(deviceID: 5, addressSpaceName: "locker"))
        client.serveInvalidations { _ in true }
        // The host's own uffd, MISSING mode, over an anonymous buffer nobody will fill.
        let trap = try HostClient.makeUserfaultfd()
        let buffer = mmap(nil, 1 << 16, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        #expect(iopf_uffd_register(trap.rawValue, UInt64(UInt(bitPattern: buffer)), 1 << 16, 1) == 0)
        let writer = DispatchSemaphore(value: 0)
        try b.keepsServing("inode lock", s.service) {
            let fd = m.memfd
            let address = UInt(bitPattern: buffer)
            Thread.detachNewThread {
                // Blocks in the fault on `buffer` while holding the memfd's inode lock.
                _ = pwrite(fd, UnsafeRawPointer(bitPattern: address), 1 << 16, 0)
                writer.signal()
            }
            usleep(100_000)
            // A page never touched: the old path allocated it with fallocate and waited.
            let started = ContinuousClock.now
            let code = try fault(a, device: 5, iova: (1 << 40) + 200 << 12, cookie: 1)
            #expect(code == .success)
            #expect(ContinuousClock.now - started < .seconds(1))
            return {}
        }
        Sys.close(trap)  // wakes the writer: the fault is served as if never registered
        #expect(writer.wait(timeout: .now() + 5) == .success)
        munmap(buffer, 1 << 16)
        try client.detach()
        try host.detach()
    }

    /// Defects 3 and 4: thousands of one-page mappings, madvise in a loop, and teardowns.
    @Test func manyMappingsAnEventLoopAndTeardownsStallNobody() throws {
        let s = try ListeningService()
        let b = try Bystander(s.path)
        defer { b.finish() }
        let pages = 4096
        let m = try TestHostMemory(size: UInt64(pages) << 12)
        let attacker = try HostClient(connectingTo: s.path)
        try attacker.declare(
            name: "churner", regions: [m.region], userfaultfd: FileDescriptor(rawValue: m.uffd),
            memfds: [m.memfd].map(FileDescriptor.init(rawValue:)))
        // Every page mapped at 8 IOVAs: 32k mappings, aliased.
        for k in 0..<(8 * pages) {
            try attacker.map(
                iova: UInt64(k + 1) << 12, hostAddress: m.base + UInt64(k % pages) << 12, size: 4096,
                prot: [.read, .write])
        }
        let client = try DeviceClient(connectingTo: s.path)
        let a = try client.attach(Attach(deviceID: 9, addressSpaceName: "churner"))
        client.serveInvalidations { _ in true }
        for k in stride(from: 0, to: 8 * pages, by: 97) {
            #expect(try fault(a, device: 9, iova: UInt64(k + 1) << 12, cookie: UInt32(k + 1)) == .success)
        }
        let stop = Atomic<Bool>(false)
        let paused = Atomic<Bool>(false)
        let ended = DispatchSemaphore(value: 0)
        try b.keepsServing("madvise loop over 32k mappings", s.service, paused: paused) {
            attackerThread {
                var k = 0
                while !stop.load(ordering: .relaxed) {
                    if paused.load(ordering: .relaxed) {
                        usleep(1000)
                        continue
                    }
                    // The whole memory and single pages, in turn.
                    let (at, length) = k % 2 == 0 ? (0, pages << 12) : ((k * 31 % pages) << 12, 4096)
                    madvise(m.pointer(UInt64(at)), length, MADV_DONTNEED)
                    k += 1
                }
                ended.signal()
            }
            return {
                stop.store(true, ordering: .relaxed)
                ended.wait()
            }
        }
        try b.keepsServing("teardown of 32k mappings", s.service) {
            try client.detach()
            try attacker.detach()
            return {}
        }
        #expect(try s.service.checkInvariants().wait().isEmpty)
    }

    /// Defect 5: a huge DMA_MAP over sparse memory allocated its whole bitmap.
    @Test func hugeMappingsCostTheirBudgetNotTheirSize() throws {
        let s = try ListeningService { $0.maxHostMappedBytes = 64 << 40 }
        let m = try TestHostMemory(size: 1 << 30)  // sparse: nothing touched
        let host = try HostClient(connectingTo: s.path)
        try host.declare(
            name: "sparse", regions: [m.region], userfaultfd: FileDescriptor(rawValue: m.uffd),
            memfds: [m.memfd].map(FileDescriptor.init(rawValue:)))
        let before = try s.service.footprint().wait().rssBytes
        // 1 GiB mapped 64 times over: a dense bitmap each would be 32 KiB; 2 GiB mappings more.
        for k in 0..<64 { try host.map(iova: UInt64(k + 1) << 30, hostAddress: m.base, size: 1 << 30, prot: [.read]) }
        let after = try s.service.footprint().wait().rssBytes
        #expect(after < before + (8 << 20), "RSS grew \((after - before) >> 20) MiB for 64 mappings")
        let s2 = try ListeningService { $0.maxHostMappedBytes = 4 << 30 }
        let host2 = try HostClient(connectingTo: s2.path)
        let m2 = try TestHostMemory(size: 1 << 30)
        try host2.declare(
            name: "greedy", regions: [m2.region], userfaultfd: FileDescriptor(rawValue: m2.uffd),
            memfds: [m2.memfd].map(FileDescriptor.init(rawValue:)))
        for k in 0..<4 { try host2.map(iova: UInt64(k + 1) << 30, hostAddress: m2.base, size: 1 << 30, prot: [.read]) }
        let r = refusal { try host2.map(iova: 5 << 30, hostAddress: m2.base, size: 4096, prot: [.read]) }
        #expect(
            r?.errno == WireErrno.noSpace && r?.text.contains("--max-host-mapped") == true, "\(String(describing: r))")
        #expect(try host2.unmap(iova: 1 << 30, size: 1 << 30) == 1 << 30)
        try host2.map(iova: 5 << 30, hostAddress: m2.base, size: 4096, prot: [.read])
        #expect(s2.waitFor { $0.hostBudgetsExceeded == 1 }.hostBudgetsExceeded == 1)
        _ = host
    }

    /// Defects 6 and 7: a peer of another uid can neither attach to a host's address space
    /// nor, by registering its name first, receive the devices meant for it.
    @Test(.enabled(if: canRunAsNobody)) func otherUsersCanNeitherAttachNorSquat() throws {
        let s = try ListeningService(socketMode: 0o666)
        let b = try Bystander(s.path)
        defer { b.finish() }
        try b.keepsServing("a squatter and a stranger", s.service) {
            // The squatter registers 'vm1' first, as nobody.
            let squatter = try childAsNobody([
                "host", "--connect", s.path, "--name", "vm1", "--memory", "4M",
                "--seconds", "0", "--json",
            ])
            var squatted = false
            let deadline = ContinuousClock.now + .seconds(30)
            while !squatted && ContinuousClock.now < deadline {
                squatted = s.service.statistics.hosts.contains { $0.name == "vm1" && $0.ended == nil }
                usleep(10_000)
            }
            #expect(squatted)
            // The owner (this process, root) still gets 'vm1', and its device reaches its memory.
            let m = try TestHostMemory()
            let owner = try m.attach(s.path, name: "vm1", iova: 1 << 40)
            let client = try DeviceClient(connectingTo: s.path)
            let a = try client.attach(Attach(deviceID: 1, addressSpaceName: "vm1"))
            #expect(try fault(a, device: 1, iova: 1 << 40, cookie: 1) == .success)
            let entry = try client.translate(iova: 1 << 40, pages: 1).entries[0]
            #expect(a.memory.store(entry & ~0xFFF, 0x5AFE) && m.pointer(0).load(as: UInt64.self) == 0x5AFE)
            // A stranger's device is refused, and told no other name.
            let stranger = try childAsNobody([
                "device", "--connect", s.path, "--address-space", "bystander",
                "--duration", "1", "--json",
            ])
            let (status, _) = stranger.finish()
            #expect(status != 0)
            #expect(s.service.statistics.protocolErrorKinds[.unknownAddressSpace, default: 0] >= 1)
            squatter.process.terminate()  // it detaches on SIGTERM
            _ = squatter.finish()
            try client.detach()
            try owner.detach()
            return {}
        }
        // A host that allows nobody gets nobody's device.
        let m = try TestHostMemory()
        let host = try HostClient(connectingTo: s.path)
        try host.declare(
            name: "shared", regions: [m.region], userfaultfd: FileDescriptor(rawValue: m.uffd),
            memfds: [m.memfd].map(FileDescriptor.init(rawValue:)), allowedUIDs: [Self.nobody])
        try host.map(iova: 1 << 40, hostAddress: m.base, size: m.size, prot: [.read, .write])
        let guest = try childAsNobody([
            "device", "--connect", s.path, "--address-space", "shared", "--duration", "1",
            "--json",
        ])
        let (status, json) = guest.finish()
        #expect(status == 0, "\(json)")
        try host.detach()
    }

    @Test func theUnknownNameErrorListsNoOtherName() throws {
        let s = try ListeningService()
        let m = try TestHostMemory()
        let host = try m.attach(s.path, name: "secret-vm", iova: 1 << 40)
        let client = try DeviceClient(connectingTo: s.path)
        let r = refusal { _ = try client.attach(Attach(deviceID: 1, addressSpaceName: "other")) }
        #expect(r?.errno == WireErrno.noEntry && r?.text.contains("secret-vm") == false, "\(String(describing: r))")
        try host.detach()
    }

    /// Defect 8: silent connections, and one uid's many peers or hosts, lock nobody out.
    @Test func silentPeersAndOneUsersQuotaLockNobodyOut() throws {
        let s = try ListeningService {
            $0.greetingTimeout = .milliseconds(300)
            $0.maxHostsPerUID = 3
        }
        let b = try Bystander(s.path)
        defer { b.finish() }
        var silent: [CInt] = []
        descriptorCounting.wait()
        defer { descriptorCounting.signal() }
        try b.keepsServing("silent connections", s.service) {
            for _ in 0..<300 { if let fd = try? Sys.connectUnix(path: s.path) { silent.append(fd) } }
            return {}
        }
        usleep(700_000)
        let client = try DeviceClient(connectingTo: s.path)
        _ = try client.attach(Attach(deviceID: 3))
        // Every silent connection the service took was cut at its deadline.
        let cut = s.waitFor { $0.refusedConnections[.greetingTimeout, default: 0] >= 100 }
        #expect(cut.refusedConnections[.greetingTimeout, default: 0] >= 100, "\(cut.refusedConnections)")
        for fd in silent { Sys.close(fd) }
        // The bystander is one host of this uid: two more, then refused.
        let memories = try (0..<3).map { _ in try TestHostMemory() }
        let first = try memories[0].attach(s.path, name: "h0", iova: 1 << 40)
        let second = try memories[1].attach(s.path, name: "h1", iova: 1 << 40)
        let r = refusal { _ = try memories[2].attach(s.path, name: "h2", iova: 1 << 40) }
        #expect(
            r?.errno == WireErrno.noSpace && r?.text.contains("--max-hosts-per-uid") == true, "\(String(describing: r))"
        )
        #expect(s.waitFor { $0.hostBudgetsExceeded == 1 }.hostBudgetsExceeded == 1)
        try first.detach()
        try second.detach()
    }

    @Test func onePeersQuotaLeavesRoomForOtherUsers() throws {
        let s = try ListeningService(socketMode: 0o666) { $0.maxPeersPerUID = 4 }
        var mine: [CInt] = []
        for _ in 0..<6 { if let fd = try? Sys.connectUnix(path: s.path) { mine.append(fd) } }
        defer { for fd in mine { Sys.close(fd) } }
        let stats = s.waitFor { $0.refusedConnections[.tooManyPeersForUID, default: 0] >= 2 }
        #expect(stats.refusedConnections[.tooManyPeersForUID] == 2, "\(stats.refusedConnections)")
        if Self.canRunAsNobody {
            let other = try childAsNobody(["device", "--connect", s.path, "--duration", "0.5", "--json"])
            let (status, json) = other.finish()
            #expect(status == 0, "another uid is not locked out: \(json)")
        }
    }

    /// Defect 9: a device handed the host's memfd could seal it against its host.
    @Test func aHostMustSealItsMemfdsSoNoDeviceCan() throws {
        let s = try ListeningService()
        let memfd = iopf_memfd_create_sealable("iopf-test-shrink-only")
        #expect(ftruncate(memfd, 1 << 20) == 0 && fcntl(memfd, fAddSeals, RemoteHostMemory.sealShrink) == 0)
        let p = mmap(nil, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0)!
        defer { munmap(p, 1 << 20); Sys.close(memfd) }
        let uffd = try HostClient.makeUserfaultfd()
        defer { Sys.close(uffd) }
        let host = try HostClient(connectingTo: s.path)
        let r = refusal {
            try host.declare(
                name: "half-sealed",
                regions: [
                    HostRegionEntry(
                        hostAddress: UInt64(UInt(bitPattern: p)),
                        size: 1 << 20, fdOffset: 0, fdIndex: 0)
                ],
                userfaultfd: uffd, memfds: [FileDescriptor(rawValue: memfd)])
        }
        #expect(
            r?.errno == WireErrno.notPermitted && r?.text.contains("F_SEAL_SEAL") == true, "\(String(describing: r))")
        // What a host hands over once sealed: nobody can add a seal, a device neither.
        let m = try TestHostMemory()
        #expect(fcntl(m.memfd, fAddSeals, RemoteHostMemory.sealFutureWrite) == -1 && errno == EPERM)
    }

    /// Defect 10: a host that moves its memory again and again grows nothing.
    @Test func movingMemoryAgainAndAgainGrowsNothing() throws {
        let s = try ListeningService()
        let m = try TestHostMemory(size: 1 << 16)
        let host = try m.attach(s.path, name: "mover", iova: 1 << 40)
        var current = m.base
        for k in 0..<2000 {
            // A new view of the same memfd, the mapping moved there, the old view gone.
            let next = UInt64(UInt(bitPattern: mmap(nil, Int(m.size), PROT_READ | PROT_WRITE, MAP_SHARED, m.memfd, 0)!))
            try host.updateHostAddress(iova: 1 << 40, size: m.size, hostAddress: next)
            if current != m.base { munmap(UnsafeMutableRawPointer(bitPattern: UInt(current)), Int(m.size)) }
            current = next
            if k % 500 == 0 { try host.sync() }
        }
        try host.sync()
        let record = s.service.statistics.hosts.first { $0.name == "mover" }
        #expect(record?.addressUpdates == 2000)
        // The declared region, the view before and the current one, each bound and registered.
        #expect((record?.trackedRanges ?? .max) <= 6, "\(String(describing: record))")
        try host.detach()
    }

    /// Defect 11: peers flooding TRANSLATE share the loop by cost, not by message. Each
    /// flooder keeps 16 TRANSLATEs of 512 pages inside its window in flight at once.
    @Test func translateFloodsAreWeighedByPages() throws {
        let s = try ListeningService()
        let b = try Bystander(s.path)
        defer { b.finish() }
        let stop = Atomic<Bool>(false)
        let ended = DispatchSemaphore(value: 0)
        let flooders = 16
        let replies = Atomic<Int>(0)
        let paused = Atomic<Bool>(false)
        var held: [CInt] = []
        defer { for fd in held { Sys.close(fd) } }
        try b.keepsServing("512-page TRANSLATE floods", s.service, paused: paused) {
            for k in 0..<flooders {
                let p = try RawPeer(s.path)
                try p.hello()
                try p.send(Attach(deviceID: UInt32(100 + k)).message(id: 2))
                guard let r = try p.receive() else { throw ServiceError.invalidRequest("no ATTACH reply") }
                held += r.fds  // a closed invalidation socket would detach the device
                let window = try r.payload.withUnsafeBytes { try AttachReply(payload: $0) }.windows[0].iova
                attackerThread {
                    while !stop.load(ordering: .relaxed) {
                        if paused.load(ordering: .relaxed) {
                            usleep(1000)
                            continue
                        }
                        for id in 0..<16 { try? p.send(Translate(iova: window, pages: 512).message(id: UInt16(id))) }
                        for _ in 0..<16 where (try? p.receive()) != nil { replies.add(1, ordering: .relaxed) }
                    }
                    ended.signal()
                }
            }
            return {
                stop.store(true, ordering: .relaxed)
                for _ in 0..<flooders { ended.wait() }
            }
        }
        #expect(replies.load(ordering: .relaxed) > 100, "the flooders were served too")
    }
}

/// Where the protocol document and the service disagreed, and how killed devices count.
@Suite(.serialized, .timeLimit(.minutes(15))) struct ProtocolAgreementTests {
    @Test func aRecordWithCookieZeroIsAnsweredInvalid() throws {
        let s = try ListeningService()
        let (_, a) = try s.device(7, stream: true)
        var bytes = PageRequest(
            flags: [.lastPage], deviceID: 7, groupIndex: 3, perm: [.read], addr: a.windows[0].iova,
            cookie: 1
        ).bytes
        bytes[36..<40] = [0, 0, 0, 0]
        try a.channel.sendRaw(bytes)
        #expect(try a.channel.receive(spinNanoseconds: 0, timeoutMs: 5000) == [PageResponse(cookie: 0, code: .invalid)])
    }

    @Test func aPeerThatNegotiated10GetsNo11Behaviour() throws {
        let s = try ListeningService()
        let p = try RawPeer(s.path)
        try p.send(Hello(minor: 0).message(id: 1))
        #expect(try p.receive()?.header.isError == false)
        try p.send(Attach(deviceID: 1, addressSpaceName: "vm1").message(id: 2))
        let r = try p.receive()
        #expect(r?.header.error == WireErrno.protocolError, "\(String(describing: r?.header))")
    }

    /// Defect 12: devices killed while INVALIDATEs are posted to them left, they were not fenced.
    @Test func killedDevicesAreDeparturesNotMisbehaviour() throws {
        let s = try ListeningSession(seconds: 0)
        let children = try (1...6).map {
            try Child("iopf", ["device", "--connect", s.path, "--device-id", "\($0)", "--duration", "30", "--json"])
        }
        #expect(s.waitForAttached(children.count))
        usleep(300_000)  // INVALIDATEs every 2 ms meanwhile
        for c in children { kill(c.process.processIdentifier, SIGKILL) }
        for c in children { _ = c.finish() }
        usleep(300_000)
        let r = try s.result()
        #expect(r.devicesFenced == 0 && r.protocolErrorKinds[.invalidationSocket] == nil, "\(r.protocolErrorKinds)")
    }
}

// Pinned mappings for hosts (DMA_MAP with PIN, protocol 1.2): VFIO type1 on a host's
// memory. The pages are locked in the service and mapped whole before the reply, devices
// never fault, host events leave them be, DMA_UNMAP unlocks them; budgets (the service's,
// the host's RLIMIT_MEMLOCK) refuse with errors; and a pin is done off the loop, so a
// bystander keeps serving while a host pins and a host that leaves mid-pin breaks nothing.

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

@Suite(.serialized, .timeLimit(.minutes(15))) struct HostPinnedTests {
    static let iova: UInt64 = 1 << 40

    @Test func aPinnedMappingIsLockedAndMappedWholeAndOutlivesTheHostsEvents() throws {
        let s = try ListeningService()
        let m = try TestHostMemory(size: 2 << 20)
        let host = try m.declare(s.path, name: "vm-pin")
        #expect(m.lockedKiB() == 0)
        try host.map(iova: Self.iova, hostAddress: m.base, size: m.size, prot: [.read, .write], pinned: true)
        #expect(m.lockedKiB() == 2048, "the service locked the host's 2 MiB")
        let client = try DeviceClient(connectingTo: s.path)
        let a = try client.attach(Attach(deviceID: 2, addressSpaceName: "vm-pin"))
        client.serveInvalidations { _ in true }
        // No fault needed: every page translates, writable, to the host's page.
        let entries = try client.translate(iova: Self.iova, pages: 512).entries
        #expect(entries.allSatisfy { $0 & TranslateReply.write != 0 })
        #expect(a.memory.store(entries[9] & ~0xFFF, 0x9199))
        #expect(m.pointer(9 << 12).load(as: UInt64.self) == 0x9199)
        // The host drops its own page-table entries: pinned pages stay mapped (VFIO type1).
        #expect(madvise(m.pointer(0), Int(m.size), MADV_DONTNEED) == 0)
        try host.sync()
        #expect(try client.translate(iova: Self.iova + 9 << 12, pages: 1).entries == [entries[9]])
        #expect(m.pointer(9 << 12).load(as: UInt64.self) == 0x9199, "the memfd page is the one the device sees")
        #expect(s.waitUntil { $0.hosts.first?.pinnedBytes == 2 << 20 && $0.hosts.first?.faults == 0 })
        // DMA_UNMAP unlocks, and the IOVA is gone.
        #expect(try host.unmap(iova: Self.iova, size: m.size) == m.size)
        #expect(m.lockedKiB() == 0)
        #expect(try fault(a, device: 2, iova: Self.iova, cookie: 1) == .invalid)
        #expect(s.waitUntil { $0.hosts.first?.pinnedBytes == 0 })
        try client.detach()
        try host.detach()
    }

    @Test func pinsPastABudgetAreRefusedAndLeaveNothing() throws {
        let s = try ListeningService { $0.maxHostPinnedBytes = 1 << 20 }
        let m = try TestHostMemory(size: 2 << 20)
        let host = try m.declare(s.path, name: "vm-pin")
        let r = refusal {
            try host.map(iova: Self.iova, hostAddress: m.base, size: m.size, prot: [.read, .write], pinned: true)
        }
        #expect(
            r?.errno == WireErrno.noSpace && r?.text.contains("--max-host-pinned") == true, "\(String(describing: r))")
        #expect(m.lockedKiB() == 0)
        // Within it: taken; the same IOVA again: refused as an overlap, nothing more locked.
        try host.map(iova: Self.iova, hostAddress: m.base, size: 512 << 10, prot: [.read, .write], pinned: true)
        let overlap = refusal {
            try host.map(iova: Self.iova, hostAddress: m.base, size: 4096, prot: [.read], pinned: true)
        }
        #expect(overlap?.errno == WireErrno.exists, "\(String(describing: overlap))")
        #expect(m.lockedKiB() == 512)
        let kinds = s.waitFor { $0.protocolErrorKinds[.badMapping] == 1 }.protocolErrorKinds
        #expect(kinds[.hostPinnedBudget] == 1 && kinds[.badMapping] == 1, "\(kinds)")
        try host.detach()
        #expect(m.lockedKiB() == 0, "a host that goes takes its pins with it")
    }

    /// A host of another uid whose RLIMIT_MEMLOCK is 2 MiB cannot pin 16 MiB, as VFIO
    /// would refuse its VMM; the refusal is its alone.
    @Test(.enabled(if: TenantTests.canRunAsNobody && FileManager.default.isExecutableFile(atPath: "/usr/bin/prlimit")))
    func aHostCannotPinPastItsOwnLockedMemoryLimit() throws {
        let s = try ListeningService(socketMode: 0o666)
        let iopf = try Child.buildDirectory.appendingPathComponent("iopf").path
        let child = try Child(
            "/usr/bin/prlimit",
            [
                "--memlock=2097152:2097152", "/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                iopf, "host", "--connect", s.path, "--name", "small", "--memory", "16M", "--pinned", "--seconds", "1",
            ], absolute: true)
        #expect(child.finish().status == 2)
        let stats = s.waitFor { $0.protocolErrorKinds[.hostPinnedBudget] == 1 }
        #expect(stats.protocolErrorKinds[.hostPinnedBudget] == 1, "\(stats.protocolErrorKinds)")
        #expect(stats.hosts.first { $0.name == "small" }?.pinnedBytes == 0)
    }

    /// Pinning is a worker's job: the bystander keeps its throughput while hosts pin
    /// and unpin, and hosts that hang up while their pin runs (torn down once it is done,
    /// as their socket is not read meanwhile) leave nothing locked.
    @Test func pinningRunsOffTheLoopAndAHostThatLeavesMidPinBreaksNothing() throws {
        let s = try ListeningService()
        let b = try Bystander(s.path)
        defer { b.finish() }
        let m = try TestHostMemory(size: 16 << 20)
        let stop = Atomic<Bool>(false)
        let pins = Atomic<Int>(0)
        let pinned = Atomic<Int>(0)
        let path = s.path
        let finished = DispatchSemaphore(value: 0)
        // Windows alone and under attack alternate (`paused`): under a sanitizer with the
        // other suites in parallel, their load falls on both alike.
        let paused = Atomic<Bool>(false)
        try b.keepsServing("a host pinning 16 MiB", s.service, paused: paused) {
            attackerThread(idle: false) {
                defer { finished.signal() }
                // Both kinds of host at least once, however slowly the pins go (they run at nice 10).
                while !stop.load(ordering: .relaxed) || pins.load(ordering: .relaxed) < 2 {
                    if paused.load(ordering: .relaxed) && !stop.load(ordering: .relaxed) {
                        usleep(1000)
                        continue
                    }
                    if pins.load(ordering: .relaxed) % 2 == 0 {
                        guard let host = try? HostClient(connectingTo: path) else { continue }
                        try? host.declare(
                            name: "pinner", regions: [m.region], userfaultfd: FileDescriptor(rawValue: m.uffd),
                            memfds: [FileDescriptor(rawValue: m.memfd)])
                        if (try? host.map(
                            iova: Self.iova, hostAddress: m.base, size: m.size, prot: [.read, .write], pinned: true))
                            != nil
                        {
                            pinned.add(1, ordering: .relaxed)
                        }
                        _ = try? host.unmap(iova: Self.iova, size: m.size)
                        try? host.detach()
                    } else {
                        // Asks for the pin and leaves while it is on the worker.
                        guard let raw = try? RawPeer(path) else { continue }
                        try? raw.send(Hello(role: .host).message(id: 1))
                        _ = try? raw.receive()
                        try? raw.send(
                            HostDeclaration(name: "pinner", regions: [m.region]).message(id: 2), fds: [m.uffd, m.memfd])
                        _ = try? raw.receive()
                        try? raw.send(
                            DMAMapRequest(
                                iova: Self.iova, hostAddress: m.base, size: m.size,
                                flags: DMAMapRequest.read | DMAMapRequest.write | DMAMapRequest.pin
                            ).message(id: 3))
                    }
                    pins.add(1, ordering: .relaxed)
                    usleep(2000)  // the name is taken until the last host's pin is done
                }
            }
            return { stop.store(true, ordering: .relaxed) }
        }
        #expect(finished.wait(timeout: .now() + 60) == .success)
        #expect(pins.load(ordering: .relaxed) >= 2 && pinned.load(ordering: .relaxed) >= 1)
        // Every pin finished and was let go: nothing stays locked once the hosts are gone.
        let deadline = ContinuousClock.now + .seconds(20)
        while m.lockedKiB() != 0 && ContinuousClock.now < deadline { usleep(20_000) }
        #expect(m.lockedKiB() == 0)
        #expect(try s.service.checkInvariants().wait().isEmpty)
    }
}

// IOPFTestSupport — what several test targets share: a service listening in this process
// (`ListeningService`, `ListeningSession`), a peer speaking raw bytes, host memory handed
// over as a host would, a bystander that must keep serving through an attack, and one
// child-process harness (`Child`, with a deadline) that testpmd and the device tools run in.
//
// Test-only: it reaches the modules' internals through `@testable import`, which only
// debug builds allow, so outside them this file compiles to nothing (`swift build -c
// release` builds every target of the package, this one included).

#if DEBUG
    import Foundation
    import Glibc
    import Synchronization
    import Testing
    @testable import CIOPFShim
    @testable import IOPFCore
    @testable import IOPFDevice
    @testable import IOPFService
    @testable import IOPFSimulation
    @testable import IOPFSystem
    @testable import IOPFWire
    import SystemPackage

    /// A service session on its own thread, listening on a fresh socket.
    package final class ListeningSession: @unchecked Sendable {
        package let path = "/tmp/iopf-xproc-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        private let done = DispatchSemaphore(value: 0)
        private var outcome: Result<ServeResult, Error>?  // written before `done` is signalled
        private let stopRequested = Atomic<Bool>(false)
        /// External devices attached so far, as the session's progress reports them.
        package let attached = Atomic<Int>(0)

        /// Runs for `seconds`, or with 0 until `result()` is asked for.
        package init(
            seconds: Double, invalidateTimeout: Duration = .seconds(1), faultAround: FaultAroundPolicy = .adaptive
        ) throws {
            var o = ServeOptions()
            o.faultAround = faultAround
            o.devices = 0
            o.listenPath = path
            o.seconds = seconds
            o.invalidateInterval = 0.002
            o.invalidateMaxPages = 32
            o.deviceMemoryBytes = 8 << 20
            o.spinNanoseconds = 20_000
            o.invalidateTimeout = invalidateTimeout
            Thread.detachNewThread { [self, o] in
                outcome = Result {
                    try ServeSession.run(o, shouldStop: { self.stopRequested.load(ordering: .relaxed) }) { p in
                        self.attached.store(p.externalDevices, ordering: .relaxed)
                    }
                }
                done.signal()
            }
            // Ready once the socket accepts.
            let deadline = ContinuousClock.now + .seconds(10)
            while ContinuousClock.now < deadline {
                if let fd = try? Sys.connectUnix(path: path) {
                    Sys.close(fd)
                    return
                }
                usleep(5000)
            }
            throw ServiceError.invalidRequest("the service never listened on \(path)")
        }

        /// Waits (up to 20 s, for slow sanitizer runs) until `count` devices have attached.
        package func waitForAttached(_ count: Int) -> Bool {
            let deadline = ContinuousClock.now + .seconds(20)
            while attached.load(ordering: .relaxed) < count && ContinuousClock.now < deadline { usleep(10_000) }
            return attached.load(ordering: .relaxed) >= count
        }

        package func result() throws -> ServeResult {
            stopRequested.store(true, ordering: .relaxed)
            done.wait()
            return try outcome!.get()
        }
    }

    /// A child process: one of the package's executables (built beside the test binary) or,
    /// with `absolute`, any program. Its standard output is captured (or discarded), its
    /// standard input stays open until `closeInput()` (testpmd stops at its end), and it has
    /// a deadline: past it the child is killed and `finish()` reports `timedOut`.
    package final class Child: @unchecked Sendable {
        package let process = Process()
        private let out = Pipe()
        private let input = Pipe()
        private let killed = Atomic<Bool>(false)
        private let exited = DispatchSemaphore(value: 0)

        /// The directory the test binary (and so the package's executables) was built in.
        package static var buildDirectory: URL {
            get throws {
                URL(fileURLWithPath: try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
                    .deletingLastPathComponent()
            }
        }

        package init(
            _ executable: String, _ arguments: [String], absolute: Bool = false, captureOutput: Bool = true,
            deadline: Duration = .seconds(120)
        ) throws {
            let url =
                absolute ? URL(fileURLWithPath: executable) : try Self.buildDirectory.appendingPathComponent(executable)
            guard FileManager.default.isExecutableFile(atPath: url.path) else {
                throw ServiceError.invalidRequest("\(url.path) is missing: build the package's executables first")
            }
            process.executableURL = url
            process.arguments = arguments
            process.standardInput = input
            process.standardOutput = captureOutput ? out : FileHandle.nullDevice
            if !captureOutput { process.standardError = FileHandle.nullDevice }
            process.terminationHandler = { [exited] _ in exited.signal() }
            try process.run()
            let pid = process.processIdentifier
            let seconds = Double(deadline.components.seconds) + Double(deadline.components.attoseconds) * 1e-18
            DispatchQueue.global().asyncAfter(deadline: .now() + seconds) { [weak self] in
                guard let self, self.process.isRunning else { return }
                self.killed.store(true, ordering: .relaxed)
                Glibc.kill(pid, SIGKILL)
            }
        }

        /// True when the deadline passed and the child was killed.
        package var timedOut: Bool { killed.load(ordering: .relaxed) }

        /// Ends its standard input.
        package func closeInput() { try? input.fileHandleForWriting.close() }

        /// Waits up to `timeout` for the exit; false if it is still running.
        package func waitExit(timeout: Duration) -> Bool {
            let seconds = Double(timeout.components.seconds) + Double(timeout.components.attoseconds) * 1e-18
            guard exited.wait(timeout: .now() + seconds) == .success else { return false }
            exited.signal()  // later waits return at once
            return true
        }

        /// Kills it now, as a crash would, and waits for it.
        package func kill() {
            if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
        }

        /// Waits for the exit (the deadline bounds it); the status and the output (one JSON
        /// object) parsed. A child killed at its deadline has status -1.
        package func finish() -> (status: Int32, json: [String: Any]) {
            let data = out.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            let json = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] ?? [:]
            return (timedOut ? -1 : process.terminationStatus, json)
        }
    }

    /// Memfd memory of this process, mapped shared, with a userfaultfd: what a host hands over.
    package final class TestHostMemory: @unchecked Sendable {
        package let memfd: CInt
        package let base: UInt64
        package let size: UInt64
        package var uffd: CInt

        package init(size: UInt64 = 1 << 20, sealed: Bool = true) throws {
            self.size = size
            memfd = iopf_memfd_create_sealable("iopf-test-host")
            #expect(ftruncate(memfd, off_t(size)) == 0)
            if sealed { #expect(iopf_seal_size(memfd) == 0) }
            let p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0)!
            base = UInt64(UInt(bitPattern: p))
            uffd = try HostClient.makeUserfaultfd().rawValue
        }

        deinit {
            munmap(UnsafeMutableRawPointer(bitPattern: UInt(base)), Int(size))
            Sys.close(memfd)
            if uffd >= 0 { Sys.close(uffd) }
        }

        /// KiB of this memory locked in this process: mappings of its memfd flagged `lo`
        /// (VM_LOCKED), as VmLck counts them, but not what tests running beside lock.
        package func lockedKiB() -> Int {
            var st = stat()
            guard fstat(memfd, &st) == 0 else { return -1 }
            let mine = Sys.mappings().filter { $0.inode == UInt64(st.st_ino) && $0.flags.contains("lo") }
            return Int(mine.reduce(0) { $0 + $1.range.upperBound - $1.range.lowerBound } >> 10)
        }

        package var region: HostRegionEntry { HostRegionEntry(hostAddress: base, size: size, fdOffset: 0, fdIndex: 0) }
        package func pointer(_ offset: UInt64) -> UnsafeMutableRawPointer {
            UnsafeMutableRawPointer(bitPattern: UInt(base + offset))!
        }

        /// Connects and declares `name`, mapping nothing.
        package func declare(_ path: String, name: String) throws -> HostClient {
            let client = try HostClient(connectingTo: path)
            try client.declare(
                name: name, regions: [region], userfaultfd: FileDescriptor(rawValue: uffd),
                memfds: [FileDescriptor(rawValue: memfd)])
            return client
        }

        /// Connects, declares `name` and maps the whole memory at `iova`.
        package func attach(_ path: String, name: String, iova: UInt64) throws -> HostClient {
            let client = try declare(path, name: name)
            try client.map(iova: iova, hostAddress: base, size: size, prot: [.read, .write])
            return client
        }
    }

    /// Faults `iova` in over the device's channel; the response code.
    package func fault(_ a: DeviceAttachment, device: UInt32, iova: UInt64, cookie: UInt32) throws -> ResponseCode? {
        try a.channel.send([
            PageRequest(
                flags: [.lastPage], deviceID: device, groupIndex: cookie & 0x1FF, perm: [.read, .write],
                addr: iova, cookie: cookie)
        ])
        return try a.channel.receive(spinNanoseconds: 0, timeoutMs: 5000)?.first?.code
    }

    package func refusal(_ body: () throws -> Void) -> (errno: UInt32, text: String)? {
        do {
            try body()
            return nil
        } catch DeviceClientError.refused(_, let errno, let text) {
            return (errno, text)
        } catch {
            return (0, "\(error)")
        }
    }

    /// A service listening on a fresh socket, giving each device 1 MiB of its own memory.
    package final class ListeningService {
        package let engine: FaultEngine
        package let service: FaultService
        package let provisioner: ServeProvisioner
        package let path: String
        package let domain: DomainID
        /// Clients the tests discard with `_` stay connected until the service stops.
        private let attached = Lock<[(DeviceClient, DeviceAttachment)]>([])

        package init(
            timeout: Duration = .seconds(1), hostEvents: Bool = false, socketMode: mode_t = 0o600,
            configure: (inout ServiceConfiguration) -> Void = { _ in }
        ) throws {
            engine = FaultEngine(memory: ProcessMemory())
            var config = ServiceConfiguration()
            config.spinNanoseconds = 20_000
            config.invalidateTimeout = timeout
            config.hostEvents = hostEvents
            configure(&config)
            service = try FaultService(engine: engine, configuration: config)
            domain = try service.createDomain(local: DomainIOTLBs())
            try service.start()
            provisioner = ServeProvisioner(domains: [domain], bytes: 1 << 20, mode: .fault)
            provisioner.service = service
            path = "/tmp/iopf-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
            try service.listen(path: path, mode: socketMode, provisioner: provisioner)
        }

        deinit { service.stop() }

        /// Waits up to 5 s for the statistics to satisfy `condition`; whether they did.
        package func waitUntil(_ condition: (ServiceStatistics) -> Bool) -> Bool { condition(waitFor(condition)) }

        /// Waits up to 5 s for the statistics to satisfy `condition`; the last statistics seen.
        package func waitFor(_ condition: (ServiceStatistics) -> Bool) -> ServiceStatistics {
            let deadline = ContinuousClock.now + .seconds(5)
            while !condition(service.statistics) && ContinuousClock.now < deadline { usleep(1000) }
            return service.statistics
        }

        /// A connected client that said HELLO and attached as `deviceID`, kept alive until the
        /// service stops unless `keep` is false.
        package func device(_ deviceID: UInt32 = 1, stream: Bool = false, keep: Bool = true) throws -> (
            DeviceClient, DeviceAttachment
        ) {
            let client = try DeviceClient(connectingTo: path)
            let pair = (client, try client.attach(Attach(deviceID: deviceID, credit: 32, wantsStream: stream)))
            if keep { attached.withLock { $0.append(pair) } }
            return pair
        }

        /// The host address behind a device's window.
        package func host(of window: DMAWindow) -> UInt64 { engine.mappingInfo(iova: window.iova)!.vaddr }
    }

    /// A peer that speaks raw bytes.
    package final class RawPeer: @unchecked Sendable {  // used by one thread at a time
        package let fd: CInt
        private var buffer = [UInt8](repeating: 0, count: 1 << 16)

        package init(_ path: String) throws { fd = try Sys.connectUnix(path: path) }
        package init(fd: CInt) { self.fd = fd }
        deinit { Sys.close(fd) }

        package func send(_ bytes: [UInt8], fds: [CInt] = []) throws {
            try Sys.send(fd, bytes, fds: fds, nonBlocking: false)
        }

        /// The next message, nil when the service closed the socket or nothing came in 5 s.
        package func receive() throws -> (header: MessageHeader, payload: [UInt8], fds: [CInt])? {
            guard try Sys.pollReadable(fd, timeoutMs: 5000) else { return nil }
            let got = try buffer.withUnsafeMutableBytes {
                try Sys.receive(fd, into: $0, maxFDs: 16, nonBlocking: false)
            }
            guard got.count > 0 else { return nil }
            let bytes = Array(buffer[..<got.count])
            let header = try bytes.withUnsafeBytes { try MessageHeader(message: $0) }
            return (header, Array(bytes[MessageHeader.byteCount...]), got.fds)
        }

        /// True once the service has closed the connection.
        package func isClosed() throws -> Bool {
            guard try Sys.pollReadable(fd, timeoutMs: 5000) else { return false }
            let got = try buffer.withUnsafeMutableBytes { try Sys.receive(fd, into: $0, maxFDs: 16, nonBlocking: true) }
            return got.count == 0
        }

        package func hello() throws {
            try send(Hello().message(id: 1))
            let r = try receive()
            #expect(r?.header.isReply == true && r?.header.isError == false)
        }
    }

    /// Held by a test that counts this process's descriptors, and by one that holds hundreds
    /// for a while (suites run side by side).
    /// 2 MiB hugetlbfs pages for a test: raises /proc/sys/vm/nr_hugepages so that `pages`
    /// more are free, and puts the setting back when the last holder lets go (tests run
    /// side by side in one process). Nil when the kernel would not give them (not root).
    package final class HugePageReservation: @unchecked Sendable {
        static let knob = "/proc/sys/vm/nr_hugepages"
        static let state = Lock<(holders: Int, original: Int?)>((0, nil))
        let pages: Int

        package init?(pages: Int) {
            self.pages = pages
            let ok = Self.state.withLock { s -> Bool in
                guard let now = Self.read() else { return false }
                if s.holders == 0 { s.original = now }
                guard Self.write(now + pages), Self.read() == now + pages else {
                    _ = Self.write(now)
                    if s.holders == 0 { s.original = nil }
                    return false
                }
                s.holders += 1
                return true
            }
            if !ok { return nil }
        }

        deinit {
            Self.state.withLock { s in
                s.holders -= 1
                if s.holders == 0, let original = s.original {
                    _ = Self.write(original)
                    s.original = nil
                } else if let now = Self.read() {
                    _ = Self.write(max(now - pages, 0))
                }
            }
        }

        static func read() -> Int? {
            (Sys.readText(knob)?.trimmingCharacters(in: .whitespacesAndNewlines)).flatMap { Int($0) }
        }

        static func write(_ n: Int) -> Bool {
            (try? "\(n)".write(toFile: knob, atomically: false, encoding: .utf8)) != nil
        }
    }

    package let descriptorCounting = DispatchSemaphore(value: 1)

    package func openFDs() -> Int {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
    }

    /// Lines in /proc/self/maps: a connection whose ring stayed mapped adds one.
    package func mappingCount() -> Int {
        (Sys.readText("/proc/self/maps") ?? "").utf8.reduce(0) { $0 + ($1 == UInt8(ascii: "\n") ? 1 : 0) }
    }

    package func residentKiB() -> Int {
        let status = (Sys.readText("/proc/self/status")) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
        return Int(line.split(whereSeparator: \.isWhitespace).dropFirst().first ?? "") ?? 0
    }

    /// A host of its own with one device that loops: fault a page, translate it (once, then
    /// from its IOTLB until an INVALIDATE drops it, as a device with ATS does), store through
    /// the translation, and check the host's memory holds the value. Counts its operations and
    /// every answer or byte that is wrong, and keeps the last wrong one.
    package final class Bystander: @unchecked Sendable {
        package static let iova: UInt64 = 1 << 41
        package static let pages = 64
        package let memory: TestHostMemory
        package let host: HostClient
        package let client: DeviceClient
        package let attachment: DeviceAttachment
        package let operations = Atomic<Int>(0)
        package let integrityErrors = Atomic<Int>(0)
        package let lastError = Lock<String?>(nil)
        /// The service's resident memory when the current attack began.
        private var rssBefore: UInt64 = 0
        private let iotlb = Lock<[UInt64: UInt64]>([:])
        private let stopped = Atomic<Bool>(false)
        private let done = DispatchSemaphore(value: 0)

        package init(_ path: String) throws {
            memory = try TestHostMemory(size: UInt64(Self.pages) << 12)
            host = try memory.attach(path, name: "bystander", iova: Self.iova)
            client = try DeviceClient(connectingTo: path)
            attachment = try client.attach(Attach(deviceID: 77, addressSpaceName: "bystander"))
            client.serveInvalidations { [iotlb] inv in
                iotlb.withLock { cache in
                    for r in inv.ranges { cache = cache.filter { !($0.key >= r.start && $0.key <= r.last) } }
                }
                return true
            }
            Thread.detachNewThread { [self] in
                run()
                done.signal()
            }
        }

        private func run() {
            var k: UInt32 = 0
            func wrong(_ why: String) {
                integrityErrors.add(1, ordering: .relaxed)
                lastError.withLock { $0 = why }
            }
            while !stopped.load(ordering: .relaxed) {
                k &+= 1
                let page = UInt64(k % UInt32(Self.pages))
                let iova = Self.iova + page << 12
                let value = UInt64(k) | 0xB1_0000_0000
                do {
                    let code = try request(iova: iova, cookie: k)
                    guard code == .success else {
                        wrong("fault \(k) at \(hex(iova)) answered \(String(describing: code))")
                        continue
                    }
                    var entry = iotlb.withLock { $0[iova] }
                    if entry == nil {
                        entry = try client.translate(iova: iova, pages: 1).entries[0]
                        iotlb.withLock { $0[iova] = entry }
                    }
                    guard let entry, entry & TranslateReply.write != 0 else {
                        iotlb.withLock { $0[iova] = nil }  // unmapped since the fault: fault again
                        continue
                    }
                    guard attachment.memory.store(entry & ~0xFFF, value) else {
                        wrong("store \(k) to \(hex(entry)) outside the device's regions")
                        continue
                    }
                    let seen = memory.pointer(page << 12).load(as: UInt64.self)
                    guard seen == value else {
                        wrong("store \(k) through \(hex(entry)) did not reach page \(page): \(hex(seen))")
                        continue
                    }
                    operations.add(1, ordering: .relaxed)
                } catch {
                    wrong("\(error)")
                    return
                }
            }
        }

        /// One fault round trip: the response with this cookie, or nil after 5 s.
        private func request(iova: UInt64, cookie: UInt32) throws -> ResponseCode? {
            let channel = attachment.channel
            try channel.send([
                PageRequest(
                    flags: [.lastPage], deviceID: 77, groupIndex: cookie & 0x1FF, perm: [.read, .write],
                    addr: iova, cookie: cookie)
            ])
            let deadline = ContinuousClock.now + .seconds(5)
            while ContinuousClock.now < deadline {
                if let r = try channel.receive(spinNanoseconds: 0, timeoutMs: 100)?.first(where: { $0.cookie == cookie }
                ) {
                    return r.code
                }
            }
            return nil
        }

        /// Operations per second over the next `seconds`.
        package func rate(over seconds: Double) -> Double {
            let before = operations.load(ordering: .relaxed)
            let start = ContinuousClock.now
            usleep(UInt32(seconds * 1_000_000))
            let elapsed = ContinuousClock.now - start
            return Double(operations.load(ordering: .relaxed) - before)
                / (Double(elapsed.components.attoseconds) / 1e18
                    + Double(elapsed.components.seconds))
        }

        /// Measures itself alone, then while `attack` runs (it returns how to stop), then alone
        /// again, and checks it kept half its throughput and all its data. Other suites run
        /// beside this one: a window that falls short is measured once more while the attack
        /// still runs, and "alone" is the lower of before and after, so that a moment of someone
        /// else's load is not taken for the attack's doing (an unfair service falls short in
        /// every window; one the attack left broken is slow after it too, and fails the last check).
        package func keepsServing(_ what: String, _ service: FaultService, attack: () throws -> () -> Void) throws {
            try TestPMD.quietly { try measure(what, service, attack: attack) }
        }

        private func measure(_ what: String, _ service: FaultService, attack: () throws -> () -> Void) throws {
            rssBefore = (try? service.footprint().wait().rssBytes) ?? 0
            let before = rate(over: 0.5)
            let stop = try attack()
            // A window short of the mark is measured up to twice more, during the attack and
            // after it (another suite's moment of load passes; a service the attack starves
            // or left broken stays slow).
            var during = rate(over: 1.0)
            for _ in 0..<2 where during < 0.5 * before { during = max(during, rate(over: 1.0)) }
            stop()
            var after = rate(over: 0.5)
            for _ in 0..<2 where after < 0.25 * before { after = max(after, rate(over: 0.5)) }
            check(what, service, alone: min(before, after), during: during)
            #expect(
                after >= 0.25 * before,
                "\(what): the bystander did \(Int(after)) ops/s after the attack, \(Int(before)) before")
        }

        /// For an attack that can pause (its threads read `paused`): windows alone and under
        /// attack alternate, so that load from other suites falls on both alike.
        package func keepsServing(
            _ what: String, _ service: FaultService, paused: borrowing Atomic<Bool>,
            attack: () throws -> () -> Void
        ) throws {
            try TestPMD.quietly {
                rssBefore = (try? service.footprint().wait().rssBytes) ?? 0
                paused.store(true, ordering: .relaxed)
                let stop = try attack()
                func alternate() -> (alone: Double, during: Double) {
                    var (alone, during) = (0.0, 0.0)
                    for _ in 0..<4 {
                        paused.store(true, ordering: .relaxed)
                        usleep(20_000)  // what was in flight drains
                        alone += rate(over: 0.25)
                        paused.store(false, ordering: .relaxed)
                        usleep(20_000)
                        during += rate(over: 0.25)
                    }
                    return (alone, during)
                }
                var (alone, during) = alternate()
                // Short: measured up to twice more, the best ratio kept (an unfair service
                // falls short in every window; a moment of another suite's load, as under a
                // sanitizer with suites in parallel, does not).
                for _ in 0..<2 where during < 0.5 * alone {
                    let again = alternate()
                    if again.during / max(again.alone, 1) > during / max(alone, 1) { (alone, during) = again }
                }
                stop()
                check(what, service, alone: alone, during: during)
            }
        }

        /// The service's resident memory may grow this much over one attack (it shares the
        /// process with the test, so this is loose; the budgets themselves are tested exactly).
        package static let rssAllowance: UInt64 = 256 << 20

        private func check(_ what: String, _ service: FaultService, alone: Double, during: Double) {
            if let rss = try? service.footprint().wait().rssBytes {
                #expect(
                    rss < rssBefore + Self.rssAllowance, "\(what): resident memory grew \((rss - rssBefore) >> 20) MiB")
            }
            #expect(
                during >= 0.5 * alone,
                "\(what): the bystander did \(Int(during)) ops/s under attack, \(Int(alone)) alone")
            #expect(
                integrityErrors.load(ordering: .relaxed) == 0,
                "\(what): the bystander saw wrong answers or data: \(lastError.withLock { $0 } ?? "")")
            #expect(
                service.statistics.stopped == nil && (try? service.footprint().wait()) != nil,
                "\(what): the service stopped serving")
        }

        package func finish() {
            stopped.store(true, ordering: .relaxed)
            done.wait()
        }
    }

    /// Attackers in this process run at idle priority: on two CPUs the test measures what the
    /// service gives the bystander, not what the scheduler takes from it for the attacker.
    package func attackerThread(idle: Bool = true, _ body: @escaping @Sendable () -> Void) {
        Thread.detachNewThread {
            if idle { try? Sys.setIdlePriority() }
            body()
        }
    }

    /// A process of another uid (nobody) running `iopf` with `arguments`, through setpriv. At
    /// normal priority: these attackers do little, and at idle priority a loaded machine (the
    /// suite under a sanitizer) gave them no CPU for seconds.
    package func childAsNobody(_ arguments: [String]) throws -> Child {
        let iopf = try Child.buildDirectory.appendingPathComponent("iopf").path
        return try Child(
            "/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", iopf] + arguments,
            absolute: true)
    }

    /// fcntl(F_ADD_SEALS), which Glibc does not export to Swift.
    package let fAddSeals: CInt = 1033

    /// testpmd with one vhost-user port serving `path`, until `stop()`.
    package final class TestPMD {
        package static let binary = "/usr/bin/dpdk-testpmd"
        package static var installed: Bool { FileManager.default.isExecutableFile(atPath: binary) }

        package let path = "/tmp/iopf-vhost-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        private var child: Child?

        /// Suites that take this turn (testpmd, and the bystander's measurements) have time
        /// limits of 6 minutes: the wait for the turn (up to 300 s) counts against them.
        ///
        /// One testpmd at a time in this process: suites run side by side, and two of them
        /// busy-polling two CPUs starve everything else. Tests that measure throughput take
        /// the same turn (`quietly`), so that a testpmd started by another suite is not taken
        /// for the attack they measure.
        private static let turn = DispatchSemaphore(value: 1)

        package static func quietly<T>(_ body: () throws -> T) rethrows -> T {
            let got = turn.wait(timeout: .now() + 300) == .success
            defer { if got { turn.signal() } }
            return try body()
        }
        private var stopped = false

        package init() throws {
            guard Self.turn.wait(timeout: .now() + 300) == .success else { throw SystemCallError("testpmd", .timedOut) }
            // Its forwarding core busy-polls a CPU and suites run side by side: both lcores on
            // CPU 1 (its control threads, vhost-events among them, stay on CPU 0), at nice 19.
            let arguments =
                ["-n", "19", Self.binary] + [
                    "--lcores", "0@1,1@1", "--no-huge", "-m", "256", "--no-pci",
                    "--file-prefix", "iopf-\(getpid())-\(UInt32.random(in: 0...UInt32.max))",
                    "--vdev", "net_vhost0,iface=\(path),iommu-support=1,client=0",
                    "--", "--no-mlockall", "--total-num-mbufs=4096", "--forward-mode=io", "--port-topology=loop", "-a",
                    "--stats-period", "0",
                ]
            do {
                child = try Child(
                    "/usr/bin/nice", arguments, absolute: true, captureOutput: false, deadline: .seconds(600))
            } catch {
                Self.turn.signal()
                throw error
            }
        }

        private var isRunning: Bool { child?.process.isRunning ?? false }

        /// A connection to the back-end, once it listens (20 s at most).
        package func connect() throws -> CInt {
            let deadline = ContinuousClock.now + .seconds(20)
            while true {
                do { return try Sys.connectUnix(path: path, stream: true) } catch {
                    guard ContinuousClock.now < deadline, isRunning else { throw error }
                    usleep(20_000)
                }
            }
        }

        /// Waits until its socket exists (20 s at most): it listens right after binding it.
        package func waitListening() throws {
            let deadline = ContinuousClock.now + .seconds(20)
            while !FileManager.default.fileExists(atPath: path) {
                guard ContinuousClock.now < deadline, isRunning else {
                    throw SystemCallError("testpmd did not create \(path)", .timedOut)
                }
                usleep(20_000)
            }
            usleep(100_000)
        }

        /// Kills it mid-whatever, as a crash would.
        package func kill() { child?.kill() }

        deinit { stop() }

        /// Ends testpmd: the end of its standard input stops it, SIGKILL if it has not gone in 5 s.
        package func stop() {
            guard !stopped else { return }
            stopped = true
            defer { Self.turn.signal() }
            if let child {
                child.closeInput()
                if !child.waitExit(timeout: .seconds(5)) { child.kill() }
            }
            unlink(path)
        }
    }
#endif

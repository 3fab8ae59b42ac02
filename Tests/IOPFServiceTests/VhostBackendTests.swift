// A vhost-user back-end nobody here wrote: DPDK's testpmd (Debian's dpdk-dev, installed by
// `Tools/setup.sh --dpdk`) with iommu-support=1, asked what it offers in the messages
// IOPFWire's VhostUser encodes and decodes. The first step of the vhost front-end: the
// wire layer against the real thing. Enabled where testpmd is installed.

import Foundation
import Glibc
import Testing
@testable import IOPFSystem
@testable import IOPFWire

/// testpmd with one vhost-user port serving `path`, until `stop()`.
final class TestPMD {
    static let binary = "/usr/bin/dpdk-testpmd"
    static var installed: Bool { FileManager.default.isExecutableFile(atPath: binary) }

    let path = "/tmp/iopf-vhost-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
    private let process = Process()
    private let input = Pipe()  // testpmd exits at the end of its standard input

    /// One testpmd at a time in this process: suites run side by side, and two of them
    /// busy-polling two CPUs starve everything else. Tests that measure throughput take
    /// the same turn (`quietly`), so that a testpmd started by another suite is not taken
    /// for the attack they measure.
    private static let turn = DispatchSemaphore(value: 1)

    static func quietly<T>(_ body: () throws -> T) rethrows -> T {
        let got = turn.wait(timeout: .now() + 300) == .success
        defer { if got { turn.signal() } }
        return try body()
    }
    private var stopped = false

    init() throws {
        guard Self.turn.wait(timeout: .now() + 300) == .success else { throw SystemCallError("testpmd", .timedOut) }
        // Its forwarding core busy-polls a CPU and suites run side by side: both lcores on
        // CPU 1 (its control threads, vhost-events among them, stay on CPU 0), at nice 19.
        process.executableURL = URL(fileURLWithPath: "/usr/bin/nice")
        process.arguments = ["-n", "19", Self.binary] + [
            "--lcores", "0@1,1@1", "--no-huge", "-m", "256", "--no-pci",
            "--file-prefix", "iopf-\(getpid())-\(UInt32.random(in: 0...UInt32.max))",
            "--vdev", "net_vhost0,iface=\(path),iommu-support=1,client=0",
            "--", "--no-mlockall", "--total-num-mbufs=4096", "--forward-mode=io", "--port-topology=loop", "-a",
            "--stats-period", "0",
        ]
        process.standardInput = input
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        do { try process.run() } catch {
            Self.turn.signal()
            throw error
        }
    }

    /// A connection to the back-end, once it listens (20 s at most).
    func connect() throws -> CInt {
        let deadline = ContinuousClock.now + .seconds(20)
        while true {
            do { return try Sys.connectUnix(path: path, stream: true) } catch {
                guard ContinuousClock.now < deadline, process.isRunning else { throw error }
                usleep(20_000)
            }
        }
    }

    /// Waits until its socket exists (20 s at most): it listens right after binding it.
    func waitListening() throws {
        let deadline = ContinuousClock.now + .seconds(20)
        while !FileManager.default.fileExists(atPath: path) {
            guard ContinuousClock.now < deadline, process.isRunning else {
                throw SystemCallError("testpmd did not create \(path)", .timedOut)
            }
            usleep(20_000)
        }
        usleep(100_000)
    }

    /// Kills it mid-whatever, as a crash would.
    func kill() {
        Glibc.kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    deinit { stop() }

    /// Ends testpmd: the end of its standard input stops it, SIGKILL if it has not gone in 5 s.
    func stop() {
        guard !stopped else { return }
        stopped = true
        defer { Self.turn.signal() }
        try? input.fileHandleForWriting.close()
        let deadline = ContinuousClock.now + .seconds(5)
        while process.isRunning && ContinuousClock.now < deadline { usleep(10_000) }
        if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        unlink(path)
    }
}

@Suite(.serialized, .timeLimit(.minutes(1))) struct VhostBackendTests {
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

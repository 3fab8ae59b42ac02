// DeviceCommand.swift — `iopf device`: a simulated SVA device in its own process, served
// by `iopf serve --listen PATH` over the device protocol.

import ArgumentParser
import Foundation
import IOPFSimulation
import IOPFWire

struct Device: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a simulated device in this process against a service's --listen socket.",
        discussion: """
            Exit status: 0 when every DMA read back what was written and the device detached; 1 on \
            integrity errors; 2 when it could not connect or attach (the reason on standard error, e.g. no \
            host has that --address-space); 3 when the service disconnected it (fenced, its host went away, \
            or the service stopped) before it was done, the reason on standard error.
            """
    )

    @Option(help: "The service's socket (iopf serve --listen PATH).")
    var connect: String

    @Option(
        help:
            "Attach to the address space of the host with this name (iopf host --name) instead of the service's memory."
    )
    var addressSpace: String?

    @Option(help: "Device id (unique among the devices of one address space).")
    var deviceID: UInt32 = 1

    @Option(help: "PASID to attach with (none by default).")
    var pasid: UInt32?

    @Option(help: "DMA pattern: \(Workload.allCases.map(\.rawValue).joined(separator: ", ")).")
    var workload = "random"

    @Option(help: "Seconds to run (0: until SIGINT or SIGTERM).")
    var duration = 3.0

    @Option(help: "Fault channel to ask for: shared (rings in shared memory) or stream (records on a socket).")
    var channel = "shared"

    @Option(help: "Page request groups kept in flight, as PRI allows (1-64; ATTACH asks for the credit to cover them).")
    var outstanding = 1

    @Option(help: "Seed for the workload.")
    var seed: UInt64 = 1

    @Option(help: "Microseconds the device busy-polls for a response before sleeping (as serve's --spin-microseconds).")
    var spinMicroseconds = 200.0

    @Flag(help: "Never acknowledge invalidations: a misbehaving device, to show fencing.")
    var ignoreInvalidations = false

    @Flag(help: "Print one JSON object at the end instead of a summary.")
    var json = false

    // Set by `iopf stress --external` for the devices it starts.
    @Flag(help: .hidden) var hostMayChangeMemory = false
    @Option(help: .hidden) var burst = 4
    @Option(help: .hidden) var iotlbEntries = 64

    func validate() throws {
        guard Workload(rawValue: workload) != nil else {
            throw ValidationError(
                "--workload '\(workload)' is not one of \(Workload.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        guard channel == "shared" || channel == "stream" else {
            throw ValidationError("--channel must be shared or stream, got '\(channel)'")
        }
        guard duration >= 0 && duration <= 86_400 else {
            throw ValidationError("--duration must be in [0, 86400] seconds, got \(duration)")
        }
        guard pasid.map({ $0 < 1 << 20 }) ?? true else { throw ValidationError("--pasid must be below 2^20") }
        guard spinMicroseconds >= 0 && spinMicroseconds <= 1_000_000 else {
            throw ValidationError("--spin-microseconds must be in [0, 1000000]")
        }
        if let addressSpace, !AddressSpaceName.isValid(addressSpace) {
            throw ValidationError("--address-space must be 1-64 characters of A-Z a-z 0-9 . _ -, got '\(addressSpace)'")
        }
        guard (1...64).contains(outstanding) else {
            throw ValidationError("--outstanding must be 1...64, got \(outstanding)")
        }
        guard (1...64).contains(burst), (1...4096).contains(iotlbEntries) else {
            throw ValidationError("--burst 1...64, --iotlb-entries 1...4096")
        }
    }

    func run() throws {
        var o = ExternalDeviceOptions(path: connect)
        o.deviceID = deviceID
        o.pasid = pasid
        o.workload = Workload(rawValue: workload)!
        o.seconds = duration
        o.ignoreInvalidations = ignoreInvalidations
        o.stream = channel == "stream"
        o.seed = seed
        o.spinNanoseconds = Int64(spinMicroseconds * 1000)
        o.hostMayChangeMemory = hostMayChangeMemory
        o.burst = burst
        o.outstanding = outstanding
        o.iotlbEntries = iotlbEntries
        o.addressSpace = addressSpace
        Signals.stopOnInterrupt()
        let r: ExternalDeviceResult
        do {
            r = try ExternalDeviceSession.run(o, shouldStop: Signals.stopRequested)
        } catch {
            FileHandle.standardError.write(Data("iopf device: \(error)\n".utf8))
            throw ExitCode(2)
        }
        if json {
            try Output.printJSON(r)
        } else {
            print(
                """
                iopf device \(r.deviceID) (\(r.channel) channel, \(r.windowBytes >> 20) MiB window): \
                \(String(format: "%.2f", r.elapsedSeconds)) s, attached in \
                \(String(format: "%.0f", r.attachMicroseconds)) µs
                """
            )
            print(
                """
                  DMA operations \(r.dmaOps) (\(r.dmaErrors) errors), faults \(r.faults) in \(r.groups) groups, \
                \(r.translations) translations
                """
            )
            print(
                """
                  fault latency p50 \(r.faultLatencyNs.p50 / 1000) µs, p99 \(r.faultLatencyNs.p99 / 1000) µs; \
                invalidations acknowledged \(r.invalidationsAcked)
                """
            )
            print(
                """
                  integrity errors \
                \(r.integrityErrors)\(r.disconnected ? "; the service disconnected this device" : "")
                """
            )
            for p in r.problems { print("  ! \(p)") }
        }
        if r.integrityErrors > 0 { throw ExitCode(1) }
        if r.disconnected {
            FileHandle.standardError.write(
                Data(
                    """
                    iopf device: the service disconnected device \(r.deviceID): \
                    \(r.detachReason ?? r.problems.last ?? "connection closed")\n
                    """
                    .utf8))
            throw ExitCode(3)
        }
    }
}

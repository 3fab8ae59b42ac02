// StressExternal.swift — `iopf stress --external`: the stress devices run as `iopf device`
// processes attached over the device protocol, while the storm runs here as usual.
//
// What an in-process audit checks by reading the devices' IOTLBs cannot be read across a
// process boundary. What is checked instead, end to end: every device's data (as in-process),
// every group answered once (the device counts responses nobody waited for), and that every
// IOTLB sync of a domain reached every device attached to it as an INVALIDATE: a device must
// have been told of at least as many pages as its domain synced while it was attached. A
// sync that never reaches the devices (`skip-sync`) shows up there as
// `invalidationNotDelivered`.
//
// The host goes out of process too: an `iopf host` hands its memory and userfaultfd to the
// same service and changes it every 2 ms, with two `iopf device --address-space` processes
// on it. Its address space has an engine of its own, planted with the same bugs and watched
// by its own tally; its devices check data and page tags (a translation to the wrong page
// of the host's memory), and must have been told of every page its domain synced.

import Foundation
import Glibc
import IOPFCore
import IOPFService
import Synchronization

/// Counts the pages a domain's syncs covered, counted as a device counts the INVALIDATEs
/// it receives (every page a range touches).
final class SyncTally: IOTLBSyncObserver, Sendable {
    private let pages = Atomic<Int>(0)
    func synced(_ ranges: [IOVARange]) {
        pages.add(ranges.reduce(0) { $0 + $1.pagesTouched }, ordering: .relaxed)
    }
    var count: Int { pages.load(ordering: .relaxed) }
    func reset() { pages.store(0, ordering: .relaxed) }
}

/// Gives the device with id `d + 1` the stress layout's window `d` in domain `d % domains`:
/// the mappings are the session's, created before and removed after the devices.
final class StressProvisioner: DeviceProvisioner, Sendable {
    let domains: [DomainID]
    let region: HostRegion
    let slice: UInt64
    let devices: Int

    init(domains: [DomainID], region: HostRegion, slice: UInt64, devices: Int) {
        self.domains = domains
        self.region = region
        self.slice = slice
        self.devices = devices
    }

    func provision(deviceID: UInt32, pasid: UInt32?) throws(ServiceError) -> DeviceProvision {
        guard deviceID >= 1 && deviceID <= devices else {
            throw .invalidRequest("stress devices are 1...\(devices), not \(deviceID)")
        }
        let d = Int(deviceID) - 1
        let window = DMAWindow(iova: StressOptions.iovaBase + UInt64(d) * slice, size: slice, prot: 3)
        return DeviceProvision(domain: domains[d % domains.count], windows: [window], regions: [region], token: d)
    }

    func release(_ provision: DeviceProvision) {}
}

/// The `iopf device` (or `iopf host`) processes of one stress run.
final class ExternalFleet {
    struct Member {
        let process: Process
        let output: Pipe
    }

    let members: [Member]

    /// Starts `count` devices with `command` (the `iopf` executable, then `device`), each
    /// with `extra` arguments.
    convenience init(command: [String], socket: String, count: Int, seed: UInt64, extra: [String] = []) throws {
        try self.init(
            command: command,
            arguments: (0..<count).map { d in
                [
                    "--connect", socket, "--device-id", "\(d + 1)", "--duration", "0", "--seed",
                    "\(seed &+ UInt64(d) &* 104_729)",
                    "--burst", "8", "--iotlb-entries", "32", "--host-may-change-memory", "--json",
                ] + extra
            })
    }

    /// Starts one process per argument list: `command` (the `iopf` executable and its
    /// subcommand), then the list.
    init(command: [String], arguments: [[String]]) throws {
        guard let executable = command.first else { throw ServiceError.invalidRequest("no device command given") }
        members = try arguments.map { args in
            let process = Process()
            let output = Pipe()
            process.executableURL = URL(fileURLWithPath: executable)
            process.arguments = Array(command.dropFirst()) + args
            process.standardOutput = output
            try process.run()
            return Member(process: process, output: output)
        }
    }

    /// Stops every member (SIGTERM: a device finishes its group, detaches and prints its
    /// summary) and returns the summaries; nil for one that died or printed none.
    func stop<R: Decodable>(as: R.Type = ExternalDeviceResult.self) -> [R?] {
        for m in members where m.process.isRunning { Glibc.kill(m.process.processIdentifier, SIGTERM) }
        return members.map { m in
            let data = m.output.fileHandleForReading.readDataToEndOfFile()
            m.process.waitUntilExit()
            return try? JSONDecoder().decode(R.self, from: data)
        }
    }

    /// Kills whatever still runs (after a failure).
    func kill() {
        for m in members where m.process.isRunning { Glibc.kill(m.process.processIdentifier, SIGKILL) }
        for m in members { m.process.waitUntilExit() }
    }
}

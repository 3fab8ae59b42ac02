// FaultChannel.swift — the file descriptors between a device and the service: devices
// write 40-byte page requests, the service writes 8-byte page responses (iommufd layout,
// see IOPFCore/FaultRecord.swift). Both directions are byte streams, so records may be
// split across reads; each side reassembles.
//
// Transports (chosen by measurement, see README "Fault channel"):
// - socket: one AF_UNIX stream socketpair, full duplex; a closed device shows as EOF.
// - pipe: two pipes, one per direction.

import Glibc
import IOPFCore
import Synchronization

public enum ChannelTransport: String, Sendable, CaseIterable {
    case socket, pipe
}

/// The service's ends and the device's ends of one channel.
struct ChannelEnds {
    var serviceRead: CInt
    var serviceWrite: CInt
    var deviceRead: CInt
    var deviceWrite: CInt

    static func make(_ transport: ChannelTransport) throws(SystemCallError) -> ChannelEnds {
        switch transport {
        case .socket:
            let (s, d) = try Sys.socketpair()
            return ChannelEnds(serviceRead: s, serviceWrite: s, deviceRead: d, deviceWrite: d)
        case .pipe:
            let requests = try Sys.pipe()
            let responses = try Sys.pipe()
            return ChannelEnds(serviceRead: requests.read, serviceWrite: responses.write,
                               deviceRead: responses.read, deviceWrite: requests.write)
        }
    }
}

/// The device's end: send request groups, receive responses. One thread at a time.
public final class DeviceChannel: @unchecked Sendable {
    let readFD: CInt
    let writeFD: CInt
    private var sendBuffer: [UInt8] = []
    private var receiveBuffer = [UInt8](repeating: 0, count: 4096)
    private var received = 0
    private let closed = Atomic<Bool>(false)

    init(readFD: CInt, writeFD: CInt) throws(SystemCallError) {
        self.readFD = readFD
        self.writeFD = writeFD
        try Sys.setNonBlocking(readFD, true)
    }

    deinit { close() }

    /// Closes the device's end; the service sees EOF.
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        Sys.close(readFD)
        if writeFD != readFD { Sys.close(writeFD) }
    }

    /// Writes the records in one write (atomic for a pipe up to PIPE_BUF, 102 records).
    public func send(_ records: [PageRequest]) throws {
        sendBuffer.removeAll(keepingCapacity: true)
        for r in records { sendBuffer.append(contentsOf: r.bytes) }
        try sendRaw(sendBuffer)
    }

    /// Writes raw bytes: tests use it to send malformed or split records.
    public func sendRaw(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try Sys.writeAll(writeFD, $0) }
    }

    /// Waits for responses: busy-polls for `spinNanoseconds`, then sleeps in poll(2) up to
    /// `timeoutMs` (-1: forever). Returns the whole responses that arrived (maybe none on
    /// timeout); nil when the service closed the channel.
    public func receive(spinNanoseconds: Int64, timeoutMs: CInt = -1) throws -> [PageResponse]? {
        let spinUntil = ContinuousClock.now + .nanoseconds(spinNanoseconds)
        var slept = false
        while true {
            let n = try receiveBuffer.withUnsafeMutableBytes { (b) throws(SystemCallError) -> Int in
                do throws(SystemCallError) {
                    return try Sys.read(readFD, UnsafeMutableRawBufferPointer(rebasing: b[received...]))
                } catch where error.errno == .wouldBlock {
                    return -1
                }
            }
            if n == 0 { return nil }
            if n > 0 {
                received += n
                let whole = received / PageResponse.byteCount
                guard whole > 0 else { continue }
                var out: [PageResponse] = []
                out.reserveCapacity(whole)
                try receiveBuffer.withUnsafeBytes { b in
                    for i in 0..<whole {
                        let start = i * PageResponse.byteCount
                        out.append(try PageResponse(bytes: UnsafeRawBufferPointer(rebasing: b[start..<(start + PageResponse.byteCount)])))
                    }
                }
                let used = whole * PageResponse.byteCount
                receiveBuffer.replaceSubrange(0..<(received - used), with: receiveBuffer[used..<received])
                received -= used
                return out
            }
            if slept && timeoutMs >= 0 { return [] }
            if ContinuousClock.now < spinUntil {
                sched_yield()  // let the service run on this 2-core machine
            } else {
                slept = true
                _ = try Sys.pollReadable(readFD, timeoutMs: timeoutMs)
            }
        }
    }
}

// FaultChannel.swift — the file descriptors between a device and the service: devices
// write 40-byte page requests, the service writes 8-byte page responses (iommufd layout,
// see IOPFCore/FaultRecord.swift). Both directions are byte streams, so records may be
// split across reads; each side reassembles.
//
// Transports (chosen by measurement, see docs/benchmarks.md, "Fault channel"):
// - shared: a memfd with two rings (see SharedQueue.swift); eventfd doorbells are rung
//   only when the other side sleeps, so a busy channel makes no system calls.
// - socket: one AF_UNIX stream socketpair, full duplex; a closed device shows as EOF.
// - pipe: two pipes, one per direction.

import Glibc
@_spi(SharedRings) import IOPFSystem
import IOPFWire
import Synchronization
import SystemPackage

/// The device's end: send request groups, receive responses. One thread at a time, so
/// its cursors and buffers skip Swift's dynamic exclusivity checks.
public final class DeviceChannel: @unchecked Sendable {
    enum Backing {
        case stream(read: CInt, write: CInt)
        /// The device's own mapping of the queue; `doorbell` wakes the service, `wake` is
        /// rung by the service when this device sleeps. All three fds are owned here.
        case shared(SharedQueue, doorbell: CInt, wake: CInt)
    }

    let backing: Backing
    @exclusivity(unchecked) private var sendBuffer: [UInt8] = []
    @exclusivity(unchecked) private var receiveBuffer = [UInt8](repeating: 0, count: 4096)
    @exclusivity(unchecked) private var received = 0
    @exclusivity(unchecked) private var requestTail: UInt32 = 0
    @exclusivity(unchecked) private var responseHead: UInt32 = 0
    /// The service's request head when last read: read again only when the ring looks
    /// full, as each read moves a line the service writes.
    @exclusivity(unchecked) private var requestHeadSeen: UInt32 = 0
    private let closed = Atomic<Bool>(false)
    /// Whether a wait for responses yields the CPU after its first 4 µs (so the service
    /// runs on an oversubscribed machine). A device that cannot take the service's CPU
    /// (lower priority, see `Sys.setIdlePriority`) spins 50 µs before it yields: most
    /// answers come sooner, and a longer wait means the service is busy.
    public var yields = true
    /// On a shared ring, once `wantsAnswerStamps`: when the service published the
    /// responses the last receive or poll took (`Sys.monotonicNanoseconds`, its "answered
    /// at" stamp), or later; 0 before any, and always 0 on a stream. The latency a
    /// hardware device would see ends here: whatever this thread took to look is the
    /// simulation's, not the service's.
    @exclusivity(unchecked) public private(set) var answeredAt: UInt64 = 0

    /// Asks the service for "answered at" stamps (a clock read per publish, so off unless
    /// asked). Set before the first request; no effect on a stream.
    public var wantsAnswerStamps: Bool = false {
        didSet { if case .shared(let q, _, _) = backing { q.stampsWanted = wantsAnswerStamps } }
    }

    /// Takes ownership of the device's ends of a channel (closed on failure too).
    public init(_ ends: DeviceChannelEnds) throws(SystemCallError) {
        do {
            switch ends {
            case .stream(let r, let w):
                try Sys.setNonBlocking(r.rawValue, true)
                backing = .stream(read: r.rawValue, write: w.rawValue)
            case .shared(let q, let doorbell, let wake):
                backing = .shared(try SharedQueue(fd: q.rawValue), doorbell: doorbell.rawValue, wake: wake.rawValue)
            }
        } catch {
            ends.close()
            throw error
        }
    }

    deinit { close() }

    /// Closes the device's end; the service sees EOF (or the closed flag and a doorbell).
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        switch backing {
        case .stream(let r, let w):
            Sys.close(r)
            if w != r { Sys.close(w) }
        case .shared(let q, let doorbell, let wake):
            q.storeSequential(.deviceClosed, 1)
            ring(doorbell)
            Sys.close(doorbell)
            Sys.close(wake)
            Sys.close(q.fd)
        }
    }

    private func ring(_ eventfd: CInt) {
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { try? Sys.write(eventfd, $0) }
    }

    /// Sends the records of one group (a stream gets them in one write, atomic for a pipe
    /// up to PIPE_BUF, 102 records).
    public func send(_ records: [PageRequest]) throws {
        switch backing {
        case .stream:
            sendBuffer.removeAll(keepingCapacity: true)
            for r in records { sendBuffer.append(contentsOf: r.bytes) }
            try sendRaw(sendBuffer)
        case .shared(let q, let doorbell, _):
            for r in records {
                // Full only while the service is behind (credit keeps a device well under the
                // capacity): wait, but not forever on a service that stopped consuming.
                var deadline: ContinuousClock.Instant?
                while requestTail &- requestHeadSeen >= UInt32(SharedQueue.capacity) {
                    requestHeadSeen = q.load(.requestHead)
                    if requestTail &- requestHeadSeen < UInt32(SharedQueue.capacity) { break }
                    if q.load(.serviceClosed) != 0 { throw SystemCallError("send", .brokenPipe) }
                    let now = ContinuousClock.now
                    if deadline == nil { deadline = now + .seconds(5) }
                    if now > deadline! {
                        throw SystemCallError("send: the request ring stayed full for 5 s", .timedOut)
                    }
                    sched_yield()
                }
                r.encode(into: q.requestSlot(requestTail))
                requestTail &+= 1
            }
            q.storeSequential(.requestTail, requestTail)
            if q.loadSequential(.serviceWaiting) != 0 { ring(doorbell) }
        }
    }

    /// Writes raw bytes on a stream channel: tests use it to send malformed or split records.
    public func sendRaw(_ bytes: [UInt8]) throws {
        guard case .stream(_, let writeFD) = backing else {
            preconditionFailure("raw bytes go over stream channels only")
        }
        try bytes.withUnsafeBytes { try Sys.writeAll(writeFD, $0) }
    }

    /// Waits for responses: busy-polls for `spinNanoseconds`, then sleeps up to `timeoutMs`
    /// (-1: forever). Returns the whole responses that arrived (maybe none on timeout);
    /// nil when the service closed the channel.
    public func receive(spinNanoseconds: Int64, timeoutMs: CInt = -1) throws -> [PageResponse]? {
        var out: [PageResponse] = []
        return try receive(into: &out, spinNanoseconds: spinNanoseconds, timeoutMs: timeoutMs) ? out : nil
    }

    /// `receive` into `responses`, emptied first with its capacity kept: a device that
    /// reuses one array allocates nothing per answer. False when the service closed the
    /// channel.
    public func receive(into responses: inout [PageResponse], spinNanoseconds: Int64, timeoutMs: CInt = -1) throws
        -> Bool
    {
        responses.removeAll(keepingCapacity: true)
        switch backing {
        case .stream(let readFD, _):
            return try receiveStream(readFD, into: &responses, spinNanoseconds: spinNanoseconds, timeoutMs: timeoutMs)
        case .shared(let q, _, let wake):
            return try receiveShared(
                q, wake: wake, into: &responses, spinNanoseconds: spinNanoseconds, timeoutMs: timeoutMs)
        }
    }

    /// Whether answers arrive in a shared ring (`poll` is then a load, not a system call).
    public var isShared: Bool {
        if case .shared = backing { return true }
        return false
    }

    /// The whole responses that arrived, without waiting (no system call on a shared
    /// ring); nil when the service closed the channel.
    public func poll() throws -> [PageResponse]? {
        var out: [PageResponse] = []
        return try poll(into: &out) ? out : nil
    }

    /// `poll` into `responses`, emptied first with its capacity kept. False when the
    /// service closed the channel.
    public func poll(into responses: inout [PageResponse]) throws -> Bool {
        responses.removeAll(keepingCapacity: true)
        switch backing {
        case .stream(let readFD, _):
            return try receiveStream(readFD, into: &responses, spinNanoseconds: 0, timeoutMs: 0, waits: false)
        case .shared(let q, _, _):
            let tail = q.load(.responseTail)
            if tail != responseHead {
                try takeShared(q, upTo: tail, into: &responses)
                return true
            }
            return q.load(.serviceClosed) == 0
        }
    }

    private func takeShared(_ q: SharedQueue, upTo tail: UInt32, into out: inout [PageResponse]) throws {
        answeredAt = q.answeredAt  // after the tail's acquire load: at least that publication's
        out.reserveCapacity(out.count + Int(tail &- responseHead))
        while responseHead != tail {
            out.append(try PageResponse(bytes: UnsafeRawBufferPointer(q.responseSlot(responseHead))))
            responseHead &+= 1
        }
        q.store(.responseHead, responseHead)
    }

    private func receiveShared(
        _ q: SharedQueue, wake: CInt, into out: inout [PageResponse], spinNanoseconds: Int64, timeoutMs: CInt
    ) throws -> Bool {
        let spinStart = ContinuousClock.now
        let spinUntil = spinStart + .nanoseconds(spinNanoseconds)
        var slept = false
        while true {
            // Look at the tail 16 times between clock reads: an answer is taken within a
            // load of its publication, not a clock read later.
            for _ in 0..<16 {
                let tail = q.load(.responseTail)
                if tail != responseHead {
                    try takeShared(q, upTo: tail, into: &out)
                    return true
                }
            }
            if q.load(.serviceClosed) != 0 { return false }
            if slept && timeoutMs >= 0 { return true }
            let now = ContinuousClock.now
            if now < spinUntil {
                // Poll without a system call for the first microseconds (a typical answer),
                // then yield so that the service can run on an oversubscribed machine.
                if now - spinStart > (yields ? .microseconds(4) : .microseconds(50)) { sched_yield() }
                continue
            }
            // Announce the sleep, then look again: a response published before the flag
            // was seen is found here; one published after rings `wake`.
            q.storeSequential(.deviceWaiting, 1)
            if q.loadSequential(.responseTail) == responseHead && q.load(.serviceClosed) == 0 {
                if try Sys.pollReadable(wake, timeoutMs: timeoutMs) {
                    var value: UInt64 = 0
                    _ = withUnsafeMutableBytes(of: &value) { try? Sys.read(wake, $0) }
                }
                slept = true
            }
            q.store(.deviceWaiting, 0)
        }
    }

    private func receiveStream(
        _ readFD: CInt, into out: inout [PageResponse], spinNanoseconds: Int64, timeoutMs: CInt, waits: Bool = true
    ) throws -> Bool {
        let spinUntil = ContinuousClock.now + .nanoseconds(spinNanoseconds)
        var slept = false
        while true {
            let n = try receiveBuffer.withUnsafeMutableBytes { (b) throws(SystemCallError) -> Int in
                do throws(SystemCallError) {
                    return try Sys.read(readFD, UnsafeMutableRawBufferPointer(rebasing: b[received...]))
                } catch  where error.errno == .wouldBlock {
                    return -1
                }
            }
            if n == 0 { return false }
            if n > 0 {
                received += n
                let whole = received / PageResponse.byteCount
                guard whole > 0 else { continue }
                out.reserveCapacity(out.count + whole)
                try receiveBuffer.withUnsafeBytes { b in
                    for i in 0..<whole {
                        let start = i * PageResponse.byteCount
                        out.append(
                            try PageResponse(
                                bytes: UnsafeRawBufferPointer(rebasing: b[start..<(start + PageResponse.byteCount)])))
                    }
                }
                let used = whole * PageResponse.byteCount
                receiveBuffer.replaceSubrange(0..<(received - used), with: receiveBuffer[used..<received])
                received -= used
                return true
            }
            if !waits || (slept && timeoutMs >= 0) { return true }
            if ContinuousClock.now < spinUntil {
                sched_yield()  // let the service run on this 2-core machine
            } else {
                slept = true
                _ = try Sys.pollReadable(readFD, timeoutMs: timeoutMs)
            }
        }
    }
}

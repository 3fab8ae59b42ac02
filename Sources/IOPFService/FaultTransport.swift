// FaultTransport.swift — how page requests reach the loop and responses go back, behind
// one protocol so that the loop does not branch on the kind of channel.
//
// Ownership: a transport owns its descriptors and every buffer an io_uring operation of
// it names. Closing cancels its operations; the transport is dropped (buffers freed,
// descriptors closed) only once `inFlight` is 0, that is after their completions arrived.
//
// Everything the device can write is hostile: ring indices are checked against the ring's
// capacity, records are copied out once before they are decoded, responses are never
// written over ones the device has not consumed, and a device that does not read its
// responses is disconnected instead of growing a queue.

import CIOPFShim
import Glibc
import IOPFCore
@_spi(SharedRings) import IOPFSystem
import IOPFWire
import SystemPackage

/// Why a transport gave up on its device.
enum TransportFault: Error {
    /// The device closed its end (EOF, the closed flag, a failed operation).
    case closed(String)
    /// The device broke the channel's rules; `kind` names it for the statistics.
    case misbehaved(kind: ProtocolErrorKind, String)
}

/// Names the ring operations of one attached device.
struct TokenSource {
    var slot: Int
    var generation: UInt32
    func callAsFunction(_ kind: RingToken.Kind) -> RingToken {
        RingToken(kind: kind, slot: slot, generation: generation)
    }
}

protocol FaultTransport: AnyObject {
    /// Submits the operations that wait for the device.
    func arm(_ ring: Ring, _ token: TokenSource) throws(RingError)
    /// One of this transport's completions; records it received go to `body`.
    func completed(
        _ c: Completion, _ ring: Ring, _ token: TokenSource,
        records body: (UnsafeRawBufferPointer) -> Void) throws(TransportFault)
    /// A completion that arrived after `cancel`: only accounted for.
    func dropped(_ c: Completion)
    /// Records published in shared memory since the last call, at most `limit`.
    func poll(limit: Int, records body: (UnsafeRawBufferPointer) -> Void) throws(TransportFault) -> Int
    /// Sends as many of `responses` as the channel takes now; the rest stay queued.
    func send(_ responses: inout [PageResponse], _ ring: Ring, _ token: TokenSource) throws(TransportFault)
    /// Before the loop sleeps: announce it; true when the device has work ready anyway.
    func announceSleep() -> Bool
    func endSleep()
    /// Operations of this transport still in flight on the ring.
    var inFlight: Int { get }
    /// Whether the loop must poll `poll` (shared memory) each turn.
    var isShared: Bool { get }
    /// Cancels what is in flight.
    func cancel(_ ring: Ring, _ token: TokenSource)
    /// At shutdown: best-effort final responses, never blocking, then the closed mark.
    func finalFlush(_ responses: [PageResponse])
    /// Closes the descriptors; only once `inFlight` is 0.
    func close()
}

/// Most responses a device may leave unread before it is disconnected.
let maxResponseBacklog = 4 * SharedQueue.capacity

// MARK: - Shared rings

/// The shared-memory channel: rings in a sealed memfd, eventfd doorbells rung only for
/// sleepers. Each device has eventfds of its own; the doorbell is read through io_uring,
/// and through a poll instead once a read fails with EAGAIN (the device can set
/// O_NONBLOCK: an eventfd's flags are shared across processes), so the loop never spins.
final class SharedRingTransport: FaultTransport {
    let queue: SharedQueue
    let doorbell: CInt
    let wake: CInt
    private let doorbellBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 8, alignment: 8)
    private let wakeValue = UnsafeMutableRawBufferPointer.allocate(byteCount: 8, alignment: 8)
    @exclusivity(unchecked) private(set) var inFlight = 0
    @exclusivity(unchecked) private var doorbellArmed: RingToken.Kind?
    @exclusivity(unchecked) private var wakeInFlight = false
    /// The service's own copies of the indices it owns.
    @exclusivity(unchecked) private var requestHead: UInt32 = 0
    @exclusivity(unchecked) private var responseTail: UInt32 = 0
    /// The device's response head when last read. The ring has at least the room it
    /// leaves, so the head, a line the device writes, is read again only when that room is
    /// not enough: each read of it costs a cache-line transfer both ways.
    @exclusivity(unchecked) private var responseHeadSeen: UInt32 = 0
    var isShared: Bool { true }

    /// Creates the channel; returns the transport and the device's ends (its own descriptors).
    static func make() throws(SystemCallError) -> (SharedRingTransport, DeviceChannelEnds) {
        let queue = try SharedQueue.create()
        var fds: [CInt] = []
        do {
            // Blocking on purpose: io_uring reads wait on a blocking eventfd.
            fds.append(try Sys.eventfd(flags: CInt(EFD_CLOEXEC)))
            fds.append(try Sys.eventfd(flags: CInt(EFD_CLOEXEC | EFD_NONBLOCK)))
            let ends = DeviceChannelEnds.shared(
                queue: FileDescriptor(rawValue: try Sys.dup(queue.fd)),
                doorbell: FileDescriptor(rawValue: try Sys.dup(fds[0])),
                wake: FileDescriptor(rawValue: try Sys.dup(fds[1])))
            return (SharedRingTransport(queue: queue, doorbell: fds[0], wake: fds[1]), ends)
        } catch {
            for fd in fds { Sys.close(fd) }
            Sys.close(queue.fd)
            throw error
        }
    }

    private init(queue: SharedQueue, doorbell: CInt, wake: CInt) {
        self.queue = queue
        self.doorbell = doorbell
        self.wake = wake
        wakeValue.storeBytes(of: UInt64(1), as: UInt64.self)
    }

    deinit {
        doorbellBuffer.deallocate()
        wakeValue.deallocate()
    }

    func arm(_ ring: Ring, _ token: TokenSource) throws(RingError) {
        try armDoorbell(.doorbellRead, ring, token)
    }

    private func armDoorbell(_ kind: RingToken.Kind, _ ring: Ring, _ token: TokenSource) throws(RingError) {
        if kind == .doorbellRead {
            try ring.prepareRead(fd: doorbell, into: doorbellBuffer, token: token(kind))
        } else {
            try ring.preparePollIn(fd: doorbell, token: token(kind))
        }
        doorbellArmed = kind
        inFlight += 1
    }

    func completed(
        _ c: Completion, _ ring: Ring, _ token: TokenSource,
        records body: (UnsafeRawBufferPointer) -> Void
    ) throws(TransportFault) {
        inFlight -= 1
        switch c.token.kind {
        case .doorbellRead, .doorbellPoll:
            doorbellArmed = nil
            if c.result == -ECANCELED { return }
            if c.result < 0 && c.result != -EAGAIN && c.result != -EINTR {
                throw .closed("doorbell failed: errno \(-c.result)")
            }
            do {
                // A read that met a non-blocking eventfd waits in a poll next, then reads.
                try armDoorbell(
                    c.token.kind == .doorbellRead && c.result == -EAGAIN ? .doorbellPoll : .doorbellRead, ring, token)
            } catch {
                throw .closed("cannot re-arm the doorbell: \(error)")
            }
        case .wake:
            wakeInFlight = false
            // -EAGAIN: the device's counter is full, so it is awake anyway. Any other
            // failure would leave it asleep with answers waiting: it is let go, alone.
            if c.result == -EINTR {
                try wakeDevice(ring, token)
            } else if c.result < 0 && c.result != -EAGAIN && c.result != -ECANCELED {
                throw .closed("cannot wake the device: its wake eventfd write failed with errno \(-c.result)")
            }
        default:
            break
        }
    }

    func dropped(_ c: Completion) {
        inFlight -= 1
        if c.token.kind == .wake { wakeInFlight = false } else { doorbellArmed = nil }
    }

    func poll(limit: Int, records body: (UnsafeRawBufferPointer) -> Void) throws(TransportFault) -> Int {
        let tail = queue.load(.requestTail)
        let available = tail &- requestHead
        guard available != 0 else {
            if queue.load(.deviceClosed) != 0 { throw .closed("closed its channel") }
            return 0
        }
        guard available <= UInt32(SharedQueue.capacity) else {
            throw .misbehaved(
                kind: .ringOverrun,
                "request tail \(tail) is \(available) records ahead of head \(requestHead), more than the ring holds")
        }
        let n = min(Int(available), limit)
        for _ in 0..<n {
            queue.copyRequest(requestHead, body)
            requestHead &+= 1
        }
        queue.store(.requestHead, requestHead)
        return n
    }

    func send(_ responses: inout [PageResponse], _ ring: Ring, _ token: TokenSource) throws(TransportFault) {
        guard !responses.isEmpty else { return }
        var unread = responseTail &- responseHeadSeen
        if responses.count > SharedQueue.capacity - Int(unread) {
            let head = queue.load(.responseHead)
            unread = responseTail &- head
            guard unread <= UInt32(SharedQueue.capacity) else {
                throw .misbehaved(
                    kind: .ringOverrun, "response head is \(unread) behind the tail, more than the ring holds")
            }
            responseHeadSeen = head
        }
        let n = min(responses.count, SharedQueue.capacity - Int(unread))
        for r in responses.prefix(n) {
            r.encode(into: queue.responseSlot(responseTail))
            responseTail &+= 1
        }
        responses.removeFirst(n)
        guard responses.count <= maxResponseBacklog else {
            throw .misbehaved(
                kind: .responseBacklog,
                "\(responses.count) responses waiting: the device does not consume its response ring")
        }
        if n > 0 {
            if queue.stampsWanted { queue.answeredAt = Sys.monotonicNanoseconds() }
            queue.storeSequential(.responseTail, responseTail)
            if queue.loadSequential(.deviceWaiting) != 0 && !wakeInFlight { try wakeDevice(ring, token) }
        }
    }

    private func wakeDevice(_ ring: Ring, _ token: TokenSource) throws(TransportFault) {
        do {
            try ring.prepareWrite(fd: wake, from: UnsafeRawBufferPointer(wakeValue), token: token(.wake))
        } catch {
            throw .closed("cannot ring the device: \(error)")
        }
        wakeInFlight = true
        inFlight += 1
    }

    func announceSleep() -> Bool {
        queue.storeSequential(.serviceWaiting, 1)
        return queue.loadSequential(.requestTail) != requestHead || queue.load(.deviceClosed) != 0
    }

    func endSleep() { queue.store(.serviceWaiting, 0) }

    func cancel(_ ring: Ring, _ token: TokenSource) {
        if let kind = doorbellArmed { try? ring.prepareCancel(token(kind)) }
        if wakeInFlight { try? ring.prepareCancel(token(.wake)) }
    }

    func finalFlush(_ responses: [PageResponse]) {
        let unread = responseTail &- queue.load(.responseHead)
        if unread <= UInt32(SharedQueue.capacity) {
            for r in responses.prefix(SharedQueue.capacity - Int(unread)) {
                r.encode(into: queue.responseSlot(responseTail))
                responseTail &+= 1
            }
            queue.storeSequential(.responseTail, responseTail)
        }
        queue.storeSequential(.serviceClosed, 1)
        // Never block on a descriptor the device shares: make it non-blocking first.
        try? Sys.setNonBlocking(wake, true)
        _ = try? Sys.write(wake, UnsafeRawBufferPointer(wakeValue))
    }

    func close() {
        Sys.close(doorbell)
        Sys.close(wake)
        Sys.close(queue.fd)
    }
}

// MARK: - Streams

/// Records on a byte stream (a socketpair, or a pipe each way); records may be split
/// across reads. The service's ends are its own open files (the device holds the other
/// ends), so their flags are private; they stay blocking for io_uring and are made
/// non-blocking only for the final flush.
final class StreamTransport: FaultTransport {
    static let readCapacity = PageRequest.byteCount * 102  // 4080 bytes
    static let writeCapacity = PageResponse.byteCount * 512

    let readFD: CInt
    let writeFD: CInt
    private let readBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: readCapacity, alignment: 8)
    private let writeBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: writeCapacity, alignment: 8)
    /// Bytes of an incomplete record kept at the start of `readBuffer`.
    private var leftover = 0
    private var readArmed = false
    private var writing = 0
    private var written = 0
    private(set) var inFlight = 0
    var isShared: Bool { false }

    static func make(_ transport: ChannelTransport) throws(SystemCallError) -> (StreamTransport, DeviceChannelEnds) {
        switch transport {
        case .socket:
            let (s, d) = try Sys.socketpair()
            return (
                StreamTransport(read: s, write: s),
                .stream(read: FileDescriptor(rawValue: d), write: FileDescriptor(rawValue: d))
            )
        case .pipe:
            let requests = try Sys.pipe()
            let responses: (read: CInt, write: CInt)
            do { responses = try Sys.pipe() } catch {
                Sys.close(requests.read)
                Sys.close(requests.write)
                throw error
            }
            return (
                StreamTransport(read: requests.read, write: responses.write),
                .stream(read: FileDescriptor(rawValue: responses.read), write: FileDescriptor(rawValue: requests.write))
            )
        case .shared:
            preconditionFailure("a shared channel is not a stream")
        }
    }

    private init(read: CInt, write: CInt) {
        readFD = read
        writeFD = write
    }

    deinit {
        readBuffer.deallocate()
        writeBuffer.deallocate()
    }

    func arm(_ ring: Ring, _ token: TokenSource) throws(RingError) {
        try armRead(ring, token)
    }

    private func armRead(_ ring: Ring, _ token: TokenSource) throws(RingError) {
        let free = UnsafeMutableRawBufferPointer(rebasing: readBuffer[leftover...])
        try ring.prepareRead(fd: readFD, into: free, token: token(.deviceRead))
        readArmed = true
        inFlight += 1
    }

    private func armWrite(_ ring: Ring, _ token: TokenSource) throws(RingError) {
        try ring.prepareWrite(
            fd: writeFD, from: UnsafeRawBufferPointer(rebasing: writeBuffer[written..<writing]),
            token: token(.deviceWrite))
        inFlight += 1
    }

    func completed(
        _ c: Completion, _ ring: Ring, _ token: TokenSource,
        records body: (UnsafeRawBufferPointer) -> Void
    ) throws(TransportFault) {
        inFlight -= 1
        switch c.token.kind {
        case .deviceRead:
            readArmed = false
            if c.result == -ECANCELED { return }
            guard c.result > 0 else {
                throw .closed(c.result == 0 ? "closed its channel" : "read failed: errno \(-c.result)")
            }
            let total = leftover + Int(c.result)
            var offset = 0
            while total - offset >= PageRequest.byteCount {
                body(UnsafeRawBufferPointer(rebasing: readBuffer[offset..<(offset + PageRequest.byteCount)]))
                offset += PageRequest.byteCount
            }
            leftover = total - offset
            if leftover > 0 && offset > 0 {
                readBuffer.baseAddress!.copyMemory(from: readBuffer.baseAddress! + offset, byteCount: leftover)
            }
            do { try armRead(ring, token) } catch { throw .closed("cannot re-arm the read: \(error)") }
        case .deviceWrite:
            if c.result == -ECANCELED { return }
            guard c.result > 0 else { throw .closed("write failed: errno \(-c.result)") }
            written += Int(c.result)
            if written < writing {
                do { try armWrite(ring, token) } catch { throw .closed("cannot re-arm the write: \(error)") }
            } else {
                writing = 0
                written = 0
            }
        default:
            break
        }
    }

    func dropped(_ c: Completion) {
        inFlight -= 1
        if c.token.kind == .deviceRead { readArmed = false } else { writing = 0 }
    }

    func poll(limit: Int, records body: (UnsafeRawBufferPointer) -> Void) throws(TransportFault) -> Int { 0 }

    func send(_ responses: inout [PageResponse], _ ring: Ring, _ token: TokenSource) throws(TransportFault) {
        guard writing == 0, !responses.isEmpty else {
            guard responses.count <= maxResponseBacklog else {
                throw .misbehaved(
                    kind: .responseBacklog, "\(responses.count) responses waiting: the device does not read its channel"
                )
            }
            return
        }
        let n = min(responses.count, Self.writeCapacity / PageResponse.byteCount)
        for i in 0..<n {
            let at = i * PageResponse.byteCount
            responses[i].encode(
                into: UnsafeMutableRawBufferPointer(rebasing: writeBuffer[at..<(at + PageResponse.byteCount)]))
        }
        responses.removeFirst(n)
        writing = n * PageResponse.byteCount
        written = 0
        do { try armWrite(ring, token) } catch { throw .closed("cannot write: \(error)") }
    }

    func announceSleep() -> Bool { false }
    func endSleep() {}

    func cancel(_ ring: Ring, _ token: TokenSource) {
        if readArmed { try? ring.prepareCancel(token(.deviceRead)) }
        if writing > 0 { try? ring.prepareCancel(token(.deviceWrite)) }
    }

    func finalFlush(_ responses: [PageResponse]) {
        var bytes = [UInt8](repeating: 0, count: responses.count * PageResponse.byteCount)
        bytes.withUnsafeMutableBytes { b in
            for (i, r) in responses.enumerated() {
                r.encode(into: UnsafeMutableRawBufferPointer(rebasing: b[(i * 8)..<(i * 8 + 8)]))
            }
        }
        try? Sys.setNonBlocking(writeFD, true)
        if !bytes.isEmpty { _ = bytes.withUnsafeBytes { try? Sys.write(writeFD, $0) } }
        // Shut a socket down so that the device sees EOF at once.
        _ = Glibc.shutdown(readFD, CInt(SHUT_RDWR))
    }

    func close() {
        Sys.close(readFD)
        if writeFD != readFD { Sys.close(writeFD) }
    }
}

// DeviceClient.swift — the device side of the iopf device protocol (IOPFWire.docc/
// Protocol.md): connect, HELLO, ATTACH (regions, DMA windows and the fault channel come
// back as descriptors), TRANSLATE, and INVALIDATE handling with acknowledgements, then
// DETACH.
//
// Two sockets, one direction of requests each, so neither side can wait on the other:
// the control socket carries the device's requests and the service's replies; the
// invalidation socket (received in the ATTACH reply) carries the service's INVALIDATEs and
// the device's acknowledgements. A thread of this client reads the invalidation socket,
// so invalidations are answered while the device waits for anything else.
//
// Ordering across the two sockets: a TRANSLATE reply names the last INVALIDATE sequence
// sent before the service walked its table. `DeviceIOTLB.insert(remote:)` drops a reply
// older than the last INVALIDATE this device processed, under the IOTLB lock.

import Dispatch
import Foundation
import Glibc
import IOPFCore
@_exported import IOPFSystem
import IOPFWire
import SystemPackage
import Synchronization

/// Why a device or host client call failed.
public enum DeviceClientError: Error, Sendable, CustomStringConvertible {
    /// A system call failed (connecting, sending, receiving, mapping).
    case system(SystemCallError)
    /// The service answered with an error reply.
    case refused(Command, errno: UInt32, text: String)
    /// The service sent something this client cannot accept.
    case protocolViolation(String)
    /// The service closed the connection.
    case disconnected

    public var description: String {
        switch self {
        case .system(let e): "\(e)"
        case .refused(let c, let errno, let text): "\(c) refused (errno \(errno)): \(text)"
        case .protocolViolation(let what): "protocol violation by the service: \(what)"
        case .disconnected: "the service closed the connection"
        }
    }
}

/// What ATTACH gave the device.
public struct DeviceAttachment: @unchecked Sendable {
    /// Requests the device may have outstanding (its PRI credit).
    public var credit: Int
    /// The IOVA ranges the device may fault in and DMA to.
    public var windows: [DMAWindow]
    /// The regions the device's translations point into, mapped in this process.
    public var memory: DeviceMemory
    /// The fault channel: page requests out, responses in.
    public var channel: DeviceChannel
    /// How long the device has to acknowledge an INVALIDATE before it is fenced.
    public var invalidateTimeoutMs: UInt32
}

/// A device's connection to the service: HELLO, ATTACH, TRANSLATE, DETACH, and the invalidations it must acknowledge.
public final class DeviceClient: @unchecked Sendable {
    private let connection: ControlConnection
    private var invalidation: CInt = -1
    /// The invalidation socket, for tests that play a misbehaving device.
    package var invalidationFD: CInt { invalidation }
    private var invalidationThread: Thread?
    private let invalidationsDone = DispatchSemaphore(value: 0)
    private let closed = Atomic<Bool>(false)
    private let detachNotice = Lock<String?>(nil)
    /// INVALIDATEs acknowledged so far.
    public let invalidationsAcked = Atomic<Int>(0)
    /// The service's HELLO reply: its version, capabilities and limits; nil before HELLO.
    public var granted: HelloReply? { connection.granted }

    /// Why the service detached this device, when it said so (a DETACH notice: e.g. the
    /// host whose address space it was attached to went away).
    public var detachedBecause: String? { detachNotice.withLock { $0 } }

    /// Why the service detached this device, once the connection has ended: the notice
    /// comes before the close, but the device's channels may see the close first, so this
    /// waits (at most `timeout`) for the invalidation thread to read to the end.
    public func detachedBecause(waitingUpTo timeout: Duration) -> String? {
        if invalidationThread != nil {
            let ms = Int(timeout / .milliseconds(1))
            if invalidationsDone.wait(timeout: .now() + .milliseconds(ms)) == .success {
                invalidationsDone.signal()  // close() waits on it too
            }
        }
        return detachedBecause
    }

    /// Connects to a service listening at `path` and says HELLO.
    public convenience init(connectingTo path: String) throws(DeviceClientError) {
        let fd: CInt
        do { fd = try Sys.connectUnix(path: path) } catch { throw .system(error) }
        try self.init(socket: FileDescriptor(rawValue: fd))
    }

    /// Speaks the protocol over a connected SOCK_SEQPACKET socket, which it now owns.
    public init(socket: FileDescriptor) throws(DeviceClientError) {
        connection = try ControlConnection(socket: socket.rawValue, role: .device)
    }

    deinit {
        close()
    }

    /// Attaches the device and maps what the service gave it.
    public func attach(_ a: Attach) throws(DeviceClientError) -> DeviceAttachment {
        let (bytes, fds) = try connection.request(a.message(id: connection.takeID()), expecting: .attach)
        let reply: AttachReply
        do {
            reply = try AttachReply(message: bytes)
        } catch {
            for fd in fds { Sys.close(fd) }
            throw .protocolViolation("\(error)")
        }
        guard fds.count == reply.fdCount else {
            for fd in fds { Sys.close(fd) }
            throw .protocolViolation(
                "ATTACH reply carried \(fds.count) descriptors, its payload names \(reply.fdCount)")
        }
        invalidation = fds[0]
        let channelFDs = Array(fds[1..<(1 + reply.channel.fdCount)])
        let regionFDs = Array(fds[(1 + reply.channel.fdCount)...])
        do {
            let ends: DeviceChannelEnds =
                reply.channel == .sharedRing
                ? .shared(
                    queue: FileDescriptor(rawValue: channelFDs[0]), doorbell: FileDescriptor(rawValue: channelFDs[1]),
                    wake: FileDescriptor(rawValue: channelFDs[2]))
                : .stream(read: FileDescriptor(rawValue: channelFDs[0]), write: FileDescriptor(rawValue: channelFDs[0]))
            let channel = try DeviceChannel(ends)
            let memory = try DeviceMemory(Array(zip(reply.regions, regionFDs.map(FileDescriptor.init(rawValue:)))))
            return DeviceAttachment(
                credit: Int(reply.credit), windows: reply.windows, memory: memory, channel: channel,
                invalidateTimeoutMs: reply.invalidateTimeoutMs)
        } catch {
            throw .system(error)
        }
    }

    /// Asks for the translations of `pages` pages from `iova`.
    public func translate(iova: UInt64, pages: Int) throws(DeviceClientError) -> TranslateReply {
        let (bytes, _) = try connection.request(
            Translate(iova: iova, pages: UInt32(pages)).message(id: connection.takeID()),
            expecting: .translate)
        let reply: TranslateReply
        do { reply = try TranslateReply(message: bytes) } catch { throw .protocolViolation("\(error)") }
        guard reply.entries.count == pages else {
            throw .protocolViolation("TRANSLATE of \(pages) pages answered with \(reply.entries.count)")
        }
        return reply
    }

    /// Starts the thread that answers INVALIDATEs: `handler` must drop the ranges and drain
    /// the DMA that used them before it returns; it returns false to withhold the
    /// acknowledgement (a misbehaving device, for tests and demos). A DETACH notice ends it
    /// and is kept in `detachedBecause`.
    public func serveInvalidations(_ handler: @escaping @Sendable (Invalidate) -> Bool) {
        precondition(invalidation >= 0 && invalidationThread == nil, "serveInvalidations after attach, once")
        let fd = invalidation
        let thread = Thread { [self] in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: WireLimits.maxMessageBytes, alignment: 8)
            defer {
                buffer.deallocate()
                invalidationsDone.signal()
            }
            while true {
                guard let got = try? Sys.receive(fd, into: buffer, maxFDs: 0, nonBlocking: false), got.count > 0 else {
                    return
                }
                let message = UnsafeRawBufferPointer(rebasing: buffer[..<got.count])
                let payload = UnsafeRawBufferPointer(rebasing: message[min(MessageHeader.byteCount, message.count)...])
                guard let header = try? MessageHeader(message: message), !header.isReply else { return }
                if header.command == .detach {
                    detachNotice.withLock { $0 = Wire.errorText(payload) }
                    return
                }
                guard header.command == .invalidate, let inv = try? Invalidate(payload: payload)
                else { return }  // the service is not speaking the protocol: stop answering
                guard handler(inv) else { continue }
                let ack = InvalidateAck(sequence: inv.sequence).message(id: header.id, flags: .reply)
                // Counted first: the service may act on the acknowledgement before send returns.
                invalidationsAcked.add(1, ordering: .relaxed)
                guard (try? Sys.send(fd, ack, nonBlocking: false)) != nil else { return }
            }
        }
        thread.name = "iopf-invalidations"
        invalidationThread = thread
        thread.start()
    }

    /// Says DETACH and waits for its reply; the service then closes the connection.
    public func detach() throws(DeviceClientError) {
        _ = try connection.request(Empty().message(id: connection.takeID()), expecting: .detach)
    }

    /// Closes both sockets and waits for the invalidation thread. Idempotent.
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        if invalidation >= 0 { _ = Glibc.shutdown(invalidation, CInt(SHUT_RDWR)) }
        if invalidationThread != nil {
            invalidationsDone.wait()
            invalidationThread = nil  // the thread's block holds this client: break the cycle
        }
        if invalidation >= 0 { Sys.close(invalidation) }
        connection.close()
    }
}

// VhostFrontEnd.swift — iopf as a vhost-user front-end, for the handshake: features,
// protocol features, the back-end channel, the memory table and the vrings, as QEMU sends
// them (docs/interop/vhost-user.rst), over a blocking SOCK_STREAM socket with a receive
// deadline. Once the vrings are set up the connection is handed to the service loop
// (`FaultService.attachVhost`), which owns it until `detach`; only the stop (GET_VRING_BASE)
// is sent from here again.
//
// The back-end is another program: every reply is read header first, its size bounded
// before its payload is read, and checked to be the reply owed; a back-end that does not
// answer within `replyTimeout` fails the handshake with what it was asked.

import Foundation
import Glibc
import IOPFSystem
import IOPFWire
import SystemPackage

/// A vhost-user exchange that failed or a reply that was wrong, described for the operator.
public struct VhostError: Error, Sendable, CustomStringConvertible {
    public var description: String
    /// An error with `description`.
    public init(_ description: String) { self.description = description }
}

/// One vring as the driver laid it out: IOVAs of its three parts, its size, its eventfds.
public struct VringSetup: Sendable {
    /// The vring's index (0 receive, 1 transmit for virtio-net).
    public var index: UInt32
    /// Descriptors in the ring.
    public var size: UInt32
    /// IOVA of the descriptor table.
    public var descriptors: UInt64
    /// IOVA of the available ring.
    public var available: UInt64
    /// IOVA of the used ring.
    public var used: UInt64
    /// The eventfd the driver kicks the back-end with.
    public var kick: FileDescriptor
    /// The eventfd the back-end signals used buffers on.
    public var call: FileDescriptor
}

/// The front-end side of one vhost-user connection: negotiates, sets the memory table and vrings, and opens the
/// back-end's request channel.
public final class VhostFrontEnd {
    /// The connected vhost-user socket, owned by the front-end.
    package let fd: CInt
    /// The connected vhost-user socket, owned by the front-end (closed by `close`).
    public var socket: FileDescriptor { FileDescriptor(rawValue: fd) }
    /// How long a reply may take before the exchange fails.
    public static let replyTimeout = Duration.seconds(5)
    /// What the back-end offered and what was agreed.
    public private(set) var offeredFeatures: UInt64 = 0
    /// Protocol features the back-end offered.
    public private(set) var offeredProtocolFeatures: UInt64 = 0
    /// Features agreed with the back-end.
    public private(set) var features: UInt64 = 0
    /// Protocol features agreed with the back-end.
    public private(set) var protocolFeatures: UInt64 = 0

    /// Connects to a back-end listening at `path` (DPDK's `iface=PATH,client=0`).
    public init(connectingTo path: String) throws {
        do {
            fd = try Sys.connectUnix(path: path, stream: true)
        } catch {
            throw VhostError("cannot connect to the vhost-user back-end at \(path): \(error)")
        }
        var tv = timeval(tv_sec: Int(Self.replyTimeout.components.seconds), tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Closes the socket; the back-end sees the front-end go.
    public func close() { Sys.close(fd) }

    // MARK: Messages

    func send(_ request: VhostUser.Request, payload: [UInt8] = [], fds: [CInt] = [], needsReply: Bool = false) throws {
        let bytes = VhostUser.message(request, flags: needsReply ? .needsReply : [], payload: payload)
        do {
            try Sys.send(fd, bytes, fds: fds, nonBlocking: false)
        } catch {
            throw VhostError("cannot send \(request) to the back-end: \(error)")
        }
    }

    /// Reads exactly `count` bytes (the socket's deadline bounds each wait).
    private func read(_ count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = bytes.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, count - got, 0) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                let e = errno
                throw VhostError(
                    n == 0
                        ? "the back-end closed the connection"
                        : e == EAGAIN
                            ? "no reply within \(Self.replyTimeout)"
                            : "receive from the back-end failed: \(String(cString: strerror(e))) (errno \(e))")
            }
            got += n
        }
        return bytes
    }

    /// The u64 reply to `request` (GET_* or a REPLY_ACK). REPLY_ACKs of IOTLB messages the
    /// service sent before it let go of the connection are skipped (at most 256).
    func reply(to request: VhostUser.Request) throws -> UInt64 {
        for _ in 0..<257 {
            let head = try read(VhostUser.headerBytes)
            let header: VhostUser.Header
            do {
                header = try head.withUnsafeBytes { try VhostUser.Header(bytes: $0) }
            } catch {
                throw VhostError("the back-end's reply to \(request) is malformed: \(error)")
            }
            let message = head + (try read(Int(header.size)))
            if header.request == VhostUser.Request.iotlbMessage.rawValue && request != .iotlbMessage { continue }
            do {
                return try message.withUnsafeBytes { try VhostUser.decodeU64Reply(to: request, $0) }
            } catch {
                throw VhostError("the back-end's reply to \(request) is wrong: \(error)")
            }
        }
        throw VhostError("the back-end sent 256 IOTLB replies while \(request) was owed")
    }

    /// A request with NEED_REPLY whose REPLY_ACK must be 0.
    func acknowledged(_ request: VhostUser.Request, payload: [UInt8] = [], fds: [CInt] = []) throws {
        try send(request, payload: payload, fds: fds, needsReply: true)
        let status = try reply(to: request)
        guard status == 0 else { throw VhostError("the back-end refused \(request) (status \(status))") }
    }

    // MARK: Handshake

    /// Negotiates: the back-end must offer every bit of `features` (VERSION_1 and
    /// PROTOCOL_FEATURES always; IOMMU_PLATFORM when translating) and REPLY_ACK, plus
    /// BACKEND_REQ when `features` has IOMMU_PLATFORM (misses arrive on that channel).
    public func negotiate(features wanted: UInt64) throws {
        try send(.setOwner)
        try send(.getFeatures)
        offeredFeatures = try reply(to: .getFeatures)
        let missing = wanted & ~offeredFeatures
        guard missing == 0 else {
            throw VhostError(
                "the back-end does not offer features \(hex(missing)) (offered \(hex(offeredFeatures)))"
                    + (missing & VhostUser.Feature.iommuPlatform != 0 ? ": start it with iommu-support=1" : ""))
        }
        try send(.getProtocolFeatures)
        offeredProtocolFeatures = try reply(to: .getProtocolFeatures)
        var wantedProtocol = VhostUser.ProtocolFeature.replyAck
        if wanted & VhostUser.Feature.iommuPlatform != 0 { wantedProtocol |= VhostUser.ProtocolFeature.backendRequests }
        guard offeredProtocolFeatures & wantedProtocol == wantedProtocol else {
            throw VhostError(
                "the back-end does not offer protocol features \(hex(wantedProtocol & ~offeredProtocolFeatures))")
        }
        try send(.setProtocolFeatures, payload: VhostUser.u64(wantedProtocol))
        protocolFeatures = wantedProtocol
        try acknowledged(.setFeatures, payload: VhostUser.u64(wanted))
        features = wanted
    }

    /// Gives the back-end its channel for IOTLB misses: a SOCK_SEQPACKET pair, one end
    /// sent, the other returned (one message per record, so the service reads whole ones).
    public func openBackendChannel() throws -> FileDescriptor {
        let (mine, theirs) = try Sys.seqpacketPair()
        defer { Sys.close(theirs) }
        do {
            try acknowledged(.setBackendRequestFD, fds: [theirs])
        } catch {
            Sys.close(mine)
            throw error
        }
        return FileDescriptor(rawValue: mine)
    }

    /// SET_MEM_TABLE with one memfd per region, waiting for the REPLY_ACK when agreed.
    public func setMemoryTable(_ table: VhostUser.MemoryTable, fds: [FileDescriptor]) throws {
        try acknowledged(.setMemTable, payload: table.bytes, fds: fds.map(\.rawValue))
    }

    /// An IOTLB UPDATE sent by the front-end itself (the pinned mode's whole-memory entry).
    public func update(iova: UInt64, size: UInt64, userAddress: UInt64) throws {
        let m = VhostUser.IOTLBMessage(
            iova: iova, size: size, userAddress: userAddress,
            permission: VhostUser.IOTLBMessage.read | VhostUser.IOTLBMessage.write,
            kind: .update)
        try acknowledged(.iotlbMessage, payload: m.bytes)
    }

    /// SET_VRING_NUM: the first message about a vring, which makes the back-end create it.
    public func setSize(_ v: VringSetup) throws {
        try acknowledged(.setVringNum, payload: VhostUser.VringState(index: v.index, num: v.size).bytes)
    }

    /// The rest of a vring's set-up, after `setSize`.
    public func setUp(_ v: VringSetup) throws {
        try acknowledged(.setVringBase, payload: VhostUser.VringState(index: v.index, num: 0).bytes)
        try acknowledged(
            .setVringAddr,
            payload: VhostUser.VringAddress(
                index: v.index, descriptors: v.descriptors, used: v.used, available: v.available
            ).bytes)
        // KICK and CALL carry the index in the u64's low byte (bit 8: no fd).
        try acknowledged(.setVringKick, payload: VhostUser.u64(UInt64(v.index)), fds: [v.kick.rawValue])
        try acknowledged(.setVringCall, payload: VhostUser.u64(UInt64(v.index)), fds: [v.call.rawValue])
    }

    /// Enables a ring. Without NEED_REPLY: once the rings are set up the service may be
    /// reading the socket, and the back-end answers this one to nobody.
    public func enable(_ index: UInt32) throws {
        try send(.setVringEnable, payload: VhostUser.VringState(index: index, num: 1).bytes)
    }

    /// Stops a ring and returns where the back-end stopped (its next available index).
    public func stop(_ index: UInt32) throws -> UInt32 {
        try send(.getVringBase, payload: VhostUser.VringState(index: index, num: 0).bytes)
        let state = try reply(to: .getVringBase)
        guard UInt32(truncatingIfNeeded: state) == index else {
            throw VhostError("GET_VRING_BASE for ring \(index) answered ring \(UInt32(truncatingIfNeeded: state))")
        }
        return UInt32(truncatingIfNeeded: state >> 32)
    }
}

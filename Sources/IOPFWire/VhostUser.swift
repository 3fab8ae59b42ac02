// VhostUser.swift — the vhost-user protocol's messages as iopf's front-end speaks them to a
// back-end it did not write (DPDK's vhost library in testpmd): a 12-byte header (request,
// flags, size) and one payload layout per request, after QEMU's docs/interop/vhost-user.rst.
//
// Conventions: the machine's byte order, which is little-endian on every machine iopf runs
// on; a message is a header then exactly `size` payload bytes on a SOCK_STREAM socket, so
// the header is read first and `size` bounds the rest (a back-end that lies about it is
// disconnected). Everything a back-end sends is hostile: replies and back-end requests
// are decoded from the caller's buffer once, every field checked, before anything uses
// them. Ranges: `last` is inclusive.

/// The vhost-user messages iopf exchanges as a front-end and as a back-end's IOMMU: encoded, decoded and checked.
public enum VhostUser {
    /// The version bits every message carries.
    public static let version: UInt32 = 0x1
    /// The header's size.
    public static let headerBytes = 12
    /// The largest payload either side sends here: a memory table of 8 regions.
    public static let maxPayloadBytes = 8 + 32 * MemoryTable.maxRegions

    /// Feature bits (virtio and vhost-user) the front-end negotiates.
    public enum Feature {
        /// VHOST_USER_F_PROTOCOL_FEATURES.
        public static let protocolFeatures: UInt64 = 1 << 30
        /// VIRTIO_F_VERSION_1.
        public static let version1: UInt64 = 1 << 32
        /// VIRTIO_F_IOMMU_PLATFORM: the back-end translates through IOTLB messages.
        public static let iommuPlatform: UInt64 = 1 << 33
    }

    /// Protocol feature bits.
    public enum ProtocolFeature {
        /// VHOST_USER_PROTOCOL_F_REPLY_ACK.
        public static let replyAck: UInt64 = 1 << 3
        /// VHOST_USER_PROTOCOL_F_BACKEND_REQ: the back-end's request channel.
        public static let backendRequests: UInt64 = 1 << 5
    }

    /// Front-end requests (QEMU's VhostUserRequest).
    public enum Request: UInt32, Sendable, CaseIterable {
        /// VHOST_USER_GET_FEATURES.
        case getFeatures = 1
        /// VHOST_USER_SET_FEATURES.
        case setFeatures = 2
        /// VHOST_USER_SET_OWNER.
        case setOwner = 3
        /// VHOST_USER_RESET_OWNER.
        case resetOwner = 4
        /// VHOST_USER_SET_MEM_TABLE.
        case setMemTable = 5
        /// VHOST_USER_SET_VRING_NUM.
        case setVringNum = 8
        /// VHOST_USER_SET_VRING_ADDR.
        case setVringAddr = 9
        /// VHOST_USER_SET_VRING_BASE.
        case setVringBase = 10
        /// VHOST_USER_GET_VRING_BASE.
        case getVringBase = 11
        /// VHOST_USER_SET_VRING_KICK.
        case setVringKick = 12
        /// VHOST_USER_SET_VRING_CALL.
        case setVringCall = 13
        /// VHOST_USER_GET_PROTOCOL_FEATURES.
        case getProtocolFeatures = 15
        /// VHOST_USER_SET_PROTOCOL_FEATURES.
        case setProtocolFeatures = 16
        /// VHOST_USER_SET_VRING_ENABLE.
        case setVringEnable = 18
        /// VHOST_USER_SET_BACKEND_REQ_FD.
        case setBackendRequestFD = 21
        /// VHOST_USER_IOTLB_MSG.
        case iotlbMessage = 22
    }

    /// Back-end requests on the back-end channel (VHOST_USER_BACKEND_*).
    public enum BackendRequest: UInt32, Sendable {
        /// VHOST_USER_BACKEND_IOTLB_MSG.
        case iotlbMessage = 1
    }

    /// The header's flag bits (besides the version).
    public struct Flags: OptionSet, Sendable, Equatable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// The message is a reply.
        public static let reply = Flags(rawValue: 1 << 2)
        /// The sender wants a REPLY_ACK.
        public static let needsReply = Flags(rawValue: 1 << 3)
        /// Version bits and the two flags: anything else is refused.
        static let known: UInt32 = 0x3 | 1 << 2 | 1 << 3
    }

    /// What is wrong with a vhost-user message.
    public enum DecodeError: Error, Sendable, Equatable, CustomStringConvertible {
        /// Fewer bytes than the header or payload needs.
        case short(got: Int, need: Int)
        /// Version bits other than 1.
        case badVersion(UInt32)
        /// Flags this implementation does not know.
        case unknownFlags(UInt32)
        /// A payload larger than any message here.
        case tooLarge(size: UInt32)
        /// A message without the reply flag where a reply belongs.
        case notAReply(request: UInt32)
        /// A reply to another request than the one sent.
        case wrongReply(request: UInt32, expected: UInt32)
        /// A payload of the wrong size for its request.
        case payloadSize(request: UInt32, got: Int, expected: Int)
        /// A request this implementation does not know.
        case unknownRequest(UInt32)
        /// An IOTLB message that is malformed, naming what.
        case badIOTLB(String)

        public var description: String {
            switch self {
            case .short(let got, let need): "vhost-user message of \(got) bytes, \(need) needed"
            case .badVersion(let v): "vhost-user version \(v), expected \(VhostUser.version)"
            case .unknownFlags(let f): "vhost-user flags \(hex(UInt64(f))) has unknown bits"
            case .tooLarge(let size): "vhost-user payload of \(size) bytes, at most \(VhostUser.maxPayloadBytes)"
            case .notAReply(let r): "request \(r) where a reply was expected"
            case .wrongReply(let r, let e): "a reply to request \(r) where one to \(e) was expected"
            case .payloadSize(let r, let got, let expected):
                "request \(r): payload of \(got) bytes, expected \(expected)"
            case .unknownRequest(let r): "back-end request \(r) is not one iopf serves"
            case .badIOTLB(let why): "IOTLB message: \(why)"
            }
        }
    }

    /// The 12-byte header, decoded and checked: version 1, known flags, a bounded size.
    public struct Header: Sendable, Equatable {
        /// The request number.
        public var request: UInt32
        /// The flags.
        public var flags: Flags
        /// The payload's size.
        public var size: UInt32

        /// A header with these fields.
        public init(request: UInt32, flags: Flags, size: UInt32) {
            self.request = request
            self.flags = flags
            self.size = size
        }

        /// Decodes and checks the first 12 bytes of `p`.
        public init(bytes p: UnsafeRawBufferPointer) throws(DecodeError) {
            guard p.count >= VhostUser.headerBytes else { throw .short(got: p.count, need: VhostUser.headerBytes) }
            var r = WireReader(p)
            request = r.u32()
            let raw = r.u32()
            size = r.u32()
            guard raw & 0x3 == VhostUser.version else { throw .badVersion(raw & 0x3) }
            guard raw & ~Flags.known == 0 else { throw .unknownFlags(raw) }
            guard size <= VhostUser.maxPayloadBytes else { throw .tooLarge(size: size) }
            flags = Flags(rawValue: raw & ~0x3)
        }
    }

    /// A whole message: header then payload.
    public static func message(_ request: UInt32, flags: Flags = [], payload: [UInt8] = []) -> [UInt8] {
        var w = WireWriter()
        w.u32(request)
        w.u32(version | flags.rawValue)
        w.u32(UInt32(payload.count))
        return w.bytes + payload
    }

    /// A whole message for `request`.
    public static func message(_ request: Request, flags: Flags = [], payload: [UInt8] = []) -> [UInt8] {
        message(request.rawValue, flags: flags, payload: payload)
    }

    /// A u64 payload.
    public static func u64(_ v: UInt64) -> [UInt8] {
        var w = WireWriter()
        w.u64(v)
        return w.bytes
    }

    /// A reply to `request` carrying one u64 (GET_FEATURES, GET_PROTOCOL_FEATURES, and the
    /// REPLY_ACK of any request sent with NEED_REPLY: 0 is success).
    public static func decodeU64Reply(to request: Request, _ p: UnsafeRawBufferPointer) throws(DecodeError) -> UInt64 {
        let header = try Header(bytes: p)
        guard header.flags.contains(.reply) else { throw .notAReply(request: header.request) }
        guard header.request == request.rawValue else {
            throw .wrongReply(request: header.request, expected: request.rawValue)
        }
        guard header.size == 8, p.count == headerBytes + 8 else {
            throw .payloadSize(request: header.request, got: p.count - headerBytes, expected: 8)
        }
        var r = WireReader(UnsafeRawBufferPointer(rebasing: p[headerBytes...]))
        return r.u64()
    }

    /// SET_VRING_NUM, SET_VRING_BASE, GET_VRING_BASE (reply), SET_VRING_ENABLE.
    public struct VringState: Sendable, Equatable {
        /// The vring's index.
        public var index: UInt32
        /// The size, base or enable value, by request.
        public var num: UInt32
        /// A vring state of `num` for vring `index`.
        public init(index: UInt32, num: UInt32) {
            self.index = index
            self.num = num
        }
        /// The payload's 8 bytes.
        public var bytes: [UInt8] {
            var w = WireWriter()
            w.u32(index)
            w.u32(num)
            return w.bytes
        }
    }

    /// SET_VRING_ADDR: with IOMMU_PLATFORM the three ring addresses are IOVAs.
    public struct VringAddress: Sendable, Equatable {
        /// The vring's index.
        public var index: UInt32
        /// VHOST_VRING_F_LOG, unused here (0).
        public var flags: UInt32
        /// Address of the descriptor table.
        public var descriptors: UInt64
        /// Address of the used ring.
        public var used: UInt64
        /// Address of the available ring.
        public var available: UInt64
        /// Address of the dirty log, unused here (0).
        public var log: UInt64

        /// The addresses of vring `index`.
        public init(index: UInt32, descriptors: UInt64, used: UInt64, available: UInt64) {
            self.index = index
            flags = 0
            self.descriptors = descriptors
            self.used = used
            self.available = available
            log = 0
        }

        /// The payload's 40 bytes.
        public var bytes: [UInt8] {
            var w = WireWriter()
            w.u32(index)
            w.u32(flags)
            w.u64(descriptors)
            w.u64(used)
            w.u64(available)
            w.u64(log)
            return w.bytes
        }
    }

    /// SET_MEM_TABLE: the regions, each backed by the memfd sent with it (in order).
    public struct MemoryTable: Sendable, Equatable {
        /// The most regions one table holds.
        public static let maxRegions = 8

        /// One region of the table.
        public struct Region: Sendable, Equatable {
            /// The guest physical address of the region.
            public var guestAddress: UInt64
            /// The region's size in bytes.
            public var size: UInt64
            /// The front-end's address of the region (the IOVA space with IOMMU_PLATFORM in QEMU).
            public var userAddress: UInt64
            /// Where the region starts in its memfd.
            public var mmapOffset: UInt64
            /// A region with these fields.
            public init(guestAddress: UInt64, size: UInt64, userAddress: UInt64, mmapOffset: UInt64) {
                self.guestAddress = guestAddress
                self.size = size
                self.userAddress = userAddress
                self.mmapOffset = mmapOffset
            }
        }

        /// The regions, at most `maxRegions`.
        public var regions: [Region]
        /// A table of `regions`.
        public init(regions: [Region]) {
            precondition(regions.count <= Self.maxRegions, "at most \(Self.maxRegions) regions")
            self.regions = regions
        }

        /// As QEMU sends it: the count, padding, then only the regions in use.
        public var bytes: [UInt8] {
            var w = WireWriter()
            w.u32(UInt32(regions.count))
            w.u32(0)
            for r in regions {
                w.u64(r.guestAddress)
                w.u64(r.size)
                w.u64(r.userAddress)
                w.u64(r.mmapOffset)
            }
            return w.bytes
        }
    }

    /// `struct vhost_iotlb_msg`: 32 bytes (26 used, padded to 8).
    public struct IOTLBMessage: Sendable, Equatable {
        /// The message's size.
        public static let byteCount = 32

        /// VHOST_IOTLB_*.
        public enum Kind: UInt8, Sendable {
            /// The back-end has no translation for `iova`.
            case miss = 1
            /// A translation for the back-end to insert.
            case update = 2
            /// A range the back-end must drop.
            case invalidate = 3
            /// The back-end could not access a translation it was given.
            case accessFail = 4
        }

        /// Bit 0 read, bit 1 write.
        public static let read: UInt8 = 1
        /// Permission bit: write.
        public static let write: UInt8 = 2

        /// The IOVA.
        public var iova: UInt64
        /// The size in bytes (0 for a miss).
        public var size: UInt64
        /// The front-end address the IOVA maps to (UPDATE).
        public var userAddress: UInt64
        /// Read and write bits.
        public var permission: UInt8
        /// What the message asks.
        public var kind: Kind

        /// An IOTLB message with these fields.
        public init(iova: UInt64, size: UInt64, userAddress: UInt64, permission: UInt8, kind: Kind) {
            self.iova = iova
            self.size = size
            self.userAddress = userAddress
            self.permission = permission
            self.kind = kind
        }

        /// The message's 32 bytes.
        public var bytes: [UInt8] {
            var w = WireWriter()
            w.u64(iova)
            w.u64(size)
            w.u64(userAddress)
            w.bytes += [permission, kind.rawValue, 0, 0, 0, 0, 0, 0]
            return w.bytes
        }

        /// Decodes the payload of a back-end's IOTLB message: only MISS and ACCESS_FAIL come
        /// from a back-end, with a permission of 1, 2 or 3.
        public init(backendPayload p: UnsafeRawBufferPointer) throws(DecodeError) {
            guard p.count == Self.byteCount else {
                throw .payloadSize(
                    request: BackendRequest.iotlbMessage.rawValue, got: p.count,
                    expected: Self.byteCount)
            }
            var r = WireReader(p)
            iova = r.u64()
            size = r.u64()
            userAddress = r.u64()
            permission = p[24]
            guard let kind = Kind(rawValue: p[25]), kind == .miss || kind == .accessFail else {
                throw .badIOTLB("type \(p[25]) is not MISS (1) or ACCESS_FAIL (4)")
            }
            self.kind = kind
            guard (1...3).contains(permission) else { throw .badIOTLB("permission \(permission) is not 1, 2 or 3") }
        }
    }

    /// A request the back-end sent on the back-end channel, checked whole.
    public struct BackendMessage: Sendable, Equatable {
        /// The IOTLB message it carries.
        public var iotlb: IOTLBMessage
        /// The back-end asked for a REPLY_ACK once the miss is served.
        public var needsReply: Bool

        /// Decodes and checks a whole back-end request.
        public init(bytes p: UnsafeRawBufferPointer) throws(DecodeError) {
            let header = try Header(bytes: p)
            guard header.request == BackendRequest.iotlbMessage.rawValue else { throw .unknownRequest(header.request) }
            guard !header.flags.contains(.reply) else { throw .unknownFlags(header.flags.rawValue) }
            guard p.count == headerBytes + Int(header.size) else {
                throw .payloadSize(request: header.request, got: p.count - headerBytes, expected: Int(header.size))
            }
            iotlb = try IOTLBMessage(backendPayload: UnsafeRawBufferPointer(rebasing: p[headerBytes...]))
            needsReply = header.flags.contains(.needsReply)
        }
    }

    /// The front-end's REPLY_ACK to a back-end request: 0 served, else failed.
    public static func backendAck(_ request: BackendRequest, failed: Bool) -> [UInt8] {
        message(request.rawValue, flags: .reply, payload: u64(failed ? 1 : 0))
    }
}

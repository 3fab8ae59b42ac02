// Message.swift — the device protocol's messages: a 16-byte header (after vfio-user) and
// one payload layout per command. The document a client is written from is
// IOPFWire.docc/Protocol.md; this file is its executable form, shared by the service, the
// Swift client and the fuzzers.
//
// Conventions: little-endian; every payload has a fixed part and, for some commands, an
// array whose count is in the fixed part; the header's `size` is the whole message and
// must equal what was received (the socket is SOCK_SEQPACKET: one message per packet).
// Decoders copy nothing from shared memory: they read from the caller's buffer once and
// validate every field before returning. Ranges: `last` is inclusive.

/// Protocol version spoken by this build.
public enum WireVersion {
    /// The major version: a peer with another is refused.
    public static let major: UInt16 = 1
    /// 1.1 adds the host role (HOST, DMA_MAP, DMA_UNMAP, SYNC), ATTACH by address-space
    /// name, and the service's DETACH notice on the invalidation socket. 1.2 adds dirty
    /// tracking for hosts (DIRTY_START, DIRTY_STOP, DIRTY_READ). 1.3 adds DMA_UNMAP's
    /// GET_DIRTY: unmap and read the log in one step.
    public static let minor: UInt16 = 3
}

/// Limits both sides enforce.
public enum WireLimits {
    /// The largest message, header included, either side sends or accepts.
    public static let maxMessageBytes = 16_384
    /// The most file descriptors one message carries.
    public static let maxFDs = 16
    /// Pages one TRANSLATE may ask for.
    public static let maxTranslatePages: UInt32 = 512
    /// Ranges one INVALIDATE carries.
    public static let maxInvalidateRanges = 256
    /// DMA windows and memory regions one ATTACH reply carries.
    public static let maxWindows = 64
    /// The most memory regions one ATTACH reply carries.
    public static let maxRegions = 64
    /// Bytes of text an error reply carries at most.
    public static let maxErrorText = 512
}

/// The protocol's commands.
public enum Command: UInt16, Sendable, CaseIterable, CustomStringConvertible {
    /// HELLO: versions, capabilities, role.
    case hello = 1
    /// ATTACH: a device asks for windows, memory and a fault channel.
    case attach = 2
    /// TRANSLATE: IOVAs to physical addresses (ATS-like).
    case translate = 3
    /// DETACH: a device leaves, or the service tells it it was detached.
    case detach = 4
    /// INVALIDATE: ranges a device must drop and acknowledge.
    case invalidate = 5
    /// HOST: a host hands over its memory and userfaultfd.
    case host = 6
    /// DMA_MAP: a host maps IOVAs onto its memory.
    case dmaMap = 7
    /// DMA_UNMAP: a host removes mappings.
    case dmaUnmap = 8
    /// SYNC: a host waits until its earlier changes reached every device.
    case sync = 9
    /// VHOST: a host hands over a vhost-user back-end's sockets.
    case vhost = 10
    /// DIRTY_START: a host starts dirty tracking on an IOVA range (1.2).
    case dirtyStart = 11
    /// DIRTY_STOP: a host stops dirty tracking on a range it started (1.2).
    case dirtyStop = 12
    /// DIRTY_READ: a host reads and clears the dirty log of a range (1.2).
    case dirtyRead = 13

    public var description: String {
        switch self {
        case .hello: "HELLO"
        case .attach: "ATTACH"
        case .translate: "TRANSLATE"
        case .detach: "DETACH"
        case .invalidate: "INVALIDATE"
        case .host: "HOST"
        case .dmaMap: "DMA_MAP"
        case .dmaUnmap: "DMA_UNMAP"
        case .sync: "SYNC"
        case .vhost: "VHOST"
        case .dirtyStart: "DIRTY_START"
        case .dirtyStop: "DIRTY_STOP"
        case .dirtyRead: "DIRTY_READ"
        }
    }
}

/// What a malformed message did wrong. `kind` is the stable name the service counts it by.
public enum WireError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Fewer bytes than a header or payload needs.
    case truncated(have: Int, need: Int)
    /// More bytes than a message may have.
    case tooLarge(Int)
    /// The header's size is not what was received.
    case sizeMismatch(header: UInt32, received: Int)
    /// Header flags this version does not know.
    case unknownFlags(UInt32)
    /// A message type other than request or reply.
    case badType(UInt32)
    /// A command this version does not know.
    case unknownCommand(UInt16)
    /// A payload of the wrong size for its command.
    case payloadSize(Command, got: Int, expected: Int)
    /// A field outside the values allowed.
    case outOfRange(field: String, value: UInt64, allowed: String)
    /// A reserved field that is not zero.
    case reservedNonZero(field: String)
    /// A field that must be page aligned and is not.
    case unaligned(field: String, value: UInt64)

    /// The stable name the service counts this error by.
    public var kind: ProtocolErrorKind {
        switch self {
        case .truncated, .tooLarge, .sizeMismatch, .unknownFlags, .badType: .badHeader
        case .unknownCommand: .unknownCommand
        case .payloadSize: .badSize
        case .outOfRange, .reservedNonZero, .unaligned: .badField
        }
    }

    /// The errno an error reply carries for it.
    public var errno: UInt32 {
        switch self {
        case .unknownCommand: WireErrno.notSupported
        case .tooLarge: WireErrno.messageSize
        default: WireErrno.invalid
        }
    }

    public var description: String {
        switch self {
        case .truncated(let have, let need): "message: \(have) bytes, need at least \(need)"
        case .tooLarge(let n): "message: \(n) bytes, more than the limit \(WireLimits.maxMessageBytes)"
        case .sizeMismatch(let h, let r): "message: header size \(h) but \(r) bytes received"
        case .unknownFlags(let f): "message: header flags \(hex(UInt64(f))) has unknown bits"
        case .badType(let t): "message: type \(t) is neither request (0) nor reply (1)"
        case .unknownCommand(let c): "message: unknown command \(c)"
        case .payloadSize(let c, let got, let expected): "\(c): payload of \(got) bytes, expected \(expected)"
        case .outOfRange(let f, let v, let allowed): "\(f) = \(v) is out of range (\(allowed))"
        case .reservedNonZero(let f): "\(f) is reserved and must be 0"
        case .unaligned(let f, let v): "\(f) = \(hex(v)) is not 4 KiB aligned"
        }
    }
}

/// The Linux errno values error replies use (the wire carries numbers, not names).
public enum WireErrno {
    /// EPERM.
    public static let notPermitted: UInt32 = 1  // EPERM
    /// ENOENT.
    public static let noEntry: UInt32 = 2  // ENOENT
    /// EBADF.
    public static let badFD: UInt32 = 9  // EBADF
    /// ENOMEM.
    public static let noMemory: UInt32 = 12  // ENOMEM
    /// EFAULT.
    public static let fault: UInt32 = 14  // EFAULT
    /// EBUSY.
    public static let busy: UInt32 = 16  // EBUSY
    /// EEXIST.
    public static let exists: UInt32 = 17  // EEXIST
    /// ENODEV.
    public static let noDevice: UInt32 = 19  // ENODEV
    /// EINVAL.
    public static let invalid: UInt32 = 22  // EINVAL
    /// ENOSPC.
    public static let noSpace: UInt32 = 28  // ENOSPC
    /// ENOTUNIQ.
    public static let notUnique: UInt32 = 76  // ENOTUNIQ
    /// EPROTO.
    public static let protocolError: UInt32 = 71  // EPROTO
    /// EMSGSIZE.
    public static let messageSize: UInt32 = 90  // EMSGSIZE
    /// EOPNOTSUPP.
    public static let notSupported: UInt32 = 95  // EOPNOTSUPP
    /// ETIMEDOUT.
    public static let timedOut: UInt32 = 110  // ETIMEDOUT
}

// MARK: - Header

/// The 16-byte header every protocol message starts with (after vfio-user's).
public struct MessageHeader: Sendable, Equatable {
    /// The header's size.
    public static let byteCount = 16

    /// The header's type and flag bits.
    public struct Flags: OptionSet, Sendable, Equatable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// Bits 0–3 are the type: 0 request, 1 reply.
        public static let reply = Flags(rawValue: 1)
        /// The sender wants no reply.
        public static let noReply = Flags(rawValue: 1 << 4)
        /// The reply reports an error (its `error` field holds the errno).
        public static let error = Flags(rawValue: 1 << 5)
        static let known: UInt32 = 0xF | 1 << 4 | 1 << 5
    }

    /// Chosen by the sender of a request; a reply carries the request's id.
    public var id: UInt16
    /// The command.
    public var command: Command
    /// The whole message, header included.
    public var size: UInt32
    /// Type and flags.
    public var flags: Flags
    /// An errno, in error replies; 0 otherwise.
    public var error: UInt32

    /// A header with these fields.
    public init(id: UInt16, command: Command, size: UInt32, flags: Flags = [], error: UInt32 = 0) {
        self.id = id
        self.command = command
        self.size = size
        self.flags = flags
        self.error = error
    }

    /// Whether the message is a reply.
    public var isReply: Bool { flags.contains(.reply) }
    /// Whether the message is an error reply.
    public var isError: Bool { flags.contains(.error) }

    /// Decodes the header of a whole received message and checks it against its length.
    /// A header that fails here cannot be answered reliably: the peer is misbehaving.
    public init(message bytes: UnsafeRawBufferPointer) throws(WireError) {
        guard bytes.count >= Self.byteCount else { throw .truncated(have: bytes.count, need: Self.byteCount) }
        guard bytes.count <= WireLimits.maxMessageBytes else { throw .tooLarge(bytes.count) }
        var r = WireReader(bytes)
        id = r.u16()
        let rawCommand = r.u16()
        size = r.u32()
        let rawFlags = r.u32()
        error = r.u32()
        guard size == UInt32(bytes.count) else { throw .sizeMismatch(header: size, received: bytes.count) }
        guard rawFlags & ~Flags.known == 0 else { throw .unknownFlags(rawFlags) }
        guard rawFlags & 0xF <= 1 else { throw .badType(rawFlags & 0xF) }
        flags = Flags(rawValue: rawFlags)
        guard let command = Command(rawValue: rawCommand) else { throw .unknownCommand(rawCommand) }
        self.command = command
    }

    func encode(into w: inout WireWriter) {
        w.u16(id)
        w.u16(command.rawValue)
        w.u32(size)
        w.u32(flags.rawValue)
        w.u32(error)
    }
}

/// The id of a message whose header decoded only partly: enough to address an error reply.
public func peekMessageID(_ bytes: UnsafeRawBufferPointer) -> (id: UInt16, command: UInt16)? {
    guard bytes.count >= 4 else { return nil }
    var r = WireReader(bytes)
    return (r.u16(), r.u16())
}

// MARK: - Payloads

/// A payload with a fixed layout for one command.
public protocol WirePayload: Sendable, Equatable {
    /// The command whose payload this is.
    static var command: Command { get }
    /// Decodes and checks a payload (the message without its header).
    init(payload: UnsafeRawBufferPointer) throws(WireError)
    /// Appends the payload's bytes to `w`.
    func encode(into w: inout WireWriter)
}

extension WirePayload {
    /// A whole message: header plus this payload.
    public func message(id: UInt16, flags: MessageHeader.Flags = []) -> [UInt8] {
        var body = WireWriter()
        encode(into: &body)
        return Wire.message(command: Self.command, id: id, flags: flags, payload: body.bytes)
    }

    /// Decodes and checks a whole message's payload (the header is skipped, not checked).
    public init(message bytes: [UInt8]) throws(WireError) {
        try self.init(payload: bytes, from: MessageHeader.byteCount)
    }

    init(payload bytes: [UInt8], from offset: Int) throws(WireError) {
        guard bytes.count >= offset else { throw .truncated(have: bytes.count, need: offset) }
        let result = bytes.withUnsafeBytes { b in
            Result { () throws(WireError) -> Self in try Self(payload: UnsafeRawBufferPointer(rebasing: b[offset...])) }
        }
        self = try result.get()
    }
}

/// Building whole messages and error replies.
public enum Wire {
    /// Header plus payload.
    public static func message(
        command: Command, id: UInt16, flags: MessageHeader.Flags = [], error: UInt32 = 0,
        payload: [UInt8] = []
    ) -> [UInt8] {
        var w = WireWriter()
        let size = UInt32(MessageHeader.byteCount + payload.count)
        MessageHeader(id: id, command: command, size: size, flags: flags, error: error).encode(into: &w)
        w.bytes += payload
        return w.bytes
    }

    /// An error reply to request `id`, with a short explanation (UTF-8, truncated to the limit).
    public static func errorReply(command: Command, id: UInt16, errno: UInt32, text: String) -> [UInt8] {
        message(
            command: command, id: id, flags: [.reply, .error], error: errno,
            payload: Array(text.utf8.prefix(WireLimits.maxErrorText)))
    }

    /// The text of an error reply's payload (lossy UTF-8).
    public static func errorText(_ payload: UnsafeRawBufferPointer) -> String {
        String(decoding: payload.prefix(WireLimits.maxErrorText), as: UTF8.self)
    }

    /// Throws `payloadSize` unless the payload is exactly `n` bytes.
    public static func expectSize(_ c: Command, _ p: UnsafeRawBufferPointer, _ n: Int) throws(WireError) {
        guard p.count == n else { throw .payloadSize(c, got: p.count, expected: n) }
    }
}

/// What a peer announces in HELLO.
public struct Capabilities: OptionSet, Sendable, Equatable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Page requests through the shared ring pair (memfd + eventfds).
    public static let sharedRing = Capabilities(rawValue: 1 << 0)
    /// Page requests as records on a stream socket.
    public static let streamChannel = Capabilities(rawValue: 1 << 1)
    /// TRANSLATE requests (ATS-like).
    public static let translate = Capabilities(rawValue: 1 << 2)
    /// Every capability.
    public static let all: Capabilities = [.sharedRing, .streamChannel, .translate]
}

/// The role a peer takes on the socket: a device (1.0), or a host that hands over its
/// address space (1.1).
public enum PeerRole: UInt32, Sendable {
    /// A device: attaches and faults.
    case device = 0
    /// A host: hands over its address space (protocol 1.1).
    case host = 1
}

/// HELLO request: 12 bytes.
public struct Hello: WirePayload {
    public static let command = Command.hello
    /// The sender's major version.
    public var major: UInt16
    /// The sender's minor version.
    public var minor: UInt16
    /// What the sender can do.
    public var capabilities: Capabilities
    /// The role the sender takes.
    public var role: PeerRole

    /// A HELLO of this build's version with every capability, as `role`.
    public init(
        major: UInt16 = WireVersion.major, minor: UInt16 = WireVersion.minor,
        capabilities: Capabilities = .all, role: PeerRole = .device
    ) {
        self.major = major
        self.minor = minor
        self.capabilities = capabilities
        self.role = role
    }

    public init(payload p: UnsafeRawBufferPointer) throws(WireError) {
        try Wire.expectSize(.hello, p, 12)
        var r = WireReader(p)
        major = r.u16()
        minor = r.u16()
        capabilities = Capabilities(rawValue: r.u32())
        let rawRole = r.u32()
        guard let role = PeerRole(rawValue: rawRole) else {
            throw .outOfRange(field: "HELLO.role", value: UInt64(rawRole), allowed: "0 (device) or 1 (host)")
        }
        self.role = role
    }

    public func encode(into w: inout WireWriter) {
        w.u16(major)
        w.u16(minor)
        w.u32(capabilities.rawValue)
        w.u32(role.rawValue)
    }
}

/// HELLO reply: 16 bytes. The major is the service's; the minor no higher than proposed;
/// the capabilities a subset of those proposed.
public struct HelloReply: WirePayload {
    public static let command = Command.hello
    /// The service's major version.
    public var major: UInt16
    /// The service's minor version.
    public var minor: UInt16
    /// What both sides can do.
    public var capabilities: Capabilities
    /// The largest message the service accepts.
    public var maxMessageBytes: UInt32
    /// The most descriptors one message may carry.
    public var maxFDs: UInt32

    /// A HELLO reply with these limits.
    public init(
        major: UInt16, minor: UInt16, capabilities: Capabilities,
        maxMessageBytes: UInt32 = UInt32(WireLimits.maxMessageBytes), maxFDs: UInt32 = UInt32(WireLimits.maxFDs)
    ) {
        self.major = major
        self.minor = minor
        self.capabilities = capabilities
        self.maxMessageBytes = maxMessageBytes
        self.maxFDs = maxFDs
    }

    public init(payload p: UnsafeRawBufferPointer) throws(WireError) {
        try Wire.expectSize(.hello, p, 16)
        var r = WireReader(p)
        self.init(
            major: r.u16(), minor: r.u16(), capabilities: Capabilities(rawValue: r.u32()),
            maxMessageBytes: r.u32(), maxFDs: r.u32())
    }

    public func encode(into w: inout WireWriter) {
        w.u16(major)
        w.u16(minor)
        w.u32(capabilities.rawValue)
        w.u32(maxMessageBytes)
        w.u32(maxFDs)
    }
}

/// ATTACH request: 16 bytes; with ADDRESS_SPACE (1.1), followed by the name of a host's
/// address space (1...64 bytes, see `AddressSpaceName`).
public struct Attach: WirePayload {
    public static let command = Command.attach
    /// ATTACH flag: `pasid` is valid.
    public static let pasidValid: UInt32 = 1 << 0
    /// Ask for records on a stream socket instead of the shared ring pair.
    public static let streamChannel: UInt32 = 1 << 1
    /// The payload ends with the name of the host address space to attach to.
    public static let addressSpace: UInt32 = 1 << 2

    /// The device's id, unique among live attachments.
    public var deviceID: UInt32
    /// The PASID the device's requests carry, if any.
    public var pasid: UInt32?
    /// Requests the device will have outstanding at most.
    public var credit: UInt32
    /// Whether it asks for a stream channel instead of the shared ring.
    public var wantsStream: Bool
    /// A host's address space (HOST); nil: the service's own memory.
    public var addressSpaceName: String?

    /// An ATTACH as `deviceID` with `credit`, to the service's memory or to `addressSpaceName`.
    public init(
        deviceID: UInt32, pasid: UInt32? = nil, credit: UInt32 = 32, wantsStream: Bool = false,
        addressSpaceName: String? = nil
    ) {
        self.deviceID = deviceID
        self.pasid = pasid
        self.credit = credit
        self.wantsStream = wantsStream
        self.addressSpaceName = addressSpaceName
    }

    public init(payload p: UnsafeRawBufferPointer) throws(WireError) {
        guard p.count >= 16 else { throw .payloadSize(.attach, got: p.count, expected: 16) }
        var r = WireReader(p)
        deviceID = r.u32()
        let flags = r.u32()
        let rawPASID = r.u32()
        credit = r.u32()
        guard flags & ~(Self.pasidValid | Self.streamChannel | Self.addressSpace) == 0 else {
            throw .outOfRange(field: "ATTACH.flags", value: UInt64(flags), allowed: "bits 0-2")
        }
        if flags & Self.addressSpace != 0 {
            addressSpaceName = try AddressSpaceName.decode(
                UnsafeRawBufferPointer(rebasing: p[16...]), field: "ATTACH name")
        } else {
            try Wire.expectSize(.attach, p, 16)
        }
        guard flags & Self.pasidValid != 0 || rawPASID == 0 else {
            throw .reservedNonZero(field: "ATTACH.pasid without PASID_VALID")
        }
        guard rawPASID < 1 << 20 else {
            throw .outOfRange(field: "ATTACH.pasid", value: UInt64(rawPASID), allowed: "0..<2^20")
        }
        guard credit >= 1 && credit <= 256 else {
            throw .outOfRange(field: "ATTACH.credit", value: UInt64(credit), allowed: "1...256")
        }
        pasid = flags & Self.pasidValid != 0 ? rawPASID : nil
        wantsStream = flags & Self.streamChannel != 0
    }

    public func encode(into w: inout WireWriter) {
        w.u32(deviceID)
        w.u32(
            (pasid == nil ? 0 : Self.pasidValid) | (wantsStream ? Self.streamChannel : 0)
                | (addressSpaceName == nil ? 0 : Self.addressSpace))
        w.u32(pasid ?? 0)
        w.u32(credit)
        if let addressSpaceName { w.bytes += Array(addressSpaceName.utf8) }
    }
}

/// A range of IOVA the device may use, with the permission the mapping grants.
public struct DMAWindow: Sendable, Equatable {
    /// The window's first IOVA.
    public var iova: UInt64
    /// The window's size in bytes.
    public var size: UInt64
    /// Bit 0 READ, bit 1 WRITE.
    public var prot: UInt32
    /// A window of `size` bytes at `iova` with `prot`.
    public init(iova: UInt64, size: UInt64, prot: UInt32) {
        self.iova = iova
        self.size = size
        self.prot = prot
    }
}

/// A piece of host memory at `phys` in the service's physical address space, backed by
/// the fd sent at the same position (offset 0 of the fd is `phys`).
public struct MemoryRegionInfo: Sendable, Equatable {
    /// The region's base in the service's physical address space.
    public var phys: UInt64
    /// The region's size in bytes.
    public var size: UInt64
    /// A region of `size` bytes at `phys`.
    public init(phys: UInt64, size: UInt64) {
        self.phys = phys
        self.size = size
    }
}

/// How page requests travel.
public enum ChannelKind: UInt32, Sendable {
    /// fds: ring memfd, doorbell eventfd (device rings the service), wake eventfd (the
    /// service rings the device).
    case sharedRing = 0
    /// fds: one SOCK_STREAM socket; 40-byte records in, 8-byte responses out.
    case stream = 1

    /// Descriptors the channel comes with.
    public var fdCount: Int { self == .sharedRing ? 3 : 1 }
}

/// ATTACH reply: 24 bytes, then windows (24 bytes each), then regions (16 bytes each).
/// File descriptors, in order: the invalidation socket, the channel's (see `ChannelKind`),
/// then one per region.
public struct AttachReply: WirePayload {
    public static let command = Command.attach
    /// Requests the device may have outstanding, as granted.
    public var credit: UInt32
    /// The fault channel granted.
    public var channel: ChannelKind
    /// Deadline for acknowledging an INVALIDATE, in milliseconds.
    public var invalidateTimeoutMs: UInt32
    /// Entries in each shared ring (0 for a stream channel).
    public var ringEntries: UInt32
    /// The IOVA windows the device may reach.
    public var windows: [DMAWindow]
    /// The memory regions, one descriptor each.
    public var regions: [MemoryRegionInfo]

    /// An ATTACH reply with these fields.
    public init(
        credit: UInt32, channel: ChannelKind, invalidateTimeoutMs: UInt32, ringEntries: UInt32,
        windows: [DMAWindow], regions: [MemoryRegionInfo]
    ) {
        self.credit = credit
        self.channel = channel
        self.invalidateTimeoutMs = invalidateTimeoutMs
        self.ringEntries = ringEntries
        self.windows = windows
        self.regions = regions
    }

    /// Descriptors the reply carries.
    public var fdCount: Int { 1 + channel.fdCount + regions.count }

    public init(payload p: UnsafeRawBufferPointer) throws(WireError) {
        guard p.count >= 24 else { throw .payloadSize(.attach, got: p.count, expected: 24) }
        var r = WireReader(p)
        credit = r.u32()
        let rawChannel = r.u32()
        invalidateTimeoutMs = r.u32()
        ringEntries = r.u32()
        let windowCount = Int(r.u16())
        let regionCount = Int(r.u16())
        guard r.u32() == 0 else { throw .reservedNonZero(field: "ATTACH reply reserved") }
        guard let channel = ChannelKind(rawValue: rawChannel) else {
            throw .outOfRange(field: "ATTACH.channel", value: UInt64(rawChannel), allowed: "0 or 1")
        }
        self.channel = channel
        guard windowCount <= WireLimits.maxWindows, regionCount <= WireLimits.maxRegions else {
            throw .outOfRange(
                field: "ATTACH windows/regions", value: UInt64(max(windowCount, regionCount)),
                allowed: "at most \(WireLimits.maxWindows)")
        }
        try Wire.expectSize(.attach, p, 24 + 24 * windowCount + 16 * regionCount)
        windows = []
        regions = []
        for _ in 0..<windowCount {
            let w = DMAWindow(iova: r.u64(), size: r.u64(), prot: r.u32())
            _ = r.u32()
            guard w.iova & 0xFFF == 0, w.size & 0xFFF == 0, w.size > 0 else {
                throw .unaligned(field: "window", value: w.iova | w.size)
            }
            windows.append(w)
        }
        for _ in 0..<regionCount {
            let m = MemoryRegionInfo(phys: r.u64(), size: r.u64())
            guard m.phys & 0xFFF == 0, m.size & 0xFFF == 0, m.size > 0 else {
                throw .unaligned(field: "region", value: m.phys | m.size)
            }
            regions.append(m)
        }
    }

    public func encode(into w: inout WireWriter) {
        w.u32(credit)
        w.u32(channel.rawValue)
        w.u32(invalidateTimeoutMs)
        w.u32(ringEntries)
        w.u16(UInt16(windows.count))
        w.u16(UInt16(regions.count))
        w.u32(0)
        for x in windows {
            w.u64(x.iova)
            w.u64(x.size)
            w.u32(x.prot)
            w.u32(0)
        }
        for m in regions {
            w.u64(m.phys)
            w.u64(m.size)
        }
    }
}

/// TRANSLATE request: 16 bytes, `pages` 4 KiB pages from `iova`.
public struct Translate: WirePayload {
    public static let command = Command.translate
    /// The first IOVA to translate.
    public var iova: UInt64
    /// Pages to translate, 1...512.
    public var pages: UInt32

    /// A TRANSLATE of `pages` pages from `iova`.
    public init(iova: UInt64, pages: UInt32) {
        self.iova = iova
        self.pages = pages
    }

    public init(payload p: UnsafeRawBufferPointer) throws(WireError) {
        try Wire.expectSize(.translate, p, 16)
        var r = WireReader(p)
        iova = r.u64()
        pages = r.u32()
        guard r.u32() == 0 else { throw .reservedNonZero(field: "TRANSLATE reserved") }
        guard iova & 0xFFF == 0 else { throw .unaligned(field: "TRANSLATE.iova", value: iova) }
        guard pages >= 1 && pages <= WireLimits.maxTranslatePages else {
            throw .outOfRange(
                field: "TRANSLATE.pages", value: UInt64(pages), allowed: "1...\(WireLimits.maxTranslatePages)")
        }
        guard iova <= UInt64.max - UInt64(pages) << 12 else {
            throw .outOfRange(field: "TRANSLATE.iova", value: iova, allowed: "iova + pages * 4096 must not overflow")
        }
    }

    public func encode(into w: inout WireWriter) {
        w.u64(iova)
        w.u32(pages)
        w.u32(0)
    }
}

/// TRANSLATE reply: 16 bytes, then one 8-byte entry per page: the page's physical address
/// with bit 0 READ and bit 1 WRITE, or 0 when not present.
public struct TranslateReply: WirePayload {
    public static let command = Command.translate
    /// Entry bit: readable.
    public static let read: UInt64 = 1
    /// Entry bit: writable.
    public static let write: UInt64 = 2
    /// The last INVALIDATE sequence the service had sent this device before it walked the
    /// table. A device that has already processed a later INVALIDATE must drop the reply.
    public var sequence: UInt64
    /// One entry per page: physical address with the R and W bits, 0 when not mapped.
    public var entries: [UInt64]

    /// A reply of `entries` as of invalidation `sequence`.
    public init(sequence: UInt64, entries: [UInt64]) {
        self.sequence = sequence
        self.entries = entries
    }

    public init(payload p: UnsafeRawBufferPointer) throws(WireError) {
        guard p.count >= 16 else { throw .payloadSize(.translate, got: p.count, expected: 16) }
        var r = WireReader(p)
        sequence = r.u64()
        let count = r.u32()
        guard r.u32() == 0 else { throw .reservedNonZero(field: "TRANSLATE reply reserved") }
        guard count >= 1 && count <= WireLimits.maxTranslatePages else {
            throw .outOfRange(
                field: "TRANSLATE reply count", value: UInt64(count), allowed: "1...\(WireLimits.maxTranslatePages)")
        }
        try Wire.expectSize(.translate, p, 16 + 8 * Int(count))
        entries = (0..<Int(count)).map { _ in r.u64() }
        for e in entries where e & 0xFFC != 0 {
            throw .reservedNonZero(field: "TRANSLATE entry bits 2-11")
        }
    }

    public func encode(into w: inout WireWriter) {
        w.u64(sequence)
        w.u32(UInt32(entries.count))
        w.u32(0)
        for e in entries { w.u64(e) }
    }
}

/// An empty payload (DETACH request and reply).
public struct Empty: WirePayload {
    public static let command = Command.detach
    /// DETACH has no payload.
    public init() {}
    public init(payload p: UnsafeRawBufferPointer) throws(WireError) { try Wire.expectSize(.detach, p, 0) }
    public func encode(into w: inout WireWriter) {}
}

/// INVALIDATE request (service → device, on the invalidation socket): 24 bytes, then
/// `(start, last)` pairs, 16 bytes each.
public struct Invalidate: WirePayload {
    public static let command = Command.invalidate
    /// Per device, starting at 1, one higher each time.
    public var sequence: UInt64
    /// The PASID the ranges belong to, if any.
    public var pasid: UInt32?
    /// The ranges to drop, `last` inclusive.
    public var ranges: [(start: UInt64, last: UInt64)]

    /// An INVALIDATE of `ranges`, numbered `sequence`.
    public init(sequence: UInt64, pasid: UInt32?, ranges: [(start: UInt64, last: UInt64)]) {
        self.sequence = sequence
        self.pasid = pasid
        self.ranges = ranges
    }

    public static func == (a: Invalidate, b: Invalidate) -> Bool {
        a.sequence == b.sequence && a.pasid == b.pasid && a.ranges.elementsEqual(b.ranges) { $0 == $1 }
    }

    public init(payload p: UnsafeRawBufferPointer) throws(WireError) {
        guard p.count >= 24 else { throw .payloadSize(.invalidate, got: p.count, expected: 24) }
        var r = WireReader(p)
        sequence = r.u64()
        let rawPASID = r.u32()
        let flags = r.u32()
        let count = Int(r.u32())
        guard r.u32() == 0 else { throw .reservedNonZero(field: "INVALIDATE reserved") }
        guard flags & ~1 == 0 else {
            throw .outOfRange(field: "INVALIDATE.flags", value: UInt64(flags), allowed: "bit 0")
        }
        pasid = flags & 1 != 0 ? rawPASID : nil
        guard count >= 1 && count <= WireLimits.maxInvalidateRanges else {
            throw .outOfRange(
                field: "INVALIDATE.count", value: UInt64(count), allowed: "1...\(WireLimits.maxInvalidateRanges)")
        }
        try Wire.expectSize(.invalidate, p, 24 + 16 * count)
        ranges = []
        for _ in 0..<count {
            let (start, last) = (r.u64(), r.u64())
            guard start <= last else {
                throw .outOfRange(field: "INVALIDATE range", value: start, allowed: "start <= last")
            }
            ranges.append((start, last))
        }
    }

    public func encode(into w: inout WireWriter) {
        w.u64(sequence)
        w.u32(pasid ?? 0)
        w.u32(pasid == nil ? 0 : 1)
        w.u32(UInt32(ranges.count))
        w.u32(0)
        for r in ranges {
            w.u64(r.start)
            w.u64(r.last)
        }
    }
}

/// INVALIDATE reply (the acknowledgement): 8 bytes, the sequence acknowledged.
public struct InvalidateAck: WirePayload {
    public static let command = Command.invalidate
    /// The sequence of the INVALIDATE acknowledged.
    public var sequence: UInt64
    /// An acknowledgement of `sequence`.
    public init(sequence: UInt64) { self.sequence = sequence }
    public init(payload p: UnsafeRawBufferPointer) throws(WireError) {
        try Wire.expectSize(.invalidate, p, 8)
        var r = WireReader(p)
        sequence = r.u64()
    }
    public func encode(into w: inout WireWriter) { w.u64(sequence) }
}

// MARK: - Bytes

/// Reads little-endian fields from a buffer whose length the caller has checked.
public struct WireReader {
    let bytes: UnsafeRawBufferPointer
    var offset = 0
    /// A reader at the start of `bytes`.
    public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    /// Reads a little-endian 16-bit value.
    public mutating func u16() -> UInt16 { read(UInt16.self) }
    /// Reads a little-endian 32-bit value.
    public mutating func u32() -> UInt32 { read(UInt32.self) }
    /// Reads a little-endian 64-bit value.
    public mutating func u64() -> UInt64 { read(UInt64.self) }

    private mutating func read<T: FixedWidthInteger>(_: T.Type) -> T {
        let n = MemoryLayout<T>.size
        precondition(offset + n <= bytes.count, "WireReader: read past the checked length")
        defer { offset += n }
        return T(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}

/// Appends little-endian fields.
public struct WireWriter {
    /// The bytes written so far.
    public var bytes: [UInt8] = []
    /// An empty writer.
    public init() {}
    /// Appends a little-endian 16-bit value.
    public mutating func u16(_ v: UInt16) { append(v) }
    /// Appends a little-endian 32-bit value.
    public mutating func u32(_ v: UInt32) { append(v) }
    /// Appends a little-endian 64-bit value.
    public mutating func u64(_ v: UInt64) { append(v) }
    private mutating func append<T: FixedWidthInteger>(_ v: T) {
        withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
    }
}

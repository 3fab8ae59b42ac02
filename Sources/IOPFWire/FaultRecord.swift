// FaultRecord.swift — the iommufd fault-queue wire format (Linux 6.11+,
// include/uapi/linux/iommufd.h), so that the event loop could read a real iommufd fault
// fd unchanged. Little-endian, no padding.
//
// struct iommu_hwpt_pgfault (40 bytes):
//   0 flags u32 | 4 dev_id u32 | 8 pasid u32 | 12 grpid u32 | 16 perm u32 |
//   20 __reserved u32 | 24 addr u64 | 32 length u32 | 36 cookie u32
// struct iommu_hwpt_page_response (8 bytes): 0 cookie u32 | 4 code u32
//
// Every decoder here takes bytes it does not trust (another process wrote them): it reads
// each field once from the caller's copy and validates before anything is used.
//
// Decided for fields the kernel's uAPI leaves loose (each is tested):
// - `addr`: a PRI request names a page; the low 12 bits carry nothing and are ignored
//   (the page containing `addr` is served, as the kernel's iopf handler does).
// - `length`: a hint; one request is one page whatever it says (a device wanting more
//   sends more requests or relies on fault-around), so it is carried but not used.
// - `pasid`: at most 20 bits (PCIe); wider is malformed, so the group is answered INVALID.
// - `perm` EXEC needs a readable mapping (a DMA mapping has no execute right of its own);
//   PRIV (a supervisor address space) is answered INVALID: iopf serves user memory only.

/// One page request: `struct iommu_hwpt_pgfault`.
public struct PageRequest: Sendable, Hashable {
    /// The record's size: iommufd's `struct iommu_hwpt_pgfault`.
    @inlinable public static var byteCount: Int { 40 }
    /// PCIe PRI page request group index is 9 bits.
    public static let maxGroupIndex: UInt32 = 511
    /// PCIe PASIDs are 20 bits.
    public static let maxPASID: UInt32 = (1 << 20) - 1

    /// `IOMMU_PGFAULT_FLAGS_*`.
    public struct Flags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// The record carries a PASID.
        public static let pasidValid = Flags(rawValue: 1 << 0)
        /// The last request of its group: the group is complete.
        public static let lastPage = Flags(rawValue: 1 << 1)
        /// Every flag this version knows; a record with others is refused.
        public static let known: Flags = [.pasidValid, .lastPage]
    }

    /// `IOMMU_PGFAULT_PERM_*`: the access the device asks for.
    public struct Permission: OptionSet, Sendable, Hashable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// Read access.
        public static let read = Permission(rawValue: 1 << 0)
        /// Write access.
        public static let write = Permission(rawValue: 1 << 1)
        /// Execute access.
        public static let exec = Permission(rawValue: 1 << 2)
        /// Privileged access.
        public static let priv = Permission(rawValue: 1 << 3)
        /// Every permission this version knows.
        public static let known: Permission = [.read, .write, .exec, .priv]
    }

    /// The record's flags.
    public var flags: Flags
    /// The device that faulted.
    public var deviceID: UInt32
    /// The PASID, meaningful with `pasidValid`.
    public var pasid: UInt32
    /// The page request group index (PRGI, 9 bits).
    public var groupIndex: UInt32
    /// The access asked for.
    public var perm: Permission
    /// The faulting IOVA.
    public var addr: UInt64
    /// The access length in bytes, 0 when unknown.
    public var length: UInt32
    /// The group's cookie, which its response echoes; never 0.
    public var cookie: UInt32

    /// A page request with these fields.
    public init(
        flags: Flags, deviceID: UInt32, pasid: UInt32 = 0, groupIndex: UInt32, perm: Permission,
        addr: UInt64, length: UInt32 = 0, cookie: UInt32
    ) {
        self.flags = flags
        self.deviceID = deviceID
        self.pasid = pasid
        self.groupIndex = groupIndex
        self.perm = perm
        self.addr = addr
        self.length = length
        self.cookie = cookie
    }

    /// Whether the record ends its group.
    public var isLastPage: Bool { flags.contains(.lastPage) }
    /// The faulting page (the handler aligns the address down).
    public var page: UInt64 { addr & ~0xFFF }
    /// Whether the device asks to write.
    public var wantsWrite: Bool { perm.contains(.write) }

    /// Decodes and validates one record from exactly 40 bytes.
    public init(bytes: UnsafeRawBufferPointer) throws(FaultRecordError) {
        guard bytes.count == Self.byteCount else { throw .wrongSize(bytes.count, expected: Self.byteCount) }
        func u32(_ offset: Int) -> UInt32 {
            UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
        }
        let rawFlags = u32(0)
        let rawPerm = u32(16)
        let reserved = u32(20)
        flags = Flags(rawValue: rawFlags)
        deviceID = u32(4)
        pasid = u32(8)
        groupIndex = u32(12)
        perm = Permission(rawValue: rawPerm)
        addr = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
        length = u32(32)
        cookie = u32(36)
        guard rawFlags & ~Flags.known.rawValue == 0 else { throw .unknownFlags(rawFlags) }
        guard rawPerm & ~Permission.known.rawValue == 0 else { throw .unknownPermission(rawPerm) }
        guard reserved == 0 else { throw .reservedNonZero(reserved) }
        guard groupIndex <= Self.maxGroupIndex else { throw .groupIndexOutOfRange(groupIndex) }
        guard perm.contains(.read) || perm.contains(.write) else { throw .noAccess(rawPerm) }
        guard cookie != 0 else { throw .zeroCookie }
        guard flags.contains(.pasidValid) || pasid == 0 else { throw .pasidWithoutFlag(pasid) }
        guard pasid <= Self.maxPASID else { throw .pasidOutOfRange(pasid) }
    }

    /// Encodes into exactly 40 bytes.
    public func encode(into bytes: UnsafeMutableRawBufferPointer) {
        precondition(
            bytes.count == Self.byteCount, "a page request is \(Self.byteCount) bytes, buffer has \(bytes.count)")
        bytes.storeBytes(of: flags.rawValue.littleEndian, toByteOffset: 0, as: UInt32.self)
        bytes.storeBytes(of: deviceID.littleEndian, toByteOffset: 4, as: UInt32.self)
        bytes.storeBytes(of: pasid.littleEndian, toByteOffset: 8, as: UInt32.self)
        bytes.storeBytes(of: groupIndex.littleEndian, toByteOffset: 12, as: UInt32.self)
        bytes.storeBytes(of: perm.rawValue.littleEndian, toByteOffset: 16, as: UInt32.self)
        bytes.storeBytes(of: UInt32(0), toByteOffset: 20, as: UInt32.self)
        bytes.storeBytes(of: addr.littleEndian, toByteOffset: 24, as: UInt64.self)
        bytes.storeBytes(of: length.littleEndian, toByteOffset: 32, as: UInt32.self)
        bytes.storeBytes(of: cookie.littleEndian, toByteOffset: 36, as: UInt32.self)
    }

    /// The record's 40 bytes, as the kernel lays them out.
    public var bytes: [UInt8] {
        var out = [UInt8](repeating: 0, count: Self.byteCount)
        out.withUnsafeMutableBytes { encode(into: $0) }
        return out
    }
}

/// What is wrong with a fault record or a response, naming the field.
public enum FaultRecordError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The record is not 40 (or 8) bytes.
    case wrongSize(Int, expected: Int)
    /// Flags this version does not know.
    case unknownFlags(UInt32)
    /// Permission bits this version does not know.
    case unknownPermission(UInt32)
    /// A reserved field is not zero.
    case reservedNonZero(UInt32)
    /// A group index past the 9 bits PRI allows.
    case groupIndexOutOfRange(UInt32)
    /// A request for neither read nor write.
    case noAccess(UInt32)
    /// A cookie of 0, which no group may use.
    case zeroCookie
    /// A PASID without `pasidValid`.
    case pasidWithoutFlag(UInt32)
    /// A PASID past 20 bits.
    case pasidOutOfRange(UInt32)
    /// A response code other than SUCCESS or INVALID.
    case unknownResponseCode(UInt32)

    public var description: String {
        switch self {
        case .wrongSize(let n, let expected):
            "fault record: got \(n) bytes, a record is exactly \(expected)"
        case .unknownFlags(let f):
            "fault record: flags \(hex(UInt64(f))) has bits other than PASID_VALID (0x1) and LAST_PAGE (0x2)"
        case .unknownPermission(let p):
            "fault record: perm \(hex(UInt64(p))) has bits other than READ, WRITE, EXEC, PRIV (0xf)"
        case .reservedNonZero(let r):
            "fault record: reserved field is \(hex(UInt64(r))), must be 0"
        case .groupIndexOutOfRange(let g):
            "fault record: grpid \(g) is above the 9-bit PRI limit \(PageRequest.maxGroupIndex)"
        case .noAccess(let p):
            "fault record: perm \(hex(UInt64(p))) requests neither READ nor WRITE"
        case .zeroCookie:
            "fault record: cookie is 0, which is never a valid group cookie"
        case .pasidWithoutFlag(let p):
            "fault record: pasid \(p) is set but PASID_VALID is not"
        case .pasidOutOfRange(let p):
            "fault record: pasid \(hex(UInt64(p))) is wider than the 20 bits PCIe allows"
        case .unknownResponseCode(let c):
            "page response: code \(c) is neither SUCCESS (0) nor INVALID (1)"
        }
    }
}

/// The answer to a page request group. There is no FAILURE: a PCIe Response Failure
/// disables PRI for the whole function, so the final uAPI removed it.
public enum ResponseCode: UInt32, Sendable, Hashable {
    /// The pages are mapped: the device may retry its access.
    case success = 0
    /// The request was refused: the device must not retry.
    case invalid = 1
}

/// `struct iommu_hwpt_page_response`.
public struct PageResponse: Sendable, Hashable {
    /// The response's size: iommufd's `struct iommu_hwpt_page_response`.
    @inlinable public static var byteCount: Int { 8 }
    /// The cookie of the group answered.
    public var cookie: UInt32
    /// How the group was answered.
    public var code: ResponseCode

    /// A response to the group `cookie` with `code`.
    public init(cookie: UInt32, code: ResponseCode) {
        self.cookie = cookie
        self.code = code
    }

    /// Decodes and checks 8 bytes.
    public init(bytes: UnsafeRawBufferPointer) throws(FaultRecordError) {
        guard bytes.count == Self.byteCount else { throw .wrongSize(bytes.count, expected: Self.byteCount) }
        cookie = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 0, as: UInt32.self))
        let raw = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
        guard let code = ResponseCode(rawValue: raw) else { throw .unknownResponseCode(raw) }
        self.code = code
    }

    /// Writes the response's 8 bytes into `bytes`.
    public func encode(into bytes: UnsafeMutableRawBufferPointer) {
        precondition(
            bytes.count == Self.byteCount, "a page response is \(Self.byteCount) bytes, buffer has \(bytes.count)")
        bytes.storeBytes(of: cookie.littleEndian, toByteOffset: 0, as: UInt32.self)
        bytes.storeBytes(of: code.rawValue.littleEndian, toByteOffset: 4, as: UInt32.self)
    }
}

/// `0x`-prefixed hexadecimal, for messages.
package func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

// HostMessages.swift — the host role (protocol 1.1): a process that owns memory (a VMM's
// guest RAM) hands iopf its address space — a name, a region table, the memfds behind
// the regions and its userfaultfd — then declares DMA mappings into it, as a VMM does with
// VFIO type1's MAP_DMA/UNMAP_DMA. Conventions are Message.swift's.

/// The name of a host's address space: 1...64 bytes of `[A-Za-z0-9._-]`, so it can be
/// printed, used as a JSON key and typed on a command line as it is.
public enum AddressSpaceName {
    /// The longest name, in UTF-8 bytes.
    public static let maxBytes = 64

    /// Whether `name` may name an address space: 1...64 bytes of printable ASCII.
    public static func isValid(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        return (1...maxBytes).contains(bytes.count) && bytes.allSatisfy(isAllowed)
    }

    static func isAllowed(_ b: UInt8) -> Bool {
        (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x2E || b == 0x5F
            || b == 0x2D
    }

    static func decode(_ bytes: UnsafeRawBufferPointer, field: String) throws(WireError) -> String {
        guard (1...maxBytes).contains(bytes.count) else {
            throw .outOfRange(field: "\(field) length", value: UInt64(bytes.count), allowed: "1...\(maxBytes) bytes")
        }
        guard let bad = bytes.first(where: { !isAllowed($0) }) else { return String(decoding: bytes, as: UTF8.self) }
        throw .outOfRange(field: field, value: UInt64(bad), allowed: "bytes of [A-Za-z0-9._-]")
    }
}

/// One piece of the host's memory: `size` bytes at host virtual address `hostAddress`,
/// mapped shared from memfd number `fdIndex` (0: the first memfd sent) at `fdOffset`.
public struct HostRegionEntry: Sendable, Equatable {
    /// Where the region is mapped in the host's process.
    public var hostAddress: UInt64
    /// The region's size in bytes.
    public var size: UInt64
    /// Where the region starts in its memfd.
    public var fdOffset: UInt64
    /// The page size backing it (4 KiB, or a huge page size for hugetlbfs).
    public var pageSize: UInt32
    /// Which of the message's descriptors is its memfd.
    public var fdIndex: UInt32

    /// A region entry with these fields.
    public init(hostAddress: UInt64, size: UInt64, fdOffset: UInt64, pageSize: UInt32 = 4096, fdIndex: UInt32) {
        self.hostAddress = hostAddress
        self.size = size
        self.fdOffset = fdOffset
        self.pageSize = pageSize
        self.fdIndex = fdIndex
    }

    /// The host addresses the region covers.
    public var hostRange: Range<UInt64> { hostAddress..<(hostAddress + size) }
}

/// HOST request: 16 bytes (region count, name length, allowed uid count, 4 reserved),
/// the name padded with zeros to a multiple of 8 bytes, 32 bytes per region, then the
/// allowed uids (u32 each) padded to a multiple of 8 bytes. Descriptors, in order: the
/// host's userfaultfd, then the memfds that `fdIndex` numbers. Reply: empty.
///
/// Who may attach a device to the address space: peers with the host's own uid
/// (SO_PEERCRED), and peers whose uid is in `allowedUIDs`. A client of 1.1 before the
/// list existed sends a count of 0 (the field was reserved): its own uid only.
public struct HostDeclaration: WirePayload {
    public static let command = Command.host
    /// The most regions one HOST declares.
    public static let maxRegions = 64
    /// Bytes of one region entry.
    public static let regionBytes = 32
    /// The most uids a host may admit besides its own.
    public static let maxAllowedUIDs = 16

    /// The address space's name, which devices attach to.
    public var name: String
    /// The regions of memory handed over, one memfd each.
    public var regions: [HostRegionEntry]
    /// Further uids whose peers may attach devices (the host's own uid always may).
    public var allowedUIDs: [UInt32]

    /// A declaration of `name` over `regions`, admitting devices of `allowedUIDs` besides the host's uid.
    public init(name: String, regions: [HostRegionEntry], allowedUIDs: [UInt32] = []) {
        self.name = name
        self.regions = regions
        self.allowedUIDs = allowedUIDs
    }

    /// Memfds the regions name (the highest `fdIndex` plus one).
    public var memfdCount: Int { Int(regions.map(\.fdIndex).max() ?? 0) + 1 }

    static func padded(_ n: Int) -> Int { (n + 7) & ~7 }

    public init(payload p: UnsafeRawBufferPointer) throws(WireError) {
        guard p.count >= 16 else { throw .payloadSize(.host, got: p.count, expected: 16) }
        var r = WireReader(p)
        let count = Int(r.u32())
        let nameLength = Int(r.u32())
        let allowedCount = Int(r.u32())
        guard r.u32() == 0 else { throw .reservedNonZero(field: "HOST reserved") }
        guard allowedCount <= Self.maxAllowedUIDs else {
            throw .outOfRange(
                field: "HOST allowed uids", value: UInt64(allowedCount),
                allowed: "0...\(Self.maxAllowedUIDs)")
        }
        guard (1...Self.maxRegions).contains(count) else {
            throw .outOfRange(field: "HOST.regions", value: UInt64(count), allowed: "1...\(Self.maxRegions)")
        }
        guard (1...AddressSpaceName.maxBytes).contains(nameLength) else {
            throw .outOfRange(
                field: "HOST name length", value: UInt64(nameLength), allowed: "1...\(AddressSpaceName.maxBytes)")
        }
        let namePadded = Self.padded(nameLength)
        let regionsAt = 16 + namePadded
        let allowedAt = regionsAt + Self.regionBytes * count
        try Wire.expectSize(.host, p, allowedAt + Self.padded(4 * allowedCount))
        name = try AddressSpaceName.decode(
            UnsafeRawBufferPointer(rebasing: p[16..<(16 + nameLength)]), field: "HOST name")
        guard p[(16 + nameLength)..<(16 + namePadded)].allSatisfy({ $0 == 0 }) else {
            throw .reservedNonZero(field: "HOST name padding")
        }
        r = WireReader(UnsafeRawBufferPointer(rebasing: p[allowedAt...]))
        allowedUIDs = (0..<allowedCount).map { _ in r.u32() }
        guard allowedCount % 2 == 0 || r.u32() == 0 else { throw .reservedNonZero(field: "HOST allowed uid padding") }
        r = WireReader(UnsafeRawBufferPointer(rebasing: p[regionsAt...]))
        regions = []
        for i in 0..<count {
            let e = HostRegionEntry(
                hostAddress: r.u64(), size: r.u64(), fdOffset: r.u64(), pageSize: r.u32(), fdIndex: r.u32())
            let field = "HOST region \(i)"
            guard e.size > 0 else { throw .outOfRange(field: "\(field) size", value: 0, allowed: "> 0") }
            for (what, v) in [("address", e.hostAddress), ("size", e.size), ("fd offset", e.fdOffset)]
            where v & 0xFFF != 0 {
                throw .unaligned(field: "\(field) \(what)", value: v)
            }
            guard e.hostAddress <= UInt64.max - e.size, e.fdOffset <= UInt64.max - e.size else {
                throw .outOfRange(
                    field: "\(field)", value: e.hostAddress,
                    allowed: "address + size and offset + size must not overflow")
            }
            guard e.pageSize >= 4096, e.pageSize & (e.pageSize - 1) == 0 else {
                throw .outOfRange(
                    field: "\(field) page size", value: UInt64(e.pageSize), allowed: "a power of two >= 4096")
            }
            guard e.fdIndex < WireLimits.maxFDs - 1 else {
                throw .outOfRange(
                    field: "\(field) fd index", value: UInt64(e.fdIndex), allowed: "0..<\(WireLimits.maxFDs - 1)")
            }
            if let j = regions.firstIndex(where: { $0.hostRange.overlaps(e.hostRange) }) {
                throw .outOfRange(
                    field: "\(field)", value: e.hostAddress, allowed: "regions must not overlap (region \(j) does)")
            }
            regions.append(e)
        }
    }

    public func encode(into w: inout WireWriter) {
        let nameBytes = Array(name.utf8)
        w.u32(UInt32(regions.count))
        w.u32(UInt32(nameBytes.count))
        w.u32(UInt32(allowedUIDs.count))
        w.u32(0)
        w.bytes += nameBytes + [UInt8](repeating: 0, count: Self.padded(nameBytes.count) - nameBytes.count)
        for e in regions {
            w.u64(e.hostAddress)
            w.u64(e.size)
            w.u64(e.fdOffset)
            w.u32(e.pageSize)
            w.u32(e.fdIndex)
        }
        for uid in allowedUIDs { w.u32(uid) }
        if allowedUIDs.count % 2 == 1 { w.u32(0) }
    }
}

/// DMA_MAP request: 32 bytes. Adds the mapping `[iova, iova + size)` → host addresses from
/// `hostAddress` (VFIO_IOMMU_MAP_DMA, fault-driven: nothing is pinned; with PIN, protocol
/// 1.2, pinned and mapped whole before the reply, as VFIO type1 does), or with VADDR
/// points an existing mapping, exactly `[iova, iova + size)`, at new host addresses
/// (VFIO_DMA_MAP_FLAG_VADDR; READ and WRITE must then be 0). Reply: empty, sent once
/// every device dropped translations to the old host addresses.
public struct DMAMapRequest: WirePayload {
    public static let command = Command.dmaMap
    /// DMA_MAP flag: devices may read.
    public static let read: UInt32 = 1 << 0
    /// DMA_MAP flag: devices may write.
    public static let write: UInt32 = 1 << 1
    /// DMA_MAP flag: update the host address of an existing mapping (VFIO's `VFIO_DMA_MAP_FLAG_VADDR`).
    public static let vaddr: UInt32 = 1 << 2
    /// DMA_MAP flag (1.2): pin the pages and map them all now (VFIO type1), instead of on fault.
    public static let pin: UInt32 = 1 << 3

    /// The first IOVA to map.
    public var iova: UInt64
    /// The host address the IOVA maps to, inside a declared region.
    public var hostAddress: UInt64
    /// The size in bytes, page aligned.
    public var size: UInt64
    /// `read`, `write`, `vaddr` and `pin` bits.
    public var flags: UInt32

    /// A DMA_MAP of `size` bytes at `iova` onto `hostAddress`.
    public init(iova: UInt64, hostAddress: UInt64, size: UInt64, flags: UInt32) {
        self.iova = iova
        self.hostAddress = hostAddress
        self.size = size
        self.flags = flags
    }

    /// Whether the request updates an existing mapping's host address.
    public var updatesHostAddress: Bool { flags & Self.vaddr != 0 }

    public init(payload p: UnsafeRawBufferPointer) throws(WireError) {
        try Wire.expectSize(.dmaMap, p, 32)
        var r = WireReader(p)
        iova = r.u64()
        hostAddress = r.u64()
        size = r.u64()
        flags = r.u32()
        guard r.u32() == 0 else { throw .reservedNonZero(field: "DMA_MAP reserved") }
        guard flags & ~(Self.read | Self.write | Self.vaddr | Self.pin) == 0 else {
            throw .outOfRange(field: "DMA_MAP.flags", value: UInt64(flags), allowed: "bits 0-3")
        }
        if flags & Self.vaddr != 0 && flags != Self.vaddr {
            throw .outOfRange(
                field: "DMA_MAP.flags", value: UInt64(flags), allowed: "VADDR alone: the permission is the mapping's")
        }
    }

    public func encode(into w: inout WireWriter) {
        w.u64(iova)
        w.u64(hostAddress)
        w.u64(size)
        w.u32(flags)
        w.u32(0)
    }
}

/// DMA_UNMAP request: 16 bytes, or 32 with flags (protocol 1.3). Removes the whole mappings
/// inside `[iova, iova + size)`. With `getDirty` (VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP) the
/// reply also reports the pages written there since the last read of the dirty log, read
/// with the removal so that no write falls between: the range lies inside one started range
/// and holds at most `DirtyLimits.maxReadBytes`, and the bitmap comes inline or goes to a
/// memfd sent with the request at `bitmapOffset`, as DIRTY_READ's.
public struct DMAUnmapRequest: WirePayload {
    public static let command = Command.dmaUnmap
    /// Flag bit 0: report the range's dirty pages with the unmap.
    public static let getDirty: UInt32 = 1 << 0
    /// The first IOVA to unmap.
    public var iova: UInt64
    /// The size in bytes; mappings inside are removed whole.
    public var size: UInt64
    /// `getDirty` or 0.
    public var flags: UInt32
    /// Where the bitmap goes in the memfd sent with a `getDirty` request (0 inline).
    public var bitmapOffset: UInt64

    /// A DMA_UNMAP of `size` bytes at `iova`; with `getDirty` in `flags`, reading the log too.
    public init(iova: UInt64, size: UInt64, flags: UInt32 = 0, bitmapOffset: UInt64 = 0) {
        self.iova = iova
        self.size = size
        self.flags = flags
        self.bitmapOffset = bitmapOffset
    }

    /// Whether it is the 32-byte form (protocol 1.3): sent when a flag or an offset is set.
    public var isExtended: Bool { flags != 0 || bitmapOffset != 0 }

    public init(payload p: UnsafeRawBufferPointer) throws(WireError) {
        guard p.count == 16 || p.count == 32 else { throw .payloadSize(.dmaUnmap, got: p.count, expected: 32) }
        var r = WireReader(p)
        iova = r.u64()
        size = r.u64()
        guard p.count == 32 else {
            (flags, bitmapOffset) = (0, 0)
            return
        }
        flags = r.u32()
        let reserved = r.u32()
        bitmapOffset = r.u64()
        guard flags & ~Self.getDirty == 0 else {
            throw .outOfRange(field: "DMA_UNMAP.flags", value: UInt64(flags), allowed: "bit 0 (GET_DIRTY) only")
        }
        guard reserved == 0 else { throw .reservedNonZero(field: "DMA_UNMAP.reserved") }
        guard flags & Self.getDirty != 0 else {
            guard bitmapOffset == 0 else {
                throw .outOfRange(field: "DMA_UNMAP.bitmapOffset", value: bitmapOffset, allowed: "0 without GET_DIRTY")
            }
            return
        }
        try checkDirtyRead(.dmaUnmap, iova: iova, size: size, bitmapOffset: bitmapOffset)
    }

    public func encode(into w: inout WireWriter) {
        w.u64(iova)
        w.u64(size)
        guard isExtended else { return }
        w.u32(flags)
        w.u32(0)
        w.u64(bitmapOffset)
    }
}

/// DMA_UNMAP reply: 8 bytes, the bytes unmapped (as VFIO_IOMMU_UNMAP_DMA's `size`), sent
/// once every device dropped the translations; after a GET_DIRTY request, then a
/// DIRTY_READ reply's payload (pages reported, inline bitmap bytes, the inline bitmap).
public struct DMAUnmapReply: WirePayload {
    public static let command = Command.dmaUnmap
    /// Bytes unmapped.
    public var bytes: UInt64
    /// The dirty pages of the range, after a GET_DIRTY request.
    public var dirty: DirtyReadReply?
    /// A reply of `bytes` unmapped, and `dirty` after a GET_DIRTY request.
    public init(bytes: UInt64, dirty: DirtyReadReply? = nil) {
        self.bytes = bytes
        self.dirty = dirty
    }
    public init(payload p: UnsafeRawBufferPointer) throws(WireError) {
        guard p.count >= 8 else { throw .payloadSize(.dmaUnmap, got: p.count, expected: 8) }
        var r = WireReader(p)
        bytes = r.u64()
        dirty = p.count == 8 ? nil : try DirtyReadReply(payload: UnsafeRawBufferPointer(rebasing: p[8...]))
    }
    public func encode(into w: inout WireWriter) {
        w.u64(bytes)
        dirty?.encode(into: &w)
    }
}

/// VHOST (protocol 1.1, host → service): the service is to serve a vhost-user back-end in
/// the host's address space. Two descriptors: the back-end's vhost-user socket (AF_UNIX
/// SOCK_STREAM) and the front-end's end of its back-end channel (AF_UNIX SOCK_SEQPACKET),
/// after the host did the handshake with its memory table's user addresses being its own
/// (as QEMU's). 16 bytes: the device id, the pages of the aligned block an UPDATE's run
/// stays in (a power of two, 1-262144), the pages a miss maps (1-512), 4 reserved.
public struct VhostAttachRequest: WirePayload, Equatable {
    public static let command = Command.vhost
    /// The largest block of pages an UPDATE may cover.
    public static let maxBlockPages: UInt32 = 1 << 18
    /// The most pages mapped around a miss.
    public static let maxFaultAroundPages: UInt32 = 512
    /// The device id the back-end is served as.
    public var deviceID: UInt32
    /// Pages of the aligned block an UPDATE may cover around a miss.
    public var blockPages: UInt32
    /// Pages mapped around each miss.
    public var faultAroundPages: UInt32

    /// A VHOST request for back-end `deviceID`.
    public init(deviceID: UInt32, blockPages: UInt32 = 512, faultAroundPages: UInt32 = 16) {
        self.deviceID = deviceID
        self.blockPages = blockPages
        self.faultAroundPages = faultAroundPages
    }

    public init(payload p: UnsafeRawBufferPointer) throws(WireError) {
        try Wire.expectSize(.vhost, p, 16)
        var r = WireReader(p)
        deviceID = r.u32()
        blockPages = r.u32()
        faultAroundPages = r.u32()
        guard r.u32() == 0 else { throw .reservedNonZero(field: "VHOST reserved") }
        guard (1...Self.maxBlockPages).contains(blockPages), blockPages & (blockPages - 1) == 0 else {
            throw .outOfRange(field: "blockPages", value: UInt64(blockPages), allowed: "a power of two, 1-262144")
        }
        guard (1...Self.maxFaultAroundPages).contains(faultAroundPages) else {
            throw .outOfRange(field: "faultAroundPages", value: UInt64(faultAroundPages), allowed: "1-512")
        }
    }

    public func encode(into w: inout WireWriter) {
        w.u32(deviceID)
        w.u32(blockPages)
        w.u32(faultAroundPages)
        w.u32(0)
    }
}

/// The DETACH notice: the service tells a device, on its invalidation socket, that it is
/// being detached and why (a DETACH request with NO_REPLY, `error` ENODEV, the reason as
/// text), then closes the connection.
public enum DetachNotice {
    /// The DETACH notice with `reason`, as the service sends it on an invalidation socket.
    public static func message(reason: String) -> [UInt8] {
        Wire.message(
            command: .detach, id: 0, flags: .noReply, error: WireErrno.noDevice,
            payload: Array(reason.utf8.prefix(WireLimits.maxErrorText)))
    }
}

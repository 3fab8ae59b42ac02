// Addressing.swift — page sizes, protections and range helpers shared by every part of
// the engine.
//
// Conventions, stated once for the whole module:
// - Addresses (IOVA, host virtual, physical) are `UInt64`; page indices are `Int`.
// - `last` is inclusive, `end` is exclusive. `IOVARange` carries `start` and `last` so that
//   a range ending at the top of the address space is representable; beware of overflow
//   in `start + size - 1`, which every validator here checks before computing it.
// - The smallest page is 4 KiB. "Aligned" without qualification means 4 KiB aligned.

@_exported import IOPFWire

/// The page sizes an I/O page table can map: 4 KiB leaves and 2 MiB / 1 GiB blocks.
public enum PageSize: UInt64, Sendable, CaseIterable, CustomStringConvertible {
    /// A 4 KiB page: the I/O page table's smallest leaf.
    case size4K = 0x1000
    /// A 2 MiB block: a level-2 leaf.
    case size2M = 0x20_0000
    /// A 1 GiB block: a level-3 leaf.
    case size1G = 0x4000_0000

    /// The size in bytes.
    public var bytes: UInt64 { rawValue }
    public var description: String {
        switch self {
        case .size4K: "4 KiB"
        case .size2M: "2 MiB"
        case .size1G: "1 GiB"
        }
    }
}

/// log2 of the base page size: IOVAs and host addresses are shifted by it to page numbers.
public let pageShift: UInt64 = 12
/// The base page size, 4 KiB.
public let pageBytes: UInt64 = 1 << pageShift
let pageMask: UInt64 = pageBytes - 1
/// A 2 MiB block: the huge page a fault may map with one entry.
public let hugeBlockBytes: UInt64 = 2 << 20
/// 4 KiB pages in a 2 MiB block.
public let hugeBlockPages = Int(hugeBlockBytes >> pageShift)

@inlinable func isPageAligned(_ value: UInt64) -> Bool { value & 0xFFF == 0 }

/// Read/write permission of a mapping or a page-table leaf.
public struct Protection: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    /// The device may read.
    public static let read = Protection(rawValue: 1 << 0)
    /// The device may write.
    public static let write = Protection(rawValue: 1 << 1)
    /// The device may read and write.
    public static let readWrite: Protection = [.read, .write]

    public var description: String {
        (contains(.read) ? "r" : "-") + (contains(.write) ? "w" : "-")
    }
}

/// An inclusive IOVA range `[start, last]`, the shape the IOTLB gather works in.
public struct IOVARange: Sendable, Hashable, CustomStringConvertible {
    /// The first IOVA of the range.
    public var start: UInt64
    /// The last IOVA of the range (inclusive, so a range can end at the top of the space).
    public var last: UInt64

    /// The range `[start, last]`; `last` must not be below `start`.
    public init(start: UInt64, last: UInt64) {
        precondition(start <= last, "IOVARange start \(start) is above last \(last)")
        self.start = start
        self.last = last
    }

    /// Size in bytes; a range covering all 2^64 addresses does not occur here (IOVAs are 48-bit).
    public var size: UInt64 { last - start + 1 }

    /// 4 KiB pages the range touches, partial ones included.
    public var pagesTouched: Int { Int(last >> 12 - start >> 12) + 1 }

    /// Whether the two ranges share at least one IOVA.
    public func overlaps(_ other: IOVARange) -> Bool { start <= other.last && other.start <= last }

    /// Overlapping or directly adjacent, so that one range can cover both.
    public func touches(_ other: IOVARange) -> Bool {
        (last == .max || other.start <= last + 1) && (other.last == .max || start <= other.last + 1)
    }

    public var description: String {
        "[0x" + String(start, radix: 16) + ", 0x" + String(last, radix: 16) + "]"
    }
}

/// The inclusive last address of `[start, start + size)`, or nil when `size` is zero or the
/// range wraps past 2^64.
@inlinable func lastAddress(start: UInt64, size: UInt64) -> UInt64? {
    guard size > 0 else { return nil }
    let (last, overflow) = start.addingReportingOverflow(size - 1)
    return overflow ? nil : last
}

/// Human-readable byte count, for error messages.
func byteCount(_ bytes: UInt64) -> String {
    let units: [(UInt64, String)] = [(1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
    for (unit, name) in units where bytes >= unit && bytes % unit == 0 {
        return "\(bytes / unit) \(name)"
    }
    return "\(bytes) bytes"
}

extension Duration {
    /// Whole nanoseconds (durations here are far below 292 years).
    public var nanoseconds: Int64 { components.seconds * 1_000_000_000 + components.attoseconds / 1_000_000_000 }
    /// The duration in whole milliseconds, rounded down.
    public var milliseconds: Int64 { nanoseconds / 1_000_000 }
    /// The duration in seconds, with its fraction.
    public var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}

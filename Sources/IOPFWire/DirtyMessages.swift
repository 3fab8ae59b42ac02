// DirtyMessages.swift — dirty tracking for hosts (protocol 1.2): a host starts and stops
// tracking on IOVA ranges and reads-and-clears the log into a bitmap, as a VMM does with
// VFIO's DMA logging or iommufd's IOMMU_HWPT_SET_DIRTY_TRACKING and
// IOMMU_HWPT_GET_DIRTY_BITMAP, to migrate its guest. Conventions are Message.swift's.
//
// Bitmaps: bit k (bit k % 64 of little-endian u64 word k / 64) stands for the page at
// `iova + k * 4 KiB`; a bitmap of n pages is `DirtyLimits.bitmapBytes(pages: n)` bytes
// (whole words), bits past n zero.

/// What one host may ask of dirty tracking.
public enum DirtyLimits {
    /// Started ranges one host may have at once.
    public static let maxRanges = 64
    /// The largest bitmap a DIRTY_READ reply carries inline: 65,536 pages (256 MiB).
    public static let maxInlineBitmapBytes = 8192
    /// The largest range one DIRTY_READ reads: 64 GiB, a 2 MiB bitmap.
    public static let maxReadBytes: UInt64 = 64 << 30

    /// Bytes of a bitmap of `pages` pages: whole u64 words.
    public static func bitmapBytes(pages: UInt64) -> Int { Int((pages + 63) / 64 * 8) }
}

/// The IOVA range of a dirty-tracking request: page-aligned, non-empty, not wrapping.
private func decodeRange(_ c: Command, _ r: inout WireReader) throws(WireError) -> (UInt64, UInt64) {
    let iova = r.u64()
    let size = r.u64()
    try checkDirtyRange(c, iova: iova, size: size)
    return (iova, size)
}

/// Checks that a range whose dirty log is read is page-aligned, non-empty and not wrapping.
func checkDirtyRange(_ c: Command, iova: UInt64, size: UInt64) throws(WireError) {
    guard size > 0 else { throw .outOfRange(field: "\(c).size", value: 0, allowed: "> 0") }
    for (what, v) in [("iova", iova), ("size", size)] where v & 0xFFF != 0 {
        throw .unaligned(field: "\(c).\(what)", value: v)
    }
    guard iova <= UInt64.max - (size - 1) else {
        throw .outOfRange(field: "\(c).size", value: size, allowed: "iova + size must not wrap")
    }
}

/// Checks a read of the log (DIRTY_READ, DMA_UNMAP with GET_DIRTY): its range, at most
/// `DirtyLimits.maxReadBytes`, and a bitmap offset 8-aligned with the bitmap not wrapping.
func checkDirtyRead(_ c: Command, iova: UInt64, size: UInt64, bitmapOffset: UInt64) throws(WireError) {
    try checkDirtyRange(c, iova: iova, size: size)
    guard size <= DirtyLimits.maxReadBytes else {
        throw .outOfRange(field: "\(c).size", value: size, allowed: "at most \(DirtyLimits.maxReadBytes)")
    }
    guard bitmapOffset & 7 == 0, bitmapOffset <= UInt64.max - UInt64(DirtyLimits.bitmapBytes(pages: size >> 12)) else {
        throw .outOfRange(
            field: "\(c).bitmapOffset", value: bitmapOffset, allowed: "8-aligned, offset + bitmap not wrapping")
    }
}

/// What DIRTY_START and DIRTY_STOP carry: 16 bytes {iova, size}, a page-aligned range.
public protocol DirtyRangeRequest: WirePayload {
    /// The first IOVA of the range.
    var iova: UInt64 { get }
    /// The range's size in bytes, page-aligned.
    var size: UInt64 { get }
    /// A request for `size` bytes at `iova`.
    init(iova: UInt64, size: UInt64)
}

extension DirtyRangeRequest {
    public init(payload p: UnsafeRawBufferPointer) throws(WireError) {
        try Wire.expectSize(Self.command, p, 16)
        var r = WireReader(p)
        let (iova, size) = try decodeRange(Self.command, &r)
        self.init(iova: iova, size: size)
    }

    public func encode(into w: inout WireWriter) {
        w.u64(iova)
        w.u64(size)
    }
}

/// DIRTY_START request: tracking starts on every mapping the range touches, and on
/// mappings created inside it later. Reply: empty, sent once every device of the host
/// dropped its writable translations (a write after the reply is logged).
public struct DirtyStartRequest: DirtyRangeRequest {
    public static let command = Command.dirtyStart
    public var iova: UInt64
    public var size: UInt64
    public init(iova: UInt64, size: UInt64) { (self.iova, self.size) = (iova, size) }
}

/// DIRTY_STOP request: exactly a range DIRTY_START started. Reply: empty.
public struct DirtyStopRequest: DirtyRangeRequest {
    public static let command = Command.dirtyStop
    public var iova: UInt64
    public var size: UInt64
    public init(iova: UInt64, size: UInt64) { (self.iova, self.size) = (iova, size) }
}

/// DIRTY_READ request: 24 bytes {iova, size, bitmap offset}. Reports the pages written in
/// the range since the last read (or the start) and clears them. The range lies inside one
/// started range and holds at most `DirtyLimits.maxReadBytes`. Without a descriptor the
/// bitmap comes back inline (at most `DirtyLimits.maxInlineBitmapBytes`, offset 0); with
/// one, a memfd sealed against shrinking, the service writes it there at `bitmapOffset`
/// (8-aligned) and the reply carries none. Reply: `DirtyReadReply`, sent once every device
/// dropped the write access the read took back.
public struct DirtyReadRequest: WirePayload {
    public static let command = Command.dirtyRead
    /// The first IOVA to report.
    public var iova: UInt64
    /// The range's size in bytes.
    public var size: UInt64
    /// Where the bitmap goes in the memfd sent with the request (0 inline).
    public var bitmapOffset: UInt64

    /// A DIRTY_READ of `size` bytes at `iova`, the bitmap at `bitmapOffset` of a memfd sent with it, or inline.
    public init(iova: UInt64, size: UInt64, bitmapOffset: UInt64 = 0) {
        self.iova = iova
        self.size = size
        self.bitmapOffset = bitmapOffset
    }

    /// Pages the range covers: bits of the bitmap.
    public var pages: UInt64 { size >> 12 }

    /// Bytes of the bitmap.
    public var bitmapBytes: Int { DirtyLimits.bitmapBytes(pages: pages) }

    public init(payload p: UnsafeRawBufferPointer) throws(WireError) {
        try Wire.expectSize(.dirtyRead, p, 24)
        var r = WireReader(p)
        iova = r.u64()
        size = r.u64()
        bitmapOffset = r.u64()
        try checkDirtyRead(.dirtyRead, iova: iova, size: size, bitmapOffset: bitmapOffset)
    }

    public func encode(into w: inout WireWriter) {
        w.u64(iova)
        w.u64(size)
        w.u64(bitmapOffset)
    }
}

/// DIRTY_READ reply: 16 bytes {pages reported, inline bitmap bytes}, then the inline
/// bitmap (none when it went to a memfd).
public struct DirtyReadReply: WirePayload {
    public static let command = Command.dirtyRead
    /// Pages the bitmap reports dirty.
    public var reportedPages: UInt64
    /// The bitmap, when it came inline.
    public var bitmap: [UInt8]

    /// A reply reporting `reportedPages`, with `bitmap` inline (empty when written to a memfd).
    public init(reportedPages: UInt64, bitmap: [UInt8] = []) {
        self.reportedPages = reportedPages
        self.bitmap = bitmap
    }

    public init(payload p: UnsafeRawBufferPointer) throws(WireError) {
        guard p.count >= 16 else { throw .payloadSize(.dirtyRead, got: p.count, expected: 16) }
        var r = WireReader(p)
        reportedPages = r.u64()
        let count = r.u64()
        guard count <= UInt64(DirtyLimits.maxInlineBitmapBytes), count & 7 == 0 else {
            throw .outOfRange(
                field: "DIRTY_READ reply bitmap bytes", value: count,
                allowed: "whole words, at most \(DirtyLimits.maxInlineBitmapBytes)")
        }
        try Wire.expectSize(.dirtyRead, p, 16 + Int(count))
        guard reportedPages <= count * 8 || count == 0 else {
            throw .outOfRange(
                field: "DIRTY_READ reply pages", value: reportedPages, allowed: "at most the bitmap's bits")
        }
        bitmap = Array(p[16...])
    }

    public func encode(into w: inout WireWriter) {
        w.u64(reportedPages)
        w.u64(UInt64(bitmap.count))
        w.bytes += bitmap
    }
}

// DeviceMemory.swift — the host memory a device can reach: the service's regions, each a
// memfd mapped here, at its base in the service's physical address space. DMA goes through
// a translation's physical address to this process's mapping, so a wrong translation
// lands on the wrong bytes (or outside every region, which is refused). The only raw
// pointer use of the device side lives here.

import Glibc
import IOPFSystem
import IOPFWire
import SystemPackage

/// One region mapped into this process.
final class MappedRegion: @unchecked Sendable {
    let phys: UInt64
    let size: UInt64
    let base: UnsafeMutableRawPointer

    /// Maps `info.size` bytes of `fd` (which must be at least that large); the fd is not kept.
    init(_ info: MemoryRegionInfo, fd: CInt) throws(SystemCallError) {
        guard try Sys.fileSize(fd) >= info.size else {
            throw SystemCallError(
                "region at \(hex(info.phys)): its memfd is smaller than \(info.size) bytes", .invalidArgument)
        }
        let p = mmap(nil, Int(info.size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let p, p != MAP_FAILED else { throw SystemCallError("mmap(region)", .init(rawValue: Glibc.errno)) }
        phys = info.phys
        size = info.size
        base = p
    }

    deinit { munmap(base, Int(size)) }
}

/// Every region a device was given, looked up by physical address.
public final class DeviceMemory: @unchecked Sendable {
    private let regions: [MappedRegion]

    /// Maps each region from its fd. The fds are closed here, mapped or not.
    public init(_ regions: [(MemoryRegionInfo, FileDescriptor)]) throws(SystemCallError) {
        defer { for (_, fd) in regions { Sys.close(fd.rawValue) } }
        var mapped: [MappedRegion] = []
        for (info, fd) in regions { mapped.append(try MappedRegion(info, fd: fd.rawValue)) }
        self.regions = mapped.sorted { $0.phys < $1.phys }
    }

    /// The regions mapped, by physical base and size, in order of base.
    public var regionInfo: [MemoryRegionInfo] { regions.map { MemoryRegionInfo(phys: $0.phys, size: $0.size) } }

    /// This process's address of `count` bytes at `phys`; nil when they are not inside one region.
    @inline(__always)
    func pointer(_ phys: UInt64, count: Int) -> UnsafeMutableRawPointer? {
        for r in regions where phys >= r.phys && phys - r.phys < r.size {
            guard phys - r.phys + UInt64(count) <= r.size else { return nil }
            return r.base + Int(phys - r.phys)
        }
        return nil
    }

    /// Reads the 8 bytes at `phys`; nil outside every region.
    public func load(_ phys: UInt64) -> UInt64? {
        pointer(phys, count: 8)?.loadUnaligned(as: UInt64.self)
    }

    /// Writes 8 bytes at `phys`; false outside every region.
    @discardableResult
    public func store(_ phys: UInt64, _ value: UInt64) -> Bool {
        guard let p = pointer(phys, count: 8) else { return false }
        p.storeBytes(of: value, as: UInt64.self)
        return true
    }

    /// Writes `byteCount` bytes (a multiple of 8) of `value`; false outside every region.
    @discardableResult
    public func fill(_ phys: UInt64, byteCount: Int, _ value: UInt64) -> Bool {
        guard let p = pointer(phys, count: byteCount) else { return false }
        p.bindMemory(to: UInt64.self, capacity: byteCount / 8).update(repeating: value, count: byteCount / 8)
        return true
    }

    /// Reads `byteCount` bytes (a multiple of 8), as a device read would move them.
    @discardableResult
    public func touch(_ phys: UInt64, byteCount: Int) -> UInt64? {
        guard let p = pointer(phys, count: byteCount) else { return nil }
        let words = p.bindMemory(to: UInt64.self, capacity: byteCount / 8)
        var x: UInt64 = 0
        for i in 0..<(byteCount / 8) { x ^= words[i] }
        return x
    }
}

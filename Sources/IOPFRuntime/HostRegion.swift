// HostRegion.swift — real anonymous host memory for DMA, and the engine's `HostMemory`
// over the process's own address space.
//
// In fault mode nothing is pinned or locked: resolving a page makes it resident with
// MADV_POPULATE_READ/WRITE (Linux 5.14+), one call per contiguous run. The host virtual
// address stands for the physical address, so a simulated device can reach the memory a
// translation names. Ranges are `[start, start + length)`.

import CIOPFShim
import Glibc
import Foundation
import IOPFCore
import Synchronization

/// One anonymous, private mapping, unmapped on deinit.
public final class HostRegion: @unchecked Sendable {
    public let base: UInt64
    public let length: UInt64
    private var unmapped = false

    /// Maps `length` bytes at an address aligned to `alignment` (a power of two, at least
    /// 4 KiB), e.g. 2 MiB so that the I/O page table can use blocks.
    public init(length: UInt64, alignment: UInt64 = 4096) throws(SystemCallError) {
        precondition(length > 0 && length & 0xFFF == 0, "region length \(length) must be a positive multiple of 4 KiB")
        precondition(alignment >= 4096 && alignment & (alignment - 1) == 0, "alignment \(alignment) must be a power of two >= 4 KiB")
        let extra = alignment - 4096
        let p = mmap(nil, Int(length + extra), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard p != MAP_FAILED, let p else { throw SystemCallError("mmap", .init(rawValue: Glibc.errno)) }
        let raw = UInt64(UInt(bitPattern: p))
        base = (raw + extra) & ~(alignment - 1)
        // Give back the slack on both sides.
        if base > raw { munmap(p, Int(base - raw)) }
        let tail = raw + length + extra - (base + length)
        if tail > 0 { munmap(UnsafeMutableRawPointer(bitPattern: UInt(base + length)), Int(tail)) }
        self.length = length
    }

    deinit {
        if !unmapped { munmap(UnsafeMutableRawPointer(bitPattern: UInt(base)), Int(length)) }
    }

    public var end: UInt64 { base + length }

    /// Bytes of the region now resident, by mincore(2).
    public func residentBytes() throws(SystemCallError) -> UInt64 {
        let pages = Int(length >> 12)
        var vec = [UInt8](repeating: 0, count: pages)
        _ = try syscall("mincore") { mincore(UnsafeMutableRawPointer(bitPattern: UInt(base)), Int(length), &vec) }
        return UInt64(vec.reduce(0) { $0 + Int($1 & 1) }) << 12
    }
}

/// RLIMIT_MEMLOCK and CAP_IPC_LOCK of this process, for the pinned path's accounting.
public enum LockedMemoryLimits {
    public static func current() -> (limitBytes: UInt64, capIPCLock: Bool) {
        var limit = rlimit()
        let bytes = getrlimit(__rlimit_resource_t(__RLIMIT_MEMLOCK.rawValue), &limit) == 0 ? UInt64(limit.rlim_cur) : 0
        // CapEff is a hex mask; CAP_IPC_LOCK is bit 14.
        let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
        let capEff = status.split(separator: "\n").first { $0.hasPrefix("CapEff:") }
            .flatMap { UInt64($0.split(separator: "\t").last ?? "", radix: 16) } ?? 0
        return (bytes, capEff & (1 << 14) != 0)
    }
}

/// The engine's view of this process's memory.
public final class ProcessMemory: HostMemory {
    /// Ranges standing for device memory (MMIO-like, no page backing): pinned mappings map
    /// them but never lock or charge them (seed 002).
    private let deviceMemory = Mutex<[Range<UInt64>]>([])

    public init() {}

    public func markDeviceMemory(_ range: Range<UInt64>) {
        deviceMemory.withLock { $0.append(range) }
    }

    /// Locks normal pages with mlock(2), one call per run of one kind; device memory is
    /// only described. On failure it unlocks what it locked and says why.
    public func pin(address: UInt64, pageCount: Int, into pages: inout [PinnedPage]) throws(HostMemoryError) {
        var locked: [(UInt64, Int)] = []
        try forEachRun(address: address, pageCount: pageCount) { (start, n, isDevice) throws(HostMemoryError) in
            if !isDevice {
                if mlock(UnsafeRawPointer(bitPattern: UInt(start)), n << 12) != 0 {
                    let e = Glibc.errno
                    for (a, c) in locked { munlock(UnsafeRawPointer(bitPattern: UInt(a)), c << 12) }
                    let why = switch e {
                    case ENOMEM: "mlock: over RLIMIT_MEMLOCK without CAP_IPC_LOCK, or part of the range is not mapped"
                    case EAGAIN: "mlock: some pages could not be locked"
                    case EPERM: "mlock: not permitted (no CAP_IPC_LOCK and RLIMIT_MEMLOCK is 0)"
                    default: "mlock: errno \(e)"
                    }
                    throw HostMemoryError(address: start, reason: why)
                }
                locked.append((start, n))
            }
            for k in 0..<n { pages.append(PinnedPage(phys: start + UInt64(k) << 12, chargeable: !isDevice)) }
        }
    }

    public func unpin(address: UInt64, pageCount: Int) {
        forEachRun(address: address, pageCount: pageCount) { start, n, isDevice in
            if !isDevice { munlock(UnsafeRawPointer(bitPattern: UInt(start)), n << 12) }
        }
    }

    /// Splits `pageCount` pages from `address` into maximal runs of one kind (device
    /// memory or not): (start, pages, isDevice).
    private func forEachRun<E: Error>(address: UInt64, pageCount: Int, _ body: (UInt64, Int, Bool) throws(E) -> Void) throws(E) {
        let device = deviceMemory.withLock { $0 }
        let isDevice = { (page: Int) in device.contains { $0.contains(address + UInt64(page) << 12) } }
        var i = 0
        while i < pageCount {
            let kind = isDevice(i)
            var n = 1
            while i + n < pageCount, isDevice(i + n) == kind { n += 1 }
            try body(address + UInt64(i) << 12, n, kind)
            i += n
        }
    }

    public func resolve(address: UInt64, pageCount: Int, write: Bool, physical: inout [UInt64]) throws(HostMemoryError) {
        let advice = write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ
        let r = madvise(UnsafeMutableRawPointer(bitPattern: UInt(address)), pageCount << 12, advice)
        if r != 0 {
            let e = Glibc.errno
            let what = e == EFAULT || e == ENOMEM ? "not mapped" : e == EINVAL ? "not populatable (VM_PFNMAP/IO)" : "errno \(e)"
            throw HostMemoryError(address: address, reason: "MADV_POPULATE_\(write ? "WRITE" : "READ") of \(pageCount) pages failed: \(what)")
        }
        for i in 0..<pageCount { physical.append(address + UInt64(i) << 12) }
    }

    public func currentPhysical(of address: UInt64) -> UInt64? { address }
}

/// Device memory access through a translation: the only raw pointer use of the runtime's
/// data path. `phys` is a host virtual address (see the file header).
enum DMA {
    @inline(__always)
    static func load(_ phys: UInt64) -> UInt64 {
        UnsafeRawPointer(bitPattern: UInt(phys))!.loadUnaligned(as: UInt64.self)
    }

    @inline(__always)
    static func store(_ phys: UInt64, _ value: UInt64) {
        UnsafeMutableRawPointer(bitPattern: UInt(phys))!.storeBytes(of: value, as: UInt64.self)
    }

    /// Writes `byteCount` bytes (a multiple of 8) of `value`.
    static func fill(_ phys: UInt64, byteCount: Int, _ value: UInt64) {
        UnsafeMutableRawPointer(bitPattern: UInt(phys))!.bindMemory(to: UInt64.self, capacity: byteCount / 8)
            .update(repeating: value, count: byteCount / 8)
    }

    /// Reads `byteCount` bytes (a multiple of 8), as a device read would move them.
    @discardableResult
    static func touch(_ phys: UInt64, byteCount: Int) -> UInt64 {
        let words = UnsafeRawPointer(bitPattern: UInt(phys))!.bindMemory(to: UInt64.self, capacity: byteCount / 8)
        var x: UInt64 = 0
        for i in 0..<(byteCount / 8) { x ^= words[i] }
        return x
    }
}

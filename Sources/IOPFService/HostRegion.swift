// HostRegion.swift — real host memory for DMA that another process can reach (sealed
// memfds, each at a base in one physical address space), and the engine's `HostMemory`
// over this process's address space.
//
// In fault mode nothing is pinned or locked: resolving a page makes it resident with
// MADV_POPULATE_READ/WRITE (Linux 5.14+), one call per contiguous run. A translation's
// physical address is (region base + offset), so a device that mapped the region's memfd
// reaches exactly the page the translation names. Ranges are `[start, start + length)`.

import CIOPFShim
import Glibc
import Foundation
import IOPFCore
import IOPFSystem
import IOPFWire
import Synchronization
import SystemPackage

/// Host memory for DMA: a sealed memfd mapped shared at an aligned address, at a base of
/// its own in the physical address space (see `PhysicalSpace`). The memfd is what another
/// process maps to reach the same pages. `shared: false` gives plain anonymous private
/// memory instead (no fd, no physical address), for floors that need it.
public final class HostRegion: @unchecked Sendable {
    /// The region's address in this process.
    public let base: UInt64
    /// The region's length in bytes.
    public let length: UInt64
    /// The sealed memfd behind the region; -1 for anonymous memory. Owned by the region.
    package let fd: CInt
    /// The sealed memfd behind the region, owned by it (closed when it goes); nil for
    /// anonymous memory.
    public var descriptor: FileDescriptor? { fd >= 0 ? FileDescriptor(rawValue: fd) : nil }
    /// Where the region sits in the physical address space; nil for anonymous memory.
    public let phys: UInt64?
    /// False once the memory was moved away: the range is not the region's any more.
    private let ownsRange = Atomic<Bool>(true)

    /// Whether the region asked for transparent huge pages (MADV_HUGEPAGE).
    public let hugePages: Bool

    /// Maps `length` bytes at an address aligned to `alignment` (a power of two, at least
    /// 4 KiB), e.g. 2 MiB so that the I/O page table can use blocks. With `hugePages` the
    /// memory asks for 2 MiB pages (MADV_HUGEPAGE; see HugePages.enableForShmem).
    public init(
        length: UInt64, alignment: UInt64 = 4096, shared: Bool = true,
        hugePages: Bool = false
    ) throws(SystemCallError) {
        precondition(length > 0 && length & 0xFFF == 0, "region length \(length) must be a positive multiple of 4 KiB")
        precondition(
            alignment >= 4096 && alignment & (alignment - 1) == 0,
            "alignment \(alignment) must be a power of two >= 4 KiB")
        var fd: CInt = -1
        if shared {
            fd = try syscall("memfd_create") { iopf_memfd_create_sealable("iopf-host-memory") }
            do {
                _ = try syscall("ftruncate") { ftruncate(fd, off_t(length)) }
                _ = try syscall("fcntl(F_ADD_SEALS)") { iopf_seal_size(fd) }
            } catch {
                Sys.close(fd)
                throw error
            }
        }
        // Reserve with slack, then place the region at the aligned address inside it.
        let extra = alignment - 4096
        let p = mmap(nil, Int(length + extra), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard p != MAP_FAILED, let p else {
            if fd >= 0 { Sys.close(fd) }
            throw SystemCallError("mmap", .init(rawValue: Glibc.errno))
        }
        let raw = UInt64(UInt(bitPattern: p))
        base = (raw + extra) & ~(alignment - 1)
        let at = UnsafeMutableRawPointer(bitPattern: UInt(base))
        let placed =
            shared
            ? mmap(at, Int(length), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0)
            : mmap(
                at, Int(length), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0)
        guard placed == at else {
            let e = Glibc.errno
            munmap(p, Int(length + extra))
            if fd >= 0 { Sys.close(fd) }
            throw SystemCallError("mmap(MAP_FIXED)", .init(rawValue: e))
        }
        // Give back the slack on both sides.
        if base > raw { munmap(p, Int(base - raw)) }
        let tail = raw + length + extra - (base + length)
        if tail > 0 { munmap(UnsafeMutableRawPointer(bitPattern: UInt(base + length)), Int(tail)) }
        if hugePages && madvise(at, Int(length), MADV_HUGEPAGE) != 0 {
            let e = Glibc.errno
            munmap(at, Int(length))
            if fd >= 0 { Sys.close(fd) }
            throw SystemCallError("madvise(MADV_HUGEPAGE)", .init(rawValue: e))
        }
        self.hugePages = hugePages
        self.length = length
        self.fd = fd
        phys = shared ? PhysicalSpace.shared.add(host: base..<(base + length), alignment: max(alignment, 2 << 20)) : nil
    }

    deinit {
        if phys != nil { PhysicalSpace.shared.remove(host: base) }
        if ownsRange.load(ordering: .acquiring) { munmap(UnsafeMutableRawPointer(bitPattern: UInt(base)), Int(length)) }
        if fd >= 0 { Sys.close(fd) }
    }

    /// Says the memory was moved away whole (mremap without MREMAP_DONTUNMAP): the range
    /// is free again and may be mapped by another thread, so deinit must not unmap it.
    public func movedAway() { ownsRange.store(false, ordering: .releasing) }

    /// The address just past the region.
    public var end: UInt64 { base + length }

    /// The region as a device sees it: where it is in the physical address space.
    public var info: MemoryRegionInfo? { phys.map { MemoryRegionInfo(phys: $0, size: length) } }

    /// Bytes of the region now locked (mlock): the parts of it in mappings flagged `lo`
    /// (VM_LOCKED), as the process's VmLck counts them, but without the memory locked
    /// elsewhere in the process (another test, another mapping). Not the `Locked:` line,
    /// which is proportional: a page mapped twice counts half.
    public func lockedBytes() -> UInt64 {
        Sys.mappings(overlapping: base..<end).filter { $0.flags.contains("lo") }.reduce(0) { total, m in
            total + min(m.range.upperBound, end) - max(m.range.lowerBound, base)
        }
    }

    /// Bytes of the region now resident, by mincore(2).
    public func residentBytes() throws(SystemCallError) -> UInt64 {
        let pages = Int(length >> 12)
        var vec = [UInt8](repeating: 0, count: pages)
        _ = try syscall("mincore") { mincore(UnsafeMutableRawPointer(bitPattern: UInt(base)), Int(length), &vec) }
        return UInt64(vec.reduce(0) { $0 + Int($1 & 1) }) << 12
    }
}

/// The process's physical address space: every shared `HostRegion` gets a base here, so
/// that a translation's physical address means (region, offset) in every process that
/// maps the region's memfd, as guest-physical addresses do in vhost-user. Bases start at
/// 1 GiB, are never reused, and are separated by a 2 MiB hole, so an address that strays
/// past a region lands outside every region rather than in a neighbour.
///
/// Host addresses follow the pages: when `mremap` moves part of a region (a REMAP event),
/// the new range is entered as an alias of the same physical pages, ahead of whatever was
/// registered there before. A host that maps other memory over a region's range is not
/// followed: DMA through a translation still reaches the region's pages.
public final class PhysicalSpace: Sendable {
    /// The physical space of this process's regions.
    public static let shared = PhysicalSpace()

    private struct Entry {
        var host: Range<UInt64>
        var phys: UInt64
        var alias = false
    }

    private let state = Lock<(next: UInt64, entries: [Entry], free: [Range<UInt64>])>((1 << 30, [], []))

    func add(host: Range<UInt64>, alignment: UInt64) -> UInt64 {
        state.withLock { s in
            let phys = (s.next + alignment - 1) & ~(alignment - 1)
            s.next = phys + UInt64(host.count) + (2 << 20)
            s.entries.append(Entry(host: host, phys: phys))
            return phys
        }
    }

    /// Where reservations end: physical addresses must fit a page-table entry's address field.
    static let reservationLimit: UInt64 = 1 << 51

    /// A base for memory that is not this process's (a host's memfd): nothing is entered,
    /// the range is only never given to anything else while reserved. Ranges released by
    /// hosts that went are reused (first fit); nil when `size` does not fit below
    /// `reservationLimit`. Every sum is checked: `size` comes from another process.
    func reserve(size: UInt64) -> UInt64? {
        let alignment: UInt64 = 2 << 20
        // At most the limit less the guard gap, so that `limit - span - alignment` below
        // cannot wrap (an operator's --max-host-memory may be as large as it likes).
        guard size > 0, size <= Self.reservationLimit - alignment else { return nil }
        let span = (size + alignment - 1) & ~(alignment - 1)
        return state.withLock { s in
            if let i = s.free.firstIndex(where: { UInt64($0.count) >= span }) {
                let r = s.free[i]
                s.free[i] = (r.lowerBound + span)..<r.upperBound
                if s.free[i].isEmpty { s.free.remove(at: i) }
                return r.lowerBound
            }
            let phys = (s.next + alignment - 1) & ~(alignment - 1)
            guard phys <= Self.reservationLimit - span - alignment else { return nil }
            s.next = phys + span + alignment
            return phys
        }
    }

    /// Gives back a range `reserve(size:)` returned, once nothing can translate to it.
    func release(_ phys: UInt64, size: UInt64) {
        let alignment: UInt64 = 2 << 20
        let span = (size + alignment - 1) & ~(alignment - 1)
        state.withLock { s in
            s.free.append(phys..<(phys + span))
            s.free.sort { $0.lowerBound < $1.lowerBound }
            // Neighbours merge, so that a host that comes and goes does not fragment the space.
            var merged: [Range<UInt64>] = []
            for r in s.free {
                if let last = merged.last, last.upperBound >= r.lowerBound {
                    merged[merged.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
                } else {
                    merged.append(r)
                }
            }
            s.free = merged
        }
    }

    func remove(host base: UInt64) {
        state.withLock { s in
            guard let i = s.entries.firstIndex(where: { !$0.alias && $0.host.lowerBound == base }) else { return }
            let gone = s.entries.remove(at: i)
            let phys = gone.phys..<(gone.phys + UInt64(gone.host.count))
            // Aliases into the region's pages, or at its addresses, go with it.
            s.entries.removeAll { $0.alias && (phys.contains($0.phys) || gone.host.contains($0.host.lowerBound)) }
        }
    }

    /// `mremap` moved `[from, from + length)` to `to` (a REMAP event).
    package func moved(from: UInt64, to: UInt64, length: UInt64) {
        state.withLock { s in
            guard let source = s.entries.first(where: { $0.host.contains(from) }),
                from + length <= source.host.upperBound
            else { return }
            let target = to..<(to + length)
            s.entries.removeAll {
                $0.alias && target.contains($0.host.lowerBound) && $0.host.upperBound <= target.upperBound
            }
            s.entries.insert(
                Entry(host: target, phys: source.phys + (from - source.host.lowerBound), alias: true), at: 0)
        }
    }

    /// The physical address of host address `address`; nil outside every shared region.
    public func physical(of address: UInt64) -> UInt64? {
        state.withLock { s in
            for e in s.entries where e.host.contains(address) { return e.phys + (address - e.host.lowerBound) }
            return nil
        }
    }

    /// The physical address of `pages` consecutive pages from `address`, all inside one region.
    func physicalRun(of address: UInt64, pages: Int) -> UInt64? {
        state.withLock { s in
            for e in s.entries where e.host.contains(address) {
                guard address + UInt64(pages) << 12 <= e.host.upperBound else { return nil }
                return e.phys + (address - e.host.lowerBound)
            }
            return nil
        }
    }
}

/// RLIMIT_MEMLOCK and CAP_IPC_LOCK of this process, for the pinned path's accounting.
public enum LockedMemoryLimits {
    /// This process's `RLIMIT_MEMLOCK` in bytes, and whether it has CAP_IPC_LOCK.
    public static func current() -> (limitBytes: UInt64, capIPCLock: Bool) {
        var limit = rlimit()
        let bytes = getrlimit(__rlimit_resource_t(__RLIMIT_MEMLOCK.rawValue), &limit) == 0 ? UInt64(limit.rlim_cur) : 0
        // CapEff is a hex mask; CAP_IPC_LOCK is bit 14.
        let status = (Sys.readText("/proc/self/status")) ?? ""
        let capEff =
            status.split(separator: "\n").first { $0.hasPrefix("CapEff:") }
            .flatMap { UInt64($0.split(separator: "\t").last ?? "", radix: 16) } ?? 0
        return (bytes, capEff & (1 << 14) != 0)
    }
}

/// The engine's view of this process's memory.
public final class ProcessMemory: HostMemory {
    /// Ranges standing for device memory (MMIO-like, no page backing): pinned mappings map
    /// them but never lock or charge them (the "vfio/type1: avoid redundant PageReserved checking" thread).
    private let deviceMemory = Lock<[Range<UInt64>]>([])
    /// Pins per page: mlock does not count, so aliased pinned mappings must.
    private let pins = Lock(PinCounts())
    /// Fault injection: `madvise` and `mlock` failures planted by tests.
    public let planted = PlantedFailures()
    /// Attempts at populating a run when the kernel answers EINTR or EAGAIN.
    static let populateTries = 3

    /// Whether resolving touches pages (asked for, and the signal handlers are in place).
    let probes: Bool
    /// A touch that took longer than this faulted (present: about 15 ns; a fault: 1 us
    /// and more).
    static let faultNanoseconds: UInt64 = 400

    /// With `touchingPages` (the default) the first instance installs SIGSEGV and SIGBUS
    /// handlers for the process, which pass every fault outside a probe on to the handler
    /// installed before them (probe.c). A program that installs its own handlers later must
    /// chain to the previous ones, as usual, or pass false: resolving then always asks
    /// the kernel (`MADV_POPULATE_*`).
    public init(touchingPages: Bool = true) {
        probes = touchingPages && iopf_probe_install() == 0
    }

    /// Marks `range` as device memory: pinned without locking or charging it.
    public func markDeviceMemory(_ range: Range<UInt64>) {
        deviceMemory.withLock { $0.append(range) }
    }

    /// Locks normal pages with mlock(2), one call per run of one kind; device memory is
    /// only described. On failure it unlocks what it locked (and no other pin holds) and
    /// says why. mlock and munlock run under `pins`, so a concurrent unpin cannot unlock
    /// pages between another pin's mlock and its count.
    public func pin(address: UInt64, pageCount: Int, into pages: inout [PinnedPage]) throws(HostMemoryError) {
        try pins.withLock { (pins: inout PinCounts) throws(HostMemoryError) in
            var locked: [Range<UInt64>] = []
            func undo() {
                for r in locked { pins.add(r) }
                for r in locked { for free in pins.remove(r) { Self.munlock(free) } }
            }
            try forEachRun(address: address, pageCount: pageCount) { (start, n, isDevice) throws(HostMemoryError) in
                if !isDevice {
                    let planted = planted.take(.mlock) ?? 0
                    if planted != 0 || iopf_mlock(UnsafeRawPointer(bitPattern: UInt(start)), n << 12) != 0 {
                        let e = planted != 0 ? planted : Glibc.errno
                        undo()
                        let why =
                            switch e {
                            case ENOMEM:
                                "mlock: over RLIMIT_MEMLOCK without CAP_IPC_LOCK, or part of the range is not mapped"
                            case EAGAIN: "mlock: some pages could not be locked"
                            case EPERM: "mlock: not permitted (no CAP_IPC_LOCK and RLIMIT_MEMLOCK is 0)"
                            default: "mlock: errno \(e)"
                            }
                        throw HostMemoryError(address: start, reason: why)
                    }
                    locked.append(start..<(start + UInt64(n) << 12))
                }
                // Device memory stands for itself; normal memory must be in a shared region.
                guard let phys = isDevice ? start : PhysicalSpace.shared.physicalRun(of: start, pages: n) else {
                    undo()
                    throw HostMemoryError(
                        address: start, reason: "not inside a shared host region (no physical address)")
                }
                for k in 0..<n { pages.append(PinnedPage(phys: phys + UInt64(k) << 12, chargeable: !isDevice)) }
            }
            for r in locked { pins.add(r) }
        }
    }

    /// Drops one pin of each page; unlocks only pages no other pinned mapping holds.
    public func unpin(address: UInt64, pageCount: Int) {
        pins.withLock { pins in
            forEachRun(address: address, pageCount: pageCount) { start, n, isDevice in
                if !isDevice { for free in pins.remove(start..<(start + UInt64(n) << 12)) { Self.munlock(free) } }
            }
        }
    }

    /// Pins held on the page at `address` (for tests and checks).
    public func pinCount(at address: UInt64) -> Int { pins.withLock { $0.count(at: address) } }

    private static func munlock(_ r: Range<UInt64>) {
        _ = iopf_munlock(UnsafeRawPointer(bitPattern: UInt(r.lowerBound)), Int(r.upperBound - r.lowerBound))
    }

    /// Splits `pageCount` pages from `address` into maximal runs of one kind (device
    /// memory or not): (start, pages, isDevice).
    private func forEachRun<E: Error>(address: UInt64, pageCount: Int, _ body: (UInt64, Int, Bool) throws(E) -> Void)
        throws(E)
    {
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

    /// Confirms the pages exist (`confirm`) and gives their physical addresses.
    public func resolve(address: UInt64, pageCount: Int, write: Bool, physical: inout [UInt64]) throws(HostMemoryError)
    {
        try Self.confirm(address: address, pageCount: pageCount, write: write, probes: probes, planted: planted)
        guard let phys = PhysicalSpace.shared.physicalRun(of: address, pages: pageCount) else {
            throw HostMemoryError(address: address, reason: "not inside a shared host region (no physical address)")
        }
        for i in 0..<pageCount { physical.append(phys + UInt64(i) << 12) }
    }

    /// Confirms pages of this process exist by touching them (probe.c): a page already in
    /// the page table costs a load, not a system call. A run whose page took as long as a
    /// fault hands the rest to one `MADV_POPULATE_*` call, which faults in missing pages
    /// faster than one touch each; so does a probe that raised a signal, for the errno.
    /// Neither takes a lock another process can hold (no inode lock, unlike fallocate):
    /// hosts' memfds mapped into the service are confirmed this way too.
    static func confirm(
        address: UInt64, pageCount: Int, write: Bool, probes: Bool,
        planted: PlantedFailures?
    ) throws(HostMemoryError) {
        var injected = planted?.take(.madvise) ?? 0
        var rest = (address: address, pages: pageCount)
        if probes && injected == 0 {
            let touched = iopf_probe_pages(
                UnsafeRawPointer(bitPattern: UInt(address)), pageCount, write ? 1 : 0,
                pageCount > 1 ? Self.faultNanoseconds : 0)
            if touched > 0 { rest = (address + UInt64(touched) << 12, pageCount - touched) }
        }
        let advice = write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ
        var tries = 0
        while rest.pages > 0 {
            let start = UnsafeMutableRawPointer(bitPattern: UInt(rest.address))
            if injected == 0 && madvise(start, rest.pages << 12, advice) == 0 { break }
            let e = injected != 0 ? injected : Glibc.errno
            tries += 1
            // A signal or a transiently busy kernel: try again, a few times.
            if (e == EINTR || e == EAGAIN) && tries < Self.populateTries {
                injected = planted?.take(.madvise) ?? 0
                continue
            }
            let what =
                switch e {
                case EFAULT: "populating failed (not mapped, or a fault the kernel could not serve)"
                case ENOMEM: "not mapped, or out of memory"
                case EINVAL: "not populatable (VM_PFNMAP/IO)"
                case EHWPOISON: "hardware-poisoned page"
                case EINTR, EAGAIN: "interrupted or busy \(tries) times (errno \(e))"
                default: "errno \(e)"
                }
            throw HostMemoryError(
                address: rest.address,
                reason: "MADV_POPULATE_\(write ? "WRITE" : "READ") of \(rest.pages) pages: \(what)")
        }
    }

    public func currentPhysical(of address: UInt64) -> UInt64? { PhysicalSpace.shared.physical(of: address) }

    /// A 2 MiB block backed by one huge page (pagemap and kpageflags, HugePages.swift).
    public func hugeBlock(at address: UInt64) -> UInt64? {
        guard HugePages.backsBlock(at: address) else { return nil }
        return PhysicalSpace.shared.physicalRun(of: address, pages: 512)
    }

    /// mincore(2) on the shared region's memfd pages: a resident page is in its page
    /// cache, the page the region's physical address names. Nothing faulted in; on
    /// failure, none.
    public func residentPages(address: UInt64, pageCount: Int, into resident: inout [UInt64?]) {
        var vector = [UInt8](repeating: 0, count: pageCount)
        let r = vector.withUnsafeMutableBufferPointer {
            mincore(UnsafeMutableRawPointer(bitPattern: UInt(address)), pageCount << 12, $0.baseAddress)
        }
        let phys = r == 0 ? PhysicalSpace.shared.physicalRun(of: address, pages: pageCount) : nil
        for (i, v) in vector.enumerated() { resident.append(phys != nil && v & 1 != 0 ? phys! + UInt64(i) << 12 : nil) }
    }
}

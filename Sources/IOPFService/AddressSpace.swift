// AddressSpace.swift — the address spaces the loop serves. Space 0 is the service's own
// memory (its engine, its domains, its userfaultfd, registered by `FaultService.map`);
// every other is a host's in another process (protocol 1.1): its own engine and domain,
// its memory reached through the memfds it sent, and its userfaultfd, on which the service
// registers the host's ranges so that the host's madvise/munmap/mremap become
// invalidations. Both are `AddressSpace`s: one event path (`EventLoop.readEvents`,
// `handle(_:in:)`), one device registry, one fence key. The loop's side of a host
// (messages, teardown) is HostPeer.swift.
//
// Trust: nothing the host says is taken on faith. The uffd must be a userfaultfd that went
// through UFFDIO_API with EVENT_REMOVE | EVENT_UNMAP | EVENT_REMAP (and without EVENT_FORK,
// whose events would hand the service new descriptors), read from /proc/self/fdinfo
// because a uffd's API cannot be asked twice. Each memfd must be a 4 KiB-page memfd sealed
// against shrinking, so a device that maps it never takes SIGBUS. Each region must really
// be the host's memory: after registering it, the service reads /proc/PID/maps of the
// host (SO_PEERCRED) and checks the range is mapped shared from that memfd at that offset.
//
// Memory: the service maps each memfd (shared, no reserve) and confirms a fault's pages by
// touching them there, as for its own memory (probe.c): no system call on the host's file,
// whose inode lock the host can hold (a write(2) into the memfd stalled fallocate for as
// long as the host liked). A translation names (memfd, offset) as a physical address in
// the process-wide `PhysicalSpace`, where each memfd has a range of its own, reserved at
// HOST and released at teardown: a device of another host, which has not mapped this
// memfd, can reach none of it. Sizes are the host's word: every sum is checked, and the
// memfds of one host hold at most its budget (`maxHostMemoryBytes`).
//
// Reads of the host's uffd use preadv2(RWF_NOWAIT): the host shares the file and could
// clear O_NONBLOCK, and the loop must never block on it.
//
// All of this runs on the loop thread.

import CIOPFShim
import Foundation
import Glibc
import IOPFCore
import IOPFSystem
import IOPFWire

/// Why a host's declaration or request is refused: an errno for the reply, a stable kind
/// for the statistics, and a sentence for the host's operator.
struct HostRefusal: Error, CustomStringConvertible {
    var errno: UInt32
    var kind: ProtocolErrorKind
    var description: String

    init(_ errno: UInt32, _ kind: ProtocolErrorKind, _ description: String) {
        self.errno = errno
        self.kind = kind
        self.description = description
    }
}

/// A host's userfaultfd, owned by the service once received.
final class HostUserfaultfd: UserfaultfdReading {
    let fd: CInt
    /// The ranges the service registered and the host has not given up since.
    private(set) var registered = RangeTable<Bool> { v, _ in v }
    private var closed = false

    /// Takes `fd` (closed on a throw too) after checking it is a usable userfaultfd.
    init(adopting fd: CInt) throws(HostRefusal) {
        self.fd = fd
        do throws(HostRefusal) {
            let link = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)")) ?? "?"
            guard link == "anon_inode:[userfaultfd]" else {
                throw HostRefusal(
                    WireErrno.badFD, .badUserfaultfd, "the first descriptor of HOST must be a userfaultfd, got \(link)")
            }
            let info = (Sys.readText("/proc/self/fdinfo/\(fd)")) ?? ""
            // "API:\t<api>:<features>:<ioctls>", all hex.
            let api = info.split(separator: "\n").first { $0.hasPrefix("API:") }?.dropFirst(4).split(separator: ":")
            guard let api, api.count == 3,
                let features = UInt64(api[1].trimmingCharacters(in: .whitespaces), radix: 16)
            else {
                throw HostRefusal(
                    WireErrno.badFD, .badUserfaultfd, "cannot read the userfaultfd's features from /proc/self/fdinfo")
            }
            let missing = UserfaultfdSource.wanted.filter { features & $0.0 == 0 }.map(\.1)
            guard missing.isEmpty else {
                throw HostRefusal(
                    WireErrno.invalid, .badUserfaultfd,
                    """
                    the userfaultfd lacks \(missing.joined(separator: ", ")): pass UFFD_FEATURE_EVENT_REMOVE | \
                    EVENT_UNMAP | EVENT_REMAP to UFFDIO_API before sending it
                    """
                )
            }
            guard features & UInt64(UFFD_FEATURE_EVENT_FORK) == 0 else {
                throw HostRefusal(
                    WireErrno.invalid, .badUserfaultfd,
                    """
                    the userfaultfd has EVENT_FORK: its events would hand the service descriptors; negotiate \
                    without it
                    """
                )
            }
        } catch {
            Sys.close(fd)
            throw error
        }
    }

    /// Registers `range` (again: registering a registered range is harmless, and is how a
    /// range that mmap(MAP_FIXED) replaced is watched again).
    func register(_ range: Range<UInt64>) throws(UserfaultfdError) {
        try UserfaultfdSource.register(fd, start: range.lowerBound, length: UInt64(range.count))
        registered.insert(range, true)
    }

    /// The host unmapped or moved `range`: the kernel dropped its registration with the VMA.
    func forget(_ range: Range<UInt64>) {
        registered.cut(range)
    }

    /// Reads pending events into `buffer`; 0 when there are none. Never blocks.
    func drain(into buffer: UnsafeMutableRawBufferPointer) throws(SystemCallError) -> Int {
        let n = iopf_read_nowait(fd, buffer.baseAddress, buffer.count)
        if n >= 0 { return n }
        let e = Glibc.errno
        if e == EAGAIN { return 0 }
        throw SystemCallError("read(userfaultfd)", .init(rawValue: e))
    }

    /// Lets the host go on without the service: unregisters every range (the host may hold
    /// its own copy of the uffd, so closing ours would not), reads whatever events are
    /// still queued so no host thread waits for them, and closes. Idempotent.
    func release(scratch: UnsafeMutableRawBufferPointer) {
        guard !closed else { return }
        closed = true
        for e in registered.entries { _ = iopf_uffd_unregister(fd, e.range.lowerBound, UInt64(e.range.count)) }
        registered = RangeTable { v, _ in v }
        for _ in 0..<1024 {
            guard let n = try? drain(into: scratch), n > 0 else { break }
        }
        Sys.close(fd)
    }
}

/// A host's memory as the engine reaches it: host address → (memfd, offset), by bindings
/// that the service verified against /proc/PID/maps.
final class RemoteHostMemory: HostMemory, @unchecked Sendable {
    struct Memfd {
        let fd: CInt
        let size: UInt64
        let phys: UInt64
        /// Where the service mapped the memfd (shared): pages are confirmed by touching
        /// them here, never by a system call on the host's file.
        let base: UInt64
        let device: (major: UInt32, minor: UInt32)
        let inode: UInt64
        /// 4 KiB, or 2 MiB for a hugetlbfs memfd (MFD_HUGETLB).
        let pageSize: UInt64
    }

    struct Binding: Equatable {
        var host: Range<UInt64>
        var memfd: Int
        var offset: UInt64
    }

    /// Seals a host's memfd must carry: no shrink (a device would fault), no grow (the
    /// service's budget holds), no further seals (a device that is handed the memfd cannot
    /// seal its host's memory against writing).
    static let requiredSeals: Int32 = sealShrink | sealGrow | sealSeal
    static let (sealSeal, sealShrink, sealGrow, sealWrite, sealFutureWrite): (Int32, Int32, Int32, Int32, Int32) =
        (0x1, 0x2, 0x4, 0x8, 0x10)

    let memfds: [Memfd]
    let probes: Bool
    /// The sum of the memfds' sizes.
    let bytes: UInt64
    /// Where a bound host range starts in the memfds.
    struct Place: Equatable {
        var memfd: Int
        var offset: UInt64
    }

    private let bindings = Lock(RangeTable<Place> { Place(memfd: $0.memfd, offset: $0.offset + $1) })
    /// Pins per page of the service's mappings, and the runs pinned by host address.
    private let pins = Lock(PinCounts())
    private let pinned = Lock<[(host: Range<UInt64>, service: UInt64)]>([])

    /// Takes the memfds (all closed on a throw) after checking each one, and maps each
    /// into the service. `budget`: the bytes all of them may hold together.
    init(adopting fds: [CInt], budget: UInt64, probes: Bool) throws(HostRefusal) {
        var checked: [Memfd] = []
        var total: UInt64 = 0
        do throws(HostRefusal) {
            for (k, fd) in fds.enumerated() {
                let st = try Self.inspect(fd, "memfd \(k)", kind: .badMemfd, hugePages: true)
                let seals = iopf_seals(fd)
                guard seals >= 0, seals & Self.requiredSeals == Self.requiredSeals else {
                    throw HostRefusal(
                        WireErrno.notPermitted, .badMemfd,
                        "memfd \(k) is not sealed with F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL "
                            + "(seals \(hex(UInt64(max(seals, 0))))): without them a device handed the memfd "
                            + "could shrink, grow or seal its host's memory")
                }
                guard seals & (Self.sealWrite | Self.sealFutureWrite) == 0 else {
                    throw HostRefusal(
                        WireErrno.notPermitted, .badMemfd,
                        "memfd \(k) is sealed against writing: devices could not DMA to it")
                }
                let size = UInt64(max(st.st_size, 0))
                let (sum, overflow) = total.addingReportingOverflow(size)
                guard !overflow, sum <= budget else {
                    throw HostRefusal(
                        WireErrno.noSpace, .hostMemoryBudget,
                        "the memfds hold more than this host's budget of \(hex(budget)) bytes (--max-host-memory): "
                            + "memfd \(k) has \(hex(size))")
                }
                total = sum
                let span = max(size, 4096)
                guard let phys = PhysicalSpace.shared.reserve(size: span) else {
                    throw HostRefusal(
                        WireErrno.noSpace, .hostMemoryBudget,
                        "no physical range of \(hex(span)) bytes is left for memfd \(k)")
                }
                let mapped = mmap(nil, Int(span), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0)
                guard let mapped, mapped != MAP_FAILED else {
                    let e = Glibc.errno
                    PhysicalSpace.shared.release(phys, size: span)
                    throw HostRefusal(
                        WireErrno.noSpace, .badMemfd,
                        "cannot map memfd \(k) (\(hex(size)) bytes) into the service: errno \(e)")
                }
                let dev = UInt64(st.st_dev)
                checked.append(
                    Memfd(
                        fd: fd, size: size, phys: phys, base: UInt64(UInt(bitPattern: mapped)),
                        device: (
                            UInt32((dev >> 8) & 0xFFF | (dev >> 32) & ~0xFFF), UInt32(dev & 0xFF | (dev >> 12) & ~0xFF)
                        ),
                        inode: UInt64(st.st_ino), pageSize: UInt64(st.st_blksize)))
            }
        } catch {
            Self.unmap(checked)
            for fd in fds { Sys.close(fd) }
            throw error
        }
        memfds = checked
        bytes = total
        self.probes = probes
    }

    /// Checks that `fd` is a memfd of 4 KiB pages, or of 2 MiB hugetlbfs pages when
    /// `hugePages`; its stat. `what` names it in the refusal.
    static func inspect(_ fd: CInt, _ what: String, kind: ProtocolErrorKind, hugePages: Bool = false)
        throws(HostRefusal) -> stat
    {
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG else {
            throw HostRefusal(WireErrno.badFD, kind, "\(what) is not a regular file")
        }
        let link = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)")) ?? ""
        guard link.hasPrefix("/memfd:") else {
            throw HostRefusal(WireErrno.badFD, kind, "\(what) is not a memfd (\(link))")
        }
        guard st.st_blksize == 4096 || (hugePages && st.st_blksize == hugeBlockBytes) else {
            throw HostRefusal(
                WireErrno.invalid, kind,
                "\(what) has \(st.st_blksize)-byte pages: "
                    + (hugePages ? "4 KiB or 2 MiB (hugetlbfs) pages are supported" : "only 4 KiB pages are supported"))
        }
        return st
    }

    /// Unmaps, gives back the physical ranges and closes. Once: the space is torn down.
    func close() {
        Self.unmap(memfds)
        for m in memfds { Sys.close(m.fd) }
    }

    private static func unmap(_ memfds: [Memfd]) {
        for m in memfds {
            munmap(UnsafeMutableRawPointer(bitPattern: UInt(m.base)), Int(max(m.size, 4096)))
            PhysicalSpace.shared.release(m.phys, size: max(m.size, 4096))
        }
    }

    /// The regions as a device maps them: one per memfd, at its physical base.
    var deviceRegions: [(MemoryRegionInfo, CInt)] {
        memfds.filter { $0.size > 0 }.map { (MemoryRegionInfo(phys: $0.phys, size: $0.size), $0.fd) }
    }

    func bind(_ pieces: [Binding]) {
        bindings.withLock { b in
            for p in pieces { b.insert(p.host, Place(memfd: p.memfd, offset: p.offset)) }
        }
    }

    /// The host unmapped or moved `range`: it no longer reaches the memfds there.
    func forget(_ range: Range<UInt64>) {
        bindings.withLock { $0.cut(range) }
    }

    /// True when every page of `range` is bound.
    func covers(_ range: Range<UInt64>) -> Bool {
        bindings.withLock { $0.covers(range) }
    }

    /// Bound host ranges (kept pruned: for tests and footprints).
    var bindingCount: Int { bindings.withLock { $0.count } }

    private func locate(_ address: UInt64, pages: Int) -> (Memfd, UInt64)? {
        bindings.withLock { b in
            guard let x = b.entry(containing: address), address + UInt64(pages) << 12 <= x.range.upperBound else {
                return nil
            }
            return (memfds[x.value.memfd], x.value.offset + (address - x.range.lowerBound))
        }
    }

    /// Touches the pages through the service's own mapping of the memfd: never a system
    /// call on the host's file, whose inode lock the host can hold as long as it likes.
    func resolve(address: UInt64, pageCount: Int, write: Bool, physical: inout [UInt64]) throws(HostMemoryError) {
        guard let (m, offset) = locate(address, pages: pageCount) else {
            throw HostMemoryError(
                address: address, reason: "not the host's memory now (unmapped, moved, or outside its regions)")
        }
        do {
            try ProcessMemory.confirm(
                address: m.base + offset, pageCount: pageCount, write: write, probes: probes,
                planted: nil)
        } catch {
            throw HostMemoryError(
                address: address,
                reason: "the host's memfd at offset \(hex(offset)): \(error.reason)")
        }
        for i in 0..<pageCount { physical.append(m.phys + offset + UInt64(i) << 12) }
    }

    /// Whether any memfd is of 2 MiB pages: the host's engine then maps 2 MiB blocks on fault.
    var hasHugePages: Bool { memfds.contains { $0.pageSize == hugeBlockBytes } }

    /// The 2 MiB block at `address` when one huge page of a hugetlbfs memfd backs it: the
    /// engine asks after resolving the block's pages, which faulted the huge page in.
    func hugeBlock(at address: UInt64) -> UInt64? {
        guard let (m, offset) = locate(address, pages: hugeBlockPages), m.pageSize == hugeBlockBytes,
            offset & (hugeBlockBytes - 1) == 0
        else { return nil }
        return m.phys + offset
    }

    func currentPhysical(of address: UInt64) -> UInt64? {
        locate(address & ~0xFFF, pages: 1).map { $0.0.phys + $0.1 + (address & 0xFFF) }
    }

    /// Pins through the service's own mapping of the memfds (mlock, the raw system call:
    /// sanitizers make the libc one a no-op), as VFIO type1 pins the VMM's pages. Runs on
    /// a pinning worker, never the loop (HostPinning.swift). Each pinned run is kept by
    /// its host address so that `unpin` finds its pages after the host moved or unmapped
    /// them (and `movePins` after a VADDR update).
    func pin(address: UInt64, pageCount: Int, into pages: inout [PinnedPage]) throws(HostMemoryError) {
        var done: [(host: Range<UInt64>, service: UInt64)] = []
        var cursor = address
        let end = address + UInt64(pageCount) << 12
        do throws(HostMemoryError) {
            while cursor < end {
                let piece = bindings.withLock { b -> (Memfd, UInt64, UInt64)? in
                    guard let x = b.entry(containing: cursor) else { return nil }
                    let length = min(x.range.upperBound, end) - cursor
                    return (memfds[x.value.memfd], x.value.offset + (cursor - x.range.lowerBound), length)
                }
                guard let (m, offset, length) = piece else {
                    throw HostMemoryError(
                        address: cursor, reason: "not the host's memory now (unmapped, moved, or outside its regions)")
                }
                let service = m.base + offset
                try pins.withLock { (pins: inout PinCounts) throws(HostMemoryError) in
                    guard iopf_mlock(UnsafeRawPointer(bitPattern: UInt(service)), Int(length)) == 0 else {
                        let e = Glibc.errno
                        throw HostMemoryError(
                            address: cursor,
                            reason: e == ENOMEM || e == EAGAIN
                                ? "the host's memfd could not be locked in memory (errno \(e): no memory for it)"
                                : "mlock of the host's memfd: errno \(e)")
                    }
                    pins.add(service..<(service + length))
                }
                done.append((cursor..<(cursor + length), service))
                for i in 0..<Int(length >> 12) {
                    pages.append(PinnedPage(phys: m.phys + offset + UInt64(i) << 12, chargeable: true))
                }
                cursor += length
            }
        } catch {
            release(done)
            throw error
        }
        pinned.withLock { $0 += done }
    }

    func unpin(address: UInt64, pageCount: Int) {
        let range = address..<(address + UInt64(pageCount) << 12)
        let taken = pinned.withLock { runs in
            let inside = runs.filter { range.contains($0.host.lowerBound) }
            runs.removeAll { range.contains($0.host.lowerBound) }
            return inside
        }
        release(taken)
    }

    /// A pinned mapping's host address changed (DMA_MAP with VADDR): its runs follow it.
    func movePins(from old: UInt64, to new: UInt64, size: UInt64) {
        pinned.withLock { runs in
            for i in runs.indices where (old..<(old + size)).contains(runs[i].host.lowerBound) {
                let start = runs[i].host.lowerBound - old + new
                runs[i].host = start..<(start + UInt64(runs[i].host.count))
            }
        }
    }

    private func release(_ runs: [(host: Range<UInt64>, service: UInt64)]) {
        pins.withLock { pins in
            for r in runs {
                for free in pins.remove(r.service..<(r.service + UInt64(r.host.count))) {
                    _ = iopf_munlock(UnsafeRawPointer(bitPattern: UInt(free.lowerBound)), free.count)
                }
            }
        }
    }
}

/// /proc/PID/maps of a host, to check that a range really is the host's memfd memory.
enum HostMaps {
    struct Line {
        var range: Range<UInt64>
        var shared: Bool
        var offset: UInt64
        var device: (major: UInt32, minor: UInt32)
        var inode: UInt64
    }

    static func read(pid: Int32) throws(HostRefusal) -> [Line] {
        guard pid > 0, let text = Sys.readText("/proc/\(pid)/maps") else {
            throw HostRefusal(
                WireErrno.notPermitted, .unverifiable, "cannot read /proc/\(pid)/maps to check the host's memory")
        }
        return text.split(separator: "\n").compactMap(parse)
    }

    /// "start-end perms offset major:minor inode [path]".
    static func parse(_ line: Substring) -> Line? {
        let f = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
        guard f.count >= 5 else { return nil }
        let bounds = f[0].split(separator: "-")
        let dev = f[3].split(separator: ":")
        guard bounds.count == 2, dev.count == 2, let lo = UInt64(bounds[0], radix: 16),
            let hi = UInt64(bounds[1], radix: 16),
            lo < hi, let offset = UInt64(f[2], radix: 16), let major = UInt32(dev[0], radix: 16),
            let minor = UInt32(dev[1], radix: 16), let inode = UInt64(f[4])
        else { return nil }
        return Line(
            range: lo..<hi, shared: f[1].count == 4 && f[1].last == "s", offset: offset, device: (major, minor),
            inode: inode)
    }

    /// How `range` is backed in process `pid`. Asked VMA by VMA with PROCMAP_QUERY (Linux
    /// 6.11), which reads each one atomically: the text of /proc/PID/maps is printed a chunk
    /// at a time and, while other threads of the host change their mappings, can miss the
    /// very line asked for. The text is the fallback on older kernels.
    static func backing(of range: Range<UInt64>, pid: Int32, memfds: [RemoteHostMemory.Memfd])
        -> Result<[RemoteHostMemory.Binding], HostRefusal>
    {
        let fd = pid > 0 ? open("/proc/\(pid)/maps", O_RDONLY | O_CLOEXEC) : -1
        guard fd >= 0 else {
            return .failure(
                HostRefusal(
                    WireErrno.notPermitted, .unverifiable, "cannot open /proc/\(pid)/maps to check the host's memory"))
        }
        defer { Sys.close(fd) }
        var lines: [Line] = []
        var cursor = range.lowerBound
        while cursor < range.upperBound {
            var vma = iopf_vma()
            if iopf_procmap_query(fd, cursor, &vma) != 0 {
                if Glibc.errno == ENOENT { break }  // not mapped: `backing(of:in:)` says so
                do { return backing(of: range, in: try read(pid: pid), memfds: memfds) } catch {
                    return .failure(error)
                }
            }
            lines.append(
                Line(
                    range: vma.start..<vma.end, shared: vma.shared != 0, offset: vma.offset,
                    device: (vma.dev_major, vma.dev_minor), inode: vma.inode))
            cursor = vma.end
        }
        return backing(of: range, in: lines, memfds: memfds)
    }

    /// How `range` is backed by `memfds`, piece by piece; the reason when some of it is not
    /// mapped shared from one of them.
    static func backing(of range: Range<UInt64>, in lines: [Line], memfds: [RemoteHostMemory.Memfd])
        -> Result<[RemoteHostMemory.Binding], HostRefusal>
    {
        var pieces: [RemoteHostMemory.Binding] = []
        var cursor = range.lowerBound
        func notHost(_ why: String) -> Result<[RemoteHostMemory.Binding], HostRefusal> {
            .failure(
                HostRefusal(
                    WireErrno.fault, .notHostMemory,
                    "[\(hex(range.lowerBound)), \(hex(range.upperBound))) is not the host's memory: \(why)"))
        }
        while cursor < range.upperBound {
            guard let l = lines.first(where: { $0.range.contains(cursor) }) else {
                return notHost("\(hex(cursor)) is not mapped")
            }
            guard let k = memfds.firstIndex(where: { $0.inode == l.inode && $0.device == l.device }) else {
                return notHost("\(hex(cursor)) is mapped from inode \(l.inode), none of the memfds sent")
            }
            guard l.shared else { return notHost("\(hex(cursor)) is a private mapping of memfd \(k)") }
            let end = min(l.range.upperBound, range.upperBound)
            let offset = l.offset + (cursor - l.range.lowerBound)
            guard offset + (end - cursor) <= memfds[k].size else {
                return notHost("\(hex(cursor)) maps memfd \(k) beyond its size")
            }
            if var last = pieces.last, last.memfd == k, last.host.upperBound == cursor,
                last.offset + UInt64(last.host.count) == offset
            {
                last.host = last.host.lowerBound..<end
                pieces[pieces.count - 1] = last
            } else {
                pieces.append(RemoteHostMemory.Binding(host: cursor..<end, memfd: k, offset: offset))
            }
            cursor = end
        }
        return .success(pieces)
    }
}

/// An address space the loop serves: its engine and fault handler, the userfaultfd whose
/// events invalidate it, and the devices and vhost-user back-ends attached to it. Space 0
/// is the service's own memory (mapped by `FaultService.map`, any number of domains,
/// watched by the service's userfaultfd); every other is a host's, handed over by HOST,
/// and carries what the host gave (`host`). One type, so that one event path, one
/// registry and one fence key serve both.
final class AddressSpace {
    /// What a host handed over: its memory, its userfaultfd, who it is.
    final class Host {
        let domain: DomainID
        let memory: RemoteHostMemory
        let uffd: HostUserfaultfd
        let pid: Int32
        /// The host's uid (SO_PEERCRED): its name is unique among its uid's hosts, and its
        /// devices must have this uid or one of `allowedUIDs`.
        let uid: UInt32
        let allowedUIDs: [UInt32]
        unowned let peer: Peer
        /// Bytes of its DMA mappings, against `maxHostMappedBytes`.
        var mappedBytes: UInt64 = 0
        /// Ranges DIRTY_START started and no DIRTY_STOP stopped, at most `DirtyLimits.maxRanges`.
        var dirtyRanges: [Range<UInt64>] = []
        /// A DIRTY_READ waits for its devices: the next is refused until it is answered.
        var dirtyReadPending = false
        /// A pinned DMA_MAP is being pinned on its worker: the host's socket is not read,
        /// and a teardown leaves the mappings and memory to the pin's completion.
        var pinInFlight = false

        init(domain: DomainID, memory: RemoteHostMemory, uffd: HostUserfaultfd, peer: Peer, allowedUIDs: [UInt32]) {
            self.domain = domain
            self.memory = memory
            self.uffd = uffd
            pid = peer.pid
            uid = peer.uid
            self.allowedUIDs = allowedUIDs
            self.peer = peer
        }
    }

    /// Never reused (0 is the service's own): the fences' domain key, and what ring tokens
    /// carry as generation.
    let id: UInt32
    /// Its slot among the loop's hosts; -1 for the service's own.
    let index: Int
    let name: String
    let engine: FaultEngine
    let handler: FaultHandler
    /// Nil for the service's own memory.
    let host: Host?
    var devices: [AttachedDevice] = []
    var uffdArmed = false
    var closed = false

    /// The service's own memory.
    init(own engine: FaultEngine, handler: FaultHandler) {
        id = 0
        index = -1
        name = "own"
        self.engine = engine
        self.handler = handler
        host = nil
    }

    /// A host's address space.
    init(id: UInt32, index: Int, name: String, engine: FaultEngine, host: Host) {
        precondition(id != 0, "address space 0 is the service's own")
        self.id = id
        self.index = index
        self.name = name
        self.engine = engine
        handler = engine.makeFaultHandler()
        self.host = host
    }

    var isOwn: Bool { host == nil }

    // A host's parts, for code that runs for hosts only (HostPeer.swift).
    var domain: DomainID { host!.domain }
    var memory: RemoteHostMemory { host!.memory }
    var uffd: HostUserfaultfd { host!.uffd }
    var pid: Int32 { host!.pid }
    var uid: UInt32 { host!.uid }
    var peer: Peer { host!.peer }
    /// Bytes of its pinned mappings (what its engine charged), against `maxHostPinnedBytes`.
    var pinnedBytes: UInt64 { UInt64(engine.lockedMemory.lockedPages) << 12 }
    var mappedBytes: UInt64 {
        get { host!.mappedBytes }
        set { host!.mappedBytes = newValue }
    }

    /// Whether a device of `uid` may attach: the host's uid or one it allowed; anyone of
    /// the service's own (the embedder decides by its provisioner).
    func admits(_ uid: UInt32) -> Bool {
        guard let host else { return true }
        return uid == host.uid || host.allowedUIDs.contains(uid)
    }
}

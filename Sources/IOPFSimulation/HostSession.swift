// HostSession.swift — `iopf host`: a host in a process of its own, as a VMM would be. It
// creates memfd-backed memory (sealed against shrinking, mapped shared), hands it and a
// userfaultfd to the service (HOST), maps it for DMA as `mappings` equal mappings, and
// then every `churn` changes 1–64 pages of one mapping the way a VMM or guest does:
//
//   dontneed  madvise(MADV_DONTNEED): REMOVE; the pages stay in the memfd
//   remove    madvise(MADV_REMOVE): REMOVE; the pages are freed (they read as zero)
//   fixed     mmap(MAP_FIXED) of the same memfd range over itself: UNMAP, and the new
//             mapping is not registered; the mapping is re-declared (VADDR), which makes the
//             service register it again
//   remap     mremap(MREMAP_DONTUNMAP) of the range to scratch: REMAP; re-declared
//   move      mremap of the whole mapping to its other home, re-declared there (VADDR to
//             a new address), then the old home replaced by a reservation: UNMAP
//
// Or, with `dirtyLogMilliseconds`, it runs migration-like rounds of the dirty log instead
// (HostDirtyLog.swift).
//
// Each change is followed by SYNC; the time from just before the change to the SYNC reply
// is the invalidation latency (host's change to the last device acknowledgement).
//
// Page tags: before handing the memory over, the host writes into the last 8 bytes of
// every page the page's IOVA ^ `HostLayout.tagMagic`. A device attached to the host checks
// the tag of every page it reaches through a translation, so a translation to the wrong
// page of the host's memory shows up as wrong data (a page freed by MADV_REMOVE reads 0,
// and the host writes its tag again after the SYNC).

import CIOPFShim
import Foundation
import Glibc
import Histogram
import IOPFCore
import IOPFDevice
import IOPFSystem
import SystemPackage

package struct HostOptions: Sendable {
    package var path: String
    package var name: String
    package var memoryBytes: UInt64 = 64 << 20
    package var mappings = 4
    /// Milliseconds between changes (0: none).
    package var churnMilliseconds = 0.0
    /// Seconds to run (0: until `shouldStop`).
    package var seconds = 0.0
    package var seed: UInt64 = 1
    /// Uids besides this process's own whose devices may attach (HOST's allowed uids).
    package var allowedUIDs: [UInt32] = []
    /// Milliseconds between reads of the dirty log over all the memory (0: no tracking).
    /// Not with `churnMilliseconds`: a freed page reads as zero, a change no device made.
    package var dirtyLogMilliseconds = 0.0
    /// Back the memory with 2 MiB hugetlbfs pages (MFD_HUGETLB) instead of 4 KiB shmem.
    /// Not with `churnMilliseconds`: its changes are 4 KiB pages.
    package var hugePages = false
    /// Map with PIN (VFIO type1 semantics): pinned and mapped whole before the devices start.
    package var pinned = false
    package init(path: String, name: String) {
        self.path = path
        self.name = name
    }
}

/// What `iopf host --json` prints; the keys are the ones RunningTheService.md lists.
package struct HostResult: Codable, Sendable {
    package var name = ""
    package var memoryBytes: UInt64 = 0
    package var mappings = 0
    package var hostChanges = 0
    package var changesByKind: [String: Int] = [:]
    /// Host addresses re-declared (DMA_MAP with VADDR).
    package var addressUpdates = 0
    /// From just before each change (the madvise, mmap or mremap call) to the reply of the
    /// SYNC after it: the last device acknowledgement.
    package var invalidationLatencyNs = LatencySummary(Histogram<UInt64>())
    /// Whether the mappings were pinned, and how long all DMA_MAPs took (pinning included).
    package var pinned = false
    package var mapSeconds = 0.0
    /// With `--dirty-log`: the log's reports against the pages whose content changed.
    package var dirty: DirtySummary?
    package var elapsedSeconds = 0.0
    package var problems: [String] = []
}

/// Where a host puts things; shared with devices that check page tags.
package enum HostLayout {
    package static let iovaBase: UInt64 = 1 << 40
    package static let tagMagic: UInt64 = 0x5A5A_0000_0000_0000
    package static func tag(iova: UInt64) -> UInt64 { iova ^ tagMagic }
}

package enum HostSession {
    enum Change: String, CaseIterable { case dontneed, remove, fixed, remap, move }

    package static func run(_ o: HostOptions, shouldStop: @escaping () -> Bool = { false }) throws -> HostResult {
        guard o.mappings >= 1, o.memoryBytes % (UInt64(o.mappings) << 12) == 0 else {
            throw SystemCallError("--memory must be a multiple of --mappings × 4 KiB", .invalidArgument)
        }
        guard o.dirtyLogMilliseconds == 0 || o.churnMilliseconds == 0 else {
            throw SystemCallError("--dirty-log and --churn do not go together", .invalidArgument)
        }
        let pageSize: UInt64 = o.hugePages ? hugeBlockBytes : 4096
        guard !o.hugePages || (o.churnMilliseconds == 0 && o.memoryBytes % (UInt64(o.mappings) * pageSize) == 0)
        else {
            throw SystemCallError(
                "--huge-pages needs --memory a multiple of --mappings × 2 MiB, and no --churn", .invalidArgument)
        }
        let started = ContinuousClock.now
        let slice = o.memoryBytes / UInt64(o.mappings)
        // The memfd, sealed: the size can never change.
        let memfd = try syscall(o.hugePages ? "memfd_create(MFD_HUGETLB)" : "memfd_create") {
            o.hugePages
                ? iopf_memfd_create_huge("iopf-host-\(o.name)") : iopf_memfd_create_sealable("iopf-host-\(o.name)")
        }
        defer { Sys.close(memfd) }
        _ = try syscall("ftruncate") { ftruncate(memfd, off_t(o.memoryBytes)) }
        _ = try syscall("fcntl(F_ADD_SEALS)") { iopf_seal_size(memfd) }
        // Two homes per mapping: the memory at `base`, a reservation after it for moves;
        // aligned to the page size (hugetlbfs maps only at 2 MiB boundaries).
        let reserved = Int(2 * o.memoryBytes + pageSize)
        let reservation = mmap(nil, reserved, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let reservation, reservation != MAP_FAILED else { throw SystemCallError("mmap", .init(rawValue: errno)) }
        defer { munmap(reservation, reserved) }
        let base = (UInt64(UInt(bitPattern: reservation)) + pageSize - 1) & ~(pageSize - 1)
        let reserve = UnsafeMutableRawPointer(bitPattern: UInt(base))!
        // Huge pages are reserved here (no MAP_NORESERVE): too few free is ENOMEM now, not SIGBUS later.
        guard mmap(reserve, Int(o.memoryBytes), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, memfd, 0) == reserve
        else {
            let e = errno
            if o.hugePages && e == ENOMEM {
                throw SystemCallError(
                    "mmap of \(o.memoryBytes >> 21) huge pages: not that many free "
                        + "(HugePages_Free in /proc/meminfo; raise /proc/sys/vm/nr_hugepages)", .init(rawValue: e))
            }
            throw SystemCallError("mmap(MAP_FIXED) of the memfd", .init(rawValue: e))
        }
        writeTags(base: base, pages: Int(o.memoryBytes >> 12))
        let scratch = mmap(nil, 64 << 12, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let scratch, scratch != MAP_FAILED else { throw SystemCallError("mmap", .init(rawValue: errno)) }
        defer { munmap(scratch, 64 << 12) }

        let client = try HostClient(connectingTo: o.path)
        defer { client.close() }
        let uffd = try HostClient.makeUserfaultfd()
        do {
            try client.declare(
                name: o.name,
                regions: [
                    HostRegionEntry(
                        hostAddress: base, size: o.memoryBytes, fdOffset: 0, pageSize: UInt32(pageSize), fdIndex: 0)
                ],
                userfaultfd: uffd, memfds: [FileDescriptor(rawValue: memfd)], allowedUIDs: o.allowedUIDs)
        } catch {
            Sys.close(uffd)
            throw error
        }
        Sys.close(uffd)  // the service's copy is the only one now: it unregisters everything when it lets go
        let mapping = ContinuousClock.now
        for k in 0..<o.mappings {
            try client.map(
                iova: HostLayout.iovaBase + UInt64(k) * slice, hostAddress: base + UInt64(k) * slice, size: slice,
                prot: [.read, .write], pinned: o.pinned)
        }

        var result = HostResult()
        result.pinned = o.pinned
        result.mapSeconds = (ContinuousClock.now - mapping).seconds
        result.name = o.name
        result.memoryBytes = o.memoryBytes
        result.mappings = o.mappings
        var latency = Histogram<UInt64>.nanoseconds()
        var rng = Xoshiro(seed: o.seed ^ 0x4057)
        // Where each mapping lives now: its home (false) or the reservation after the memory (true).
        var moved = [Bool](repeating: false, count: o.mappings)
        func home(_ k: Int, _ away: Bool) -> UInt64 { base + (away ? o.memoryBytes : 0) + UInt64(k) * slice }
        let interval = Duration.nanoseconds(Int64(o.churnMilliseconds * 1e6))
        var next = ContinuousClock.now + interval
        let dirtyLog =
            o.dirtyLogMilliseconds > 0
            ? try HostDirtyLog(
                client: client, iova: HostLayout.iovaBase, size: o.memoryBytes, memory: UnsafeRawPointer(reserve))
            : nil
        let readInterval = Duration.nanoseconds(Int64(o.dirtyLogMilliseconds * 1e6))
        var nextRead = ContinuousClock.now + readInterval
        while !shouldStop() && (o.seconds == 0 || ContinuousClock.now - started < .seconds(o.seconds)) {
            if let dirtyLog {
                let now = ContinuousClock.now
                if now >= nextRead {
                    try dirtyLog.round()
                    nextRead = now + readInterval
                } else {
                    usleep(UInt32(min(10_000, max(100, (nextRead - now).nanoseconds / 1000))))
                }
                continue
            }
            guard o.churnMilliseconds > 0 else {
                usleep(10_000)
                continue
            }
            let now = ContinuousClock.now
            if now < next {
                usleep(UInt32(min(10_000, max(100, (next - now).nanoseconds / 1000))))
                continue
            }
            next = now + interval
            let k = Int(rng.next() % UInt64(o.mappings))
            let here = home(k, moved[k])
            let pages = 1 + Int(rng.next() % UInt64(min(64, Int(slice >> 12))))
            let first = Int(rng.next() % UInt64(Int(slice >> 12) - pages + 1))
            let change = Change.allCases[Int(rng.next() % UInt64(Change.allCases.count))]
            // Ranges split by earlier changes: mremap moves within one VMA.
            let start = here + UInt64(first) << 12
            let vma = HostChurn.mapping(containing: start) ?? start..<(start + 4096)
            let length = min(UInt64(pages) << 12, vma.upperBound - start)
            let p = UnsafeMutableRawPointer(bitPattern: UInt(start))
            let t0 = ContinuousClock.now
            var redeclare: UInt64?
            switch change {
            case .dontneed:
                _ = try syscall("madvise(MADV_DONTNEED)") { madvise(p, Int(length), MADV_DONTNEED) }
            case .remove:
                _ = try syscall("madvise(MADV_REMOVE)") { madvise(p, Int(length), MADV_REMOVE) }
            case .fixed:
                let offset = off_t(start - here + UInt64(k) * slice)
                guard mmap(p, Int(length), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, memfd, offset) == p else {
                    throw SystemCallError("mmap(MAP_FIXED)", .init(rawValue: errno))
                }
                redeclare = here
            case .remap:
                guard iopf_mremap_dontunmap(p, Int(length), scratch) == scratch else {
                    throw SystemCallError("mremap(MREMAP_DONTUNMAP)", .init(rawValue: errno))
                }
                redeclare = here
            case .move:
                let there = home(k, !moved[k])
                try moveMapping(from: here, to: there, size: slice)
                redeclare = there
            }
            try client.sync()
            latency.record(UInt64(max(0, (ContinuousClock.now - t0).nanoseconds)))
            if let address = redeclare {
                try client.updateHostAddress(
                    iova: HostLayout.iovaBase + UInt64(k) * slice, size: slice, hostAddress: address)
                result.addressUpdates += 1
                if change == .move {
                    // The old home becomes a reservation again (UNMAP, which touches no mapping now).
                    guard
                        mmap(
                            UnsafeMutableRawPointer(bitPattern: UInt(here)), Int(slice), PROT_NONE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0) != MAP_FAILED
                    else { throw SystemCallError("mmap(PROT_NONE)", .init(rawValue: errno)) }
                    moved[k].toggle()
                    try client.sync()
                }
            }
            if change == .remove {
                // Freed pages read as zero: give them their tags back.
                let iova = HostLayout.iovaBase + UInt64(k) * slice + (start - here)
                writeTags(base: start, pages: Int(length >> 12), firstIOVA: iova)
            }
            result.hostChanges += 1
            result.changesByKind[change.rawValue, default: 0] += 1
        }
        if let dirtyLog {
            let d = try dirtyLog.finish()
            if d.missed > 0 {
                result.problems += ["the dirty log missed \(d.missed) written pages"] + (d.firstMissed ?? [])
            }
            result.dirty = d
        }
        do { try client.detach() } catch { result.problems.append("DETACH: \(error)") }
        result.invalidationLatencyNs = LatencySummary(latency)
        result.elapsedSeconds = (ContinuousClock.now - started).seconds
        return result
    }

    /// Writes the tag of each page (its IOVA ^ magic) into its last 8 bytes.
    static func writeTags(base: UInt64, pages: Int, firstIOVA: UInt64 = HostLayout.iovaBase) {
        for i in 0..<pages {
            let page = UnsafeMutableRawPointer(bitPattern: UInt(base + UInt64(i) << 12))!
            page.storeBytes(of: HostLayout.tag(iova: firstIOVA + UInt64(i) << 12), toByteOffset: 4088, as: UInt64.self)
        }
    }

    /// mremap of `[from, from + size)` to `to`, VMA by VMA (earlier changes split it),
    /// keeping the old range mapped (MREMAP_DONTUNMAP) until the mapping is re-declared.
    static func moveMapping(from: UInt64, to: UInt64, size: UInt64) throws {
        var cursor = from
        while cursor < from + size {
            let vma = HostChurn.mapping(containing: cursor) ?? cursor..<(from + size)
            let length = min(vma.upperBound, from + size) - cursor
            let target = UnsafeMutableRawPointer(bitPattern: UInt(to + (cursor - from)))
            guard
                iopf_mremap_dontunmap(UnsafeMutableRawPointer(bitPattern: UInt(cursor)), Int(length), target) == target
            else {
                throw SystemCallError("mremap(MREMAP_DONTUNMAP) of a mapping", .init(rawValue: errno))
            }
            cursor += length
        }
    }
}

// HostDirtyLog.swift — `iopf host --dirty-log MS`: migration-like rounds over the socket.
// The host starts tracking on all of its mapped IOVAs (DIRTY_START), then every round
// reads and clears the log (DIRTY_READ: inline up to 256 MiB, into a memfd beyond) while
// the devices attached to it keep writing, as a VMM's pre-copy loop does.
//
// What was really written is read from the memory itself, not from the devices (which are
// other processes): after each read the host hashes every page and compares it with the
// hash taken after the previous read. Round e's pages W(e) are those whose content changed
// between the scan after read e-1 and the scan after read e; every such change landed
// after read e-1 was answered, so it must be in report e or e+1 (the service's guarantee):
// `missed` counts pages of W(e) in neither. `extra` counts pages of report e whose content
// changed in neither W(e-1) nor W(e). The summary is `serve --dirty-log`'s `dirty`.
// A change that writes a page's bytes back unchanged is no change here: the simulated
// devices write a new version number with every write, so none of theirs is lost that way.

import CIOPFShim
import Foundation
import Glibc
import Histogram
import IOPFCore
import IOPFDevice
import IOPFSystem
import SystemPackage

final class HostDirtyLog {
    private let client: HostClient
    private let iova: UInt64
    private let size: UInt64
    private let memory: UnsafeRawPointer
    private let pages: Int
    private var hashes: [UInt64]
    /// The bitmap's memfd and the host's read-only view of it, for ranges past the inline limit.
    private var bitmap: (fd: CInt, view: UnsafeRawPointer, bytes: Int)?
    /// W(e-1), W(e-2) and report e-1: what judging round e-1 needs besides report e.
    private var written: (last: PageBitmap, before: PageBitmap)
    private var lastReport: PageBitmap?
    private var readTimes = Histogram<UInt64>.nanoseconds()
    private(set) var summary = DirtySummary()

    /// Starts tracking `[iova, iova + size)`, whose pages the host has at `memory`.
    init(client: HostClient, iova: UInt64, size: UInt64, memory: UnsafeRawPointer) throws {
        self.client = client
        self.iova = iova
        self.size = size
        self.memory = memory
        pages = Int(size >> 12)
        written = (PageBitmap(count: pages), PageBitmap(count: pages))
        hashes = []
        let bytes = DirtyLimits.bitmapBytes(pages: UInt64(pages))
        if bytes > DirtyLimits.maxInlineBitmapBytes {
            let fd = try syscall("memfd_create") { iopf_memfd_create_sealable("iopf-host-dirty-bitmap") }
            let length = (bytes + 4095) & ~4095
            guard ftruncate(fd, off_t(length)) == 0, iopf_seal_size(fd) == 0,
                let view = mmap(nil, length, PROT_READ, MAP_SHARED, fd, 0), view != MAP_FAILED
            else {
                let e = Glibc.errno
                Sys.close(fd)
                throw SystemCallError("the dirty bitmap's memfd", .init(rawValue: e))
            }
            bitmap = (fd, UnsafeRawPointer(view), bytes)
        }
        try client.startDirtyTracking(iova: iova, size: size)
        hashes = Self.hashes(memory, pages: pages)
    }

    deinit {
        if let b = bitmap {
            munmap(UnsafeMutableRawPointer(mutating: b.view), (b.bytes + 4095) & ~4095)
            Sys.close(b.fd)
        }
    }

    /// One round: read and clear the log, scan the memory, judge the round before.
    func round() throws {
        let t0 = ContinuousClock.now
        let report: PageBitmap
        if let b = bitmap {
            try client.readDirty(iova: iova, size: size, into: FileDescriptor(rawValue: b.fd))
            report = PageBitmap(count: pages, littleEndianBytes: UnsafeRawBufferPointer(start: b.view, count: b.bytes))
        } else {
            report = try client.readDirty(iova: iova, size: size)
        }
        readTimes.record(UInt64(max(0, (ContinuousClock.now - t0).nanoseconds)))
        let now = Self.hashes(memory, pages: pages)
        var changed = PageBitmap(count: pages)
        for i in 0..<pages where now[i] != hashes[i] { changed.set(i) }
        hashes = now
        if let previous = lastReport {
            judge(report: previous, next: report)
        }
        written = (changed, written.last)
        lastReport = report
    }

    /// Round e-1: its writes must be in its report or `next`; its report should name pages
    /// that changed in it or the round before.
    private func judge(report: PageBitmap, next: PageBitmap) {
        let w = written.last
        let missed = w.population(notIn: report, next)
        summary.rounds += 1
        summary.written += w.population
        summary.reported += report.population
        summary.missed += missed
        summary.extra += report.population(notIn: w, written.before)
        var p = w.findNextSet(from: 0)
        while missed > 0 && p < pages && (summary.firstMissed?.count ?? 0) < 5 {
            if !report.test(p) && !next.test(p) {
                let page = "iova \(hex(iova + UInt64(p) << 12)) changed in round \(summary.rounds)"
                summary.firstMissed = (summary.firstMissed ?? []) + [page]
            }
            p = w.findNextSet(from: p + 1)
        }
    }

    /// Stops tracking; the summary of every round judged.
    func finish() throws -> DirtySummary {
        try client.stopDirtyTracking(iova: iova, size: size)
        summary.readNs = LatencySummary(readTimes)
        return summary
    }

    /// Every page's hash (shim.c: four multiply-xor lanes per page, at memory speed and
    /// outside the sanitizers, which cannot see the devices' writes anyway).
    static func hashes(_ memory: UnsafeRawPointer, pages: Int) -> [UInt64] {
        [UInt64](unsafeUninitializedCapacity: pages) { out, count in
            iopf_hash_pages(memory, pages, out.baseAddress)
            count = pages
        }
    }
}

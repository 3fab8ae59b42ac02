// HugePages.swift — transparent huge pages behind host regions (`--huge-pages`), and
// finding out cheaply whether one backs a 2 MiB block.
//
// Host regions are memfds (shmem). Shmem gets 2 MiB pages only where the kernel allows
// it: the per-size knob hugepages-2048kB/shmem_enabled ("inherit" follows the top-level
// shmem_enabled) must be always, within_size or advise, and with advise the mapping must
// carry MADV_HUGEPAGE. A fault on such a mapping allocates the whole huge page and maps it
// with one PMD, so after the faulting page is populated, /proc/self/pagemap gives the PFN
// of every page of the block and /proc/kpageflags says whether it is a huge page: three
// pread calls, 2.4 µs measured, against 150-2,600 µs to allocate and clear 2 MiB here.

import Foundation
import Glibc
import IOPFSystem

/// Transparent huge pages for shared memory: reading and setting the kernel's knobs.
public enum HugePages {
    static let sizeKnob = "/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled"
    static let topKnob = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"

    /// Why 2 MiB shmem pages cannot be had.
    public struct Unavailable: Error, CustomStringConvertible {
        public var description: String
    }

    /// The setting a knob file shows in brackets ("always [inherit] never" → "inherit").
    static func selected(_ path: String) -> String? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8),
            let open = text.firstIndex(of: "["), let close = text[open...].firstIndex(of: "]")
        else { return nil }
        return String(text[text.index(after: open)..<close])
    }

    /// Makes 2 MiB shmem pages available to regions that ask for them (MADV_HUGEPAGE):
    /// when the kernel's setting does not allow them, sets the per-size knob to `advise`,
    /// which changes nothing for memory that does not ask. Returns a notice saying what
    /// it changed (the setting stays: `echo inherit > <knob>` puts it back), nil when
    /// nothing had to change. Throws when it cannot (no such knob, not root).
    public static func enableForShmem() throws(Unavailable) -> String? {
        let allowing: Set<String> = ["always", "within_size", "advise", "force"]
        guard let perSize = selected(sizeKnob) else {
            throw Unavailable(
                description: "--huge-pages: this kernel has no \(sizeKnob) "
                    + "(transparent huge pages for shmem, Linux 6.11+)")
        }
        let effective = perSize == "inherit" ? selected(topKnob) ?? "never" : perSize
        if allowing.contains(effective) { return nil }
        do {
            try "advise".write(toFile: sizeKnob, atomically: false, encoding: .utf8)
        } catch {
            throw Unavailable(
                description: "--huge-pages: shmem huge pages are '\(effective)' and \(sizeKnob) "
                    + "could not be set to advise (\(error.localizedDescription)); run as root or set it yourself")
        }
        guard selected(sizeKnob) == "advise" else {
            throw Unavailable(description: "--huge-pages: wrote advise to \(sizeKnob) but it did not take")
        }
        return "set \(sizeKnob) to advise (was \(perSize)\(perSize == "inherit" ? ", and \(effective) inherited" : ""))"
    }

    /// Opened once; -1 when unreadable (then no block is ever found huge).
    private static let pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
    private static let kpageflags = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC)

    /// Whether one 2 MiB huge page backs `[address, address + 2 MiB)` of this process
    /// now, mapped in place: the first page is present, heads a huge compound page at a
    /// 512-aligned PFN, and the last page is present 511 frames further on. Faults
    /// nothing in. False without root (pagemap hides PFNs) or for an unaligned address.
    public static func backsBlock(at address: UInt64) -> Bool {
        guard address & ((2 << 20) - 1) == 0, pagemap >= 0, kpageflags >= 0 else { return false }
        let present: UInt64 = 1 << 63, pfnMask: UInt64 = (1 << 55) - 1
        let thp: UInt64 = 1 << 22, head: UInt64 = 1 << 15  // KPF_THP, KPF_COMPOUND_HEAD
        var first: UInt64 = 0, last: UInt64 = 0, flags: UInt64 = 0
        let page = off_t(address >> 12)
        guard pread(pagemap, &first, 8, page * 8) == 8, first & present != 0,
            pread(pagemap, &last, 8, (page + 511) * 8) == 8, last & present != 0
        else { return false }
        let pfn = first & pfnMask
        guard pfn != 0, pfn & 511 == 0, last & pfnMask == pfn + 511,
            pread(kpageflags, &flags, 8, off_t(pfn) * 8) == 8
        else { return false }
        return flags & thp != 0 && flags & head != 0
    }
}

// Invariants.swift — the engine's consistency checks, shared by the tests, `iopf serve`
// and the stress tester. They run under the update lock, so they see a quiescent state.
//
// What must hold between operations:
// - every present leaf lies inside a live mapping, with that mapping's permission, and
//   each of its pages has its bit set and the physical address the host reports;
// - every set bit has a present leaf in every domain (checked by count: leaves cover
//   exactly as many pages as there are bits);
// - table pages allocated = freed + live, and live = reachable from the root;
// - no table page was freed before the sync of the gather that unlinked it;
// - no page whose host memory is gone (UNMAP/REMAP) is mapped;
// - while a mapping is dirty-tracked, its leaves are writable only where every page is
//   dirty (a writable leaf over a clean page lets a write go unlogged).

/// One broken invariant between the page tables, the bitmaps and the pool.
public struct InvariantViolation: Sendable, Hashable, CustomStringConvertible {
    /// Which invariant broke.
    public enum Kind: String, Sendable, Hashable, CaseIterable {
        /// A leaf maps an IOVA outside every mapping.
        case leafOutsideMapping
        /// A leaf is present while its page's bit is clear.
        case leafWithoutBit
        /// A bit is set while a domain has no leaf for the page.
        case bitWithoutLeaf
        /// A leaf points at another physical page than the host page's.
        case wrongPhysical
        /// A leaf grants more than its mapping does.
        case wrongPermission
        /// A table page is neither in use nor free.
        case tablePageLeak
        /// A table page was freed before the sync that covers its last unmap.
        case tablePageFreedBeforeSync
        /// A leaf maps host memory that was unmapped or moved.
        case leafOnGoneMemory
        /// A writable leaf on a page the dirty log does not have dirty.
        case writableButClean
    }

    /// Which invariant broke.
    public var kind: Kind
    /// Where, and what was found.
    public var detail: String
    public var description: String { "\(kind.rawValue): \(detail)" }
}

extension FaultEngine {
    /// Checks every invariant and returns what failed, at most `limit` violations.
    public func checkInvariants(limit: Int = 100) -> [InvariantViolation] {
        state.withLock { s in
            var out: [InvariantViolation] = []
            func report(_ kind: InvariantViolation.Kind, _ detail: @autoclosure () -> String) {
                if out.count < limit { out.append(InvariantViolation(kind: kind, detail: detail())) }
            }
            let bits = s.mappings.byIOVA.reduce(0) { $0 + $1.iopfMapped.population }
            // A REMOVE visits only active mappings: one with pages mapped must be among them.
            for m in s.mappings.byIOVA where !m.pinned && !m.iopfMapped.isEmpty && !m.isActive {
                report(
                    .bitWithoutLeaf,
                    "\(m.id) has \(m.iopfMapped.population) pages mapped but is not in the active index")
            }
            for (d, table) in s.domains.enumerated() {
                var leafPages = 0
                table.forEachLeaf { iova, t in
                    let pages = Int(t.pageSize.bytes >> pageShift)
                    leafPages += pages
                    guard let m = s.mappings.mapping(containing: iova), iova + t.pageSize.bytes - 1 <= m.iovaLast else {
                        report(
                            .leafOutsideMapping,
                            "domain#\(d) has a \(t.pageSize) leaf at \(hex(iova)) outside every live mapping")
                        return
                    }
                    if let gone = m.hostGone,
                        gone.population(in: m.pageIndex(iova: iova)..<(m.pageIndex(iova: iova) + pages)) > 0
                    {
                        report(
                            .leafOnGoneMemory,
                            "domain#\(d) maps iova \(hex(iova)) of \(m.id), whose host memory is gone")
                    }
                    let first = m.pageIndex(iova: iova)
                    if let dirty = m.dirty, m.prot.contains(.write) {
                        if t.prot != m.prot && t.prot != m.prot.subtracting(.write) {
                            report(
                                .wrongPermission,
                                """
                                domain#\(d) leaf at \(hex(iova)) is \(t.prot), \(m.id) grants \(m.prot) \
                                (dirty-tracked)
                                """
                            )
                        } else if t.prot.contains(.write) && dirty.population(in: first..<(first + pages)) != pages {
                            report(
                                .writableButClean,
                                "domain#\(d) leaf at \(hex(iova)) is writable but \(m.id) logs it clean: "
                                    + "a write there would be lost")
                        }
                    } else if t.prot != m.prot {
                        report(
                            .wrongPermission, "domain#\(d) leaf at \(hex(iova)) is \(t.prot), \(m.id) grants \(m.prot)")
                    }
                    let set = m.iopfMapped.population(in: first..<(first + pages))
                    if set != pages {
                        report(
                            .leafWithoutBit,
                            """
                            domain#\(d) leaf at \(hex(iova)) (\(t.pageSize)): \(pages - set) of its pages have no \
                            bit in \(m.id)
                            """
                        )
                    }
                    for k in 0..<pages {
                        let host = m.hostAddress(page: first + k)
                        if let expected = memory.currentPhysical(of: host), expected != t.phys + UInt64(k) << pageShift
                        {
                            report(
                                .wrongPhysical,
                                """
                                domain#\(d) maps iova \(hex(m.iova(page: first + k))) to \
                                \(hex(t.phys + UInt64(k) << pageShift)), host page \(hex(host)) is at \
                                \(hex(expected))
                                """
                            )
                            break
                        }
                    }
                }
                if leafPages < bits {
                    report(.bitWithoutLeaf, "domain#\(d) maps \(leafPages) pages but \(bits) bits are set")
                }
                if table.pool.freedBeforeSync > 0 {
                    report(
                        .tablePageFreedBeforeSync,
                        """
                        domain#\(d): \(table.pool.freedBeforeSync) table pages returned to the pool before their \
                        gather was synced
                        """
                    )
                }
                let reachable = table.reachableTablePages
                if table.tablePageAllocations != table.tablePageFrees + table.liveTablePages
                    || reachable != table.liveTablePages
                {
                    report(
                        .tablePageLeak,
                        """
                        domain#\(d): \(table.tablePageAllocations) table pages allocated, \(table.tablePageFrees) \
                        freed, \(table.liveTablePages) live, \(reachable) reachable
                        """
                    )
                }
            }
            return out
        }
    }
}

extension IOPageTable {
    /// Table pages reachable from the root, the root included. Writer side only.
    var reachableTablePages: Int { countTables(page: root, level: 0) }

    private func countTables(page: TablePageID, level: Int) -> Int {
        guard level < 3 else { return 1 }
        var n = 1
        for i in 0..<TablePagePool.entriesPerPage {
            let e = pool.load(page, i)
            if PTE.isPresent(e) && !PTE.isLeaf(e) { n += countTables(page: PTE.child(e), level: level + 1) }
        }
        return n
    }
}

// DMAMappingTable.swift — the user's DMA mappings (VFIO type1's `vfio_dma` list):
// IOVA range → host virtual range + permission, each with its "iopf mapped" bitmap.
//
// Ranges are `[iova, iova + size)`; `iovaLast` is inclusive. Three interval treaps
// (MappingIndex.swift): by IOVA (ranges never overlap: one descent finds a fault's mapping),
// by host address, and by host address for the mappings with pages mapped (what a REMOVE
// must visit). Each is O(log n) to change and O(log n + k) to find k mappings, whatever
// their sizes: a host with 65535 mappings pays per event, unmap and teardown about what a
// host with a few pays.

/// Names one DMA mapping for as long as it exists; never reused within an engine.
public struct MappingID: Hashable, Sendable, CustomStringConvertible {
    /// The number behind the identifier.
    public let rawValue: UInt64
    public var description: String { "mapping#\(rawValue)" }
}

/// One DMA mapping. Mutable state is changed only under the engine's update lock.
public final class DMAMapping: @unchecked Sendable {
    /// The mapping's identifier.
    public let id: MappingID
    /// The first IOVA the mapping covers.
    public let iova: UInt64
    /// The mapping's size in bytes, a multiple of the page size.
    public let size: UInt64
    /// What devices may do through the mapping.
    public let prot: Protection
    /// Host virtual address of the first byte.
    @exclusivity(unchecked) public internal(set) var vaddr: UInt64
    /// Bit i set ⇔ page i is mapped in every domain by the fault path.
    @exclusivity(unchecked) public internal(set) var iopfMapped: PageBitmap
    /// Pages whose host memory was unmapped or moved away (UNMAP/REMAP events): faults
    /// there are answered INVALID until the host address is updated. Nil while none.
    @exclusivity(unchecked) public internal(set) var hostGone: PageBitmap?
    /// Pinned (VFIO type1) rather than fault-driven: every page is mapped at creation and
    /// host events leave it alone.
    @exclusivity(unchecked) public internal(set) var pinned = false
    /// Pages of a pinned mapping charged to locked memory (device memory is not).
    @exclusivity(unchecked) public internal(set) var chargedPages = 0
    /// A pinned mapping whose map call has not returned yet: it cannot be unmapped or
    /// moved (its pages are being pinned and charged outside the lock).
    @exclusivity(unchecked) public internal(set) var populating = false
    /// Pages written since the last `readAndClearDirty`, while dirty tracking is on (nil
    /// while off). Kept across invalidations: a page written and then unmapped is still
    /// reported. While tracking, a leaf of this mapping is writable only if its bit is set.
    @exclusivity(unchecked) public internal(set) var dirty: PageBitmap?
    /// In the table's active index: some page may be mapped by the fault path.
    @exclusivity(unchecked) var isActive = false
    /// Removed from its table: never made active again (a fault that raced its removal
    /// must not put it back into an index).
    @exclusivity(unchecked) var isRemoved = false

    init(id: MappingID, iova: UInt64, vaddr: UInt64, size: UInt64, prot: Protection) {
        self.id = id
        self.iova = iova
        self.vaddr = vaddr
        self.size = size
        self.prot = prot
        iopfMapped = PageBitmap(count: Int(size >> pageShift))
    }

    /// The number of pages the mapping covers (one bit each in its bitmap).
    public var pageCount: Int { iopfMapped.count }
    /// The last IOVA the mapping covers (inclusive).
    public var iovaLast: UInt64 { iova + size - 1 }
    /// The host address just past the mapping's memory.
    public var vaddrEnd: UInt64 { vaddr + size }

    /// Whether `address` lies inside the mapping's IOVA range.
    @inline(__always) public func contains(iova address: UInt64) -> Bool { address >= iova && address <= iovaLast }
    @inline(__always) func pageIndex(iova address: UInt64) -> Int { Int((address - iova) >> pageShift) }
    @inline(__always) func iova(page: Int) -> UInt64 { iova + UInt64(page) << pageShift }
    @inline(__always) func hostAddress(page: Int) -> UInt64 { vaddr + UInt64(page) << pageShift }
}

/// Why a map or unmap request was refused, as VFIO type1 refuses it.
public enum DMAMapError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The request has size zero.
    case zeroSize(iova: UInt64)
    /// An address or size is not page aligned.
    case unaligned(what: String, value: UInt64)
    /// The range wraps around the end of the address space.
    case overflow(what: String, start: UInt64, size: UInt64)
    /// The range lies outside the I/O page table's IOVA space.
    case outOfIOVASpace(iova: UInt64, size: UInt64)
    /// The mapping grants neither read nor write.
    case noPermission(iova: UInt64)
    /// The range overlaps an existing mapping.
    case overlap(iova: UInt64, size: UInt64, existing: MappingID, existingIOVA: UInt64, existingSize: UInt64)
    /// The table holds as many mappings as it may (VFIO's `dma_entry_limit`).
    case entryLimit(limit: Int)
    /// An unmap that would cut a mapping in two: mappings are removed whole.
    case partialUnmap(iova: UInt64, size: UInt64, mapping: MappingID, mappingIOVA: UInt64, mappingSize: UInt64)
    /// No mapping lies in the range.
    case noSuchMapping(iova: UInt64, size: UInt64)
    /// The mapping is being filled by a pinned map and cannot be removed yet.
    case busy(iova: UInt64, size: UInt64, mapping: MappingID)

    public var description: String {
        switch self {
        case .zeroSize(let iova):
            "DMA map at iova \(hex(iova)): size is zero"
        case .unaligned(let what, let value):
            "DMA map: \(what) \(hex(value)) is not a multiple of 4 KiB"
        case .overflow(let what, let start, let size):
            "DMA map: \(what) \(hex(start)) + size \(hex(size)) overflows 64 bits"
        case .outOfIOVASpace(let iova, let size):
            "DMA map: [\(hex(iova)), +\(hex(size))) does not fit in the 48-bit IOVA space"
        case .noPermission(let iova):
            "DMA map at iova \(hex(iova)): neither read nor write permission requested"
        case .overlap(let iova, let size, let existing, let eIOVA, let eSize):
            "DMA map: [\(hex(iova)), +\(hex(size))) overlaps \(existing) at [\(hex(eIOVA)), +\(hex(eSize)))"
        case .entryLimit(let limit):
            "DMA map: the table already holds its limit of \(limit) mappings (dma_entry_limit)"
        case .partialUnmap(let iova, let size, let m, let mIOVA, let mSize):
            """
            DMA unmap: [\(hex(iova)), +\(hex(size))) cuts \(m) at [\(hex(mIOVA)), +\(hex(mSize))); unmap whole \
            mappings only (nothing was unmapped)
            """
        case .noSuchMapping(let iova, let size):
            """
            DMA update: no mapping is exactly [\(hex(iova)), +\(hex(size))); a host address is updated for one \
            whole mapping
            """
        case .busy(let iova, let size, let m):
            """
            DMA unmap: \(m) at [\(hex(iova)), +\(hex(size))) is still being pinned and mapped; try again once its \
            map returned (nothing was unmapped)
            """
        }
    }
}

/// The DMA mappings of an engine, ordered by IOVA, as VFIO type1 keeps its `vfio_dma` tree.
public struct DMAMappingTable: Sendable {
    /// VFIO type1's default limit on the number of mappings.
    public static let defaultEntryLimit = 65535

    /// The most mappings the table holds.
    public let entryLimit: Int
    /// By IOVA; IOVA ranges never overlap.
    private var iovaIndex = MappingIndex(.iova)
    /// By host range; host ranges may overlap (one buffer mapped at two IOVAs).
    private var byHost = MappingIndex(.host)
    /// The fault-driven mappings with pages mapped, by host range: what a REMOVE must visit.
    private var active = MappingIndex(.host)
    private var nextID: UInt64 = 1

    /// An empty table that holds at most `entryLimit` mappings.
    public init(entryLimit: Int = Self.defaultEntryLimit) {
        precondition(entryLimit > 0, "entry limit \(entryLimit) must be positive")
        self.entryLimit = entryLimit
    }

    /// The number of mappings.
    public var count: Int { iovaIndex.count }

    /// Every mapping, by IOVA (built on each call: for inspection, not for the fault path).
    public var byIOVA: [DMAMapping] {
        var all: [DMAMapping] = []
        all.reserveCapacity(count)
        iovaIndex.forEach(overlapping: 0, .max) { all.append($0) }
        return all
    }

    /// Validates like VFIO type1 (`vfio_dma_do_map`); changes nothing on error.
    public static func validate(iova: UInt64, vaddr: UInt64, size: UInt64, prot: Protection) throws(DMAMapError) {
        guard size > 0 else { throw .zeroSize(iova: iova) }
        guard isPageAligned(size) else { throw .unaligned(what: "size", value: size) }
        guard isPageAligned(iova) else { throw .unaligned(what: "iova", value: iova) }
        guard isPageAligned(vaddr) else { throw .unaligned(what: "vaddr", value: vaddr) }
        guard let last = lastAddress(start: iova, size: size) else {
            throw .overflow(what: "iova", start: iova, size: size)
        }
        guard lastAddress(start: vaddr, size: size) != nil else {
            throw .overflow(what: "vaddr", start: vaddr, size: size)
        }
        guard last < IOPageTable.iovaLimit else { throw .outOfIOVASpace(iova: iova, size: size) }
        guard !prot.isEmpty else { throw .noPermission(iova: iova) }
    }

    /// Adds a mapping after full validation.
    public mutating func insert(iova: UInt64, vaddr: UInt64, size: UInt64, prot: Protection) throws(DMAMapError)
        -> DMAMapping
    {
        try Self.validate(iova: iova, vaddr: vaddr, size: size, prot: prot)
        guard count < entryLimit else { throw .entryLimit(limit: entryLimit) }
        var existing: DMAMapping?
        iovaIndex.forEach(overlapping: iova, iova + size) { if existing == nil { existing = $0 } }
        if let e = existing {
            throw .overlap(iova: iova, size: size, existing: e.id, existingIOVA: e.iova, existingSize: e.size)
        }
        let mapping = DMAMapping(id: MappingID(rawValue: nextID), iova: iova, vaddr: vaddr, size: size, prot: prot)
        nextID += 1
        iovaIndex.insert(mapping)
        byHost.insert(mapping)
        return mapping
    }

    /// The mappings inside `[iova, iova + size)`, by IOVA, which must not cut any mapping
    /// (VFIO type1 refuses to split a mapping). Validates only; `remove` does the removal.
    public func mappings(coveringWhole iova: UInt64, size: UInt64) throws(DMAMapError) -> [DMAMapping] {
        guard size > 0 else { throw .zeroSize(iova: iova) }
        guard isPageAligned(iova) else { throw .unaligned(what: "iova", value: iova) }
        guard isPageAligned(size) else { throw .unaligned(what: "size", value: size) }
        guard let last = lastAddress(start: iova, size: size) else {
            throw .overflow(what: "iova", start: iova, size: size)
        }
        var span: [DMAMapping] = []
        iovaIndex.forEach(overlapping: iova, last &+ 1 == 0 ? .max : last + 1) { span.append($0) }
        // Only the first and last mapping of the span can stick out of it.
        if let cut = [span.first, span.last].compactMap({ $0 }).first(where: { $0.iova < iova || $0.iovaLast > last }) {
            throw .partialUnmap(iova: iova, size: size, mapping: cut.id, mappingIOVA: cut.iova, mappingSize: cut.size)
        }
        return span
    }

    /// Removes one mapping from every index: O(log n) each.
    public mutating func remove(_ mapping: DMAMapping) {
        guard iovaIndex.mapping(containing: mapping.iova) === mapping else { return }
        iovaIndex.remove(mapping)
        byHost.remove(mapping)
        deactivate(mapping)
        mapping.isRemoved = true
    }

    /// The fault path mapped a page of `m`: a REMOVE over its host range must visit it.
    @inline(__always)
    mutating func activate(_ m: DMAMapping) {
        guard !m.isActive, !m.isRemoved else { return }
        m.isActive = true
        active.insert(m)
    }

    /// `m` has no page mapped any more.
    mutating func deactivate(_ m: DMAMapping) {
        guard m.isActive else { return }
        m.isActive = false
        active.remove(m)
    }

    /// Removes the mappings `mappings(coveringWhole:)` returned: O(log n) each, and when
    /// they are every mapping (a host's teardown) the indexes are dropped whole.
    public mutating func remove(all span: [DMAMapping]) {
        guard span.count == count else {
            for m in span { remove(m) }
            return
        }
        iovaIndex.removeAll()
        byHost.removeAll()
        active.removeAll()
        for m in span {
            m.isActive = false
            m.isRemoved = true
        }
    }

    /// Replaces a mapping's host address (VFIO's `VFIO_DMA_MAP_FLAG_VADDR`), keeping the
    /// host indexes in step.
    mutating func updateHostAddress(_ mapping: DMAMapping, to vaddr: UInt64) {
        byHost.remove(mapping)
        let wasActive = mapping.isActive
        deactivate(mapping)
        mapping.vaddr = vaddr
        byHost.insert(mapping)
        if wasActive { activate(mapping) }
    }

    /// The mapping whose IOVA range holds `iova`.
    @inline(__always)
    public func mapping(containing iova: UInt64) -> DMAMapping? {
        iovaIndex.mapping(containing: iova)
    }

    /// Calls `body` for each mapping whose host range overlaps `[start, end)`, by host address.
    /// With `activeOnly`, only those with pages mapped by the fault path.
    public func forEachMapping(
        overlappingHost start: UInt64, end: UInt64, activeOnly: Bool = false,
        _ body: (DMAMapping) throws -> Void
    ) rethrows {
        guard start < end else { return }
        // Not `(activeOnly ? active : byHost)`: that copies the index (three retains) per event.
        if activeOnly {
            try active.forEach(overlapping: start, end, body)
        } else {
            try byHost.forEach(overlapping: start, end, body)
        }
    }

    /// Calls `body` for each mapping whose IOVA range overlaps `[first, last]`, by IOVA.
    public func forEachMapping(overlappingIOVA first: UInt64, last: UInt64, _ body: (DMAMapping) throws -> Void)
        rethrows
    {
        guard first <= last else { return }
        try iovaIndex.forEach(overlapping: first, last &+ 1 == 0 ? .max : last + 1, body)
    }
}

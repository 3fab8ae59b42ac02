// Model-based property test: seeded random sequences of map / fault / premap / invalidate
// / unmap against a plain dictionary model. After every step the engine must agree with
// the model and pass every invariant check; after an invalidation no translation may
// survive in its range. A failure names the seed and the step.

import Testing
@testable import IOPFCore

@Suite(.timeLimit(.minutes(15))) struct ModelTests {
    struct ModelMapping {
        var iova: UInt64
        var vaddr: UInt64
        var size: UInt64
        var prot: Protection
        var pages: Range<UInt64> { (iova >> 12)..<((iova + size) >> 12) }
        func host(ofPage p: UInt64) -> UInt64 { vaddr + ((p << 12) - iova) }
    }

    static let iovaSpace: UInt64 = 16 * MiB
    static let hostBase: UInt64 = 0x7000_0000_0000
    static let hostSpace: UInt64 = 8 * MiB

    /// Host memory backed by huge pages when faults map blocks: the first two 2 MiB blocks.
    static let hugeHost = hostBase..<(hostBase + 4 * MiB)

    /// With `blocks`, faults map 2 MiB blocks where huge pages back them, and the model
    /// predicts exactly which: the block around a group's last request, when that request
    /// is granted, the block lies inside its mapping with its host address aligned, in
    /// huge memory, and none of it is mapped yet.
    @Test(arguments: [1, 2, 3] as [UInt64], [false, true])
    func randomOperationsAgreeWithTheModel(seed: UInt64, blocks: Bool) throws {
        var rng = SeededGenerator(seed: seed)
        let memory = SimulatedHostMemory()
        var config = EngineConfiguration()
        config.blocksOnFault = blocks
        if blocks { memory.markHuge(Self.hugeHost) }
        let engine = FaultEngine(memory: memory, configuration: config)
        var faultBlocks = 0
        let domains = try (0..<2).map { _ in try engine.createDomain(invalidator: RecordingInvalidator()) }
        let handler = engine.makeFaultHandler()
        var mappings: [UInt64: ModelMapping] = [:]  // by iova
        var faulted: Set<UInt64> = []  // IOVA page numbers
        var blocksSeen = 0

        func mapping(ofPage p: UInt64) -> ModelMapping? { mappings.values.first { $0.pages.contains(p) } }
        // By IOVA: a Dictionary's order changes from process to process (per-process hash
        // seeds), and the same seed must make the same sequence everywhere.
        func pick(_ rng: inout SeededGenerator) -> ModelMapping? {
            mappings.keys.sorted().randomElement(using: &rng).map { mappings[$0]! }
        }

        for step in 0..<2500 {
            let context = "seed \(seed) step \(step)"
            switch rng.next() % 100 {
            case 0..<12:  // map
                let huge = rng.next() % 4 == 0
                let size = huge ? 2 * MiB * (1 + rng.next() % 2) : 4 * KiB * (1 + rng.next() % 48)
                // Huge mappings get their own region above the small ones so that they fit.
                let iova =
                    huge ? Self.iovaSpace + (rng.next() % 16) * 2 * MiB : (rng.next() % (Self.iovaSpace >> 12)) << 12
                let vaddr =
                    Self.hostBase + (huge ? (rng.next() % 4) * 2 * MiB : (rng.next() % (Self.hostSpace >> 12)) << 12)
                let prot: Protection = [.read, .write, .readWrite][Int(rng.next() % 3)]
                let m = ModelMapping(iova: iova, vaddr: vaddr, size: size, prot: prot)
                let fits =
                    iova + size <= IOPageTable.iovaLimit
                    && !mappings.values.contains { $0.pages.overlaps(m.pages) }
                do {
                    try engine.map(iova: iova, vaddr: vaddr, size: size, prot: prot)
                    #expect(fits, "\(context): map of overlapping range accepted")
                    mappings[iova] = m
                } catch {
                    #expect(!fits, "\(context): valid map refused: \(error)")
                }
            case 12..<55:  // fault a group
                guard let m = pick(&rng) else { continue }
                var group: [PageRequest] = []
                var expected = ResponseCode.success
                var pages: [UInt64] = []
                var lastGranted: (page: UInt64, owner: ModelMapping)?
                for k in 0..<(1 + Int(rng.next() % 4)) {
                    // Mostly inside the mapping, sometimes just outside it.
                    let p = m.pages.lowerBound + rng.next() % UInt64(m.pages.count + 2)
                    let write = rng.next() % 2 == 0
                    let owner = mapping(ofPage: p)
                    let allowed =
                        owner.map {
                            $0.prot.contains(write ? .write : .read) && (write ? $0.prot.contains(.read) : true)
                        } ?? false
                    if !allowed { expected = .invalid }
                    if allowed { pages.append(p) }
                    lastGranted = allowed ? (p, owner!) : nil
                    group.append(
                        PageRequest(
                            flags: k == 3 ? [.lastPage] : [], deviceID: 1, groupIndex: 0,
                            perm: write ? [.read, .write] : [.read], addr: p << 12 | (rng.next() & 0xfff), cookie: 1))
                }
                let out = handler.handle(group)
                #expect(out.code == expected, "\(context): group answered \(out.code), model says \(expected)")
                if blocks, let (p, owner) = lastGranted {
                    let block = (p & ~511)..<((p & ~511) + 512)
                    if owner.pages.lowerBound <= block.lowerBound, block.upperBound <= owner.pages.upperBound,
                        case let host = owner.host(ofPage: block.lowerBound), host & (2 * MiB - 1) == 0,
                        Self.hugeHost.contains(host), faulted.isDisjoint(with: block)
                    {
                        faulted.formUnion(block)
                        faultBlocks += 1
                    }
                }
                faulted.formUnion(pages)
            case 55..<66:  // premap part of a mapping
                guard let m = pick(&rng) else { continue }
                var first = m.pages.lowerBound + rng.next() % UInt64(m.pages.count)
                var count = 1 + rng.next() % (m.pages.upperBound - first)
                if m.size >= 2 * MiB && rng.next() % 2 == 0 {
                    // A whole aligned 2 MiB chunk, so that blocks (and unmaps of more
                    // or less than asked) really occur.
                    first = m.pages.lowerBound + 512 * (rng.next() % UInt64(m.pages.count / 512))
                    count = 512
                }
                guard m.prot.contains(.read) else { continue }
                try engine.premap(iova: first << 12, size: count << 12, write: false)
                faulted.formUnion(first..<(first + count))
            case 66..<90:  // invalidate a host range with unaligned edges
                let start = Self.hostBase + rng.next() % Self.hostSpace
                let length = 1 + rng.next() % (rng.next() % 4 == 0 ? 4 * MiB : 64 * KiB)
                try engine.invalidate(hostAddress: start, length: length)
                let firstPage = start & ~0xfff
                let end = (start + length + 0xfff) & ~0xfff
                var asked: Set<UInt64> = []
                for m in mappings.values {
                    for p in m.pages
                    where faulted.contains(p) && m.host(ofPage: p) >= firstPage && m.host(ofPage: p) < end {
                        asked.insert(p)
                    }
                }
                // No translation survives in the invalidated range.
                for p in asked {
                    for d in domains where engine.pageTable(d).translate(p << 12) != nil {
                        Issue.record("\(context): iova page \(hex(p << 12)) still translates after its invalidation")
                    }
                }
                // More than asked may go, but only the rest of a 2 MiB block that was asked into.
                let remaining = faulted.subtracting(asked)
                let actual = Set(remaining.filter { engine.isMarkedMapped(iova: $0 << 12) })
                let askedBlocks = Set(asked.map { $0 >> 9 })
                for extra in remaining.subtracting(actual) where !askedBlocks.contains(extra >> 9) {
                    Issue.record(
                        "\(context): page \(hex(extra << 12)) was unmapped though not in the range or its block")
                }
                faulted = actual
            default:  // unmap a mapping, sometimes only a part (refused)
                guard let m = pick(&rng) else { continue }
                if m.size > 4096 && rng.next() % 4 == 0 {
                    #expect(throws: DMAMapError.self, "\(context)") {
                        try engine.unmap(iova: m.iova, size: m.size - 4096)
                    }
                } else {
                    #expect(try engine.unmap(iova: m.iova, size: m.size) == m.size)
                    mappings[m.iova] = nil
                    faulted.subtract(m.pages)
                }
            }
            // After every step: bits agree with the model, and every invariant holds.
            #expect(
                engine.mappedPageCount == faulted.count,
                "\(context): \(engine.mappedPageCount) bits set, model has \(faulted.count)")
            for p in faulted where !engine.isMarkedMapped(iova: p << 12) {
                Issue.record("\(context): page \(hex(p << 12)) faulted in the model but not marked in the engine")
                break
            }
            engine.pageTable(domains[0]).forEachLeaf { _, t in if t.pageSize != .size4K { blocksSeen += 1 } }
            let violations = engine.checkInvariants(limit: 3)
            #expect(violations.isEmpty, "\(context): \(violations)")
            if !violations.isEmpty || engine.mappedPageCount != faulted.count { return }
        }
        let stats = engine.statistics
        #expect(blocksSeen > 10, "the generator must produce 2 MiB blocks to exercise unmap of more than asked")
        #expect(stats.mappedPages > 500 && stats.pagesUnmapped > 100 && stats.iotlbSyncs > 100, "\(stats)")
        #expect(
            stats.blockMappings == faultBlocks,
            "blocks mapped on faults: engine \(stats.blockMappings), model \(faultBlocks)")
        if blocks { #expect(faultBlocks > 10, "the generator must make faults that map blocks") }
    }
}

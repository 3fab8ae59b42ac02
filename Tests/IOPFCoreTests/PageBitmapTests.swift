// Exhaustive checks of PageBitmap against swift-collections' BitSet as an oracle: every
// range of every small universe, from seeded random starting contents.

import BitCollections
import Testing
@testable import IOPFCore

@Suite(.timeLimit(.minutes(15))) struct PageBitmapTests {
    static let universes = [0, 1, 2, 63, 64, 65, 127, 128, 130, 200]

    static func randomPair(count: Int, using rng: inout SeededGenerator) -> (PageBitmap, BitSet) {
        var bitmap = PageBitmap(count: count)
        var oracle = BitSet()
        for i in 0..<count where rng.next() % 3 == 0 {
            bitmap.set(i)
            oracle.insert(i)
        }
        return (bitmap, oracle)
    }

    static func assertSame(_ bitmap: PageBitmap, _ oracle: BitSet, _ comment: Comment? = nil) {
        #expect(bitmap.population == oracle.count, comment)
        for i in 0..<bitmap.count where bitmap.test(i) != oracle.contains(i) {
            Issue.record(
                """
                bit \(i) differs: bitmap \(bitmap.test(i)), oracle \(oracle.contains(i)) \
                \(comment.map { "\($0)" } ?? "")
                """
            )
            return
        }
    }

    @Test(arguments: universes)
    func rangeSetAndClearMatchOracle(count: Int) {
        var rng = SeededGenerator(seed: UInt64(count) &+ 1)
        for lo in 0...count {
            for hi in lo...count {
                var (bitmap, oracle) = Self.randomPair(count: count, using: &rng)
                #expect(bitmap.population(in: lo..<hi) == oracle.filter { (lo..<hi).contains($0) }.count)
                bitmap.set(lo..<hi)
                oracle.formUnion(lo..<hi)
                Self.assertSame(bitmap, oracle, "set \(lo)..<\(hi) in \(count)")
                var (bitmap2, oracle2) = Self.randomPair(count: count, using: &rng)
                bitmap2.clear(lo..<hi)
                oracle2.subtract(lo..<hi)
                Self.assertSame(bitmap2, oracle2, "clear \(lo)..<\(hi) in \(count)")
            }
        }
    }

    @Test(arguments: universes)
    func findNextMatchesOracle(count: Int) {
        var rng = SeededGenerator(seed: UInt64(count) &* 7 &+ 3)
        for _ in 0..<4 {
            let (bitmap, oracle) = Self.randomPair(count: count, using: &rng)
            for from in 0...(count + 2) {
                let nextSet = oracle.first { $0 >= from } ?? count
                let nextClear = (from..<max(from, count)).first { !oracle.contains($0) } ?? count
                #expect(bitmap.findNextSet(from: from) == nextSet, "findNextSet(from: \(from)) in \(count)")
                #expect(bitmap.findNextClear(from: from) == nextClear, "findNextClear(from: \(from)) in \(count)")
                for to in from...max(from, count) where to <= count {
                    let set = oracle.first { $0 >= from && $0 < to } ?? to
                    let clear = (from..<to).first { !oracle.contains($0) } ?? to
                    #expect(
                        bitmap.findNextSet(from: from, to: to) == set,
                        "findNextSet(from: \(from), to: \(to)) in \(count)")
                    #expect(
                        bitmap.findNextClear(from: from, to: to) == clear,
                        "findNextClear(from: \(from), to: \(to)) in \(count)")
                }
            }
        }
    }

    @Test(arguments: universes)
    func findPreviousClearMatchesOracle(count: Int) {
        var rng = SeededGenerator(seed: UInt64(count) &* 11 &+ 5)
        for _ in 0..<4 {
            let (bitmap, oracle) = Self.randomPair(count: count, using: &rng)
            for from in 0...count {
                for to in from...count {
                    let clear = (from..<to).last { !oracle.contains($0) } ?? from - 1
                    #expect(
                        bitmap.findPreviousClear(from: from, to: to) == clear,
                        "findPreviousClear(from: \(from), to: \(to)) in \(count)")
                }
            }
        }
        // Across chunks never allocated and a long run of set bits.
        var big = PageBitmap(count: 1 << 17)
        big.set(40_000..<100_000)
        #expect(big.findPreviousClear(from: 0, to: 99_999) == 39_999)
        #expect(big.findPreviousClear(from: 50_000, to: 99_999) == 49_999)
        #expect(big.findPreviousClear(from: 0, to: 1 << 17) == (1 << 17) - 1)
        #expect(big.findPreviousClear(from: 0, to: 10) == 9)
    }

    @Test func singleBitsAndEmptiness() {
        var b = PageBitmap(count: 70)
        #expect(b.isEmpty)
        b.set(69)
        b.set(0)
        #expect(b.test(69) && b.test(0) && !b.test(1))
        #expect(b.population == 2)
        b.clear(69)
        #expect(!b.test(69) && b.population == 1)
        b.clear(0)
        #expect(b.isEmpty)
        #expect(b.findNextSet(from: 0) == 70)
        #expect(b.findNextClear(from: 0) == 0)
    }

    @Test func runsOverLargeBitmap() {
        // 1 GiB of 4 KiB pages: runs found by set/clear scanning, like the invalidation walk.
        var b = PageBitmap(count: 262_144)
        b.set(100..<5000)
        b.set(70_000..<70_001)
        b.set(262_000..<262_144)
        var runs: [Range<Int>] = []
        var i = b.findNextSet(from: 0)
        while i < b.count {
            let end = b.findNextClear(from: i)
            runs.append(i..<end)
            i = b.findNextSet(from: end)
        }
        #expect(runs == [100..<5000, 70_000..<70_001, 262_000..<262_144])
    }
}

/// The sparse storage: bitmaps of several chunks, with ranges across chunk edges, against
/// the oracle; and a huge bitmap that costs its directory, not its size.
@Suite(.timeLimit(.minutes(15))) struct SparsePageBitmapTests {
    @Test func rangesAcrossChunksMatchOracle() {
        let count = 3 * PageBitmap.chunkBits + 77
        var rng = SeededGenerator(seed: 42)
        var bitmap = PageBitmap(count: count)
        var oracle = BitSet()
        for step in 0..<400 {
            let a = Int(rng.next() % UInt64(count + 1))
            let b = Int(rng.next() % UInt64(count + 1))
            let range = min(a, b)..<max(a, b)
            if step % 3 == 2 {
                bitmap.clear(range)
                oracle.subtract(range)
            } else {
                bitmap.set(range)
                oracle.formUnion(range)
            }
            let from = Int(rng.next() % UInt64(count))
            #expect(bitmap.findNextSet(from: from) == (oracle.first { $0 >= from } ?? count))
            #expect(bitmap.findNextClear(from: from) == ((from..<count).first { !oracle.contains($0) } ?? count))
            #expect(bitmap.population(in: range) == oracle.filter { range.contains($0) }.count)
        }
        PageBitmapTests.assertSame(bitmap, oracle)
    }

    @Test func aHugeBitmapAllocatesOnlyWhereSet() {
        // 16 TiB of 4 KiB pages: 512 MiB of words if it were dense.
        let pages = 1 << 32
        var bitmap = PageBitmap(count: pages)
        #expect(bitmap.allocatedBytes == 0 && bitmap.isEmpty)
        #expect(bitmap.findNextSet(from: 0) == pages && bitmap.findNextClear(from: 12) == 12)
        bitmap.set(pages - 1)
        bitmap.set(5..<9)
        #expect(bitmap.allocatedBytes == 2 * PageBitmap.chunkBits / 8)
        #expect(bitmap.findNextSet(from: 9) == pages - 1 && bitmap.population == 5)
        bitmap.clear(0..<pages)
        #expect(bitmap.isEmpty && bitmap == PageBitmap(count: pages))
        #expect(bitmap.allocatedBytes == 2 * PageBitmap.chunkBits / 8, "clearing frees nothing")
    }

    /// The protocol's form (little-endian words) carries exactly the bits, across chunks
    /// never allocated, and ignores bits past the count.
    @Test func littleEndianBytesRoundTrip() {
        let pages = 3 * PageBitmap.chunkBits + 77
        var b = PageBitmap(count: pages)
        for p in [0, 63, 64, 65, 2 * PageBitmap.chunkBits + 5, pages - 1] { b.set(p) }
        let bytes = b.littleEndianBytes
        #expect(bytes.count == (pages + 63) / 64 * 8 && bytes[0] == 1 && bytes[7] == 0x80 && bytes[8] == 3)
        #expect(bytes.withUnsafeBytes { PageBitmap(count: pages, littleEndianBytes: $0) } == b)
        let shorter = bytes.withUnsafeBytes { PageBitmap(count: pages - 1, littleEndianBytes: $0) }
        #expect(shorter.population == b.population - 1)
    }
}

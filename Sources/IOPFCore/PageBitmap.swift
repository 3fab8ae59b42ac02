// PageBitmap.swift — the per-mapping "iopf mapped" bitmap.
//
// Bit i stands for page i of a DMA mapping. Ranges are half-open `Range<Int>` (exclusive
// end). Bits at and above `count` in the last word are always zero, so word-wise scans
// need no masking at the top.
//
// Why not swift-collections' `BitSet`: it has no find-next-zero and shrinks its storage on
// removal. This bitmap is fixed-size with word storage and a `find_next_bit`-style API, the
// shape the invalidation walk needs; `BitSet` serves as the oracle in the tests.

public struct PageBitmap: Sendable, Equatable {
    /// Number of bits (pages).
    public let count: Int
    @usableFromInline var words: [UInt64]

    public init(count: Int) {
        precondition(count >= 0, "PageBitmap count \(count) is negative")
        self.count = count
        words = Array(repeating: 0, count: (count + 63) >> 6)
    }

    @inlinable @inline(__always)
    func checkIndex(_ i: Int) {
        precondition(i >= 0 && i < count, "page index \(i) is outside the bitmap of \(count) pages")
    }

    @inlinable
    public func test(_ i: Int) -> Bool {
        checkIndex(i)
        return words[i &>> 6] & (1 &<< UInt64(i & 63)) != 0
    }

    @inlinable
    public mutating func set(_ i: Int) {
        checkIndex(i)
        words[i &>> 6] |= 1 &<< UInt64(i & 63)
    }

    @inlinable
    public mutating func clear(_ i: Int) {
        checkIndex(i)
        words[i &>> 6] &= ~(1 &<< UInt64(i & 63))
    }

    /// Sets every bit in `range`.
    public mutating func set(_ range: Range<Int>) {
        forEachWord(in: range) { word, mask in word |= mask }
    }

    /// Clears every bit in `range`.
    public mutating func clear(_ range: Range<Int>) {
        forEachWord(in: range) { word, mask in word &= ~mask }
    }

    /// Number of set bits in `range`.
    public func population(in range: Range<Int>) -> Int {
        checkRange(range)
        guard !range.isEmpty else { return 0 }
        var total = 0
        let (first, last) = (range.lowerBound &>> 6, (range.upperBound - 1) &>> 6)
        for w in first...last {
            total += (words[w] & Self.mask(word: w, range: range)).nonzeroBitCount
        }
        return total
    }

    /// Number of set bits.
    public var population: Int {
        words.reduce(0) { $0 + $1.nonzeroBitCount }
    }

    public var isEmpty: Bool { words.allSatisfy { $0 == 0 } }

    /// Sets every bit set in `other` (same count).
    public mutating func formUnion(_ other: PageBitmap) {
        precondition(other.count == count, "union of bitmaps of \(count) and \(other.count) pages")
        for w in words.indices { words[w] |= other.words[w] }
    }

    /// Bits set here and clear in every one of `others` (same counts).
    public func population(notIn others: PageBitmap...) -> Int {
        precondition(others.allSatisfy { $0.count == count }, "bitmaps of different sizes")
        var total = 0
        for w in words.indices {
            total += others.reduce(words[w]) { $0 & ~$1.words[w] }.nonzeroBitCount
        }
        return total
    }

    /// The first set bit at or after `from`, or `count` when there is none.
    public func findNextSet(from: Int) -> Int {
        find(from: from, to: count, invert: 0)
    }

    /// The first clear bit at or after `from`, or `count` when there is none.
    public func findNextClear(from: Int) -> Int {
        find(from: from, to: count, invert: ~0)
    }

    /// The first set bit in `from..<to`, or `to` when there is none. Bounding the scan
    /// keeps a small query on a large bitmap cheap (`find_next_bit`'s `size`).
    public func findNextSet(from: Int, to: Int) -> Int {
        find(from: from, to: to, invert: 0)
    }

    /// The first clear bit in `from..<to`, or `to` when there is none.
    public func findNextClear(from: Int, to: Int) -> Int {
        find(from: from, to: to, invert: ~0)
    }

    @inline(__always)
    private func find(from: Int, to: Int, invert: UInt64) -> Int {
        precondition(from >= 0 && to <= count, "findNext in \(from)..<\(to) is outside the bitmap of \(count) pages")
        guard from < to else { return to }
        var w = from &>> 6
        let lastWord = (to - 1) &>> 6
        var word = (words[w] ^ invert) & (~0 &<< UInt64(from & 63))
        while word == 0 {
            w += 1
            if w > lastWord { return to }
            word = words[w] ^ invert
        }
        return Swift.min(w &<< 6 + word.trailingZeroBitCount, to)
    }

    @inline(__always)
    private func checkRange(_ range: Range<Int>) {
        precondition(
            range.lowerBound >= 0 && range.upperBound <= count,
            "page range \(range) is outside the bitmap of \(count) pages")
    }

    /// The bits of word `w` that lie in `range`: edge words are masked, middle words whole.
    @inline(__always)
    private static func mask(word w: Int, range: Range<Int>) -> UInt64 {
        let wordStart = w &<< 6
        let lo = Swift.max(range.lowerBound - wordStart, 0)
        let hi = Swift.min(range.upperBound - wordStart, 64)
        let low: UInt64 = ~0 &<< UInt64(lo)
        let high: UInt64 = hi == 64 ? ~0 : (1 &<< UInt64(hi)) &- 1
        return low & high
    }

    @inline(__always)
    private mutating func forEachWord(in range: Range<Int>, _ body: (inout UInt64, UInt64) -> Void) {
        checkRange(range)
        guard !range.isEmpty else { return }
        let (first, last) = (range.lowerBound &>> 6, (range.upperBound - 1) &>> 6)
        words.withUnsafeMutableBufferPointer { words in
            body(&words[first], Self.mask(word: first, range: range))
            guard last > first else { return }
            for w in (first + 1)..<last { body(&words[w], ~0) }
            body(&words[last], Self.mask(word: last, range: range))
        }
    }
}

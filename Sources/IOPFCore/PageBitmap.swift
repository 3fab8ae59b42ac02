// PageBitmap.swift — the per-mapping "iopf mapped" bitmap (and the dirty and host-gone
// bitmaps, which share its shape).
//
// Bit i stands for page i of a DMA mapping. Ranges are half-open `Range<Int>` (exclusive
// end). Bits at and above `count` in the last word are always zero, so word-wise scans
// need no masking at the top.
//
// Sparse: the words live in chunks of `chunkBits` bits (128 MiB of 4 KiB pages), each
// allocated on its first set bit. A mapping's size is its host's word, so a 16 TiB mapping
// must cost its directory (8 bytes per chunk), not 512 MiB of zeros; a scan skips a chunk
// that was never set with one comparison, so an invalidation costs by what was mapped,
// not by the size of the range. Chunks are never freed once allocated (a cleared chunk is
// all zeros): a mapping that faulted in a range keeps its words until it goes.
//
// Why not swift-collections' `BitSet`: it has no find-next-zero and shrinks its storage on
// removal. This bitmap is fixed-size with word storage and a `find_next_bit`-style API, the
// shape the invalidation walk needs; `BitSet` serves as the oracle in the tests.

public struct PageBitmap: Sendable {
    /// Number of bits (pages).
    public let count: Int
    /// `chunkWords` words each (the last one as many as `count` needs), or empty while
    /// nothing in the chunk was ever set.
    @usableFromInline var chunks: [[UInt64]]
    /// Number of set bits, kept as bits change: an invalidation can tell in O(1) that a
    /// mapping has nothing mapped any more.
    public private(set) var population = 0

    @usableFromInline static let chunkShift = 15
    /// Bits per chunk: 32768 pages, 4 KiB of words.
    public static let chunkBits = 1 << chunkShift
    @usableFromInline static let chunkWords = chunkBits >> 6

    public init(count: Int) {
        precondition(count >= 0, "PageBitmap count \(count) is negative")
        self.count = count
        chunks = Array(repeating: [], count: (count + Self.chunkBits - 1) >> Self.chunkShift)
    }

    /// Words in chunk `c` once allocated.
    @inline(__always)
    private func wordsIn(chunk c: Int) -> Int {
        Swift.min(Self.chunkWords, ((count - c << Self.chunkShift) + 63) >> 6)
    }

    /// Bytes of words allocated: what the bitmap holds beyond its directory.
    public var allocatedBytes: Int { chunks.reduce(0) { $0 + $1.count * 8 } }

    @inlinable @inline(__always)
    func checkIndex(_ i: Int) {
        precondition(i >= 0 && i < count, "page index \(i) is outside the bitmap of \(count) pages")
    }

    /// Word `w` (0 in a chunk never set).
    @inline(__always)
    private func word(_ w: Int) -> UInt64 {
        let c = w >> (Self.chunkShift - 6)
        let chunk = chunks[c]
        return chunk.isEmpty ? 0 : chunk[w & (Self.chunkWords - 1)]
    }

    @inlinable
    public func test(_ i: Int) -> Bool {
        checkIndex(i)
        let chunk = chunks[i &>> Self.chunkShift]
        return !chunk.isEmpty && chunk[(i &>> 6) & (Self.chunkWords - 1)] & (1 &<< UInt64(i & 63)) != 0
    }

    public mutating func set(_ i: Int) {
        checkIndex(i)
        let c = i &>> Self.chunkShift
        if chunks[c].isEmpty { chunks[c] = Array(repeating: 0, count: wordsIn(chunk: c)) }
        let bit: UInt64 = 1 &<< UInt64(i & 63)
        let w = (i &>> 6) & (Self.chunkWords - 1)
        if chunks[c][w] & bit == 0 {
            chunks[c][w] |= bit
            population += 1
        }
    }

    public mutating func clear(_ i: Int) {
        checkIndex(i)
        let c = i &>> Self.chunkShift
        guard !chunks[c].isEmpty else { return }
        let bit: UInt64 = 1 &<< UInt64(i & 63)
        let w = (i &>> 6) & (Self.chunkWords - 1)
        if chunks[c][w] & bit != 0 {
            chunks[c][w] &= ~bit
            population -= 1
        }
    }

    /// Sets every bit in `range`.
    public mutating func set(_ range: Range<Int>) {
        var added = 0
        forEachWord(in: range, allocating: true) { word, mask in
            added += (mask & ~word).nonzeroBitCount
            word |= mask
        }
        population += added
    }

    /// Clears every bit in `range`.
    public mutating func clear(_ range: Range<Int>) {
        var removed = 0
        forEachWord(in: range, allocating: false) { word, mask in
            removed += (mask & word).nonzeroBitCount
            word &= ~mask
        }
        population -= removed
    }

    /// Number of set bits in `range`.
    public func population(in range: Range<Int>) -> Int {
        checkRange(range)
        guard !range.isEmpty else { return 0 }
        var total = 0
        let (first, last) = (range.lowerBound &>> 6, (range.upperBound - 1) &>> 6)
        var w = first
        while w <= last {
            let c = w >> (Self.chunkShift - 6)
            if chunks[c].isEmpty {
                w = (c + 1) << (Self.chunkShift - 6)
                continue
            }
            total += (word(w) & Self.mask(word: w, range: range)).nonzeroBitCount
            w += 1
        }
        return total
    }

    public var isEmpty: Bool { population == 0 }

    /// Sets every bit set in `other` (same count).
    public mutating func formUnion(_ other: PageBitmap) {
        precondition(other.count == count, "union of bitmaps of \(count) and \(other.count) pages")
        for c in chunks.indices where !other.chunks[c].isEmpty {
            if chunks[c].isEmpty { chunks[c] = Array(repeating: 0, count: other.chunks[c].count) }
            for w in chunks[c].indices {
                population += (other.chunks[c][w] & ~chunks[c][w]).nonzeroBitCount
                chunks[c][w] |= other.chunks[c][w]
            }
        }
    }

    /// Bits set here and clear in every one of `others` (same counts).
    public func population(notIn others: PageBitmap...) -> Int {
        precondition(others.allSatisfy { $0.count == count }, "bitmaps of different sizes")
        var total = 0
        for c in chunks.indices where !chunks[c].isEmpty {
            for w in chunks[c].indices {
                total += others.reduce(chunks[c][w]) { $1.chunks[c].isEmpty ? $0 : $0 & ~$1.chunks[c][w] }.nonzeroBitCount
            }
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
        var bits = (word(w) ^ invert) & (~0 &<< UInt64(from & 63))
        while bits == 0 {
            w += 1
            if w > lastWord { return to }
            let c = w >> (Self.chunkShift - 6)
            if chunks[c].isEmpty {
                // A chunk never set: no set bit in it (skip it whole), every bit clear.
                if invert != 0 { return Swift.min(w &<< 6, to) }
                w = ((c + 1) << (Self.chunkShift - 6)) - 1
                continue
            }
            bits = chunks[c][w & (Self.chunkWords - 1)] ^ invert
        }
        return Swift.min(w &<< 6 + bits.trailingZeroBitCount, to)
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

    /// Calls `body` on each word of `range` with the mask of its bits in the range, chunk by
    /// chunk. A chunk never set is allocated first when `allocating`, else skipped (all its
    /// bits are clear already).
    @inline(__always)
    private mutating func forEachWord(in range: Range<Int>, allocating: Bool, _ body: (inout UInt64, UInt64) -> Void) {
        checkRange(range)
        guard !range.isEmpty else { return }
        var lo = range.lowerBound
        while lo < range.upperBound {
            let c = lo &>> Self.chunkShift
            let chunkStart = c << Self.chunkShift
            let hi = Swift.min(range.upperBound, chunkStart + Self.chunkBits)
            defer { lo = hi }
            if chunks[c].isEmpty {
                guard allocating else { continue }
                chunks[c] = Array(repeating: 0, count: wordsIn(chunk: c))
            }
            let (first, last) = (lo &>> 6, (hi - 1) &>> 6)
            let base = chunkStart >> 6
            chunks[c].withUnsafeMutableBufferPointer { words in
                body(&words[first - base], Self.mask(word: first, range: range))
                guard last > first else { return }
                for w in (first + 1)..<last { body(&words[w - base], ~0) }
                body(&words[last - base], Self.mask(word: last, range: range))
            }
        }
    }
}

extension PageBitmap: Equatable {
    /// Equal when the same bits are set, however much of each is allocated.
    public static func == (a: PageBitmap, b: PageBitmap) -> Bool {
        guard a.count == b.count else { return false }
        for c in a.chunks.indices where a.chunks[c] != b.chunks[c] {
            let (x, y) = (a.chunks[c], b.chunks[c])
            if x.isEmpty ? !y.allSatisfy({ $0 == 0 }) : y.isEmpty ? !x.allSatisfy({ $0 == 0 }) : true { return false }
        }
        return true
    }
}

// PageBitmap.swift — the per-mapping "iopf mapped" bitmap (and the dirty and host-gone
// bitmaps, which share its shape).
//
// Bit i stands for page i of a DMA mapping. Ranges are half-open `Range<Int>` (exclusive
// end). Bits at and above `count` in the last word are always zero, so word-wise scans
// need no masking at the top.
//
// Sparse: the words live in chunks of `chunkBits` bits (128 MiB of 4 KiB pages), each
// allocated on its first set bit (in one flat array, found through a directory). A
// mapping's size is its host's word, so a 16 TiB mapping
// must cost its directory (8 bytes per chunk), not 512 MiB of zeros; a scan skips a chunk
// that was never set with one comparison, so an invalidation costs by what was mapped,
// not by the size of the range. Chunks are never freed once allocated (a cleared chunk is
// all zeros): a mapping that faulted in a range keeps its words until it goes.
//
// Why not swift-collections' `BitSet`: it has no find-next-zero and shrinks its storage on
// removal. This bitmap is fixed-size with word storage and a `find_next_bit`-style API, the
// shape the invalidation walk needs; `BitSet` serves as the oracle in the tests.

/// One bit per page of a mapping, set while the page is mapped in every domain.
public struct PageBitmap: Sendable {
    /// Number of bits (pages).
    public let count: Int
    /// Where chunk c's words start in `words`, or -1 while nothing in the chunk was ever
    /// set. One flat array, not an array per chunk: a bit is reached without reference
    /// counting (an array per chunk cost two atomics per access, doubling an invalidation).
    @usableFromInline var directory: [Int32]
    /// The allocated chunks' words, `chunkWords` each (the last chunk as many as `count`
    /// needs), in the order they were allocated.
    @usableFromInline var words: [UInt64] = []
    /// Number of set bits, kept as bits change: an invalidation can tell in O(1) that a
    /// mapping has nothing mapped any more.
    public private(set) var population = 0

    @usableFromInline static let chunkShift = 15
    /// Bits per chunk: 32768 pages, 4 KiB of words.
    public static let chunkBits = 1 << chunkShift
    @usableFromInline static let chunkWords = chunkBits >> 6

    /// A bitmap of `count` clear bits.
    public init(count: Int) {
        precondition(count >= 0, "PageBitmap count \(count) is negative")
        self.count = count
        directory = Array(repeating: -1, count: (count + Self.chunkBits - 1) >> Self.chunkShift)
    }

    /// Words in chunk `c` once allocated.
    @inline(__always)
    private func wordsIn(chunk c: Int) -> Int {
        Swift.min(Self.chunkWords, ((count - c << Self.chunkShift) + 63) >> 6)
    }

    /// Bytes of words allocated: what the bitmap holds beyond its directory.
    public var allocatedBytes: Int { words.count * 8 }

    @inlinable @inline(__always)
    func checkIndex(_ i: Int) {
        precondition(i >= 0 && i < count, "page index \(i) is outside the bitmap of \(count) pages")
    }

    /// Index in `words` of word `w`, allocating its chunk first; the chunk's start.
    @inline(__always)
    private mutating func chunkStart(allocating c: Int) -> Int {
        if directory[c] < 0 {
            directory[c] = Int32(words.count)
            words.append(contentsOf: repeatElement(0, count: wordsIn(chunk: c)))
        }
        return Int(directory[c])
    }

    /// Word `w` (0 in a chunk never set).
    @inline(__always)
    private func word(_ w: Int) -> UInt64 {
        let start = directory[w &>> (Self.chunkShift - 6)]
        return start < 0 ? 0 : words[Int(start) + w & (Self.chunkWords - 1)]
    }

    /// Whether bit `i` is set.
    @inlinable
    public func test(_ i: Int) -> Bool {
        checkIndex(i)
        let start = directory[i &>> Self.chunkShift]
        return start >= 0 && words[Int(start) + (i &>> 6) & (Self.chunkWords - 1)] & (1 &<< UInt64(i & 63)) != 0
    }

    /// Sets bit `i`.
    public mutating func set(_ i: Int) {
        checkIndex(i)
        let w = chunkStart(allocating: i &>> Self.chunkShift) + (i &>> 6) & (Self.chunkWords - 1)
        let bit: UInt64 = 1 &<< UInt64(i & 63)
        if words[w] & bit == 0 {
            words[w] |= bit
            population += 1
        }
    }

    /// Clears bit `i`.
    public mutating func clear(_ i: Int) {
        checkIndex(i)
        let start = directory[i &>> Self.chunkShift]
        guard start >= 0 else { return }
        let w = Int(start) + (i &>> 6) & (Self.chunkWords - 1)
        let bit: UInt64 = 1 &<< UInt64(i & 63)
        if words[w] & bit != 0 {
            words[w] &= ~bit
            population -= 1
        }
    }

    /// Sets every bit in `range`.
    @inline(__always)
    public mutating func set(_ range: Range<Int>) {
        var added = 0
        forEachWord(in: range, allocating: true) { word, mask in
            added += (mask & ~word).nonzeroBitCount
            word |= mask
        }
        population += added
    }

    /// Clears every bit in `range`.
    @inline(__always)
    public mutating func clear(_ range: Range<Int>) {
        var removed = 0
        forEachWord(in: range, allocating: false) { word, mask in
            removed += (mask & word).nonzeroBitCount
            word &= ~mask
        }
        population -= removed
    }

    /// Number of set bits in `range`.
    @inline(__always)
    public func population(in range: Range<Int>) -> Int {
        checkRange(range)
        guard !range.isEmpty else { return 0 }
        var total = 0
        let (first, last) = (range.lowerBound &>> 6, (range.upperBound - 1) &>> 6)
        var w = first
        while w <= last {
            let c = w >> (Self.chunkShift - 6)
            if directory[c] < 0 {
                w = (c + 1) << (Self.chunkShift - 6)
                continue
            }
            total += (word(w) & Self.mask(word: w, range: range)).nonzeroBitCount
            w += 1
        }
        return total
    }

    /// Whether no bit is set.
    public var isEmpty: Bool { population == 0 }

    /// Sets every bit set in `other` (same count).
    public mutating func formUnion(_ other: PageBitmap) {
        precondition(other.count == count, "union of bitmaps of \(count) and \(other.count) pages")
        for c in directory.indices where other.directory[c] >= 0 {
            let (mine, theirs) = (chunkStart(allocating: c), Int(other.directory[c]))
            for k in 0..<wordsIn(chunk: c) {
                population += (other.words[theirs + k] & ~words[mine + k]).nonzeroBitCount
                words[mine + k] |= other.words[theirs + k]
            }
        }
    }

    /// The bits as the protocol's bitmaps carry them: little-endian u64 words, bit k of
    /// word k / 64 for bit k, `(count + 63) / 64` words.
    public var littleEndianBytes: [UInt8] {
        var out = [UInt8](repeating: 0, count: (count + 63) / 64 * 8)
        out.withUnsafeMutableBytes { b in
            for c in directory.indices where directory[c] >= 0 {
                let first = c << (Self.chunkShift - 6)
                for k in 0..<wordsIn(chunk: c) {
                    b.storeBytes(
                        of: words[Int(directory[c]) + k].littleEndian, toByteOffset: (first + k) * 8, as: UInt64.self)
                }
            }
        }
        return out
    }

    /// A bitmap of `count` bits from the protocol's form (`littleEndianBytes`); bits past
    /// `count` and bytes past its words are ignored.
    public init(count: Int, littleEndianBytes bytes: UnsafeRawBufferPointer) {
        self.init(count: count)
        let words = min((count + 63) / 64, bytes.count / 8)
        for w in 0..<words {
            var word = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: w * 8, as: UInt64.self))
            while word != 0 {
                let bit = w * 64 + word.trailingZeroBitCount
                guard bit < count else { break }
                set(bit)
                word &= word - 1
            }
        }
    }

    /// Bits set here and clear in every one of `others` (same counts).
    public func population(notIn others: PageBitmap...) -> Int {
        precondition(others.allSatisfy { $0.count == count }, "bitmaps of different sizes")
        var total = 0
        for c in directory.indices where directory[c] >= 0 {
            for k in 0..<wordsIn(chunk: c) {
                let w = c << (Self.chunkShift - 6) + k
                total += others.reduce(word(w)) { $0 & ~$1.word(w) }.nonzeroBitCount
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
    @inline(__always)
    public func findNextSet(from: Int, to: Int) -> Int {
        find(from: from, to: to, invert: 0)
    }

    /// The first clear bit in `from..<to`, or `to` when there is none.
    @inline(__always)
    public func findNextClear(from: Int, to: Int) -> Int {
        find(from: from, to: to, invert: ~0)
    }

    /// The last clear bit in `from..<to`, or `from - 1` when there is none (a run of set
    /// bits ending at `to` reaches back to the result + 1).
    public func findPreviousClear(from: Int, to: Int) -> Int {
        precondition(
            from >= 0 && from <= to && to <= count,
            "findPrevious in \(from)..<\(to) is outside the bitmap of \(count) pages")
        var hi = to
        while hi > from {
            let w = (hi - 1) &>> 6
            let lo = Swift.max(from, w &<< 6)
            var clear = ~word(w)
            let top = hi - w &<< 6
            if top < 64 { clear &= (1 &<< UInt64(top)) &- 1 }
            clear &= ~0 &<< UInt64(lo - w &<< 6)
            if clear != 0 { return w &<< 6 + 63 - clear.leadingZeroBitCount }
            hi = lo
        }
        return from - 1
    }

    @inline(__always)
    private func find(from: Int, to: Int, invert: UInt64) -> Int {
        precondition(from >= 0 && to <= count, "findNext in \(from)..<\(to) is outside the bitmap of \(count) pages")
        var pos = from
        while pos < to {
            let c = pos &>> Self.chunkShift
            let end = Swift.min(to, (c + 1) &<< Self.chunkShift)
            let start = directory[c]
            if start < 0 {
                // A chunk never set: no set bit in it (skip it whole), every bit clear.
                if invert != 0 { return pos }
            } else {
                // Word indexes within the chunk, offset by where its words start.
                let base = Int(start) - (c &<< (Self.chunkShift - 6))
                var w = pos &>> 6
                let lastWord = (end - 1) &>> 6
                var bits = (words[base + w] ^ invert) & (~0 &<< UInt64(pos & 63))
                while bits == 0 && w < lastWord {
                    w += 1
                    bits = words[base + w] ^ invert
                }
                if bits != 0 { return Swift.min(w &<< 6 + bits.trailingZeroBitCount, to) }
            }
            pos = end
        }
        return to
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
            let hi = Swift.min(range.upperBound, (c + 1) << Self.chunkShift)
            defer { lo = hi }
            guard allocating || directory[c] >= 0 else { continue }
            let base = chunkStart(allocating: c) - (c << (Self.chunkShift - 6))
            let (first, last) = (lo &>> 6, (hi - 1) &>> 6)
            words.withUnsafeMutableBufferPointer { words in
                body(&words[base + first], Self.mask(word: first, range: range))
                guard last > first else { return }
                for w in (first + 1)..<last { body(&words[base + w], ~0) }
                body(&words[base + last], Self.mask(word: last, range: range))
            }
        }
    }
}

extension PageBitmap: Equatable {
    /// Equal when the same bits are set, however much of each is allocated.
    public static func == (a: PageBitmap, b: PageBitmap) -> Bool {
        guard a.count == b.count, a.population == b.population else { return false }
        for c in a.directory.indices where a.directory[c] >= 0 || b.directory[c] >= 0 {
            for k in 0..<a.wordsIn(chunk: c) {
                let w = c << (chunkShift - 6) + k
                if a.word(w) != b.word(w) { return false }
            }
        }
        return true
    }
}

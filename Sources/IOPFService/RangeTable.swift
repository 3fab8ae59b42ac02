// RangeTable.swift — disjoint host ranges with a value each, sorted by start: what a host's
// bindings (host range → memfd offset) and its registered userfaultfd ranges are kept in.
// Lookups are binary searches; cutting or inserting costs O(log n + k) plus one memmove,
// so a host that moves its memory a hundred thousand times pays the same per move at the
// end as at the start, and ranges it gave up (unmapped, moved) are pruned, not kept.
// Ranges are `[start, end)`.

struct RangeTable<Value: Equatable>: Equatable {
    struct Entry: Equatable {
        var range: Range<UInt64>
        var value: Value
    }

    /// How a value changes when its range loses `bytes` at the front (a memfd offset grows).
    let advance: (Value, UInt64) -> Value
    private(set) var entries: [Entry] = []

    init(advance: @escaping (Value, UInt64) -> Value) { self.advance = advance }

    static func == (a: RangeTable, b: RangeTable) -> Bool { a.entries == b.entries }

    var count: Int { entries.count }

    /// The first entry that ends after `address`.
    private func firstIndex(endingAfter address: UInt64) -> Int {
        var (lo, hi) = (0, entries.count)
        while lo < hi {
            let mid = (lo + hi) / 2
            if entries[mid].range.upperBound <= address { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// The entry holding `address`.
    func entry(containing address: UInt64) -> Entry? {
        let i = firstIndex(endingAfter: address)
        guard i < entries.count, entries[i].range.lowerBound <= address else { return nil }
        return entries[i]
    }

    /// Removes `range` from every entry it overlaps, keeping what sticks out on either side.
    mutating func cut(_ range: Range<UInt64>) {
        guard !range.isEmpty else { return }
        let lo = firstIndex(endingAfter: range.lowerBound)
        var hi = lo
        var kept: [Entry] = []
        while hi < entries.count, entries[hi].range.lowerBound < range.upperBound {
            let e = entries[hi]
            if e.range.lowerBound < range.lowerBound {
                kept.append(Entry(range: e.range.lowerBound..<range.lowerBound, value: e.value))
            }
            if range.upperBound < e.range.upperBound {
                kept.append(
                    Entry(
                        range: range.upperBound..<e.range.upperBound,
                        value: advance(e.value, range.upperBound - e.range.lowerBound)))
            }
            hi += 1
        }
        if lo < hi { entries.replaceSubrange(lo..<hi, with: kept) }
    }

    /// Sets `range` to `value`, replacing whatever overlapped it.
    mutating func insert(_ range: Range<UInt64>, _ value: Value) {
        guard !range.isEmpty else { return }
        cut(range)
        entries.insert(Entry(range: range, value: value), at: firstIndex(endingAfter: range.lowerBound))
    }

    /// Whether every address of `range` lies in some entry.
    func covers(_ range: Range<UInt64>) -> Bool {
        var cursor = range.lowerBound
        var i = firstIndex(endingAfter: cursor)
        while cursor < range.upperBound {
            guard i < entries.count, entries[i].range.lowerBound <= cursor else { return false }
            cursor = entries[i].range.upperBound
            i += 1
        }
        return true
    }
}

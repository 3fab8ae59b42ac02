// MappingIndex.swift — DMA mappings by IOVA or by host address: an interval treap (the
// kernel's interval trees for IOVA areas and MMU notifiers, `interval_tree_iter_first`, in
// a treap's shape).
//
// Host ranges may overlap (a buffer mapped at two IOVAs) and may be of any size, so a
// sorted array cannot say where the mappings overlapping an address start. Each node keeps
// the largest end in its subtree; a query skips every subtree that ends at or before the
// range. Insert, remove and each query step are O(log n) expected; a query is
// O(log n + k) for k mappings found. Keys are (start, id), unique. IOVA ranges never
// overlap, so there the mapping holding an address is found by one descent.
//
// Nodes live in arrays indexed by Int32 (no per-node allocation, no reference counting
// on a walk); freed slots are reused. Ranges are `[start, end)`.

struct MappingIndex: Sendable {
    /// Which of a mapping's ranges the index orders: its IOVAs or its host addresses.
    enum Key: Sendable { case iova, host }

    private struct Node {
        var start: UInt64
        var end: UInt64
        var id: UInt64
        /// The largest `end` in this node's subtree.
        var maxEnd: UInt64
        var priority: UInt32
        var left: Int32 = -1
        var right: Int32 = -1
    }

    private var nodes: [Node] = []
    private var mappings: [DMAMapping?] = []
    private var free: [Int32] = []
    private var root: Int32 = -1
    private var seed: UInt32 = 0x9E37_79B9
    private(set) var count = 0
    let key: Key

    init(_ key: Key) { self.key = key }

    /// `m`'s range in this index, `[start, end)`; for a mapping at the top of the IOVA space
    /// `end` is its last address plus one, which fits (IOVAs are below 2^48).
    @inline(__always)
    private func range(of m: DMAMapping) -> (start: UInt64, end: UInt64) {
        key == .iova ? (m.iova, m.iova + m.size) : (m.vaddr, m.vaddrEnd)
    }

    mutating func insert(_ m: DMAMapping) {
        let (start, end) = range(of: m)
        let node = Node(start: start, end: end, id: m.id.rawValue, maxEnd: end, priority: nextPriority())
        let n: Int32
        if let slot = free.popLast() {
            n = slot
            nodes[Int(n)] = node
            mappings[Int(n)] = m
        } else {
            n = Int32(nodes.count)
            nodes.append(node)
            mappings.append(m)
        }
        let (l, r) = split(root, before: (start, m.id.rawValue))
        root = merge(merge(l, n), r)
        count += 1
    }

    /// Removes `m`, found by the range it was inserted with (change a mapping's host
    /// address only after removing it).
    mutating func remove(_ m: DMAMapping) {
        let key = (range(of: m).start, m.id.rawValue)
        let (l, rest) = split(root, before: key)
        let (found, r) = split(rest, before: (key.0, key.1 &+ 1))
        if found >= 0 {
            free.append(found)
            mappings[Int(found)] = nil
            count -= 1
        }
        root = merge(l, r)
    }

    mutating func removeAll() {
        self = MappingIndex(key)
    }

    /// The mapping whose range holds `address`, in an index whose ranges never overlap
    /// (IOVAs): the one that starts last at or before it. One descent, no allocation.
    @inline(__always)
    func mapping(containing address: UInt64) -> DMAMapping? {
        var n = root
        var best: Int32 = -1
        while n >= 0 {
            if nodes[Int(n)].start <= address {
                best = n
                n = nodes[Int(n)].right
            } else {
                n = nodes[Int(n)].left
            }
        }
        guard best >= 0, nodes[Int(best)].end > address else { return nil }
        return mappings[Int(best)].unsafelyUnwrapped
    }

    /// Calls `body` for each mapping whose host range overlaps `[start, end)`, by address.
    func forEach(overlapping start: UInt64, _ end: UInt64, _ body: (DMAMapping) throws -> Void) rethrows {
        // In order, with an explicit stack on the thread's stack: no allocation, no
        // reference counting of the node array per step. A treap's depth is about
        // 2 ln n (22 at 65535 mappings); a deeper path, never seen, falls back to recursion.
        try withUnsafeTemporaryAllocation(of: Int32.self, capacity: 128) { stack throws in
            var depth = 0
            var n = root
            while true {
                // Down the left spine of every subtree that can still overlap.
                while n >= 0 && nodes[Int(n)].maxEnd > start {
                    if depth == stack.count {
                        try visit(n, start, end, body)
                        n = -1
                        break
                    }
                    stack[depth] = n
                    depth += 1
                    n = nodes[Int(n)].left
                }
                guard depth > 0 else { return }
                depth -= 1
                let top = Int(stack[depth])
                guard nodes[top].start < end else { return }  // in order: every later node starts later
                if nodes[top].end > start { try body(mappings[top].unsafelyUnwrapped) }
                n = nodes[top].right
            }
        }
    }

    private func visit(_ n: Int32, _ start: UInt64, _ end: UInt64, _ body: (DMAMapping) throws -> Void) rethrows {
        guard n >= 0, nodes[Int(n)].maxEnd > start else { return }
        try visit(nodes[Int(n)].left, start, end, body)
        guard nodes[Int(n)].start < end else { return }
        if nodes[Int(n)].end > start { try body(mappings[Int(n)].unsafelyUnwrapped) }
        try visit(nodes[Int(n)].right, start, end, body)
    }

    // MARK: Treap

    private mutating func nextPriority() -> UInt32 {
        seed ^= seed << 13
        seed ^= seed >> 17
        seed ^= seed << 5
        return seed
    }

    @inline(__always)
    private static func less(_ a: (UInt64, UInt64), _ b: (UInt64, UInt64)) -> Bool {
        a.0 < b.0 || (a.0 == b.0 && a.1 < b.1)
    }

    private mutating func update(_ n: Int32) {
        var e = nodes[Int(n)].end
        if case let l = nodes[Int(n)].left, l >= 0 { e = max(e, nodes[Int(l)].maxEnd) }
        if case let r = nodes[Int(n)].right, r >= 0 { e = max(e, nodes[Int(r)].maxEnd) }
        nodes[Int(n)].maxEnd = e
    }

    /// Splits `t` into the keys before `key` and the rest.
    private mutating func split(_ t: Int32, before key: (UInt64, UInt64)) -> (Int32, Int32) {
        guard t >= 0 else { return (-1, -1) }
        if Self.less((nodes[Int(t)].start, nodes[Int(t)].id), key) {
            let (l, r) = split(nodes[Int(t)].right, before: key)
            nodes[Int(t)].right = l
            update(t)
            return (t, r)
        } else {
            let (l, r) = split(nodes[Int(t)].left, before: key)
            nodes[Int(t)].left = r
            update(t)
            return (l, t)
        }
    }

    /// Joins two treaps whose keys are all of `a` before all of `b`.
    private mutating func merge(_ a: Int32, _ b: Int32) -> Int32 {
        guard a >= 0 else { return b }
        guard b >= 0 else { return a }
        if nodes[Int(a)].priority > nodes[Int(b)].priority {
            nodes[Int(a)].right = merge(nodes[Int(a)].right, b)
            update(a)
            return a
        } else {
            nodes[Int(b)].left = merge(a, nodes[Int(b)].left)
            update(b)
            return b
        }
    }
}

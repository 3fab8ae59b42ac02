// FaultAround.swift — mapping ahead of sequential faults.
//
// The 2021 VFIO IOPF series mapped one page per fault and measured a 63% slowdown at one
// send; a fixed 512-page pre-map cut it to 1.6-33%. Here the window adapts, as the page
// cache's readahead does per file: per device, up to four streams, each expecting the page
// after what it faulted and mapped ahead. A fault there is sequential and the window grows
// (16, 32, ... up to 512 pages); any other fault starts a new stream with no window, so
// random access maps nothing ahead. Pages mapped ahead are ordinary pages: bit set,
// invalidated like any other; FaultHandler never takes them past the mapping, a page
// already mapped, or a gone range, and the same sequence retry covers them.

/// How far ahead of a fault to map: `--fault-around off|adaptive|N`.
public enum FaultAroundPolicy: Sendable, Equatable, CustomStringConvertible {
    /// Map only the faulting page.
    case off
    /// Map ahead of sequential faults, growing the window while the guesses are used.
    case adaptive
    /// Map this many pages around every fault (1...512).
    case fixed(Int)

    /// The largest window, in pages (one 2 MiB block of 4 KiB pages).
    public static let maxPages = 512
    /// The first window of a stream found sequential.
    public static let initialPages = 16
    /// The aligned block around a random fault whose resident pages adaptive maps (the
    /// kernel's fault_around_bytes, 64 KiB).
    public static let neighbourPages = 16

    /// Parses "off", "adaptive" or a page count 1...512.
    public init?(_ text: String) {
        switch text {
        case "off", "0": self = .off
        case "adaptive": self = .adaptive
        default:
            guard let n = Int(text), n > 0, n <= Self.maxPages else { return nil }
            self = .fixed(n)
        }
    }

    public var description: String {
        switch self {
        case .off: "off"
        case .adaptive: "adaptive"
        case .fixed(let n): "\(n)"
        }
    }
}

/// One device's sequential-fault detector. Not thread-safe: the loop owns one per device.
public struct FaultAroundState: Sendable {
    private struct Stream {
        /// The pages (IOVA >> 12) a sequential fault of this stream may ask for next: from
        /// the page after its last fault to the page after what is mapped (or being
        /// mapped) ahead of it. A device that catches up with pages still being mapped
        /// ahead faults inside the span, one that does not at its end.
        var from: UInt64 = .max
        var next: UInt64 = .max
        var window = 0
        var lastUse: UInt32 = 0
    }

    private var streams = (Stream(), Stream(), Stream(), Stream())
    private var clock: UInt32 = 0
    /// Random faults to skip before the next resident-neighbour lookup, and the current
    /// back-off: lookups that find few resident neighbours cost a mincore for nothing.
    private var neighbourSkip = 0
    private var neighbourBackoff = 0
    /// The stream the last `window(for:)` chose.
    private var current = 0

    /// A state with no history: the next fault starts the adaptive window small.
    public init() {}

    private subscript(i: Int) -> Stream {
        get {
            switch i {
            case 0: streams.0
            case 1: streams.1
            case 2: streams.2
            default: streams.3
            }
        }
        set {
            switch i {
            case 0: streams.0 = newValue
            case 1: streams.1 = newValue
            case 2: streams.2 = newValue
            default: streams.3 = newValue
            }
        }
    }

    /// Pages to map ahead of a group whose requests span `first...last` (IOVAs) under
    /// `policy`. The group is sequential when its stream expected a page in that span.
    public mutating func window(from first: UInt64, to last: UInt64, policy: FaultAroundPolicy) -> Int {
        switch policy {
        case .off: return 0
        case .fixed(let n): return n
        case .adaptive: break
        }
        let (low, high) = (min(first, last) >> pageShift, max(first, last) >> pageShift)
        clock &+= 1
        var oldest = 0
        for i in 0..<4 {
            var s = self[i]
            if low <= s.next && high >= s.from {
                s.window =
                    s.window == 0 ? FaultAroundPolicy.initialPages : min(s.window * 2, FaultAroundPolicy.maxPages)
                s.lastUse = clock
                self[i] = s
                current = i
                return s.window
            }
            if self[i].lastUse < self[oldest].lastUse { oldest = i }
        }
        // Not sequential: the least recently used stream starts here, with no window.
        self[oldest] = Stream(from: .max, next: .max, window: 0, lastUse: clock)
        current = oldest
        return 0
    }

    /// Pages around a random fault whose resident ones to map: `neighbourPages` under
    /// adaptive, unless recent lookups found too few to pay for themselves.
    public mutating func neighbours(policy: FaultAroundPolicy) -> Int {
        guard policy == .adaptive else { return 0 }
        if neighbourSkip > 0 {
            neighbourSkip -= 1
            return 0
        }
        return FaultAroundPolicy.neighbourPages
    }

    /// Records how many resident neighbours a lookup mapped: fewer than a quarter of the
    /// block doubles the back-off (up to 64 faults without a lookup); more resets it.
    public mutating func recordNeighbours(mapped: Int) {
        if mapped >= FaultAroundPolicy.neighbourPages / 4 {
            neighbourBackoff = 0
        } else {
            neighbourBackoff = neighbourBackoff == 0 ? 1 : min(neighbourBackoff * 2, 64)
        }
        neighbourSkip = neighbourBackoff
    }

    /// Records what was mapped (or is being mapped) ahead of the group whose last request
    /// is `iova`, so that its stream expects a page from the next one to the page after that.
    public mutating func record(iova: UInt64, mappedAhead: Int) {
        var s = self[current]
        s.from = (iova >> pageShift) &+ 1
        s.next = s.from &+ UInt64(mappedAhead)
        self[current] = s
    }
}

extension FaultAroundState {
    /// Pages to map ahead of a single fault at `iova`.
    public mutating func window(for iova: UInt64, policy: FaultAroundPolicy) -> Int {
        window(from: iova, to: iova, policy: policy)
    }
}

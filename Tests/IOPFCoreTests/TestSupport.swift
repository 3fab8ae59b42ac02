// TestSupport.swift — seeded randomness and recording doubles shared by the tests.

@testable import IOPFCore

/// SplitMix64: small, fast, and the same sequence on every machine for a seed.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Records every sync's ranges, as a device IOTLB would see them.
final class RecordingInvalidator: IOTLBInvalidator, @unchecked Sendable {
    var syncs: [[IOVARange]] = []
    /// Called during each invalidation, e.g. to check what a device could still walk.
    var onInvalidate: (([IOVARange]) -> Void)?
    func invalidate(_ ranges: [IOVARange]) {
        syncs.append(ranges)
        onInvalidate?(ranges)
    }
}

let KiB: UInt64 = 1 << 10
let MiB: UInt64 = 1 << 20
let GiB: UInt64 = 1 << 30

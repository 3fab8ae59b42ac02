// The machine's floors that other figures are stated against: each is a real measurement
// of something that takes time, so each must come out positive and bounded.

import Foundation
import Testing
@testable import IOPFSimulation
@testable import IOPFSystem

@Suite(.serialized, .timeLimit(.minutes(15))) struct FloorsTests {
    /// Two threads on two CPUs hand a cache line back and forth: at least some tens of
    /// nanoseconds (the line really moves between caches), well under a scheduler's
    /// wake-up (both spin); none when the process may use one CPU.
    @Test func aCacheLineRoundTripBetweenTwoCPUsIsMeasured() throws {
        guard Sys.allowedCPUs.count >= 2 else {
            #expect(Floors.crossCoreRoundTrip(roundTrips: 1000) == nil)
            return
        }
        let ns = try #require(Floors.crossCoreRoundTrip(roundTrips: 20_000))
        #expect(ns > 20 && ns < 100_000, "\(ns) ns")
    }
}

// The event loop's adaptive spin (SpinWindow.swift): the rule alone, then a running
// service whose faults come far apart and then close together.

import Foundation
import Testing
@testable import IOPFDevice
@testable import IOPFService

@Suite(.serialized, .timeLimit(.minutes(15))) struct SpinWindowTests {
    @Test func coveredIdleKeepsTheWindowShortIdleGrowsItLongIdleShrinksIt() {
        var w = SpinWindow(maximum: 200_000)
        #expect(w.nanoseconds == 200_000)
        w.idleEnded(after: 150_000)  // caught by the spin
        #expect(w.nanoseconds == 200_000)
        w.idleEnded(after: 5_000_000)  // no spin up to the maximum would have caught it
        #expect(w.nanoseconds == 100_000)
        for _ in 0..<4 { w.idleEnded(after: 5_000_000) }
        #expect(w.nanoseconds == 0)  // 6,250 ns is below the 10 µs floor
        w.idleEnded(after: 50_000)  // a longer spin would have saved the wake-up
        #expect(w.nanoseconds == SpinWindow.growStart)
        w.idleEnded(after: 50_000)
        w.idleEnded(after: 50_000)
        #expect(w.nanoseconds == 40_000)
        w.idleEnded(after: 30_000)
        #expect(w.nanoseconds == 40_000)
        for _ in 0..<4 { w.idleEnded(after: 190_000) }
        #expect(w.nanoseconds == 200_000)  // never past the maximum
        #expect(SpinWindow(maximum: -5).nanoseconds == 0)
    }

    /// Faults 20 ms apart shrink a 10 ms spin to nothing (the loop sleeps once it has
    /// answered, and a device sharing its CPU runs); faults 0.1-1 ms apart grow it back.
    @Test func aRunningLoopSpinsLessForSparseFaultsAndMoreForDenseOnes() throws {
        let h = try Harness(transport: .shared, spinNanoseconds: 10_000_000)
        let channel = try h.attach(deviceID: 1, domain: h.domain)
        defer { channel.close() }
        var cookie: UInt32 = 0
        func fault(_ page: Int) throws {
            cookie += 1
            try channel.send([h.request(page: page, cookie: cookie)])
            #expect(try h.responses(channel, count: 1).map(\.cookie) == [cookie])
        }
        for page in 0..<14 {
            try fault(page)
            usleep(20_000)
        }
        let sparse = h.waitFor { $0.groups == 14 }
        #expect(sparse.spinNanoseconds == 0)
        #expect(sparse.sleeps >= 10)
        for page in 14..<40 {
            try fault(page)
            usleep(100)
        }
        let dense = h.waitFor { $0.groups == 40 }
        #expect(dense.spinNanoseconds > 0)
        #expect(dense.sleeps - sparse.sleeps < 26)  // some faults came within the spin
    }
}

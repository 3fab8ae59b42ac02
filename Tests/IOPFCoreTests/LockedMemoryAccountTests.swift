// Locked-memory accounting: exact, refusing over-limit charges whole, race-free.

import Testing
@testable import IOPFCore

@Suite(.timeLimit(.minutes(15))) struct LockedMemoryAccountTests {
    @Test func chargesAndRefusesWithoutChangingAnything() throws {
        let a = LockedMemoryAccount(limitBytes: 100 * 4096, bypassesLimit: false)
        try a.charge(pages: 60)
        let error = #expect(throws: LockedMemoryError.self) { try a.charge(pages: 41) }
        #expect(error == LockedMemoryError(requestedPages: 41, lockedPages: 60, limitPages: 100))
        #expect(error?.description.contains("RLIMIT_MEMLOCK") == true)
        #expect(a.lockedPages == 60)
        try a.charge(pages: 40)
        a.uncharge(pages: 100)
        #expect(a.lockedPages == 0)
    }

    @Test func capabilityBypassesTheLimit() throws {
        let a = LockedMemoryAccount(limitBytes: 0, bypassesLimit: true)
        try a.charge(pages: 1_000_000)
        #expect(a.lockedBytes == 1_000_000 * 4096)
    }

    @Test func concurrentChargersNeverExceedTheLimitTogether() async {
        let a = LockedMemoryAccount(limitBytes: 1000 * 4096, bypassesLimit: false)
        let granted = await withTaskGroup(of: Int.self) { group in
            for _ in 0..<4 {
                group.addTask {
                    var mine = 0
                    for _ in 0..<1000 where (try? a.charge(pages: 3)) != nil { mine += 3 }
                    return mine
                }
            }
            return await group.reduce(0, +)
        }
        #expect(granted == a.lockedPages)
        #expect(a.lockedPages <= 1000 && a.lockedPages > 1000 - 3)
    }
}

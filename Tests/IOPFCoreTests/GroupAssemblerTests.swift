// The group assembler against a hostile record stream: groups complete on LAST_PAGE only,
// failed groups keep nothing, credit is released exactly once, nothing grows without bound.

import Testing
@testable import IOPFCore

@Suite(.timeLimit(.minutes(15))) struct GroupAssemblerTests {
    func record(page: UInt64, cookie: UInt32, group: UInt32 = 1, last: Bool = true, device: UInt32 = 1) -> [UInt8] {
        PageRequest(
            flags: last ? [.lastPage] : [], deviceID: device, groupIndex: group, perm: [.read],
            addr: page << 12, cookie: cookie
        ).bytes
    }

    func add(_ a: inout GroupAssembler, _ bytes: [UInt8]) -> PageRequestGroup? {
        bytes.withUnsafeBytes { a.add($0) }
    }

    @Test func aGroupCompletesOnItsLastPageWithEveryRecord() {
        var a = GroupAssembler(deviceID: 1, pasid: nil, credit: 8)
        #expect(add(&a, record(page: 1, cookie: 5, last: false)) == nil)
        #expect(add(&a, record(page: 2, cookie: 6, group: 2)).map(\.cookie) == 6)  // interleaved group
        let g = add(&a, record(page: 3, cookie: 5))
        #expect(g?.requests.map(\.page) == [0x1000, 0x3000] && g?.failure == nil && g?.counted == 2)
        #expect(a.outstanding == 3)
        a.answered(g!)
        #expect(a.outstanding == 1)
    }

    @Test func creditOverrunFailsTheGroupAndReleasesWhatItHeld() {
        var a = GroupAssembler(deviceID: 1, pasid: nil, credit: 2)
        _ = add(&a, record(page: 1, cookie: 5, last: false))
        _ = add(&a, record(page: 2, cookie: 5, last: false))
        #expect(a.outstanding == 2)
        #expect(add(&a, record(page: 3, cookie: 5, last: false)) == nil)
        #expect(a.lastRefusal == .creditExceeded && a.outstanding == 0)
        // Thousands more records without LAST_PAGE are held nowhere.
        for p in 0..<10_000 { _ = add(&a, record(page: UInt64(p), cookie: 5, last: false)) }
        let g = add(&a, record(page: 9, cookie: 5))
        #expect(g?.failure == .creditExceeded && g?.requests.isEmpty == true && g?.counted == 0)
        #expect(a.outstanding == 0 && a.partialGroups == 0)
    }

    @Test func foreignMalformedAndCookieChangingRecordsFailTheirGroup() {
        var a = GroupAssembler(deviceID: 1, pasid: 4, credit: 8)
        #expect(add(&a, record(page: 1, cookie: 5))?.failure == .unknownDevice)  // no PASID
        var bad = record(page: 1, cookie: 7, last: false)
        bad[20] = 1  // reserved
        #expect(add(&a, bad) == nil && a.lastRefusal == .malformed)
        var ok = PageRequest(
            flags: [.pasidValid, .lastPage], deviceID: 1, pasid: 4, groupIndex: 1, perm: [.read],
            addr: 0x1000, cookie: 7)
        #expect(ok.bytes.withUnsafeBytes { a.add($0) }?.failure == .malformed)  // its group already failed
        ok.cookie = 9
        ok.flags = [.pasidValid]
        _ = ok.bytes.withUnsafeBytes { a.add($0) }
        ok.cookie = 10  // same group index, another cookie
        ok.flags = [.pasidValid, .lastPage]
        #expect(ok.bytes.withUnsafeBytes { a.add($0) }?.failure == .malformed)
        #expect(a.outstanding == 0)
        #expect(add(&a, [UInt8](repeating: 0, count: 40)) == nil)  // cookie 0: nothing to answer
    }

    @Test func partialGroupsAreBoundedByTheGroupIndexAndAbandonedWithTheirCredit() {
        var a = GroupAssembler(deviceID: 1, pasid: nil, credit: 256)
        for g in 0..<2000 {
            _ = add(&a, record(page: UInt64(g), cookie: UInt32(g + 1), group: UInt32(g % 512), last: false))
        }
        #expect(a.partialGroups == 512)
        let abandoned = a.abandonAll()
        #expect(abandoned.count == 512 && a.partialGroups == 0 && a.outstanding == 0)
    }
}

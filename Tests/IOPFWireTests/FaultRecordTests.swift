// The iommufd wire format: exact layout, round trips, and every validation error.

import Testing
@testable import IOPFWire

@Suite(.timeLimit(.minutes(15))) struct FaultRecordTests {
    static let sample = PageRequest(
        flags: [.pasidValid, .lastPage], deviceID: 7, pasid: 42, groupIndex: 511,
        perm: [.read, .write], addr: 0xdead_b123, length: 0, cookie: 0x1234_5678)

    @Test func layoutIsTheKernels() {
        let b = Self.sample.bytes
        #expect(b.count == 40)
        #expect(Array(b[0..<4]) == [3, 0, 0, 0])
        #expect(Array(b[4..<8]) == [7, 0, 0, 0])
        #expect(Array(b[8..<12]) == [42, 0, 0, 0])
        #expect(Array(b[12..<16]) == [0xff, 1, 0, 0])
        #expect(Array(b[16..<20]) == [3, 0, 0, 0])
        #expect(Array(b[20..<24]) == [0, 0, 0, 0])
        #expect(Array(b[24..<32]) == [0x23, 0xb1, 0xad, 0xde, 0, 0, 0, 0])
        #expect(Array(b[36..<40]) == [0x78, 0x56, 0x34, 0x12])
        let decoded = b.withUnsafeBytes { try? PageRequest(bytes: $0) }
        #expect(decoded == Self.sample)
        #expect(decoded?.page == 0xdead_b000)
    }

    static func decode(_ mutate: (inout [UInt8]) -> Void) -> FaultRecordError? {
        var b = sample.bytes
        mutate(&b)
        do {
            _ = try b.withUnsafeBytes { try PageRequest(bytes: $0) }
            return nil
        } catch {
            return error as? FaultRecordError
        }
    }

    @Test func everyMalformedRecordIsRefusedWithItsReason() {
        #expect(Self.decode { $0[0] = 0x7 } == .unknownFlags(7))
        #expect(Self.decode { $0[16] = 0x13 } == .unknownPermission(0x13))
        #expect(Self.decode { $0[21] = 1 } == .reservedNonZero(0x100))
        #expect(Self.decode { $0[13] = 2 } == .groupIndexOutOfRange(0x2ff))
        #expect(Self.decode { $0[16] = 0x4 } == .noAccess(4))
        #expect(Self.decode { $0[36...39] = [0, 0, 0, 0] } == .zeroCookie)
        #expect(Self.decode { $0[0] = 0x2 } == .pasidWithoutFlag(42))
        #expect(Self.decode { $0.removeLast() } == .wrongSize(39, expected: 40))
        #expect(FaultRecordError.groupIndexOutOfRange(600).description.contains("grpid 600"))
        #expect(FaultRecordError.reservedNonZero(1).description.contains("reserved"))
    }

    @Test func responsesRoundTripAndRefuseUnknownCodes() throws {
        var b = [UInt8](repeating: 0, count: 8)
        b.withUnsafeMutableBytes { PageResponse(cookie: 9, code: .invalid).encode(into: $0) }
        #expect(b == [9, 0, 0, 0, 1, 0, 0, 0])
        #expect(try b.withUnsafeBytes { try PageResponse(bytes: $0) } == PageResponse(cookie: 9, code: .invalid))
        b[4] = 2  // the removed FAILURE code
        #expect(throws: FaultRecordError.unknownResponseCode(2)) {
            try b.withUnsafeBytes { try PageResponse(bytes: $0) }
        }
    }
}

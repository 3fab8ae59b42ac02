// The system-call layer on its own: descriptors passed with SCM_RIGHTS arrive as the same
// open file, a truncated message is reported as such, the shared ring's indices are shared
// between two mappings of its memfd, and closing a descriptor twice is counted, not ignored.

import Glibc
import Testing
@_spi(SharedRings) @testable import IOPFSystem

@Suite(.timeLimit(.minutes(15))) struct SystemTests {
    @Test func aDescriptorSentWithAMessageIsTheSameOpenFile() throws {
        let (a, b) = try Sys.seqpacketPair()
        defer { Sys.close(a); Sys.close(b) }
        let (r, w) = try Sys.pipe()
        defer { Sys.close(r); Sys.close(w) }
        try Sys.send(a, [1, 2, 3], fds: [w], nonBlocking: false)
        var buffer = [UInt8](repeating: 0, count: 16)
        let got = try buffer.withUnsafeMutableBytes { try Sys.receive(b, into: $0, maxFDs: 4, nonBlocking: false) }
        #expect(got.count == 3 && Array(buffer[..<3]) == [1, 2, 3] && !got.truncated)
        try #require(got.fds.count == 1)
        defer { Sys.close(got.fds[0]) }
        #expect(got.fds[0] != w)
        // Written through the received descriptor, read from the pipe's other end.
        let payload: [UInt8] = [0xAB, 0xCD]
        _ = try payload.withUnsafeBytes { try Sys.write(got.fds[0], $0) }
        var back = [UInt8](repeating: 0, count: 2)
        #expect(try back.withUnsafeMutableBytes { try Sys.read(r, $0) } == 2 && back == payload)
    }

    @Test func aMessageLargerThanTheBufferIsReportedTruncated() throws {
        let (a, b) = try Sys.seqpacketPair()
        defer { Sys.close(a); Sys.close(b) }
        try Sys.send(a, [UInt8](repeating: 7, count: 64), nonBlocking: false)
        var buffer = [UInt8](repeating: 0, count: 16)
        let got = try buffer.withUnsafeMutableBytes { try Sys.receive(b, into: $0, maxFDs: 1, nonBlocking: false) }
        #expect(got.truncated)
        // Nothing waits to be received afterwards: a non-blocking receive finds nothing.
        #expect(throws: SystemCallError.self) {
            try buffer.withUnsafeMutableBytes { try Sys.receive(b, into: $0, maxFDs: 1, nonBlocking: true) }
        }
    }

    @Test func theSharedRingsIndicesAreSharedBetweenTwoMappings() throws {
        let mine = try SharedQueue.create()
        let theirs = try SharedQueue(fd: try Sys.dup(mine.fd))
        mine.store(.requestTail, 41)
        #expect(theirs.load(.requestTail) == 41)
        theirs.requestSlot(3).storeBytes(of: 0xFEED, as: UInt64.self)
        #expect(mine.copyRequest(3) { $0.load(as: UInt64.self) } == 0xFEED)
        // Slots wrap at the capacity.
        #expect(mine.copyRequest(3 + UInt32(SharedQueue.capacity)) { $0.load(as: UInt64.self) } == 0xFEED)
    }

    @Test func closingADescriptorTwiceIsCountedNotIgnored() throws {
        let before = Sys.badCloses
        let fd = try Sys.eventfd()
        Sys.close(fd)
        #expect(Sys.badCloses == before)
        // A descriptor number nobody holds: far above anything this process opened.
        Sys.close(1_000_000)
        #expect(Sys.badCloses == before + 1)
    }
}

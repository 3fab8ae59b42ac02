// SharedQueue.swift — the shared-memory fault channel: a memfd holding two single-
// producer/single-consumer rings, mapped separately by the device and by the service.
// The only raw shared memory of the runtime lives here.
//
// Layout (indices are free-running UInt32; slot = index % capacity):
//   0    request head   (service consumes)      64   request tail  (device produces)
//   128  response head  (device consumes)       192  response tail (service produces)
//   256  device waiting (device sleeps on its eventfd; the service must ring it)
//   320  service waiting (the service sleeps; devices must ring its doorbell)
//   384  closed by the device                   448  closed by the service
//   4096 request slots: capacity x 40 bytes, then response slots: capacity x 8 bytes
//
// Ordering: a producer writes slots, then publishes the tail with a release store; the
// consumer reads the tail with an acquire load. A sleeper sets its waiting flag, then
// re-checks the ring (both sequentially consistent), so a producer that saw the flag
// clear had published before the re-check: no wake-up is lost.

import CIOPFShim
import Glibc
import IOPFCore
import Synchronization

final class SharedQueue: @unchecked Sendable {
    static let capacity = 256
    static let headerBytes = 4096
    static var byteCount: Int { headerBytes + capacity * (PageRequest.byteCount + PageResponse.byteCount) }

    enum Field: Int {
        case requestHead = 0, requestTail, responseHead, responseTail, deviceWaiting, serviceWaiting, deviceClosed, serviceClosed
    }

    let fd: CInt
    private let base: UnsafeMutableRawPointer

    /// Creates the memfd; `map(fd:)` maps it again on the other side.
    static func create() throws(SystemCallError) -> SharedQueue {
        let fd = try syscall("memfd_create") { iopf_memfd_create("iopf-fault-queue") }
        do {
            _ = try syscall("ftruncate") { ftruncate(fd, off_t(byteCount)) }
            return try SharedQueue(fd: fd)
        } catch {
            Sys.close(fd)
            throw error
        }
    }

    /// Maps an existing queue's memfd; the fd stays owned by the caller.
    init(fd: CInt) throws(SystemCallError) {
        let p = mmap(nil, Self.byteCount, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let p, p != MAP_FAILED else { throw SystemCallError("mmap(memfd)", .init(rawValue: Glibc.errno)) }
        self.fd = fd
        base = p
        for f in 0..<8 {
            (base + f * 64).bindMemory(to: Atomic<UInt32>.self, capacity: 1)
        }
    }

    deinit { munmap(base, Self.byteCount) }

    @inline(__always)
    private func atomic(_ f: Field) -> UnsafeMutablePointer<Atomic<UInt32>> {
        (base + f.rawValue * 64).assumingMemoryBound(to: Atomic<UInt32>.self)
    }

    @inline(__always) func load(_ f: Field) -> UInt32 { atomic(f).pointee.load(ordering: .acquiring) }
    @inline(__always) func store(_ f: Field, _ v: UInt32) { atomic(f).pointee.store(v, ordering: .releasing) }
    @inline(__always) func storeSequential(_ f: Field, _ v: UInt32) { atomic(f).pointee.store(v, ordering: .sequentiallyConsistent) }
    @inline(__always) func loadSequential(_ f: Field) -> UInt32 { atomic(f).pointee.load(ordering: .sequentiallyConsistent) }

    @inline(__always)
    func requestSlot(_ index: UInt32) -> UnsafeMutableRawBufferPointer {
        let offset = Self.headerBytes + Int(index % UInt32(Self.capacity)) * PageRequest.byteCount
        return UnsafeMutableRawBufferPointer(start: base + offset, count: PageRequest.byteCount)
    }

    @inline(__always)
    func responseSlot(_ index: UInt32) -> UnsafeMutableRawBufferPointer {
        let offset = Self.headerBytes + Self.capacity * PageRequest.byteCount + Int(index % UInt32(Self.capacity)) * PageResponse.byteCount
        return UnsafeMutableRawBufferPointer(start: base + offset, count: PageResponse.byteCount)
    }

    /// Requests published and not yet consumed.
    var pendingRequests: Bool { load(.requestTail) != load(.requestHead) }
    var pendingResponses: Bool { load(.responseTail) != load(.responseHead) }
}

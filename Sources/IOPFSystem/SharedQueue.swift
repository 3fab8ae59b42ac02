// SharedQueue.swift — one mapping of the shared fault channel (layout and ordering rules:
// IOPFWire/SharedRingLayout.swift). The service creates the memfd and seals its size, so
// a device can neither shrink it (the next access would raise SIGBUS in the service) nor
// grow it; a side that maps a queue it did not create checks size and seals first.
//
// The ring memory is writable by the other process at any time: loads of the indices are
// atomic, and records are copied out once (`copyRequest`) before they are decoded.

import CIOPFShim
import Glibc
import IOPFWire
import Synchronization

/// One mapping of a fault channel's rings. SPI rather than `package`: Swift inlines a
/// `package` member into another module of the package only with library evolution on, and
/// the service's and the device's spins are loads of these rings.
@_spi(SharedRings) public final class SharedQueue: @unchecked Sendable {
    public typealias Field = SharedRingLayout.Field
    /// Slots in each ring.
    @inlinable public static var capacity: Int { SharedRingLayout.entries }
    /// The size of the mapping.
    @inlinable public static var byteCount: Int { SharedRingLayout.byteCount }

    package let fd: CInt
    /// The mapping; `@usableFromInline` for the inlined accessors.
    @usableFromInline let base: UnsafeMutableRawPointer

    /// Creates a sealed memfd of the ring's size and maps it; the caller owns `fd`.
    package static func create() throws(SystemCallError) -> SharedQueue {
        let fd = try syscall("memfd_create") { iopf_memfd_create_sealable("iopf-fault-queue") }
        do {
            _ = try syscall("ftruncate") { ftruncate(fd, off_t(byteCount)) }
            _ = try syscall("fcntl(F_ADD_SEALS)") { iopf_seal_size(fd) }
            return try SharedQueue(fd: fd)
        } catch {
            Sys.close(fd)
            throw error
        }
    }

    /// Maps an existing queue's memfd after checking that its size is sealed and large
    /// enough; the fd stays owned by the caller.
    package init(fd: CInt) throws(SystemCallError) {
        guard iopf_size_is_sealed(fd) == 1 else {
            throw SystemCallError("fault queue memfd is not size-sealed", .invalidArgument)
        }
        guard try Sys.fileSize(fd) >= UInt64(Self.byteCount) else {
            throw SystemCallError("fault queue memfd is smaller than \(Self.byteCount) bytes", .invalidArgument)
        }
        let p = mmap(nil, Self.byteCount, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let p, p != MAP_FAILED else { throw SystemCallError("mmap(memfd)", .init(rawValue: Glibc.errno)) }
        self.fd = fd
        base = p
        for f in Field.allCases {
            (base + f.offset).bindMemory(to: Atomic<UInt32>.self, capacity: 1)
        }
        (base + SharedRingLayout.answeredAtOffset).bindMemory(to: Atomic<UInt64>.self, capacity: 1)
        (base + SharedRingLayout.stampsWantedOffset).bindMemory(to: Atomic<UInt32>.self, capacity: 1)
    }

    deinit { munmap(base, Self.byteCount) }

    @inlinable @inline(__always)
    func atomic(_ f: Field) -> UnsafeMutablePointer<Atomic<UInt32>> {
        (base + f.offset).assumingMemoryBound(to: Atomic<UInt32>.self)
    }

    /// `f`, with acquire ordering.
    @inlinable @inline(__always) public func load(_ f: Field) -> UInt32 {
        atomic(f).pointee.load(ordering: .acquiring)
    }
    /// Stores `v` in `f` with release ordering.
    @inlinable @inline(__always) public func store(_ f: Field, _ v: UInt32) {
        atomic(f).pointee.store(v, ordering: .releasing)
    }
    /// Stores `v` in `f`, sequentially consistent (before a load of the other side's flag).
    @inlinable @inline(__always) public func storeSequential(_ f: Field, _ v: UInt32) {
        atomic(f).pointee.store(v, ordering: .sequentiallyConsistent)
    }
    /// `f`, sequentially consistent (after a store of this side's flag).
    @inlinable @inline(__always) public func loadSequential(_ f: Field) -> UInt32 {
        atomic(f).pointee.load(ordering: .sequentiallyConsistent)
    }

    /// The service's "answered at" stamp: when it published its latest responses
    /// (`Sys.monotonicNanoseconds`). Stored before the tail is published, read after it.
    @inlinable @inline(__always) public var answeredAt: UInt64 {
        get { answeredAtWord.pointee.load(ordering: .relaxed) }
        set { answeredAtWord.pointee.store(newValue, ordering: .relaxed) }
    }

    /// Whether the device asked for "answered at" stamps (any value but 0).
    @inlinable @inline(__always) public var stampsWanted: Bool {
        get { stampsWantedWord.pointee.load(ordering: .relaxed) != 0 }
        set { stampsWantedWord.pointee.store(newValue ? 1 : 0, ordering: .releasing) }
    }

    @inlinable var answeredAtWord: UnsafeMutablePointer<Atomic<UInt64>> {
        (base + SharedRingLayout.answeredAtOffset).assumingMemoryBound(to: Atomic<UInt64>.self)
    }

    @inlinable var stampsWantedWord: UnsafeMutablePointer<Atomic<UInt32>> {
        (base + SharedRingLayout.stampsWantedOffset).assumingMemoryBound(to: Atomic<UInt32>.self)
    }

    /// Request slot `index` (modulo the capacity).
    @inlinable @inline(__always)
    public func requestSlot(_ index: UInt32) -> UnsafeMutableRawBufferPointer {
        let offset = SharedRingLayout.requestSlotsOffset + Int(index % UInt32(Self.capacity)) * PageRequest.byteCount
        return UnsafeMutableRawBufferPointer(start: base + offset, count: PageRequest.byteCount)
    }

    /// Response slot `index` (modulo the capacity).
    @inlinable @inline(__always)
    public func responseSlot(_ index: UInt32) -> UnsafeMutableRawBufferPointer {
        let offset = SharedRingLayout.responseSlotsOffset + Int(index % UInt32(Self.capacity)) * PageResponse.byteCount
        return UnsafeMutableRawBufferPointer(start: base + offset, count: PageResponse.byteCount)
    }

    /// Copies request slot `index` out of shared memory once and hands the private copy to
    /// `body`: whatever the other side writes meanwhile, validation and use see one value.
    @inlinable @inline(__always)
    public func copyRequest<R>(_ index: UInt32, _ body: (UnsafeRawBufferPointer) -> R) -> R {
        var copy: (UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0)
        return withUnsafeMutableBytes(of: &copy) { c in
            c.copyMemory(from: UnsafeRawBufferPointer(requestSlot(index)))
            return body(UnsafeRawBufferPointer(c))
        }
    }

    /// Requests published and not yet consumed.
    package var pendingRequests: Bool { load(.requestTail) != load(.requestHead) }
    package var pendingResponses: Bool { load(.responseTail) != load(.responseHead) }
}

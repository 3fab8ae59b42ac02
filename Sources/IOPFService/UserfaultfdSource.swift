// UserfaultfdSource.swift — the host kernel as the source of MMU-notifier events: a
// userfaultfd with UFFD_FEATURE_EVENT_REMOVE | EVENT_UNMAP | EVENT_REMAP, over which the
// host range of every DMA mapping is registered. The event loop reads it through io_uring.
//
// Register mode: UFFDIO_REGISTER_MODE_WP. Registration needs a mode, and the events above
// are delivered for a registered range whatever the mode. MISSING would make every CPU
// access to a not-yet-populated page wait for a handler; WP blocks only writes to pages
// that were write-protected with UFFDIO_WRITEPROTECT, which iopf never does (nor does it
// ask for UFFD_FEATURE_WP_UNPOPULATED). So ordinary CPU and device accesses never block
// on the uffd: it carries events only.
//
// Reading: the loop polls the (non-blocking) uffd through io_uring and drains it with
// read(2) itself. An io_uring READ would dequeue the event in the kernel and post its
// completion later, so a host thread whose madvise had returned could see a later command
// (a barrier) handled before its event; dequeuing on the loop thread keeps them in order.
//
// Caveats, checked on Linux 6.18: madvise(MADV_DONTNEED), munmap and mremap of a
// registered range block until their event is read, so the thread that reads the uffd
// (the event loop) must never unmap a registered range itself. mremap yields REMAP and
// then UNMAP of the old range. File mappings cannot be registered (EINVAL).

import CIOPFShim
import Glibc
import IOPFSystem
import SystemPackage
import Logging
import IOPFCore
import Synchronization

/// Why the userfaultfd could not be opened, negotiated or registered.
public struct UserfaultfdError: Error, Sendable, CustomStringConvertible {
    public var description: String
}

/// A userfaultfd the loop reads events from: the service's own, or a host's.
protocol UserfaultfdReading {
    /// Reads pending messages into `buffer`; 0 when there are none. Never blocks.
    func drain(into buffer: UnsafeMutableRawBufferPointer) throws(SystemCallError) -> Int
}

final class UserfaultfdSource: UserfaultfdReading, @unchecked Sendable {
    static let wanted: [(UInt64, String)] = [
        (UInt64(UFFD_FEATURE_EVENT_REMOVE), "EVENT_REMOVE"),
        (UInt64(UFFD_FEATURE_EVENT_UNMAP), "EVENT_UNMAP"),
        (UInt64(UFFD_FEATURE_EVENT_REMAP), "EVENT_REMAP"),
    ]
    static let messageBytes = MemoryLayout<uffd_msg>.size

    let fd: CInt
    private let closed = Atomic<Bool>(false)

    /// Opens a userfaultfd and negotiates the event features; throws naming what the
    /// kernel refused.
    init() throws(UserfaultfdError) {
        let fd = iopf_userfaultfd(O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else {
            let e = Glibc.errno
            throw UserfaultfdError(
                description: "userfaultfd(2) failed: errno \(e)"
                    + (e == EPERM ? " (unprivileged userfaultfd is disabled: vm.unprivileged_userfaultfd=0)" : "")
                    + (e == ENOSYS ? " (the kernel lacks CONFIG_USERFAULTFD)" : ""))
        }
        let wanted = Self.wanted.reduce(UInt64(0)) { $0 | $1.0 }
        var granted: UInt64 = 0
        var ioctls: UInt64 = 0
        if iopf_uffd_api(fd, wanted, &granted, &ioctls) != 0 || granted & wanted != wanted {
            let refused = Self.wanted.filter { granted & $0.0 == 0 }.map(\.1)
            Sys.close(fd)
            throw UserfaultfdError(
                description: "UFFDIO_API refused "
                    + (refused.isEmpty ? "the handshake" : refused.joined(separator: ", ")))
        }
        self.fd = fd
    }

    deinit { close() }

    /// Closes the uffd, which drops every registration and wakes any thread waiting for
    /// an event to be read. Idempotent.
    func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        Sys.close(fd)
    }

    /// Registers `[start, start + length)`; a clear error when the kernel refuses it.
    func register(start: UInt64, length: UInt64) throws(UserfaultfdError) {
        try Self.register(fd, start: start, length: length)
    }

    /// UFFDIO_REGISTER in events-only (WP) mode on any uffd, this process's or a host's
    /// (registration acts on the uffd's own mm).
    static func register(_ fd: CInt, start: UInt64, length: UInt64) throws(UserfaultfdError) {
        if iopf_uffd_register(fd, start, length, UInt64(UFFDIO_REGISTER_MODE_WP)) != 0 {
            let e = Glibc.errno
            let why =
                switch e {
                case EINVAL:
                    """
                    the range is not anonymous private or shmem memory (file mappings and VM_PFNMAP cannot be \
                    registered)
                    """
                case ENOMEM: "part of the range is not mapped"
                case EBUSY: "the range is registered with another userfaultfd"
                case EPERM: "write-protect mode is not permitted here"
                case ESRCH: "the process that owns the memory has exited"
                default: "errno \(e)"
                }
            throw UserfaultfdError(
                description:
                    "cannot watch host range [0x\(String(start, radix: 16)), +0x\(String(length, radix: 16))): \(why)")
        }
    }

    /// Read results a test plants (fault injection): each is returned by one `drain`
    /// instead of reading, in order: an errno, or bytes as if the kernel had written them.
    enum PlantedRead { case error(Errno), bytes([UInt8]) }
    let planted = Lock<[PlantedRead]>([])

    /// Reads the pending events into `buffer`; 0 when there are none (EAGAIN).
    func drain(into buffer: UnsafeMutableRawBufferPointer) throws(SystemCallError) -> Int {
        if let next = planted.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) {
            switch next {
            case .error(let e): throw SystemCallError("read", e)
            case .bytes(let b):
                let n = min(b.count, buffer.count)
                b.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
                return n
            }
        }
        do {
            return try Sys.read(fd, buffer)
        } catch  where error.errno == .wouldBlock {
            return 0
        }
    }

    /// Unregisters; the range may be gone already (unmapped), which is not an error.
    func unregister(start: UInt64, length: UInt64) {
        _ = iopf_uffd_unregister(fd, start, length)
    }
}

/// One host event, decoded from a `struct uffd_msg`.
enum HostEvent: Equatable {
    case remove(Range<UInt64>)
    case unmap(Range<UInt64>)
    case remap(from: UInt64, to: UInt64, length: UInt64)
    case other(UInt8)

    /// A message whose range is inverted or overflows: the kernel never writes one, so
    /// the reader and the kernel disagree about the uffd (handled like `.other`).
    case malformed(String)

    /// The host range this event takes away, and whether its memory is gone (UNMAP and
    /// REMAP: faults there are INVALID until the host address is updated) rather than
    /// only dropped (REMOVE). Nil for events that invalidate nothing.
    var invalidation: (range: Range<UInt64>, gone: Bool)? {
        switch self {
        case .remove(let r): (r, false)
        case .unmap(let r): (r, true)
        case .remap(let from, _, let length): (from..<(from + length), true)
        case .other, .malformed: nil
        }
    }

    /// Decodes a copy of one message; never traps, whatever the bytes.
    init(_ bytes: UnsafeRawBufferPointer) {
        let msg = bytes.loadUnaligned(as: uffd_msg.self)
        switch Int32(msg.event) {
        case Int32(UFFD_EVENT_REMOVE), Int32(UFFD_EVENT_UNMAP):
            let (start, end) = (msg.arg.remove.start, msg.arg.remove.end)
            guard start <= end else {
                self = .malformed(
                    "event \(msg.event) range [0x\(String(start, radix: 16)), 0x\(String(end, radix: 16))) is inverted")
                return
            }
            self = Int32(msg.event) == Int32(UFFD_EVENT_REMOVE) ? .remove(start..<end) : .unmap(start..<end)
        case Int32(UFFD_EVENT_REMAP):
            let (from, length) = (msg.arg.remap.from, msg.arg.remap.len)
            guard !from.addingReportingOverflow(length).overflow else {
                self = .malformed(
                    "REMAP of 0x\(String(length, radix: 16)) bytes from 0x\(String(from, radix: 16)) overflows")
                return
            }
            self = .remap(from: from, to: msg.arg.remap.to, length: length)
        default: self = .other(msg.event)
        }
    }
}

// Ring.swift — the owner of one io_uring, confined to the thread that created it (the
// ring is set up with IORING_SETUP_SINGLE_ISSUER; another thread would get -EEXIST).
// liburing's `-errno` results become `RingError`s naming the operation.
//
// `user_data` packs what a completion is for (see `RingToken`), as swift-nio's
// URingUserData does, so that the loop needs no lookup table for it.

import CLiburing
import Glibc
import IOPFCore
import IOPFSystem
import Synchronization
import SystemPackage

/// An io_uring call that failed.
public struct RingError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Which call.
    public var operation: String
    /// The errno it returned.
    public var errno: Errno
    public var description: String { "io_uring \(operation): \(errno) (errno \(errno.rawValue))" }
}

/// What a submission was for: kind (8 bits), slot (24 bits), generation (32 bits). The
/// generation lets the loop drop completions for a slot that has since been reused.
struct RingToken: Equatable {
    enum Kind: UInt8 {
        /// The service's own command eventfd.
        case commands = 1
        /// A stream channel's read and write.
        case deviceRead, deviceWrite
        /// A shared channel's doorbell eventfd: a read, or a poll once the device made the
        /// eventfd non-blocking (its flags are shared with the device).
        case doorbellRead, doorbellPoll
        /// A write to a sleeping device's wake eventfd.
        case wake
        case hostEvent
        /// A host's userfaultfd (slot: the host's, generation: its space id).
        case hostSpaceEvent
        /// The listening socket, and a peer's control and invalidation sockets (polls).
        case listener, peerControl, peerInvalidation
        /// A vhost-user back-end's socket (REPLY_ACKs) and its back-end channel (misses).
        case vhostMain, vhostChannel
        /// An IORING_OP_ASYNC_CANCEL; its completion carries nothing to act on.
        case cancel
    }

    var kind: Kind
    var slot: Int
    var generation: UInt32

    var userData: UInt64 {
        UInt64(kind.rawValue) << 56 | UInt64(slot & 0xFF_FFFF) << 32 | UInt64(generation)
    }

    init(kind: Kind, slot: Int = 0, generation: UInt32 = 0) {
        self.kind = kind
        self.slot = slot
        self.generation = generation
    }

    init?(userData: UInt64) {
        guard let kind = Kind(rawValue: UInt8(userData >> 56)) else { return nil }
        self.kind = kind
        slot = Int((userData >> 32) & 0xFF_FFFF)
        generation = UInt32(truncatingIfNeeded: userData)
    }
}

struct Completion {
    var token: RingToken
    var result: Int32
}

final class Ring {
    @exclusivity(unchecked) private var ring = io_uring()
    @exclusivity(unchecked) private var cqes: [UnsafeMutablePointer<io_uring_cqe>?]
    private let owner = pthread_self()
    /// Operations submitted (or queued) whose completion has not been reaped, cancels
    /// excluded: buffers they name must stay allocated until this drops.
    @exclusivity(unchecked) private(set) var inFlight = 0
    /// Failures a test plants (submits, wake-write completions).
    var planted: PlantedFailures?
    /// Completions taken while waiting for room in a full submission queue.
    @exclusivity(unchecked) private var backlog: [Completion] = []
    /// When submits began to be refused (EAGAIN/EBUSY), while they are.
    @exclusivity(unchecked) private var refusedSince: ContinuousClock.Instant?
    /// Reaps that found the completion queue overflowed.
    @exclusivity(unchecked) private(set) var overflowsSeen = 0

    init(entries: UInt32 = 256) throws(RingError) {
        cqes = Array(repeating: nil, count: Int(entries) * 2)
        var params = io_uring_params()
        params.flags = UInt32(IORING_SETUP_SINGLE_ISSUER) | UInt32(IORING_SETUP_COOP_TASKRUN)
        var r = io_uring_queue_init_params(entries, &ring, &params)
        if r == -EINVAL {  // older kernels: no SINGLE_ISSUER
            params = io_uring_params()
            r = io_uring_queue_init_params(entries, &ring, &params)
        }
        guard r == 0 else { throw RingError(operation: "queue_init", errno: Errno(rawValue: -r)) }
    }

    deinit {
        io_uring_queue_exit(&ring)
    }

    private func checkThread() {
        assert(pthread_equal(owner, pthread_self()) != 0, "a Ring is used from a thread other than its owner")
    }

    /// A free submission entry. When the queue is full, what is queued is submitted; a
    /// busy kernel (EAGAIN/EBUSY until completions are reaped) has its completions moved
    /// to `backlog`, which the next `reap` hands out first, and is retried with backoff
    /// for up to `busyLimit` before the loop gives up loudly.
    private func sqe() throws(RingError) -> UnsafeMutablePointer<io_uring_sqe> {
        checkThread()
        if let s = io_uring_get_sqe(&ring) { return s }
        let deadline = ContinuousClock.now + Self.busyLimit
        var pause: UInt32 = 1
        while true {
            try submit()
            flushCompletions()
            take(into: &backlog)
            if let s = io_uring_get_sqe(&ring) { return s }
            guard ContinuousClock.now < deadline else {
                throw RingError(
                    operation: "get_sqe (the submission queue stayed full for \(Self.busyLimit))", errno: .resourceBusy)
            }
            usleep(pause)
            pause = min(pause * 2, 1000)
        }
    }

    /// How long a full submission queue, or a kernel refusing submits, is retried before
    /// the loop stops.
    static let busyLimit = Duration.seconds(1)

    func prepareRead(fd: CInt, into buffer: UnsafeMutableRawBufferPointer, token: RingToken) throws(RingError) {
        let s = try sqe()
        inFlight += 1
        io_uring_prep_read(s, fd, buffer.baseAddress, UInt32(buffer.count), UInt64(bitPattern: -1))
        io_uring_sqe_set_data64(s, token.userData)
    }

    /// One-shot poll for readability.
    func preparePollIn(fd: CInt, token: RingToken) throws(RingError) {
        let s = try sqe()
        inFlight += 1
        io_uring_prep_poll_add(s, fd, UInt32(POLLIN))
        io_uring_sqe_set_data64(s, token.userData)
    }

    func prepareWrite(fd: CInt, from buffer: UnsafeRawBufferPointer, token: RingToken) throws(RingError) {
        let s = try sqe()
        inFlight += 1
        io_uring_prep_write(s, fd, buffer.baseAddress, UInt32(buffer.count), UInt64(bitPattern: -1))
        io_uring_sqe_set_data64(s, token.userData)
    }

    /// Asks the kernel to cancel the operation submitted with `token`; its completion
    /// (usually -ECANCELED) still arrives and must be waited for before its buffer is freed.
    func prepareCancel(_ token: RingToken) throws(RingError) {
        let s = try sqe()
        io_uring_prep_cancel64(s, token.userData, 0)
        io_uring_sqe_set_data64(s, RingToken(kind: .cancel).userData)
    }

    /// Cancels every operation in flight.
    func prepareCancelAll() throws(RingError) {
        let s = try sqe()
        io_uring_prep_cancel64(s, 0, CInt(IORING_ASYNC_CANCEL_ANY))
        io_uring_sqe_set_data64(s, RingToken(kind: .cancel).userData)
    }

    /// Submits what is queued without waiting. A busy kernel (EAGAIN, EBUSY: completions
    /// to reap first) or a signal is transient: the entries stay queued for the next call.
    /// Refusals that last `busyLimit` are not: the loop stops loudly.
    func submit() throws(RingError) {
        checkThread()
        let r = if let e = planted?.take(.submit), e != 0 { -e } else { io_uring_submit(&ring) }
        try check(r, "submit")
    }

    /// Submits what is queued and waits for at least one completion or the timeout.
    func submitAndWait(timeoutNanoseconds: Int64) throws(RingError) {
        checkThread()
        if let e = planted?.take(.submit), e != 0 { return try check(-e, "submit_and_wait_timeout") }
        var ts = __kernel_timespec(
            tv_sec: timeoutNanoseconds / 1_000_000_000, tv_nsec: timeoutNanoseconds % 1_000_000_000)
        var cqe: UnsafeMutablePointer<io_uring_cqe>?
        let r = io_uring_submit_and_wait_timeout(&ring, &cqe, 1, &ts, nil)
        try check(r == -ETIME ? 0 : r, "submit_and_wait_timeout")
    }

    private func check(_ r: Int32, _ operation: String) throws(RingError) {
        if r >= 0 {
            refusedSince = nil
        } else if r == -EAGAIN || r == -EBUSY {
            let now = ContinuousClock.now
            guard let since = refusedSince else { return refusedSince = now }
            guard now - since < Self.busyLimit else {
                throw RingError(
                    operation: "\(operation) (the kernel refused every submit for \(Self.busyLimit))",
                    errno: Errno(rawValue: -r))
            }
        } else if r != -EINTR {
            throw RingError(operation: operation, errno: Errno(rawValue: -r))
        }
    }

    /// Whether completions are ready to reap (two loads: no call into liburing).
    var hasCompletions: Bool { !backlog.isEmpty || io_uring_cq_ready(&ring) > 0 }

    /// Lets the kernel post pending completions (task work) without sleeping.
    func flushCompletions() {
        _ = io_uring_get_events(&ring)
    }

    /// Appends every ready completion to `out` (those set aside while the submission
    /// queue was full first) and marks them seen. Returns how many.
    @discardableResult
    func reap(into out: inout [Completion]) -> Int {
        checkThread()
        let setAside = backlog.count
        if setAside > 0 {
            out += backlog
            backlog.removeAll(keepingCapacity: true)
        }
        return setAside + take(into: &out)
    }

    @discardableResult
    private func take(into out: inout [Completion]) -> Int {
        // The kernel kept completions that did not fit (IORING_FEAT_NODROP): liburing's
        // peek flushes them once there is room, so nothing is lost; only counted here.
        if ring.sq.kflags.pointee & UInt32(IORING_SQ_CQ_OVERFLOW) != 0 { overflowsSeen += 1 }
        var total = 0
        while true {
            let n = cqes.withUnsafeMutableBufferPointer { buf in
                Int(io_uring_peek_batch_cqe(&ring, buf.baseAddress, UInt32(buf.count)))
            }
            guard n > 0 else { return total }
            for i in 0..<n {
                let c = cqes[i]!.pointee
                if let token = RingToken(userData: c.user_data), token.kind != .cancel {
                    inFlight -= 1
                    var result = c.res
                    if token.kind == .wake, let e = planted?.take(.wakeWrite), e != 0 { result = -e }
                    out.append(Completion(token: token, result: result))
                }
            }
            io_uring_cq_advance(&ring, UInt32(n))
            total += n
        }
    }
}

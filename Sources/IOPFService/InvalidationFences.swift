// InvalidationFences.swift — IOTLB syncs that reach devices in other processes.
//
// An in-process device drops its translations inside the engine's sync call. A device in
// another process cannot be called under the engine's lock: the sync posts an INVALIDATE
// (a per-device sequence number and the gathered ranges) and returns, and the service loop
// sends it. The device acknowledges once it dropped the ranges and drained the DMA that
// used them. Whoever must not go on before the devices have dropped a translation (an
// invalidation's ticket, a host event's completion, `unmap`) takes a *fence*, the
// sequence last posted to every device, and waits until each device acknowledged it or was
// fenced off (detached) for missing the deadline. External devices never walk the
// service's page table (they translate by message), so freeing table pages at the sync is
// safe; the memory the translations named is what the fence protects.
//
// Shared by the engine's syncing thread (any) and the service loop: all state is under one
// mutex, held briefly, never while calling out.

import Foundation
import IOPFCore
import IOPFWire
import Synchronization

/// A domain of one address space: the service's own (space 0) or a host's (AddressSpace.swift).
/// Domain ids are per engine, and every address space has an engine of its own.
struct SyncDomain: Hashable {
    var space: UInt32
    var domain: DomainID
}

/// What must be acknowledged: per device (by generation), the sequence last posted to it.
struct Fence {
    var sequences: [(device: UInt32, sequence: UInt64)] = []
    var isEmpty: Bool { sequences.isEmpty }
}

final class InvalidationFences: @unchecked Sendable {
    struct Target {
        var domain: SyncDomain
        var pasid: UInt32?
        var posted: UInt64 = 0
        var acked: UInt64 = 0
        /// Deadline of each posted, unacknowledged sequence, oldest first.
        var deadlines: [(sequence: UInt64, deadline: ContinuousClock.Instant)] = []
    }

    struct State {
        var targets: [UInt32: Target] = [:]
        var outbox: [(device: UInt32, message: Invalidate)] = []
    }

    private let state = Lock(State())
    /// Set when the outbox has messages for the loop to send.
    let pending = Atomic<Bool>(false)
    let timeout: Duration
    /// Wakes threads that wait for a fence outside the loop.
    private let progress = NSCondition()
    /// Rings the loop when a sync posted from another thread.
    private let wakeLoop: @Sendable () -> Void

    init(timeout: Duration, wakeLoop: @escaping @Sendable () -> Void) {
        self.timeout = timeout
        self.wakeLoop = wakeLoop
    }

    var isEmpty: Bool { state.withLock { $0.targets.isEmpty } }

    func add(device: UInt32, domain: SyncDomain, pasid: UInt32?) {
        state.withLock { $0.targets[device] = Target(domain: domain, pasid: pasid) }
    }

    /// Forgets a device (detached, fenced or gone): fences stop waiting for it.
    func remove(device: UInt32) {
        state.withLock { s in
            s.targets[device] = nil
            s.outbox.removeAll { $0.device == device }
        }
        signalProgress()
    }

    /// Called by the engine's sync (any thread, engine lock held): posts `ranges` to every
    /// external device of `domain`, at most 256 ranges per message.
    func post(domain: SyncDomain, ranges: [IOVARange], onLoopThread: Bool) {
        let posted = state.withLock { s -> Bool in
            var any = false
            let deadline = ContinuousClock.now + timeout
            for (device, var t) in s.targets where t.domain == domain {
                var from = 0
                while from < ranges.count {
                    let chunk = ranges[from..<min(from + WireLimits.maxInvalidateRanges, ranges.count)]
                    t.posted += 1
                    t.deadlines.append((t.posted, deadline))
                    s.outbox.append(
                        (
                            device,
                            Invalidate(
                                sequence: t.posted, pasid: t.pasid,
                                ranges: chunk.map { ($0.start, $0.last) })
                        ))
                    from += chunk.count
                    any = true
                }
                s.targets[device] = t
            }
            return any
        }
        guard posted else { return }
        pending.store(true, ordering: .releasing)
        if !onLoopThread { wakeLoop() }
    }

    /// Messages the loop must send now.
    func takeOutbox() -> [(device: UInt32, message: Invalidate)] {
        pending.store(false, ordering: .relaxed)
        return state.withLock { s in
            defer { s.outbox.removeAll() }; return s.outbox
        }
    }

    /// The last sequence posted to `device` (0 before any), read before a TRANSLATE walk.
    func lastPosted(device: UInt32) -> UInt64 {
        state.withLock { $0.targets[device]?.posted ?? 0 }
    }

    /// Everything posted so far, to every device (of address space `space` only, when
    /// given) that still owes an acknowledgement.
    func fenceAll(space: UInt32? = nil) -> Fence {
        state.withLock { s in
            Fence(
                sequences: s.targets.compactMap { t in
                    t.value.posted > t.value.acked && (space == nil || t.value.domain.space == space)
                        ? (t.key, t.value.posted) : nil
                })
        }
    }

    func isComplete(_ f: Fence) -> Bool {
        if f.isEmpty { return true }
        return state.withLock { s in
            f.sequences.allSatisfy { (device, sequence) in (s.targets[device]?.acked ?? .max) >= sequence }
        }
    }

    /// An acknowledgement; false when `sequence` was never posted to `device` or was
    /// acknowledged already.
    func acknowledge(device: UInt32, sequence: UInt64) -> Bool {
        let known = state.withLock { s -> Bool in
            guard var t = s.targets[device], sequence > t.acked, sequence <= t.posted else { return false }
            t.acked = sequence
            t.deadlines.removeAll { $0.sequence <= sequence }
            s.targets[device] = t
            return true
        }
        if known { signalProgress() }
        return known
    }

    /// Devices whose oldest unacknowledged INVALIDATE is past its deadline.
    func overdue(at now: ContinuousClock.Instant) -> [UInt32] {
        state.withLock { s in
            s.targets.compactMap { ($0.value.deadlines.first?.deadline).map { d in d <= now } == true ? $0.key : nil }
        }
    }

    /// The nearest deadline, to bound the loop's sleep.
    func nearestDeadline() -> ContinuousClock.Instant? {
        state.withLock { s in s.targets.values.compactMap { $0.deadlines.first?.deadline }.min() }
    }

    /// Blocks a thread other than the loop's until `f` completes (or `limit` passes).
    func wait(for f: Fence, limit: Duration) -> Bool {
        let until = Date(timeIntervalSinceNow: limit.seconds)
        progress.lock()
        defer { progress.unlock() }
        while !isComplete(f) {
            if !progress.wait(until: until) { return isComplete(f) }
        }
        return true
    }

    private func signalProgress() {
        progress.lock()
        progress.broadcast()
        progress.unlock()
    }
}

/// A domain's sync target as the engine sees it: the in-process IOTLBs, called at once,
/// and the external devices, posted to through the fences.
final class DomainSync: IOTLBInvalidator, @unchecked Sendable {
    let domain: SyncDomain
    let local: (any IOTLBInvalidator)?
    let fences: InvalidationFences
    let isLoopThread: @Sendable () -> Bool

    init(
        domain: SyncDomain, local: (any IOTLBInvalidator)?, fences: InvalidationFences,
        isLoopThread: @escaping @Sendable () -> Bool
    ) {
        self.domain = domain
        self.local = local
        self.fences = fences
        self.isLoopThread = isLoopThread
    }

    func invalidate(_ ranges: [IOVARange]) {
        local?.invalidate(ranges)
        fences.post(domain: domain, ranges: ranges, onLoopThread: isLoopThread())
    }
}

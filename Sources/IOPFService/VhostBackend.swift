// VhostBackend.swift — a vhost-user back-end (DPDK's vhost library, or any other) as a
// device of the service: its IOTLB misses are page faults, served by the same engine and
// handler as page request groups, and the engine's IOTLB syncs reach it as IOTLB
// INVALIDATE messages whose REPLY_ACK is its acknowledgement, under the same deadline and
// fences as every other external device. The front-end's handshake (features, memory
// table, vrings) is done by whoever owns the connection (IOPFVhost) before it is handed
// here; from then on the loop owns both sockets.
//
// Addresses: the memory table gives each region's *physical* base (PhysicalSpace) as its
// user address, so an UPDATE names the physical address the I/O page table holds and the
// back-end finds it in the region it mapped from the memfd. Nothing else is needed to go
// from a translation to a vhost-user entry, for the service's own memory or a host's.
//
// Ordering: an UPDATE is sent in the same step that read its translation, on the loop
// thread, and INVALIDATEs go out later on the same socket; the back-end handles its main
// socket in order, so an entry is never installed after the invalidation that removed it.
//
// Trust: the back-end is another process. Its channel is a SOCK_SEQPACKET socketpair made
// here (one message per record, whole or refused); its replies on the stream socket are
// reassembled in a 20-byte buffer and must be the REPLY_ACK owed next. Messages per turn,
// replies owed and misses in flight are bounded; a back-end that sends anything else,
// stops reading, closes a socket or misses the deadline is fenced (both sockets closed,
// its domain's fences no longer wait for it) and the loop goes on serving the rest.
//
// Runs on the loop thread (an extension of `EventLoop`), but for `VhostDevice`, the
// embedder's handle.

import Foundation
import Glibc
import IOPFCore
import IOPFSystem
import IOPFWire

/// What a vhost-user back-end's front-end asked of the service, and what the back-end did.
public struct VhostStatistics: Sendable, Equatable, Codable {
    /// The device id the back-end was attached as.
    public var deviceID: UInt32 = 0
    /// IOTLB MISS messages received and served with an UPDATE.
    public var iotlbMisses = 0
    /// Misses the engine refused (outside every mapping, or no memory there): no UPDATE.
    public var missesRefused = 0
    /// IOTLB UPDATE messages sent.
    public var iotlbUpdates = 0
    /// Pages named by UPDATEs (fault-around makes it more than the misses).
    public var pagesUpdated = 0
    /// UPDATEs the back-end answered with a failure (its REPLY_ACK was not 0).
    public var updatesRefused = 0
    /// UPDATEs that replaced the back-end's smaller entries inside their run (an
    /// INVALIDATE of the run first: the back-end keeps an entry per UPDATE).
    public var entriesMerged = 0
    /// UPDATEs sent after an invalidation for the parts of the entries it dropped that
    /// are still mapped (the back-end drops whole entries).
    public var entriesRestored = 0
    /// Entries the back-end holds as far as the service knows, at the last publish.
    public var entries = 0
    /// IOTLB INVALIDATE messages sent, and iopf invalidations (one or more ranges each)
    /// whose every INVALIDATE the back-end acknowledged.
    public var invalidatesSent = 0
    /// iopf invalidations that reached the back-end.
    public var invalidationsPosted = 0
    /// Of those, the ones whose every INVALIDATE was acknowledged.
    public var invalidationsAcked = 0
    /// Why the service stopped serving it (fenced, gone, detached); nil while attached.
    public var ended: String?
    /// Whether it was fenced for breaking the protocol.
    public var fenced = false
    /// All zero.
    public init() {}
}

/// The embedder's handle on an attached back-end: statistics and miss latencies, published
/// by the loop: from reading a MISS to the back-end's REPLY_ACK of its UPDATE (what the
/// device waits, with its own handling), and to sending the UPDATE (the service's part).
public final class VhostDevice: Sendable {
    /// The device id the back-end was attached as.
    public let deviceID: UInt32
    /// A pthread lock (`Lock`), which ThreadSanitizer sees, unlike `Mutex` on Linux.
    let shared = Lock<(stats: VhostStatistics, latencies: [UInt64], serviceTimes: [UInt64], dropped: Int)>(
        (VhostStatistics(), [], [], 0))
    /// Samples kept between two `takeLatencies` calls; later ones are counted, not kept.
    static let maxSamples = 1 << 20

    init(deviceID: UInt32) {
        self.deviceID = deviceID
        shared.withLock { $0.stats.deviceID = deviceID }
    }

    /// The statistics the loop published last.
    public var statistics: VhostStatistics { shared.withLock { $0.stats } }

    /// The miss latencies and service times (ns) published since the last call, and how
    /// many of each were dropped.
    public func takeLatencies() -> (samples: [UInt64], serviceTimes: [UInt64], dropped: Int) {
        shared.withLock { s in
            defer {
                s.latencies = []
                s.serviceTimes = []
                s.dropped = 0
            }
            return (s.latencies, s.serviceTimes, s.dropped)
        }
    }
}

/// The loop's side of one back-end.
final class VhostBackend {
    enum Owed {
        case update(missAt: ContinuousClock.Instant)
        /// An UPDATE that gives back what an invalidation took beyond its range.
        case restore
        /// The last INVALIDATE of an iopf invalidation carries its sequence.
        case invalidate(sequence: UInt64?)
    }

    let handle: VhostDevice
    let slot: Int
    let generation: UInt32
    /// The vhost-user socket (front-end requests, REPLY_ACKs) and the back-end channel.
    let main: CInt
    let channel: CInt
    let domain: DomainID
    let engine: FaultEngine
    let handler: FaultHandler
    /// The address space it serves. A host's back-end was given the host's own addresses as
    /// user addresses (QEMU's way): UPDATEs name host addresses; the service's own,
    /// physical ones.
    let space: AddressSpace
    /// Pages of the aligned block an UPDATE's run stays in (a power of two), and pages a
    /// miss maps (fault-around).
    let runPages: Int
    let faultAroundPages: Int
    /// The IOTLB entries the back-end holds as far as the service knows: each UPDATE's
    /// range until an INVALIDATE overlapping it (the back-end drops whole entries). Sorted,
    /// disjoint, each inside one mapped run. The back-end may have evicted some (a miss
    /// then sends it again).
    var entries: [Range<UInt64>] = []
    var closed = false
    var mainArmed = false
    var channelArmed = false
    /// Replies owed, in the order the requests went out.
    var owed: [Owed] = []
    var owedHead = 0
    var inbox = [UInt8](repeating: 0, count: replyBytes)
    var inboxCount = 0
    var stats = VhostStatistics()
    var latencies: [UInt64] = []
    var serviceTimes: [UInt64] = []

    static let replyBytes = VhostUser.headerBytes + 8
    /// Back-end messages taken per turn, and replies owed before its misses wait.
    static let messagesPerTurn = 32
    static let maxOwed = 256

    init(
        handle: VhostDevice, slot: Int, generation: UInt32, main: CInt, channel: CInt, domain: DomainID,
        space: AddressSpace, runPages: Int, faultAroundPages: Int
    ) {
        self.space = space
        stats.deviceID = handle.deviceID
        self.handle = handle
        self.slot = slot
        self.generation = generation
        self.main = main
        self.channel = channel
        self.domain = domain
        engine = space.engine
        handler = space.handler
        self.runPages = runPages
        self.faultAroundPages = faultAroundPages
    }

    /// Index of the first entry that ends after `address`.
    private func firstEnding(after address: UInt64) -> Int {
        var (lo, hi) = (0, entries.count)
        while lo < hi {
            let mid = (lo + hi) / 2
            if entries[mid].upperBound <= address { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// The entries overlapping `range`, as an index range.
    func overlapping(_ range: Range<UInt64>) -> Range<Int> {
        let first = firstEnding(after: range.lowerBound)
        var end = first
        while end < entries.count && entries[end].lowerBound < range.upperBound { end += 1 }
        return first..<end
    }

    /// The user address an UPDATE gives for `run`.
    func userAddress(_ run: FaultEngine.MappedRun) -> UInt64 { space.isOwn ? run.phys : run.host }

    /// Replaces the entries overlapping `range` with `range` itself.
    func install(_ range: Range<UInt64>) {
        entries.replaceSubrange(overlapping(range), with: [range])
    }

    /// Forgets every entry overlapping `range`, as the back-end does on INVALIDATE.
    func forget(_ range: Range<UInt64>) {
        entries.removeSubrange(overlapping(range))
    }

    var owedCount: Int { owed.count - owedHead }

    /// Once per batch of messages read: a lock and a copy.
    func publish() {
        stats.entries = entries.count
        let (stats, samples, times) = (self.stats, latencies, serviceTimes)
        latencies.removeAll(keepingCapacity: true)
        serviceTimes.removeAll(keepingCapacity: true)
        handle.shared.withLock { s in
            s.stats = stats
            let room = max(0, VhostDevice.maxSamples - s.latencies.count)
            s.latencies += samples.prefix(room)
            s.serviceTimes += times.prefix(max(0, VhostDevice.maxSamples - s.serviceTimes.count))
            s.dropped += max(0, samples.count - room)
        }
    }
}

extension EventLoop {
    /// Takes a back-end whose handshake is done; its misses are served from the next turn.
    func addVhost(_ a: FaultService.VhostAttachment, space: AddressSpace? = nil) {
        let space = space ?? own
        let slot = vhosts.firstIndex { $0 == nil } ?? vhosts.count
        let b = VhostBackend(
            handle: a.handle, slot: slot, generation: nextGeneration(), main: a.main, channel: a.channel,
            domain: a.domain, space: space, runPages: a.runPages, faultAroundPages: a.faultAroundPages)
        if slot == vhosts.count { vhosts.append(b) } else { vhosts[slot] = b }
        vhostByGeneration[b.generation] = b
        fences.add(device: b.generation, domain: SyncDomain(space: space.id, domain: a.domain), pasid: nil)
        stats.externalDevices += 1
        let to = space.isOwn ? "" : " to host \(space.name)"
        let shape = "\(a.faultAroundPages) pages per miss, \(a.runPages)-page blocks"
        service.logger.info("vhost-user back-end \(a.handle.deviceID) attached\(to): \(shape)")
        armVhost(b)
        publish(b)
    }

    /// Publishes a back-end's statistics to its handle and, for a host's, to the host's
    /// record (what `iopf serve --json` shows): once per batch of messages read.
    func publish(_ b: VhostBackend) {
        b.publish()
        let s = b.space
        guard !s.isOwn else { return }
        let current = b.stats
        stats.host(s.id) { r in
            if let i = r.vhost.firstIndex(where: { $0.deviceID == current.deviceID && $0.ended == nil }) {
                r.vhost[i] = current
            } else {
                r.vhost.append(current)
                if r.vhost.count > HostRecord.keptVhostRecords { r.vhost.removeFirst() }
            }
        }
    }

    private func armVhost(_ b: VhostBackend) {
        guard !b.closed else { return }
        do {
            if !b.channelArmed && b.owedCount < VhostBackend.maxOwed {
                try ring.preparePollIn(
                    fd: b.channel, token: RingToken(kind: .vhostChannel, slot: b.slot, generation: b.generation))
                b.channelArmed = true
            }
            if !b.mainArmed {
                try ring.preparePollIn(
                    fd: b.main, token: RingToken(kind: .vhostMain, slot: b.slot, generation: b.generation))
                b.mainArmed = true
            }
        } catch {
            closeVhost(b, reason: "cannot poll its sockets: \(error)", fenced: false)
        }
    }

    func vhost(_ token: RingToken) -> VhostBackend? {
        guard token.slot < vhosts.count, let b = vhosts[token.slot], b.generation == token.generation, !b.closed else {
            return nil
        }
        return b
    }

    /// Detaches a back-end: its fences stop waiting, both sockets close (the back-end sees
    /// its front-end go, as when QEMU exits). Idempotent.
    func closeVhost(_ b: VhostBackend, reason: String, fenced: Bool) {
        guard !b.closed else { return }
        b.closed = true
        fences.remove(device: b.generation)
        vhostByGeneration[b.generation] = nil
        if b.channelArmed {
            try? ring.prepareCancel(RingToken(kind: .vhostChannel, slot: b.slot, generation: b.generation))
        }
        if b.mainArmed { try? ring.prepareCancel(RingToken(kind: .vhostMain, slot: b.slot, generation: b.generation)) }
        // Polls hold no buffers: the descriptors can go now; stale completions are told apart by generation.
        Sys.close(b.main)
        Sys.close(b.channel)
        b.stats.ended = reason
        b.stats.fenced = fenced
        if fenced { stats.devicesFenced += 1 }
        stats.devicesClosed += 1
        publish(b)
        vhosts[b.slot] = nil
        service.logger.info("vhost-user back-end \(b.handle.deviceID) \(reason)")
    }

    /// A back-end that broke the protocol: fenced alone.
    private func fenceVhost(_ b: VhostBackend, _ kind: ProtocolErrorKind, _ why: String) {
        stats.protocolError(kind)
        closeVhost(b, reason: "fenced: \(why)", fenced: true)
    }

    // MARK: Misses

    /// Reads the back-end channel: a turn's worth of IOTLB misses, each served at once.
    func readVhostChannel(_ b: VhostBackend) {
        b.channelArmed = false
        for _ in 0..<VhostBackend.messagesPerTurn where !b.closed && b.owedCount < VhostBackend.maxOwed {
            let got: Sys.Received
            do {
                got = try Sys.receive(b.channel, into: messageBuffer, maxFDs: 1, nonBlocking: true)
            } catch  where error.errno == .wouldBlock {
                break
            } catch {
                closeVhost(b, reason: "gone: receive on its back-end channel failed: \(error)", fenced: false)
                return
            }
            guard got.count > 0 else {
                closeVhost(b, reason: "gone: it closed its back-end channel", fenced: false)
                return
            }
            for fd in got.fds { Sys.close(fd) }
            guard got.fds.isEmpty, !got.truncated else {
                fenceVhost(
                    b, .badVhostMessage,
                    got.truncated
                        ? "a back-end message longer than any it may send"
                        : "descriptors with a back-end message")
                return
            }
            let message: VhostUser.BackendMessage
            do {
                message = try VhostUser.BackendMessage(
                    bytes: UnsafeRawBufferPointer(rebasing: messageBuffer[..<got.count]))
            } catch {
                fenceVhost(b, .badVhostMessage, "its back-end message is not an IOTLB MISS: \(error)")
                return
            }
            serveMiss(b, message)
        }
        armVhost(b)
        if !b.closed { publish(b) }
    }

    /// Maps the missed page (and up to `runPages - 1` after it) through the engine, as a
    /// one-request page group, and sends the contiguous run now translated as one UPDATE.
    private func serveMiss(_ b: VhostBackend, _ m: VhostUser.BackendMessage) {
        let at = ContinuousClock.now
        let page = m.iotlb.iova & ~0xFFF
        guard m.iotlb.kind == .miss else {
            // ACCESS_FAIL: the back-end reports a translation it could not use; nothing to serve.
            stats.protocolError(.vhostAccessFail)
            if m.needsReply { replyToBackend(b, failed: false) }
            return
        }
        var perm: PageRequest.Permission = []
        if m.iotlb.permission & VhostUser.IOTLBMessage.read != 0 { perm.insert(.read) }
        if m.iotlb.permission & VhostUser.IOTLBMessage.write != 0 { perm.insert(.write) }
        let request = PageRequest(
            flags: .lastPage, deviceID: b.handle.deviceID, groupIndex: 0, perm: perm, addr: page,
            cookie: 1)
        let outcome = b.handler.handle([request], ahead: b.faultAroundPages - 1)
        stats.records += 1
        stats.groups += 1
        guard outcome.code == .success else {
            stats.invalid += 1
            b.stats.missesRefused += 1
            if m.needsReply { replyToBackend(b, failed: true) }
            return
        }
        stats.success += 1
        stats.prefetchedPages += outcome.prefetched
        b.stats.iotlbMisses += 1
        // The whole mapped run around the page within its aligned block: entries grow as
        // the device's memory is faulted in, and the back-end's list of them stays short
        // (DPDK 22.11 searches it linearly on every translation).
        let block = UInt64(b.runPages) << 12
        let start = page & ~(block - 1)
        let (end, overflow) = start.addingReportingOverflow(block)
        guard let run = b.engine.mappedRun(domain: b.domain, around: page, within: start..<(overflow ? .max : end))
        else {
            stats.invalid += 1
            b.stats.missesRefused += 1
            if m.needsReply { replyToBackend(b, failed: true) }
            return
        }
        let held = b.overlapping(run.range)
        if !held.isEmpty && !(held.count == 1 && b.entries[held.lowerBound] == run.range) {
            // Smaller entries inside the run: dropped first, or the back-end would keep them
            // all (and ignore an UPDATE at an IOVA it holds, whatever its size).
            let drop = VhostUser.IOTLBMessage(
                iova: run.range.lowerBound, size: UInt64(run.range.count), userAddress: 0,
                permission: 0, kind: .invalidate)
            guard
                sendToVhost(
                    b, VhostUser.message(.iotlbMessage, flags: .needsReply, payload: drop.bytes),
                    .invalidate(sequence: nil))
            else { return }
            b.stats.entriesMerged += 1
        }
        guard sendUpdate(b, run, .update(missAt: at)) else { return }
        b.serviceTimes.append(UInt64((ContinuousClock.now - at).nanoseconds))
        b.install(run.range)
        b.stats.iotlbUpdates += 1
        b.stats.pagesUpdated += run.range.count >> 12
        if m.needsReply { replyToBackend(b, failed: false) }
    }

    /// Sends an UPDATE naming `run` (its IOVAs, user address and permission).
    private func sendUpdate(_ b: VhostBackend, _ run: FaultEngine.MappedRun, _ owed: VhostBackend.Owed) -> Bool {
        let permission =
            (run.prot.contains(.read) ? VhostUser.IOTLBMessage.read : 0)
            | (run.prot.contains(.write) ? VhostUser.IOTLBMessage.write : 0)
        let update = VhostUser.IOTLBMessage(
            iova: run.range.lowerBound, size: UInt64(run.range.count),
            userAddress: b.userAddress(run), permission: permission, kind: .update)
        return sendToVhost(b, VhostUser.message(.iotlbMessage, flags: .needsReply, payload: update.bytes), owed)
    }

    private func replyToBackend(_ b: VhostBackend, failed: Bool) {
        do {
            try Sys.send(b.channel, VhostUser.backendAck(.iotlbMessage, failed: failed), nonBlocking: true)
        } catch {
            fenceVhost(b, .slowReader, "cannot answer its back-end request: \(error)")
        }
    }

    /// Sends one front-end request that needs a REPLY_ACK. False when the back-end is gone
    /// or was fenced for not reading.
    private func sendToVhost(_ b: VhostBackend, _ bytes: [UInt8], _ owed: VhostBackend.Owed) -> Bool {
        do {
            try Sys.send(b.main, bytes, nonBlocking: true)
        } catch  where error.errno == .brokenPipe || error.errno == .connectionReset {
            closeVhost(b, reason: "gone: \(error)", fenced: false)
            return false
        } catch {
            // A full socket (or a short write, which leaves the stream cut mid-message).
            fenceVhost(b, .slowReader, "cannot send to it: \(error)")
            return false
        }
        b.owed.append(owed)
        return true
    }

    // MARK: Replies and invalidations

    /// Reads REPLY_ACKs from the main socket, each matched with the request owed first.
    func readVhostMain(_ b: VhostBackend) {
        b.mainArmed = false
        let now = ContinuousClock.now
        for _ in 0..<(4 * VhostBackend.messagesPerTurn) where !b.closed {
            let n = b.inbox.withUnsafeMutableBytes { p in
                recv(b.main, p.baseAddress! + b.inboxCount, VhostBackend.replyBytes - b.inboxCount, CInt(MSG_DONTWAIT))
            }
            if n < 0 {
                let e = errno
                if e == EAGAIN || e == EINTR { break }
                closeVhost(b, reason: "gone: receive on its socket failed: errno \(e)", fenced: false)
                return
            }
            guard n > 0 else {
                closeVhost(b, reason: "gone: it closed its socket", fenced: false)
                return
            }
            b.inboxCount += n
            guard b.inboxCount == VhostBackend.replyBytes else { continue }
            b.inboxCount = 0
            guard b.owedHead < b.owed.count else {
                fenceVhost(b, .badVhostReply, "it replied when nothing was owed")
                return
            }
            let result: UInt64
            do {
                result = try b.inbox.withUnsafeBytes { try VhostUser.decodeU64Reply(to: .iotlbMessage, $0) }
            } catch {
                fenceVhost(b, .badVhostReply, "its reply is not the REPLY_ACK owed: \(error)")
                return
            }
            let owed = b.owed[b.owedHead]
            b.owedHead += 1
            if b.owedHead == b.owed.count || b.owedHead >= 1024 {
                b.owed.removeFirst(b.owedHead)
                b.owedHead = 0
            }
            switch owed {
            case .update(let missAt):
                if result != 0 { b.stats.updatesRefused += 1 }
                b.latencies.append(UInt64((now - missAt).nanoseconds))
            case .restore:
                if result != 0 { b.stats.updatesRefused += 1 }
            case .invalidate(let sequence):
                // A failed INVALIDATE still left no entry to use: DPDK fails only unknown types.
                guard let sequence else { break }
                if fences.acknowledge(device: b.generation, sequence: sequence) {
                    b.stats.invalidationsAcked += 1
                    stats.invalidationsAcked += 1
                }
            }
        }
        armVhost(b)
        if !b.closed { publish(b) }
    }

    /// Sends one iopf invalidation to a back-end: an IOTLB INVALIDATE per range, each with
    /// NEED_REPLY; the last one's REPLY_ACK acknowledges the sequence. The back-end drops
    /// every entry that overlaps a range, whole: the parts of those entries outside the
    /// ranges that are still mapped are sent again right after (UPDATEs behind the
    /// INVALIDATEs on the same socket), so one invalidated page of a 32 MiB entry does not
    /// turn every other page of it into a miss.
    func sendVhostInvalidation(_ b: VhostBackend, _ message: Invalidate) {
        b.stats.invalidationsPosted += 1
        var dropped: [Range<UInt64>] = []
        var cut: [Range<UInt64>] = []
        for (k, r) in message.ranges.enumerated() where !b.closed {
            let (size, overflow) = (r.1 - r.0).addingReportingOverflow(1)
            let range = r.0..<(overflow ? .max : r.1 + 1)
            let msg = VhostUser.IOTLBMessage(
                iova: r.0, size: overflow ? .max : size, userAddress: 0, permission: 0,
                kind: .invalidate)
            dropped += b.entries[b.overlapping(range)]
            cut.append(range)
            b.forget(range)
            let last = k == message.ranges.count - 1
            guard
                sendToVhost(
                    b, VhostUser.message(.iotlbMessage, flags: .needsReply, payload: msg.bytes),
                    .invalidate(sequence: last ? message.sequence : nil))
            else { return }
            b.stats.invalidatesSent += 1
            stats.invalidationsSent += 1
        }
        for entry in dropped {
            // What is left of the entry: its pieces between the invalidated ranges, each
            // announced from both of its ends (a piece with a hole inside gets two runs).
            var pieces = [entry]
            for c in cut {
                pieces = pieces.flatMap { p -> [Range<UInt64>] in
                    guard p.overlaps(c) else { return [p] }
                    return [
                        p.lowerBound..<max(p.lowerBound, c.lowerBound), min(p.upperBound, c.upperBound)..<p.upperBound,
                    ]
                    .filter { !$0.isEmpty }
                }
            }
            for piece in pieces {
                for edge in [piece.lowerBound, piece.upperBound - 4096] where !b.closed {
                    guard b.overlapping(edge..<(edge + 4096)).isEmpty,
                        let run = b.engine.mappedRun(domain: b.domain, around: edge, within: piece)
                    else { continue }
                    guard sendUpdate(b, run, .restore) else { return }
                    b.install(run.range)
                    b.stats.entriesRestored += 1
                }
            }
        }
    }
}

// HostPinning.swift — pinned DMA mappings for hosts in other processes (DMA_MAP with PIN,
// protocol 1.2): VFIO type1's semantics on a host's memory, so that pinned and
// fault-driven memory can be compared on a VMM's own memory (`iopf host --pinned`).
//
// A pinned mapping is populated, locked and mapped whole before DMA_MAP is answered
// (`FaultEngine.mapPinned`, through the service's own mapping of the host's memfds);
// its devices never fault; host events leave it alone, as VFIO's pinned pages stay
// whatever the VMM does with its page tables (the memfd is shared, so what the devices
// and the host see stays the same page); DMA_UNMAP unlocks it.
//
// Cost per turn: pinning is kernel work of about a second per GiB here, far more than a
// loop turn may take, so it runs on a worker thread of its own (nice 10, one per host at a
// time) and posts its completion back as a command. Until then the loop reads nothing
// more from that host (as during a TRANSLATE walk), and a teardown of the host leaves
// its mappings and memory to the completion: the worker is still touching them.
//
// Budgets: the host's own RLIMIT_MEMLOCK unless it has CAP_IPC_LOCK (read from /proc/PID
// at HOST, as VFIO charges the VMM's locked_vm), and `maxHostPinnedBytes` per host
// whatever the host may, because pinning a sparse memfd allocates all of it.

import Foundation
import Glibc
import IOPFCore
import IOPFSystem
import IOPFWire

/// What a pinning worker reports to the loop.
struct PinCompletion: Sendable {
    var space: UInt32
    var messageID: UInt16
    var size: UInt64
    /// Nil when the mapping is pinned and mapped; else the reply's errno, kind and text.
    var failure: (errno: UInt32, kind: ProtocolErrorKind, text: String)?
}

/// A host's locked-memory limit as VFIO would apply it: its RLIMIT_MEMLOCK soft limit,
/// lifted when it holds CAP_IPC_LOCK. Unreadable limits count as none allowed.
enum HostLockLimit {
    static func of(pid: Int32) -> (bytes: UInt64, bypasses: Bool) {
        let status = Sys.readText("/proc/\(pid)/status") ?? ""
        let capEff =
            status.split(separator: "\n").first { $0.hasPrefix("CapEff:") }
            .flatMap { UInt64($0.dropFirst(7).trimmingCharacters(in: .whitespaces), radix: 16) } ?? 0
        let ipcLock: UInt64 = 1 << 14  // CAP_IPC_LOCK
        let limits = Sys.readText("/proc/\(pid)/limits") ?? ""
        let line = limits.split(separator: "\n").first { $0.hasPrefix("Max locked memory") }
        let soft = line?.dropFirst("Max locked memory".count).split(whereSeparator: \.isWhitespace).first
        let bytes = soft == "unlimited" ? UInt64.max : soft.flatMap { UInt64($0) } ?? 0
        return (bytes, capEff & ipcLock != 0)
    }
}

extension EventLoop {
    /// DMA_MAP with PIN: checked here, pinned on a worker, answered by `hostPinned`.
    func hostMapPinned(_ p: Peer, _ header: MessageHeader, _ request: DMAMapRequest, prot: Protection, s: AddressSpace)
    {
        let limit = service.configuration.maxHostPinnedBytes
        let (pinned, overflow) = s.pinnedBytes.addingReportingOverflow(request.size)
        guard !overflow, pinned <= limit else {
            stats.hostBudgetsExceeded += 1
            stats.protocolError(.hostPinnedBudget)
            return reply(
                p,
                Wire.errorReply(
                    command: .dmaMap, id: header.id, errno: WireErrno.noSpace,
                    text: "DMA map: pinning \(hex(request.size)) more bytes would pass this host's budget of "
                        + "\(hex(limit)) pinned bytes (--max-host-pinned); \(hex(s.pinnedBytes)) are pinned"))
        }
        // The host's own limit, checked here as the engine's charge would (one pin per host
        // at a time, so nothing charges in between): a refusal needs no worker.
        let account = s.engine.lockedMemory
        let pages = Int(clamping: request.size >> 12)
        if !account.bypassesLimit && account.lockedPages + pages > account.limitPages {
            stats.protocolError(.hostPinnedBudget)
            let b = { (pages: Int) in hex(UInt64(pages) << 12) }
            return reply(
                p,
                Wire.errorReply(
                    command: .dmaMap, id: header.id, errno: WireErrno.noMemory,
                    text: "DMA map with PIN: \(b(pages)) more bytes would pass this host's RLIMIT_MEMLOCK of "
                        + "\(b(account.limitPages)) (\(b(account.lockedPages)) are locked); raise it or give the host "
                        + "CAP_IPC_LOCK"))
        }
        s.host!.pinInFlight = true
        p.pinning = true
        pinning[s.id] = s
        let (engine, service, group) = (s.engine, service, pinWorkers)
        let (space, id) = (s.id, header.id)
        group.enter()
        Thread.detachNewThread {
            defer { group.leave() }
            _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 10)  // this thread only (Linux)
            var done = PinCompletion(space: space, messageID: id, size: request.size)
            do {
                try engine.mapPinned(iova: request.iova, vaddr: request.hostAddress, size: request.size, prot: prot)
            } catch let e as DMAMapError {
                done.failure = (e.errno, .badMapping, e.description)
            } catch {
                // The limit was checked before: what is left is memory the kernel would not lock.
                done.failure = (WireErrno.fault, .hostPinnedBudget, "DMA map with PIN: \(error)")
            }
            try? service.send(.hostPinned(done))
        }
    }

    /// A pinning worker finished: answer its host and read it again, or finish the
    /// teardown that waited for it.
    func hostPinned(_ c: PinCompletion) {
        guard let s = pinning.removeValue(forKey: c.space) else { return }
        s.host!.pinInFlight = false
        guard !s.closed else {
            releaseMemory(s)
            return
        }
        let p = s.peer
        p.pinning = false
        if let f = c.failure {
            stats.protocolError(f.kind)
            reply(p, Wire.errorReply(command: .dmaMap, id: c.messageID, errno: f.errno, text: f.text))
        } else {
            s.mappedBytes += c.size
            stats.host(s.id) {
                $0.mappings += 1
                $0.pinnedBytes = Int(clamping: s.pinnedBytes)
            }
            reply(p, Wire.message(command: .dmaMap, id: c.messageID, flags: .reply))
        }
        if p.state != .closed { armControl(p) }
    }

    /// At shutdown: waits for the pinning workers (a minute at most), then lets go of what
    /// their hosts' teardowns left to them.
    func finishPinning() {
        guard !pinning.isEmpty else { return }
        guard pinWorkers.wait(timeout: .now() + 60) == .success else {
            service.logger.critical("pinning workers still running at shutdown: their hosts' memory stays mapped")
            return
        }
        for s in pinning.values where s.closed { releaseMemory(s) }
        pinning = [:]
    }
}

extension DMAMapError {
    /// The errno a host's DMA_MAP refused with this error gets.
    var errno: UInt32 {
        switch self {
        case .overlap: WireErrno.exists
        case .entryLimit: WireErrno.noSpace
        default: WireErrno.invalid
        }
    }
}

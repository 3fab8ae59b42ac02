// EventLoop.swift — the service thread: one io_uring serves every device's fault channel,
// the command eventfd, the userfaultfd, the listening socket and every peer's sockets.
// All engine work for faults and invalidations happens here, in batches: completions are
// reaped together, responses written back together, one submit per loop turn.
//
// Latency: a thread wake-up costs about 10 µs here, so after any activity the loop
// busy-polls (shared rings in memory, streams through the completion queue) before it
// sleeps in io_uring, for a window adapted to how far apart work arrives (SpinWindow.swift),
// at most `spinNanoseconds`.
//
// Ownership: the loop, its devices' state, their transports and the ring are touched by
// the service thread only, so their hot stored properties are `@exclusivity(unchecked)`
// (Swift's dynamic checks were a fifth of a one-in-flight round trip's samples).
//
// Lifetimes: a device's transport is dropped only after its ring operations completed
// (cancelled on close); a peer's sockets are only polled (no buffers in flight), so they
// are closed at once and stale completions are told apart by generation.

import CIOPFShim
import Foundation
import Glibc
@_spi(SharedRings) import IOPFSystem
import IOPFWire
import Logging
@_spi(FaultInjection) import IOPFCore

/// One attached device as the loop sees it.
final class AttachedDevice {
    let token: TokenSource
    let deviceID: UInt32
    let pasid: UInt32?
    let domain: DomainID
    @exclusivity(unchecked) var assembler: GroupAssembler
    let transport: any FaultTransport
    @exclusivity(unchecked) var queued: [PageResponse] = []
    /// IOVA ranges an external device may fault on and translate; empty: anywhere.
    let windows: [DMAWindow]
    /// The connection that attached it; nil for in-process devices.
    var peer: Peer?
    @exclusivity(unchecked) var closing = false
    /// The address space it is attached to: the service's own (space 0) or a host's.
    let space: AddressSpace
    /// Its space's engine and fault handler, kept here for the fault path.
    let engine: FaultEngine
    let handler: FaultHandler

    init(
        token: TokenSource, deviceID: UInt32, pasid: UInt32?, domain: DomainID, credit: Int,
        transport: any FaultTransport, windows: [DMAWindow] = [], space: AddressSpace
    ) {
        self.token = token
        self.space = space
        engine = space.engine
        handler = space.handler
        self.deviceID = deviceID
        self.pasid = pasid
        self.domain = domain
        assembler = GroupAssembler(deviceID: deviceID, pasid: pasid, credit: credit)
        self.transport = transport
        self.windows = windows
    }

    var generation: UInt32 { token.generation }

    /// Sequential-fault detection for fault-around.
    @exclusivity(unchecked) var faultAround = FaultAroundState()
    /// The next window of a sequential stream, mapped a chunk per loop turn after the
    /// answer went out (`[next, end)`, IOVAs), so that the device writes the window it was
    /// given while the service populates the one after it.
    @exclusivity(unchecked) var prefetch: (next: UInt64, end: UInt64, write: Bool)?
    /// Random faults answered this turn whose resident neighbours are still to be mapped
    /// (after the answers went out: the fault does not wait for them). Bounded: a fault
    /// beyond `maxNeighbourJobs` in one turn gets none.
    @exclusivity(unchecked) var neighbourJobs: [(iova: UInt64, write: Bool)] = []
    /// Complete groups with nothing to map ahead, handled together at the end of the loop
    /// turn (one resolve per contiguous run across them), and scratch for that call.
    @exclusivity(unchecked) var batched: [PageRequestGroup] = []
    @exclusivity(unchecked) var batchRequests: [PageRequest] = []
    @exclusivity(unchecked) var batchEnds: [Int] = []

    func inWindows(_ iova: UInt64) -> Bool {
        windows.isEmpty || windows.contains { iova >= $0.iova && iova - $0.iova < $0.size }
    }

    /// `pages` after page `iova`, cut at the end of the window holding it: an external
    /// device's pages are mapped ahead only where it may fault.
    func aheadInWindow(_ iova: UInt64, _ pages: Int) -> Int {
        guard pages > 0, !windows.isEmpty else { return pages }
        guard let w = windows.first(where: { iova >= $0.iova && iova - $0.iova < $0.size }) else { return 0 }
        return min(pages, Int((w.size - (iova - w.iova)) >> 12) - 1)
    }
}

final class EventLoop {
    let service: FaultService
    let engine: FaultEngine
    let ring: Ring
    let handler: FaultHandler
    let fences: InvalidationFences
    /// Every attached device (DeviceRegistry.swift).
    @exclusivity(unchecked) var registry = DeviceRegistry()
    var peers: [Peer?] = []
    /// Hosts' address spaces (HostPeer.swift), by slot.
    var hosts: [AddressSpace?] = []
    /// The service's own memory: address space 0.
    let own: AddressSpace
    /// Every address space: the service's own, then the hosts'.
    var spaces: [AddressSpace] { [own] + hosts.compactMap { $0 } }
    /// vhost-user back-ends (VhostBackend.swift), by slot and by generation.
    var vhosts: [VhostBackend?] = []
    /// Hosts whose pinned DMA_MAP is on a worker (HostPinning.swift), by space id.
    var pinning: [UInt32: AddressSpace] = [:]
    let pinWorkers = DispatchGroup()
    var vhostByGeneration: [UInt32: VhostBackend] = [:]
    var nextSpaceID: UInt32 = 0
    var listener: (fd: CInt, path: String, provisioner: any DeviceProvisioner)?
    var generation: UInt32 = 0
    @exclusivity(unchecked) var completions: [Completion] = []
    @exclusivity(unchecked) var stats = ServiceStatistics()
    /// Completions that wait for external acknowledgements, in order per address space
    /// (0: the service's own).
    @exclusivity(unchecked) var deferred: [(space: UInt32, fence: Fence, action: () -> Void)] = []
    let commandBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 8, alignment: 8)
    /// One received peer message at a time.
    let messageBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: WireLimits.maxMessageBytes + 1, alignment: 8)
    @exclusivity(unchecked) var running = true
    let doubleAnswer: Bool
    /// Peers whose TRANSLATE is being walked, a few pages per turn, and where the next
    /// turn starts among them.
    var translators: [Peer] = []
    var translateCursor = 0
    /// TRANSLATE pages this turn may still walk.
    var translateBudget = translatePagesPerTurn
    /// Some device has a window being mapped in the background: the loop must not sleep.
    @exclusivity(unchecked) var prefetching = false
    /// Some device has groups waiting to be handled together at the end of this turn.
    @exclusivity(unchecked) var batching = false
    /// Pages a device's background window maps per loop turn: a fault of another device
    /// waits for at most one chunk (256 KiB, about 60 µs to populate once warm).
    static let prefetchChunk = 64
    /// Random faults per device and turn whose resident neighbours are mapped after the answer.
    static let maxNeighbourJobs = 32
    /// Pages a sequential fault gets mapped ahead before its answer; the rest of its
    /// window, and the window after, are mapped in the background. Measured on 1 GiB of
    /// sequential first touch (bench fault-around, first touch against one populate call):
    /// all 512 before answering, 0.8-1.0x with 30x fewer groups; 256, 1.04x and 25x;
    /// 128, 1.04-1.15x and 15x; 64, 1.1x but only 5x fewer groups.
    static let syncPages = 128
    /// Over huge pages a full window (512 pages) sends this many blocks to the background.
    static let blocksPerFullWindow = 8
    /// How long the loop spins after its last work before it sleeps (SpinWindow.swift).
    var spin: SpinWindow
    /// Room for 16 userfaultfd messages per read.
    let uffdBuffer = UnsafeMutableRawBufferPointer.allocate(
        byteCount: 16 * UserfaultfdSource.messageBytes, alignment: 8)

    init(service: FaultService) throws {
        self.service = service
        engine = service.engine
        fences = service.fences
        ring = try Ring(entries: service.configuration.ringEntries)
        ring.planted = service.planted
        handler = engine.makeFaultHandler()
        own = AddressSpace(own: engine, handler: handler)
        doubleAnswer = service.configuration.injectedBugs.contains(.doubleAnswer)
        spin = SpinWindow(maximum: service.configuration.spinNanoseconds)
        completions.reserveCapacity(Int(service.configuration.ringEntries) * 2)
    }

    deinit {
        commandBuffer.deallocate()
        messageBuffer.deallocate()
        uffdBuffer.deallocate()
    }

    func nextGeneration() -> UInt32 {
        generation &+= 1
        if generation == 0 { generation = 1 }
        return generation
    }

    func run() {
        signal(SIGPIPE, SIG_IGN)
        do {
            try ring.prepareRead(fd: service.doorbell, into: commandBuffer, token: RingToken(kind: .commands))
            if let uffd = service.uffd { try ring.preparePollIn(fd: uffd.fd, token: RingToken(kind: .hostEvent)) }
            var lastActivity = ContinuousClock.now
            var lastFlush = lastActivity
            var lastSweep = lastActivity
            var idle = false
            while running {
                registry.beginTurn()
                try ring.submit()
                completions.removeAll(keepingCapacity: true)
                ring.reap(into: &completions)
                takeHostEvents()
                var work = pollSharedRings()
                if completions.isEmpty && work == 0 && !prefetching && translators.isEmpty
                    && !fences.pending.load(ordering: .acquiring)
                {
                    idle = true
                    work = spinForWork(since: lastActivity, lastFlush: &lastFlush)
                    if work == 0 {
                        if !ring.hasCompletions && !fences.pending.load(ordering: .acquiring) {
                            stats.sleeps += 1
                            try sleep()
                        }
                        ring.reap(into: &completions)
                        takeHostEvents()
                        work = pollSharedRings()
                    }
                }
                let now = ContinuousClock.now
                if idle {
                    idle = false
                    spin.idleEnded(after: (now - lastActivity).nanoseconds)
                    stats.spinNanoseconds = spin.nanoseconds
                }
                lastActivity = now
                stats.loopTurns += 1
                translateBudget = translatePagesPerTurn
                stats.completionOverflows = ring.overflowsSeen
                stats.completions += completions.count
                for c in completions { try dispatch(c) }
                if lastActivity - lastSweep > FaultService.commandSweep {
                    // Commands whose doorbell ring was lost wait at most this long.
                    lastSweep = lastActivity
                    for command in service.takeCommands() { try perform(command) }
                    if !peers.isEmpty { sweepSilentPeers(now: lastActivity) }
                    for case let h? in hosts { noteHostFaults(h) }
                }
                serveExternalDevices()
                if batching { handleBatches() }
                flushResponses()
                if !translators.isEmpty { advanceTranslations() }
                if prefetching { prefetchAhead() }
                runDeferred()
                service.publish(stats)
            }
        } catch {
            // Not transient (those are retried in Ring): every device is detached with its
            // groups answered INVALID, and later commands fail at once with `stopped`.
            stats.stopped = "the event loop stopped: \(error)"
            service.publish(stats)  // before commands are refused: whoever is refused sees why
            service.logger.critical("event loop stopped: \(error)")
        }
        shutdown()
    }

    /// Busy-polls the shared rings and the completion queue until either has work or the
    /// spin window since `lastActivity` has passed. Returns the records taken; 0 when the
    /// window passed or completions are ready, which the turn reaps before it takes
    /// records (host events before faults, as at the top of the loop). The clock is read
    /// every 16 polls (a read cost as much as a poll), and the kernel is asked to post
    /// completions at each poll while stream devices are attached (they progress only
    /// then), every 20 µs otherwise.
    private func spinForWork(
        since lastActivity: ContinuousClock.Instant, lastFlush: inout ContinuousClock.Instant
    ) -> Int {
        let window = Duration.nanoseconds(spin.nanoseconds)
        let streams = registry.streamDevices > 0
        var polls = 0
        while true {
            if ring.hasCompletions { return 0 }
            let taken = pollSharedRings()
            if taken > 0 { return taken }
            if streams { ring.flushCompletions() }
            polls &+= 1
            if polls & 15 == 0 {
                let now = ContinuousClock.now
                if now - lastActivity >= window || fences.pending.load(ordering: .acquiring) { return 0 }
                if !streams && now - lastFlush > .microseconds(20) {
                    ring.flushCompletions()
                    lastFlush = now
                }
            }
        }
    }

    /// Sleeps in io_uring until a completion, the doorbell, or the nearest invalidation
    /// deadline. Shared rings are told first, then looked at once more, so a device that
    /// published before seeing the flag is not missed and one that published after rings
    /// its doorbell.
    private func sleep() throws {
        var ready = false
        for p in registry.polled {
            if p.ring.announceSleep() { ready = true }
        }
        if !ready {
            var timeout: Int64 = 100_000_000
            if let deadline = fences.nearestDeadline() {
                let left = deadline - ContinuousClock.now
                timeout = max(0, min(timeout, left.nanoseconds))
            }
            try ring.submitAndWait(timeoutNanoseconds: max(timeout, 1000))
        }
        for case let d? in registry.slots where d.transport.isShared { d.transport.endSleep() }
    }

    /// Handles the host events among `completions` before any fault of this turn: a fault
    /// must not be granted on a range whose REMOVE is already waiting to be read (the
    /// userfaultfd pitfall of a fault read before the event that logically precedes it).
    /// Handled completions become no-ops.
    private func takeHostEvents() {
        for i in completions.indices
        where completions[i].token.kind == .hostEvent || completions[i].token.kind == .hostSpaceEvent {
            let c = completions[i]
            completions[i].token.kind = .cancel
            if c.token.kind == .hostEvent { readHostEvents() } else { hostSpaceEvents(c) }
        }
    }

    /// Takes the published requests of every shared ring. Returns how many.
    private func pollSharedRings() -> Int {
        var taken = 0
        for p in registry.polled {
            do {
                taken += try p.ring.poll(limit: SharedQueue.capacity) { handleRecord(p.device, $0) }
            } catch {
                fault(p.device, error)
                taken += 1
            }
        }
        return taken
    }

    private func dispatch(_ c: Completion) throws {
        switch c.token.kind {
        case .commands:
            try ring.prepareRead(fd: service.doorbell, into: commandBuffer, token: RingToken(kind: .commands))
            for command in service.takeCommands() { try perform(command) }
        case .deviceRead, .deviceWrite, .doorbellRead, .doorbellPoll, .wake:
            guard let d = registry.device(slot: c.token.slot, generation: c.token.generation) else {
                return
            }
            if d.closing {
                d.transport.dropped(c)
                finishClosing(d)
                return
            }
            do {
                try d.transport.completed(c, ring, d.token) { handleRecord(d, $0) }
            } catch {
                fault(d, error)
            }
        case .hostEvent:
            readHostEvents()
        case .hostSpaceEvent:
            hostSpaceEvents(c)
        case .listener:
            acceptPeers()
        case .peerControl:
            guard let p = peer(c.token) else { return }
            p.controlArmed = false
            readControl(p)
        case .peerInvalidation:
            guard let p = peer(c.token) else { return }
            p.invalidationArmed = false
            readAcknowledgements(p)
        case .vhostMain:
            if let b = vhost(c.token) { readVhostMain(b) }
        case .vhostChannel:
            if let b = vhost(c.token) { readVhostChannel(b) }
        case .cancel:
            break
        }
    }

    private func peer(_ token: RingToken) -> Peer? {
        guard token.slot < peers.count, let p = peers[token.slot], p.generation == token.generation else { return nil }
        return p
    }

    // MARK: Records and responses

    func handleRecord(_ d: AttachedDevice, _ bytes: UnsafeRawBufferPointer) {
        let group = d.assembler.add(bytes)
        if let refusal = d.assembler.lastRefusal {
            switch refusal {
            case .malformed: stats.malformed += 1
            case .unknownDevice: stats.unknownDevice += 1
            case .creditExceeded: stats.creditExceeded += 1
            }
            if d.peer != nil {
                stats.protocolError(refusal == .malformed ? .badRecord : ProtocolErrorKind(rawValue: refusal.rawValue)!)
            }
        } else {
            stats.records += 1
        }
        if let group { complete(d, group) }
    }

    /// Answers a complete group once, with the code of the whole group. Groups are passed
    /// on, never copied, so that their request arrays go back to the assembler unshared.
    private func complete(_ d: AttachedDevice, _ group: consuming PageRequestGroup) {
        guard group.failure == nil, group.requests.allSatisfy({ d.inWindows($0.page) }) else {
            answer(d, group, .invalid)
            return
        }
        let last = group.requests[group.requests.count - 1].page
        let window = d.faultAround.window(
            from: group.requests[0].page, to: last, policy: service.configuration.faultAround)
        let ahead = d.aheadInWindow(last, window)
        let neighbours =
            ahead == 0 && d.windows.isEmpty
            ? d.faultAround.neighbours(policy: service.configuration.faultAround) : 0
        if ahead == 0 && !d.engine.configuration.blocksOnFault {
            // Nothing to map before the answer: handled with the turn's other such groups;
            // its resident neighbours, if looked for, are mapped once the answers are out.
            d.faultAround.record(iova: last, mappedAhead: 0)
            if neighbours > 0 && d.neighbourJobs.count < Self.maxNeighbourJobs {
                d.neighbourJobs.append((last, group.requests[group.requests.count - 1].wantsWrite))
                prefetching = true
            }
            d.batched.append(group)
            batching = true
            return
        }
        handleBatch(d)  // earlier groups first
        let adaptive = service.configuration.faultAround == .adaptive
        let outcome = d.handler.handle(
            group.requests, ahead: adaptive ? min(ahead, Self.syncPages) : ahead,
            neighbours: neighbours)
        stats.prefetchedPages += outcome.prefetched
        let mappedAhead = max(ahead > 0 ? outcome.prefetched : 0, outcome.blockTail)
        var planned = mappedAhead
        if ahead > 0 && outcome.code == .success && adaptive {
            planned = mapInBackground(
                d, after: last, window: ahead, mappedAhead: mappedAhead,
                write: group.requests[group.requests.count - 1].wantsWrite)
        }
        d.faultAround.record(iova: last, mappedAhead: planned)
        if neighbours > 0 { d.faultAround.recordNeighbours(mapped: outcome.prefetched) }
        answer(d, group, outcome.code)
    }

    /// Queues a group's single answer and releases its credit.
    private func answer(_ d: AttachedDevice, _ group: consuming PageRequestGroup, _ code: ResponseCode) {
        let cookie = group.cookie
        d.assembler.answered(group)
        stats.groups += 1
        if code == .success { stats.success += 1 } else { stats.invalid += 1 }
        d.queued.append(PageResponse(cookie: cookie, code: code))
        if doubleAnswer { d.queued.append(PageResponse(cookie: cookie, code: code)) }
    }

    /// Handles every device's batched groups, and sends each device its answers as soon
    /// as its own groups are handled: a device's answer does not wait for the pages of the
    /// devices after it (first touches cost about 5 µs a page here).
    private func handleBatches() {
        batching = false
        for case let d? in registry.slots where !d.batched.isEmpty {
            handleBatch(d)
            flushResponses(d)
        }
    }

    /// Handles a device's batched groups in one engine call and answers each.
    private func handleBatch(_ d: AttachedDevice) {
        guard !d.batched.isEmpty else { return }
        if d.batched.count == 1 {
            let group = d.batched.removeLast()
            let code = d.handler.handle(group.requests).code
            answer(d, group, code)
            return
        }
        d.batchRequests.removeAll(keepingCapacity: true)
        d.batchEnds.removeAll(keepingCapacity: true)
        for group in d.batched {
            d.batchRequests.append(contentsOf: group.requests)
            d.batchEnds.append(d.batchRequests.count)
        }
        d.handler.handle(batch: d.batchRequests, ends: d.batchEnds) { outcomes in
            for (i, outcome) in outcomes.enumerated() {
                // Moved out of the batch, so that the assembler gets its array back unshared.
                var group = PageRequestGroup.empty
                swap(&group, &d.batched[i])
                answer(d, consume group, outcome.code)
            }
        }
        stats.batchedGroups += d.batched.count
        d.batched.removeAll(keepingCapacity: true)
    }

    /// A sequential stream under adaptive fault-around, after its group was handled with
    /// `mappedAhead` pages mapped ahead (or inside its block): the first `syncPages` of
    /// the `window` after `last` are mapped before the answer, skipping pages already
    /// mapped (a device that caught up with its background window faults on pages the last
    /// chunk mapped, where the handler stopped); the rest of the window and one window
    /// more are left to the background. Over huge pages both parts are whole blocks,
    /// `blocksPerFullWindow` of them each once the window is full: a device outruns the
    /// population of a huge page, so only a wider synchronous part saves faults. Returns
    /// the pages the stream has ahead of `last`, mapped or being mapped.
    private func mapInBackground(
        _ d: AttachedDevice, after last: UInt64, window: Int, mappedAhead: Int,
        write: Bool
    ) -> Int {
        d.prefetch = nil
        let blocks = d.engine.configuration.blocksOnFault
        func blockEnd(_ iova: UInt64) -> UInt64 { (iova + hugeBlockBytes - 1) & ~(hugeBlockBytes - 1) }
        let first = last + pageBytes  // the page after the fault
        let span = blocks ? window * Self.blocksPerFullWindow / 2 : 0
        var syncEnd = first + UInt64(blocks ? span : min(window, Self.syncPages)) << pageShift
        if blocks { syncEnd = blockEnd(syncEnd) }
        syncEnd = max(syncEnd, first + UInt64(mappedAhead) << pageShift)
        syncEnd = first + UInt64(d.aheadInWindow(last, Int((syncEnd - first) >> pageShift))) << pageShift
        let from = first + UInt64(mappedAhead) << pageShift
        if from < syncEnd {
            let (mapped, stopped) = d.handler.mapAhead(
                from: from, pages: Int((syncEnd - from) >> pageShift), write: write)
            stats.prefetchedPages += mapped
            if stopped { return Int((syncEnd - first) >> pageShift) }
        }
        var end = syncEnd + UInt64(blocks ? 2 * span : 2 * window - min(window, Self.syncPages)) << pageShift
        if blocks { end = blockEnd(end) }
        let more = d.aheadInWindow(syncEnd - pageBytes, Int((end - syncEnd) >> pageShift))
        if more > 0 {
            d.prefetch = (syncEnd, syncEnd + UInt64(more) << pageShift, write)
            prefetching = true
        }
        return Int((syncEnd - first) >> pageShift) + more
    }

    /// Maps one chunk of every device's background window (after this turn's answers
    /// went out, so devices are writing meanwhile). A chunk that stops (mapping's end, a
    /// gone page) ends the window; pages already mapped are skipped.
    private func prefetchAhead() {
        prefetching = false
        for case let d? in registry.slots {
            if !d.neighbourJobs.isEmpty {
                if !d.closing {
                    for job in d.neighbourJobs {
                        let mapped = d.handler.mapResidentAround(
                            job.iova, pages: FaultAroundPolicy.neighbourPages, write: job.write)
                        stats.prefetchedPages += mapped
                        d.faultAround.recordNeighbours(mapped: mapped)
                    }
                }
                d.neighbourJobs.removeAll(keepingCapacity: true)
            }
            guard let p = d.prefetch else { continue }
            guard !d.closing else {
                d.prefetch = nil
                continue
            }
            var pages = min(Self.prefetchChunk, Int((p.end - p.next) >> pageShift))
            if d.engine.configuration.blocksOnFault {
                // A whole block per turn, or the pages up to the next block's start.
                let toBoundary = Int((hugeBlockBytes - p.next & (hugeBlockBytes - 1)) >> pageShift)
                pages = min(toBoundary, Int((p.end - p.next) >> pageShift))
            }
            let (mapped, stopped) = d.handler.mapAhead(from: p.next, pages: pages, write: p.write)
            stats.prefetchedPages += mapped
            let next = p.next + UInt64(pages) << pageShift
            if stopped || next >= p.end {
                d.prefetch = nil
            } else {
                d.prefetch!.next = next
                prefetching = true
            }
        }
    }

    private func flushResponses() {
        for case let d? in registry.slots where !d.queued.isEmpty { flushResponses(d) }
    }

    /// Sends a device the answers queued for it.
    private func flushResponses(_ d: AttachedDevice) {
        guard !d.queued.isEmpty && !d.closing else { return }
        do {
            try d.transport.send(&d.queued, ring, d.token)
        } catch {
            fault(d, error)
        }
    }

    /// A transport gave up: the device is detached (an external one also disconnected).
    private func fault(_ d: AttachedDevice, _ error: Error) {
        guard let fault = error as? TransportFault else {
            detach(d, reason: "\(error)")
            return
        }
        switch fault {
        case .closed(let why):
            if let p = d.peer {
                closePeer(p, reason: "device \(d.deviceID) \(why)", disconnected: false)
            } else {
                detach(d, reason: why)
            }
        case .misbehaved(let kind, let why):
            stats.protocolError(kind)
            if let p = d.peer {
                stats.devicesFenced += 1
                closePeer(p, reason: "device \(d.deviceID) fenced: \(why)", disconnected: true)
            } else {
                detach(d, reason: why)
            }
        }
    }

    // MARK: Devices

    func addDevice(
        deviceID: UInt32, pasid: UInt32?, domain: DomainID, credit: Int, transport: any FaultTransport,
        windows: [DMAWindow] = [], space: AddressSpace? = nil
    ) throws -> AttachedDevice {
        let space = space ?? own
        let slot = registry.freeSlot
        let d = AttachedDevice(
            token: TokenSource(slot: slot, generation: nextGeneration()), deviceID: deviceID, pasid: pasid,
            domain: domain, credit: credit, transport: transport, windows: windows, space: space)
        registry.enter(d)
        do { try transport.arm(ring, d.token) } catch {
            // Nothing of it is in the ring: it leaves every lookup at once.
            registry.leave(d)
            registry.release(d)
            throw error
        }
        return d
    }

    /// A device went away (or is sent away): its incomplete groups are answered INVALID,
    /// best effort, its ring operations cancelled, and the service goes on serving the others.
    func detach(_ d: AttachedDevice, reason: String) {
        guard !d.closing else { return }
        handleBatch(d)  // complete groups get their real answers in the final flush
        let pending = d.assembler.abandonAll()
        stats.abandonedGroups += pending.count
        stats.invalid += pending.count
        stats.devicesClosed += 1
        d.queued += pending.map { PageResponse(cookie: $0.cookie, code: .invalid) }
        d.transport.finalFlush(d.queued)
        d.queued = []
        let prefix = "device \(d.deviceID) "  // a peer's reason already names its device
        let why = reason.hasPrefix(prefix) ? String(reason.dropFirst(prefix.count)) : reason
        service.logger.info("device \(d.deviceID) \(why); \(pending.count) incomplete groups answered INVALID")
        d.closing = true
        fences.remove(device: d.generation)
        registry.leave(d)
        d.transport.cancel(ring, d.token)
        finishClosing(d)
    }

    private func finishClosing(_ d: AttachedDevice) {
        guard d.closing, d.transport.inFlight == 0 else { return }
        d.transport.close()
        registry.release(d)
    }

    // MARK: Commands

    private func perform(_ command: FaultService.Command) throws {
        // Tickets publish this turn's statistics before completing: their waiters read them next.
        switch command {
        case .hostPinned(let c):
            hostPinned(c)
        case .attachVhost(let a):
            addVhost(a)
        case .detachVhost(let handle, let ticket):
            if let b = vhosts.first(where: { $0?.handle === handle }), let b {
                closeVhost(b, reason: "detached", fenced: false)
            }
            ticket.complete(.success(()))
        case .attach(let a):
            _ = try addDevice(
                deviceID: a.deviceID, pasid: a.pasid, domain: a.domain, credit: a.credit, transport: a.transport)
        case .listen(let fd, let path, let provisioner):
            if let old = listener { Sys.close(old.fd) }
            listener = (fd, path, provisioner)
            try ring.preparePollIn(fd: fd, token: RingToken(kind: .listener))
        case .invalidate(let start, let length, let ticket):
            stats.invalidationRequests += 1
            do {
                let outcome = try engine.invalidate(hostAddress: start, length: length)
                afterExternalDevices { [self] in
                    service.publish(stats)
                    ticket.complete(.success(outcome))
                }
            } catch {
                stopGranting(error.description)  // the engine stopped itself; say so
                service.publish(stats)
                ticket.complete(.failure(.invalidationFailed(error.description)))
            }
        case .check(let ticket):
            service.publish(stats)
            ticket.complete(
                .success(spaces.flatMap { $0.engine.checkInvariants() }))
        case .footprint(let ticket):
            var f = ServiceFootprint()
            let engines = spaces.map(\.engine)
            f.tablePages = engines.reduce(0) { $0 + $1.liveTablePages }
            f.mappedPages = engines.reduce(0) { $0 + $1.mappedPageCount }
            f.mappings = engines.reduce(0) { $0 + $1.mappingCount }
            f.devices = registry.count
            f.peers = peers.count { $0 != nil }
            f.hosts = hosts.count { $0 != nil }
            f.measureProcess()
            ticket.complete(.success(f))
        case .barrier(let ticket):
            afterExternalDevices(everyDevice: true) { [self] in
                service.publish(stats)
                ticket.complete(.success(()))
            }
        case .stop:
            running = false
        }
    }

    /// Runs `action` once every external device of address space `space` acknowledged
    /// what was posted so far (at once when none owes anything), after the actions of that
    /// space queued before it. A slow device of one host never holds up another's.
    func afterExternalDevices(space: UInt32 = 0, everyDevice: Bool = false, _ action: @escaping () -> Void) {
        let fence = fences.fenceAll(space: everyDevice ? nil : space)
        if fence.isEmpty && !deferred.contains(where: { $0.space == space }) {
            action()
        } else {
            deferred.append((space, fence, action))
        }
    }

    private func runDeferred() {
        guard !deferred.isEmpty else { return }
        var blocked: Set<UInt32> = []
        var i = 0
        while i < deferred.count {
            let entry = deferred[i]
            if blocked.contains(entry.space) || !fences.isComplete(entry.fence) {
                blocked.insert(entry.space)
                i += 1
            } else {
                deferred.remove(at: i)
                entry.action()
            }
        }
    }

    // MARK: Host events

    /// The one userfaultfd reader, for the service's own memory and every host's: reads
    /// whole messages into the loop's buffer and hands each, decoded, to `handle`, which
    /// returns what it cost, until the source has none, `budget` is spent, or `stop` says so.
    func readEvents(
        from source: some UserfaultfdReading, budget: Int = .max, stop: () -> Bool = { false },
        _ handle: (HostEvent) -> Int
    ) throws(SystemCallError) {
        let size = UserfaultfdSource.messageBytes
        var cost = 0
        while cost < budget, !stop() {
            let bytes = try source.drain(into: uffdBuffer)
            if bytes == 0 { break }
            for i in 0..<(bytes / size) where !stop() {
                cost += handle(HostEvent(UnsafeRawBufferPointer(rebasing: uffdBuffer[(i * size)..<((i + 1) * size)])))
            }
        }
    }

    /// The service's own memory (address space 0): every pending event, before any fault
    /// of this turn.
    private func readHostEvents() {
        guard let uffd = service.uffd else { return }
        do {
            try readEvents(from: uffd) { handle($0, in: own) }
            try ring.preparePollIn(fd: uffd.fd, token: RingToken(kind: .hostEvent))
        } catch {
            // Fail closed: without its events the engine cannot follow the host, so it stops
            // granting (every request INVALID). Nobody would read the events again and the
            // host's madvise/munmap would wait forever for that: drop every registration.
            stopGranting("reading host events failed: \(error)")
            uffd.close()
        }
    }

    /// The engine can no longer be trusted to follow the host: it answers every request
    /// INVALID from now on, the reason is published and logged as critical.
    private func stopGranting(_ reason: String) {
        engine.stopGranting(reason: reason)
        if stats.stopped == nil { stats.stopped = reason }
        service.logger.critical("\(reason); fault service is stopped: every request is answered INVALID")
    }

    /// Turns one event of address space `s` into an invalidation; returns what it cost: 1,
    /// plus the mappings it visited and the pages it unmapped. The same for the service's
    /// own memory and a host's, but for what each owes: the own memory's events go through
    /// the late window (in-process devices skip a range being changed) and a failure stops
    /// the service granting; a host's gone ranges are forgotten, and a failure ends that
    /// host alone.
    func handle(_ event: HostEvent, in s: AddressSpace) -> Int {
        guard let (range, gone) = event.invalidation else {
            if s.isOwn {
                // Never negotiated (no FORK) nor registered for (no MISSING), or a message the
                // kernel never writes: the kernel and this loop disagree about the uffd, so
                // nothing it says can be relied on.
                if case .malformed(let why) = event { stopGranting("userfaultfd message is malformed: \(why)") }
                if case .other(let kind) = event { stopGranting("userfaultfd event \(kind) was never asked for") }
            } else if case .malformed(let why) = event {
                closePeer(s.peer, reason: "its userfaultfd gave a malformed message: \(why)", disconnected: true)
            } else if case .other(let kind) = event {
                // Only the host's own registrations (MISSING, say) make other kinds; they
                // concern its threads, not the devices' translations.
                service.logger.warning(
                    "host '\(s.name)': ignoring userfaultfd event \(kind) (the host must not register ranges itself)")
            }
            return 1
        }
        guard range.lowerBound < range.upperBound else { return 1 }
        if s.isOwn {
            if case .remap(let from, let to, let length) = event {
                PhysicalSpace.shared.moved(from: from, to: to, length: length)
                service.logger.info(
                    """
                    host memory [\(hex(from)), +\(hex(length))) moved to \(hex(to)); faults there are answered \
                    INVALID until its mapping's host address is updated
                    """
                )
            }
            service.window.beginEvent(range)
        } else {
            if gone {
                s.memory.forget(range)
                s.uffd.forget(range)
                noteTrackedRanges(s)
            }
            stats.host(s.id) { $0.uffdEvents += 1 }
        }
        stats.count(event, source: s.name)
        var cost = 1
        do {
            let outcome = try s.engine.invalidate(
                hostAddress: range.lowerBound, length: range.upperBound - range.lowerBound, hostGone: gone)
            cost += outcome.mappingsTouched + outcome.pagesUnmapped
        } catch {
            if s.isOwn {
                stopGranting(error.description)  // the engine stopped itself; say so
            } else {
                service.logger.critical("host '\(s.name)': \(error)")
                closePeer(s.peer, reason: "an invalidation in its address space failed: \(error)", disconnected: true)
                return cost
            }
        }
        if s.isOwn {
            afterExternalDevices { [service] in
                service.window.endEvent(range)
                service.hostEventsHandled.add(1, ordering: .releasing)
            }
        }
        return cost
    }

    // MARK: Shutdown

    /// Answers every incomplete group INVALID (best effort, never blocking: the devices
    /// are waiting), closes every channel and peer, fails what is still queued, and waits
    /// for the ring's operations to finish before their buffers go.
    private func shutdown() {
        running = false
        for command in service.closeCommands() {
            switch command {
            case .invalidate(_, _, let ticket): ticket.complete(.failure(.stopped))
            case .check(let ticket): ticket.complete(.failure(.stopped))
            case .footprint(let ticket): ticket.complete(.failure(.stopped))
            case .barrier(let ticket): ticket.complete(.failure(.stopped))
            case .attach(let a): a.transport.close()
            case .attachVhost(let a):
                Sys.close(a.main)
                Sys.close(a.channel)
            case .detachVhost(_, let ticket): ticket.complete(.success(()))
            case .listen(let fd, _, _): Sys.close(fd)
            case .hostPinned, .stop: break
            }
        }
        // Devices first, so that a host's teardown does not tell them their host went away.
        for case let p? in peers where p.role == .device {
            closePeer(p, reason: "the service stopped", disconnected: false)
        }
        for case let p? in peers { closePeer(p, reason: "the service stopped", disconnected: false) }
        for case let d? in registry.slots { detach(d, reason: "closed: the service stopped") }
        for case let b? in vhosts { closeVhost(b, reason: "closed: the service stopped", fenced: false) }
        finishPinning()
        if let l = listener {
            Sys.close(l.fd)
            unlink(l.path)
            listener = nil
        }
        for (_, _, action) in deferred { action() }
        deferred = []
        // Wait for every cancelled operation's completion, a second at most.
        try? ring.prepareCancelAll()
        let until = ContinuousClock.now + .seconds(1)
        while ring.inFlight > 0 && ContinuousClock.now < until {
            try? ring.submitAndWait(timeoutNanoseconds: 10_000_000)
            completions.removeAll(keepingCapacity: true)
            ring.reap(into: &completions)
            for c in completions {
                if let d = registry.device(slot: c.token.slot, generation: c.token.generation), d.closing {
                    d.transport.dropped(c)
                    finishClosing(d)
                }
            }
        }
        service.publish(stats)
    }
}

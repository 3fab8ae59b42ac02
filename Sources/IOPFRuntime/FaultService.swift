// FaultService.swift — the running service: one thread owns an io_uring and serves every
// device's fault channel, plus a command channel (attach, invalidate, check, stop) rung
// through an eventfd doorbell. All engine work for faults and invalidations happens on
// that thread, in batches: completions are reaped together, responses are written back
// together, one submit per loop turn.
//
// Latency: a thread wake-up costs about 10 µs here, so after any activity the loop
// busy-polls (shared queues in memory, stream channels through the completion queue) for
// `spinNanoseconds` before it sleeps in io_uring.

import CLiburing  // <sys/eventfd.h>
import Dispatch
import Foundation
import Glibc
import Logging
import Synchronization
@_spi(FaultInjection) import IOPFCore

public struct ServiceConfiguration: Sendable {
    public var transport = ChannelTransport.shared
    /// How long the loop busy-polls after activity before sleeping.
    public var spinNanoseconds: Int64 = 200_000
    public var ringEntries: UInt32 = 256
    /// Watch the mappings' host memory through userfaultfd (falls back to API-only
    /// invalidation, with a warning, when the kernel refuses).
    public var hostEvents = true
    /// Bugs planted for `iopf stress` and tests (the service plants double-answer).
    @_spi(FaultInjection) public var injectedBugs: InjectedBugs = []
    public init() {}
}

public struct ServiceStatistics: Sendable, Equatable {
    /// Well-formed page requests received.
    public var records = 0
    public var groups = 0
    public var success = 0
    public var invalid = 0
    /// Records refused by the wire-format checks.
    public var malformed = 0
    /// Records whose device id or PASID is not attached on their channel.
    public var unknownDevice = 0
    /// Records beyond the device's outstanding-request credit.
    public var creditExceeded = 0
    /// Incomplete groups answered INVALID because their device closed or the service stopped.
    public var abandonedGroups = 0
    public var devicesClosed = 0
    public var invalidationRequests = 0
    /// Host events read from the userfaultfd, by kind.
    public var uffdEvents = 0
    public var uffdRemove = 0
    public var uffdUnmap = 0
    public var uffdRemap = 0
    public var loopTurns = 0
    public var completions = 0
}

/// A command the service could not carry out (or a service that could not start), with why.
public struct ServiceError: Error, CustomStringConvertible {
    public var description: String
}

/// Waits for one command's completion on another thread.
public final class Ticket<Value: Sendable>: Sendable {
    private let semaphore = DispatchSemaphore(value: 0)
    private let value = Mutex<Result<Value, ServiceError>?>(nil)

    func complete(_ result: Result<Value, ServiceError>) {
        value.withLock { $0 = result }
        semaphore.signal()
    }

    /// Blocks until the service completed the command.
    public func wait() throws(ServiceError) -> Value {
        semaphore.wait()
        semaphore.signal()  // later waiters pass too
        return try value.withLock { $0! }.get()
    }
}

public final class FaultService: Sendable {
    public let engine: FaultEngine
    public let configuration: ServiceConfiguration
    let logger: Logger

    enum Command {
        case attach(DeviceRegistration)
        case invalidate(start: UInt64, length: UInt64, Ticket<InvalidationOutcome>)
        case check(Ticket<[InvariantViolation]>)
        case barrier(Ticket<Void>)
        case stop
    }

    struct DeviceRegistration: Sendable {
        var deviceID: UInt32
        var pasid: UInt32?
        var domain: DomainID
        var credit: Int
        var ends: Ends
    }

    /// The service's ends of a channel, owned by the loop once attached.
    enum Ends: Sendable {
        case stream(read: CInt, write: CInt)
        case shared(SharedQueue, wake: CInt)

        func close() {
            switch self {
            case .stream(let r, let w):
                Sys.close(r)
                if w != r { Sys.close(w) }
            case .shared(let q, let wake):
                Sys.close(wake)
                Sys.close(q.fd)
            }
        }
    }

    private let commands = Mutex<[Command]>([])
    let doorbell: CInt
    /// The userfaultfd watching the mappings' host memory; nil when host events are off.
    let uffd: UserfaultfdSource?
    /// Why host events are off, when they are.
    public let hostEventsUnavailable: String?
    public let window = HostChangeWindow()
    /// Host events whose invalidation has completed.
    let hostEventsHandled = Atomic<Int>(0)
    private let published = Mutex(ServiceStatistics())
    private let finished = DispatchSemaphore(value: 0)
    private let started = Atomic<Bool>(false)
    private let stopped = Atomic<Bool>(false)

    public init(engine: FaultEngine, configuration: ServiceConfiguration = ServiceConfiguration(),
                logger: Logger = Logger(label: "iopf.service")) throws(SystemCallError) {
        self.engine = engine
        self.configuration = configuration
        self.logger = logger
        // Blocking on purpose: io_uring waits on a blocking eventfd; O_NONBLOCK would make
        // the read complete at once with -EAGAIN.
        doorbell = try Sys.eventfd(flags: CInt(EFD_CLOEXEC))
        if configuration.hostEvents {
            do {
                uffd = try UserfaultfdSource()
                hostEventsUnavailable = nil
            } catch {
                uffd = nil
                hostEventsUnavailable = error.description
                logger.warning("host events are off, invalidations come from the API only: \(error)")
            }
        } else {
            uffd = nil
            hostEventsUnavailable = "turned off by configuration"
        }
    }

    deinit {
        Sys.close(doorbell)
    }

    public var hostEventsEnabled: Bool { uffd != nil }

    // MARK: DMA mappings, watched by the host's userfaultfd

    /// Adds a DMA mapping and starts watching its host range. A range the kernel cannot
    /// watch (e.g. a file mapping) is refused with the reason, and nothing is left
    /// registered or mapped.
    @discardableResult
    public func map(iova: UInt64, vaddr: UInt64, size: UInt64, prot: Protection) throws -> MappingID {
        try DMAMappingTable.validate(iova: iova, vaddr: vaddr, size: size, prot: prot)
        try uffd?.register(start: vaddr, length: size)
        do {
            return try engine.map(iova: iova, vaddr: vaddr, size: size, prot: prot)
        } catch {
            unwatch([vaddr..<(vaddr + size)])
            throw error
        }
    }

    /// Adds a pinned mapping (VFIO type1): pinned, charged and fully mapped before it
    /// returns; host events leave it alone, so its range is not watched.
    @discardableResult
    public func mapPinned(iova: UInt64, vaddr: UInt64, size: UInt64, prot: Protection) throws -> MappingID {
        try engine.mapPinned(iova: iova, vaddr: vaddr, size: size, prot: prot).0
    }

    /// Removes the mappings inside `[iova, iova + size)` (whole mappings only) and stops
    /// watching host memory no other mapping covers.
    @discardableResult
    public func unmap(iova: UInt64, size: UInt64) throws -> UInt64 {
        let ranges = try engine.removeMappings(iova: iova, size: size)
        unwatch(ranges)
        return ranges.reduce(0) { $0 + ($1.upperBound - $1.lowerBound) }
    }

    /// Points a mapping at new host memory (VFIO_DMA_MAP_FLAG_VADDR): watches the new range,
    /// drops translations to the old one, and clears pages marked gone by UNMAP/REMAP.
    public func updateHostAddress(iova: UInt64, size: UInt64, vaddr: UInt64) throws {
        guard let m = engine.mappingInfo(iova: iova), m.iova == iova, m.size == size else {
            throw DMAMapError.noSuchMapping(iova: iova, size: size)
        }
        try uffd?.register(start: vaddr, length: size)
        try engine.updateHostAddress(iova: iova, size: size, vaddr: vaddr)
        if m.vaddr != vaddr { unwatch([m.vaddr..<(m.vaddr + size)]) }
    }

    private func unwatch(_ ranges: [Range<UInt64>]) {
        guard let uffd else { return }
        for r in ranges {
            for part in engine.uncoveredHostRanges(r) {
                uffd.unregister(start: part.lowerBound, length: part.upperBound - part.lowerBound)
            }
        }
    }

    /// Completes after every command and host event queued before it was handled.
    public func barrier() -> Ticket<Void> {
        let ticket = Ticket<Void>()
        send(.barrier(ticket))
        return ticket
    }

    /// Host events whose invalidation has completed so far.
    public var hostEventsCompleted: Int { hostEventsHandled.load(ordering: .acquiring) }

    /// Starts the service thread and returns once its ring is ready.
    public func start() throws {
        precondition(!started.exchange(true, ordering: .relaxed), "FaultService.start called twice")
        let ready = Ticket<Void>()
        let thread = Thread { [self] in
            let loop: EventLoop
            do {
                loop = try EventLoop(service: self)
            } catch {
                ready.complete(.failure(ServiceError(description: "cannot start the event loop: \(error)")))
                finished.signal()
                return
            }
            ready.complete(.success(()))
            loop.run()
            finished.signal()
        }
        thread.name = "iopf-service"
        thread.start()
        try ready.wait()
    }

    /// Stops the loop: incomplete groups are answered INVALID, channels closed. Idempotent.
    public func stop() {
        guard started.load(ordering: .relaxed), !stopped.exchange(true, ordering: .relaxed) else { return }
        send(.stop)
        finished.wait()
        // Nobody reads host events any more: drop every registration, or a later munmap of
        // a watched range would wait forever for its event to be read.
        uffd?.close()
    }

    /// Attaches a device (and optionally one PASID) to a domain and returns its channel.
    /// `credit` is its PRI outstanding page request allocation.
    public func attach(deviceID: UInt32, pasid: UInt32? = nil, domain: DomainID, credit: Int = 32) throws -> DeviceChannel {
        precondition(credit > 0 && credit <= SharedQueue.capacity,
                     "a device's credit must be 1...\(SharedQueue.capacity) page requests, got \(credit)")
        let channel: DeviceChannel
        let ends: Ends
        if configuration.transport == .shared {
            // The device gets its own fds (dup) and its own mapping, as another process would.
            let queue = try SharedQueue.create()
            let wake = try Sys.eventfd(flags: CInt(EFD_CLOEXEC | EFD_NONBLOCK))
            let deviceQueue = try SharedQueue(fd: try Sys.dup(queue.fd))
            channel = DeviceChannel(shared: deviceQueue, doorbell: try Sys.dup(doorbell), wake: try Sys.dup(wake))
            ends = .shared(queue, wake: wake)
        } else {
            let e = try ChannelEnds.make(configuration.transport)
            channel = try DeviceChannel(readFD: e.deviceRead, writeFD: e.deviceWrite)
            ends = .stream(read: e.serviceRead, write: e.serviceWrite)
        }
        send(.attach(DeviceRegistration(deviceID: deviceID, pasid: pasid, domain: domain, credit: credit, ends: ends)))
        return channel
    }

    /// Queues an invalidation of host range `[start, start + length)` (an MMU-notifier
    /// event); the ticket completes after every domain has synced.
    @discardableResult
    public func invalidate(hostAddress start: UInt64, length: UInt64) -> Ticket<InvalidationOutcome> {
        let ticket = Ticket<InvalidationOutcome>()
        send(.invalidate(start: start, length: length, ticket))
        return ticket
    }

    /// Runs the engine's invariant checks on the service thread, between batches.
    public func checkInvariants() -> Ticket<[InvariantViolation]> {
        let ticket = Ticket<[InvariantViolation]>()
        send(.check(ticket))
        return ticket
    }

    public var statistics: ServiceStatistics { published.withLock { $0 } }

    func publish(_ stats: ServiceStatistics) { published.withLock { $0 = stats } }

    func takeCommands() -> [Command] { commands.withLock { c in defer { c.removeAll() }; return c } }

    private func send(_ command: Command) {
        commands.withLock { $0.append(command) }
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { try? Sys.write(doorbell, $0) }
    }
}

// MARK: - Event loop

/// One attached device as the loop sees it. Buffers are owned here and freed on close.
final class DeviceSlot {
    static let readCapacity = PageRequest.byteCount * 102  // 4080 bytes
    static let writeCapacity = PageResponse.byteCount * 512

    let registration: FaultService.DeviceRegistration
    let generation: UInt32
    let readBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: readCapacity, alignment: 8)
    let writeBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: writeCapacity, alignment: 8)
    /// Bytes of an incomplete record kept at the start of `readBuffer`.
    var leftover = 0
    var partial = [PartialGroup?](repeating: nil, count: Int(PageRequest.maxGroupIndex) + 1)
    /// Requests received and not yet answered, against the credit.
    var outstanding = 0
    var queued: [PageResponse] = []
    /// Bytes of `writeBuffer` being written, and how many are done.
    var writing = 0
    var written = 0
    var readArmed = false
    var closing = false
    /// Shared queues: the service's own copies of the ring indices.
    var requestHead: UInt32 = 0
    var responseTail: UInt32 = 0

    var shared: SharedQueue? {
        if case .shared(let q, _) = registration.ends { return q }
        return nil
    }

    struct PartialGroup {
        var cookie: UInt32
        var requests: [PageRequest] = []
        /// Requests counted against the credit.
        var counted = 0
        var failure: Failure?
    }

    enum Failure { case malformed, unknownDevice, creditExceeded }

    init(registration: FaultService.DeviceRegistration, generation: UInt32) {
        self.registration = registration
        self.generation = generation
    }

    deinit {
        readBuffer.deallocate()
        writeBuffer.deallocate()
    }
}

final class EventLoop {
    let service: FaultService
    let engine: FaultEngine
    let ring: Ring
    let handler: FaultHandler
    var slots: [DeviceSlot?] = []
    var generation: UInt32 = 0
    var completions: [Completion] = []
    var stats = ServiceStatistics()
    let doorbellBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 8, alignment: 8)
    /// The 8-byte 1 written to a sleeping device's eventfd; never changes while in flight.
    let wakeValue = UnsafeMutableRawBufferPointer.allocate(byteCount: 8, alignment: 8)
    var running = true
    let doubleAnswer: Bool
    /// Room for 16 userfaultfd messages per read.
    let uffdBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 * UserfaultfdSource.messageBytes, alignment: 8)

    init(service: FaultService) throws {
        self.service = service
        engine = service.engine
        ring = try Ring(entries: service.configuration.ringEntries)
        handler = engine.makeFaultHandler()
        doubleAnswer = service.configuration.injectedBugs.contains(.doubleAnswer)
        completions.reserveCapacity(Int(service.configuration.ringEntries) * 2)
        wakeValue.storeBytes(of: UInt64(1), as: UInt64.self)
    }

    deinit {
        doorbellBuffer.deallocate()
        wakeValue.deallocate()
        uffdBuffer.deallocate()
    }

    func run() {
        do {
            try ring.prepareRead(fd: service.doorbell, into: doorbellBuffer, token: RingToken(kind: .doorbell))
            if let uffd = service.uffd { try ring.preparePollIn(fd: uffd.fd, token: RingToken(kind: .hostEvent)) }
            var lastActivity = ContinuousClock.now
            var lastFlush = lastActivity
            let spin = Duration.nanoseconds(service.configuration.spinNanoseconds)
            while running {
                try ring.submit()
                completions.removeAll(keepingCapacity: true)
                ring.reap(into: &completions)
                var work = pollSharedQueues()
                if completions.isEmpty && work == 0 {
                    let now = ContinuousClock.now
                    if now - lastActivity < spin {
                        // Stream channels and commands progress only when the kernel runs
                        // the ring's task work; shared queues need no system call at all.
                        if hasStreams || now - lastFlush > .microseconds(20) {
                            ring.flushCompletions()
                            lastFlush = now
                        }
                        ring.reap(into: &completions)
                        if completions.isEmpty { continue }
                    } else {
                        try sleep()
                        ring.reap(into: &completions)
                        work = pollSharedQueues()
                        if completions.isEmpty && work == 0 { continue }
                    }
                }
                lastActivity = ContinuousClock.now
                stats.loopTurns += 1
                stats.completions += completions.count
                for c in completions { try dispatch(c) }
                try flushResponses()
                service.publish(stats)
            }
        } catch {
            service.logger.critical("event loop stopped: \(error)")
        }
        shutdown()
    }

    var hasStreams: Bool { slots.contains { $0 != nil && $0!.shared == nil } }

    /// Sleeps in io_uring until a completion or the doorbell. Shared queues are told first,
    /// then looked at once more, so a device that published before seeing the flag is not
    /// missed and one that published after rings the doorbell.
    private func sleep() throws {
        let queues = slots.compactMap { $0?.shared }
        for q in queues { q.storeSequential(.serviceWaiting, 1) }
        let ready = queues.contains { $0.loadSequential(.requestTail) != $0.load(.requestHead) || $0.load(.deviceClosed) != 0 }
        if !ready { try ring.submitAndWait(timeoutNanoseconds: 100_000_000) }
        for q in queues { q.store(.serviceWaiting, 0) }
    }

    /// Takes every published request from every shared queue. Returns how many.
    private func pollSharedQueues() -> Int {
        var taken = 0
        for index in slots.indices {
            guard let slot = slots[index], let q = slot.shared else { continue }
            let tail = q.load(.requestTail)
            if tail != slot.requestHead {
                while slot.requestHead != tail {
                    handleRecord(slot, UnsafeRawBufferPointer(q.requestSlot(slot.requestHead)))
                    slot.requestHead &+= 1
                    taken += 1
                }
                q.store(.requestHead, slot.requestHead)
            } else if q.load(.deviceClosed) != 0 {
                close(slot, at: index, reason: "closed its channel")
                taken += 1
            }
        }
        return taken
    }

    private func dispatch(_ c: Completion) throws {
        switch c.token.kind {
        case .doorbell:
            try ring.prepareRead(fd: service.doorbell, into: doorbellBuffer, token: RingToken(kind: .doorbell))
            for command in service.takeCommands() { try perform(command) }
        case .deviceRead:
            guard let slot = slot(c.token) else { return }
            slot.readArmed = false
            if c.result <= 0 {
                close(slot, at: c.token.slot, reason: c.result == 0 ? "closed its channel" : "read failed: errno \(-c.result)")
                return
            }
            receive(slot, bytes: Int(c.result))
            try armRead(slot, at: c.token.slot)
        case .deviceWrite:
            guard let slot = slot(c.token) else { return }
            if c.result < 0 {
                close(slot, at: c.token.slot, reason: "write failed: errno \(-c.result)")
                return
            }
            slot.written += Int(c.result)
            if slot.written < slot.writing {
                try armWrite(slot, at: c.token.slot)
            } else {
                slot.writing = 0
                slot.written = 0
            }
        case .wake:
            break  // a sleeping device's eventfd was rung; nothing to do
        case .hostEvent:
            guard let uffd = service.uffd else { return }
            do {
                while true {
                    let bytes = try uffd.drain(into: uffdBuffer)
                    if bytes == 0 { break }
                    for i in 0..<(bytes / UserfaultfdSource.messageBytes) {
                        let at = i * UserfaultfdSource.messageBytes
                        handle(HostEvent(UnsafeRawBufferPointer(rebasing: uffdBuffer[at..<(at + UserfaultfdSource.messageBytes)])))
                    }
                }
            } catch {
                // Nobody would read the host's events again, and the host's madvise/munmap
                // would wait forever for that: drop every registration instead.
                service.logger.critical("reading host events failed: \(error); host events stop and every range is unwatched")
                uffd.close()
                return
            }
            try ring.preparePollIn(fd: uffd.fd, token: RingToken(kind: .hostEvent))
        }
    }

    private func slot(_ token: RingToken) -> DeviceSlot? {
        guard token.slot < slots.count, let s = slots[token.slot], s.generation == token.generation else { return nil }
        return s
    }

    /// Turns one host event into an invalidation. The event was read: the host may now be
    /// changing the memory, so the range is in the late window until the sync is done.
    private func handle(_ event: HostEvent) {
        let range: Range<UInt64>
        let gone: Bool
        switch event {
        case .remove(let r):
            (range, gone) = (r, false)
            stats.uffdRemove += 1
        case .unmap(let r):
            (range, gone) = (r, true)
            stats.uffdUnmap += 1
        case .remap(let from, let to, let length):
            (range, gone) = (from..<(from + length), true)
            stats.uffdRemap += 1
            service.logger.info("host memory [\(hex(from)), +\(hex(length))) moved to \(hex(to)); faults there are answered INVALID until its mapping's host address is updated")
        case .other(let kind):
            service.logger.warning("ignoring userfaultfd event \(kind)")
            return
        }
        stats.uffdEvents += 1
        service.window.beginEvent(range)
        do {
            _ = try engine.invalidate(hostAddress: range.lowerBound, length: range.upperBound - range.lowerBound, hostGone: gone)
        } catch {
            service.logger.critical("\(error)")
        }
        service.window.endEvent(range)
        service.hostEventsHandled.add(1, ordering: .releasing)
    }

    private func perform(_ command: FaultService.Command) throws {
        // Tickets publish this turn's statistics before completing: their waiters read them next.
        switch command {
        case .attach(let registration):
            generation &+= 1
            let slot = DeviceSlot(registration: registration, generation: generation)
            let index = slots.firstIndex { $0 == nil } ?? slots.count
            if index == slots.count { slots.append(slot) } else { slots[index] = slot }
            if slot.shared == nil { try armRead(slot, at: index) }
        case .invalidate(let start, let length, let ticket):
            stats.invalidationRequests += 1
            service.publish(stats)
            do {
                ticket.complete(.success(try engine.invalidate(hostAddress: start, length: length)))
            } catch {
                service.logger.critical("\(error)")
                ticket.complete(.failure(ServiceError(description: error.description)))
            }
        case .check(let ticket):
            service.publish(stats)
            ticket.complete(.success(engine.checkInvariants()))
        case .barrier(let ticket):
            service.publish(stats)
            ticket.complete(.success(()))
        case .stop:
            running = false
        }
    }

    private func armRead(_ slot: DeviceSlot, at index: Int) throws {
        guard !slot.closing, !slot.readArmed, case .stream(let readFD, _) = slot.registration.ends else { return }
        slot.readArmed = true
        let free = UnsafeMutableRawBufferPointer(rebasing: slot.readBuffer[slot.leftover...])
        try ring.prepareRead(fd: readFD, into: free,
                             token: RingToken(kind: .deviceRead, slot: index, generation: slot.generation))
    }

    private func armWrite(_ slot: DeviceSlot, at index: Int) throws {
        guard case .stream(_, let writeFD) = slot.registration.ends else { return }
        let rest = UnsafeRawBufferPointer(rebasing: slot.writeBuffer[slot.written..<slot.writing])
        try ring.prepareWrite(fd: writeFD, from: rest,
                              token: RingToken(kind: .deviceWrite, slot: index, generation: slot.generation))
    }

    /// Parses whole records out of the read buffer, keeping a split record's head.
    private func receive(_ slot: DeviceSlot, bytes: Int) {
        let total = slot.leftover + bytes
        var offset = 0
        while total - offset >= PageRequest.byteCount {
            handleRecord(slot, UnsafeRawBufferPointer(rebasing: slot.readBuffer[offset..<(offset + PageRequest.byteCount)]))
            offset += PageRequest.byteCount
        }
        slot.leftover = total - offset
        if slot.leftover > 0 && offset > 0 {
            slot.readBuffer.baseAddress!.copyMemory(from: slot.readBuffer.baseAddress! + offset, byteCount: slot.leftover)
        }
    }

    private func handleRecord(_ slot: DeviceSlot, _ bytes: UnsafeRawBufferPointer) {
        let request: PageRequest
        do {
            request = try PageRequest(bytes: bytes)
        } catch {
            stats.malformed += 1
            if stats.malformed <= 10 {
                service.logger.warning("device \(slot.registration.deviceID): \(error)")
            }
            // Best effort on an untrusted record: fail its group so that it is answered
            // INVALID, once, if its cookie and group index can be read.
            let raw = RawRecord(bytes)
            guard raw.cookie != 0 else { return }
            fail(slot, groupIndex: Int(raw.groupIndex & PageRequest.maxGroupIndex), cookie: raw.cookie, .malformed, last: raw.isLast)
            return
        }
        stats.records += 1
        let g = Int(request.groupIndex)
        var partial = slot.partial[g] ?? DeviceSlot.PartialGroup(cookie: request.cookie)
        if partial.cookie != request.cookie {
            partial.failure = .malformed  // one group, one cookie
            stats.malformed += 1
        }
        let r = slot.registration
        if request.deviceID != r.deviceID || (request.flags.contains(.pasidValid) ? request.pasid : nil) != r.pasid {
            if partial.failure == nil { stats.unknownDevice += 1 }
            partial.failure = partial.failure ?? .unknownDevice
        } else if slot.outstanding >= r.credit {
            if partial.failure == nil { stats.creditExceeded += 1 }
            partial.failure = partial.failure ?? .creditExceeded
        } else {
            slot.outstanding += 1
            partial.counted += 1
        }
        partial.requests.append(request)
        slot.partial[g] = nil
        if request.isLastPage {
            complete(slot, partial)
        } else {
            slot.partial[g] = partial
        }
    }

    private func fail(_ slot: DeviceSlot, groupIndex g: Int, cookie: UInt32, _ failure: DeviceSlot.Failure, last: Bool) {
        var partial = slot.partial[g] ?? DeviceSlot.PartialGroup(cookie: cookie)
        partial.failure = failure
        slot.partial[g] = nil
        if last { complete(slot, partial) } else { slot.partial[g] = partial }
    }

    /// Answers a complete group once, with the code of the whole group.
    private func complete(_ slot: DeviceSlot, _ partial: DeviceSlot.PartialGroup) {
        let code: ResponseCode
        if partial.failure != nil {
            code = .invalid
        } else {
            code = handler.handle(partial.requests).code
        }
        slot.outstanding -= partial.counted
        stats.groups += 1
        if code == .success { stats.success += 1 } else { stats.invalid += 1 }
        slot.queued.append(PageResponse(cookie: partial.cookie, code: code))
        if doubleAnswer { slot.queued.append(PageResponse(cookie: partial.cookie, code: code)) }
    }

    /// Starts a write for every device with queued responses and none in flight.
    private func flushResponses() throws {
        for (index, slot) in slots.enumerated() {
            guard let slot, !slot.queued.isEmpty, !slot.closing else { continue }
            if case .shared(let q, let wake) = slot.registration.ends {
                // Responses never outnumber the credit, which fits the ring.
                for r in slot.queued {
                    r.encode(into: q.responseSlot(slot.responseTail))
                    slot.responseTail &+= 1
                }
                slot.queued.removeAll(keepingCapacity: true)
                q.storeSequential(.responseTail, slot.responseTail)
                if q.loadSequential(.deviceWaiting) != 0 {
                    try ring.prepareWrite(fd: wake, from: UnsafeRawBufferPointer(wakeValue),
                                          token: RingToken(kind: .wake, slot: index, generation: slot.generation))
                }
                continue
            }
            guard slot.writing == 0 else { continue }
            let n = min(slot.queued.count, DeviceSlot.writeCapacity / PageResponse.byteCount)
            for i in 0..<n {
                let at = i * PageResponse.byteCount
                slot.queued[i].encode(into: UnsafeMutableRawBufferPointer(rebasing: slot.writeBuffer[at..<(at + PageResponse.byteCount)]))
            }
            slot.queued.removeFirst(n)
            slot.writing = n * PageResponse.byteCount
            slot.written = 0
            try armWrite(slot, at: index)
        }
    }

    /// A device went away: its incomplete groups count as answered INVALID (there is no
    /// one left to tell), and the service goes on serving the others.
    private func close(_ slot: DeviceSlot, at index: Int, reason: String) {
        let pending = slot.partial.compactMap { $0 }.count
        stats.abandonedGroups += pending
        stats.invalid += pending
        stats.devicesClosed += 1
        service.logger.info("device \(slot.registration.deviceID) \(reason); \(pending) incomplete groups answered INVALID")
        slot.closing = true
        slot.registration.ends.close()
        slots[index] = nil
    }

    /// Answers every incomplete group INVALID (synchronously: the devices are waiting),
    /// then closes every channel, so nothing is left waiting.
    private func shutdown() {
        for (index, slot) in slots.enumerated() {
            guard let slot else { continue }
            for case let p? in slot.partial {
                slot.queued.append(PageResponse(cookie: p.cookie, code: .invalid))
                stats.abandonedGroups += 1
                stats.invalid += 1
            }
            switch slot.registration.ends {
            case .shared(let q, let wake):
                for r in slot.queued {
                    r.encode(into: q.responseSlot(slot.responseTail))
                    slot.responseTail &+= 1
                }
                q.storeSequential(.responseTail, slot.responseTail)
                q.storeSequential(.serviceClosed, 1)
                _ = try? Sys.write(wake, UnsafeRawBufferPointer(wakeValue))
            case .stream(let readFD, let writeFD):
                var bytes = [UInt8](repeating: 0, count: slot.queued.count * PageResponse.byteCount)
                bytes.withUnsafeMutableBytes { b in
                    for (i, r) in slot.queued.enumerated() {
                        r.encode(into: UnsafeMutableRawBufferPointer(rebasing: b[(i * 8)..<(i * 8 + 8)]))
                    }
                }
                if !bytes.isEmpty { _ = bytes.withUnsafeBytes { try? Sys.writeAll(writeFD, $0) } }
                // Shut the socket down so that a pending ring read completes.
                _ = Glibc.shutdown(readFD, CInt(SHUT_RDWR))
            }
            slot.registration.ends.close()
            slots[index] = nil
        }
        for command in service.takeCommands() {
            switch command {
            case .invalidate(_, _, let ticket): ticket.complete(.failure(ServiceError(description: "the service stopped")))
            case .check(let ticket): ticket.complete(.success([]))
            case .barrier(let ticket): ticket.complete(.success(()))
            case .attach(let r): r.ends.close()
            case .stop: break
            }
        }
        service.publish(stats)
    }
}

/// The fields of a record that failed validation, read without trusting them.
struct RawRecord {
    var flags: UInt32
    var groupIndex: UInt32
    var cookie: UInt32
    init(_ b: UnsafeRawBufferPointer) {
        flags = UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 0, as: UInt32.self))
        groupIndex = UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 12, as: UInt32.self))
        cookie = UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 36, as: UInt32.self))
    }
    var isLast: Bool { flags & PageRequest.Flags.lastPage.rawValue != 0 }
}

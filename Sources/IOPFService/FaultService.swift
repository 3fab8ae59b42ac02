// FaultService.swift — the service as an embedder sees it: DMA mappings watched through
// userfaultfd, domains, in-process device attachment, a socket for devices in other
// processes, and commands to the service thread (invalidate, check, barrier, stop), each
// answered through a `Ticket`. The thread itself is `EventLoop` (EventLoop.swift).
//
// A command sent to a service whose loop has stopped (stopped on purpose, or ended by an
// error) fails at once with `ServiceError.stopped`: nothing waits forever.

import CIOPFShim
import Dispatch
import Foundation
import Glibc
@_exported import IOPFSystem
@_spi(SharedRings) import IOPFSystem
import Logging
import Synchronization
import SystemPackage
@_spi(FaultInjection) import IOPFCore

/// How a fault service runs: its channels, loop, host events, deadlines and tenant limits.
public struct ServiceConfiguration: Sendable {
    /// The fault channel of in-process devices (external devices choose in ATTACH).
    public var transport = ChannelTransport.shared
    /// How long the loop busy-polls after activity before sleeping, at most: the loop
    /// spins shorter while work arrives further apart than this (SpinWindow.swift).
    public var spinNanoseconds: Int64 = 200_000
    /// Submission queue entries of the loop's io_uring.
    public var ringEntries: UInt32 = 256
    /// Watch the mappings' host memory through userfaultfd (falls back to API-only
    /// invalidation, with a warning, when the kernel refuses).
    public var hostEvents = true
    /// How long an external device has to acknowledge an INVALIDATE before it is fenced.
    public var invalidateTimeout: Duration = .seconds(1)
    /// Connected peers at most; further connections are closed at once.
    public var maxPeers = 256
    // Trust between tenants (Protocol.md, "Trust model"): what one peer, one uid or one
    // host may make the service hold. Each is a `serve` flag.
    /// Connected peers per uid (SO_PEERCRED) at most, so that one user cannot lock out others.
    public var maxPeersPerUID = 128
    /// A peer that has not sent HELLO this long after connecting is disconnected.
    public var greetingTimeout: Duration = .seconds(2)
    /// Hosts attached at once per uid at most (`maxHosts` in all).
    public var maxHostsPerUID = 16
    /// Bytes of memfds one host may hand over, their sizes added (sparse or not: the
    /// service maps them and reserves their physical range).
    public var maxHostMemoryBytes: UInt64 = 1 << 40
    /// Bytes of memfds all hosts together may hand over.
    public var maxTotalHostMemoryBytes: UInt64 = 16 << 40
    /// Bytes of DMA mappings one host may hold, their sizes added (a buffer mapped at two
    /// IOVAs counts twice): bounds its bitmaps and the work of its invalidations.
    public var maxHostMappedBytes: UInt64 = 4 << 40
    /// Bytes one host may have pinned (DMA_MAP with PIN) at once, besides its own
    /// RLIMIT_MEMLOCK: pinning populates and locks its memfds, so a sparse memfd pinned
    /// whole would become that much of this machine's memory. Half the RAM by default.
    public var maxHostPinnedBytes: UInt64 = UInt64(max(sysconf(CInt(_SC_PHYS_PAGES)), 0)) * 4096 / 2
    /// Mapping ahead of sequential faults, per device (FaultAround.swift).
    public var faultAround = FaultAroundPolicy.off
    /// The CPU the service thread runs on alone, as a device's IOMMU works beside the CPUs
    /// rather than on them; nil: wherever the scheduler puts it. Simulated devices in this
    /// process then keep off it (`DeviceConfiguration.avoidCPU`).
    public var loopCPU: Int?
    /// The engine each host's address space gets (fault-driven, 4 KiB pages; planted bugs
    /// reach hosts' engines through it).
    public var hostEngine: EngineConfiguration = {
        var c = EngineConfiguration()
        c.pageSizes = [.size4K]
        return c
    }()
    /// Sees every IOTLB sync of the domain of each host with this name (the stress tool's
    /// tally of its own host, which other hosts on the same service must not add to).
    public var hostSyncObserver: (name: String, observer: any IOTLBSyncObserver)?
    /// Bugs planted for `iopf stress` and tests (the service plants double-answer).
    @_spi(FaultInjection) public var injectedBugs: InjectedBugs = []
    /// The defaults `iopf serve` starts with.
    public init() {}
}

/// The tenant limits of `ServiceConfiguration` as `serve` sets them from its flags.
public struct TenantLimits: Sendable, Equatable {
    /// Peers one uid may have connected at once.
    public var maxPeersPerUID = ServiceConfiguration().maxPeersPerUID
    /// How long a new connection has to say HELLO.
    public var greetingTimeout = ServiceConfiguration().greetingTimeout
    /// Hosts one uid may have attached at once.
    public var maxHostsPerUID = ServiceConfiguration().maxHostsPerUID
    /// Memory one host may hand over, in bytes.
    public var maxHostMemoryBytes = ServiceConfiguration().maxHostMemoryBytes
    /// IOVA space one host may map, in bytes.
    public var maxHostMappedBytes = ServiceConfiguration().maxHostMappedBytes
    /// Memory one host may have pinned, in bytes.
    public var maxHostPinnedBytes = ServiceConfiguration().maxHostPinnedBytes
    /// The limits of a default `ServiceConfiguration`.
    public init() {}

    /// Sets these limits in `c`.
    public func apply(to c: inout ServiceConfiguration) {
        c.maxPeersPerUID = maxPeersPerUID
        c.greetingTimeout = greetingTimeout
        c.maxHostsPerUID = maxHostsPerUID
        c.maxHostMemoryBytes = maxHostMemoryBytes
        c.maxHostMappedBytes = maxHostMappedBytes
        c.maxHostPinnedBytes = maxHostPinnedBytes
    }
}

/// Counters of everything the service has done, published by the loop thread.
public struct ServiceStatistics: Sendable, Equatable, Codable {
    /// All zero.
    public init() {}

    /// Well-formed page requests received.
    public var records = 0
    /// Page-request groups answered.
    public var groups = 0
    /// Pages mapped ahead of faults (fault-around).
    public var prefetchedPages = 0
    /// Groups answered SUCCESS.
    public var success = 0
    /// Groups answered INVALID.
    public var invalid = 0
    /// Records refused by the wire-format checks.
    public var malformed = 0
    /// Records whose device id or PASID is not attached on their channel.
    public var unknownDevice = 0
    /// Records beyond the device's outstanding-request credit.
    public var creditExceeded = 0
    /// Incomplete groups answered INVALID because their device went away or the service stopped.
    public var abandonedGroups = 0
    /// Devices whose channel closed or that were detached.
    public var devicesClosed = 0
    /// Invalidations asked for (by the API, host events and peers).
    public var invalidationRequests = 0
    /// Host events read from the userfaultfd, by kind.
    public var uffdEvents = 0
    /// `madvise` events (REMOVE).
    public var uffdRemove = 0
    /// `munmap` events (UNMAP).
    public var uffdUnmap = 0
    /// `mremap` events (REMAP).
    public var uffdRemap = 0
    /// Times the io_uring completion queue was found overflowed (completions the kernel
    /// held back and delivered later; none lost).
    public var completionOverflows = 0
    /// Command doorbell rings that failed; their commands were taken by the loop's sweep.
    public var doorbellWriteFailures = 0
    /// Turns of the event loop.
    public var loopTurns = 0
    /// Times the loop slept in io_uring (its spin ended with nothing to do).
    public var sleeps = 0
    /// The loop's spin window when it last went idle, adapted to how far apart work
    /// arrives (at most `ServiceConfiguration.spinNanoseconds`).
    public var spinNanoseconds: Int64 = 0
    /// Groups handled together with others of their device in one engine call.
    public var batchedGroups = 0
    /// io_uring completions handled.
    public var completions = 0
    /// Devices attached over the socket, in all.
    public var externalDevices = 0
    /// External devices detached for missing an invalidation deadline or breaking a channel's rules.
    public var devicesFenced = 0
    /// Protocol errors by peers, in all and by kind.
    public var protocolErrors = 0
    /// Protocol errors by kind.
    public var protocolErrorKinds: [ProtocolErrorKind: Int] = [:]
    /// Peers that connected, in all.
    public var peersConnected = 0
    /// Connections the service refused or cut before they were served, by why:
    /// tooManyPeers, tooManyPeersForUID, greetingTimeout.
    public var refusedConnections: [ProtocolErrorKind: Int] = [:]
    /// Requests of hosts refused for a budget: memfd bytes, mapped bytes, hosts per uid.
    public var hostBudgetsExceeded = 0
    /// Peers the service disconnected (protocol errors, fencing), as opposed to clean closes.
    public var peersDisconnected = 0
    /// INVALIDATE messages sent to external devices, and acknowledgements received.
    public var invalidationsSent = 0
    /// INVALIDATE messages acknowledged.
    public var invalidationsAcked = 0
    /// Host events by where they came from: "own" (this process's memory), each host's
    /// name while a record of it is kept (hosts that came back under the same name add
    /// up), and "ended hosts" for the rest.
    public var uffdEventsBySource: [String: Int] = [:]
    /// The hosts attached now and the last `keptEndedHosts` that ended, in order of arrival.
    public var hosts: [HostRecord] = []
    /// Hosts that ended, kept or not.
    public var hostsEnded = 0
    /// Ended hosts whose records are kept: a peer that connects again and again must not
    /// grow the statistics.
    public static let keptEndedHosts = 32

    /// Updates the record of host `id`, if it is kept (a live host's always is).
    mutating func host(_ id: UInt32, _ body: (inout HostRecord) -> Void) {
        if let i = hosts.lastIndex(where: { $0.id == id }) { body(&hosts[i]) }
    }

    /// Marks host `id` ended and drops the oldest ended records beyond `keptEndedHosts`,
    /// folding their event counts into "ended hosts".
    mutating func endHost(_ id: UInt32, reason: String) {
        host(id) { $0.ended = reason }
        hostsEnded += 1
        while hosts.lazy.filter({ $0.ended != nil }).count > Self.keptEndedHosts {
            let gone = hosts.remove(at: hosts.firstIndex { $0.ended != nil }!)
            if !hosts.contains(where: { $0.name == gone.name }),
                let n = uffdEventsBySource.removeValue(forKey: gone.name)
            {
                uffdEventsBySource["ended hosts", default: 0] += n
            }
        }
    }
    /// Counts one host event that invalidates, by kind and in total.
    mutating func count(_ event: HostEvent, source: String) {
        switch event {
        case .remove: uffdRemove += 1
        case .unmap: uffdUnmap += 1
        case .remap: uffdRemap += 1
        case .other, .malformed: return
        }
        uffdEvents += 1
        uffdEventsBySource[source, default: 0] += 1
    }

    /// Why the service stopped granting (a fatal invalidation failure, host events lost);
    /// nil while it serves. Once set, every request is answered INVALID.
    public var stopped: String?

    mutating func protocolError(_ kind: ProtocolErrorKind) {
        protocolErrors += 1
        protocolErrorKinds[kind, default: 0] += 1
    }
}

/// What a service holds at one moment: the figures a soak run watches for growth.
public struct ServiceFootprint: Sendable, Equatable, Codable {
    /// This process's resident set (VmRSS) and open descriptors.
    public var rssBytes: UInt64 = 0
    /// Open descriptors of this process.
    public var fds = 0
    /// I/O page-table pages live over every engine (the service's and each host's).
    public var tablePages = 0
    /// Faulted pages marked mapped, and DMA mappings, over every engine.
    public var mappedPages = 0
    /// DMA mappings over every engine.
    public var mappings = 0
    /// Devices attached now.
    public var devices = 0
    /// Peers connected now.
    public var peers = 0
    /// Hosts attached now.
    public var hosts = 0

    /// All zero.
    public init() {}

    /// Fills `rssBytes` and `fds` from /proc/self.
    public mutating func measureProcess() {
        let status = Sys.readText("/proc/self/status") ?? ""
        let rss = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") }
        rssBytes =
            (rss.flatMap { UInt64($0.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") }
                ?? 0) << 10
        // Less the one reading the directory.
        fds = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? 1) - 1
    }
}

/// A host in another process, as the statistics (and `iopf serve --json`'s `hosts`) show it.
public struct HostRecord: Sendable, Equatable, Codable {
    /// The service's number for this attachment (unique while the service runs).
    public var id: UInt32
    /// The name of its address space, which its devices attach to.
    public var name: String
    /// Its process id, from `SO_PEERCRED`.
    public var pid: Int32
    /// Memory regions it declared.
    public var regions: Int
    /// Bytes of memory it handed over.
    public var memoryBytes: UInt64
    /// DMA mappings added (DMA_MAP), host addresses updated (DMA_MAP with VADDR), unmaps.
    public var mappings = 0
    /// DMA_MAP requests that updated a mapping's host address.
    public var addressUpdates = 0
    /// DMA_UNMAP requests served.
    public var unmaps = 0
    /// Devices that attached to its address space, in all.
    public var devices = 0
    /// Host events read from its userfaultfd.
    public var uffdEvents = 0
    /// Host ranges the service keeps for it (bound memfd pieces and registered ranges):
    /// pruned as the host moves or unmaps memory, so it stays near its live mappings.
    public var trackedRanges = 0
    /// Page requests served in its address space (refreshed every 100 ms and when it ends).
    public var faults = 0
    /// Pages those faults mapped, those around and ahead included.
    public var mappedPages = 0
    /// Bytes of its pinned mappings (DMA_MAP with PIN), locked in memory.
    public var pinnedBytes = 0
    /// 2 MiB blocks among the pages mapped (hugetlbfs memory), one entry each.
    public var blockMappings = 0
    /// Dirty-tracking ranges it has started now (DIRTY_START, less DIRTY_STOP).
    public var dirtyRanges = 0
    /// DIRTY_READs served.
    public var dirtyReads = 0
    /// Pages those reads reported dirty.
    public var dirtyPagesReported = 0
    /// Its vhost-user back-ends (VHOST): those attached and the last few that ended.
    public var vhost: [VhostStatistics] = []
    static let keptVhostRecords = 8
    /// Why its address space was torn down; nil while it is attached.
    public var ended: String?

    /// A record of a host that just attached.
    public init(id: UInt32, name: String, pid: Int32, regions: Int, memoryBytes: UInt64) {
        self.id = id
        self.name = name
        self.pid = pid
        self.regions = regions
        self.memoryBytes = memoryBytes
    }
}

/// Why the service could not do what was asked.
public enum ServiceError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The service's loop is not running (stopped, or ended by an error).
    case stopped
    /// The event loop could not start.
    case startFailed(String)
    /// An invalidation could not remove a translation: fatal for the engine (Alex Williamson's review of the 2021 VFIO
    /// IOPF MMU-notifier patch).
    case invalidationFailed(String)
    /// A system call failed.
    case system(SystemCallError)
    /// The request itself is wrong (bad sizes, unknown domain, ...).
    case invalidRequest(String)

    public var description: String {
        switch self {
        case .stopped: "the service has stopped"
        case .startFailed(let why): "the service could not start: \(why)"
        case .invalidationFailed(let why): "invalidation failed: \(why)"
        case .system(let e): "\(e)"
        case .invalidRequest(let why): why
        }
    }
}

/// Waits for one command's completion on another thread.
public final class Ticket<Value: Sendable>: Sendable {
    private let semaphore = DispatchSemaphore(value: 0)
    private let value = Lock<Result<Value, ServiceError>?>(nil)

    init() {}

    /// True once the service completed the command (`wait` returns at once).
    public var isDone: Bool { value.withLock { $0 != nil } }

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

/// What an external device may reach, decided by the embedder when it attaches.
public struct DeviceProvision: Sendable {
    /// The domain the device's windows are mapped in.
    public var domain: DomainID
    /// The IOVA ranges the device may reach.
    public var windows: [DMAWindow]
    /// The memory its translations point into, handed to the device as memfds.
    public var regions: [HostRegion]
    /// The embedder's own handle, given back in `release`.
    public var token: Int
    /// A provision of `windows` in `domain` over `regions`, with the embedder's `token`.
    public init(domain: DomainID, windows: [DMAWindow], regions: [HostRegion], token: Int = 0) {
        self.domain = domain
        self.windows = windows
        self.regions = regions
        self.token = token
    }
}

/// Decides what each external device gets. Called on the service thread: keep it short,
/// and never unmap memory that is still watched by the userfaultfd there.
public protocol DeviceProvisioner: AnyObject, Sendable {
    /// What the device attaching as `deviceID` (and `pasid`) may reach; throw to refuse it.
    func provision(deviceID: UInt32, pasid: UInt32?) throws(ServiceError) -> DeviceProvision
    /// Takes back what `provision` gave, once the device has detached.
    func release(_ provision: DeviceProvision)
}

/// The fault service: an io_uring event loop in front of a `FaultEngine`, serving devices and hosts in this process and
/// in others.
public final class FaultService: Sendable {
    /// The engine of the service's own memory.
    public let engine: FaultEngine
    /// The configuration the service was created with.
    public let configuration: ServiceConfiguration
    let logger: Logger

    enum Command {
        case attach(InProcessAttachment)
        case listen(fd: CInt, path: String, provisioner: any DeviceProvisioner)
        case invalidate(start: UInt64, length: UInt64, Ticket<InvalidationOutcome>)
        case check(Ticket<[InvariantViolation]>)
        case footprint(Ticket<ServiceFootprint>)
        case barrier(Ticket<Void>)
        case attachVhost(VhostAttachment)
        case detachVhost(VhostDevice, Ticket<Void>)
        /// A host's pinned DMA_MAP finished on its worker thread (HostPinning.swift).
        case hostPinned(PinCompletion)
        case stop
    }

    struct VhostAttachment: @unchecked Sendable {
        var handle: VhostDevice
        var main: CInt
        var channel: CInt
        var domain: DomainID
        var runPages: Int
        var faultAroundPages: Int
    }

    struct InProcessAttachment: @unchecked Sendable {
        var deviceID: UInt32
        var pasid: UInt32?
        var domain: DomainID
        var credit: Int
        var transport: any FaultTransport
    }

    /// Pending commands, and whether the loop still takes them.
    private let commands = Lock<(queue: [Command], accepting: Bool)>(([], true))
    /// Serializes map, unmap and host-address updates with their uffd registrations (the
    /// engine's lock cannot be held across the ioctl), as VFIO's iommu mutex does.
    private let control = Lock(())
    let doorbell: CInt
    /// The userfaultfd watching the mappings' host memory; nil when host events are off.
    let uffd: UserfaultfdSource?
    /// Why host events are off, when they are.
    public let hostEventsUnavailable: String?
    /// Host changes in flight, which in-process devices check before using a translation.
    public let window = HostChangeWindow()
    /// Fault injection: submit results, wake-write completions and doorbell rings.
    let planted = PlantedFailures()
    /// Command doorbell rings that failed (the loop's sweep takes their commands).
    private let doorbellWriteFailures = Atomic<Int>(0)
    /// Host events whose invalidation has completed.
    let hostEventsHandled = Atomic<Int>(0)
    let fences: InvalidationFences
    private let published = Lock(ServiceStatistics())
    private let finished = DispatchSemaphore(value: 0)
    private let started = Atomic<Bool>(false)
    private let stopped = Atomic<Bool>(false)
    /// The loop thread's id, for telling whether a caller is on it.
    let loopThread = Atomic<Int32>(0)

    /// A service in front of `engine`, not yet started; opens its io_uring and, with host events, its userfaultfd.
    public init(
        engine: FaultEngine, configuration: ServiceConfiguration = ServiceConfiguration(),
        logger: Logger = Logger(label: "iopf.service")
    ) throws(ServiceError) {
        self.engine = engine
        self.configuration = configuration
        self.logger = logger
        // Blocking on purpose: io_uring waits on a blocking eventfd; O_NONBLOCK would make
        // the read complete at once with -EAGAIN.
        do { doorbell = try Sys.eventfd(flags: CInt(EFD_CLOEXEC)) } catch { throw .system(error) }
        let bell = doorbell
        fences = InvalidationFences(timeout: configuration.invalidateTimeout) { FaultService.ring(bell) }
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

    /// Whether the service's own memory is watched through userfaultfd.
    public var hostEventsEnabled: Bool { uffd != nil }

    var isOnLoopThread: Bool { loopThread.load(ordering: .relaxed) == iopf_gettid() }

    // MARK: Domains

    /// Adds an I/O page table whose IOTLB syncs reach `local` (in-process devices, called
    /// inside the sync) and every external device attached to it (by message).
    public func createDomain(local: (any IOTLBInvalidator)? = nil, observer: (any IOTLBSyncObserver)? = nil)
        throws(IOPageTableError) -> DomainID
    {
        let domain = try engine.createDomain(invalidator: nil, observer: observer)
        engine.setInvalidator(
            DomainSync(domain: SyncDomain(space: 0, domain: domain), local: local, fences: fences) { [weak self] in
                self?.isOnLoopThread ?? false
            }, for: domain)
        return domain
    }

    // MARK: DMA mappings, watched by the host's userfaultfd

    /// Adds a DMA mapping and starts watching its host range. A range the kernel cannot
    /// watch (e.g. a file mapping) is refused with the reason, and nothing is left
    /// registered or mapped.
    @discardableResult
    public func map(iova: UInt64, vaddr: UInt64, size: UInt64, prot: Protection) throws -> MappingID {
        try DMAMappingTable.validate(iova: iova, vaddr: vaddr, size: size, prot: prot)
        return try control.withLock { _ in
            try uffd?.register(start: vaddr, length: size)
            do {
                return try engine.map(iova: iova, vaddr: vaddr, size: size, prot: prot)
            } catch {
                unwatch([vaddr..<(vaddr + size)])
                throw error
            }
        }
    }

    /// Adds a pinned mapping (VFIO type1): pinned, charged and fully mapped before it
    /// returns; host events leave it alone, so its range is not watched.
    @discardableResult
    public func mapPinned(iova: UInt64, vaddr: UInt64, size: UInt64, prot: Protection) throws -> MappingID {
        try engine.mapPinned(iova: iova, vaddr: vaddr, size: size, prot: prot).0
    }

    /// Removes the mappings inside `[iova, iova + size)` (whole mappings only) and stops
    /// watching host memory no other mapping covers. Off the service thread it returns
    /// once every external device acknowledged the invalidation (or was fenced).
    @discardableResult
    public func unmap(iova: UInt64, size: UInt64) throws -> UInt64 {
        let ranges = try control.withLock { _ in
            let ranges = try engine.removeMappings(iova: iova, size: size)
            unwatch(ranges)
            return ranges
        }
        awaitExternalDevices()
        return ranges.reduce(0) { $0 + ($1.upperBound - $1.lowerBound) }
    }

    /// `unmap`, also returning the pages written in the range since the last read of the
    /// dirty log (VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP; see `FaultEngine.unmapReadingDirty`).
    public func unmapReadingDirty(iova: UInt64, size: UInt64) throws -> PageBitmap {
        let (ranges, dirty) = try control.withLock { _ in
            let removed = try engine.unmapReadingDirty(iova: iova, size: size)
            unwatch(removed.hostRanges)
            return removed
        }
        _ = ranges
        awaitExternalDevices()
        return dirty
    }

    /// Points a mapping at new host memory (VFIO_DMA_MAP_FLAG_VADDR): watches the new range,
    /// drops translations to the old one, and clears pages marked gone by UNMAP/REMAP. If
    /// the engine refuses, the new range is not left watched.
    public func updateHostAddress(iova: UInt64, size: UInt64, vaddr: UInt64) throws {
        try control.withLock { _ in
            guard let m = engine.mappingInfo(iova: iova), m.iova == iova, m.size == size else {
                throw DMAMapError.noSuchMapping(iova: iova, size: size)
            }
            try uffd?.register(start: vaddr, length: size)
            do {
                try engine.updateHostAddress(iova: iova, size: size, vaddr: vaddr)
            } catch {
                unwatch([vaddr..<(vaddr + size)])
                throw error
            }
            if m.vaddr != vaddr { unwatch([m.vaddr..<(m.vaddr + size)]) }
        }
        awaitExternalDevices()
    }

    /// Unregisters the parts of `ranges` that no live mapping covers. Under `control`, so
    /// that a concurrent map's registration is never taken for an uncovered range.
    private func unwatch(_ ranges: [Range<UInt64>]) {
        guard let uffd else { return }
        for r in ranges {
            for part in engine.uncoveredHostRanges(r) {
                uffd.unregister(start: part.lowerBound, length: part.upperBound - part.lowerBound)
            }
        }
    }

    /// Waits (off the loop only) until external devices acknowledged what was posted.
    private func awaitExternalDevices() {
        guard !isOnLoopThread else { return }
        let fence = fences.fenceAll(space: 0)
        if !fence.isEmpty { _ = fences.wait(for: fence, limit: configuration.invalidateTimeout * 2 + .seconds(1)) }
    }

    // MARK: Devices

    /// Attaches an in-process device (and optionally one PASID) to a domain over the
    /// configured transport and returns the device's ends of its channel. `credit` is its
    /// PRI outstanding page request allocation.
    public func attach(deviceID: UInt32, pasid: UInt32? = nil, domain: DomainID, credit: Int = 32)
        throws(ServiceError) -> DeviceChannelEnds
    {
        guard credit > 0 && credit <= SharedQueue.capacity else {
            throw .invalidRequest("a device's credit must be 1...\(SharedQueue.capacity) page requests, got \(credit)")
        }
        let made: (any FaultTransport, DeviceChannelEnds)
        do {
            made =
                configuration.transport == .shared
                ? try SharedRingTransport.make() : try StreamTransport.make(configuration.transport)
        } catch {
            throw .system(error)
        }
        let attachment = InProcessAttachment(
            deviceID: deviceID, pasid: pasid, domain: domain, credit: credit, transport: made.0)
        do {
            try send(.attach(attachment))
        } catch {
            made.0.close()
            made.1.close()
            throw error
        }
        return made.1
    }

    /// Accepts devices in other processes on an AF_UNIX SOCK_SEQPACKET socket at `path`
    /// (created with `mode`, 0600 by default; a stale socket file is replaced). The
    /// protocol is IOPFWire.docc/Protocol.md; `provisioner` decides what each device gets.
    public func listen(path: String, mode: mode_t = 0o600, provisioner: any DeviceProvisioner) throws(ServiceError) {
        let fd: CInt
        do { fd = try Sys.listenUnix(path: path, mode: mode) } catch { throw .system(error) }
        do {
            try send(.listen(fd: fd, path: path, provisioner: provisioner))
        } catch {
            Sys.close(fd)
            throw error
        }
        logger.info("listening for devices on \(path) (mode \(String(mode, radix: 8)))")
    }

    /// Serves a vhost-user back-end whose handshake is done: its IOTLB misses on `channel`
    /// (the back-end channel's front-end end, a SOCK_SEQPACKET socket given to the back-end
    /// with SET_BACKEND_REQ_FD) are served from `domain`, mapping `faultAroundPages` from
    /// the page missed, with an UPDATE on `main` (its vhost-user socket) of the whole mapped
    /// run around it inside its aligned block of `runPages` (a power of two); `domain`'s
    /// invalidations reach it as IOTLB INVALIDATEs. Takes both descriptors (closed on a
    /// throw too). The memory table must give each region's physical base as its user
    /// address (VhostBackend.swift).
    public func attachVhost(
        main: FileDescriptor, channel: FileDescriptor, domain: DomainID, deviceID: UInt32, runPages: Int = 512,
        faultAroundPages: Int = 16
    ) throws(ServiceError) -> VhostDevice {
        let (main, channel) = (main.rawValue, channel.rawValue)
        guard (1...(1 << 18)).contains(runPages), runPages & (runPages - 1) == 0,
            (1...512).contains(faultAroundPages)
        else {
            Sys.close(main)
            Sys.close(channel)
            throw .invalidRequest(
                "pages per UPDATE block must be a power of two up to 262144 "
                    + "and pages per miss 1...512, "
                    + "got \(runPages) and \(faultAroundPages)")
        }
        // The descriptors stay blocking (their file may be shared with the front-end, which
        // waits for replies): the loop asks MSG_DONTWAIT of every call.
        let handle = VhostDevice(deviceID: deviceID)
        do {
            try send(
                .attachVhost(
                    VhostAttachment(
                        handle: handle, main: main, channel: channel, domain: domain,
                        runPages: runPages, faultAroundPages: faultAroundPages)))
        } catch {
            Sys.close(main)
            Sys.close(channel)
            throw error
        }
        return handle
    }

    /// Stops serving a back-end: its sockets are closed (it sees its front-end go). Returns
    /// once the loop did it; a back-end already fenced or gone is left as it is.
    public func detachVhost(_ device: VhostDevice) {
        let ticket = Ticket<Void>()
        submit(.detachVhost(device, ticket), ticket)
        _ = try? ticket.wait()
    }

    // MARK: Commands

    /// Completes after every command and host event queued before it was handled,
    /// including the acknowledgements of the invalidations they caused, and after every
    /// device (hosts' devices too) acknowledged what was posted to it before.
    public func barrier() -> Ticket<Void> {
        let ticket = Ticket<Void>()
        submit(.barrier(ticket), ticket)
        return ticket
    }

    /// Host events whose invalidation has completed so far.
    public var hostEventsCompleted: Int { hostEventsHandled.load(ordering: .acquiring) }

    /// Starts the service thread and returns once its ring is ready.
    public func start() throws(ServiceError) {
        precondition(!started.exchange(true, ordering: .relaxed), "FaultService.start called twice")
        let ready = Ticket<Void>()
        let thread = Thread { [self] in
            loopThread.store(iopf_gettid(), ordering: .relaxed)
            if let cpu = configuration.loopCPU {
                do { try Sys.setCPUAffinity(cpu, only: true) } catch {
                    logger.warning("the service thread could not be kept on CPU \(cpu): \(error)")
                }
            }
            let loop: EventLoop
            do {
                loop = try EventLoop(service: self)
            } catch {
                _ = closeCommands()
                ready.complete(.failure(.startFailed("\(error)")))
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

    /// Stops the loop: incomplete groups are answered INVALID, channels and peers closed.
    /// Idempotent.
    public func stop() {
        guard started.load(ordering: .relaxed), !stopped.exchange(true, ordering: .relaxed) else { return }
        try? send(.stop)
        finished.wait()
        finished.signal()
        // Nobody reads host events any more: drop every registration, or a later munmap of
        // a watched range would wait forever for its event to be read.
        uffd?.close()
    }

    /// Queues an invalidation of host range `[start, start + length)` (an MMU-notifier
    /// event); the ticket completes after every domain has synced and every external
    /// device acknowledged.
    @discardableResult
    public func invalidate(hostAddress start: UInt64, length: UInt64) -> Ticket<InvalidationOutcome> {
        let ticket = Ticket<InvalidationOutcome>()
        submit(.invalidate(start: start, length: length, ticket), ticket)
        return ticket
    }

    /// Runs the engine's invariant checks on the service thread, between batches.
    public func checkInvariants() -> Ticket<[InvariantViolation]> {
        let ticket = Ticket<[InvariantViolation]>()
        submit(.check(ticket), ticket)
        return ticket
    }

    /// What the service holds now (for soak runs): taken on the loop, so the counts are
    /// of one moment.
    public func footprint() -> Ticket<ServiceFootprint> {
        let ticket = Ticket<ServiceFootprint>()
        submit(.footprint(ticket), ticket)
        return ticket
    }

    /// The statistics the loop published last.
    public var statistics: ServiceStatistics {
        var s = published.withLock { $0 }
        s.doorbellWriteFailures = doorbellWriteFailures.load(ordering: .relaxed)
        return s
    }

    func publish(_ stats: ServiceStatistics) { published.withLock { $0 = stats } }

    func takeCommands() -> [Command] {
        commands.withLock { c in
            defer { c.queue.removeAll() }; return c.queue
        }
    }

    /// Stops taking commands and returns those still queued (for the loop's shutdown).
    func closeCommands() -> [Command] {
        commands.withLock { c in
            c.accepting = false
            defer { c.queue.removeAll() }
            return c.queue
        }
    }

    private func submit<V>(_ command: Command, _ ticket: Ticket<V>) {
        do { try send(command) } catch { ticket.complete(.failure(error)) }
    }

    func send(_ command: Command) throws(ServiceError) {
        let accepted = commands.withLock { c in
            if c.accepting { c.queue.append(command) }
            return c.accepting
        }
        guard accepted else { throw .stopped }
        if let e = planted.take(.commandDoorbell), e != 0 {
            doorbellWriteFailures.add(1, ordering: .relaxed)
        } else if !Self.ring(doorbell) {
            doorbellWriteFailures.add(1, ordering: .relaxed)
        }
    }

    /// Adds one to an eventfd, retrying signals. A failed ring of the command doorbell
    /// loses nothing: the loop also sweeps the command queue every `commandSweep`.
    @discardableResult
    static func ring(_ eventfd: CInt) -> Bool {
        var one: UInt64 = 1
        while true {
            let r = withUnsafeBytes(of: &one) { Glibc.write(eventfd, $0.baseAddress, 8) }
            if r == 8 { return true }
            if r < 0 && errno == EINTR { continue }
            return false
        }
    }

    /// How often the loop looks at the command queue without being rung.
    static let commandSweep = Duration.milliseconds(100)
}

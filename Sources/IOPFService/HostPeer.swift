// HostPeer.swift — the loop's side of hosts in other processes: HOST (hand-over of an
// address space), DMA_MAP / DMA_UNMAP / SYNC, the host's userfaultfd events, and teardown
// when the host goes. Runs on the loop thread (an extension of `EventLoop`); the address
// space itself is AddressSpace.swift.
//
// Ordering: a host event is read and invalidated in the same loop turn, before any fault
// of that turn is resolved (`takeHostEvents`). Replies that promise the devices dropped
// translations (DMA_MAP with VADDR, DMA_UNMAP, SYNC) wait for every device of that host to
// acknowledge what was posted before them, never for another host's devices.
//
// Registration: the service registers every declared region on the host's uffd once, at
// HOST. mmap(MAP_FIXED) over a registered range silently drops the registration of the
// new mapping (the old one raises UNMAP, so that range becomes gone): the service
// re-registers a range when the host re-declares it with DMA_MAP VADDR, and until then
// faults there are answered INVALID. So no change to memory a device can reach goes
// unseen.

import CIOPFShim
import Glibc
import IOPFCore
import IOPFSystem
import IOPFWire

/// Hosts attached at once at most; more are refused.
let maxHosts = 64

/// vhost-user back-ends one host may have attached at once.
let maxVhostPerHost = 4

extension EventLoop {
    /// Whether hosts' pages are confirmed by touching them: as for the service's own memory.
    var probes: Bool { (engine.memory as? ProcessMemory)?.probes ?? (iopf_probe_install() == 0) }

    /// The address space named `name` that peer `p` may attach a device to: one whose host
    /// has `p`'s uid or allowed it. Among several, the one of `p`'s own uid; if none is,
    /// the name is ambiguous and refused rather than guessed (a squatter of another uid
    /// must not receive a device meant for someone else's host). The error never names
    /// the address spaces `p` may not see.
    func addressSpace(named name: String, for p: Peer) -> Result<AddressSpace, HostRefusal> {
        let admitted = hosts.compactMap { $0 }.filter { $0.name == name && !$0.closed && $0.admits(p.uid) }
        if let own = admitted.first(where: { $0.uid == p.uid }) { return .success(own) }
        if admitted.count == 1 { return .success(admitted[0]) }
        if admitted.isEmpty {
            return .failure(
                HostRefusal(
                    WireErrno.noEntry, .unknownAddressSpace,
                    "no address space named '\(name)' that uid \(p.uid) may attach to"))
        }
        return .failure(
            HostRefusal(
                WireErrno.notUnique, .ambiguousAddressSpace,
                "\(admitted.count) hosts of other uids named '\(name)' admit uid \(p.uid): none is chosen"))
    }
}
/// What a host's events may cost per wake-up, in mappings visited plus pages unmapped, so
/// that one host cannot starve the rest: events are read 16 at a time while this holds, and
/// the rest wait for the next turn (the host's madvise waits with them, not other hosts).
private let eventCostPerTurn = 4096

extension EventLoop {
    // MARK: HOST

    /// Takes the address space a host hands over, or refuses it saying why. Owns `fds`.
    func declareHost(_ p: Peer, _ header: MessageHeader, _ payload: UnsafeRawBufferPointer, fds: [CInt]) {
        var owned = fds
        func refuse(_ r: HostRefusal) {
            for fd in owned { Sys.close(fd) }
            owned = []
            stats.protocolError(r.kind)
            reply(p, Wire.errorReply(command: .host, id: header.id, errno: r.errno, text: r.description))
            service.logger.info("\(p.name): HOST refused: \(r.description)")
        }
        let declaration: HostDeclaration
        do {
            declaration = try HostDeclaration(payload: payload)
        } catch {
            refuse(HostRefusal(error.errno, error.kind, error.description))
            return
        }
        let name = declaration.name
        let config = service.configuration
        // Names belong to uids: two users may each have a 'vm1', and a device finds the one
        // it may attach to (`addressSpace(named:for:)`). Only the same uid collides.
        if let other = hosts.first(where: { $0?.name == name && $0?.uid == p.uid }) ?? nil {
            return refuse(
                HostRefusal(
                    WireErrno.exists, .nameTaken,
                    "an address space named '\(name)' is attached already for uid \(p.uid) (pid \(other.pid))"))
        }
        let live = hosts.compactMap { $0 }
        guard live.count < maxHosts else {
            stats.hostBudgetsExceeded += 1
            return refuse(HostRefusal(WireErrno.noSpace, .tooManyHosts, "the service serves \(maxHosts) hosts at most"))
        }
        guard live.count(where: { $0.uid == p.uid }) < config.maxHostsPerUID else {
            stats.hostBudgetsExceeded += 1
            return refuse(
                HostRefusal(
                    WireErrno.noSpace, .tooManyHosts,
                    "uid \(p.uid) has \(config.maxHostsPerUID) hosts attached already (--max-hosts-per-uid)"))
        }
        guard owned.count == 1 + declaration.memfdCount else {
            return refuse(
                HostRefusal(
                    WireErrno.badFD, .badRegionTable,
                    """
                    HOST carries \(owned.count) descriptors; its region table needs 1 userfaultfd and \
                    \(declaration.memfdCount) memfds
                    """
                ))
        }
        let used = Set(declaration.regions.map(\.fdIndex))
        if let unused = (0..<UInt32(declaration.memfdCount)).first(where: { !used.contains($0) }) {
            return refuse(HostRefusal(WireErrno.invalid, .badRegionTable, "memfd \(unused) is not used by any region"))
        }
        let inUse = live.reduce(UInt64(0)) { $0 + $1.memory.bytes }
        let left = config.maxTotalHostMemoryBytes - min(inUse, config.maxTotalHostMemoryBytes)
        let budget = min(config.maxHostMemoryBytes, left)
        let uffd: HostUserfaultfd
        do { uffd = try HostUserfaultfd(adopting: owned[0]) } catch {
            owned.removeFirst()
            return refuse(error)
        }
        owned.removeFirst()
        let memory: RemoteHostMemory
        do { memory = try RemoteHostMemory(adopting: owned, budget: budget, probes: probes) } catch {
            owned = []
            uffd.release(scratch: uffdBuffer)
            if error.kind == .hostMemoryBudget { stats.hostBudgetsExceeded += 1 }
            return refuse(error)
        }
        owned = []
        func fail(_ r: HostRefusal) {
            uffd.release(scratch: uffdBuffer)
            memory.close()
            refuse(r)
        }
        for (i, r) in declaration.regions.enumerated() {
            let m = memory.memfds[Int(r.fdIndex)]
            guard UInt64(r.pageSize) == m.pageSize else {
                return fail(
                    HostRefusal(
                        WireErrno.invalid, .badRegionTable,
                        "region \(i): page size \(r.pageSize) but memfd \(r.fdIndex) has \(m.pageSize)-byte pages"))
            }
            for (what, v) in [("address", r.hostAddress), ("size", r.size), ("fd offset", r.fdOffset)]
            where v & (m.pageSize - 1) != 0 {
                return fail(
                    HostRefusal(
                        WireErrno.invalid, .badRegionTable,
                        "region \(i): \(what) \(hex(v)) is not aligned to its memfd's \(m.pageSize >> 10) KiB pages"))
            }
            guard r.fdOffset + r.size <= m.size else {
                return fail(
                    HostRefusal(
                        WireErrno.invalid, .badRegionTable,
                        """
                        region \(i): offset \(hex(r.fdOffset)) + size \(hex(r.size)) exceeds memfd \(r.fdIndex)'s \
                        size \(hex(m.size)): the region table does not match the memfds
                        """
                    ))
            }
        }
        // Register first, then check: a change after the check raises an event.
        for (i, r) in declaration.regions.enumerated() {
            do { try uffd.register(r.hostRange) } catch {
                return fail(HostRefusal(WireErrno.invalid, .cannotWatch, "region \(i): \(error)"))
            }
        }
        var pieces: [RemoteHostMemory.Binding] = []
        for (i, r) in declaration.regions.enumerated() {
            switch HostMaps.backing(of: r.hostRange, pid: p.pid, memfds: memory.memfds) {
            case .failure(let refusal):
                return fail(HostRefusal(refusal.errno, refusal.kind, "region \(i): \(refusal.description)"))
            case .success(let found):
                let expected = RemoteHostMemory.Binding(host: r.hostRange, memfd: Int(r.fdIndex), offset: r.fdOffset)
                guard found == [expected] else {
                    let f = found.first!
                    return fail(
                        HostRefusal(
                            WireErrno.fault, .notHostMemory,
                            """
                            region \(i): \(hex(r.hostAddress)) is mapped from memfd \(f.memfd) at offset \
                            \(hex(f.offset)), not memfd \(r.fdIndex) at \(hex(r.fdOffset)) as declared
                            """
                        ))
                }
                pieces.append(expected)
            }
        }
        memory.bind(pieces)
        var engineConfiguration = service.configuration.hostEngine
        // Pins are charged to the host, as VFIO charges the VMM's locked_vm.
        (engineConfiguration.lockedMemoryLimit, engineConfiguration.bypassesLockedMemoryLimit) =
            HostLockLimit.of(pid: p.pid)
        if memory.hasHugePages {
            // As for the service's own memory on huge pages: a fault maps the 2 MiB block.
            engineConfiguration.pageSizes.insert(.size2M)
            engineConfiguration.blocksOnFault = true
        }
        let engine = FaultEngine(memory: memory, configuration: engineConfiguration)
        let domain: DomainID
        do {
            domain = try engine.createDomain(
                invalidator: nil,
                observer: service.configuration.hostSyncObserver.flatMap { $0.name == name ? $0.observer : nil })
        } catch {
            return fail(
                HostRefusal(WireErrno.noSpace, .noMemory, "cannot create the address space's I/O page table: \(error)"))
        }
        nextSpaceID += 1
        let id = nextSpaceID
        engine.setInvalidator(
            DomainSync(domain: SyncDomain(space: id, domain: domain), local: nil, fences: fences) { true }, for: domain)
        let index = hosts.firstIndex { $0 == nil } ?? hosts.count
        let memoryBytes = declaration.regions.reduce(0) { $0 + $1.size }
        stats.hosts.append(
            HostRecord(id: id, name: name, pid: p.pid, regions: declaration.regions.count, memoryBytes: memoryBytes))
        let space = AddressSpace(
            id: id, index: index, name: name, engine: engine,
            host: .init(domain: domain, memory: memory, uffd: uffd, peer: p, allowedUIDs: declaration.allowedUIDs))
        if index == hosts.count { hosts.append(space) } else { hosts[index] = space }
        p.space = space
        p.state = .attached
        noteTrackedRanges(space)
        armHostEvents(space)
        reply(p, Wire.message(command: .host, id: header.id, flags: .reply))
        service.logger.info(
            """
            host '\(name)' attached from \(p.name): \(declaration.regions.count) regions, \(memory.memfds.count) \
            memfds, \(memoryBytes >> 20) MiB
            """
        )
    }

    private func armHostEvents(_ s: AddressSpace) {
        guard !s.closed, !s.uffdArmed else { return }
        do {
            try ring.preparePollIn(
                fd: s.uffd.fd, token: RingToken(kind: .hostSpaceEvent, slot: s.index, generation: s.id))
            s.uffdArmed = true
        } catch {
            closePeer(s.peer, reason: "cannot poll its userfaultfd: \(error)", disconnected: true)
        }
    }

    // MARK: DMA_MAP, DMA_UNMAP, SYNC

    func hostMap(_ p: Peer, _ header: MessageHeader, _ request: DMAMapRequest) {
        guard let s = p.space else { return }
        func refuse(_ errno: UInt32, _ kind: ProtocolErrorKind, _ text: String) {
            stats.protocolError(kind)
            reply(p, Wire.errorReply(command: .dmaMap, id: header.id, errno: errno, text: text))
        }
        if request.updatesHostAddress {
            guard let m = s.engine.mappingInfo(iova: request.iova), m.iova == request.iova, m.size == request.size
            else {
                return refuse(
                    WireErrno.noEntry, .noSuchMapping,
                    DMAMapError.noSuchMapping(iova: request.iova, size: request.size).description)
            }
            do {
                try DMAMappingTable.validate(
                    iova: request.iova, vaddr: request.hostAddress, size: request.size, prot: m.prot)
            } catch {
                return refuse(WireErrno.invalid, .badMapping, error.description)
            }
            let range = request.hostAddress..<(request.hostAddress + request.size)
            do { try s.uffd.register(range) } catch {
                return refuse(WireErrno.fault, .cannotWatch, error.description)
            }
            let found: [RemoteHostMemory.Binding]
            do {
                found = try HostMaps.backing(of: range, pid: s.pid, memfds: s.memory.memfds).get()
            } catch {
                return refuse(error.errno, error.kind, error.description)
            }
            s.memory.bind(found)
            do {
                try s.engine.updateHostAddress(iova: request.iova, size: request.size, vaddr: request.hostAddress)
            } catch {
                return refuse(WireErrno.invalid, .badMapping, "\(error)")
            }
            s.memory.movePins(from: m.vaddr, to: request.hostAddress, size: request.size)
            stats.host(s.id) { $0.addressUpdates += 1 }
            noteTrackedRanges(s)
            afterExternalDevices(space: s.id) { [self] in
                reply(p, Wire.message(command: .dmaMap, id: header.id, flags: .reply))
            }
            return
        }
        var prot: Protection = []
        if request.flags & DMAMapRequest.read != 0 { prot.insert(.read) }
        if request.flags & DMAMapRequest.write != 0 { prot.insert(.write) }
        do {
            try DMAMappingTable.validate(iova: request.iova, vaddr: request.hostAddress, size: request.size, prot: prot)
        } catch {
            return refuse(WireErrno.invalid, .badMapping, error.description)
        }
        guard s.memory.covers(request.hostAddress..<(request.hostAddress + request.size)) else {
            return refuse(
                WireErrno.fault, .notHostMemory,
                """
                DMA map: host range [\(hex(request.hostAddress)), +\(hex(request.size))) is not the host's memory \
                now (outside its regions, or unmapped or moved since: re-declare it with VADDR)
                """
            )
        }
        let (mapped, overflow) = s.mappedBytes.addingReportingOverflow(request.size)
        guard !overflow, mapped <= service.configuration.maxHostMappedBytes else {
            stats.hostBudgetsExceeded += 1
            let limit = service.configuration.maxHostMappedBytes
            return refuse(
                WireErrno.noSpace, .hostMappedBudget,
                "DMA map: \(hex(request.size)) more bytes would pass this host's budget of \(hex(limit)) "
                    + "mapped bytes (--max-host-mapped); \(hex(s.mappedBytes)) are mapped")
        }
        if request.flags & DMAMapRequest.pin != 0 {
            guard p.minor >= 2 else {
                return refuse(WireErrno.notSupported, .badState, "DMA_MAP with PIN needs protocol 1.2")
            }
            return hostMapPinned(p, header, request, prot: prot, s: s)
        }
        do { try s.engine.map(iova: request.iova, vaddr: request.hostAddress, size: request.size, prot: prot) } catch {
            return refuse(error.errno, .badMapping, error.description)
        }
        s.mappedBytes = mapped
        stats.host(s.id) { $0.mappings += 1 }
        reply(p, Wire.message(command: .dmaMap, id: header.id, flags: .reply))
    }

    /// DMA_UNMAP; owns `fds` (none, or with GET_DIRTY the bitmap's memfd), closed before
    /// it returns. With GET_DIRTY (1.3) the log is read with the removal (`HostDirty.swift`).
    func hostUnmap(_ p: Peer, _ header: MessageHeader, _ payload: UnsafeRawBufferPointer, fds: [CInt]) {
        defer { for fd in fds { Sys.close(fd) } }
        guard let s = p.space else { return }
        func refuse(_ errno: UInt32, _ kind: ProtocolErrorKind, _ text: String) {
            stats.protocolError(kind)
            reply(p, Wire.errorReply(command: .dmaUnmap, id: header.id, errno: errno, text: text))
        }
        let request: DMAUnmapRequest
        do { request = try DMAUnmapRequest(payload: payload) } catch {
            return refuse(error.errno, error.kind, error.description)
        }
        guard !request.isExtended || p.minor >= 3 else {
            return refuse(
                WireErrno.notSupported, .badState, "DMA_UNMAP with flags needs protocol 1.3; HELLO agreed 1.\(p.minor)")
        }
        if request.flags & DMAUnmapRequest.getDirty != 0 {
            return hostUnmapReadingDirty(p, header, s, request, fds: fds)
        }
        guard fds.isEmpty else {
            return refuse(WireErrno.invalid, .unexpectedFDs, "DMA_UNMAP carries a descriptor only with GET_DIRTY")
        }
        let removed: [Range<UInt64>]
        do { removed = try s.engine.removeMappings(iova: request.iova, size: request.size) } catch {
            return refuse(WireErrno.invalid, .badMapping, "\(error)")
        }
        let bytes = noteUnmapped(s, removed)
        afterExternalDevices(space: s.id) { [self] in
            reply(p, DMAUnmapReply(bytes: bytes).message(id: header.id, flags: .reply))
        }
    }

    /// Counts the mappings a DMA_UNMAP removed; returns their bytes.
    func noteUnmapped(_ s: AddressSpace, _ removed: [Range<UInt64>]) -> UInt64 {
        stats.host(s.id) {
            $0.unmaps += removed.count
            $0.pinnedBytes = Int(clamping: s.pinnedBytes)
        }
        let bytes = removed.reduce(0) { $0 + UInt64($1.count) }
        s.mappedBytes -= bytes
        return bytes
    }

    /// VHOST: serve a vhost-user back-end in the host's address space. Takes `fds` (closed
    /// on a refusal): they must be an AF_UNIX stream socket and an AF_UNIX seqpacket socket,
    /// at most `maxVhostPerHost` back-ends per host at once.
    func hostVhost(_ p: Peer, _ header: MessageHeader, _ payload: UnsafeRawBufferPointer, fds: [CInt]) {
        func refuse(_ errno: UInt32, _ kind: ProtocolErrorKind, _ text: String) {
            for fd in fds { Sys.close(fd) }
            stats.protocolError(kind)
            reply(p, Wire.errorReply(command: .vhost, id: header.id, errno: errno, text: text))
        }
        guard let s = p.space else {
            return refuse(WireErrno.protocolError, .badState, "VHOST needs an address space (HOST first)")
        }
        let request: VhostAttachRequest
        do { request = try VhostAttachRequest(payload: payload) } catch {
            return refuse(error.errno, error.kind, error.description)
        }
        guard fds.count == 2 else {
            return refuse(
                WireErrno.badFD, .badVhostSockets,
                "VHOST carries 2 descriptors (the vhost-user socket, the back-end channel), got \(fds.count)")
        }
        let stream = Sys.socketKind(fds[0])
        let seqpacket = Sys.socketKind(fds[1])
        guard stream?.domain == AF_UNIX, stream?.type == CInt(SOCK_STREAM.rawValue), seqpacket?.domain == AF_UNIX,
            seqpacket?.type == CInt(SOCK_SEQPACKET.rawValue)
        else {
            return refuse(
                WireErrno.badFD, .badVhostSockets,
                "VHOST's descriptors must be an AF_UNIX SOCK_STREAM socket "
                    + "and an AF_UNIX SOCK_SEQPACKET socket")
        }
        guard vhosts.count(where: { $0?.space === s }) < maxVhostPerHost else {
            return refuse(
                WireErrno.noSpace, .tooManyVhostBackends,
                "host '\(s.name)' already has \(maxVhostPerHost) vhost-user back-ends")
        }
        let handle = VhostDevice(deviceID: request.deviceID)
        addVhost(
            FaultService.VhostAttachment(
                handle: handle, main: fds[0], channel: fds[1], domain: s.domain,
                runPages: Int(request.blockPages),
                faultAroundPages: Int(request.faultAroundPages)), space: s)
        reply(p, Wire.message(command: .vhost, id: header.id, flags: .reply))
    }

    func hostSync(_ p: Peer, _ header: MessageHeader) {
        guard let s = p.space else { return }
        afterExternalDevices(space: s.id) { [self] in
            reply(p, Wire.message(command: .sync, id: header.id, flags: .reply))
        }
    }

    /// Publishes the faults served in `s`'s space and the 2 MiB blocks they mapped.
    func noteHostFaults(_ s: AddressSpace) {
        let e = s.engine.statistics
        stats.host(s.id) {
            $0.faults = e.requests
            $0.mappedPages = e.mappedPages
            $0.blockMappings = e.blockMappings
        }
    }

    /// Publishes how many host ranges the service keeps for `s` (pruned as it moves memory).
    func noteTrackedRanges(_ s: AddressSpace) {
        let tracked = s.memory.bindingCount + s.uffd.registered.count
        stats.host(s.id) { $0.trackedRanges = tracked }
    }

    // MARK: Events

    /// The host's uffd is readable: every queued event becomes an invalidation in its space.
    func hostSpaceEvents(_ c: Completion) {
        guard c.token.slot < hosts.count, let s = hosts[c.token.slot], s.id == c.token.generation, !s.closed else {
            return
        }
        s.uffdArmed = false
        if c.result < 0 || c.result & Int32(POLLERR | POLLHUP | POLLNVAL) != 0 {
            closePeer(s.peer, reason: "its userfaultfd failed (poll result \(c.result))", disconnected: true)
            return
        }
        do {
            try readEvents(from: s.uffd, budget: eventCostPerTurn, stop: { s.closed }) { handle($0, in: s) }
        } catch {
            // Fail closed: without its events the host's changes would go unseen.
            closePeer(s.peer, reason: "reading its userfaultfd failed: \(error)", disconnected: true)
            return
        }
        armHostEvents(s)
    }

    // MARK: Teardown

    /// Removes a torn-down host's mappings (unpinning what was pinned) and unmaps its memfds.
    func releaseMemory(_ s: AddressSpace) {
        do { _ = try s.engine.removeMappings(iova: 0, size: IOPageTable.iovaLimit) } catch {
            service.logger.critical("host '\(s.name)': removing its mappings failed: \(error)")
        }
        s.memory.close()
    }

    /// The host went (detached, disconnected, died, or misbehaved): its devices are told
    /// why and detached (incomplete groups answered INVALID), its mappings unmapped and
    /// synced, its ranges unregistered and its pending events read so that none of its
    /// threads waits for the service, and its descriptors closed. Never blocks.
    func teardownHost(_ s: AddressSpace, reason: String) {
        guard !s.closed else { return }
        s.closed = true
        let devices = s.devices
        s.devices = []
        for d in devices {
            let why = "its host '\(s.name)' went away: \(reason)"
            if let dp = d.peer {
                if dp.invalidation >= 0 && dp.minor >= 1 {
                    try? Sys.send(dp.invalidation, DetachNotice.message(reason: why), nonBlocking: true)
                }
                closePeer(dp, reason: "device \(d.deviceID) detached: \(why)", disconnected: true)
            } else {
                detach(d, reason: why)
            }
        }
        for case let b? in vhosts where b.space === s {
            closeVhost(b, reason: "detached: its host '\(s.name)' went away: \(reason)", fenced: false)
        }
        noteHostFaults(s)
        // A pin still on its worker touches the mappings and memory: its completion lets go of them.
        if !s.host!.pinInFlight { releaseMemory(s) }
        if s.uffdArmed {
            try? ring.prepareCancel(RingToken(kind: .hostSpaceEvent, slot: s.index, generation: s.id))
            s.uffdArmed = false
        }
        s.uffd.release(scratch: uffdBuffer)
        if s.index < hosts.count, hosts[s.index] === s { hosts[s.index] = nil }
        stats.endHost(s.id, reason: reason)
        service.logger.info("host '\(s.name)' (pid \(s.pid)) torn down: \(reason); \(devices.count) devices detached")
    }
}

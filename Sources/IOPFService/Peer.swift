// Peer.swift — peers in other processes: the listening socket, each connection's
// protocol state (HELLO, then a device's ATTACH, TRANSLATE, DETACH or a host's requests,
// HostPeer.swift, on the control socket; INVALIDATE acknowledgements on a device's
// invalidation socket), sending INVALIDATEs and fencing devices that miss their deadline.
// Runs on the loop thread (an extension of `EventLoop`).
//
// Every byte a peer sends is hostile. A message is received whole (SOCK_SEQPACKET) into
// the loop's buffer, its header and payload validated before use; descriptors a peer
// sends are closed and counted. A request that is wrong gets an error reply; a peer whose
// framing cannot be trusted, or that does not read what it is sent (a full socket), is
// disconnected alone. Sends never block; the loop never waits for a peer.

import Foundation
import Glibc
import IOPFCore
@_spi(SharedRings) import IOPFSystem
import IOPFWire

final class Peer {
    enum State { case greeting, ready, attached, closed }

    let index: Int
    let generation: UInt32
    let control: CInt
    /// The service's end of the invalidation socket, once attached.
    var invalidation: CInt = -1
    var state = State.greeting
    /// What the peer said it is in HELLO, and the minor version granted: a 1.0 peer gets
    /// no 1.1 behaviour (named ATTACH, the DETACH notice).
    var role = PeerRole.device
    var minor: UInt16 = 0
    /// A TRANSLATE being walked a few pages per turn (`advanceTranslations`): its request,
    /// the invalidation sequence read before the walk, and the entries so far.
    var translating: (id: UInt16, request: Translate, sequence: UInt64, entries: [UInt64])?
    /// A host's pinned DMA_MAP is on its worker: nothing more is read from it until it is answered.
    var pinning = false
    var device: AttachedDevice?
    /// A host's address space, once HOST was accepted.
    var space: AddressSpace?
    var provision: DeviceProvision?
    let pid: Int32
    let uid: UInt32
    /// When it connected: a peer still greeting `greetingTimeout` later is cut off.
    let connectedAt = ContinuousClock.now
    var controlArmed = false
    var invalidationArmed = false

    init(index: Int, generation: UInt32, control: CInt) {
        self.index = index
        self.generation = generation
        self.control = control
        (pid, uid) = Sys.peerCredentials(control) ?? (-1, .max)
    }

    var name: String { "peer \(index) (pid \(pid), uid \(uid))" }
}

/// Messages handled per peer per wake-up, so that one chatty peer cannot starve the rest.
private let messagesPerTurn = 16
/// TRANSLATE is weighed by its pages: a loop turn walks at most `translatePagesPerTurn`
/// pages for all peers together (a small TRANSLATE is answered at once while they last), the
/// rest `translatePagesPerVisit` at a time per peer in turn after that turn's fault responses
/// went out. A 512-page TRANSLATE takes several turns; its peer is not read meanwhile. So 16
/// peers keeping 512-page TRANSLATEs in flight cost each turn 16 walks, not 16 × 512, and a
/// device waiting for its page's answer does not wait behind them.
let translatePagesPerTurn = 16
let translatePagesPerVisit = 8

extension EventLoop {
    // MARK: Connections

    func acceptPeers() {
        guard let l = listener else { return }
        for _ in 0..<16 {
            let fd: CInt?
            do { fd = try Sys.accept(l.fd) } catch {
                service.logger.error("accept on \(l.path) failed: \(error)")
                break
            }
            guard let fd else { break }
            let live = peers.compactMap { $0 }
            var refusal: ProtocolErrorKind?
            if live.count >= service.configuration.maxPeers {
                refusal = .tooManyPeers
            } else if let uid = Sys.peerCredentials(fd)?.uid,
                live.count(where: { $0.uid == uid }) >= service.configuration.maxPeersPerUID
            {
                refusal = .tooManyPeersForUID
            }
            if let refusal {
                stats.protocolError(refusal)
                stats.refusedConnections[refusal, default: 0] += 1
                Sys.close(fd)
                continue
            }
            let index = peers.firstIndex { $0 == nil } ?? peers.count
            let p = Peer(index: index, generation: nextGeneration(), control: fd)
            if index == peers.count { peers.append(p) } else { peers[index] = p }
            stats.peersConnected += 1
            service.logger.info("\(p.name) connected")
            armControl(p)
        }
        do { try ring.preparePollIn(fd: l.fd, token: RingToken(kind: .listener)) } catch {
            service.logger.critical("cannot poll the listening socket: \(error)")
        }
    }

    func armControl(_ p: Peer) {
        guard p.state != .closed, !p.controlArmed else { return }
        do {
            try ring.preparePollIn(
                fd: p.control, token: RingToken(kind: .peerControl, slot: p.index, generation: p.generation))
            p.controlArmed = true
        } catch {
            closePeer(p, reason: "cannot poll its socket: \(error)", disconnected: true)
        }
    }

    private func armInvalidation(_ p: Peer) {
        guard p.state == .attached, !p.invalidationArmed else { return }
        do {
            try ring.preparePollIn(
                fd: p.invalidation, token: RingToken(kind: .peerInvalidation, slot: p.index, generation: p.generation))
            p.invalidationArmed = true
        } catch {
            closePeer(p, reason: "cannot poll its invalidation socket: \(error)", disconnected: true)
        }
    }

    /// Closes a connection and detaches its device. `disconnected`: the service sent it away.
    func closePeer(_ p: Peer, reason: String, disconnected: Bool) {
        guard p.state != .closed else { return }
        p.state = .closed
        if let s = p.space { teardownHost(s, reason: reason) }
        if let d = p.device {
            d.peer = nil
            detach(d, reason: reason)
            p.device = nil
        }
        if let provision = p.provision, let l = listener {
            l.provisioner.release(provision)
            p.provision = nil
        }
        if p.controlArmed {
            try? ring.prepareCancel(RingToken(kind: .peerControl, slot: p.index, generation: p.generation))
        }
        if p.invalidationArmed {
            try? ring.prepareCancel(RingToken(kind: .peerInvalidation, slot: p.index, generation: p.generation))
        }
        // Polls hold no buffers: the sockets can go now; stale completions are dropped by generation.
        Sys.close(p.control)
        if p.invalidation >= 0 { Sys.close(p.invalidation) }
        peers[p.index] = nil
        if disconnected { stats.peersDisconnected += 1 }
        service.logger.info("\(p.name) closed: \(reason)")
    }

    /// Disconnects peers that connected more than `greetingTimeout` ago and still have
    /// not said HELLO: a connection that only holds a slot must not keep others out.
    func sweepSilentPeers(now: ContinuousClock.Instant) {
        let limit = service.configuration.greetingTimeout
        for case let p? in peers where p.state == .greeting && now - p.connectedAt > limit {
            stats.protocolError(.greetingTimeout)
            stats.refusedConnections[.greetingTimeout, default: 0] += 1
            closePeer(p, reason: "no HELLO within \(limit)", disconnected: true)
        }
    }

    // MARK: Control socket

    func readControl(_ p: Peer) {
        for _ in 0..<messagesPerTurn where p.state != .closed {
            // Its TRANSLATE is still being walked, or its pin still pinned: the rest waits, in order.
            guard p.translating == nil && !p.pinning else { return }
            let got: Sys.Received
            do {
                got = try Sys.receive(p.control, into: messageBuffer, maxFDs: WireLimits.maxFDs, nonBlocking: true)
            } catch  where error.errno == .wouldBlock {
                break
            } catch {
                closePeer(p, reason: "receive failed: \(error)", disconnected: false)
                return
            }
            guard got.count > 0 else {
                closePeer(p, reason: "closed the connection", disconnected: false)
                return
            }
            let message = UnsafeRawBufferPointer(rebasing: messageBuffer[..<got.count])
            let fdsSent = !got.fds.isEmpty
            // Descriptors are owned here until a HOST request takes them.
            var fds = got.fds
            defer { for fd in fds { Sys.close(fd) } }
            if got.truncated || got.count > WireLimits.maxMessageBytes {
                refuse(
                    p, message, kind: .tooLarge, errno: WireErrno.messageSize,
                    """
                    message larger than \(WireLimits.maxMessageBytes) bytes or with more than \(WireLimits.maxFDs) \
                    descriptors
                    """
                )
                continue
            }
            let header: MessageHeader
            do {
                header = try MessageHeader(message: message)
            } catch {
                if case .unknownCommand = error {
                    refuse(p, message, kind: error.kind, errno: error.errno, error.description)
                    continue
                }
                stats.protocolError(error.kind)
                closePeer(p, reason: "sent a malformed message: \(error)", disconnected: true)
                return
            }
            let payload = UnsafeRawBufferPointer(rebasing: message[MessageHeader.byteCount...])
            if header.command == .host && !header.isReply && p.state == .ready && p.role == .host {
                declareHost(p, header, payload, fds: fds)
                fds = []
                continue
            }
            if header.command == .vhost && !header.isReply && p.state == .attached && p.role == .host {
                hostVhost(p, header, payload, fds: fds)
                fds = []
                continue
            }
            if header.command == .dirtyRead && !header.isReply && p.state == .attached && p.role == .host
                && p.minor >= 2
            {
                hostDirtyRead(p, header, payload, fds: fds)
                fds = []
                continue
            }
            if header.command == .dmaUnmap && !header.isReply && p.state == .attached && p.role == .host {
                hostUnmap(p, header, payload, fds: fds)
                fds = []
                continue
            }
            if fdsSent {
                refuse(
                    p, message, kind: .unexpectedFDs, errno: WireErrno.invalid,
                    "\(header.command) carries no descriptors")
                continue
            }
            if header.isReply || header.command == .invalidate {
                refuse(
                    p, message, kind: .badState, errno: WireErrno.protocolError,
                    "\(header.command) \(header.isReply ? "reply" : "request") is not allowed on the control socket")
                continue
            }
            handleRequest(p, header, payload)
        }
        armControl(p)
    }

    private func handleRequest(_ p: Peer, _ header: MessageHeader, _ payload: UnsafeRawBufferPointer) {
        do throws(WireError) {
            switch (header.command, p.state) {
            case (.hello, .greeting):
                let hello = try Hello(payload: payload)
                guard hello.major == WireVersion.major else {
                    stats.protocolError(.badVersion)
                    reply(
                        p,
                        Wire.errorReply(
                            command: .hello, id: header.id, errno: WireErrno.notSupported,
                            text:
                                """
                                protocol major \(hello.major) is not supported; this service speaks \
                                \(WireVersion.major).\(WireVersion.minor)
                                """
                        ))
                    closePeer(p, reason: "asked for protocol major \(hello.major)", disconnected: true)
                    return
                }
                if hello.role == .host && hello.minor < 1 {
                    stats.protocolError(.badVersion)
                    reply(
                        p,
                        Wire.errorReply(
                            command: .hello, id: header.id, errno: WireErrno.notSupported,
                            text: "the host role needs protocol 1.1 or later; HELLO proposed 1.\(hello.minor)"))
                    return
                }
                p.role = hello.role
                p.state = .ready
                let granted = HelloReply(
                    major: WireVersion.major, minor: min(hello.minor, WireVersion.minor),
                    capabilities: hello.capabilities.intersection(.all))
                p.minor = granted.minor
                reply(p, granted.message(id: header.id, flags: .reply))
            case (.attach, .ready) where p.role == .device:
                attach(p, header, try Attach(payload: payload))
            case (.translate, .attached) where p.role == .device:
                translate(p, header, try Translate(payload: payload))
            case (.dmaMap, .attached) where p.role == .host:
                hostMap(p, header, try DMAMapRequest(payload: payload))
            case (.dirtyStart, .attached) where p.role == .host && p.minor >= 2:
                hostDirtyStart(p, header, try DirtyStartRequest(payload: payload))
            case (.dirtyStop, .attached) where p.role == .host && p.minor >= 2:
                hostDirtyStop(p, header, try DirtyStopRequest(payload: payload))
            case (let c, _) where [.dirtyStart, .dirtyStop, .dirtyRead].contains(c) && p.role == .host && p.minor < 2:
                stats.protocolError(.badState)
                reply(
                    p,
                    Wire.errorReply(
                        command: header.command, id: header.id, errno: WireErrno.notSupported,
                        text: "\(header.command) needs protocol 1.2; HELLO agreed 1.\(p.minor)"))
            case (.sync, .attached) where p.role == .host:
                try Wire.expectSize(.sync, payload, 0)
                hostSync(p, header)
            case (.detach, .attached), (.detach, .ready):
                _ = try Empty(payload: payload)
                if let s = p.space { teardownHost(s, reason: "the host detached") }
                reply(p, Wire.message(command: .detach, id: header.id, flags: .reply))
                closePeer(p, reason: "detached", disconnected: false)
            default:
                let expected =
                    switch (p.state, p.role) {
                    case (.greeting, _): "HELLO"
                    case (.ready, .device): "ATTACH or DETACH"
                    case (.ready, .host): "HOST or DETACH"
                    case (_, .device): "TRANSLATE or DETACH"
                    case (_, .host): "DMA_MAP, DMA_UNMAP, SYNC, VHOST, DIRTY_START, DIRTY_STOP, DIRTY_READ or DETACH"
                    }
                stats.protocolError(.badState)
                reply(
                    p,
                    Wire.errorReply(
                        command: header.command, id: header.id, errno: WireErrno.protocolError,
                        text: "\(header.command) is not allowed now: expected \(expected)"))
            }
        } catch {
            stats.protocolError(error.kind)
            reply(
                p, Wire.errorReply(command: header.command, id: header.id, errno: error.errno, text: error.description))
        }
    }

    /// An error reply to a message whose header may not have decoded.
    private func refuse(
        _ p: Peer, _ message: UnsafeRawBufferPointer, kind: ProtocolErrorKind, errno: UInt32, _ text: String
    ) {
        stats.protocolError(kind)
        let (id, rawCommand) = peekMessageID(message) ?? (0, 0)
        // The reply names the command as received when it is one; unknown ones answer as HELLO.
        let command = Command(rawValue: rawCommand) ?? .hello
        reply(p, Wire.errorReply(command: command, id: id, errno: errno, text: text))
    }

    /// Sends without blocking; a peer whose socket is full is not reading and goes.
    func reply(_ p: Peer, _ bytes: [UInt8], fds: [CInt] = []) {
        guard p.state != .closed else { return }
        do {
            try Sys.send(p.control, bytes, fds: fds, nonBlocking: true)
        } catch {
            if error.errno == .wouldBlock { stats.protocolError(.slowReader) }
            closePeer(p, reason: "cannot send to it: \(error)", disconnected: true)
        }
    }

    private func attach(_ p: Peer, _ header: MessageHeader, _ request: Attach) {
        guard let l = listener else { return }
        // Device ids are unique per address space: two hosts' devices may share one.
        var space: AddressSpace?
        if request.addressSpaceName != nil && p.minor < 1 {
            stats.protocolError(.badState)
            let why = "ATTACH to a named address space needs protocol 1.1; HELLO negotiated 1.\(p.minor)"
            reply(p, Wire.errorReply(command: .attach, id: header.id, errno: WireErrno.protocolError, text: why))
            return
        }
        if let name = request.addressSpaceName {
            switch addressSpace(named: name, for: p) {
            case .success(let s): space = s
            case .failure(let refusal):
                stats.protocolError(refusal.kind)
                reply(
                    p,
                    Wire.errorReply(
                        command: .attach, id: header.id, errno: refusal.errno,
                        text: refusal.description))
                return
            }
        }
        if registry.byGeneration.values.contains(where: {
            $0.deviceID == request.deviceID && $0.pasid == request.pasid && $0.space === (space ?? own)
        }) {
            reply(
                p,
                Wire.errorReply(
                    command: .attach, id: header.id, errno: WireErrno.exists,
                    text: "device \(request.deviceID) is already attached"))
            return
        }
        let provision: DeviceProvision
        if let space {
            let windows = space.engine.mappingList.prefix(WireLimits.maxWindows).map {
                DMAWindow(
                    iova: $0.iova, size: $0.size,
                    prot: ($0.prot.contains(.read) ? 1 : 0) | ($0.prot.contains(.write) ? 2 : 0))
            }
            provision = DeviceProvision(domain: space.domain, windows: Array(windows), regions: [])
        } else {
            do {
                provision = try l.provisioner.provision(deviceID: request.deviceID, pasid: request.pasid)
            } catch {
                reply(p, Wire.errorReply(command: .attach, id: header.id, errno: WireErrno.noSpace, text: "\(error)"))
                return
            }
        }
        let release = { if space == nil { l.provisioner.release(provision) } }
        var made: (any FaultTransport, DeviceChannelEnds)?
        var invalidationPair: (CInt, CInt)?
        do {
            made = request.wantsStream ? try StreamTransport.make(.socket) : try SharedRingTransport.make()
            invalidationPair = try Sys.seqpacketPair()
        } catch {
            if let made { made.0.close(); made.1.close() }
            release()
            reply(
                p,
                Wire.errorReply(command: .attach, id: header.id, errno: UInt32(error.errno.rawValue), text: "\(error)"))
            return
        }
        let (transport, ends) = made!
        let (serviceEnd, deviceEnd) = invalidationPair!
        let regions = space?.memory.deviceRegions ?? provision.regions.compactMap { r in r.info.map { ($0, r.fd) } }
        let answer = AttachReply(
            credit: request.credit, channel: request.wantsStream ? .stream : .sharedRing,
            invalidateTimeoutMs: UInt32(service.configuration.invalidateTimeout.milliseconds),
            ringEntries: request.wantsStream ? 0 : UInt32(SharedQueue.capacity),
            windows: provision.windows, regions: regions.map(\.0))
        p.invalidation = serviceEnd
        if space == nil { p.provision = provision }
        do {
            // A host's devices may fault anywhere in its space: its mappings change after they attach.
            let d = try addDevice(
                deviceID: request.deviceID, pasid: request.pasid, domain: provision.domain,
                credit: Int(request.credit), transport: transport, windows: space == nil ? provision.windows : [],
                space: space)
            d.peer = p
            p.device = d
            p.state = .attached
            fences.add(
                device: d.generation, domain: SyncDomain(space: d.space.id, domain: d.domain),
                pasid: request.pasid)
        } catch {
            transport.close()
            ends.close()
            Sys.close(deviceEnd)
            closePeer(p, reason: "cannot attach: \(error)", disconnected: true)
            return
        }
        reply(p, answer.message(id: header.id, flags: .reply), fds: [deviceEnd] + ends.fds + regions.map(\.1))
        // The device has its own copies now (or is gone).
        Sys.close(deviceEnd)
        ends.close()
        guard p.state == .attached, let d = p.device else { return }
        stats.externalDevices += 1
        armInvalidation(p)
        if let space { stats.host(space.id) { $0.devices += 1 } }
        service.logger.info(
            """
            device \(d.deviceID) attached from \(p.name)\(space.map { " to host \($0.name)" } ?? ""): \
            \(provision.windows.count) windows, \(regions.count) regions, \
            \(request.wantsStream ? "stream" : "shared ring") channel, credit \(request.credit)
            """
        )
    }

    /// Starts a TRANSLATE: walked at once as far as this turn's budget goes, the rest by
    /// `advanceTranslations` in later turns, and answered when every page is walked.
    private func translate(_ p: Peer, _ header: MessageHeader, _ request: Translate) {
        guard let d = p.device else { return }
        // Read before the walk: any unmap the walk missed is posted with a higher sequence.
        var entries: [UInt64] = []
        entries.reserveCapacity(Int(request.pages))
        p.translating = (header.id, request, fences.lastPosted(device: d.generation), entries)
        if translateBudget > 0 && walk(p, pages: min(Int(request.pages), translateBudget)) { return }
        translators.append(p)
    }

    /// Walks the TRANSLATEs in progress, a few pages per peer in turn, while this turn's
    /// budget lasts; those finished are answered and their peers read again.
    func advanceTranslations() {
        var k = translateCursor
        while translateBudget > 0 && !translators.isEmpty {
            k %= translators.count
            let p = translators[k]
            if p.translating == nil || walk(p, pages: min(translatePagesPerVisit, translateBudget)) {
                translators.remove(at: k)
                if p.state != .closed { armControl(p) }
            } else {
                k += 1
            }
        }
        // The next turn starts with the peer after the last one served.
        translateCursor = translators.isEmpty ? 0 : k % translators.count
    }

    /// Walks up to `pages` more pages of `p`'s TRANSLATE and answers it once complete.
    /// Returns whether it is done (answered, or dropped with its peer).
    private func walk(_ p: Peer, pages: Int) -> Bool {
        guard p.state == .attached, let d = p.device, var t = p.translating else {
            p.translating = nil
            return true
        }
        p.translating = nil  // one owner of the entries while they grow
        let table = d.engine.pageTable(d.domain)
        let end = min(Int(t.request.pages), t.entries.count + pages)
        translateBudget -= end - t.entries.count
        for i in t.entries.count..<end {
            let iova = t.request.iova + UInt64(i) << 12
            guard d.inWindows(iova), let x = table.translate(iova) else {
                t.entries.append(0)
                continue
            }
            t.entries.append(
                x.phys & ~0xFFF | (x.prot.contains(.read) ? TranslateReply.read : 0)
                    | (x.prot.contains(.write) ? TranslateReply.write : 0))
        }
        guard t.entries.count == Int(t.request.pages) else {
            p.translating = t
            return false
        }
        reply(p, TranslateReply(sequence: t.sequence, entries: t.entries).message(id: t.id, flags: .reply))
        return true
    }

    // MARK: Invalidation socket

    func readAcknowledgements(_ p: Peer) {
        guard let d = p.device else { return }
        for _ in 0..<(4 * messagesPerTurn) where p.state == .attached {
            let got: Sys.Received
            do {
                got = try Sys.receive(p.invalidation, into: messageBuffer, maxFDs: WireLimits.maxFDs, nonBlocking: true)
            } catch  where error.errno == .wouldBlock {
                break
            } catch {
                closePeer(p, reason: "receive on the invalidation socket failed: \(error)", disconnected: false)
                return
            }
            guard got.count > 0 else {
                closePeer(p, reason: "closed its invalidation socket", disconnected: false)
                return
            }
            for fd in got.fds { Sys.close(fd) }
            if !got.fds.isEmpty { stats.protocolError(.unexpectedFDs) }
            let message = UnsafeRawBufferPointer(rebasing: messageBuffer[..<got.count])
            guard !got.truncated, let header = try? MessageHeader(message: message), header.command == .invalidate,
                header.isReply, !header.isError,
                let ack = try? InvalidateAck(
                    payload: UnsafeRawBufferPointer(rebasing: message[MessageHeader.byteCount...]))
            else {
                stats.protocolError(.badAck)
                closePeer(
                    p, reason: "sent something other than an INVALIDATE acknowledgement on its invalidation socket",
                    disconnected: true)
                return
            }
            if fences.acknowledge(device: d.generation, sequence: ack.sequence) {
                stats.invalidationsAcked += 1
            } else {
                stats.protocolError(.unknownAck)
            }
        }
        armInvalidation(p)
    }

    /// Sends the INVALIDATEs the engine's syncs posted, and fences every device past its
    /// deadline: detached, pending groups answered INVALID, disconnected.
    func serveExternalDevices() {
        if fences.pending.load(ordering: .acquiring) {
            for (generation, message) in fences.takeOutbox() {
                if let b = vhostByGeneration[generation] {
                    sendVhostInvalidation(b, message)
                    continue
                }
                guard let d = registry.byGeneration[generation], let p = d.peer, p.state == .attached else { continue }
                do {
                    try Sys.send(
                        p.invalidation, message.message(id: UInt16(truncatingIfNeeded: message.sequence)),
                        nonBlocking: true)
                    stats.invalidationsSent += 1
                } catch  where error.errno == .brokenPipe || error.errno == .connectionReset {
                    // The device closed its end (it exited, or was killed): a departure, not misbehaviour.
                    closePeer(
                        p, reason: "device \(d.deviceID) went away (INVALIDATE \(message.sequence): \(error))",
                        disconnected: false)
                } catch {
                    stats.protocolError(error.errno == .wouldBlock ? .slowReader : .invalidationSocket)
                    stats.devicesFenced += 1
                    closePeer(
                        p, reason: "device \(d.deviceID) fenced: cannot send INVALIDATE \(message.sequence): \(error)",
                        disconnected: true)
                }
            }
        }
        guard !vhostByGeneration.isEmpty || (!registry.byGeneration.isEmpty && !peers.isEmpty) else { return }
        for generation in fences.overdue(at: .now) {
            if let b = vhostByGeneration[generation] {
                stats.protocolError(.invalidateTimeout)
                closeVhost(
                    b, reason: "fenced: no acknowledgement within \(service.configuration.invalidateTimeout)",
                    fenced: true)
                continue
            }
            guard let d = registry.byGeneration[generation], let p = d.peer else {
                fences.remove(device: generation)
                continue
            }
            stats.protocolError(.invalidateTimeout)
            stats.devicesFenced += 1
            closePeer(
                p,
                reason:
                    "device \(d.deviceID) fenced: no acknowledgement within \(service.configuration.invalidateTimeout)",
                disconnected: true)
        }
    }
}

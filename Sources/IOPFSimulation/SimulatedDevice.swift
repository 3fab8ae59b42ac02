// SimulatedDevice.swift — an SVA-capable device model built on the device API
// (IOPFDevice): a thread with an IOTLB that runs a DMA workload against its IOVA range,
// and really reads and writes host memory through the translations the service gave it,
// into its own mapping of the service's memory regions.
//
// - A miss translates: an in-process device walks the service's I/O page table in shared
//   memory; a device in another process sends TRANSLATE (ATS-like) over its socket.
// - A page that is not present sends a page request group (one request per missing
//   page, the last flagged LAST_PAGE) and stalls until the answer: SUCCESS retries the
//   access, INVALID counts a DMA error.
// - The IOTLB lock is held across lookup, walk and access, and an IOTLB sync takes the
//   same lock: when a sync returns, no access that used a dropped translation is still
//   in flight, and no walk that raced the unmap can insert a stale entry afterwards.
// - Each page's first 8 bytes hold the last value this device wrote there; reads compare
//   with a shadow copy, so a wrong translation shows up as wrong data.
//
// IOVA ranges are `[iovaBase, iovaBase + pages * 4 KiB)`.

import Foundation
import Histogram
import IOPFCore
import IOPFDevice
import IOPFService
import IOPFSystem
import Synchronization

package enum Workload: String, Sendable, CaseIterable {
    case sequential, random, zipf
}

/// Where a device's translations come from.
package enum Translator: @unchecked Sendable {
    /// Walk the service's page table (in-process devices; IOTLB syncs are synchronous).
    case pageTable(IOPageTable)
    /// TRANSLATE requests over the device socket (devices in other processes).
    case remote(DeviceClient)
}

package struct DeviceConfiguration: Sendable {
    package var deviceID: UInt32
    /// A CPU this device's thread keeps off (the service thread's, `ServiceConfiguration.loopCPU`).
    package var avoidCPU: Int?
    package var pasid: UInt32?
    package var iovaBase: UInt64
    package var pages: Int
    /// Host address behind `iovaBase`, for the host change window (nil: not known, as for
    /// a device in another process). DMA never uses it.
    package var hostBase: UInt64?
    /// Physical address behind `iovaBase`, when the device knows its layout: walks are
    /// checked against it, and host memory is verified at the end.
    package var physBase: UInt64?
    package var workload = Workload.random
    package var iotlbEntries = 64
    /// Pages per DMA burst, at most (exactly, with `fixedBurst`).
    package var burst = 4
    package var fixedBurst = false
    /// Bursts that may wait on page requests at once (PRI lets a device keep requests
    /// outstanding up to its credit); 1: each burst waits for its answer.
    package var outstanding = 1
    /// Page requests the service granted this device (ATTACH credit): the pages of the
    /// waiting bursts plus the next burst stay within it.
    package var credit = 32
    /// Starts at most this many bursts per second, sleeping when ahead (a device whose
    /// DMA engine has a rate, as hardware does); nil: as fast as the CPU allows.
    package var burstsPerSecond: Double?
    /// Runs the device's thread at idle priority (SCHED_IDLE), so that it never takes a
    /// CPU the service wants, as a hardware device does not; its waits for answers then
    /// spin without yielding.
    package var idlePriority = false
    /// Bytes each access moves: 8 (a tagged word) up to 4096 (the whole page, for
    /// throughput); the first 8 bytes always carry the checked tag.
    package var bytesPerAccess = 8
    /// The memory is a host's (`iopf host`): every page carries its IOVA's tag in its last
    /// 8 bytes (HostSession.swift), checked on every access; 0 (a freed page) passes.
    package var checkHostTags = false
    package var writePercent = 50
    package var seed: UInt64 = 1
    /// How long the device busy-polls for an answer before sleeping.
    package var spinNanoseconds: Int64 = 200_000
    /// The host may drop or move pages under the device (see `DeviceIOTLB`).
    package var hostMayChangeMemory = false
    /// Stop after this many operations (nil: until stopped).
    package var operationLimit: Int?
    /// Where the device records the pages it writes, per round of the dirty log.
    package var dirtyLedger: DirtyLedger?
    /// With a ledger: write at most this many pages per round of the dirty log, then
    /// wait for the next round (a device dirtying a set share of memory per round).
    package var writesPerRound: Int?

    /// The credit a device asks for to keep `outstanding` bursts of up to `burst` pages
    /// waiting: the default 32, or more, up to what a shared ring holds (256).
    package static func credit(outstanding: Int, burst: Int) -> Int {
        min(max(32, outstanding * burst), SharedRingLayout.entries)
    }

    package init(deviceID: UInt32, iovaBase: UInt64, pages: Int, hostBase: UInt64? = nil, physBase: UInt64? = nil) {
        self.deviceID = deviceID
        self.iovaBase = iovaBase
        self.pages = pages
        self.hostBase = hostBase
        self.physBase = physBase
    }
}

package struct DeviceReport: Sendable {
    package var deviceID: UInt32
    package var dmaOps = 0
    package var dmaErrors = 0
    package var faults = 0
    package var groups = 0
    package var success = 0
    package var invalid = 0
    /// Reads that did not return what this device last wrote there.
    package var integrityErrors = 0
    /// Walks that returned another page than the one the device's mapping holds.
    package var wrongTranslations = 0
    /// Uses of an IOTLB entry after a sync covering it (see TranslationAudit).
    package var staleTranslations = 0
    /// Translations checked (each walk and each audited use).
    package var checks = 0
    /// Responses for a cookie this device was not waiting for, or a closed channel mid-wait.
    package var protocolErrors = 0
    /// TRANSLATE round trips (remote devices), and replies dropped as older than an
    /// INVALIDATE already processed.
    package var translations = 0
    package var staleReplies = 0
    /// DMA through a translation that named no memory this device was given.
    package var outsideMemory = 0
    package var firstProblems: [String] = []
    /// When the first DMA operation completed without error.
    package var firstCompletion: ContinuousClock.Instant?
    package var bytesMoved = 0
    /// From sending a group to taking its answer: includes what this device's thread
    /// took to look (a CPU it had to wait for), which a hardware device does not have.
    package var latency = Histogram<UInt64>.nanoseconds()
    /// From sending a group to the service publishing its answer (the shared ring's
    /// "answered at" stamp): the latency as a hardware device would see it. Empty on a
    /// stream channel, which carries no stamp.
    package var answerLatency = Histogram<UInt64>.nanoseconds()
}

package final class SimulatedDevice: @unchecked Sendable {
    package let configuration: DeviceConfiguration
    package let iotlb: DeviceIOTLB
    let channel: DeviceChannel
    let memory: DeviceMemory
    let translator: Translator
    let window: HostChangeWindow?
    let audit: TranslationAudit?
    private let stopFlag = Atomic<Bool>(false)
    private let finished = Atomic<Bool>(false)
    private let done = DispatchSemaphore(value: 0)
    private var report: DeviceReport
    private var rng: Xoshiro
    private var cookie: UInt32 = 0
    private var groupIndex: UInt32 = 0
    private var sequentialNext = 0
    private var version: UInt64 = 0
    private let zipf: ZipfSampler?
    private var dirtyWriter: DirtyWriter?
    /// Bursts waiting on a page request, oldest first, and the pages they asked for.
    private var stalled: [Burst] = []
    private var stalledPages = 0

    package init(
        configuration: DeviceConfiguration, channel: DeviceChannel, memory: DeviceMemory, translator: Translator,
        window: HostChangeWindow? = nil, audit: TranslationAudit? = nil
    ) {
        self.audit = audit
        precondition(
            configuration.pages > 0 && configuration.burst > 0, "a device needs pages and a burst of at least 1")
        precondition(
            configuration.outstanding >= 1 && configuration.burst <= configuration.credit,
            "a device needs at least one burst in flight and a burst within its credit")
        self.configuration = configuration
        self.channel = channel
        self.memory = memory
        self.translator = translator
        self.window = window
        iotlb = DeviceIOTLB(
            entries: configuration.iotlbEntries, iovaBase: configuration.iovaBase,
            pages: configuration.pages, forgetOnInvalidate: configuration.hostMayChangeMemory)
        report = DeviceReport(deviceID: configuration.deviceID)
        rng = Xoshiro(seed: configuration.seed)
        zipf = configuration.workload == .zipf ? ZipfSampler(count: configuration.pages, exponent: 1.1) : nil
        dirtyWriter = configuration.dirtyLedger.map { DirtyWriter(ledger: $0, deviceIOVABase: configuration.iovaBase) }
        channel.wantsAnswerStamps = true  // for `answerLatency`
    }

    /// Runs the workload on a thread of its own.
    package func start() {
        let thread = Thread { [self] in
            if let cpu = configuration.avoidCPU { try? Sys.setCPUAffinity(cpu, only: false) }
            if configuration.idlePriority, (try? Sys.setIdlePriority()) != nil { channel.yields = false }
            runWorkload()
            markFinished()
        }
        thread.name = "iopf-device-\(configuration.deviceID)"
        thread.start()
    }

    package func stop() { stopFlag.store(true, ordering: .relaxed) }

    /// True once the workload has ended (operation limit reached or stopped).
    package var isFinished: Bool { finished.load(ordering: .acquiring) }

    /// Stops the workload, waits for it to end, closes the fault channel (the service sees
    /// the device go) and returns the device's report.
    package func finish() -> DeviceReport {
        let r = stopWorkload()
        channel.close()
        return r
    }

    /// Stops the workload and waits for it to end, leaving the channel open (a device in
    /// another process detaches first).
    package func stopWorkload() -> DeviceReport {
        stop()
        done.wait()
        done.signal()
        return report
    }

    /// Starts bursts while fewer than `outstanding` wait on page requests (and their pages
    /// fit the credit), and takes answers as they come: a waiting burst resumes where it
    /// stalled. With `outstanding` 1 a burst waits for its answer before the next starts.
    private func runWorkload() {
        while true {
            switch step() {
            case .progressed: continue
            case .ended: return
            case .due(let at):
                let ahead = at - .now
                if ahead > .microseconds(100) { Thread.sleep(forTimeInterval: ahead.seconds) }
            case .waiting:
                guard takeAnswers(wait: true) else {
                    _ = finishWorkload()
                    return
                }
            }
        }
    }

    /// What one `step` did, or what the device waits for.
    enum Step {
        /// Took answers or started a burst.
        case progressed
        /// Bursts wait on answers, and no other may start.
        case waiting
        /// Paced: nothing waits, and the next burst is due then.
        case due(ContinuousClock.Instant)
        /// Stopped (or the channel is gone) with nothing in flight.
        case ended
    }

    /// Bursts start on a schedule (`burstsPerSecond`); this is when the next one is due.
    private var nextDue: ContinuousClock.Instant?

    /// One step of the workload, without waiting: takes the answers that are in (resuming
    /// their bursts), then starts a burst if one may start and is due.
    func step() -> Step {
        if !answered.isEmpty || !stalled.isEmpty, !takeAnswers(wait: false) { return finishWorkload() }
        let stopping =
            stopFlag.load(ordering: .relaxed)
            || configuration.operationLimit.map { report.dmaOps >= $0 } ?? false
        guard !stopping else { return stalled.isEmpty ? finishWorkload() : .waiting }
        let mayStart =
            stalled.count < configuration.outstanding
            && stalledPages + configuration.burst <= configuration.credit
        guard mayStart else { return .waiting }
        if let rate = configuration.burstsPerSecond {
            // A burst starts when due or less than 100 µs before (sleeping costs a wake-up);
            // a device behind its schedule (its faults took time) starts over from now
            // rather than catch up with bursts back to back.
            let now = ContinuousClock.now
            let due = nextDue ?? now
            if due - now > .microseconds(100) { return stalled.isEmpty ? .due(due) : .waiting }
            nextDue = max(due, now) + .nanoseconds(Int64(1e9 / rate))
        }
        let burst = configuration.fixedBurst ? configuration.burst : 1 + Int(rng.next() % UInt64(configuration.burst))
        let count = min(burst, configuration.pages)
        let first = min(nextPage(advance: count), configuration.pages - count)
        let write = Int(rng.next() % 100) < configuration.writePercent
        if dirtyWriter != nil { waitForRoundIfQuotaSpent() }
        report.dmaOps += 1
        guard dma(Burst(pages: Array(first..<(first + count)), write: write)) else { return finishWorkload() }
        return .progressed
    }

    private func finishWorkload() -> Step {
        dirtyWriter?.finish()
        return .ended
    }

    /// Marks the workload ended: `finish` and `stopWorkload` return.
    private func markFinished() {
        finished.store(true, ordering: .releasing)
        done.signal()
    }

    /// Runs several devices' workloads on one thread, a step of each in turn, never
    /// waiting while one of them has bursts in flight (answers are polled: a device
    /// waiting for its answer does not stop the others, as hardware devices do not stop
    /// each other). Sleeps only when every device is paced ahead of its schedule.
    /// Devices with a dirty-log quota (`writesPerRound`) wait for rounds: give them a thread
    /// each (`start`).
    package static func startShared(_ devices: [SimulatedDevice], idlePriority: Bool, avoidCPU: Int?, name: String) {
        precondition(
            devices.allSatisfy { $0.configuration.writesPerRound == nil },
            "a device waiting for dirty-log rounds needs its own thread")
        let thread = Thread {
            if let cpu = avoidCPU { try? Sys.setCPUAffinity(cpu, only: false) }
            let idle = idlePriority && (try? Sys.setIdlePriority()) != nil
            var live = devices
            while !live.isEmpty {
                var progressed = false
                var waiting = false
                var earliest: ContinuousClock.Instant?
                var i = 0
                while i < live.count {
                    switch live[i].step() {
                    case .progressed: progressed = true
                    case .waiting: waiting = true
                    case .due(let at): earliest = min(earliest ?? at, at)
                    case .ended:
                        live[i].markFinished()
                        live.remove(at: i)
                        continue
                    }
                    i += 1
                    for d in live { d.peekAnswers() }
                }
                if progressed { continue }
                if !waiting, let at = earliest {
                    let ahead = at - .now
                    if ahead > .microseconds(100) { Thread.sleep(forTimeInterval: ahead.seconds) }
                } else if !idle {
                    sched_yield()  // polling at normal priority: let the service run
                }
            }
        }
        thread.name = name
        thread.start()
    }

    /// Takes the answers that arrived (waiting for at least one with `wait`) and resumes
    /// their bursts. False when the channel is gone and the device must stop.
    private func takeAnswers(wait: Bool) -> Bool {
        collectAnswers(wait: wait) && resumeAnswered()
    }

    /// Bursts whose answers are in (SUCCESS), in order, not yet resumed.
    private var answered: [Burst] = []
    /// The answers of the last receive (one array, reused: no allocation per answer).
    private var responses: [PageResponse] = []
    /// The records of the group being sent (reused likewise).
    private var outgoing: [PageRequest] = []

    /// Takes the answers that arrived (waiting for at least one with `wait`): records
    /// their latency, and moves the bursts they answer to `answered`. False when the
    /// channel is gone and the device must stop.
    private func collectAnswers(wait: Bool) -> Bool {
        do {
            guard
                wait
                    ? try channel.receive(into: &responses, spinNanoseconds: configuration.spinNanoseconds)
                    : try channel.poll(into: &responses)
            else { return false }
        } catch {
            if !stopFlag.load(ordering: .relaxed) { problem("channel failed: \(error)") }
            return false
        }
        if responses.isEmpty { return true }
        let now = Sys.monotonicNanoseconds()
        let answeredAt = channel.answeredAt
        for r in responses {
            guard let i = stalled.firstIndex(where: { $0.cookie == r.cookie }) else {
                report.protocolErrors += 1
                problem("response for cookie \(r.cookie), which no burst waits for")
                continue
            }
            var burst = stalled.remove(at: i)
            stalledPages -= burst.pages.count
            report.latency.record(now &- burst.sentAt)
            if answeredAt >= burst.sentAt { report.answerLatency.record(answeredAt - burst.sentAt) }
            if r.code == .success { report.success += 1 } else { report.invalid += 1 }
            guard r.code == .success else {
                report.dmaErrors += 1
                continue
            }
            burst.cookie = 0
            answered.append(burst)
        }
        return true
    }

    private func resumeAnswered() -> Bool {
        while !answered.isEmpty {
            guard dma(answered.removeFirst()) else { return false }
        }
        return true
    }

    /// With bursts in flight on a shared ring: takes the answers that are in, without a
    /// system call (the shared runner looks after each device's step, so that an answer
    /// is seen when it comes rather than when the device's turn does).
    fileprivate func peekAnswers() {
        if !stalled.isEmpty, channel.isShared { _ = collectAnswers(wait: false) }
    }

    /// With `writesPerRound`: once this round's writes are done, waits for the next round.
    private func waitForRoundIfQuotaSpent() {
        dirtyWriter!.catchUp()
        guard let quota = configuration.writesPerRound else { return }
        if dirtyWriter!.writesThisEpoch >= quota {
            let epoch = dirtyWriter!.epoch
            while dirtyWriter!.ledger.epoch == epoch && !stopFlag.load(ordering: .relaxed) { usleep(100) }
            dirtyWriter!.catchUp()
        }
    }

    private func nextPage(advance: Int) -> Int {
        switch configuration.workload {
        case .sequential:
            defer { sequentialNext = (sequentialNext + advance) % configuration.pages }
            return sequentialNext
        case .random:
            return Int(rng.next() % UInt64(configuration.pages))
        case .zipf:
            return zipf!.sample(&rng)
        }
    }

    /// A DMA burst: the pages it has still to access, and the page request it waits on.
    struct Burst {
        var pages: [Int]
        var write: Bool
        var attempts = 0
        var errorsBefore = 0
        var cookie: UInt32 = 0
        /// When the group went out (`Sys.monotonicNanoseconds`, the clock of the service's
        /// "answered at" stamp).
        var sentAt: UInt64 = 0
    }

    /// Accesses the burst's pages; the ones not present go out in one page request group
    /// and the burst waits in `stalled` for its answer. False when the channel is gone.
    private func dma(_ burst: Burst) -> Bool {
        var burst = burst
        if burst.attempts == 0 { burst.errorsBefore = report.dmaErrors }
        var missing: [Int] = []
        var denied = false
        for p in burst.pages {
            switch access(page: p, write: burst.write) {
            case .done: break
            case .notPresent: missing.append(p)
            case .denied: denied = true
            case .gone: return false
            }
        }
        if denied {
            report.dmaErrors += 1
            return true
        }
        guard !missing.isEmpty else {
            if report.firstCompletion == nil && report.dmaErrors == burst.errorsBefore { report.firstCompletion = .now }
            return true
        }
        burst.attempts += 1
        if burst.attempts > 1000 {  // the service keeps answering SUCCESS without mapping
            report.dmaErrors += 1
            problem("pages \(missing) still not present after 1000 SUCCESS answers")
            return true
        }
        burst.pages = missing
        burst.sentAt = Sys.monotonicNanoseconds()  // before it goes out: latencies err long
        guard let cookie = sendPageRequest(missing, write: burst.write) else { return false }
        burst.cookie = cookie
        stalled.append(burst)
        stalledPages += missing.count
        return true
    }

    private enum AccessResult { case done, notPresent, denied, gone }

    /// Translates and accesses one page under the IOTLB lock (see the file header). A
    /// remote translation is fetched without the lock, then filled under it only if no
    /// INVALIDATE newer than the reply was processed meanwhile.
    private func access(page p: Int, write: Bool) -> AccessResult {
        let iova = configuration.iovaBase + UInt64(p) << 12
        let vpn = iova >> 12
        var fetched: (entry: UInt64, sequence: UInt64)?
        while true {
            let result = iotlb.state.withLock { (s: inout DeviceIOTLB.State) -> AccessResult? in
                let i = Int(truncatingIfNeeded: vpn) % s.slots.count
                if s.slots[i].page == vpn, let audit {
                    report.checks += 1
                    if audit.isStale(iova: iova, filled: s.slots[i].filled) {
                        report.staleTranslations += 1
                        problem(
                            """
                            used the translation of iova \(hex(iova)) filled at epoch \(s.slots[i].filled) after a \
                            sync covered it
                            """
                        )
                        s.slots[i] = DeviceIOTLB.Entry()
                    }
                }
                if s.slots[i].page != vpn {
                    let t: (phys: UInt64, prot: Protection)
                    switch translator {
                    case .pageTable(let table):
                        let filled = audit?.current ?? 0
                        guard let walk = table.translate(iova) else { return .notPresent }
                        t = (walk.phys & ~0xFFF, walk.prot)
                        s.slots[i] = DeviceIOTLB.Entry(page: vpn, phys: t.phys, prot: t.prot, filled: filled)
                    case .remote:
                        guard let f = fetched else { return nil }  // fetch without the lock
                        fetched = nil
                        guard f.sequence >= s.invalidationSequence else {
                            report.staleReplies += 1
                            return nil  // an INVALIDATE overtook the reply: ask again
                        }
                        guard f.entry != 0 else { return .notPresent }
                        var prot: Protection = []
                        if f.entry & TranslateReply.read != 0 { prot.insert(.read) }
                        if f.entry & TranslateReply.write != 0 { prot.insert(.write) }
                        t = (f.entry & ~0xFFF, prot)
                        s.slots[i] = DeviceIOTLB.Entry(page: vpn, phys: t.phys, prot: t.prot)
                    }
                    if let physBase = configuration.physBase {
                        let expected = physBase + UInt64(p) << 12
                        report.checks += 1
                        if t.phys != expected {
                            report.wrongTranslations += 1
                            problem("iova \(hex(iova)) translates to \(hex(t.phys)), its host page is \(hex(expected))")
                            s.slots[i] = DeviceIOTLB.Entry()
                            return .denied
                        }
                    }
                }
                let entry = s.slots[i]
                guard entry.prot.contains(write ? .write : .read) else {
                    // A write to a read-only translation: dirty tracking protected the page
                    // (or the mapping is read-only, which the service answers INVALID).
                    // As with ATS, drop the entry and send a write page request.
                    guard write && entry.prot.contains(.read) else { return .denied }
                    s.slots[i] = DeviceIOTLB.Entry()
                    return .notPresent
                }
                if configuration.checkHostTags {
                    guard let tag = memory.load(entry.phys + 4088) else { return outside(iova, entry.phys) }
                    report.checks += 1
                    if tag != 0 && tag != HostLayout.tag(iova: iova) {
                        report.wrongTranslations += 1
                        problem(
                            """
                            iova \(hex(iova)) translates to \(hex(entry.phys)), a page tagged for iova \
                            \(hex(tag ^ HostLayout.tagMagic))
                            """
                        )
                        s.slots[i] = DeviceIOTLB.Entry()
                        return .denied
                    }
                }
                if let window, let hostBase = configuration.hostBase, window.mustSkip(hostBase + UInt64(p) << 12) {
                    return .done
                }
                let bytes = configuration.bytesPerAccess
                if write {
                    dirtyWriter?.willWrite(page: p)  // before the store: see DirtyLedger
                    version &+= 1
                    let value = UInt64(configuration.deviceID) << 56 | UInt64(p) << 24 | (version & 0xFF_FFFF)
                    guard memory.store(entry.phys, value),
                        bytes <= 8 || memory.fill(entry.phys + 8, byteCount: bytes - 8, value)
                    else {
                        return outside(iova, entry.phys)
                    }
                    s.shadow[p] = value
                } else {
                    if bytes > 8 && memory.touch(entry.phys + 8, byteCount: bytes - 8) == nil {
                        return outside(iova, entry.phys)
                    }
                    guard let value = memory.load(entry.phys) else { return outside(iova, entry.phys) }
                    // A host in another process may free a page at any time (MADV_REMOVE races
                    // with the device's writes: the uffd window), so zero is no evidence there.
                    if value != s.shadow[p] && s.shadow[p] != DeviceIOTLB.unknown
                        && !(configuration.checkHostTags && value == 0)
                    {
                        report.integrityErrors += 1
                        problem("read of iova \(hex(iova)) gave \(hex(value)), expected \(hex(s.shadow[p]))")
                    }
                }
                report.bytesMoved += bytes
                return .done
            }
            if let result { return result }
            guard case .remote(let client) = translator else { return .notPresent }
            do {
                let reply = try client.translate(iova: iova, pages: 1)
                report.translations += 1
                fetched = (reply.entries[0], reply.sequence)
            } catch {
                if !stopFlag.load(ordering: .relaxed) { problem("TRANSLATE failed: \(error)") }
                return .gone
            }
        }
    }

    /// DMA to a physical address outside every region this device mapped: a wrong translation.
    private func outside(_ iova: UInt64, _ phys: UInt64) -> AccessResult {
        report.outsideMemory += 1
        report.wrongTranslations += 1
        problem("iova \(hex(iova)) translates to \(hex(phys)), outside every memory region this device was given")
        return .denied
    }

    /// Sends one group; returns its cookie, or nil when the channel is gone.
    private func sendPageRequest(_ pages: [Int], write: Bool) -> UInt32? {
        cookie = cookie == UInt32.max ? 1 : cookie + 1
        groupIndex = (groupIndex + 1) & PageRequest.maxGroupIndex
        let perm: PageRequest.Permission = write ? [.read, .write] : [.read]
        var flags: PageRequest.Flags = configuration.pasid == nil ? [] : [.pasidValid]
        outgoing.removeAll(keepingCapacity: true)
        for (k, p) in pages.enumerated() {
            if k == pages.count - 1 { flags.insert(.lastPage) }
            outgoing.append(
                PageRequest(
                    flags: flags, deviceID: configuration.deviceID, pasid: configuration.pasid ?? 0,
                    groupIndex: groupIndex, perm: perm, addr: configuration.iovaBase + UInt64(p) << 12, cookie: cookie))
        }
        report.faults += outgoing.count
        report.groups += 1
        do {
            try channel.send(outgoing)
            return cookie
        } catch {
            if !stopFlag.load(ordering: .relaxed) { problem("channel failed: \(error)") }
            return nil
        }
    }

    private func problem(_ text: String) {
        if report.firstProblems.count < 5 { report.firstProblems.append("device \(configuration.deviceID): \(text)") }
    }

    /// After the run: every page's first 8 bytes in host memory hold what this device last
    /// wrote (DMA landed where the translations said), read through the device's own
    /// mapping at the physical address its layout names. Returns the mismatches.
    package func verifyHostMemory() -> [String] {
        guard let physBase = configuration.physBase else { return [] }
        var out: [String] = []
        let shadow = iotlb.state.withLock { $0.shadow }
        for p in 0..<configuration.pages where shadow[p] != 0 && shadow[p] != DeviceIOTLB.unknown {
            let phys = physBase + UInt64(p) << 12
            let value = memory.load(phys)
            if value != shadow[p] && out.count < 5 {
                out.append(
                    """
                    device \(configuration.deviceID): page at \(hex(phys)) holds \(value.map(hex) ?? "nothing"), \
                    device wrote \(hex(shadow[p]))
                    """
                )
            }
        }
        return out
    }
}

/// xoshiro256**: a small, seeded generator for workloads.
struct Xoshiro: RandomNumberGenerator {
    var s: (UInt64, UInt64, UInt64, UInt64)
    init(seed: UInt64) {
        var x = seed
        func splitmix() -> UInt64 {
            x &+= 0x9E37_79B9_7F4A_7C15
            var z = x
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        s = (splitmix(), splitmix(), splitmix(), splitmix())
    }
    mutating func next() -> UInt64 {
        let result = ((s.1 &* 5) << 7 | (s.1 &* 5) >> 57) &* 9
        let t = s.1 << 17
        s.2 ^= s.0; s.3 ^= s.1; s.1 ^= s.2; s.0 ^= s.3; s.2 ^= t
        s.3 = s.3 << 45 | s.3 >> 19
        return result
    }
}

/// Zipf-distributed page indices by inverse CDF over a precomputed table.
struct ZipfSampler: Sendable {
    let cdf: [Double]
    init(count: Int, exponent: Double) {
        var acc = 0.0
        var c: [Double] = []
        c.reserveCapacity(count)
        for k in 1...count {
            acc += 1 / pow(Double(k), exponent)
            c.append(acc)
        }
        cdf = c.map { $0 / acc }
    }
    func sample<G: RandomNumberGenerator>(_ rng: inout G) -> Int {
        let u = Double.random(in: 0..<1, using: &rng)
        var (lo, hi) = (0, cdf.count - 1)
        while lo < hi {
            let mid = (lo + hi) / 2
            if cdf[mid] < u { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }
}

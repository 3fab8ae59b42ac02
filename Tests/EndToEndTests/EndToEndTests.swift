// End to end: simulated devices doing real DMA through the service, with invalidations in
// between. Every group must be answered exactly once, the data checks must pass, and the
// page table must match the bitmaps afterwards.

import Foundation
import SystemPackage
import Testing
import IOPFTestSupport
@testable import IOPFCore
@testable import IOPFService
@testable import IOPFDevice
@testable import IOPFSimulation
@testable import IOPFSystem

@Suite(.serialized, .timeLimit(.minutes(15))) struct EndToEndTests {
    /// Sequential DMA with adaptive fault-around: the data checks pass, pages mapped
    /// ahead are counted, and the devices need several times fewer groups than with
    /// single pages, in the same workload. Invalidations keep running in between.
    @Test func faultAroundCutsGroupsAndKeepsDataRight() throws {
        func run(_ policy: FaultAroundPolicy) throws -> ServeResult {
            var o = ServeOptions()
            o.devices = 2
            o.memoryBytes = 16 << 20
            o.workload = .sequential
            o.operationsPerDevice = 3000
            o.invalidateInterval = 0.002
            o.invalidateMaxPages = 16
            o.spinNanoseconds = 20_000
            o.faultAround = policy
            let r = try ServeSession.run(o)
            #expect(r.problems.isEmpty, "\(r.problems)")
            #expect(r.dmaErrors == 0 && r.integrityErrors == 0 && r.violations == 0)
            return r
        }
        let single = try run(.off)
        let around = try run(.adaptive)
        #expect(single.prefetchedPages == 0)
        #expect(around.prefetchedPages > 0)
        #expect(
            around.groups * 4 < single.groups, "groups: \(around.groups) with fault-around, \(single.groups) without")
    }

    /// `--dirty-log`: devices doing real DMA, invalidations and host changes in between;
    /// nothing written goes unreported. Fault mode reports close to what was written;
    /// pinned mode reports every page on every read (VFIO type1 without device support).
    @Test(arguments: [MemoryMode.fault, .pinned])
    func theDirtyLogMissesNoWrite(mode: MemoryMode) throws {
        var o = ServeOptions()
        o.mode = mode
        o.devices = 2
        o.memoryBytes = 16 << 20
        o.operationsPerDevice = 3000
        o.invalidateInterval = 0.002
        o.invalidateMaxPages = 16
        o.hostChurnInterval = mode == .fault ? 0.01 : 0
        o.spinNanoseconds = 20_000
        o.dirtyLogInterval = 0.01
        let r = try ServeSession.run(o)
        #expect(r.problems.isEmpty, "\(r.problems)")
        #expect(r.integrityErrors == 0 && r.violations == 0)
        let d = try #require(r.dirty)
        #expect(d.rounds >= 2 && d.written > 100 && d.missed == 0, "\(d)")
        if mode == .pinned {
            #expect(d.reported == d.rounds * 4096, "every page of 16 MiB, every round: \(d)")
        } else {
            #expect(d.reported < d.written * 2, "reported \(d.reported) for \(d.written) written")
        }
        let json = try JSONSerialization.jsonObject(with: JSONEncoder().encode(r)) as! [String: Any]
        let dirty = try #require(json["dirty"] as? [String: Any])
        #expect(Set(dirty.keys).isSuperset(of: ["rounds", "reported", "written", "missed", "extra"]))
    }

    /// The dirty-log bench's rows: devices write at most their share per round; fault
    /// mode reports about what was written, pinned mode every page.
    @Test func dirtyLogRowsCompareFaultWithPinned() throws {
        var rows: [MemoryMode: DirtyLogRow] = [:]
        for mode in MemoryMode.allCases {
            var o = ServeOptions()
            o.mode = mode
            o.devices = 2
            o.memoryBytes = 8 << 20
            o.invalidateInterval = 0
            o.spinNanoseconds = 20_000
            o.dirtyLogInterval = 0.05
            o.dirtyShare = 0.05
            o.seconds = 0.5
            rows[mode] = DirtyLogRow(size: o.memoryBytes, result: try ServeSession.run(o))
        }
        let (fault, pinned) = (rows[.fault]!, rows[.pinned]!)
        for r in [fault, pinned] {
            #expect(r.problems.isEmpty && r.missed == 0 && r.rounds >= 5 && r.written > 0, "\(r)")
            // The quota is checked before each burst (up to 4 pages), so a device may go 3 over.
            #expect(r.writtenSharePerRound <= 0.06, "devices kept to about 5% a round: \(r.writtenSharePerRound)")
        }
        #expect(fault.reportedPerWritten >= 1 && fault.reportedPerWritten < 1.5, "\(fault)")
        #expect(pinned.reported == pinned.rounds * 2048 && pinned.reportedPerWritten > 10, "\(pinned)")
    }

    @Test(arguments: [
        (2, Workload.random, ChannelTransport.socket, 1),
        (3, Workload.sequential, ChannelTransport.pipe, 2),
        (4, Workload.zipf, ChannelTransport.shared, 2),
        (2, Workload.random, ChannelTransport.shared, 1),
    ])
    func devicesFaultAndDMAWithInvalidationsInBetween(
        devices: Int, workload: Workload, transport: ChannelTransport, domains: Int
    ) throws {
        var o = ServeOptions()
        o.devices = devices
        o.memoryBytes = 16 << 20
        o.workload = workload
        o.transport = transport
        o.domains = domains
        o.operationsPerDevice = 4000
        o.invalidateInterval = 0.001
        o.invalidateMaxPages = 64
        o.spinNanoseconds = 20_000
        o.seed = UInt64(devices)
        let r = try ServeSession.run(o)
        #expect(r.problems.isEmpty, "\(r.problems)")
        #expect(r.dmaOps >= devices * 4000)
        #expect(r.faults > 0 && r.responses.success > 0)
        #expect(r.groups == r.responses.success + r.responses.invalid)
        #expect(r.dmaErrors == 0)
        #expect(r.integrityErrors == 0)
        #expect(r.violations == 0)
        #expect(r.invalidations > 0 && r.iotlbSyncs <= r.invalidations * domains)
        #expect(r.lockedBytes == 0)
        #expect(r.residentBytes > 0)
        // The answer latency (shared rings' stamp) ends when the service answered, the
        // device-observed one when the device looked: never earlier.
        if transport == .shared {
            let a = try #require(r.answerLatencyNs, "a shared ring gives the answer latency")
            #expect(
                a.p50 > 0 && a.p50 <= r.faultLatencyNs.p50 && a.max <= r.faultLatencyNs.max,
                "\(a) against \(r.faultLatencyNs)")
        } else {
            #expect(r.answerLatencyNs == nil, "a stream carries no stamp")
        }
    }

    @Test func serveJSONHasTheDocumentedKeys() throws {
        var o = ServeOptions()
        o.devices = 2
        o.memoryBytes = 8 << 20
        o.seconds = 0.5
        o.spinNanoseconds = 20_000
        let r = try ServeSession.run(o)
        let json = try JSONSerialization.jsonObject(with: JSONEncoder().encode(r)) as! [String: Any]
        for key in [
            "mode", "devices", "dmaOps", "dmaErrors", "faults", "groups", "responses", "invalidations", "pagesUnmapped",
            "iotlbSyncs", "integrityErrors", "violations", "residentBytes", "lockedBytes", "faultLatencyNs",
            "elapsedSeconds", "completionOverflows",
        ] {
            #expect(json[key] != nil, "missing key \(key)")
        }
        #expect(json["stopped"] == nil, "a healthy run has no stopped key")
        #expect(json["mode"] as? String == "fault")
        #expect(Set((json["responses"] as! [String: Any]).keys) == ["success", "invalid"])
        #expect(Set((json["faultLatencyNs"] as! [String: Any]).keys) == ["p50", "p90", "p99", "p999", "max"])
        #expect(r.faults > 0 && r.faultLatencyNs.p50 > 0 && r.faultLatencyNs.p50 <= r.faultLatencyNs.max)
    }

    /// Devices with several groups in flight (PRI's credit) keep every data check right,
    /// and the loop finds several groups of one device in a turn, which a device with
    /// one in flight never gives it.
    @Test func devicesKeepSeveralGroupsInFlight() throws {
        var o = ServeOptions()
        o.devices = 2
        o.memoryBytes = 16 << 20
        o.seconds = 1
        o.spinNanoseconds = 20_000
        o.faultAround = .off
        o.outstanding = 8
        let r = try ServeSession.run(o)
        #expect(r.problems.isEmpty, "\(r.problems)")
        #expect(r.integrityErrors == 0 && r.violations == 0 && r.dmaErrors == 0)
        #expect(r.batchedGroups > 0, "no turn found two groups of one device: nothing was in flight together")
        o.outstanding = 1
        let single = try ServeSession.run(o)
        #expect(single.batchedGroups == 0 && single.groups > 0 && single.integrityErrors == 0)
    }

    /// Three unpaced devices on one thread, one page request in flight each: every one
    /// finishes its operations (none is left behind another's answer or starved by the
    /// others), with every data check, over a shared ring and over a socket.
    @Test(arguments: [ChannelTransport.shared, .socket])
    func devicesSharingAThreadAllFinish(transport: ChannelTransport) throws {
        var o = ServeOptions()
        o.devices = 3
        o.memoryBytes = 12 << 20
        o.seconds = 60
        o.spinNanoseconds = 20_000
        o.transport = transport
        o.deviceThreads = 1
        o.deviceRate = nil
        o.operationsPerDevice = 3000
        let r = try ServeSession.run(o)
        #expect(r.deviceThreads == 1)
        #expect(r.dmaOps == 9000 && r.elapsedSeconds < 60, "\(r.dmaOps) operations in \(r.elapsedSeconds) s")
        #expect(r.groups > 100 && r.integrityErrors == 0 && r.violations == 0, "\(r.groups) groups")
        #expect(r.problems.isEmpty, "\(r.problems)")
        o.deviceThreads = nil  // a thread each (the default)
        let each = try ServeSession.run(o)
        #expect(each.deviceThreads == 3 && each.dmaOps == 9000 && each.integrityErrors == 0)
    }

    /// Paced devices start at most their rate of bursts; unpaced ones run far past it
    /// (even under TSan, which slows unpaced devices to about 700 bursts/s each: the rate
    /// stays low enough that 3x still holds there).
    @Test func devicesKeepTheirRate() throws {
        var o = ServeOptions()
        o.devices = 2
        o.memoryBytes = 8 << 20
        o.seconds = 1
        o.spinNanoseconds = 20_000
        o.deviceRate = 100
        let paced = try ServeSession.run(o)
        let rate = Double(paced.dmaOps) / paced.elapsedSeconds / 2
        #expect(rate <= 100 * 1.1 && rate > 10, "\(rate) bursts/s per device at --device-rate 100")
        #expect(paced.integrityErrors == 0 && paced.violations == 0)
        o.deviceRate = nil
        o.idleDevices = false
        let unpaced = try ServeSession.run(o)
        #expect(unpaced.dmaOps > 3 * paced.dmaOps, "\(unpaced.dmaOps) against \(paced.dmaOps)")
    }

    @Test func aWrongTranslationIsCaughtByTheDevice() throws {
        // Map a device's pages to the wrong host page behind the service's back.
        let region = try HostRegion(length: 1 << 20)
        let engine = FaultEngine(memory: ProcessMemory())
        let fanout = DomainIOTLBs()
        let domain = try engine.createDomain(invalidator: fanout)
        let service = try FaultService(engine: engine)
        try service.start()
        defer { service.stop() }
        let iova: UInt64 = 1 << 30
        try engine.map(iova: iova, vaddr: region.base, size: 64 << 12, prot: .readWrite)
        let table = engine.pageTable(domain)
        // Pages 0 and 1 both translate to host page 0.
        for p in 0..<2 { try table.mapPage(iova: iova + UInt64(p) << 12, phys: region.phys!, prot: .readWrite) }
        var dc = DeviceConfiguration(
            deviceID: 1, iovaBase: iova, pages: 2, hostBase: region.base, physBase: region.phys!)
        dc.operationLimit = 500
        dc.burst = 1
        let device = SimulatedDevice(
            configuration: dc, channel: try DeviceChannel(service.attach(deviceID: 1, domain: domain)),
            memory: try DeviceMemory([(region.info!, FileDescriptor(rawValue: try Sys.dup(region.fd)))]),
            translator: .pageTable(table))
        fanout.add(device.iotlb)
        device.start()
        while !device.isFinished { usleep(1000) }
        let report = device.finish()
        #expect(report.dmaOps == 500)
        // The device checks each walk against the page its mapping holds: page 1's walk
        // returns page 0, so the access is refused and reported before any data is written.
        #expect(report.wrongTranslations > 0)
        #expect(report.dmaErrors > 0)
        #expect(report.firstProblems.contains { $0.contains("translates to") })
        #expect(!engine.checkInvariants().isEmpty)
    }
}

@Suite(.serialized, .timeLimit(.minutes(15))) struct PinnedModeTests {
    @Test func servePinnedLocksEverythingAndTakesNoFaults() throws {
        var o = ServeOptions()
        o.mode = .pinned
        o.devices = 2
        o.memoryBytes = 8 << 20
        o.seconds = 0.5
        o.spinNanoseconds = 20_000
        let r = try ServeSession.run(o)
        #expect(r.mode == "pinned" && r.problems.isEmpty, "\(r.problems)")
        #expect(r.faults == 0 && r.dmaOps > 0 && r.dmaErrors == 0)
        #expect(r.lockedBytes == 8 << 20)
        #expect(r.integrityErrors == 0 && r.violations == 0)
    }

    @Test func procStatusSizesParseWhateverThePadding() throws {
        // Unwrapped before comparing: under ASan, the toolchain's #expect expansion for an
        // Optional<UInt64> == literal comparison reports a stack-buffer-overflow inside
        // Swift Testing itself (not in this code).
        let cases: [(String, UInt64)] = [
            ("VmLck:\t16777216 kB", 16 << 30),  // no space once it has 8 digits
            ("VmLck:\t  262144 kB", 256 << 20),
            ("VmLck:\t       0 kB", 0),
            ("MemAvailable:   24452732 kB", 24_452_732 * 1024),
        ]
        for (line, bytes) in cases {
            let parsed = try #require(ServeSession.procBytes(Substring(line)), "\(line) did not parse")
            #expect(parsed == bytes, "\(line)")
        }
    }

    @Test func benchMeasuresBothModesOnTheSameWorkload() throws {
        let pinned = try BenchSession.measure(size: 16 << 20, touch: 0.5, mode: .pinned, dmaSeconds: 0.1)
        let fault = try BenchSession.measure(size: 16 << 20, touch: 0.5, mode: .fault, dmaSeconds: 0.1)
        #expect(pinned.lockedBytes == 16 << 20 && pinned.residentBytes == 16 << 20)
        #expect(fault.lockedBytes == 0)
        // Fault mode makes resident what was touched, and (nearly) nothing else.
        #expect(fault.residentBytes >= 8 << 20 && fault.residentBytes <= (8 << 20) + (8 << 20) / 100)
        #expect(fault.faultLatencyNs.p50 > 0 && pinned.faultLatencyNs.p50 == 0)
        #expect(fault.mapSeconds < pinned.mapSeconds)
        #expect(pinned.dmaGBps > 0 && fault.dmaGBps > 0)
    }

    /// The fault-around scenario on the same memory shape: sequential first touch needs
    /// several times fewer groups with fault-around and ends with all of it resident;
    /// random touches map nothing ahead, so resident memory stays what was touched.
    /// `--service-cpu 0`: the service thread alone on CPU 0, the devices on the others;
    /// the thread really runs there, and the devices' data checks pass.
    @Test(.enabled(if: Sys.onlineCPUs >= 2)) func theServiceThreadCanHaveACPUToItself() throws {
        var o = ServeOptions()
        o.devices = 2
        o.memoryBytes = 8 << 20
        o.operationsPerDevice = 2000
        o.serviceCPU = 0
        let r = try ServeSession.run(o)
        #expect(r.problems.isEmpty && r.integrityErrors == 0 && r.violations == 0, "\(r.problems)")
        // The affinity call itself, on a thread of its own (a test's thread is shared):
        // only CPU 1, then every CPU but 1, and a CPU that does not exist refused.
        let seen = Lock<[Int]>([])
        let done = DispatchSemaphore(value: 0)
        Thread {
            if (try? Sys.setCPUAffinity(1, only: true)) != nil { seen.withLock { $0.append(Sys.currentCPU) } }
            if (try? Sys.setCPUAffinity(1, only: false)) != nil { seen.withLock { $0.append(Sys.currentCPU) } }
            if (try? Sys.setCPUAffinity(Sys.onlineCPUs + 7, only: true)) == nil { seen.withLock { $0.append(-1) } }
            done.signal()
        }.start()
        done.wait()
        let cpus = seen.withLock { $0 }
        #expect(cpus.count == 3 && cpus[0] == 1 && cpus[1] != 1 && cpus[2] == -1, "\(cpus)")
    }

    /// `iopf serve` places its service thread by default (`--service-cpu auto`): on the
    /// last CPU the process may use when it may use two or more, nowhere when it may use
    /// one (taskset) or is told `none`.
    @Test(.enabled(if: Sys.allowedCPUs.count >= 2 && FileManager.default.isExecutableFile(atPath: "/usr/bin/taskset")))
    func serveGivesItsServiceThreadTheLastAllowedCPU() throws {
        let iopf = try Child.buildDirectory.appendingPathComponent("iopf").path
        let run = ["serve", "--json", "--devices", "1", "--memory", "4M", "--duration", "0.3"]
        let placed = try Child(iopf, run, absolute: true).finish()
        #expect(placed.status == 0)
        #expect(placed.json["serviceCPU"] as? Int == Sys.allowedCPUs.last, "\(placed.json["serviceCPU"] ?? "none")")
        let none = try Child(iopf, run + ["--service-cpu", "none"], absolute: true).finish()
        #expect(none.status == 0 && none.json["serviceCPU"] == nil && none.json["dmaOps"] != nil)
        let oneCPU = try Child("/usr/bin/taskset", ["-c", "0", iopf] + run, absolute: true).finish()
        #expect(oneCPU.status == 0 && oneCPU.json["serviceCPU"] == nil && oneCPU.json["dmaOps"] != nil)
        // What auto reads: a thread allowed one CPU sees that one.
        let seen = Lock<[Int]>([])
        let done = DispatchSemaphore(value: 0)
        Thread {
            if (try? Sys.setCPUAffinity(1, only: true)) != nil {
                let cpus = Sys.allowedCPUs
                seen.withLock { $0 = [cpus.count, cpus.last] }
            }
            done.signal()
        }.start()
        done.wait()
        #expect(seen.withLock { $0 } == [1, 1])
    }

    /// `bench --scenario faults`: every fault answered SUCCESS, with several groups in
    /// flight the loop takes them in batches, and the device re-faults memory it walked
    /// (invalidating it first) without anything going wrong.
    @Test func faultsBenchKeepsGroupsInFlight() throws {
        // Small memory, so that even a sanitizer build walks it more than once.
        let one = try FaultsBench.measure(outstanding: 1, seconds: 0.3, pages: 1024)
        let many = try FaultsBench.measure(outstanding: 16, seconds: 1, pages: 1024)
        #expect(one.problems.isEmpty && many.problems.isEmpty, "\(one.problems + many.problems)")
        #expect(one.faults > 20 && one.faultLatencyNs.p50 > 0)
        #expect(many.faults > 1024 && many.invalidations > 0, "\(many.faults) faults")
        #expect(
            Double(many.faults) / Double(max(many.loopTurns, 1)) > 1.5,
            "\(many.faults) faults in \(many.loopTurns) turns")
        let json = try JSONSerialization.jsonObject(with: JSONEncoder().encode(many)) as! [String: Any]
        #expect(Set(json.keys).isSuperset(of: ["faultsPerSecond", "faultLatencyNs", "outstanding"]))
    }

    @Test func benchComparesFaultAroundWithSinglePages() throws {
        let single = try FaultAroundBench.measure(size: 16 << 20, pattern: .sequential, touch: 1, policy: .off)
        let around = try FaultAroundBench.measure(size: 16 << 20, pattern: .sequential, touch: 1, policy: .adaptive)
        #expect(single.problems.isEmpty && around.problems.isEmpty, "\(single.problems + around.problems)")
        #expect(single.groups == 4096 / 32 && single.prefetchedPages == 0)
        #expect(
            around.groups * 4 < single.groups, "\(around.groups) groups with fault-around, \(single.groups) without")
        #expect(around.residentBytes == 16 << 20 && single.residentBytes == 16 << 20)
        #expect(around.populateGBps > 0 && around.touchGBps > 0)
        let random = try FaultAroundBench.measure(size: 16 << 20, pattern: .random, touch: 0.1, policy: .adaptive)
        #expect(random.problems.isEmpty)
        #expect(
            random.prefetchedPages < random.faults / 10, "random touches mapped \(random.prefetchedPages) pages ahead")
        #expect(random.residentBytes <= UInt64(random.faults + random.prefetchedPages) << 12)
    }
}

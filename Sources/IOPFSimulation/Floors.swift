// Floors.swift — the machine's own floors, measured in the same run as the service so
// that results can be stated as ratios: a userfaultfd fault round trip, populating a page
// with MADV_POPULATE_WRITE, mlock of fresh memory per GiB, and a cache line handed between
// two CPUs and back.

import CIOPFShim
import Foundation
import Glibc
import IOPFService
import IOPFSystem
import Synchronization

package struct Floors: Codable, Sendable {
    /// With a handler thread sleeping in read(2), the usual way to serve userfaultfd.
    package var uffdRoundTripNs: Double
    /// With a handler thread busy-polling a non-blocking userfaultfd: no wake-up on the
    /// handler's side, the strictest floor.
    package var uffdRoundTripPolledNs: Double
    package var populateNsPerPage: Double
    package var mlockSecondsPerGiB: Double
    /// A cache line handed to another CPU and back (`crossCoreRoundTrip`); nil on one CPU.
    package var crossCoreRoundTripNs: Double?

    package static func measure(pages: Int = 16384, mlockBytes: UInt64 = 256 << 20) throws -> Floors {
        Floors(
            uffdRoundTripNs: try userfaultfdRoundTrip(pages: pages, polled: false),
            uffdRoundTripPolledNs: try userfaultfdRoundTrip(pages: pages, polled: true),
            populateNsPerPage: try populatePerPage(pages: pages),
            mlockSecondsPerGiB: try mlockPerGiB(bytes: mlockBytes),
            crossCoreRoundTripNs: crossCoreRoundTrip())
    }

    /// Nanoseconds for a thread to store to a cache line and see another thread, on
    /// another CPU, store its reply there: the least a request and its answer through
    /// shared memory cost, at the machine's speed of the moment (this VM has two). The
    /// median of 5 batches of `roundTrips`; nil when this process may use one CPU only.
    package static func crossCoreRoundTrip(roundTrips: Int = 50_000) -> Double? {
        let cpus = Sys.allowedCPUs
        guard cpus.count >= 2 else { return nil }
        let batches = 5
        let line = CacheLine()
        let results = Mutex<[Double]>([])
        let done = DispatchGroup()
        done.enter()
        Thread {  // the responder: turns every odd value into the next even one
            _ = try? Sys.setCPUAffinity(cpus.last, only: true)
            let end = UInt64(2 * roundTrips * batches)
            var seen: UInt64 = 0
            while seen < end {
                let v = line.value.load(ordering: .acquiring)
                if v & 1 == 1 && v != seen {
                    line.value.store(v + 1, ordering: .releasing)
                    seen = v + 1
                }
            }
            done.leave()
        }.start()
        done.enter()
        Thread {  // the caller, on any other CPU
            _ = try? Sys.setCPUAffinity(cpus.last, only: false)
            var next: UInt64 = 1
            for _ in 0..<batches {
                let start = ContinuousClock.now
                for _ in 0..<roundTrips {
                    line.value.store(next, ordering: .releasing)
                    while line.value.load(ordering: .acquiring) != next + 1 {}
                    next += 2
                }
                let ns = nanoseconds(ContinuousClock.now - start) / Double(roundTrips)
                results.withLock { $0.append(ns) }
            }
            done.leave()
        }.start()
        done.wait()
        let sorted = results.withLock { $0 }.sorted()
        return sorted[sorted.count / 2]
    }

    /// Mean time for a thread to touch a missing page of a userfaultfd-registered range and
    /// continue after a handler thread resolved it with UFFDIO_ZEROPAGE.
    package static func userfaultfdRoundTrip(pages: Int, polled: Bool) throws -> Double {
        let region = try HostRegion(length: UInt64(pages) << 12)
        let uffd = try syscall("userfaultfd") { iopf_userfaultfd(O_CLOEXEC | (polled ? O_NONBLOCK : 0)) }
        defer { Sys.close(uffd) }
        var features: UInt64 = 0
        var ioctls: UInt64 = 0
        _ = try syscall("UFFDIO_API") { iopf_uffd_api(uffd, 0, &features, &ioctls) }
        _ = try syscall("UFFDIO_REGISTER") {
            iopf_uffd_register(uffd, region.base, region.length, iopf_uffd_mode_missing())
        }
        let handler = Thread {
            var msg = uffd_msg()
            while true {
                let n = withUnsafeMutableBytes(of: &msg) { Glibc.read(uffd, $0.baseAddress, $0.count) }
                if n < 0 && errno == EAGAIN { continue }  // polled: spin
                guard n == MemoryLayout<uffd_msg>.size else { return }
                guard UInt32(msg.event) == iopf_uffd_event_pagefault() else { continue }
                let page = msg.arg.pagefault.address & ~0xFFF
                _ = iopf_uffd_zeropage(uffd, page, 4096)
            }
        }
        handler.start()
        let start = ContinuousClock.now
        for p in 0..<pages {
            UnsafeMutableRawPointer(bitPattern: UInt(region.base) + UInt(p) << 12)!.storeBytes(of: 1, as: UInt8.self)
        }
        let elapsed = ContinuousClock.now - start
        _ = iopf_uffd_unregister(uffd, region.base, region.length)
        return nanoseconds(elapsed) / Double(pages)
    }

    /// Mean time of MADV_POPULATE_WRITE on one fresh page, one call per page.
    package static func populatePerPage(pages: Int) throws -> Double {
        let region = try HostRegion(length: UInt64(pages) << 12)
        let start = ContinuousClock.now
        for p in 0..<pages {
            _ = try syscall("madvise(MADV_POPULATE_WRITE)") {
                madvise(
                    UnsafeMutableRawPointer(bitPattern: UInt(region.base) + UInt(p) << 12), 4096, MADV_POPULATE_WRITE)
            }
        }
        return nanoseconds(ContinuousClock.now - start) / Double(pages)
    }

    /// Seconds for one MADV_POPULATE_WRITE call over `bytes` of fresh memory: the
    /// yardstick for first-touch throughput (the kernel's own fault-around, in one call).
    package static func populateOnce(bytes: UInt64) throws -> Double {
        let region = try HostRegion(length: bytes)
        let start = ContinuousClock.now
        _ = try syscall("madvise(MADV_POPULATE_WRITE)") {
            madvise(UnsafeMutableRawPointer(bitPattern: UInt(region.base)), Int(bytes), MADV_POPULATE_WRITE)
        }
        return nanoseconds(ContinuousClock.now - start) / 1e9
    }

    /// Seconds per GiB to mlock fresh anonymous memory (faulting and locking it).
    package static func mlockPerGiB(bytes: UInt64) throws -> Double {
        let region = try HostRegion(length: bytes)
        let pointer = UnsafeMutableRawPointer(bitPattern: UInt(region.base))
        let start = ContinuousClock.now
        _ = try syscall("mlock") { iopf_mlock(pointer, Int(bytes)) }
        let elapsed = ContinuousClock.now - start
        _ = iopf_munlock(pointer, Int(bytes))
        return nanoseconds(elapsed) / 1e9 / (Double(bytes) / Double(1 << 30))
    }

    /// Touches and frees `bytes` of fresh memory once. On a virtual machine the first use
    /// of guest memory also pays the hypervisor's fault; warming makes every later run, and
    /// the floors, see memory in the same state, whichever mode ran before.
    package static func warmUp(bytes: UInt64) throws {
        let region = try HostRegion(length: bytes & ~0xFFF)
        let chunk = 256 << 20
        var offset: UInt64 = 0
        while offset < region.length {
            let n = Int(min(UInt64(chunk), region.length - offset))
            _ = try syscall("madvise(MADV_POPULATE_WRITE)") {
                madvise(UnsafeMutableRawPointer(bitPattern: UInt(region.base + offset)), n, MADV_POPULATE_WRITE)
            }
            offset += UInt64(n)
        }
    }

    /// MemAvailable from /proc/meminfo, in bytes.
    package static func availableMemory() -> UInt64 {
        let info = (Sys.readText("/proc/meminfo")) ?? ""
        let line = info.split(separator: "\n").first { $0.hasPrefix("MemAvailable:") }
        return line.flatMap(ServeSession.procBytes) ?? 0
    }

    /// One word alone in its cache line (a class instance of its own).
    private final class CacheLine: Sendable {
        let value = Atomic<UInt64>(0)
    }

    static func nanoseconds(_ d: Duration) -> Double {
        Double(d.components.seconds) * 1e9 + Double(d.components.attoseconds) / 1e9
    }
}

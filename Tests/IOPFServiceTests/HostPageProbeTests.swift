// Confirming host pages by touching them (probe.c, ProcessMemory.resolve): the same pages
// and bytes as populating them; a touch the kernel answers with SIGSEGV or SIGBUS is an
// error that names the kernel's reason, and the thread goes on; a fault outside a probe
// still ends the process.

import CIOPFShim
import Glibc
import Testing
import IOPFTestSupport
import IOPFCore
@testable import IOPFService
@testable import IOPFSystem

@Suite(.timeLimit(.minutes(15))) struct HostPageProbeTests {
    /// Touching and asking the kernel (`touchingPages: false`) agree.
    @Test(arguments: [true, false]) func touchingConfirmsTheSamePageAndChangesNoByte(touchingPages: Bool) throws {
        let region = try HostRegion(length: 8 << 12)
        let memory = ProcessMemory(touchingPages: touchingPages)
        let bytes = UnsafeMutableRawBufferPointer(
            start: UnsafeMutableRawPointer(bitPattern: UInt(region.base)),
            count: Int(region.length))
        for i in 0..<bytes.count { bytes[i] = UInt8(truncatingIfNeeded: i &* 7 &+ 3) }
        // Out of this process's page table, still in the memfd: the touch faults it back.
        #expect(madvise(bytes.baseAddress, bytes.count, MADV_DONTNEED) == 0)
        var physical: [UInt64] = []
        try memory.resolve(address: region.base + 4096, pageCount: 3, write: true, physical: &physical)
        try memory.resolve(address: region.base + 6 << 12, pageCount: 1, write: false, physical: &physical)
        #expect(physical == [1, 2, 3, 6].map { region.phys! + UInt64($0) << 12 })
        for i in 0..<bytes.count where bytes[i] != UInt8(truncatingIfNeeded: i &* 7 &+ 3) {
            Issue.record("byte \(i) changed to \(bytes[i])")
            break
        }
        var resident: [UInt64?] = []
        memory.residentPages(address: region.base, pageCount: 8, into: &resident)
        #expect(resident.allSatisfy { $0 != nil })
    }

    /// Half a run in the page table, half never touched: the probe stops at the first
    /// page that faulted, and one populate call confirms the rest.
    @Test func aRunThatStartsFaultingIsFinishedByOnePopulateCall() throws {
        let region = try HostRegion(length: 16 << 12)
        let base = UnsafeMutableRawPointer(bitPattern: UInt(region.base))!
        for page in 0..<4 { base.storeBytes(of: UInt64(page + 1), toByteOffset: page << 12, as: UInt64.self) }
        let touched = iopf_probe_pages(base, 8, 1, ProcessMemory.faultNanoseconds)
        #expect((1...5).contains(touched), "touched \(touched) of 8 with pages 4-7 missing")

        var physical: [UInt64] = []
        try ProcessMemory().resolve(address: region.base + 8 << 12, pageCount: 8, write: true, physical: &physical)
        #expect(physical == (8..<16).map { region.phys! + UInt64($0) << 12 })
        var resident: [UInt64?] = []
        ProcessMemory().residentPages(address: region.base, pageCount: 16, into: &resident)
        #expect(resident.map { $0 != nil } == (0..<16).map { $0 < max(4, touched) || $0 >= 8 })
        for page in 0..<4 { #expect(base.load(fromByteOffset: page << 12, as: UInt64.self) == UInt64(page + 1)) }
    }

    /// Reserved but inaccessible (PROT_NONE, so no other test's mmap lands there meanwhile).
    @Test func anInaccessiblePageIsTheKernelsErrorNotACrash() throws {
        let p = mmap(nil, 2 << 12, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        defer { munmap(p, 2 << 12) }
        #expect(iopf_probe_install() == 0)
        #expect(iopf_probe_pages(p, 2, 1, 0) == -1)
        #expect(iopf_probe_pages(p, 1, 0, 0) == -1)
        var physical: [UInt64] = []
        #expect {
            try ProcessMemory().resolve(
                address: UInt64(UInt(bitPattern: p)), pageCount: 1, write: true,
                physical: &physical)
        } throws: { error in
            "\(error)".contains("MADV_POPULATE_WRITE of 1 pages")
        }
        #expect(physical.isEmpty)
    }

    /// A memfd cut shorter than its mapping: the pages past its end raise SIGBUS.
    @Test func aPagePastTheMemfdsEndIsAnErrorAndThePagesBeforeItAreServed() throws {
        let fd = iopf_memfd_create_sealable("iopf-probe-test")
        #expect(fd >= 0)
        defer { close(fd) }
        #expect(ftruncate(fd, 2 << 12) == 0)
        let p = mmap(nil, 4 << 12, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)!
        defer { munmap(p, 4 << 12) }
        #expect(iopf_probe_install() == 0)
        #expect(iopf_probe_pages(p, 2, 1, 0) == 2)
        #expect(iopf_probe_pages(p, 3, 1, 0) == -1)
        #expect(iopf_probe_pages(p + 3 << 12, 1, 0, 0) == -1)
        var physical: [UInt64] = []
        #expect(throws: HostMemoryError.self) {
            try ProcessMemory().resolve(
                address: UInt64(UInt(bitPattern: p)) + 2 << 12, pageCount: 1, write: false,
                physical: &physical)
        }
        // The thread goes on probing, and a later fault is caught again.
        for _ in 0..<1000 { #expect(iopf_probe_pages(p + 2 << 12, 1, 1, 0) == -1) }
        #expect(iopf_probe_pages(p, 1, 1, 0) == 1)
    }

    /// The handler catches only faults inside a probe: any other still ends the process
    /// (through whatever handler was there before: the default, a sanitizer's, Swift's
    /// backtracer).
    @Test func aFaultOutsideAProbeStillEndsTheProcess() async {
        await #expect(processExitsWith: .failure) {
            _ = iopf_probe_install()
            let p = mmap(nil, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
            p.storeBytes(of: 1, as: UInt8.self)
        }
    }
}

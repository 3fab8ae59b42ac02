// The device side without a service: the memory a device reaches is only the regions it
// was given (at their physical bases), and its IOTLB drops exactly what an invalidation
// names, remembers the newest sequence, and forgets page contents the host may change.

import Glibc
import SystemPackage
import Testing
import CIOPFShim
@testable import IOPFCore
@testable import IOPFDevice
@testable import IOPFSystem
@testable import IOPFWire

@Suite(.timeLimit(.minutes(15))) struct DeviceSideTests {
    /// A memfd of `size` bytes holding `value` in its first 8 bytes.
    func memfd(size: Int, value: UInt64) throws -> FileDescriptor {
        let fd = iopf_memfd_create("iopf-device-test")
        try #require(fd >= 0 && ftruncate(fd, off_t(size)) == 0)
        var v = value
        #expect(pwrite(fd, &v, 8, 0) == 8)
        return FileDescriptor(rawValue: fd)
    }

    @Test func dmaReachesOnlyTheRegionsItWasGivenAtTheirBases() throws {
        let a = try memfd(size: 8192, value: 0x1111)
        let b = try memfd(size: 4096, value: 0x2222)
        let memory = try DeviceMemory([
            (MemoryRegionInfo(phys: 1 << 30, size: 8192), a),
            (MemoryRegionInfo(phys: 1 << 20, size: 4096), b),
        ])
        #expect(memory.load(1 << 30) == 0x1111 && memory.load(1 << 20) == 0x2222)
        #expect(memory.store((1 << 30) + 4096, 7) && memory.load((1 << 30) + 4096) == 7)
        // Outside every region, or straddling a region's end: refused.
        #expect(memory.load(0) == nil && memory.load((1 << 20) + 4096) == nil)
        #expect(memory.load((1 << 20) + 4092) == nil && !memory.store((1 << 30) + 8190, 1))
        #expect(!memory.fill(1 << 20, byteCount: 8192, 0))
        #expect(memory.regionInfo.map(\.phys) == [1 << 20, 1 << 30])
    }

    @Test func aRegionLargerThanItsMemfdIsRefused() throws {
        let fd = try memfd(size: 4096, value: 0)
        #expect(throws: SystemCallError.self) { try DeviceMemory([(MemoryRegionInfo(phys: 0, size: 8192), fd)]) }
    }

    @Test func anInvalidationDropsExactlyTheTranslationsItNames() {
        let base: UInt64 = 1 << 30
        let iotlb = DeviceIOTLB(entries: 8, iovaBase: base, pages: 8, forgetOnInvalidate: true)
        iotlb.state.withLock { s in
            for p in 0..<4 {
                s.slots[p] = .init(page: (base >> 12) + UInt64(p), phys: UInt64(p) << 12, prot: .readWrite)
                s.shadow[p] = UInt64(p) + 100
            }
        }
        #expect(iotlb.cachedCount == 4)
        iotlb.invalidate([IOVARange(start: base + 4096, last: base + 3 * 4096 - 1)], sequence: 9)
        iotlb.state.withLock { s in
            #expect(s.slots[0].page == base >> 12 && s.slots[3].page == (base >> 12) + 3)
            #expect(s.slots[1].page == .max && s.slots[2].page == .max)
            #expect(s.shadow[0] == 100 && s.shadow[1] == DeviceIOTLB.unknown && s.shadow[2] == DeviceIOTLB.unknown)
            #expect(s.shadow[3] == 103)
        }
        // An older sequence does not move it back.
        iotlb.invalidate([], sequence: 4)
        #expect(iotlb.state.withLock { $0.invalidationSequence } == 9)
        #expect(iotlb.cachedCount == 2)
    }
}

// VirtioNet.swift — a minimal virtio-net driver (virtio 1.0 split rings, one queue pair,
// no offloads) living in the memory the back-end reaches through iopf, so that a real
// device has traffic to translate: every descriptor and buffer address is an IOVA.
//
// Layout of the memory (offsets from its start, IOVA = iovaBase + offset): ring q (0 RX, 1
// TX) at q × 16 KiB with its descriptors, available ring at +4 KiB and used ring at +8
// KiB; packet buffers of 2 KiB from 2 MiB to the end of the working set (all of the memory
// unless told otherwise), so that the rings have a 2 MiB block of their own (an
// invalidation of buffers never takes the back-end's ring translations with it). Buffers
// are taken round-robin over it (skipping those still posted), as a guest's buffers come
// from anywhere in its RAM: the first pass faults it in; the memory beyond it is never
// touched.
//
// A packet is the 12-byte virtio_net_hdr (VERSION_1: num_buffers included), an Ethernet
// header with the local experimental ethertype 0x88B5, its sequence number, and a payload
// every byte of which depends on the sequence: the driver checks each received packet byte
// for byte, so a wrong translation shows up as a payload error.
//
// Indices shared with the back-end (avail.idx, used.idx) are read with acquire and written
// with release ordering; everything else in the rings is plain memory ordered by them.
// Single-threaded: one driver thread owns the rings.

import Foundation
import Glibc
import IOPFSystem
import Synchronization
import SystemPackage

/// virtio ring descriptor flags and ring flags.
enum Virtq {
    static let descWrite: UInt16 = 2
    static let availNoInterrupt: UInt16 = 1
    static let usedNoNotify: UInt16 = 1
}

final class SplitRing {
    let index: UInt32
    let size: Int
    let base: UnsafeMutableRawPointer
    let iova: UInt64
    let kick: CInt
    let call: CInt
    private(set) var availIndex: UInt16 = 0
    private(set) var usedSeen: UInt16 = 0
    var free: [UInt16]
    /// The buffer slot each descriptor holds while it is posted.
    var slotOf: [Int]

    static let stride = 16 << 10
    static let availOffset = 4096
    static let usedOffset = 8192

    init(index: UInt32, size: Int, base: UnsafeMutableRawPointer, iova: UInt64) throws {
        self.index = index
        self.size = size
        self.base = base
        self.iova = iova
        kick = try Sys.eventfd()
        call = try Sys.eventfd()
        free = (0..<UInt16(size)).reversed().map { $0 }
        slotOf = Array(repeating: -1, count: size)
        memset(base, 0, Self.stride)
        // No interrupts: the driver polls its used rings.
        base.storeBytes(of: Virtq.availNoInterrupt, toByteOffset: Self.availOffset, as: UInt16.self)
    }

    deinit {
        Sys.close(kick)
        Sys.close(call)
    }

    var setup: VringSetup {
        VringSetup(
            index: index, size: UInt32(size), descriptors: iova, available: iova + UInt64(Self.availOffset),
            used: iova + UInt64(Self.usedOffset), kick: FileDescriptor(rawValue: kick),
            call: FileDescriptor(rawValue: call))
    }

    private func index16(_ offset: Int) -> UnsafeMutablePointer<Atomic<UInt16>> {
        (base + offset).assumingMemoryBound(to: Atomic<UInt16>.self)
    }

    /// Posts a descriptor (not yet visible: `publish` makes a batch visible).
    func post(address: UInt64, length: UInt32, writable: Bool, slot: Int) -> Bool {
        guard let id = free.popLast() else { return false }
        let d = base + Int(id) * 16
        d.storeBytes(of: address, toByteOffset: 0, as: UInt64.self)
        d.storeBytes(of: length, toByteOffset: 8, as: UInt32.self)
        d.storeBytes(of: writable ? Virtq.descWrite : 0, toByteOffset: 12, as: UInt16.self)
        d.storeBytes(of: 0, toByteOffset: 14, as: UInt16.self)
        base.storeBytes(of: id, toByteOffset: Self.availOffset + 4 + 2 * (Int(availIndex) % size), as: UInt16.self)
        availIndex &+= 1
        slotOf[Int(id)] = slot
        return true
    }

    /// Makes the posted descriptors visible and kicks unless the back-end polls.
    func publish() {
        index16(Self.availOffset + 2).pointee.store(availIndex, ordering: .releasing)
        let usedFlags = index16(Self.usedOffset).pointee.load(ordering: .acquiring)
        if usedFlags & Virtq.usedNoNotify == 0 {
            var one: UInt64 = 1
            _ = Glibc.write(kick, &one, 8)
        }
    }

    /// Takes the used entries the back-end published: (slot, length written).
    func reap(_ body: (Int, UInt32) -> Void) -> Int {
        let end = index16(Self.usedOffset + 2).pointee.load(ordering: .acquiring)
        var n = 0
        while usedSeen != end {
            let e = Self.usedOffset + 4 + 8 * (Int(usedSeen) % size)
            let id = base.load(fromByteOffset: e, as: UInt32.self)
            let length = base.load(fromByteOffset: e + 4, as: UInt32.self)
            usedSeen &+= 1
            n += 1
            guard id < size, slotOf[Int(id)] >= 0 else {
                body(-1, length)  // a used id the driver never posted: counted as an error
                continue
            }
            let slot = slotOf[Int(id)]
            slotOf[Int(id)] = -1
            free.append(UInt16(id))
            body(slot, length)
        }
        return n
    }

    var inFlight: Int { size - free.count }
}

/// What the driver saw.
public struct DriverCounts: Sendable, Equatable, Codable {
    /// Packets put on the transmit ring.
    public var packetsSent = 0
    /// Packets taken back from the receive ring.
    public var packetsReceived = 0
    /// Received packets whose payload differed from what was sent.
    public var payloadErrors = 0
    /// The first payload error, described.
    public var firstPayloadError: String?
    /// All zero.
    public init() {}
}

final class VirtioNetDriver {
    static let headerBytes = 12
    static let slotBytes = 2048
    static let buffersOffset = 2 << 20
    static let etherType: UInt16 = 0x88B5

    let base: UnsafeMutableRawPointer
    let iovaBase: UInt64
    let slots: Int
    let frameBytes: Int
    let rx: SplitRing
    let tx: SplitRing
    private var inUse: [Bool]
    private var cursor = 0
    private var nextSequence: UInt64 = 1
    var counts = DriverCounts()

    /// `memory` bytes at `base` (host address) and `iovaBase`, of which buffers use the
    /// first `workingSet`; frames of `frameBytes`.
    init(
        base: UnsafeMutableRawPointer, iovaBase: UInt64, memory: UInt64, workingSet: UInt64, frameBytes: Int,
        queueSize: Int
    ) throws {
        let used = min(memory, workingSet)
        precondition(
            used >= UInt64(Self.buffersOffset + 4 * queueSize * Self.slotBytes), "memory too small for the driver")
        self.base = base
        self.iovaBase = iovaBase
        self.frameBytes = frameBytes
        slots = (Int(used) - Self.buffersOffset) / Self.slotBytes
        inUse = Array(repeating: false, count: slots)
        rx = try SplitRing(index: 0, size: queueSize, base: base, iova: iovaBase)
        tx = try SplitRing(
            index: 1, size: queueSize, base: base + SplitRing.stride, iova: iovaBase + UInt64(SplitRing.stride))
    }

    private func slotAddress(_ slot: Int) -> UnsafeMutableRawPointer {
        base + Self.buffersOffset + slot * Self.slotBytes
    }
    private func slotIOVA(_ slot: Int) -> UInt64 { iovaBase + UInt64(Self.buffersOffset + slot * Self.slotBytes) }

    /// The next buffer not posted, round-robin over the memory.
    private func takeSlot() -> Int? {
        for _ in 0..<slots {
            let s = cursor
            cursor = cursor + 1 == slots ? 0 : cursor + 1
            if !inUse[s] {
                inUse[s] = true
                return s
            }
        }
        return nil
    }

    /// Keeps every RX descriptor posted.
    func refill() {
        var posted = false
        while !rx.free.isEmpty, let s = takeSlot() {
            _ = rx.post(address: slotIOVA(s), length: UInt32(Self.slotBytes), writable: true, slot: s)
            posted = true
        }
        if posted { rx.publish() }
    }

    /// Sends up to `count` packets (as many TX descriptors as are free).
    func send(_ count: Int) {
        var sent = 0
        while sent < count, !tx.free.isEmpty, let s = takeSlot() {
            let p = slotAddress(s)
            Self.write(p, sequence: nextSequence, frameBytes: frameBytes)
            _ = tx.post(address: slotIOVA(s), length: UInt32(Self.headerBytes + frameBytes), writable: false, slot: s)
            nextSequence += 1
            sent += 1
        }
        if sent > 0 {
            tx.publish()
            counts.packetsSent += sent
        }
    }

    /// Reaps both used rings, checking every received packet. Returns entries taken.
    func poll() -> Int {
        var n = tx.reap { slot, _ in
            if slot >= 0 { inUse[slot] = false }
        }
        n += rx.reap { slot, length in
            guard slot >= 0 else {
                fail("the back-end used an RX descriptor the driver never posted")
                return
            }
            inUse[slot] = false
            counts.packetsReceived += 1
            if let why = Self.check(slotAddress(slot), length: Int(length), frameBytes: frameBytes) { fail(why) }
        }
        return n
    }

    private func fail(_ why: String) {
        counts.payloadErrors += 1
        if counts.firstPayloadError == nil { counts.firstPayloadError = why }
    }

    static func payloadByte(_ sequence: UInt64, _ i: Int) -> UInt8 {
        UInt8(truncatingIfNeeded: sequence &* 0x9E37_79B9 &+ UInt64(i) &* 31 &+ (sequence >> 8))
    }

    /// Header (zero), Ethernet (broadcast destination, local source, 0x88B5), sequence, payload.
    static func write(_ p: UnsafeMutableRawPointer, sequence: UInt64, frameBytes: Int) {
        memset(p, 0, headerBytes)
        let f = p + headerBytes
        memset(f, 0xFF, 6)
        let source: [UInt8] = [0x02, 0x69, 0x6F, 0x70, 0x66, 0x01]
        source.withUnsafeBytes { (f + 6).copyMemory(from: $0.baseAddress!, byteCount: 6) }
        f.storeBytes(of: etherType.bigEndian, toByteOffset: 12, as: UInt16.self)
        f.storeBytes(of: sequence, toByteOffset: 14, as: UInt64.self)
        let b = f.assumingMemoryBound(to: UInt8.self)
        for i in 22..<frameBytes { b[i] = payloadByte(sequence, i) }
    }

    /// Nil when the packet is one this driver sent, whole and unchanged; else why not.
    static func check(_ p: UnsafeMutableRawPointer, length: Int, frameBytes: Int) -> String? {
        guard length == headerBytes + frameBytes else {
            return "a received packet is \(length) bytes, sent \(headerBytes + frameBytes)"
        }
        let f = p + headerBytes
        guard UInt16(bigEndian: f.load(fromByteOffset: 12, as: UInt16.self)) == etherType else {
            return "a received packet's ethertype is not 0x88B5"
        }
        let sequence = f.loadUnaligned(fromByteOffset: 14, as: UInt64.self)
        let b = f.assumingMemoryBound(to: UInt8.self)
        for i in 22..<frameBytes where b[i] != payloadByte(sequence, i) {
            return "packet \(sequence): byte \(i) is \(b[i]), sent \(payloadByte(sequence, i))"
        }
        return nil
    }
}

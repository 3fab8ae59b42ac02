// HostDirty.swift — dirty tracking for hosts in other processes (protocol 1.2), on the
// loop thread: DIRTY_START, DIRTY_STOP and DIRTY_READ over the host's own engine, whose
// tracking (DirtyTracking.swift) write-protects leaves and logs write faults.
//
// Exactness, as in process: a write that lands after the reply to DIRTY_START, or after
// the reply to a DIRTY_READ, is in that range's next report or the one after. Both
// replies wait until every device of the host acknowledged the write-protection the
// request posted (`afterExternalDevices`): until then a device may still hold a writable
// translation, and only writes to pages whose bits were already set can go through it.
//
// Trust: started ranges are at most `DirtyLimits.maxRanges` and never overlap, not even
// through a mapping that two of them touch (a stop of one would otherwise stop the
// other's); a stop names a started range exactly; a read lies inside one started range,
// covers at most `DirtyLimits.maxReadBytes`, and only one is answered at a time. The
// bitmap goes inline (at most 8 KiB) or into a memfd the host sends with the read: a
// memfd of 4 KiB pages sealed against shrinking, large enough, mapped by the service for
// the copy only and written through probed pages (probe.c), never with a system call on
// the host's file. Every refusal is an error reply naming what was wrong.

import CIOPFShim
import Glibc
import IOPFCore
import IOPFSystem
import IOPFWire

extension EventLoop {
    private func refuseDirty(
        _ p: Peer, _ header: MessageHeader, _ errno: UInt32, _ kind: ProtocolErrorKind, _ text: String
    ) {
        stats.protocolError(kind)
        reply(p, Wire.errorReply(command: header.command, id: header.id, errno: errno, text: text))
    }

    private func rangeText(_ r: Range<UInt64>) -> String { "[\(hex(r.lowerBound)), +\(hex(UInt64(r.count))))" }

    func hostDirtyStart(_ p: Peer, _ header: MessageHeader, _ request: DirtyStartRequest) {
        guard let s = p.space else { return }
        let range = request.iova..<(request.iova + request.size)
        guard range.upperBound <= IOPageTable.iovaLimit else {
            return refuseDirty(
                p, header, WireErrno.invalid, .badDirtyRange,
                "DIRTY_START \(rangeText(range)) ends past the I/O address space (\(hex(IOPageTable.iovaLimit)))")
        }
        guard s.host!.dirtyRanges.count < DirtyLimits.maxRanges else {
            return refuseDirty(
                p, header, WireErrno.noSpace, .badDirtyRange,
                "DIRTY_START: \(DirtyLimits.maxRanges) ranges are started already (stop one first)")
        }
        let span = s.engine.trackingSpan(iova: request.iova, size: request.size)
        if let other = s.host!.dirtyRanges.first(where: {
            s.engine.trackingSpan(iova: $0.lowerBound, size: UInt64($0.count)).overlaps(span)
        }) {
            return refuseDirty(
                p, header, WireErrno.exists, .badDirtyRange,
                """
                DIRTY_START \(rangeText(range)) overlaps the started range \(rangeText(other)), itself or through a \
                mapping both touch (tracking covers whole mappings)
                """)
        }
        do { try s.engine.startDirtyTracking(iova: request.iova, size: request.size) } catch {
            return refuseDirty(p, header, WireErrno.invalid, .badDirtyRange, "DIRTY_START: \(error)")
        }
        s.host!.dirtyRanges.append(range)
        stats.host(s.id) { $0.dirtyRanges += 1 }
        afterExternalDevices(space: s.id) { [self] in
            reply(p, Wire.message(command: .dirtyStart, id: header.id, flags: .reply))
        }
    }

    func hostDirtyStop(_ p: Peer, _ header: MessageHeader, _ request: DirtyStopRequest) {
        guard let s = p.space else { return }
        let range = request.iova..<(request.iova + request.size)
        guard let i = s.host!.dirtyRanges.firstIndex(of: range) else {
            return refuseDirty(
                p, header, WireErrno.noEntry, .badDirtyRange,
                "DIRTY_STOP \(rangeText(range)) is not a started range (a stop names exactly what DIRTY_START started)")
        }
        do { try s.engine.stopDirtyTracking(iova: request.iova, size: request.size) } catch {
            return refuseDirty(p, header, WireErrno.invalid, .badDirtyRange, "DIRTY_STOP: \(error)")
        }
        s.host!.dirtyRanges.remove(at: i)
        stats.host(s.id) { $0.dirtyRanges -= 1 }
        // Write access comes back: no device needs to drop anything.
        reply(p, Wire.message(command: .dirtyStop, id: header.id, flags: .reply))
    }

    /// DIRTY_READ; owns `fds` (none, or the bitmap's memfd), closed before it returns.
    func hostDirtyRead(_ p: Peer, _ header: MessageHeader, _ payload: UnsafeRawBufferPointer, fds: [CInt]) {
        defer { for fd in fds { Sys.close(fd) } }
        guard let s = p.space else { return }
        let request: DirtyReadRequest
        do { request = try DirtyReadRequest(payload: payload) } catch {
            return refuseDirty(p, header, error.errno, error.kind, error.description)
        }
        let range = request.iova..<(request.iova + request.size)
        let window: BitmapWindow?
        do { window = try bitmapTarget(s, "DIRTY_READ", range, offset: request.bitmapOffset, fds: fds) } catch {
            return refuseDirty(p, header, error.errno, error.kind, error.description)
        }
        defer { window?.close() }
        let bits: PageBitmap
        do { bits = try s.engine.readAndClearDirty(iova: request.iova, size: request.size) } catch {
            return refuseDirty(p, header, WireErrno.invalid, .badDirtyRange, "DIRTY_READ: \(error)")
        }
        let dirty = report(s, bits, window)
        afterExternalDevices(space: s.id) { [self] in
            s.host!.dirtyReadPending = false
            reply(p, dirty.message(id: header.id, flags: .reply))
        }
    }

    /// DMA_UNMAP with GET_DIRTY (1.3): the range's dirty pages read under the engine's lock
    /// with the removal (`FaultEngine.unmapReadingDirty`), so no write falls between; the
    /// range, the bitmap and the one-read-at-a-time rule are DIRTY_READ's. Nothing is
    /// removed and no bit is lost when it is refused.
    func hostUnmapReadingDirty(
        _ p: Peer, _ header: MessageHeader, _ s: AddressSpace, _ request: DMAUnmapRequest, fds: [CInt]
    ) {
        let range = request.iova..<(request.iova + request.size)
        let window: BitmapWindow?
        do {
            window = try bitmapTarget(s, "DMA_UNMAP with GET_DIRTY", range, offset: request.bitmapOffset, fds: fds)
        } catch { return refuseDirty(p, header, error.errno, error.kind, error.description) }
        defer { window?.close() }
        let removed: (hostRanges: [Range<UInt64>], dirty: PageBitmap)
        do { removed = try s.engine.unmapReadingDirty(iova: request.iova, size: request.size) } catch {
            return refuseDirty(p, header, WireErrno.invalid, .badMapping, "\(error)")
        }
        let bytes = noteUnmapped(s, removed.hostRanges)
        let dirty = report(s, removed.dirty, window)
        afterExternalDevices(space: s.id) { [self] in
            s.host!.dirtyReadPending = false
            reply(p, DMAUnmapReply(bytes: bytes, dirty: dirty).message(id: header.id, flags: .reply))
        }
    }

    /// Checks what a read of the log over `range` needs before the log is read: no read of
    /// the host's unanswered, the range inside one started range, and a bitmap that can be
    /// written (inline within 8 KiB, or a checked memfd window, returned mapped). A bitmap
    /// that cannot be written is refused with the bits still in the log.
    private func bitmapTarget(
        _ s: AddressSpace, _ what: String, _ range: Range<UInt64>, offset: UInt64, fds: [CInt]
    ) throws(HostRefusal) -> BitmapWindow? {
        guard !s.host!.dirtyReadPending else {
            throw HostRefusal(
                WireErrno.busy, .badState, "\(what): the previous read is not answered yet (one at a time per host)")
        }
        guard
            s.host!.dirtyRanges.contains(where: { $0.contains(range.lowerBound) && range.upperBound <= $0.upperBound })
        else {
            throw HostRefusal(
                WireErrno.noEntry, .badDirtyRange,
                "\(what) \(rangeText(range)) is not inside a started range (tracking is stopped there)")
        }
        guard fds.count <= 1 else {
            throw HostRefusal(
                WireErrno.badFD, .badDirtyBitmap,
                "\(what) carries one descriptor (the bitmap's memfd) or none, got \(fds.count)")
        }
        let bytes = DirtyLimits.bitmapBytes(pages: UInt64(range.count) >> 12)
        guard let fd = fds.first else {
            guard bytes <= DirtyLimits.maxInlineBitmapBytes, offset == 0 else {
                throw HostRefusal(
                    WireErrno.messageSize, .badDirtyBitmap,
                    """
                    \(what) \(rangeText(range)) needs a \(bytes)-byte bitmap: inline ones hold \
                    \(DirtyLimits.maxInlineBitmapBytes) bytes at offset 0; send a memfd for more
                    """)
            }
            return nil
        }
        do { return try BitmapWindow(fd, offset: offset, bytes: bytes, probes: probes) } catch {
            throw HostRefusal(error.errno, error.kind, "\(what): \(error.description)")
        }
    }

    /// Counts a read of the log, copies its bits into `window` or the reply, and marks the
    /// host's read pending until the reply.
    private func report(_ s: AddressSpace, _ bits: PageBitmap, _ window: BitmapWindow?) -> DirtyReadReply {
        let reported = UInt64(bits.population)
        var inline: [UInt8] = []
        if let window { window.copy(bits.littleEndianBytes) } else { inline = bits.littleEndianBytes }
        stats.host(s.id) {
            $0.dirtyReads += 1
            $0.dirtyPagesReported += Int(reported)
        }
        s.host!.dirtyReadPending = true
        return DirtyReadReply(reportedPages: reported, bitmap: inline)
    }
}

/// Where a DIRTY_READ's bitmap goes in the host's memfd: the memfd checked (4 KiB pages,
/// sealed against shrinking, not against writing, large enough) and just the bitmap's pages
/// mapped, confirmed by touching them (probe.c), so that the copy cannot fault: a page
/// the kernel cannot give is an error here, not a SIGBUS on the loop thread. No system
/// call on the host's file, whose inode lock the host could hold.
struct BitmapWindow {
    private let mapping: UnsafeMutableRawPointer
    private let length: Int
    private let start: Int

    init(_ fd: CInt, offset: UInt64, bytes: Int, probes: Bool) throws(HostRefusal) {
        let st = try RemoteHostMemory.inspect(fd, "the bitmap's memfd", kind: .badDirtyBitmap)
        let seals = iopf_seals(fd)
        guard seals >= 0, seals & RemoteHostMemory.sealShrink != 0 else {
            throw HostRefusal(
                WireErrno.notPermitted, .badDirtyBitmap, "the bitmap's memfd is not sealed with F_SEAL_SHRINK")
        }
        guard seals & (RemoteHostMemory.sealWrite | RemoteHostMemory.sealFutureWrite) == 0 else {
            throw HostRefusal(WireErrno.notPermitted, .badDirtyBitmap, "the bitmap's memfd is sealed against writing")
        }
        let end = offset + UInt64(bytes)
        guard UInt64(max(st.st_size, 0)) >= end else {
            throw HostRefusal(
                WireErrno.invalid, .badDirtyBitmap,
                "the bitmap's memfd has \(st.st_size) bytes; the bitmap ends at byte \(end)")
        }
        let first = offset & ~0xFFF
        length = Int((end + 0xFFF) & ~0xFFF - first)
        start = Int(offset - first)
        guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, off_t(first)),
            p != MAP_FAILED
        else {
            throw HostRefusal(
                WireErrno.invalid, .badDirtyBitmap, "cannot map the bitmap's memfd for writing: errno \(Glibc.errno)")
        }
        mapping = p
        do {
            try ProcessMemory.confirm(
                address: UInt64(UInt(bitPattern: p)), pageCount: length >> 12, write: true, probes: probes, planted: nil
            )
        } catch {
            munmap(p, length)
            throw HostRefusal(WireErrno.fault, .badDirtyBitmap, "the bitmap's memfd: \(error.reason)")
        }
    }

    /// Copies the bitmap in (its pages were confirmed).
    func copy(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { (mapping + start).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    }

    func close() { munmap(mapping, length) }
}

// HostClient.swift — the host side of the protocol (1.1; dirty tracking 1.2): a process that owns memory
// hands the service its address space (name, region table, memfds, userfaultfd) and
// declares DMA mappings into it, as a VMM does with VFIO type1. See Protocol.md, "Hosts".
//
// What the host must do, and must not: its memory is memfd-backed, mapped MAP_SHARED, the
// memfds sealed with F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL; its userfaultfd went through UFFDIO_API with
// EVENT_REMOVE | EVENT_UNMAP | EVENT_REMAP (not EVENT_FORK) and has no ranges registered
// by the host itself; the host never reads it. After mremap or mmap(MAP_FIXED) over
// mapped memory it re-declares the mapping's address (`updateHostAddress`); faults there
// are answered INVALID until it does.

import CIOPFShim
import Glibc
import IOPFCore
import IOPFSystem
import IOPFWire
import SystemPackage

/// A host's connection to the service: it hands over its memory and userfaultfd, maps IOVAs onto it, and attaches
/// vhost-user back-ends.
public final class HostClient: @unchecked Sendable {
    private let connection: ControlConnection

    /// Connects to a service listening at `path` and says HELLO as a host.
    public convenience init(connectingTo path: String) throws(DeviceClientError) {
        let fd: CInt
        do { fd = try Sys.connectUnix(path: path) } catch { throw .system(error) }
        try self.init(socket: FileDescriptor(rawValue: fd))
    }

    /// A host client on a connected socket (which it owns from now on); says HELLO as a host.
    public init(socket: FileDescriptor) throws(DeviceClientError) {
        connection = try ControlConnection(socket: socket.rawValue, role: .host)
    }

    /// Creates a userfaultfd the service can use (UFFDIO_API with the three events) and
    /// returns it; the caller sends it with `declare` and closes its own copy after.
    public static func makeUserfaultfd() throws(SystemCallError) -> FileDescriptor {
        // User-mode only: the service needs the events, not kernel-mode faults, and
        // unprivileged hosts get no userfaultfd without it (vm.unprivileged_userfaultfd = 0).
        let fd = try syscall("userfaultfd") { iopf_userfaultfd(O_CLOEXEC | O_NONBLOCK | CInt(UFFD_USER_MODE_ONLY)) }
        let wanted = UInt64(UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP)
        var granted: UInt64 = 0
        var ioctls: UInt64 = 0
        if iopf_uffd_api(fd, wanted, &granted, &ioctls) != 0 || granted & wanted != wanted {
            let e = Glibc.errno
            Sys.close(fd)
            throw SystemCallError("ioctl(UFFDIO_API)", .init(rawValue: e == 0 ? EINVAL : e))
        }
        return FileDescriptor(rawValue: fd)
    }

    /// HOST: hands over the address space. `memfds[k]` backs the regions whose `fdIndex`
    /// is k. The service keeps its own copies of the descriptors.
    /// Devices of this process's uid may attach to it, and of each uid in `allowedUIDs`.
    public func declare(
        name: String, regions: [HostRegionEntry], userfaultfd: FileDescriptor, memfds: [FileDescriptor],
        allowedUIDs: [UInt32] = []
    ) throws(DeviceClientError) {
        let declaration = HostDeclaration(name: name, regions: regions, allowedUIDs: allowedUIDs)
        _ = try connection.request(
            declaration.message(id: connection.takeID()),
            fds: [userfaultfd.rawValue] + memfds.map(\.rawValue), expecting: .host)
    }

    /// DMA_MAP: `[iova, iova + size)` → host addresses from `hostAddress`, on fault; or,
    /// `pinned` (1.2), pinned and mapped whole before it returns, as VFIO type1 maps.
    public func map(iova: UInt64, hostAddress: UInt64, size: UInt64, prot: Protection, pinned: Bool = false)
        throws(DeviceClientError)
    {
        let flags =
            (prot.contains(.read) ? DMAMapRequest.read : 0) | (prot.contains(.write) ? DMAMapRequest.write : 0)
            | (pinned ? DMAMapRequest.pin : 0)
        _ = try connection.request(
            DMAMapRequest(iova: iova, hostAddress: hostAddress, size: size, flags: flags)
                .message(id: connection.takeID()), expecting: .dmaMap)
    }

    /// DMA_MAP with VADDR: the mapping `[iova, iova + size)` now lives at `hostAddress`.
    /// Returns once every device dropped translations to the old addresses.
    public func updateHostAddress(iova: UInt64, size: UInt64, hostAddress: UInt64) throws(DeviceClientError) {
        _ = try connection.request(
            DMAMapRequest(iova: iova, hostAddress: hostAddress, size: size, flags: DMAMapRequest.vaddr)
                .message(id: connection.takeID()), expecting: .dmaMap)
    }

    /// DMA_UNMAP: removes the whole mappings inside the range; returns the bytes unmapped,
    /// once every device dropped their translations.
    @discardableResult
    public func unmap(iova: UInt64, size: UInt64) throws(DeviceClientError) -> UInt64 {
        let (bytes, _) = try connection.request(
            DMAUnmapRequest(iova: iova, size: size).message(id: connection.takeID()),
            expecting: .dmaUnmap)
        do { return try DMAUnmapReply(message: bytes).bytes } catch { throw .protocolViolation("\(error)") }
    }

    /// SYNC: returns once every device acknowledged the invalidations of every host event
    /// the service read before it (so after a madvise/munmap/mremap returned, no device
    /// uses the old translations any more).
    public func sync() throws(DeviceClientError) {
        _ = try connection.request(Wire.message(command: .sync, id: connection.takeID()), expecting: .sync)
    }

    /// VHOST: the service serves a vhost-user back-end in this address space from now on
    /// (its IOTLB misses, its invalidations). `socket` is the back-end's vhost-user socket
    /// after the handshake, `channel` the front-end's end of its back-end channel; the
    /// service keeps copies, the caller keeps its own (and must not read the socket until
    /// it takes the back-end back by closing the channel, or the host detaches).
    public func attachVhost(
        socket: FileDescriptor, channel: FileDescriptor, _ request: VhostAttachRequest
    ) throws(DeviceClientError) {
        _ = try connection.request(
            request.message(id: connection.takeID()), fds: [socket.rawValue, channel.rawValue], expecting: .vhost)
    }

    /// DIRTY_START (1.2): dirty tracking starts on every mapping the range touches and on
    /// mappings created inside it later. Returns once every device dropped its writable
    /// translations: a write after this is logged.
    public func startDirtyTracking(iova: UInt64, size: UInt64) throws(DeviceClientError) {
        _ = try connection.request(
            DirtyStartRequest(iova: iova, size: size).message(id: connection.takeID()), expecting: .dirtyStart)
    }

    /// DIRTY_STOP (1.2): stops the range started exactly as `[iova, iova + size)`.
    public func stopDirtyTracking(iova: UInt64, size: UInt64) throws(DeviceClientError) {
        _ = try connection.request(
            DirtyStopRequest(iova: iova, size: size).message(id: connection.takeID()), expecting: .dirtyStop)
    }

    /// DIRTY_READ (1.2) with the bitmap inline (ranges up to 256 MiB): the pages written
    /// since the last read, cleared now. Bit k is the page at `iova + k * 4 KiB`.
    public func readDirty(iova: UInt64, size: UInt64) throws(DeviceClientError) -> PageBitmap {
        let (bytes, _) = try connection.request(
            DirtyReadRequest(iova: iova, size: size).message(id: connection.takeID()), expecting: .dirtyRead)
        let reply: DirtyReadReply
        do { reply = try DirtyReadReply(message: bytes) } catch { throw .protocolViolation("\(error)") }
        return try Self.bitmap(reply, size: size, "DIRTY_READ")
    }

    /// DIRTY_READ (1.2) into `memfd` (sealed against shrinking) at byte `offset`: the
    /// service writes the bitmap there before it answers. Returns the pages reported.
    @discardableResult
    public func readDirty(iova: UInt64, size: UInt64, into memfd: FileDescriptor, at offset: UInt64 = 0)
        throws(DeviceClientError) -> UInt64
    {
        let (bytes, _) = try connection.request(
            DirtyReadRequest(iova: iova, size: size, bitmapOffset: offset).message(id: connection.takeID()),
            fds: [memfd.rawValue], expecting: .dirtyRead)
        do { return try DirtyReadReply(message: bytes).reportedPages } catch { throw .protocolViolation("\(error)") }
    }

    /// DMA_UNMAP with GET_DIRTY (1.3; VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP), the bitmap
    /// inline (ranges up to 256 MiB, inside a started range): removes the whole mappings
    /// inside the range and returns the bytes unmapped and the pages written there since
    /// the last read of the log, read with the removal so that no write falls between.
    public func unmapReadingDirty(iova: UInt64, size: UInt64) throws(DeviceClientError) -> (
        bytes: UInt64, dirty: PageBitmap
    ) {
        let reply = try unmapReadingDirty(DMAUnmapRequest(iova: iova, size: size, flags: DMAUnmapRequest.getDirty))
        return (reply.bytes, try Self.bitmap(reply.dirty!, size: size, "DMA_UNMAP"))
    }

    /// DMA_UNMAP with GET_DIRTY (1.3), the bitmap written into `memfd` (sealed against
    /// shrinking) at byte `offset` before the reply. Returns the bytes unmapped and the
    /// pages reported.
    public func unmapReadingDirty(iova: UInt64, size: UInt64, into memfd: FileDescriptor, at offset: UInt64 = 0)
        throws(DeviceClientError) -> (bytes: UInt64, reportedPages: UInt64)
    {
        let reply = try unmapReadingDirty(
            DMAUnmapRequest(iova: iova, size: size, flags: DMAUnmapRequest.getDirty, bitmapOffset: offset),
            fds: [memfd.rawValue])
        return (reply.bytes, reply.dirty!.reportedPages)
    }

    private func unmapReadingDirty(_ request: DMAUnmapRequest, fds: [CInt] = []) throws(DeviceClientError)
        -> DMAUnmapReply
    {
        let (bytes, _) = try connection.request(
            request.message(id: connection.takeID()), fds: fds, expecting: .dmaUnmap)
        let reply: DMAUnmapReply
        do { reply = try DMAUnmapReply(message: bytes) } catch { throw .protocolViolation("\(error)") }
        guard reply.dirty != nil else { throw .protocolViolation("DMA_UNMAP reply: no dirty pages after GET_DIRTY") }
        return reply
    }

    /// The inline bitmap of a log read over `size` bytes, checked to have its bits.
    private static func bitmap(_ reply: DirtyReadReply, size: UInt64, _ what: String) throws(DeviceClientError)
        -> PageBitmap
    {
        let pages = Int(size >> 12)
        guard reply.bitmap.count == DirtyLimits.bitmapBytes(pages: UInt64(pages)) else {
            throw .protocolViolation("\(what) reply: \(reply.bitmap.count) bitmap bytes for \(pages) pages")
        }
        return reply.bitmap.withUnsafeBytes { PageBitmap(count: pages, littleEndianBytes: $0) }
    }

    /// DETACH: the service tears the address space down (devices detached, mappings
    /// removed, ranges unregistered) before it answers.
    public func detach() throws(DeviceClientError) {
        _ = try connection.request(Empty().message(id: connection.takeID()), expecting: .detach)
    }

    /// Closes the connection: the service tears the host's address space down and detaches its devices.
    public func close() { connection.close() }
}

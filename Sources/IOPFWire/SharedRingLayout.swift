// SharedRingLayout.swift — the byte layout of the shared fault channel: one memfd holding
// two single-producer/single-consumer rings, mapped by the device and by the service.
// Part of the protocol (see IOPFWire.docc/Protocol.md): clients in any language lay it
// out exactly so.
//
//   offset  field (UInt32, free-running; slot = index % entries)
//   0       request head    written by the service (it consumes requests)
//   64      request tail    written by the device (it produces requests)
//   128     response head   written by the device (it consumes responses)
//   192     response tail   written by the service (it produces responses)
//   200     answered at     UInt64, written by the service when `stamps wanted` is not
//                           0: CLOCK_MONOTONIC nanoseconds when it published its latest
//                           responses, stored before the tail; diagnostic only (latency
//                           as a hardware device would see it), never trusted
//   208     stamps wanted   UInt32, written by the device (once, before its first
//                           request): not 0 asks for `answered at`, a clock read per publish
//   256     device waiting  the device sleeps on its wake eventfd; the service must ring it
//   320     service waiting the service sleeps; the device must ring its doorbell eventfd
//   384     closed by the device
//   448     closed by the service
//   4096    request slots: entries x 40 bytes (struct iommu_hwpt_pgfault)
//   then    response slots: entries x 8 bytes (struct iommu_hwpt_page_response)
//
// Ordering: a producer writes slots, then publishes the tail with a release store; the
// consumer reads the tail with an acquire load. A sleeper sets its waiting flag, then
// re-checks the ring (both sequentially consistent), so a producer that saw the flag clear
// had published before the re-check: no wake-up is lost.

/// The layout of the shared ring pair: a header page of indices and flags, then the request and response slots.
public enum SharedRingLayout {
    /// Slots in each ring.
    @inlinable public static var entries: Int { 256 }
    /// The header page's size.
    @inlinable public static var headerBytes: Int { 4096 }
    /// Where the request slots start.
    @inlinable public static var requestSlotsOffset: Int { headerBytes }
    /// Where the response slots start.
    @inlinable public static var responseSlotsOffset: Int { headerBytes + entries * PageRequest.byteCount }
    /// The size of the whole mapping.
    @inlinable public static var byteCount: Int { responseSlotsOffset + entries * PageResponse.byteCount }

    /// The service's "answered at" stamp (UInt64, CLOCK_MONOTONIC ns), on the response
    /// tail's cache line: the device reads it with the tail at no extra transfer.
    @inlinable public static var answeredAtOffset: Int { 200 }
    /// Set (not 0) by a device that wants the stamp; the service reads it on the line it
    /// writes anyway.
    @inlinable public static var stampsWantedOffset: Int { 208 }

    /// The header's UInt32 fields, each on its own 64-byte cache line.
    public enum Field: Int, CaseIterable, Sendable {
        /// The indices and flags, one 64-byte cache line each.
        case requestHead = 0, requestTail, responseHead, responseTail, deviceWaiting, serviceWaiting, deviceClosed,
            serviceClosed
        /// The field's offset in the header page.
        @inlinable public var offset: Int { rawValue * 64 }
    }
}

// FuzzSeams.swift — the few internals the fuzz targets (IOPFFuzzing) drive, behind
// package-visible wrappers, so that the types themselves stay internal. Making the loop's
// `SharedRingTransport.poll` package-visible instead cost 5% per fault (one in flight,
// 816 against 856 ns p50, interleaved runs): the optimizer stops specializing it for its
// one caller.

@_spi(SharedRings) import IOPFSystem

/// A shared-ring transport as the loop holds it, for a fuzzer playing the device.
package final class SharedRingSeam {
    let transport: SharedRingTransport
    /// The ring the device side writes.
    package var queue: SharedQueue { transport.queue }

    /// A transport with its ring and eventfds; the device's ends are closed here.
    package init() throws(SystemCallError) {
        let (transport, ends) = try SharedRingTransport.make()
        ends.close()
        self.transport = transport
    }

    /// Takes up to `limit` records as the loop does; nil when the transport refuses the
    /// ring (the loop would disconnect the device).
    package func poll(limit: Int, records body: (UnsafeRawBufferPointer) -> Void) -> Int? {
        do { return try transport.poll(limit: limit, records: body) } catch { return nil }
    }
}

/// Userfaultfd messages as the loop decodes them.
package enum HostEventSeam {
    /// The size of one userfaultfd message.
    package static let messageBytes = UserfaultfdSource.messageBytes

    /// The range a message invalidates and whether its memory is gone; nil for none.
    package static func invalidation(_ bytes: UnsafeRawBufferPointer) -> (range: Range<UInt64>, gone: Bool)? {
        HostEvent(bytes).invalidation
    }
}

// ProtocolErrorKind.swift — every way a peer (device, host, vhost-user back-end) can be
// refused, fenced or disconnected, by one stable name. The service counts them under these
// names (`protocolErrorKinds` in `iopf serve --json`) and the protocol document lists them.

/// Why the service refused a request, fenced a device or disconnected a peer.
///
/// The raw value is the name the statistics and JSON output use; it never changes.
public enum ProtocolErrorKind: String, Sendable, Hashable, CaseIterable, Codable, CodingKeyRepresentable {
    // Messages (see `WireError`).
    /// A header that is truncated, too large, of the wrong size, or has unknown flags or type.
    case badHeader
    /// A command this version does not know.
    case unknownCommand
    /// A payload of the wrong size for its command.
    case badSize
    /// A field out of range, unaligned, or reserved and not zero.
    case badField
    /// A message longer than the service accepts.
    case tooLarge
    /// Descriptors attached to a message that carries none.
    case unexpectedFDs
    /// A command not allowed in the peer's state (before HELLO, a reply where a request belongs).
    case badState
    /// A HELLO with a protocol version the service does not speak.
    case badVersion
    /// No HELLO within the greeting deadline.
    case greetingTimeout
    /// A peer that does not read its socket: the service's replies would have to queue.
    case slowReader

    // Connections.
    /// More peers than the service admits.
    case tooManyPeers
    /// More peers of one uid than the service admits.
    case tooManyPeersForUID

    // Devices: fault records, rings and invalidations.
    /// A page request that failed the wire checks, or a group that changed its cookie.
    case badRecord
    /// A page request for a device id or PASID not attached on that channel.
    case unknownDevice
    /// More requests outstanding than the device's credit.
    case creditExceeded
    /// Shared-ring indices further apart than the ring holds.
    case ringOverrun
    /// Responses the device does not consume, past the bound the service keeps.
    case responseBacklog
    /// An invalidation acknowledgement that is malformed.
    case badAck
    /// An acknowledgement of a sequence never sent.
    case unknownAck
    /// No acknowledgement before the invalidation deadline: the device is fenced.
    case invalidateTimeout
    /// The invalidation socket failed (reset, or an error receiving on it).
    case invalidationSocket
    /// An ATTACH naming an address space this peer may not use, or none by that name.
    case unknownAddressSpace
    /// An ATTACH naming an address space that several hosts of other uids admit.
    case ambiguousAddressSpace

    // Hosts.
    /// More hosts than the service admits.
    case tooManyHosts
    /// A HOST declaring a name this uid has attached already.
    case nameTaken
    /// A region table that is empty, overlapping, unaligned, or past the limits.
    case badRegionTable
    /// A memfd that is not one, is too small, or lacks the required seals.
    case badMemfd
    /// A userfaultfd that is not one, or without the events the service needs.
    case badUserfaultfd
    /// A DMA_MAP or DMA_UNMAP with a bad range, overlap or flags.
    case badMapping
    /// A DMA_UNMAP of a range no mapping covers.
    case noSuchMapping
    /// Host addresses outside every declared region.
    case notHostMemory
    /// Host memory the kernel cannot watch (userfaultfd registration refused).
    case cannotWatch
    /// A region whose backing the service cannot check.
    case unverifiable
    /// The service could not allocate what the request needs.
    case noMemory
    /// A host's declared memory past its budget.
    case hostMemoryBudget
    /// A host's mapped IOVA space past its budget.
    case hostMappedBudget
    /// A host's pinned memory past its budget or its RLIMIT_MEMLOCK, or memory that could
    /// not be pinned.
    case hostPinnedBudget
    /// A DIRTY_START overlapping a started range (or its mappings), past the range limit, or a
    /// DIRTY_STOP or DIRTY_READ of a range no DIRTY_START started.
    case badDirtyRange
    /// A DIRTY_READ bitmap that does not fit: inline past its limit, or a memfd that is not
    /// one, is too small, is not sealed against shrinking, or cannot be written.
    case badDirtyBitmap

    // vhost-user back-ends.
    /// More vhost-user back-ends for one host than the service serves.
    case tooManyVhostBackends
    /// VHOST sockets that are not a Unix stream socket and a SEQPACKET channel.
    case badVhostSockets
    /// A back-end message that is malformed, oversized, or carries descriptors.
    case badVhostMessage
    /// A REPLY_ACK that answers nothing, or answers with an error.
    case badVhostReply
    /// A back-end that reported an access failure for an IOVA it was given.
    case vhostAccessFail
}

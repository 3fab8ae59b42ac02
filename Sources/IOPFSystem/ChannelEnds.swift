// ChannelEnds.swift — the file descriptors of one fault channel, as handed from the
// service to a device (in-process, or by SCM_RIGHTS over the device socket).

import Glibc
import SystemPackage

/// How page requests travel between a device and the service (chosen by measurement, see
/// docs/benchmarks.md, "Fault channel"): shared rings in a memfd with eventfd doorbells rung only for
/// sleepers (the default), a socketpair, or a pipe each way.
public enum ChannelTransport: String, Sendable, CaseIterable {
    /// A shared ring with two eventfds; a stream socket pair; a pair of pipes.
    case shared, socket, pipe
}

/// The device's end of a fault channel. Whoever holds it owns the descriptors.
public enum DeviceChannelEnds: Sendable {
    /// The ring memfd, the doorbell eventfd (the device rings the service) and the wake
    /// eventfd (the service rings the device).
    case shared(queue: FileDescriptor, doorbell: FileDescriptor, wake: FileDescriptor)
    /// Byte streams: requests written to `write`, responses read from `read` (one
    /// descriptor for a socket).
    case stream(read: FileDescriptor, write: FileDescriptor)

    package var fds: [CInt] {
        switch self {
        case .shared(let q, let d, let w): [q.rawValue, d.rawValue, w.rawValue]
        case .stream(let r, let w): r == w ? [r.rawValue] : [r.rawValue, w.rawValue]
        }
    }

    package func close() {
        for fd in fds { Sys.close(fd) }
    }
}

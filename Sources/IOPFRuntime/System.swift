// System.swift — one small wrapper per system call, after swift-nio's System.swift: each
// is @inline(never) so nothing runs between the call and reading errno, and failures
// become a `SystemCallError` that names the call. EINTR is retried in one place.

import CIOPFShim
import CLiburing  // brings <sys/eventfd.h>
import Glibc
import SystemPackage

/// A failed system call: which one, and the errno it returned.
public struct SystemCallError: Error, Sendable, Equatable, CustomStringConvertible {
    public var call: String
    public var errno: Errno
    public init(_ call: String, _ errno: Errno) {
        self.call = call
        self.errno = errno
    }
    public var description: String { "\(call): \(errno) (errno \(errno.rawValue))" }
}

/// Runs `body` until it does not fail with EINTR; -1 becomes a thrown error naming `call`.
@inline(never)
func syscall<T: FixedWidthInteger>(_ call: String, _ body: () -> T) throws(SystemCallError) -> T {
    while true {
        let r = body()
        if r != -1 { return r }
        let e = Errno(rawValue: Glibc.errno)
        if e == .interrupted { continue }
        throw SystemCallError(call, e)
    }
}

enum Sys {
    @inline(never)
    static func read(_ fd: CInt, _ buffer: UnsafeMutableRawBufferPointer) throws(SystemCallError) -> Int {
        try syscall("read") { Glibc.read(fd, buffer.baseAddress, buffer.count) }
    }

    @inline(never)
    static func write(_ fd: CInt, _ buffer: UnsafeRawBufferPointer) throws(SystemCallError) -> Int {
        try syscall("write") { Glibc.write(fd, buffer.baseAddress, buffer.count) }
    }

    /// Writes all of `buffer`, looping over short writes.
    static func writeAll(_ fd: CInt, _ buffer: UnsafeRawBufferPointer) throws(SystemCallError) {
        var done = 0
        while done < buffer.count {
            done += try write(fd, UnsafeRawBufferPointer(rebasing: buffer[done...]))
        }
    }

    static func close(_ fd: CInt) {
        // Linux closes the fd even when close returns EINTR: never retry.
        _ = Glibc.close(fd)
    }

    @inline(never)
    static func eventfd(initial: UInt32 = 0, flags: CInt = CInt(EFD_CLOEXEC | EFD_NONBLOCK)) throws(SystemCallError) -> CInt {
        try syscall("eventfd") { CLiburing.eventfd(initial, flags) }
    }

    @inline(never)
    static func socketpair() throws(SystemCallError) -> (CInt, CInt) {
        var fds: [CInt] = [-1, -1]
        _ = try syscall("socketpair") { Glibc.socketpair(AF_UNIX, CInt(SOCK_STREAM.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &fds) }
        return (fds[0], fds[1])
    }

    @inline(never)
    static func pipe() throws(SystemCallError) -> (read: CInt, write: CInt) {
        var fds: [CInt] = [-1, -1]
        _ = try syscall("pipe2") { iopf_pipe2(&fds, 0) }
        return (fds[0], fds[1])
    }

    @inline(never)
    static func dup(_ fd: CInt) throws(SystemCallError) -> CInt {
        try syscall("fcntl(F_DUPFD_CLOEXEC)") { fcntl(fd, F_DUPFD_CLOEXEC, 0) }
    }

    static func setNonBlocking(_ fd: CInt, _ on: Bool) throws(SystemCallError) {
        let flags = try syscall("fcntl(F_GETFL)") { fcntl(fd, F_GETFL) }
        _ = try syscall("fcntl(F_SETFL)") { fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK) }
    }

    /// Waits until `fd` is readable or `timeoutMs` passes (-1: forever). True when readable.
    static func pollReadable(_ fd: CInt, timeoutMs: CInt) throws(SystemCallError) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return try syscall("poll") { Glibc.poll(&p, 1, timeoutMs) } > 0
    }
}

// System.swift — one small wrapper per system call, after swift-nio's System.swift: each
// is @inline(never) so nothing runs between the call and reading errno, and failures
// become a `SystemCallError` that names the call. EINTR is retried in one place.

import CIOPFShim  // brings <sys/eventfd.h>
import Glibc
import Synchronization
import SystemPackage

/// A failed system call: which one, and the errno it returned.
public struct SystemCallError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Which call failed.
    public var call: String
    /// The errno it returned.
    public var errno: Errno
    /// An error for `call` with `errno`.
    public init(_ call: String, _ errno: Errno) {
        self.call = call
        self.errno = errno
    }
    public var description: String { "\(call): \(errno) (errno \(errno.rawValue))" }
}

/// Runs `body` until it does not fail with EINTR; -1 becomes a thrown error naming `call`.
@inline(never)
package func syscall<T: FixedWidthInteger>(_ call: String, _ body: () -> T) throws(SystemCallError) -> T {
    while true {
        let r = body()
        if r != -1 { return r }
        let e = Errno(rawValue: Glibc.errno)
        if e == .interrupted { continue }
        throw SystemCallError(call, e)
    }
}

/// One small wrapper per system call, each throwing a `SystemCallError` that names the call.
public enum Sys {
    /// Online CPUs.
    public static var onlineCPUs: Int { max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN))) }

    /// The CPUs the calling thread may run on (its affinity mask, which taskset and
    /// cpusets narrow): how many, and the highest.
    public static var allowedCPUs: (count: Int, last: Int) {
        var last: CInt = -1
        let n = iopf_allowed_cpus(&last)
        return n > 0 ? (Int(n), Int(last)) : (onlineCPUs, onlineCPUs - 1)
    }

    /// The CPU the calling thread runs on now.
    public static var currentCPU: Int { Int(iopf_current_cpu()) }

    /// CLOCK_MONOTONIC in nanoseconds (vDSO, no system call): one clock for stamps that
    /// cross threads and processes (the shared ring's "answered at").
    @inline(__always) public static func monotonicNanoseconds() -> UInt64 {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return UInt64(t.tv_sec) &* 1_000_000_000 &+ UInt64(t.tv_nsec)
    }

    /// One mapping of this process, as /proc/self/smaps describes it.
    public struct Mapping: Sendable {
        /// The mapping's addresses.
        public var range: Range<UInt64>
        /// The inode of the file it maps (0 for anonymous memory): a memfd's is its own.
        public var inode: UInt64 = 0
        /// Its `VmFlags` mnemonics: `lo` locked (VM_LOCKED), `um`/`uw` registered with a
        /// userfaultfd, …
        public var flags: Set<Substring> = []
        /// Its `Locked:` line in kB: proportional, so a page mapped twice counts half.
        public var lockedKB = 0
    }

    /// This process's mappings that overlap `range`, from /proc/self/smaps (empty when
    /// it cannot be read).
    public static func mappings(overlapping range: Range<UInt64>) -> [Mapping] {
        mappings().filter { $0.range.overlaps(range) }
    }

    /// Every mapping of this process, from /proc/self/smaps (empty when it cannot be read).
    public static func mappings() -> [Mapping] {
        guard let smaps = readText("/proc/self/smaps") else { return [] }
        var out: [Mapping] = []
        for line in smaps.split(separator: "\n") {
            // A mapping's first line: "start-end perms offset dev inode path", the inode in decimal.
            if let dash = line.firstIndex(of: "-"), let space = line.firstIndex(of: " "), dash < space,
                let lo = UInt64(line[..<dash], radix: 16),
                let hi = UInt64(line[line.index(after: dash)..<space], radix: 16)
            {
                let inode = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true).dropFirst(4).first
                out.append(Mapping(range: lo..<hi, inode: inode.flatMap { UInt64($0) } ?? 0))
            } else if !out.isEmpty, line.hasPrefix("VmFlags:") {
                out[out.count - 1].flags = Set(line.split(separator: " ").dropFirst())
            } else if !out.isEmpty, line.hasPrefix("Locked:") {
                out[out.count - 1].lockedKB = Int(line.split(separator: " ").dropFirst().first ?? "") ?? -1
            }
        }
        return out
    }

    /// Lets the calling thread run only when no normal thread wants its CPU (SCHED_IDLE):
    /// a simulated device yields at once to the service that serves it.
    public static func setIdlePriority() throws(SystemCallError) {
        _ = try syscall("sched_setscheduler(SCHED_IDLE)") { iopf_set_idle_priority() }
    }

    /// Runs the calling thread on `cpu` only (`only`) or on every online CPU but `cpu`.
    public static func setCPUAffinity(_ cpu: Int, only: Bool) throws(SystemCallError) {
        _ = try syscall("sched_setaffinity") { iopf_set_cpu_affinity(CInt(cpu), only ? 1 : 0) }
    }

    @inline(never)
    package static func read(_ fd: CInt, _ buffer: UnsafeMutableRawBufferPointer) throws(SystemCallError) -> Int {
        try syscall("read") { Glibc.read(fd, buffer.baseAddress, buffer.count) }
    }

    @inline(never)
    package static func write(_ fd: CInt, _ buffer: UnsafeRawBufferPointer) throws(SystemCallError) -> Int {
        try syscall("write") { Glibc.write(fd, buffer.baseAddress, buffer.count) }
    }

    /// Writes all of `buffer`, looping over short writes.
    package static func writeAll(_ fd: CInt, _ buffer: UnsafeRawBufferPointer) throws(SystemCallError) {
        var done = 0
        while done < buffer.count {
            done += try write(fd, UnsafeRawBufferPointer(rebasing: buffer[done...]))
        }
    }

    /// The whole text of a /proc (or any) file, read to EOF. Foundation's
    /// `String(contentsOfFile:)` trusts the size stat reports, which is 0 for /proc files,
    /// and returns only the first chunk the kernel hands out: /proc/PID/maps and smaps
    /// came back cut after about 4 KiB. Nil when the file cannot be opened or read.
    public static func readText(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 8)
        defer { chunk.deallocate() }
        while true {
            guard let n = try? read(fd, chunk) else { return nil }
            if n == 0 { break }
            bytes += UnsafeRawBufferPointer(rebasing: chunk[0..<n])
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Closes `fd`. Linux closes it even when close returns EINTR, so it is never retried.
    /// EBADF means a descriptor closed twice or never opened, a bug that could close
    /// someone else's descriptor: it is counted (`badCloses`) and reported on stderr.
    @inline(never)
    package static func close(_ fd: CInt) {
        guard Glibc.close(fd) != 0, Glibc.errno == EBADF else { return }
        badCloseCount.add(1, ordering: .relaxed)
        let text = "iopf: close(\(fd)): EBADF (closed twice, or never opened)\n"
        _ = text.withCString { Glibc.write(2, $0, strlen($0)) }
    }

    /// Closes `fd` (see `close(_: CInt)`).
    package static func close(_ fd: FileDescriptor) { close(fd.rawValue) }

    /// Closes that failed with EBADF in this process (see `close`).
    package static var badCloses: Int { badCloseCount.load(ordering: .relaxed) }
    private static let badCloseCount = Atomic<Int>(0)

    @inline(never)
    package static func eventfd(initial: UInt32 = 0, flags: CInt = CInt(EFD_CLOEXEC | EFD_NONBLOCK))
        throws(SystemCallError) -> CInt
    {
        try syscall("eventfd") { CIOPFShim.eventfd(initial, flags) }
    }

    @inline(never)
    package static func socketpair() throws(SystemCallError) -> (CInt, CInt) {
        var fds: [CInt] = [-1, -1]
        _ = try syscall("socketpair") {
            Glibc.socketpair(AF_UNIX, CInt(SOCK_STREAM.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &fds)
        }
        return (fds[0], fds[1])
    }

    @inline(never)
    package static func pipe() throws(SystemCallError) -> (read: CInt, write: CInt) {
        var fds: [CInt] = [-1, -1]
        _ = try syscall("pipe2") { iopf_pipe2(&fds, 0) }
        return (fds[0], fds[1])
    }

    @inline(never)
    package static func dup(_ fd: CInt) throws(SystemCallError) -> CInt {
        try syscall("fcntl(F_DUPFD_CLOEXEC)") { fcntl(fd, F_DUPFD_CLOEXEC, 0) }
    }

    package static func setNonBlocking(_ fd: CInt, _ on: Bool) throws(SystemCallError) {
        let flags = try syscall("fcntl(F_GETFL)") { fcntl(fd, F_GETFL) }
        _ = try syscall("fcntl(F_SETFL)") { fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK) }
    }

    /// Waits until `fd` is readable or `timeoutMs` passes (-1: forever). True when readable.
    package static func pollReadable(_ fd: CInt, timeoutMs: CInt) throws(SystemCallError) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return try syscall("poll") { Glibc.poll(&p, 1, timeoutMs) } > 0
    }

    /// A connected pair of SOCK_SEQPACKET sockets: message boundaries are kept, so one
    /// recvmsg returns exactly one protocol message with its descriptors.
    @inline(never)
    package static func seqpacketPair() throws(SystemCallError) -> (CInt, CInt) {
        var fds: [CInt] = [-1, -1]
        _ = try syscall("socketpair(SOCK_SEQPACKET)") {
            Glibc.socketpair(AF_UNIX, CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &fds)
        }
        return (fds[0], fds[1])
    }

    /// Sends one message with `fds` attached (never raises SIGPIPE). Non-blocking sends
    /// fail with EAGAIN when the peer's buffer is full.
    @inline(never)
    package static func send(_ fd: CInt, _ bytes: [UInt8], fds: [CInt] = [], nonBlocking: Bool) throws(SystemCallError)
    {
        let n = try syscall("sendmsg") {
            bytes.withUnsafeBytes { b in
                fds.withUnsafeBufferPointer { f in
                    iopf_send_with_fds(fd, b.baseAddress, b.count, f.baseAddress, CInt(f.count), nonBlocking ? 1 : 0)
                }
            }
        }
        guard n == bytes.count else { throw SystemCallError("sendmsg (short)", .messageTooLong) }
    }

    /// One received message: its bytes, the descriptors that came with it (owned by the
    /// caller now), and whether anything was cut off.
    package struct Received {
        package var count: Int
        package var fds: [CInt]
        package var truncated: Bool
    }

    /// Receives one message into `buffer`; `count` 0 means end of stream.
    @inline(never)
    package static func receive(
        _ fd: CInt, into buffer: UnsafeMutableRawBufferPointer, maxFDs: Int,
        nonBlocking: Bool
    ) throws(SystemCallError) -> Received {
        var fds = [CInt](repeating: -1, count: max(maxFDs, 1))
        var nfds: CInt = 0
        var truncated: CInt = 0
        let n = try syscall("recvmsg") {
            fds.withUnsafeMutableBufferPointer { f in
                iopf_recv_with_fds(
                    fd, buffer.baseAddress, buffer.count, f.baseAddress, CInt(maxFDs), &nfds, &truncated,
                    nonBlocking ? 1 : 0)
            }
        }
        return Received(count: n, fds: Array(fds.prefix(Int(nfds))), truncated: truncated != 0)
    }

    /// A listening AF_UNIX SOCK_SEQPACKET socket at `path` with permissions `mode`. A stale
    /// socket file at `path` is replaced; any other file is an error.
    package static func listenUnix(path: String, mode: mode_t, backlog: CInt = 64) throws(SystemCallError) -> CInt {
        var st = stat()
        if lstat(path, &st) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else {
                throw SystemCallError("listen: \(path) exists and is not a socket", .fileExists)
            }
            unlink(path)
        }
        let fd = try syscall("socket(AF_UNIX, SOCK_SEQPACKET)") {
            Glibc.socket(
                AF_UNIX, CInt(SOCK_SEQPACKET.rawValue) | CInt(SOCK_CLOEXEC.rawValue) | CInt(SOCK_NONBLOCK.rawValue), 0)
        }
        do {
            var addr = try unixAddress(path)
            _ = try syscall("bind(\(path))") {
                withUnsafePointer(to: &addr) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                    }
                }
            }
            _ = try syscall("chmod(\(path))") { chmod(path, mode) }
            _ = try syscall("listen") { Glibc.listen(fd, backlog) }
            return fd
        } catch {
            Sys.close(fd)
            throw error
        }
    }

    /// A socket's domain and type (SO_DOMAIN, SO_TYPE); nil when `fd` is not a socket.
    package static func socketKind(_ fd: CInt) -> (domain: CInt, type: CInt)? {
        var domain: CInt = 0
        var type: CInt = 0
        var length = socklen_t(MemoryLayout<CInt>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &length) == 0 else { return nil }
        length = socklen_t(MemoryLayout<CInt>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length) == 0 else { return nil }
        return (domain, type)
    }

    /// Connects to the AF_UNIX socket at `path` (blocking): SOCK_SEQPACKET, iopf's own
    /// protocol, or with `stream` SOCK_STREAM (vhost-user).
    package static func connectUnix(path: String, stream: Bool = false) throws(SystemCallError) -> CInt {
        let kind = stream ? SOCK_STREAM : SOCK_SEQPACKET
        let fd = try syscall("socket(AF_UNIX, \(stream ? "SOCK_STREAM" : "SOCK_SEQPACKET"))") {
            Glibc.socket(AF_UNIX, CInt(kind.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0)
        }
        do {
            var addr = try unixAddress(path)
            _ = try syscall("connect(\(path))") {
                withUnsafePointer(to: &addr) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                    }
                }
            }
            return fd
        } catch {
            Sys.close(fd)
            throw error
        }
    }

    /// Accepts one connection (non-blocking, close-on-exec); nil when none is waiting.
    package static func accept(_ fd: CInt) throws(SystemCallError) -> CInt? {
        do {
            return try syscall("accept4") { iopf_accept(fd) }
        } catch  where error.errno == .wouldBlock || error.errno == Errno(rawValue: ECONNABORTED) {
            return nil
        }
    }

    /// The peer's pid and uid of a connected AF_UNIX socket (SO_PEERCRED).
    package static func peerCredentials(_ fd: CInt) -> (pid: Int32, uid: UInt32)? {
        var pid: CInt = 0, uid: CInt = 0, gid: CInt = 0
        guard iopf_peer_credentials(fd, &pid, &uid, &gid) == 0 else { return nil }
        return (pid, UInt32(bitPattern: uid))
    }

    /// Size of the file behind `fd`.
    package static func fileSize(_ fd: CInt) throws(SystemCallError) -> UInt64 {
        var st = stat()
        _ = try syscall("fstat") { fstat(fd, &st) }
        return UInt64(st.st_size)
    }

    private static func unixAddress(_ path: String) throws(SystemCallError) -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            throw SystemCallError(
                "socket path '\(path)' is longer than \(MemoryLayout.size(ofValue: addr.sun_path) - 1) bytes",
                .fileNameTooLong)
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in bytes.enumerated() { p[i] = b }
        }
        return addr
    }
}

// ControlConnection.swift — the client end of a control socket, shared by devices and
// hosts: HELLO with a role, then one request at a time, each waiting for its reply (by id
// and command); error replies become `.refused`, anything unexpected a protocol violation.

import Glibc
import IOPFSystem
import IOPFWire

final class ControlConnection {
    let control: CInt
    private var nextID: UInt16 = 0
    private let receiveBuffer = UnsafeMutableRawBufferPointer.allocate(
        byteCount: WireLimits.maxMessageBytes, alignment: 8)
    private(set) var granted: HelloReply?
    private var closed = false

    /// Says HELLO as `role` over a connected SOCK_SEQPACKET socket, which it now owns.
    init(socket: CInt, role: PeerRole) throws(DeviceClientError) {
        control = socket
        do throws(DeviceClientError) {
            let (payload, _) = try request(Hello(role: role).message(id: takeID()), expecting: .hello)
            let reply: HelloReply
            do { reply = try HelloReply(message: payload) } catch { throw .protocolViolation("\(error)") }
            guard reply.major == WireVersion.major else {
                throw .protocolViolation("HELLO reply major \(reply.major), this client speaks \(WireVersion.major)")
            }
            granted = reply
        } catch {
            Sys.close(control)
            receiveBuffer.deallocate()
            closed = true
            throw error
        }
    }

    deinit {
        close()
    }

    func takeID() -> UInt16 {
        nextID &+= 1
        return nextID
    }

    /// Sends one request (with `fds`) and waits for its reply: the reply's bytes and the
    /// descriptors that came with it, now the caller's.
    func request(_ message: [UInt8], fds: [CInt] = [], expecting command: Command) throws(DeviceClientError)
        -> ([UInt8], [CInt])
    {
        let id = message.withUnsafeBytes { peekMessageID($0)!.id }
        do { try Sys.send(control, message, fds: fds, nonBlocking: false) } catch { throw .system(error) }
        let got: Sys.Received
        do {
            got = try Sys.receive(control, into: receiveBuffer, maxFDs: WireLimits.maxFDs, nonBlocking: false)
        } catch { throw .system(error) }
        guard got.count > 0 else { throw .disconnected }
        let bytes = Array(UnsafeRawBufferPointer(rebasing: receiveBuffer[..<got.count]))
        let header: MessageHeader
        do {
            header = try MessageHeader(message: UnsafeRawBufferPointer(rebasing: receiveBuffer[..<got.count]))
        } catch {
            for fd in got.fds { Sys.close(fd) }
            throw .protocolViolation("\(error)")
        }
        guard header.isReply, header.id == id, header.command == command else {
            for fd in got.fds { Sys.close(fd) }
            throw .protocolViolation("expected the reply to \(command) #\(id), got \(header.command) #\(header.id)")
        }
        if header.isError {
            for fd in got.fds { Sys.close(fd) }
            let text = bytes.withUnsafeBytes {
                Wire.errorText(UnsafeRawBufferPointer(rebasing: $0[MessageHeader.byteCount...]))
            }
            throw .refused(command, errno: header.error, text: text)
        }
        return (bytes, got.fds)
    }

    /// Closes the socket. Idempotent.
    func close() {
        guard !closed else { return }
        closed = true
        Sys.close(control)
        receiveBuffer.deallocate()
    }
}

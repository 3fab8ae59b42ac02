// GroupAssembler.swift — page request groups from one device's record stream, as Linux's
// iommufd/fault.c and io-pgfault.c assemble them: records are held per group index until
// the one carrying LAST_PAGE arrives, then the group is handled and answered once, with
// the code of the whole group.
//
// Every record comes from a device that may lie. Bounds, so that no stream of records
// can grow memory without limit: at most 512 partial groups (the 9-bit PRI group index),
// each holding at most `credit` records; a group that failed (malformed record, foreign
// device id or PASID, credit overrun, cookie change) keeps no records at all, only its
// cookie, and is answered INVALID when its LAST_PAGE comes.

/// Why a group is answered INVALID without being handled.
public enum GroupFailure: String, Sendable, CaseIterable {
    /// A record failed the wire checks, or the group changed its cookie.
    case malformed
    /// A record's device id or PASID is not the attached device's.
    case unknownDevice
    /// The device had more requests outstanding than its credit.
    case creditExceeded
}

/// A complete group, ready to be handled (or answered INVALID when `failure` is set).
public struct PageRequestGroup: Sendable {
    /// The group's cookie, echoed in its response.
    public var cookie: UInt32
    /// The group's requests, in the order they arrived.
    public var requests: [PageRequest]
    /// Requests counted against the credit; released by `GroupAssembler.answered`.
    public var counted: Int
    /// Why the group is to be answered INVALID without being handled; nil for a good group.
    public var failure: GroupFailure?

    /// A group of `requests` with `cookie`, `counted` of them against the credit.
    public init(cookie: UInt32, requests: [PageRequest], counted: Int, failure: GroupFailure? = nil) {
        self.cookie = cookie
        self.requests = requests
        self.counted = counted
        self.failure = failure
    }

    /// A group of nothing: what a group moved out of a collection leaves behind.
    public static var empty: PageRequestGroup { PageRequestGroup(cookie: 0, requests: [], counted: 0) }
}

/// Assembles one device's page-request records into groups, checking each record and the device's credit.
public struct GroupAssembler: Sendable {
    /// The device id records must carry.
    public let deviceID: UInt32
    /// The PASID records must carry, or nil for none.
    public let pasid: UInt32?
    /// The device's PRI outstanding page request allocation.
    public let credit: Int
    /// Requests received and not yet answered, against the credit.
    public private(set) var outstanding = 0
    /// Records refused, by why.
    public private(set) var failures: [GroupFailure: Int] = [:]
    /// Well-formed records accepted.
    public private(set) var records = 0
    private var partial: [PageRequestGroup?]
    /// Request arrays of answered groups, emptied with their capacity kept: a new group
    /// takes one, so that assembling a group allocates nothing once the device is warm.
    private var spares: [[PageRequest]] = []
    static let maxSpares = 64
    /// Groups started and not yet complete.
    public private(set) var partialGroups = 0
    /// Why the last record given to `add` was refused; nil when it was accepted.
    public private(set) var lastRefusal: GroupFailure?

    /// An assembler for `deviceID` (and `pasid`) with `credit` requests outstanding at most.
    public init(deviceID: UInt32, pasid: UInt32?, credit: Int) {
        precondition(credit > 0, "a device's credit must be at least 1")
        self.deviceID = deviceID
        self.pasid = pasid
        self.credit = credit
        partial = Array(repeating: nil, count: Int(PageRequest.maxGroupIndex) + 1)
        spares.reserveCapacity(Self.maxSpares)
    }

    /// Takes one 40-byte record (the caller's private copy). Returns the group it completed.
    public mutating func add(_ bytes: UnsafeRawBufferPointer) -> PageRequestGroup? {
        lastRefusal = nil
        let request: PageRequest
        do {
            request = try PageRequest(bytes: bytes)
        } catch {
            // Best effort on an untrusted record: fail its group so that it is answered
            // INVALID, once, if its cookie and group index can be read.
            failures[.malformed, default: 0] += 1
            lastRefusal = .malformed
            guard bytes.count == PageRequest.byteCount else { return nil }
            let flags = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 0, as: UInt32.self))
            let group = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 12, as: UInt32.self))
            // Cookie 0 is malformed too, and answered with cookie 0: a device that sent
            // one must not wait forever for its answer.
            let cookie = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 36, as: UInt32.self))
            return fail(
                group: Int(group & PageRequest.maxGroupIndex), cookie: cookie, .malformed,
                last: flags & PageRequest.Flags.lastPage.rawValue != 0)
        }
        records += 1
        let g = Int(request.groupIndex)
        var group = take(g) ?? PageRequestGroup(cookie: request.cookie, requests: spares.popLast() ?? [], counted: 0)
        if group.cookie != request.cookie {
            record(.malformed, in: &group)  // one group, one cookie
        } else if request.deviceID != deviceID || (request.flags.contains(.pasidValid) ? request.pasid : nil) != pasid {
            record(.unknownDevice, in: &group)
        } else if outstanding >= credit {
            record(.creditExceeded, in: &group)
        } else if group.failure == nil {
            outstanding += 1
            group.counted += 1
            group.requests.append(request)
        }
        return finish(group, index: g, last: request.isLastPage)
    }

    /// Releases a handled group's credit, and keeps its request array for a later group
    /// (it allocates nothing again if the caller gave up its own copies).
    public mutating func answered(_ group: consuming PageRequestGroup) {
        outstanding -= group.counted
        var requests: [PageRequest] = []
        swap(&requests, &group.requests)
        guard requests.capacity > 0, spares.count < Self.maxSpares else { return }
        requests.removeAll(keepingCapacity: true)
        spares.append(requests)
    }

    /// Every incomplete group (for answering INVALID when the device goes away), credit released.
    public mutating func abandonAll() -> [PageRequestGroup] {
        var out: [PageRequestGroup] = []
        for g in partial.indices {
            if let p = take(g) {
                outstanding -= p.counted
                out.append(p)
            }
        }
        return out
    }

    private mutating func record(_ failure: GroupFailure, in group: inout PageRequestGroup) {
        lastRefusal = failure
        if group.failure == nil {
            failures[failure, default: 0] += 1
            group.failure = failure
            // A failed group holds no records: release their credit now.
            outstanding -= group.counted
            group.counted = 0
            group.requests = []
        }
    }

    private mutating func fail(group g: Int, cookie: UInt32, _ failure: GroupFailure, last: Bool) -> PageRequestGroup? {
        var group = take(g) ?? PageRequestGroup(cookie: cookie, requests: [], counted: 0)
        if group.failure == nil {
            outstanding -= group.counted
            group.counted = 0
            group.requests = []
            group.failure = failure
        }
        return finish(group, index: g, last: last)
    }

    private mutating func take(_ g: Int) -> PageRequestGroup? {
        guard let p = partial[g] else { return nil }
        partial[g] = nil
        partialGroups -= 1
        return p
    }

    private mutating func finish(_ group: PageRequestGroup, index g: Int, last: Bool) -> PageRequestGroup? {
        if last { return group }
        partial[g] = group
        partialGroups += 1
        return nil
    }
}

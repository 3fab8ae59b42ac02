// HostCommand.swift — `iopf host`: a host in its own process (as a VMM is) that hands its
// memory and userfaultfd to `iopf serve --listen PATH`, maps it for DMA and changes it.

import ArgumentParser
import Foundation
import IOPFSimulation
import IOPFWire

struct Host: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a host (memory owner, as a VMM) in this process against a service's --listen socket.",
        discussion: """
            Creates --memory of memfd-backed memory, hands it and a userfaultfd to the service under --name, \
            maps it for DMA as --mappings equal mappings from IOVA 0x10000000000, then every --churn \
            milliseconds changes 1-64 pages of one mapping (madvise DONTNEED or REMOVE, mmap MAP_FIXED, \
            mremap, or a move of the whole mapping), waits for the devices (SYNC) and re-declares moved \
            mappings. With --dirty-log it instead reads the dirty log every MS milliseconds while its devices \
            write, and checks each report against the pages whose content changed. Devices attach with \
            `iopf device --address-space NAME`; device n works in mapping \
            (n - 1) mod --mappings. Exit status: 0 on a clean run; 2 when it could not connect or the \
            service refused the hand-over (the reason on standard error).
            """
    )

    @Option(help: "The service's socket (iopf serve --listen PATH).")
    var connect: String

    @Option(help: "Name of this host's address space (1-64 of A-Z a-z 0-9 . _ -).")
    var name: String

    @Option(help: "Memory to hand over, e.g. 64M.")
    var memory = "64M"

    @Option(help: "DMA mappings the memory is split into.")
    var mappings = 4

    @Option(help: "Milliseconds between changes to the memory (0: none).")
    var churn = 0.0

    @Option(
        name: .customLong("dirty-log"),
        help: ArgumentHelp(
            "Milliseconds between reads of the dirty log over all the memory, as a migrating VMM does; "
                + "the JSON's `dirty` holds the reports against the pages whose content changed (not with --churn).",
            valueName: "MS"))
    var dirtyLog = 0.0

    @Flag(
        name: .customLong("huge-pages"),
        help: "Back the memory with 2 MiB hugetlbfs pages (MFD_HUGETLB; reserve them in /proc/sys/vm/nr_hugepages).")
    var hugePages = false

    @Flag(
        help: ArgumentHelp(
            "Map with PIN: the service pins and maps all the memory before DMA_MAP returns (VFIO type1), "
                + "charged to this process's RLIMIT_MEMLOCK; devices then never fault. JSON `mapSeconds` times it."))
    var pinned = false

    @Option(help: "Seconds to run (0: until SIGINT or SIGTERM).")
    var seconds = 0.0

    @Option(help: "Seed for the changes.")
    var seed: UInt64 = 1

    @Option(
        name: .customLong("allow-uid"),
        help: ArgumentHelp(
            "A uid, besides this process's own, whose devices may attach to this address space "
                + "(repeatable, up to 16).", valueName: "uid"))
    var allowedUIDs: [UInt32] = []

    @Flag(help: "Print one JSON object at the end instead of a summary.")
    var json = false

    func validate() throws {
        guard AddressSpaceName.isValid(name) else {
            throw ValidationError("--name must be 1-64 characters of A-Z a-z 0-9 . _ -, got '\(name)'")
        }
        guard let bytes = parseSize(memory), bytes > 0 else {
            throw ValidationError("--memory '\(memory)' is not a size like 64M")
        }
        guard (1...64).contains(mappings) else { throw ValidationError("--mappings must be 1...64, got \(mappings)") }
        guard bytes % (UInt64(mappings) << 12) == 0 else {
            throw ValidationError("--memory must be a multiple of --mappings × 4 KiB")
        }
        guard allowedUIDs.count <= HostDeclaration.maxAllowedUIDs else {
            throw ValidationError("--allow-uid at most \(HostDeclaration.maxAllowedUIDs) times")
        }
        guard churn >= 0, dirtyLog >= 0, seconds >= 0 && seconds <= 86_400 else {
            throw ValidationError("--churn, --dirty-log and --seconds must not be negative")
        }
        guard !hugePages || (churn == 0 && bytes % (UInt64(mappings) << 21) == 0) else {
            throw ValidationError(
                "--huge-pages needs --memory a multiple of --mappings × 2 MiB, and no --churn (its changes are 4 KiB)")
        }
        guard churn == 0 || dirtyLog == 0 else {
            throw ValidationError(
                "--dirty-log and --churn do not go together: "
                    + "a page freed by the churn changes with no device writing it"
            )
        }
    }

    func run() throws {
        var o = HostOptions(path: connect, name: name)
        o.memoryBytes = parseSize(memory)!
        o.mappings = mappings
        o.churnMilliseconds = churn
        o.seconds = seconds
        o.seed = seed
        o.allowedUIDs = allowedUIDs
        o.dirtyLogMilliseconds = dirtyLog
        o.hugePages = hugePages
        o.pinned = pinned
        Signals.stopOnInterrupt()
        let r: HostResult
        do {
            r = try HostSession.run(o, shouldStop: Signals.stopRequested)
        } catch {
            FileHandle.standardError.write(Data("iopf host: \(error)\n".utf8))
            throw ExitCode(2)
        }
        if json {
            try Output.printJSON(r)
        } else {
            let l = r.invalidationLatencyNs
            print(
                """
                iopf host '\(r.name)': \(r.memoryBytes >> 20) MiB in \(r.mappings) mappings, \
                \(String(format: "%.2f", r.elapsedSeconds)) s
                """
            )
            print(
                "  DMA_MAP of all mappings\(r.pinned ? ", pinned," : "") "
                    + "\(String(format: "%.1f", r.mapSeconds * 1000)) ms"
            )
            let kinds = r.changesByKind.sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }
            print(
                "  host changes \(r.hostChanges) \(kinds.joined(separator: ", ")); address updates \(r.addressUpdates)")
            print(
                """
                  change to last device acknowledgement: p50 \(l.p50 / 1000) µs, p99 \(l.p99 / 1000) µs, max \
                \(l.max / 1000) µs
                """
            )
            if let d = r.dirty {
                print(
                    """
                      dirty log: \(d.rounds) rounds, \(d.reported) pages reported, \(d.written) written, \(d.missed) \
                    missed, \(d.extra) extra; read p50 \(d.readNs.p50 / 1000) µs, p99 \(d.readNs.p99 / 1000) µs
                    """
                )
            }
            for p in r.problems { print("  ! \(p)") }
        }
    }
}

// DirtyLedger.swift — the pages devices really wrote, per round of the dirty log, held
// against what the log reported (`iopf serve --dirty-log`, the stress tool's "dirty
// write lost" invariant).
//
// Rounds: the logger starts tracking, then sets epoch 1; each round reads the log and
// then advances the epoch. A device reads the epoch under its IOTLB lock just before a
// write, so a write recorded in epoch e came after round e-1's read returned: it must be
// in round e's report, or in round e+1's if it landed after round e's read took the
// lock. `missed` counts writes in neither; `extra` counts reported pages that no device
// wrote in that round or the one before. Writes in epoch 0 (before tracking) are not
// recorded.
//
// Bitmaps cover `[iovaBase, iovaBase + pages * 4 KiB)`. Devices hand in a round's pages
// when they see the epoch move; a round is judged once the next round was read and every
// device has handed it in, and dropped then, so memory stays bounded by a few rounds
// (a device stalled for more than `maxLag` rounds has its late pages counted `unchecked`).

import IOPFCore
import Synchronization

/// JSON `dirty` of `iopf serve --dirty-log` and `iopf bench --scenario dirty-log`.
package struct DirtySummary: Sendable, Codable, Equatable {
    /// Reads of the dirty log judged.
    package var rounds = 0
    /// Pages the log reported, and pages devices really wrote, summed over rounds.
    package var reported = 0
    package var written = 0
    /// Pages written but not reported (must be 0), and reported but not written in that
    /// round or the one before (a write fault sets a page's bit before its store, which
    /// may land after the read: the page is then reported again in the next round).
    package var missed = 0
    package var extra = 0
    /// Pages handed in too late to judge (a device stalled for many rounds).
    package var unchecked = 0
    /// The first missed pages, by IOVA and round, to reproduce.
    package var firstMissed: [String]?
    /// How long each read of the log took (readAndClearDirty: report, write-protect, sync).
    package var readNs = LatencySummary()

    package init() {}
}

package final class DirtyLedger: @unchecked Sendable {
    package let iovaBase: UInt64
    package let pages: Int
    static let maxLag: UInt64 = 64
    private let epochCounter = Atomic<UInt64>(0)
    private let state: Lock<State>

    struct State {
        var written: [UInt64: PageBitmap] = [:]
        var reported: [UInt64: PageBitmap] = [:]
        /// Per device: every epoch below this one is handed in.
        var writers: [Int: UInt64] = [:]
        var nextWriter = 0
        /// Rounds below this one are judged.
        var judged: UInt64 = 1
        var summary = DirtySummary()
    }

    package init(iovaBase: UInt64, pages: Int) {
        self.iovaBase = iovaBase
        self.pages = pages
        state = Lock(State())
    }

    /// The round writes now belong to; 0 before tracking started.
    @inline(__always) package var epoch: UInt64 { epochCounter.load(ordering: .acquiring) }

    /// Tracking is on: writes from now on are recorded.
    package func trackingStarted() {
        epochCounter.store(1, ordering: .releasing)
    }

    /// A device joins; returns its token for `handIn` and `retire`.
    package func register() -> Int {
        state.withLock { s in
            defer { s.nextWriter += 1 }
            s.writers[s.nextWriter] = max(epoch, 1)
            return s.nextWriter
        }
    }

    /// A device's pages written in `epoch` (bits over the ledger's range); it has now
    /// handed in every epoch below `through`.
    package func handIn(_ writer: Int, epoch e: UInt64, pages written: PageBitmap, through: UInt64) {
        state.withLock { s in
            if e >= 1 {
                if e < s.judged {
                    s.summary.unchecked += written.population
                } else {
                    s.written[e, default: PageBitmap(count: pages)].formUnion(written)
                }
            }
            if s.writers[writer] != nil { s.writers[writer] = through }
            judge(&s, force: false)
        }
    }

    /// A device is done (after its last `handIn`).
    package func retire(_ writer: Int) {
        state.withLock { s in
            s.writers[writer] = nil
            judge(&s, force: false)
        }
    }

    /// The log read for the current round; the epoch moves on.
    package func roundRead(_ reported: PageBitmap) {
        state.withLock { s in
            let e = epoch
            s.reported[e, default: PageBitmap(count: pages)].formUnion(reported)
            epochCounter.store(e + 1, ordering: .releasing)
            judge(&s, force: false)
        }
    }

    /// Pages reported outside a round's read (an unmap that read the log), bit k for the
    /// page at `iova + k * 4 KiB`: they count for the current round.
    package func alsoReported(iova: UInt64, _ reported: PageBitmap) {
        state.withLock { s in
            let e = epoch
            guard e >= 1, iova >= iovaBase else { return }
            let offset = Int((iova - iovaBase) >> 12)
            var bits = s.reported[e] ?? PageBitmap(count: pages)
            var p = reported.findNextSet(from: 0)
            while p < reported.count && offset + p < pages {
                bits.set(offset + p)
                p = reported.findNextSet(from: p + 1)
            }
            s.reported[e] = bits
        }
    }

    /// Judges every round read so far (devices retired, the last round read) and returns
    /// the summary.
    package func finish() -> DirtySummary {
        state.withLock { s in
            judge(&s, force: true)
            return s.summary
        }
    }

    package var summary: DirtySummary { state.withLock { $0.summary } }

    /// Judges round e once round e+1 was read (or at the end) and every device handed e in.
    private func judge(_ s: inout State, force: Bool) {
        let current = epoch  // rounds below it were read
        while s.judged < current {
            let e = s.judged
            let handedIn = s.writers.values.allSatisfy { $0 > e }
            let nextRead = e + 1 < current
            guard force || (handedIn && nextRead) || current - e > Self.maxLag else { return }
            let empty = PageBitmap(count: pages)
            let written = s.written[e] ?? empty
            let reported = s.reported[e] ?? empty
            let missed = written.population(notIn: reported, s.reported[e + 1] ?? empty)
            s.summary.rounds += 1
            s.summary.written += written.population
            s.summary.reported += reported.population
            s.summary.missed += missed
            s.summary.extra += reported.population(notIn: written, s.written[e - 1] ?? empty)
            if missed > 0 && (s.summary.firstMissed?.count ?? 0) < 5 {
                var p = written.findNextSet(from: 0)
                while p < pages && (s.summary.firstMissed?.count ?? 0) < 5 {
                    if !reported.test(p) && !(s.reported[e + 1]?.test(p) ?? false) {
                        let page = "iova \(hex(iovaBase + UInt64(p) << 12)) written in round \(e)"
                        s.summary.firstMissed = (s.summary.firstMissed ?? []) + [page]
                    }
                    p = written.findNextSet(from: p + 1)
                }
            }
            s.written[e - 1] = nil
            s.reported[e] = nil
            s.judged = e + 1
        }
    }
}

/// A device's side of the ledger: its writes in the current epoch, handed in when the
/// epoch moves. Used by one device thread only.
struct DirtyWriter {
    let ledger: DirtyLedger
    let token: Int
    /// Ledger page of the device's page 0.
    let offset: Int
    var epoch: UInt64
    var written: PageBitmap
    /// Writes recorded in the current epoch (repeats included).
    var writesThisEpoch = 0

    init(ledger: DirtyLedger, deviceIOVABase: UInt64) {
        self.ledger = ledger
        token = ledger.register()
        offset = Int((deviceIOVABase - ledger.iovaBase) >> 12)
        epoch = ledger.epoch
        written = PageBitmap(count: ledger.pages)
    }

    /// Hands in the pages of an epoch that has ended.
    mutating func catchUp() {
        let now = ledger.epoch
        guard now != epoch else { return }
        ledger.handIn(token, epoch: epoch, pages: written, through: now)
        if !written.isEmpty { written = PageBitmap(count: ledger.pages) }
        epoch = now
        writesThisEpoch = 0
    }

    /// Records a write to device page `page` (call under the IOTLB lock, before the store).
    @inline(__always) mutating func willWrite(page: Int) {
        catchUp()
        let p = offset + page
        if epoch >= 1 && p >= 0 && p < written.count {
            written.set(p)
            writesThisEpoch += 1
        }
    }

    mutating func finish() {
        ledger.handIn(token, epoch: epoch, pages: written, through: .max)
        ledger.retire(token)
    }
}

/// One row of `iopf bench --scenario dirty-log`.
package struct DirtyLogRow: Codable, Sendable {
    package var sizeBytes: UInt64
    package var mode: String
    package var rounds: Int
    package var written: Int
    package var reported: Int
    package var missed: Int
    package var extra: Int
    /// Pages reported per page really written (1 is exact; pinned memory reports all).
    package var reportedPerWritten: Double
    /// Pages written per round, as a share of the memory.
    package var writtenSharePerRound: Double
    package var readNs: LatencySummary
    package var dmaErrors: Int
    package var problems: [String]

    package init(size: UInt64, result r: ServeResult) {
        let d = r.dirty ?? DirtySummary()
        sizeBytes = size
        mode = r.mode
        rounds = d.rounds
        written = d.written
        reported = d.reported
        missed = d.missed
        extra = d.extra
        reportedPerWritten = d.written > 0 ? Double(d.reported) / Double(d.written) : 0
        writtenSharePerRound = d.rounds > 0 ? Double(d.written) / Double(d.rounds) / Double(size >> 12) : 0
        readNs = d.readNs
        dmaErrors = r.dmaErrors
        problems = r.problems
    }
}

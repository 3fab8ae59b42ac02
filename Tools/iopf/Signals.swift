// Signals.swift — SIGINT/SIGTERM as a stop request that long-running commands poll, so
// that they stop cleanly (pending groups answered, summary printed) instead of dying.

import Foundation
import Synchronization

enum Signals {
    private static let requested = Atomic<Bool>(false)
    nonisolated(unsafe) private static var sources: [DispatchSourceSignal] = []

    /// From now on SIGINT and SIGTERM set the stop request instead of killing the process.
    static func stopOnInterrupt() {
        for sig in [SIGINT, SIGTERM] {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { requested.store(true, ordering: .relaxed) }
            source.resume()
            sources.append(source)
        }
    }

    static func stopRequested() -> Bool { requested.load(ordering: .relaxed) }
}

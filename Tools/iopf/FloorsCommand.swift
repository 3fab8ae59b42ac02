// FloorsCommand.swift — `iopf floors`: this machine's floors, the yardsticks the service's
// figures are compared against.

import ArgumentParser
import Foundation
import IOPFSimulation
import IOPFService

struct FloorsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "floors",
        abstract: """
            Measure this machine's floors: userfaultfd round trip, MADV_POPULATE_WRITE per page, mlock per GiB, a \
            cache line to another CPU and back.
            """
    )

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let f = try Floors.measure()
        if json {
            try Output.printJSON(f)
        } else {
            print(
                String(format: "userfaultfd fault round trip   %8.0f ns (handler sleeping in read)", f.uffdRoundTripNs))
            print(
                String(
                    format: "userfaultfd fault round trip   %8.0f ns (handler busy-polling)", f.uffdRoundTripPolledNs))
            print(String(format: "MADV_POPULATE_WRITE per page   %8.0f ns", f.populateNsPerPage))
            print(String(format: "mlock of fresh memory          %8.3f s/GiB", f.mlockSecondsPerGiB))
            if let ns = f.crossCoreRoundTripNs {
                print(String(format: "cache line to a CPU and back   %8.0f ns", ns))
            }
        }
    }
}

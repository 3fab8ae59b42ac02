// IOPF.swift — the `iopf` command. The root command only configures; subcommands live in
// their own files.

import ArgumentParser

@main
struct IOPF: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "iopf",
        abstract: "Serve I/O page faults for DMA-capable devices without pinning their memory.",
        subcommands: [Serve.self, Device.self, Host.self, Vhost.self, Stress.self, Bench.self, FloorsCommand.self]
    )
}

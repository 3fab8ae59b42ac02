import ArgumentParser
struct Microbench: ParsableCommand {
    func run() throws {}
}

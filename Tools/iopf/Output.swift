// Output.swift — what every `iopf` command prints the same way: one JSON object at the
// end, and a progress line on standard error (rewritten in place on a terminal).

import Foundation

enum Output {
    static func printJSON(_ value: some Encodable) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        print(String(decoding: try encoder.encode(value), as: UTF8.self))
    }

    /// One JSON object on one line (a stream of samples), flushed at once.
    static func printJSONLine(_ value: some Encodable) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        FileHandle.standardOutput.write(try encoder.encode(value) + Data("\n".utf8))
    }

    static let terminal = isatty(STDERR_FILENO) != 0

    /// Shows `line` as the current progress; `nil` ends the progress line.
    static func progress(_ line: String?) {
        let text = terminal ? "\r\u{1B}[K" + (line ?? "") + (line == nil ? "\n" : "") : line.map { $0 + "\n" } ?? ""
        FileHandle.standardError.write(Data(text.utf8))
    }
}

// Output.swift — what every `iopf` command prints the same way: one JSON object at the
// end, a progress line on standard error (rewritten in place on a terminal), and with
// --json the log as JSON lines on standard error.

import Foundation
import Logging

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

/// Log lines as JSON objects on standard error, one per line (`--json`): what a script that
/// reads the JSON result on standard output can also parse, instead of losing the log.
struct JSONLinesLogHandler: LogHandler {
    let label: String
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    private struct Line: Encodable {
        var time: String
        var level: String
        var label: String
        var message: String
        var metadata: [String: String]?
    }

    func log(event: LogEvent) {
        let all = metadata.merging(event.metadata ?? [:]) { $1 }
        let entry = Line(
            time: ISO8601DateFormatter().string(from: Date()), level: event.level.rawValue, label: label,
            message: event.message.description, metadata: all.isEmpty ? nil : all.mapValues { "\($0)" })
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        guard let data = try? encoder.encode(entry) else { return }
        FileHandle.standardError.write(data + Data("\n".utf8))
    }
}

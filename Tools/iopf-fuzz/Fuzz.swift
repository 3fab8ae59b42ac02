// iopf-fuzz — one libFuzzer binary for every target in FuzzTargets; IOPF_FUZZ_TARGET
// names the one to run. Built only by Tools/fuzz.sh (IOPF_FUZZ=1 adds this product to
// the package), with -sanitize=fuzzer,address: libFuzzer brings main().

import Glibc
import IOPFFuzzing

nonisolated(unsafe) let target: String = {
    guard let name = getenv("IOPF_FUZZ_TARGET").map({ String(cString: $0) }), FuzzTargets.names.contains(name) else {
        let text = "iopf-fuzz: set IOPF_FUZZ_TARGET to one of: \(FuzzTargets.names.joined(separator: " "))\n"
        _ = text.withCString { write(2, $0, strlen($0)) }
        exit(2)
    }
    return name
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    _ = FuzzTargets.run(target, UnsafeRawBufferPointer(start: data, count: size))
    return 0
}

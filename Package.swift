// swift-tools-version: 6.1
// iopf: serve I/O page faults for DMA-capable devices without pinning their memory.
// Linux only. Swift 6 language mode (strict concurrency) throughout.

import PackageDescription

let package = Package(
    name: "iopf",
    products: [
        .library(name: "IOPFWire", targets: ["IOPFWire"]),
        .library(name: "IOPFCore", targets: ["IOPFCore"]),
        .library(name: "IOPFService", targets: ["IOPFService"]),
        .library(name: "IOPFDevice", targets: ["IOPFDevice"]),
        .library(name: "IOPFVhost", targets: ["IOPFVhost"]),
        .library(name: "CIOPFClient", targets: ["CIOPFClient"]),
        .executable(name: "iopf", targets: ["iopf"]),
        .executable(name: "iopf-device-example", targets: ["iopf-device-example"]),
        .executable(name: "iopf-host-example", targets: ["iopf-host-example"]),
        .executable(name: "iopf-microbench", targets: ["iopf-microbench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
        .package(url: "https://github.com/ordo-one/malloc-interposer.git", from: "1.6.1"),
        .package(url: "https://github.com/apple/swift-system.git", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.2.0"),
        // `swift package generate-documentation`: the DocC catalogs of the public modules.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    ],
    targets: [
        // Pure Swift, no dependencies: fault records and the device protocol's messages,
        // encoded and validated. Shared by the service, every client and the fuzzers.
        .target(name: "IOPFWire"),
        // Pure Swift: every decision the service makes. No system calls; host memory is
        // reached through the `HostMemory` protocol that the service implements.
        .target(name: "IOPFCore", dependencies: ["IOPFWire"]),
        // Debian's liburing-dev (2.3), through pkg-config.
        .systemLibrary(name: "CLiburing", pkgConfig: "liburing", providers: [.apt(["liburing-dev"])]),
        // What Swift cannot import: variadic syscall(), mremap, pipe2, UFFDIO_*, SCM_RIGHTS.
        .target(name: "CIOPFShim"),
        // One wrapper per system call with typed errors, the shared ring mapping, memory
        // region mappings and fd passing: what both the service and device clients need.
        .target(
            name: "IOPFSystem",
            dependencies: ["IOPFWire", "CIOPFShim", .product(name: "SystemPackage", package: "swift-system")]
        ),
        // The service: io_uring event loop, fault transports, userfaultfd, host memory,
        // the socket listener and its peers, the `FaultService` facade.
        .target(
            name: "IOPFService",
            dependencies: [
                "IOPFCore", "IOPFSystem", "CLiburing", "CIOPFShim",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The device side: protocol client, fault channel end, IOTLB, DMA through
        // translations into mapped regions. What a Swift device model links.
        .target(
            name: "IOPFDevice",
            dependencies: [
                "IOPFCore", "IOPFSystem", "CIOPFShim", .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // Simulated devices, workloads, host churn, translation audit, the serve / bench /
        // stress sessions and floors, built on the service and the device API.
        .target(
            name: "IOPFSimulation",
            dependencies: [
                "IOPFCore", "IOPFService", "IOPFDevice", "IOPFSystem", "CIOPFShim",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // iopf as a vhost-user front-end: the handshake, a virtio-net driver over split
        // rings, and `iopf vhost` against a back-end nobody here wrote (DPDK's testpmd).
        .target(
            name: "IOPFVhost",
            dependencies: [
                "IOPFCore", "IOPFService", "IOPFSimulation", "IOPFSystem", "IOPFWire", "IOPFDevice", "CIOPFShim",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ]
        ),
        // The bodies of the libFuzzer targets (Tools/fuzz.sh), apart from the service so that
        // ordinary builds of it carry none of them; the test suite replays their corpora.
        .target(name: "IOPFFuzzing", dependencies: ["IOPFService", "IOPFCore", "IOPFSystem", "IOPFWire", "CIOPFShim"]),
        // The C client library: header + source, libc only, for device emulators in C.
        .target(name: "CIOPFClient"),
        .executableTarget(
            name: "iopf-device-example", dependencies: ["CIOPFClient"], path: "Tools/iopf-device-example"),
        // A host (a VMM in miniature) in C on the same library: HOST, DMA_MAP, SYNC, DETACH.
        .executableTarget(name: "iopf-host-example", dependencies: ["CIOPFClient"], path: "Tools/iopf-host-example"),
        .executableTarget(
            name: "iopf",
            dependencies: [
                "IOPFCore", "IOPFService", "IOPFDevice", "IOPFSimulation", "IOPFVhost",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Tools/iopf"
        ),
        // Micro-benchmarks of the engine's hot paths. A separate executable because it links
        // a malloc interposer (to count allocations) that `iopf` itself must not carry.
        // (package-benchmark cannot be used here: on Swift 6.3/Linux it needs
        // swift-runtime-interposer, which this machine's package mirror lacks.)
        .executableTarget(
            name: "iopf-microbench",
            dependencies: [
                "IOPFCore", "IOPFSimulation",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "MallocInterposerSwift", package: "malloc-interposer"),
            ],
            path: "Tools/iopf-microbench"
        ),
        // Tests, one target per module, plus end-to-end runs across processes. What several
        // share (services, peers, hosts, the child-process harness) is IOPFTestSupport.
        .target(
            name: "IOPFTestSupport",
            dependencies: [
                "IOPFService", "IOPFDevice", "IOPFSimulation", "IOPFSystem", "IOPFCore", "IOPFWire", "CIOPFShim",
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            path: "Tests/IOPFTestSupport"
        ),
        .testTarget(name: "IOPFWireTests", dependencies: ["IOPFWire"]),
        .testTarget(
            name: "IOPFCoreTests",
            dependencies: ["IOPFCore", .product(name: "BitCollections", package: "swift-collections")]
        ),
        .testTarget(name: "IOPFSystemTests", dependencies: ["IOPFSystem", "CIOPFShim"]),
        .testTarget(
            name: "IOPFDeviceTests",
            dependencies: [
                "IOPFDevice", "IOPFCore", "IOPFSystem", "IOPFWire", "CIOPFShim",
                .product(name: "SystemPackage", package: "swift-system"),
            ]),
        .testTarget(
            name: "IOPFServiceTests",
            dependencies: [
                "IOPFTestSupport", "IOPFService", "IOPFDevice", "IOPFSimulation", "IOPFSystem", "IOPFCore", "CIOPFShim",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .testTarget(name: "IOPFSimulationTests", dependencies: ["IOPFSimulation", "IOPFService", "IOPFCore"]),
        .testTarget(
            name: "IOPFVhostTests",
            dependencies: [
                "IOPFTestSupport", "IOPFVhost", "IOPFService", "IOPFSystem", "IOPFCore", "IOPFDevice",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .testTarget(
            name: "EndToEndTests",
            dependencies: [
                "IOPFTestSupport", "IOPFFuzzing", "IOPFService", "IOPFDevice", "IOPFSimulation", "IOPFSystem",
                "IOPFCore", "IOPFWire",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
    ]
)

// The libFuzzer binary, only when Tools/fuzz.sh asks for it (IOPF_FUZZ=1): it has no
// main() of its own (libFuzzer's), so ordinary builds must not link it.
if Context.environment["IOPF_FUZZ"] == "1" {
    package.products.append(.executable(name: "iopf-fuzz", targets: ["iopf-fuzz"]))
    package.targets.append(
        .executableTarget(
            name: "iopf-fuzz", dependencies: ["IOPFFuzzing"], path: "Tools/iopf-fuzz",
            swiftSettings: [.unsafeFlags(["-parse-as-library"])]
        ))
}

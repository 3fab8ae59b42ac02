// swift-tools-version: 6.1
// iopf: serve I/O page faults for DMA-capable devices without pinning their memory.
// Linux only. Swift 6 language mode (strict concurrency) throughout.

import PackageDescription

let package = Package(
    name: "iopf",
    products: [
        .library(name: "IOPFCore", targets: ["IOPFCore"]),
        .executable(name: "iopf", targets: ["iopf"]),
        .executable(name: "iopf-microbench", targets: ["iopf-microbench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
        .package(url: "https://github.com/ordo-one/malloc-interposer.git", from: "1.6.1"),
    ],
    targets: [
        // Pure Swift: every decision the service makes. No system calls; host memory is
        // reached through the `HostMemory` protocol that the runtime implements.
        .target(name: "IOPFCore"),
        .executableTarget(
            name: "iopf",
            dependencies: [
                "IOPFCore",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
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
                "IOPFCore",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "MallocInterposerSwift", package: "malloc-interposer"),
            ],
            path: "Tools/iopf-microbench"
        ),
        .testTarget(
            name: "IOPFCoreTests",
            dependencies: [
                "IOPFCore",
                .product(name: "BitCollections", package: "swift-collections"),
            ]
        ),
    ]
)

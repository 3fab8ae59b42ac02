// swift-tools-version: 6.1
// iopf: serve I/O page faults for DMA-capable devices without pinning their memory.
// Linux only. Swift 6 language mode (strict concurrency) throughout.

import PackageDescription

let package = Package(
    name: "iopf",
    products: [
        .library(name: "IOPFCore", targets: ["IOPFCore"]),
        .library(name: "IOPFRuntime", targets: ["IOPFRuntime"]),
        .executable(name: "iopf", targets: ["iopf"]),
        .executable(name: "iopf-microbench", targets: ["iopf-microbench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
        .package(url: "https://github.com/ordo-one/malloc-interposer.git", from: "1.6.1"),
        .package(url: "https://github.com/apple/swift-system.git", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.2.0"),
    ],
    targets: [
        // Pure Swift: every decision the service makes. No system calls; host memory is
        // reached through the `HostMemory` protocol that the runtime implements.
        .target(name: "IOPFCore"),
        // Debian's liburing-dev (2.3), through pkg-config.
        .systemLibrary(name: "CLiburing", pkgConfig: "liburing", providers: [.apt(["liburing-dev"])]),
        // What Swift cannot import: variadic syscall(), mremap, pipe2, UFFDIO_* ioctls.
        .target(name: "CIOPFShim"),
        // Everything that touches the OS: io_uring event loop, fault channels, host memory,
        // simulated devices.
        .target(
            name: "IOPFRuntime",
            dependencies: [
                "IOPFCore", "CLiburing", "CIOPFShim",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ]
        ),
        .executableTarget(
            name: "iopf",
            dependencies: [
                "IOPFCore", "IOPFRuntime",
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
        .testTarget(
            name: "IOPFRuntimeTests",
            dependencies: ["IOPFRuntime", "IOPFCore", "CIOPFShim"]
        ),
    ]
)

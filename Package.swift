// swift-tools-version: 6.1
// iopf: serve I/O page faults for DMA-capable devices without pinning their memory.
// Linux only. Swift 6 language mode (strict concurrency) throughout.

import PackageDescription

let package = Package(
    name: "iopf",
    products: [
        .library(name: "IOPFCore", targets: ["IOPFCore"]),
        .executable(name: "iopf", targets: ["iopf"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
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
        .testTarget(
            name: "IOPFCoreTests",
            dependencies: [
                "IOPFCore",
                .product(name: "BitCollections", package: "swift-collections"),
            ]
        ),
    ]
)

// swift-tools-version:5.9
// The Swift package of sparrow: the Swift API (target Sparrow) over the C ABI, which comes as
// SparrowFFI.xcframework (the static library of ffi/ for iOS, the iOS simulator and macOS,
// with sparrow.h as the Clang module SparrowFFI). Build the xcframework first, on macOS:
// ios/build-xcframework.sh.
import PackageDescription

let package = Package(
    name: "Sparrow",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [
        .library(name: "Sparrow", targets: ["Sparrow"]),
    ],
    targets: [
        .binaryTarget(name: "SparrowFFI", path: "SparrowFFI.xcframework"),
        .target(
            name: "Sparrow",
            dependencies: ["SparrowFFI"],
            // The Rust standard library's libc crate links libiconv on Apple targets.
            linkerSettings: [.linkedLibrary("iconv")]
        ),
        .testTarget(name: "SparrowTests", dependencies: ["Sparrow"]),
    ]
)

#!/usr/bin/env bash
# Builds ios/SparrowFFI.xcframework, the binary target of the Swift package: the static
# library of ffi/ (the C ABI, without the JNI glue) for iOS devices, the iOS simulator (arm64
# and x86_64 in one library) and macOS (arm64), with ffi/include/sparrow.h and the module map
# that makes it the Clang module SparrowFFI.
#
#   ios/build-xcframework.sh
#
# macOS only: needs Xcode (xcodebuild, lipo) and rustup. Intermediate files go to ios/build.
set -euo pipefail

if [ "$(uname -s)" != Darwin ]; then
    echo "error: build-xcframework.sh needs macOS with Xcode (xcodebuild, lipo); this is $(uname -s)" >&2
    exit 1
fi
for cmd in xcodebuild lipo cargo rustup; do
    command -v "$cmd" >/dev/null || { echo "error: \`$cmd\` is not installed; it is needed here" >&2; exit 1; }
done

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
cd "$root"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
build="$here/build"
out="$here/SparrowFFI.xcframework"

# The deployment targets of Package.swift, so that the objects do not ask for newer systems.
export IPHONEOS_DEPLOYMENT_TARGET=15.0
export MACOSX_DEPLOYMENT_TARGET=12.0

device=aarch64-apple-ios
simulators=(aarch64-apple-ios-sim x86_64-apple-ios)
mac=aarch64-apple-darwin

for target in "$device" "${simulators[@]}" "$mac"; do
    rustup target list --installed | grep -qx "$target" || rustup target add "$target"
    echo "== sparrow-ffi staticlib for $target"
    # Only the staticlib: --crate-type replaces the crate's list (cdylib, staticlib, rlib), so
    # no dylib is linked that the xcframework would not use. --no-default-features keeps the
    # JNI glue out.
    cargo rustc --release --locked -p sparrow-ffi --lib --target "$target" \
        --no-default-features --crate-type staticlib
done

lib() { echo "$target_dir/$1/release/libsparrow_ffi.a"; }

rm -rf "$build"
mkdir -p "$build/ios" "$build/ios-simulator" "$build/macos" "$build/include"
cp "$(lib "$device")" "$build/ios/libsparrow_ffi.a"
lipo -create "$(lib "${simulators[0]}")" "$(lib "${simulators[1]}")" \
    -output "$build/ios-simulator/libsparrow_ffi.a"
cp "$(lib "$mac")" "$build/macos/libsparrow_ffi.a"
cp "$root/ffi/include/sparrow.h" "$here/xcframework/module.modulemap" "$build/include/"

rm -rf "$out"
xcodebuild -create-xcframework \
    -library "$build/ios/libsparrow_ffi.a" -headers "$build/include" \
    -library "$build/ios-simulator/libsparrow_ffi.a" -headers "$build/include" \
    -library "$build/macos/libsparrow_ffi.a" -headers "$build/include" \
    -output "$out"
echo "built $out"

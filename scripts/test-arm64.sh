#!/usr/bin/env bash
# `npm run test:arm64`: builds the Rust tests for aarch64-unknown-linux-gnu and runs them
# under qemu-user, on an x86_64 Debian 12 machine without rustup's aarch64 target.
#
# The aarch64 Rust std comes from Debian: rustc-web (a newer rustc than bookworm's
# `rustc`) with its std for arm64 as a multiarch package; gcc and the arm64 C library
# from Debian's cross toolchain; qemu-user runs the test binaries. With rustup's target
# installed instead (`rustup target add aarch64-unknown-linux-gnu`), that one is used.
#
# One-time setup (root):
#   dpkg --add-architecture arm64 && apt-get update
#   apt-get install rustc-web cargo-web libstd-rust-web-dev:arm64 \
#     gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
set -euo pipefail
cd "$(dirname "$0")/.."

triple=aarch64-unknown-linux-gnu
has_std() { ls "$("$1" --print target-libdir --target "$triple" 2>/dev/null)"/libstd-*.rlib >/dev/null 2>&1; }
if has_std rustc; then
  cargo=cargo
elif [ -x /usr/bin/cargo ] && has_std /usr/bin/rustc; then
  # Debian's compiler: its own target dir, so it and rustup's never invalidate each other.
  cargo=/usr/bin/cargo
  export RUSTC=/usr/bin/rustc CARGO_TARGET_DIR=target/debian-rustc
else
  echo "test:arm64: no Rust std for $triple (see the setup in $0)" >&2
  exit 1
fi
for tool in aarch64-linux-gnu-gcc qemu-aarch64; do
  command -v "$tool" >/dev/null || { echo "test:arm64: $tool is missing (see the setup in $0)" >&2; exit 1; }
done

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# qemu-user takes the arm64 dynamic loader from Debian's cross sysroot (-L), and the
# guest's LD_LIBRARY_PATH (-E) makes that loader take libc.so.6 from the same sysroot.
# Without it the loader searches /lib/aarch64-linux-gnu, which qemu, finding no such
# directory under the sysroot, reads from the host, where libstd-rust-web-dev:arm64 has
# installed libc6:arm64: a libc of another build (2.36-9+deb12u14) than the cross loader
# (2.36-8), whose private `_rtld_global` layout differs. That mix hangs in the first
# pthread_create (an endless walk of the loader's stack-cache list), so every test binary
# hangs as the library starts tokio's threads. A test binary that hangs anyway is stopped
# after 10 minutes.
sysroot=/usr/aarch64-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="timeout 600 qemu-aarch64 -L $sysroot -E LD_LIBRARY_PATH=$sysroot/lib"

echo "test:arm64: $("${RUSTC:-rustc}" --version), $(qemu-aarch64 --version | head -1)"
nice -n 10 "$cargo" test --target "$triple" "$@"

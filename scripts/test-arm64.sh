#!/usr/bin/env bash
# `npm run test:arm64`: builds the Rust tests for aarch64-unknown-linux-gnu and runs them
# under qemu-user, on an x86_64 Debian 12 machine without rustup's aarch64 target; then
# runs the whole Node suite on the official arm64 Node, under the same qemu, against the
# linux-arm64-gnu release binary.
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
#
# The Node suite: the arm64 Node is the one .ci/nodes/package.json pins (node24-arm64),
# installed with `npm ci --cpu=arm64` from a copy of that package.json and its lockfile
# into target/arm64-node/ (.ci/nodes/node_modules keeps the x64 Nodes of
# test:node-versions). The binary is built with `npm run build:dist --
# aarch64-unknown-linux-gnu` first (the release build and its glibc check; cargo rebuilds
# only what changed). Node's test runner would start each file in a child process of
# process.execPath, which the host cannot exec, so scripts/node-suite-emulated.mjs, run by
# the host's Node, starts one emulated Node per file; the tests start their own child
# Nodes through REGISTRAR_TEST_NODE_RUNNER (__test__/helpers.mjs's nodeCommand), and the
# few waits that only the emulator's slowness breaks are ten times longer when it is set
# (helpers.mjs's scaledMs).
#
# Usage: npm run test:arm64 [-- cargo test arguments]
#        SKIP_RUST=1 npm run test:arm64   (the Node suite only)
set -euo pipefail
cd "$(dirname "$0")/.."

triple=aarch64-unknown-linux-gnu
has_std() { ls "$("$1" --print target-libdir --target "$triple" 2>/dev/null)"/libstd-*.rlib >/dev/null 2>&1; }
if has_std rustc; then
  cargo=cargo rustc=rustc cargo_env=()
elif [ -x /usr/bin/cargo ] && has_std /usr/bin/rustc; then
  # Debian's compiler: its own target dir, so it and rustup's never invalidate each other.
  cargo=/usr/bin/cargo rustc=/usr/bin/rustc cargo_env=(RUSTC=/usr/bin/rustc CARGO_TARGET_DIR=target/debian-rustc)
else
  echo "test:arm64: no Rust std for $triple (see the setup in $0)" >&2
  exit 1
fi
for tool in aarch64-linux-gnu-gcc qemu-aarch64 npm; do
  command -v "$tool" >/dev/null || { echo "test:arm64: $tool is missing (see the setup in $0)" >&2; exit 1; }
done

# qemu-user takes the arm64 dynamic loader from Debian's cross sysroot (-L), and the
# guest's LD_LIBRARY_PATH (-E) makes that loader take libc.so.6 from the same sysroot.
# Without it the loader searches /lib/aarch64-linux-gnu, which qemu, finding no such
# directory under the sysroot, reads from the host, where libstd-rust-web-dev:arm64 has
# installed libc6:arm64: a libc of another build (2.36-9+deb12u14) than the cross loader
# (2.36-8), whose private `_rtld_global` layout differs. That mix hangs in the first
# pthread_create (an endless walk of the loader's stack-cache list), so every test binary
# hangs as the library starts tokio's threads. The arm64 Node runs the same way (its
# libstdc++ comes from the sysroot too). qemu by its full path: an emulated Node that
# starts a child Node looks the command up itself.
sysroot=/usr/aarch64-linux-gnu
qemu="$(command -v qemu-aarch64) -L $sysroot -E LD_LIBRARY_PATH=$sysroot/lib"
echo "test:arm64: $("$rustc" --version), $(qemu-aarch64 --version | head -1)"

rust=skipped
if [ -z "${SKIP_RUST:-}" ]; then
  # Debian's cross gcc links the tests; a test binary that hangs anyway is stopped after 10 minutes.
  if env "${cargo_env[@]}" \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="timeout 600 $qemu" \
    nice -n 10 "$cargo" test --target "$triple" "$@"; then
    rust=passed
  else
    rust=FAILED
  fi
fi

# The Node suite: the pinned arm64 Node (target/arm64-node), the release binary
# (build:dist picks its compiler, toolchain and target dir itself), then every file.
node_suite=FAILED
nodes=target/arm64-node
mkdir -p "$nodes"
cp .ci/nodes/package.json .ci/nodes/package-lock.json "$nodes"/
if ! (cd "$nodes" && npm ci --cpu=arm64 --no-audit --no-fund --loglevel=error); then
  echo "test:arm64: the arm64 Node (node24-arm64 of .ci/nodes/package.json) did not install" >&2
elif ! nice -n 10 node scripts/build-dist.mjs "$triple"; then
  echo "test:arm64: the linux-arm64-gnu release build failed" >&2
elif REGISTRAR_TEST_NODE_RUNNER="$qemu" \
  node scripts/node-suite-emulated.mjs "$nodes/node_modules/node24-arm64/bin/node"; then
  node_suite=passed
fi

echo
echo "test:arm64: Rust tests $rust, Node suite $node_suite"
[ "$rust" != FAILED ] && [ "$node_suite" = passed ]

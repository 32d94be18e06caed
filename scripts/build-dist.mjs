#!/usr/bin/env node
// `npm run build:dist`: release builds of the Linux targets into their npm/ folders, the
// way napi-rs's package-template builds them, then the glibc check on the gnu ones.
//
//   x86_64-unknown-linux-gnu   napi build --use-napi-cross (gcc toolchain with a glibc 2.17 sysroot)
//   aarch64-unknown-linux-gnu  the same toolchain for aarch64; needs a Rust std for aarch64
//   x86_64-unknown-linux-musl  napi build -x (cargo-zigbuild, zig from the `ziglang` PyPI
//                              package); with no musl std installed, std is built from
//                              Debian's rust-web-src (see muslFromSource below)
//
// A target whose Rust std is not installed is skipped with the reason and the run fails,
// unless it is left out on the command line. Builds run one at a time. After the builds:
// the glibc check on the gnu binaries, the musl check (scripts/check-musl.mjs) on the musl one.
//
// Usage: node scripts/build-dist.mjs [triple...]   (default: all three)
import { spawnSync } from 'node:child_process'
import { copyFileSync, existsSync, readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { ensureToolchain } from './napi-cross-toolchain.mjs'

// cargo-zigbuild (for `napi build -x`) and zig, both from PyPI; the versions build:dist was verified with.
const ZIG_TOOLS = 'python3 -m pip install ziglang==0.17.1 cargo-zigbuild==0.24.1'

const root = fileURLToPath(new URL('..', import.meta.url))
const TARGETS = {
  'x86_64-unknown-linux-gnu': { dir: 'linux-x64-gnu', args: ['--use-napi-cross'] },
  'aarch64-unknown-linux-gnu': {
    dir: 'linux-arm64-gnu',
    args: ['--use-napi-cross'],
    // The toolchain's gcc (4.8) does not define __ARM_ARCH, which ring's assembly requires.
    env: { CFLAGS_aarch64_unknown_linux_gnu: '-D__ARM_ARCH=8' },
  },
  'x86_64-unknown-linux-musl': { dir: 'linux-x64-musl', args: ['-x'] },
}
const wanted = process.argv.slice(2)
const triples = wanted.length > 0 ? wanted : Object.keys(TARGETS)

const require = createRequire(import.meta.url)
const cliPackage = require.resolve('@napi-rs/cli/package.json')
const napiBin = join(dirname(cliPackage), JSON.parse(readFileSync(cliPackage, 'utf8')).bin.napi)
const { binaryName } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).napi

/**
 * The cargo/rustc pair that has a std for `triple`: rustup's toolchain when it has the
 * target, else Debian's rustc-web (/usr/bin/rustc), whose std for other architectures
 * comes as Debian multiarch packages (libstd-rust-web-dev:arm64). Null when neither has it.
 */
function rustFor(triple) {
  const hasStd = (rustc) => {
    const out = spawnSync(rustc, ['--print', 'target-libdir', '--target', triple], { encoding: 'utf8' })
    const dir = out.status === 0 ? out.stdout.trim() : ''
    return dir !== '' && existsSync(dir) && spawnSync('sh', ['-c', `ls "${dir}"/libstd-*.rlib`]).status === 0
  }
  if (hasStd('rustc')) return { env: {}, label: 'rustup toolchain' }
  if (existsSync('/usr/bin/cargo') && hasStd('/usr/bin/rustc')) {
    const version = spawnSync('/usr/bin/rustc', ['--version'], { encoding: 'utf8' }).stdout.trim()
    // A separate target dir: artifacts of two compilers must not invalidate each other.
    return {
      env: { CARGO: '/usr/bin/cargo', RUSTC: '/usr/bin/rustc', CARGO_TARGET_DIR: join(root, 'target', 'debian-rustc') },
      label: `Debian ${version}`,
    }
  }
  if (triple.endsWith('-musl')) return muslFromSource(triple)
  return null
}

/**
 * A musl std built from source, for machines with no musl std to install: rustup's is not
 * reachable here, and Debian packages a Rust std only for its own (glibc) architectures.
 * Debian's rustc-web builds one with `-Zbuild-std` (RUSTC_BOOTSTRAP=1 lets a stable cargo
 * take the flag) from Debian's rust-web-src, the library source of the very same compiler
 * (/usr/src/rustc-<version>/library; std must come from the compiler's own version).
 * rust-web-src does not install the lib/rustlib/src/rust link that build-std looks for in
 * the sysroot, so the source is named with cargo's __CARGO_TESTS_ONLY_SRC_ROOT.
 *
 * The link goes through zig (`napi build -x`, cargo-zigbuild), not musl-gcc: std for a
 * dynamically linked musl target (`-C target-feature=-crt-static`, which a cdylib that
 * Node loads needs) links the unwinder as `-lgcc_s`. Debian has only glibc's libgcc_s, so
 * musl-gcc made a binary that musl's loader cannot load. cargo-zigbuild links zig's own
 * musl libc stub and puts zig's libunwind in place of gcc_s, statically, so the .node
 * needs nothing but musl's libc.so. panic_unwind is built too: napi-rs turns a Rust panic
 * into a JS exception, as on the other targets.
 */
function muslFromSource(triple) {
  if (!existsSync('/usr/bin/cargo')) return null
  const release = /^release: (\S+)$/m.exec(spawnSync('/usr/bin/rustc', ['-vV'], { encoding: 'utf8' }).stdout ?? '')?.[1]
  const library = `/usr/src/rustc-${release}/library`
  if (!release || !existsSync(join(library, 'Cargo.lock'))) return null
  const zig =
    spawnSync('zig', ['version']).status === 0 || spawnSync('python3', ['-m', 'ziglang', 'version']).status === 0
  const zigbuild = spawnSync('cargo-zigbuild', ['--version']).status === 0
  if (!zig || !zigbuild) return { missing: `zig or cargo-zigbuild is not installed (${ZIG_TOOLS})` }
  return {
    // napi warns that CARGO replaces the `cargo` that -x relies on: harmless, Debian's cargo
    // runs the `cargo zigbuild` subcommand (cargo-zigbuild on PATH) like any other.
    env: {
      CARGO: '/usr/bin/cargo',
      RUSTC: '/usr/bin/rustc',
      RUSTC_BOOTSTRAP: '1',
      CARGO_UNSTABLE_BUILD_STD: 'std,panic_unwind',
      __CARGO_TESTS_ONLY_SRC_ROOT: library,
      CARGO_TARGET_DIR: join(root, 'target', 'debian-rustc-musl'),
    },
    label: `Debian rustc ${release}, std for ${triple} built from ${library}, linked by zig`,
  }
}

const results = []
for (const triple of triples) {
  const target = TARGETS[triple]
  if (!target) {
    console.error(`unknown target ${triple}; build:dist builds ${Object.keys(TARGETS).join(', ')}`)
    process.exit(2)
  }
  const rust = rustFor(triple)
  if (!rust || rust.missing) {
    const reason =
      rust?.missing ??
      (triple.endsWith('-musl')
        ? `no Rust std for ${triple} (rustup target add ${triple}; on Debian without rustup targets: apt-get install rustc-web cargo-web rust-web-src, and ${ZIG_TOOLS})`
        : `no Rust std for ${triple} (rustup target add ${triple}; on Debian without rustup targets: apt-get install rustc-web cargo-web and the target's libstd-rust-web-dev)`)
    console.error(`\nbuild:dist: SKIPPED ${triple}: ${reason}`)
    results.push([triple, `SKIPPED: ${reason}`])
    continue
  }
  if (target.args.includes('--use-napi-cross')) ensureToolchain(triple)
  console.log(`\n> napi build --platform --release --target ${triple} ${target.args.join(' ')}   (${rust.label})`)
  const build = spawnSync(
    process.execPath,
    [napiBin, 'build', '--platform', '--release', '--target', triple, ...target.args],
    { cwd: root, stdio: 'inherit', env: { ...target.env, ...process.env, ...rust.env } },
  )
  if (build.status !== 0) {
    results.push([triple, 'FAILED'])
    continue
  }
  const file = `${binaryName}.${target.dir}.node`
  copyFileSync(join(root, file), join(root, 'npm', target.dir, file))
  results.push([triple, `built npm/${target.dir}/${file}`])
}

const gnu = results
  .filter(([triple, outcome]) => triple.endsWith('-gnu') && outcome.startsWith('built'))
  .map(([triple]) => join('npm', TARGETS[triple].dir, `${binaryName}.${TARGETS[triple].dir}.node`))
let glibcOk = true
if (gnu.length > 0) {
  console.log()
  glibcOk =
    spawnSync(process.execPath, [join(root, 'scripts', 'check-glibc.mjs'), ...gnu], { cwd: root, stdio: 'inherit' })
      .status === 0
}
const musl = results
  .filter(([triple, outcome]) => triple.endsWith('-musl') && outcome.startsWith('built'))
  .map(([triple]) => join('npm', TARGETS[triple].dir, `${binaryName}.${TARGETS[triple].dir}.node`))
let muslOk = true
if (musl.length > 0) {
  console.log()
  muslOk =
    spawnSync(process.execPath, [join(root, 'scripts', 'check-musl.mjs'), ...musl], { cwd: root, stdio: 'inherit' })
      .status === 0
}

console.log('\nbuild:dist:')
for (const [triple, outcome] of results) console.log(`  ${triple}: ${outcome}`)
if (gnu.length > 0) console.log(`  glibc check: ${glibcOk ? 'ok' : 'FAILED'}`)
if (musl.length > 0) console.log(`  musl check: ${muslOk ? 'ok' : 'FAILED'}`)
process.exit(glibcOk && muslOk && results.every(([, outcome]) => outcome.startsWith('built')) ? 0 : 1)

#!/usr/bin/env node
// `npm run build:dist`: release builds of the Linux targets into their npm/ folders, the
// way napi-rs's package-template builds them, then the glibc check on the gnu ones.
//
//   x86_64-unknown-linux-gnu   napi build --use-napi-cross (gcc toolchain with a glibc 2.17 sysroot)
//   aarch64-unknown-linux-gnu  the same toolchain for aarch64; needs a Rust std for aarch64
//   x86_64-unknown-linux-musl  napi build -x (cargo-zigbuild); needs a Rust std for musl
//
// A target whose Rust std is not installed is skipped with the reason and the run fails,
// unless it is left out on the command line. Builds run one at a time.
//
// Usage: node scripts/build-dist.mjs [triple...]   (default: all three)
import { spawnSync } from 'node:child_process'
import { copyFileSync, existsSync, readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { ensureToolchain } from './napi-cross-toolchain.mjs'

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
  return null
}

const results = []
for (const triple of triples) {
  const target = TARGETS[triple]
  if (!target) {
    console.error(`unknown target ${triple}; build:dist builds ${Object.keys(TARGETS).join(', ')}`)
    process.exit(2)
  }
  const rust = rustFor(triple)
  if (!rust) {
    const reason = `no Rust std for ${triple} (rustup target add ${triple}; on Debian without rustup targets: apt-get install rustc-web cargo-web and the target's libstd-rust-web-dev)`
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

console.log('\nbuild:dist:')
for (const [triple, outcome] of results) console.log(`  ${triple}: ${outcome}`)
if (gnu.length > 0) console.log(`  glibc check: ${glibcOk ? 'ok' : 'FAILED'}`)
process.exit(glibcOk && results.every(([, outcome]) => outcome.startsWith('built')) ? 0 : 1)

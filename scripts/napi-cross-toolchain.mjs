#!/usr/bin/env node
// Puts the gcc cross toolchain (glibc 2.17 sysroot) that `napi build --use-napi-cross`
// uses where the CLI looks for it: ~/.napi-rs/cross-toolchain/<version>/<triple>.
//
// Why not let the CLI fetch it: @napi-rs/cross-toolchain asks npm for the toolchain
// package at its own version, and the toolchain packages are not published at every
// version (x86_64 exists at 1.0.0, aarch64 at 1.0.3, neither at 1.0.5). So the versions
// that exist are pinned here, fetched with `npm pack` from the npm registry, and unpacked
// into the folder the CLI checks first.
//
// Usage: node scripts/napi-cross-toolchain.mjs <triple>...   (prints the toolchain folder)
import { execFileSync } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs'
import { createRequire } from 'node:module'
import { homedir, tmpdir } from 'node:os'
import { join } from 'node:path'

/** The toolchain package, and the version of it that exists, per target and host arch. */
export const TOOLCHAINS = {
  x64: {
    'x86_64-unknown-linux-gnu': ['@napi-rs/cross-toolchain-x64-target-x86_64', '1.0.0'],
    'aarch64-unknown-linux-gnu': ['@napi-rs/cross-toolchain-x64-target-aarch64', '1.0.3'],
  },
}

/** Makes sure the toolchain for `triple` is unpacked; returns its folder. */
export function ensureToolchain(triple) {
  const require = createRequire(import.meta.url)
  const { version } = require('@napi-rs/cross-toolchain/package.json')
  const dest = join(homedir(), '.napi-rs', 'cross-toolchain', version, triple)
  // The CLI takes a folder with a package.json as an unpacked toolchain.
  if (existsSync(join(dest, 'package.json'))) return dest
  const pinned = TOOLCHAINS[process.arch]?.[triple]
  if (process.platform !== 'linux' || !pinned) {
    throw new Error(`no napi-rs cross toolchain for ${triple} on ${process.platform}-${process.arch}`)
  }
  const [name, pinnedVersion] = pinned
  const scratch = mkdtempSync(join(tmpdir(), 'napi-cross-'))
  try {
    execFileSync('npm', ['pack', '--silent', `${name}@${pinnedVersion}`], { cwd: scratch, stdio: 'inherit' })
    const tgz = readdirSync(scratch).find((file) => file.endsWith('.tgz'))
    execFileSync('tar', ['-xzf', tgz], { cwd: scratch })
    const xz = readdirSync(join(scratch, 'package')).find((file) => file.endsWith('.tar.xz'))
    rmSync(dest, { recursive: true, force: true })
    mkdirSync(dest, { recursive: true })
    execFileSync('tar', ['-xJf', join(scratch, 'package', xz), '-C', dest])
  } finally {
    rmSync(scratch, { recursive: true, force: true })
  }
  if (!existsSync(join(dest, 'package.json'))) throw new Error(`unpacked ${name} has no package.json in ${dest}`)
  return dest
}

if (import.meta.url === `file://${process.argv[1]}`) {
  for (const triple of process.argv.slice(2)) console.log(ensureToolchain(triple))
}

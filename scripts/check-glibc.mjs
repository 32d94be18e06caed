#!/usr/bin/env node
// Fails when a glibc binary needs a glibc symbol version newer than the floor (2.17, the
// sysroot of the napi-rs cross toolchain), i.e. would not load on RHEL 7/8, Ubuntu 20.04
// or Amazon Linux 2. Reads the versioned dynamic symbols with `readelf --dyn-syms`
// (binutils; readelf reads an ELF of any architecture, an arm64 one on an x86_64 host).
//
// Usage: node scripts/check-glibc.mjs [file.node...]   (default: every npm/*-gnu/*.node)
import { execFileSync } from 'node:child_process'
import { existsSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

const FLOOR = '2.17'
const root = fileURLToPath(new URL('..', import.meta.url))

const compare = (a, b) => {
  const [x, y] = [a.split('.').map(Number), b.split('.').map(Number)]
  for (let i = 0; i < Math.max(x.length, y.length); i++) {
    if ((x[i] ?? 0) !== (y[i] ?? 0)) return (x[i] ?? 0) - (y[i] ?? 0)
  }
  return 0
}

const files = process.argv.slice(2)
if (files.length === 0) {
  for (const dir of readdirSync(join(root, 'npm'))) {
    if (!dir.endsWith('-gnu')) continue
    for (const file of readdirSync(join(root, 'npm', dir))) {
      if (file.endsWith('.node')) files.push(join('npm', dir, file))
    }
  }
}
if (files.length === 0) {
  console.error('check-glibc: no gnu .node binary to check (run `npm run build:dist` first)')
  process.exit(1)
}

let failed = false
for (const file of files) {
  if (!existsSync(file)) {
    console.error(`check-glibc: ${file} does not exist`)
    failed = true
    continue
  }
  const table = execFileSync('readelf', ['--dyn-syms', '--wide', file], { encoding: 'utf8', maxBuffer: 64 << 20 })
  const needs = new Map()
  for (const match of table.matchAll(/\s([^\s@]+)@@?GLIBC_(\d+(?:\.\d+)+)/g)) {
    const [, symbol, version] = match
    if (!needs.has(version)) needs.set(version, [])
    needs.get(version).push(symbol)
  }
  const versions = [...needs.keys()].sort(compare)
  const newest = versions.at(-1) ?? 'none'
  const tooNew = versions.filter((version) => compare(version, FLOOR) > 0)
  if (tooNew.length > 0) {
    failed = true
    console.error(`check-glibc: ${file} needs GLIBC_${newest}, more than ${FLOOR}:`)
    for (const version of tooNew) console.error(`  GLIBC_${version}: ${needs.get(version).join(', ')}`)
  } else {
    console.log(`check-glibc: ${file} ok (newest symbol version GLIBC_${newest}, floor ${FLOOR})`)
  }
}
process.exit(failed ? 1 : 0)

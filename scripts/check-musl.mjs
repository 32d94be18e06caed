#!/usr/bin/env node
// Fails when a musl binary would not load under musl's dynamic loader: it must be a shared
// object that needs only musl's libc (NEEDED `libc.so`, which musl's loader resolves to
// itself, or `libc.musl-<arch>.so.1`, Alpine's name for it), with no glibc symbol versions
// and no libgcc_s (Alpine's Node image does not promise one; a glibc one cannot load). Then,
// where Debian's `musl` package provides the loader (/lib/ld-musl-x86_64.so.1), the loader
// itself lists the binary's dependencies: it resolves them and the relocations against
// musl's libc, or fails; and where musl-gcc (Debian's musl-tools) is there too, a small musl
// program dlopen()s it (RTLD_NOW: every symbol bound, its initialisers run) and finds
// napi_register_module_v1, the entry point Node calls. Nothing here runs a musl Node; the
// workflow does, on Alpine.
//
// Usage: node scripts/check-musl.mjs [file.node...]   (default: every npm/*-musl/*.node)
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('..', import.meta.url))
const MUSL_LIBC = /^libc\.so$|^libc\.musl-[a-z0-9_]+\.so\.1$/
const LOADERS = { 'X86-64': '/lib/ld-musl-x86_64.so.1', AArch64: '/lib/ld-musl-aarch64.so.1' }

const files = process.argv.slice(2)
if (files.length === 0) {
  for (const dir of readdirSync(join(root, 'npm'))) {
    if (!dir.endsWith('-musl')) continue
    for (const file of readdirSync(join(root, 'npm', dir))) {
      if (file.endsWith('.node')) files.push(join('npm', dir, file))
    }
  }
}
if (files.length === 0) {
  console.error('check-musl: no musl .node binary to check (run `npm run build:dist` first)')
  process.exit(1)
}

const run = (cmd, args) => spawnSync(cmd, args, { encoding: 'utf8' })

const DLOPEN_C = `#include <dlfcn.h>
#include <stdio.h>
int main(int argc, char **argv) {
  void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!h) { fprintf(stderr, "dlopen: %s\\n", dlerror()); return 1; }
  if (!dlsym(h, "napi_register_module_v1")) { fprintf(stderr, "no napi_register_module_v1\\n"); return 1; }
  return 0;
}
`
/** A musl program that dlopen()s its argument, or null without musl-gcc. */
function muslDlopen() {
  if (run('musl-gcc', ['--version']).status !== 0) return null
  const dir = mkdtempSync(join(tmpdir(), 'check-musl-'))
  writeFileSync(join(dir, 'dlopen.c'), DLOPEN_C)
  const built = run('musl-gcc', ['-o', join(dir, 'dlopen'), join(dir, 'dlopen.c')])
  if (built.status !== 0) throw new Error(`musl-gcc: ${built.stderr}`)
  return { bin: join(dir, 'dlopen'), cleanup: () => rmSync(dir, { recursive: true, force: true }) }
}
const dlopen = muslDlopen()
let failed = false
for (const file of files) {
  const fail = (why) => {
    console.error(`check-musl: ${file}: ${why}`)
    failed = true
  }
  if (!existsSync(file)) {
    fail('missing')
    continue
  }
  const header = run('readelf', ['-h', file]).stdout
  const machine = /Machine:\s+.*?(X86-64|AArch64)/.exec(header)?.[1]
  if (!/Type:\s+DYN/.test(header)) fail('not a shared object')
  const dynamic = run('readelf', ['-d', file]).stdout
  const needed = [...dynamic.matchAll(/\(NEEDED\)\s+Shared library: \[([^\]]+)\]/g)].map((m) => m[1])
  const foreign = needed.filter((lib) => !MUSL_LIBC.test(lib))
  if (!needed.some((lib) => MUSL_LIBC.test(lib))) fail(`does not link musl's libc (NEEDED: ${needed.join(', ')})`)
  if (foreign.length > 0) fail(`needs ${foreign.join(', ')} besides musl's libc`)
  const glibc = new Set(run('readelf', ['--dyn-syms', '-W', file]).stdout.match(/GLIBC_[0-9.]+/g) ?? [])
  if (glibc.size > 0) fail(`has glibc symbol versions: ${[...glibc].join(', ')}`)
  let loaded = 'no musl loader here to try it'
  const loader = LOADERS[machine]
  if (loader && existsSync(loader)) {
    // `ld-musl --list` maps the object with musl's libc and performs its relocations.
    const list = run(loader, ['--list', file])
    if (list.status !== 0 || /not found|Error/i.test(list.stderr + list.stdout)) {
      fail(`${loader} --list failed: ${(list.stderr + list.stdout).trim()}`)
    } else {
      loaded = `${loader} --list resolves it`
    }
    if (dlopen && machine === 'X86-64') {
      const opened = run(dlopen.bin, [resolve(file)])
      if (opened.status !== 0) fail(`a musl program cannot dlopen it: ${opened.stderr.trim()}`)
      else loaded += '; a musl program dlopen()s it and finds napi_register_module_v1'
    }
  }
  if (!failed) console.log(`check-musl: ${file}: ${machine}, NEEDED ${needed.join(', ')}, no glibc symbols; ${loaded}`)
}
dlopen?.cleanup()
process.exit(failed ? 1 : 0)

#!/usr/bin/env node
// Packs the package as npm would publish it, installs the tarball into a scratch project
// and type-checks the strict consumers in __test__/types/ against it (ESM import and CJS
// require, with moduleResolution node16 and bundler). Fails on any TypeScript error.
import { execFileSync } from 'node:child_process'
import { cpSync, mkdirSync, mkdtempSync, readdirSync, rmSync, symlinkSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('..', import.meta.url))
const fixture = join(root, '__test__', 'types')
const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc')
const scratch = mkdtempSync(join(tmpdir(), 'registrar-types-'))

try {
  const packed = JSON.parse(
    execFileSync('npm', ['pack', '--json', '--pack-destination', scratch], { cwd: root, encoding: 'utf8' }),
  )
  const tarball = join(scratch, packed[0].filename)
  const installed = join(scratch, 'node_modules', '@mcpctl', 'registrar')
  mkdirSync(installed, { recursive: true })
  execFileSync('tar', ['-xzf', tarball, '-C', installed, '--strip-components=1'])
  // Only @types/node comes from the repository's own install; the package itself comes from the tarball.
  symlinkSync(join(root, 'node_modules', '@types'), join(scratch, 'node_modules', '@types'), 'dir')
  for (const file of readdirSync(fixture)) cpSync(join(fixture, file), join(scratch, file))
  for (const config of ['tsconfig.node16.json', 'tsconfig.bundler.json']) {
    try {
      execFileSync(process.execPath, [tsc, '-p', config], { cwd: scratch, stdio: 'inherit' })
      console.log(`types consumer (${config}, ${packed[0].filename}): ok`)
    } catch {
      console.error(`types consumer (${config}, ${packed[0].filename}): FAILED`)
      process.exitCode = 1
    }
  }
} finally {
  rmSync(scratch, { recursive: true, force: true })
}

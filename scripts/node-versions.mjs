#!/usr/bin/env node
// `npm run test:node-versions`: runs the whole Node suite, against the addon already
// built, on each Node that .ci/nodes/package.json pins (the official linux-x64 binaries
// from the npm registry, installed by `npm ci` into .ci/nodes/ and cached in npm's
// cache like any package), with that Node first on PATH. Prints one result line per
// Node and exits non-zero when any failed. Linux x64 only: elsewhere the pinned
// packages do not install, and the script says so and fails.
import { spawnSync } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { delimiter, dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('..', import.meta.url))
const nodesDir = join(root, '.ci', 'nodes')
const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm'

const install = spawnSync(npm, ['ci', '--no-audit', '--no-fund', '--loglevel=error'], {
  cwd: nodesDir,
  stdio: 'inherit',
})
if (install.status !== 0) {
  console.error('node-versions: `npm ci` in .ci/nodes failed')
  process.exit(1)
}

const pinned = JSON.parse(readFileSync(join(nodesDir, 'package.json'), 'utf8')).optionalDependencies
const hostCpu = process.arch === 'x64' ? 'x64' : process.arch
const results = []
for (const [alias, spec] of Object.entries(pinned)) {
  if (!spec.includes(`-${process.platform}-${hostCpu}@`)) continue
  const node = join(nodesDir, 'node_modules', alias, 'bin', 'node')
  if (!existsSync(node)) {
    results.push({ alias, version: spec, ok: false, why: 'not installed' })
    continue
  }
  const version = spawnSync(node, ['--version'], { encoding: 'utf8' }).stdout.trim()
  console.log(`\n=== Node suite on Node ${version} (${alias})`)
  const env = { ...process.env, PATH: `${dirname(node)}${delimiter}${process.env.PATH}` }
  const run = spawnSync(node, ['scripts/test.mjs', 'node', '--no-build'], { cwd: root, stdio: 'inherit', env })
  results.push({ alias, version, ok: run.status === 0 })
}

if (results.length === 0) {
  console.error(`node-versions: no pinned Node for ${process.platform}-${hostCpu}`)
  process.exit(1)
}
console.log('\nNode suite by Node version:')
for (const { version, ok, why } of results)
  console.log(`  node ${version}: ${ok ? 'passed' : `FAILED${why ? ` (${why})` : ''}`}`)
process.exit(results.every((result) => result.ok) ? 0 : 1)

#!/usr/bin/env node
// `npm test`: builds the debug addon and runs the Rust tests and the Node tests, both of
// them even when one fails, and exits non-zero when either did.
//
// One compile: `napi build` always passes `--target <host>` (artifacts under
// target/<host>/debug) and builds only the library, so tokio comes without the
// dev-dependency features (test-util); a plain `cargo test` would build every dependency
// again under target/debug with them. Here the addon build also names the integration
// tests (`--test '*'`), which turns on the same features, and `cargo test` gets the same
// `--target`: the second step reuses every dependency the first one built.
//
// The Node suite runs on the Node that runs this script (scripts/node-suite.mjs names its
// files, which every Node from 20 on accepts): `PATH=/path/to/node24/bin:$PATH npm test`
// tests on Node 24. `--no-build` runs the suites against the addon already built.
//
// Usage: node scripts/test.mjs [rust] [node] [--no-build]   (no suite named: both)
import { spawnSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { runNodeSuite } from './node-suite.mjs'

const root = fileURLToPath(new URL('..', import.meta.url))
const noBuild = process.argv.includes('--no-build')
const wanted = process.argv.slice(2).filter((arg) => arg !== '--no-build')
const suites = wanted.length > 0 ? wanted : ['rust', 'node']
for (const suite of suites) {
  if (suite !== 'rust' && suite !== 'node') {
    console.error(`unknown suite ${suite}: expected rust and/or node`)
    process.exit(2)
  }
}

function run(command, args, env = process.env) {
  console.log(`\n> ${[command, ...args].join(' ')}`)
  const result = spawnSync(command, args, { cwd: root, stdio: 'inherit', env })
  if (result.error) console.error(result.error.message)
  return result.status === 0
}

const hostTriple = /^host: (\S+)$/m.exec(spawnSync('rustc', ['-vV'], { cwd: root, encoding: 'utf8' }).stdout ?? '')?.[1]
if (!hostTriple) {
  console.error('could not read the host triple from `rustc -vV`')
  process.exit(1)
}

const require = createRequire(import.meta.url)
const cliPackage = require.resolve('@napi-rs/cli/package.json')
const napiBin = join(dirname(cliPackage), JSON.parse(readFileSync(cliPackage, 'utf8')).bin.napi)

const outcome = {}
const built =
  noBuild ||
  run(process.execPath, [napiBin, 'build', '--platform', '--target', hostTriple, '--', '--lib', '--test', '*'])
if (suites.includes('rust')) outcome.rust = run('cargo', ['test', '--target', hostTriple])
if (suites.includes('node')) {
  outcome.node = built && runNodeSuite()
  if (!built) console.error('\nnode tests not run: the addon did not build')
}

const summary = Object.entries(outcome).map(([suite, ok]) => `${suite} ${ok ? 'ok' : 'FAILED'}`)
console.log(`\nnpm test (node ${process.version}): addon build ${built ? 'ok' : 'FAILED'}, ${summary.join(', ')}`)
process.exit(built && Object.values(outcome).every(Boolean) ? 0 : 1)

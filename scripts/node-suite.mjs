#!/usr/bin/env node
// The Node suite: the test files of __test__/ named one by one, run by the Node that
// runs this script. `node --test __test__/` stopped working in Node 21 (a directory
// argument is matched as a glob, matches the directory itself and is loaded as a
// module), and a quoted glob is not expanded by Node 20: naming the files works on
// every Node from 20 on. Used by `npm test`, scripts/stress.sh, .ci/run and the
// workflow. Usage: node scripts/node-suite.mjs [extra node --test flags]
import { spawnSync } from 'node:child_process'
import { readdirSync } from 'node:fs'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('..', import.meta.url))

/** The suite's files, relative to the package root, in a stable order. */
export function testFiles() {
  return readdirSync(new URL('../__test__/', import.meta.url))
    .filter((name) => name.endsWith('.test.mjs'))
    .sort()
    .map((name) => `__test__/${name}`)
}

/** `node --test` over the suite with the given Node binary; true when it passed. */
export function runNodeSuite(node = process.execPath, extra = []) {
  const files = testFiles()
  if (files.length === 0) {
    console.error('no __test__/*.test.mjs files found')
    return false
  }
  const args = ['--test', '--test-concurrency=2', '--test-timeout=120000', ...extra, ...files]
  console.log(`\n> ${node} --test ... (${files.length} files)`)
  const result = spawnSync(node, args, { cwd: root, stdio: 'inherit' })
  if (result.error) console.error(result.error.message)
  return result.status === 0
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  process.exit(runNodeSuite(process.execPath, process.argv.slice(2)) ? 0 : 1)
}

#!/usr/bin/env node
// The Node suite (the files scripts/node-suite.mjs names) on a Node of another architecture
// that the host runs through an emulator: scripts/test-arm64.sh's arm64 Node under qemu-user.
//
// `node --test` runs each file in a child process of its own process.execPath, which the host
// cannot exec (an arm64 binary, and no binfmt handler), so this script, run by the host's
// Node, does what that process isolation does: one process per file, `<runner> <node> --test
// --test-isolation=none <file>`, two at a time like the native suite, each file's output
// printed whole when it ends; then the summed results. The tests' own child Nodes go
// through the same runner: REGISTRAR_TEST_NODE_RUNNER, read by __test__/helpers.mjs.
//
// Usage: REGISTRAR_TEST_NODE_RUNNER='qemu-aarch64 -L …' node scripts/node-suite-emulated.mjs <node> [file…]
// (no file named: the whole suite)
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { testFiles } from './node-suite.mjs'

const root = fileURLToPath(new URL('..', import.meta.url))
// Emulated, a test runs 5 to 20 times slower and every Node takes seconds to start.
const TEST_TIMEOUT_MS = 600_000
// A file whose process has not ended by then (a handle left open) is killed and counted failed.
const FILE_TIMEOUT_MS = 30 * 60_000
const CONCURRENCY = 2
const COUNTS = ['tests', 'pass', 'fail', 'cancelled', 'skipped', 'todo']

const runner = (process.env.REGISTRAR_TEST_NODE_RUNNER ?? '').split(/\s+/).filter(Boolean)
const [node, ...named] = process.argv.slice(2)
if (runner.length === 0 || !node) {
  console.error(
    'usage: REGISTRAR_TEST_NODE_RUNNER=<emulator command> node scripts/node-suite-emulated.mjs <node> [file...]',
  )
  process.exit(2)
}

/** Runs one file in its own emulated Node; resolves with its counts, parsed from the spec reporter's summary. */
function runFile(file) {
  const args = [
    ...runner.slice(1),
    node,
    '--test',
    '--test-isolation=none',
    '--test-reporter=spec',
    `--test-timeout=${TEST_TIMEOUT_MS}`,
    file,
  ]
  const started = performance.now()
  return new Promise((resolve) => {
    const child = spawn(runner[0], args, { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] })
    let output = ''
    child.stdout.setEncoding('utf8').on('data', (text) => {
      output += text
    })
    child.stderr.setEncoding('utf8').on('data', (text) => {
      output += text
    })
    const timer = setTimeout(() => {
      output += `\nnode-suite-emulated: ${file} still running after ${FILE_TIMEOUT_MS / 60_000} min, killed\n`
      child.kill('SIGKILL')
    }, FILE_TIMEOUT_MS)
    child.on('error', (error) => {
      output += `\nnode-suite-emulated: ${error.message}\n`
    })
    child.on('close', (code, signal) => {
      clearTimeout(timer)
      const counts = {}
      for (const name of COUNTS) counts[name] = Number(new RegExp(`^ℹ ${name} (\\d+)$`, 'm').exec(output)?.[1] ?? 0)
      const seconds = (performance.now() - started) / 1000
      console.log(`\n=== ${file} (${seconds.toFixed(0)} s, exit ${signal ?? code})\n${output.trimEnd()}`)
      resolve({ file, counts, seconds, ok: code === 0 && counts.tests > 0 && counts.fail === 0 })
    })
  })
}

const files = named.length > 0 ? named : testFiles()
const version = await new Promise((resolve) => {
  let out = ''
  const child = spawn(runner[0], [...runner.slice(1), node, '-p', 'process.version + " " + process.arch'])
  child.stdout.setEncoding('utf8').on('data', (text) => {
    out += text
  })
  child.on('close', () => resolve(out.trim()))
  child.on('error', () => resolve('(did not start)'))
})
console.log(
  `\n> ${runner.join(' ')} ${node} --test … (Node ${version}, ${files.length} files, ${CONCURRENCY} at a time)`,
)
const started = performance.now()
const results = []
const queue = [...files]
await Promise.all(
  Array.from({ length: CONCURRENCY }, async () => {
    while (queue.length > 0) results.push(await runFile(queue.shift()))
  }),
)

const total = Object.fromEntries(COUNTS.map((name) => [name, 0]))
console.log(`\nNode suite on Node ${version} through ${runner[0]}:`)
for (const file of files) {
  const result = results.find((r) => r.file === file)
  for (const name of COUNTS) total[name] += result.counts[name]
  const { tests, pass, fail } = result.counts
  console.log(
    `  ${result.ok ? 'ok    ' : 'FAILED'} ${file}: ${pass}/${tests} passed, ${fail} failed (${result.seconds.toFixed(0)} s)`,
  )
}
const minutes = (performance.now() - started) / 60_000
console.log(
  `  total: ${total.pass}/${total.tests} passed, ${total.fail} failed, ${total.cancelled} cancelled, ${total.skipped} skipped, in ${minutes.toFixed(1)} min`,
)
process.exit(results.every((result) => result.ok) ? 0 : 1)

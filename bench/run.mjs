// `npm run bench`: the addon against a plain-Node registrar, in the same run, on
// the same Rust mcpd stand-in (bench/mcpd), each registrar in a child process as
// in mcplocal. Prints one table and one JSON line. `--smoke` runs a few hundred
// tasks and fails (exit 1) only on errors, never on speed; `--rounds N` repeats
// the whole comparison, alternating which registrar goes first, and reports medians.
// `--addon PATH` may be given several times (say, main's build and this one's): each
// addon is measured in the same run, interleaved with the others round by round, so
// two builds are compared on the same machine under the same load; the table then
// also gives each addon against the first.
import { spawn } from 'node:child_process'
import { existsSync, readdirSync } from 'node:fs'
import http from 'node:http'
import { dirname, join, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

const here = dirname(fileURLToPath(import.meta.url))
const root = resolve(here, '..')
const { values } = parseArgs({
  options: {
    smoke: { type: 'boolean', default: false },
    rounds: { type: 'string', default: '1' },
    addon: { type: 'string', multiple: true },
    mcpd: { type: 'string' },
    only: { type: 'string' },
  },
})
const smoke = values.smoke
const rounds = Math.max(1, Number(values.rounds) || 1)

const scale = smoke
  ? { warmup: 50, latency: 200, throughput: 300, oneStream: 2000, oneStreamRuns: 2, streams: 16, streamTokens: 100, idleMs: 300, idleSettleMs: 300, floor: 100 }
  : { warmup: 500, latency: 3000, throughput: 20_000, oneStream: 20_000, oneStreamRuns: 5, streams: 64, streamTokens: 2000, idleMs: 3000, idleSettleMs: 3000, floor: 2000 }

function findAddons() {
  if (values.addon?.length) return values.addon.map((path) => resolve(path))
  const built = join(here, '.build')
  if (existsSync(built)) {
    const file = readdirSync(built).find((name) => name.endsWith('.node'))
    if (file) return [join(built, file)]
  }
  return [join(root, 'index.js')]
}

function findMcpd() {
  if (values.mcpd) return resolve(values.mcpd)
  for (const profile of ['release', 'debug']) {
    const path = join(here, 'mcpd', 'target', profile, 'bench-mcpd')
    if (existsSync(path)) return path
  }
  throw new Error('bench/mcpd is not built: cargo build --release --manifest-path bench/mcpd/Cargo.toml')
}

// A registrar that stops answering must fail the run, not hang CI.
setTimeout(() => {
  console.error('bench error: the run did not finish in time')
  process.exit(1)
}, smoke ? 180_000 : 30 * 60_000).unref()

const addonPaths = findAddons()
const mcpdPath = findMcpd()
const shortPath = (path) => path.replace(`${root}/`, '')
/** What is measured: the plain-Node registrar, then each addon under its own name. */
const registrars = [
  { name: 'plain', kind: 'plain' },
  ...addonPaths.map((path, i) => ({ name: addonPaths.length === 1 ? 'addon' : `addon${i + 1}`, kind: 'addon', path })),
]

/** The mcpd stand-in: one command a line in, one JSON line out. */
async function startMcpd() {
  const child = spawn(mcpdPath, [], { stdio: ['pipe', 'pipe', 'inherit'] })
  const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]()
  const next = async () => {
    const { value, done } = await lines.next()
    if (done) throw new Error('the mcpd stand-in exited')
    return JSON.parse(value)
  }
  const { port } = await next()
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    async command(line) {
      child.stdin.write(`${line}\n`)
      const answer = await next()
      if (answer.error) throw new Error(`mcpd: ${answer.error}`)
      return answer
    },
    stop() {
      child.stdin.end('quit\n')
      child.kill()
    },
  }
}

/** A registrar in its child process, with `snap()` for its CPU and RSS. */
async function startChild({ kind, path }, url) {
  const args = [join(here, 'child.mjs'), '--kind', kind, '--url', url, ...(path ? ['--addon', path] : [])]
  const child = spawn(process.execPath, args, {
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  })
  const waiting = []
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })))
  child.on('message', (message) => waiting.shift()?.(message))
  const receive = () =>
    Promise.race([
      new Promise((resolve) => waiting.push(resolve)),
      exited.then(({ code, signal }) => {
        throw new Error(`the ${kind} registrar exited (${signal ?? code})`)
      }),
    ])
  const ready = await receive()
  if (ready.type !== 'ready') throw new Error(`unexpected ${JSON.stringify(ready)}`)
  return {
    snap() {
      child.send({ type: 'snap' })
      return receive()
    },
    async stop() {
      child.send({ type: 'stop' })
      await receive()
      await exited
    },
    kill() {
      child.kill()
    },
  }
}

/** The loopback floor: sequential node:http POSTs on one kept-alive connection. */
async function loopbackFloor(port, count) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 })
  const post = () =>
    new Promise((resolve, reject) => {
      const request = http.request(
        { host: '127.0.0.1', port, path: '/floor', method: 'POST', agent, headers: { 'content-type': 'application/json' } },
        (response) => {
          response.resume()
          response.on('end', resolve)
        },
      )
      request.on('error', reject)
      request.end('{}')
    })
  const times = []
  for (let i = 0; i < count; i++) {
    const started = process.hrtime.bigint()
    await post()
    times.push(Number(process.hrtime.bigint() - started) / 1000)
  }
  agent.destroy()
  times.sort((a, b) => a - b)
  return times[Math.floor(times.length / 2)]
}

const median = (numbers) => {
  const sorted = numbers.filter(Number.isFinite).sort((a, b) => a - b)
  if (!sorted.length) return NaN
  const middle = sorted.length >> 1
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2
}

const errors = []
function check(kind, what, answer) {
  if (answer.errors || answer.finished !== answer.tasks) {
    errors.push(`${kind} ${what}: ${answer.finished}/${answer.tasks} answered, ${answer.errors} errors${answer.firstError ? ` (first: ${answer.firstError})` : ''}`)
  }
  return answer
}

/** Every figure for one registrar, measured on a fresh mcpd. */
async function measure(registrar) {
  const { name: kind } = registrar
  const mcpd = await startMcpd()
  let child
  try {
    child = await startChild(registrar, mcpd.url)
    const figures = {}
    const run = async (what, tasks, inFlight, tokens) =>
      check(kind, what, await mcpd.command(`run ${tasks} ${inFlight} ${tokens}`))

    // Idle: a registrar that is connected and has nothing to do, once start-up
    // (loading, JIT, the first GCs) has settled.
    await new Promise((resolve) => setTimeout(resolve, scale.idleSettleMs))
    let before = await child.snap()
    await new Promise((resolve) => setTimeout(resolve, scale.idleMs))
    let after = await child.snap()
    const idleSeconds = (after.at - before.at) / 1000
    figures.idleCpuUsPerS = (after.processUs - before.processUs) / idleSeconds
    figures.idleMainUsPerS = (after.mainUs - before.mainUs) / idleSeconds

    await run('warm-up', scale.warmup, 1, 0)
    await run('warm-up streams', 4, 4, 200)

    before = await child.snap()
    const latency = await run('latency', scale.latency, 1, 0)
    after = await child.snap()
    figures.p50Us = latency.p50Ns / 1000
    figures.p99Us = latency.p99Ns / 1000
    figures.mainUsPerTask = (after.mainUs - before.mainUs) / scale.latency
    figures.processUsPerTask = (after.processUs - before.processUs) / scale.latency

    const throughput = await run('throughput', scale.throughput, 64, 0)
    figures.tasksPerS = scale.throughput / (throughput.elapsedNs / 1e9)

    // One stream at a time, a few times: the median stream's rate, the CPU of all.
    before = await child.snap()
    const rates = []
    let posts = 0
    for (let i = 0; i < scale.oneStreamRuns; i++) {
      const one = await run('one stream', 1, 1, scale.oneStream)
      rates.push(scale.oneStream / (one.elapsedNs / 1e9))
      posts += one.posts
    }
    after = await child.snap()
    const tokensStreamed = scale.oneStream * scale.oneStreamRuns
    figures.oneStreamTokensPerS = median(rates)
    figures.mainUsPerToken = (after.mainUs - before.mainUs) / tokensStreamed
    figures.processUsPerToken = (after.processUs - before.processUs) / tokensStreamed
    figures.oneStreamPosts = posts / scale.oneStreamRuns

    const tokens = scale.streams * scale.streamTokens
    const many = await run('concurrent streams', scale.streams, scale.streams, scale.streamTokens)
    figures.streamsTokensPerS = tokens / (many.elapsedNs / 1e9)

    figures.rssMiB = (await child.snap()).rss / 2 ** 20
    const stats = await mcpd.command('stats')
    figures.connections = stats.connections
    figures.requests = stats.requests
    if (kind === 'plain') figures.floorUs = await loopbackFloor(mcpd.port, scale.floor)
    await child.stop()
    return figures
  } catch (error) {
    child?.kill()
    throw error
  } finally {
    mcpd.stop()
  }
}


// `--only plain` or `--only addon` (every addon given).
const measured = values.only ? registrars.filter((registrar) => registrar.kind === values.only) : registrars
const samples = Object.fromEntries(measured.map(({ name }) => [name, []]))
try {
  for (let round = 0; round < rounds; round++) {
    const order = round % 2 ? [...measured].reverse() : measured
    for (const registrar of order) samples[registrar.name].push(await measure(registrar))
  }
} catch (error) {
  errors.push(String(error?.stack ?? error))
}

const result = {}
for (const { name } of measured) {
  const runs = samples[name]
  if (!runs.length) continue
  result[name] = Object.fromEntries(Object.keys(runs[0]).map((key) => [key, median(runs.map((run) => run[key]))]))
}

// figure, key, unit, goal as a ratio addon/plain, and whether lower is better.
const rows = [
  ['latency p50, non-streaming task', 'p50Us', 'µs', '≤ 0.5', true],
  ['latency p99', 'p99Us', 'µs', '', true],
  ['throughput, 64 in flight', 'tasksPerS', 'tasks/s', '≥ 2', false],
  ['one stream', 'oneStreamTokensPerS', 'tokens/s', '≥ 2', false],
  [`${scale.streams} concurrent streams`, 'streamsTokensPerS', 'tokens/s', '', false],
  ['main-thread CPU per sequential task', 'mainUsPerTask', 'µs', '≤ 0.3', true],
  ['process CPU per sequential task', 'processUsPerTask', 'µs', '', true],
  ['main-thread CPU per streamed token', 'mainUsPerToken', 'µs', '≤ 0.5', true],
  ['process CPU per streamed token', 'processUsPerToken', 'µs', '', true],
  ['idle CPU (process)', 'idleCpuUsPerS', 'µs/s', '≤ 1', true],
  ['RSS after the run', 'rssMiB', 'MiB', '≤ +10 MiB', true],
  ['chunk POSTs for the one stream', 'oneStreamPosts', '', '', true],
  ['TCP connections to mcpd', 'connections', '', '', true],
]
const format = (value) =>
  !Number.isFinite(value) ? '–' : value >= 1000 ? Math.round(value).toLocaleString('en-US') : value >= 10 ? value.toFixed(1) : value.toFixed(2)
const ratioOf = (figures, base, key) => {
  const ratio = figures?.[key] / base?.[key]
  return Number.isFinite(ratio) ? Number(ratio.toFixed(3)) : null
}
const plain = result.plain ?? {}
const addons = registrars.filter((registrar) => registrar.kind === 'addon')
const first = addons[0]
const compared = addons.slice(1)
const table = [
  [
    'figure',
    'plain Node',
    ...addons.map(({ name }) => name),
    ...addons.map(({ name }) => `${name}/plain`),
    ...compared.map(({ name }) => `${name}/${first.name}`),
    'goal (/plain)',
  ],
]
for (const [label, key, unit, goal] of rows) {
  const shown = (figures, base) => {
    const ratio = ratioOf(figures, base, key)
    if (ratio === null) return '–'
    if (key !== 'rssMiB') return ratio.toFixed(2)
    const more = figures[key] - base[key]
    return `${ratio.toFixed(2)} (${(more >= 0 ? '+' : '') + more.toFixed(1)} MiB)`
  }
  table.push([
    `${label}${unit ? ` (${unit})` : ''}`,
    format(plain[key]),
    ...addons.map(({ name }) => format(result[name]?.[key])),
    ...addons.map(({ name }) => shown(result[name], plain)),
    ...compared.map(({ name }) => shown(result[name], result[first.name])),
    goal,
  ])
}
const widths = table[0].map((_, column) => Math.max(...table.map((row) => row[column].length)))
const line = (row) => `| ${row.map((cell, column) => cell.padEnd(widths[column])).join(' | ')} |`
const named = addons.map(({ name, path }) => `${name} ${shortPath(path)}`).join('; ')
console.log(`\nmcpctl-registrar bench${smoke ? ' (smoke)' : ''}: ${rounds} round(s), medians; ${named}; loopback floor (one POST round trip, node:http) ${format(plain.floorUs)} µs`)
console.log(line(table[0]))
console.log(line(widths.map((width) => '-'.repeat(width))))
for (const row of table.slice(1)) console.log(line(row))
const ratios = (figures, base) => Object.fromEntries(rows.map(([, key]) => [key, ratioOf(figures, base, key)]))
console.log(
  JSON.stringify({
    bench: 'mcpctl-registrar',
    smoke,
    rounds,
    scale,
    plain: result.plain,
    // The first addon keeps the keys of a one-addon run.
    addon: result[first.name],
    addonPath: shortPath(first.path),
    ratios: ratios(result[first.name], plain),
    addons: addons.map(({ name, path }) => ({
      name,
      path: shortPath(path),
      figures: result[name],
      ratios: ratios(result[name], plain),
      ...(name === first.name ? {} : { againstFirst: ratios(result[name], result[first.name]) }),
    })),
    errors,
  }),
)
if (errors.length) {
  for (const error of errors) console.error(`bench error: ${error}`)
}
// Whatever is left (a child that hangs), the verdict is given.
process.exit(errors.length ? 1 : 0)

// `npm run bench`: the addon against the best plain-Node registrar we can write
// (bench/plain-registrar.mjs), in the same run, on the same Rust mcpd stand-in
// (bench/mcpd), each registrar in a child process as in mcplocal. Prints one table
// (issue 18's goals as ratios addon/plain, then the other figures) and one JSON line.
//
// Rounds: 3 by default (`--rounds N`), interleaved: each round measures every
// registrar once, the order alternating, so load from elsewhere on the machine lands
// on both sides. A figure is the median of its rounds, shown with its spread (the
// half-range, as ± % of the median); a ratio is the median of the per-round ratios
// (each round's figures against the same round's peer), with its min–max. The load
// average at each measurement is printed beside the table.
//
// `--smoke` runs a few hundred tasks, one round, and fails (exit 1) only on errors,
// never on speed: a task unanswered, a wrong `seq`, a child that dies, or a stream
// whose content tokens bench/mcpd counted differ from what the provider yielded.
// `--addon PATH` may be given several times (say, main's build and this one's): each
// addon is measured in the same run, interleaved with the others round by round; the
// table then also gives each addon against the first. `--seed` adds the seed-style
// plain registrar (fetch, bench/seed-registrar.mjs) as a third column. `--only KIND`
// measures one kind (plain, seed or addon). `--paced RATE` sets the paced scenario's
// task rate (tasks/s; default 2,000): tasks sent at that rate, below what either
// side saturates at, so mcpd is not the cap and each side's CPU per task is its own.
//
// `--audit` measures every addon twice in the same interleaved rounds: as given (the
// audit log off) and as `<name>+audit`, with `audit: { path, content: false }` in a
// fresh temp dir per child, removed after. `--audit-content` adds `<name>+audit-content`
// (`content: true`). Each such column's ratio is against its own addon with the audit
// log off (`addon+audit/addon`): the audit log's cost. The child counts the log's lines
// once stopped; lines written + lines dropped must equal the tasks sent, or the run fails.
// Rows of their own: the log's lines, drops, bytes per line, and its writer thread's
// (`mcpctl-audit`) CPU and wake-ups per task.
//
// `--scenario sequential|throughput|stream` runs only that scenario (after the
// warm-ups; no idle or paced runs; `stream` is the one-stream runs): for a profiler
// wrapped around the bench, e.g. `perf record --call-graph dwarf -F 499 -- node
// bench/run.mjs --only addon --scenario throughput`, whose samples then hold little
// else; the table shows `–` for the figures not measured. `--node-arg FLAG` (any number
// of times) is passed to node in every registrar child, e.g. `--node-arg=--cpu-prof
// --node-arg=--cpu-prof-dir=/tmp/prof` for a profile of each child's main thread.
import { spawn } from 'node:child_process'
import { existsSync, readdirSync } from 'node:fs'
import http from 'node:http'
import { loadavg } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

const here = dirname(fileURLToPath(import.meta.url))
const root = resolve(here, '..')
const { values } = parseArgs({
  options: {
    smoke: { type: 'boolean', default: false },
    rounds: { type: 'string' },
    addon: { type: 'string', multiple: true },
    mcpd: { type: 'string' },
    only: { type: 'string' },
    seed: { type: 'boolean', default: false },
    paced: { type: 'string' },
    audit: { type: 'boolean', default: false },
    'audit-content': { type: 'boolean', default: false },
    scenario: { type: 'string' },
    'node-arg': { type: 'string', multiple: true },
  },
})
const scenarios = ['sequential', 'throughput', 'stream']
if (values.scenario && !scenarios.includes(values.scenario)) {
  console.error(`bench: --scenario is one of ${scenarios.join(', ')}`)
  process.exit(2)
}
/** Whether a scenario runs: every one, unless `--scenario` names one. */
const runs = (scenario) => !values.scenario || values.scenario === scenario
const smoke = values.smoke
const rounds = Math.max(1, Number(values.rounds ?? (smoke ? 1 : 3)) || 1)

const scale = smoke
  ? { warmup: 50, latency: 200, throughput: 300, paced: 100, pacedRate: 500, oneStream: 2000, oneStreamRuns: 2, streams: 16, streamTokens: 100, idleMs: 300, idleSettleMs: 300, floor: 100, floorTokens: 2000 }
  : { warmup: 500, latency: 3000, throughput: 20_000, paced: 4000, pacedRate: 2000, oneStream: 20_000, oneStreamRuns: 20, streams: 64, streamTokens: 2000, idleMs: 3000, idleSettleMs: 3000, floor: 2000, floorTokens: 100_000 }
if (values.paced) scale.pacedRate = Math.max(1, Number(values.paced) || scale.pacedRate)

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
}, smoke ? 180_000 : 60 * 60_000).unref()

const addonPaths = findAddons()
const mcpdPath = findMcpd()
const shortPath = (path) => path.replace(`${root}/`, '')
/** What is measured: the plain-Node peer, the seed-style one when asked, then each addon under its own name. */
const registrars = [
  { name: 'plain', kind: 'plain' },
  ...(values.seed ? [{ name: 'seed', kind: 'seed' }] : []),
  ...addonPaths.map((path, i) => ({ name: addonPaths.length === 1 ? 'addon' : `addon${i + 1}`, kind: 'addon', path })),
]
// --audit / --audit-content: each addon's twin(s) with the audit log on, right after it,
// compared with it (`base`). The default run is unchanged.
const auditModes = [
  ...(values.audit ? [['audit', 'meta']] : []),
  ...(values['audit-content'] ? [['audit-content', 'content']] : []),
]
for (const addon of registrars.filter((registrar) => registrar.kind === 'addon')) {
  const twins = auditModes.map(([suffix, audit]) => ({
    ...addon,
    name: `${addon.name}+${suffix}`,
    audit,
    base: addon.name,
  }))
  registrars.splice(registrars.indexOf(addon) + 1, 0, ...twins)
}

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
async function startChild({ kind, path, audit }, url) {
  const args = [join(here, 'child.mjs'), '--kind', kind, '--url', url, ...(path ? ['--addon', path] : [])]
  if (audit) args.push('--audit', audit)
  const child = spawn(process.execPath, [...(values['node-arg'] ?? []), ...args], {
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
    floor(tasks, tokens) {
      child.send({ type: 'floor', tasks, tokens })
      return receive()
    },
    /** Stops the registrar; its answer holds the audit log's figures when it was on. */
    async stop() {
      child.send({ type: 'stop' })
      const stopped = await receive()
      await exited
      return stopped
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
function check(kind, what, answer, tokensPerTask) {
  if (answer.errors || answer.finished !== answer.tasks) {
    errors.push(`${kind} ${what}: ${answer.finished}/${answer.tasks} answered, ${answer.errors} errors${answer.firstError ? ` (first: ${answer.firstError})` : ''}`)
  }
  // mcpd checks each stream's count itself; this is the run's total, a second look.
  if (answer.tokens !== answer.tasks * tokensPerTask) {
    errors.push(`${kind} ${what}: mcpd counted ${answer.tokens} content tokens, the provider yielded ${answer.tasks * tokensPerTask}`)
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
    const figures = { load: loadavg()[0] }
    let sent = 0
    const run = async (what, tasks, inFlight, tokens, rate) => {
      sent += tasks
      const answer = await mcpd.command(`run ${tasks} ${inFlight} ${tokens}${rate ? ` ${rate}` : ''}`)
      return check(kind, what, answer, tokens)
    }
    /** Runs a scenario between two snaps: the run's answer and the child's CPU over it. */
    const measured = async (what, tasks, inFlight, tokens, rate) => {
      const before = await child.snap()
      const answer = await run(what, tasks, inFlight, tokens, rate)
      const after = await child.snap()
      return {
        answer,
        mainUs: after.mainUs - before.mainUs,
        processUs: after.processUs - before.processUs,
        wakeups: after.wakeups - before.wakeups,
        mainWakeups: after.mainWakeups - before.mainWakeups,
        // --audit: the log's writer thread (NaN without it).
        writerUs: after.writerUs - before.writerUs,
        writerSwitches: after.writerSwitches - before.writerSwitches,
      }
    }

    // Idle: a registrar that is connected and has nothing to do, once start-up
    // (loading, JIT, the first GCs) has settled.
    // (`--scenario` skips it, and everything but its own scenario.)
    if (!values.scenario) {
      await new Promise((resolve) => setTimeout(resolve, scale.idleSettleMs))
      const idleBefore = await child.snap()
      await new Promise((resolve) => setTimeout(resolve, scale.idleMs))
      const idleAfter = await child.snap()
      const idleSeconds = (idleAfter.at - idleBefore.at) / 1000
      figures.idleCpuUsPerS = (idleAfter.processUs - idleBefore.processUs) / idleSeconds
    }

    await run('warm-up', scale.warmup, 1, 0)
    await run('warm-up 64', scale.warmup * 4, 64, 0)
    if (!values.scenario || values.scenario === 'stream') {
      await run('warm-up streams', 4, 4, 200)
      // Two whole streams, not measured: after 800 tokens the stream path's JIT
      // (the provider's generator, each registrar's loop) is still cold, and the
      // first two streams of 20,000 tokens cost either registrar 1.3–4× the CPU
      // per token of the later ones (docs/benchmark.md, "Steady streams").
      for (let i = 0; i < 2; i++) await run('warm-up one stream', 1, 1, scale.oneStream)
    }

    // Both kept for the audit rows at the end (set whenever no --scenario returns early).
    let latency
    let throughput
    if (runs('sequential')) {
      latency = await measured('latency', scale.latency, 1, 0)
      figures.p50Us = latency.answer.p50Ns / 1000
      figures.p99Us = latency.answer.p99Ns / 1000
      figures.mainUsPerTask = latency.mainUs / scale.latency
      figures.processUsPerTask = latency.processUs / scale.latency
      figures.mcpdUsPerTask = latency.answer.mcpdCpuNs / 1000 / scale.latency
      figures.wakeupsPerTask = latency.wakeups / scale.latency
      figures.mainWakeupsPerTask = latency.mainWakeups / scale.latency
    }

    if (runs('throughput')) {
      throughput = await measured('throughput', scale.throughput, 64, 0)
      figures.tasksPerS = scale.throughput / (throughput.answer.elapsedNs / 1e9)
      figures.mainUsPerTask64 = throughput.mainUs / scale.throughput
      figures.processUsPerTask64 = throughput.processUs / scale.throughput
      // mcpd's one thread busy this share of the run: near 1, mcpd was the cap.
      figures.mcpdBusy64 = throughput.answer.mcpdCpuNs / throughput.answer.elapsedNs
      figures.processBusy64 = (throughput.processUs * 1000) / throughput.answer.elapsedNs
      figures.wakeupsPerTask64 = throughput.wakeups / scale.throughput
    }
    if (values.scenario && values.scenario !== 'stream') {
      await child.stop()
      return figures
    }

    // Paced: up to 64 in flight, sent at a rate neither side saturates at.
    let paced
    if (!values.scenario) {
      paced = await measured('paced', scale.paced, 64, 0, scale.pacedRate)
      figures.processUsPerTaskPaced = paced.processUs / scale.paced
      figures.mainUsPerTaskPaced = paced.mainUs / scale.paced
      figures.mcpdUsPerTaskPaced = paced.answer.mcpdCpuNs / 1000 / scale.paced
      figures.wakeupsPerTaskPaced = paced.wakeups / scale.paced
    }

    // One stream at a time, a few times: the median stream's rate, the CPU of all.
    const rates = []
    let posts = 0
    const streamsBefore = await child.snap()
    let mcpdNs = 0
    let elapsedNs = 0
    for (let i = 0; i < scale.oneStreamRuns; i++) {
      const one = await run('one stream', 1, 1, scale.oneStream)
      rates.push(scale.oneStream / (one.elapsedNs / 1e9))
      posts += one.posts
      mcpdNs += one.mcpdCpuNs
      elapsedNs += one.elapsedNs
    }
    const streamsAfter = await child.snap()
    const tokensStreamed = scale.oneStream * scale.oneStreamRuns
    figures.oneStreamTokensPerS = median(rates)
    figures.mainUsPerToken = (streamsAfter.mainUs - streamsBefore.mainUs) / tokensStreamed
    figures.processUsPerToken = (streamsAfter.processUs - streamsBefore.processUs) / tokensStreamed
    figures.mcpdUsPerToken = mcpdNs / 1000 / tokensStreamed
    figures.mcpdBusyOneStream = mcpdNs / elapsedNs
    figures.wakeupsPer1kTokens = ((streamsAfter.wakeups - streamsBefore.wakeups) / tokensStreamed) * 1000
    figures.mainWakeupsPer1kTokens = ((streamsAfter.mainWakeups - streamsBefore.mainWakeups) / tokensStreamed) * 1000
    figures.oneStreamPosts = posts / scale.oneStreamRuns
    if (values.scenario) {
      await child.stop()
      return figures
    }

    const tokens = scale.streams * scale.streamTokens
    const many = await measured('concurrent streams', scale.streams, scale.streams, scale.streamTokens)
    figures.streamsTokensPerS = tokens / (many.answer.elapsedNs / 1e9)
    figures.processUsPerToken64 = many.processUs / tokens
    figures.mcpdBusyStreams = many.answer.mcpdCpuNs / many.answer.elapsedNs

    figures.rssMiB = (await child.snap()).rss / 2 ** 20
    const stats = await mcpd.command('stats')
    figures.connections = stats.connections
    if (kind === 'plain') {
      figures.floorUs = await loopbackFloor(mcpd.port, scale.floor)
      const shared = await child.floor(scale.floor, scale.floorTokens)
      figures.sharedMainUsPerTask = shared.mainUsPerTask
      figures.sharedMainUsPerToken = shared.mainUsPerToken
    }
    const { audit } = await child.stop()
    if (audit) {
      // Every task that reached the registrar has its line, or was counted as dropped.
      figures.auditLines = audit.lines
      figures.auditDropped = audit.dropped
      figures.auditBytesPerLine = audit.bytes / audit.lines
      // Its writer thread's share of the process CPU, and its wake-ups, per task.
      figures.auditWriterUsPerTask = latency.writerUs / scale.latency
      figures.auditWriterUsPerTask64 = throughput.writerUs / scale.throughput
      figures.auditWriterUsPerTaskPaced = paced.writerUs / scale.paced
      figures.auditWakeupsPerTask = latency.writerSwitches / scale.latency
      figures.auditWakeupsPerTask64 = throughput.writerSwitches / scale.throughput
      figures.auditWakeupsPerTaskPaced = paced.writerSwitches / scale.paced
      if (audit.lines + audit.dropped !== sent) {
        errors.push(
          `${kind}: the audit log holds ${audit.lines} lines and counted ${audit.dropped} dropped, for ${sent} tasks`,
        )
      }
    }
    return figures
  } catch (error) {
    child?.kill()
    throw error
  } finally {
    mcpd.stop()
  }
}

// `--only plain`, `--only seed` or `--only addon` (every addon given).
const measured = values.only ? registrars.filter((registrar) => registrar.kind === values.only) : registrars
/** samples[name][round] = figures */
const samples = Object.fromEntries(measured.map(({ name }) => [name, []]))
try {
  for (let round = 0; round < rounds; round++) {
    const order = round % 2 ? [...measured].reverse() : measured
    for (const registrar of order) samples[registrar.name][round] = await measure(registrar)
  }
} catch (error) {
  errors.push(String(error?.stack ?? error))
}

// The latency a registrar adds above the loopback floor of the same round.
for (const { name } of measured) {
  samples[name].forEach((figures, round) => {
    const floor = samples.plain?.[round]?.floorUs
    if (figures && Number.isFinite(floor)) figures.p50AboveFloorUs = figures.p50Us - floor
  })
}

const keysOf = (name) => Object.keys(samples[name].find(Boolean) ?? {})
/** Median and half-range of a registrar's figure over the rounds. */
function summary(name, key) {
  const numbers = (samples[name] ?? []).map((figures) => figures?.[key]).filter(Number.isFinite)
  if (!numbers.length) return null
  const value = median(numbers)
  // No spread when every round agrees (a count of 0 would otherwise be ±NaN%).
  const range = Math.max(...numbers) - Math.min(...numbers)
  const spread = range ? range / 2 / Math.abs(value) : 0
  return { value, spread, values: numbers }
}
/** The per-round ratios `name`/`base` of a figure: their median, min and max. */
function ratio(name, base, key) {
  const ratios = (samples[name] ?? [])
    .map((figures, round) => figures?.[key] / samples[base]?.[round]?.[key])
    .filter(Number.isFinite)
  if (!ratios.length) return null
  return { value: median(ratios), min: Math.min(...ratios), max: Math.max(...ratios) }
}

// Issue 18's goals, then the other figures: label, key, unit, goal (ratio addon/plain), lower is better.
const goals = [
  ['one stream', 'oneStreamTokensPerS', 'tokens/s', 2.5, false],
  ['process CPU per task, 64 in flight', 'processUsPerTask64', 'µs', 0.4, true],
  ['process CPU per task, sequential', 'processUsPerTask', 'µs', 0.4, true],
  ['process CPU per streamed token', 'processUsPerToken', 'µs', 0.35, true],
  ['main-thread CPU per task, sequential', 'mainUsPerTask', 'µs', 0.15, true],
  ['main-thread CPU per streamed token', 'mainUsPerToken', 'µs', 0.3, true],
  ['latency p50 above the loopback floor', 'p50AboveFloorUs', 'µs', 0.5, true],
  ['RSS after the run', 'rssMiB', 'MiB', 1, true],
]
const others = [
  ['main-thread CPU per task, 64 in flight', 'mainUsPerTask64', 'µs'],
  [`process CPU per task, paced (${scale.pacedRate}/s)`, 'processUsPerTaskPaced', 'µs'],
  [`main-thread CPU per task, paced`, 'mainUsPerTaskPaced', 'µs'],
  [`process CPU per token, ${scale.streams} streams`, 'processUsPerToken64', 'µs'],
  ['latency p50, non-streaming task', 'p50Us', 'µs'],
  ['latency p99', 'p99Us', 'µs'],
  ['throughput, 64 in flight', 'tasksPerS', 'tasks/s'],
  [`${scale.streams} concurrent streams`, 'streamsTokensPerS', 'tokens/s'],
  ['idle CPU (process)', 'idleCpuUsPerS', 'µs/s'],
  ['chunk POSTs for the one stream', 'oneStreamPosts', ''],
  ['TCP connections to mcpd', 'connections', ''],
  ['registrar busy, 64 in flight (CPUs)', 'processBusy64', ''],
  ['mcpd busy, 64 in flight (of its 1 thread)', 'mcpdBusy64', ''],
  ['mcpd busy, one stream (of its 1 thread)', 'mcpdBusyOneStream', ''],
  ['mcpd busy, concurrent streams', 'mcpdBusyStreams', ''],
  ['mcpd CPU per task, sequential', 'mcpdUsPerTask', 'µs'],
  ['mcpd CPU per task, paced', 'mcpdUsPerTaskPaced', 'µs'],
  ['mcpd CPU per streamed token', 'mcpdUsPerToken', 'µs'],
  ['wake-ups per task, sequential (all threads)', 'wakeupsPerTask', ''],
  ['wake-ups per task, sequential (main thread)', 'mainWakeupsPerTask', ''],
  ['wake-ups per task, paced (all threads)', 'wakeupsPerTaskPaced', ''],
  ['wake-ups per task, 64 in flight (all threads)', 'wakeupsPerTask64', ''],
  ['wake-ups per 1,000 streamed tokens (all threads)', 'wakeupsPer1kTokens', ''],
  ['wake-ups per 1,000 streamed tokens (main thread)', 'mainWakeupsPer1kTokens', ''],
  ['load average (1 min) at the measurement', 'load', ''],
  ...(auditModes.length
    ? [
        ['audit log lines written', 'auditLines', ''],
        ['audit log lines dropped (queue full)', 'auditDropped', ''],
        ['audit log bytes per line', 'auditBytesPerLine', 'B'],
        ['audit writer thread CPU per task, sequential', 'auditWriterUsPerTask', 'µs'],
        ['audit writer thread CPU per task, 64 in flight', 'auditWriterUsPerTask64', 'µs'],
        ['audit writer thread CPU per task, paced', 'auditWriterUsPerTaskPaced', 'µs'],
        ['audit writer wake-ups per task, sequential', 'auditWakeupsPerTask', ''],
        ['audit writer wake-ups per task, 64 in flight', 'auditWakeupsPerTask64', ''],
        ['audit writer wake-ups per task, paced', 'auditWakeupsPerTaskPaced', ''],
      ]
    : []),
]
const format = (value) =>
  !Number.isFinite(value)
    ? '–'
    : Math.abs(value) >= 1000
      ? Math.round(value).toLocaleString('en-US')
      : Math.abs(value) >= 10
        ? value.toFixed(1)
        : value.toFixed(2)
const shownFigure = (name, key) => {
  const figure = summary(name, key)
  if (!figure) return '–'
  if (rounds === 1) return format(figure.value)
  // A median of 0 (say, no audit lines dropped in most rounds) has no relative spread: show the range.
  if (!Number.isFinite(figure.spread)) return `${format(figure.value)} [${figure.values.map(format).join(', ')}]`
  return `${format(figure.value)} ±${Math.round(figure.spread * 100)}%`
}
const shownRatio = (name, base, key) => {
  const r = ratio(name, base, key)
  if (!r) return '–'
  return rounds > 1 ? `${r.value.toFixed(2)} [${r.min.toFixed(2)}–${r.max.toFixed(2)}]` : r.value.toFixed(2)
}
const met = (name, key, goal, lower) => {
  const r = ratio(name, 'plain', key)
  if (!r) return ''
  return (lower ? r.value <= goal : r.value >= goal) ? 'yes' : 'no'
}

const peers = measured.filter((registrar) => registrar.kind !== 'addon')
const addons = measured.filter((registrar) => registrar.kind === 'addon')
const first = addons[0]
const compared = addons.slice(1)
const baseOf = (registrar) => registrar.base ?? first.name
// `addon/plain` columns only when plain Node was measured (not under `--only addon`).
const againstPlain = measured.some(({ name }) => name === 'plain') ? addons : []
const header = [
  'figure',
  ...peers.map(({ name }) => (name === 'plain' ? 'plain Node' : `${name} (fetch)`)),
  ...addons.map(({ name }) => name),
  ...againstPlain.map(({ name }) => `${name}/plain`),
  ...compared.map((registrar) => `${registrar.name}/${baseOf(registrar)}`),
  'goal',
  // One answer per addon measured against plain Node, in their order.
  againstPlain.length > 1 ? `met (${againstPlain.map(({ name }) => name).join('/')})` : 'met',
]
const table = [header]
const rowOf = (label, key, unit, goal, lower) => [
  `${label}${unit ? ` (${unit})` : ''}`,
  ...peers.map(({ name }) => shownFigure(name, key)),
  ...addons.map(({ name }) => shownFigure(name, key)),
  ...againstPlain.map(({ name }) => shownRatio(name, 'plain', key)),
  ...compared.map((registrar) => shownRatio(registrar.name, baseOf(registrar), key)),
  goal === undefined ? '' : `${lower ? '≤' : '≥'} ${goal}`,
  goal === undefined ? '' : againstPlain.map(({ name }) => met(name, key, goal, lower)).join('/'),
]
for (const [label, key, unit, goal, lower] of goals) table.push(rowOf(label, key, unit, goal, lower))
const separator = table.length
for (const [label, key, unit] of others) table.push(rowOf(label, key, unit))
const widths = header.map((_, column) => Math.max(...table.map((row) => row[column].length)))
const line = (row) => `| ${row.map((cell, column) => cell.padEnd(widths[column])).join(' | ')} |`
const named = addons.map(({ name, path }) => `${name} ${shortPath(path)}`).join('; ')
const floorUs = summary('plain', 'floorUs')
const sharedTask = summary('plain', 'sharedMainUsPerTask')
const sharedToken = summary('plain', 'sharedMainUsPerToken')
console.log(
  `\nmcpctl-registrar bench${smoke ? ' (smoke)' : ''}: ${rounds} interleaved round(s), medians ±half-range, ratios = median [min–max] of per-round ratios against plain Node; ${named}`,
)
console.log(`loopback floor (one node:http POST round trip): ${format(floorUs?.value)} µs`)
console.log(
  `shared floor (the provider alone, a no-op consumer on the main thread): ${format(sharedTask?.value)} µs per complete() call, ${format(sharedToken?.value)} µs per streamed token; both registrars pay it`,
)
console.log(line(table[0]))
console.log(line(widths.map((width) => '-'.repeat(width))))
for (const row of table.slice(1, separator)) console.log(line(row))
console.log(line(widths.map((width) => '-'.repeat(width))))
for (const row of table.slice(separator)) console.log(line(row))

const result = Object.fromEntries(
  measured.map(({ name }) => [name, Object.fromEntries(keysOf(name).map((key) => [key, summary(name, key)?.value ?? null]))]),
)
const ratiosOf = (name, base) =>
  Object.fromEntries([...goals, ...others].map(([, key]) => [key, ratio(name, base, key)?.value ?? null]))
console.log(
  JSON.stringify({
    bench: 'mcpctl-registrar',
    smoke,
    rounds,
    scale,
    plain: result.plain,
    seed: result.seed,
    // The first addon keeps the keys of a one-addon run.
    addon: first ? result[first.name] : undefined,
    addonPath: first ? shortPath(first.path) : undefined,
    ratios: first ? ratiosOf(first.name, 'plain') : undefined,
    addons: addons.map(({ name, path, audit, base }) => ({
      name,
      path: shortPath(path),
      figures: result[name],
      ratios: ratiosOf(name, 'plain'),
      ...(name === first.name ? {} : { againstFirst: ratiosOf(name, first.name) }),
      ...(base ? { audit, base, againstBase: ratiosOf(name, base) } : {}),
    })),
    samples,
    errors,
  }),
)
if (errors.length) {
  for (const error of errors) console.error(`bench error: ${error}`)
}
// Whatever is left (a child that hangs), the verdict is given.
process.exit(errors.length ? 1 : 0)

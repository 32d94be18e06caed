// One registrar under test, in its own process as in mcplocal: the addon
// (`--kind addon`), the plain-Node peer (`--kind plain`) or the seed-style one (`--kind seed`), with the same
// bench provider. Answers the parent's `snap` messages with its CPU and memory;
// nothing else crosses the IPC channel while a scenario runs.
// `--audit meta|content` (the addon only) turns the audit log on, in a temp dir of its
// own, with `content: false` or `true`; `stop` then reports its lines and drops.
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

import { PlainRegistrar } from './plain-registrar.mjs'
import { SeedRegistrar } from './seed-registrar.mjs'

const { values } = parseArgs({
  options: { kind: { type: 'string' }, url: { type: 'string' }, addon: { type: 'string' }, audit: { type: 'string' } },
})

/** Answers at once; the latency scenario times the registrar, not a model. */
const provider = {
  complete() {
    return Promise.resolve({ content: 'ok', finishReason: 'stop', usage: { promptTokens: 1, completionTokens: 1 } })
  },
  /** Yields `maxTokens` tokens as fast as the consumer lets it. */
  async *stream(options) {
    const tokens = options.maxTokens ?? 1
    for (let i = 0; i < tokens; i++) yield { content: 'tok ' }
    yield { finishReason: 'stop' }
  },
}

/** The main thread's CPU time in µs: its own schedstat line, ns precision (the
 *  tick-based utime+stime in stat is the fallback). process.cpuUsage() is the
 *  whole process, every thread of the addon's runtime included. */
const mainThread = `/proc/self/task/${process.pid}`
function mainThreadCpuUs() {
  try {
    const sched = readFileSync(`${mainThread}/sched`, 'utf8')
    const match = /se\.sum_exec_runtime\s*:\s*([\d.]+)/.exec(sched)
    if (match) return Number(match[1]) * 1000
  } catch {}
  try {
    const fields = readFileSync(`${mainThread}/stat`, 'utf8').split(') ')[1].split(' ')
    return (Number(fields[11]) + Number(fields[12])) * 10_000
  } catch {
    return NaN
  }
}

const configDir = mkdtempSync(join(tmpdir(), 'mcpctl-bench-'))

// --audit: the audit log on, in a fresh dir removed at `stop`; off (no option at all) otherwise.
const auditDir = values.audit ? mkdtempSync(join(tmpdir(), 'mcpctl-bench-audit-')) : undefined
function auditOption() {
  if (!auditDir) return {}
  if (values.audit !== 'meta' && values.audit !== 'content') throw new Error(`--audit ${values.audit}: meta or content`)
  return { audit: { path: join(auditDir, 'audit.jsonl'), content: values.audit === 'content' } }
}
/** The audit log once stopped (every queued line written): its lines over the rotated files, bytes and drops. */
function auditFigures(dropped) {
  let lines = 0
  let bytes = 0
  for (const name of readdirSync(auditDir)) {
    const text = readFileSync(join(auditDir, name), 'utf8')
    bytes += Buffer.byteLength(text)
    // Each line must be JSON: a bad one throws, and the child's death fails the run.
    for (const line of text.split('\n')) {
      if (!line) continue
      JSON.parse(line)
      lines++
    }
  }
  return { lines, bytes, dropped }
}
/** The audit log's writer thread (named `mcpctl-audit`): its CPU time (µs) and how
 *  often it blocked (voluntary switches: about one per wake-up for a line). */
function writerThread() {
  let writerUs = 0
  let writerSwitches = 0
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      if (readFileSync(`/proc/self/task/${tid}/comm`, 'utf8').trim() !== 'mcpctl-audit') continue
      const sched = readFileSync(`/proc/self/task/${tid}/sched`, 'utf8')
      writerUs += Number(/se\.sum_exec_runtime\s*:\s*([\d.]+)/.exec(sched)?.[1]) * 1000
      writerSwitches += Number(/nr_voluntary_switches\s*:\s*(\d+)/.exec(sched)?.[1])
    } catch {}
  }
  return { writerUs, writerSwitches }
}
/** How often the process's threads blocked (voluntary switches, summed over every
 *  thread: about one per wake-up), and the main thread's share. A thread that ended
 *  between two snaps drops out of the sum; the registrars' threads live as long as they. */
function wakeups() {
  let all = 0
  let main = 0
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      const sched = readFileSync(`/proc/self/task/${tid}/sched`, 'utf8')
      const switches = Number(/nr_voluntary_switches\s*:\s*(\d+)/.exec(sched)?.[1])
      all += switches
      if (tid === String(process.pid)) main = switches
    } catch {}
  }
  return { wakeups: all, mainWakeups: main }
}
const entry = { name: 'bench', type: 'bench', model: 'bench', publish: true, provider }
let registrar
if (values.kind === 'plain') {
  registrar = new PlainRegistrar({ mcpdUrl: values.url, token: 'bench-token', providers: [entry] })
} else if (values.kind === 'seed') {
  registrar = new SeedRegistrar({ mcpdUrl: values.url, token: 'bench-token', providers: [entry] })
} else {
  const { VirtualLlmRegistrar } = createRequire(import.meta.url)(values.addon)
  registrar = new VirtualLlmRegistrar({
    mcpdUrl: values.url,
    token: 'bench-token',
    providers: [entry],
    configDir,
    maxConcurrency: 64,
    maxQueue: 4096,
    ...auditOption(),
  })
}
await registrar.start()

/**
 * The shared floor: what the provider itself costs the main thread, consumed by a
 * no-op loop with no registrar (a `for await` over the same async generator; a
 * `complete()` call awaited). Both registrars pay it; the rest of their CPU is theirs.
 */
async function floor({ tasks, tokens }) {
  const signal = new AbortController().signal
  const request = { model: 'bench', messages: [{ role: 'user', content: 'hi' }] }
  let main = mainThreadCpuUs()
  let cpu = process.cpuUsage()
  for (let i = 0; i < tasks; i++) await provider.complete({ messages: request.messages, request, signal })
  const perTask = { mainUs: mainThreadCpuUs() - main, processUs: cpuUs(process.cpuUsage(cpu)) }
  main = mainThreadCpuUs()
  cpu = process.cpuUsage()
  let seen = 0
  for await (const chunk of provider.stream({ messages: request.messages, request, signal, maxTokens: tokens })) {
    if (chunk.content) seen++
  }
  if (seen !== tokens) throw new Error(`the floor saw ${seen} tokens, not ${tokens}`)
  const perToken = { mainUs: mainThreadCpuUs() - main, processUs: cpuUs(process.cpuUsage(cpu)) }
  return {
    mainUsPerTask: perTask.mainUs / tasks,
    processUsPerTask: perTask.processUs / tasks,
    mainUsPerToken: perToken.mainUs / tokens,
    processUsPerToken: perToken.processUs / tokens,
  }
}
const cpuUs = (usage) => usage.user + usage.system

process.on('message', async (message) => {
  if (message.type === 'floor') {
    process.send({ type: 'floor', ...(await floor(message)) })
  } else if (message.type === 'snap') {
    const cpu = process.cpuUsage()
    process.send({
      type: 'snap',
      mainUs: mainThreadCpuUs(),
      processUs: cpu.user + cpu.system,
      rss: process.memoryUsage.rss(),
      at: performance.now(),
      ...wakeups(),
      ...(auditDir ? writerThread() : {}),
    })
  } else if (message.type === 'stop') {
    // Read before stop(): the drops are counted when a line is queued, and every task has ended.
    const dropped = auditDir
      ? Number(/^mcpctl_registrar_audit_lines_dropped_total (\S+)$/m.exec(registrar.metrics())?.[1] ?? NaN)
      : undefined
    await registrar.stop()
    const audit = auditDir ? auditFigures(dropped) : undefined
    rmSync(configDir, { recursive: true, force: true })
    if (auditDir) rmSync(auditDir, { recursive: true, force: true })
    process.send({ type: 'stopped', audit })
    process.disconnect()
  }
})
process.send({ type: 'ready' })

// What a careful second reading found: hangs, leaks and lost warnings that bad
// input from mcpd, a provider or the options could cause. Each stays fixed here.

import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import test from 'node:test'
import {
  addon,
  captureLogger,
  chatBody,
  nodeCommand,
  recordingProvider,
  scaledMs,
  sleep,
  startMcpd,
  startRegistrar,
  TOKEN,
  tempConfigDir,
} from './helpers.mjs'

const { VirtualLlmRegistrar, maybeStartVirtualLlmRegistrar } = addon

test('a stream connect that mcpd never answers is given up after idleTimeoutMs and retried', async (t) => {
  const mcpd = await startMcpd(t)
  const { registrar } = await startRegistrar(t, mcpd, { local: recordingProvider() }, { idleTimeoutMs: 300 })
  mcpd.delay('stream', 10_000)
  mcpd.dropStreams()
  await mcpd.waitFor(() => mcpd.connections.length >= 3, { timeoutMs: 3000 })
  assert.match(registrar.status().lastError, /no answer from mcpd within 300 ms/)
  mcpd.delay('stream', 0)
  await mcpd.waitFor(() => registrar.status().state === 'connected', { timeoutMs: 3000 })
})

test('a streaming provider that yields garbage is answered, and its iterator closed and signal fired', async (t) => {
  const mcpd = await startMcpd(t)
  let signal
  let closed = false
  const provider = {
    complete: async () => ({ content: 'unused' }),
    async *stream(options) {
      signal = options.signal
      try {
        yield { content: 'fine' }
        yield { content: 5 }
        await new Promise(() => {})
      } finally {
        closed = true
      }
    },
  }
  await startRegistrar(t, mcpd, { local: provider })
  const outcome = await mcpd.outcome(mcpd.sendTask({ provider: 'local', body: chatBody({ stream: true }) }))
  assert.equal(outcome.kind, 'stream')
  assert.match(outcome.payloads.at(-2), /provider_error/)
  await mcpd.waitFor(() => closed && signal.aborted)
  assert.deepEqual(mcpd.violations, [])
})

test('a chunk POST answered 404 aborts the provider at once, not when it next yields', async (t) => {
  const mcpd = await startMcpd(t)
  let signal
  const provider = {
    complete: async () => ({ content: 'unused' }),
    async *stream(options) {
      signal = options.signal
      yield { content: 'first' }
      await new Promise((resolve) => options.signal.addEventListener('abort', resolve))
    },
  }
  const { registrar } = await startRegistrar(t, mcpd, { local: provider })
  mcpd.failNext('chunks', { status: 404, body: { error: { message: 'task forgotten' } } })
  mcpd.sendTask({ provider: 'local', body: chatBody({ stream: true }) })
  await mcpd.waitFor(() => signal?.aborted, { timeoutMs: 2000 })
  await mcpd.waitFor(() => registrar.status().inFlight === 0)
})

test('a cancel stops the retries of a result POST', async (t) => {
  const mcpd = await startMcpd(t)
  const { registrar } = await startRegistrar(t, mcpd, { local: recordingProvider() })
  mcpd.failNext('result', { status: 503, body: 'busy', times: 50 })
  const taskId = mcpd.sendTask({ provider: 'local', body: chatBody() })
  const attempts = () => mcpd.requests.filter((r) => r.path.endsWith(`${taskId}/result`)).length
  await mcpd.waitFor(() => attempts() >= 1)
  mcpd.cancel(taskId)
  // The task ends, counted cancelled, the moment the cancel reaches it.
  await mcpd.waitFor(() => registrar.status().cancelled === 1)
  const atCancel = attempts()
  // Counted cancelled means the task ended, and its retry loop with it: no POST can start
  // after this (the exact check, with the retries' own clock paused, is tests/core.rs's
  // nothing_arrives_after_stop_resolved_while_results_keep_failing). What cannot be exact
  // here is a POST already written to the socket when the cancel landed, which the fake
  // may read later: it is allowed, and a pause of several retry intervals (200-400 ms)
  // lets a retry loop that outlived the task show itself.
  await sleep(1000)
  assert.ok(attempts() <= atCancel + 1, `${attempts() - atCancel} result POSTs after the cancel`)
  assert.equal(registrar.status().completed + registrar.status().failed, 0)
})

test('absurd token counts do not crash the task', async (t) => {
  const mcpd = await startMcpd(t)
  const huge = { content: 'x', usage: { promptTokens: 1e19, completionTokens: 1e19 } }
  await startRegistrar(t, mcpd, { local: recordingProvider(() => huge) })
  const outcome = await mcpd.outcome(mcpd.sendTask({ provider: 'local', body: chatBody() }))
  assert.equal(outcome.status, 200)
  assert.equal(outcome.body.usage.total_tokens, 18446744073709552000)
})

test('a heartbeatIntervalMs that is not a number is ignored, not fatal', async (t) => {
  const mcpd = await startMcpd(t, { heartbeatIntervalMs: '30000' })
  const { registrar } = await startRegistrar(t, mcpd, { local: recordingProvider() })
  assert.equal(registrar.status().state, 'connected')
})

test('a token that cannot go in a header is refused up front', async (_t) => {
  const provider = recordingProvider()
  assert.throws(
    () =>
      new VirtualLlmRegistrar({
        mcpdUrl: 'http://127.0.0.1:9',
        token: `${TOKEN}\n`,
        configDir: '/nonexistent',
        providers: [{ name: 'a', type: 't', provider }],
      }),
    /token must be visible ASCII/,
  )
})

test('maybeStart: a refused token on the first register means unauthorized, retried at the maximum backoff', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await maybeStartVirtualLlmRegistrar({
    providers: [{ name: 'local', type: 'test', publish: true }],
    registry: new Map([['local', recordingProvider()]]),
    mcpdUrl: mcpd.url,
    token: 'not-the-token',
    configDir: await tempConfigDir(t),
    logger: captureLogger(),
    backoff: { initialMs: 50, maxMs: 1000 },
  })
  t.after(() => registrar.stop())
  assert.equal(registrar.status().state, 'unauthorized')
  // Cannot be exact: what must not happen is a backoff timer firing, on the addon's real
  // clock. 500 ms is ten initial backoffs (50 ms): a registrar that retried a 401 would
  // have registered again several times by then.
  await sleep(500)
  const registers = mcpd.requests.filter((r) => r.path.endsWith('/_provider-register'))
  assert.equal(registers.length, 1, 'not retried at the initial backoff')
})

test('maybeStart: a bad mcpdUrl in the credentials file is a logger.warn, not a silent null', async (t) => {
  const configDir = await tempConfigDir(t)
  await mkdir(configDir, { recursive: true })
  await writeFile(join(configDir, 'credentials'), JSON.stringify({ mcpdUrl: 'http://mcpd.example.com', token: TOKEN }))
  const logger = captureLogger()
  const registrar = await maybeStartVirtualLlmRegistrar({
    providers: [{ name: 'local', type: 'test', publish: true }],
    registry: new Map([['local', recordingProvider()]]),
    configDir,
    logger,
  })
  assert.equal(registrar, null)
  assert.ok(
    logger.lines.some((line) => line.level === 'warn' && /allowInsecureHttp/.test(JSON.stringify(line))),
    JSON.stringify(logger.lines),
  )
})

test('a started registrar keeps Node alive even when its JS object is garbage-collected', async (t) => {
  const mcpd = await startMcpd(t)
  const script = `
    const { VirtualLlmRegistrar } = require(${JSON.stringify(new URL('../index.js', import.meta.url).pathname)})
    ;(async () => {
      await new VirtualLlmRegistrar({ mcpdUrl: process.env.MCPD_URL, token: process.env.MCPD_TOKEN, configDir: process.env.CONFIG_DIR,
        providers: [{ name: 'gc', type: 'test', provider: { complete: async () => ({ content: '' }) } }] }).start()
      for (let i = 0; i < 5; i++) { global.gc(); await new Promise((r) => setImmediate(r)) }
      console.log('collected')
    })()`
  const child = spawn(...nodeCommand(['--expose-gc', '-e', script]), {
    env: { ...process.env, MCPD_URL: mcpd.url, MCPD_TOKEN: TOKEN, CONFIG_DIR: await tempConfigDir(t) },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let exited = false
  child.on('exit', () => {
    exited = true
  })
  t.after(() => child.kill('SIGKILL'))
  let out = ''
  child.stdout.on('data', (data) => {
    out += data
  })
  // Bounds the child's start too: seconds under emulation (scripts/test-arm64.sh).
  await mcpd.waitFor(() => out.includes('collected'), { timeoutMs: scaledMs(10_000) })
  // Cannot be exact: "the process did not exit" is an absence over time. A second is
  // far longer than Node takes to exit once its loop is empty (a few ms after the GC).
  await sleep(1000)
  assert.equal(exited, false, 'the process exited while its registrar was running')
})

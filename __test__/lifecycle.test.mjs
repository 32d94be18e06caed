// stop() and the Node process, option checking, and the per-provider limits:
// concurrency, the FIFO queue, 429, timeouts and cancellation.

import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import test from 'node:test'
import { fileURLToPath } from 'node:url'
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

const { VirtualLlmRegistrar } = addon
const child = fileURLToPath(new URL('./fixtures/child-registrar.mjs', import.meta.url))

function runChild(t, env) {
  const proc = spawn(...nodeCommand([child]), { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] })
  t.after(() => proc.kill('SIGKILL'))
  // Listen from the start: the child may exit before the test looks.
  const exit = new Promise((resolve) => proc.on('exit', (code) => resolve({ code, at: Date.now() })))
  const events = []
  let buffer = ''
  proc.stdout.on('data', (data) => {
    buffer += data
    const lines = buffer.split('\n')
    buffer = lines.pop()
    for (const line of lines) if (line) events.push(JSON.parse(line))
  })
  let stderr = ''
  proc.stderr.on('data', (data) => {
    stderr += data
  })
  return { proc, events, exit, stderr: () => stderr }
}

test('after stop() the Node process exits by itself within 2 s; a running registrar keeps it alive', async (t) => {
  const mcpd = await startMcpd(t)
  const home = await tempConfigDir(t)
  const env = { MCPD_URL: mcpd.url, MCPD_TOKEN: TOKEN, MCPCTL_HOME: home }
  const stopping = runChild(t, { ...env, STOP_AFTER_MS: '300' })
  const running = runChild(t, env)
  // The children start first: seconds under emulation (scripts/test-arm64.sh).
  await mcpd.waitFor(() => stopping.events.some((e) => e.event === 'stopped'), { timeoutMs: scaledMs(10_000) })
  const stopped = stopping.events.find((e) => e.event === 'stopped')
  assert.equal(stopped.status.state, 'stopped')
  const { code, at } = await Promise.race([
    stopping.exit,
    sleep(5000).then(() => {
      throw new Error(`the child did not exit after stop(): ${JSON.stringify(stopping.events.at(-1))}`)
    }),
  ])
  assert.equal(code, 0, stopping.stderr())
  const lag = at - stopped.at
  assert.ok(lag < 2000, `exited ${lag} ms after stop()`)
  // The child used $MCPCTL_HOME for its session file (no configDir option).
  const { readFile } = await import('node:fs/promises')
  const saved = JSON.parse(await readFile(`${home}/provider-session`, 'utf8'))
  assert.equal(typeof saved.providerSessionId, 'string')
  // The other child never calls stop(): it is still alive and beating.
  await mcpd.waitFor(() => running.events.some((e) => e.event === 'started'), { timeoutMs: scaledMs(10_000) })
  // A heartbeat sent after 'started' and after the other child exited: the process
  // is alive and its registrar still running (an event, not a pause).
  const beats = mcpd.heartbeats.length
  await mcpd.waitFor(() => mcpd.heartbeats.length > beats, { timeoutMs: scaledMs(10_000) })
  assert.equal(running.proc.exitCode, null, 'a started registrar keeps Node alive')
})

test('stop() answers in-flight and queued tasks 503, is idempotent, and later calls say it is stopped', async (t) => {
  const mcpd = await startMcpd(t)
  let signal
  const hanging = {
    complete: (options) => {
      signal = options.signal
      return new Promise(() => {})
    },
  }
  const states = []
  const { registrar } = await startRegistrar(
    t,
    mcpd,
    { hanging },
    { maxConcurrency: 1, onStateChange: (s) => states.push(s.state) },
  )
  const running = mcpd.sendTask({ provider: 'hanging', body: chatBody() })
  const queued = mcpd.sendTask({ provider: 'hanging', body: chatBody() })
  // inFlight counts the task before its call reaches JavaScript: wait for the provider too
  // (emulated, scripts/test-arm64.sh, the call can still be on its way when the count shows).
  await mcpd.waitFor(() => signal !== undefined && registrar.status().inFlight === 1 && registrar.status().queued === 1)
  await registrar.stop()
  for (const taskId of [running, queued]) {
    const outcome = await mcpd.outcome(taskId)
    assert.equal(outcome.status, 503)
    assert.equal(outcome.body.error.type, 'unavailable')
  }
  assert.equal(signal.aborted, true)
  assert.equal(signal.reason.name, 'AbortError')
  assert.equal(registrar.status().state, 'stopped')
  await registrar.stop()
  await assert.rejects(registrar.start(), {
    name: 'RegistrarError',
    code: 'ERR_STOPPED',
    message: /registrar is stopped/,
  })
  await mcpd.waitFor(() => states.at(-1) === 'stopped')
  await mcpd.waitFor(() => mcpd.connections.every((c) => c.closedAt !== null))
})

test('maxConcurrency and maxQueue: FIFO queue, then 429; the heartbeat reports the load', async (t) => {
  const mcpd = await startMcpd(t)
  const gates = []
  const order = []
  const provider = {
    complete: (options) => {
      order.push(options.messages[0].content)
      return new Promise((resolve) => gates.push(() => resolve({ content: options.messages[0].content })))
    },
  }
  const { registrar } = await startRegistrar(
    t,
    mcpd,
    { local: provider },
    { maxConcurrency: 2, maxQueue: 2, heartbeatIntervalMs: 50 },
  )
  const ask = (content) => mcpd.sendTask({ provider: 'local', body: { messages: [{ role: 'user', content }] } })
  const ids = ['a', 'b', 'c', 'd', 'e'].map(ask)
  const rejected = await mcpd.outcome(ids[4])
  assert.equal(rejected.status, 429)
  assert.equal(rejected.body.error.type, 'rate_limit_exceeded')
  assert.deepEqual(registrar.status().inFlight, 2)
  assert.deepEqual(registrar.status().queued, 2)
  await mcpd.waitFor(() =>
    mcpd.heartbeats.some((b) => b.body.providers[0].inFlight === 2 && b.body.providers[0].queued === 2),
  )
  // a and b got slots at once and run side by side, in either order.
  assert.deepEqual([...order].sort(), ['a', 'b'])
  gates.shift()()
  await mcpd.waitFor(() => order.length === 3)
  gates.shift()()
  await mcpd.waitFor(() => order.length === 4)
  assert.deepEqual(order.slice(2), ['c', 'd'], 'queued tasks run in arrival order')
  while (gates.length) gates.shift()()
  for (const id of ids.slice(0, 4)) assert.equal((await mcpd.outcome(id)).status, 200)
  await mcpd.waitFor(() => registrar.status().completed === 4 && registrar.status().failed === 1)
  assert.deepEqual(mcpd.violations, [])
})

test('taskTimeoutMs: a never-settling provider is aborted, answered 504, and its slot freed', async (t) => {
  const mcpd = await startMcpd(t)
  let signal
  const provider = {
    complete: (options) => {
      if (options.messages[0].content === 'hang') {
        signal = options.signal
        return new Promise(() => {})
      }
      return Promise.resolve({ content: 'quick' })
    },
  }
  const { registrar } = await startRegistrar(t, mcpd, { local: provider }, { taskTimeoutMs: 200, maxConcurrency: 1 })
  const started = Date.now()
  const hung = mcpd.sendTask({ provider: 'local', body: { messages: [{ role: 'user', content: 'hang' }] } })
  const next = mcpd.sendTask({ provider: 'local', body: { messages: [{ role: 'user', content: 'next' }] } })
  const timedOut = await mcpd.outcome(hung)
  const elapsed = Date.now() - started
  assert.equal(timedOut.status, 504)
  assert.equal(timedOut.body.error.type, 'timeout')
  assert.ok(elapsed >= 190 && elapsed < 2000, `answered after ${elapsed} ms`)
  assert.equal(signal.aborted, true)
  assert.equal(signal.reason.name, 'TimeoutError')
  assert.equal((await mcpd.outcome(next)).status, 200)
  // The slot is released once mcpd has acknowledged the answer.
  await mcpd.waitFor(() => registrar.status().inFlight === 0)
})

test('cancel: a running task is aborted and nothing is posted; a queued one never reaches the provider', async (t) => {
  const mcpd = await startMcpd(t)
  const signals = new Map()
  const provider = {
    complete: (options) => {
      signals.set(options.messages[0].content, options.signal)
      return new Promise((resolve) => options.signal.addEventListener('abort', () => resolve({ content: 'too late' })))
    },
  }
  const { registrar } = await startRegistrar(t, mcpd, { local: provider }, { maxConcurrency: 1 })
  const running = mcpd.sendTask({ provider: 'local', body: { messages: [{ role: 'user', content: 'running' }] } })
  const queued = mcpd.sendTask({ provider: 'local', body: { messages: [{ role: 'user', content: 'queued' }] } })
  await mcpd.waitFor(() => registrar.status().queued === 1)
  mcpd.cancel(queued)
  await mcpd.waitFor(() => registrar.status().queued === 0)
  mcpd.cancel(running)
  await mcpd.waitFor(() => signals.get('running')?.aborted)
  mcpd.cancel('t-never-sent')
  // Both tasks are counted cancelled as they end, after their last POST: the requests are
  // final from then on. The cancel of an unknown id has nothing to end and is covered
  // exactly by tests/core.rs (cancel_of_an_unknown_task_is_a_no_op, behind a sentinel task).
  await mcpd.waitFor(() => registrar.status().cancelled === 2, { timeoutMs: 5000 })
  assert.equal(signals.has('queued'), false, 'the queued task was dropped without calling the provider')
  assert.deepEqual((await mcpd.outcome(running)).kind, 'cancelled')
  assert.deepEqual(mcpd.violations, [], 'nothing was posted for cancelled tasks')
  assert.equal(registrar.status().inFlight, 0)
  assert.deepEqual(
    mcpd.requests.filter((r) => r.path.includes('_provider-tasks')),
    [],
  )
})

test('bad options are refused with a clear error', async (t) => {
  const configDir = await tempConfigDir(t)
  const provider = recordingProvider()
  const base = {
    mcpdUrl: 'http://127.0.0.1:9',
    token: TOKEN,
    configDir,
    providers: [{ name: 'a', type: 't', provider }],
  }
  const cases = [
    [{ mcpdUrl: undefined }, /mcpdUrl/],
    [{ token: '' }, /token/],
    [{ mcpdUrl: 'http://mcpd.example.com' }, /allowInsecureHttp/],
    [{ mcpdUrl: 'ftp://127.0.0.1' }, /http or https/],
    [{ providers: [] }, /providers/],
    [{ providers: [{ name: 'a', type: 't' }] }, /provider/],
    [{ providers: [{ name: 'a', type: 't', provider: {} }] }, /complete/],
    [
      {
        providers: [
          { name: 'a', type: 't', provider },
          { name: 'a', type: 't', provider },
        ],
      },
      /twice/,
    ],
    [{ heartbeatIntervalMs: 0 }, /heartbeatIntervalMs/],
    [{ idleTimeoutMs: -1 }, /idleTimeoutMs/],
    [{ maxConcurrency: 0 }, /maxConcurrency/],
    [{ maxQueue: 1.5 }, /maxQueue/],
    [{ backoff: { initialMs: 500, maxMs: 100 } }, /backoff/],
    [{ taskTimeoutMs: 'soon' }, /taskTimeoutMs must be a number/],
    [{ logger: { info() {} } }, /logger\.debug/],
    [{ onStateChange: 'no' }, /onStateChange/],
  ]
  for (const [patch, pattern] of cases) {
    assert.throws(
      () => new VirtualLlmRegistrar({ ...base, ...patch }),
      (error) => {
        assert.match(error.message, pattern, JSON.stringify(patch))
        assert.ok(error instanceof addon.RegistrarError, JSON.stringify(patch))
        assert.equal(error.code, 'ERR_INVALID_OPTION', JSON.stringify(patch))
        return true
      },
    )
  }
  // Plain http to another host is allowed when asked for explicitly.
  const insecure = new VirtualLlmRegistrar({
    ...base,
    mcpdUrl: 'http://mcpd.example.com',
    allowInsecureHttp: true,
    logger: captureLogger(),
  })
  assert.equal(insecure.status().state, 'idle')
  assert.deepEqual(insecure.status(), {
    state: 'idle',
    providerSessionId: null,
    providers: ['a'],
    inFlight: 0,
    queued: 0,
    completed: 0,
    failed: 0,
    cancelled: 0,
    reconnects: 0,
    lastError: null,
    // The paused providers (issue 16).
    paused: [],
  })
})

test('start() resolves once the channel is open: a task sent that instant is answered, 20 times in a row', async (t) => {
  const mcpd = await startMcpd(t)
  for (let round = 0; round < 20; round++) {
    const provider = recordingProvider()
    const registrar = new VirtualLlmRegistrar({
      mcpdUrl: mcpd.url,
      token: TOKEN,
      configDir: await tempConfigDir(t),
      logger: captureLogger(),
      providers: [{ name: `instant-${round}`, type: 'test', provider }],
    })
    t.after(() => registrar.stop())
    await registrar.start()
    // No wait of any kind: mcpd must already hold the open stream.
    const status = registrar.status()
    assert.equal(status.state, 'connected')
    const taskId = mcpd.sendTask({
      provider: `instant-${round}`,
      body: chatBody(),
      sessionId: status.providerSessionId,
    })
    const outcome = await mcpd.outcome(taskId)
    assert.equal(outcome.status, 200, `round ${round}: ${JSON.stringify(outcome)}`)
    assert.equal(provider.calls.length, 1)
    await registrar.stop()
  }
  assert.deepEqual(mcpd.violations, [])
})

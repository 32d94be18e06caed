// The registrar against the fake mcpd: register and the sticky session id,
// the heartbeat, tasks and their error answers, reconnects, and the token's secrecy.

import assert from 'node:assert/strict'
import { readFile, stat, writeFile } from 'node:fs/promises'
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

const { VirtualLlmRegistrar } = addon

test('register sends the publishable providers and persists the session id with mode 0600', async (t) => {
  const mcpd = await startMcpd(t)
  const { registrar, configDir } = await startRegistrar(t, mcpd, { local: recordingProvider() })
  assert.equal(mcpd.registrations.length, 1)
  const { headers, body } = mcpd.registrations[0]
  assert.equal(headers.authorization, `Bearer ${TOKEN}`)
  assert.match(headers['content-type'], /^application\/json/)
  assert.equal(body.providerSessionId, undefined, 'no id on the first run')
  assert.equal(body.client.name, 'mcplocal-registrar')
  assert.equal(body.client.version, JSON.parse(await readFile(new URL('../package.json', import.meta.url))).version)
  assert.deepEqual(body.providers, [{ name: 'local', type: 'test', model: 'local-model' }])
  const id = registrar.status().providerSessionId
  assert.match(id, /^ps-/)
  const file = join(configDir, 'provider-session')
  assert.deepEqual(JSON.parse(await readFile(file, 'utf8')), { providerSessionId: id })
  assert.equal((await stat(file)).mode & 0o777, 0o600)
  const stream = mcpd.connections[0]
  assert.equal(stream.sessionId, id)
  assert.equal(stream.headers['x-mcpctl-provider-session'], id)
  assert.equal(stream.headers.accept, 'text/event-stream')
  assert.deepEqual(mcpd.violations, [])
})

test('a restarted registrar registers again with the id on disk (sticky reconnect)', async (t) => {
  const mcpd = await startMcpd(t)
  const configDir = await tempConfigDir(t)
  const first = await startRegistrar(t, mcpd, { local: recordingProvider() }, { configDir })
  const id = first.registrar.status().providerSessionId
  await first.registrar.stop()
  const second = await startRegistrar(t, mcpd, { local: recordingProvider() }, { configDir })
  assert.equal(mcpd.registrations.length, 2)
  assert.equal(mcpd.registrations[1].body.providerSessionId, id)
  assert.equal(mcpd.registrations[1].headers['x-mcpctl-provider-session'], id)
  assert.equal(second.registrar.status().providerSessionId, id)
})

test('a plain-text session file from an older version is read; a new id from mcpd is adopted and persisted', async (t) => {
  const mcpd = await startMcpd(t)
  const configDir = await tempConfigDir(t)
  await writeFile(join(configDir, 'provider-session'), 'legacy-session-7\n')
  const { registrar } = await startRegistrar(t, mcpd, { local: recordingProvider() }, { configDir })
  assert.equal(mcpd.registrations[0].body.providerSessionId, 'legacy-session-7')
  // The fake does not know that id, so it answers a new one: adopted and persisted.
  const adopted = registrar.status().providerSessionId
  assert.notEqual(adopted, 'legacy-session-7')
  assert.deepEqual(JSON.parse(await readFile(join(configDir, 'provider-session'), 'utf8')), {
    providerSessionId: adopted,
  })
})

test('the heartbeat fires at the configured interval with per-provider load figures', async (t) => {
  const mcpd = await startMcpd(t)
  await startRegistrar(t, mcpd, { local: recordingProvider() }, { heartbeatIntervalMs: 100 })
  const started = Date.now()
  await mcpd.waitFor(() => mcpd.heartbeats.length >= 5, { timeoutMs: 5000 })
  const elapsed = Date.now() - started
  // Five beats at 100 ms ± 10% jitter: at least ~450 ms, and not wildly late.
  assert.ok(elapsed >= 400, `5 heartbeats after ${elapsed} ms`)
  assert.ok(elapsed < 2000, `5 heartbeats took ${elapsed} ms`)
  const gaps = mcpd.heartbeats.slice(1).map((beat, i) => beat.at - mcpd.heartbeats[i].at)
  for (const gap of gaps) assert.ok(gap >= 70 && gap <= 400, `gap ${gap} ms`)
  const { body, headers } = mcpd.heartbeats[0]
  assert.equal(headers['x-mcpctl-provider-session'], body.providerSessionId)
  assert.deepEqual(body.providers, [
    { name: 'local', inFlight: 0, queued: 0, maxConcurrency: 4, completed: 0, failed: 0 },
  ])
})

test('heartbeatIntervalMs from the register answer overrides the option', async (t) => {
  const mcpd = await startMcpd(t, { heartbeatIntervalMs: 100 })
  await startRegistrar(t, mcpd, { local: recordingProvider() }, { heartbeatIntervalMs: 60_000 })
  await mcpd.waitFor(() => mcpd.heartbeats.length >= 3, { timeoutMs: 3000 })
})

test('a failed first register rejects start() with the HTTP status and the body message', async (t) => {
  const mcpd = await startMcpd(t)
  mcpd.failNext('register', { status: 503, body: { error: { message: 'mcpd is in maintenance' } } })
  const configDir = await tempConfigDir(t)
  const registrar = new VirtualLlmRegistrar({
    mcpdUrl: mcpd.url,
    token: TOKEN,
    configDir,
    logger: captureLogger(),
    providers: [{ name: 'local', type: 'test', provider: recordingProvider() }],
  })
  t.after(() => registrar.stop())
  await assert.rejects(registrar.start(), (error) => {
    assert.match(error.message, /503/)
    assert.match(error.message, /mcpd is in maintenance/)
    assert.ok(!error.message.includes(TOKEN))
    return true
  })
  assert.equal(registrar.status().state, 'idle')
  assert.match(registrar.status().lastError, /503/)
  // A plain-text error body is quoted (its first 500 bytes).
  mcpd.failNext('register', { status: 500, body: 'x'.repeat(2000) })
  await assert.rejects(
    registrar.start(),
    (error) => error.message.includes('HTTP 500') && !error.message.includes('x'.repeat(501)),
  )
  // And it can still start afterwards.
  await registrar.start()
  assert.equal(mcpd.registrations.length, 3)
})

test('401 on register: start() rejects and the state is unauthorized', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = new VirtualLlmRegistrar({
    mcpdUrl: mcpd.url,
    token: 'wrong-token',
    configDir: await tempConfigDir(t),
    logger: captureLogger(),
    providers: [{ name: 'local', type: 'test', provider: recordingProvider() }],
  })
  t.after(() => registrar.stop())
  await assert.rejects(registrar.start(), /401/)
  assert.equal(registrar.status().state, 'unauthorized')
})

test('a non-streaming task runs on the JS provider and returns a chat.completion', async (t) => {
  const mcpd = await startMcpd(t)
  const provider = recordingProvider()
  const { registrar } = await startRegistrar(t, mcpd, { local: provider })
  const body = chatBody({ max_tokens: 12, stop: 'END', temperature: 0.5, top_p: 0.9, seed: 3, user: 'u' })
  const taskId = mcpd.sendTask({ provider: 'local', body })
  const outcome = await mcpd.outcome(taskId)
  assert.equal(outcome.kind, 'result')
  assert.equal(outcome.status, 200)
  const completion = outcome.body
  assert.equal(completion.object, 'chat.completion')
  assert.ok(Number.isInteger(completion.created))
  assert.equal(completion.model, 'local')
  assert.deepEqual(completion.choices[0].message, {
    role: 'assistant',
    content: 'hello from the provider',
    refusal: null,
  })
  assert.equal(completion.choices[0].finish_reason, 'stop')
  assert.deepEqual(completion.usage, { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 })
  const [options] = provider.calls
  assert.deepEqual(options.messages, [{ role: 'user', content: 'Say hello' }])
  assert.equal(options.maxTokens, 12)
  assert.deepEqual(options.stop, ['END'])
  assert.equal(options.temperature, 0.5)
  assert.equal(options.topP, 0.9)
  assert.equal(options.seed, 3)
  assert.equal(options.user, 'u')
  assert.deepEqual(options.request, body)
  assert.ok(options.signal instanceof AbortSignal)
  assert.equal(options.signal.aborted, false)
  await mcpd.waitFor(() => registrar.status().completed === 1)
  assert.deepEqual(mcpd.violations, [])
})

test('a streaming task on a provider without stream() is answered v1-style', async (t) => {
  const mcpd = await startMcpd(t)
  await startRegistrar(t, mcpd, { local: recordingProvider() })
  const taskId = mcpd.sendTask({
    provider: 'local',
    body: chatBody({ stream: true, stream_options: { include_usage: true } }),
  })
  const outcome = await mcpd.outcome(taskId)
  assert.equal(outcome.kind, 'stream')
  const payloads = outcome.payloads
  assert.equal(payloads.at(-1), '[DONE]')
  const chunks = payloads.slice(0, -1).map((payload) => JSON.parse(payload))
  assert.deepEqual(
    chunks.map((chunk) => chunk.choices[0]?.delta ?? null),
    [{ role: 'assistant', content: '' }, { content: 'hello from the provider' }, {}, null],
  )
  assert.equal(chunks[2].choices[0].finish_reason, 'stop')
  assert.deepEqual(chunks[3].usage, { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 })
  for (const chunk of chunks.slice(0, 3)) assert.equal(chunk.usage, null)
  assert.equal(new Set(chunks.map((chunk) => `${chunk.id} ${chunk.created} ${chunk.model}`)).size, 1)
  const posts = mcpd.chunkPosts(taskId)
  assert.equal(posts[0].seq, 0)
  assert.deepEqual(mcpd.violations, [])
})

test('unknown provider → 404 model_not_found; invalid body → 400; provider rejection → 502', async (t) => {
  const mcpd = await startMcpd(t)
  const failing = {
    complete: async () => {
      throw new Error('ollama is not running')
    },
  }
  const { registrar } = await startRegistrar(t, mcpd, { local: recordingProvider(), failing })
  const unknown = await mcpd.outcome(mcpd.sendTask({ provider: 'nope', body: chatBody() }))
  assert.equal(unknown.status, 404)
  assert.equal(unknown.body.error.code, 'model_not_found')
  assert.equal(typeof unknown.body.error.message, 'string')
  const unknownStreaming = await mcpd.outcome(mcpd.sendTask({ provider: 'nope', body: chatBody({ stream: true }) }))
  assert.equal(unknownStreaming.kind, 'result')
  assert.equal(unknownStreaming.status, 404)
  const invalid = await mcpd.outcome(mcpd.sendTask({ provider: 'local', body: { messages: 'hi' } }))
  assert.equal(invalid.status, 400)
  assert.equal(invalid.body.error.type, 'invalid_request_error')
  assert.match(invalid.body.error.message, /messages/)
  const rejected = await mcpd.outcome(mcpd.sendTask({ provider: 'failing', body: chatBody() }))
  assert.equal(rejected.status, 502)
  assert.equal(rejected.body.error.type, 'provider_error')
  assert.match(rejected.body.error.message, /ollama is not running/)
  const rejectedStreaming = await mcpd.outcome(mcpd.sendTask({ provider: 'failing', body: chatBody({ stream: true }) }))
  assert.equal(rejectedStreaming.kind, 'result')
  assert.equal(rejectedStreaming.status, 502)
  await mcpd.waitFor(() => registrar.status().failed === 5)
  assert.deepEqual(mcpd.violations, [])
})

test('providers that misbehave get a 502, never a crash', async (t) => {
  const mcpd = await startMcpd(t)
  const providers = {
    throwsSync: {
      complete() {
        throw new TypeError('sync boom')
      },
    },
    notAPromise: { complete: () => 'just a string' },
    undefinedResult: { complete: async () => undefined },
    badContent: { complete: async () => ({ content: 42 }) },
    circular: {
      complete: async () => {
        const result = { content: 'x' }
        result.self = result
        return result
      },
    },
    rejectsNonError: { complete: () => Promise.reject({ code: 7 }) },
  }
  await startRegistrar(t, mcpd, providers)
  for (const name of Object.keys(providers)) {
    const outcome = await mcpd.outcome(mcpd.sendTask({ provider: name, body: chatBody() }))
    assert.equal(outcome.status, 502, name)
    assert.equal(outcome.body.error.type, 'provider_error', name)
  }
  const sync = await mcpd.outcome(mcpd.sendTask({ provider: 'throwsSync', body: chatBody() }))
  assert.match(sync.body.error.message, /sync boom/)
  assert.deepEqual(mcpd.violations, [])
})

test('a replayed taskId runs once, while running and after it was answered', async (t) => {
  const mcpd = await startMcpd(t)
  let release
  const gate = new Promise((resolve) => {
    release = resolve
  })
  const provider = recordingProvider(async () => {
    await gate
    return { content: 'once' }
  })
  const { registrar } = await startRegistrar(t, mcpd, { local: provider })
  mcpd.sendTask({ provider: 'local', body: chatBody(), taskId: 't-replayed' })
  mcpd.sendTask({ provider: 'local', body: chatBody(), taskId: 't-replayed' })
  await mcpd.waitFor(() => provider.calls.length === 1)
  release()
  const outcome = await mcpd.outcome('t-replayed')
  assert.equal(outcome.status, 200)
  mcpd.sendTask({ provider: 'local', body: chatBody(), taskId: 't-replayed' })
  // A sentinel task after the replay: the channel's events are handled in order, so once
  // it is answered the replay was handled too, and a task admitted is counted at once
  // (in flight, queued, or ended). Once the sentinel ended, only t-replayed (once) and the
  // sentinel were ever received, so the provider was called for nothing else.
  assert.equal((await mcpd.outcome(mcpd.sendTask({ provider: 'local', body: chatBody() }))).status, 200)
  await mcpd.waitFor(() => registrar.status().completed >= 2)
  const { completed, failed, cancelled, inFlight, queued } = registrar.status()
  assert.equal(completed + failed + cancelled + inFlight + queued, 2, 'tasks received')
  assert.equal(provider.calls.length, 2)
  assert.deepEqual(mcpd.violations, [])
})

test('when mcpd drops the stream the registrar reconnects with the same id and Last-Event-ID', async (t) => {
  const mcpd = await startMcpd(t)
  const states = []
  const { registrar } = await startRegistrar(
    t,
    mcpd,
    { local: recordingProvider() },
    { onStateChange: (status) => states.push(status.state) },
  )
  const id = registrar.status().providerSessionId
  mcpd.sendEvent('ping', {}, { id: 'ev-41' })
  mcpd.sendTask({ provider: 'local', body: chatBody(), eventId: 'ev-42' })
  await mcpd.waitFor(() => registrar.status().completed === 1)
  mcpd.dropStreams()
  await mcpd.waitFor(() => mcpd.connections.length === 2 && registrar.status().state === 'connected', {
    timeoutMs: 5000,
  })
  const again = mcpd.connections[1]
  assert.equal(again.sessionId, id)
  assert.equal(again.lastEventId, 'ev-42')
  assert.equal(mcpd.registrations.length, 1, 'no re-register for a plain drop')
  assert.equal(registrar.status().reconnects, 1)
  // onStateChange is called on the JS thread shortly after each change.
  await mcpd.waitFor(() => states.at(-1) === 'connected')
  assert.ok(states.includes('reconnecting'), states.join(','))
  // Tasks flow on the new connection.
  const outcome = await mcpd.outcome(mcpd.sendTask({ provider: 'local', body: chatBody() }))
  assert.equal(outcome.status, 200)
})

test('404 on the stream or the heartbeat registers again, then reconnects', async (t) => {
  const mcpd = await startMcpd(t)
  const configDir = await tempConfigDir(t)
  const { registrar } = await startRegistrar(
    t,
    mcpd,
    { local: recordingProvider() },
    { heartbeatIntervalMs: 100, configDir },
  )
  const first = registrar.status().providerSessionId
  mcpd.forgetSession(first)
  // The open stream stays open: only the heartbeat notices.
  await mcpd.waitFor(() => mcpd.registrations.length === 2, { timeoutMs: 3000 })
  assert.equal(mcpd.registrations[1].body.providerSessionId, first)
  await mcpd.waitFor(() => registrar.status().state === 'connected' && registrar.status().providerSessionId !== first)
  const second = registrar.status().providerSessionId
  assert.deepEqual(JSON.parse(await readFile(join(configDir, 'provider-session'), 'utf8')), {
    providerSessionId: second,
  })
  await mcpd.waitFor(() => mcpd.connections.some((c) => c.sessionId === second && c.closedAt === null))
  // Now the stream: forget the session and drop the connection. The heartbeat's answers are
  // held meanwhile, so only the stream can be the one to hear the 404 (a beat's 404 would
  // register again too, and the stream would then never see one).
  mcpd.delay('heartbeat', 60_000)
  mcpd.forgetSession(second)
  mcpd.dropStreams()
  await mcpd.waitFor(() => mcpd.registrations.length === 3, { timeoutMs: 3000 })
  await mcpd.waitFor(() => registrar.status().state === 'connected')
  assert.ok(mcpd.connections.some((c) => c.status === 404))
})

test('401 on the stream: state unauthorized, retried at the maximum backoff only', async (t) => {
  const mcpd = await startMcpd(t)
  const { registrar } = await startRegistrar(
    t,
    mcpd,
    { local: recordingProvider() },
    { backoff: { initialMs: 20, maxMs: 400 } },
  )
  mcpd.failNext('stream', { status: 401, body: { error: { message: 'token revoked' } }, times: 2 })
  mcpd.dropStreams()
  await mcpd.waitFor(() => registrar.status().state === 'unauthorized')
  const refused = Date.now()
  assert.match(registrar.status().lastError, /401/)
  await mcpd.waitFor(() => mcpd.connections.length >= 3, { timeoutMs: 3000 })
  const retried = Date.now() - refused
  assert.ok(retried >= 300, `retried after ${retried} ms, before the maximum backoff`)
  await mcpd.waitFor(() => registrar.status().state === 'connected', { timeoutMs: 3000 })
})

test('invalid UTF-8 or an over-limit frame on the stream causes a reconnect, not a stall', async (t) => {
  const mcpd = await startMcpd(t)
  const { registrar } = await startRegistrar(t, mcpd, { local: recordingProvider() })
  mcpd.sendRaw(Buffer.from([0x65, 0x76, 0x65, 0x6e, 0x74, 0x3a, 0x20, 0xff, 0xfe, 0x0a, 0x0a]))
  await mcpd.waitFor(() => mcpd.connections.length === 2 && registrar.status().state === 'connected', {
    timeoutMs: 3000,
  })
  assert.match(registrar.status().lastError, /UTF-8/i)
  // 17 MiB of data without a line end: over the 16 MiB frame limit.
  const piece = 'x'.repeat(1024 * 1024)
  mcpd.sendRaw('data: ')
  for (let i = 0; i < 17; i++) mcpd.sendRaw(piece)
  await mcpd.waitFor(() => mcpd.connections.length === 3 && registrar.status().state === 'connected', {
    timeoutMs: 5000,
  })
  assert.match(registrar.status().lastError, /limit|large/i)
  const outcome = await mcpd.outcome(mcpd.sendTask({ provider: 'local', body: chatBody() }))
  assert.equal(outcome.status, 200)
})

test('no byte for idleTimeoutMs reconnects; keep-alive comments hold the channel open', async (t) => {
  const mcpd = await startMcpd(t, { keepAliveMs: 50 })
  const { registrar } = await startRegistrar(t, mcpd, { local: recordingProvider() }, { idleTimeoutMs: 300 })
  // Cannot be exact: what must not happen is the addon's idle timer firing, on the real
  // clock (no paused clock across napi). 700 ms is over twice idleTimeoutMs, so an idle
  // timer that keep-alives did not reset would have fired at least twice by then.
  await sleep(700)
  assert.equal(mcpd.connections.length, 1, 'keep-alives kept the channel')
  const idle = await startMcpd(t, { keepAliveMs: 0 })
  const quiet = await startRegistrar(t, idle, { local: recordingProvider() }, { idleTimeoutMs: 200 })
  await idle.waitFor(() => idle.connections.length >= 2, { timeoutMs: 3000 })
  assert.match(quiet.registrar.status().lastError ?? '', /idle/)
  assert.equal(registrar.status().state, 'connected')
})

test('a path prefix on mcpdUrl is kept for every request', async (t) => {
  const mcpd = await startMcpd(t, { pathPrefix: '/mcpd' })
  await startRegistrar(t, mcpd, { local: recordingProvider() })
  const outcome = await mcpd.outcome(mcpd.sendTask({ provider: 'local', body: chatBody() }))
  assert.equal(outcome.status, 200)
  assert.ok(mcpd.url.endsWith('/mcpd'))
  assert.deepEqual(mcpd.violations, [])
})

test('the token never appears in logs, errors or status()', async (t) => {
  const mcpd = await startMcpd(t)
  const logger = captureLogger()
  const failing = {
    complete: async () => {
      throw new Error(`upstream said ${TOKEN}`)
    },
  }
  const { registrar } = await startRegistrar(t, mcpd, { failing }, { logger, heartbeatIntervalMs: 50 })
  mcpd.failNext('heartbeat', { status: 500, body: `proxy echo: Bearer ${TOKEN}` })
  await mcpd.outcome(mcpd.sendTask({ provider: 'failing', body: chatBody() }))
  await mcpd.waitFor(() => logger.lines.some((line) => line.msg.includes('heartbeat failed')))
  mcpd.dropStreams()
  await mcpd.waitFor(() => mcpd.connections.length === 2)
  const everything = JSON.stringify(logger.lines) + JSON.stringify(registrar.status())
  assert.ok(logger.lines.length > 0)
  assert.ok(!everything.includes(TOKEN), 'token leaked')
  assert.ok(everything.includes('***'), 'the echoed token was redacted')
})

test('MCPCTL_LOG sets the level: debug adds detail, off mutes', async (t) => {
  const previous = process.env.MCPCTL_LOG
  t.after(() => {
    if (previous === undefined) delete process.env.MCPCTL_LOG
    else process.env.MCPCTL_LOG = previous
  })
  const mcpd = await startMcpd(t)
  process.env.MCPCTL_LOG = 'debug'
  const verbose = captureLogger()
  await startRegistrar(t, mcpd, { local: recordingProvider() }, { logger: verbose })
  await mcpd.waitFor(() =>
    verbose.lines.some((line) => line.level === 'debug' && /control channel open/.test(line.msg)),
  )
  process.env.MCPCTL_LOG = 'off'
  const muted = captureLogger()
  const { registrar } = await startRegistrar(t, mcpd, { local: recordingProvider() }, { logger: muted })
  mcpd.dropStreams()
  await mcpd.waitFor(() => registrar.status().reconnects >= 1 && registrar.status().state === 'connected')
  assert.deepEqual(muted.lines, [])
})

test('without a logger, warnings go to stderr, without the token', async (t) => {
  const { spawnSync } = await import('node:child_process')
  const configDir = await tempConfigDir(t)
  const script = `
    const { VirtualLlmRegistrar } = require(${JSON.stringify(new URL('../index.js', import.meta.url).pathname)})
    const registrar = new VirtualLlmRegistrar({ mcpdUrl: 'http://127.0.0.1:9', token: ${JSON.stringify(TOKEN)}, configDir: ${JSON.stringify(configDir)},
      providers: [{ name: 'local', type: 'test', provider: { complete: async () => ({ content: '' }) } }] })
    registrar.start().catch((error) => console.log('rejected: ' + error.message))`
  const env = { ...process.env }
  delete env.MCPCTL_LOG
  const run = spawnSync(...nodeCommand(['-e', script]), { env, encoding: 'utf8', timeout: scaledMs(20_000) })
  assert.equal(run.status, 0, run.stderr)
  assert.match(run.stdout, /rejected: register failed: no answer from mcpd/)
  assert.match(run.stderr, /\[mcpctl-registrar\] WARN register failed/)
  assert.ok(!run.stderr.includes(TOKEN) && !run.stdout.includes(TOKEN))
})

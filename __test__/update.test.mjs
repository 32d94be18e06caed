// update(providers): a new set published without a restart (index.d.ts; docs/protocol.md
// section 1, "Changing the set"), through the public API against the fake mcpd.

import assert from 'node:assert/strict'
import test from 'node:test'
import OpenAI from 'openai'
import {
  addon,
  captureLogger,
  chatBody,
  pinoCapture,
  recordingProvider,
  scaledMs,
  startMcpd,
  startRegistrar,
  TOKEN,
  tempConfigDir,
} from './helpers.mjs'

const { VirtualLlmRegistrar, RegistrarError, maybeStartVirtualLlmRegistrar } = addon
const skip = false

const entry = (name, provider, extra = {}) => ({ name, type: 'test', model: `${name}-model`, provider, ...extra })
const openai = (mcpd) => new OpenAI({ baseURL: `${mcpd.url}/v1`, apiKey: TOKEN, maxRetries: 0, timeout: 10000 })
const modelIds = async (mcpd) => (await openai(mcpd).models.list()).data.map((m) => m.id).sort()
async function llmStates(mcpd) {
  const { llms } = await (
    await fetch(`${mcpd.url}/api/v1/llms`, { headers: { authorization: `Bearer ${TOKEN}` } })
  ).json()
  return Object.fromEntries(llms.map((l) => [l.name, l.status]))
}

test('update() adds a provider: same session id, the whole set registered, /v1/models shows it, tasks reach it', {
  skip,
}, async (t) => {
  const mcpd = await startMcpd(t)
  const first = recordingProvider(() => ({ content: 'from first' }))
  const { registrar } = await startRegistrar(t, mcpd, { first }, { heartbeatIntervalMs: 100 })
  const id = registrar.status().providerSessionId
  assert.deepEqual(await modelIds(mcpd), ['first'])

  const second = recordingProvider(() => ({ content: 'from second' }))
  await registrar.update([entry('first', first), entry('second', second)])
  const last = mcpd.registrations.at(-1).body
  assert.equal(last.providerSessionId, id)
  assert.deepEqual(
    last.providers.map((p) => p.name),
    ['first', 'second'],
  )
  assert.equal(registrar.status().providerSessionId, id)
  assert.deepEqual(registrar.status().providers, ['first', 'second'])
  assert.deepEqual(await modelIds(mcpd), ['first', 'second'])

  const answer = await openai(mcpd).chat.completions.create({
    model: 'second',
    messages: [{ role: 'user', content: 'hi' }],
  })
  assert.equal(answer.choices[0].message.content, 'from second')
  assert.equal(second.calls[0].model, 'second-model')
  // The heartbeat reports the new set from then on.
  await mcpd.waitFor(() =>
    mcpd.heartbeats.some((h) => h.at > mcpd.registrations.at(-1).at && h.body.providers.length === 2),
  )
  assert.equal(mcpd.connections.length, 1, 'the channel stayed open')
  assert.deepEqual(mcpd.violations, [])
})

test('update() removes a provider: its task in flight runs to its end; a later one is 404 model_not_found', {
  skip,
}, async (t) => {
  const mcpd = await startMcpd(t)
  let release
  const gate = new Promise((resolve) => {
    release = resolve
  })
  const leaving = {
    calls: 0,
    async complete() {
      this.calls++
      await gate
      return { content: 'finished anyway' }
    },
  }
  const staying = recordingProvider(() => ({ content: 'still here' }))
  const { registrar } = await startRegistrar(t, mcpd, { leaving, staying }, { heartbeatIntervalMs: 100 })
  const id = registrar.status().providerSessionId

  const inFlight = mcpd.sendTask({ provider: 'leaving', body: chatBody({ model: 'leaving' }) })
  await mcpd.waitFor(() => leaving.calls === 1)
  await registrar.update([entry('staying', staying)])
  assert.deepEqual(await llmStates(mcpd), { staying: 'active', leaving: 'inactive' })
  release()
  const done = await mcpd.outcome(inFlight)
  assert.equal(done.status, 200)
  assert.equal(done.body.choices[0].message.content, 'finished anyway')

  // mcpd no longer sends it; one that was already on its way is refused.
  const late = mcpd.sendTask({ provider: 'leaving', body: chatBody({ model: 'leaving' }), sessionId: id })
  const refused = await mcpd.outcome(late)
  assert.equal(refused.status, 404)
  assert.equal(refused.body.error.code, 'model_not_found')
  assert.equal(leaving.calls, 1)
  await assert.rejects(
    openai(mcpd).chat.completions.create({ model: 'leaving', messages: [{ role: 'user', content: 'hi' }] }),
    (error) => error.status === 404,
  )
  assert.deepEqual(registrar.status().providers, ['staying'])
  // The heartbeat reports the new set: the name that left is gone from it.
  await mcpd.waitFor(
    () =>
      mcpd.heartbeats
        .at(-1)
        ?.body.providers.map((p) => p.name)
        .join() === 'staying',
  )
  const status = registrar.status()
  assert.deepEqual([status.completed, status.failed, status.inFlight], [1, 1, 0])
  assert.deepEqual(mcpd.violations, [])
})

test('a failed update register is retried with backoff; the old set stays published until one succeeds', {
  skip,
}, async (t) => {
  const mcpd = await startMcpd(t)
  const first = recordingProvider()
  // The checks below run while the third register waits out its backoff: emulated
  // (scripts/test-arm64.sh) they need longer than the default 100 ms.
  const backoff = { initialMs: scaledMs(50), maxMs: scaledMs(200) }
  const { registrar } = await startRegistrar(t, mcpd, { first }, { backoff })
  const id = registrar.status().providerSessionId
  const before = mcpd.registrations.length
  // Two registers refused, then a third one refused too but held unanswered until the
  // checks below are done: the retries cannot race the checks, however loaded the machine.
  let release
  const held = new Promise((resolve) => {
    release = resolve
  })
  mcpd.failNext('register', { status: 503, times: 2 })
  mcpd.failNext('register', { status: 503, until: held })
  let settled = false
  const updating = registrar.update([entry('first', first), entry('second', recordingProvider())])
  updating.finally(() => {
    settled = true
  })
  await mcpd.waitFor(() => mcpd.registrations.length >= before + 3)
  // Meanwhile: the old set published and served, the failure reported, update() waiting.
  assert.deepEqual(await llmStates(mcpd), { first: 'active' })
  assert.deepEqual(registrar.status().providers, ['first'])
  assert.equal(registrar.status().state, 'connected')
  assert.match(registrar.status().lastError, /503/)
  assert.equal(settled, false)
  const answer = await openai(mcpd).chat.completions.create({
    model: 'first',
    messages: [{ role: 'user', content: 'hi' }],
  })
  assert.equal(answer.choices[0].message.content, 'hello from the provider')
  release()
  await updating
  assert.equal(mcpd.registrations.length, before + 4)
  for (const { body } of mcpd.registrations.slice(before)) {
    assert.equal(body.providerSessionId, id)
    assert.deepEqual(
      body.providers.map((p) => p.name),
      ['first', 'second'],
    )
  }
  assert.deepEqual(await llmStates(mcpd), { first: 'active', second: 'active' })
  assert.deepEqual(registrar.status().providers, ['first', 'second'])
  assert.equal(mcpd.connections.length, 1, 'the channel stayed open through the retries')
})

test('update() rejects only for bad input (ERR_INVALID_OPTION) or after stop() (ERR_STOPPED)', { skip }, async (t) => {
  const mcpd = await startMcpd(t)
  const first = recordingProvider()
  const { registrar } = await startRegistrar(t, mcpd, { first })
  const before = mcpd.registrations.length
  const cases = [
    [undefined, /providers must be a non-empty array/],
    [[], /providers must be a non-empty array/],
    [[entry('first', first, { modle: 'x' })], /did you mean `providers\[0\].model`\?/],
    [[entry('first', first), entry('first', first)], /listed twice/],
    [[{ name: 'x', type: 't', provider: {} }], /provider.complete must be a function/],
    [[entry('first', first, { publish: false })], /at least one provider/],
    ['first', /providers must be a non-empty array/],
    [[entry('first', first), null], /providers\[1\] must be an object/],
  ]
  for (const [providers, pattern] of cases) {
    await assert.rejects(registrar.update(providers), (error) => {
      assert.ok(error instanceof RegistrarError)
      assert.equal(error.code, 'ERR_INVALID_OPTION')
      assert.match(error.message, pattern)
      return true
    })
  }
  assert.equal(mcpd.registrations.length, before, 'bad input registers nothing')
  // Nothing of a rejected set was taken, not even its valid entries' providers.
  const impostor = recordingProvider(() => ({ content: 'impostor' }))
  await assert.rejects(registrar.update([entry('first', impostor), entry('bad', {})]), { code: 'ERR_INVALID_OPTION' })
  const served = await mcpd.outcome(mcpd.sendTask({ provider: 'first', body: chatBody({ model: 'first' }) }))
  assert.equal(served.body.choices[0].message.content, 'hello from the provider')
  assert.equal(impostor.calls.length, 0)
  await registrar.stop()
  await assert.rejects(registrar.update([entry('first', first)]), { name: 'RegistrarError', code: 'ERR_STOPPED' })
})

test('update() before start() replaces the set that start() registers, and resolves at once', { skip }, async (t) => {
  const mcpd = await startMcpd(t)
  const configDir = await tempConfigDir(t)
  const replaced = recordingProvider(() => ({ content: 'replaced' }))
  const wanted = recordingProvider(() => ({ content: 'wanted' }))
  const registrar = new VirtualLlmRegistrar({
    mcpdUrl: mcpd.url,
    token: TOKEN,
    configDir,
    logger: captureLogger(),
    providers: [entry('replaced', replaced)],
  })
  t.after(() => registrar.stop())
  await registrar.update([entry('wanted', wanted)])
  assert.equal(mcpd.registrations.length, 0, 'nothing is sent before start()')
  assert.deepEqual(registrar.status().providers, ['wanted'])
  assert.equal(registrar.status().state, 'idle')
  await registrar.start()
  assert.equal(mcpd.registrations.length, 1)
  assert.deepEqual(
    mcpd.registrations[0].body.providers.map((p) => p.name),
    ['wanted'],
  )
  const done = await mcpd.outcome(mcpd.sendTask({ provider: 'wanted', body: chatBody({ model: 'wanted' }) }))
  assert.equal(done.body.choices[0].message.content, 'wanted')
  assert.equal(replaced.calls.length, 0)
})

test('concurrent updates: the last set wins and every caller resolves', { skip }, async (t) => {
  const mcpd = await startMcpd(t)
  const a = recordingProvider()
  const { registrar } = await startRegistrar(t, mcpd, { a })
  mcpd.delay('register', 100)
  const first = registrar.update([entry('a', a), entry('b', recordingProvider())])
  const second = registrar.update([entry('a', a), entry('c', recordingProvider())])
  await Promise.all([first, second])
  assert.deepEqual(registrar.status().providers, ['a', 'c'])
  assert.deepEqual(
    mcpd.registrations.at(-1).body.providers.map((p) => p.name),
    ['a', 'c'],
  )
  const states = await llmStates(mcpd)
  assert.equal(states.a, 'active')
  assert.equal(states.c, 'active')
  assert.notEqual(states.b, 'active')
})

test('stop() while update() waits for mcpd rejects it with ERR_STOPPED', { skip }, async (t) => {
  const mcpd = await startMcpd(t)
  const first = recordingProvider()
  const { registrar } = await startRegistrar(t, mcpd, { first })
  const before = mcpd.registrations.length
  mcpd.failNext('register', { status: 503, times: 1000 })
  const updating = registrar.update([entry('first', first), entry('second', recordingProvider())])
  const rejected = assert.rejects(updating, (error) => {
    assert.ok(error instanceof RegistrarError)
    assert.equal(error.code, 'ERR_STOPPED')
    return true
  })
  await mcpd.waitFor(() => mcpd.registrations.length > before)
  await registrar.stop()
  await rejected
  assert.deepEqual(registrar.status().providers, ['first'])
})

test('the boot hook returns the registrar, and update() on it publishes a new set', { skip }, async (t) => {
  const mcpd = await startMcpd(t)
  const configDir = await tempConfigDir(t)
  const local = recordingProvider(() => ({ content: 'local' }))
  const extra = recordingProvider(() => ({ content: 'extra' }))
  const registry = new Map([
    ['local', local],
    ['extra', extra],
  ])
  const registrar = await maybeStartVirtualLlmRegistrar({
    providers: [
      { name: 'local', type: 'ollama', publish: true },
      { name: 'extra', type: 'ollama' },
    ],
    registry,
    mcpdUrl: mcpd.url,
    token: TOKEN,
    configDir,
    logger: captureLogger(),
  })
  assert.ok(registrar instanceof VirtualLlmRegistrar)
  t.after(() => registrar.stop())
  await mcpd.waitFor(() => registrar.status().state === 'connected')
  await registrar.update([
    { name: 'local', type: 'ollama', publish: true, provider: registry.get('local') },
    { name: 'extra', type: 'ollama', publish: true, provider: registry.get('extra') },
  ])
  assert.deepEqual(await modelIds(mcpd), ['extra', 'local'])
  const answer = await openai(mcpd).chat.completions.create({
    model: 'extra',
    messages: [{ role: 'user', content: 'hi' }],
  })
  assert.equal(answer.choices[0].message.content, 'extra')
})

test('a pino logger at info sees the state changes, the set change, and each task with provider, status and durationMs', {
  skip,
}, async (t) => {
  const mcpd = await startMcpd(t)
  const { lines, logger } = pinoCapture('info')
  const previous = process.env.MCPCTL_LOG
  delete process.env.MCPCTL_LOG
  t.after(() => {
    if (previous !== undefined) process.env.MCPCTL_LOG = previous
  })
  const first = recordingProvider()
  const { registrar } = await startRegistrar(t, mcpd, { first }, { logger })
  await registrar.update([
    entry('first', first),
    entry(
      'second',
      recordingProvider(() => {
        throw new Error('backend down')
      }),
    ),
  ])
  const ok = mcpd.sendTask({ provider: 'first', body: chatBody({ model: 'first' }) })
  const failed = mcpd.sendTask({ provider: 'second', body: chatBody({ model: 'second' }) })
  assert.equal((await mcpd.outcome(ok)).status, 200)
  assert.equal((await mcpd.outcome(failed)).status, 502)
  await mcpd.waitFor(() => lines.filter((line) => line.msg === 'task answered').length === 2)
  await registrar.stop()
  // The 'stopped' line is logged before stop() resolves, but it reaches JavaScript through
  // the logger's threadsafe function, which need not run before the promise's settlement.
  await mcpd.waitFor(() => lines.some((line) => line.msg === 'state changed' && line.state === 'stopped'))

  const connected = lines.find((line) => line.msg === 'state changed' && line.state === 'connected')
  assert.ok(connected, JSON.stringify(lines))
  assert.equal(connected.level, 30)
  const stopped = lines.find((line) => line.msg === 'state changed' && line.state === 'stopped')
  assert.equal(stopped?.level, 30)
  const changed = lines.find((line) => line.msg === 'published set changed')
  assert.equal(changed?.providers, 'first, second')
  for (const [taskId, provider, status] of [
    [ok, 'first', 200],
    [failed, 'second', 502],
  ]) {
    const answered = lines.find((line) => line.msg === 'task answered' && line.taskId === taskId)
    assert.ok(answered, `no 'task answered' line for ${taskId}`)
    assert.equal(answered.level, 30)
    assert.equal(answered.provider, provider)
    assert.equal(answered.status, status)
    assert.equal(typeof answered.durationMs, 'number')
  }
  const providerError = lines.find((line) => line.msg === 'provider failed')
  assert.equal(providerError?.provider, 'second')
  assert.equal(providerError?.taskId, failed)
  assert.ok(!JSON.stringify(lines).includes(TOKEN))
})

// The owner's controls as JavaScript sees them (issue 16): `allowCallers` and
// `limits` checked as options, and the shapes of pause(), resume(), usage() and
// status().paused. The refusals end to end through the official openai client are
// in owner-e2e.test.mjs.

import assert from 'node:assert/strict'
import test from 'node:test'
import {
  addon,
  captureLogger,
  chatBody,
  recordingProvider,
  startMcpd,
  startRegistrar,
  TOKEN,
  tempConfigDir,
} from './helpers.mjs'

const { VirtualLlmRegistrar, RegistrarError, maybeStartVirtualLlmRegistrar } = addon

const REASONS = [
  'caller_not_allowed',
  'requests_per_minute',
  'tokens_per_minute',
  'tokens_per_day',
  'max_tokens_exceeded',
  'request_too_large',
  'provider_paused',
  'queue_full',
]

const provider = () => ({
  async complete() {
    return { content: 'hi' }
  },
})

async function options(t, entry = {}) {
  return {
    mcpdUrl: 'http://127.0.0.1:9',
    token: TOKEN,
    configDir: await tempConfigDir(t),
    logger: captureLogger(),
    providers: [{ name: 'local', type: 'ollama', provider: provider(), ...entry }],
  }
}

/** Asserts that `run()` throws or rejects with a RegistrarError `code` whose message matches. */
async function refused(run, code, message) {
  let caught
  try {
    await run()
  } catch (error) {
    caught = error
  }
  assert.ok(caught instanceof RegistrarError, `not a RegistrarError: ${caught}`)
  assert.equal(caught.code, code, caught.message)
  assert.match(caught.message, message)
  return caught
}

test('a bad limits or allowCallers value is ERR_INVALID_OPTION naming the field', async (t) => {
  const cases = [
    [{ limits: { requestsPerMinute: 0 } }, /providers\[0\]\.limits\.requestsPerMinute must be a positive integer/],
    [{ limits: { tokensPerDay: -5 } }, /limits\.tokensPerDay must be a positive integer/],
    [{ limits: { maxOutputTokens: 1.5 } }, /limits\.maxOutputTokens must be a positive integer/],
    [{ limits: { maxRequestBytes: '1000' } }, /limits\.maxRequestBytes must be a number/],
    [{ limits: { tokensPerMinute: Number.NaN } }, /limits\.tokensPerMinute must be a finite number/],
    [
      { limits: { perCaller: { requestsPerMinute: 0 } } },
      /limits\.perCaller\.requestsPerMinute must be a positive integer/,
    ],
    [
      { limits: { requestPerMinute: 5 } },
      /unknown option `providers\[0\]\.limits\.requestPerMinute`: did you mean `providers\[0\]\.limits\.requestsPerMinute`/,
    ],
    [{ limits: { perCaller: { tokensPerDays: 5 } } }, /did you mean `providers\[0\]\.limits\.perCaller\.tokensPerDay`/],
    [
      { limits: { perCaller: { maxOutputTokens: 5 } } },
      /unknown option `providers\[0\]\.limits\.perCaller\.maxOutputTokens`/,
    ],
    [{ limits: 5 }, /limits must be an object/],
    [{ allowCallers: 'alice' }, /allowCallers must be an array of strings/],
    [{ allowCallers: ['alice', ''] }, /allowCallers\[1\] must be a non-empty string/],
    [{ allowCallers: ['alice', 7] }, /allowCallers\[1\] must be a string/],
    [{ allowCaller: ['alice'] }, /did you mean `providers\[0\]\.allowCallers`/],
  ]
  for (const [entry, message] of cases) {
    const given = await options(t, entry)
    await refused(() => new VirtualLlmRegistrar(given), 'ERR_INVALID_OPTION', message)
  }
  // Good values are taken, an empty allowCallers too (it refuses everyone).
  const good = await options(t, {
    allowCallers: [],
    limits: {
      maxOutputTokens: 512,
      maxRequestBytes: 65536,
      requestsPerMinute: 60,
      tokensPerMinute: 10_000,
      tokensPerDay: 1_000_000,
      perCaller: { requestsPerMinute: 10, tokensPerMinute: 2000, tokensPerDay: 100_000 },
    },
  })
  const registrar = new VirtualLlmRegistrar(good)
  await registrar.stop()
})

test('update() with a bad limit changes nothing; a good one is taken', async (t) => {
  const mcpd = await startMcpd(t)
  const { registrar } = await startRegistrar(t, mcpd, { local: recordingProvider() })
  const registers = mcpd.registers?.length
  const entry = (limits) => ({ name: 'local', type: 'test', provider: provider(), limits })
  await refused(
    () => registrar.update([entry({ requestsPerMinute: -1 })]),
    'ERR_INVALID_OPTION',
    /providers\[0\]\.limits\.requestsPerMinute/,
  )
  if (registers !== undefined) assert.equal(mcpd.registers.length, registers, 'nothing was registered')
  assert.deepEqual(registrar.status().providers, ['local'])
  await registrar.update([entry({ requestsPerMinute: 1 })])
  assert.deepEqual(registrar.status().providers, ['local'])
})

test('the boot hook leaves out an entry with bad limits, with a warn; never publishes it without them', async (t) => {
  const mcpd = await startMcpd(t)
  const logger = captureLogger()
  const registrar = await maybeStartVirtualLlmRegistrar({
    mcpdUrl: mcpd.url,
    token: TOKEN,
    configDir: await tempConfigDir(t),
    logger,
    providers: [
      { name: 'bad', type: 't', publish: true, limits: { tokensPerDay: 0 } },
      { name: 'good', type: 't', publish: true, allowCallers: ['ml-team'] },
    ],
    registry: new Map([
      ['bad', provider()],
      ['good', provider()],
    ]),
  })
  t.after(() => registrar?.stop())
  assert.ok(registrar)
  assert.deepEqual(registrar.status().providers, ['good'])
  const warn = logger.lines.find((line) => line.level === 'warn' && JSON.stringify(line).includes('tokensPerDay'))
  assert.ok(warn, JSON.stringify(logger.lines))

  const alone = captureLogger()
  const none = await maybeStartVirtualLlmRegistrar({
    mcpdUrl: mcpd.url,
    token: TOKEN,
    configDir: await tempConfigDir(t),
    logger: alone,
    providers: [{ name: 'bad', type: 't', publish: true, allowCallers: [''] }],
    registry: new Map([['bad', provider()]]),
  })
  assert.equal(none, null)
  assert.ok(alone.lines.some((line) => line.level === 'warn' && JSON.stringify(line).includes('allowCallers[0]')))
})

test('pause() and resume(): status().paused, the heartbeat at once, 503 provider_paused, unknown names refused', async (t) => {
  const mcpd = await startMcpd(t)
  const local = recordingProvider()
  const { registrar } = await startRegistrar(t, mcpd, { local, other: recordingProvider() })
  assert.deepEqual(registrar.status().paused, [])

  const beats = mcpd.heartbeats.length
  await registrar.pause({ provider: 'local' })
  assert.deepEqual(registrar.status().paused, ['local'])
  // heartbeatIntervalMs is 60 s here: this beat is the one pause() sends at once.
  await mcpd.waitFor(() => mcpd.heartbeats.length > beats)
  const beat = mcpd.heartbeats.at(-1).body.providers
  assert.equal(beat.find((p) => p.name === 'local').paused, true)
  assert.equal(beat.find((p) => p.name === 'other').paused, undefined)

  const taskId = mcpd.sendTask({ provider: 'local', body: chatBody() })
  const outcome = await mcpd.outcome(taskId)
  assert.equal(outcome.status, 503)
  assert.deepEqual(outcome.body.error, {
    message: "the model 'local' is paused by its owner",
    type: 'unavailable',
    code: 'provider_paused',
  })
  assert.equal(local.calls.length, 0)

  await refused(() => registrar.pause({ provider: 'nope' }), 'ERR_INVALID_OPTION', /provider 'nope' is not published/)
  await refused(() => registrar.pause({ provder: 'local' }), 'ERR_INVALID_OPTION', /did you mean `provider`/)
  await refused(() => registrar.pause('local'), 'ERR_INVALID_OPTION', /options object/)
  assert.throws(
    () => registrar.resume({ provider: 'nope' }),
    (error) => error.code === 'ERR_INVALID_OPTION',
  )

  // A whole pause covers everyone; resume({ provider }) does not lift it.
  await registrar.pause()
  assert.deepEqual(registrar.status().paused, ['local', 'other'])
  registrar.resume({ provider: 'local' })
  assert.deepEqual(registrar.status().paused, ['local', 'other'])
  registrar.resume()
  assert.deepEqual(registrar.status().paused, [])
  // resume() wakes the heartbeat at once; a beat the pauses above sent may land just before
  // it (beats never overlap), so wait for the newest beat to say no provider is paused.
  await mcpd.waitFor(() => mcpd.heartbeats.at(-1)?.body.providers.every((p) => p.paused === undefined))

  const after = mcpd.sendTask({ provider: 'local', body: chatBody() })
  assert.equal((await mcpd.outcome(after)).status, 200)
  assert.equal(await registrar.pause({ drain: true }), undefined, 'nothing admitted: resolves at once')
  await registrar.stop()
  await refused(() => registrar.pause(), 'ERR_STOPPED', /stopped/)
})

test('usage(): since as ISO time, every reason per provider, callers by id', async (t) => {
  const mcpd = await startMcpd(t)
  const before = Date.now()
  const { registrar } = await startRegistrar(t, mcpd, { local: recordingProvider() })
  const empty = registrar.usage()
  assert.deepEqual(Object.keys(empty).sort(), ['callers', 'providers', 'since'])
  assert.equal(new Date(empty.since).toISOString(), empty.since)
  assert.ok(Date.parse(empty.since) <= Date.now() && Date.parse(empty.since) >= before - 1000)
  assert.deepEqual(empty.callers, {})

  const ran = mcpd.sendTask({ provider: 'local', body: chatBody() })
  assert.equal((await mcpd.outcome(ran)).status, 200)
  await registrar.pause({ provider: 'local' })
  const paused = mcpd.sendTask({ provider: 'local', body: chatBody() })
  assert.equal((await mcpd.outcome(paused)).status, 503)
  // The task that ran is booked once its result POST is answered, which can come
  // after the paused one's refusal: wait for both.
  await mcpd.waitFor(() => {
    const local = registrar.usage().providers.local
    return local?.refused.provider_paused === 1 && local.tasks === 1
  })
  const usage = registrar.usage().providers.local
  assert.deepEqual(
    { ...usage, refused: undefined },
    // recordingProvider reports usage { promptTokens: 3, completionTokens: 4 }.
    { tasks: 1, promptTokens: 3, completionTokens: 4, refused: undefined },
  )
  assert.deepEqual(Object.keys(usage.refused).sort(), [...REASONS].sort())
  assert.equal(
    Object.values(usage.refused).reduce((a, b) => a + b),
    1,
  )
  assert.equal(registrar.status().failed, 1, 'a refused task counts as failed')
})

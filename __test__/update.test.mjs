// update(providers): a new set published without a restart (API.md; PROTOCOL.md
// section 1, "Changing the set"). Skipped while the addon has no update() (the
// core's half of issue 9 part 5).
import test from 'node:test'
import assert from 'node:assert/strict'
import OpenAI from 'openai'
import { addon, startMcpd, startRegistrar, recordingProvider, chatBody, TOKEN } from './helpers.mjs'

const { VirtualLlmRegistrar, RegistrarError } = addon
const skip = typeof VirtualLlmRegistrar.prototype.update === 'function' ? false : 'update() is not in the addon yet'

const entry = (name, provider, extra = {}) => ({ name, type: 'test', model: `${name}-model`, provider, ...extra })
const openai = (mcpd) => new OpenAI({ baseURL: `${mcpd.url}/v1`, apiKey: TOKEN, maxRetries: 0, timeout: 10000 })
const modelIds = async (mcpd) => (await openai(mcpd).models.list()).data.map((m) => m.id).sort()
async function llmStates (mcpd) {
  const { llms } = await (await fetch(`${mcpd.url}/api/v1/llms`, { headers: { authorization: `Bearer ${TOKEN}` } })).json()
  return Object.fromEntries(llms.map((l) => [l.name, l.status]))
}

test('update() adds a provider: same session id, the whole set registered, /v1/models shows it, tasks reach it', { skip }, async (t) => {
  const mcpd = await startMcpd(t)
  const first = recordingProvider(() => ({ content: 'from first' }))
  const { registrar } = await startRegistrar(t, mcpd, { first }, { heartbeatIntervalMs: 100 })
  const id = registrar.status().providerSessionId
  assert.deepEqual(await modelIds(mcpd), ['first'])

  const second = recordingProvider(() => ({ content: 'from second' }))
  await registrar.update([entry('first', first), entry('second', second)])
  const last = mcpd.registrations.at(-1).body
  assert.equal(last.providerSessionId, id)
  assert.deepEqual(last.providers.map((p) => p.name), ['first', 'second'])
  assert.equal(registrar.status().providerSessionId, id)
  assert.deepEqual(registrar.status().providers, ['first', 'second'])
  assert.deepEqual(await modelIds(mcpd), ['first', 'second'])

  const answer = await openai(mcpd).chat.completions.create({ model: 'second', messages: [{ role: 'user', content: 'hi' }] })
  assert.equal(answer.choices[0].message.content, 'from second')
  assert.equal(second.calls[0].model, 'second-model')
  // The heartbeat reports the new set from then on.
  await mcpd.waitFor(() => mcpd.heartbeats.some((h) => h.at > mcpd.registrations.at(-1).at && h.body.providers.length === 2))
  assert.equal(mcpd.connections.length, 1, 'the channel stayed open')
  assert.deepEqual(mcpd.violations, [])
})

test('update() removes a provider: its task in flight runs to its end; a later one is 404 model_not_found', { skip }, async (t) => {
  const mcpd = await startMcpd(t)
  let release
  const gate = new Promise((resolve) => { release = resolve })
  const leaving = { calls: 0, async complete () { this.calls++; await gate; return { content: 'finished anyway' } } }
  const staying = recordingProvider(() => ({ content: 'still here' }))
  const { registrar } = await startRegistrar(t, mcpd, { leaving, staying })
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
  await assert.rejects(openai(mcpd).chat.completions.create({ model: 'leaving', messages: [{ role: 'user', content: 'hi' }] }), (error) => error.status === 404)
  assert.deepEqual(mcpd.violations, [])
})

test('a failed update register is retried with backoff; the old set stays published until one succeeds', { skip }, async (t) => {
  const mcpd = await startMcpd(t)
  const first = recordingProvider()
  const { registrar } = await startRegistrar(t, mcpd, { first })
  const before = mcpd.registrations.length
  mcpd.failNext('register', { status: 503, times: 2 })
  const updating = registrar.update([entry('first', first), entry('second', recordingProvider())])
  await mcpd.waitFor(() => mcpd.registrations.length >= before + 2)
  assert.deepEqual(await llmStates(mcpd), { first: 'active' })
  const answer = await openai(mcpd).chat.completions.create({ model: 'first', messages: [{ role: 'user', content: 'hi' }] })
  assert.equal(answer.choices[0].message.content, 'hello from the provider')
  await updating
  assert.equal(mcpd.registrations.length, before + 3)
  assert.deepEqual(await llmStates(mcpd), { first: 'active', second: 'active' })
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
  await registrar.stop()
  await assert.rejects(registrar.update([entry('first', first)]), { name: 'RegistrarError', code: 'ERR_STOPPED' })
})

// The bench's plain-Node peer (bench/plain-registrar.mjs) is held to the protocol checks the
// addon meets where they apply: testing/fake-mcpd.js's `violations` (the wire), the official
// openai client's parsers, and payload bytes identical to the addon's. Its speed ratios are
// only worth something if it does the same job correctly.

import assert from 'node:assert/strict'
import test from 'node:test'
import { PlainRegistrar } from '../bench/plain-registrar.mjs'
import { startMcpd, startRegistrar, TOKEN } from './helpers.mjs'
import { OpenAI, openAiClient, parkedProvider, streamingProvider, tokenChunks } from './providers.mjs'

const messages = [{ role: 'user', content: 'Say hello' }]

/** Starts the peer against `mcpd` publishing `providers` ({ name: LlmProvider }); stopped when the test ends. */
async function startPeer(t, mcpd, providers) {
  const peer = new PlainRegistrar({
    mcpdUrl: mcpd.url,
    token: TOKEN,
    providers: Object.entries(providers).map(([name, provider]) => ({
      name,
      type: 'test',
      model: `${name}-model`,
      provider,
    })),
  })
  t.after(() => peer.stop())
  await peer.start()
  await mcpd.waitFor(() => mcpd.connections.some((c) => c.closedAt === null && c.status === 200))
  return peer
}

const choicesOf = (chunks) => chunks.flatMap((chunk) => chunk.choices)

test('bench peer: non-streaming create() through the official client, and a heartbeat, without violations', async (t) => {
  const mcpd = await startMcpd(t, { heartbeatIntervalMs: 50 })
  await startPeer(t, mcpd, {
    local: {
      complete: async (options) => ({
        content: `echo ${options.messages[0].content} ${options.maxTokens}`,
        finishReason: 'end_turn',
        usage: { promptTokens: 4, completionTokens: 2 },
      }),
    },
  })
  const completion = await openAiClient(mcpd).chat.completions.create({ model: 'local', messages, max_tokens: 9 })
  assert.equal(completion.object, 'chat.completion')
  assert.ok(Number.isInteger(completion.created))
  assert.deepEqual(completion.choices[0].message, { role: 'assistant', content: 'echo Say hello 9', refusal: null })
  assert.equal(completion.choices[0].finish_reason, 'stop')
  assert.deepEqual(completion.usage, { prompt_tokens: 4, completion_tokens: 2, total_tokens: 6 })
  await mcpd.waitFor(() => mcpd.heartbeats.length > 0)
  assert.deepEqual(
    mcpd.heartbeats[0].body.providers.map((p) => p.name),
    ['local'],
  )
  assert.deepEqual(mcpd.violations, [])
})

test('bench peer: a long stream with awkward text comes out whole, in order, in several POSTs, one finish_reason', async (t) => {
  const mcpd = await startMcpd(t)
  // More than two POSTs' 4,096 payloads, and text that needs escaping (twice) on the wire.
  const tokens = Array.from({ length: 9000 }, (_, i) => (i % 7 === 0 ? `"q\\${i}\n\t€😀` : `tok${i} `))
  await startPeer(t, mcpd, { local: streamingProvider(tokenChunks(tokens)) })
  // Held chunk POSTs: while one is held the peer fills the next body to its cap (the
  // addon's rule, src/dispatch/relay.rs), which then goes whole.
  mcpd.delay('chunks', 300)
  const stream = await openAiClient(mcpd).chat.completions.create({ model: 'local', messages, stream: true })
  const chunks = []
  for await (const chunk of stream) chunks.push(chunk)
  const choices = choicesOf(chunks)
  assert.equal(choices[0].delta.role, 'assistant')
  assert.equal(choices.filter((choice) => 'role' in choice.delta).length, 1)
  assert.deepEqual(choices.map((choice) => choice.delta.content).filter(Boolean), tokens)
  assert.deepEqual(
    choices.filter((choice) => choice.finish_reason != null).map((choice) => choice.finish_reason),
    ['stop'],
  )
  const [taskId] = [
    ...new Set(mcpd.requests.map((r) => /_provider-tasks\/([^/]+)\/chunks$/.exec(r.path)?.[1]).filter(Boolean)),
  ]
  const posts = mcpd.chunkPosts(decodeURIComponent(taskId))
  assert.ok(posts.length >= 3, `${posts.length} chunk POSTs`)
  const sizes = posts.map((post) => post.chunks.length)
  assert.equal(Math.max(...sizes), 4096, `payloads per POST: ${sizes}`)
  assert.deepEqual(mcpd.violations, [])
})

test('bench peer: stream helpers accept complete()-only, tool-call and include_usage streams', async (t) => {
  const mcpd = await startMcpd(t)
  await startPeer(t, mcpd, {
    v1: { complete: async () => ({ content: 'All at once.', finishReason: 'stop' }) },
    tools: streamingProvider([
      { toolCalls: [{ index: 0, id: 'call_w', function: { name: 'get_weather', arguments: '' } }] },
      { toolCalls: [{ index: 0, function: { arguments: '{"city":' } }] },
      { toolCalls: [{ index: 0, function: { arguments: '"Paris"}' } }] },
      { finishReason: 'tool_use' },
    ]),
    usage: streamingProvider(tokenChunks(['Count', 'ed'], { usage: { promptTokens: 5, completionTokens: 2 } })),
  })
  const client = openAiClient(mcpd)
  const final = (params) => client.chat.completions.stream({ messages, ...params }).finalChatCompletion()

  const v1 = await final({ model: 'v1' })
  assert.equal(v1.choices[0].message.content, 'All at once.')
  const tools = await final({ model: 'tools' })
  assert.deepEqual(
    tools.choices[0].message.tool_calls.map(({ id, function: f }) => [id, f.name, f.arguments]),
    [['call_w', 'get_weather', '{"city":"Paris"}']],
  )
  assert.equal(tools.choices[0].finish_reason, 'tool_calls')
  const usage = await final({ model: 'usage', stream_options: { include_usage: true } })
  assert.equal(usage.choices[0].message.content, 'Counted')
  assert.deepEqual(usage.usage, { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7 })
  assert.deepEqual(mcpd.violations, [])
})

test('bench peer: provider errors are a 502 before the first chunk, in-band after it; a cancel is not answered', async (t) => {
  const mcpd = await startMcpd(t)
  const parked = parkedProvider()
  await startPeer(t, mcpd, {
    rejects: {
      complete: async () => {
        throw new Error('ollama is not running')
      },
    },
    later: {
      async *stream() {
        yield { content: 'partial' }
        throw new Error('the model crashed')
      },
    },
    parked,
  })
  await assert.rejects(openAiClient(mcpd).chat.completions.create({ model: 'rejects', messages }), (error) => {
    assert.ok(error instanceof OpenAI.APIError)
    assert.equal(error.status, 502)
    assert.match(error.message, /ollama is not running/)
    return true
  })
  const body = (model) => ({ model, messages, stream: true })
  const late = mcpd.sendTask({ provider: 'later', stream: true, body: body('later') })
  const outcome = await mcpd.outcome(late)
  assert.equal(outcome.kind, 'stream')
  const errors = outcome.payloads.filter((p) => p.includes('"error"')).map((p) => JSON.parse(p).error)
  assert.deepEqual(errors, [{ code: null, message: 'the model crashed', type: 'provider_error' }])
  assert.equal(outcome.payloads.at(-1), '[DONE]')

  const cancelled = mcpd.sendTask({ provider: 'parked', stream: true, body: body('parked') })
  await mcpd.waitFor(() => parked.calls.length === 1)
  await mcpd.waitFor(() => mcpd.chunkPosts(cancelled).length > 0)
  mcpd.cancel(cancelled)
  await parked.aborts[0]
  await mcpd.waitFor(() => parked.finalized === 1)
  assert.deepEqual(mcpd.violations, [])
})

test("bench peer: its payloads are the addon's bytes", async (t) => {
  const chunks = [
    ...tokenChunks(['a', '"b"\n', '€😀'], { finishReason: 'length', usage: { promptTokens: 1, completionTokens: 3 } }),
  ]
  chunks.splice(2, 0, { toolCalls: [{ index: 0, id: 'c1', function: { name: 'f', arguments: '{"x":' } }] })
  chunks.splice(3, 0, { content: 'x', toolCalls: [{ index: 0, function: { arguments: '1}' } }] })
  const payloadsOf = async (start) => {
    const mcpd = await startMcpd(t)
    await start(mcpd, { local: streamingProvider(chunks) })
    const taskId = mcpd.sendTask({
      provider: 'local',
      stream: true,
      taskId: 'same-task',
      body: { model: 'local', messages, stream: true, stream_options: { include_usage: true } },
    })
    const outcome = await mcpd.outcome(taskId)
    assert.deepEqual(mcpd.violations, [])
    // `created` is the second the task started: the one field that may differ.
    return outcome.payloads.map((payload) => payload.replace(/"created":\d+/, '"created":0'))
  }
  const addon = await payloadsOf((mcpd, providers) => startRegistrar(t, mcpd, providers))
  const peer = await payloadsOf((mcpd, providers) => startPeer(t, mcpd, providers))
  assert.deepEqual(peer, addon)
})

// The official `openai` client against the fake mcpd's OpenAI front, with a registrar
// serving JS providers behind it: what an mcpd user sees of a published provider.

import assert from 'node:assert/strict'
import test from 'node:test'
import { recordingProvider, scaledMs, startMcpd, startRegistrar } from './helpers.mjs'
import { answeredTaskIds, OpenAI, openAiClient, parkedProvider, streamingProvider, tokenChunks } from './providers.mjs'

const messages = [
  { role: 'system', content: 'Be brief.' },
  { role: 'user', content: 'Say hello' },
]
const weatherTool = {
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'The weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  },
}

/** Every chunk's choices flattened, for assertions on deltas and finish reasons. */
const choicesOf = (chunks) => chunks.flatMap((chunk) => chunk.choices)

test('create() non-streaming: content, snake_case usage, integer created; the provider gets camelCase options', async (t) => {
  const mcpd = await startMcpd(t)
  const provider = recordingProvider(() => ({
    content: 'Hello there!',
    finishReason: 'stop',
    usage: { promptTokens: 11, completionTokens: 3 },
  }))
  const { registrar } = await startRegistrar(t, mcpd, { local: provider })
  const client = openAiClient(mcpd)

  const params = {
    model: 'local',
    messages,
    max_tokens: 12,
    stop: 'END',
    temperature: 0.2,
    top_p: 0.5,
    seed: 7,
    tools: [weatherTool],
    tool_choice: { type: 'function', function: { name: 'get_weather' } },
    response_format: { type: 'json_object' },
  }
  const completion = await client.chat.completions.create(params)
  assert.equal(completion.object, 'chat.completion')
  assert.equal(typeof completion.id, 'string')
  assert.ok(Number.isInteger(completion.created), `created ${completion.created}`)
  assert.ok(Math.abs(completion.created - Date.now() / 1000) < 60, 'created is seconds, not milliseconds')
  assert.equal(completion.model, 'local')
  assert.equal(completion.choices.length, 1)
  assert.deepEqual(completion.choices[0].message, { role: 'assistant', content: 'Hello there!', refusal: null })
  assert.equal(completion.choices[0].finish_reason, 'stop')
  assert.equal(completion.choices[0].index, 0)
  assert.deepEqual(completion.usage, { prompt_tokens: 11, completion_tokens: 3, total_tokens: 14 })

  const [options] = provider.calls
  assert.deepEqual(options.messages, messages)
  // index.d.ts CompletionOptions.model: the entry's configured model, never the virtual LLM's name (kept in request.model).
  assert.equal(options.model, 'local-model')
  assert.equal(options.request.model, 'local')
  assert.equal(options.maxTokens, 12)
  assert.deepEqual(options.stop, ['END'])
  assert.equal(options.temperature, 0.2)
  assert.equal(options.topP, 0.5)
  assert.equal(options.seed, 7)
  assert.deepEqual(options.tools, [weatherTool])
  assert.deepEqual(options.toolChoice, { type: 'function', function: { name: 'get_weather' } })
  assert.deepEqual(options.responseFormat, { type: 'json_object' })
  assert.deepEqual(options.request, params, 'request is the body exactly as the client sent it')
  assert.ok(options.signal instanceof AbortSignal)
  assert.equal(options.signal.aborted, false)
  for (const snake of ['max_tokens', 'top_p', 'tool_choice', 'response_format']) {
    assert.equal(snake in options, false, `${snake} is not passed through as an option`)
  }

  // max_completion_tokens (the newer name) also becomes maxTokens; an array stop stays an array.
  const second = {
    model: 'local',
    messages,
    max_completion_tokens: 33,
    stop: ['a', 'b'],
    tools: [weatherTool],
    tool_choice: 'required',
  }
  await client.chat.completions.create(second)
  assert.equal(provider.calls[1].maxTokens, 33)
  assert.deepEqual(provider.calls[1].stop, ['a', 'b'])
  assert.equal(provider.calls[1].toolChoice, 'required')
  assert.deepEqual(provider.calls[1].request, second)
  assert.equal(provider.calls[1].responseFormat, undefined)
  await mcpd.waitFor(() => registrar.status().completed === 2)
  assert.deepEqual(mcpd.violations, [])
})

test('create({ stream: true }) iterated: role first, text deltas in order, exactly one finish_reason', async (t) => {
  const mcpd = await startMcpd(t)
  const tokens = ['Hel', 'lo', ', wor', 'ld', '!']
  const provider = streamingProvider(tokenChunks(tokens))
  await startRegistrar(t, mcpd, { local: provider })

  const stream = await openAiClient(mcpd).chat.completions.create({ model: 'local', messages, stream: true })
  const chunks = []
  for await (const chunk of stream) chunks.push(chunk)

  assert.ok(chunks.length >= tokens.length + 1, `${chunks.length} chunks`)
  const choices = choicesOf(chunks)
  assert.equal(choices[0].delta.role, 'assistant', 'the first delta carries the role')
  assert.equal(choices.filter((choice) => 'role' in choice.delta).length, 1, 'only the first delta carries the role')
  assert.deepEqual(choices.map((choice) => choice.delta.content).filter(Boolean), tokens)
  const finishes = choices.filter((choice) => choice.finish_reason !== null && choice.finish_reason !== undefined)
  assert.deepEqual(
    finishes.map((choice) => choice.finish_reason),
    ['stop'],
  )
  assert.equal(chunks.at(-1).choices[0].finish_reason, 'stop', 'the finish_reason comes last')
  for (const chunk of chunks) {
    assert.equal(chunk.object, 'chat.completion.chunk')
    assert.equal(chunk.id, chunks[0].id)
    assert.equal(chunk.created, chunks[0].created)
    assert.equal(chunk.model, 'local')
    assert.ok(Number.isInteger(chunk.created))
    assert.equal('usage' in chunk, false, 'no usage field unless include_usage was asked')
  }
  assert.equal(provider.calls.length, 1)
  assert.equal(provider.calls[0].request.stream, true)
  assert.deepEqual(mcpd.violations, [])
})

test('chat.completions.stream(...).finalChatCompletion() accepts every kind of relayed stream', async (t) => {
  const mcpd = await startMcpd(t)
  const toolChunks = [
    { toolCalls: [{ index: 0, id: 'call_weather', function: { name: 'get_weather', arguments: '' } }] },
    { toolCalls: [{ index: 0, function: { arguments: '{"ci' } }] },
    { toolCalls: [{ index: 0, function: { arguments: 'ty":"Par' } }] },
    { toolCalls: [{ index: 0, function: { arguments: 'is"}' } }] },
    { toolCalls: [{ index: 1, id: 'call_time', function: { name: 'get_time', arguments: '{"tz":' } }] },
    { toolCalls: [{ index: 1, function: { arguments: '"CET"}' } }] },
    { finishReason: 'tool_calls' },
  ]
  const providers = {
    v1: recordingProvider(() => ({
      content: 'The whole answer at once.',
      finishReason: 'stop',
      usage: { promptTokens: 2, completionTokens: 6 },
    })),
    tokens: streamingProvider(tokenChunks(['One', ' two', ' three.'])),
    tools: streamingProvider(toolChunks),
    usage: streamingProvider(tokenChunks(['Count', 'ed'], { usage: { promptTokens: 5, completionTokens: 2 } })),
  }
  await startRegistrar(t, mcpd, providers)
  const client = openAiClient(mcpd)

  /** Runs a stream helper to its end, with the raw chunks and content deltas it saw. */
  const run = async (params) => {
    const stream = client.chat.completions.stream({ messages, ...params })
    const chunks = []
    const deltas = []
    stream.on('chunk', (chunk) => chunks.push(chunk))
    stream.on('content', (delta) => deltas.push(delta))
    const final = await stream.finalChatCompletion()
    return { final, chunks, deltas }
  }

  await t.test('(a) a provider with only complete(): the whole answer as one delta', async () => {
    const { final, deltas } = await run({ model: 'v1' })
    assert.deepEqual(deltas, ['The whole answer at once.'])
    assert.equal(final.object, 'chat.completion')
    assert.equal(final.choices[0].message.role, 'assistant')
    assert.equal(final.choices[0].message.content, 'The whole answer at once.')
    assert.equal(final.choices[0].finish_reason, 'stop')
    assert.equal(final.usage, undefined, 'no usage without include_usage')
    assert.equal(providers.v1.calls[0].request.stream, true)
  })

  await t.test('(b) a provider with stream(): one delta per token', async () => {
    const { final, deltas } = await run({ model: 'tokens' })
    assert.deepEqual(deltas, ['One', ' two', ' three.'])
    assert.equal(final.choices[0].message.content, 'One two three.')
    assert.equal(final.choices[0].finish_reason, 'stop')
    assert.ok(Number.isInteger(final.created))
  })

  await t.test('(c) tool calls streamed in fragments come out whole, finish_reason tool_calls', async () => {
    const { final, chunks } = await run({ model: 'tools', tools: [weatherTool] })
    const calls = choicesOf(chunks).flatMap((choice) => choice.delta.tool_calls ?? [])
    // The wire: each call introduced once (index, id, type, name), then only index + argument pieces.
    assert.deepEqual(
      calls
        .filter((call) => call.id !== undefined)
        .map(({ index, id, type, function: f }) => ({ index, id, type, name: f.name })),
      [
        { index: 0, id: 'call_weather', type: 'function', name: 'get_weather' },
        { index: 1, id: 'call_time', type: 'function', name: 'get_time' },
      ],
    )
    for (const later of calls.filter((call) => call.id === undefined)) {
      assert.deepEqual(Object.keys(later).sort(), ['function', 'index'])
      assert.deepEqual(Object.keys(later.function), ['arguments'])
    }
    const message = final.choices[0].message
    assert.equal(message.content, null)
    assert.deepEqual(
      message.tool_calls.map(({ id, type, function: { name, arguments: args } }) => ({ id, type, name, args })),
      [
        { id: 'call_weather', type: 'function', name: 'get_weather', args: '{"city":"Paris"}' },
        { id: 'call_time', type: 'function', name: 'get_time', args: '{"tz":"CET"}' },
      ],
    )
    assert.equal(final.choices[0].finish_reason, 'tool_calls')
  })

  await t.test('(d) stream_options.include_usage: usage in the final completion', async () => {
    const { final, chunks } = await run({ model: 'usage', stream_options: { include_usage: true } })
    assert.equal(final.choices[0].message.content, 'Counted')
    assert.deepEqual(final.usage, { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7 })
    const usageChunk = chunks.at(-1)
    assert.deepEqual(usageChunk.choices, [], 'the usage chunk comes last, with no choices')
    for (const chunk of chunks.slice(0, -1)) assert.equal(chunk.usage, null)
  })

  assert.deepEqual(mcpd.violations, [])
})

test('a provider that throws: 502 APIError, non-streaming and streaming before the first chunk', async (t) => {
  const mcpd = await startMcpd(t)
  const providers = {
    rejects: {
      complete: async () => {
        throw new Error('ollama is not running')
      },
    },
    throwsFirst: {
      complete: async () => ({ content: 'unused' }),
      // biome-ignore lint/correctness/useYield: a stream that fails before its first chunk
      async *stream() {
        throw new Error('model failed to load')
      },
    },
  }
  const { registrar } = await startRegistrar(t, mcpd, providers)
  const client = openAiClient(mcpd)
  const is502 = (pattern) => (error) => {
    assert.ok(error instanceof OpenAI.APIError, `${error?.constructor?.name}: ${error?.message}`)
    assert.ok(error instanceof OpenAI.InternalServerError)
    assert.equal(error.status, 502)
    assert.equal(error.type, 'provider_error')
    assert.match(error.message, pattern)
    return true
  }
  await assert.rejects(client.chat.completions.create({ model: 'rejects', messages }), is502(/ollama is not running/))
  await assert.rejects(
    client.chat.completions.create({ model: 'rejects', messages, stream: true }),
    is502(/ollama is not running/),
  )
  await assert.rejects(
    client.chat.completions.create({ model: 'throwsFirst', messages, stream: true }),
    is502(/model failed to load/),
  )
  await assert.rejects(
    client.chat.completions.stream({ model: 'throwsFirst', messages }).finalChatCompletion(),
    is502(/model failed to load/),
  )
  await mcpd.waitFor(() => registrar.status().failed === 4)
  assert.deepEqual(mcpd.violations, [])
})

test('an iterator that throws after chunks: the client gets the in-band error; the task ends with [DONE]', async (t) => {
  const mcpd = await startMcpd(t)
  const breaksLate = {
    complete: async () => ({ content: 'unused' }),
    async *stream() {
      yield { content: 'partial ' }
      yield { content: 'answer' }
      throw new Error('the GPU fell over')
    },
  }
  await startRegistrar(t, mcpd, { breaksLate })
  const client = openAiClient(mcpd)

  // create({ stream: true }): the chunks before the error arrive, then iteration throws an
  // APIError without a status (openai's Stream turns a `{"error":…}` data line into one).
  const stream = await client.chat.completions.create({ model: 'breaksLate', messages, stream: true })
  const chunks = []
  await assert.rejects(
    async () => {
      for await (const chunk of stream) chunks.push(chunk)
    },
    (error) => {
      assert.ok(error instanceof OpenAI.APIError, `${error?.constructor?.name}: ${error?.message}`)
      assert.equal(error.status, undefined)
      assert.equal(error.type, 'provider_error')
      assert.match(error.message, /the GPU fell over/)
      return true
    },
  )
  assert.deepEqual(
    choicesOf(chunks)
      .map((choice) => choice.delta.content)
      .filter(Boolean),
    ['partial ', 'answer'],
  )
  assert.ok(
    choicesOf(chunks).every((choice) => choice.finish_reason === null),
    'no finish_reason before the error',
  )

  const [taskId] = answeredTaskIds(mcpd)
  const outcome = await mcpd.outcome(taskId)
  assert.equal(outcome.kind, 'stream')
  assert.equal(outcome.payloads.at(-1), '[DONE]')
  const error = JSON.parse(outcome.payloads.at(-2))
  assert.equal(error.error.type, 'provider_error')
  assert.match(error.error.message, /the GPU fell over/)

  // The stream helper rejects finalChatCompletion() with the same APIError.
  await assert.rejects(
    client.chat.completions.stream({ model: 'breaksLate', messages }).finalChatCompletion(),
    (e) => e instanceof OpenAI.APIError && /the GPU fell over/.test(e.message),
  )
  assert.deepEqual(mcpd.violations, [])
})

test('an unknown model is 404 NotFoundError, streaming or not', async (t) => {
  const mcpd = await startMcpd(t)
  const provider = recordingProvider()
  await startRegistrar(t, mcpd, { local: provider })
  const client = openAiClient(mcpd)
  for (const stream of [false, true]) {
    await assert.rejects(client.chat.completions.create({ model: 'no-such-model', messages, stream }), (error) => {
      assert.ok(error instanceof OpenAI.NotFoundError, `${error?.constructor?.name}: ${error?.message}`)
      assert.equal(error.status, 404)
      assert.equal(error.code, 'model_not_found')
      return true
    })
  }
  assert.equal(provider.calls.length, 0)
})

// The lag is a few ms on an idle machine (the cancel travels mcpd → SSE → the task's token →
// one threadsafe call); the bound is loose enough for a machine whose every core is busy
// (a stress run saw 326 ms at load 12 on 2 cores) and still far below any timeout that could
// end the task instead of the cancel.
test('a client-side abort reaches the provider signal promptly (under 1 s), streaming and not', async (t) => {
  const mcpd = await startMcpd(t)
  const provider = parkedProvider()
  const { registrar } = await startRegistrar(t, mcpd, { parked: provider })
  const client = openAiClient(mcpd)

  // Streaming: the stream has begun (a content delta arrived), then the client aborts.
  const streaming = new AbortController()
  const stream = await client.chat.completions.create(
    { model: 'parked', messages, stream: true },
    { signal: streaming.signal },
  )
  const seen = []
  let abortedFrom = 0
  const iteration = (async () => {
    for await (const chunk of stream) {
      seen.push(chunk)
      if (chunk.choices[0]?.delta?.content === 'first') {
        abortedFrom = performance.now()
        streaming.abort()
      }
    }
  })()
  // openai's Stream treats the user's own abort as the end of iteration: no error.
  await iteration
  assert.equal(seen.filter((chunk) => chunk.choices[0]?.finish_reason).length, 0, 'the stream was cut, not finished')
  assert.ok(abortedFrom > 0, 'the first content delta arrived before the abort')
  // Emulated (scripts/test-arm64.sh), every hop runs many times slower: scaledMs.
  const streamLag = (await provider.aborts[0]) - abortedFrom
  assert.ok(streamLag < scaledMs(1000), `the provider's signal fired ${streamLag.toFixed(1)} ms after abort()`)
  assert.equal(provider.calls[0].signal.reason.name, 'AbortError')
  await mcpd.waitFor(() => provider.finalized === 1, { timeoutMs: 2000 })

  // Non-streaming: the provider is parked in complete() when the client aborts.
  const plain = new AbortController()
  const pending = client.chat.completions.create({ model: 'parked', messages }, { signal: plain.signal })
  await mcpd.waitFor(() => provider.calls.length === 2)
  const plainFrom = performance.now()
  plain.abort()
  await assert.rejects(pending, OpenAI.APIUserAbortError)
  const plainLag = (await provider.aborts[1]) - plainFrom
  assert.ok(plainLag < scaledMs(1000), `the provider's signal fired ${plainLag.toFixed(1)} ms after abort()`)

  // Both were cancels: nothing more posted for either task, though complete() resolved 'late'.
  // A task is counted cancelled when it ends, after its last POST: from then on the
  // requests are final, without a pause that a later POST could outlast.
  await mcpd.waitFor(() => registrar.status().cancelled === 2, { timeoutMs: 5000 })
  assert.equal(mcpd.requests.filter((r) => r.path.endsWith('/result')).length, 0, 'no result POST')
  const [streamedTaskId] = answeredTaskIds(mcpd)
  assert.equal((await mcpd.outcome(streamedTaskId)).kind, 'cancelled')
  assert.equal(registrar.status().inFlight, 0)
  assert.deepEqual(mcpd.violations, [])
  t.diagnostic(`abort → provider signal: streaming ${streamLag.toFixed(1)} ms, non-streaming ${plainLag.toFixed(1)} ms`)
})

test('over maxConcurrency + maxQueue: one of two concurrent requests is 429 RateLimitError', async (t) => {
  const mcpd = await startMcpd(t)
  let release
  const gate = new Promise((resolve) => {
    release = resolve
  })
  const provider = recordingProvider(async () => {
    await gate
    return { content: 'slow answer' }
  })
  await startRegistrar(t, mcpd, { slow: provider }, { maxConcurrency: 1, maxQueue: 0 })
  const client = openAiClient(mcpd)

  const requests = [0, 1].map(() => client.chat.completions.create({ model: 'slow', messages }))
  // The refused one settles while the other is still held at the gate.
  const first = await Promise.race(
    requests.map((request, index) =>
      request.then(
        () => index,
        () => index,
      ),
    ),
  )
  await assert.rejects(requests[first], (error) => {
    assert.ok(error instanceof OpenAI.RateLimitError, `${error?.constructor?.name}: ${error?.message}`)
    assert.equal(error.status, 429)
    assert.equal(error.type, 'rate_limit_exceeded')
    return true
  })
  // The admitted task's call reaches JavaScript through the threadsafe function, which
  // may come after the refusal's answer: wait for it, then check it was the only one.
  await mcpd.waitFor(() => provider.calls.length >= 1)
  release()
  const answered = await requests[1 - first]
  assert.equal(answered.choices[0].message.content, 'slow answer')
  assert.equal(provider.calls.length, 1, 'the refused request never reached the provider')
  assert.deepEqual(mcpd.violations, [])
})

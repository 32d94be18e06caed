// Tests of the fake mcpd itself, driven by a small hand-written registrar (fetch + a hand-made
// SSE reader) and the official openai client, since the addon may not be built yet.

import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { test } from 'node:test'
import { fileURLToPath } from 'node:url'
import OpenAI from 'openai'
import { FakeMcpd } from '../testing/index.js'
import { nodeCommand, scaledMs } from './helpers.mjs'

const MODEL = 'local-qwen'
const PROVIDERS = [
  { name: MODEL, type: 'ollama', model: 'qwen2.5:7b', description: 'a test model', contextWindow: 32768 },
]

// --- a registrar small enough to trust ------------------------------------------------------

class TinyRegistrar {
  constructor(mcpd, { token = 'test-token', providers = PROVIDERS, sessionId = undefined } = {}) {
    this.mcpd = mcpd
    this.token = token
    this.providers = providers
    this.sessionId = sessionId
    this.channels = []
  }

  headers(extra = {}) {
    const headers = { authorization: `Bearer ${this.token}`, 'content-type': 'application/json', ...extra }
    if (this.sessionId) headers['x-mcpctl-provider-session'] = this.sessionId
    return headers
  }

  async post(path, body, { headers = {}, raw = false } = {}) {
    const res = await fetch(`${this.mcpd.url}${path}`, {
      method: 'POST',
      headers: this.headers(headers),
      body: raw ? body : JSON.stringify(body),
    })
    const text = await res.text()
    let parsed = text
    try {
      parsed = JSON.parse(text)
    } catch {}
    return { status: res.status, headers: res.headers, body: parsed }
  }

  async register() {
    const body = { client: { name: 'tiny-registrar', version: '0.0.0' }, providers: this.providers }
    if (this.sessionId) body.providerSessionId = this.sessionId
    const answer = await this.post('/api/v1/llms/_provider-register', body)
    if (answer.status === 200 || answer.status === 201) this.sessionId = answer.body.providerSessionId
    return answer
  }

  heartbeat(providers = [{ name: MODEL, inFlight: 0, queued: 0, maxConcurrency: 4, completed: 0, failed: 0 }]) {
    return this.post('/api/v1/llms/_provider-heartbeat', { providerSessionId: this.sessionId, providers })
  }

  result(taskId, status, body) {
    return this.post(`/api/v1/llms/_provider-tasks/${taskId}/result`, { status, body })
  }

  chunks(taskId, seq, chunks) {
    return this.post(`/api/v1/llms/_provider-tasks/${taskId}/chunks`, { seq, chunks })
  }

  async connect(headers = {}) {
    const channel = await openSse(
      `${this.mcpd.url}/api/v1/llms/_provider-stream?providerSessionId=${encodeURIComponent(this.sessionId)}`,
      { accept: 'text/event-stream', ...this.headers(), ...headers },
    )
    this.channels.push(channel)
    this.channel = channel
    return channel
  }

  /** The next event of that name not taken yet, from the newest channel. */
  async next(name, { timeoutMs = 5000 } = {}) {
    const channel = this.channel
    const event = await this.mcpd.waitFor(() => channel.events.find((e) => e.event === name && !e.taken), { timeoutMs })
    event.taken = true
    return event
  }

  async nextTask() {
    return JSON.parse((await this.next('task')).data)
  }

  close() {
    for (const channel of this.channels) channel.close()
  }
}

async function openSse(url, headers) {
  const abort = new AbortController()
  const res = await fetch(url, { headers, signal: abort.signal })
  const channel = {
    status: res.status,
    headers: res.headers,
    events: [],
    comments: [],
    ended: false,
    close: () => abort.abort(),
  }
  if (res.status !== 200) {
    channel.body = await res.text()
    channel.ended = true
    return channel
  }
  channel.done = (async () => {
    const decoder = new TextDecoder()
    let buffer = ''
    let pending = { event: 'message', data: [], id: null }
    try {
      for await (const bytes of res.body) {
        buffer += decoder.decode(bytes, { stream: true })
        let newline
        while ((newline = buffer.indexOf('\n')) >= 0) {
          const line = buffer.slice(0, newline).replace(/\r$/, '')
          buffer = buffer.slice(newline + 1)
          if (line === '') {
            if (pending.data.length > 0) channel.events.push({ ...pending, data: pending.data.join('\n') })
            pending = { event: 'message', data: [], id: null }
          } else if (line.startsWith(':')) {
            channel.comments.push(line.slice(1).trim())
          } else {
            const colon = line.indexOf(':')
            const field = colon < 0 ? line : line.slice(0, colon)
            const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '')
            if (field === 'event') pending.event = value
            else if (field === 'data') pending.data.push(value)
            else if (field === 'id') pending.id = value
          }
        }
      }
    } catch {
      // an abort or a dropped socket both just end the channel
    } finally {
      channel.ended = true
    }
  })()
  return channel
}

// --- fixtures -----------------------------------------------------------------------------

async function startMcpd(t, options = {}) {
  const mcpd = new FakeMcpd({ keepAliveMs: 0, ...options })
  await mcpd.listen()
  t.after(() => mcpd.close())
  return mcpd
}

async function connectedRegistrar(t, mcpd, options) {
  const registrar = new TinyRegistrar(mcpd, options)
  t.after(() => registrar.close())
  const answer = await registrar.register()
  assert.equal(answer.status, 201, JSON.stringify(answer.body))
  const channel = await registrar.connect()
  assert.equal(channel.status, 200)
  return registrar
}

function openai(mcpd, apiKey = 'test-token') {
  // No retries: a 5xx must reach the test as it was answered, once.
  return new OpenAI({ baseURL: `${mcpd.url}/v1`, apiKey, maxRetries: 0, timeout: 10000 })
}

function completion(content, model = MODEL) {
  return {
    id: 'chatcmpl-1',
    object: 'chat.completion',
    created: 1700000000,
    model,
    choices: [{ index: 0, message: { role: 'assistant', content }, finish_reason: 'stop' }],
    usage: { prompt_tokens: 3, completion_tokens: 2, total_tokens: 5 },
  }
}

function chunk(delta, finishReason = null, { id = 'chatcmpl-s', created = 1700000000, model = MODEL } = {}) {
  return JSON.stringify({
    id,
    object: 'chat.completion.chunk',
    created,
    model,
    choices: [{ index: 0, delta, finish_reason: finishReason }],
  })
}

function streamPayloads(pieces) {
  return [
    chunk({ role: 'assistant', content: '' }),
    ...pieces.map((content) => chunk({ content })),
    chunk({}, 'stop'),
    '[DONE]',
  ]
}

// --- tests --------------------------------------------------------------------------------

test('a chat request on the OpenAI front becomes a task, answered by a result POST', async (t) => {
  const mcpd = await startMcpd(t, { pathPrefix: '/mcpd' })
  assert.match(mcpd.url, /^http:\/\/127\.0\.0\.1:\d+\/mcpd$/)
  const registrar = await connectedRegistrar(t, mcpd)

  const answer = openai(mcpd).chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'hi' }] })
  const task = await registrar.nextTask()
  assert.equal(task.provider, MODEL)
  assert.equal(task.stream, false)
  assert.deepEqual(task.body.messages, [{ role: 'user', content: 'hi' }])
  assert.equal(mcpd.sessions.get(registrar.sessionId).inFlight, 1)

  assert.deepEqual((await registrar.result(task.taskId, 200, completion('hello'))).body, { ok: true })
  const reply = await answer
  assert.equal(reply.choices[0].message.content, 'hello')
  assert.deepEqual(await mcpd.outcome(task.taskId), { kind: 'result', status: 200, body: completion('hello') })

  assert.equal(mcpd.registrations.length, 1)
  assert.equal(mcpd.registrations[0].body.client.name, 'tiny-registrar')
  assert.equal(mcpd.connections[0].status, 200)
  assert.equal(mcpd.connections[0].sessionId, registrar.sessionId)
  assert.equal(mcpd.connections[0].closedAt, null)
  assert.deepEqual(mcpd.sessions.get(registrar.sessionId), { providers: PROVIDERS, connected: true, inFlight: 0 })
  const stream = mcpd.requests.find((r) => r.path === '/api/v1/llms/_provider-stream')
  assert.deepEqual(stream.query, { providerSessionId: registrar.sessionId })
  assert.ok(
    mcpd.requests.some((r) => r.method === 'POST' && r.path === '/v1/chat/completions' && r.body.model === MODEL),
  )
  assert.deepEqual(mcpd.violations, [])
})

test('a streamed answer relayed through chunk POSTs satisfies stream().finalChatCompletion()', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await connectedRegistrar(t, mcpd)

  const final = openai(mcpd)
    .chat.completions.stream({ model: MODEL, messages: [{ role: 'user', content: 'hi' }] })
    .finalChatCompletion()
  const task = await registrar.nextTask()
  assert.equal(task.stream, true)
  const payloads = streamPayloads(['Hello', ' world'])
  await registrar.chunks(task.taskId, 0, payloads.slice(0, 2))
  await registrar.chunks(task.taskId, 2, payloads.slice(2))

  const message = (await final).choices[0]
  assert.equal(message.message.content, 'Hello world')
  assert.equal(message.finish_reason, 'stop')
  assert.deepEqual(await mcpd.outcome(task.taskId), { kind: 'stream', payloads, posts: 2 })
  assert.deepEqual(
    mcpd.chunkPosts(task.taskId).map((p) => p.seq),
    [0, 2],
  )
  assert.equal(mcpd.sessions.get(registrar.sessionId).inFlight, 0)
  assert.deepEqual(mcpd.violations, [])
})

test('create({ stream: true }) iteration sees each chunk as it is posted', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await connectedRegistrar(t, mcpd)

  const stream = await (async () => {
    const pending = openai(mcpd).chat.completions.create({
      model: MODEL,
      messages: [{ role: 'user', content: 'hi' }],
      stream: true,
    })
    const task = await registrar.nextTask()
    // The client only gets its response headers with the first chunk, so post it before awaiting.
    const payloads = streamPayloads(['a', 'b', 'c'])
    await registrar.chunks(task.taskId, 0, payloads.slice(0, 1))
    const iterable = await pending
    return { iterable, task, payloads }
  })()

  const seen = []
  let next = 1
  for await (const part of stream.iterable) {
    seen.push(part.choices[0].delta.content ?? `<${part.choices[0].finish_reason}>`)
    // Post the next payload only once this one went through: proves chunks are relayed live.
    if (next < stream.payloads.length) {
      await registrar.chunks(stream.task.taskId, next, [stream.payloads[next]])
      next++
    }
  }
  assert.deepEqual(seen, ['', 'a', 'b', 'c', '<stop>'])
  assert.equal((await mcpd.outcome(stream.task.taskId)).posts, 6)
  assert.deepEqual(mcpd.violations, [])
})

test('an error before the first chunk reaches a streaming client as a JSON error answer', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await connectedRegistrar(t, mcpd)

  const refused = assert.rejects(
    openai(mcpd).chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'hi' }], stream: true }),
    (error) => error.status === 502 && /ollama is down/.test(error.message),
  )
  const task = await registrar.nextTask()
  await registrar.result(task.taskId, 502, { error: { message: 'ollama is down', type: 'provider_error', code: null } })
  await refused
  assert.deepEqual(mcpd.violations, [])
})

test('a client that goes away becomes a cancel event; a result after it is a violation', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await connectedRegistrar(t, mcpd)

  const abort = new AbortController()
  const pending = openai(mcpd).chat.completions.create(
    { model: MODEL, messages: [{ role: 'user', content: 'hi' }] },
    { signal: abort.signal },
  )
  const task = await registrar.nextTask()
  abort.abort()
  await assert.rejects(pending, OpenAI.APIUserAbortError)

  const cancel = JSON.parse((await registrar.next('cancel')).data)
  assert.deepEqual(cancel, { taskId: task.taskId })
  assert.deepEqual(await mcpd.outcome(task.taskId), { kind: 'cancelled' })
  assert.equal(mcpd.sessions.get(registrar.sessionId).inFlight, 0)

  await registrar.result(task.taskId, 200, completion('too late'))
  assert.equal(mcpd.violations.length, 1)
  assert.match(mcpd.violations[0], /^result after cancel/)
})

test('a wrong or missing token is a 401 with an OpenAI error body on every route', async (t) => {
  const mcpd = await startMcpd(t, { token: 'right' })
  const wrong = new TinyRegistrar(mcpd, { token: 'wrong' })

  const refused = await wrong.register()
  assert.equal(refused.status, 401)
  assert.deepEqual(
    {
      type: refused.body.error.type,
      code: refused.body.error.code,
      hasMessage: typeof refused.body.error.message === 'string',
    },
    { type: 'authentication_error', code: 'invalid_api_key', hasMessage: true },
  )
  const bare = await fetch(`${mcpd.url}/api/v1/llms`)
  assert.equal(bare.status, 401)
  await bare.body.cancel()

  await assert.rejects(
    openai(mcpd, 'wrong').models.list(),
    (error) => error.status === 401 && error.code === 'invalid_api_key',
  )
  assert.equal(mcpd.registrations.length, 0)
  assert.equal(mcpd.requests.length, 3)
  assert.equal(mcpd.requests[0].body.client.name, 'tiny-registrar')
})

test('a model nobody publishes, or whose registrar is not connected, is 404 model_not_found', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = new TinyRegistrar(mcpd)
  await registrar.register()
  const client = openai(mcpd)

  for (const model of ['no-such-model', MODEL]) {
    await assert.rejects(
      client.chat.completions.create({ model, messages: [{ role: 'user', content: 'hi' }] }),
      (error) => error.status === 404 && error.code === 'model_not_found' && error.type === 'invalid_request_error',
    )
  }
  const { llms } = await (await fetch(`${mcpd.url}/api/v1/llms`, { headers: registrar.headers() })).json()
  assert.deepEqual(
    llms.map((l) => [l.name, l.status]),
    [[MODEL, 'inactive']],
  )
})

test('chunk POSTs repeated after a lost answer are de-duplicated by seq; a gap is a violation', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await connectedRegistrar(t, mcpd)
  const payloads = streamPayloads(['x', 'y'])

  const taskId = mcpd.sendTask({ provider: MODEL, body: { model: MODEL, messages: [], stream: true } })
  assert.equal((await registrar.nextTask()).taskId, taskId)
  // The fake keeps this POST's payloads but answers 502, as if the answer was lost.
  mcpd.failNext('chunks', { status: 502, handle: true })
  assert.equal((await registrar.chunks(taskId, 0, payloads.slice(0, 2))).status, 502)
  // The retry carries what was produced meanwhile, batched behind the repeat.
  assert.equal((await registrar.chunks(taskId, 0, payloads.slice(0, 3))).status, 200)
  await registrar.chunks(taskId, 3, payloads.slice(3))

  assert.deepEqual(await mcpd.outcome(taskId), { kind: 'stream', payloads, posts: 3 })
  assert.deepEqual(
    mcpd.chunkPosts(taskId).map((p) => [p.seq, p.chunks.length]),
    [
      [0, 2],
      [0, 3],
      [3, 2],
    ],
  )
  assert.deepEqual(mcpd.violations, [])

  const gapped = mcpd.sendTask({ provider: MODEL, body: { model: MODEL, messages: [], stream: true } })
  await registrar.chunks(gapped, 0, payloads.slice(0, 1))
  await registrar.chunks(gapped, 2, payloads.slice(2))
  assert.equal(mcpd.violations.length, 1)
  assert.match(mcpd.violations[0], /gap/)
})

test('two chunk POSTs in flight for one task, and payloads after [DONE], are violations', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await connectedRegistrar(t, mcpd)
  const payloads = streamPayloads(['x'])
  const body = { model: MODEL, messages: [], stream: true }

  const overlapping = mcpd.sendTask({ provider: MODEL, body })
  mcpd.delay('chunks', 150)
  await Promise.all([
    registrar.chunks(overlapping, 0, payloads.slice(0, 2)),
    registrar.chunks(overlapping, 2, payloads.slice(2)),
  ])
  mcpd.delay('chunks', 0)
  assert.equal(mcpd.violations.length, 1)
  assert.match(mcpd.violations[0], /two chunk POSTs in flight/)
  mcpd.violations.length = 0

  const late = mcpd.sendTask({ provider: MODEL, body })
  await registrar.chunks(late, 0, payloads)
  await registrar.chunks(late, payloads.length, [chunk({ content: 'more' })])
  assert.equal((await mcpd.outcome(late)).payloads.length, payloads.length)
  assert.equal(mcpd.violations.length, 1)
  assert.match(mcpd.violations[0], /payload after \[DONE\]/)
})

test('a streamed tool call with include_usage passes the checks and finalChatCompletion()', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await connectedRegistrar(t, mcpd)

  const final = openai(mcpd)
    .chat.completions.stream({
      model: MODEL,
      messages: [{ role: 'user', content: 'weather?' }],
      tools: [{ type: 'function', function: { name: 'weather', parameters: { type: 'object' } } }],
      stream_options: { include_usage: true },
    })
    .finalChatCompletion()
  const task = await registrar.nextTask()
  assert.deepEqual(task.body.stream_options, { include_usage: true })
  const base = { id: 'chatcmpl-t', object: 'chat.completion.chunk', created: 1700000000, model: MODEL }
  const payloads = [
    { ...base, choices: [{ index: 0, delta: { role: 'assistant', content: null }, finish_reason: null }], usage: null },
    {
      ...base,
      choices: [
        {
          index: 0,
          delta: {
            tool_calls: [{ index: 0, id: 'call_1', type: 'function', function: { name: 'weather', arguments: '' } }],
          },
          finish_reason: null,
        },
      ],
      usage: null,
    },
    {
      ...base,
      choices: [
        { index: 0, delta: { tool_calls: [{ index: 0, function: { arguments: '{"city":' } }] }, finish_reason: null },
      ],
      usage: null,
    },
    {
      ...base,
      choices: [
        { index: 0, delta: { tool_calls: [{ index: 0, function: { arguments: '"Oslo"}' } }] }, finish_reason: null },
      ],
      usage: null,
    },
    { ...base, choices: [{ index: 0, delta: {}, finish_reason: 'tool_calls' }], usage: null },
    { ...base, choices: [], usage: { prompt_tokens: 9, completion_tokens: 4, total_tokens: 13 } },
  ]
    .map((p) => JSON.stringify(p, null, 1))
    .concat('[DONE]') // pretty-printed: payloads may span lines
  await registrar.chunks(task.taskId, 0, payloads)

  const done = await final
  assert.deepEqual(done.choices[0].message.tool_calls, [
    { id: 'call_1', type: 'function', function: { name: 'weather', arguments: '{"city":"Oslo"}' } },
  ])
  assert.equal(done.choices[0].finish_reason, 'tool_calls')
  assert.deepEqual(done.usage, { prompt_tokens: 9, completion_tokens: 4, total_tokens: 13 })
  assert.deepEqual(mcpd.violations, [])

  const sloppy = mcpd.sendTask({
    provider: MODEL,
    body: { model: MODEL, messages: [], stream: true, stream_options: { include_usage: true } },
  })
  await registrar.chunks(sloppy, 0, [
    chunk({ role: 'assistant', tool_calls: [{ index: 0, function: { name: 'weather', arguments: '' } }] }),
    chunk({ tool_calls: [{ index: 0, id: 'call_1', function: { arguments: '{}' } }] }, 'tool_calls'),
    '[DONE]',
  ])
  assert.deepEqual(
    mcpd.violations.map((v) => v.replace(/: task .*$/, '')),
    [
      "a tool call's first delta lacks id, type 'function' or function.name",
      'with include_usage, a content chunk must carry "usage": null',
      'a later tool call delta repeats id, type or function.name',
      'no usage chunk before [DONE] although include_usage was asked',
    ],
  )
})

test('malformed chunk payloads are each flagged', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await connectedRegistrar(t, mcpd)
  const cases = [
    [[chunk({ content: 'no role' }), chunk({}, 'stop'), '[DONE]'], /lacks role 'assistant'/],
    [[chunk({ role: 'assistant' }), chunk({}, 'done'), '[DONE]'], /finish_reason "done"/],
    [[chunk({ role: 'assistant' }), chunk({}, 'stop', { id: 'other' }), '[DONE]'], /share id\/created\/model/],
    [
      [chunk({ role: 'assistant' }, null, { created: 1.5 }), chunk({}, 'stop', { created: 1.5 }), '[DONE]'],
      /not integer seconds/,
    ],
    [[chunk({ role: 'assistant' }), 'not json', chunk({}, 'stop'), '[DONE]'], /neither "\[DONE\]" nor JSON/],
    [[chunk({ role: 'assistant' }), '[DONE]'], /no finish_reason before \[DONE\]/],
    [
      [JSON.stringify({ error: { message: 'boom', type: 'provider_error' } }), '[DONE]'],
      /error payload before any chunk/,
    ],
  ]
  for (const [payloads, expected] of cases) {
    mcpd.violations.length = 0
    const taskId = mcpd.sendTask({ provider: MODEL, body: { model: MODEL, messages: [], stream: true } })
    await registrar.chunks(taskId, 0, payloads)
    assert.equal(mcpd.violations.length, 1, `${expected}: ${JSON.stringify(mcpd.violations)}`)
    assert.match(mcpd.violations[0], expected)
  }

  mcpd.violations.length = 0
  const fine = mcpd.sendTask({ provider: MODEL, body: { model: MODEL, messages: [], stream: true } })
  await registrar.chunks(fine, 0, [
    chunk({ role: 'assistant', content: 'partial' }),
    JSON.stringify({ error: { message: 'provider died', type: 'provider_error', code: null } }),
    '[DONE]',
  ])
  assert.deepEqual(mcpd.violations, [], 'an in-band error after a chunk is the protocol')
})

test('result POSTs: a repeat is tolerated, a different second result and malformed bodies are violations', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await connectedRegistrar(t, mcpd)
  const send = () => mcpd.sendTask({ provider: MODEL, body: { model: MODEL, messages: [] } })

  const twice = send()
  await registrar.result(twice, 200, completion('one'))
  await registrar.result(twice, 200, completion('one'))
  assert.deepEqual(mcpd.violations, [])
  await registrar.result(twice, 200, completion('two'))
  assert.deepEqual(
    mcpd.violations.map((v) => v.split(':')[0]),
    ['second result for task t-1'],
  )

  const cases = [
    [700, completion('x'), /not an integer 100-599/],
    [500, { message: 'flat' }, /without an \{ error: \{ message, type \} \} body/],
    [200, { ...completion('x'), object: 'text_completion' }, /chat\.completion/],
    [200, { ...completion('x'), created: '2024' }, /integer created/],
    [200, { ...completion('x'), choices: [{ message: { role: 'user', content: 'x' } }] }, /role 'assistant'/],
  ]
  for (const [status, body, expected] of cases) {
    mcpd.violations.length = 0
    const answer = await registrar.result(send(), status, body)
    assert.equal(answer.status, 400)
    assert.equal(mcpd.violations.length, 1)
    assert.match(mcpd.violations[0], expected)
  }
  assert.equal((await registrar.result('t-never-sent', 200, completion('x'))).status, 404)
})

test('failNext answers scripted failures; a failed result is not recorded so its retry is delivered', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = new TinyRegistrar(mcpd)
  t.after(() => registrar.close())

  mcpd.failNext('register', { status: 503, body: { error: { message: 'warming up', type: 'unavailable' } } })
  mcpd.failNext('register', { status: 500, body: 'plain text oops' })
  const first = await registrar.register()
  assert.deepEqual([first.status, first.body.error.message], [503, 'warming up'])
  const second = await registrar.register()
  assert.deepEqual(
    [second.status, second.body, second.headers.get('content-type')],
    [500, 'plain text oops', 'text/plain; charset=utf-8'],
  )
  assert.equal((await registrar.register()).status, 201)
  assert.equal(mcpd.registrations.length, 3)

  mcpd.failNext('stream', { status: 503, delayMs: 100 })
  const started = Date.now()
  const refused = await registrar.connect()
  assert.equal(refused.status, 503)
  assert.ok(Date.now() - started >= 90, 'delayMs delays the scripted answer')
  assert.equal(mcpd.connections.at(-1).status, 503)
  assert.equal((await registrar.connect()).status, 200)

  const taskId = mcpd.sendTask({ provider: MODEL, body: { model: MODEL, messages: [] } })
  mcpd.failNext('result', { status: 500, times: 2 })
  assert.equal((await registrar.result(taskId, 200, completion('retried'))).status, 500)
  assert.equal((await registrar.result(taskId, 200, completion('retried'))).status, 500)
  assert.equal(mcpd.sessions.get(registrar.sessionId).inFlight, 1)
  assert.equal((await registrar.result(taskId, 200, completion('retried'))).status, 200)
  assert.equal((await mcpd.outcome(taskId)).body.choices[0].message.content, 'retried')

  mcpd.failNext('heartbeat', { status: 0, destroy: true })
  await assert.rejects(registrar.heartbeat(), TypeError, 'destroy: a connection error, not an answer')
  assert.throws(() => mcpd.failNext('nope', { status: 500 }), TypeError)
  assert.deepEqual(mcpd.violations, [])
})

test('forgetSession: stream and heartbeat answer 404, and registering with the old id gets a new one', async (t) => {
  let n = 0
  const mcpd = await startMcpd(t, { sessionIdFactory: () => `ps-${++n}` })
  const registrar = await connectedRegistrar(t, mcpd)
  assert.equal(registrar.sessionId, 'ps-1')
  assert.equal((await registrar.heartbeat()).status, 204)
  const kept = await registrar.register()
  assert.deepEqual([kept.status, kept.body.providerSessionId], [200, 'ps-1'])

  mcpd.forgetSession('ps-1')
  assert.equal((await registrar.heartbeat()).status, 404)
  const refused = await registrar.connect()
  assert.equal(refused.status, 404)
  assert.equal(mcpd.connections.at(-1).status, 404)

  const again = await registrar.register()
  assert.equal(again.status, 201)
  assert.equal(again.body.providerSessionId, 'ps-2')
  assert.equal((await registrar.heartbeat()).status, 204)
  assert.deepEqual([...mcpd.sessions.keys()], ['ps-2'])
  assert.deepEqual(mcpd.violations, [])
})

test('register and heartbeat: the answer carries heartbeatIntervalMs, and sloppy requests are flagged', async (t) => {
  const mcpd = await startMcpd(t, { heartbeatIntervalMs: 1234 })
  const registrar = new TinyRegistrar(mcpd)
  const answer = await registrar.register()
  assert.deepEqual(answer.body, {
    providerSessionId: registrar.sessionId,
    llms: [{ name: MODEL, kind: 'virtual', status: 'active' }],
    heartbeatIntervalMs: 1234,
  })
  assert.deepEqual(mcpd.violations, [])

  await registrar.heartbeat([{ name: MODEL, inFlight: 0, maxConcurrency: 4, completed: 0, failed: '0' }])
  assert.equal(mcpd.heartbeats.length, 1)
  assert.deepEqual(mcpd.violations, [`heartbeat provider ${MODEL} lacks numeric queued, failed`])

  mcpd.violations.length = 0
  const sloppy = new TinyRegistrar(mcpd)
  const text = await sloppy.post(
    '/api/v1/llms/_provider-register',
    JSON.stringify({ client: { name: 'x' }, providers: PROVIDERS }),
    {
      headers: { 'content-type': 'text/plain' },
      raw: true,
    },
  )
  assert.equal(text.status, 201)
  assert.deepEqual(mcpd.violations, [
    'register POST with content-type text/plain (expected application/json)',
    'register without client.version',
  ])

  mcpd.violations.length = 0
  const invalid = await sloppy.post('/api/v1/llms/_provider-register', {
    client: { name: 'x', version: '1' },
    providers: [{ name: 'no-type' }],
  })
  assert.equal(invalid.status, 400)
  assert.match(mcpd.violations[0], /providers\[0\] lacks a name or type/)
})

test('stream connects are checked for Accept and a matching session header', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = new TinyRegistrar(mcpd)
  t.after(() => registrar.close())
  await registrar.register()

  const channel = await registrar.connect({ accept: '*/*', 'x-mcpctl-provider-session': 'someone-else' })
  assert.equal(channel.status, 200)
  assert.equal(channel.headers.get('content-type'), 'text/event-stream')
  assert.equal(channel.headers.get('cache-control'), 'no-cache')
  assert.equal(mcpd.violations.length, 2)
  assert.match(mcpd.violations[0], /Accept: text\/event-stream/)
  assert.match(mcpd.violations[1], /differs from the query/)

  mcpd.violations.length = 0
  await registrar.connect({ 'last-event-id': '42' })
  assert.equal(mcpd.connections.at(-1).lastEventId, '42')
  assert.equal(mcpd.connections[0].lastEventId, null)
  assert.deepEqual(mcpd.violations, [])
})

test('sendEvent, sendRaw, sendTask ids and keep-alive comments all reach the stream', async (t) => {
  const mcpd = await startMcpd(t, { keepAliveMs: 20 })
  const registrar = await connectedRegistrar(t, mcpd)
  const channel = registrar.channel

  await mcpd.waitFor(() => channel.comments.includes('keep-alive'))
  assert.equal(mcpd.sendEvent('ping', 'line one\nline two', { id: '7' }), 1)
  mcpd.sendRaw('event: fut')
  mcpd.sendRaw(Buffer.from('ure\ndata: {"x":1}\n\n'))
  const taskId = mcpd.sendTask({
    provider: MODEL,
    body: { model: MODEL, messages: [] },
    eventId: 'ev-9',
    taskId: 'custom',
  })
  assert.equal(taskId, 'custom')

  const ping = await registrar.next('ping')
  assert.deepEqual([ping.data, ping.id], ['line one\nline two', '7'])
  assert.equal((await registrar.next('future')).data, '{"x":1}')
  const task = await registrar.next('task')
  assert.equal(task.id, 'ev-9')
  assert.deepEqual(JSON.parse(task.data), {
    taskId: 'custom',
    provider: MODEL,
    stream: false,
    body: { model: MODEL, messages: [] },
  })

  // Re-sending a known task id (a Last-Event-ID replay) does not count it twice.
  mcpd.sendTask({ provider: MODEL, body: { model: MODEL, messages: [] }, taskId: 'custom' })
  assert.equal(mcpd.sessions.get(registrar.sessionId).inFlight, 1)
  mcpd.cancel('custom')
  assert.deepEqual(JSON.parse((await registrar.next('cancel')).data), { taskId: 'custom' })
  assert.equal(mcpd.sessions.get(registrar.sessionId).inFlight, 0)
})

test('dropStreams cuts every stream like a crash; sendTask then has nowhere to go', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await connectedRegistrar(t, mcpd)

  mcpd.dropStreams()
  assert.equal(mcpd.sessions.get(registrar.sessionId).connected, false)
  assert.notEqual(mcpd.connections[0].closedAt, null)
  await registrar.channel.done
  assert.equal(registrar.channel.ended, true)
  assert.throws(
    () => mcpd.sendTask({ provider: MODEL, body: { messages: [] } }),
    /no registrar session has an open stream/,
  )

  await registrar.connect()
  assert.equal(mcpd.sessions.get(registrar.sessionId).connected, true)
})

test('with several registrars publishing a model, a request goes to the least loaded; both are listed', async (t) => {
  const mcpd = await startMcpd(t)
  const a = await connectedRegistrar(t, mcpd)
  const b = await connectedRegistrar(t, mcpd, { providers: [...PROVIDERS, { name: 'other', type: 'llama.cpp' }] })
  const client = openai(mcpd)

  const first = client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: '1' }] })
  const taskA = await a.nextTask()
  const second = client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: '2' }] })
  const taskB = await b.nextTask()
  assert.deepEqual([taskA.body.messages[0].content, taskB.body.messages[0].content], ['1', '2'])
  await a.result(taskA.taskId, 200, completion('from a'))
  await b.result(taskB.taskId, 200, completion('from b'))
  assert.equal((await first).choices[0].message.content, 'from a')
  assert.equal((await second).choices[0].message.content, 'from b')

  const models = []
  for await (const model of client.models.list()) models.push(model)
  assert.deepEqual(
    models.map((m) => [m.id, m.object, m.owned_by, Number.isInteger(m.created)]),
    [
      [MODEL, 'model', 'mcpctl-virtual', true],
      ['other', 'model', 'mcpctl-virtual', true],
    ],
  )
  const { llms } = await (await fetch(`${mcpd.url}/api/v1/llms`, { headers: a.headers() })).json()
  assert.deepEqual(llms[0], {
    name: MODEL,
    kind: 'virtual',
    status: 'active',
    type: 'ollama',
    model: 'qwen2.5:7b',
    description: 'a test model',
    contextWindow: 32768,
    created: llms[0].created,
  })
  assert.deepEqual(mcpd.violations, [])
})

test('a registrar that stays silent makes the request time out (504, or in-band once streaming) and is cancelled', async (t) => {
  const mcpd = await startMcpd(t, { taskTimeoutMs: 300 })
  const registrar = await connectedRegistrar(t, mcpd)
  const client = openai(mcpd)

  const plain = assert.rejects(
    client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'hi' }] }),
    (error) => error.status === 504 && error.type === 'timeout',
  )
  const task = await registrar.nextTask()
  await plain
  assert.deepEqual(JSON.parse((await registrar.next('cancel')).data), { taskId: task.taskId })

  const streaming = client.chat.completions.create({
    model: MODEL,
    messages: [{ role: 'user', content: 'hi' }],
    stream: true,
  })
  const streamTask = await registrar.nextTask()
  await registrar.chunks(streamTask.taskId, 0, [chunk({ role: 'assistant', content: 'half' })])
  const seen = []
  await assert.rejects(
    async () => {
      for await (const part of await streaming) seen.push(part.choices[0].delta.content)
    },
    (error) => error.type === 'timeout',
  )
  assert.deepEqual(seen, ['half'])
  assert.deepEqual(JSON.parse((await registrar.next('cancel')).data), { taskId: streamTask.taskId })
  assert.equal(mcpd.sessions.get(registrar.sessionId).inFlight, 0)
  assert.deepEqual(mcpd.violations, [])
})

test('waitFor and outcome time out with clear messages; close ends streams and is idempotent', async (t) => {
  const mcpd = new FakeMcpd({ keepAliveMs: 0 })
  await mcpd.listen()
  const registrar = await connectedRegistrar(t, mcpd)

  await assert.rejects(
    mcpd.waitFor(() => false, { timeoutMs: 50 }),
    /waitFor: condition not met within 50 ms/,
  )
  assert.equal(await mcpd.waitFor(() => 'value'), 'value')
  const taskId = mcpd.sendTask({ provider: MODEL, body: { messages: [] } })
  await assert.rejects(
    mcpd.outcome(taskId, { timeoutMs: 50 }),
    /outcome\(t-1\): the task did not end within 50 ms \(sent, nothing received for it\)/,
  )

  const pending = assert.rejects(mcpd.outcome(taskId), /closed before task t-1 ended/)
  const pendingRequest = assert.rejects(
    openai(mcpd).chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'hi' }] }),
    (error) => error.status === 503 && error.type === 'unavailable',
  )
  assert.equal((await registrar.nextTask()).taskId, taskId)
  assert.equal((await registrar.nextTask()).provider, MODEL)
  await Promise.all([mcpd.close(), mcpd.close()])
  await mcpd.close()
  await pending
  await pendingRequest
  await registrar.channel.done
  assert.equal(registrar.channel.ended, true)
  assert.notEqual(mcpd.connections[0].closedAt, null)
  await assert.rejects(mcpd.listen(), /after close/)
})

test('the dev mcpd command prints its URL, serves the OpenAI front behind its token and stops on SIGTERM', async (t) => {
  const bin = fileURLToPath(new URL('../bin/dev-mcpd.js', import.meta.url))
  const child = spawn(...nodeCommand([bin, '--port', '0', '--token', 'demo', '--prefix', '/mcpd', '--quiet']), {
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  t.after(() => {
    if (child.exitCode === null) child.kill('SIGKILL')
  })
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })))

  let out = ''
  const line = await new Promise((resolve, reject) => {
    // Emulated (scripts/test-arm64.sh), a Node alone takes seconds to start.
    const limit = scaledMs(5000)
    const timer = setTimeout(() => reject(new Error(`no listening line in ${limit} ms: ${out}`)), limit)
    child.stdout.on('data', (bytes) => {
      out += bytes
      if (out.includes('\n')) {
        clearTimeout(timer)
        resolve(out.split('\n')[0])
      }
    })
  })
  const match = /^dev mcpd listening on (http:\/\/127\.0\.0\.1:\d+\/mcpd) \(token: demo\)$/.exec(line)
  assert.ok(match, line)
  const url = match[1]

  const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: 'demo', maxRetries: 0 })
  assert.deepEqual((await client.models.list()).data, [])
  const refused = await fetch(`${url}/v1/models`)
  assert.equal(refused.status, 401)
  await refused.body.cancel()

  child.kill('SIGTERM')
  let timer
  const timeout = new Promise((resolve) => {
    timer = setTimeout(resolve, scaledMs(5000), `still running ${scaledMs(5000)} ms after SIGTERM`)
  })
  assert.deepEqual(await Promise.race([exited, timeout]), { code: 0, signal: null })
  clearTimeout(timer)
})

// --- changing the set (docs/protocol.md section 1) ------------------------------------------------

const SECOND = { name: 'local-llama', type: 'llamacpp', model: 'llama-3.1-8b' }

async function llmStates(mcpd, registrar) {
  const { llms } = await (await fetch(`${mcpd.url}/api/v1/llms`, { headers: registrar.headers() })).json()
  return Object.fromEntries(llms.map((l) => [l.name, l.status]))
}

test('a register under the same session id replaces its set: a new name is active and gets tasks', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await connectedRegistrar(t, mcpd)
  const id = registrar.sessionId
  const client = openai(mcpd)
  assert.deepEqual(
    (await client.models.list()).data.map((m) => m.id),
    [MODEL],
  )

  registrar.providers = [...PROVIDERS, SECOND]
  const answer = await registrar.register()
  assert.equal(answer.status, 200)
  assert.equal(answer.body.providerSessionId, id)
  assert.deepEqual(answer.body.llms, [
    { name: MODEL, kind: 'virtual', status: 'active' },
    { name: SECOND.name, kind: 'virtual', status: 'active' },
  ])
  assert.deepEqual(
    mcpd.sessions.get(id).providers.map((p) => p.name),
    [MODEL, SECOND.name],
  )
  // The dev mcpd's model list shows the change, with no reconnect.
  assert.deepEqual(
    (await client.models.list()).data.map((m) => m.id),
    [MODEL, SECOND.name],
  )
  assert.deepEqual(await llmStates(mcpd, registrar), { [MODEL]: 'active', [SECOND.name]: 'active' })

  const pending = client.chat.completions.create({ model: SECOND.name, messages: [{ role: 'user', content: 'hi' }] })
  const task = await registrar.nextTask()
  assert.equal(task.provider, SECOND.name)
  await registrar.result(task.taskId, 200, completion('from the second', SECOND.name))
  assert.equal((await pending).choices[0].message.content, 'from the second')
  assert.equal(mcpd.connections.length, 1)
  assert.deepEqual(mcpd.violations, [])
})

test('a name that leaves the set is inactive: no task is sent for it, a request for it is 404 model_not_found', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await connectedRegistrar(t, mcpd, { providers: [...PROVIDERS, SECOND] })
  const id = registrar.sessionId
  const client = openai(mcpd)

  registrar.providers = [SECOND]
  assert.equal((await registrar.register()).status, 200)
  assert.deepEqual(
    mcpd.sessions.get(id).providers.map((p) => p.name),
    [SECOND.name],
  )
  assert.deepEqual(await llmStates(mcpd, registrar), { [SECOND.name]: 'active', [MODEL]: 'inactive' })
  assert.deepEqual((await client.models.list()).data.map((m) => m.id).sort(), [MODEL, SECOND.name].sort())
  await assert.rejects(
    client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'hi' }] }),
    (error) => error.status === 404 && error.code === 'model_not_found',
  )
  assert.equal(registrar.channel.events.filter((e) => e.event === 'task').length, 0)

  // Back in the set, it is active again and no longer listed as inactive.
  registrar.providers = [SECOND, ...PROVIDERS]
  assert.equal((await registrar.register()).status, 200)
  assert.deepEqual(
    mcpd.sessions.get(id).providers.map((p) => p.name),
    [SECOND.name, MODEL],
  )
  assert.deepEqual(await llmStates(mcpd, registrar), { [SECOND.name]: 'active', [MODEL]: 'active' })
  assert.deepEqual(mcpd.violations, [])
})

test('a name one session drops stays active while another connected session publishes it', async (t) => {
  const mcpd = await startMcpd(t)
  const first = await connectedRegistrar(t, mcpd, { providers: [...PROVIDERS, SECOND] })
  const second = await connectedRegistrar(t, mcpd, { providers: PROVIDERS })
  first.providers = [SECOND]
  assert.equal((await first.register()).status, 200)
  assert.deepEqual(await llmStates(mcpd, first), { [MODEL]: 'active', [SECOND.name]: 'active' })
  const pending = openai(mcpd).chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'hi' }] })
  const task = await second.nextTask()
  assert.equal(task.provider, MODEL)
  await second.result(task.taskId, 200, completion('from the other session'))
  assert.equal((await pending).choices[0].message.content, 'from the other session')
  assert.equal(first.channel.events.filter((e) => e.event === 'task').length, 0)
})

test('after a cancel, the one chunk POST already on its way is tolerated; a second is a violation', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await connectedRegistrar(t, mcpd)
  const payloads = streamPayloads(['a', 'b', 'c'])
  const taskId = mcpd.sendTask({ provider: MODEL, body: { model: MODEL, messages: [], stream: true } })
  assert.equal((await registrar.nextTask()).taskId, taskId)
  await registrar.chunks(taskId, 0, payloads.slice(0, 1))
  mcpd.cancel(taskId)
  assert.deepEqual(JSON.parse((await registrar.next('cancel')).data), { taskId })
  await registrar.chunks(taskId, 1, payloads.slice(1, 2))
  assert.deepEqual(mcpd.violations, [])
  await registrar.chunks(taskId, 2, payloads.slice(2, 3))
  assert.equal(mcpd.violations.length, 1)
  assert.match(mcpd.violations[0], /^chunks after cancel: task /)
})

// --- callers and relayed headers (docs/protocol.md section 6) -------------------------------------

const ALICE = { id: 'u-1', name: 'alice@example.com', groups: ['ml-team'] }
const BOB = { id: 'u-2' }

test('callers: each API key attaches its caller to the tasks it sends; the token sends none', async (t) => {
  const mcpd = await startMcpd(t, { callers: { 'alice-key': ALICE, 'bob-key': BOB } })
  const registrar = await connectedRegistrar(t, mcpd)
  const ask = (key) =>
    openai(mcpd, key).chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: key }] })

  for (const [key, caller] of [
    ['alice-key', ALICE],
    ['bob-key', BOB],
    ['test-token', undefined],
  ]) {
    const answer = ask(key)
    const task = await registrar.nextTask()
    assert.equal(task.body.messages[0].content, key)
    assert.deepEqual(task.caller, caller)
    assert.equal('caller' in task, caller !== undefined)
    await registrar.result(task.taskId, 200, completion(`hi ${key}`))
    assert.equal((await answer).choices[0].message.content, `hi ${key}`)
  }
  // A caller key lists the models too, as any OpenAI client does first.
  assert.deepEqual(
    (await openai(mcpd, 'bob-key').models.list()).data.map((m) => m.id),
    [MODEL],
  )
  assert.deepEqual(mcpd.violations, [])
})

test('callers: a caller key never opens the registrar routes; an unknown key is 401 on the front', async (t) => {
  const mcpd = await startMcpd(t, { callers: { 'alice-key': ALICE }, pathPrefix: '/mcpd' })
  const asAlice = new TinyRegistrar(mcpd, { token: 'alice-key' })
  const register = await asAlice.register()
  assert.equal(register.status, 401)
  assert.equal(register.body.error.code, 'invalid_api_key')
  assert.equal(mcpd.registrations.length, 0)
  const registrar = await connectedRegistrar(t, mcpd)
  const result = await new TinyRegistrar(mcpd, { token: 'alice-key', sessionId: registrar.sessionId }).result(
    't-1',
    200,
    completion('forged'),
  )
  assert.equal(result.status, 401)
  const outside = await fetch(new URL('/elsewhere', mcpd.url), { headers: { authorization: 'Bearer alice-key' } })
  assert.equal(outside.status, 401)
  await outside.body.cancel()
  await assert.rejects(openai(mcpd, 'carol-key').models.list(), (error) => error.status === 401)
})

test('callers: bad options throw a TypeError naming the entry by position, never its key', () => {
  const cases = [
    [[], /callers must be an object/],
    [{ '': ALICE }, /key #0 is empty or holds whitespace/],
    [{ 'a key': ALICE }, /key #0 is empty/],
    [{ 'test-token': ALICE }, /key #0 is the registrar token/],
    [{ k: 'alice' }, /caller of key #0 is not an object/],
    [{ ok: ALICE, k: { id: '' } }, /caller of key #1 needs an id/],
    [{ k: { id: 'x'.repeat(257) } }, /needs an id/],
    [{ k: { id: 'é'.repeat(129) } }, /at most 256 bytes/],
    [{ k: { id: 'x', name: 7 } }, /has a name/],
    [{ k: { id: 'x', groups: 'ml' } }, /has groups/],
    [{ k: { id: 'x', groups: Array(65).fill('g') } }, /at most 64 strings/],
    [{ k: { id: 'x', groups: ['g'.repeat(257)] } }, /has groups/],
  ]
  for (const [callers, message] of cases) {
    assert.throws(
      () => new FakeMcpd({ token: 'test-token', callers }),
      (error) => error instanceof TypeError && message.test(error.message) && !error.message.includes('a key'),
      JSON.stringify(callers).slice(0, 80),
    )
  }
  // Bounds are inclusive, and other keys are allowed (mcpd may add some).
  const fine = { id: 'x'.repeat(256), name: 'n'.repeat(256), groups: Array(64).fill('g'.repeat(256)), team: 'ops' }
  assert.doesNotThrow(() => new FakeMcpd({ callers: { k: fine } }))
})

test('sendTask({ caller }) sends it as given, malformed included; without it the frame has none', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await connectedRegistrar(t, mcpd)
  const body = { model: MODEL, messages: [{ role: 'user', content: 'hi' }] }
  for (const caller of [ALICE, { id: 42 }, 'alice', null]) {
    const id = mcpd.sendTask({ provider: MODEL, body, caller })
    const task = await registrar.nextTask()
    assert.equal(task.taskId, id)
    assert.deepEqual(task.caller, caller)
  }
  mcpd.sendTask({ provider: MODEL, body, caller: undefined })
  assert.equal('caller' in (await registrar.nextTask()), false)
})

test("a result's retry-after reaches the OpenAI client, streaming or not; no other header does", async (t) => {
  const mcpd = await startMcpd(t, { callers: { 'alice-key': ALICE } })
  const registrar = await connectedRegistrar(t, mcpd)
  const limited = {
    error: { message: 'over 2 requests a minute', type: 'rate_limit_exceeded', code: 'requests_per_minute' },
  }
  const headers = { 'Retry-After': '12', 'set-cookie': 'session=1', 'x-internal': 'yes' }

  for (const stream of [false, true]) {
    const refused = openai(mcpd, 'alice-key')
      .chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'hi' }], stream })
      .then(
        () => assert.fail('the request was answered 200'),
        (error) => error,
      )
    const task = await registrar.nextTask()
    assert.deepEqual(task.caller, ALICE)
    await registrar.post(`/api/v1/llms/_provider-tasks/${task.taskId}/result`, { status: 429, body: limited, headers })
    const error = await refused
    assert.ok(error instanceof OpenAI.RateLimitError, `${error}`)
    assert.equal(error.status, 429)
    assert.equal(error.code, 'requests_per_minute')
    assert.equal(error.type, 'rate_limit_exceeded')
    assert.equal(error.headers.get('retry-after'), '12')
    assert.equal(error.headers.get('set-cookie'), null)
    assert.equal(error.headers.get('x-internal'), null)
    assert.deepEqual(await mcpd.outcome(task.taskId), { kind: 'result', status: 429, body: limited, headers })
  }
  assert.deepEqual(mcpd.violations, [])
})

test('result headers against the contract: each bad one is a violation; a malformed value is not relayed', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await connectedRegistrar(t, mcpd)
  const error = (type, code) => ({ error: { message: code, type, code } })
  const cases = [
    [429, error('rate_limit_exceeded', 'tokens_per_day'), undefined, /429 tokens_per_day without a retry-after/],
    // Well-formed, so mcpd relays it, but the contract sends none with a pause.
    [
      503,
      error('unavailable', 'provider_paused'),
      { 'retry-after': '5' },
      /503 provider_paused with a retry-after/,
      '5',
    ],
    [429, error('rate_limit_exceeded', 'tokens_per_minute'), { 'retry-after': 'soon' }, /retry-after "soon" is not/],
    [429, error('rate_limit_exceeded', 'tokens_per_minute'), { 'retry-after': '1.5' }, /retry-after "1\.5" is not/],
    [429, error('rate_limit_exceeded', 'queue_full'), ['retry-after', '3'], /headers is not an object/],
    [429, error('rate_limit_exceeded', 'queue_full'), { 'retry-after': 3 }, /"retry-after" is not a string/],
  ]
  for (const [status, body, headers, violation, relayed = null] of cases) {
    const answer = fetch(`${mcpd.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: 'Bearer test-token', 'content-type': 'application/json' },
      body: JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'hi' }] }),
    })
    const task = await registrar.nextTask()
    const before = mcpd.violations.length
    await registrar.post(`/api/v1/llms/_provider-tasks/${task.taskId}/result`, { status, body, headers })
    const res = await answer
    await res.body.cancel()
    assert.equal(res.status, status)
    assert.equal(res.headers.get('retry-after'), relayed, `${violation}: only a valid retry-after is relayed`)
    assert.equal(mcpd.violations.length, before + 1, `${violation}: ${mcpd.violations.slice(before)}`)
    assert.match(mcpd.violations.at(-1), violation)
  }
  // A registrar never sends the caller back to mcpd.
  const id = mcpd.sendTask({ provider: MODEL, body: { model: MODEL, messages: [] }, caller: ALICE })
  await registrar.nextTask()
  await registrar.post(`/api/v1/llms/_provider-tasks/${id}/result`, {
    status: 403,
    body: error('permission_denied', 'caller_not_allowed'),
    caller: ALICE,
  })
  assert.match(mcpd.violations.at(-1), /sends the caller back to mcpd/)
})

test('the dev mcpd --caller flag maps API keys to callers; a bad one exits 2', async (t) => {
  const bin = fileURLToPath(new URL('../bin/dev-mcpd.js', import.meta.url))
  const bobJson = JSON.stringify({ id: 'u-2', name: 'bob', groups: ['ml-team'] })
  const child = spawn(
    process.execPath,
    [bin, '--token', 'demo', '--caller', 'alice-key=alice', '--caller', `bob-key=${bobJson}`, '--quiet'],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  )
  t.after(() => {
    if (child.exitCode === null) child.kill('SIGKILL')
  })
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })))
  let out = ''
  child.stdout.setEncoding('utf8')
  child.stdout.on('data', (text) => {
    out += text
  })
  const poll = { url: null, waitFor: pollUntil }
  await pollUntil(() => out.split('\n').length > 3)
  const lines = out.split('\n')
  poll.url = /^dev mcpd listening on (http:\/\/127\.0\.0\.1:\d+) \(token: demo\)$/.exec(lines[0])?.[1]
  assert.ok(poll.url, out)
  assert.equal(lines[1], '  API key alice-key acts as caller {"id":"alice"}')
  assert.equal(lines[2], `  API key bob-key acts as caller ${bobJson}`)

  const registrar = new TinyRegistrar(poll, { token: 'demo' })
  t.after(() => registrar.close())
  assert.equal((await registrar.register()).status, 201)
  await registrar.connect()
  await pollUntil(async () => (await openai(poll, 'bob-key').models.list()).data.length === 1)
  const answer = openai(poll, 'bob-key').chat.completions.create({ model: MODEL, messages: [] })
  const task = await registrar.nextTask()
  assert.deepEqual(task.caller, JSON.parse(bobJson))
  await registrar.result(task.taskId, 200, completion('hi bob'))
  assert.equal((await answer).choices[0].message.content, 'hi bob')
  registrar.close()
  child.kill('SIGTERM')
  assert.deepEqual(await exited, { code: 0, signal: null })

  for (const args of [
    ['--caller', 'alice'],
    ['--caller', 'k={bad'],
    ['--token', 'demo', '--caller', 'demo=x'],
  ]) {
    const bad = spawn(process.execPath, [bin, ...args, '--quiet'], { stdio: ['ignore', 'ignore', 'pipe'] })
    let stderr = ''
    bad.stderr.setEncoding('utf8')
    bad.stderr.on('data', (text) => {
      stderr += text
    })
    const code = await new Promise((resolve) => bad.once('exit', resolve))
    assert.equal(code, 2, `${args.join(' ')}: ${stderr}`)
    assert.match(stderr, /--caller|callers:/)
  }
})

test("a heartbeat entry's paused is a boolean when present", async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await connectedRegistrar(t, mcpd)
  const load = { name: MODEL, inFlight: 0, queued: 0, maxConcurrency: 4, completed: 0, failed: 0 }
  for (const paused of [true, false, undefined]) {
    assert.equal((await registrar.heartbeat([{ ...load, paused }])).status, 204)
  }
  assert.deepEqual(mcpd.violations, [])
  await registrar.heartbeat([{ ...load, paused: 'yes' }])
  assert.deepEqual(mcpd.violations, [`heartbeat provider ${MODEL}: paused "yes" is not a boolean`])
  assert.equal(mcpd.heartbeats.at(-1).body.providers[0].paused, 'yes')
})

/** Polls until `predicate` is truthy, at most 5 s: the dev mcpd runs in a child, out of FakeMcpd's reach. */
async function pollUntil(predicate, { timeoutMs = 5000 } = {}) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = await Promise.resolve()
      .then(predicate)
      .catch(() => false)
    if (value) return value
    if (Date.now() > deadline) throw new Error(`pollUntil: not met in ${timeoutMs} ms: ${predicate}`)
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
}

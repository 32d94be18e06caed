// The demo (`npm run demo`) run as a user runs it, and its providers in process: the demo
// model, and the OpenAI-compatible upstream bridge against a node:http fake of such a server.

import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { createServer } from 'node:http'
import { createRequire } from 'node:module'
import test from 'node:test'
import { fileURLToPath } from 'node:url'
import { countingReply, createDemoProvider, createUpstreamProvider, DEMO_REPLIES } from '../examples/providers.mjs'
import { nodeCommand, scaledMs } from './helpers.mjs'

const ROOT = fileURLToPath(new URL('..', import.meta.url))
// The demo's step 6 runs only on a build with the owner controls (issue 16); it says so otherwise.
const OWNER_CONTROLS =
  typeof createRequire(import.meta.url)('../index.js').VirtualLlmRegistrar.prototype.pause === 'function'
const DEMO = fileURLToPath(new URL('../examples/demo.mjs', import.meta.url))
const FINAL_LINE = 'demo finished: all steps passed'
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** Runs the demo as a child, bounded; every stdout chunk is kept with its arrival time. */
function runDemo(t, args = [], { timeoutMs = 60_000 } = {}) {
  const env = { ...process.env }
  delete env.MCPCTL_LOG // the user's log level must not add lines to what is asserted
  const child = spawn(...nodeCommand([DEMO, ...args]), { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] })
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
  })
  const started = performance.now()
  const chunks = []
  let stderr = ''
  child.stdout.setEncoding('utf8')
  child.stderr.setEncoding('utf8')
  child.stdout.on('data', (text) => chunks.push({ at: performance.now() - started, text }))
  child.stderr.on('data', (text) => {
    stderr += text
  })
  return new Promise((resolve, reject) => {
    let timedOut = false
    const timer = setTimeout(() => {
      timedOut = true
      child.kill('SIGKILL')
    }, timeoutMs)
    child.on('error', (error) => {
      clearTimeout(timer)
      reject(error)
    })
    child.on('close', (code, signal) => {
      clearTimeout(timer)
      const stdout = chunks.map((chunk) => chunk.text).join('')
      resolve({ code, signal, timedOut, chunks, stdout, stderr, elapsedMs: performance.now() - started })
    })
  })
}

/** The stdout chunks that carry part of `text`, with their arrival times. */
function chunksCarrying(run, text) {
  const start = run.stdout.indexOf(text)
  assert.notEqual(start, -1, `stdout lacks ${JSON.stringify(text)}`)
  const end = start + text.length
  let offset = 0
  const carrying = []
  for (const chunk of run.chunks) {
    const chunkEnd = offset + chunk.text.length
    if (chunkEnd > start && offset < end) carrying.push(chunk)
    offset = chunkEnd
  }
  return carrying
}

const explain = (run) =>
  `exit ${run.code}${run.signal ? ` (${run.signal})` : ''}${run.timedOut ? ', timed out after 60 s' : ''}\n--- stdout\n${run.stdout}\n--- stderr\n${run.stderr}`

test('npm run demo: every step, the streamed tokens live, and a clean exit 0 by itself', async (t) => {
  const run = await runDemo(t)
  t.diagnostic(`demo took ${run.elapsedMs.toFixed(0)} ms, ${run.chunks.length} stdout chunks`)
  assert.equal(run.code, 0, explain(run))
  assert.equal(run.timedOut, false)
  assert.equal(run.stderr, '', 'a successful run warns about nothing')
  const out = run.stdout

  // 1. models.list() shows the published provider.
  assert.match(out, /\[1\/7\] client\.models\.list\(\)\n {2}demo-llm {2}/)
  // 2. The non-streaming answer, and its usage.
  assert.ok(out.includes(`demo-llm: ${DEMO_REPLIES.hello}`), out)
  assert.match(out, /finish_reason stop, usage 7 prompt \+ 18 completion = 25 tokens/)
  // 3. The streamed answer, whole.
  assert.ok(out.includes(`demo-llm: ${DEMO_REPLIES.relay}\n`), out)
  // 4. The client cancels after 5 tokens and the provider's signal fires before the end.
  assert.ok(out.includes('client: got "1 2 3 4 5", calling stream.controller.abort()'), out)
  const aborted = /provider: aborted after (\d+) tokens/.exec(out)
  assert.ok(aborted, out)
  const tokensBeforeAbort = Number(aborted[1])
  assert.ok(tokensBeforeAbort >= 5 && tokensBeforeAbort < 100, `aborted after ${tokensBeforeAbort} of 100 tokens`)
  // 5. update() publishes a second provider under the same session; /v1/models lists both, no restart.
  const sessionId = /registrar {4}connected, session (\S+),/.exec(out)?.[1]
  assert.ok(sessionId, out)
  assert.ok(
    out.includes(
      `[5/7] registrar.update([...]): publishing demo-llm-2 too, no restart\n  registrar    connected, same session ${sessionId}, publishing demo-llm, demo-llm-2\n`,
    ),
    out,
  )
  assert.match(
    out,
    /client\.models\.list\(\):\n {2}demo-llm {2}\(owned by [^)]+\)\n {2}demo-llm-2 {2}\(owned by [^)]+\)\n/,
  )
  // 6. The owner's controls, seen through the official openai client: a caller refused, a
  // rate limit answered 429 with retry-after, a pause answered 503 without one.
  assert.ok(out.includes("[6/7] the owner's controls: allowCallers, limits, pause()\n"), out)
  if (OWNER_CONTROLS) {
    assert.ok(out.includes('  demo-llm-2   allowCallers ["ml-team"], limits {"requestsPerMinute":1}\n'), out)
    assert.match(out, /\n {2}alice -> demo-llm-2: 200 "Hello! I am demo-llm,"\n/)
    assert.ok(out.includes('  bob   -> demo-llm-2: 403 permission_denied / caller_not_allowed, no retry-after\n'), out)
    const limited =
      /\n {2}alice -> demo-llm-2: 429 rate_limit_exceeded \/ requests_per_minute, retry-after: (\d+) s\n/.exec(out)
    assert.ok(limited, out)
    assert.ok(Number(limited[1]) >= 1 && Number(limited[1]) <= 61, `retry-after ${limited[1]}`)
    assert.ok(out.includes(`  registrar.pause({ provider: 'demo-llm' }): paused ["demo-llm"]\n`), out)
    assert.ok(out.includes('  alice -> demo-llm: 503 unavailable / provider_paused, no retry-after\n'), out)
    assert.ok(out.includes('  registrar.resume(): paused []\n'), out)
    // demo-llm: steps 2, 3 and 4 (the cancelled stream reached the provider too); demo-llm-2: alice's 4 tokens.
    assert.match(
      out,
      /\n {2}usage\(\) demo-llm: 3 tasks, \d+ \+ \d+ tokens, refused: provider_paused 1\n {2}usage\(\) demo-llm-2: 1 tasks, \d+ \+ 4 tokens, refused: caller_not_allowed 1, requests_per_minute 1\n/,
    )
    // A few lines of metrics(), as Prometheus text.
    assert.match(
      out,
      /\n {2}metrics\(\) mcpctl_registrar_requests_total\{outcome="completed",provider="demo-llm"\} \d+\n/,
    )
    assert.match(
      out,
      /\n {2}metrics\(\) mcpctl_registrar_requests_refused_total\{provider="demo-llm-2",reason="caller_not_allowed"\} 1\n/,
    )
  } else {
    assert.ok(out.includes('  skipped: this build of the registrar has no owner controls yet (issue 16)\n'), out)
  }
  // 7. Everything down, and the last line says so (the owner's refusals count as failed).
  const tasks = OWNER_CONTROLS ? '3 completed, 3 failed' : '2 completed, 0 failed'
  assert.ok(out.includes(`registrar stopped (state stopped; tasks: ${tasks}, 0 in flight)`), out)
  assert.match(out, /dev mcpd closed/)
  assert.match(out, /temporary config dir removed/)
  assert.equal(out.trimEnd().split('\n').at(-1), FINAL_LINE)

  // The dev mcpd listened on a loopback port picked by the OS, and the temp config dir is gone.
  assert.match(out, /dev mcpd {5}http:\/\/127\.0\.0\.1:\d+ /)
  const configDir = /config dir {3}(\S+)/.exec(out)?.[1]
  assert.ok(configDir && !configDir.includes('.mcpctl'), `config dir ${configDir}`)
  assert.equal(existsSync(configDir), false, `${configDir} was removed`)

  // The streamed answer came token by token: many writes, spread over time (40 ms per token).
  const streamed = chunksCarrying(run, DEMO_REPLIES.relay)
  const spreadMs = streamed.at(-1).at - streamed[0].at
  t.diagnostic(`streamed answer: ${streamed.length} stdout chunks over ${spreadMs.toFixed(0)} ms`)
  assert.ok(streamed.length >= 10, `the streamed answer arrived in ${streamed.length} stdout chunks`)
  assert.ok(spreadMs >= 400, `the streamed answer arrived within ${spreadMs.toFixed(0)} ms`)
})

test('demo: an unknown flag is a clear error with exit code 1', async (t) => {
  const run = await runDemo(t, ['--no-such-flag'])
  assert.equal(run.code, 1, explain(run))
  assert.match(run.stderr, /demo failed: Unknown option '--no-such-flag'/)
  assert.match(run.stderr, /--upstream <url>/)
})

// --- the demo model ------------------------------------------------------------------

const request = (content, extra = {}) => {
  const body = { model: 'demo-llm', messages: [{ role: 'user', content }], ...extra }
  return { messages: body.messages, request: body, ...(extra.max_tokens ? { maxTokens: extra.max_tokens } : {}) }
}

test('demo provider: complete() and stream() give the same answer, with usage, and honour maxTokens', async () => {
  const provider = createDemoProvider({ tokenDelayMs: 1, log: () => {} })
  const signal = new AbortController().signal

  const whole = await provider.complete({ ...request('Who are you?'), signal })
  assert.deepEqual(whole, {
    content: DEMO_REPLIES.hello,
    model: 'demo-1',
    finishReason: 'stop',
    usage: { promptTokens: 3, completionTokens: 18, totalTokens: 21 },
  })

  const chunks = []
  for await (const chunk of provider.stream({ ...request('Who are you?'), signal })) chunks.push(chunk)
  assert.equal(
    chunks
      .slice(0, -1)
      .map((c) => c.content)
      .join(''),
    DEMO_REPLIES.hello,
  )
  assert.deepEqual(chunks.at(-1), {
    finishReason: 'stop',
    usage: { promptTokens: 3, completionTokens: 18, totalTokens: 21 },
  })

  const cut = await provider.complete({ ...request('Count from 1 to 10', { max_tokens: 3 }), signal })
  assert.equal(cut.content, '1 2 3')
  assert.equal(cut.finishReason, 'length')
})

test('demo provider: its AbortSignal stops the stream and is logged with the tokens produced', async () => {
  const lines = []
  const aborts = []
  const provider = createDemoProvider({
    tokenDelayMs: 5,
    log: (line) => lines.push(line),
    onAbort: (n) => aborts.push(n),
  })
  const controller = new AbortController()
  const got = []
  await assert.rejects(
    async () => {
      for await (const chunk of provider.stream({ ...request('Count from 1 to 1000'), signal: controller.signal })) {
        got.push(chunk.content)
        if (got.length === 3) controller.abort()
      }
    },
    { name: 'AbortError' },
  )
  assert.deepEqual(got, ['1', ' 2', ' 3'])
  assert.deepEqual(lines, ['provider: aborted after 3 tokens'])
  assert.deepEqual(aborts, [3])
  assert.equal(countingReply(3), '1 2 3')
})

// --- the upstream provider against a fake OpenAI-compatible server -----------------------

/** A node:http fake of an OpenAI-compatible server on loopback; `handle(req, res, body)` answers. */
async function fakeUpstream(t, handle) {
  const requests = []
  const closedEarly = []
  const server = createServer(async (req, res) => {
    let text = ''
    req.setEncoding('utf8')
    for await (const piece of req) text += piece
    const body = text ? JSON.parse(text) : null
    const record = { method: req.method, url: req.url, headers: req.headers, body }
    requests.push(record)
    res.on('close', () => {
      if (!res.writableFinished) closedEarly.push(record)
    })
    try {
      await handle(req, res, body)
    } catch (error) {
      if (!res.headersSent) res.writeHead(500).end(String(error))
      else res.destroy()
    }
  })
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.after(
    () =>
      new Promise((resolve) => {
        server.closeAllConnections()
        server.close(resolve)
      }),
  )
  return { url: `http://127.0.0.1:${server.address().port}/v1`, requests, closedEarly }
}

function sendJson(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' })
  res.end(JSON.stringify(body))
}

const chunkOf = (delta, finishReason = null, extra = {}) =>
  JSON.stringify({
    id: 'chatcmpl-up',
    object: 'chat.completion.chunk',
    created: 1,
    model: 'up-model',
    choices: [{ index: 0, delta, finish_reason: finishReason }],
    ...extra,
  })

/** Writes one SSE event per payload, `delayMs` apart, stopping when the client goes away. */
async function streamPayloads(res, payloads, { delayMs = 0 } = {}) {
  res.writeHead(200, { 'content-type': 'text/event-stream' })
  for (const [i, payload] of payloads.entries()) {
    if (i > 0 && delayMs) await sleep(delayMs)
    if (res.destroyed) return
    res.write(`data: ${payload}\n\n`)
  }
  res.end()
}

function callOptions(body, signal = new AbortController().signal) {
  return { messages: body.messages, model: body.model, request: body, signal }
}

test('upstream provider: a non-streaming request is forwarded as is (model overridden) and the answer mapped back, tool calls included', async (t) => {
  const upstream = await fakeUpstream(t, (_req, res) =>
    sendJson(res, 200, {
      id: 'chatcmpl-1',
      object: 'chat.completion',
      created: 1,
      model: 'up-model-2024',
      choices: [
        {
          index: 0,
          message: {
            role: 'assistant',
            content: null,
            tool_calls: [
              { id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Paris"}' } },
            ],
          },
          finish_reason: 'tool_calls',
        },
      ],
      usage: { prompt_tokens: 12, completion_tokens: 9, total_tokens: 21 },
    }),
  )
  const provider = createUpstreamProvider({
    baseURL: `${upstream.url}/`,
    model: 'up-model',
    apiKey: 'up-key',
    log: () => {},
  })
  const tools = [
    {
      type: 'function',
      function: { name: 'get_weather', parameters: { type: 'object', properties: { city: { type: 'string' } } } },
    },
  ]
  const body = {
    model: 'upstream-llm',
    messages: [{ role: 'user', content: 'Weather in Paris?' }],
    tools,
    tool_choice: 'auto',
    temperature: 0.2,
    max_tokens: 50,
    stream: false,
  }

  const result = await provider.complete(callOptions(body))

  assert.deepEqual(result, {
    content: null,
    toolCalls: [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Paris"}' } }],
    finishReason: 'tool_calls',
    usage: { promptTokens: 12, completionTokens: 9, totalTokens: 21 },
    model: 'up-model-2024',
  })
  assert.equal(upstream.requests.length, 1)
  const [sent] = upstream.requests
  assert.equal(sent.method, 'POST')
  assert.equal(sent.url, '/v1/chat/completions')
  assert.equal(sent.headers.authorization, 'Bearer up-key')
  const { stream: _stream, ...forwarded } = body
  assert.deepEqual(sent.body, { ...forwarded, model: 'up-model' })
})

test('upstream provider: a stream split at every few bytes maps to content, tool-call deltas, finish reason and usage', async (t) => {
  const payloads = [
    chunkOf({ role: 'assistant', content: '' }, null, { usage: null }),
    chunkOf({ content: 'Café ' }, null, { usage: null }),
    chunkOf({ content: '☕ first' }, null, { usage: null }),
    chunkOf(
      { tool_calls: [{ index: 0, id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '' } }] },
      null,
      { usage: null },
    ),
    chunkOf({ tool_calls: [{ index: 0, function: { arguments: '{"city":' } }] }, null, { usage: null }),
    chunkOf({ tool_calls: [{ index: 0, function: { arguments: '"Paris"}' } }] }, null, { usage: null }),
    chunkOf({}, 'tool_calls', { usage: null }),
    JSON.stringify({
      id: 'chatcmpl-up',
      object: 'chat.completion.chunk',
      created: 1,
      model: 'up-model',
      choices: [],
      usage: { prompt_tokens: 12, completion_tokens: 9, total_tokens: 21 },
    }),
    '[DONE]',
  ]
  // CRLF line ends, a comment, and 3-byte writes: frames, lines and UTF-8 sequences all split.
  const bytes = Buffer.from(`: keep-alive\r\n\r\n${payloads.map((p) => `data: ${p}\r\n\r\n`).join('')}`)
  const upstream = await fakeUpstream(t, async (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    for (let i = 0; i < bytes.length; i += 3) {
      res.write(bytes.subarray(i, i + 3))
      if (i % 60 === 0) await sleep(1)
    }
    res.end()
  })
  const provider = createUpstreamProvider({ baseURL: upstream.url, model: 'up-model', log: () => {} })
  const body = {
    model: 'upstream-llm',
    messages: [{ role: 'user', content: 'Weather in Paris?' }],
    temperature: 0,
    stream: true,
  }

  const chunks = []
  for await (const chunk of provider.stream(callOptions(body))) chunks.push(chunk)

  assert.deepEqual(chunks, [
    { content: 'Café ' },
    { content: '☕ first' },
    { toolCalls: [{ index: 0, id: 'call_1', function: { name: 'get_weather', arguments: '' } }] },
    { toolCalls: [{ index: 0, function: { arguments: '{"city":' } }] },
    { toolCalls: [{ index: 0, function: { arguments: '"Paris"}' } }] },
    { finishReason: 'tool_calls' },
    { usage: { promptTokens: 12, completionTokens: 9, totalTokens: 21 } },
  ])
  const [sent] = upstream.requests
  assert.equal(sent.headers.authorization, undefined, 'no api key, no authorization header')
  assert.deepEqual(sent.body, { ...body, model: 'up-model', stream: true, stream_options: { include_usage: true } })
})

test('upstream provider: the AbortSignal aborts the upstream request, and the abort is logged', async (t) => {
  const upstream = await fakeUpstream(t, (_req, res) =>
    streamPayloads(
      res,
      Array.from({ length: 500 }, (_, i) => chunkOf({ content: ` ${i + 1}` })),
      { delayMs: 10 },
    ),
  )
  const lines = []
  const provider = createUpstreamProvider({ baseURL: upstream.url, model: 'up-model', log: (line) => lines.push(line) })
  const controller = new AbortController()
  const got = []
  await assert.rejects(
    async () => {
      for await (const chunk of provider.stream(
        callOptions({ model: 'x', messages: [{ role: 'user', content: 'Count' }], stream: true }, controller.signal),
      )) {
        got.push(chunk.content)
        if (got.length === 2) controller.abort()
      }
    },
    { name: 'AbortError' },
  )
  assert.deepEqual(got, [' 1', ' 2'])
  assert.deepEqual(lines, ['provider: aborted after 2 tokens'])
  for (let waited = 0; upstream.closedEarly.length === 0 && waited < 2000; waited += 10) await sleep(10)
  assert.equal(upstream.closedEarly.length, 1, 'the upstream saw its client go away')
})

test('upstream provider: upstream errors become rejections that name the status and message', async (t) => {
  const upstream = await fakeUpstream(t, (_req, res, body) => {
    if (!body.stream) return sendJson(res, 401, { error: { message: 'bad api key', type: 'invalid_request_error' } })
    return streamPayloads(res, [
      chunkOf({ content: 'partial' }),
      JSON.stringify({ error: { message: 'model crashed' } }),
      '[DONE]',
    ])
  })
  const provider = createUpstreamProvider({ baseURL: upstream.url, model: 'up-model', apiKey: 'wrong', log: () => {} })
  const body = { model: 'x', messages: [{ role: 'user', content: 'hi' }] }
  await assert.rejects(provider.complete(callOptions(body)), /upstream answered 401 Unauthorized: bad api key/)
  const got = []
  await assert.rejects(async () => {
    for await (const chunk of provider.stream(callOptions({ ...body, stream: true }))) got.push(chunk)
  }, /upstream stream failed: model crashed/)
  assert.deepEqual(got, [{ content: 'partial' }])
})

test('demo --upstream: publishes an OpenAI-compatible server end to end (fake upstream on loopback)', async (t) => {
  const answer = 'I am the upstream model.'
  const streamedWords = ['The', ' request', ' came', ' through', ' mcpd', ' and', ' the', ' registrar.']
  const upstream = await fakeUpstream(t, (req, res, body) => {
    if (req.method === 'GET' && req.url === '/v1/models')
      return sendJson(res, 200, { object: 'list', data: [{ id: 'up-model', object: 'model' }] })
    const prompt = body.messages.at(-1).content
    if (!body.stream) {
      return sendJson(res, 200, {
        id: 'c',
        object: 'chat.completion',
        created: 1,
        model: body.model,
        choices: [{ index: 0, message: { role: 'assistant', content: answer }, finish_reason: 'stop' }],
        usage: { prompt_tokens: 8, completion_tokens: 6, total_tokens: 14 },
      })
    }
    const words = /^Count/.test(prompt)
      ? Array.from({ length: 100 }, (_, i) => `${i ? ' ' : ''}${i + 1}`)
      : streamedWords
    return streamPayloads(
      res,
      [
        chunkOf({ role: 'assistant', content: '' }),
        ...words.map((w) => chunkOf({ content: w })),
        chunkOf({}, 'stop'),
        JSON.stringify({
          id: 'chatcmpl-up',
          object: 'chat.completion.chunk',
          created: 1,
          model: body.model,
          choices: [],
          usage: { prompt_tokens: 9, completion_tokens: words.length, total_tokens: 9 + words.length },
        }),
        '[DONE]',
      ],
      // Paced so that the client's abort after 5 tokens reaches the provider mid-stream:
      // emulated, the abort's trip through mcpd can outlast 100 words at 20 ms.
      { delayMs: scaledMs(20) },
    )
  })

  const run = await runDemo(t, ['--upstream', upstream.url, '--api-key', 'up-key'])

  assert.equal(run.code, 0, explain(run))
  const out = run.stdout
  assert.match(out, /upstream {5}http:\/\/127\.0\.0\.1:\d+\/v1, model up-model/)
  assert.match(out, /\[1\/7\] client\.models\.list\(\)\n {2}upstream-llm\b/)
  if (OWNER_CONTROLS) {
    // The pause step pauses the first model, here the upstream one, which is then never called.
    assert.ok(out.includes('  alice -> upstream-llm: 503 unavailable / provider_paused, no retry-after\n'), out)
  }
  assert.match(out, /client\.models\.list\(\):\n {2}upstream-llm {2}\(owned by [^)]+\)\n {2}demo-llm-2 {2}/)
  assert.ok(out.includes(`upstream-llm: ${answer}`), out)
  assert.ok(out.includes(`upstream-llm: ${streamedWords.join('')}\n`), out)
  assert.ok(out.includes('client: got "1 2 3 4 5", calling stream.controller.abort()'), out)
  assert.match(out, /provider: aborted after \d+ tokens/)
  assert.equal(out.trimEnd().split('\n').at(-1), FINAL_LINE)

  const chats = upstream.requests.filter((r) => r.url === '/v1/chat/completions')
  assert.equal(chats.length, 3)
  assert.ok(chats.every((r) => r.body.model === 'up-model' && r.headers.authorization === 'Bearer up-key'))
  assert.equal(upstream.closedEarly.length, 1, 'the cancelled stream was aborted upstream too')
  assert.equal(upstream.closedEarly[0].body.messages.at(-1).content.startsWith('Count'), true)
})

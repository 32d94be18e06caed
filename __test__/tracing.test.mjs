// One trace from mcpd through the registrar to the provider's own HTTP call (issue 17,
// docs/protocol.md section 5, API.md "Spans"): the task span's parent, ids and GenAI
// attributes as an in-memory exporter records them, the provider's instrumented HTTP
// call to a loopback server as its child, `options.trace`, and the `traceparent`
// header on the result and chunk POSTs as the fake mcpd received them. The tests run
// in order: the first two run before any tracer provider is registered (nothing is
// recorded, mcpd's context is passed through as sent); the second then registers one
// while its registrar runs, and the tests after it keep it.

import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { readdirSync, readFileSync } from 'node:fs'
import { copyFile, link, mkdir, mkdtemp, rm, symlink } from 'node:fs/promises'
import http from 'node:http'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import test from 'node:test'
import { fileURLToPath } from 'node:url'
import vm from 'node:vm'
import { SpanKind, trace } from '@opentelemetry/api'
import { HttpInstrumentation } from '@opentelemetry/instrumentation-http'
import { InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base'
import { NodeTracerProvider } from '@opentelemetry/sdk-trace-node'
import OpenAI from 'openai'
import { chatBody, nodeCommand, startMcpd, startRegistrar, TOKEN, tempConfigDir } from './helpers.mjs'

const require = createRequire(import.meta.url)

const TRACE_ID = '4bf92f3577b34da6a3ce929d0e0e4736'
const MCPD_SPAN = '00f067aa0ba902b7'
const MCPD_TRACEPARENT = `00-${TRACE_ID}-${MCPD_SPAN}-01`
// Text that must never reach a span: in the prompt, a tool argument and the answer.
const PROMPT_CANARY = 'prompt-canary-7f3a9c'
const ANSWER_CANARY = 'answer-canary-51be20'

const exporter = new InMemorySpanExporter()
const tracerProvider = new NodeTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] })
// Patches `http` once enabled (at the end of the second test), as mcplocal's SDK setup would.
const httpInstrumentation = new HttpInstrumentation({ enabled: false })
httpInstrumentation.setTracerProvider(tracerProvider)
// Until then, the plain module.
let instrumentedHttp = http

/** A loopback server standing for Ollama: records each request's traceparent. */
async function startUpstream(t) {
  const seen = []
  const server = http.createServer((req, res) => {
    seen.push(req.headers.traceparent ?? null)
    res.setHeader('content-type', 'application/json')
    res.end(JSON.stringify({ ok: true }))
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.after(() => server.close())
  return { url: `http://127.0.0.1:${server.address().port}/api/chat`, seen }
}

/** One GET through the instrumented `http`, as a provider's client library makes it. */
function callUpstream(url) {
  return new Promise((resolve, reject) => {
    instrumentedHttp
      .get(url, (res) => {
        res.resume()
        res.on('end', resolve)
      })
      .on('error', reject)
  })
}

/** A provider that calls the upstream inside complete() and stream(), and records its options. */
function tracedProvider(upstream) {
  const calls = []
  return {
    calls,
    async complete(options) {
      calls.push(options)
      await callUpstream(upstream.url)
      return {
        content: `the answer ${ANSWER_CANARY}`,
        finishReason: 'end_turn',
        model: 'upstream-model',
        usage: { promptTokens: 11, completionTokens: 7 },
      }
    },
    async *stream(options) {
      calls.push(options)
      yield { content: `part one ${ANSWER_CANARY}` }
      // After a yield: the loop's later steps must still run inside the span.
      await callUpstream(upstream.url)
      yield { content: ' part two' }
      yield { finishReason: 'length', usage: { promptTokens: 5, completionTokens: 2 } }
    },
  }
}

const body = (extra = {}) =>
  chatBody({
    model: 'local',
    messages: [{ role: 'user', content: `please ${PROMPT_CANARY}` }],
    tools: [
      {
        type: 'function',
        function: { name: 'lookup', parameters: { type: 'object', properties: { q: { const: PROMPT_CANARY } } } },
      },
    ],
    max_tokens: 64,
    temperature: 0.5,
    top_p: 0.9,
    ...extra,
  })

/** The `traceparent` header of each POST the fake mcpd received for `taskId`'s `kind` (result, chunks). */
const postHeaders = (mcpd, taskId, kind) =>
  mcpd.requests.filter((r) => r.path.endsWith(`/${taskId}/${kind}`)).map((r) => r.headers.traceparent ?? null)

const taskSpans = () => exporter.getFinishedSpans().filter((span) => span.name.startsWith('chat'))
const parentId = (span) => span.parentSpanContext?.spanId ?? span.parentSpanId
const traceparentOf = (span) => `00-${span.spanContext().traceId}-${span.spanContext().spanId}-01`

/** The one task span whose mcpctl.task.id is `taskId`, once the exporter has it. */
async function spanOf(mcpd, taskId) {
  return mcpd.waitFor(() => taskSpans().find((span) => span.attributes['mcpctl.task.id'] === taskId))
}

function assertNoText(spans) {
  const recorded = JSON.stringify(
    spans.map((span) => ({ name: span.name, attributes: span.attributes, events: span.events })),
  )
  assert.ok(!recorded.includes(PROMPT_CANARY), 'prompt text on a span')
  assert.ok(!recorded.includes(ANSWER_CANARY), 'completion text on a span')
}

test('the fake mcpd sends the client’s traceparent in the task frame, else a fresh one', async (t) => {
  const mcpd = await startMcpd(t)
  const provider = tracedProvider({ url: null })
  provider.complete = async (options) => {
    provider.calls.push(options)
    return { content: 'hi' }
  }
  await startRegistrar(t, mcpd, { local: provider })
  const client = new OpenAI({ baseURL: `${mcpd.url}/v1`, apiKey: TOKEN, maxRetries: 0 })
  const messages = [{ role: 'user', content: 'hi' }]

  await client.chat.completions.create({ model: 'local', messages }, { headers: { traceparent: MCPD_TRACEPARENT } })
  assert.deepEqual(provider.calls[0].trace, { traceparent: MCPD_TRACEPARENT })
  // A client without one (or with a malformed one) gets a fresh trace from mcpd.
  for (const headers of [{}, { traceparent: MCPD_TRACEPARENT.toUpperCase() }]) {
    await client.chat.completions.create({ model: 'local', messages }, { headers })
    const { traceparent } = provider.calls.at(-1).trace
    assert.match(traceparent, /^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/)
    assert.ok(!traceparent.includes(TRACE_ID))
  }
})

test('without a tracer provider nothing is recorded and mcpd’s context is passed through; one registered after start() is used', async (t) => {
  const mcpd = await startMcpd(t)
  const upstream = await startUpstream(t)
  const provider = tracedProvider(upstream)
  await startRegistrar(t, mcpd, { local: provider })

  const valid = mcpd.sendTask({
    provider: 'local',
    body: body(),
    traceparent: MCPD_TRACEPARENT,
    tracestate: 'vendor=value',
  })
  assert.equal((await mcpd.outcome(valid)).status, 200)
  assert.deepEqual(provider.calls[0].trace, { traceparent: MCPD_TRACEPARENT, tracestate: 'vendor=value' })
  assert.deepEqual(postHeaders(mcpd, valid, 'result'), [MCPD_TRACEPARENT])

  // Malformed ones (upper-case hex, version ff, all-zero id, wrong type): ignored, never refused.
  const malformed = [
    MCPD_TRACEPARENT.toUpperCase(),
    `ff-${TRACE_ID}-${MCPD_SPAN}-01`,
    `00-${'0'.repeat(32)}-${MCPD_SPAN}-01`,
    42,
  ]
  for (const traceparent of malformed) {
    const taskId = mcpd.sendTask({ provider: 'local', body: body(), traceparent })
    assert.equal((await mcpd.outcome(taskId)).status, 200, String(traceparent))
    assert.equal(provider.calls.at(-1).trace, undefined, String(traceparent))
    assert.deepEqual(postHeaders(mcpd, taskId, 'result'), [null], String(traceparent))
  }
  const none = mcpd.sendTask({ provider: 'local', body: body() })
  await mcpd.outcome(none)
  assert.equal(provider.calls.at(-1).trace, undefined)
  assert.deepEqual(postHeaders(mcpd, none, 'result'), [null])
  assert.deepEqual(exporter.getFinishedSpans(), [])

  // A tracer provider registered after start(): the same registrar's next task has a
  // span (the tracer is looked up for each task). The tests after this one keep it.
  tracerProvider.register()
  httpInstrumentation.enable()
  instrumentedHttp = require('node:http')
  const later = mcpd.sendTask({ provider: 'local', body: body(), traceparent: MCPD_TRACEPARENT })
  await mcpd.outcome(later)
  const span = await spanOf(mcpd, later)
  assert.equal(parentId(span), MCPD_SPAN)
  assert.deepEqual(postHeaders(mcpd, later, 'result'), [traceparentOf(span)])
})

test('a task’s span starts no later than a child started in the same millisecond', async (t) => {
  exporter.reset()
  // spans.js alone, over a stand-in for the core; the SDK's clock held in one millisecond.
  const source = readFileSync(new URL('../src/binding/spans.js', import.meta.url), 'utf8')
  const native = { traced: () => null }
  const spans = vm.runInThisContext(source)(import.meta.url, native)
  const realNow = Date.now
  const ms = realNow()
  Date.now = () => ms
  t.after(() => {
    Date.now = realNow
  })
  const options = { request: { model: 'local' } }
  // The core's arrival time carries a fraction of a millisecond.
  const active = spans.begin('t-ms', 1, ms + 0.75, options, 'test')
  assert.ok(active, 'a span was started')
  spans.run(active, () => trace.getTracer('test').startSpan('child').end())
  spans.end('t-ms', JSON.stringify({}))
  Date.now = realNow
  const parent = exporter.getFinishedSpans().find((span) => span.name === 'chat local')
  const child = exporter.getFinishedSpans().find((span) => span.name === 'child')
  assert.equal(parentId(child), parent.spanContext().spanId)
  assert.deepEqual(parent.startTime, child.startTime, 'both in the same whole millisecond')
})

test('a task’s span: mcpd’s span as parent, GenAI attributes, the provider’s HTTP call as its child', async (t) => {
  exporter.reset()
  const mcpd = await startMcpd(t)
  const upstream = await startUpstream(t)
  const provider = tracedProvider(upstream)
  await startRegistrar(t, mcpd, { local: provider })

  const taskId = mcpd.sendTask({
    provider: 'local',
    body: body(),
    caller: { id: 'u-42', name: 'alice@example.com' },
    traceparent: MCPD_TRACEPARENT,
    tracestate: 'vendor=value',
  })
  const outcome = await mcpd.outcome(taskId)
  assert.equal(outcome.status, 200)
  const span = await spanOf(mcpd, taskId)

  assert.equal(span.name, 'chat local')
  assert.equal(span.kind, SpanKind.INTERNAL)
  assert.equal(span.spanContext().traceId, TRACE_ID)
  assert.equal(parentId(span), MCPD_SPAN)
  assert.equal(span.spanContext().traceState?.serialize(), 'vendor=value')
  assert.deepEqual(span.attributes, {
    'gen_ai.operation.name': 'chat',
    'gen_ai.provider.name': 'test',
    'gen_ai.request.model': 'local',
    'gen_ai.request.max_tokens': 64,
    'gen_ai.request.temperature': 0.5,
    'gen_ai.request.top_p': 0.9,
    'gen_ai.response.model': 'upstream-model',
    'gen_ai.response.finish_reasons': ['stop'],
    'gen_ai.usage.input_tokens': 11,
    'gen_ai.usage.output_tokens': 7,
    'mcpctl.task.id': taskId,
    'mcpctl.caller.id': 'u-42',
  })
  assert.equal(span.status.code, 0, 'unset: the task completed')

  // The provider's HTTP call is the task span's child, and carried its own span upstream.
  const client = exporter.getFinishedSpans().find((s) => s.kind === SpanKind.CLIENT)
  assert.ok(client, 'the instrumented HTTP call recorded a span')
  assert.equal(client.spanContext().traceId, TRACE_ID)
  assert.equal(parentId(client), span.spanContext().spanId)
  assert.deepEqual(upstream.seen, [traceparentOf(client)])

  // options.trace and the result POST name the registrar's span.
  assert.deepEqual(provider.calls[0].trace, { traceparent: traceparentOf(span), tracestate: 'vendor=value' })
  assert.deepEqual(postHeaders(mcpd, taskId, 'result'), [traceparentOf(span)])
  assert.ok(
    span.startTime[0] * 1000 + span.startTime[1] / 1e6 <= client.startTime[0] * 1000 + client.startTime[1] / 1e6,
  )
  assertNoText(exporter.getFinishedSpans())
})

test('a streamed task: its chunk POSTs carry the span, its later steps nest under it', async (t) => {
  exporter.reset()
  const mcpd = await startMcpd(t)
  const upstream = await startUpstream(t)
  const provider = tracedProvider(upstream)
  await startRegistrar(t, mcpd, { local: provider })

  const taskId = mcpd.sendTask({ provider: 'local', body: body({ stream: true }), traceparent: MCPD_TRACEPARENT })
  const outcome = await mcpd.outcome(taskId)
  assert.equal(outcome.kind, 'stream')
  assert.equal(outcome.payloads.at(-1), '[DONE]')
  const span = await spanOf(mcpd, taskId)
  assert.equal(parentId(span), MCPD_SPAN)
  assert.equal(span.attributes['gen_ai.response.model'], 'local', 'what the chunks name')
  assert.deepEqual(span.attributes['gen_ai.response.finish_reasons'], ['length'])
  assert.equal(span.attributes['gen_ai.usage.input_tokens'], 5)
  assert.equal(span.attributes['gen_ai.usage.output_tokens'], 2)

  const chunkHeaders = postHeaders(mcpd, taskId, 'chunks')
  assert.ok(chunkHeaders.length >= 1)
  assert.deepEqual(new Set(chunkHeaders), new Set([traceparentOf(span)]))
  const client = exporter.getFinishedSpans().find((s) => s.kind === SpanKind.CLIENT)
  assert.equal(parentId(client), span.spanContext().spanId)
  assertNoText(exporter.getFinishedSpans())
})

test('a malformed or absent traceparent gives a root span, which the POSTs then carry', async (t) => {
  exporter.reset()
  const mcpd = await startMcpd(t)
  const upstream = await startUpstream(t)
  const provider = tracedProvider(upstream)
  await startRegistrar(t, mcpd, { local: provider })

  for (const traceparent of [MCPD_TRACEPARENT.toUpperCase(), undefined]) {
    const taskId = mcpd.sendTask({ provider: 'local', body: body(), traceparent })
    await mcpd.outcome(taskId)
    const span = await spanOf(mcpd, taskId)
    assert.equal(parentId(span), undefined, 'a root span')
    assert.notEqual(span.spanContext().traceId, TRACE_ID)
    assert.deepEqual(provider.calls.at(-1).trace, { traceparent: traceparentOf(span) })
    assert.deepEqual(postHeaders(mcpd, taskId, 'result'), [traceparentOf(span)])
  }
})

test('a failed task’s span says why; one cancelled by mcpd says cancelled', async (t) => {
  exporter.reset()
  const mcpd = await startMcpd(t)
  let started
  const running = new Promise((resolve) => (started = resolve))
  const providers = {
    broken: {
      async complete() {
        throw new Error(`the backend fell over ${PROMPT_CANARY}`)
      },
    },
    slow: {
      async complete(options) {
        started()
        await new Promise((resolve) => options.signal.addEventListener('abort', resolve, { once: true }))
        throw options.signal.reason
      },
    },
  }
  await startRegistrar(t, mcpd, providers)

  const failed = mcpd.sendTask({ provider: 'broken', body: body(), traceparent: MCPD_TRACEPARENT })
  assert.equal((await mcpd.outcome(failed)).status, 502)
  const failedSpan = await spanOf(mcpd, failed)
  assert.equal(failedSpan.attributes['error.type'], 'provider_error')
  assert.equal(failedSpan.status.code, 2, 'ERROR')
  assert.deepEqual(postHeaders(mcpd, failed, 'result'), [traceparentOf(failedSpan)])

  const cancelled = mcpd.sendTask({ provider: 'slow', body: body(), traceparent: MCPD_TRACEPARENT })
  // The span is recorded before the provider is called: cancel once it runs.
  await running
  mcpd.cancel(cancelled)
  const cancelledSpan = await spanOf(mcpd, cancelled)
  assert.equal(cancelledSpan.attributes['error.type'], 'cancelled')
  assert.deepEqual(postHeaders(mcpd, cancelled, 'result'), [])
})

test('an app with only the SDK in its own node_modules sees spans from an addon that sits apart', async (t) => {
  // The addon in a directory with no node_modules above it: looking the API up from the
  // addon's location fails, and the main module's (the app's) finds it.
  const root = await mkdtemp(join(tmpdir(), 'registrar-otel-'))
  t.after(() => rm(root, { recursive: true, force: true }))
  const repo = fileURLToPath(new URL('..', import.meta.url))
  const addonDir = join(root, 'addon')
  const appDir = join(root, 'app')
  await mkdir(addonDir)
  await mkdir(join(appDir, 'node_modules'), { recursive: true })
  for (const name of readdirSync(repo).filter((n) => n.startsWith('registrar.') && n.endsWith('.node'))) {
    // A hard link: a copy of the debug build is large, and a symlink would be resolved
    // back into the repository, whose node_modules has the API.
    await link(join(repo, name), join(addonDir, name)).catch(() => copyFile(join(repo, name), join(addonDir, name)))
  }
  await copyFile(join(repo, 'index.js'), join(addonDir, 'index.js'))
  await symlink(
    join(repo, 'node_modules', '@opentelemetry'),
    join(appDir, 'node_modules', '@opentelemetry'),
    'junction',
  )
  await copyFile(join(repo, '__test__', 'fixtures', 'traced-app.cjs'), join(appDir, 'main.cjs'))

  const [command, args] = nodeCommand([join(appDir, 'main.cjs')])
  const child = spawn(command, args, {
    cwd: appDir,
    env: {
      ...process.env,
      REGISTRAR_ADDON: join(addonDir, 'index.js'),
      REGISTRAR_FAKE_MCPD: join(repo, 'testing', 'index.js'),
      REGISTRAR_CONFIG_DIR: await tempConfigDir(t),
      REGISTRAR_TRACEPARENT: MCPD_TRACEPARENT,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let stdout = ''
  let stderr = ''
  child.stdout.on('data', (data) => (stdout += data))
  child.stderr.on('data', (data) => (stderr += data))
  const [code] = await once(child, 'exit')
  assert.equal(code, 0, stderr)
  const seen = JSON.parse(stdout.trim().split('\n').at(-1))
  assert.equal(seen.name, 'chat local')
  assert.equal(seen.traceId, TRACE_ID)
  assert.equal(seen.parentId, MCPD_SPAN)
  const traceparent = `00-${TRACE_ID}-${seen.spanId}-01`
  assert.deepEqual(seen.trace, { traceparent })
  assert.equal(seen.resultTraceparent, traceparent)
})

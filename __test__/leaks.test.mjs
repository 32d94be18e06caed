// What the three observers may hold (issue 17, "Bad input and leaks"; README: Logging,
// Tracing, Metrics, Audit log). One unique string goes into a prompt and a tool call's
// arguments, another into a provider's error message (beside the registrar's token).
// A streamed and a non-streamed task run, each once answered and once failed, with a
// pino logger at trace level, spans recorded to an in-memory exporter, metrics() read
// and the audit log on with `content: false`. Then:
// - the prompt's canary is in none of them;
// - the error's canary is only in the local log (the owner's warn line needs it);
// - the token is in none of them, nor in anything the registrar sent to mcpd.

import assert from 'node:assert/strict'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import test from 'node:test'
import { InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base'
import { NodeTracerProvider } from '@opentelemetry/sdk-trace-node'
import { pinoCapture, startMcpd, startRegistrar, TOKEN, tempConfigDir } from './helpers.mjs'

const PROMPT_CANARY = 'prompt-canary-3d9e61c4'
const ERROR_CANARY = 'error-canary-b7c410aa'
const TRACEPARENT = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'

const exporter = new InMemorySpanExporter()
const tracerProvider = new NodeTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] })
tracerProvider.register()

/** The request: the canary in the user's text and in a tool call's arguments. */
function request(stream, fail) {
  return {
    model: 'local',
    stream,
    messages: [
      { role: 'user', content: `look up ${PROMPT_CANARY}` },
      {
        role: 'assistant',
        content: null,
        tool_calls: [
          {
            id: 'call_1',
            type: 'function',
            function: { name: 'lookup', arguments: JSON.stringify({ q: PROMPT_CANARY }) },
          },
        ],
      },
      { role: 'tool', tool_call_id: 'call_1', content: 'found it' },
      { role: 'user', content: fail ? 'now fail' : 'now answer' },
    ],
  }
}

const failing = (options) => options.messages.at(-1).content === 'now fail'
const failure = () => new Error(`upstream said ${ERROR_CANARY} for the key ${TOKEN}`)

const provider = {
  async complete(options) {
    if (failing(options)) throw failure()
    return { content: 'a plain answer', finishReason: 'stop', usage: { promptTokens: 9, completionTokens: 3 } }
  },
  async *stream(options) {
    yield { content: 'a streamed ' }
    if (failing(options)) throw failure()
    yield { content: 'answer' }
    yield { finishReason: 'stop', usage: { promptTokens: 9, completionTokens: 2 } }
  },
}

test('no prompt text and no token in the logs, spans, metrics or audit log; the error text only in the local log', async (t) => {
  const previous = process.env.MCPCTL_LOG
  process.env.MCPCTL_LOG = 'trace'
  t.after(() => {
    if (previous === undefined) delete process.env.MCPCTL_LOG
    else process.env.MCPCTL_LOG = previous
  })
  const mcpd = await startMcpd(t)
  const { lines, logger } = pinoCapture('trace')
  const configDir = await tempConfigDir(t)
  const auditPath = join(configDir, 'audit.jsonl')
  const { registrar } = await startRegistrar(
    t,
    mcpd,
    { local: provider },
    {
      configDir,
      logger,
      audit: { path: auditPath, content: false },
    },
  )

  const outcomes = {}
  for (const stream of [false, true]) {
    for (const fail of [false, true]) {
      const taskId = mcpd.sendTask({ provider: 'local', body: request(stream, fail), traceparent: TRACEPARENT })
      outcomes[`${stream ? 'streamed' : 'plain'} ${fail ? 'failed' : 'answered'}`] = await mcpd.outcome(taskId)
    }
  }
  // Each reached the caller as it should, so the checks below are of tasks that ran.
  assert.equal(outcomes['plain answered'].status, 200)
  assert.equal(outcomes['plain failed'].status, 502)
  assert.equal(outcomes['streamed answered'].kind, 'stream')
  assert.equal(outcomes['streamed failed'].kind, 'stream')
  assert.ok(outcomes['streamed failed'].payloads.some((payload) => payload.includes('"error"')))

  // Every task's span has ended (the core ends it once the task's answer is out).
  const spans = await mcpd.waitFor(() => {
    const finished = exporter.getFinishedSpans()
    return finished.length >= 4 && finished
  })
  assert.equal(spans.length, 4, 'one span per task')
  const metrics = registrar.metrics()
  assert.match(metrics, /mcpctl_registrar_requests_total\{[^}]*\} /, 'metrics counted the tasks')
  await registrar.stop()
  // The logger's lines reach JavaScript through a threadsafe function: wait for the last.
  await mcpd.waitFor(() => lines.some((line) => line.msg === 'state changed' && line.state === 'stopped'))
  const audit = await readFile(auditPath, 'utf8')
  assert.equal(audit.trim().split('\n').length, 4, 'one audit line per task')

  const observed = {
    'the log': lines.map((line) => JSON.stringify(line)).join('\n'),
    'the spans': JSON.stringify(
      spans.map((span) => ({
        name: span.name,
        attributes: span.attributes,
        events: span.events,
        status: span.status,
        links: span.links,
        resource: span.resource?.attributes,
      })),
    ),
    'metrics()': metrics,
    'the audit log': audit,
  }
  for (const [where, text] of Object.entries(observed)) {
    assert.ok(!text.includes(PROMPT_CANARY), `the prompt's text is in ${where}`)
    assert.ok(!text.includes(TOKEN), `the token is in ${where}`)
    if (where !== 'the log') assert.ok(!text.includes(ERROR_CANARY), `the provider's error text is in ${where}`)
  }
  // The owner's warn line names what failed: both failures, with the token scrubbed.
  const warned = lines.filter((line) => line.level === 40 && line.msg?.includes('provider failed'))
  assert.equal(warned.length, 2, `two 'provider failed' warn lines: ${JSON.stringify(warned)}`)
  for (const line of warned) assert.ok(JSON.stringify(line).includes(ERROR_CANARY), JSON.stringify(line))

  // Nothing the registrar sent to mcpd carries the token, but the Authorization header.
  for (const recorded of mcpd.requests) {
    assert.ok(!recorded.raw.includes(TOKEN), `${recorded.method} ${recorded.path} carries the token in its body`)
    for (const [name, value] of Object.entries(recorded.headers)) {
      if (name !== 'authorization') {
        assert.ok(!String(value).includes(TOKEN), `${recorded.path}: the token in the ${name} header`)
      }
    }
  }
  assert.deepEqual(mcpd.violations, [])
})

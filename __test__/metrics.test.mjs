// metrics() end to end (index.d.ts; issue 17): the official `openai` client through the fake
// mcpd against the real addon. The exposition's counts follow status() and usage(), a refusal
// is counted under its reason, a task for a provider not served is labelled "(unknown)", the
// TTFT histogram holds one sample per streamed task, and the text joins with prom-client's
// into one exposition that parses (the way mcplocal serves both on one route).

import assert from 'node:assert/strict'
import test from 'node:test'
import { Counter, Registry } from 'prom-client'
import { startMcpd, startRegistrar } from './helpers.mjs'
import { OpenAI, openAiClient } from './providers.mjs'

const ask = (extra = {}) => ({ model: 'local', messages: [{ role: 'user', content: 'the prompt' }], ...extra })

/** Answers at once, streamed or not, with usage the books can be checked against. */
function provider() {
  return {
    async complete() {
      return { content: 'ok', finishReason: 'stop', usage: { promptTokens: 3, completionTokens: 4 } }
    },
    async *stream() {
      yield { content: 'o' }
      yield { content: 'k' }
      yield { finishReason: 'stop', usage: { promptTokens: 3, completionTokens: 4 } }
    },
  }
}

const NAME = '[a-zA-Z_:][a-zA-Z0-9_:]*'
const SAMPLE = new RegExp(`^(${NAME})(?:\\{(.*)\\})? (\\S+)$`)
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)/gy

/**
 * Parses a text exposition (format 0.0.4) line by line and fails on any line that is
 * not a HELP, a TYPE or a sample, on a family typed twice, and on a sample of no typed
 * family. Returns the samples as { name, labels, value } and the families' types.
 */
function parseExposition(text) {
  assert.ok(text.endsWith('\n'), 'the exposition ends with a newline')
  assert.ok(!text.includes('# EOF'), 'format 0.0.4, not OpenMetrics')
  const types = new Map()
  const samples = []
  for (const line of text.split('\n').slice(0, -1)) {
    if (line === '') continue
    const comment = /^# (HELP|TYPE) (\S+) (.*)$/.exec(line)
    if (comment) {
      if (comment[1] === 'TYPE') {
        assert.ok(!types.has(comment[2]), `family typed twice: ${comment[2]}`)
        assert.match(comment[3], /^(counter|gauge|histogram|summary|untyped)$/, line)
        types.set(comment[2], comment[3])
      }
      continue
    }
    const sample = SAMPLE.exec(line)
    assert.ok(sample, `not a sample line: ${JSON.stringify(line)}`)
    const labels = {}
    if (sample[2] !== undefined) {
      LABEL.lastIndex = 0
      let read = 0
      for (let label = LABEL.exec(sample[2]); label; label = LABEL.exec(sample[2])) {
        labels[label[1]] = label[2]
        read = LABEL.lastIndex
      }
      assert.equal(read, sample[2].length, `bad labels: ${line}`)
    }
    const value = Number(sample[3])
    assert.ok(!Number.isNaN(value) || sample[3] === 'NaN', `bad value: ${line}`)
    const family = sample[1].replace(/_(bucket|sum|count)$/, '')
    assert.ok(types.has(sample[1]) || types.get(family) === 'histogram', `sample of no family: ${line}`)
    samples.push({ name: sample[1], labels, value })
  }
  return { samples, types }
}

/** The value of the one sample named `name` with exactly `labels`. */
function value(samples, name, labels = {}) {
  const found = samples.filter(
    (s) =>
      s.name === name &&
      JSON.stringify(Object.entries(s.labels).sort()) === JSON.stringify(Object.entries(labels).sort()),
  )
  assert.equal(found.length, 1, `one sample ${name} ${JSON.stringify(labels)}`)
  return found[0].value
}

const sum = (samples, name, match) =>
  samples
    .filter((s) => s.name === name && Object.entries(match).every(([k, v]) => s.labels[k] === v))
    .reduce((total, s) => total + s.value, 0)

test('metrics(): counts equal status() and usage(), refusals by reason, (unknown), one TTFT sample per stream, joined with prom-client', async (t) => {
  const mcpd = await startMcpd(t)
  const { registrar } = await startRegistrar(
    t,
    mcpd,
    {},
    {
      providers: [
        { name: 'local', type: 'test', model: 'local-model', publish: true, provider: provider() },
        // Nobody the fake mcpd names is listed: every task for it is refused.
        { name: 'closed', type: 'test', publish: true, provider: provider(), allowCallers: ['someone-else'] },
      ],
    },
  )
  const client = openAiClient(mcpd)

  const plain = 5
  const streamed = 3
  for (let i = 0; i < plain; i++) {
    assert.equal((await client.chat.completions.create(ask())).choices[0].message.content, 'ok')
  }
  for (let i = 0; i < streamed; i++) {
    let text = ''
    for await (const chunk of await client.chat.completions.create(ask({ stream: true }))) {
      text += chunk.choices[0]?.delta?.content ?? ''
    }
    assert.equal(text, 'ok')
  }
  for (const stream of [false, true]) {
    await assert.rejects(client.chat.completions.create(ask({ model: 'closed', stream })), (error) => {
      assert.ok(error instanceof OpenAI.APIError)
      assert.equal(error.status, 403)
      assert.equal(error.code, 'caller_not_allowed')
      return true
    })
  }
  // A provider name mcpd sent that this registrar does not serve.
  const ghost = mcpd.sendTask({ provider: 'ghost-model-from-mcpd', body: ask({ model: 'ghost-model-from-mcpd' }) })
  assert.equal((await mcpd.outcome(ghost)).status, 404)

  const total = plain + streamed + 2 + 1
  const status = await mcpd.waitFor(() => {
    const status = registrar.status()
    return (
      status.completed + status.failed + status.cancelled === total && status.inFlight + status.queued === 0 && status
    )
  })
  const usage = registrar.usage()
  const text = registrar.metrics()
  const { samples, types } = parseExposition(text)

  assert.equal(sum(samples, 'mcpctl_registrar_requests_total', { outcome: 'completed' }), status.completed)
  assert.equal(sum(samples, 'mcpctl_registrar_requests_total', { outcome: 'failed' }), status.failed)
  assert.equal(sum(samples, 'mcpctl_registrar_requests_total', { outcome: 'cancelled' }), status.cancelled)
  assert.equal(value(samples, 'mcpctl_registrar_requests_total', { provider: 'local', outcome: 'completed' }), 8)
  assert.equal(value(samples, 'mcpctl_registrar_requests_total', { provider: 'closed', outcome: 'failed' }), 2)
  assert.equal(value(samples, 'mcpctl_registrar_requests_total', { provider: '(unknown)', outcome: 'failed' }), 1)
  assert.ok(!text.includes('ghost-model-from-mcpd'), "mcpd's provider string is never a label")

  const refused = { provider: 'closed', reason: 'caller_not_allowed' }
  assert.equal(value(samples, 'mcpctl_registrar_requests_refused_total', refused), 2)
  assert.equal(usage.providers.closed.refused.caller_not_allowed, 2)
  assert.equal(sum(samples, 'mcpctl_registrar_requests_refused_total', { provider: 'local' }), 0)

  assert.equal(
    value(samples, 'mcpctl_registrar_prompt_tokens_total', { provider: 'local' }),
    usage.providers.local.promptTokens,
  )
  assert.equal(
    value(samples, 'mcpctl_registrar_generation_tokens_total', { provider: 'local' }),
    usage.providers.local.completionTokens,
  )
  assert.equal(usage.providers.local.promptTokens, 3 * 8)

  const local = { provider: 'local' }
  assert.equal(value(samples, 'mcpctl_registrar_time_to_first_token_seconds_count', local), streamed)
  assert.equal(
    value(samples, 'mcpctl_registrar_time_to_first_token_seconds_bucket', { ...local, le: '+Inf' }),
    streamed,
  )
  assert.equal(value(samples, 'mcpctl_registrar_e2e_request_latency_seconds_count', local), plain + streamed)
  assert.equal(value(samples, 'mcpctl_registrar_request_queue_time_seconds_count', local), plain + streamed)
  assert.equal(value(samples, 'mcpctl_registrar_requests_running', local), 0)
  assert.equal(value(samples, 'mcpctl_registrar_requests_waiting', local), 0)
  assert.equal(value(samples, 'mcpctl_registrar_state', { state: 'connected' }), 1)
  assert.equal(sum(samples, 'mcpctl_registrar_state', {}), 1, 'one state at 1')
  assert.equal(value(samples, 'mcpctl_registrar_reconnects_total'), status.reconnects)
  assert.equal(value(samples, 'mcpctl_registrar_audit_lines_dropped_total'), 0)
  assert.equal(types.get('mcpctl_registrar_time_to_first_token_seconds'), 'histogram')
  assert.equal(types.get('mcpctl_registrar_requests_total'), 'counter')
  assert.equal(types.get('mcpctl_registrar_state'), 'gauge')

  // mcplocal's one route: its own registry's text, then the registrar's.
  const register = new Registry()
  new Counter({ name: 'mcplocal_http_requests_total', help: 'mcplocal requests', registers: [register] }).inc(2)
  const joined = (await register.metrics()) + registrar.metrics()
  const both = parseExposition(joined)
  assert.equal(value(both.samples, 'mcplocal_http_requests_total'), 2)
  assert.equal(value(both.samples, 'mcpctl_registrar_requests_total', { provider: 'local', outcome: 'completed' }), 8)
  assert.equal(register.contentType.split(';')[0], 'text/plain')
  assert.match(register.contentType, /version=0\.0\.4/)
})

test('metrics() after 1,000 tasks: requests and tokens equal status() and usage(), one TTFT sample per streamed task', async (t) => {
  const mcpd = await startMcpd(t)
  const { registrar } = await startRegistrar(t, mcpd, { local: provider() })
  const client = openAiClient(mcpd)
  const tasks = 1000
  const streamEvery = 4
  let next = 0
  // 16 clients at a time: the default 4 slots and a queue, so queue time is measured too.
  const worker = async () => {
    for (let i = next++; i < tasks; i = next++) {
      if (i % streamEvery === 0) {
        for await (const _ of await client.chat.completions.create(ask({ stream: true }))) {
          // drained
        }
      } else {
        await client.chat.completions.create(ask())
      }
    }
  }
  await Promise.all(Array.from({ length: 16 }, worker))
  const status = await mcpd.waitFor(
    () => {
      const status = registrar.status()
      return status.completed === tasks && status.inFlight + status.queued === 0 && status
    },
    { timeoutMs: 10_000 },
  )
  const usage = registrar.usage().providers.local
  const { samples } = parseExposition(registrar.metrics())
  const local = { provider: 'local' }
  assert.equal(value(samples, 'mcpctl_registrar_requests_total', { ...local, outcome: 'completed' }), status.completed)
  assert.equal(sum(samples, 'mcpctl_registrar_requests_total', {}), tasks)
  assert.equal(usage.tasks, tasks)
  assert.equal(value(samples, 'mcpctl_registrar_prompt_tokens_total', local), usage.promptTokens)
  assert.equal(value(samples, 'mcpctl_registrar_generation_tokens_total', local), usage.completionTokens)
  assert.equal(usage.completionTokens, 4 * tasks)
  assert.equal(value(samples, 'mcpctl_registrar_time_to_first_token_seconds_count', local), tasks / streamEvery)
  assert.equal(value(samples, 'mcpctl_registrar_e2e_request_latency_seconds_count', local), tasks)
  assert.equal(value(samples, 'mcpctl_registrar_request_queue_time_seconds_count', local), tasks)
  // Each stream read "o" then "k": at least one gap per streamed task, unless both came in one run.
  assert.ok(value(samples, 'mcpctl_registrar_inter_token_latency_seconds_count', local) <= tasks / streamEvery)
})

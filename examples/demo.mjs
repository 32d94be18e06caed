#!/usr/bin/env node
import { randomBytes } from 'node:crypto'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
// `npm run demo`: a dev mcpd, a registrar booted the way mcplocal boots it, and the official
// openai client talking to the published model through mcpd, end to end, on loopback only.
import { parseArgs } from 'node:util'
import OpenAI from 'openai'
import { createDemoProvider, createUpstreamProvider, firstUpstreamModel } from './providers.mjs'

const require = createRequire(import.meta.url)

const USAGE = `usage: node examples/demo.mjs [options]

  --upstream <url>   publish a real OpenAI-compatible server instead of the demo model,
                     e.g. http://127.0.0.1:11434/v1 (Ollama) or http://127.0.0.1:8080/v1 (llama.cpp)
  --model <name>     the upstream model (default: the first one <url>/models lists)
  --api-key <key>    bearer token for the upstream, when it wants one
  --verbose          also print the dev mcpd's and the registrar's own log lines (stderr)
  -h, --help         this text`

const PROMPTS = {
  ask: 'Who are you? Answer in one sentence.',
  stream: 'In one sentence, how did this request reach you?',
  count: 'Count from 1 to 100, separated by spaces, nothing else.',
}
const CANCEL_AFTER_TOKENS = 5
const STEPS = 7

const say = (line = '') => process.stdout.write(`${line}\n`)
const header = (step, title) => say(`\n[${step}/${STEPS}] ${title}`)

async function main() {
  const args = parseArgs({
    options: {
      upstream: { type: 'string' },
      model: { type: 'string' },
      'api-key': { type: 'string' },
      verbose: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  }).values
  if (args.help) return say(USAGE)
  if ((args.model || args['api-key']) && !args.upstream)
    throw new DemoError('--model and --api-key go with --upstream <url>')

  const { maybeStartVirtualLlmRegistrar } = require('../index.js')
  const { FakeMcpd } = require('../testing/index.js')

  // Ctrl-C ends the run through the same clean-up as an error, so the temp dir never stays behind.
  const interrupt = new AbortController()
  const onSigint = () => interrupt.abort(new DemoError('interrupted (Ctrl-C); cleaned up', 130))
  process.once('SIGINT', onSigint)

  const cleanup = []
  try {
    say('@mcpctl/registrar demo: dev mcpd + registrar + the official openai client')
    say('\nSetup')

    // 1. A temporary config dir: the credentials mcplocal would find in ~/.mcpctl go there.
    const configDir = await mkdtemp(join(tmpdir(), 'mcpctl-demo-'))
    cleanup.push(['temporary config dir removed', () => rm(configDir, { recursive: true, force: true })])

    // 2. The dev mcpd, in this process, on a free loopback port.
    const token = `demo-${randomBytes(12).toString('hex')}`
    // Two people's API keys: mcpd attaches the caller to each task it sends for them (step 6).
    const people = {
      alice: { key: `alice-${randomBytes(8).toString('hex')}`, caller: { id: 'alice', groups: ['ml-team'] } },
      bob: { key: `bob-${randomBytes(8).toString('hex')}`, caller: { id: 'bob', groups: ['sales'] } },
    }
    const taskTimeoutMs = args.upstream ? 300_000 : 30_000
    const mcpd = new FakeMcpd({
      host: '127.0.0.1',
      port: 0,
      token,
      taskTimeoutMs,
      callers: Object.fromEntries(Object.values(people).map(({ key, caller }) => [key, caller])),
      log: args.verbose ? (line) => process.stderr.write(`[dev mcpd] ${line}\n`) : undefined,
    })
    cleanup.push(['dev mcpd closed', () => mcpd.close()])
    const mcpdUrl = await mcpd.listen()
    say(`  dev mcpd     ${mcpdUrl} (in process)`)
    await writeFile(join(configDir, 'credentials'), `${JSON.stringify({ mcpdUrl, token }, null, 2)}\n`, { mode: 0o600 })
    say(`  config dir   ${configDir} (temporary, holds credentials)`)

    // 3. The provider to publish, in a registry, as mcplocal's config and registry hold them.
    let providerAborted = () => {}
    const providerHooks = {
      log: (line) => say(`  ${line}`),
      onAbort: (tokens) => providerAborted(tokens),
    }
    let entry
    let provider
    if (args.upstream) {
      const upstream = args.upstream.replace(/\/+$/, '')
      const model =
        args.model ??
        (await firstUpstreamModel(upstream, { apiKey: args['api-key'], signal: interrupt.signal }).catch((error) => {
          throw new DemoError(
            `cannot list the models of ${upstream} (${describe(error)}); is it running? pass --model to skip this`,
          )
        }))
      entry = {
        name: 'upstream-llm',
        type: 'openai-compatible',
        model,
        publish: true,
        description: `${model} at ${upstream}`,
      }
      provider = createUpstreamProvider({ baseURL: upstream, model, apiKey: args['api-key'], ...providerHooks })
      say(`  upstream     ${upstream}, model ${model}`)
    } else {
      entry = { name: 'demo-llm', type: 'demo', model: 'demo-1', publish: true }
      provider = createDemoProvider({ tokenDelayMs: 40, ...providerHooks })
    }

    // 4. The registrar, through mcplocal's boot hook: it reads <configDir>/credentials itself,
    // and returns the registrar, which step 5 uses to publish a second provider.
    const registry = new Map([[entry.name, provider]])
    const config = [entry]
    const registrar = await maybeStartVirtualLlmRegistrar({
      providers: config,
      registry,
      configDir,
      logger: registrarLogger(args.verbose),
      taskTimeoutMs,
    })
    if (registrar === null) throw new DemoError('maybeStartVirtualLlmRegistrar resolved null (see the warning above)')
    cleanup.push([null, () => registrar.stop()])
    // Connected on both ends: the registrar's state flips as the channel opens, mcpd's a moment later.
    const bothConnected = () => {
      const { state, providerSessionId } = registrar.status()
      return state === 'connected' && mcpd.sessions.get(providerSessionId)?.connected
    }
    await mcpd.waitFor(bothConnected, { timeoutMs: 10_000 }).catch(() => {
      const status = registrar.status()
      throw new DemoError(
        `the registrar did not connect within 10 s (state ${status.state}, last error: ${status.lastError ?? 'none'})`,
      )
    })
    const status = registrar.status()
    say(
      `  registrar    ${status.state}, session ${status.providerSessionId}, publishing ${entry.name} (type ${entry.type}, model ${entry.model})`,
    )

    const client = new OpenAI({
      baseURL: `${mcpdUrl}/v1`,
      apiKey: token,
      maxRetries: 0,
      timeout: taskTimeoutMs + 5_000,
    })
    say(`  openai       new OpenAI({ baseURL: '${mcpdUrl}/v1', apiKey: <token> })`)
    const model = entry.name
    const requestOptions = { signal: interrupt.signal }

    // Step 1: the models mcpd serves, the published one among them.
    header(1, 'client.models.list()')
    const models = (await client.models.list(requestOptions)).data
    for (const m of models) say(`  ${m.id}  (owned by ${m.owned_by})`)
    if (!models.some((m) => m.id === model)) throw new DemoError(`${model} is not in the model list`)

    // Step 2: one answer, all at once.
    header(2, 'client.chat.completions.create(...), non-streaming')
    say(`  you: ${PROMPTS.ask}`)
    const started = performance.now()
    // The client's own trace context: mcpd puts it in the task frame, and the registrar's
    // result POST comes back in the same trace (docs/protocol.md, "Trace context").
    const traceId = randomBytes(16).toString('hex')
    const completion = await client.chat.completions.create(
      { model, messages: [{ role: 'user', content: PROMPTS.ask }], max_tokens: 200 },
      { ...requestOptions, headers: { traceparent: `00-${traceId}-${randomBytes(8).toString('hex')}-01` } },
    )
    const answer = completion.choices[0]?.message?.content
    if (!answer) throw new DemoError('the non-streaming answer is empty')
    say(`  ${model}: ${answer}`)
    const usage = completion.usage
    say(
      `  (finish_reason ${completion.choices[0].finish_reason}, usage ${usage?.prompt_tokens} prompt + ${usage?.completion_tokens} completion = ${usage?.total_tokens} tokens, ${seconds(started)})`,
    )

    const taskId = completion.id.replace(/^chatcmpl-/, '')
    const resultPost = mcpd.requests.find((r) => r.path.endsWith(`/${taskId}/result`))
    const relayed = resultPost?.headers.traceparent?.split('-')[1]
    say(
      relayed === traceId
        ? `  (trace ${traceId}: the client's, carried by mcpd in the task; the result POST came back in it)`
        : `  (trace ${traceId} sent by the client; the result POST carried ${resultPost?.headers.traceparent ?? 'no traceparent'})`,
    )

    // Step 3: the same path, token by token. Nothing but the tokens is printed while they arrive.
    header(3, 'client.chat.completions.create({ stream: true }), tokens printed as they arrive')
    say(`  you: ${PROMPTS.stream}`)
    process.stdout.write(`  ${model}: `)
    const stream = await client.chat.completions.create(
      {
        model,
        messages: [{ role: 'user', content: PROMPTS.stream }],
        max_tokens: 200,
        stream: true,
        stream_options: { include_usage: true },
      },
      requestOptions,
    )
    let streamed = ''
    let streamUsage = null
    let streamFinish = null
    for await (const chunk of stream) {
      const delta = chunk.choices[0]?.delta?.content
      if (delta) {
        streamed += delta
        process.stdout.write(delta)
      }
      streamFinish = chunk.choices[0]?.finish_reason ?? streamFinish
      streamUsage = chunk.usage ?? streamUsage
    }
    process.stdout.write('\n')
    if (!streamed) throw new DemoError('the streamed answer is empty')
    if (!streamFinish) throw new DemoError('the stream ended without a finish_reason')
    if (!streamUsage) throw new DemoError('the stream ended without its usage chunk (stream_options.include_usage)')

    // Step 4: abort a long stream from the client; mcpd cancels the task and the provider's signal fires.
    header(4, `cancelling a long stream after ${CANCEL_AFTER_TOKENS} tokens`)
    say(`  you: ${PROMPTS.count}`)
    const sawAbort = new Promise((resolve) => {
      providerAborted = resolve
    })
    const long = await client.chat.completions.create(
      { model, messages: [{ role: 'user', content: PROMPTS.count }], stream: true },
      requestOptions,
    )
    const received = []
    for await (const chunk of long) {
      const delta = chunk.choices[0]?.delta?.content
      if (delta) received.push(delta)
      if (received.length === CANCEL_AFTER_TOKENS) {
        say(`  client: got "${received.join('').trim()}", calling stream.controller.abort()`)
        long.controller.abort()
        break
      }
    }
    if (received.length < CANCEL_AFTER_TOKENS) {
      throw new DemoError(`the long stream ended after ${received.length} tokens, before the client could cancel it`)
    }
    // The provider prints "provider: aborted after K tokens" itself when its signal fires.
    await withTimeout(sawAbort, 5_000, 'the provider never saw its AbortSignal fire after the client aborted')

    // Step 5: a second provider, published without a restart, as mcplocal does when its config
    // file gains a `publish: true` entry: the whole new set goes to update().
    const second = {
      name: 'demo-llm-2',
      type: 'demo',
      model: 'demo-2',
      publish: true,
      description: 'published by update()',
    }
    header(5, `registrar.update([...]): publishing ${second.name} too, no restart`)
    registry.set(second.name, createDemoProvider({ tokenDelayMs: 40, ...providerHooks }))
    config.push(second)
    const sessionBefore = registrar.status().providerSessionId
    await registrar.update(
      config.filter((e) => e.publish && registry.has(e.name)).map((e) => ({ ...e, provider: registry.get(e.name) })),
    )
    const updated = registrar.status()
    if (updated.providerSessionId !== sessionBefore) throw new DemoError('update() changed the session id')
    say(
      `  registrar    ${updated.state}, same session ${updated.providerSessionId}, publishing ${updated.providers.join(', ')}`,
    )
    say('  client.models.list():')
    const after = (await client.models.list(requestOptions)).data
    for (const m of after) say(`  ${m.id}  (owned by ${m.owned_by})`)
    if (!after.some((m) => m.id === second.name))
      throw new DemoError(`${second.name} is not in the model list after update()`)

    // Step 6: the owner decides who may call a published model and how much, and can pause it.
    header(6, "the owner's controls: allowCallers, limits, pause()")
    if (typeof registrar.pause !== 'function') {
      say('  skipped: this build of the registrar has no owner controls yet (issue 16)')
    } else {
      await ownerControlsStep({ registrar, config, registry, mcpdUrl, people, taskTimeoutMs, requestOptions, model })
    }

    // Step 7: everything down, and the dev mcpd saw no protocol violation on the way.
    header(7, 'shutting down')
    await runCleanup(cleanup, { verbose: true, registrar })
    if (mcpd.violations.length > 0)
      throw new DemoError(`the dev mcpd recorded protocol violations:\n  ${mcpd.violations.join('\n  ')}`)
    say('\ndemo finished: all steps passed')
  } catch (error) {
    await runCleanup(cleanup, { verbose: false })
    throw interrupt.signal.aborted ? interrupt.signal.reason : error
  } finally {
    process.off('SIGINT', onSigint)
  }
}

/**
 * Step 6: demo-llm-2's entry gains `allowCallers` and `limits` (live, through update()), then
 * alice (in ml-team) is served, bob is refused, alice's second request in the minute is 429
 * with retry-after, and a pause of the first model (`model`) answers 503 until resume().
 */
async function ownerControlsStep({
  registrar,
  config,
  registry,
  mcpdUrl,
  people,
  taskTimeoutMs,
  requestOptions,
  model,
}) {
  const client = (person) =>
    // maxRetries 0: the client would otherwise retry the 429 and the 503 by itself, and hide them.
    new OpenAI({ baseURL: `${mcpdUrl}/v1`, apiKey: person.key, maxRetries: 0, timeout: taskTimeoutMs + 5_000 })
  const alice = client(people.alice)
  const bob = client(people.bob)
  const ask = (model) => ({ model, messages: [{ role: 'user', content: 'Who are you?' }], max_tokens: 4 })
  const refusal = async (request) => {
    try {
      await request
    } catch (error) {
      if (!(error instanceof OpenAI.APIError)) throw error
      const retryAfter = error.headers?.get('retry-after')
      return `${error.status} ${error.type} / ${error.code}${retryAfter ? `, retry-after: ${retryAfter} s` : ', no retry-after'}`
    }
    throw new DemoError('a request the owner refuses was answered')
  }

  const second = config.find((e) => e.name === 'demo-llm-2')
  second.allowCallers = ['ml-team']
  second.limits = { requestsPerMinute: 1 }
  await registrar.update(
    config.filter((e) => e.publish && registry.has(e.name)).map((e) => ({ ...e, provider: registry.get(e.name) })),
  )
  say(`  demo-llm-2   allowCallers ${JSON.stringify(second.allowCallers)}, limits ${JSON.stringify(second.limits)}`)
  say("  dev mcpd     alice's API key acts as alice (ml-team), bob's as bob (sales)")

  const served = await alice.chat.completions.create(ask('demo-llm-2'), requestOptions)
  say(`  alice -> demo-llm-2: 200 "${served.choices[0].message.content.trim()}"`)
  say(`  bob   -> demo-llm-2: ${await refusal(bob.chat.completions.create(ask('demo-llm-2'), requestOptions))}`)
  say(`  alice -> demo-llm-2: ${await refusal(alice.chat.completions.create(ask('demo-llm-2'), requestOptions))}`)

  await registrar.pause({ provider: model })
  say(`  registrar.pause({ provider: '${model}' }): paused ${JSON.stringify(registrar.status().paused)}`)
  say(`  alice -> ${model}: ${await refusal(alice.chat.completions.create(ask(model), requestOptions))}`)
  registrar.resume()
  say(`  registrar.resume(): paused ${JSON.stringify(registrar.status().paused)}`)

  // Sorted: usage() is a plain record whose key order says nothing.
  const byName = ([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)
  for (const [name, usage] of Object.entries(registrar.usage().providers).sort(byName)) {
    const refused = Object.entries(usage.refused)
      .filter(([, n]) => n > 0)
      .sort(byName)
      .map(([reason, n]) => `${reason} ${n}`)
    say(
      `  usage() ${name}: ${usage.tasks} tasks, ${usage.promptTokens} + ${usage.completionTokens} tokens, refused: ${refused.join(', ') || 'none'}`,
    )
  }
  // A few lines of metrics(): what mcplocal serves for Prometheus beside its own.
  const shown = /^mcpctl_registrar_(requests_total|requests_refused_total|time_to_first_token_seconds_count)\{/
  const lines = registrar
    .metrics()
    .split('\n')
    .filter((line) => shown.test(line) && !line.endsWith(' 0'))
  for (const line of lines) say(`  metrics() ${line}`)
}

/** Runs the clean-ups newest first (registrar, then mcpd, then the temp dir); each runs once. */
async function runCleanup(cleanup, { verbose, registrar }) {
  while (cleanup.length > 0) {
    const [done, fn] = cleanup.pop()
    try {
      await fn()
      if (verbose) say(`  ${done ?? registrarSummary(registrar.status())}`)
    } catch (error) {
      process.stderr.write(`clean-up failed: ${describe(error)}\n`)
    }
  }
}

const registrarSummary = (status) =>
  `registrar stopped (state ${status.state}; tasks: ${status.completed} completed, ${status.failed} failed, ${status.inFlight} in flight)`

/** Registrar logs: warnings and errors always (stderr), the rest with --verbose. */
function registrarLogger(verbose) {
  const line = (level) => (fields, msg) => {
    const extra = fields && Object.keys(fields).length > 0 ? ` ${JSON.stringify(fields)}` : ''
    process.stderr.write(`[registrar ${level}] ${msg}${extra}\n`)
  }
  const quiet = () => {}
  return {
    debug: verbose ? line('debug') : quiet,
    info: verbose ? line('info') : quiet,
    warn: line('warn'),
    error: line('error'),
  }
}

class DemoError extends Error {
  constructor(message, exitCode = 1) {
    super(message)
    this.exitCode = exitCode
  }
}

function withTimeout(promise, ms, message) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new DemoError(message)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

const seconds = (since) => `${((performance.now() - since) / 1000).toFixed(1)} s`

/** The message, with the cause fetch hides behind "fetch failed". */
function describe(error) {
  const cause = error?.cause?.message ?? error?.cause?.code
  return cause ? `${error.message}: ${cause}` : `${error?.message ?? error}`
}

main().catch((error) => {
  process.stderr.write(`\ndemo failed: ${describe(error)}\n`)
  const expected =
    error instanceof DemoError || error instanceof OpenAI.APIError || String(error?.code).startsWith('ERR_PARSE_ARGS')
  // A bug in the demo itself deserves its stack; a refused request or a bad flag does not.
  if (!expected) process.stderr.write(`${error?.stack ?? ''}\n`)
  if (String(error?.code).startsWith('ERR_PARSE_ARGS')) process.stderr.write(`\n${USAGE}\n`)
  // Exit codes only: the demo ends by itself once the registrar, mcpd and client are closed.
  process.exitCode = error?.exitCode ?? 1
})

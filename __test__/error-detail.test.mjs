// What a remote caller sees of a provider's failure (docs/protocol.md, "What a remote
// caller sees of a provider's failure"; index.d.ts LlmProviderFileEntry.errorDetail):
// the token is scrubbed from every byte posted to mcpd, as a result body or in-band in a
// stream, and `errorDetail: 'generic'` answers "the provider failed" with an error id that
// the owner's warn line carries beside the real message. Checked on the bytes the fake
// mcpd received and through the official `openai` client.

import assert from 'node:assert/strict'
import test from 'node:test'
import { addon, captureLogger, chatBody, startMcpd, startRegistrar, TOKEN } from './helpers.mjs'
import { openAiClient } from './providers.mjs'

const TASKS = /^\/api\/v1\/llms\/_provider-tasks\//

/** Every body the registrar posted for tasks, as the bytes arrived. */
function postedBytes(mcpd) {
  return mcpd.requests.filter((request) => TASKS.test(request.path)).map((request) => request.raw)
}

/** A provider whose every way of failing says the token: complete() rejects, stream() yields once then throws. */
function echoingProvider(say) {
  return {
    complete: async () => {
      throw new Error(say)
    },
    async *stream() {
      yield { content: 'partial answer' }
      throw new Error(say)
    },
  }
}

/** A provider whose stream() fails before yielding anything (answered on the result endpoint). */
function failingBeforeStreamProvider(say) {
  return {
    complete: async () => {
      throw new Error(say)
    },
    stream() {
      throw new Error(say)
    },
  }
}

function entries(providers, extra = {}) {
  return Object.entries(providers).map(([name, provider]) => ({
    name,
    type: 'test',
    publish: true,
    provider,
    ...extra,
  }))
}

/** The in-band error of a stream outcome: the payload before [DONE], parsed. */
function inBandError(outcome) {
  assert.equal(outcome.kind, 'stream')
  assert.equal(outcome.payloads.at(-1), '[DONE]')
  const error = JSON.parse(outcome.payloads.at(-2))
  assert.ok(error.error, `not an error payload: ${outcome.payloads.at(-2)}`)
  return error.error
}

test('the token is scrubbed from every answer posted to mcpd: result bodies and in-band errors', async (t) => {
  const mcpd = await startMcpd(t)
  const say = `upstream said ${TOKEN}; retry with Authorization: Bearer ${TOKEN} at /v1?key=${encodeURIComponent(TOKEN)}`
  const logger = captureLogger()
  await startRegistrar(
    t,
    mcpd,
    {},
    {
      logger,
      providers: entries({ echoing: echoingProvider(say), early: failingBeforeStreamProvider(say) }),
    },
  )

  const result = await mcpd.outcome(mcpd.sendTask({ provider: 'echoing', body: chatBody() }))
  assert.equal(result.status, 502)
  assert.equal(result.body.error.code, 'provider_error')
  assert.match(result.body.error.message, /^upstream said \*\*\*; retry with Authorization: \*\*\*/)

  const early = await mcpd.outcome(mcpd.sendTask({ provider: 'early', body: chatBody({ stream: true }) }))
  assert.equal(early.kind, 'result')
  assert.equal(early.status, 502)
  assert.match(early.body.error.message, /upstream said \*\*\*/)

  const midStream = await mcpd.outcome(mcpd.sendTask({ provider: 'echoing', body: chatBody({ stream: true }) }))
  assert.ok(midStream.payloads.some((payload) => payload.includes('partial answer')))
  const error = inBandError(midStream)
  assert.equal(error.code, 'provider_error')
  assert.match(error.message, /upstream said \*\*\*/)

  const posted = postedBytes(mcpd)
  assert.ok(posted.length >= 3, `only ${posted.length} task POSTs`)
  for (const bytes of posted) {
    assert.ok(!bytes.includes(TOKEN), `token posted to mcpd: ${bytes}`)
    assert.ok(!bytes.includes(encodeURIComponent(TOKEN).slice(0, 12)), `encoded token posted: ${bytes}`)
  }
  // The owner's log still has the warn line, token redacted there too.
  assert.ok(logger.lines.some((line) => line.msg === 'provider failed'))
  assert.ok(!JSON.stringify(logger.lines).includes(TOKEN))
  assert.deepEqual(mcpd.violations, [])
})

test("errorDetail 'generic': the caller gets an error id, the owner's warn line the message with that id", async (t) => {
  const mcpd = await startMcpd(t)
  const logger = captureLogger()
  const say = 'ollama at 10.0.0.5:11434 refused: /home/owner/models/qwen.gguf'
  await startRegistrar(
    t,
    mcpd,
    {},
    {
      logger,
      providers: [
        ...entries({ hidden: echoingProvider(say) }, { errorDetail: 'generic' }),
        ...entries({ shown: echoingProvider(say) }, { errorDetail: 'message' }),
      ],
    },
  )
  const GENERIC = /^the provider failed \(error id (e-[0-9a-f]{10})\)$/

  const result = await mcpd.outcome(mcpd.sendTask({ provider: 'hidden', body: chatBody() }))
  assert.equal(result.status, 502)
  assert.equal(result.body.error.type, 'provider_error')
  const [, resultId] = GENERIC.exec(result.body.error.message) ?? assert.fail(result.body.error.message)

  const midStream = await mcpd.outcome(mcpd.sendTask({ provider: 'hidden', body: chatBody({ stream: true }) }))
  const error = inBandError(midStream)
  const [, streamId] = GENERIC.exec(error.message) ?? assert.fail(error.message)
  assert.notEqual(streamId, resultId)

  for (const bytes of postedBytes(mcpd)) assert.ok(!bytes.includes('10.0.0.5'), `detail posted: ${bytes}`)
  for (const id of [resultId, streamId]) {
    const line = logger.lines.find((line) => line.msg === 'provider failed' && line.fields.errorId === id)
    assert.ok(line, `no warn line with errorId ${id}`)
    assert.equal(line.level, 'warn')
    assert.match(line.fields.error, /ollama at 10\.0\.0\.5:11434 refused/)
    assert.equal(typeof line.fields.taskId, 'string')
  }

  // The registrar's own answers are the same for a 'generic' provider.
  const invalid = await mcpd.outcome(mcpd.sendTask({ provider: 'hidden', body: { messages: 'hi' } }))
  assert.equal(invalid.status, 400)
  assert.match(invalid.body.error.message, /messages/)

  // 'message' (the default) keeps the provider's message.
  const shown = await mcpd.outcome(mcpd.sendTask({ provider: 'shown', body: chatBody() }))
  assert.equal(shown.body.error.message, say)
  assert.deepEqual(mcpd.violations, [])
})

test('what the official openai client sees: a scrubbed 502, and a generic in-band error', async (t) => {
  const mcpd = await startMcpd(t)
  await startRegistrar(
    t,
    mcpd,
    {},
    {
      providers: [
        ...entries({ local: echoingProvider(`bad key ${TOKEN}`) }),
        ...entries({ hidden: echoingProvider('secret detail') }, { errorDetail: 'generic' }),
      ],
    },
  )
  const client = openAiClient(mcpd)
  const failed = await client.chat.completions
    .create({ model: 'local', messages: [{ role: 'user', content: 'hi' }] })
    .then(
      () => assert.fail('resolved'),
      (error) => error,
    )
  assert.equal(failed.status, 502)
  assert.match(failed.message, /bad key \*\*\*/)
  assert.ok(!failed.message.includes(TOKEN))

  const stream = client.chat.completions.stream({ model: 'hidden', messages: [{ role: 'user', content: 'hi' }] })
  const streamed = await stream.finalChatCompletion().then(
    () => assert.fail('resolved'),
    (error) => error,
  )
  assert.match(String(streamed.message), /the provider failed \(error id e-[0-9a-f]{10}\)/)
  assert.ok(!String(streamed.message).includes('secret detail'))
})

test('errorDetail other than message or generic is ERR_INVALID_OPTION, naming the entry', async (t) => {
  const mcpd = await startMcpd(t)
  let caught
  try {
    new addon.VirtualLlmRegistrar({
      mcpdUrl: mcpd.url,
      token: TOKEN,
      providers: entries({ local: echoingProvider('x') }, { errorDetail: 'verbose' }),
    })
  } catch (error) {
    caught = error
  }
  assert.equal(caught?.code, 'ERR_INVALID_OPTION', String(caught))
  assert.match(caught.message, /providers\[0\]\.errorDetail must be 'message' or 'generic'; got 'verbose'/)
})

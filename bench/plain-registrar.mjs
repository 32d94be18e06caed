// The benchmark's peer: the best registrar we can write in plain Node, so the
// addon's ratios are against a fair opponent, not a strawman. Same protocol
// (docs/protocol.md) and the same work per task as the addon: the OpenAI request
// turned into CompletionOptions with an AbortSignal, the provider called, the
// answer encoded as OpenAI JSON (the same bytes as the addon's StreamEncoder:
// role first, exactly one finish_reason, usage when asked, then [DONE]) and POSTed.
//
// What makes it the best plain Node we know how to write:
// - POSTs go through node:http with one keep-alive Agent (fetch/undici costs
//   several times as much per request), with content-length bodies;
// - a content chunk's payload is built from two parts made once per task, already
//   escaped as the JSON string a chunk POST holds, so a token costs one test of its
//   content and two string concatenations (no object, no JSON.stringify per token);
// - the addon's batching rules and window: one chunk POST in flight per task; the
//   payloads made meanwhile are appended to the next POST's body as they come; the
//   first POST goes at once, later ones linger up to 5 ms for company; the provider
//   is paused only while that body holds 4,096 payloads or 1 MiB (no other buffer);
// - the SSE channel is read with indexOf on the decoded text, no regex per line.
//
// Where it does less than the addon (none of it is on the measured path): no
// retries, reconnects or re-registers, no admission queue (the bench keeps at most
// 64 tasks in flight), no replay guard, no option checking. The heartbeat is sent.
// It is checked against testing/fake-mcpd.js and the official openai client in
// __test__/bench-peer.test.mjs, so its speed is not bought with wrong bytes.
import http from 'node:http'
import { completionOptions } from './completion-options.mjs'

const MAX_BATCH_PAYLOADS = 4096
const MAX_BATCH_BYTES = 1024 * 1024
const BATCH_LINGER_MS = 5
const DONE = '[DONE]'

/** Text that JSON.stringify writes between quotes unchanged: no quote, backslash, control character or lone surrogate. */
const PLAIN_TEXT = /^[^"\\\u0000-\u001f\ud800-\udfff]*$/

/** `json` (JSON text) as the inside of a JSON string, quotes excluded. */
const inner = (json) => {
  const quoted = JSON.stringify(json)
  return quoted.slice(1, -1)
}

/** A string value's JSON, escaped again as the inside of a JSON string: `"a"` → `\"a\"`. */
const innerString = (text) => (PLAIN_TEXT.test(text) ? `\\"${text}\\"` : inner(JSON.stringify(text)))

const FINISH_REASONS = {
  stop: 'stop',
  end_turn: 'stop',
  stop_sequence: 'stop',
  eos: 'stop',
  length: 'length',
  max_tokens: 'length',
  tool_calls: 'tool_calls',
  tool_use: 'tool_calls',
  function_call: 'tool_calls',
  content_filter: 'content_filter',
}
const normalizeFinishReason = (reason) =>
  reason === undefined || reason === null ? null : (FINISH_REASONS[reason] ?? 'stop')

export class PlainRegistrar {
  constructor({ mcpdUrl, token, providers, heartbeatIntervalMs = 30_000 }) {
    const url = new URL(mcpdUrl)
    this.host = url.hostname
    this.port = Number(url.port) || 80
    this.prefix = url.pathname.replace(/\/$/, '')
    this.token = token
    this.providers = new Map(providers.map((entry) => [entry.name, entry]))
    this.counters = new Map(providers.map((entry) => [entry.name, { inFlight: 0, completed: 0, failed: 0 }]))
    this.tasks = new Map()
    this.session = null
    this.heartbeatIntervalMs = heartbeatIntervalMs
    this.agent = new http.Agent({ keepAlive: true, noDelay: true })
    this.postHeaders = null
  }

  /** The POST headers, one object reused: http.request copies them before it returns. */
  headersFor(body) {
    this.postHeaders['content-length'] = Buffer.byteLength(body)
    return this.postHeaders
  }

  /** One POST on the keep-alive Agent; resolves with the status and the answer's text. */
  post(path, body) {
    return new Promise((resolve, reject) => {
      const request = http.request(
        {
          host: this.host,
          port: this.port,
          path: this.prefix + path,
          method: 'POST',
          agent: this.agent,
          headers: this.headersFor(body),
        },
        (response) => {
          let text = ''
          response.setEncoding('utf8')
          response.on('data', (part) => {
            text += part
          })
          response.on('end', () => resolve({ status: response.statusCode, text }))
          response.on('error', reject)
        },
      )
      request.on('error', reject)
      request.end(body)
    })
  }

  async start() {
    this.postHeaders = { authorization: `Bearer ${this.token}`, 'content-type': 'application/json' }
    const providers = [...this.providers.values()].map(({ name, type, model }) => ({ name, type, model }))
    const register = await this.post(
      '/api/v1/llms/_provider-register',
      JSON.stringify({ client: { name: 'mcplocal-plain-registrar', version: '0.0.0' }, providers }),
    )
    if (register.status !== 200 && register.status !== 201) throw new Error(`register: HTTP ${register.status}`)
    const answer = JSON.parse(register.text)
    this.session = answer.providerSessionId
    if (Number.isFinite(answer.heartbeatIntervalMs)) this.heartbeatIntervalMs = answer.heartbeatIntervalMs
    this.postHeaders = { ...this.postHeaders, 'x-mcpctl-provider-session': this.session }
    this.heartbeat = setInterval(() => this.beat().catch(() => {}), this.heartbeatIntervalMs)
    this.heartbeat.unref()
    await new Promise((resolve, reject) => {
      this.request = http.get(
        {
          host: this.host,
          port: this.port,
          path: `${this.prefix}/api/v1/llms/_provider-stream?providerSessionId=${encodeURIComponent(this.session)}`,
          headers: {
            authorization: `Bearer ${this.token}`,
            accept: 'text/event-stream',
            'x-mcpctl-provider-session': this.session,
          },
        },
        (response) => {
          if (response.statusCode !== 200) return reject(new Error(`stream: HTTP ${response.statusCode}`))
          response.setEncoding('utf8')
          response.on('data', (text) => this.onText(text))
          response.on('error', () => {})
          resolve()
        },
      )
      this.request.on('error', reject)
    })
  }

  beat() {
    const providers = [...this.counters].map(([name, counters]) => ({
      name,
      inFlight: counters.inFlight,
      queued: 0,
      maxConcurrency: 64,
      completed: counters.completed,
      failed: counters.failed,
    }))
    return this.post('/api/v1/llms/_provider-heartbeat', JSON.stringify({ providerSessionId: this.session, providers }))
  }

  // SSE (the WHATWG rules the channel needs): lines end in \n, \r\n or \r; a blank
  // line dispatches; `event:` and `data:` fields, comments and others ignored.
  pending = ''
  event = ''
  data = null
  onText(text) {
    // A \r at the end may be half of a \r\n: held until the next read.
    let input = this.pending + text
    if (input.endsWith('\r')) {
      this.pending = '\r'
      input = input.slice(0, -1)
    } else this.pending = ''
    if (input.includes('\r')) input = input.replace(/\r\n?/g, '\n')
    let at = 0
    for (let end = input.indexOf('\n'); end !== -1; end = input.indexOf('\n', at)) {
      const line = input.slice(at, end)
      at = end + 1
      if (line === '') {
        if (this.data !== null) this.onEvent(this.event || 'message', this.data)
        this.event = ''
        this.data = null
      } else if (line.startsWith('data:')) {
        const value = line.slice(line.charCodeAt(5) === 32 ? 6 : 5)
        this.data = this.data === null ? value : `${this.data}\n${value}`
      } else if (line.startsWith('event:')) this.event = line.slice(line.charCodeAt(6) === 32 ? 7 : 6)
    }
    this.pending = input.slice(at) + this.pending
  }

  async stop() {
    clearInterval(this.heartbeat)
    for (const task of this.tasks.values()) task.controller.abort()
    this.request?.destroy()
    this.agent.destroy()
  }

  onEvent(event, data) {
    if (event === 'cancel') {
      this.tasks.get(JSON.parse(data).taskId)?.controller.abort()
      return
    }
    if (event !== 'task') return
    this.run(JSON.parse(data)).catch(() => {})
  }

  async run({ taskId, provider: name, stream, body }) {
    const path = `/api/v1/llms/_provider-tasks/${encodeURIComponent(taskId)}`
    const entry = this.providers.get(name)
    if (!entry) {
      return this.post(`${path}/result`, errorReply(404, `no provider ${name}`, 'invalid_request_error', 'model_not_found'))
    }
    const counters = this.counters.get(name)
    const controller = new AbortController()
    const task = { controller }
    this.tasks.set(taskId, task)
    counters.inFlight++
    let ok = false
    try {
      const options = completionOptions(body, entry.model, controller.signal)
      const identity = {
        id: `chatcmpl-${taskId}`,
        created: Math.floor(Date.now() / 1000),
        model: typeof body.model === 'string' ? body.model : (entry.model ?? name),
      }
      if (stream) {
        const includeUsage = body.stream_options?.include_usage === true
        ok = await this.relay(path, new StreamEncoder(identity, includeUsage), entry.provider, options, controller.signal)
      } else {
        let result
        try {
          result = await entry.provider.complete(options)
        } catch (error) {
          if (!controller.signal.aborted) {
            await this.post(`${path}/result`, errorReply(502, String(error?.message ?? error), 'provider_error'))
          }
          return
        }
        if (controller.signal.aborted) return
        await this.post(`${path}/result`, `{"status":200,"body":${JSON.stringify(chatCompletion(identity, result))}}`)
        ok = true
      }
    } finally {
      this.tasks.delete(taskId)
      counters.inFlight--
      if (!controller.signal.aborted) ok ? counters.completed++ : counters.failed++
    }
  }

  /**
   * Runs the provider's stream and relays its payloads; true when it ended well.
   * The producer appends each payload to the next chunk POST's body; the relay
   * (`send`) posts that body whole, one POST in flight.
   */
  async relay(path, encoder, provider, options, signal) {
    const chunksPath = `${path}/chunks`
    const out = {
      body: '',
      count: 0,
      bytes: 0,
      done: false,
      producerGone: false,
      relayGone: false,
      wakeRelay: null,
      wakeProducer: null,
    }
    const wake = (name) => {
      const resolve = out[name]
      out[name] = null
      resolve?.()
    }
    const full = () => out.count >= MAX_BATCH_PAYLOADS || out.bytes >= MAX_BATCH_BYTES
    const ready = () => out.done || out.producerGone || full()
    /** Appends payloads (already escaped as JSON string contents); waits while the body is full. */
    const push = async (payloads) => {
      for (const payload of payloads) {
        while (full() && !out.relayGone) await new Promise((resolve) => (out.wakeProducer = resolve))
        if (out.relayGone) return
        const wasEmpty = out.count === 0
        out.body += out.count === 0 ? `"${payload}"` : `,"${payload}"`
        out.count++
        out.bytes += payload.length
        if (payload === DONE) out.done = true
        if (wasEmpty || ready()) wake('wakeRelay')
      }
    }
    const send = async () => {
      let seq = 0
      try {
        for (;;) {
          while (out.count === 0 && !out.producerGone) await new Promise((resolve) => (out.wakeRelay = resolve))
          if (out.count === 0) return true
          if (seq > 0 && !ready()) {
            // Later POSTs wait up to 5 ms for company, as the addon's do.
            await new Promise((resolve) => {
              const timer = setTimeout(resolve, BATCH_LINGER_MS)
              out.wakeRelay = () => {
                clearTimeout(timer)
                resolve()
              }
            })
            out.wakeRelay = null
          }
          if (signal.aborted) return false
          const body = `{"seq":${seq},"chunks":[${out.body}]}`
          const { count, done } = out
          out.body = ''
          out.count = 0
          out.bytes = 0
          out.done = false
          wake('wakeProducer')
          const { status } = await this.post(chunksPath, body)
          if (status < 200 || status >= 300) return false
          seq += count
          if (done) return true
        }
      } finally {
        out.relayGone = true
        wake('wakeProducer')
      }
    }
    const sending = send()
    let errored = false
    try {
      const iterator = provider.stream ? provider.stream(options)[Symbol.asyncIterator]() : null
      if (iterator) {
        const payloads = []
        for (;;) {
          const { value, done } = await iterator.next()
          if (done) break
          if (signal.aborted || out.relayGone) {
            await iterator.return?.()
            break
          }
          encoder.push(value, payloads)
          if (payloads.length) {
            await push(payloads)
            payloads.length = 0
          }
        }
      } else {
        const payloads = []
        encoder.pushResult(await provider.complete(options), payloads)
        await push(payloads)
      }
    } catch (error) {
      errored = true
      if (!encoder.started) {
        // Nothing streamed yet: the error is the task's result (docs/protocol.md).
        out.producerGone = true
        wake('wakeRelay')
        await sending
        if (!signal.aborted) {
          await this.post(`${path}/result`, errorReply(502, String(error?.message ?? error), 'provider_error'))
        }
        return false
      }
      await push(encoder.fail(String(error?.message ?? error)))
    }
    if (!errored && !signal.aborted) await push(encoder.finish())
    out.producerGone = true
    wake('wakeRelay')
    const sent = await sending
    return sent && !errored
  }
}

/** The addon's StreamEncoder in JavaScript, writing every payload escaped as the inside of a JSON string. */
class StreamEncoder {
  constructor(identity, includeUsage) {
    this.identity = identity
    this.includeUsage = includeUsage
    this.started = false
    this.finishReason = null
    this.usage = null
    this.toolIndices = new Set()
    // The keys in the order the addon writes them (serde_json's sorted order).
    this.tail = `],"created":${identity.created},"id":${JSON.stringify(identity.id)},"model":${JSON.stringify(identity.model)},"object":"chat.completion.chunk"${includeUsage ? ',"usage":null' : ''}}`
    this.contentHead = inner('{"choices":[{"delta":{"content":')
    this.contentEnd = inner(`},"finish_reason":null,"index":0,"logprobs":null}${this.tail}`)
  }

  payload(delta, finishReason) {
    const reason = finishReason === null ? 'null' : JSON.stringify(finishReason)
    return inner(`{"choices":[{"delta":${delta},"finish_reason":${reason},"index":0,"logprobs":null}${this.tail}`)
  }

  start(out) {
    if (!this.started) {
      this.started = true
      out.push(this.payload('{"content":"","role":"assistant"}', null))
    }
  }

  push(chunk, out) {
    this.start(out)
    const reason = normalizeFinishReason(chunk.finishReason)
    if (reason) this.finishReason = reason
    if (chunk.usage) this.usage = chunk.usage
    const content = typeof chunk.content === 'string' && chunk.content !== '' ? chunk.content : null
    const calls = []
    for (const call of chunk.toolCalls ?? []) {
      const delta = this.toolCallDelta(call)
      if (delta) calls.push(delta)
    }
    if (calls.length === 0) {
      if (content !== null) out.push(this.contentHead + innerString(content) + this.contentEnd)
      return
    }
    const delta = content === null ? { tool_calls: calls } : { content, tool_calls: calls }
    out.push(this.payload(JSON.stringify(delta), null))
  }

  toolCallDelta(call) {
    const fn = call.function ?? {}
    if (!this.toolIndices.has(call.index)) {
      this.toolIndices.add(call.index)
      return {
        function: { arguments: fn.arguments ?? '', name: fn.name ?? '' },
        id: call.id || `call_${this.identity.id}_${call.index}`,
        index: call.index,
        type: 'function',
      }
    }
    if (!fn.arguments) return null
    return { function: { arguments: fn.arguments }, index: call.index }
  }

  pushResult(result, out) {
    const toolCalls = result.toolCalls?.map((call, index) => ({
      index,
      id: call.id,
      function: { name: call.function.name, arguments: call.function.arguments },
    }))
    this.push({ content: result.content, toolCalls, finishReason: result.finishReason, usage: result.usage }, out)
  }

  finish() {
    const out = []
    this.start(out)
    out.push(this.payload('{}', this.finishReason ?? (this.toolIndices.size ? 'tool_calls' : 'stop')))
    if (this.includeUsage) {
      const usage = this.usage ?? { promptTokens: 0, completionTokens: 0 }
      const chunk = {
        choices: [],
        created: this.identity.created,
        id: this.identity.id,
        model: this.identity.model,
        object: 'chat.completion.chunk',
        usage: wireUsage(usage),
      }
      out.push(inner(JSON.stringify(chunk)))
    }
    out.push(DONE)
    return out
  }

  fail(message) {
    return [inner(JSON.stringify({ error: { code: null, message, type: 'provider_error' } })), DONE]
  }
}

function wireUsage(usage) {
  return {
    completion_tokens: usage.completionTokens,
    prompt_tokens: usage.promptTokens,
    total_tokens: usage.totalTokens ?? usage.promptTokens + usage.completionTokens,
  }
}

function chatCompletion(identity, result) {
  const toolCalls = result.toolCalls?.length
    ? result.toolCalls.map((call) => ({ id: call.id, type: 'function', function: call.function }))
    : null
  const message = { role: 'assistant', content: result.content ?? null, refusal: null }
  if (toolCalls) message.tool_calls = toolCalls
  const completion = {
    id: identity.id,
    object: 'chat.completion',
    created: identity.created,
    model: result.model ?? identity.model,
    choices: [
      {
        index: 0,
        message,
        logprobs: null,
        finish_reason: normalizeFinishReason(result.finishReason) ?? (toolCalls ? 'tool_calls' : 'stop'),
      },
    ],
  }
  if (result.usage) completion.usage = wireUsage(result.usage)
  return completion
}

function errorReply(status, message, type, code = null) {
  return JSON.stringify({ status, body: { error: { message, type, code } } })
}

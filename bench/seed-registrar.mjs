// The bench's third column (`npm run bench -- --seed`): the plain-Node registrar as
// the seed TypeScript was built and as this bench measured it before issue 18, kept
// as it was so older figures can be compared. Not the peer the ratios are against
// (that is bench/plain-registrar.mjs): it posts with fetch, builds and stringifies a
// chunk object per token and keeps a 256-payload buffer (its second finish_reason is gone:
// bench/mcpd now counts them).
// As it was: a minimal registrar in plain Node, built the way the
// seed TypeScript was (fetch for the POSTs, node:http for the SSE channel), doing
// the same work per task as the addon: the OpenAI request turned into
// CompletionOptions with an AbortSignal, the provider called, the answer encoded
// as OpenAI JSON and POSTed; a stream's payloads relayed one POST in flight at a
// time, batched by the addon's rule (the first POST at once, later ones linger
// 5 ms for company, at most 1024 payloads or 1 MiB), with the addon's 256-payload
// buffer as backpressure. No artificial slowness; no retries or reconnects
// (a benchmark run has no failures to retry).
import http from 'node:http'
import { completionOptions } from './completion-options.mjs'

const MAX_BATCH_PAYLOADS = 1024
const MAX_BATCH_BYTES = 1024 * 1024
const BATCH_LINGER_MS = 5
const RELAY_BUFFER = 256

export class SeedRegistrar {
  constructor({ mcpdUrl, token, providers }) {
    this.base = mcpdUrl.replace(/\/$/, '')
    this.token = token
    this.providers = new Map(providers.map((entry) => [entry.name, entry]))
    this.tasks = new Map()
    this.session = null
  }

  headers() {
    const headers = { authorization: `Bearer ${this.token}`, 'content-type': 'application/json' }
    if (this.session) headers['x-mcpctl-provider-session'] = this.session
    return headers
  }

  async post(path, body) {
    const response = await fetch(this.base + path, {
      method: 'POST',
      headers: this.headers(),
      body: JSON.stringify(body),
    })
    await response.arrayBuffer()
    if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`)
    return response
  }

  async start() {
    const providers = [...this.providers.values()].map(({ name, type, model }) => ({ name, type, model }))
    const response = await fetch(`${this.base}/api/v1/llms/_provider-register`, {
      method: 'POST',
      headers: this.headers(),
      body: JSON.stringify({ client: { name: 'mcplocal-registrar', version: '0.0.0' }, providers }),
    })
    const answer = await response.json()
    this.session = answer.providerSessionId
    await new Promise((resolve, reject) => {
      const url = `${this.base}/api/v1/llms/_provider-stream?providerSessionId=${encodeURIComponent(this.session)}`
      this.request = http.get(url, { headers: { ...this.headers(), accept: 'text/event-stream' } }, (res) => {
        if (res.statusCode !== 200) return reject(new Error(`stream: HTTP ${res.statusCode}`))
        res.setEncoding('utf8')
        let pending = ''
        let event = ''
        let data = []
        res.on('data', (text) => {
          pending += text
          let end
          while ((end = pending.search(/\r\n|\n|\r/)) !== -1) {
            const line = pending.slice(0, end)
            pending = pending.slice(end + (pending.startsWith('\r\n', end) ? 2 : 1))
            if (line === '') {
              if (data.length) this.onEvent(event || 'message', data.join('\n'))
              event = ''
              data = []
            } else if (line.startsWith('data:')) data.push(line.slice(line[5] === ' ' ? 6 : 5))
            else if (line.startsWith('event:')) event = line.slice(line[6] === ' ' ? 7 : 6)
          }
        })
        resolve()
      })
      this.request.on('error', reject)
    })
  }

  stop() {
    for (const task of this.tasks.values()) task.controller.abort()
    this.request?.destroy()
  }

  onEvent(event, data) {
    if (event === 'cancel') {
      this.tasks.get(JSON.parse(data).taskId)?.controller.abort()
      return
    }
    if (event !== 'task') return
    const task = JSON.parse(data)
    this.run(task).catch(() => {})
  }

  async run({ taskId, provider: name, stream, body }) {
    const path = `/api/v1/llms/_provider-tasks/${encodeURIComponent(taskId)}`
    const entry = this.providers.get(name)
    if (!entry) {
      return this.post(`${path}/result`, errorReply(404, `no provider ${name}`, 'invalid_request_error', 'model_not_found'))
    }
    const controller = new AbortController()
    this.tasks.set(taskId, { controller })
    const options = completionOptions(body, entry.model, controller.signal)
    const identity = { id: `chatcmpl-${taskId}`, created: Math.floor(Date.now() / 1000), model: body.model ?? entry.model ?? name }
    try {
      if (stream && typeof entry.provider.stream === 'function') {
        await this.relay(path, identity, entry.provider.stream(options))
      } else {
        let result
        try {
          result = await entry.provider.complete(options)
        } catch (error) {
          return await this.post(`${path}/result`, errorReply(502, String(error?.message ?? error), 'provider_error'))
        }
        await this.post(`${path}/result`, { status: 200, body: chatCompletion(identity, result) })
      }
    } finally {
      this.tasks.delete(taskId)
    }
  }

  /** Pulls the provider's chunks into a buffer; one POST in flight drains it. */
  async relay(path, identity, iterable) {
    const queue = []
    let done = false
    let wake = null
    let space = null
    let lingering = null
    let seq = 0
    const settle = (resolve) => resolve?.()
    // Like the addon's channel: RELAY_BUFFER payloads wait, plus, while a batch
    // lingers, the batch being filled (up to MAX_BATCH_PAYLOADS).
    const push = async (payload) => {
      queue.push(payload)
      settle(wake)
      wake = null
      if (lingering && queue.length >= MAX_BATCH_PAYLOADS) settle(lingering.cut)
      const limit = lingering ? RELAY_BUFFER + MAX_BATCH_PAYLOADS : RELAY_BUFFER
      if (queue.length >= limit) await new Promise((resolve) => (space = resolve))
    }
    const sender = (async () => {
      for (;;) {
        if (queue.length === 0) {
          if (done) return
          await new Promise((resolve) => (wake = resolve))
          continue
        }
        // The first POST goes at once; later ones wait 5 ms for company.
        if (seq > 0 && !done && queue.at(-1) !== '[DONE]') {
          await new Promise((resolve) => {
            lingering = { cut: resolve }
            const timer = setTimeout(resolve, BATCH_LINGER_MS)
            lingering.cut = () => {
              clearTimeout(timer)
              resolve()
            }
            settle(space)
            space = null
          })
          lingering = null
        }
        const batch = []
        let bytes = 0
        while (queue.length && batch.length < MAX_BATCH_PAYLOADS && bytes < MAX_BATCH_BYTES) {
          const payload = queue.shift()
          bytes += payload.length
          batch.push(payload)
        }
        settle(space)
        space = null
        await this.post(`${path}/chunks`, { seq, chunks: batch })
        seq += batch.length
      }
    })()
    let first = true
    let finished = false
    try {
      for await (const chunk of iterable) {
        const delta = {}
        if (first) delta.role = 'assistant'
        if (chunk.content !== undefined) delta.content = chunk.content
        if (chunk.toolCalls) delta.tool_calls = chunk.toolCalls
        first = false
        finished ||= chunk.finishReason != null
        await push(JSON.stringify(chunkObject(identity, delta, chunk.finishReason ?? null)))
      }
      // (It used to send this one always: two finish_reasons, which bench/mcpd now refuses.)
      if (!finished) await push(JSON.stringify(chunkObject(identity, {}, 'stop')))
    } catch (error) {
      await push(JSON.stringify({ error: { message: String(error?.message ?? error), type: 'provider_error', code: null } }))
    }
    done = true
    await push('[DONE]')
    await sender
  }
}

function chatCompletion(identity, result) {
  const usage = result.usage
  return {
    id: identity.id,
    object: 'chat.completion',
    created: identity.created,
    model: identity.model,
    choices: [
      {
        index: 0,
        message: { role: 'assistant', content: result.content ?? null, ...(result.toolCalls ? { tool_calls: result.toolCalls } : {}) },
        finish_reason: result.finishReason ?? 'stop',
        logprobs: null,
      },
    ],
    ...(usage
      ? { usage: { prompt_tokens: usage.promptTokens, completion_tokens: usage.completionTokens, total_tokens: usage.totalTokens ?? usage.promptTokens + usage.completionTokens } }
      : {}),
  }
}

function chunkObject(identity, delta, finishReason) {
  return {
    id: identity.id,
    object: 'chat.completion.chunk',
    created: identity.created,
    model: identity.model,
    choices: [{ index: 0, delta, finish_reason: finishReason, logprobs: null }],
  }
}

function errorReply(status, message, type, code = null) {
  return { status, body: { error: { message, type, code } } }
}

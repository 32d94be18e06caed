// The LlmProviders the demo publishes: a deterministic demo model that streams canned
// answers token by token, and a bridge to any OpenAI-compatible server (Ollama, llama.cpp).

/** The demo model's canned answers, so a reader (and the demo's test) knows what to expect. */
export const DEMO_REPLIES = Object.freeze({
  hello:
    'Hello! I am demo-llm, a deterministic demo model running inside this process, published to mcpd by the registrar.',
  relay:
    'Your request went to the dev mcpd, which sent it to the registrar over an SSE channel; the registrar called my stream() and posted each token back, and mcpd streamed it to you.',
})

/** `'1 2 3 … n'`, the answer to "count from 1 to n". */
export const countingReply = (n) => Array.from({ length: n }, (_, i) => `${i + 1}`).join(' ')

/** The demo model's answer to a conversation: it reads only the last user message. */
export function demoReplyFor(messages) {
  const prompt = textOf([...messages].reverse().find((m) => m.role === 'user')?.content)
  const counting = /count from 1 to (\d+)/i.exec(prompt)
  if (counting) return countingReply(Math.min(Number(counting[1]), 10_000))
  if (/\bhow\b/i.test(prompt)) return DEMO_REPLIES.relay
  return DEMO_REPLIES.hello
}

/** Words with their leading space: what the demo model calls a token. */
export const tokensOf = (text) => text.match(/\s*\S+/g) ?? []

/**
 * The demo model. Each token takes `tokenDelayMs`; both calls stop as soon as the
 * signal fires, and the abort is logged with the number of tokens already produced.
 */
export function createDemoProvider({ tokenDelayMs = 40, log = console.log, onAbort } = {}) {
  async function* generate(options) {
    const all = tokensOf(demoReplyFor(options.messages))
    const limit = options.maxTokens ?? Infinity
    const tokens = all.slice(0, limit)
    const progress = watchAbort(options.signal, log, onAbort)
    try {
      for (const token of tokens) {
        await abortableSleep(tokenDelayMs, options.signal)
        options.signal.throwIfAborted()
        progress.count++
        yield token
      }
    } finally {
      progress.done()
    }
    return {
      finishReason: tokens.length < all.length ? 'length' : 'stop',
      usage: usageOf(promptTokensOf(options.messages), tokens.length),
    }
  }

  return {
    name: 'demo-llm',
    async complete(options) {
      const tokens = generate(options)
      let content = ''
      let step
      while (!(step = await tokens.next()).done) content += step.value
      return { content, model: 'demo-1', ...step.value }
    },
    async *stream(options) {
      const tokens = generate(options)
      let step
      while (!(step = await tokens.next()).done) yield { content: step.value }
      yield step.value
    },
  }
}

/**
 * A provider backed by an OpenAI-compatible server's `POST <baseURL>/chat/completions`.
 * The request mcpd relayed is forwarded as it is (only `model` and the streaming fields
 * are set here), `options.signal` aborts the upstream call, and the answer is mapped back
 * to a CompletionResult or CompletionChunks.
 */
export function createUpstreamProvider({
  baseURL,
  model,
  apiKey,
  log = console.log,
  onAbort,
  fetch = globalThis.fetch,
} = {}) {
  if (!baseURL) throw new TypeError('createUpstreamProvider: baseURL is required')
  if (!model) throw new TypeError('createUpstreamProvider: model is required')
  const endpoint = `${baseURL.replace(/\/+$/, '')}/chat/completions`

  async function post(options, body) {
    let response
    try {
      response = await fetch(endpoint, {
        method: 'POST',
        headers: {
          'content-type': 'application/json',
          accept: body.stream ? 'text/event-stream' : 'application/json',
          ...(apiKey ? { authorization: `Bearer ${apiKey}` } : {}),
        },
        body: JSON.stringify(body),
        signal: options.signal,
      })
    } catch (error) {
      if (options.signal.aborted) throw error
      // fetch says only "fetch failed"; the reason is in its cause.
      throw new Error(`cannot reach ${endpoint}: ${error.cause?.message ?? error.message}`, { cause: error })
    }
    if (!response.ok) throw await upstreamError(response)
    return response
  }

  return {
    name: `upstream:${model}`,
    async complete(options) {
      const { stream: _stream, stream_options: _streamOptions, ...request } = options.request
      const progress = watchAbort(options.signal, log, onAbort)
      try {
        const response = await post(options, { ...request, model })
        return resultFromOpenAi(await response.json())
      } finally {
        progress.done()
      }
    },
    async *stream(options) {
      const body = {
        ...options.request,
        model,
        stream: true,
        // Without it most servers never say how many tokens the answer took.
        stream_options: { ...options.request.stream_options, include_usage: true },
      }
      const progress = watchAbort(options.signal, log, onAbort)
      try {
        const response = await post(options, body)
        for await (const data of sseData(response.body)) {
          if (data === '[DONE]') break
          const chunk = chunkFromOpenAi(JSON.parse(data))
          if (chunk === null) continue
          if (chunk.content !== undefined || chunk.toolCalls !== undefined) progress.count++
          yield chunk
        }
      } finally {
        progress.done()
      }
    },
  }
}

/** The first model an OpenAI-compatible server lists, for `--upstream` without `--model`. */
export async function firstUpstreamModel(baseURL, { apiKey, signal, fetch = globalThis.fetch } = {}) {
  const response = await fetch(`${baseURL.replace(/\/+$/, '')}/models`, {
    headers: apiKey ? { authorization: `Bearer ${apiKey}` } : {},
    signal,
  })
  if (!response.ok) throw await upstreamError(response)
  const list = await response.json()
  const id = list?.data?.[0]?.id
  if (typeof id !== 'string') throw new Error(`${baseURL}/models lists no model; pass --model <name>`)
  return id
}

// --- OpenAI wire format → CompletionResult / CompletionChunk -------------------------

const FINISH_REASONS = new Set(['stop', 'length', 'tool_calls', 'content_filter'])

/** Only the four reasons the registrar may relay; the legacy `function_call` is a tool call. */
function finishReasonOf(reason) {
  if (FINISH_REASONS.has(reason)) return reason
  if (reason === 'function_call') return 'tool_calls'
  return undefined
}

function usageFromOpenAi(usage) {
  if (!usage || typeof usage !== 'object') return undefined
  return usageOf(usage.prompt_tokens ?? 0, usage.completion_tokens ?? 0, usage.total_tokens)
}

/** A `chat.completion` object as a CompletionResult. */
export function resultFromOpenAi(completion) {
  const choice = completion?.choices?.[0]
  if (!choice) throw new Error('upstream answer has no choices')
  const message = choice.message ?? {}
  const result = { content: textOf(message.content) || (message.content === '' ? '' : null) }
  if (Array.isArray(message.tool_calls) && message.tool_calls.length > 0) {
    result.toolCalls = message.tool_calls.map((call) => ({
      id: call.id,
      type: 'function',
      function: { name: call.function?.name ?? '', arguments: argumentsText(call.function?.arguments) },
    }))
  }
  const finishReason = finishReasonOf(choice.finish_reason)
  if (finishReason) result.finishReason = finishReason
  const usage = usageFromOpenAi(completion.usage)
  if (usage) result.usage = usage
  if (typeof completion.model === 'string') result.model = completion.model
  return result
}

/** A `chat.completion.chunk` as a CompletionChunk; null when it carries nothing to relay (e.g. the role). */
export function chunkFromOpenAi(chunk) {
  if (chunk?.error) throw new Error(`upstream stream failed: ${chunk.error.message ?? JSON.stringify(chunk.error)}`)
  const choice = chunk?.choices?.[0]
  const delta = choice?.delta ?? {}
  const out = {}
  if (typeof delta.content === 'string' && delta.content !== '') out.content = delta.content
  if (Array.isArray(delta.tool_calls) && delta.tool_calls.length > 0) {
    out.toolCalls = delta.tool_calls.map((call, i) => {
      const mapped = { index: call.index ?? i }
      if (call.id) mapped.id = call.id
      if (call.function) {
        mapped.function = {}
        if (call.function.name) mapped.function.name = call.function.name
        if (call.function.arguments !== undefined) mapped.function.arguments = argumentsText(call.function.arguments)
      }
      return mapped
    })
  }
  const finishReason = finishReasonOf(choice?.finish_reason)
  if (finishReason) out.finishReason = finishReason
  const usage = usageFromOpenAi(chunk?.usage)
  if (usage) out.usage = usage
  return Object.keys(out).length > 0 ? out : null
}

/** Some servers send tool arguments as an object; the OpenAI format wants JSON text. */
const argumentsText = (args) => (typeof args === 'string' ? args : args === undefined ? '' : JSON.stringify(args))

/** The data payloads of an SSE body, frames split across reads at any byte. */
export async function* sseData(body) {
  const decoder = new TextDecoder()
  let buffer = ''
  let data = []
  const lineEnd = /\r\n|\r|\n/
  function* takeLines(final) {
    let match
    while ((match = lineEnd.exec(buffer)) !== null) {
      // A lone '\r' at the end may be the first half of a "\r\n" still on its way.
      if (!final && match[0] === '\r' && match.index === buffer.length - 1) return
      const line = buffer.slice(0, match.index)
      buffer = buffer.slice(match.index + match[0].length)
      yield line
    }
    if (final && buffer !== '') {
      yield buffer
      buffer = ''
    }
  }
  function* frames(final) {
    for (const line of takeLines(final)) {
      if (line === '') {
        if (data.length > 0) yield data.join('\n')
        data = []
      } else if (line.startsWith('data:')) {
        data.push(line.slice(line.startsWith('data: ') ? 6 : 5))
      }
      // Comments (":…"), event:, id: and retry: lines do not matter to a chat stream.
    }
  }
  for await (const bytes of body) {
    buffer += decoder.decode(bytes, { stream: true })
    yield* frames(false)
  }
  buffer += decoder.decode()
  yield* frames(true)
  if (data.length > 0) yield data.join('\n')
}

async function upstreamError(response) {
  const text = await response.text().catch(() => '')
  let detail = text.slice(0, 500)
  try {
    detail = JSON.parse(text)?.error?.message ?? detail
  } catch {}
  return new Error(`upstream answered ${response.status} ${response.statusText}${detail ? `: ${detail}` : ''}`)
}

// --- shared helpers ------------------------------------------------------------------

function usageOf(promptTokens, completionTokens, totalTokens = promptTokens + completionTokens) {
  return { promptTokens, completionTokens, totalTokens }
}

function textOf(content) {
  if (typeof content === 'string') return content
  if (Array.isArray(content))
    return content
      .filter((part) => part?.type === 'text')
      .map((part) => part.text)
      .join('')
  return ''
}

const promptTokensOf = (messages) => messages.reduce((sum, m) => sum + tokensOf(textOf(m.content)).length, 0)

/**
 * Logs "provider: aborted after K tokens" when the signal fires before `done()`;
 * `count` is how many tokens (content or tool-call deltas) the call produced so far.
 */
function watchAbort(signal, log, onAbort) {
  let watching = true
  const progress = {
    count: 0,
    done() {
      watching = false
      signal.removeEventListener('abort', aborted)
    },
  }
  function aborted() {
    if (!watching) return
    watching = false
    log(`provider: aborted after ${progress.count} tokens`)
    onAbort?.(progress.count)
  }
  if (signal.aborted) queueMicrotask(aborted)
  else signal.addEventListener('abort', aborted, { once: true })
  return progress
}

/** Resolves after `ms`, or at once when the signal fires. */
function abortableSleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve()
    const timer = setTimeout(wake, ms)
    function wake() {
      clearTimeout(timer)
      signal.removeEventListener('abort', wake)
      resolve()
    }
    signal.addEventListener('abort', wake, { once: true })
  })
}

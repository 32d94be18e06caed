// Provider fixtures shared by the OpenAI-conformance and streaming tests: providers
// that stream scripted chunks, wait for their AbortSignal, or break on purpose,
// plus an OpenAI client pointed at the fake mcpd's front.
import OpenAI from 'openai'
import { TOKEN } from './helpers.mjs'

export { OpenAI }

/** The official client against `${mcpd.url}/v1`; no retries, so a 5xx is seen as it is. */
export function openAiClient(mcpd) {
  return new OpenAI({ baseURL: `${mcpd.url}/v1`, apiKey: TOKEN, maxRetries: 0, timeout: 15_000 })
}

/** A provider whose stream() yields `chunks` (CompletionChunk objects) and records its options. */
export function streamingProvider(chunks) {
  const calls = []
  return {
    calls,
    complete: async () => {
      throw new Error('complete() must not be called for a streaming task')
    },
    async *stream(options) {
      calls.push(options)
      for (const chunk of chunks) yield chunk
    },
  }
}

/** Text chunks `tokens`, then a finish chunk (and usage, when given). */
export function tokenChunks(tokens, { finishReason = 'stop', usage } = {}) {
  return [...tokens.map((content) => ({ content })), { finishReason, ...(usage ? { usage } : {}) }]
}

/** Resolves when `signal` fires, with `performance.now()` at its 'abort' event. */
export function abortedAt(signal) {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve(performance.now())
    signal.addEventListener('abort', () => resolve(performance.now()), { once: true })
  })
}

/**
 * A provider that parks every call until its signal fires, for cancel and limit tests.
 * `stream()` first yields `before` chunks, so a client sees the stream start; complete()
 * resolves `late` once aborted, an answer the registrar must not post.
 */
export function parkedProvider({ before = [{ content: 'first' }] } = {}) {
  const calls = []
  const aborts = []
  const provider = {
    calls,
    aborts,
    finalized: 0,
    complete(options) {
      calls.push(options)
      aborts.push(abortedAt(options.signal))
      return abortedAt(options.signal).then(() => ({ content: 'late' }))
    },
    async *stream(options) {
      calls.push(options)
      aborts.push(abortedAt(options.signal))
      try {
        for (const chunk of before) yield chunk
        await abortedAt(options.signal)
      } finally {
        provider.finalized++
      }
    },
  }
  return provider
}

/** The task ids mcpd saw answers for, in order of their first result or chunk POST. */
export function answeredTaskIds(mcpd) {
  const ids = []
  for (const request of mcpd.requests) {
    const match = /^\/api\/v1\/llms\/_provider-tasks\/([^/]+)\/(result|chunks)$/.exec(request.path)
    if (match && !ids.includes(decodeURIComponent(match[1]))) ids.push(decodeURIComponent(match[1]))
  }
  return ids
}

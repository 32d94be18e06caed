// The OpenAI-compatible front of the fake mcpd: serves the virtual LLMs that registrars
// publish to OpenAI clients, turning each chat request into a registrar task.
'use strict'

const { randomBytes } = require('node:crypto')

const FINISHED = Symbol('finished')

/**
 * The only headers of a result POST relayed to the OpenAI client, each with its check; a
 * registrar's other headers, or a value that fails its check, never reach the client.
 */
const RELAYED_HEADERS = new Map([
  // delta-seconds (RFC 9110 section 10.2.3): the form the contract sends; no HTTP-date.
  ['retry-after', (value) => /^\d{1,10}$/.test(value)],
])

/**
 * Knows nothing of the registrar protocol: the core hands it a few functions
 * (`listLlms`, `pickSession`, `sendTask`, `cancel`, `watchTask`) so the front
 * stays a client of the same public behaviour tests use.
 */
class OpenAiFront {
  #core
  #taskTimeoutMs
  #exchanges = new Set()

  constructor(core, { taskTimeoutMs }) {
    this.#core = core
    this.#taskTimeoutMs = taskTimeoutMs
  }

  /** Answers `path` when it is a front route; false otherwise. */
  /** `caller`: who the request's API key belongs to (attached to its task), or null. */
  handle(req, res, path, body, caller = null) {
    if (path === '/api/v1/llms') {
      if (req.method !== 'GET') return methodNotAllowed(res, 'GET')
      sendJson(res, 200, { llms: this.#core.listLlms() })
      return true
    }
    if (path === '/v1/models') {
      if (req.method !== 'GET') return methodNotAllowed(res, 'GET')
      sendJson(res, 200, { object: 'list', data: this.#core.listLlms().map(modelObject) })
      return true
    }
    const modelPath = /^\/v1\/models\/(.+)$/.exec(path)
    if (modelPath) {
      if (req.method !== 'GET') return methodNotAllowed(res, 'GET')
      const name = safeDecode(modelPath[1])
      const llm = this.#core.listLlms().find((l) => l.name === name)
      if (llm) sendJson(res, 200, modelObject(llm))
      else sendJson(res, 404, modelNotFound(name))
      return true
    }
    if (path === '/v1/chat/completions') {
      if (req.method !== 'POST') return methodNotAllowed(res, 'POST')
      this.#chat(res, body, caller, traceOf(req))
      return true
    }
    return false
  }

  /** Ends every pending OpenAI answer; mcpd is going away. */
  close() {
    for (const exchange of [...this.#exchanges]) {
      this.#fail(exchange, 503, { message: 'mcpd is shutting down', type: 'unavailable' })
    }
  }

  #chat(res, body, caller, trace) {
    if (!isObject(body)) {
      return sendJson(res, 400, invalidRequest('the request body must be a JSON object'))
    }
    const model = body.model
    if (typeof model !== 'string' || model === '') {
      return sendJson(res, 400, invalidRequest('`model` is required', 'model'))
    }
    const sessionId = this.#core.pickSession(model)
    if (sessionId === null) return sendJson(res, 404, modelNotFound(model))

    const streaming = body.stream === true
    const taskId = this.#core.sendTask({
      provider: model,
      body,
      stream: streaming,
      sessionId,
      ...(caller === null ? {} : { caller }),
      ...trace,
    })
    this.#core.log(`task ${taskId} is in trace ${trace.traceparent.slice(3, 35)}`)
    const exchange = {
      res,
      taskId,
      streaming,
      sseStarted: false,
      cancelReason: null,
      timer: null,
      unwatch: null,
      [FINISHED]: false,
    }
    this.#exchanges.add(exchange)

    exchange.timer = setTimeout(() => {
      exchange.cancelReason = 'timeout'
      this.#core.cancel(taskId)
    }, this.#taskTimeoutMs)

    // 'close' also fires after a normal end; only an unfinished answer means the
    // client went away, and then the registrar must stop working for nobody.
    res.on('close', () => {
      if (exchange[FINISHED]) return
      exchange.cancelReason = 'client'
      this.#finish(exchange)
      this.#core.cancel(taskId)
    })

    exchange.unwatch = this.#core.watchTask(taskId, {
      onPayload: (payload) => this.#relay(exchange, payload),
      onEnd: (outcome) => this.#conclude(exchange, outcome),
    })
  }

  #relay(exchange, payload) {
    if (exchange[FINISHED] || !exchange.streaming) return
    const { res } = exchange
    if (!exchange.sseStarted) {
      exchange.sseStarted = true
      res.writeHead(200, {
        'content-type': 'text/event-stream',
        'cache-control': 'no-cache',
        connection: 'keep-alive',
      })
    }
    writeData(res, payload)
    if (payload === '[DONE]') {
      this.#finish(exchange)
      res.end()
    } else {
      // A long generation is not a silent registrar: the wait restarts with each payload.
      exchange.timer.refresh()
    }
  }

  #conclude(exchange, outcome) {
    if (exchange[FINISHED]) return
    if (outcome.kind === 'result') {
      if (exchange.sseStarted) {
        // Headers are gone already: the only way left to report is in-band.
        const error =
          isObject(outcome.body) && isObject(outcome.body.error)
            ? outcome.body.error
            : { message: `registrar answered status ${outcome.status} after streaming began`, type: 'provider_error' }
        return this.#fail(exchange, outcome.status, error)
      }
      this.#finish(exchange)
      return sendJson(exchange.res, outcome.status, outcome.body, relayedHeaders(outcome.headers))
    }
    if (outcome.kind === 'stream') {
      if (exchange.streaming) return // #relay ended it at [DONE]
      return this.#fail(exchange, 502, {
        message: 'the registrar streamed an answer to a non-streaming task',
        type: 'provider_error',
      })
    }
    if (exchange.cancelReason === 'timeout') {
      return this.#fail(exchange, 504, {
        message: `no answer from the registrar within ${this.#taskTimeoutMs} ms`,
        type: 'timeout',
      })
    }
    this.#fail(exchange, 499, { message: `task ${exchange.taskId} was cancelled by mcpd`, type: 'cancelled' })
  }

  /** Reports an error whichever way is still open: a JSON answer, or in-band on a started stream. */
  #fail(exchange, status, error) {
    if (exchange[FINISHED]) return
    this.#finish(exchange)
    const { res } = exchange
    if (res.destroyed || res.writableEnded) return
    if (exchange.sseStarted) {
      writeData(res, JSON.stringify({ error }))
      writeData(res, '[DONE]')
      res.end()
    } else {
      sendJson(res, status, { error })
    }
  }

  #finish(exchange) {
    exchange[FINISHED] = true
    clearTimeout(exchange.timer)
    if (exchange.unwatch) exchange.unwatch()
    this.#exchanges.delete(exchange)
  }
}

function modelObject(llm) {
  return { id: llm.name, object: 'model', created: llm.created, owned_by: 'mcpctl-virtual' }
}

function modelNotFound(model) {
  return {
    error: {
      message: `The model '${model}' does not exist or no registrar publishing it is connected`,
      type: 'invalid_request_error',
      param: 'model',
      code: 'model_not_found',
    },
  }
}

function invalidRequest(message, param = null) {
  return { error: { message, type: 'invalid_request_error', param, code: null } }
}

function methodNotAllowed(res, allow) {
  res.setHeader('allow', allow)
  sendJson(res, 405, { error: { message: `use ${allow}`, type: 'invalid_request_error', code: 'method_not_allowed' } })
  return true
}

/** A payload may hold newlines; SSE rejoins several data lines with "\n", so it survives. */
function writeData(res, payload) {
  if (res.destroyed || res.writableEnded) return
  res.write(
    `${payload
      .split(/\r\n|\r|\n/)
      .map((line) => `data: ${line}\n`)
      .join('')}\n`,
  )
}

/** The allow-listed, valid headers of a result POST, as mcpd relays them. */
function relayedHeaders(headers) {
  const relayed = {}
  if (!isObject(headers)) return relayed
  for (const [name, value] of Object.entries(headers)) {
    const valid = RELAYED_HEADERS.get(name.toLowerCase())
    if (valid && typeof value === 'string' && valid(value)) relayed[name.toLowerCase()] = value
  }
  return relayed
}

function sendJson(res, status, body, headers = {}) {
  if (res.destroyed || res.writableEnded || res.headersSent) return
  const text = body === undefined ? '' : JSON.stringify(body)
  res.writeHead(status, {
    ...headers,
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(text),
  })
  res.end(text)
}

function isObject(value) {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
}

function safeDecode(text) {
  try {
    return decodeURIComponent(text)
  } catch {
    return text
  }
}

/** A version 00 traceparent of W3C Trace Context: lower-case hex, ids not all zero. */
const TRACEPARENT = /^00-(?!0{32}-)[0-9a-f]{32}-(?!0{16}-)[0-9a-f]{16}-[0-9a-f]{2}$/

/**
 * What the task frame carries as mcpd's span for this request (docs/protocol.md
 * section 5): the client's own traceparent (and tracestate) when it sent a valid
 * one, so the registrar's span joins the client's trace; else a fresh trace.
 */
function traceOf(req) {
  const sent = req.headers.traceparent
  if (typeof sent === 'string' && TRACEPARENT.test(sent)) {
    const state = req.headers.tracestate
    return typeof state === 'string' && state !== '' ? { traceparent: sent, tracestate: state } : { traceparent: sent }
  }
  return { traceparent: `00-${randomBytes(16).toString('hex')}-${randomBytes(8).toString('hex')}-01` }
}

module.exports = { OpenAiFront, sendJson, isObject, safeDecode, RELAYED_HEADERS }

// The fake mcpd: the server side of the registrar wire contract (docs/protocol.md). It records
// what a registrar sends, lets tests script failures, flags protocol violations, and is the engine of the dev mcpd.
'use strict'

const http = require('node:http')
const { randomUUID } = require('node:crypto')
const { OpenAiFront, sendJson, isObject, safeDecode, RELAYED_HEADERS } = require('./openai-api')

const ROUTES = ['register', 'heartbeat', 'stream', 'result', 'chunks']
const FINISH_REASONS = new Set(['stop', 'length', 'tool_calls', 'content_filter'])
const LOAD_FIELDS = ['inFlight', 'queued', 'maxConcurrency', 'completed', 'failed']
const MAX_BODY_BYTES = 16 * 1024 * 1024
const strictUtf8 = new TextDecoder('utf-8', { fatal: true })
/** Bounds of a task frame's `caller` (docs/protocol.md section 6, "The caller"). */
const CALLER_MAX_BYTES = 256
const CALLER_MAX_GROUPS = 64
/** The 429 codes of the owner's limits: each must carry a `retry-after` header. */
const LIMIT_CODES = new Set(['requests_per_minute', 'tokens_per_minute', 'tokens_per_day'])

class FakeMcpd {
  /** Every request, in arrival order. */
  requests = []
  registrations = []
  heartbeats = []
  connections = []
  /** Protocol violations the registrar committed; tests assert this stays empty. */
  violations = []
  sessions = new Map()
  url = null

  #token
  /** API key of the OpenAI front -> the caller mcpd attaches to the tasks sent for it. */
  #callers
  #prefix
  #heartbeatIntervalMs
  #keepAliveMs
  #host
  #port
  #newSessionId
  #log
  #front
  #server = null
  #listenPromise = null
  #closePromise = null
  #closed = false
  #streams = new Set()
  #sockets = new Set()
  #tasks = new Map()
  #taskCounter = 0
  #firstPublished = new Map()
  /** Per session id: the providers that left its set on a later register, listed as inactive. */
  #retired = new Map()
  #failures = new Map(ROUTES.map((route) => [route, []]))
  #delays = new Map()
  #sleeps = new Set()
  #outcomeWaiters = new Set()

  constructor(options = {}) {
    const {
      token = 'test-token',
      pathPrefix = '',
      heartbeatIntervalMs = undefined,
      keepAliveMs = 15000,
      taskTimeoutMs = 120000,
      host = '127.0.0.1',
      port = 0,
      sessionIdFactory = undefined,
      log = undefined,
      callers = undefined,
    } = options
    this.#token = token
    this.#callers = callerKeys(callers, token)
    this.#prefix = normalizePrefix(pathPrefix)
    this.#heartbeatIntervalMs = heartbeatIntervalMs
    this.#keepAliveMs = keepAliveMs
    this.#host = host
    this.#port = port
    this.#newSessionId = sessionIdFactory ?? (() => `ps-${randomUUID()}`)
    this.#log = typeof log === 'function' ? log : () => {}
    this.#front = new OpenAiFront(
      {
        listLlms: () => this.#listLlms(),
        pickSession: (model) => this.#pickSession(model),
        sendTask: (task) => this.sendTask(task),
        cancel: (taskId) => this.cancel(taskId),
        watchTask: (taskId, observer) => this.#watchTask(taskId, observer),
        log: (line) => this.#log(line),
      },
      { taskTimeoutMs },
    )
  }

  listen() {
    if (this.#closed) return Promise.reject(new Error('FakeMcpd: listen() after close()'))
    if (this.#listenPromise) return this.#listenPromise
    this.#server = http.createServer((req, res) => {
      this.#handle(req, res).catch((error) => {
        this.#log(`internal error: ${error.stack}`)
        if (!res.headersSent)
          sendJson(res, 500, { error: { message: `fake mcpd bug: ${error.message}`, type: 'server_error' } })
        else res.destroy()
      })
    })
    this.#server.on('connection', (socket) => {
      this.#sockets.add(socket)
      socket.once('close', () => this.#sockets.delete(socket))
    })
    this.#listenPromise = new Promise((resolve, reject) => {
      this.#server.once('error', reject)
      this.#server.listen(this.#port, this.#host, () => {
        this.#server.off('error', reject)
        const { address, port } = this.#server.address()
        const host = address.includes(':') ? `[${address}]` : address
        this.url = `http://${host}:${port}${this.#prefix}`
        resolve(this.url)
      })
    })
    return this.#listenPromise
  }

  close() {
    if (this.#closePromise) return this.#closePromise
    this.#closed = true
    this.#closePromise = (async () => {
      for (const sleep of this.#sleeps) sleep.wake()
      for (const waiter of this.#outcomeWaiters) {
        waiter.fail(new Error(`FakeMcpd closed before task ${waiter.taskId} ended`))
      }
      this.#front.close()
      for (const stream of [...this.#streams]) {
        this.#closeStream(stream)
        stream.res.end()
      }
      if (this.#server && this.#listenPromise) {
        await this.#listenPromise.catch(() => {})
        if (this.#server.listening) {
          const closed = new Promise((resolve) => this.#server.close(() => resolve()))
          // Keep-alive sockets of clients (undici pools) would hold close() open for seconds;
          // end() rather than destroy() so the answers just written (503s, stream ends) still arrive.
          for (const socket of this.#sockets) socket.end()
          const grace = setTimeout(() => this.#server.closeAllConnections(), 1000)
          await closed
          clearTimeout(grace)
        }
      }
    })()
    return this.#closePromise
  }

  // --- scripting -----------------------------------------------------------

  failNext(route, { status, body, times = 1, delayMs = 0, until, destroy = false, handle = false } = {}) {
    checkRoute(route)
    if (!destroy && !(Number.isInteger(status) && status >= 100 && status <= 599)) {
      throw new TypeError(`failNext: status must be an HTTP status, got ${status}`)
    }
    if (!(Number.isInteger(times) && times >= 1)) throw new TypeError('failNext: times must be a positive integer')
    this.#failures
      .get(route)
      .push({ status, body, left: times, delayMs, until, destroy, handle: handle && route !== 'stream' })
  }

  delay(route, ms) {
    checkRoute(route)
    this.#delays.set(route, Math.max(0, Number(ms) || 0))
  }

  forgetSession(id) {
    this.sessions.delete(id)
    this.#retired.delete(id)
  }

  dropStreams() {
    for (const stream of [...this.#streams]) {
      this.#closeStream(stream)
      stream.res.destroy()
    }
  }

  /** Writes one event to every open registrar stream; returns how many got it. */
  sendEvent(event, data, { id } = {}) {
    return this.#broadcast(sseFrame(event, data, id))
  }

  sendRaw(bytes) {
    return this.#broadcast(bytes)
  }

  sendTask({ provider, body, stream, taskId, eventId, sessionId, caller, traceparent, tracestate } = {}) {
    if (typeof provider !== 'string') throw new TypeError('sendTask: provider must be a string')
    if (!isObject(body)) throw new TypeError('sendTask: body must be an object')
    const target = this.#streamFor(sessionId, provider)
    if (!target) {
      throw new Error(
        sessionId === undefined
          ? 'sendTask: no registrar session has an open stream'
          : `sendTask: session ${sessionId} has no open stream`,
      )
    }
    const id = taskId ?? this.#nextTaskId()
    const isStream = stream ?? body.stream === true
    // A re-sent taskId (Last-Event-ID replay tests) is the same task, not a new one.
    if (!this.#tasks.has(id)) {
      this.#tasks.set(id, newTask(id, provider, isStream, body, target.sessionId))
      const session = this.sessions.get(target.sessionId)
      if (session) session.inFlight++
    }
    // Sent as given, unchecked: a test may send a malformed caller on purpose.
    const frame = { taskId: id, provider, stream: isStream, body }
    if (caller !== undefined) frame.caller = caller
    // mcpd's span for the request (docs/protocol.md section 5), also unchecked.
    if (traceparent !== undefined) frame.traceparent = traceparent
    if (tracestate !== undefined) frame.tracestate = tracestate
    writeTo(target.res, sseFrame('task', frame, eventId))
    const who = isObject(caller) && typeof caller.id === 'string' ? ` for caller ${caller.id}` : ''
    this.#log(`task ${id} (${provider}${isStream ? ', stream' : ''})${who} sent to session ${target.sessionId}`)
    return id
  }

  cancel(taskId) {
    const task = this.#tasks.get(taskId)
    if (task && !task.outcome) {
      task.cancelled = true
      this.#endTask(task, { kind: 'cancelled' })
    } else if (task) {
      task.cancelled = true
    }
    // Sent to every stream: the registrar holding the task may have re-registered
    // under a new session id since, and the others ignore unknown task ids.
    this.#broadcast(sseFrame('cancel', { taskId }))
    this.#log(`task ${taskId} cancelled`)
  }

  outcome(taskId, { timeoutMs = 10000 } = {}) {
    const task = this.#tasks.get(taskId)
    if (task?.outcome) return Promise.resolve(task.outcome)
    if (this.#closed) return Promise.reject(new Error(`outcome(${taskId}): FakeMcpd is closed`))
    let waiter
    const promise = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#outcomeWaiters.delete(waiter)
        reject(
          new Error(`outcome(${taskId}): the task did not end within ${timeoutMs} ms (${this.#describeTask(taskId)})`),
        )
      }, timeoutMs)
      waiter = {
        taskId,
        done: (outcome) => {
          clearTimeout(timer)
          this.#outcomeWaiters.delete(waiter)
          resolve(outcome)
        },
        fail: (error) => {
          clearTimeout(timer)
          this.#outcomeWaiters.delete(waiter)
          reject(error)
        },
      }
      this.#outcomeWaiters.add(waiter)
    })
    // close() rejects pending waits; this keeps a caller that stopped awaiting from crashing the process.
    promise.catch(() => {})
    return promise
  }

  chunkPosts(taskId) {
    return (this.#tasks.get(taskId)?.chunkPosts ?? []).map((post) => ({ ...post, chunks: [...post.chunks] }))
  }

  async waitFor(predicate, { timeoutMs = 5000, intervalMs = 10 } = {}) {
    const deadline = Date.now() + timeoutMs
    let lastError = null
    for (;;) {
      try {
        const value = await predicate()
        if (value) return value
        lastError = null
      } catch (error) {
        lastError = error
      }
      if (Date.now() >= deadline) {
        const source = String(predicate).replace(/\s+/g, ' ').slice(0, 200)
        const cause = lastError ? `; it last threw: ${lastError.message}` : ''
        throw new Error(`waitFor: condition not met within ${timeoutMs} ms: ${source}${cause}`)
      }
      await new Promise((resolve) => setTimeout(resolve, Math.min(intervalMs, Math.max(0, deadline - Date.now()))))
    }
  }

  // --- request dispatch ----------------------------------------------------

  async #handle(req, res) {
    // A client that vanished mid-answer is its business, not an uncaught error here.
    res.on('error', () => {})
    const url = new URL(req.url, 'http://fake-mcpd.invalid')
    const path = stripPrefix(url.pathname, this.#prefix)
    const record = {
      method: req.method,
      path: path ?? url.pathname,
      query: Object.fromEntries(url.searchParams),
      headers: { ...req.headers },
      body: '',
      raw: '',
      at: Date.now(),
    }
    this.requests.push(record)

    const route = path === null ? null : matchRoute(path)
    const auth = this.#authenticate(req)
    // A caller's API key opens the OpenAI front only, never the registrar routes.
    if (auth === null || (auth.caller !== null && (path === null || route !== null))) {
      record.raw = (await readBody(req).catch(() => Buffer.alloc(0))).toString('utf8')
      record.body = parseMaybeJson(record.raw)
      return sendJson(res, 401, {
        error: {
          message: 'Incorrect or missing bearer token',
          type: 'authentication_error',
          param: null,
          code: 'invalid_api_key',
        },
      })
    }
    if (path === null) {
      await drain(req)
      return sendJson(res, 404, notFound(`no route ${url.pathname} (every route is under ${this.#prefix})`))
    }

    if (route && req.method !== route.method) {
      await drain(req)
      res.setHeader('allow', route.method)
      return sendJson(res, 405, {
        error: { message: `use ${route.method}`, type: 'invalid_request_error', code: 'method_not_allowed' },
      })
    }

    // Marked on arrival, before the body is read, so an overlapping POST is seen however slow the first is.
    let chunkTask = null
    if (route?.name === 'chunks') {
      chunkTask = this.#tasks.get(route.taskId) ?? null
      if (chunkTask) {
        if (chunkTask.chunkPostsInFlight > 0) {
          this.#violate(`two chunk POSTs in flight at once: task ${route.taskId}`)
        }
        chunkTask.chunkPostsInFlight++
        let answered = false
        const settle = () => {
          if (!answered) {
            answered = true
            chunkTask.chunkPostsInFlight--
          }
        }
        res.once('finish', settle)
        res.once('close', settle)
      }
    }

    let raw
    try {
      raw = await readBody(req)
    } catch (error) {
      return sendJson(res, 413, { error: { message: error.message, type: 'invalid_request_error' } })
    }
    const text = raw.toString('utf8')
    record.raw = text
    record.body = parseMaybeJson(text)

    if (!route) {
      if (this.#front.handle(req, res, path, record.body, auth.caller)) return
      return sendJson(res, 404, notFound(`no route ${req.method} ${path}`))
    }

    const ctx = { req, res, route, record, raw, body: record.body, failure: this.#takeFailure(route.name) }
    if (req.method === 'POST') this.#checkJsonBody(ctx)
    switch (route.name) {
      case 'register':
        return this.#register(ctx)
      case 'stream':
        return this.#openStream(ctx)
      case 'heartbeat':
        return this.#heartbeat(ctx)
      case 'result':
        return this.#result(ctx)
      case 'chunks':
        return this.#chunks(ctx, chunkTask)
    }
  }

  /** Answers after the route's latency; a scripted failure replaces `answer`. */
  async #reply(ctx, status, body) {
    const { res, route, failure } = ctx
    const ms = (this.#delays.get(route.name) ?? 0) + (failure?.delayMs ?? 0)
    if (ms > 0 || failure?.until) await this.#sleep(ms, failure?.until)
    if (this.#closed || res.destroyed) return res.destroy()
    if (failure?.destroy) return ctx.req.socket.destroy()
    if (failure) return sendScripted(res, failure.status, failure.body)
    sendJson(res, status, body)
  }

  #register(ctx) {
    const { body, req } = ctx
    this.registrations.push({ headers: ctx.record.headers, body, at: ctx.record.at })
    const problem = registerProblem(body)
    if (problem) {
      this.#violate(`invalid register body: ${problem}`)
      return this.#reply(ctx, 400, { error: { message: problem, type: 'invalid_request_error' } })
    }
    if (typeof body.client.version !== 'string' || body.client.version === '') {
      this.#violate('register without client.version')
    }
    const header = req.headers['x-mcpctl-provider-session']
    if (header !== undefined && body.providerSessionId !== undefined && header !== body.providerSessionId) {
      this.#violate(
        `register: x-mcpctl-provider-session ${header} differs from providerSessionId ${body.providerSessionId}`,
      )
    }
    if (ctx.failure && !ctx.failure.handle) return this.#reply(ctx)

    const asked = body.providerSessionId
    const kept = typeof asked === 'string' && this.sessions.has(asked)
    const id = kept ? asked : this.#newSessionId()
    const session = this.sessions.get(id) ?? { providers: [], connected: false, inFlight: 0 }
    // Changing the set (docs/protocol.md section 1): a register under a known id replaces
    // that session's set; names that left it become inactive and get no more tasks.
    const names = new Set(body.providers.map((p) => p.name))
    const leaving = session.providers.filter((p) => !names.has(p.name))
    const joining = body.providers.filter((p) => !session.providers.some((old) => old.name === p.name))
    const retired = (this.#retired.get(id) ?? []).filter(
      (p) => !names.has(p.name) && !leaving.some((left) => left.name === p.name),
    )
    this.#retired.set(id, [...retired, ...leaving])
    if (kept && (leaving.length > 0 || joining.length > 0)) {
      this.#log(
        `session ${id} changed its set: ${[...joining.map((p) => `+${p.name}`), ...leaving.map((p) => `-${p.name}`)].join(' ')}`,
      )
    }
    session.providers = body.providers
    session.connected = this.#openStreamsOf(id).length > 0
    this.sessions.set(id, session)
    const now = Math.floor(Date.now() / 1000)
    for (const provider of body.providers) {
      if (!this.#firstPublished.has(provider.name)) this.#firstPublished.set(provider.name, now)
    }
    this.#log(
      `register ${body.client.name}@${body.client.version}: session ${id} (${kept ? 'kept' : 'new'}), providers ${body.providers.map((p) => p.name).join(', ')}`,
    )
    const answer = {
      providerSessionId: id,
      llms: body.providers.map((p) => ({ name: p.name, kind: 'virtual', status: 'active' })),
    }
    if (this.#heartbeatIntervalMs !== undefined) answer.heartbeatIntervalMs = this.#heartbeatIntervalMs
    return this.#reply(ctx, kept ? 200 : 201, answer)
  }

  async #openStream(ctx) {
    const { req, res, failure } = ctx
    const id = ctx.record.query.providerSessionId ?? null
    const connection = {
      headers: ctx.record.headers,
      sessionId: id,
      lastEventId: req.headers['last-event-id'] ?? null,
      status: 0,
      openedAt: ctx.record.at,
      closedAt: null,
    }
    this.connections.push(connection)
    if (!/\btext\/event-stream\b/i.test(req.headers.accept ?? '')) {
      this.#violate(`stream connect without Accept: text/event-stream (got ${req.headers.accept ?? 'none'})`)
    }
    const header = req.headers['x-mcpctl-provider-session']
    if (header === undefined) this.#violate('stream connect without x-mcpctl-provider-session header')
    else if (header !== id)
      this.#violate(`stream connect: x-mcpctl-provider-session ${header} differs from the query's ${id}`)

    const ms = (this.#delays.get('stream') ?? 0) + (failure?.delayMs ?? 0)
    if (ms > 0 || failure?.until) await this.#sleep(ms, failure?.until)
    connection.closedAt = Date.now()
    if (this.#closed || res.destroyed) return res.destroy()
    if (failure?.destroy) return req.socket.destroy()
    if (failure) {
      connection.status = failure.status
      return sendScripted(res, failure.status, failure.body)
    }
    if (id === null || !this.sessions.has(id)) {
      connection.status = 404
      return sendJson(res, 404, notFound(`unknown provider session ${id}`, 'session_not_found'))
    }

    connection.status = 200
    connection.closedAt = null
    res.writeHead(200, {
      'content-type': 'text/event-stream',
      'cache-control': 'no-cache',
      connection: 'keep-alive',
    })
    res.flushHeaders()
    req.socket.setNoDelay(true)
    const stream = { res, sessionId: id, connection, timer: null }
    if (this.#keepAliveMs > 0) {
      stream.timer = setInterval(() => writeTo(res, ': keep-alive\n\n'), this.#keepAliveMs)
      stream.timer.unref()
    }
    this.#streams.add(stream)
    this.sessions.get(id).connected = true
    res.once('close', () => this.#closeStream(stream))
    this.#log(`session ${id} connected${connection.lastEventId ? ` (Last-Event-ID ${connection.lastEventId})` : ''}`)
  }

  #heartbeat(ctx) {
    const { body, req } = ctx
    this.heartbeats.push({ headers: ctx.record.headers, body, at: ctx.record.at })
    const header = req.headers['x-mcpctl-provider-session']
    const bodyId = isObject(body) ? body.providerSessionId : undefined
    if (typeof bodyId !== 'string') this.#violate('heartbeat without providerSessionId')
    if (header === undefined) this.#violate('heartbeat without x-mcpctl-provider-session header')
    else if (typeof bodyId === 'string' && header !== bodyId) {
      this.#violate(`heartbeat: x-mcpctl-provider-session ${header} differs from providerSessionId ${bodyId}`)
    }
    if (!isObject(body) || !Array.isArray(body.providers)) {
      this.#violate('heartbeat without a providers array')
    } else {
      for (const entry of body.providers) {
        const missing = isObject(entry)
          ? LOAD_FIELDS.filter((f) => typeof entry[f] !== 'number' || !Number.isFinite(entry[f]))
          : LOAD_FIELDS
        if (!isObject(entry) || typeof entry.name !== 'string') this.#violate('heartbeat provider entry without a name')
        if (missing.length > 0) this.#violate(`heartbeat provider ${entry?.name} lacks numeric ${missing.join(', ')}`)
        // docs/protocol.md section 6: `"paused": true` while paused, absent (or false) otherwise.
        if (isObject(entry) && entry.paused !== undefined && typeof entry.paused !== 'boolean')
          this.#violate(`heartbeat provider ${entry.name}: paused ${JSON.stringify(entry.paused)} is not a boolean`)
      }
    }
    if (ctx.failure && !ctx.failure.handle) return this.#reply(ctx)
    const id = typeof bodyId === 'string' ? bodyId : header
    if (!this.sessions.has(id)) {
      return this.#reply(ctx, 404, notFound(`unknown provider session ${id}`, 'session_not_found'))
    }
    return this.#reply(ctx, 204)
  }

  #result(ctx) {
    const { body, route } = ctx
    const task = this.#tasks.get(route.taskId)
    this.#checkTaskHeader(ctx)
    if (!task) return this.#reply(ctx, 404, notFound(`unknown task ${route.taskId}`, 'task_not_found'))
    const shape = resultProblem(body)
    if (shape) this.#violate(`result for task ${task.taskId}: ${shape}`)
    if (ctx.failure && !ctx.failure.handle) return this.#reply(ctx)
    if (shape) return this.#reply(ctx, 400, { error: { message: shape, type: 'invalid_request_error' } })

    const { status, body: answer, headers } = body
    for (const problem of headerProblems(status, answer, headers)) {
      this.#violate(`result for task ${task.taskId}: ${problem}`)
    }
    if ('caller' in body) this.#violate(`result for task ${task.taskId} sends the caller back to mcpd`)
    // `headers` is in the outcome only when the POST carried it, so outcomes without it stay as they were.
    const answered = headers === undefined ? { status, body: answer } : { status, body: answer, headers }
    if (task.cancelled) {
      this.#violate(`result after cancel: task ${task.taskId} (status ${status})`)
    } else if (task.result) {
      // The repeat of a POST whose answer was lost is allowed; a different second answer is not.
      if (!sameJson(task.result, answered)) this.#violate(`second result for task ${task.taskId}`)
    } else if (task.done) {
      this.#violate(`result after [DONE] for task ${task.taskId}`)
    } else {
      if (task.payloads.length > 0)
        this.#violate(`result after chunks for task ${task.taskId} (errors after the first chunk go in-band)`)
      if (task.stream && status >= 200 && status < 300)
        this.#violate(`result ${status} for streaming task ${task.taskId} (success is streamed as chunks)`)
      task.result = answered
      this.#endTask(task, { kind: 'result', ...answered })
      this.#log(`task ${task.taskId} result ${status}`)
    }
    return this.#reply(ctx, 200, { ok: true })
  }

  #chunks(ctx, task) {
    const { body, route } = ctx
    this.#checkTaskHeader(ctx)
    if (!task) return this.#reply(ctx, 404, notFound(`unknown task ${route.taskId}`, 'task_not_found'))
    let shape = null
    if (!isObject(body)) shape = 'body is not an object'
    else if (!Number.isInteger(body.seq) || body.seq < 0)
      shape = `seq ${JSON.stringify(body.seq)} is not a non-negative integer`
    else if (!Array.isArray(body.chunks) || !body.chunks.every((c) => typeof c === 'string'))
      shape = 'chunks is not an array of strings'
    if (shape) this.#violate(`chunks for task ${task.taskId}: ${shape}`)
    if (ctx.failure && !ctx.failure.handle) return this.#reply(ctx)
    if (shape) return this.#reply(ctx, 400, { error: { message: shape, type: 'invalid_request_error' } })

    const { seq, chunks } = body
    task.chunkPosts.push({ seq, chunks: [...chunks], at: ctx.record.at })
    // The registrar posts one chunk batch at a time, so one POST may already be on
    // its way when the cancel reaches it; a second one means the cancel was ignored.
    if (task.cancelled && ++task.chunkPostsAfterCancel > 1) this.#violate(`chunks after cancel: task ${task.taskId}`)
    if (!task.stream) this.#violate(`chunks for non-streaming task ${task.taskId}`)
    if (task.result) this.#violate(`chunks after a result for task ${task.taskId}`)

    const received = task.payloads.length
    if (seq > received) this.#violate(`gap in chunks of task ${task.taskId}: seq ${seq}, expected ${received}`)
    for (let i = 0; i < chunks.length; i++) {
      if (seq + i < received) {
        if (task.payloads[seq + i] !== chunks[i]) {
          this.#violate(`retried chunks of task ${task.taskId} changed payload ${seq + i}`)
        }
        continue
      }
      this.#acceptPayload(task, chunks[i])
    }
    return this.#reply(ctx, 200, { ok: true })
  }

  #acceptPayload(task, payload) {
    const index = task.payloads.length
    const where = `task ${task.taskId} payload ${index}`
    task.payloads.push(payload)
    if (task.done) return this.#violate(`payload after [DONE]: ${where}`)
    const relayable = !task.cancelled && !task.result
    const relay = () => {
      if (relayable) for (const o of task.observers) o.onPayload(payload, index)
    }

    if (payload === '[DONE]') {
      task.done = true
      if (!task.sawError) {
        if (!task.sawChunk) this.#violate(`[DONE] before any chunk: task ${task.taskId}`)
        else if (!task.finishReason) this.#violate(`no finish_reason before [DONE]: task ${task.taskId}`)
        if (task.includeUsage && !task.sawUsage)
          this.#violate(`no usage chunk before [DONE] although include_usage was asked: task ${task.taskId}`)
      }
      relay()
      if (relayable) {
        this.#endTask(task, { kind: 'stream', payloads: task.payloads.slice(), posts: task.chunkPosts.length })
        this.#log(`task ${task.taskId} streamed ${index} payloads in ${task.chunkPosts.length} POSTs`)
      }
      return
    }

    let chunk
    try {
      chunk = JSON.parse(payload)
    } catch {
      this.#violate(`payload is neither "[DONE]" nor JSON: ${where}`)
      return relay()
    }
    if (isObject(chunk) && 'error' in chunk) {
      if (!isObject(chunk.error) || typeof chunk.error.message !== 'string' || typeof chunk.error.type !== 'string') {
        this.#violate(`error payload without error.message and error.type: ${where}`)
      }
      if (!task.sawChunk) this.#violate(`error payload before any chunk (that is a result POST): ${where}`)
      task.sawError = true
      return relay()
    }
    for (const problem of this.#chunkProblems(task, chunk)) {
      // One report per kind and task: a wrong `created` would otherwise flag every chunk.
      if (task.reported.has(problem)) continue
      task.reported.add(problem)
      this.#violate(`${problem}: ${where}`)
    }
    task.sawChunk = true
    relay()
  }

  #chunkProblems(task, chunk) {
    const problems = []
    if (!isObject(chunk) || chunk.object !== 'chat.completion.chunk') {
      return ['payload is not a chat.completion.chunk']
    }
    if (task.sawError) problems.push('chunk after an error payload')
    if (task.sawUsage) problems.push('chunk after the usage chunk')
    if (!Number.isInteger(chunk.created))
      problems.push(`created ${JSON.stringify(chunk.created)} is not integer seconds`)
    if (typeof chunk.id !== 'string' || typeof chunk.model !== 'string')
      problems.push('chunk without a string id and model')
    const choices = Array.isArray(chunk.choices) ? chunk.choices : null
    if (!choices) problems.push('chunk without a choices array')

    if (!task.identity) {
      task.identity = { id: chunk.id, created: chunk.created, model: chunk.model }
      if (choices?.[0]?.delta?.role !== 'assistant') problems.push("the first chunk's delta lacks role 'assistant'")
    } else if (
      chunk.id !== task.identity.id ||
      chunk.created !== task.identity.created ||
      chunk.model !== task.identity.model
    ) {
      problems.push('chunks do not share id/created/model')
    }

    for (const choice of choices ?? []) {
      const reason = choice?.finish_reason
      if (reason !== null && reason !== undefined) {
        if (!FINISH_REASONS.has(reason))
          problems.push(`finish_reason ${JSON.stringify(reason)} is not stop/length/tool_calls/content_filter`)
        task.finishReason = reason
      }
      for (const call of choice?.delta?.tool_calls ?? []) {
        const key = `${choice.index}:${call?.index}`
        if (!Number.isInteger(call?.index)) problems.push('tool call delta without an integer index')
        if (!task.toolCalls.has(key)) {
          task.toolCalls.add(key)
          if (typeof call?.id !== 'string' || call.type !== 'function' || typeof call.function?.name !== 'string') {
            problems.push("a tool call's first delta lacks id, type 'function' or function.name")
          }
        } else if (call.id !== undefined || call.type !== undefined || call.function?.name !== undefined) {
          problems.push('a later tool call delta repeats id, type or function.name')
        }
      }
    }

    if (task.includeUsage && choices) {
      if (choices.length > 0) {
        if (chunk.usage !== null) problems.push('with include_usage, a content chunk must carry "usage": null')
      } else {
        const u = chunk.usage
        if (
          !isObject(u) ||
          !['prompt_tokens', 'completion_tokens', 'total_tokens'].every((k) => Number.isInteger(u[k]))
        ) {
          problems.push('the usage chunk lacks prompt_tokens, completion_tokens and total_tokens')
        }
        task.sawUsage = true
      }
    }
    return problems
  }

  // --- helpers ---------------------------------------------------------------

  /** `{ caller: null }` for the registrar token, `{ caller }` for a caller's API key, else null. */
  #authenticate(req) {
    const match = /^bearer\s+(.+)$/i.exec(req.headers.authorization ?? '')
    if (match === null) return null
    const key = match[1].trim()
    if (key === this.#token) return { caller: null }
    const caller = this.#callers.get(key)
    return caller === undefined ? null : { caller: structuredClone(caller) }
  }

  #checkJsonBody(ctx) {
    const type = ctx.req.headers['content-type'] ?? ''
    if (!/^application\/json\s*(;|$)/i.test(type)) {
      this.#violate(`${ctx.route.name} POST with content-type ${type || 'none'} (expected application/json)`)
    }
    try {
      strictUtf8.decode(ctx.raw)
    } catch {
      this.#violate(`${ctx.route.name} POST body is not UTF-8`)
    }
    if (typeof ctx.body === 'string') this.#violate(`${ctx.route.name} POST body is not JSON`)
  }

  #checkTaskHeader(ctx) {
    if (ctx.req.headers['x-mcpctl-provider-session'] === undefined) {
      this.#violate(`${ctx.route.name} POST for task ${ctx.route.taskId} without x-mcpctl-provider-session header`)
    }
  }

  #violate(text) {
    this.violations.push(text)
    this.#log(`protocol violation: ${text}`)
  }

  #takeFailure(route) {
    const queue = this.#failures.get(route)
    const failure = queue[0]
    if (!failure) return null
    if (--failure.left <= 0) queue.shift()
    return failure
  }

  /** Waits `ms`, then until `until` (a failure script's) settles; close() ends it early. */
  #sleep(ms, until) {
    return new Promise((resolve) => {
      const sleep = {
        wake: () => {
          clearTimeout(timer)
          this.#sleeps.delete(sleep)
          resolve()
        },
      }
      const afterTimer = () => (until ? Promise.resolve(until).then(sleep.wake, sleep.wake) : sleep.wake())
      const timer = setTimeout(afterTimer, ms)
      this.#sleeps.add(sleep)
    })
  }

  #broadcast(bytes) {
    let count = 0
    for (const stream of this.#streams) {
      if (writeTo(stream.res, bytes)) count++
    }
    return count
  }

  #openStreamsOf(sessionId) {
    return [...this.#streams].filter((s) => s.sessionId === sessionId)
  }

  #closeStream(stream) {
    if (!this.#streams.delete(stream)) return
    clearInterval(stream.timer)
    stream.connection.closedAt = Date.now()
    const session = this.sessions.get(stream.sessionId)
    if (session) session.connected = this.#openStreamsOf(stream.sessionId).length > 0
    this.#log(`session ${stream.sessionId} stream closed`)
  }

  /** The newest open stream of the chosen session. */
  #streamFor(sessionId, provider) {
    const id = sessionId === undefined ? (this.#pickSession(provider) ?? this.#pickSession(null)) : sessionId
    if (id === null) return null
    return this.#openStreamsOf(id).at(-1) ?? null
  }

  /** Connected sessions publishing `model` (any when null): fewest tasks in flight, first on ties. */
  #pickSession(model) {
    let best = null
    for (const [id, session] of this.sessions) {
      if (!session.connected) continue
      if (model !== null && !session.providers.some((p) => p.name === model)) continue
      if (best === null || session.inFlight < best.session.inFlight) best = { id, session }
    }
    return best?.id ?? null
  }

  #listLlms() {
    const byName = new Map()
    // A session's current set first, then the names that left a set (inactive, unless
    // another connected session publishes them).
    const published = [...this.sessions.values()].flatMap((session) =>
      session.providers.map((provider) => ({ provider, active: session.connected })),
    )
    const retired = [...this.sessions.keys()].flatMap((id) =>
      (this.#retired.get(id) ?? []).map((provider) => ({ provider, active: false })),
    )
    for (const { provider, active } of [...published, ...retired]) {
      const entry = byName.get(provider.name)
      if (entry) {
        if (active) entry.status = 'active'
        continue
      }
      byName.set(provider.name, {
        name: provider.name,
        kind: 'virtual',
        status: active ? 'active' : 'inactive',
        type: provider.type,
        model: provider.model ?? null,
        description: provider.description ?? null,
        contextWindow: provider.contextWindow ?? null,
        created: this.#firstPublished.get(provider.name) ?? Math.floor(Date.now() / 1000),
      })
    }
    return [...byName.values()]
  }

  #watchTask(taskId, observer) {
    const task = this.#tasks.get(taskId)
    if (!task) throw new Error(`watchTask: unknown task ${taskId}`)
    for (const [index, payload] of task.payloads.entries()) observer.onPayload(payload, index)
    if (task.outcome) {
      observer.onEnd(task.outcome)
      return () => {}
    }
    task.observers.add(observer)
    return () => task.observers.delete(observer)
  }

  #endTask(task, outcome) {
    if (task.outcome) return
    task.outcome = outcome
    const session = this.sessions.get(task.sessionId)
    if (session && session.inFlight > 0) session.inFlight--
    for (const observer of [...task.observers]) observer.onEnd(outcome)
    task.observers.clear()
    for (const waiter of [...this.#outcomeWaiters]) {
      if (waiter.taskId === task.taskId) waiter.done(outcome)
    }
  }

  #describeTask(taskId) {
    const task = this.#tasks.get(taskId)
    if (!task) return 'no such task was sent'
    if (task.payloads.length > 0)
      return `${task.payloads.length} payloads in ${task.chunkPosts.length} chunk POSTs, no [DONE]`
    return 'sent, nothing received for it'
  }

  #nextTaskId() {
    let id
    do id = `t-${++this.#taskCounter}`
    while (this.#tasks.has(id))
    return id
  }
}

function newTask(taskId, provider, stream, body, sessionId) {
  return {
    taskId,
    provider,
    stream,
    body,
    sessionId,
    includeUsage: isObject(body.stream_options) && body.stream_options.include_usage === true,
    cancelled: false,
    result: null,
    done: false,
    outcome: null,
    payloads: [],
    chunkPosts: [],
    chunkPostsInFlight: 0,
    chunkPostsAfterCancel: 0,
    identity: null,
    sawChunk: false,
    sawError: false,
    sawUsage: false,
    finishReason: null,
    toolCalls: new Set(),
    reported: new Set(),
    observers: new Set(),
  }
}

function matchRoute(path) {
  switch (path) {
    case '/api/v1/llms/_provider-register':
      return { name: 'register', method: 'POST' }
    case '/api/v1/llms/_provider-stream':
      return { name: 'stream', method: 'GET' }
    case '/api/v1/llms/_provider-heartbeat':
      return { name: 'heartbeat', method: 'POST' }
  }
  const task = /^\/api\/v1\/llms\/_provider-tasks\/([^/]+)\/(result|chunks)$/.exec(path)
  if (task) return { name: task[2], method: 'POST', taskId: safeDecode(task[1]) }
  return null
}

function registerProblem(body) {
  if (!isObject(body)) return 'body is not a JSON object'
  if (body.providerSessionId !== undefined && typeof body.providerSessionId !== 'string')
    return 'providerSessionId is not a string'
  if (!isObject(body.client) || typeof body.client.name !== 'string') return 'client.name is missing'
  if (!Array.isArray(body.providers)) return 'providers is not an array'
  for (const [i, p] of body.providers.entries()) {
    if (!isObject(p) || typeof p.name !== 'string' || p.name === '' || typeof p.type !== 'string') {
      return `providers[${i}] lacks a name or type`
    }
  }
  return null
}

/**
 * The `callers` option checked once, so the fake only ever attaches callers mcpd could send
 * (docs/protocol.md section 6, "The caller"); malformed ones are for `sendTask({ caller })`.
 */
function callerKeys(callers, token) {
  const keys = new Map()
  if (callers === undefined) return keys
  if (!isObject(callers)) throw new TypeError('callers must be an object mapping API keys to callers')
  for (const [index, [key, caller]] of Object.entries(callers).entries()) {
    // Keys are secrets of a sort: errors name the entry by position, never by its key.
    if (key === '' || /\s/.test(key)) throw new TypeError(`callers: key #${index} is empty or holds whitespace`)
    if (key === token) throw new TypeError(`callers: key #${index} is the registrar token, which sends no caller`)
    const problem = callerProblem(caller)
    if (problem) throw new TypeError(`callers: the caller of key #${index} ${problem}`)
    keys.set(key, structuredClone(caller))
  }
  return keys
}

/** Why `caller` is not one a registrar must accept, or null. */
function callerProblem(caller) {
  if (!isObject(caller)) return 'is not an object'
  const tooLong = (text) => Buffer.byteLength(text) > CALLER_MAX_BYTES
  if (typeof caller.id !== 'string' || caller.id === '' || tooLong(caller.id))
    return `needs an id: a non-empty string of at most ${CALLER_MAX_BYTES} bytes`
  if (caller.name !== undefined && (typeof caller.name !== 'string' || tooLong(caller.name)))
    return `has a name that is not a string of at most ${CALLER_MAX_BYTES} bytes`
  if (
    caller.groups !== undefined &&
    (!Array.isArray(caller.groups) ||
      caller.groups.length > CALLER_MAX_GROUPS ||
      !caller.groups.every((group) => typeof group === 'string' && !tooLong(group)))
  ) {
    return `has groups that are not an array of at most ${CALLER_MAX_GROUPS} strings of at most ${CALLER_MAX_BYTES} bytes`
  }
  return null
}

/** A result POST's `headers` against the contract: strings, `retry-after` with each limit's 429, none when paused. */
function headerProblems(status, answer, headers) {
  const problems = []
  const code = isObject(answer) && isObject(answer.error) ? answer.error.code : undefined
  let retryAfter
  if (headers !== undefined) {
    if (!isObject(headers)) return ['headers is not an object']
    for (const [name, value] of Object.entries(headers)) {
      if (typeof value !== 'string') {
        problems.push(`header ${JSON.stringify(name)} is not a string`)
        continue
      }
      const lower = name.toLowerCase()
      if (lower === 'retry-after') retryAfter = value
      const valid = RELAYED_HEADERS.get(lower)
      if (valid && !valid(value)) problems.push(`header ${lower} ${JSON.stringify(value)} is not valid`)
    }
  }
  if (status === 429 && LIMIT_CODES.has(code) && retryAfter === undefined)
    problems.push(`429 ${code} without a retry-after header`)
  if (code === 'provider_paused' && retryAfter !== undefined)
    problems.push('503 provider_paused with a retry-after header')
  return problems
}

function resultProblem(body) {
  if (!isObject(body)) return 'body is not an object'
  const { status, body: answer } = body
  if (!Number.isInteger(status) || status < 100 || status > 599)
    return `status ${JSON.stringify(status)} is not an integer 100-599`
  if (status >= 400) {
    if (
      !isObject(answer) ||
      !isObject(answer.error) ||
      typeof answer.error.message !== 'string' ||
      typeof answer.error.type !== 'string'
    ) {
      return `status ${status} without an { error: { message, type } } body`
    }
  } else if (status === 200) {
    if (!isObject(answer) || answer.object !== 'chat.completion')
      return "status 200 body is not an object with object: 'chat.completion'"
    if (!Number.isInteger(answer.created)) return 'status 200 body has no integer created'
    if (!Array.isArray(answer.choices) || answer.choices[0]?.message?.role !== 'assistant') {
      return "status 200 body lacks choices[0].message.role 'assistant'"
    }
  }
  return null
}

function sseFrame(event, data, id) {
  const text = typeof data === 'string' ? data : (JSON.stringify(data) ?? '')
  let frame = event ? `event: ${event}\n` : ''
  if (id !== undefined && id !== null) frame += `id: ${id}\n`
  for (const line of text.split(/\r\n|\r|\n/)) frame += `data: ${line}\n`
  return `${frame}\n`
}

function sendScripted(res, status, body) {
  if (res.destroyed || res.headersSent) return
  if (typeof body === 'string') {
    res.writeHead(status, { 'content-type': 'text/plain; charset=utf-8', 'content-length': Buffer.byteLength(body) })
    return res.end(body)
  }
  const answer =
    body === undefined && status >= 400
      ? { error: { message: `scripted failure (status ${status})`, type: 'server_error' } }
      : body
  sendJson(res, status, status === 204 || status === 304 ? undefined : answer)
}

function writeTo(res, bytes) {
  if (res.destroyed || res.writableEnded) return false
  res.write(bytes)
  return true
}

function notFound(message, code = 'not_found') {
  return { error: { message, type: 'not_found', code } }
}

function normalizePrefix(prefix) {
  if (typeof prefix !== 'string') throw new TypeError('pathPrefix must be a string')
  const trimmed = prefix.replace(/\/+$/, '')
  if (trimmed === '') return ''
  return trimmed.startsWith('/') ? trimmed : `/${trimmed}`
}

/** The path below the prefix, or null when the request is outside it. */
function stripPrefix(pathname, prefix) {
  if (prefix === '') return pathname
  if (pathname === prefix) return '/'
  return pathname.startsWith(`${prefix}/`) ? pathname.slice(prefix.length) : null
}

function checkRoute(route) {
  if (!ROUTES.includes(route)) throw new TypeError(`route must be one of ${ROUTES.join(', ')}, got ${route}`)
}

function parseMaybeJson(text) {
  if (text === '') return ''
  try {
    return JSON.parse(text)
  } catch {
    return text
  }
}

function sameJson(a, b) {
  return JSON.stringify(a) === JSON.stringify(b)
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const parts = []
    let size = 0
    req.on('data', (part) => {
      size += part.length
      if (size > MAX_BODY_BYTES) {
        reject(new Error(`request body over ${MAX_BODY_BYTES} bytes`))
        req.destroy()
        return
      }
      parts.push(part)
    })
    req.on('end', () => resolve(Buffer.concat(parts)))
    req.on('error', reject)
  })
}

function drain(req) {
  return readBody(req).catch(() => {})
}

module.exports = { FakeMcpd }

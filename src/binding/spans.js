// The registrar's OpenTelemetry spans (docs/protocol.md section 5, API.md
// "Spans"), evaluated once per registrar by provider_bridge.rs and handed to
// provider_bridge.js. One span per task that reaches a provider, a child of
// mcpd's traceparent; the provider runs with it active. `@opentelemetry/api` is
// an optional peer dependency, found the way a library installed in mcplocal's
// node_modules finds it; without it, or without a registered tracer provider,
// nothing here costs more than one cached lookup per task. No prompt or
// completion text is ever put on a span. Nothing here throws.
;(function createTaskSpans(addonUrl, native) {
  'use strict'
  // undefined: not looked up yet; null: not installed (looked up once).
  let api
  // taskId -> the span of a task that is running.
  const open = new Map()

  // Where `@opentelemetry/api` is looked for, in order: from the addon's own
  // file (a dependency of mcplocal sees mcplocal's node_modules), then from the
  // main module and the working directory (a layout where the addon sits apart,
  // such as pnpm's store, or a test with only the SDK in its own node_modules).
  function bases() {
    const list = []
    if (addonUrl) list.push(addonUrl)
    const main = process.mainModule?.filename ?? process.argv[1]
    if (typeof main === 'string' && main !== '') list.push(main)
    const separator = process.platform === 'win32' ? '\\' : '/'
    list.push(process.cwd() + separator)
    return list
  }

  function load() {
    if (api !== undefined) return api
    api = null
    try {
      // No `require` in a script the addon evaluates: the module system's own.
      const Module = process.getBuiltinModule?.('node:module') ?? process.mainModule?.constructor
      if (typeof Module?.createRequire !== 'function') return api
      for (const base of bases()) {
        try {
          const found = Module.createRequire(base)('@opentelemetry/api')
          if (typeof found?.trace?.getTracer === 'function' && typeof found.context?.with === 'function') {
            api = found
            break
          }
        } catch {
          // Not from here; the next base may see it.
        }
      }
    } catch {
      api = null
    }
    return api
  }

  // The span's start: when the task reached the registrar (ms since the epoch,
  // with a fraction), in whole milliseconds rounded down. The SDK stamps a span
  // started without a time with `Date.now()`, in whole milliseconds: a fraction
  // left on ours could put it after a child started in the same millisecond.
  const startOf = (arrivedAt) => (typeof arrivedAt === 'number' ? Math.floor(arrivedAt) : undefined)

  const HEX_FLAGS = (flags) => (flags & 0xff).toString(16).padStart(2, '0')

  // mcpd's context (already validated by the core: src/trace.rs) as a parent.
  function parentOf(otel, sent) {
    if (!sent) return { context: otel.ROOT_CONTEXT, spanId: null }
    const [, traceId, spanId, flags] = sent.traceparent.split('-')
    let traceState
    if (sent.tracestate && typeof otel.createTraceState === 'function') {
      traceState = otel.createTraceState(sent.tracestate)
    }
    const spanContext = { traceId, spanId, traceFlags: Number.parseInt(flags, 16), isRemote: true, traceState }
    return { context: otel.trace.setSpanContext(otel.ROOT_CONTEXT, spanContext), spanId }
  }

  // GenAI attributes known when the task starts: no messages, no text.
  function startAttributes(taskId, options, kind) {
    const attributes = {
      'gen_ai.operation.name': 'chat',
      'mcpctl.task.id': taskId,
    }
    const model = options.request?.model
    if (typeof kind === 'string') attributes['gen_ai.provider.name'] = kind
    if (typeof model === 'string') attributes['gen_ai.request.model'] = model
    if (typeof options.maxTokens === 'number') attributes['gen_ai.request.max_tokens'] = options.maxTokens
    if (typeof options.temperature === 'number') attributes['gen_ai.request.temperature'] = options.temperature
    if (typeof options.topP === 'number') attributes['gen_ai.request.top_p'] = options.topP
    if (typeof options.caller?.id === 'string') attributes['mcpctl.caller.id'] = options.caller.id
    return attributes
  }

  function finish(span, end) {
    try {
      if (end.responseModel !== undefined) span.setAttribute('gen_ai.response.model', end.responseModel)
      if (end.finishReason !== undefined) span.setAttribute('gen_ai.response.finish_reasons', [end.finishReason])
      if (end.inputTokens !== undefined) span.setAttribute('gen_ai.usage.input_tokens', end.inputTokens)
      if (end.outputTokens !== undefined) span.setAttribute('gen_ai.usage.output_tokens', end.outputTokens)
      if (end.errorType !== undefined) {
        span.setAttribute('error.type', end.errorType)
        span.setStatus({ code: api.SpanStatusCode.ERROR })
      }
      span.end()
    } catch {
      // A broken SDK must not take the registrar down.
    }
  }

  return {
    // Starts the task's span when a tracer provider is registered: answers the
    // context to run the provider in, and sets `options.trace` to the span (so
    // the provider's own calls are its children), or answers null and leaves
    // `options.trace` as mcpd sent it. The tracer is looked up for each task, so
    // a provider registered after start() is used.
    begin(taskId, callId, arrivedAt, options, kind) {
      const otel = load()
      if (!otel) return null
      try {
        const parent = parentOf(otel, options.trace)
        const model = options.request?.model
        const tracer = otel.trace.getTracer('@mcpctl/registrar')
        const span = tracer.startSpan(
          typeof model === 'string' ? `chat ${model}` : 'chat',
          {
            kind: otel.SpanKind.INTERNAL,
            attributes: startAttributes(taskId, options, kind),
            startTime: startOf(arrivedAt),
          },
          parent.context,
        )
        const made = span.spanContext()
        // No tracer provider: the API's no-op span, which only repeats its parent.
        if (!otel.trace.isSpanContextValid(made) || made.spanId === parent.spanId) return null
        const traceparent = `00-${made.traceId}-${made.spanId}-${HEX_FLAGS(made.traceFlags)}`
        const tracestate = made.traceState?.serialize() || undefined
        // The core puts it on the task's POSTs; a task that already ended says how.
        // (null: live, ended by end() below; a string: the task already ended,
        // and how; false: refused, which only a bug could cause.)
        const ended = native.traced(callId, traceparent, tracestate)
        if (ended === false) {
          span.end()
          return null
        }
        if (typeof ended === 'string') {
          finish(span, JSON.parse(ended))
        } else {
          open.set(taskId, span)
        }
        options.trace = tracestate === undefined ? { traceparent } : { traceparent, tracestate }
        return otel.trace.setSpan(parent.context, span)
      } catch {
        return null
      }
    },

    // Runs `fn` with the task's span active (when it has one), so what the
    // provider does, and everything it awaits, is a child of it.
    run(active, fn) {
      if (active === null) return fn()
      return api.context.with(active, fn)
    },

    // The core says how the task ended (src/trace.rs SpanEnd, JSON).
    end(taskId, endJson) {
      const span = open.get(taskId)
      if (!span) return
      open.delete(taskId)
      try {
        finish(span, JSON.parse(endJson))
      } catch {
        // Unreadable: the span is still ended.
        span.end()
      }
    },
  }
})

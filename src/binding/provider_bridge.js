// The JavaScript half of the provider bridge, evaluated once per registrar by
// provider_bridge.rs. It owns what only JavaScript can hold well: each task's
// AbortController, the providers' async iterators, and calls made with the
// right `this`. Rust calls `complete` and `openStream` (once per task) with
// positional arguments, the others with one object of named fields; a
// provider call is answered through `native.settle(callId, value, error)`,
// and nothing here throws or rejects, so a broken provider cannot crash
// mcplocal. A stream's `for await` loop runs here too (pump below): it hands
// chunks to Rust in batches through `native.push`, plain synchronous calls into
// the core's stream window (src/stream.rs), never one threadsafe-function round
// trip per chunk. `spans` (spans.js) records the task's OpenTelemetry span
// when mcplocal has a tracer provider, and runs the provider inside it.
;(function createProviderBridge(logger, onStateChange, native, taskSpans) {
  'use strict'
  // No spans at all (a bridge made without spans.js, as the pump tests make it).
  const spans = taskSpans ?? { begin: () => null, run: (_active, fn) => fn(), end() {} }
  const providers = new Map()
  // name -> the entry's `type`, for the span's gen_ai.provider.name.
  const kinds = new Map()
  const tasks = new Map()
  // Aborts that arrived before their task began (the abort and the call
  // travel on different threadsafe functions, so either may come first):
  // taskId -> { reason, timedOut, at }, applied by begin(). Bounded in count
  // and age; an abort for a task that already ended also lands here and ages out.
  const pendingAborts = new Map()
  const PENDING_MAX = 10000
  const PENDING_MS = 60000

  const makeReason = (reason, timedOut) => new DOMException(reason, timedOut ? 'TimeoutError' : 'AbortError')

  function recordAbort(taskId, reason, timedOut) {
    const now = Date.now()
    for (const [id, entry] of pendingAborts) {
      if (pendingAborts.size < PENDING_MAX && now - entry.at < PENDING_MS) break
      pendingAborts.delete(id)
    }
    pendingAborts.set(taskId, { reason, timedOut, at: now })
  }
  // Each running stream loop's credit, and its wake-up while it waits for more.
  const pumps = new Map()
  // The most chunk JSON gathered before a push, whatever the credit.
  const FLUSH_BYTES = native.flushBytes

  // What a provider threw, as a string, whatever it threw: Rust reads a string,
  // and a throw here would leave the call unanswered (a rejection nobody handles).
  const describe = (error) => {
    try {
      const text = describeAs(error)
      return typeof text === 'string' ? text : String(text)
    } catch {
      return 'the provider failed with a value that cannot be described'
    }
  }
  const describeAs = (error) => {
    if (error instanceof Error) return error.message || error.name || 'Error'
    if (typeof error === 'string') return error
    try {
      return JSON.stringify(error) ?? String(error)
    } catch {
      return String(error)
    }
  }
  // A provider call's answer for `native.settle`: the value as JSON text (parsed
  // once, in Rust), or why it failed.
  const failure = (callId, error) => ({ callId, error: describe(error) })
  const encode = (callId, value) => {
    try {
      return { callId, value: JSON.stringify(value) ?? 'null' }
    } catch (error) {
      return failure(callId, new Error(`the provider returned a value that is not JSON: ${describe(error)}`))
    }
  }

  function begin(taskId, optionsJson) {
    const controller = new AbortController()
    const options = JSON.parse(optionsJson)
    options.signal = controller.signal
    const task = { controller, iterator: null }
    const early = pendingAborts.get(taskId)
    if (early) {
      // Aborted before it began: the provider sees a signal already fired.
      pendingAborts.delete(taskId)
      controller.abort(makeReason(early.reason, early.timedOut))
    } else {
      tasks.set(taskId, task)
    }
    return { task, options }
  }

  function closeIterator(task) {
    const iterator = task.iterator
    task.iterator = null
    if (iterator && typeof iterator.return === 'function') {
      Promise.resolve()
        .then(() => iterator.return())
        .catch(() => {})
    }
  }

  // A yielded chunk is checked as it comes, by a function Rust generated from its
  // own CompletionChunk type (src/shape.rs), so a bad one ends the loop while the
  // provider still waits at its `yield` and its iterator can be closed. Rust reads
  // every chunk again, typed: this check only makes the failure come early.
  const isObject = (value) => value !== null && typeof value === 'object' && !Array.isArray(value)
  const chunkIsValid = native.chunkIsValid
  function checkChunk(chunk) {
    if (!isObject(chunk)) {
      throw new Error("the provider's stream() yielded something that is not a CompletionChunk object")
    }
    if (!chunkIsValid(chunk)) throw new Error('the provider yielded an invalid CompletionChunk')
  }

  // Answers a provider call (provider_bridge.rs PendingCalls).
  function settle(reply) {
    try {
      native.settle(reply.callId, reply.value, reply.error)
    } catch {
      // Only a bug could get here; Rust's task timeout still ends the task.
    }
  }

  // New credit for a stream's loop. It may come while the loop is not waiting yet
  // (a push at the end of a tick used the credit up while the loop awaited the
  // provider), so it is kept, not only handed to a waiter.
  function givePump(streamId, credit) {
    const pump = pumps.get(streamId)
    if (!pump) return
    pump.credit = credit
    const wake = pump.wake
    pump.wake = null
    wake?.()
  }

  // A chunk whose one field Rust reads is its `content` (most of a stream's):
  // pushed as that string alone, a JSON string in the batch's array, which Rust
  // reads as `{ content }` (src/stream.rs); its fields are read as checkChunk
  // read them (a `toJSON` is not asked). Any other chunk goes as its JSON text,
  // which must be an object: a `toJSON` answering a string would otherwise read
  // as content.
  const contentOnly = (chunk) =>
    typeof chunk.content === 'string' &&
    chunk.toolCalls === undefined &&
    chunk.finishReason === undefined &&
    chunk.usage === undefined
  // A chunk with more than content, as its JSON text, kept apart from the
  // strings a batch still has to encode.
  function Encoded(text) {
    this.text = text
  }
  // The bytes a content string may take in the batch's JSON text, at most: six
  // per UTF-16 unit (a control character's `\u00XX`), its quotes and a comma.
  const contentBytes = (content) => content.length * 6 + 3

  // A batch as the JSON array `native.push` takes: `JSON.stringify` once for
  // the whole batch when it is all content (no string made per chunk), else
  // each part in turn.
  function encodeBatch(parts, mixed) {
    if (!mixed) return JSON.stringify(parts)
    let text = '['
    for (let i = 0; i < parts.length; i++) {
      const part = parts[i]
      if (i > 0) text += ','
      text += part instanceof Encoded ? part.text : JSON.stringify(part)
    }
    return `${text}]`
  }

  // Runs a stream's `for await` loop. Chunks produced in the same tick go to Rust
  // in one `native.push` (at the end of the tick, or once the batch reaches the
  // credit left or FLUSH_BYTES). `push` answers the credit left; at 0 the loop
  // holds its next chunk and awaits one wake-up, when Rust has taken half the
  // window. An abort (cancel, timeout, stop) stops it at its next step. However
  // it stops, it says so once through `native.end`.
  async function pump(taskId, task, streamId, credit) {
    const { signal } = task.controller
    const iterator = task.iterator
    const state = { credit, wake: null }
    pumps.set(streamId, state)
    // Read once here and kept by the listener: the signal's getter costs more
    // than a variable, and the loop asks at every chunk.
    let aborted = signal.aborted
    // An abort also ends a wait for credit at once.
    signal.addEventListener(
      'abort',
      () => {
        aborted = true
        givePump(streamId, -1)
      },
      { once: true },
    )
    let parts = []
    let mixed = false
    let bytes = 0
    let scheduled = false
    const flush = () => {
      scheduled = false
      if (parts.length === 0) return
      const text = encodeBatch(parts, mixed)
      const count = parts.length
      parts = []
      mixed = false
      bytes = 0
      state.credit = native.push(streamId, text, count)
    }
    let ending = null
    let stopped = false
    try {
      loop: for await (const chunk of { [Symbol.asyncIterator]: () => iterator }) {
        if (aborted) break
        while (state.credit <= parts.length) {
          if (parts.length > 0) {
            flush()
          } else if (state.credit < 0) {
            stopped = true
            break loop
          } else {
            await new Promise((resolve) => (state.wake = resolve))
            if (signal.aborted) break loop
          }
        }
        checkChunk(chunk)
        if (contentOnly(chunk)) {
          parts.push(chunk.content)
          bytes += contentBytes(chunk.content)
        } else {
          const text = JSON.stringify(chunk)
          if (typeof text !== 'string' || text.charCodeAt(0) !== 123 /* { */) {
            throw new Error("the provider's stream() yielded something that is not a CompletionChunk object")
          }
          parts.push(new Encoded(text))
          mixed = true
          // Rust counts UTF-8 bytes: at most 3 a UTF-16 unit.
          bytes += text.length * 3 + 1
        }
        if (bytes >= FLUSH_BYTES) {
          flush()
        } else if (!scheduled) {
          scheduled = true
          setImmediate(flush)
        }
      }
    } catch (error) {
      ending = describe(error)
    } finally {
      pumps.delete(streamId)
      task.iterator = null
    }
    // The signal itself here, not the variable: a listener of the provider's,
    // added before ours, could have stopped the event reaching ours.
    if (signal.aborted || stopped) {
      // The task stays known until Rust's abort for it comes, so its signal fires.
      native.end(streamId, 'the stream was stopped')
      return
    }
    // After a failure the task stays known until Rust aborts it (reason: failed).
    if (ending === null && tasks.get(taskId) === task) tasks.delete(taskId)
    flush()
    native.end(streamId, ending)
  }

  return {
    publish(name, provider, kind) {
      providers.set(name, provider)
      kinds.set(name, kind)
    },

    // mcplocal's registry is a Map or any object with get(name); its errors
    // become a warning, not an exception.
    lookup(registry, name) {
      try {
        return { provider: registry.get(name), error: null }
      } catch (error) {
        return { provider: undefined, error: describe(error) }
      }
    },

    // Positional, as Rust calls it (provider_bridge.rs CallArgs): an object
    // would cost napi a key string and a store per field.
    complete(name, taskId, optionsJson, callId, arrivedAt) {
      new Promise((resolve) => {
        const provider = providers.get(name)
        const { options } = begin(taskId, optionsJson)
        const active = spans.begin(taskId, callId, arrivedAt, options, kinds.get(name))
        resolve(spans.run(active, () => provider.complete(options)))
      })
        .then(
          (value) => encode(callId, value),
          (error) => failure(callId, error),
        )
        .finally(() => tasks.delete(taskId))
        .then(settle)
    },

    // complete's arguments, then the stream's id for the loop's pushes and its credit.
    openStream(name, taskId, optionsJson, callId, arrivedAt, streamId, credit) {
      new Promise((resolve) => {
        const provider = providers.get(name)
        const { task, options } = begin(taskId, optionsJson)
        const active = spans.begin(taskId, callId, arrivedAt, options, kinds.get(name))
        // The loop runs in the span too: the iterator's steps are the provider's work.
        spans.run(active, () => {
          const iterable = provider.stream(options)
          const open = iterable?.[Symbol.asyncIterator]
          if (typeof open !== 'function') {
            throw new Error("the provider's stream() did not return an async iterable")
          }
          task.iterator = open.call(iterable)
          pump(taskId, task, streamId, credit)
        })
        resolve({ callId })
      })
        .catch((error) => {
          tasks.delete(taskId)
          const reply = failure(callId, error)
          native.end(streamId, reply.error)
          return reply
        })
        .then(settle)
    },

    // The core says how a task whose span was recorded ended (src/trace.rs).
    endSpan({ taskId, endJson }) {
      spans.end(taskId, endJson)
    },

    // Rust gave credit back to a pump that used it all (CLOSED, -1: the task ended).
    credit({ streamId, credit }) {
      givePump(streamId, credit)
    },

    abort({ taskId, reason, timedOut }) {
      const task = tasks.get(taskId)
      if (!task) {
        recordAbort(taskId, reason, timedOut)
        return
      }
      tasks.delete(taskId)
      try {
        task.controller.abort(makeReason(reason, timedOut))
      } catch {
        // A listener threw; the signal has fired all the same.
      }
      closeIterator(task)
    },

    // pino's order, fields first (index.d.ts `Logger`): a pino or Fastify logger
    // keeps every field in its JSON line, and console prints both.
    log({ level, message, fieldsJson }) {
      if (!logger) return
      try {
        const method = typeof logger[level] === 'function' ? level : 'info'
        logger[method](JSON.parse(fieldsJson), message)
      } catch {
        // A broken logger must not take the registrar down.
      }
    },

    stateChange(status) {
      if (!onStateChange) return
      try {
        onStateChange(status)
      } catch (error) {
        process.emitWarning(`onStateChange threw: ${describe(error)}`, 'RegistrarWarning')
      }
    },

    keepAlive() {},
  }
})

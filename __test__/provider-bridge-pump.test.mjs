// The JavaScript half of a stream's hand-over (provider_bridge.js `pump`), driven
// directly with a scripted `native` in place of the addon's: batching per tick, the
// credit window, a wake-up that comes before the loop waits, and abort while waiting.

import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import test from 'node:test'
import vm from 'node:vm'
import { scaledMs } from './helpers.mjs'

const source = readFileSync(new URL('../src/binding/provider_bridge.js', import.meta.url), 'utf8')

/** A bridge over a fake native side whose push answers what `credits` says. */
function bridgeWith(credits, { flushBytes = 64 * 1024 } = {}) {
  const calls = { pushes: [], ends: [], fails: [], settles: [] }
  let pushed = () => {}
  const native = {
    flushBytes,
    // The part of the check generated from CompletionChunk (src/shape.rs) these tests use.
    chunkIsValid: (chunk) => chunk.content === undefined || typeof chunk.content === 'string',
    push(streamId, text, count) {
      // A batch is one JSON array (src/stream.rs Batch): a string item is a chunk
      // with only `content`. `texts` has each chunk as its own JSON object text.
      const items = JSON.parse(text)
      assert.ok(Array.isArray(items), `a push is a JSON array: ${text}`)
      assert.equal(items.length, count, 'count is the number of items')
      const texts = items.map((item) => JSON.stringify(typeof item === 'string' ? { content: item } : item))
      calls.pushes.push({ streamId, count, text, texts })
      pushed()
      return credits(calls.pushes.length, count)
    },
    // Once per loop, however it stopped: a failure message, or none when the provider ended.
    // The types the addon's native side takes (it throws on any other).
    end(streamId, failure) {
      assert.ok(failure == null || typeof failure === 'string', `end: a string or nothing, not ${typeof failure}`)
      failure == null ? calls.ends.push(streamId) : calls.fails.push({ streamId, message: failure })
    },
    settle(callId, value, error) {
      assert.ok(value === undefined || typeof value === 'string', `settle: value ${typeof value}`)
      assert.ok(error === undefined || typeof error === 'string', `settle: error ${typeof error}`)
      calls.settles.push({ callId, value, error })
    },
  }
  const bridge = vm.runInThisContext(source)(null, null, native)
  /** Resolves once the pushes reach `count`. */
  const pushesReach = (count) =>
    new Promise((resolve) => {
      pushed = () => calls.pushes.length >= count && resolve()
      pushed()
    })
  return { bridge, calls, pushesReach }
}

// The bounds only end a wait that never ends; emulated (scripts/test-arm64.sh), a tick
// under load can take over 100 ms.
const within = (promise, ms, what) =>
  Promise.race([
    promise,
    new Promise((_, reject) =>
      setTimeout(() => reject(new Error(`${what}: not within ${scaledMs(ms)} ms`)), scaledMs(ms)).unref(),
    ),
  ])

const open = (bridge, provider, { taskId = 't-1', streamId = 7, credit = 512 } = {}) => {
  bridge.publish('p', provider)
  bridge.openStream('p', taskId, JSON.stringify({ messages: [] }), 1, undefined, streamId, credit)
}

test('chunks produced in one tick go to Rust in one push', async () => {
  const { bridge, calls, pushesReach } = bridgeWith(() => 10_000)
  open(
    bridge,
    {
      async *stream() {
        for (let i = 0; i < 1000; i++) yield { content: `${i}` }
      },
    },
    { credit: 10_000 },
  )
  await within(pushesReach(1), 2000, 'the push')
  await within(new Promise((resolve) => setImmediate(resolve)), 100, 'a tick')
  assert.equal(calls.pushes.length, 1)
  assert.equal(calls.pushes[0].count, 1000)
  assert.equal(calls.pushes[0].texts[999], '{"content":"999"}')
  assert.deepEqual(calls.ends, [7])
  assert.deepEqual(calls.settles, [{ callId: 1, value: undefined, error: undefined }], 'opened: no value, no error')
})

test('content-only chunks go as strings, the others as objects, every character kept', async () => {
  const { bridge, calls, pushesReach } = bridgeWith(() => 10_000)
  const contents = ['plain', 'line\nbreak, "quoted" \\ \u0001', '\ud83d\ude00 emoji', 'lone \ud800']
  open(bridge, {
    async *stream() {
      for (const content of contents) yield { content }
      yield { content: 'with a reason', finishReason: null }
      yield { toolCalls: [{ index: 0, function: { arguments: '{"a":1}' } }] }
      yield { finishReason: 'stop', usage: { promptTokens: 1, completionTokens: 5 } }
    },
  })
  await within(pushesReach(1), 2000, 'the push')
  assert.equal(calls.pushes.length, 1)
  const items = JSON.parse(calls.pushes[0].text)
  assert.deepEqual(items, [
    ...contents,
    { content: 'with a reason', finishReason: null },
    { toolCalls: [{ index: 0, function: { arguments: '{"a":1}' } }] },
    { finishReason: 'stop', usage: { promptTokens: 1, completionTokens: 5 } },
  ])
  // The lone surrogate stays escaped, for Rust to replace (src/stream.rs).
  assert.match(calls.pushes[0].text, /"lone \\ud800"/)
})

test('a batch is pushed before its content could exceed flushBytes, counting 6 bytes a character', async () => {
  const { bridge, calls, pushesReach } = bridgeWith(() => 10_000, { flushBytes: 100 })
  open(bridge, {
    async *stream() {
      for (let i = 0; i < 5; i++) yield { content: 'x'.repeat(10) }
    },
  })
  await within(pushesReach(3), 2000, 'three pushes')
  // 63 bytes at most a chunk: the second reaches 100.
  assert.deepEqual(
    calls.pushes.map((push) => push.count),
    [2, 2, 1],
  )
})

test('whatever a provider throws reaches Rust as a string: the call is always answered', async () => {
  const odd = [
    Object.assign(new Error(), { message: 42 }),
    Object.create(null),
    { big: 1n },
    Object.assign(Object.create(null), { big: 1n }),
    Symbol('thrown'),
    undefined,
  ]
  const { bridge, calls } = bridgeWith(() => 512)
  const unhandled = []
  const onUnhandled = (reason) => unhandled.push(reason)
  process.on('unhandledRejection', onUnhandled)
  try {
    odd.forEach((thrown, i) => {
      bridge.publish(`p${i}`, {
        complete: () => Promise.reject(thrown),
        stream: () => {
          throw thrown
        },
      })
      bridge.complete(`p${i}`, `c-${i}`, '{"messages":[]}', i, undefined)
      bridge.openStream(`p${i}`, `s-${i}`, '{"messages":[]}', 100 + i, undefined, i, 512)
    })
    await within(
      (async () => {
        while (calls.settles.length < 2 * odd.length) await new Promise((resolve) => setImmediate(resolve))
      })(),
      2000,
      'every call answered',
    )
  } finally {
    process.off('unhandledRejection', onUnhandled)
  }
  assert.deepEqual(unhandled, [])
  for (const settled of calls.settles) assert.equal(typeof settled.error, 'string', `call ${settled.callId}`)
  assert.equal(calls.settles.find((settled) => settled.callId === 0).error, '42')
  assert.equal(calls.fails.length, odd.length, 'each stream said it failed, with a string')
})

test('an object chunk counts 3 bytes a character toward flushBytes, as Rust counts UTF-8', async () => {
  const { bridge, calls, pushesReach } = bridgeWith(() => 10_000, { flushBytes: 100 })
  const chunk = { content: '中'.repeat(30), finishReason: null }
  open(bridge, {
    async *stream() {
      for (let i = 0; i < 3; i++) yield chunk
    },
  })
  await within(pushesReach(3), 2000, 'three pushes')
  const one = Buffer.byteLength(JSON.stringify(chunk))
  for (const push of calls.pushes) {
    assert.ok(Buffer.byteLength(push.text) <= 100 + one + 2, `a push of ${Buffer.byteLength(push.text)} bytes`)
  }
  assert.deepEqual(
    calls.pushes.map((push) => push.count),
    [1, 1, 1],
  )
})

test('a chunk whose toJSON answers a string fails the stream, as before', async () => {
  const { bridge, calls } = bridgeWith(() => 512)
  open(bridge, {
    async *stream() {
      yield { content: 'fine' }
      yield { finishReason: 'stop', toJSON: () => 'not a chunk' }
    },
  })
  await within(
    (async () => {
      while (!calls.fails.length) await new Promise((resolve) => setImmediate(resolve))
    })(),
    2000,
    'the failure',
  )
  assert.match(calls.fails[0].message, /not a CompletionChunk object/)
  assert.deepEqual(
    calls.pushes.flatMap((push) => push.texts),
    ['{"content":"fine"}'],
  )
})

test('the loop never pushes more than its credit, and waits for the wake-up', async () => {
  let credit = 100
  const { bridge, calls, pushesReach } = bridgeWith((_, count) => (credit -= count))
  open(
    bridge,
    {
      async *stream() {
        for (let i = 0; i < 250; i++) yield { content: `${i}` }
      },
    },
    { credit: 100 },
  )
  await within(pushesReach(1), 2000, 'the first push')
  await new Promise((resolve) => setTimeout(resolve, 20))
  assert.deepEqual(
    calls.pushes.map((push) => push.count),
    [100],
    'a full window: one push, then a wait',
  )
  credit = 200
  bridge.credit({ streamId: 7, credit: 200 })
  await within(pushesReach(2), 2000, 'the push after the wake-up')
  await new Promise((resolve) => setTimeout(resolve, 20))
  assert.deepEqual(
    calls.pushes.map((push) => push.count),
    [100, 150],
  )
  assert.deepEqual(calls.ends, [7])
})

test('credit given back before the loop waits is not lost', async () => {
  // The end-of-tick push uses the last credit while the loop awaits the provider;
  // Rust gives credit back before the provider yields again.
  let release
  const gate = new Promise((resolve) => (release = resolve))
  const { bridge, calls, pushesReach } = bridgeWith((pushes) => (pushes === 1 ? 0 : 100))
  open(
    bridge,
    {
      async *stream() {
        yield { content: 'a' }
        await gate
        yield { content: 'b' }
      },
    },
    { credit: 1 },
  )
  await within(pushesReach(1), 2000, 'the first push')
  bridge.credit({ streamId: 7, credit: 512 })
  release()
  await within(pushesReach(2), 2000, 'the second chunk after the early wake-up')
  assert.deepEqual(
    calls.pushes.map((push) => push.texts),
    [['{"content":"a"}'], ['{"content":"b"}']],
  )
  await within(new Promise((resolve) => setImmediate(resolve)), 100, 'a tick')
  assert.deepEqual(calls.ends, [7])
})

test('an abort while the loop waits for credit ends it at once and closes the iterator', async () => {
  let closed = false
  let signal
  const { bridge, calls, pushesReach } = bridgeWith(() => 0)
  open(
    bridge,
    {
      async *stream(options) {
        signal = options.signal
        try {
          for (let i = 0; ; i++) yield { content: `${i}` }
        } finally {
          closed = true
        }
      },
    },
    { credit: 8 },
  )
  await within(pushesReach(1), 2000, 'the push that fills the window')
  bridge.abort({ taskId: 't-1', reason: 'the task was cancelled by mcpd', timedOut: false })
  await within(
    (async () => {
      while (!closed) await new Promise((resolve) => setImmediate(resolve))
    })(),
    2000,
    'the iterator closed',
  )
  assert.equal(signal.aborted, true)
  assert.equal(calls.pushes.length, 1)
  assert.deepEqual(calls.ends, [])
  assert.deepEqual(
    calls.fails,
    [{ streamId: 7, message: 'the stream was stopped' }],
    'the loop said it stopped, as a failure',
  )
})

test('a chunk that is not a CompletionChunk fails the stream and closes the iterator at its yield', async () => {
  let closed = false
  const { bridge, calls } = bridgeWith(() => 512)
  open(bridge, {
    async *stream() {
      try {
        yield { content: 'fine' }
        yield { content: 5 }
        await new Promise(() => {})
      } finally {
        closed = true
      }
    },
  })
  await within(
    (async () => {
      while (!calls.fails.length) await new Promise((resolve) => setImmediate(resolve))
    })(),
    2000,
    'the failure',
  )
  assert.equal(closed, true)
  assert.match(calls.fails[0].message, /invalid CompletionChunk/)
  assert.deepEqual(
    calls.pushes.flatMap((push) => push.texts),
    ['{"content":"fine"}'],
  )
})

// The streaming relay itself, seen from mcpd: chunk batching and seq, backpressure
// toward a provider faster than mcpd, cancel and stop() mid-stream, broken stream()s.

import assert from 'node:assert/strict'
import test from 'node:test'
import v8 from 'node:v8'
import vm from 'node:vm'
import { chatBody, sleep, startMcpd, startRegistrar } from './helpers.mjs'
import { abortedAt } from './providers.mjs'

// A full GC on demand, so that the memory test below measures what is kept, not
// garbage V8 has not collected yet (the suite's runner cannot pass --expose-gc).
v8.setFlagsFromString('--expose-gc')
const gc = vm.runInNewContext('gc')

/** The payloads of every accepted chunk POST of the task, in order. */
const postedPayloads = (mcpd, taskId) => mcpd.chunkPosts(taskId).flatMap((post) => post.chunks)

/** Each post starts where the previous one ended: seq is the index of its first payload. */
function assertSeqConsistent(posts) {
  assert.equal(posts[0].seq, 0)
  for (let i = 1; i < posts.length; i++) {
    assert.equal(posts[i].seq, posts[i - 1].seq + posts[i - 1].chunks.length, `post ${i}: seq ${posts[i].seq}`)
  }
}

const contentOf = (payloads) =>
  payloads
    .filter((payload) => payload !== '[DONE]')
    .map((payload) => JSON.parse(payload))
    .map((chunk) => chunk.choices?.[0]?.delta?.content ?? '')
    .join('')

const noComplete = async () => {
  throw new Error('complete() must not be called for a streaming task')
}

test('10,000 small chunks as fast as the provider can: all relayed in order, in far fewer POSTs', async (t) => {
  const mcpd = await startMcpd(t)
  const count = 10_000
  const fast = {
    complete: noComplete,
    async *stream() {
      for (let i = 0; i < count; i++) yield { content: `${i},` }
    },
  }
  await startRegistrar(t, mcpd, { fast })
  const started = performance.now()
  const taskId = mcpd.sendTask({ provider: 'fast', body: chatBody({ stream: true }) })
  const outcome = await mcpd.outcome(taskId, { timeoutMs: 30_000 })
  const elapsed = performance.now() - started
  const posts = mcpd.chunkPosts(taskId)
  t.diagnostic(
    `${count} chunks in ${posts.length} POSTs (largest ${Math.max(...posts.map((p) => p.chunks.length))} payloads) in ${elapsed.toFixed(0)} ms`,
  )

  await t.test('every chunk arrives once, in order, with consistent seq and one POST in flight at a time', () => {
    assert.equal(outcome.kind, 'stream')
    const expected = Array.from({ length: count }, (_, i) => `${i},`).join('')
    assert.equal(contentOf(outcome.payloads), expected)
    // role chunk + one payload per provider chunk + finish chunk + [DONE]
    assert.equal(outcome.payloads.length, count + 3)
    assert.equal(outcome.payloads.at(-1), '[DONE]')
    assertSeqConsistent(posts)
    assert.deepEqual(postedPayloads(mcpd, taskId), outcome.payloads, 'no payload was posted twice')
    assert.deepEqual(mcpd.violations, [], 'never two POSTs in flight, and every chunk well-formed')
  })

  // The relay's batching rules (src/dispatch/relay.rs) bound the POSTs: the first goes at
  // once; every later one either is full (4,096 payloads: at most floor(10,003 / 4,096) = 2
  // of them) or lingered 5 ms for company (BATCH_LINGER) in a window of its own, after the
  // previous POST was taken, so at most elapsed / 5 ms of them; the one carrying [DONE] may go
  // early. A relay that stopped lingering posted 3,700-4,600 here, one per 1-3 payloads, far
  // over this bound at any speed the machine runs (a slower run only raises the bound by 1
  // per 5 ms).
  await t.test('no more chunk POSTs than the batching rules allow', () => {
    const payloads = count + 3
    const bound = 1 + Math.floor(payloads / 4096) + Math.floor(elapsed / 5) + 1
    assert.ok(posts.length <= bound, `${posts.length} chunk POSTs for ${count} chunks in ${elapsed.toFixed(0)} ms`)
  })
})

test('backpressure: a provider faster than mcpd is held a bounded number of chunks ahead', async (t) => {
  // No clock in the assertions: the provider records, at every chunk it yields, how far
  // it is ahead of what mcpd has accepted. With chunk POSTs answered slowly, what the
  // registrar may hold is bounded by its buffers: the JS-to-Rust credit window (1 MiB of
  // chunk JSON, 64 chunks of 16 KiB), the run the core took from it (at most 128 chunks),
  // the next POST's body as it is built (1 MiB, 64 chunks) and the POST on the wire (the
  // same): a few hundred chunks here. Unthrottled, the provider would run ahead by nearly
  // all of its 2,000 chunks, since it makes them far faster than mcpd takes them. Load on the machine can only make the lead smaller, never larger.
  const mcpd = await startMcpd(t)
  const chunkBytes = 16 * 1024
  const filler = 'x'.repeat(chunkBytes - 8)
  const count = 2000
  let produced = 0
  let maxLead = 0
  let received = () => 0
  const firehose = {
    complete: noComplete,
    async *stream() {
      for (let i = 0; i < count; i++) {
        maxLead = Math.max(maxLead, produced - received())
        produced++
        yield { content: i.toString(36).padStart(8, '0') + filler }
      }
    },
  }
  await startRegistrar(t, mcpd, { firehose })
  mcpd.delay('chunks', 100)
  gc()
  const before = process.memoryUsage()
  const taskId = mcpd.sendTask({ provider: 'firehose', body: chatBody({ stream: true }) })
  // Content payloads mcpd has accepted (the first payload is the role chunk).
  received = () => Math.max(0, postedPayloads(mcpd, taskId).length - 1)
  const outcome = await mcpd.outcome(taskId, { timeoutMs: 60_000 })
  gc()
  const after = process.memoryUsage()
  const mib = (bytes) => bytes / 2 ** 20
  // The stream as mcpd received it: every payload once, as the fake keeps it (its record).
  const streamMib = mib(outcome.payloads.reduce((sum, payload) => sum + payload.length, 0))
  // And each chunk POST's body as it arrived (`raw`): the fake's second copy.
  const rawMib = mib(
    mcpd.requests
      .filter((request) => request.path.includes(taskId))
      .reduce((sum, request) => sum + request.raw.length, 0),
  )
  const heapGrowthMib = mib(after.heapUsed - before.heapUsed)
  const outsideHeapGrowthMib = mib(after.rss - after.heapTotal - (before.rss - before.heapTotal))
  t.diagnostic(
    `max lead ${maxLead} chunks (${((maxLead * chunkBytes) / 2 ** 20).toFixed(1)} MiB); stream ${streamMib.toFixed(1)} MiB; ` +
      `JS heap kept +${heapGrowthMib.toFixed(1)} MiB; outside the JS heap +${outsideHeapGrowthMib.toFixed(1)} MiB; ` +
      `RSS +${mib(after.rss - before.rss).toFixed(1)} MiB`,
  )
  assert.equal(produced, count)
  assert.ok(maxLead <= 600, `the provider ran ${maxLead} chunks ahead of mcpd`)
  // Memory, in two parts that each have a bound of their own (after a full GC, so garbage
  // V8 has not collected yet is not counted; RSS as a whole, 70-80 MiB here, is mostly that):
  // - The JS heap keeps the fake mcpd's records: the payloads and every chunk POST's body
  //   as it arrived, two copies of the stream (measured: both + 0.1-0.8 MiB). A copy kept
  //   on the JavaScript side (the provider bridge holding yielded chunks, say) adds the
  //   whole stream again.
  // - Outside the JS heap: the registrar's bounded buffers (the credit window, the next
  //   POST's body and the POST in flight: 1 MiB each), malloc's retained arenas, and,
  //   on newer Nodes, the fake's raw copy (Node 26 keeps a large decoded string outside
  //   the heap) and the pages of its freed request buffers, which RSS still holds (one
  //   more stream). Measured: +9.5 to +17.5 MiB (Node 20), -14.7 to +53 (Node 24), +59
  //   to +63 (Node 26, about raw + one stream). The bound is that plus 16 MiB: it
  //   catches a registrar that kept the stream natively on Node 26, and two such copies
  //   on any Node, no less; the registrar's native memory itself is bounded exactly by
  //   the Rust peak-RSS tests (tests/hostile.rs).
  assert.ok(
    heapGrowthMib < streamMib + rawMib + 8,
    `the JS heap kept ${heapGrowthMib.toFixed(1)} MiB for a ${streamMib.toFixed(1)} MiB stream (the fake's raw bodies: ${rawMib.toFixed(1)} MiB)`,
  )
  assert.ok(
    outsideHeapGrowthMib < rawMib + streamMib + 16,
    `memory outside the JS heap grew ${outsideHeapGrowthMib.toFixed(1)} MiB for a ${streamMib.toFixed(1)} MiB stream`,
  )

  // Nothing was lost, damaged or reordered.
  assert.equal(outcome.kind, 'stream')
  const contents = outcome.payloads.slice(1, -2).map((payload) => JSON.parse(payload).choices[0].delta.content)
  assert.equal(contents.length, count)
  contents.forEach((content, i) => {
    if (content.length !== chunkBytes || parseInt(content.slice(0, 8), 36) !== i)
      assert.fail(`chunk ${i} is out of order or damaged`)
  })
  assertSeqConsistent(mcpd.chunkPosts(taskId))
  assert.deepEqual(mcpd.violations, [])
})

test('cancel of a running streaming task: signal fires, the iterator is closed, nothing more is posted', async (t) => {
  const mcpd = await startMcpd(t)
  let signal
  let finalized = false
  let yieldedAfterAbort = 0
  const stubborn = {
    complete: noComplete,
    async *stream(options) {
      signal = options.signal
      try {
        for (let i = 0; i < 5; i++) yield { content: `c${i} ` }
        await abortedAt(options.signal)
        // A provider that ignores its signal: the registrar must stop pulling and close it.
        for (let i = 0; i < 1000; i++) {
          yieldedAfterAbort++
          yield { content: `late${i} ` }
        }
      } finally {
        finalized = true
      }
    },
  }
  const { registrar } = await startRegistrar(t, mcpd, { stubborn })
  const taskId = mcpd.sendTask({ provider: 'stubborn', body: chatBody({ stream: true }) })
  await mcpd.waitFor(() => postedPayloads(mcpd, taskId).length === 6) // role + 5
  await sleep(50) // let the last chunk POST's answer reach the registrar
  const postsBefore = mcpd.chunkPosts(taskId).length

  mcpd.cancel(taskId)
  await mcpd.waitFor(() => signal.aborted, { timeoutMs: 1000 })
  assert.equal(signal.reason.name, 'AbortError')
  await mcpd.waitFor(() => finalized, { timeoutMs: 1000 })
  // The barrier after which "nothing more is posted" is exact: a task is counted cancelled
  // when it ends, after its last POST.
  await mcpd.waitFor(() => registrar.status().cancelled === 1, { timeoutMs: 5000 })
  assert.ok(yieldedAfterAbort <= 1, `the iterator was pulled ${yieldedAfterAbort} times after the abort`)
  assert.equal(mcpd.chunkPosts(taskId).length, postsBefore, 'nothing posted after the cancel')
  assert.ok(!mcpd.requests.some((r) => r.path.endsWith(`/${taskId}/result`)), 'no result POST either')
  assert.equal((await mcpd.outcome(taskId)).kind, 'cancelled')
  assert.equal(contentOf(postedPayloads(mcpd, taskId)), 'c0 c1 c2 c3 c4 ')
  assert.equal(registrar.status().inFlight, 0)
  assert.deepEqual(mcpd.violations, [])
})

test('stop() mid-stream: an in-band unavailable error then [DONE]; stop() resolves', async (t) => {
  const mcpd = await startMcpd(t)
  let signal
  let finalized = false
  const parked = {
    complete: noComplete,
    async *stream(options) {
      signal = options.signal
      try {
        yield { content: 'one ' }
        yield { content: 'two ' }
        await abortedAt(options.signal)
      } finally {
        finalized = true
      }
    },
  }
  const { registrar } = await startRegistrar(t, mcpd, { parked })
  const taskId = mcpd.sendTask({ provider: 'parked', body: chatBody({ stream: true }) })
  await mcpd.waitFor(() => postedPayloads(mcpd, taskId).length === 3)

  const stopping = performance.now()
  await registrar.stop()
  const stopMs = performance.now() - stopping
  assert.ok(stopMs < 2000, `stop() took ${stopMs.toFixed(0)} ms`)
  assert.equal(registrar.status().state, 'stopped')
  assert.equal(signal.aborted, true)
  assert.equal(signal.reason.name, 'AbortError')
  await mcpd.waitFor(() => finalized, { timeoutMs: 1000 })

  const outcome = await mcpd.outcome(taskId, { timeoutMs: 1000 })
  assert.equal(outcome.kind, 'stream')
  assert.equal(outcome.payloads.at(-1), '[DONE]')
  const { error } = JSON.parse(outcome.payloads.at(-2))
  assert.equal(error.type, 'unavailable')
  assert.equal(typeof error.message, 'string')
  assert.equal(contentOf(outcome.payloads.slice(0, -2)), 'one two ')
  assertSeqConsistent(mcpd.chunkPosts(taskId))
  assert.deepEqual(mcpd.violations, [])
  t.diagnostic(`stop() resolved in ${stopMs.toFixed(0)} ms`)
})

test('a stream() that throws or returns no async iterable: 502 before any chunk', async (t) => {
  const mcpd = await startMcpd(t)
  let completeCalls = 0
  const broken = (stream) => ({
    complete: async () => {
      completeCalls++
      return { content: 'fallback' }
    },
    stream,
  })
  const providers = {
    throwsSync: broken(() => {
      throw new TypeError('stream() exploded')
    }),
    returnsNull: broken(() => null),
    returnsPlainObject: broken(() => ({ chunks: ['not', 'iterable'] })),
    returnsPromise: broken(async () => [{ content: 'x' }]),
    nextThrowsSync: broken(() => ({
      [Symbol.asyncIterator]: () => ({
        next() {
          throw new Error('next() exploded')
        },
      }),
    })),
  }
  const { registrar } = await startRegistrar(t, mcpd, providers)
  for (const [name, pattern] of [
    ['throwsSync', /stream\(\) exploded/],
    ['returnsNull', /async iterable/],
    ['returnsPlainObject', /async iterable/],
    ['returnsPromise', /async iterable/],
    ['nextThrowsSync', /next\(\) exploded/],
  ]) {
    const taskId = mcpd.sendTask({ provider: name, body: chatBody({ stream: true }) })
    const outcome = await mcpd.outcome(taskId)
    assert.equal(outcome.kind, 'result', name)
    assert.equal(outcome.status, 502, name)
    assert.equal(outcome.body.error.type, 'provider_error', name)
    assert.match(outcome.body.error.message, pattern, name)
    assert.deepEqual(mcpd.chunkPosts(taskId), [], `${name}: no chunk before the 502`)
  }
  assert.equal(completeCalls, 0, 'a broken stream() does not fall back to complete()')
  await mcpd.waitFor(() => registrar.status().failed === 5)
  assert.deepEqual(mcpd.violations, [])
})

// Cancels that race the start of a task (issue 8, part 7): a cancel at any moment
// after the task frame (queued, being admitted, while the JS call is being made,
// while the provider's promise is pending) fires the provider's signal, and
// nothing is posted for the task.

import assert from 'node:assert/strict'
import { test } from 'node:test'
import { chatBody, startMcpd, startRegistrar } from './helpers.mjs'

const TASKS = 1500

test(`${TASKS} tasks, each cancelled 0-100 ms after it is sent: every provider call that began sees its signal fire; nothing is posted`, async (t) => {
  const mcpd = await startMcpd(t)
  const calls = []
  const provider = {
    complete(options) {
      const { signal } = options
      const fired = new Promise((resolve) => {
        if (signal.aborted) return resolve(signal.reason)
        signal.addEventListener('abort', () => resolve(signal.reason), { once: true })
      })
      calls.push({ signal, fired })
      // Answers only once aborted (an answer the registrar must not post), or
      // after 60 s, far beyond this test.
      return Promise.race([fired, new Promise((resolve) => setTimeout(resolve, 60_000).unref())]).then(() => ({
        content: 'late',
      }))
    },
  }
  const { registrar } = await startRegistrar(t, mcpd, { slow: provider }, { maxConcurrency: TASKS, maxQueue: TASKS })

  const ids = []
  const cancels = []
  for (let i = 0; i < TASKS; i++) {
    const taskId = mcpd.sendTask({ provider: 'slow', body: chatBody(), taskId: `race-${i}` })
    ids.push(taskId)
    cancels.push(
      new Promise((resolve) => setTimeout(() => resolve(mcpd.cancel(taskId)), Math.floor(Math.random() * 101))),
    )
    // Spread the sends a little, as mcpd would under load.
    if (i % 100 === 99) await new Promise((resolve) => setImmediate(resolve))
  }
  await Promise.all(cancels)

  // Every task ends cancelled, as the registrar counts it.
  await mcpd.waitFor(() => registrar.status().cancelled === TASKS, { timeoutMs: 20_000 })
  const status = registrar.status()
  assert.deepEqual([status.completed, status.failed, status.inFlight, status.queued], [0, 0, 0, 0])

  // Every call that began sees its signal fire, with the cancel's reason.
  const pending = calls.filter((call) => !call.signal.aborted).length
  const reasons = await Promise.race([
    Promise.all(calls.map((call) => call.fired)),
    new Promise((_, reject) =>
      setTimeout(() => reject(new Error(`${pending} provider signals never fired`)), 10_000).unref(),
    ),
  ])
  assert.ok(calls.length <= TASKS, `${calls.length} calls`)
  for (const reason of reasons) {
    assert.equal(reason.name, 'AbortError')
    assert.match(reason.message, /cancelled/)
  }

  // After stop() nothing more can be sent: nothing was posted for any task.
  await registrar.stop()
  const posted = mcpd.requests.filter((request) => request.path.includes('/_provider-tasks/'))
  assert.deepEqual(
    posted.map((request) => request.path),
    [],
  )
  assert.deepEqual(mcpd.violations, [])
})

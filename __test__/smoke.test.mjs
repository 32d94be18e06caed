import test from 'node:test'
import assert from 'node:assert/strict'
import { startMcpd, startRegistrar, recordingProvider, chatBody } from './helpers.mjs'

test('smoke: a non-streaming task round-trips', async (t) => {
  const mcpd = await startMcpd(t)
  const provider = recordingProvider()
  const { registrar } = await startRegistrar(t, mcpd, { local: provider })
  const taskId = mcpd.sendTask({ provider: 'local', body: chatBody() })
  const outcome = await mcpd.outcome(taskId)
  assert.equal(outcome.kind, 'result')
  assert.equal(outcome.status, 200)
  assert.equal(outcome.body.choices[0].message.content, 'hello from the provider')
  assert.deepEqual(mcpd.violations, [])
  console.log(registrar.status())
})

// mcplocal's boot hook, maybeStartVirtualLlmRegistrar: when it resolves null,
// where it reads credentials, and that it never rejects or blocks the boot.

import assert from 'node:assert/strict'
import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import test from 'node:test'
import { addon, captureLogger, chatBody, recordingProvider, startMcpd, TOKEN, tempConfigDir } from './helpers.mjs'

const { maybeStartVirtualLlmRegistrar, VirtualLlmRegistrar } = addon

async function writeCredentials(dir, credentials) {
  await mkdir(dir, { recursive: true })
  await writeFile(join(dir, 'credentials'), JSON.stringify(credentials), { mode: 0o600 })
}

test('resolves null after a warning when no provider is opted in (seed: no-op)', async (t) => {
  const logger = captureLogger()
  const mcpd = await startMcpd(t)
  const configDir = await tempConfigDir(t)
  await writeCredentials(configDir, { mcpdUrl: mcpd.url, token: TOKEN })
  const registrar = await maybeStartVirtualLlmRegistrar({
    providers: [
      { name: 'local', type: 'ollama' },
      { name: 'other', type: 'openai', publish: false },
    ],
    registry: new Map([['local', recordingProvider()]]),
    configDir,
    logger,
  })
  assert.equal(registrar, null)
  assert.ok(
    logger.lines.some((line) => line.level === 'warn' && /publish: true/.test(line.msg)),
    JSON.stringify(logger.lines),
  )
  assert.equal(mcpd.requests.length, 0, 'nothing was sent to mcpd')
})

test('resolves null when none of the opted-in providers is in the registry', async (t) => {
  const logger = captureLogger()
  const registrar = await maybeStartVirtualLlmRegistrar({
    providers: [{ name: 'ghost', type: 'ollama', publish: true }],
    registry: { get: () => undefined },
    configDir: await tempConfigDir(t),
    logger,
  })
  assert.equal(registrar, null)
  assert.ok(logger.lines.some((line) => line.level === 'warn' && /ghost/.test(JSON.stringify(line))))
  assert.ok(logger.lines.some((line) => line.level === 'warn' && /registry/.test(line.msg)))
})

test('resolves null when the credentials file is missing or unreadable, without leaking its token', async (t) => {
  const configDir = await tempConfigDir(t)
  const base = {
    providers: [{ name: 'local', type: 'ollama', publish: true }],
    registry: new Map([['local', recordingProvider()]]),
    configDir,
  }
  const missing = captureLogger()
  assert.equal(await maybeStartVirtualLlmRegistrar({ ...base, logger: missing }), null)
  assert.ok(missing.lines.some((line) => line.level === 'warn' && /credentials/.test(JSON.stringify(line))))
  await writeFile(join(configDir, 'credentials'), `{"mcpdUrl": "http://127.0.0.1:1", "token": "${TOKEN}"`)
  const broken = captureLogger()
  assert.equal(await maybeStartVirtualLlmRegistrar({ ...base, logger: broken }), null)
  assert.ok(broken.lines.some((line) => line.level === 'warn'))
  assert.ok(!JSON.stringify(broken.lines).includes(TOKEN))
})

test('reads <configDir>/credentials, publishes the opted-in providers from a Map registry, and serves tasks', async (t) => {
  const mcpd = await startMcpd(t)
  const configDir = await tempConfigDir(t)
  await writeCredentials(configDir, { mcpdUrl: mcpd.url, token: TOKEN })
  const registrar = await maybeStartVirtualLlmRegistrar({
    providers: [
      {
        name: 'local',
        type: 'ollama',
        model: 'qwen2.5:7b',
        publish: true,
        description: 'my GPU',
        contextWindow: 32768,
      },
      { name: 'private', type: 'openai', publish: false },
      { name: 'missing', type: 'ollama', publish: true },
    ],
    registry: new Map([
      ['local', recordingProvider()],
      ['private', recordingProvider()],
    ]),
    configDir,
    logger: captureLogger(),
    backoff: { initialMs: 50, maxMs: 200 },
  })
  assert.ok(registrar instanceof VirtualLlmRegistrar)
  t.after(() => registrar.stop())
  assert.deepEqual(mcpd.registrations[0].body.providers, [
    { name: 'local', type: 'ollama', model: 'qwen2.5:7b', description: 'my GPU', contextWindow: 32768 },
  ])
  // With mcpd answering, the hook resolves once the channel is open, as start() does:
  // a task sent that instant is run.
  assert.equal(registrar.status().state, 'connected')
  const outcome = await mcpd.outcome(mcpd.sendTask({ provider: 'local', body: chatBody() }))
  assert.equal(outcome.status, 200)
})

test('never rejects: a failed first register is logged and retried in the background', async (t) => {
  const mcpd = await startMcpd(t)
  mcpd.failNext('register', { status: 502, body: 'bad gateway', times: 2 })
  const logger = captureLogger()
  const registrar = await maybeStartVirtualLlmRegistrar({
    providers: [{ name: 'local', type: 'ollama', publish: true }],
    registry: { get: (name) => (name === 'local' ? recordingProvider() : undefined) },
    mcpdUrl: mcpd.url,
    token: TOKEN,
    configDir: await tempConfigDir(t),
    logger,
    backoff: { initialMs: 50, maxMs: 100 },
  })
  assert.ok(registrar instanceof VirtualLlmRegistrar)
  t.after(() => registrar.stop())
  assert.ok(logger.lines.some((line) => line.level === 'warn' && /502/.test(JSON.stringify(line))))
  await mcpd.waitFor(() => registrar.status().state === 'connected', { timeoutMs: 3000 })
  assert.equal(mcpd.registrations.length, 3)
})

test('never rejects on bad options either', async (t) => {
  const logger = captureLogger()
  assert.equal(await maybeStartVirtualLlmRegistrar({ providers: 'nope', registry: new Map(), logger }), null)
  assert.equal(await maybeStartVirtualLlmRegistrar({ providers: [], registry: 42, logger }), null)
  assert.equal(await maybeStartVirtualLlmRegistrar(undefined), null)
  const throwing = {
    get() {
      throw new Error('registry exploded')
    },
  }
  assert.equal(
    await maybeStartVirtualLlmRegistrar({
      providers: [{ name: 'a', type: 't', publish: true }],
      registry: throwing,
      logger,
      configDir: await tempConfigDir(t),
    }),
    null,
  )
  assert.ok(logger.lines.some((line) => /registry exploded/.test(JSON.stringify(line))))
})

test('never blocks the boot: an mcpd that accepts but never answers resolves the registrar within ~3 s', async (t) => {
  const { createServer } = await import('node:net')
  const sockets = new Set()
  const silent = createServer((socket) => {
    sockets.add(socket)
    socket.on('error', () => {})
  })
  await new Promise((resolve) => silent.listen(0, '127.0.0.1', resolve))
  t.after(() => {
    for (const socket of sockets) socket.destroy()
    silent.close()
  })
  const started = Date.now()
  const registrar = await maybeStartVirtualLlmRegistrar({
    providers: [{ name: 'local', type: 'ollama', publish: true }],
    registry: new Map([['local', recordingProvider()]]),
    mcpdUrl: `http://127.0.0.1:${silent.address().port}`,
    token: TOKEN,
    configDir: await tempConfigDir(t),
    logger: captureLogger(),
  })
  const waited = Date.now() - started
  assert.ok(registrar instanceof VirtualLlmRegistrar)
  t.after(() => registrar.stop())
  assert.ok(waited >= 2500 && waited < 6000, `boot waited ${waited} ms`)
  assert.equal(registrar.status().state, 'registering')
})

// A hostile mcpd, from JavaScript: a raw http.createServer on 127.0.0.1 that
// answers register with a redirect (to another origin, or in a loop within its
// own) whose Location holds the token. start() must reject naming the origin,
// and no message, status or log line may carry the token in any form.

import assert from 'node:assert/strict'
import { mkdtemp, rm } from 'node:fs/promises'
import http from 'node:http'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import test from 'node:test'

const require = createRequire(import.meta.url)
const addon = require('../index.js')

const TOKEN = 'sk-hardening/token+0123456789'
/** Every way the token may be written into a URL. */
const TOKEN_FORMS = [
  TOKEN,
  encodeURIComponent(TOKEN),
  encodeURIComponent(TOKEN).toLowerCase(),
  encodeURIComponent(encodeURIComponent(TOKEN)),
]

/** A raw server on 127.0.0.1; `handle(req, res, origin)` answers every request. */
async function rawServer(t, handle) {
  const requests = []
  const server = http.createServer((req, res) => {
    requests.push(`${req.method} ${req.url}`)
    req.resume()
    req.on('end', () => handle(req, res, origin))
  })
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  const origin = `http://127.0.0.1:${server.address().port}`
  t.after(() => new Promise((resolve) => server.close(resolve)))
  return { origin, requests }
}

async function configDir(t) {
  const dir = await mkdtemp(join(tmpdir(), 'mcpctl-registrar-hardening-'))
  t.after(() => rm(dir, { recursive: true, force: true }))
  return dir
}

/** A logger that keeps every argument of every call, whatever their order. */
function captureLogger() {
  const lines = []
  const record =
    (level) =>
    (...args) =>
      lines.push(`${level} ${JSON.stringify(args)}`)
  return { lines, debug: record('debug'), info: record('info'), warn: record('warn'), error: record('error') }
}

function assertNoToken(text, where) {
  for (const form of TOKEN_FORMS) {
    assert.ok(!text.includes(form), `${where} holds the token (${form}): ${text}`)
  }
}

const provider = { complete: async () => ({ content: 'never called', finishReason: 'stop' }) }

async function startAgainst(t, mcpdUrl) {
  const logger = captureLogger()
  const registrar = new addon.VirtualLlmRegistrar({
    mcpdUrl,
    token: TOKEN,
    configDir: await configDir(t),
    logger,
    backoff: { initialMs: 50, maxMs: 200 },
    providers: [{ name: 'local-qwen', type: 'test', model: 'm', publish: true, provider }],
  })
  t.after(() => registrar.stop())
  const error = await registrar.start().then(
    () => assert.fail('start() resolved against a redirecting mcpd'),
    (error) => error,
  )
  return { error, registrar, logger }
}

for (const encode of [(token) => token, encodeURIComponent, (token) => encodeURIComponent(encodeURIComponent(token))]) {
  test(`a redirect to another origin is refused, naming the origin only (token as ${encode(TOKEN)})`, async (t) => {
    const elsewhere = await rawServer(t, (_req, res) => res.end('{}'))
    const mcpd = await rawServer(t, (_req, res) => {
      res.writeHead(302, { location: `${elsewhere.origin}/steal?token=${encode(TOKEN)}#${encode(TOKEN)}` })
      res.end(`moved to ${elsewhere.origin}/steal?token=${encode(TOKEN)}`)
    })
    const { error, registrar, logger } = await startAgainst(t, `${mcpd.origin}/mcpd`)
    assert.match(error.message, /HTTP 302/)
    assert.ok(error.message.includes(`a redirect to another origin (${elsewhere.origin})`), error.message)
    assert.match(error.message, /not followed/)
    assertNoToken(String(error.stack), 'the error')
    assertNoToken(JSON.stringify(registrar.status()), 'status()')
    assertNoToken(logger.lines.join('\n'), 'the log')
    assert.deepEqual(mcpd.requests, ['POST /mcpd/api/v1/llms/_provider-register'])
    assert.deepEqual(elsewhere.requests, [], 'nothing is sent to the other origin')
  })
}

test("a redirect loop within mcpd's origin is refused at its first hop, without the token", async (t) => {
  const mcpd = await rawServer(t, (_req, res, origin) => {
    res.writeHead(307, {
      location: `${origin}/mcpd/api/v1/llms/_provider-register?token=${encodeURIComponent(TOKEN)}&hop=${Date.now()}`,
    })
    res.end()
  })
  const { error, registrar, logger } = await startAgainst(t, `${mcpd.origin}/mcpd`)
  assert.match(error.message, /HTTP 307/)
  assert.match(error.message, /a redirect within mcpd's origin, which is not followed/)
  assertNoToken(String(error.stack), 'the error')
  assertNoToken(JSON.stringify(registrar.status()), 'status()')
  assertNoToken(logger.lines.join('\n'), 'the log')
  assert.equal(mcpd.requests.length, 1, `one request, not a loop: ${mcpd.requests}`)
})

test('an endless register answer is cut at 1 MiB and start() rejects', async (t) => {
  let connectionClosed
  const closed = new Promise((resolve) => {
    connectionClosed = resolve
  })
  const mcpd = await rawServer(t, (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    res.write('{"providerSessionId":"ps-1","pad":"')
    const block = 'x'.repeat(64 * 1024)
    const pump = () => {
      while (!res.destroyed && res.write(block)) {}
      if (!res.destroyed) res.once('drain', pump)
    }
    res.on('close', connectionClosed)
    pump()
  })
  const { error } = await startAgainst(t, mcpd.origin)
  assert.match(error.message, /over 1048576 bytes/)
  // The registrar dropped the response before start() rejected, so the close is
  // already on its way: no timer of the registrar is involved. The bound only turns
  // a connection left open into a clear failure instead of the suite's 120 s timeout.
  const boundMs = 5000
  let timer
  const outcome = await Promise.race([
    closed.then(() => 'closed'),
    new Promise((resolve) => {
      timer = setTimeout(() => resolve('open'), boundMs)
    }),
  ])
  clearTimeout(timer)
  assert.equal(outcome, 'closed', `the endless answer's connection was still open ${boundMs} ms after start() rejected`)
})

// https to mcpd: rustls with the OS roots, plus the PEM bundle named by
// NODE_EXTRA_CA_CERTS, as Node does. The fixture CA and certificate are test-only.

import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { createServer } from 'node:https'
import test from 'node:test'
import { fileURLToPath } from 'node:url'
import { addon, captureLogger, recordingProvider, TOKEN, tempConfigDir } from './helpers.mjs'

const fixture = (name) => fileURLToPath(new URL(`./fixtures/tls/${name}`, import.meta.url))

/** Just enough of mcpd over TLS: register, an idle stream, heartbeats. */
async function startTlsMcpd(t) {
  const streams = new Set()
  const server = createServer(
    { key: readFileSync(fixture('server-key.pem')), cert: readFileSync(fixture('server.pem')) },
    (req, res) => {
      req.resume()
      if (req.url.endsWith('/_provider-register')) {
        res.writeHead(201, { 'content-type': 'application/json' })
        res.end(JSON.stringify({ providerSessionId: 'ps-tls', llms: [] }))
      } else if (req.url.includes('/_provider-stream')) {
        res.writeHead(200, { 'content-type': 'text/event-stream' })
        res.write(': open\n\n')
        streams.add(res)
      } else {
        res.writeHead(204).end()
      }
    },
  )
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.after(
    () =>
      new Promise((resolve) => {
        for (const res of streams) res.destroy()
        server.close(resolve)
        server.closeAllConnections()
      }),
  )
  return `https://127.0.0.1:${server.address().port}`
}

async function register(t, mcpdUrl) {
  const registrar = new addon.VirtualLlmRegistrar({
    mcpdUrl,
    token: TOKEN,
    configDir: await tempConfigDir(t),
    logger: captureLogger(),
    providers: [{ name: 'local', type: 'test', provider: recordingProvider() }],
  })
  t.after(() => registrar.stop())
  await registrar.start()
  return registrar
}

test('an https mcpd signed by an unknown CA is refused, with the TLS cause in the error', async (t) => {
  const previous = process.env.NODE_EXTRA_CA_CERTS
  delete process.env.NODE_EXTRA_CA_CERTS
  t.after(() => {
    if (previous !== undefined) process.env.NODE_EXTRA_CA_CERTS = previous
  })
  const url = await startTlsMcpd(t)
  await assert.rejects(register(t, url), (error) => {
    assert.match(error.message, /register failed: no answer from mcpd/)
    assert.match(error.message, /caused by.*(certificate|UnknownIssuer)/is)
    return true
  })
})

test('NODE_EXTRA_CA_CERTS adds the CA, as in Node', async (t) => {
  const previous = process.env.NODE_EXTRA_CA_CERTS
  process.env.NODE_EXTRA_CA_CERTS = fixture('ca.pem')
  t.after(() => {
    if (previous === undefined) delete process.env.NODE_EXTRA_CA_CERTS
    else process.env.NODE_EXTRA_CA_CERTS = previous
  })
  const url = await startTlsMcpd(t)
  const registrar = await register(t, url)
  assert.equal(registrar.status().providerSessionId, 'ps-tls')
})

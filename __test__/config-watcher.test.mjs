// examples/config-watcher.mjs, the README's pattern for update(): config.json edits boot,
// republish and stop the registrar; a broken file, or the same set saved again, changes nothing.
import assert from 'node:assert/strict'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import test from 'node:test'
import { watchProviderConfig } from '../examples/config-watcher.mjs'
import { captureLogger, recordingProvider, startMcpd, TOKEN, tempConfigDir } from './helpers.mjs'

const WAIT = { timeoutMs: 15_000 }

const writeConfig = (configDir, llmProviders) =>
  writeFile(join(configDir, 'config.json'), `${JSON.stringify({ llmProviders })}\n`)

/** The LLM names mcpd lists as active, sorted and joined: '' when none. */
const active = (mcpd) =>
  [
    ...new Set(
      [...mcpd.sessions.values()]
        .filter((session) => session.connected)
        .flatMap((session) => session.providers.map((provider) => provider.name)),
    ),
  ]
    .sort()
    .join(',')

test('config.json edits publish, republish, stop and boot again; a broken file or the same set changes nothing', async (t) => {
  const mcpd = await startMcpd(t)
  const configDir = await tempConfigDir(t)
  await writeFile(join(configDir, 'credentials'), JSON.stringify({ mcpdUrl: mcpd.url, token: TOKEN }), { mode: 0o600 })
  await writeConfig(configDir, [{ name: 'alpha', type: 'test', publish: true, url: 'http://127.0.0.1:1' }])

  const logger = captureLogger()
  const watcher = await watchProviderConfig({
    configDir,
    logger,
    debounceMs: 20,
    registryFor: (entries) => new Map(entries.map((entry) => [entry.name, recordingProvider()])),
  })
  t.after(() => watcher.close())
  const first = watcher.registrar
  assert.ok(first, 'the boot hook published alpha')
  await mcpd.waitFor(() => active(mcpd) === 'alpha', WAIT)

  // One more entry: the same registrar republishes under its session, no second boot.
  await writeConfig(configDir, [
    { name: 'alpha', type: 'test', publish: true },
    { name: 'beta', type: 'test', publish: true },
  ])
  await mcpd.waitFor(() => active(mcpd) === 'alpha,beta', WAIT)
  assert.equal(watcher.registrar, first)
  assert.equal(mcpd.sessions.size, 1)

  // The same entries saved again (another setting changed): nothing is re-registered.
  const registrationsBefore = mcpd.registrations.length
  const unchanged = () =>
    logger.lines.filter((line) => line.msg.startsWith('config.json saved; published set unchanged'))
  await writeFile(
    join(configDir, 'config.json'),
    JSON.stringify({
      theme: 'dark',
      llmProviders: [
        { name: 'alpha', type: 'test', publish: true },
        { name: 'beta', type: 'test', publish: true },
      ],
    }),
  )
  // One write may reach fs.watch as several events, more than debounceMs apart on a busy
  // machine: each is a look at the file that finds the set unchanged.
  await mcpd.waitFor(() => unchanged().length >= 1, WAIT)
  assert.equal(mcpd.registrations.length, registrationsBefore)

  // A file that does not parse: warned, and the set stays published.
  await writeFile(join(configDir, 'config.json'), '{ "llmProviders": [')
  await mcpd.waitFor(() => logger.lines.some((line) => line.msg.startsWith('config.json unreadable')), WAIT)
  assert.equal(mcpd.registrations.length, registrationsBefore)
  assert.equal(first.status().state, 'connected')

  // Nothing opted in: stopped, since update() refuses an empty set.
  await writeConfig(configDir, [{ name: 'alpha', type: 'test', publish: false }])
  await mcpd.waitFor(() => first.status().state === 'stopped', WAIT)
  assert.equal(watcher.registrar, null)

  // Opted in again: booted again through the boot hook.
  await writeConfig(configDir, [{ name: 'beta', type: 'test', publish: true }])
  await mcpd.waitFor(() => watcher.registrar?.status().state === 'connected', WAIT)
  await mcpd.waitFor(() => active(mcpd) === 'beta', WAIT)
  const second = watcher.registrar

  await watcher.close()
  assert.equal(second.status().state, 'stopped')
  assert.equal(watcher.registrar, null)
  assert.deepEqual(mcpd.violations, [])
})

#!/usr/bin/env node
// Republishes the providers of <configDir>/config.json whenever the file changes, as mcplocal's
// main.ts does: boot through maybeStartVirtualLlmRegistrar, then one update() per burst of writes.
//
// Run it against the dev mcpd, with the demo model standing in for every configured provider:
//
//   npx mcpctl-registrar-dev-mcpd --port 8080 --token dev-token          # in a first terminal
//   export MCPCTL_HOME="$(mktemp -d)"
//   echo '{"mcpdUrl":"http://127.0.0.1:8080","token":"dev-token"}' > "$MCPCTL_HOME/credentials"
//   echo '{"llmProviders":[{"name":"demo-llm","type":"demo","publish":true}]}' > "$MCPCTL_HOME/config.json"
//   node examples/config-watcher.mjs
//
// Then edit config.json (add an entry, set `publish: false`) and ask the dev mcpd which LLMs
// are active: curl -H 'Authorization: Bearer dev-token' http://127.0.0.1:8080/api/v1/llms.
// Ctrl-C stops. __test__/config-watcher.test.mjs runs the same steps.
import { watch } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { homedir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
// The package's own name: inside this repository Node resolves it to the package itself.
import { maybeStartVirtualLlmRegistrar, RegistrarError } from '@mcpctl/registrar'
import { createDemoProvider } from './providers.mjs'

/** config.json's provider list (`llmProviders`, absent means none); throws when the file is unreadable. */
export async function readProviderEntries(configDir) {
  const config = JSON.parse(await readFile(join(configDir, 'config.json'), 'utf8'))
  return Array.isArray(config.llmProviders) ? config.llmProviders : []
}

/**
 * Publishes the opted-in providers of <configDir>/config.json and republishes them after
 * every change of the file. `registryFor(entries)` stands for mcplocal's provider registry,
 * rebuilt from the file: a Map (or `{ get(name) }`) from an entry's name to its LlmProvider.
 * Other options (`logger`, `backoff`, ...) go to the boot hook as they are.
 * Resolves `{ registrar, close }`: `registrar` is the live one or null, `close()` stops
 * watching and stops the registrar.
 */
export async function watchProviderConfig({ configDir, registryFor, logger = console, debounceMs = 300, ...options }) {
  let registrar = null
  // The opted-in entries last handed to mcpd, as JSON: a save that leaves them as they
  // were (another setting changed, the same file written again) re-registers nothing.
  let published = null
  let closed = false
  // Boot and stop are awaited one after the other, so two bursts never boot two registrars.
  // update() is not awaited here: while mcpd is down it waits, and a later set must not
  // queue behind it (the last set wins, see update() in index.d.ts).
  let turn = Promise.resolve()

  async function republish() {
    if (closed) return
    let entries
    try {
      entries = await readProviderEntries(configDir)
    } catch (error) {
      logger.warn({ error: String(error) }, 'config.json unreadable; published set unchanged')
      return
    }
    const registry = registryFor(entries)
    const providers = entries
      .filter((entry) => entry.publish === true && registry.get(entry.name) !== undefined)
      .map((entry) => ({ ...entry, provider: registry.get(entry.name) }))
    // Every field counts, mcplocal's own too (`url`, `apiKey`): the registry built from
    // them may hold a different provider.
    const set = JSON.stringify(providers.map(({ provider, ...entry }) => entry))
    if (registrar === null) {
      // Nothing is published yet: the boot hook checks the entries and reads the credentials.
      registrar = await maybeStartVirtualLlmRegistrar({ ...options, configDir, logger, providers: entries, registry })
      published = set
      return
    }
    if (providers.length === 0) {
      // Nothing left to publish: update() refuses an empty set, stop() is the way.
      const stopping = registrar
      registrar = null
      await stopping.stop()
      return
    }
    if (set === published) {
      logger.debug({}, 'config.json saved; published set unchanged')
      return
    }
    published = set
    registrar.update(providers).then(
      () => logger.info({ providers: providers.map((entry) => entry.name) }, 'provider set published'),
      (error) => {
        // ERR_STOPPED: close() came while it waited. Anything else is a bad entry: the old
        // set stays, and the same file saved again is tried again.
        if (error instanceof RegistrarError && error.code === 'ERR_STOPPED') return
        if (published === set) published = null
        logger.warn({ error: String(error) }, 'provider set not published')
      },
    )
  }

  const schedule = () => {
    // A throwing registryFor must not end the watching: log it and wait for the next change.
    turn = turn.then(republish).catch((error) => logger.error({ error: String(error) }, 'republish failed'))
    return turn
  }

  // Watch the directory, not the file: editors save by renaming a new file over it.
  let debounce
  const watcher = watch(configDir, (_event, file) => {
    if (file !== 'config.json') return
    clearTimeout(debounce)
    debounce = setTimeout(schedule, debounceMs) // one republish per burst of writes
  })
  await schedule()

  return {
    get registrar() {
      return registrar
    },
    async close() {
      closed = true
      watcher.close()
      clearTimeout(debounce)
      await turn
      await registrar?.stop()
      registrar = null
    },
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const configDir = process.env.MCPCTL_HOME ?? join(homedir(), '.mcpctl')
  const log = (line) => console.log(`  ${line}`)
  const config = await watchProviderConfig({
    configDir,
    registryFor: (entries) => new Map(entries.map((entry) => [entry.name, createDemoProvider({ log })])),
  })
  console.log(`watching ${join(configDir, 'config.json')}; Ctrl-C stops`)
  process.once('SIGINT', () => {
    config.close().then(() => console.log('stopped'))
  })
}

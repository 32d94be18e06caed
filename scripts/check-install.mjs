#!/usr/bin/env node
// Installs the packed root package and the packed linux-x64-gnu package (with the binary
// build:dist put in npm/linux-x64-gnu/) into a scratch project, with no Rust, C compiler
// or network involved, then loads the addon and starts and stops a registrar against the
// fake mcpd from the same tarball. This is what `npm i @mcpctl/registrar` does on a
// Linux x64 machine, short of the registry resolving the optional dependency.
//
// Usage: node scripts/check-install.mjs
import { execFileSync } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('..', import.meta.url))
const platformDir = join(root, 'npm', 'linux-x64-gnu')
const { napi } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'))
const binary = join(platformDir, `${napi.binaryName}.linux-x64-gnu.node`)
if (process.platform !== 'linux' || process.arch !== 'x64') {
  console.log('check-install: only on linux x64 hosts; skipped')
  process.exit(0)
}
if (!existsSync(binary)) {
  console.error(`check-install: ${binary} is missing (run \`npm run build:dist\` first)`)
  process.exit(1)
}

const scratch = mkdtempSync(join(tmpdir(), 'registrar-install-'))
try {
  const pack = (dir) =>
    join(
      scratch,
      JSON.parse(
        execFileSync('npm', ['pack', '--json', '--pack-destination', scratch], { cwd: dir, encoding: 'utf8' }),
      )[0].filename,
    )
  const tarballs = [pack(root), pack(platformDir)]
  const project = join(scratch, 'app')
  execFileSync('mkdir', ['-p', project])
  writeFileSync(join(project, 'package.json'), '{ "name": "app", "private": true }\n')
  // Only node and npm on PATH: nothing could compile the addon if the install tried to.
  const path = [...new Set([process.execPath, execFileSync('sh', ['-c', 'command -v npm'], { encoding: 'utf8' })])]
    .map((file) => file.trim().replace(/\/[^/]+$/, ''))
    .join(':')
  const env = { ...process.env, PATH: path }
  execFileSync('npm', ['install', '--offline', '--no-audit', '--no-fund', ...tarballs], {
    cwd: project,
    env,
    stdio: 'inherit',
  })
  const smoke = `
    const { VirtualLlmRegistrar } = require('@mcpctl/registrar')
    const { FakeMcpd } = require('@mcpctl/registrar/testing')
    const provider = { complete: async () => ({ content: 'ok' }) }
    const fs = require('node:fs')
    const configDir = fs.mkdtempSync(require('node:path').join(require('node:os').tmpdir(), 'registrar-install-cfg-'))
    ;(async () => {
      const mcpd = new FakeMcpd({ token: 't' })
      const registrar = new VirtualLlmRegistrar({ mcpdUrl: await mcpd.listen(), token: 't',
        providers: [{ name: 'p', type: 'demo', provider }], configDir })
      await registrar.start()
      // start() resolves once registered; the control channel connects right after.
      await mcpd.waitFor(() => registrar.status().state === 'connected', { timeoutMs: 10000 })
      const state = registrar.status().state
      await registrar.stop()
      await mcpd.close()
      fs.rmSync(configDir, { recursive: true, force: true })
      if (state !== 'connected') throw new Error('state after start: ' + state)
      console.log('check-install: the installed package registered with the fake mcpd (state ' + state + ')')
    })().catch((error) => { console.error(error); process.exit(1) })
  `
  execFileSync(process.execPath, ['-e', smoke], { cwd: project, env, stdio: 'inherit' })
} finally {
  rmSync(scratch, { recursive: true, force: true })
}

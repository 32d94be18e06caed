// Shared fixtures for the addon's tests: a fake mcpd per test, a temporary
// config dir (never the real ~/.mcpctl), providers that record their calls,
// and a logger that captures every line.
import { mkdtemp, rm } from 'node:fs/promises'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pino from 'pino'

const require = createRequire(import.meta.url)
export const addon = require('../index.js')
export const { FakeMcpd } = require('../testing/index.js')
export const TOKEN = 'sk-test-token-0123456789'

// The command that child Nodes start through, split on whitespace like cargo's target
// runner: scripts/test-arm64.sh runs the suite on the arm64 Node under qemu-user and sets
// it to that qemu command, because the host cannot exec an arm64 binary without binfmt.
const runner = (process.env.REGISTRAR_TEST_NODE_RUNNER ?? '').split(/\s+/).filter(Boolean)

/**
 * `[command, args]` that run a child Node (this test's Node: process.execPath, which under
 * qemu-user is the arm64 node) with `args`, through REGISTRAR_TEST_NODE_RUNNER when set.
 */
export function nodeCommand(args) {
  return runner.length > 0 ? [runner[0], [...runner.slice(1), process.execPath, ...args]] : [process.execPath, args]
}

/**
 * `ms` as it applies to this run: as given natively, ten times longer when child Nodes run
 * through the emulating runner, where every Node runs JavaScript many times slower. For the
 * few waits and paces that only the emulator's speed breaks, never to loosen a native run.
 */
export function scaledMs(ms) {
  return runner.length > 0 ? ms * 10 : ms
}

/** A fake mcpd listening on loopback, closed when the test ends. */
export async function startMcpd(t, options = {}) {
  const mcpd = new FakeMcpd({ token: TOKEN, keepAliveMs: 0, ...options })
  await mcpd.listen()
  t.after(() => mcpd.close())
  return mcpd
}

/** A fresh config dir under the OS temp dir, removed when the test ends. */
export async function tempConfigDir(t) {
  const dir = await mkdtemp(join(tmpdir(), 'mcpctl-registrar-test-'))
  t.after(() => rm(dir, { recursive: true, force: true }))
  return dir
}

/** Captures every log line (pino's order: fields, msg), to assert on and to check no line carries the token. */
export function captureLogger() {
  const lines = []
  const record = (level) => (fields, msg) => lines.push({ level, msg, fields })
  return { lines, debug: record('debug'), info: record('info'), warn: record('warn'), error: record('error') }
}

/** A real pino logger at `level` writing JSON lines, each parsed into `lines`. */
export function pinoCapture(level = 'debug') {
  const lines = []
  let buffer = ''
  const stream = {
    write(chunk) {
      buffer += chunk
      for (let end = buffer.indexOf('\n'); end >= 0; end = buffer.indexOf('\n')) {
        lines.push(JSON.parse(buffer.slice(0, end)))
        buffer = buffer.slice(end + 1)
      }
    },
  }
  return { lines, logger: pino({ level }, stream) }
}

/** A provider that answers `reply(options)` and records the options it got. */
export function recordingProvider(
  reply = () => ({
    content: 'hello from the provider',
    finishReason: 'stop',
    usage: { promptTokens: 3, completionTokens: 4 },
  }),
) {
  const calls = []
  return {
    calls,
    async complete(options) {
      calls.push(options)
      return reply(options)
    },
  }
}

/** Starts a registrar against `mcpd` publishing `providers` ({ name: LlmProvider }). */
export async function startRegistrar(t, mcpd, providers, options = {}) {
  const configDir = options.configDir ?? (await tempConfigDir(t))
  const logger = options.logger ?? captureLogger()
  const registrar = new addon.VirtualLlmRegistrar({
    mcpdUrl: mcpd.url,
    token: TOKEN,
    configDir,
    logger,
    backoff: { initialMs: 50, maxMs: 200 },
    heartbeatIntervalMs: 60_000,
    providers: Object.entries(providers).map(([name, provider]) => ({
      name,
      type: 'test',
      model: `${name}-model`,
      publish: true,
      provider,
    })),
    ...options,
    ...(options.logger ? {} : { logger }),
  })
  t.after(() => registrar.stop())
  await registrar.start()
  await mcpd.waitFor(
    () => registrar.status().state === 'connected' && mcpd.connections.some((c) => c.closedAt === null),
  )
  return { registrar, configDir, logger }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

export const chatBody = (extra = {}) => ({
  model: 'local',
  messages: [{ role: 'user', content: 'Say hello' }],
  ...extra,
})

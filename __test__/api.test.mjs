// The JavaScript surface mcplocal relies on (issue 9): a pino logger gets every
// field, MCPCTL_LOG goes to the logger (stderr only without one), every error is
// a RegistrarError with a code, and options are strict.

import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import test from 'node:test'
import { fileURLToPath } from 'node:url'
import { RegistrarError as NamedExport } from '../index.js'
import {
  addon,
  captureLogger,
  chatBody,
  nodeCommand,
  pinoCapture,
  recordingProvider,
  startMcpd,
  startRegistrar,
  TOKEN,
  tempConfigDir,
} from './helpers.mjs'

const { VirtualLlmRegistrar, RegistrarError, maybeStartVirtualLlmRegistrar } = addon
const INDEX = fileURLToPath(new URL('../index.js', import.meta.url))

/** Sets MCPCTL_LOG (read when a registrar is constructed) until the test ends. */
function setLogLevel(t, level) {
  const previous = process.env.MCPCTL_LOG
  process.env.MCPCTL_LOG = level
  t.after(() => {
    if (previous === undefined) delete process.env.MCPCTL_LOG
    else process.env.MCPCTL_LOG = previous
  })
}

const provider = () => ({
  async complete() {
    return { content: 'hi' }
  },
})
const entry = (extra = {}) => ({ name: 'local', type: 'ollama', model: 'qwen2.5:7b', provider: provider(), ...extra })

async function baseOptions(t, extra = {}) {
  return {
    mcpdUrl: 'http://127.0.0.1:9',
    token: TOKEN,
    configDir: await tempConfigDir(t),
    logger: captureLogger(),
    providers: [entry()],
    ...extra,
  }
}

/** Asserts that `run()` throws (or rejects with) a RegistrarError with `code`, and returns it. */
async function expectRegistrarError(run, code, message) {
  let caught
  try {
    await run()
  } catch (error) {
    caught = error
  }
  assert.ok(caught instanceof RegistrarError, `not a RegistrarError: ${caught}`)
  assert.ok(caught instanceof Error)
  assert.equal(caught.name, 'RegistrarError')
  assert.equal(caught.code, code, caught.message)
  if (message) assert.match(caught.message, message)
  assert.ok(!caught.message.includes(TOKEN), caught.message)
  return caught
}

test('a pino logger gets the fields in its JSON lines: state, providerSessionId, taskId, status, error; never the token', async (t) => {
  const mcpd = await startMcpd(t)
  const { lines, logger } = pinoCapture()
  const failing = recordingProvider(() => {
    throw new Error('backend down')
  })
  setLogLevel(t, 'debug')
  const { registrar } = await startRegistrar(t, mcpd, { local: failing }, { logger })
  const sessionId = registrar.status().providerSessionId
  const taskId = mcpd.sendTask({ provider: 'local', body: chatBody({ model: 'local' }) })
  const outcome = await mcpd.outcome(taskId)
  assert.equal(outcome.status, 502)
  await registrar.stop()
  await mcpd.waitFor(() => lines.some((line) => line.state === 'stopped'))

  const find = (predicate, what) => {
    const line = lines.find(predicate)
    assert.ok(line, `no line with ${what} in ${JSON.stringify(lines, null, 1)}`)
    return line
  }
  // Fields first, message second: pino keeps both.
  const connected = find((line) => line.state === 'connected', 'state: connected')
  assert.equal(connected.msg, 'state changed')
  assert.equal(connected.level, 30) // info
  find((line) => line.providerSessionId === sessionId, 'providerSessionId')
  find((line) => line.taskId === taskId, 'taskId')
  find((line) => line.taskId === taskId && line.status === 502, 'the answered status')
  find((line) => typeof line.error === 'string' && line.error.includes('backend down'), 'error')
  for (const line of lines) {
    assert.equal(typeof line.msg, 'string', JSON.stringify(line))
    assert.ok(line.msg.length > 0, JSON.stringify(line))
    assert.ok(!Object.keys(line).some((key) => key.includes('_')), `snake_case field in ${JSON.stringify(line)}`)
  }
  assert.ok(!JSON.stringify(lines).includes(TOKEN))
})

/** Runs a registrar in a child process against `mcpd`, with `logger` given as source text. */
function runChild(mcpd, configDir, loggerSource, env = {}) {
  const source = `
    const { VirtualLlmRegistrar } = require(${JSON.stringify(INDEX)})
    const lines = []
    const record = (level) => (fields, msg) => lines.push({ level, fields, msg })
    const logger = ${loggerSource}
    const registrar = new VirtualLlmRegistrar({
      mcpdUrl: ${JSON.stringify(mcpd.url)}, token: ${JSON.stringify(TOKEN)}, configDir: ${JSON.stringify(configDir)},
      ...(logger ? { logger } : {}),
      providers: [{ name: 'local', type: 't', provider: { async complete() { return { content: 'hi' } } } }],
    })
    registrar.start()
      .then(() => new Promise((resolve) => setTimeout(resolve, 50)))
      .then(() => registrar.stop())
      .then(() => setTimeout(() => process.stdout.write('LINES ' + JSON.stringify(lines) + '\\n'), 50))
  `
  return new Promise((resolve, reject) => {
    const child = spawn(...nodeCommand(['-e', source]), {
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (data) => {
      stdout += data
    })
    child.stderr.on('data', (data) => {
      stderr += data
    })
    child.on('error', reject)
    child.on('close', (code) => resolve({ code, stdout, stderr }))
  })
}

test('MCPCTL_LOG output goes to the given logger only; to stderr only when there is none', async (t) => {
  const mcpd = await startMcpd(t)
  const withLogger = await runChild(
    mcpd,
    await tempConfigDir(t),
    '{ debug: record("debug"), info: record("info"), warn: record("warn"), error: record("error") }',
    { MCPCTL_LOG: 'debug' },
  )
  assert.equal(withLogger.code, 0, withLogger.stderr)
  assert.ok(!withLogger.stderr.includes('[mcpctl-registrar]'), withLogger.stderr)
  const lines = JSON.parse(withLogger.stdout.split('LINES ')[1])
  for (const state of ['registering', 'connected', 'stopped']) {
    // registering at debug; connected, reconnecting, unauthorized, stopped at info (pino's default level shows them).
    const level = state === 'registering' ? 'debug' : 'info'
    assert.ok(
      lines.some((line) => line.level === level && line.fields.state === state && line.msg === 'state changed'),
      `${state}: ${JSON.stringify(lines)}`,
    )
  }

  const withoutLogger = await runChild(mcpd, await tempConfigDir(t), 'null', { MCPCTL_LOG: 'debug' })
  assert.equal(withoutLogger.code, 0, withoutLogger.stderr)
  assert.match(withoutLogger.stderr, /\[mcpctl-registrar\] INFO state changed state="connected"/)
  assert.match(withoutLogger.stderr, /\[mcpctl-registrar\] INFO state changed .*state="stopped"/)
  assert.ok(!withoutLogger.stderr.includes(TOKEN))
})

test('console as the logger prints the message and its fields readably', async (t) => {
  const mcpd = await startMcpd(t)
  const { code, stdout, stderr } = await runChild(mcpd, await tempConfigDir(t), 'console', { MCPCTL_LOG: 'debug' })
  assert.equal(code, 0, stderr)
  const printed = stdout + stderr
  assert.match(printed, /\{ providers: 1 \} registered with mcpd/)
  assert.match(printed, /\{[^}]*state: 'connected'[^}]*\} state changed/)
  assert.ok(!printed.includes('[object Object]'), printed)
  assert.ok(!printed.includes(TOKEN))
})

test('RegistrarError is exported (CommonJS and ESM), extends Error, and carries code, status and cause', () => {
  assert.equal(NamedExport, RegistrarError)
  assert.equal(typeof RegistrarError, 'function')
  const cause = new Error('beneath')
  const error = new RegistrarError('register failed', { code: 'ERR_REGISTER_FAILED', status: 503, cause })
  assert.ok(error instanceof Error)
  assert.ok(error instanceof RegistrarError)
  assert.equal(error.name, 'RegistrarError')
  assert.equal(error.message, 'register failed')
  assert.equal(error.code, 'ERR_REGISTER_FAILED')
  assert.equal(error.status, 503)
  assert.equal(error.cause, cause)
  assert.match(error.stack, /^RegistrarError: register failed/)
  assert.ok(!('status' in new RegistrarError('x', { code: 'ERR_STOPPED' })))
})

test('no options object at all: a clear ERR_INVALID_OPTION', async () => {
  for (const args of [[], [undefined], [null]]) {
    await expectRegistrarError(() => new VirtualLlmRegistrar(...args), 'ERR_INVALID_OPTION', /needs an options object/)
  }
  await expectRegistrarError(
    () => new VirtualLlmRegistrar(42),
    'ERR_INVALID_OPTION',
    /needs an options object; got a Number/i,
  )
})

test('unknown option names are refused at every level, naming the nearest known one', async (t) => {
  const base = await baseOptions(t)
  const cases = [
    [{ mcpdURL: 'http://127.0.0.1:9' }, /unknown option `mcpdURL`: did you mean `mcpdUrl`\?/],
    [{ taskTimeout: 1000 }, /unknown option `taskTimeout`: did you mean `taskTimeoutMs`\?/],
    [{ heartbeatInterval: 1000 }, /did you mean `heartbeatIntervalMs`\?/],
    [{ maxConcurency: 2 }, /did you mean `maxConcurrency`\?/],
    [{ onStatusChange() {} }, /did you mean `onStateChange`\?/],
    [{ backoff: { initial: 10 } }, /unknown option `backoff.initial`: did you mean `backoff.initialMs`\?/],
    [{ backoff: { maxMS: 10 } }, /did you mean `backoff.maxMs`\?/],
    [
      { providers: [entry({ modle: 'x' })] },
      /unknown field `providers\[0\].modle`: did you mean `providers\[0\].model`\?/,
    ],
    [
      { providers: [entry(), entry({ name: 'b', contextwindow: 4096 })] },
      /`providers\[1\].contextwindow`: did you mean `providers\[1\].contextWindow`\?/,
    ],
    [{ somethingElse: true }, /unknown option `somethingElse`: known options: mcpdUrl, token, providers/],
  ]
  for (const [patch, pattern] of cases) {
    await expectRegistrarError(() => new VirtualLlmRegistrar({ ...base, ...patch }), 'ERR_INVALID_OPTION', pattern)
  }
})

test('option errors never carry the token, even where an option echoes it', async (t) => {
  const base = await baseOptions(t)
  const error = await expectRegistrarError(
    () => new VirtualLlmRegistrar({ ...base, mcpdUrl: `not a url ${TOKEN}` }),
    'ERR_INVALID_OPTION',
    /mcpdUrl 'not a url \*\*\*' is not a URL/,
  )
  assert.ok(!error.stack.includes(TOKEN))
})

test("provider entries may carry mcplocal's own fields", async (t) => {
  const base = await baseOptions(t)
  const registrar = new VirtualLlmRegistrar({
    ...base,
    providers: [
      entry({
        publish: true,
        description: 'd',
        contextWindow: 8192,
        url: 'http://127.0.0.1:11434',
        apiKey: 'k',
        binaryPath: '/usr/bin/x',
      }),
    ],
  })
  assert.deepEqual(registrar.status().providers, ['local'])
})

test('the boot hook refuses an unknown option too: a warning naming the nearest one, and null', async (t) => {
  const logger = captureLogger()
  const registrar = await maybeStartVirtualLlmRegistrar({
    configDir: await tempConfigDir(t),
    providers: [{ name: 'local', type: 't', publish: true }],
    registry: new Map([['local', provider()]]),
    regsitry: null,
    logger,
  })
  assert.equal(registrar, null)
  assert.ok(
    logger.lines.some((line) => line.level === 'warn' && /did you mean `registry`\?/.test(line.fields.error)),
    JSON.stringify(logger.lines),
  )
})

test('start() rejects with ERR_UNAUTHORIZED and the status on 401, without the token even when mcpd echoes it', async (t) => {
  const mcpd = await startMcpd(t)
  mcpd.failNext('register', { status: 401, body: { error: { message: `token ${TOKEN} is revoked` } } })
  const registrar = new VirtualLlmRegistrar(await baseOptions(t, { mcpdUrl: mcpd.url }))
  t.after(() => registrar.stop())
  const error = await expectRegistrarError(() => registrar.start(), 'ERR_UNAUTHORIZED', /401/)
  assert.equal(error.status, 401)
  assert.match(error.message, /token \*\*\* is revoked/)
  assert.equal(registrar.status().state, 'unauthorized')
})

test('start() rejects with ERR_REGISTER_FAILED: with the status for an HTTP error, with the cause when nobody answers', async (t) => {
  const mcpd = await startMcpd(t)
  mcpd.failNext('register', { status: 503, body: { error: { message: 'maintenance' } } })
  const refused = new VirtualLlmRegistrar(await baseOptions(t, { mcpdUrl: mcpd.url }))
  t.after(() => refused.stop())
  const error = await expectRegistrarError(() => refused.start(), 'ERR_REGISTER_FAILED', /503: maintenance/)
  assert.equal(error.status, 503)
  // It may be started again once mcpd is back.
  await refused.start()

  const { createServer } = await import('node:net')
  const server = createServer()
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address()
  await new Promise((resolve) => server.close(resolve))
  const unreachable = new VirtualLlmRegistrar(await baseOptions(t, { mcpdUrl: `http://127.0.0.1:${port}` }))
  t.after(() => unreachable.stop())
  const lost = await expectRegistrarError(() => unreachable.start(), 'ERR_REGISTER_FAILED', /no answer from mcpd/)
  assert.equal(lost.status, undefined)
  assert.ok(lost.cause instanceof Error, String(lost.cause))
  assert.ok(lost.cause.message.length > 0)
})

test('start() twice is ERR_ALREADY_STARTED; after stop() it is ERR_STOPPED', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = new VirtualLlmRegistrar(await baseOptions(t, { mcpdUrl: mcpd.url }))
  t.after(() => registrar.stop())
  const first = registrar.start()
  await expectRegistrarError(() => registrar.start(), 'ERR_ALREADY_STARTED', /already started/)
  await first
  await expectRegistrarError(() => registrar.start(), 'ERR_ALREADY_STARTED')
  await registrar.stop()
  await expectRegistrarError(() => registrar.start(), 'ERR_STOPPED', /registrar is stopped/)
})

test('the boot hook started the registrar it returns: start() is ERR_ALREADY_STARTED', async (t) => {
  const mcpd = await startMcpd(t)
  const registrar = await maybeStartVirtualLlmRegistrar({
    mcpdUrl: mcpd.url,
    token: TOKEN,
    configDir: await tempConfigDir(t),
    providers: [{ name: 'local', type: 't', publish: true }],
    registry: new Map([['local', provider()]]),
    logger: captureLogger(),
  })
  assert.ok(registrar)
  t.after(() => registrar.stop())
  await expectRegistrarError(() => registrar.start(), 'ERR_ALREADY_STARTED')
})

#!/usr/bin/env node
// The dev mcpd: a local stand-in for mcpd to demo the registrar, serving the virtual LLMs
// that registrars publish through an OpenAI-compatible API.
'use strict'

const { parseArgs } = require('node:util')
const { randomBytes } = require('node:crypto')
const { FakeMcpd } = require('../testing/fake-mcpd')

const USAGE = `usage: mcpctl-registrar-dev-mcpd [options]

  --host <addr>              address to bind (default 127.0.0.1)
  --port <n>                 port (default 0: any free port)
  --token <t>                bearer token every route requires (default: random, printed)
  --prefix <path>            path prefix of every route, e.g. /mcpd (default none)
  --heartbeat-interval <ms>  heartbeatIntervalMs told to registrars (default: theirs)
  --task-timeout <ms>        how long an OpenAI request waits for a registrar (default 120000)
  --caller <key>=<caller>    an OpenAI API key acting as a caller: <caller> is an id, or a
                             JSON object { "id", "name"?, "groups"? }; repeat for several.
                             Tasks for that key carry the caller, so a registrar's
                             allowCallers and limits see who is asking
  --quiet                    print only the listening line
  -h, --help                 this text

Point a registrar at the printed URL with the printed token, then use any OpenAI client
with baseURL <url>/v1 and apiKey <token> (no caller) or a --caller key.

  mcpctl-registrar-dev-mcpd --caller alice-key=alice \\
    --caller 'bob-key={"id":"u-2","name":"bob","groups":["ml-team"]}'`

function main() {
  let values
  try {
    ;({ values } = parseArgs({
      options: {
        host: { type: 'string', default: '127.0.0.1' },
        port: { type: 'string', default: '0' },
        token: { type: 'string' },
        prefix: { type: 'string', default: '' },
        'heartbeat-interval': { type: 'string' },
        'task-timeout': { type: 'string', default: '120000' },
        caller: { type: 'string', multiple: true, default: [] },
        quiet: { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h', default: false },
      },
      strict: true,
    }))
  } catch (error) {
    process.stderr.write(`${error.message}\n\n${USAGE}\n`)
    process.exitCode = 2
    return
  }
  if (values.help) {
    process.stdout.write(`${USAGE}\n`)
    return
  }

  const port = wholeNumber(values.port, '--port')
  const taskTimeoutMs = wholeNumber(values['task-timeout'], '--task-timeout')
  const heartbeatIntervalMs =
    values['heartbeat-interval'] === undefined
      ? undefined
      : wholeNumber(values['heartbeat-interval'], '--heartbeat-interval')
  if ([port, taskTimeoutMs, heartbeatIntervalMs].includes(null)) {
    process.exitCode = 2
    return
  }
  // A guessable default would let any local process drive the demo's LLMs.
  const token = values.token ?? `dev-${randomBytes(12).toString('hex')}`
  const callers = callerFlags(values.caller)
  if (callers === null) {
    process.exitCode = 2
    return
  }

  let mcpd
  try {
    mcpd = new FakeMcpd({
      host: values.host,
      port,
      token,
      pathPrefix: values.prefix,
      heartbeatIntervalMs,
      taskTimeoutMs,
      callers,
      log: values.quiet ? undefined : (line) => process.stderr.write(`[dev mcpd] ${line}\n`),
    })
  } catch (error) {
    // A bad --caller (a key equal to the token, a caller out of bounds) is the user's to fix.
    process.stderr.write(`dev mcpd: ${error.message}\n`)
    process.exitCode = 2
    return
  }

  let stopping = false
  const stop = (signal) => {
    if (stopping) {
      // A second Ctrl-C means "now", whatever is still draining.
      process.exit(130)
    }
    stopping = true
    if (!values.quiet) process.stderr.write(`[dev mcpd] ${signal}: shutting down\n`)
    mcpd.close().then(
      () => {
        process.off('SIGINT', stop)
        process.off('SIGTERM', stop)
      },
      (error) => {
        process.stderr.write(`[dev mcpd] close failed: ${error.message}\n`)
        process.exit(1)
      },
    )
  }
  process.on('SIGINT', stop)
  process.on('SIGTERM', stop)

  mcpd.listen().then(
    (url) => {
      process.stdout.write(`dev mcpd listening on ${url} (token: ${token})\n`)
      for (const [key, caller] of Object.entries(callers)) {
        process.stdout.write(`  API key ${key} acts as caller ${JSON.stringify(caller)}\n`)
      }
    },
    (error) => {
      process.stderr.write(`dev mcpd: cannot listen on ${values.host}:${port}: ${error.message}\n`)
      process.off('SIGINT', stop)
      process.off('SIGTERM', stop)
      process.exitCode = 1
    },
  )
}

/** `--caller key=id` or `--caller key={json}`, into FakeMcpd's `callers`; null after an error. */
function callerFlags(flags) {
  const callers = {}
  for (const flag of flags) {
    const equals = flag.indexOf('=')
    const key = equals < 0 ? '' : flag.slice(0, equals)
    const value = equals < 0 ? '' : flag.slice(equals + 1)
    if (key === '' || value === '') {
      process.stderr.write(`--caller must be <key>=<id> or <key>=<json>, got ${flag}\n`)
      return null
    }
    if (Object.hasOwn(callers, key)) {
      process.stderr.write(`--caller: the key ${key} is given twice\n`)
      return null
    }
    if (value.startsWith('{')) {
      try {
        callers[key] = JSON.parse(value)
      } catch (error) {
        process.stderr.write(`--caller ${key}: not valid JSON (${error.message})\n`)
        return null
      }
    } else {
      callers[key] = { id: value }
    }
  }
  return callers
}

function wholeNumber(text, flag) {
  const n = Number(text)
  if (!Number.isInteger(n) || n < 0) {
    process.stderr.write(`${flag} must be a whole number, got ${text}\n`)
    return null
  }
  return n
}

main()

#!/usr/bin/env node
// Checks that every repository file the docs cite exists: relative Markdown links (and their
// #anchors), and words that look like repository paths (`src/sse.rs`, scripts/test.mjs).
// Usage: node scripts/check-doc-paths.mjs   (exits non-zero, listing them, when any is missing)
import { spawnSync } from 'node:child_process'
import { existsSync, readdirSync, readFileSync } from 'node:fs'
import { basename, dirname, join, normalize } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('..', import.meta.url))
const DOCS = [
  'README.md',
  'CONTRIBUTING.md',
  'docs/design.md',
  'docs/benchmark.md',
  'docs/protocol.md',
  'examples/README.md',
]
/** Files of the user's config dir (~/.mcpctl) that the docs name; not part of the repository. */
const USER_FILES = new Set(['config.json', 'credentials', 'provider-session'])

const git = (...args) => spawnSync('git', args, { cwd: root, encoding: 'utf8' })
const tracked = new Set(
  git('ls-files')
    .stdout.split('\n')
    .filter(Boolean)
    .map((file) => basename(file)),
)
const topLevel = new Set(readdirSync(root))
const exists = (path) => existsSync(join(root, path))
/** A build output the docs name (bench/.build/) is ignored by git, not missing. */
const ignored = (path) => git('check-ignore', '-q', path).status === 0

/** GitHub's heading anchors: lower case, punctuation dropped, spaces as dashes. */
function anchorsOf(doc) {
  const text = readFileSync(join(root, doc), 'utf8').replace(/```[\s\S]*?```/g, '')
  return new Set(
    [...text.matchAll(/^#+ (.+)$/gm)].map(([, heading]) =>
      heading
        .trim()
        .toLowerCase()
        .replace(/[^\w\- ]/g, '')
        .replaceAll(' ', '-'),
    ),
  )
}

const missing = []
let checked = 0
for (const doc of DOCS) {
  if (!exists(doc)) {
    missing.push(`${doc}: the document itself`)
    continue
  }
  const text = readFileSync(join(root, doc), 'utf8')
  const prose = text.replace(/```[\s\S]*?```/g, '')
  for (const [, target] of prose.matchAll(/\]\(([^)\s]+)\)/g)) {
    if (/^[a-z]+:/.test(target)) continue
    const [path, anchor] = target.split('#')
    const file = path === '' ? doc : normalize(join(dirname(doc), path))
    checked++
    if (!exists(file)) missing.push(`${doc}: link ${target}`)
    else if (anchor !== undefined && file.endsWith('.md') && !anchorsOf(file).has(anchor))
      missing.push(`${doc}: anchor ${target}`)
  }
  // Words that start with a top-level entry of the repository and go on with a slash.
  for (const [, word] of text.matchAll(/(?<![\w./<@~-])((?:\.?[\w-]+\/)+[\w.*-]*)/g)) {
    const path = word.replace(/[.,:;]+$/, '')
    const first = path.split('/')[0]
    if (!topLevel.has(first) || first === 'node_modules' || first === 'target' || /[*<]/.test(path)) continue
    checked++
    if (!exists(path) && !ignored(path)) missing.push(`${doc}: path ${path}`)
  }
  // File names in backticks (`provider_bridge.js`): some tracked file has that name.
  for (const [, name] of text.matchAll(/`([\w.-]+\.(?:rs|mjs|js|ts|md|json|sh|toml))`/g)) {
    if (USER_FILES.has(name)) continue
    checked++
    if (!tracked.has(name) && !exists(name)) missing.push(`${doc}: file ${name}`)
  }
}

for (const line of missing) console.error(`missing: ${line}`)
console.log(`check-doc-paths: ${checked} citations in ${DOCS.length} documents, ${missing.length} missing`)
process.exit(missing.length === 0 ? 0 : 1)

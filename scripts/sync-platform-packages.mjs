#!/usr/bin/env node
// Keeps the per-platform packages in npm/ in step with the root package.json: the same
// version, description, license, engines, repository, homepage, bugs and publishConfig,
// and a copy of LICENSE. `--check` changes nothing and fails when a file is out of step.
import { readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('..', import.meta.url))
const check = process.argv.includes('--check')
const rootPackage = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'))
const license = readFileSync(join(root, 'LICENSE'), 'utf8')

const shared = ['version', 'description', 'keywords', 'license', 'homepage', 'bugs', 'engines', 'publishConfig']

let stale = 0
for (const dir of readdirSync(join(root, 'npm')).sort()) {
  const packagePath = join(root, 'npm', dir, 'package.json')
  const before = readFileSync(packagePath, 'utf8')
  const pkg = JSON.parse(before)
  for (const key of shared) pkg[key] = rootPackage[key]
  // npm provenance and the registry's "Repository" link point at the folder the package comes from.
  pkg.repository = { ...rootPackage.repository, directory: `npm/${dir}` }
  const after = `${JSON.stringify(pkg, null, 2)}\n`
  const licensePath = join(root, 'npm', dir, 'LICENSE')
  let licenseBefore = ''
  try {
    licenseBefore = readFileSync(licensePath, 'utf8')
  } catch {}
  for (const [path, old, next] of [
    [packagePath, before, after],
    [licensePath, licenseBefore, license],
  ]) {
    if (old === next) continue
    stale++
    if (check) console.error(`out of step with the root package: ${path}`)
    else writeFileSync(path, next)
  }
}
if (check && stale > 0) {
  console.error('run `node scripts/sync-platform-packages.mjs` and commit the result')
  process.exit(1)
}
console.log(check ? 'npm/* packages in step with package.json' : `npm/* packages: ${stale} file(s) written`)

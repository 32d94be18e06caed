// Any JavaScript string a provider answers reaches the official `openai` client as the
// same text, except lone UTF-16 surrogates (which no JSON parser turns into a Rust or
// UTF-8 string), replaced by U+FFFD chunk by chunk, as String.prototype.toWellFormed()
// does (docs/protocol.md, "Streaming"). A sample, through finalChatCompletion(), of what
// tests/properties.rs checks on the encoder in Rust.

import assert from 'node:assert/strict'
import test from 'node:test'
import { startMcpd, startRegistrar } from './helpers.mjs'
import { openAiClient } from './providers.mjs'

const messages = [{ role: 'user', content: 'hi' }]

/** Strings of random UTF-16 code units, surrogates (paired or not) and JSON's specials included, from a fixed seed. */
function randomTexts(count, seed = 19) {
  let state = seed
  const next = () => {
    state = (state * 1_103_515_245 + 12_345) % 2 ** 31
    return state
  }
  const specials = [0x0, 0x1f, 0x22, 0x5c, 0x2028, 0xfeff, 0xd800, 0xdbff, 0xdc00, 0xdfff, 0xd83d, 0xde00]
  const texts = []
  for (let i = 0; i < count; i++) {
    const units = []
    const length = next() % 12
    for (let j = 0; j < length; j++) {
      units.push(next() % 3 === 0 ? specials[next() % specials.length] : next() % 0x10000)
    }
    texts.push(String.fromCharCode(...units))
  }
  return texts
}

const FIXED = [
  'plain',
  'é😀 e\u0301',
  '\u2028\u2029\u0000\u001f"\\',
  'lone high \ud800!',
  'lone low \udc00!',
  'reversed \udc00\ud800',
  'pair \ud83d\ude00',
]

test('any string a provider streams is what finalChatCompletion() reads, lone surrogates as U+FFFD', async (t) => {
  const mcpd = await startMcpd(t)
  const chunks = [...FIXED, ...randomTexts(300)]
  await startRegistrar(t, mcpd, {
    local: {
      complete: async () => ({ content: 'unused' }),
      async *stream() {
        for (const content of chunks) yield { content }
        yield { finishReason: 'stop' }
      },
    },
  })
  const final = await openAiClient(mcpd).chat.completions.stream({ model: 'local', messages }).finalChatCompletion()
  const expected = chunks.map((chunk) => chunk.toWellFormed()).join('')
  assert.equal(final.choices[0].message.content, expected)
  assert.equal(final.choices[0].finish_reason, 'stop')
})

test('any string a provider completes with is what create() reads, lone surrogates as U+FFFD', async (t) => {
  const mcpd = await startMcpd(t)
  const texts = [...FIXED, ...randomTexts(20, 7)]
  let next = 0
  await startRegistrar(t, mcpd, { local: { complete: async () => ({ content: texts[next++] }) } })
  const client = openAiClient(mcpd)
  for (const text of texts) {
    const completion = await client.chat.completions.create({ model: 'local', messages })
    assert.equal(completion.choices[0].message.content, text.toWellFormed(), JSON.stringify(text))
  }
})

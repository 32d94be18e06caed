// The OpenAI request → CompletionOptions mapping both plain-Node peers of the bench use
// (plain-registrar.mjs, seed-registrar.mjs), as the addon's src/openai.rs makes them.

export function completionOptions(body, model, signal) {
  const options = { messages: body.messages.map(toMessage), request: body, signal }
  if (model !== undefined) options.model = model
  if (body.temperature !== undefined) options.temperature = body.temperature
  const maxTokens = body.max_tokens ?? body.max_completion_tokens
  if (maxTokens !== undefined) options.maxTokens = maxTokens
  if (body.top_p !== undefined) options.topP = body.top_p
  if (body.stop !== undefined) options.stop = Array.isArray(body.stop) ? body.stop : [body.stop]
  if (body.tools !== undefined) options.tools = body.tools
  if (body.tool_choice !== undefined) options.toolChoice = body.tool_choice
  if (body.response_format !== undefined) options.responseFormat = body.response_format
  if (body.seed !== undefined) options.seed = body.seed
  return options
}

function toMessage(message) {
  const out = { role: message.role, content: message.content ?? null }
  if (message.name !== undefined) out.name = message.name
  if (message.tool_call_id !== undefined) out.toolCallId = message.tool_call_id
  if (message.tool_calls !== undefined) out.toolCalls = message.tool_calls
  return out
}

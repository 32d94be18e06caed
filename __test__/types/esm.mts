// A strict ESM consumer of the packed package: `import` of the main entry and of ./testing.
import {
  type CompletionChunk,
  type CompletionOptions,
  type LlmProvider,
  maybeStartVirtualLlmRegistrar,
  type RegistrarStatus,
  VirtualLlmRegistrar,
} from '@mcpctl/registrar'
import { FakeMcpd } from '@mcpctl/registrar/testing'

const provider: LlmProvider = {
  async complete(options: CompletionOptions) {
    options.signal.throwIfAborted()
    return { content: `echo: ${options.messages.length}`, finishReason: 'stop' }
  },
  async *stream(): AsyncIterable<CompletionChunk> {
    yield { content: 'hi' }
    yield { finishReason: 'stop' }
  },
}

export async function run(): Promise<RegistrarStatus> {
  const mcpd = new FakeMcpd({ token: 't', callers: { 'alice-key': { id: 'u-1', groups: ['ml-team'] } } })
  const url: string = await mcpd.listen()
  const registrar = new VirtualLlmRegistrar({
    mcpdUrl: url,
    token: 't',
    providers: [{ name: 'p', type: 'demo', provider }],
    onStateChange: (status) => console.log(status.state),
  })
  await registrar.start()
  const taskId = mcpd.sendTask({ provider: 'p', body: { messages: [] }, caller: { id: 'u-2' } })
  const outcome = await mcpd.outcome(taskId)
  const retryAfter: string | undefined = outcome.kind === 'result' ? outcome.headers?.['retry-after'] : undefined
  console.log(retryAfter)
  const status = registrar.status()
  await registrar.stop()
  await mcpd.close()
  const none: VirtualLlmRegistrar | null = await maybeStartVirtualLlmRegistrar({
    providers: [],
    registry: new Map<string, LlmProvider>(),
  })
  await none?.stop()
  return status
}

// A strict CommonJS consumer of the packed package: `require` of the main entry and of ./testing.
import registrar = require('@mcpctl/registrar')
import testing = require('@mcpctl/registrar/testing')

const provider: registrar.LlmProvider = {
  complete: async (options) => ({ content: options.model ?? null, usage: { promptTokens: 1, completionTokens: 1 } }),
}

export async function run(): Promise<registrar.RegistrarState> {
  const mcpd = new testing.FakeMcpd()
  const r = new registrar.VirtualLlmRegistrar({
    mcpdUrl: await mcpd.listen(),
    token: 'test-token',
    providers: [{ name: 'p', type: 'demo', provider }],
  })
  await r.start()
  const { state } = r.status()
  await r.stop()
  await mcpd.close()
  return state
}

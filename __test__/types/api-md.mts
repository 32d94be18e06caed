// The package's types against the JavaScript contract mcplocal is written to (the
// "API.md" document of the mcpctl project, not in this repository), copied here as it is written
// there (its top part, and of its "Additions" what is built so far): each pair must be assignable both ways (a stricter or looser index.d.ts
// fails), and no public declaration may be `any`.
import type * as Pkg from '@mcpctl/registrar'
import type { maybeStartVirtualLlmRegistrar, VirtualLlmRegistrar } from '@mcpctl/registrar'

declare namespace Api {
  // What mcplocal already has: one LlmProvider per configured provider.
  export interface LlmProvider {
    readonly name?: string
    complete(options: CompletionOptions): Promise<CompletionResult>
    /** Optional. When present, streaming tasks relay each chunk as it comes. */
    stream?(options: CompletionOptions): AsyncIterable<CompletionChunk>
  }

  export interface ChatMessage {
    role: 'system' | 'user' | 'assistant' | 'tool' | 'developer'
    content: string | ContentPart[] | null
    name?: string
    toolCallId?: string
    toolCalls?: ToolCall[]
  }
  export type ContentPart =
    | { type: 'text'; text: string }
    | { type: 'image_url'; imageUrl: { url: string; detail?: string } }
  export interface ToolCall {
    id: string
    type: 'function'
    function: { name: string; arguments: string }
  }
  export interface ToolDefinition {
    type: 'function'
    function: { name: string; description?: string; parameters?: Record<string, unknown> }
  }

  export interface CompletionOptions {
    messages: ChatMessage[]
    model?: string
    temperature?: number
    maxTokens?: number
    topP?: number
    stop?: string[]
    tools?: ToolDefinition[]
    toolChoice?: 'auto' | 'none' | 'required' | { type: 'function'; function: { name: string } }
    responseFormat?: Record<string, unknown>
    seed?: number
    presencePenalty?: number
    frequencyPenalty?: number
    user?: string
    // `model` is the entry's configured model (LlmProviderFileEntry.model), absent when
    // it has none: never the virtual LLM's name, which stays in `request.model`.
    /** The OpenAI request as mcpd sent it, for providers that forward it as is. */
    request: Record<string, unknown>
    /** Fires when mcpd cancels the task, it times out, or the registrar stops. */
    signal: AbortSignal
  }

  export interface Usage {
    promptTokens: number
    completionTokens: number
    totalTokens?: number
  }
  export interface CompletionResult {
    content: string | null
    toolCalls?: ToolCall[]
    finishReason?: 'stop' | 'length' | 'tool_calls' | 'content_filter'
    usage?: Usage
    model?: string
  }
  export interface CompletionChunk {
    content?: string
    toolCalls?: Array<{ index: number; id?: string; function?: { name?: string; arguments?: string } }>
    finishReason?: 'stop' | 'length' | 'tool_calls' | 'content_filter'
    usage?: Usage
  }

  /** One entry of ~/.mcpctl/config.json's provider list, as mcplocal reads it. */
  export interface LlmProviderFileEntry {
    name: string
    type: string
    model?: string
    publish?: boolean // default false
    description?: string
    contextWindow?: number
  }

  /** pino's argument order, fields first: a pino or Fastify logger is passed as is,
   *  and its JSON lines carry every field; `console` prints both. */
  export interface Logger {
    debug(fields: Record<string, unknown>, msg: string): void
    info(fields: Record<string, unknown>, msg: string): void
    warn(fields: Record<string, unknown>, msg: string): void
    error(fields: Record<string, unknown>, msg: string): void
  }

  export interface RegistrarOptions {
    mcpdUrl: string
    token: string
    providers: Array<LlmProviderFileEntry & { provider: LlmProvider }> // the ones to publish
    configDir?: string // default $MCPCTL_HOME or ~/.mcpctl
    heartbeatIntervalMs?: number // default 30000
    idleTimeoutMs?: number // default 60000; 0 disables
    backoff?: { initialMs?: number; maxMs?: number } // default 5000 / 60000
    taskTimeoutMs?: number // default 600000
    maxConcurrency?: number // per provider, default 4
    maxQueue?: number // per provider, default 64
    allowInsecureHttp?: boolean // plain http to a non-loopback host; default false
    logger?: Logger
    onStateChange?: (status: RegistrarStatus) => void
  }

  export type RegistrarState = 'idle' | 'registering' | 'connected' | 'reconnecting' | 'unauthorized' | 'stopped'

  export interface RegistrarStatus {
    state: RegistrarState
    providerSessionId: string | null
    providers: string[]
    inFlight: number
    queued: number
    completed: number
    failed: number
    cancelled: number // received = completed + failed + cancelled + inFlight + queued
    reconnects: number
    lastError: string | null
  }

  export class VirtualLlmRegistrar {
    constructor(options: RegistrarOptions)
    /** Registers, persists the session id, opens the channel, starts the heartbeat.
     *  Resolves once the channel is open (state `connected`), so a task that mcpd sends
     *  from then on is run. Rejects with a RegistrarError when the first register fails
     *  (`code` 'ERR_REGISTER_FAILED' or 'ERR_UNAUTHORIZED', with `status`). */
    start(): Promise<void>
    /** Replaces the published set without a restart (docs/protocol.md section 1,
     *  "Changing the set"): re-registers under the same session id; tasks in flight
     *  for a provider that left run to their end; later ones for it are answered 404.
     *  Resolves once mcpd has accepted the new set. */
    update(providers: RegistrarOptions['providers']): Promise<void>
    /** Stops taking tasks, aborts in-flight ones (answered 503), closes the channel,
     *  clears timers. Idempotent. Afterwards nothing keeps the Node process alive. */
    stop(): Promise<void>
    status(): RegistrarStatus
    pause(options?: { provider?: string; drain?: boolean }): Promise<void>
    resume(options?: { provider?: string }): void
    usage(): UsageReport
    metrics(): string
  }

  // Additions: the owner's controls (API.md "Additions"), as far as they are built.
  /** Who sent the request to mcpd (PROTOCOL.md section 5), when mcpd says so. */
  export interface Caller {
    id: string
    name?: string
    groups?: string[]
  }
  export interface CompletionOptions {
    /** Absent when mcpd sent no caller. */
    caller?: Caller
    /** W3C trace context for the provider's own outgoing calls: a child of the
     *  registrar's span for this task when spans are recorded, else mcpd's context as
     *  sent; absent when mcpd sent none and no span is recorded. */
    trace?: { traceparent: string; tracestate?: string }
  }
  export interface PublishLimits {
    maxOutputTokens?: number
    maxRequestBytes?: number
    requestsPerMinute?: number
    tokensPerMinute?: number
    tokensPerDay?: number
    perCaller?: { requestsPerMinute?: number; tokensPerMinute?: number; tokensPerDay?: number }
  }
  export interface LlmProviderFileEntry {
    allowCallers?: string[]
    limits?: PublishLimits
    /** What a remote caller sees of this provider's failures; default 'message'. */
    errorDetail?: 'message' | 'generic'
  }
  export interface ProviderUsage {
    tasks: number
    promptTokens: number
    completionTokens: number
    refused: Record<
      | 'caller_not_allowed'
      | 'requests_per_minute'
      | 'tokens_per_minute'
      | 'tokens_per_day'
      | 'max_tokens_exceeded'
      | 'request_too_large'
      | 'provider_paused'
      | 'queue_full',
      number
    >
  }
  export interface UsageReport {
    since: string
    providers: Record<string, ProviderUsage>
    callers: Record<string, ProviderUsage>
  }
  export interface RegistrarStatus {
    paused: string[]
  }

  // Additions: the audit log (API.md "Additions").
  export interface AuditOptions {
    /** One JSON line per task that reached the registrar, written when it ends. */
    path?: string // default <configDir>/audit.jsonl; created 0600
    maxBytes?: number // default 10 MiB; then rotated to .1, .2, ...
    keep?: number // rotated files kept, default 5
    /** Also write the request's messages and the answer's text. Default false:
     *  by default no prompt or completion text is written anywhere. */
    content?: boolean
  }
  export interface RegistrarOptions {
    audit?: AuditOptions | false // default false (no audit file)
  }
  /** One line of the audit log (camelCase; times in ms, `time` as ISO 8601). No line for
   *  a refused task id or a replay. The package may add fields. */
  export interface AuditRecord {
    time: string
    taskId: string
    provider: string
    callerId?: string
    requestModel?: string
    responseModel?: string
    stream: boolean
    outcome: 'completed' | 'failed' | 'cancelled'
    status: number
    refused?: string
    promptTokens?: number
    completionTokens?: number
    queueMs?: number
    timeToFirstTokenMs?: number
    durationMs: number
    traceId?: string
    messages?: unknown
    content?: string | null // only with `content: true`
  }

  /** mcplocal's boot hook. Resolves null (after a logger.warn) when no provider is
   *  opted in, none of the opted-in ones is in the registry, or the credentials
   *  file (<configDir>/credentials: { "mcpdUrl": string, "token": string }) is
   *  missing or unreadable. Never rejects: a failed first register is logged and
   *  retried in the background with backoff. */
  export function maybeStartVirtualLlmRegistrar(
    options: {
      providers: LlmProviderFileEntry[]
      registry: Map<string, LlmProvider> | { get(name: string): LlmProvider | undefined }
    } & Partial<Omit<RegistrarOptions, 'providers'>>,
  ): Promise<VirtualLlmRegistrar | null>
}

type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false
type IsAny<T> = 0 extends 1 & T ? true : false
type Yes<T extends true> = T
type No<T extends false> = T

export type Checks = [
  Yes<Same<Pkg.LlmProvider, Api.LlmProvider>>,
  Yes<Same<Pkg.ChatMessage, Api.ChatMessage>>,
  Yes<Same<Pkg.ContentPart, Api.ContentPart>>,
  Yes<Same<Pkg.ToolCall, Api.ToolCall>>,
  Yes<Same<Pkg.ToolDefinition, Api.ToolDefinition>>,
  Yes<Same<Pkg.CompletionOptions, Api.CompletionOptions>>,
  Yes<Same<Pkg.Usage, Api.Usage>>,
  Yes<Same<Pkg.CompletionResult, Api.CompletionResult>>,
  Yes<Same<Pkg.CompletionChunk, Api.CompletionChunk>>,
  Yes<Same<Pkg.LlmProviderFileEntry, Api.LlmProviderFileEntry>>,
  Yes<Same<Pkg.Logger, Api.Logger>>,
  Yes<Same<Pkg.RegistrarOptions, Api.RegistrarOptions>>,
  Yes<Same<Pkg.RegistrarState, Api.RegistrarState>>,
  Yes<Same<Pkg.RegistrarStatus, Api.RegistrarStatus>>,
  Yes<Same<Pkg.Caller, Api.Caller>>,
  Yes<Same<Required<Pkg.PublishLimits>, Required<Api.PublishLimits>>>,
  Yes<Same<Pkg.ProviderUsage, Api.ProviderUsage>>,
  Yes<Same<Pkg.UsageReport, Api.UsageReport>>,
  Yes<Same<Required<Pkg.AuditOptions>, Required<Api.AuditOptions>>>,
  Yes<Same<Required<Pkg.AuditRecord>, Required<Api.AuditRecord>>>,
  Yes<Same<VirtualLlmRegistrar, Api.VirtualLlmRegistrar>>,
  Yes<
    Same<ConstructorParameters<typeof Pkg.VirtualLlmRegistrar>, ConstructorParameters<typeof Api.VirtualLlmRegistrar>>
  >,
  Yes<Same<typeof maybeStartVirtualLlmRegistrar, typeof Api.maybeStartVirtualLlmRegistrar>>,
  // Optional fields and unions spelled out, where assignability alone is lenient.
  Yes<Same<Required<Pkg.RegistrarOptions>, Required<Api.RegistrarOptions>>>,
  Yes<Same<Required<Pkg.CompletionOptions>, Required<Api.CompletionOptions>>>,
  Yes<Same<Required<Pkg.CompletionChunk>, Required<Api.CompletionChunk>>>,
  Yes<Same<Required<Pkg.CompletionResult>, Required<Api.CompletionResult>>>,
  Yes<Same<Required<Pkg.LlmProviderFileEntry>, Required<Api.LlmProviderFileEntry>>>,
  No<IsAny<Pkg.CompletionOptions['request']>>,
  No<IsAny<Pkg.RegistrarOptions['providers']>>,
  No<IsAny<ReturnType<VirtualLlmRegistrar['status']>>>,
]

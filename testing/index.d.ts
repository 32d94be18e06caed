// Types of @mcpctl/registrar/testing: the fake mcpd that the registrar's tests run against,
// which is also the engine of the `mcpctl-registrar-dev-mcpd` command.

import type { Caller } from '../index'

/** The registrar-facing routes that can be scripted with `failNext` and `delay`. */
export type FakeMcpdRoute = 'register' | 'heartbeat' | 'stream' | 'result' | 'chunks'

/** Request headers as Node gives them: lower-cased names. */
export type RecordedHeaders = Record<string, string | string[] | undefined>

export interface FakeMcpdOptions {
  /** The bearer token every route accepts. Default `'test-token'`. */
  token?: string
  /** Every route lives under it (e.g. `'/mcpd'`), and `url` includes it. Default `''`. */
  pathPrefix?: string
  /** When set, returned as `heartbeatIntervalMs` in every register answer. */
  heartbeatIntervalMs?: number
  /** Interval of `: keep-alive` comments on registrar streams; 0 disables. Default 15000. */
  keepAliveMs?: number
  /** How long an OpenAI-side request waits for the registrar before 504 and `cancel`. Default 120000. */
  taskTimeoutMs?: number
  /** Default `'127.0.0.1'`. */
  host?: string
  /** Default 0: any free port. */
  port?: number
  /** Makes the ids of new sessions; default `ps-<uuid>`. */
  sessionIdFactory?: () => string
  /** Receives one line per notable event (registrations, connects, tasks, violations). */
  log?: (line: string) => void
  /**
   * Extension: API keys of the OpenAI front (`/v1/...`, `/api/v1/llms`), each mapped to the
   * caller that mcpd attaches to the tasks it sends for a request with that key, so a test or
   * a user can act as several people: `{ 'alice-key': { id: 'u-1', name: 'alice' } }`. The
   * callers are checked against the bounds of docs/protocol.md section 6. These
   * keys open the OpenAI front only, never the registrar routes; the registrar token still
   * works there and sends no caller. A key that is empty, holds whitespace or equals `token`,
   * or a caller outside those bounds, throws a TypeError.
   */
  callers?: Record<string, Caller>
}

export interface RecordedRequest {
  method: string
  /** Without the path prefix and without the query. */
  path: string
  query: Record<string, string>
  headers: RecordedHeaders
  /** Parsed JSON when the body is JSON, else the raw text (`''` when empty). */
  body: unknown
  /** The body as it arrived (UTF-8 text), for checks on the exact bytes. */
  raw: string
  /** `Date.now()` at arrival. */
  at: number
}

/** A register or heartbeat request, recorded whether it was answered normally or by a scripted failure. */
export interface RecordedPost {
  headers: RecordedHeaders
  body: unknown
  at: number
}

export interface RecordedConnection {
  headers: RecordedHeaders
  sessionId: string | null
  /** The `Last-Event-ID` header, or null. */
  lastEventId: string | null
  /** The status answered (200 for an open stream). */
  status: number
  openedAt: number
  /** null while the stream is open. */
  closedAt: number | null
}

/** A provider entry as the registrar registered it. */
export interface RegisteredProvider {
  name: string
  type: string
  model?: string
  description?: string
  contextWindow?: number
  [field: string]: unknown
}

export interface FakeSession {
  /**
   * The session's current set: its last register's providers. A register under a known id
   * replaces it ("Changing the set", docs/protocol.md section 1); names that left it are listed
   * as inactive by `/api/v1/llms` and get no more tasks from the OpenAI front.
   */
  providers: RegisteredProvider[]
  /** True while at least one stream of this session is open. */
  connected: boolean
  /** Tasks sent to this session and not yet ended by a result, a `[DONE]` or a cancel. */
  inFlight: number
}

interface FailureTiming {
  /** How many consecutive requests on the route get this answer. Default 1. */
  times?: number
  /** Extra latency before this answer, on top of `delay(route, ms)`. */
  delayMs?: number
  /**
   * Extension: the answer also waits until this settles, so a test can look at the world
   * while the request is held in flight (and `close()` still ends the wait).
   */
  until?: PromiseLike<unknown>
}

/**
 * A scripted answer. By default the request is answered with it instead of being handled
 * (a failed result or chunk POST is not recorded as received, so its retry can deliver it).
 */
export type FailureScript = FailureTiming &
  (
    | {
        status: number
        /** An object is sent as JSON, a string as text/plain. Default: an OpenAI error body. */
        body?: unknown
        destroy?: false
        /**
         * Extension: handle the request normally (record it, apply it) but answer with this
         * instead, as when the real answer is lost; not for 'stream'.
         */
        handle?: boolean
      }
    | {
        /** Extension: destroy the socket instead of answering (a connection error for the client). */
        destroy: true
        status?: number
        body?: unknown
        handle?: boolean
      }
  )

export interface SendTaskOptions {
  provider: string
  /** An OpenAI chat.completions request. */
  body: Record<string, unknown>
  /** Default `!!body.stream`. */
  stream?: boolean
  /** Default `t-<n>`. Re-sending a known id re-sends the event without counting a new task. */
  taskId?: string
  /** Written as the event's `id:` line. */
  eventId?: string | number
  /** Default: the least loaded connected session publishing `provider`, else any connected one. */
  sessionId?: string
  /**
   * Extension: sent as the frame's `caller`, as given and unchecked, so a test may send a
   * malformed one on purpose (a registrar treats that as absent). Absent when undefined.
   */
  caller?: unknown
  /**
   * Extension: sent as the frame's `traceparent` and `tracestate` (docs/protocol.md, "Trace
   * context"), as given and unchecked, so a test may send a malformed one. Absent when
   * undefined. Tasks made by the OpenAI front carry the client's `traceparent` header when
   * it is valid, else a fresh one; each result and chunk POST's headers are in `requests`.
   */
  traceparent?: unknown
  tracestate?: unknown
}

export type TaskOutcome =
  /**
   * `headers`: the result POST's `headers`, when it carried any (docs/protocol.md section 6). The OpenAI
   * front relays to its client only `retry-after` in delta-seconds; a missing `retry-after` on a
   * limit's 429, one on a 503 `provider_paused`, or a malformed header is a violation.
   */
  | { kind: 'result'; status: number; body: unknown; headers?: Record<string, string> }
  /** `payloads` in order, repeats from retried POSTs removed, ending with `'[DONE]'`; `posts` counts chunk POSTs. */
  | { kind: 'stream'; payloads: string[]; posts: number }
  /** Extension: the task was cancelled by mcpd (`cancel`, a client gone, a timeout) before it ended. */
  | { kind: 'cancelled' }

export interface ChunkPost {
  seq: number
  chunks: string[]
  at: number
}

export interface WaitForOptions {
  /** Default 5000. */
  timeoutMs?: number
  /** Default 10. */
  intervalMs?: number
}

type Truthy<T> = Exclude<T, false | 0 | 0n | '' | null | undefined>

export class FakeMcpd {
  constructor(options?: FakeMcpdOptions)

  /** Every request, in arrival order (unauthorized ones included). */
  readonly requests: RecordedRequest[]
  readonly registrations: RecordedPost[]
  readonly heartbeats: RecordedPost[]
  readonly connections: RecordedConnection[]
  /** Every protocol violation the registrar committed, as `'<what>: <details>'`; tests assert it stays empty. */
  readonly violations: string[]
  readonly sessions: Map<string, FakeSession>
  /** The base url, prefix included; null before `listen()` resolved. */
  readonly url: string | null

  /** Resolves the base url, e.g. `'http://127.0.0.1:40123/mcpd'`. */
  listen(): Promise<string>
  /** Ends every stream and pending OpenAI answer and closes the server. Idempotent; leaves no handle open. */
  close(): Promise<void>

  failNext(route: FakeMcpdRoute, script: FailureScript): void
  /** Adds latency to every answer on that route; 0 clears it. */
  delay(route: FakeMcpdRoute, ms: number): void
  /** The id becomes unknown: stream connect and heartbeat answer 404, register with it gets a new id. */
  forgetSession(id: string): void
  /** Destroys every open registrar stream's socket, as a crash would. */
  dropStreams(): void
  /** Writes one SSE event to every open registrar stream; returns how many streams got it. */
  sendEvent(event: string, data: unknown, options?: { id?: string | number }): number
  /** Writes raw bytes to every open registrar stream; returns how many streams got them. */
  sendRaw(bytes: string | Uint8Array): number
  /** Sends `event: task`; returns the task id. Throws when no suitable session has an open stream. */
  sendTask(options: SendTaskOptions): string
  /** Sends `event: cancel` `{ taskId }` to every open stream and ends the task. */
  cancel(taskId: string): void
  /** Resolves when the task ended; rejects after `timeoutMs` (default 10000) or when the fake is closed first. */
  outcome(taskId: string, options?: { timeoutMs?: number }): Promise<TaskOutcome>
  /** Every accepted chunk POST for the task, repeats included. */
  chunkPosts(taskId: string): ChunkPost[]
  /** Polls `predicate` until it returns something truthy, and resolves that. */
  waitFor<T>(predicate: () => T | PromiseLike<T>, options?: WaitForOptions): Promise<Truthy<Awaited<T>>>
}

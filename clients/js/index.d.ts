// Types of the eventgate client (index.js).

/** One of the six event types of the contract. */
export type EventType =
  | 'message.exchange'
  | 'message.status'
  | 'call.update'
  | 'group.flow'
  | 'instance.state'
  | 'label.update';

export declare const EVENT_TYPES: readonly EventType[];

export declare const CloseCodes: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  INVALID_UTF8: 1007;
  MESSAGE_TOO_BIG: 1009;
  HEARTBEAT_TIMEOUT: 4001;
  INSTANCE_DELETED: 4004;
  SLOW_CONSUMER: 4008;
}>;

/** What every client receives for one event (contract §1; `offset`/`epoch` with a history, §12). */
export interface Envelope<D = Record<string, unknown>> {
  event: EventType;
  data: D;
  instanceData: { baseUrl: string; instance: string; token: string };
  offset?: number;
  epoch?: string;
}

/** Per-event information the client adds. */
export interface EventMeta {
  /** True for events replayed from the gateway's history after a reconnection. */
  replayed: boolean;
}

/** Where the client stands in an instance's numbering (§12). */
export interface Position {
  epoch: string;
  offset: number;
}

export interface RateLimit {
  limit: number;
  remaining: number;
  /** Unix seconds when the window ends. */
  reset: number;
}

/** The reason given when an upgrade fails although a plain request passes every check (most likely the Origin allowlist). */
export declare const ORIGIN_SUSPECTED: string;
export declare const UPGRADE_REFUSED: string;

export declare class EventGateError extends Error {
  constructor(status: number, message: string, extra?: { details?: string; rateLimit?: RateLimit; retryAfter?: number });
  /** HTTP status; 0 when the gateway could not be reached. */
  status: number;
  /** The contract's `error.message` literal is `message`; this is `error.details`. */
  details: string | null;
  rateLimit: RateLimit | null;
  /** `Retry-After` seconds of a 429. */
  retryAfter: number | null;
  /** True when the route does not exist on this gateway (404 `Not found`). */
  readonly notAvailable: boolean;
}

export interface WebSocketSettings {
  enabled: boolean;
  events?: EventType[];
  mediaBase64?: boolean;
}

export interface WebhookStats {
  pending: number;
  failed: number;
  delivered: number;
  lastSuccessAt: number | null;
  lastFailureAt: number | null;
  lastError: string | null;
}

export interface Webhook {
  label: string;
  enabled: boolean;
  url: string | null;
  authorization: string | null;
  byEvents: boolean;
  events: EventType[];
  mediaBase64: boolean;
  ordered: boolean;
  secret: string;
  stats?: WebhookStats;
}

export interface WebhookConfig {
  label?: string;
  enabled: boolean;
  url?: string;
  authorization?: string | null;
  byEvents?: boolean;
  events?: EventType[];
  mediaBase64?: boolean;
  ordered?: boolean;
  rotateSecret?: boolean;
}

export interface DeadLetter {
  id: string;
  label: string;
  event: EventType;
  attempts: number;
  lastStatus: number | null;
  lastError: string;
  createdAt: number;
  lastAttemptAt: number | null;
  envelope: Envelope;
}

export interface Instance {
  name: string;
  /** Present only for a TokenAccount caller. */
  token?: string;
  websocket: Required<WebSocketSettings> | null;
  webhook?: Webhook | null;
  connectedClients: number;
}

/** The 201's `instance`: its token always, its webhook without `stats`, no client count. */
export interface CreatedInstance {
  name: string;
  token: string;
  websocket: Required<WebSocketSettings> | null;
  webhook: Omit<Webhook, 'stats'> | null;
}

export interface PublishItem {
  event: EventType;
  data: Record<string, unknown>;
}

export interface ApiOptions {
  /** The gateway's HTTP base URL; in a browser, defaults to the page's origin. */
  baseUrl?: string;
  token: string;
  fetch?: typeof fetch;
}

export declare class EventGateApi {
  constructor(options: ApiOptions);
  baseUrl: string;
  token: string;
  /** The X-RateLimit-* headers of the last reply that carried them. */
  rateLimit: RateLimit | null;
  request<T = any>(method: string, path: string, body?: unknown): Promise<T>;
  listInstances(): Promise<Instance[]>;
  createInstance(body: Record<string, unknown> & { name: string }): Promise<CreatedInstance>;
  deleteInstance(instance: string): Promise<{ status: 'deleted' }>;
  /** null when the instance's WebSocket was never configured. */
  getWebsocket(instance: string): Promise<Required<WebSocketSettings> | null>;
  setWebsocket(instance: string, settings: WebSocketSettings): Promise<Required<WebSocketSettings>>;
  publish(instance: string, events: PublishItem | PublishItem[]): Promise<number>;
  publishEvent(instance: string, type: EventType, data: Record<string, unknown>): Promise<number>;
  listWebhooks(instance: string): Promise<Webhook[]>;
  getWebhook(instance: string, label?: string): Promise<Webhook>;
  setWebhook(instance: string, config: WebhookConfig): Promise<Webhook>;
  deleteWebhook(instance: string, label?: string): Promise<{ label: string; status: 'deleted' }>;
  failedDeliveries(
    instance: string,
    query?: { label?: string; limit?: number; after?: string | null },
  ): Promise<{ deliveries: DeadLetter[]; next: string | null }>;
  retryDeliveries(instance: string, body?: { label?: string; ids?: string[] }): Promise<number>;
}

export interface BackoffOptions {
  /** First retry delay (ms), default 500. */
  initialMs?: number;
  /** Largest delay (ms), default 30000. */
  maxMs?: number;
  /** Growth per attempt, default 2. */
  factor?: number;
  /** Fraction of each delay chosen at random, 0–1, default 0.5. */
  jitter?: number;
  /** Least delay after a 4008 (slow consumer), doubled while they repeat; default 5000. */
  slowConsumerMs?: number;
}

/**
 * Something that builds WebSockets like the browser's `WebSocket` (e.g. the
 * `ws` package). Loosely typed on purpose: the browser's and `ws`'s event
 * types differ, and both must fit.
 */
export type WebSocketConstructor = new (url: string) => {
  onopen: ((ev: any) => any) | null;
  onmessage: ((ev: any) => any) | null;
  onerror: ((ev: any) => any) | null;
  onclose: ((ev: any) => any) | null;
  readonly readyState: number;
  close(code?: number, reason?: string): void;
};

export interface ClientOptions {
  /** The gateway's HTTP base URL (`http://…` or `https://…`); in a browser, defaults to the page's origin. */
  baseUrl?: string;
  instance: string;
  /** TokenAccount or the instance's TokenInstance (sent as `?token=`). */
  token: string;
  /** Per-client narrowing (`?events=`); empty = everything the instance's filter lets through. */
  events?: EventType[];
  /** Opt in to recovery (`?recover=true`, §12); default true. */
  recover?: boolean;
  /** Reconnect after a drop; default true. */
  reconnect?: boolean;
  /**
   * Silence after which the connection counts as dropped (ms; default 60000,
   * 0 = never): no envelope and no ping from the gateway (which pings every
   * 20 s). Pings are seen where the socket reports them (the `ws` package);
   * browsers show none and keep this check to themselves.
   */
  heartbeatTimeoutMs?: number;
  backoff?: BackoffOptions;
  /** Required in Node 20 (no global WebSocket there): e.g. `import WebSocket from 'ws'`. */
  WebSocket?: WebSocketConstructor;
  fetch?: typeof fetch;
  /** Resume from a position saved earlier. */
  position?: Position | null;
  /** Random source for jitter (tests). */
  random?: () => number;
}

export type ClientState =
  | { state: 'idle' }
  | { state: 'connecting'; attempt: number; recovering: boolean }
  | { state: 'reconnecting'; attempt: number; recovering: boolean }
  | { state: 'live'; since?: Position | null; recovery?: RecoveryOutcome }
  | { state: 'waiting'; attempt: number; delayMs: number; retryAt: number; code: number; reason: string }
  | { state: 'closed'; reason: string; code?: number; status?: number; final?: boolean };

export interface RecoveryOutcome {
  /** True when this connection asked for missed events (`since`/`epoch`). */
  requested: boolean;
  recovered: boolean;
  /** The gateway's current epoch ("" without a history). */
  epoch: string;
  /** Latest offset when the connection started (0 if none). */
  offset: number;
  since?: Position | null;
  /** True when the reconnection was asked for (`setEvents`), not caused by a drop. */
  deliberate?: boolean;
  /** True when this client lost its connection and this one replaces it (not a first start or a resume from a saved position). */
  afterDrop?: boolean;
}

export declare class EventGateClient {
  constructor(options: ClientOptions);
  readonly baseUrl: string;
  readonly instance: string;
  events: EventType[];
  position: Position | null;
  state: ClientState;
  /** The WebSocket URL, token included: never show or log it. */
  url(): string;
  connect(): this;
  close(): void;
  setEvents(events: EventType[]): void;
  nextDelay(attempt: number): number;
  on(name: 'event', handler: (envelope: Envelope, meta: EventMeta) => void): () => void;
  on(name: 'state', handler: (state: ClientState) => void): () => void;
  on(name: 'recovery', handler: (outcome: RecoveryOutcome) => void): () => void;
  on(name: 'open', handler: () => void): () => void;
  on(name: 'close', handler: (ev: { code: number; reason: string; opened: boolean }) => void): () => void;
  on(name: 'control', handler: (frame: { event: string; data: unknown }) => void): () => void;
  on(name: 'error', handler: (error: unknown) => void): () => void;
  off(name: string, handler: (...args: any[]) => void): void;
}

/** One plain phrase for a client state. */
export declare function describeState(state: ClientState, now?: number): string;

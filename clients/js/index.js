// eventgate client: live events of one instance over WebSocket (with
// reconnection, back-off and recovery) and a small REST helper for the
// settings, webhook and publish endpoints of the eventgate contract.
// Plain ES module, no dependencies: runs in browsers and in Node >= 20
// (pass a WebSocket constructor there, e.g. the `ws` package's).

/** The six event types of the contract, in its order. */
export const EVENT_TYPES = Object.freeze([
  'message.exchange',
  'message.status',
  'call.update',
  'group.flow',
  'instance.state',
  'label.update',
]);

/** Close codes the gateway uses (contract §6). */
export const CloseCodes = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  INVALID_UTF8: 1007,
  MESSAGE_TOO_BIG: 1009,
  HEARTBEAT_TIMEOUT: 4001,
  INSTANCE_DELETED: 4004,
  SLOW_CONSUMER: 4008,
});

/** Human words for the close codes. */
const CLOSE_REASONS = {
  1000: 'closed by the gateway',
  1001: 'gateway shutting down',
  1006: 'connection lost',
  1007: 'invalid UTF-8 sent',
  1009: 'message too big',
  4001: 'heartbeat timeout',
  4004: 'instance deleted',
  4008: 'slow consumer',
};

/** Refusals of the upgrade that no retry can fix (status + contract literal). */
const FATAL_REFUSALS = new Set([
  '401 Missing token in header, Authorization header, or query parameter',
  '401 Invalid token',
  '403 Instance token does not match this instance',
  '403 Origin not allowed',
  '404 Instance not found',
  '400 Invalid request body',
]);

/** Why an upgrade failed when a plain request to the same URL passes every check. */
export const ORIGIN_SUSPECTED =
  'WebSocket refused although the token and instance are fine: is this origin allowed (EVENTGATE_WS_ALLOWED_ORIGINS)?';

/** Why an upgrade was refused outside a browser when a plain request passes every check. */
export const UPGRADE_REFUSED =
  'WebSocket refused although the token and instance are fine: a connection limit, or something between here and the gateway';

/** An error reply of the gateway (contract §3), or a failure to reach it. */
export class EventGateError extends Error {
  /**
   * @param {number} status HTTP status (0 when the gateway could not be reached)
   * @param {string} message the contract's `error.message`
   * @param {object} [extra] details, rateLimit, retryAfter
   */
  constructor(status, message, extra = {}) {
    super(message);
    this.name = 'EventGateError';
    this.status = status;
    this.details = extra.details ?? null;
    this.rateLimit = extra.rateLimit ?? null;
    this.retryAfter = extra.retryAfter ?? null;
  }

  /** True when the route does not exist on this gateway (404 `Not found`). */
  get notAvailable() {
    return this.status === 404 && this.message === 'Not found';
  }
}

function trimSlash(url) {
  return String(url).replace(/\/+$/, '');
}

function defaultBaseUrl() {
  if (typeof globalThis.location !== 'undefined' && globalThis.location.origin) {
    return globalThis.location.origin;
  }
  throw new TypeError('baseUrl is required outside a browser');
}

function readRateLimit(headers) {
  const limit = headers.get('x-ratelimit-limit');
  if (limit === null) return null;
  return {
    limit: Number(limit),
    remaining: Number(headers.get('x-ratelimit-remaining')),
    reset: Number(headers.get('x-ratelimit-reset')),
  };
}

/**
 * The REST API of one gateway with one token. Every method resolves to the
 * reply's payload, or rejects with an {@link EventGateError}.
 */
export class EventGateApi {
  /**
   * @param {{baseUrl?: string, token: string, fetch?: typeof fetch}} options
   */
  constructor(options = {}) {
    if (!options.token) throw new TypeError('token is required');
    this.baseUrl = trimSlash(options.baseUrl ?? defaultBaseUrl());
    this.token = options.token;
    this.fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    /** The X-RateLimit-* headers of the last reply that carried them. */
    this.rateLimit = null;
  }

  /** Sends one request; resolves to the parsed success body. */
  async request(method, path, body) {
    const headers = { token: this.token, accept: 'application/json' };
    const init = { method, headers, cache: 'no-store' };
    if (body !== undefined) {
      headers['content-type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await this.fetch(this.baseUrl + path, init);
    } catch (e) {
      throw new EventGateError(0, 'Gateway unreachable', { details: String(e?.message ?? e) });
    }
    const rateLimit = readRateLimit(res.headers);
    if (rateLimit) this.rateLimit = rateLimit;
    let parsed = null;
    const text = await res.text();
    try {
      parsed = text ? JSON.parse(text) : null;
    } catch {
      parsed = null;
    }
    if (!res.ok || !parsed || parsed.success === false) {
      const message = parsed?.error?.message ?? `HTTP ${res.status}`;
      const retry = res.headers.get('retry-after');
      throw new EventGateError(res.status, message, {
        details: parsed?.error?.details,
        rateLimit,
        retryAfter: retry === null ? null : Number(retry),
      });
    }
    return parsed;
  }

  /** `GET /api/instance/list`: the instances this token sees. */
  async listInstances() {
    return (await this.request('GET', '/api/instance/list')).instances;
  }

  /** `POST /api/instance/new` (TokenAccount): the created instance. */
  async createInstance(body) {
    return (await this.request('POST', '/api/instance/new', body)).instance;
  }

  /** `DELETE /api/instance/delete/:instance` (TokenAccount). */
  async deleteInstance(instance) {
    return (await this.request('DELETE', `/api/instance/delete/${enc(instance)}`)).instance;
  }

  /** `GET /api/events/getWebsocket/:instance`: the settings, or null when never set. */
  async getWebsocket(instance) {
    try {
      return (await this.request('GET', `/api/events/getWebsocket/${enc(instance)}`)).websocket;
    } catch (e) {
      if (e.status === 404 && e.message === 'WebSocket not configured for this instance') return null;
      throw e;
    }
  }

  /** `POST /api/events/websocket/:instance`: the settings as persisted. */
  async setWebsocket(instance, settings) {
    return (await this.request('POST', `/api/events/websocket/${enc(instance)}`, settings)).websocket;
  }

  /** `POST /api/events/publish/:instance` (TokenAccount): one event or a list; resolves to `accepted`. */
  async publish(instance, events) {
    return (await this.request('POST', `/api/events/publish/${enc(instance)}`, events)).accepted;
  }

  /** Shortcut: publish one event of `type` with `data`. */
  async publishEvent(instance, type, data) {
    return this.publish(instance, { event: type, data });
  }

  /** `GET /api/events/getWebhook/:instance`: every webhook (with stats). */
  async listWebhooks(instance) {
    return (await this.request('GET', `/api/events/getWebhook/${enc(instance)}`)).webhooks;
  }

  /** `GET /api/events/getWebhook/:instance?label=`: one webhook (with stats). */
  async getWebhook(instance, label = 'default') {
    const q = `?label=${enc(label)}`;
    return (await this.request('GET', `/api/events/getWebhook/${enc(instance)}${q}`)).webhook;
  }

  /** `POST /api/events/webhook/:instance`: the webhook as persisted. */
  async setWebhook(instance, config) {
    return (await this.request('POST', `/api/events/webhook/${enc(instance)}`, config)).webhook;
  }

  /** `DELETE /api/events/webhook/:instance?label=`. */
  async deleteWebhook(instance, label = 'default') {
    const q = `?label=${enc(label)}`;
    return (await this.request('DELETE', `/api/events/webhook/${enc(instance)}${q}`)).webhook;
  }

  /** `GET /api/events/webhook/:instance/failed`: one page of dead letters `{deliveries, next}`. */
  async failedDeliveries(instance, { label, limit, after } = {}) {
    const q = new URLSearchParams();
    if (label !== undefined) q.set('label', label);
    if (limit !== undefined) q.set('limit', String(limit));
    if (after !== undefined && after !== null) q.set('after', after);
    const qs = q.toString() ? `?${q}` : '';
    const reply = await this.request('GET', `/api/events/webhook/${enc(instance)}/failed${qs}`);
    return { deliveries: reply.deliveries, next: reply.next ?? null };
  }

  /** `POST /api/events/webhook/:instance/retry`: resolves to `requeued`. */
  async retryDeliveries(instance, { label, ids } = {}) {
    const body = {};
    if (label !== undefined) body.label = label;
    if (ids !== undefined) body.ids = ids;
    return (await this.request('POST', `/api/events/webhook/${enc(instance)}/retry`, body)).requeued;
  }
}

function enc(s) {
  return encodeURIComponent(String(s));
}

/** A tiny event emitter (browsers and Node alike). */
class Emitter {
  constructor() {
    this._handlers = new Map();
  }

  /** Adds a handler; returns a function that removes it. */
  on(name, handler) {
    if (!this._handlers.has(name)) this._handlers.set(name, new Set());
    this._handlers.get(name).add(handler);
    return () => this.off(name, handler);
  }

  off(name, handler) {
    this._handlers.get(name)?.delete(handler);
  }

  emit(name, ...args) {
    for (const handler of [...(this._handlers.get(name) ?? [])]) {
      try {
        handler(...args);
      } catch (e) {
        if (name !== 'error') this.emit('error', e);
      }
    }
  }
}

/**
 * The gateway pings every 20 s and closes a client silent for 60 s (§6); a
 * connection from which nothing came for as long is gone, even if the socket
 * looks open (a network change, a NAT or a laptop lid dropped it silently).
 */
const DEFAULT_HEARTBEAT_TIMEOUT_MS = 60000;

/** Longest wait for the plain GET that learns why an upgrade was refused. */
const DIAGNOSE_TIMEOUT_MS = 10000;

const DEFAULT_BACKOFF = Object.freeze({
  initialMs: 500,
  maxMs: 30000,
  factor: 2,
  jitter: 0.5,
  slowConsumerMs: 5000,
});

/**
 * The live events of one instance. Connects to `/ws/:instance?token=…`,
 * reconnects after a drop (exponential back-off with jitter; at once after
 * 1001, longer after 4008, never after 4004 or a refusal no retry can fix)
 * and, when the gateway keeps a history (envelopes carry `offset` and
 * `epoch`), asks for the missed events on every reconnection.
 *
 * Events: `event` (envelope, meta), `state` (state), `recovery` (outcome),
 * `open`, `close` ({code, reason}), `error` (error).
 */
export class EventGateClient extends Emitter {
  /**
   * @param {import('./index.d.ts').ClientOptions} options
   */
  constructor(options = {}) {
    super();
    if (!options.instance) throw new TypeError('instance is required');
    if (!options.token) throw new TypeError('token is required');
    this.baseUrl = trimSlash(options.baseUrl ?? defaultBaseUrl());
    this.instance = String(options.instance);
    this.token = String(options.token);
    this.events = normaliseEvents(options.events);
    this.recover = options.recover !== false;
    this.autoReconnect = options.reconnect !== false;
    /** Silence (no event, no ping) after which a connection counts as dropped; 0 = never. */
    this.heartbeatTimeoutMs = options.heartbeatTimeoutMs ?? DEFAULT_HEARTBEAT_TIMEOUT_MS;
    this.backoff = { ...DEFAULT_BACKOFF, ...(options.backoff ?? {}) };
    this.random = options.random ?? Math.random;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    if (typeof this.WebSocket !== 'function') {
      throw new TypeError('no WebSocket constructor: pass options.WebSocket (e.g. the ws package)');
    }
    /** Position of the last envelope processed: `{epoch, offset}` or null. */
    this.position = options.position ?? null;
    /** The current state (see `state` events). */
    this.state = { state: 'idle' };
    this._socket = null;
    /** Counts sockets made and closes asked for: a retry decided for an older one is dropped. */
    this._generation = 0;
    this._timer = null;
    this._attempt = 0;
    this._slowStreak = 0;
    this._stopped = true;
    this._connections = 0;
    this._replayUpTo = null;
  }

  /** The WebSocket URL (with the token). Never show or log it. */
  url() {
    const ws = this.baseUrl.replace(/^http/, 'ws');
    const q = new URLSearchParams({ token: this.token });
    if (this.events.length) q.set('events', this.events.join(','));
    if (this.recover) {
      q.set('recover', 'true');
      if (this.position && this.position.epoch !== undefined && this.position.offset !== undefined) {
        q.set('epoch', this.position.epoch);
        q.set('since', String(this.position.offset));
      }
    }
    return `${ws}/ws/${enc(this.instance)}?${q}`;
  }

  /** Starts (or restarts) the connection. */
  connect() {
    this._stopped = false;
    this._reopenNow();
    return this;
  }

  /** Closes for good (no reconnection). */
  close() {
    this._stopped = true;
    this._letGo();
    this._clearTimer();
    this._setState({ state: 'closed', reason: 'closed by you' });
  }

  /** Changes the per-client narrowing (`?events=`) and reconnects with it. */
  setEvents(events) {
    this.events = normaliseEvents(events);
    if (!this._stopped) this._reopenNow(true);
  }

  _reopenNow(deliberate = false) {
    this._clearTimer();
    this._attempt = 0;
    this._open(deliberate);
  }

  /**
   * Closes the current socket, if any, unheard, and makes every retry
   * decided for it stale (see `_scheduleRetry`).
   */
  _letGo() {
    this._generation += 1;
    const socket = this._socket;
    this._socket = null;
    if (socket) {
      detach(socket);
      try {
        socket.close(1000);
      } catch {
        /* already closed */
      }
    }
  }

  _clearTimer() {
    if (this._timer !== null) {
      clearTimeout(this._timer);
      this._timer = null;
    }
  }

  _setState(state) {
    this.state = state;
    this.emit('state', state);
  }

  _open(deliberate = false) {
    if (this._stopped) return;
    const recovering = Boolean(this.recover && this.position);
    const afterDrop = this._connections > 0 && !deliberate;
    this._setState({
      state: this._connections === 0 ? 'connecting' : 'reconnecting',
      attempt: this._attempt + 1,
      recovering,
    });
    this._letGo();
    let socket;
    try {
      socket = new this.WebSocket(this.url());
    } catch (e) {
      this.emit('error', e);
      this._scheduleRetry({ code: 1006, reason: 'connection lost' }, false);
      return;
    }
    this._socket = socket;
    // The HTTP status of a refused upgrade, where the socket tells it (the
    // `ws` package: "Unexpected server response: 429"); browsers never do.
    let refusedWith = null;
    let opened = false;
    let sentSince = recovering;
    let first = true;
    const heard = this._watchHeartbeat(socket);
    socket.onopen = () => {
      if (this._socket !== socket) return;
      heard();
      opened = true;
      this._connections += 1;
      this._attempt = 0;
      this._replayUpTo = null;
      this.emit('open');
      this._setState({ state: 'live', since: recovering ? this.position : null });
    };
    socket.onmessage = (msg) => {
      if (this._socket !== socket) return;
      heard();
      if (typeof msg.data !== 'string') return;
      let envelope;
      try {
        envelope = JSON.parse(msg.data);
      } catch (e) {
        this.emit('error', e);
        return;
      }
      if (first) {
        first = false;
        if (envelope && envelope.event === 'connection.recovery') {
          this._onRecoveryFrame(envelope.data ?? {}, sentSince, { deliberate, afterDrop });
          sentSince = false;
          return;
        }
      }
      if (envelope && typeof envelope.event === 'string' && envelope.event.startsWith('connection.')) {
        this.emit('control', envelope);
        return;
      }
      const meta = { replayed: false };
      if (envelope && typeof envelope.offset === 'number' && typeof envelope.epoch === 'string') {
        if (this._replayUpTo !== null && envelope.offset <= this._replayUpTo) meta.replayed = true;
        this.position = { epoch: envelope.epoch, offset: envelope.offset };
      }
      this.emit('event', envelope, meta);
    };
    socket.onerror = (ev) => {
      // The close event follows and says what happened.
      const said = /Unexpected server response: (\d+)/.exec(String(ev?.message ?? ev?.error?.message ?? ''));
      if (said) refusedWith = Number(said[1]);
    };
    socket.onclose = (ev) => {
      if (this._socket !== socket) return;
      const code = ev?.code ?? 1006;
      this._dropped(socket, code, ev?.reason || CLOSE_REASONS[code] || `closed (${code})`, opened, refusedWith);
    };
  }

  /** The current socket ended (closed, or silent too long): retry as its code says. */
  _dropped(socket, code, reason, opened, refusedWith = null) {
    if (this._socket !== socket) return;
    this._socket = null;
    detach(socket);
    this.emit('close', { code, reason, opened });
    this._scheduleRetry({ code, reason, refusedWith }, opened);
  }

  /**
   * Ends `socket` as a drop when nothing came from it — no envelope, no ping —
   * for `heartbeatTimeoutMs`. Pings are seen where the socket reports them
   * (the `ws` package's `ping` event); a browser answers them itself and
   * shows none, so there only envelopes count and the check is left to the
   * browser's own network stack. Returns the function to call on each
   * envelope.
   */
  _watchHeartbeat(socket) {
    const limit = this.heartbeatTimeoutMs;
    let last = Date.now();
    const heard = () => {
      last = Date.now();
    };
    if (!(limit > 0) || typeof socket.on !== 'function') return heard;
    socket.on('ping', heard);
    const timer = setInterval(() => {
      if (this._socket !== socket) {
        clearInterval(timer);
        return;
      }
      if (Date.now() - last < limit) return;
      clearInterval(timer);
      const wasOpen = socket.readyState === 1;
      try {
        if (typeof socket.terminate === 'function') socket.terminate();
        else socket.close(4000);
      } catch {
        /* already gone */
      }
      // Silent while connecting too: a handshake that never ends.
      this._dropped(socket, 1006, 'no heartbeat from the gateway', wasOpen);
    }, Math.max(20, Math.min(limit / 4, 5000)));
    timer.unref?.();
    return heard;
  }

  _onRecoveryFrame(data, sentSince, { deliberate, afterDrop }) {
    const epoch = typeof data.epoch === 'string' ? data.epoch : '';
    const latest = typeof data.offset === 'number' ? data.offset : 0;
    if (!sentSince) {
      // A starting position (first connection, or no history to recover from).
      if (epoch !== '') this.position = this.position ?? { epoch, offset: latest };
      this.emit('recovery', { requested: false, recovered: true, epoch, offset: latest });
      return;
    }
    const since = this.position;
    if (data.recovered === true) {
      this._replayUpTo = latest;
      const outcome = { requested: true, recovered: true, epoch, offset: latest, since, deliberate, afterDrop };
      this.emit('recovery', outcome);
      this._setState({ state: 'live', recovery: outcome });
    } else {
      // Nothing is replayed: continue from the current position.
      this.position = epoch === '' ? null : { epoch, offset: latest };
      const outcome = { requested: true, recovered: false, epoch, offset: latest, since, deliberate, afterDrop };
      this.emit('recovery', outcome);
      this._setState({ state: 'live', recovery: outcome });
    }
  }

  async _scheduleRetry(closed, opened) {
    if (this._stopped) return;
    const generation = this._generation;
    const { code } = closed;
    if (code === CloseCodes.INSTANCE_DELETED) {
      this._stopped = true;
      this._setState({ state: 'closed', code, reason: 'instance deleted', final: true });
      return;
    }
    let refusal = null;
    let minimumMs = 0;
    if (!opened) {
      refusal = await this._diagnose(closed.refusedWith);
      // Stopped, or connected anew (`connect`, `setEvents`) meanwhile.
      if (this._stopped || this._generation !== generation) return;
      if (refusal && !this.autoReconnect) {
        this._stopped = true;
        this.emit('error', refusal);
        this._setState({ state: 'closed', reason: refusal.message, status: refusal.status, code, final: true });
        return;
      }
      if (refusal && FATAL_REFUSALS.has(`${refusal.status} ${refusal.message}`)) {
        this._stopped = true;
        this.emit('error', refusal);
        this._setState({
          state: 'closed',
          reason: refusal.message,
          status: refusal.status,
          final: true,
        });
        return;
      }
      if (refusal) {
        this.emit('error', refusal);
        if (refusal.retryAfter) minimumMs = refusal.retryAfter * 1000;
      }
    }
    if (!this.autoReconnect) {
      this._stopped = true;
      this._setState({ state: 'closed', code, reason: closed.reason, final: true });
      return;
    }
    this._attempt += 1;
    let delay;
    if (code === CloseCodes.GOING_AWAY && opened) {
      delay = 0;
    } else {
      delay = this.nextDelay(this._attempt);
    }
    if (code === CloseCodes.SLOW_CONSUMER) {
      this._slowStreak += 1;
      const slow = this.backoff.slowConsumerMs * 2 ** (this._slowStreak - 1);
      delay = Math.max(delay, Math.min(slow, Math.max(this.backoff.maxMs, this.backoff.slowConsumerMs) * 8));
    } else if (opened) {
      this._slowStreak = 0;
    }
    delay = Math.max(delay, minimumMs);
    this._setState({
      state: 'waiting',
      attempt: this._attempt,
      delayMs: delay,
      retryAt: Date.now() + delay,
      code,
      reason: refusal ? refusal.message : closed.reason,
    });
    this._clearTimer();
    this._timer = setTimeout(() => {
      this._timer = null;
      this._open();
    }, delay);
  }

  /** The delay before retry number `attempt` (1-based): exponential, capped, with jitter. */
  nextDelay(attempt) {
    const { initialMs, maxMs, factor, jitter } = this.backoff;
    const base = Math.min(maxMs, initialMs * factor ** Math.max(0, attempt - 1));
    const spread = Math.min(1, Math.max(0, jitter));
    return Math.round(base * (1 - spread) + base * spread * this.random());
  }

  /**
   * Why did the upgrade fail? A browser does not see the HTTP reply of a
   * refused WebSocket upgrade, so the same URL is asked once more as a plain
   * GET: the gateway runs the same checks and answers the first failing one
   * (or 400 `WebSocket upgrade expected` when everything else is fine).
   */
  async _diagnose(refusedWith = null) {
    if (!this.fetch) return null;
    try {
      const res = await this.fetch(this.url().replace(/^ws/, 'http'), {
        cache: 'no-store',
        // A gateway (or a proxy) that never answers must not hold the retries.
        signal: globalThis.AbortSignal?.timeout?.(DIAGNOSE_TIMEOUT_MS),
      });
      const body = await res.json().catch(() => null);
      const message = body?.error?.message;
      if (message === 'WebSocket upgrade expected') {
        // Every check passed for a plain request: what refused the upgrade
        // is what only an upgrade meets. A 403 there is the Origin; another
        // status (the `ws` package reports it) is a bound such as the
        // connection limits; with no status (a browser shows none) the
        // Origin, what a page's upgrade carries and a plain GET does not,
        // is the likely one.
        if (refusedWith === null || refusedWith === 403) return new EventGateError(403, ORIGIN_SUSPECTED);
        return new EventGateError(refusedWith, UPGRADE_REFUSED);
      }
      if (!message) return null;
      const retry = res.headers.get('retry-after');
      return new EventGateError(res.status, message, {
        details: body?.error?.details,
        retryAfter: retry === null ? null : Number(retry),
      });
    } catch {
      return null;
    }
  }
}

function detach(socket) {
  socket.onopen = null;
  socket.onmessage = null;
  socket.onerror = null;
  socket.onclose = null;
  // An event emitter (the `ws` package) with no 'error' listener throws on
  // its next error, which would end a Node process.
  if (typeof socket.on === 'function') socket.on('error', () => {});
}

function normaliseEvents(events) {
  if (events === undefined || events === null) return [];
  const list = Array.isArray(events) ? events : String(events).split(',');
  const out = [];
  for (const name of list.map((e) => String(e).trim()).filter(Boolean)) {
    if (!EVENT_TYPES.includes(name)) throw new TypeError(`unknown event type: ${name}`);
    if (!out.includes(name)) out.push(name);
  }
  return out;
}

/** One plain phrase for a client state (what the console shows). */
export function describeState(state, now = Date.now()) {
  switch (state?.state) {
    case 'idle':
      return 'not connected';
    case 'connecting':
      return 'connecting…';
    case 'reconnecting':
      return state.recovering ? 'reconnecting… (recovering missed events)' : 'reconnecting…';
    case 'live': {
      const r = state.recovery;
      if (r && r.requested && r.recovered) return 'live';
      if (r && r.requested && !r.recovered) return 'could not recover: reload from your backend';
      return 'live';
    }
    case 'waiting': {
      const secs = Math.max(0, Math.ceil((state.retryAt - now) / 1000));
      const why = state.reason ? ` — ${state.reason}` : '';
      return `reconnecting in ${secs} s (attempt ${state.attempt})${why}`;
    }
    case 'closed':
      return state.reason ? `closed: ${state.reason}` : 'closed';
    default:
      return '';
  }
}
